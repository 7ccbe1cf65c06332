"""The multi-agent DNT environment, batched: one object steps many environments at once.

Timing (docs/model.md, "at episode start the DNT is synchronised"): an episode is a trajectory
s_0 .. s_T. At reset the DNT holds s_0 and its history is s_0 repeated K times; users then
move to s_1 and the first decision is taken. In slot t = 1..T every BS observes s_t in its
coverage, the twin predicts s-hat_t from the K last DNT statuses, the BSs choose uploads and
users, Algorithm 1 allocates RBs, eq. (7) sets s-bar_t, and the rewards (eqs. 16, 37) follow;
then users move to s_{t+1}. All environments of a batch share the episode clock.

Each random part has its own seeded stream (initial positions, moves, fading), so runs are
reproducible part by part; `reset(seed=...)` re-seeds all three.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dntsync.env.actions import decode
from dntsync.env.predictors import HoldLast, Predictor
from dntsync.env.step import Outcome, resolve
from dntsync.network.mobility import initial_positions, move_probabilities, step_positions
from dntsync.network.radio import coverage, draw_fading
from dntsync.network.scenario import Scenario

OBSERVATIONS = ("full", "positions_only")
# Frame of the users' (x, y) in a BS's observation: "area": (xy - area centre) / half extent,
# the same numbers for every BS; "bs": (xy - BS position) / coverage radius, so a covered
# user lies in the unit disc of its BS's own frame (a local state).
OBS_FRAMES = ("area", "bs")
# Extra per-user numbers a BS can compute from a covered user's position and the public,
# fixed layout (BS positions, coverage radius); zero for users outside its coverage.
# "others": how many *other* BSs cover the user, / (M - 1) (0: only this BS can serve it).
USER_FEATURES = ("others",)


@dataclass(frozen=True)
class SlotState:
    """Everything about the current slot before the BSs act (what an oracle may see)."""

    t: int  # decisions already taken this episode (0 .. T-1)
    user_xy: np.ndarray  # [B, U, 2] s_t
    covered: np.ndarray  # [B, M, U] bool: the action masks
    fade_user: np.ndarray  # [B, M, U]
    fade_cloud: np.ndarray  # [B, M]
    prediction: np.ndarray  # [B, U, 2] s-hat_t
    since_upload: np.ndarray  # [B, M] slots since each BS's last successful upload (t before its first)


@dataclass(frozen=True)
class StepResult:
    obs: np.ndarray  # [B, M, obs_dim] float32, for the next slot
    covered: np.ndarray  # [B, M, U] bool, the next slot's masks
    team_reward: np.ndarray  # [B] eq. (16)
    local_rewards: np.ndarray  # [B, M] eq. (37)
    done: bool  # the episode clock reached T
    outcome: Outcome  # the whole slot (allocation, rates, DNT status)
    info: dict[str, np.ndarray]  # per-environment step metrics


class DntEnv:
    """M BS agents over `n_envs` independent copies of the scenario."""

    def __init__(
        self,
        scenario: Scenario,
        predictor: Predictor | None = None,
        n_envs: int = 1,
        seed: int = 0,
        observation: str = "full",
        obs_frame: str = "area",
        user_features: tuple[str, ...] = (),
        replicas: int = 1,
    ) -> None:
        if n_envs < 1:
            raise ValueError(f"n_envs = {n_envs} is invalid: need >= 1")
        if replicas < 1 or n_envs % replicas:
            raise ValueError(f"replicas = {replicas} is invalid: need a divisor of n_envs = {n_envs}")
        if observation not in OBSERVATIONS:
            raise ValueError(f"observation = {observation!r} is invalid: choose from {OBSERVATIONS}")
        if obs_frame not in OBS_FRAMES:
            raise ValueError(f"obs_frame = {obs_frame!r} is invalid: choose from {OBS_FRAMES}")
        unknown = [f for f in user_features if f not in USER_FEATURES]
        if unknown or len(set(user_features)) != len(user_features):
            raise ValueError(f"user_features = {list(user_features)} is invalid: distinct names "
                             f"from {USER_FEATURES}")
        self.user_features = tuple(user_features)
        self.scenario = scenario
        self.predictor = predictor if predictor is not None else HoldLast()
        self.n_envs = n_envs
        # `replicas` copies of the first n_envs / replicas environments, one after another: the
        # same positions and fading in environment i and i + n_envs / replicas (one draw,
        # tiled), so that several policies play the same episodes in one batch
        self.replicas = replicas
        self._draws = n_envs // replicas
        self.observation = observation
        self.move_probs = move_probabilities(scenario)
        self.obs_frame = obs_frame
        self._area_center = (scenario.area_low + scenario.area_high) / 2
        self._area_half = (scenario.area_high - scenario.area_low) / 2
        if obs_frame == "area":  # [1 or M, 2]: broadcast over the BSs
            self._center, self._half = self._area_center[None], self._area_half[None]
        else:
            self._center = np.asarray(scenario.bs_positions, dtype=np.float64)
            self._half = np.full_like(self._center, scenario.coverage_radius)
        self._seed(seed)
        self.state: SlotState | None = None

    # ------------------------------------------------------------------ spaces
    @property
    def n_agents(self) -> int:
        return self.scenario.n_bs

    @property
    def n_actions(self) -> int:
        return self.scenario.n_actions

    @property
    def user_dim(self) -> int:
        """Numbers per user at the front of an observation: (x, y, covered, *user_features)."""
        return 3 + len(self.user_features)

    @property
    def obs_dim(self) -> int:
        return self.user_dim * self.scenario.n_users + (2 if self.observation == "full" else 0)

    @property
    def state_dim(self) -> int:
        return 2 * self.scenario.n_users + 2 * self.n_agents

    @property
    def window(self) -> int:
        return max(1, int(self.predictor.window))

    # ------------------------------------------------------------------ episode
    def _seed(self, seed: int) -> None:
        init, moves, fading = np.random.SeedSequence(seed).spawn(3)
        self._rng_init = np.random.default_rng(init)
        self._rng_moves = np.random.default_rng(moves)
        self._rng_fading = np.random.default_rng(fading)

    def reset(self, seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Start a new episode in every environment; returns `(obs, covered)` of slot 1."""
        if seed is not None:
            self._seed(seed)
        s0 = self._tiled(initial_positions(self.scenario, self._rng_init, (self._draws,)))
        self._history = np.repeat(s0[:, None], self.window, axis=1)  # DNT synchronised
        self._last_ok = np.zeros((self.n_envs, self.n_agents), dtype=bool)
        self._since_ok = np.zeros((self.n_envs, self.n_agents))
        self._prepare(0, self._moved(s0))
        return self.observe(), self.state.covered

    def _tiled(self, draw: np.ndarray) -> np.ndarray:
        """A draw for the first n_envs / replicas environments, for all of them."""
        return draw if self.replicas == 1 else np.tile(draw, (self.replicas,) + (1,) * (draw.ndim - 1))

    def _moved(self, user_xy: np.ndarray) -> np.ndarray:
        """The users' next positions (eq. 1): one draw per original environment."""
        return self._tiled(step_positions(self.scenario, user_xy[: self._draws], self.move_probs,
                                          self._rng_moves))

    def _prepare(self, t: int, user_xy: np.ndarray) -> None:
        fade_user, fade_cloud = map(self._tiled, draw_fading(self.scenario, self._rng_fading, (self._draws,)))
        self.state = SlotState(
            t=t, user_xy=user_xy, covered=coverage(self.scenario, user_xy),
            fade_user=fade_user, fade_cloud=fade_cloud,
            prediction=np.asarray(self.predictor.predict(self._history), dtype=np.float64),
            since_upload=self._since_ok.copy(),
        )

    def observe(self) -> np.ndarray:
        """Local observation of every BS, `[B, M, obs_dim]`, scaled to about [-1, 1]: per user
        `user_dim` numbers (x, y, covered, then `user_features`), then the two upload numbers."""
        st = self.state
        n_users, n_bs, f = self.scenario.n_users, self.n_agents, self.user_dim
        # Written in place into one float32 array.
        obs = np.empty((self.n_envs, n_bs, self.obs_dim), dtype=np.float32)
        per_user = obs[..., : f * n_users].reshape(self.n_envs, n_bs, n_users, f)
        for c in range(2):  # x then y: numpy is slow on a length-2 innermost axis
            scaled = ((st.user_xy[:, None, :, c] - self._center[None, :, c, None])
                      / self._half[None, :, c, None])  # [B, 1 or M, U]
            per_user[..., c] = np.where(st.covered, scaled, 0.0)
        per_user[..., 2] = st.covered
        if "others" in self.user_features:  # other covering BSs, computable from the layout
            others = (st.covered.sum(-2, keepdims=True) - st.covered) / max(1, n_bs - 1)
            per_user[..., 3 + self.user_features.index("others")] = np.where(st.covered, others, 0.0)
        if self.observation == "full":
            obs[..., -2], obs[..., -1] = self._upload_numbers()
        return obs

    def _upload_numbers(self) -> tuple[np.ndarray, np.ndarray]:
        """Each BS's `[B, M]` last upload outcome and slots since its last success, / T, capped at 1."""
        return self._last_ok, np.minimum(self._since_ok / self.scenario.episode_length, 1.0)

    def layout(self) -> dict[str, list | float]:
        """What every BS knows without observing: the BS positions, the coverage radius and
        the frame of the users' (x, y) in each BS's observation (absolute position =
        xy * frame_half + frame_center, `[M, 2]` each), as plain lists."""
        n_bs = self.n_agents
        return {"bs_positions": np.asarray(self.scenario.bs_positions, dtype=float).tolist(),
                "coverage_radius": float(self.scenario.coverage_radius),
                "frame_center": np.broadcast_to(self._center, (n_bs, 2)).tolist(),
                "frame_half": np.broadcast_to(self._half, (n_bs, 2)).tolist()}

    def global_state(self) -> np.ndarray:
        """The global state s_t of the slot, `[B, state_dim]` float32 (what a centralised
        mixer may read in training, never a BS): every user's position in the area's frame,
        then each BS's two upload numbers (last upload succeeded, slots since, / T)."""
        xy = (self.state.user_xy - self._area_center) / self._area_half  # [B, U, 2]
        return np.concatenate([xy.reshape(self.n_envs, -1), *self._upload_numbers()],
                              axis=-1).astype(np.float32)

    def step(self, actions: np.ndarray) -> StepResult:
        """Apply `actions[B, M]` (integers in [0, 2^(U+1))); masked bits are dropped."""
        if self.state is None:
            raise RuntimeError("call reset() before step()")
        if self.state.t >= self.scenario.episode_length:
            raise RuntimeError(f"the episode ended after T = {self.scenario.episode_length} slots; call reset()")
        actions = np.asarray(actions)
        if actions.shape != (self.n_envs, self.n_agents):
            raise ValueError(f"actions have shape {actions.shape}; need {(self.n_envs, self.n_agents)}")
        if actions.min() < 0 or actions.max() >= self.n_actions:
            raise ValueError(f"actions must lie in [0, {self.n_actions}); got {actions.min()}..{actions.max()}")
        st = self.state
        upload, serve = decode(actions, self.scenario.n_users)
        out = resolve(self.scenario, st.user_xy, st.fade_user, st.fade_cloud, st.covered,
                      st.prediction, upload, serve)
        self._history = np.concatenate([self._history[:, 1:], out.dnt_xy[:, None]], axis=1)
        self._last_ok = out.upload_ok
        self._since_ok = np.where(out.upload_ok, 0.0, self._since_ok + 1.0)
        t = st.t + 1
        done = t >= self.scenario.episode_length
        if done:
            self.state = SlotState(t, st.user_xy, st.covered, st.fade_user, st.fade_cloud, st.prediction,
                                   self._since_ok.copy())
        else:
            self._prepare(t, self._moved(st.user_xy))
        return StepResult(
            obs=self.observe(), covered=self.state.covered, team_reward=out.team_reward,
            local_rewards=out.local_rewards, done=done, outcome=out, info=out.metrics(),
        )
