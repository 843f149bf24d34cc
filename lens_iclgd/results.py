"""A cell's results from its recordings: results.json, examples.csv, per_layer.parquet.

    recordings of ZS, ICL, GD, LCGD -> metrics.compare (activation similarities, per
    example and layer) and outputs.output_metrics (next-token distributions) -> summaries
    (results.json), per-example rows (examples.csv), per-layer rows (per_layer.parquet).

docs/results-format.md lists every key.
"""

from __future__ import annotations

import dataclasses
import math
import platform
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from . import metrics as M
from .metrics import compare
from .config import SETTINGS
from .finetune import METHODS as FT_METHODS
from .inputs import Inputs
from .outputs import output_metrics
from .precision import policy, within_fidelity
from .provenance import provenance
from .store import atomic_write_bytes, atomic_write_json


def _setting_names(stages: dict[str, Any]) -> list[str]:
    return ["zs"] + [m for m in SETTINGS if m in stages]


def output_pairs(settings: list[str]) -> list[tuple[str, str]]:
    """The compared pairs of next-token distributions: ZS-ICL (the baseline), ICL against
    each finetuned method, each method against ZS (its KL is an update size), GD-LCGD."""
    ft = [m for m in FT_METHODS if m in settings]
    pairs = [("zs", "icl")] if "icl" in settings else []
    pairs += [("icl", m) for m in ft if "icl" in settings] + [("zs", m) for m in ft]
    return pairs + ([("gd", "lcgd")] if {"gd", "lcgd"} <= set(settings) else [])


def compare_outputs(inp: Inputs, stages: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """outputs.output_metrics for every recorded setting, per example; None for stages
    recorded before the prediction position's residual was kept."""
    names = _setting_names(stages)
    recs = {s: stages[s]["recording"] for s in names}
    if any(r.final_resid is None for r in recs.values()):
        return None
    model = inp.loaded.model
    gold = torch.tensor([inp.prompts.options[q.label][0] for q in inp.prompts.queries])
    return output_metrics(model.unembed.W_U, model.unembed.b_U, {s: r.final_resid for s, r in recs.items()}, gold,
                          output_pairs(names), inp.config.top_k, model.cfg.output_logits_soft_cap)


def _nan_none(x: float) -> float | None:
    return None if math.isnan(x) else x


def assemble_results(inp: Inputs, stages: dict[str, dict[str, Any]], outputs: dict[str, Any] | None = None) -> dict[str, Any]:
    c, p, lm = inp.config, inp.prompts, inp.loaded
    zs = stages["zs"]["recording"]
    config = {
        **dataclasses.asdict(c), "methods": list(c.methods),
        "k_requested": p.k_requested, "k_effective": p.k, "n_test_effective": len(p.queries),
        "lr_source": inp.lr_source if c.ft_methods else None, "recorded_position": c.position,
        "lr_rule": inp.lr_rule, "lr_by_method": inp.lr_by_method or None, "lr_source_by_method": inp.lr_sources or None,
        **({"lr_auto": inp.lr_auto} if inp.lr_auto else {}),
        "n_steps": {m: stages[m]["log"].grad_norms.shape[1] for m in c.ft_methods if m in stages},
        "recorded_position_meaning": "first token of the first answer option after the test prompt (original code)"
        if c.position == "answer" else "last token of the test prompt",
        "task_spec": inp.task.spec(), "separator": "\\n", "model_source": lm.source,
        "model_checksum_sha256": lm.checksum, "kv_bias_trained": lm.kv_bias, "ablation": inp.ablation,
        "demo_rows": p.demo_rows, "demo_labels": p.demo_labels,
        "demo_label_counts": {a: p.demo_labels.count(i) for i, a in enumerate(inp.task.answers)},
        "eval_rows": [q.index for q in p.queries], "context_window": p.n_ctx,
        # per phase; beyond the default precision (the fastest within fidelity of float32) is opt-in
        "precision_policy": policy(c.precision).as_dict(), "precision_within_fidelity": within_fidelity(c.precision),
    }
    results: dict[str, Any] = {
        "config": config,
        "accuracy": {s: stages[s]["recording"].accuracy() for s in _setting_names(stages)},
        "metrics": {},
        "grad_norms": {},
        "losses": {},
        "environment": environment(),
        "provenance": provenance(),
    }
    if "icl" in stages:
        icl = stages["icl"]["recording"]
        results["zs_simam"] = M.summarize(M.zs_simam(icl.attn_scores, zs.attn_scores))
        # |h - h_ZS| / |h_ZS| at hook_attn_out per layer: how far each setting moved (finetuned methods below)
        results["update_size"] = {"icl": M.summarize(M.update_size(zs.attn_out, icl.attn_out))}
        for m in c.ft_methods:
            ft = stages[m]["recording"]
            per = compare(zs, icl, ft, c.seed)
            entry = {name: M.summarize(v) for name, v in per.items()}
            value, n = M.rec2ftp(zs.correct, ft.correct, icl.correct)
            # A prediction-level metric: one value for the model, none per layer.
            entry["Rec2FTP"] = {"mean": None if math.isnan(value) else value, "per_layer": None, "n_examples": n}
            # Dai et al.'s F2T subset: ZS wrong, ICL and this method right
            f2t = M.f2t_mask(zs.correct, icl.correct, ft.correct)
            entry["f2t"] = {"n_examples": int(f2t.sum()),
                            **{name: M.summarize(v[f2t])["mean"] if f2t.any() else None for name, v in per.items()}}
            if outputs is not None:
                entry["f2t"] |= {f"output_{name}": _nan_none(v[f2t].mean().item()) if f2t.any() else None
                                 for name, v in outputs["pairs"][f"icl-{m}"].items()}
            results["metrics"][m] = entry
            results["update_size"][m] = M.summarize(M.update_size(zs.attn_out, ft.attn_out))
            results["grad_norms"][m] = stages[m]["log"].grad_norms.tolist()
            results["losses"][m] = stages[m]["log"].losses.tolist()
            if "heldout" in stages[m]:
                results.setdefault("heldout_accuracy", {})[m] = stages[m]["heldout"].accuracy()
                # a collapsed model can win the rate rule where the held-out labels are unbalanced
                results.setdefault("heldout_majority_share", {})[m] = stages[m]["heldout"].majority_share()
    if outputs is not None:
        results["outputs"] = {
            "top_k": c.top_k, "position": "last prompt token",
            "token_accuracy": {s: v.float().mean().item() for s, v in outputs["token_correct"].items()},
            "pairs": {pair: {name: _nan_none(v.mean().item()) for name, v in vals.items()} for pair, vals in outputs["pairs"].items()},
        }
        for s in results.get("update_size", {}):  # KL(p_ZS || p_setting): the update's size at the output
            results["update_size"][s]["kl_from_zs"] = results["outputs"]["pairs"][f"zs-{s}"]["kl"]
    if "gd" in stages and "lcgd" in stages:
        results["alpha"] = M.summarize(M.alpha(stages["lcgd"]["recording"].attn_scores, stages["gd"]["recording"].attn_scores, zs.attn_scores))
    return results


def environment() -> dict[str, str]:
    import transformer_lens
    import transformers

    return {
        "python": platform.python_version(), "torch": torch.__version__,
        "transformer_lens": transformer_lens.__version__ if hasattr(transformer_lens, "__version__") else _dist_version("transformer_lens"),
        "transformers": transformers.__version__, "pandas": pd.__version__,
        "threads": str(torch.get_num_threads()), "machine": platform.machine(),
    }


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def examples_table(inp: Inputs, stages: dict[str, dict[str, Any]], outputs: dict[str, Any] | None = None) -> pd.DataFrame:
    """One row per test example: label, each setting's prediction, per-example metrics
    (mean over layers), output metrics, F2T membership."""
    p, answers = inp.prompts, inp.task.answers
    zs = stages["zs"]["recording"]
    df = pd.DataFrame({
        "eval_row": [q.index for q in p.queries],
        "prompt": [inp.task.prompt(inp.eval_rows[q.index]) for q in p.queries],
        "label": [answers[q.label] for q in p.queries],
    })
    for s in _setting_names(stages):
        r = stages[s]["recording"]
        df[f"{s}_pred"] = [answers[i] for i in r.predictions.tolist()]
        df[f"{s}_correct"] = r.correct.numpy()
    if "icl" in stages:
        for m in inp.config.ft_methods:
            per = compare(zs, stages["icl"]["recording"], stages[m]["recording"], inp.config.seed)
            for name, v in per.items():
                df[f"{m}_{name}"] = (v if v.dim() == 2 else v.nanmean(-1)).nanmean(-1).numpy()
            df[f"{m}_f2t"] = M.f2t_mask(zs.correct, stages["icl"]["recording"].correct, stages[m]["recording"].correct).numpy()
    if outputs is not None:
        for s, v in outputs["token_correct"].items():
            df[f"{s}_token_correct"] = v.numpy()
        for pair, vals in outputs["pairs"].items():
            for name, v in vals.items():
                df[f"{pair}_{name}"] = v.numpy()
    return df


def per_layer_table(inp: Inputs, stages: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """Long format: one row per (method, example, layer) with every metric."""
    if "icl" not in stages:
        return pd.DataFrame()
    zs, icl = stages["zs"]["recording"], stages["icl"]["recording"]
    frames = []
    rows = torch.tensor([q.index for q in inp.prompts.queries])
    for m in inp.config.ft_methods:
        per = compare(zs, icl, stages[m]["recording"], inp.config.seed)
        n, L = per["SimAOU"].shape
        frame = {"method": m, "eval_row": rows.repeat_interleave(L).numpy(), "layer": torch.arange(L).repeat(n).numpy()}
        for name, v in per.items():
            frame[name] = (v if v.dim() == 2 else v.nanmean(-1)).reshape(-1).numpy()
        frames.append(pd.DataFrame(frame))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def write_results(out: Path, results: dict, examples: pd.DataFrame, per_layer: pd.DataFrame) -> None:
    """Tables first, results.json last: its presence marks a finished run."""
    import io

    atomic_write_bytes(out / "examples.csv", examples.to_csv(index=False).encode())
    if len(per_layer):
        buf = io.BytesIO()
        per_layer.to_parquet(buf, index=False)
        atomic_write_bytes(out / "per_layer.parquet", buf.getvalue())
    atomic_write_json(out / "results.json", results)
