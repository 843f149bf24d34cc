"""Benchmark: the optimised pipeline against a naive reference, on one cell, in one process.

Optimised (what `run` uses): the ICL prefix's KV cache reused by batches of test
examples, sliced hooks, ln_final/unembed only on answer tokens in one vocabulary pass,
no autograd outside training, the TransformerLens patches of fast.py, and GD/LCGD losses
through the chunked vocabulary pass of vocab.py.

Naive reference: every test example's full prompt, batch 1, `run_with_cache` with full
logits; GD/LCGD losses from TransformerLens's own unembed with full logits per layer.

Printed per phase and in total: wall time, tokens/s, achieved GFLOP/s and its share of
this machine's matmul peak (measured at the start of the same run), peak memory, and the
largest difference between the two pipelines' outputs. The last line is `speedup: X`.

FLOPs are counted analytically from the model shape (matmuls and attention products of
the tokens each pipeline really feeds, causal pairs only; padding is not counted).
"""

from __future__ import annotations

import argparse
import re
import time
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch
from transformer_lens import HookedTransformerConfig

from .finetune import finetuned
from .models import DEFAULT_MODEL, kv_parameters
from .prompts import PromptSet
from .recording import Recording, record, record_reference
from .runner import RunConfig, prepare


def matmul_peak(seconds: float = 3.0, n: int = 2048) -> float:
    """Best sustained float32 matmul GFLOP/s on this machine with the current threads."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        for _ in range(4):
            a @ b
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) / 1024


def reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


# --- analytic FLOP counts -------------------------------------------------------------------


def matmul_params(cfg: HookedTransformerConfig) -> int:
    """Weights multiplied per token in one forward pass, all layers (no embeddings)."""
    groups = cfg.n_key_value_heads or cfg.n_heads
    attn = cfg.d_model * cfg.d_head * (2 * cfg.n_heads + 2 * groups)
    mlp = (3 if cfg.gated_mlp else 2) * cfg.d_model * cfg.d_mlp
    return cfg.n_layers * (attn + (0 if cfg.attn_only else mlp))


def forward_flops(cfg: HookedTransformerConfig, new: int, past: int, logit_rows: int) -> float:
    """One sequence: `new` tokens after `past` cached ones, and `logit_rows` rows of
    full-vocabulary logits."""
    pairs = new * past + new * (new + 1) / 2  # causal (query, key) pairs
    return (2 * matmul_params(cfg) * new + 4 * cfg.n_layers * cfg.n_heads * cfg.d_head * pairs
            + 2 * cfg.d_model * cfg.d_vocab * logit_rows)


def train_flops(cfg: HookedTransformerConfig, tokens: int, method: str) -> float:
    """Forward, backward to the activations, K/V weight gradients, and the vocabulary
    projection of every position (forward + backward) for one layer (GD) or all (LCGD)."""
    groups = cfg.n_key_value_heads or cfg.n_heads
    body = 2 * forward_flops(cfg, tokens, 0, 0) + 2 * tokens * cfg.d_model * 2 * groups * cfg.d_head * cfg.n_layers
    rows = (tokens - 1) * (cfg.n_layers if method == "lcgd" else 1)
    return body + 4 * cfg.d_model * cfg.d_vocab * rows


def _rows_len(p: PromptSet, q) -> list[int]:
    """Token count of each row fed after the prefix for one example."""
    return [len(q.prompt) + len(o) for j, o in enumerate(p.options) if j == 0 or len(o) > 1]


def recording_work(cfg, p: PromptSet, prefix: list[int], naive: bool) -> tuple[float, int]:
    """(FLOPs, tokens) of recording every test example after `prefix`."""
    P, flops, tokens = len(prefix), 0.0, 0
    if not naive and P:
        flops += forward_flops(cfg, P, 0, 0)
    for q in p.queries:
        for n in _rows_len(p, q):
            tokens += P + n
            if naive:
                flops += forward_flops(cfg, P + n, 0, P + n)
            else:
                flops += forward_flops(cfg, n, P, 0)
        if not naive:
            flops += 2 * cfg.d_model * cfg.d_vocab * sum(len(o) for o in p.options)
    return flops, tokens


@dataclass
class Phase:
    name: str
    seconds: float
    flops: float
    tokens: int


@dataclass
class PipelineResult:
    phases: list[Phase] = field(default_factory=list)
    recordings: dict[str, Recording] = field(default_factory=dict)
    weights: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    peak_mb: float = 0.0

    @property
    def seconds(self) -> float:
        return sum(ph.seconds for ph in self.phases)


def run_pipeline(lm, p: PromptSet, lr: float, naive: bool, batch_size: int) -> PipelineResult:
    model, cfg = lm.model, lm.model.cfg
    out = PipelineResult()

    def rec(prefix):
        if naive:
            return record_reference(model, prefix, p.queries, p.options)
        return record(model, prefix, p.queries, p.options, batch_size=batch_size)

    def timed(name: str, fn, work: tuple[float, int]):
        t = time.perf_counter()
        value = fn()
        out.phases.append(Phase(name, time.perf_counter() - t, *work))
        return value

    reset_peak_rss()
    out.recordings["zs"] = timed("ZS", lambda: rec(p.zs_prefix()), recording_work(cfg, p, p.zs_prefix(), naive))
    out.recordings["icl"] = timed("ICL", lambda: rec(p.icl_prefix()), recording_work(cfg, p, p.icl_prefix(), naive))
    for method in ("gd", "lcgd"):
        n_tokens = [len(p.bos) + len(d) for d in p.demos]
        work = (sum(train_flops(cfg, n, method) for n in n_tokens), sum(n_tokens))
        t = time.perf_counter()
        with finetuned(model, p.demos, p.bos, method, lr, lm.kv_bias, reference=naive):
            out.phases.append(Phase(f"{method.upper()} train", time.perf_counter() - t, *work))
            out.weights[method] = [q.detach().clone() for ps in kv_parameters(model, lm.kv_bias).values() for _, q in ps]
            out.recordings[method] = timed(f"{method.upper()} eval", lambda: rec(p.zs_prefix()), recording_work(cfg, p, p.zs_prefix(), naive))
    out.peak_mb = peak_rss_mb()
    return out


def profile_phases(lm, p: PromptSet, lr: float, batch_size: int, top: int = 8) -> None:
    """Where the optimised pipeline's time goes: each phase once more under the PyTorch
    profiler (separately from the timed runs, whose numbers it would distort); prints the
    operators with the most self CPU time and their share of the phase."""
    from torch.profiler import ProfilerActivity, profile

    model = lm.model

    def show(name: str, prof) -> None:
        ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in ops) or 1
        print(f"profile {name}: " + ", ".join(f"{e.key} {100 * e.self_cpu_time_total / total:.0f}%" for e in ops[:top]))

    for name, prefix in (("ZS", p.zs_prefix()), ("ICL", p.icl_prefix())):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            record(model, prefix, p.queries, p.options, batch_size=batch_size)
        show(name, prof)
    for method in ("gd", "lcgd"):
        with ExitStack() as restore:  # the trained weights are put back on leaving
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                restore.enter_context(finetuned(model, p.demos, p.bos, method, lr, lm.kv_bias))
        show(f"{method.upper()} train", prof)


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.nan_to_num(), b.nan_to_num()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _max_diff(a: Recording, b: Recording) -> float:
    """Largest relative (L2) difference over the recorded fields."""
    return max(_rel_diff(a.attn_out, b.attn_out), _rel_diff(a.attn_scores, b.attn_scores),
               _rel_diff(a.option_logprobs, b.option_logprobs))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--n-test", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--profile", action="store_true", help="also profile each optimised phase (top operators)")


def run_bench(args) -> float:
    cfg_run = RunConfig(task=args.task, model=args.model, k=args.k, n_test=args.n_test, seed=args.seed,
                        lr=args.lr, data_dir=args.data_dir).validate()

    print(f"threads: {torch.get_num_threads()}  torch {torch.__version__}")
    peak = matmul_peak()
    print(f"matmul peak (float32 2048^3, measured now): {peak:.0f} GFLOP/s", flush=True)
    inp = prepare(cfg_run)  # the same data, model and prompts as `run`
    lm, p, lr = inp.loaded, inp.prompts, inp.config.lr
    print(f"cell: {args.model} {args.task} k={p.k} n_test={len(p.queries)} lr={lr:g} "
          f"(ICL prefix {len(p.icl_prefix())} tokens, mean test prompt {sum(len(q.prompt) for q in p.queries) / len(p.queries):.1f})")

    results = {}
    for name, naive in (("optimised", False), ("naive", True)):
        print(f"running the {name} pipeline ...", flush=True)
        results[name] = run_pipeline(lm, p, lr, naive, args.batch_size)
    opt, ref = results["optimised"], results["naive"]
    # Measured again after the runs; the higher value is the peak (a conservative share).
    again = matmul_peak()
    print(f"matmul peak measured again after the runs: {again:.0f} GFLOP/s; using {max(peak, again):.0f}")
    peak = max(peak, again)

    head = f"{'phase':<12}{'optimised s':>12}{'naive s':>10}{'speedup':>9}{'opt GFLOP/s':>13}{'% peak':>8}{'naive GFLOP/s':>15}{'opt tok/s':>11}"
    print(head)
    for a, b in zip(opt.phases, ref.phases):
        print(f"{a.name:<12}{a.seconds:>12.2f}{b.seconds:>10.2f}{b.seconds / a.seconds:>8.1f}x"
              f"{a.flops / a.seconds / 1e9:>13.0f}{100 * a.flops / a.seconds / 1e9 / peak:>7.0f}%"
              f"{b.flops / b.seconds / 1e9:>15.0f}{a.tokens / a.seconds:>11.0f}")
    tokens = sum(ph.tokens for ph in opt.phases)
    print(f"{'total':<12}{opt.seconds:>12.2f}{ref.seconds:>10.2f}{ref.seconds / opt.seconds:>8.1f}x"
          f"{sum(ph.flops for ph in opt.phases) / opt.seconds / 1e9:>13.0f}"
          f"{100 * sum(ph.flops for ph in opt.phases) / opt.seconds / 1e9 / peak:>7.0f}%"
          f"{sum(ph.flops for ph in ref.phases) / ref.seconds / 1e9:>15.0f}{tokens / opt.seconds:>11.0f}")
    print(f"tokens/s (whole cell): optimised {tokens / opt.seconds:.0f}, naive {tokens / ref.seconds:.0f}")
    print(f"peak memory (VmHWM): optimised {opt.peak_mb:.0f} MB, naive {ref.peak_mb:.0f} MB")
    diffs = {s: _max_diff(opt.recordings[s], ref.recordings[s]) for s in opt.recordings}
    wdiff = {m: max(_rel_diff(a, b) for a, b in zip(opt.weights[m], ref.weights[m])) for m in opt.weights}
    print("relative difference optimised vs naive (L2): " + ", ".join(f"{s} {d:.1e}" for s, d in diffs.items())
          + ", K/V after " + ", ".join(f"{m} {d:.1e}" for m, d in wdiff.items()))
    agree = {s: (opt.recordings[s].predictions == ref.recordings[s].predictions).float().mean().item() for s in diffs}
    print("predictions identical: " + ", ".join(f"{s} {100 * v:.0f}%" for s, v in agree.items()))
    if args.profile:
        profile_phases(lm, p, lr, args.batch_size)
    speedup = ref.seconds / opt.seconds
    print(f"speedup: {speedup:.2f}")
    return speedup


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(prog="lens-iclgd bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_bench(parser.parse_args(argv))
