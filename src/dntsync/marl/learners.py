"""One Q-learning update for both algorithms (Sec. III-D, eqs. 19-24; IQL eq. 37).

`QLearner.td_loss` is the whole update, in the manner of epymarl's q_learner:

1. unroll the online nets theta_m and the target nets theta~_m over each sampled episode
   from a zero hidden state;
2. gather Q_{theta_m}(o_t^m, a_t^m) of the taken actions;
3. next-step value: max over the *next* slot's valid actions of the target net (or, with
   double Q, the target net's value of the online net's masked argmax); zero after the
   last slot (the episode's end is terminal) and on padding;
4. the learner's mixer (`mixer`, the one thing a subclass chooses) says what is compared:
   VDN sums the agents (Q_tot, eq. 19) against the team reward (eqs. 21-22); QMIX mixes
   them with a monotonic network of the global state s_t (Rashid et al. 2018) against the
   team reward, the next slot's value through the target mixer; IQL has none and keeps
   each agent on its own local reward (eq. 37);
5. squared TD error averaged over real slots; the gradient norm is clipped (`marl.algorithm.grad_clip`,
   over every parameter, as `torch.nn.utils.clip_grad_norm_`) and Adam steps (eq. 23 with
   Adam as the SGD method). With `sparse_head` (flat head only) the head's gradient holds
   just the rows of the actions in the minibatch and `torch.optim.SparseAdam` (Adam's
   "lazy" variant: moments and weights of the other rows wait until their action is next
   sampled) updates those rows; the rest of the network keeps Adam. The optimisation is
   therefore written out in `training_step` (Lightning's manual optimisation).

With an error value (`error_gamma` = g > 0; VDN and IQL, whose Q_tot is a sum) each BS's Q is
R + E (`AgentQNets.error_value`) and the loss has two parts. R is regressed as above on the
reward less its DNT-error term (`dntsync.env.rewards.error_terms`: the rate term, or the
penalty), its next value the next Q less the next E at the same greedy action. E is regressed
on the Monte Carlo return of the error term over the rest of the sampled episode, discounted
by g (the team's for VDN, summed over the BSs; each BS's own for IQL). The BSs act on R + E.
Why: the error term's effect of an upload lasts while the twin drifts, longer than gamma =
0.2 sees, and the rate term's does not (docs/learners.md, "The error value").

The target nets (and the target mixer) are synced every `target_update_epochs` epochs
(Sec. III-D: "updated every several training epochs"); with 0 there is none and the
next-slot value is the online nets' own (detached), read from the same unroll. Greedy evaluation is Lightning's validation: the batch is an
`Evaluation` that the learner plays with its greedy policy; every metric is logged as
`eval_<metric>` (e.g. `eval_team_reward`) at that epoch.
"""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor, nn

from dntsync.env.actions import decode, encode, random_valid
from dntsync.env.core import SlotState
from dntsync.errors import RunError
from dntsync.marl.networks import AgentQNets, with_retry_offsets, with_upload_offsets
from dntsync.marl.replay import EpisodeBatch


def _like(mask: Tensor, other: Tensor) -> Tensor:
    """Broadcast a `[B, T]` mask against `[B, T]` (VDN) or `[B, T, M]` (IQL) TD terms."""
    return mask.view(*mask.shape, *([1] * (other.dim() - mask.dim())))


def explore_actions(greedy: np.ndarray, covered: np.ndarray, epsilon: float,
                    rng: np.random.Generator) -> np.ndarray:
    """Classic epsilon-greedy: per BS and environment, with probability epsilon, a uniformly
    random valid action (every allowed bit on with probability 1/2) instead of the greedy one."""
    explore = rng.random(greedy.shape) < epsilon
    return np.where(explore, random_valid(covered, rng), greedy)


def explore_bits(greedy: np.ndarray, covered: np.ndarray, epsilon: float,
                 rng: np.random.Generator) -> np.ndarray:
    """Per-bit epsilon-greedy: each allowed bit (upload, covered users) of the greedy action is
    redrawn uniformly with probability epsilon. Same expected number of changed bits as
    `explore_actions`, but spread as small deviations from the greedy action, so a penalty
    (e.g. a user served twice) is not blamed on every bit of a wholly random action. With
    epsilon = 1 it is the uniformly random valid action."""
    upload, serve = decode(greedy, covered.shape[-1])
    redraw_upload = rng.random(upload.shape) < epsilon
    redraw_serve = (rng.random(serve.shape) < epsilon) & covered
    upload = np.where(redraw_upload, rng.random(upload.shape) < 0.5, upload)
    serve = np.where(redraw_serve, rng.random(serve.shape) < 0.5, serve) & covered
    return encode(upload, serve)


EXPLORATION = {"action": explore_actions, "bit": explore_bits}


def discounted_returns(reward: Tensor, discount: float) -> Tensor:
    """Monte Carlo returns sum_{k >= 0} discount^k r_{t+k} to the episode's end, at every slot
    t: `reward[B, T, ...]` -> `[B, T, ...]`, one matmul with the `[T, T]` discount matrix.
    Every episode in the replay has exactly T slots (its end is the last one)."""
    slots = torch.arange(reward.shape[1])
    weights = torch.tril(discount ** (slots[:, None] - slots[None, :]).clamp(min=0).to(reward.dtype))
    return torch.einsum("bs...,st->bt...", reward, weights)  # weights[s, t] = discount^(s-t), s >= t


def clip_grad_norm(parameters: list[torch.nn.Parameter], max_norm: float) -> Tensor:
    """`torch.nn.utils.clip_grad_norm_` (2-norm over all gradients, scaled by
    max_norm / (norm + 1e-6) when above) for a mix of dense and sparse gradients; sparse ones
    are coalesced first (an embedding's gradient repeats a row once per lookup)."""
    grads = []
    for p in parameters:
        if p.grad is not None:
            if p.grad.is_sparse:
                p.grad = p.grad.coalesce()
            grads.append(p.grad)
    if not grads:
        return torch.zeros(())
    values = [g.values() if g.is_sparse else g for g in grads]
    total = torch.nn.utils.get_total_norm(values, foreach=True)  # one kernel per dtype, not per tensor
    coef = max_norm / (total + 1e-6)
    if coef < 1:
        torch._foreach_mul_(values, coef)
    return total


class QPolicy:
    """Acts with the online nets, epsilon-greedily over valid actions (an `EpisodePolicy`);
    `exploration` names how (`EXPLORATION`: "action" or "bit")."""

    def __init__(self, nets: AgentQNets, epsilon: float = 0.0,
                 rng: np.random.Generator | None = None, name: str = "greedy",
                 exploration: str = "action", offsets: Tensor | None = None,
                 retry: tuple[Tensor, Tensor, Tensor] | None = None) -> None:
        self.nets = nets
        self.epsilon = epsilon
        self.rng = rng if rng is not None else np.random.default_rng(0)
        self.name = name
        self.explore = EXPLORATION[exploration]
        # `[M, K]`: added to BS m's upload term in slot t at column t mod K (`with_upload_offsets`;
        # none while exploring: the offsets are fitted after training)
        self.offsets = offsets
        # (offsets [M, K], head start [M], episode length): read by the slots since each BS's
        # last successful upload (`with_retry_offsets`; none while exploring)
        self.retry = retry
        self.state: Tensor | None = None
        self.slot = 0

    def begin_episode(self, n_envs: int) -> None:
        self.state = torch.zeros(n_envs, len(self.nets.agents), self.nets.hidden)
        self.slot = 0

    @torch.no_grad()
    def act(self, state: SlotState, obs: np.ndarray) -> np.ndarray:
        obs = torch.as_tensor(obs)
        hidden = self.nets.unroll(obs[:, None], self.state)[:, 0]  # [B, M, h]
        self.state = hidden
        outputs = self.nets.head_outputs(hidden, obs)
        if self.offsets is not None:
            outputs = with_upload_offsets(outputs, self.offsets, self.slot)
        if self.retry is not None:
            outputs = with_retry_offsets(outputs, obs, *self.retry, self.slot)
        self.slot += 1
        _, greedy = self.nets.masked_max(outputs, torch.as_tensor(state.covered))
        actions = greedy.numpy()
        if self.epsilon > 0:
            actions = self.explore(actions, state.covered, self.epsilon, self.rng)
        return actions


class SumMixer(nn.Module):
    """VDN's mixing: Q_tot = sum_m Q_m (eq. 19); no parameters."""

    def forward(self, q: Tensor, state: Tensor) -> Tensor:
        return q.sum(-1)


class QMixer(nn.Module):
    """QMIX's mixing network (Rashid et al. 2018): Q_tot = w2 . elu(W1 q + b1) + b2, with the
    weights made by hypernetworks of the global state s_t and kept non-negative (absolute
    values), so Q_tot is monotonic in every agent's Q and the joint greedy action is each
    agent's own greedy action. `q[..., M]`, `state[..., S]` -> `[...]`."""

    def __init__(self, n_agents: int, state_dim: int, embed: int = 32, hyper: int = 64) -> None:
        super().__init__()
        self.n_agents, self.embed = n_agents, embed
        self.w1 = nn.Sequential(nn.Linear(state_dim, hyper), nn.ReLU(), nn.Linear(hyper, n_agents * embed))
        self.b1 = nn.Linear(state_dim, embed)
        self.w2 = nn.Sequential(nn.Linear(state_dim, hyper), nn.ReLU(), nn.Linear(hyper, embed))
        self.b2 = nn.Sequential(nn.Linear(state_dim, embed), nn.ReLU(), nn.Linear(embed, 1))

    def forward(self, q: Tensor, state: Tensor) -> Tensor:
        w1 = self.w1(state).abs().unflatten(-1, (self.n_agents, self.embed))  # [..., M, E]
        mixed = nn.functional.elu((q.unsqueeze(-2) @ w1).squeeze(-2) + self.b1(state))  # [..., E]
        return (mixed * self.w2(state).abs()).sum(-1) + self.b2(state)[..., 0]


class QLearner(pl.LightningModule):
    """Recurrent multi-agent Q-learning; a subclass chooses the mixing of the agents' Q
    (`make_mixer`: a module `(q[..., M], state[..., S]) -> Q_tot[...]` trained on the team
    reward, or None: every agent on its own local reward)."""

    algo = "base"  # the registry name of a subclass
    additive = True  # Q_tot is a sum of the agents' Q (or there is none): an error value fits

    def make_mixer(self, n_agents: int, state_dim: int) -> nn.Module | None:
        raise NotImplementedError

    def __init__(self, n_agents: int, obs_dim: int, n_users: int, *, hidden: int = 128,
                 head: str = "flat", sparse_head: bool = False, grad_clip: float = 10.0,
                 gamma: float = 0.2, lr: float = 1e-4,
                 double_q: bool = True, target_update_epochs: int = 2,
                 epsilon_start: float = 1.0, epsilon_end: float = 0.05,
                 epsilon_decay_epochs: int = 50, exploration: str = "action",
                 user_dim: int = 3, state_dim: int = 0, reward_centering: float = 0.0,
                 association: dict | None = None, error_gamma: float = 0.0,
                 upload_phases: int = 0, retry_slots: int = 0, episode_length: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False  # two optimisers with `sparse_head`: see training_step
        if error_gamma > 0 and not self.additive:
            raise ValueError(f"{self.algo} mixes the agents' Q nonlinearly: no error value (error_gamma=0)")
        self.online = AgentQNets(n_agents, obs_dim, hidden, n_users, head, sparse_head,
                                 user_dim, association, error_gamma > 0)  # theta_m
        self.target = copy.deepcopy(self.online)  # theta~_m
        self.target.requires_grad_(False)
        self.mixer = self.make_mixer(n_agents, state_dim)
        self.target_mixer = copy.deepcopy(self.mixer)
        if self.target_mixer is not None:
            self.target_mixer.requires_grad_(False)
        if upload_phases > 0 and head == "flat":
            raise ValueError("upload offsets need a per-bit head (branching or factorised), not flat")
        if upload_phases > 0:  # b[m, t mod K], fitted after training (`dntsync.marl.offsets`)
            self.register_buffer("upload_offsets", torch.zeros(n_agents, upload_phases))
        if retry_slots > 0 and self.mixer is not None:  # b[m, slots since the last success],
            # fitted after training for a team score (`dntsync.marl.offsets`)
            if upload_phases <= 0 or episode_length <= 0:
                raise ValueError("retry offsets need upload offsets and the episode length")
            self.register_buffer("retry_offsets", torch.zeros(n_agents, retry_slots))
            self.register_buffer("retry_head_start", torch.zeros(n_agents))
            self.register_buffer("retry_scale", torch.tensor(float(episode_length)))
        if reward_centering > 0:  # the reward's running mean, saved with the model (resumes exactly)
            size = n_agents if self.mixer is None else 1
            self.register_buffer("reward_centre", torch.full((size,), float("nan")))

    def trained_parameters(self) -> list[nn.Parameter]:
        """What the optimisers update and the gradient clip covers: the agents' nets, then
        the mixer's (if it has any)."""
        mixer = list(self.mixer.parameters()) if self.mixer is not None else []
        return [*self.online.parameters(), *mixer]

    # ------------------------------------------------------------------ acting
    def epsilon(self, epoch: int) -> float:
        """Linear decay from `epsilon_start` to `epsilon_end` over `epsilon_decay_epochs`."""
        hp = self.hparams
        frac = min(1.0, epoch / hp.epsilon_decay_epochs)
        return hp.epsilon_start + frac * (hp.epsilon_end - hp.epsilon_start)

    def exploration_policy(self, epoch: int, rng: np.random.Generator) -> QPolicy:
        return QPolicy(self.online, self.epsilon(epoch), rng, name=f"{self.algo}-explore",
                       exploration=self.hparams.exploration)

    def greedy_policy(self, offsets: Tensor | None = None,
                      retry: tuple[Tensor, Tensor, Tensor] | None = None) -> QPolicy:
        """The BSs' greedy policy, with the learner's upload offsets and retry offsets or the
        given ones (`[M, K]`; `(offsets [M, K], head start [M], episode length)`)."""
        return QPolicy(self.online, 0.0, name=self.algo,
                       offsets=self.offsets if offsets is None else offsets,
                       retry=self.retry if retry is None else retry)

    @property
    def offsets(self) -> Tensor | None:
        """The upload offsets `[M, K]` (zero until fitted), or None without them."""
        return getattr(self, "upload_offsets", None)

    @property
    def retry(self) -> tuple[Tensor, Tensor, Tensor] | None:
        """`(offsets [M, K], head start [M], episode length)` read by the slots since each BS's
        last successful upload (zero until fitted), or None without them."""
        if getattr(self, "retry_offsets", None) is None:
            return None
        return self.retry_offsets, self.retry_head_start, self.retry_scale

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Resuming under another `marl.upload_offsets` (a change a resumed run may make): the
        offsets are fitted after training, so the interrupted run's are zeros (of its own
        width, or none); this run's zeros stand in for them."""
        state = checkpoint["state_dict"]
        for nets in ("online", "target"):  # a model file from before `serve_covered`: the learnt terms
            state.setdefault(f"{nets}.serve_covered", torch.zeros(()))
        for name in ("upload_offsets", "retry_offsets", "retry_head_start", "retry_scale"):
            mine = getattr(self, name, None)
            if mine is None:
                state.pop(name, None)
            elif getattr(state.get(name), "shape", None) != mine.shape or name == "retry_scale":
                state[name] = torch.zeros_like(mine) if name != "retry_scale" else mine.clone()

    # ------------------------------------------------------------------ the update
    def mixed(self, chosen_q: Tensor, next_q: Tensor, batch: EpisodeBatch) -> tuple[Tensor, Tensor]:
        """`(Q, next value)` compared in the TD error: per agent `[B, T, M]` without a mixer,
        else mixed `[B, T]` (the next slot's state for the next value; after the last slot
        it is masked, so the last state stands in). `chosen_q`, `next_q`: `[B, T, M]`."""
        if self.mixer is None:
            return chosen_q, next_q
        next_state = torch.cat([batch.state[:, 1:], batch.state[:, -1:]], dim=1)
        bootstrap = self.mixer if self.hparams.target_update_epochs == 0 else self.target_mixer
        with torch.no_grad():
            next_value = bootstrap(next_q, next_state)
        return self.mixer(chosen_q, batch.state), next_value

    def td_error(self, chosen_q: Tensor, reward: Tensor, next_q: Tensor, batch: EpisodeBatch) -> Tensor:
        """Mean squared TD error over real slots: `Q` against `reward + gamma * next value`."""
        q, next_value = self.mixed(chosen_q, next_q, batch)
        reward = self.centred(reward, batch.filled)
        not_done = _like(1.0 - batch.terminated, q)
        target = reward + self.hparams.gamma * not_done * next_value  # y~, eqs. (20)-(21)
        mask = _like(batch.filled, q).expand_as(q)
        return (((q - target) * mask) ** 2).sum() / mask.sum()  # eq. (22) / (37)

    def td_loss(self, batch: EpisodeBatch) -> Tensor:
        hp = self.hparams
        hidden = self.online.unroll(batch.obs)  # [B, T, M, h], from a zero hidden state
        outputs = self.online.head_outputs(hidden, batch.obs)
        chosen_q = self.online.q(outputs, batch.actions)  # Q_{theta_m}(o_t^m, a_t^m)
        split = self.online.error_terms is not None  # Q = R + E, each part on its own reward
        with torch.no_grad():
            next_obs = batch.obs[:, 1:]
            next_covered = batch.covered[:, 1:]  # masks of slot t+1
            if hp.target_update_epochs == 0:  # no target net: bootstrap from the online one
                nets, next_hidden = self.online, hidden[:, 1:].detach()
                next_q, best = self.online.masked_max(outputs[:, 1:].detach(), next_covered)
            else:
                nets, next_hidden = self.target, self.target.unroll(batch.obs)[:, 1:]
                target_outputs = self.target.head_outputs(next_hidden, next_obs)
                if hp.double_q:  # online argmax, target value
                    _, best = self.online.masked_max(outputs[:, 1:].detach(), next_covered)
                    next_q = self.target.q(target_outputs, best)
                else:
                    next_q, best = self.target.masked_max(target_outputs, next_covered)
            if split:  # R's next value: Q less E at the same (greedy) action
                next_q = next_q - nets.error_value(next_hidden, best)
            # no slot after the last one: its value is masked by `terminated`
            next_q = torch.cat([next_q, torch.zeros_like(next_q[:, :1])], dim=1)
        reward = batch.local_rewards if self.mixer is None else batch.team_reward
        if not split:
            return self.td_error(chosen_q, reward, next_q, batch)
        error_reward = batch.local_error_rewards if self.mixer is None else batch.error_reward
        chosen_e = self.online.error_value(hidden, batch.actions)
        rate_loss = self.td_error(chosen_q - chosen_e, reward - error_reward, next_q, batch)
        q_e = chosen_e if self.mixer is None else self.mixer(chosen_e, batch.state)  # a sum (VDN)
        returns = discounted_returns(error_reward, hp.error_gamma)
        mask = _like(batch.filled, q_e).expand_as(q_e)
        return rate_loss + (((q_e - returns) * mask) ** 2).sum() / mask.sum()

    def centred(self, reward: Tensor, filled: Tensor) -> Tensor:
        """With `reward_centering` = beta > 0: the reward minus its running mean r-bar (per
        agent for IQL's local rewards), r-bar <- r-bar + beta (minibatch mean - r-bar), starting
        at the first minibatch's mean (Naik et al. 2024, "Reward centering"). Every episode has
        T slots, so a constant taken from every reward moves every policy's return from a slot
        by the same amount and no policy's rank; it takes r-bar / (1 - gamma) out of the Q
        values. Called once per update (it advances r-bar)."""
        beta = self.hparams.get("reward_centering", 0.0)
        if not beta:
            return reward
        with torch.no_grad():
            mask = _like(filled, reward)
            mean = (reward * mask).sum(dim=(0, 1)) / mask.sum(dim=(0, 1))
            old = self.reward_centre
            self.reward_centre.copy_(torch.where(torch.isnan(old), mean.reshape(old.shape),
                                                 old + beta * (mean.reshape(old.shape) - old)))
        centre = self.reward_centre if reward.dim() == 3 else self.reward_centre[0]
        return reward - centre

    def training_step(self, batch: EpisodeBatch, batch_idx: int) -> Tensor:
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        loss = self.td_loss(batch)
        if not torch.isfinite(loss):
            raise RunError(f"the TD loss became {loss.item()} in epoch {self.current_epoch + 1}; "
                           "no model was written (try a smaller marl.algorithm.lr or "
                           "marl.algorithm.grad_clip)")
        for opt in optimizers:
            opt.zero_grad()
        self.manual_backward(loss)
        clip_grad_norm(self.trained_parameters(), self.hparams.grad_clip)
        for opt in optimizers:
            opt.step()
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=batch.obs.shape[0])
        return loss

    def on_train_epoch_end(self) -> None:
        # epoch-level curves are logged against the epoch g = 1..G ("step"), not the batch
        self.log_dict({"epsilon": self.epsilon(self.current_epoch),
                       "step": float(self.current_epoch + 1)})
        every = self.hparams.target_update_epochs
        if every and (self.current_epoch + 1) % every == 0:
            self.target.load_state_dict(self.online.state_dict())
            if self.mixer is not None:
                self.target_mixer.load_state_dict(self.mixer.state_dict())

    def validation_step(self, evaluation, batch_idx: int) -> None:
        results = evaluation(self.greedy_policy())
        self.log_dict({**{f"eval_{k}": v["mean"] for k, v in results.items()},
                       "step": float(self.current_epoch + 1)}, batch_size=1)

    def configure_optimizers(self):
        sparse = {id(p) for p in self.online.sparse_parameters()}
        dense = [p for p in self.trained_parameters() if id(p) not in sparse]
        # fused: one kernel over all parameters (without sparse_head the flat heads hold
        # 2^(U+1) x h weights each)
        optimizers = [torch.optim.Adam(dense, lr=self.hparams.lr, fused=True)]
        if sparse:
            optimizers.append(torch.optim.SparseAdam(self.online.sparse_parameters(),
                                                     lr=self.hparams.lr))
        return optimizers


class VDN(QLearner):
    """Value decomposition: Q_tot = sum_m Q_{theta_m} (eq. 19) regressed on the team reward,
    target r + gamma * sum_m max Q~_{theta~_m} (eq. 21; the joint max of a sum decomposes)."""

    algo = "vdn"

    def make_mixer(self, n_agents, state_dim):
        return SumMixer()


class QMIX(QLearner):
    """QMIX: Q_tot = QMixer(Q_1..Q_M; s_t) regressed on the team reward; the joint max is the
    agents' own maxima (the mixing is monotonic), so acting stays decentralised."""

    algo = "qmix"
    additive = False  # one Q per BS: Q_tot of a split Q would not be the agents' greedy sum

    def make_mixer(self, n_agents, state_dim):
        return QMixer(n_agents, state_dim)


class IQL(QLearner):
    """Independent Q-learning: each BS on its own local reward r^m (eq. 37)."""

    algo = "iql"

    def make_mixer(self, n_agents, state_dim):
        return None


LEARNERS: dict[str, type[QLearner]] = {"vdn": VDN, "iql": IQL, "qmix": QMIX}
