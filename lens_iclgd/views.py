"""Per-head and per-layer views of one finished run.

From a run's results.json (`lens-iclgd run` output, or one grid cell):
- per-head SimAM and SimAM_delta heatmaps (layer x head), one panel per method;
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
    return pd.DataFrame(rows)


def per_layer_frame(results: dict) -> pd.DataFrame:
    """Rows (method, metric, layer, value) for every per-layer metric."""
    rows = []
    for method, metrics in results["metrics"].items():
        for name, m in metrics.items():
            for layer, v in enumerate(m.get("per_layer") or []):
                rows.append({"method": method, "metric": name, "layer": layer, "value": v})
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

    fig, axes = plt.subplots(2, len(methods), figsize=(4.5 * len(methods), 7), squeeze=False)
    for col, method in enumerate(methods):
        for row, metric in enumerate(("SimAM", "SimAM_delta")):
            sub = heads[(heads["method"] == method) & (heads["metric"] == metric)]
            grid = sub.pivot(index="layer", columns="head", values="value").to_numpy(dtype=float)
            ax = axes[row, col]
            im = ax.imshow(grid, aspect="auto", origin="lower", cmap="RdBu_r", vmin=-1, vmax=1)
            fig.colorbar(im, ax=ax, label="cosine")
            ax.set_title(f"{metric}, ICL vs {method.upper()}")
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
