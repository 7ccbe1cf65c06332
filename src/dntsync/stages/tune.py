"""Tune hyper-parameters with Optuna: `dntsync tune --objective marl|twin` (docs/tuning.md).

Samples the objective's knobs from `conf/search_space.yaml` with a seeded TPE sampler,
prunes unpromising trials with a median pruner, and records every trial in the study's
storage (default sqlite:///optuna/studies.db; `--storage postgresql://...` for workers on
many machines) and as an MLflow run nested under the study's. Calling it again resumes the
study: `--n-trials` is the total of finished trials wanted, so only the missing ones run.
Writes the best parameters to `conf/tuned/<study>.yaml` (a `--config` overlay) and the
optimisation history and parameter importances to `figures/tune/`.
"""

from __future__ import annotations

import argparse
import sys

from dntsync.config import Config, ConfigError

# command-line option -> config key (each is also settable as --set tune.<key>=...)
OPTIONS = {
    "objective": "tune.objective",
    "n_trials": "tune.n_trials",
    "timeout": "tune.timeout",
    "study_name": "tune.study_name",
    "storage": "tune.storage",
    "search_space": "tune.search_space",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--objective", choices=["marl", "twin"],
                        help="marl: maximise the evaluation team reward; twin: minimise the "
                             "twin's validation loss (tune.objective)")
    parser.add_argument("--n-trials", type=int,
                        help="finished trials the study should hold in total (tune.n_trials)")
    parser.add_argument("--timeout", type=float,
                        help="stop starting trials after this many seconds (tune.timeout)")
    parser.add_argument("--study-name", help="default: twin or marl-<algo> (tune.study_name)")
    parser.add_argument("--storage", help="database URL, e.g. postgresql://user:pw@host/db "
                                          "(tune.storage)")
    parser.add_argument("--search-space", help="knobs file (tune.search_space)")
    parser.add_argument("--worker", type=int, default=0,
                        help="this worker's index; give each worker of a study its own")


def run(cfg: Config, args) -> int:
    from dntsync.tuning import apply_values, run_study

    chosen = {key: getattr(args, option) for option, key in OPTIONS.items()
              if getattr(args, option, None) is not None}
    try:
        cfg = apply_values(cfg, chosen)
        summary = run_study(cfg, worker=args.worker)
    except ConfigError as err:
        print(f"dntsync tune: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dntsync tune: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    counts = summary.counts
    print(f"study {summary.study_name!r} at {summary.storage}: ran trials {summary.new_trials} "
          f"in {summary.wall_s:.1f} s; now {counts['complete']} complete, {counts['pruned']} "
          f"pruned, {counts['fail']} failed, {counts['running']} running, "
          f"{counts['waiting']} waiting")
    if summary.best_value is not None:
        print(f"best {cfg.tune.objective} objective {summary.best_value:.6g} with "
              f"{summary.best_params} -> {summary.best_params_path}")
    for path in summary.figures:
        print(f"figure: {path}")
    return 130 if summary.interrupted else 0
