"""Shared fixtures: tiny HookedTransformers with a word-level tokenizer over real data.

Data. Two directories in the hub schema (`<task>/<split>.jsonl`, the six paper tasks):
- TEST_DATA = tests/data, the fixture: real rows of every split of every task, taken
  deterministically from ../shared/data by tests/data/make_fixture.py (about 210 KB; see
  tests/data/README.md). Every test that needs a few rows runs on it, whether or not the
  real data is present: the same rows on every machine, so a result in a clean clone is the
  result here, and the tokenizer below has one vocabulary everywhere.
- SHARED_DATA = ../shared/data (or $LENS_ICLGD_TEST_DATA), the full splits. Only tests that
  need the real data itself (full-split sizes, the fixture's provenance, an end-to-end
  claim on 100 examples) read it; they carry `needs_shared_data(why)` and skip with that
  reason where it is absent.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import PreTrainedTokenizerFast

from lens_iclgd.models import LoadedModel, has_kv_bias

ROOT = Path(__file__).resolve().parents[1]
# The fixture (see the module docstring): what tests pass as --data-dir / data_dir
TEST_DATA = Path(__file__).resolve().parent / "data"
# The real data: ../shared/data beside the repository; LENS_ICLGD_TEST_DATA points elsewhere
# (e.g. from a git worktree). Read only by tests marked needs_shared_data.
SHARED_DATA = Path(os.environ.get("LENS_ICLGD_TEST_DATA", ROOT.parent / "shared" / "data"))
DATA_FILES = tuple(sorted(str(f.relative_to(TEST_DATA)) for f in TEST_DATA.glob("*/*.jsonl")))  # sst2/train.jsonl, ...


def _shared_data_missing() -> str | None:
    if not SHARED_DATA.is_dir():
        return f"{SHARED_DATA} does not exist"
    missing = [f for f in DATA_FILES if not (SHARED_DATA / f).is_file()]
    return f"{SHARED_DATA} lacks {', '.join(missing)}" if missing else None


SHARED_DATA_MISSING = _shared_data_missing()


def needs_shared_data(why: str):
    """Skips a test that needs the real data, naming what it needs it for and what is missing."""
    return pytest.mark.skipif(
        SHARED_DATA_MISSING is not None,
        reason=f"needs ../shared/data (the six tasks' full splits): {why}; {SHARED_DATA_MISSING} "
               f"(set LENS_ICLGD_TEST_DATA to a copy)")


# Unit tests run on 1 thread: deterministic and fast for tiny matrices.
torch.set_num_threads(1)


def read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    rows = []
    with open(path) as f:
        for line in f:
            rows.append(json.loads(line))
            if limit is not None and len(rows) >= limit:
                break
    return rows


def word_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """Words, punctuation marks and newlines as tokens; <bos> like gemma's tokenizer."""
    pattern = r"\w+|[^\w\s]|\n"
    import re

    words = sorted({w for t in texts for w in re.findall(pattern, t)})
    vocab = {"<pad>": 0, "<bos>": 1, "<unk>": 2}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="removed", invert=True)
    # add_bos_token=True: TransformerLens would otherwise try to reload it by name
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", pad_token="<pad>", unk_token="<unk>", add_bos_token=True, name_or_path="tiny-words")


def tiny_model(tokenizer, gqa: bool = True, n_layers: int = 3, seed: int = 0, n_ctx: int = 512, biases: bool = False) -> LoadedModel:
    """A small random HookedTransformer: rotary + GQA (like gemma/llama) or GPT-2 style."""
    common = dict(n_layers=n_layers, d_model=32, d_head=8, n_heads=4, d_mlp=64, n_ctx=n_ctx,
                  d_vocab=len(tokenizer), act_fn="gelu", normalization_type="LN", seed=seed,
                  default_prepend_bos=True)
    if gqa:
        cfg = HookedTransformerConfig(**common, n_key_value_heads=2, positional_embedding_type="rotary", rotary_dim=8)
    else:
        cfg = HookedTransformerConfig(**common, positional_embedding_type="standard")
    model = HookedTransformer(cfg, tokenizer=tokenizer)
    if biases:  # a model whose pretrained attention has K/V biases (GPT-2 style)
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".attn." in name and "b_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.eval()
    return LoadedModel(model, "tiny", "test", None, kv_bias=has_kv_bias(model))


def assert_same_weights(model, reference) -> None:
    """The same parameter and buffer names, in order, with equal values."""
    assert model is not None, "no model"
    got, want = model.state_dict(), reference.state_dict()
    assert list(got) == list(want)
    for name, value in want.items():
        assert torch.equal(got[name], value), name


@pytest.fixture(scope="session")
def sst2_rows() -> dict[str, list[dict]]:
    """The first 300 rows of sst2 train and validation: all of the fixture's, which are the
    real files' first 300 (the tokenizer's vocabulary is built from them)."""
    return {s: read_jsonl(TEST_DATA / "sst2" / f"{s}.jsonl", 300) for s in ("train", "validation")}


@pytest.fixture(scope="session")
def tokenizer(sst2_rows):
    texts = [r["sentence"] for rows in sst2_rows.values() for r in rows]
    texts += ["Sentence: Label: Negative Positive terrible bad neutral good great Review: Sentiment:"]
    return word_tokenizer(texts)


@pytest.fixture
def gqa_model(tokenizer) -> LoadedModel:
    return tiny_model(tokenizer, gqa=True)


@pytest.fixture
def std_model(tokenizer) -> LoadedModel:
    return tiny_model(tokenizer, gqa=False, biases=True)


def run_cli(args: list[str], env_extra: dict | None = None, timeout: int = 600):
    import subprocess

    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "lens_iclgd.cli", *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


def cli_in_process(args: list[str], capsys) -> tuple[int, str, str]:
    """`lens-iclgd ARGS` in this process: (exit code, stdout, stderr). The same main() as
    the console script, without a new interpreter importing torch and TransformerLens
    (10 s a call on a 2-core AVX2 machine); tests of the process boundary itself (exit codes
    on usage errors, --debug tracebacks) use run_cli. The logging, warning and environment
    settings main() makes are put back afterwards."""
    import logging
    import warnings

    from lens_iclgd.cli import main

    root = logging.getLogger()
    handlers, level, environ = root.handlers[:], root.level, dict(os.environ)
    capsys.readouterr()
    try:
        with warnings.catch_warnings():
            try:
                code = main(args)
            except SystemExit as e:  # argparse's usage errors
                code = e.code
    finally:
        root.handlers[:], root.level = handlers, level
        os.environ.clear()
        os.environ.update(environ)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny random Llama-architecture model saved as a local Hugging Face directory, so
    the real CLI can run end to end in seconds (and the local-directory loader is used)."""
    folder = tmp_path_factory.mktemp("tiny_hf_model")  # no "llama" in the path: TL would branch on the name
    return save_tiny_llama(folder, tokenizer, n_layers=2, seed=0)


def grid_file(path: Path, models: list, data_dir: Path, **over) -> Path:
    """A grid config file at `path` (the defaults: one task, two seeds, GD and LCGD at the
    default rates, k 3, n-test 6), `over` replacing or adding keys."""
    settings = {"name": "tiny", "models": [str(m) for m in models], "tasks": ["sst2"], "seeds": [0, 1],
                "methods": ["gd", "lcgd"], "lrs": ["default"], "k": 3, "n_test": 6, "data_dir": str(data_dir)}
    settings.update(over)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in settings.items()) + "\n")
    return path


def save_tiny_llama(folder: Path, tokenizer, n_layers: int, seed: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.pad_token_id,
                      pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
