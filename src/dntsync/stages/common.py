"""Wiring shared by the stages: building the twin's predictor from the config."""

from __future__ import annotations

from pathlib import Path

from dntsync.config import Config
from dntsync.env.predictors import Predictor, physics_predictor
from dntsync.errors import UserError


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
        from dntsync.twin import GruPredictor  # the twin layer; imported only when used

        return GruPredictor.load(path, scenario=cfg.scenario, window=window), f"gru:{path}"
    fallback = cfg.env.predictor_fallback
    if fallback == "none":
        raise UserError(
            f"env.twin_checkpoint = {str(path)!r} does not exist; run `dntsync train-twin` first "
            f"or set env.predictor to 'drift' or 'hold-last'"
        )
    return physics_predictor(fallback, cfg.scenario, window), f"{fallback} (no twin at {path})"
