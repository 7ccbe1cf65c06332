"""The typed config: docs/model.md defaults, conf/params.yaml, validation messages, overrides, CLI."""

from __future__ import annotations

import pytest
import yaml

from dntsync.cli import main
from dntsync.config import Config, ConfigError, from_dict, load_config, parse_override


def test_defaults_are_spec_values():
    cfg = from_dict({})
    sc = cfg.scenario
    assert sc.n_users == 12
    assert sc.n_rbs == 12
    assert sc.eps == 0.3
    assert sc.rho == -10.0
    assert sc.coverage_radius == 60.0
    assert sc.bs_positions == ((-100.0, 0.0), (0.0, 0.0), (100.0, 0.0))
    assert sc.n_bs == 3
    assert sc.cloud_position == (0.0, 50.0)
    assert (sc.area_x, sc.area_y) == ((-150.0, 150.0), (-50.0, 50.0))
    assert (sc.bandwidth, sc.power, sc.noise_density) == (1.0, 1.0, 1e-5)
    assert sc.path_loss_exponent == 2.0
    assert sc.step_length == 1.0
    assert (sc.data_per_user, sc.delay_limit) == (0.25, 1.0)
    assert sc.episode_length == 30
    assert cfg.twin.window == 5
    assert cfg.twin.hidden == 128
    assert cfg.twin.lr == 1e-3
    assert cfg.marl.algorithm.epochs == 75
    assert cfg.marl.algorithm.gamma == 0.2
    assert cfg.marl.algorithm.lr == 2e-3  # the default learner's; Table II's: the paper profile's
    assert cfg.marl.network.hidden == 128
    assert cfg.data.n_trajectories == 2000


def test_paper_profile_is_the_paper_literal_learner(repo_root):
    """conf/profiles/paper.yaml: flat head, positions-only local state, Table II."""
    from dntsync.config import merge, read_yaml

    params = read_yaml((repo_root / "conf" / "params.yaml").read_text())
    paper = from_dict(merge(params, read_yaml((repo_root / "conf/profiles/paper.yaml").read_text())))
    algorithm, network = paper.marl.algorithm, paper.marl.network
    assert (network.head, algorithm.lr, algorithm.epochs, algorithm.gamma, network.hidden) == \
        ("flat", 1e-4, 75, 0.2, 128)
    assert (paper.env.observation, paper.env.obs_frame, paper.env.user_features) == \
        ("positions_only", "area", ())
    assert paper.marl.collection.exploration == "action" and algorithm.target_update_epochs >= 1
    assert not network.association and algorithm.error_gamma == 0  # one Q per BS
    assert paper.marl.upload_offsets.phases == 0  # the greedy policy as trained
    assert paper.marl.collection.epsilon_end == 0.05  # the default learner ends greedy (0.0)


def test_params_yaml_equals_embedded_defaults(repo_root):
    path = repo_root / "conf" / "params.yaml"
    assert path.exists()
    loaded = load_config(path)
    assert loaded == Config()
    assert loaded.to_dict() == from_dict({}).to_dict()


def test_to_dict_round_trips():
    cfg = from_dict({"seed": 4, "scenario": {"n_users": 7, "eps": 0.6}})
    assert from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "data, key, value",
    [
        ({"scenario": {"n_users": 0}}, "scenario.n_users", "0"),
        ({"scenario": {"n_rbs": 0}}, "scenario.n_rbs", "0"),
        ({"scenario": {"eps": 0.0}}, "scenario.eps", "0.0"),
        ({"scenario": {"eps": 1.0}}, "scenario.eps", "1.0"),
        ({"scenario": {"eps": 1.5}}, "scenario.eps", "1.5"),
        ({"scenario": {"eps": -0.2}}, "scenario.eps", "-0.2"),
        ({"scenario": {"rho": 0.0}}, "scenario.rho", "0.0"),
        ({"scenario": {"rho": 3.0}}, "scenario.rho", "3.0"),
        ({"scenario": {"coverage_radius": 0.0}}, "scenario.coverage_radius", "0.0"),
        ({"scenario": {"coverage_radius": -5.0}}, "scenario.coverage_radius", "-5.0"),
        ({"scenario": {"bs_positions": [[-100.0, 0.0], [200.0, 0.0]]}},
         "scenario.bs_positions[1]", "200.0"),
        ({"scenario": {"bs_positions": [[0.0, 60.0]]}}, "scenario.bs_positions[0]", "60.0"),
        ({"twin": {"window": 0}}, "twin.window", "0"),
        ({"seed": -1}, "seed", "-1"),
        # wrong types
        ({"scenario": {"n_users": "12"}}, "scenario.n_users", "'12'"),
        ({"scenario": {"n_users": 12.0}}, "scenario.n_users", "12.0"),
        ({"scenario": {"n_users": True}}, "scenario.n_users", "True"),
        ({"twin": {"window": 5.5}}, "twin.window", "5.5"),
        ({"marl": {"algorithm": {"epochs": False}}}, "marl.algorithm.epochs", "False"),
        ({"scenario": {"eps": "high"}}, "scenario.eps", "'high'"),
        ({"env": {"observation": "pixels"}}, "env.observation", "'pixels'"),
        ({"twin": {"self_feeding": 1}}, "twin.self_feeding", "1"),
        # the association needs a per-bit head
        ({"marl": {"network": {"head": "flat"}}}, "marl.network.association", "True"),
        # so does the error value; its discount is below 1
        ({"marl": {"network": {"head": "flat", "association": False}}}, "marl.algorithm.error_gamma", "0.8"),
        ({"marl": {"algorithm": {"error_gamma": 1.0}}}, "marl.algorithm.error_gamma", "1.0"),
        # so do upload offsets; their validation episodes are not the evaluation's; the grid
        ({"marl": {"network": {"head": "flat", "association": False},
                   "algorithm": {"error_gamma": 0}}}, "marl.upload_offsets.phases", "2"),
        ({"marl": {"network": {"head": "flat", "association": False}, "algorithm": {"error_gamma": 0},
                   "upload_offsets": {"phases": 0}}}, "marl.network.serve_covered_fit", "True"),
        ({"marl": {"upload_offsets": {"seed": 10_010}}}, "marl.upload_offsets.seed", "10010"),
        ({"marl": {"upload_offsets": {"grid": [1.0, 0.0]}}}, "marl.upload_offsets.grid", "[1.0, 0.0]"),
        ({"marl": {"upload_offsets": {"grid": [-1.0, 1.0]}}}, "marl.upload_offsets.grid", "[-1.0, 1.0]"),
        ({"marl": {"upload_offsets": {"phases": -1}}}, "marl.upload_offsets.phases", "-1"),
        ({"marl": {"upload_offsets": {"passes": 0}}}, "marl.upload_offsets.passes", "0"),
        ({"marl": {"upload_offsets": {"force": 3.0}}}, "marl.upload_offsets.force", "3.0"),
        ({"marl": {"upload_offsets": {"periods": [5, 1]}}}, "marl.upload_offsets.periods", "[5, 1]"),
        ({"marl": {"upload_offsets": {"periods": [2, 5]}}}, "marl.upload_offsets.periods", "[2, 5]"),
        ({"marl": {"evaluation": {"tuned_max": -1}}}, "marl.evaluation.tuned_max", "-1"),
        # the retry offsets: periods of two slots or more; they read the "full" observation
        ({"marl": {"upload_offsets": {"retry_periods": [3, 1]}}}, "marl.upload_offsets.retry_periods", "[3, 1]"),
        ({"marl": {"upload_offsets": {"retry_tuned_max": -1}}}, "marl.upload_offsets.retry_tuned_max", "-1"),
        ({"env": {"observation": "positions_only"}}, "marl.upload_offsets.retry_periods", "[2, 3, 4, 5, 6, 10]"),
        ({"marl": {"network": {"association_slopes": [1.0, 3.0]}}}, "marl.network.association_slopes", "[1.0, 3.0]"),
        ({"marl": {"network": {"association_slopes": [0.0, 3.0, 1.0]}}}, "marl.network.association_slopes", "[0.0, 3.0, 1.0]"),
    ],
)
def test_bad_values_are_rejected_naming_key_and_value(data, key, value):
    with pytest.raises(ConfigError) as err:
        from_dict(data)
    message = str(err.value)
    assert key in message
    assert value in message


@pytest.mark.parametrize(
    "data, key",
    [
        ({"bogus": 1}, "bogus"),
        ({"scenario": {"n_user": 3}}, "scenario.n_user"),
        ({"twin": {"hiden": 3}}, "twin.hiden"),
        ({"marl": {"algorithm": {"name": "vdn", "lr_q": 0.1}}}, "marl.algorithm.lr_q"),
        ({"marl": {"lr": 0.1}}, "marl.lr"),  # a knob outside its section
    ],
)
def test_unknown_keys_are_rejected(data, key):
    with pytest.raises(ConfigError, match="unknown key") as err:
        from_dict(data)
    assert key in str(err.value)


def test_section_must_be_a_mapping():
    with pytest.raises(ConfigError, match="scenario"):
        from_dict({"scenario": 3})


def test_parse_override_reads_yaml_scalars():
    assert parse_override("scenario.n_users=20") == ("scenario.n_users", 20)
    assert parse_override("scenario.eps=0.25") == ("scenario.eps", 0.25)
    assert parse_override("twin.self_feeding=false") == ("twin.self_feeding", False)
    assert parse_override("env.predictor=drift") == ("env.predictor", "drift")
    assert parse_override("marl.seeds=[4, 5]") == ("marl.seeds", [4, 5])
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_override("scenario.n_users")


def test_overrides_accept_scientific_notation():
    """`--set marl.algorithm.lr=1e-4` is how a sweep passes a learning rate; YAML 1.1 (PyYAML) reads
    `1e-4` (no dot) as a string, so the override must still end up as the number 1e-4."""
    cfg = load_config(None, ["marl.algorithm.lr=1e-4", "scenario.noise_density=1e-6"])
    assert cfg.marl.algorithm.lr == 1e-4
    assert cfg.scenario.noise_density == 1e-6


def test_dotted_overrides_apply_on_top_of_the_file(repo_root, tmp_path):
    cfg = load_config(repo_root / "conf" / "params.yaml",
                      ["scenario.n_users=20", "scenario.eps=0.8", "marl.seeds=[7]", "seed=9"])
    assert cfg.scenario.n_users == 20
    assert cfg.scenario.eps == 0.8
    assert cfg.marl.seeds == (7,)
    assert cfg.seed == 9
    assert cfg.scenario.n_rbs == 12  # untouched keys keep the file's value
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("scenario:\n  n_rbs: 9\n  eps: 0.5\n")
    cfg = load_config(repo_root / "conf" / "params.yaml", ["scenario.eps=0.4"], [overlay])
    assert (cfg.scenario.n_rbs, cfg.scenario.eps) == (9, 0.4)  # --set wins over the overlay


def test_override_values_are_validated(repo_root):
    with pytest.raises(ConfigError, match="scenario.n_users"):
        load_config(repo_root / "conf" / "params.yaml", ["scenario.n_users=0"])
    with pytest.raises(ConfigError, match="scenario.n_usrs"):
        load_config(repo_root / "conf" / "params.yaml", ["scenario.n_usrs=4"])


def test_missing_explicit_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_section_hash_tracks_only_its_sections():
    a = from_dict({})
    b = from_dict({"marl": {"algorithm": {"epochs": 3}}})
    c = from_dict({"scenario": {"n_users": 3}})
    assert a.section_hash("scenario", "data") == b.section_hash("scenario", "data")
    assert a.section_hash("scenario", "data") != c.section_hash("scenario", "data")


def test_cli_rejects_bad_override(capsys, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    assert main(["show-config", "--set", "scenario.n_users=0"]) == 2
    captured = capsys.readouterr()
    assert "scenario.n_users" in captured.err
    assert "0" in captured.err
    assert captured.out == ""


def test_cli_show_config_with_params_file(capsys, tmp_path):
    params = tmp_path / "p.yaml"
    params.write_text("seed: 5\nscenario:\n  n_users: 6\n  eps: 0.25\n")
    assert main(["show-config", "--params", str(params), "--set", "scenario.n_rbs=9"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["seed"] == 5
    assert shown["scenario"]["n_users"] == 6
    assert shown["scenario"]["eps"] == 0.25
    assert shown["scenario"]["n_rbs"] == 9
    # the printed YAML is itself a valid parameter file describing the same config
    assert from_dict(shown) == load_config(params, ["scenario.n_rbs=9"])
