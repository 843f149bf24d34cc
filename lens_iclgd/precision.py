"""Numeric precision of each phase of a run: float32, bfloat16 compute, or bfloat16 in the
vocabulary pass only.

A run has four phases: the ZS recording, the ICL recording, GD/LCGD training, and the
evaluation after training (the finetuned model's recording). Each phase computes in one
mode:

- `float32`: the reference; nothing here is entered.
- `bfloat16`: autocast-style compute (`torch.autocast(device, bfloat16)`): matrix products
  in bfloat16, everything else in float32. Parameters stay float32, so the trained K/V
  weights keep float32 master copies and every SGD update (`p.add_`) is a float32 update
  (a bfloat16 weight cannot hold a 1e-5 step). Recordings are stored as float32.
- `vocab-bf16`: only the vocabulary projection (vocab.py) multiplies in bfloat16; its
  running max, sum and gradient are float32 in every mode.

Whether bfloat16 can pay off on the device is measured too, before any bfloat16 phase
runs (`require_fast_bf16`, hardware.py's probe): where bfloat16 matmul is slower than
float32 (an AVX2-only CPU: 30-100x), a bfloat16 precision stops with one line.

Where bfloat16 may go is decided by measurement (`lens-iclgd bench --precision-study`):
GD at small learning rates moves attention outputs by a few percent, which is the size of
bfloat16 rounding over many layers. The presets are data (`PRESETS`); `MIXED` names the
candidate "mixed" stands for, and `DEFAULT_PRECISION` is the default of every command.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass

import torch

from .errors import UserError
from .hardware import Bf16Probe, bf16_probe

FLOAT32, BF16, VOCAB_BF16 = "float32", "bfloat16", "vocab-bf16"
MODES = (FLOAT32, BF16, VOCAB_BF16)


@dataclass(frozen=True)
class PrecisionPolicy:
    """The mode of each phase (one of MODES)."""

    zs: str = FLOAT32
    icl: str = FLOAT32
    train: str = FLOAT32
    eval: str = FLOAT32

    def as_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


# The candidates the precision study measures; "mixed" is one of them (MIXED).
CANDIDATES: dict[str, PrecisionPolicy] = {
    "train-vocab-bf16": PrecisionPolicy(train=VOCAB_BF16),  # bf16 loss/vocabulary pass only
    "train-bf16": PrecisionPolicy(train=BF16),  # bf16 training, recordings float32
    "train-icl-bf16": PrecisionPolicy(icl=BF16, train=BF16),  # + bf16 ICL recording
    "bfloat16": PrecisionPolicy(BF16, BF16, BF16, BF16),  # everything
}
# Which candidate "mixed" is: the fastest one within fidelity in `bench --precision-study`.
# Measured (docs/precision-and-devices.md): on the bench cell (gemma-3-270m, SST-2, k 16, n-test 100,
# lr 1e-5) train-vocab-bf16 is 1.74x faster than float32 and within fidelity (largest
# per-layer metric difference 0.0047, predictions 100% identical); on MR (lr 1e-4) its
# metrics stay within 0.016 but LCGD's predictions agree on only 96% of examples.
MIXED = "train-vocab-bf16"
# The default of run, grid, bench and RunConfig: the fastest policy within fidelity on
# every measured cell. No bfloat16 policy passed on both, so the default stays float32
# and "mixed" is opt-in (results.json: precision_within_fidelity false).
from .config import DEFAULT_PRECISION, PRECISIONS  # noqa: E402 (declared with the other settings)

PRESETS: dict[str, PrecisionPolicy] = {"float32": PrecisionPolicy(), "mixed": CANDIDATES[MIXED], **CANDIDATES}
assert tuple(PRESETS) == PRECISIONS, "config.PRECISIONS must name precision.PRESETS, in order"

# The fidelity rule of the study: against float32, every per-layer metric within
# LAYER_TOLERANCE, every cell mean within MEAN_TOLERANCE, predictions agreeing on at
# least MIN_AGREEMENT of the examples.
LAYER_TOLERANCE, MEAN_TOLERANCE, MIN_AGREEMENT = 0.03, 0.01, 0.99


def check_precision(name: str) -> None:
    if name not in PRESETS:
        raise UserError(f"unknown precision {name!r}: use one of {', '.join(PRECISIONS)}")


def policy(name: str) -> PrecisionPolicy:
    check_precision(name)
    return PRESETS[name]


def within_fidelity(name: str) -> bool:
    """Is this precision at most as aggressive as the default, phase by phase? The default
    is, by the study's rule, the fastest within fidelity; anything beyond it is opt-in."""
    chosen, default = policy(name), policy(DEFAULT_PRECISION)
    return all(mode == FLOAT32 or mode == getattr(default, phase)
               for phase, mode in chosen.as_dict().items())


def uses_bf16(name: str) -> bool:
    """Does any phase of this precision compute in bfloat16?"""
    return any(mode != FLOAT32 for mode in policy(name).as_dict().values())


def require_fast_bf16(name: str, device: torch.device | str) -> Bf16Probe | None:
    """Before any phase of precision `name` runs on `device`: None for float32; else the
    bfloat16 probe if bfloat16 is faster than float32 there, else a one-line UserError."""
    if not uses_bf16(name):
        return None
    probe = bf16_probe(device)
    if not probe.pays_off:
        raise UserError(f"--precision {name} would run slower than float32 here: {probe.line()}; "
                        f"use --precision float32, or a machine whose bfloat16 matmul is faster")
    return probe


_VOCAB_LOW: ContextVar[bool] = ContextVar("lens_iclgd_vocab_bf16", default=False)


@contextmanager
def computing(mode: str, device: torch.device | str) -> Iterator[None]:
    """Run the block in this phase mode on `device` (float32: nothing changes)."""
    if mode not in MODES:
        raise UserError(f"unknown precision mode {mode!r}: use one of {', '.join(MODES)}")
    device_type = torch.device(device).type
    if mode == BF16:
        with torch.autocast(device_type, dtype=torch.bfloat16):
            yield
    elif mode == VOCAB_BF16:
        token = _VOCAB_LOW.set(True)
        try:
            yield
        finally:
            _VOCAB_LOW.reset(token)
    else:
        with nullcontext():
            yield


def vocab_matmul_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype the vocabulary pass multiplies in, None for the input's own (float32)."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return torch.bfloat16 if _VOCAB_LOW.get() else None
