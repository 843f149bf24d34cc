"""A run's inputs, prepared once and shared by its settings: the task rows, the prompts
(tokens), the model and baseline, the ablation hooks and each method's learning rate.
Every input error surfaces here, before any recording or training."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

from .ablation import ablation_hooks, parse_ablation
from .config import RunConfig
from .lr_rule import default_lr, lr_rule_of
from .models import LoadedModel, load_model
from .prompts import PromptSet, build_prompts, permute_demos
from .tasks import Task, load_split, load_task

log = logging.getLogger("lens_iclgd")


@dataclass
class Inputs:
    """A run's data, prompts and model, prepared once and shared by its settings."""

    config: RunConfig
    task: Task
    loaded: LoadedModel
    prompts: PromptSet
    eval_rows: list[dict]
    hooks: list = field(default_factory=list)
    ablation: list[dict] = field(default_factory=list)
    lr_source: str = "--lr"
    lr_rule: str = "--lr"  # see lr_rule_of
    lr_by_method: dict[str, float] = field(default_factory=dict)
    lr_sources: dict[str, str] = field(default_factory=dict)
    lr_auto: dict[str, Any] | None = None  # --lr auto: {method: {"chosen", "curve"}}


def resolve_lrs(inp: Inputs, lrs: dict[str, tuple[float, str]]) -> None:
    """Set each finetuning method's rate and source; config.lr keeps one number for old
    readers: GD's rate when GD runs, else the first method's."""
    inp.lr_by_method = {m: lr for m, (lr, _) in lrs.items()}
    inp.lr_sources = {m: src for m, (_, src) in lrs.items()}
    if lrs:
        first = "gd" if "gd" in lrs else next(iter(lrs))
        inp.config = dataclasses.replace(inp.config, lr=inp.lr_by_method[first])
        sources = set(inp.lr_sources.values())
        inp.lr_source = sources.pop() if len(sources) == 1 else "; ".join(f"{m}: {s}" for m, s in inp.lr_sources.items())


def prepare(config: RunConfig, loaded: LoadedModel | None = None) -> Inputs:
    """Load task data and model, build the prompts and ablation hooks; every input error
    surfaces here, before any recording or training."""
    task = load_task(config.task)
    rule = lr_rule_of(config.lr, config.loss_reduction)
    if rule in ("default", "shared"):
        lrs = {m: default_lr(config.model, task, m, shared=rule == "shared", loss_reduction=config.loss_reduction)
               for m in config.ft_methods}
    else:  # "auto" is resolved by auto_learning_rates once the prompts exist
        lrs = {m: (config.lr, "--lr") for m in config.ft_methods} if rule == "--lr" else {}
    train_rows = load_split(task, task.train_split, config.data_dir)
    eval_rows = load_split(task, task.eval_split, config.data_dir)
    if loaded is None:
        log.info("loading %s (%s baseline)", config.model, config.baseline)
        loaded = load_model(config.model, config.baseline, config.seed, device=config.device)
    prompts = build_prompts(loaded.model, task, train_rows, eval_rows, config.k, config.seed, config.n_test, config.n_heldout,
                            balanced=config.balanced)
    if config.order:
        permute_demos(prompts, config.seed, config.order)
    if prompts.k < config.k:
        log.info("k=%d demonstrations do not fit the %d-token context; using the first %d", config.k, prompts.n_ctx, prompts.k)
    specs = parse_ablation(config.ablate, config.ablate_mode)
    hooks = ablation_hooks(loaded.model, specs, prompts) if specs else []
    inp = Inputs(config, task, loaded, prompts, eval_rows, hooks, [s.describe() for s in specs], lr_rule=rule)
    resolve_lrs(inp, lrs)
    return inp
