"""Files on disk: atomic writes, checksums, and the cache of finished stages.

Every result is written to a temporary file in the same directory and renamed into
place, so a file is either complete or absent even if the process is killed mid-write.
Stages (ZS/ICL recordings, finetuned recordings) are saved under a key derived from
exactly the settings they depend on, so an interrupted run resumes where it stopped and
a run with different settings never picks up stale results.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import socket
import tempfile
import tomllib
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import UserError


def read_toml(path: Path, kind: str, hint: str) -> dict[str, Any]:
    """A TOML file's table; a missing or malformed file is a one-line error naming it."""
    if not path.is_file():
        raise UserError(f"{kind} {path} does not exist: {hint}")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{kind} {path} is not valid TOML ({e})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {kind} {path} ({e})") from None


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def config_key(settings: dict[str, Any]) -> str:
    """A short stable hash of plain-data settings (the identity of a stage or cell)."""
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _temp_prefix(name: str) -> str:
    # host and pid in the name: a later run can tell a dead writer's leftovers (kill -9)
    # from a live writer's file (another shard on a machine sharing the directory)
    return f".{name}.{_host()}.{os.getpid()}."


def _host() -> str:
    return socket.gethostname().replace(".", "_")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path.name), suffix=".tmp")
    except OSError as e:
        raise UserError(f"cannot write to {path.parent} ({e.strerror}): choose a writable --out directory") from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            raise UserError(f"disk full while writing {path}: free space or choose another --out directory") from e
        raise UserError(f"cannot write {path} ({e.strerror}): choose a writable --out directory") from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temp_files(root: Path) -> int:
    """Delete temporary files left by writers on this host that are no longer running."""
    host, removed = _host(), 0
    for tmp in Path(root).rglob(".*.tmp"):
        parts = tmp.name.split(".")
        try:
            pid, their_host = int(parts[-3]), parts[-4]
        except (IndexError, ValueError):
            continue
        if their_host != host:
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
            removed += 1
        except PermissionError:
            pass
    return removed


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=False, allow_nan=True) + "\n")


def atomic_torch_save(path: Path, obj: Any) -> None:
    buf = io.BytesIO()
    import torch  # here, not at the top: the report reads results without torch

    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


MIN_FREE_BYTES = 64 << 20  # a cell's recordings and tables take a few MB to tens of MB


def check_writable(directory: Path) -> Path:
    """Fail before any compute if results could not be written."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".write-test-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise UserError(f"output directory {directory} is not writable ({e.strerror}): pass a writable --out") from e
    free = shutil.disk_usage(directory).free
    if free < MIN_FREE_BYTES:
        raise UserError(f"output directory {directory} has only {free >> 20} MB free: free space or pass another --out")
    return directory


@contextmanager
def removed_if_empty_on_error(directory: Path):
    """A run that fails leaves no empty output directories behind."""
    directory = Path(directory)
    missing = [p for p in (directory, *directory.parents) if not p.exists()]
    try:
        yield
    except BaseException:
        for p in [directory / "stages", *missing]:
            try:
                p.rmdir()  # only succeeds if empty
            except OSError:
                pass
        raise


class StageStore:
    """Finished stages of a run, one file each, keyed by the settings they depend on."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, stage: str, key: str) -> Path:
        return self.root / f"{stage}-{key}.pt"

    def load(self, stage: str, key: str) -> Any | None:
        path = self.path(stage, key)
        if not path.exists():
            return None
        try:
            import torch

            blob = torch.load(path, weights_only=False)
        except Exception:
            # A file from an older, incompatible version or a damaged disk: recompute.
            path.unlink(missing_ok=True)
            return None
        if not isinstance(blob, dict) or blob.get("key") != key:
            return None
        return blob["value"]

    def save(self, stage: str, key: str, value: Any) -> None:
        atomic_torch_save(self.path(stage, key), {"key": key, "value": value})
