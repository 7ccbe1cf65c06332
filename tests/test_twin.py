"""The GRU twin (eqs. 9-14): shapes, the loss by hand, training, checkpoints, env, CLI.

Everything runs on a tiny data set (U = 3, 60 trajectories of T = 10 slots, N^h = 16) made in
`tmp_path` by the real `make_dataset`.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch

from dntsync.config import from_dict
from dntsync.env import DntEnv, HoldLast, random_valid
from dntsync.network import ConfigError, Scenario
from dntsync.network.dataset import make_dataset
from dntsync.twin import GruPredictor, GruTwin, Scaler, TwinCheckpointError, save_twin, twin_loss
from dntsync.twin.model import gru_unrolled

torch.set_num_threads(1)
U, K, T = 3, 5, 10


def tiny_config(tmp_path: Path, **twin):
    return from_dict({
        "seed": 1,
        "scenario": {"n_users": U, "n_rbs": 3, "episode_length": T},
        "data": {"n_trajectories": 60, "path": str(tmp_path / "data" / "trajectories.npz")},
        "twin": {"window": K, "hidden": 16, "batch_size": 32, "lr": 1e-2, "max_epochs": 12,
                 "patience": 12, "self_feeding_max_steps": 4, "eval_horizon": 4,
                 "checkpoint": str(tmp_path / "models" / "twin.ckpt"),
                 "metrics": str(tmp_path / "metrics" / "twin.json"),
                 "figure": str(tmp_path / "figures" / "fig2.png"), **twin},
        "tracking": {"mlflow_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    })


def write_data(cfg) -> None:
    path = Path(cfg.data.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **make_dataset(cfg))


def tiny_net(n_users: int = U, window: int = K, seed: int = 0) -> GruTwin:
    torch.manual_seed(seed)
    net = GruTwin(n_users, window, hidden=16, num_layers=1,
                  scaler=Scaler.from_scenario(Scenario(n_users=n_users)))
    torch.nn.init.normal_(net.readout.weight, std=0.1)  # not the all-zero (hold-last) start
    return net.eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short training run shared by the tests that need a trained twin."""
    from dntsync.twin.training import fit_twin

    tmp_path = tmp_path_factory.mktemp("twin")
    cfg = tiny_config(tmp_path)
    write_data(cfg)
    result = fit_twin(cfg, enable_progress_bar=False, log_mlflow=False, write_outputs=False)
    return cfg, result


# ---------------------------------------------------------------------- model and loss
def test_output_shapes_and_hold_last_start():
    net = tiny_net()
    window = torch.rand(7, K, U, 2) * 20
    assert net(window).shape == (7, U, 2)
    fresh = GruTwin(U, K, 16, 2, Scaler.from_scenario(Scenario(n_users=U)))
    assert torch.equal(fresh(window), window[:, -1])  # zero read-out: hold-last


@pytest.mark.parametrize("num_layers", [1, 2])
def test_unrolled_equations_match_nn_gru(num_layers):
    # The inference path writes eqs. (9)-(12) out over nn.GRU's weights; training uses nn.GRU.
    torch.manual_seed(num_layers)
    gru = torch.nn.GRU(2 * U, 16, num_layers=num_layers, batch_first=True)
    x = torch.randn(6, K, 2 * U)
    assert torch.allclose(gru_unrolled(gru, x), gru(x)[1][-1], atol=1e-6)
    net = tiny_net()
    window = torch.rand(4, K, U, 2) * 40
    with torch.no_grad():
        unrolled = net(window)
    assert torch.allclose(unrolled, net(window).detach(), atol=1e-5)  # grad on: nn.GRU


def test_loss_is_eq_14_by_hand():
    s_hat = torch.tensor([[[1.0, 2.0], [0.0, 0.0], [3.0, -1.0]],
                          [[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]])
    s = torch.tensor([[[0.0, 2.0], [1.0, 1.0], [3.0, 1.0]],
                      [[0.0, 0.0], [0.0, 3.0], [0.0, 0.0]]])
    # sample 0: 1 + 0 + 1 + 1 + 0 + 4 = 7; sample 1: 9. J_G = ||.||^2 / (2U), batch mean.
    assert float(twin_loss(s_hat, s)) == pytest.approx((7 / 6 + 9 / 6) / 2)


def test_predictions_stay_in_the_area():
    net = tiny_net()
    with torch.no_grad():
        net.readout.bias.fill_(50.0)  # a step far out of the area
    corner = torch.tensor([150.0, 50.0]).expand(2, K, U, 2)
    assert torch.equal(net(corner), corner[:, -1])


def test_self_fed_windows_replace_trailing_statuses_by_predictions():
    net = tiny_net()
    context = torch.rand(2, K + 3, U, 2) * 10
    fed = torch.tensor([[0, 0, 0], [3, 1, 0]])
    out = net.self_fed_windows(context, fed)
    assert torch.equal(out[0], context[0, -K:])  # nothing fed: the true window
    with torch.no_grad():
        hist = context[1:].clone()
        for pos in range(K, K + 3):  # slots of the last three statuses
            pred = net(hist[:, pos - K:pos])
            users = [u for u in range(U) if fed[1, u] >= K + 3 - pos]
            hist[0, pos, users] = pred[0, users]
    assert torch.allclose(out[1], hist[0, -K:])
    assert torch.equal(out[1, :, 2], context[1, -K:, 2])  # user 2 synchronised throughout


# ---------------------------------------------------------------------- training
def test_training_lowers_the_loss_and_beats_hold_last(trained):
    from dntsync.twin.data import load_trajectories
    from dntsync.twin.evaluation import one_step_mse
    from dntsync.twin.training import build_module

    cfg, result = trained
    data = load_trajectories(cfg)
    val = data.positions["val"]
    untrained = GruPredictor(build_module(cfg).net)  # zero read-out = hold-last
    twin = GruPredictor(result["module"].net)
    assert one_step_mse(twin, val, K).mean() < one_step_mse(untrained, val, K).mean()
    test = data.positions["test"]
    assert one_step_mse(twin, test, K).mean() < one_step_mse(HoldLast(), test, K).mean()
    assert result["val_loss"] == pytest.approx(one_step_mse(twin, val, K).mean(), rel=1e-4)


def test_training_is_reproducible(tmp_path):
    from dntsync.twin.training import fit_twin

    cfg = tiny_config(tmp_path, max_epochs=1)
    write_data(cfg)
    runs = [fit_twin(cfg, enable_progress_bar=False, log_mlflow=False, write_outputs=False)
            for _ in range(2)]
    assert runs[0]["val_loss"] == runs[1]["val_loss"]
    for a, b in zip(runs[0]["module"].parameters(), runs[1]["module"].parameters()):
        assert torch.equal(a, b)


def test_data_file_checks_fail_with_the_fix(tmp_path):
    from dntsync.twin.data import load_trajectories

    cfg = tiny_config(tmp_path)
    with pytest.raises(ConfigError, match="does not exist.*dntsync generate"):
        load_trajectories(cfg)
    write_data(cfg)
    other_u = from_dict({**cfg.to_dict(), "scenario": {**cfg.scenario.to_dict(), "n_users": 4}})
    with pytest.raises(ConfigError, match="U = 3 users but scenario.n_users = 4.*dntsync generate"):
        load_trajectories(other_u)
    other_seed = from_dict({**cfg.to_dict(), "scenario": {**cfg.scenario.to_dict(), "seed": 9}})
    with pytest.raises(ConfigError, match="config_hash.*dntsync generate"):
        load_trajectories(other_seed)


# ---------------------------------------------------------------------- checkpoints
def test_save_load_round_trip_gives_identical_predictions(tmp_path):
    net = tiny_net()
    path = save_twin(tmp_path / "twin.ckpt", net, Scenario(n_users=U))
    loaded = GruPredictor.load(path, scenario=Scenario(n_users=U), window=K)
    history = np.random.default_rng(0).uniform(-50, 50, (9, K, U, 2))
    assert np.array_equal(loaded.predict(history), GruPredictor(net).predict(history))
    assert loaded.name == "gru" and loaded.window == K


def test_load_uses_weights_only(tmp_path, monkeypatch):
    path = save_twin(tmp_path / "twin.ckpt", tiny_net(), Scenario(n_users=U))
    seen = []
    real_load = torch.load

    def spy(*args, **kwargs):
        seen.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    GruPredictor.load(path)
    assert seen == [True]


class _Payload:  # an arbitrary pickled object: only a full unpickler could rebuild it
    pass


def test_pickled_objects_and_corrupt_files_are_rejected(tmp_path):
    pickled = tmp_path / "pickled.ckpt"
    torch.save({"format": "dntsync-twin", "obj": _Payload()}, pickled)
    with pytest.raises(TwinCheckpointError, match="corrupt or not a plain tensor dict.*train-twin"):
        GruPredictor.load(pickled)
    good = save_twin(tmp_path / "twin.ckpt", tiny_net(), Scenario(n_users=U))
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(good.read_bytes()[:200])
    with pytest.raises(TwinCheckpointError, match="corrupt.*dntsync train-twin"):
        GruPredictor.load(corrupt)
    with pytest.raises(TwinCheckpointError, match="does not exist.*dntsync train-twin"):
        GruPredictor.load(tmp_path / "missing.ckpt")


def test_mismatched_checkpoints_name_both_values(tmp_path):
    path = save_twin(tmp_path / "twin.ckpt", tiny_net(), Scenario(n_users=U))
    with pytest.raises(TwinCheckpointError,
                       match="U = 3 users but the scenario has U = 4.*train-twin"):
        GruPredictor.load(path, scenario=Scenario(n_users=4))
    with pytest.raises(TwinCheckpointError,
                       match="K = 5 statuses but K = 3 was requested.*train-twin"):
        GruPredictor.load(path, window=3)
    with pytest.raises(TwinCheckpointError, match="scenario.seed = 0 in the checkpoint, 2 here"):
        GruPredictor.load(path, scenario=Scenario(n_users=U, seed=2))


# ---------------------------------------------------------------------- environment
def test_gru_predictor_plugs_into_the_env():
    scenario = Scenario(n_users=U, n_rbs=3, episode_length=4)
    predictor = GruPredictor(tiny_net())
    env = DntEnv(scenario, predictor, n_envs=4, seed=0)
    rng = np.random.default_rng(0)
    _, covered = env.reset()
    for _ in range(scenario.episode_length):
        res = env.step(random_valid(covered, rng))
        covered = res.covered
        assert np.all(np.isfinite(res.team_reward))
    assert res.done
    assert env.state.prediction.shape == (4, U, 2)


# ---------------------------------------------------------------------- CLI end to end
def test_cli_train_twin_end_to_end(tmp_path, monkeypatch):
    from dntsync.cli import main

    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(tmp_path, max_epochs=3)
    write_data(cfg)
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps(cfg.to_dict()))  # JSON is YAML
    assert main(["train-twin", "--params", str(params), "--no-progress"]) == 0

    assert GruPredictor.load(cfg.twin.checkpoint, scenario=cfg.scenario).window == K
    report = json.loads(Path(cfg.twin.metrics).read_text())
    assert set(report["targets_met"]) == {"one_step", "multi_step"}
    assert len(report["one_step"]["per_user"]["twin_ratio"]) == U
    assert report["multi_step"]["h"] == [1, 2, 3, 4]
    assert Path(cfg.twin.figure).stat().st_size > 0
    assert Path(cfg.twin.figure).with_suffix(".csv").read_text().startswith("user,t,x_true")
    with sqlite3.connect(tmp_path / "mlflow.db") as db:  # one run: params, curves, test metrics
        names = {r[0] for r in db.execute("select distinct key from metrics")}
        status = db.execute("select status from runs").fetchall()
    assert {"train_loss", "val_loss", "test_twin_ratio"} <= names
    assert status == [("FINISHED",)]


def test_cli_train_twin_without_data_fails_before_any_work(tmp_path, monkeypatch, capsys):
    from dntsync.cli import main

    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps(cfg.to_dict()))
    assert main(["train-twin", "--params", str(params), "--no-progress"]) == 2
    assert "run `dntsync generate` first" in capsys.readouterr().err
    assert not Path(cfg.twin.checkpoint).exists()
    assert not (tmp_path / "mlflow.db").exists()


def test_a_missing_twin_falls_back_or_fails_as_configured(tmp_path):
    """`env.predictor_fallback`: a missing `env.twin_checkpoint` gives the named physics
    predictor, said in the run's description, or ("none") fails before any work."""
    from dntsync.config import load_config
    from dntsync.env.predictors import Drift, HoldLast
    from dntsync.errors import UserError
    from dntsync.twin.predictor import build_predictor

    missing = f"env.twin_checkpoint={tmp_path / 'none.ckpt'}"
    predictor, description = build_predictor(load_config(None, [missing]))
    assert isinstance(predictor, HoldLast) and description.startswith("hold-last (no twin at")
    predictor, _ = build_predictor(load_config(None, [missing, "env.predictor_fallback=drift"]))
    assert isinstance(predictor, Drift)
    with pytest.raises(UserError, match="env.twin_checkpoint"):
        build_predictor(load_config(None, [missing, "env.predictor_fallback=none"]))
