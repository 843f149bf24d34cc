"""Finetuning on the demonstrations: vanilla GD and layer-causal GD (LCGD).

Both (docs/protocol.md): only the attention key/value projections are trained (weights, and
biases where the pretrained model has them; GQA models hold them in `attn._W_K`,
`attn._W_V`); plain SGD, batch size 1, one pass over the k demonstrations in ICL order;
the loss of a demonstration is the next-token cross-entropy summed over all its tokens.

Loss reduction: `sum` (this project's committed cells) steps on the loss summed over the
scored tokens, so a step grows with the demonstration's length; `mean` (the paper's code:
fairseq divides the summed loss's gradient by the number of target tokens) steps on the
token-mean, for LCGD the sum over layers of each layer's token-mean. Rates for one do not
carry over to the other (they differ by about the demonstrations' token count).

Step unit: `demo` (the paper's code, the default) takes one SGD step per demonstration on
that summed loss; `token` (the paper's text for LCGD, "one token at a time") takes one step
per next-token target, in order, each on a fresh forward of the demonstration up to the
input position with the weights the previous steps left.

- GD: the usual loss on the model's output.
- LCGD: the sum over layers l of the cross-entropy of `unembed(ln_final(resid_post_l))`,
  with the model's own frozen `ln_final`/`unembed`, and every layer's input detached
  (a hook on `blocks.{l}.hook_resid_pre`), so layer l's update depends only on layer l's
  own prediction error and nothing from deeper layers reaches a shallower one.

The vocabulary projection is the expensive part (gemma-3-270m: 262k words, 18 layers):
all layers' rows go through one `vocab.linear_cross_entropy` call, which walks the
vocabulary in chunks with the softmax gradient fused into the same pass, so no layer's
full logits are ever held in memory and W_U is read once per step.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from .device import model_device
from .errors import TrainingDiverged, UserError, check_lr
from .fast import fast_forward
from .models import kv_parameters
from .precision import FLOAT32, computing
from .progress import bar
from .recording import Hook
from .vocab import linear_cross_entropy

from .config import DEFAULT_LOSS_REDUCTION, LOSS_REDUCTIONS, STEP_UNITS  # noqa: E402 (declared with the other settings)
from .config import FT_METHODS as METHODS  # noqa: E402


def _unembed_loss(model: HookedTransformer, resid: Float[Tensor, "n d_model"], targets: Tensor) -> Tensor:
    """Per-token cross-entropy of the model's own ln_final + unembed on these residuals."""
    x = model.ln_final(resid[None])[0]
    return linear_cross_entropy(x, model.unembed.W_U, model.unembed.b_U, targets, model.cfg.output_logits_soft_cap)


def _scored(rows: Float[Tensor, "pos d"], tokens: Int[Tensor, "1 pos"], next_token: Int[Tensor, "1"] | None):
    """The positions a loss scores and their targets: every next token of `tokens`, or
    (token unit) only the last position's prediction of `next_token`."""
    if next_token is None:
        return rows[:-1], tokens[0, 1:]
    return rows[-1:], next_token


def gd_losses(model: HookedTransformer, tokens: Int[Tensor, "1 pos"], next_token: Tensor | None = None) -> Float[Tensor, "1"]:
    """Vanilla GD: the summed next-token loss of the model's output (one 'layer')."""
    resid = model(tokens, attention_mask=torch.ones_like(tokens), stop_at_layer=model.cfg.n_layers)[0]
    return _unembed_loss(model, *_scored(resid, tokens, next_token)).sum()[None]


def layer_outputs(model: HookedTransformer, tokens: Int[Tensor, "1 pos"]) -> list[Float[Tensor, "1 pos d_model"]]:
    """Every layer's `hook_resid_post`, with every layer's input (`hook_resid_pre`)
    detached so that gradients never cross from one layer to another (LCGD)."""
    n_layers = model.cfg.n_layers
    resid_post: list[Tensor] = [None] * n_layers  # type: ignore[list-item]

    def keep_output(act: Tensor, hook, layer: int) -> None:
        resid_post[layer] = act

    hooks = [(f"blocks.{l}.hook_resid_pre", lambda a, hook: a.detach()) for l in range(n_layers)]
    hooks += [(f"blocks.{l}.hook_resid_post", lambda a, hook, l=l: keep_output(a, hook, l)) for l in range(n_layers)]
    with model.hooks(fwd_hooks=hooks):
        model(tokens, attention_mask=torch.ones_like(tokens), stop_at_layer=n_layers)
    return resid_post


def lcgd_losses(model: HookedTransformer, tokens: Int[Tensor, "1 pos"], next_token: Tensor | None = None) -> Float[Tensor, "layer"]:
    """LCGD: each layer's own summed next-token loss through ln_final/unembed, every
    layer's input detached."""
    scored = [_scored(r[0], tokens, next_token) for r in layer_outputs(model, tokens)]
    resid_post = [rows for rows, _ in scored]
    # All layers in one projection: the unembedding is read once per step, not once per layer.
    targets = scored[0][1].repeat(len(resid_post))
    per_token = _unembed_loss(model, torch.cat(resid_post), targets)
    return per_token.view(len(resid_post), -1).sum(-1)


def reference_losses(model: HookedTransformer, tokens: Int[Tensor, "1 pos"], method: str,
                     next_token: Tensor | None = None) -> Float[Tensor, "layer"]:
    """The straightforward version (benchmark baseline): TransformerLens's own unembed,
    full [pos, vocab] logits for every layer, F.cross_entropy."""
    import torch.nn.functional as F
    from transformer_lens.utilities.activation_functions import apply_softcap

    if method == "gd":
        logits, targets = _scored(model(tokens, attention_mask=torch.ones_like(tokens))[0], tokens, next_token)
        return F.cross_entropy(logits, targets, reduction="sum")[None]
    cap = model.cfg.output_logits_soft_cap  # applied as the model's own forward does
    scored = [_scored(apply_softcap(model.unembed(model.ln_final(r)), cap)[0], tokens, next_token) for r in layer_outputs(model, tokens)]
    return torch.stack([F.cross_entropy(x, t, reduction="sum") for x, t in scored])


_LOSSES = {"gd": gd_losses, "lcgd": lcgd_losses}


@dataclass
class FinetuneLog:
    method: str
    lr: float
    losses: Float[Tensor, "step layer"]  # GD: one column; LCGD: one per layer
    grad_norms: Float[Tensor, "layer step"]  # L2 norm of each layer's K/V gradient
    step_unit: str = "demo"  # a step per demonstration, or per next-token target
    # what each step's loss (and `losses`) is: sum or mean over targets. "sum" here, not the
    # run default: a stage pickled before this field existed was trained on the summed loss
    loss_reduction: str = "sum"


def check_loss_reduction(loss_reduction: str) -> None:
    if loss_reduction not in LOSS_REDUCTIONS:
        raise UserError(f"unknown loss reduction {loss_reduction!r}: use mean (the paper's code: token-mean per "
                        f"demonstration) or sum (summed over its tokens)")


def check_step_unit(step_unit: str) -> None:
    if step_unit not in STEP_UNITS:
        raise UserError(f"unknown step unit {step_unit!r}: use demo (one SGD step per demonstration) or token")


def sgd_steps(demos: Sequence[list[int]], bos: list[int], step_unit: str,
              device: torch.device | str = "cpu") -> list[tuple[Tensor, Tensor | None]]:
    """(input tokens, next token or None) of every SGD step, in ICL order. Demo unit: the
    whole demonstration, all its next tokens scored. Token unit: for each target t of a
    demonstration, the tokens before it, and t."""
    steps = []
    for demo in demos:
        tokens = torch.tensor([bos + demo], device=device)
        if step_unit == "demo":
            steps.append((tokens, None))
        else:
            steps += [(tokens[:, :t], tokens[0, t : t + 1]) for t in range(1, tokens.shape[1])]
    return steps


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
    reference: bool = False,
    precision: str = FLOAT32,
    step_unit: str = "demo",
    loss_reduction: str = DEFAULT_LOSS_REDUCTION,
) -> FinetuneLog:
    """One SGD pass over the demonstrations, updating K/V in place (see `finetuned`).
    `reference=True` uses the straightforward losses on plain TransformerLens.
    `precision` (a mode of precision.py) applies to each step's forward pass and loss;
    the parameters, their gradients and every update stay in the parameters' own dtype
    (float32): autocast computes in bfloat16 from float32 master weights."""
    check_method(method)
    check_lr(lr)
    check_step_unit(step_unit)
    check_loss_reduction(loss_reduction)
    if not demos:
        raise UserError("finetuning needs at least one demonstration")
    layers = kv_parameters(model, kv_bias)
    trained = [p for params in layers.values() for _, p in params]
    was_trainable = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trained:
        p.requires_grad_(True)
        p.grad = None
    dev = model_device(model)
    steps = sgd_steps(demos, bos, step_unit, dev)
    losses, norms = [], torch.zeros(model.cfg.n_layers, len(steps), device=dev)
    try:
        with model.hooks(fwd_hooks=list(hooks)), (nullcontext() if reference else fast_forward(model)):
            for step, (tokens, next_token) in bar(enumerate(steps), f"{method} training", total=len(steps), unit="step"):
                # a fresh autocast region per step: its cached low-precision copies of
                # the trained weights must not outlive the update below
                with computing(precision, dev):
                    loss = (reference_losses(model, tokens, method, next_token) if reference
                            else _LOSSES[method](model, tokens, next_token))
                if loss_reduction == "mean":  # each layer's loss over its scored targets
                    loss = loss / (tokens.shape[1] - 1 if next_token is None else 1)
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
    return FinetuneLog(method, lr, torch.stack(losses).float().cpu() if losses else torch.zeros(0, 1, device="cpu"), norms.cpu(), step_unit,
                       loss_reduction)


@contextmanager
def finetuned(
    model: HookedTransformer,
    demos: Sequence[list[int]],
    bos: list[int],
    method: str,
    lr: float,
    kv_bias: bool,
    hooks: Sequence[Hook] = (),
    reference: bool = False,
    precision: str = FLOAT32,
    step_unit: str = "demo",
    loss_reduction: str = DEFAULT_LOSS_REDUCTION,
) -> Iterator[FinetuneLog]:
    """Train K/V in place for the duration of the block, then restore the original
    weights (cheaper than copying the whole model: K/V are a few % of it)."""
    params = [p for ps in kv_parameters(model, kv_bias).values() for _, p in ps]
    saved = [p.detach().clone() for p in params]
    try:
        yield train(model, demos, bos, method, lr, kv_bias, hooks, reference, precision, step_unit, loss_reduction)
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
