"""RunConfig is the one declaration of a run's settings: every field reaches the CLI, grid
keys and the API from there; the report side loads without torch; old stages still load."""

import re
import subprocess
import sys

import pytest
import torch

import lens_iclgd
from conftest import ROOT, cli_in_process
from lens_iclgd import config
from lens_iclgd.cli import build_parser
from lens_iclgd.config import RunConfig, flag
from lens_iclgd.grid import AXES, SCALARS, cells, load_grid
from lens_iclgd.store import StageStore

FIELDS = config.fields()


def _run_help() -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, type(parser._subparsers._group_actions[0])))
    return sub.choices["run"].format_help()


def test_every_field_is_reachable_from_run_help_grid_keys_and_the_api():
    text = _run_help()
    for f in FIELDS:
        if f.metadata["cli"]:
            assert re.search(rf"(^|\s){re.escape(flag(f.name))}[\s,]", text), f"{f.name}: no {flag(f.name)} in run --help"
        assert f.name in AXES.values() or f.name in SCALARS, f"{f.name}: no grid key"
        assert getattr(RunConfig(**{f.name: f.default}), f.name) == f.default
    assert lens_iclgd.RunConfig is RunConfig


def test_no_run_flag_is_declared_a_second_time():
    """The flags come from config.add_arguments: no module spells a field's flag itself."""
    for path in (ROOT / "lens_iclgd").glob("*.py"):
        source = path.read_text()
        for f in FIELDS:
            assert not re.search(rf'add_argument\(\s*"{flag(f.name)}"', source), f"{path.name} declares {flag(f.name)} itself"


def test_command_line_values_reach_the_config():
    values = {"task": "sst2", "model": "m", "baseline": "untrained", "methods": "icl,gd", "k": "7", "seed": "3",
              "n_test": "11", "lr": "0.002", "data_dir": "d", "position": "prompt", "ablate": "1.0", "ablate_mode": "mean",
              "n_heldout": "5", "batch_size": "4", "precision": "mixed", "device": "cpu", "step_unit": "token",
              "balanced": None, "loss_reduction": "sum", "top_k": "3", "orders": "4", "patching": None,
              "patch_heads": "7"}
    assert set(values) == {f.name for f in FIELDS if f.metadata["cli"]}, "a new field needs a value here"
    argv = ["run"] + [x for k, v in values.items() for x in ([flag(k)] if v is None else [flag(k), v])]
    c = config.from_args(build_parser().parse_args(argv))
    assert c == RunConfig(task="sst2", model="m", baseline="untrained", methods=("icl", "gd"), k=7, seed=3, n_test=11,
                          lr=0.002, data_dir="d", position="prompt", ablate="1.0", ablate_mode="mean", n_heldout=5,
                          batch_size=4, precision="mixed", device="cpu", step_unit="token", balanced=True,
                          loss_reduction="sum", top_k=3, orders=4, patching=True, patch_heads=7)
    for word, value in (("default", None), ("own", "own"), ("shared", "shared"), ("auto", "auto")):
        assert config.from_args(build_parser().parse_args(["run", "--lr", word])).lr == value


def test_a_scalar_grid_key_sets_its_field_and_a_singular_axis_says_so(tmp_path, capsys):
    grid = tmp_path / "g.toml"
    grid.write_text('name = "g"\ntasks = ["sst2"]\nseeds = [0]\ntop_k = 5\nk = 3\nloss_reduction = "mean"\nlrs = [0.1]\n')
    (cell,) = cells(load_grid(grid))
    assert (cell.top_k, cell.k, cell.loss_reduction, cell.lr) == (5, 3, "mean", 0.1)
    grid.write_text('name = "g"\ntasks = ["sst2"]\nseed = 1\n')
    code, _, err = cli_in_process(["grid", str(grid), "--dry-run"], capsys)
    assert code == 1 and "seed (a list: seeds = [...])" in err and len(err.strip().splitlines()) == 1
    grid.write_text('name = "g"\ntasks = ["sst2"]\ntop_k = "ten"\n')
    code, _, err = cli_in_process(["grid", str(grid), "--dry-run"], capsys)
    assert code == 1 and "top_k must be an integer" in err


def test_grid_records_list_their_cell_ids_and_read_back(tmp_path):
    from lens_iclgd.grid import cell_id, grid_from_record

    grid = tmp_path / "g.toml"
    grid.write_text('name = "g"\ntasks = ["sst2", "mr"]\nseeds = [0, 1]\nk = 3\n')
    g = load_grid(grid)
    record = g.record([cell_id(c) for c in cells(g)])
    assert list(record["cells"]) == [cell_id(c) for c in cells(g)]
    assert record["provenance"]["package_version"] == lens_iclgd.__version__
    assert cells(grid_from_record(record)) == cells(g)


def test_the_report_side_loads_neither_torch_nor_transformer_lens():
    code = ("import sys, lens_iclgd.report, lens_iclgd.crossmodel, lens_iclgd.summary, lens_iclgd.costs, "
            "lens_iclgd.config, lens_iclgd.cli as c; c.build_parser(); "
            "print(sorted(m for m in ('torch', 'transformer_lens') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_a_stage_saved_by_an_older_version_still_loads():
    """tests/data/stages/gd-*.pt was written by commit 9041243 (before final_resid was
    recorded and before runner.py was split): it loads, and lacks only the new field."""
    stage = StageStore(ROOT / "tests" / "data" / "stages").load("gd", "0123456789abcdef")
    rec = stage["recording"]
    assert rec.attn_out.shape == (3, 2, 4) and rec.final_resid is None and rec.accuracy() in (0.0, 1 / 3, 2 / 3, 1.0)
    assert stage["log"].method == "gd" and stage["log"].grad_norms.shape == (2, 3)
    assert torch.isfinite(rec.option_logprobs).all()


def test_provenance_names_this_checkout():
    from lens_iclgd.provenance import provenance

    p = provenance()
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout: provenance records no commit here")
    assert p["git_commit"] == head.stdout.strip() and p["package_version"] == lens_iclgd.__version__
