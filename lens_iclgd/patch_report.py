"""The report sections of the causal study (patching cells: grids with `patching = true`,
causal.py): where ICL's effect on the prediction is carried, and whether GD's and LCGD's
are carried at the same layers. No torch (report side).

Per model, from every finished patching cell (one per task):
- the depth at which each source's effect has *arrived* at the prediction position: the
  first layer whose `resid_pre`, patched alone, recovers at least half of the effect,
  on the normalised depth axis (0 first layer, 1 last);
- where the layers that *write* it sit: the centre of mass of the positive recovered share
  of single-layer `attn_out` and `mlp_out` patches (causal.centre_of_mass);
- the overlap of ICL's profile with GD's and LCGD's: the Pearson correlation of the
  per-layer recovered shares (causal.profile_overlap), for attn_out and mlp_out (resid_pre
  profiles rise with depth for any source, so their correlation says little);
- task vectors: the best layer and its accuracy; head patching: the top heads.

Rule for the verdict, per model and finetuning method: the mean over tasks of the
attn_out and mlp_out overlaps with ICL. At or above 0.5: "carried where ICL's is";
below 0.2: "not carried where ICL's is"; between: "partly where ICL's is".

The same mean is also given over the tasks where ICL's accuracy beats ZS's alone: where
ICL does not help, its "effect" is a loss or noise, and where that is carried says less
about how ICL works. The verdict itself stays on every task (no cell silently dropped).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .costs import cell_seconds
from .findings import COLLAPSED_SHARE
from .lr_rule import rate_origin

SAME, APART = 0.5, 0.2  # the verdict's thresholds on the mean profile overlap
RULE = (f"per model and finetuning method, the mean over tasks of the attn_out and mlp_out overlaps with ICL's "
        f"profiles: at or above {SAME}, \"carried where ICL's is\"; below {APART}, \"not carried where ICL's is\"; "
        f"between, \"partly where ICL's is\". A task where ICL or the method predicts one label on at least "
        f"{COLLAPSED_SHARE:g} of the test examples is left out of that method's mean, and named: a collapsed run's "
        "effect is the collapse, not the task.")
WRITERS = ("attn_out", "mlp_out")


def patching_cells(results_dir: str | Path, model: str | None = None,
                   expected: set[str] | None = None) -> list[dict[str, Any]]:
    """Every finished patching cell (cells/*/patching.json), with its wall time; with
    `expected` (the cell ids the recorded grids define), only those: a cell made at an
    older setting (e.g. a rate since chosen anew) is left out, as report.collect does."""
    out = []
    for f in sorted(Path(results_dir).glob("cells/*/patching.json")):
        if expected and f.parent.name not in expected:
            continue
        cell = json.loads(f.read_text())
        if model is not None and cell["config"]["model"] != model:
            continue
        # the compute: every phase's seconds as measured when it was computed (a rerun that
        # reuses stages has a short `total` of its own)
        cell["_seconds"] = cell_seconds(f.parent) or None
        out.append(cell)
    return out


def arrival_depth(profile: list[float | None], threshold: float = 0.5) -> float | None:
    """First layer whose recovered share reaches `threshold`, as a share of the depth."""
    for l, v in enumerate(profile):
        if v is not None and v >= threshold:
            return l / max(len(profile) - 1, 1)
    return None


def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, spec)


def _mean(values: list[float | None]) -> float | None:
    v = [x for x in values if x is not None]
    return float(np.mean(v)) if v else None


def icl_helps(cell: dict[str, Any]) -> bool:
    """Whether ICL's accuracy beats ZS's on the cell's test examples."""
    return cell["layers"]["icl"]["accuracy"] > cell["zs_accuracy"]


def at_paper_rate(cell: dict[str, Any]) -> bool:
    """Whether the cell's GD ran at the paper's 1.3B rate: no rate was chosen for this
    model and task when it ran (lr_rule.default_lr's last resort)."""
    return rate_origin((cell["config"].get("lr_source_by_method") or {}).get("gd")) == "the paper's 1.3B rate"


def collapsed(cell: dict[str, Any], source: str) -> float | None:
    """The source's majority-label share when it has collapsed (at least COLLAPSED_SHARE),
    else None; a cell from before the share was recorded counts as not collapsed."""
    share = cell["layers"][source].get("majority_label_share")
    return share if share is not None and share >= COLLAPSED_SHARE else None


def model_summary(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """Per finetuning method: the mean overlap with ICL (the verdict's number), the same
    over the tasks where ICL beats ZS, and per source the mean arrival depth and writer
    depths, over the model's tasks. A cell where ICL or the method collapsed to one label
    is left out of that method's means and listed in its `left_out`; a source's depths
    leave out the cells where it collapsed."""
    methods = sorted({m for c in cells for m in c["layers"] if m != "icl"})
    out: dict[str, Any] = {"tasks": len(cells), "methods": {},
                           "icl_helps": sorted(Path(c["config"]["task"]).stem for c in cells if icl_helps(c))}
    for m in methods:
        with_m, left_out = [], []  # left out: "task (who collapsed, their majority-label shares)"
        for c in (c for c in cells if m in c["layers"]):
            shares = {x.upper(): collapsed(c, x) for x in ("icl", m)}
            why = ", ".join(f"{x} {v:.2f}" for x, v in shares.items() if v is not None)
            if why:
                left_out.append(f"{Path(c['config']['task']).stem} ({why})")
            else:
                with_m.append(c)
        per_task = [_mean([c["overlap"][w].get(f"icl-{m}") for w in WRITERS]) for c in with_m]
        mean = _mean(per_task)
        verdict = ("not available" if mean is None else "carried where ICL's is" if mean >= SAME
                   else "not carried where ICL's is" if mean < APART else "partly where ICL's is")
        helped = [v for c, v in zip(with_m, per_task) if icl_helps(c)]
        out["methods"][m] = {"overlap": mean, "verdict": verdict, "n_tasks": sum(v is not None for v in per_task),
                             "overlap_icl_helps": _mean(helped), "n_tasks_icl_helps": sum(v is not None for v in helped),
                             "left_out": left_out}
    kept = {s: [c for c in cells if s in c["layers"] and collapsed(c, s) is None] for s in ["icl", *methods]}
    out["depth"] = {s: {"arrival": _mean([arrival_depth(c["layers"][s]["resid_pre"]["recovered_share"]) for c in cs]),
                        **{w: _mean([c["depth"][s][w] for c in cs if s in c["depth"]]) for w in WRITERS}}
                    for s, cs in kept.items()}
    return out


def section(results_dir: str | Path, model: str | None, out: Path, expected: set[str] | None = None) -> list[str]:
    """One model's causal-study section (empty without patching cells), and its figure;
    `model` None: the results directory holds one model's cells."""
    cells = patching_cells(results_dir, model, expected)
    if not cells:
        return []
    model = model or ", ".join(sorted({c["config"]["model"] for c in cells}))
    summary = model_summary(cells)
    lines = ["Rule: " + RULE, "",
             "| task | lr (rule, loss, origin) | acc ZS / ICL / GD / LCGD | arrival depth ICL / GD / LCGD | attn_out depth ICL / GD / LCGD "
             "| overlap attn_out ICL-GD / ICL-LCGD | overlap mlp_out ICL-GD / ICL-LCGD | task vector: best depth, acc | top ICL heads |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in sorted(cells, key=lambda c: c["config"]["task"]):
        cfg, L = c["config"], c["layers"]
        lrs = ", ".join(f"{k.upper()} {v:g}" for k, v in cfg["lr_by_method"].items())
        origin = rate_origin((cfg.get("lr_source_by_method") or {}).get("gd"))
        origin = "chosen" if origin.endswith("from the table") else origin
        acc = " / ".join([_fmt(c["zs_accuracy"])] + [_fmt(L[s]["accuracy"]) if s in L else "-" for s in ("icl", "gd", "lcgd")])
        arrive = " / ".join(_fmt(arrival_depth(L[s]["resid_pre"]["recovered_share"])) if s in L else "-" for s in ("icl", "gd", "lcgd"))
        attn = " / ".join(_fmt(c["depth"][s]["attn_out"]) if s in c["depth"] else "-" for s in ("icl", "gd", "lcgd"))
        ov = {w: " / ".join(_fmt(c["overlap"][w].get(f"icl-{m}"), "+.2f") for m in ("gd", "lcgd")) for w in WRITERS}
        tv = c["task_vectors"].get("icl")
        tv_text = f"{tv['best_layer'] / max(c['n_layers'] - 1, 1):.2f}, {tv['best_accuracy']:.2f}" if tv else "-"
        heads = ", ".join(f"L{h['layer']}H{h['head']}" for h in c["heads"]["icl"]["top"][:3]) if "icl" in c["heads"] else "-"
        lines.append(f"| {Path(cfg['task']).stem} | {lrs} ({cfg['lr_rule']}, {cfg['loss_reduction']}, {origin}) | {acc} | {arrive} | "
                     f"{attn} | {ov['attn_out']} | {ov['mlp_out']} | {tv_text} | {heads} |")
    lines.append("")
    for m, v in summary["methods"].items():
        lines.append(f"- **{m.upper()}'s change is {v['verdict']}** on {model}: mean overlap with ICL's attn_out and "
                     f"mlp_out profiles {_fmt(v['overlap'], '+.3f')} over {v['n_tasks']} task(s) (rule above).")
    for m, v in summary["methods"].items():
        if v["left_out"]:
            lines.append(f"- Left out of {m.upper()}'s mean, collapsed to one label (majority-label share): "
                         + "; ".join(v["left_out"]) + ".")
    helps, meth, n = summary["icl_helps"], summary["methods"], summary["tasks"]
    caveat = "ICL's effect is no gain there, and where it is carried says less about how ICL works"
    if helps:
        lines.append(f"- On the {len(helps)} of {n} task(s) where ICL's accuracy beats ZS's ({', '.join(helps)}), the overlap "
                     "with ICL: " + ", ".join(f"{m.upper()} {_fmt(v['overlap_icl_helps'], '+.3f')}"
                                              + (f" ({v['n_tasks_icl_helps']} not collapsed)"
                                                 if v["n_tasks_icl_helps"] < len(helps) else "") for m, v in meth.items())
                     + (f"; on the other {n - len(helps)}, {caveat}." if len(helps) < n else "."))
    else:
        lines.append(f"- ICL's accuracy beats ZS's on none of the {n} task(s): {caveat}.")
    paper_rate = sorted(Path(c["config"]["task"]).stem for c in cells if at_paper_rate(c))
    if paper_rate:
        lines.append(f"- Rates: {len(paper_rate)} of {n} task(s) ran at the paper's 1.3B rate, none being chosen for "
                     f"this model yet ({', '.join(paper_rate)}); the others at GD's rate chosen by the token-mean sweep "
                     "(learning_rates.toml [mean]).")
    d = summary["depth"]
    lines += [f"- ICL's effect arrives at the prediction position at depth {_fmt(d['icl']['arrival'])} (first layer whose "
              f"resid_pre recovers half of it, mean over tasks); GD's at {_fmt(d.get('gd', {}).get('arrival'))}, LCGD's at "
              f"{_fmt(d.get('lcgd', {}).get('arrival'))}.", ""]
    caption = fig_profiles(cells, out / "fig_patching.png")
    lines += ["![fig_patching.png](fig_patching.png)", "", f"*{caption}*", ""]
    seconds = [c["_seconds"] for c in cells if c["_seconds"]]
    if seconds:
        lines += [f"Compute: {len(seconds)} patching cell(s), {sum(seconds) / 60:.0f} min in all (the sum of each "
                  f"cell's phase times, patching_timings.json, which names the machine and threads).", ""]
    return lines


def _depth_profile(profile: list[float | None], grid: np.ndarray) -> np.ndarray:
    """A per-layer profile resampled onto the normalised depth axis."""
    v = np.array([np.nan if x is None else x for x in profile], dtype=float)
    return np.interp(grid, np.linspace(0, 1, len(v)), v)


def fig_profiles(cells: list[dict[str, Any]], path: Path, by_model: bool = False) -> str:
    """Mean recovered share over tasks on the normalised depth axis, per component and
    source (or, `by_model`, one line per model and source)."""
    from .report import _plt  # report imports this module: imported at call time

    plt = _plt()
    grid = np.linspace(0, 1, 41)
    comps = ("resid_pre", "attn_out", "mlp_out")
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4), sharey=False)
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for c in cells:
        for s in (s for s in c["layers"] if collapsed(c, s) is None):
            groups.setdefault((c["config"]["model"] if by_model else "", s), []).append(c)
    for ax, comp in zip(axes, comps):
        for (model, s), cs in sorted(groups.items()):
            mean = np.nanmean([_depth_profile(c["layers"][s][comp]["recovered_share"], grid) for c in cs], axis=0)
            ax.plot(grid, mean, label=f"{model} {s.upper()}".strip(), ls={"icl": "-", "gd": "--", "lcgd": ":"}.get(s, "-"))
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_title(f"hook_{comp}")
        ax.set_xlabel("normalised depth")
    axes[0].set_ylabel("share of the effect recovered")
    if groups:  # every run collapsed: empty axes, no legend
        axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90, metadata={"Software": None})
    plt.close(fig)
    n_tasks = len({(c["config"]["model"], c["config"]["task"]) for c in cells})
    return (f"Share of each source's effect on the gold-vs-best-other logit difference recovered by patching one "
            f"vector at the prediction position into ZS, mean over {n_tasks} (model, task) cell(s), on the normalised "
            "depth axis (a source's runs collapsed to one label left out). Solid ICL, dashed GD, dotted LCGD. "
            "Token-mean loss, one rate shared by GD and LCGD (each cell's rates in the table).")


def crossmodel_section(results_dir: str | Path, out: Path, expected: set[str] | None = None) -> list[str]:
    """The causal study across models: one row per model, and the profiles of all models
    on one depth axis."""
    cells = patching_cells(results_dir, expected=expected)
    if not cells:
        return []
    models = sorted({c["config"]["model"] for c in cells})
    lines = ["| model | tasks | arrival depth ICL / GD / LCGD | attn_out depth ICL / GD / LCGD | overlap with ICL: GD | "
             "overlap with ICL: LCGD | the same where ICL beats ZS: GD / LCGD (tasks) |", "|---|---|---|---|---|---|---|"]
    for m in models:
        s = model_summary([c for c in cells if c["config"]["model"] == m])
        d, meth = s["depth"], s["methods"]
        arrive = " / ".join(_fmt(d.get(x, {}).get("arrival")) for x in ("icl", "gd", "lcgd"))
        attn = " / ".join(_fmt(d.get(x, {}).get("attn_out")) for x in ("icl", "gd", "lcgd"))
        ov = [f"{_fmt(meth[x]['overlap'], '+.3f')} ({meth[x]['verdict']}"
              + (f"; {len(meth[x]['left_out'])} of {meth[x]['n_tasks'] + len(meth[x]['left_out'])} task(s) left out, "
                 "collapsed)" if meth[x]["left_out"] else ")")
              if x in meth else "-" for x in ("gd", "lcgd")]
        helps = " / ".join(f"{_fmt(meth[x]['overlap_icl_helps'], '+.3f')} ({meth[x]['n_tasks_icl_helps']})" if x in meth
                           else "-" for x in ("gd", "lcgd"))
        lines.append(f"| {m} | {s['tasks']} | {arrive} | {attn} | {ov[0]} | {ov[1]} | {helps} |")
    caption = fig_profiles(cells, out / "fig_crossmodel_patching.png", by_model=True)
    lines += ["", "Rule: " + RULE, "",
              "![fig_crossmodel_patching.png](fig_crossmodel_patching.png)", "", f"*{caption}*", ""]
    return lines
