"""Generate the twin's trajectory data set (`data/trajectories.npz`, SPEC.md: 2,000 x 30 steps).

The file holds `positions[n_traj, T+1, U, 2]`, the per-user move probabilities p_u, the
scenario seed, a hash of the config sections it depends on, and train/validation/test
split indices.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dntsync.config import Config
from dntsync.files import save_npz
from dntsync.network.mobility import move_probabilities, trajectories


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


def run(cfg: Config, args) -> int:
    data = make_dataset(cfg)
    path = Path(cfg.data.path)
    save_npz(path, **data)
    pos = data["positions"]
    print(f"wrote {path}: positions {pos.shape}, split {len(data['train_idx'])}/"
          f"{len(data['val_idx'])}/{len(data['test_idx'])}, hash {data['config_hash']}")
    return 0
