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
    """docs/protocol.md: r, r' orthogonal to z and to each other, |r|^2 = |r'|^2 = 3|z|^2,
    give SimAOU_norm exactly 1/4 while SimAOU is 0."""
    z = vec(2.0, 0.0, 0.0)
    s = math.sqrt(3 * 4.0)
    icl, ft = z + vec(0.0, s, 0.0), z + vec(0.0, 0.0, s)
    assert math.isclose(M.simaou_norm(icl, z, ft).item(), 0.25, rel_tol=1e-6)
    assert abs(M.simaou(icl, z, ft).item()) < 1e-7


def test_random_baselines_hand_computed():
    zs, icl = vec(1.0, 0.0), vec(1.0, 1.0)  # ICL update (0, 1)
    r = vec(2.0, 1.0)
    # papers' code: r is the update itself: cos((0,1), (2,1)) = 1/sqrt(5)
    assert math.isclose(M.simaou_random(icl, zs, r).item(), 1 / math.sqrt(5), rel_tol=1e-6)
    # paper's text: r is a random output, its update r - h_ZS = (1, 1): cos = 1/sqrt(2)
    assert math.isclose(M.simaou_random_text(icl, zs, r).item(), 1 / math.sqrt(2), rel_tol=1e-6)
    # matched: the same formula with a random output of h_FT's length; (0,3) - (1,0) = (-1, 3)
    assert math.isclose(M.simaou_random_matched(icl, zs, vec(0.0, 3.0)).item(), 3 / math.sqrt(10), rel_tol=1e-6)


def test_uniform_vectors_are_seeded_and_in_unit_interval():
    u = M.uniform_vectors((50, 4, 16), seed=3)
    assert u.shape == (50, 4, 16) and (u >= 0).all() and (u < 1).all()
    assert abs(u.mean().item() - 0.5) < 0.02
    assert torch.equal(u, M.uniform_vectors((50, 4, 16), seed=3))
    assert not torch.equal(u, M.uniform_vectors((50, 4, 16), seed=4))


def test_matched_random_update_has_h_ft_lengths():
    h_ft = torch.randn(5, 4, 16)
    rand = M.random_update(h_ft, seed=0)
    assert torch.allclose(rand.norm(dim=-1), h_ft.norm(dim=-1), rtol=1e-5)
    assert torch.equal(rand, M.random_update(h_ft, seed=0))
    assert not torch.equal(rand, M.random_update(h_ft, seed=1))


def test_papers_random_baseline_is_chance_where_the_others_carry_minus_h_zs():
    """ICL updates that shrink a large h_ZS (u = -h_ZS/2 + noise), h_ZS symmetric around 0:
    against a random update, chance is 0. The papers' SimAOU_random is near 0; the text
    and matched variants subtract h_ZS from the random vector and score far above 0."""
    g = torch.Generator().manual_seed(0)
    n, d = 2000, 64
    zs = 5 * torch.randn(n, 1, d, generator=g)
    icl = zs - zs / 2 + torch.randn(n, 1, d, generator=g)
    ft = zs + torch.randn(n, 1, d, generator=g)  # only its length matters here
    r = M.uniform_vectors(zs.shape, seed=1)
    papers = M.simaou_random(icl, zs, r).mean().item()
    text = M.simaou_random_text(icl, zs, r).mean().item()
    matched = M.simaou_random_matched(icl, zs, M.random_update(ft, seed=1)).mean().item()
    assert abs(papers) < 0.02
    assert text > 0.5 and matched > 0.5


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


def test_update_size_against_a_plain_loop():
    g = torch.Generator().manual_seed(0)
    zs, new = torch.randn(3, 2, 5, generator=g), torch.randn(3, 2, 5, generator=g)
    zs[1, 0] = 0.0  # a zero ZS output: undefined, left out like a zero cosine
    got = M.update_size(zs, new)
    for e in range(3):
        for l in range(2):
            norm = math.sqrt(sum(float(x) ** 2 for x in zs[e, l]))
            if norm == 0:
                assert math.isnan(got[e, l].item())
                continue
            diff = math.sqrt(sum((float(a) - float(b)) ** 2 for a, b in zip(new[e, l], zs[e, l])))
            assert math.isclose(got[e, l].item(), diff / norm, rel_tol=1e-6)
    assert torch.equal(M.update_size(zs, zs).nan_to_num(), torch.zeros(3, 2))
