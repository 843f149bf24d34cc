"""The study at scale: portable cell ids, committed results, cross-model reports, the
ICL-gain table, on tiny local models (the submitit launcher is in test_launch.py)."""

import dataclasses
import json
import tomllib
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import TEST_DATA, grid_file, run_cli, save_tiny_llama
from lens_iclgd.errors import UserError
from lens_iclgd.grid import cell_id, cells, legacy_cell_id, load_grid
from lens_iclgd.report import collect

ROOT = Path(__file__).resolve().parents[1]


def _data_copy(where: Path, tasks=("sst2",)) -> Path:
    for t in tasks:
        shutil.copytree(TEST_DATA / t, where / t)
    return where


def _results(results_dir: Path) -> dict:
    return {f.parent.name: f.read_bytes() for f in sorted((results_dir / "cells").glob("*/results.json"))}


def _tree(root: Path) -> dict:
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}


@pytest.fixture(scope="session")
def second_hf_dir(tmp_path_factory, tokenizer) -> Path:
    """Another tiny model, with 3 layers: a second "model family" for cross-model reports."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_hf_other"), tokenizer, n_layers=3, seed=1)


# --- 1. cell ids are portable across machines -------------------------------------------------


def test_cell_ids_follow_the_data_not_its_path(tmp_path, tiny_hf_dir):
    a, b, changed = (_data_copy(tmp_path / name) for name in ("a", "b", "changed"))
    lines = (changed / "sst2" / "train.jsonl").read_text().splitlines(keepends=True)
    (changed / "sst2" / "train.jsonl").write_text("".join(lines[1:]))  # one training row fewer

    def ids(data_dir):
        return [cell_id(c) for c in cells(load_grid(grid_file(tmp_path / "g.toml", [tiny_hf_dir], data_dir)))]

    assert ids(a) == ids(b)
    assert ids(a) != ids(changed) and len(set(ids(a)) & set(ids(changed))) == 0
    (c,) = cells(load_grid(grid_file(tmp_path / "g.toml", [tiny_hf_dir], a, seeds=[0])))
    assert legacy_cell_id(c) != legacy_cell_id(cells(load_grid(grid_file(tmp_path / "g.toml", [tiny_hf_dir], b, seeds=[0])))[0])
    # without a data_dir the id is the one older versions gave (existing results stay valid)
    assert cell_id(dataclasses.replace(c, data_dir=None)) == legacy_cell_id(dataclasses.replace(c, data_dir=None))
    # the recorded fingerprint stands in for reading the data
    assert cell_id(c, {"sst2": "local-sha256:0"}) != cell_id(c)
    shutil.rmtree(a)
    with pytest.raises(UserError, match="missing data file"):
        cell_id(c)


def test_grid_resumes_on_another_machine_and_adopts_legacy_cells(tmp_path, tiny_hf_dir):
    a, b = _data_copy(tmp_path / "a"), _data_copy(tmp_path / "b")
    results, scratch = tmp_path / "results", tmp_path / "scratch"
    first = run_cli(["grid", str(grid_file(tmp_path / "ga.toml", [tiny_hf_dir], a)), "--results", str(results),
                     "--scratch", str(scratch)])
    assert first.returncode == 0, first.stderr
    assert not (results / "stages").exists() and list((scratch / "stages").glob("*.pt"))
    done = _results(results)
    assert len(done) == 2
    recorded = json.loads((results / "grids" / "tiny.json").read_text())["data_fingerprints"]
    assert set(recorded) == {"sst2"} and recorded["sst2"].startswith("local-sha256:")

    # the same grid on "another machine": its data elsewhere, nothing to recompute
    second = run_cli(["grid", str(grid_file(tmp_path / "gb.toml", [tiny_hf_dir], b)), "--results", str(results)])
    assert second.returncode == 0 and "2 already done, 0 to run" in second.stdout

    # a results directory written before fingerprints: cells under legacy ids, grid json without them
    grid = load_grid(tmp_path / "ga.toml")
    for c in cells(grid):
        (results / "cells" / cell_id(c)).rename(results / "cells" / legacy_cell_id(c))
    del recorded
    old = json.loads((results / "grids" / "tiny.json").read_text())
    old.pop("data_fingerprints")
    old.pop("cells")  # records of that time listed no cell ids either
    old["data_dir"] = str(a)
    (results / "grids" / "tiny.json").write_text(json.dumps(old))
    coll = collect(results)  # the report still counts them
    assert len(coll.cells) == 2 and coll.missing == 0 and coll.stale == 0
    resumed = run_cli(["grid", str(tmp_path / "ga.toml"), "--results", str(results), "--scratch", str(scratch)])
    assert resumed.returncode == 0 and "2 finished cells renamed" in resumed.stdout and "0 to run" in resumed.stdout
    assert _results(results) == done


# --- 2./3. committed results and the cross-model report ----------------------------------------


@pytest.fixture(scope="module")
def two_model_results(tmp_path_factory, tiny_hf_dir, second_hf_dir):
    """Trained and untrained, GD and LCGD, two seeds, for two models; data in a copy that
    is deleted afterwards (a clean clone has no data)."""
    root = tmp_path_factory.mktemp("two_models")
    data = _data_copy(root / "data")
    # the summed loss, each method at its own rate: the protocol of the committed paper-scale
    # cells, which the Table 1 / Table 2 / cross-model pipeline reports
    config = grid_file(root / "two.toml", [tiny_hf_dir, second_hf_dir], data, name="two",
                        baselines=["trained", "untrained"], loss_reduction="sum")
    results = root / "results"
    out = run_cli(["grid", str(config), "--results", str(results)], timeout=1800)  # 8 cells; slow on a busy machine
    assert out.returncode == 0, out.stderr
    shutil.rmtree(data)
    return results


def test_committed_layout_and_byte_for_byte_report(tmp_path, two_model_results):
    # what git would commit from artifacts/results/, with the repository's .gitignore there
    repo = tmp_path / "clone"
    committed = repo / "artifacts" / "results"
    shutil.copytree(two_model_results, committed)
    shutil.copy(ROOT / "artifacts" / "results" / ".gitignore", committed / ".gitignore")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    tracked = subprocess.run([*git, "ls-files"], check=True, capture_output=True, text=True).stdout.split()
    names = {Path(t).name for t in tracked if t != "artifacts/results/.gitignore"}
    assert names == {"results.json", "timings.json", "two.json"}
    assert len(tracked) == 1 + 1 + 2 * 8  # .gitignore, the grid, 8 cells
    subprocess.run([*git, "commit", "-q", "-m", "results"], check=True)

    # a clean clone: only the tracked files
    clean = tmp_path / "clean"
    subprocess.run(["git", "clone", "-q", str(repo), str(clean)], check=True)
    reports = []
    for name in ("r1", "r2"):
        proc = run_cli(["report", str(clean / "artifacts" / "results"), "--out", str(tmp_path / name), "--command-line", "cmd"])
        assert proc.returncode == 0, proc.stderr
        reports.append(_tree(tmp_path / name))
    assert reports[0] == reports[1]
    files = set(reports[0])
    slugs = sorted(d for d in {f.split("/")[0] for f in files if "/" in f})
    assert len(slugs) == 2
    for slug in slugs:
        assert {f"{slug}/report.md", f"{slug}/table1.csv", f"{slug}/table2.csv", f"{slug}/fig3_per_layer.png"} <= files
    assert {"report.md", "icl_gain.csv", "fig_crossmodel_simam_delta.png", "crossmodel_table1.csv",
            "crossmodel_table2.csv"} <= files
    text = reports[0]["report.md"].decode()
    assert "8 finished cells of 8 defined by the grids here; 0 missing" in text
    assert "## Findings (docs/protocol.md) per model" in text and "| 1. SimAOU alone is no evidence |" in text
    assert "| 4. LCGD's gradients are larger |" in text and "## Verdicts at a glance" in text


def test_crossmodel_tables_are_each_models_own_means(tmp_path, two_model_results):
    """Every number of the side-by-side tables is that model's own report's mean column,
    and each per-model report pools only its model's cells."""
    out = tmp_path / "report"
    assert run_cli(["report", str(two_model_results), "--out", str(out)]).returncode == 0
    side = pd.read_csv(out / "crossmodel_table2.csv").set_index("row")
    cells = [json.loads(f.read_text()) for f in sorted(two_model_results.glob("cells/*/results.json"))]
    models = [c for c in side.columns if not c.endswith(("_seed_std", "_task_min", "_task_max"))]
    assert len(models) == 2 and f"{models[0]}_seed_std" in side.columns
    for model in models:
        own = [c for c in cells if c["config"]["model"] == model and c["config"]["baseline"] == "trained"]
        assert len(own) == 2  # two seeds
        # independent: the mean over seeds (one task) straight from results.json
        gd_simaou = statistics.mean(c["metrics"]["gd"]["SimAOU"]["mean"] for c in own)
        lcgd_acc = statistics.mean(c["accuracy"]["lcgd"] for c in own)
        assert side.loc["SimAOU — GD", model] == pytest.approx(gd_simaou, abs=1e-4)
        # the spread over seeds: one task, so the std of the two seeds' values; the task range is that one task
        spread = statistics.stdev(c["metrics"]["gd"]["SimAOU"]["mean"] for c in own)
        assert side.loc["SimAOU — GD", f"{model}_seed_std"] == pytest.approx(spread, abs=1e-4)
        assert side.loc["SimAOU — GD", f"{model}_task_min"] == pytest.approx(gd_simaou, abs=1e-4)
        assert side.loc["accuracy — LCGD", model] == pytest.approx(lcgd_acc, abs=1e-4)
        per_model = out / Path(model).name / "table2.csv"
        assert pd.read_csv(per_model).set_index("row").loc["SimAOU — GD", "mean_mean"] == pytest.approx(gd_simaou, abs=1e-9)
    # the two models differ, so a pooled table would have shown neither
    assert side.loc["SimAOU — GD", models].nunique() == 2
    text = (out / "report.md").read_text()
    for model in models:
        assert f"### {model}" in text
    assert "k requested 3, effective 3; n-test 6; seeds 0, 1" in text
    assert "| two | 4 | 3 | 6 | 0, 1 |" in text  # the grid's cells, k, n-test and seeds per model, with timings
    # what the findings rest on, per model: trained + untrained cells at the chosen rates
    assert text.count("4 cells: k 3, n-test 6, seeds 0, 1, 1 tasks, baselines trained, untrained") == 2
    # the rates those cells ran at: no table entry for these models, so the paper's rate for sst2
    paper_lr = tomllib.loads((ROOT / "lens_iclgd" / "tasks" / "sst2.toml").read_text())["paper_lr"]
    assert text.count(f"Learning rates of the chosen-rate cells (summed loss, each method's own rate): sst2 GD {paper_lr:g} (the paper's 1.3B rate); "
                      f"LCGD {paper_lr:g} (the paper's 1.3B rate).") == 2
    assert "what rules out the code" in text


# --- 4. the ICL-gain table --------------------------------------------------------------------


def test_icl_gain_table_and_default_model_rule(tmp_path, tiny_hf_dir, second_hf_dir):
    data = TEST_DATA
    config = grid_file(tmp_path / "icl.toml", [tiny_hf_dir, second_hf_dir], data, name="icl_gain", methods=["icl"],
                        tasks=["sst2", "mr"], seeds=[0, 1, 2], k=2, n_test=8)
    results = tmp_path / "results"
    assert run_cli(["grid", str(config), "--results", str(results)]).returncode == 0
    gain_dir = tmp_path / "icl_gain"
    gain_dir.mkdir()
    fast, slow = str(tiny_hf_dir), str(second_hf_dir)
    (gain_dir / "make_run_times.toml").write_text(f'machine = "test box"\n[seconds]\n"{fast}" = 120\n"{slow}" = 400\n')
    proc = run_cli(["report", str(results), "--out", str(tmp_path / "report"), "--icl-gain-out", str(gain_dir),
                    "--command-line", "lens-iclgd grid icl.toml"])
    assert proc.returncode == 0, proc.stderr

    table = pd.read_csv(gain_dir / "icl_gain.csv", dtype={"k": str, "n_test": str})
    assert list(table.columns) == ["model", "task", "zs", "icl", "gain", "gain_std", "seeds", "k", "n_test"]
    assert len(table) == 2 * 3  # 2 models x (2 tasks + mean)
    cells = [json.loads(f.read_text()) for f in results.glob("cells/*/results.json")]
    for model in (fast, slow):
        gains_by_seed = {}
        for task in ("sst2", "mr"):
            own = [c for c in cells if c["config"]["model"] == model and c["config"]["task"] == task]
            zs, icl = [c["accuracy"]["zs"] for c in own], [c["accuracy"]["icl"] for c in own]
            row = table[(table["model"] == model) & (table["task"] == task)].iloc[0]
            assert row["zs"] == pytest.approx(statistics.mean(zs), abs=1e-4)
            assert row["icl"] == pytest.approx(statistics.mean(icl), abs=1e-4)
            assert row["gain"] == pytest.approx(statistics.mean(icl) - statistics.mean(zs), abs=1e-4)
            assert row["gain_std"] == pytest.approx(statistics.stdev(i - z for i, z in zip(icl, zs)), abs=1e-4)
            assert (row["seeds"], row["k"], row["n_test"]) == (3, "2", "8")
            for c in own:
                gains_by_seed.setdefault(c["config"]["seed"], []).append(c["accuracy"]["icl"] - c["accuracy"]["zs"])
        mean = table[(table["model"] == model) & (table["task"] == "mean")].iloc[0]
        per_task = table[(table["model"] == model) & (table["task"] != "mean")]
        assert mean["gain"] == pytest.approx(per_task["gain"].mean(), abs=1e-4)
        assert mean["gain_std"] == pytest.approx(statistics.stdev(statistics.mean(g) for g in gains_by_seed.values()), abs=1e-4)

    md = (gain_dir / "icl_gain.md").read_text()
    assert "lens-iclgd grid icl.toml" in md and "test box" in md
    assert f"| {fast} | 120 | yes |" in md and f"| {slow} | 400 | no |" in md
    assert f"**Verdict:** 1 model(s) qualify ({fast}); the default is **{fast}**" in md
    # the cross-model report carries the same premise table
    assert "## The premise: ICL - ZS accuracy per model" in (tmp_path / "report" / "report.md").read_text()


def test_committed_report_regenerates_byte_for_byte(tmp_path):
    """The repository's own artifacts/report and artifacts/icl_gain: `report` on the
    committed cells with the committed manifest (its last command, run here into a
    temporary directory) gives every file back."""
    import tomllib

    committed, gain = ROOT / "artifacts" / "report", ROOT / "artifacts" / "icl_gain"
    manifest = tomllib.loads((ROOT / "artifacts" / "manifest.toml").read_text())
    assert manifest["report"]["command"] == ("lens-iclgd report artifacts/results --out artifacts/report "
                                             "--icl-gain-out artifacts/icl_gain --manifest artifacts/manifest.toml")
    out, out_gain = tmp_path / "report", tmp_path / "icl_gain"
    out_gain.mkdir()
    shutil.copy(gain / "make_run_times.toml", out_gain)
    proc = run_cli(["report", "artifacts/results", "--out", str(out), "--icl-gain-out", str(out_gain),
                    "--manifest", "artifacts/manifest.toml"], timeout=1200)
    assert proc.returncode == 0, proc.stderr
    text = (out / "report.md").read_text()
    # one command per line, every grid config of the manifest among them, and no "..." gaps
    block = text.split("```\n", 1)[1].split("\n```", 1)[0].splitlines()
    assert all("..." not in line and ";" not in line for line in block)
    assert [g["command"] for g in manifest["grid"]] == block[:len(manifest["grid"])]
    assert all((ROOT / g["config"]).is_file() for g in manifest["grid"])
    assert _tree(out) == _tree(committed)
    assert _tree(out_gain) == _tree(gain)


def test_cost_table_lists_every_committed_cell_that_ran_a_phase_of_its_own():
    """experiments/cost_table.py (the README's cost table) on the committed cells: one row per
    paper-scale cell with a phase of its own, including a Table 1 trained cell that recomputed
    a Table 2 stage beside that Table 2 cell (same first six columns), and a cell's time at
    least the sum of its own phases."""
    proc = subprocess.run([sys.executable, "experiments/cost_table.py", "artifacts/results"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = [[v.strip() for v in line.strip("|").split("|")] for line in proc.stdout.splitlines()[2:]]
    # Cells that list their reused stages are all shown; older cells are shown unless the
    # script's heuristic finds every phase was another cell's, so they bound the count.
    listed = unlisted = 0
    for f in (ROOT / "artifacts" / "results").glob("cells/*/results.json"):
        c, timing = json.loads(f.read_text())["config"], json.loads((f.parent / "timings.json").read_text())
        if c["k_effective"] != 32 or c.get("lr_rule") == "--lr" or "note" in timing:
            continue
        if "reused" in timing:
            listed += any(timing.get(p) and p not in timing["reused"] for p in ("zs", "icl", "gd", "lcgd"))
        else:
            unlisted += 1
    assert 0 < listed <= len(rows) <= listed + unlisted
    for row in rows:
        own = sum(float(v) for v in row[6:10] if v not in ("-", "reused"))
        assert float(row[11]) >= own - 1
    keys = [tuple(r[:6]) for r in rows]
    assert any(keys.count(k) == 2 for k in keys)  # e.g. gemma trained SST-5 seed 0: Table 2 and Table 1


def test_finding_1_compares_baselines_on_the_same_tasks_and_counts_shared_cells_once():
    from lens_iclgd.report import COLUMNS, Collected, findings

    def row(baseline, task, simaou, cell):
        return {**dict.fromkeys(COLUMNS), "cell": cell, "model": "m", "baseline": baseline, "task": task, "seed": 0,
                "method": "gd", "lr": 1e-5, "lr_rule": "default", "plain": True, "loss": "sum", "step_plain": True, "ablate": "", "k": 32, "n_test": 10,
                "SimAOU": simaou, "SimAOU_norm": simaou + 0.01}

    rows = pd.DataFrame([row("trained", "sst2", 0.10, "a"), row("trained", "sst2", 0.10, "a-table1"),  # shared GD
                         row("trained", "mr", 0.90, "b"), row("untrained", "sst2", 0.20, "c")], columns=COLUMNS)
    first = findings(Collected(rows, [], 0, [], 0, 0))[0]
    # sst2 only (mr has no untrained cell): 0.10 vs 0.20; pooled over tasks it would read 0.37 vs 0.20
    assert first.number == 1 and first.verdict == "agrees"
    assert first.numbers == {"SimAOU_trained": pytest.approx(0.10), "SimAOU_untrained": pytest.approx(0.20)}
    assert "the 1 task-seed pairs run for every baseline (sst2): trained 0.100 vs No Training 0.200" in first.evidence
    assert first.markdown().endswith("-> **agrees**.") and "Rule: agrees when" in first.markdown()


def test_table1_counts_a_trained_run_shared_by_tables_1_and_2_once():
    from lens_iclgd.report import COLUMNS, table1

    def row(seed, simaou, cell, alpha=None):
        return {**dict.fromkeys(COLUMNS), "cell": cell, "model": "m", "baseline": "trained", "task": "sst2",
                "seed": seed, "method": "gd", "lr": 1e-5, "lr_rule": "auto", "plain": True, "loss": "sum", "step_plain": True, "ablate": "", "k": 32,
                "n_test": 10, "SimAOU": simaou, "alpha": alpha}

    # seed 0's GD is in its Table 2 cell (with LCGD's alpha) and again in its Table 1 cell
    rows = pd.DataFrame([row(0, 0.1, "t1-seed0"), row(0, 0.1, "t2-seed0", alpha=0.3), row(1, 0.2, "t2-seed1", 0.2),
                         row(2, 0.3, "t2-seed2", 0.1)], columns=COLUMNS)
    trained = table1(rows).set_index("row").loc["Trained — SimAOU"]
    assert trained["sst2_n"] == 3
    assert trained["sst2_mean"] == pytest.approx(0.2) and trained["sst2_std"] == pytest.approx(0.1)  # not 0.175 / 0.096


def test_findings_are_decided_per_protocol_and_never_pool_the_two_losses():
    from lens_iclgd.report import COLUMNS, Collected, findings, table1

    def row(baseline, simaou, loss, rule, cell):
        return {**dict.fromkeys(COLUMNS), "cell": cell, "model": "m", "baseline": baseline, "task": "sst2", "seed": 0,
                "method": "gd", "lr": 1e-3 if loss == "mean" else 1e-5, "lr_rule": rule, "plain": loss == "sum",
                "loss": loss, "step_plain": True, "ablate": "", "k": 32, "n_test": 10,
                "SimAOU": simaou, "SimAOU_norm": simaou - 0.05}

    # summed loss: the untrained model far below the trained one; token-mean loss, shared rate: above it
    rows = pd.DataFrame([row("trained", 0.30, "sum", "default", "a"), row("untrained", 0.10, "sum", "default", "b"),
                         row("trained", 0.10, "mean", "shared", "c"), row("untrained", 0.20, "mean", "shared", "d")],
                        columns=COLUMNS)
    coll = Collected(rows, [], 0, [], 0, 0)
    summed, paper = findings(coll, "summed"), findings(coll, "paper")
    assert summed[0].verdict == "does not agree" and summed[0].numbers["SimAOU_trained"] == pytest.approx(0.30)
    assert paper[0].verdict == "agrees" and paper[0].numbers == {"SimAOU_trained": pytest.approx(0.10),
                                                                 "SimAOU_untrained": pytest.approx(0.20)}
    assert "token-mean loss" in paper[0].scope and "summed loss" in summed[0].scope
    assert paper[1].numbers["SimAOU"] == pytest.approx(0.15) and paper[1].verdict == "does not agree"  # 2 mean rows only
    assert table1(rows, "paper").set_index("row").loc["Trained — SimAOU", "sst2_mean"] == pytest.approx(0.10)
    assert table1(rows).set_index("row").loc["Trained — SimAOU", "sst2_mean"] == pytest.approx(0.30)


def test_token_mean_cells_at_the_papers_scale_get_their_own_table_2():
    """n-test 2000 (the paper's scale) and 200 (the sweeps') token-mean cells of the same
    task and seed are never pooled: each Table 2 holds its own scale's numbers."""
    from lens_iclgd.report import COLUMNS, table2

    def row(method, simaou, n_asked, cell):
        return {**dict.fromkeys(COLUMNS), "cell": cell, "model": "m", "baseline": "trained", "task": "sst2", "seed": 0,
                "method": method, "lr": 1e-3, "lr_rule": "shared", "plain": False, "loss": "mean", "step_plain": True,
                "ablate": "", "k": 32, "n_test": min(n_asked, 872), "paper_scale": n_asked >= 2000, "SimAOU": simaou}

    rows = pd.DataFrame([row("gd", 0.1, 200, "a"), row("lcgd", 0.2, 200, "a"), row("gd", 0.3, 2000, "b"),
                         row("lcgd", 0.4, 2000, "b")], columns=COLUMNS)
    sweep_scale = table2(rows, "shared", "mean").set_index("row")
    paper_scale = table2(rows, "shared", "mean", paper_scale=True).set_index("row")
    assert sweep_scale.loc["SimAOU — GD", "sst2_mean"] == pytest.approx(0.1) and sweep_scale.loc["SimAOU — GD", "sst2_n"] == 1
    assert paper_scale.loc["SimAOU — LCGD", "sst2_mean"] == pytest.approx(0.4) and paper_scale.loc["SimAOU — LCGD", "sst2_n"] == 1


def test_paper_protocol_cells_get_their_own_tables_and_verdict_rows(tmp_path, tiny_hf_dir, second_hf_dir):
    """Cells at the default protocol (token-mean loss, GD's rate shared) feed the
    paper's-protocol Table 1 and findings, apart from the summed-loss ones; the numbers are
    the cells' own means."""
    from conftest import grid_file

    config = grid_file(tmp_path / "g.toml", [tiny_hf_dir, second_hf_dir], _data_copy(tmp_path / "data"), name="paper",
                       baselines=["trained", "untrained"], seeds=[0])
    results, out = tmp_path / "results", tmp_path / "report"
    assert run_cli(["grid", str(config), "--results", str(results)], timeout=900).returncode == 0
    assert run_cli(["report", str(results), "--out", str(out)]).returncode == 0
    cells = [json.loads(f.read_text()) for f in results.glob("cells/*/results.json")]
    assert {c["config"]["loss_reduction"] for c in cells} == {"mean"} and {c["config"]["lr_rule"] for c in cells} == {"shared"}
    side = pd.read_csv(out / "crossmodel_table1_paper.csv").set_index("row")
    for c in cells:
        name = {"trained": "Trained", "untrained": "No Training"}[c["config"]["baseline"]]
        assert side.loc[f"{name} — SimAOU", c["config"]["model"]] == pytest.approx(c["metrics"]["gd"]["SimAOU"]["mean"], abs=1e-4)
    assert not (out / "crossmodel_table1.csv").exists()  # no summed-loss cells: no summed-loss table
    text = (out / "report.md").read_text()
    assert "| 1. SimAOU alone is no evidence | paper's protocol: token-mean loss, GD's rate shared | " in text
    assert "| 1. SimAOU alone is no evidence | summed loss, each method's own rate | not available" in text
    assert "## Findings (docs/protocol.md) per model (paper's protocol: token-mean loss, GD's rate shared)" in text
    per_model = (out / Path(str(tiny_hf_dir)).name / "report.md").read_text()
    assert "At the paper's protocol: token-mean loss, GD's chosen rate shared by both methods:" in per_model
    assert "At summed loss" not in per_model  # no summed-loss cells: that protocol's findings are not shown
