"""Which device the pipeline computes on: `auto`, `cpu`, `cuda[:i]` or `mps`.

`auto` picks CUDA when it is available, else Apple's MPS, else the CPU. The device never
changes what a run means (it is not part of cell ids or stage keys), only where it runs;
the CPU-only speedups (fast.py's module patches, glibc malloc tuning) apply on the CPU only.
"""

from __future__ import annotations

import torch

from .errors import UserError

DEVICES = ("auto", "cpu", "cuda", "mps")
from .config import DEFAULT_DEVICE  # noqa: F401 (re-exported: the setting is declared in config.py)


def _cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def resolve_device(name: str | torch.device = DEFAULT_DEVICE) -> torch.device:
    """The torch device for `name`; a device that is not there is a one-line UserError."""
    if isinstance(name, torch.device):
        name = str(name)
    if name == "auto":
        if _cuda_count():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        device = None
    if device is None or device.type not in DEVICES:
        raise UserError(f"unknown device {name!r}: use one of {', '.join(DEVICES)} (cuda:N for a given GPU)")
    if device.type == "cuda" and (device.index or 0) >= _cuda_count():
        raise UserError(f"device {name!r} is not available here ({_cuda_count()} CUDA device(s)): use --device cpu or auto")
    if device.type == "mps" and not _mps_available():
        raise UserError(f"device {name!r} is not available here (no Apple MPS): use --device cpu or auto")
    return device


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's weights live: every tensor the pipeline creates goes there."""
    return next(model.parameters()).device
