"""The baselines (ZS SimAM, the three random SimAOU variants) on real recordings, in a
run's outputs, and in the report."""

import json
import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from conftest import TEST_DATA, run_cli
from lens_iclgd import metrics as M
from lens_iclgd.prompts import build_prompts
from lens_iclgd.recording import Recording, record
from lens_iclgd.report import collect, table2
from lens_iclgd.metrics import compare
from lens_iclgd.tasks import load_task

RANDOM = ("SimAOU_random", "SimAOU_random_text", "SimAOU_random_matched")


def test_zs_simam_equals_a_direct_cosine_of_the_recorded_scores(gqa_model, sst2_rows):
    model = gqa_model.model
    p = build_prompts(model, load_task("sst2"), sst2_rows["train"], sst2_rows["validation"], k=3, seed=0, n_test=6)
    zs = record(model, p.zs_prefix(), p.queries, p.options)
    icl = record(model, p.icl_prefix(), p.queries, p.options)
    n, L, H, _ = zs.attn_scores.shape
    want = torch.zeros(n, L, H)
    for i in range(n):
        for layer in range(L):
            for h in range(H):
                keys = ~zs.attn_scores[i, layer, h].isnan()
                want[i, layer, h] = F.cosine_similarity(icl.attn_scores[i, layer, h, keys], zs.attn_scores[i, layer, h, keys], dim=0)
    assert torch.allclose(M.zs_simam(icl.attn_scores, zs.attn_scores), want, atol=1e-6)
    summary = M.summarize(M.zs_simam(icl.attn_scores, zs.attn_scores))
    assert torch.allclose(torch.tensor(summary["per_layer"]), want.mean((0, 2)), atol=1e-6)
    assert torch.allclose(torch.tensor(summary["per_head"]), want.mean(0), atol=1e-6)


def _recording(h: torch.Tensor) -> Recording:
    n, L, _ = h.shape
    return Recording(h, torch.randn(n, L, 2, 5), torch.randn(n, 2), torch.zeros(n, dtype=torch.long))


def test_random_vectors_do_not_depend_on_the_method():
    torch.manual_seed(0)
    zs, icl = _recording(torch.randn(7, 3, 16)), _recording(torch.randn(7, 3, 16))
    gd, lcgd = _recording(torch.randn(7, 3, 16)), _recording(5 * torch.randn(7, 3, 16))
    a, b = compare(zs, icl, gd, seed=4), compare(zs, icl, lcgd, seed=4)
    for name in ("SimAOU_random", "SimAOU_random_text"):
        assert torch.equal(a[name], b[name])
    assert not torch.equal(compare(zs, icl, gd, seed=5)["SimAOU_random"], a["SimAOU_random"])
    # the papers' baseline: r = the seeded uniform vectors, used as the update itself
    r = M.uniform_vectors(zs.attn_out.shape, 4)
    assert torch.allclose(a["SimAOU_random"], F.cosine_similarity(icl.attn_out - zs.attn_out, r, dim=-1), atol=1e-6)


def test_run_outputs_carry_the_baselines(tmp_path, tiny_hf_dir):
    out = tmp_path / "run"
    proc = run_cli(["run", "--model", str(tiny_hf_dir), "--task", "sst2", "--data-dir", str(TEST_DATA),
                    "--k", "3", "--n-test", "8", "--lr", "0.01", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr
    r = json.loads((out / "results.json").read_text())
    n_layers = len(r["metrics"]["gd"]["SimAOU"]["per_layer"])
    examples = pd.read_csv(out / "examples.csv")
    per_layer = pd.read_parquet(out / "per_layer.parquet")
    for method in ("gd", "lcgd"):
        for name in RANDOM:
            entry = r["metrics"][method][name]
            # results.json's summary is the per-example values of per_layer.parquet averaged
            by_layer = per_layer[per_layer["method"] == method].groupby("layer")[name].mean()
            assert len(entry["per_layer"]) == n_layers and by_layer.tolist() == pytest.approx(entry["per_layer"], abs=1e-6)
            assert entry["mean"] == pytest.approx(sum(entry["per_layer"]) / n_layers, rel=1e-5)
            assert examples[f"{method}_{name}"].mean() == pytest.approx(entry["mean"], abs=1e-6)
    assert set(r["zs_simam"]) == {"per_layer", "mean", "per_head"} and len(r["zs_simam"]["per_head"]) == n_layers
    # how far each setting moved hook_attn_out, per layer: ICL, GD, LCGD
    assert set(r["update_size"]) == {"icl", "gd", "lcgd"}
    for setting, entry in r["update_size"].items():
        assert len(entry["per_layer"]) == n_layers and all(v > 0 for v in entry["per_layer"]), setting
        assert math.isclose(entry["mean"], sum(entry["per_layer"]) / n_layers, rel_tol=1e-5)
    for name in RANDOM:
        assert f"gd_{name}" in examples and f"lcgd_{name}" in examples and name in per_layer
    for line in ("SimAOU_random_text", "SimAOU_random_matched", "ZS SimAM (ICL vs ZS)"):
        assert line in proc.stdout
    # the papers' baseline is the same for both methods (same seed, same r)
    assert r["metrics"]["gd"]["SimAOU_random"] == r["metrics"]["lcgd"]["SimAOU_random"]
    assert run_cli(["views", str(out)]).returncode == 0


def _cell(folder, metrics: dict, zs_simam: float | None):
    folder.mkdir(parents=True)
    per = lambda v: {"mean": v, "per_layer": [v]}  # noqa: E731
    r = {"config": {"model": "m", "baseline": "trained", "task": "sst2", "seed": 0, "lr": 1e-4, "lr_source": "table",
                    "ablate": "", "k_effective": 4, "n_test_effective": 8},
         "accuracy": {"zs": 0.5, "icl": 0.6, "gd": 0.6, "lcgd": 0.5},
         "metrics": {m: {name: per(v) for name, v in values.items()} | {"Rec2FTP": per(0.5)} for m, values in metrics.items()},
         "alpha": per(0.1)}
    if zs_simam is not None:
        r["zs_simam"] = per(zs_simam)
    (folder / "results.json").write_text(json.dumps(r))


def test_report_reads_zs_simam_and_maps_older_random_baselines(tmp_path):
    base = {"SimAOU": 0.2, "SimAOU_norm": 0.2, "SimAM": 0.9, "SimAM_delta": 0.1}
    new = base | {"SimAOU_random": -0.01, "SimAOU_random_text": 0.3, "SimAOU_random_matched": 0.15}
    _cell(tmp_path / "new" / "cells" / "a", {"gd": new, "lcgd": new}, zs_simam=0.8)
    rows = collect(tmp_path / "new").rows
    assert list(rows["zs_simam"]) == [0.8, 0.8] and list(rows["SimAOU_random"]) == [-0.01, -0.01]
    t2 = table2(rows).set_index("row")
    assert t2.loc["ZS SimAM (ICL vs ZS)", "sst2"] == "0.800"
    assert list(t2.index).index("ZS SimAM (ICL vs ZS)") == list(t2.index).index("SimAM — LCGD") + 1
    # an older cell: no zs_simam, and its SimAOU_random was the matched variant
    _cell(tmp_path / "old" / "cells" / "a", {"gd": base | {"SimAOU_random": 0.15}, "lcgd": base | {"SimAOU_random": 0.16}}, zs_simam=None)
    rows = collect(tmp_path / "old").rows
    assert rows["zs_simam"].isna().all() and rows["SimAOU_random"].isna().all()
    assert list(rows["SimAOU_random_matched"]) == [0.15, 0.16]
    assert "ZS SimAM (ICL vs ZS)" not in set(table2(rows)["row"])
