"""The upload offsets' fit with its starts played together (`play_each`) or one at a time.

After `make run`, in its folder:

    .venv/bin/python scripts/fit_timing.py                               # Fig. 3, VDN seed 0
    .venv/bin/python scripts/fit_timing.py --settings fig3 'fig4 eps=0.8' --repeats 2

For each setting (labels as `scripts/offsets_search.py`'s) loads the run's VDN model of
`--seed`, zeroes its slot and retry offsets (as they are after training) and fits them as
`train-marl` does (`fit_upload_offsets` with the config's search and retry rules, on the
config's validation episodes), alternately with `PLAYED_TOGETHER` = 1 (every start played
alone, the code before 44516cb) and the code's value, `--repeats` times each, on one torch
thread. Fails unless every fit gives the same record; writes the times to `--out`
(default `benchmarks/results/fits.json`).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from dntsync.config import load_config
from dntsync.env.evaluate import Evaluation
from dntsync.files import write_json
from dntsync.marl import offsets
from dntsync.marl.training import RunPaths, load_q_networks
from dntsync.twin.predictor import build_predictor
from offsets_search import settings  # scripts/: the Fig. 3 setting and every sweep point

torch.set_num_threads(1)


def fit(cfg, model: Path, validation: Evaluation, together: int) -> tuple[dict, float]:
    """The fit's record and its wall time with `together` starts per play."""
    learner, _ = load_q_networks(model, cfg)
    learner.upload_offsets.zero_()
    if learner.retry is not None:
        learner.retry_offsets.zero_()
        learner.retry_head_start.zero_()
    uo = cfg.marl.upload_offsets
    offsets.PLAYED_TOGETHER = together
    started = time.perf_counter()
    record = offsets.fit_upload_offsets(learner, validation, uo.grid, uo.passes, uo.phases, uo.periods,
                                        uo.force, uo.retry_periods, uo.retry_tuned_max)
    return record, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="*", default=["fig3"], help="labels, e.g. fig3 'fig4 eps=0.8'")
    parser.add_argument("--seed", type=int, default=0, help="the training seed whose model is refitted")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/fits.json")
    args = parser.parse_args()
    default = offsets.PLAYED_TOGETHER
    known = settings(load_config())
    unknown = [s for s in args.settings if s not in known]
    if unknown:
        raise SystemExit(f"--settings {unknown}: unknown; choose from {list(known)}")
    rows = []
    for label in args.settings:
        cfg = known[label]
        model = RunPaths.of(cfg, "vdn", args.seed).model
        if not model.is_file():
            raise SystemExit(f"{model} does not exist: run `make run` here first")
        uo = cfg.marl.upload_offsets
        validation = Evaluation(cfg.scenario, build_predictor(cfg)[0], uo.episodes, uo.seed,
                                **cfg.env.observation_options())
        times: dict[int, list[float]] = {1: [], default: []}
        records = []
        for _ in range(args.repeats):
            for together in times:
                record, seconds = fit(cfg, model, validation, together)
                times[together].append(seconds)
                records.append(record)
        if any(r != records[0] for r in records):
            raise SystemExit(f"{label}: the fits' records differ with the starts played together")
        row = {"setting": label, "seed": args.seed, "validation_plays": records[0]["validation_plays"],
               "alone_s": times[1], "together_s": times[default], "played_together": default,
               "ratio": statistics.median(times[default]) / statistics.median(times[1])}
        rows.append(row)
        print(json.dumps(row), flush=True)
    write_json(args.out, {"command": shlex.join(sys.argv), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
