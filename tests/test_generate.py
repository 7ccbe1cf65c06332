"""The data set stage: the npz file it writes, its split, and determinism per seed."""

from __future__ import annotations

import numpy as np

from dntsync.cli import main
from dntsync.config import apply_overrides, load_config
from dntsync.network import Scenario, move_probabilities
from dntsync.network.dataset import make_dataset


def test_generate_writes_the_dataset(small_params, tmp_path, capsys):
    out = tmp_path / "sub" / "t.npz"
    code = main(["generate", "--params", str(small_params), "--set", f"data.path={out}",
                 "--set", "data.n_trajectories=20", "--set", "scenario.episode_length=7"])
    assert code == 0
    assert str(out) in capsys.readouterr().out
    data = np.load(out)
    assert {"positions", "move_probs", "scenario_seed", "config_hash", "train_idx", "val_idx",
            "test_idx"} <= set(data.files)
    positions = data["positions"]
    assert positions.shape == (20, 7 + 1, 4, 2)
    assert data["move_probs"].shape == (4, 5)
    np.testing.assert_allclose(data["move_probs"], move_probabilities(Scenario(n_users=4)))
    assert int(data["scenario_seed"]) == 0
    cfg = load_config(small_params, [f"data.path={out}", "data.n_trajectories=20",
                                     "scenario.episode_length=7"])
    # the hash a consumer recomputes from the same config to detect a stale file
    assert str(data["config_hash"]) == cfg.data_hash()
    # ... which covers what the paths depend on, and nothing else
    assert cfg.data_hash() != apply_overrides(cfg, ["seed=4"]).data_hash()
    assert cfg.data_hash() != apply_overrides(cfg, ["scenario.step_length=2.0"]).data_hash()
    assert cfg.data_hash() == apply_overrides(cfg, ["scenario.eps=0.9", "scenario.n_rbs=5"]).data_hash()
    parts = [data["train_idx"], data["val_idx"], data["test_idx"]]
    assert all(len(p) >= 1 for p in parts)
    joined = np.concatenate(parts)
    assert len(joined) == 20 and set(joined.tolist()) == set(range(20))  # disjoint cover
    assert [len(p) for p in parts] == [16, 2, 2]  # the 0.8 / 0.1 / 0.1 split
    # every trajectory is a walk of eq. (1): unit steps or stays, inside the area
    steps = np.abs(np.diff(positions, axis=1)).sum(axis=-1)
    assert np.all(np.isclose(steps, 0.0, atol=1e-4) | np.isclose(steps, 1.0, atol=1e-4))
    assert np.all(np.abs(positions[..., 0]) <= 150) and np.all(np.abs(positions[..., 1]) <= 50)


def test_generate_rejects_bad_config(small_params, capsys):
    assert main(["generate", "--params", str(small_params), "--set", "data.n_trajectories=2"]) == 2
    assert "data.n_trajectories" in capsys.readouterr().err


def test_make_dataset_is_deterministic_per_seed(small_params):
    cfg = load_config(small_params)
    a, b = make_dataset(cfg), make_dataset(cfg)
    assert set(a) == set(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    other_seed = make_dataset(load_config(small_params, ["seed=4"]))
    assert not np.array_equal(a["positions"], other_seed["positions"])
    np.testing.assert_array_equal(a["move_probs"], other_seed["move_probs"])
    other_scenario = make_dataset(load_config(small_params, ["scenario.seed=1"]))
    assert not np.array_equal(a["move_probs"], other_scenario["move_probs"])
    assert a["config_hash"] != other_scenario["config_hash"]


def test_config_hash_covers_everything_the_data_depends_on(small_params):
    """The hash ties the file to the config it came from; `seed` draws the positions, so two
    files with different positions must not share a hash."""
    a = make_dataset(load_config(small_params))
    b = make_dataset(load_config(small_params, ["seed=4"]))
    assert not np.array_equal(a["positions"], b["positions"])
    assert a["config_hash"] != b["config_hash"]
