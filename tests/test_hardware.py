"""The bfloat16 probe (hardware.py): both dtypes measured, the verdict by their ratio, the
environment override stated and checked."""

import pytest
import torch

from lens_iclgd.errors import UserError


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
