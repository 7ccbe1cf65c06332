"""Run a figure's sweep (Fig. 4: eps, Fig. 5: users): VDN and IQL at every point, every seed.

`dntsync sweep fig4|fig5` trains every (point, learner, seed) of `sweeps.<fig>` in parallel
worker processes (`sweeps.workers`, one torch thread each) and evaluates each learner, with
the heuristics and the oracle, on the same evaluation episodes. Each run writes under
`runs/<fig>/<key>=<value>/`; a finished run is found there and not repeated, an interrupted
one resumes from its last checkpoint. Where a point changes the users (Fig. 5), it gets its
own data set and GRU twin, and its learners start once that twin is trained (the workers
take the larger scenarios first; see `run_jobs`). The aggregate, mean and spread over seeds, goes to
`metrics/sweep_<fig>.json`.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from dntsync.config import Config, SweepConfig, to_plain
from dntsync.files import write_json
from dntsync.marl.training import over_seeds
from dntsync.stages.common import SUMMARY, Point, needs_own_twin, point_config, sweep_points, write_sweep
from dntsync.stages.runs import run_jobs
from dntsync.tracking import prepare_store

SWEEPS = ("fig4", "fig5")


def add_arguments(parser) -> None:
    parser.add_argument("sweep", choices=SWEEPS, help="which figure's sweep to run")


# ---------------------------------------------------------------------- aggregation
def aggregate_sweep(cfg: Config, sweep: str, points: list[Point], results: dict) -> dict:
    spec: SweepConfig = getattr(cfg.sweeps, sweep)
    rows = []
    for p in points:
        algos = {a: over_seeds(results[(p.value, a)]) for a in cfg.sweeps.algos}
        first = results[(p.value, cfg.sweeps.algos[0])][0]
        rows.append({"value": p.value, "label": p.label, "overrides": list(p.overrides),
                     "predictor": first["predictor"], "algos": algos,
                     "baselines": first.get("baselines", {})})
    return {"sweep": sweep, "key": spec.key, "values": list(spec.values),
            "fixed": list(spec.fixed), "seeds": list(cfg.marl.seeds),
            "algos": list(cfg.sweeps.algos), "epochs": cfg.marl.algorithm.epochs, "points": rows}


def run(cfg: Config, args) -> int:
    started = time.perf_counter()
    sweep = args.sweep
    points = sweep_points(cfg, sweep)
    configs = {p.value: point_config(cfg, p) for p in points}
    prepare_store(cfg)
    # one pool for the points' twins and all learners: a point's learners start as soon as
    # its twin is there (learners of points on the base twin at once), the larger
    # scenarios first (a run's cost grows with the users each BS covers)
    twins = {v: i for i, v in enumerate(v for v, c in configs.items() if needs_own_twin(cfg, c))}
    keys = [(p.value, a, s) for p in points for a in cfg.sweeps.algos for s in cfg.marl.seeds]
    labels = {p.value: {"sweep": sweep, "point": p.label} for p in points}
    jobs = [("twin", to_plain(configs[v]), labels[v]) for v in twins]
    jobs += [("marl", to_plain(configs[v]), a, s, labels[v]) for v, a, s in keys]
    needs = [[] for _ in twins] + [[twins[v]] if v in twins else [] for v, _, _ in keys]
    cost = [float("inf")] * len(twins) + [float(configs[v].scenario.n_users) for v, _, _ in keys]
    reports = run_jobs(jobs, cfg.sweeps.workers, f"{sweep}: twins and learners", needs=needs,
                       cost=cost, cluster=cfg.sweeps.cluster)[len(twins):]
    results: dict = {}
    for (v, a, _), rep in zip(keys, reports):
        results.setdefault((v, a), []).append(rep)
    summary = aggregate_sweep(cfg, sweep, points, results)
    summary["wall_time_s"] = time.perf_counter() - started
    out = Path("metrics") / f"sweep_{sweep}.json"
    write_json(out, summary)
    shutil.rmtree(SUMMARY / sweep, ignore_errors=True)  # a point no longer in the grid goes
    write_sweep(summary)
    print(f"wrote {out} ({len(keys)} learner runs, {summary['wall_time_s']:.0f} s)")
    return 0
