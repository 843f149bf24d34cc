"""Each metric against a hand-computed case."""

import math

import torch

from lens_iclgd import metrics as M

NAN = float("nan")


def vec(*xs):
    return torch.tensor(xs, dtype=torch.float32)[None, None]  # [example=1, layer=1, d]


def test_simaou_hand_computed():
    zs, icl, ft = vec(1.0, 0.0, 0.0), vec(1.0, 1.0, 0.0), vec(1.0, 1.0, 1.0)
    # updates (0,1,0) and (0,1,1): cos = 1/sqrt(2)
    assert math.isclose(M.simaou(icl, zs, ft).item(), 1 / math.sqrt(2), rel_tol=1e-6)
    # opposite updates
    assert math.isclose(M.simaou(icl, zs, vec(1.0, -2.0, 0.0)).item(), -1.0, rel_tol=1e-6)


def test_simaou_norm_is_one_quarter_for_orthogonal_random_updates():
    """PROTOCOL.md: r, r' orthogonal to z and to each other, |r|^2 = |r'|^2 = 3|z|^2,
    give SimAOU_norm exactly 1/4 while SimAOU is 0."""
    z = vec(2.0, 0.0, 0.0)
    s = math.sqrt(3 * 4.0)
    icl, ft = z + vec(0.0, s, 0.0), z + vec(0.0, 0.0, s)
    assert math.isclose(M.simaou_norm(icl, z, ft).item(), 0.25, rel_tol=1e-6)
    assert abs(M.simaou(icl, z, ft).item()) < 1e-7


def test_simaou_random_and_random_update():
    zs, icl = vec(1.0, 0.0), vec(1.0, 1.0)
    r = vec(0.0, 3.0)
    # update of the stand-in: (-1, 3); ICL update (0, 1): cos = 3/sqrt(10)
    assert math.isclose(M.simaou_random(icl, zs, r).item(), 3 / math.sqrt(10), rel_tol=1e-6)
    h_ft = torch.randn(5, 4, 16)
    rand = M.random_update(h_ft, seed=0)
    assert torch.allclose(rand.norm(dim=-1), h_ft.norm(dim=-1), rtol=1e-5)
    assert torch.equal(rand, M.random_update(h_ft, seed=0))
    assert not torch.equal(rand, M.random_update(h_ft, seed=1))


def test_simam_per_head_ignores_absent_keys():
    # one example, one layer, two heads, three key slots; the last key is absent (NaN)
    icl = torch.tensor([[[[1.0, 2.0, NAN], [0.0, 1.0, NAN]]]])
    ft = torch.tensor([[[[2.0, 1.0, NAN], [0.0, -3.0, NAN]]]])
    got = M.simam(icl, ft)[0, 0]
    assert math.isclose(got[0].item(), 4 / 5, rel_tol=1e-6)  # (2+2)/(sqrt5*sqrt5)
    assert math.isclose(got[1].item(), -1.0, rel_tol=1e-6)
    summary = M.summarize(M.simam(icl, ft))
    assert math.isclose(summary["per_layer"][0], (0.8 - 1.0) / 2, rel_tol=1e-6)
    assert summary["per_head"] == [[summary["per_head"][0][0], summary["per_head"][0][1]]]


def test_simam_delta_and_alpha():
    zs = torch.tensor([[[[1.0, 1.0, 1.0]]]])
    icl = torch.tensor([[[[2.0, 1.0, 1.0]]]])  # update (1, 0, 0)
    ft = torch.tensor([[[[2.0, 2.0, 1.0]]]])  # update (1, 1, 0)
    assert math.isclose(M.simam_delta(icl, zs, ft).item(), 1 / math.sqrt(2), rel_tol=1e-6)
    lcgd = torch.tensor([[[[1.0, 1.0, 3.0]]]])  # update (0, 0, 2): orthogonal to GD's
    assert abs(M.alpha(lcgd, ft, zs).item()) < 1e-7
    assert math.isclose(M.alpha(icl, ft, zs).item(), 1 / math.sqrt(2), rel_tol=1e-6)


def test_zero_update_is_undefined_not_zero():
    zs = vec(1.0, 2.0)
    assert math.isnan(M.simaou(zs, zs, vec(0.0, 1.0)).item())
    assert M.summarize(M.simaou(zs, zs, vec(0.0, 1.0)))["mean"] is None


def test_rec2ftp_hand_computed():
    zs = torch.tensor([False, False, False, True, False])
    ft = torch.tensor([True, True, False, True, True])
    icl = torch.tensor([True, False, True, True, True])
    # ZS wrong and FT right: examples 0, 1, 4; ICL right on 0 and 4 -> 2/3
    value, n = M.rec2ftp(zs, ft, icl)
    assert n == 3 and math.isclose(value, 2 / 3)
    value, n = M.rec2ftp(zs, torch.zeros(5, dtype=torch.bool), icl)
    assert n == 0 and math.isnan(value)


def test_summarize_averages_examples_then_layers():
    values = torch.tensor([[1.0, 0.0], [0.0, NAN], [0.5, 1.0]])  # [example, layer]
    s = M.summarize(values)
    assert s["per_layer"] == [0.5, 0.5]
    assert s["mean"] == 0.5
