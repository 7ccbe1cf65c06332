"""The default learner learns: on scenarios that need no coordination between BSs, a short
VDN run of the default configuration gets close to the myopic oracle, and greedy play never
takes a masked action. These catch a broken learner (a sign error, a wrong mask, a target
that leaks) in seconds, before any sweep is run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dntsync.config import from_dict
from dntsync.env import is_valid
from dntsync.env.evaluate import rollout
from dntsync.marl.learners import LEARNERS
from dntsync.marl.training import fit_marl

torch.set_num_threads(1)

# Two layouts where no user is ever covered twice, the area (almost) all covered and uploads
# (almost) always succeed, so serving every covered user and uploading every slot is near
# the oracle and a learner needs no coordination: one BS alone; three BSs 100 m apart with
# radius 49 over a 40 m high strip.
ONE_BS = {"bs_positions": [[0.0, 0.0]], "area_x": [-40.0, 40.0], "area_y": [-40.0, 40.0],
          "cloud_position": [0.0, 10.0]}
APART = {"coverage_radius": 49.0, "area_x": [-140.0, 140.0], "area_y": [-20.0, 20.0]}


def short_run_config(tmp_path: Path, scenario: dict) -> object:
    """The default learner (every marl/env default), shrunk in size and budget only."""
    return from_dict({
        "scenario": {"n_users": 6, "n_rbs": 12, "data_per_user": 0.05, "episode_length": 10,
                     **scenario},
        "env": {"predictor": "hold-last"},
        "marl": {"algorithm": {"epochs": 20, "batches_per_epoch": 8, "batch_size": 8},
                 "network": {"hidden": 32},
                 "collection": {"episodes_per_epoch": 16, "buffer_capacity": 160,
                                "epsilon_decay_epochs": 10},
                 "evaluation": {"every": 20, "episodes": 16},
                 "outputs": {"model_dir": str(tmp_path / "models"),
                             "metrics_dir": str(tmp_path / "metrics"),
                             "checkpoint_dir": str(tmp_path / "checkpoints")}},
        "tracking": {"mlflow_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    })


@pytest.mark.parametrize("scenario", [ONE_BS, APART], ids=["one-bs", "no-overlap"])
def test_short_vdn_run_reaches_most_of_the_oracle_without_coordination(tmp_path, scenario):
    cfg = short_run_config(tmp_path, scenario)
    report = fit_marl(cfg, algo="vdn", seed=0, log_mlflow=False, enable_progress_bar=False)
    assert report["oracle_team_reward"] > 0
    assert report["ratio_to_oracle"] >= 0.9, report["ratio_to_oracle"]


def test_greedy_and_exploring_play_never_take_a_masked_action(tmp_path):
    from dntsync.env.predictors import HoldLast
    from dntsync.marl.training import build_data, build_learner

    cfg = short_run_config(tmp_path, {})  # the default three BSs, overlaps included
    data = build_data(cfg, HoldLast(), seed=0)
    learner = build_learner(cfg, "vdn", data.env)
    with torch.no_grad():  # a huge serve term for every user: the mask alone must stop it
        for net in learner.online.agents:
            net.head.user_out.bias.fill_(1e6)
    for policy in (learner.greedy_policy(),
                   learner.exploration_policy(0, np.random.default_rng(1))):
        episodes = rollout(data.env, policy, seed=3, record=True)
        assert is_valid(episodes.actions, episodes.covered).all()
        assert episodes.covered.any() and (~episodes.covered).any()  # masks did bite


def test_ablation_runs_from_the_paper_profile_to_the_default_learner():
    """scripts/ablation.py's row 0 is conf/profiles/paper.yaml's learner and its last row is
    the default configuration, so the table spans exactly the two reported learners."""
    import importlib.util

    from dntsync.config import apply_overrides, load_config, merge, read_yaml, to_plain

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("ablation", root / "scripts" / "ablation.py")
    ablation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ablation)
    default = load_config(root / "conf" / "params.yaml")
    params = read_yaml((root / "conf" / "params.yaml").read_text())
    paper = from_dict(merge(params, read_yaml((root / "conf/profiles/paper.yaml").read_text())))
    first = apply_overrides(default, ablation.row_overrides(0))
    last = apply_overrides(default, ablation.row_overrides(len(ablation.ROWS) - 1))
    assert to_plain(first) == to_plain(paper)
    assert to_plain(last) == to_plain(default)
    assert to_plain(first) != to_plain(default)
    for _, sets in ablation.LEAVE_ONE_OUT:  # each undoes a change the default has
        assert to_plain(apply_overrides(default, sets)) != to_plain(default)
    # and the learners `make run` leaves out, so that every learner has committed numbers
    assert set(ablation.OTHER_LEARNERS) == set(LEARNERS) - set(default.sweeps.fig3_algos)


def test_upload_value_splits_an_uploads_effect_into_its_slot_and_the_slots_after(tmp_path):
    """scripts/upload_value.py (docs/learners.md, "Why the BSs upload rarely at eps 0.5"): the
    discounted sums add up the per-slot changes, gamma 0 is the upload's own slot, and an
    upload never raises the DNT error of its slot (the change beyond the rate is >= 0)."""
    import importlib.util
    import json

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("upload_value", root / "scripts" / "upload_value.py")
    upload_value = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(upload_value)
    cfg = from_dict({"env": {"predictor": "hold-last"}, "scenario": {"eps": 0.5}})
    result = upload_value.upload_values(cfg, slots=[2, 6], n_episodes=8, seed=3, gammas=(0.0, 1.0))
    assert result["predictor"].startswith("hold-last") and len(result["rows"]) == 3 * 2
    for row in result["rows"]:
        assert row["discounted"]["0.0"] == pytest.approx(row["at_upload"])
        assert row["discounted"]["1.0"] == pytest.approx(row["at_upload"] + row["sum_after"])
        assert row["at_upload"] - row["rate_at_upload"] >= -1e-9  # the DNT part of its slot
        assert row["rate_at_upload"] < 0  # its RB and its interference cost rate
    periodic = result["periodic"]
    assert periodic["nearest-every-1"]["dnt_error"] < periodic["nearest-never"]["dnt_error"]
    assert periodic["nearest-every-1"]["sum_rate"] < periodic["nearest-never"]["sum_rate"]
    out = tmp_path / "values.json"
    assert upload_value.main(["--set", "env.predictor=hold-last", "--slots", "4", "--episodes", "2",
                              "--out", str(out)]) == 0
    assert [r["slot"] for r in json.loads(out.read_text())["rows"]] == [4, 4, 4]
    assert upload_value.main(["--slots", "30"]) == 2  # past the episode: refused before any work
