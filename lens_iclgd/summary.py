"""The text a run prints: its summary table, and the order-sensitivity table (no torch)."""

from __future__ import annotations


def _lr_text(c: dict) -> str:
    """The rates and how they were set: "3e-04 (shared, mean loss)", "GD 1e-05, LCGD 3e-06 (own, sum loss)"."""
    lrs = c.get("lr_by_method") or {}
    rule = {"default": "own"}.get(c.get("lr_rule"), c.get("lr_rule"))
    how = f" ({rule}, {c.get('loss_reduction', 'sum')} loss)" if rule else ""
    if len(set(lrs.values())) > 1:
        return ", ".join(f"{m.upper()} {lr:g}" for m, lr in lrs.items()) + how
    return (format(c["lr"], "g") if isinstance(c["lr"], (int, float)) else "-") + how


def summary_table(results: dict, subset: str = "all") -> str:
    """A human-readable summary for stdout; `subset` "f2t": the similarity metrics on Dai et
    al.'s F2T examples (ZS wrong, ICL and the method right) instead of all test examples."""
    c = results["config"]
    lines = [
        f"task {c['task']} | model {c['model']} ({c['baseline']}) | k {c['k_effective']} (asked {c['k_requested']}) "
        f"| n_test {c['n_test_effective']} | seed {c['seed']} | lr {_lr_text(c)} | position {c['recorded_position']}",
        "accuracy: " + "  ".join(f"{s.upper()} {v * 100:.1f}%" for s, v in results["accuracy"].items()),
    ]
    names = ["SimAOU", "SimAOU_norm", "SimAOU_random", "SimAOU_random_text", "SimAOU_random_matched", "SimAM",
             "SimAM_delta", "Rec2FTP"]
    if results["metrics"] and subset == "f2t":
        f2t = {m: e.get("f2t") or {} for m, e in results["metrics"].items()}
        lines.append(f"{'F2T subset: examples':<28}" + "".join(f"{f2t[m].get('n_examples', 'n/a'):>10}" for m in f2t))
        names = [n for n in names if n != "Rec2FTP"]  # a prediction-level share, not a subset mean
    if results["metrics"]:
        title = "metric (mean over layers)" if subset == "all" else "metric (F2T, mean over layers)"
        lines.append(f"{title:<28}" + "".join(f"{m.upper():>10}" for m in results["metrics"]))
        for name in names:
            vals = [(results["metrics"][m].get("f2t") or {}).get(name) if subset == "f2t" else results["metrics"][m][name]["mean"]
                    for m in results["metrics"]]
            lines.append(f"{name:<28}" + "".join(f"{'n/a' if v is None else f'{v:.3f}':>10}" for v in vals))
    if "zs_simam" in results:
        z = results["zs_simam"]["mean"]
        lines.append(f"{'ZS SimAM (ICL vs ZS)':<28}{'n/a' if z is None else f'{z:.3f}':>10}")
    if "alpha" in results:
        a = results["alpha"]["mean"]
        lines.append(f"{'alpha (GD vs LCGD SimAM_delta)':<28}{'n/a' if a is None else f'{a:.3f}':>10}")
    if "outputs" in results:
        o = results["outputs"]
        lines.append("top-1 token accuracy (whole vocabulary): " + "  ".join(f"{s.upper()} {v * 100:.1f}%" for s, v in o["token_accuracy"].items()))
        lines.append(f"{'next-token output (K ' + str(o['top_k']) + ')':<28}" + "".join(f"{pair.upper():>10}" for pair in o["pairs"]))
        for name in next(iter(o["pairs"].values()), {}):
            vals = [o["pairs"][pair][name] for pair in o["pairs"]]
            lines.append(f"{name:<28}" + "".join(f"{'n/a' if v is None else f'{v:.3f}':>10}" for v in vals))
    f2t = {m: e["f2t"] for m, e in results["metrics"].items() if "f2t" in e}
    if f2t:
        lines.append("F2T subset (ZS wrong, ICL and the method right): " + "  ".join(
            f"{m.upper()} n={e['n_examples']} SimAM_delta {'n/a' if e['SimAM_delta'] is None else format(e['SimAM_delta'], '.3f')}"
            for m, e in f2t.items()))
    lines.append(f"wall time {results['timings_s']['total']:.0f} s, peak memory {results['timings_s']['peak_rss_mb']} MB")
    return "\n".join(lines)


def orders_table(summary: dict) -> str:
    lines = [f"{'setting':<8}{'acc mean':>10}{'acc std':>9}{'acc min':>9}{'acc max':>9}{'same pred':>11}{'flip rate':>11}{'one label':>11}"]
    for s, st in summary["prediction_stability"].items():
        a = summary["spread"][f"acc_{s}"]
        lines.append(f"{s.upper():<8}{a['mean']:>10.3f}{a['std']:>9.3f}{a['min']:>9.3f}{a['max']:>9.3f}"
                     f"{st['same_prediction_in_every_order']:>11.2f}{st['mean_pairwise_disagreement']:>11.3f}"
                     f"{st['majority_label_share']:>11.3f}")
    for name in ("SimAOU", "SimAM_delta"):
        for m in ("gd", "lcgd"):
            if f"{m}_{name}" in summary["spread"]:
                v = summary["spread"][f"{m}_{name}"]
                lines.append(f"{m.upper()} {name}: mean {v['mean']:.3f} std {v['std']:.3f} (min {v['min']:.3f}, max {v['max']:.3f})")
    for m, metrics in summary.get("ceiling", {}).items():  # a method against itself in another order
        v = metrics["SimAM_delta"]
        lines.append(f"ceiling {m.upper()} vs {m.upper()} (another order) SimAM_delta: mean {v['mean']:.3f} "
                     f"(min {v['min']:.3f}, max {v['max']:.3f}); SimAOU {metrics['SimAOU']['mean']:.3f}")
    return "\n".join(lines)


def patching_table(result: dict) -> str:
    """The causal study's printed summary: per source, where its effect is recovered."""
    c, layers = result["config"], result["layers"]
    lrs = ", ".join(f"{m.upper()} {lr:g}" for m, lr in (c.get("lr_by_method") or {}).items())
    lines = [f"task {c['task']} | model {c['model']} ({c['baseline']}) | k {c['k_effective']} | n_test {result['n_test']} "
             f"| seed {c['seed']} | lr {lrs} ({c['lr_rule']}, {c['loss_reduction']} loss) | prediction position",
             "accuracy: ZS " + f"{result['zs_accuracy'] * 100:.1f}%  "
             + "  ".join(f"{s.upper()} {v['accuracy'] * 100:.1f}%" for s, v in layers.items()),
             f"{'recovered share (best layer)':<30}" + "".join(f"{s.upper():>16}" for s in layers)]
    for comp in ("resid_pre", "attn_out", "mlp_out"):
        cells = []
        for v in layers.values():
            share = [x for x in v[comp]["recovered_share"]]
            defined = [(x, l) for l, x in enumerate(share) if x is not None]
            cells.append(f"{max(defined)[0]:.2f} (L{max(defined)[1]})" if defined else "n/a")
        lines.append(f"{comp:<30}" + "".join(f"{x:>16}" for x in cells))
    for comp, pairs in result["overlap"].items():
        lines.append(f"overlap of profiles, {comp}: " + ", ".join(
            f"{k.upper()} {'n/a' if v is None else f'{v:+.2f}'}" for k, v in pairs.items()))
    for s, tv in result["task_vectors"].items():
        lines.append(f"task vector ({s.upper()} mean resid_pre): best layer {tv['best_layer']}, accuracy "
                     f"{tv['best_accuracy'] * 100:.1f}%")
    for s, h in result["heads"].items():
        if isinstance(h, dict):
            top = ", ".join(f"L{t['layer']}H{t['head']} {t['indirect_effect']:+.3f}" for t in h["top"][:5])
            lines.append(f"top heads ({s.upper()} mean output, {result['n_head_examples']} examples): {top}")
    return "\n".join(lines)
