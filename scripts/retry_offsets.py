"""The learner's upload fit with offsets read by the slots since the BS's last successful
upload, offline on a `make run`'s saved VDN models: measured, not in the code
(docs/learners.md, "A stronger rule: retrying a failed upload").

The run's upload offsets are read by the slot phase, t mod K (`marl.upload_offsets`), so the
fitted policies upload on a clock, as the every-k heuristics do. Here BS m's upload term is
raised by b[m, j] instead, j = min(slots since its last success, k - 1); before its first
success in the episode j counts from k - 1 - phase_m, so that at +-force the offsets play
`scripts/retry_rules.py`'s nearest-retry-k rule with those phases. The fit: the best on the
validation episodes of the retry rules (k in `--periods`, synchronised and staggered, or in
every phase assignment where k^M <= `--tuned-max`, with
every covered user served and the nearest BS's association, as the run's own starts), then
one pass of the run's pattern walk over b (grid `marl.upload_offsets.grid`, +-force at its
ends). Each saved model keeps what the run fitted (serve, slope); the script prints per seed
the validation and evaluation scores of the run's fit, the best retry start and the walk's
end, and the start's and the walk's gains over the run's fit on `--episodes` held-out
episodes (paired):

    .venv/bin/python scripts/retry_offsets.py --out benchmarks/results/retry_offsets.json
    .venv/bin/python scripts/retry_offsets.py --settings fig3 --episodes 64
"""

from __future__ import annotations

import json
import math

import torch

from dntsync.config import load_config
from dntsync.env.evaluate import Evaluation
from dntsync.marl.learners import QPolicy
from dntsync.marl.offsets import retry_starts as learner_retry_starts
from dntsync.marl.training import RunPaths, load_q_networks
from dntsync.twin.predictor import build_predictor
from offsets_search import settings  # scripts/: the Fig. 3 setting and every sweep point
from retry_rules import need_full_observation, parse_arguments, per_episode, write_rows

torch.set_num_threads(1)


def retry_policy(nets, offsets: torch.Tensor, phases: tuple[int, ...], episode_length: int) -> QPolicy:
    """The greedy policy with BS m's upload term raised by `offsets[m, j]`, j the slots since
    its last success capped at k - 1, counted from k - 1 - phases[m] before its first success
    (`dntsync.marl.networks.with_retry_offsets`)."""
    head_start = offsets.shape[1] - 1 - torch.as_tensor(phases)  # [M]
    return QPolicy(nets, 0.0, name="retry-offsets", retry=(offsets, head_start, episode_length))


def retry_starts(n_bs: int, periods: tuple[int, ...], force: float,
                 tuned_max: int = 0) -> list[tuple[torch.Tensor, tuple[int, ...]]]:
    """`(offsets [M, k], phases)` of nearest-retry-k at +-force, synchronised and staggered,
    or every assignment of the BSs to a first upload slot where k^M <= `tuned_max`: the
    learner's starts (`dntsync.marl.offsets.retry_starts`), each k columns wide, the walk's
    coordinates."""
    return [(offsets, phases) for k in periods
            for _, phases, offsets, _ in learner_retry_starts(n_bs, (k,), force, k, tuned_max)]


def fit(learner, validation: Evaluation, periods: tuple[int, ...], grid: list[float], force: float,
        episode_length: int, tuned_max: int = 0) -> dict:
    """The best retry start on `validation`, then one pass of the walk (team score)."""
    played: dict[tuple, float] = {}

    def score(offsets: torch.Tensor, phases: tuple[int, ...]) -> float:
        key = (phases, offsets.shape[1], *offsets.flatten().tolist())
        if key not in played:
            played[key] = float(per_episode(validation, retry_policy(learner.online, offsets, phases,
                                                                      episode_length)).mean())
        return played[key]

    starts = retry_starts(len(learner.online.agents), periods, force, tuned_max)
    start, phases = max(starts, key=lambda s: score(*s))
    offsets, current = start.clone(), score(start, phases)
    grid = [-float(force), *grid, float(force)]
    for m in range(offsets.shape[0]):
        for j in range(offsets.shape[1]):
            at = grid.index(float(offsets[m, j]))
            best, best_score = at, current
            for step in (1, -1):  # walk up, then down, while the score does not fall
                i, last = at + step, current
                while 0 <= i < len(grid):
                    trial = offsets.clone()
                    trial[m, j] = grid[i]
                    got = score(trial, phases)
                    if got > best_score:
                        best, best_score = i, got
                    if got < last:
                        break
                    last, i = got, i + step
            offsets[m, j] = grid[best]
            current = best_score
    return {"start": start, "start_validation": score(start, phases), "offsets": offsets,
            "phases": phases, "validation": current, "plays": len(played)}


def main() -> int:
    args = parse_arguments(__doc__.splitlines()[0])
    rows = {}
    for label, cfg in settings(load_config()).items():
        if args.settings and label not in args.settings:
            continue
        need_full_observation(cfg)
        predictor, _ = build_predictor(cfg)
        uo, ev, opts = cfg.marl.upload_offsets, cfg.marl.evaluation, cfg.env.observation_options()
        length = cfg.scenario.episode_length
        evaluation = Evaluation(cfg.scenario, predictor, ev.episodes, ev.seed, **opts)
        validation = Evaluation(cfg.scenario, predictor, uo.episodes, uo.seed, **opts)
        holdout = Evaluation(cfg.scenario, predictor, args.episodes, args.seed, **opts)
        rows[label] = []
        for seed in cfg.marl.seeds:
            paths = RunPaths.of(cfg, "vdn", seed)
            learner, _ = load_q_networks(paths.model, cfg)
            run = json.loads(paths.metrics.read_text())
            got = fit(learner, validation, tuple(args.periods), [float(g) for g in uo.grid], uo.force, length,
                      args.tuned_max)
            start = retry_policy(learner.online, got["start"], got["phases"], length)
            walked = retry_policy(learner.online, got["offsets"], got["phases"], length)
            runs_fit = per_episode(holdout, learner.greedy_policy())
            gain = per_episode(holdout, walked) - runs_fit
            start_gain = per_episode(holdout, start) - runs_fit
            row = {"seed": seed, "heuristic": run["best_heuristic"],
                   "heuristic_eval": run["best_heuristic_team_reward"],
                   "run_validation": run.get("upload_offsets", {}).get("validation_after", math.nan),
                   "run_eval": run["eval_team_reward"],
                   "start": f"k {got['start'].shape[1]}, phases {list(got['phases'])}",
                   "start_validation": got["start_validation"],
                   "start_eval": float(per_episode(evaluation, start).mean()),
                   "walk_validation": got["validation"],
                   "walk_eval": float(per_episode(evaluation, walked).mean()),
                   "walk_offsets": got["offsets"].tolist(), "plays": got["plays"],
                   "holdout_gain": float(gain.mean()),
                   "holdout_se": float(gain.std(ddof=1) / math.sqrt(len(gain))),
                   "holdout_start_gain": float(start_gain.mean()),
                   "holdout_start_se": float(start_gain.std(ddof=1) / math.sqrt(len(start_gain)))}
            rows[label].append(row)
            print(f"{label} seed {seed}: run's fit {row['run_validation']:.4f} / {row['run_eval']:.4f}; retry start "
                  f"({row['start']}) {row['start_validation']:.4f} / {row['start_eval']:.4f}; walk "
                  f"{row['walk_validation']:.4f} / {row['walk_eval']:.4f} (validation / evaluation); held-out "
                  f"- run's fit: start {row['holdout_start_gain']:+.4f} ± {row['holdout_start_se']:.4f}, walk "
                  f"{row['holdout_gain']:+.4f} ± {row['holdout_se']:.4f}; {row['heuristic']} "
                  f"{row['heuristic_eval']:.4f}", flush=True)
    write_rows(args, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
