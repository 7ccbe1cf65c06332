"""The Q network of each BS (Sec. III-C, item 6; docs/model.md "Learning"), no parameter sharing.

    o_t^m -> Linear(h) -> ReLU -> GRUCell(h) -> head -> Q_{theta_m}(o_t^m, a),  a in [0, 2^(U+1))

Three heads produce the Q values of the 2^(U+1) actions (bit 0 = upload, bit u+1 = serve user u):

- `FlatHead` (the paper's; the paper profile's): one output row per action, Q(a) = w_a . x + b_a. Only
  *valid* actions (serve bits within the BS's coverage, about 2^(1 + covered users) of them)
  are ever chosen or maxed over, so it never forms the 2^(U+1) outputs: the masked max
  gathers just the weight rows of the valid actions of each coverage pattern (patterns
  grouped by their number k of covered users, each with exactly 2^(k+1) valid actions, so
  no action is padded) and multiplies them with the hidden states of the rows sharing the
  pattern; the chosen action's Q gathers one row. Exact, and at U = 16 (2^17 actions) the
  cost follows the coverage, not the action space. `FlatHead.all_q` is the naive full
  matmul, kept for tests and the benchmark.
- `FactorisedHead`: one term per bit, Q(a) = q_0 + sum over set bits i of a of q_i, so U + 2
  outputs. Its masked max is per bit: take every allowed bit whose term is positive.
- `BranchingHead` (the default): the same per-bit form, each user's serve term from one
  network shared by the users that reads the BS's state and that user's own numbers.

With a per-bit head, `Association` (`marl.network.association`, the default) replaces the
serve terms of the users several BSs cover by a conflict-free rule the BSs learn together:
each covering BS's score from one network of its distance to the user, and a BS's term is
its own score minus the best other covering BS's, so exactly one of them serves the user.

With a per-bit head and an error value (`marl.algorithm.error_gamma` > 0, the default), each
BS's Q is the sum of two parts fitted to two parts of the reward (`dntsync.marl.learners`):
E = e_0 + upload * e_upload, one `Linear(h, 2)` per BS, for the DNT-error term, and the
head's terms for the rest. `head_outputs` adds E into the q_0 and upload terms, so acting,
`q` and `masked_max` read the whole Q = R + E; `error_value` reads E alone.

Each head first turns the hidden states into what it reads (`outputs(x, users)`: the
hidden states themselves for the flat head, the U + 2 terms for the per-bit heads, computed
once per batch), then answers the same three questions: `q(outputs, actions)`,
`masked_max(outputs, covered)` and `all_q(outputs)`; masks are the coverage bits
`covered[..., U]` (see `dntsync.env.actions`).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

# Floats `flat_masked_max` holds at once (gathered weights + Q values): about 64 MB.
GATHER_BUDGET = 1 << 24


def _init_linear_(weight: Tensor, bias: Tensor, fan_in: int) -> None:
    """nn.Linear's default initialisation, for heads that hold their weight themselves."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    bound = 1 / math.sqrt(fan_in)
    nn.init.uniform_(bias, -bound, bound)


def action_bits(actions: Tensor, n_users: int) -> Tensor:
    """Action integers `[R]` -> their U + 1 bits `[R, U+1]` (float): upload, serve user 1..U."""
    shifts = torch.arange(n_users + 1, device=actions.device)
    return ((actions[:, None] >> shifts) & 1).to(torch.get_default_dtype())


def valid_mask(covered: Tensor) -> Tensor:
    """Full validity mask `[R, 2^(U+1)]` (bool) from coverage bits `[R, U]` (the naive way)."""
    n_users = covered.shape[-1]
    shifts = torch.arange(n_users, device=covered.device)
    code = (covered.long() << shifts).sum(-1).to(torch.int32)  # covered users as bits
    serve = torch.arange(2 ** (n_users + 1), dtype=torch.int32, device=covered.device) >> 1
    return (serve[None, :] & ~code[:, None]) == 0  # no served user outside the coverage


_SUBSETS: dict[int, Tensor] = {}


def _subsets(n_bits: int) -> Tensor:
    """All 0/1 vectors of length n_bits, `[2^n_bits, n_bits]` (int64), cached."""
    if n_bits not in _SUBSETS:
        codes = torch.arange(2**n_bits)
        _SUBSETS[n_bits] = (codes[:, None] >> torch.arange(n_bits)) & 1
    return _SUBSETS[n_bits]


def valid_actions_of(covered: Tensor) -> Tensor:
    """Valid actions of rows that all cover the same number k of users: `[P, U] -> [P, 2^(k+1)]`.

    Upload on/off times every subset of the covered users; an action is the sum of 2^bit over
    its set bits (bit 0 = upload, bit u+1 = user u). Row order: as `dntsync.env.valid_actions`.
    """
    n_rows, k = covered.shape[0], int(covered[0].sum()) if len(covered) else 0
    users = torch.nonzero(covered)[:, 1].view(n_rows, k)  # ascending per row
    bit_values = torch.cat([torch.ones(n_rows, 1, dtype=torch.long, device=covered.device),
                            torch.ones_like(users) << (users + 1)], dim=1)  # [P, k+1]
    return (_subsets(k + 1).to(covered.device)[None] * bit_values[:, None, :]).sum(-1)


class FlatHead(nn.Module):
    """Q(a) = w_a . x + b_a for each of the 2^(U+1) actions (the paper's output layer).

    `bias` is stored as a column `[2^(U+1), 1]` so that, with `sparse_grad`, both parameters
    are embedding tables: a training update's gradient then holds only the rows of the
    actions in the minibatch (a sparse tensor for `torch.optim.SparseAdam`) instead of
    2^(U+1) rows that are almost all zero (at U = 16: 17 M floats per agent per update).
    """

    def __init__(self, hidden: int, n_users: int, sparse_grad: bool = False, user_dim: int = 3) -> None:
        super().__init__()
        del user_dim  # reads no per-user numbers
        self.n_users = n_users
        self.sparse_grad = sparse_grad
        n_actions = 2 ** (n_users + 1)
        self.weight = nn.Parameter(torch.empty(n_actions, hidden))
        self.bias = nn.Parameter(torch.empty(n_actions, 1))
        _init_linear_(self.weight, self.bias, hidden)

    def outputs(self, x: Tensor, users: Tensor | None = None) -> Tensor:
        """What `q` and `masked_max` read: the recurrent state itself (`users` unused)."""
        return x

    def q(self, x: Tensor, actions: Tensor) -> Tensor:
        """Q of one action per row: gathers one weight row each. `x[R, h], actions[R] -> [R]`."""
        sparse = self.sparse_grad
        weight = nn.functional.embedding(actions, self.weight, sparse=sparse)
        bias = nn.functional.embedding(actions, self.bias, sparse=sparse)
        return (weight * x).sum(-1) + bias[:, 0]

    def masked_max(self, x: Tensor, covered: Tensor) -> tuple[Tensor, Tensor]:
        """Max and argmax over each row's valid actions only: `x[R, h], covered[R, U] -> [R], [R]`
        (`flat_masked_max` with this head alone; ties go to the first valid action in
        `valid_actions_of` order)."""
        values, best = flat_masked_max([self], x[None], covered[None])
        return values[0], best[0]

    def all_q(self, x: Tensor) -> Tensor:
        """The naive full matmul, `[R, 2^(U+1)]`."""
        return nn.functional.linear(x, self.weight, self.bias[:, 0])


def flat_masked_max(heads: list[FlatHead], x: Tensor, covered: Tensor) -> tuple[Tensor, Tensor]:
    """`FlatHead.masked_max` (by-pattern path) of M heads at once, each on its own rows:
    `x[M, R, h]`, `covered[M, R, U]` -> values and argmax actions `[M, R]`.

    One sort groups the rows of all agents by (k covered users, agent, coverage pattern);
    then each k is one batched matmul over every agent's patterns with k covered users
    (rows laid out `[pattern, slot]`, zero padding up to the most frequent pattern, giving
    `[pattern, slot, valid action]`), its weight rows gathered
    from each agent's own table. The bookkeeping is done once for all groups, so a training
    update pays a handful of ops per k instead of a few dozen per (agent, k). Chunks of
    patterns keep the gathered weights and Q values under `GATHER_BUDGET` floats.
    """
    n_m, n_r, h = x.shape
    n_users, device = covered.shape[-1], x.device
    shifts = torch.arange(n_users, device=device)
    covered = covered.bool()
    code = (covered.long() << shifts).sum(-1)  # [M, R]: covered users as bits
    agent = torch.arange(n_m, device=device)[:, None].expand(n_m, n_r)
    key = ((covered.sum(-1) * n_m + agent) << n_users) | code  # sorts by k, agent, pattern
    keys, inverse, counts = torch.unique(key.reshape(-1), return_inverse=True, return_counts=True)
    order = torch.argsort(inverse, stable=True)  # rows, pattern by pattern
    pattern = inverse[order]  # the pattern of each sorted row
    first = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(order), device=device) - first[pattern]  # row's place in its pattern
    pat_code = keys & ((1 << n_users) - 1)
    pat_k, pat_agent = ((keys >> n_users) // n_m).tolist(), ((keys >> n_users) % n_m).tolist()
    counts_l = counts.tolist()
    flat_x = x.reshape(n_m * n_r, h)
    values = x.new_empty(n_m * n_r)
    best = torch.empty(n_m * n_r, dtype=torch.long, device=device)
    p0 = r0 = 0
    while p0 < len(counts_l):  # one chunk of patterns that share k
        k = pat_k[p0]
        n_valid = 2 ** (k + 1)
        p1, width = p0 + 1, counts_l[p0]
        while (p1 < len(counts_l) and pat_k[p1] == k and (p1 + 1 - p0) * n_valid
               * (h + max(width, counts_l[p1])) <= GATHER_BUDGET):
            width = max(width, counts_l[p1])
            p1 += 1
        n_p, r1 = p1 - p0, r0 + sum(counts_l[p0:p1])
        rows, local = order[r0:r1], pattern[r0:r1] - p0
        at = local * width + slot[r0:r1]  # row -> (pattern, slot)
        laid = x.new_zeros(n_p * width, h).index_copy_(0, at, flat_x.index_select(0, rows))
        actions = valid_actions_of(((pat_code[p0:p1, None] >> shifts) & 1).bool())  # [P, 2^(k+1)]
        weights, biases, a0 = [], [], p0
        while a0 < p1:  # patterns of one agent are consecutive
            a1 = a0
            while a1 < p1 and pat_agent[a1] == pat_agent[a0]:
                a1 += 1
            head, acts = heads[pat_agent[a0]], actions[a0 - p0:a1 - p0].reshape(-1)
            weights.append(head.weight.index_select(0, acts))
            biases.append(head.bias.index_select(0, acts))
            a0 = a1
        weight = torch.cat(weights).view(n_p, n_valid, h)
        bias = torch.cat(biases).view(n_p, 1, n_valid)
        q = torch.baddbmm(bias, laid.view(n_p, width, h), weight.transpose(1, 2))
        v, i = q.view(n_p * width, n_valid).index_select(0, at).max(-1)
        values[rows] = v
        best[rows] = actions.reshape(-1).index_select(0, local * n_valid + i)
        p0, r0 = p1, r1
    return values.view(n_m, n_r), best.view(n_m, n_r)


class FactorisedHead(nn.Module):
    """Q(a) = q_0 + sum over set bits i of a of q_i: one Q term per bit (U + 2 outputs), all
    read from the BS's recurrent state x. `outputs` computes the terms `[R, U+2]` (q_0,
    upload, serve user 1..U) once; `q`, `masked_max` and `all_q` read them."""

    def __init__(self, hidden: int, n_users: int, sparse_grad: bool = False, user_dim: int = 3) -> None:
        super().__init__()
        self.n_users = n_users
        self.sparse_grad = False  # U + 2 outputs: nothing to gain
        del user_dim  # reads no per-user numbers
        self.terms = nn.Linear(hidden, n_users + 2)  # q_0, upload, serve user 1..U

    def outputs(self, x: Tensor, users: Tensor | None = None) -> Tensor:
        return self.terms(x)

    def q(self, terms: Tensor, actions: Tensor) -> Tensor:
        return terms[:, 0] + (terms[:, 1:] * action_bits(actions, self.n_users)).sum(-1)

    def masked_max(self, terms: Tensor, covered: Tensor) -> tuple[Tensor, Tensor]:
        """Per bit: every allowed bit (upload, covered users) with a positive term is set."""
        allowed = torch.cat([torch.ones_like(covered[:, :1]), covered], dim=1).bool()
        take = allowed & (terms[:, 1:] > 0)
        values = terms[:, 0] + (terms[:, 1:] * take).sum(-1)
        shifts = torch.arange(self.n_users + 1, device=terms.device)
        return values, (take.long() << shifts).sum(-1)

    def all_q(self, terms: Tensor) -> Tensor:
        every = torch.arange(2 ** (self.n_users + 1), device=terms.device)
        return terms[:, :1] + terms[:, 1:] @ action_bits(every, self.n_users).T


COVERED_FEATURE = 2  # a user's numbers are (x, y, covered, *env.user_features)


class BranchingHead(FactorisedHead):
    """Per-bit terms as `FactorisedHead`, but each user's serve term is one small network
    shared by all users, reading the BS's recurrent state x beside that user's own numbers
    f_u (`user_dim` of them: x, y, covered and the `env.user_features`):

        q_0, q_upload = Linear(x);   q_u = w . relu(A x + C f_u + c) + b   for u = 1..U

    So the U serve bits learn from one set of weights (U times the data of a per-user
    output), a user's term depends on where that user is rather than on its index, and the
    masked max stays O(U) at any U (no 2^(U+1) table).
    """

    def __init__(self, hidden: int, n_users: int, sparse_grad: bool = False, user_dim: int = 3) -> None:
        nn.Module.__init__(self)
        self.n_users = n_users
        self.user_dim = user_dim
        self.sparse_grad = False
        width = hidden  # a width of 32 learnt less (docs/learners.md)
        self.state_terms = nn.Linear(hidden, 2)  # q_0, upload
        self.user_state = nn.Linear(hidden, width)  # A x + c
        self.user_input = nn.Linear(user_dim, width, bias=False)  # C f_u
        self.user_out = nn.Linear(width, 1)  # w, b

    def outputs(self, x: Tensor, users: Tensor | None = None) -> Tensor:
        """`x[R, h]`, `users[R, U, user_dim]` -> terms `[R, U+2]`. A serve term is computed
        only for covered users (their covered flag, `users[..., 2]`, is 1): the others' bits
        are masked, so their terms are never read and stay 0. About 2.7x less work at the
        default layout, where a BS covers 4-5 of the 12 users."""
        if users is None:
            raise ValueError("the branching head needs each user's numbers (users=...)")
        rows, cols = torch.nonzero(users[..., COVERED_FEATURE] > 0, as_tuple=True)
        z = torch.relu(self.user_state(x).index_select(0, rows)
                       + self.user_input(users[rows, cols]))  # [covered (row, user) pairs, width]
        serve = x.new_zeros(users.shape[:2]).index_put((rows, cols), self.user_out(z)[:, 0])
        return torch.cat([self.state_terms(x), serve], dim=-1)


HEADS = {"flat": FlatHead, "factorised": FactorisedHead, "branching": BranchingHead}

ASSOCIATION_WIDTH = 64  # the score network's hidden width (the width measured; docs/learners.md)
COVERAGE_TOLERANCE = 1e-4  # relative: a float32 position at the coverage edge still counts


class Association(nn.Module):
    """Which BS serves a user that several BSs cover, learnt without conflicts.

    Every BS computes, for each covered user u, the distance d_m(u) / R from u to every BS m
    that covers it (u's position is in its own observation, the BS positions and the
    coverage radius R are public), and one score network shared by all BSs gives
    h(d_m(u) / R). BS m's serve term for u is then

        q_m(u) = h(d_m(u) / R) - max over the other covering BSs m' of h(d_m'(u) / R),

    positive for exactly one covering BS (ties aside), so the BSs' greedy actions never serve
    u twice and always serve it, with no message between them. The learner learns h from the
    team reward through these terms (VDN sums them); a decreasing h is the nearest-BS rule.
    Users only one BS covers keep their head's own serve term. After training the score may
    lean towards the nearest BS, h(d) - c d with `slope` c (0 while training; fitted on
    validation episodes, `dntsync.marl.offsets.fit_association_slope`): a learnt h that
    is not decreasing gives users to a farther BS, which a large c undoes.

    `layout`: "bs_positions" `[M, 2]`, "coverage_radius", and the affine frame of the
    users' (x, y) in each BS's observation, "frame_center" and "frame_half" `[M, 2]` (the
    absolute position is `xy * half + center`; `DntEnv.layout`).
    """

    def __init__(self, layout: dict) -> None:
        super().__init__()
        for name in ("bs_positions", "frame_center", "frame_half"):
            self.register_buffer(name, torch.tensor(layout[name], dtype=torch.get_default_dtype()),
                                 persistent=False)
        self.radius = float(layout["coverage_radius"])
        self.register_buffer("slope", torch.zeros(()))  # c: kept in the model file
        self.score = nn.Sequential(nn.Linear(1, ASSOCIATION_WIDTH), nn.ReLU(),
                                   nn.Linear(ASSOCIATION_WIDTH, ASSOCIATION_WIDTH), nn.ReLU(),
                                   nn.Linear(ASSOCIATION_WIDTH, 1))

    def forward(self, terms: Tensor, users: Tensor) -> Tensor:
        """Per-bit terms `[..., M, U+2]` (q_0, upload, serve user 1..U) with the serve terms
        of the users several BSs cover replaced; `users[..., M, U, user_dim]` as the
        observations hold them (x, y in the BS's frame, covered, ...)."""
        n_m, n_u = users.shape[-3], users.shape[-2]
        flat_terms = terms.reshape(-1, n_m, n_u + 2)
        flat_users = users.reshape(-1, n_m, n_u, users.shape[-1])
        row, bs, user = torch.nonzero(flat_users[..., COVERED_FEATURE] > 0.5, as_tuple=True)
        xy = flat_users[row, bs, user, :2] * self.frame_half[bs] + self.frame_center[bs]  # [P, 2]
        dist = torch.linalg.vector_norm(xy[:, None, :] - self.bs_positions, dim=-1) / self.radius  # [P, M]
        pair = torch.arange(len(bs), device=terms.device)
        rivals = dist <= 1 + COVERAGE_TOLERANCE
        rivals[pair, bs] = False
        several = rivals.any(-1)
        if not bool(several.any()):
            return terms
        row, bs, user, dist, rivals = row[several], bs[several], user[several], dist[several], rivals[several]
        h = self.score(dist[..., None])[..., 0] - self.slope * dist  # [P', M]
        own = h.gather(1, bs[:, None])[:, 0]
        best_rival = h.masked_fill(~rivals, float("-inf")).max(-1).values
        return flat_terms.index_put((row, bs, user + 2), own - best_rival).view(terms.shape)


class AgentQNet(nn.Module):
    """One BS's recurrent Q network theta_m: Linear(h) -> ReLU -> GRUCell(h) -> head. Its
    parameters only: `AgentQNets.unroll` runs the M BSs' networks together."""

    def __init__(self, obs_dim: int, hidden: int, n_users: int, head: str = "flat",
                 sparse_grad: bool = False, user_dim: int = 3) -> None:
        super().__init__()
        self.hidden = hidden
        self.encoder = nn.Linear(obs_dim, hidden)
        self.cell = nn.GRUCell(hidden, hidden)
        self.head = HEADS[head](hidden, n_users, sparse_grad, user_dim)


def gru_states(gi: Tensor, s0: Tensor, w_hh: Tensor, b_hh: Tensor) -> Tensor:
    """GRUCell's recurrence for M stacked nets, slot by slot: `gi[M, T, B, 3h]` (the input
    projections, b_ih included), `s0[M, B, h]`, `w_hh[M, h, 3h]` (W_hh transposed),
    `b_hh[M, 1, 3h]` -> the states `[T, M, B, h]`: `GRURecurrence` when a gradient is
    wanted, else the plain loop (about 30% faster than the Function's buffered one at one
    slot, the way a BS acts)."""
    if torch.is_grad_enabled() and any(x.requires_grad for x in (gi, s0, w_hh, b_hh)):
        return GRURecurrence.apply(gi, s0, w_hh, b_hh)
    s, states = s0, []
    for gi_t in gi.unbind(1):
        gh = torch.baddbmm(b_hh, s, w_hh)  # [M, B, 3h]
        i_r, i_z, i_n = gi_t.chunk(3, dim=-1)
        h_r, h_z, h_n = gh.chunk(3, dim=-1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        s = n + z * (s - n)  # (1 - z) * n + z * s
        states.append(s)
    return torch.stack(states, dim=0)


class GRURecurrence(torch.autograd.Function):
    """The recurrence of `gru_states` with its backward written out.

    Forward, per slot: gh = s W_hh + b_hh; r = sigmoid(i_r + h_r), z = sigmoid(i_z + h_z),
    n = tanh(i_n + r h_n), s' = n + z (s - n) (`nn.GRUCell`'s equations), each written
    into a buffer of all slots, with no autograd graph. The backward first forms, over all
    slots at once, the factors it multiplies by, then walks the slots back with one batched
    matmul (against a contiguous copy of W_hh^T: a matmul with the transposed view takes
    twice as long here) and five products per slot, and takes the gradient of W_hh and b_hh
    once over all slots (one `[M, h, T*B] x [M, T*B, 3h]` matmul and a sum). Autograd's
    backward of the same loop runs two matmuls and about twenty kernels per slot. A default
    training update takes about 17% less time with it (benchmarks/README.md, "A written-out
    GRU backward").
    `tests/test_marl.py` checks it against `nn.GRUCell`'s gradients and with
    `torch.autograd.gradcheck`.
    """

    @staticmethod
    def forward(ctx, gi: Tensor, s0: Tensor, w_hh: Tensor, b_hh: Tensor) -> Tensor:
        n_m, n_t, n_b, h3 = gi.shape
        h = h3 // 3
        states = gi.new_empty(n_t, n_m, n_b, h)
        gh = gi.new_empty(n_t, n_m, n_b, h3)  # s W_hh + b_hh of each slot
        r, z, n = (gi.new_empty(n_t, n_m, n_b, h) for _ in range(3))
        s = s0
        for t in range(n_t):
            torch.baddbmm(b_hh, s, w_hh, out=gh[t])
            i_r, i_z, i_n = gi[:, t].chunk(3, dim=-1)
            h_r, h_z, h_n = gh[t].chunk(3, dim=-1)
            torch.sigmoid(i_r + h_r, out=r[t])
            torch.sigmoid(i_z + h_z, out=z[t])
            torch.tanh(i_n + r[t] * h_n, out=n[t])
            torch.add(n[t], z[t] * (s - n[t]), out=states[t])  # (1 - z) * n + z * s
            s = states[t]
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(s0, w_hh, states, gh, r, z, n)
        return states

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        s0, w_hh, states, gh, r, z, n = ctx.saved_tensors
        n_t, n_m, n_b, h = states.shape
        s_prev = torch.cat([s0[None], states[:-1]], dim=0)  # [T, M, B, h]
        one_z = 1 - z
        d_n = one_z * (1 - n * n)  # ds -> d(i_n + r h_n)
        d_z = (s_prev - n) * z * one_z  # ds -> d(i_z + h_z)
        d_r = gh[..., 2 * h:] * r * (1 - r)  # d(i_n + r h_n) -> d(i_r + h_r)
        d_gh = grad.new_empty(n_m, n_t, n_b, 3 * h)  # d(gh) per slot; its r and z parts are d(gi)'s
        d_in = grad.new_empty(n_m, n_t, n_b, h)  # d(i_n)
        w_t = w_hh.transpose(1, 2).contiguous()  # [M, 3h, h]; contiguous: a bmm twice as fast
        ds = grad[-1]
        for t in range(n_t - 1, -1, -1):
            if t < n_t - 1:
                ds = ds + grad[t]
            pre_n = torch.mul(ds, d_n[t], out=d_in[:, t])
            torch.mul(ds, d_z[t], out=d_gh[:, t, :, h:2 * h])
            torch.mul(pre_n, d_r[t], out=d_gh[:, t, :, :h])
            torch.mul(pre_n, r[t], out=d_gh[:, t, :, 2 * h:])
            ds = torch.baddbmm(ds * z[t], d_gh[:, t], w_t)
        d_gi = torch.cat([d_gh[..., : 2 * h], d_in], dim=-1)
        d_gh = d_gh.view(n_m, n_t * n_b, 3 * h)
        d_w = torch.bmm(s_prev.transpose(0, 1).reshape(n_m, n_t * n_b, h).transpose(1, 2), d_gh)
        return d_gi, ds, d_w, d_gh.sum(dim=1, keepdim=True)


def with_upload_offsets(outputs: Tensor, offsets: Tensor, slots: int | Tensor) -> Tensor:
    """A per-bit head's outputs (`AgentQNets.head_outputs`; column 1: the upload term) with BS
    m's upload term raised by `offsets[m, t mod K]` in slot t (`offsets` `[M, K]`); a new
    tensor. `slots`: one slot index for outputs `[..., M, F]`, or the slots `[T]` of outputs
    `[..., T, M, F]`. With one slot, `offsets` may also be `[B, M, K]`: each environment's own
    (outputs `[B, M, F]`)."""
    out = outputs.clone()
    phases = torch.as_tensor(slots) % offsets.shape[-1]
    out[..., 1] += offsets[:, phases].T.to(out.dtype) if phases.dim() else offsets[..., phases].to(out.dtype)
    return out


def with_retry_offsets(outputs: Tensor, obs: Tensor, offsets: Tensor, head_start: Tensor, scale: Tensor,
                       slots: int | Tensor) -> Tensor:
    """A per-bit head's outputs with BS m's upload term raised by `offsets[m, j]` (`[M, K]`),
    j the slots since its last successful upload capped at K - 1: the observation's last
    number (`DntEnv` "full": slots since / `scale`, the episode length), counted from
    `head_start[m]` more while the BS has not yet succeeded (that count equals the slot
    index). At +-force, `offsets[m, j] = +force` for j >= k - 1 and `head_start[m] = k - 1 -
    phase_m` play `NearestBS(k, retry=True)` with those phases. `slots` as in
    `with_upload_offsets` (`obs` `[..., M, D]` or `[..., T, M, D]`); with one slot, `offsets`
    `[B, M, K]` and `head_start` `[B, M]` may be each environment's own; a new tensor."""
    out = outputs.clone()
    since = torch.round(obs[..., -1] * scale)  # [..., M] or [..., T, M]
    slot = torch.as_tensor(slots, dtype=since.dtype)
    slot = slot[:, None] if slot.dim() else slot  # [T, 1]: one slot per row of T
    since = torch.where(since == slot, since + head_start, since)
    j = since.clamp(0, offsets.shape[-1] - 1).long()
    if offsets.dim() == 3:
        out[..., 1] += offsets.gather(-1, j[..., None])[..., 0].to(out.dtype)
    else:
        out[..., 1] += offsets[torch.arange(offsets.shape[0]), j].to(out.dtype)
    return out


class GreedyActions(nn.Module):
    """The BSs' greedy actions from their observations: what a trained learner does, as one
    module (the MLflow model of a run). `obs[B, T, M, D]` (an episode's slots from the start,
    float32) -> `actions[B, T, M]` (int64, `dntsync.env.actions` codes, masked to the users
    each BS covers)."""

    def __init__(self, nets: AgentQNets, offsets: Tensor | None = None,
                 retry: tuple[Tensor, Tensor, Tensor] | None = None) -> None:
        super().__init__()
        self.nets = copy.deepcopy(nets).requires_grad_(False)
        # BS m's upload term + offsets[m, t mod K] in slot t (the learner's upload offsets)
        self.register_buffer("offsets", None if offsets is None else offsets.detach().clone())
        # + retry_offsets[m, j], j the slots since its last success (`with_retry_offsets`)
        for name, value in zip(("retry_offsets", "retry_head_start", "retry_scale"), retry or (None,) * 3):
            self.register_buffer(name, None if value is None else value.detach().clone())

    @torch.no_grad()
    def forward(self, obs: Tensor) -> Tensor:
        outputs = self.nets.head_outputs(self.nets.unroll(obs), obs)
        if self.offsets is not None:
            outputs = with_upload_offsets(outputs, self.offsets, torch.arange(obs.shape[1]))
        if self.retry_offsets is not None:
            outputs = with_retry_offsets(outputs, obs, self.retry_offsets, self.retry_head_start,
                                         self.retry_scale, torch.arange(obs.shape[1]))
        covered = self.nets.users(obs)[..., COVERED_FEATURE] > 0.5
        return self.nets.masked_max(outputs, covered)[1]


class AgentQNets(nn.Module):
    """The M BSs' Q networks side by side (separate parameters; batched over time/envs only).

    Tensors are laid out `[B, T, M, ...]` (episodes, slots, agents), as in the replay.
    """

    def __init__(self, n_agents: int, obs_dim: int, hidden: int, n_users: int,
                 head: str = "flat", sparse_grad: bool = False, user_dim: int = 3,
                 association: dict | None = None, error_value: bool = False) -> None:
        super().__init__()
        self.n_users, self.user_dim = n_users, user_dim
        self.agents = nn.ModuleList(AgentQNet(obs_dim, hidden, n_users, head, sparse_grad, user_dim)
                                    for _ in range(n_agents))
        if association is not None and head == "flat":
            raise ValueError("the association needs a per-bit head (branching or factorised), not flat")
        # one score network for every BS (`Association`), or None: each head's own serve terms
        self.association = Association(association) if association is not None else None
        if error_value and head == "flat":
            raise ValueError("the error value needs a per-bit head (branching or factorised), not flat")
        # each BS's value of the DNT-error term, (e_0, e_upload) from its state, or None
        self.error_terms = (nn.ModuleList(nn.Linear(hidden, 2) for _ in range(n_agents))
                            if error_value else None)
        # 1: every BS serves each user it covers (its serve term forced up; the association
        # still gives a shared user to one BS), as the nearest-BS rule does; 0: the learnt
        # serve terms. Set after training (`dntsync.marl.offsets.fit_serve_covered`), kept
        # in the model file.
        self.register_buffer("serve_covered", torch.zeros(()))

    def sparse_parameters(self) -> list[nn.Parameter]:
        """The parameters whose gradients are sparse (the flat heads with `sparse_grad`)."""
        return [p for net in self.agents if net.head.sparse_grad for p in net.head.parameters()]

    @property
    def hidden(self) -> int:
        return self.agents[0].hidden

    def unroll(self, obs: Tensor, state: Tensor | None = None) -> Tensor:
        """`obs[B, T, M, D]`, `state[B, M, h]` (None: zeros) -> hidden states `[B, T, M, h]`.

        Each agent's encoder and `nn.GRUCell` slot by slot, done for the M agents at once:
        their weights are stacked (each agent keeps its own parameters) so that the encoder
        and the GRU's input projections of all T slots are two batched matmuls, and each slot
        needs one batched `[M, B, h] x [M, h, 3h]` matmul plus the gate arithmetic
        (`gru_states`). On the small nets here the per-call overhead dominates, so this is
        about twice as fast as M x T separate GRUCell calls (benchmarks/bench_marl.py).
        """
        agents = self.agents
        n_b, n_t, n_m, _ = obs.shape
        h = self.hidden
        enc_w = torch.stack([a.encoder.weight for a in agents])  # [M, h, D]
        enc_b = torch.stack([a.encoder.bias for a in agents])  # [M, h]
        w_ih = torch.stack([a.cell.weight_ih for a in agents])  # [M, 3h, h]
        b_ih = torch.stack([a.cell.bias_ih for a in agents])
        w_hh = torch.stack([a.cell.weight_hh for a in agents]).transpose(1, 2)  # [M, h, 3h]
        b_hh = torch.stack([a.cell.bias_hh for a in agents])[:, None, :]  # [M, 1, 3h]
        x = obs.permute(2, 1, 0, 3).reshape(n_m, n_t * n_b, -1)  # [M, T*B, D]
        x = torch.relu(torch.baddbmm(enc_b[:, None, :], x, enc_w.transpose(1, 2)))
        gi = torch.baddbmm(b_ih[:, None, :], x, w_ih.transpose(1, 2)).view(n_m, n_t, n_b, 3 * h)
        s = obs.new_zeros(n_m, n_b, h) if state is None else state.transpose(0, 1)
        states = gru_states(gi, s, w_hh, b_hh)  # [T, M, B, h]
        return states.permute(2, 0, 1, 3)  # [B, T, M, h]

    def users(self, obs: Tensor) -> Tensor:
        """Each user's numbers from observations: `obs[..., M, D]` -> `[..., M, U, user_dim]`."""
        return obs[..., : self.n_users * self.user_dim].unflatten(-1, (self.n_users, self.user_dim))

    def head_outputs(self, hidden: Tensor, obs: Tensor) -> Tensor:
        """What the heads' `q` and `masked_max` read, `[..., M, F]`, from the hidden states
        `[..., M, h]` and the slots' observations `[..., M, D]`: the hidden states themselves
        (flat head) or the per-bit terms (F = U + 2, the error value's in the first two),
        computed once for both questions."""
        if all(isinstance(net.head, FlatHead) for net in self.agents):
            return hidden
        h, users = hidden.shape[-1], self.users(obs)
        lead = hidden.shape[:-2]
        terms = torch.stack([net.head.outputs(hidden[..., m, :].reshape(-1, h),
                                              users[..., m, :, :].reshape(-1, self.n_users, self.user_dim))
                             for m, net in enumerate(self.agents)], dim=1).view(*lead, len(self.agents), -1)
        if bool(self.serve_covered):
            serve = terms[..., 2:]
            forced = torch.where(users[..., COVERED_FEATURE] > 0.5, torch.ones_like(serve), serve)
            terms = torch.cat([terms[..., :2], forced], dim=-1)
        terms = terms if self.association is None else self.association(terms, users)
        if self.error_terms is None:
            return terms
        return torch.cat([terms[..., :2] + self.error_outputs(hidden), terms[..., 2:]], dim=-1)

    def error_outputs(self, hidden: Tensor) -> Tensor:
        """Each BS's error-value terms (e_0, e_upload) from its state: `[..., M, h]` -> `[..., M, 2]`."""
        return torch.stack([lin(hidden[..., m, :]) for m, lin in enumerate(self.error_terms)], dim=-2)

    def error_value(self, hidden: Tensor, actions: Tensor) -> Tensor:
        """E of the actions, e_0 + upload * e_upload: `hidden[..., M, h]`, `actions[..., M]` -> `[..., M]`."""
        e = self.error_outputs(hidden)
        return e[..., 0] + (actions & 1).to(e.dtype) * e[..., 1]

    def q(self, outputs: Tensor, actions: Tensor) -> Tensor:
        """Q of the taken actions: `outputs[..., M, F]` (`head_outputs`), `actions[..., M]` -> `[..., M]`."""
        f = outputs.shape[-1]
        return torch.stack([net.head.q(outputs[..., m, :].reshape(-1, f), actions[..., m].reshape(-1))
                            for m, net in enumerate(self.agents)], dim=-1).view(actions.shape)

    def masked_max(self, outputs: Tensor, covered: Tensor) -> tuple[Tensor, Tensor]:
        """Max and argmax over valid actions: `outputs[..., M, F]`, `covered[..., M, U]` -> `[..., M]`."""
        f, n_users = outputs.shape[-1], covered.shape[-1]
        shape = covered.shape[:-1]
        heads = [net.head for net in self.agents]
        if all(isinstance(hd, FlatHead) for hd in heads):  # one grouping for all the BSs' rows
            x = outputs.reshape(-1, len(heads), f).transpose(0, 1)  # [M, R, h]
            values, best = flat_masked_max(heads, x, covered.reshape(-1, len(heads), n_users).transpose(0, 1))
            return values.T.reshape(shape), best.T.reshape(shape)
        outs = [net.head.masked_max(outputs[..., m, :].reshape(-1, f),
                                    covered[..., m, :].reshape(-1, n_users))
                for m, net in enumerate(self.agents)]
        return (torch.stack([v for v, _ in outs], dim=-1).view(shape),
                torch.stack([a for _, a in outs], dim=-1).view(shape))
