"""Write `reports/RESULTS.md` from the pipeline's metrics: the paper's claims beside ours.

Every number comes from a file the pipeline wrote (`metrics/*.json`); the report names the
command that produced it. A claim we do not reproduce is stated as such.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from dntsync.config import Config
from dntsync.files import write_text
from dntsync.metrics import HEADLINE_METRICS, METRICS

OUT = Path("reports/RESULTS.md")
METRICS_DIR = Path("metrics")
PAPER_RESULTS = Path("docs/results/paper")  # `make paper` keeps its results here


def load(name: str, folder: Path = METRICS_DIR) -> dict | None:
    path = folder / name
    return json.loads(path.read_text()) if path.exists() else None


def pct(x: float) -> str:
    return f"{100 * x:+.1f}%"


def gain(vdn: np.ndarray, iql: np.ndarray, relative: bool = True) -> tuple[float, float, np.ndarray]:
    """VDN's advantage over IQL per seed (paired by seed index): mean, std, values."""
    vdn, iql = np.asarray(vdn, float), np.asarray(iql, float)
    per_seed = (vdn - iql) / np.abs(iql) if relative else vdn - iql
    return float(per_seed.mean()), float(per_seed.std()), per_seed


def fmt(mean: float, std: float, as_pct: bool = True) -> str:
    return f"{pct(mean)} ± {100 * std:.1f} pp" if as_pct else f"{mean:+.3f} ± {std:.3f}"


def verdict(ours: float, paper: float, spread: float) -> str:
    """A direction only when the mean difference is larger than its spread over seeds."""
    if abs(ours) <= spread:
        return "**not reproduced**: no difference beyond the spread over seeds"
    if np.sign(ours) == np.sign(paper):
        return "direction reproduced" + ("" if abs(ours) >= 0.5 * abs(paper) else ", smaller effect")
    return "**not reproduced**: the opposite direction"


HEURISTICS_EXCLUDED = ("oracle", "random")  # the best heuristic is the best of the others
ORACLE_SHARE = 0.95  # the bar: a learner at >= 95% of the myopic oracle's team reward


def best_baseline(baselines: dict) -> tuple[str, float]:
    names = [n for n in baselines if n not in HEURISTICS_EXCLUDED]
    best = max(names, key=lambda n: baselines[n]["team_reward"]["mean"])
    return best, baselines[best]["team_reward"]["mean"]


def against_heuristic(gap: float, spread: float) -> str:
    """VDN - the best heuristic: a direction only when it is larger than VDN's spread over
    seeds (the heuristic plays the same episodes the same way whatever the seed)."""
    if abs(gap) <= spread:
        return "tie: within the spread over seeds"
    return "above" if gap > 0 else "below"


def bar_row(where: str, vdn: float, vdn_std: float, baselines: dict, with_oracle: bool) -> str:
    """One setting of `bars_table`; the bar asks the oracle share only `with_oracle`."""
    name, heuristic = best_baseline(baselines)
    oracle = baselines.get("oracle", {}).get("team_reward", {}).get("mean", float("nan"))
    ratio = vdn / oracle if oracle else float("nan")
    met = vdn >= heuristic and (ratio >= ORACLE_SHARE or not with_oracle)
    gap = vdn - heuristic
    return (f"| {where} | {vdn:.3f} ± {vdn_std:.3f} | {name} {heuristic:.3f} | {gap:+.4f} "
            f"({against_heuristic(gap, vdn_std)}) | {vdn / heuristic:.5f} | {oracle:.3f} | {ratio:.3f} | "
            f"{'met' if met else '**not met**'} |")


def bars_table(marl: dict, fig4: dict | None, fig5: dict | None) -> list[str]:
    """VDN against the best heuristic and the oracle on the same episodes, at every setting,
    and the bars: in the Fig. 3 setting VDN >= the best heuristic and >= ORACLE_SHARE x the
    oracle, at every sweep point VDN >= the best heuristic (its oracle share reported)."""
    rows = ["| setting | VDN team reward (± over seeds) | best heuristic | VDN - heuristic | VDN / heuristic "
            f"| oracle | VDN / oracle | bar: VDN >= heuristic (Fig. 3: and >= {ORACLE_SHARE} x oracle) |",
            "|---|---|---|---|---|---|---|---|"]
    if "vdn" in marl and "baselines" in marl["vdn"]:
        v = marl["vdn"]
        rows.append(bar_row("Fig. 3 (eps 0.3, N 12)", v["eval_team_reward"],
                            v["eval_team_reward_std_over_seeds"], v["baselines"], with_oracle=True))
    for sweep in (fig4, fig5):
        for p in (sweep or {}).get("points", []):
            if "vdn" in p["algos"] and p.get("baselines"):
                r = p["algos"]["vdn"]["team_reward"]
                rows.append(bar_row(f"{sweep['sweep']}: {sweep['key']} = {p['value']}", r["mean"],
                                    r["std"], p["baselines"], with_oracle=False))
    return rows if len(rows) > 2 else []


def sweep_point(sweep: dict, value) -> dict | None:
    return next((p for p in sweep["points"] if p["value"] == value), None)


Claim = tuple[str, str, str, str]  # (the paper's figure, ours, verdict, command)


def claims(twin: dict | None, marl: dict, fig4: dict | None, fig5: dict | None,
           fig6: dict | None) -> dict[str, Claim]:
    """Each checked claim of the paper, by its label, against one set of results."""
    out: dict[str, Claim] = {}
    if "vdn" in marl and "iql" in marl:
        m, s, _ = gain(marl["vdn"]["eval_team_reward_per_seed"], marl["iql"]["eval_team_reward_per_seed"])
        candidates = [("Fig. 3 setting", m, s)]
        for sweep in (fig4, fig5):
            for p in (sweep or {}).get("points", []):
                gm, gs, _ = gain(p["algos"]["vdn"]["team_reward"]["per_seed"],
                                 p["algos"]["iql"]["team_reward"]["per_seed"])
                candidates.append((f"{sweep['key']}={p['value']}", gm, gs))
        best = max(candidates, key=lambda c: c[1])
        out["VDN's reward over IQL's, Fig. 3 (eps 0.3, N 12)"] = (
            "up to +28.96%", fmt(m, s), verdict(m, 0.2896, s),
            "`dvc repro train_marl` (one stage per algorithm and seed)")
        out["... largest over all our settings"] = (
            "+28.96%", f"{fmt(best[1], best[2])} at {best[0]}", verdict(best[1], 0.2896, best[2]),
            "`dvc repro`")
    for sweep, value, key, paper, label, relative in (
            (fig4, 0.8, "sum_rate", 0.3179, "VDN's data rate over IQL's at eps 0.8, Fig. 4 (N 9)", True),
            (fig5, 12, "sum_rate", 0.1015, "VDN's data rate over IQL's at 12 users, Fig. 5", True),
            (fig5, 12, "dnt_error", 0.2, "VDN's DNT error minus IQL's at 12 users, Fig. 5", False)):
        point = sweep_point(sweep, value) if sweep else None
        paper_s = pct(paper) if relative else f"+{paper}"
        if point is None:
            out[label] = (paper_s, "not in this run's grid", "—", "—")
            continue
        m, s, _ = gain(point["algos"]["vdn"][key]["per_seed"], point["algos"]["iql"][key]["per_seed"],
                       relative)
        out[label] = (paper_s, fmt(m, s, relative), verdict(m, paper, s), f"`dvc repro sweep@{sweep['sweep']}`")
    if twin is not None:
        mse = np.asarray(twin["one_step"]["per_user"]["twin_mse"])
        floor = np.asarray(twin["one_step"]["per_user"]["floor"])
        ratio = twin["one_step"]["overall"]["twin_ratio"]
        note = ("at the Bayes floor: the spread is the users' own randomness" if ratio <= 1.05
                else f"**{ratio:.2f} x the Bayes floor**")
        out["GRU per-user one-step MSE, Fig. 2"] = (
            "0.075 – 0.32", f"{mse.min():.3f} – {mse.max():.3f} (Bayes floor {floor.min():.3f} – "
            f"{floor.max():.3f})", note, "`dvc repro train_twin`")
    if fig6 is not None and {"vdn", "iql"} <= set(fig6["summary"]):
        v, i = fig6["summary"]["vdn"]["dnt_error"], fig6["summary"]["iql"]["dnt_error"]
        per_seed = {a: [float(np.mean(slots)) for slots in fig6["learners"][a]["dnt_error"]]
                    for a in ("vdn", "iql")}
        m, s, _ = gain(per_seed["vdn"], per_seed["iql"], relative=False)
        said = ("**not reproduced**: no difference beyond the spread over seeds" if abs(m) <= s
                else "direction reproduced" if m < 0 else "**not reproduced**: the opposite direction")
        out["VDN keeps a smaller DNT error than IQL over an episode, Fig. 6"] = (
            "VDN lower", f"VDN {v:.3f}, IQL {i:.3f} (VDN - IQL {fmt(m, s, False)})", said,
            "`dvc repro episode_fig6`")
    return out


def claims_table(learners: list[tuple[str, dict[str, Claim]]]) -> list[str]:
    """One row per claim, an (ours, verdict) pair of columns per learner configuration."""
    head = "| claim (paper) | paper | " + " | ".join(f"{n} (mean ± spread over seeds) | verdict"
                                                  for n, _ in learners) + " | command |"
    rows = [head, "|---|---|" + "---|---|" * len(learners) + "---|"]
    for label in dict.fromkeys(k for _, c in learners for k in c):
        have = [c[label] for _, c in learners if label in c]
        cells = [f"{c[label][1]} | {c[label][2]}" if label in c else "— | —" for _, c in learners]
        rows.append(f"| {label} | {have[0][0]} | " + " | ".join(cells) + f" | {have[0][3]} |")
    return rows


def learner_table(marl: dict) -> list[str]:
    rows = ["| policy | team reward / step | sum rate | DNT error | uploads / step | failed uploads | served twice |",
            "|---|---|---|---|---|---|---|"]
    for algo, rep in marl.items():
        cells = [f"{rep[f'eval_{k}']:.3f} ± {rep[f'eval_{k}_std_over_seeds']:.3f}" for k in METRICS]
        rows.append(f"| **{algo.upper()}** (seeds {rep['seeds']}) | " + " | ".join(cells) + " |")
    baselines = next(iter(marl.values())).get("baselines", {})
    for name, res in baselines.items():
        rows.append(f"| {name} | " + " | ".join(f"{res[k]['mean']:.3f}" for k in METRICS) + " |")
    for algo, rep in marl.items():
        if "ratio_to_oracle" in rep:
            rows.append(f"\n{algo.upper()}: ratio to the oracle {rep['ratio_to_oracle']:.3f}, "
                        f"to the best heuristic {rep.get('ratio_to_best_heuristic', float('nan')):.5f}.")
    return rows


def sweep_table(sweep: dict) -> list[str]:
    algos = sweep["algos"]
    head = "| " + sweep["key"] + " | " + " | ".join(
        f"{a.upper()} {m}" for a in algos for m in ("reward", "rate", "DNT err")) + " | oracle reward | nearest-always reward |"
    rows = [head, "|" + "---|" * (1 + 3 * len(algos) + 2)]
    for p in sweep["points"]:
        cells = [f"{p['algos'][a][m]['mean']:.2f} ± {p['algos'][a][m]['std']:.2f}"
                 for a in algos for m in HEADLINE_METRICS]
        base = p.get("baselines", {})
        ref = [f"{base[n]['team_reward']['mean']:.2f}" if n in base else "—" for n in ("oracle", "nearest-always")]
        rows.append(f"| {p['value']} | " + " | ".join(cells + ref) + " |")
    return rows


ABLATION = Path("benchmarks/results/ablation.json")  # scripts/ablation.py (make ablation)


def ablation_table(ablation_rows: list[dict], what: str = "adds to the row above") -> list[str]:
    rows = [f"| row | {what} | VDN team reward (± over seeds) | / best heuristic (which) | / oracle |",
            "|---|---|---|---|---|"]
    for r in ablation_rows:  # a row keeps the heuristic set of its runs' day
        rows.append(f"| {r['row']} {r['name']} | `{' '.join(r['adds'])}` | {r['team_reward']:.2f} ± "
                    f"{r['std_over_seeds']:.2f} | {r['ratio_to_best_heuristic']:.3f} ({r['best_heuristic']}) | "
                    f"{r['ratio_to_oracle']:.3f} |")
    return rows


def learners_table(entries: list[dict]) -> list[str]:
    rows = ["| learner | team reward (± over seeds) | per seed | / best heuristic (which) | / oracle | command |",
            "|---|---|---|---|---|---|"]
    for r in entries:
        seeds = " / ".join(f"{v:.2f}" for v in r["per_seed"])
        rows.append(f"| {r['algo'].upper()} | {r['team_reward']:.2f} ± {r['std_over_seeds']:.2f} | {seeds} | "
                    f"{r['ratio_to_best_heuristic']:.3f} ({r['best_heuristic']}) | {r['ratio_to_oracle']:.3f} | "
                    f"`{r['command']}` |")
    return rows


def twin_table(twin: dict) -> list[str]:
    per = twin["one_step"]["per_user"]
    rows = ["| user | twin MSE | Bayes floor | ratio | hold-last MSE |", "|---|---|---|---|---|"]
    for u, (m, f, h) in enumerate(zip(per["twin_mse"], per["floor"], per["hold_last_mse"])):
        rows.append(f"| {u} | {m:.3f} | {f:.3f} | {m / f:.3f} | {h:.3f} |")
    return rows


def wall_times(twin, marl, fig4, fig5) -> list[str]:
    rows = ["| stage | wall time |", "|---|---|"]
    if twin and "training" in twin:
        rows.append(f"| train_twin | {twin['training'].get('wall_s', float('nan')):.0f} s |")
    for algo, rep in marl.items():
        times = rep.get("wall_time_s_per_seed", [])
        rows.append(f"| train_marl {algo} ({len(times)} seeds) | {sum(times):.0f} s "
                    f"({np.mean(times):.0f} s per seed) |")
    for sweep in (fig4, fig5):
        if sweep:
            rows.append(f"| sweep_{sweep['sweep']} | {sweep.get('wall_time_s', float('nan')):.0f} s |")
    return rows


def diagnosis_table(cfg: Config) -> list[str]:
    """Whom each BS serves in the first seed's Fig. 3 models (`dntsync diagnose-learner`),
    beside the fixed `outer-only` and `all-but-overlap` policies; docs/learners.md explains."""
    from dntsync.marl.diagnose import diagnose_model

    rows = ["| model | BS: serves single-covered / overlap users (— : none such) | team reward | command |",
            "|---|---|---|---|"]
    references: dict = {}
    for algo in cfg.sweeps.fig3_algos:
        path = Path(cfg.marl.outputs.model_dir) / f"{algo}_seed{cfg.marl.seeds[0]}.ckpt"
        if not path.exists():
            continue
        d = diagnose_model(cfg, path)
        share = lambda x: "—" if np.isnan(x) else f"{x:.2f}"  # noqa: E731 - no such users
        served = ", ".join(f"{m}: {share(p['served_single'])} / {share(p['served_overlap'])}"
                           for m, p in enumerate(d["profile"]))
        rows.append(f"| {algo.upper()} seed {cfg.marl.seeds[0]} | {served} | "
                    f"{d['learner_team_reward']:.2f} | `dntsync diagnose-learner --model {path}` |")
        references = d["reference"]
    for name, reward in references.items():
        rows.append(f"| {name} (fixed) | | {reward:.2f} | |")
    return rows if references else []


def paper_results(cfg: Config) -> tuple | None:
    """`(twin, marl, fig4, fig5, fig6)` of the paper-literal learner's kept run, as `claims`
    takes them; None when there is none or this report is itself a profile's
    (`DNTSYNC_PROFILE`, set by `dntsync pipeline --profile`)."""
    from dntsync.marl.training import aggregate

    folder = PAPER_RESULTS / "metrics"
    if os.environ.get("DNTSYNC_PROFILE") or not folder.is_dir():
        return None
    marl = {}
    for algo in cfg.sweeps.fig3_algos:
        paths = sorted((folder / "marl").glob(f"marl_{algo}_seed*.json"),
                       key=lambda p: int(p.stem.rsplit("seed", 1)[1]))
        if paths:
            marl[algo] = aggregate([json.loads(p.read_text()) for p in paths])
    return (load("twin.json", folder), marl, load("sweep_fig4.json", folder),
            load("sweep_fig5.json", folder), load("fig6_episode.json", folder))


def paper_fig3(marl: dict) -> list[str]:
    """The paper-literal learners' Fig. 3 team reward, as a sentence."""
    said = [f"{algo.upper()} {r['eval_team_reward']:.2f} ± {r['eval_team_reward_std_over_seeds']:.2f} "
            f"({r['ratio_to_oracle']:.3f} x the oracle, {r['ratio_to_best_heuristic']:.3f} x the best "
            f"heuristic)" for algo, r in marl.items() if "ratio_to_oracle" in r]
    return [f"In the Fig. 3 setting the paper-literal learners reach: {'; '.join(said)}."] if said else []


def build(cfg: Config) -> str:
    twin = load("twin.json")
    from dntsync.marl.training import seed_summary

    marl = {a: r for a in cfg.sweeps.fig3_algos if (r := seed_summary(cfg, a)) is not None}
    fig4, fig5, fig6 = load("sweep_fig4.json"), load("sweep_fig5.json"), load("fig6_episode.json")
    first = next(iter(marl.values()), {})
    lines = ["# Results", "",
             "Generated by `dntsync report` (the last stage of `dvc repro`) from `metrics/*.json`; "
             "do not edit by hand. Figures are in `figures/`.", "",
             f"Setting (from the metrics): seeds {first.get('seeds')}, G = {first.get('epochs')} "
             f"epochs, predictor `{first.get('predictor')}`, observation `{first.get('observation')}`, "
             f"Q head `{first.get('head')}`, {first.get('eval_episodes')} evaluation episodes "
             f"(seeds {first.get('eval_seeds', [None])[0]}.., never used in training). "
             "Spreads are standard deviations over training seeds; VDN-vs-IQL gains pair the "
             "seeds by index.", "",
             "## The paper's claims beside ours", ""]
    profile = os.environ.get("DNTSYNC_PROFILE")  # `dntsync pipeline --profile`: its stem
    mine = f"the `{profile}` profile's learner" if profile else "default learner"
    learners = [(mine, claims(twin, marl, fig4, fig5, fig6))]
    paper = paper_results(cfg)
    if paper is not None:
        learners.append(("paper-literal learner", claims(*paper)))
        lines += [f"The paper-literal learner (`conf/profiles/paper.yaml`: flat head, positions-only "
                  f"local state, Table II) is the pipeline run by `make paper`, whose report, figures "
                  f"and metrics are kept in `{PAPER_RESULTS}/`; the command column is the default's.", "",
                  *paper_fig3(paper[1]), ""]
    lines += [*claims_table(learners), ""]
    bars = bars_table(marl, fig4, fig5)
    if bars:
        lines += ["## Do the learners learn the task?", "",
                  "VDN's greedy team reward beside the best heuristic (the best of nearest-BS "
                  "always / never / every k slots / k slots after its last successful upload, "
                  "retrying a failed one, synchronised, staggered or with the BSs' "
                  "phases tuned on validation episodes (the best of all k^M assignments, where "
                  f"k^M <= {cfg.marl.evaluation.tuned_max}), k in "
                  f"{list(cfg.marl.evaluation.upload_periods)}) and the myopic oracle (centralised, sees "
                  "the fading) on the same evaluation episodes, at every setting the pipeline runs. "
                  "VDN - heuristic has a direction only where it is larger than VDN's spread over "
                  "seeds.",
                  "", *bars, ""]
    if twin:
        one = twin["one_step"]["overall"]
        multi = twin["multi_step"]
        worst = max(m / (f if f > 0 else np.nan) for m, f in zip(multi["twin_mse"], multi["floor"]))
        lines += ["## The twin against the Bayes floor (Fig. 2)", "",
                  f"One-step MSE over all test users: twin {one['twin_mse']:.4f}, Bayes floor "
                  f"{one['floor']:.4f} (ratio {one['twin_ratio']:.3f}; target <= 1.05), hold-last "
                  f"{one['hold_last_mse']:.4f} (ratio {one['hold_last_ratio']:.3f}). Running on its own "
                  f"predictions for h = 1..{len(multi['h'])} slots, the twin's error stays within "
                  f"{100 * (worst - 1):+.1f}% of the h-step floor at worst (target +10%). Targets met: "
                  f"{twin.get('targets_met')}.", "", *twin_table(twin), ""]
    if marl:
        lines += ["## Learners beside the heuristics and the oracle (Fig. 3 setting)", "",
                  "Mean per-step values on the fixed evaluation episodes; the learners' spread is "
                  "over training seeds.", "", *learner_table(marl), ""]
    ablation = load(ABLATION.name, ABLATION.parent)
    if ablation:
        lines += ["## From the paper's learner to the default, one change at a time", "",
                  "VDN in the Fig. 3 setting, each row adding one change to the row above (row 0 "
                  "is `conf/profiles/paper.yaml`'s learner, the last the default); from "
                  f"`scripts/ablation.py` (`make ablation`), committed in `{ABLATION}`; "
                  "docs/learners.md has each row's command.", "", *ablation_table(ablation["rows"]), ""]
        if ablation.get("leave_one_out"):
            lines += ["The changes that made no difference where they were added, each undone "
                      "alone from the default:", "",
                      *ablation_table(ablation["leave_one_out"], "undoes from the default"), ""]
        if ablation.get("learners"):
            lines += ["Learners the pipeline does not train by default (add them to "
                      "`sweeps.fig3_algos`), in the default configuration:", "",
                      *learners_table(ablation["learners"]), ""]
    diagnosis = diagnosis_table(cfg) if marl else []
    if diagnosis:
        lines += ["## Whom each BS serves", "",
                  "The middle BS (index 1) overlaps both neighbours. `outer-only`: BSs 0 and 2 "
                  "serve every covered user, BS 1 nobody; `all-but-overlap`: BS 1 also serves the "
                  "users only it covers (both upload every slot). A learner at the `outer-only` "
                  "reward has settled on the best policy that ignores where users are (the "
                  "paper-literal learner's trap); docs/learners.md has the evidence.", "",
                  *diagnosis, ""]
    for name, sweep in (("Fig. 4", fig4), ("Fig. 5", fig5)):
        if sweep:
            lines += [f"## {name}: sweep over {sweep['key']} (fixed: {', '.join(sweep['fixed'])})", "",
                      *sweep_table(sweep), ""]
    lines += ["## Wall time per stage", "", *wall_times(twin, marl, fig4, fig5), ""]
    return "\n".join(lines)


def run(cfg: Config, args) -> int:
    write_text(OUT, build(cfg))
    print(f"wrote {OUT}")
    return 0
