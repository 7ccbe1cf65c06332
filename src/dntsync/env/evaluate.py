"""Policy-agnostic rollouts and evaluation on a fixed set of evaluation episodes.

Any policy plays through one small interface, `EpisodePolicy`:

    begin_episode(n_envs)          # e.g. zero a recurrent hidden state
    act(state, obs) -> [B, M]      # state: SlotState (what an all-seeing baseline needs),
                                   # obs: [B, M, D] local observations (what a BS agent sees)

The baselines of `dntsync.env.policies` keep their `act(state)` and are wrapped by
`StatelessPolicy` (`as_episode_policy` does it when needed); learners implement the interface
themselves. `rollout` plays one batch of whole episodes (optionally recording every
transition, which is how the learners fill their replay memory) and `Evaluation` plays the
same evaluation episodes for every policy: environment batch i is reset with seed
`seed + i`, so every policy meets exactly the same users, moves and fading (all random
parts of the environment are exogenous to the actions).

Reported per policy, for each per-step metric of `Outcome.metrics` (team reward, sum rate,
DNT error, uploads, failed uploads, users served twice): the mean over episodes and steps,
and the standard deviation over episodes of the per-episode means.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from dntsync.env.core import DntEnv, SlotState
from dntsync.env.predictors import Predictor
from dntsync.env.rewards import error_terms
from dntsync.metrics import METRICS
from dntsync.network.scenario import Scenario


@runtime_checkable
class EpisodePolicy(Protocol):
    name: str

    def begin_episode(self, n_envs: int) -> None:
        ...

    def act(self, state: SlotState, obs: np.ndarray) -> np.ndarray:
        """`[B, M]` action integers."""
        ...


class StatelessPolicy:
    """Adapter for a policy with `act(state)` only (the baselines): no memory, ignores obs."""

    def __init__(self, policy) -> None:
        self.policy = policy
        self.name = policy.name

    def begin_episode(self, n_envs: int) -> None:
        pass

    def act(self, state: SlotState, obs: np.ndarray) -> np.ndarray:
        return self.policy.act(state)


def as_episode_policy(policy) -> EpisodePolicy:
    return policy if isinstance(policy, EpisodePolicy) else StatelessPolicy(policy)


@dataclass
class Rollout:
    """One batch of whole episodes. `steps[k]` is `[B, T]` for each metric of `METRICS`;
    the transition arrays are filled only when recorded."""

    steps: dict[str, np.ndarray]
    obs: np.ndarray | None = None  # [B, T, M, D] o_t^m
    covered: np.ndarray | None = None  # [B, T, M, U] the action masks of slot t
    actions: np.ndarray | None = None  # [B, T, M]
    team_reward: np.ndarray | None = None  # [B, T] eq. (16)
    local_rewards: np.ndarray | None = None  # [B, T, M] eq. (37)
    error_reward: np.ndarray | None = None  # [B, T] the DNT-error term of eq. (16) (`error_terms`)
    local_error_rewards: np.ndarray | None = None  # [B, T, M] that of each BS's eq. (37)
    terminated: np.ndarray | None = None  # [B, T] bool: the episode ended after slot t
    state: np.ndarray | None = None  # [B, T, S] the global state s_t (`DntEnv.global_state`)


def rollout(env: DntEnv, policy: EpisodePolicy, seed: int | None = None,
            record: bool = False) -> Rollout:
    """Play one episode in each of the env's `n_envs` copies (one reset) with `policy`."""
    obs, covered = env.reset(seed)
    policy.begin_episode(env.n_envs)
    steps: dict[str, list] = {k: [] for k in METRICS}
    trace: dict[str, list] = {k: [] for k in ("obs", "covered", "actions", "team_reward",
                                              "local_rewards", "error_reward",
                                              "local_error_rewards", "terminated", "state")}
    done = False
    while not done:
        actions = np.asarray(policy.act(env.state, obs))
        result = env.step(actions)
        for k in METRICS:
            steps[k].append(result.info[k])
        if record:
            trace["obs"].append(obs)
            trace["state"].append(env.global_state())
            trace["covered"].append(covered)
            trace["actions"].append(actions)
            trace["team_reward"].append(result.team_reward)
            trace["local_rewards"].append(result.local_rewards)
            team_error, local_error = error_terms(env.scenario, result.outcome.sq_error,
                                                  result.outcome.serve, covered)
            trace["error_reward"].append(team_error)
            trace["local_error_rewards"].append(local_error)
            trace["terminated"].append(np.full(env.n_envs, result.done))
        obs, covered, done = result.obs, result.covered, result.done
    out = Rollout(steps={k: np.stack(v, axis=1).astype(np.float64) for k, v in steps.items()})
    if record:
        for k, v in trace.items():
            setattr(out, k, np.stack(v, axis=1))
    return out


def summarise(steps: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """`{metric: [episodes, T]}` -> `{metric: {"mean": over episodes and steps, "std": over episodes}}`."""
    return {k: {"mean": float(v.mean()), "std": float(v.mean(axis=1).std())}
            for k, v in steps.items()}


class Evaluation:
    """A fixed set of evaluation episodes: batch i of at most `batch_envs` environments is
    reset with seed `seed + i` (choose `seed` away from every training seed)."""

    def __init__(self, scenario: Scenario, predictor: Predictor, n_episodes: int, seed: int,
                 observation: str = "full", batch_envs: int = 256,
                 obs_frame: str = "area", user_features: tuple[str, ...] = ()) -> None:
        if n_episodes < 1:
            raise ValueError(f"n_episodes = {n_episodes} is invalid: need >= 1")
        self.n_episodes = n_episodes
        self.seed = seed
        self.sizes = [min(batch_envs, n_episodes - start) for start in range(0, n_episodes, batch_envs)]
        self._env_options = {"observation": observation, "obs_frame": obs_frame, "user_features": user_features}
        self.envs = [DntEnv(scenario, predictor, n_envs=n, seed=seed + i, **self._env_options)
                     for i, n in enumerate(self.sizes)]
        self._replicated: dict[int, list[DntEnv]] = {}

    def replicated(self, copies: int) -> list[DntEnv]:
        """`envs` with each batch played `copies` times in one (`DntEnv` `replicas`): copy c of
        batch i is its environments `[c n_i, (c + 1) n_i)`, on the same episodes as `envs[i]`
        when reset with the same seed."""
        if copies not in self._replicated:
            first = self.envs[0]
            self._replicated[copies] = [
                DntEnv(first.scenario, first.predictor, n_envs=n * copies, seed=s, replicas=copies,
                       **self._env_options) for n, s in zip(self.sizes, self.seeds)]
        return self._replicated[copies]

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(len(self.envs))]

    def run(self, policy) -> dict[str, dict[str, float]]:
        """Greedy play of every evaluation episode: `{metric: {"mean", "std"}}`."""
        policy = as_episode_policy(policy)
        parts = [rollout(env, policy, seed=s).steps for env, s in zip(self.envs, self.seeds)]
        return summarise({k: np.concatenate([p[k] for p in parts]) for k in METRICS})

    def __call__(self, policy) -> dict[str, dict[str, float]]:
        return self.run(policy)

    def run_all(self, policies) -> dict[str, dict[str, dict[str, float]]]:
        """`{policy name: run(policy)}` for several policies (e.g. `baseline_policies(...)`)."""
        return {p.name: self.run(p) for p in policies}


def best_heuristic(results: dict[str, dict[str, dict[str, float]]],
                   exclude: tuple[str, ...] = ("oracle",)) -> str:
    """Name of the policy with the highest mean team reward, leaving out `exclude`."""
    names = [n for n in results if n not in exclude]
    return max(names, key=lambda n: results[n]["team_reward"]["mean"])
