"""The vocabulary projection, without ever holding [rows, vocabulary] logits.

gemma-3-270m has 262,144 words: one row of logits is 1 MB, and its unembedding matrix is
671 MB. Everything here walks the vocabulary in chunks, keeping a running max and sum of
exp (online softmax), so memory stays at [rows, chunk] and W_U is read once per call
however many rows there are:

- `log_probs`: log p(target) for rows of final residuals (scoring answer words);
- `logit_chunks`: the chunks themselves, for the output metrics (outputs.py);
- `linear_cross_entropy`: per-row cross-entropy with its gradient w.r.t. the input,
  accumulated in the same pass (GD and LCGD losses; W_U and b_U are frozen).

Logits follow the model: `ln_final` is applied by the caller, then x @ W_U + b_U, then
the output soft-cap if the model has one.
"""

from __future__ import annotations

import weakref

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from .precision import vocab_matmul_dtype

MAX_ROWS = 2048  # rows per vocabulary pass in `log_probs`: temporaries of 64 MB at chunk 8192
VOCAB_CHUNK = 8192  # measured fastest on this CPU (gemma, 612 rows: 214 GFLOP/s vs 163 at 16384)


_low_copy: tuple[weakref.ref, int, torch.dtype, Tensor] | None = None


def _lowered(W: Tensor, dtype: torch.dtype) -> Tensor:
    """W in `dtype`, converted once per (frozen) W rather than once per chunk and call:
    the bfloat16 pass then reads half the bytes of the float32 one."""
    global _low_copy
    if _low_copy is None or _low_copy[0]() is not W or _low_copy[1] != W._version or _low_copy[2] != dtype:
        _low_copy = None  # free the old copy before making the new one
        _low_copy = (weakref.ref(W), W._version, dtype, W.detach().to(dtype))
    return _low_copy[3]


def _online_logsumexp(x: Tensor, W: Tensor, b: Tensor, cap: float, chunk: int, with_grad: bool) -> tuple[Tensor, Tensor | None]:
    """logsumexp over the vocabulary of softcap(x @ W + b), and, if asked, its gradient
    w.r.t. x (the softmax-weighted sum of W's columns, through the soft-cap).
    Under a bfloat16 precision mode the two matrix products run in bfloat16; the running
    max, sum and gradient are accumulated in float32 (at least) in every mode."""
    n = x.shape[0]
    acc = torch.promote_types(x.dtype, torch.float32)
    run_max = torch.full((n,), float("-inf"), dtype=acc, device=x.device)
    run_sum = torch.zeros(n, dtype=acc, device=x.device)
    run_grad = torch.zeros_like(x, dtype=acc) if with_grad else None
    low = vocab_matmul_dtype(x.device)
    if low is not None:
        x, W, b = x.to(low), _lowered(W, low), b.to(low)
    for lo in range(0, W.shape[1], chunk):
        u = torch.addmm(b[lo : lo + chunk], x, W[:, lo : lo + chunk])
        if low is not None:
            u = u.to(acc)
        if cap > 0:
            t = torch.tanh(u / cap)
            z, dz = cap * t, 1 - t * t
        else:
            z, dz = u, None
        new_max = torch.maximum(run_max, z.max(-1).values)
        scale = torch.exp(run_max - new_max)
        e = torch.exp(z - new_max[:, None])
        run_sum = run_sum * scale + e.sum(-1)
        if run_grad is not None:
            weighted = e if dz is None else e * dz
            if low is not None:
                weighted = weighted.to(low)
            run_grad = run_grad * scale[:, None] + weighted @ W[:, lo : lo + chunk].T
        run_max = new_max
    lse = run_max + torch.log(run_sum)
    return lse, (run_grad / run_sum[:, None] if run_grad is not None else None)


def logit_chunks(x: Tensor, W: Tensor, b: Tensor, cap: float, chunk: int = VOCAB_CHUNK):
    """(first token id, softcap(x @ W[:, chunk] + b[chunk])) for each vocabulary chunk, in
    float32: the no-gradient walk the output metrics (outputs.py) take."""
    for lo in range(0, W.shape[1], chunk):
        u = torch.addmm(b[lo : lo + chunk], x, W[:, lo : lo + chunk])
        yield lo, (cap * torch.tanh(u / cap) if cap > 0 else u)


def _target_logit(x: Tensor, W: Tensor, b: Tensor, targets: Tensor, cap: float) -> tuple[Tensor, Tensor, Tensor]:
    """The target's logit, d logit / d pre-cap value, and the target's W column."""
    w_t = W[:, targets].T  # [n, d_model]
    u_t = (x * w_t).sum(-1) + b[targets]
    if cap > 0:
        t = torch.tanh(u_t / cap)
        return cap * t, 1 - t * t, w_t
    return u_t, torch.ones_like(u_t), w_t


def _cap(softcap: float | None) -> float:
    return float(softcap) if softcap is not None and softcap > 0 else 0.0


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, W: Tensor, b: Tensor, targets: Tensor, cap: float, chunk: int) -> Tensor:
        lse, grad_lse = _online_logsumexp(x, W, b, cap, chunk, with_grad=True)
        z_t, dz_t, w_t = _target_logit(x, W, b, targets, cap)
        ctx.save_for_backward(grad_lse - dz_t[:, None] * w_t)
        return lse - z_t

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
    """Cross-entropy of each row of softcap(x @ W + b) against its target, differentiable
    w.r.t. x only (W and b must be frozen)."""
    if W.requires_grad or (b is not None and b.requires_grad):
        raise ValueError("linear_cross_entropy expects a frozen unembedding")
    b = torch.zeros(W.shape[1], dtype=x.dtype, device=W.device) if b is None else b
    return _LinearCrossEntropy.apply(x, W, b, targets, _cap(softcap), chunk)


@torch.no_grad()
def log_probs(model: HookedTransformer, x: Float[Tensor, "n d_model"], targets: Int[Tensor, "n"], chunk: int = VOCAB_CHUNK) -> Float[Tensor, "n"]:
    """log p(target) under the model's unembedding, for rows already through ln_final.
    Rows go in blocks of MAX_ROWS, so the [rows, chunk] temporaries stay bounded however
    many test examples there are; W_U is read once per block."""
    W, b, cap = model.unembed.W_U, model.unembed.b_U, _cap(model.cfg.output_logits_soft_cap)
    out = []
    for lo in range(0, x.shape[0], MAX_ROWS):
        xs, ts = x[lo : lo + MAX_ROWS], targets[lo : lo + MAX_ROWS]
        lse, _ = _online_logsumexp(xs, W, b, cap, chunk, with_grad=False)
        out.append(_target_logit(xs, W, b, ts, cap)[0] - lse)
    return torch.cat(out)
