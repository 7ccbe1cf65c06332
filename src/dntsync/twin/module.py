"""Training the GRU twin with Lightning: loss eq. (14), Adam with lambda_G, and self-feeding."""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from dntsync.errors import RunError
from dntsync.twin.model import GruTwin, Scaler, twin_loss


class TwinModule(pl.LightningModule):
    """The GRU twin (eqs. 9-13, `GruTwin`) trained on eq. (14) with Adam (lr = lambda_G).

    Self-feeding (`self_fed_steps` = J > 0): in the environment the twin reads its own
    predictions for every user whose BS did not upload (eq. 7), so a user's inputs are
    sometimes true, sometimes predicted. A share `self_fed_fraction` of the training samples
    therefore draws, per user, j_u ~ Uniform{0..J} (clipped to the slots since episode start)
    and replaces that user's last j_u statuses by the twin's own rollout, computed on the fly
    with the current weights and no gradient (`GruTwin.self_fed_windows`); the other samples
    are plain one-step windows of true statuses. With J >= K, windows made wholly of
    predictions (long unsynchronised stretches) are covered. The target is always the true
    s_{t+1}, so a self-fed sample carries the j-step uncertainty: its loss is about (1 + j)
    times the one-step floor, which is why `train_loss` sits well above `val_loss`.
    Validation is the plain one-step loss on true windows (`val_loss`, monitored by early
    stopping and by the Optuna pruner).
    """

    def __init__(self, n_users: int, window: int, hidden: int, num_layers: int, lr: float,
                 scaler: dict, self_fed_steps: int = 0, self_fed_fraction: float = 0.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = GruTwin(n_users, window, hidden, num_layers, Scaler.from_dict(scaler))
        self.lr = lr  # lambda_G
        self.self_fed_steps = self_fed_steps  # J
        self.self_fed_fraction = self_fed_fraction

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        return self.net(window)

    def _inputs(self, context: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.self_fed_steps == 0 or self.self_fed_fraction == 0:
            return context[:, -self.net.window:]
        batch, _, n_users, _ = context.shape
        fed = torch.randint(0, self.self_fed_steps + 1, (batch, n_users), device=context.device)
        fed = torch.minimum(fed, t[:, None])  # no prediction before the synchronised s_0
        plain = torch.rand(batch, device=context.device) >= self.self_fed_fraction
        fed[plain] = 0
        return self.net.self_fed_windows(context, fed)

    def training_step(self, batch, batch_idx):
        context, target, t = batch
        loss = twin_loss(self.net(self._inputs(context, t)), target)  # eq. (14)
        if not torch.isfinite(loss):
            raise RunError(f"the twin's training loss became {loss.item()} in epoch "
                           f"{self.current_epoch + 1}; no checkpoint was written (try a smaller twin.lr)")
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True,
                 batch_size=len(target))
        return loss

    def validation_step(self, batch, batch_idx):
        window, target, _ = batch
        loss = twin_loss(self.net(window), target)
        self.log("val_loss", loss, on_step=False, on_epoch=True, prog_bar=True,
                 batch_size=len(target))
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)
