"""User mobility, eq. (1): a random walk with per-user move probabilities p_u.

docs/model.md readings: p_u ~ Dirichlet(1,...,1) over (stay, +y, -y, -x, +x), drawn once per
scenario from the scenario seed, so users keep their habits across episodes; initial positions
are uniform in the area; a move that would leave the area leaves the user where it is.
All functions take a leading batch axis: positions are `[..., U, 2]`.
"""

from __future__ import annotations

import numpy as np

from dntsync.network.scenario import MOVES, N_MOVES, Scenario


def move_probabilities(scenario: Scenario) -> np.ndarray:
    """p_u for every user, `[U, 5]`, drawn from the scenario seed alone."""
    rng = np.random.default_rng([scenario.seed, 0x6D6F7665])  # "move": its own stream
    alpha = np.full(len(MOVES), scenario.dirichlet_alpha)
    return rng.dirichlet(alpha, size=scenario.n_users)


def initial_positions(scenario: Scenario, rng: np.random.Generator, batch: tuple[int, ...] = ()) -> np.ndarray:
    """Uniform initial positions in the area, `[*batch, U, 2]`."""
    shape = (*batch, scenario.n_users, 2)
    return rng.uniform(scenario.area_low, scenario.area_high, size=shape)


def inside_area(scenario: Scenario, xy: np.ndarray) -> np.ndarray:
    """Whether each position lies in the closed area, `[...]` bool."""
    # x and y apart: an `all` over a length-2 axis is a slow reduction.
    x, y = xy[..., 0], xy[..., 1]
    (x_low, x_high), (y_low, y_high) = scenario.area_x, scenario.area_y
    return (x >= x_low) & (x <= x_high) & (y >= y_low) & (y <= y_high)


def candidate_positions(scenario: Scenario, xy: np.ndarray) -> np.ndarray:
    """Where each of the five moves of eq. (1) leads, after the boundary rule: `[..., U, 5, 2]`."""
    cand = xy[..., None, :] + scenario.step_length * MOVES
    stays = ~inside_area(scenario, cand)
    return np.where(stays[..., None], xy[..., None, :], cand)


def step_positions(
    scenario: Scenario, xy: np.ndarray, move_probs: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """One slot of eq. (1) for every user of every batch entry: `[..., U, 2] -> [..., U, 2]`."""
    cdf = np.cumsum(move_probs, axis=-1)  # [U, 5]
    cdf[..., -1] = 1.0
    draw = rng.random(xy.shape[:-1])  # [..., U]
    # Inverse-CDF sampling: the move index is how many CDF steps the draw passed, [..., U]
    # (counted one step at a time: a sum over a length-5 axis is a slow reduction).
    move = np.zeros(draw.shape, dtype=np.intp)
    for k in range(N_MOVES):
        move += draw >= cdf[..., k]
    # Only the drawn move's candidate: the same numbers as `candidate_positions`, a fifth of
    # the work.
    moved = xy + np.take(scenario.step_length * MOVES, move, axis=0)
    stays = ~inside_area(scenario, moved)
    return np.where(stays[..., None], xy, moved)


def trajectories(
    scenario: Scenario, move_probs: np.ndarray, rng: np.random.Generator, n_traj: int, n_steps: int
) -> np.ndarray:
    """`n_traj` independent trajectories of all users: `[n_traj, n_steps + 1, U, 2]`."""
    out = np.empty((n_traj, n_steps + 1, scenario.n_users, 2))
    out[:, 0] = initial_positions(scenario, rng, (n_traj,))
    for t in range(n_steps):
        out[:, t + 1] = step_positions(scenario, out[:, t], move_probs, rng)
    return out


def expected_next(scenario: Scenario, xy: np.ndarray, move_probs: np.ndarray) -> np.ndarray:
    """E[l_{t+1} | l_t], the Bayes-optimal one-step prediction (boundary rule included)."""
    cand = candidate_positions(scenario, xy)  # [..., U, 5, 2]
    return np.einsum("...ukc,uk->...uc", cand, move_probs)


def bayes_floor(scenario: Scenario, move_probs: np.ndarray) -> np.ndarray:
    """Per-user irreducible one-step MSE, `[U]`, averaged over the two coordinates (as Fig. 2).

    Away from the boundary a step is dl * (p5 - p4) in x and dl * (p2 - p3) in y, so
    Var_x = dl^2 (p4 + p5 - (p5 - p4)^2), Var_y = dl^2 (p2 + p3 - (p2 - p3)^2), and no
    predictor can beat (Var_x + Var_y) / 2. At the boundary blocked moves lower the variance
    slightly; the interior value is the one reported (the area is large against dl).
    """
    p = np.asarray(move_probs)
    var_x = p[:, 3] + p[:, 4] - (p[:, 4] - p[:, 3]) ** 2
    var_y = p[:, 1] + p[:, 2] - (p[:, 1] - p[:, 2]) ** 2
    return scenario.step_length**2 * (var_x + var_y) / 2.0
