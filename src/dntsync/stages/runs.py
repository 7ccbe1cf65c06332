"""Training runs in parallel worker processes, shared by `train-marl --all` and `sweep`.

A job is ("twin", config) or ("marl", config, algo, seed); configs travel as plain dicts.
A finished learner run is found by its metrics file (same config) and not repeated; an
interrupted one resumes from its last checkpoint (`fit_marl`). Workers use one torch thread
each, so `workers` runs share the machine's cores without oversubscription.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing
import shutil
from pathlib import Path

from tqdm import tqdm

from dntsync.config import Config, to_plain


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)


def train_point_twin(cfg: Config) -> dict:
    """The point's data set and GRU twin (skipped when its checkpoint is already there)."""
    import numpy as np

    from dntsync.stages.generate import make_dataset
    from dntsync.twin.training import fit_twin

    if not (Path(cfg.twin.checkpoint).exists() and Path(cfg.twin.metrics).exists()):
        Path(cfg.data.path).parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(cfg.data.path, **make_dataset(cfg))
        fit_twin(cfg, enable_progress_bar=False)
    return json.loads(Path(cfg.twin.metrics).read_text())


def train_point_learner(cfg: Config, algo: str, seed: int) -> dict:
    """One learner at one point with one seed; a finished run's report is reused."""
    from dntsync.marl.training import RunPaths, fit_marl

    metrics = RunPaths.of(cfg, algo, seed).metrics
    if metrics.exists():
        report = json.loads(metrics.read_text())
        if report.get("config") == to_plain(cfg):
            return report
    report = fit_marl(cfg, algo=algo, seed=seed, enable_progress_bar=False)
    report["config"] = to_plain(cfg)
    metrics.write_text(json.dumps(report, indent=1))
    # finished (the metrics file says so): the resumable state is no longer needed, and at
    # large U it is hundreds of MB per run
    shutil.rmtree(RunPaths.of(cfg, algo, seed).checkpoints, ignore_errors=True)
    return report


def _job(kind: str, cfg_plain: dict, algo: str = "", seed: int = 0) -> dict:
    from dntsync.config import from_dict

    cfg = from_dict(cfg_plain)
    if kind == "twin":
        return train_point_twin(cfg)
    return train_point_learner(cfg, algo, seed)


def run_jobs(jobs: list[tuple], workers: int, desc: str) -> list[dict]:
    """Run `_job(*args)` for each job in worker processes, with a progress bar; in order."""
    if not jobs:
        return []
    if workers == 1:
        _worker_init()
        return [_job(*j) for j in tqdm(jobs, desc=desc)]
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init) as pool:
        futures = [pool.submit(_job, *j) for j in jobs]
        for _ in tqdm(cf.as_completed(futures), total=len(futures), desc=desc):
            pass
        return [f.result() for f in futures]
