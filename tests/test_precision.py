"""Precision policies (precision.py), devices (device.py) and progress bars, on tiny models."""

import copy
import io
import json
from contextlib import nullcontext

import pytest
import torch

from conftest import tiny_model
from lens_iclgd import finetune, fast, progress, recording, vocab
from lens_iclgd.device import resolve_device
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
    train(lm.model, p.demos, p.bos, "gd", lr, False, precision=BF16)
    train(ref, p.demos, p.bos, "gd", lr, False)
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
    from conftest import SHARED_DATA
    from lens_iclgd.grid import cell_id
    from lens_iclgd.runner import RunConfig, prepare, stage_keys

    base = RunConfig(task="sst2", data_dir=str(SHARED_DATA), k=3, n_test=4, lr=0.01)
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
    from conftest import SHARED_DATA
    from lens_iclgd.hardware import PROBE_ENV
    from lens_iclgd.runner import RunConfig, run

    monkeypatch.setenv(PROBE_ENV, "fast")  # whatever this CPU's bfloat16 speed (tested above)
    c = RunConfig(task="sst2", model=str(tiny_hf_dir), data_dir=str(SHARED_DATA), k=2, n_test=4, lr=0.01,
                  methods=("gd",), precision="bfloat16", device="cpu")
    cfg = run(c, tmp_path / "out")["config"]
    assert cfg["precision"] == "bfloat16" and cfg["precision_policy"]["train"] == BF16
    assert cfg["precision_within_fidelity"] is False


# --- devices --------------------------------------------------------------------------------


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


# --- progress bars --------------------------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bars_draw_on_a_terminal_unless_quiet(gqa_model, sst2_rows, monkeypatch):
    p = _prompts(gqa_model, sst2_rows)
    for quiet in (False, True):
        term = _Terminal()
        monkeypatch.setattr("sys.stderr", term)
        monkeypatch.setenv("TQDM_DISABLE", "1")  # the CLI's setting for third-party bars
        progress.set_quiet(quiet)
        try:
            record(gqa_model.model, p.zs_prefix(), p.queries, p.options, batch_size=2)
            train(copy.deepcopy(gqa_model.model), p.demos, p.bos, "gd", 0.01, False)
        finally:
            progress.set_quiet(False)
        drawn = term.getvalue()
        assert (("recording" in drawn and "gd training" in drawn) if not quiet else drawn == ""), drawn


# --- the bfloat16 probe: measured before any bfloat16 phase runs -----------------------------


def _probe(fast: bool):
    from lens_iclgd.hardware import Bf16Probe

    return Bf16Probe("cpu", 1.0, 0.5 if fast else 30.0, "test CPU, AVX2, 1 threads")


def test_bf16_probe_measures_both_dtypes_and_decides_by_their_ratio(monkeypatch):
    """The probe's decision agrees with an independent timing of the same matmuls wherever
    the two dtypes differ by more than 2x (AVX2-only CPUs: bfloat16 ~30x slower; AVX-512
    with avx512_bf16: 3-5x faster)."""
    import time

    from lens_iclgd.hardware import PROBE_ENV, PROBE_SHAPE, bf16_probe

    monkeypatch.delenv(PROBE_ENV, raising=False)
    probe = bf16_probe("cpu")
    assert probe.override is None and probe.float32_ms > 0 and probe.bfloat16_ms > 0
    assert probe.pays_off == (probe.bfloat16_ms < probe.float32_ms)
    assert torch.backends.cpu.get_cpu_capability() in probe.line() and "float32" in probe.line()

    def best_ms(dtype, reps=3):
        rows, inner, cols = PROBE_SHAPE
        a, b = torch.randn(rows, inner).to(dtype), torch.randn(inner, cols).to(dtype)
        a @ b
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t)
        return 1e3 * min(times)

    ratio = best_ms(torch.bfloat16) / best_ms(torch.float32)
    if ratio > 2 or ratio < 0.5:
        assert probe.pays_off == (ratio < 1), (probe.line(), ratio)


def test_bf16_probe_override_is_stated_and_checked(monkeypatch):
    from lens_iclgd.hardware import PROBE_ENV, bf16_probe

    for value, pays in (("fast", True), ("slow", False)):
        monkeypatch.setenv(PROBE_ENV, value)
        probe = bf16_probe("cpu")
        assert probe.pays_off is pays and probe.override == value and f"{PROBE_ENV}={value} (not measured)" in probe.line()
    monkeypatch.setenv(PROBE_ENV, "maybe")
    with pytest.raises(UserError, match=f"{PROBE_ENV}='maybe': use fast or slow") as err:
        bf16_probe("cpu")
    assert "\n" not in str(err.value)


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
    from conftest import SHARED_DATA
    from lens_iclgd import precision, runner
    from lens_iclgd.runner import RunConfig, run

    c = RunConfig(task="sst2", model=str(tiny_hf_dir), data_dir=str(SHARED_DATA), k=2, n_test=4, lr=0.01,
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
