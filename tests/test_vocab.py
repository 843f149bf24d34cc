"""The chunked vocabulary pass (vocab.py) against full logits: cross-entropy and its
gradient, log-probabilities in row blocks, under float32 and the bfloat16 modes."""

import pytest
import torch
import torch.nn.functional as F

from lens_iclgd.precision import computing
from lens_iclgd.vocab import linear_cross_entropy


# bfloat16 keeps 8 bits of mantissa: products are off by a few 1e-3 relative
TOLERANCE = {"float32": 1e-5, "bfloat16": 3e-2, "vocab-bf16": 3e-2}


@pytest.mark.parametrize("mode", list(TOLERANCE))
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_linear_cross_entropy_matches_full_logits(softcap, mode):
    """Under a bfloat16 mode against float32 F.cross_entropy too: the matrix products are
    bfloat16, the running max/sum/gradient float32."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 8, generator=g, requires_grad=True)
    W, b = torch.randn(8, 50, generator=g), torch.randn(50, generator=g)
    t = torch.randint(0, 50, (6,), generator=g)
    weights = torch.rand(6, generator=g)
    with computing(mode, x.device):
        got = linear_cross_entropy(x, W, b, t, softcap, chunk=7)  # chunks that do not divide 50
    (got * weights).sum().backward()
    grad_got = x.grad.clone()
    x.grad = None
    logits = x @ W + b
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    want = F.cross_entropy(logits, t, reduction="none")
    (want * weights).sum().backward()
    tol = TOLERANCE[mode]
    assert got.dtype == grad_got.dtype == torch.float32
    assert torch.allclose(got, want, atol=tol, rtol=tol)
    assert torch.allclose(grad_got, x.grad, atol=tol, rtol=tol)
    if mode != "float32":  # the bfloat16 products really ran
        assert (got - want).abs().max() > 1e-5


def test_log_probs_in_row_blocks_match_full_log_softmax(gqa_model, monkeypatch):
    from lens_iclgd import vocab

    model = gqa_model.model
    g = torch.Generator().manual_seed(1)
    x = torch.randn(11, model.cfg.d_model, generator=g)
    t = torch.randint(0, model.cfg.d_vocab, (11,), generator=g)
    monkeypatch.setattr(vocab, "MAX_ROWS", 4)  # three blocks, the last one short
    got = vocab.log_probs(model, x, t, chunk=1000)
    want = model.unembed(x[None])[0].log_softmax(-1)[torch.arange(11), t]
    assert torch.allclose(got, want, atol=1e-5)
