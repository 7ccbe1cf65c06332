"""What one upload is worth to the team reward, now and in the slots after it (docs/learners.md).

    .venv/bin/python scripts/upload_value.py --set scenario.eps=0.5 --set scenario.n_rbs=9

Every BS serves its users by the nearest-BS rule and nobody uploads, except that BS m uploads
once, at slot k. On the same episodes (every random part of the environment is exogenous to
the actions, `dntsync.env.evaluate`), the change of the team reward against nobody uploading
is the upload's effect: at slot k itself (its RB and its interference cost rate, the DNT
error of the BS's users drops) and in every later slot (the twin predicts from the fresh
positions). Its discounted sum sum_j gamma^j (change at k + j) is what a Q-learner with that
gamma weighs against not uploading; gamma 1 is what the evaluation's per-slot mean counts.

Beside it, the team reward per slot of the nearest-BS rule uploading every k slots (all BSs
at t = 0, k, 2k, ...) on the same episodes: which fixed period the evaluation prefers; and
the same periods staggered (BS m at t = o_m, o_m + k, ... with o_m = round(m k / M)), so the
BSs' uploads fall in different slots.

Writes `benchmarks/results/upload_value.json` (or `--out`) and prints the table. Uses the
config's predictor (`env.predictor`, the twin at `env.twin_checkpoint`: `dvc repro train_twin`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from dntsync.config import ConfigError, load_config
from dntsync.env.actions import encode
from dntsync.env.core import DntEnv
from dntsync.env.evaluate import as_episode_policy, rollout
from dntsync.env.policies import NearestBS, nearest_association
from dntsync.errors import UserError
from dntsync.files import write_json
from dntsync.twin.predictor import build_predictor

ROOT = Path(__file__).resolve().parents[1]
GAMMAS = (0.2, 0.5, 0.8, 1.0)
PERIODS = (1, 2, 3, 5, 10, 15, "never")


class OneUpload:
    """Nearest-BS serving; BS `bs` uploads at slot `slot` only."""

    def __init__(self, scenario, bs: int, slot: int) -> None:
        self.scenario, self.bs, self.slot = scenario, bs, slot
        self.name = f"bs{bs}-at-{slot}"

    def act(self, state):
        serve = nearest_association(self.scenario, state.user_xy, state.covered)
        upload = np.zeros(serve.shape[:-1], dtype=bool)
        if state.t == self.slot:
            upload[:, self.bs] = True
        return encode(upload, serve)


def upload_values(cfg, slots: list[int], n_episodes: int, seed: int,
                  gammas: tuple[float, ...] = GAMMAS) -> dict:
    """`{"predictor", "rows": [{bs, slot, at_upload, rate_at_upload, per_slot_after, sum_after,
    discounted: {gamma: value}}], "periodic": {policy: {team_reward, sum_rate, dnt_error}}}`,
    every number a mean over the episodes (and slots)."""
    predictor, description = build_predictor(cfg)
    env = DntEnv(cfg.scenario, predictor, n_envs=n_episodes, seed=seed,
                 **cfg.env.observation_options())

    def play(policy):
        return rollout(env, as_episode_policy(policy), seed=seed).steps

    rules = [NearestBS(cfg.scenario, every) for every in PERIODS]
    rules += [NearestBS(cfg.scenario, every, staggered=True) for every in PERIODS
              if isinstance(every, int) and every > 1]
    periodic_steps = {rule.name: play(rule) for rule in rules}
    base = periodic_steps["nearest-never"]  # nobody uploads
    rows = []
    for bs in range(cfg.scenario.n_bs):
        for k in slots:
            steps = play(OneUpload(cfg.scenario, bs, k))
            change = (steps["team_reward"] - base["team_reward"]).mean(axis=0)[k:]  # slots k..T-1
            rate = cfg.scenario.eps * (steps["sum_rate"] - base["sum_rate"]).mean(axis=0)[k]
            rows.append({
                "bs": bs, "slot": k, "at_upload": float(change[0]), "rate_at_upload": float(rate),
                "per_slot_after": float(change[1:].mean()) if len(change) > 1 else 0.0,
                "sum_after": float(change[1:].sum()),
                "discounted": {str(g): float(np.sum(change * g ** np.arange(len(change))))
                               for g in gammas},
            })
    periodic = {name: {k: float(steps[k].mean()) for k in ("team_reward", "sum_rate", "dnt_error")}
                for name, steps in periodic_steps.items()}
    return {"predictor": description, "episodes": n_episodes, "seed": seed, "rows": rows,
            "periodic": periodic}


def table(result: dict) -> str:
    gammas = list(result["rows"][0]["discounted"])
    lines = ["| BS | upload at slot | change at that slot (of it: rate) | per later slot | "
             + " | ".join(f"discounted, gamma {g}" for g in gammas) + " |",
             "|---|---|---|---|" + "---|" * len(gammas)]
    for r in result["rows"]:
        lines.append(f"| {r['bs']} | {r['slot']} | {r['at_upload']:+.2f} ({r['rate_at_upload']:+.2f}) | "
                     f"{r['per_slot_after']:+.2f} | "
                     + " | ".join(f"{r['discounted'][g]:+.2f}" for g in gammas) + " |")
    lines += ["", "| nearest-BS, upload | team reward | sum rate | DNT error |", "|---|---|---|---|"]
    lines += [f"| {name} | {v['team_reward']:.2f} | {v['sum_rate']:.2f} | {v['dnt_error']:.2f} |"
              for name, v in result["periodic"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted config override, as for dntsync; repeatable")
    parser.add_argument("--slots", type=int, nargs="+", default=[3, 5, 10, 15, 20])
    parser.add_argument("--episodes", type=int, default=256)
    parser.add_argument("--seed", type=int, default=None,
                        help="first episode seed (default: marl.evaluation.seed)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "upload_value.json")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(ROOT / "conf" / "params.yaml", overrides=args.set)
    except (ConfigError, UserError) as err:
        print(f"upload_value.py: {err}", file=sys.stderr)
        return 2
    bad = [k for k in args.slots if not 0 <= k < cfg.scenario.episode_length]
    if bad or args.episodes < 1:
        print(f"--slots {bad} / --episodes {args.episodes}: need slots in 0..{cfg.scenario.episode_length - 1} "
              "and episodes >= 1", file=sys.stderr)
        return 2
    seed = cfg.marl.evaluation.seed if args.seed is None else args.seed
    try:
        result = {"overrides": args.set, **upload_values(cfg, args.slots, args.episodes, seed)}
    except UserError as err:  # e.g. an unreadable twin checkpoint
        print(f"upload_value.py: {err}", file=sys.stderr)
        return 2
    write_json(args.out, result)
    print(f"predictor {result['predictor']}, {args.episodes} episodes, overrides {args.set}")
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
