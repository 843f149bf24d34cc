"""Reports: the paper's tables, figures and findings from a results directory.

Reads every finished cell (`cells/*/results.json`; `lens-iclgd run` output directories
work too), says how many cells of the grids recorded there are still missing or failed,
and writes to the report directory:

- table1.md/.csv: SimAOU (and SimAOU_norm, SimAM_delta) of vanilla GD for the trained,
  untrained and embeddings-retained models; rows settings, columns tasks + mean;
- table2.md/.csv: GD vs LCGD (SimAOU, SimAM beside ZS SimAM, SimAM_delta, alpha, accuracies);
- fig2_alpha.png, fig3_per_layer.png, fig4_grad_norms.png, fig_lr.png (learning-rate
  curves), fig_ablation.png (per-layer ablation sweep), each with a caption;
- chosen_learning_rates.toml: per-task learning rates of each method from the lr_sweep
  cells, chosen by that method's accuracy on held-out training examples (never by a
  similarity metric; lr_rule.py);
- Table 2 is at each method's own chosen learning rate; table2_shared.md/.csv is the same
  with every method at GD's chosen rate (cells run with `lrs = ["shared"]`);
- report.md: all of the above and the four findings of docs/protocol.md, checked.

Cells: mean over seeds with the standard deviation over seeds; the "mean" column
averages the task means, its spread is the standard deviation over seeds of the
task-averaged value.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .errors import UserError
from . import costs, patch_report, rates, shen
from .findings import CLAIMS, COLLAPSED_SHARE, Finding, unavailable
from .config import LOSS_REDUCTIONS
from .lr_rule import MEAN, SUM, format_table
from .store import atomic_write_bytes, atomic_write_text, read_toml
from .tasks import PAPER_TASKS

METRICS = ("SimAOU", "SimAOU_norm", "SimAOU_random", "SimAOU_random_text", "SimAOU_random_matched", "SimAM",
           "SimAM_delta", "Rec2FTP")
BASELINE_NAMES = {"trained": "Trained", "untrained": "No Training", "embeddings": "Trained Embeddings"}
TASK_ORDER = PAPER_TASKS  # tables list tasks in the paper's order


COLUMNS = ["cell", "model", "baseline", "task", "seed", "lr", "lr_default", "lr_rule", "lr_source", "plain", "loss", "step_plain",
           "ablate", "k", "n_test", "paper_scale",
           "acc_zs", "acc_icl", "alpha", "zs_simam", "method", "acc_ft", "heldout_acc", "heldout_share", *METRICS,
           # output-level (Shen et al.) and F2T columns; absent (NaN) in cells from before they were recorded
           "tok_zs", "tok_icl", "tok_ft", "out_top_k_overlap", "out_overlap_cosine", "out_kl", "out_js",
           "zs_icl_kl", "f2t_n", "f2t_SimAOU", "f2t_SimAM_delta"]


@dataclass
class Collected:
    rows: pd.DataFrame  # one row per (cell, method), columns COLUMNS
    cells: list[dict[str, Any]]  # the results.json of every finished cell
    expected: int  # cells the recorded grids define (0 if unknown)
    failed: list[dict[str, Any]] = field(default_factory=list)
    missing: int = 0  # expected cells neither finished nor failed
    stale: int = 0  # finished cells no recorded grid defines any more (settings changed): left out


def collect(results_dir: str | Path, model: str | None = None) -> Collected:
    """Finished cells of `results_dir` (of one `model` if given). Where grids are recorded
    (grids/*.json), only the cells they define count, so a cell from an older setting is
    never pooled in."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise UserError(f"results directory {results_dir} does not exist")
    expected = {i: c for i, c in _expected_cells(results_dir).items() if model is None or c["model"] == model}
    files = sorted(results_dir.glob("cells/*/results.json")) or sorted(results_dir.glob("**/results.json"))
    cells, rows, n_files = [], [], 0
    for f in files:
        try:
            r = json.loads(f.read_text())
        except (json.JSONDecodeError, OSError):
            continue  # cannot happen with atomic writes; skip rather than report garbage
        if model is not None and r["config"]["model"] != model:
            continue
        n_files += 1
        if expected and f.parent.name not in expected:
            continue
        r["_path"] = str(f.parent)
        cells.append(r)
        c = r["config"]
        base = {
            "cell": f.parent.name, "model": c["model"], "baseline": c["baseline"], "task": Path(c["task"]).stem,
            "seed": c["seed"], "lr": c["lr"], "lr_default": _lr_rule(c) == "default", "lr_rule": _lr_rule(c),
            "plain": _plain(c), "loss": _loss(c), "step_plain": _step_plain(c),
            "ablate": c.get("ablate", ""), "k": c["k_effective"], "n_test": c["n_test_effective"],
            "paper_scale": c.get("n_test", c["n_test_effective"]) >= PAPER_SCALE_N_TEST,  # as asked; else as run
            "acc_zs": r["accuracy"]["zs"], "acc_icl": r["accuracy"].get("icl"),
            "alpha": (r.get("alpha") or {}).get("mean"),
            "zs_simam": (r.get("zs_simam") or {}).get("mean"),  # absent in older results
        }
        if not r["metrics"]:
            rows.append({**base, "method": "icl"})
        for method, m in r["metrics"].items():
            row = {**base, "method": method, "acc_ft": r["accuracy"][method], "lr": (c.get("lr_by_method") or {}).get(method, c["lr"]),
                   "lr_source": (c.get("lr_source_by_method") or {}).get(method) or c.get("lr_source"),
                   "heldout_acc": (r.get("heldout_accuracy") or {}).get(method),
                   # absent (NaN) in cells from before it was recorded
                   "heldout_share": (r.get("heldout_majority_share") or {}).get(method)}
            row.update({name: (m.get(name) or {}).get("mean") for name in METRICS})  # older results lack some
            out = r.get("outputs")
            if out:
                tok = out["token_accuracy"]
                row.update({"tok_zs": tok.get("zs"), "tok_icl": tok.get("icl"), "tok_ft": tok.get(method),
                            "zs_icl_kl": (out["pairs"].get("zs-icl") or {}).get("kl"),
                            **{f"out_{k}": v for k, v in (out["pairs"].get(f"icl-{method}") or {}).items()}})
            if "f2t" in m:
                row.update({"f2t_n": m["f2t"]["n_examples"], "f2t_SimAOU": m["f2t"].get("SimAOU"),
                            "f2t_SimAM_delta": m["f2t"].get("SimAM_delta")})
            if "SimAOU_random_matched" not in m:  # older results: their SimAOU_random was the matched variant
                row["SimAOU_random_matched"], row["SimAOU_random"] = row["SimAOU_random"], None
            rows.append(row)
    failed = []
    for f in sorted(results_dir.glob("cells/*/failed.json")):
        info = json.loads(f.read_text())
        if not (f.parent / "results.json").exists() and (not expected or f.parent.name in expected) \
                and (model is None or info["config"]["model"] == model):
            failed.append({**info, "_cell": f.parent.name})
    done = {Path(c["_path"]).name for c in cells} | {f["_cell"] for f in failed}
    done |= {f.parent.name for f in results_dir.glob("cells/*/orders.json")}  # order-study cells (shen.py)
    done |= {f.parent.name for f in results_dir.glob("cells/*/patching.json")}  # causal-study cells (patch_report.py)
    return Collected(pd.DataFrame(rows, columns=COLUMNS), cells, len(expected), failed,
                     missing=len(expected.keys() - done), stale=n_files - len(cells))


def _lr_rule(config: dict) -> str:
    """default / shared / auto / --lr (cells from before per-method rates: default or --lr)."""
    return config.get("lr_rule") or ("default" if config.get("lr_source") not in (None, "--lr") else "--lr")


def _expected_cells(results_dir: Path) -> dict[str, dict[str, Any]]:
    """cell id -> {model, baseline, task, seed} of every cell the recorded grids define."""
    return {i: c for grid in grid_cells(results_dir).values() for i, c in grid.items()}


def grid_cells(results_dir: str | Path) -> dict[str, dict[str, dict[str, Any]]]:
    """grid name -> {cell id -> {model, baseline, task, seed}} of the grids recorded in
    grids/*.json. A record lists its cells' ids (grids run since they do); an older record
    has them recomputed (that needs the model stack: grid.py), and one recorded without
    data fingerprints was run before they existed: its cells carry legacy ids."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for f in sorted(Path(results_dir).glob("grids/*.json")):
        raw = json.loads(f.read_text())
        out[raw["name"]] = raw["cells"] if "cells" in raw else _recomputed_ids(raw)
    return out


def _recomputed_ids(raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    from .grid import cell_id, cells, grid_from_record, legacy_cell_id

    grid = grid_from_record(raw)
    return {(cell_id(c, grid.data_fingerprints) if "data_fingerprints" in raw else legacy_cell_id(c)):
            {"model": c.model, "baseline": c.baseline, "task": c.task, "seed": c.seed} for c in cells(grid)}


# Cells at each method's own chosen rate: from learning_rates.toml ("default") or chosen in
# the cell itself by the same rule ("auto", --lr auto); "shared": every method at GD's.
CHOSEN_RATES = {"default": ("default", "auto"), "shared": ("shared",)}


# The two protocols the tables and findings are decided at, never pooled: the committed
# paper-scale cells' (summed loss, each method at its own chosen rate) and the paper's
# (token-mean loss, GD's chosen rate shared by both methods; the default since issue 31).
PROTOCOLS = {"paper": ("shared", MEAN, "the paper's protocol: token-mean loss, GD's chosen rate shared by both methods"),
             "summed": ("default", SUM, "summed loss, each method at its own chosen rate")}


# The paper's test scale, n-test min(2000, split) (paper_scale_*.toml), as the cell asked
# for it. The token-mean cells come at two scales never pooled: the sweeps' n-test 200
# (paper_protocol_*.toml: the findings at the paper's protocol) and the paper's (Table 2 at
# the paper's protocol and scale). Every summed-loss Table 2 cell is at the paper's scale.
PAPER_SCALE_N_TEST = 2000


def _paper_cells(rows: pd.DataFrame, rule: str = "default", loss: str = SUM, paper_scale: bool = False) -> pd.DataFrame:
    """Rows at the chosen learning rates (`rule`: each method's own, or "shared": GD's),
    of one loss reduction, without ablation: what the tables, figures 2-4 and the findings
    are about. The summed loss by default: the committed paper-scale cells' protocol. For
    the token-mean loss, the cells at the sweeps' scale, or with `paper_scale` the paper's."""
    chosen = rows["lr_rule"].isin(CHOSEN_RATES[rule]) & rows["step_plain"] & (rows["loss"] == loss) & (rows["ablate"] == "")
    if loss == MEAN:
        chosen &= rows["paper_scale"].fillna(False).astype(bool) == paper_scale
    return rows[chosen]


def _one_row_per_run(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per (setting, method): a Table 1 trained cell repeats its Table 2 cell's GD
    (shared recordings), so count that run once, keeping the copy with LCGD's alpha."""
    rows = rows.sort_values("alpha", na_position="last", kind="stable")
    return rows.drop_duplicates(subset=["model", "baseline", "task", "seed", "method", "k", "n_test", "lr", "lr_rule",
                                        "plain", "ablate"])


def _sweep_cells(rows: pd.DataFrame, loss: str = SUM) -> pd.DataFrame:
    """Rows of the learning-rate sweep of one loss reduction: an explicit learning rate, no ablation."""
    return rows[(rows["lr_rule"] == "--lr") & rows["step_plain"] & (rows["loss"] == loss) & (rows["ablate"] == "")]


# --- tables ----------------------------------------------------------------------------------


def _task_order(tasks) -> list[str]:
    return sorted(set(tasks), key=lambda t: (TASK_ORDER.index(t) if t in TASK_ORDER else 99, t))


def seed_table(df: pd.DataFrame, row_keys: list[tuple[str, pd.DataFrame, str]]) -> pd.DataFrame:
    """Rows (label, subset, value column) -> columns task and mean, as 'mean ± std'
    over seeds, plus numeric columns for the CSV."""
    tasks = _task_order(df["task"])
    out = []
    for label, sub, col in row_keys:
        sub = sub.dropna(subset=[col])
        if sub.empty:
            continue
        row: dict[str, Any] = {"row": label}
        per_task = sub.groupby("task")[col].agg(["mean", "std", "count"])
        for t in tasks:
            if t in per_task.index:
                m, s, n = per_task.loc[t]
                row[t] = _pm(m, s if n > 1 else float("nan"))
                row[f"{t}_mean"], row[f"{t}_std"], row[f"{t}_n"] = m, s, n
            else:
                row[t] = ""
        by_seed = sub.groupby("seed")[col].mean() if sub["task"].nunique() == len(tasks) else pd.Series(dtype=float)
        mean = per_task["mean"].mean()
        spread = by_seed.std() if len(by_seed) > 1 else float("nan")
        row["mean"] = _pm(mean, spread)
        row["mean_mean"], row["mean_std"] = mean, spread
        out.append(row)
    return pd.DataFrame(out)


def _pm(m: float, s: float) -> str:
    return f"{m:.3f}" if not np.isfinite(s) else f"{m:.3f} ± {s:.3f}"


def _plain_markdown(table: pd.DataFrame) -> str:
    cols = list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join("" if pd.isna(v) else f"{v:g}" if isinstance(v, float) else str(v) for v in r) + " |"
              for r in table.itertuples(index=False)]
    return "\n".join(lines)


def _markdown(table: pd.DataFrame) -> str:
    cols = ["row"] + [c for c in table.columns if c != "row" and not c.endswith(("_mean", "_std", "_n"))]
    lines = ["| " + " | ".join("" if c == "row" else c for c in cols) + " |", "|" + "---|" * len(cols)]
    for _, r in table.iterrows():
        lines.append("| " + " | ".join(str(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def table1(rows: pd.DataFrame, protocol: str = "summed") -> pd.DataFrame:
    rule, loss, _ = PROTOCOLS[protocol]
    gd = _paper_cells(_one_row_per_run(rows), rule, loss)[lambda r: r["method"] == "gd"]
    keys = []
    for metric in ("SimAOU", "SimAOU_norm", "SimAM_delta", "SimAOU_random"):
        for b, name in BASELINE_NAMES.items():
            keys.append((f"{name} — {metric}", gd[gd["baseline"] == b], metric))
    return seed_table(gd, keys) if len(gd) else pd.DataFrame()


def table2(rows: pd.DataFrame, rule: str = "default", loss: str = SUM, paper_scale: bool = False) -> pd.DataFrame:
    """GD vs LCGD; `rule` "default": each method at its own chosen rate, "shared": at GD's;
    `loss`: the loss reduction of the cells (never pooled); `paper_scale`: token-mean cells
    at n-test min(2000, split) instead of the sweeps' 200."""
    t = _paper_cells(rows, rule, loss, paper_scale)[lambda r: r["baseline"] == "trained"]
    t = t[t["cell"].isin(set(t[t["method"] == "gd"]["cell"]) & set(t[t["method"] == "lcgd"]["cell"]))]
    if t.empty:
        return pd.DataFrame()
    keys = []
    gd_rows = t[t["method"] == "gd"]
    for metric in ("SimAOU", "SimAM", "SimAM_delta", "Rec2FTP"):
        for m in ("gd", "lcgd"):
            keys.append((f"{metric} — {m.upper()}", t[t["method"] == m], metric))
        if metric == "SimAM":  # Dai et al.'s baseline for SimAM; one value per cell
            keys.append(("ZS SimAM (ICL vs ZS)", gd_rows, "zs_simam"))
    keys.append(("alpha (LCGD vs GD)", gd_rows, "alpha"))
    keys += [("accuracy — ZS", gd_rows, "acc_zs"), ("accuracy — ICL", gd_rows, "acc_icl"),
             ("accuracy — GD", gd_rows, "acc_ft"), ("accuracy — LCGD", t[t["method"] == "lcgd"], "acc_ft")]
    # Shen et al.'s output-level view and Dai et al.'s F2T subset (rows only where cells recorded them)
    keys += [("top-1 token accuracy — ZS", gd_rows, "tok_zs"), ("top-1 token accuracy — ICL", gd_rows, "tok_icl")]
    for m in ("gd", "lcgd"):
        keys.append((f"top-1 token accuracy — {m.upper()}", t[t["method"] == m], "tok_ft"))
    keys.append(("KL(ZS ‖ ICL) at the output", gd_rows, "zs_icl_kl"))
    for name, col in (("top-K overlap", "out_top_k_overlap"), ("overlap cosine", "out_overlap_cosine"),
                      ("KL(ICL ‖ FT)", "out_kl"), ("JS", "out_js"), ("F2T examples", "f2t_n"),
                      ("F2T SimAOU", "f2t_SimAOU"), ("F2T SimAM_delta", "f2t_SimAM_delta")):
        for m in ("gd", "lcgd"):
            keys.append((f"{name} — ICL vs {m.upper()}" if not name.startswith("F2T") else f"{name} — {m.upper()}",
                         t[t["method"] == m], col))
    return seed_table(t, keys)


def _rate_flags(r) -> str:
    flags = [name for name, on in (("edge", r.edge), ("collapsed", r.collapsed or False)) if on]
    return f" ({', '.join(flags)})" if flags else ""


def choose_learning_rates(rows: pd.DataFrame) -> pd.DataFrame:
    """Per (model, loss reduction, task, method): rates.chosen on that model's sweep of that
    loss reduction (held-out accuracy only; similarity metrics play no part)."""
    out = []
    for loss in LOSS_REDUCTIONS:  # each loss reduction's rates from its own sweep
        sweep = _sweep_cells(rows, loss)[lambda r: r["method"].isin(["gd", "lcgd"]) & r["heldout_acc"].notna()]
        for model, sub in sweep.groupby("model"):
            picks = rates.chosen(sub.rename(columns={"heldout_acc": "heldout"}))
            out.append(picks.assign(model=model, loss=loss))
    cols = ["model", "loss", "task", "method", "lr", "heldout_acc", "seeds", "edge", "collapsed", "curve"]
    return pd.concat(out, ignore_index=True)[cols] if out else pd.DataFrame(columns=cols)


# --- figures ---------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, caption: str) -> str:
    import io

    fig.text(0.01, 0.005, caption, fontsize=7, ha="left", va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=130, metadata={"Software": None})  # no version stamp: same bytes on rerun
    atomic_write_bytes(path, buf.getvalue())
    _plt().close(fig)
    return caption


def fig_alpha(rows: pd.DataFrame, path: Path) -> str | None:
    t = _paper_cells(rows)[lambda r: (r["method"] == "gd") & (r["baseline"] == "trained")].dropna(subset=["alpha"])
    if t.empty:
        return None
    plt = _plt()
    tasks = _task_order(t["task"])
    stats = t.groupby("task")["alpha"].agg(["mean", "std"]).reindex(tasks)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.bar(tasks, stats["mean"], yerr=stats["std"].fillna(0), capsize=4, color="#4C72B0")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_title("Figure 2: alignment of GD and LCGD updates (alpha)")
    ax.set_xlabel("task")
    ax.set_ylabel("alpha = cos(m_LCGD - m_ZS, m_GD - m_ZS)")
    return _save(fig, path, "Each method at its own chosen learning rate, summed loss. " f"alpha per task, mean over layers, heads and test examples; bars: mean over seeds, "
                            f"error bars: std over seeds ({t['model'].iloc[0]}, trained).")


def _per_layer(cells: list[dict], method: str, metric: str) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in c["metrics"][method][metric]["per_layer"]] for c in cells])


def _loss(c: dict) -> str:
    return c.get("loss_reduction", SUM)  # cells from before the setting used the summed loss


def _step_plain(c: dict) -> bool:
    """The paper's step unit and sampling; cells with other settings stay out of the tables."""
    return c.get("step_unit", "demo") == "demo" and not c.get("balanced", False)


def _plain(c: dict) -> bool:
    """A cell's config at the summed-loss tables' protocol (the committed paper-scale cells):
    the paper's step unit and sampling and the summed loss; no table mixes two protocols."""
    return _step_plain(c) and _loss(c) == SUM


def _table2_cells(coll: Collected, protocol: str = "summed") -> list[dict]:
    rule, loss, _ = PROTOCOLS[protocol]
    return [c for c in coll.cells if c["config"]["baseline"] == "trained" and not c["config"].get("ablate")
            and _lr_rule(c["config"]) in CHOSEN_RATES[rule] and _step_plain(c["config"]) and _loss(c["config"]) == loss
            and {"gd", "lcgd"} <= set(c["metrics"])]


def fig_per_layer(coll: Collected, path: Path) -> str | None:
    cells = _table2_cells(coll)
    if not cells:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric in zip(axes, ("SimAOU", "SimAM_delta")):
        for method, color in (("gd", "#4C72B0"), ("lcgd", "#DD8452")):
            v = _per_layer(cells, method, metric)
            layers = np.arange(v.shape[1])
            ax.errorbar(layers, np.nanmean(v, 0), yerr=np.nanstd(v, 0), label=method.upper(), color=color, capsize=2, marker="o", ms=3)
        ax.axhline(0, color="black", lw=0.6)
        ax.set_title(f"{metric} per layer")
        ax.set_xlabel("layer")
        ax.set_ylabel(metric)
        ax.legend()
    fig.suptitle("Figure 3: per-layer similarity of ICL to GD and LCGD")
    n_tasks = len({c["config"]["task"] for c in cells})
    return _save(fig, path, "Each method at its own chosen learning rate, summed loss. " f"Mean over {len(cells)} cells ({n_tasks} tasks x seeds) of the per-layer mean over test "
                            "examples; error bars: std over tasks and seeds.")


def fig_grad_norms(coll: Collected, path: Path) -> str | None:
    cells = _table2_cells(coll)
    if not cells:
        return None
    from matplotlib.colors import LogNorm

    plt = _plt()
    k = min(len(c["grad_norms"]["gd"][0]) for c in cells)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, method, norm in ((axes[0], "gd", None), (axes[1], "lcgd", "log")):
        # geometric mean over cells: norms span orders of magnitude
        g = np.exp(np.mean([np.log(np.array(c["grad_norms"][method])[:, :k]) for c in cells], 0))
        im = ax.imshow(g, aspect="auto", origin="lower", cmap="viridis",
                       norm=LogNorm(vmin=g.min(), vmax=g.max()) if norm else None)
        fig.colorbar(im, ax=ax, label="gradient L2 norm" + (" (log scale)" if norm else ""))
        ax.set_title(f"{method.upper()}: per-layer K/V gradient norm")
        ax.set_xlabel("demonstration index (SGD step)")
        ax.set_ylabel("layer")
    ratio = np.mean([np.mean(np.array(c["grad_norms"]["lcgd"]) / np.array(c["grad_norms"]["gd"])) for c in cells])
    fig.suptitle("Figure 4: gradient norms, layer x demonstration")
    return _save(fig, path, "Each method at its own chosen learning rate, summed loss. " f"Geometric mean over {len(cells)} cells. LCGD/GD norm ratio, mean over layers, steps "
                            f"and cells: {ratio:.1f}x.")


def fig_lr(rows: pd.DataFrame, path: Path) -> str | None:
    sweep = _sweep_cells(rows)[lambda r: r["method"].isin(["gd", "lcgd"])]
    if sweep.empty or sweep["lr"].nunique() < 2:
        return None
    plt = _plt()
    panels = [("SimAOU", "SimAOU"), ("SimAM_delta", "SimAM_delta"), ("acc_ft", "accuracy after finetuning"),
              ("heldout_acc", "held-out demo accuracy")]
    fig, axes = plt.subplots(1, len(panels), figsize=(16, 3.8))
    tasks = _task_order(sweep["task"])
    colors = dict(zip(tasks, plt.cm.tab10.colors))
    for ax, (col, label) in zip(axes, panels):
        for (task, method), sub in sweep.groupby(["task", "method"]):
            curve = sub.groupby("lr")[col].mean()
            ax.plot(curve.index, curve.values, marker="o", ms=3, color=colors[task],
                    ls="-" if method == "gd" else "--", label=f"{task} {method.upper()}")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel(label)
        ax.set_title(label)
    axes[0].legend(fontsize=6, ncol=2)
    fig.suptitle("Learning-rate sweep: similarity and accuracy against the SGD learning rate")
    return _save(fig, path, "The learning-rate sweep (summed loss): GD and LCGD at the same rate at each point. Solid: GD, dashed: LCGD; mean over seeds. Held-out accuracy: the finetuned model on "
                            "training examples held out from the demonstrations (the lr-selection rule).")


def _ablation_rows(rows: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The ablated cells (with their layer) and the un-ablated cells of the same settings
    (same tasks, baselines, seeds, n_test and lr rule), the reference of the sweep."""
    ab = rows[(rows["ablate"] != "") & rows["method"].isin(["gd", "lcgd"])]
    ab = ab.assign(layer=ab["ablate"].str.extract(r"(\d+)", expand=False).astype(int))
    same = ["task", "baseline", "seed", "n_test", "lr_default"]
    base = rows[(rows["ablate"] == "") & rows["method"].isin(["gd", "lcgd"])]
    base = base.merge(ab[same].drop_duplicates(), on=same)
    return ab, base


def ablation_table(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per ablated component (and "none"), mean over tasks and seeds: accuracies
    and each similarity metric of every finetuning method."""
    ab, base = _ablation_rows(rows)
    if ab.empty:
        return pd.DataFrame()
    cols = ["acc_zs", "acc_icl", "acc_ft", "SimAOU", "SimAOU_norm", "SimAM", "SimAM_delta"]
    both = pd.concat([base.assign(ablate="none", layer=-1), ab])
    table = both.groupby(["layer", "ablate", "method"])[cols].mean().unstack("method")
    table.columns = [f"{c} {m.upper()}" if c not in ("acc_zs", "acc_icl") else c for c, m in table.columns]
    table = table.loc[:, ~table.columns.duplicated()].reset_index().drop(columns="layer")
    return table.rename(columns={"ablate": "ablated"}).round(3)


def fig_ablation(rows: pd.DataFrame, path: Path) -> str | None:
    ab, base = _ablation_rows(rows)
    if ab.empty:
        return None
    plt = _plt()
    panels = [("acc_icl", "ICL accuracy"), ("SimAOU", "SimAOU"), ("SimAM", "SimAM"), ("SimAM_delta", "SimAM_delta")]
    fig, axes = plt.subplots(1, len(panels), figsize=(16, 3.8))
    for ax, (col, label) in zip(axes, panels):
        for method, color in (("gd", "#4C72B0"), ("lcgd", "#DD8452")):
            sub = ab[ab["method"] == method]
            if sub.empty:
                continue
            curve = sub.groupby("layer")[col].mean()
            ax.plot(curve.index, curve.values, marker="o", ms=3, color=color, label=f"{method.upper()}" if col != "acc_icl" else None)
            ref = base[base["method"] == method][col].mean()
            if np.isfinite(ref):
                ax.axhline(ref, color=color, ls=":", lw=1)
        ax.set_xlabel("ablated layer")
        ax.set_ylabel(label)
        ax.set_title(label)
    axes[1].legend()
    kinds = ", ".join(sorted(set(ab["ablate"].str.replace(r"\d+", "L", regex=True))))
    fig.suptitle(f"Single-layer ablation sweep ({kinds})")
    return _save(fig, path, "At the chosen learning rates, summed loss. Each point: one layer ablated in every setting (ZS, ICL, GD, LCGD, training included); "
                            "dotted: the same cells without ablation. Mean over tasks and seeds.")


# --- findings ---------------------------------------------------------------------------------


def findings(coll: Collected, protocol: str = "summed") -> list[Finding]:
    """The paper's four findings (findings.CLAIMS) against one model's cells at one of
    PROTOCOLS (the cells of the other protocol play no part)."""
    rule, loss, scope = PROTOCOLS[protocol]
    rows, out = coll.rows, []
    if rows.empty:
        return [unavailable(n, "no finished cells yet.") for n in CLAIMS]
    rows = _one_row_per_run(rows)
    chosen = _paper_cells(rows, rule, loss)
    gd = chosen[lambda r: r["method"] == "gd"]
    # only the (task, seed) pairs run for every baseline, so no baseline is averaged over other tasks
    per_pair = gd.groupby(["task", "seed"])["baseline"].nunique()
    pairs = per_pair[per_pair == gd["baseline"].nunique()].index
    matched = gd.set_index(["task", "seed"]).loc[pairs] if len(pairs) else gd.iloc[:0]
    by_base = matched.groupby("baseline")["SimAOU"].mean()
    if "trained" in by_base and len(by_base) > 1:
        others = {b: v for b, v in by_base.items() if b != "trained"}
        agree = all(v >= by_base["trained"] - 0.05 for v in others.values())
        out.append(Finding(1, "agrees" if agree else "does not agree",
                           f"GD SimAOU on the {len(pairs)} task-seed pairs run for every baseline "
                           f"({', '.join(_task_order(t for t, _ in pairs))}): trained {by_base['trained']:.3f} vs "
                           + ", ".join(f"{BASELINE_NAMES.get(b, b)} {v:.3f}" for b, v in others.items()),
                           {f"SimAOU_{b}": float(v) for b, v in by_base.items()}, scope))
    else:
        out.append(unavailable(1, "needs GD cells of the trained and re-initialised baselines (table1): not available yet."))
    # the cells at the chosen rates when there are any, else the same loss's learning-rate sweep
    ft, source = chosen, scope
    if not ft["method"].isin(["gd", "lcgd"]).any():
        ft, source = _sweep_cells(rows, loss), f"every rate of the learning-rate sweep ({loss} loss)"
    ft = ft[ft["method"].isin(["gd", "lcgd"])].dropna(subset=["SimAOU", "SimAOU_norm"])
    if len(ft):
        diff = ft["SimAOU_norm"] - ft["SimAOU"]
        out.append(Finding(2, "agrees" if diff.mean() > 0 and (diff > 0).mean() > 0.5 else "does not agree",
                           f"mean SimAOU_norm {ft['SimAOU_norm'].mean():.3f} vs SimAOU {ft['SimAOU'].mean():.3f}; "
                           f"higher in {100 * (diff > 0).mean():.0f}% of {len(ft)} cell-methods",
                           {"SimAOU_norm": float(ft["SimAOU_norm"].mean()), "SimAOU": float(ft["SimAOU"].mean()),
                            "share_higher": float((diff > 0).mean())}, source))
    else:
        out.append(unavailable(2, "needs GD or LCGD cells: not available yet."))
    t2 = table2(rows, rule, loss)
    cells2 = chosen[lambda r: r["baseline"] == "trained"]
    if t2.empty:
        return out + [unavailable(n, "needs trained-model cells with both GD and LCGD (table2): not available yet.")
                      for n in (3, 4)]
    per_task = cells2.pivot_table(index="task", columns="method", values="SimAM_delta", aggfunc="mean").dropna()
    wins = int((per_task["lcgd"] > per_task["gd"]).sum()) if {"gd", "lcgd"} <= set(per_task.columns) else 0
    alpha = cells2[cells2["method"] == "gd"]["alpha"].dropna()
    layer_gap = _layer_gap(coll, protocol)
    majority, paper_alpha = wins > len(per_task) / 2, 0.05 <= alpha.mean() <= 0.3
    out.append(Finding(3, "agrees" if majority and paper_alpha else "partly agrees" if majority or paper_alpha else "does not agree",
                       f"LCGD's SimAM_delta is above GD's on {wins} of {len(per_task)} tasks (mean "
                       f"{per_task['lcgd'].mean():.3f} vs {per_task['gd'].mean():.3f}); alpha {alpha.mean():.3f} ± "
                       f"{alpha.std():.3f} over {len(alpha)} cells (paper: about 0.1-0.2); per-layer LCGD-GD gap "
                       f"{layer_gap[0]:+.3f} to {layer_gap[1]:+.3f}",
                       {"tasks_lcgd_above": wins, "tasks": len(per_task), "SimAM_delta_lcgd": float(per_task["lcgd"].mean()),
                        "SimAM_delta_gd": float(per_task["gd"].mean()), "alpha": float(alpha.mean())},
                       scope))
    cells = _table2_cells(coll, protocol)
    ratio = [np.mean(np.array(c["grad_norms"]["lcgd"]) / np.array(c["grad_norms"]["gd"])) for c in cells]
    above = np.mean([np.mean(np.array(c["grad_norms"]["lcgd"]) > np.array(c["grad_norms"]["gd"])) for c in cells])
    out.append(Finding(4, "agrees" if np.mean(ratio) > 2 else "does not agree",
                       f"LCGD's per-layer gradient norms are {np.mean(ratio):.1f}x GD's on average (larger in "
                       f"{100 * above:.0f}% of layer-steps, {len(cells)} cells)",
                       {"grad_norm_ratio": float(np.mean(ratio)), "share_larger": float(above)}, scope))
    return out


def _layer_gap(coll: Collected, protocol: str = "summed") -> tuple[float, float]:
    cells = _table2_cells(coll, protocol)
    gap = np.nanmean(_per_layer(cells, "lcgd", "SimAM_delta") - _per_layer(cells, "gd", "SimAM_delta"), 0)
    return float(np.nanmin(gap)), float(np.nanmax(gap))


# --- the manifest: how every committed result was made --------------------------------------------


def read_manifest(path: str | Path) -> dict[str, Any]:
    """artifacts/manifest.toml: [[grid]] config + command, [[other]] what + command,
    [report] command."""
    path = Path(path)
    raw = read_toml(path, "manifest", "pass a file like artifacts/manifest.toml")
    for key, need in (("grid", ("config", "command")), ("other", ("what", "command"))):
        for entry in raw.get(key, []):
            if not isinstance(entry, dict) or any(not isinstance(entry.get(k), str) for k in need):
                raise UserError(f"manifest {path}: every [[{key}]] needs {' and '.join(need)} (strings)")
    if not isinstance(raw.get("report", {}).get("command"), str):
        raise UserError(f"manifest {path}: needs [report] command = \"lens-iclgd report ...\"")
    return raw


def _made_at(cells: list[dict]) -> str:
    """The versions and commits a set of cells records (results.json `provenance`)."""
    made = sorted({(c["provenance"]["package_version"], (c["provenance"]["git_commit"] or "no checkout")[:10]
                    + ("+changes" if c["provenance"].get("git_dirty") else ""))
                   for c in cells if c.get("provenance")})
    old = sum(1 for c in cells if not c.get("provenance"))
    parts = [f"{v} at {commit}" for v, commit in made]
    if old:
        parts.append(f"{old} cells from before results recorded it")
    return "; ".join(parts) or "-"


def _made_record(cell: Path, by_name: dict[str, dict]) -> dict | None:
    """The record that holds a finished cell's `provenance`: its results.json; an order cell's
    first order's; a patching cell's patching_timings.json (patching.json stays byte-for-byte
    reproducible, so the code version is kept beside it)."""
    if cell.name in by_name:
        return by_name[cell.name]
    for f in (cell / "order0" / "results.json", cell / "patching_timings.json"):
        if f.exists():
            return json.loads(f.read_text())
    return None


def manifest_lines(manifest: dict[str, Any], results_dir: str | Path, coll: Collected) -> list[str]:
    """The report's opening: one command per line, then what each grid has finished."""
    commands = [g["command"] for g in manifest.get("grid", [])] + [o["command"] for o in manifest.get("other", [])]
    lines = ["## How to reproduce", "",
             "Every committed result and this report, one command per line, in order (artifacts/manifest.toml; "
             "a grid command runs only its missing cells):", "", "```", *commands, manifest["report"]["command"], "```", ""]
    ids = grid_cells(results_dir)
    by_name = {Path(c["_path"]).name: c for c in coll.cells}
    lines += ["| grid config | cells finished / defined here | made at (version, commit) | one cell from nothing, "
              "median s | the missing cells at that median, h |", "|---|---|---|---|---|"]
    for g in manifest.get("grid", []):
        path = Path(g["config"])
        try:
            name = tomllib.loads(path.read_text()).get("name", path.stem)
        except (OSError, tomllib.TOMLDecodeError):
            name = path.stem
        cells = Path(results_dir) / "cells"
        # order-study and causal-study cells are finished by their orders.json / patching.json
        done = [i for i in ids.get(name, {}) if i in by_name or (cells / i / "orders.json").exists()
                or (cells / i / "patching.json").exists()]
        made = [m for m in (_made_record(cells / i, by_name) for i in done) if m is not None]
        seconds = [s for s in (costs.cell_seconds(cells / i) for i in done) if s is not None]
        median = float(np.median(seconds)) if seconds else None
        n_missing = len(ids.get(name, {})) - len(done)
        rest = "-" if median is None else f"{median * n_missing / 3600:.1f}"
        lines.append(f"| {g['config']} | {len(done)} / {len(ids.get(name, {}))} | {_made_at(made)} | "
                     f"{'-' if median is None else f'{median:.0f}'} | {rest} |")
    lines += ["", "The cost columns are a planning estimate, not a benchmark: a cell's phases' wall times as recorded "
              "(a reused stage at the time it took when made; costs.cell_seconds), on whatever machine and load ran it "
              "(timings.json `machine`; mostly 1 thread per process, 2-3 processes on 2 cores). A sweep's cells share their "
              "ZS and ICL recordings, so the rest of a sweep costs less than the estimate.", ""]
    lines += [f"- {o['what']}" for o in manifest.get("other", [])] + [""]
    return lines


# --- the report ---------------------------------------------------------------------------------


def write_report(results_dir: str | Path, out_dir: str | Path | None = None, command: str | None = None,
                 model: str | None = None, manifest: dict[str, Any] | None = None) -> Path:
    """The report of one results directory; of one `model`'s cells if given (see
    crossmodel.py for several models)."""
    coll = collect(results_dir, model)
    out = Path(out_dir) if out_dir else Path(results_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    n_cells = len(coll.cells)
    lines = ["# lens-iclgd report", ""]
    if manifest:
        lines += manifest_lines(manifest, results_dir, coll)
    elif command:
        lines += ["Produced by:", "", "```", command, "```", ""]
    status = f"{n_cells} finished cells"
    if coll.expected:
        status += f" of {coll.expected} defined by the grids here; {coll.missing} missing, {len(coll.failed)} failed"
    if coll.stale:
        status += f"; {coll.stale} cells from older settings left out"
    lines += [f"Results: `{results_dir}`: {status}. Only finished cells are reported.", ""]
    for f in coll.failed:
        lines.append(f"- failed: {f['config']['task']} seed {f['config']['seed']} lr {f['config']['lr']}: {f['error']}")
    if not coll.rows.empty:
        models = sorted(coll.rows["model"].unique())
        ks = sorted(coll.rows["k"].unique())
        ns = sorted(coll.rows["n_test"].unique())
        lines += [f"Models: {', '.join(models)}; k (effective): {', '.join(map(str, ks))}; test examples per cell: "
                  f"{', '.join(map(str, ns))}.", ""]

    empty = coll.rows.empty
    sections = [("Table 2 at the paper's protocol and scale: GD vs LCGD on the trained model, token-mean loss, one rate "
                 "shared by both (GD's chosen rate), n-test min(2000, split)", "table2_paper_scale",
                 table2(coll.rows, "shared", MEAN, paper_scale=True) if not empty else pd.DataFrame()),
                ("Table 2 at the paper's protocol: GD vs LCGD on the trained model, token-mean loss, one rate shared by "
                 "both (GD's chosen rate), the sweeps' n-test 200", "table2_paper", table2(coll.rows, "shared", MEAN) if not empty else pd.DataFrame()),
                ("Table 2 (token-mean loss, each method at its own chosen rate)", "table2_mean_own",
                 table2(coll.rows, "default", MEAN) if not empty else pd.DataFrame()),
                ("Table 1 at the paper's protocol: vanilla GD against the model baselines, token-mean loss, GD's chosen "
                 "rate", "table1_paper", table1(coll.rows, "paper") if not empty else pd.DataFrame()),
                ("Table 1: vanilla GD against the model baselines (summed loss)", "table1",
                 table1(coll.rows) if not empty else pd.DataFrame()),
                ("Table 2 (summed loss): GD vs LCGD on the trained model, each method at its own chosen learning rate",
                 "table2", table2(coll.rows) if not empty else pd.DataFrame()),
                ("Table 2 (summed loss, shared rate): GD vs LCGD on the trained model, both at GD's chosen learning rate",
                 "table2_shared", table2(coll.rows, "shared") if not empty else pd.DataFrame())]
    for title, name, table in sections:
        if name in ("table1_paper", "table2_paper", "table2_paper_scale", "table2_mean_own", "table2_shared") and table.empty:
            continue  # only where such cells were run
        lines += [f"## {title}", ""]
        if table.empty:
            lines += ["No finished cells for this table.", ""]
            continue
        atomic_write_text(out / f"{name}.md", _markdown(table) + "\n")
        atomic_write_bytes(out / f"{name}.csv", table.to_csv(index=False).encode())
        regime = {"table1": "GD at its chosen learning rate", "table1_paper": "GD at its chosen learning rate",
                  "table2": "each method at its own chosen learning rate",
                  "table2_shared": "both methods at GD's chosen learning rate",
                  "table2_paper": "both methods at GD's chosen learning rate",
                  "table2_paper_scale": "both methods at GD's chosen learning rate",
                  "table2_mean_own": "each method at its own chosen learning rate"}[name]
        loss = ("the mean of the demonstration's token losses (the paper's code)" if name in (
            "table1_paper", "table2_paper", "table2_paper_scale", "table2_mean_own") else "loss summed over the demonstration's tokens (before issue 31)")
        lines += [_markdown(table), "", f"Cells: mean ± std over seeds (metrics: mean over layers). Learning rates: "
                  f"{regime} (learning_rates.toml, or --lr auto in the cell); {loss}; rows of output metrics and F2T "
                  "only where the cells recorded them.", ""]

    ablations = ablation_table(coll.rows) if not coll.rows.empty else pd.DataFrame()
    if not ablations.empty:
        atomic_write_bytes(out / "ablation.csv", ablations.to_csv(index=False).encode())
        lines += ["## Ablation sweep", "", _plain_markdown(ablations), "",
                  "Each row: that component ablated in every setting; mean over tasks and seeds. "
                  "`acc_ft`: accuracy after finetuning.", ""]

    lrs = choose_learning_rates(coll.rows) if not coll.rows.empty else pd.DataFrame()
    if not lrs.empty:
        header = "Chosen by: per method, the best mean accuracy of that method on held-out training examples (ties: largest lr)."
        atomic_write_text(out / "chosen_learning_rates.toml", format_table(lrs.to_dict("records"), header))
        lines += ["## Learning rates chosen from the sweep", "",
                  "Rule: per loss reduction, task and method, the learning rate with the best mean accuracy of that method "
                  "on training examples held out from the demonstrations (ties: the largest), over the seeds swept; "
                  "similarity metrics play no part. A rate at either end of its sweep is marked *edge*: the best may lie "
                  f"outside. A rate at which the method predicted one label on at least {COLLAPSED_SHARE:g} of the held-out "
                  "examples is marked *collapsed*: the held-out labels are not balanced, so such a model scores the majority "
                  "label's share and can win (cells from before the share was recorded are not marked).", "",
                  "| model | loss | task | method | lr | held-out acc | seeds | curve (lr: acc) |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r.model} | {r.loss} | {r.task} | {r.method.upper()} | {r.lr:g}{_rate_flags(r)} | "
                  f"{r.heldout_acc:.3f} | {r.seeds} | {r.curve} |" for r in lrs.itertuples()]
        lines.append("")

    figures = [("fig2_alpha.png", lambda p: fig_alpha(coll.rows, p)), ("fig3_per_layer.png", lambda p: fig_per_layer(coll, p)),
               ("fig4_grad_norms.png", lambda p: fig_grad_norms(coll, p)), ("fig_lr.png", lambda p: fig_lr(coll.rows, p)),
               ("fig_ablation.png", lambda p: fig_ablation(coll.rows, p))]
    lines += ["## Figures", ""]
    for fname, make in figures:
        caption = make(out / fname) if not coll.rows.empty else None
        if caption:
            lines += [f"![{fname}]({fname})", "", f"*{caption}*", ""]
    rate_lines = rates.section(coll.cells, out)
    if rate_lines:
        lines += ["## Finding 3 by learning rate and update size", "", rates.INTRO, ""] + rate_lines
    expected = set(_expected_cells(Path(results_dir)))  # cells of older settings stay out, as in collect()
    shen_lines = shen.section(results_dir, model, out, expected)
    if shen_lines:
        lines += ["## Shen et al.: order sensitivity and output-level comparisons", "",
                  "Rules: " + " ".join(line.strip() for line in shen.__doc__.split("\n\n")[1].splitlines()), ""] + shen_lines
    causal_lines = patch_report.section(results_dir, model, out, expected)
    if causal_lines:
        lines += ["## Where the effect is carried: activation patching", ""] + causal_lines
    lines += ["## Findings (docs/protocol.md) against these results", ""]
    by_protocol = {p: findings(coll, p) for p in PROTOCOLS}
    shown = [p for p, fs in by_protocol.items() if any(f.verdict != "not available" for f in fs)] or ["paper"]
    for p in shown:  # each protocol that has cells, apart; the paper's (the default) when none has
        lines += [f"At {PROTOCOLS[p][2]}:", ""] + [f.markdown() for f in by_protocol[p]] + [""]
    atomic_write_text(out / "report.md", "\n".join(lines))
    return out
