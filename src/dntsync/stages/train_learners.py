"""Train every learner of `sweeps.fig3_algos` with every seed of `marl.seeds`, in parallel.

The Fig. 3 setting in one command, outside DVC: the same runs as the pipeline's
`train_marl@<A>-<S>` stages (`dntsync train-marl --algo A --seed S` for each (A, S)), spread
over `sweeps.workers` processes (`dntsync.stages.runs`, Dask). Writes per-seed networks,
metrics and curves under `marl.outputs.model_dir` and `marl.outputs.metrics_dir`, and the
aggregate over seeds `<metrics_dir>/marl_<algo>.json` with `<model_dir>/<algo>.ckpt` (the
first seed's networks). Finished runs are not repeated; interrupted ones resume from their
last checkpoint.
"""

from __future__ import annotations

from dntsync.config import Config, to_plain
from dntsync.stages.runs import run_jobs
from dntsync.tracking import prepare_store


def run(cfg: Config, args) -> int:
    from dntsync.marl.training import write_summary

    prepare_store(cfg)
    keys = [(a, s) for a in cfg.sweeps.fig3_algos for s in cfg.marl.seeds]
    reports = run_jobs([("marl", to_plain(cfg), a, s) for a, s in keys], cfg.sweeps.workers,
                       "learners", cluster=cfg.sweeps.cluster)
    for algo in cfg.sweeps.fig3_algos:
        summary = write_summary(cfg, algo, [r for (a, _), r in zip(keys, reports) if a == algo])
        print(f"{algo}: eval team reward {summary['eval_team_reward']:.3f} "
              f"(std over seeds {summary['eval_team_reward_std_over_seeds']:.3f}); wrote "
              f"{cfg.marl.outputs.metrics_dir}/marl_{algo}.json")
    return 0
