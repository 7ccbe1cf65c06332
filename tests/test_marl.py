"""VDN / IQL / QMIX (`dntsync.marl`): heads, masks, losses by hand, replay, and real tiny runs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from dntsync.config import ALGOS, apply_overrides, from_dict
from dntsync.env import DntEnv, Drift, NearestBS, RandomValid, action_mask, is_valid
from dntsync.env.actions import decode
from dntsync.env.evaluate import Evaluation, Rollout, StatelessPolicy, rollout
from dntsync.marl import IQL, VDN, FactorisedHead, FlatHead, QPolicy
from dntsync.marl.learners import LEARNERS, QMIX, QMixer
from dntsync.marl.networks import AgentQNets, BranchingHead, GreedyActions, valid_mask, with_upload_offsets
from dntsync.marl.offsets import (fit_association_slope, fit_retry_offsets, fit_serve_covered, fit_upload_offsets,
                                  phase_starts, play, play_each, retry_starts, schedule, scores)
from dntsync.marl.replay import EpisodeBatch, EpisodeReplay
from dntsync.marl.training import build_learner, fit_marl
from dntsync.network import Scenario

torch.set_num_threads(1)

TINY = {"n_users": 3, "n_rbs": 3, "episode_length": 5}


def tiny_config(tmp_path: Path, *overrides: str) -> object:
    """The real config, shrunk: U = 3, N = 3, T = 5, hidden 16, a few episodes per epoch;
    then the dotted `overrides` (`"marl.algorithm.epochs=4"`), as `--set` applies them."""
    marl = {"algorithm": {"epochs": 2, "batches_per_epoch": 2, "batch_size": 4, "target_update_epochs": 1},
            "network": {"hidden": 16},
            "collection": {"episodes_per_epoch": 4, "buffer_capacity": 16, "epsilon_decay_epochs": 2},
            "evaluation": {"every": 1, "episodes": 4},
            "outputs": {"model_dir": str(tmp_path / "models"), "metrics_dir": str(tmp_path / "metrics"),
                        "checkpoint_dir": str(tmp_path / "checkpoints"), "checkpoint_every": 1},
            "seeds": [0]}
    cfg = from_dict({"scenario": TINY, "env": {"predictor": "drift"}, "marl": marl,
                     "tracking": {"mlflow_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}})
    return apply_overrides(cfg, overrides)


# ---------------------------------------------------------------------- heads and masks
@pytest.mark.parametrize("n_users", [3, 6])
@pytest.mark.parametrize("head_cls", [FlatHead, FactorisedHead, BranchingHead])
def test_masked_max_equals_full_matmul_over_valid_actions(head_cls, n_users):
    torch.manual_seed(0)
    head = head_cls(8, n_users, user_dim=4)
    x = torch.randn(64, 8)
    covered = torch.rand(64, n_users) < 0.5
    covered[0], covered[1] = False, True  # no user / every user covered
    covered[10:20] = covered[9]  # rows sharing one coverage pattern
    users = torch.randn(64, n_users, 4) * covered[..., None]  # (x, y, covered, feature)
    users[..., 2] = covered.float()
    with torch.no_grad():
        out = head.outputs(x, users)
        values, best = head.masked_max(out, covered)
        full = head.all_q(out).masked_fill(~valid_mask(covered), -torch.inf)
        np.testing.assert_allclose(values, full.max(-1).values, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(head.q(out, best), values, rtol=1e-5, atol=1e-5)
        every = torch.arange(2 ** (n_users + 1)).expand(64, -1)
        np.testing.assert_allclose(head.q(out.repeat_interleave(every.shape[1], 0), every.reshape(-1)),
                                   head.all_q(out).reshape(-1), rtol=1e-5, atol=1e-5)
    assert is_valid(best.numpy(), covered.numpy()).all()
    assert (valid_mask(covered).numpy() == action_mask(covered.numpy()).astype(bool)).all()


def test_flat_head_masked_max_in_chunks_is_the_same(monkeypatch):
    import dntsync.marl.networks as networks

    torch.manual_seed(2)
    head = FlatHead(8, 5)
    x, covered = torch.randn(40, 8), torch.rand(40, 5) < 0.6
    with torch.no_grad():
        whole = head.masked_max(x, covered)
        monkeypatch.setattr(networks, "GATHER_BUDGET", 1)  # one pattern per chunk
        chunked = head.masked_max(x, covered)
    assert torch.equal(whole[1], chunked[1]) and torch.allclose(whole[0], chunked[0])


def test_flat_head_never_picks_an_invalid_action_even_with_a_huge_q():
    head = FlatHead(4, 3)
    covered = torch.tensor([[True, False, True]] * 5)
    invalid = 0b0100  # serves user 1, who is not covered
    with torch.no_grad():
        head.bias[invalid] = 1e6
        values, best = head.masked_max(torch.randn(5, 4), covered)
    assert (best != invalid).all() and (values < 1e5).all()


def test_flat_masked_max_of_all_agents_at_once_equals_each_head_alone(monkeypatch):
    import dntsync.marl.networks as networks

    torch.manual_seed(3)
    heads = [FlatHead(8, 6) for _ in range(3)]
    x = torch.randn(3, 300, 8)
    covered = torch.rand(3, 300, 6) < torch.tensor([0.2, 0.5, 0.8])[:, None, None]
    covered[:, :40] = covered[:, :1]  # rows sharing one pattern
    covered[1, 50:60] = True  # every user covered: the largest k
    covered[2, 60:70] = False  # no user covered
    with torch.no_grad():
        alone = [head.masked_max(x[m], covered[m]) for m, head in enumerate(heads)]
        for budget in (networks.GATHER_BUDGET, 1):  # whole groups / one pattern per chunk
            monkeypatch.setattr(networks, "GATHER_BUDGET", budget)
            values, best = networks.flat_masked_max(heads, x, covered)
            for m, (v, a) in enumerate(alone):
                assert torch.equal(best[m], a)
                torch.testing.assert_close(values[m], v)


def _reference_unroll(nets, obs: torch.Tensor) -> torch.Tensor:
    """Each agent's own encoder and `nn.GRUCell`, slot by slot: `[B, T, M, h]`."""
    per_agent = []
    for m, net in enumerate(nets.agents):
        state, states = obs.new_zeros(obs.shape[0], net.hidden), []
        for t in range(obs.shape[1]):
            state = net.cell(torch.relu(net.encoder(obs[:, t, m])), state)
            states.append(state)
        per_agent.append(torch.stack(states, dim=1))
    return torch.stack(per_agent, dim=2)


def test_stacked_unroll_equals_each_agents_gru_cell_with_the_same_gradients():
    from dntsync.marl.networks import AgentQNets

    torch.manual_seed(5)
    online = AgentQNets(3, 7, 16, 4)
    obs = torch.randn(5, 6, 3, 7)
    hidden = online.unroll(obs)
    torch.testing.assert_close(hidden, _reference_unroll(online, obs))
    weights = torch.randn_like(hidden)
    ours = torch.autograd.grad((hidden * weights).sum(), list(online.parameters()), allow_unused=True)
    ref = torch.autograd.grad((_reference_unroll(online, obs) * weights).sum(),
                              list(online.parameters()), allow_unused=True)
    for a, b in zip(ours, ref):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)
    state = torch.randn(5, 3, 16)  # acting: one slot from a carried state
    step = online.unroll(obs[:, :1], state)[:, 0]
    ref_step = torch.stack([net.cell(torch.relu(net.encoder(obs[:, 0, m])), state[:, m])
                            for m, net in enumerate(online.agents)], dim=1)
    torch.testing.assert_close(step, ref_step)


def test_the_gru_recurrences_written_out_backward_passes_gradcheck():
    from dntsync.marl.networks import GRURecurrence

    torch.manual_seed(2)
    n_m, n_t, n_b, h = 2, 4, 3, 5
    inputs = (torch.randn(n_m, n_t, n_b, 3 * h), torch.randn(n_m, n_b, h),
              torch.randn(n_m, h, 3 * h) * 0.5, torch.randn(n_m, 1, 3 * h))
    inputs = tuple(x.double().requires_grad_() for x in inputs)
    assert torch.autograd.gradcheck(GRURecurrence.apply, inputs)


# ---------------------------------------------------------------------- losses by hand
def episode_batch(scenario: Scenario, n_episodes: int, seed: int) -> EpisodeBatch:
    """Real recorded episodes (random valid actions), as the replay would serve them."""
    env = DntEnv(scenario, Drift(scenario), n_envs=n_episodes, seed=seed)
    out = rollout(env, StatelessPolicy(RandomValid(seed)), record=True)
    replay = EpisodeReplay(n_episodes)
    replay.add(out)
    return EpisodeBatch(**{k: torch.from_numpy(replay.arrays[k]) for k in EpisodeReplay.FIELDS})


def make_learner(cls, double_q: bool, scenario: Scenario, obs_dim: int, head: str = "flat",
                 target_update_epochs: int = 2, error_gamma: float = 0.0):
    """`head` "association": the branching head with the BSs' association (`episode_batch`'s frame)."""
    torch.manual_seed(1)
    association = DntEnv(scenario).layout() if head == "association" else None
    learner = cls(n_agents=scenario.n_bs, obs_dim=obs_dim, n_users=scenario.n_users, hidden=6,
                  head="branching" if association else head, gamma=0.2, double_q=double_q,
                  target_update_epochs=target_update_epochs,
                  state_dim=2 * scenario.n_users + 2 * scenario.n_bs, association=association,
                  error_gamma=error_gamma)
    with torch.no_grad():  # a target net (and mixer) that differs from the online one
        targets = [learner.target] + ([learner.target_mixer] if learner.target_mixer is not None else [])
        for p in (p for t in targets for p in t.parameters()):
            p.add_(0.3 * torch.randn_like(p))
    return learner


def all_q_values(nets, obs: torch.Tensor) -> np.ndarray:
    """Q of every action `[B, T, M, A]` from the naive full matmul (no masking)."""
    with torch.no_grad():
        outputs = nets.head_outputs(nets.unroll(obs), obs)
        return np.stack([net.head.all_q(outputs[:, :, m].reshape(-1, outputs.shape[-1]))
                         .view(*outputs.shape[:2], -1).numpy()
                         for m, net in enumerate(nets.agents)], axis=2)


def next_value_table(learner, batch) -> np.ndarray:
    """`[B, T-1, M]`: max over slot t+1's valid actions (numpy masks), plain or double Q."""
    no_target = learner.hparams.target_update_epochs == 0  # bootstrap from the online nets
    q_on, q_tg = (all_q_values(n, batch.obs)
                  for n in (learner.online, learner.online if no_target else learner.target))
    mask = action_mask(batch.covered.numpy()).astype(bool)  # [B, T, M, A]
    B, T, M = batch.actions.shape
    out = np.zeros((B, T - 1, M))
    for b in range(B):
        for t in range(T - 1):
            for m in range(M):
                valid = np.nonzero(mask[b, t + 1, m])[0]
                if learner.hparams.double_q:  # online argmax, target value
                    out[b, t, m] = q_tg[b, t + 1, m, valid[np.argmax(q_on[b, t + 1, m, valid])]]
                else:
                    out[b, t, m] = q_tg[b, t + 1, m, valid].max()
    return out


@pytest.mark.parametrize("target_update_epochs", [2, 0])  # a target net / none (online bootstrap)
@pytest.mark.parametrize("head", ["flat", "branching", "association"])
@pytest.mark.parametrize("double_q", [False, True])
def test_vdn_loss_is_eq_22_by_hand(double_q, head, target_update_epochs):
    scenario = Scenario(**TINY)
    batch = episode_batch(scenario, 3, seed=4)
    learner = make_learner(VDN, double_q, scenario, batch.obs.shape[-1], head, target_update_epochs)
    if head == "association":  # the batch has users two BSs cover, whose terms it replaces
        assert (batch.covered.sum(-2) >= 2).any()
    # an invalid action with a huge Q must never be chosen nor maxed over: "upload and serve
    # every user" for the BSs that never cover every user in these episodes
    serve_all = 2 ** (scenario.n_users + 1) - 1
    never_full = [m for m in range(scenario.n_bs) if not batch.covered[:, :, m].all(-1).any()]
    assert never_full
    with torch.no_grad():
        for m in never_full if head == "flat" else []:  # per-bit heads: covered bits only
            learner.online.agents[m].head.bias[serve_all] = 1e6
            learner.target.agents[m].head.bias[serve_all] = 1e6
    q_on, future = all_q_values(learner.online, batch.obs), next_value_table(learner, batch)
    B, T, M = batch.actions.shape
    gamma, total = 0.2, 0.0
    for b in range(B):
        for t in range(T):
            q_tot = sum(q_on[b, t, m, batch.actions[b, t, m]] for m in range(M))  # eq. (19)
            next_sum = 0.0 if t == T - 1 else sum(future[b, t, m] for m in range(M))
            y = batch.team_reward[b, t].item() + gamma * next_sum  # eq. (21)
            total += (y - q_tot) ** 2
    expected = total / (B * T)  # eq. (22), mean over sampled transitions
    assert expected < 1e5  # the huge invalid Q stayed out
    assert learner.td_loss(batch).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("double_q", [False, True])
def test_iql_loss_is_eq_37_by_hand(double_q):
    scenario = Scenario(**TINY)
    batch = episode_batch(scenario, 3, seed=5)
    learner = make_learner(IQL, double_q, scenario, batch.obs.shape[-1])
    q_on, future = all_q_values(learner.online, batch.obs), next_value_table(learner, batch)
    B, T, M = batch.actions.shape
    total = 0.0
    for b in range(B):
        for t in range(T):
            for m in range(M):
                next_q = 0.0 if t == T - 1 else future[b, t, m]
                y = batch.local_rewards[b, t, m].item() + 0.2 * next_q
                total += (y - q_on[b, t, m, batch.actions[b, t, m]]) ** 2
    assert learner.td_loss(batch).item() == pytest.approx(total / (B * T * M), rel=1e-5)


@pytest.mark.parametrize("target_update_epochs", [2, 0])
def test_qmix_loss_mixes_the_chosen_q_with_the_slot_state_and_the_next_value_with_the_next(
        target_update_epochs):
    scenario = Scenario(**TINY)
    batch = episode_batch(scenario, 3, seed=7)
    learner = make_learner(QMIX, True, scenario, batch.obs.shape[-1], "branching", target_update_epochs)
    q_on, future = all_q_values(learner.online, batch.obs), next_value_table(learner, batch)
    B, T, M = batch.actions.shape
    next_mixer = learner.mixer if target_update_epochs == 0 else learner.target_mixer
    total = 0.0
    with torch.no_grad():
        for b in range(B):
            for t in range(T):
                chosen = torch.tensor([q_on[b, t, m, batch.actions[b, t, m]] for m in range(M)])
                q_tot = learner.mixer(chosen.float(), batch.state[b, t])
                nxt = 0.0 if t == T - 1 else next_mixer(torch.tensor(future[b, t]).float(),
                                                        batch.state[b, t + 1]).item()
                total += (batch.team_reward[b, t].item() + 0.2 * nxt - q_tot.item()) ** 2
    assert learner.td_loss(batch).item() == pytest.approx(total / (B * T), rel=1e-4)


@pytest.mark.parametrize("target_update_epochs", [2, 0])
@pytest.mark.parametrize("cls", [VDN, IQL])
def test_error_value_loss_by_hand(cls, target_update_epochs):
    """`error_gamma` = g: Q = R + E. R is regressed on the reward less its DNT-error term plus
    gamma times the next Q less the next E at the (double-Q) greedy action; E on the error
    term's return over the rest of the episode, discounted by g. VDN sums the BSs against
    the team's terms, IQL keeps each BS on its own."""
    scenario = Scenario(**TINY)
    batch = episode_batch(scenario, 3, seed=6)
    assert (batch.error_reward < 0).any() and (batch.local_error_rewards <= 0).all()
    g = 0.5
    learner = make_learner(cls, True, scenario, batch.obs.shape[-1], "association",
                           target_update_epochs, error_gamma=g)
    with torch.no_grad():
        nets = [learner.online, learner.online if target_update_epochs == 0 else learner.target]
        q_on, q_tg = (all_q_values(n, batch.obs) for n in nets)  # R + E of every action
        e_on, e_tg = (n.error_outputs(n.unroll(batch.obs)).numpy() for n in nets)  # [B, T, M, 2]
    mask = action_mask(batch.covered.numpy()).astype(bool)
    B, T, M = batch.actions.shape
    acts = batch.actions.numpy()

    def e_of(table, b, t, m, a):
        return table[b, t, m, 0] + (a & 1) * table[b, t, m, 1]

    def next_r(b, t, m):
        if t == T - 1:
            return 0.0
        valid = np.nonzero(mask[b, t + 1, m])[0]
        best = valid[np.argmax(q_on[b, t + 1, m, valid])]
        return q_tg[b, t + 1, m, best] - e_of(e_tg, b, t + 1, m, best)

    vdn = cls is VDN
    err = (batch.error_reward if vdn else batch.local_error_rewards).numpy().astype(np.float64)
    reward = (batch.team_reward if vdn else batch.local_rewards).numpy() - err
    total = 0.0
    for b in range(B):
        for t in range(T):
            ret = sum(g ** (s - t) * err[b, s] for s in range(t, T))
            r = [q_on[b, t, m, acts[b, t, m]] - e_of(e_on, b, t, m, acts[b, t, m]) for m in range(M)]
            e = [e_of(e_on, b, t, m, acts[b, t, m]) for m in range(M)]
            nxt = [next_r(b, t, m) for m in range(M)]
            if vdn:
                total += (reward[b, t] + 0.2 * sum(nxt) - sum(r)) ** 2 + (ret - sum(e)) ** 2
            else:
                total += sum((reward[b, t, m] + 0.2 * nxt[m] - r[m]) ** 2 + (ret[m] - e[m]) ** 2
                             for m in range(M))
    expected = total / (B * T if vdn else B * T * M)
    assert learner.td_loss(batch).item() == pytest.approx(expected, rel=1e-4)


def test_an_error_value_needs_a_sum_of_the_agents_q():
    """QMIX's mixer is not a sum: it refuses an error value, and `build_learner` gives it none."""
    scenario = Scenario(**TINY)
    with pytest.raises(ValueError, match="error_gamma"):
        make_learner(QMIX, True, scenario, 3 * scenario.n_users + 2, "branching", error_gamma=0.8)
    cfg = from_dict({"scenario": TINY, "env": {"predictor": "drift"}})
    assert cfg.marl.algorithm.error_gamma > 0
    env = DntEnv(cfg.scenario, Drift(cfg.scenario), observation=cfg.env.observation,
                 obs_frame=cfg.env.obs_frame, user_features=cfg.env.user_features)
    assert build_learner(cfg, "qmix", env).online.error_terms is None
    assert build_learner(cfg, "vdn", env).online.error_terms is not None


def test_qmix_mixing_is_monotonic_and_its_weights_are_trained():
    torch.manual_seed(0)
    mixer = QMixer(n_agents=3, state_dim=10)
    q = torch.randn(64, 3, requires_grad=True)
    mixer(q, torch.randn(64, 10)).sum().backward()
    assert (q.grad >= 0).all() and (q.grad > 0).any()  # dQ_tot / dQ_m >= 0: monotonic
    scenario = Scenario(**TINY)
    learner = make_learner(QMIX, True, scenario, 3 * scenario.n_users + 2, "branching")
    trained = {id(p) for opt in [learner.configure_optimizers()[0]] for g in opt.param_groups
               for p in g["params"]}
    assert {id(p) for p in learner.mixer.parameters()} <= trained
    assert not any(p.requires_grad for p in learner.target_mixer.parameters())


def association_nets(env: DntEnv, hidden: int = 16) -> tuple[AgentQNets, AgentQNets]:
    """Branching-head nets with the association and the same nets without it."""
    torch.manual_seed(0)
    args = (env.n_agents, env.obs_dim, hidden, env.scenario.n_users, "branching")
    nets = AgentQNets(*args, user_dim=env.user_dim, association=env.layout())
    plain = AgentQNets(*args, user_dim=env.user_dim)
    plain.agents.load_state_dict(nets.agents.state_dict())
    return nets, plain


@pytest.mark.parametrize("obs_frame", ["bs", "area"])
def test_association_serves_each_user_several_bss_cover_exactly_once(obs_frame):
    """Whatever the weights, the greedy BSs serve every user two BSs cover from exactly one of
    them (their two terms are opposite); the users one BS covers keep the head's own term."""
    scenario = Scenario(n_users=12, episode_length=4)
    env = DntEnv(scenario, Drift(scenario), n_envs=64, seed=3, obs_frame=obs_frame,
                 user_features=("others",))
    nets, plain = association_nets(env)
    obs, covered = env.reset()
    obs_t = torch.as_tensor(obs)
    several = covered.sum(1) >= 2  # [B, U]
    assert several.sum() > 20 and (covered.sum(1) <= 2).all()
    pairs = np.nonzero(several)
    with torch.no_grad():
        hidden = nets.unroll(obs_t[:, None])[:, 0]  # [B, M, h]
        own = plain.head_outputs(hidden, obs_t)
        for _ in range(3):  # three score networks
            terms = nets.head_outputs(hidden, obs_t)
            _, best = nets.masked_max(terms, torch.as_tensor(covered))
            serve = decode(best.numpy(), scenario.n_users)[1]  # [B, M, U]
            assert (serve.sum(1)[several] == 1).all()
            serve_terms = terms[..., 2:].numpy()  # [B, M, U]
            sums = (serve_terms * covered).sum(1)[pairs]
            np.testing.assert_allclose(sums, 0.0, atol=1e-4)  # each BS's float32 distances
            single = covered & ~several[:, None, :]
            np.testing.assert_array_equal(serve_terms[single], own[..., 2:].numpy()[single])
            np.testing.assert_array_equal(terms[..., :2], own[..., :2])  # q_0 and upload untouched
            for p in nets.association.parameters():
                p.add_(torch.randn_like(p))


def test_association_with_a_score_falling_with_distance_is_the_nearest_bs_rule():
    from dntsync.env.policies import nearest_association

    scenario = Scenario(n_users=12, episode_length=4)
    env = DntEnv(scenario, Drift(scenario), n_envs=64, seed=5, obs_frame="bs")
    nets, _ = association_nets(env)
    with torch.no_grad():  # h(d) = -d: relu(d) in one hidden unit, passed on, negated
        for p in nets.association.parameters():
            p.zero_()
        first, second, out = (m for m in nets.association.score if isinstance(m, torch.nn.Linear))
        first.weight[0, 0] = second.weight[0, 0] = 1.0
        out.weight[0, 0] = -1.0
    obs, covered = env.reset()
    obs_t = torch.as_tensor(obs)
    with torch.no_grad():
        terms = nets.head_outputs(nets.unroll(obs_t[:, None])[:, 0], obs_t)
        serve = decode(nets.masked_max(terms, torch.as_tensor(covered))[1].numpy(), 12)[1]
    several = covered.sum(1) >= 2
    nearest = nearest_association(scenario, env.state.user_xy, covered)
    np.testing.assert_array_equal(serve.transpose(0, 2, 1)[several], nearest.transpose(0, 2, 1)[several])


def test_a_large_association_slope_is_the_nearest_bs_rule_whatever_the_score():
    """h(d) = +d gives each overlap user to its farthest covering BS; h(d) - c d with c = 10
    gives it to the nearest."""
    from dntsync.env.policies import nearest_association

    scenario = Scenario(n_users=12, episode_length=4)
    env = DntEnv(scenario, Drift(scenario), n_envs=64, seed=5, obs_frame="bs")
    nets, _ = association_nets(env)
    with torch.no_grad():  # h(d) = d
        for p in nets.association.parameters():
            p.zero_()
        first, second, out = (m for m in nets.association.score if isinstance(m, torch.nn.Linear))
        first.weight[0, 0] = second.weight[0, 0] = out.weight[0, 0] = 1.0
    obs, covered = env.reset()
    obs_t = torch.as_tensor(obs)
    several = covered.sum(1) >= 2
    nearest = nearest_association(scenario, env.state.user_xy, covered).transpose(0, 2, 1)[several]
    for slope, same in ((0.0, False), (10.0, True)):
        nets.association.slope.fill_(slope)
        with torch.no_grad():
            terms = nets.head_outputs(nets.unroll(obs_t[:, None])[:, 0], obs_t)
            serve = decode(nets.masked_max(terms, torch.as_tensor(covered))[1].numpy(), 12)[1]
        assert np.array_equal(serve.transpose(0, 2, 1)[several], nearest) == same


def test_the_fitted_association_slope_is_the_best_on_validation():
    scenario = Scenario(n_users=8, n_rbs=6, episode_length=5)
    env = DntEnv(scenario, Drift(scenario), n_envs=1, seed=0)
    torch.manual_seed(1)
    learner = VDN(n_agents=scenario.n_bs, obs_dim=env.obs_dim, n_users=scenario.n_users, hidden=8,
                  head="branching", user_dim=env.user_dim, association=env.layout(), upload_phases=2)
    validation = Evaluation(scenario, Drift(scenario), 8, 500)
    slopes = (0.0, 1.0, 10.0, 100.0, 1000.0)
    record = fit_association_slope(learner, validation, slopes)
    played = dict((c, v) for c, v in record["validation"])
    assert list(played) == list(slopes)
    best = max(played.values())
    assert record["slope"] == max(c for c, v in played.items() if v == best)  # the nearest BS's side
    assert float(learner.online.association.slope) == record["slope"]
    assert float(learner.target.association.slope) == 0.0  # the greedy policy's alone
    assert scores(learner, validation, learner.upload_offsets)[0] == pytest.approx(best)
    assert played[100.0] == played[1000.0]  # both the nearest-BS rule


def test_the_association_needs_a_per_bit_head():
    with pytest.raises(ValueError, match="per-bit head"):
        AgentQNets(3, 8, 4, 2, "flat", association=DntEnv(Scenario(n_users=2)).layout())
    with pytest.raises(ValueError, match="per-bit head"):  # so does the error value
        AgentQNets(3, 8, 4, 2, "flat", error_value=True)


def test_one_registry_of_learners_and_heads():
    """The config's names (its validation, `--algo`, DVC's stages read them) are the classes'."""
    from dntsync.config import HEAD_NAMES
    from dntsync.marl.networks import HEADS

    assert set(LEARNERS) == set(ALGOS)
    assert set(HEADS) == set(HEAD_NAMES)


def test_vdn_and_iql_differ_only_in_what_is_summed():
    scenario = Scenario(**TINY)
    batch = episode_batch(scenario, 2, seed=6)
    vdn = make_learner(VDN, True, scenario, batch.obs.shape[-1])
    iql = make_learner(IQL, True, scenario, batch.obs.shape[-1])
    assert all(torch.equal(a, b) for a, b in zip(vdn.state_dict().values(), iql.state_dict().values()))
    assert vdn.td_loss(batch).item() != pytest.approx(iql.td_loss(batch).item())


@pytest.mark.parametrize("exploration", ["action", "bit"])
def test_exploration_and_greedy_actions_are_always_valid(exploration):
    scenario = Scenario(n_users=5, n_rbs=3, episode_length=6)
    env = DntEnv(scenario, Drift(scenario), n_envs=16, seed=2)
    learner = VDN(n_agents=3, obs_dim=env.obs_dim, n_users=5, hidden=8)
    with torch.no_grad():  # the greedy choice would love an action serving every user
        for net in learner.online.agents:
            net.head.bias[-1] = 1e6
    for epsilon in (1.0, 0.3, 0.0):
        policy = QPolicy(learner.online, epsilon, np.random.default_rng(0), exploration=exploration)
        out = rollout(env, policy, seed=3, record=True)
        assert is_valid(out.actions, out.covered).all()
        if epsilon == 1.0:  # every valid action of a BS is drawn (uniformly)
            assert len(np.unique(out.actions)) > 20


def test_bit_exploration_deviates_from_the_greedy_action_bit_by_bit():
    from dntsync.marl.learners import explore_bits

    rng = np.random.default_rng(0)
    covered = np.ones((4000, 1, 6), dtype=bool)
    covered[:, :, 3] = False
    greedy = np.full((4000, 1), 0b101011)  # upload, serve users 0, 2, 4 (user 3 not covered)
    out = explore_bits(greedy, covered, 0.2, rng)
    changed = np.unpackbits((out ^ greedy).astype(np.uint8)[..., None], axis=-1).sum(-1)
    # each of the 6 allowed bits is redrawn w.p. 0.2 and then differs w.p. 1/2
    assert changed.mean() == pytest.approx(6 * 0.1, rel=0.1)
    assert is_valid(out, covered).all()
    assert (explore_bits(greedy, covered, 0.0, rng) == greedy).all()


# ---------------------------------------------------------------------- replay
def fake_episodes(ids: list[int], horizon: int = 2) -> Rollout:
    n = len(ids)
    reward = np.repeat(np.array(ids, dtype=float)[:, None], horizon, axis=1)
    return Rollout(steps={}, obs=np.zeros((n, horizon, 1, 2)), covered=np.zeros((n, horizon, 1, 1)),
                   actions=np.zeros((n, horizon, 1)), team_reward=reward,
                   local_rewards=reward[..., None], error_reward=reward,
                   local_error_rewards=reward[..., None],
                   terminated=np.zeros((n, horizon)), state=np.zeros((n, horizon, 2)))


def test_replay_ring_overwrites_the_oldest_and_samples_held_episodes():
    replay = EpisodeReplay(capacity=5)
    replay.add(fake_episodes([0, 1, 2]))
    assert len(replay) == 3 and replay.cursor == 3
    replay.add(fake_episodes([3, 4, 5, 6]))
    assert len(replay) == 5 and replay.cursor == 2 and replay.added == 7
    held = sorted(replay.arrays["team_reward"][:, 0].astype(int).tolist())
    assert held == [2, 3, 4, 5, 6]  # 0 and 1 were overwritten
    batch = replay.sample(4, np.random.default_rng(0))
    ids = batch.team_reward[:, 0].long().tolist()
    assert len(set(ids)) == 4 and set(ids) <= set(held)  # no repeats within a minibatch
    assert batch.filled.shape == (4, 2) and batch.filled.all()
    restored = EpisodeReplay(capacity=5)
    restored.load_state_dict(replay.state_dict())
    assert (restored.size, restored.cursor, restored.added) == (5, 2, 7)
    for k in EpisodeReplay.FIELDS:
        np.testing.assert_array_equal(restored.arrays[k], replay.arrays[k])
    replay.add(fake_episodes(list(range(10, 17))))  # more than the capacity at once
    assert sorted(replay.arrays["team_reward"][:, 0].astype(int).tolist()) == [12, 13, 14, 15, 16]


# ---------------------------------------------------------------------- real tiny runs
def final_weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)["state_dict"]


@pytest.mark.parametrize("algo", ["vdn", "iql", "qmix"])
def test_two_epoch_run_logs_to_mlflow_and_writes_outputs(tmp_path, monkeypatch, algo):
    import mlflow

    monkeypatch.chdir(tmp_path)  # MLflow's local artifact store
    cfg = tiny_config(tmp_path, "marl.upload_offsets.phases=0",  # the final policy is the validated one
                      "marl.network.association_slopes=[]", "marl.network.serve_covered_fit=false")
    seen = []

    class Watch(pl.Callback):  # what an Optuna pruner would see
        def on_validation_end(self, trainer, pl_module):
            seen.append(float(trainer.callback_metrics["eval_team_reward"]))

    report = fit_marl(cfg, algo=algo, seed=0, callbacks=[Watch()], enable_progress_bar=False)
    assert len(seen) == 2 and report["eval_team_reward"] == pytest.approx(seen[-1], rel=1e-5)
    assert report["algo"] == algo and report["predictor"] == "drift"
    assert {"oracle", "nearest-always"} <= set(report["baselines"])
    assert np.isfinite(report["ratio_to_oracle"])
    written = json.loads((tmp_path / f"metrics/marl_{algo}_seed0.json").read_text())
    assert written["eval_team_reward"] == report["eval_team_reward"]
    curve = (tmp_path / f"metrics/curves/marl_{algo}_seed0.csv").read_text().splitlines()
    assert curve[0].startswith("epoch,train_reward") and len(curve) == 3
    assert (tmp_path / f"models/{algo}_seed0.ckpt").exists()
    loaded = LEARNERS[algo].load_from_checkpoint(tmp_path / f"models/{algo}_seed0.ckpt")
    assert loaded.hparams.hidden == 16

    mlflow.set_tracking_uri(cfg.tracking.mlflow_uri)
    runs = mlflow.search_runs(experiment_names=["dntsync-marl"], output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["predictor"] == "drift" and run.data.params["marl.algorithm.name"] == algo
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "eval_team_reward")
    assert [m.step for m in history] == [1, 2]  # curves against the epoch
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert f"{algo}_seed0.ckpt" in artifacts and f"marl_{algo}_seed0.json" in artifacts


def test_baselines_are_played_once_per_setting_and_kept_beside_the_checkpoints(tmp_path, monkeypatch):
    import dntsync.marl.training as training

    played = []
    evaluate = training.evaluate_baselines
    monkeypatch.setattr(training, "evaluate_baselines", lambda *a: played.append(1) or evaluate(*a))
    cfg = tiny_config(tmp_path)
    evaluation = Evaluation(cfg.scenario, Drift(cfg.scenario), 4, cfg.marl.evaluation.seed,
                            **cfg.env.observation_options())
    first = training.shared_baselines(cfg, evaluation, "drift")
    assert training.shared_baselines(cfg, evaluation, "drift") == first and len(played) == 1
    [kept] = (tmp_path / "checkpoints/baselines").iterdir()
    assert json.loads(kept.read_text()) == first
    other = apply_overrides(cfg, ["marl.evaluation.upload_periods=[2]"])  # another setting: its own
    assert set(training.shared_baselines(other, evaluation, "drift")) < set(first) and len(played) == 2
    kept.write_text("{")  # a file that does not read back is played again, then rewritten
    assert training.shared_baselines(cfg, evaluation, "drift") == first and len(played) == 3
    assert json.loads(kept.read_text()) == first


def test_upload_offsets_shift_the_upload_term_by_slot_phase():
    outputs = torch.zeros(2, 3, 5)  # [B, M, F]: q_0, upload, 3 users
    offsets = torch.tensor([[1.0, -1.0], [2.0, 0.0], [0.0, 3.0]])
    for slot in range(4):
        shifted = with_upload_offsets(outputs, offsets, slot)
        assert torch.equal(shifted[..., 1], offsets[:, slot % 2].expand(2, 3))
        assert not shifted[..., [0, 2, 3, 4]].any() and not outputs.any()
    episode = with_upload_offsets(torch.zeros(2, 4, 3, 5), offsets, torch.arange(4))  # [B, T, M, F]
    for slot in range(4):
        assert torch.equal(episode[:, slot], with_upload_offsets(outputs, offsets, slot))


def test_greedy_policy_and_mlflow_model_upload_in_the_phases_the_offsets_say():
    scenario = Scenario(**TINY)
    env = DntEnv(scenario, Drift(scenario), n_envs=4, seed=0)
    learner = VDN(n_agents=scenario.n_bs, obs_dim=env.obs_dim, n_users=scenario.n_users, hidden=8,
                  head="branching", user_dim=env.user_dim, upload_phases=2)
    learner.upload_offsets.copy_(torch.tensor([[100.0, -100.0], [-100.0, 100.0], [-100.0, -100.0]]))
    played = rollout(env, learner.greedy_policy(), seed=0, record=True)
    upload, _ = decode(played.actions, scenario.n_users)  # [B, T, M]
    even = np.arange(scenario.episode_length) % 2 == 0
    assert upload[:, even, 0].all() and not upload[:, ~even, 0].any()
    assert upload[:, ~even, 1].all() and not upload[:, even, 1].any() and not upload[:, :, 2].any()
    model = GreedyActions(learner.online, learner.offsets)  # what MLflow serves
    assert np.array_equal(model(torch.from_numpy(played.obs)).numpy(), played.actions)


@pytest.mark.parametrize("algo", ["vdn", "iql"])
def test_fitted_upload_offsets_are_on_the_grid_and_never_lower_the_validation_score(algo):
    scenario = Scenario(**TINY)
    env = DntEnv(scenario, Drift(scenario), n_envs=1, seed=0)
    torch.manual_seed(0)
    learner = LEARNERS[algo](n_agents=scenario.n_bs, obs_dim=env.obs_dim, n_users=scenario.n_users,
                             hidden=8, head="branching", user_dim=env.user_dim, upload_phases=3)
    validation = Evaluation(scenario, Drift(scenario), 8, 500)
    grid = (-50.0, -0.5, 0.0, 0.5, 50.0)
    before = scores(learner, validation, torch.zeros(3, 3))
    record = fit_upload_offsets(learner, validation, grid, passes=2)
    after = scores(learner, validation, learner.upload_offsets)
    assert set(learner.upload_offsets.flatten().tolist()) <= set(grid)
    assert record["offsets"] == learner.upload_offsets.tolist()
    assert record["validation_before"] == pytest.approx(before.mean())
    assert record["validation_after"] == pytest.approx(after.mean())
    if algo == "vdn":  # one team score, never below zero offsets' nor any phase start's
        assert np.all(after == after[0]) and after[0] >= before[0]
        starts = phase_starts(scenario.n_bs, 3, grid)
        assert len(starts) == 3 ** scenario.n_bs + 1  # the phases, zero
        assert after[0] >= max(scores(learner, validation, start)[0] for start in starts)
    else:  # each BS's own local reward, each offset fitted for its BS (another's may lower it)
        assert not np.all(after == after[0])
    again = LEARNERS[algo](n_agents=scenario.n_bs, obs_dim=env.obs_dim, n_users=scenario.n_users,
                           hidden=8, head="branching", user_dim=env.user_dim, upload_phases=3)
    again.load_state_dict(learner.state_dict())
    again.upload_offsets.zero_()
    assert fit_upload_offsets(again, validation, grid, passes=2) == record  # deterministic


def test_a_schedule_forces_the_uploads_of_the_every_k_rule_with_the_same_phases():
    scenario = Scenario(**{**TINY, "episode_length": 12})
    env = DntEnv(scenario, Drift(scenario), n_envs=2, seed=0)
    learner = VDN(n_agents=scenario.n_bs, obs_dim=env.obs_dim, n_users=scenario.n_users, hidden=8,
                  head="branching", user_dim=env.user_dim, upload_phases=5)
    rule = NearestBS(scenario, 5, staggered=True)
    learner.upload_offsets.copy_(schedule(tuple(rule.offsets), 5, (-100.0, 100.0)))
    mine, _ = decode(rollout(env, learner.greedy_policy(), seed=0, record=True).actions, scenario.n_users)
    theirs, _ = decode(rollout(env, StatelessPolicy(rule), seed=0, record=True).actions, scenario.n_users)
    assert np.array_equal(mine, theirs) and mine.any() and not mine.all()


def test_longer_upload_cycles_start_the_search_and_the_offsets_repeat_over_the_cycle():
    scenario = Scenario(**{**TINY, "episode_length": 12})
    env = DntEnv(scenario, Drift(scenario), n_envs=1, seed=0)
    torch.manual_seed(0)
    learner = VDN(n_agents=scenario.n_bs, obs_dim=env.obs_dim, n_users=scenario.n_users, hidden=8,
                  head="branching", user_dim=env.user_dim, upload_phases=10)  # lcm(2, 5)
    validation = Evaluation(scenario, Drift(scenario), 4, 500)
    grid = (-50.0, 0.0, 50.0)
    record = fit_upload_offsets(learner, validation, grid, passes=1, phases=2, periods=(5,), force=100.0)
    starts = phase_starts(scenario.n_bs, 2, grid, (5,), force=100.0)
    assert len(starts) == 2 + 2 ** scenario.n_bs + 2 + 1
    assert [s.shape[1] for s in starts] == [1, 1] + [2] * 2 ** scenario.n_bs + [5, 5, 2]
    assert torch.equal(starts[0], torch.full((3, 1), 100.0)) and torch.equal(starts[1], torch.full((3, 1), -100.0))
    assert torch.equal(starts[-2], schedule((0, 2, 3), 5, grid))  # staggered: round(m p / M)
    assert torch.equal(starts[-1], torch.zeros(3, 2))  # the learnt timing last: the rule's first among equals
    after = scores(learner, validation, learner.upload_offsets)[0]
    assert after == pytest.approx(record["validation_after"])
    assert after >= max(scores(learner, validation, start)[0] for start in starts)
    p, offsets = record["period"], learner.upload_offsets
    assert p in (1, 2, 5) and torch.equal(offsets, offsets[:, :p].repeat(1, 10 // p))
    with pytest.raises(ValueError, match="must divide"):
        fit_upload_offsets(learner, validation, grid, phases=2, periods=(3,))


def test_a_run_resumes_under_other_upload_offsets_with_zero_offsets_of_the_new_width():
    """The offsets are fitted after training: an interrupted run's checkpoint holds zeros of
    its own width, which a resume under another `marl.upload_offsets` replaces."""
    kwargs = dict(n_agents=3, obs_dim=10, n_users=3, hidden=8, head="branching")
    state = VDN(**kwargs, upload_phases=2).state_dict()
    for phases in (10, 0):
        learner = VDN(**kwargs, upload_phases=phases)
        checkpoint = {"state_dict": dict(state)}
        learner.on_load_checkpoint(checkpoint)
        learner.load_state_dict(checkpoint["state_dict"])  # strict
        assert learner.offsets is None if phases == 0 else torch.equal(learner.offsets, torch.zeros(3, 10))


def test_upload_offsets_need_a_per_bit_head():
    with pytest.raises(ValueError, match="per-bit head"):
        VDN(n_agents=3, obs_dim=10, n_users=3, hidden=8, head="flat", upload_phases=2)


@pytest.mark.parametrize("upload_bias", [-100.0, 100.0])
def test_the_offsets_search_keeps_the_rules_schedule_among_equals_and_skips_steps_that_change_nothing(upload_bias):
    """With an upload term that no offset outweighs, every start plays the same: the search
    keeps the first, every BS uploading always (+force, period 1). From
    there a BS that never uploads is not walked down (no step can change an action), one that
    always uploads is, one play a grid point, and nothing moves."""
    scenario = Scenario(**TINY)
    env = DntEnv(scenario, Drift(scenario), n_envs=1, seed=0)
    torch.manual_seed(0)
    learner = VDN(n_agents=scenario.n_bs, obs_dim=env.obs_dim, n_users=scenario.n_users, hidden=8,
                  head="branching", user_dim=env.user_dim, error_gamma=0.8, upload_phases=2)
    with torch.no_grad():
        for terms in learner.online.error_terms:
            terms.bias[1] = upload_bias  # e_upload: never / always upload, whatever the offset
    validation = Evaluation(scenario, Drift(scenario), 4, 500)
    record = fit_upload_offsets(learner, validation, (-1.0, 0.0, 1.0), passes=3, force=10.0)
    n_starts = 2 + 2 ** scenario.n_bs + 1
    walked = 0 if upload_bias < 0 else scenario.n_bs * 4  # 1, 0, -1, -10
    assert record["validation_plays"] == n_starts + walked
    assert record["period"] == 1 and record["offsets"] == [[10.0, 10.0]] * scenario.n_bs
    assert record["validation_after"] == record["validation_before"]


def test_serving_every_covered_user_with_the_nearest_association_and_forced_uploads_is_the_rule():
    """The nearest-BS rule is one of the learner's greedy policies: whatever the weights,
    `serve_covered`, a large association slope and offsets at the grid's top (bottom) play
    `NearestBS("always")` (`"never"`) action for action."""
    scenario = Scenario(n_users=12, episode_length=6)
    env = DntEnv(scenario, Drift(scenario), n_envs=8, seed=0, obs_frame="bs", user_features=("others",))
    torch.manual_seed(0)
    learner = VDN(n_agents=scenario.n_bs, obs_dim=env.obs_dim, n_users=scenario.n_users, hidden=8,
                  head="branching", user_dim=env.user_dim, association=env.layout(), error_gamma=0.8,
                  upload_phases=2)
    learner.online.association.slope.fill_(1000.0)
    for upload, offset in (("always", 100.0), ("never", -100.0)):
        learner.upload_offsets.fill_(offset)
        rule = rollout(env, StatelessPolicy(NearestBS(scenario, upload)), seed=3, record=True).actions
        learner.online.serve_covered.fill_(0.0)
        assert not np.array_equal(rollout(env, learner.greedy_policy(), seed=3, record=True).actions, rule)
        learner.online.serve_covered.fill_(1.0)
        mine = rollout(env, learner.greedy_policy(), seed=3, record=True)
        assert np.array_equal(mine.actions, rule)
        assert np.array_equal(GreedyActions(learner.online, learner.offsets)(torch.from_numpy(mine.obs)).numpy(),
                              mine.actions)  # the MLflow model too


def test_retry_offsets_at_force_play_the_retry_rule_and_the_mlflow_model_does_too():
    """With `serve_covered`, a large association slope and a retry start at +-force the
    greedy policy is `NearestBS(k, retry=True)` with the start's phases, action for action,
    through uploads that fail and are retried; so is the MLflow model (`GreedyActions`)."""
    scenario = Scenario(n_users=12, episode_length=8)
    env = DntEnv(scenario, Drift(scenario), n_envs=16, seed=0, obs_frame="bs", user_features=("others",))
    torch.manual_seed(0)
    learner = VDN(n_agents=scenario.n_bs, obs_dim=env.obs_dim, n_users=scenario.n_users, hidden=8,
                  head="branching", user_dim=env.user_dim, association=env.layout(), error_gamma=0.8,
                  upload_phases=2, retry_slots=4, episode_length=scenario.episode_length)
    learner.online.association.slope.fill_(1000.0)
    learner.online.serve_covered.fill_(1.0)
    starts = retry_starts(scenario.n_bs, (2, 4), 1000.0, 4)
    assert [(k, phases) for k, phases, *_ in starts] == [(2, (0, 0, 0)), (2, (0, 1, 1)), (4, (0, 0, 0)),
                                                         (4, (0, 1, 3))]
    tuned = retry_starts(scenario.n_bs, (2, 4), 1000.0, 4, tuned_max=8)  # all 2^3 assignments for k = 2
    assert [phases for k, phases, *_ in tuned if k == 2] == [tuple(map(int, f"{i:03b}")) for i in range(8)]
    starts += [tuned[5], tuned[6]]  # phases (1, 0, 1) and (1, 1, 0): any assignment plays its rule
    for k, phases, offsets, head in starts:
        learner.retry_offsets.copy_(offsets)
        learner.retry_head_start.copy_(head)
        rule = rollout(env, StatelessPolicy(NearestBS(scenario, k, phases=phases, retry=True)), seed=3,
                       record=True)
        assert rule.steps["failed_uploads"].sum() > 0  # retries are met
        mine = rollout(env, learner.greedy_policy(), seed=3, record=True)
        assert np.array_equal(mine.actions, rule.actions)
        model = GreedyActions(learner.online, learner.offsets, learner.retry)
        assert np.array_equal(model(torch.from_numpy(mine.obs)).numpy(), mine.actions)


@pytest.mark.parametrize("algo", ["vdn", "iql"])
def test_offsets_played_together_score_and_upload_as_each_played_alone(algo, monkeypatch):
    """`play_each` (copies of the validation episodes in one batch, each with its own slot
    and retry offsets, of several widths, over two batches of episodes, in groups) gives each
    trial's `play` numbers exactly."""
    monkeypatch.setattr("dntsync.marl.offsets.PLAYED_TOGETHER", 4)
    scenario = Scenario(n_users=8, n_rbs=6, episode_length=7)
    env = DntEnv(scenario, Drift(scenario), n_envs=1, seed=0, obs_frame="bs", user_features=("others",))
    validation = Evaluation(scenario, Drift(scenario), 5, 500, batch_envs=3, obs_frame="bs",
                            user_features=("others",))
    torch.manual_seed(0)
    learner = LEARNERS[algo](n_agents=scenario.n_bs, obs_dim=env.obs_dim, n_users=scenario.n_users,
                             hidden=8, head="branching", user_dim=env.user_dim, association=env.layout(),
                             upload_phases=10, retry_slots=3, episode_length=scenario.episode_length)
    zero = torch.zeros(scenario.n_bs, 2)
    trials = [(start, None) for start in phase_starts(scenario.n_bs, 2, (-1.0, 0.0, 1.0), (5,), 100.0)]
    retry = learner.retry or (torch.zeros(scenario.n_bs, 3), torch.zeros(scenario.n_bs), None)
    trials += [(zero, (offsets, head, retry[2])) for _, _, offsets, head in retry_starts(scenario.n_bs, (2, 3), 100.0, 3)]
    if learner.retry is None:  # IQL: no retry offsets
        trials = [t for t in trials if t[1] is None]
    assert len({t[0].shape[1] for t in trials}) == 3 and len(trials) > 4
    together = play_each(learner, validation, trials)
    for (offsets, retry), got in zip(trials, together):
        alone = play(learner, validation, offsets, retry)
        assert np.array_equal(got.scores, alone.scores) and np.array_equal(got.uploads, alone.uploads)
    assert len({tuple(p.scores) for p in together}) > 1  # the trials differ


def test_the_retry_fit_keeps_the_best_retry_rule_only_above_the_slot_offsets_score():
    scenario = Scenario(n_users=8, n_rbs=6, episode_length=6)
    env = DntEnv(scenario, Drift(scenario), n_envs=1, seed=0)
    validation = Evaluation(scenario, Drift(scenario), 8, 500)
    torch.manual_seed(0)
    learner = VDN(n_agents=scenario.n_bs, obs_dim=env.obs_dim, n_users=scenario.n_users, hidden=8,
                  head="branching", user_dim=env.user_dim, association=env.layout(), upload_phases=2,
                  retry_slots=3, episode_length=scenario.episode_length)
    learner.upload_offsets.fill_(0.5)
    zero = torch.zeros_like(learner.upload_offsets)
    scored = [float(scores(learner, validation, zero, (offsets, head, learner.retry_scale)).mean())
              for _, _, offsets, head in retry_starts(scenario.n_bs, (2, 3), 1000.0, 3)]
    record = fit_retry_offsets(learner, validation, (2, 3), 1000.0, than=float("inf"))
    assert not record["kept"] and record["validation"] == pytest.approx(max(scored))
    assert record["validation_plays"] == 4
    assert learner.upload_offsets.eq(0.5).all() and not learner.retry_offsets.any()
    record = fit_retry_offsets(learner, validation, (2, 3), 1000.0, than=-float("inf"))
    k, phases, offsets, head = retry_starts(scenario.n_bs, (2, 3), 1000.0, 3)[int(np.argmax(scored))]
    assert record["kept"] and (record["k"], record["phases"]) == (k, list(phases))
    assert not learner.upload_offsets.any()
    assert torch.equal(learner.retry_offsets, offsets) and torch.equal(learner.retry_head_start, head)
    assert float(scores(learner, validation, learner.upload_offsets).mean()) == pytest.approx(max(scored))


def test_iql_and_older_model_files_have_no_retry_offsets():
    kwargs = dict(n_agents=3, obs_dim=10, n_users=3, hidden=8, head="branching", upload_phases=2)
    assert IQL(**kwargs, retry_slots=4, episode_length=5).retry is None  # its BSs score themselves
    old = VDN(**kwargs).state_dict()
    learner = VDN(**kwargs, retry_slots=4, episode_length=5)
    checkpoint = {"state_dict": dict(old)}
    learner.on_load_checkpoint(checkpoint)
    learner.load_state_dict(checkpoint["state_dict"])  # strict
    assert not learner.retry_offsets.any() and float(learner.retry_scale) == 5.0


def test_the_serve_fit_keeps_serving_every_covered_user_unless_the_learnt_terms_score_higher():
    scenario = Scenario(n_users=8, n_rbs=6, episode_length=5)
    env = DntEnv(scenario, Drift(scenario), n_envs=1, seed=0)
    validation = Evaluation(scenario, Drift(scenario), 8, 500)
    for seed in range(3):
        torch.manual_seed(seed)
        learner = VDN(n_agents=scenario.n_bs, obs_dim=env.obs_dim, n_users=scenario.n_users, hidden=8,
                      head="branching", user_dim=env.user_dim, association=env.layout(), upload_phases=2)
        learner.online.serve_covered.fill_(0.0)
        learnt = scores(learner, validation, learner.upload_offsets)[0]
        learner.online.serve_covered.fill_(1.0)
        covered = scores(learner, validation, learner.upload_offsets)[0]
        record = fit_serve_covered(learner, validation)
        assert record == {"serve_covered": bool(covered >= learnt), "validation_learnt": pytest.approx(learnt),
                          "validation_covered": pytest.approx(covered)}
        assert float(learner.online.serve_covered) == float(record["serve_covered"])
        assert float(learner.target.serve_covered) == 0.0  # the greedy policy's alone


def test_a_model_file_from_before_serve_covered_loads_with_the_learnt_serve_terms():
    kwargs = dict(n_agents=3, obs_dim=10, n_users=3, hidden=8, head="branching", upload_phases=2)
    state = VDN(**kwargs).state_dict()
    old = {k: v for k, v in state.items() if not k.endswith("serve_covered")}
    learner = VDN(**kwargs)
    learner.online.serve_covered.fill_(1.0)
    checkpoint = {"state_dict": old}
    learner.on_load_checkpoint(checkpoint)
    learner.load_state_dict(checkpoint["state_dict"])  # strict
    assert float(learner.online.serve_covered) == 0.0


def test_a_run_fits_its_upload_offsets_and_the_model_keeps_them(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(tmp_path, "marl.upload_offsets.episodes=8")
    report = fit_marl(cfg, algo="vdn", seed=0, enable_progress_bar=False)
    fitted = report["upload_offsets"]
    assert fitted["validation_after"] >= fitted["validation_before"]
    assert fitted["validation_seeds"] == [cfg.marl.upload_offsets.seed]
    curve = (tmp_path / "metrics/curves/marl_vdn_seed0.csv").read_text().splitlines()
    last = dict(zip(curve[0].split(","), curve[-1].split(",")))
    assert float(last["eval_team_reward"]) == pytest.approx(report["eval_team_reward"])
    loaded = VDN.load_from_checkpoint(tmp_path / "models/vdn_seed0.ckpt", weights_only=True)
    assert loaded.upload_offsets.tolist() == fitted["offsets"]
    slope = report["association_slope"]
    assert [c for c, _ in slope["validation"]] == list(cfg.marl.network.association_slopes)
    assert float(loaded.online.association.slope) == slope["slope"]
    assert float(loaded.online.serve_covered) == float(report["serve_covered"]["serve_covered"])
    evaluation = Evaluation(cfg.scenario, Drift(cfg.scenario), cfg.marl.evaluation.episodes,
                            cfg.marl.evaluation.seed, **cfg.env.observation_options())
    assert evaluation.run(loaded.greedy_policy())["team_reward"]["mean"] == \
        pytest.approx(report["eval_team_reward"])
    mlflow.set_tracking_uri(cfg.tracking.mlflow_uri)
    [run] = mlflow.search_runs(experiment_names=["dntsync-marl"], output_format="list")
    assert run.data.metrics["eval_team_reward"] == pytest.approx(report["eval_team_reward"])
    assert run.data.metrics["validation_reward_with_offsets"] == pytest.approx(fitted["validation_after"])
    assert run.data.metrics["association_slope"] == slope["slope"]
    assert run.data.metrics["serve_covered"] == float(report["serve_covered"]["serve_covered"])


def test_same_seed_same_result(tmp_path):
    reports, weights = [], []
    for name in ("a", "b"):
        cfg = tiny_config(tmp_path / name)
        reports.append(fit_marl(cfg, algo="vdn", seed=3, enable_progress_bar=False,
                                log_mlflow=False))
        weights.append(final_weights(tmp_path / name / "models/vdn_seed3.ckpt"))
    assert reports[0]["eval"] == reports[1]["eval"]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    other = fit_marl(tiny_config(tmp_path / "c"), algo="vdn", seed=4, enable_progress_bar=False,
                     log_mlflow=False, write_outputs=False)
    assert other["eval"] != reports[0]["eval"] or other["eval_team_reward"] is not None


class PowerCut(pl.Callback):
    """Kills a run at the start of epoch index `at` (after `at` epochs were checkpointed)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.at:
            raise RuntimeError("power cut")


def test_resume_continues_exactly_from_the_last_checkpoint(tmp_path):
    kwargs = dict(algo="iql", seed=1, enable_progress_bar=False, log_mlflow=False)
    straight = fit_marl(tiny_config(tmp_path / "straight", "marl.algorithm.epochs=4"), **kwargs)
    # interrupted after epoch 2 of 4, then the same command again
    with pytest.raises(RuntimeError, match="power cut"):
        fit_marl(tiny_config(tmp_path / "cut", "marl.algorithm.epochs=4"), callbacks=[PowerCut(2)], **kwargs)
    ckpt = torch.load(tmp_path / "cut/checkpoints/iql_seed1/last.ckpt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["EpisodeDataModule"]["replay"]["added"] == 2 * 4  # D = 4
    resumed = fit_marl(tiny_config(tmp_path / "cut", "marl.algorithm.epochs=4"), **kwargs)
    # trained for 2 epochs, then asked for 4 (a finished run extended)
    fit_marl(tiny_config(tmp_path / "extended", "marl.algorithm.epochs=2"), **kwargs)
    extended = fit_marl(tiny_config(tmp_path / "extended", "marl.algorithm.epochs=4"), **kwargs)
    curve = lambda d: (tmp_path / d / "metrics/curves/marl_iql_seed1.csv").read_text()  # noqa: E731
    straight_weights = final_weights(tmp_path / "straight/models/iql_seed1.ckpt")
    for name, report in (("cut", resumed), ("extended", extended)):
        assert report["resumed_from"].endswith("last.ckpt")
        assert curve(name) == curve("straight")  # the whole curve, epochs 1-4
        assert report["eval"] == straight["eval"]
        weights = final_weights(tmp_path / name / "models/iql_seed1.ckpt")
        assert all(torch.equal(weights[k], straight_weights[k]) for k in weights)
    # another configuration's checkpoint is not resumed
    other = fit_marl(tiny_config(tmp_path / "cut", "marl.algorithm.epochs=4", "marl.algorithm.lr=3e-4"),
                     **kwargs)
    assert other["resumed_from"] is None


def test_checkpoint_every_k_epochs_resumes_from_the_last_multiple(tmp_path):
    kwargs = dict(algo="vdn", seed=0, enable_progress_bar=False, log_mlflow=False)
    straight = fit_marl(tiny_config(tmp_path / "straight", "marl.algorithm.epochs=4"), **kwargs)
    with pytest.raises(RuntimeError, match="power cut"):  # cut after 3 epochs: saved after 2
        fit_marl(tiny_config(tmp_path / "cut", "marl.algorithm.epochs=4", "marl.outputs.checkpoint_every=2"),
                 callbacks=[PowerCut(3)], **kwargs)
    ckpt = torch.load(tmp_path / "cut/checkpoints/vdn_seed0/last.ckpt", weights_only=True)
    assert ckpt["epoch"] == 1  # 0-based: the second epoch was the last one written
    resumed = fit_marl(tiny_config(tmp_path / "cut", "marl.algorithm.epochs=4",
                                   "marl.outputs.checkpoint_every=2"), **kwargs)
    assert resumed["resumed_from"].endswith("last.ckpt") and resumed["eval"] == straight["eval"]


def test_greedy_evaluation_during_training_never_changes_the_training(tmp_path):
    kwargs = dict(algo="vdn", seed=2, enable_progress_bar=False, log_mlflow=False)
    often = fit_marl(tiny_config(tmp_path / "often", "marl.algorithm.epochs=3", "marl.evaluation.every=1"),
                     **kwargs)
    at_end = fit_marl(tiny_config(tmp_path / "end", "marl.algorithm.epochs=3", "marl.evaluation.every=3"),
                      **kwargs)
    assert often["eval"] == at_end["eval"]
    a = final_weights(tmp_path / "often/models/vdn_seed2.ckpt")
    b = final_weights(tmp_path / "end/models/vdn_seed2.ckpt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sweep_points_evaluate_at_the_end_unless_told(tmp_path):
    from dntsync.config import apply_overrides
    from dntsync.stages.common import point_config, sweep_points

    cfg = tiny_config(tmp_path, "marl.algorithm.epochs=7", "marl.evaluation.every=2")
    point = sweep_points(cfg, "fig4")[0]
    assert point_config(cfg, point).marl.evaluation.every == 7
    every3 = apply_overrides(cfg, ["sweeps.eval_every=3"])
    assert point_config(every3, point).marl.evaluation.every == 3


def test_cli_trains_every_seed_and_aggregates(tmp_path, monkeypatch):
    from dntsync.cli import main

    monkeypatch.chdir(tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({
        "scenario": TINY, "env": {"predictor": "hold-last"},
        "marl": {"algorithm": {"epochs": 1, "batches_per_epoch": 1, "batch_size": 2},
                 "network": {"hidden": 8, "head": "factorised"},
                 "collection": {"episodes_per_epoch": 2, "buffer_capacity": 4},
                 "evaluation": {"every": 1, "episodes": 2},
                 "outputs": {"model_dir": "models", "metrics_dir": "metrics"}, "seeds": [0, 1]},
        "tracking": {"mlflow_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}}))
    assert main(["train-marl", "--params", str(params), "--algo", "iql", "--no-progress"]) == 0
    summary = json.loads((tmp_path / "metrics/marl_iql.json").read_text())
    assert summary["seeds"] == [0, 1] and len(summary["eval_team_reward_per_seed"]) == 2
    assert summary["head"] == "factorised" and "ratio_to_oracle" in summary
    assert (tmp_path / "models/iql.ckpt").exists()
    # one seed with its outputs elsewhere: its headline file goes beside them, the same numbers
    assert main(["train-marl", "--params", str(params), "--algo", "iql", "--seed", "1", "--no-progress",
                 "--set", "marl.outputs.metrics_dir=elsewhere/metrics"]) == 0
    headline = json.loads((tmp_path / "elsewhere/summary/marl_iql_seed1.json").read_text())
    assert headline["team_reward"] == pytest.approx(summary["eval_team_reward_per_seed"][1], abs=1e-4)
    assert not (tmp_path / "metrics/summary").exists() and not (tmp_path / "summary").exists()
    assert (tmp_path / "metrics/curves/marl_iql_seed1.csv").exists()
    assert not list((tmp_path / "checkpoints").glob("*/last.ckpt"))  # finished: state deleted
    # Fig. 3 from what the stage wrote: a band over the two seeds, oracle and best heuristic
    from dntsync.plots import convergence_figure, read_curves, reference_lines

    csvs = [tmp_path / f"metrics/curves/marl_iql_seed{s}.csv" for s in (0, 1)]
    x, runs = read_curves(csvs, "eval_team_reward")
    assert list(x) == [1.0] and runs.shape == (2, 1)
    refs = reference_lines(summary["baselines"])
    assert set(refs) == {"myopic oracle", f"best heuristic: {summary['best_heuristic']}"}
    png = convergence_figure({"iql": csvs}, tmp_path / "metrics/marl_iql.json",
                             tmp_path / "figures/fig3.png")
    assert png.exists() and png.stat().st_size > 10_000


# ---------------------------------------------------------------------- sparse head updates
def test_clip_grad_norm_of_mixed_sparse_and_dense_gradients_matches_torch():
    from dntsync.marl.learners import clip_grad_norm

    torch.manual_seed(0)
    table, dense = torch.nn.Parameter(torch.randn(50, 4)), torch.nn.Parameter(torch.randn(7))
    rows = torch.tensor([3, 3, 9, 41])  # a repeated row: the sparse gradient is uncoalesced
    loss = (torch.nn.functional.embedding(rows, table, sparse=True) ** 2).sum() + (dense ** 3).sum()
    loss.backward()
    expected = [table.grad.to_dense().clone(), dense.grad.clone()]
    norm_torch = torch.nn.utils.clip_grad_norm_(expected, 0.5)  # on plain tensors as "grads"
    ref = [torch.nn.Parameter(torch.zeros_like(g)) for g in expected]
    for p, g in zip(ref, [table.grad.to_dense(), dense.grad.clone()]):
        p.grad = g
    norm_ref = torch.nn.utils.clip_grad_norm_(ref, 0.5)
    norm = clip_grad_norm([table, dense], 0.5)
    assert torch.allclose(norm, norm_ref) and norm_torch is not None
    np.testing.assert_allclose(table.grad.to_dense(), ref[0].grad, rtol=1e-6)
    np.testing.assert_allclose(dense.grad, ref[1].grad, rtol=1e-6)


def test_sparse_head_update_touches_only_sampled_rows_and_first_step_equals_adam(tmp_path):
    batch = episode_batch(Scenario(**TINY), n_episodes=3, seed=5)
    learners = []
    for sparse in (True, False):
        torch.manual_seed(0)
        learner = VDN(n_agents=3, obs_dim=batch.obs.shape[-1], n_users=3, hidden=8,
                      sparse_head=sparse, lr=1e-2)
        before = {k: v.clone() for k, v in learner.online.state_dict().items()}
        trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False,
                             default_root_dir=tmp_path)
        trainer.fit(learner, train_dataloaders=torch.utils.data.DataLoader(
            [batch], batch_size=None, collate_fn=lambda x: x))
        learners.append((learner, before))
    (sparse_l, before), (dense_l, _) = learners
    assert isinstance(sparse_l.optimizers(), list) and len(sparse_l.optimizers()) == 2
    for m, net in enumerate(sparse_l.online.agents):
        taken = torch.unique(batch.actions[..., m])
        untouched = torch.ones(net.head.weight.shape[0], dtype=torch.bool)
        untouched[taken] = False
        assert torch.equal(net.head.weight[untouched], before[f"agents.{m}.head.weight"][untouched])
        assert not torch.equal(net.head.weight[taken], before[f"agents.{m}.head.weight"][taken])
    # Adam's first step moves a zero-gradient row by 0, so lazy and dense Adam agree here
    # (up to rounding: a step of lr = 1e-2 is m/sqrt(v), sensitive in its last digits)
    for (k, a), b in zip(sparse_l.online.state_dict().items(), dense_l.online.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=5e-5, msg=lambda s: f"{k}: {s}")


@pytest.mark.parametrize("learner_cls", [VDN, IQL])
def test_reward_centering_regresses_on_the_reward_minus_its_running_mean(learner_cls):
    """`marl.algorithm.reward_centering` = beta: the TD target's reward less r-bar, which
    starts at the first minibatch's mean and moves by beta towards each later one (per agent
    for IQL's local rewards); every Q and next value as without it."""
    scenario = Scenario(**TINY)
    first, second = episode_batch(scenario, 3, seed=4), episode_batch(scenario, 3, seed=9)
    kwargs = dict(obs_dim=first.obs.shape[-1], n_users=scenario.n_users, hidden=16,
                  head="branching", target_update_epochs=0, user_dim=3)
    torch.manual_seed(0)
    plain = learner_cls(scenario.n_bs, **kwargs)
    torch.manual_seed(0)
    centred = learner_cls(scenario.n_bs, reward_centering=0.25, **kwargs)
    field = "team_reward" if learner_cls is VDN else "local_rewards"

    def shifted(batch, centre):
        return dataclasses.replace(batch, **{field: getattr(batch, field) - centre})

    dims = (0, 1)
    mean1 = getattr(first, field).mean(dim=dims)
    assert centred.td_loss(first).item() == pytest.approx(plain.td_loss(shifted(first, mean1)).item(), rel=1e-5)
    mean2 = getattr(second, field).mean(dim=dims)
    centre = mean1 + 0.25 * (mean2 - mean1)
    assert centred.td_loss(second).item() == pytest.approx(plain.td_loss(shifted(second, centre)).item(), rel=1e-5)
    assert torch.allclose(centred.reward_centre.reshape(centre.shape), centre)
    assert "reward_centre" in centred.state_dict() and "reward_centre" not in plain.state_dict()
