"""`dntsync.stages.runs.run_jobs`, the executor of every batch of runs, on Dask: order,
commands, a result that does not depend on where a run ran, and a worker killed mid-run.

The cluster tests start a real `dask scheduler` and `dask worker` processes on 127.0.0.1
(`dask_cluster`); `.ci/run` also starts a scheduler with two workers and names it in
`DNTSYNC_TEST_DASK_SCHEDULER`, which the placement test uses when it is set.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from dntsync.config import to_plain
from dntsync.stages import pipeline, runs

DASK = str(Path(sys.executable).with_name("dask"))


def _command(name: str, code: str, log: Path) -> tuple:
    return ("command", name, [sys.executable, "-c", code], str(log), str(log.parent), dict(os.environ))


@contextlib.contextmanager
def dask_cluster(tmp_path: Path, n_workers: int = 2) -> Iterator[tuple[str, list[subprocess.Popen]]]:
    """A scheduler and `n_workers` single-threaded worker processes without a nanny (so a
    killed worker stays dead), stopped afterwards: (address, worker processes)."""
    from distributed import Client

    info = tmp_path / "scheduler.json"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    procs = [subprocess.Popen([DASK, "scheduler", "--host", "127.0.0.1", "--port", "0",
                               "--no-dashboard", "--scheduler-file", str(info)], **quiet)]
    try:
        deadline = time.monotonic() + 60
        while not info.exists():
            assert time.monotonic() < deadline and procs[0].poll() is None, "no scheduler"
            time.sleep(0.1)
        address = json.loads(info.read_text())["address"]
        workers = [subprocess.Popen([DASK, "worker", address, "--nthreads", "1", "--no-nanny",
                                     "--no-dashboard", "--memory-limit", "0"], **quiet)
                   for _ in range(n_workers)]
        procs += workers
        with Client(address, timeout="30s") as client:
            client.wait_for_workers(n_workers, timeout=60)
        yield address, workers
    finally:
        for proc in reversed(procs):
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------- order and commands
def test_jobs_start_after_their_prerequisites_and_results_come_in_order(tmp_path):
    """Job 2 needs job 0: it starts only once job 0 has written its end (0.5 s later)."""
    stamp = "import time, pathlib; p = pathlib.Path('{}'); "
    jobs = [_command("slow", stamp.format(tmp_path / "slow.end")
                     + "time.sleep(0.5); p.write_text(str(time.time()))", tmp_path / "slow.log"),
            _command("other", "print('other')", tmp_path / "other.log"),
            _command("after", stamp.format(tmp_path / "after.start") + "p.write_text(str(time.time()))",
                     tmp_path / "after.log")]
    results = runs.run_jobs(jobs, 2, "test", needs=[[], [], [0]], cost=[1.0, 1.0, 9.0])
    assert [r["name"] for r in results] == ["slow", "other", "after"]
    assert float((tmp_path / "after.start").read_text()) >= float((tmp_path / "slow.end").read_text())


def test_jobs_that_wait_for_themselves_are_refused_before_any_work():
    with pytest.raises(ValueError, match=r"jobs \[0, 1\] wait"):
        runs.run_jobs([("marl",), ("marl",)], 2, "test", needs=[[1], [0]])


def test_command_jobs_keep_their_output_and_one_failure_does_not_stop_the_rest(tmp_path):
    jobs = [_command(name, f"print('{name}'); raise SystemExit({code})", tmp_path / f"{name}.log")
            for name, code in (("ok", 0), ("broken", 3), ("also-ok", 0))]
    results = runs.run_jobs(jobs, 2, "test")
    assert [(r["name"], r["returncode"]) for r in results] == [("ok", 0), ("broken", 3), ("also-ok", 0)]
    assert all((tmp_path / f"{r['name']}.log").read_text().strip() == r["name"] for r in results)


def test_a_job_that_raises_fails_the_batch_with_its_own_error_after_the_others(tmp_path):
    from dntsync.config import from_dict

    bad = to_plain(from_dict({}))
    bad["scenario"]["n_users"] = 0  # refused by the config's validation inside the job
    ok = _command("ok", "import time; time.sleep(0.5); print('ok')", tmp_path / "ok.log")
    with pytest.raises(Exception, match="scenario.n_users"):
        runs.run_jobs([("marl", bad, "vdn", 0, None), ok], 2, "test")
    assert (tmp_path / "ok.log").read_text().strip() == "ok"  # finished, not cut


def test_the_pipeline_runs_its_stages_through_the_executor_and_names_a_failure(tmp_path, capsys):
    fake_dvc = tmp_path / "dvc"  # prints its stage and fails on one
    fake_dvc.write_text(f"#!{sys.executable}\nimport sys\nprint(sys.argv[-1])\n"
                        "raise SystemExit(2 if sys.argv[-1] == 'b' else 0)\n")
    fake_dvc.chmod(0o755)
    code = pipeline.run_stages(["a", "b", "c"], str(fake_dvc), 2, tmp_path / "logs", tmp_path,
                               dict(os.environ))
    assert code == 2
    assert (tmp_path / "logs/a.log").read_text().strip() == "a"
    assert "b failed (exit 2)" in capsys.readouterr().err


# ---------------------------------------------------------------------- where a run runs
def tiny_learner_job(epochs: int = 2) -> tuple:
    from test_marl import tiny_config

    cfg = tiny_config(Path("out"), f"marl.algorithm.epochs={epochs}", "marl.outputs.checkpoint_every=1",
                      "tracking.mlflow_uri=sqlite:///mlflow.db")
    return ("marl", to_plain(cfg), "vdn", 0, {"sweep": "test", "point": "tiny"})


def _finals(report: dict) -> dict:
    return {k: report[k] for k in ("eval", "eval_team_reward", "baselines")}


@pytest.mark.slow
def test_a_sweep_gives_the_same_numbers_on_the_local_default_and_on_a_separate_cluster(tmp_path):
    """`dntsync sweep fig4` of the tiny profile in two project folders: on the embedded local
    cluster, and with `--set sweeps.cluster=<address>` on a separately started scheduler with
    two worker processes (CI's, named in `DNTSYNC_TEST_DASK_SCHEDULER`, or this test's own).
    Every run's numbers and outputs are the same, and land in the project's folders."""
    import yaml

    params = yaml.safe_load((REPO_ROOT / "conf/profiles/tiny.yaml").read_text())
    params["env"] = {"predictor": "drift"}  # no twin needed
    params["sweeps"]["fig4"]["values"] = [0.8]
    summaries = {}
    given = os.environ.get("DNTSYNC_TEST_DASK_SCHEDULER")
    with contextlib.nullcontext((given, [])) if given else dask_cluster(tmp_path) as (address, _):
        for where, extra in (("local", []), ("cluster", ["--set", f"sweeps.cluster={address}"])):
            root = tmp_path / where
            root.mkdir()
            (root / "params.yaml").write_text(yaml.safe_dump(params))
            done = subprocess.run([str(Path(sys.executable).with_name("dntsync")), "sweep", "fig4",
                                   "--params", "params.yaml", *extra], cwd=root,
                                  capture_output=True, text=True, timeout=900)
            assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
            summary = json.loads((root / "metrics/sweep_fig4.json").read_text())
            summaries[where] = {k: v for k, v in summary.items() if k != "wall_time_s"}
            assert len(list((root / "runs/fig4").glob("*/metrics/marl_*_seed*.json"))) == 4
    assert summaries["cluster"] == summaries["local"]


@pytest.mark.slow
def test_a_worker_killed_mid_run_is_noticed_and_its_run_resumes_elsewhere(tmp_path, monkeypatch):
    """SIGKILL the worker process that runs a learner once its first checkpoint is written:
    Dask reschedules the run on the other worker, which resumes from that checkpoint; the
    run ends with the numbers of an uninterrupted run, one MLflow run, every epoch once."""
    import mlflow
    from distributed import Client

    epochs = 40
    job = tiny_learner_job(epochs)
    (tmp_path / "straight").mkdir()
    monkeypatch.chdir(tmp_path / "straight")
    [straight] = runs.run_jobs([job], 1, "straight")
    (tmp_path / "killed").mkdir()
    monkeypatch.chdir(tmp_path / "killed")
    with dask_cluster(tmp_path) as (address, workers), Client(address, timeout="30s") as client:
        out: dict = {}
        batch = threading.Thread(target=lambda: out.update(
            result=runs.run_jobs([job], 2, "killed", cluster=address)))
        batch.start()
        ckpt = Path("out/checkpoints/vdn_seed0/last.ckpt")
        deadline = time.monotonic() + 120
        while not ckpt.exists():
            assert time.monotonic() < deadline and batch.is_alive(), "no checkpoint was written"
            time.sleep(0.02)
        busy = [addr for addr, keys in client.processing().items() if keys]
        pids = client.run(os.getpid, workers=busy)
        os.kill(pids[busy[0]], signal.SIGKILL)
        batch.join(timeout=300)
        assert not batch.is_alive()
        assert sum(w.poll() is not None for w in workers) == 1  # the killed one stayed dead
    [report] = out["result"]
    assert report["resumed_from"] and report["resumed_from"].endswith("last.ckpt")
    assert _finals(report) == _finals(straight)
    rows = Path("out/metrics/curves/marl_vdn_seed0.csv").read_text().splitlines()[1:]
    assert [int(float(r.split(",")[0])) for r in rows] == list(range(1, epochs + 1))
    mlflow.set_tracking_uri("sqlite:///mlflow.db")
    finished = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert [r.info.status for r in finished] == ["FINISHED"]  # one run, continued


def test_local_workers_leave_malloc_alone():
    """Dask's nannies would set MALLOC_TRIM_THRESHOLD_, which makes a learner run 1.8x slower."""
    with runs.cluster_client(2, None) as client:
        assert set(client.run(os.environ.get, "MALLOC_TRIM_THRESHOLD_").values()) == {None}
    assert "MALLOC_TRIM_THRESHOLD_" not in os.environ
