"""Why a learner falls short: whom each BS serves, beside two fixed reference policies.

The learners' greedy policies tend to settle where no user is ever served twice without
looking at where a user is: the outer BSs serve every covered user and the middle BS, whose
coverage overlaps both of theirs, serves nobody (a "lazy" agent). `serving_profile` measures
that on evaluation episodes, per BS, separately for users only that BS covers and users
several BSs cover; `reference_policies` plays two position-aware fixed policies on the same
episodes, so the cost of the lazy equilibrium is a number, not a guess:

- `outer-only`: every BS but `lazy_bs` serves all its covered users (the lazy equilibrium);
- `all-but-overlap`: the same, and `lazy_bs` also serves the users only it covers.

Both upload every slot, as the learners end up doing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dntsync.config import Config
from dntsync.env.actions import decode, encode
from dntsync.env.core import SlotState
from dntsync.env.evaluate import Evaluation, as_episode_policy, rollout, summarise
from dntsync.metrics import METRICS


def serving_profile(policy, evaluation: Evaluation) -> tuple[list[dict[str, float]], float]:
    """Per BS: share of slots it uploads, share of its single-covered users it serves and
    share of its users in an overlap (covered by several BSs) it serves; and the policy's
    mean team reward, from the same play of `evaluation`'s episodes (as `Evaluation.run`)."""
    policy = as_episode_policy(policy)
    played = [rollout(env, policy, seed=s, record=True)
              for env, s in zip(evaluation.envs, evaluation.seeds)]
    n_users = evaluation.envs[0].scenario.n_users
    upload, serve = decode(np.concatenate([p.actions for p in played]), n_users)
    covered = np.concatenate([p.covered for p in played])  # [B, T, M, U]
    n_covering = covered.sum(axis=2, keepdims=True)  # [B, T, 1, U]
    single, overlap = covered & (n_covering == 1), covered & (n_covering > 1)

    def share(m: int, mask: np.ndarray) -> float:  # of BS m's users under `mask`
        return float(serve[:, :, m][mask[:, :, m]].mean()) if mask[:, :, m].any() else float("nan")

    profile = [{"upload": float(upload[:, :, m].mean()),
                "served_single": share(m, single), "served_overlap": share(m, overlap)}
               for m in range(covered.shape[2])]
    steps = summarise({k: np.concatenate([p.steps[k] for p in played]) for k in METRICS})
    return profile, steps["team_reward"]["mean"]


class _FixedPolicy:
    """Upload always; serve every covered user, except that `lazy_bs` serves nobody
    (`mode="outer-only"`) or only the users no other BS covers (`"all-but-overlap"`)."""

    def __init__(self, name: str, lazy_bs: int) -> None:
        self.name, self.lazy_bs = name, lazy_bs

    def begin_episode(self, n_envs: int) -> None:
        pass

    def act(self, state: SlotState, obs: np.ndarray) -> np.ndarray:
        covered = state.covered  # [B, M, U]
        serve = covered.copy()
        if self.name == "outer-only":
            serve[:, self.lazy_bs] = False
        else:
            serve[:, self.lazy_bs] &= covered.sum(axis=1) == 1
        return encode(np.ones(covered.shape[:2], dtype=bool), serve)


def reference_policies(evaluation: Evaluation, lazy_bs: int) -> dict[str, dict]:
    """The two fixed policies on the learners' evaluation episodes (`Evaluation.run`)."""
    return {name: evaluation.run(_FixedPolicy(name, lazy_bs))
            for name in ("outer-only", "all-but-overlap")}


def middle_bs(positions) -> int:
    """The BS whose x is the median (the one that overlaps both neighbours on a line)."""
    xs = np.asarray(positions, dtype=float)[:, 0]
    return int(np.argsort(xs)[len(xs) // 2])


@torch.no_grad()
def diagnose(learner, evaluation: Evaluation) -> dict:
    """`serving_profile` of the learner's greedy policy and the reference policies' results,
    all on `evaluation`'s episodes."""
    lazy = middle_bs(evaluation.envs[0].scenario.bs_positions)
    profile, reward = serving_profile(learner.greedy_policy(), evaluation)
    return {
        "profile": profile,
        "learner_team_reward": reward,
        "lazy_bs": lazy,
        "reference": {k: v["team_reward"]["mean"]
                      for k, v in reference_policies(evaluation, lazy).items()},
    }


def diagnose_model(cfg: Config, path: Path) -> dict:
    """The diagnosis of one saved model (`dntsync diagnose-learner`) on `cfg`'s evaluation episodes;
    "warning" says when `cfg`'s predictor differs from the one the model was trained with."""
    from dntsync.marl.training import load_q_networks
    from dntsync.twin.predictor import build_predictor

    learner, trained = load_q_networks(path, cfg)
    algo = trained["algo"]
    predictor, description = build_predictor(cfg)
    mc = cfg.marl
    evaluation = Evaluation(cfg.scenario, predictor, mc.evaluation.episodes, mc.evaluation.seed,
                            **cfg.env.observation_options())
    warning = None
    if trained.get("predictor") != description:
        warning = (f"{path} was trained with predictor {trained.get('predictor')!r}, played here "
                   f"with {description!r}: pass the same --set/--config as its training")
    return {"model": str(path), "algo": algo, "predictor": description, "warning": warning,
            **diagnose(learner, evaluation)}
