"""Which learning rate each finetuning method uses: the selection rule and the table of
chosen rates.

The rule (the lr_sweep grid, and `--lr auto` on the fly): per (model, task, method), the
learning rate whose finetuned model has the best accuracy on training examples held out
from the demonstrations (ties: the largest); similarity metrics play no part. GD and LCGD
are chosen separately: LCGD's gradients are several times GD's, so GD's rate over-steps it.

`learning_rates.toml` holds the chosen rates, one table per model and method:

    ["gemma-3-270m".gd]
    sst2 = 1e-05
    ["gemma-3-270m".lcgd]
    sst2 = 3e-06

A flat per-model table (`["gemma-3-270m"]` with `sst2 = 1e-05`, the older shape) is GD's
chosen rate, which is also the rate every method shares under `lrs = ["shared"]`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

AUTO_LRS = (1e-5, 3e-5, 1e-4, 3e-4)  # the grid `--lr auto` tries (the lr_sweep grid's rates)
AUTO_HELDOUT = 32  # held-out training examples scored by `--lr auto` when --n-heldout is 0
LR_WORDS = ("default", "shared", "auto")  # besides a number: own chosen rates, GD's for all, chosen now


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
    """learning_rates.toml text from rows with model, method, task, lr, heldout_acc."""
    lines = [f"# {line}" if line else "" for line in header.splitlines()]
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for row in chosen:
        groups.setdefault((row["model"], row["method"]), []).append(row)
    for (model, method), rows in sorted(groups.items()):
        lines += ["", f'["{model}".{method}]']
        lines += [f"{r['task']} = {r['lr']:g}  # held-out accuracy {r['heldout_acc']:.3f}" for r in sorted(rows, key=lambda r: r["task"])]
    return "\n".join(lines) + "\n"
