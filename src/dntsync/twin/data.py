"""The twin's data: the trajectory file of `dntsync generate`, checked, cut into windows.

A sample is (context, target, t): `context[L, U, 2]` = the true statuses s_{t-L+1..t},
`target[U, 2]` = s_{t+1}, for every slot t = 0..T-1 of every trajectory of a split. Windows
reaching before the start of a trajectory are padded with s_0 repeated, as the environment's
DNT history is at episode start (docs/model.md). The model's input is the last K statuses of the
context; a longer context (L = K + self_feeding_max_steps) leaves room for the self-fed
rollout (`GruTwin.self_fed_windows`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from dntsync.config import Config
from dntsync.network.scenario import ConfigError

SPLITS = ("train", "val", "test")




@dataclass(frozen=True)
class TrajectoryData:
    """The contents of `data/trajectories.npz`, split."""

    positions: dict[str, np.ndarray]  # split -> [n, T+1, U, 2] float32
    move_probs: np.ndarray  # [U, 5] p_u
    config_hash: str
    path: str


def load_trajectories(cfg: Config) -> TrajectoryData:
    """Read `cfg.data.path`; fail with the fix if it is missing or made for another config."""
    path = Path(cfg.data.path)
    fix = "run `dntsync generate` first with the same --params/--config/--set options"
    if not path.exists():
        raise ConfigError(f"data file {str(path)!r} (data.path) does not exist; {fix}")
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {k: f[k] for k in f.files}
    except Exception as err:  # zipfile, pickle and OS errors of a truncated or foreign file
        raise ConfigError(f"data file {str(path)!r} (data.path) is corrupt or not a dntsync data "
                          f"set ({type(err).__name__}); {fix}") from None
    missing = [k for k in ("positions", "move_probs", *(f"{s}_idx" for s in SPLITS)) if k not in data]
    if missing:
        raise ConfigError(f"data file {str(path)!r} (data.path) lacks the arrays {missing}; {fix}")
    want = cfg.data_hash()
    have = str(data.get("config_hash", "none"))
    positions = data["positions"]
    if positions.ndim != 4 or positions.shape[-1] != 2:
        raise ConfigError(f"data file {str(path)!r} holds positions of shape {positions.shape}, "
                          f"not [trajectories, T+1, U, 2]; {fix}")
    if not np.isfinite(positions).all():
        raise ConfigError(f"data file {str(path)!r} holds non-finite positions "
                          f"({int((~np.isfinite(positions)).sum())} values); {fix}")
    n_users = positions.shape[2]
    if n_users != cfg.scenario.n_users:
        raise ConfigError(f"data file {str(path)!r} holds U = {n_users} users but "
                          f"scenario.n_users = {cfg.scenario.n_users}; {fix}")
    if have != want:
        raise ConfigError(f"data file {str(path)!r} was generated for another scenario/data "
                          f"config (config_hash {have}, this config {want}); {fix}")
    return TrajectoryData(
        positions={s: positions[data[f"{s}_idx"]] for s in SPLITS},
        move_probs=data["move_probs"], config_hash=have, path=str(path),
    )


def padded(positions: np.ndarray, before: int) -> np.ndarray:
    """Prepend `before` copies of s_0 to every trajectory: `[n, before + T + 1, U, 2]`."""
    first = np.repeat(positions[:, :1], before, axis=1)
    return np.concatenate([first, positions], axis=1)


class WindowDataset(Dataset):
    """Every (trajectory, slot) of one split; indexed by a *list* of sample numbers, so a
    whole batch is gathered with one tensor index (see `TwinDataModule._loader`)."""

    def __init__(self, positions: np.ndarray, context: int) -> None:
        self.context = context  # L
        self.n_traj, steps = positions.shape[:2]
        self.horizon = steps - 1  # T
        self.track = torch.from_numpy(padded(positions, context - 1).astype(np.float32))

    def __len__(self) -> int:
        return self.n_traj * self.horizon

    def __getitem__(self, index: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(index)
        traj, t = index // self.horizon, index % self.horizon
        # s_t sits at column t + L - 1 of the padded track.
        cols = t[:, None] + torch.arange(self.context + 1)
        seq = self.track[traj[:, None], cols]  # [B, L + 1, U, 2]
        return seq[:, :-1], seq[:, -1], t


class TwinDataModule(pl.LightningDataModule):
    """Train / validation / test windows of the file's own split."""

    def __init__(self, data: TrajectoryData, window: int, batch_size: int,
                 self_fed_steps: int = 0, seed: int = 0) -> None:
        super().__init__()
        self.data = data
        self.window = window  # K
        self.batch_size = batch_size
        self.train_context = window + self_fed_steps  # L for training samples
        self.seed = seed

    def _loader(self, split: str, context: int, shuffle: bool) -> DataLoader:
        dataset = WindowDataset(self.data.positions[split], context)
        order = (RandomSampler(dataset, generator=torch.Generator().manual_seed(self.seed))
                 if shuffle else SequentialSampler(dataset))
        batches = BatchSampler(order, self.batch_size, drop_last=False)
        return DataLoader(dataset, sampler=batches, batch_size=None)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.train_context, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.window, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.window, shuffle=False)
