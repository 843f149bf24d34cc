"""What code made a result: the package version and, run from a checkout, the git commit.
No torch: grids record it, and results.json carries it (docs/results-format.md)."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from typing import Any


@functools.lru_cache(maxsize=1)
def provenance() -> dict[str, Any]:
    """The package version, and the git commit when run from a checkout (None otherwise):
    what a reader needs to rerun a cell with the code that made it."""
    from . import __version__

    root = Path(__file__).resolve().parent.parent
    commit, dirty = None, None
    if (root / ".git").exists():
        try:
            commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                    timeout=10, check=True).stdout.strip() or None
            status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--", "lens_iclgd"],
                                    capture_output=True, text=True, timeout=10, check=True).stdout
            dirty = bool(status.strip())
        except (OSError, subprocess.SubprocessError):
            commit, dirty = None, None
    return {"package_version": __version__, "git_commit": commit, "git_dirty": dirty}
