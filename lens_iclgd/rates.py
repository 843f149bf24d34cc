"""Finding 3 by learning rate and by update size: does LCGD beat GD on SimAM_delta only at
some rates, or only because it moves the layers more?

Reads the sweep cells (GD and LCGD at one shared, explicit rate; `lrs = [...]` grids) of
each (model, loss reduction, k) and decides finding 3 (LCGD's SimAM_delta above GD's on
more than half of the tasks) in three regimes:

  (a) shared rate: both methods at GD's accuracy-chosen rate (the paper's protocol);
  (b) own rates: each method at its own accuracy-chosen rate;
  (c) matched update size: LCGD's SimAM_delta interpolated (linearly in log update size,
      along its sweep) at the update size GD has at GD's chosen rate. Update size: the mean
      over layers and test examples of |h_FT - h_ZS| / |h_ZS| at hook_attn_out.

Rates are chosen per (task, method) by the accuracy rule (lr_rule.best_lr on held-out
training examples, mean over seeds); a chosen rate at either end of the sweep is flagged.
Verdicts: "agrees" / "does not agree" per regime; "depends on the rate" where the regimes,
or the per-rate counts across the sweep, disagree. No torch (report side).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .findings import COLLAPSED_SHARE
from .lr_rule import best_lr

REGIMES = {"a": "shared rate (GD's chosen)", "b": "each method's own chosen rate", "c": "matched update size"}
INTRO = ("Sweep cells: GD and LCGD at one shared, explicit rate per cell. Finding 3 (LCGD's SimAM_delta above GD's on "
         "more than half of the tasks) is decided (a) with both methods at GD's accuracy-chosen rate, (b) with each "
         "method at its own, (c) with LCGD read off its sweep at the update size GD has at GD's chosen rate (linear in "
         "log size; update size: mean |h_FT - h_ZS| / |h_ZS| at hook_attn_out), and at every rate; \"depends on the "
         "rate\" where these disagree. Rates are chosen on held-out training examples (mean over seeds); a chosen rate "
         "on the sweep's edge is flagged, and so is one at which the method predicted one label on the held-out examples "
         "(\"collapsed on held-out\"; older cells did not record it). Summed- and mean-loss sweeps are never "
         "pooled (docs/learning-rates.md).")


def sweep_frame(cells: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per (cell, method) of the cells that ran GD and LCGD at one explicit rate."""
    rows = []
    for r in cells:
        c = r["config"]
        lrs = c.get("lr_by_method") or {}
        if c.get("lr_rule") != "--lr" or set(lrs) != {"gd", "lcgd"} or len(set(lrs.values())) != 1 or c.get("ablate"):
            continue
        if c.get("step_unit", "demo") != "demo" or c.get("balanced", False):
            continue
        for m in ("gd", "lcgd"):
            size = (r.get("update_size") or {}).get(m) or {}
            rows.append({"model": c["model"], "loss": c.get("loss_reduction", "sum"), "k": c["k_effective"],
                         "n_test": c["n_test_effective"], "task": Path(c["task"]).stem, "seed": c["seed"], "lr": lrs[m],
                         "method": m, "SimAM_delta": r["metrics"][m]["SimAM_delta"]["mean"],
                         "SimAOU": r["metrics"][m]["SimAOU"]["mean"], "acc": r["accuracy"][m], "acc_zs": r["accuracy"]["zs"],
                         "heldout": (r.get("heldout_accuracy") or {}).get(m),
                         "heldout_share": (r.get("heldout_majority_share") or {}).get(m), "update_size": size.get("mean"),
                         "kl_from_zs": size.get("kl_from_zs")})
    return pd.DataFrame(rows)


def collapsed_at(cells: pd.DataFrame, lr: float) -> bool | None:
    """Whether one method's cells (rows with lr and heldout_share) predicted one label on at
    least COLLAPSED_SHARE of the held-out examples at `lr`, in some seed; None where none of
    them recorded the share (older cells): on an unbalanced held-out set such a model scores
    the majority label's share and can win the rate rule."""
    shares = cells.loc[cells["lr"] == lr].get("heldout_share", pd.Series(dtype=float)).dropna()
    return bool(shares.max() >= COLLAPSED_SHARE) if len(shares) else None


def chosen(sweep: pd.DataFrame) -> pd.DataFrame:
    """Per (task, method): the accuracy-chosen rate (lr_rule.best_lr on the mean held-out
    accuracy over seeds), its accuracy, the seeds it rests on, whether it is the sweep's
    lowest or highest rate (a lone rate is both: the best may lie outside), and whether
    the method predicted one label on at least COLLAPSED_SHARE of the held-out examples
    there (None: not recorded). `curve` is the
    held-out accuracy at every rate, for a table. The one place the rate rule is applied
    to cells: the report's chosen-rates table and the regimes below both call it."""
    out = []
    for (task, method), sub in sweep.groupby(["task", "method"]):
        if sub["heldout"].isna().all():
            continue
        curve = sub.groupby("lr")["heldout"].mean()
        lr = best_lr({float(k): (None if pd.isna(v) else float(v)) for k, v in curve.items()})
        rates = sorted(sub["lr"].unique())
        out.append({"task": task, "method": method, "lr": lr, "heldout_acc": float(curve[lr]),
                    "seeds": int(sub.loc[sub["heldout"].notna(), "seed"].nunique()),
                    "edge": lr in (rates[0], rates[-1]), "collapsed": collapsed_at(sub, lr),
                    "n_rates": len(rates), "curve": ", ".join(f"{l:g}: {a:.3f}" for l, a in curve.dropna().items())})
    return pd.DataFrame(out, columns=["task", "method", "lr", "heldout_acc", "seeds", "edge", "collapsed", "n_rates", "curve"])


def _at(sweep: pd.DataFrame, task: str, method: str, lr: float, col: str) -> float:
    v = sweep[(sweep["task"] == task) & (sweep["method"] == method) & (sweep["lr"] == lr)][col]
    return float(v.mean()) if len(v) else math.nan


def _matched(sweep: pd.DataFrame, task: str, size: float) -> float:
    """LCGD's SimAM_delta at GD's update size `size`: linear in log size along LCGD's
    sweep (mean over seeds per rate); NaN outside the sizes LCGD's sweep reached."""
    lc = sweep[(sweep["task"] == task) & (sweep["method"] == "lcgd")].groupby("lr")[["update_size", "SimAM_delta"]].mean()
    lc = lc.dropna().sort_values("update_size")
    if len(lc) < 2 or not (lc["update_size"].min() <= size <= lc["update_size"].max()) or size <= 0:
        return math.nan
    return float(np.interp(math.log(size), np.log(lc["update_size"].values), lc["SimAM_delta"].values))


def _collapsed_methods(picks: pd.DataFrame) -> str:
    """Which methods' chosen rates predicted one label on the held-out examples, for a table."""
    flags = picks["collapsed"]
    if flags.isna().all():
        return "not recorded"
    return ", ".join(m.upper() for m in ("gd", "lcgd") if flags.get(m) or False) or "no"


MIN_RATES = 6  # a task's sweep counts once it has this many rates (or as many as the sweep's most-swept task)


def regimes(sweep: pd.DataFrame) -> dict[str, Any]:
    """Finding 3 in the three regimes on one (model, loss, k) sweep, and per rate. A task
    whose sweep is still short (fewer than MIN_RATES rates, or than the sweep's most-swept
    task where that has fewer) is left out and listed in "incomplete": a rate chosen from
    one or two points says nothing."""
    n_rates = sweep.groupby("task")["lr"].nunique()
    needed = min(MIN_RATES, int(n_rates.max())) if len(n_rates) else 0
    incomplete = {t: int(n) for t, n in n_rates.items() if n < needed}
    sweep = sweep[~sweep["task"].isin(incomplete)]
    picks = chosen(sweep)  # empty where no cell scored held-out examples: no rate can be chosen
    per_task = []
    for task in sorted(sweep["task"].unique()) if not picks.empty else []:
        p = picks[picks["task"] == task].set_index("method")
        if not {"gd", "lcgd"} <= set(p.index):
            continue
        lr_gd, lr_lc = p.at["gd", "lr"], p.at["lcgd", "lr"]
        gd = _at(sweep, task, "gd", lr_gd, "SimAM_delta")
        size = _at(sweep, task, "gd", lr_gd, "update_size")
        per_task.append({"task": task, "lr_gd": lr_gd, "lr_lcgd": lr_lc,
                         "edge": bool(p.at["gd", "edge"] or p.at["lcgd", "edge"]),
                         "collapsed": _collapsed_methods(p), "gd": gd,
                         "a": _at(sweep, task, "lcgd", lr_gd, "SimAM_delta"),
                         "b": _at(sweep, task, "lcgd", lr_lc, "SimAM_delta"), "c": _matched(sweep, task, size),
                         "gd_update_size": size})
    table = pd.DataFrame(per_task)
    verdicts = {}
    for key in REGIMES:
        if table.empty:
            break
        valid = table.dropna(subset=[key, "gd"])
        wins = int((valid[key] > valid["gd"]).sum())
        verdicts[key] = {"wins": wins, "tasks": len(valid), "lcgd": float(valid[key].mean()) if len(valid) else math.nan,
                         "gd": float(valid["gd"].mean()) if len(valid) else math.nan,
                         "verdict": ("not available" if not len(valid) else
                                     "agrees" if wins > len(valid) / 2 else "does not agree")}
    by_rate = []
    for lr, sub in sweep.groupby("lr"):
        piv = sub.pivot_table(index="task", columns="method", values="SimAM_delta", aggfunc="mean").dropna()
        if {"gd", "lcgd"} <= set(piv.columns) and len(piv):
            by_rate.append({"lr": lr, "wins": int((piv["lcgd"] > piv["gd"]).sum()), "tasks": len(piv)})
    majority = {r["wins"] > r["tasks"] / 2 for r in by_rate}
    given = {v["verdict"] for v in verdicts.values() if v["verdict"] != "not available"}
    overall = ("not available" if not given else "depends on the rate" if len(given) > 1 or len(majority) > 1
               else given.pop())
    return {"per_task": table, "verdicts": verdicts, "by_rate": by_rate, "overall": overall, "chosen": picks,
            "incomplete": incomplete}


def sweeps(cells: list[dict[str, Any]]) -> dict[tuple[str, str, int], pd.DataFrame]:
    """(model, loss reduction, k) -> its sweep frame, for every sweep (two rates or more) among `cells`."""
    frame = sweep_frame(cells)
    if frame.empty:
        return {}
    return {key: sub for key, sub in frame.groupby(["model", "loss", "k"]) if sub["lr"].nunique() > 1}


def slug(model: str, loss: str, k: int) -> str:
    return f"fig_rates_{Path(model).name}_{loss}_k{k}.png".replace("/", "-")


def figure(sweep: pd.DataFrame, path: Path, title: str) -> str:
    """SimAM_delta and SimAOU against the rate and against the update size, GD vs LCGD:
    mean over tasks and seeds, the band one standard deviation."""
    from .report import _plt, _save

    plt = _plt()
    panels = [("lr", "SimAM_delta"), ("lr", "SimAOU")]
    if sweep["update_size"].notna().any():  # cells from before update sizes were recorded have none
        panels += [("update_size", "SimAM_delta"), ("update_size", "SimAOU")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.3 * len(panels), 3.8))
    for ax, (x, y) in zip(axes, panels):
        for method, style in (("gd", "-"), ("lcgd", "--")):
            g = sweep[sweep["method"] == method].groupby("lr")
            xs = g[x].mean() if x != "lr" else pd.Series(g.size().index, index=g.size().index)
            m, sd = g[y].mean(), g[y].std().fillna(0)
            order = np.argsort(xs.values)
            xv, mv, sv = xs.values[order], m.values[order], sd.values[order]
            ax.plot(xv, mv, ls=style, marker="o", ms=3, label=method.upper())
            ax.fill_between(xv, mv - sv, mv + sv, alpha=0.15)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate" if x == "lr" else "update size |h_FT - h_ZS| / |h_ZS| (hook_attn_out)")
        ax.set_ylabel(y)
        ax.axhline(0, color="grey", lw=0.5)
    axes[0].legend()
    fig.suptitle(title)
    return _save(fig, path, f"{title}. Solid GD, dashed LCGD, both at the same rate at each point; mean over tasks and "
                            "seeds, band: one standard deviation." + (" Right: the same points against the update size." if len(panels) > 2
                                                   else " No update sizes: these cells predate them."))


def section(cells: list[dict[str, Any]], out: Path | None = None) -> list[str]:
    """The report section: per sweep, the regime verdicts, the chosen rates, per-rate
    counts, and (with `out`) its figure."""
    lines = []
    for (model, loss, k), sweep in sweeps(cells).items():
        res = regimes(sweep)
        seeds = ", ".join(map(str, sorted(sweep["seed"].unique())))
        rates = ", ".join(f"{x:g}" for x in sorted(sweep["lr"].unique()))
        lines += [f"### {model}: {loss} loss, k {k}, n-test {int(sweep['n_test'].max())}, seeds {seeds}", "",
                  f"Rates (shared by GD and LCGD): {rates}; {sweep['task'].nunique()} tasks. "
                  f"Finding 3 overall: **{res['overall']}**.", "",
                  "| regime | LCGD above GD (tasks) | SimAM_delta LCGD | SimAM_delta GD | verdict |", "|---|---|---|---|---|"]
        for key, name in REGIMES.items():
            v = res["verdicts"].get(key)
            if v:
                lines.append(f"| ({key}) {name} | {v['wins']} of {v['tasks']} | {v['lcgd']:.3f} | {v['gd']:.3f} | {v['verdict']} |")
        lines += ["", "| task | GD's chosen rate | LCGD's chosen rate | GD update size | on the sweep's edge | "
                  "collapsed on held-out |", "|---|---|---|---|---|---|"]
        for r in res["per_task"].itertuples():
            lines.append(f"| {r.task} | {r.lr_gd:g} | {r.lr_lcgd:g} | {r.gd_update_size:.3f} | {'yes' if r.edge else 'no'} | "
                         f"{r.collapsed} |")
        lines += ["", "Per rate, tasks where LCGD's SimAM_delta is above GD's: "
                  + "; ".join(f"{b['lr']:g}: {b['wins']} of {b['tasks']}" for b in res["by_rate"]) + ".", ""]
        if res["incomplete"]:
            lines += ["Left out until their sweep has more rates: " + ", ".join(
                f"{t} ({n} rate{'s' if n > 1 else ''})" for t, n in sorted(res["incomplete"].items())) + ".", ""]
        if out is not None and sweep["lr"].nunique() > 1:
            name = slug(model, loss, k)
            caption = figure(sweep, out / name, f"{model}, {loss} loss, k {k}: finding 3 against rate and update size")
            lines += [f"![{name}]({name})", "", f"*{caption}*", ""]
    return lines
