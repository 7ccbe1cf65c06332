"""Channel, rates and upload delay: eqs. (2)-(6).

SPEC.md readings: d is the Euclidean distance clamped below at `min_distance`; the gain is
h = o * d^-2 with o ~ Exp(1) (Rayleigh power fading) drawn independently for every
(user, BS) and (BS, cloud) link each slot; interference on RB n is the received power of
every *other* BS that uses RB n, for a user or for an upload (eqs. 3, 5).

Allocation arrays `alloc[..., M, N]` hold, for RB n of BS m: `FREE` (-1), `UPLOAD` (-2) or a
user index u >= 0. Every function takes a leading batch axis.
"""

from __future__ import annotations

import numpy as np

from dntsync.network.scenario import Scenario

FREE = -1
UPLOAD = -2


def draw_fading(
    scenario: Scenario, rng: np.random.Generator, batch: tuple[int, ...] = ()
) -> tuple[np.ndarray, np.ndarray]:
    """Rayleigh power fading o ~ Exp(1): `fade_user[*batch, M, U]`, `fade_cloud[*batch, M]`."""
    fade_user = rng.exponential(1.0, size=(*batch, scenario.n_bs, scenario.n_users))
    fade_cloud = rng.exponential(1.0, size=(*batch, scenario.n_bs))
    return fade_user, fade_cloud


def user_distances(scenario: Scenario, user_xy: np.ndarray) -> np.ndarray:
    """Unclamped Euclidean distance from every BS to every user, `[..., M, U]`."""
    diff = user_xy[..., None, :, :] - scenario.bs_xy[:, None, :]
    return np.sqrt(np.sum(diff**2, axis=-1))


def coverage(scenario: Scenario, user_xy: np.ndarray) -> np.ndarray:
    """Which users each BS covers (may serve and observes), `[..., M, U]` bool."""
    return user_distances(scenario, user_xy) <= scenario.coverage_radius


def link_gains(
    scenario: Scenario, user_xy: np.ndarray, fade_user: np.ndarray, fade_cloud: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Channel gains h_m(l_u) `[..., M, U]` and h_m(l^C) `[..., M]`: o * d^-exponent."""
    exponent = scenario.path_loss_exponent
    d_user = np.maximum(user_distances(scenario, user_xy), scenario.min_distance)
    d_cloud = np.maximum(
        np.sqrt(np.sum((scenario.bs_xy - scenario.cloud_xy) ** 2, axis=-1)), scenario.min_distance
    )
    return fade_user * d_user**-exponent, fade_cloud * d_cloud**-exponent


def shannon_rate(scenario: Scenario, signal: np.ndarray, interference: np.ndarray) -> np.ndarray:
    """B log2(1 + P h / (I + B N0)); `signal` and `interference` are received powers."""
    return scenario.bandwidth * np.log2(1.0 + signal / (interference + scenario.noise))


def rates(
    scenario: Scenario,
    user_xy: np.ndarray,
    fade_user: np.ndarray,
    fade_cloud: np.ndarray,
    alloc: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-user rates (eq. 2) and per-BS upload rates (eq. 4) under full interference.

    Args:
        user_xy: `[..., U, 2]` user positions.
        fade_user, fade_cloud: `[..., M, U]`, `[..., M]` fading draws o.
        alloc: `[..., M, N]` integers: -1 free, -2 upload, u >= 0 serves user u.
    Returns:
        `(user_rate[..., U], upload_rate[..., M])`. A user holding RBs of several BSs gets the
        sum (eq. 16 penalises that case anyway); a user with no RB gets 0.
    """
    alloc = np.asarray(alloc)
    gain_user, gain_cloud = link_gains(scenario, user_xy, fade_user, fade_cloud)
    n_bs, n_rbs = alloc.shape[-2:]
    batch = alloc.shape[:-2]
    is_user = alloc >= 0
    active = alloc != FREE

    # recv[..., m, n, j]: gain from BS j to the receiver of RB n of BS m (user or cloud).
    user_idx = np.where(is_user, alloc, 0).reshape(*batch, 1, n_bs * n_rbs)
    user_idx = np.broadcast_to(user_idx, (*batch, n_bs, n_bs * n_rbs))
    recv_user = np.take_along_axis(gain_user, user_idx, axis=-1)  # [..., j, m*n]
    recv_user = np.moveaxis(recv_user.reshape(*batch, n_bs, n_bs, n_rbs), -3, -1)
    recv = np.where(is_user[..., None], recv_user, gain_cloud[..., None, None, :])

    others = active.swapaxes(-1, -2)[..., None, :, :] & ~np.eye(n_bs, dtype=bool)[:, None, :]
    interference = scenario.power * np.sum(recv * others, axis=-1)  # eqs. (3), (5)
    signal = scenario.power * np.einsum("...mnm->...mn", recv)
    rb_rate = np.where(active, shannon_rate(scenario, signal, interference), 0.0)

    onehot = alloc[..., None] == np.arange(scenario.n_users)
    user_rate = np.einsum("...mn,...mnu->...u", rb_rate, onehot)
    upload_rate = np.sum(np.where(alloc == UPLOAD, rb_rate, 0.0), axis=-1)
    return user_rate, upload_rate


def upload_size(scenario: Scenario, covered: np.ndarray) -> np.ndarray:
    """D_m = data_per_user * |users in BS m's coverage|, `[..., M]`."""
    return scenario.data_per_user * covered.sum(axis=-1)


def upload_succeeds(
    scenario: Scenario, upload_rate: np.ndarray, uploaded: np.ndarray, covered: np.ndarray
) -> np.ndarray:
    """Eq. (6) with (8g): an upload succeeds iff T_m = D_m / c^C_m <= alpha.

    An upload of nothing (no user in coverage) succeeds trivially; a failed upload still
    spent its RB. Returns `[..., M]` bool.
    """
    size = upload_size(scenario, covered)
    return uploaded & (upload_rate * scenario.delay_limit >= size)
