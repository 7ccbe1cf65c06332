"""Speed of the VDN / IQL learners: updates per second, one full default run, the Q heads.

Setting: docs/model.md's default scenario (U = 12, M = 3, N = 12, T = 30), `conf/params.yaml`'s
`marl` section, the hold-last twin (no GRU checkpoint needed), torch on `--threads` threads
(default 1; the machine has 2 cores, shared).

1. **updates**: training updates per second (one update = unroll online and target nets
   over a minibatch of `batch_size` episodes, TD loss, backward, gradient clipping, Adam),
   with the forward / backward / optimiser split, for the flat and the factorised head.
2. **full run**: the wall time of one whole default VDN run (`fit_marl`, G = 75 epochs,
   outputs and MLflow off, baselines evaluated at the end as the stage does), split into
   collection, forward, backward, optimiser, evaluation (greedy evaluation during training
   plus the final one and the baselines) and the rest (Lightning, logging). Target: <= 5 min.
3. **heads**: one training update and its peak memory at U = 12 and U = 16 (2^13 and 2^17
   actions) for the flat head with gathered valid actions and row-sparse updates (ours,
   `marl.network.sparse_head`), the same with dense updates of all 2^(U+1) rows by Adam
   (`gathered-dense`), the flat head computed naively (full 2^(U+1) matmul, then masked,
   dense updates), and the factorised head. Each
   variant runs in a fresh subprocess; peak memory is the process's peak RSS minus its RSS
   just before the first update (so it counts activations, gradients and optimiser state
   created by training, not the imports).
4. **masked max**: the flat head's double-Q argmax over the next slot's valid actions of
   all BSs: the rows of all BSs in one grouping (`flat_masked_max`, what `td_loss` runs) vs
   once per BS.

Each timing is the median of several repeats (the machine may be shared). Writes
`benchmarks/results/marl.json`.

Usage: `.venv/bin/python benchmarks/bench_marl.py [--threads 1] [--skip-full-run | --full-run-epochs G]
[--repeats 5]`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from dntsync.files import write_json

RESULTS = Path(__file__).parent / "results" / "marl.json"
TARGET_FULL_RUN_S = 300.0


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------- building blocks
# The flat head (the paper profile's), which the masked max section times.
FLAT = ["marl.network.head=flat", "marl.network.association=false", "marl.algorithm.error_gamma=0",
        "marl.upload_offsets.phases=0", "marl.network.serve_covered_fit=false"]


def _setup(overrides: list[str], algo: str = "vdn"):
    from dntsync.config import load_config
    from dntsync.env.predictors import HoldLast
    from dntsync.marl.training import build_data, build_learner

    cfg = load_config("conf/params.yaml", ["env.predictor=hold-last", *overrides])
    data = build_data(cfg, HoldLast(cfg.twin.window), seed=0)
    learner = build_learner(cfg, algo, data.env)

    class _Trainer:  # what the DataModule reads from Lightning's trainer
        lightning_module = learner

    data.trainer = _Trainer()
    return cfg, data, learner


class NaiveFlatHead(torch.nn.Module):
    """The flat head computed the obvious way: all 2^(U+1) outputs, then masked."""

    def __init__(self, head) -> None:
        super().__init__()
        self.inner = head
        self.sparse_grad = False  # all 2^(U+1) outputs: a dense gradient, plain Adam

    def outputs(self, x, users=None):
        return x

    def q(self, x, actions):
        return self.inner.all_q(x).gather(1, actions[:, None]).squeeze(1)

    def masked_max(self, x, covered):
        from dntsync.marl.networks import valid_mask

        q = self.inner.all_q(x).masked_fill(~valid_mask(covered), -torch.inf)
        values, best = q.max(-1)
        return values, best

    def all_q(self, x):
        return self.inner.all_q(x)


def _update_times(learner, data, batch_size: int, repeats: int, grad_clip: float) -> dict:
    """Median forward / backward / optimiser times of one training update (as
    `QLearner.training_step`: Adam, plus SparseAdam on the flat heads with `sparse_head`)."""
    from dntsync.marl.learners import clip_grad_norm

    optimizers = learner.configure_optimizers()
    rng = np.random.default_rng(0)
    parts = {"forward": [], "backward": [], "optimizer": [], "update": []}
    for i in range(repeats + 1):
        batch = data.replay.sample(batch_size, rng)
        t0 = time.perf_counter()
        loss = learner.td_loss(batch)
        t1 = time.perf_counter()
        for opt in optimizers:
            opt.zero_grad()
        loss.backward()
        t2 = time.perf_counter()
        clip_grad_norm(list(learner.online.parameters()), grad_clip)
        for opt in optimizers:
            opt.step()
        t3 = time.perf_counter()
        if i > 0:  # the first one warms up allocators and caches
            for k, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
                parts[k].append(v)
    med = {f"{k}_s": float(np.median(v)) for k, v in parts.items()}
    med["updates_per_s"] = 1.0 / med["update_s"]
    return med


# ---------------------------------------------------------------------- 1. updates
def bench_updates(repeats: int) -> dict:
    out = {}
    for head in ("flat", "factorised", "branching"):
        cfg, data, learner = _setup([f"marl.network.head={head}", "marl.network.association=false",
                                     "marl.algorithm.error_gamma=0", "marl.upload_offsets.phases=0",
                                     "marl.network.serve_covered_fit=false"])
        for epoch in range(2):
            data.collect(epoch)
        algorithm = cfg.marl.algorithm
        out[head] = _update_times(learner, data, algorithm.batch_size, repeats, algorithm.grad_clip)
        out[head]["batch_size_episodes"] = cfg.marl.algorithm.batch_size
    return out


# ---------------------------------------------------------------------- 2. full run
class _Clock:
    def __init__(self) -> None:
        self.total: dict[str, float] = {}

    @contextmanager
    def time(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.total[name] = self.total.get(name, 0.0) + time.perf_counter() - t

    def wrap(self, owner, attr: str, name: str) -> None:
        original = getattr(owner, attr)
        clock = self

        def timed(*args, **kwargs):
            with clock.time(name):
                return original(*args, **kwargs)

        setattr(owner, attr, timed)


def bench_full_run(algo: str = "vdn", epochs: int | None = None) -> dict:
    """One whole default run (`epochs`: G of the config unless given; tests shorten it)."""
    import lightning.pytorch as pl

    from dntsync.config import load_config
    from dntsync.env.evaluate import Evaluation
    from dntsync.marl.learners import QLearner
    from dntsync.marl.replay import EpisodeDataModule
    from dntsync.marl.training import fit_marl

    clock = _Clock()
    clock.wrap(EpisodeDataModule, "collect", "collection")
    clock.wrap(QLearner, "td_loss", "forward")
    clock.wrap(Evaluation, "run", "evaluation")

    class Phases(pl.Callback):  # backward and optimiser step, from Lightning's hooks
        def on_before_backward(self, trainer, pl_module, loss):
            self.t = time.perf_counter()

        def on_after_backward(self, trainer, pl_module):
            clock.total["backward"] = clock.total.get("backward", 0.0) + time.perf_counter() - self.t
            self.t = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            clock.total["optimizer"] = clock.total.get("optimizer", 0.0) + time.perf_counter() - self.t

    # outputs on (the stage's path: baselines at the end, resumable checkpoints) but in a
    # scratch folder; MLflow off
    scratch = Path("benchmarks/results/_scratch_marl")
    shutil.rmtree(scratch, ignore_errors=True)
    overrides = ["env.predictor=hold-last", f"marl.outputs.model_dir={scratch / 'models'}",
                 f"marl.outputs.metrics_dir={scratch / 'metrics'}",
                 f"marl.outputs.checkpoint_dir={scratch / 'checkpoints'}"]
    if epochs is not None:
        overrides.append(f"marl.algorithm.epochs={epochs}")
    cfg = load_config("conf/params.yaml", overrides)
    started = time.perf_counter()
    report = fit_marl(cfg, algo=algo, seed=0, callbacks=[Phases()], enable_progress_bar=False,
                      log_mlflow=False, write_outputs=True)
    wall = time.perf_counter() - started
    shutil.rmtree(scratch, ignore_errors=True)
    parts = {k: round(v, 2) for k, v in clock.total.items()}
    parts["other (lightning, logging, checkpoints)"] = round(wall - sum(clock.total.values()), 2)
    updates = cfg.marl.algorithm.epochs * cfg.marl.algorithm.batches_per_epoch
    return {
        "algo": algo, "epochs": cfg.marl.algorithm.epochs, "updates": updates,
        "episodes_per_epoch": cfg.marl.collection.episodes_per_epoch,
        "batches_per_epoch": cfg.marl.algorithm.batches_per_epoch,
        "batch_size": cfg.marl.algorithm.batch_size,
        "head": cfg.marl.network.head, "wall_s": round(wall, 1), "target_s": TARGET_FULL_RUN_S,
        "meets_target": wall <= TARGET_FULL_RUN_S, "breakdown_s": parts,
        "updates_per_s_overall": round(updates / wall, 2),
        "eval_team_reward": report["eval_team_reward"],
    }


# ---------------------------------------------------------------------- 3. heads
def head_variant(n_users: int, variant: str, repeats: int) -> dict:
    """One variant in this process (called in a subprocess by `bench_heads`)."""
    head = "factorised" if variant == "factorised" else "flat"
    sparse = "true" if variant == "gathered" else "false"  # gathered-dense: all rows, Adam
    cfg, data, learner = _setup([f"scenario.n_users={n_users}", f"marl.network.head={head}",
                                 "marl.network.association=false", "marl.algorithm.error_gamma=0",
                                 "marl.upload_offsets.phases=0", "marl.network.serve_covered_fit=false",
                                 "marl.collection.episodes_per_epoch=32",
                                 f"marl.network.sparse_head={sparse}"])
    data.collect(0)
    if variant == "naive":
        for nets in (learner.online, learner.target):
            for agent in nets.agents:
                agent.head = NaiveFlatHead(agent.head)
    covered = data.replay.arrays["covered"][:len(data.replay)]
    rss_before = _rss_mb()
    times = _update_times(learner, data, cfg.marl.algorithm.batch_size, repeats, cfg.marl.algorithm.grad_clip)
    return {**times, "peak_extra_mb": round(_peak_rss_mb() - rss_before, 1),
            "params_per_agent": sum(p.numel() for p in learner.online.agents[0].parameters()),
            "n_actions": 2 ** (n_users + 1), "mean_valid_actions": float(
                (2.0 ** (1 + covered.sum(-1))).mean()), "batch_size_episodes": cfg.marl.algorithm.batch_size}


def bench_heads(repeats: int, threads: int) -> dict:
    out: dict = {}
    for n_users in (12, 16):
        for variant in ("gathered", "gathered-dense", "naive", "factorised"):
            cmd = [sys.executable, __file__, "--head-variant", f"{n_users}:{variant}",
                   "--repeats", str(repeats), "--threads", str(threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
            key = f"U{n_users}"
            if proc.returncode != 0:
                out.setdefault(key, {})[variant] = {"error": proc.stderr.strip().splitlines()[-1:]}
            else:
                out.setdefault(key, {})[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(key, variant, out[key][variant], flush=True)
    return out


# ---------------------------------------------------------------------- 4. masked max
def bench_masked_max(repeats: int) -> dict:
    """The double-Q argmax over the next slot's valid actions of all three BSs, on a real
    replay minibatch of the default scenario (B = 16 episodes, T - 1 = 29 slots):
    `flat_masked_max` (the rows of all agents in one grouping, what `td_loss` runs) against
    one `FlatHead.masked_max` per BS. Median milliseconds of `repeats` calls."""
    from dntsync.marl.networks import flat_masked_max

    _, data, learner = _setup(FLAT)
    for epoch in range(2):
        data.collect(epoch)
    batch = data.replay.sample(16, np.random.default_rng(0))
    heads = [a.head for a in learner.online.agents]

    def median_ms(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return 1e3 * float(np.median(times))

    with torch.no_grad():
        hidden = learner.online.unroll(batch.obs)[:, 1:]
        x = hidden.reshape(-1, 3, hidden.shape[-1]).transpose(0, 1)  # [M, R, h]
        cov = batch.covered[:, 1:].reshape(-1, 3, batch.covered.shape[-1]).transpose(0, 1)
        grouped = median_ms(lambda: flat_masked_max(heads, x, cov))
        per_head = median_ms(lambda: [h.masked_max(x[m], cov[m]) for m, h in enumerate(heads)])
    return {"all_agents_grouped_ms": grouped, "per_head_ms": per_head, "speed_up": per_head / grouped}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-full-run", action="store_true")
    parser.add_argument("--full-run-epochs", type=int, default=None,
                        help="epochs of the full run (default: marl.algorithm.epochs)")
    parser.add_argument("--head-variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.head_variant:
        n_users, variant = args.head_variant.split(":")
        print(json.dumps(head_variant(int(n_users), variant, args.repeats)))
        return
    results = {
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "cpus": os.cpu_count(), "torch_threads": args.threads,
                    "load_avg_at_start": os.getloadavg()},
        "updates": bench_updates(args.repeats),
    }
    print("updates", json.dumps(results["updates"], indent=1), flush=True)
    results["masked_max"] = bench_masked_max(max(args.repeats, 20))
    print("masked max", json.dumps(results["masked_max"], indent=1), flush=True)
    results["heads"] = bench_heads(args.repeats, args.threads)
    if not args.skip_full_run:
        results["full_run"] = bench_full_run("vdn", args.full_run_epochs)
        print("full run", json.dumps(results["full_run"], indent=1), flush=True)
    results["machine"]["load_avg_at_end"] = os.getloadavg()
    write_json(RESULTS, results)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
