"""The one executor of the stages' batches of runs, on Dask distributed: the Fig. 3 learner
stages of the pipeline, the sweeps' twins and learners, `train-learners` (a helper of the
stages, as `dntsync.stages.common`; not a stage).

Why Dask: a pure-Python install of a few MB (`distributed`, `dask` and small dependencies;
Ray's wheel alone is 60+ MB and starts a daemon set of its own), a local cluster that starts
in about a second, and a scheduler that notices a lost worker (its heartbeat and its
connection) and reschedules the lost worker's tasks elsewhere, which is the fault handling
the runs need: a rerun resumes from the run's last checkpoint (`fit_marl`).

By default (`sweeps.cluster: null`) each batch starts a `LocalCluster` of `sweeps.workers`
worker processes with one thread each (the runs are single-threaded torch), so `make run`
needs no set-up; `sweeps.cluster: tcp://host:8786` sends the same jobs to a running
scheduler (`dask scheduler`, `dask worker tcp://host:8786 --nthreads 1 --no-nanny` on any
machine that shares the project directory; docs/pipeline.md "Scale-out details").

A job is ("twin", config, where), ("marl", config, algo, seed, where) or ("command", name,
argv, log, cwd, env); configs travel as plain dicts and every path in them is relative to
the project directory, which each job enters first. A finished learner run is found by its
metrics file (same config) and not repeated; an interrupted one resumes from its last
checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from dntsync.config import Config, to_plain
from dntsync.files import save_npz, write_json

UNSET_MALLOC = "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_"


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


def _job(root: str, kind: str, *args) -> dict:
    """One job on a worker, in the project directory `root`."""
    if os.getcwd() != root:
        os.chdir(root)  # workers run one job at a time (one thread each)
    if kind == "command":
        return run_command(*args)
    _worker_init()
    from dntsync.config import from_dict

    cfg = from_dict(args[0])
    if kind == "twin":
        return train_point_twin(cfg, *args[1:])
    return train_point_learner(cfg, *args[1:])


def _after(_prerequisites: list, root: str, *job) -> dict:
    """`_job` once the futures passed as `_prerequisites` are done (Dask waits for them)."""
    return _job(root, *job)


@contextlib.contextmanager
def cluster_client(workers: int, address: str | None) -> Iterator:
    """A Dask client: of the scheduler at `address`, or of a local cluster of `workers`
    single-threaded worker processes, started for the batch and closed after it."""
    import dask
    from distributed import Client, LocalCluster

    if address:
        with Client(address, timeout="30s") as client:
            yield client
        return
    # Dask's nannies set MALLOC_TRIM_THRESHOLD_=65536 in their workers (and in this process);
    # a fixed threshold turns off glibc's adaptive one, and a learner run then takes 1.8x
    # as long (benchmarks/README.md, "The executor"): leave malloc as it is
    with dask.config.set({UNSET_MALLOC: None}), \
            LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                         dashboard_address=None, silence_logs=logging.CRITICAL,
                         memory_limit=0) as cluster, Client(cluster) as client:
        yield client


def run_jobs(jobs: list[tuple], workers: int, desc: str, *, needs: list[list[int]] | None = None,
             cost: list[float] | None = None, cluster: str | None = None) -> list[dict]:
    """Run each job on the Dask cluster (`cluster_client`), with progress (done / running /
    left, failures) on stderr; the results in the jobs' order.

    `needs[i]` lists the jobs that must finish before job i starts (a sweep point's
    learners wait for its twin, not for every twin); ready jobs start costliest first
    (`cost[i]`, an estimate of the run time: Dask's `priority`), so the longest runs do not
    start last. A job whose worker dies is rescheduled by Dask on another worker, where it
    resumes from its last checkpoint; a job that raises fails the batch after every other
    job has finished, so nothing finished is lost.
    """
    if not jobs:
        return []
    needs = needs or [[] for _ in jobs]
    cost = cost or [0.0] * len(jobs)
    order = _order(needs, desc)
    from distributed import as_completed
    from tqdm import tqdm

    root = str(Path.cwd().resolve())
    with cluster_client(workers, cluster) as client:
        futures: list = [None] * len(jobs)
        for i in order:
            priority = cost[i] if cost[i] != float("inf") else 1e12
            if needs[i]:
                futures[i] = client.submit(_after, [futures[j] for j in needs[i]], root, *jobs[i],
                                           priority=priority, pure=False)
            else:
                futures[i] = client.submit(_job, root, *jobs[i], priority=priority, pure=False)
        index = {f.key: i for i, f in enumerate(futures)}
        results: list = [None] * len(jobs)
        failures: list[tuple[int, BaseException]] = []
        with tqdm(total=len(jobs), desc=desc) as bar:
            for future in as_completed(futures):
                i = index[future.key]
                if future.status == "error":
                    failures.append((i, future.exception()))
                    bar.write(f"{desc}: job {i} ({' '.join(map(str, jobs[i][:1]))}) failed: "
                              f"{failures[-1][1]!r}", file=sys.stderr)
                else:
                    results[i] = future.result()
                bar.update()
                # a worker may hold more tasks than threads (Dask queues some on it)
                threads = client.nthreads()
                running = sum(min(len(keys), threads.get(w, 1))
                              for w, keys in client.processing().items())
                bar.set_postfix_str(f"running {running}, failed {len(failures)}")
    if failures:  # every other job has finished: raise the first failure's own error
        raise failures[0][1]
    return results


def _order(needs: list[list[int]], desc: str) -> list[int]:
    """The jobs in an order where each comes after its prerequisites; jobs that can never
    start (a prerequisite that does not exist or waits on them) are refused."""
    order: list[int] = []
    placed: set[int] = set()
    changed = True
    while changed:
        changed = False
        for i, deps in enumerate(needs):
            if i not in placed and all(j in placed for j in deps):
                order.append(i)
                placed.add(i)
                changed = True
    stuck = sorted(set(range(len(needs))) - placed)
    if stuck:
        raise ValueError(f"{desc}: jobs {stuck} wait for jobs that never run")
    return order
