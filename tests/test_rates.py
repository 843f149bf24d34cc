"""Finding 3 by learning rate (rates.py): the three regimes on a hand-built sweep."""

import math

import pandas as pd
import pytest

from lens_iclgd import rates


def _row(task, lr, method, heldout, simam_delta, size):
    return {"model": "m", "loss": "mean", "k": 32, "n_test": 10, "task": task, "seed": 0, "lr": lr, "method": method,
            "SimAM_delta": simam_delta, "SimAOU": 0.0, "acc": 0.5, "acc_zs": 0.5, "heldout": heldout,
            "update_size": size, "kl_from_zs": 0.0}


def test_regimes_on_a_hand_built_sweep_and_a_short_sweep_left_out():
    rows = []
    # t1: GD's held-out best at 1e-2; LCGD's at 1e-3 (the sweep's lowest: an edge)
    for lr, (h_gd, h_lc), (s_gd, s_lc), (u_gd, u_lc) in (
            (1e-3, (0.5, 0.7), (0.05, 0.1), (0.05, 0.1)),
            (1e-2, (0.8, 0.6), (0.2, 0.3), (0.5, 1.0)),
            (1e-1, (0.6, 0.5), (0.1, 0.4), (2.0, 2.0))):
        rows += [_row("t1", lr, "gd", h_gd, s_gd, u_gd), _row("t1", lr, "lcgd", h_lc, s_lc, u_lc)]
    # t2: one rate so far; whatever it says must not count
    rows += [_row("t2", 1e-3, "gd", 0.9, 0.0, 0.1), _row("t2", 1e-3, "lcgd", 0.9, 0.9, 0.1)]
    res = rates.regimes(pd.DataFrame(rows))
    assert res["incomplete"] == {"t2": 1}
    (t1,) = res["per_task"].itertuples()
    assert (t1.lr_gd, t1.lr_lcgd, t1.edge) == (1e-2, 1e-3, True)
    assert (t1.gd, t1.a, t1.b) == (0.2, 0.3, 0.1)
    # (c): LCGD's SimAM_delta at GD's update size 0.5, linear in log size between 0.1 and 1.0
    assert t1.c == pytest.approx(0.1 + 0.2 * math.log(5) / math.log(10))
    v = res["verdicts"]
    assert (v["a"]["verdict"], v["b"]["verdict"], v["c"]["verdict"]) == ("agrees", "does not agree", "agrees")
    assert res["overall"] == "depends on the rate"
    assert [(b["lr"], b["wins"], b["tasks"]) for b in res["by_rate"]] == [(1e-3, 1, 1), (1e-2, 1, 1), (1e-1, 1, 1)]
    lines = rates.section([], None)  # no cells: no section
    assert lines == []


def test_a_chosen_rate_where_the_method_answered_one_label_on_held_out_is_flagged():
    """An unbalanced held-out set (20 against 12) lets a collapsed model (share 1.0) score
    0.625 and win the rule: the pick is flagged, not hidden; cells without the share say so."""
    rows = []
    for lr, h_lc, share in ((1e-3, 0.5, 0.7), (1e-2, 0.56, 0.8), (1e-1, 0.625, 1.0)):
        for m, h, sh in (("gd", 0.6, 0.6), ("lcgd", h_lc, share)):
            rows.append(_row("t1", lr, m, h, 0.1, 0.1) | {"heldout_share": sh})
    picks = rates.chosen(pd.DataFrame(rows)).set_index("method")
    assert picks.loc[["gd", "lcgd"], "lr"].tolist() == [1e-1, 1e-1]  # GD: a tie, so the largest
    assert picks.loc[["gd", "lcgd"], "collapsed"].tolist() == [False, True]
    (t1,) = rates.regimes(pd.DataFrame(rows))["per_task"].itertuples()
    assert t1.collapsed == "LCGD"
    older = [{k: v for k, v in r.items() if k != "heldout_share"} for r in rows]
    assert rates.chosen(pd.DataFrame(older))["collapsed"].isna().all()
    (t1,) = rates.regimes(pd.DataFrame(older))["per_task"].itertuples()
    assert t1.collapsed == "not recorded"


def test_a_rate_chosen_from_a_single_rate_sweep_is_an_edge():
    """With one rate swept the best may lie on either side of it: the pick is flagged."""
    rows = [_row("t1", 1e-3, m, 0.6, 0.1, 0.1) for m in ("gd", "lcgd")]
    assert rates.chosen(pd.DataFrame(rows))["edge"].tolist() == [True, True]
