"""MLflow tracking shared by every stage.

Embedded default: `sqlite:///mlflow.db` (no server). One experiment per stage kind
(`<prefix>-<stage>`); every run is tagged with its DVC stage and git commit and, when
`DNTSYNC_PARENT_RUN_ID` is set (by `dntsync pipeline` / `make run`), nested under that parent
run so one `dvc repro` groups its runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dntsync.config import Config, to_plain

PARENT_ENV = "DNTSYNC_PARENT_RUN_ID"
# set by `dntsync pipeline --profile` for the stages it runs in the profile's copy: the
# profile's name and the project's own commit (the copy is a git repository of its own)
PROFILE_ENV = "DNTSYNC_PROFILE"
COMMIT_ENV = "DNTSYNC_PROJECT_COMMIT"


def git_commit() -> str:
    """The project's commit: `COMMIT_ENV` in a profile's copy, else `git rev-parse HEAD`."""
    if os.environ.get(COMMIT_ENV):
        return os.environ[COMMIT_ENV]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a.b": value}; lists become strings (MLflow params are strings)."""
    out: dict[str, Any] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    out[prefix[:-1]] = str(tree) if isinstance(tree, (list, tuple)) else tree
    return out


@contextlib.contextmanager
def quiet_logger(name: str, level: int = logging.ERROR) -> Iterator[None]:
    """Raise a library logger's level for the block (a note it repeats on every run)."""
    logger = logging.getLogger(name)
    old = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(old)


def log_torch_model(module, name: str, example, registered: str | None = None) -> None:
    """`module` as an MLflow PyTorch model of the active run under `name`, with the signature
    of `example` -> `module(example)`, registered as `registered` if given. Pickled (pt2
    needs a traceable graph; the Q heads' masked max is data-dependent), with torch pinned
    so MLflow does not infer requirements; its note that pickles run code on load is quieted
    (the project's own loaders never unpickle)."""
    import mlflow
    import torch
    from mlflow.models import infer_signature

    with torch.no_grad():
        signature = infer_signature(example.numpy(), module(example).numpy())
    with quiet_logger("mlflow.pytorch"):
        mlflow.pytorch.log_model(module, name=name, signature=signature,
                                 pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                                 registered_model_name=registered, serialization_format="pickle")


def experiment_name(cfg: Config, stage: str) -> str:
    return f"{cfg.tracking.experiment_prefix}-{stage}"


STAGES = ("pipeline", "twin", "marl", "tune")


def sqlite_file(uri: str) -> Path | None:
    """The database file of a local SQLite tracking URI, or None (a server)."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def store_lock(uri: str) -> contextlib.AbstractContextManager:
    """An inter-process lock beside a local SQLite store (`<db>.lock`); none for a server.

    MLflow creates and migrates a new SQLite store on first use with alembic, and two
    processes doing it at once collide ("table ... already exists") and can leave the file
    unusable; a server's database is created by the server alone."""
    db = sqlite_file(uri)
    if db is None:
        return contextlib.nullcontext()
    from filelock import FileLock

    db.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(f"{db}.lock", timeout=600)


def prepare_store(cfg: Config, stages: tuple[str, ...] = STAGES) -> None:
    """Create (or migrate) the tracking store and the experiments of `stages`, under
    `store_lock`: every command that tracks calls it before its run starts."""
    import mlflow

    uri = cfg.tracking.mlflow_uri
    with store_lock(uri):
        mlflow.set_tracking_uri(uri)
        for stage in stages:
            name = experiment_name(cfg, stage)
            location = artifact_location(uri, name)
            if location and mlflow.get_experiment_by_name(name) is None:  # under the lock
                mlflow.create_experiment(name, artifact_location=location)
            mlflow.set_experiment(name)


def artifact_location(uri: str, experiment: str) -> str | None:
    """Where a new experiment's artifacts go: for a local SQLite store `mlartifacts/<name>`
    beside the database file (MLflow's default, `./mlruns`, is relative to wherever the
    command runs); for a server, the server's choice (None)."""
    db = sqlite_file(uri)
    return None if db is None else (db.resolve().parent / "mlartifacts" / experiment).as_uri()


@contextlib.contextmanager
def mlflow_run(cfg: Config, stage: str, run_name: str | None = None,
               sections: tuple[str, ...] = ("seed", "scenario"),
               tags: dict[str, str] | None = None, run_id: str | None = None) -> Iterator[Any]:
    """Start an MLflow run for `stage` with the named config sections logged as params.

    With `run_id` (an interrupted run's, see `dntsync.marl.training.tracked_run_id`) that
    run is continued if the store still has it: params it already holds are kept (one whose
    value changed, e.g. `marl.algorithm.epochs` of an extended run, is tagged `changed_on_resume.<key>`)."""
    import mlflow

    prepare_store(cfg, (stage,))
    mlflow.set_experiment(experiment_name(cfg, stage))
    dvc_stage = os.environ.get("DVC_STAGE", stage)  # DVC sets it for a stage's command
    all_tags = {"dvc_stage": dvc_stage, "git_commit": git_commit(), "stage": dvc_stage,
                "profile": os.environ.get(PROFILE_ENV, "default")}
    parent = os.environ.get(PARENT_ENV)
    if parent:
        all_tags["mlflow.parentRunId"] = parent
    all_tags.update(tags or {})
    plain = to_plain(cfg)
    params = flatten({k: plain[k] for k in sections})
    nested = mlflow.active_run() is not None  # e.g. an Optuna trial inside a study's run
    if nested:
        all_tags.pop("mlflow.parentRunId", None)
    if run_id is not None:
        try:
            held = mlflow.get_run(run_id).data.params
        except mlflow.exceptions.MlflowException:
            run_id, held = None, {}
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name or stage,
                          tags=all_tags, nested=nested) as run:
        if run_id is None:
            mlflow.log_params(params)
        else:
            mlflow.log_params({k: v for k, v in params.items() if k not in held})
            mlflow.set_tags({f"changed_on_resume.{k}": str(v) for k, v in params.items()
                             if k in held and held[k] != str(v)})
        yield run


@contextlib.contextmanager
def training_run(cfg: Config, stage: str, enabled: bool = True, **run_options: Any) -> Iterator[tuple]:
    """The one MLflow wrapper of a Lightning training run (the twin's, a learner's): `(run,
    logger)`, an MLflow run of `mlflow_run(cfg, stage, **run_options)` and Lightning's
    `MLFlowLogger` writing to that run; `(None, False)` when not `enabled` (no MLflow at all,
    and `False` is what `pl.Trainer(logger=...)` takes for no logger)."""
    if not enabled:
        yield None, False
        return
    from lightning.pytorch.loggers import MLFlowLogger

    with mlflow_run(cfg, stage, **run_options) as run:
        yield run, MLFlowLogger(experiment_name=experiment_name(cfg, stage),
                                tracking_uri=cfg.tracking.mlflow_uri, run_id=run.info.run_id)
