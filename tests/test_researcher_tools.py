"""Ablations, custom tasks, order sensitivity, views and the Python API."""

import json
import subprocess
import sys

import pandas as pd
import pytest
import torch

from conftest import ROOT, SHARED_DATA, run_cli, tiny_model
from lens_iclgd.ablation import ablation_hooks, parse_ablation
from lens_iclgd.errors import UserError
from lens_iclgd.finetune import train
from lens_iclgd.models import kv_parameters
from lens_iclgd.prompts import build_prompts
from lens_iclgd.recording import record, record_reference
from lens_iclgd.tasks import load_task


def _cache(model, tokens, hooks):
    with model.hooks(fwd_hooks=hooks):  # registered first: caching hooks see the ablated values
        _, cache = model.run_with_cache(tokens)
    return cache


def _prompts(lm, rows, k=3, n_test=5):
    return build_prompts(lm.model, load_task("sst2"), rows["train"], rows["validation"], k=k, seed=0, n_test=n_test)


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_head_ablation_changes_exactly_that_head(gqa_model, sst2_rows, mode):
    model = gqa_model.model
    p = _prompts(gqa_model, sst2_rows)
    tokens = torch.tensor([p.icl_prefix() + p.queries[0].prompt])
    clean = _cache(model, tokens, [])
    ablated = _cache(model, tokens, ablation_hooks(model, parse_ablation("1.2", mode), p))
    for name in clean:
        layer = int(name.split(".")[1]) if name.startswith("blocks.") else None
        if layer == 0 or (layer == 1 and any(h in name for h in ("hook_q", "hook_k", "hook_v", "hook_rot", "attn_scores", "hook_pattern", "ln1.", "hook_resid_pre", "hook_attn_in"))):
            assert torch.equal(clean[name], ablated[name]), f"{name} is upstream of the ablation but changed"
    z0, z1 = clean["blocks.1.attn.hook_z"], ablated["blocks.1.attn.hook_z"]
    others = [h for h in range(model.cfg.n_heads) if h != 2]
    assert torch.equal(z0[:, :, others], z1[:, :, others])
    if mode == "zero":
        assert (z1[:, :, 2] == 0).all()
    else:
        assert torch.allclose(z1[0, 0, 2], z1[0, -1, 2]) and not torch.allclose(z1[:, :, 2], z0[:, :, 2])
    assert not torch.allclose(clean["blocks.1.hook_attn_out"], ablated["blocks.1.hook_attn_out"])


def test_layer_ablations_and_bad_specs(gqa_model, sst2_rows):
    model = gqa_model.model
    p = _prompts(gqa_model, sst2_rows)
    tokens = torch.tensor([p.zs_prefix() + p.queries[0].prompt])
    cache = _cache(model, tokens, ablation_hooks(model, parse_ablation("attn0,mlp2,1.*"), p))
    assert (cache["blocks.0.hook_attn_out"] == 0).all() and (cache["blocks.2.hook_mlp_out"] == 0).all()
    assert (cache["blocks.1.attn.hook_z"] == 0).all()
    for bad, msg in (("3-1", "cannot parse"), ("attn", "cannot parse"), ("1.2,1.2", "twice")):
        with pytest.raises(UserError, match=msg):
            parse_ablation(bad)
    for bad, msg in (("7.0", "has layers 0..2"), ("0.9", "has heads 0..3")):
        with pytest.raises(UserError, match=msg):
            ablation_hooks(model, parse_ablation(bad), p)


def test_ablation_applies_in_icl_prefix_and_in_finetuning(gqa_model, sst2_rows):
    model = gqa_model.model
    p = _prompts(gqa_model, sst2_rows)
    hooks = ablation_hooks(model, parse_ablation("attn1"), p)
    icl = record(model, p.icl_prefix(), p.queries, p.options, hooks=hooks)
    assert (icl.attn_out[:, 1] == 0).all()
    # the prefix is ablated too: the cached fast path equals a full-prompt ablated run
    ref = record_reference(model, p.icl_prefix(), p.queries, p.options, hooks=hooks)
    assert torch.allclose(icl.attn_out, ref.attn_out, atol=1e-5)
    assert not torch.allclose(icl.attn_out, record(model, p.icl_prefix(), p.queries, p.options).attn_out)
    # training with the whole attention block of layer 1 ablated: no gradient reaches its K/V
    before = {n: q.detach().clone() for ps in kv_parameters(model, False).values() for n, q in ps}
    for method in ("gd", "lcgd"):
        log = train(model, p.demos, p.bos, method, 0.05, False, hooks=hooks)
        assert (log.grad_norms[1] == 0).all() and (log.grad_norms[0] > 0).all()
        after = dict(model.named_parameters())
        assert torch.equal(after["blocks.1.attn._W_K"], before["blocks.1.attn._W_K"])
        assert not torch.equal(after["blocks.0.attn._W_K"], before["blocks.0.attn._W_K"])


def _custom_task(tmp_path, rows):
    for split, data in rows.items():
        with open(tmp_path / f"{split}.jsonl", "w") as f:
            for r in data:
                f.write(json.dumps({"review": r["sentence"], "stars": r["label"]}) + "\n")
    (tmp_path / "task.toml").write_text(
        'name = "my_reviews"\ntemplate = "Review: {review} Verdict:"\nanswers = ["bad", "good"]\n'
        'label_field = "stars"\neval_split = "dev"\n[files]\ntrain = "train.jsonl"\ndev = "dev.jsonl"\n')
    return tmp_path / "task.toml"


def test_custom_task_file_end_to_end(tmp_path, tiny_hf_dir, sst2_rows):
    task = _custom_task(tmp_path, {"train": sst2_rows["train"][:60], "dev": sst2_rows["validation"][:20]})
    out = tmp_path / "out"
    proc = run_cli(["run", "--task", str(task), "--model", str(tiny_hf_dir), "--k", "3", "--n-test", "8",
                    "--lr", "0.01", "--ablate", "0.1", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr
    r = json.loads((out / "results.json").read_text())
    assert r["config"]["task_spec"]["template"] == "Review: {review} Verdict:"
    assert r["config"]["ablation"] == [{"component": "0.1", "hook": "blocks.0.attn.hook_z", "mode": "zero"}]
    assert set(pd.read_csv(out / "examples.csv")["label"]) <= {"bad", "good"}
    views = run_cli(["views", str(out)])
    assert views.returncode == 0 and (out / "views" / "per_head_simam.png").stat().st_size > 10_000


def test_order_sensitivity_returns_one_result_per_permutation(tmp_path, tiny_hf_dir):
    out = tmp_path / "orders"
    proc = run_cli(["run", "--task", "sst2", "--data-dir", str(SHARED_DATA), "--model", str(tiny_hf_dir),
                    "--k", "4", "--n-test", "10", "--lr", "0.02", "--orders", "3", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr
    table = pd.read_csv(out / "orders.csv")
    assert list(table["order"]) == [0, 1, 2]
    demo_sets = [sorted(json.loads(r.replace("'", '"'))) for r in table["demo_rows"]]
    assert demo_sets[0] == demo_sets[1] == demo_sets[2]
    orders = [json.loads((out / f"order{i}" / "results.json").read_text())["config"]["demo_rows"] for i in range(3)]
    assert len({tuple(o) for o in orders}) == 3  # same set, three different orders
    summary = json.loads((out / "orders.json").read_text())
    assert set(summary["prediction_stability"]) == {"zs", "icl", "gd", "lcgd"}
    assert summary["prediction_stability"]["zs"]["same_prediction_in_every_order"] == 1.0
    assert summary["spread"]["acc_zs"]["std"] == 0.0
    assert "ICL" in proc.stdout and "flip rate" in proc.stdout


def test_public_api_and_metric_frames(gqa_model, sst2_rows):
    import lens_iclgd as li

    p = li.build_prompts(gqa_model.model, li.load_task("sst2"), sst2_rows["train"], sst2_rows["validation"], k=3, seed=0, n_test=4)
    zs = li.record(gqa_model.model, p.zs_prefix(), p.queries, p.options)
    icl = li.record(gqa_model.model, p.icl_prefix(), p.queries, p.options)
    with li.finetuned(gqa_model.model, p.demos, p.bos, "gd", 0.05, False):
        ft = li.record(gqa_model.model, p.zs_prefix(), p.queries, p.options)
    per = li.compare(zs, icl, ft, seed=0)
    df = li.metrics.frame(per)
    assert set(df["metric"]) == {"SimAOU", "SimAOU_norm", "SimAOU_random", "SimAOU_random_text", "SimAOU_random_matched",
                                 "SimAM", "SimAM_delta"}
    simam = df[df["metric"] == "SimAM"]
    assert len(simam) == 4 * 3 * 4 and simam["head"].notna().all()
    by_layer = df[df["metric"] == "SimAOU"].groupby("layer")["value"].mean()
    assert torch.allclose(torch.tensor(by_layer.to_numpy(), dtype=torch.float32), per["SimAOU"].mean(0), atol=1e-6)
    with pytest.raises(AttributeError):
        li.no_such_thing


def test_worked_api_example_runs(tiny_hf_dir):
    """experiments/api_example.py (shown in the README) on a tiny local model."""
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "api_example.py"), "--model", str(tiny_hf_dir),
                           "--task", "sst2", "--data-dir", str(SHARED_DATA), "--k", "2", "--n-test", "4", "--ablate", "attn1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "accuracy with attn1 ablated" in proc.stdout and "LCGD: accuracy" in proc.stdout
    assert "SimAM_delta" in proc.stdout
