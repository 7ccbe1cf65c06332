"""Upload offsets: the trained greedy policy's upload timing, tuned on the reward itself.

After training, each BS's upload term is raised by an offset b[m, t mod K] in slot t
(`QPolicy`, `dntsync.marl.networks.with_upload_offsets`); every BS knows the slot index, as
the staggered heuristics do. The offsets are fitted by a pattern search (coordinate by
coordinate, each moved along `grid` while the score does not fall; up to `passes` passes
over the coordinates, fewer once a pass moves none) on validation episodes: their own
seeds, never the evaluation's nor a training episode's. The score is what the learner
trains on: the mean team reward for VDN and QMIX; for IQL, BS m's own local reward for BS
m's offsets (each BS tunes for itself, as it learns). With a team score the search starts
from the best of zero and the K^M assignments of each BS to one upload phase
(`phase_starts`): which BSs share an upload slot is a joint choice that one coordinate at a
time does not reach from zero. Longer upload cycles (`marl.upload_offsets.periods`, e.g.
every 5 or 10 slots where uploads are rarely worth their RBs) start it too, as the
heuristics' synchronised and staggered schedules; the walk goes on in the period of the
best start, and the learner keeps its offsets repeated over lcm(K, *periods) slots.

A walk stops early where going on cannot change a single action: raising b[m, k] once BS m
uploads in every phase-k slot of the validation episodes, or lowering it once BS m uploads
in none. Only BS m's phase-k upload bits read b[m, k], so every later step would replay the
same episodes action for action; the fit is the one the full walk finds, in fewer plays.
Offsets met again (a later pass's trial that an earlier one played) are not played again.
The starts, which do not depend on each other's scores, are played together (`play_each`):
copies of the validation episodes in one batch, each copy with its own offsets, the same
numbers as one play each in about half the time.

Before the offsets, whom the BSs serve: each covered user, or the learnt serve terms
(`fit_serve_covered`, `marl.network.serve_covered_fit`), then the association's slope
(`fit_association_slope`): the learnt score of distance that picks which covering BS serves
an overlap user, leant towards the nearest BS as far as the validation episodes ask
(`marl.network.association_slopes`).

Then, with a team score, the retry rules (upload k slots after the last success, then in every
slot until one succeeds) through offsets read by the slots since each BS's last success
(`fit_retry_offsets`, `dntsync.marl.networks.with_retry_offsets`): the best of them replaces
the slot offsets if it scores higher on the validation episodes; uploads fail often where
RBs are scarce, and a clock does not retry a failed one.

Among choices that score the same on the validation episodes every fit keeps the nearest-BS
rule's: serving every covered user, the largest slope, and of the starts the rules'
schedules (every BS uploading always or never, forced by `force`, every K slots or every p)
before the learnt timing (zero offsets). A learnt choice that the validation episodes
cannot tell from the rule's is then not played on the evaluation episodes, where it
differs from the rule's in states the validation episodes did not reach.

Why: the Q-learners leave the upload bit where its value is small against the reward's
noise; on their validation episodes the greedy policy's upload choices can be scored
exactly (the environment's randomness does not depend on the actions), so a handful of
numbers per BS is tuned directly. docs/learners.md, "Upload offsets", has the measurements.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch

from dntsync.env.evaluate import Evaluation, rollout
from dntsync.env.policies import staggered_phases
from dntsync.marl.learners import QPolicy


@dataclass
class Play:
    """One greedy play of the validation episodes with some offsets `[M, K]`."""

    scores: np.ndarray  # [M]: the team reward per step (the same for every BS) or each BS's local reward
    uploads: np.ndarray  # [M, K]: the share of phase-k slots in which BS m uploaded

    def saturated(self, m: int, k: int, step: int) -> bool:
        """Moving b[m, k] by `step` (+1 up, -1 down the grid) changes no action."""
        return bool(self.uploads[m, k] == (1.0 if step > 0 else 0.0))


class _CountUploads:
    """An `EpisodePolicy` that plays a `QPolicy` and counts each BS's uploads per slot phase
    (the phase its offsets are read at: `QPolicy.slot` mod K)."""

    def __init__(self, policy, n_bs: int, n_phases: int) -> None:
        self.policy, self.name = policy, policy.name
        self.uploads = np.zeros((n_bs, n_phases))
        self.slots = np.zeros(n_phases)

    def begin_episode(self, n_envs: int) -> None:
        self.policy.begin_episode(n_envs)

    def act(self, state, obs) -> np.ndarray:
        k = self.policy.slot % len(self.slots)
        actions = np.asarray(self.policy.act(state, obs))
        self.uploads[:, k] += (actions & 1).sum(axis=0)  # bit 0: upload
        self.slots[k] += actions.shape[0]
        return actions


def play(learner, validation: Evaluation, offsets: torch.Tensor, retry: tuple | None = None) -> Play:
    """The greedy policy with `offsets` `[M, K]` (and the learner's retry offsets, or
    `retry`) on `validation`'s episodes: each BS's score (`Play.scores`) and upload shares
    per phase."""
    n_bs, n_phases = offsets.shape
    policy = _CountUploads(learner.greedy_policy(offsets, retry), n_bs, n_phases)
    local = learner.mixer is None
    played = [rollout(env, policy, seed=s, record=local)
              for env, s in zip(validation.envs, validation.seeds)]
    if local:
        per_bs = np.concatenate([p.local_rewards for p in played]).mean(axis=(0, 1))
    else:
        per_bs = np.full(n_bs, float(np.concatenate([p.steps["team_reward"] for p in played]).mean()))
    return Play(per_bs, policy.uploads / np.maximum(policy.slots, 1))


class _CountUploadsEach:
    """`_CountUploads` for a `QPolicy` that plays C offsets at once on a replicated batch (copy c:
    environments `[c n, (c + 1) n)`), each counted at its own phases (K_c of them)."""

    def __init__(self, policy, n_bs: int, n_phases: list[int]) -> None:
        self.policy, self.name = policy, policy.name
        self.uploads = [np.zeros((n_bs, k)) for k in n_phases]
        self.slots = [np.zeros(k) for k in n_phases]

    def begin_episode(self, n_envs: int) -> None:
        self.policy.begin_episode(n_envs)

    def act(self, state, obs) -> np.ndarray:
        slot = self.policy.slot
        actions = np.asarray(self.policy.act(state, obs))
        for c, block in enumerate(np.split(actions, len(self.slots))):
            k = slot % len(self.slots[c])
            self.uploads[c][:, k] += (block & 1).sum(axis=0)
            self.slots[c][k] += block.shape[0]
        return actions


# Offsets played together in one batch by `play_each`: a play of C copies of the validation
# episodes takes far less than C plays (a step's cost is mostly per call, not per environment).
PLAYED_TOGETHER = 16


def play_each(learner, validation: Evaluation, trials: list[tuple[torch.Tensor, tuple | None]]) -> list[Play]:
    """`play(learner, validation, offsets, retry)` of every `(offsets, retry)` in `trials`, up to
    `PLAYED_TOGETHER` at a time on a replicated batch (`Evaluation.replicated`): the same
    episodes, actions and numbers as one play each, in less time. The offsets may differ in
    width K (each is repeated to their least common multiple; slot t reads column t mod K
    either way)."""
    out: list[Play] = []
    for first in range(0, len(trials), PLAYED_TOGETHER):
        group = trials[first:first + PLAYED_TOGETHER]
        out += [play(learner, validation, *group[0])] if len(group) == 1 else _play_together(learner, validation, group)
    return out


def _play_together(learner, validation: Evaluation, group: list[tuple[torch.Tensor, tuple | None]]) -> list[Play]:
    copies, n_bs = len(group), group[0][0].shape[0]
    widths = [offsets.shape[1] for offsets, _ in group]
    width = math.lcm(*widths)
    offsets = torch.stack([o.repeat(1, width // o.shape[1]) for o, _ in group])  # [C, M, width]
    retries = [retry if retry is not None else learner.retry for _, retry in group]
    if any(r is None for r in retries) and not all(r is None for r in retries):
        raise ValueError("offsets played together need retry offsets for all or none")
    local = learner.mixer is None
    played = []
    for env, seed, n in zip(validation.replicated(copies), validation.seeds, validation.sizes):
        each = lambda x: x.repeat_interleave(n, dim=0)  # noqa: E731 (copy c's n environments)
        retry = None if retries[0] is None else (each(torch.stack([r[0] for r in retries])),
                                                 each(torch.stack([r[1] for r in retries])), retries[0][2])
        policy = QPolicy(learner.online, 0.0, name=learner.algo, offsets=each(offsets), retry=retry)
        counter = _CountUploadsEach(policy, n_bs, widths)
        played.append((n, rollout(env, counter, seed=seed, record=local), counter))
    plays = []
    for c in range(copies):
        if local:
            rewards = np.concatenate([p.local_rewards[c * n:(c + 1) * n] for n, p, _ in played])
            per_bs = rewards.mean(axis=(0, 1))
        else:
            team = np.concatenate([p.steps["team_reward"][c * n:(c + 1) * n] for n, p, _ in played])
            per_bs = np.full(n_bs, float(team.mean()))
        uploads = sum(counter.uploads[c] for _, _, counter in played)
        slots = sum(counter.slots[c] for _, _, counter in played)
        plays.append(Play(per_bs, uploads / np.maximum(slots, 1)))
    return plays


def scores(learner, validation: Evaluation, offsets: torch.Tensor, retry: tuple | None = None) -> np.ndarray:
    """`[M]`: the score of each BS's offsets (`play(...).scores`)."""
    return play(learner, validation, offsets, retry).scores


def _current_offsets(learner) -> torch.Tensor:
    return learner.offsets if learner.offsets is not None else torch.zeros(len(learner.online.agents), 1)


def fit_serve_covered(learner, validation: Evaluation) -> dict:
    """Set the greedy policy's `serve_covered` (`dntsync.marl.networks.AgentQNets`): 1, every
    BS serving each user it covers as the nearest-BS rule does, unless the learnt serve terms
    score higher on `validation` with the current offsets and slope (the learner's score, its
    mean over the BSs); return the record: the choice and both scores."""
    nets, offsets = learner.online, _current_offsets(learner)
    played = {}
    for flag in (0.0, 1.0):
        nets.serve_covered.fill_(flag)
        played[flag] = float(play(learner, validation, offsets).scores.mean())
    chosen = 1.0 if played[1.0] >= played[0.0] else 0.0
    nets.serve_covered.fill_(chosen)
    return {"serve_covered": bool(chosen), "validation_learnt": played[0.0], "validation_covered": played[1.0]}


def fit_association_slope(learner, validation: Evaluation, slopes: tuple[float, ...]) -> dict:
    """Set the greedy policy's association slope c (`dntsync.marl.networks.Association`) to
    the one of `slopes` (increasing, from 0) whose play of `validation` with the current
    upload offsets scores highest (the learner's score, its mean over the BSs; the largest c,
    the nearest BS's side, among equals); return the record: the slope and each slope's
    score."""
    association, offsets = learner.online.association, _current_offsets(learner)
    played = {}
    for c in slopes:
        association.slope.fill_(float(c))
        played[float(c)] = float(play(learner, validation, offsets).scores.mean())
    best = max(played, key=lambda c: (played[c], c))
    association.slope.fill_(best)
    return {"slope": best, "validation": [[c, v] for c, v in played.items()]}


def schedule(phases: tuple[int, ...], period: int, grid: tuple[float, ...]) -> torch.Tensor:
    """The offsets `[M, period]` that force BS m to upload in the slots t = phases[m] mod
    period: b[m, k] the grid's top in BS m's phase, its bottom elsewhere (at the Q networks'
    scales a fixed schedule, as the every-k heuristics')."""
    start = torch.full((len(phases), period), min(grid))
    start[range(len(phases)), list(phases)] = max(grid)
    return start


def phase_starts(n_bs: int, n_phases: int, grid: tuple[float, ...],
                 periods: tuple[int, ...] = (), force: float | None = None) -> list[torch.Tensor]:
    """The rules' schedules, then the learnt timing: with `force`, every BS uploading always
    and never whatever its Q terms (period 1: +force, -force); every assignment of the BSs
    to one upload phase each (K^M of them, in lexicographic order; the grid's top and
    bottom, which the Q terms outweigh in a few states); for each longer period p of
    `periods` its synchronised and staggered schedules (phases 0 and round(m p / M), those
    of `NearestBS`: p^M would be too many plays); last zero offsets (the first of equal
    scores is the search's start)."""
    starts = [torch.full((n_bs, 1), force), torch.full((n_bs, 1), -force)] if force else []
    starts += [schedule(phases, n_phases, grid) for phases in itertools.product(range(n_phases), repeat=n_bs)]
    for p in periods:
        starts += [schedule((0,) * n_bs, p, grid), schedule(staggered_phases(n_bs, p), p, grid)]
    return [*starts, torch.zeros(n_bs, n_phases)]


def retry_starts(n_bs: int, periods: tuple[int, ...], force: float, width: int,
                 tuned_max: int = 0) -> list[tuple[int, tuple[int, ...], torch.Tensor, torch.Tensor]]:
    """The retry rules as retry offsets `[M, width]` at +-force: `(k, phases, offsets, head
    start)` for each k of `periods`, synchronised (phase 0) and staggered (`NearestBS`'s), or
    every assignment of the BSs to a first upload slot (lexicographic) where k^M <=
    `tuned_max`, as the tuned heuristics; `dntsync.marl.networks.with_retry_offsets` then
    plays `NearestBS(k, phases=..., retry=True)`."""
    out = []
    for k in periods:
        every = (list(itertools.product(range(k), repeat=n_bs)) if k ** n_bs <= tuned_max
                 else [(0,) * n_bs, staggered_phases(n_bs, k)])
        for phases in every:
            offsets = torch.full((n_bs, width), float(force))
            offsets[:, :k - 1] = -float(force)
            out.append((k, phases, offsets, k - 1 - torch.tensor(phases, dtype=torch.float32)))
    return out


def fit_retry_offsets(learner, validation: Evaluation, periods: tuple[int, ...], force: float,
                      than: float, tuned_max: int = 0) -> dict:
    """After the slot offsets' search: play every retry rule (`retry_starts`) through the
    learner with zero slot offsets on `validation`; keep the best (the first among equals)
    in the learner's retry offsets, and zero its slot offsets, only if it scores above
    `than` (the slot offsets' score; the learner's mean). No walk follows: on the 93a1bb4
    models it fitted the validation episodes and lost held-out reward (docs/learners.md)."""
    retry_offsets, head_start, scale = learner.retry
    zero = torch.zeros_like(learner.upload_offsets)
    starts = retry_starts(len(head_start), periods, force, retry_offsets.shape[1], tuned_max)
    plays = play_each(learner, validation, [(zero, (offsets, head, scale)) for _, _, offsets, head in starts])
    played = [(float(p.scores.mean()), k, phases, offsets, head)
              for p, (k, phases, offsets, head) in zip(plays, starts)]
    score, k, phases, offsets, head = max(played, key=lambda p: p[0])
    kept = score > than
    if kept:
        learner.upload_offsets.zero_()
        retry_offsets.copy_(offsets)
        head_start.copy_(head)
    return {"k": k, "phases": list(phases), "validation": score, "kept": kept, "validation_plays": len(played)}


def fit_upload_offsets(learner, validation: Evaluation, grid: tuple[float, ...], passes: int = 1,
                       phases: int | None = None, periods: tuple[int, ...] = (),
                       force: float | None = None, retry_periods: tuple[int, ...] = (),
                       retry_tuned_max: int = 0) -> dict:
    """Fit `learner.upload_offsets` `[M, K]` in place: from the best of `phase_starts` for a
    team score (VDN, QMIX; `phases` defaults to K, `periods` must divide K), from zero for
    BSs that score themselves (IQL: no BS picks the others' phases), at most `passes` passes
    over the coordinates of the best start's period p, stopping after one that moves none,
    each walked along `grid` (with `force`: -force and +force at its ends);
    the learner keeps the `[M, p]` offsets repeated over its K columns. Return the record:
    those K columns, p, the validation score with zero offsets and after (the team's, or the
    BSs' mean local reward) and the number of validation plays (each set of offsets is
    played once). With `retry_periods` and the learner's retry offsets (a team score, `force`
    given), then `fit_retry_offsets`: the record's "retry"."""
    grid = [float(g) for g in grid]
    played: dict[tuple, Play] = {}

    def key(trial: torch.Tensor) -> tuple:
        return (trial.shape[1], *trial.flatten().tolist())

    def play_of(trial: torch.Tensor) -> Play:
        if key(trial) not in played:
            played[key(trial)] = play(learner, validation, trial)
        return played[key(trial)]

    n_bs, cycle = learner.upload_offsets.shape
    phases = cycle if phases is None else phases
    if any(cycle % p for p in (phases, *periods)):
        raise ValueError(f"the offsets span {cycle} slots: phases {phases} and periods {periods} must divide it")
    starts = (phase_starts(n_bs, phases, grid, periods, force) if learner.mixer is not None
              else [torch.zeros(n_bs, phases)])
    grid = [-float(force), *grid, float(force)] if force else grid
    first = {key(trial): trial for trial in (torch.zeros(n_bs, phases), *starts)}  # played together
    played.update(zip(first, play_each(learner, validation, [(trial, None) for trial in first.values()])))
    before = float(play_of(torch.zeros(n_bs, phases)).scores.mean())
    offsets = max(starts, key=lambda start: float(play_of(start).scores.mean())).clone()
    current = play_of(offsets)
    for _ in range(passes):
        moved = False
        for m in range(n_bs):
            for k in range(offsets.shape[1]):
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
    learner.upload_offsets.copy_(offsets.repeat(1, cycle // offsets.shape[1]))
    after = float(current.scores.mean())
    retry = None
    if retry_periods and force and learner.retry is not None:
        retry = fit_retry_offsets(learner, validation, retry_periods, force, after, retry_tuned_max)
        after = max(after, retry["validation"])
    record = {"offsets": learner.upload_offsets.tolist(), "period": offsets.shape[1], "validation_before": before,
              "validation_after": after, "validation_plays": len(played) + (retry["validation_plays"] if retry else 0),
              "validation_episodes": validation.n_episodes, "validation_seeds": validation.seeds}
    if retry is not None:
        record["retry"] = retry
    return record
