"""Researcher tools end to end: a custom task file with an ablation and its views (the
figures decoded and checked against the run's numbers), the Python API, the worked example."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import ROOT, TEST_DATA, run_cli
from lens_iclgd.views import per_head_frame


def _custom_task(tmp_path, rows):
    for split, data in rows.items():
        with open(tmp_path / f"{split}.jsonl", "w") as f:
            for r in data:
                f.write(json.dumps({"review": r["sentence"], "stars": r["label"]}) + "\n")
    (tmp_path / "task.toml").write_text(
        'name = "my_reviews"\ntemplate = "Review: {review} Verdict:"\nanswers = ["bad", "good"]\n'
        'label_field = "stars"\neval_split = "dev"\n[files]\ntrain = "train.jsonl"\ndev = "dev.jsonl"\n')
    return tmp_path / "task.toml"


def test_custom_task_file_end_to_end(tmp_path, tiny_hf_dir, sst2_rows):
    task = _custom_task(tmp_path, {"train": sst2_rows["train"][:60], "dev": sst2_rows["validation"][:20]})
    out = tmp_path / "out"
    proc = run_cli(["run", "--task", str(task), "--model", str(tiny_hf_dir), "--k", "3", "--n-test", "8",
                    "--lr", "0.01", "--ablate", "0.1", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr
    r = json.loads((out / "results.json").read_text())
    assert r["config"]["task_spec"]["template"] == "Review: {review} Verdict:"
    assert r["config"]["ablation"] == [{"component": "0.1", "hook": "blocks.0.attn.hook_z", "mode": "zero"}]
    assert set(pd.read_csv(out / "examples.csv")["label"]) <= {"bad", "good"}
    views = run_cli(["views", str(out)])
    assert views.returncode == 0, views.stderr
    _check_per_head_figure(out / "views" / "per_head_simam.png", r)
    per_layer = _png(out / "views" / "per_layer_simaou.png")
    assert per_layer.shape[:2] == (round(3.8 * DPI), 10 * DPI) and per_layer[..., :3].std() > 0.05


DPI = 130  # report._save


def _png(path) -> np.ndarray:
    from matplotlib.image import imread

    return imread(str(path))  # height x width x RGB(A), floats in [0, 1]


def _check_per_head_figure(path, results: dict) -> None:
    """What views.write_views draws, from the figure itself: one heatmap per method and
    metric plus ZS SimAM, at the figure's size; the numbers it plots are results.json's
    per-head values; and every value's colour (RdBu_r, -1..1) fills at least part of a
    heatmap cell, far more pixels than the colour bar's band of that colour could."""
    from matplotlib import colormaps

    methods = list(results["metrics"])
    panels = {(m, name): results["metrics"][m][name]["per_head"] for m in methods for name in ("SimAM", "SimAM_delta")}
    panels["icl-vs-zs", "ZS SimAM"] = results["zs_simam"]["per_head"]
    frame = per_head_frame(results)
    for (method, metric), want in panels.items():
        sub = frame[(frame["method"] == method) & (frame["metric"] == metric)]
        got = sub.pivot(index="layer", columns="head", values="value").to_numpy(dtype=float)
        assert np.allclose(got, np.array(want, dtype=float), equal_nan=True), (method, metric)
    image = _png(path)
    n_cols = len(methods) + 1
    assert image.shape[:2] == (7 * DPI, round(4.5 * n_cols * DPI))
    pixels = np.round(image[..., :3].reshape(-1, 3) * 255)
    n_layers, n_heads = np.array(panels["gd", "SimAM"]).shape
    # a heatmap takes well over a tenth of its panel; the colour bar gives a colour ~1/256 of its height
    cell = 0.1 * (image.shape[0] / 2) * (image.shape[1] / n_cols) / (n_layers * n_heads)
    for key, values in panels.items():
        for v in np.array(values, dtype=float).ravel():
            if np.isnan(v):
                continue
            colour = np.round(np.array(colormaps["RdBu_r"]((v + 1) / 2)[:3]) * 255)
            n = int((np.abs(pixels - colour).max(axis=1) <= 1).sum())
            assert n >= cell, (key, v, n, cell)


def test_public_api_and_metric_frames(gqa_model, sst2_rows):
    import lens_iclgd as li

    p = li.build_prompts(gqa_model.model, li.load_task("sst2"), sst2_rows["train"], sst2_rows["validation"], k=3, seed=0, n_test=4)
    zs = li.record(gqa_model.model, p.zs_prefix(), p.queries, p.options)
    icl = li.record(gqa_model.model, p.icl_prefix(), p.queries, p.options)
    with li.finetuned(gqa_model.model, p.demos, p.bos, "gd", 0.05, False):
        ft = li.record(gqa_model.model, p.zs_prefix(), p.queries, p.options)
    per = li.compare(zs, icl, ft, seed=0)
    df = li.metrics.frame(per)
    assert set(df["metric"]) == {"SimAOU", "SimAOU_norm", "SimAOU_random", "SimAOU_random_text", "SimAOU_random_matched",
                                 "SimAM", "SimAM_delta"}
    simam = df[df["metric"] == "SimAM"]
    assert len(simam) == 4 * 3 * 4 and simam["head"].notna().all()
    by_layer = df[df["metric"] == "SimAOU"].groupby("layer")["value"].mean()
    assert torch.allclose(torch.tensor(by_layer.to_numpy(), dtype=torch.float32), per["SimAOU"].mean(0), atol=1e-6)
    with pytest.raises(AttributeError):
        li.no_such_thing


def test_worked_api_example_runs(tiny_hf_dir):
    """experiments/api_example.py (shown in the README) on a tiny local model."""
    proc = subprocess.run([sys.executable, str(ROOT / "experiments" / "api_example.py"), "--model", str(tiny_hf_dir),
                           "--task", "sst2", "--data-dir", str(TEST_DATA), "--k", "2", "--n-test", "4", "--ablate", "attn1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "accuracy with attn1 ablated" in proc.stdout and "LCGD: accuracy" in proc.stdout
    assert "SimAM_delta" in proc.stdout
