"""Upload offsets: the trained greedy policy's upload timing, tuned on the reward itself.

After training, each BS's upload term is raised by an offset b[m, t mod K] in slot t
(`QPolicy`, `dntsync.marl.networks.with_upload_offsets`); every BS knows the slot index, as
the staggered heuristics do. The offsets are fitted by a pattern search (coordinate by
coordinate, each moved along `grid` while the score does not fall; up to `passes` passes
over the coordinates, fewer once a pass moves none) on validation episodes: their own seeds, never the evaluation's nor a training
episode's. The score is what the learner trains on: the mean team reward for VDN and QMIX;
for IQL, BS m's own local reward for BS m's offsets (each BS tunes for itself, as it learns).

A walk stops early where going on cannot change a single action: raising b[m, k] once BS m
uploads in every phase-k slot of the validation episodes, or lowering it once BS m uploads
in none. Only BS m's phase-k upload bits read b[m, k], so every later step would replay the
same episodes action for action; the fit is the one the full walk finds, in fewer plays.
Offsets met again (a later pass's trial that an earlier one played) are not played again.

Why: the Q-learners leave the upload bit where its value is small against the reward's
noise; on their validation episodes the greedy policy's upload choices can be scored
exactly (the environment's randomness does not depend on the actions), so a handful of
numbers per BS is tuned directly. docs/learners.md, "Upload offsets", has the measurements.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dntsync.env.evaluate import Evaluation, rollout


@dataclass
class Play:
    """One greedy play of the validation episodes with some offsets `[M, K]`."""

    scores: np.ndarray  # [M]: the team reward per step (the same for every BS) or each BS's local reward
    uploads: np.ndarray  # [M, K]: the share of phase-k slots in which BS m uploaded

    def saturated(self, m: int, k: int, step: int) -> bool:
        """Moving b[m, k] by `step` (+1 up, -1 down the grid) changes no action."""
        return bool(self.uploads[m, k] == (1.0 if step > 0 else 0.0))


class _CountUploads:
    """An `EpisodePolicy` that plays `policy` and counts each BS's uploads per slot phase."""

    def __init__(self, policy, n_bs: int, n_phases: int) -> None:
        self.policy, self.name = policy, policy.name
        self.uploads = np.zeros((n_bs, n_phases))
        self.slots = np.zeros(n_phases)
        self.slot = 0

    def begin_episode(self, n_envs: int) -> None:
        self.policy.begin_episode(n_envs)
        self.slot = 0

    def act(self, state, obs) -> np.ndarray:
        actions = np.asarray(self.policy.act(state, obs))
        k = self.slot % len(self.slots)
        self.uploads[:, k] += (actions & 1).sum(axis=0)  # bit 0: upload
        self.slots[k] += actions.shape[0]
        self.slot += 1
        return actions


def play(learner, validation: Evaluation, offsets: torch.Tensor) -> Play:
    """The greedy policy with `offsets` `[M, K]` on `validation`'s episodes: each BS's score
    (`Play.scores`) and upload shares per phase."""
    n_bs, n_phases = offsets.shape
    policy = _CountUploads(learner.greedy_policy(offsets), n_bs, n_phases)
    local = learner.mixer is None
    played = [rollout(env, policy, seed=s, record=local)
              for env, s in zip(validation.envs, validation.seeds)]
    if local:
        per_bs = np.concatenate([p.local_rewards for p in played]).mean(axis=(0, 1))
    else:
        per_bs = np.full(n_bs, float(np.concatenate([p.steps["team_reward"] for p in played]).mean()))
    return Play(per_bs, policy.uploads / np.maximum(policy.slots, 1))


def scores(learner, validation: Evaluation, offsets: torch.Tensor) -> np.ndarray:
    """`[M]`: the score of each BS's offsets (`play(...).scores`)."""
    return play(learner, validation, offsets).scores


def fit_upload_offsets(learner, validation: Evaluation, grid: tuple[float, ...], passes: int = 1,
                       start: torch.Tensor | None = None) -> dict:
    """Fit `learner.upload_offsets` `[M, K]` in place from `start` (grid values; default
    zero): at most `passes` passes over the coordinates, stopping after one that moves none;
    return the record: the offsets, the validation score before and after (the team's, or
    the BSs' mean local reward) and the number of validation plays (each set of offsets is
    played once)."""
    offsets = torch.zeros_like(learner.upload_offsets) if start is None else start.clone()
    grid = [float(g) for g in grid]
    played: dict[tuple, Play] = {}

    def play_of(trial: torch.Tensor) -> Play:
        key = tuple(trial.flatten().tolist())
        if key not in played:
            played[key] = play(learner, validation, trial)
        return played[key]

    current = play_of(offsets)
    before = float(current.scores.mean())
    n_bs, n_phases = offsets.shape
    for _ in range(passes):
        moved = False
        for m in range(n_bs):
            for k in range(n_phases):
                start_at = grid.index(float(offsets[m, k]))
                best, best_play = start_at, current
                for step in (1, -1):  # walk up, then down, while the score does not fall
                    i, last = start_at + step, current
                    while 0 <= i < len(grid) and not last.saturated(m, k, step):
                        trial = offsets.clone()
                        trial[m, k] = grid[i]
                        got = play_of(trial)
                        if got.scores[m] > best_play.scores[m]:
                            best, best_play = i, got
                        if got.scores[m] < last.scores[m]:
                            break
                        last, i = got, i + step
                moved |= best != start_at
                offsets[m, k] = grid[best]
                current = best_play
        if not moved:
            break
    learner.upload_offsets.copy_(offsets)
    return {"offsets": offsets.tolist(), "validation_before": before,
            "validation_after": float(current.scores.mean()), "validation_plays": len(played),
            "validation_episodes": validation.n_episodes, "validation_seeds": validation.seeds}
