"""The fast recording path (prefix KV cache, batching, sliced hooks) against the naive
reference (full prompt per example, batch 1, full run_with_cache)."""

from pathlib import Path

import pytest
import torch

from conftest import tiny_model
from lens_iclgd.prompts import build_prompts
from lens_iclgd.recording import record, record_reference
from lens_iclgd.tasks import load_task, task_from_dict


def _close(a, b, atol=1e-5):
    assert a.attn_out.shape == b.attn_out.shape and a.attn_scores.shape == b.attn_scores.shape
    assert torch.equal(a.attn_scores.isnan(), b.attn_scores.isnan())
    assert torch.allclose(a.attn_out, b.attn_out, atol=atol)
    assert torch.allclose(a.attn_scores.nan_to_num(), b.attn_scores.nan_to_num(), atol=atol)
    assert torch.allclose(a.option_logprobs, b.option_logprobs, atol=atol)
    assert torch.equal(a.labels, b.labels)
    # the prediction position's normalised residual: never all zeros, equal on both paths
    assert a.final_resid.shape == (a.attn_out.shape[0], a.attn_out.shape[2])
    assert (a.final_resid.norm(dim=-1) > 0).all()
    assert torch.allclose(a.final_resid, b.final_resid, atol=atol)


@pytest.mark.parametrize("gqa", [True, False])
@pytest.mark.parametrize("position", ["answer", "prompt"])
def test_cached_batched_equals_full_prompt(tokenizer, sst2_rows, gqa, position):
    lm = tiny_model(tokenizer, gqa=gqa, biases=not gqa)
    p = build_prompts(lm.model, load_task("sst2"), sst2_rows["train"], sst2_rows["validation"], k=5, seed=1, n_test=9)
    for prefix in (p.zs_prefix(), p.icl_prefix()):
        fast = record(lm.model, prefix, p.queries, p.options, position, batch_size=4)
        _close(fast, record_reference(lm.model, prefix, p.queries, p.options, position))
    zs = record(lm.model, p.zs_prefix(), p.queries, p.options, position)
    icl = record(lm.model, p.icl_prefix(), p.queries, p.options, position)
    assert not torch.allclose(zs.attn_out, icl.attn_out)  # the demonstrations matter


def test_recorded_slices_have_the_test_examples_shape(gqa_model, sst2_rows):
    p = build_prompts(gqa_model.model, load_task("sst2"), sst2_rows["train"], sst2_rows["validation"], k=3, seed=0, n_test=5)
    rec = record(gqa_model.model, p.icl_prefix(), p.queries, p.options, "answer")
    cfg = gqa_model.model.cfg
    longest = max(len(q.prompt) for q in p.queries)
    assert rec.attn_out.shape == (5, cfg.n_layers, cfg.d_model)
    assert rec.attn_scores.shape == (5, cfg.n_layers, cfg.n_heads, longest + 1)
    for i, q in enumerate(p.queries):  # keys: the prompt and the option token, no more
        present = ~rec.attn_scores[i, 0, 0].isnan()
        assert present.sum() == len(q.prompt) + 1 and present[: len(q.prompt) + 1].all()


def test_multi_token_answers_use_mean_log_prob(tokenizer, sst2_rows, tmp_path):
    task = task_from_dict(
        {"name": "multi", "template": "Sentence: {sentence} Label:", "answers": ["not good", "good"],
         "files": {"train": "x.jsonl", "validation": "y.jsonl"}}, Path(tmp_path / "t.toml"))
    lm = tiny_model(tokenizer, gqa=True)
    p = build_prompts(lm.model, task, sst2_rows["train"], sst2_rows["validation"], k=2, seed=0, n_test=6)
    assert [len(o) for o in p.options] == [2, 1]
    for prefix in (p.zs_prefix(), p.icl_prefix()):
        _close(record(lm.model, prefix, p.queries, p.options, batch_size=4),
               record_reference(lm.model, prefix, p.queries, p.options))
    # and the hand computation for one example: mean of the two tokens' log-probs
    q = p.queries[0]
    tokens = torch.tensor([p.zs_prefix() + q.prompt + p.options[0]])
    logp = lm.model(tokens)[0].log_softmax(-1)
    n = len(p.zs_prefix()) + len(q.prompt)
    want = (logp[n - 1, p.options[0][0]] + logp[n, p.options[0][1]]) / 2
    got = record(lm.model, p.zs_prefix(), [q], p.options).option_logprobs[0, 0]
    assert torch.allclose(got, want, atol=1e-5)


def test_recording_is_deterministic(gqa_model, sst2_rows):
    p = build_prompts(gqa_model.model, load_task("sst2"), sst2_rows["train"], sst2_rows["validation"], k=3, seed=0, n_test=6)
    a = record(gqa_model.model, p.icl_prefix(), p.queries, p.options)
    b = record(gqa_model.model, p.icl_prefix(), p.queries, p.options)
    assert torch.equal(a.attn_out, b.attn_out) and torch.equal(a.option_logprobs, b.option_logprobs)


def test_rotary_variant_without_prerotation_still_equals_full_prompt(tokenizer, sst2_rows):
    """GPT-J style rotary (adjacent pairs) is left to TransformerLens: the prefix cache then
    keeps unrotated keys, and the cached path must still equal the full prompt."""
    lm = tiny_model(tokenizer, gqa=True)
    lm.model.cfg.rotary_adjacent_pairs = True
    p = build_prompts(lm.model, load_task("sst2"), sst2_rows["train"], sst2_rows["validation"], k=4, seed=0, n_test=5)
    _close(record(lm.model, p.icl_prefix(), p.queries, p.options, batch_size=2),
           record_reference(lm.model, p.icl_prefix(), p.queries, p.options))
