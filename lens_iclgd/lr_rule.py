"""Which learning rate each finetuning method uses: the selection rule and the table of
chosen rates.

The default protocol is the paper's: the demonstration's token-mean loss and ONE rate
shared by GD and LCGD (GiilDe/ft-vs-icl runs both at the same rate), the rate chosen for
GD. Each method at its own chosen rate stays available (`--lr own`), as a labelled
variant; under the summed loss (the cells committed before issue 31) it is the default,
so those cells keep their meaning and ids.

The rule (the lr_sweep grid, and `--lr auto` on the fly): per (model, task, method), the
learning rate whose finetuned model has the best accuracy on training examples held out
from the demonstrations (ties: the largest); similarity metrics play no part. GD and LCGD
are chosen separately: LCGD's gradients are several times GD's, so GD's rate over-steps it.

`learning_rates.toml` holds the chosen rates, one table per model and method; the
summed loss's at the top level, the token-mean loss's under `mean` (a step on the mean is
~token-count smaller, so the two scales differ):

    ["gemma-3-270m".gd]                 # summed loss
    sst2 = 1e-05
    ["gemma-3-270m".lcgd]
    sst2 = 3e-06
    [mean."qwen2.5-coder-0.5b".gd]      # token-mean loss
    sst2 = 3e-04

A flat per-model table (`["gemma-3-270m"]` with `sst2 = 1e-05`, the older shape) is GD's
chosen rate, which is also the rate every method shares under `lrs = ["shared"]`. Where
no rate was chosen for the token-mean loss, the paper's own rate for the task applies
(`paper_lr` in the task file: the paper's code used the token-mean loss too).

The words a user may give instead of a number (`--lr`, a grid's `lrs`) live here too:
LR_WORDS, `parse_lr`, and `lr_rule_of` (how a run's rates were set).
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .errors import UserError

AUTO_LRS = (1e-5, 3e-5, 1e-4, 3e-4)  # the grid `--lr auto` tries (the lr_sweep grid's rates)
AUTO_HELDOUT = 32  # held-out training examples scored by `--lr auto` when --n-heldout is 0
# besides a number: the protocol's default (below), each method's own chosen rate, GD's for all, chosen now
LR_WORDS = ("default", "own", "shared", "auto")
SUM, MEAN = "sum", "mean"  # config.LOSS_REDUCTIONS
LEARNING_RATES_FILE = Path(__file__).parent / "learning_rates.toml"


def parse_lr(value: Any) -> float | str | None:
    """A learning-rate setting as a user wrote it (CLI text, grid entry): a positive number,
    or "default" (None: the protocol's default, see lr_rule_of), "own", "shared", "auto".
    ValueError otherwise."""
    if value is None or value == "default":
        return None
    if isinstance(value, str):
        if value in LR_WORDS:
            return value
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"{value!r} is not a number or one of {', '.join(LR_WORDS)}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{value!r} is not a number or one of {', '.join(LR_WORDS)}")
    return float(value)


def lr_rule_of(lr: float | str | None, loss_reduction: str = MEAN) -> str:
    """How a run's rates are set: "shared" (GD's chosen rate for every method), "default"
    (each method's own chosen rate; the word older cells recorded), "auto", "--lr".
    No rate given (None) means the protocol's default: shared under the token-mean loss
    (the paper's protocol), each method's own under the summed loss (the committed cells)."""
    if lr is None:
        return "shared" if loss_reduction == MEAN else "default"
    if lr == "own":
        return "default"
    return lr if isinstance(lr, str) else "--lr"


def rate_table(loss_reduction: str) -> tuple[dict[str, Any], str]:
    """The chosen rates of one loss reduction (parsed learning_rates.toml) and its name."""
    table = tomllib.loads(LEARNING_RATES_FILE.read_text()) if LEARNING_RATES_FILE.exists() else {}
    if loss_reduction == MEAN:
        return table.get(MEAN, {}), f"{LEARNING_RATES_FILE.name} [{MEAN}]"
    return {k: v for k, v in table.items() if k != MEAN}, LEARNING_RATES_FILE.name


def default_lr(model: str, task: Any, method: str = "gd", shared: bool = False,
               loss_reduction: str = SUM) -> tuple[float, str]:
    """The learning rate when none is given, and where it came from: the method's own rate
    chosen by the lr_sweep rule for this loss reduction (learning_rates.toml), else GD's
    chosen rate (always so with `shared`), else the paper's value for its 1.3B model (a
    token-mean-loss rate). `task`: a tasks.Task."""
    table, name = rate_table(loss_reduction)
    own = None if shared else chosen_rate(table, model, task.name, method)
    if own is not None:
        return own[0], f"{name} {own[1]}"
    gd = chosen_rate(table, model, task.name, "gd")
    if gd is not None:
        if method == "gd":
            return gd[0], f"{name} {gd[1]}"
        why = "shared: GD's chosen rate" if shared else f"GD's chosen rate: no {method} rate chosen for {task.name}"
        return gd[0], f"{name} {gd[1]} ({why})"
    if task.paper_lr is not None:
        return task.paper_lr, "paper (1.3B model, token-mean loss)" if loss_reduction == MEAN else "paper (1.3B model)"
    raise UserError(f"task {task.name} has no default learning rate for {model}: pass --lr <rate> or --lr auto")


def rate_origin(source: str | None) -> str:
    """A run's lr_source (as default_lr and --lr auto write it), in a few words."""
    source = source or ""
    if source.startswith("--lr auto on the trained model"):
        return "chosen on the trained model in the cell"
    if source.startswith("--lr auto"):
        return "chosen in the cell"
    if source.startswith("paper"):
        return "the paper's 1.3B rate"
    if "GD's chosen rate" in source:
        return "GD's rate from the table"
    return "own rate from the table" if source.startswith("learning_rates.toml") else source or "unrecorded"


def best_lr(curve: Mapping[float, float | None]) -> float:
    """The rate with the best held-out accuracy; ties go to the largest rate (the strongest
    update that does not hurt). Rates whose training diverged (None) never win."""
    scored = {lr: acc for lr, acc in curve.items() if acc is not None}
    if not scored:
        raise ValueError("no learning rate of the curve finished training")
    best = max(scored.values())
    return max(lr for lr, acc in scored.items() if acc >= best - 1e-9)


def chosen_rate(table: Mapping[str, Any], model: str, task: str, method: str) -> tuple[float, str] | None:
    """The chosen rate of (model, task, method) in a parsed learning_rates.toml and the
    table it came from, or None. The flat per-model table counts as GD's."""
    entry = table.get(model, {})
    own = entry.get(method)
    if isinstance(own, dict) and task in own:
        return float(own[task]), f"[{model}.{method}]"
    if method == "gd" and isinstance(entry.get(task), (int, float)):
        return float(entry[task]), f"[{model}]"
    return None


def format_table(chosen: Iterable[Mapping[str, Any]], header: str) -> str:
    """learning_rates.toml text from rows with model, method, task, lr, heldout_acc and
    optionally loss ("mean" rows go under the `mean` table)."""
    lines = [f"# {line}" if line else "" for line in header.splitlines()]
    groups: dict[tuple[str, str, str], list[Mapping[str, Any]]] = {}
    for row in chosen:
        groups.setdefault((row.get("loss", SUM), row["model"], row["method"]), []).append(row)
    for (loss, model, method), rows in sorted(groups.items(), key=lambda g: (g[0][0] == MEAN, g[0])):
        lines += ["", f'[{MEAN + "." if loss == MEAN else ""}"{model}".{method}]']
        lines += [f"{r['task']} = {r['lr']:g}  # held-out accuracy {r['heldout_acc']:.3f}" for r in sorted(rows, key=lambda r: r["task"])]
    return "\n".join(lines) + "\n"
