"""The PettingZoo adapter passes the official parallel API test with both reward views."""

from __future__ import annotations

import numpy as np
import pytest
from pettingzoo.test import parallel_api_test

from dntsync.env import DntEnv
from dntsync.env.pettingzoo_env import DntParallelEnv
from dntsync.network import Scenario


@pytest.mark.parametrize("reward", ["team", "local"])
def test_parallel_api(reward):
    parallel_api_test(DntParallelEnv(Scenario(n_users=4), reward=reward), num_cycles=60)


def test_positions_only_observation_passes_the_api_test():
    parallel_api_test(DntParallelEnv(Scenario(n_users=3), observation="positions_only"),
                      num_cycles=40)


def test_bad_reward_kind_raises():
    with pytest.raises(ValueError, match="reward"):
        DntParallelEnv(Scenario(n_users=3), reward="global")


def test_rewards_and_masks_match_the_batched_env():
    sc = Scenario(n_users=4, episode_length=5)
    team = DntParallelEnv(sc, reward="team")
    local = DntParallelEnv(sc, reward="local")
    batched = DntEnv(sc, n_envs=1)
    obs_t, _ = team.reset(seed=3)
    obs_l, _ = local.reset(seed=3)
    obs_b, covered = batched.reset(seed=3)
    rng = np.random.default_rng(0)
    for t in range(sc.episode_length):
        actions = {}
        for m, agent in enumerate(team.possible_agents):
            np.testing.assert_array_equal(obs_t[agent]["observation"], obs_b[0, m])
            mask = obs_t[agent]["action_mask"]
            assert mask.sum() == 2 ** (1 + covered[0, m].sum())
            actions[agent] = int(rng.choice(np.nonzero(mask)[0]))
        obs_t, rew_t, term, trunc, info = team.step(actions)
        obs_l, rew_l, *_ = local.step(actions)
        res = batched.step(np.array([[actions[a] for a in team.possible_agents]]))
        obs_b, covered = res.obs, res.covered
        for m, agent in enumerate(team.possible_agents):
            assert rew_t[agent] == pytest.approx(float(res.team_reward[0]))
            assert rew_l[agent] == pytest.approx(float(res.local_rewards[0, m]))
            assert not term[agent]
            assert trunc[agent] is (t == sc.episode_length - 1)
            assert info[agent]["sum_rate"] == pytest.approx(float(res.info["sum_rate"][0]))
    assert team.agents == []
