"""Experience replay of whole episodes (Sec. III-D, Algorithm 2) as a `LightningDataModule`.

The Q networks are recurrent, so the replay memory keeps whole episodes `[T, ...]` and a
minibatch is a set of episodes unrolled from a zero hidden state (DRQN style). Each
training epoch g (Algorithm 2):

1. *data collection*: one reset of a batched `DntEnv` with `n_envs = D` plays D episodes
   with the learner's current epsilon-greedy policy; they enter a ring buffer of
   `capacity` episodes (the oldest are overwritten);
2. *training*: `batches_per_epoch` minibatches of `batch_size` episodes are sampled
   uniformly (without replacement within a minibatch) from the buffer.

Both happen lazily inside the training `IterableDataset`'s `__iter__`, so Lightning's epoch
loop drives Algorithm 2 as it is. Every random stream of epoch g (the environment's reset
seed, exploration, sampling) is derived from `(seed, g)`, so the whole state a resumed run
needs is the buffer itself plus Lightning's epoch counter: `state_dict` / `load_state_dict`
carry the buffer and a resumed run continues exactly as an uninterrupted one.

The validation loader yields one `Evaluation` (the fixed evaluation episodes): the learner's
`validation_step` plays it greedily, so greedy evaluation is Lightning's validation.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from dntsync.env.core import DntEnv
from dntsync.env.evaluate import Evaluation, Rollout, rollout

# Tags of the per-epoch random streams: SeedSequence([seed, epoch, TAG]).
ENV_STREAM, EXPLORE_STREAM, SAMPLE_STREAM = 1, 2, 3


def epoch_rng(seed: int, epoch: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, stream])


def epoch_env_seed(seed: int, epoch: int) -> int:
    """The training environment's reset seed of epoch g: a 63-bit hash of (seed, g), so it
    never coincides with the small integers `eval_seed + i` used for evaluation."""
    return int(np.random.SeedSequence([seed, epoch, ENV_STREAM]).generate_state(1, np.uint64)[0] >> 1)


@dataclass
class EpisodeBatch:
    """A minibatch of whole episodes, laid out `[B, T, M, ...]`."""

    obs: Tensor  # [B, T, M, D] o_t^m
    covered: Tensor  # [B, T, M, U] bool: the action masks of slot t
    actions: Tensor  # [B, T, M] int64
    team_reward: Tensor  # [B, T] r(s_t, a_t), eq. (16)
    local_rewards: Tensor  # [B, T, M] r^m, eq. (37)
    error_reward: Tensor  # [B, T] the DNT-error term of r(s_t, a_t) (`rewards.error_terms`)
    local_error_rewards: Tensor  # [B, T, M] that of each r^m
    terminated: Tensor  # [B, T] 1.0 where the episode ended after slot t (no bootstrap)
    filled: Tensor  # [B, T] 1.0 on real slots, 0.0 on padding
    state: Tensor  # [B, T, S] the global state s_t (`DntEnv.global_state`; QMIX's mixer)


class EpisodeReplay:
    """Ring buffer of whole episodes (numpy), `capacity` episodes of T slots."""

    FIELDS = tuple(f.name for f in fields(EpisodeBatch))

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.arrays: dict[str, np.ndarray] = {}
        self.size = 0  # episodes held
        self.cursor = 0  # where the next episode goes
        self.added = 0  # episodes ever added

    def __len__(self) -> int:
        return self.size

    def add(self, episodes: Rollout) -> None:
        """Store the recorded episodes of a rollout, overwriting the oldest when full."""
        n, horizon = episodes.team_reward.shape
        new = {
            "obs": episodes.obs.astype(np.float32), "covered": episodes.covered.astype(bool),
            "actions": episodes.actions.astype(np.int64),
            "team_reward": episodes.team_reward.astype(np.float32),
            "local_rewards": episodes.local_rewards.astype(np.float32),
            "error_reward": episodes.error_reward.astype(np.float32),
            "local_error_rewards": episodes.local_error_rewards.astype(np.float32),
            "terminated": episodes.terminated.astype(np.float32),
            "filled": np.ones((n, horizon), dtype=np.float32),  # episodes have exactly T slots
            "state": episodes.state.astype(np.float32),
        }
        if not self.arrays:
            self.arrays = {k: np.zeros((self.capacity, *v.shape[1:]), dtype=v.dtype)
                           for k, v in new.items()}
        slots = (self.cursor + np.arange(n)) % self.capacity
        if n > self.capacity:  # only the newest `capacity` survive
            slots, new = slots[-self.capacity:], {k: v[-self.capacity:] for k, v in new.items()}
        for k, v in new.items():
            self.arrays[k][slots] = v
        self.cursor = int((self.cursor + n) % self.capacity)
        self.size = min(self.capacity, self.size + n)
        self.added += n

    def sample(self, batch_size: int, rng: np.random.Generator) -> EpisodeBatch:
        """`batch_size` episodes, uniformly; without replacement when the buffer holds enough."""
        if self.size == 0:
            raise RuntimeError("the replay memory is empty")
        idx = rng.choice(self.size, size=batch_size, replace=self.size < batch_size)
        return EpisodeBatch(**{k: torch.from_numpy(self.arrays[k][idx]) for k in self.FIELDS})

    def state_dict(self) -> dict:
        held = {k: torch.from_numpy(v[:self.size].copy()) for k, v in self.arrays.items()}
        return {"arrays": held, "size": self.size, "cursor": self.cursor, "added": self.added,
                "capacity": self.capacity}

    def load_state_dict(self, state: dict) -> None:
        if state["capacity"] != self.capacity:
            raise ValueError(f"checkpoint replay capacity {state['capacity']} != {self.capacity}")
        self.arrays = {}
        for k, v in state["arrays"].items():
            arr = v.numpy()
            self.arrays[k] = np.zeros((self.capacity, *arr.shape[1:]), dtype=arr.dtype)
            self.arrays[k][:len(arr)] = arr
        self.size, self.cursor, self.added = state["size"], state["cursor"], state["added"]


class _EpochOfReplay(IterableDataset):
    """One iteration = one epoch of Algorithm 2: collect, then yield sampled minibatches."""

    def __init__(self, datamodule: EpisodeDataModule) -> None:
        self.dm = datamodule

    def __iter__(self):
        # the DataModule counts epochs itself: right after a resume, Lightning's
        # `current_epoch` still reads the last finished epoch while the loader starts
        epoch = self.dm.epochs_collected
        self.dm.collect(epoch)
        rng = epoch_rng(self.dm.seed, epoch, SAMPLE_STREAM)
        for _ in range(self.dm.batches_per_epoch):
            yield self.dm.replay.sample(self.dm.batch_size, rng)


class EpisodeDataModule(pl.LightningDataModule):
    """Collects episodes with the learner's epsilon-greedy policy and serves replay minibatches.

    The learner (the trainer's LightningModule) must provide `exploration_policy(epoch, rng)`
    returning an `EpisodePolicy` (see `dntsync.env.evaluate`).
    """

    def __init__(self, env: DntEnv, evaluation: Evaluation, *, seed: int, buffer_capacity: int,
                 batches_per_epoch: int, batch_size: int) -> None:
        super().__init__()
        self.env = env  # n_envs = D episodes per epoch
        self.evaluation = evaluation
        self.seed = seed
        self.batches_per_epoch = batches_per_epoch
        self.batch_size = batch_size
        self.replay = EpisodeReplay(buffer_capacity)
        self.epochs_collected = 0
        self.last_collection: dict[str, float] = {}

    def collect(self, epoch: int) -> dict[str, float]:
        """Algorithm 2's data collection stage for epoch `epoch`; returns per-step means."""
        policy = self.trainer.lightning_module.exploration_policy(
            epoch, epoch_rng(self.seed, epoch, EXPLORE_STREAM))
        episodes = rollout(self.env, policy, seed=epoch_env_seed(self.seed, epoch), record=True)
        self.replay.add(episodes)
        self.epochs_collected = epoch + 1
        self.last_collection = {("train_reward" if k == "team_reward" else f"train_{k}"): float(v.mean())
                                for k, v in episodes.steps.items()}
        return self.last_collection

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_EpochOfReplay(self), batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return DataLoader([self.evaluation], batch_size=None, collate_fn=lambda x: x)

    def state_dict(self) -> dict:
        return {"replay": self.replay.state_dict(), "epochs_collected": self.epochs_collected,
                "last_collection": dict(self.last_collection)}

    def load_state_dict(self, state: dict) -> None:
        self.replay.load_state_dict(state["replay"])
        self.epochs_collected = state["epochs_collected"]
        self.last_collection = dict(state["last_collection"])
