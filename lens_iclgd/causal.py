"""One cell's causal study: where the effect of ICL is carried, and whether GD and LCGD put
theirs in the same place (`lens-iclgd patch`, `run --patching`, grid key `patching = true`).

    inputs (the cell's task, prompts, model, rates) -> last-token runs of ZS, ICL, GD, LCGD
      -> layer patching: each source's resid_pre / attn_out / mlp_out at the prediction
         position patched into ZS, layer by layer: share of the source's logit-diff effect
         recovered, accuracy after patching
      -> head patching (Todd et al.): each head's mean ICL output (and mean GD output)
         patched into runs whose demonstrations have shuffled labels
      -> task vectors (Hendel et al.): the mean ICL last-token resid_pre injected into ZS
      -> patching.json, patching.parquet, two figures

Every last-token run is a stage (`patch-<setting>` in the stage store), keyed by the same
identity as the cell's own stages plus what is recorded, so a rerun or another cell with the
same inputs reuses it. The cell's similarity recordings (runner.py) keep other positions
and hooks, so they cannot serve here; GD and LCGD are trained again (deterministically: the
same rates, demonstrations and steps as the cell's own stages). The computations are
patching.py's; this module runs them for a cell and summarises them.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .config import RunConfig
from .errors import UserError
from .finetune import finetuned
from .hardware import describe_cpu
from .inputs import Inputs, prepare
from .models import LoadedModel
from .patching import (COMPONENTS, LastToken, head_indirect_effect, last_token_activations, patch_layers,
                       recovered_share, shuffled_label_demos, task_vector_accuracy)
from .precision import policy
from .runner import stage_keys
from .provenance import provenance
from .store import StageStore, atomic_write_bytes, atomic_write_json, check_writable, config_key, removed_if_empty_on_error
from .tasks import load_split

log = logging.getLogger("lens_iclgd")

HEAD_SOURCES = ("icl", "gd")  # whose mean head outputs are patched into the shuffled-label runs
TOP_HEADS = 10


def _source(inp: Inputs, setting: str, with_z: bool) -> LastToken:
    """One setting's run at the prediction position: ZS and ICL on the model as it is, GD
    and LCGD on the model finetuned as in the cell (restored afterwards)."""
    c, p, lm = inp.config, inp.prompts, inp.loaded
    if setting == "zs":
        return last_token_activations(lm.model, p.zs_prefix(), p.queries, p.options, inp.hooks, with_z)
    if setting == "icl":
        return last_token_activations(lm.model, p.icl_prefix(), p.queries, p.options, inp.hooks, with_z)
    with finetuned(lm.model, p.demos, p.bos, setting, inp.lr_by_method[setting], lm.kv_bias, inp.hooks,
                   precision=policy(c.precision).train, step_unit=c.step_unit, loss_reduction=c.loss_reduction):
        return last_token_activations(lm.model, p.zs_prefix(), p.queries, p.options, inp.hooks, with_z)


def _cached(store: StageStore | None, name: str, key: str, compute) -> Any:
    value = store.load(name, key) if store else None
    if value is None:
        t0 = time.perf_counter()
        value = {"value": compute(), "seconds": time.perf_counter() - t0}
        if store:
            store.save(name, key, value)
    return value


def _profile(patched: dict[str, torch.Tensor], zs: LastToken, src: LastToken) -> dict[str, Any]:
    """Per layer: the recovered share (a least-squares slope) and the accuracy after patching."""
    share = recovered_share(patched["logit_diff"], zs.logit_diff, src.logit_diff)
    return {"recovered_share": [None if np.isnan(v) else round(float(v), 6) for v in share.tolist()],
            "accuracy": [round(float(v), 6) for v in patched["correct"].float().mean(0).tolist()]}


def profile_overlap(a: list[float | None], b: list[float | None]) -> float | None:
    """Pearson correlation of two per-layer profiles over the layers where both are
    defined; None where fewer than three layers are, or either profile is flat."""
    x = np.array([np.nan if v is None else v for v in a], dtype=float)
    y = np.array([np.nan if v is None else v for v in b], dtype=float)
    ok = ~(np.isnan(x) | np.isnan(y))
    if ok.sum() < 3 or x[ok].std() == 0 or y[ok].std() == 0:
        return None
    return round(float(np.corrcoef(x[ok], y[ok])[0, 1]), 6)


def centre_of_mass(profile: list[float | None]) -> float | None:
    """Where a profile's positive mass lies on the normalised depth axis (0: first layer,
    1: last): sum(depth_l * max(share_l, 0)) / sum(max(share_l, 0)); None if no mass."""
    v = np.clip(np.array([np.nan if x is None else x for x in profile], dtype=float), 0, None)
    v = np.nan_to_num(v)
    if v.sum() <= 0 or len(v) < 2:
        return None
    depth = np.arange(len(v)) / (len(v) - 1)
    return round(float((depth * v).sum() / v.sum()), 6)


def patching_study(inp: Inputs, keys: dict[str, str],
                   store: StageStore | None) -> tuple[dict[str, Any], pd.DataFrame, dict[str, float]]:
    """The causal study of one cell; returns patching.json's content, the per-example
    table (patching.parquet) and the seconds of each phase. `keys`: the cell's stage keys
    (runner.stage_keys), the identity each last-token run extends."""
    c, p, lm = inp.config, inp.prompts, inp.loaded
    model = lm.model
    settings = ("zs", "icl") + c.ft_methods
    seconds: dict[str, float] = {}
    sources: dict[str, LastToken] = {}
    for s in settings:
        with_z = s in HEAD_SOURCES and c.patch_heads > 0
        log.info("patching: %s at the prediction position (%d test examples)", s, len(p.queries))
        got = _cached(store, f"patch-{s}", config_key({"of": keys[s], "last_token": 1, "z": with_z}),
                      lambda s=s, z=with_z: _source(inp, s, z))
        sources[s], seconds[f"record_{s}"] = got["value"], round(got["seconds"], 2)
    zs = sources["zs"]

    layers: dict[str, dict[str, Any]] = {}
    rows = []
    for s in settings[1:]:
        log.info("patching: %s into ZS, %d layers x %d components", s, model.cfg.n_layers, len(COMPONENTS))
        got = _cached(store, f"patch-layers-{s}", config_key({"of": keys[s], "zs": keys["zs"], "layers": list(COMPONENTS)}),
                      lambda s=s: patch_layers(model, p.queries, p.options, sources[s], hooks=inp.hooks, prefix=p.zs_prefix()))
        seconds[f"layers_{s}"] = round(got["seconds"], 2)
        src = sources[s]
        layers[s] = {"accuracy": round(float(src.correct.float().mean()), 6),
                     "effect": round(float((src.logit_diff - zs.logit_diff).mean()), 6),
                     "mean_abs_effect": round(float((src.logit_diff - zs.logit_diff).abs().mean()), 6),
                     "majority_label_share": round(src.majority_label_share, 6),
                     **{comp: _profile(got["value"][comp], zs, src) for comp in COMPONENTS}}
        for comp in COMPONENTS:
            ld, ok = got["value"][comp]["logit_diff"], got["value"][comp]["correct"]
            for l in range(model.cfg.n_layers):
                rows.append(pd.DataFrame({"source": s, "component": comp, "layer": l, "example": range(len(p.queries)),
                                          "logit_diff": ld[:, l].numpy(), "correct": ok[:, l].numpy(),
                                          "zs_logit_diff": zs.logit_diff.numpy(), "source_logit_diff": src.logit_diff.numpy()}))
    table = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()

    overlap = {comp: {f"icl-{m}": profile_overlap(layers["icl"][comp]["recovered_share"], layers[m][comp]["recovered_share"])
                      for m in c.ft_methods} for comp in COMPONENTS} if "icl" in layers else {}
    depth = {s: {comp: centre_of_mass(layers[s][comp]["recovered_share"]) for comp in COMPONENTS} for s in layers}

    heads: dict[str, Any] = {}
    n_heads_examples = min(c.patch_heads, len(p.queries))
    if n_heads_examples:
        task = inp.task
        shuffled = shuffled_label_demos(p, task, load_split(task, task.train_split, c.data_dir), model, c.seed)
        corrupted = list(p.bos) + [t for d in shuffled for t in d + p.separator]
        queries = p.queries[:n_heads_examples]
        for s in (h for h in HEAD_SOURCES if h in sources):
            mean_z = sources[s].z.mean(0)  # over every test example
            log.info("patching: mean %s head outputs into shuffled-label ICL runs (%d examples, %d heads)",
                     s, n_heads_examples, model.cfg.n_layers * model.cfg.n_heads)
            got = _cached(store, f"patch-heads-{s}", config_key({"of": keys[s], "icl": keys["icl"], "n": n_heads_examples,
                                                                  "corrupted": config_key(corrupted)}),
                          lambda mz=mean_z: head_indirect_effect(model, corrupted, queries, p.options, mz, inp.hooks))
            seconds[f"heads_{s}"] = round(got["seconds"], 2)
            effect = got["value"]
            order = torch.argsort(effect.flatten(), descending=True)[:TOP_HEADS].tolist()
            heads[s] = {"indirect_effect": [[round(float(v), 6) for v in row] for row in effect.tolist()],
                        "top": [{"layer": i // model.cfg.n_heads, "head": i % model.cfg.n_heads,
                                 "indirect_effect": round(float(effect.flatten()[i]), 6)} for i in order]}
        if "icl" in heads and "gd" in heads:
            heads["overlap_icl_gd"] = profile_overlap(sum(heads["icl"]["indirect_effect"], []), sum(heads["gd"]["indirect_effect"], []))

    tv: dict[str, Any] = {}
    for s in ("icl",) + c.ft_methods:
        if s not in sources:
            continue
        got = _cached(store, f"patch-taskvector-{s}", config_key({"of": keys[s], "zs": keys["zs"], "task_vector": 1}),
                      lambda s=s: task_vector_accuracy(model, p.queries, p.options, sources[s].resid_pre.mean(0), inp.hooks,
                                                       prefix=p.zs_prefix()))
        seconds[f"task_vector_{s}"] = round(got["seconds"], 2)
        acc = [round(float(v), 6) for v in got["value"].tolist()]
        best = int(np.argmax(acc))
        tv[s] = {"accuracy": acc, "best_layer": best, "best_accuracy": acc[best]}

    result = {
        "definitions": {
            "prediction_position": "the last prompt token; each answer option scored by its first token's logit",
            "logit_diff": "gold option's logit minus the best other option's",
            "recovered_share": "per layer, sum((patched - ZS)(source - ZS)) / sum((source - ZS)^2) of the logit diff "
                               "over the test examples: the least-squares slope of the patch's effect on the source's",
            "head_indirect_effect": "gain in the gold option's probability (softmax over the options) on ICL prompts "
                                    "with shuffled demonstration labels when one head's hook_z at the prediction "
                                    "position is replaced by its mean over the source's runs of the test examples",
            "gd_heads": "GD's mean head output is the finetuned model's hook_z on the ZS prompt: does the head output "
                        "GD's training produces carry the task when placed into a label-shuffled ICL run?",
            "task_vector": "accuracy of ZS with blocks.{l}.hook_resid_pre at the prediction position replaced by the "
                           "source's mean over the test examples",
            "overlap": "Pearson correlation of two per-layer recovered-share profiles",
            "majority_label_share": "share of the test examples on which the run predicts its most frequent option "
                                    "(a collapsed run: at least findings.COLLAPSED_SHARE)",
            "depth": "centre of mass of a profile's positive recovered share on the normalised depth axis (0 first "
                     "layer, 1 last)",
        },
        "n_layers": model.cfg.n_layers, "n_heads": model.cfg.n_heads, "n_test": len(p.queries),
        "n_head_examples": n_heads_examples,
        "zs_accuracy": round(float(zs.correct.float().mean()), 6),
        "zs_majority_label_share": round(zs.majority_label_share, 6),
        "layers": layers, "overlap": overlap, "depth": depth, "heads": heads, "task_vectors": tv,
    }
    return result, table, seconds


def run_patching(config: RunConfig, out: str | Path, loaded: LoadedModel | None = None,
                 stages_dir: str | Path | None = None) -> dict[str, Any]:
    """The causal study of one cell (`config` as for runner.run, at the same learning
    rates), written to `out`: patching.json (byte-for-byte reproducible), patching.parquet
    (per example, source, component and layer), patching_layers.png, patching_heads.png,
    patching_timings.json. Finished stages go to `stages_dir` (default out/stages)."""
    config = config.validate()
    if not config.ft_methods or "icl" not in config.methods:
        raise UserError("patching compares ICL with finetuning: keep icl and at least one of gd, lcgd in --methods")
    out = Path(out)
    t0 = time.perf_counter()
    with removed_if_empty_on_error(out):
        check_writable(out)
        inp = prepare(config, loaded)
        store = StageStore(Path(stages_dir) if stages_dir is not None else out / "stages")
        result, table, seconds = patching_study(inp, stage_keys(inp), store)
        result = {"config": {"task": config.task, "model": config.model, "baseline": config.baseline, "seed": config.seed,
                             "k": config.k, "k_effective": inp.prompts.k, "n_test": config.n_test,
                             "loss_reduction": config.loss_reduction, "lr_rule": inp.lr_rule,
                             "lr_by_method": inp.lr_by_method, "lr_source_by_method": inp.lr_sources,
                             "position": "prediction (last prompt token)", "ablation": inp.ablation,
                             "patch_heads": config.patch_heads, "precision": config.precision,
                             "model_checksum_sha256": inp.loaded.checksum},
                  **result}
        atomic_write_bytes(out / "patching.parquet", table.to_parquet(index=False))
        fig_layers(result, out / "patching_layers.png")
        if result["heads"]:
            fig_heads(result, out / "patching_heads.png")
        # each phase's seconds as measured when computed (kept with its stage); `total`: this run's own.
        # The code version goes here, not into patching.json, which stays byte-for-byte reproducible.
        atomic_write_json(out / "patching_timings.json", {**seconds, "total": round(time.perf_counter() - t0, 2),
                                                           "machine": describe_cpu(), "provenance": provenance()})
        atomic_write_json(out / "patching.json", result)  # last: its presence marks the cell finished
    return result


class _StagesOnly(StageStore):
    """A stage store that only reads: a missing stage is an error, never a recompute."""

    def load(self, stage: str, key: str) -> Any:
        value = super().load(stage, key)
        if value is None:
            raise UserError(f"stage {self.path(stage, key)} is missing: rerun the cell instead (delete its patching.json)")
        return value


def _without_shares(result: dict[str, Any]) -> dict[str, Any]:
    """patching.json's content as the code before majority_label_share wrote it."""
    out = json.loads(json.dumps(result))
    out.pop("zs_majority_label_share", None)
    out["definitions"].pop("majority_label_share", None)
    for v in out["layers"].values():
        v.pop("majority_label_share", None)
    return out


def refresh_majority_shares(config: RunConfig, out: str | Path, stages_dir: str | Path,
                            loaded: LoadedModel | None = None) -> dict[str, Any]:
    """Give a patching cell finished before majority_label_share was recorded its shares,
    from the cell's stages (no training, no patching: every stage must exist), and check
    that every other entry of patching.json comes back as it was before rewriting it; the
    parquet, figures and timings stay. The file is then what a fresh run writes."""
    out = Path(out)
    old = json.loads((out / "patching.json").read_text())
    inp = prepare(config.validate(), loaded)
    result, _, _ = patching_study(inp, stage_keys(inp), _StagesOnly(Path(stages_dir)))
    new = {"config": old["config"], **result}
    if _without_shares(new) != _without_shares(old):
        raise UserError(f"{out}: the stages do not reproduce its patching.json: rerun the cell instead")
    atomic_write_json(out / "patching.json", new)
    return new


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fig_layers(result: dict[str, Any], path: Path) -> None:
    """The three layer profiles side by side (one panel per component): does GD's change
    live where ICL's does?"""
    plt = _plt()
    fig, axes = plt.subplots(1, len(COMPONENTS), figsize=(4 * len(COMPONENTS), 3.2), sharey=True)
    for ax, comp in zip(axes, COMPONENTS):
        for s, v in result["layers"].items():
            share = [np.nan if x is None else x for x in v[comp]["recovered_share"]]
            ax.plot(range(len(share)), share, marker=".", label=s.upper())
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_title(f"hook_{comp}")
        ax.set_xlabel("layer")
    axes[0].set_ylabel("share of the source's effect recovered")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90, metadata={"Software": None})
    plt.close(fig)


def fig_heads(result: dict[str, Any], path: Path) -> None:
    plt = _plt()
    sources = [s for s in HEAD_SOURCES if s in result["heads"]]
    fig, axes = plt.subplots(1, len(sources), figsize=(4 * len(sources), 3.6), squeeze=False)
    for ax, s in zip(axes[0], sources):
        m = np.array(result["heads"][s]["indirect_effect"])
        lim = max(abs(m).max(), 1e-9)
        im = ax.imshow(m, aspect="auto", cmap="RdBu", vmin=-lim, vmax=lim)
        ax.set_title(f"{s.upper()} mean head output")
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=90, metadata={"Software": None})
    plt.close(fig)
