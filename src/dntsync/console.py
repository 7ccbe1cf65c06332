"""Keep the console to what a user reads: our progress and results, not the libraries' notes.

Lightning announces the accelerators ("GPU available: False ...") and a logging tip on
every Trainer, through its `rank_zero` loggers; torch 2.13 warns about Lightning's use of
`LeafSpec`; MLflow finds its local-file dataset source registered twice and says so on
every data set logged. Raised to WARNING (and those two warnings filtered) once per process:
in the CLI and in every sweep worker. Our own warnings and errors still show.
"""

from __future__ import annotations

import logging
import warnings

RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


def quiet_libraries() -> None:
    for name in RANK_ZERO_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
    warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
