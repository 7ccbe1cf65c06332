"""Hyper-parameter search with Optuna over the typed config (`dntsync tune`, docs/tuning.md).

`space` reads and checks the search space in `conf/search_space.yaml`; `study` runs a study
(storage, seeded TPE sampler, median pruner, one MLflow run per trial); `report` writes the
best parameters as a config overlay and the study's figures.
"""

from dntsync.tuning.space import Knob, apply_values, load_space, nested
from dntsync.tuning.study import OBJECTIVES, Objective, StudySummary, run_study, study_name

__all__ = [
    "Knob",
    "OBJECTIVES",
    "Objective",
    "StudySummary",
    "apply_values",
    "load_space",
    "nested",
    "run_study",
    "study_name",
]
