"""Algorithm 1: sequential per-BS RB allocation with the Hungarian algorithm (eqs. 17-18).

BSs act in index order. BS m knows the RB use of BSs 0..m-1 only (the allocations they
passed on). If it uploads, it takes the free RB with the highest upload rate given that
knowledge; it then matches its remaining RBs to the users it chose to serve by a
maximum-weight bipartite matching whose weights are the eq. (2) rates given that knowledge
(`scipy.optimize.linear_sum_assignment`). A chosen user left without an RB gets nothing.

Speed without changing the answer: an RB that no earlier BS uses is interference-free, so
it gives every user its best possible rate. When a BS has at least as many such RBs as
chosen users, giving each user one of them (in index order) attains the upper bound
sum_u max_n w[u, n], so it is an optimal matching and needs no solver. Only the remaining
batch entries go to scipy, one call each, with their weights computed for all of them at once.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import linear_sum_assignment

from dntsync.network.radio import FREE, UPLOAD, coverage, link_gains, shannon_rate
from dntsync.network.scenario import Scenario


def allocate(
    scenario: Scenario,
    user_xy: np.ndarray,
    fade_user: np.ndarray,
    fade_cloud: np.ndarray,
    serve: np.ndarray,
    upload: np.ndarray,
    *,
    gains: tuple[np.ndarray, np.ndarray] | None = None,
    covered: np.ndarray | None = None,
) -> np.ndarray:
    """RB allocation of every BS by Algorithm 1.

    Args:
        user_xy: `[..., U, 2]`; fade_user `[..., M, U]`; fade_cloud `[..., M]`.
        serve: `[..., M, U]` bool, z_m: the users BS m chose to serve. Users outside BS m's
            coverage are dropped (a BS can serve only users in its coverage).
        upload: `[..., M]` bool, |y_m|: whether BS m uploads to the twin.
        gains, covered: `link_gains(...)` and `coverage(scenario, user_xy)` when the caller
            has them already (they are recomputed otherwise).
    Returns:
        `alloc[..., M, N]` int: -1 free, -2 upload, u >= 0 serves user u.
    """
    batch = np.shape(user_xy)[:-2]
    n_bs, n_users, n_rbs = scenario.n_bs, scenario.n_users, scenario.n_rbs
    flat = math.prod(batch)
    user_xy = np.reshape(user_xy, (flat, n_users, 2))
    fade_user = np.reshape(fade_user, (flat, n_bs, n_users))
    fade_cloud = np.reshape(fade_cloud, (flat, n_bs))
    serve = np.reshape(np.asarray(serve, dtype=bool), (flat, n_bs, n_users))
    upload = np.reshape(np.asarray(upload, dtype=bool), (flat, n_bs))

    if gains is None:
        gains = link_gains(scenario, user_xy, fade_user, fade_cloud)
    if covered is None:
        covered = coverage(scenario, user_xy)
    gain_user = np.reshape(gains[0], (flat, n_bs, n_users))
    gain_cloud = np.reshape(gains[1], (flat, n_bs))
    serve = serve & np.reshape(covered, (flat, n_bs, n_users))
    # rank[b, m, u]: how many users BS m chose before user u; the last entry + 1 counts them.
    rank = np.cumsum(serve, axis=-1) - 1
    alloc = np.full((flat, n_bs, n_rbs), FREE, dtype=np.int64)
    used = np.zeros((flat, n_rbs), dtype=bool)  # RBs some earlier BS uses
    rb_index = np.arange(n_rbs)
    rows = np.arange(flat)

    for m in range(n_bs):
        earlier = alloc[:, :m, :] != FREE  # [B, m, N]: what BS m knows
        # Upload RB: the highest eq. (4) rate given the earlier BSs' RB use (ties: lowest n).
        cloud_interference = scenario.power * np.einsum("bjn,bj->bn", earlier, gain_cloud[:, :m])
        upload_rate = shannon_rate(scenario, scenario.power * gain_cloud[:, m, None], cloud_interference)
        upload_rb = np.argmax(upload_rate, axis=-1)
        uploading = upload[:, m]
        alloc[rows[uploading], m, upload_rb[uploading]] = UPLOAD
        available = ~(uploading[:, None] & (rb_index == upload_rb[:, None]))  # [B, N]

        chosen = serve[:, m, :]  # [B, U]
        n_chosen = rank[:, m, -1] + 1
        clean = available & ~used  # interference-free RBs
        n_clean = clean.sum(axis=-1)
        fast = n_chosen <= n_clean

        # Fast path: the k-th chosen user takes the k-th clean RB (optimal, see module doc).
        b_idx, u_idx = np.nonzero(chosen & fast[:, None])
        if b_idx.size:
            # The clean RBs of all rows in row-major order; row b's k-th is at first[b] + k.
            clean_rb = np.nonzero(clean)[1]
            first = np.cumsum(n_clean) - n_clean
            alloc[b_idx, m, clean_rb[first[b_idx] + rank[b_idx, m, u_idx]]] = u_idx

        # General case: maximum-weight matching with eq. (2) weights (eq. 18). The weights of
        # every such batch entry in two array operations; scipy then takes one entry at a time.
        slow = np.flatnonzero(~fast & (n_chosen > 0))
        if slow.size:
            interference = scenario.power * np.einsum("bjn,bju->bun", earlier[slow], gain_user[slow, :m])
            weight = shannon_rate(scenario, scenario.power * gain_user[slow, m, :, None], interference)
            slow_available = available[slow]
            users_of = np.split(np.nonzero(chosen[slow])[1], np.cumsum(n_chosen[slow])[:-1])
            rbs_of = np.split(np.nonzero(slow_available)[1], np.cumsum(slow_available.sum(axis=-1))[:-1])
            at_row, at_rb, at_user = [], [], []
            for b, w, users, rbs in zip(slow, weight, users_of, rbs_of):
                r, c = linear_sum_assignment(w[users][:, rbs], maximize=True)
                at_row.append(np.full(r.size, b))
                at_rb.append(rbs[c])
                at_user.append(users[r])
            alloc[np.concatenate(at_row), m, np.concatenate(at_rb)] = np.concatenate(at_user)
        used |= alloc[:, m, :] != FREE
    return alloc.reshape(*batch, n_bs, n_rbs)
