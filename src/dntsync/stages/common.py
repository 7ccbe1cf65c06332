"""What the stages share (they import this module and `runs`, never each other).

- The headline numbers each stage leaves for `dvc metrics show` / `dvc exp show`: one small
  JSON file per learner run, sweep point x learner, twin and Fig. 6 learner, under
  `metrics/summary/` (beside the stage's own metrics folder, so a run with its outputs
  elsewhere leaves the pipeline's files alone), with the same few keys (team reward, sum
  rate, DNT error, ratio to the oracle; the twin's error against the Bayes floor), so DVC's
  tables have a handful of columns and a row per file. The long reports (`metrics/*.json`,
  `metrics/marl/*.json`) stay as the stages' plain outputs, which DVC does not read as
  metrics. `metrics/summary/` is tracked in git (with `dvc.lock`), as DVC expects, so
  `dvc exp show` has the baseline's values too.
- The sweeps' points (`Point`, `sweep_points`, `point_config`): a figure's x values, each
  with its overrides, output folders and, where the users move differently, its own twin.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dntsync.config import Config, SweepConfig, apply_overrides
from dntsync.files import write_json
from dntsync.metrics import HEADLINE_METRICS
from dntsync.network.scenario import MOBILITY_KEYS

RUNS_DIR = Path("runs")


# ---------------------------------------------------------------------- headline numbers
SUMMARY = Path("metrics/summary")


def learner(report: dict) -> dict:
    """A learner's final evaluation (one seed's `fit_marl` report)."""
    out = {k: round(report["eval"][k]["mean"], 4) for k in HEADLINE_METRICS}
    if "ratio_to_oracle" in report:
        out["ratio_to_oracle"] = round(report["ratio_to_oracle"], 4)
    return out


def summary_dir(metrics_path: str) -> Path:
    """`summary/` beside a stage's metrics file or folder (`metrics/marl`, `metrics/twin.json`
    -> `metrics/summary`)."""
    return Path(metrics_path).parent / SUMMARY.name


def write_learner(report: dict, metrics_dir: str) -> Path:
    """`<metrics_dir>/../summary/marl_<algo>_seed<S>.json`."""
    name = f"marl_{report['algo']}_seed{report['seed']}.json"
    return write_json(summary_dir(metrics_dir) / name, learner(report))


def write_twin(report: dict, metrics_file: str) -> Path:
    one = report["one_step"]["overall"]
    return write_json(summary_dir(metrics_file) / "twin.json",
                      {"twin_mse": round(one["twin_mse"], 5), "bayes_floor": round(one["floor"], 5),
                       "twin_ratio": round(one["twin_ratio"], 4)})


def write_sweep(summary: dict) -> list[Path]:
    """One file per point and learner: `metrics/summary/<sweep>/<label>_<algo>.json`, the
    means over seeds (and the mean's ratio to the oracle on the same episodes)."""
    written = []
    for point in summary["points"]:
        oracle = point.get("baselines", {}).get("oracle", {}).get("team_reward", {}).get("mean")
        for algo, res in point["algos"].items():
            out = {k: round(res[k]["mean"], 4) for k in HEADLINE_METRICS}
            if oracle:
                out["ratio_to_oracle"] = round(res["team_reward"]["mean"] / oracle, 4)
            written.append(write_json(SUMMARY / summary["sweep"] / f"{point['label']}_{algo}.json", out))
    return written


def write_episode(trace: dict) -> list[Path]:
    """Fig. 6's episode: each learner's mean DNT error, `metrics/summary/fig6/<algo>.json`."""
    return [write_json(SUMMARY / "fig6" / f"{a}.json", {"dnt_error": round(s["dnt_error"], 4)})
            for a, s in trace["summary"].items()]


# ---------------------------------------------------------------------- sweep points
@dataclass(frozen=True)
class Point:
    """One x value of a sweep and every override that makes its config."""

    sweep: str
    key: str  # the dotted config key on the x axis
    value: int | float
    overrides: tuple[str, ...]

    @property
    def label(self) -> str:
        return f"{self.key.split('.')[-1]}={self.value}"

    @property
    def directory(self) -> Path:
        return RUNS_DIR / self.sweep / self.label


def sweep_points(cfg: Config, sweep: str) -> list[Point]:
    spec: SweepConfig = getattr(cfg.sweeps, sweep)
    return [Point(sweep, spec.key, v, (*spec.fixed, f"{spec.key}={v}")) for v in spec.values]


def needs_own_twin(base: Config, point_cfg: Config) -> bool:
    """Whether the point's users move differently from the base scenario's (so the base twin,
    trained on the base users, does not apply)."""
    return base.env.predictor == "gru" and any(
        getattr(base.scenario, k) != getattr(point_cfg.scenario, k) for k in MOBILITY_KEYS)


def point_config(base: Config, point: Point) -> Config:
    """The point's config: its overrides, its own output folders, its own twin if needed."""
    d = point.directory
    overrides = [*point.overrides, f"marl.outputs.model_dir={d}/models",
                 f"marl.outputs.metrics_dir={d}/metrics",
                 f"marl.outputs.checkpoint_dir={d}/checkpoints",
                 f"marl.evaluation.every={base.sweeps.eval_every or base.marl.algorithm.epochs}"]
    cfg = apply_overrides(base, overrides)
    if needs_own_twin(base, cfg):
        cfg = apply_overrides(cfg, [f"data.path={d}/twin/trajectories.npz",
                                    f"twin.checkpoint={d}/twin/twin.ckpt",
                                    f"twin.metrics={d}/twin/twin.json",
                                    f"twin.figure={d}/twin/fig2.png",
                                    f"env.twin_checkpoint={d}/twin/twin.ckpt"])
    return cfg
