"""Channel, rates and upload delay: eqs. (2)-(6).

docs/model.md readings: d is the Euclidean distance clamped below at `min_distance`; the gain is
h = o * d^-2 with o ~ Exp(1) (Rayleigh power fading) drawn independently for every
(user, BS) and (BS, cloud) link each slot; interference on RB n is the received power of
every *other* BS that uses RB n, for a user or for an upload (eqs. 3, 5).

Allocation arrays `alloc[..., M, N]` hold, for RB n of BS m: `FREE` (-1), `UPLOAD` (-2) or a
user index u >= 0. Every function takes a leading batch axis.
"""

from __future__ import annotations

import math

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
    # x and y apart: a sum over a length-2 axis is a slow reduction, dx^2 + dy^2 is the same
    # number.
    bs_xy = scenario.bs_xy
    dx = user_xy[..., None, :, 0] - bs_xy[:, 0, None]
    dy = user_xy[..., None, :, 1] - bs_xy[:, 1, None]
    return np.sqrt(dx * dx + dy * dy)


def coverage(
    scenario: Scenario, user_xy: np.ndarray, *, distances: np.ndarray | None = None
) -> np.ndarray:
    """Which users each BS covers (may serve and observes), `[..., M, U]` bool.

    `distances`: `user_distances(scenario, user_xy)` when the caller has it already.
    """
    if distances is None:
        distances = user_distances(scenario, user_xy)
    return distances <= scenario.coverage_radius


def link_gains(
    scenario: Scenario,
    user_xy: np.ndarray,
    fade_user: np.ndarray,
    fade_cloud: np.ndarray,
    *,
    distances: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Channel gains h_m(l_u) `[..., M, U]` and h_m(l^C) `[..., M]`: o * d^-exponent.

    `distances`: `user_distances(scenario, user_xy)` when the caller has it already.
    """
    exponent = scenario.path_loss_exponent
    if distances is None:
        distances = user_distances(scenario, user_xy)
    d_user = np.maximum(distances, scenario.min_distance)
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
    *,
    gains: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-user rates (eq. 2) and per-BS upload rates (eq. 4) under full interference.

    Args:
        user_xy: `[..., U, 2]` user positions.
        fade_user, fade_cloud: `[..., M, U]`, `[..., M]` fading draws o.
        alloc: `[..., M, N]` integers: -1 free, -2 upload, u >= 0 serves user u.
        gains: `link_gains(scenario, user_xy, fade_user, fade_cloud)` when the caller has it.
    Returns:
        `(user_rate[..., U], upload_rate[..., M])`. A user holding RBs of several BSs gets the
        sum (eq. 16 penalises that case anyway); a user with no RB gets 0.
    """
    alloc = np.asarray(alloc)
    if gains is None:
        gains = link_gains(scenario, user_xy, fade_user, fade_cloud)
    n_bs, n_rbs = alloc.shape[-2:]
    n_users = scenario.n_users
    batch = alloc.shape[:-2]
    flat = math.prod(batch)
    if alloc.size and alloc.max() >= n_users:
        raise IndexError(f"alloc holds user {alloc.max()}; the scenario has U = {n_users}")
    is_user = alloc >= 0
    active = alloc != FREE

    # recv[f, m, j, n]: gain from BS j to the receiver of RB n of BS m (user or cloud), in one
    # flat gather from a table whose column u < U holds user u's gain and column U the
    # cloud's; an upload or free RB reads the cloud column (free ones are masked below).
    # This memory order makes numpy sum over j in the same order as it always has (so
    # results stay bit-identical): one j after another, or pairwise when N = 1.
    gain_user = np.broadcast_to(gains[0], (*batch, n_bs, n_users)).reshape(flat, n_bs, n_users)
    gain_cloud = np.broadcast_to(gains[1], (*batch, n_bs)).reshape(flat, n_bs, 1)
    table = np.concatenate([gain_user, gain_cloud], axis=-1)  # [F, M, U+1]
    receiver = np.where(is_user, alloc, n_users).reshape(flat, n_bs, 1, n_rbs)
    row = (n_users + 1) * np.arange(flat * n_bs).reshape(flat, 1, n_bs, 1)
    recv = table.take(row + receiver)  # [F, M, M, N]

    # others[f, m, j, n]: BS j != m uses RB n, so it interferes there.
    others = active.reshape(flat, 1, n_bs, n_rbs) & ~np.eye(n_bs, dtype=bool)[:, :, None]
    interference = scenario.power * np.sum(recv * others, axis=2)  # eqs. (3), (5)
    signal = scenario.power * np.einsum("fmmn->fmn", recv)
    rb_rate = shannon_rate(scenario, signal, interference).reshape(*batch, n_bs, n_rbs)
    rb_rate = np.where(active, rb_rate, 0.0)

    if n_users == 1:
        # numpy sums a single user's RBs in a blocked order of its own; keep that sum so the
        # results stay bit-identical.
        user_rate = np.einsum("...mn,...mnu->...u", rb_rate, alloc[..., None] == 0)
    else:
        # Scatter-add each user's RB rates in (m, n) order, the order numpy's one-hot sum
        # used (so results stay bit-identical); bincount gives integers when no RB serves
        # a user, hence the cast.
        slot = alloc.reshape(flat, n_bs * n_rbs) + n_users * np.arange(flat)[:, None]
        held = is_user.reshape(flat, n_bs * n_rbs)
        user_rate = np.bincount(slot[held], weights=rb_rate.reshape(flat, -1)[held],
                                minlength=flat * n_users)
        user_rate = user_rate.astype(np.float64, copy=False).reshape(*batch, n_users)
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
