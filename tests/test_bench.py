"""The benchmark (bench.py) on a tiny local model: both pipelines, the speedup, the
precision study where bfloat16 pays off and where it cannot."""

import re

import pytest
import torch

from conftest import TEST_DATA, run_cli
from lens_iclgd.errors import UserError


def _is_ratio(value: float, num: float, den: float, decimals: int) -> bool:
    """Whether `value` (printed to `decimals`) is num / den, both printed to 2 decimals."""
    slack, half = 0.5 * 10.0 ** -decimals, 0.005
    low = (num - half) / (den + half)
    high = (num + half) / (den - half) if den > half else float("inf")
    return low - slack - 1e-9 <= value <= high + slack + 1e-9


def test_bench_runs_both_pipelines_and_ends_with_the_speedup(tiny_hf_dir):
    out = run_cli(["bench", "--model", str(tiny_hf_dir), "--data-dir", str(TEST_DATA), "--k", "2", "--n-test", "5",
                   "--lr", "0.01", "--profile", "--peak-seconds", "0.2"])
    assert out.returncode == 0, out.stderr
    assert "profile ICL: " in out.stdout and "profile LCGD train: " in out.stdout
    lines = out.stdout.strip().splitlines()
    assert lines[-1].startswith("speedup: ")
    # the speedup is the naive pipeline's total time over the optimised one's, as the table
    # shows them (a tiny model may well be slower optimised: the ratio, not its size, is tested)
    phases = ("ZS", "ICL", "GD train", "GD eval", "LCGD train", "LCGD eval", "total")
    rows = {line[:12].strip(): line[12:].split() for line in lines if line[:12].strip() in phases}
    assert tuple(rows) == phases
    for name, (opt, naive, shown, *_) in rows.items():
        assert shown.endswith("x") and _is_ratio(float(shown[:-1]), float(naive), float(opt), decimals=1), (name, rows[name])
    opt, naive = (float(v) for v in rows["total"][:2])
    assert _is_ratio(float(lines[-1].split()[1]), naive, opt, decimals=2), (lines[-1], rows["total"])
    assert "predictions identical: zs 100%, icl 100%" in out.stdout
    assert "matmul peak" in out.stdout and "peak memory" in out.stdout


BENCH_TINY = ["--data-dir", str(TEST_DATA), "--k", "2", "--n-test", "5", "--lr", "0.01", "--peak-seconds", "0.2"]


def test_bench_precision_study_without_the_naive_pipeline(tiny_hf_dir):
    """Where bfloat16 pays off (stated, so this runs on any CPU): every candidate runs."""
    out = run_cli(["bench", "--model", str(tiny_hf_dir), *BENCH_TINY, "--no-naive", "--precision-study",
                   "--precision", "bfloat16"], env_extra={"LENS_ICLGD_BF16_PROBE": "fast"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    head = [line for line in lines if not line.startswith("[lens-iclgd]")]  # after the log lines
    assert head[0].startswith("machine: ") and torch.backends.cpu.get_cpu_capability() in head[0]
    assert head[1].startswith("bfloat16 probe: LENS_ICLGD_BF16_PROBE=fast (not measured)")
    assert lines[-1] == "speedup: not measured (--no-naive)"
    assert lines[-2].startswith("precision: cell speedup ") and lines[-2].endswith("(bfloat16)")
    assert "running the naive pipeline" not in out.stdout
    for name in ("train-vocab-bf16", "train-bf16", "train-icl-bf16", "bfloat16"):
        assert f"{name:<18}LCGD train" in out.stdout and f"{name:<18}predictions agree: zs" in out.stdout
    assert re.search(r"matmul peak \(bfloat16 \d+\^3, measured now\)", out.stdout)
    assert "update size |h_FT - h_ZS| / |h_ZS|" in out.stdout
    assert "rule (fastest within fidelity of float32): " in out.stdout


def test_bench_precision_study_skips_what_cannot_pay_off(tiny_hf_dir, monkeypatch, capsys):
    """Where bfloat16 is slower than float32: the study says so, times no bfloat16 candidate
    (nor a bfloat16 matmul peak), and the rule keeps float32; asking for a bfloat16
    precision stops in one line (in process: the probe is replaced by a slow one)."""
    from lens_iclgd import bench, precision
    from lens_iclgd.hardware import Bf16Probe

    slow = Bf16Probe("cpu", 1.0, 30.0, "test CPU, AVX2, 1 threads")
    monkeypatch.setattr(bench, "bf16_probe", lambda device: slow)
    monkeypatch.setattr(precision, "bf16_probe", lambda device: slow)
    tiny = ["--model", str(tiny_hf_dir), *BENCH_TINY, "--no-naive"]
    bench.main([*tiny, "--precision-study"])
    text = capsys.readouterr().out
    assert "bfloat16 probe (128x512 @ 512x512 on test CPU" in text and "30.0x slower" in text
    assert "precision study: skipped train-vocab-bf16, train-bf16, train-icl-bf16, bfloat16" in text
    assert "running the optimised pipeline in precision" not in text and "matmul peak (bfloat16" not in text
    assert "rule (fastest within fidelity of float32): float32 (1.00x); no candidate measured" in text
    with pytest.raises(UserError, match="--precision mixed would run slower than float32 here"):
        bench.main([*tiny, "--precision", "mixed"])
