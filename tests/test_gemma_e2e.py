"""The real offline model (gemma-3-270m from its PyPI wheels) on real SST-2 rows (the
fixture's, tests/data: a few test examples are all these tests need)."""

import json
import math

import pandas as pd
import pytest
import torch

from conftest import TEST_DATA, read_jsonl, run_cli
from lens_iclgd.models import load_model
from lens_iclgd.prompts import build_prompts
from lens_iclgd.recording import record, record_reference
from lens_iclgd.tasks import load_task

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("gemma")]  # one worker loads the model


@pytest.fixture(scope="module")
def gemma():
    return load_model("gemma-3-270m")


def test_gemma_prefix_cache_equals_full_prompt(gemma):
    rows = {s: read_jsonl(TEST_DATA / "sst2" / f"{s}.jsonl", 200) for s in ("train", "validation")}
    p = build_prompts(gemma.model, load_task("sst2"), rows["train"], rows["validation"], k=4, seed=0, n_test=3)
    assert gemma.model.cfg.n_layers == 18 and gemma.model.cfg.n_key_value_heads == 1
    for prefix in (p.zs_prefix(), p.icl_prefix()):
        fast = record(gemma.model, prefix, p.queries, p.options, batch_size=2)
        ref = record_reference(gemma.model, prefix, p.queries, p.options)
        assert torch.allclose(fast.option_logprobs, ref.option_logprobs, atol=2e-4)
        assert torch.allclose(fast.attn_out, ref.attn_out, atol=2e-3, rtol=1e-3)
        assert torch.allclose(fast.attn_scores.nan_to_num(), ref.attn_scores.nan_to_num(), atol=2e-3, rtol=1e-3)


def test_gemma_cli_end_to_end(tmp_path):
    out = tmp_path / "gemma"
    proc = run_cli(["run", "--model", "gemma-3-270m", "--task", "sst2", "--data-dir", str(TEST_DATA), "--n-test", "8",
                    "--k", "4", "--seed", "1", "--out", str(out)], timeout=1200)
    assert proc.returncode == 0, proc.stderr
    r = json.loads((out / "results.json").read_text())
    c = r["config"]
    assert (c["model"], c["k_effective"], c["n_test_effective"], c["recorded_position"]) == ("gemma-3-270m", 4, 8, "answer")
    assert c["model_checksum_sha256"].startswith("a5fd3b62")
    assert set(r["accuracy"]) == {"zs", "icl", "gd", "lcgd"}
    for method in ("gd", "lcgd"):
        m = r["metrics"][method]
        for name in ("SimAOU", "SimAOU_norm", "SimAOU_random", "SimAM", "SimAM_delta"):
            assert len(m[name]["per_layer"]) == 18
            assert all(-1 <= v <= 1 for v in m[name]["per_layer"]) and -1 <= m[name]["mean"] <= 1
            assert math.isclose(m[name]["mean"], sum(m[name]["per_layer"]) / 18, rel_tol=1e-5)
        assert len(m["SimAM"]["per_head"]) == 18 and len(m["SimAM"]["per_head"][0]) == 4
        assert "Rec2FTP" in m
        norms = r["grad_norms"][method]
        assert len(norms) == 18 and all(len(row) == 4 and all(v > 0 for v in row) for row in norms)
    assert len(r["alpha"]["per_layer"]) == 18
    examples = pd.read_csv(out / "examples.csv")
    assert len(examples) == 8 and {"zs_pred", "icl_pred", "gd_pred", "lcgd_pred"} <= set(examples.columns)
    assert (examples["icl_correct"].mean() - r["accuracy"]["icl"]) ** 2 < 1e-12
    assert len(pd.read_parquet(out / "per_layer.parquet")) == 2 * 8 * 18


def test_gemma_patching_cached_paths_equal_full_forwards(gemma):
    """The patching fast paths on the real model, with 32 demonstrations: past gemma-3's
    512-token sliding window, with its per-layer rotary bases and one K/V head."""
    from lens_iclgd import patching as P
    from lens_iclgd.patching import COMPONENTS, component_hook, z_hook

    rows = {s: read_jsonl(TEST_DATA / "sst2" / f"{s}.jsonl", 200) for s in ("train", "validation")}
    task = load_task("sst2")
    p = build_prompts(gemma.model, task, rows["train"], rows["validation"], k=32, seed=0, n_test=2)
    model, prefix = gemma.model, p.icl_prefix()
    assert len(prefix) > 512  # the sliding window is in play
    icl = P.last_token_activations(model, prefix, p.queries, p.options, with_z=True)
    for i, q in enumerate(p.queries):
        logits, cache = model.run_with_cache(torch.tensor([prefix + q.prompt]))
        for l in (0, 5, 17):
            for c in COMPONENTS:
                assert torch.allclose(icl.component(c)[i, l], cache[component_hook(c, l)][0, -1], atol=2e-3, rtol=1e-3)
            assert torch.allclose(icl.z[i, l], cache[z_hook(l)][0, -1], atol=2e-3, rtol=1e-3)
        assert torch.allclose(icl.option_logits[i], logits[0, -1, [o[0] for o in p.options]], atol=2e-3)
    first = P.LastToken(icl.resid_pre[:1], icl.attn_out[:1], icl.mlp_out[:1], icl.option_logits[:1], icl.labels[:1])
    fast = P.patch_layers(model, p.queries[:1], p.options, first, prefix=p.zs_prefix())
    ref = P.patch_layers_reference(model, p.queries[:1], p.options, first, prefix=p.zs_prefix())
    for c in COMPONENTS:
        assert torch.allclose(fast[c]["logit_diff"], ref[c]["logit_diff"], atol=2e-3)
    # head patching on 4 demonstrations: its reference is a full forward per head (72 here),
    # and its cached path is the one checked past the window above
    p4 = build_prompts(model, task, rows["train"], rows["validation"], k=4, seed=0, n_test=1)
    shuffled = P.shuffled_label_demos(p4, task, rows["train"], model, seed=0)
    corrupted = list(p4.bos) + [t for d in shuffled for t in d + p4.separator]
    mean_z = icl.z.mean(0)
    heads = P.head_indirect_effect(model, corrupted, p4.queries, p4.options, mean_z)
    heads_ref = P.head_indirect_effect_reference(model, corrupted, p4.queries, p4.options, mean_z)
    assert torch.allclose(heads, heads_ref, atol=1e-3)
