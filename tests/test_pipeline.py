"""End to end: the real `dvc repro` on the tiny profile in a temporary git repository.

`dntsync pipeline --profile conf/profiles/tiny.yaml --dest <tmp>` copies the project, overlays
the profile on its params and reproduces every stage there under one MLflow parent run.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
FIGURES = ["fig2_twin_trajectories.png", "fig3_convergence.png", "fig4_eps.png",
           "fig5_users.png", "fig6_episode.png"]


def dvc(project: Path, *args: str) -> str:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    out = subprocess.run([str(BIN / "dvc"), *args], cwd=project, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def changed_stages(project: Path) -> set[str]:
    status = json.loads(dvc(project, "status", "--json"))
    return set(status)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("pipeline") / "proj"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([str(BIN / "dntsync"), "pipeline", "--profile", "conf/profiles/tiny.yaml",
                          "--dest", str(dest)], cwd=REPO_ROOT, env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    return dest


def test_every_figure_metric_and_report_exists_and_is_non_trivial(project):
    for name in FIGURES:
        png = project / "figures" / name
        assert png.exists() and png.stat().st_size > 10_000, name
    for name in ("fig4_eps.csv", "fig5_users.csv", "fig6_episode.csv"):
        rows = (project / "figures/data" / name).read_text().splitlines()
        assert len(rows) > 2, name
    twin = json.loads((project / "metrics/twin.json").read_text())
    assert len(twin["one_step"]["per_user"]["twin_mse"]) == 6
    for algo in ("vdn", "iql"):
        summary = json.loads((project / f"metrics/marl/marl_{algo}.json").read_text())
        assert summary["seeds"] == [0, 1] and "oracle" in summary["baselines"]
    for sweep, n_points in (("fig4", 2), ("fig5", 2)):
        data = json.loads((project / f"metrics/sweep_{sweep}.json").read_text())
        assert len(data["points"]) == n_points
        assert all(len(p["algos"]["vdn"]["team_reward"]["per_seed"]) == 2 for p in data["points"])
    trace = json.loads((project / "metrics/fig6_episode.json").read_text())
    assert len(trace["learners"]["iql"]["dnt_error"][0]) == trace["slots"] == 6
    report = (project / "reports/RESULTS.md").read_text()
    assert "## The paper's claims beside ours" in report and "+28.96%" in report
    assert "nan" not in report.lower()


def test_mlflow_holds_the_runs_under_one_parent(project):
    db = sqlite3.connect(project / "mlflow.db")
    counts = dict(db.execute(
        "select e.name, count(*) from runs r join experiments e using (experiment_id) "
        "where r.lifecycle_stage = 'active' group by e.name").fetchall())
    # 2 algos x 2 seeds for Fig. 3, and 2 points x 2 algos x 2 seeds for each of Figs. 4, 5
    assert counts["dntsync-marl"] == 4 + 8 + 8
    assert counts["dntsync-twin"] == 2  # the main twin and the 4-user twin of Fig. 5
    assert counts["dntsync-pipeline"] == 1
    parent = db.execute("select run_uuid from runs r join experiments e using (experiment_id) "
                        "where e.name = 'dntsync-pipeline'").fetchone()[0]
    children = db.execute("select count(*) from tags where key = 'mlflow.parentRunId' "
                          "and value = ?", (parent,)).fetchone()[0]
    assert children == 22
    stages = {v for (v,) in db.execute("select value from tags where key = 'dvc_stage'")}
    assert {"train_twin", "train_marl", "sweep@fig4", "sweep@fig5"} <= stages


def test_second_repro_does_nothing_and_an_edit_reruns_only_its_dependents(project):
    assert changed_stages(project) == set()
    params = project / "conf/params.yaml"
    original = params.read_text()
    params.write_text(original.replace("fig6_episode_seed: 20000", "fig6_episode_seed: 20001"))
    try:
        assert changed_stages(project) == {"episode_fig6"}
        params.write_text(original.replace("eps: 0.3", "eps: 0.35"))
        changed = changed_stages(project)
        assert {"train_marl", "sweep@fig4", "sweep@fig5"} <= changed
        assert not {"generate", "train_twin"} & changed  # paths and the twin ignore eps
    finally:
        params.write_text(original)
    assert changed_stages(project) == set()
