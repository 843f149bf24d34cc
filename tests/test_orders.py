"""Order sensitivity (`run --orders N`): one result per permutation of the same
demonstrations, the spread and prediction stability across orders."""

import json

import pandas as pd
import pytest

from conftest import TEST_DATA, run_cli


def test_order_sensitivity_returns_one_result_per_permutation(tmp_path, tiny_hf_dir):
    out = tmp_path / "orders"
    proc = run_cli(["run", "--task", "sst2", "--data-dir", str(TEST_DATA), "--model", str(tiny_hf_dir),
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
    assert all(0 <= summary["prediction_stability"][s]["changed_from_zs"] <= 1 for s in ("icl", "gd", "lcgd"))
    assert summary["spread"]["acc_zs"]["std"] == 0.0
    assert "ICL" in proc.stdout and "flip rate" in proc.stdout and "one label" in proc.stdout
    # a cell made before a stability field existed gets it from its examples.csv, nothing else changes
    from lens_iclgd.orders import refresh_stability

    older = json.loads((out / "orders.json").read_text())
    for st in older["prediction_stability"].values():
        del st["majority_label_share"]
    (out / "orders.json").write_text(json.dumps(older))
    assert refresh_stability(out) == summary == json.loads((out / "orders.json").read_text())


def test_prediction_stability_on_hand_built_predictions():
    """Four test examples, three orders: ICL flips example 1 in order 2 and example 3 in
    orders 1 and 2; GD never moves off ZS (no order sensitivity, and nothing changed)."""
    from lens_iclgd.orders import prediction_stability

    zs = pd.DataFrame({p: ["a", "b", "a", "b"] for p in range(3)})
    icl = pd.DataFrame({0: ["a", "a", "a", "a"], 1: ["a", "a", "a", "b"], 2: ["a", "b", "a", "b"]})
    got = prediction_stability({"zs": zs, "icl": icl, "gd": zs.copy()})
    assert got["zs"] == {"same_prediction_in_every_order": 1.0, "mean_pairwise_disagreement": 0.0,
                         "majority_label_share": 0.5}
    assert got["icl"]["majority_label_share"] == pytest.approx((4 + 3 + 2) / 12)  # "a", pooled over orders
    assert got["icl"]["same_prediction_in_every_order"] == pytest.approx(2 / 4)
    # pairs (0,1): example 3 differs; (0,2): examples 1, 3; (1,2): example 1
    assert got["icl"]["mean_pairwise_disagreement"] == pytest.approx((1 / 4 + 2 / 4 + 1 / 4) / 3)
    # off ZS: order 0 examples 1, 3; order 1 example 1; order 2 none
    assert got["icl"]["changed_from_zs"] == pytest.approx((2 / 4 + 1 / 4 + 0) / 3)
    assert got["gd"]["changed_from_zs"] == 0.0 and got["gd"]["mean_pairwise_disagreement"] == 0.0
    assert "changed_from_zs" not in got["zs"]


def test_ceiling_is_one_against_the_same_order_and_matches_a_direct_computation(tmp_path, tiny_hf_dir):
    """orders.ceilings: a method against itself in the same order scores exactly 1; against
    another order, SimAOU equals the cosine of the two orders' updates computed here from
    fresh recordings (no stage, no orders.py code)."""
    import torch

    from lens_iclgd.config import RunConfig
    from lens_iclgd.inputs import prepare
    from lens_iclgd.models import load_model
    from lens_iclgd.orders import ceilings, run_orders
    from lens_iclgd.recording import record

    loaded = load_model(str(tiny_hf_dir))
    cfg = RunConfig(task="sst2", model=str(tiny_hf_dir), data_dir=str(TEST_DATA), k=4, n_test=6, lr=0.02,
                    methods=("icl",), orders=2)
    summary = run_orders(cfg, tmp_path / "o", loaded, tmp_path / "stages")
    recs = []
    for p in range(2):
        prompts = prepare(RunConfig(**{**cfg.__dict__, "order": p, "orders": 1}).validate(), loaded).prompts
        recs.append({"icl": record(loaded.model, prompts.icl_prefix(), prompts.queries, prompts.options)})
    zs = record(loaded.model, prompts.zs_prefix(), prompts.queries, prompts.options)
    d0, d1 = (r["icl"].attn_out.double() - zs.attn_out.double() for r in recs)
    direct = torch.nn.functional.cosine_similarity(d0, d1, dim=-1).mean(0).mean().item()
    assert summary["ceiling"]["icl"]["SimAOU"]["mean"] == pytest.approx(direct, abs=1e-5)
    assert summary["ceiling"]["icl"]["SimAOU"]["n_pairs"] == 1 and direct < 0.999  # the order matters
    same = ceilings(zs, [recs[0], recs[0]], seed=0, loaded=loaded)["icl"]
    for name in ("SimAOU", "SimAOU_norm", "SimAM", "SimAM_delta", "out_top_k_overlap", "out_overlap_cosine"):
        assert same[name]["mean"] == pytest.approx(1.0, abs=1e-5), name
    assert same["out_kl"]["mean"] == pytest.approx(0.0, abs=1e-5) and same["out_js"]["mean"] == pytest.approx(0.0, abs=1e-5)
    # the output-level ceiling against the other order, from full logits computed here
    W, b = loaded.model.unembed.W_U.double(), loaded.model.unembed.b_U.double()
    p0, p1 = (torch.softmax(r["icl"].final_resid.double() @ W + b, -1) for r in recs)
    mix = (p0 + p1) / 2
    js = (0.5 * (p0 * (p0 / mix).log()).sum(-1) + 0.5 * (p1 * (p1 / mix).log()).sum(-1)).mean().item()
    kl = (p0 * (p0 / p1).log()).sum(-1).mean().item()
    assert summary["ceiling"]["icl"]["out_js"]["mean"] == pytest.approx(js, abs=1e-5)
    assert summary["ceiling"]["icl"]["out_kl"]["mean"] == pytest.approx(kl, abs=1e-5) and kl > 1e-6
    top0, top1 = p0.topk(10).indices, p1.topk(10).indices
    overlap = sum(len(set(a.tolist()) & set(c.tolist())) for a, c in zip(top0, top1)) / (10 * len(top0))
    assert summary["ceiling"]["icl"]["out_top_k_overlap"]["mean"] == pytest.approx(overlap, abs=1e-6)
    table = pd.read_csv(tmp_path / "o" / "orders.csv")
    assert {"tok_zs", "tok_icl", "out_zs-icl_js"} <= set(table.columns)  # output metrics per order, for their spread


def test_a_grid_runs_order_cells_and_the_report_reads_them(tmp_path, tiny_hf_dir):
    """`orders = 2` in a grid: the cell is done when orders.json is written, a rerun skips
    it, and the report's Shen et al. section and its ceilings come from it."""
    from conftest import grid_file

    config = grid_file(tmp_path / "g.toml", [tiny_hf_dir], TEST_DATA, seeds=[0], lrs=[0.02], orders=2, k=4)
    results = tmp_path / "results"
    first = run_cli(["grid", str(config), "--results", str(results), "--scratch", str(tmp_path / "scratch")])
    assert first.returncode == 0, first.stderr
    (cell,) = (results / "cells").iterdir()
    assert "__orders2__" in cell.name and (cell / "orders.json").exists() and (cell / "order1" / "results.json").exists()
    again = run_cli(["grid", str(config), "--results", str(results), "--scratch", str(tmp_path / "scratch")])
    assert "1 already done, 0 to run" in again.stdout
    report = run_cli(["report", str(results), "--out", str(tmp_path / "report")])
    assert report.returncode == 0, report.stderr
    text = (tmp_path / "report" / "report.md").read_text()
    assert "## Shen et al.: order sensitivity and output-level comparisons" in text and "ceiling ICL-ICL" in text
