"""The cluster launcher (launch.py, `grid --submit`): local jobs give the uninterrupted
grid, SLURM gets the requested resources, bad launcher flags fail in one line."""

import pytest

from conftest import TEST_DATA, grid_file, run_cli
from lens_iclgd.cli import main
from lens_iclgd.report import collect


def _results(results_dir) -> dict:
    return {f.parent.name: f.read_bytes() for f in sorted((results_dir / "cells").glob("*/results.json"))}


def test_submit_local_gives_the_uninterrupted_grid(tmp_path, tiny_hf_dir):
    config = grid_file(tmp_path / "g.toml", [tiny_hf_dir], TEST_DATA, seeds=[0, 1, 2], lrs=[0.01])
    whole, submitted = tmp_path / "whole", tmp_path / "submitted"
    assert run_cli(["grid", str(config), "--results", str(whole)]).returncode == 0
    proc = run_cli(["grid", str(config), "--results", str(submitted), "--submit", "local", "--jobs", "2", "--time", "20"])
    assert proc.returncode == 0, proc.stderr
    assert "submitted 2 local job(s)" in proc.stdout and "shard 1/2:" in proc.stdout
    assert _results(submitted) == _results(whole) and len(_results(whole)) == 3
    assert list((submitted / "submitit").rglob("*_log.out"))
    assert run_cli(["report", str(submitted)]).returncode == 0
    assert collect(submitted).missing == 0


def test_slurm_executor_gets_the_requested_resources(tmp_path, monkeypatch, capsys):
    from submitit.slurm import slurm

    from lens_iclgd.launch import Resources, make_executor

    res = Resources(jobs=4, partition="gpu-long", time_min=90, gpus_per_job=1, cpus_per_job=8, mem_gb=32)
    config = grid_file(tmp_path / "g.toml", ["gemma-3-270m"], TEST_DATA)
    assert main(["grid", str(config), "--results", str(tmp_path / "r"), "--submit", "slurm"]) == 1
    err = capsys.readouterr().err
    assert "Run on a SLURM login node" in err and len(err.splitlines()) == 1

    monkeypatch.setattr(slurm.SlurmExecutor, "affinity", classmethod(lambda cls: 2))  # pretend srun exists
    executor = make_executor("slurm", tmp_path / "submitit" / "%j", res, "lens-iclgd-x")
    params = executor._executor.parameters
    assert (params["partition"], params["time"], params["gpus_per_node"], params["cpus_per_task"]) == ("gpu-long", 90, 1, 8)
    assert params["array_parallelism"] == 4
    sbatch = executor._executor._make_submission_file_text("python -m x", "uid")
    for line in ("#SBATCH --partition=gpu-long", "#SBATCH --time=90", "#SBATCH --gpus-per-node=1",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --mem=32GB", "#SBATCH --job-name=lens-iclgd-x",
                 "export OMP_NUM_THREADS=8"):
        assert line in sbatch, line


@pytest.mark.parametrize("args,message", [
    (["--submit", "local", "--shard", "0/2"], "--shard and --submit exclude each other"),
    (["--submit", "local", "--jobs", "0"], "--jobs must be an integer >= 1"),
    (["--submit", "local", "--mem-gb", "-1"], "--mem-gb -1.0 must be a positive number"),
])
def test_bad_launcher_flags(tmp_path, capsys, args, message):
    config = grid_file(tmp_path / "g.toml", ["gemma-3-270m"], TEST_DATA)
    assert main(["grid", str(config), "--results", str(tmp_path / "r"), *args]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r" / "submitit").exists()
