"""Faults and bad input: no code runs from a file, a failed write keeps the last good file,
non-finite numbers are refused, a corrupt resume state or a killed run is recovered, and
every user error is one line (exit 2) instead of a traceback."""

from __future__ import annotations

import errno
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_marl import PowerCut, tiny_config

from dntsync.cli import main
from dntsync.config import ConfigError, from_dict, load_config
from dntsync.errors import RunError, UserError
from dntsync.files import atomic_path, write_text
from dntsync.marl.training import fit_marl, load_q_networks, save_q_networks
from dntsync.network import Scenario
from dntsync.twin.checkpoint import TwinCheckpointError, load_twin, save_twin
from dntsync.twin.model import GruTwin, Scaler


class _Payload:
    """Unpickling this creates a file: what a crafted checkpoint would do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def crafted(path: Path, marker: Path, **plain) -> Path:
    torch.save({**plain, "dntsync": _Payload(str(marker)), "state_dict": _Payload(str(marker))}, path)
    return path


def one_line_error(capsys, code: int, expected: int = 2) -> str:
    """The command's stderr: one line, no traceback, and its exit status."""
    err = capsys.readouterr().err.strip()
    assert code == expected, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def tiny_twin(scenario: Scenario) -> GruTwin:
    torch.manual_seed(0)
    return GruTwin(scenario.n_users, 2, 4, 1, Scaler.from_scenario(scenario))


# ---------------------------------------------------------------------- 1. no code from a file
def test_no_loader_runs_code_from_a_crafted_file(tmp_path, capsys):
    marker = tmp_path / "ran"
    bad = crafted(tmp_path / "crafted.ckpt", marker, format="dntsync-twin")
    with pytest.raises(TwinCheckpointError):
        load_twin(bad)
    with pytest.raises(UserError):
        load_q_networks(bad)
    one_line_error(capsys, main(["diagnose-learner", "--model", str(bad)]))
    # the resume state: a crafted last.ckpt beside a matching run.json is set aside, not run
    cfg = tiny_config(tmp_path)
    fit_marl(cfg, algo="vdn", seed=0, enable_progress_bar=False, log_mlflow=False)
    crafted(tmp_path / "checkpoints/vdn_seed0/last.ckpt", marker)
    report = fit_marl(cfg, algo="vdn", seed=0, enable_progress_bar=False, log_mlflow=False)
    assert report["resumed_from"] is None
    # the data set: an object array would need pickle, which the loader refuses
    np.savez(tmp_path / "data.npz", positions=np.array([_Payload(str(marker))], dtype=object))
    data_cfg = from_dict({"data": {"path": str(tmp_path / "data.npz")}})
    from dntsync.twin.data import load_trajectories

    with pytest.raises(ConfigError, match="corrupt"):
        load_trajectories(data_cfg)
    assert not marker.exists()


# ---------------------------------------------------------------------- 2. concurrent first use
STORE_USER = """
import sys
from dntsync.config import from_dict
from dntsync.tracking import mlflow_run
cfg = from_dict({"tracking": {"mlflow_uri": sys.argv[1]}})
with mlflow_run(cfg, "marl", run_name=sys.argv[2]) as run:
    pass
"""


def test_concurrent_first_use_of_the_tracking_store_is_safe(tmp_path):
    import mlflow

    for attempt in range(3):
        uri = f"sqlite:///{tmp_path / f'try{attempt}' / 'mlflow.db'}"
        procs = [subprocess.Popen([sys.executable, "-c", STORE_USER, uri, f"run{i}"],
                                  stderr=subprocess.PIPE, text=True) for i in range(3)]
        errors = [p.communicate(timeout=300)[1] for p in procs]
        assert all(p.returncode == 0 for p in procs), errors
        mlflow.set_tracking_uri(uri)
        runs = mlflow.search_runs(experiment_names=["dntsync-marl"], output_format="list")
        assert sorted(r.info.run_name for r in runs) == ["run0", "run1", "run2"]


# ---------------------------------------------------------------------- 3. failed writes
def write_half(target, data: bytes) -> None:
    """Write half of `data` to `target` (a path or a file), then fail as a full disk does."""
    if hasattr(target, "write"):
        target.write(data[:len(data) // 2])
    else:
        Path(target).write_bytes(data[:len(data) // 2])
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failed_write_keeps_the_last_good_file(tmp_path, small_params, monkeypatch):
    with pytest.raises(OSError), atomic_path(tmp_path / "a.txt") as tmp:
        tmp.write_text("partial")
        raise OSError(errno.ENOSPC, "full")
    assert not (tmp_path / "a.txt").exists() and not list(tmp_path.glob(".a.txt*"))
    write_text(tmp_path / "a.txt", "good")
    # the data set (`dntsync generate`)
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "--params", str(small_params)]) == 0
    data = tmp_path / "data.npz"
    good = data.read_bytes()
    real_savez, real_save = np.savez_compressed, torch.save

    def savez_half(file, **arrays):
        buffer = io.BytesIO()
        real_savez(buffer, **arrays)
        write_half(file, buffer.getvalue())

    def save_half(obj, file, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        write_half(file, buffer.getvalue())

    monkeypatch.setattr(np, "savez_compressed", savez_half)
    assert main(["generate", "--params", str(small_params), "--set", "seed=4"]) == 1
    assert data.read_bytes() == good
    # the twin checkpoint
    scenario = Scenario(n_users=4)
    save_twin(tmp_path / "twin.ckpt", tiny_twin(scenario), scenario)
    monkeypatch.setattr(torch, "save", save_half)
    with pytest.raises(OSError):
        save_twin(tmp_path / "twin.ckpt", tiny_twin(scenario), scenario)
    load_twin(tmp_path / "twin.ckpt", scenario)  # still the good one
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


# ---------------------------------------------------------------------- 4. finite numbers
@pytest.mark.parametrize("override", [
    "scenario.rho=-.inf", "scenario.coverage_radius=.inf", "scenario.cloud_position=[.nan,.nan]",
    "scenario.area_x=[-.inf,.inf]", "twin.min_delta=.inf", "marl.algorithm.lr=.nan", "marl.algorithm.grad_clip=.inf",
    "scenario.bs_positions=[[.nan,0.0]]", "sweeps.fig4.values=[0.1,.nan]",
])
def test_non_finite_values_are_refused_naming_the_key(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=key.split(".")[-1]):
        load_config(None, [override])


def test_a_data_set_with_nan_positions_trains_nothing(tmp_path, small_params, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "--params", str(small_params)]) == 0
    with np.load(tmp_path / "data.npz") as f:
        arrays = {k: f[k] for k in f.files}
    arrays["positions"][0, 3, 1] = np.nan
    np.savez_compressed(tmp_path / "data.npz", **arrays)
    err = one_line_error(capsys, main(["train-twin", "--params", str(small_params)]))
    assert "non-finite" in err and "data.npz" in err
    assert not (tmp_path / "models/twin.ckpt").exists()


def test_a_non_finite_loss_stops_training_and_writes_no_model(tmp_path, monkeypatch):
    from dntsync.marl.learners import QLearner

    monkeypatch.setattr(QLearner, "td_loss",
                        lambda self, batch: torch.tensor(float("nan"), requires_grad=True))
    cfg = tiny_config(tmp_path)
    with pytest.raises(RunError, match="non-finite|nan"):
        fit_marl(cfg, algo="vdn", seed=0, enable_progress_bar=False, log_mlflow=False)
    assert not (tmp_path / "models/vdn_seed0.ckpt").exists()


# ---------------------------------------------------------------------- 5. corrupt resume state
@pytest.mark.parametrize("bad", ["last.ckpt", "run.json"])
def test_a_corrupt_resume_state_is_set_aside_and_the_run_starts_afresh(tmp_path, bad, capsys):
    kwargs = dict(algo="iql", seed=1, enable_progress_bar=False, log_mlflow=False)
    cfg = tiny_config(tmp_path, "marl.algorithm.epochs=3")
    with pytest.raises(RuntimeError, match="power cut"):
        fit_marl(cfg, callbacks=[PowerCut(2)], **kwargs)
    state = tmp_path / "checkpoints/iql_seed1"
    (state / bad).write_bytes((state / bad).read_bytes()[:50])  # truncated
    straight = fit_marl(tiny_config(tmp_path / "straight", "marl.algorithm.epochs=3"), **kwargs)
    report = fit_marl(cfg, **kwargs)
    assert report["resumed_from"] is None and report["eval"] == straight["eval"]
    err = capsys.readouterr().err
    assert f"{bad} is unreadable" in err and "kept aside" in err
    assert len(list((tmp_path / "checkpoints").glob("iql_seed1.bad-*"))) == 1


# ---------------------------------------------------------------------- 6. one line per user error
@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("args, says", [
    (["--set", "marl.seeds=[1,"], "not valid YAML"),
    (["--params", "list.yaml"], "not a mapping"),
    (["--params", "dupe.yaml"], "given twice"),
    (["--config", "string.yaml"], "not a mapping"),
    (["--config", "binary.yaml"], "cannot be read as text"),
    (["--config", "."], "is not a file"),
    (["--params", "broken.yaml"], "broken.yaml: not valid YAML (line 3"),
    (["--set", "sweeps.fig4.key=scenario.nope"], "scenario.nope"),
    (["--set", "sweeps.fig5.fixed=[marl.nope=1]"], "marl.nope"),
    (["--set", "sweeps.fig4.values=[abc]"], "sweeps.fig4.values"),
])
def test_bad_config_input_is_one_line(workdir, capsys, args, says):
    (workdir / "conf").mkdir()
    (workdir / "conf/params.yaml").write_text("seed: 0\n")
    (workdir / "list.yaml").write_text("- 1\n- 2\n")
    (workdir / "dupe.yaml").write_text("marl:\n  lr: 0.1\nmarl:\n  lr: 0.2\n")
    (workdir / "string.yaml").write_text("just words\n")
    (workdir / "binary.yaml").write_bytes(bytes(range(256)))
    (workdir / "broken.yaml").write_text("marl:\n  lr: [1\n")
    err = one_line_error(capsys, main(["show-config", *args]))
    assert says in err


def test_bad_files_are_one_line(workdir, capsys, small_params):
    scenario = Scenario(n_users=4, n_rbs=3, episode_length=6)
    sets = ["--params", str(small_params)]
    # data sets: truncated, empty, missing an array
    assert main(["generate", *sets]) == 0
    good = (workdir / "data.npz").read_bytes()
    for content, says in ((good[:100], "corrupt"), (b"", "corrupt")):
        (workdir / "data.npz").write_bytes(content)
        assert says in one_line_error(capsys, main(["train-twin", *sets]))
    with np.load(_write(workdir / "good.npz", good)) as f:
        arrays = {k: f[k] for k in f.files if k != "move_probs"}
    np.savez(workdir / "data.npz", **arrays)
    assert "move_probs" in one_line_error(capsys, main(["train-twin", *sets]))
    # models for diagnose-learner: corrupt, a twin checkpoint, another U
    (workdir / "bad.ckpt").write_bytes(b"not a model")
    save_twin(workdir / "twin.ckpt", tiny_twin(scenario), scenario)
    from dntsync.marl import VDN

    other_u = VDN(n_agents=3, obs_dim=4 * 6 + 2, n_users=6, hidden=8)
    save_q_networks(other_u, workdir / "u6.ckpt", {"algo": "vdn", "seed": 0, "predictor": "drift"})
    for model, says in (("bad.ckpt", "corrupt"), ("twin.ckpt", "twin checkpoint"),
                        ("u6.ckpt", "n_users = 6")):
        assert says in one_line_error(capsys, main(["diagnose-learner", "--model", model, *sets]))
    # a twin checkpoint that does not fit, inside train-marl
    save_twin(workdir / "twin.ckpt", tiny_twin(Scenario(n_users=6)), Scenario(n_users=6))
    err = one_line_error(capsys, main(["train-marl", *sets, "--set", "env.predictor=gru",
                                       "--set", "env.twin_checkpoint=twin.ckpt"]))
    assert "U = 6" in err


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------------- 8. a killed run in MLflow
def test_a_resumed_run_continues_its_mlflow_run_with_the_whole_curve(tmp_path):
    import mlflow

    kwargs = dict(algo="vdn", seed=0, enable_progress_bar=False)
    cfg = tiny_config(tmp_path, "marl.algorithm.epochs=4")
    with pytest.raises(RuntimeError, match="power cut"):
        fit_marl(cfg, callbacks=[PowerCut(2)], **kwargs)
    fit_marl(cfg, **kwargs)
    mlflow.set_tracking_uri(cfg.tracking.mlflow_uri)
    runs = mlflow.search_runs(experiment_names=["dntsync-marl"], output_format="list")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    history = mlflow.MlflowClient().get_metric_history(runs[0].info.run_id, "train_reward")
    assert sorted({m.step for m in history}) == [1, 2, 3, 4]
    # a state that is not resumed (another config) ends the old run if it was still running
    with pytest.raises(RuntimeError, match="power cut"):
        fit_marl(cfg, callbacks=[PowerCut(1)], **{**kwargs, "seed": 1})
    state = json.loads((tmp_path / "checkpoints/vdn_seed1/mlflow_run.json").read_text())
    mlflow.MlflowClient().update_run(state["run_id"], status="RUNNING")  # as after a SIGKILL
    fit_marl(tiny_config(tmp_path, "marl.algorithm.epochs=4", "marl.algorithm.lr=3e-4"),
             **{**kwargs, "seed": 1})
    assert mlflow.get_run(state["run_id"]).info.status == "KILLED"


# ---------------------------------------------------------------------- 9. small
def test_empty_or_missing_params_are_said_and_numbers_parse_alike(workdir, capsys):
    assert main(["show-config"]) == 0
    assert "built-in defaults" in capsys.readouterr().err
    (workdir / "conf").mkdir()
    (workdir / "conf/params.yaml").write_text("")
    assert main(["show-config"]) == 0
    assert "is empty" in capsys.readouterr().err
    from dntsync.tuning.space import load_space

    (workdir / "space.yaml").write_text("marl:\n  lr:\n    key: marl.algorithm.lr\n    type: float\n"
                                        "    low: 1e-5\n    high: 1e-2\n    log: true\n")
    (knob,) = load_space(workdir / "space.yaml", from_dict({}), "marl")
    assert knob.low == 1e-5
