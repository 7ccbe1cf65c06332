"""The twin's trajectory data set, as `dntsync generate` writes it (`data/trajectories.npz`).

`make_dataset(cfg)`: `positions[n_traj, T+1, U, 2]` of `data.n_trajectories` independent
episodes (eq. 1, from the scenario's p_u), the p_u themselves, the seeds, a hash of the
config sections the data depend on, and train/validation/test split indices. Its own random
stream, from `seed`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from dntsync.network.mobility import move_probabilities, trajectories

if TYPE_CHECKING:
    from dntsync.config import Config


def data_rng(cfg: Config) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, 0x74726A])  # "trj": its own stream


def split_indices(n: int, fractions: tuple[float, float, float], rng: np.random.Generator):
    order = rng.permutation(n)
    n_train = max(1, int(round(fractions[0] * n)))
    n_val = max(1, int(round(fractions[1] * n)))
    n_train = min(n_train, n - n_val - 1)
    return np.sort(order[:n_train]), np.sort(order[n_train:n_train + n_val]), np.sort(order[n_train + n_val:])


def make_dataset(cfg: Config) -> dict[str, np.ndarray]:
    sc = cfg.scenario
    rng = data_rng(cfg)
    probs = move_probabilities(sc)
    positions = trajectories(sc, probs, rng, cfg.data.n_trajectories, sc.episode_length)
    train, val, test = split_indices(cfg.data.n_trajectories, cfg.data.split, rng)
    return {
        "positions": positions.astype(np.float32),
        "move_probs": probs,
        "scenario_seed": np.int64(sc.seed),
        "seed": np.int64(cfg.seed),
        "config_hash": np.str_(cfg.data_hash()),
        "train_idx": train,
        "val_idx": val,
        "test_idx": test,
    }
