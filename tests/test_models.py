"""Models (models.py): baselines keep exactly the parameters docs/protocol.md says; K/V parameter
selection; damaged model caches are detected and rebuilt."""

import pytest
import torch

from conftest import assert_same_weights, tiny_model
from lens_iclgd import models
from lens_iclgd.errors import UserError
from lens_iclgd.models import check_model_name, kept_by_embeddings_baseline, kv_parameters, make_baseline
from lens_iclgd.store import sha256_file


def _differs(a, b):
    return not torch.equal(a, b)


def _pretrained_like(tokenizer, gqa):
    """A tiny model whose every parameter (norms and biases too) differs from a fresh
    init, so 'kept' and 're-initialised' cannot pass by accident."""
    lm = tiny_model(tokenizer, gqa=gqa, biases=not gqa)
    with torch.no_grad():
        for p in lm.model.parameters():
            p.add_(0.5)
    return lm


@pytest.mark.parametrize("gqa", [True, False])
def test_embeddings_baseline_keeps_embeddings_unembedding_and_norms(tokenizer, gqa):
    trained = _pretrained_like(tokenizer, gqa)
    base = make_baseline(trained, "embeddings", seed=3)
    old = {n: p.detach() for n, p in trained.model.named_parameters()}
    new = base.model.state_dict()
    kept = {n for n in old if kept_by_embeddings_baseline(n)}
    assert {"embed.W_E", "unembed.W_U", "unembed.b_U", "ln_final.w", "blocks.0.ln1.w", "blocks.0.ln2.w"} <= kept
    if not gqa:
        assert "pos_embed.W_pos" in kept
    for name in old:
        if name in kept:
            assert torch.equal(old[name], new[name]), f"{name} should be kept"
        else:
            assert _differs(old[name], new[name]), f"{name} should be re-initialised"
    assert base.baseline == "embeddings" and base.kv_bias == trained.kv_bias


def test_untrained_baseline_reinitialises_everything_with_a_seed(tokenizer):
    trained = _pretrained_like(tokenizer, gqa=False)
    a = make_baseline(trained, "untrained", seed=1).model.state_dict()
    b = make_baseline(trained, "untrained", seed=1).model.state_dict()
    c = make_baseline(trained, "untrained", seed=2).model.state_dict()
    for name, p in trained.model.named_parameters():
        assert _differs(p.detach(), a[name]), f"{name} kept in the untrained baseline"
        assert torch.equal(a[name], b[name]), "same seed, same weights"
    assert _differs(a["blocks.0.attn.W_Q"], c["blocks.0.attn.W_Q"])


def test_trained_baseline_is_the_model(gqa_model):
    assert make_baseline(gqa_model, "trained", 0) is gqa_model


def test_kv_parameters_gqa_and_standard(tokenizer):
    gqa = tiny_model(tokenizer, gqa=True)
    names = [n for ps in kv_parameters(gqa.model, include_bias=False).values() for n, _ in ps]
    assert names == [f"blocks.{l}.attn.{w}" for l in range(3) for w in ("_W_K", "_W_V")]
    std = tiny_model(tokenizer, gqa=False, biases=True)
    names = {n for ps in kv_parameters(std.model, include_bias=True).values() for n, _ in ps}
    assert names == {f"blocks.{l}.attn.{w}" for l in range(3) for w in ("W_K", "W_V", "b_K", "b_V")}
    assert std.kv_bias and not gqa.kv_bias


@pytest.mark.parametrize("name", ["no-such-model", "gemma-9-ultra"])
def test_unknown_model_is_a_user_error(name):
    with pytest.raises(UserError, match="unknown model"):
        check_model_name(name)


def test_bad_baseline(gqa_model):
    with pytest.raises(UserError, match="unknown baseline"):
        make_baseline(gqa_model, "half-trained", 0)


def test_corrupt_or_truncated_gguf_is_fetched_again(tmp_path, monkeypatch):
    monkeypatch.setenv("LENS_ICLGD_CACHE", str(tmp_path))
    spec = models.OFFLINE_MODELS["smollm2-135m"]
    path = models.fetch_offline_file(spec)
    assert sha256_file(path) == spec.sha256
    with open(path, "r+b") as f:  # truncate
        f.truncate(1000)
    assert sha256_file(models.fetch_offline_file(spec)) == spec.sha256
    with open(path, "r+b") as f:  # flip a byte
        f.seek(5000)
        byte = f.read(1)
        f.seek(5000)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert sha256_file(models.fetch_offline_file(spec)) == spec.sha256


def test_corrupt_converted_weights_are_detected(tmp_path, monkeypatch, tokenizer):
    monkeypatch.setenv("LENS_ICLGD_CACHE", str(tmp_path))
    spec = models.OfflineModel("tiny-test", (), (), "tiny.gguf", "0" * 64, None, True, "test")
    lm = tiny_model(tokenizer)
    models._save_converted(spec, lm.model)
    assert_same_weights(models._load_converted(spec), lm.model)
    weights = models.converted_dir(spec) / "model.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert models._load_converted(spec) is None  # checksum mismatch: reconverted by the caller
    assert not models.converted_dir(spec).exists()
