"""`dntsync.stages.runs.run_jobs`: prerequisites first, then the costliest ready job."""

from __future__ import annotations

import pytest

from dntsync.stages import runs


def test_dispatch_takes_ready_jobs_costliest_first_ties_in_order():
    needs = [[], [], [0], [1], []]
    cost = [1.0, 5.0, 9.0, 2.0, 5.0]
    assert runs._dispatch_order({0, 1, 2, 3, 4}, set(), needs, cost) == [1, 4, 0]
    assert runs._dispatch_order({2, 3, 4}, {0, 1}, needs, cost) == [2, 4, 3]


def test_run_jobs_runs_each_job_once_after_its_prerequisites(monkeypatch):
    order = []
    monkeypatch.setattr(runs, "_job", lambda name: order.append(name) or {"job": name})
    jobs = [("twin-a",), ("twin-b",), ("a1",), ("a2",), ("b1",), ("base",)]
    needs = [[], [], [0], [0], [1], []]
    cost = [float("inf"), float("inf"), 3.0, 3.0, 9.0, 1.0]
    results = runs.run_jobs(jobs, 1, "test", needs=needs, cost=cost)
    assert [r["job"] for r in results] == [j[0] for j in jobs]  # in the jobs' order
    assert order == ["twin-a", "twin-b", "b1", "a1", "a2", "base"]


@pytest.mark.parametrize("workers", [1, 2])
def test_run_jobs_refuses_jobs_that_wait_for_themselves(workers):
    with pytest.raises(ValueError, match=r"jobs \[0\] wait"):
        runs.run_jobs([("marl",)], workers, "test", needs=[[0]])


@pytest.mark.parametrize("workers", [1, 2])
def test_command_jobs_run_in_the_workers_with_their_output_in_a_log(tmp_path, workers):
    """The pipeline's parallel DVC stages go through the same runner: each command's
    output lands in its log, its exit code comes back, and a failure does not stop the rest."""
    import os
    import sys

    jobs = [("command", name, [sys.executable, "-c", f"print('{name}'); raise SystemExit({code})"],
             str(tmp_path / f"{name}.log"), str(tmp_path), dict(os.environ))
            for name, code in (("ok", 0), ("broken", 3), ("also-ok", 0))]
    results = runs.run_jobs(jobs, workers, "test")
    assert [(r["name"], r["returncode"]) for r in results] == [("ok", 0), ("broken", 3), ("also-ok", 0)]
    assert all((tmp_path / f"{r['name']}.log").read_text().strip() == r["name"] for r in results)


def test_the_pipeline_runs_its_stages_through_the_runner_and_names_a_failure(tmp_path, capsys):
    import os
    import sys

    from dntsync.stages import pipeline

    fake_dvc = tmp_path / "dvc"  # prints its stage and fails on one
    fake_dvc.write_text(f"#!{sys.executable}\nimport sys\nprint(sys.argv[-1])\n"
                        "raise SystemExit(2 if sys.argv[-1] == 'b' else 0)\n")
    fake_dvc.chmod(0o755)
    code = pipeline.run_stages(["a", "b", "c"], str(fake_dvc), 2, tmp_path / "logs", tmp_path,
                               dict(os.environ))
    assert code == 2
    assert (tmp_path / "logs/a.log").read_text().strip() == "a"
    assert "b failed (exit 2)" in capsys.readouterr().err
