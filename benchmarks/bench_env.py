"""Environment throughput on one CPU core: the batched `DntEnv` against a plain per-env loop.

Setting: docs/model.md's default scenario (`Scenario()`: U = 12 users, M = 3 BSs, N = 12 RBs),
the hold-last twin (`HoldLast`), uniformly random valid actions (`random_valid`). Timed is
a whole rollout loop: draw the actions, step, and reset when the episode ends (every T = 30
slots), so a figure is what collecting experience actually costs.

- **batched**: one `DntEnv(n_envs=B)`; each `step` plays B environments with array ops.
- **plain loop**: B separate `DntEnv(n_envs=1)` objects stepped one after another in a
  Python loop, each drawing its own actions. It runs the very same physics functions
  (`resolve`, Algorithm 1, eqs. 2-7, 16, 37) with a batch of one, i.e. what a
  gymnasium-style `SyncVectorEnv` over single environments would do. The script checks
  that the physics agrees bit for bit between the two before timing.

Each figure is the best of several timed repeats (the machine may be shared; the best run
is the one least disturbed). Writes `benchmarks/results/env.json`. See benchmarks/README.md.

Usage: `.venv/bin/python benchmarks/bench_env.py [--seconds S] [--repeats R]`.
"""

from __future__ import annotations

import os

# One core: the thread pools read these when numpy is first imported, so set them first.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"
if hasattr(os, "sched_setaffinity"):
    # The lowest core this process may use (core 0 on an ordinary machine).
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

import argparse  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import scipy  # noqa: E402

from dntsync.env import DntEnv, HoldLast, random_valid, resolve  # noqa: E402
from dntsync.env.actions import decode  # noqa: E402
from dntsync.files import write_json  # noqa: E402
from dntsync.network import Scenario  # noqa: E402

BATCH_SIZES = (1, 256)
TARGET_STEPS_PER_S = 50_000  # batched, B = 256, one core
TARGET_RATIO = 10.0  # batched / plain loop at B = 256
RESULTS = Path(__file__).parent / "results" / "env.json"


class Batched:
    """B environments in one `DntEnv`."""

    def __init__(self, scenario: Scenario, n_envs: int, seed: int) -> None:
        self.n_envs = n_envs
        self.env = DntEnv(scenario, HoldLast(), n_envs=n_envs, seed=seed)
        self.rng = np.random.default_rng(seed)
        _, self.covered = self.env.reset()

    def step(self) -> None:
        res = self.env.step(random_valid(self.covered, self.rng))
        self.covered = self.env.reset()[1] if res.done else res.covered


class PlainLoop:
    """B single-environment `DntEnv`s stepped one by one in Python."""

    def __init__(self, scenario: Scenario, n_envs: int, seed: int) -> None:
        self.n_envs = n_envs
        self.envs = [DntEnv(scenario, HoldLast(), n_envs=1, seed=seed + i) for i in range(n_envs)]
        self.rngs = [np.random.default_rng(seed + i) for i in range(n_envs)]
        self.covered = [env.reset()[1] for env in self.envs]

    def step(self) -> None:
        for i, (env, rng) in enumerate(zip(self.envs, self.rngs)):
            res = env.step(random_valid(self.covered[i], rng))
            self.covered[i] = env.reset()[1] if res.done else res.covered


def check_same_physics(scenario: Scenario, n_envs: int = 64, seed: int = 0) -> None:
    """The plain loop's batch-of-one physics must equal the batched physics, bit for bit."""
    env = DntEnv(scenario, HoldLast(), n_envs=n_envs, seed=seed)
    _, covered = env.reset()
    st = env.state
    upload, serve = decode(random_valid(covered, np.random.default_rng(seed)), scenario.n_users)
    args = (st.user_xy, st.fade_user, st.fade_cloud, st.covered, st.prediction, upload, serve)
    whole = resolve(scenario, *args)
    for b in range(n_envs):
        one = resolve(scenario, *(a[b : b + 1] for a in args))
        for name in ("alloc", "user_rate", "upload_rate", "dnt_xy", "team_reward", "local_rewards"):
            if getattr(one, name).tobytes() != getattr(whole, name)[b : b + 1].tobytes():
                raise AssertionError(f"batched and per-env physics differ in {name} (env {b})")


def steps_per_second(runner, seconds: float, repeats: int) -> tuple[list[float], list[float]]:
    """Environment steps per wall-clock second and per CPU second of `repeats` timed runs.

    CPU seconds (this process only) leave out the time other programs took the core: on a
    shared machine they show what the code costs, the wall-clock figure what a run gets.
    """
    runner.step()  # warm-up: first-call costs (imports, caches) are not throughput
    wall, cpu = [], []
    for _ in range(repeats):
        calls = 0
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        while True:
            runner.step()
            calls += 1
            elapsed = time.perf_counter() - start_wall
            if elapsed >= seconds:
                break
        steps = calls * runner.n_envs
        wall.append(steps / elapsed)
        cpu.append(steps / max(time.process_time() - start_cpu, 1e-9))
    return wall, cpu


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="length of one timed run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per figure (best kept)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    scenario = Scenario()
    check_same_physics(scenario)
    print("physics check: batched and per-env results agree bit for bit", flush=True)
    rows = []
    for n_envs in BATCH_SIZES:
        for impl, make in (("batched", Batched), ("plain-loop", PlainLoop)):
            wall, cpu = steps_per_second(make(scenario, n_envs, seed=0), args.seconds, args.repeats)
            rows.append({"impl": impl, "n_envs": n_envs, "env_steps_per_s": max(wall),
                         "env_steps_per_cpu_s": max(cpu), "runs_wall": [round(r, 1) for r in wall],
                         "runs_cpu": [round(r, 1) for r in cpu]})
            print(f"  {impl:>10}  B = {n_envs:>3}: {max(wall):>10,.0f} env steps/s "
                  f"({max(cpu):,.0f} per CPU second)", flush=True)

    best = {(clock, r["impl"], r["n_envs"]): r[key] for r in rows
            for clock, key in (("wall", "env_steps_per_s"), ("CPU", "env_steps_per_cpu_s"))}
    ratios = {(clock, n): best[clock, "batched", n] / best[clock, "plain-loop", n]
              for clock in ("wall", "CPU") for n in BATCH_SIZES}
    big = max(BATCH_SIZES)
    met = {
        f"batched_B{big}_steps_per_s >= {TARGET_STEPS_PER_S}":
            best["wall", "batched", big] >= TARGET_STEPS_PER_S,
        f"ratio_B{big} >= {TARGET_RATIO:g}": ratios["wall", big] >= TARGET_RATIO,
    }

    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    print()
    print(f"U = {scenario.n_users}, M = {scenario.n_bs}, N = {scenario.n_rbs}, hold-last twin, "
          f"random valid actions; one core ({cores}); best of {args.repeats} x {args.seconds:g} s")
    header = ("B", "clock", "batched steps/s", "plain loop steps/s", "batched / plain")
    widths = [5, 5, 16, 18, 15]
    print(" | ".join(f"{h:>{w}}" for h, w in zip(header, widths)))
    print("-+-".join("-" * w for w in widths))
    for n in BATCH_SIZES:
        for clock in ("wall", "CPU"):
            cells = (f"{n}", clock, f"{best[clock, 'batched', n]:,.0f}",
                     f"{best[clock, 'plain-loop', n]:,.0f}", f"{ratios[clock, n]:.1f}x")
            print(" | ".join(f"{c:>{w}}" for c, w in zip(cells, widths)))
    for what, ok in met.items():
        print(f"target {what}: {'met' if ok else 'NOT met'}")

    report = {
        "benchmark": "env_steps_per_s",
        "scenario": {"n_users": scenario.n_users, "n_bs": scenario.n_bs, "n_rbs": scenario.n_rbs},
        "predictor": "hold-last",
        "actions": "random_valid (p_upload = p_serve = 0.5), drawn inside the timed loop",
        "plain_loop": "B DntEnv(n_envs=1) objects stepped one after another in Python",
        "timing": {"seconds_per_run": args.seconds, "repeats": args.repeats, "figure": "best run",
                   "env_steps_per_s": "wall clock", "env_steps_per_cpu_s": "this process's CPU time"},
        "one_core": {"affinity": cores, "threads": "OMP/OPENBLAS/MKL_NUM_THREADS=1"},
        "machine": {"cpu": cpu_name(), "python": platform.python_version(),
                    "numpy": np.__version__, "scipy": scipy.__version__},
        "results": rows,
        "ratio_batched_over_plain": {str(n): ratios["wall", n] for n in BATCH_SIZES},
        "ratio_batched_over_plain_cpu": {str(n): ratios["CPU", n] for n in BATCH_SIZES},
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "targets": met,
    }
    write_json(args.out, report, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
