"""Environment throughput with the GRU twin against the hold-last twin, on one CPU core.

Setting: docs/model.md's default scenario (U = 12, M = 3, N = 12), one `DntEnv(n_envs=256)`,
uniformly random valid actions drawn inside the timed loop, reset every T = 30 slots (as
`bench_env.py`). The twin predicts s-hat_t for all 256 environments at every slot
(`GruPredictor.predict`, float32 under `torch.inference_mode()`, one torch thread).

The GRU is `models/twin.ckpt` when it exists and fits the default scenario; otherwise a
freshly initialised default-sized twin (K = 5, N^h = 128, same cost per call) built in-process.
Each figure is the best of several timed repeats, the two predictors' runs interleaved so a
change in machine load hits both. Target: GRU >= 50% of hold-last steps/s.
Writes `benchmarks/results/twin.json`.

Usage: `.venv/bin/python benchmarks/bench_twin.py [--seconds S] [--repeats R] [--checkpoint P]`.
"""

from __future__ import annotations

import os

# One core: the thread pools read these when numpy / torch are first imported, so set them first.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"
if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

import argparse  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dntsync.config import TwinConfig  # noqa: E402
from dntsync.env import DntEnv, HoldLast, random_valid  # noqa: E402
from dntsync.files import write_json  # noqa: E402
from dntsync.network import Scenario  # noqa: E402
from dntsync.twin import GruPredictor, GruTwin, Scaler, TwinCheckpointError  # noqa: E402

torch.set_num_threads(1)
N_ENVS = 256
TARGET_RATIO = 0.5  # GRU steps/s over hold-last steps/s
RESULTS = Path(__file__).parent / "results" / "twin.json"


def gru_predictor(scenario: Scenario, checkpoint: Path) -> tuple[GruPredictor, str]:
    try:
        return GruPredictor.load(checkpoint, scenario=scenario), f"checkpoint {checkpoint}"
    except TwinCheckpointError:
        tw = TwinConfig()
        torch.manual_seed(0)
        net = GruTwin(scenario.n_users, tw.window, tw.hidden, tw.num_layers,
                      Scaler.from_scenario(scenario))
        return GruPredictor(net), "freshly initialised (no fitting checkpoint)"


class Rollout:
    """One `DntEnv` stepped with random valid actions, reset when the episode ends."""

    def __init__(self, scenario: Scenario, predictor, seed: int = 0) -> None:
        self.env = DntEnv(scenario, predictor, n_envs=N_ENVS, seed=seed)
        self.rng = np.random.default_rng(seed)
        _, self.covered = self.env.reset()
        self.step()  # warm-up: first-call costs are not throughput

    def step(self) -> None:
        res = self.env.step(random_valid(self.covered, self.rng))
        self.covered = self.env.reset()[1] if res.done else res.covered

    def steps_per_second(self, seconds: float) -> float:
        calls, start = 0, time.perf_counter()
        while True:
            self.step()
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                return calls * N_ENVS / elapsed


def predict_seconds(predictor, history: np.ndarray, repeats: int = 50) -> float:
    predictor.predict(history)
    start = time.perf_counter()
    for _ in range(repeats):
        predictor.predict(history)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="length of one timed run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per figure (best kept)")
    parser.add_argument("--checkpoint", type=Path, default=Path(TwinConfig().checkpoint))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    scenario = Scenario()
    gru, source = gru_predictor(scenario, args.checkpoint)
    predictors = {"hold-last": HoldLast(gru.window), "gru": gru}
    rollouts = {name: Rollout(scenario, p) for name, p in predictors.items()}
    runs = {name: [] for name in predictors}
    for _ in range(args.repeats):  # interleaved, so a change in machine load hits both
        for name, rollout in rollouts.items():
            runs[name].append(rollout.steps_per_second(args.seconds))
    history = np.random.default_rng(0).uniform(-50, 50, (N_ENVS, gru.window, scenario.n_users, 2))
    rows = {}
    for name, predictor in predictors.items():
        rows[name] = {"env_steps_per_s": max(runs[name]), "runs": [round(r, 1) for r in runs[name]],
                      "predict_ms_per_call": 1e3 * predict_seconds(predictor, history)}
        print(f"  {name:>9}: {rows[name]['env_steps_per_s']:>10,.0f} env steps/s "
              f"(predict {rows[name]['predict_ms_per_call']:.3f} ms / call of B = {N_ENVS})",
              flush=True)
    ratio = rows["gru"]["env_steps_per_s"] / rows["hold-last"]["env_steps_per_s"]
    met = ratio >= TARGET_RATIO
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    print(f"GRU / hold-last = {ratio:.1%} (target >= {TARGET_RATIO:.0%}: "
          f"{'met' if met else 'NOT met'}); GRU: {source}; one core {cores}, B = {N_ENVS}")
    report = {
        "benchmark": "env_steps_per_s with the GRU twin vs hold-last",
        "scenario": {"n_users": scenario.n_users, "n_bs": scenario.n_bs, "n_rbs": scenario.n_rbs},
        "n_envs": N_ENVS,
        "gru": {"source": source, "window": gru.window, "hidden": gru.net.hidden,
                "num_layers": gru.net.num_layers},
        "actions": "random_valid (p_upload = p_serve = 0.5), drawn inside the timed loop",
        "timing": {"seconds_per_run": args.seconds, "repeats": args.repeats,
                   "figure": "best run; hold-last and GRU runs interleaved"},
        "one_core": {"affinity": cores, "torch_threads": torch.get_num_threads()},
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "numpy": np.__version__},
        "results": rows,
        "ratio_gru_over_hold_last": ratio,
        "targets": {f"ratio >= {TARGET_RATIO}": met},
    }
    write_json(args.out, report, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
