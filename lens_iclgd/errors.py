"""Errors a user can fix. The CLI prints them as one line and exits non-zero."""

import math


class UserError(Exception):
    """Bad input or environment: the message says what is wrong and what to do."""


class TrainingDiverged(UserError):
    """The GD/LCGD loss stopped being finite; the cell is abandoned, others go on."""

    def __init__(self, method: str, step: int, layer: int | None, value: float, lr: float):
        where = f"step {step}" + (f", layer {layer}" if layer is not None else "")
        super().__init__(
            f"{method} loss became {value} at {where} (lr={lr:g}): lower the learning rate with --lr"
        )
        self.method, self.step, self.layer, self.value = method, step, layer, value


def check_int(name: str, value: object, minimum: int) -> None:
    """One place for "an integer >= minimum" (bools are not integers here)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise UserError(f"{name} must be an integer >= {minimum}, got {value}")


def check_lr(lr: object) -> None:
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise UserError(f"lr must be a finite number > 0, got {lr!r}")
