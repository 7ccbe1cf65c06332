"""Run an Optuna study over the typed config (`dntsync tune`; docs/tuning.md).

Each trial draws its knobs (`conf/search_space.yaml`), applies them as overrides on the
loaded config (validated like any config), and fits the objective's trainer with its
outputs off; the trainer's Lightning loop reports the monitored metric to the trial, and
a median pruner stops unpromising trials. Pruned and failed trials are recorded (PRUNED,
FAIL) and the study goes on.

`tune.n_trials` is the number of *finished* trials (complete, pruned or failed) the study
should hold in total, whatever ran them: an interrupted study called again runs only the
missing ones, and a second worker on the same storage shares the same budget. A trial
whose worker died (no heartbeat for `tune.grace_period` s) or was interrupted with Ctrl-C
is failed and queued again with the same parameters; the retry takes its place in the count.
"""

from __future__ import annotations

import importlib
import logging
import signal
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from dntsync.config import Config, ConfigError, to_plain
from dntsync.tuning.report import (
    best_trial,
    masked_url,
    save_figures,
    state_counts,
    write_best_params,
)
from dntsync.tuning.space import Knob, apply_values, load_space

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


@dataclass(frozen=True)
class Objective:
    """What a study optimises: a trainer, the metric it logs and returns, and a direction."""

    name: str
    metric: str  # logged by the trainer's LightningModule at each evaluation, and returned
    direction: Literal["minimize", "maximize"]
    trainer: str  # "module:function", imported when a trial runs
    sections: tuple[str, ...]  # config sections logged with the study's MLflow run
    train_command: str  # the command that uses the best parameters
    # (config -> file the trainer reads, hint) checked before the study starts
    requires: Callable[[Config], tuple[str, str]] | None = field(default=None, compare=False)

    def fit(self, cfg: Config, callbacks: list) -> float:
        module, function = self.trainer.split(":")
        fit = getattr(importlib.import_module(module), function)
        result = fit(cfg, callbacks=callbacks, enable_progress_bar=False, log_mlflow=False,
                     write_outputs=False)
        return float(result[self.metric])


OBJECTIVES = {
    "marl": Objective("marl", "eval_team_reward", "maximize", "dntsync.marl.training:fit_marl",
                      ("env", "marl"), "dntsync train-marl"),
    "twin": Objective("twin", "val_loss", "minimize", "dntsync.twin.training:fit_twin",
                      ("data", "twin"), "dntsync train-twin",
                      requires=lambda cfg: (cfg.data.path, "run `dntsync generate` first")),
}


def study_name(cfg: Config) -> str:
    """`tune.study_name`, or "twin" / "marl-<algo>" (VDN and IQL are tuned apart)."""
    if cfg.tune.study_name:
        return cfg.tune.study_name
    return f"marl-{cfg.marl.algorithm.name}" if cfg.tune.objective == "marl" else "twin"


def database_url(url: str) -> str:
    """`url` with a driver SQLAlchemy can load: SQLAlchemy 2.1 reads a bare postgresql:// as
    psycopg (3); the project installs psycopg2-binary, so name it when psycopg is absent."""
    if url.startswith("postgresql://"):
        try:
            import psycopg  # noqa: F401
        except ImportError:
            return "postgresql+psycopg2://" + url[len("postgresql://"):]
    return url


def open_storage(cfg: Config) -> RDBStorage:
    """The study's database, with heartbeats so a dead worker's trial is failed and retried."""
    tc = cfg.tune
    url = database_url(tc.storage)
    engine_kwargs = {}
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        # a writer waits up to 30 s for another connection's lock: sqlite3's default, 5 s, ran
        # out once in CI on the loaded 2 cores, for a Ctrl-C'd worker failing its trial
        engine_kwargs = {"connect_args": {"timeout": 30}}
    elif not url.startswith("sqlite"):
        engine_kwargs = {"pool_pre_ping": True}  # long studies outlive idle connections
    from sqlalchemy.exc import SQLAlchemyError

    # Workers that meet an empty database at the same moment race to create its tables; the
    # loser fails on a duplicate and, tried again, finds them made.
    for attempt in range(5):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(
                    url, engine_kwargs=engine_kwargs,
                    heartbeat_interval=tc.heartbeat_interval, grace_period=tc.grace_period,
                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
                        max_retry=tc.max_retry),
                )
        except SQLAlchemyError as err:
            failure = err
            time.sleep(0.5 * (attempt + 1))
    raise ConfigError(f"cannot open the study storage {masked_url(tc.storage)} "
                      f"(tune.storage): {failure}")


def build_pruner(cfg: Config) -> optuna.pruners.BasePruner:
    if cfg.tune.pruner == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=cfg.tune.pruner_startup_trials,
                                       n_warmup_steps=cfg.tune.pruner_warmup_epochs)


def sampler_seed(cfg: Config, n_existing: int, worker: int) -> int:
    """TPE's seed: `Config.seed` mixed with the trials already there and the worker index.

    A fresh study on one worker is reproducible; a resumed study or a second worker does not
    replay the random start-up draws of the first.
    """
    return int(np.random.SeedSequence([cfg.seed, n_existing, worker]).generate_state(1)[0])


def progress(study: optuna.Study) -> tuple[int, int, int]:
    """(finished, running, waiting) trials; a failed trial that was retried is not counted."""
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    finished = sum(t.state in FINISHED and t.number not in retried for t in trials)
    running = sum(t.state == TrialState.RUNNING for t in trials)
    waiting = sum(t.state == TrialState.WAITING for t in trials)
    return finished, running, waiting


def wants_more(study: optuna.Study, n_trials: int) -> bool:
    """Whether a worker should start another trial: queued retries first, then the budget."""
    finished, running, waiting = progress(study)
    return waiting > 0 or finished + running < n_trials


class TrialRunner:
    """The Optuna objective: one trial = sample, override, fit, report (one MLflow run)."""

    def __init__(self, cfg: Config, objective: Objective, knobs: tuple[Knob, ...],
                 name: str, worker: int) -> None:
        self.cfg, self.objective, self.knobs = cfg, objective, knobs
        self.name, self.worker = name, worker
        self.current: int | None = None  # the trial in progress (to requeue it on Ctrl-C)
        self.numbers: list[int] = []  # trials this runner ran

    def __call__(self, trial: optuna.Trial) -> float:
        import mlflow
        from optuna_integration import PyTorchLightningPruningCallback

        from dntsync.tracking import mlflow_run
        from dntsync.tuning.callbacks import LogMonitored

        self.current = trial.number
        self.numbers.append(trial.number)
        values = {knob.key: knob.suggest(trial) for knob in self.knobs}
        trial_cfg = apply_values(self.cfg, values)
        metric = self.objective.metric
        tags = {"study": self.name, "trial": str(trial.number), "objective": self.objective.name,
                "worker": str(self.worker)}
        frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
        if "failed_trial" in frozen.system_attrs:  # set by RetryHeartbeatStaleTrialCallback
            tags["retry_of_trial"] = str(frozen.system_attrs["failed_trial"])
        pruned: optuna.TrialPruned | None = None
        with mlflow_run(trial_cfg, "tune", run_name=f"{self.name}-trial-{trial.number}",
                        sections=(), tags=tags):
            mlflow.log_params(values)
            callbacks = [LogMonitored(metric), PyTorchLightningPruningCallback(trial, monitor=metric)]
            try:
                value = self.objective.fit(trial_cfg, callbacks)
            except optuna.TrialPruned as err:
                mlflow.set_tag("optuna_state", "PRUNED")
                pruned = err
            except Exception as err:
                message = f"{type(err).__name__}: {err}"
                trial.set_user_attr("error", message[:2000])
                mlflow.set_tags({"optuna_state": "FAIL", "error": message[:5000]})
                raise
            else:
                mlflow.log_metric("objective", value)
                mlflow.set_tag("optuna_state", "COMPLETE")
        if pruned is not None:
            raise pruned
        return value


@dataclass
class StudySummary:
    """What one `run_study` call did and where the results are."""

    study_name: str
    storage: str  # password hidden
    new_trials: list[int]  # trial numbers this call ran
    counts: dict[str, int]  # trials per state, whole study
    best_value: float | None
    best_params: dict[str, object]  # dotted config key -> value
    best_params_path: Path | None
    figures: list[Path]
    notes: list[str]
    wall_s: float
    interrupted: bool = False


def _open_study(cfg: Config, objective: Objective, knobs: tuple[Knob, ...],
                name: str) -> optuna.Study:
    study = optuna.create_study(storage=open_storage(cfg), study_name=name,
                                direction=objective.direction, pruner=build_pruner(cfg),
                                load_if_exists=True)
    if study.direction.name.lower() != objective.direction:
        raise ConfigError(f"study {name!r} is {study.direction.name.lower()}d, but objective "
                          f"{objective.name!r} is {objective.direction}d; choose another "
                          f"--study-name")
    stamp = {"objective": objective.name, "metric": objective.metric,
             "search_space": {k.name: k.describe() for k in knobs}}
    attrs = study.user_attrs
    for key, value in stamp.items():
        if key not in attrs:
            study.set_user_attr(key, value)
        elif attrs[key] != value:
            raise ConfigError(
                f"study {name!r} was started with {key} = {attrs[key]!r}, now {value!r}; "
                f"resume it unchanged or choose another --study-name")
    return study


def run_study(cfg: Config, *, worker: int = 0,
              pruner: optuna.pruners.BasePruner | None = None) -> StudySummary:
    """Run (or resume, or join) the study `study_name(cfg)` until it holds `tune.n_trials`
    finished trials or `tune.timeout` seconds pass; write its best parameters and figures.

    `worker` tells workers of one study apart (their samplers are seeded apart). `pruner`
    replaces the configured one (tests use `optuna.pruners.ThresholdPruner`).
    Raises ConfigError, before any trial, on a bad search space, a study started with another
    objective or space, or a missing input file.
    """
    tc = cfg.tune
    objective = OBJECTIVES[tc.objective]
    knobs = load_space(tc.search_space, cfg, objective.name)
    if objective.requires is not None:
        path, hint = objective.requires(cfg)
        if not Path(path).exists():
            raise ConfigError(f"objective {objective.name!r} needs {path!r}: {hint}")
    name = study_name(cfg)
    optuna.logging.set_verbosity(optuna.logging.INFO)
    start = time.perf_counter()
    study = _open_study(cfg, objective, knobs, name)
    if pruner is not None:
        study.pruner = pruner
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # a dead worker's trial: failed, queued again
    study.sampler = optuna.samplers.TPESampler(
        seed=sampler_seed(cfg, len(study.get_trials(deepcopy=False)), worker))
    runner = TrialRunner(cfg, objective, knobs, name, worker)

    import mlflow

    from dntsync.tracking import flatten, mlflow_run

    interrupted = False
    tags = {"study": name, "objective": objective.name, "worker": str(worker)}
    with mlflow_run(cfg, "tune", run_name=f"{name}-worker{worker}",
                    sections=("seed", "scenario", *objective.sections), tags=tags) as run:
        mlflow.log_params(flatten({"tune": {**to_plain(tc), "storage": masked_url(tc.storage)}}))
        if wants_more(study, tc.n_trials):
            interrupted = _optimize(study, runner, tc.n_trials, tc.timeout)
        else:
            finished, running, _ = progress(study)
            print(f"study {name!r} holds {finished} finished and {running} running trials of "
                  f"n_trials = {tc.n_trials}: nothing to run (raise --n-trials for more; a dead "
                  f"worker's running trial is retried after tune.grace_period s)")
        summary = _finish(study, knobs, objective, cfg, name, runner.numbers, start)
        summary.interrupted = interrupted
        _log_summary(summary, objective, run)
    return summary


def _optimize(study: optuna.Study, runner: TrialRunner, n_trials: int,
              timeout: float | None) -> bool:
    """Run trials until the study holds `n_trials` finished ones or `timeout` s pass; True
    when interrupted (Ctrl-C), the interrupted trial then queued again."""

    def stop_when_done(study: optuna.Study, _trial) -> None:
        if not wants_more(study, n_trials):
            study.stop()

    import lightning.pytorch  # noqa: F401  (it sets its logger's level on import)

    lightning_log = logging.getLogger("lightning.pytorch")
    level = lightning_log.level
    lightning_log.setLevel(logging.WARNING)  # no per-trial banners (GPU available, ...)
    try:
        study.optimize(runner, n_trials=None, timeout=timeout, catch=(Exception,),
                       callbacks=[stop_when_done], gc_after_trial=True)
        return False
    except (KeyboardInterrupt, SystemExit):  # Lightning turns Ctrl-C into sys.exit(1)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning set SIG_IGN
        _requeue(study, runner.current)
        return True
    finally:
        lightning_log.setLevel(level)


def _requeue(study: optuna.Study, number: int | None) -> None:
    """Queue an interrupted (Ctrl-C) trial again with the same parameters.

    Optuna records a KeyboardInterrupt as FAIL; Lightning turns it into SystemExit, which
    leaves the trial RUNNING, so it is failed here first. The retry replaces it in the count.
    """
    if number is None:
        return
    trial = next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)
    if trial is not None and trial.state == TrialState.RUNNING:
        study.tell(number, state=TrialState.FAIL)
        trial = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
    if trial is not None and trial.state == TrialState.FAIL:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            RetryHeartbeatStaleTrialCallback()(study, trial)
        print(f"interrupted: trial {number} is queued again and runs first on resume")


def _finish(study: optuna.Study, knobs: tuple[Knob, ...], objective: Objective, cfg: Config,
            name: str, new: list[int], start: float) -> StudySummary:
    tc = cfg.tune
    best = best_trial(study)
    path = write_best_params(study, knobs, Path(tc.output_dir) / f"{name}.yaml",
                             metric=objective.metric, train_command=objective.train_command,
                             storage=tc.storage)
    figures, notes = save_figures(study, Path(tc.figures_dir), name, objective.metric)
    if path is None:
        notes.append("no complete trial: no best parameters written")
    return StudySummary(
        study_name=name, storage=masked_url(tc.storage), new_trials=list(new),
        counts=state_counts(study),
        best_value=None if best is None else float(best.value),
        best_params={} if best is None else {k.key: best.params[k.name] for k in knobs
                                              if k.name in best.params},
        best_params_path=path, figures=figures, notes=notes,
        wall_s=time.perf_counter() - start,
    )


def _log_summary(summary: StudySummary, objective: Objective, run) -> None:
    import mlflow

    counts = summary.counts
    mlflow.log_metrics({f"n_{state}": float(counts[state])
                        for state in ("complete", "pruned", "fail", "running", "waiting")})
    if summary.best_value is not None:
        mlflow.log_metric(f"best_{objective.metric}", summary.best_value)
        mlflow.set_tags({f"best.{k}": str(v) for k, v in summary.best_params.items()})
    for path in summary.figures:
        mlflow.log_artifact(str(path), artifact_path="figures")
    if summary.best_params_path is not None:
        mlflow.log_artifact(str(summary.best_params_path), artifact_path="tuned")
    for note in summary.notes:
        print(f"note: {note}")
