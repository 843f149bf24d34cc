"""Output-level metrics (outputs.py) against a direct computation from full logits."""

import math

import pytest
import torch

from lens_iclgd.errors import UserError
from lens_iclgd.metrics import f2t_mask
from lens_iclgd.outputs import output_metrics


def _full_probs(x, W, b, cap):
    z = x.double() @ W.double() + b.double()
    if cap:
        z = cap * torch.tanh(z / cap)
    return z.softmax(-1)


def _top(p_row, k):
    """The k most probable tokens with p > 0, ties to the lower id: sorted() is stable."""
    ranked = sorted(range(len(p_row)), key=lambda t: (-p_row[t], t))
    return [t for t in ranked if p_row[t] > 0][:k]


def _direct(p_a, p_b, k):
    ta, tb = _top(p_a.tolist(), k), _top(p_b.tolist(), k)
    shared = [t for t in ta if t in tb]
    overlap = len(shared) / max(len(ta), len(tb))
    va, vb = torch.tensor([p_a[t] for t in shared]), torch.tensor([p_b[t] for t in shared])
    cosine = float(va @ vb / (va.norm() * vb.norm())) if shared else 0.0
    kl = sum(float(p_a[t] * (p_a[t].log() - p_b[t].log())) for t in range(len(p_a)) if p_a[t] > 0)
    m = (p_a + p_b) / 2
    js = 0.5 * sum(float(p[t] * (p[t].log() - m[t].log())) for p in (p_a, p_b) for t in range(len(p)) if p[t] > 0)
    return overlap, cosine, kl, js


def _case(seed, vocab=53, d=6, n=5, zero_tail=0, ties=False):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d, vocab, generator=g)
    if ties:  # duplicate columns: equal logits for different tokens, in every row
        W[:, 10:20] = W[:, 0:10]
    b = torch.randn(vocab, generator=g) * 0.1
    if zero_tail:
        b[-zero_tail:] = float("-inf")  # tokens with no probability at all
    xs = {s: torch.randn(n, d, generator=g) for s in ("zs", "icl", "gd")}
    return W, b, xs


@pytest.mark.parametrize("top_k", [1, 3, 10, 60])
@pytest.mark.parametrize("cap", [0.0, 2.0])
@pytest.mark.parametrize("ties,zero_tail", [(False, 0), (True, 0), (False, 48)])
def test_pair_metrics_equal_a_full_logit_computation(top_k, cap, ties, zero_tail):
    W, b, xs = _case(top_k + int(cap), zero_tail=zero_tail, ties=ties)
    gold = torch.tensor([0, 3, 7, 11, 52])
    pairs = [("zs", "icl"), ("icl", "gd"), ("zs", "gd")]
    got = output_metrics(W, b, xs, gold, pairs, top_k=top_k, softcap=cap or None, chunk=7)
    probs = {s: _full_probs(x, W, b, cap) for s, x in xs.items()}
    for a, c in pairs:
        for i in range(5):
            want = _direct(probs[a][i], probs[c][i], top_k)
            have = [got["pairs"][f"{a}-{c}"][m][i].item() for m in ("top_k_overlap", "overlap_cosine", "kl", "js")]
            assert have == pytest.approx(want, abs=2e-5), (a, c, i)
            assert 0 <= have[3] <= math.log(2) + 1e-6
    for s, p in probs.items():
        want = torch.tensor([_top(row.tolist(), 1)[0] == g for row, g in zip(p, gold.tolist())])
        assert torch.equal(got["token_correct"][s], want)


def test_a_setting_against_itself_is_identical_and_ties_break_to_the_lower_id():
    W, b, xs = _case(0, ties=True)
    xs["same"] = xs["zs"].clone()
    got = output_metrics(W, b, xs, torch.zeros(5, dtype=torch.long), [("zs", "same")], top_k=15, chunk=4)["pairs"]["zs-same"]
    assert torch.equal(got["top_k_overlap"], torch.ones(5))
    assert torch.allclose(got["overlap_cosine"], torch.ones(5))
    assert got["kl"].abs().max() < 1e-6 and got["js"].abs().max() < 1e-6
    # tokens 1 and 3 tie for the best logit: the lower id wins, wherever the chunks split
    W2 = torch.zeros(2, 4)
    W2[0, 1] = W2[0, 3] = 1.0
    x = {"a": torch.tensor([[1.0, 0.0]])}
    for chunk in (1, 2, 3, 4):
        assert output_metrics(W2, None, x, torch.tensor([1]), [], top_k=1, chunk=chunk)["token_correct"]["a"].item()


def test_top_k_must_be_positive():
    W, b, xs = _case(0)
    with pytest.raises(UserError, match="top_k"):
        output_metrics(W, b, xs, torch.zeros(5, dtype=torch.long), [("zs", "icl")], top_k=0)


def test_f2t_mask_on_a_hand_built_case():
    zs = torch.tensor([False, False, True, False, False])
    icl = torch.tensor([True, True, True, False, True])
    ft = torch.tensor([True, False, True, True, True])
    assert f2t_mask(zs, icl, ft).tolist() == [True, False, False, False, True]


def test_a_cell_records_output_metrics_that_match_a_full_forward(tmp_path, tiny_hf_dir):
    """results.json and examples.csv against the model's own logits, from full prompts run
    without any cache (ZS and ICL; the finetuned settings share the code path)."""
    import json

    import pandas as pd

    from conftest import TEST_DATA
    from lens_iclgd.models import load_model
    from lens_iclgd.config import RunConfig
    from lens_iclgd.inputs import prepare
    from lens_iclgd.runner import run

    loaded = load_model(str(tiny_hf_dir))
    cfg = RunConfig(task="sst2", model=str(tiny_hf_dir), k=3, n_test=6, lr=0.02, data_dir=str(TEST_DATA), top_k=4)
    run(cfg, tmp_path, loaded)
    r = json.loads((tmp_path / "results.json").read_text())
    o = r["outputs"]
    assert o["top_k"] == 4 and set(o["pairs"]) == {"zs-icl", "icl-gd", "icl-lcgd", "zs-gd", "zs-lcgd", "gd-lcgd"}
    p = prepare(cfg.validate(), loaded).prompts
    model = loaded.model
    probs = {}
    with torch.no_grad():
        for name, prefix in (("zs", p.zs_prefix()), ("icl", p.icl_prefix())):
            probs[name] = torch.stack([model(torch.tensor([prefix + q.prompt]))[0, -1].double().softmax(-1) for q in p.queries])
    gold = [p.options[q.label][0] for q in p.queries]
    for name in ("zs", "icl"):
        want = sum(int(probs[name][i].argmax()) == g for i, g in enumerate(gold)) / len(gold)
        assert o["token_accuracy"][name] == pytest.approx(want)
    direct = [_direct(probs["zs"][i], probs["icl"][i], 4) for i in range(len(gold))]
    examples = pd.read_csv(tmp_path / "examples.csv")
    for j, name in enumerate(("top_k_overlap", "overlap_cosine", "kl", "js")):
        assert examples[f"zs-icl_{name}"].tolist() == pytest.approx([d[j] for d in direct], abs=1e-4)
        assert o["pairs"]["zs-icl"][name] == pytest.approx(sum(d[j] for d in direct) / len(direct), abs=1e-4)
    assert r["update_size"]["gd"]["kl_from_zs"] == o["pairs"]["zs-gd"]["kl"]
    f2t = examples["gd_f2t"] == (~examples["zs_correct"] & examples["icl_correct"] & examples["gd_correct"])
    assert f2t.all() and r["metrics"]["gd"]["f2t"]["n_examples"] == int(examples["gd_f2t"].sum())
