"""A check of the fitted policy against the nearest-BS rule on held-out episodes: measured,
not adopted (docs/learners.md, "A check against the rule on held-out episodes").

After `make run`, for every saved VDN model (Fig. 3 and every sweep point, each seed), as the
run fitted it: the rule is the best on the validation episodes (`marl.upload_offsets`) of the
nearest-BS rules the learner can play (every BS serving each user it covers, an overlap user
to the nearest BS, the uploads forced always, never, or on the every-k schedules whose period
divides the offsets' cycle: the offsets search's starts, `phase_starts`, at +-force). Both the fitted
policy and the rule play `--episodes` held-out episodes (seeds `--seed` + i: none of the
evaluation's, validation's or training's); a check at z would play the fitted policy only if
its per-episode gain reaches z standard errors (paired), else the rule. The script prints per
seed the gain, its z and both policies' evaluation team rewards, then per setting the mean
over seeds / the best heuristic with no check and with the check at each `--z`:

    .venv/bin/python scripts/rule_check.py                     # 64 held-out episodes
    .venv/bin/python scripts/rule_check.py --episodes 256 --settings fig3

The training is untouched, so the models of one `make run` serve every variant. Each model
costs about 17 plays of the validation or held-out episodes (minutes in all, one core).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics

import numpy as np
import torch

from dntsync.config import load_config
from dntsync.env.evaluate import Evaluation, rollout
from dntsync.files import write_json
from dntsync.marl.offsets import phase_starts
from dntsync.marl.training import RunPaths, load_q_networks
from dntsync.twin.predictor import build_predictor
from offsets_search import settings  # scripts/: the Fig. 3 setting and every sweep point

torch.set_num_threads(1)


def per_episode(learner, episodes: Evaluation, offsets: torch.Tensor) -> np.ndarray:
    """`[E]`: the greedy policy's team reward per step in each episode."""
    policy = learner.greedy_policy(offsets)
    return np.concatenate([rollout(env, policy, seed=s, record=False).steps["team_reward"].mean(axis=1)
                           for env, s in zip(episodes.envs, episodes.seeds)])


def rules(n_bs: int, phases: int, periods: tuple[int, ...], force: float) -> list[tuple[str, str | int, list | None,
                                                                                    torch.Tensor]]:
    """The nearest-BS rules the learner plays with offsets, the starts of its offsets' search
    at +-force (`phase_starts` less zero offsets): `(name, upload, phases, offsets)`,
    `NearestBS(scenario, upload, phases=phases)` and its offsets `[M, period]`."""
    out = []
    for offsets in phase_starts(n_bs, phases, (-force, force), periods, force)[:-1]:
        if offsets.shape[1] == 1:  # every slot: always (+force) or never (-force)
            upload = "always" if float(offsets[0, 0]) > 0 else "never"
            out.append((f"nearest-{upload}", upload, None, offsets))
        else:  # each BS's upload slot: its +force column
            period, slots = offsets.shape[1], offsets.argmax(dim=1).tolist()
            out.append((f"nearest-every-{period}-phases-" + "-".join(map(str, slots)), period, slots, offsets))
    return out


def check(learner, record: dict, uo, validation: Evaluation, holdout: Evaluation, evaluation: Evaluation) -> dict:
    """One saved model (as the run fitted it) against the rule: the held-out gain and both
    evaluation scores."""
    cycle = learner.upload_offsets.shape[1]
    mine = per_episode(learner, holdout, learner.upload_offsets.clone())
    learner.online.serve_covered.fill_(1.0)
    learner.online.association.slope.fill_(uo.force)
    candidates = rules(len(learner.online.agents), uo.phases, uo.periods, uo.force)
    offsets = [o.repeat(1, cycle // o.shape[1]) for *_, o in candidates]
    on_validation = [per_episode(learner, validation, o).mean() for o in offsets]
    best = int(np.argmax(on_validation))  # the first among equals
    theirs = per_episode(learner, holdout, offsets[best])
    gain = mine - theirs
    se = float(gain.std(ddof=1) / math.sqrt(len(gain)))
    learner.upload_offsets.copy_(offsets[best])
    name, upload, phases, _ = candidates[best]
    return {"seed": record["seed"], "gain": float(gain.mean()), "se": se,
            "z": float(gain.mean() / se) if se > 0 else 0.0, "rule": name, "rule_upload": upload,
            "rule_phases": phases, "eval_fitted": record["eval_team_reward"],
            "eval_rule": evaluation.run(learner.greedy_policy())["team_reward"]["mean"],
            "heuristic": record["best_heuristic_team_reward"], "heuristic_name": record["best_heuristic"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=64, help="held-out episodes")
    parser.add_argument("--seed", type=int, default=30_000, help="held-out episode i uses seed + i")
    parser.add_argument("--z", type=float, nargs="*", default=[0.0, 1.645], help="the checks' thresholds")
    parser.add_argument("--settings", nargs="*", default=None, help="labels, e.g. fig3 'fig4 eps=0.5'")
    parser.add_argument("--out", default=None, help="also write the rows as JSON")
    args = parser.parse_args()

    rows = {}
    for label, cfg in settings(load_config()).items():
        if args.settings and label not in args.settings:
            continue
        predictor, _ = build_predictor(cfg)
        uo, opts = cfg.marl.upload_offsets, cfg.env.observation_options()
        holdout = Evaluation(cfg.scenario, predictor, args.episodes, args.seed, **opts)
        validation = Evaluation(cfg.scenario, predictor, uo.episodes, uo.seed, **opts)
        evaluation = Evaluation(cfg.scenario, predictor, cfg.marl.evaluation.episodes, cfg.marl.evaluation.seed,
                                **opts)
        rows[label] = []
        for seed in cfg.marl.seeds:
            paths = RunPaths.of(cfg, "vdn", seed)
            learner, _ = load_q_networks(paths.model, cfg)
            row = check(learner, json.loads(paths.metrics.read_text()), uo, validation, holdout, evaluation)
            rows[label].append(row)
            print(f"{label} seed {seed}: held-out gain {row['gain']:+.5f} ± {row['se']:.5f} (z {row['z']:.2f}); "
                  f"evaluation: fitted {row['eval_fitted']:.5f}, {row['rule']} {row['eval_rule']:.5f}, "
                  f"{row['heuristic_name']} {row['heuristic']:.5f}", flush=True)
    print("\n| setting | no check | " + " | ".join(f"z = {z}" for z in args.z) + " |")
    print("|---|---|" + "---|" * len(args.z))
    for label, seeds in rows.items():
        heuristic = seeds[0]["heuristic"]
        cells = [f"{statistics.mean(r['eval_fitted'] for r in seeds) / heuristic:.5f}"]
        for z in args.z:
            kept = [r["gain"] > 0 and r["z"] >= z for r in seeds]
            played = [r["eval_fitted"] if k else r["eval_rule"] for r, k in zip(seeds, kept)]
            cells.append(f"{statistics.mean(played) / heuristic:.5f} ({sum(kept)} fitted)")
        print(f"| {label} | " + " | ".join(cells) + " |")
    if args.out:
        write_json(args.out, {"episodes": args.episodes, "seed": args.seed, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
