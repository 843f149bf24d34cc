"""Learning rates per method: the chosen-rates table, the shared rate, `--lr auto`."""

import json
import tomllib

import pandas as pd
import pytest

from conftest import TEST_DATA, run_cli
from lens_iclgd import inputs, lr_rule, runner
from lens_iclgd.errors import UserError
from lens_iclgd.finetune import finetuned
from lens_iclgd.grid import cell_id, grid_from_record, run_grid
from lens_iclgd.lr_rule import best_lr, chosen_rate, format_table
from lens_iclgd.models import load_model
from lens_iclgd.prompts import build_prompts
from lens_iclgd.recording import record
from lens_iclgd.report import choose_learning_rates, collect, table2
from lens_iclgd.config import RunConfig
from lens_iclgd.lr_rule import default_lr
from lens_iclgd.runner import run
from lens_iclgd.tasks import load_split, load_task


@pytest.fixture
def table(tmp_path, monkeypatch):
    path = tmp_path / "learning_rates.toml"
    monkeypatch.setattr(lr_rule, "LEARNING_RATES_FILE", path)
    return path


def test_each_method_gets_its_own_rate_else_gd_rate_with_its_source(table):
    sst2, mr, cb = load_task("sst2"), load_task("mr"), load_task("cb")
    table.write_text('["m"]\nmr = 0.5\n\n["m".gd]\nsst2 = 0.01\n\n["m".lcgd]\nsst2 = 0.002\n')
    assert default_lr("m", sst2, "gd") == (0.01, "learning_rates.toml [m.gd]")
    assert default_lr("m", sst2, "lcgd") == (0.002, "learning_rates.toml [m.lcgd]")
    # the flat table is GD's rate; LCGD without a rate of its own falls back to it, saying so
    assert default_lr("m", mr, "gd") == (0.5, "learning_rates.toml [m]")
    lr, source = default_lr("m", mr, "lcgd")
    assert lr == 0.5 and "GD's chosen rate: no lcgd rate chosen for mr" in source
    # shared: GD's chosen rate for every method, even one with its own
    lr, source = default_lr("m", sst2, "lcgd", shared=True)
    assert lr == 0.01 and "[m.gd]" in source and "shared" in source
    # nothing chosen for the model: the paper's 1.3B rate, for every method
    assert default_lr("other", cb, "lcgd") == (cb.paper_lr, "paper (1.3B model)")


def test_the_token_mean_loss_has_its_own_table_and_falls_back_to_the_papers_rate(table):
    sst2, mr = load_task("sst2"), load_task("mr")
    table.write_text('["m".gd]\nsst2 = 0.01\n\n[mean."m".gd]\nsst2 = 0.3\n\n[mean."m".lcgd]\nsst2 = 0.1\n')
    assert default_lr("m", sst2, "gd", loss_reduction="mean") == (0.3, "learning_rates.toml [mean] [m.gd]")
    assert default_lr("m", sst2, "lcgd", loss_reduction="mean")[0] == 0.1
    assert default_lr("m", sst2, "lcgd", shared=True, loss_reduction="mean")[0] == 0.3
    # the summed loss's table never serves the mean, nor the mean's the sum
    assert default_lr("m", sst2, "gd") == (0.01, "learning_rates.toml [m.gd]")
    assert default_lr("m", mr, "gd", loss_reduction="mean") == (mr.paper_lr, "paper (1.3B model, token-mean loss)")


def test_a_reports_words_for_a_rate_read_the_source_default_lr_wrote(table):
    from lens_iclgd.patch_report import at_paper_rate

    sst2, mr = load_task("sst2"), load_task("mr")
    table.write_text('[mean."m".gd]\nsst2 = 0.3\n')
    words = {}
    for task in (sst2, mr):
        src = {m: default_lr("m", task, m, shared=True, loss_reduction="mean")[1] for m in ("gd", "lcgd")}
        words[task.name] = {m: lr_rule.rate_origin(s) for m, s in src.items()}
        assert at_paper_rate({"config": {"lr_source_by_method": src}}) == (task.name == "mr")
    assert words["sst2"] == {"gd": "own rate from the table", "lcgd": "GD's rate from the table"}
    assert words["mr"] == {"gd": "the paper's 1.3B rate", "lcgd": "the paper's 1.3B rate"}
    assert lr_rule.rate_origin("--lr") == "--lr" and lr_rule.rate_origin(None) == "unrecorded"


def test_no_rate_given_means_shared_under_the_mean_loss_and_own_under_the_sum():
    assert lr_rule.lr_rule_of(None, "mean") == "shared" and lr_rule.lr_rule_of(None, "sum") == "default"
    assert lr_rule.lr_rule_of("own", "mean") == "default" == lr_rule.lr_rule_of("own", "sum")
    assert lr_rule.lr_rule_of(1e-3, "mean") == "--lr" and lr_rule.lr_rule_of("auto", "sum") == "auto"
    assert RunConfig().loss_reduction == "mean"  # the paper's code is the default


def test_custom_task_without_a_rate_points_at_lr_auto(table, tmp_path):
    task_file = tmp_path / "t.toml"
    task_file.write_text('name = "t"\ntemplate = "Text: {text} Label:"\nanswers = ["a", "b"]\n[files]\ntrain = "x.jsonl"\nvalidation = "x.jsonl"\n')
    with pytest.raises(UserError, match="--lr auto"):
        default_lr("m", load_task(str(task_file)), "gd")


def test_best_lr_takes_the_largest_of_tied_rates_and_skips_diverged():
    assert best_lr({1e-5: 0.5, 1e-4: 0.7, 3e-4: 0.7, 1e-3: 0.6}) == 3e-4
    assert best_lr({1e-5: 0.5, 1e-4: None}) == 1e-5


def test_choose_learning_rates_per_method_and_the_toml_round_trip():
    rows = []
    # held-out accuracy per (method, lr), two seeds each: GD peaks at 1e-4, LCGD at 1e-5
    acc = {"gd": {1e-5: (0.5, 0.6), 1e-4: (0.8, 0.7), 3e-4: (0.4, 0.4)},
           "lcgd": {1e-5: (0.6, 0.6), 1e-4: (0.3, 0.5), 3e-4: (0.6, 0.6)}}
    for method, curve in acc.items():
        for lr, per_seed in curve.items():
            for seed, a in enumerate(per_seed):
                rows.append({"model": "m", "task": "sst2", "seed": seed, "lr": lr, "lr_rule": "--lr", "plain": True,
                             "loss": "sum", "step_plain": True, "ablate": "", "method": method, "heldout_acc": a})
    rows.append({**rows[0], "lr_rule": "default", "heldout_acc": 1.0})  # not a sweep cell: ignored
    # a token-mean-loss sweep of the same task: chosen apart (GD best at 3e-3), never pooled with the sum's
    rows += [{**rows[0], "loss": "mean", "plain": False, "lr": lr, "heldout_acc": a}
             for lr, a in ((1e-3, 0.5), (3e-3, 0.9), (1e-2, 0.2))]
    chosen = choose_learning_rates(pd.DataFrame(rows))
    got = {r.method: (r.lr, r.heldout_acc) for r in chosen.itertuples() if r.loss == "sum"}
    assert got["gd"] == (1e-4, pytest.approx(0.75))
    assert got["lcgd"] == (3e-4, pytest.approx(0.6))  # tie 1e-5 / 3e-4: the largest
    mean = chosen[chosen["loss"] == "mean"]
    assert mean[["method", "lr", "heldout_acc", "seeds", "edge"]].values.tolist() == [["gd", 3e-3, 0.9, 1, False]]
    assert chosen.set_index(["loss", "method"]).loc[("sum", "lcgd"), "edge"]  # 3e-4 is its sweep's top

    text = format_table(chosen.to_dict("records"), "chosen here")
    parsed = tomllib.loads(text)
    for method, (lr, _) in got.items():
        assert chosen_rate(parsed, "m", "sst2", method) == (lr, f"[m.{method}]")
    assert chosen_rate(parsed["mean"], "m", "sst2", "gd") == (3e-3, "[m.gd]")


def test_cell_ids_follow_each_methods_rate(table, tiny_hf_dir):
    base = RunConfig(task="sst2", model=str(tiny_hf_dir), methods=("gd", "lcgd"), loss_reduction="sum")
    table.write_text(f'["{tiny_hf_dir}"]\nsst2 = 0.01\n')
    flat = cell_id(base)
    table.write_text(f'["{tiny_hf_dir}".gd]\nsst2 = 0.01\n')
    assert cell_id(base) == flat  # the same rates, the same cell, in either shape
    table.write_text(f'["{tiny_hf_dir}".gd]\nsst2 = 0.01\n["{tiny_hf_dir}".lcgd]\nsst2 = 0.003\n')
    own = cell_id(base)
    shared = cell_id(RunConfig(**{**base.__dict__, "lr": "shared"}))
    assert len({flat, own, shared}) == 3 and "__lrshared__" in shared
    table.write_text(f'["{tiny_hf_dir}".gd]\nsst2 = 0.01\n["{tiny_hf_dir}".lcgd]\nsst2 = 0.004\n')
    assert cell_id(base) != own


def test_results_record_the_rate_of_each_method(table, tiny_hf_dir):
    table.write_text(f'["{tiny_hf_dir}".gd]\nsst2 = 0.01\n["{tiny_hf_dir}".lcgd]\nsst2 = 0.003\n')
    loaded = load_model(str(tiny_hf_dir))
    cfg = RunConfig(task="sst2", model=str(tiny_hf_dir), k=2, n_test=4, data_dir=str(TEST_DATA), loss_reduction="sum")
    own = run(cfg, None, loaded)["config"]
    assert own["lr_by_method"] == {"gd": 0.01, "lcgd": 0.003} and own["lr"] == 0.01 and own["lr_rule"] == "default"
    assert own["lr_source_by_method"]["lcgd"].endswith("[{}.lcgd]".format(tiny_hf_dir))
    shared = run(RunConfig(**{**cfg.__dict__, "lr": "shared"}), None, loaded)["config"]
    assert shared["lr_by_method"] == {"gd": 0.01, "lcgd": 0.01} and shared["lr_rule"] == "shared"


def test_the_default_run_is_the_papers_protocol_mean_loss_and_one_shared_rate(table, tiny_hf_dir):
    table.write_text(f'["{tiny_hf_dir}".gd]\nsst2 = 0.01\n[mean."{tiny_hf_dir}".gd]\nsst2 = 0.2\n'
                     f'[mean."{tiny_hf_dir}".lcgd]\nsst2 = 0.05\n')
    loaded = load_model(str(tiny_hf_dir))
    cfg = RunConfig(task="sst2", model=str(tiny_hf_dir), k=2, n_test=4, data_dir=str(TEST_DATA))
    paper = run(cfg, None, loaded)["config"]
    assert (paper["loss_reduction"], paper["lr_rule"], paper["lr_by_method"]) == ("mean", "shared", {"gd": 0.2, "lcgd": 0.2})
    own = run(RunConfig(**{**cfg.__dict__, "lr": "own"}), None, loaded)["config"]
    assert (own["lr_rule"], own["lr_by_method"]) == ("default", {"gd": 0.2, "lcgd": 0.05})


def _sst2_prompts(loaded):
    """The prompts of the auto-rate tests' cells (sst2, k 3, seed 0, 4 test, 12 held out)."""
    task = load_task("sst2")
    return build_prompts(loaded.model, task, load_split(task, "train", TEST_DATA), load_split(task, "validation", TEST_DATA),
                         k=3, seed=0, n_test=4, n_heldout=12)


def _heldout(loaded, p, method, lr):
    """Independently of the runner: train, record the held-out prompts, restore."""
    with finetuned(loaded.model, p.demos, p.bos, method, lr, loaded.kv_bias):
        return record(loaded.model, p.zs_prefix(), p.heldout, p.options)


def _heldout_accuracy(loaded, p, method, lr):
    return _heldout(loaded, p, method, lr).accuracy()


def test_lr_auto_picks_the_best_held_out_rate_per_method(tiny_hf_dir, tmp_path):
    loaded = load_model(str(tiny_hf_dir))
    lrs = (0.003, 0.03, 0.3, 1.0)
    cfg = RunConfig(task="sst2", model=str(tiny_hf_dir), k=3, n_test=4, lr="auto", n_heldout=12, data_dir=str(TEST_DATA))
    results = run(cfg, tmp_path / "run", loaded, auto_lrs=lrs)
    p = _sst2_prompts(loaded)
    c = results["config"]
    for method in ("gd", "lcgd"):
        curve = {lr: _heldout_accuracy(loaded, p, method, lr) for lr in lrs}
        assert c["lr_auto"][method]["curve"] == {f"{lr:g}": pytest.approx(a) for lr, a in curve.items()}
        best = max(curve.values())
        assert c["lr_auto"][method]["chosen"] == max(lr for lr, a in curve.items() if a == best)
        assert c["lr_by_method"][method] == c["lr_auto"][method]["chosen"]
        assert results["heldout_accuracy"][method] == pytest.approx(best)
        # the share of held-out examples given the most frequent option, at the chosen rate
        predicted = _heldout(loaded, p, method, c["lr_by_method"][method]).option_logprobs.argmax(-1).tolist()
        share = max(predicted.count(o) for o in set(predicted)) / len(predicted)
        assert results["heldout_majority_share"][method] == pytest.approx(share)
    assert c["lr_rule"] == "auto"
    # a cell at the rates it chose itself is a Table 2 cell (each method at its own chosen rate)
    t2 = table2(collect(tmp_path / "run").rows, "default", "mean").set_index("row")  # a token-mean-loss cell
    assert t2.loc["accuracy — LCGD", "mean_mean"] == pytest.approx(results["accuracy"]["lcgd"])
    # the chosen rate's stage is the sweep's: a rerun reuses all of them
    again = run(cfg, tmp_path / "run", loaded, auto_lrs=lrs)
    assert again["config"]["lr_auto"] == c["lr_auto"]


def test_lr_auto_on_a_custom_task_file_from_the_cli(tmp_path, tiny_hf_dir):
    rows = [json.loads(line) for line in (TEST_DATA / "sst2" / "train.jsonl").read_text().splitlines()[:80]]
    data = [{"review": r["sentence"], "label": r["label"]} for r in rows]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data[:60]))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data[60:]))
    task = tmp_path / "mine.toml"
    task.write_text('name = "mine"\ntemplate = "Review: {review} Sentiment:"\nanswers = ["Negative", "Positive"]\n'
                    'eval_split = "test"\n[files]\ntrain = "train.jsonl"\ntest = "test.jsonl"\n')
    base = ["run", "--model", str(tiny_hf_dir), "--task", str(task), "--k", "2", "--n-test", "4", "--methods", "gd"]
    no_rate = run_cli([*base, "--out", str(tmp_path / "a")])
    assert no_rate.returncode == 1 and "--lr auto" in no_rate.stderr
    proc = run_cli([*base, "--lr", "auto", "--out", str(tmp_path / "b")])
    assert proc.returncode == 0, proc.stderr
    c = json.loads((tmp_path / "b" / "results.json").read_text())["config"]
    assert c["n_heldout"] == 32 and set(c["lr_auto"]["gd"]["curve"]) == {"1e-05", "3e-05", "0.0001", "0.0003"}


def test_table2_at_own_and_at_shared_rates_keeps_the_cells_apart():
    from lens_iclgd.report import COLUMNS, table2

    rows = []
    for rule, lcgd_acc in (("default", 0.6), ("shared", 0.4)):
        for task in ("sst2", "mr"):
            for method, acc in (("gd", 0.7), ("lcgd", lcgd_acc)):
                rows.append({c: None for c in COLUMNS} | {
                    "cell": f"{rule}-{task}", "model": "m", "baseline": "trained", "task": task, "seed": 0,
                    "lr_rule": rule, "lr_default": rule == "default", "plain": True, "loss": "sum", "step_plain": True,
                    "ablate": "", "method": method,
                    "acc_zs": 0.5, "acc_icl": 0.5, "acc_ft": acc, "SimAOU": 0.1})
    # a cell with another step unit (or balanced demonstrations) stays out of the table
    rows += [{**r, "cell": "token-mr", "plain": False, "step_plain": False, "acc_ft": 0.0} for r in rows[:2]]
    # and a token-mean-loss cell stays out of the summed loss's tables, and they out of its
    rows += [{**r, "cell": "mean-mr", "plain": False, "loss": "mean", "acc_ft": 0.9} for r in rows[:2]]
    frame = pd.DataFrame(rows, columns=COLUMNS)
    own, shared = table2(frame), table2(frame, "shared")
    lcgd = lambda t: t.set_index("row").loc["accuracy — LCGD", "mean_mean"]
    assert lcgd(own) == pytest.approx(0.6) and lcgd(shared) == pytest.approx(0.4)
    assert lcgd(table2(frame, "default", "mean")) == pytest.approx(0.9)


def test_lr_auto_on_a_reinitialised_baseline_takes_the_trained_models_rates(tiny_hf_dir, tmp_path):
    lrs = (0.003, 0.03, 0.3, 1.0)
    cfg = RunConfig(task="sst2", model=str(tiny_hf_dir), k=3, n_test=4, lr="auto", n_heldout=12, data_dir=str(TEST_DATA),
                    methods=("gd",))
    stages = tmp_path / "stages"
    trained = run(cfg, tmp_path / "trained", None, stages, auto_lrs=lrs)["config"]
    n_stages = len(list(stages.rglob("*")))
    untrained = run(RunConfig(**{**cfg.__dict__, "baseline": "untrained"}), tmp_path / "untrained", None, stages,
                    auto_lrs=lrs)["config"]
    # the paper trains every baseline of a task at one rate: the trained model's choice, its sweep reused
    assert untrained["lr_auto"] == {"gd": {**trained["lr_auto"]["gd"], "chosen_on": "trained"}}
    assert untrained["lr_by_method"] == trained["lr_by_method"]
    assert untrained["lr_source"].startswith("--lr auto on the trained model")
    assert len(list(stages.rglob("*"))) == n_stages + 3  # only the untrained model's own ZS, ICL and GD stages
    # the re-initialised model's own held-out curve, computed independently, is not the one used
    loaded = load_model(str(tiny_hf_dir), "untrained", 0)
    p = _sst2_prompts(loaded)
    own = {f"{lr:g}": _heldout_accuracy(loaded, p, "gd", lr) for lr in lrs}
    assert own != pytest.approx(untrained["lr_auto"]["gd"]["curve"])


def test_a_grids_reinitialised_auto_cell_takes_the_rates_from_the_trained_model_the_grid_holds(tiny_hf_dir, tmp_path,
                                                                                             monkeypatch):
    grid = grid_from_record(dict(name="tiny", models=[str(tiny_hf_dir)], baselines=["untrained"], tasks=["sst2"], seeds=[0],
                                 methods=["gd"], lrs=["auto"], k=3, n_test=4, n_heldout=12, data_dir=str(TEST_DATA)))
    # the grid loaded the trained model to re-initialise it: the cell must not load it once more
    def no_second_load(*args, **kwargs):
        raise AssertionError(f"the cell loaded a model: {args}")
    monkeypatch.setattr(inputs, "load_model", no_second_load)
    assert run_grid(grid, tmp_path / "r")["done"] == 1
    (cell,) = (tmp_path / "r" / "cells").glob("*/results.json")
    c = json.loads(cell.read_text())["config"]
    assert c["baseline"] == "untrained" and c["lr_auto"]["gd"]["chosen_on"] == "trained"
    assert c["lr_by_method"]["gd"] == c["lr_auto"]["gd"]["chosen"]


def test_only_finetuning_stages_are_keyed_by_the_held_out_examples(gqa_model):
    # --lr auto's held-out examples are scored after finetuning only: ZS and ICL recordings
    # do not depend on them, so cells with other held-out sets (every seed's) share those
    from lens_iclgd.inputs import prepare
    from lens_iclgd.runner import stage_keys

    keys = {}
    for n_heldout in (0, 8, 12):
        c = RunConfig(task="sst2", data_dir=str(TEST_DATA), k=3, n_test=4, lr=0.01, n_heldout=n_heldout)
        inp = prepare(c, loaded=gqa_model)
        assert len(inp.prompts.heldout) == n_heldout
        keys[n_heldout] = stage_keys(inp)
    assert keys[0]["zs"] == keys[8]["zs"] == keys[12]["zs"]
    assert keys[0]["icl"] == keys[8]["icl"] == keys[12]["icl"]
    for m in ("gd", "lcgd"):
        assert len({keys[0][m], keys[8][m], keys[12][m]}) == 3


def test_a_resumed_grid_takes_the_rates_a_finished_trained_cell_recorded_without_its_sweep(tiny_hf_dir, tmp_path,
                                                                                          monkeypatch):
    # another machine: the committed cells are there, the scratch stages are not
    grid = grid_from_record(dict(name="tiny", models=[str(tiny_hf_dir)], baselines=["trained", "untrained"], tasks=["sst2"],
                                 seeds=[0], methods=["gd"], lrs=["auto"], k=3, n_test=4, n_heldout=12, data_dir=str(TEST_DATA)))
    results = tmp_path / "r"
    assert run_grid(grid, results, scratch_dir=tmp_path / "machine1")["done"] == 2
    cells = {json.loads(f.read_text())["config"]["baseline"]: f for f in results.glob("cells/*/results.json")}
    first = json.loads(cells["untrained"].read_text())["config"]
    computed = []
    compute = runner.compute_stage
    monkeypatch.setattr(runner, "compute_stage", lambda inp, stage, lr=None: computed.append(stage) or compute(inp, stage, lr))

    def rerun_untrained(scratch: str) -> dict:
        computed.clear()
        cells["untrained"].unlink()
        assert run_grid(grid, results, scratch_dir=tmp_path / scratch)["done"] == 2
        return json.loads(cells["untrained"].read_text())["config"]

    assert rerun_untrained("machine2") == first and computed == ["zs", "icl", "gd"]  # no sweep, same cell
    # the rate is the one the trained cell recorded (an edited record is followed) ...
    trained = json.loads(cells["trained"].read_text())
    other = min(float(lr) for lr in trained["config"]["lr_auto"]["gd"]["curve"] if float(lr) != first["lr_by_method"]["gd"])
    trained["config"]["lr_auto"]["gd"]["chosen"] = other
    cells["trained"].write_text(json.dumps(trained))
    assert rerun_untrained("machine3")["lr_by_method"] == {"gd": other}
    # ... but only a twin's: other demonstrations mean the sweep is run again
    trained["config"]["demo_rows"] = trained["config"]["demo_rows"][::-1]
    cells["trained"].write_text(json.dumps(trained))
    assert rerun_untrained("machine4") == first and computed.count("gd") == 4 + 1


def test_refresh_heldout_shares_adds_only_the_share_a_fresh_run_writes(tiny_hf_dir, tmp_path):
    loaded = load_model(str(tiny_hf_dir))
    cfg = RunConfig(task="sst2", model=str(tiny_hf_dir), k=3, n_test=4, lr=0.3, n_heldout=12, data_dir=str(TEST_DATA))
    out, stages = tmp_path / "cell", tmp_path / "stages"
    run(cfg, out, loaded, stages_dir=stages)
    path = out / "results.json"
    fresh = json.loads(path.read_text())
    older = {k: v for k, v in fresh.items() if k != "heldout_majority_share"}
    path.write_text(json.dumps(older))
    shares = runner.refresh_heldout_shares(out, stages, loaded)
    assert shares == fresh["heldout_majority_share"]
    assert list(json.loads(path.read_text())) == list(fresh)  # the same entries, in the same place
    assert json.loads(path.read_text()) == fresh
    for f in stages.glob("lcgd-*.pt"):
        f.unlink()
    with pytest.raises(UserError, match="missing: rerun the cell"):
        runner.refresh_heldout_shares(out, stages, loaded)
