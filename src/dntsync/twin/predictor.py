"""The GRU twin in the environment's predictor slot (`dntsync.env.predictors.Predictor`), and
`build_predictor`: the predictor a config names (the twin, or a physics rule)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dntsync.config import Config
from dntsync.env.predictors import Predictor, physics_predictor
from dntsync.errors import UserError
from dntsync.network.scenario import Scenario
from dntsync.twin.checkpoint import load_twin
from dntsync.twin.model import GruTwin


class GruPredictor:
    """s-hat_{t+1} from the K last DNT statuses, `history[B, K, U, 2] -> [B, U, 2]`.

    Runs the twin in float32 on the CPU under `torch.inference_mode()`; the returned array has
    the history's dtype.
    """

    name = "gru"

    def __init__(self, net: GruTwin) -> None:
        self.net = net.eval().cpu()
        self.window = net.window  # K

    @classmethod
    def load(cls, path: str | Path, scenario: Scenario | None = None,
             window: int | None = None) -> "GruPredictor":
        """From a checkpoint written by `dntsync train-twin`; checks U (and K if given)."""
        net, _ = load_twin(path, scenario=scenario, window=window)
        return cls(net)

    def predict(self, history: np.ndarray) -> np.ndarray:
        history = np.asarray(history)
        if history.ndim != 4 or history.shape[1:] != (self.window, self.net.n_users, 2):
            raise ValueError(f"history has shape {history.shape}; the twin needs "
                             f"[B, {self.window}, {self.net.n_users}, 2]")
        with torch.inference_mode():
            s_hat = self.net(torch.from_numpy(history.astype(np.float32, copy=False)))
        return s_hat.numpy().astype(history.dtype, copy=False)


def build_predictor(cfg: Config) -> tuple[Predictor, str]:
    """The predictor named by `env.predictor`, and a description for the run's params.

    "gru" loads `env.twin_checkpoint` (`dntsync.twin.GruPredictor.load`); if the checkpoint
    is missing, `env.predictor_fallback` is used instead and the description says so, or,
    with fallback "none", the run fails before any work.
    """
    name = cfg.env.predictor
    window = cfg.twin.window
    if name != "gru":
        return physics_predictor(name, cfg.scenario, window), name
    path = Path(cfg.env.twin_checkpoint)
    if path.exists():
        return GruPredictor.load(path, scenario=cfg.scenario, window=window), f"gru:{path}"
    fallback = cfg.env.predictor_fallback
    if fallback == "none":
        raise UserError(
            f"env.twin_checkpoint = {str(path)!r} does not exist; run `dntsync train-twin` first "
            f"or set env.predictor to 'drift' or 'hold-last'"
        )
    return physics_predictor(fallback, cfg.scenario, window), f"{fallback} (no twin at {path})"
