"""RunConfig: every setting of one run, declared once.

Each field carries its help text and kind in its metadata; from them come the flags of
`lens-iclgd run` (and, for the compute settings, of `bench`), the scalar keys of a grid
config (grid.py) and the checks of `validate()`. A new setting is one field here: the CLI,
grids and the API pick it up (tests/test_config.py walks the fields).

Kinds: "str", "int", "bool" (a flag), "lr" (a number or a word of lr_rule.LR_WORDS),
"methods" (a comma list). A field with `cli=False` is set by a driver, not by a user
(`order`: run_orders sets it).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError, check_int, check_lr
from .lr_rule import AUTO_HELDOUT, parse_lr
from .tasks import DEFAULT_TASK
from .zoo import DEFAULT_MODEL  # noqa: F401 (also the CLI's and grids' default)

# The vocabularies of the settings, declared here and imported by the modules that act on
# them, so this module (and the CLI built from it) loads without torch.
FT_METHODS = ("gd", "lcgd")  # finetune.py
SETTINGS = ("icl",) + FT_METHODS  # what a run can compute besides ZS (always recorded)
BASELINES = ("trained", "untrained", "embeddings")  # models.py
POSITIONS = ("answer", "prompt")  # recording.py
DEFAULT_POSITION = "answer"
STEP_UNITS = ("demo", "token")  # finetune.py
LOSS_REDUCTIONS = ("sum", "mean")
# the paper's code: each step on the demonstration's token-mean loss (GiilDe/ft-vs-icl,
# fs_ft.py + fairseq's 1/sample_size); "sum" is the protocol of the cells committed before
# issue 31, which say so in their configs
DEFAULT_LOSS_REDUCTION = "mean"
PRECISIONS = ("float32", "mixed", "train-vocab-bf16", "train-bf16", "train-icl-bf16", "bfloat16")  # precision.PRESETS
DEFAULT_PRECISION = "float32"  # why: precision.py
DEFAULT_DEVICE = "auto"  # device.py
ABLATE_MODES = ("zero", "mean")  # ablation.py
DEFAULT_TOP_K = 10  # outputs.py


def setting(default: Any, help: str, kind: str = "str", choices: tuple | None = None, cli: bool = True) -> Any:
    return field(default=default, metadata={"help": help, "kind": kind, "choices": choices, "cli": cli})


@dataclass
class RunConfig:
    """Every setting of one run. Defaults are the paper's choices where it made one."""

    task: str = setting(DEFAULT_TASK, f"built-in task name or path to a task .toml (default {DEFAULT_TASK}, offline)")
    model: str = setting(DEFAULT_MODEL, "zoo model (see lens-iclgd models) | model .toml | TransformerLens name | local HF dir")
    baseline: str = setting("trained", " | ".join(BASELINES) + " (untrained: all weights re-initialised; embeddings: "
                            "embeddings kept, the rest re-initialised)")
    methods: tuple[str, ...] = setting(("icl", "gd", "lcgd"), "comma list of icl, gd, lcgd (ZS always runs)", "methods")
    k: int = setting(32, "demonstrations (paper: 32; fewer if the context is too short)", "int")
    seed: int = setting(0, "picks and orders the demonstrations; seeds re-initialisation", "int")
    n_test: int = setting(2000, "test examples (the paper caps the eval split at 2000)", "int")
    lr: float | str | None = setting(
        None, "SGD learning rate; or shared (GD's chosen rate for every method, learning_rates.toml); or own (each "
              "method's own chosen rate); or auto (chosen now on held-out training examples, per method; a "
              "re-initialised baseline takes the trained model's choice) (default: the paper's protocol, one rate "
              "shared by GD and LCGD; with --loss-reduction sum, each method's own, as the committed summed-loss "
              "cells)", "lr")
    data_dir: str | None = setting(None, "directory with <task>/<split>.jsonl (hub schema), e.g. ../shared/data")
    position: str = setting(DEFAULT_POSITION, "recorded position (default: answer, as the original code)", choices=POSITIONS)
    ablate: str = setting("", "components to ablate in every setting, e.g. 3.5,7.*,attn4,mlp2 (ablation.py)")
    ablate_mode: str = setting("zero", "how an ablated component is removed", choices=ABLATE_MODES)
    n_heldout: int = setting(0, "training examples after the demonstrations, scored after finetuning", "int")
    order: int = setting(0, "0: the seed's demonstration order; p > 0: the p-th permutation of the same set", "int", cli=False)
    batch_size: int = setting(16, "test examples per forward pass", "int")
    precision: str = setting(DEFAULT_PRECISION, f"numeric precision per phase (default {DEFAULT_PRECISION}; mixed and "
                             "bfloat16 compute in bfloat16 from float32 weights; see bench --precision-study)", choices=PRECISIONS)
    device: str = setting(DEFAULT_DEVICE, "auto (cuda, else mps, else cpu) | cpu | cuda[:i] | mps; where, never what: "
                          "not in cell ids or stage keys")
    step_unit: str = setting("demo", "one SGD step per demonstration (default, the paper's code) or per next-token target",
                             choices=STEP_UNITS)
    balanced: bool = setting(False, "demonstrations with an equal count per label (default: a plain random sample)", "bool")
    loss_reduction: str = setting(DEFAULT_LOSS_REDUCTION, "each SGD step on the mean of the demonstration's token "
                                  "losses (default, the paper's code) or their sum (the cells committed before issue "
                                  "31); rates differ by about the token count", choices=LOSS_REDUCTIONS)
    top_k: int = setting(DEFAULT_TOP_K, "K of the output metrics' top-K token overlap (outputs.py)", "int")
    orders: int = setting(1, "order sensitivity (orders.py): P >= 2 runs the same demonstrations in P orders and "
                          "reports the spread, the prediction stability and each metric's ceiling (default 1: one order)", "int")
    patching: bool = setting(False, "the causal study instead of the similarity cell (causal.py): ICL's, GD's and "
                             "LCGD's activations patched into ZS layer by layer, head patching on shuffled-label "
                             "prompts, task vectors; writes patching.json (also: lens-iclgd patch)", "bool")
    patch_heads: int = setting(50, "with --patching: test examples for head patching (n_layers x n_heads patched "
                               "runs each; 0 skips it)", "int")

    def validate(self) -> "RunConfig":
        """Check types and ranges before any compute; return a normalised copy."""
        from .ablation import parse_ablation
        from .device import resolve_device
        from .finetune import check_loss_reduction, check_step_unit
        from .models import check_baseline, check_model_name
        from .precision import check_precision
        from .recording import check_position

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise UserError(msg)

        check_int("seed", self.seed, -(2**63))
        for f in fields():
            if f.metadata["kind"] == "int" and f.name != "seed":
                check_int(f.name, getattr(self, f.name), 1 if f.name in ("k", "n_test", "batch_size", "top_k", "orders") else 0)
        need(isinstance(self.patching, bool), f"patching must be true or false, got {self.patching!r}")
        need(not (self.patching and self.orders > 1), "--patching and --orders exclude each other: run them as two cells")
        try:
            lr = parse_lr(self.lr)  # the words of lr_rule.LR_WORDS, or a number
        except ValueError:
            raise UserError(f"lr must be a number > 0, \"shared\", \"own\" or \"auto\", got {self.lr!r}") from None
        if isinstance(lr, float):
            check_lr(lr)
        check_step_unit(self.step_unit)
        check_loss_reduction(self.loss_reduction)
        need(isinstance(self.balanced, bool), f"balanced must be true or false, got {self.balanced!r}")
        methods = tuple(self.methods)
        need(len(methods) > 0, "methods is empty: give some of icl, gd, lcgd")
        for m in methods:
            need(m in SETTINGS, f"unknown method {m!r}: use some of {', '.join(SETTINGS)}")
        check_baseline(self.baseline)
        check_position(self.position)
        check_model_name(self.model)
        check_precision(self.precision)
        resolve_device(self.device)  # a device that is not there fails here, before any compute
        parse_ablation(self.ablate, self.ablate_mode)  # syntax only; layer ranges checked with the model
        if self.data_dir is not None and not Path(self.data_dir).is_dir():
            raise UserError(f"data directory {self.data_dir} does not exist: pass --data-dir with <task>/<split>.jsonl files")
        # ICL is always recorded when a finetuning method is: every metric compares to it.
        ordered = tuple(m for m in SETTINGS if m in methods or (m == "icl" and set(methods) & set(FT_METHODS)))
        # --lr auto scores held-out training examples; 32 unless the user chose a number
        n_heldout = AUTO_HELDOUT if lr == "auto" and not self.n_heldout and set(ordered) & set(FT_METHODS) else self.n_heldout
        return dataclasses.replace(self, methods=ordered, lr=lr, n_heldout=n_heldout)

    @property
    def ft_methods(self) -> tuple[str, ...]:
        return tuple(m for m in self.methods if m in FT_METHODS)


def fields() -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(RunConfig)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# --- the command line: one flag per field ----------------------------------------------------


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _lr(text: str) -> float | str | None:
    try:
        return parse_lr(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _methods(text: str) -> tuple[str, ...]:
    return tuple(m.strip().lower() for m in text.split(",") if m.strip())


_PARSERS = {"int": _int, "lr": _lr, "methods": _methods, "str": str}


def add_arguments(parser: argparse.ArgumentParser, names: tuple[str, ...] | None = None, unset: bool = False) -> None:
    """A flag for every user-set field (or those in `names`); `unset`: default None, so a
    grid config's own keys apply where the flag is not given."""
    for f in fields():
        if not f.metadata["cli"] or (names is not None and f.name not in names):
            continue
        default = None if unset else f.default
        kind, help_ = f.metadata["kind"], f.metadata["help"]
        if kind == "bool":
            parser.add_argument(flag(f.name), action="store_true", default=default, help=help_)
        else:
            parser.add_argument(flag(f.name), type=_PARSERS[kind], default=default, choices=f.metadata["choices"], help=help_)


def from_args(args: argparse.Namespace) -> RunConfig:
    """The RunConfig of parsed `add_arguments` flags (fields without a flag: defaults)."""
    return RunConfig(**{f.name: getattr(args, f.name) for f in fields() if hasattr(args, f.name)})
