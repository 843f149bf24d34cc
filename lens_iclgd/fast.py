"""Faster TransformerLens forward passes on the CPU: same arithmetic, same hooks.

TransformerLens 3.9 is written for clarity; on a CPU a few of its choices cost more than
the arithmetic itself (measured on gemma-3-270m, see docs/performance.md):

1. `GatedMLP.forward` runs `F.linear(x, W.T.contiguous())`, a transposed copy of each
   MLP weight on every call. Here: `x @ W`, no copy.
2. `GroupedQueryAttention` repeat-interleaves K and V to every query head before the
   score and value products: a copy of the whole key/value cache per call (the ICL
   prefix: ~40 MB per layer per batch). Here: one batched matmul per K/V group.
3. Rotary embeddings: TransformerLens caches keys *before* rotation and re-rotates the
   whole cache (prefix included) on every call, gathering cos/sin per batch element.
   Here the prefix cache holds keys already rotated (`rotate_cached_keys`), so only the
   new keys are rotated, with cos/sin sliced by position.

Everything is patched on the model's own module instances for the duration of a
`fast_forward(model)` block and restored afterwards. Every hook point still runs and sees
the values it would see otherwise (up to float summation order); the naive reference
(`record.record_reference`, plain TransformerLens) is what the tests compare against.
Modules whose configuration these patches do not cover keep TransformerLens's code.
"""

from __future__ import annotations

import types
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.components import GroupedQueryAttention
from transformer_lens.components.mlps.gated_mlp import GatedMLP
from transformer_lens.utilities.activation_functions import apply_softcap

from .device import model_device


def _gated_mlp_forward(self: GatedMLP, x: Tensor) -> Tensor:
    pre_act = self.hook_pre(x @ self.W_gate)  # [batch, pos, d_mlp]
    pre_linear = self.hook_pre_linear(x @ self.W_in)
    post_act = self.hook_post(self.act_fn(pre_act) * pre_linear + self.b_in)
    return torch.matmul(post_act, self.W_out) + self.b_out


def _gqa_scores(self: GroupedQueryAttention, q: Tensor, k: Tensor) -> Tensor:
    """q [batch, q_pos, head, d_head], k [batch, k_pos, kv_head, d_head] -> scores
    [batch, head, q_pos, k_pos]; head h uses K/V head h // repeat, as repeat_interleave."""
    b, n_q, n_heads, d = q.shape
    n_k, groups = k.shape[1], k.shape[2]
    q_grouped = q.permute(0, 2, 1, 3).reshape(b, groups, (n_heads // groups) * n_q, d)
    scores = (q_grouped @ k.permute(0, 2, 3, 1)).view(b, n_heads, n_q, n_k) / self.attn_scale
    return apply_softcap(scores, self.cfg.attn_scores_soft_cap)


def _gqa_z(self: GroupedQueryAttention, v: Tensor, pattern: Tensor) -> Tensor:
    b, n_heads, n_q, n_k = pattern.shape
    groups = v.shape[2]
    z = pattern.reshape(b, groups, (n_heads // groups) * n_q, n_k) @ v.permute(0, 2, 1, 3)
    return self.hook_z(z.view(b, n_heads, n_q, -1).permute(0, 2, 1, 3))


def _apply_rotary(self, x: Tensor, past_kv_pos_offset: int = 0, attention_mask=None) -> Tensor:
    cfg = self.cfg
    # Keys (offset 0) start with `_lens_rotated_prefix` positions already rotated.
    start = self._lens_rotated_prefix if past_kv_pos_offset == 0 else 0
    first = past_kv_pos_offset + start
    if (cfg.use_dynamic_ntk_rope or cfg.rotary_adjacent_pairs or x.device != self.rotary_cos.device
            or first + x.size(1) - start > self.rotary_cos.shape[0]):
        assert start == 0, "cannot fall back to TransformerLens with pre-rotated keys"
        return type(self).apply_rotary(self, x, past_kv_pos_offset, attention_mask)
    # Inputs are right-padded, so a real token's position is its index (pads are never
    # attended to and their outputs are ignored): slice cos/sin instead of gathering.
    new = x[:, start:]
    r, n = cfg.rotary_dim, new.size(1)
    cos = self.rotary_cos[None, first : first + n, None, :]
    sin = self.rotary_sin[None, first : first + n, None, :]
    x_rot = new[..., :r]
    flipped = torch.cat([-x_rot[..., r // 2 :], x_rot[..., : r // 2]], dim=-1)
    out = x_rot * cos + flipped * sin
    if r < x.size(-1):
        out = torch.cat([out, new[..., r:]], dim=-1)
    return torch.cat([x[:, :start], out], dim=1) if start else out


def on_cpu(model: HookedTransformer) -> bool:
    return model_device(model).type == "cpu"


def prerotation_supported(model: HookedTransformer) -> bool:
    """Can cached prefix keys be stored already rotated? (Not for the rotary variants
    that `_apply_rotary` hands back to TransformerLens, nor off the CPU, where
    `fast_forward` patches nothing.)"""
    cfg = model.cfg
    return (cfg.positional_embedding_type == "rotary" and not cfg.use_dynamic_ntk_rope
            and not cfg.rotary_adjacent_pairs and on_cpu(model))


@contextmanager
def fast_forward(model: HookedTransformer, rotated_prefix: int = 0) -> Iterator[None]:
    """Patch the model's modules (see the module docstring) inside the block.
    `rotated_prefix`: how many cached key positions are already rotated.
    A no-op unless the model is on the CPU: the patches are measured CPU speedups, and
    with no patch `rotated_prefix` must be 0 (see `prerotation_supported`)."""
    if not on_cpu(model):
        assert rotated_prefix == 0, "pre-rotated prefix keys need the CPU patches"
        yield
        return
    patched: list[tuple[object, str]] = []

    def patch(module, name: str, fn) -> None:
        module.__dict__[name] = types.MethodType(fn, module)
        patched.append((module, name))

    try:
        for block in model.blocks:
            mlp, attn = block.mlp, block.attn
            if type(mlp) is GatedMLP and not model.cfg.is_layer_norm_activation():
                patch(mlp, "forward", _gated_mlp_forward)
            if type(attn) is GroupedQueryAttention and not model.cfg.ungroup_grouped_query_attention:
                patch(attn, "calculate_attention_scores", _gqa_scores)
                patch(attn, "calculate_z_scores", _gqa_z)
            if model.cfg.positional_embedding_type == "rotary":
                attn._lens_rotated_prefix = rotated_prefix
                patch(attn, "apply_rotary", _apply_rotary)
        yield
    finally:
        for module, name in patched:
            module.__dict__.pop(name, None)
        for block in model.blocks:
            block.attn.__dict__.pop("_lens_rotated_prefix", None)


def rotate_cached_keys(model: HookedTransformer, cache, rotated_keys: list[Tensor]) -> None:
    """Replace each layer's cached (unrotated) prefix keys by the rotated ones captured
    from `blocks.{l}.attn.hook_rot_k`; valid only inside `fast_forward(rotated_prefix=P)`."""
    for entry, keys in zip(cache.entries, rotated_keys):
        entry.past_keys = keys


def tune_malloc() -> bool:
    """glibc malloc: keep freed memory for reuse instead of returning it to the OS and
    faulting it back in on the next allocation (large CPU forwards spent a visible share
    of their time in page faults). Same settings as the MALLOC_*_ environment variables
    in the Makefile; a no-op where glibc is not the allocator."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
        ok = libc.mallopt(m_mmap_threshold, 32 << 20) == 1
        ok &= libc.mallopt(m_trim_threshold, 16 << 30) == 1
        ok &= libc.mallopt(m_top_pad, 1 << 30) == 1
        return bool(ok)
    except (OSError, AttributeError):
        return False
