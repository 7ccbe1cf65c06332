"""The BS action space (Sec. III-C): an integer in [0, 2^(U+1)).

Bit 0 = upload (|y_m|), bit u+1 = serve user u (z_{m,u}). Bits of users outside a BS's
coverage are masked: never chosen and never maxed over. Masks are kept compact as the
coverage bits `covered[..., U]`; `action_mask` expands them to the full `[..., 2^(U+1)]`
vector only where an API needs it (PettingZoo, small tests).
"""

from __future__ import annotations

import numpy as np


def encode(upload: np.ndarray, serve: np.ndarray) -> np.ndarray:
    """`upload[...]` bool, `serve[..., U]` bool -> action integers `[...]` (int64)."""
    n_users = np.shape(serve)[-1]
    weights = np.left_shift(np.int64(1), np.arange(1, n_users + 1, dtype=np.int64))
    return np.asarray(upload, dtype=np.int64) + np.asarray(serve, dtype=np.int64) @ weights


def decode(action: np.ndarray, n_users: int) -> tuple[np.ndarray, np.ndarray]:
    """Action integers `[...]` -> (`upload[...]` bool, `serve[..., U]` bool)."""
    action = np.asarray(action, dtype=np.int64)
    bits = (action[..., None] >> np.arange(n_users + 1, dtype=np.int64)) & 1
    return bits[..., 0].astype(bool), bits[..., 1:].astype(bool)


def is_valid(action: np.ndarray, covered: np.ndarray) -> np.ndarray:
    """Whether each action serves only covered users: `[...]` bool."""
    n_users = np.shape(covered)[-1]
    action = np.asarray(action, dtype=np.int64)
    in_range = (action >= 0) & (action < 2 ** (n_users + 1))
    _, serve = decode(np.where(in_range, action, 0), n_users)
    return in_range & ~np.any(serve & ~covered, axis=-1)


def action_mask(covered: np.ndarray) -> np.ndarray:
    """Full validity mask `[..., 2^(U+1)]` (int8) from coverage bits `[..., U]`."""
    n_users = np.shape(covered)[-1]
    every = np.arange(2 ** (n_users + 1), dtype=np.int64)
    _, serve = decode(every, n_users)  # [A, U]
    forbidden = ~np.asarray(covered, dtype=bool)
    return (~np.any(serve & forbidden[..., None, :], axis=-1)).astype(np.int8)


def valid_actions(covered: np.ndarray) -> np.ndarray:
    """All valid actions of one BS with coverage bits `[U]`: 2^(1 + covered users) integers."""
    users = np.nonzero(np.asarray(covered, dtype=bool))[0]
    k = users.size
    subsets = (np.arange(2 ** (k + 1), dtype=np.int64)[:, None] >> np.arange(k + 1)) & 1
    weights = np.concatenate([[1], np.left_shift(np.int64(1), users + 1)]).astype(np.int64)
    return subsets @ weights


def random_valid(covered: np.ndarray, rng: np.random.Generator, p_upload: float = 0.5,
                 p_serve: float = 0.5) -> np.ndarray:
    """Uniformly random valid actions (each allowed bit on with its probability)."""
    covered = np.asarray(covered, dtype=bool)
    upload = rng.random(covered.shape[:-1]) < p_upload
    serve = (rng.random(covered.shape) < p_serve) & covered
    return encode(upload, serve)
