"""The causal study of one cell (causal.py): `lens-iclgd patch`, `run --patching`, grids.
The patching computations themselves are tested against TransformerLens in test_patching.py."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import TEST_DATA, cli_in_process, grid_file, save_tiny_llama
from lens_iclgd import patching as P
from lens_iclgd.causal import centre_of_mass, profile_overlap, run_patching
from lens_iclgd.config import RunConfig
from lens_iclgd.findings import COLLAPSED_SHARE
from lens_iclgd.finetune import finetuned
from lens_iclgd.grid import cell_id, cells, load_grid, run_grid
from lens_iclgd.inputs import prepare
from lens_iclgd.models import load_model


def _config(tiny_hf_dir, **over):
    return RunConfig(**{"task": "sst2", "model": str(tiny_hf_dir), "k": 3, "n_test": 6, "lr": 0.05, "seed": 0,
                        "data_dir": str(TEST_DATA), "patching": True, "patch_heads": 2, **over})


def test_a_patching_cell_writes_its_study_and_reproduces_byte_for_byte(tiny_hf_dir, tmp_path):
    loaded = load_model(str(tiny_hf_dir))
    cfg = _config(tiny_hf_dir)
    result = run_patching(cfg, tmp_path / "a", loaded)
    for name in ("patching.json", "patching.parquet", "patching_layers.png", "patching_heads.png", "patching_timings.json"):
        assert (tmp_path / "a" / name).is_file(), name
    timings = json.loads((tmp_path / "a" / "patching_timings.json").read_text())
    assert timings["provenance"]["package_version"] and "provenance" not in result  # the version beside, not in, the study
    n_layers = loaded.model.cfg.n_layers
    assert set(result["layers"]) == {"icl", "gd", "lcgd"}
    assert all(len(result["layers"][s][c]["recovered_share"]) == n_layers for s in result["layers"] for c in P.COMPONENTS)
    assert np.array(result["heads"]["icl"]["indirect_effect"]).shape == (n_layers, loaded.model.cfg.n_heads)
    assert len(result["task_vectors"]["icl"]["accuracy"]) == n_layers

    # the recorded shares are the least-squares slopes of the per-example table
    table = pd.read_parquet(tmp_path / "a" / "patching.parquet")
    sub = table[(table.source == "gd") & (table.component == "attn_out") & (table.layer == 1)]
    effect = sub.source_logit_diff - sub.zs_logit_diff
    want = ((sub.logit_diff - sub.zs_logit_diff) * effect).sum() / (effect ** 2).sum()
    assert result["layers"]["gd"]["attn_out"]["recovered_share"][1] == pytest.approx(want, abs=1e-5)

    # GD trains K/V only: its ZS-prompt run has the trained model's embeddings, so patching
    # GD's layer-0 resid_pre recovers nothing, and its final layers carry the whole effect
    assert result["layers"]["gd"]["resid_pre"]["recovered_share"][0] == pytest.approx(0, abs=1e-5)

    # the same cell again, from its stages and from nothing: the same bytes
    run_patching(cfg, tmp_path / "b", loaded, stages_dir=tmp_path / "a" / "stages")
    run_patching(cfg, tmp_path / "c", load_model(str(tiny_hf_dir)))
    first = (tmp_path / "a" / "patching.json").read_bytes()
    assert first == (tmp_path / "b" / "patching.json").read_bytes() == (tmp_path / "c" / "patching.json").read_bytes()


def test_the_gd_source_is_the_finetuned_models_own_run(tiny_hf_dir, tmp_path):
    """Independently of causal.py: train GD as the cell does, record its last token, patch
    its attn_out into ZS; the cell's recorded profile is that computation's."""
    loaded = load_model(str(tiny_hf_dir))
    cfg = _config(tiny_hf_dir, methods=("icl", "gd"), patch_heads=0)
    result = run_patching(cfg, tmp_path / "run", loaded)
    inp = prepare(cfg.validate(), loaded)
    p, model = inp.prompts, loaded.model
    zs = P.last_token_activations(model, p.zs_prefix(), p.queries, p.options)
    with finetuned(model, p.demos, p.bos, "gd", 0.05, loaded.kv_bias, loss_reduction="mean"):
        gd = P.last_token_activations(model, p.zs_prefix(), p.queries, p.options)
    ref = P.patch_layers_reference(model, p.queries, p.options, gd, ("attn_out",), prefix=p.zs_prefix())
    share = P.recovered_share(ref["attn_out"]["logit_diff"], zs.logit_diff, gd.logit_diff)
    assert result["layers"]["gd"]["attn_out"]["recovered_share"] == pytest.approx(share.tolist(), abs=1e-4)
    assert result["layers"]["gd"]["accuracy"] == pytest.approx(gd.correct.float().mean().item(), abs=1e-6)
    assert result["heads"] == {} and result["n_head_examples"] == 0


def test_profile_overlap_and_depth_on_hand_cases():
    assert profile_overlap([0, 0.5, 1.0], [0, 1.0, 2.0]) == pytest.approx(1.0)
    assert profile_overlap([0, 0.5, 1.0], [1.0, 0.5, 0]) == pytest.approx(-1.0)
    assert profile_overlap([0, None, 1.0], [0, 1.0, 2.0]) is None  # two defined layers: no correlation
    assert profile_overlap([1, 1, 1], [0, 1, 2]) is None  # a flat profile
    assert centre_of_mass([0, 0, 1.0]) == pytest.approx(1.0)
    assert centre_of_mass([1.0, -5.0, 1.0]) == pytest.approx(0.5)  # negative shares carry no mass
    assert centre_of_mass([0, None, 0]) is None


@pytest.fixture(scope="module")
def four_layer_hf_dir(tmp_path_factory, tokenizer):
    """Four layers: a per-layer profile needs three defined layers for a correlation."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_four"), tokenizer, n_layers=4, seed=1)


def test_patch_command_grid_key_and_bad_input(tiny_hf_dir, four_layer_hf_dir, tmp_path, capsys):
    base = ["--model", str(tiny_hf_dir), "--task", "sst2", "--data-dir", str(TEST_DATA), "--k", "3", "--n-test", "4",
            "--lr", "0.05", "--patch-heads", "1"]
    code, stdout, stderr = cli_in_process(["patch", *base, "--out", str(tmp_path / "cli")], capsys)
    assert code == 0, stderr
    assert "recovered share (best layer)" in stdout and "task vector (ICL mean resid_pre)" in stdout
    assert json.loads((tmp_path / "cli" / "patching.json").read_text())["n_test"] == 4
    code, _, stderr = cli_in_process(["run", *base, "--patching", "--orders", "2", "--out", str(tmp_path / "x")], capsys)
    assert code == 1 and stderr.count("\n") == 1 and "--patching and --orders exclude each other" in stderr
    code, _, stderr = cli_in_process(["patch", *base, "--methods", "icl", "--out", str(tmp_path / "y")], capsys)
    assert code == 1 and "keep icl and at least one of gd, lcgd" in stderr

    path = grid_file(tmp_path / "tiny.toml", [str(four_layer_hf_dir)], TEST_DATA, seeds=[0], lrs=[0.5], k=3, n_test=8,
                     patching=True, patch_heads=1, methods=["gd"])
    grid = load_grid(path)
    (cell,) = cells(grid)
    assert "__patching__" in cell_id(cell)
    assert cell_id(cell) != cell_id(RunConfig(**{**cell.__dict__, "patching": False}))
    results = tmp_path / "r"
    assert run_grid(grid, results)["done"] == 1
    assert (results / "cells" / cell_id(cell) / "patching.json").is_file()
    assert run_grid(grid, results)["ran"] == 0  # finished: skipped

    # the report's causal section: the cell's own numbers, the rule's verdict, the figure
    from lens_iclgd.patch_report import model_summary
    from lens_iclgd.report import collect, write_report

    assert collect(results).missing == 0  # a finished patching cell counts as done
    text = (write_report(results) / "report.md").read_text()
    cell_json = json.loads((results / "cells" / cell_id(cell) / "patching.json").read_text())
    overlaps = [cell_json["overlap"][w]["icl-gd"] for w in ("attn_out", "mlp_out")]
    assert all(v is not None for v in overlaps), overlaps
    overlap = np.mean(overlaps)
    shares = {s: cell_json["layers"][s]["majority_label_share"] for s in ("icl", "gd")}
    assert all(1 / 2 <= v <= 1 for v in shares.values()), shares  # two options
    # the tiny model answers one label on its 8 test examples, with and without demonstrations:
    # the report leaves the task out of GD's mean and names it; the verdict's arithmetic is
    # checked with the shares unset (a cell from before they were recorded)
    assert min(shares.values()) >= COLLAPSED_SHARE, shares
    summary = model_summary([cell_json])
    assert summary["methods"]["gd"]["overlap"] is None and summary["methods"]["gd"]["verdict"] == "not available"
    task = Path(cell_json["config"]["task"]).stem
    assert (f"Left out of GD's mean, collapsed to one label (majority-label share): {task} (ICL {shares['icl']:.2f}, "
            f"GD {shares['gd']:.2f})") in text
    for s in shares:
        del cell_json["layers"][s]["majority_label_share"]
    summary = model_summary([cell_json])
    assert summary["methods"]["gd"]["overlap"] == pytest.approx(overlap)
    want = "carried where ICL's is" if overlap >= 0.5 else "not carried where ICL's is" if overlap < 0.2 else "partly"
    assert summary["methods"]["gd"]["verdict"].startswith(want)
    assert "## Where the effect is carried: activation patching" in text
    assert (results / "report" / "fig_patching.png").is_file()


def test_refreshing_an_old_cell_adds_the_shares_from_its_stages_and_nothing_else(tiny_hf_dir, tmp_path):
    from lens_iclgd.causal import refresh_majority_shares
    from lens_iclgd.errors import UserError

    config = _config(tiny_hf_dir)
    out, stages = tmp_path / "cell", tmp_path / "stages"
    run_patching(config, out, stages_dir=stages)
    fresh = (out / "patching.json").read_bytes()
    old = json.loads(fresh)  # as the code before the shares wrote it
    old.pop("zs_majority_label_share")
    old["definitions"].pop("majority_label_share")
    for v in old["layers"].values():
        v.pop("majority_label_share")
    (out / "patching.json").write_text(json.dumps(old))
    refresh_majority_shares(config, out, stages)
    assert (out / "patching.json").read_bytes() == fresh
    # a number the stages do not reproduce, or a missing stage: an error, nothing rewritten
    old["layers"]["gd"]["effect"] += 1
    (out / "patching.json").write_text(json.dumps(old))
    with pytest.raises(UserError, match="do not reproduce"):
        refresh_majority_shares(config, out, stages)
    next(stages.glob("patch-layers-gd-*.pt")).unlink()
    with pytest.raises(UserError, match="is missing"):
        refresh_majority_shares(config, out, stages)
    assert json.loads((out / "patching.json").read_text()) == old


def test_a_collapsed_run_leaves_the_overlap_mean_and_is_named():
    from lens_iclgd.patch_report import model_summary

    cells = [_hand_cell("sst2", 0.6, 0.8, 0.7, 0.5, gd_share=0.6),
             _hand_cell("mr", 0.6, 0.8, -0.4, -0.2, gd_share=0.96),    # GD collapsed
             _hand_cell("subj", 0.6, 0.8, 0.1, 0.3, icl_share=1.0),    # ICL collapsed
             _hand_cell("cb", 0.6, 0.8, 0.2, 0.2)]                     # recorded before the share: kept
    gd = model_summary(cells)["methods"]["gd"]
    assert gd["overlap"] == pytest.approx((0.6 + 0.2) / 2) and gd["n_tasks"] == 2
    assert gd["overlap_icl_helps"] == pytest.approx(0.4)
    assert gd["left_out"] == ["mr (GD 0.96)", "subj (ICL 1.00)"]
    # at the threshold: collapsed; just below: kept
    assert model_summary([_hand_cell("mr", 0.6, 0.8, 0.1, 0.1, gd_share=0.95)])["methods"]["gd"]["n_tasks"] == 0
    assert model_summary([_hand_cell("mr", 0.6, 0.8, 0.1, 0.1, gd_share=0.949)])["methods"]["gd"]["n_tasks"] == 1


def test_majority_label_share_counts_the_runs_own_predictions():
    from lens_iclgd.patching import LastToken

    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [5.0, 0.0, 0.0], [1.0, 0.0, 4.0], [3.0, 2.0, 1.0]])
    empty = torch.zeros(5, 1, 2)
    run = LastToken(empty, empty, empty, logits, torch.zeros(5, dtype=torch.long))
    assert run.majority_label_share == pytest.approx(3 / 5)  # option 0 on examples 0, 2, 4
    run.option_logits = torch.tensor([[0.0, 1.0]] * 4)
    assert run.majority_label_share == 1.0


def _hand_cell(task: str, zs_acc: float, icl_acc: float, gd_attn: float, gd_mlp: float,
               icl_share: float | None = None, gd_share: float | None = None) -> dict:
    """A patching.json with only what the report's summary reads (a share of None: a cell
    from before majority_label_share was recorded)."""
    profile = {"recovered_share": [0.0, 0.5, 1.0]}
    layer = {"resid_pre": profile, "attn_out": profile, "mlp_out": profile}
    shares = {s: {} if v is None else {"majority_label_share": v} for s, v in (("icl", icl_share), ("gd", gd_share))}
    return {"config": {"task": task, "model": "m"}, "zs_accuracy": zs_acc,
            "layers": {"icl": {**layer, "accuracy": icl_acc, **shares["icl"]}, "gd": {**layer, "accuracy": 0.5, **shares["gd"]}},
            "overlap": {"attn_out": {"icl-gd": gd_attn}, "mlp_out": {"icl-gd": gd_mlp}},
            "depth": {s: {"attn_out": 0.5, "mlp_out": 0.5} for s in ("icl", "gd")}}


def test_overlap_also_over_the_tasks_where_icl_beats_zs():
    from lens_iclgd.patch_report import model_summary

    cells = [_hand_cell("sst2", 0.6, 0.8, 0.7, 0.5),   # ICL helps: overlap 0.6
             _hand_cell("mr", 0.7, 0.7, -0.2, 0.0),    # a tie is no gain: left out of the subset
             _hand_cell("subj", 0.6, 0.4, 0.1, 0.1)]   # ICL hurts
    s = model_summary(cells)
    assert s["icl_helps"] == ["sst2"]
    gd = s["methods"]["gd"]
    assert gd["overlap"] == pytest.approx((0.6 - 0.1 + 0.1) / 3) and gd["n_tasks"] == 3
    assert gd["overlap_icl_helps"] == pytest.approx(0.6) and gd["n_tasks_icl_helps"] == 1
    assert model_summary(cells[1:])["methods"]["gd"]["overlap_icl_helps"] is None
