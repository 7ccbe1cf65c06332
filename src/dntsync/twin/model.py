"""The GRU twin, eqs. (9)-(13), and its loss, eq. (14). Plain torch: no Lightning here, so the
environment can load a twin without importing the training stack.

Readings (docs/model.md "Twin"; the paper gives the equations only):
- Input: the last K DNT statuses s-bar_{t-K+1..t}, each the 2U coordinates of all users,
  scaled by the area: (s - area centre) / area half-extent, so every input lies in [-1, 1].
- The recurrence (9)-(12) is `torch.nn.GRU` with N^h units, run from h = 0 over the K inputs.
  torch applies the reset gate after the recurrent product, r * (U^h h + b), where eq. (10)
  writes U^h (h * r); both are standard GRU variants of the same expressiveness. Where no
  gradient is needed (environment, self-fed rollouts, evaluation) `gru_unrolled` runs the
  same equations written out over the same weights, which is faster on one CPU core.
- Read-out (13): a linear layer on h_t gives the *increment* s_{t+1} - s_t in units of the
  step length dl, and s-hat_{t+1} = s-bar_t + dl * W^o h_t (+ bias). The paper's s-hat = W^o h
  would have to reproduce a 300 m wide position from a bounded hidden state; predicting the
  step keeps the target O(1), so the Bayes floor (a step variance of O(dl^2)) is reachable.
  The read-out starts at zero, so an untrained twin is the hold-last predictor.
- s-hat is clipped to the area: the DNT knows the area and no user ever leaves it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from dntsync.network.scenario import Scenario


@dataclass(frozen=True)
class Scaler:
    """How positions (metres) map to the GRU's inputs and its outputs to metres."""

    center: tuple[float, float]  # area centre (x, y)
    half: tuple[float, float]  # area half-extent (x, y)
    step: float  # dl: one output unit of the read-out is one step length

    @classmethod
    def from_scenario(cls, scenario: Scenario) -> "Scaler":
        low, high = scenario.area_low, scenario.area_high
        return cls(center=tuple(float(v) for v in (low + high) / 2),
                   half=tuple(float(v) for v in (high - low) / 2),
                   step=float(scenario.step_length))

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> "Scaler":
        return cls(center=tuple(float(v) for v in data["center"]),
                   half=tuple(float(v) for v in data["half"]), step=float(data["step"]))


class GruTwin(nn.Module):
    """`window[B, K, U, 2]` (metres) -> s-hat_{t+1} `[B, U, 2]` (metres), eqs. (9)-(13)."""

    def __init__(self, n_users: int, window: int, hidden: int, num_layers: int,
                 scaler: Scaler) -> None:
        super().__init__()
        self.n_users = n_users
        self.window = window  # K
        self.hidden = hidden  # N^h
        self.num_layers = num_layers
        self.scaler = scaler
        self.gru = nn.GRU(2 * n_users, hidden, num_layers=num_layers, batch_first=True)  # (9)-(12)
        self.readout = nn.Linear(hidden, 2 * n_users)  # W^o of eq. (13)
        nn.init.zeros_(self.readout.weight)
        nn.init.zeros_(self.readout.bias)
        # Buffers, not parameters: they travel with the state dict and the device.
        self.register_buffer("area_center", torch.tensor(scaler.center, dtype=torch.float32))
        self.register_buffer("area_half", torch.tensor(scaler.half, dtype=torch.float32))
        self.register_buffer("area_low", self.area_center - self.area_half)
        self.register_buffer("area_high", self.area_center + self.area_half)

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        batch = window.shape[0]
        x = (window - self.area_center) / self.area_half
        x = x.reshape(batch, self.window, 2 * self.n_users)
        # h_t of the last layer after the K inputs.
        h_t = self.gru(x)[1][-1] if torch.is_grad_enabled() else gru_unrolled(self.gru, x)
        step = self.readout(h_t).reshape(batch, self.n_users, 2) * self.scaler.step
        s_hat = window[:, -1] + step  # eq. (13) as an increment on s-bar_t
        return torch.maximum(torch.minimum(s_hat, self.area_high), self.area_low)

    def hparams(self) -> dict:
        return {"n_users": self.n_users, "window": self.window, "hidden": self.hidden,
                "num_layers": self.num_layers}

    def self_fed_windows(self, context: torch.Tensor, fed_steps: torch.Tensor) -> torch.Tensor:
        """The K-status windows the twin sees when it has run on its own predictions.

        `context[B, L, U, 2]` holds true statuses s_{t-L+1..t}; `fed_steps[B, U]` (each
        <= L - K) says how many trailing slots of each user were not synchronised. Slot by
        slot, as in eq. (7), the twin predicts from the K statuses before the slot and user u's
        status becomes that prediction in its last `fed_steps[:, u]` slots. Returns the last K
        statuses `[B, K, U, 2]`; no gradient flows through the rollout.
        """
        hist = context.clone()
        length = context.shape[1]
        longest = int(fed_steps.max()) if fed_steps.numel() else 0
        with torch.no_grad():
            for pos in range(length - longest, length):
                replaced = fed_steps >= length - pos  # [B, U]: user u is predicted in slot pos
                rows = replaced.any(dim=1)
                pred = self(hist[rows, pos - self.window:pos])
                hist[rows, pos] = torch.where(replaced[rows, :, None], pred, hist[rows, pos])
        return hist[:, -self.window:]


def gru_unrolled(gru: nn.GRU, x: torch.Tensor) -> torch.Tensor:
    """Eqs. (9)-(12) written out over `gru`'s own weights, from h = 0: `x[B, K, 2U] -> h_t[B, N^h]`.

    The same function as `gru(x)[1][-1]` (a test pins them together), for inference: one matmul
    for the input terms W s-bar of all K slots, then per slot one for the recurrent terms U h
    (none in the first slot, where h = 0). torch's gate order in the weights is (r, z, h~).
    """
    batch, slots, _ = x.shape
    inputs = x
    for layer in range(gru.num_layers):
        w_in, w_rec = getattr(gru, f"weight_ih_l{layer}"), getattr(gru, f"weight_hh_l{layer}")
        b_in, b_rec = getattr(gru, f"bias_ih_l{layer}"), getattr(gru, f"bias_hh_l{layer}")
        hidden = w_rec.shape[1]
        # Slot-major, so that each slot's input terms are one contiguous block.
        slot_major = inputs.transpose(0, 1).reshape(slots * batch, -1)
        from_input = torch.addmm(b_in, slot_major, w_in.t()).reshape(slots, batch, 3, hidden)
        h = x.new_zeros(batch, hidden)
        states = []
        for tau in range(slots):
            rec = b_rec.expand(batch, -1) if tau == 0 else torch.addmm(b_rec, h, w_rec.t())
            rec = rec.reshape(batch, 3, hidden)
            gates = torch.sigmoid(from_input[tau, :, :2] + rec[:, :2])
            r, z = gates[:, 0], gates[:, 1]  # eqs. (9) and (11)
            h_cand = _tanh(torch.addcmul(from_input[tau, :, 2], r, rec[:, 2]))  # eq. (10)
            h = torch.lerp(h_cand, h, z)  # eq. (12): (1 - z) h~ + z h
            states.append(h)
        if layer + 1 < gru.num_layers:
            inputs = torch.stack(states, dim=1)
    return h


def _tanh(x: torch.Tensor) -> torch.Tensor:
    """tanh(x) = 2 sigmoid(2x) - 1 (to ~1e-7): on this CPU build torch's sigmoid kernel is
    several times faster than its tanh, which matters for the per-slot prediction."""
    return torch.sigmoid(x * 2).mul_(2).sub_(1)


def twin_loss(s_hat: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Eq. (14), J_G = ||s-hat_{t+1} - s_{t+1}||^2 / (2U), averaged over the batch.

    It is also the per-user squared error averaged over both coordinates, the MSE of Fig. 2.
    """
    n_users = s.shape[-2]
    return ((s_hat - s) ** 2).sum(dim=(-2, -1)).mean() / (2 * n_users)
