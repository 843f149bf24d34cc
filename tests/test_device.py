"""Devices (device.py): choosing one, one-line errors, every tensor on the model's device,
the CPU-only fast patches (fast.py), loading a model onto a device."""

import pytest
import torch

from conftest import tiny_model
from lens_iclgd import fast
from lens_iclgd.device import resolve_device
from lens_iclgd.errors import UserError
from lens_iclgd.finetune import train
from lens_iclgd.precision import BF16, FLOAT32
from lens_iclgd.prompts import build_prompts
from lens_iclgd.recording import record
from lens_iclgd.tasks import load_task


def _prompts(lm, sst2_rows, k=3, n_test=6):
    return build_prompts(lm.model, load_task("sst2"), sst2_rows["train"], sst2_rows["validation"], k=k, seed=0, n_test=n_test)


@pytest.mark.parametrize("cuda,mps,want", [(2, True, "cuda"), (0, True, "mps"), (0, False, "cpu")])
def test_auto_device_prefers_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, want):
    from lens_iclgd import device

    monkeypatch.setattr(device, "_cuda_count", lambda: cuda)
    monkeypatch.setattr(device, "_mps_available", lambda: mps)
    assert resolve_device("auto").type == want
    if cuda:
        assert resolve_device("cuda:1") == torch.device("cuda", 1)


@pytest.mark.parametrize("name,message", [("cuda", "not available here"), ("cuda:0", "not available here"),
                                          ("mps", "not available here"), ("tpu", "unknown device"), ("gpu!", "unknown device")])
def test_missing_or_unknown_device_is_a_one_line_error(monkeypatch, name, message):
    from lens_iclgd import device

    monkeypatch.setattr(device, "_cuda_count", lambda: 0)
    monkeypatch.setattr(device, "_mps_available", lambda: False)
    with pytest.raises(UserError, match=message) as err:
        resolve_device(name)
    assert "\n" not in str(err.value)


def test_pipeline_creates_every_tensor_on_the_models_device(gqa_model, sst2_rows):
    """With torch's default device set to "meta" (tensors without data), anything the
    pipeline created without following the model's device would be a meta tensor, and the
    run would fail on its first real use of it."""
    from lens_iclgd.ablation import ablation_hooks, parse_ablation

    lm = gqa_model
    p = _prompts(lm, sst2_rows)
    torch.set_default_device("meta")
    try:
        hooks = ablation_hooks(lm.model, parse_ablation("1.0", "mean"), p)
        for mode in (FLOAT32, BF16):
            rec = record(lm.model, p.icl_prefix(), p.queries, p.options, hooks=hooks, precision=mode)
            log = train(lm.model, p.demos, p.bos, "lcgd", 0.01, False, hooks=hooks, precision=mode)
            assert rec.attn_out.device.type == "cpu" and torch.isfinite(rec.option_logprobs).all()
            assert log.grad_norms.device.type == "cpu" and (log.grad_norms > 0).all()
    finally:
        torch.set_default_device(None)


def test_fast_patches_apply_only_on_the_cpu(tokenizer):
    lm = tiny_model(tokenizer, gqa=True)
    attn = lm.model.blocks[0].attn
    with fast.fast_forward(lm.model):
        assert "calculate_attention_scores" in attn.__dict__
    assert fast.prerotation_supported(lm.model)
    lm.model.to("meta", print_details=False)  # a device that is not the CPU, without a GPU
    with fast.fast_forward(lm.model):
        assert "calculate_attention_scores" not in attn.__dict__
    assert not fast.prerotation_supported(lm.model)


def test_load_model_puts_the_model_on_the_device(tiny_hf_dir):
    from lens_iclgd.models import load_model, make_baseline

    lm = load_model(str(tiny_hf_dir), device="cpu:0")
    assert next(lm.model.parameters()).device.type == "cpu"
    assert next(make_baseline(lm, "untrained", 1).model.parameters()).device.type == "cpu"
    with pytest.raises(UserError, match="unknown device"):
        load_model(str(tiny_hf_dir), device="abacus")
