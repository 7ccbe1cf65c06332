"""The twin's predictor slot: how the DNT estimates s-hat_t when no upload comes (eq. 7).

A predictor maps the last K DNT statuses `history[B, K, U, 2]` to the estimate of the next
status `[B, U, 2]`. Two physics-based ones ship here; the GRU twin (`dntsync.twin`) plugs into
the same slot.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from dntsync.network.mobility import expected_next, move_probabilities
from dntsync.network.scenario import Scenario


@runtime_checkable
class Predictor(Protocol):
    name: str
    window: int  # K, how many past DNT statuses it reads

    def predict(self, history: np.ndarray) -> np.ndarray:
        """`[B, K, U, 2] -> [B, U, 2]`."""
        ...


class HoldLast:
    """s-hat_{t+1} = s-bar_t: the twin keeps the last status it has."""

    name = "hold-last"

    def __init__(self, window: int = 1) -> None:
        self.window = window

    def predict(self, history: np.ndarray) -> np.ndarray:
        return history[:, -1]


class Drift:
    """The Bayes-optimal one-step predictor E[l_{t+1} | l_t] under the scenario's p_u.

    It knows the true mobility model (which the GRU must learn from data), so on true inputs
    its one-step error is the Bayes floor.
    """

    name = "drift"

    def __init__(self, scenario: Scenario, window: int = 1) -> None:
        self.scenario = scenario
        self.window = window
        self.move_probs = move_probabilities(scenario)

    def predict(self, history: np.ndarray) -> np.ndarray:
        return expected_next(self.scenario, history[:, -1], self.move_probs)


PHYSICS_PREDICTORS = ("hold-last", "drift")


def physics_predictor(name: str, scenario: Scenario, window: int = 1) -> Predictor:
    """`hold-last` or `drift` by name."""
    if name == "hold-last":
        return HoldLast(window)
    if name == "drift":
        return Drift(scenario, window)
    raise ValueError(f"predictor {name!r} is not a physics predictor; choose from {PHYSICS_PREDICTORS}")
