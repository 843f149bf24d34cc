"""The default model (qwen2.5-coder-0.5b from its PyPI wheels) on real data: it learns in
context, and the `make run` cell runs end to end through the CLI."""

import json

import pytest

from conftest import SHARED_DATA, needs_shared_data, run_cli
from lens_iclgd.lr_rule import default_lr
from lens_iclgd.models import DEFAULT_MODEL
from lens_iclgd.config import RunConfig
from lens_iclgd.runner import run
from lens_iclgd.tasks import load_task

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("qwen")]  # one worker loads the model


@needs_shared_data("ICL above zero-shot on 100 examples of the full sst2 and subj evaluation splits")
@pytest.mark.parametrize("task", ["sst2", "subj"])
def test_default_model_learns_in_context(task):
    """The premise of the study on the default model (issue: ZS vs ICL, k 16, n-test 100,
    seed 0): ICL accuracy is above zero-shot."""
    r = run(RunConfig(task=task, methods=("icl",), k=16, n_test=100, seed=0, data_dir=str(SHARED_DATA)), out=None)
    assert r["config"]["model"] == DEFAULT_MODEL and r["config"]["n_test_effective"] == 100
    assert r["accuracy"]["icl"] > r["accuracy"]["zs"], r["accuracy"]


def test_make_run_cell_end_to_end(tmp_path):
    """`make run` with a smaller cell: default model, offline task, every setting."""
    out = tmp_path / "default"
    proc = run_cli(["run", "--n-test", "8", "--k", "4", "--out", str(out)], timeout=1800)
    assert proc.returncode == 0, proc.stderr
    r = json.loads((out / "results.json").read_text())
    c = r["config"]
    assert (c["model"], c["task"], c["k_effective"], c["n_test_effective"]) == (DEFAULT_MODEL, "rt_snippets", 4, 8)
    assert c["model_checksum_sha256"].startswith("1d9614638d18") and c["kv_bias_trained"] is True
    assert set(r["accuracy"]) == {"zs", "icl", "gd", "lcgd"}
    for method in ("gd", "lcgd"):
        # no --lr: the paper's protocol, GD's chosen token-mean-loss rate shared by both, and where it is from
        assert c["loss_reduction"] == "mean" and c["lr_rule"] == "shared"
        assert (c["lr_by_method"][method], c["lr_source_by_method"][method]) == default_lr(
            DEFAULT_MODEL, load_task("rt_snippets"), method, shared=True, loss_reduction="mean")
        assert len(r["metrics"][method]["SimAOU"]["per_layer"]) == 24
        assert all(len(row) == 4 for row in r["grad_norms"][method])
    assert "accuracy: ZS" in proc.stdout and "results:" in proc.stdout
