"""Where one learner run's time goes, as a sweep's Dask worker runs it (benchmarks/README.md,
"Where a learner run's time goes").

After `make run`, in its folder (the settings' twins are the run's):

    .venv/bin/python scripts/profile_run.py                               # Fig. 3, VDN seed 0
    .venv/bin/python scripts/profile_run.py --setting 'fig5 n_users=14' --out /tmp/profile.json

In one process on one torch thread: first a 1-epoch run of the setting (seed 7), which pays
what a worker pays once (the imports' lazy parts, MLflow's store, the setting's heuristics,
read back from then on), then the run of `--algo` and `--seed` under cProfile, as
`train-marl` would train it (the sweeps' evaluation: at the end only), with every output
under `--scratch` (the run's own files are not touched). Prints the parts' seconds and
shares and writes them to `--out` (JSON), with the run's team reward.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

import torch

from dntsync.config import apply_overrides, load_config
from dntsync.console import quiet_libraries
from dntsync.files import write_json
from dntsync.marl.training import fit_marl
from offsets_search import settings  # scripts/: the Fig. 3 setting and every sweep point

torch.set_num_threads(1)

# (part, file suffix, function) whose cumulative time is the part's; the rest is the run's
# total less these
PARTS = [
    ("TD updates", "dntsync/marl/learners.py", "training_step"),
    ("collecting episodes", "dntsync/marl/replay.py", "collect"),
    ("fit: upload offsets", "dntsync/marl/offsets.py", "fit_upload_offsets"),
    ("fit: association slope", "dntsync/marl/offsets.py", "fit_association_slope"),
    ("fit: serve covered", "dntsync/marl/offsets.py", "fit_serve_covered"),
]
# within the TD updates and the collection (not added to the total again)
DETAILS = [
    ("TD loss (forward)", "dntsync/marl/learners.py", "td_loss"),
    ("backward", "torch/_tensor.py", "backward"),
    ("acting (Q networks)", "dntsync/marl/learners.py", "act"),
    ("environment steps", "dntsync/env/core.py", "step"),
    ("RB allocation", "dntsync/network/allocation.py", "allocate"),
]


def cumulative(stats: pstats.Stats, suffix: str, function: str) -> float:
    """The cumulative seconds of the function `function` defined in a file ending in `suffix`."""
    return sum(row[3] for (file, _, name), row in stats.stats.items()
               if name == function and file.replace("\\", "/").endswith(suffix))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", default="fig3", help="a label, e.g. fig3 or 'fig5 n_users=14'")
    parser.add_argument("--algo", default="vdn", choices=["vdn", "iql", "qmix"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scratch", default=None, help="folder for the runs' outputs (default: a temporary one)")
    parser.add_argument("--out", default=None, help="JSON file for the parts (default: none)")
    args = parser.parse_args()
    known = settings(load_config())
    if args.setting not in known:
        raise SystemExit(f"--setting {args.setting!r}: unknown; choose from {list(known)}")
    quiet_libraries()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(args.scratch or tmp)
        cfg = known[args.setting]
        outputs = [f"marl.outputs.model_dir={scratch}/models", f"marl.outputs.metrics_dir={scratch}/metrics",
                   f"marl.outputs.checkpoint_dir={scratch}/checkpoints",
                   f"tracking.mlflow_uri=sqlite:///{scratch}/mlflow.db",
                   f"marl.evaluation.every={cfg.marl.algorithm.epochs}"]
        where = {"sweep": "profile", "point": args.setting}
        fit_marl(apply_overrides(cfg, [*outputs, "marl.algorithm.epochs=1"]),  # the same evaluation section: its heuristics are read back
                 algo=args.algo, seed=7, enable_progress_bar=False, where=where)
        profiler = cProfile.Profile()
        started = time.perf_counter()
        profiler.enable()
        report = fit_marl(apply_overrides(cfg, outputs), algo=args.algo, seed=args.seed,
                          enable_progress_bar=False, where=where)
        profiler.disable()
        total = time.perf_counter() - started
    stats = pstats.Stats(profiler)
    parts = {name: cumulative(stats, suffix, fn) for name, suffix, fn in PARTS}
    parts["the rest"] = total - sum(parts.values())
    details = {name: cumulative(stats, suffix, fn) for name, suffix, fn in DETAILS}
    for name, seconds in parts.items():
        print(f"{name:24s} {seconds:7.1f} s  {seconds / total:5.1%}")
    print("  of which: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in details.items()))
    print(f"{'total (profiled)':24s} {total:7.1f} s   team reward {report['eval']['team_reward']['mean']:.3f}")
    if args.out:
        write_json(args.out, {"setting": args.setting, "algo": args.algo, "seed": args.seed, "total_s": total,
                              "parts_s": parts, "details_s": details,
                              "team_reward": report["eval"]["team_reward"]["mean"]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
