"""The other side of the debate: Shen, Mishra and Khashabi's claims (ICML 2024 position
paper) against the order-study cells (grids with `orders = P`: one cell runs the same
demonstrations in P orders; orders.py) and the output metrics (outputs.py).

Claims, and the rule that decides each verdict per model:

  S1 ICL is more order-sensitive than GD and than LCGD: agrees when ICL's mean pairwise
     prediction disagreement across orders is above GD's on more than half of the tasks,
     and above LCGD's on more than half of the tasks.
  S2 ICL's output does not align with GD's: agrees when ICL's next-token distribution is
     closer to ZS's than to GD's (mean Jensen-Shannon divergence JS(ZS, ICL) < JS(ICL, GD),
     order 0 of every task).
  S3 finer metrics separate ICL from GD more: agrees when the ICL-GD gap in top-1 token
     accuracy (whole vocabulary) is larger than the gap in label accuracy (mean over tasks).

Beside every ICL-GD and ICL-LCGD similarity stands its ceiling: the same metric between two
orders of one method (orders.ceilings). No torch (report side).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

CEILING_METRICS = ("SimAOU", "SimAM_delta")


def order_cells(results_dir: str | Path, model: str | None = None) -> list[dict[str, Any]]:
    """Every finished order-study cell (cells/*/orders.json) with its order-0 results."""
    out = []
    for f in sorted(Path(results_dir).glob("cells/*/orders.json")):
        summary = json.loads(f.read_text())
        first = f.parent / "order0" / "results.json"
        if model is not None and summary["config"]["model"] != model or not first.exists():
            continue
        out.append({**summary, "order0": json.loads(first.read_text()), "_path": str(f.parent)})
    return out


def frame(cells: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per order-study cell: stability per setting, output divergences, accuracies,
    ICL-method similarities (order 0) and their ceilings."""
    rows = []
    for c in cells:
        cfg, r0 = c["config"], c["order0"]
        row: dict[str, Any] = {"model": cfg["model"], "task": Path(cfg["task"]).stem, "seed": cfg["seed"],
                               "orders": cfg["orders"]}
        for s, st in c["prediction_stability"].items():
            row[f"disagree_{s}"] = st["mean_pairwise_disagreement"]
            row[f"stable_{s}"] = st["same_prediction_in_every_order"]
            if f"acc_{s}" in c["spread"]:
                row[f"acc_{s}"], row[f"acc_std_{s}"] = c["spread"][f"acc_{s}"]["mean"], c["spread"][f"acc_{s}"]["std"]
        out = r0.get("outputs") or {}
        for pair, vals in (out.get("pairs") or {}).items():
            row[f"js_{pair}"] = vals.get("js")
        for s, v in (out.get("token_accuracy") or {}).items():
            row[f"tok_{s}"] = v
        for m, metrics in r0.get("metrics", {}).items():
            for name in CEILING_METRICS:
                row[f"{name}_icl-{m}"] = metrics[name]["mean"]
                if f"{m}_{name}" in c["spread"]:
                    row[f"{name}_icl-{m}_std"] = c["spread"][f"{m}_{name}"]["std"]
        for m, metrics in c.get("ceiling", {}).items():
            for name in CEILING_METRICS:
                row[f"{name}_ceiling_{m}"] = metrics[name]["mean"]
        rows.append(row)
    return pd.DataFrame(rows)


def _majority(df: pd.DataFrame, a: str, b: str) -> tuple[int, int]:
    sub = df.dropna(subset=[a, b])
    return int((sub[a] > sub[b]).sum()), len(sub)


def claims(df: pd.DataFrame) -> list[dict[str, Any]]:
    """S1-S3 for one model's order-study rows: claim, rule outcome, numbers, verdict."""
    out = []
    if {"disagree_icl", "disagree_gd", "disagree_lcgd"} <= set(df.columns):
        w_gd, n_gd = _majority(df, "disagree_icl", "disagree_gd")
        w_lc, n_lc = _majority(df, "disagree_icl", "disagree_lcgd")
        ok = w_gd > n_gd / 2 and w_lc > n_lc / 2
        out.append({"name": "S1. ICL more order-sensitive than GD and LCGD", "verdict": "agrees" if ok else "does not agree",
                    "evidence": f"mean pairwise disagreement across orders: ICL {df['disagree_icl'].mean():.3f}, GD "
                                f"{df['disagree_gd'].mean():.3f}, LCGD {df['disagree_lcgd'].mean():.3f}; ICL above GD on "
                                f"{w_gd} of {n_gd} tasks, above LCGD on {w_lc} of {n_lc}"})
    if {"js_zs-icl", "js_icl-gd"} <= set(df.columns):
        a, b = df["js_zs-icl"].mean(), df["js_icl-gd"].mean()
        out.append({"name": "S2. ICL's output closer to ZS's than to GD's", "verdict": "agrees" if a < b else "does not agree",
                    "evidence": f"JS(ZS, ICL) {a:.4f} vs JS(ICL, GD) {b:.4f} nats (order 0, mean over tasks)"})
    if {"tok_icl", "tok_gd", "acc_icl", "acc_gd"} <= set(df.columns):
        tok_gap, acc_gap = abs((df["tok_icl"] - df["tok_gd"]).mean()), abs((df["acc_icl"] - df["acc_gd"]).mean())
        out.append({"name": "S3. token-level accuracy separates ICL from GD more than label accuracy",
                    "verdict": "agrees" if tok_gap > acc_gap else "does not agree",
                    "evidence": f"top-1 token accuracy ICL {df['tok_icl'].mean():.3f} vs GD {df['tok_gd'].mean():.3f}; "
                                f"label accuracy ICL {df['acc_icl'].mean():.3f} vs GD {df['acc_gd'].mean():.3f} "
                                f"(mean over orders and tasks)"})
    return out


def ceiling_table(df: pd.DataFrame) -> list[str]:
    """ICL-GD and ICL-LCGD similarity beside each method's ceiling (itself in another order)."""
    lines = ["| metric | ICL-GD | ICL-LCGD | ceiling ICL-ICL | ceiling GD-GD | ceiling LCGD-LCGD |", "|---|---|---|---|---|---|"]
    for name in CEILING_METRICS:
        cols = [f"{name}_icl-gd", f"{name}_icl-lcgd", f"{name}_ceiling_icl", f"{name}_ceiling_gd", f"{name}_ceiling_lcgd"]
        vals = [f"{df[c].mean():.3f}" if c in df.columns and df[c].notna().any() else "-" for c in cols]
        lines.append(f"| {name} | " + " | ".join(vals) + " |")
    return lines


def section(results_dir: str | Path, model: str | None = None) -> list[str]:
    """The report section for one model (or all cells); empty without order-study cells."""
    df = frame(order_cells(results_dir, model))
    if df.empty:
        return []
    lines = [f"{len(df)} order-study cells ({', '.join(sorted(df['task'].unique()))}; "
             f"{int(df['orders'].max())} orders of the same demonstrations each).", "",
             "| claim | verdict | numbers |", "|---|---|---|"]
    lines += [f"| {c['name']} | {c['verdict']} | {c['evidence']} |" for c in claims(df)]
    lines += ["", "Ceilings: each similarity metric between two orders of one method (each update against ZS), "
              "beside ICL against the finetuned methods (order 0, mean over tasks):", ""] + ceiling_table(df)
    spread = [c for c in df.columns if c.startswith(("SimAOU_icl-", "SimAM_delta_icl-")) and c.endswith("_std")]
    if spread:
        lines += ["", "Spread across orders (std of the cell's metric over its orders, mean over tasks): "
                  + ", ".join(f"{c[:-4]} {df[c].mean():.3f}" for c in spread) + "."]
    stable = [s for s in ("icl", "gd", "lcgd") if f"stable_{s}" in df.columns]
    lines += ["", "Share of test examples whose prediction never changes across orders: "
              + ", ".join(f"{s.upper()} {df[f'stable_{s}'].mean():.3f}" for s in stable)
              + "; accuracy spread over orders (std): "
              + ", ".join(f"{s.upper()} {df[f'acc_std_{s}'].mean():.3f}" for s in stable if f"acc_std_{s}" in df) + ".", ""]
    return lines

