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

import numpy as np
import torch

from dntsync.env.actions import decode, encode
from dntsync.env.core import DntEnv, SlotState
from dntsync.env.evaluate import Evaluation, rollout


def serving_profile(policy, env: DntEnv, seed: int) -> list[dict[str, float]]:
    """Per BS: share of slots it uploads, share of its single-covered users it serves and
    share of its users in an overlap (covered by several BSs) it serves."""
    episodes = rollout(env, policy, seed=seed, record=True)
    upload, serve = decode(episodes.actions, env.scenario.n_users)  # [B, T, M], [B, T, M, U]
    covered = episodes.covered
    n_covering = covered.sum(axis=2, keepdims=True)  # [B, T, 1, U]
    single, overlap = covered & (n_covering == 1), covered & (n_covering > 1)
    out = []
    for m in range(env.n_agents):
        out.append({
            "upload": float(upload[:, :, m].mean()),
            "served_single": float(serve[:, :, m][single[:, :, m]].mean())
            if single[:, :, m].any() else float("nan"),
            "served_overlap": float(serve[:, :, m][overlap[:, :, m]].mean())
            if overlap[:, :, m].any() else float("nan"),
        })
    return out


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
def diagnose(learner, env: DntEnv, evaluation: Evaluation, seed: int) -> dict:
    """`serving_profile` of the learner's greedy policy and the reference policies' results."""
    lazy = middle_bs(env.scenario.bs_positions)
    refs = reference_policies(evaluation, lazy)
    return {
        "profile": serving_profile(learner.greedy_policy(), env, seed),
        "learner_team_reward": evaluation.run(learner.greedy_policy())["team_reward"]["mean"],
        "lazy_bs": lazy,
        "reference": {k: v["team_reward"]["mean"] for k, v in refs.items()},
    }
