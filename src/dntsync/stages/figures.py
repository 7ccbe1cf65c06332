"""Draw Figs. 3-6 from the pipeline's metrics, and write the same data as CSV for `dvc plots`.

Fig. 2 is drawn by `train-twin` (it needs the model). Inputs: the per-seed curves and the
summaries of `train-marl` (Fig. 3), `metrics/sweep_fig4.json` and `sweep_fig5.json`
(Figs. 4, 5) and `metrics/fig6_episode.json` (Fig. 6). Outputs: `figures/fig3..6_*.png` and
`figures/data/*.csv`.
"""

from __future__ import annotations

import json
from pathlib import Path

from dntsync.config import Config
from dntsync.errors import UserError
from dntsync.files import write_csv
from dntsync.metrics import HEADLINE_METRICS
from dntsync.plots import convergence_figure, episode_figure, sweep_figure

FIGURES = Path("figures")
DATA = FIGURES / "data"
METRICS_DIR = Path("metrics")


def write_rows(path: Path, rows: list[dict]) -> None:
    write_csv(path, list(rows[0]), rows)


def sweep_rows(sweep: dict) -> list[dict]:
    rows = []
    for p in sweep["points"]:
        for algo in sweep["algos"]:
            res = p["algos"][algo]
            rows.append({sweep["key"]: p["value"], "policy": algo,
                         **{f"{m}_{s}": res[m][s] for m in HEADLINE_METRICS
                            for s in ("mean", "std")}})
        for name, res in p.get("baselines", {}).items():
            rows.append({sweep["key"]: p["value"], "policy": name,
                         **{f"{m}_{s}": res[m][s] for m in HEADLINE_METRICS
                            for s in ("mean", "std")}})
    return rows


def episode_rows(trace: dict) -> list[dict]:
    rows = []
    for algo, runs in trace["learners"].items():
        for i, seed in enumerate(trace["seeds"]):
            for t in range(trace["slots"]):
                rows.append({"slot": t + 1, "policy": f"{algo}_seed{seed}",
                             "dnt_updates": runs["dnt_updates"][i][t],
                             "dnt_error": runs["dnt_error"][i][t]})
    return rows


def run(cfg: Config, args) -> int:
    curves = {a: sorted((Path(cfg.marl.outputs.metrics_dir) / "curves").glob(f"marl_{a}_seed*.csv"))
              for a in cfg.sweeps.fig3_algos}
    # the setting and the references (same evaluation episodes for every run) of one run
    first = f"marl_{cfg.sweeps.fig3_algos[0]}_seed{cfg.marl.seeds[0]}.json"
    summary = Path(cfg.marl.outputs.metrics_dir) / first
    inputs = [summary, METRICS_DIR / "sweep_fig4.json", METRICS_DIR / "sweep_fig5.json",
              METRICS_DIR / "fig6_episode.json"]
    missing = [str(p) for p in inputs if not p.exists()]
    missing += [f"curves of {a}" for a, paths in curves.items() if not paths]
    if missing:
        raise UserError(f"cannot draw the figures, missing: {missing}; run `dvc repro`")

    made = [convergence_figure(curves, summary, FIGURES / "fig3_convergence.png")]
    for name, label, xlabel in (("fig4", "eps", "reward weight eps"),
                                ("fig5", "users", "number of users U")):
        sweep = json.loads((METRICS_DIR / f"sweep_{name}.json").read_text())
        title = f"Fig. {name[3:]}: VDN vs IQL ({', '.join(sweep['fixed'])})"
        made.append(sweep_figure(sweep, FIGURES / f"{name}_{label}.png", xlabel=xlabel, title=title))
        write_rows(DATA / f"{name}_{label}.csv", sweep_rows(sweep))
    trace = json.loads((METRICS_DIR / "fig6_episode.json").read_text())
    made.append(episode_figure(trace, FIGURES / "fig6_episode.png",
                               title=f"Fig. 6: one episode at {trace['point']} "
                                     f"({', '.join(trace['overrides'][:-1])})"))
    write_rows(DATA / "fig6_episode.csv", episode_rows(trace))
    print("wrote " + ", ".join(str(p) for p in made))
    return 0
