"""Per-head and per-layer views of one finished run.

From a run's results.json (`lens-iclgd run` output, or one grid cell):
- per-head SimAM and SimAM_delta heatmaps (layer x head), one panel per method, and
  ZS SimAM (ICL vs ZS, Dai et al.'s baseline for SimAM) beside them;
- per-layer SimAOU bars (with SimAOU_random for reference), GD and LCGD side by side;
as PNG files, and as tidy pandas DataFrames for notebooks.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import UserError


def load_results(run_dir: str | Path) -> dict:
    path = Path(run_dir)
    path = path if path.name == "results.json" else path / "results.json"
    if not path.is_file():
        raise UserError(f"{path} does not exist: pass a finished run's output directory")
    return json.loads(path.read_text())


def per_head_frame(results: dict) -> pd.DataFrame:
    """Rows (method, metric, layer, head, value) for the per-head metrics."""
    rows = []
    for method, metrics in results["metrics"].items():
        for name in ("SimAM", "SimAM_delta"):
            for layer, heads in enumerate(metrics[name].get("per_head") or []):
                rows += [{"method": method, "metric": name, "layer": layer, "head": h, "value": v} for h, v in enumerate(heads)]
    if "alpha" in results:
        for layer, heads in enumerate(results["alpha"].get("per_head") or []):
            rows += [{"method": "gd-vs-lcgd", "metric": "alpha", "layer": layer, "head": h, "value": v} for h, v in enumerate(heads)]
    if "zs_simam" in results:
        for layer, heads in enumerate(results["zs_simam"].get("per_head") or []):
            rows += [{"method": "icl-vs-zs", "metric": "ZS SimAM", "layer": layer, "head": h, "value": v} for h, v in enumerate(heads)]
    return pd.DataFrame(rows)


def per_layer_frame(results: dict) -> pd.DataFrame:
    """Rows (method, metric, layer, value) for every per-layer metric."""
    rows = []
    for method, metrics in results["metrics"].items():
        for name, m in metrics.items():
            for layer, v in enumerate(m.get("per_layer") or []):
                rows.append({"method": method, "metric": name, "layer": layer, "value": v})
    for layer, v in enumerate((results.get("zs_simam") or {}).get("per_layer") or []):
        rows.append({"method": "icl-vs-zs", "metric": "ZS SimAM", "layer": layer, "value": v})
    return pd.DataFrame(rows)


def write_views(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    from .report import _plt, _save

    plt = _plt()

    results = load_results(run_dir)
    if not results["metrics"]:
        raise UserError(f"{run_dir} has no finetuning metrics (run it with --methods including gd or lcgd)")
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir else (run_dir.parent if run_dir.name == "results.json" else run_dir) / "views"
    c = results["config"]
    label = f"{c['model']} ({c['baseline']}), {Path(c['task']).stem}, k={c['k_effective']}, seed {c['seed']}"
    heads = per_head_frame(results)
    methods = list(results["metrics"])
    written = []

    # one column per method (SimAM over SimAM_delta), then ZS SimAM where recorded
    panels = [(row, col, method, metric) for col, method in enumerate(methods)
              for row, metric in enumerate(("SimAM", "SimAM_delta"))]
    if "zs_simam" in results:
        panels.append((0, len(methods), "icl-vs-zs", "ZS SimAM"))
    n_cols = len(methods) + ("zs_simam" in results)
    fig, axes = plt.subplots(2, n_cols, figsize=(4.5 * n_cols, 7), squeeze=False)
    for ax in axes[1, len(methods):]:
        ax.axis("off")
    for row, col, method, metric in panels:
        sub = heads[(heads["method"] == method) & (heads["metric"] == metric)]
        grid = sub.pivot(index="layer", columns="head", values="value").to_numpy(dtype=float)
        ax = axes[row, col]
        im = ax.imshow(grid, aspect="auto", origin="lower", cmap="RdBu_r", vmin=-1, vmax=1)
        fig.colorbar(im, ax=ax, label="cosine")
        ax.set_title(f"{metric}, ICL vs {method.upper()}" if metric != "ZS SimAM" else "ZS SimAM, ICL vs ZS")
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
    fig.suptitle(f"Per-head attention-score similarity: {label}")
    _save(fig, out / "per_head_simam.png", "Cosine of each head's pre-softmax score row at the recorded position, "
                                           "mean over test examples.")
    written.append(out / "per_head_simam.png")

    layers = per_layer_frame(results)
    fig, ax = plt.subplots(figsize=(10, 3.8))
    n_layers = len(results["metrics"][methods[0]]["SimAOU"]["per_layer"])
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        v = layers[(layers["method"] == method) & (layers["metric"] == "SimAOU")]["value"].to_numpy(dtype=float)
        ax.bar(np.arange(n_layers) + i * width, v, width, label=f"SimAOU {method.upper()}")
        r = layers[(layers["method"] == method) & (layers["metric"] == "SimAOU_random")]["value"].to_numpy(dtype=float)
        ax.plot(np.arange(n_layers) + i * width, r, "k.", ms=4, label="SimAOU_random" if i == 0 else None)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xlabel("layer")
    ax.set_ylabel("cos(h_ICL - h_ZS, h_FT - h_ZS)")
    ax.set_title(f"Per-layer SimAOU: {label}")
    ax.legend(fontsize=7)
    _save(fig, out / "per_layer_simaou.png", "Mean over test examples of the attention-output update similarity; "
                                             "dots: the same against a random update.")
    written.append(out / "per_layer_simaou.png")
    return written
