"""End to end: the real `dvc repro` on the tiny profile in a temporary git repository.

`dntsync pipeline --profile conf/profiles/tiny.yaml --dest <tmp>` copies the project, overlays
the profile on its params and reproduces every stage there under one MLflow parent run. On
that project, the README's commands to read and change it: `dvc dag`, `dvc metrics show`,
`dvc plots show`, `mlflow ui` and `dvc exp run -S ...` (tests/test_readme.py lists them all).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO_ROOT
from test_readme import free_port, http, serving

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
# the tiny profile's train_marl matrix: 2 algorithms x seeds [0, 1]
LEARNERS = [f"train_marl@{a}-{s}" for a in ("vdn", "iql") for s in (0, 1)]
STAGES = ["generate", "train_twin", *LEARNERS, "sweep@fig4", "sweep@fig5", "episode_fig6",
          "figures", "report"]
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
        for seed in (0, 1):
            run = json.loads((project / f"metrics/marl/marl_{algo}_seed{seed}.json").read_text())
            assert run["seed"] == seed and "oracle" in run["baselines"]
            assert (project / f"models/marl/{algo}_seed{seed}.ckpt").stat().st_size > 1000
    for sweep, n_points in (("fig4", 2), ("fig5", 2)):
        data = json.loads((project / f"metrics/sweep_{sweep}.json").read_text())
        assert len(data["points"]) == n_points
        assert all(len(p["algos"]["vdn"]["team_reward"]["per_seed"]) == 2 for p in data["points"])
    trace = json.loads((project / "metrics/fig6_episode.json").read_text())
    assert len(trace["learners"]["iql"]["dnt_error"][0]) == trace["slots"] == 6
    report = (project / "reports/RESULTS.md").read_text()
    assert "## The paper's claims beside ours" in report and "+28.96%" in report
    assert "## Whom each BS serves" in report and "outer-only" in report
    assert "## Do the learners learn the task?" in report and "x oracle" in report
    assert "## From the paper's learner to the default, one change at a time" in report
    assert "nan" not in report.lower()


def test_keep_results_copies_the_report_figures_and_headline_metrics(project, tmp_path):
    out = subprocess.run([sys.executable, str(REPO_ROOT / "scripts/keep_results.py"), str(project),
                          str(tmp_path / "kept")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    kept = tmp_path / "kept"
    assert (kept / "RESULTS.md").read_text() == (project / "reports/RESULTS.md").read_text()
    assert {p.name for p in kept.glob("*.png")} >= set(FIGURES)
    for name in ("twin.json", "sweep_fig4.json", "sweep_fig5.json", "fig6_episode.json",
                 "marl/marl_vdn_seed1.json"):
        assert (kept / "metrics" / name).read_bytes() == (project / "metrics" / name).read_bytes()


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
    assert {"train_twin", *LEARNERS, "sweep@fig4", "sweep@fig5"} <= stages


def test_second_repro_does_nothing_and_an_edit_reruns_only_its_dependents(project):
    assert changed_stages(project) == set()
    params = project / "conf/params.yaml"
    original = params.read_text()
    params.write_text(original.replace("fig6_episode_seed: 20000", "fig6_episode_seed: 20001"))
    try:
        assert changed_stages(project) == {"episode_fig6"}
        params.write_text(original.replace("eps: 0.3", "eps: 0.35"))
        changed = changed_stages(project)
        assert {*LEARNERS, "sweep@fig4", "sweep@fig5"} <= changed
        assert not {"generate", "train_twin"} & changed  # paths and the twin ignore eps
        # one more seed: its two learner stages are new, the other seeds' are up to date
        more_seeds = yaml.safe_load(original)
        more_seeds["marl"]["seeds"] = [0, 1, 2]
        params.write_text(yaml.safe_dump(more_seeds, sort_keys=False))
        changed = changed_stages(project)
        assert {"train_marl@vdn-2", "train_marl@iql-2"} <= changed
        assert not set(LEARNERS) & changed
    finally:
        params.write_text(original)
    assert changed_stages(project) == set()


# ---------------------------------------------------------------------- README commands
def test_dvc_dag_draws_every_stage(project):
    drawing = dvc(project, "dag")
    for stage in STAGES:
        assert f"| {stage} |" in drawing, stage
    # the edges, as the README's stage table chains them
    edges = set(re.findall(r'"(\S+)" -> "(\S+)"', dvc(project, "dag", "--dot")))
    assert {("generate", "train_twin"), ("train_twin", "sweep@fig5"), ("sweep@fig5", "episode_fig6"),
            ("figures", "report"), ("episode_fig6", "figures")} <= edges
    for stage in LEARNERS:
        assert {("train_twin", stage), (stage, "figures"), (stage, "report")} <= edges


def test_dvc_metrics_show_lists_every_metrics_file(project):
    table = dvc(project, "metrics", "show")
    for path in ("metrics/twin.json", "metrics/sweep_fig4.json", "metrics/sweep_fig5.json"):
        assert path in table, path
    assert "one_step.overall.twin_ratio" in table
    # the numbers are the files' (DVC leaves out the lists, e.g. per-user errors)
    shown = json.loads(dvc(project, "metrics", "show", "--json"))[""]["data"]
    twin = json.loads((project / "metrics/twin.json").read_text())
    shown_twin = shown["metrics/twin.json"]["data"]
    assert shown_twin["one_step"]["overall"] == twin["one_step"]["overall"]
    assert shown_twin["training"] == twin["training"]


def test_dvc_plots_show_writes_the_html_page(project):
    page = project / "dvc_plots" / "index.html"
    try:
        out = dvc(project, "plots", "show")
        assert str(page) in out
        html = page.read_text()
        # every plots source of dvc.yaml: Fig. 2's points and the figures' data
        for source in ("fig2_twin_trajectories.csv", "figures/data/fig4_eps.csv",
                       "figures/data/fig5_users.csv", "figures/data/fig6_episode.csv"):
            assert source in html, source
    finally:
        shutil.rmtree(project / "dvc_plots", ignore_errors=True)


def test_mlflow_ui_serves_the_runs(project, tmp_path):
    """`mlflow ui --backend-store-uri sqlite:///mlflow.db` in the project (plus `--port`):
    the web page, and through the REST API every stage kind's experiment and the runs."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with serving([str(BIN / "mlflow"), "ui", "--backend-store-uri", "sqlite:///mlflow.db",
                  "--port", str(port)], cwd=project, probe=f"{base}/health",
                 log=tmp_path / "mlflow-ui.log"):
        status, body = http(f"{base}/")
        assert status == 200 and b"<html" in body.lower()
        status, body = http(f"{base}/api/2.0/mlflow/experiments/search", {"max_results": 100})
        assert status == 200, body
        ids = {e["name"]: e["experiment_id"] for e in json.loads(body)["experiments"]}
        # one experiment per stage kind, as the README lists them
        assert {"dntsync-twin", "dntsync-marl", "dntsync-tune", "dntsync-pipeline"} <= set(ids)
        status, body = http(f"{base}/api/2.0/mlflow/runs/search",
                            {"experiment_ids": [ids["dntsync-marl"]], "max_results": 100})
        runs = json.loads(body)["runs"]
        assert len(runs) == 20 and all(r["info"]["status"] == "FINISHED" for r in runs)
        tags = {t["key"]: t["value"] for t in runs[0]["data"]["tags"]}
        assert {"dvc_stage", "git_commit", "mlflow.parentRunId"} <= set(tags)


def test_dvc_exp_run_reruns_the_dependents_of_a_changed_parameter(project, tmp_path):
    """`dvc exp run -S conf/params.yaml:scenario.n_rbs=9` in a copy of the project (it leaves
    its results in the workspace): the learners are trained again with N = 9, the paths and
    the twin are not, and the experiment is recorded with its parameter and outputs.

    On the tiny profile (6 users) 9 RBs are never short, so the learners' rewards do not
    change; what is checked is that the stages reading `scenario` ran on the new value.
    `dvc exp show` has no metric values for the experiment: `metrics/` is git-ignored and
    its files are `cache: false` outputs, so only their hashes (dvc.lock) are recorded."""
    copy = tmp_path / "proj"
    shutil.copytree(project, copy, symlinks=True)

    def workspace() -> dict:
        [row] = [r for r in json.loads(dvc(copy, "exp", "show", "--json")) if r["rev"] == "workspace"]
        return row["data"]

    before = workspace()
    marl_before = (copy / "metrics/marl/marl_vdn_seed0.json").read_text()
    # `dvc()` puts this venv's scripts first on PATH: the stages call `dntsync`, so the
    # README's `.venv/bin/dvc exp run ...` fails ("dntsync: command not found") without it
    out = dvc(copy, "exp", "run", "-S", "conf/params.yaml:scenario.n_rbs=9")
    assert "Stage 'train_twin' didn't change, skipping" in out
    assert all(f"Running stage '{stage}'" in out for stage in LEARNERS)
    assert changed_stages(copy) == set()  # the workspace holds the experiment's results

    marl_after = json.loads((copy / "metrics/marl/marl_vdn_seed0.json").read_text())
    assert marl_after["scenario"]["n_rbs"] == 9
    assert json.loads(marl_before)["scenario"]["n_rbs"] == 12
    shows = json.loads(dvc(copy, "exp", "show", "--json"))
    [baseline] = [r for r in shows if r["rev"] != "workspace"]
    [experiment] = [rev for e in baseline["experiments"] for rev in e["revs"]]
    data = experiment["data"]
    assert data["params"]["conf/params.yaml"]["data"]["scenario"]["n_rbs"] == 9
    assert baseline["data"]["params"]["conf/params.yaml"]["data"]["scenario"]["n_rbs"] == 12
    # the experiment's outputs: the data and the twin the same as before
    hashes = {path: out["hash"] for path, out in data["outs"].items()}
    for path in ("data/trajectories.npz", "models/twin.ckpt"):
        assert hashes[path] == before["outs"][path]["hash"], path
    # the learners' networks are recorded outputs (their metrics, `cache: false`, are not);
    # with 6 users 9 RBs are never short, so they may well be bit for bit the same
    assert all(f"models/marl/{a}_seed{s}.ckpt" in hashes for a in ("vdn", "iql") for s in (0, 1))
