"""The `lens-iclgd` command line.

    lens-iclgd run     one cell: ZS, ICL, GD, LCGD on one task/model/baseline/seed
    lens-iclgd patch   one cell's causal study: activation patching, head patching, task vectors
    lens-iclgd grid    every cell of an experiment config (resumable, shardable; --submit slurm|local)
    lens-iclgd report  tables, figures and findings from a results directory (per model and across models)
    lens-iclgd views   per-head SimAM heatmaps and per-layer SimAOU bars of a run
    lens-iclgd bench   optimised vs naive pipeline on one cell, with FLOP/s and memory
    lens-iclgd models  the model zoo: shape, source, licence, cache state, measured ICL gain

Errors a user can fix print as one line on stderr (exit code 2 for usage, 1 otherwise);
`--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

from .errors import UserError

log = logging.getLogger("lens_iclgd")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        sys.stderr.write(f"lens-iclgd: error: {message} (see {self.prog} --help)\n")
        sys.exit(2)


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def _default_out(cfg) -> Path:
    name = f"{Path(cfg.task).stem}_{Path(cfg.model).name}_{cfg.baseline}_k{cfg.k}_seed{cfg.seed}"
    return Path("runs") / re.sub(r"[^A-Za-z0-9_.-]", "-", name)


def cmd_run(args) -> None:
    from .config import from_args
    from .orders import run_orders
    from .runner import run
    from .summary import orders_table, summary_table

    cfg = from_args(args).validate()
    out = Path(args.out) if args.out else _default_out(cfg)
    if cfg.patching:
        from .causal import run_patching
        from .summary import patching_table

        print(patching_table(run_patching(cfg, out)))
        print(f"results: {out / 'patching.json'}")
        return
    if cfg.orders > 1:
        print(orders_table(run_orders(cfg, out)))
        print(f"results: {out / 'orders.json'}")
        return
    results = run(cfg, out)
    print(summary_table(results, args.summary))
    print(f"results: {out / 'results.json'}")


def cmd_views(args) -> None:
    from .views import write_views

    for path in write_views(args.run_dir, args.out):
        print(f"wrote {path}")


def cmd_grid(args) -> None:
    from .grid import load_grid, run_grid

    results = args.results or Path("runs") / Path(args.config).stem
    if args.submit:
        from .launch import Resources, submit_grid

        if args.shard:
            raise UserError("--shard and --submit exclude each other: --submit runs every shard (--jobs N)")
        if args.dry_run:
            raise UserError("--dry-run lists the cells to run on this machine: drop --submit to see them")
        res = Resources(args.jobs, args.partition, args.time, args.gpus_per_job, args.cpus_per_job, args.mem_gb)
        overrides = {key: getattr(args, key) for key in ("precision", "device") if getattr(args, key) is not None}
        submit_grid(args.config, results, args.submit, res, args.data_dir, args.scratch, args.retry_failed, overrides,
                    _only(args))
        return
    grid = load_grid(args.config)
    if args.data_dir is not None:
        grid.data_dir = args.data_dir
    for key in ("precision", "device"):  # the command line overrides the config's keys
        if getattr(args, key) is not None:
            setattr(grid, key, getattr(args, key))
    run_grid(grid, results, args.shard, args.retry_failed, args.scratch, _only(args), args.dry_run)


def _only(args) -> dict[str, list]:
    """--seeds 0,1 / --tasks sst2,mr / --models a,b as grid.select() takes them."""
    only: dict[str, list] = {}
    for key, kind in (("seeds", int), ("tasks", str), ("models", str)):
        text = getattr(args, key)
        if text is None:
            continue
        try:
            only[key] = [kind(v.strip()) for v in text.split(",") if v.strip()]
        except ValueError:
            raise UserError(f"--{key} {text!r}: use a comma-separated list, e.g. --{key} "
                            + ("0,1" if kind is int else "sst2,mr")) from None
        if not only[key]:
            raise UserError(f"--{key} is empty: name at least one")
    return only


def cmd_report(args) -> None:
    from .crossmodel import write_reports
    from .icl_gain import read_make_run_times, write_icl_gain
    from .report import collect, read_manifest

    times_file = args.make_run_times
    if times_file is None and args.icl_gain_out and (Path(args.icl_gain_out) / "make_run_times.toml").is_file():
        times_file = Path(args.icl_gain_out) / "make_run_times.toml"
    times = read_make_run_times(times_file)
    manifest = read_manifest(args.manifest) if args.manifest else None
    command = args.command_line or (manifest["report"]["command"] if manifest else None)
    out = write_reports(args.results_dir, args.out, command=args.command_line, times=times, manifest=manifest)
    print(f"report: {out / 'report.md'}")
    if args.icl_gain_out:
        write_icl_gain(collect(args.results_dir).cells, args.icl_gain_out, command, times)
        print(f"ICL gain: {Path(args.icl_gain_out) / 'icl_gain.md'}")


def cmd_models(args) -> None:
    from .zoo import catalogue

    print(catalogue(args.files, Path(args.gain_table)))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lens-iclgd", description="ICL vs GD vs layer-causal GD inside HookedTransformers (Deutch et al. 2023).")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--quiet", action="store_true", help="no progress bars (they are drawn only on a terminal anyway)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    from . import config

    p = sub.add_parser("run", help="run one cell (ZS, ICL, GD, LCGD) and write results.json")
    config.add_arguments(p)  # one flag per RunConfig field
    p.add_argument("--out", default=None, help="output directory (default runs/<task>_<model>_...)")
    p.add_argument("--summary", default="all", choices=("all", "f2t"),
                   help="the printed metrics over all test examples, or over Dai et al.'s F2T subset (results.json has both)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("patch", help="one cell's causal study (run --patching): layer and head patching, task vectors")
    config.add_arguments(p)
    p.set_defaults(patching=True)
    p.add_argument("--out", default=None, help="output directory (default runs/<task>_<model>_...)")
    p.set_defaults(func=cmd_run, summary="all")

    p = sub.add_parser("views", help="per-head SimAM heatmaps and per-layer SimAOU bars of a finished run")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="directory for the PNGs (default RUN_DIR/views)")
    p.set_defaults(func=cmd_views)

    p = sub.add_parser("grid", help="run every cell of an experiment config (resumable, shardable)")
    p.add_argument("config", help="experiment config, e.g. experiments/table2.toml")
    p.add_argument("--results", default=None, help="results directory (default runs/<config name>)")
    p.add_argument("--shard", default=None, help="I/N: run the I-th of N disjoint slices (0-based)")
    p.add_argument("--retry-failed", action="store_true", help="rerun cells whose training diverged")
    p.add_argument("--seeds", default=None, help="only these seeds of the grid, e.g. 0 (seed 0 everywhere first)")
    p.add_argument("--tasks", default=None, help="only these tasks of the grid, e.g. sst2,mr")
    p.add_argument("--models", default=None, help="only these models of the grid, e.g. smollm2-135m")
    p.add_argument("--dry-run", action="store_true", help="list the cells still to run; compute nothing")
    config.add_arguments(p, ("data_dir", "precision", "device"), unset=True)  # these override the config's keys

    p.add_argument("--scratch", default=None, metavar="DIR",
                   help="put the heavy recordings in DIR/stages instead of RESULTS/stages")
    p.add_argument("--submit", default=None, choices=("slurm", "local"),
                   help="run the shards as submitit jobs (SLURM array, or processes here); logs in RESULTS/submitit")
    p.add_argument("--jobs", type=_int, default=1, help="with --submit: number of shards/jobs")
    p.add_argument("--partition", default=None, help="with --submit slurm: the SLURM partition")
    p.add_argument("--time", type=_int, default=240, help="with --submit: time limit per job in minutes")
    p.add_argument("--gpus-per-job", type=_int, default=0)
    p.add_argument("--cpus-per-job", type=_int, default=None, help="also sets OMP_NUM_THREADS in the job")
    p.add_argument("--mem-gb", type=_float, default=None)
    p.set_defaults(func=cmd_grid)

    p = sub.add_parser("report", help="tables, figures and findings from a results directory")
    p.add_argument("results_dir")
    p.add_argument("--out", default=None, help="report directory (default RESULTS_DIR/report)")
    p.add_argument("--manifest", default=None, metavar="TOML",
                   help="how the results were made (e.g. artifacts/manifest.toml): one command per line, opening the report")
    p.add_argument("--command-line", default=None, help="the command that produced the results, quoted in the report "
                   "(when there is no manifest)")
    p.add_argument("--icl-gain-out", default=None, metavar="DIR", help="also write icl_gain.md/.csv (the premise table) to DIR")
    p.add_argument("--make-run-times", default=None, metavar="TOML",
                   help="`make run` seconds per model for the default-model rule (default: ICL_GAIN_OUT/make_run_times.toml if present)")
    p.set_defaults(func=cmd_report)

    from .zoo import GAIN_TABLE

    p = sub.add_parser("models", help="the model zoo: shape, source, licence, cache state, measured ICL gain")
    p.add_argument("files", nargs="*", help="extra model .toml files to list (a researcher's own models)")
    p.add_argument("--gain-table", default=str(GAIN_TABLE), help="icl_gain.csv to read the ICL gain from")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("bench", help="optimised vs naive pipeline on one cell: times, FLOP/s, memory, speedup")
    _add_bench_args(p)
    p.set_defaults(func=cmd_bench)
    return parser


# The benchmark cell (docs/performance.md), whatever the default model: these RunConfig
# fields are bench's options, with these defaults; the rest of the cell is RunConfig's.
BENCH_SETTINGS = ("task", "data_dir", "model", "k", "n_test", "seed", "lr", "batch_size", "precision", "device")
BENCH_DEFAULTS = {"task": "sst2", "model": "gemma-3-270m", "k": 16, "n_test": 100}


def _add_bench_args(p: argparse.ArgumentParser) -> None:
    from . import config

    config.add_arguments(p, BENCH_SETTINGS)
    p.set_defaults(**BENCH_DEFAULTS)
    p.add_argument("--profile", action="store_true", help="also profile each optimised phase (top operators)")
    p.add_argument("--precision-study", action="store_true",
                   help="also run every candidate bfloat16 precision policy (precision.CANDIDATES) against float32")
    p.add_argument("--no-naive", action="store_true", help="skip the naive pipeline (for development; no speedup)")
    p.add_argument("--peak-seconds", type=_float, default=3.0,
                   help="seconds of each matmul-peak measurement (default 3; tests use less)")


def cmd_bench(args) -> None:
    from .bench import run_bench

    run_bench(args)


def quiet_third_party() -> None:
    """TransformerLens 3.x warns on every load that it prefers TransformerBridge, and the
    GGUF conversion draws progress bars; neither helps a user of this tool."""
    import os
    import warnings

    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' bars follow this
    if "transformers" in sys.modules:  # imported already (main() called from Python): it read the variable then
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    for category in (DeprecationWarning, FutureWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category)
    for noisy in ("transformers", "datasets", "huggingface_hub", "transformer_lens", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _tune_for_device(args) -> None:
    """glibc malloc tuning is a CPU speedup: only when the command computes on the CPU
    (report, views and models never load torch)."""
    if args.command not in ("run", "patch", "grid", "bench"):
        return
    from .device import resolve_device
    from .fast import tune_malloc

    device = getattr(args, "device", None) or "auto"
    if resolve_device(device).type == "cpu":
        tune_malloc()


def main(argv: list[str] | None = None) -> int:
    quiet_third_party()  # before anything imports transformers
    from .progress import set_quiet

    parser = build_parser()
    args = parser.parse_args(argv)
    set_quiet(args.quiet)
    # Log lines go to stdout; stderr is kept for the one-line error, real warnings and
    # progress bars (on a terminal only).
    logging.basicConfig(level=logging.INFO, format="[lens-iclgd] %(message)s", stream=sys.stdout, force=True)
    try:
        _tune_for_device(args)
        args.func(args)
    except UserError as e:
        if args.debug:
            raise
        sys.stderr.write(f"lens-iclgd: error: {e}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("lens-iclgd: interrupted; finished stages are saved, rerun the same command to resume\n")
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: not an error
        sys.stderr.close()
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
