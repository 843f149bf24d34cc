"""The other side of the debate: Shen, Mishra and Khashabi's claims (ICML 2024 position
paper) against the order-study cells (grids with `orders = P`: one cell runs the same
demonstrations in P orders; orders.py) and the output metrics (outputs.py).

Claims, and the rule that decides each verdict per model:

  S1a ICL is more order-sensitive than GD (S1b: than LCGD): agrees when ICL's mean pairwise
     prediction disagreement across orders is above the method's on more than half of the
     tasks where the method changed at least one prediction off ZS's and neither side has
     collapsed. A method that changes no prediction (a rate too small to matter), or that
     predicts one label for at least COLLAPSED_SHARE of all (example, order) predictions,
     cannot show order sensitivity, so those tasks are left out, and named with the reason;
     with none left the claim is undecided.
  S2 ICL's output does not align with GD's: agrees when ICL's next-token distribution is
     closer to ZS's than to GD's (mean Jensen-Shannon divergence JS(ZS, ICL) < JS(ICL, GD),
     order 0 of every task).
  S3 finer metrics separate ICL from GD more: agrees when the ICL-GD gap in top-1 token
     accuracy (whole vocabulary) is larger than the gap in label accuracy (mean over tasks).

Beside every ICL-GD and ICL-LCGD similarity stands its ceiling: the same metric between two
orders of one method (orders.ceilings), for the internal metrics (SimAOU, SimAOU_norm,
SimAM, SimAM_delta) and the output ones (top-K overlap, overlap cosine, JS). No torch
(report side).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .findings import COLLAPSED_SHARE  # across orders, disagreement <= about 2 x (1 - share)
from .tasks import PAPER_TASKS

# Internal metrics (metrics.compare) and output metrics (outputs.py; "out_" + name) with a
# ceiling; for JS lower means closer, for every other one higher does.
INTERNAL = ("SimAOU", "SimAOU_norm", "SimAM", "SimAM_delta")
OUTPUT = ("top_k_overlap", "overlap_cosine", "js")
CEILING_METRICS = INTERNAL + tuple(f"out_{o}" for o in OUTPUT)
METHODS = ("icl", "gd", "lcgd")


def order_cells(results_dir: str | Path, model: str | None = None, expected: set[str] | None = None) -> list[dict[str, Any]]:
    """Every finished order-study cell (cells/*/orders.json) with its order-0 results; with
    `expected` (the cell ids the recorded grids define), only those, as report.collect does."""
    out = []
    for f in sorted(Path(results_dir).glob("cells/*/orders.json")):
        if expected and f.parent.name not in expected:
            continue
        summary = json.loads(f.read_text())
        first = f.parent / "order0" / "results.json"
        if model is not None and summary["config"]["model"] != model or not first.exists():
            continue
        out.append({**summary, "order0": json.loads(first.read_text()), "_path": str(f.parent)})
    return out


def _icl_vs(r0: dict[str, Any], method: str, name: str) -> float | None:
    """Order 0's ICL-vs-`method` value of one CEILING_METRICS name."""
    if name.startswith("out_"):
        return ((r0.get("outputs") or {}).get("pairs", {}).get(f"icl-{method}") or {}).get(name[4:])
    return (r0.get("metrics", {}).get(method, {}).get(name) or {}).get("mean")


def _over_orders(spread: dict[str, Any], method: str, name: str) -> float | None:
    """The std over the cell's orders of ICL-vs-`method` (orders.csv's column)."""
    col = f"out_icl-{method}_{name[4:]}" if name.startswith("out_") else f"{method}_{name}"
    return (spread.get(col) or {}).get("std")


def frame(cells: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per order-study cell: stability per setting, output divergences, accuracies,
    ICL-method similarities (order 0), their spread over orders and their ceilings, and the
    learning rates the finetuned methods ran at."""
    rows = []
    for c in cells:
        cfg, r0 = c["config"], c["order0"]
        row: dict[str, Any] = {"model": cfg["model"], "task": Path(cfg["task"]).stem, "seed": cfg["seed"],
                               "orders": cfg["orders"]}
        rc = r0.get("config") or {}
        for m in ("gd", "lcgd"):
            if m in (rc.get("lr_by_method") or {}):
                row[f"lr_{m}"] = rc["lr_by_method"][m]
                row[f"lr_source_{m}"] = (rc.get("lr_source_by_method") or {}).get(m)
        for s, st in c["prediction_stability"].items():
            row[f"disagree_{s}"] = st["mean_pairwise_disagreement"]
            row[f"stable_{s}"] = st["same_prediction_in_every_order"]
            row[f"changed_{s}"] = st.get("changed_from_zs")  # recorded since the S1 split; None before
            row[f"majority_{s}"] = st.get("majority_label_share")  # recorded since the collapse rule
            if f"acc_{s}" in c["spread"]:
                row[f"acc_{s}"], row[f"acc_std_{s}"] = c["spread"][f"acc_{s}"]["mean"], c["spread"][f"acc_{s}"]["std"]
        out = r0.get("outputs") or {}
        for pair, vals in (out.get("pairs") or {}).items():
            row[f"js_{pair}"] = vals.get("js")
        for s, v in (out.get("token_accuracy") or {}).items():
            row[f"tok_{s}"] = v
        for name in CEILING_METRICS:
            for m in ("gd", "lcgd"):
                row[f"{name}_icl-{m}"] = _icl_vs(r0, m, name)
                row[f"{name}_icl-{m}_std"] = _over_orders(c["spread"], m, name)
            for m, metrics in c.get("ceiling", {}).items():
                row[f"{name}_ceiling_{m}"] = (metrics.get(name) or {}).get("mean")
        rows.append(row)
    df = pd.DataFrame(rows)
    return df.sort_values("task", key=lambda t: t.map(lambda x: (PAPER_TASKS + (x,)).index(x)), kind="stable") if len(df) else df


def _majority(df: pd.DataFrame, a: str, b: str) -> tuple[int, int]:
    sub = df.dropna(subset=[a, b])
    return int((sub[a] > sub[b]).sum()), len(sub)


def _order_claim(df: pd.DataFrame, key: str, method: str) -> dict[str, Any]:
    """S1a/S1b: ICL's disagreement across orders against `method`'s, on the tasks where the
    method moved a prediction off ZS's and neither ICL nor the method collapsed to one label."""
    col = lambda c: pd.to_numeric(df[c], errors="coerce") if c in df.columns else pd.Series(np.nan, index=df.index)
    name = method.upper()
    reasons = {f"{name} changed no prediction off ZS's": col(f"changed_{method}") == 0,
               f"{name} predicts one label (share >= {COLLAPSED_SHARE:g})": col(f"majority_{method}") >= COLLAPSED_SHARE,
               f"ICL predicts one label (share >= {COLLAPSED_SHARE:g})": col("majority_icl") >= COLLAPSED_SHARE}
    out_mask = np.logical_or.reduce(list(reasons.values()))
    w, n = _majority(df[~out_mask], "disagree_icl", f"disagree_{method}")
    verdict = "undecided" if n == 0 else "agrees" if w > n / 2 else "does not agree"
    evidence = (f"mean pairwise disagreement across orders: ICL {df['disagree_icl'].mean():.3f}, {name} "
                f"{df[f'disagree_{method}'].mean():.3f}; ICL above {name} on {w} of {n} tasks")
    for reason, mask in reasons.items():
        if mask.any():
            evidence += f"; left out, {reason}: {', '.join(df.loc[mask, 'task'])}"
    return {"key": key, "name": f"{key}. ICL more order-sensitive than {name}", "verdict": verdict, "evidence": evidence}


def claims(df: pd.DataFrame) -> list[dict[str, Any]]:
    """S1a, S1b, S2, S3 for one model's order-study rows: claim, rule outcome, numbers, verdict."""
    out = []
    if {"disagree_icl", "disagree_gd", "disagree_lcgd"} <= set(df.columns):
        out += [_order_claim(df, "S1a", "gd"), _order_claim(df, "S1b", "lcgd")]
    if {"js_zs-icl", "js_icl-gd"} <= set(df.columns):
        a, b = df["js_zs-icl"].mean(), df["js_icl-gd"].mean()
        out.append({"key": "S2", "name": "S2. ICL's output closer to ZS's than to GD's", "verdict": "agrees" if a < b else "does not agree",
                    "evidence": f"JS(ZS, ICL) {a:.4f} vs JS(ICL, GD) {b:.4f} nats (order 0, mean over tasks)"})
    if {"tok_icl", "tok_gd", "acc_icl", "acc_gd"} <= set(df.columns):
        tok_gap, acc_gap = abs((df["tok_icl"] - df["tok_gd"]).mean()), abs((df["acc_icl"] - df["acc_gd"]).mean())
        out.append({"key": "S3", "name": "S3. token-level accuracy separates ICL from GD more than label accuracy",
                    "verdict": "agrees" if tok_gap > acc_gap else "does not agree",
                    "evidence": f"top-1 token accuracy ICL {df['tok_icl'].mean():.3f} vs GD {df['tok_gd'].mean():.3f}; "
                                f"label accuracy ICL {df['acc_icl'].mean():.3f} vs GD {df['acc_gd'].mean():.3f} "
                                f"(mean over orders and tasks)"})
    return out


def _mean(df: pd.DataFrame, col: str, spec: str = ".3f") -> str:
    return format(df[col].mean(), spec) if col in df.columns and df[col].notna().any() else "-"


def ceiling_table(df: pd.DataFrame) -> list[str]:
    """ICL-GD and ICL-LCGD beside each method's ceiling (itself in another order) and the
    spread of ICL-GD and ICL-LCGD over the orders, per metric (mean over tasks)."""
    lines = ["| metric | ICL-GD | ICL-LCGD | ceiling ICL-ICL | ceiling GD-GD | ceiling LCGD-LCGD | "
             "ICL-GD std over orders | ICL-LCGD std over orders |", "|---|---|---|---|---|---|---|---|"]
    for name in CEILING_METRICS:
        cols = [f"{name}_icl-gd", f"{name}_icl-lcgd", f"{name}_ceiling_icl", f"{name}_ceiling_gd", f"{name}_ceiling_lcgd",
                f"{name}_icl-gd_std", f"{name}_icl-lcgd_std"]
        vals = [_mean(df, c) for c in cols]
        if all(v == "-" for v in vals):
            continue
        label = name if not name.startswith("out_") else f"output {name[4:]}" + (" (lower: closer)" if name == "out_js" else "")
        lines.append(f"| {label} | " + " | ".join(vals) + " |")
    return lines


def per_task_table(df: pd.DataFrame) -> list[str]:
    """Per task: the rates, order sensitivity, stability and accuracy over orders."""
    lines = ["| task | lr GD / LCGD | disagreement ICL / GD / LCGD | never changes ICL / GD / LCGD | "
             "changed from ZS ICL / GD / LCGD | most frequent label's share ICL / GD / LCGD | "
             "accuracy ICL / GD / LCGD (mean ± std over orders) | SimAM_delta ICL-GD / ceiling ICL-ICL |",
             "|---|---|---|---|---|---|---|---|"]
    for r in df.to_dict("records"):  # not itertuples: its names drop the columns with a hyphen
        lr = " / ".join(f"{r[f'lr_{m}']:g}" if pd.notna(r.get(f"lr_{m}")) else "-" for m in ("gd", "lcgd"))
        trio = lambda key: " / ".join(f"{r[f'{key}_{s}']:.3f}" if pd.notna(r.get(f"{key}_{s}")) else "-" for s in METHODS)
        acc = " / ".join(f"{r[f'acc_{s}']:.3f} ± {r[f'acc_std_{s}']:.3f}" if pd.notna(r.get(f"acc_{s}")) else "-"
                         for s in METHODS)
        sim = " / ".join(f"{r[c]:.3f}" if pd.notna(r.get(c)) else "-" for c in ("SimAM_delta_icl-gd", "SimAM_delta_ceiling_icl"))
        lines.append(f"| {r['task']} | {lr} | {trio('disagree')} | {trio('stable')} | {trio('changed')} | {trio('majority')} | {acc} | {sim} |")
    return lines


def rate_note(df: pd.DataFrame) -> str:
    """Which rates the finetuned methods ran at, and where they came from."""
    parts = [f"{m.upper()}: " + "; ".join(sorted({str(v) for v in df[f"lr_source_{m}"].dropna()}))
             for m in ("gd", "lcgd") if f"lr_source_{m}" in df.columns and df[f"lr_source_{m}"].notna().any()]
    return ("Learning rates (per task in the table), where they came from: " + (" | ".join(parts) or "not recorded")
            + ". learning_rates.toml [mean] holds the token-mean sweep's chosen rates (issue 31); a \"paper\" rate is "
            "the fallback where no sweep has chosen one yet.")


def fig_orders(df: pd.DataFrame, path: Path) -> str | None:
    """Per task: each method's prediction disagreement across orders (left); per metric,
    ICL-GD and ICL-LCGD beside the ceilings, mean over tasks (right)."""
    if df.empty or not {f"disagree_{s}" for s in METHODS} <= set(df.columns):
        return None
    from .report import _plt, _save  # report imports this module: imported at call time

    plt = _plt()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    x = np.arange(len(df))
    for i, s in enumerate(METHODS):
        left.bar(x + (i - 1) * 0.27, df[f"disagree_{s}"], 0.27, label=s.upper())
    left.set_xticks(x, df["task"])
    left.set_ylabel("mean pairwise disagreement across orders")
    left.legend(fontsize=8)
    names = [n for n in INTERNAL + ("out_top_k_overlap", "out_overlap_cosine") if f"{n}_icl-gd" in df.columns]
    bars = [("ICL-GD", "{}_icl-gd"), ("ICL-LCGD", "{}_icl-lcgd"), ("ceiling ICL", "{}_ceiling_icl"),
            ("ceiling GD", "{}_ceiling_gd"), ("ceiling LCGD", "{}_ceiling_lcgd")]
    xm = np.arange(len(names))
    for i, (label, col) in enumerate(bars):
        vals = [df[col.format(n)].mean() if col.format(n) in df.columns else np.nan for n in names]
        right.bar(xm + (i - 2) * 0.16, vals, 0.16, label=label)
    right.set_xticks(xm, [n.replace("out_", "") for n in names], fontsize=7, rotation=20)
    right.axhline(0, color="grey", lw=0.5)
    right.set_ylabel("similarity (mean over tasks)")
    right.legend(fontsize=7)
    return _save(fig, path, f"{df['model'].iloc[0]}: {int(df['orders'].max())} orders of the same demonstrations per "
                 f"task ({len(df)} tasks). Left: how often two orders' predictions differ. Right: ICL against GD and "
                 "LCGD (order 0) beside each method against itself in another order (the ceiling).")


def section(results_dir: str | Path, model: str | None = None, out: str | Path | None = None,
            expected: set[str] | None = None) -> list[str]:
    """The report section for one model (or all cells); empty without order-study cells.
    With `out`, the figure fig_orders.png goes there."""
    df = frame(order_cells(results_dir, model, expected))
    if df.empty:
        return []
    lines = [f"{len(df)} order-study cells ({', '.join(df['task'])}; "
             f"{int(df['orders'].max())} orders of the same demonstrations each).", "",
             "| claim | verdict | numbers |", "|---|---|---|"]
    lines += [f"| {c['name']} | {c['verdict']} | {c['evidence']} |" for c in claims(df)]
    lines += ["", "Ceilings: each similarity metric between two orders of one method (each update against ZS), "
              "beside ICL against the finetuned methods (order 0), and how much ICL-GD and ICL-LCGD move over the "
              "orders (std over a cell's orders); mean over tasks:", ""] + ceiling_table(df)
    lines += ["", "Per task:", ""] + per_task_table(df) + ["", rate_note(df)]
    stable = [s for s in METHODS if f"stable_{s}" in df.columns]
    lines += ["", "Share of test examples whose prediction never changes across orders (mean over tasks): "
              + ", ".join(f"{s.upper()} {df[f'stable_{s}'].mean():.3f}" for s in stable)
              + "; accuracy spread over orders (std): "
              + ", ".join(f"{s.upper()} {df[f'acc_std_{s}'].mean():.3f}" for s in stable if f"acc_std_{s}" in df) + ".", ""]
    caption = fig_orders(df, Path(out) / "fig_orders.png") if out is not None else None
    if caption:
        lines += ["![fig_orders.png](fig_orders.png)", "", f"*{caption}*", ""]
    return lines


def crossmodel_section(results_dir: str | Path, expected: set[str] | None = None) -> list[str]:
    """Per model: each claim's verdict with its numbers, and SimAM_delta ICL-GD beside ICL's
    ceiling; empty without order-study cells."""
    df = frame(order_cells(results_dir, expected=expected))
    if df.empty:
        return []
    lines = ["| model | tasks | S1a more order-sensitive than GD | S1b than LCGD | S2 output closer to ZS's | "
             "S3 token vs label accuracy | SimAM_delta ICL-GD / ICL-LCGD / ceiling ICL-ICL |", "|---|---|---|---|---|---|---|"]
    for model, sub in df.groupby("model", sort=True):
        verdicts = {c["key"]: f"{c['verdict']}: {c['evidence']}" for c in claims(sub)}
        sims = " / ".join(_mean(sub, c) for c in ("SimAM_delta_icl-gd", "SimAM_delta_icl-lcgd", "SimAM_delta_ceiling_icl"))
        lines.append(f"| {model} | {', '.join(sub['task'])} | "
                     + " | ".join(verdicts.get(k, "-") for k in ("S1a", "S1b", "S2", "S3")) + f" | {sims} |")
    return lines + ["", "Rules as in each model's report (section \"Shen et al.\"); the per-task numbers and the "
                    "ceilings of every metric are there.", ""]
