"""The real CLI in a subprocess: a tiny local model end to end, and bad input failing
with one line on stderr, a non-zero exit code, and no results left behind."""

import json
import subprocess
from pathlib import Path

import pytest

from conftest import TEST_DATA, cli_in_process, run_cli

SST2 = ["--task", "sst2", "--data-dir", str(TEST_DATA)]


def test_tiny_local_model_end_to_end(tiny_hf_dir, tmp_path):
    out = tmp_path / "run"
    args = ["run", "--model", str(tiny_hf_dir), *SST2, "--k", "4", "--n-test", "12", "--lr", "0.01", "--out", str(out)]
    proc = run_cli(args)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # stderr is not a terminal: no progress bar is drawn
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["model_source"] == "local-hf"
    assert set(results["accuracy"]) == {"zs", "icl", "gd", "lcgd"}
    assert "SimAOU" in proc.stdout and "ICL" in proc.stdout  # the summary table
    first_timings = json.loads((out / "timings.json").read_text())
    assert "reused" not in first_timings
    # rerunning reuses every finished stage and gives the same numbers
    again = run_cli(args)
    assert again.returncode == 0 and again.stdout.count("reusing the finished stage") == 4
    # timings.json names the reused stages; their seconds stay those of the run that made them
    timings = json.loads((out / "timings.json").read_text())
    assert timings["reused"] == ["zs", "icl", "gd", "lcgd"]
    assert {s: timings[s] for s in timings["reused"]} == {s: first_timings[s] for s in timings["reused"]}
    assert json.loads((out / "results.json").read_text())["metrics"] == results["metrics"]


def _bad_task(tmp_path: Path, template="Text: {text} Label:", answers='["Negative", "Positive"]', text="a fine film") -> str:
    rows = [{"text": text, "label": i % 2} for i in range(20)]
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = tmp_path / "task.toml"
    path.write_text(f'name = "t"\ntemplate = "{template}"\nanswers = {answers}\neval_split = "test"\n'
                    '[files]\ntrain = "train.jsonl"\ntest = "test.jsonl"\n')
    return str(path)


CASES = {
    "unknown task": (lambda tmp, m: ["--task", "sst3"], "unknown task 'sst3'"),
    "unknown model": (lambda tmp, m: ["--model", "no-such-model"], "unknown model"),
    "unknown baseline": (lambda tmp, m: ["--baseline", "half"], "unknown baseline"),
    "unknown method": (lambda tmp, m: ["--methods", "icl,adam"], "unknown method 'adam'"),
    "k not an integer": (lambda tmp, m: ["--k", "four"], "is not an integer"),
    "k zero": (lambda tmp, m: ["--k", "0"], "k must be an integer >= 1"),
    "n-test negative": (lambda tmp, m: ["--n-test", "-3"], "n_test must be an integer >= 1"),
    "lr zero": (lambda tmp, m: ["--lr", "0"], "lr must be a finite number > 0"),
    "lr nan": (lambda tmp, m: ["--lr", "nan"], "lr must be a finite number > 0"),
    "lr inf": (lambda tmp, m: ["--lr", "inf"], "lr must be a finite number > 0"),
    "seed not an integer": (lambda tmp, m: ["--seed", "1.5"], "is not an integer"),
    "missing data dir": (lambda tmp, m: ["--task", "sst2", "--data-dir", str(tmp / "nope")], "does not exist"),
    "missing data file": (lambda tmp, m: ["--task", "cb", "--data-dir", str(tmp)], "missing data file"),
    "task file missing": (lambda tmp, m: ["--task", str(tmp / "none.toml")], "does not exist"),
    "malformed task toml": (lambda tmp, m: ["--task", str(_write(tmp / "x.toml", "name = ["))], "not valid TOML"),
    "template field missing": (lambda tmp, m: ["--task", _bad_task(tmp, template="Text: {review} Label:"), "--model", m], "template field {review}"),
    "answers tokenize alike": (lambda tmp, m: ["--task", _bad_task(tmp, answers='["Zyxwv", "Qwrtp"]'), "--model", m], "tokenize to the same tokens"),
    "prompt longer than context": (lambda tmp, m: ["--task", _bad_task(tmp, text="film " * 400), "--model", m], "even with zero demonstrations"),
    "k larger than pool": (lambda tmp, m: ["--task", _bad_task(tmp), "--model", m, "--k", "50"], "more than the 20 training examples"),
    "bad ablation": (lambda tmp, m: ["--ablate", "3:5"], "cannot parse ablation"),
    "ablation out of range": (lambda tmp, m: [*SST2, "--model", m, "--ablate", "9.0"], "has layers 0..1"),
    "nan during training": (lambda tmp, m: [*SST2, "--model", m, "--lr", "1e38", "--k", "2", "--loss-reduction", "sum"],
                            "loss became"),  # the summed loss: its step at 1e38 is sure to overflow
    "device not present": (lambda tmp, m: ["--device", "cuda:7"], "is not available here"),
    "unknown device": (lambda tmp, m: ["--device", "abacus"], "unknown device 'abacus'"),
    "unknown precision": (lambda tmp, m: ["--precision", "half"], "invalid choice: 'half'"),
    "unknown step unit": (lambda tmp, m: ["--step-unit", "word"], "invalid choice: 'word'"),
    "lr word": (lambda tmp, m: ["--lr", "fast"], "'fast' is not a number"),
    "balanced without rows of a label": (lambda tmp, m: ["--task", _bad_task(tmp, answers='["Negative", "Positive", "neutral"]'),
                                                         "--model", m, "--k", "3", "--balanced"], "--balanced needs 1 training rows of label 2"),
}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", CASES)
def test_bad_input_fails_with_one_line(case, tmp_path, tiny_hf_dir, capsys):
    """In process (cli_in_process): the same main() as the console script; the process
    boundary (exit codes, no traceback) is tested through run_cli below and in
    test_bad_input_in_a_real_process."""
    make_args, message = CASES[case]
    out = tmp_path / "out"
    args = ["run", "--n-test", "4", "--k", "2", "--lr", "0.01", "--out", str(out)]
    args += make_args(tmp_path, str(tiny_hf_dir))
    code, _, stderr = cli_in_process(args, capsys)
    assert code != 0
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert message in lines[0], lines[0]
    assert "Traceback" not in stderr
    assert not (out / "results.json").exists()
    leftovers = [p for p in out.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"] if out.exists() else []
    assert not leftovers


@pytest.mark.parametrize("case,code", [("unknown task", 1), ("k not an integer", 2), ("nan during training", 1)])
def test_bad_input_in_a_real_process(case, code, tmp_path, tiny_hf_dir):
    """A few of CASES through the console script's process: exit code 1 for a UserError,
    2 for a usage error, one line on stderr, no traceback, nothing left behind."""
    make_args, message = CASES[case]
    out = tmp_path / "out"
    proc = run_cli(["run", "--n-test", "4", "--k", "2", "--lr", "0.01", "--out", str(out), *make_args(tmp_path, str(tiny_hf_dir))])
    assert proc.returncode == code and proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert message in proc.stderr and "Traceback" not in proc.stderr and not (out / "results.json").exists()


def test_unwritable_output_dir(tmp_path):
    blocker = _write(tmp_path / "file", "not a directory")
    proc = run_cli(["run", "--out", str(blocker / "out")])
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "not writable" in proc.stderr


def test_full_output_dir(tmp_path):
    mnt = tmp_path / "full"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        proc = run_cli(["run", "--out", str(mnt / "out")])
        assert proc.returncode == 1
        assert len(proc.stderr.strip().splitlines()) == 1 and "MB free" in proc.stderr
        assert not list(mnt.iterdir())
    finally:
        subprocess.run(["umount", str(mnt)])


def test_debug_shows_traceback():
    proc = run_cli(["--debug", "run", "--task", "sst3"])
    assert proc.returncode != 0 and "Traceback" in proc.stderr


@pytest.mark.parametrize("args,usage", [(["--bogus"], "(see lens-iclgd --help)"), (["run", "--k", "four"], "(see lens-iclgd run --help)"),
                                        (["frobnicate"], "(see lens-iclgd --help)")])
def test_usage_error_names_the_program_once(args, usage):
    proc = run_cli(args)
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert line.startswith("lens-iclgd: error: ") and line.endswith(usage) and len(line.splitlines()) == 1
    assert "lens-iclgd lens-iclgd" not in line


def test_editable_install_is_quiet_and_ships_the_data_folders(tmp_path):
    """No setuptools warnings for the data folders (tasks/*.toml, ...), and they are in the wheel."""
    import sys
    import zipfile

    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(Path(__file__).resolve().parents[1])], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr and "absent from the `packages`" not in proc.stderr, proc.stderr
    names = zipfile.ZipFile(next(tmp_path.glob("*.whl"))).namelist()
    assert "lens_iclgd/tasks/sst2.toml" in names and "lens_iclgd/learning_rates.toml" in names
    assert "lens_iclgd/zoo/qwen2.5-coder-0.5b.toml" in names and not any(n.startswith("tests/") for n in names)

    # the editable build `make` runs (PEP 660 hook): a plain .pth to the repository, no warning block
    root = Path(__file__).resolve().parents[1]
    editable = tmp_path / "editable"
    editable.mkdir()
    hook = f"from setuptools import build_meta; print(build_meta.build_editable({str(editable)!r}))"
    proc = subprocess.run([sys.executable, "-c", hook], cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr and "Editable installation" not in proc.stderr, proc.stderr
    wheel = zipfile.ZipFile(editable / proc.stdout.split()[-1])
    pth = [n for n in wheel.namelist() if n.endswith(".pth")]
    assert [wheel.read(n).decode().strip() for n in pth] == [str(root)]


def test_token_steps_and_balanced_demos_are_recorded(tiny_hf_dir, tmp_path):
    out = tmp_path / "run"
    proc = run_cli(["run", "--model", str(tiny_hf_dir), *SST2, "--k", "4", "--n-test", "6", "--lr", "0.01",
                    "--step-unit", "token", "--balanced", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr
    r = json.loads((out / "results.json").read_text())
    c = r["config"]
    assert c["step_unit"] == "token" and c["balanced"] is True
    assert c["demo_label_counts"] == {"Negative": 2, "Positive": 2}
    for m in ("gd", "lcgd"):
        assert c["n_steps"][m] == len(r["grad_norms"][m][0]) == len(r["losses"][m]) > c["k_effective"]
