"""Every figure of the pipeline: curves over seeds (mean line, spread band), sweeps, episodes.

`curves_figure` is the generic piece: any `{label: (x, Y[runs, points])}` with labelled
horizontal references. `convergence_figure` is Fig. 3 (average reward per training epoch,
VDN vs IQL, eps 0.3, N 12) built from the per-seed curve CSVs that `dntsync train-marl`
writes and the baselines in its metrics JSON (the oracle and the best heuristic).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from dntsync.files import save_figure

SPREADS = ("std", "minmax")


def band(ax, x: np.ndarray, runs: np.ndarray, label: str, spread: str = "std", color=None) -> None:
    """Mean over runs as a line and the spread over runs as a band (`std`: +-1 std; `minmax`)."""
    runs = np.atleast_2d(np.asarray(runs, dtype=float))
    mean = runs.mean(axis=0)
    if spread == "std":
        low, high = mean - runs.std(axis=0), mean + runs.std(axis=0)
    elif spread == "minmax":
        low, high = runs.min(axis=0), runs.max(axis=0)
    else:
        raise ValueError(f"spread = {spread!r} is invalid: choose from {SPREADS}")
    (line,) = ax.plot(x, mean, label=f"{label} (n={len(runs)})", color=color, lw=1.8)
    if len(runs) > 1:
        ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2, lw=0)


def curves_figure(series: Mapping[str, tuple[Sequence[float], np.ndarray]],
                  references: Mapping[str, float], out_png: str | Path, *, xlabel: str,
                  ylabel: str, title: str = "", spread: str = "std") -> Path:
    """Curves with mean and spread over runs, plus labelled horizontal reference lines."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2), constrained_layout=True)
    for label, (x, runs) in series.items():
        band(ax, np.asarray(x, dtype=float), runs, label, spread)
    styles = ("--", ":", "-.")
    for i, (label, value) in enumerate(references.items()):
        ax.axhline(value, color="0.3", ls=styles[i % len(styles)], lw=1.2,
                   label=f"{label} ({value:.2f})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out_png)


def read_curves(csv_paths: Sequence[str | Path], column: str,
                x_column: str = "epoch") -> tuple[np.ndarray, np.ndarray]:
    """`(x, Y[runs, points])` from per-run curve CSVs, at the x values every run has a value."""
    per_run = []
    for path in csv_paths:
        with Path(path).open() as f:
            per_run.append({float(row[x_column]): float(row[column])
                            for row in csv.DictReader(f) if row.get(column) not in ("", None)})
    xs = sorted(set.intersection(*(set(r) for r in per_run)))
    if not xs:
        raise ValueError(f"no {x_column} with a {column!r} value in every one of {list(csv_paths)}")
    return np.array(xs), np.array([[r[x] for x in xs] for r in per_run])


def reference_lines(baselines: Mapping[str, Mapping], metric: str = "team_reward") -> dict[str, float]:
    """The oracle and the best heuristic (not random) from an evaluation's baselines."""
    refs = {}
    if "oracle" in baselines:
        refs["myopic oracle"] = baselines["oracle"][metric]["mean"]
    heuristics = {n: r for n, r in baselines.items() if n not in ("oracle", "random")}
    if heuristics:
        best = max(heuristics, key=lambda n: heuristics[n][metric]["mean"])
        refs[f"best heuristic: {best}"] = heuristics[best][metric]["mean"]
    return refs


def convergence_figure(curve_csvs_by_algo: Mapping[str, Sequence[str | Path]],
                       baselines_json: str | Path, out_png: str | Path,
                       column: str = "eval_team_reward", spread: str = "std") -> Path:
    """Fig. 3: average team reward per step against the training epoch, one band per
    algorithm over its seeds, with the oracle and the best heuristic as horizontal lines.

    `column` "eval_team_reward" is the greedy policy on the fixed evaluation episodes (what
    the references are measured on); "train_reward" is the epsilon-greedy collection.
    """
    series = {algo.upper(): read_curves(paths, column) for algo, paths in curve_csvs_by_algo.items()}
    report = json.loads(Path(baselines_json).read_text())
    setting = ""
    if "eps" in report.get("scenario", {}):
        setting = f" (eps {report['scenario']['eps']}, N {report['scenario']['n_rbs']})"
    what = "greedy evaluation" if column.startswith("eval_") else "training (epsilon-greedy)"
    return curves_figure(series, reference_lines(report.get("baselines", {})), out_png,
                         xlabel="training epoch g", ylabel="average reward per step",
                         title=f"Convergence of VDN and IQL{setting}: {what}", spread=spread)


# ---------------------------------------------------------------------- Figs. 4-6
SWEEP_PANELS = (("dnt_error", "average DNT error per step (m$^2$/user)"),
                ("sum_rate", "average sum data rate per step (bit/s/Hz x B)"))
REFERENCE_POLICIES = ("oracle", "nearest-always")


def sweep_figure(sweep: Mapping, out_png: str | Path, *, xlabel: str, title: str) -> Path:
    """Figs. 4 and 5: average DNT error and average data rate against the swept value, one
    line per learner (mean over seeds, error bars +-1 std), with the oracle and the
    nearest-BS always-upload heuristic dashed for reference."""
    points = sweep["points"]
    x = np.array([p["value"] for p in points], dtype=float)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, (metric, ylabel) in zip(axes, SWEEP_PANELS):
        for algo in sweep["algos"]:
            mean = [p["algos"][algo][metric]["mean"] for p in points]
            std = [p["algos"][algo][metric]["std"] for p in points]
            ax.errorbar(x, mean, yerr=std, marker="o", capsize=3, lw=1.8,
                        label=f"{algo.upper()} (n={len(sweep['seeds'])} seeds)")
        for name, style in zip(REFERENCE_POLICIES, ("--", ":")):
            if all(name in p.get("baselines", {}) for p in points):
                ax.plot(x, [p["baselines"][name][metric]["mean"] for p in points], style,
                        color="0.35", lw=1.2, label=name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_xticks(x)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, out_png)


EPISODE_PANELS = (("dnt_updates", "BSs updating the DNT"), ("dnt_error", "DNT error (m$^2$/user)"))


def episode_figure(trace: Mapping, out_png: str | Path, *, title: str) -> Path:
    """Fig. 6: per slot of one evaluation episode, the number of BSs that updated the DNT
    and the DNT error, one line per learner (mean over seeds, band +-1 std)."""
    slots = np.arange(1, trace["slots"] + 1)
    fig, axes = plt.subplots(2, 1, figsize=(7, 6), sharex=True, constrained_layout=True)
    for ax, (metric, ylabel) in zip(axes, EPISODE_PANELS):
        for algo, runs in trace["learners"].items():
            band(ax, slots, np.asarray(runs[metric]), algo.upper())
        if "nearest-always" in trace.get("baselines", {}):
            ax.plot(slots, trace["baselines"]["nearest-always"][metric], "--", color="0.35",
                    lw=1.2, label="nearest-always")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[-1].set_xlabel("slot t of the episode")
    fig.suptitle(title)
    return _save(fig, out_png)


def _save(fig, out_png: str | Path) -> Path:
    out = Path(out_png)
    save_figure(fig, out, dpi=150)
    plt.close(fig)
    return out
