"""What the executor of the batches of runs costs beyond its jobs (`dntsync.stages.runs`).

One batch of `--jobs` trivial command jobs (`python -c pass`) on `--workers` workers through
`run_jobs`, `--repeats` times: the local Dask cluster's start, the jobs' round trips, and
its shutdown. Writes `benchmarks/results/executor.json` (or `--out`).

Usage: `.venv/bin/python benchmarks/bench_executor.py [--repeats 3] [--workers 2] [--jobs 2]`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "executor.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    from dntsync.files import write_json
    from dntsync.stages.runs import run_jobs

    seconds = []
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [("command", f"job{i}", [sys.executable, "-c", "pass"], f"{tmp}/job{i}.log", tmp,
                 dict(os.environ)) for i in range(args.jobs)]
        for _ in range(args.repeats):
            start = time.perf_counter()
            run_jobs(jobs, args.workers, "executor")
            seconds.append(time.perf_counter() - start)
    result = {"engine": "dask LocalCluster", "workers": args.workers, "jobs": args.jobs,
              "batch_s": seconds, "load_average": os.getloadavg()}
    write_json(args.out, result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
