"""The physical scenario: geometry, radio constants and reward weights (paper Sec. V, Table II).

`Scenario()` with no arguments is docs/model.md's default; keyword overrides give any other one
(`Scenario(n_users=6, n_rbs=9)`). It validates itself on construction, so a bad value fails
before any work is done, naming the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from dntsync.errors import UserError

# Movement order of eq. (1): stay, +y ("forward"), -y ("backward"), -x ("left"), +x ("right").
MOVES = np.array([[0.0, 0.0], [0.0, 1.0], [0.0, -1.0], [-1.0, 0.0], [1.0, 0.0]])
N_MOVES = len(MOVES)
# What the users' paths depend on (eq. 1): the twin's data set and checkpoint depend on these
# alone, not on the radio or the reward weights.
MOBILITY_KEYS = ("n_users", "area_x", "area_y", "step_length", "dirichlet_alpha", "seed",
                 "episode_length")


class ConfigError(UserError):
    """A configuration value is outside what the model allows; the message names the fix."""


def _tuple2(value) -> tuple[float, float]:
    return (float(value[0]), float(value[1]))


@dataclass(frozen=True)
class Scenario:
    """Every physical knob of the model. Units: distances in metres of the paper's plane,
    rates in bit/s/Hz x B, delays in slots."""

    # Geometry: the area is "300 x 100" centred at the origin.
    area_x: tuple[float, float] = (-150.0, 150.0)
    area_y: tuple[float, float] = (-50.0, 50.0)
    bs_positions: tuple[tuple[float, float], ...] = ((-100.0, 0.0), (0.0, 0.0), (100.0, 0.0))
    coverage_radius: float = 60.0
    cloud_position: tuple[float, float] = (0.0, 50.0)
    # Population and spectrum.
    n_users: int = 12  # U (text says 12, Table II 10)
    n_rbs: int = 12  # N
    # Radio constants (Table II): B, P, N0.
    bandwidth: float = 1.0
    power: float = 1.0
    noise_density: float = 1e-5
    path_loss_exponent: float = 2.0
    min_distance: float = 1.0  # distances are clamped below at this value
    # Mobility (eq. 1): step length dl and the Dirichlet concentration of p_u.
    step_length: float = 1.0
    dirichlet_alpha: float = 1.0
    # Twin upload (eq. 6): D_m = data_per_user * |users in coverage|; success iff T_m <= alpha.
    data_per_user: float = 0.25
    delay_limit: float = 1.0
    # Episode and reward (eq. 16).
    episode_length: int = 30  # T
    eps: float = 0.3  # weight between DNT error and sum rate
    rho: float = -10.0  # penalty per user per serving BS when a user is served twice
    seed: int = 0  # scenario seed: draws the users' move probabilities p_u

    def __post_init__(self) -> None:
        object.__setattr__(self, "area_x", _tuple2(self.area_x))
        object.__setattr__(self, "area_y", _tuple2(self.area_y))
        object.__setattr__(self, "cloud_position", _tuple2(self.cloud_position))
        object.__setattr__(
            self, "bs_positions", tuple(_tuple2(p) for p in self.bs_positions)
        )
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def need(ok: bool, key: str, value, allowed: str) -> None:
            if not ok:
                raise ConfigError(f"scenario.{key} = {value!r} is invalid: {allowed}")

        for key in ("n_users", "n_rbs", "episode_length", "seed"):
            value = getattr(self, key)
            need(
                isinstance(value, (int, np.integer)) and not isinstance(value, bool),
                key, value, "must be an integer",
            )
        for f in dataclasses.fields(self):  # NaN and inf pass every comparison below: refuse them
            value = getattr(self, f.name)
            try:
                finite = bool(np.all(np.isfinite(np.asarray(value, dtype=float))))
            except (TypeError, ValueError):
                finite = False
            need(finite, f.name, value, "need finite numbers")
        need(self.n_users >= 1, "n_users", self.n_users, "need U >= 1")
        need(self.n_users <= 24, "n_users", self.n_users,
             "need U <= 24 (the action space has 2^(U+1) entries)")
        need(self.n_rbs >= 1, "n_rbs", self.n_rbs, "need N >= 1")
        need(self.episode_length >= 1, "episode_length", self.episode_length, "need T >= 1")
        need(self.seed >= 0, "seed", self.seed, "need seed >= 0")
        need(0.0 < self.eps < 1.0, "eps", self.eps, "need 0 < eps < 1 (eq. 8)")
        need(self.rho < 0.0, "rho", self.rho, "need rho < 0 (a penalty, eq. 16)")
        need(self.coverage_radius > 0.0, "coverage_radius", self.coverage_radius, "need > 0")
        for key in ("bandwidth", "power", "noise_density", "step_length", "min_distance",
                    "data_per_user", "delay_limit", "path_loss_exponent", "dirichlet_alpha"):
            value = getattr(self, key)
            need(np.isfinite(value) and value > 0.0, key, value, "need a finite value > 0")
        need(self.area_x[0] < self.area_x[1], "area_x", self.area_x, "need low < high")
        need(self.area_y[0] < self.area_y[1], "area_y", self.area_y, "need low < high")
        need(len(self.bs_positions) >= 1, "bs_positions", self.bs_positions, "need M >= 1 BS")
        for i, (x, y) in enumerate(self.bs_positions):
            need(
                self.area_x[0] <= x <= self.area_x[1] and self.area_y[0] <= y <= self.area_y[1],
                f"bs_positions[{i}]", (x, y),
                f"must lie inside the area x in {list(self.area_x)}, y in {list(self.area_y)}",
            )

    # ------------------------------------------------------------------ derived
    @property
    def n_bs(self) -> int:
        """M, the number of base stations (agents)."""
        return len(self.bs_positions)

    @property
    def n_actions(self) -> int:
        """|A| = 2^(U+1): bit 0 = upload, bit u+1 = serve user u."""
        return 2 ** (self.n_users + 1)

    @property
    def bs_xy(self) -> np.ndarray:
        return np.asarray(self.bs_positions, dtype=np.float64)

    @property
    def cloud_xy(self) -> np.ndarray:
        return np.asarray(self.cloud_position, dtype=np.float64)

    @property
    def area_low(self) -> np.ndarray:
        return np.array([self.area_x[0], self.area_y[0]])

    @property
    def area_high(self) -> np.ndarray:
        return np.array([self.area_x[1], self.area_y[1]])

    @property
    def noise(self) -> float:
        """B * N0, the noise power in eqs. (2) and (4)."""
        return self.bandwidth * self.noise_density

    def replace(self, **changes) -> "Scenario":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["area_x"] = list(self.area_x)
        out["area_y"] = list(self.area_y)
        out["cloud_position"] = list(self.cloud_position)
        out["bs_positions"] = [list(p) for p in self.bs_positions]
        return out
