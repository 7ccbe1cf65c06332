"""Train the GRU twin (eqs. 9-14) on data/trajectories.npz; write checkpoint, metrics, Fig. 2.

Early stopping on the validation loss, tracked in MLflow (experiment `<prefix>-twin`).
Outputs: `twin.checkpoint` (models/twin.ckpt), `twin.metrics` (metrics/twin.json: one- and
multi-step test errors beside the Bayes floor, targets met or not) and `twin.figure`
(figures/fig2_twin_trajectories.png and .csv).
"""

from __future__ import annotations

import sys

from dntsync.config import Config, ConfigError
from dntsync.stages.common import write_twin


def add_arguments(parser) -> None:
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(cfg: Config, args) -> int:
    from dntsync.twin.training import fit_twin  # Lightning: imported only when used

    try:
        result = fit_twin(cfg, enable_progress_bar=not args.no_progress)
    except ConfigError as err:  # data file missing or made for another config: nothing done
        print(f"dntsync train-twin: {err}", file=sys.stderr)
        return 2
    report = result["metrics"]
    write_twin(report, cfg.twin.metrics)
    one, multi = report["one_step"]["overall"], report["multi_step"]
    print(f"twin: best val loss {result['val_loss']:.4f} at epoch {result['best_epoch']} "
          f"({result['epochs']} epochs, {result['wall_s']:.0f} s)")
    print(f"one-step test MSE {one['twin_mse']:.4f} vs floor {one['floor']:.4f} "
          f"(ratio {one['twin_ratio']:.3f}; hold-last {one['hold_last_ratio']:.3f})")
    print("multi-step ratio to h x floor: "
          + ", ".join(f"h={h}: {r:.3f}" for h, r in zip(multi["h"], multi["twin_ratio"])))
    for what, ok in report["targets_met"].items():
        print(f"target {what}: {'met' if ok else 'NOT met'}")
    print("wrote " + ", ".join(str(p) for p in result["outputs"]))
    return 0
