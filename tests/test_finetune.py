"""GD and LCGD against independent reference computations, on tiny models."""

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model
from lens_iclgd.errors import TrainingDiverged
from lens_iclgd.finetune import finetuned, gd_losses, lcgd_losses, train
from lens_iclgd.models import kv_parameters
from lens_iclgd.prompts import build_prompts
from lens_iclgd.tasks import load_task


def _demos(lm, sst2_rows, k=3):
    p = build_prompts(lm.model, load_task("sst2"), sst2_rows["train"], sst2_rows["validation"], k=k, seed=0, n_test=4)
    return p


def _kv(lm):
    return {n: p for ps in kv_parameters(lm.model, lm.kv_bias).values() for n, p in ps}


def _only_kv_trainable(model, kv_by_layer):
    for q in model.parameters():
        q.requires_grad_(False)
    params = [p_ for ps in kv_by_layer.values() for _, p_ in ps]
    for q in params:
        q.requires_grad_(True)
    return params


def _reference_layer_grads(model, tokens, kv_by_layer):
    """Each layer's own loss, computed block by block on a detached input."""
    _, cache = model.run_with_cache(tokens)
    grads = {}
    for l, params in kv_by_layer.items():
        resid_pre = cache[f"blocks.{l}.hook_resid_pre"].detach()
        out = model.blocks[l](resid_pre)
        logits = model.unembed(model.ln_final(out))[0, :-1]
        loss = F.cross_entropy(logits, tokens[0, 1:], reduction="sum")
        for (name, p), g in zip(params, torch.autograd.grad(loss, [p for _, p in params])):
            grads[name] = g
    return grads


@pytest.mark.parametrize("gqa", [True, False])
def test_lcgd_gradients_equal_per_layer_reference(tokenizer, sst2_rows, gqa):
    lm = tiny_model(tokenizer, gqa=gqa, biases=not gqa)
    p = _demos(lm, sst2_rows)
    tokens = torch.tensor([p.bos + p.demos[0]])
    kv = kv_parameters(lm.model, lm.kv_bias)
    ref = _reference_layer_grads(lm.model, tokens, kv)

    params = _only_kv_trainable(lm.model, kv)
    lcgd = dict(zip([n for ps in kv.values() for n, _ in ps], torch.autograd.grad(lcgd_losses(lm.model, tokens).sum(), params)))
    gd = dict(zip(lcgd, torch.autograd.grad(gd_losses(lm.model, tokens).sum(), params)))
    for name in ref:
        assert torch.allclose(lcgd[name], ref[name], atol=1e-5, rtol=1e-4), name
    last = lm.model.cfg.n_layers - 1
    for name in ref:
        if name.startswith(f"blocks.{last}."):  # the last layer's own loss is GD's loss
            assert torch.allclose(gd[name], lcgd[name], atol=1e-5, rtol=1e-4)
        elif "W_" in name:
            assert not torch.allclose(gd[name], lcgd[name], atol=1e-3), f"GD and LCGD agree on {name}"


def test_gd_gradients_equal_full_model_loss(gqa_model, sst2_rows):
    model = gqa_model.model
    p = _demos(gqa_model, sst2_rows)
    tokens = torch.tensor([p.bos + p.demos[0]])
    params = _only_kv_trainable(model, kv_parameters(model, False))
    got = torch.autograd.grad(gd_losses(model, tokens).sum(), params)
    mean_loss = model(tokens, return_type="loss")  # TransformerLens's own loss: a mean over tokens
    want = torch.autograd.grad(mean_loss * (tokens.shape[1] - 1), params)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_lcgd_training_equals_reference_sgd_loop(tokenizer, sst2_rows):
    lm = tiny_model(tokenizer, gqa=True)
    ref_model = copy.deepcopy(lm.model)
    p = _demos(lm, sst2_rows, k=3)
    lr = 0.05
    log = train(lm.model, p.demos, p.bos, "lcgd", lr, lm.kv_bias, loss_reduction="sum")  # the reference sums
    kv_ref = kv_parameters(ref_model, False)
    for step, demo in enumerate(p.demos):
        grads = _reference_layer_grads(ref_model, torch.tensor([p.bos + demo]), kv_ref)
        with torch.no_grad():
            for l, params in kv_ref.items():
                norm = torch.stack([grads[n].norm() for n, _ in params]).norm()
                assert torch.allclose(log.grad_norms[l, step], norm, rtol=1e-4)
                for n, q in params:
                    q -= lr * grads[n]
    trained = dict(lm.model.named_parameters())
    for n, q in ref_model.named_parameters():
        assert torch.allclose(trained[n], q, atol=1e-5), n


def _perturb_layers_above(model, layer):
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for name, q in model.named_parameters():
            if name.startswith("blocks.") and int(name.split(".")[1]) > layer:
                q.add_(torch.randn(q.shape, generator=g))


@pytest.mark.parametrize("method,independent", [("lcgd", True), ("gd", False)])
def test_lcgd_update_of_layer_ignores_layers_above(tokenizer, sst2_rows, method, independent):
    """LCGD: layer l's update is the same whatever the layers above l hold. (GD, as a
    check that this test can fail, does depend on them.)"""
    lm = tiny_model(tokenizer, gqa=True, n_layers=4)
    p = _demos(lm, sst2_rows, k=3)
    other = copy.deepcopy(lm.model)
    layer = 1
    _perturb_layers_above(other, layer)
    train(lm.model, p.demos, p.bos, method, 0.05, False)
    train(other, p.demos, p.bos, method, 0.05, False)
    a, b = dict(lm.model.named_parameters()), dict(other.named_parameters())
    for name in _kv(lm):
        if int(name.split(".")[1]) <= layer:
            same = torch.allclose(a[name], b[name], atol=1e-6)
            if independent:
                assert same, name
            elif "W_" in name:
                assert not same, name


@pytest.mark.parametrize("method", ["gd", "lcgd"])
@pytest.mark.parametrize("biases", [False, True])
def test_only_kv_changes_and_finetuned_restores(tokenizer, sst2_rows, method, biases):
    lm = tiny_model(tokenizer, gqa=not biases, biases=biases)
    assert lm.kv_bias == biases
    p = _demos(lm, sst2_rows)
    before = {n: q.detach().clone() for n, q in lm.model.named_parameters()}
    kv_names = set(_kv(lm))
    # the summed loss: b_K's gradient is ~0 in exact arithmetic (a shift of every score in a
    # row), and the mean's ~20x smaller step can leave it below float32 resolution
    with finetuned(lm.model, p.demos, p.bos, method, 0.05, lm.kv_bias, loss_reduction="sum") as log:
        assert log.grad_norms.shape == (lm.model.cfg.n_layers, p.k)
        assert (log.grad_norms > 0).all()
        for n, q in lm.model.named_parameters():
            if n in kv_names:
                assert not torch.equal(q, before[n]), f"{n} was not trained"
            else:
                assert torch.equal(q, before[n]), f"{n} changed but is not a K/V parameter"
        assert any("b_K" in n for n in kv_names) == biases
    for n, q in lm.model.named_parameters():
        assert torch.equal(q, before[n]), f"{n} not restored"
        assert q.grad is None


def test_nan_loss_stops_with_step_and_layer(gqa_model, sst2_rows):
    p = _demos(gqa_model, sst2_rows)
    poison = [("blocks.1.hook_resid_post", lambda act, hook: act * float("nan"))]
    with pytest.raises(TrainingDiverged) as err:
        train(gqa_model.model, p.demos, p.bos, "lcgd", 0.01, False, hooks=poison)
    assert (err.value.step, err.value.layer) == (0, 1)
    assert "lower the learning rate" in str(err.value) and "\n" not in str(err.value)


def test_overflowing_weights_stop_training(gqa_model, sst2_rows):
    p = _demos(gqa_model, sst2_rows)
    with pytest.raises(TrainingDiverged, match="gd loss became"):
        train(gqa_model.model, p.demos, p.bos, "gd", 1e38, False)


def _plain_sgd(model, demos, bos, method, lr, step_unit, reduction="sum"):
    """An independent SGD loop: plain TransformerLens forwards, F.cross_entropy on full
    logits, per-layer losses block by block on detached inputs (LCGD), manual updates.
    `reduction` "mean": each (layer's) loss is F.cross_entropy's mean over the step's targets."""
    kv = kv_parameters(model, False)
    params = _only_kv_trainable(model, kv)
    n_steps = 0
    for demo in demos:
        tokens = torch.tensor([bos + demo])
        n = tokens.shape[1]
        # demo unit: one step scoring every position; token unit: one step per target t
        plan = [(n, list(range(n - 1)))] if step_unit == "demo" else [(t, [t - 1]) for t in range(1, n)]
        for length, positions in plan:
            inputs, targets = tokens[:, :length], tokens[0, [p + 1 for p in positions]]
            if method == "gd":
                loss = F.cross_entropy(model(inputs)[0, positions], targets, reduction=reduction)
            else:
                _, cache = model.run_with_cache(inputs)
                loss = sum(F.cross_entropy(model.unembed(model.ln_final(model.blocks[l](cache[f"blocks.{l}.hook_resid_pre"].detach())))[0, positions],
                                           targets, reduction=reduction) for l in range(model.cfg.n_layers))
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for q, g in zip(params, grads):
                    q -= lr * g
            n_steps += 1
    return n_steps


@pytest.mark.parametrize("method", ["gd", "lcgd"])
def test_step_units_equal_a_plain_sgd_loop(tokenizer, sst2_rows, method):
    lm = tiny_model(tokenizer, gqa=True)
    p = _demos(lm, sst2_rows, k=2)
    lr = 0.05
    start = copy.deepcopy(lm.model)
    trained = {}
    for unit in ("demo", "token"):
        model, ref = copy.deepcopy(start), copy.deepcopy(start)
        log = train(model, p.demos, p.bos, method, lr, False, step_unit=unit, loss_reduction="sum")
        n_ref = _plain_sgd(ref, p.demos, p.bos, method, lr, unit)
        want_steps = p.k if unit == "demo" else sum(len(p.bos + d) - 1 for d in p.demos)
        assert log.grad_norms.shape[1] == len(log.losses) == n_ref == want_steps
        assert log.step_unit == unit
        ref_params = dict(ref.named_parameters())
        trained[unit] = {n: q.detach().clone() for n, q in model.named_parameters() if n in _kv(lm)}
        for n, q in trained[unit].items():
            assert torch.allclose(q, ref_params[n], atol=1e-6, rtol=1e-5), (unit, n)
            assert not torch.equal(q, dict(start.named_parameters())[n]), (unit, n)
    assert want_steps > p.k
    assert any(not torch.allclose(trained["demo"][n], trained["token"][n], atol=1e-4) for n in trained["demo"])


def test_unknown_step_unit(gqa_model, sst2_rows):
    from lens_iclgd.errors import UserError

    p = _demos(gqa_model, sst2_rows)
    with pytest.raises(UserError, match="unknown step unit 'word'"):
        train(gqa_model.model, p.demos, p.bos, "gd", 0.01, False, step_unit="word")


@pytest.mark.parametrize("method", ["gd", "lcgd"])
def test_mean_loss_reduction_equals_a_plain_sgd_loop_on_token_mean_losses(tokenizer, sst2_rows, method):
    """--loss-reduction mean (the paper's code: fairseq divides the summed loss's gradient
    by the demonstration's target count) against an independent loop on F.cross_entropy's
    mean, to 1e-6; and with one demonstration, mean at lr is sum at lr / (its targets)."""
    lm = tiny_model(tokenizer, gqa=True)
    p = _demos(lm, sst2_rows, k=3)
    start = copy.deepcopy(lm.model)
    kv_names = set(_kv(lm))

    def kv_after(model):
        return {n: q.detach().clone() for n, q in model.named_parameters() if n in kv_names}

    lr = 0.5
    model, ref = copy.deepcopy(start), copy.deepcopy(start)
    log = train(model, p.demos, p.bos, method, lr, False, loss_reduction="mean")
    _plain_sgd(ref, p.demos, p.bos, method, lr, "demo", reduction="mean")
    assert log.loss_reduction == "mean"
    got, want = kv_after(model), kv_after(ref)
    for n in got:
        assert torch.allclose(got[n], want[n], atol=1e-6, rtol=1e-5), n
        assert not torch.equal(got[n], dict(start.named_parameters())[n]), n
    summed = copy.deepcopy(start)
    train(summed, p.demos, p.bos, method, lr, False, loss_reduction="sum")
    assert any(not torch.allclose(kv_after(summed)[n], got[n], atol=1e-4) for n in got)

    one = p.demos[:1]
    n_targets = len(p.bos + one[0]) - 1
    a, b = copy.deepcopy(start), copy.deepcopy(start)
    log_mean = train(a, one, p.bos, method, lr, False, loss_reduction="mean")
    log_sum = train(b, one, p.bos, method, lr / n_targets, False, loss_reduction="sum")
    assert torch.allclose(log_mean.losses * n_targets, log_sum.losses, rtol=1e-5)
    for n, q in kv_after(a).items():
        assert torch.allclose(q, kv_after(b)[n], atol=1e-6, rtol=1e-5), n


def test_unknown_loss_reduction(gqa_model, sst2_rows):
    from lens_iclgd.errors import UserError

    p = _demos(gqa_model, sst2_rows)
    with pytest.raises(UserError, match="unknown loss reduction 'avg': use mean"):
        train(gqa_model.model, p.demos, p.bos, "gd", 0.01, False, loss_reduction="avg")
