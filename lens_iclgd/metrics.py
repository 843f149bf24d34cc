"""Similarity metrics between ICL and finetuning (docs/protocol.md).

All work on recordings: h = `blocks.{l}.hook_attn_out` vectors [example, layer, d_model],
m = pre-softmax score rows [example, layer, head, key] (NaN marks an absent key; absent
keys are the same in every setting of an example and are left out of the cosine).

- SimAOU        cos(h_ICL - h_ZS, h_FT - h_ZS)
- SimAOU_norm   the same with each h L2-normalised first (Dai et al.; biased upwards)
- SimAM         cos(m_ICL, m_FT) per head
- ZS SimAM      cos(m_ICL, m_ZS) per head: Dai et al.'s baseline for SimAM (no finetuning)
- SimAM_delta   cos(m_ICL - m_ZS, m_FT - m_ZS) per head
- alpha         cos(m_LCGD - m_ZS, m_GD - m_ZS) per head
- Rec2FTP       of the examples ZS gets wrong and FT right, the share ICL also gets right
- update size   |h_FT - h_ZS| / |h_ZS| per example and layer: how far finetuning moved each
                layer's attention output (a scale to read the cosines against; ICL's own
                |h_ICL - h_ZS| / |h_ZS| is the same quantity for the ICL side)

Three random baselines for SimAOU, each with a random vector in place of the FT side:
- SimAOU_random          cos(h_ICL - h_ZS, r), r uniform in [0,1)^d used as the update
                         itself. This is what both papers' code computes and what their
                         tables report (Dai et al.'s compute_sim.py, Deutch et al.'s
                         scripts/metrics.py: `np.random.random(ftzs_updates.shape)`).
                         r is not centred: its mean 0.5 makes the score mostly
                         cos(h_ICL - h_ZS, (1, ..., 1)). (Dai et al.'s script L2-normalises
                         every h first, so there it is computed on SimAOU_norm's updates.)
- SimAOU_random_text     cos(h_ICL - h_ZS, h_rand - h_ZS), h_rand uniform in [0,1)^d (the
                         same draw as r): the baseline as Deutch et al.'s text describes it.
- SimAOU_random_matched  cos(h_ICL - h_ZS, g - h_ZS), g a Gaussian direction scaled to
                         |h_FT| (this package's SimAOU_random before; not the papers'). As
                         |h_FT| is close to |h_ZS| and g is almost orthogonal to both, it
                         scores about cos(h_ICL - h_ZS, -h_ZS) / sqrt(2), not chance.
All three are seeded by the run's seed alone, one vector per example and layer; r and
the Gaussian direction do not depend on the finetuning method, so GD and LCGD are
compared against the same random vectors.

Per-example values are averaged over examples (and heads), then reported per layer and
as the mean over layers. A cosine with a zero vector is undefined (NaN) and left out.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

if TYPE_CHECKING:
    from .recording import Recording

Vectors = Float[Tensor, "example layer d_model"]
Scores = Float[Tensor, "example layer head key"]


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """Cosine along the last dim; NaN entries count as absent; NaN if a norm is zero."""
    present = ~(torch.isnan(a) | torch.isnan(b))
    a = torch.where(present, a, torch.zeros_like(a)).double()
    b = torch.where(present, b, torch.zeros_like(b)).double()
    denom = a.norm(dim=-1) * b.norm(dim=-1)
    return torch.where(denom > 0, (a * b).sum(-1) / denom, torch.full_like(denom, float("nan"))).float()


def _unit(h: Tensor) -> Tensor:
    return h / h.norm(dim=-1, keepdim=True)


def simaou(h_icl: Vectors, h_zs: Vectors, h_ft: Vectors) -> Float[Tensor, "example layer"]:
    return cosine(h_icl - h_zs, h_ft - h_zs)


def simaou_norm(h_icl: Vectors, h_zs: Vectors, h_ft: Vectors) -> Float[Tensor, "example layer"]:
    return cosine(_unit(h_icl) - _unit(h_zs), _unit(h_ft) - _unit(h_zs))


def uniform_vectors(shape: torch.Size | tuple[int, ...], seed: int) -> Vectors:
    """Uniform [0,1) vectors (the papers' `np.random.random`), one per example and layer;
    they depend only on the shape and the seed."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def random_update(h_ft: Vectors, seed: int) -> Vectors:
    """Gaussian directions with h_FT's lengths: the stand-in of SimAOU_random_matched."""
    g = torch.randn(h_ft.shape, generator=torch.Generator().manual_seed(seed))
    return _unit(g) * h_ft.norm(dim=-1, keepdim=True)


def simaou_random(h_icl: Vectors, h_zs: Vectors, r: Vectors) -> Float[Tensor, "example layer"]:
    """The papers' code: r (e.g. `uniform_vectors`) is the random update itself."""
    return cosine(h_icl - h_zs, r)


def simaou_random_text(h_icl: Vectors, h_zs: Vectors, h_rand: Vectors) -> Float[Tensor, "example layer"]:
    """The paper's text: a random output h_rand (uniform [0,1)) in place of h_FT."""
    return simaou(h_icl, h_zs, h_rand)


def simaou_random_matched(h_icl: Vectors, h_zs: Vectors, r: Vectors) -> Float[Tensor, "example layer"]:
    """A random output r with h_FT's length (`random_update`) in place of h_FT."""
    return simaou(h_icl, h_zs, r)


def simam(m_icl: Scores, m_ft: Scores) -> Float[Tensor, "example layer head"]:
    return cosine(m_icl, m_ft)


def zs_simam(m_icl: Scores, m_zs: Scores) -> Float[Tensor, "example layer head"]:
    """Dai et al.'s baseline for SimAM: how similar ICL's scores are to ZS's own."""
    return cosine(m_icl, m_zs)


def simam_delta(m_icl: Scores, m_zs: Scores, m_ft: Scores) -> Float[Tensor, "example layer head"]:
    return cosine(m_icl - m_zs, m_ft - m_zs)


def alpha(m_lcgd: Scores, m_gd: Scores, m_zs: Scores) -> Float[Tensor, "example layer head"]:
    """How aligned LCGD's and GD's updates of the attention scores are."""
    return simam_delta(m_lcgd, m_zs, m_gd)


def update_size(h_zs: Vectors, h_new: Vectors) -> Float[Tensor, "example layer"]:
    """|h_new - h_ZS| / |h_ZS|: the relative size of a setting's change of hook_attn_out."""
    zs = h_zs.double()
    norm = zs.norm(dim=-1)
    rel = (h_new.double() - zs).norm(dim=-1) / norm
    return torch.where(norm > 0, rel, torch.full_like(rel, float("nan"))).float()


def rec2ftp(zs_correct: Bool[Tensor, "example"], ft_correct: Bool[Tensor, "example"], icl_correct: Bool[Tensor, "example"]) -> tuple[float, int]:
    """(share, number of examples it is computed over); NaN when no example qualifies."""
    fixed_by_ft = ~zs_correct & ft_correct
    n = int(fixed_by_ft.sum())
    return ((icl_correct & fixed_by_ft).sum().item() / n if n else float("nan")), n


def f2t_mask(zs_correct: Bool[Tensor, "example"], icl_correct: Bool[Tensor, "example"],
             ft_correct: Bool[Tensor, "example"]) -> Bool[Tensor, "example"]:
    """Dai et al.'s F2T subset (their `f2t` mode): the examples ZS gets wrong and both ICL
    and the finetuned model get right (label-level predictions)."""
    return ~zs_correct & icl_correct & ft_correct


def summarize(values: Float[Tensor, "example layer *head"]) -> dict:
    """Average over examples (and heads): per layer, the mean over layers, and, for
    per-head metrics, the layer x head table."""
    per_unit = values.nanmean(0)  # [layer] or [layer, head]
    per_layer = per_unit if per_unit.dim() == 1 else per_unit.nanmean(-1)
    out = {"per_layer": _floats(per_layer), "mean": _float(per_layer.nanmean())}
    if per_unit.dim() == 2:
        out["per_head"] = [_floats(row) for row in per_unit]
    return out


def _float(x: Tensor | float) -> float | None:
    v = float(x)
    return None if math.isnan(v) else v


def _floats(x: Tensor) -> list[float | None]:
    return [_float(v) for v in x]


def frame(values: dict[str, Tensor]) -> "pd.DataFrame":
    """Per-example metrics (e.g. `compare(...)`) as one long DataFrame with
    columns metric, example, layer, [head], value."""
    import pandas as pd

    parts = []
    for name, v in values.items():
        idx = torch.cartesian_prod(*[torch.arange(n) for n in v.shape]).reshape(-1, v.dim())
        cols = {"metric": name, "example": idx[:, 0].numpy(), "layer": idx[:, 1].numpy()}
        if v.dim() == 3:
            cols["head"] = idx[:, 2].numpy()
        cols["value"] = v.reshape(-1).numpy()
        parts.append(pd.DataFrame(cols))
    return pd.concat(parts, ignore_index=True)


def compare(zs: Recording, icl: Recording, ft: Recording, seed: int) -> dict[str, Any]:
    """Every ICL-vs-finetuning metric of one method, per example/layer(/head). The random
    vectors depend on the seed only, never on the method."""
    uniform = uniform_vectors(zs.attn_out.shape, seed)
    return {
        "SimAOU": simaou(icl.attn_out, zs.attn_out, ft.attn_out),
        "SimAOU_norm": simaou_norm(icl.attn_out, zs.attn_out, ft.attn_out),
        "SimAOU_random": simaou_random(icl.attn_out, zs.attn_out, uniform),
        "SimAOU_random_text": simaou_random_text(icl.attn_out, zs.attn_out, uniform),
        "SimAOU_random_matched": simaou_random_matched(icl.attn_out, zs.attn_out, random_update(ft.attn_out, seed)),
        "SimAM": simam(icl.attn_scores, ft.attn_scores),
        "SimAM_delta": simam_delta(icl.attn_scores, zs.attn_scores, ft.attn_scores),
    }
