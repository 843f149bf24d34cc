"""The `lens-iclgd` command line.

    lens-iclgd run     one cell: ZS, ICL, GD, LCGD on one task/model/baseline/seed
    lens-iclgd grid    every cell of an experiment config (resumable, shardable)
    lens-iclgd report  tables, figures and findings from a results directory
    lens-iclgd views   per-head SimAM heatmaps and per-layer SimAOU bars of a run
    lens-iclgd bench   optimised vs naive pipeline on one cell, with FLOP/s and memory

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
        sys.stderr.write(f"lens-iclgd: error: {message} (see lens-iclgd {self.prog.split()[-1]} --help)\n")
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


def _methods(text: str) -> tuple[str, ...]:
    return tuple(m.strip().lower() for m in text.split(",") if m.strip())


def _add_run_args(p: argparse.ArgumentParser) -> None:
    from .models import DEFAULT_MODEL
    from .record import DEFAULT_POSITION, POSITIONS
    from .tasks import DEFAULT_TASK

    p.add_argument("--task", default=DEFAULT_TASK, help=f"built-in task name or path to a task .toml (default {DEFAULT_TASK}, offline)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="gemma-3-270m | smollm2-135m | TransformerLens name | local HF dir")
    p.add_argument("--baseline", default="trained", help="trained | untrained | embeddings")
    p.add_argument("--methods", type=_methods, default=("icl", "gd", "lcgd"), help="comma list of icl, gd, lcgd (ZS always runs)")
    p.add_argument("--k", type=_int, default=32, help="demonstrations (paper: 32; fewer if the context is too short)")
    p.add_argument("--seed", type=_int, default=0, help="picks and orders the demonstrations; seeds re-initialisation")
    p.add_argument("--n-test", type=_int, default=2000, help="test examples (the paper caps at 2000)")
    p.add_argument("--lr", type=_float, default=None, help="SGD learning rate (default: per model and task)")
    p.add_argument("--data-dir", default=None, help="directory with <task>/<split>.jsonl (hub schema), e.g. ../shared/data")
    p.add_argument("--position", default=DEFAULT_POSITION, choices=POSITIONS, help="recorded position (default: answer, as the original code)")
    p.add_argument("--ablate", default="", help="components to ablate in every setting, e.g. 3.5,7.*,attn4,mlp2")
    p.add_argument("--ablate-mode", default="zero", choices=("zero", "mean"))
    p.add_argument("--n-heldout", type=_int, default=0, help="held-out train examples scored after finetuning")
    p.add_argument("--batch-size", type=_int, default=16)


def _config_from_args(args) -> "RunConfig":
    from .runner import RunConfig

    return RunConfig(
        task=args.task, model=args.model, baseline=args.baseline, methods=args.methods, k=args.k,
        seed=args.seed, n_test=args.n_test, lr=args.lr, data_dir=args.data_dir, position=args.position,
        ablate=args.ablate, ablate_mode=args.ablate_mode, n_heldout=args.n_heldout, batch_size=args.batch_size,
    )


def _default_out(cfg) -> Path:
    name = f"{Path(cfg.task).stem}_{Path(cfg.model).name}_{cfg.baseline}_k{cfg.k}_seed{cfg.seed}"
    return Path("runs") / re.sub(r"[^A-Za-z0-9_.-]", "-", name)


def cmd_run(args) -> None:
    from .runner import run, summary_table

    cfg = _config_from_args(args).validate()
    out = Path(args.out) if args.out else _default_out(cfg)
    results = run(cfg, out)
    print(summary_table(results))
    print(f"results: {out / 'results.json'}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lens-iclgd", description="ICL vs GD vs layer-causal GD inside HookedTransformers (Deutch et al. 2023).")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("run", help="run one cell (ZS, ICL, GD, LCGD) and write results.json")
    _add_run_args(p)
    p.add_argument("--out", default=None, help="output directory (default runs/<task>_<model>_...)")
    p.set_defaults(func=cmd_run)
    return parser


def quiet_third_party() -> None:
    """TransformerLens 3.x warns on every load that it prefers TransformerBridge, and the
    GGUF conversion draws progress bars; neither helps a user of this tool."""
    import os
    import warnings

    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' bars follow this
    for category in (DeprecationWarning, FutureWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category)
    for noisy in ("transformers", "datasets", "huggingface_hub", "transformer_lens", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    quiet_third_party()  # before anything imports transformers
    parser = build_parser()
    args = parser.parse_args(argv)
    # Progress goes to stdout; stderr is kept for the one-line error (and real warnings).
    logging.basicConfig(level=logging.INFO, format="[lens-iclgd] %(message)s", stream=sys.stdout, force=True)
    try:
        args.func(args)
    except UserError as e:
        if args.debug:
            raise
        sys.stderr.write(f"lens-iclgd: error: {e}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("lens-iclgd: interrupted; finished stages are saved, rerun the same command to resume\n")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
