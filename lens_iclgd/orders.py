"""Order sensitivity (Shen et al.): the same demonstrations in several orders, each a full
run; the spread of accuracy, predictions and every metric across orders."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .config import RunConfig
from .errors import check_int
from .models import LoadedModel, load_model
from .runner import run
from .store import atomic_write_bytes, atomic_write_json, check_writable


def run_orders(config: RunConfig, n_orders: int, out: str | Path, loaded: LoadedModel | None = None) -> dict[str, Any]:
    """Order sensitivity (Shen et al.): the same demonstrations in `n_orders` orders
    (order 0 is the seed's). Sequential GD, like ICL, depends on the order; full-batch GD
    would not. Each order is a full run in out/order<p>; the spread across orders goes to
    out/orders.json and out/orders.csv."""
    check_int("--orders", n_orders, 2)
    config = config.validate()
    out = check_writable(Path(out))
    if loaded is None:
        loaded = load_model(config.model, config.baseline, config.seed, device=config.device)
    per_order = [run(dataclasses.replace(config, order=p), out / f"order{p}", loaded, out / "stages") for p in range(n_orders)]
    settings = ["zs"] + list(config.methods)
    preds = {s: pd.DataFrame({p: pd.read_csv(out / f"order{p}" / "examples.csv")[f"{s}_pred"] for p in range(n_orders)}) for s in settings}
    table = []
    for p, r in enumerate(per_order):
        row: dict[str, Any] = {"order": p, "demo_rows": r["config"]["demo_rows"]}
        row.update({f"acc_{s}": r["accuracy"][s] for s in settings})
        for m, metrics in r["metrics"].items():
            row.update({f"{m}_{name}": v["mean"] for name, v in metrics.items()})
        if "alpha" in r:
            row["alpha"] = r["alpha"]["mean"]
        table.append(row)
    df = pd.DataFrame(table)
    spread = {}
    for col in df.columns.drop(["order", "demo_rows"]):
        vals = df[col].astype(float)
        spread[col] = {"mean": vals.mean(), "std": vals.std(), "min": vals.min(), "max": vals.max()}
    stability = {}
    for s, frame in preds.items():
        same = (frame.nunique(axis=1) == 1).mean()
        pairs = [(a, b) for a in range(n_orders) for b in range(a + 1, n_orders)]
        flips = np.mean([(frame[a] != frame[b]).mean() for a, b in pairs])
        stability[s] = {"same_prediction_in_every_order": float(same), "mean_pairwise_disagreement": float(flips)}
    summary = {"config": {**dataclasses.asdict(config), "methods": list(config.methods), "orders": n_orders},
               "spread": spread, "prediction_stability": stability}
    atomic_write_json(out / "orders.json", summary)
    atomic_write_bytes(out / "orders.csv", df.to_csv(index=False).encode())
    return summary
