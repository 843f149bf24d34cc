"""Benchmark: the optimised pipeline against a naive reference, on one cell, in one process.

Optimised (what `run` uses): the ICL prefix's KV cache reused by batches of test
examples, sliced hooks, ln_final/unembed only on answer tokens in one vocabulary pass,
no autograd outside training, the TransformerLens patches of fast.py, and GD/LCGD losses
through the chunked vocabulary pass of vocab.py.

Naive reference: every test example's full prompt, batch 1, `run_with_cache` with full
logits; GD/LCGD losses from TransformerLens's own unembed with full logits per layer.

Printed first: the machine (CPU model, torch's kernel capability, threads; or the GPU).
Printed per phase and in total: wall time, tokens/s, achieved GFLOP/s and its share of
this machine's matmul peak (measured at the start of the same run, at the largest n^3
that takes seconds), peak memory, and the largest difference between the two pipelines'
outputs. The last line is `speedup: X`.

FLOPs are counted analytically from the model shape (matmuls and attention products of
the tokens each pipeline really feeds, causal pairs only; padding is not counted).

Precision (precision.py): `--precision-study` also runs the optimised pipeline under each
candidate policy and prints, per phase, time, speedup over float32 and GFLOP/s against
the float32 and bfloat16 matmul peaks, then each policy's metric differences from float32
(precision_study.py) and the policy the fidelity rule picks. It first prints the bfloat16
probe (hardware.py); where bfloat16 is slower than float32 on the device, no candidate can
pay off: each is listed as skipped, and the rule keeps float32. The line before the last,
`precision: ...`, is for the precision the bench was asked for (default: the default).
`--no-naive` skips the naive pipeline (minutes on a real model); its last line is then
`speedup: not measured`.
"""

from __future__ import annotations

import argparse
import re
import time
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch
from transformer_lens import HookedTransformerConfig

from .device import resolve_device
from .finetune import finetuned
from .hardware import bf16_probe, device_line, matmul_peak
from .models import kv_parameters
from .precision import CANDIDATES, FLOAT32, PrecisionPolicy, policy, require_fast_bf16, uses_bf16
from .precision_study import choose, fidelity, fidelity_table
from .prompts import PromptSet
from .recording import Recording, record, record_reference
from .config import from_args
from .inputs import prepare



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


def run_pipeline(lm, p: PromptSet, lr: float, naive: bool, batch_size: int,
                 pol: PrecisionPolicy = PrecisionPolicy(), reuse: dict | None = None) -> PipelineResult:
    """One pipeline over the cell. `pol`: the precision of each phase (optimised only).
    `reuse`: phases already computed in the same modes by an earlier call (the precision
    study shares them between policies instead of timing them again)."""
    model, cfg = lm.model, lm.model.cfg
    out = PipelineResult()
    reuse = {} if reuse is None else reuse

    def rec(prefix, mode: str):
        if naive:
            return record_reference(model, prefix, p.queries, p.options)
        return record(model, prefix, p.queries, p.options, batch_size=batch_size, precision=mode)

    def timed(name: str, fn, work: tuple[float, int]):
        t = time.perf_counter()
        value = fn()
        out.phases.append(Phase(name, time.perf_counter() - t, *work))
        return value

    reset_peak_rss()
    for setting, prefix, mode in (("zs", p.zs_prefix(), pol.zs), ("icl", p.icl_prefix(), pol.icl)):
        key = (naive, setting, mode)
        if key not in reuse:
            t = time.perf_counter()
            value = rec(prefix, mode)
            reuse[key] = ([Phase(setting.upper(), time.perf_counter() - t, *recording_work(cfg, p, prefix, naive))], value, None)
        phases, out.recordings[setting], _ = reuse[key]
        out.phases += phases
    for method in ("gd", "lcgd"):
        key = (naive, method, pol.train, pol.eval)
        if key in reuse:
            phases, out.recordings[method], out.weights[method] = reuse[key]
            out.phases += phases
            continue
        n_tokens = [len(p.bos) + len(d) for d in p.demos]
        work = (sum(train_flops(cfg, n, method) for n in n_tokens), sum(n_tokens))
        t = time.perf_counter()
        with finetuned(model, p.demos, p.bos, method, lr, lm.kv_bias, reference=naive, precision=pol.train):
            out.phases.append(Phase(f"{method.upper()} train", time.perf_counter() - t, *work))
            out.weights[method] = [q.detach().clone() for ps in kv_parameters(model, lm.kv_bias).values() for _, q in ps]
            out.recordings[method] = timed(f"{method.upper()} eval", lambda: rec(p.zs_prefix(), pol.eval), recording_work(cfg, p, p.zs_prefix(), naive))
        reuse[key] = (out.phases[-2:], out.recordings[method], out.weights[method])
    out.peak_mb = peak_rss_mb()
    return out


def warm_up(lm, p: PromptSet, lr: float, batch_size: int, pols: list[PrecisionPolicy]) -> None:
    """Run every mode the study times once on a little work (first-call allocations, the
    bfloat16 copy of W_U), so the policy timed first is not the one paying for them."""
    modes = {m for pol in pols for m in pol.as_dict().values()}
    for mode in sorted(modes):
        record(lm.model, p.zs_prefix(), p.queries[:2], p.options, batch_size=batch_size, precision=mode)
        for method in ("gd", "lcgd"):
            with finetuned(lm.model, p.demos[:1], p.bos, method, lr, lm.kv_bias, precision=mode):
                pass


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


def _phase_row(a: Phase, peak: float, b: Phase | None = None) -> str:
    gflops = a.flops / a.seconds / 1e9
    naive = f"{b.seconds:>10.2f}{b.seconds / a.seconds:>8.1f}x" if b else ""
    tail = f"{b.flops / b.seconds / 1e9:>15.0f}" if b else ""
    return f"{a.name:<12}{a.seconds:>12.2f}{naive}{gflops:>13.0f}{100 * gflops / peak:>7.0f}%{tail}{a.tokens / a.seconds:>11.0f}"


def print_naive_comparison(opt: PipelineResult, ref: PipelineResult | None, peak: float) -> None:
    """Per phase: times, GFLOP/s, share of the float32 peak, tokens/s; against the naive
    pipeline when it ran, with the largest differences between the two."""
    total = lambda r: Phase("total", r.seconds, sum(ph.flops for ph in r.phases), sum(ph.tokens for ph in r.phases))
    naive_head, naive_tail = (f"{'naive s':>10}{'speedup':>9}", f"{'naive GFLOP/s':>15}") if ref else ("", "")
    print(f"{'phase':<12}{'optimised s':>12}{naive_head}{'opt GFLOP/s':>13}{'% peak':>8}{naive_tail}{'opt tok/s':>11}")
    for i, a in enumerate(opt.phases + [total(opt)]):
        print(_phase_row(a, peak, (ref.phases + [total(ref)])[i] if ref else None))
    tokens = total(opt).tokens
    if ref is None:
        print(f"tokens/s (whole cell): optimised {tokens / opt.seconds:.0f}")
        print(f"peak memory (VmHWM): optimised {opt.peak_mb:.0f} MB")
        return
    print(f"tokens/s (whole cell): optimised {tokens / opt.seconds:.0f}, naive {tokens / ref.seconds:.0f}")
    print(f"peak memory (VmHWM): optimised {opt.peak_mb:.0f} MB, naive {ref.peak_mb:.0f} MB")
    diffs = {s: _max_diff(opt.recordings[s], ref.recordings[s]) for s in opt.recordings}
    wdiff = {m: max(_rel_diff(a, b) for a, b in zip(opt.weights[m], ref.weights[m])) for m in opt.weights}
    print("relative difference optimised vs naive (L2): " + ", ".join(f"{s} {d:.1e}" for s, d in diffs.items())
          + ", K/V after " + ", ".join(f"{m} {d:.1e}" for m, d in wdiff.items()))
    agree = {s: (opt.recordings[s].predictions == ref.recordings[s].predictions).float().mean().item() for s in diffs}
    print("predictions identical: " + ", ".join(f"{s} {100 * v:.0f}%" for s, v in agree.items()))


def print_precision_table(runs: dict[str, PipelineResult], peak32: float, peak16: float) -> None:
    """Per policy and phase: seconds, speedup over float32, GFLOP/s and its share of the
    float32 and bfloat16 matmul peaks."""
    base = {ph.name: ph for ph in runs[FLOAT32].phases}
    print(f"precision study (phases a policy runs in float32 are shared with the float32 run; "
          f"matmul peaks: float32 {peak32:.0f}, bfloat16 {peak16:.0f} GFLOP/s)")
    print(f"{'policy':<18}{'phase':<12}{'seconds':>9}{'speedup':>9}{'GFLOP/s':>9}{'% f32 peak':>12}{'% bf16 peak':>13}")
    for name, r in runs.items():
        for ph in r.phases + [Phase("total", r.seconds, sum(x.flops for x in r.phases), 0)]:
            ref = base.get(ph.name) or Phase("total", runs[FLOAT32].seconds, 0, 0)
            g = ph.flops / ph.seconds / 1e9
            print(f"{name:<18}{ph.name:<12}{ph.seconds:>9.2f}{ref.seconds / ph.seconds:>8.2f}x{g:>9.0f}"
                  f"{100 * g / peak32:>11.0f}%{100 * g / peak16:>12.0f}%")


def run_bench(args) -> float:
    cfg_run = from_args(args).validate()  # the bench cell's settings: the RunConfig fields cli.BENCH_SETTINGS names
    # the asked-for precision: one line, before the model loads, where it cannot pay off
    require_fast_bf16(args.precision, resolve_device(cfg_run.device))
    inp = prepare(cfg_run)  # the same data, model and prompts as `run`
    lm, p, lr = inp.loaded, inp.prompts, inp.config.lr
    device = next(lm.model.parameters()).device
    print(f"machine: {device_line(device)}  torch {torch.__version__}")
    names = list(CANDIDATES) if args.precision_study else []
    if args.precision != FLOAT32 and args.precision not in names:
        names.append(args.precision)
    skipped: list[str] = []
    if args.precision_study:
        probe = bf16_probe(device)
        print(probe.line(), flush=True)
        if not probe.pays_off:  # every candidate computes some phase in bfloat16
            skipped = [n for n in names if uses_bf16(n)]
            names = [n for n in names if n not in skipped]
            print(f"precision study: skipped {', '.join(skipped)} (bfloat16 is slower than float32 here: "
                  f"none can pay off); float32 only", flush=True)
    peak, n32 = matmul_peak(args.peak_seconds, device=device)
    print(f"matmul peak (float32 {n32}^3, measured now): {peak:.0f} GFLOP/s", flush=True)
    peak16, n16 = matmul_peak(args.peak_seconds, torch.bfloat16, device) if names else (float("nan"), 0)
    if names:
        print(f"matmul peak (bfloat16 {n16}^3, measured now): {peak16:.0f} GFLOP/s", flush=True)
    print(f"cell: {args.model} {args.task} k={p.k} n_test={len(p.queries)} lr={lr:g} "
          f"(ICL prefix {len(p.icl_prefix())} tokens, mean test prompt {sum(len(q.prompt) for q in p.queries) / len(p.queries):.1f})")

    reuse: dict = {}
    if names:
        warm_up(lm, p, lr, args.batch_size, [PrecisionPolicy()] + [policy(n) for n in names])
    print("running the optimised pipeline ...", flush=True)
    opt = run_pipeline(lm, p, lr, False, args.batch_size, reuse=reuse)
    ref = None
    if not args.no_naive:
        print("running the naive pipeline ...", flush=True)
        ref = run_pipeline(lm, p, lr, True, args.batch_size)
    runs = {FLOAT32: opt}
    for name in names:
        print(f"running the optimised pipeline in precision {name} ...", flush=True)
        runs[name] = run_pipeline(lm, p, lr, False, args.batch_size, policy(name), reuse)
    # Measured again after the runs; the higher value is the peak (a conservative share).
    again, _ = matmul_peak(args.peak_seconds, device=device, max_n=n32)
    print(f"matmul peak measured again after the runs: {again:.0f} GFLOP/s; using {max(peak, again):.0f}")
    peak = max(peak, again)
    if names:
        peak16 = max(peak16, matmul_peak(args.peak_seconds, torch.bfloat16, device, max_n=n16)[0])

    print_naive_comparison(opt, ref, peak)
    fids = {name: fidelity(name, opt.recordings, runs[name].recordings, args.seed) for name in names}
    if names or skipped:
        if names:
            print_precision_table(runs, peak, peak16)
            print(fidelity_table(list(fids.values()), opt.recordings))
        best = choose(list(fids.values()), {n: r.seconds for n, r in runs.items()})
        advice = (f"set precision.MIXED = {best!r} and DEFAULT_PRECISION = 'mixed'" if best != FLOAT32
                  else "no candidate is within fidelity: keep DEFAULT_PRECISION = 'float32'" if names
                  else "no candidate measured (bfloat16 slower here): keep DEFAULT_PRECISION = 'float32'")
        print(f"rule (fastest within fidelity of float32): {best} ({opt.seconds / runs[best].seconds:.2f}x); {advice}")
    if args.profile:
        profile_phases(lm, p, lr, args.batch_size)
    chosen = runs.get(args.precision, opt)
    error = fids[args.precision].max_layer_error if args.precision in fids else 0.0
    print(f"precision: cell speedup {opt.seconds / chosen.seconds:.2f} over float32, max layer error {error:.4f} ({args.precision})")
    if ref is None:
        print("speedup: not measured (--no-naive)")
        return float("nan")
    speedup = ref.seconds / opt.seconds
    print(f"speedup: {speedup:.2f}")
    return speedup


def main(argv: list[str] | None = None) -> float:
    from .cli import _add_bench_args

    parser = argparse.ArgumentParser(prog="lens-iclgd bench", description=__doc__.split("\n\n")[0])
    _add_bench_args(parser)
    return run_bench(parser.parse_args(argv))
