"""Grids on a tiny local model: interruption and resume, shards, partial reports."""

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import ROOT, TEST_DATA, cli_in_process, run_cli
from lens_iclgd.errors import UserError
from lens_iclgd.grid import cell_id, cells, load_grid, shard
from lens_iclgd.report import collect, write_report


def _grid_file(tmp_path: Path, model_dir: Path, **over) -> Path:
    settings = {"name": "tiny", "models": [str(model_dir)], "tasks": ["sst2"], "seeds": [0, 1],
                "methods": ["gd", "lcgd"], "lrs": [0.01, 0.03], "k": 3, "n_test": 6, "n_heldout": 4,
                "data_dir": str(TEST_DATA)}
    settings.update(over)
    text = "\n".join(f"{k} = {json.dumps(v)}" for k, v in settings.items())
    path = tmp_path / "tiny.toml"
    path.write_text(text + "\n")
    return path


def _numbers(results_dir: Path) -> dict:
    """Every cell's results.json, byte for byte (wall times are kept in timings.json)."""
    return {f.parent.name: f.read_bytes() for f in sorted((results_dir / "cells").glob("*/results.json"))}


def _wait_for(path_glob, root: Path, proc, count=1, timeout=300):
    end = time.time() + timeout
    while time.time() < end:
        if len(list(root.glob(path_glob))) >= count:
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    return False


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_interrupted_grid_resumes_to_the_same_results(tmp_path, tiny_hf_dir, sig):
    # 12 cells: enough after the first one for a kill to land mid-grid
    config = _grid_file(tmp_path, tiny_hf_dir, lrs=[0.01, 0.02, 0.03, 0.04, 0.05, 0.06])
    total = 12
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert run_cli(["grid", str(config), "--results", str(whole)]).returncode == 0

    # SIGINT back to its default, as at a terminal: a shell's background job inherits it
    # ignored, and Python then never raises KeyboardInterrupt (the grid would run to the end)
    proc = subprocess.Popen([sys.executable, "-m", "lens_iclgd.cli", "grid", str(config), "--results", str(broken)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert _wait_for("cells/*/results.json", broken, proc), "the first cell never finished"
    if sig == signal.SIGKILL:  # at a random point before the last cell finishes
        stamps = sorted(f.stat().st_mtime for f in whole.glob("cells/*/results.json"))
        delay = random.Random().uniform(0.0, 0.5 * (stamps[-1] - stamps[0]))
        print(f"SIGKILL {delay:.2f}s after the first cell finished")
        time.sleep(delay)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    done_before = len(list(broken.glob("cells/*/results.json")))
    assert 1 <= done_before < total

    # a report on the partial directory counts only finished cells and the missing ones
    report = write_report(broken)
    text = (report / "report.md").read_text()
    assert f"{done_before} finished cells of {total} defined by the grids here; {total - done_before} missing" in text

    resumed = run_cli(["grid", str(config), "--results", str(broken)])
    assert resumed.returncode == 0, resumed.stderr
    assert f"{done_before} already done, {total - done_before} to run" in resumed.stdout
    assert _numbers(broken) == _numbers(whole)
    assert not list(broken.rglob("*.tmp"))  # a killed writer's temp files are cleaned up on resume
    for f in broken.rglob("stages/*.pt"):  # every stage file is complete
        assert torch.load(f, weights_only=False)["key"] in f.name


def test_shards_split_the_grid_exactly(tmp_path, tiny_hf_dir):
    config = _grid_file(tmp_path, tiny_hf_dir, seeds=[0, 1, 2], lrs=[0.01])
    grid = load_grid(config)
    all_ids = [cell_id(c) for c in cells(grid)]
    parts = [[cell_id(c) for c in shard(cells(grid), i, 2)] for i in range(2)]
    assert sorted(parts[0] + parts[1]) == sorted(all_ids) and not set(parts[0]) & set(parts[1])

    results = tmp_path / "shared"
    outs = [run_cli(["grid", str(config), "--results", str(results), "--shard", f"{i}/2"]) for i in range(2)]
    assert all(o.returncode == 0 for o in outs), [o.stderr for o in outs]
    ran = [int(o.stdout.split(" to run")[0].rsplit(", ", 1)[1]) for o in outs]
    assert sum(ran) == len(all_ids) == 3
    assert sorted(p.parent.name for p in results.glob("cells/*/results.json")) == sorted(all_ids)
    assert collect(results).missing == 0


def test_seeds_and_tasks_run_a_subset_and_the_grid_stays_whole(tmp_path, tiny_hf_dir):
    config = _grid_file(tmp_path, tiny_hf_dir, tasks=["sst2", "mr"], seeds=[0, 1, 2], lrs=[0.01])
    grid = load_grid(config)
    results = tmp_path / "r"
    out = run_cli(["grid", str(config), "--results", str(results), "--seeds", "0", "--tasks", "mr"])
    assert out.returncode == 0, out.stderr
    done = [json.loads(f.read_text())["config"] for f in results.glob("cells/*/results.json")]
    assert [(Path(c["task"]).stem, c["seed"]) for c in done] == [("mr", 0)]
    recorded = json.loads((results / "grids" / "tiny.json").read_text())  # report expects the whole grid
    assert recorded["seeds"] == [0, 1, 2] and recorded["tasks"] == ["sst2", "mr"]
    coll = collect(results)
    assert len(coll.cells) == 1 and coll.missing == len(cells(grid)) - 1 == 5

    dry = run_cli(["grid", str(config), "--results", str(results), "--seeds", "0,1", "--dry-run"])
    assert dry.returncode == 0 and dry.stdout.count("to run: ") == 3 and len(list(results.glob("cells/*/results.json"))) == 1
    same = run_cli(["grid", str(config), "--results", str(results), "--seeds", "0,1", "--models", str(tiny_hf_dir), "--dry-run"])
    assert same.returncode == 0 and same.stdout.count("to run: ") == 3  # the grid's one model: the same cells
    out = run_cli(["grid", str(config), "--results", str(results), "--seeds", "0,1"])  # resumes: mr seed 0 is done
    assert out.returncode == 0 and "4 cells in shard 0/1, 1 already done, 3 to run" in out.stdout
    for bad, message in ((["--seeds", "5"], "--seeds 5: not in grid tiny's seeds (0, 1, 2)"),
                         (["--tasks", "subj"], "--tasks subj: not in grid tiny's tasks (sst2, mr)"),
                         (["--models", "gpt2"], "--models gpt2: not in grid tiny's models"),
                         (["--seeds", "x"], "--seeds 'x': use a comma-separated list, e.g. --seeds 0,1")):
        out = run_cli(["grid", str(config), "--results", str(results)] + bad)
        assert out.returncode != 0 and message in out.stderr and "Traceback" not in out.stderr


def test_changed_settings_never_reuse_stale_cells(tmp_path, tiny_hf_dir):
    results = tmp_path / "r"
    first = _grid_file(tmp_path, tiny_hf_dir, seeds=[0], lrs=[0.01])
    assert run_cli(["grid", str(first), "--results", str(results)]).returncode == 0
    second = _grid_file(tmp_path, tiny_hf_dir, seeds=[0], lrs=[0.01], k=2)
    out = run_cli(["grid", str(second), "--results", str(results)])
    assert out.returncode == 0 and "0 already done, 1 to run" in out.stdout
    ks = sorted(json.loads(f.read_text())["config"]["k_effective"] for f in results.glob("cells/*/results.json"))
    assert ks == [2, 3]
    coll = collect(results)  # the report counts the cell of the current setting only
    assert len(coll.cells) == 1 and coll.cells[0]["config"]["k_effective"] == 2 and coll.stale == 1


def test_diverging_cell_is_recorded_and_the_others_finish(tmp_path, tiny_hf_dir):
    # the summed loss: its step at 1e38 is ~token-count larger than the mean's, sure to overflow
    config = _grid_file(tmp_path, tiny_hf_dir, seeds=[0], lrs=[0.01, 1e38], loss_reduction="sum")
    results = tmp_path / "r"
    out = run_cli(["grid", str(config), "--results", str(results)])
    assert out.returncode == 0, out.stderr
    failed = list(results.glob("cells/*/failed.json"))
    assert len(failed) == 1 and len(list(results.glob("cells/*/results.json"))) == 1
    info = json.loads(failed[0].read_text())
    # step 0 runs on the original weights; its 1e38-sized update makes step 1 overflow
    assert info["step"] == 1 and "loss became" in info["error"]
    assert "1 failed" in (write_report(results) / "report.md").read_text()


@pytest.mark.parametrize("body,message", [
    ('name = "x"\n', "needs at least name and tasks"),
    ('name = "x"\ntasks = ["sst2"]\nseeds = [0.5]\n', "seeds must be a non-empty list of int"),
    ('name = "x"\ntasks = ["sst2"]\nk = 0\n', "k must be an integer >= 1"),
    ('name = "../x"\ntasks = ["sst2"]\n', "must use only letters"),
    ('name = "x"\ntasks = ["sst2"]\nlrs = [-1.0]\n', "lr must be a finite number > 0"),
    ('name = "x"\ntasks = ["nope"]\n', "unknown task"),
    ('name = "x"\ntasks = ["sst2"\n', "not valid TOML"),
    ('name = "x"\ntasks = ["sst2"]\ncolour = 3\n', "unknown key"),
    (None, "does not exist"),
])
def test_bad_grid_configs(tmp_path, body, message, capsys):
    path = tmp_path / "g.toml"
    if body is not None:
        path.write_text(body)
    code, _, stderr = cli_in_process(["grid", str(path), "--results", str(tmp_path / "r"), "--data-dir", str(TEST_DATA)], capsys)
    assert code == 1
    assert len(stderr.strip().splitlines()) == 1 and message in stderr


def test_default_lr_cells_follow_the_learning_rate_table(tmp_path, monkeypatch, tiny_hf_dir):
    """A cell run with lrs = ["default"] must not be reused after learning_rates.toml changes."""
    from lens_iclgd import lr_rule

    table = tmp_path / "learning_rates.toml"
    monkeypatch.setattr(lr_rule, "LEARNING_RATES_FILE", table)
    for loss, section in (("sum", ""), ("mean", "mean.")):  # each loss follows its own table
        grid = load_grid(_grid_file(tmp_path, tiny_hf_dir, seeds=[0], lrs=["default"], loss_reduction=loss))
        (cell,) = cells(grid)
        ids = []
        for lr in (0.01, 0.02, 0.01):
            table.write_text(f'[{section}"{cell.model}"]\nsst2 = {lr}\n')
            ids.append(cell_id(cell))
        assert ids[0] != ids[1] and ids[0] == ids[2]


def test_ablation_sweep_report_table(tmp_path, tiny_hf_dir):
    """The report's ablation table: one row per ablated layer plus the un-ablated
    reference, whose numbers are those of the un-ablated cell of the same grid."""
    config = _grid_file(tmp_path, tiny_hf_dir, seeds=[0], lrs=[0.01], methods=["gd"], ablations=["", "attn0", "attn1"])
    results = tmp_path / "r"
    assert run_cli(["grid", str(config), "--results", str(results)]).returncode == 0
    report = write_report(results)
    table = pd.read_csv(report / "ablation.csv")
    assert list(table["ablated"]) == ["none", "attn0", "attn1"]
    by_ablation = {r["config"].get("ablate", ""): r for r in (json.loads(f.read_text()) for f in results.glob("cells/*/results.json"))}
    assert set(by_ablation) == {"", "attn0", "attn1"}
    # one task and seed: every row is its own cell's numbers
    for _, row in table.iterrows():
        r = by_ablation["" if row["ablated"] == "none" else row["ablated"]]
        assert row["acc_icl"] == pytest.approx(r["accuracy"]["icl"], abs=1e-3), row["ablated"]
        assert row["acc_ft GD"] == pytest.approx(r["accuracy"]["gd"], abs=1e-3), row["ablated"]
        assert row["SimAOU GD"] == pytest.approx(r["metrics"]["gd"]["SimAOU"]["mean"], abs=1e-3), row["ablated"]
    # a zeroed attention layer has no update in any setting: its SimAOU is undefined, the other layer's is not
    for layer in (0, 1):
        per_layer = by_ablation[f"attn{layer}"]["metrics"]["gd"]["SimAOU"]["per_layer"]
        assert per_layer[layer] is None and per_layer[1 - layer] is not None, per_layer
    assert "## Ablation sweep" in (report / "report.md").read_text()
    from matplotlib.image import imread

    figure = imread(str(report / "fig_ablation.png"))
    assert figure.shape[:2] == (round(3.8 * 130), 16 * 130) and figure[..., :3].std() > 0.05


def test_grid_keys_for_step_unit_balanced_and_lr_words(tmp_path, tiny_hf_dir):
    plain = load_grid(_grid_file(tmp_path, tiny_hf_dir, seeds=[0], lrs=[0.01]))
    (c0,) = cells(plain)
    grid = load_grid(_grid_file(tmp_path, tiny_hf_dir, seeds=[0], lrs=[0.01, "auto"], step_unit="token", balanced=True))
    token, auto = cells(grid)
    assert (token.step_unit, token.balanced, token.lr, auto.lr) == ("token", True, 0.01, "auto")
    assert "__step-token__balanced__" in cell_id(token) and cell_id(token) != cell_id(c0)
    assert "__lrauto__" in cell_id(auto)
    # the neutral values are not hashed: setting them explicitly keeps the id
    explicit = load_grid(_grid_file(tmp_path, tiny_hf_dir, seeds=[0], lrs=[0.01], step_unit="demo", balanced=False))
    assert cell_id(cells(explicit)[0]) == cell_id(c0)


@pytest.mark.parametrize("over,message", [
    ({"step_unit": "word"}, "unknown step unit 'word'"),
    ({"balanced": 1}, "balanced must be true or false"),
    ({"lrs": ["fast"]}, "lrs entries are numbers, \"default\", \"shared\" or \"auto\""),
])
def test_bad_new_grid_keys(tmp_path, tiny_hf_dir, over, message):
    with pytest.raises(UserError, match=message):
        load_grid(_grid_file(tmp_path, tiny_hf_dir, **over))


def test_a_bfloat16_grid_stops_in_one_line_where_bfloat16_is_slower(tmp_path, tiny_hf_dir, monkeypatch, capsys):
    """One line before any model loads or cell runs (not a failure per cell); --dry-run
    still lists the cells."""
    from lens_iclgd import precision
    from lens_iclgd.hardware import Bf16Probe

    monkeypatch.setattr(precision, "bf16_probe", lambda device: Bf16Probe("cpu", 1.0, 30.0, "test CPU, AVX2, 1 threads"))
    config = _grid_file(tmp_path, tiny_hf_dir, seeds=[0], lrs=[0.01], precision="mixed")
    results = tmp_path / "r"
    code, _, stderr = cli_in_process(["grid", str(config), "--results", str(results), "--dry-run"], capsys)
    assert code == 0
    code, stdout, stderr = cli_in_process(["grid", str(config), "--results", str(results)], capsys)
    assert code == 1 and stderr.count("\n") == 1 and "--precision mixed would run slower than float32 here" in stderr
    assert not list(results.glob("cells/*")) and "loading" not in stdout


def test_loss_reduction_is_a_grid_key_and_enters_ids_only_when_mean(tmp_path, tiny_hf_dir, capsys):
    plain = load_grid(_grid_file(tmp_path, tiny_hf_dir, seeds=[0], lrs=[0.01]))
    explicit = load_grid(_grid_file(tmp_path, tiny_hf_dir, seeds=[0], lrs=[0.01], loss_reduction="sum"))
    mean = load_grid(_grid_file(tmp_path, tiny_hf_dir, seeds=[0], lrs=[0.01], loss_reduction="mean"))
    icl_only = [load_grid(_grid_file(tmp_path, tiny_hf_dir, seeds=[0], methods=["icl"], loss_reduction=loss))
                for loss in ("sum", "mean")]
    (c0,), (c_sum,), (c_mean,) = cells(plain), cells(explicit), cells(mean)
    assert c0.loss_reduction == "mean" and cell_id(c0) == cell_id(c_mean)  # the paper's token-mean loss by default
    assert "__loss-mean__" in cell_id(c_mean) and "__loss-" not in cell_id(c_sum)  # the summed-loss cells keep their ids
    assert cell_id(cells(icl_only[0])[0]) == cell_id(cells(icl_only[1])[0])  # nothing trained: one cell either way
    with pytest.raises(UserError, match="unknown loss reduction 'avg'"):
        load_grid(_grid_file(tmp_path, tiny_hf_dir, seeds=[0], lrs=[0.01], loss_reduction="avg"))
    # through the CLI: recorded in results.json; the ZS/ICL stages are shared, the finetuned ones are not
    out = tmp_path / "runs"
    base = ["run", "--model", str(tiny_hf_dir), "--task", "sst2", "--data-dir", str(TEST_DATA), "--k", "3",
            "--n-test", "6", "--lr", "0.01", "--methods", "gd"]
    assert cli_in_process([*base, "--loss-reduction", "sum", "--out", str(out / "sum")], capsys)[0] == 0
    code, stdout, _ = cli_in_process([*base, "--out", str(out / "mean")], capsys)
    assert code == 0
    r_sum, r_mean = (json.loads((out / n / "results.json").read_text()) for n in ("sum", "mean"))
    assert (r_sum["config"]["loss_reduction"], r_mean["config"]["loss_reduction"]) == ("sum", "mean")
    assert r_mean["losses"]["gd"] != r_sum["losses"]["gd"]
    assert r_sum["accuracy"]["zs"] == r_mean["accuracy"]["zs"]
