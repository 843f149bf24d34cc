"""Output-level comparisons: what two settings do to the next-token distribution.

Shen, Mishra and Khashabi (ICML 2024) compare ICL and GD at the model's output rather
than inside it. Their code is not public; the definitions below are this project's own
(docs/metrics.md says them in words). For a test example, p_A and p_B are the next-token
distributions of settings A and B (ZS, ICL, GD, LCGD) at the prediction position, the
last prompt token, over the whole vocabulary:

- top-K token overlap: |T_A & T_B| / max(|T_A|, |T_B|), where T_X is the set of the K
  most probable tokens with non-zero probability (ties: the lower token id first). When
  both distributions have at least K such tokens this is |T_A & T_B| / K.
- overlap cosine: the cosine of (p_A(t))_t and (p_B(t))_t over t in T_A & T_B; 0 when
  the two sets share no token (a single shared token gives 1, as the definition implies).
- KL(p_A || p_B) and the Jensen-Shannon divergence (in nats, at most ln 2).
- top-1 token accuracy of one setting: its most probable token over the whole vocabulary
  (ties: the lower id) equals the first token of the gold answer.

Every distribution is rebuilt from the recorded `final_resid` (already through
`ln_final`) and the model's frozen `unembed`, one vocabulary chunk at a time: nothing
ever holds [rows, vocabulary] logits (vocab.py). Two passes: the first finds each row's
log-normaliser and top K, the second sums KL and JS.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .config import DEFAULT_TOP_K
from .errors import check_int
from .vocab import VOCAB_CHUNK, logit_chunks

PAIR_METRICS = ("top_k_overlap", "overlap_cosine", "kl", "js")
ROWS_PER_PASS = 1024  # [rows, chunk] temporaries of 32 MB at chunk 8192


@dataclass
class NextToken:
    """Per row: the log-normaliser, and the top K tokens' ids and logits (-inf where a
    token has zero probability), most probable first."""

    lse: Float[Tensor, "row"]
    top_ids: Int[Tensor, "row k"]
    top_logits: Float[Tensor, "row k"]


def _top_k(x: Float[Tensor, "row d_model"], W: Tensor, b: Tensor, cap: float, k: int, chunk: int) -> NextToken:
    n = x.shape[0]
    run_max = torch.full((n,), float("-inf"), device=x.device)
    run_sum = torch.zeros(n, device=x.device)
    top_v = torch.full((n, 0), float("-inf"), device=x.device)
    top_i = torch.zeros((n, 0), dtype=torch.long, device=x.device)
    for lo, z in logit_chunks(x, W, b, cap, chunk):
        new_max = torch.maximum(run_max, z.max(-1).values)
        finite = torch.isfinite(new_max)
        scale = torch.where(finite, torch.exp(run_max - new_max), torch.zeros_like(new_max))
        e = torch.where(finite[:, None], torch.exp(z - new_max[:, None]), torch.zeros_like(z))
        run_sum, run_max = run_sum * scale + e.sum(-1), new_max
        # Candidates in increasing token id (earlier chunks' winners carry lower ids and
        # are kept in id order among equals), so a stable sort breaks ties by lower id.
        ids = torch.arange(lo, lo + z.shape[1], device=x.device).expand(n, -1)
        vals, order = torch.cat([top_v, z], 1).sort(dim=1, descending=True, stable=True)
        top_v, top_i = vals[:, :k], torch.cat([top_i, ids], 1).gather(1, order[:, :k])
    return NextToken(run_max + torch.log(run_sum), top_i, top_v)


def _divergences(xa: Tensor, xb: Tensor, lse_a: Tensor, lse_b: Tensor, W: Tensor, b: Tensor, cap: float,
                 chunk: int) -> tuple[Tensor, Tensor]:
    """Per row: KL(p_A || p_B) and JS(p_A, p_B), summed over vocabulary chunks."""
    kl = torch.zeros(xa.shape[0], dtype=torch.float64, device=xa.device)
    js = torch.zeros_like(kl)
    for (_, za), (_, zb) in zip(logit_chunks(xa, W, b, cap, chunk), logit_chunks(xb, W, b, cap, chunk)):
        la, lb = za - lse_a[:, None], zb - lse_b[:, None]
        pa, pb = la.exp(), lb.exp()
        lm = torch.logaddexp(la, lb) - math.log(2)
        # 0 log 0 = 0: a token one distribution gives no probability adds nothing to its term
        kl += torch.where(pa > 0, pa * (la - lb), torch.zeros_like(pa)).sum(-1, dtype=torch.float64)
        js_terms = torch.where(pa > 0, pa * (la - lm), torch.zeros_like(pa)) + torch.where(pb > 0, pb * (lb - lm), torch.zeros_like(pb))
        js += 0.5 * js_terms.sum(-1, dtype=torch.float64)
    return kl.float(), js.float()


def _overlap(a: NextToken, b: NextToken) -> tuple[Tensor, Tensor]:
    """Per row: top-K overlap and overlap cosine (definitions in the module docstring)."""
    valid_a, valid_b = torch.isfinite(a.top_logits), torch.isfinite(b.top_logits)
    match = (a.top_ids[:, :, None] == b.top_ids[:, None, :]) & valid_a[:, :, None] & valid_b[:, None, :]
    shared_a = match.any(-1)  # [row, k]: a's i-th token is also among b's
    denom = torch.maximum(valid_a.sum(-1), valid_b.sum(-1)).clamp(min=1)
    overlap = shared_a.sum(-1) / denom
    pa = torch.where(shared_a, (a.top_logits - a.lse[:, None]).exp(), torch.zeros_like(a.top_logits))
    pb_full = torch.where(valid_b, (b.top_logits - b.lse[:, None]).exp(), torch.zeros_like(b.top_logits))
    pb = (match.float() @ pb_full[:, :, None])[..., 0]  # b's probability of a's i-th token, where shared
    norm = pa.norm(dim=-1) * pb.norm(dim=-1)
    cosine = torch.where(norm > 0, (pa * pb).sum(-1) / norm.clamp(min=1e-30), torch.zeros_like(norm))
    return overlap.float(), cosine.float()


def _blocks(n: int, rows: int) -> Iterator[slice]:
    for lo in range(0, n, rows):
        yield slice(lo, lo + rows)


@torch.no_grad()
def output_metrics(
    unembed_W: Float[Tensor, "d_model vocab"],
    unembed_b: Float[Tensor, "vocab"] | None,
    final_resid: dict[str, Float[Tensor, "example d_model"]],
    gold_first_token: Int[Tensor, "example"],
    pairs: Sequence[tuple[str, str]],
    top_k: int = DEFAULT_TOP_K,
    softcap: float | None = None,
    chunk: int = VOCAB_CHUNK,
) -> dict[str, dict[str, Tensor]]:
    """Per example, for every setting its top-1 token correctness, and for every pair
    (A, B) the four PAIR_METRICS (KL and JS with A as the reference, KL(p_A || p_B)).

    Returns {"token_correct": {setting: bool[example]}, "pairs": {"A-B": {metric: [example]}}}
    on the CPU. `final_resid` rows are already through ln_final."""
    check_int("top_k", top_k, 1)
    W = unembed_W.detach().float()
    b = torch.zeros(W.shape[1], device=W.device) if unembed_b is None else unembed_b.detach().float()
    cap = float(softcap) if softcap else 0.0
    names = list(final_resid)
    n = gold_first_token.shape[0]
    token_correct = {s: torch.zeros(n, dtype=torch.bool) for s in names}
    out = {f"{a}-{b_}": {m: torch.zeros(n) for m in PAIR_METRICS} for a, b_ in pairs}
    per_block = max(1, ROWS_PER_PASS // max(1, len(names)))
    for rows in _blocks(n, per_block):
        xs = {s: final_resid[s][rows].to(W.device).float() for s in names}
        stacked = torch.cat([xs[s] for s in names])
        top = _top_k(stacked, W, b, cap, top_k, chunk)
        m = xs[names[0]].shape[0]
        per = {s: NextToken(top.lse[i * m:(i + 1) * m], top.top_ids[i * m:(i + 1) * m], top.top_logits[i * m:(i + 1) * m])
               for i, s in enumerate(names)}
        gold = gold_first_token[rows].to(W.device)
        for s in names:
            token_correct[s][rows] = (per[s].top_ids[:, 0] == gold).cpu()
        for a, b_ in pairs:
            kl, js = _divergences(xs[a], xs[b_], per[a].lse, per[b_].lse, W, b, cap, chunk)
            overlap, cosine = _overlap(per[a], per[b_])
            for name, v in zip(PAIR_METRICS, (overlap, cosine, kl, js)):
                out[f"{a}-{b_}"][name][rows] = v.cpu()
    return {"token_correct": token_correct, "pairs": out}

