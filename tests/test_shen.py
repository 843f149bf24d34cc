"""shen.py: Shen et al.'s claims decided from order-study cells, on hand-built cells whose
verdicts are known (no model)."""

import json

from lens_iclgd import shen


def _cell(root, name, task, disagree, js, tok, acc, ceiling_icl=0.5, changed=None, majority=None):
    folder = root / "cells" / name
    (folder / "order0").mkdir(parents=True)
    stability = {s: {"mean_pairwise_disagreement": d, "same_prediction_in_every_order": 1 - d} for s, d in disagree.items()}
    for s, c in (changed or {}).items():
        stability[s]["changed_from_zs"] = c
    for s, c in (majority or {}).items():
        stability[s]["majority_label_share"] = c
    spread = {f"acc_{s}": {"mean": a, "std": 0.01, "min": a, "max": a} for s, a in acc.items()}
    spread |= {f"{m}_{n}": {"mean": 0.1, "std": 0.02, "min": 0.0, "max": 0.2} for m in ("gd", "lcgd") for n in ("SimAOU", "SimAM_delta")}
    ceiling = {m: {n: {"mean": ceiling_icl if m == "icl" else 0.9, "std": 0.0, "min": 0.0, "max": 1.0, "n_pairs": 1}
                   for n in ("SimAOU", "SimAM_delta")} for m in ("icl", "gd", "lcgd")}
    (folder / "orders.json").write_text(json.dumps({
        "config": {"model": "m", "task": task, "seed": 0, "orders": 3}, "spread": spread,
        "prediction_stability": stability, "ceiling": ceiling}))
    metrics = {m: {n: {"mean": 0.1 if m == "gd" else 0.2} for n in ("SimAOU", "SimAM_delta")} for m in ("gd", "lcgd")}
    (folder / "order0" / "results.json").write_text(json.dumps({
        "metrics": metrics, "outputs": {"pairs": {"zs-icl": {"js": js[0]}, "icl-gd": {"js": js[1]}}, "token_accuracy": tok}}))


def test_claims_follow_their_rules(tmp_path):
    # ICL flips predictions more than GD and LCGD on both tasks; ICL's output closer to ZS's
    _cell(tmp_path, "a", "sst2", {"zs": 0.0, "icl": 0.3, "gd": 0.1, "lcgd": 0.2}, (0.01, 0.05),
          {"zs": 0.1, "icl": 0.6, "gd": 0.2, "lcgd": 0.3}, {"zs": 0.5, "icl": 0.8, "gd": 0.75, "lcgd": 0.7})
    _cell(tmp_path, "b", "mr", {"zs": 0.0, "icl": 0.4, "gd": 0.1, "lcgd": 0.1}, (0.02, 0.06),
          {"zs": 0.1, "icl": 0.5, "gd": 0.3, "lcgd": 0.3}, {"zs": 0.5, "icl": 0.7, "gd": 0.7, "lcgd": 0.6})
    verdicts = {c["key"]: c["verdict"] for c in shen.claims(shen.frame(shen.order_cells(tmp_path)))}
    assert verdicts == {"S1a": "agrees", "S1b": "agrees", "S2": "agrees", "S3": "agrees"}
    text = "\n".join(shen.section(tmp_path, "m"))
    assert "| SimAOU | 0.100 | 0.200 | 0.500 | 0.900 | 0.900 | 0.020 | 0.020 |" in text and "2 order-study cells" in text
    assert "| sst2 | - / - | 0.300 / 0.100 / 0.200 | 0.700 / 0.900 / 0.800 | - / - / - |" in text  # per task, paper order
    assert text.index("| sst2 |") < text.index("| mr |")
    figure = tmp_path / "report"
    figure.mkdir()
    assert "![fig_orders.png]" in "\n".join(shen.section(tmp_path, "m", figure)) and (figure / "fig_orders.png").stat().st_size
    across = "\n".join(shen.crossmodel_section(tmp_path))
    assert "| m | sst2, mr | agrees: mean pairwise disagreement" in across and across.count("agrees: mean pairwise") == 2 and "| 0.100 / 0.200 / 0.500 |" in across


def test_claims_can_be_rejected(tmp_path):
    # GD as order-sensitive as ICL on one of two tasks (no majority); ICL's output closer to GD's
    _cell(tmp_path, "a", "sst2", {"zs": 0.0, "icl": 0.3, "gd": 0.1, "lcgd": 0.1}, (0.05, 0.01),
          {"zs": 0.1, "icl": 0.5, "gd": 0.5, "lcgd": 0.5}, {"zs": 0.5, "icl": 0.8, "gd": 0.7, "lcgd": 0.7})
    _cell(tmp_path, "b", "mr", {"zs": 0.0, "icl": 0.1, "gd": 0.3, "lcgd": 0.0}, (0.05, 0.01),
          {"zs": 0.1, "icl": 0.5, "gd": 0.5, "lcgd": 0.5}, {"zs": 0.5, "icl": 0.8, "gd": 0.7, "lcgd": 0.7})
    verdicts = {c["key"]: c["verdict"] for c in shen.claims(shen.frame(shen.order_cells(tmp_path)))}
    assert verdicts == {"S1a": "does not agree", "S1b": "agrees", "S2": "does not agree", "S3": "does not agree"}
    assert shen.section(tmp_path, "another model") == []


def test_a_method_that_changes_no_prediction_is_left_out_of_order_sensitivity(tmp_path):
    """GD changes no prediction off ZS's on sst2 and mr: its zero disagreement there says
    nothing about order, so S1a rests on subj alone, where GD flips more than ICL."""
    for name, task, gd_flips, gd_changed in (("a", "sst2", 0.0, 0.0), ("b", "mr", 0.0, 0.0), ("c", "subj", 0.4, 0.3)):
        _cell(tmp_path, name, task, {"zs": 0.0, "icl": 0.3, "gd": gd_flips, "lcgd": 0.1}, (0.05, 0.01),
              {"zs": 0.1, "icl": 0.5, "gd": 0.5, "lcgd": 0.5}, {"zs": 0.5, "icl": 0.8, "gd": 0.7, "lcgd": 0.7},
              changed={"icl": 0.4, "gd": gd_changed, "lcgd": 0.2})
    got = {c["key"]: c for c in shen.claims(shen.frame(shen.order_cells(tmp_path)))}
    assert got["S1a"]["verdict"] == "does not agree"  # counted over all three tasks it would agree (2 of 3)
    assert "ICL above GD on 0 of 1 tasks" in got["S1a"]["evidence"]
    assert "changed no prediction off ZS's: sst2, mr" in got["S1a"]["evidence"]
    assert got["S1b"]["verdict"] == "agrees" and "left out" not in got["S1b"]["evidence"]
    assert "| 0.400 / 0.000 / 0.200 |" in "\n".join(shen.section(tmp_path, "m"))  # changed from ZS, per task
    for name in ("a", "b", "c"):  # no task left: undecided, not "agrees" by an empty majority
        (tmp_path / "cells" / name / "orders.json").unlink()
    _cell(tmp_path, "d", "cb", {"zs": 0.0, "icl": 0.3, "gd": 0.0, "lcgd": 0.1}, (0.05, 0.01),
          {"zs": 0.1, "icl": 0.5, "gd": 0.5, "lcgd": 0.5}, {"zs": 0.5, "icl": 0.8, "gd": 0.7, "lcgd": 0.7},
          changed={"icl": 0.4, "gd": 0.0, "lcgd": 0.2})
    assert {c["key"]: c["verdict"] for c in shen.claims(shen.frame(shen.order_cells(tmp_path)))}["S1a"] == "undecided"


def test_a_collapsed_setting_is_left_out_of_order_sensitivity(tmp_path):
    """LCGD predicts one label on sst2 (share 1.0) and ICL nearly one on mr (0.96): a constant
    predictor's zero disagreement says nothing about order, so those tasks leave the claims
    they touch; a share just under the threshold (0.94) stays in."""
    rows = (("a", "sst2", {"icl": 0.7, "gd": 0.6, "lcgd": 1.0}, 0.0), ("b", "mr", {"icl": 0.96, "gd": 0.6, "lcgd": 0.6}, 0.05),
            ("c", "subj", {"icl": 0.7, "gd": 0.94, "lcgd": 0.6}, 0.2))
    for name, task, majority, lcgd_flips in rows:
        _cell(tmp_path, name, task, {"zs": 0.0, "icl": 0.1, "gd": 0.3, "lcgd": lcgd_flips}, (0.05, 0.01),
              {"zs": 0.1, "icl": 0.5, "gd": 0.5, "lcgd": 0.5}, {"zs": 0.5, "icl": 0.8, "gd": 0.7, "lcgd": 0.7},
              changed={"icl": 0.4, "gd": 0.3, "lcgd": 0.2}, majority={"zs": 0.5, **majority})
    got = {c["key"]: c for c in shen.claims(shen.frame(shen.order_cells(tmp_path)))}
    assert "ICL above GD on 0 of 2 tasks" in got["S1a"]["evidence"] and got["S1a"]["verdict"] == "does not agree"
    assert "left out, ICL predicts one label (share >= 0.95): mr" in got["S1a"]["evidence"]
    assert "ICL above LCGD on 0 of 1 tasks" in got["S1b"]["evidence"]  # only subj is left: 0.1 < 0.2
    assert "left out, LCGD predicts one label (share >= 0.95): sst2" in got["S1b"]["evidence"]
    assert "| 0.700 / 0.600 / 1.000 |" in "\n".join(shen.section(tmp_path, "m"))  # the share, per task


def test_cells_of_older_settings_are_left_out(tmp_path):
    """A cell folder the recorded grids no longer define (e.g. made at a rate since chosen
    anew) stays out of the order-study and causal-study sections, as collect() does."""
    from lens_iclgd import patch_report

    for name in ("current", "stale"):
        _cell(tmp_path, name, "sst2", {"zs": 0.0, "icl": 0.3, "gd": 0.1, "lcgd": 0.2}, (0.01, 0.05),
              {"zs": 0.1, "icl": 0.6, "gd": 0.2, "lcgd": 0.3}, {"zs": 0.5, "icl": 0.8, "gd": 0.75, "lcgd": 0.7})
        (tmp_path / "cells" / name / "patching.json").write_text(json.dumps({"config": {"model": "m"}}))
    assert [c["_path"].rsplit("/", 1)[1] for c in shen.order_cells(tmp_path, expected={"current"})] == ["current"]
    assert len(shen.order_cells(tmp_path)) == 2  # no grid recorded: every finished cell
    assert len(patch_report.patching_cells(tmp_path, "m", {"current"})) == 1
    assert len(patch_report.patching_cells(tmp_path, "m")) == 2


def test_the_manifest_counts_finished_order_and_patching_cells(tmp_path):
    from lens_iclgd.report import Collected, manifest_lines

    _cell(tmp_path, "ordered", "sst2", {"zs": 0.0, "icl": 0.3, "gd": 0.1, "lcgd": 0.2}, (0.01, 0.05),
          {"zs": 0.1, "icl": 0.6, "gd": 0.2, "lcgd": 0.3}, {"zs": 0.5, "icl": 0.8, "gd": 0.75, "lcgd": 0.7})
    (tmp_path / "cells" / "patched").mkdir()
    (tmp_path / "cells" / "patched" / "patching.json").write_text(json.dumps({"config": {"model": "m"}}))
    (tmp_path / "cells" / "patched" / "patching_timings.json").write_text(json.dumps(
        {"record_zs": 30.0, "layers_icl": 60.0, "total": 1.0,
         "provenance": {"package_version": "9.9", "git_commit": "abcdef0123456789", "git_dirty": False}}))
    (tmp_path / "grids").mkdir()
    ids = {i: {"model": "m", "baseline": "trained", "task": "sst2", "seed": 0} for i in ("ordered", "patched", "missing")}
    (tmp_path / "grids" / "g.json").write_text(json.dumps({"name": "g", "cells": ids}))
    config = tmp_path / "g.toml"
    config.write_text('name = "g"\n')
    manifest = {"grid": [{"config": str(config), "command": "lens-iclgd grid g.toml"}], "report": {"command": "report"}}
    text = "\n".join(manifest_lines(manifest, tmp_path, Collected(None, [], 0)))
    row = next(line for line in text.splitlines() if line.startswith(f"| {config} |"))
    assert row.startswith(f"| {config} | 2 / 3 |")
    assert "9.9 at abcdef0123" in row  # the patching cell's version, from patching_timings.json
    # the only cell with timings cost 90 s; one cell is missing: 90 s = 0.025 h
    assert row.endswith("| 90 | 0.0 |")


def test_a_cells_cost_from_nothing_counts_reused_stages_and_each_order(tmp_path):
    from lens_iclgd.costs import cell_seconds

    plain = tmp_path / "plain"
    plain.mkdir()  # resumed: `total` is the resumed part only; the phases are the cost
    (plain / "timings.json").write_text(json.dumps({"zs": 2.0, "icl": 3.0, "gd": 5.0, "lcgd": 7.0, "total": 1.0,
                                                    "reused": ["zs", "icl"], "machine": {"threads": 1}}))
    assert cell_seconds(plain) == 17.0
    ordered = tmp_path / "ordered"
    for i in range(3):  # ZS is one recording for every order; ICL, GD and LCGD are per order
        (ordered / f"order{i}").mkdir(parents=True)
        (ordered / f"order{i}" / "timings.json").write_text(json.dumps({"zs": 2.0, "icl": 3.0, "gd": 5.0, "lcgd": 7.0 + i}))
    assert cell_seconds(ordered) == 2.0 + 3 * 15.0 + 3.0
    patched = tmp_path / "patched"
    patched.mkdir()
    (patched / "patching_timings.json").write_text(json.dumps({"record_zs": 4.0, "layers_icl": 6.0, "total": 0.5,
                                                              "machine": {"cpu": "x"}}))
    assert cell_seconds(patched) == 10.0
    assert cell_seconds(tmp_path) is None
