"""Whom a trained learner's BSs serve, beside two fixed reference policies.

`dntsync diagnose-learner --model models/marl/vdn_seed0.ckpt` plays the model's greedy policy
on the configured evaluation episodes (`marl.evaluation.seed`, `marl.evaluation.episodes`; use the same
`--set` overrides the model was trained with) and prints, per BS, how often it uploads and
which share of its single-covered and of its overlap users it serves, then the team reward
of the learner, of `outer-only` (the middle BS serves nobody: the lazy equilibrium the
learners tend to reach) and of `all-but-overlap` (the middle BS also serves the users only
it covers). See `dntsync.marl.diagnose`; `--out FILE` also writes the numbers as JSON.
"""

from __future__ import annotations

from pathlib import Path

from dntsync.config import Config
from dntsync.files import write_json
from dntsync.marl.diagnose import diagnose_model


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="a Q-network file of train-marl")
    parser.add_argument("--out", default=None, help="also write the numbers to this JSON file")


def run(cfg: Config, args) -> int:
    result = diagnose_model(cfg, Path(args.model))
    if result["warning"]:
        print(f"warning: {result['warning']}")
    print(f"{result['model']} ({result['algo']}, predictor {result['predictor']}), greedy, "
          f"{cfg.marl.evaluation.episodes} episodes:")
    print("  BS  upload  serves single-covered  serves overlap users")
    for m, row in enumerate(result["profile"]):
        print(f"  {m:>2}  {row['upload']:6.2f}  {row['served_single']:21.2f}  {row['served_overlap']:20.2f}")
    print(f"team reward per step: learner {result['learner_team_reward']:.2f}, "
          + ", ".join(f"{k} {v:.2f}" for k, v in result["reference"].items())
          + f" (lazy BS: {result['lazy_bs']})")
    if args.out:
        write_json(args.out, result)
    return 0
