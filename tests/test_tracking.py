"""MLflow as its users expect it: artifacts beside the store, not wherever a command runs."""

from __future__ import annotations

import mlflow

from dntsync.config import from_dict
from dntsync.marl.training import run_label
from dntsync.tracking import mlflow_run


def test_artifacts_go_beside_the_sqlite_store_not_into_the_working_folder(tmp_path, monkeypatch):
    work, store = tmp_path / "work", tmp_path / "store"
    work.mkdir()
    monkeypatch.chdir(work)
    cfg = from_dict({"tracking": {"mlflow_uri": f"sqlite:///{store / 'mlflow.db'}"}})
    with mlflow_run(cfg, "marl", run_name="a run"):
        mlflow.log_text("hello", "note.txt")
    assert list(work.iterdir()) == []
    assert len(list((store / "mlartifacts" / "dntsync-marl").glob("*/artifacts/note.txt"))) == 1


def test_run_names_say_sweep_point_algorithm_and_seed():
    assert run_label({"sweep": "fig4", "point": "eps=0.5"}, "vdn", 1) == "fig4 eps=0.5 vdn s1"
    assert run_label({"sweep": "fig3"}, "iql", 0) == "fig3 iql s0"
