"""Progress bars (tqdm, on stderr) for work that takes more than a few seconds: test
batches in a recording, SGD steps in training, cells of a grid.

Drawn only when stderr is a terminal and `--quiet` was not given, so log files and
captured output stay clean; the one-line log messages on stdout are unchanged. `disable`
is always passed explicitly: the CLI sets TQDM_DISABLE to silence third-party bars, and
ours must not follow it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")
_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def enabled() -> bool:
    return not _quiet and sys.stderr.isatty()


def bar(iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it", leave: bool = False) -> Iterable[T]:
    """`iterable`, with a progress bar when enabled."""
    if not enabled():
        return iterable
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, file=sys.stderr, disable=False, dynamic_ncols=True)


def fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
