"""Policies to compare the learners against.

Each maps the current `SlotState` of a batched environment to actions `[B, M]`:
- `RandomValid`: every allowed bit on with probability 1/2;
- `NearestBS(upload=..., staggered=..., phases=...)`: each covered user is served by its
  nearest covering BS; uploads "always", "never", or every k slots (an int k): all BSs at
  t = 0, k, 2k, ..., or staggered, BS m from slot round(m k / M) on, so the BSs' uploads
  (their RBs and their interference) fall in different slots, or from the slots `phases`
  give; with `retry`, k slots after the BS's last successful upload and then in every slot
  until one succeeds (from its phase until its first success): uploads fail often where RBs
  are scarce, and a failed one leaves the twin unsynchronised until the next;
- `tuned_phases`: the phases of every-k uploads that score best on some episodes, over all
  k^M assignments of the BSs to the k slot phases (`baseline_policies` tunes them on
  validation episodes: which BS shares its upload slot with which, and which go first,
  moves the team reward by more than the learners' margins);
- `MyopicOracle`: centralised and all-seeing (positions, fading, the twin's prediction); each
  slot it picks the joint association and uploads maximising the immediate team reward,
  exhaustively over the 2^M upload choices and over the covering BSs of each covered user,
  with Algorithm 1 underneath. It is the one-slot optimum over associations that serve every
  covered user exactly once, not over all valid actions: leaving a user unserved can, rarely,
  lower interference enough to score higher in one slot. Nor is it optimal over an episode.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Protocol

import numpy as np

from dntsync.env.actions import encode, random_valid
from dntsync.env.core import SlotState
from dntsync.env.step import resolve
from dntsync.network.radio import user_distances
from dntsync.network.scenario import Scenario


class Policy(Protocol):
    name: str

    def act(self, state: SlotState) -> np.ndarray:
        """`[B, M]` action integers."""
        ...


class RandomValid:
    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)

    def act(self, state: SlotState) -> np.ndarray:
        return random_valid(state.covered, self.rng)


def nearest_association(scenario: Scenario, user_xy: np.ndarray, covered: np.ndarray) -> np.ndarray:
    """Each covered user to its nearest covering BS: `serve[..., M, U]` bool."""
    dist = np.where(covered, user_distances(scenario, user_xy), np.inf)
    nearest = np.argmin(dist, axis=-2)  # [..., U]
    return covered & (np.arange(scenario.n_bs)[:, None] == nearest[..., None, :])


def staggered_phases(n_bs: int, k: int) -> tuple[int, ...]:
    """The slot phase of each BS's uploads when every-k uploads are staggered: round(m k / M)."""
    return tuple(int(p) for p in np.round(np.arange(n_bs) * k / n_bs))


class NearestBS:
    """Nearest-BS association with a fixed upload rule: always, never, every k slots, or with
    `retry`, k slots after the BS's last successful upload and then in every slot until one
    succeeds (a failed upload is retried in the next slot instead of k slots later)."""

    def __init__(self, scenario: Scenario, upload: str | int = "always", staggered: bool = False,
                 phases: tuple[int, ...] | None = None, retry: bool = False) -> None:
        if not (upload in ("always", "never") or (isinstance(upload, int) and upload >= 1)):
            raise ValueError(f"upload = {upload!r} is invalid: need 'always', 'never' or an int k >= 1")
        if retry and not (isinstance(upload, int) and upload >= 2):
            raise ValueError(f"retry needs a period k >= 2 (k = 1 is 'always'), not upload = {upload!r}")
        if (staggered or phases is not None) and not isinstance(upload, int):
            raise ValueError(f"staggered uploads need a period k, not upload = {upload!r}")
        if staggered and phases is not None:
            raise ValueError("give staggered or phases, not both")
        if phases is not None and (len(phases) != scenario.n_bs
                                   or not all(0 <= p < upload for p in phases)):
            raise ValueError(f"phases = {phases!r} is invalid: need one slot in [0, {upload}) per BS")
        self.scenario = scenario
        self.upload = upload
        self.retry = retry
        self.name = (f"nearest-{upload}" if isinstance(upload, str)
                     else f"nearest-{'retry' if retry else 'every'}-{upload}")
        # the slot of each BS's first upload: 0 for all, spread over the period, or given
        self.offsets = np.zeros(scenario.n_bs, dtype=int)
        if staggered:
            self.offsets = np.array(staggered_phases(scenario.n_bs, upload), dtype=int)
            self.name += "-staggered"
        if phases is not None:
            self.offsets = np.array(phases, dtype=int)
            self.name += "-phases-" + "-".join(map(str, phases))

    def act(self, state: SlotState) -> np.ndarray:
        serve = nearest_association(self.scenario, state.user_xy, state.covered)
        if self.upload == "always":
            up = np.True_
        elif self.upload == "never":
            up = np.False_
        elif self.retry:  # [B, M]: from its phase until the first success, then k slots after each
            since = state.since_upload
            up = np.where(since == state.t, state.t >= self.offsets, since >= self.upload - 1)
        else:
            up = (state.t - self.offsets) % self.upload == 0  # [M]
        upload = np.broadcast_to(up, serve.shape[:-1])
        return encode(upload, serve)


class MyopicOracle:
    """Centralised one-slot optimum over uploads and covering-BS associations."""

    name = "oracle"

    def __init__(self, scenario: Scenario, max_candidates: int = 1 << 16) -> None:
        self.scenario = scenario
        self.max_candidates = max_candidates

    def candidates(self, covered: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """All (upload[C, M], serve[C, M, U]) the oracle searches for one environment."""
        n_bs, n_users = covered.shape
        choices = [np.nonzero(covered[:, u])[0] for u in range(n_users)]
        multi = [u for u in range(n_users) if len(choices[u]) > 1]
        base = np.zeros((n_bs, n_users), dtype=bool)
        for u in range(n_users):
            if len(choices[u]) == 1:
                base[choices[u][0], u] = True
        n_assoc = int(np.prod([len(choices[u]) for u in multi], dtype=np.int64))
        n_total = n_assoc << n_bs
        if n_total > self.max_candidates:
            raise ValueError(
                f"oracle would search {n_total} joint actions (> max_candidates = "
                f"{self.max_candidates}); raise max_candidates or use fewer users in overlaps"
            )
        serves = np.repeat(base[None], n_assoc, axis=0)
        for i, combo in enumerate(itertools.product(*(choices[u] for u in multi))):
            serves[i, list(combo), multi] = True
        uploads = np.array(list(itertools.product([False, True], repeat=n_bs)), dtype=bool)
        upload = np.repeat(uploads, n_assoc, axis=0)  # [C, M]
        serve = np.tile(serves, (len(uploads), 1, 1))  # [C, M, U]
        return upload, serve

    def act(self, state: SlotState) -> np.ndarray:
        actions = np.empty(state.covered.shape[:2], dtype=np.int64)
        for b in range(state.covered.shape[0]):
            upload, serve = self.candidates(state.covered[b])
            c = len(upload)
            tile = lambda a: np.broadcast_to(a[b], (c, *a.shape[1:]))  # noqa: E731
            out = resolve(self.scenario, tile(state.user_xy), tile(state.fade_user),
                          tile(state.fade_cloud), tile(state.covered), tile(state.prediction),
                          upload, serve)
            best = int(np.argmax(out.team_reward))
            actions[b] = encode(upload[best], serve[best])
        return actions


def tuned_phases(scenario: Scenario, k: int, score: Callable[[NearestBS], float],
                 retry: bool = False) -> tuple[int, ...]:
    """The phases (BS m uploads first in slot phases[m]) whose every-k rule (or retry rule)
    `score`s highest, over all k^M of them; the first in lexicographic order among equals."""
    every = itertools.product(range(k), repeat=scenario.n_bs)
    return max(every, key=lambda phases: score(NearestBS(scenario, k, phases=phases, retry=retry)))


def baseline_policies(scenario: Scenario, upload_periods: tuple[int, ...], seed: int = 0,
                      oracle: bool = True, score: Callable[[NearestBS], float] | None = None,
                      tuned_max: int = 0) -> list:
    """The standard comparison set: random; nearest-BS uploading always, never, every k slots
    for each k of `upload_periods` and k slots after the last success, retrying a failed
    upload (each k >= 2), synchronised, staggered and, given `score` (e.g. the team reward on
    validation episodes), with `tuned_phases` for each k whose k^M assignments number at
    most `tuned_max` (named nearest-every-k-tuned, nearest-retry-k-tuned); the myopic oracle."""
    policies = [RandomValid(seed), NearestBS(scenario, "always"), NearestBS(scenario, "never")]
    for retry in (False, True):
        periods = [k for k in upload_periods if k >= 2] if retry else list(upload_periods)
        policies += [NearestBS(scenario, k, retry=retry) for k in periods]
        policies += [NearestBS(scenario, k, staggered=True, retry=retry) for k in periods]
        if score is not None:
            for k in periods:
                if k ** scenario.n_bs <= tuned_max:
                    tuned = NearestBS(scenario, k, phases=tuned_phases(scenario, k, score, retry), retry=retry)
                    tuned.name = f"nearest-{'retry' if retry else 'every'}-{k}-tuned"
                    policies.append(tuned)
    if oracle:
        policies.append(MyopicOracle(scenario))
    return policies
