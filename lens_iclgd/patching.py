"""Activation patching at the prediction position: where in the model does the effect of
the demonstrations (ICL) or of finetuning on them (GD, LCGD) live?

Vocabulary (TransformerLens hook names throughout):
- the *prediction position* is the last prompt token; each answer option is scored by its
  FIRST token's logit there (`option_logits`, one column per label id);
- `last_token_activations` summarises a run (ZS: [BOS] + prompt; ICL: [BOS] demo_1 SEP ...
  demo_k SEP + prompt; GD/LCGD: the ZS prompt on a finetuned model, finetune.finetuned) by,
  at the prediction position and for every layer l, `blocks.{l}.hook_resid_pre`,
  `blocks.{l}.hook_attn_out`, `blocks.{l}.hook_mlp_out` and optionally
  `blocks.{l}.attn.hook_z`;
- layer patching (`patch_layers`): the ZS run with `blocks.{l}.hook_{c}` replaced, at the
  prediction position only, by a source run's vector; `recovered_share` says how much of
  the source's logit-diff effect that one site carries;
- head indirect effect (`head_indirect_effect`, the function-vector test of Todd et al.
  2024): on ICL prompts whose demonstration labels are shuffled (`shuffled_label_demos`),
  one head's `hook_z` at the prediction position is replaced by its mean over clean ICL
  prompts; the gain in the gold option's probability;
- task vectors (`task_vector_accuracy`, Hendel et al. 2023): the ZS run with
  `blocks.{l}.hook_resid_pre` at the prediction position replaced by the mean ICL vector.

The cheap path. Attention is causal, so a patch at the last position changes nothing at an
earlier one: per example, the shared prefix is run once into a key/value cache, the prompt
minus its last token once on top of it, and only the last token is run, as one batch of
rows over that (expanded) cache, each row patching its own site through hooks that write
only into their own batch row. A patch costs one token's forward instead of a whole
prompt's. The `*_reference` functions compute the same numbers the naive way (a full
forward of the whole prompt per patch, `transformer_lens.patching.generic_activation_patch`
or `run_with_hooks`): the independent computation the tests compare against.

The cheap path runs under fast.fast_forward with the cached keys stored already rotated
(as recording.prefix_cache does): TransformerLens would otherwise re-rotate the whole
cache, copied to every batch row, on every pass. The reference paths are plain
TransformerLens. `hooks` (e.g. ablations) are
active in every forward, caches included; a patch is applied after them at its hook point.
No autograd; results are float32 on the CPU whatever the model's device and dtype.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry
from transformer_lens.patching import generic_activation_patch
from transformer_lens.utilities.activation_functions import apply_softcap

from .device import model_device
from .errors import UserError, check_int
from .fast import fast_forward, prerotation_supported, rotate_cached_keys
from .prompts import PromptSet, Query, bos_tokens, encode
from .recording import Hook, _expand, majority_share
from .tasks import Task

COMPONENTS = ("resid_pre", "attn_out", "mlp_out")  # the d_model vectors a layer is patched at
DEFAULT_BATCH_SIZE = 128  # rows per last-token pass: layer patching of a 24-layer model is one pass
MIN_DENOMINATOR = 1e-6  # sum((source - zs)^2) below this: no effect to recover (recovered_share is NaN)


def component_hook(component: str, layer: int) -> str:
    return f"blocks.{layer}.hook_{component}"


def z_hook(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_z"


# ---------------------------------------------------------------------------------------
# Scores at the prediction position


def logit_diff(option_logits: Float[Tensor, "example *rest option"], labels: Int[Tensor, "example"]) -> Float[Tensor, "example *rest"]:
    """Gold option's logit minus the best OTHER option's: positive exactly when the gold
    option wins, and unlike the gold logit alone it ignores shifts shared by all options."""
    if option_logits.shape[-1] < 2:
        raise UserError("a logit difference needs at least two answer options")
    index = labels.to(option_logits.device).view(-1, *[1] * (option_logits.dim() - 1))
    index = index.expand(*option_logits.shape[:-1], 1)
    gold = option_logits.gather(-1, index)[..., 0]
    others = option_logits.scatter(-1, index, float("-inf")).amax(-1)
    return gold - others


def _correct(option_logits: Float[Tensor, "example *rest option"], labels: Int[Tensor, "example"]) -> Bool[Tensor, "example *rest"]:
    return option_logits.argmax(-1) == labels.to(option_logits.device).view(-1, *[1] * (option_logits.dim() - 2))


def _gold_probability(option_logits: Float[Tensor, "example *rest option"], labels: Int[Tensor, "example"]) -> Float[Tensor, "example *rest"]:
    """Softmax over the options (first-token logits) of the gold option: the answer
    restricted to the task's label words, as Todd et al. score function vectors."""
    probs = option_logits.softmax(-1)
    index = labels.to(option_logits.device).view(-1, *[1] * (option_logits.dim() - 1)).expand(*option_logits.shape[:-1], 1)
    return probs.gather(-1, index)[..., 0]


def recovered_share(patched_ld: Float[Tensor, "example *site"], zs_ld: Float[Tensor, "example"],
                    source_ld: Float[Tensor, "example"]) -> Float[Tensor, "*site"]:
    """Share of the source's effect on the logit diff that a patch recovers, per site (e.g.
    per layer): the least-squares slope, through the origin, of the patch's per-example
    effect on the source's,

        sum_i (patched_i - zs_i) (source_i - zs_i) / sum_i (source_i - zs_i)^2,

    1 where the patch reproduces the source's effect on every example, 0 where it leaves
    ZS as it was. Why not the ratio of means, mean(patched - zs) / mean(source - zs)? The
    gold-vs-best-other logit diff moves up for some examples and down for others (ICL
    moves a ZS model that prefers one label towards the other: up where the other is gold,
    down where it is not), so the mean effect can cancel to about zero while every example
    moves a lot; the ratio then explodes (smollm2-135m, SST-2, k 32: ICL's mean effect
    0.017 against a mean absolute effect 0.835). Nor a mean of per-example ratios: an
    example the source barely moves divides by about zero. The slope weights each example
    by its own effect and is undefined (NaN, not an exception) only where the source moves
    no example (sum of squares below MIN_DENOMINATOR)."""
    if not (patched_ld.shape[0] == zs_ld.shape[0] == source_ld.shape[0]):
        raise UserError(f"recovered_share: {patched_ld.shape[0]}, {zs_ld.shape[0]} and {source_ld.shape[0]} "
                        "examples; pass the same examples to all three")
    effect = (source_ld.double() - zs_ld.double()).view(-1, *[1] * (patched_ld.dim() - 1))
    patched = patched_ld.double() - zs_ld.double().view_as(effect)
    denominator = (effect ** 2).sum()
    numerator = (patched * effect).sum(0)
    if denominator < MIN_DENOMINATOR:
        return torch.full(numerator.shape, float("nan"), dtype=torch.float32, device=numerator.device)
    return (numerator / denominator).float()


# ---------------------------------------------------------------------------------------
# Checks (one-line UserErrors, before any forward pass)


def _check_inputs(model: HookedTransformer, prefix: Sequence[int], queries: Sequence[Query],
                  options: list[list[int]]) -> None:
    if not queries:
        raise UserError("patching needs at least one test example")
    if len(options) < 2 or any(not o for o in options):
        raise UserError("patching needs at least two answer options, each of at least one token")
    if model.cfg.attn_only:
        raise UserError("patching records hook_mlp_out: this model has no MLP layers")
    for q in queries:
        if not q.prompt:
            raise UserError(f"test example {q.index} has an empty prompt: there is no prediction position")
        if not 0 <= q.label < len(options):
            raise UserError(f"test example {q.index} has label {q.label} but there are {len(options)} answer options")
        if len(prefix) + len(q.prompt) > model.cfg.n_ctx:
            raise UserError(f"test example {q.index} needs {len(prefix) + len(q.prompt)} tokens after its prefix but "
                            f"the model's context holds {model.cfg.n_ctx}; use fewer demonstrations")


def _check_components(components: Sequence[str]) -> None:
    if not components or any(c not in COMPONENTS for c in components) or len(set(components)) != len(components):
        raise UserError(f"components {tuple(components)!r}: name each at most once, from {', '.join(COMPONENTS)}")


def _zs_prefix(model: HookedTransformer, prefix: Sequence[int] | None) -> list[int]:
    """The ZS prefix: `prefix`, else the model's BOS as prompts.bos_tokens gives it (the
    tokenizer says whether there is one: without a tokenizer, pass it)."""
    if prefix is not None:
        return list(prefix)
    if model.tokenizer is None:
        raise UserError("this model has no tokenizer to say what its BOS is: pass prefix= (e.g. PromptSet.zs_prefix())")
    return bos_tokens(model)


# ---------------------------------------------------------------------------------------
# Key/value caches and the last-token pass


Cache = tuple[TransformerLensKeyValueCache | None, int]  # a cache and how many of its keys are stored rotated


def _extended(model: HookedTransformer, cache: Cache, tokens: Sequence[int]) -> Cache:
    """A new frozen batch-1 cache: `cache` (or nothing) followed by `tokens`. The entries
    share `cache`'s tensors; appending concatenates into new ones, so `cache` itself stays
    as it was and serves the next example. On rotary CPU models the cached keys are stored
    already rotated (fast.py; captured from `hook_rot_k`, as recording.prefix_cache does),
    so a later pass rotates only its own new key instead of the whole cache, once per
    batch row."""
    past, rotated = cache
    if not tokens:
        return cache
    dev = model_device(model)
    if past is None:
        new = TransformerLensKeyValueCache.init_cache(model.cfg, dev, batch_size=1)
    else:
        new = TransformerLensKeyValueCache(
            [TransformerLensKeyValueCacheEntry(e.past_keys, e.past_values) for e in past.entries],
            past.previous_attention_mask)
    rotary = prerotation_supported(model)
    kept: list[Tensor] = [None] * model.cfg.n_layers  # type: ignore[list-item]

    def keep(act: Tensor, hook, layer: int) -> None:
        kept[layer] = act

    keep_hooks = [(f"blocks.{l}.attn.hook_rot_k", lambda a, hook, l=l: keep(a, hook, l))
                  for l in range(model.cfg.n_layers)] if rotary else []
    ids = torch.tensor([list(tokens)], device=dev)
    with fast_forward(model, rotated_prefix=rotated), model.hooks(fwd_hooks=keep_hooks):
        model(ids, attention_mask=torch.ones_like(ids), past_kv_cache=new, stop_at_layer=model.cfg.n_layers)
    new.freeze()
    if rotary:
        rotate_cached_keys(model, new, kept)
        return new, rotated + len(tokens)
    return new, 0


def _query_caches(model: HookedTransformer, prefix: Sequence[int],
                  queries: Sequence[Query]) -> Iterator[tuple[int, Query, Cache]]:
    """For every query, the cache of prefix + prompt minus its last token: the prefix is run
    once for all queries, each prompt once for all of its patches."""
    shared = _extended(model, (None, 0), prefix)
    for i, q in enumerate(queries):
        yield i, q, _extended(model, shared, q.prompt[:-1])


def _option_logits(model: HookedTransformer, resid: Float[Tensor, "row d_model"],
                   first: Int[Tensor, "option"]) -> Float[Tensor, "row option"]:
    """The model's own tail (ln_final, unembed, output soft-cap), on the options' first
    tokens only: a few columns of W_U instead of the whole vocabulary per row."""
    if model.cfg.normalization_type is not None:
        resid = model.ln_final(resid[None])[0]
    logits = resid @ model.unembed.W_U[:, first] + model.unembed.b_U[first]
    return apply_softcap(logits, model.cfg.output_logits_soft_cap)


def _last_token(model: HookedTransformer, cache: Cache, token: int, rows: int,
                fwd_hooks: Sequence[Hook], first: Int[Tensor, "option"]) -> Float[Tensor, "row option"]:
    """`rows` copies of the prompt's last token over the cache (expanded, not copied),
    with `fwd_hooks` active; the option logits of each row, float32 on the CPU."""
    dev = model_device(model)
    past, rotated = cache
    tokens = torch.full((rows, 1), token, dtype=torch.long, device=dev)
    with model.hooks(fwd_hooks=list(fwd_hooks)), fast_forward(model, rotated_prefix=rotated):
        resid = model(tokens, attention_mask=torch.ones_like(tokens), stop_at_layer=model.cfg.n_layers,
                      past_kv_cache=_expand(past, rows) if past is not None else None)
    return _option_logits(model, resid[:, -1], first).float().cpu()


def _first_tokens(model: HookedTransformer, options: list[list[int]]) -> Int[Tensor, "option"]:
    return torch.tensor([o[0] for o in options], dtype=torch.long, device=model_device(model))


# ---------------------------------------------------------------------------------------
# Recording a run at the prediction position


@dataclass
class LastToken:
    """One run (ZS, ICL, GD, LCGD) at the prediction position, every layer: what a patch
    takes its vectors from, and the run's own answer scores."""

    resid_pre: Float[Tensor, "example layer d_model"]
    attn_out: Float[Tensor, "example layer d_model"]
    mlp_out: Float[Tensor, "example layer d_model"]
    option_logits: Float[Tensor, "example option"]  # first-token logits
    labels: Int[Tensor, "example"]
    z: Float[Tensor, "example layer head d_head"] | None = None  # query heads (GQA included)

    def component(self, name: str) -> Float[Tensor, "example layer d_model"]:
        _check_components([name])
        return getattr(self, name)

    @property
    def logit_diff(self) -> Float[Tensor, "example"]:
        return logit_diff(self.option_logits, self.labels)

    @property
    def correct(self) -> Bool[Tensor, "example"]:
        return _correct(self.option_logits, self.labels)

    @property
    def majority_label_share(self) -> float:
        return majority_share(self.option_logits.argmax(-1))


@torch.no_grad()
def last_token_activations(model: HookedTransformer, prefix: list[int], queries: Sequence[Query],
                           options: list[list[int]], hooks: Sequence[Hook] = (), with_z: bool = False,
                           batch_size: int = 16) -> LastToken:
    """Run prefix + prompt for every query and keep, at the prediction position, every
    layer's resid_pre / attn_out / mlp_out (and hook_z with `with_z`: the per-head inputs
    of head patching, e.g. their mean over clean ICL prompts), and the option logits.
    The prefix's key/value cache is computed once and shared by all queries; the prompts
    run `batch_size` at a time, right-padded (as recording.record), sorted by length."""
    _check_inputs(model, prefix, queries, options)
    check_int("batch_size", batch_size, 1)
    cfg, n, dev = model.cfg, len(queries), model_device(model)
    first = _first_tokens(model, options)
    out = {c: torch.zeros(n, cfg.n_layers, cfg.d_model) for c in COMPONENTS}
    z = torch.zeros(n, cfg.n_layers, cfg.n_heads, cfg.d_head) if with_z else None
    logits = torch.zeros(n, len(options))
    batch: dict[str, Tensor] = {}  # the current batch's query ids and last positions, read by the hooks

    def keep(act: Tensor, hook, into: Tensor, layer: int) -> None:
        into[batch["ids"], layer] = act[batch["rows"], batch["last"]].float().cpu()

    keep_hooks = [(component_hook(c, l), lambda a, hook, t=out[c], l=l: keep(a, hook, t, l))
                  for c in COMPONENTS for l in range(cfg.n_layers)]
    if z is not None:
        keep_hooks += [(z_hook(l), lambda a, hook, l=l: keep(a, hook, z, l)) for l in range(cfg.n_layers)]
    order = sorted(range(n), key=lambda i: (len(queries[i].prompt), i))
    with model.hooks(fwd_hooks=list(hooks)):
        past, rotated = _extended(model, (None, 0), prefix)
        for lo in range(0, n, batch_size):
            ids = order[lo : lo + batch_size]
            width = max(len(queries[i].prompt) for i in ids)
            tokens = torch.zeros(len(ids), width, dtype=torch.long)
            mask = torch.zeros(len(ids), width, dtype=torch.long)
            for b, i in enumerate(ids):
                tokens[b, : len(queries[i].prompt)] = torch.tensor(queries[i].prompt)
                mask[b, : len(queries[i].prompt)] = 1
            batch.update(ids=torch.tensor(ids), rows=torch.arange(len(ids), device=dev),
                         last=torch.tensor([len(queries[i].prompt) - 1 for i in ids], device=dev))
            with model.hooks(fwd_hooks=keep_hooks), fast_forward(model, rotated_prefix=rotated):
                resid = model(tokens.to(dev), attention_mask=mask.to(dev), stop_at_layer=cfg.n_layers,
                              past_kv_cache=_expand(past, len(ids)) if past is not None else None)
            logits[batch["ids"]] = _option_logits(model, resid[batch["rows"], batch["last"]], first).float().cpu()
    labels = torch.tensor([q.label for q in queries], dtype=torch.long)
    return LastToken(out["resid_pre"], out["attn_out"], out["mlp_out"], logits, labels, z)


# ---------------------------------------------------------------------------------------
# The shared core: one batch row per patched site


@dataclass(frozen=True)
class _Site:
    """One patch: a hook point, and for `hook_z` the query head."""

    hook: str
    head: int | None = None


def _site_hooks(sites: Sequence[_Site | None], values: Tensor) -> list[Hook]:
    """Hooks for one batch: row b writes values[b] into its own row at the last position
    of sites[b]'s hook point (head `head` of hook_z); a None site is an unpatched row."""
    rows_by_hook: dict[str, list[int]] = {}
    for b, site in enumerate(sites):
        if site is not None:
            rows_by_hook.setdefault(site.hook, []).append(b)
    hooks = []
    for name, rows in rows_by_hook.items():
        idx = torch.tensor(rows, dtype=torch.long, device=values.device)
        heads = [sites[b].head for b in rows]
        head_idx = None if heads[0] is None else torch.tensor(heads, dtype=torch.long, device=values.device)
        vals = values[idx]

        def write(act: Tensor, hook, idx=idx, head_idx=head_idx, vals=vals) -> Tensor:
            act = act.clone()  # other rows (and any caller) keep the unpatched tensor
            if head_idx is None:
                act[idx, -1] = vals.to(act.dtype)
            else:
                act[idx, -1, head_idx] = vals.to(act.dtype)
            return act

        hooks.append((name, write))
    return hooks


def _patched_option_logits(model: HookedTransformer, prefix: Sequence[int], queries: Sequence[Query],
                           options: list[list[int]], sites: Sequence[_Site | None],
                           values: Float[Tensor, "example_or_1 site *vector"], hooks: Sequence[Hook],
                           batch_size: int) -> Float[Tensor, "example site option"]:
    """Option logits of prefix + prompt with each site patched in turn at the prediction
    position, by values[example, site] (or values[0, site] for every example). Per query:
    prefix + prompt[:-1] cached once, then the last token as batches of at most
    `batch_size` rows (a batch's memory grows with rows x cached positions)."""
    check_int("batch_size", batch_size, 1)
    first = _first_tokens(model, options)
    values = values.to(model_device(model))
    out = torch.zeros(len(queries), len(sites), len(options))
    with model.hooks(fwd_hooks=list(hooks)):
        for i, q, cache in _query_caches(model, prefix, queries):
            mine = values[i if values.shape[0] > 1 else 0]
            for lo in range(0, len(sites), batch_size):
                chunk = sites[lo : lo + batch_size]
                out[i, lo : lo + len(chunk)] = _last_token(
                    model, cache, q.prompt[-1], len(chunk), _site_hooks(chunk, mine[lo : lo + len(chunk)]), first)
    return out


def _layer_sites(model: HookedTransformer, components: Sequence[str]) -> list[_Site]:
    return [_Site(component_hook(c, l)) for c in components for l in range(model.cfg.n_layers)]


def _patch_layer_logits(model: HookedTransformer, prefix: Sequence[int], queries: Sequence[Query], options: list[list[int]],
                        components: Sequence[str], values: Float[Tensor, "example_or_1 component layer d_model"],
                        hooks: Sequence[Hook], batch_size: int) -> Float[Tensor, "example component layer option"]:
    """Layer patching's core, shared by `patch_layers` (a vector per example) and
    `task_vector_accuracy` (one vector for all examples)."""
    n_ex, n_c, n_l = values.shape[0], len(components), model.cfg.n_layers
    flat = values.reshape(n_ex, n_c * n_l, -1)
    logits = _patched_option_logits(model, prefix, queries, options, _layer_sites(model, components), flat, hooks, batch_size)
    return logits.view(len(queries), n_c, n_l, len(options))


# ---------------------------------------------------------------------------------------
# Layer patching


def _check_source(model: HookedTransformer, queries: Sequence[Query], source: LastToken) -> None:
    if source.resid_pre.shape[0] != len(queries):
        raise UserError(f"the source run has {source.resid_pre.shape[0]} examples but {len(queries)} are patched; "
                        "record the source on the same test examples")
    if source.resid_pre.shape[1:] != (model.cfg.n_layers, model.cfg.d_model):
        raise UserError(f"the source run has shape {tuple(source.resid_pre.shape[1:])} per example but the model has "
                        f"({model.cfg.n_layers}, {model.cfg.d_model}); record the source with this model")


def _layer_results(logits: Float[Tensor, "example component layer option"], components: Sequence[str],
                   labels: Int[Tensor, "example"]) -> dict[str, dict[str, Tensor]]:
    return {c: {"logit_diff": logit_diff(logits[:, j], labels), "correct": _correct(logits[:, j], labels),
                "option_logits": logits[:, j]} for j, c in enumerate(components)}


@torch.no_grad()
def patch_layers(model: HookedTransformer, queries: Sequence[Query], options: list[list[int]], source: LastToken,
                 components: Sequence[str] = COMPONENTS, hooks: Sequence[Hook] = (), *,
                 prefix: Sequence[int] | None = None, batch_size: int = DEFAULT_BATCH_SIZE) -> dict[str, dict[str, Tensor]]:
    """Patch the source run's vector into the ZS run, one (component, layer) at a time, at
    the prediction position only (hook `blocks.{l}.hook_{c}`).

    Returns, per component: "logit_diff" [example, layer] (the patched run's), "correct"
    [example, layer] (argmax of the options' first-token logits == label), and
    "option_logits" [example, layer, option]. `prefix`: the ZS prefix, [BOS] by default
    (prompts.bos_tokens). The cheap path (module docstring): one batch of
    len(components) x n_layers single-token rows per example."""
    components = tuple(components)
    _check_components(components)
    zs_prefix = _zs_prefix(model, prefix)
    _check_inputs(model, zs_prefix, queries, options)
    _check_source(model, queries, source)
    values = torch.stack([source.component(c) for c in components], 1)  # [example, component, layer, d_model]
    logits = _patch_layer_logits(model, zs_prefix, queries, options, components, values, hooks, batch_size)
    return _layer_results(logits, components, torch.tensor([q.label for q in queries], dtype=torch.long))


def _write_at_last(act: Tensor, index: list, vector: Tensor) -> Tensor:
    """A `generic_activation_patch` patch_setter that writes a given vector at the last
    position: not a same-shape clean cache, since an ICL source prompt is longer than the
    ZS prompt it is patched into."""
    act[:, -1] = vector.to(act.dtype)
    return act


@torch.no_grad()
def patch_layers_reference(model: HookedTransformer, queries: Sequence[Query], options: list[list[int]], source: LastToken,
                           components: Sequence[str] = COMPONENTS, hooks: Sequence[Hook] = (), *,
                           prefix: Sequence[int] | None = None) -> dict[str, dict[str, Tensor]]:
    """`patch_layers` the naive way: a full forward of the whole ZS prompt per patch,
    through `transformer_lens.patching.generic_activation_patch` (one layer axis per
    component; the "clean cache" is a mapping from hook name to the source's vector), with
    the model's own full logits."""
    components = tuple(components)
    _check_components(components)
    zs_prefix = _zs_prefix(model, prefix)
    _check_inputs(model, zs_prefix, queries, options)
    _check_source(model, queries, source)
    cfg, dev, first = model.cfg, model_device(model), [o[0] for o in options]
    logits = torch.zeros(len(queries), len(components), cfg.n_layers, len(options))
    with model.hooks(fwd_hooks=list(hooks)):
        for i, q in enumerate(queries):
            tokens = torch.tensor([zs_prefix + q.prompt], device=dev)
            for j, c in enumerate(components):
                seen: list[Tensor] = []

                def metric(full_logits: Tensor) -> Tensor:
                    seen.append(full_logits[0, -1, first].float().cpu())
                    return full_logits[0, -1, first[q.label]]

                vectors = {component_hook(c, l): source.component(c)[i, l].to(dev) for l in range(cfg.n_layers)}
                generic_activation_patch(model, tokens, vectors, metric, _write_at_last, c,
                                         index_axis_names=["layer"])
                logits[i, j] = torch.stack(seen)  # in layer order: the index grid's order
    return _layer_results(logits, components, torch.tensor([q.label for q in queries], dtype=torch.long))


# ---------------------------------------------------------------------------------------
# Task vectors (Hendel et al. 2023)


@torch.no_grad()
def task_vector_accuracy(model: HookedTransformer, queries: Sequence[Query], options: list[list[int]],
                         vectors: Float[Tensor, "layer d_model"], hooks: Sequence[Hook] = (), *,
                         prefix: Sequence[int] | None = None, batch_size: int = DEFAULT_BATCH_SIZE) -> Float[Tensor, "layer"]:
    """Per layer l, the accuracy of the ZS run with `blocks.{l}.hook_resid_pre` at the
    prediction position REPLACED by vectors[l] (the caller's mean ICL vector,
    `LastToken.resid_pre.mean(0)`): does one vector, the same for every example, carry the
    task? Layer patching's core with one source vector for all examples."""
    zs_prefix = _zs_prefix(model, prefix)
    _check_inputs(model, zs_prefix, queries, options)
    if tuple(vectors.shape) != (model.cfg.n_layers, model.cfg.d_model):
        raise UserError(f"task vectors of shape {tuple(vectors.shape)}: the model needs "
                        f"({model.cfg.n_layers}, {model.cfg.d_model}), one resid_pre vector per layer")
    logits = _patch_layer_logits(model, zs_prefix, queries, options, ("resid_pre",), vectors[None, None], hooks, batch_size)
    labels = torch.tensor([q.label for q in queries], dtype=torch.long)
    return _correct(logits[:, 0], labels).float().mean(0)


# ---------------------------------------------------------------------------------------
# Head patching, function-vector style (Todd et al. 2024)


def shuffled_label_demos(prompts: PromptSet, task: Task, train_rows: list[dict[str, Any]], model: HookedTransformer,
                         seed: int) -> list[list[int]]:
    """The same demonstration rows, in the same order, with their labels permuted: the
    corrupted ICL prompt of Todd et al., where the demonstrations still show the format but
    no longer the input-label mapping. The permutation is a seeded random cycle (Sattolo's
    algorithm): no demonstration keeps its own label slot, so whenever the labels are not
    all equal at least one demonstration's label changes. Each demonstration is re-encoded
    with `task.demonstration` (tokens of prompt + " " + the new answer word); prepend the
    BOS and join with the separator as `PromptSet.icl_prefix` does."""
    check_int("seed", seed, -(2**63))
    labels = list(prompts.demo_labels)
    rows = [dict(train_rows[r]) if 0 <= r < len(train_rows) else None for r in prompts.demo_rows]
    for i, row in enumerate(rows):
        if row is None or int(row[task.label_field]) != labels[i] or encode(model, task.demonstration(row)) != prompts.demos[i]:
            raise UserError(f"demonstration {i} (train row {prompts.demo_rows[i]}) does not match train_rows: pass the "
                            "task, training rows and model the prompts were built from")
    perm = list(range(len(labels)))
    rng = random.Random(f"shuffled-labels-{seed}")
    for i in range(len(perm) - 1, 0, -1):  # Sattolo: a uniformly random single cycle
        j = rng.randrange(i)
        perm[i], perm[j] = perm[j], perm[i]
    demos = []
    for i, row in enumerate(rows):
        row[task.label_field] = labels[perm[i]]
        demos.append(encode(model, task.demonstration(row)))
    return demos


def _check_mean_z(model: HookedTransformer, mean_z: Tensor) -> None:
    cfg = model.cfg
    if tuple(mean_z.shape) != (cfg.n_layers, cfg.n_heads, cfg.d_head):
        raise UserError(f"mean_z of shape {tuple(mean_z.shape)}: the model needs ({cfg.n_layers}, {cfg.n_heads}, "
                        f"{cfg.d_head}), hook_z per layer and query head (LastToken.z.mean(0))")


@torch.no_grad()
def head_indirect_effect(model: HookedTransformer, corrupted_prefix: list[int], queries: Sequence[Query],
                         options: list[list[int]], mean_z: Float[Tensor, "layer head d_head"], hooks: Sequence[Hook] = (), *,
                         batch_size: int = DEFAULT_BATCH_SIZE) -> Float[Tensor, "layer head"]:
    """For each (layer, head): the mean over queries of the gold option's probability
    (softmax over the options' first-token logits) on the corrupted prompt
    (corrupted_prefix + prompt) with that head's `hook_z` at the prediction position
    replaced by mean_z[layer, head], minus the same probability unpatched.

    Heads are query heads: TransformerLens's hook_z has n_heads of them in GQA models too
    (each K/V head serves n_heads / n_key_value_heads query heads), so a patch replaces one
    query head's output. Cheap path: the corrupted prefix cached once, each prompt minus
    its last token once, then n_layers x n_heads patched rows and one unpatched row of the
    last token."""
    _check_inputs(model, corrupted_prefix, queries, options)
    _check_mean_z(model, mean_z)
    cfg = model.cfg
    sites: list[_Site | None] = [_Site(z_hook(l), h) for l in range(cfg.n_layers) for h in range(cfg.n_heads)]
    values = torch.cat([mean_z.float().cpu().reshape(1, -1, cfg.d_head), torch.zeros(1, 1, cfg.d_head)], 1)  # the last row: unpatched
    logits = _patched_option_logits(model, corrupted_prefix, queries, options, sites + [None], values, hooks, batch_size)
    p = _gold_probability(logits, torch.tensor([q.label for q in queries], dtype=torch.long))
    return (p[:, :-1] - p[:, -1:]).mean(0).view(cfg.n_layers, cfg.n_heads)


@torch.no_grad()
def head_indirect_effect_reference(model: HookedTransformer, corrupted_prefix: list[int], queries: Sequence[Query],
                                   options: list[list[int]], mean_z: Float[Tensor, "layer head d_head"],
                                   hooks: Sequence[Hook] = ()) -> Float[Tensor, "layer head"]:
    """`head_indirect_effect` the naive way: per query, one plain forward of the whole
    corrupted prompt and one `run_with_hooks` per (layer, head), the model's full logits."""
    _check_inputs(model, corrupted_prefix, queries, options)
    _check_mean_z(model, mean_z)
    cfg, dev, first = model.cfg, model_device(model), [o[0] for o in options]
    total = torch.zeros(cfg.n_layers, cfg.n_heads, dtype=torch.float64)
    with model.hooks(fwd_hooks=list(hooks)):
        for q in queries:
            tokens = torch.tensor([list(corrupted_prefix) + q.prompt], device=dev)

            def gold(full_logits: Tensor) -> float:
                return full_logits[0, -1, first].float().softmax(-1)[q.label].item()

            clean = gold(model(tokens))
            for l in range(cfg.n_layers):
                for h in range(cfg.n_heads):
                    def patch(act: Tensor, hook, l=l, h=h) -> Tensor:
                        act = act.clone()
                        act[:, -1, h] = mean_z[l, h].to(act.device, act.dtype)
                        return act

                    total[l, h] += gold(model.run_with_hooks(tokens, fwd_hooks=[(z_hook(l), patch)])) - clean
    return (total / len(queries)).float()
