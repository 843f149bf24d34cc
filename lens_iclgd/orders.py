"""Order sensitivity (Shen et al.): the same demonstrations in several orders, each a full
run; the spread of accuracy, predictions and every metric across orders."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import torch

from . import metrics as M
from .config import DEFAULT_TOP_K, RunConfig
from .errors import check_int
from .inputs import prepare
from .models import LoadedModel, load_model
from .outputs import output_metrics
from .recording import Recording
from .runner import run, stage_keys
from .store import StageStore, atomic_write_bytes, atomic_write_json, check_writable


def ceilings(zs: Recording, by_order: list[dict[str, Recording]], seed: int,
             loaded: LoadedModel | None = None, top_k: int = DEFAULT_TOP_K) -> dict[str, dict[str, dict[str, float]]]:
    """The ceiling of every similarity metric: a method against itself in another order of
    the same demonstrations (ICL_p vs ICL_q, GD_p vs GD_q, ...), each update taken against
    ZS as usual (metrics.compare with X_p in ICL's place and X_q in the finetuned one's).
    With `loaded` (its unembed) and recordings that kept the prediction position's residual,
    also the output metrics between the two orders' next-token distributions (outputs.py:
    top-K overlap, overlap cosine, KL and JS with order p as the reference), under "out_<metric>".
    Per method and metric: mean, std, min and max over the order pairs p < q."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    methods = [m for m in by_order[0] if all(m in recs for recs in by_order)]
    pairs = [(a, b) for a in range(len(by_order)) for b in range(a + 1, len(by_order))]
    for m in methods:
        per_pair = [{name: M.summarize(v)["mean"] for name, v in M.compare(zs, by_order[a][m], by_order[b][m], seed).items()}
                    for a, b in pairs]
        resid = {str(p): recs[m].final_resid for p, recs in enumerate(by_order)}
        if loaded is not None and all(r is not None for r in resid.values()):
            # one call for every pair: each order's top K is found once, not once per pair
            no_gold = torch.zeros(resid["0"].shape[0], dtype=torch.long)  # top-1 accuracy is not asked here
            o = output_metrics(loaded.model.unembed.W_U, loaded.model.unembed.b_U, resid, no_gold,
                               [(str(a), str(b)) for a, b in pairs], top_k, loaded.model.cfg.output_logits_soft_cap)["pairs"]
            for (a, b), values in zip(pairs, per_pair):
                values.update({f"out_{name}": float(v.mean()) for name, v in o[f"{a}-{b}"].items()})
        out[m] = {name: _spread([p[name] for p in per_pair]) for name in per_pair[0]}
    return out


def _spread(values: list[float | None]) -> dict[str, float]:
    v = np.array([np.nan if x is None else x for x in values], dtype=float)
    return {"mean": float(np.nanmean(v)), "std": float(np.nanstd(v, ddof=1)) if len(v) > 1 else float("nan"),
            "min": float(np.nanmin(v)), "max": float(np.nanmax(v)), "n_pairs": len(v)}


def prediction_stability(preds: dict[str, pd.DataFrame]) -> dict[str, dict[str, float]]:
    """Per setting, from its predictions (rows: test examples, columns: orders): the share of
    examples predicted alike in every order, the mean pairwise disagreement between orders,
    the share of all (example, order) predictions that are the setting's most frequent label
    (a method that predicts one label everywhere has collapsed: it shows no order sensitivity,
    and that says nothing about order), and (finetuned settings and ICL) the share of
    examples whose prediction differs from ZS's, mean over orders: a method that changes no
    prediction shows no order sensitivity either (a rate too small to matter)."""
    out = {}
    orders = list(preds["zs"].columns)
    pairs = [(a, b) for i, a in enumerate(orders) for b in orders[i + 1:]]
    for s, frame in preds.items():
        out[s] = {"same_prediction_in_every_order": float((frame.nunique(axis=1) == 1).mean()),
                  "mean_pairwise_disagreement": float(np.mean([(frame[a] != frame[b]).mean() for a, b in pairs])),
                  "majority_label_share": float(frame.stack().value_counts(normalize=True).iloc[0])}
        if s != "zs":
            out[s]["changed_from_zs"] = float(np.mean([(frame[p] != preds["zs"][p]).mean() for p in orders]))
    return out


def order_predictions(out: str | Path, settings: list[str], n_orders: int) -> dict[str, pd.DataFrame]:
    """Each setting's test predictions in every order, from the order runs' examples.csv
    (rows: test examples, columns: orders)."""
    tables = [pd.read_csv(Path(out) / f"order{p}" / "examples.csv") for p in range(n_orders)]
    return {s: pd.DataFrame({p: t[f"{s}_pred"] for p, t in enumerate(tables)}) for s in settings}


def refresh_stability(cell: str | Path) -> dict[str, Any]:
    """Recompute a finished order cell's prediction_stability from its order runs'
    examples.csv and rewrite orders.json (no model run): how cells made before a field was
    added get it. Every other entry of orders.json is kept as it was."""
    cell = Path(cell)
    summary = json.loads((cell / "orders.json").read_text())
    cfg = summary["config"]
    summary["prediction_stability"] = prediction_stability(order_predictions(cell, ["zs", *cfg["methods"]], cfg["orders"]))
    atomic_write_json(cell / "orders.json", summary)
    return summary


def run_orders(config: RunConfig, out: str | Path, loaded: LoadedModel | None = None,
               stages_dir: str | Path | None = None) -> dict[str, Any]:
    """Order sensitivity (Shen et al.): the same demonstrations in `config.orders` orders
    (order 0 is the seed's). Sequential GD, like ICL, depends on the order; full-batch GD
    would not. Each order is a full run in out/order<p> (stages in `stages_dir`, default
    out/stages; the ZS recording is shared by every order); the spread across orders, the
    prediction stability and each metric's ceiling go to out/orders.json and out/orders.csv."""
    n_orders = config.orders
    check_int("--orders", n_orders, 2)
    config = config.validate()
    out = check_writable(Path(out))
    stages = Path(stages_dir) if stages_dir is not None else out / "stages"
    if loaded is None:
        loaded = load_model(config.model, config.baseline, config.seed, device=config.device)
    per_order = [run(dataclasses.replace(config, order=p, orders=1), out / f"order{p}", loaded, stages)
                 for p in range(n_orders)]
    settings = ["zs"] + list(config.methods)
    preds = order_predictions(out, settings, n_orders)
    table = []
    for p, r in enumerate(per_order):
        row: dict[str, Any] = {"order": p, "demo_rows": r["config"]["demo_rows"]}
        row.update({f"acc_{s}": r["accuracy"][s] for s in settings})
        for m, metrics in r["metrics"].items():
            row.update({f"{m}_{name}": v["mean"] for name, v in metrics.items() if "mean" in v})  # not the F2T entry
        if "alpha" in r:
            row["alpha"] = r["alpha"]["mean"]
        outputs = r.get("outputs") or {}  # Shen et al.'s output-level view, per order
        row.update({f"tok_{s}": v for s, v in (outputs.get("token_accuracy") or {}).items()})
        row.update({f"out_{pair}_{name}": v for pair, vals in (outputs.get("pairs") or {}).items() for name, v in vals.items()})
        table.append(row)
    df = pd.DataFrame(table)
    spread = {}
    for col in df.columns.drop(["order", "demo_rows"]):
        vals = df[col].astype(float)
        spread[col] = {"mean": vals.mean(), "std": vals.std(), "min": vals.min(), "max": vals.max()}
    stability = prediction_stability(preds)
    # the recordings of every order, from the stages the runs just saved
    store = StageStore(stages)
    by_order, zs = [], None
    for p in range(n_orders):
        inp = prepare(dataclasses.replace(config, order=p, orders=1), loaded)
        keys = stage_keys(inp)
        recs = {s: store.load(s, keys[s])["recording"] for s in ["zs", *config.methods]}
        zs_p = recs.pop("zs")
        zs = zs_p if zs is None else zs  # the same in every order: the test prompts alone
        by_order.append(recs)
    summary = {"config": {**dataclasses.asdict(config), "methods": list(config.methods), "orders": n_orders},
               "spread": spread, "prediction_stability": stability, "ceiling": ceilings(zs, by_order, config.seed, loaded, config.top_k)}
    atomic_write_json(out / "orders.json", summary)
    atomic_write_bytes(out / "orders.csv", df.to_csv(index=False).encode())
    return summary
