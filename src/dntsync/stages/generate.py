"""Generate the twin's trajectory data set (`data/trajectories.npz`, docs/model.md: 2,000 x 30 steps).

The file holds `positions[n_traj, T+1, U, 2]`, the per-user move probabilities p_u, the
scenario seed, a hash of the config sections it depends on, and train/validation/test
split indices.
"""

from __future__ import annotations

from pathlib import Path

from dntsync.config import Config
from dntsync.files import save_npz
from dntsync.network.dataset import make_dataset


def run(cfg: Config, args) -> int:
    data = make_dataset(cfg)
    path = Path(cfg.data.path)
    save_npz(path, **data)
    pos = data["positions"]
    print(f"wrote {path}: positions {pos.shape}, split {len(data['train_idx'])}/"
          f"{len(data['val_idx'])}/{len(data['test_idx'])}, hash {data['config_hash']}")
    return 0
