"""The twin's checkpoint: one plain dict, written with `torch.save`, read with `weights_only=True`.

It holds everything needed to rebuild the model without the config that trained it: the
state dict, the sizes (U, K, N^h, layers), the scaler and the mobility fields of the scenario
it learned (a twin trained for other users' habits, another area or step length would be
silently wrong, so loading refuses it).
"""

from __future__ import annotations

from pathlib import Path

import torch

from dntsync.errors import UserError
from dntsync.files import save_torch
from dntsync.network.scenario import Scenario
from dntsync.twin.model import GruTwin, Scaler

FORMAT = "dntsync-twin"
VERSION = 1
# The scenario fields a twin depends on: U and everything that shapes p_u and the moves.
MOBILITY_FIELDS = ("n_users", "area_x", "area_y", "step_length", "dirichlet_alpha", "seed")
RETRAIN = "retrain with `dntsync generate && dntsync train-twin` under the same settings"


class TwinCheckpointError(UserError):
    """A twin checkpoint is unreadable or does not fit the run; the message names the fix."""


def mobility_of(scenario: Scenario) -> dict:
    plain = scenario.to_dict()
    return {k: plain[k] for k in MOBILITY_FIELDS}


def save_twin(path: str | Path, net: GruTwin, scenario: Scenario,
              extra: dict | None = None) -> Path:
    """Write `net` with its sizes, scaler and scenario; `extra` (plain values) is kept too."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "hparams": net.hparams(),
        "scaler": net.scaler.to_dict(),
        "scenario": mobility_of(scenario),
        "state_dict": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()},
        "extra": extra or {},
    }
    save_torch(payload, path)
    return path


def load_twin(path: str | Path, scenario: Scenario | None = None,
              window: int | None = None) -> tuple[GruTwin, dict]:
    """Rebuild the twin in `path` (CPU, eval mode) and return it with the raw payload.

    With `scenario`, its U and mobility fields must match the checkpoint's; with `window`, so
    must K. Anything else fails with a `TwinCheckpointError` naming both values and the fix.
    """
    path = Path(path)
    if not path.exists():
        raise TwinCheckpointError(f"twin checkpoint {str(path)!r} does not exist; {RETRAIN}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise TwinCheckpointError(
            f"twin checkpoint {str(path)!r} is corrupt or not a plain tensor dict "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); {RETRAIN}"
        ) from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise TwinCheckpointError(f"{str(path)!r} is not a dntsync twin checkpoint; {RETRAIN}")
    if payload.get("version") != VERSION:
        raise TwinCheckpointError(f"twin checkpoint {str(path)!r} has format version "
                                  f"{payload.get('version')}, this code reads {VERSION}; {RETRAIN}")
    hp = payload["hparams"]
    if scenario is not None:
        theirs, ours = payload["scenario"], mobility_of(scenario)
        if theirs["n_users"] != ours["n_users"]:
            raise TwinCheckpointError(
                f"twin checkpoint {str(path)!r} was trained for U = {theirs['n_users']} users but "
                f"the scenario has U = {ours['n_users']}; {RETRAIN}")
        diff = [f"scenario.{k} = {theirs[k]} in the checkpoint, {ours[k]} here"
                for k in MOBILITY_FIELDS if theirs[k] != ours[k]]
        if diff:
            raise TwinCheckpointError(f"twin checkpoint {str(path)!r} learned another mobility "
                                      f"model ({'; '.join(diff)}); {RETRAIN}")
    if window is not None and hp["window"] != window:
        raise TwinCheckpointError(
            f"twin checkpoint {str(path)!r} reads K = {hp['window']} statuses but K = {window} "
            f"was requested (twin.window); {RETRAIN}")
    net = GruTwin(hp["n_users"], hp["window"], hp["hidden"], hp["num_layers"],
                  Scaler.from_dict(payload["scaler"]))
    try:
        net.load_state_dict(payload["state_dict"])
    except (RuntimeError, KeyError) as err:
        raise TwinCheckpointError(f"twin checkpoint {str(path)!r} has weights that do not fit its "
                                  f"own sizes {hp} ({err}); {RETRAIN}") from err
    return net.eval(), payload
