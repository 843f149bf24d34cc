"""Similarity metrics between ICL and finetuning (PROTOCOL.md).

All work on recordings: h = `blocks.{l}.hook_attn_out` vectors [example, layer, d_model],
m = pre-softmax score rows [example, layer, head, key] (NaN marks an absent key; absent
keys are the same in every setting of an example and are left out of the cosine).

- SimAOU        cos(h_ICL - h_ZS, h_FT - h_ZS)
- SimAOU_norm   the same with each h L2-normalised first (Dai et al.; biased upwards)
- SimAOU_random cos(h_ICL - h_ZS, r - h_ZS), r a random vector with h_FT's length
- SimAM         cos(m_ICL, m_FT) per head
- SimAM_delta   cos(m_ICL - m_ZS, m_FT - m_ZS) per head
- alpha         cos(m_LCGD - m_ZS, m_GD - m_ZS) per head
- Rec2FTP       of the examples ZS gets wrong and FT right, the share ICL also gets right

Per-example values are averaged over examples (and heads), then reported per layer and
as the mean over layers. A cosine with a zero vector is undefined (NaN) and left out.
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Bool, Float
from torch import Tensor

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


def random_update(h_ft: Vectors, seed: int) -> Vectors:
    """Random directions with h_FT's lengths: the FT stand-in for SimAOU_random."""
    g = torch.randn(h_ft.shape, generator=torch.Generator().manual_seed(seed))
    return _unit(g) * h_ft.norm(dim=-1, keepdim=True)


def simaou_random(h_icl: Vectors, h_zs: Vectors, r: Vectors) -> Float[Tensor, "example layer"]:
    return cosine(h_icl - h_zs, r - h_zs)


def simam(m_icl: Scores, m_ft: Scores) -> Float[Tensor, "example layer head"]:
    return cosine(m_icl, m_ft)


def simam_delta(m_icl: Scores, m_zs: Scores, m_ft: Scores) -> Float[Tensor, "example layer head"]:
    return cosine(m_icl - m_zs, m_ft - m_zs)


def alpha(m_lcgd: Scores, m_gd: Scores, m_zs: Scores) -> Float[Tensor, "example layer head"]:
    """How aligned LCGD's and GD's updates of the attention scores are."""
    return simam_delta(m_lcgd, m_zs, m_gd)


def rec2ftp(zs_correct: Bool[Tensor, "example"], ft_correct: Bool[Tensor, "example"], icl_correct: Bool[Tensor, "example"]) -> tuple[float, int]:
    """(share, number of examples it is computed over); NaN when no example qualifies."""
    fixed_by_ft = ~zs_correct & ft_correct
    n = int(fixed_by_ft.sum())
    return ((icl_correct & fixed_by_ft).sum().item() / n if n else float("nan")), n


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
    """Per-example metrics (e.g. `runner.compare(...)`) as one long DataFrame with
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
