"""Run the whole DVC pipeline (`dvc repro`) under one MLflow parent run.

Without `--profile`, it reproduces this repository's pipeline on `conf/params.yaml`.
With `--profile FILE` (e.g. `conf/profiles/quick.yaml`), it first lays a copy of the
project in `--dest` (default `.profiles/<name>`) whose `conf/params.yaml` is this one's
overlaid by the profile, makes it a git repository, and reproduces the pipeline there, so a
reduced run never mixes its outputs, DVC cache or MLflow runs with the paper-sized ones.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from dntsync.config import Config, from_dict, load_config, merge, read_yaml_file
from dntsync.files import write_text
from dntsync.stages.runs import run_jobs
from dntsync.tracking import COMMIT_ENV, PARENT_ENV, PROFILE_ENV, git_commit, mlflow_run, prepare_store

PROJECT_FILES_CMD = ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"]


def add_arguments(parser) -> None:
    parser.add_argument("--profile", default=None, metavar="FILE",
                        help="YAML overlay of conf/params.yaml; run the pipeline in a copy")
    parser.add_argument("--dest", default=None, metavar="DIR",
                        help="where the profile's copy lives (default .profiles/<profile name>)")
    parser.add_argument("--force", action="store_true", help="dvc repro --force")


def project_files(root: Path) -> list[str]:
    out = subprocess.run(PROJECT_FILES_CMD, cwd=root, capture_output=True, check=True)
    return [p for p in out.stdout.decode().split("\0") if p and (root / p).is_file()]


def materialise(root: Path, profile: Path, dest: Path) -> Path:
    """Copy the project's files to `dest` with params overlaid by `profile`; git-init it."""
    overlay = read_yaml_file(profile, "profile")
    base = read_yaml_file(root / "conf/params.yaml", "params file")
    params = merge(base, overlay)
    from_dict(params)  # validate before any work
    dest.mkdir(parents=True, exist_ok=True)
    for rel in project_files(root):
        # not another profile's copy, nor this project's own results (its dvc.lock and
        # headline metrics): the copy starts with none and makes its own
        if rel.startswith((".profiles/", "metrics/")) or rel == "dvc.lock":
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, target)
    write_text(dest / "conf/params.yaml", f"# generated from conf/params.yaml + {profile}\n"
               + yaml.safe_dump(params, sort_keys=False))
    git = lambda *a: subprocess.run(["git", *a], cwd=dest, check=True, capture_output=True)  # noqa: E731
    if not (dest / ".git").exists():
        git("init", "-q")
    git("add", "-A")
    git("-c", "user.name=dntsync", "-c", "user.email=dntsync@localhost", "commit", "-q",
        "--allow-empty", "-m", f"profile {profile.stem}")
    return dest


def matrix_stages(cfg: Config) -> list[str]:
    """The `train_marl` matrix of dvc.yaml: one stage per algorithm and seed."""
    return [f"train_marl@{a}-{s}" for a in cfg.sweeps.fig3_algos for s in cfg.marl.seeds]


LOGS = Path("logs/pipeline")  # one file per parallel stage: its output, not the console's
DVC_HINT = "Use `dvc push` to send your updates to remote storage."  # no remote here


def run_stages(stages: list[str], dvc: str, workers: int, logs: Path, cwd: Path,
               env: dict[str, str], cluster: str | None = None) -> int:
    """`dvc repro --single-item` of each stage, `workers` at a time (`run_jobs`, on
    `cluster` if given), each one's output to `logs/<stage>.log`; the first non-zero exit
    code (or 0), each failure's log tail said."""
    logs.mkdir(parents=True, exist_ok=True)
    jobs = [("command", stage, [dvc, "--wait-for-lock", "repro", "--single-item", stage],
             str(logs / f"{stage}.log"), str(cwd), env) for stage in stages]
    results = run_jobs(jobs, workers, f"train_marl (logs in {logs})", cluster=cluster)
    failed = [r for r in results if r["returncode"]]
    for r in failed:
        tail = Path(r["log"]).read_text().splitlines()[-15:]
        print(f"{r['name']} failed (exit {r['returncode']}); the end of {r['log']}:\n"
              + "\n".join(tail), file=sys.stderr)
    return failed[0]["returncode"] if failed else 0


def run_dvc(command: list[str], **popen) -> int:
    """A `dvc` command with its output passed through, less DVC's hint to push to a remote."""
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, bufsize=1, **popen) as proc:
        for line in proc.stdout:
            if line.strip() != DVC_HINT:
                print(line, end="", flush=True)
    return proc.returncode


def repro(cfg: Config, workdir: Path, force: bool = False) -> int:
    """`dvc repro` of the whole pipeline; the `train_marl` matrix `sweeps.workers` at a time.

    DVC runs one stage after another, but it releases its repository lock while a stage's
    command runs (each stage still holds read locks on its deps and write locks on its
    outs), so independent stages can be reproduced by several `dvc repro --single-item`
    processes at once; `--wait-for-lock` makes them queue for the lock instead of failing
    while another one saves its results. So: the stages up to the twin, then the learner
    stages in parallel, then a plain `dvc repro`, which runs what is left and finds
    everything else up to date. With `force`, one serial `dvc repro --force`.
    """
    beside = Path(sys.executable).with_name("dvc")  # this venv's dvc first
    dvc = str(beside) if beside.exists() else shutil.which("dvc") or "dvc"
    start = time.perf_counter()
    prepare_store(cfg)
    with mlflow_run(cfg, "pipeline", run_name=f"dvc repro ({workdir.name})",
                    sections=("seed", "scenario")) as run:
        # stages call `dntsync`: make this interpreter's scripts folder (the venv's) findable
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        env = dict(os.environ, PATH=path, **{PARENT_ENV: run.info.run_id})
        if force:
            returncode = run_dvc([dvc, "repro", "--force"], cwd=workdir, env=env)
        else:
            returncode = run_dvc([dvc, "repro", "train_twin"], cwd=workdir, env=env)
            if returncode == 0:
                returncode = run_stages(matrix_stages(cfg), dvc, cfg.sweeps.workers,
                                        workdir / LOGS, workdir, env, cfg.sweeps.cluster)
            if returncode == 0:
                returncode = run_dvc([dvc, "repro"], cwd=workdir, env=env)
        import mlflow

        mlflow.log_metric("wall_time_s", time.perf_counter() - start)
        mlflow.set_tag("dvc_repro_returncode", str(returncode))
        report = workdir / "reports" / "RESULTS.md"
        if report.exists():
            mlflow.log_artifact(str(report))
        for png in sorted((workdir / "figures").glob("*.png")):
            mlflow.log_artifact(str(png), artifact_path="figures")
    return returncode


def run(cfg: Config, args) -> int:
    root = Path.cwd()
    if args.profile is None:
        return repro(cfg, root, args.force)
    profile = Path(args.profile)
    if not profile.exists():
        print(f"profile {profile} does not exist; see conf/profiles/", file=sys.stderr)
        return 2
    dest = Path(args.dest or f".profiles/{profile.stem}").resolve()
    materialise(root, profile, dest)
    cwd, saved = Path.cwd(), {k: os.environ.get(k) for k in (PROFILE_ENV, COMMIT_ENV)}
    os.environ.update({PROFILE_ENV: profile.stem, COMMIT_ENV: git_commit()})  # the project's
    os.chdir(dest)
    try:
        sub_cfg = load_config("conf/params.yaml")
        return repro(sub_cfg, dest, args.force)
    finally:
        os.chdir(cwd)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
