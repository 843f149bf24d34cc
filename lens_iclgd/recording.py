"""Recording: run test examples through the model and keep what docs/protocol.md measures.

For every test example and layer l this keeps, at the recorded position:
- `blocks.{l}.hook_attn_out`: the attention block's output vector (before it is added
  to the residual stream);
- `blocks.{l}.attn.hook_attn_scores`: each head's pre-softmax score row, over the test
  example's own tokens only (demonstrations and BOS dropped, so ICL and ZS/FT rows have
  the same length);
the mean log-probability of each answer word's tokens after the prompt (the
prediction is the best-scoring word); and, at the prediction position (the last prompt
token, whatever the recorded position), the final residual after `ln_final`: with the
frozen `unembed` it gives the whole next-token distribution (outputs.py), d_model
numbers per example instead of a vocabulary's.

Recorded position (docs/protocol.md): "answer" (default, the original code's choice) is the
first token of the first answer option fed after the prompt; "prompt" is the last prompt
token, whose next-token distribution is scored.

`record` is the fast path: the shared prefix ([BOS] or the ICL demonstrations) is run once
and its key/value cache reused by every batch of right-padded test examples; hooks copy
out only the slices above; `ln_final`/`unembed` run only where a log-prob is needed, in
one vocabulary pass for all test examples (vocab.py); no autograd. `record_reference` is the naive path (full prompt per example, batch 1, full
`run_with_cache`): the independent computation tests and the benchmark compare against.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

from .device import model_device
from .errors import UserError, check_int
from .fast import fast_forward, prerotation_supported, rotate_cached_keys
from .precision import FLOAT32, computing
from .progress import bar
from .prompts import Query
from .vocab import log_probs

from .config import DEFAULT_POSITION, POSITIONS  # noqa: E402 (declared with the other settings)

Hook = tuple[str, Callable]


def attn_out_hook(layer: int) -> str:
    return f"blocks.{layer}.hook_attn_out"


def attn_scores_hook(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_attn_scores"


@dataclass
class Recording:
    """What one setting (ZS, ICL, GD, LCGD) did to each test example."""

    attn_out: Float[Tensor, "example layer d_model"]
    attn_scores: Float[Tensor, "example layer head key"]  # NaN where a key is absent
    option_logprobs: Float[Tensor, "example option"]
    labels: Int[Tensor, "example"]
    # ln_final(resid) at the last prompt token; None in stages recorded before it was kept
    final_resid: Float[Tensor, "example d_model"] | None = None

    @property
    def predictions(self) -> Int[Tensor, "example"]:
        return self.option_logprobs.argmax(-1)

    @property
    def correct(self) -> torch.Tensor:
        return self.predictions == self.labels

    def accuracy(self) -> float:
        return self.correct.float().mean().item()

    def majority_share(self) -> float:
        return majority_share(self.predictions)


def majority_share(predictions: Int[Tensor, "example"]) -> float:
    """The share of examples on which a run predicts its most frequent option: 1.0 for a
    run that answers one label whatever the input (findings.COLLAPSED_SHARE)."""
    return float(torch.bincount(predictions).max()) / len(predictions)


def check_position(position: str) -> None:
    if position not in POSITIONS:
        raise UserError(f"unknown recorded position {position!r}: use one of {', '.join(POSITIONS)}")


def _record_index(query: Query, position: str) -> int:
    """Index, within prompt+option tokens, of the recorded position."""
    return len(query.prompt) if position == "answer" else len(query.prompt) - 1


@dataclass
class _Row:
    """One sequence fed after the prefix: a prompt followed by one option's tokens."""

    query: int
    option: int
    tokens: list[int]


def _rows(queries: Sequence[Query], options: list[list[int]]) -> list[_Row]:
    """Option 0's row serves recording and every single-token option's log-prob; an
    option of several tokens needs its own row."""
    rows = []
    for qi, q in enumerate(queries):
        rows.append(_Row(qi, 0, q.prompt + options[0]))
        rows += [_Row(qi, j, q.prompt + opt) for j, opt in enumerate(options) if j > 0 and len(opt) > 1]
    return rows


def _scored_tokens(row: _Row, query: Query, options: list[list[int]]) -> list[tuple[int, int, int]]:
    """(option, position in row, target token) for every log-prob this row provides."""
    start = len(query.prompt) - 1
    out = [(row.option, start + t, tok) for t, tok in enumerate(options[row.option])]
    if row.option == 0:
        out += [(j, start, opt[0]) for j, opt in enumerate(options) if j > 0 and len(opt) == 1]
    return out


def _finite_or_nan(x: Tensor) -> Tensor:
    # keys masked by a sliding window come out as -inf; treat them like absent keys
    return torch.where(torch.isfinite(x), x, torch.full_like(x, float("nan")))


def prefix_cache(model: HookedTransformer, prefix: list[int]) -> tuple[TransformerLensKeyValueCache | None, int]:
    """Run the shared prefix once; its keys/values serve every test example.

    Returns the cache and how many of its key positions are stored already rotated
    (rotary models: the rotated keys are captured from `blocks.{l}.attn.hook_rot_k`, so
    later passes rotate only their new keys; see fast.py)."""
    if not prefix:
        return None, 0
    cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, batch_size=1)
    tokens = torch.tensor([prefix], device=model_device(model))
    rotary = prerotation_supported(model)  # else TransformerLens rotates the cached keys itself
    rotated: list[Tensor] = [None] * model.cfg.n_layers  # type: ignore[list-item]

    def keep(act: Tensor, hook, layer: int) -> None:
        rotated[layer] = act

    keep_hooks = [(f"blocks.{l}.attn.hook_rot_k", lambda a, hook, l=l: keep(a, hook, l)) for l in range(model.cfg.n_layers)] if rotary else []
    with fast_forward(model), model.hooks(fwd_hooks=keep_hooks):
        model(tokens, attention_mask=torch.ones_like(tokens), past_kv_cache=cache, stop_at_layer=model.cfg.n_layers)
    cache.freeze()
    if rotary:
        rotate_cached_keys(model, cache, rotated)
    return cache, len(prefix) if rotary else 0


def _expand(cache: TransformerLensKeyValueCache, batch: int) -> TransformerLensKeyValueCache:
    entries = [
        TransformerLensKeyValueCacheEntry(
            e.past_keys.expand(batch, -1, -1, -1), e.past_values.expand(batch, -1, -1, -1), frozen=True
        )
        for e in cache.entries
    ]
    return TransformerLensKeyValueCache(entries, cache.previous_attention_mask.expand(batch, -1), frozen=True)


def _record_batch(model: HookedTransformer, batch: list[_Row], queries: Sequence[Query], options: list[list[int]],
                  position: str, cache, n_prefix: int, rec: Recording) -> tuple[Tensor, ...]:
    """One forward pass over right-padded rows after the cached prefix; hooks copy the
    recorded slices of option-0 rows into `rec`. Returns, for every answer token to
    score, its normalised final residual, target token, query, option, and whether it is
    the prediction position (option 0's first token: the last prompt token)."""
    cfg, dev = model.cfg, model_device(model)
    width = max(len(r.tokens) for r in batch)
    tokens = torch.zeros(len(batch), width, dtype=torch.long, device="cpu")  # built on the CPU, moved once
    mask = torch.zeros(len(batch), width, dtype=torch.long, device="cpu")
    for b, r in enumerate(batch):
        tokens[b, : len(r.tokens)] = torch.tensor(r.tokens, device="cpu")
        mask[b, : len(r.tokens)] = 1
    tokens, mask = tokens.to(dev), mask.to(dev)
    primary = [b for b, r in enumerate(batch) if r.option == 0]
    where = torch.tensor([batch[b].query for b in primary], dtype=torch.long, device=dev)
    sel = torch.tensor(primary, dtype=torch.long, device=dev)
    pos = torch.tensor([_record_index(queries[batch[b].query], position) for b in primary], dtype=torch.long, device=dev)
    n_keys = int(pos.max()) + 1 if primary else 0
    absent = torch.arange(n_keys, device=dev)[None, :] > pos[:, None]  # keys after the recorded position
    heads = torch.arange(cfg.n_heads, device=dev)

    # Under bfloat16 compute the activations are bfloat16; recordings stay float32.
    def keep_attn_out(act: Tensor, hook, layer: int) -> None:
        rec.attn_out[where, layer] = act[sel, pos].to(rec.attn_out.dtype)

    def keep_scores(act: Tensor, hook, layer: int) -> None:
        rows = act[sel[:, None], heads[None, :], pos[:, None]]  # [b, head, key]
        keys = _finite_or_nan(rows[:, :, n_prefix : n_prefix + n_keys]).to(rec.attn_scores.dtype)
        rec.attn_scores[where, layer, :, :n_keys] = keys.masked_fill(absent[:, None, :], float("nan"))

    record_hooks: list[Hook] = []
    if primary:
        for l in range(cfg.n_layers):
            record_hooks.append((attn_out_hook(l), lambda a, hook, l=l: keep_attn_out(a, hook, l)))
            record_hooks.append((attn_scores_hook(l), lambda a, hook, l=l: keep_scores(a, hook, l)))
    with model.hooks(fwd_hooks=record_hooks):
        resid = model(tokens, attention_mask=mask, stop_at_layer=cfg.n_layers,
                      past_kv_cache=_expand(cache, len(batch)) if cache is not None else None)
    scored = [(b, *s) for b, r in enumerate(batch) for s in _scored_tokens(r, queries[r.query], options)]
    bs, opts, ps, ts = (torch.tensor(col, device="cpu") for col in zip(*scored))
    qs = torch.tensor([batch[b].query for b in bs.tolist()], device="cpu")
    starts = torch.tensor([len(queries[q].prompt) - 1 for q in qs.tolist()], device="cpu")
    at_prediction = (opts == 0) & (ps == starts)
    return model.ln_final(resid[bs.to(dev), ps.to(dev)][None])[0], ts.to(dev), qs, opts, at_prediction


def _start_recording(model: HookedTransformer, queries: Sequence[Query], options: list[list[int]], position: str,
                     device: torch.device | str = "cpu") -> Recording:
    """Check the shared arguments of `record` and `record_reference`; an empty Recording
    (on `device`, where the hooks fill it)."""
    check_position(position)
    if not queries:
        raise UserError("record needs at least one test example")
    cfg, n = model.cfg, len(queries)
    max_keys = max(_record_index(q, position) for q in queries) + 1
    return Recording(
        attn_out=torch.zeros(n, cfg.n_layers, cfg.d_model, device=device),
        attn_scores=torch.full((n, cfg.n_layers, cfg.n_heads, max_keys), float("nan"), device=device),
        option_logprobs=torch.zeros(n, len(options), device="cpu"),
        labels=torch.tensor([q.label for q in queries], dtype=torch.long, device="cpu"),
        final_resid=torch.zeros(n, cfg.d_model, device="cpu"),
    )


@torch.no_grad()
def record(
    model: HookedTransformer,
    prefix: list[int],
    queries: Sequence[Query],
    options: list[list[int]],
    position: str = DEFAULT_POSITION,
    batch_size: int = 16,
    hooks: Sequence[Hook] = (),
    precision: str = FLOAT32,
) -> Recording:
    """Record every query after a shared prefix, in batches, reusing the prefix's KV cache.

    `hooks` (e.g. ablations) are active in every forward pass, the prefix's included.
    `precision`: a mode of precision.py (float32, bfloat16, vocab-bf16); the recording is
    float32 and on the CPU whatever the mode and the model's device."""
    check_int("batch_size", batch_size, 1)
    dev = model_device(model)
    rec = _start_recording(model, queries, options, position, dev)
    rows = _rows(queries, options)
    scored = []
    # Sorting by length keeps padding low; the order is fixed, so results are reproducible.
    order = sorted(range(len(rows)), key=lambda r: (len(rows[r].tokens), r))
    starts = range(0, len(order), batch_size)

    with model.hooks(fwd_hooks=list(hooks)), computing(precision, dev):
        cache, rotated = prefix_cache(model, prefix)
        with fast_forward(model, rotated_prefix=rotated):
            for start in bar(starts, "recording", total=len(starts), unit="batch"):
                batch = [rows[r] for r in order[start : start + batch_size]]
                scored.append(_record_batch(model, batch, queries, options, position, cache, len(prefix), rec))
        # All answer tokens in one vocabulary pass: W_U is read once, not once per batch.
        x, targets, qs, opts, at_prediction = (torch.cat(col) for col in zip(*scored))
        logprobs = log_probs(model, x, targets).cpu()
    rec.final_resid[qs[at_prediction]] = x[at_prediction.to(x.device)].float().cpu()
    logprob_sum = torch.zeros(rec.option_logprobs.shape, dtype=torch.float64, device="cpu")
    logprob_sum.index_put_((qs, opts), logprobs.double(), accumulate=True)
    rec.option_logprobs = (logprob_sum / torch.tensor([len(o) for o in options], dtype=torch.float64, device="cpu")).float()
    rec.attn_out, rec.attn_scores = rec.attn_out.cpu(), rec.attn_scores.cpu()
    return rec


@torch.no_grad()
def record_reference(
    model: HookedTransformer,
    prefix: list[int],
    queries: Sequence[Query],
    options: list[list[int]],
    position: str = DEFAULT_POSITION,
    hooks: Sequence[Hook] = (),
) -> Recording:
    """The naive reference: full prompt per example, batch 1, full `run_with_cache`, the
    model's own unembedding at every position. Same rows as `record` (one per example,
    plus one per multi-token answer option), nothing else shared with it."""
    cfg = model.cfg
    n_prefix = len(prefix)
    rec = _start_recording(model, queries, options, position)
    with model.hooks(fwd_hooks=list(hooks)):
        for qi, q in enumerate(queries):
            for row in _rows([q], options):
                tokens = torch.tensor([prefix + row.tokens], device=model_device(model))
                logits, cache = model.run_with_cache(tokens, attention_mask=torch.ones_like(tokens))
                logp = logits[0].log_softmax(-1).cpu()  # the recording is on the CPU
                if row.option == 0:
                    rec.final_resid[qi] = cache["ln_final.hook_normalized"][0, n_prefix + len(q.prompt) - 1].cpu()
                for j, p, tok in _scored_tokens(row, q, options):
                    rec.option_logprobs[qi, j] += logp[n_prefix + p, tok] / len(options[j])
                if row.option == 0:
                    i = _record_index(q, position)
                    for l in range(cfg.n_layers):
                        rec.attn_out[qi, l] = cache[attn_out_hook(l)][0, n_prefix + i]
                        scores = cache[attn_scores_hook(l)][0, :, n_prefix + i, n_prefix : n_prefix + i + 1]
                        rec.attn_scores[qi, l, :, : i + 1] = _finite_or_nan(scores)
                del cache
    return rec
