"""Fig. 6 data: one evaluation episode, slot by slot, of the trained VDN and IQL models.

The models are the Fig. 5 sweep's at `sweeps.fig6_value` users (eps 0.25, N 12 by
default, the paper's Fig. 6 setting). Every (learner, seed) model, and the heuristics and
the oracle, play the same episode (`sweeps.fig6_episode_seed`); per slot we record how many
BSs updated the DNT (successful uploads), how many tried, the DNT error, the sum rate and the
team reward. Written to `metrics/fig6_episode.json`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dntsync.config import Config
from dntsync.env.core import DntEnv
from dntsync.env.evaluate import as_episode_policy, rollout
from dntsync.env.policies import MyopicOracle, NearestBS
from dntsync.errors import UserError
from dntsync.files import write_json
from dntsync.stages.common import point_config, sweep_points, write_episode
from dntsync.twin.predictor import build_predictor

OUT = Path("metrics/fig6_episode.json")


def per_slot(env: DntEnv, policy, seed: int) -> dict[str, list[float]]:
    """One episode of `policy` in a one-environment batch: every metric per slot."""
    steps = rollout(env, as_episode_policy(policy), seed=seed).steps
    out = {k: v[0].tolist() for k, v in steps.items()}
    out["dnt_updates"] = (steps["uploads"][0] - steps["failed_uploads"][0]).tolist()
    return out


def trace(cfg: Config) -> dict:
    from dntsync.marl.training import RunPaths, load_q_networks

    point = next(p for p in sweep_points(cfg, "fig5") if p.value == cfg.sweeps.fig6_value)
    pcfg = point_config(cfg, point)
    predictor, description = build_predictor(pcfg)
    env = DntEnv(pcfg.scenario, predictor, n_envs=1, **pcfg.env.observation_options())
    seed = cfg.sweeps.fig6_episode_seed
    learners: dict[str, dict] = {}
    for algo in cfg.sweeps.algos:
        runs = []
        for s in cfg.marl.seeds:
            path = RunPaths.of(pcfg, algo, s).model
            if not path.exists():
                raise UserError(f"{path} is missing; run `dntsync sweep fig5` first")
            learner, _ = load_q_networks(path, pcfg)
            runs.append(per_slot(env, learner.greedy_policy(), seed))
        learners[algo] = {k: [r[k] for r in runs] for k in runs[0]}
    # the references Fig. 6 shows
    sc = pcfg.scenario
    references = [NearestBS(sc, "always"), NearestBS(sc, 5), MyopicOracle(sc)]
    baselines = {p.name: per_slot(env, p, seed) for p in references}
    return {"point": point.label, "overrides": list(point.overrides), "predictor": description,
            "episode_seed": seed, "seeds": list(cfg.marl.seeds),
            "slots": int(pcfg.scenario.episode_length), "learners": learners,
            "baselines": baselines,
            "summary": {a: {k: float(np.mean(v)) for k, v in d.items()} for a, d in learners.items()}}


def run(cfg: Config, args) -> int:
    data = trace(cfg)
    write_json(OUT, data)
    write_episode(data)
    errors = ", ".join(f"{a} mean DNT error {s['dnt_error']:.3f}" for a, s in data["summary"].items())
    print(f"wrote {OUT}: {errors}")
    return 0
