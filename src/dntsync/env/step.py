"""One slot of the network given every BS's decision: Algorithm 1, eqs. (2)-(7), (16), (37).

`resolve` is a pure function of arrays (batch axis first) used by the environment and by the
centralised oracle, so both see exactly the same physics.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dntsync.env.rewards import dnt_status, local_rewards, served_count, squared_error, team_reward
from dntsync.network.allocation import allocate
from dntsync.network.radio import coverage, link_gains, rates, upload_succeeds, user_distances
from dntsync.network.scenario import Scenario


@dataclass(frozen=True)
class Outcome:
    alloc: np.ndarray  # [..., M, N]
    user_rate: np.ndarray  # [..., U]
    upload_rate: np.ndarray  # [..., M]
    upload: np.ndarray  # [..., M] bool
    upload_ok: np.ndarray  # [..., M] bool
    serve: np.ndarray  # [..., M, U] bool, after masking by coverage
    dnt_xy: np.ndarray  # [..., U, 2] s-bar_t
    synced: np.ndarray  # [..., U] bool
    sq_error: np.ndarray  # [..., U]
    team_reward: np.ndarray  # [...]
    local_rewards: np.ndarray  # [..., M]

    def metrics(self) -> dict[str, np.ndarray]:
        """Per-step scalars for logging: sum rate, DNT error, uploads, conflicts."""
        n_users = self.sq_error.shape[-1]
        return {
            "sum_rate": self.user_rate.sum(axis=-1),
            # mean over users of ||s_u - s-bar_u||^2 (the DNT term of eq. 16 without weight)
            "dnt_error": self.sq_error.sum(axis=-1) / n_users,
            "uploads": self.upload.sum(axis=-1),
            "failed_uploads": (self.upload & ~self.upload_ok).sum(axis=-1),
            "served_twice": (served_count(self.serve) > 1).sum(axis=-1),
            "team_reward": self.team_reward,
        }


def resolve(
    scenario: Scenario,
    user_xy: np.ndarray,
    fade_user: np.ndarray,
    fade_cloud: np.ndarray,
    covered: np.ndarray,
    prediction: np.ndarray,
    upload: np.ndarray,
    serve: np.ndarray,
) -> Outcome:
    """Play one slot: allocate RBs, compute rates, uploads, the DNT status and rewards.

    Serve bits of users outside a BS's coverage are dropped (masked actions).
    """
    serve = np.asarray(serve, dtype=bool) & covered
    upload = np.asarray(upload, dtype=bool)
    # Distances and gains once per slot, shared by Algorithm 1 and the final rates.
    distances = user_distances(scenario, user_xy)
    gains = link_gains(scenario, user_xy, fade_user, fade_cloud, distances=distances)
    alloc = allocate(scenario, user_xy, fade_user, fade_cloud, serve, upload, gains=gains,
                     covered=coverage(scenario, user_xy, distances=distances))
    user_rate, upload_rate = rates(scenario, user_xy, fade_user, fade_cloud, alloc, gains=gains)
    upload_ok = upload_succeeds(scenario, upload_rate, upload, covered)
    dnt_xy, synced = dnt_status(user_xy, prediction, covered, upload_ok)
    sq_error = squared_error(user_xy, dnt_xy)
    return Outcome(
        alloc=alloc, user_rate=user_rate, upload_rate=upload_rate, upload=upload,
        upload_ok=upload_ok, serve=serve, dnt_xy=dnt_xy, synced=synced, sq_error=sq_error,
        team_reward=team_reward(scenario, sq_error, user_rate, serve),
        local_rewards=local_rewards(scenario, sq_error, user_rate, serve, covered),
    )
