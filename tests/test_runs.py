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
