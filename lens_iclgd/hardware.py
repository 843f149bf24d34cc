"""What this machine can do, measured: the CPU's name and kernel capability, and whether
bfloat16 matrix products are faster than float32 ones on a device.

Why measure: the CPUs this project runs on differ. On an AMD EPYC with AVX-512 and
avx512_bf16, bfloat16 matmul is 3-5x faster than float32; on one with AVX2 only, torch has
no fast bfloat16 kernel and bfloat16 matmul is 30-100x *slower* (2-core AVX2 EPYCs: 1.4
GFLOP/s against 80-149 for float32 at 2048^3, two threads). GPUs differ the same way (no bfloat16 units before
Ampere). So no bfloat16 phase runs until `bf16_probe` has timed both dtypes on the device.

`LENS_ICLGD_BF16_PROBE=fast|slow` replaces the measurement by a stated answer (tests,
and developers reproducing the other machine kind's decisions); every line that reports
the probe says so.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from functools import lru_cache

import torch

# The probe's shape: a batch of test-prompt rows through a d_model x d_model projection,
# the pipeline's typical matmul (d_model 576-896 for the offline models). On a 2-core AVX2
# EPYC float32 takes about 0.7 ms, bfloat16 about 47 ms (1.4 GFLOP/s).
PROBE_SHAPE = (128, 512, 512)  # (rows, inner, columns)
PROBE_ENV = "LENS_ICLGD_BF16_PROBE"


def _synchronize(device: torch.device):
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    if device.type == "mps":
        return torch.mps.synchronize
    return lambda: None


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo, else the platform's)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_cpu() -> dict[str, str | int]:
    """The CPU a timing was measured on: model, torch's kernel capability, threads."""
    return {"cpu": cpu_name(), "capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads()}


def cpu_line() -> str:
    d = describe_cpu()
    return f"{d['cpu']}, {d['capability']}, {d['threads']} threads"


def device_line(device: torch.device | str) -> str:
    """Where a figure was measured: the CPU (model, capability, threads) or the GPU's name."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}), host {cpu_line()}"
    return cpu_line() if device.type == "cpu" else f"{device.type}, host {cpu_line()}"


def time_matmul(n_rows: int, inner: int, cols: int, dtype: torch.dtype, device: torch.device | str,
                reps: int = 5, budget_s: float = 0.3) -> float:
    """Best seconds of one (n_rows x inner) @ (inner x cols) matmul after one warm-up call;
    stops repeating once `budget_s` is spent (a slow dtype is timed once, not `reps` times)."""
    device = torch.device(device)
    sync = _synchronize(device)
    a = torch.randn(n_rows, inner, device=device).to(dtype)
    b = torch.randn(inner, cols, device=device).to(dtype)
    t0 = time.perf_counter()
    a @ b
    sync()
    best = time.perf_counter() - t0  # the warm-up counts as a measurement of last resort
    spent = best
    for _ in range(reps):
        if spent > budget_s:
            break
        t = time.perf_counter()
        a @ b
        sync()
        dt = time.perf_counter() - t
        best, spent = min(best, dt), spent + dt
    return best


@dataclass(frozen=True)
class Bf16Probe:
    """float32 vs bfloat16 matmul time at PROBE_SHAPE on one device."""

    device: str
    float32_ms: float
    bfloat16_ms: float
    where: str  # device_line of the device
    override: str | None = None  # PROBE_ENV's value when it replaced the measurement

    @property
    def ratio(self) -> float:
        """bfloat16 time / float32 time: below 1, bfloat16 is faster."""
        return self.bfloat16_ms / self.float32_ms

    @property
    def pays_off(self) -> bool:
        return self.ratio < 1.0

    def line(self) -> str:
        if self.override:
            return f"bfloat16 probe: {PROBE_ENV}={self.override} (not measured): bfloat16 taken as {self.override}er than float32"
        rows, inner, cols = PROBE_SHAPE
        verdict = f"{1 / self.ratio:.1f}x faster" if self.pays_off else f"{self.ratio:.1f}x slower"
        return (f"bfloat16 probe ({rows}x{inner} @ {inner}x{cols} on {self.where}): float32 {self.float32_ms:.2f} ms, "
                f"bfloat16 {self.bfloat16_ms:.2f} ms: bfloat16 is {verdict}")

    def as_dict(self) -> dict:
        return {"device": self.device, "where": self.where, "shape": list(PROBE_SHAPE), "float32_ms": round(self.float32_ms, 3),
                "bfloat16_ms": round(self.bfloat16_ms, 3), "pays_off": self.pays_off, "override": self.override}


def bf16_probe(device: torch.device | str = "cpu") -> Bf16Probe:
    """Time float32 and bfloat16 matmul on `device` (once per process, device and thread
    count; about 0.15 s where bfloat16 is slow, a few ms where it is fast)."""
    device = torch.device(device)
    override = os.environ.get(PROBE_ENV, "").strip().lower() or None
    if override is not None:
        from .errors import UserError

        if override not in ("fast", "slow"):
            raise UserError(f"{PROBE_ENV}={override!r}: use fast or slow, or unset it to measure")
        return Bf16Probe(str(device), 1.0, 0.5 if override == "fast" else 2.0, device_line(device), override)
    return _measured_probe(str(device), torch.get_num_threads())


@lru_cache(maxsize=None)
def _measured_probe(device: str, threads: int) -> Bf16Probe:
    f32 = time_matmul(*PROBE_SHAPE, torch.float32, device, budget_s=0.1)
    bf16 = time_matmul(*PROBE_SHAPE, torch.bfloat16, device, budget_s=0.1)
    return Bf16Probe(device, 1e3 * f32, 1e3 * bf16, device_line(device))


def matmul_peak(seconds: float = 3.0, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                max_n: int = 2048) -> tuple[float, int]:
    """(best sustained GFLOP/s of n^3 matmuls in `dtype`, n). n is the largest of 256, 512,
    ..., max_n whose single matmul fits in a tenth of `seconds`, so the measurement takes
    about `seconds` whatever the dtype's speed (bfloat16 2048^3 takes minutes on an AVX2 CPU)."""
    device = torch.device(device)
    sync = _synchronize(device)
    n = 256
    t_one = time_matmul(n, n, n, dtype, device, reps=1)
    while 2 * n <= max_n and 8 * t_one <= seconds / 10:  # the next size costs 8x
        n *= 2
        t_one = time_matmul(n, n, n, dtype, device, reps=1)
    a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
    best, end = 2 * n**3 / t_one / 1e9, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        a @ b
        sync()
        best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best, n
