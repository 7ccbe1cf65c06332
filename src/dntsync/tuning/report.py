"""A study's outputs: the best parameters as a config overlay, and its figures."""

from __future__ import annotations

import datetime
import warnings
from pathlib import Path

import optuna
import yaml
from optuna.trial import TrialState

from dntsync.files import save_figure, write_text
from dntsync.tuning.space import Knob, nested

PARAMS_FILE = "conf/params.yaml"  # the file DVC reads (dvc.yaml `params:`)


def masked_url(url: str) -> str:
    """A database URL with its password hidden (for logs, MLflow and file headers)."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy can parse: say nothing of it
        return "<storage>"


def state_counts(study: optuna.Study) -> dict[str, int]:
    counts = {state.name.lower(): 0 for state in TrialState}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name.lower()] += 1
    return counts


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The best complete trial, or None when the study has none."""
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return None
    return study.best_trial


def write_best_params(study: optuna.Study, knobs: tuple[Knob, ...], path: Path, *,
                      metric: str, train_command: str, storage: str) -> Path | None:
    """Write the best trial's values as a config overlay (nested keys) to `path`.

    The file is accepted by every command's `--config` (e.g. `dntsync train-marl --config
    conf/tuned/marl-vdn.yaml`); its header gives the equivalent `dvc exp run -S` command.
    Returns None (and writes nothing) when the study has no complete trial yet.
    """
    best = best_trial(study)
    if best is None:
        return None
    values = {k.key: best.params[k.name] for k in knobs if k.name in best.params}
    dvc_sets = " ".join(f"-S {PARAMS_FILE}:{key}={value!r}" for key, value in values.items())
    counts = state_counts(study)
    header = [
        f"Best parameters of Optuna study {study.study_name!r} ({masked_url(storage)}),",
        f"trial {best.number}: {metric} = {best.value:.6g} ({study.direction.name.lower()}), "
        f"out of {counts['complete']} complete, {counts['pruned']} pruned, "
        f"{counts['fail']} failed trials; written {datetime.datetime.now():%Y-%m-%d %H:%M}.",
        f"Use:  {train_command} --config {path}",
        f"DVC:  dvc exp run {dvc_sets}",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(f"# {line}\n" for line in header)
    write_text(path, text + yaml.safe_dump(nested(values), sort_keys=False))
    return path


def save_figures(study: optuna.Study, directory: Path, name: str,
                 metric: str = "Objective Value") -> tuple[list[Path], list[str]]:
    """Optimisation history and parameter importances as PNGs; notes for those not drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    notes: list[str] = []

    def draw(kind: str, plot) -> None:
        path = directory / f"{name}-{kind}.png"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            ax = plot()
        ax.figure.tight_layout()
        save_figure(ax.figure, path, dpi=120)
        plt.close(ax.figure)
        written.append(path)

    if not complete:
        notes.append("no complete trial yet: no optimisation history, no importances")
        return written, notes
    draw("history", lambda: ovm.plot_optimization_history(study, target_name=metric))
    varying = [p for p in {p for t in complete for p in t.params}
               if len({repr(t.params.get(p)) for t in complete}) > 1]
    if len(complete) < 2 or not varying:
        notes.append(f"parameter importances need >= 2 complete trials with differing "
                     f"parameters; the study has {len(complete)} complete trial(s)")
        return written, notes
    try:
        draw("importances", lambda: ovm.plot_param_importances(study, target_name=metric))
    except (ValueError, RuntimeError, ZeroDivisionError) as err:
        plt.close("all")
        notes.append(f"parameter importances not computed: {err}")
    return written, notes
