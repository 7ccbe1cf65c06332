"""Upload offsets: the trained greedy policy's upload timing, tuned on the reward itself.

After training, each BS's upload term is raised by an offset b[m, t mod K] in slot t
(`QPolicy`, `with_upload_offsets`); every BS knows the slot index, as the staggered
heuristics do. The offsets are fitted by a pattern search (coordinate by coordinate, each
moved along `grid` while the score does not fall, one pass) on validation episodes: their
own seeds, never the evaluation's nor a training episode's. The score is what the learner
trains on: the mean team reward for VDN and QMIX; for IQL, BS m's own local reward for BS
m's offsets (each BS tunes for itself, as it learns).

Why: the Q-learners leave the upload bit where its value is small against the reward's
noise; on their validation episodes the greedy policy's upload choices can be scored
exactly (the environment's randomness does not depend on the actions), so a handful of
numbers per BS is tuned directly. docs/learners.md, "Upload offsets", has the measurements.
"""

from __future__ import annotations

import numpy as np
import torch

from dntsync.env.evaluate import Evaluation, rollout


def scores(learner, validation: Evaluation, offsets: torch.Tensor) -> np.ndarray:
    """`[M]`: the score of each BS's offsets with `offsets` `[M, K]` on `validation`'s episodes:
    the team reward per step (the same for every BS) or, without a mixer (IQL), each BS's
    local reward per step."""
    policy = learner.greedy_policy(offsets)
    local = learner.mixer is None
    played = [rollout(env, policy, seed=s, record=local)
              for env, s in zip(validation.envs, validation.seeds)]
    if local:
        return np.concatenate([p.local_rewards for p in played]).mean(axis=(0, 1))
    team = float(np.concatenate([p.steps["team_reward"] for p in played]).mean())
    return np.full(offsets.shape[0], team)


def fit_upload_offsets(learner, validation: Evaluation, grid: tuple[float, ...],
                       start: torch.Tensor | None = None) -> dict:
    """Fit `learner.upload_offsets` `[M, K]` in place from `start` (grid values; default
    zero), one pass; return the record: the offsets, the validation score before and after
    (the team's, or the BSs' mean local reward) and the number of validation plays."""
    offsets = torch.zeros_like(learner.upload_offsets) if start is None else start.clone()
    grid = [float(g) for g in grid]
    current = scores(learner, validation, offsets)
    before, plays = float(current.mean()), 1
    n_bs, n_phases = offsets.shape
    for m in range(n_bs):
        for k in range(n_phases):
            start = grid.index(float(offsets[m, k]))
            best, best_scores = start, current
            for step in (1, -1):  # walk up, then down, while the score does not fall
                i, last = start + step, current[m]
                while 0 <= i < len(grid):
                    trial = offsets.clone()
                    trial[m, k] = grid[i]
                    got = scores(learner, validation, trial)
                    plays += 1
                    if got[m] > best_scores[m]:
                        best, best_scores = i, got
                    if got[m] < last:
                        break
                    last, i = got[m], i + step
            offsets[m, k] = grid[best]
            current = best_scores
    learner.upload_offsets.copy_(offsets)
    return {"offsets": offsets.tolist(), "validation_before": before,
            "validation_after": float(current.mean()), "validation_plays": plays,
            "validation_episodes": validation.n_episodes, "validation_seeds": validation.seeds}
