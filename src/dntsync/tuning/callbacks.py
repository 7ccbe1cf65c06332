"""Lightning callbacks a trial hands to the trainers (imported only when a trial runs)."""

from __future__ import annotations

import lightning.pytorch as pl
import mlflow
from lightning.pytorch.callbacks import Callback


class LogMonitored(Callback):
    """Logs the monitored metric to the active MLflow run (the trial's) at each evaluation.

    The trainers run with their own MLflow logging off during a study, so this is the
    trial's learning curve: the same values, at the same epochs, that the pruner sees.
    """

    def __init__(self, monitor: str) -> None:
        self.monitor = monitor

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])
        mlflow.log_metric(self.monitor, value, step=pl_module.current_epoch)
