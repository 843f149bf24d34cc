"""Ablations through TransformerLens hooks, active in every setting at once.

Syntax (comma separated, layers and heads 0-based):
    3.5      head 5 of layer 3          (its `blocks.3.attn.hook_z` slice)
    7.*      every head of layer 7      (all of `blocks.7.attn.hook_z`)
    attn4    the whole attention block of layer 4 (`blocks.4.hook_attn_out`)
    mlp2     the whole MLP of layer 2   (`blocks.2.hook_mlp_out`)

Modes: `zero` replaces the activation with zeros; `mean` with its mean over the real
(non-BOS) tokens of the zero-shot test inputs (up to MEAN_REFERENCE_EXAMPLES of them),
computed once on the un-ablated model.

The same hooks run in the ZS and ICL passes (the ICL prefix included) and in every GD and
LCGD training forward pass, so the finetuned model is trained with the component ablated
as well: the comparison stays apples to apples. A zero-ablated head passes no gradient
to its own query path; in GQA models its K/V head is shared and still trained through
the other query heads of its group.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from .device import model_device
from .errors import UserError

from .config import ABLATE_MODES as MODES  # noqa: E402 (declared with the other settings)
MEAN_REFERENCE_EXAMPLES = 200
_ITEM = re.compile(r"^(?:(\d+)\.(\d+|\*)|(attn|mlp)(\d+))$")


@dataclass(frozen=True)
class Ablation:
    kind: str  # "head", "attn" or "mlp"
    layer: int
    head: int | None  # for kind "head": None means every head
    mode: str

    @property
    def hook_name(self) -> str:
        if self.kind == "head":
            return f"blocks.{self.layer}.attn.hook_z"
        return f"blocks.{self.layer}.hook_{self.kind}_out"

    def label(self) -> str:
        if self.kind == "head":
            return f"{self.layer}.{'*' if self.head is None else self.head}"
        return f"{self.kind}{self.layer}"

    def describe(self) -> dict:
        return {"component": self.label(), "hook": self.hook_name, "mode": self.mode}

    def _slice(self, act: Tensor) -> Tensor:
        # hook_z is [batch, pos, head, d_head]; the others are [batch, pos, d_model]
        return act[:, :, self.head] if self.kind == "head" and self.head is not None else act


def parse_ablation(spec: str | None, mode: str = "zero") -> list[Ablation]:
    if mode not in MODES:
        raise UserError(f"unknown ablation mode {mode!r}: use zero or mean")
    items = [s.strip() for s in (spec or "").split(",") if s.strip()]
    out = []
    for item in items:
        m = _ITEM.match(item)
        if not m:
            raise UserError(f"cannot parse ablation {item!r}: use L.H (head), L.* (all heads), attnL or mlpL, e.g. 3.5,7.*,mlp2")
        if m.group(1) is not None:
            head = None if m.group(2) == "*" else int(m.group(2))
            out.append(Ablation("head", int(m.group(1)), head, mode))
        else:
            out.append(Ablation(m.group(3), int(m.group(4)), None, mode))
    if len(set(out)) != len(out):
        raise UserError(f"ablation {spec!r} names a component twice")
    return out


def check_against_model(model: HookedTransformer, ablations: list[Ablation]) -> None:
    cfg = model.cfg
    for a in ablations:
        if not 0 <= a.layer < cfg.n_layers:
            raise UserError(f"ablation {a.label()}: the model has layers 0..{cfg.n_layers - 1}")
        if a.head is not None and not 0 <= a.head < cfg.n_heads:
            raise UserError(f"ablation {a.label()}: layer {a.layer} has heads 0..{cfg.n_heads - 1}")
        if a.kind == "mlp" and cfg.attn_only:
            raise UserError(f"ablation {a.label()}: this model has no MLP layers")


@torch.no_grad()
def reference_means(model: HookedTransformer, ablations: list[Ablation], sequences: list[list[int]], skip_first: int) -> dict[Ablation, Tensor]:
    """Mean activation of each ablated component over the real tokens of `sequences`
    (the first `skip_first` positions, the BOS, left out)."""
    sums: dict[Ablation, Tensor] = {}
    count = 0
    for start in range(0, len(sequences), 16):
        batch = sequences[start : start + 16]
        width = max(len(s) for s in batch)
        tokens = torch.zeros(len(batch), width, dtype=torch.long, device="cpu")  # moved once, below
        mask = torch.zeros(len(batch), width, dtype=torch.long, device="cpu")
        for b, s in enumerate(batch):
            tokens[b, : len(s)] = torch.tensor(s, device="cpu")
            mask[b, : len(s)] = 1
        tokens, mask = tokens.to(model_device(model)), mask.to(model_device(model))
        weight = mask.clone()
        weight[:, :skip_first] = 0
        count += int(weight.sum())

        def accumulate(act: Tensor, hook, a: Ablation) -> None:
            x = a._slice(act)
            w = weight.to(x.dtype).reshape(weight.shape + (1,) * (x.dim() - 2))
            total = (x * w).sum((0, 1))
            sums[a] = sums[a] + total if a in sums else total

        hooks = [(a.hook_name, lambda act, hook, a=a: accumulate(act, hook, a)) for a in ablations]
        model.run_with_hooks(tokens, attention_mask=mask, stop_at_layer=model.cfg.n_layers, fwd_hooks=hooks)
    return {a: s / max(count, 1) for a, s in sums.items()}


def ablation_hooks(model: HookedTransformer, ablations: list[Ablation], prompts=None) -> list[tuple[str, object]]:
    """TransformerLens forward hooks that apply the ablations. Mean ablation needs the
    run's prompts (a `PromptSet`) for its reference activations."""
    check_against_model(model, ablations)
    means: dict[Ablation, Tensor] = {}
    if any(a.mode == "mean" for a in ablations):
        if prompts is None:
            raise UserError("mean ablation needs reference prompts")
        refs = [prompts.zs_prefix() + q.prompt + prompts.options[0] for q in prompts.queries[:MEAN_REFERENCE_EXAMPLES]]
        means = reference_means(model, [a for a in ablations if a.mode == "mean"], refs, len(prompts.zs_prefix()))

    def make(a: Ablation):
        def hook(act: Tensor, hook) -> Tensor:
            act = act.clone()  # never modify a tensor autograd may still need
            target = a._slice(act)
            if a.mode == "zero":
                target.zero_()
            else:
                target.copy_(means[a].expand_as(target))
            return act

        return hook

    return [(a.hook_name, make(a)) for a in ablations]
