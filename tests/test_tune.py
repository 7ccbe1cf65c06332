"""`dntsync tune`: real Optuna studies over the real trainers on tiny configs (docs/tuning.md).

Covers: a bad search space fails before any work; a study completes, writes its best
parameters (a valid `--config` overlay) and figures, logs nested MLflow runs, and resumes
without repeating finished trials; pruned and failed trials are recorded and the study goes
on; a trial interrupted by Ctrl-C or by a killed worker is run again on resume; two worker
processes share one study on a real PostgreSQL server (`scripts/postgres.sh`).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pytest
from optuna.trial import TrialState
from sqlalchemy.exc import SQLAlchemyError

from dntsync.cli import main
from dntsync.config import ConfigError, load_config
from dntsync.network.dataset import make_dataset
from dntsync.tracking import experiment_name
from dntsync.tuning import load_space, run_study
from dntsync.tuning.study import database_url, progress

REPO_ROOT = Path(__file__).resolve().parents[1]
SPACE = REPO_ROOT / "conf" / "search_space.yaml"
PG_FIX = ("Fix: run `scripts/postgres.sh` as root (it installs Debian's postgresql with apt, "
          "starts it on 127.0.0.1 and prints its URL) and export DNTSYNC_TEST_PG_URL=<that "
          "URL>, or set DNTSYNC_TEST_PG_URL to any PostgreSQL database the tests may write to.")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny networks on a small shared machine: threads only contend (4x slower with 2)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory) -> str:
    """One MLflow database for the module, created once (its schema takes seconds to build,
    and two workers must not race to build it); each test has its own experiment prefix."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    mlflow.search_experiments()  # creates the schema
    return uri


def write_params(tmp_path: Path, objective: str, mlflow_uri: str) -> Path:
    """A tiny parameter file: 3 users, 10-slot episodes, a 16-unit twin, 4 MARL epochs;
    every output (study database, best parameters, figures) under `tmp_path`, MLflow runs
    in experiments of a prefix of this test's own."""
    path = tmp_path / "params.yaml"
    path.write_text(f"""
seed: 1
scenario: {{n_users: 3, episode_length: 10}}
data: {{n_trajectories: 60, path: {tmp_path}/data.npz}}
env: {{predictor: drift}}
twin: {{hidden: 16, max_epochs: 3}}
marl: {{algorithm: {{epochs: 4, batches_per_epoch: 2, batch_size: 4}}, network: {{hidden: 16}},
        collection: {{episodes_per_epoch: 4, buffer_capacity: 16}}, evaluation: {{every: 2, episodes: 4}}}}
tracking: {{mlflow_uri: "{mlflow_uri}", experiment_prefix: t{uuid.uuid4().hex[:10]}}}
tune:
  objective: {objective}
  search_space: {SPACE}
  storage: "sqlite:///{tmp_path}/optuna/studies.db"
  output_dir: {tmp_path}/tuned
  figures_dir: {tmp_path}/figures
  n_trials: 2
""")
    return path


@pytest.fixture
def twin_params(tmp_path: Path, mlflow_uri: str) -> Path:
    path = write_params(tmp_path, "twin", mlflow_uri)
    cfg = load_config(path)
    np.savez_compressed(cfg.data.path, **make_dataset(cfg))
    return path


@pytest.fixture
def marl_params(tmp_path: Path, mlflow_uri: str) -> Path:
    return write_params(tmp_path, "marl", mlflow_uri)


def tune_runs(cfg) -> list:
    """The MLflow runs of this test's `tune` experiment."""
    mlflow.set_tracking_uri(cfg.tracking.mlflow_uri)
    return mlflow.search_runs(experiment_names=[experiment_name(cfg, "tune")], output_format="list")


def worker_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}  # as one_torch_thread, in a subprocess


def load(params: Path, *overrides: str):
    return load_config(params, list(overrides))


def trials_of(cfg, name: str | None = None) -> list[optuna.trial.FrozenTrial]:
    from dntsync.tuning import study_name

    study = optuna.load_study(study_name=name or study_name(cfg),
                              storage=database_url(cfg.tune.storage))
    return study.get_trials(deepcopy=False)


def tune_command(params: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "dntsync.cli", "tune", "--params", str(params), *args]


# ---------------------------------------------------------------------- search space
BAD_SPACES = {
    "low > high": ("twin:\n  lambda_G: {key: twin.lr, type: float, low: 1.0e-2, high: 1.0e-3}\n",
                   r"twin\.lambda_G: low = 0\.01 > high = 0\.001"),
    "unknown knob": ("twin:\n  lambda_G: {key: twin.learning_rate, type: float, low: 1.0e-4, high: 1.0e-2}\n",
                     r"unknown config key 'twin\.learning_rate'"),
    "log with low <= 0": ("twin:\n  lambda_G: {key: twin.lr, type: float, low: 0.0, high: 1.0e-2, log: true}\n",
                          r"log scale needs low > 0"),
    "range the config refuses": ("marl:\n  gamma: {key: marl.algorithm.gamma, type: float, low: 0.0, high: 1.0}\n"
                                 "twin:\n  h: {key: twin.hidden, type: int, low: 8, high: 64}\n",
                                 r"marl\.gamma: the value 1\.0 fails the config check: .*gamma < 1"),
    "float knob on an integer key": ("twin:\n  h: {key: twin.hidden, type: float, low: 8, high: 64}\n",
                                     r"twin\.hidden is an integer"),
    "unknown field": ("twin:\n  h: {key: twin.hidden, type: int, low: 8, high: 64, scale: log}\n",
                      r"unknown field\(s\) \['scale'\]"),
    "unknown objective": ("critic:\n  h: {key: twin.hidden, type: int, low: 8, high: 64}\n",
                          r"unknown objective 'critic'"),
    "no knobs for the objective": ("marl:\n  gamma: {key: marl.algorithm.gamma, type: float, low: 0.0, high: 0.9}\n",
                                   r"no knobs for objective 'twin'"),
    "categorical without choices": ("twin:\n  h: {key: twin.hidden, type: categorical, choices: []}\n",
                                    r"need a non-empty list `choices`"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPACES))
def test_bad_search_space_fails_before_any_work(case, twin_params, tmp_path):
    text, message = BAD_SPACES[case]
    space = tmp_path / "space.yaml"
    space.write_text(text)
    cfg = load(twin_params, f"tune.search_space={space}")
    with pytest.raises(ConfigError, match=message):
        run_study(cfg)
    assert not (tmp_path / "optuna").exists()  # no study storage opened
    mlflow.set_tracking_uri(cfg.tracking.mlflow_uri)
    assert mlflow.get_experiment_by_name(experiment_name(cfg, "tune")) is None  # no run started


def test_bad_search_space_on_the_command_line(twin_params, tmp_path, capsys):
    space = tmp_path / "space.yaml"
    space.write_text(BAD_SPACES["low > high"][0])
    assert main(["tune", "--params", str(twin_params), "--search-space", str(space)]) == 2
    assert "low = 0.01 > high = 0.001" in capsys.readouterr().err


def test_shipped_search_space_is_valid(twin_params):
    cfg = load(twin_params)
    marl = {k.key for k in load_space(SPACE, cfg, "marl")}
    twin = {k.key for k in load_space(SPACE, cfg, "twin")}
    assert marl == {"marl.algorithm.gamma", "marl.algorithm.lr", "marl.network.hidden"}
    assert twin == {"twin.lr", "twin.hidden"}


# ---------------------------------------------------------------------- a study, resumed
def test_study_completes_resumes_and_reports(twin_params, tmp_path):
    first = run_study(load(twin_params, "tune.n_trials=1"))
    assert first.new_trials == [0] and first.counts["complete"] == 1
    assert [p.name for p in first.figures] == ["twin-history.png"]
    assert any("importances need >= 2 complete trials" in n for n in first.notes)

    second = run_study(load(twin_params, "tune.n_trials=3"))  # resumed: only the missing two
    assert second.new_trials == [1, 2]
    third = run_study(load(twin_params, "tune.n_trials=3"))  # nothing missing: nothing runs
    assert third.new_trials == []
    trials = trials_of(load(twin_params))
    assert [t.number for t in trials] == [0, 1, 2]
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert len({(t.params["lambda_G"], t.params["hidden_G"]) for t in trials}) == 3

    # the best parameters: a config overlay any command accepts, with the DVC equivalent
    assert second.best_params_path == tmp_path / "tuned" / "twin.yaml"
    text = second.best_params_path.read_text()
    assert re.search(r"# DVC:  dvc exp run -S conf/params\.yaml:twin\.lr=\S+ "
                     r"-S conf/params\.yaml:twin\.hidden=\d+", text)
    best = min(trials, key=lambda t: t.value)
    tuned = load_config(twin_params, extra_files=[second.best_params_path])
    assert (tuned.twin.lr, tuned.twin.hidden) == (best.params["lambda_G"], best.params["hidden_G"])
    assert {p.name for p in second.figures} == {"twin-history.png", "twin-importances.png"}
    assert all(p.stat().st_size > 0 for p in second.figures)

    # MLflow: one run per call, each trial a run nested under the call that ran it
    runs = tune_runs(load(twin_params))
    studies = {r.info.run_id: r for r in runs if "trial" not in r.data.tags}
    trial_runs = [r for r in runs if "trial" in r.data.tags]
    assert len(studies) == 3 and len(trial_runs) == 3
    for run in trial_runs:
        assert run.data.tags["mlflow.parentRunId"] in studies
        assert run.data.tags["optuna_state"] == "COMPLETE"
        assert {"twin.lr", "twin.hidden"} <= set(run.data.params)
        assert "objective" in run.data.metrics
        curve = mlflow.MlflowClient().get_metric_history(run.info.run_id, "val_loss")
        assert [m.step for m in curve] == [0, 1, 2]
    second_run = next(r for r in studies.values()
                      if r.data.metrics.get("n_complete") == 3.0 and "best_val_loss" in r.data.metrics)
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(second_run.info.run_id, "figures")}
    assert "figures/twin-importances.png" in artifacts


# ---------------------------------------------------------------------- pruned, failed
@pytest.mark.parametrize("objective,pruner", [
    ("twin", optuna.pruners.ThresholdPruner(upper=0.0)),  # any validation loss is too high
    ("marl", optuna.pruners.ThresholdPruner(lower=1e9)),  # any team reward is too low
])
def test_pruned_trials_are_recorded(objective, pruner, request):
    params = request.getfixturevalue(f"{objective}_params")
    cfg = load(params)
    summary = run_study(cfg, pruner=pruner)
    assert summary.counts["pruned"] == 2 and summary.counts["complete"] == 0
    assert summary.best_params_path is None and summary.figures == []
    first_eval = {"twin": 0, "marl": 1}[objective]  # marl evaluates every 2nd epoch
    for trial in trials_of(cfg):
        assert trial.state == TrialState.PRUNED
        assert list(trial.intermediate_values) == [first_eval]  # stopped at the first report
    runs = tune_runs(cfg)
    assert sorted(r.data.tags.get("optuna_state", "") for r in runs) == ["", "PRUNED", "PRUNED"]


def test_failed_trials_are_recorded_and_the_study_goes_on(twin_params, tmp_path):
    (tmp_path / "data.npz").write_bytes(b"not a data set")  # every trial fails to load it
    summary = run_study(load(twin_params))
    assert summary.counts["fail"] == 2 and summary.new_trials == [0, 1]
    for trial in trials_of(load(twin_params)):
        assert trial.state == TrialState.FAIL and trial.user_attrs["error"]


# ---------------------------------------------------------------------- interruptions
def wait_for_running_trial(cfg, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    """Until the worker's trial has reported at least one validation epoch."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0]
        try:
            if any(t.state == TrialState.RUNNING and t.intermediate_values
                   for t in trials_of(cfg)):
                return
        except (KeyError, SQLAlchemyError):  # the study (or its database) is not made yet
            pass
        time.sleep(0.3)
    proc.kill()
    pytest.fail(f"no trial reported within {timeout} s: {proc.communicate()[0]}")


@pytest.mark.parametrize("how", ["ctrl-c", "killed"])
def test_interrupted_trial_runs_again_on_resume(how, twin_params, tmp_path):
    """Ctrl-C: the trial is failed and queued again at once. A killed worker leaves it
    RUNNING; once its heartbeat is `grace_period` s old, the next worker fails and requeues it."""
    beat = ["tune.heartbeat_interval=1", "tune.grace_period=2"]
    slow = ["--set", "twin.max_epochs=500", "--set", "twin.patience=500"]  # outlives the signal
    cfg = load(twin_params, *beat)
    sets = [a for b in beat for a in ("--set", b)]
    # a shell starts background jobs with SIGINT ignored, and a Python started so never turns
    # Ctrl-C into KeyboardInterrupt: give the worker the default, as a terminal would
    proc = subprocess.Popen(tune_command(twin_params, *sets, *slow), cwd=tmp_path, text=True,
                            env=worker_env(),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_for_running_trial(cfg, proc)
    if how == "ctrl-c":
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=120)[0]
        assert proc.returncode == 130, out
        assert "trial 0 is queued again" in out
        assert [t.state for t in trials_of(cfg)] == [TrialState.FAIL, TrialState.WAITING]
    else:
        proc.kill()
        proc.communicate(timeout=60)
        assert [t.state for t in trials_of(cfg)] == [TrialState.RUNNING]  # nobody noticed yet
        time.sleep(2.5)  # past the grace period

    summary = run_study(cfg)  # resume: the interrupted trial first, then the missing one
    trials = trials_of(cfg)
    states = [t.state for t in trials]
    assert states == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert summary.new_trials == [1, 2]
    assert trials[1].params == trials[0].params  # the same draw, run again
    assert trials[1].system_attrs["failed_trial"] == 0
    assert progress(optuna.load_study(study_name="twin", storage=cfg.tune.storage))[0] == 2


# ---------------------------------------------------------------------- PostgreSQL workers
@pytest.fixture(scope="module")
def pg_url() -> str:
    """DNTSYNC_TEST_PG_URL, or the URL of the server `scripts/postgres.sh` starts."""
    url = os.environ.get("DNTSYNC_TEST_PG_URL")
    if not url:
        proc = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "postgres.sh")],
                              capture_output=True, text=True, timeout=900)
        if proc.returncode != 0 or not proc.stdout.strip():
            pytest.fail(f"PostgreSQL could not be started for the shared-storage test:\n"
                        f"{proc.stderr.strip()}\n{PG_FIX}")
        url = proc.stdout.strip().splitlines()[-1]
    import sqlalchemy

    try:
        with sqlalchemy.create_engine(database_url(url)).connect():
            pass
    except Exception as err:  # noqa: BLE001 - any failure to connect is the same message
        pytest.fail(f"cannot connect to PostgreSQL at DNTSYNC_TEST_PG_URL: {err}\n{PG_FIX}")
    return url


def test_two_workers_share_one_postgres_study(twin_params, tmp_path, pg_url):
    name = f"test-{uuid.uuid4().hex[:12]}"
    args = ["--storage", pg_url, "--study-name", name, "--n-trials", "4"]
    workers = [subprocess.Popen(tune_command(twin_params, *args, "--worker", str(i)),
                                cwd=tmp_path, env=worker_env(), text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT) for i in range(2)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    storage = database_url(pg_url)
    try:
        assert [w.returncode for w in workers] == [0, 0], "\n".join(outputs)
        ran = [set(map(int, re.findall(r"\d+", re.search(r"ran trials \[([\d, ]*)\]", out)[1])))
               for out in outputs]
        trials = optuna.load_study(study_name=name, storage=storage).get_trials()
        numbers = [t.number for t in trials]
        # 4 trials; a 5th only if both workers checked the count in the same instant
        assert 4 <= len(trials) <= 5
        assert numbers == list(range(len(trials)))  # no number twice, none missing
        assert all(t.state == TrialState.COMPLETE for t in trials)
        assert ran[0] and ran[1] and not ran[0] & ran[1]  # both worked, never on the same trial
        assert ran[0] | ran[1] == set(numbers)
    finally:
        optuna.delete_study(study_name=name, storage=storage)
