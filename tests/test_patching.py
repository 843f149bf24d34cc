"""Activation patching (lens_iclgd/patching.py): the cached last-token path against full
forwards, and falsifiable checks of what a patch must and must not change, on tiny models."""

import copy

import pytest
import torch

from conftest import tiny_model
from lens_iclgd.ablation import ablation_hooks, parse_ablation
from lens_iclgd.errors import UserError
from lens_iclgd.patching import (COMPONENTS, component_hook, head_indirect_effect, head_indirect_effect_reference,
                                 last_token_activations, logit_diff, patch_layers, patch_layers_reference,
                                 recovered_share, shuffled_label_demos, task_vector_accuracy, z_hook)
from lens_iclgd.prompts import Query, build_prompts
from lens_iclgd.tasks import load_task

BOS = [1]
OPTIONS = [[5], [9], [7, 8]]  # the last: a two-token answer, scored by its first token


def _queries(model, n=4, seed=0):
    """Prompts of 1 to 6 tokens (a 1-token prompt leaves nothing to cache before the last
    token), labels of every option."""
    g = torch.Generator().manual_seed(seed)
    lengths = [1, 3, 6, 4, 2, 5][:n]
    return [Query(i, i % len(OPTIONS), torch.randint(3, model.cfg.d_vocab, (m,), generator=g).tolist())
            for i, m in enumerate(lengths)]


def _icl_prefix(model, n=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return BOS + torch.randint(3, model.cfg.d_vocab, (n,), generator=g).tolist()


def _logits(model, prefix, q, fwd_hooks=()):
    """The option logits of a full forward of prefix + prompt (no cache)."""
    tokens = torch.tensor([prefix + q.prompt])
    out = model.run_with_hooks(tokens, fwd_hooks=list(fwd_hooks))
    return out[0, -1, [o[0] for o in OPTIONS]]


def _replace_last(vector):
    def hook(act, hook):
        act = act.clone()
        act[:, -1] = vector
        return act
    return hook


@pytest.fixture(params=[True, False], ids=["gqa", "std"])
def model(request, tokenizer):
    return tiny_model(tokenizer, gqa=request.param, biases=not request.param).model


def test_last_token_activations_equal_a_full_forward(model):
    """The cached path records what run_with_cache sees at the last prompt token; hook_z
    has every query head (4), GQA (2 K/V heads) included."""
    queries, prefix = _queries(model), _icl_prefix(model)
    rec = last_token_activations(model, prefix, queries, OPTIONS, with_z=True)
    assert rec.z.shape == (len(queries), 3, 4, 8)
    for i, q in enumerate(queries):
        logits, cache = model.run_with_cache(torch.tensor([prefix + q.prompt]))
        for l in range(3):
            for c in COMPONENTS:
                assert torch.allclose(rec.component(c)[i, l], cache[component_hook(c, l)][0, -1], atol=1e-5)
            assert torch.allclose(rec.z[i, l], cache[z_hook(l)][0, -1], atol=1e-5)
        assert torch.allclose(rec.option_logits[i], logits[0, -1, [o[0] for o in OPTIONS]], atol=1e-5)
    assert rec.labels.tolist() == [q.label for q in queries]


def test_zs_into_zs_changes_nothing(model):
    queries = _queries(model)
    zs = last_token_activations(model, BOS, queries, OPTIONS)
    icl = last_token_activations(model, _icl_prefix(model), queries, OPTIONS)
    out = patch_layers(model, queries, OPTIONS, zs)  # the default ZS prefix: the tokenizer's BOS, [1]
    for c in COMPONENTS:
        assert out[c]["logit_diff"].shape == (len(queries), 3)
        assert torch.allclose(out[c]["logit_diff"], zs.logit_diff[:, None].expand(-1, 3), atol=1e-5)
        assert torch.equal(out[c]["correct"], zs.correct[:, None].expand(-1, 3))
        assert torch.allclose(recovered_share(out[c]["logit_diff"], zs.logit_diff, icl.logit_diff), torch.zeros(3), atol=1e-4)


def test_a_runs_own_activations_recover_all_of_its_effect(model):
    """Patched into the source run itself (the ICL prompt as the target), every site
    recovers 100% of the source's effect over ZS: the patch changes nothing there."""
    queries, prefix = _queries(model), _icl_prefix(model)
    zs = last_token_activations(model, BOS, queries, OPTIONS)
    icl = last_token_activations(model, prefix, queries, OPTIONS)
    out = patch_layers(model, queries, OPTIONS, icl, prefix=prefix)
    for c in COMPONENTS:
        assert torch.allclose(recovered_share(out[c]["logit_diff"], zs.logit_diff, icl.logit_diff), torch.ones(3), atol=1e-4)


@pytest.mark.parametrize("ablate", [False, True])
def test_fast_path_equals_full_forwards(model, ablate):
    """An ICL-style source (a longer prompt): every component and layer, cached last-token
    batch == one full forward per patch (transformer_lens.patching), with and without an
    ablation active in every pass."""
    queries = _queries(model)
    hooks = ablation_hooks(model, parse_ablation("1.0,mlp0")) if ablate else []
    icl = last_token_activations(model, _icl_prefix(model), queries, OPTIONS, hooks)
    zs = last_token_activations(model, BOS, queries, OPTIONS, hooks)
    fast = patch_layers(model, queries, OPTIONS, icl, hooks=hooks, prefix=BOS, batch_size=4)  # 9 rows: 3 batches
    ref = patch_layers_reference(model, queries, OPTIONS, icl, hooks=hooks, prefix=BOS)
    for c in COMPONENTS:
        assert torch.allclose(fast[c]["option_logits"], ref[c]["option_logits"], atol=1e-4)
        assert torch.allclose(fast[c]["logit_diff"], ref[c]["logit_diff"], atol=1e-4)
        assert torch.equal(fast[c]["correct"], ref[c]["correct"])
        # not vacuous: the source's vectors move the ZS answer
        assert (fast[c]["logit_diff"] - zs.logit_diff[:, None]).abs().max() > 1e-2
    if ablate:  # the ablation is active: without it the numbers differ
        plain = patch_layers(model, queries, OPTIONS, icl, prefix=BOS)
        assert not torch.allclose(plain["attn_out"]["logit_diff"], fast["attn_out"]["logit_diff"], atol=1e-3)


def test_nothing_is_recovered_before_the_changed_layer(model):
    """A GD-like source (the ZS prompt on a copy whose layer-1 W_V is perturbed): at the
    last position resid_pre of layers 0-1 and attn_out of layer 0 are the ZS run's own, so
    patching them recovers exactly nothing; the perturbed layer's attn_out does move it."""
    queries = _queries(model)
    other = copy.deepcopy(model)
    attn = other.blocks[1].attn
    w_v = attn._W_V if hasattr(attn, "_W_V") else attn.W_V
    with torch.no_grad():
        w_v.add_(torch.randn(w_v.shape, generator=torch.Generator().manual_seed(3)))
    zs = last_token_activations(model, BOS, queries, OPTIONS)
    gd = last_token_activations(other, BOS, queries, OPTIONS)
    out = patch_layers(model, queries, OPTIONS, gd, prefix=BOS)
    same = zs.logit_diff[:, None].expand(-1, 2)
    assert torch.allclose(out["resid_pre"]["logit_diff"][:, :2], same, atol=1e-5)
    assert torch.allclose(out["attn_out"]["logit_diff"][:, 0], zs.logit_diff, atol=1e-5)
    assert (out["attn_out"]["logit_diff"][:, 1] - zs.logit_diff).abs().max() > 1e-2


def test_one_layer_carries_the_whole_effect(model):
    """A hand-built source: the ZS run's own vectors except mlp_out of layer 1, plus a large
    push along the gold-minus-other unembedding direction. Patching that site raises the
    logit diff, to exactly what adding the push in a full forward gives; every other site
    gives the ZS logit diff back."""
    queries, j = _queries(model), 1
    zs = last_token_activations(model, BOS, queries, OPTIONS)
    W_U = model.unembed.W_U.detach()
    pushes = torch.stack([3.0 * (W_U[:, OPTIONS[q.label][0]] - W_U[:, OPTIONS[(q.label + 1) % 3][0]]) for q in queries])
    source = copy.deepcopy(zs)
    source.mlp_out[:, j] += pushes
    out = patch_layers(model, queries, OPTIONS, source, prefix=BOS)
    for c in COMPONENTS:
        for l in range(3):
            if (c, l) != ("mlp_out", j):
                assert torch.allclose(out[c]["logit_diff"][:, l], zs.logit_diff, atol=1e-5), (c, l)
    patched = out["mlp_out"]["logit_diff"][:, j]
    assert (patched > zs.logit_diff + 0.1).all()
    for i, q in enumerate(queries):
        direct = _logits(model, BOS, q, [(component_hook("mlp_out", j), _replace_last(zs.mlp_out[i, j] + pushes[i]))])
        assert torch.allclose(patched[i], logit_diff(direct[None], torch.tensor([q.label]))[0], atol=1e-5)


def test_head_indirect_effect_equals_full_forwards(model):
    queries = _queries(model, n=3)
    clean = last_token_activations(model, _icl_prefix(model, seed=1), queries, OPTIONS, with_z=True)
    mean_z = clean.z.mean(0)
    corrupted = _icl_prefix(model, seed=2)
    fast = head_indirect_effect(model, corrupted, queries, OPTIONS, mean_z, batch_size=5)  # 13 rows: 3 batches
    ref = head_indirect_effect_reference(model, corrupted, queries, OPTIONS, mean_z)
    assert fast.shape == (3, 4)
    assert torch.allclose(fast, ref, atol=1e-5)
    assert fast.abs().max() > 1e-4  # not vacuous


def test_head_indirect_effect_of_a_head_patched_with_its_own_value_is_zero(model):
    """mean_z = the corrupted run's own hook_z (one query): no head changes anything."""
    queries = _queries(model, n=1)
    corrupted = _icl_prefix(model, seed=2)
    own = last_token_activations(model, corrupted, queries, OPTIONS, with_z=True).z[0]
    assert torch.allclose(head_indirect_effect(model, corrupted, queries, OPTIONS, own), torch.zeros(3, 4), atol=1e-6)


def test_task_vector_accuracy_equals_hooked_forwards(model):
    queries = _queries(model, n=6)
    vectors = last_token_activations(model, _icl_prefix(model), queries, OPTIONS).resid_pre.mean(0)
    got = task_vector_accuracy(model, queries, OPTIONS, vectors, prefix=BOS)
    want = torch.zeros(3)
    for l in range(3):
        for q in queries:
            logits = _logits(model, BOS, q, [(component_hook("resid_pre", l), _replace_last(vectors[l]))])
            want[l] += float(logits.argmax() == q.label) / len(queries)
    assert torch.allclose(got, want)


def test_a_task_vector_that_names_one_answer_gives_that_answers_share(model):
    """resid_pre of the last layer replaced by a huge push towards option 0: every example
    answers option 0, so the accuracy there is the share of label-0 examples."""
    queries = _queries(model, n=6)
    W_U = model.unembed.W_U.detach()
    push = 2 * W_U[:, OPTIONS[0][0]] - W_U[:, OPTIONS[1][0]] - W_U[:, OPTIONS[2][0]]
    vectors = torch.zeros(3, model.cfg.d_model)
    vectors[2] = 1e3 * push
    acc = task_vector_accuracy(model, queries, OPTIONS, vectors, prefix=BOS)
    assert acc[2] == pytest.approx(sum(q.label == 0 for q in queries) / len(queries))


def test_logit_diff_and_recovered_share_by_hand():
    logits = torch.tensor([[1.0, 3.0, 2.0], [4.0, 0.0, -1.0]])
    assert logit_diff(logits, torch.tensor([1, 1])).tolist() == [1.0, -4.0]
    assert logit_diff(logits[:, None].expand(-1, 2, -1), torch.tensor([0, 0])).tolist() == [[-2.0, -2.0], [4.0, 4.0]]
    zs, source = torch.tensor([0.0, 0.0, 0.0]), torch.tensor([1.0, 2.0, 3.0])
    patched = torch.tensor([[0.5, 2.0], [1.0, 2.0], [1.5, 2.0]])
    # the least-squares slope of the patch's effect on the source's: (2+4+6) / (1+4+9) for the second site
    assert torch.allclose(recovered_share(patched, zs, source), torch.tensor([0.5, 12 / 14]))
    # an example the source barely moves does not dominate (a mean of ratios would be ~500)
    share = recovered_share(torch.tensor([[1.0], [1.0]]), torch.zeros(2), torch.tensor([1e-3, 2.0]))
    assert share.item() == pytest.approx(2.001 / 4.000001, rel=1e-6)
    # effects of opposite signs do not cancel (a ratio of means would divide by 0)
    opposite = torch.tensor([1.0, -1.0])
    assert recovered_share(opposite[:, None] * torch.tensor([[1.0, 0.5]]), torch.zeros(2), opposite).tolist() == [1.0, 0.5]
    assert recovered_share(patched, source, source).isnan().all()  # source == ZS: nothing to recover


def test_shuffled_label_demos(tokenizer, sst2_rows):
    lm = tiny_model(tokenizer, gqa=True, n_layers=1)
    task = load_task("sst2")
    train = sst2_rows["train"]
    p = build_prompts(lm.model, task, train, sst2_rows["validation"], k=8, seed=0, n_test=2)
    assert len(set(p.demo_labels)) > 1
    answer = {lm.model.tokenizer.convert_tokens_to_ids(w): i for i, w in enumerate(task.answers)}
    for seed in range(5):
        demos = shuffled_label_demos(p, task, train, lm.model, seed)
        assert demos == shuffled_label_demos(p, task, train, lm.model, seed)  # deterministic
        assert [d[:-1] for d in demos] == [d[:-1] for d in p.demos]  # the same rows, in order
        labels = [answer[d[-1]] for d in demos]
        assert sorted(labels) == sorted(p.demo_labels)  # a permutation of the labels
        assert labels != p.demo_labels  # the input-label mapping is broken
    assert len({tuple(map(tuple, shuffled_label_demos(p, task, train, lm.model, s))) for s in range(5)}) > 1
    with pytest.raises(UserError, match="does not match train_rows"):
        shuffled_label_demos(p, task, train[::-1], lm.model, 0)


def test_bad_inputs_are_one_line_errors(tokenizer):
    model = tiny_model(tokenizer, gqa=True, n_layers=2).model
    queries = _queries(model)
    zs = last_token_activations(model, BOS, queries, OPTIONS)
    with pytest.raises(UserError, match="examples"):
        patch_layers(model, queries[:2], OPTIONS, zs, prefix=BOS)
    with pytest.raises(UserError, match="components"):
        patch_layers(model, queries, OPTIONS, zs, components=("resid_post",), prefix=BOS)
    with pytest.raises(UserError, match="mean_z"):
        head_indirect_effect(model, BOS, queries, OPTIONS, torch.zeros(2, 2, 8))
    with pytest.raises(UserError, match="two answer options"):
        last_token_activations(model, BOS, queries, OPTIONS[:1])
    with pytest.raises(UserError, match="context"):
        last_token_activations(model, BOS * 600, queries, OPTIONS)
