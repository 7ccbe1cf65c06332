"""Rules that upload by the time since the BS's last successful upload, against a run's best
heuristic and VDN (docs/learners.md, "A stronger rule: retrying a failed upload"; since
f1516bf the heuristic set holds them too: `NearestBS(k, retry=True)`, which this plays).

The pipeline's heuristics upload on a fixed clock (always, never, every k slots). The rule
`nearest-retry-k` serves as the nearest-BS rule does and lets BS m upload k slots after its
last successful upload and in every slot after that until one succeeds, so a failed upload
is retried in the next slot instead of k slots later; before its first success in an
episode, from slot phase_m on: 0 for every BS (synchronised) or round(m k / M) (staggered,
as the every-k heuristics). A BS knows what it needs: the slots since its last success are
in its own observation (`env.observation: full`), the slot index is the clock every BS shares.

After `make run`, for the Fig. 3 setting and every sweep point (the run's twins and
metrics): every retry rule plays the evaluation episodes (the best of them is what the
report would name), the validation episodes (the fitted offsets' and tuned phases' episodes)
and `--episodes` held-out episodes (seeds `--seed` + i), where the rule chosen on the
validation episodes is paired, episode by episode, with the run's best heuristic (and on the
evaluation episodes too, whose paired standard error is the resolution of their verdicts):

    .venv/bin/python scripts/retry_rules.py --out benchmarks/results/retry_rules.json
    .venv/bin/python scripts/retry_rules.py --settings fig3 'fig4 eps=0.25'
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np

from dntsync.config import load_config
from dntsync.env.evaluate import Evaluation, as_episode_policy, rollout
from dntsync.env.policies import NearestBS, baseline_policies, tuned_phases
from dntsync.files import write_json
from dntsync.marl.training import RunPaths
from dntsync.stages.report import against_heuristic
from dntsync.twin.predictor import build_predictor
from offsets_search import settings  # scripts/: the Fig. 3 setting and every sweep point


def retry_rules(scenario, periods: tuple[int, ...], score=None, tuned_max: int = 0) -> list[NearestBS]:
    """`NearestBS(k, retry=True)` for each k, synchronised (phase 0) and staggered and, given
    `score`, with `tuned_phases` where k^M <= `tuned_max` (as the tuned heuristics)."""
    out = []
    for k in periods:
        out += [NearestBS(scenario, k, retry=True), NearestBS(scenario, k, staggered=True, retry=True)]
        if score is not None and k ** scenario.n_bs <= tuned_max:
            out.append(NearestBS(scenario, k, phases=tuned_phases(scenario, k, score, retry=True), retry=True))
            out[-1].name = f"nearest-retry-{k}-tuned"
    return out


def per_episode(episodes: Evaluation, policy) -> np.ndarray:
    """`[E]`: `policy`'s team reward per step in each episode."""
    policy = as_episode_policy(policy)
    return np.concatenate([rollout(env, policy, seed=s, record=False).steps["team_reward"].mean(axis=1)
                           for env, s in zip(episodes.envs, episodes.seeds)])


def need_full_observation(cfg) -> None:
    """Stop with one line unless the observation carries the slots since the last success."""
    if cfg.env.observation != "full":
        raise SystemExit(f"env.observation is {cfg.env.observation!r}: the slots since the last success "
                         "are read from the 'full' observation; set env.observation=full")


def parse_arguments(description: str) -> argparse.Namespace:
    """The command line both retry scripts take."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--periods", type=int, nargs="*", default=[2, 3, 4, 5, 6, 10], help="the rules' k")
    parser.add_argument("--episodes", type=int, default=256, help="held-out episodes")
    parser.add_argument("--seed", type=int, default=30_000, help="held-out episode i uses seed + i")
    parser.add_argument("--settings", nargs="*", default=None, help="labels, e.g. fig3 'fig4 eps=0.5'")
    parser.add_argument("--tuned-max", type=int, default=27,
                        help="tuned phases (all k^M assignments) for each k with k^M <= this; 0: none")
    parser.add_argument("--out", default=None, help="also write the rows as JSON")
    args = parser.parse_args()
    if not args.periods or min(args.periods) < 2:
        raise SystemExit(f"--periods {args.periods}: need one or more k >= 2 (k = 1 is nearest-always)")
    return args


def write_rows(args: argparse.Namespace, rows: dict) -> None:
    """With `--out`, the rows and the arguments that made them, as JSON (atomically)."""
    if args.out:
        write_json(args.out, {"episodes": args.episodes, "seed": args.seed, "periods": args.periods,
                              "tuned_max": args.tuned_max, "rows": rows}, indent=2)


def setting(cfg, n_holdout: int, holdout_seed: int, periods: tuple[int, ...], tuned_max: int) -> dict:
    need_full_observation(cfg)
    predictor, _ = build_predictor(cfg)
    sc, uo, ev, opts = cfg.scenario, cfg.marl.upload_offsets, cfg.marl.evaluation, cfg.env.observation_options()
    evaluation = Evaluation(sc, predictor, ev.episodes, ev.seed, **opts)
    validation = Evaluation(sc, predictor, uo.episodes, uo.seed, **opts)
    holdout = Evaluation(sc, predictor, n_holdout, holdout_seed, **opts)
    runs = [json.loads(RunPaths.of(cfg, "vdn", seed).metrics.read_text()) for seed in cfg.marl.seeds]
    vdn = np.array([r["eval_team_reward"] for r in runs])
    heuristic, heuristic_eval = runs[0]["best_heuristic"], runs[0]["best_heuristic_team_reward"]
    # the run's best heuristic, its phases tuned on the validation episodes as the run did
    policy = next(p for p in baseline_policies(sc, ev.upload_periods, seed=ev.seed, oracle=False,
                                               score=lambda p: validation.run(p)["team_reward"]["mean"],
                                               tuned_max=ev.tuned_max) if p.name == heuristic)
    rules = {r.name: {"rule": r, "evaluation": float(per_episode(evaluation, r).mean()),
                      "validation": float(per_episode(validation, r).mean())}
             for r in retry_rules(sc, periods, lambda r: float(per_episode(validation, r).mean()), tuned_max)}
    on_eval = max(rules, key=lambda n: rules[n]["evaluation"])
    on_val = max(rules, key=lambda n: rules[n]["validation"])
    gain = per_episode(holdout, rules[on_val]["rule"]) - per_episode(holdout, policy)
    on_evaluation = per_episode(evaluation, rules[on_val]["rule"]) - per_episode(evaluation, policy)
    best = max(heuristic_eval, rules[on_eval]["evaluation"])
    return {
        "heuristic": heuristic, "heuristic_eval": heuristic_eval,
        "retry_on_eval": on_eval, "retry_on_eval_eval": rules[on_eval]["evaluation"],
        "retry_on_validation": on_val, "retry_on_validation_eval": rules[on_val]["evaluation"],
        "holdout_gain": float(gain.mean()), "holdout_se": float(gain.std(ddof=1) / math.sqrt(len(gain))),
        "evaluation_gain": float(on_evaluation.mean()),
        "evaluation_se": float(on_evaluation.std(ddof=1) / math.sqrt(len(on_evaluation))),
        "vdn_eval": vdn.tolist(), "vdn_mean": float(vdn.mean()), "vdn_spread": float(vdn.std()),
        "vdn_ratio_to_best": float(vdn.mean() / best),
        "vdn_against_best": against_heuristic(float(vdn.mean() - best), float(vdn.std())),
        "rules": {n: {k: v for k, v in r.items() if k != "rule"} for n, r in rules.items()},
    }


def main() -> int:
    args = parse_arguments(__doc__.splitlines()[0])
    rows = {}
    print("| setting | best heuristic | retry rule (best on evaluation) | VDN (± spread) | VDN / best | "
          "VDN against the best | retry rule (on validation) - heuristic: held-out, evaluation |")
    print("|---|---|---|---|---|---|---|")
    for label, cfg in settings(load_config()).items():
        if args.settings and label not in args.settings:
            continue
        r = rows[label] = setting(cfg, args.episodes, args.seed, tuple(args.periods), args.tuned_max)
        print(f"| {label} | {r['heuristic']} {r['heuristic_eval']:.3f} | {r['retry_on_eval']} "
              f"{r['retry_on_eval_eval']:.3f} | {r['vdn_mean']:.3f} ± {r['vdn_spread']:.3f} | "
              f"{r['vdn_ratio_to_best']:.5f} | {r['vdn_against_best']} | {r['retry_on_validation']}: "
              f"{r['holdout_gain']:+.3f} ± {r['holdout_se']:.3f}, "
              f"{r['evaluation_gain']:+.3f} ± {r['evaluation_se']:.3f} |",
              flush=True)
    write_rows(args, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
