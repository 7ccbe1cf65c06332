"""Shared small fixtures: tiny scenarios and paths, built from the real classes."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Tiny models train several times faster on one thread than on two contended ones, and
# subprocesses started by tests inherit the setting.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
# hypothesis keeps its examples and caches outside the repository (default: .hypothesis/)
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY",
                      os.path.join(tempfile.gettempdir(), f"dntsync-hypothesis-{os.getuid()}"))

import pytest

from dntsync.network import Scenario

REPO_ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config) -> None:
    try:
        import torch
    except ImportError:  # the physics tests need no torch
        return
    torch.set_num_threads(1)


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture
def two_bs() -> Scenario:
    """Two BSs at (-100, 0) and (0, 0), two users, two RBs: small enough to compute by hand."""
    return Scenario(bs_positions=((-100.0, 0.0), (0.0, 0.0)), n_users=2, n_rbs=2)


@pytest.fixture
def tiny() -> Scenario:
    """Three BSs (the default geometry), five users, three RBs, short episodes."""
    return Scenario(n_users=5, n_rbs=3, episode_length=6)


@pytest.fixture
def small_params(tmp_path: Path) -> Path:
    """A small parameter file (4 users, episodes of 6 slots) written under `tmp_path`."""
    path = tmp_path / "params.yaml"
    path.write_text(
        "seed: 3\n"
        "scenario:\n"
        "  n_users: 4\n"
        "  n_rbs: 3\n"
        "  episode_length: 6\n"
        "data:\n"
        "  n_trajectories: 10\n"
        f"  path: {tmp_path / 'data.npz'}\n"
        "env:\n"
        "  predictor: drift\n"
    )
    return path
