"""Fig. 2: true vs predicted trajectories of three users on one test trajectory.

The three users are those with the lowest, the median and the highest Bayes floor (the paper
picks users of low and high "movement dynamics"). Predictions are one-step (true windows), as
in the paper; the legend gives each user's MSE over the whole test split beside its floor.
The plotted points are also written as CSV (same name, `.csv`) for `dvc plots`.
"""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from dntsync.files import atomic_path, save_figure  # noqa: E402


def pick_users(floor: np.ndarray) -> list[int]:
    """Users with the lowest, median and highest floor (distinct when U >= 3)."""
    order = np.argsort(floor, kind="stable")
    picks = [int(order[0]), int(order[len(order) // 2]), int(order[-1])]
    return list(dict.fromkeys(picks))


def plot_trajectories(path: str | Path, truth: np.ndarray, pred: np.ndarray, users: list[int],
                      mse: np.ndarray, floor: np.ndarray) -> tuple[Path, Path]:
    """`truth[T+1, U, 2]` of one trajectory, `pred[T, U, 2]` its one-step predictions of s_1..s_T.

    Writes the PNG at `path` and the CSV beside it; returns both paths.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # One panel per user: the users lie far apart against their few-metre trajectories.
    fig, axes = plt.subplots(1, len(users), figsize=(4.2 * len(users), 4.4), squeeze=False)
    for i, (ax, u) in enumerate(zip(axes[0], users)):
        ax.plot(truth[:, u, 0], truth[:, u, 1], "-o", color=f"C{i}", ms=3, label="true")
        ax.plot(truth[0, u, 0], truth[0, u, 1], "s", color="k", ms=6, label="start")
        ax.plot(pred[:, u, 0], pred[:, u, 1], "--x", color="C3", ms=5,
                label=f"GRU, MSE {mse[u]:.3f} m$^2$")
        ax.set_title(f"user {u + 1} (Bayes floor {floor[u]:.3f} m$^2$)", fontsize=10)
        ax.set_xlabel("x (m)")
        ax.set_ylabel("y (m)")
        ax.set_aspect("equal", adjustable="datalim")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("GRU twin: true vs one-step predicted trajectories (one test trajectory; "
                 "MSE over the whole test set)", fontsize=11)
    fig.tight_layout()
    save_figure(fig, path, dpi=150)
    plt.close(fig)

    table = path.with_suffix(".csv")
    with atomic_path(table) as tmp, tmp.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["user", "t", "x_true", "y_true", "x_pred", "y_pred", "test_mse", "floor"])
        for u in users:
            for t in range(1, truth.shape[0]):
                out.writerow([u + 1, t, *(f"{v:.4f}" for v in truth[t, u]),
                              *(f"{v:.4f}" for v in pred[t - 1, u]),
                              f"{mse[u]:.5f}", f"{floor[u]:.5f}"])
    return path, table
