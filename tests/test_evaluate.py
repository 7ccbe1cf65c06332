"""Policy-agnostic evaluation (`dntsync.env.evaluate`): keys, statistics, adapters, the oracle."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from dntsync.env import DntEnv, Drift, MyopicOracle, NearestBS, baseline_policies, is_valid
from dntsync.env.evaluate import (
    METRICS,
    EpisodePolicy,
    Evaluation,
    StatelessPolicy,
    as_episode_policy,
    best_heuristic,
    rollout,
    summarise,
)
from dntsync.network import Scenario


@pytest.fixture
def small() -> Scenario:
    return Scenario(n_users=3, n_rbs=3, episode_length=5)


def test_baselines_report_every_metric_with_mean_and_std(small):
    evaluation = Evaluation(small, Drift(small), n_episodes=4, seed=10_000)
    results = evaluation.run_all(baseline_policies(small, (5,)))
    assert set(results) == {"random", "nearest-always", "nearest-never", "nearest-every-5",
                            "nearest-every-5-staggered", "nearest-retry-5", "nearest-retry-5-staggered",
                            "oracle"}
    for res in results.values():
        assert set(res) == set(METRICS)
        for stats in res.values():
            assert set(stats) == {"mean", "std"} and np.isfinite(stats["mean"]) and stats["std"] >= 0
    assert results["nearest-never"]["uploads"]["mean"] == 0.0
    assert results["nearest-always"]["uploads"]["mean"] == small.n_bs
    assert best_heuristic(results, exclude=("oracle", "random")).startswith("nearest")


def test_oracle_beats_nearest_bs_on_one_step_rewards():
    # T = 1: every episode is one slot from a synchronised twin, so per-slot optimality applies
    one_step = Scenario(n_users=4, n_rbs=3, episode_length=1)
    evaluation = Evaluation(one_step, Drift(one_step), n_episodes=32, seed=10_000)
    oracle = evaluation.run(MyopicOracle(one_step))["team_reward"]["mean"]
    for upload in ("always", "never", 2):
        nearest = evaluation.run(NearestBS(one_step, upload))["team_reward"]["mean"]
        assert oracle >= nearest - 1e-9


def test_summary_is_mean_over_episodes_and_steps_and_std_over_episodes():
    steps = {"team_reward": np.array([[1.0, 3.0], [5.0, 7.0], [0.0, 0.0]])}
    out = summarise(steps)["team_reward"]
    assert out["mean"] == pytest.approx(16.0 / 6)
    assert out["std"] == pytest.approx(np.std([2.0, 6.0, 0.0]))


def test_same_episodes_for_every_call_and_seeds_are_seed_plus_batch_index(small):
    evaluation = Evaluation(small, Drift(small), n_episodes=5, seed=77, batch_envs=2)
    assert evaluation.seeds == [77, 78, 79]
    assert [env.n_envs for env in evaluation.envs] == [2, 2, 1]
    policy = NearestBS(small, 2)
    assert evaluation.run(policy) == evaluation.run(policy)


def test_replicated_batches_play_the_same_episodes_in_every_copy(small):
    """`Evaluation.replicated(C)`: each batch's environments C times over in one env, copy c
    holding the same positions and fading as the plain batch; with each copy playing its own
    policy the copies' numbers are those of the plain batch under that policy."""
    evaluation = Evaluation(small, Drift(small), n_episodes=5, seed=77, batch_envs=3)
    envs = evaluation.replicated(3)
    assert [env.n_envs for env in envs] == [9, 6] and evaluation.replicated(3) is envs
    policies = [NearestBS(small, "always"), NearestBS(small, "never"), NearestBS(small, 2)]

    class EachCopy:  # copy c of the batch plays policies[c]
        name = "each"

        def begin_episode(self, n_envs):
            pass

        def act(self, state, obs):
            n = state.user_xy.shape[0] // len(policies)
            assert np.array_equal(state.user_xy[:n], state.user_xy[n:2 * n])
            return np.concatenate([p.act(_rows(state, slice(c * n, (c + 1) * n)))
                                   for c, p in enumerate(policies)])

    together = [rollout(env, EachCopy(), seed=s).steps for env, s in zip(envs, evaluation.seeds)]
    for c, policy in enumerate(policies):
        for env, seed, n, steps in zip(evaluation.envs, evaluation.seeds, evaluation.sizes, together):
            alone = rollout(env, StatelessPolicy(policy), seed=seed).steps
            for k in METRICS:
                assert np.array_equal(steps[k][c * n:(c + 1) * n], alone[k]), (c, k)
    with pytest.raises(ValueError, match="replicas"):
        DntEnv(small, n_envs=5, replicas=2)


def _rows(state, rows: slice):
    """A `SlotState` of some environments of a batch."""
    return dataclasses.replace(state, **{f.name: getattr(state, f.name)[rows]
                                         for f in dataclasses.fields(state) if f.name != "t"})


def test_rollout_records_valid_transitions_and_adapters(small):
    env = DntEnv(small, Drift(small), n_envs=3, seed=1)
    policy = as_episode_policy(baseline_policies(small, (), oracle=False)[0])
    assert isinstance(policy, StatelessPolicy) and isinstance(policy, EpisodePolicy)
    out = rollout(env, policy, seed=5, record=True)
    T, M, U = small.episode_length, small.n_bs, small.n_users
    assert out.obs.shape == (3, T, M, env.obs_dim) and out.covered.shape == (3, T, M, U)
    assert out.actions.shape == (3, T, M) and out.local_rewards.shape == (3, T, M)
    assert out.error_reward.shape == (3, T) and out.local_error_rewards.shape == (3, T, M)
    assert out.terminated[:, -1].all() and not out.terminated[:, :-1].any()
    assert is_valid(out.actions, out.covered).all()
    np.testing.assert_allclose(out.team_reward, out.steps["team_reward"])
    # a policy that already speaks the interface is used as it is
    assert as_episode_policy(policy) is policy
