"""Grids on a cluster: the N shards of `lens-iclgd grid` as submitit jobs.

    lens-iclgd grid CONFIG --results RESULTS --submit slurm --jobs 8 --partition cpu --time 240

Job i of N runs `lens-iclgd grid CONFIG --results RESULTS --shard i/N` (the same command
a user would type, so a job behaves exactly like a resumed grid) onto the shared RESULTS:
on SLURM as one job array through submitit, with `--submit local` as processes on this
machine through submitit's local executor (the launcher waits for those). submitit's
logs go to RESULTS/submitit/. Shards are disjoint, finished cells are skipped, and
`lens-iclgd report RESULTS` merges whatever has finished, so a resubmission after a
timeout or preemption picks up where the jobs stopped.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError, check_int
from .store import check_writable

CLUSTERS = ("slurm", "local")


@dataclass
class Resources:
    """What each job asks for (None: the cluster's default)."""

    jobs: int = 1
    partition: str | None = None
    time_min: int = 240
    gpus_per_job: int = 0
    cpus_per_job: int | None = None
    mem_gb: float | None = None

    def validate(self) -> "Resources":
        check_int("--jobs", self.jobs, 1)
        check_int("--time", self.time_min, 1)
        check_int("--gpus-per-job", self.gpus_per_job, 0)
        if self.cpus_per_job is not None:
            check_int("--cpus-per-job", self.cpus_per_job, 1)
        if self.mem_gb is not None and not self.mem_gb > 0:
            raise UserError(f"--mem-gb {self.mem_gb} must be a positive number of GB")
        return self


def executor_parameters(cluster: str, res: Resources, name: str) -> dict[str, Any]:
    """submitit's update_parameters() arguments for one job per shard."""
    params: dict[str, Any] = {"name": name, "timeout_min": res.time_min, "nodes": 1, "tasks_per_node": 1,
                              "gpus_per_node": res.gpus_per_job}
    if res.cpus_per_job is not None:
        params["cpus_per_task"] = res.cpus_per_job
        # torch would otherwise start one thread per core of the node, not of the allocation
        params[f"{cluster}_setup"] = [f"export OMP_NUM_THREADS={res.cpus_per_job}"]
    if res.mem_gb is not None:
        params["mem_gb"] = res.mem_gb
    if cluster == "slurm":
        params["slurm_array_parallelism"] = res.jobs
        if res.partition:
            params["slurm_partition"] = res.partition
    return params


def make_executor(cluster: str, folder: Path, res: Resources, name: str):
    """A configured submitit executor (nothing is submitted)."""
    import submitit

    if cluster not in CLUSTERS:
        raise UserError(f"--submit {cluster!r}: use one of {', '.join(CLUSTERS)}")
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    except RuntimeError as e:  # no srun/sbatch on this machine
        raise UserError(f"--submit {cluster}: {e} Run on a SLURM login node, or use --submit local") from None
    executor.update_parameters(**executor_parameters(cluster, res, name))
    return executor


def shard_command(config: Path, results_dir: Path, shard_spec: str, data_dir: str | None = None,
                  scratch_dir: str | None = None, retry_failed: bool = False,
                  overrides: dict[str, str] | None = None, only: dict[str, list] | None = None) -> list[str]:
    """The command one job runs: the grid CLI on its shard, with absolute paths."""
    cmd = [sys.executable, "-m", "lens_iclgd.cli", "grid", str(config.resolve()), "--results", str(results_dir.resolve()),
           "--shard", shard_spec]
    if data_dir is not None:
        cmd += ["--data-dir", str(Path(data_dir).resolve())]
    if scratch_dir is not None:
        cmd += ["--scratch", str(Path(scratch_dir).resolve())]
    if retry_failed:
        cmd.append("--retry-failed")
    for key, value in (overrides or {}).items():
        cmd += [f"--{key}", value]
    for key, values in (only or {}).items():
        cmd += [f"--{key}", ",".join(map(str, values))]
    return cmd


def _call(command) -> str:
    """A job's body (module-level: pickled by reference)."""
    return command()


def submit_grid(config: str | Path, results_dir: str | Path, cluster: str, res: Resources, data_dir: str | None = None,
                scratch_dir: str | None = None, retry_failed: bool = False, overrides: dict[str, str] | None = None,
                only: dict[str, list] | None = None) -> list:
    """Submit one job per shard; with the local executor, wait for them. Returns the jobs.
    `overrides`: grid keys the command line sets (precision, device), passed to every job;
    `only`: the --seeds/--tasks selection (grid.select)."""
    from submitit.helpers import CommandFunction

    from .grid import _check_inputs, cells, load_grid, select

    res.validate()
    grid = load_grid(config)  # a bad config or missing data fails here, not in N jobs
    if data_dir is not None:
        grid.data_dir = data_dir
    for key, value in (overrides or {}).items():
        setattr(grid, key, value)
    _check_inputs([c.validate() for c in select(grid, cells(grid), only)])
    results_dir = check_writable(Path(results_dir))
    executor = make_executor(cluster, results_dir / "submitit" / "%j", res, f"lens-iclgd-{grid.name}")
    commands = [CommandFunction(shard_command(Path(config), results_dir, f"{i}/{res.jobs}", data_dir, scratch_dir, retry_failed,
                                               overrides, only))
                for i in range(res.jobs)]
    jobs = executor.map_array(_call, commands)
    print(f"grid {grid.name}: submitted {len(jobs)} {cluster} job(s) ({', '.join(j.job_id for j in jobs)}); "
          f"logs in {results_dir / 'submitit'}", flush=True)
    if cluster == "local":
        failures = []
        for i, job in enumerate(jobs):
            try:
                last = job.result().strip().splitlines()[-1:]  # the shard's "N/M cells done" line
                print(f"shard {i}/{res.jobs}: {last[0] if last else 'no output'}", flush=True)
            except Exception as e:  # the job's own error is in its log
                failures.append(i)
                print(f"shard {i}/{res.jobs}: FAILED ({str(e).strip().splitlines()[-1:]}); log: {job.paths.stderr}", flush=True)
        if failures:
            raise UserError(f"{len(failures)} of {len(jobs)} shards failed (see their logs); rerun the same command to resume")
    else:
        print(f"when they finish: lens-iclgd report {results_dir}", flush=True)
    return jobs
