"""Algorithm 1 (`allocate`) against brute force, and constraints (8b)-(8f) as properties."""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from dntsync.network import FREE, UPLOAD, Scenario, allocate, coverage

BS_LAYOUTS = {
    2: ((-100.0, 0.0), (0.0, 0.0)),
    3: ((-100.0, 0.0), (0.0, 0.0), (100.0, 0.0)),
}


# ------------------------------------------------------------------ an independent reference
def _gains(sc: Scenario, user_xy, fade_user, fade_cloud):
    """h = o * max(d, d_min)^-exponent for user links [M, U] and cloud links [M]."""
    bs = np.array(sc.bs_positions)
    d_user = np.hypot(user_xy[None, :, 0] - bs[:, None, 0], user_xy[None, :, 1] - bs[:, None, 1])
    d_cloud = np.hypot(bs[:, 0] - sc.cloud_position[0], bs[:, 1] - sc.cloud_position[1])
    d_user = np.maximum(d_user, sc.min_distance)
    d_cloud = np.maximum(d_cloud, sc.min_distance)
    return fade_user * d_user ** -sc.path_loss_exponent, fade_cloud * d_cloud ** -sc.path_loss_exponent


def _rate(sc: Scenario, gain: float, interference_gain: float) -> float:
    noise = sc.bandwidth * sc.noise_density
    return sc.bandwidth * np.log2(1 + sc.power * gain / (sc.power * interference_gain + noise))


def _check_against_brute_force(sc, user_xy, fade_user, fade_cloud, serve, upload, alloc) -> dict:
    """Check BS m's upload RB and matching given the returned allocation of BSs 0..m-1.

    Returns which code path BS m's case needed (all chosen users fit on clean RBs or not)
    and whether users outnumbered the available RBs, so callers can assert coverage.
    """
    gain_user, gain_cloud = _gains(sc, user_xy, fade_user, fade_cloud)
    covered = coverage(sc, user_xy)
    seen = {"clean": 0, "contested": 0, "overloaded": 0}
    for m in range(sc.n_bs):
        used_before = alloc[:m] != FREE  # [m, N]
        row = alloc[m]
        # upload RB: argmax of the eq. (4) rate given earlier BSs' RB use
        upload_rbs = np.nonzero(row == UPLOAD)[0]
        assert len(upload_rbs) == int(upload[m])
        upload_rate = [_rate(sc, gain_cloud[m], float(np.sum(gain_cloud[:m] * used_before[:, n])))
                       for n in range(sc.n_rbs)]
        if upload[m]:
            assert upload_rate[upload_rbs[0]] >= max(upload_rate) * (1 - 1e-12)
        available = [n for n in range(sc.n_rbs) if row[n] != UPLOAD]
        chosen = [u for u in range(sc.n_users) if serve[m, u] and covered[m, u]]
        weight = {(u, n): _rate(sc, gain_user[m, u],
                                float(np.sum(gain_user[:m, u] * used_before[:, n])))
                  for u in chosen for n in available}
        served = {int(row[n]): n for n in available if row[n] >= 0}
        assert len(served) == sum(row >= 0), "a user holds two RBs of one BS"
        assert set(served) <= set(chosen)
        k = min(len(chosen), len(available))
        assert len(served) == k, "a chosen user waits while an RB of its BS is free"
        got = sum(weight[u, n] for u, n in served.items())
        if len(chosen) <= len(available):
            best = max((sum(weight[u, n] for u, n in zip(chosen, perm))
                        for perm in itertools.permutations(available, len(chosen))), default=0.0)
        else:
            best = max(sum(weight[u, n] for u, n in zip(perm, available))
                       for perm in itertools.permutations(chosen, len(available)))
            seen["overloaded"] += 1
        assert abs(got - best) <= 1e-9 * max(1.0, best), (m, got, best)
        n_clean = sum(1 for n in available if not used_before[:, n].any())
        if chosen:
            seen["clean" if len(chosen) <= n_clean else "contested"] += 1
    return seen


def _random_case(rng, n_bs, n_users, n_rbs, p_serve, p_upload, radius=80.0):
    sc = Scenario(bs_positions=BS_LAYOUTS[n_bs], n_users=n_users, n_rbs=n_rbs,
                  coverage_radius=radius)
    bs = np.array(sc.bs_positions)
    near = bs[rng.integers(0, n_bs, n_users)]
    user_xy = np.clip(near + rng.normal(0, 40, (n_users, 2)), sc.area_low, sc.area_high)
    fade_user = rng.exponential(size=(n_bs, n_users))
    fade_cloud = rng.exponential(size=n_bs)
    serve = rng.random((n_bs, n_users)) < p_serve
    upload = rng.random(n_bs) < p_upload
    return sc, user_xy, fade_user, fade_cloud, serve, upload


def test_allocation_matches_brute_force_on_random_small_cases():
    rng = np.random.default_rng(2024)
    seen = {"clean": 0, "contested": 0, "overloaded": 0}
    for _ in range(150):
        n_bs = int(rng.integers(2, 4))
        n_users = int(rng.integers(1, 6))
        n_rbs = int(rng.integers(1, 5))
        case = _random_case(rng, n_bs, n_users, n_rbs, p_serve=rng.uniform(0.3, 1.0),
                            p_upload=0.5)
        alloc = allocate(*case)
        for key, count in _check_against_brute_force(*case, alloc).items():
            seen[key] += count
    # both code paths (clean RBs only, and the scipy matching) and overload were exercised
    assert min(seen.values()) >= 10, seen


def test_allocation_under_heavy_load_uses_the_matching():
    """Every covered user chosen by every BS: later BSs must match on contested RBs."""
    rng = np.random.default_rng(7)
    seen = {"clean": 0, "contested": 0, "overloaded": 0}
    for _ in range(40):
        n_bs = int(rng.integers(2, 4))
        case = _random_case(rng, n_bs, n_users=5, n_rbs=int(rng.integers(2, 5)),
                            p_serve=1.0, p_upload=0.7, radius=150.0)
        alloc = allocate(*case)
        for key, count in _check_against_brute_force(*case, alloc).items():
            seen[key] += count
    assert seen["contested"] >= 40 and seen["overloaded"] >= 20, seen


def test_allocation_batched_equals_per_element():
    rng = np.random.default_rng(3)
    cases = [_random_case(rng, 3, 5, 3, p_serve=0.8, p_upload=0.5) for _ in range(6)]
    sc = cases[0][0]
    stack = [np.stack([c[i] for c in cases]).reshape(2, 3, *np.shape(cases[0][i]))
             for i in range(1, 6)]
    alloc = allocate(sc, *stack)
    assert alloc.shape == (2, 3, sc.n_bs, sc.n_rbs)
    for i, case in enumerate(cases):
        np.testing.assert_array_equal(alloc.reshape(6, sc.n_bs, sc.n_rbs)[i], allocate(sc, *case[1:]))


def test_allocation_hand_case_prefers_the_clean_rb(two_bs):
    """BS 0 uploads; BS 1 must put its upload on the RB BS 0 leaves free, then serve u1 on the
    RB shared with BS 0's upload (the only one left)."""
    users = np.array([[-90.0, 0.0], [0.0, 20.0]])
    alloc = allocate(two_bs, users, np.ones((2, 2)), np.ones(2),
                     serve=np.array([[False, False], [False, True]]),
                     upload=np.array([True, True]))
    assert alloc.tolist() == [[UPLOAD, FREE], [1, UPLOAD]]
    alloc = allocate(two_bs, users, np.ones((2, 2)), np.ones(2),
                     serve=np.array([[True, False], [False, True]]),
                     upload=np.array([False, False]))
    assert alloc.tolist() == [[0, FREE], [FREE, 1]]  # BS 1 avoids the RB BS 0 uses


def test_uncovered_users_get_nothing(two_bs):
    users = np.array([[-140.0, 0.0], [140.0, 40.0]])  # u0 only near BS 0; u1 far from both
    alloc = allocate(two_bs, users, np.ones((2, 2)), np.ones(2),
                     serve=np.ones((2, 2), dtype=bool), upload=np.zeros(2, dtype=bool))
    assert alloc.tolist() == [[0, FREE], [FREE, FREE]]


# ------------------------------------------------------------------ constraints (8b)-(8f)
@st.composite
def allocation_cases(draw):
    n_bs = draw(st.integers(1, 3))
    n_users = draw(st.integers(1, 6))
    n_rbs = draw(st.integers(1, 5))
    radius = draw(st.sampled_from([20.0, 60.0, 150.0]))
    seed = draw(st.integers(0, 2**32 - 1))
    p_serve = draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
    batch = draw(st.integers(1, 4))
    positions = ((-100.0, 0.0), (0.0, 0.0), (100.0, 0.0))[:n_bs]
    sc = Scenario(bs_positions=positions, n_users=n_users, n_rbs=n_rbs, coverage_radius=radius)
    rng = np.random.default_rng(seed)
    user_xy = rng.uniform(sc.area_low, sc.area_high, (batch, n_users, 2))
    fade_user = rng.exponential(size=(batch, n_bs, n_users))
    fade_cloud = rng.exponential(size=(batch, n_bs))
    serve = rng.random((batch, n_bs, n_users)) < p_serve
    upload = rng.random((batch, n_bs)) < 0.5
    return sc, user_xy, fade_user, fade_cloud, serve, upload


def _first_bs_only(serve: np.ndarray) -> np.ndarray:
    """Keep, for each user, only the first BS that chose it (no double-serve)."""
    first = np.cumsum(serve, axis=-2) == 1
    return serve & first


@settings(max_examples=80, deadline=None)
@given(allocation_cases())
def test_allocation_satisfies_constraints(case):
    sc, user_xy, fade_user, fade_cloud, serve, upload = case
    covered = coverage(sc, user_xy)
    for serve_bits, single in ((serve, False), (_first_bs_only(serve), True)):
        alloc = allocate(sc, user_xy, fade_user, fade_cloud, serve_bits, upload)
        assert alloc.shape == (*user_xy.shape[:-2], sc.n_bs, sc.n_rbs)
        # each RB holds nothing, the upload, or one valid user index
        assert np.all((alloc >= UPLOAD) & (alloc < sc.n_users))
        onehot = alloc[..., None] == np.arange(sc.n_users)  # [B, M, N, U]
        per_bs = onehot.sum(axis=-2)  # [B, M, U]
        assert np.all(per_bs <= 1)  # (8b) one RB per user per BS
        if single:
            assert np.all(per_bs.sum(axis=-2) <= 1)  # (8c) one RB per user overall
        # (8e)/(8f): one upload RB iff the BS uploads
        np.testing.assert_array_equal((alloc == UPLOAD).sum(axis=-1), upload.astype(int))
        # only chosen, covered users get RBs
        assert not np.any(per_bs.astype(bool) & ~(serve_bits & covered))
        # a chosen covered user waits only when its BS has no RB left
        n_free = sc.n_rbs - upload.astype(int)
        wanted = (serve_bits & covered).sum(axis=-1)
        np.testing.assert_array_equal(per_bs.sum(axis=-1), np.minimum(wanted, n_free))
