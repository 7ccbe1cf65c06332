"""Train the BSs' Q networks with VDN, IQL or QMIX (Sec. III-C/D, Alg. 2; eq. 37) and evaluate them.

`dntsync train-marl --algo vdn|iql|qmix [--seed S]`. Greedy evaluation on fixed evaluation
episodes (seeds `marl.evaluation.seed + i`) every `marl.evaluation.every` epochs and at the end, beside
every baseline (random, nearest-BS always / never / every k, the myopic oracle), tracked in
MLflow (experiment `<prefix>-marl`, one run per seed). The twin's predictor is the one of
`build_predictor` (GRU checkpoint, or the configured fallback); the run's params say which.

With `--seed S`: `<model_dir>/<algo>_seed<S>.ckpt`, `<metrics_dir>/marl_<algo>_seed<S>.json`
and the curve `<metrics_dir>/curves/marl_<algo>_seed<S>.csv`. Without: every seed of
`marl.seeds`, plus `<metrics_dir>/marl_<algo>.json` (mean and std over seeds) and
`<model_dir>/<algo>.ckpt` (the first seed's networks). An interrupted run resumes from
`<checkpoint_dir>/<algo>_seed<S>/last.ckpt` when the same command is run again; a finished
run's resumable state is deleted.
"""

from __future__ import annotations

from dntsync.config import ALGOS, Config
from dntsync.stages.common import write_learner


def add_arguments(parser) -> None:
    parser.add_argument("--algo", choices=ALGOS, help="default: marl.algorithm.name")
    parser.add_argument("--seed", type=int, help="one training seed (default: every marl.seeds)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _line(report: dict) -> str:
    text = (f"{report['algo']}: eval team reward {report['eval_team_reward']:.3f} per step "
            f"(predictor {report['predictor']})")
    if "best_heuristic" in report:
        text += (f"; best heuristic {report['best_heuristic']} "
                 f"{report['best_heuristic_team_reward']:.3f}")
    if "ratio_to_oracle" in report:
        text += f"; oracle {report['oracle_team_reward']:.3f} (ratio {report['ratio_to_oracle']:.3f})"
    return text


def run(cfg: Config, args) -> int:
    import torch

    # Lightning: only when used
    from dntsync.marl.training import drop_resumable_state, fit_marl, fit_marl_seeds

    torch.set_num_threads(1)  # small networks: more threads only contend (sweeps.workers runs at once)
    algo = args.algo or cfg.marl.algorithm.name
    progress = not args.no_progress
    if args.seed is not None:
        report = fit_marl(cfg, algo=algo, seed=args.seed, enable_progress_bar=progress)
        drop_resumable_state(cfg, algo, args.seed)
        write_learner(report, cfg.marl.outputs.metrics_dir)
        print(f"seed {args.seed}: " + _line(report) + f" [{report['wall_time_s']:.0f} s]")
        return 0
    summary = fit_marl_seeds(cfg, algo=algo, enable_progress_bar=progress)
    for seed in cfg.marl.seeds:
        drop_resumable_state(cfg, algo, seed)
    print(f"seeds {summary['seeds']}: " + _line(summary)
          + f" (std over seeds {summary['eval_team_reward_std_over_seeds']:.3f})")
    return 0
