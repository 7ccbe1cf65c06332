"""Train VDN or IQL for one seed and report it beside the baselines: `fit_marl`.

Used by `dntsync train-marl` and by the hyper-parameter tuner (which passes extra Lightning
callbacks, e.g. an Optuna pruner on "eval_team_reward", and switches the outputs off).

One run = Algorithm 2 for G = `marl.algorithm.epochs` epochs under a Lightning `Trainer`:
`EpisodeDataModule` collects D episodes per epoch and serves replay minibatches, the
`QLearner` subclass updates, greedy evaluation on the fixed evaluation episodes runs as
validation every `marl.evaluation.every` epochs. Then whom the greedy policy serves
(`marl.network.serve_covered_fit`), its association slope
(`marl.network.association_slopes`) and, with `marl.upload_offsets.phases` > 0, its upload
offsets are fitted on validation episodes (`dntsync.marl.offsets`) before the final
evaluation. With outputs on, Lightning keeps
`<checkpoint_dir>/<algo>_seed<S>/last.ckpt` (model, optimiser, replay, curve so far) after
every epoch and a rerun of the same command resumes from it; at the end the final greedy
evaluation and the baselines on the same episodes are written (see `write_run_outputs`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from dntsync.config import Config, replace_in, to_plain
from dntsync.env.core import DntEnv
from dntsync.env.evaluate import Evaluation, best_heuristic
from dntsync.env.policies import baseline_policies
from dntsync.env.predictors import Predictor
from dntsync.errors import RunError, UserError
from dntsync.files import copy_file, save_torch, write_csv, write_json, write_text
from dntsync.marl.learners import LEARNERS, QLearner
from dntsync.marl.offsets import fit_association_slope, fit_serve_covered, fit_upload_offsets
from dntsync.marl.replay import EpisodeDataModule
from dntsync.metrics import METRICS
from dntsync.tracking import log_torch_model, training_run

MLFLOW_SECTIONS = ("seed", "scenario", "env", "marl")
CURVE_COLUMNS = ("epoch", "train_reward", *(f"train_{k}" for k in METRICS[1:]), "train_loss",
                 "epsilon", *(f"eval_{k}" for k in METRICS))
# What a resumed run may change: training longer (`marl.algorithm.epochs`), the stage's
# list of seeds, where outputs go (`marl.outputs`) and what is fitted after training
# (`marl.upload_offsets`, `marl.network.association_slopes`).
RESUMABLE_CHANGES = ("seeds", "outputs", "upload_offsets", "algorithm.epochs",
                     "network.association_slopes", "network.serve_covered_fit")  # `marl` keys not used in training

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*IterableDataset.*has `__len__` defined.*")
warnings.filterwarnings("ignore", ".*Total length of `DataLoader` across ranks is zero.*")
warnings.filterwarnings("ignore", ".*Checkpoint directory .* exists and is not empty.*")  # run.json


# ---------------------------------------------------------------------- building blocks
def build_learner(cfg: Config, algo: str, env: DntEnv) -> QLearner:
    mc = cfg.marl
    return LEARNERS[algo](
        n_agents=env.n_agents, obs_dim=env.obs_dim, n_users=env.scenario.n_users,
        hidden=mc.network.hidden, head=mc.network.head, sparse_head=mc.network.sparse_head,
        grad_clip=mc.algorithm.grad_clip, gamma=mc.algorithm.gamma, lr=mc.algorithm.lr,
        double_q=mc.algorithm.double_q, target_update_epochs=mc.algorithm.target_update_epochs,
        epsilon_start=mc.collection.epsilon_start, epsilon_end=mc.collection.epsilon_end,
        epsilon_decay_epochs=mc.collection.epsilon_decay_epochs,
        exploration=mc.collection.exploration, user_dim=env.user_dim,
        state_dim=env.state_dim, reward_centering=mc.algorithm.reward_centering,
        association=env.layout() if mc.network.association else None,
        # QMIX keeps one Q per BS: its mixer is not a sum (docs/learners.md, "The error value")
        error_gamma=mc.algorithm.error_gamma if LEARNERS[algo].additive else 0.0,
        upload_phases=mc.upload_offsets.cycle,
        retry_slots=mc.upload_offsets.retry_slots, episode_length=cfg.scenario.episode_length,
    )


def build_data(cfg: Config, predictor: Predictor, seed: int) -> EpisodeDataModule:
    mc = cfg.marl
    env = DntEnv(cfg.scenario, predictor, n_envs=mc.collection.episodes_per_epoch, seed=seed,
                 **cfg.env.observation_options())
    evaluation = Evaluation(cfg.scenario, predictor, mc.evaluation.episodes, mc.evaluation.seed,
                            **cfg.env.observation_options())
    return EpisodeDataModule(env, evaluation, seed=seed,
                             buffer_capacity=mc.collection.buffer_capacity,
                             batches_per_epoch=mc.algorithm.batches_per_epoch,
                             batch_size=mc.algorithm.batch_size)


@dataclasses.dataclass(frozen=True)
class RunPaths:
    """Where one (algo, seed) run writes; `name` is `<algo>_seed<S>`."""

    checkpoints: Path  # Lightning's last.ckpt + run.json (what it was trained with)
    model: Path
    metrics: Path
    curve: Path

    @classmethod
    def of(cls, cfg: Config, algo: str, seed: int) -> RunPaths:
        mc = cfg.marl
        name = f"{algo}_seed{seed}"
        return cls(checkpoints=Path(mc.outputs.checkpoint_dir) / name,
                   model=Path(mc.outputs.model_dir) / f"{name}.ckpt",
                   metrics=Path(mc.outputs.metrics_dir) / f"marl_{name}.json",
                   curve=Path(mc.outputs.metrics_dir) / "curves" / f"marl_{name}.csv")


def run_fingerprint(cfg: Config, predictor_description: str) -> dict:
    """What a checkpoint must have been trained with to be resumed."""
    marl = to_plain(cfg.marl)
    for key in RESUMABLE_CHANGES:
        *sections, name = key.split(".")
        parent = marl
        for section in sections:
            parent = parent[section]
        del parent[name]
    return {"scenario": to_plain(cfg.scenario), "env": to_plain(cfg.env), "marl": marl,
            "predictor": predictor_description}


def drop_resumable_state(cfg: Config, algo: str, seed: int) -> None:
    """Delete a finished run's `last.ckpt` (its outputs are written): it is only for resuming
    an interrupted run, is 64 MB at U = 12 and hundreds at U = 16, and a rerun after a code
    change must train afresh, not "resume" a finished run of the old code."""
    shutil.rmtree(RunPaths.of(cfg, algo, seed).checkpoints, ignore_errors=True)


def _unreadable(last: Path, record: Path) -> str | None:
    """Why the resumable state cannot be read (which file, what error), or None."""
    try:
        json.loads(record.read_text())
    except (OSError, ValueError) as err:
        return f"{record} is unreadable ({type(err).__name__})"
    try:
        torch.load(last, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        return f"{last} is unreadable ({type(err).__name__})"
    return None


def resume_path(paths: RunPaths, fingerprint: dict) -> Path | None:
    """`last.ckpt` if it was written by a run with the same fingerprint; else start afresh.

    A state that cannot be read (a truncated `last.ckpt`, a corrupt `run.json`) is moved
    aside to `<checkpoints>.bad-<time>`, said on stderr, and the run starts afresh."""
    last, record = paths.checkpoints / "last.ckpt", paths.checkpoints / "run.json"
    if last.exists() and record.exists():
        problem = _unreadable(last, record)
        if problem:
            aside = paths.checkpoints.with_name(
                f"{paths.checkpoints.name}.bad-{time.strftime('%Y%m%d-%H%M%S')}")
            paths.checkpoints.rename(aside)
            print(f"warning: {problem}; kept aside as {aside}, training afresh", file=sys.stderr)
        elif json.loads(record.read_text()) == fingerprint:
            return last
    if paths.checkpoints.exists():
        shutil.rmtree(paths.checkpoints)  # another configuration's state: not resumable
    paths.checkpoints.mkdir(parents=True, exist_ok=True)
    write_text(record, json.dumps(fingerprint, indent=1, sort_keys=True))
    return None


def tracked_run_id(paths: RunPaths) -> str | None:
    """The MLflow run an interrupted run was logging to (`mlflow_run.json` beside its
    resumable state), so that its resume continues the same run."""
    try:
        return json.loads((paths.checkpoints / "mlflow_run.json").read_text())["run_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


class EpochRecorder(Callback):
    """Per-epoch curve rows (collection stats, loss, epsilon, greedy evaluation when run).

    Also logs the collection statistics (`train_reward`, ...) so they are MLflow curves.
    Its rows are saved in checkpoints, so a resumed run's curve is whole.
    """

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []
        self._eval: dict[str, float] = {}

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._eval = {k: float(v) for k, v in trainer.callback_metrics.items()
                          if k.startswith("eval_")}

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        collected = trainer.datamodule.last_collection
        pl_module.log_dict(collected)
        row = {"epoch": trainer.current_epoch + 1, **collected, **self._eval,
               "epsilon": pl_module.epsilon(trainer.current_epoch)}
        if "train_loss" in trainer.callback_metrics:
            row["train_loss"] = float(trainer.callback_metrics["train_loss"])
        self.rows.append(row)
        self._eval = {}

    def state_dict(self) -> dict:
        return {"rows": [dict(r) for r in self.rows]}

    def load_state_dict(self, state: dict) -> None:
        self.rows = [dict(r) for r in state["rows"]]


def write_curve(rows: list[dict], path: Path) -> None:
    write_csv(path, CURVE_COLUMNS, rows)


def save_q_networks(learner: QLearner, path: Path, extra: dict) -> None:
    """The final Q networks (online and target), loadable with `LEARNERS[algo].load_from_checkpoint`."""
    save_torch({"state_dict": learner.state_dict(), "hyper_parameters": dict(learner.hparams),
                "pytorch-lightning_version": pl.__version__, "dntsync": extra}, path)


def load_q_networks(path: str | Path, cfg: Config | None = None) -> tuple[QLearner, dict]:
    """The Q networks in `path` (a file of `save_q_networks`), read with `weights_only=True`,
    and the run's record ("algo", "seed", "predictor"). With `cfg`, the model must fit its
    scenario (M BSs, U users). Every unreadable or unfitting file is a `UserError` naming it."""
    path = Path(path)
    fix = "pass a model of `dntsync train-marl` (models/marl/<algo>_seed<S>.ckpt)"
    if not path.is_file():
        raise UserError(f"model file {str(path)!r} does not exist; {fix}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise UserError(f"model file {str(path)!r} is corrupt or not a plain tensor dict "
                        f"({type(err).__name__}); {fix}") from None
    if not (isinstance(payload, dict) and isinstance(payload.get("dntsync"), dict)
            and payload["dntsync"].get("algo") in LEARNERS and "hyper_parameters" in payload):
        what = "a twin checkpoint" if isinstance(payload, dict) and "scaler" in payload else "not one"
        raise UserError(f"model file {str(path)!r} is not a train-marl model ({what}); {fix}")
    record, hp = payload["dntsync"], payload["hyper_parameters"]
    if cfg is not None:
        user_dim = 3 + len(cfg.env.user_features)  # DntEnv.user_dim / obs_dim
        obs_dim = user_dim * cfg.scenario.n_users + (2 if cfg.env.observation == "full" else 0)
        want = {"n_agents": cfg.scenario.n_bs, "n_users": cfg.scenario.n_users,
                "obs_dim": obs_dim}
        diff = [f"{k} = {hp.get(k)} in the model, {v} here" for k, v in want.items() if hp.get(k) != v]
        if diff:
            raise UserError(f"model file {str(path)!r} was trained for another scenario "
                            f"({'; '.join(diff)}): pass the --set/--config it was trained with")
    try:
        learner = LEARNERS[record["algo"]].load_from_checkpoint(path, map_location="cpu",
                                                                weights_only=True)
    except Exception as err:
        raise UserError(f"model file {str(path)!r} does not load into a {record['algo']} learner "
                        f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                        f"{fix}") from None
    return learner, record


def compare(learner_eval: dict, baselines: dict) -> dict:
    """The learner's mean team reward beside the oracle's and the best heuristic's."""
    reward = learner_eval["team_reward"]["mean"]
    out: dict = {}
    if "oracle" in baselines:
        oracle = baselines["oracle"]["team_reward"]["mean"]
        out["oracle_team_reward"] = oracle
        out["ratio_to_oracle"] = reward / oracle if oracle else math.nan
    heuristic = best_heuristic(baselines, exclude=("oracle", "random"))
    out["best_heuristic"] = heuristic
    out["best_heuristic_team_reward"] = baselines[heuristic]["team_reward"]["mean"]
    out["ratio_to_best_heuristic"] = reward / out["best_heuristic_team_reward"]
    return out


def evaluate_baselines(cfg: Config, evaluation: Evaluation) -> dict:
    """Every policy of `baseline_policies` on the learners' evaluation episodes, the tuned
    heuristics' phases chosen on the validation episodes the learners' upload offsets are
    fitted on (`marl.upload_offsets`)."""
    uo, ev = cfg.marl.upload_offsets, cfg.marl.evaluation
    validation = Evaluation(cfg.scenario, evaluation.envs[0].predictor, uo.episodes, uo.seed,
                            **cfg.env.observation_options())
    results = {}
    for policy in baseline_policies(cfg.scenario, ev.upload_periods, seed=ev.seed,
                                    score=lambda p: validation.run(p)["team_reward"]["mean"],
                                    tuned_max=ev.tuned_max):
        try:
            results[policy.name] = evaluation.run(policy)
        except ValueError as err:  # e.g. the oracle's search is too large for this scenario
            warnings.warn(f"baseline {policy.name} skipped: {err}")
    return results


def source_digest() -> str:
    """A hash of the package's source: what the baselines' numbers depend on besides config."""
    import dntsync

    digest = hashlib.sha256()
    for path in sorted(Path(dntsync.__file__).parent.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def shared_baselines(cfg: Config, evaluation: Evaluation, predictor_description: str) -> dict:
    """`evaluate_baselines`, played once per setting: kept in
    `<checkpoint_dir>/baselines/<key>.json` and read back by every run on the same evaluation
    episodes (the Fig. 3 stages, a sweep point's algorithms and seeds). The key hashes
    everything the baselines' numbers depend on: the scenario, the environment, the
    evaluation section, the predictor (and the twin checkpoint's bytes) and the package's
    source; a file that does not read back as the baselines is played again."""
    twin = Path(cfg.env.twin_checkpoint)
    key = hashlib.sha256(json.dumps({
        "scenario": to_plain(cfg.scenario), "env": to_plain(cfg.env),
        "evaluation": to_plain(cfg.marl.evaluation), "predictor": predictor_description,
        "validation": [cfg.marl.upload_offsets.episodes, cfg.marl.upload_offsets.seed],
        "twin": hashlib.sha256(twin.read_bytes()).hexdigest() if predictor_description.startswith("gru") else None,
        "source": source_digest(),
    }, sort_keys=True).encode()).hexdigest()[:24]
    path = Path(cfg.marl.outputs.checkpoint_dir) / "baselines" / f"{key}.json"
    try:
        kept = json.loads(path.read_text())
        if all(math.isfinite(r[k]["mean"]) for r in kept.values() for k in METRICS):
            return kept
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        pass  # not there (or unreadable): play them
    results = evaluate_baselines(cfg, evaluation)
    write_json(path, results)  # atomically: two runs writing the same key write the same numbers
    return results


# ---------------------------------------------------------------------- one run
def fit_marl(cfg: Config, *, algo: str | None = None, seed: int | None = None,
             callbacks: list | None = None, enable_progress_bar: bool = True,
             log_mlflow: bool = True, write_outputs: bool = True,
             predictor: tuple[Predictor, str] | None = None,
             where: dict[str, str] | None = None) -> dict:
    """Train `algo` (default `marl.algorithm.name`) with `seed` (default `Config.seed`); return its report.

    The report holds "eval_team_reward" (the final greedy evaluation's mean team reward per
    step), every final evaluation metric under "eval", the run's settings and, with
    `write_outputs`, the baselines on the same episodes and the learner's ratio to the
    oracle and to the best heuristic. `predictor` is `(predictor, description)`; default
    `build_predictor(cfg)` (the GRU twin, or the configured fallback, described). `where`
    ({"sweep": "fig4", "point": "eps=0.5"}) names and tags the MLflow run (`run_label`).
    """
    algo = algo or cfg.marl.algorithm.name
    seed = cfg.seed if seed is None else seed
    if algo not in LEARNERS:
        raise ValueError(f"algo = {algo!r} is invalid: choose from {sorted(LEARNERS)}")
    cfg = replace_in(dataclasses.replace(cfg, seed=seed), "marl.algorithm", name=algo)
    if predictor is None:
        from dntsync.twin.predictor import build_predictor  # the twin layer: only when used

        predictor = build_predictor(cfg)
    predictor_model, predictor_description = predictor
    started = time.perf_counter()

    pl.seed_everything(seed, workers=False, verbose=False)  # initial weights
    data = build_data(cfg, predictor_model, seed)
    learner = build_learner(cfg, algo, data.env)
    recorder = EpochRecorder()
    all_callbacks: list = [recorder, *(callbacks or [])]
    paths = RunPaths.of(cfg, algo, seed)
    ckpt_path, previous_run = None, None
    if write_outputs:
        previous_run = tracked_run_id(paths)
        ckpt_path = resume_path(paths, run_fingerprint(cfg, predictor_description))
        # `last.ckpt` overwritten every `checkpoint_every` epochs (after the learner's
        # epoch-end target sync)
        all_callbacks.append(ModelCheckpoint(dirpath=paths.checkpoints, filename="last",
                                             save_top_k=1, every_n_epochs=cfg.marl.outputs.checkpoint_every,
                                             enable_version_counter=False))

    def train(logger) -> None:
        trainer = pl.Trainer(
            max_epochs=cfg.marl.algorithm.epochs, accelerator="cpu", devices=1, logger=logger,
            callbacks=all_callbacks, enable_checkpointing=write_outputs,
            enable_progress_bar=enable_progress_bar, enable_model_summary=False,
            check_val_every_n_epoch=cfg.marl.evaluation.every,  # clipping: QLearner.training_step
            num_sanity_val_steps=0, log_every_n_steps=1, default_root_dir=paths.checkpoints,
        )
        trainer.fit(learner, datamodule=data, ckpt_path=ckpt_path, weights_only=True)

    def finish() -> dict:
        offsets = slope = serve = None
        uo, network = cfg.marl.upload_offsets, cfg.marl.network
        slopes = network.association_slopes if learner.online.association is not None else ()
        if learner.offsets is not None or slopes or network.serve_covered_fit:
            validation = Evaluation(cfg.scenario, predictor_model, uo.episodes, uo.seed,
                                    **cfg.env.observation_options())
        if network.serve_covered_fit:  # whom the BSs serve, whom the association gives the
            serve = fit_serve_covered(learner, validation)  # overlap users, then the upload timing
        if slopes:
            slope = fit_association_slope(learner, validation, slopes)
        if learner.offsets is not None:
            offsets = fit_upload_offsets(learner, validation, uo.grid, uo.passes, uo.phases, uo.periods,
                                         uo.force, uo.retry_periods, uo.retry_tuned_max)
        final = data.evaluation.run(learner.greedy_policy())
        if not all(math.isfinite(v["mean"]) for v in final.values()):
            raise RunError(f"{algo} seed {seed}: the final evaluation is not finite "
                           f"({ {k: v['mean'] for k, v in final.items()} }); no model was written")
        rows = recorder.rows
        fitted = offsets is not None or slope is not None or serve is not None
        if rows and (fitted or not any(k.startswith("eval_") for k in rows[-1])):
            # the curve ends at the final policy (with whom it serves and its upload offsets)
            rows[-1].update({f"eval_{k}": v["mean"] for k, v in final.items()})
        report = {
            "algo": algo, "seed": seed, "predictor": predictor_description,
            "scenario": {k: getattr(cfg.scenario, k) for k in ("n_users", "n_rbs", "eps",
                                                                "episode_length")},
            "observation": cfg.env.observation, "head": cfg.marl.network.head,
            "epochs": cfg.marl.algorithm.epochs, "resumed_from": str(ckpt_path) if ckpt_path else None,
            "eval_team_reward": final["team_reward"]["mean"], "eval": final,
            "eval_seeds": data.evaluation.seeds, "eval_episodes": data.evaluation.n_episodes,
        }
        if offsets is not None:
            report["upload_offsets"] = offsets
        if slope is not None:
            report["association_slope"] = slope
        if serve is not None:
            report["serve_covered"] = serve
        if write_outputs:
            report["baselines"] = shared_baselines(cfg, data.evaluation, predictor_description)
            report.update(compare(final, report["baselines"]))
        report["wall_time_s"] = time.perf_counter() - started
        return report

    where = where or default_where()
    tags = {**where, "algo": algo, "seed": str(seed), "resumed_from": str(ckpt_path or "none")}
    if log_mlflow and previous_run and not ckpt_path:  # not resumable: that run ended here
        end_if_running(previous_run, cfg.tracking.mlflow_uri)
    with training_run(cfg, "marl", log_mlflow, run_name=run_label(where, algo, seed),
                      sections=MLFLOW_SECTIONS, tags=tags,
                      run_id=previous_run if ckpt_path else None) as (run, logger):
        if run is None:
            train(logger)
            report = finish()
            if write_outputs:
                write_run_outputs(report, learner, recorder.rows, paths)
            return report
        import mlflow

        if write_outputs:  # a resume continues this run
            write_json(paths.checkpoints / "mlflow_run.json", {"run_id": run.info.run_id})
        mlflow.log_params({"predictor": predictor_description})
        train(logger)
        report = finish()
        logged = mlflow.MlflowClient().get_metric_history(run.info.run_id, "eval_team_reward")
        epochs = cfg.marl.algorithm.epochs
        # by the validation loop, and of the final policy (not so with anything fitted since)
        evaluated_last = (any(m.step == epochs for m in logged)
                          and not {"upload_offsets", "association_slope", "serve_covered"} & set(report))
        mlflow.log_metrics(headline_metrics(report, with_eval=not evaluated_last), step=epochs)
        if report.get("baselines"):
            mlflow.log_table(baselines_table(report), artifact_file="baselines.json")
        with tempfile.TemporaryDirectory() as tmp:
            out = paths if write_outputs else RunPaths.of(
                replace_in(cfg, "marl.outputs", model_dir=tmp, metrics_dir=tmp), algo, seed)
            write_run_outputs(report, learner, recorder.rows, out)
            for path in (out.model, out.metrics, out.curve):
                mlflow.log_artifact(str(path))
            from dntsync.plots import convergence_figure

            mlflow.log_artifact(str(convergence_figure(
                {algo: [out.curve]}, out.metrics, Path(tmp) / f"convergence_{algo}_seed{seed}.png")))
        registered = f"{cfg.tracking.experiment_prefix}-{algo}" if where["sweep"] == "fig3" else None
        log_policy_model(learner, data.env.obs_dim, cfg.scenario.n_bs, registered)
    return report


def log_policy_model(learner: QLearner, obs_dim: int, n_bs: int, registered: str | None) -> None:
    """The greedy policy as an MLflow PyTorch model of the active run (`GreedyActions`:
    observations [B, T, M, D] -> actions [B, T, M]), registered as `registered` if given.
    `mlflow.pytorch.load_model(f"runs:/<run id>/policy")` loads it where dntsync is installed."""
    from dntsync.marl.networks import GreedyActions

    log_torch_model(GreedyActions(learner.online, learner.offsets, learner.retry), "policy",
                    torch.zeros(1, 1, n_bs, obs_dim), registered)


def default_where() -> dict[str, str]:
    """A run outside a sweep: the Fig. 3 setting under the pipeline's `train_marl` stage."""
    stage = os.environ.get("DVC_STAGE", "")
    return {"sweep": "fig3"} if stage.startswith("train_marl") else {"sweep": "train-marl"}


def run_label(where: dict[str, str], algo: str, seed: int) -> str:
    """The MLflow run name: sweep, point, algorithm, seed (e.g. `fig4 eps=0.5 vdn s1`)."""
    return " ".join([*(where[k] for k in ("sweep", "point") if where.get(k)), algo, f"s{seed}"])


def end_if_running(run_id: str, uri: str) -> None:
    """Mark a run that was killed mid-training (still RUNNING in the store) KILLED."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    try:
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, "KILLED")
    except mlflow.exceptions.MlflowException:
        pass  # not in this store (any more)


def headline_metrics(report: dict, with_eval: bool = True) -> dict[str, float]:
    """The final numbers as MLflow metrics, the runs table's columns: the final greedy
    evaluation under the curve's names (`eval_<metric>` at the last epoch, so a column's
    latest value is the final one; `with_eval=False` when the validation loop logged it
    there already) and the ratios to the oracle and the best heuristic."""
    out = {f"eval_{k}": v["mean"] for k, v in report["eval"].items()} if with_eval else {}
    for key in ("ratio_to_oracle", "ratio_to_best_heuristic"):
        if key in report and np.isfinite(report[key]):
            out[key] = report[key]
    if "upload_offsets" in report:  # the validation score before and after fitting them
        out["validation_reward_before_offsets"] = report["upload_offsets"]["validation_before"]
        out["validation_reward_with_offsets"] = report["upload_offsets"]["validation_after"]
    if "association_slope" in report:
        out["association_slope"] = report["association_slope"]["slope"]
    if "serve_covered" in report:
        out["serve_covered"] = float(report["serve_covered"]["serve_covered"])
    return out


def baselines_table(report: dict) -> dict[str, list]:
    """The heuristics and the oracle on the run's evaluation episodes, one row per policy
    (an MLflow table artifact: one table, not one single-point chart per number)."""
    rows = {"policy": [], **{k: [] for k in METRICS}}
    for name, res in {report["algo"]: report["eval"], **report["baselines"]}.items():
        rows["policy"].append(name)
        for k in METRICS:
            rows[k].append(res[k]["mean"])
    return rows


def write_run_outputs(report: dict, learner: QLearner, rows: list[dict], paths: RunPaths) -> None:
    save_q_networks(learner, paths.model, {"algo": report["algo"], "seed": report["seed"],
                                            "predictor": report["predictor"]})
    write_json(paths.metrics, report)
    write_curve(rows, paths.curve)


# ---------------------------------------------------------------------- several seeds
def over_seeds(reports: list[dict]) -> dict[str, dict]:
    """The one aggregation over seeds: for each final evaluation metric of the runs'
    reports, `{"mean", "std", "per_seed"}` of the seeds' episode means (the spread is the
    population standard deviation over the seeds)."""
    out = {}
    for metric in METRICS:
        values = np.array([r["eval"][metric]["mean"] for r in reports])
        out[metric] = {"mean": float(values.mean()), "std": float(values.std()),
                       "per_seed": values.tolist()}
    return out


def aggregate(reports: list[dict]) -> dict:
    """One learner's runs over seeds: their settings, `over_seeds` as flat keys
    (`eval_<metric>`, `..._std_over_seeds`, `..._per_seed`) and the baselines' comparison."""
    first = reports[0]
    out = {
        "algo": first["algo"], "seeds": [r["seed"] for r in reports],
        "predictor": first["predictor"], "scenario": first["scenario"],
        "observation": first["observation"],
        "head": first["head"], "epochs": first["epochs"],
        "eval_seeds": first["eval_seeds"], "eval_episodes": first["eval_episodes"],
    }
    for k, stats in over_seeds(reports).items():
        out[f"eval_{k}"] = stats["mean"]
        out[f"eval_{k}_std_over_seeds"] = stats["std"]
        out[f"eval_{k}_per_seed"] = stats["per_seed"]
    if "baselines" in first:
        out["baselines"] = first["baselines"]  # same evaluation episodes for every seed
        out.update(compare({"team_reward": {"mean": out["eval_team_reward"]}}, first["baselines"]))
    out["wall_time_s_per_seed"] = [r["wall_time_s"] for r in reports]
    return out


def fit_marl_seeds(cfg: Config, algo: str | None = None, **kwargs) -> dict:
    """`fit_marl` for every seed of `marl.seeds`, then the aggregate report (written as
    `marl_<algo>.json`) and the first seed's Q networks as `<model_dir>/<algo>.ckpt`."""
    algo = algo or cfg.marl.algorithm.name
    reports = [fit_marl(cfg, algo=algo, seed=s, **kwargs) for s in cfg.marl.seeds]
    if kwargs.get("write_outputs", True):
        return write_summary(cfg, algo, reports)
    return aggregate(reports)


def seed_summary(cfg: Config, algo: str) -> dict | None:
    """`aggregate` of the per-seed reports `<metrics_dir>/marl_<algo>_seed<S>.json` of every
    seed of `marl.seeds` (what the pipeline's `train_marl@<algo>-<S>` stages write); None
    while any of them is missing."""
    paths = [RunPaths.of(cfg, algo, s).metrics for s in cfg.marl.seeds]
    if not all(p.exists() for p in paths):
        return None
    return aggregate([json.loads(p.read_text()) for p in paths])


def write_summary(cfg: Config, algo: str, reports: list[dict]) -> dict:
    """Aggregate one algorithm's per-seed reports; write `<metrics_dir>/marl_<algo>.json` and
    copy the first seed's Q networks to `<model_dir>/<algo>.ckpt`."""
    summary = aggregate(reports)
    copy_file(RunPaths.of(cfg, algo, cfg.marl.seeds[0]).model,
              Path(cfg.marl.outputs.model_dir) / f"{algo}.ckpt")
    write_json(Path(cfg.marl.outputs.metrics_dir) / f"marl_{algo}.json", summary)
    return summary
