"""Physics: rates of eqs. (2)-(5) by hand, upload delay (eq. 6), mobility (eq. 1) statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dntsync.network import (
    FREE,
    MOVES,
    UPLOAD,
    Scenario,
    bayes_floor,
    coverage,
    expected_next,
    move_probabilities,
    rates,
    step_positions,
    trajectories,
    upload_succeeds,
)

N0 = 1e-5
# Users of the two-BS case: u0 10 m from BS 0, u1 20 m from BS 1.
USERS = np.array([[-90.0, 0.0], [0.0, 20.0]])
ONES_USER = np.ones((2, 2))
ONES_CLOUD = np.ones(2)

# Squared distances written out: BS 0 at (-100, 0), BS 1 at (0, 0), cloud at (0, 50).
H_BS0_U0 = 1 / 10**2  # |(-90,0) - (-100,0)| = 10
H_BS1_U0 = 1 / 90**2  # |(-90,0) - (0,0)| = 90
H_BS0_U1 = 1 / (100**2 + 20**2)  # |(0,20) - (-100,0)|
H_BS1_U1 = 1 / 20**2  # |(0,20) - (0,0)| = 20
H_BS0_C = 1 / (100**2 + 50**2)  # |(-100,0) - (0,50)|
H_BS1_C = 1 / 50**2  # |(0,0) - (0,50)| = 50


def _rates(sc, alloc, fade_user=ONES_USER, fade_cloud=ONES_CLOUD, users=USERS):
    user_rate, upload_rate = rates(sc, users, fade_user, fade_cloud, np.array(alloc))
    return user_rate, upload_rate


def test_rates_without_interference(two_bs):
    # BS 0 serves u0 on RB 0, BS 1 serves u1 on RB 1: different RBs, no interference.
    user_rate, upload_rate = _rates(two_bs, [[0, FREE], [FREE, 1]])
    assert user_rate == pytest.approx([math.log2(1 + H_BS0_U0 / N0),
                                       math.log2(1 + H_BS1_U1 / N0)], rel=1e-12)
    assert upload_rate == pytest.approx([0.0, 0.0])


def test_rates_with_interference_on_a_shared_rb(two_bs):
    # Both BSs use RB 0: each user hears the other BS (eq. 3).
    user_rate, upload_rate = _rates(two_bs, [[0, FREE], [1, FREE]])
    assert user_rate == pytest.approx([math.log2(1 + H_BS0_U0 / (H_BS1_U0 + N0)),
                                       math.log2(1 + H_BS1_U1 / (H_BS0_U1 + N0))], rel=1e-12)
    assert upload_rate == pytest.approx([0.0, 0.0])


def test_upload_interfered_by_other_bs_user_slot(two_bs):
    # BS 0 uploads on RB 0 while BS 1 serves u1 on RB 0: eq. (5) at the cloud, eq. (3) at u1.
    user_rate, upload_rate = _rates(two_bs, [[UPLOAD, FREE], [1, FREE]])
    assert upload_rate == pytest.approx([math.log2(1 + H_BS0_C / (H_BS1_C + N0)), 0.0], rel=1e-12)
    assert user_rate == pytest.approx([0.0, math.log2(1 + H_BS1_U1 / (H_BS0_U1 + N0))], rel=1e-12)


def test_upload_on_clean_rb_and_two_uploads_on_one_rb(two_bs):
    user_rate, upload_rate = _rates(two_bs, [[UPLOAD, 0], [1, UPLOAD]])
    # BS 0 uploads on RB 0 and BS 1 serves u1 there; BS 1 uploads on RB 1 and BS 0 serves u0.
    assert upload_rate == pytest.approx([math.log2(1 + H_BS0_C / (H_BS1_C + N0)),
                                         math.log2(1 + H_BS1_C / (H_BS0_C + N0))], rel=1e-12)
    assert user_rate == pytest.approx([math.log2(1 + H_BS0_U0 / (H_BS1_U0 + N0)),
                                       math.log2(1 + H_BS1_U1 / (H_BS0_U1 + N0))], rel=1e-12)
    _, upload_rate = _rates(two_bs, [[UPLOAD, FREE], [UPLOAD, FREE]])
    assert upload_rate == pytest.approx([math.log2(1 + H_BS0_C / (H_BS1_C + N0)),
                                         math.log2(1 + H_BS1_C / (H_BS0_C + N0))], rel=1e-12)
    _, upload_rate = _rates(two_bs, [[UPLOAD, FREE], [FREE, UPLOAD]])
    assert upload_rate == pytest.approx([math.log2(1 + H_BS0_C / N0),
                                         math.log2(1 + H_BS1_C / N0)], rel=1e-12)


def test_user_served_by_two_bss_gets_the_sum(two_bs):
    # u0 on RB 0 of BS 0 and on RB 1 of BS 1; u1 on RB 1 of BS 0 and RB 0 of BS 1.
    user_rate, _ = _rates(two_bs, [[0, 1], [1, 0]])
    u0 = math.log2(1 + H_BS0_U0 / (H_BS1_U0 + N0)) + math.log2(1 + H_BS1_U0 / (H_BS0_U0 + N0))
    u1 = math.log2(1 + H_BS0_U1 / (H_BS1_U1 + N0)) + math.log2(1 + H_BS1_U1 / (H_BS0_U1 + N0))
    assert user_rate == pytest.approx([u0, u1], rel=1e-12)


def test_fading_bandwidth_power_and_distance_clamp():
    sc = Scenario(bs_positions=((-100.0, 0.0), (0.0, 0.0)), n_users=2, n_rbs=2,
                  bandwidth=2.0, power=0.5, noise_density=1e-4)
    users = np.array([[-100.0, 0.0], [0.0, 20.0]])  # u0 sits on BS 0: distance clamped to 1
    fade_user = np.array([[3.0, 0.5], [2.0, 4.0]])  # o[m, u]
    fade_cloud = np.array([1.5, 0.25])
    noise = 2.0 * 1e-4
    h00, h10 = 3.0 / 1.0, 2.0 / 100**2
    h01, h11 = 0.5 / (100**2 + 20**2), 4.0 / 20**2
    hc0, hc1 = 1.5 / (100**2 + 50**2), 0.25 / 50**2
    user_rate, upload_rate = rates(sc, users, fade_user, fade_cloud,
                                   np.array([[0, UPLOAD], [1, UPLOAD]]))
    assert user_rate == pytest.approx([
        2.0 * math.log2(1 + 0.5 * h00 / (0.5 * h10 + noise)),
        2.0 * math.log2(1 + 0.5 * h11 / (0.5 * h01 + noise)),
    ], rel=1e-12)
    assert upload_rate == pytest.approx([
        2.0 * math.log2(1 + 0.5 * hc0 / (0.5 * hc1 + noise)),
        2.0 * math.log2(1 + 0.5 * hc1 / (0.5 * hc0 + noise)),
    ], rel=1e-12)


def test_rates_three_bss_interference_sums_over_other_bss():
    sc = Scenario(n_users=1, n_rbs=1)  # BSs at x = -100, 0, 100; cloud (0, 50)
    users = np.array([[10.0, 0.0]])
    user_rate, upload_rate = rates(sc, users, np.ones((3, 1)), np.ones(3),
                                   np.array([[UPLOAD], [0], [UPLOAD]]))
    h = [1 / 110**2, 1 / 10**2, 1 / 90**2]  # BS j -> user
    hc = [1 / (100**2 + 50**2), 1 / 50**2, 1 / (100**2 + 50**2)]  # BS j -> cloud
    assert user_rate == pytest.approx([math.log2(1 + h[1] / (h[0] + h[2] + N0))], rel=1e-12)
    assert upload_rate == pytest.approx([
        math.log2(1 + hc[0] / (hc[1] + hc[2] + N0)), 0.0,
        math.log2(1 + hc[2] / (hc[0] + hc[1] + N0)),
    ], rel=1e-12)


def test_batched_rates_equal_per_element_calls(tiny):
    rng = np.random.default_rng(7)
    batch = (3, 4)
    sc = tiny
    users = rng.uniform(sc.area_low, sc.area_high, size=(*batch, sc.n_users, 2))
    fade_user = rng.exponential(size=(*batch, sc.n_bs, sc.n_users))
    fade_cloud = rng.exponential(size=(*batch, sc.n_bs))
    alloc = rng.integers(-2, sc.n_users, size=(*batch, sc.n_bs, sc.n_rbs))
    user_rate, upload_rate = rates(sc, users, fade_user, fade_cloud, alloc)
    assert user_rate.shape == (*batch, sc.n_users)
    assert upload_rate.shape == (*batch, sc.n_bs)
    for idx in np.ndindex(*batch):
        one_user, one_upload = rates(sc, users[idx], fade_user[idx], fade_cloud[idx], alloc[idx])
        np.testing.assert_allclose(user_rate[idx], one_user, rtol=1e-12)
        np.testing.assert_allclose(upload_rate[idx], one_upload, rtol=1e-12)


def test_upload_succeeds_uses_delay_limit():
    sc = Scenario(n_users=4, data_per_user=0.5, delay_limit=2.0)
    covered = np.array([[True, True, True, False],  # D = 1.5: needs rate >= 0.75
                        [False, False, False, False],  # D = 0: trivially on time
                        [True, True, True, True]])  # D = 2: needs rate >= 1
    upload_rate = np.array([0.75, 0.0, 0.99])
    ok = upload_succeeds(sc, upload_rate, np.array([True, True, True]), covered)
    assert ok.tolist() == [True, True, False]
    ok = upload_succeeds(sc, upload_rate, np.array([False, False, False]), covered)
    assert ok.tolist() == [False, False, False]


def test_coverage_radius_is_inclusive(two_bs):
    # u0 is exactly 60 from BS 0 and 40 from BS 1; u1 is just beyond 60 from BS 1.
    users = np.array([[-40.0, 0.0], [0.0, 60.0 + 1e-9]])
    cov = coverage(two_bs.replace(area_y=(-100.0, 100.0)), users)
    assert cov.tolist() == [[True, False], [True, False]]


# ---------------------------------------------------------------------------------- mobility
def _move_index(before: np.ndarray, after: np.ndarray, step: float) -> np.ndarray:
    """Which of the five MOVES took `before` to `after` (blocked moves read as stay)."""
    delta = (after - before) / step
    match = np.all(np.isclose(delta[..., None, :], MOVES), axis=-1)  # [..., 5]
    assert np.all(match.sum(axis=-1) == 1), "every step must be exactly one of the five moves"
    return np.argmax(match, axis=-1)


def test_move_frequencies_match_p_u():
    sc = Scenario(n_users=6, step_length=0.5)
    probs = move_probabilities(sc)
    rng = np.random.default_rng(11)
    n = 40_000
    start = rng.uniform(-100, 100, size=(n, sc.n_users, 2)) * [1.0, 0.4]  # interior
    after = step_positions(sc, start, probs, rng)
    moves = _move_index(start, after, sc.step_length)
    for u in range(sc.n_users):
        counts = np.bincount(moves[:, u], minlength=5)
        expected = n * probs[u]
        sigma = np.sqrt(n * probs[u] * (1 - probs[u]))
        assert np.all(np.abs(counts - expected) <= 4 * sigma + 1), (u, counts, expected)
        # a chi-square check as well (4 degrees of freedom; 0.1% critical value is 18.47)
        keep = expected > 5
        chi2 = np.sum((counts[keep] - expected[keep]) ** 2 / expected[keep])
        assert chi2 < 18.47 + 10 * (~keep).sum(), (u, chi2)


def test_move_frequencies_over_many_steps_of_one_walk():
    sc = Scenario(n_users=3, area_x=(-1e6, 1e6), area_y=(-1e6, 1e6),
                  bs_positions=((0.0, 0.0),), cloud_position=(0.0, 50.0))
    probs = move_probabilities(sc)
    traj = trajectories(sc, probs, np.random.default_rng(3), n_traj=20, n_steps=1000)
    moves = _move_index(traj[:, :-1], traj[:, 1:], sc.step_length)  # [20, 1000, U]
    n = moves.shape[0] * moves.shape[1]
    for u in range(sc.n_users):
        freq = np.bincount(moves[..., u].ravel(), minlength=5) / n
        sigma = np.sqrt(probs[u] * (1 - probs[u]) / n)
        assert np.all(np.abs(freq - probs[u]) <= 4 * sigma + 1e-12), (u, freq, probs[u])


def test_boundary_rule_blocks_moves_that_leave_the_area():
    sc = Scenario(n_users=5)
    probs = np.tile([0.1, 0.3, 0.1, 0.1, 0.4], (sc.n_users, 1))  # mostly +x and +y
    corners = np.array([[150.0, 50.0], [-150.0, -50.0], [150.0, -50.0], [-150.0, 50.0],
                        [150.0, 0.0]])
    rng = np.random.default_rng(5)
    n = 20_000
    start = np.broadcast_to(corners, (n, sc.n_users, 2)).copy()
    after = step_positions(sc, start, probs, rng)
    assert np.all(after >= sc.area_low) and np.all(after <= sc.area_high)
    stayed = np.all(after == start, axis=-1).mean(axis=0)  # [U]
    # blocked moves leave the user in place: stay + blocked directions
    expected_stay = np.array([0.1 + 0.3 + 0.4,  # (150, 50): +y and +x blocked
                              0.1 + 0.1 + 0.1,  # (-150, -50): -y and -x blocked
                              0.1 + 0.1 + 0.4,  # (150, -50): -y and +x blocked
                              0.1 + 0.3 + 0.1,  # (-150, 50): +y and -x blocked
                              0.1 + 0.4])  # (150, 0): +x blocked
    sigma = np.sqrt(expected_stay * (1 - expected_stay) / n)
    assert np.all(np.abs(stayed - expected_stay) <= 4 * sigma), (stayed, expected_stay)


def test_walks_never_leave_the_area():
    sc = Scenario(n_users=4, area_x=(-3.0, 3.0), area_y=(-2.0, 2.0),
                  bs_positions=((0.0, 0.0),), cloud_position=(0.0, 1.0))
    traj = trajectories(sc, move_probabilities(sc), np.random.default_rng(0), 30, 200)
    assert np.all(traj >= sc.area_low) and np.all(traj <= sc.area_high)


def test_bayes_floor_equals_empirical_mse_of_expected_next():
    sc = Scenario(n_users=6)
    probs = move_probabilities(sc)
    floor = bayes_floor(sc, probs)
    rng = np.random.default_rng(2)
    n = 60_000
    start = rng.uniform(-100, 100, size=(n, sc.n_users, 2)) * [1.0, 0.4]
    after = step_positions(sc, start, probs, rng)
    sq = np.mean((after - expected_next(sc, start, probs)) ** 2, axis=-1)  # per coordinate
    mse = sq.mean(axis=0)
    stderr = sq.std(axis=0) / np.sqrt(n)
    assert np.all(np.abs(mse - floor) <= 4 * stderr + 1e-12), (mse, floor)


def test_bayes_floor_by_hand():
    sc = Scenario(n_users=2, step_length=2.0)
    probs = np.array([[1.0, 0.0, 0.0, 0.0, 0.0], [0.2, 0.2, 0.2, 0.2, 0.2]])
    # user 1: Var_x = dl^2 * (0.4 - 0) = 1.6, Var_y = 1.6 -> mean 1.6
    assert bayes_floor(sc, probs) == pytest.approx([0.0, 1.6])


def test_expected_next_knows_the_boundary():
    sc = Scenario(n_users=1)
    probs = np.array([[0.0, 0.0, 0.0, 0.0, 1.0]])  # always +x
    np.testing.assert_allclose(expected_next(sc, np.array([[149.5, 0.0]]), probs), [[149.5, 0.0]])
    np.testing.assert_allclose(expected_next(sc, np.array([[148.0, 0.0]]), probs), [[149.0, 0.0]])


def test_move_probabilities_depend_only_on_scenario_seed():
    base = move_probabilities(Scenario(n_users=5, seed=4))
    assert base.shape == (5, 5)
    np.testing.assert_allclose(base.sum(axis=1), 1.0)
    assert np.all(base >= 0)
    np.random.seed(123)  # the global numpy state must not matter
    other = Scenario(n_users=5, seed=4, n_rbs=3, eps=0.7, rho=-2.0, coverage_radius=30.0,
                     episode_length=9, bs_positions=((0.0, 0.0),))
    np.testing.assert_array_equal(move_probabilities(other), base)
    assert not np.allclose(move_probabilities(Scenario(n_users=5, seed=5)), base)
