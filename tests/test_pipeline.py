"""End to end: the real `dvc repro` on the tiny profile in a temporary git repository.

`dntsync pipeline --profile conf/profiles/tiny.yaml --dest <tmp>` copies the project, overlays
the profile on its params and reproduces every stage there under one MLflow parent run. On
that project, the README's commands to read and change it: `dvc dag`, `dvc metrics show`,
`dvc plots show`, `mlflow ui` and `dvc exp run -S ...` (tests/test_readme.py lists them all).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO_ROOT
from test_readme import free_port, http, serving

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
# the tiny profile's train_marl matrix: the Fig. 3 learners x seeds [0, 1]
FIG3_ALGOS = ("vdn", "iql", "qmix")
LEARNERS = [f"train_marl@{a}-{s}" for a in FIG3_ALGOS for s in (0, 1)]
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
    for algo in FIG3_ALGOS:
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


def test_report_checks_the_claims_against_the_kept_paper_literal_run_too(project, tmp_path, monkeypatch):
    """With a kept profile run in docs/results/paper/ (make paper), the claims table has a
    column pair for it; a profile's own report (DNTSYNC_PROFILE) leaves it out."""
    from dntsync.config import load_config
    from dntsync.stages import report

    shutil.copytree(project / "metrics", tmp_path / "metrics")
    out = subprocess.run([sys.executable, str(REPO_ROOT / "scripts/keep_results.py"), str(project),
                          str(tmp_path / "docs/results/paper")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    cfg = load_config(project / "conf/params.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DNTSYNC_PROFILE", raising=False)
    lines = report.build(cfg).splitlines()
    header = next(line for line in lines if line.startswith("| claim (paper)"))
    assert "default learner" in header and "paper-literal learner" in header
    row = next(line for line in lines if line.startswith("| VDN's reward over IQL's, Fig. 3")).split("|")
    assert row[3] == row[5] and row[4] == row[6]  # the same run kept as both
    assert any(line.startswith("In the Fig. 3 setting the paper-literal learners reach: VDN") for line in lines)
    monkeypatch.setenv("DNTSYNC_PROFILE", "paper")  # the profile's stem, as `dntsync pipeline` sets it
    built = report.build(cfg)
    assert "paper-literal" not in built
    header = next(line for line in built.splitlines() if line.startswith("| claim (paper)"))
    assert "the `paper` profile's learner" in header and "default learner" not in header


def test_offsets_search_refits_the_runs_own_upload_offsets(project, tmp_path):
    """scripts/offsets_search.py (make ablation) refits the upload offsets of the run's saved
    VDN models from zero; with the config's search it finds each run's own offsets and its
    final team reward."""
    rows_file = tmp_path / "offsets.json"
    out = subprocess.run([sys.executable, str(REPO_ROOT / "scripts/offsets_search.py"), "--settings",
                          "fig3", "--out", str(rows_file)], cwd=project, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "shortfall summed over the settings" in out.stdout
    rows = json.loads(rows_file.read_text())
    assert [r["seed"] for r in rows] == [0, 1] and {r["setting"] for r in rows} == {"fig3"}
    for row in rows:
        run = json.loads((project / f"metrics/marl/marl_vdn_seed{row['seed']}.json").read_text())
        assert row["offsets"] == run["upload_offsets"]["offsets"]
        assert row["with"] == pytest.approx(run["eval_team_reward"])
        assert row["heuristic"] == run["best_heuristic_team_reward"]


def test_rule_check_plays_the_runs_models_against_the_nearest_bs_rule(project, tmp_path, monkeypatch):
    """scripts/rule_check.py (make ablation): the rule it plays through each saved VDN model
    scores the `NearestBS` policy of that name on the evaluation episodes, and the fitted
    policy the run's own final team reward."""
    from dntsync.config import load_config
    from dntsync.env import NearestBS
    from dntsync.env.evaluate import Evaluation
    from dntsync.twin.predictor import build_predictor

    rows_file = tmp_path / "rule_check.json"
    out = subprocess.run([sys.executable, str(REPO_ROOT / "scripts/rule_check.py"), "--settings", "fig3",
                          "--episodes", "4", "--out", str(rows_file)], cwd=project, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "| fig3 |" in out.stdout
    written = json.loads(rows_file.read_text())
    assert written["episodes"] == 4 and [r["seed"] for r in written["rows"]["fig3"]] == [0, 1]
    monkeypatch.chdir(project)
    cfg = load_config(project / "conf/params.yaml")
    predictor, _ = build_predictor(cfg)
    evaluation = Evaluation(cfg.scenario, predictor, cfg.marl.evaluation.episodes, cfg.marl.evaluation.seed,
                            **cfg.env.observation_options())
    for row in written["rows"]["fig3"]:
        run = json.loads((project / f"metrics/marl/marl_vdn_seed{row['seed']}.json").read_text())
        assert row["eval_fitted"] == run["eval_team_reward"]
        assert row["heuristic"] == run["best_heuristic_team_reward"]
        phases = None if row["rule_phases"] is None else tuple(row["rule_phases"])
        rule = NearestBS(cfg.scenario, row["rule_upload"], phases=phases)
        assert row["eval_rule"] == pytest.approx(evaluation.run(rule)["team_reward"]["mean"], abs=1e-9)
        assert math.isfinite(row["gain"]) and row["se"] >= 0


def test_retry_rules_play_against_the_runs_heuristic_and_retry_a_failed_upload(project, tmp_path, monkeypatch):
    """scripts/retry_rules.py: its rows carry the runs' own VDN and best-heuristic numbers,
    and its rule uploads k slots after a BS's last success (from its phase before the first),
    then in every slot until an upload succeeds, as an independent replay of the outcomes says."""
    import numpy as np

    from dntsync.env import DntEnv, HoldLast
    from dntsync.env.policies import staggered_phases
    from dntsync.network import Scenario

    rows_file = tmp_path / "retry_rules.json"
    out = subprocess.run([sys.executable, str(REPO_ROOT / "scripts/retry_rules.py"), "--settings", "fig3",
                          "--episodes", "4", "--periods", "2", "3", "--out", str(rows_file)], cwd=project,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "| fig3 |" in out.stdout
    row = json.loads(rows_file.read_text())["rows"]["fig3"]
    runs = [json.loads((project / f"metrics/marl/marl_vdn_seed{s}.json").read_text()) for s in (0, 1)]
    assert row["vdn_eval"] == [r["eval_team_reward"] for r in runs]
    assert row["heuristic"] == runs[0]["best_heuristic"]
    assert row["heuristic_eval"] == runs[0]["best_heuristic_team_reward"]
    assert set(row["rules"]) == {f"nearest-retry-{k}{v}" for k in (2, 3) for v in ("", "-staggered", "-tuned")}
    for k in (2, 3):  # the tuned phases score at least every other phase's on the validation episodes
        assert row["rules"][f"nearest-retry-{k}-tuned"]["validation"] >= max(
            row["rules"][f"nearest-retry-{k}{v}"]["validation"] for v in ("", "-staggered"))
    assert row["retry_on_eval_eval"] == max(r["evaluation"] for r in row["rules"].values())
    assert math.isfinite(row["holdout_gain"]) and row["holdout_se"] >= 0
    assert math.isfinite(row["evaluation_gain"]) and row["evaluation_se"] >= 0

    monkeypatch.syspath_prepend(str(REPO_ROOT / "scripts"))
    from retry_rules import retry_rules

    # the default scenario (U = 12), where uploads fail often enough to meet retries
    scenario = Scenario()
    env = DntEnv(scenario, HoldLast(), n_envs=64, seed=5, observation="full")
    k, phases = 3, staggered_phases(scenario.n_bs, 3)
    rule = next(r for r in retry_rules(scenario, (k,)) if r.name == f"nearest-retry-{k}-staggered")
    obs, _ = env.reset()
    last_ok = np.full((64, scenario.n_bs), -1)  # slot of each BS's last success, -1: none yet
    failed = 0
    for t in range(scenario.episode_length):
        expected = np.where(last_ok < 0, t >= np.array(phases), t >= last_ok + k)
        result = env.step(rule.act(env.state))
        assert (result.outcome.upload == expected).all(), t
        failed += int((result.outcome.upload & ~result.outcome.upload_ok).sum())
        last_ok = np.where(result.outcome.upload_ok, t, last_ok)
        obs = result.obs
    assert failed > 0  # the replay met failed uploads, which the rule retried


def test_fit_timing_fits_the_runs_offsets_alone_and_together_to_the_same_record(project, tmp_path):
    """scripts/fit_timing.py: the run's own fit of its Fig. 3 VDN model, with the starts played
    one at a time and together; the script itself fails if the two records differ."""
    rows_file = tmp_path / "fits.json"
    out = subprocess.run([sys.executable, str(REPO_ROOT / "scripts/fit_timing.py"), "--repeats", "1",
                          "--out", str(rows_file)], cwd=project, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (row,) = json.loads(rows_file.read_text())["rows"]
    run = json.loads((project / "metrics/marl/marl_vdn_seed0.json").read_text())
    assert row["setting"] == "fig3" and row["validation_plays"] == run["upload_offsets"]["validation_plays"]
    assert len(row["alone_s"]) == len(row["together_s"]) == 1 and row["ratio"] > 0
    bad = subprocess.run([sys.executable, str(REPO_ROOT / "scripts/fit_timing.py"), "--settings", "fig9"],
                         cwd=project, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "unknown" in bad.stderr and "Traceback" not in bad.stderr


def test_profile_run_splits_a_learner_run_into_its_parts_without_touching_the_runs_files(project, tmp_path):
    """scripts/profile_run.py: a warm-up run, then the profiled one, both in the scratch folder;
    the parts add up to the profiled total, the TD updates and the collection take time, and
    the run's own records are left as they were. An unknown setting fails in one line."""
    record = project / "metrics/marl/marl_vdn_seed0.json"
    before = record.read_bytes()
    out_file = tmp_path / "profile.json"
    out = subprocess.run([sys.executable, str(REPO_ROOT / "scripts/profile_run.py"), "--scratch",
                          str(tmp_path / "scratch"), "--out", str(out_file)],
                         cwd=project, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    got = json.loads(out_file.read_text())
    parts = got["parts_s"]
    assert set(parts) == {"TD updates", "collecting episodes", "fit: upload offsets",
                          "fit: association slope", "fit: serve covered", "the rest"}
    assert math.isclose(sum(parts.values()), got["total_s"], rel_tol=1e-9)
    assert parts["TD updates"] > 0 and parts["collecting episodes"] > 0 and parts["the rest"] >= 0
    assert 0 < got["details_s"]["TD loss (forward)"] < parts["TD updates"]
    assert math.isfinite(got["team_reward"]) and "TD updates" in out.stdout
    assert (tmp_path / "scratch/metrics/marl_vdn_seed0.json").is_file()
    assert record.read_bytes() == before
    bad = subprocess.run([sys.executable, str(REPO_ROOT / "scripts/profile_run.py"), "--setting", "fig9"],
                         cwd=project, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "unknown" in bad.stderr and "Traceback" not in bad.stderr


def test_retry_offsets_at_force_play_the_retry_rule_through_the_learner(project, tmp_path, monkeypatch):
    """scripts/retry_offsets.py: its rows carry the run's own fit, the walk never scores below
    its start on the validation episodes, and a retry start at +-force played through a saved
    VDN model (serving every covered user, the nearest BS's association) is the retry rule of
    scripts/retry_rules.py, action for action."""
    import numpy as np

    from dntsync.config import load_config
    from dntsync.env import DntEnv
    from dntsync.marl.training import RunPaths, load_q_networks
    from dntsync.twin.predictor import build_predictor

    rows_file = tmp_path / "retry_offsets.json"
    out = subprocess.run([sys.executable, str(REPO_ROOT / "scripts/retry_offsets.py"), "--settings", "fig3",
                          "--episodes", "4", "--periods", "2", "3", "--out", str(rows_file)], cwd=project,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = json.loads(rows_file.read_text())["rows"]["fig3"]
    assert [r["seed"] for r in rows] == [0, 1]
    for row in rows:
        run = json.loads((project / f"metrics/marl/marl_vdn_seed{row['seed']}.json").read_text())
        assert row["run_eval"] == run["eval_team_reward"]
        assert row["walk_validation"] >= row["start_validation"]
        assert math.isfinite(row["holdout_gain"]) and row["holdout_se"] >= 0

    monkeypatch.chdir(project)
    monkeypatch.syspath_prepend(str(REPO_ROOT / "scripts"))
    from retry_offsets import retry_policy, retry_starts

    from dntsync.env.policies import NearestBS

    cfg = load_config(project / "conf/params.yaml")
    predictor, _ = build_predictor(cfg)
    learner, _ = load_q_networks(RunPaths.of(cfg, "vdn", 0).model, cfg)
    learner.online.serve_covered.fill_(1.0)
    learner.online.association.slope.fill_(cfg.marl.upload_offsets.force)
    length = cfg.scenario.episode_length
    for offsets, phases in retry_starts(cfg.scenario.n_bs, (2, 3), cfg.marl.upload_offsets.force):
        env = DntEnv(cfg.scenario, predictor, n_envs=16, seed=7, **cfg.env.observation_options())
        mine = retry_policy(learner.online, offsets, phases, length)
        rule = NearestBS(cfg.scenario, offsets.shape[1], phases=phases, retry=True)
        obs, _ = env.reset()
        mine.begin_episode(16)
        for _ in range(length):
            actions = mine.act(env.state, obs)
            np.testing.assert_array_equal(actions, rule.act(env.state))
            obs = env.step(actions).obs


def test_mlflow_holds_the_runs_under_one_parent(project):
    db = sqlite3.connect(project / "mlflow.db")
    counts = dict(db.execute(
        "select e.name, count(*) from runs r join experiments e using (experiment_id) "
        "where r.lifecycle_stage = 'active' group by e.name").fetchall())
    # 3 algos x 2 seeds for Fig. 3, and 2 points x 2 algos x 2 seeds for each of Figs. 4, 5
    assert counts["dntsync-marl"] == len(LEARNERS) + 8 + 8
    assert counts["dntsync-twin"] == 2  # the main twin and the 4-user twin of Fig. 5
    assert counts["dntsync-pipeline"] == 1
    parent = db.execute("select run_uuid from runs r join experiments e using (experiment_id) "
                        "where e.name = 'dntsync-pipeline'").fetchone()[0]
    children = db.execute("select count(*) from tags where key = 'mlflow.parentRunId' "
                          "and value = ?", (parent,)).fetchone()[0]
    assert children == len(LEARNERS) + 16 + 2
    stages = {v for (v,) in db.execute("select value from tags where key = 'dvc_stage'")}
    assert {"train_twin", *LEARNERS, "sweep@fig4", "sweep@fig5"} <= stages


def test_every_command_the_report_names_runs(project):
    """Each `dvc ...` of reports/RESULTS.md with --dry, each `make ...` with -n, each
    `dntsync ...` for real (the report's own and the diagnoses are quick)."""
    report = (project / "reports/RESULTS.md").read_text()
    commands = sorted({c for c in re.findall(r"`([^`]+)`", report)
                       if c.split()[0] in ("dvc", "dntsync", "make")})
    assert any(c.startswith("dvc repro sweep@") for c in commands) and "make ablation" in commands
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    for command in commands:
        words = command.split()
        if words[0] == "dvc":
            words = [str(BIN / "dvc"), words[1], "--dry", *words[2:]]
        elif words[0] == "make":
            words = ["make", "-n", *words[1:]]
        elif words[1] == "report":
            continue  # writes reports/RESULTS.md, a DVC output: `dvc repro --dry report` instead
        out = subprocess.run(words, cwd=project, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, (command, out.stdout[-2000:] + out.stderr[-2000:])


def test_mlflow_runs_tell_themselves_apart_and_carry_their_models(project):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                            text=True).stdout.strip()
    marl = mlflow.search_runs(experiment_names=["dntsync-marl"], output_format="list")
    names = sorted(r.info.run_name for r in marl)
    assert len(set(names)) == len(names) == len(LEARNERS) + 8 + 8  # Fig. 3, Fig. 4, Fig. 5
    assert {"fig3 vdn s0", "fig3 iql s1", "fig4 eps=0.25 vdn s1", "fig5 n_users=4 iql s0"} <= set(names)
    for run in marl:
        tags = run.data.tags
        assert tags["profile"] == "tiny" and tags["git_commit"] == commit  # the project's commit
        assert {"stage", "sweep", "algo", "seed"} <= set(tags)
        assert "eval_team_reward" in run.data.metrics and "ratio_to_oracle" in run.data.metrics
        assert not any(k.startswith("baseline_") for k in run.data.metrics)
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"baselines.json", f"convergence_{tags['algo']}_seed{tags['seed']}.png"} <= artifacts
    fig4 = next(r for r in marl if r.info.run_name == "fig4 eps=0.25 vdn s1")
    assert (fig4.data.tags["sweep"], fig4.data.tags["point"]) == ("fig4", "eps=0.25")
    # the policies and the twin are MLflow PyTorch models; the Fig. 3 ones are registered
    policy = mlflow.pytorch.load_model(f"runs:/{fig4.info.run_id}/policy")
    obs_dim = policy.nets.agents[0].encoder.in_features
    assert policy(torch.zeros(2, 3, 3, obs_dim)).shape == (2, 3, 3)
    registered = {m.name for m in client.search_registered_models()}
    assert registered == {*(f"dntsync-{a}" for a in FIG3_ALGOS), "dntsync-twin"}
    [twin] = [r for r in mlflow.search_runs(experiment_names=["dntsync-twin"], output_format="list")
              if r.info.run_name == "twin"]
    assert twin.inputs.dataset_inputs[0].dataset.source  # the data set is the run's input
    [parent] = mlflow.search_runs(experiment_names=["dntsync-pipeline"], output_format="list")
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    figures = {a.path for a in client.list_artifacts(parent.info.run_id, "figures")}
    assert "RESULTS.md" in artifacts and {f"figures/{f}" for f in FIGURES} <= figures


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


def test_dvc_metrics_show_is_a_table_of_headline_numbers(project):
    table = dvc(project, "metrics", "show")
    header, *rows = table.strip().splitlines()
    # a handful of columns, one row per learner run, sweep point x learner, twin, Fig. 6 run
    assert header.split()[1:] == sorted(["bayes_floor", "dnt_error", "ratio_to_oracle", "sum_rate",
                                         "team_reward", "twin_mse", "twin_ratio"])
    assert len(rows) == 1 + len(LEARNERS) + 2 * 4 + 2 and max(len(r) for r in rows) <= 160
    for path in ("metrics/summary/twin.json", "metrics/summary/marl_vdn_seed1.json",
                 "metrics/summary/fig4/eps=0.8_iql.json", "metrics/summary/fig6/vdn.json"):
        assert path in table, path
    # the numbers are the runs': the long reports they come from are plain outputs
    shown = json.loads(dvc(project, "metrics", "show", "--json"))[""]["data"]
    run = json.loads((project / "metrics/marl/marl_vdn_seed1.json").read_text())
    assert shown["metrics/summary/marl_vdn_seed1.json"]["data"]["team_reward"] == pytest.approx(
        run["eval_team_reward"], abs=1e-4)
    assert not any(path.startswith("metrics/marl/") for path in shown)


def test_every_dvc_plot_names_its_x_and_y(project):
    spec = yaml.safe_load((project / "dvc.yaml").read_text())
    learner_plots = spec["stages"]["train_marl"]["plots"]
    assert [(p[k]["x"], p[k]["y"]) for p in learner_plots for k in p] == [("epoch", "eval_team_reward")]
    assert all({"x", "y"} <= set(entry[name]) for entry in spec["plots"] for name in entry)
    shown = json.loads(dvc(project, "plots", "show", "--json"))["data"]
    fig2 = next(v for k, v in shown.items() if k.startswith("Fig. 2"))[0]["content"]
    assert {r["field"] for r in fig2["data"]["values"]} == {"x_true", "x_pred"}
    curve = shown["metrics/marl/curves/marl_vdn_seed0.csv"][0]["content"]
    assert '"field": "epoch"' in json.dumps(curve["encoding"]) or '"epoch"' in json.dumps(curve)


def test_dvc_plots_show_writes_the_html_page(project):
    page = project / "dvc_plots" / "index.html"
    try:
        out = dvc(project, "plots", "show")
        assert str(page) in out
        html = page.read_text()
        # every plot of dvc.yaml, drawn with its data: Fig. 2's points, the figures' data
        # (DVC names a plot by its id) and the learners' curves
        for field in ("x_pred", "sum_rate_mean", "dnt_error_mean", "eval_team_reward"):
            assert field in html, field
        assert "marl_vdn_seed0_csv" in html and html.count("vegaEmbed(") == 6 + len(LEARNERS)
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
        assert len(runs) == len(LEARNERS) + 16 and all(r["info"]["status"] == "FINISHED" for r in runs)
        tags = {t["key"]: t["value"] for t in runs[0]["data"]["tags"]}
        assert {"dvc_stage", "git_commit", "mlflow.parentRunId"} <= set(tags)


def test_dvc_exp_run_reruns_the_dependents_of_a_changed_parameter(project, tmp_path, monkeypatch):
    """`dvc exp run -S conf/params.yaml:scenario.n_rbs=9` in a copy of the project (it leaves
    its results in the workspace): the learners are trained again with N = 9, the paths and
    the twin are not, and the experiment is recorded with its parameter and outputs.

    On the tiny profile (6 users) 9 RBs are never short, so the learners' rewards do not
    change; what is checked is that the stages reading `scenario` ran on the new value. The
    headline metrics (`metrics/summary/`) and dvc.lock are committed as after `make run`, so
    `dvc exp show` has metric values for the baseline and for the experiment."""
    copy = tmp_path / "proj"
    shutil.copytree(project, copy, symlinks=True)
    git = lambda *a: subprocess.run(["git", *a], cwd=copy, check=True, capture_output=True)  # noqa: E731
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "results")
    tracked = subprocess.run(["git", "ls-files"], cwd=copy, capture_output=True, text=True).stdout
    assert "dvc.lock" in tracked and "metrics/summary/twin.json" in tracked
    # the long reports stay out of git (docs/results/ keeps copies of a run's, by design)
    assert not [f for f in tracked.splitlines() if f.startswith("metrics/marl/")]

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
    assert all(f"models/marl/{a}_seed{s}.ckpt" in hashes for a in FIG3_ALGOS for s in (0, 1))
    # the README's narrow table: the kept columns only, both rows with their numbers
    monkeypatch.setenv("COLUMNS", "200")  # a wide terminal: rich cuts column names otherwise
    table = dvc(copy, "exp", "show", "--no-pager", "--drop", ".*", "--keep",
                r"Experiment|scenario\.n_rbs|.*_vdn_seed0\.json:team_reward")
    header = next(line for line in table.splitlines() if "Experiment" in line).split()
    assert {"Experiment", "metrics/summary/marl_vdn_seed0.json:team_reward", "scenario.n_rbs"} <= set(header)
    assert len(header) <= 4  # Experiment, (Created,) the metric, the parameter
    # metric values for both rows (the baseline's from git, the experiment's from its commit)
    for row in (baseline, experiment):
        metrics = row["data"]["metrics"]
        assert metrics["metrics/summary/marl_vdn_seed0.json"]["data"]["team_reward"] is not None
        assert "team_reward" in metrics["metrics/summary/fig4/eps=0.8_vdn.json"]["data"]
