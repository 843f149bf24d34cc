"""Finetuning on the demonstrations: vanilla GD and layer-causal GD (LCGD).

Both (PROTOCOL.md): only the attention key/value projections are trained (weights, and
biases where the pretrained model has them; GQA models hold them in `attn._W_K`,
`attn._W_V`); plain SGD, batch size 1, one pass over the k demonstrations in ICL order;
the loss of a demonstration is the next-token cross-entropy summed over all its tokens.

- GD: the usual loss on the model's output.
- LCGD: the sum over layers l of the cross-entropy of `unembed(ln_final(resid_post_l))`,
  with the model's own frozen `ln_final`/`unembed`, and every layer's input detached
  (a hook on `blocks.{l}.hook_resid_pre`), so layer l's update depends only on layer l's
  own prediction error and nothing from deeper layers reaches a shallower one.

The vocabulary projection is the expensive part (gemma-3-270m: 262k words, 18 layers).
`linear_cross_entropy` computes it chunk by chunk over the vocabulary, fusing the softmax
gradient into the same pass, so no layer's full logits are ever held in memory.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from .errors import TrainingDiverged, UserError
from .models import kv_parameters
from .record import Hook

METHODS = ("gd", "lcgd")
VOCAB_CHUNK = 16384


class _LinearCrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy of (x @ W + b), optionally soft-capped, without materialising
    the [rows, vocab] logits. One pass over vocabulary chunks keeps a running max, a running
    sum of exp and the running softmax-weighted sum of W's columns (online softmax), which
    is exactly d lse / d x. W and b are frozen (the model's own unembedding)."""

    @staticmethod
    def forward(ctx, x: Tensor, W: Tensor, b: Tensor, targets: Tensor, cap: float, chunk: int) -> Tensor:
        n = x.shape[0]
        run_max = torch.full((n,), float("-inf"), dtype=x.dtype)
        run_sum = torch.zeros(n, dtype=x.dtype)
        run_grad = torch.zeros_like(x)
        for lo in range(0, W.shape[1], chunk):
            u = torch.addmm(b[lo : lo + chunk], x, W[:, lo : lo + chunk])
            if cap > 0:
                t = torch.tanh(u / cap)
                z, dz = cap * t, 1 - t * t
            else:
                z, dz = u, None
            new_max = torch.maximum(run_max, z.max(-1).values)
            scale = torch.exp(run_max - new_max)
            e = torch.exp(z - new_max[:, None])
            run_sum = run_sum * scale + e.sum(-1)
            weighted = e if dz is None else e * dz
            run_grad = run_grad * scale[:, None] + weighted @ W[:, lo : lo + chunk].T
            run_max = new_max
        w_t = W[:, targets].T  # [n, d_model]
        u_t = (x * w_t).sum(-1) + b[targets]
        if cap > 0:
            t_t = torch.tanh(u_t / cap)
            z_t, dz_t = cap * t_t, 1 - t_t * t_t
        else:
            z_t, dz_t = u_t, torch.ones_like(u_t)
        loss = run_max + torch.log(run_sum) - z_t
        ctx.save_for_backward(run_grad / run_sum[:, None] - dz_t[:, None] * w_t)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        (grad_x,) = ctx.saved_tensors
        return grad_loss[:, None] * grad_x, None, None, None, None, None


def linear_cross_entropy(
    x: Float[Tensor, "n d_model"],
    W: Float[Tensor, "d_model vocab"],
    b: Float[Tensor, "vocab"] | None,
    targets: Int[Tensor, "n"],
    softcap: float | None = None,
    chunk: int = VOCAB_CHUNK,
) -> Float[Tensor, "n"]:
    """Cross-entropy of each row of `softcap(x @ W + b)` against its target token."""
    if W.requires_grad or (b is not None and b.requires_grad):
        raise ValueError("linear_cross_entropy expects a frozen unembedding")
    if b is None:
        b = torch.zeros(W.shape[1], dtype=x.dtype)
    cap = float(softcap) if softcap is not None and softcap > 0 else 0.0
    return _LinearCrossEntropy.apply(x, W, b, targets, cap, chunk)


def _unembed_loss(model: HookedTransformer, resid: Float[Tensor, "n d_model"], targets: Tensor) -> Tensor:
    """Per-token cross-entropy of the model's own ln_final + unembed on these residuals."""
    x = model.ln_final(resid[None])[0]
    return linear_cross_entropy(x, model.unembed.W_U, model.unembed.b_U, targets, model.cfg.output_logits_soft_cap)


def gd_losses(model: HookedTransformer, tokens: Int[Tensor, "1 pos"]) -> Float[Tensor, "1"]:
    """Vanilla GD: the summed next-token loss of the model's output (one 'layer')."""
    resid = model(tokens, attention_mask=torch.ones_like(tokens), stop_at_layer=model.cfg.n_layers)[0]
    return _unembed_loss(model, resid[:-1], tokens[0, 1:]).sum()[None]


def lcgd_losses(model: HookedTransformer, tokens: Int[Tensor, "1 pos"]) -> Float[Tensor, "layer"]:
    """LCGD: each layer's own summed next-token loss through ln_final/unembed, with every
    layer's input detached so gradients never cross from one layer to another."""
    n_layers = model.cfg.n_layers
    resid_post: list[Tensor] = [None] * n_layers  # type: ignore[list-item]

    def detach_input(act: Tensor, hook) -> Tensor:
        return act.detach()

    def keep_output(act: Tensor, hook, layer: int) -> None:
        resid_post[layer] = act[0, :-1]

    hooks = [(f"blocks.{l}.hook_resid_pre", detach_input) for l in range(n_layers)]
    hooks += [(f"blocks.{l}.hook_resid_post", lambda a, hook, l=l: keep_output(a, hook, l)) for l in range(n_layers)]
    with model.hooks(fwd_hooks=hooks):
        model(tokens, attention_mask=torch.ones_like(tokens), stop_at_layer=n_layers)
    # All layers in one projection: the unembedding is read once per step, not once per layer.
    targets = tokens[0, 1:].repeat(n_layers)
    per_token = _unembed_loss(model, torch.cat(resid_post), targets)
    return per_token.view(n_layers, -1).sum(-1)


_LOSSES = {"gd": gd_losses, "lcgd": lcgd_losses}


@dataclass
class FinetuneLog:
    method: str
    lr: float
    losses: Float[Tensor, "step layer"]  # GD: one column; LCGD: one per layer
    grad_norms: Float[Tensor, "layer step"]  # L2 norm of each layer's K/V gradient


def check_method(method: str) -> None:
    if method not in METHODS:
        raise UserError(f"unknown finetuning method {method!r}: use one of {', '.join(METHODS)}")


def train(
    model: HookedTransformer,
    demos: Sequence[list[int]],
    bos: list[int],
    method: str,
    lr: float,
    kv_bias: bool,
    hooks: Sequence[Hook] = (),
) -> FinetuneLog:
    """One SGD pass over the demonstrations, updating K/V in place (see `finetuned`)."""
    check_method(method)
    layers = kv_parameters(model, kv_bias)
    trained = [p for params in layers.values() for _, p in params]
    was_trainable = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trained:
        p.requires_grad_(True)
        p.grad = None
    losses, norms = [], torch.zeros(model.cfg.n_layers, len(demos))
    try:
        with model.hooks(fwd_hooks=list(hooks)):
            for step, demo in enumerate(demos):
                tokens = torch.tensor([bos + demo])
                loss = _LOSSES[method](model, tokens)
                bad = (~torch.isfinite(loss.detach())).nonzero()
                if len(bad):
                    layer = int(bad[0]) if method == "lcgd" else None
                    raise TrainingDiverged(method, step, layer, loss[bad[0]].item(), lr)
                loss.sum().backward()
                with torch.no_grad():
                    for l, params in layers.items():
                        norms[l, step] = torch.stack([p.grad.norm() for _, p in params]).norm()
                        for _, p in params:
                            p.add_(p.grad, alpha=-lr)  # plain SGD
                            p.grad = None
                        if not all(torch.isfinite(p).all() for _, p in params):
                            raise TrainingDiverged(method, step, l, float("nan"), lr)
                losses.append(loss.detach())
    finally:
        for p, flag in was_trainable.items():
            p.requires_grad_(flag)
            p.grad = None
    return FinetuneLog(method, lr, torch.stack(losses) if losses else torch.zeros(0, 1), norms)


@contextmanager
def finetuned(
    model: HookedTransformer,
    demos: Sequence[list[int]],
    bos: list[int],
    method: str,
    lr: float,
    kv_bias: bool,
    hooks: Sequence[Hook] = (),
) -> Iterator[FinetuneLog]:
    """Train K/V in place for the duration of the block, then restore the original
    weights (cheaper than copying the whole model: K/V are a few % of it)."""
    params = [p for ps in kv_parameters(model, kv_bias).values() for _, p in ps]
    saved = [p.detach().clone() for p in params]
    try:
        yield train(model, demos, bos, method, lr, kv_bias, hooks)
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
