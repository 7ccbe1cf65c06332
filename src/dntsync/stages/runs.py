"""The one process runner of the stages: jobs in parallel worker processes, for
`train-learners`, `sweep` and the pipeline's parallel DVC stages (a helper of the stages,
as `dntsync.stages.common`; not a stage).

A job is ("twin", config, where), ("marl", config, algo, seed, where) or ("command", name,
argv, log, cwd, env); configs travel as plain dicts. A finished learner run is found by
its metrics file (same config) and not repeated; an interrupted one resumes from its last
checkpoint (`fit_marl`). Workers use one torch thread each, so `workers` runs share the
machine's cores without oversubscription.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing
import subprocess
from pathlib import Path

from tqdm import tqdm

from dntsync.config import Config, to_plain
from dntsync.files import save_npz, write_json


def _worker_init() -> None:
    import torch

    from dntsync.console import quiet_libraries

    torch.set_num_threads(1)
    quiet_libraries()


def train_point_twin(cfg: Config, where: dict | None = None) -> dict:
    """The point's data set and GRU twin (skipped when its checkpoint is already there)."""

    from dntsync.network.dataset import make_dataset
    from dntsync.twin.training import fit_twin

    if not (Path(cfg.twin.checkpoint).exists() and Path(cfg.twin.metrics).exists()):
        save_npz(cfg.data.path, **make_dataset(cfg))
        fit_twin(cfg, enable_progress_bar=False,
                 name=" ".join([*(where or {}).values(), "twin"]))
    return json.loads(Path(cfg.twin.metrics).read_text())


def train_point_learner(cfg: Config, algo: str, seed: int, where: dict | None = None) -> dict:
    """One learner at one point with one seed; a finished run's report is reused. `where`
    names the sweep and point in MLflow (`dntsync.marl.training.run_label`)."""
    from dntsync.marl.training import RunPaths, drop_resumable_state, fit_marl

    metrics = RunPaths.of(cfg, algo, seed).metrics
    if metrics.exists():
        report = json.loads(metrics.read_text())
        if report.get("config") == to_plain(cfg):
            return report
    report = fit_marl(cfg, algo=algo, seed=seed, enable_progress_bar=False, where=where)
    report["config"] = to_plain(cfg)
    write_json(metrics, report)
    drop_resumable_state(cfg, algo, seed)  # finished: the metrics file says so
    return report


def run_command(name: str, argv: list[str], log: str, cwd: str, env: dict[str, str]) -> dict:
    """A command (a DVC stage's `dvc repro`) with its output to the file `log`; its exit code."""
    with open(log, "w") as out:
        code = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=env).returncode
    return {"name": name, "returncode": code, "log": log}


def _job(kind: str, *args) -> dict:
    if kind == "command":
        return run_command(*args)
    from dntsync.config import from_dict

    cfg = from_dict(args[0])
    if kind == "twin":
        return train_point_twin(cfg, *args[1:])
    return train_point_learner(cfg, *args[1:])


def _dispatch_order(pending: set[int], done: set[int], needs, cost) -> list[int]:
    """Jobs whose prerequisites are done, costliest first (ties: in the given order)."""
    ready = [i for i in pending if all(j in done for j in needs[i])]
    return sorted(ready, key=lambda i: (-cost[i], i))


def run_jobs(jobs: list[tuple], workers: int, desc: str, *, needs: list[list[int]] | None = None,
             cost: list[float] | None = None) -> list[dict]:
    """Run `_job(*args)` for each job in `workers` processes, with a progress bar; results in
    the jobs' order.

    `needs[i]` lists the jobs that must finish before job i starts (a sweep point's learners
    wait for its twin, not for every twin). Whenever a worker is free it takes the ready job
    with the highest `cost[i]` (an estimate of its run time), so the longest runs do not
    start last and leave the other workers idle at the end (longest-processing-time-first).
    """
    if not jobs:
        return []
    needs = needs or [[] for _ in jobs]
    cost = cost or [0.0] * len(jobs)
    pending, done, results = set(range(len(jobs))), set(), [None] * len(jobs)
    bar = tqdm(total=len(jobs), desc=desc)
    if workers == 1:
        _worker_init()
        while pending:
            ready = _dispatch_order(pending, done, needs, cost)
            if not ready:
                raise ValueError(f"{desc}: jobs {sorted(pending)} wait for jobs that never run")
            i = ready[0]
            pending.discard(i)
            results[i] = _job(*jobs[i])
            done.add(i)
            bar.update()
        bar.close()
        return results
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init) as pool:
        running: dict[cf.Future, int] = {}
        while pending or running:
            # only as many in flight as workers, so that each free worker picks then
            for i in _dispatch_order(pending, done, needs, cost)[:workers - len(running)]:
                pending.discard(i)
                running[pool.submit(_job, *jobs[i])] = i
            if not running:
                raise ValueError(f"{desc}: jobs {sorted(pending)} wait for jobs that never run")
            finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for future in finished:
                i = running.pop(future)
                results[i] = future.result()
                done.add(i)
                bar.update()
    bar.close()
    return results
