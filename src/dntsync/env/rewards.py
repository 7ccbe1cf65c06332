"""Twin synchronisation (eq. 7) and rewards: team reward (eq. 16) and local reward (eq. 37),
and their DNT-error terms alone (`error_terms`, what a learner's separate error value fits).

Pure functions of arrays with a leading batch axis. docs/model.md readings:
- the DNT position of user u is its true position if any BS covering it uploaded
  successfully this slot, else the twin's prediction s-hat_t;
- eq. (16)'s condition "for all u, xi_u = 1" is read as "no user served twice" (it cannot
  hold for a user outside every coverage);
- a BS's local reward is eq. (16) restricted to it: the DNT error of the users in its
  coverage and the rates of the users it serves, or rho * xi_u summed over its served users
  that another BS also serves.
"""

from __future__ import annotations

import numpy as np

from dntsync.network.scenario import Scenario


def dnt_status(user_xy: np.ndarray, prediction: np.ndarray, covered: np.ndarray,
               upload_ok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eq. (7): the DNT status s-bar_t `[..., U, 2]` and which users were synced `[..., U]`."""
    synced = np.any(covered & upload_ok[..., :, None], axis=-2)
    return np.where(synced[..., None], user_xy, prediction), synced


def squared_error(user_xy: np.ndarray, dnt_xy: np.ndarray) -> np.ndarray:
    """Per-user squared DNT error ||s_u - s-bar_u||^2, `[..., U]`."""
    diff = user_xy - dnt_xy
    dx, dy = diff[..., 0], diff[..., 1]
    return dx * dx + dy * dy  # not a sum over the length-2 axis: that is a slow reduction


def served_count(serve: np.ndarray) -> np.ndarray:
    """xi_u, the number of BSs serving user u: `serve[..., M, U] -> [..., U]`."""
    return np.sum(serve, axis=-2)


def team_reward(scenario: Scenario, sq_error: np.ndarray, user_rate: np.ndarray,
                serve: np.ndarray) -> np.ndarray:
    """Eq. (16): `-(1-eps)/U ||s - s-bar||^2 + eps * sum_u c_u`, or `rho * sum_{xi_u>1} xi_u`."""
    xi = served_count(serve)
    twice = xi > 1
    penalty = scenario.rho * np.sum(np.where(twice, xi, 0), axis=-1)
    normal = (-(1 - scenario.eps) / scenario.n_users * np.sum(sq_error, axis=-1)
              + scenario.eps * np.sum(user_rate, axis=-1))
    return np.where(np.any(twice, axis=-1), penalty, normal)


def local_rewards(scenario: Scenario, sq_error: np.ndarray, user_rate: np.ndarray,
                  serve: np.ndarray, covered: np.ndarray) -> np.ndarray:
    """Eq. (37) local reward of every BS, `[..., M]` (eq. 16 restricted to BS m)."""
    xi = served_count(serve)[..., None, :]  # [..., 1, U]
    conflict = serve & (xi > 1)  # [..., M, U]
    penalty = scenario.rho * np.sum(np.where(conflict, xi, 0), axis=-1)
    normal = (-(1 - scenario.eps) / scenario.n_users * np.sum(sq_error[..., None, :] * covered, axis=-1)
              + scenario.eps * np.sum(user_rate[..., None, :] * serve, axis=-1))
    return np.where(np.any(conflict, axis=-1), penalty, normal)


def error_terms(scenario: Scenario, sq_error: np.ndarray, serve: np.ndarray,
                covered: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The DNT-error terms of eq. (16) `[...]` and of each BS's eq. (37) `[..., M]`:
    -(1-eps)/U times the squared error summed over all users (over the BS's covered users for
    a local one), and 0 where the penalty replaces that reward. So a reward less its error
    term is its rate term eps * sum c_u, or the penalty."""
    weight = -(1 - scenario.eps) / scenario.n_users
    xi = served_count(serve)
    team = np.where(np.any(xi > 1, axis=-1), 0.0, weight * np.sum(sq_error, axis=-1))
    conflict = np.any(serve & (xi[..., None, :] > 1), axis=-1)
    local = np.where(conflict, 0.0, weight * np.sum(sq_error[..., None, :] * covered, axis=-1))
    return team, local
