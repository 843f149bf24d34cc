"""Precision policies (precision.py) on tiny models: float32 bit for bit, bfloat16 training
and recording, stage keys and cell ids, the bfloat16 probe's verdict before any compute."""

import copy
import json
from contextlib import nullcontext

import pytest
import torch

from conftest import tiny_model
from lens_iclgd import finetune, recording, vocab
from lens_iclgd.errors import UserError
from lens_iclgd.finetune import train
from lens_iclgd.models import kv_parameters
from lens_iclgd.precision import BF16, FLOAT32, VOCAB_BF16, computing, policy, within_fidelity
from lens_iclgd.prompts import build_prompts
from lens_iclgd.recording import record
from lens_iclgd.tasks import load_task


def _prompts(lm, sst2_rows, k=3, n_test=6):
    return build_prompts(lm.model, load_task("sst2"), sst2_rows["train"], sst2_rows["validation"], k=k, seed=0, n_test=n_test)


def _kv(model):
    return [q for ps in kv_parameters(model, True).values() for _, q in ps]


# --- precision ------------------------------------------------------------------------------


def test_float32_is_bit_for_bit_the_path_without_precision_code(tokenizer, sst2_rows, monkeypatch):
    """precision="float32" must give exactly what the pipeline gave before precision modes
    existed: the same run with every precision hook replaced by nothing at all."""
    lm = tiny_model(tokenizer, gqa=False, biases=True)
    p = _prompts(lm, sst2_rows)
    plain = copy.deepcopy(lm.model)

    def outputs(model, **kw):
        recs = [record(model, pre, p.queries, p.options, **kw) for pre in (p.zs_prefix(), p.icl_prefix())]
        log = train(model, p.demos, p.bos, "lcgd", 0.05, True, **kw)
        recs.append(record(model, p.zs_prefix(), p.queries, p.options, **kw))
        return recs, log, [q.detach().clone() for q in _kv(model)]

    with_precision = outputs(lm.model, precision=FLOAT32)
    monkeypatch.setattr(recording, "computing", lambda mode, device: nullcontext())
    monkeypatch.setattr(finetune, "computing", lambda mode, device: nullcontext())
    monkeypatch.setattr(vocab, "vocab_matmul_dtype", lambda device: None)
    without = outputs(plain)
    for a, b in zip(with_precision[0], without[0]):
        for field in ("attn_out", "attn_scores", "option_logprobs"):
            x, y = getattr(a, field), getattr(b, field)
            assert torch.equal(x.nan_to_num(), y.nan_to_num()) and torch.equal(x.isnan(), y.isnan()), field
    assert torch.equal(with_precision[1].losses, without[1].losses)
    assert torch.equal(with_precision[1].grad_norms, without[1].grad_norms)
    for a, b in zip(with_precision[2], without[2]):
        assert torch.equal(a, b)


def test_bf16_training_keeps_float32_master_weights_and_tiny_steps(tokenizer, sst2_rows):
    lm = tiny_model(tokenizer, gqa=True)
    p = _prompts(lm, sst2_rows)
    before = [q.detach().clone() for q in _kv(lm.model)]
    ref = copy.deepcopy(lm.model)
    lr = 1e-5
    # the summed loss: the step sizes this test was built around (the mean's are ~20x smaller)
    train(lm.model, p.demos, p.bos, "gd", lr, False, precision=BF16, loss_reduction="sum")
    train(ref, p.demos, p.bos, "gd", lr, False, loss_reduction="sum")
    changed_below_bf16 = 0
    for q, q0, r in zip(_kv(lm.model), before, _kv(ref)):
        assert q.dtype == torch.float32 and q.grad is None
        step = q.detach() - q0
        # the update is float32's, up to bfloat16 rounding of the gradient
        assert torch.allclose(step, r.detach() - q0, rtol=0.1, atol=0.1 * (r.detach() - q0).abs().max().item())
        # entries that moved although a bfloat16 copy of the weight could not have
        changed_below_bf16 += int(((step != 0) & (q.detach().bfloat16() == q0.bfloat16())).sum())
    assert changed_below_bf16 > 0


@pytest.mark.parametrize("mode", [BF16, VOCAB_BF16])
def test_bf16_recordings_are_float32_and_close(gqa_model, sst2_rows, mode):
    p = _prompts(gqa_model, sst2_rows, k=4, n_test=8)
    want = record(gqa_model.model, p.icl_prefix(), p.queries, p.options)
    got = record(gqa_model.model, p.icl_prefix(), p.queries, p.options, precision=mode)
    for field in ("attn_out", "attn_scores", "option_logprobs"):
        a, b = getattr(got, field), getattr(want, field)
        assert a.dtype == torch.float32 and a.device.type == "cpu"
        assert torch.equal(a.isnan(), b.isnan())
        assert torch.allclose(a.nan_to_num(), b.nan_to_num(), rtol=3e-2, atol=3e-2 * b.nan_to_num().abs().max().item())
    assert not torch.equal(got.option_logprobs, want.option_logprobs)


def test_precision_presets_and_fidelity_flag(monkeypatch):
    from lens_iclgd import precision

    assert policy("float32") == precision.PrecisionPolicy()
    assert policy("mixed") == precision.CANDIDATES[precision.MIXED]
    with pytest.raises(UserError, match="unknown precision 'half'"):
        policy("half")
    monkeypatch.setattr(precision, "DEFAULT_PRECISION", "float32")
    assert within_fidelity("float32") and not within_fidelity("bfloat16")
    monkeypatch.setattr(precision, "DEFAULT_PRECISION", "train-icl-bf16")
    assert within_fidelity("train-bf16") and within_fidelity("train-icl-bf16") and not within_fidelity("bfloat16")


def test_precision_enters_stage_keys_and_cell_ids_only_when_not_float32(gqa_model, sst2_rows, tmp_path):
    from conftest import TEST_DATA
    from lens_iclgd.grid import cell_id
    from lens_iclgd.config import RunConfig
    from lens_iclgd.inputs import prepare
    from lens_iclgd.runner import stage_keys

    base = RunConfig(task="sst2", data_dir=str(TEST_DATA), k=3, n_test=4, lr=0.01)
    keys = {}
    for precision, device in (("float32", "auto"), ("float32", "cpu"), ("train-bf16", "cpu"), ("bfloat16", "cpu")):
        c = RunConfig(**{**base.__dict__, "precision": precision, "device": device})
        keys[precision, device] = (stage_keys(prepare(c, loaded=gqa_model)), cell_id(c))
    f32, f32_cpu, train_bf16, bf16 = keys.values()
    assert f32 == f32_cpu  # the device is never part of an identity
    assert train_bf16[0]["zs"] == f32[0]["zs"] and train_bf16[0]["icl"] == f32[0]["icl"]  # shared float32 stages
    assert train_bf16[0]["gd"] != f32[0]["gd"] and train_bf16[0]["lcgd"] != f32[0]["lcgd"]
    assert all(bf16[0][s] != f32[0][s] for s in f32[0])
    assert len({f32[1], train_bf16[1], bf16[1]}) == 3 and "__bfloat16__" in bf16[1]


def test_run_records_the_precision_policy(tiny_hf_dir, tmp_path, monkeypatch):
    from conftest import TEST_DATA
    from lens_iclgd.hardware import PROBE_ENV
    from lens_iclgd.config import RunConfig
    from lens_iclgd.runner import run

    monkeypatch.setenv(PROBE_ENV, "fast")  # whatever this CPU's bfloat16 speed (tested above)
    c = RunConfig(task="sst2", model=str(tiny_hf_dir), data_dir=str(TEST_DATA), k=2, n_test=4, lr=0.01,
                  methods=("gd",), precision="bfloat16", device="cpu")
    cfg = run(c, tmp_path / "out")["config"]
    assert cfg["precision"] == "bfloat16" and cfg["precision_policy"]["train"] == BF16
    assert cfg["precision_within_fidelity"] is False


# --- the bfloat16 probe's verdict (test_hardware.py), checked before any bfloat16 phase runs ---


def _probe(fast: bool):
    from lens_iclgd.hardware import Bf16Probe

    return Bf16Probe("cpu", 1.0, 0.5 if fast else 30.0, "test CPU, AVX2, 1 threads")


def test_require_fast_bf16_stops_in_one_line_where_bfloat16_is_slower(monkeypatch):
    from lens_iclgd import precision

    def no_probe(device):
        raise AssertionError("float32 must not probe")

    monkeypatch.setattr(precision, "bf16_probe", no_probe)
    assert precision.require_fast_bf16("float32", "cpu") is None
    monkeypatch.setattr(precision, "bf16_probe", lambda device: _probe(fast=False))
    for name in ("mixed", "bfloat16", "train-bf16", "train-icl-bf16", "train-vocab-bf16"):
        with pytest.raises(UserError) as err:
            precision.require_fast_bf16(name, "cpu")
        msg = str(err.value)
        assert "\n" not in msg and f"--precision {name} would run slower than float32 here" in msg
        assert "30.0x slower" in msg and "use --precision float32" in msg
    monkeypatch.setattr(precision, "bf16_probe", lambda device: _probe(fast=True))
    assert precision.require_fast_bf16("mixed", "cpu").pays_off


def test_run_with_slow_bfloat16_stops_before_any_compute(tiny_hf_dir, tmp_path, monkeypatch):
    """On a CPU where bfloat16 loses, `run --precision mixed` computes nothing and leaves
    nothing behind; where it wins, the probe is recorded beside the timings."""
    from conftest import TEST_DATA
    from lens_iclgd import precision, runner
    from lens_iclgd.config import RunConfig
    from lens_iclgd.runner import run

    c = RunConfig(task="sst2", model=str(tiny_hf_dir), data_dir=str(TEST_DATA), k=2, n_test=4, lr=0.01,
                  methods=("gd",), precision="mixed", device="cpu")
    monkeypatch.setattr(precision, "bf16_probe", lambda device: _probe(fast=False))
    real_compute = runner.compute_stage
    monkeypatch.setattr(runner, "compute_stage", lambda *a, **k: pytest.fail("computed a stage"))
    with pytest.raises(UserError, match="would run slower than float32 here"):
        run(c, tmp_path / "slow")
    assert not (tmp_path / "slow").exists()
    monkeypatch.setattr(runner, "compute_stage", real_compute)
    monkeypatch.setattr(precision, "bf16_probe", lambda device: _probe(fast=True))
    run(c, tmp_path / "fast")
    timings = json.loads((tmp_path / "fast" / "timings.json").read_text())
    assert timings["bf16_probe"]["pays_off"] is True and timings["bf16_probe"]["bfloat16_ms"] == 0.5
    assert timings["machine"]["capability"] == torch.backends.cpu.get_cpu_capability()
