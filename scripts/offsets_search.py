"""How the upload offsets' fitting choices score (docs/learners.md, "Upload offsets").

After `make run`, refits the upload offsets of every saved VDN model (Fig. 3 and every sweep
point, each seed) with the chosen search, and prints per setting the mean over
seeds of the evaluation team reward without offsets, with them, and the best heuristic's
(from the run's metrics, the same evaluation episodes):

    .venv/bin/python scripts/offsets_search.py                       # the default search
    .venv/bin/python scripts/offsets_search.py --episodes 32 --exhaustive
    .venv/bin/python scripts/offsets_search.py --phases 1 --settings fig3

`--exhaustive` tries every grid value at each coordinate of the K phases, from zero (instead of
walking from the best phase start while the score does not fall); `--passes N` sets the number of passes over the
coordinates (default: the config's). The training is untouched, so the models of one `make run` serve every search.
Minutes on 2 cores (`--settings` narrows it).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import torch

from dntsync.config import apply_overrides, load_config
from dntsync.env.evaluate import Evaluation
from dntsync.files import write_json
from dntsync.marl.offsets import fit_upload_offsets, scores
from dntsync.marl.training import RunPaths, load_q_networks
from dntsync.stages.common import point_config, sweep_points
from dntsync.twin.predictor import build_predictor

torch.set_num_threads(1)


def settings(base) -> dict[str, object]:
    """`{label: config}`: the Fig. 3 setting and every point of both sweeps."""
    out = {"fig3": base}
    for sweep in ("fig4", "fig5"):
        out.update({f"{sweep} {p.label}": point_config(base, p) for p in sweep_points(base, sweep)})
    return out


def exhaustive(learner, validation: Evaluation, grid: list[float], offsets: torch.Tensor) -> torch.Tensor:
    """One pass of every grid value at each coordinate, keeping the best (team score)."""
    best = scores(learner, validation, offsets)
    for m in range(offsets.shape[0]):
        for k in range(offsets.shape[1]):
            for g in grid:
                trial = offsets.clone()
                trial[m, k] = g
                got = scores(learner, validation, trial)
                if got[m] > best[m]:
                    offsets, best = trial, got
    return offsets


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phases", type=int, default=None, help="K (default: the config's)")
    parser.add_argument("--periods", type=int, nargs="*", default=None,
                        help="longer upload cycles whose schedules start the search (default: the config's)")
    parser.add_argument("--episodes", type=int, default=None, help="validation episodes (default: the config's)")
    parser.add_argument("--passes", type=int, default=None, help="passes (default: the config's)")
    parser.add_argument("--exhaustive", action="store_true")
    parser.add_argument("--settings", nargs="*", default=None, help="labels, e.g. fig3 'fig4 eps=0.5'")
    parser.add_argument("--out", default=None, help="also write the rows as JSON")
    args = parser.parse_args()
    base = load_config()
    uo = base.marl.upload_offsets
    phases = uo.phases if args.phases is None else args.phases
    periods = tuple(uo.periods if args.periods is None else args.periods)
    cycle = math.lcm(phases, *periods)
    episodes = uo.episodes if args.episodes is None else args.episodes
    passes = uo.passes if args.passes is None else args.passes
    grid = [float(g) for g in uo.grid]
    rows = []
    for label, cfg in settings(base).items():
        if args.settings and label not in args.settings:
            continue
        cfg = apply_overrides(cfg, [f"marl.upload_offsets.phases={phases}",
                                    f"marl.upload_offsets.periods=[{','.join(map(str, periods))}]"])
        predictor, _ = build_predictor(cfg)
        options = cfg.env.observation_options()
        validation = Evaluation(cfg.scenario, predictor, episodes, uo.seed, **options)
        evaluation = Evaluation(cfg.scenario, predictor, cfg.marl.evaluation.episodes,
                                cfg.marl.evaluation.seed, **options)
        for seed in cfg.marl.seeds:
            paths = RunPaths.of(cfg, "vdn", seed)
            learner, _ = load_q_networks(paths.model, cfg)
            learner.register_buffer("upload_offsets", torch.zeros(cfg.scenario.n_bs, cycle))
            started = time.perf_counter()
            without = evaluation.run(learner.greedy_policy())["team_reward"]["mean"]
            offsets, plays = torch.zeros(cfg.scenario.n_bs, phases), None
            if args.exhaustive:
                for _ in range(passes):
                    offsets = exhaustive(learner, validation, grid, offsets)
                offsets = offsets.repeat(1, cycle // phases)
            else:
                plays = fit_upload_offsets(learner, validation, grid, passes, phases, periods,
                                           uo.force)["validation_plays"]
                offsets = learner.upload_offsets.clone()
            learner.upload_offsets.copy_(offsets)
            fitted = evaluation.run(learner.greedy_policy())["team_reward"]["mean"]
            heuristic = json.loads(paths.metrics.read_text())["best_heuristic_team_reward"]
            rows.append({"setting": label, "seed": seed, "without": without, "with": fitted,
                         "heuristic": heuristic, "offsets": offsets.tolist(), "plays": plays,
                         "seconds": time.perf_counter() - started})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(f"phases {phases}, periods {list(periods)}, {episodes} validation episodes, {passes} pass(es), "
          f"{'exhaustive' if args.exhaustive else 'pattern'} search")
    print(f"{'setting':18s} {'without':>9s} {'with':>9s} {'heuristic':>9s} {'ratio':>7s}")
    short = 0.0
    for label in dict.fromkeys(r["setting"] for r in rows):
        mine = [r for r in rows if r["setting"] == label]
        w, f = (statistics.mean(r[k] for r in mine) for k in ("without", "with"))
        h = mine[0]["heuristic"]
        short += max(0.0, 1 - f / h)
        print(f"{label:18s} {w:9.3f} {f:9.3f} {h:9.3f} {f / h:7.4f}")
    print(f"shortfall summed over the settings: {short:.4f}")
    if args.out:
        write_json(args.out, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
