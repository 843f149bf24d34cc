"""Reports over several models: one report per model, and the models side by side.

`write_reports` is what `lens-iclgd report` calls. With one model in the results it
writes the one-model report of report.py unchanged. With several it writes that report
for each model's cells alone in `<out>/<model>/` (so no table ever averages across
models) and, in `<out>/report.md`, the cross-model section:

- the premise: ICL - ZS accuracy per model and task (icl_gain.py);
- Tables 1 and 2 side by side: each row's mean over tasks, one column per model;
- the four docs/protocol.md findings per model, with their verdicts against the paper;
- fig_crossmodel_simam_delta.png: per-layer SimAM_delta of GD and LCGD per model on a
  normalised depth axis (layer / (n_layers - 1));
- per model: the k, n-test and seeds actually run, and per grid the compute time (sum
  of the cells' timings.json `total`), peak memory and the machine it ran on.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import report as R
from .progress import fmt_time
from . import patch_report, rates, shen
from .costs import cost_table_markdown
from .findings import CLAIMS, Finding
from .icl_gain import icl_gain_body, icl_gain_table
from .lr_rule import rate_origin
from .store import atomic_write_bytes, atomic_write_text


def model_slug(model: str) -> str:
    """A model's report directory: the last path component of its name, file-safe."""
    return re.sub(r"[^A-Za-z0-9_.+=-]", "-", Path(model).name)


def write_reports(results_dir: str | Path, out_dir: str | Path | None = None, command: str | None = None,
                  times: dict[str, Any] | None = None, manifest: dict[str, Any] | None = None) -> Path:
    """The report of `results_dir`: report.py's for one model, per-model reports plus the
    cross-model report.md for several. Returns the report directory."""
    out = Path(out_dir) if out_dir else Path(results_dir) / "report"
    coll = R.collect(results_dir)
    models = sorted({c["config"]["model"] for c in coll.cells})
    if len(models) <= 1:
        return R.write_report(results_dir, out, command, manifest=manifest)
    per_model = {m: R.collect(results_dir, m) for m in models}
    for m in models:
        R.write_report(results_dir, out / model_slug(m), command, model=m, manifest=manifest)

    lines = ["# lens-iclgd cross-model report", ""]
    if manifest:
        lines += R.manifest_lines(manifest, results_dir, coll)
    elif command:
        lines += ["Produced by:", "", "```", command, "```", ""]
    lines += [f"Results: `{results_dir}`: {len(coll.cells)} finished cells"
              + (f" of {coll.expected} defined by the grids here; {coll.missing} missing, {len(coll.failed)} failed"
                 if coll.expected else "") + ". Only finished cells are reported.", "",
              "Per-model reports (tables, figures, findings of each model's cells alone): "
              + ", ".join(f"[{m}]({model_slug(m)}/report.md)" for m in models) + ".", ""]

    lines += verdicts_at_a_glance(per_model)
    gain = icl_gain_table(coll.cells)
    atomic_write_bytes(out / "icl_gain.csv", gain.to_csv(index=False, float_format="%.4f").encode())
    lines += ["## The premise: ICL - ZS accuracy per model", ""] + icl_gain_body(gain, times)

    makers = {"Table 1": R.table1, "Table 2": lambda rows, protocol: R.table2(rows, *R.PROTOCOLS[protocol][:2])}
    for protocol in ("paper", "summed"):
        for name, make in makers.items():
            table = side_by_side({m: make(c.rows, protocol) if not c.rows.empty else pd.DataFrame()
                                  for m, c in per_model.items()})
            if table.empty and protocol == "paper":
                continue  # only once some model has cells at the paper's protocol
            lines += [f"## {name}, mean over tasks, per model ({PROTOCOL_TITLES[protocol]})", ""]
            if table.empty:
                lines += ["No finished cells for this table.", ""]
                continue
            slug = name.lower().replace(" ", "") + ("_paper" if protocol == "paper" else "")
            atomic_write_bytes(out / f"crossmodel_{slug}.csv", table.to_csv(index=False, float_format="%.4f").encode())
            rates_used = ("GD at its chosen rate." if name == "Table 1" else "GD's chosen rate, shared by LCGD (regime a)."
                          if protocol == "paper" else "each method at its own chosen rate (regime b).")
            lines += [R._plain_markdown(_with_spread(table, models)), "",
                      f"Each cell: the mean column of that model's {name} (mean over tasks of the mean over seeds) ± its "
                      "standard deviation over seeds (of the task-averaged value; only where every task has every seed), "
                      "and [the lowest, the highest] task mean; a model's tasks are those with cells at this protocol. "
                      f"Learning rates: {rates_used} Loss: "
                      + ("the mean of the demonstration's token losses (the paper's code)." if protocol == "paper"
                         else "summed over the demonstration's tokens."), ""]

    for protocol in ("paper", "summed"):
        by_model = {m: R.findings(c, protocol) for m, c in per_model.items()}
        if protocol == "paper" and all(f.verdict == "not available" for fs in by_model.values() for f in fs):
            continue
        lines += findings_side_by_side(by_model, {m: findings_scale(c, protocol) for m, c in per_model.items()},
                                       PROTOCOL_TITLES[protocol])
    lines += CODE_CHECKS
    caption = fig_simam_delta_depth(per_model, out / "fig_crossmodel_simam_delta.png")
    lines += ["## Figure: per-layer SimAM_delta by depth", ""]
    lines += ([f"![fig_crossmodel_simam_delta.png](fig_crossmodel_simam_delta.png)", "", f"*{caption}*", ""]
              if caption else ["No model has trained-model cells with GD and LCGD yet.", ""])
    expected = set(R._expected_cells(Path(results_dir)))  # cells of older settings stay out, as in collect()
    shen_lines = shen.crossmodel_section(results_dir, expected)
    if shen_lines:
        lines += ["## Shen et al.: order sensitivity and output-level comparisons, per model", ""] + shen_lines
    causal_lines = patch_report.crossmodel_section(results_dir, out, expected)
    if causal_lines:
        lines += ["## Where the effect is carried: activation patching, per model", ""] + causal_lines
    atomic_write_text(out / "cost_table.md", cost_table_markdown(results_dir))
    lines += ["## What was run, per model", "", "Wall time per phase of every paper-scale cell: [cost_table.md](cost_table.md).", ""]
    grids = R.grid_cells(results_dir)
    for m in models:
        lines += run_summary(m, per_model[m], grids, Path(results_dir))
    atomic_write_text(out / "report.md", "\n".join(lines))
    return out


# What rules out the code when a finding does not reproduce (each a test or a script here).
CODE_CHECKS = [
    "**Where a finding disagrees, what rules out the code.** The metrics agree with the papers' own metric code "
    "(Dai et al.'s compute_sim.py, Deutch et al.'s metrics.py) fed the same recordings to <= 1.4e-6 per layer on every "
    "deterministic metric (experiments/compare_paper_metrics.py); each metric has hand-computed cases "
    "(tests/test_metrics.py); LCGD's gradients equal a per-layer reference computation and its training equals a "
    "plain SGD loop, GD's gradients equal the full model's loss (tests/test_finetune.py); the optimised recording and "
    "training equal the naive TransformerLens pipeline to <= 8.6e-5 relative, predictions 100% identical "
    "(`lens-iclgd bench`). A disagreement is then a property of the model, task and learning rate as run, not of "
    "the code.", ""]


# Short names of report.PROTOCOLS for titles and table rows.
PROTOCOL_TITLES = {"paper": "paper's protocol: token-mean loss, GD's rate shared",
                   "summed": "summed loss, each method's own rate"}


def verdicts_at_a_glance(per_model: dict[str, R.Collected]) -> list[str]:
    """The answer first: every finding x model at each protocol, finding 3 also per
    learning-rate regime of each sweep (rates.py), each entry with the numbers it rests on."""
    models = list(per_model)
    lines = ["## Verdicts at a glance", "",
             "Rows 1-4: the cells at the chosen rates, per protocol: the paper's (token-mean loss, GD's chosen rate "
             "shared by LCGD; k 32, n-test 200, the tasks whose rate has been chosen) and the summed-loss paper-scale "
             "cells (k 32, n-test up to 2000, each method at its own chosen rate); details in \"Findings\" below. "
             "Rows 3(a)-(c): finding 3 on each learning-rate sweep (GD and LCGD at shared rates), "
             "decided per regime (section \"Finding 3 by learning rate and update size\" of each model's report); "
             "\"depends on the rate\" where the regimes or the per-rate counts disagree.", "",
             "| finding | regime | " + " | ".join(models) + " |", "|---|---|" + "---|" * len(models)]
    for protocol in ("paper", "summed"):
        found = {m: {f.number: f for f in R.findings(c, protocol)} for m, c in per_model.items()}
        if protocol == "paper" and all(f.verdict == "not available" for fs in found.values() for f in fs.values()):
            continue
        for n, claim in CLAIMS.items():
            cells = []
            for m in models:
                f = found[m].get(n)
                cells.append("not available" if f is None else f.verdict + (f" ({_short(f)})" if _short(f) else ""))
            lines.append(f"| {n}. {claim.name} | {PROTOCOL_TITLES[protocol]} | " + " | ".join(cells) + " |")
    results = {m: {key: rates.regimes(s) for key, s in rates.sweeps(c.cells).items()} for m, c in per_model.items()}
    for loss, k in sorted({(key[1], key[2]) for r in results.values() for key in r}):
        for regime, name in [*rates.REGIMES.items(), ("overall", "overall")]:
            row = []
            for m in models:
                res = results[m].get((m, loss, k))
                if res is None:
                    row.append("-")
                elif regime == "overall":
                    row.append(res["overall"])
                else:
                    v = res["verdicts"].get(regime)
                    row.append("-" if not v else f"{v['verdict']} ({v['wins']}/{v['tasks']} tasks; "
                               f"{v['lcgd']:.3f} vs {v['gd']:.3f})" if v["tasks"] else v["verdict"])
            label = f"({regime}) {name}" if regime != "overall" else "all regimes and rates"
            lines.append(f"| 3. {CLAIMS[3].name} | {loss} loss, k {k}: {label} | " + " | ".join(row) + " |")
    return lines + [""]


def _short(f: Finding) -> str:
    """The one or two numbers a verdict rests on, for the table."""
    n = f.numbers
    if f.number == 3 and "tasks" in n:
        return f"{n['tasks_lcgd_above']}/{n['tasks']} tasks; alpha {n['alpha']:.3f}"
    if f.number == 4 and "grad_norm_ratio" in n:
        return f"{n['grad_norm_ratio']:.1f}x"
    if f.number == 2 and "SimAOU_norm" in n:
        return f"{n['SimAOU_norm']:.3f} vs {n['SimAOU']:.3f}"
    if f.number == 1 and "SimAOU_trained" in n:
        return f"trained {n['SimAOU_trained']:.3f}"
    return ""


def side_by_side(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Rows of every model's table (in first-seen order) x per model: the row's mean over
    tasks, its standard deviation over seeds (of the task-averaged value) and the range of
    its task means (columns <model>, <model>_seed_std, <model>_task_min, <model>_task_max)."""
    labels: list[str] = []
    for t in tables.values():
        if not t.empty:
            labels += [r for r in t["row"] if r not in labels]
    if not labels:
        return pd.DataFrame()
    out = pd.DataFrame({"row": labels})
    for model, t in tables.items():
        t = t.set_index("row") if not t.empty else pd.DataFrame()
        task_cols = [c for c in t.columns if c.endswith("_mean") and c != "mean_mean"]
        get = lambda r, col: t.at[r, col] if r in t.index and col in t.columns else np.nan
        out[model] = [get(r, "mean_mean") for r in labels]
        out[f"{model}_seed_std"] = [get(r, "mean_std") for r in labels]
        per_task = [pd.to_numeric(t.loc[r, task_cols], errors="coerce") if r in t.index else pd.Series(dtype=float) for r in labels]
        out[f"{model}_task_min"] = [v.min() if len(v.dropna()) else np.nan for v in per_task]
        out[f"{model}_task_max"] = [v.max() if len(v.dropna()) else np.nan for v in per_task]
    return out


def _with_spread(table: pd.DataFrame, models: list[str]) -> pd.DataFrame:
    """side_by_side's numbers as 'mean ± seed-std [task min, max]' strings."""
    def text(r, m: str) -> str:
        v, s, lo, hi = r[m], r[f"{m}_seed_std"], r[f"{m}_task_min"], r[f"{m}_task_max"]
        if pd.isna(v):
            return ""
        out = f"{v:.3f}" + (f" ± {s:.3f}" if pd.notna(s) else "")
        return out + (f" [{lo:.2f}, {hi:.2f}]" if pd.notna(lo) and hi > lo else "")
    return pd.DataFrame({"row": table["row"], **{m: [text(r, m) for _, r in table.iterrows()] for m in models}})


def _chosen_rate_rows(coll: R.Collected, protocol: str = "summed") -> pd.DataFrame:
    """GD/LCGD rows of the cells at the chosen rates of one protocol (what tables and findings use)."""
    rule, loss, _ = R.PROTOCOLS[protocol]
    rows = R._paper_cells(coll.rows, rule, loss)
    return rows[rows["method"].isin(["gd", "lcgd"])] if not rows.empty else rows


def findings_scale(coll: R.Collected, protocol: str = "summed") -> str:
    """What a model's findings rest on: its cells at the chosen rates (tables 1 and 2)."""
    rows = _chosen_rate_rows(coll, protocol).drop_duplicates("cell")
    if rows.empty:
        return "no cells at the chosen rates"

    def span(col: str) -> str:
        lo, hi = int(rows[col].min()), int(rows[col].max())
        return str(lo) if lo == hi else f"{lo}-{hi}"

    return (f"{len(rows)} cells: k {span('k')}, n-test {span('n_test')}, seeds "
            f"{', '.join(map(str, sorted(rows['seed'].unique())))}, {rows['task'].nunique()} tasks, "
            f"baselines {', '.join(sorted(rows['baseline'].unique()))}")


def findings_side_by_side(by_model: dict[str, list[Finding]], scale: dict[str, str] | None = None,
                          title: str = "") -> list[str]:
    """A verdict table (finding x model), then each finding's claim, rule and numbers per
    model; `scale`: per model, the cells the findings rest on (a first row)."""
    lines = ["## Findings (docs/protocol.md) per model" + (f" ({title})" if title else ""), "",
             "Verdicts against the paper's findings; a finding a model does not reproduce is reported as such.", "",
             "| finding | " + " | ".join(by_model) + " |", "|---|" + "---|" * len(by_model)]
    if scale:
        lines.append("| based on | " + " | ".join(scale.get(m, "") for m in by_model) + " |")
    numbered = {m: {f.number: f for f in fs} for m, fs in by_model.items()}
    for n, claim in CLAIMS.items():
        verdicts = [numbered[m][n].verdict if n in numbered[m] else "not available" for m in by_model]
        lines.append(f"| {n}. {claim.name} | " + " | ".join(verdicts) + " |")
    lines.append("")
    for n, claim in CLAIMS.items():
        lines += [f"**Finding {n}: {claim.name}.** Paper: {claim.claim} Rule: {claim.rule}.", ""]
        for m in by_model:
            f = numbered[m].get(n)
            lines.append(f"- {m}: " + ("not available" if f is None else
                                       f"{f.evidence} -> **{f.verdict}**" + (f" ({f.scope})" if f.scope else "")))
        lines.append("")
    return lines


def fig_simam_delta_depth(per_model: dict[str, R.Collected], path: Path) -> str | None:
    curves = {m: R._table2_cells(c) for m, c in per_model.items()}
    curves = {m: cells for m, cells in curves.items() if cells}
    if not curves:
        return None
    plt = R._plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for (model, cells), color in zip(curves.items(), plt.cm.tab10.colors):
        for method, style in (("gd", "-"), ("lcgd", "--")):
            v = np.nanmean(R._per_layer(cells, method, "SimAM_delta"), 0)
            depth = np.arange(len(v)) / max(len(v) - 1, 1)
            ax.plot(depth, v, ls=style, marker="o", ms=3, color=color, label=f"{model} {method.upper()}")
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xlabel("depth: layer / (n_layers - 1)")
    ax.set_ylabel("SimAM_delta")
    ax.set_title("Per-layer SimAM_delta of GD and LCGD, by model")
    ax.legend(fontsize=7)
    counts = ", ".join(f"{m} {len(c)}" for m, c in curves.items())
    return R._save(fig, path, f"Solid: GD, dashed: LCGD. Mean over the trained-model GD+LCGD cells at the default "
                              f"learning rate (tasks x seeds; cells: {counts}) of the per-layer mean over test examples.")


def run_summary(model: str, coll: R.Collected, grids: dict[str, dict[str, Any]], results_dir: Path) -> list[str]:
    """k, n-test and seeds actually run; per grid: cells, compute time, peak memory, machine."""
    cells = coll.cells
    lines = [f"### {model}", ""]
    if not cells:
        return lines + ["No finished cells.", ""]

    def values(key: str) -> str:
        return ", ".join(str(v) for v in sorted({c["config"][key] for c in cells}))

    lines += [f"k requested {values('k_requested')}, effective {values('k_effective')}; n-test {values('n_test_effective')}; "
              f"seeds {values('seed')}; tasks {', '.join(R._task_order(Path(c['config']['task']).stem for c in cells))}; "
              f"baselines {values('baseline')}.", "",
              "| grid | cells | k | n-test | seeds | compute (sum of cell totals) | peak RSS | machine, threads, torch |",
              "|---|---|---|---|---|---|---|---|"]
    by_name = {Path(c["_path"]).name: c for c in cells}
    groups = {g: [i for i in ids if i in by_name] for g, ids in grids.items()}
    ungrouped = sorted(set(by_name) - {i for ids in groups.values() for i in ids})
    if ungrouped:
        groups["(no grid recorded)"] = ungrouped
    for grid, ids in groups.items():
        if not ids:
            continue
        timings = [_timings(Path(by_name[i]["_path"])) for i in sorted(ids)]
        total = sum(t.get("total", 0.0) for t in timings)
        peak = max((t.get("peak_rss_mb", 0) for t in timings), default=0)
        envs = sorted({f"{e.get('machine')}, {e.get('threads')} threads, torch {e.get('torch')}"
                       for e in (by_name[i].get("environment", {}) for i in ids)})
        missing = sum(not t for t in timings)

        def spread(key: str) -> str:
            v = sorted({by_name[i]["config"][key] for i in ids})
            return ", ".join(map(str, v)) if key == "seed" or len(v) == 1 else f"{v[0]}-{v[-1]}"

        lines.append(f"| {grid} | {len(ids)} | {spread('k_effective')} | {spread('n_test_effective')} | {spread('seed')} | "
                     f"{fmt_time(total)}" + (f" ({missing} without timings)" if missing else "")
                     + f" | {peak} MB | {'; '.join(envs)} |")
    lines += ["", learning_rates_used(coll)]
    return lines + ["", "Compute: the sum of the cells' own wall times (timings.json `total`); cells reusing "
                        "another cell's recordings count only what they ran. Peak RSS: the largest process peak "
                        "recorded by a cell.", ""]


def learning_rates_used(coll: R.Collected) -> str:
    """Per protocol and task, the GD / LCGD rates of the chosen-rate cells and how they were chosen."""
    out = []
    for protocol in ("paper", "summed"):
        rows = _chosen_rate_rows(coll, protocol)
        if rows.empty:
            continue
        parts = []
        for task in R._task_order(rows["task"]):
            sub = rows[rows["task"] == task]
            parts.append(task + " " + "; ".join(
                f"{m.upper()} " + "/".join(f"{v:g}" for v in sorted(sub[sub["method"] == m]["lr"].unique()))
                + f" ({', '.join(sorted({rate_origin(x) for x in sub[sub['method'] == m]['lr_source']}))})"
                for m in ("gd", "lcgd") if (sub["method"] == m).any()))
        out.append(f"Learning rates of the chosen-rate cells ({PROTOCOL_TITLES[protocol]}): " + ", ".join(parts) + ".")
    return " ".join(out) or "Learning rates: no cells at the chosen rates."


def _timings(cell_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((cell_dir / "timings.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}

