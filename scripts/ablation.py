"""The learner ablation (docs/learners.md): from the paper-literal learner to the default one,
one change at a time, each row VDN with every seed of `marl.seeds` in the Fig. 3 setting.

    .venv/bin/python scripts/ablation.py            # every row (about 40 min on 2 cores)
    .venv/bin/python scripts/ablation.py --rows 0 6 --leave-one-out  # some rows only

Row k is `dntsync train-learners` with the overrides of rows 0..k (`ROWS`) and outputs under
`runs/ablation/<k>-<name>/`; a leave-one-out row (`LEAVE_ONE_OUT`) undoes one change from
the default alone (`runs/ablation/without-<name>/`); `OTHER_LEARNERS` are the learners that
`make run` does not train, each with the default configuration
(`runs/ablation/learner-<algo>/`). Finished runs are found and not repeated. Needs the twin
(`dvc repro train_twin`). Writes `benchmarks/results/ablation.json` and prints the table:
team reward per step (mean and std over seeds), its ratio to the best heuristic and to the
myopic oracle on the same evaluation episodes: every row's against the last row's references
(the default's run), so rows kept from an earlier heuristic set are measured against today's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from dntsync.files import write_json

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "ablation.json"

# (name, overrides added by the row); row 0 is conf/profiles/paper.yaml's learner
ROWS: list[tuple[str, list[str]]] = [
    ("paper", ["env.observation=positions_only", "env.obs_frame=area", "env.user_features=[]",
               "marl.network.head=flat", "marl.network.association=false", "marl.algorithm.lr=1e-4",
               "marl.collection.exploration=action", "marl.collection.epsilon_start=0.5",
               "marl.collection.epsilon_end=0.05", "marl.algorithm.target_update_epochs=2",
               "marl.algorithm.error_gamma=0", "marl.upload_offsets.phases=0",
               "marl.network.association_slopes=[]", "marl.algorithm.batches_per_epoch=24",
               "marl.network.serve_covered_fit=false", "marl.upload_offsets.retry_periods=[]"]),
    ("upload-state", ["env.observation=full"]),
    ("branching-head", ["marl.network.head=branching"]),
    ("bs-frame", ["env.obs_frame=bs"]),
    ("others-feature", ["env.user_features=[others]"]),
    ("bit-exploration", ["marl.collection.exploration=bit", "marl.collection.epsilon_start=0.3"]),
    ("lr-2e-3", ["marl.algorithm.lr=2e-3"]),
    ("no-target-net", ["marl.algorithm.target_update_epochs=0"]),
    ("greedy-end", ["marl.collection.epsilon_end=0"]),
    ("association", ["marl.network.association=true"]),
    ("error-value", ["marl.algorithm.error_gamma=0.8"]),
    ("upload-offsets", ["marl.upload_offsets.phases=2", "marl.upload_offsets.periods=[]"]),
    ("association-slope", ["marl.network.association_slopes=[0.0,1.0,3.0,10.0,100.0]"]),
    ("16-batches", ["marl.algorithm.batches_per_epoch=16"]),
    ("longer-cycles", ["marl.upload_offsets.periods=[5,10]"]),
    ("serve-covered", ["marl.network.serve_covered_fit=true"]),
    ("retry-uploads", ["marl.upload_offsets.retry_periods=[2,3,4,5,6,10]"]),
]


# (name, overrides of the default) for the changes that showed no difference where the rows
# above added them: each undone alone from the default learner
LEAVE_ONE_OUT: list[tuple[str, list[str]]] = [
    ("area-frame", ["env.obs_frame=area"]),
    ("action-exploration", ["marl.collection.exploration=action", "marl.collection.epsilon_start=0.5"]),
    # without the upload state the retry offsets have nothing to read: off too
    ("positions-only", ["env.observation=positions_only", "marl.upload_offsets.retry_periods=[]"]),
]


# learners besides the pipeline's VDN and IQL (`sweeps.fig3_algos`), in the default configuration
OTHER_LEARNERS: list[str] = ["qmix"]


def row_overrides(k: int) -> list[str]:
    return [o for _, extra in ROWS[: k + 1] for o in extra]


def run_row(k: int) -> dict:
    return _run(k, ROWS[k][0], f"runs/ablation/{k}-{ROWS[k][0]}", row_overrides(k), ROWS[k][1])


def run_leave_one_out(i: int) -> dict:
    name, sets = LEAVE_ONE_OUT[i]
    return _run(i, name, f"runs/ablation/without-{name}", sets, sets)


def run_learner(i: int) -> dict:
    algo = OTHER_LEARNERS[i]
    return _run(i, algo, f"runs/ablation/learner-{algo}", [], [], algo)


def _run(k: int, name: str, out: str, overrides: list[str], adds: list[str], algo: str = "vdn") -> dict:
    sets = [*overrides, f"sweeps.fig3_algos=[{algo}]", f"marl.outputs.model_dir={out}/models",
            f"marl.outputs.metrics_dir={out}/metrics", f"marl.outputs.checkpoint_dir={out}/checkpoints"]
    cmd = [str(ROOT / ".venv" / "bin" / "dntsync"), "train-learners",
           *[a for s in sets for a in ("--set", s)]]
    print("$ " + " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    summary = json.loads((ROOT / out / "metrics" / f"marl_{algo}.json").read_text())
    return {"row": k, "name": name, "algo": algo, "adds": adds, "command": " ".join(cmd[1:]),
            "team_reward": summary["eval_team_reward"],
            "std_over_seeds": summary["eval_team_reward_std_over_seeds"],
            "per_seed": summary["eval_team_reward_per_seed"],
            "ratio_to_best_heuristic": summary["ratio_to_best_heuristic"],
            "best_heuristic": summary["best_heuristic"],
            "ratio_to_oracle": summary["ratio_to_oracle"],
            "wall_time_s_per_seed": summary["wall_time_s_per_seed"]}


def table(rows: list[dict]) -> str:
    lines = ["| row | adds | team reward (std over seeds) | / best heuristic (which) | / oracle |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['row']} {r['name']} | `{' '.join(r['adds'])}` | {r['team_reward']:.2f} "
                     f"({r['std_over_seeds']:.2f}) | {r['ratio_to_best_heuristic']:.3f} ({r['best_heuristic']}) | "
                     f"{r['ratio_to_oracle']:.3f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="*", default=list(range(len(ROWS))))
    parser.add_argument("--leave-one-out", type=int, nargs="*",
                        default=list(range(len(LEAVE_ONE_OUT))), metavar="I",
                        help="rows of LEAVE_ONE_OUT (default: all)")
    parser.add_argument("--learners", type=int, nargs="*", default=list(range(len(OTHER_LEARNERS))),
                        metavar="I", help="entries of OTHER_LEARNERS (default: all)")
    args = parser.parse_args()
    bad = [k for k in args.rows if not 0 <= k < len(ROWS)]
    bad += [i for i in args.leave_one_out if not 0 <= i < len(LEAVE_ONE_OUT)]
    bad += [i for i in args.learners if not 0 <= i < len(OTHER_LEARNERS)]
    if bad:
        print(f"{bad}: rows are 0..{len(ROWS) - 1}, leave-one-out rows 0..{len(LEAVE_ONE_OUT) - 1}, "
              f"learners 0..{len(OTHER_LEARNERS) - 1}", file=sys.stderr)
        return 2
    old = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    sections = {"rows": (args.rows, run_row), "leave_one_out": (args.leave_one_out, run_leave_one_out),
                "learners": (args.learners, run_learner)}
    result = {}
    for key, (chosen, run) in sections.items():
        kept = {r["row"]: r for r in old.get(key, [])}
        for k in chosen:
            kept[k] = run(k)
        result[key] = [kept[k] for k in sorted(kept)]
    # one reference for every row: the baselines of the last row's run (all rows play the same
    # evaluation episodes of the Fig. 3 setting; kept rows may have met an older heuristic set)
    last = result["rows"][-1]
    heuristic = last["team_reward"] / last["ratio_to_best_heuristic"]
    oracle = last["team_reward"] / last["ratio_to_oracle"]
    for r in (r for key in sections for r in result[key]):
        r.update(ratio_to_best_heuristic=r["team_reward"] / heuristic, best_heuristic=last["best_heuristic"],
                 ratio_to_oracle=r["team_reward"] / oracle)
    write_json(RESULTS, result)
    for key in sections:
        print(table(result[key]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
