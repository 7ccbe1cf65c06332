"""One typed, validated configuration, loaded from `conf/params.yaml` (the file DVC reads).

Every knob of the pipeline lives in one `Config` made of small section dataclasses. Loading
checks unknown keys, types and ranges before any work is done; each error names the dotted
key, the bad value and what is allowed. Dotted overrides (`--set scenario.n_users=20`) are
parsed as YAML scalars and applied before validation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from dntsync.network.scenario import MOBILITY_KEYS, ConfigError, Scenario

DEFAULT_PARAMS = Path("conf/params.yaml")


class _Loader(yaml.SafeLoader):
    """PyYAML reads `1e-4` (no dot) as a string; this loader reads it as a float, as YAML 1.2 does."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+][0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def _mapping_without_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict:
    """A YAML mapping; a key given twice is an error (PyYAML would keep the last silently)."""
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is given twice", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def read_yaml(text: str, source: str = "YAML"):
    """Parse YAML text with scientific-notation floats read as floats; a syntax error or a
    duplicate key is a `ConfigError` naming `source` and the line."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{source}: not valid YAML{where}: {problem}") from None


def read_yaml_file(path: str | Path, what: str = "config file") -> dict:
    """The mapping in the YAML file at `path` (empty file: {}); anything else that is not a
    readable YAML mapping (missing, a folder, binary, bad syntax, a list) is a `ConfigError`."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{what} {str(path)!r} does not exist")
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} is not a file")
    try:
        text = path.read_text()
    except (UnicodeDecodeError, OSError) as err:
        raise ConfigError(f"{what} {str(path)!r} cannot be read as text ({type(err).__name__})") from None
    data = read_yaml(text, str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {str(path)!r} holds a {type(data).__name__}, not a mapping of "
                          "sections (e.g. `marl:` then indented keys)")
    return data


# The learners (dntsync.marl.learners.LEARNERS has one class per name): the one list the
# config's validation, the CLI's --algo and DVC's stages read (tests/test_config.py checks
# that the classes and the names agree).
Algo = Literal["vdn", "iql", "qmix"]
ALGOS: tuple[str, ...] = typing.get_args(Algo)
# The Q heads (dntsync.marl.networks.HEADS has one class per name), read the same way.
Head = Literal["branching", "flat", "factorised"]
HEAD_NAMES: tuple[str, ...] = typing.get_args(Head)


def _need(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key} = {value!r} is invalid: {allowed}")


@dataclass(frozen=True)
class DataConfig:
    """The twin's trajectory data set (docs/model.md: 2,000 trajectories of T = 30 steps)."""

    n_trajectories: int = 2000
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train / validation / test
    path: str = "data/trajectories.npz"

    def validate(self, key: str = "data") -> None:
        _need(self.n_trajectories >= 3, f"{key}.n_trajectories", self.n_trajectories,
              "need at least 3 (one per split)")
        _need(len(self.split) == 3 and all(f > 0 for f in self.split)
              and abs(sum(self.split) - 1.0) < 1e-9,
              f"{key}.split", self.split, "need three positive fractions summing to 1")


@dataclass(frozen=True)
class EnvConfig:
    """The multi-agent environment (eqs. 7, 16, 17)."""

    # "full": per user (x, y, covered) plus last-upload-succeeded and slots since the last
    # successful upload; "positions_only": the paper's local state alone (docs/model.md).
    observation: Literal["full", "positions_only"] = "full"
    # users' (x, y) relative to the area ("area") or to the observing BS ("bs"); see
    # dntsync.env.core.OBS_FRAMES
    obs_frame: Literal["area", "bs"] = "bs"
    # extra per-user numbers after (x, y, covered), each computable by a BS from its own
    # users' positions and the public layout: "others" (dntsync.env.core.USER_FEATURES)
    user_features: tuple[str, ...] = ("others",)
    # The twin's predictor of s-hat_t when no upload comes: "gru" loads `twin_checkpoint`.
    predictor: Literal["hold-last", "drift", "gru"] = "gru"
    twin_checkpoint: str = "models/twin.ckpt"
    # When predictor is "gru" and the checkpoint is missing: fall back to this one (stated in
    # the run's params) or fail.
    predictor_fallback: Literal["hold-last", "drift", "none"] = "hold-last"

    def validate(self, key: str = "env") -> None:
        from dntsync.env.core import USER_FEATURES

        _need(all(f in USER_FEATURES for f in self.user_features)
              and len(set(self.user_features)) == len(self.user_features),
              f"{key}.user_features", list(self.user_features),
              f"need distinct names from {list(USER_FEATURES)}")

    def observation_options(self) -> dict:
        """The keyword arguments of `DntEnv` and `Evaluation` that shape an observation."""
        return {"observation": self.observation, "obs_frame": self.obs_frame,
                "user_features": tuple(self.user_features)}


@dataclass(frozen=True)
class TwinConfig:
    """The GRU digital twin (eqs. 9-14)."""

    window: int = 5  # K: DNT statuses fed to the GRU
    hidden: int = 128  # N^h
    num_layers: int = 1
    lr: float = 1e-3  # lambda_G
    batch_size: int = 256
    max_epochs: int = 60
    patience: int = 6  # early stopping on validation loss
    min_delta: float = 1e-4  # a smaller drop of the validation loss is no improvement
    # Train also on windows whose inputs are partly the twin's own earlier predictions, since
    # in the environment the twin runs on its own outputs whenever no upload comes.
    self_feeding: bool = True
    self_feeding_max_steps: int = 10  # J: a user's last j ~ U{0..J} inputs are predictions
    self_feeding_fraction: float = 0.5  # share of training windows that are self-fed
    eval_horizon: int = 10  # multi-step error reported for h = 1..eval_horizon
    # torch CPU threads while training: the GRU's small ops gain nothing from more and lose a
    # lot when the cores are shared (measured 5x slower with 2 threads on 2 busy cores).
    num_threads: int = 1
    checkpoint: str = "models/twin.ckpt"
    metrics: str = "metrics/twin.json"
    figure: str = "figures/fig2_twin_trajectories.png"  # Fig. 2; its data beside it as .csv

    def validate(self, key: str = "twin") -> None:
        _need(self.window >= 1, f"{key}.window", self.window, "need K >= 1")
        _need(self.hidden >= 1, f"{key}.hidden", self.hidden, "need N^h >= 1")
        _need(self.num_layers >= 1, f"{key}.num_layers", self.num_layers, "need >= 1")
        _need(0 < self.lr < 1, f"{key}.lr", self.lr, "need 0 < lambda_G < 1")
        _need(self.batch_size >= 1, f"{key}.batch_size", self.batch_size, "need >= 1")
        _need(self.max_epochs >= 1, f"{key}.max_epochs", self.max_epochs, "need >= 1")
        _need(self.patience >= 1, f"{key}.patience", self.patience, "need >= 1")
        _need(self.min_delta >= 0, f"{key}.min_delta", self.min_delta, "need >= 0")
        _need(self.self_feeding_max_steps >= 0, f"{key}.self_feeding_max_steps",
              self.self_feeding_max_steps, "need >= 0")
        _need(0 <= self.self_feeding_fraction <= 1, f"{key}.self_feeding_fraction",
              self.self_feeding_fraction, "need a fraction in [0, 1]")
        _need(self.eval_horizon >= 1, f"{key}.eval_horizon", self.eval_horizon, "need >= 1")
        _need(self.num_threads >= 1, f"{key}.num_threads", self.num_threads, "need >= 1")


@dataclass(frozen=True)
class AlgorithmConfig:
    """`marl.algorithm`: which learner, and how its TD updates run (Algorithm 2, Table II).

    Table II fixes G = 75 epochs and gamma 0.2, kept here. The rest is the default learner's
    design, each choice measured in the Fig. 3 setting (docs/learners.md has the ablation):
    lr 2e-3 (Table II: 1e-4, the paper profile's; 1e-3 and 3e-3 learnt less); no target net
    (`target_update_epochs: 0`: as good at gamma 0.2 and a run 25% shorter); 16 minibatches
    of 16 episodes per epoch (20 and 24 scored the same in the Fig. 3 setting, in runs 14% and
    25% longer; the paper profile keeps 24); an error value
    (`error_gamma`: the twin's error term valued over a longer horizon than gamma's, on its
    Monte Carlo return).
    """

    name: Algo = "vdn"
    epochs: int = 75  # G
    gamma: float = 0.2
    lr: float = 2e-3  # lambda_Q
    batches_per_epoch: int = 16  # TD updates per epoch
    batch_size: int = 16  # episodes per minibatch
    # epochs between target-net syncs; 0: no target net, the TD target bootstraps from the
    # online net (detached)
    target_update_epochs: int = 0
    double_q: bool = True
    grad_clip: float = 10.0
    # step of the running mean r-bar taken from every reward in the TD target (0: none);
    # no policy's rank changes (fixed-length episodes). docs/learners.md, "Reward centering"
    reward_centering: float = 0.0
    # > 0: each BS's Q is R + E, E fitted to the Monte Carlo return of the reward's DNT-error
    # term discounted by error_gamma, R to the rest with gamma; 0: one Q (VDN and IQL; QMIX
    # keeps one Q). docs/learners.md, "The error value"
    error_gamma: float = 0.8

    def validate(self, key: str) -> None:
        _need(0 <= self.error_gamma < 1, f"{key}.error_gamma", self.error_gamma,
              "need 0 <= g < 1 (0: one Q, no separate error value)")
        _need(0 <= self.reward_centering <= 1, f"{key}.reward_centering", self.reward_centering,
              "need 0 <= beta <= 1 (0: no centering)")
        _need(self.epochs >= 1, f"{key}.epochs", self.epochs, "need G >= 1")
        _need(0 <= self.gamma < 1, f"{key}.gamma", self.gamma, "need 0 <= gamma < 1")
        _need(0 < self.lr < 1, f"{key}.lr", self.lr, "need 0 < lambda_Q < 1")
        for name in ("batches_per_epoch", "batch_size"):
            _need(getattr(self, name) >= 1, f"{key}.{name}", getattr(self, name), "need >= 1")
        _need(self.target_update_epochs >= 0, f"{key}.target_update_epochs",
              self.target_update_epochs, "need >= 0 (0: no target net, bootstrap from the online one)")
        _need(self.grad_clip > 0, f"{key}.grad_clip", self.grad_clip, "need > 0")


@dataclass(frozen=True)
class NetworkConfig:
    """`marl.network`: each BS's recurrent Q network (Linear -> ReLU -> GRUCell -> head).

    `head: branching` (per-bit terms, one serve network shared by the users) is the default:
    the paper's flat 2^(U+1) head (conf/profiles/paper.yaml) settles on a policy that ignores
    where users are. `sparse_head` (row-sparse SparseAdam updates of the flat head) keeps the
    flat head practical at U = 16 (one update 0.47 s -> 0.08 s) with the same greedy reward.
    `association` (per-bit heads only): the users several BSs cover are served by exactly
    one of them, chosen by a score of its distance that all BSs learn together
    (`dntsync.marl.networks.Association`); off, each BS's own serve term decides.
    `association_slopes`: after training, the score h(d) becomes h(d) - c d with c the best
    of these on the validation episodes of `marl.upload_offsets` (`dntsync.marl.offsets.
    fit_association_slope`); a large c is the nearest-BS rule. Empty: no fit; without the
    association there is nothing to fit. `serve_covered_fit` (per-bit heads): after
    training, first, every BS serves each user it covers (the nearest-BS rule's choice)
    unless the learnt serve terms score higher on those episodes (`dntsync.marl.offsets.
    fit_serve_covered`).
    """

    head: Head = "branching"
    hidden: int = 128  # theta^h (Table II)
    sparse_head: bool = True
    association: bool = True
    association_slopes: tuple[float, ...] = (0.0, 1.0, 3.0, 10.0, 100.0)
    serve_covered_fit: bool = True

    def validate(self, key: str) -> None:
        _need(self.hidden >= 1, f"{key}.hidden", self.hidden, "need >= 1")
        _need(not (self.association and self.head == "flat"), f"{key}.association", self.association,
              f"the association needs a per-bit head; set {key}.association=false with head flat")
        slopes = self.association_slopes
        _need(not slopes or (slopes[0] == 0.0 and all(math.isfinite(c) for c in slopes)
                             and all(a < b for a, b in zip(slopes, slopes[1:]))),
              f"{key}.association_slopes", list(slopes),
              "need finite slopes in increasing order from 0, or [] for none")


@dataclass(frozen=True)
class CollectionConfig:
    """`marl.collection`: the epsilon-greedy episodes each epoch adds to the replay.

    Per-bit exploration from epsilon 0.3 (`exploration: bit`) makes small deviations from the
    greedy action, so a conflict is not blamed on every bit of a wholly random action;
    greedy after the decay (`epsilon_end: 0`) gained 0.21 in the Fig. 3 setting; the replay
    holds about 16 epochs of episodes.
    """

    episodes_per_epoch: int = 32  # D, one batched reset
    buffer_capacity: int = 500  # episodes
    epsilon_start: float = 0.3
    epsilon_end: float = 0.0
    epsilon_decay_epochs: int = 30  # linear
    # "action": with prob. epsilon a uniformly random valid action; "bit": each allowed bit
    # of the greedy action redrawn with prob. epsilon (dntsync.marl.learners.EXPLORATION)
    exploration: Literal["action", "bit"] = "bit"

    def validate(self, key: str) -> None:
        for name in ("episodes_per_epoch", "buffer_capacity", "epsilon_decay_epochs"):
            _need(getattr(self, name) >= 1, f"{key}.{name}", getattr(self, name), "need >= 1")
        for name in ("epsilon_start", "epsilon_end"):
            _need(0 <= getattr(self, name) <= 1, f"{key}.{name}", getattr(self, name),
                  "need 0 <= epsilon <= 1")


@dataclass(frozen=True)
class EvaluationConfig:
    """`marl.evaluation`: the greedy evaluation during and after training (never changes it)."""

    every: int = 3  # epochs (and the pruner's report); the last epoch is always evaluated
    episodes: int = 32
    seed: int = 10_000  # evaluation episodes use seed + i, never a training seed
    # the heuristics' upload periods k: nearest-BS uploading every k slots, and k slots after
    # the last successful upload (retrying a failed one), synchronised and staggered, beside
    # always and never (`dntsync.env.policies.baseline_policies`)
    upload_periods: tuple[int, ...] = (2, 3, 5, 10)
    # and both with the BSs' phases tuned on the validation episodes of
    # marl.upload_offsets (the best of all k^M assignments), for each k with k^M <= this
    tuned_max: int = 27

    def validate(self, key: str) -> None:
        for name in ("every", "episodes"):
            _need(getattr(self, name) >= 1, f"{key}.{name}", getattr(self, name), "need >= 1")
        _need(self.tuned_max >= 0, f"{key}.tuned_max", self.tuned_max, "need >= 0 (0: no tuned phases)")
        _need(all(isinstance(k, int) and not isinstance(k, bool) and k >= 2 for k in self.upload_periods)
              and len(set(self.upload_periods)) == len(self.upload_periods),
              f"{key}.upload_periods", list(self.upload_periods),
              "need distinct whole numbers of slots >= 2 (every slot and never are always compared)")


@dataclass(frozen=True)
class UploadOffsetsConfig:
    """`marl.upload_offsets`: after training, each BS's upload term is shifted by an offset
    b[m, t mod p] (t the slot; every BS knows it), fitted by a pattern search over `grid` on
    validation episodes (`dntsync.marl.offsets`): the greedy policy's upload timing tuned on
    the reward itself. The period p is `phases`, or one of `periods` where a schedule of that
    period is the best start. docs/learners.md, "Upload offsets" and "Longer upload cycles"."""

    phases: int = 2  # K; 0: no offsets (the paper profile)
    # longer upload cycles: the every-p schedules, synchronised and staggered, are starts of
    # the search too, which goes on in the best start's period (docs/learners.md, "Longer
    # upload cycles"); the offsets span lcm(phases, *periods) slots
    periods: tuple[int, ...] = (5, 10)
    grid: tuple[float, ...] = (-3.0, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0)
    # -force / +force: a BS's upload off / on whatever its Q terms: the starts "never" and
    # "always" (the nearest-BS rules' schedules), and the walk's ends beyond the grid's
    force: float = 1000.0
    passes: int = 2  # the pattern search's passes over the coordinates (at most)
    episodes: int = 64
    seed: int = 20_000  # validation episodes use seed + i, never an evaluation or training seed
    # after the search, with a team score (VDN, QMIX): the retry rules (upload k slots after
    # the last success, then in every slot until one succeeds; synchronised and staggered)
    # played through offsets read by the slots since each BS's last success, kept instead of
    # the slot offsets when one scores higher on the validation episodes (docs/learners.md,
    # "A stronger rule: retrying a failed upload"); []: none. Needs env.observation: full
    retry_periods: tuple[int, ...] = (2, 3, 4, 5, 6, 10)
    # and for each k with k^M <= this every assignment of the BSs to a first upload slot, as
    # the tuned heuristics (marl.evaluation.tuned_max); 0: synchronised and staggered only
    retry_tuned_max: int = 27

    @property
    def cycle(self) -> int:
        """The slots the fitted offsets span: lcm(phases, *periods); 0 without offsets."""
        return math.lcm(self.phases, *self.periods) if self.phases > 0 else 0

    @property
    def retry_slots(self) -> int:
        """The columns of the retry offsets: the longest retry period; 0 without them."""
        return max(self.retry_periods) if self.phases > 0 and self.retry_periods else 0

    def validate(self, key: str) -> None:
        _need(self.phases >= 0, f"{key}.phases", self.phases, "need >= 0 (0: no offsets)")
        _need(all(isinstance(p, int) and not isinstance(p, bool) and p >= 2 for p in self.periods)
              and len(set(self.periods)) == len(self.periods) and self.phases not in self.periods,
              f"{key}.periods", list(self.periods),
              f"need distinct whole numbers of slots >= 2, other than phases ({self.phases})")
        _need(len(self.grid) >= 2 and 0.0 in self.grid and all(math.isfinite(g) for g in self.grid)
              and all(a < b for a, b in zip(self.grid, self.grid[1:])), f"{key}.grid",
              list(self.grid), "need finite offsets in increasing order, 0 among them")
        _need(math.isfinite(self.force) and self.force > max(abs(g) for g in self.grid), f"{key}.force",
              self.force, "need a finite offset beyond every grid value")
        _need(all(isinstance(k, int) and not isinstance(k, bool) and k >= 2 for k in self.retry_periods)
              and len(set(self.retry_periods)) == len(self.retry_periods), f"{key}.retry_periods",
              list(self.retry_periods), "need distinct whole numbers of slots >= 2 ([]: no retry rules)")
        _need(self.retry_tuned_max >= 0, f"{key}.retry_tuned_max", self.retry_tuned_max,
              "need >= 0 (0: synchronised and staggered phases only)")
        _need(self.passes >= 1, f"{key}.passes", self.passes, "need >= 1")
        _need(self.episodes >= 1, f"{key}.episodes", self.episodes, "need >= 1")
        _need(self.seed >= 0, f"{key}.seed", self.seed, "need >= 0")


@dataclass(frozen=True)
class OutputsConfig:
    """`marl.outputs`: <model_dir>/<algo>[_seed<S>].ckpt, <metrics_dir>/marl_<algo>[_seed<S>].json,
    <metrics_dir>/curves/marl_<algo>_seed<S>.csv; resumable state <checkpoint_dir>/<algo>_seed<S>/."""

    model_dir: str = "models/marl"
    metrics_dir: str = "metrics/marl"
    checkpoint_dir: str = "checkpoints"
    # the resumable state is written every this many epochs (an interrupted run repeats at
    # most this many); it holds nets, target nets, Adam moments and the replay, so at U = 16
    # (2^17 actions per flat head) it is about 0.8 GB and writing it every epoch would cost
    # more than the training. Sweeps delete it once a run has finished.
    checkpoint_every: int = 5

    def validate(self, key: str) -> None:
        _need(self.checkpoint_every >= 1, f"{key}.checkpoint_every", self.checkpoint_every, "need >= 1")


@dataclass(frozen=True)
class MarlConfig:
    """The learners, VDN and IQL (Sec. III-C/D, Algorithm 2, Table II) and QMIX (ours), in
    the sections a MARL library's user knows (BenchMARL's algorithm / model / experiment):
    `algorithm`, `network`, `collection`, `evaluation`, `outputs`, and the seeds of a run
    set. Every run uses one torch thread (the networks are small; parallelism is
    `sweeps.workers` runs at once)."""

    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    collection: CollectionConfig = field(default_factory=CollectionConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    outputs: OutputsConfig = field(default_factory=OutputsConfig)
    upload_offsets: UploadOffsetsConfig = field(default_factory=UploadOffsetsConfig)
    seeds: tuple[int, ...] = (0, 1, 2)

    def validate(self, key: str = "marl") -> None:
        for name in ("algorithm", "network", "collection", "evaluation", "outputs", "upload_offsets"):
            getattr(self, name).validate(f"{key}.{name}")
        _need(self.collection.buffer_capacity >= self.algorithm.batch_size,
              f"{key}.collection.buffer_capacity", self.collection.buffer_capacity,
              f"need >= {key}.algorithm.batch_size ({self.algorithm.batch_size})")
        _need(not (self.algorithm.error_gamma > 0 and self.network.head == "flat"),
              f"{key}.algorithm.error_gamma", self.algorithm.error_gamma,
              f"the error value needs a per-bit head; set {key}.algorithm.error_gamma=0 with head flat")
        uo, ev = self.upload_offsets, self.evaluation
        _need(not (uo.phases > 0 and self.network.head == "flat"), f"{key}.upload_offsets.phases",
              uo.phases, f"upload offsets need a per-bit head; set {key}.upload_offsets.phases=0 with head flat")
        net = self.network
        _need(not (net.serve_covered_fit and net.head == "flat"), f"{key}.network.serve_covered_fit",
              net.serve_covered_fit, f"needs a per-bit head; set {key}.network.serve_covered_fit=false with head flat")
        fitted = uo.phases > 0 or net.serve_covered_fit or bool(net.association_slopes)
        _need(not fitted or uo.seed >= ev.seed + ev.episodes or ev.seed >= uo.seed + uo.episodes,
              f"{key}.upload_offsets.seed", uo.seed,
              f"the validation seeds [seed, seed + episodes) must not meet the evaluation's "
              f"[{ev.seed}, {ev.seed + ev.episodes}): choose another")
        _need(len(self.seeds) >= 1, f"{key}.seeds", self.seeds, "need at least one seed")


@dataclass(frozen=True)
class TrackingConfig:
    """Where runs are recorded (MLflow); the embedded default needs no server."""

    mlflow_uri: str = "sqlite:///mlflow.db"
    experiment_prefix: str = "dntsync"

    def validate(self, key: str = "tracking") -> None:
        _need(bool(self.mlflow_uri), f"{key}.mlflow_uri", self.mlflow_uri, "need a URI")


@dataclass(frozen=True)
class TuneConfig:
    """Hyper-parameter search with Optuna (`dntsync tune`; docs/tuning.md).

    The knobs and their ranges live in `search_space`, one space per objective. The TPE
    sampler is seeded from `Config.seed` (mixed with the trials already in the study and the
    worker index, so a resumed study or a second worker does not replay the same draws).
    """

    # marl: the learner's evaluation team reward (maximise); twin: its validation loss (minimise)
    objective: Literal["marl", "twin"] = "marl"
    search_space: str = "conf/search_space.yaml"
    # Finished trials (complete, pruned or failed) the study should hold in total: a resumed
    # study or a further worker runs only the missing ones.
    n_trials: int = 20
    timeout: float | None = None  # seconds for this invocation; a running trial is never cut
    study_name: str | None = None  # None: "twin" or "marl-<algo>"
    # An SQLAlchemy database URL: sqlite:///... (one machine) or postgresql://user:pw@host/db
    # (shared by workers on many machines). Trials beat a heartbeat in it (below).
    storage: str = "sqlite:///optuna/studies.db"
    pruner: Literal["median", "none"] = "median"
    pruner_startup_trials: int = 5  # trials finished before any is pruned
    pruner_warmup_epochs: int = 10  # a trial is never pruned before this training epoch
    # A worker's running trial beats every heartbeat_interval seconds; one silent for
    # grace_period seconds (its worker died) is failed and retried up to max_retry times.
    heartbeat_interval: int = 60
    grace_period: int = 180
    max_retry: int = 1
    output_dir: str = "conf/tuned"  # best params: <output_dir>/<study>.yaml
    figures_dir: str = "figures/tune"  # <figures_dir>/<study>-history.png, -importances.png

    def validate(self, key: str = "tune") -> None:
        _need(self.n_trials >= 1, f"{key}.n_trials", self.n_trials, "need >= 1")
        _need(self.timeout is None or self.timeout > 0, f"{key}.timeout", self.timeout,
              "need null or > 0 seconds")
        _need(self.study_name is None or bool(self.study_name.strip()), f"{key}.study_name",
              self.study_name, "need null or a non-empty name")
        _need("://" in self.storage, f"{key}.storage", self.storage,
              "need a database URL, e.g. sqlite:///optuna/studies.db or "
              "postgresql://user:password@host:5432/db")
        for name in ("pruner_startup_trials", "pruner_warmup_epochs", "max_retry"):
            _need(getattr(self, name) >= 0, f"{key}.{name}", getattr(self, name), "need >= 0")
        _need(self.heartbeat_interval >= 1, f"{key}.heartbeat_interval",
              self.heartbeat_interval, "need >= 1 second")
        _need(self.grace_period > self.heartbeat_interval, f"{key}.grace_period",
              self.grace_period, f"need > heartbeat_interval ({self.heartbeat_interval})")


@dataclass(frozen=True)
class SweepConfig:
    """One figure's sweep: the dotted config key on the x axis, its values, and the dotted
    overrides (`key=value`) applied at every point."""

    key: str
    values: tuple[int | float, ...]
    fixed: tuple[str, ...] = ()

    def validate(self, key: str) -> None:
        _need(len(self.values) >= 1, f"{key}.values", self.values, "need at least one value")
        _need("." in self.key, f"{key}.key", self.key, "need a dotted config key, e.g. scenario.eps")
        for text in self.fixed:
            _need("=" in text, f"{key}.fixed", text, "need 'dotted.key=value' strings")


@dataclass(frozen=True)
class SweepsConfig:
    """The paper's Figs. 3-6: which learners, the sweep grids, and how many runs at once."""

    algos: tuple[Algo, ...] = ("vdn", "iql")  # the learners of the sweeps (Figs. 4-6)
    # the learners of the Fig. 3 setting (the train_marl stages, the report's learner table)
    fig3_algos: tuple[Algo, ...] = ("vdn", "iql")  # qmix too: scripts/ablation.py trains it (make ablation)
    workers: int = 2  # training runs in parallel (processes, one torch thread each)
    # null: each batch of runs on a local Dask cluster of `workers` processes; an address
    # (tcp://host:8786): the same runs on that Dask scheduler's workers (docs/pipeline.md)
    cluster: str | None = None
    # greedy evaluation of the sweep runs every this many epochs; null: only at the end
    # (Figs. 4-6 use the final evaluation only; evaluating never changes training)
    eval_every: int | None = None
    fig4: SweepConfig = field(default_factory=lambda: SweepConfig(
        "scenario.eps", (0.1, 0.25, 0.5, 0.8, 0.99), ("scenario.n_rbs=9",)))
    fig5: SweepConfig = field(default_factory=lambda: SweepConfig(
        "scenario.n_users", (6, 8, 10, 12, 14, 16), ("scenario.eps=0.25", "scenario.n_rbs=12")))
    # Fig. 6 replays one evaluation episode of the Fig. 5 models at this x value.
    fig6_value: int | float = 12
    fig6_episode_seed: int = 20_000

    def validate(self, key: str = "sweeps") -> None:
        for name in ("algos", "fig3_algos"):
            algos = getattr(self, name)
            _need(len(algos) >= 1 and len(set(algos)) == len(algos), f"{key}.{name}", list(algos),
                  f"need distinct names from {list(ALGOS)}")
        _need(self.workers >= 1, f"{key}.workers", self.workers, "need >= 1")
        _need(self.cluster is None or re.fullmatch(r"(tcp|tls|inproc|ws|wss)://\S+", self.cluster),
              f"{key}.cluster", self.cluster,
              "need null (a local cluster) or a Dask scheduler address, e.g. tcp://10.0.0.5:8786")
        _need(self.eval_every is None or self.eval_every >= 1, f"{key}.eval_every",
              self.eval_every, "need >= 1, or null for the end of training only")
        self.fig4.validate(f"{key}.fig4")
        self.fig5.validate(f"{key}.fig5")
        _need(self.fig6_value in self.fig5.values, f"{key}.fig6_value", self.fig6_value,
              f"need one of sweeps.fig5.values {list(self.fig5.values)}")


@dataclass(frozen=True)
class Config:
    """The whole pipeline's configuration. `seed` fixes every random stream of a run."""

    seed: int = 0
    scenario: Scenario = field(default_factory=Scenario)
    data: DataConfig = field(default_factory=DataConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    twin: TwinConfig = field(default_factory=TwinConfig)
    marl: MarlConfig = field(default_factory=MarlConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    sweeps: SweepsConfig = field(default_factory=SweepsConfig)

    def validate(self) -> None:
        self._validate_sections()
        self._validate_sweep_points()

    def _validate_sections(self) -> None:
        _need(self.seed >= 0, "seed", self.seed, "need seed >= 0")
        self.scenario.validate()
        for name in ("data", "env", "twin", "marl", "tracking", "tune", "sweeps"):
            getattr(self, name).validate(name)
        uo = self.marl.upload_offsets
        _need(not uo.retry_slots or self.env.observation == "full", "marl.upload_offsets.retry_periods",
              list(uo.retry_periods), "the retry offsets read the slots since each BS's last success from "
              "env.observation: full; set env.observation=full or marl.upload_offsets.retry_periods=[]")

    def _validate_sweep_points(self) -> None:
        """Every point of the Fig. 4 / Fig. 5 grids is a valid config (its key exists, its
        values and `fixed` overrides fit), so a bad grid fails on load, not mid-pipeline."""
        for name in ("fig4", "fig5"):
            spec: SweepConfig = getattr(self.sweeps, name)
            for value in spec.values:
                data = to_plain(self)
                try:
                    for text in (*spec.fixed, f"{spec.key}={value}"):
                        _set_dotted(data, *parse_override(text))
                    _build(Config, data, "")._validate_sections()
                except ConfigError as err:
                    raise ConfigError(f"sweeps.{name}: the point {spec.key} = {value!r} (fixed: "
                                      f"{list(spec.fixed)}) is not a valid config: {err}") from None

    def to_dict(self) -> dict:
        return to_plain(self)

    def data_hash(self) -> str:
        """A short, stable hash of what the trajectory data set depends on: the run seed, the
        data section and the scenario's mobility keys (not radio, rewards or learning)."""
        plain = {"seed": self.seed, "data": to_plain(self.data),
                 "mobility": {k: to_plain(getattr(self.scenario, k)) for k in MOBILITY_KEYS}}
        return hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()[:16]

    def section_hash(self, *sections: str) -> str:
        """A short, stable hash of the named sections (e.g. to tie a data set to its config)."""
        plain = {name: to_plain(getattr(self, name)) for name in sections}
        return hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------- building from dicts
def to_plain(obj: Any) -> Any:
    """Dataclasses and tuples to plain dicts and lists (YAML/JSON-ready)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [to_plain(v) for v in obj]
    return obj


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        _need(isinstance(value, dict), key, value, f"need a mapping of {hint.__name__} fields")
        return _build(hint, value, key)
    if origin is Literal:
        _need(value in args, key, value, f"need one of {list(args)}")
        return value
    if origin in (tuple, list):
        _need(isinstance(value, (list, tuple)), key, value, "need a list")
        if origin is tuple and args and args[-1] is not Ellipsis:
            _need(len(value) == len(args), key, value, f"need a list of {len(args)} items")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        return tuple(_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key} = {value!r} is invalid: need {hint}")
    if hint is bool:
        _need(isinstance(value, bool), key, value, "need true or false")
        return value
    if hint is int:
        _need(isinstance(value, int) and not isinstance(value, bool), key, value, "need an integer")
        return value
    if hint is float:
        _need(isinstance(value, (int, float)) and not isinstance(value, bool), key, value,
              "need a number")
        _need(math.isfinite(value), key, value, "need a finite number")
        return float(value)
    if hint is str:
        _need(isinstance(value, str), key, value, "need a string")
        return value
    if hint is type(None):
        _need(value is None, key, value, "need null")
        return None
    return value


def _build(cls: type, data: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown key(s) {[where + k for k in unknown]}; allowed: {sorted(names)}"
        )
    data = dict(data)
    for f in dataclasses.fields(cls):  # a partly given sub-section keeps its other defaults
        if isinstance(data.get(f.name), dict) and f.default_factory is not dataclasses.MISSING:
            data[f.name] = merge(to_plain(f.default_factory()), data[f.name])
    missing = sorted(f.name for f in dataclasses.fields(cls) if f.init and f.name not in data
                     and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    if missing:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"missing key(s) {[where + k for k in missing]}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {k!r} is not a section")
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`'scenario.n_users=20'` -> `('scenario.n_users', 20)`; the value is a YAML scalar."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    return key.strip(), read_yaml(raw, f"override {text!r}")


def merge(base: dict, extra: dict) -> dict:
    """Recursive dict merge, `extra` winning."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def from_dict(data: dict | None) -> Config:
    cfg = _build(Config, data or {}, "")
    cfg.validate()
    return cfg


def load_config(
    path: str | Path | None = DEFAULT_PARAMS,
    overrides: typing.Sequence[str] = (),
    extra_files: typing.Sequence[str | Path] = (),
) -> Config:
    """Load `path`, merge `extra_files`, apply dotted overrides. `path=None` starts from the
    embedded defaults; so does a missing or empty `conf/params.yaml`, said on stderr (any
    other missing file is an error)."""
    data: dict = {}
    if path is not None:
        if Path(path) == DEFAULT_PARAMS and not Path(path).exists():
            print(f"note: {DEFAULT_PARAMS} not found here: running on the built-in defaults "
                  "(`dntsync show-config` prints them)", file=sys.stderr)
        else:
            data = read_yaml_file(path, "params file")
            if not data:
                print(f"note: {path} is empty: running on the built-in defaults", file=sys.stderr)
    for extra in extra_files:
        data = merge(data, read_yaml_file(extra, "config file"))
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(data, key, value)
    return from_dict(data)


def apply_overrides(cfg: Config, overrides: typing.Sequence[str]) -> Config:
    """A new, validated config: `cfg` with dotted `key=value` overrides applied."""
    data = to_plain(cfg)
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(data, key, value)
    return from_dict(data)


def replace_in(obj: Any, section: str, **changes: Any) -> Any:
    """A copy of the frozen config `obj` with `changes` made to its (dotted, nested) section:
    `replace_in(cfg, "marl.algorithm", name="iql")`. Not validated (see `apply_overrides`)."""
    if not section:
        return dataclasses.replace(obj, **changes)
    head, _, rest = section.partition(".")
    return dataclasses.replace(obj, **{head: replace_in(getattr(obj, head), rest, **changes)})


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
