"""Honest test-set evaluation of any predictor (GRU twin, hold-last, drift) against the floor.

Every predictor goes through the environment's `Predictor.predict` on the same windows, so
the numbers are what the environment would see.
- One-step: windows of K *true* statuses (padded with s_0 at the start, as in the env),
  per-user MSE over all test slots, averaged over the two coordinates (Fig. 2), beside the
  per-user Bayes floor (`dntsync.network.bayes_floor`).
- Multi-step: from every start slot t0 = 0..T-H the predictor runs on its own predictions
  for h = 1..H slots (no upload comes), as the DNT does. Away from the boundary the h-step
  error of the best predictor (the drift E[l_{t+h} | l_t]) is the variance of a sum of h
  independent steps, h times the one-step floor: that is the floor reported for h.
The floor is the interior value; at the area's boundary blocked moves lower the variance, so
the drift predictor (which knows p_u) lands a little below it. `twin_over_drift` compares the
twin with that empirical floor.
"""

from __future__ import annotations

import numpy as np

from dntsync.env.predictors import Predictor
from dntsync.network.mobility import bayes_floor
from dntsync.network.scenario import Scenario
from dntsync.twin.data import padded

ONE_STEP_TARGET = 1.05  # overall one-step MSE / floor
MULTI_STEP_TARGET = 1.10  # h-step MSE / (h x floor) ...
MULTI_STEP_TARGET_HORIZON = 10  # ... for h = 1..10


def windows(positions: np.ndarray, window: int, starts: range) -> np.ndarray:
    """True K-status windows ending at s_t for t in `starts`: `[n, len(starts), K, U, 2]`."""
    track = padded(positions, window - 1)
    return np.stack([track[:, t:t + window] for t in starts], axis=1)


def one_step_predictions(predictor: Predictor, positions: np.ndarray, window: int) -> np.ndarray:
    """s-hat_{t+1} for t = 0..T-1 from true windows of `positions[n, T+1, U, 2]`: `[n, T, U, 2]`."""
    n, steps, n_users, _ = positions.shape
    win = windows(positions, window, range(steps - 1)).reshape(-1, window, n_users, 2)
    return np.asarray(predictor.predict(win), dtype=np.float64).reshape(n, steps - 1, n_users, 2)


def one_step_mse(predictor: Predictor, positions: np.ndarray, window: int) -> np.ndarray:
    """Per-user one-step MSE `[U]` over all slots, averaged over the two coordinates."""
    pred = one_step_predictions(predictor, positions, window)
    return ((pred - positions[:, 1:]) ** 2).mean(axis=(0, 1, 3))


def multi_step_mse(predictor: Predictor, positions: np.ndarray, window: int,
                   horizon: int) -> np.ndarray:
    """MSE `[H, U]` of the prediction of s_{t0+h} after h slots on the predictor's own outputs."""
    n, steps, n_users, _ = positions.shape
    horizon = min(horizon, steps - 1)
    starts = range(steps - horizon)
    hist = windows(positions, window, starts).reshape(-1, window, n_users, 2)
    truth = np.stack([positions[:, t0 + 1:t0 + 1 + horizon] for t0 in starts], axis=1)
    truth = truth.reshape(-1, horizon, n_users, 2)
    out = np.empty((horizon, n_users))
    for h in range(horizon):
        pred = np.asarray(predictor.predict(hist), dtype=np.float64)
        out[h] = ((pred - truth[:, h]) ** 2).mean(axis=(0, 2))
        hist = np.concatenate([hist[:, 1:], pred[:, None]], axis=1)
    return out


def _ratio(mse, floor):
    return (np.asarray(mse) / np.asarray(floor)).tolist()


def evaluate(predictors: dict[str, Predictor], positions: np.ndarray, scenario: Scenario,
             move_probs: np.ndarray, window: int, horizon: int, twin: str = "twin") -> dict:
    """The metrics of `metrics/twin.json` for every predictor on `positions` (the test split).

    `twin` names the predictor whose errors are held to the targets.
    """
    floor = bayes_floor(scenario, move_probs)  # [U]
    one = {name: one_step_mse(p, positions, window) for name, p in predictors.items()}
    multi = {name: multi_step_mse(p, positions, window, horizon) for name, p in predictors.items()}
    hs = np.arange(1, next(iter(multi.values())).shape[0] + 1)
    multi_floor = hs * floor.mean()
    report = {
        "n_trajectories": int(positions.shape[0]),
        "n_slots": int(positions.shape[1] - 1),
        "n_users": int(positions.shape[2]),
        "one_step": {
            "per_user": {"floor": floor.tolist(),
                         **{f"{n}_mse": m.tolist() for n, m in one.items()},
                         **{f"{n}_ratio": _ratio(m, floor) for n, m in one.items()}},
            "overall": {"floor": float(floor.mean()),
                        **{f"{n}_mse": float(m.mean()) for n, m in one.items()},
                        **{f"{n}_ratio": float(m.mean() / floor.mean()) for n, m in one.items()}},
        },
        "multi_step": {
            "h": hs.tolist(),
            "floor": multi_floor.tolist(),
            **{f"{n}_mse": m.mean(axis=1).tolist() for n, m in multi.items()},
            **{f"{n}_ratio": _ratio(m.mean(axis=1), multi_floor) for n, m in multi.items()},
        },
    }
    if "drift" in predictors:  # the Bayes predictor measured on the same windows: what the
        # floor is at this test set's boundary share (blocked moves lower the variance there)
        report["one_step"]["overall"][f"{twin}_over_drift"] = float(
            one[twin].mean() / one["drift"].mean())
        report["multi_step"][f"{twin}_over_drift"] = _ratio(multi[twin].mean(axis=1),
                                                            multi["drift"].mean(axis=1))
    checked = hs <= MULTI_STEP_TARGET_HORIZON
    one_ratio = report["one_step"]["overall"][f"{twin}_ratio"]
    multi_ratio = np.asarray(report["multi_step"][f"{twin}_ratio"])[checked]
    report["targets"] = {
        "one_step_ratio_max": ONE_STEP_TARGET,
        "multi_step_ratio_max": MULTI_STEP_TARGET,
        "multi_step_horizon": int(min(MULTI_STEP_TARGET_HORIZON, hs[-1])),
    }
    report["targets_met"] = {
        "one_step": bool(one_ratio <= ONE_STEP_TARGET),
        "multi_step": bool(np.all(multi_ratio <= MULTI_STEP_TARGET)),
    }
    return report
