"""Fit the GRU twin on the trajectory data set and report it honestly: `fit_twin`.

Used by `dntsync train-twin` and by the hyper-parameter tuner (which passes extra Lightning
callbacks, e.g. an Optuna pruner on "val_loss", and switches the outputs off).
"""

from __future__ import annotations

import contextlib
import copy
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping

from dntsync.config import Config
from dntsync.env.predictors import Drift, HoldLast
from dntsync.files import write_json
from dntsync.tracking import training_run
from dntsync.twin.checkpoint import save_twin
from dntsync.twin.data import TrajectoryData, TwinDataModule, load_trajectories
from dntsync.twin.evaluation import evaluate, one_step_predictions
from dntsync.twin.figure import pick_users, plot_trajectories
from dntsync.twin.model import Scaler
from dntsync.twin.module import TwinModule
from dntsync.twin.predictor import GruPredictor

MLFLOW_SECTIONS = ("seed", "scenario", "data", "twin")
# The loaders gather whole batches in the main process (one tensor index), so extra worker
# processes would only add start-up cost.
warnings.filterwarnings("ignore", ".*does not have many workers.*")


class BestWeights(Callback):
    """Keeps the weights of the epoch with the lowest `val_loss` (restored after fitting)."""

    def __init__(self) -> None:
        self.best_loss = float("inf")
        self.best_epoch = -1
        self.state: dict | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        loss = float(trainer.callback_metrics["val_loss"])
        if loss < self.best_loss:
            self.best_loss, self.best_epoch = loss, trainer.current_epoch
            self.state = copy.deepcopy(pl_module.state_dict())


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def build_module(cfg: Config) -> TwinModule:
    tw = cfg.twin
    return TwinModule(
        n_users=cfg.scenario.n_users, window=tw.window, hidden=tw.hidden,
        num_layers=tw.num_layers, lr=tw.lr, scaler=Scaler.from_scenario(cfg.scenario).to_dict(),
        self_fed_steps=tw.self_feeding_max_steps if tw.self_feeding else 0,
        self_fed_fraction=tw.self_feeding_fraction if tw.self_feeding else 0.0,
    )


def _train(cfg: Config, data: TrajectoryData, callbacks: list, logger, progress: bool):
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    module = build_module(cfg)
    datamodule = TwinDataModule(data, cfg.twin.window, cfg.twin.batch_size,
                                module.self_fed_steps, seed=cfg.seed)
    best = BestWeights()
    trainer = pl.Trainer(
        max_epochs=cfg.twin.max_epochs, accelerator="cpu", devices=1, deterministic=True,
        callbacks=[EarlyStopping("val_loss", min_delta=cfg.twin.min_delta,
                                 patience=cfg.twin.patience, mode="min"), best,
                   *callbacks],
        logger=logger, enable_checkpointing=False, enable_progress_bar=progress,
        enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=1,
    )
    trainer.fit(module, datamodule=datamodule)
    if best.state is not None:
        module.load_state_dict(best.state)
    return module.eval(), {"val_loss": best.best_loss, "best_epoch": best.best_epoch,
                           "epochs": trainer.current_epoch}


def _report(cfg: Config, data: TrajectoryData, module: TwinModule) -> tuple[dict, GruPredictor]:
    twin = GruPredictor(module.net)
    predictors = {"twin": twin, "hold_last": HoldLast(), "drift": Drift(cfg.scenario)}
    report = evaluate(predictors, data.positions["test"], cfg.scenario, data.move_probs,
                      cfg.twin.window, cfg.twin.eval_horizon)
    report["predictors"] = {
        "twin": "the GRU twin (best validation epoch)",
        "hold_last": "s-hat_{t+1} = s-bar_t",
        "drift": "E[l_{t+1} | l_t] under the true p_u (knows the model; ~ the floor)",
    }
    return report, twin


def _write_outputs(cfg: Config, data: TrajectoryData, module: TwinModule, report: dict,
                   twin: GruPredictor) -> list[Path]:
    ckpt = save_twin(cfg.twin.checkpoint, module.net, cfg.scenario,
                     extra={"data_hash": data.config_hash, "seed": cfg.seed,
                            "val_loss": report["training"]["val_loss"]})
    metrics = write_json(cfg.twin.metrics, report, indent=2)
    test = data.positions["test"]
    truth = test[:1]  # the first test trajectory
    pred = one_step_predictions(twin, truth, cfg.twin.window)[0]
    floor = np.asarray(report["one_step"]["per_user"]["floor"])
    mse = np.asarray(report["one_step"]["per_user"]["twin_mse"])
    png, table = plot_trajectories(cfg.twin.figure, truth[0], pred, pick_users(floor), mse, floor)
    return [ckpt, metrics, png, table]


def _mlflow_summary(report: dict) -> dict[str, float]:
    one, multi = report["one_step"]["overall"], report["multi_step"]
    out = {f"test_{k}": v for k, v in one.items()}
    for i, h in enumerate(multi["h"]):
        out[f"test_h{h}_twin_ratio"] = multi["twin_ratio"][i]
    out.update({f"targets_met_{k}": float(v) for k, v in report["targets_met"].items()})
    return out


def fit_twin(cfg: Config, *, callbacks: list | None = None, enable_progress_bar: bool = True,
             log_mlflow: bool = True, write_outputs: bool = True, name: str = "twin") -> dict:
    """Train the twin on `cfg.data.path`, early-stopped on `val_loss`; return the summary.

    The returned dict has `val_loss` (best validation eq. (14) loss), `best_epoch`, `epochs`,
    `wall_s`, `module` (the TwinModule with the best weights) and, with `write_outputs`,
    `metrics` (the test-set report written to `twin.metrics`) and `outputs` (paths written:
    checkpoint, metrics, figure, CSV). With `log_mlflow` it runs inside
    `training_run(cfg, "twin")` (nested under an active run, e.g. a tuning study's), whose
    Lightning logger writes to that run: params, per-epoch train/val losses, test metrics
    and the outputs as artifacts. Fails before any work if the data file does not fit `cfg`.
    """
    data = load_trajectories(cfg)
    callbacks = list(callbacks or [])
    with training_run(cfg, "twin", log_mlflow, run_name=name,
                      sections=MLFLOW_SECTIONS) as (run, logger):
        if run is None:
            return _fit_and_report(cfg, data, callbacks, logger, enable_progress_bar, write_outputs)
        import mlflow
        import mlflow.data

        mlflow.log_input(mlflow.data.from_numpy(data.positions["train"], source=data.path,
                                                name=f"trajectories-{data.config_hash}"),
                         context="training")
        result = _fit_and_report(cfg, data, callbacks, logger, enable_progress_bar, write_outputs)
        mlflow.log_metrics({"best_val_loss": result["val_loss"], "best_epoch": result["best_epoch"],
                            "wall_s": result["wall_s"]})
        if write_outputs:
            mlflow.log_metrics(_mlflow_summary(result["metrics"]))
            ckpt, metrics, png, table = result["outputs"]
            mlflow.log_artifact(str(ckpt), artifact_path="model")
            mlflow.log_artifact(str(metrics), artifact_path="metrics")
            mlflow.log_artifact(str(png), artifact_path="figures")
            mlflow.log_artifact(str(table), artifact_path="figures")
            log_twin_model(result["module"].net, cfg, registered=(
                f"{cfg.tracking.experiment_prefix}-twin" if name == "twin" else None))
        result["run_id"] = run.info.run_id
    return result


def log_twin_model(net, cfg: Config, registered: str | None) -> None:
    """The twin as an MLflow PyTorch model of the active run (K statuses of the U users,
    `[B, K, U, 2]` metres -> the next positions `[B, U, 2]`), registered if named."""
    from dntsync.tracking import log_torch_model

    log_torch_model(net, "twin", torch.zeros(1, cfg.twin.window, cfg.scenario.n_users, 2), registered)


def _fit_and_report(cfg: Config, data: TrajectoryData, callbacks: list, logger, progress: bool,
                    write_outputs: bool) -> dict:
    start = time.perf_counter()
    with torch_threads(cfg.twin.num_threads):
        module, fit = _train(cfg, data, callbacks, logger, progress)
        result = {**fit, "wall_s": time.perf_counter() - start, "module": module}
        if not write_outputs:
            return result
        report, twin = _report(cfg, data, module)
        report["training"] = {**fit, "wall_s": result["wall_s"],
                              "self_feeding": cfg.twin.self_feeding,
                              "self_feeding_max_steps": cfg.twin.self_feeding_max_steps,
                              "self_feeding_fraction": cfg.twin.self_feeding_fraction,
                              "n_train_trajectories": int(len(data.positions["train"])),
                              "n_val_trajectories": int(len(data.positions["val"]))}
        report["data"] = {"path": data.path, "config_hash": data.config_hash}
        result["metrics"] = report
        result["outputs"] = _write_outputs(cfg, data, module, report, twin)
    return result
