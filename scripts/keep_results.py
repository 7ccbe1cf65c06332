"""Keep a pipeline run's results in git: its report, figures and headline metrics.

    .venv/bin/python scripts/keep_results.py . docs/results                 # after make run
    .venv/bin/python scripts/keep_results.py .profiles/paper docs/results/paper  # make paper does it

Copies `<run>/reports/RESULTS.md`, `<run>/figures/*.png` and the metrics the report's
claims are computed from (`metrics/twin.json`, `metrics/marl/marl_<algo>_seed<S>.json`,
`metrics/sweep_fig4.json`, `metrics/sweep_fig5.json`, `metrics/fig6_episode.json`) into
`<dest>`: what `docs/results/` (the default learner) and `docs/results/paper/` (the
paper-literal learner) hold.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dntsync.files import copy_file

METRICS = ("twin.json", "sweep_fig4.json", "sweep_fig5.json", "fig6_episode.json")


def keep(run: Path, dest: Path) -> list[Path]:
    report = run / "reports" / "RESULTS.md"
    if not report.exists():
        raise SystemExit(f"{report} does not exist: run the pipeline there first")
    wanted = [(report, dest / "RESULTS.md")]
    wanted += [(p, dest / p.name) for p in sorted((run / "figures").glob("fig*.png"))]
    wanted += [(run / "metrics" / n, dest / "metrics" / n) for n in METRICS
               if (run / "metrics" / n).exists()]
    wanted += [(p, dest / "metrics" / "marl" / p.name)
               for p in sorted((run / "metrics" / "marl").glob("marl_*_seed*.json"))]
    return [copy_file(src, target) for src, target in wanted]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="the folder the pipeline ran in")
    parser.add_argument("dest", type=Path, help="where to keep the results")
    args = parser.parse_args(argv)
    written = keep(args.run, args.dest)
    print(f"kept {len(written)} files in {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
