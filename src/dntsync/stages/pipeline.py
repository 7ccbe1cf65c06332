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
from dntsync.tracking import PARENT_ENV, mlflow_run, prepare_store

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
        if rel.startswith(".profiles/"):
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
    return [f"train_marl@{a}-{s}" for a in cfg.sweeps.algos for s in cfg.marl.seeds]


def run_parallel(commands: list[list[str]], workers: int, **popen) -> int:
    """Run the commands, `workers` at a time; the first non-zero exit code (or 0)."""
    from tqdm import tqdm

    waiting, running, failed = list(commands), [], 0
    with tqdm(total=len(commands), desc=f"train_marl ({workers} at a time)") as bar:
        while waiting or running:
            while waiting and len(running) < workers and not failed:
                running.append(subprocess.Popen(waiting.pop(0), **popen))
            if not running:
                break
            time.sleep(0.5)
            for proc in [p for p in running if p.poll() is not None]:
                running.remove(proc)
                failed = failed or proc.returncode
                bar.update()
    return failed


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
            returncode = subprocess.run([dvc, "repro", "--force"], cwd=workdir, env=env).returncode
        else:
            returncode = subprocess.run([dvc, "repro", "train_twin"], cwd=workdir, env=env).returncode
            if returncode == 0:
                returncode = run_parallel(
                    [[dvc, "--wait-for-lock", "repro", "--single-item", stage]
                     for stage in matrix_stages(cfg)], cfg.sweeps.workers, cwd=workdir, env=env)
            if returncode == 0:
                returncode = subprocess.run([dvc, "repro"], cwd=workdir, env=env).returncode
        import mlflow

        mlflow.log_metric("wall_time_s", time.perf_counter() - start)
        mlflow.set_tag("dvc_repro_returncode", str(returncode))
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
    cwd = Path.cwd()
    os.chdir(dest)
    try:
        sub_cfg = load_config("conf/params.yaml")
        return repro(sub_cfg, dest, args.force)
    finally:
        os.chdir(cwd)
