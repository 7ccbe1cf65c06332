"""`dntsync.marl.diagnose`: the serving profile and the two fixed reference policies."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dntsync.env import Drift
from dntsync.env.evaluate import Evaluation
from dntsync.marl import VDN
from dntsync.marl.diagnose import diagnose, middle_bs, reference_policies
from dntsync.network import Scenario

torch.set_num_threads(1)

SCENARIO = Scenario(n_users=5, n_rbs=5, episode_length=4)


def lazy_middle_learner(scenario: Scenario) -> VDN:
    """A factorised VDN whose greedy policy is, by construction, `outer-only`: every BS
    uploads, BSs 0 and 2 serve every covered user, BS 1 serves nobody."""
    learner = VDN(n_agents=scenario.n_bs, obs_dim=3 * scenario.n_users + 2,
                  n_users=scenario.n_users, hidden=8, head="factorised")
    with torch.no_grad():
        for m, net in enumerate(learner.online.agents):
            net.head.terms.weight.zero_()
            net.head.terms.bias.fill_(-1.0 if m == 1 else 1.0)  # serve terms' sign
            net.head.terms.bias[1] = 1.0  # the upload term: always upload
    return learner


def test_a_lazy_middle_learner_is_profiled_and_matches_outer_only():
    evaluation = Evaluation(SCENARIO, Drift(SCENARIO), 16, seed=500)
    result = diagnose(lazy_middle_learner(SCENARIO), evaluation)
    assert result["lazy_bs"] == 1 == middle_bs(SCENARIO.bs_positions)
    outer, middle, right = result["profile"]
    assert outer["upload"] == middle["upload"] == right["upload"] == 1.0
    assert outer["served_single"] == right["served_single"] == 1.0
    assert middle["served_single"] == middle["served_overlap"] == 0.0
    # the learner *is* the lazy reference policy, so their rewards agree to the last digit
    assert result["learner_team_reward"] == pytest.approx(result["reference"]["outer-only"], abs=1e-12)


def test_all_but_overlap_never_serves_a_user_twice_and_beats_outer_only_on_rate():
    evaluation = Evaluation(Scenario(), Drift(Scenario()), 16, seed=900)
    refs = reference_policies(evaluation, lazy_bs=1)
    assert refs["all-but-overlap"]["served_twice"]["mean"] == 0.0
    assert refs["outer-only"]["served_twice"]["mean"] == 0.0
    assert refs["all-but-overlap"]["sum_rate"]["mean"] > refs["outer-only"]["sum_rate"]["mean"]


def test_cli_prints_and_writes_the_diagnosis(tmp_path, capsys):
    from dntsync.cli import main
    from dntsync.marl.training import save_q_networks

    model = tmp_path / "vdn_seed0.ckpt"
    save_q_networks(lazy_middle_learner(SCENARIO), model, {"algo": "vdn", "seed": 0, "predictor": "drift"})
    out = tmp_path / "diag.json"
    sets = ["scenario.n_users=5", "scenario.n_rbs=5", "scenario.episode_length=4",
            "env.predictor=drift", "marl.evaluation.episodes=4", "env.user_features=[]"]
    code = main(["diagnose-learner", "--model", str(model), "--out", str(out),
                 *np.ravel([["--set", s] for s in sets]).tolist()])
    assert code == 0
    printed = capsys.readouterr().out
    assert "outer-only" in printed and "all-but-overlap" in printed
    data = json.loads(out.read_text())
    assert data["algo"] == "vdn" and len(data["profile"]) == 3
    # a model trained with another predictor than the one configured: said, not hidden
    other = tmp_path / "vdn_seed1.ckpt"
    save_q_networks(lazy_middle_learner(SCENARIO), other, {"algo": "vdn", "seed": 1, "predictor": "hold-last"})
    assert main(["diagnose-learner", "--model", str(other),
                 *np.ravel([["--set", s] for s in sets]).tolist()]) == 0
    assert "warning: " in capsys.readouterr().out
    assert main(["diagnose-learner", "--model", str(tmp_path / "missing.ckpt")]) == 2
    assert "does not exist" in capsys.readouterr().err
