"""README.md: every command in it is exercised by a test or by CI.

`REGISTRY` maps each command of the README (the lines of its ```bash blocks and the inline
`make ...`, `dntsync ...`, `dvc ...`, `mlflow ...`, `optuna-dashboard ...`, `scripts/...`
commands) to the tests that run it, or to "CI" (`.ci/run`). A command added to the README
without a test fails `test_every_readme_command_is_registered`, naming it.

The commands that need no reproduced project run here on tiny settings under `tmp_path`:
`show-config` with overrides and a bad value, `train-marl` with an override, `tune
--objective marl` and `train-marl --config <the tuned overlay>`, `optuna-dashboard` on the
study, the `make` targets (dry runs), the benchmark scripts (short), the `quick` profile's
project copy, and an MLflow tracking server on PostgreSQL with a training run logged to it.
The commands on a reproduced project (`dvc dag`, `dvc exp run`, `mlflow ui`, ...) are in
tests/test_pipeline.py.
"""

from __future__ import annotations

import ast
import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import mlflow
import optuna
import pytest
import yaml
from optuna.trial import TrialState

from conftest import REPO_ROOT
from dntsync.config import load_config
from dntsync.tracking import flatten
from dntsync.tuning.study import database_url
# The shared-storage tests' PostgreSQL convention (DNTSYNC_TEST_PG_URL, else the server
# `scripts/postgres.sh` starts; a failure names the fix) and their tiny tune parameters.
from test_tune import pg_url, write_params  # noqa: F401 - pg_url is a fixture

BIN = Path(sys.executable).parent
README = REPO_ROOT / "README.md"
ME = "tests/test_readme.py"
PIPELINE = "tests/test_pipeline.py"
PIPELINE_E2E = f"{PIPELINE}::test_every_figure_metric_and_report_exists_and_is_non_trivial"
RUNS_PLACEMENT = "tests/test_runs.py::test_a_sweep_gives_the_same_numbers_on_the_local_default_and_on_a_separate_cluster"
RUNS_FAULT = "tests/test_runs.py::test_a_worker_killed_mid_run_is_noticed_and_its_run_resumes_elsewhere"

# ---------------------------------------------------------------------- the registry
# normalised README command -> the tests that exercise it ("file::test") or "CI" (.ci/run).
# Commands are normalised by `normalise`: no trailing comment, single spaces, no `.venv/bin/`.
REGISTRY: dict[str, tuple[str, ...]] = {
    # Set-up: the make targets (dry runs here; what they call is run by the tests named)
    "make run": (f"{ME}::test_make_targets_run_the_documented_commands", PIPELINE_E2E),
    "make test": ("CI", f"{ME}::test_make_targets_run_the_documented_commands"),
    "make quick": (f"{ME}::test_make_targets_run_the_documented_commands",
                   f"{ME}::test_quick_profile_lays_the_documented_reduced_copy", PIPELINE_E2E),
    "make bench": (f"{ME}::test_make_targets_run_the_documented_commands",
                   f"{ME}::test_benchmark_scripts_run_and_write_their_results"),
    "make tune": (f"{ME}::test_make_targets_run_the_documented_commands",
                  f"{ME}::test_tune_objective_marl_writes_the_tuned_overlay"),
    # the paper profile lays its copy as the quick one does (same code path, its overlay
    # checked by tests/test_config.py); the ablation's rows are checked by tests/test_learning.py
    "make paper": (f"{ME}::test_make_targets_run_the_documented_commands",
                   f"{ME}::test_quick_profile_lays_the_documented_reduced_copy",
                   "tests/test_config.py::test_paper_profile_is_the_paper_literal_learner"),
    "make ablation": (f"{ME}::test_make_targets_run_the_documented_commands",
                      "tests/test_learning.py::test_ablation_runs_from_the_paper_profile_to_the_default_learner",
                      "tests/test_learning.py::test_upload_value_splits_an_uploads_effect_into_its_slot_and_the_slots_after"),
    "scripts/offsets_search.py": (f"{PIPELINE}::test_offsets_search_refits_the_runs_own_upload_offsets",),
    "scripts/rule_check.py": (f"{PIPELINE}::test_rule_check_plays_the_runs_models_against_the_nearest_bs_rule",),
    "scripts/retry_rules.py": (
        f"{PIPELINE}::test_retry_rules_play_against_the_runs_heuristic_and_retry_a_failed_upload",),
    "scripts/retry_offsets.py": (
        f"{PIPELINE}::test_retry_offsets_at_force_play_the_retry_rule_through_the_learner",),
    "scripts/upload_value.py": (
        "tests/test_learning.py::test_upload_value_splits_an_uploads_effect_into_its_slot_and_the_slots_after",),
    # The pipeline: `dntsync pipeline --profile conf/profiles/tiny.yaml` runs `dvc repro`,
    # which runs every stage command, in tests/test_pipeline.py's `project` fixture
    "dvc repro": (PIPELINE_E2E,),
    "dvc status": (f"{PIPELINE}::test_second_repro_does_nothing_and_an_edit_reruns_only_its_dependents",),
    "dvc dag": (f"{PIPELINE}::test_dvc_dag_draws_every_stage",),
    "dntsync generate": (PIPELINE_E2E, "tests/test_generate.py::test_generate_writes_the_dataset"),
    "dntsync train-twin": (PIPELINE_E2E, "tests/test_twin.py::test_cli_train_twin_end_to_end"),
    "dntsync train-marl --algo vdn --seed 0": (PIPELINE_E2E,),  # the train_marl@<algo>-<seed> stages
    "dntsync sweep fig4": (PIPELINE_E2E,),
    "dntsync episode-trace": (PIPELINE_E2E,),
    "dntsync figures": (PIPELINE_E2E,),
    "dntsync report": (PIPELINE_E2E,),
    "dntsync pipeline": (PIPELINE_E2E, f"{PIPELINE}::test_mlflow_holds_the_runs_under_one_parent"),
    "dvc metrics show": (f"{PIPELINE}::test_dvc_metrics_show_is_a_table_of_headline_numbers",),
    "dvc plots show": (f"{PIPELINE}::test_dvc_plots_show_writes_the_html_page",
                       f"{PIPELINE}::test_every_dvc_plot_names_its_x_and_y"),
    "dntsync pipeline --profile conf/profiles/quick.yaml": (
        f"{ME}::test_quick_profile_lays_the_documented_reduced_copy", PIPELINE_E2E),
    # Results
    "dntsync diagnose-learner --model models/marl/vdn_seed0.ckpt": (
        "tests/test_diagnose.py::test_cli_prints_and_writes_the_diagnosis",),
    # Change the scenario
    "dntsync show-config --set scenario.n_users=20 --set scenario.n_rbs=9": (
        f"{ME}::test_show_config_applies_the_overrides",),
    "dntsync train-marl --algo vdn --seed 0 --set scenario.eps=0.5": (
        f"{ME}::test_train_marl_with_an_override",
        f"{ME}::test_a_bad_value_fails_before_any_work"),
    ". .venv/bin/activate": (  # the test puts the venv's bin first on PATH, as activate does
        f"{PIPELINE}::test_dvc_exp_run_reruns_the_dependents_of_a_changed_parameter",),
    "dvc exp run -S conf/params.yaml:scenario.n_rbs=9": (
        f"{PIPELINE}::test_dvc_exp_run_reruns_the_dependents_of_a_changed_parameter",),
    "dvc exp show": (f"{PIPELINE}::test_dvc_exp_run_reruns_the_dependents_of_a_changed_parameter",),
    "dvc exp show --drop '.*' --keep 'Experiment|scenario\\.n_rbs|.*_vdn_seed0\\.json:team_reward'": (
        f"{PIPELINE}::test_dvc_exp_run_reruns_the_dependents_of_a_changed_parameter",),
    # Browse the runs
    "mlflow ui --backend-store-uri sqlite:///mlflow.db": (f"{PIPELINE}::test_mlflow_ui_serves_the_runs",),
    # the same on a profile's store (the test's project is the tiny profile's copy)
    "mlflow ui --backend-store-uri sqlite:///.profiles/quick/mlflow.db": (
        f"{PIPELINE}::test_mlflow_ui_serves_the_runs",),
    # Tune
    "dntsync tune --objective marl --n-trials 40": (
        f"{ME}::test_tune_objective_marl_writes_the_tuned_overlay",),
    "dntsync tune --objective twin --n-trials 20": (
        "tests/test_tune.py::test_study_completes_resumes_and_reports",
        "tests/test_tune.py::test_two_workers_share_one_postgres_study"),
    "dntsync train-marl --config conf/tuned/marl-vdn.yaml": (
        f"{ME}::test_train_marl_with_the_tuned_overlay",),
    "optuna-dashboard sqlite:///optuna/studies.db": (f"{ME}::test_optuna_dashboard_serves_the_study",),
    # Scale out
    "scripts/postgres.sh": ("CI", "tests/test_tune.py::test_two_workers_share_one_postgres_study"),
    "dntsync tune --storage postgresql://USER:PW@HOST/DB --study-name S": (
        "tests/test_tune.py::test_two_workers_share_one_postgres_study",),
    "mlflow server --backend-store-uri postgresql+psycopg2://USER:PW@HOST/MLFLOW_DB --host 0.0.0.0 "
    "--allowed-hosts HOST:5000": (
        f"{ME}::test_mlflow_server_on_postgresql_records_a_training_run",),
    # the scheduler and workers: started so by tests/test_runs.py (and by .ci/run)
    "dask scheduler --port 8786": (RUNS_PLACEMENT, RUNS_FAULT),
    "dask worker tcp://HOST:8786 --nthreads 1 --no-nanny": (RUNS_PLACEMENT, RUNS_FAULT),
    "dntsync sweep fig4 --set sweeps.cluster=tcp://HOST:8786 --set tracking.mlflow_uri=http://HOST:5000": (
        RUNS_PLACEMENT, f"{ME}::test_mlflow_server_on_postgresql_records_a_training_run"),
}

COMMAND_PREFIXES = ("make ", "dntsync ", ".venv/bin/", "dvc ", "mlflow ", "optuna-dashboard ",
                    "scripts/", "dask ")
SHELL_FENCES = {"bash", "sh", "shell"}


def normalise(command: str) -> str:
    """One spelling per command: no trailing `# comment`, single spaces, no `.venv/bin/`."""
    command = re.sub(r"(^|\s)#.*$", "", command)
    return " ".join(command.split()).removeprefix(".venv/bin/")


def readme_commands(text: str) -> list[str]:
    """Every command of a README, normalised, in order of appearance, each once."""
    commands: list[str] = []
    fence = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```", re.M | re.S)
    for match in fence.finditer(text):
        if match.group(1).lower() in SHELL_FENCES:
            body = match.group(2).replace("\\\n", " ")  # continued lines are one command
            commands += [c for c in map(normalise, body.splitlines()) if c]
    prose = fence.sub("", text)
    # inline code may wrap onto the next line, but never spans a blank line
    for paragraph in re.split(r"\n\s*\n", prose):
        for span in re.findall(r"`([^`]+)`", paragraph):
            span = " ".join(span.split())
            if span.startswith(COMMAND_PREFIXES):
                commands.append(normalise(span))
    return list(dict.fromkeys(commands))


def test_readme_commands_are_extracted_from_blocks_and_inline_code():
    text = ("Run `make run` or `dntsync train-marl\n--seed 0`; not `conf/params.yaml`.\n\n"
            "```bash\n.venv/bin/dvc exp run -S a=1   # a comment\n\n# only a comment\n"
            "dntsync tune \\\n  --n-trials 2\n```\n\n```yaml\nmake: no\n```\n")
    assert readme_commands(text) == ["dvc exp run -S a=1", "dntsync tune --n-trials 2",
                                     "make run", "dntsync train-marl --seed 0"]


def test_every_readme_command_is_registered():
    commands = readme_commands(README.read_text())
    assert len(commands) >= 25  # the extraction found the README's commands at all
    missing = [c for c in commands if c not in REGISTRY]
    assert not missing, (
        "README.md commands that no test exercises; add a test and an entry to REGISTRY in "
        f"{ME}: {missing}")
    stale = sorted(set(REGISTRY) - set(commands))
    assert not stale, f"REGISTRY entries for commands no longer in README.md: {stale}"


def test_the_repository_stands_alone():
    """Nothing tracked points outside the repository for the model: docs/model.md is it."""
    outside = ("../" + "shared", "SPEC" + ".md")  # split so that this file does not match
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    found = []
    for name in filter(None, files):
        path = REPO_ROOT / name
        if not path.is_file() or path.suffix in {".png", ".npz", ".ckpt", ".db"}:
            continue
        text = path.read_bytes().decode(errors="ignore")
        found += [f"{name}: {word}" for word in outside if word in text]
    assert not found, found


def test_every_registered_test_exists():
    """Each `file::test` names a test function of that file; each "CI" command is in .ci/run."""
    defined: dict[str, set[str]] = {}
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    problems = []
    for command, tests in REGISTRY.items():
        assert tests, command
        for test in tests:
            if test == "CI":
                if command not in ci:
                    problems.append(f"{command!r}: registered as run by CI, not in .ci/run")
                continue
            path, _, name = test.partition("::")
            if path not in defined:
                tree = ast.parse((REPO_ROOT / path).read_text())
                defined[path] = {n.name for n in tree.body
                                 if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}
            if name not in defined[path]:
                problems.append(f"{command!r}: {test} does not exist")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------- helpers
def dntsync(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """The installed `dntsync` command, as the README runs it."""
    return subprocess.run([str(BIN / "dntsync"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url: str, payload: dict | None = None, timeout: float = 30) -> tuple[int, bytes]:
    """GET `url`, or POST `payload` as JSON; (status, body)."""
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


@contextlib.contextmanager
def serving(cmd: list[str], cwd: Path, probe: str, log: Path, timeout: float = 240) -> Iterator[None]:
    """Run a server `cmd` (output to `log`) until `probe` (a URL) answers 200; stop it (its
    whole process group: `mlflow ui` / `mlflow server` start uvicorn workers) when the block
    ends."""
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, f"{cmd} exited {proc.returncode}:\n{log.read_text()[-3000:]}"
            try:
                if http(probe, timeout=5)[0] == 200:
                    break
            except OSError:  # not listening yet
                pass
            assert time.monotonic() < deadline, (
                f"{cmd}: {probe} did not answer within {timeout} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def tiny_overlay(tmp_path: Path, mlflow_uri: str) -> Path:
    """tests/test_marl.py's tiny scale (U 3, N 3, T 5, hidden 16, 2 epochs, the drift
    predictor), every output under `tmp_path`, as a `--config` overlay."""
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "scenario": {"n_users": 3, "n_rbs": 3, "episode_length": 5},
        "env": {"predictor": "drift"},
        "marl": {"algorithm": {"epochs": 2, "batches_per_epoch": 2, "batch_size": 4,
                               "target_update_epochs": 1},
                 "network": {"hidden": 16},
                 "collection": {"episodes_per_epoch": 4, "buffer_capacity": 16,
                                "epsilon_decay_epochs": 2},
                 "evaluation": {"every": 1, "episodes": 4},
                 "outputs": {"model_dir": str(tmp_path / "models"),
                             "metrics_dir": str(tmp_path / "metrics"),
                             "checkpoint_dir": str(tmp_path / "checkpoints")},
                 "seeds": [0]},
        "tracking": {"mlflow_uri": mlflow_uri},
    }))
    return path


def marl_runs(tracking_uri: str, experiment: str = "dntsync-marl") -> list:
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment} at {tracking_uri}"
    return client.search_runs([exp.experiment_id])


# ---------------------------------------------------------------------- change the scenario
def test_show_config_applies_the_overrides():
    out = dntsync("show-config", "--set", "scenario.n_users=20", "--set", "scenario.n_rbs=9",
                  cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr
    shown = yaml.safe_load(out.stdout)
    assert (shown["scenario"]["n_users"], shown["scenario"]["n_rbs"]) == (20, 9)
    # the rest is conf/params.yaml, untouched
    default = load_config(REPO_ROOT / "conf" / "params.yaml").to_dict()
    shown["scenario"].update(n_users=default["scenario"]["n_users"],
                             n_rbs=default["scenario"]["n_rbs"])
    assert shown == default


@pytest.mark.parametrize("command", ["show-config", "train-marl"])
def test_a_bad_value_fails_before_any_work(command, tmp_path):
    """The README's message, word for word; `train-marl` writes nothing (not even MLflow)."""
    extra = ["--algo", "vdn", "--seed", "0"] if command == "train-marl" else []
    out = dntsync(command, "--params", str(REPO_ROOT / "conf" / "params.yaml"), *extra,
                  "--set", "scenario.eps=1.5", cwd=tmp_path)
    assert out.returncode == 2
    assert "scenario.eps = 1.5 is invalid: need 0 < eps < 1 (eq. 8)" in out.stderr
    assert "scenario.eps = 1.5 is invalid: need 0 < eps < 1 (eq. 8)" in README.read_text()
    assert out.stdout == "" and list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_train_marl_with_an_override(tmp_path):
    """`dntsync train-marl --algo vdn --seed 0 --set scenario.eps=0.5` on conf/params.yaml
    shrunk by a tiny overlay: one seed's model, metrics and curve, and its MLflow run."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = dntsync("train-marl", "--params", str(REPO_ROOT / "conf" / "params.yaml"),
                  "--config", str(tiny_overlay(tmp_path, uri)), "--algo", "vdn", "--seed", "0",
                  "--set", "scenario.eps=0.5", "--no-progress", cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert re.search(r"^seed 0: vdn: eval team reward -?\d+\.\d+ per step", out.stdout, re.M)
    report = json.loads((tmp_path / "metrics" / "marl_vdn_seed0.json").read_text())
    assert (report["algo"], report["seed"]) == ("vdn", 0)
    assert report["scenario"] == {"n_users": 3, "n_rbs": 3, "eps": 0.5, "episode_length": 5}
    assert "oracle" in report["baselines"]
    assert (tmp_path / "models" / "vdn_seed0.ckpt").stat().st_size > 0
    curve = (tmp_path / "metrics" / "curves" / "marl_vdn_seed0.csv").read_text().splitlines()
    assert len(curve) == 1 + 2  # header + 2 epochs
    console = out.stdout + out.stderr  # no library notes: only our own lines
    for note in ("GPU available", "TPU available", "Tip:", "LeafSpec", "dvc push"):
        assert note not in console, note
    [run] = marl_runs(uri)
    assert run.info.run_name == "train-marl vdn s0" and run.info.status == "FINISHED"
    assert run.data.params["scenario.eps"] == "0.5"
    assert run.data.metrics["eval_team_reward"] == pytest.approx(report["eval_team_reward"])


# ---------------------------------------------------------------------- tune
@pytest.fixture(scope="module")
def tuned(tmp_path_factory) -> tuple[Path, Path, str]:
    """`dntsync tune --objective marl --n-trials 2` on tests/test_tune.py's tiny parameters,
    run in a folder of its own: the study in optuna/studies.db there, the best parameters in
    conf/tuned/ there (the README's paths, relative to where the command runs)."""
    root = tmp_path_factory.mktemp("tune")
    # the file's objective is `twin`: the study is a marl one only if --objective wins
    params = write_params(root, "twin", f"sqlite:///{root / 'mlflow.db'}")
    out = dntsync("tune", "--params", str(params), "--objective", "marl", "--n-trials", "2",
                  "--set", "tune.output_dir=conf/tuned", cwd=root)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return root, params, out.stdout


@pytest.mark.slow
def test_tune_objective_marl_writes_the_tuned_overlay(tuned):
    root, params, stdout = tuned
    assert re.search(r"study 'marl-vdn' at \S+: ran trials \[0, 1\]", stdout)
    study = optuna.load_study(study_name="marl-vdn", storage=f"sqlite:///{root}/optuna/studies.db")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2, \
        [t.user_attrs.get("error") for t in study.trials]
    overlay = root / "conf" / "tuned" / "marl-vdn.yaml"
    text = overlay.read_text()
    # the file tells how to use it: the very command the README gives
    assert "# Use:  dntsync train-marl --config conf/tuned/marl-vdn.yaml\n" in text
    values = yaml.safe_load(text)["marl"]
    best = study.best_trial.params
    assert values == {"algorithm": {"gamma": best["gamma"], "lr": best["lambda_Q"]},
                      "network": {"hidden": best["hidden_Q"]}}


@pytest.mark.slow
def test_train_marl_with_the_tuned_overlay(tuned):
    """`dntsync train-marl --config conf/tuned/marl-vdn.yaml` (one seed): the run's config
    holds the tuned values."""
    root, params, _ = tuned
    out = dntsync("train-marl", "--params", str(params), "--config", "conf/tuned/marl-vdn.yaml",
                  "--set", "marl.seeds=[0]", "--no-progress", cwd=root)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert re.search(r"^seeds \[0\]: vdn: eval team reward", out.stdout, re.M)
    assert json.loads((root / "metrics/marl/marl_vdn.json").read_text())["seeds"] == [0]
    tuned = flatten(yaml.safe_load((root / "conf/tuned/marl-vdn.yaml").read_text()))
    cfg = load_config(params)
    [run] = [r for r in marl_runs(cfg.tracking.mlflow_uri, f"{cfg.tracking.experiment_prefix}-marl")
             if "trial" not in r.data.tags]  # not one of the study's trials
    assert run.info.run_name == "train-marl vdn s0"
    assert set(tuned) == {"marl.algorithm.gamma", "marl.algorithm.lr", "marl.network.hidden"}
    for key, value in tuned.items():
        assert type(value)(run.data.params[key]) == value, key


@pytest.mark.slow
def test_optuna_dashboard_serves_the_study(tuned):
    """`optuna-dashboard sqlite:///optuna/studies.db` where the study was made: its API
    lists the study and its two complete trials."""
    root, _, _ = tuned
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with serving([str(BIN / "optuna-dashboard"), "sqlite:///optuna/studies.db", "--port",
                  str(port)], cwd=root, probe=f"{base}/api/studies", log=root / "dashboard.log",
                 timeout=120):
        status, body = http(f"{base}/api/studies")
        [summary] = json.loads(body)["study_summaries"]
        assert summary["study_name"] == "marl-vdn"
        status, body = http(f"{base}/api/studies/{summary['study_id']}?after=0")
        assert status == 200
        assert [t["state"] for t in json.loads(body)["trials"]] == ["Complete", "Complete"]
        status, body = http(f"{base}/dashboard")
        assert status == 200 and b"<html" in body.lower()


# ---------------------------------------------------------------------- make and profiles
INSTALL = [
    "python3 -m venv .venv",
    ".venv/bin/python -m pip install --quiet --upgrade pip",
    "# the CPU build of torch on disk first, so pip never pulls a multi-GB CUDA build",
    ".venv/bin/python -m pip install --quiet torch==2.13.0",
    ".venv/bin/python -m pip install --quiet -e '.[dev,scale]'",
    "touch .venv/.installed",
]
MAKE_TARGETS = {
    "run": [".venv/bin/dntsync pipeline"],
    "quick": [".venv/bin/dntsync pipeline --profile conf/profiles/quick.yaml"],
    "test": [".venv/bin/python -m pytest"],
    "bench": [".venv/bin/python benchmarks/bench_env.py", ".venv/bin/python benchmarks/bench_twin.py",
              ".venv/bin/python benchmarks/bench_marl.py", ".venv/bin/python benchmarks/bench_executor.py"],
    "tune": [".venv/bin/dntsync tune"],
    "paper": [".venv/bin/dntsync pipeline --profile conf/profiles/paper.yaml",
              ".venv/bin/python scripts/keep_results.py .profiles/paper docs/results/paper"],
    "ablation": [".venv/bin/python scripts/ablation.py",
                 ".venv/bin/python scripts/upload_value.py --set scenario.eps=0.5 --set scenario.n_rbs=9",
                 ".venv/bin/python scripts/upload_value.py --set scenario.eps=0.8 --set scenario.n_rbs=9 "
                 "--out benchmarks/results/upload_value_e8.json",
                 ".venv/bin/python scripts/upload_value.py --out benchmarks/results/upload_value_fig3.json",
                 ".venv/bin/python scripts/offsets_search.py --out benchmarks/results/offsets.json",
                 ".venv/bin/python scripts/rule_check.py --out benchmarks/results/rule_check.json",
                 ".venv/bin/python scripts/rule_check.py --episodes 256 --out benchmarks/results/rule_check_256.json",
                 ".venv/bin/python scripts/retry_rules.py --out benchmarks/results/retry_rules.json",
                 ".venv/bin/python scripts/retry_offsets.py --out benchmarks/results/retry_offsets.json"],
}


def make_dry_run(*args: str) -> list[str]:
    """The commands `make -n ARGS` would run, as from a shell (not from inside `make test`)."""
    env = {k: v for k, v in os.environ.items()
           if k not in {"MAKEFLAGS", "MFLAGS", "MAKELEVEL", "VENV", "PYTHON", "TUNE_ARGS"}}
    out = subprocess.run(["make", "-n", *args], cwd=REPO_ROOT, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [line.strip() for line in out.stdout.splitlines()]


@pytest.mark.parametrize("target", sorted(MAKE_TARGETS))
def test_make_targets_run_the_documented_commands(target):
    """`make -n`: each target first sets up .venv (torch's CPU build before the package, as
    the README says), then runs its command; the commands are run by the tests in REGISTRY."""
    # -W pyproject.toml: as if the package had changed, so the set-up shows whatever .venv is
    assert make_dry_run("-W", "pyproject.toml", target) == INSTALL + MAKE_TARGETS[target]


def test_make_tune_passes_its_arguments():
    # -o: the set-up taken as done, so only the target's own command shows
    assert make_dry_run("-o", ".venv/.installed", "tune", "TUNE_ARGS=--objective twin --n-trials 40") \
        == [".venv/bin/dntsync tune --objective twin --n-trials 40"]


def test_quick_profile_lays_the_documented_reduced_copy(tmp_path):
    """`dntsync pipeline --profile conf/profiles/quick.yaml` copies the project with the
    profile laid over conf/params.yaml: 300 trajectories, 8 epochs, 2 seeds, 2 points per
    sweep (README), a git repository of its own. Its `dvc repro` is the tiny profile's, run
    in tests/test_pipeline.py."""
    from dntsync.stages.pipeline import materialise

    dest = materialise(REPO_ROOT, Path("conf/profiles/quick.yaml"), tmp_path / "quick")
    cfg = load_config(dest / "conf" / "params.yaml")
    assert cfg.data.n_trajectories == 300 and cfg.marl.algorithm.epochs == 8
    assert list(cfg.marl.seeds) == [0, 1]
    assert len(cfg.sweeps.fig4.values) == len(cfg.sweeps.fig5.values) == 2
    assert cfg.scenario == load_config(REPO_ROOT / "conf" / "params.yaml").scenario
    for path in ("dvc.yaml", "Makefile", "src/dntsync/cli.py", "conf/search_space.yaml"):
        assert (dest / path).read_bytes() == (REPO_ROOT / path).read_bytes(), path
    # the project's own results stay behind: the copy makes its own dvc.lock and metrics
    assert not (dest / "dvc.lock").exists() and not (dest / "metrics").exists()
    clean = subprocess.run(["git", "status", "--porcelain"], cwd=dest, capture_output=True,
                           text=True, check=True)
    assert clean.stdout == ""  # everything committed: `dvc exp run` works there too


@pytest.mark.slow
def test_benchmark_scripts_run_and_write_their_results(tmp_path):
    """What `make bench` runs, shortened: each script in a copy of benchmarks/ (bench_marl.py
    always writes next to itself), so benchmarks/results/ keeps the measured figures."""
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    for script in (REPO_ROOT / "benchmarks").glob("bench_*.py"):
        shutil.copy2(script, bench / script.name)
    short = {
        "bench_env.py": ["--seconds", "0.05", "--repeats", "1", "--out", "results/env.json"],
        "bench_twin.py": ["--seconds", "0.05", "--repeats", "1", "--out", "results/twin.json",
                          "--checkpoint", str(tmp_path / "no-twin.ckpt")],  # a fresh twin
        "bench_marl.py": ["--repeats", "1", "--full-run-epochs", "1"],
        "bench_executor.py": ["--repeats", "1", "--out", "results/executor.json"],
    }
    assert set(short) == {p.name for p in bench.iterdir()}  # every script `make bench` runs
    for script, args in short.items():
        out = subprocess.run([sys.executable, f"benchmarks/{script}", *args], cwd=tmp_path,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, f"{script}:\n{out.stdout[-3000:]}{out.stderr[-3000:]}"
    env = json.loads((tmp_path / "results/env.json").read_text())
    assert {r["impl"] for r in env["results"]} == {"batched", "plain-loop"}
    assert all(r["env_steps_per_s"] > 0 for r in env["results"])
    twin = json.loads((tmp_path / "results/twin.json").read_text())
    assert twin["ratio_gru_over_hold_last"] > 0 and "freshly initialised" in twin["gru"]["source"]
    marl = json.loads((bench / "results/marl.json").read_text())
    assert set(marl["updates"]) == {"flat", "factorised", "branching"} and set(marl["heads"]) == {"U12", "U16"}
    full = marl["full_run"]  # the whole default run's path (outputs on, baselines), one epoch
    assert full["epochs"] == 1 and full["updates"] == full["batches_per_epoch"]
    assert math.isfinite(full["eval_team_reward"]) and full["wall_s"] > 0
    assert not (bench / "results/_scratch_marl").exists()
    executor = json.loads((tmp_path / "results/executor.json").read_text())
    assert len(executor["batch_s"]) == 1 and executor["batch_s"][0] > 0


# ---------------------------------------------------------------------- scale out: MLflow
@pytest.mark.slow
def test_mlflow_server_on_postgresql_records_a_training_run(tmp_path, pg_url):  # noqa: F811
    """`mlflow server --backend-store-uri postgresql+psycopg2://... --host 0.0.0.0
    --allowed-hosts HOST:PORT` (the README's), then a training
    run with `--set tracking.mlflow_uri=http://HOST:PORT`: the run, its metrics and its
    artifacts are on the server (read back through its REST API).

    The server gets a schema of its own in the test database: MLflow and Optuna both keep
    their schema version in a table `alembic_version`, so MLflow cannot start on a database
    that holds Optuna studies (tests/test_tune.py's). The URL names the psycopg2 driver, as
    `dntsync tune` does (`database_url`): SQLAlchemy 2.1 reads a bare postgresql:// as
    psycopg 3, which the `scale` extra does not install."""
    import sqlalchemy

    schema = f"mlflow_test_{uuid.uuid4().hex[:10]}"
    engine = sqlalchemy.create_engine(database_url(pg_url))
    with engine.begin() as conn:
        conn.execute(sqlalchemy.text(f'CREATE SCHEMA "{schema}"'))
    store = (sqlalchemy.engine.make_url(database_url(pg_url))
             .update_query_dict({"options": f"-csearch_path={schema}"})
             .render_as_string(hide_password=False))
    server_dir = tmp_path / "server"  # its artifacts (./mlartifacts) go here
    server_dir.mkdir()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    try:
        with serving([str(BIN / "mlflow"), "server", "--backend-store-uri", store,
                      "--host", "0.0.0.0", "--port", str(port),
                      "--allowed-hosts", f"127.0.0.1:{port}"],
                     cwd=server_dir, probe=f"{base}/health", log=tmp_path / "server.log"):
            out = dntsync("train-marl", "--params", str(REPO_ROOT / "conf" / "params.yaml"),
                          "--config", str(tiny_overlay(tmp_path, "sqlite:///unused.db")),
                          "--algo", "vdn", "--seed", "0",
                          "--set", f"tracking.mlflow_uri={base}", "--no-progress", cwd=tmp_path)
            assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
            assert not (tmp_path / "unused.db").exists()  # nothing tracked locally

            status, body = http(f"{base}/api/2.0/mlflow/experiments/get-by-name"
                                "?experiment_name=dntsync-marl")
            assert status == 200, body
            experiment_id = json.loads(body)["experiment"]["experiment_id"]
            status, body = http(f"{base}/api/2.0/mlflow/runs/search",
                                {"experiment_ids": [experiment_id]})
            [run] = json.loads(body)["runs"]
            assert run["info"]["run_name"] == "train-marl vdn s0" and run["info"]["status"] == "FINISHED"
            metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
            report = json.loads((tmp_path / "metrics" / "marl_vdn_seed0.json").read_text())
            assert metrics["eval_team_reward"] == pytest.approx(report["eval_team_reward"])
            params = {p["key"]: p["value"] for p in run["data"]["params"]}
            assert params["marl.network.hidden"] == "16"
            status, body = http(f"{base}/api/2.0/mlflow/artifacts/list?run_id={run['info']['run_id']}")
            artifacts = {f["path"] for f in json.loads(body)["files"]}
            assert {"vdn_seed0.ckpt", "marl_vdn_seed0.json", "marl_vdn_seed0.csv"} <= artifacts
        # the server's database holds the run (in PostgreSQL, not a file beside it)
        with engine.connect() as conn:
            names = conn.execute(sqlalchemy.text(
                f'SELECT name FROM "{schema}".runs WHERE status = \'FINISHED\'')).scalars().all()
        assert names == ["train-marl vdn s0"]
    finally:
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        engine.dispose()
