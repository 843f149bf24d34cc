"""Ablations (ablation.py): a head or a layer's attention/MLP zeroed or mean-ablated, in
the ICL prefix, the recorded test examples and finetuning; bad specs."""

import pytest
import torch

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
