"""A PettingZoo `ParallelEnv` over one copy of the batched environment.

Agents are "bs_0" .. "bs_{M-1}". Each observation is a dict with the local observation and
the `action_mask` (int8 over the 2^(U+1) actions), the convention PettingZoo's API test and
common MARL libraries use. Rewards are the team reward (eq. 16, `reward="team"`, VDN's view)
or each BS's local reward (eq. 37, `reward="local"`, IQL's view). Episodes end by truncation
after T slots.
"""

from __future__ import annotations

import functools

import numpy as np
from gymnasium import spaces
from pettingzoo import ParallelEnv

from dntsync.env.actions import action_mask
from dntsync.env.core import DntEnv
from dntsync.env.predictors import Predictor
from dntsync.network.scenario import Scenario


class DntParallelEnv(ParallelEnv):
    metadata = {"name": "dntsync_v0", "render_modes": []}

    def __init__(self, scenario: Scenario | None = None, predictor: Predictor | None = None,
                 observation: str = "full", reward: str = "team") -> None:
        if reward not in ("team", "local"):
            raise ValueError(f"reward = {reward!r} is invalid: choose 'team' or 'local'")
        self.env = DntEnv(scenario or Scenario(), predictor, n_envs=1, observation=observation)
        self.reward_kind = reward
        self.possible_agents = [f"bs_{m}" for m in range(self.env.n_agents)]
        self.agents: list[str] = []
        self.render_mode = None
        self._obs_space = spaces.Dict({
            "observation": spaces.Box(-1.0, 1.0, (self.env.obs_dim,), np.float32),
            "action_mask": spaces.Box(0, 1, (self.env.n_actions,), np.int8),
        })
        self._act_space = spaces.Discrete(self.env.n_actions)

    @functools.lru_cache(maxsize=None)
    def observation_space(self, agent: str) -> spaces.Space:
        return self._obs_space

    @functools.lru_cache(maxsize=None)
    def action_space(self, agent: str) -> spaces.Space:
        return self._act_space

    def _package(self, obs: np.ndarray, covered: np.ndarray) -> dict:
        masks = action_mask(covered[0])
        return {a: {"observation": obs[0, m], "action_mask": masks[m]}
                for m, a in enumerate(self.possible_agents)}

    def reset(self, seed: int | None = None, options: dict | None = None):
        obs, covered = self.env.reset(seed=seed)
        self.agents = list(self.possible_agents)
        return self._package(obs, covered), {a: {} for a in self.agents}

    def step(self, actions: dict):
        joint = np.array([[int(actions[a]) for a in self.possible_agents]])
        res = self.env.step(joint)
        obs = self._package(res.obs, res.covered)
        if self.reward_kind == "team":
            rewards = {a: float(res.team_reward[0]) for a in self.possible_agents}
        else:
            rewards = {a: float(res.local_rewards[0, m]) for m, a in enumerate(self.possible_agents)}
        info = {k: float(v[0]) for k, v in res.info.items()}
        terminations = {a: False for a in self.possible_agents}
        truncations = {a: res.done for a in self.possible_agents}
        infos = {a: dict(info) for a in self.possible_agents}
        if res.done:
            self.agents = []
        return obs, rewards, terminations, truncations, infos
