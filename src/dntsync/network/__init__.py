"""The physical network in pure numpy, batch axis first: mobility (eq. 1), channel and rates
(eqs. 2-6) and the sequential Hungarian RB allocation (Algorithm 1)."""

from dntsync.network.allocation import allocate
from dntsync.network.mobility import (
    bayes_floor,
    candidate_positions,
    expected_next,
    initial_positions,
    move_probabilities,
    step_positions,
    trajectories,
)
from dntsync.network.radio import (
    FREE,
    UPLOAD,
    coverage,
    draw_fading,
    link_gains,
    rates,
    shannon_rate,
    upload_size,
    upload_succeeds,
    user_distances,
)
from dntsync.network.scenario import MOVES, ConfigError, Scenario

__all__ = [
    "FREE", "MOVES", "UPLOAD", "ConfigError", "Scenario", "allocate", "bayes_floor",
    "candidate_positions", "coverage", "draw_fading", "expected_next", "initial_positions",
    "link_gains", "move_probabilities", "rates", "shannon_rate", "step_positions",
    "trajectories", "upload_size", "upload_succeeds", "user_distances",
]
