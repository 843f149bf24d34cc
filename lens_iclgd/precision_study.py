"""The precision study: how far each precision policy moves a cell's numbers from float32,
and the rule that picks the default precision (`lens-iclgd bench --precision-study`).

For every policy, against the float32 run of the same cell in the same process:
- per metric (SimAOU, SimAOU_norm, SimAM, SimAM_delta) and method (GD, LCGD): the largest
  per-layer absolute difference and the difference of the cell means;
- the share of test examples whose prediction agrees, per setting (ZS, ICL, GD, LCGD);
and, as the scale these errors should be read against, the update size
|h_FT - h_ZS| / |h_ZS| of each method per layer (min / median / max over layers).

Rule: the default precision is the fastest policy whose metrics stay within
LAYER_TOLERANCE of float32 on every layer and MEAN_TOLERANCE on the cell mean, with
predictions agreeing on at least MIN_AGREEMENT of the examples (precision.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import metrics as M
from .precision import LAYER_TOLERANCE, MEAN_TOLERANCE, MIN_AGREEMENT
from .recording import Recording
from .metrics import compare

METRICS = ("SimAOU", "SimAOU_norm", "SimAM", "SimAM_delta")
METHODS = ("gd", "lcgd")


@dataclass
class Fidelity:
    """One policy's distance from float32 on one cell."""

    name: str
    layer_diff: dict[tuple[str, str], float] = field(default_factory=dict)  # (method, metric) -> max over layers
    mean_diff: dict[tuple[str, str], float] = field(default_factory=dict)  # (method, metric) -> |mean - mean|
    agreement: dict[str, float] = field(default_factory=dict)  # setting -> share of equal predictions

    @property
    def max_layer_error(self) -> float:
        return max(self.layer_diff.values(), default=0.0)

    @property
    def max_mean_error(self) -> float:
        return max(self.mean_diff.values(), default=0.0)

    @property
    def within(self) -> bool:
        return (self.max_layer_error <= LAYER_TOLERANCE and self.max_mean_error <= MEAN_TOLERANCE
                and min(self.agreement.values(), default=1.0) >= MIN_AGREEMENT)


def _diffs(a: list[float | None], b: list[float | None]) -> list[float]:
    """Absolute differences where both sides are defined (a layer with no valid example is
    NaN in both; one side undefined counts as the largest possible cosine gap, 2)."""
    out = []
    for x, y in zip(a, b):
        if x is None and y is None:
            continue
        out.append(2.0 if x is None or y is None else abs(x - y))
    return out


def fidelity(name: str, ref: dict[str, Recording], got: dict[str, Recording], seed: int) -> Fidelity:
    """Compare a policy's recordings (zs, icl, gd, lcgd) with float32's."""
    fid = Fidelity(name)
    for method in METHODS:
        if method not in ref:
            continue
        want = compare(ref["zs"], ref["icl"], ref[method], seed)
        have = compare(got["zs"], got["icl"], got[method], seed)
        for metric in METRICS:
            sw, sh = M.summarize(want[metric]), M.summarize(have[metric])
            fid.layer_diff[(method, metric)] = max(_diffs(sw["per_layer"], sh["per_layer"]), default=0.0)
            fid.mean_diff[(method, metric)] = max(_diffs([sw["mean"]], [sh["mean"]]), default=0.0)
    for setting in ref:
        fid.agreement[setting] = (ref[setting].predictions == got[setting].predictions).float().mean().item()
    return fid


def update_sizes(rec: dict[str, Recording]) -> dict[str, tuple[float, float, float]]:
    """|h_FT - h_ZS| / |h_ZS| per layer (mean over examples): (min, median, max) over layers."""
    out = {}
    for method in METHODS:
        if method in rec:
            per_layer = M.update_size(rec["zs"].attn_out, rec[method].attn_out).nanmean(0)
            out[method] = (per_layer.min().item(), per_layer.median().item(), per_layer.max().item())
    return out


def choose(fids: list[Fidelity], seconds: dict[str, float]) -> str:
    """The rule: the fastest policy within fidelity (float32 always is)."""
    ok = [f.name for f in fids if f.within] + ["float32"]
    return min(ok, key=lambda n: seconds[n])


def fidelity_table(fids: list[Fidelity], float32_rec: dict[str, Recording]) -> str:
    """Per policy: max layer / cell-mean difference per method and metric, prediction
    agreement; then the float32 update sizes they compare with."""
    lines = [f"fidelity against float32 (max |diff| over layers / |diff| of the cell mean; within: <= {LAYER_TOLERANCE} "
             f"/ <= {MEAN_TOLERANCE}, predictions agreeing >= {100 * MIN_AGREEMENT:.0f}%)"]
    head = f"{'policy':<18}{'method':<7}" + "".join(f"{m:>18}" for m in METRICS)
    lines.append(head)
    for f in fids:
        for method in METHODS:
            if (method, METRICS[0]) in f.layer_diff:
                cells = "".join(f"{f.layer_diff[(method, m)]:>10.4f} /{f.mean_diff[(method, m)]:>6.4f}" for m in METRICS)
                lines.append(f"{f.name:<18}{method.upper():<7}{cells}")
        agree = ", ".join(f"{s} {100 * v:.0f}%" for s, v in f.agreement.items())
        lines.append(f"{f.name:<18}predictions agree: {agree}; {'WITHIN' if f.within else 'NOT within'} fidelity")
    sizes = update_sizes(float32_rec)
    lines.append("update size |h_FT - h_ZS| / |h_ZS| per layer in float32 (min / median / max): "
                 + ", ".join(f"{m.upper()} {a:.4f} / {b:.4f} / {c:.4f}" for m, (a, b, c) in sizes.items()))
    return "\n".join(lines)
