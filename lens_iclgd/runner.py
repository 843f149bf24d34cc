"""One experiment cell: ZS, ICL, GD and LCGD on the same test examples, and every metric.

    config -> task rows -> prompts (tokens) -> model + baseline
           -> record ZS, record ICL (prefix KV cache)
           -> for each finetuning method: train K/V on the demos, record ZS on the
              finetuned model, restore the weights
           -> metrics -> results.json, examples.csv, per_layer.parquet

Each recording is saved as a stage file under `<out>/stages` as soon as it is computed,
keyed by a hash of everything it depends on (model and checksum, baseline, tokens fed,
position, ablation, method, learning rate, ...). A rerun after an interruption picks up
the finished stages; a rerun with different settings computes new ones.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import platform
import random
import resource
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from . import metrics as M
from .ablation import ablation_hooks, parse_ablation
from .device import DEFAULT_DEVICE, model_device, resolve_device
from .hardware import describe_cpu
from .errors import TrainingDiverged, UserError, check_int, check_lr
from .finetune import METHODS as FT_METHODS
from .finetune import DEFAULT_LOSS_REDUCTION, FinetuneLog, check_loss_reduction, check_method, check_step_unit, finetuned
from .lr_rule import AUTO_HELDOUT, AUTO_LRS, best_lr, chosen_rate
from .outputs import DEFAULT_TOP_K, PAIR_METRICS, output_metrics
from .models import DEFAULT_MODEL, LoadedModel, check_baseline, check_model_name, load_model
from .precision import DEFAULT_PRECISION, FLOAT32, check_precision, policy, require_fast_bf16, within_fidelity
from .prompts import PromptSet, build_prompts
from .recording import DEFAULT_POSITION, Recording, check_position, record
from .store import (StageStore, atomic_write_bytes, atomic_write_json, check_writable, config_key,
                    remove_stale_temp_files, removed_if_empty_on_error)
from .tasks import DEFAULT_TASK, Task, load_split, load_task

log = logging.getLogger("lens_iclgd")

SETTINGS = ("icl",) + FT_METHODS
LEARNING_RATES_FILE = Path(__file__).parent / "learning_rates.toml"


@dataclass
class RunConfig:
    """Every setting of one run. Defaults are the paper's choices where it made one."""

    task: str = DEFAULT_TASK
    model: str = DEFAULT_MODEL
    baseline: str = "trained"
    methods: tuple[str, ...] = ("icl", "gd", "lcgd")
    k: int = 32
    seed: int = 0
    n_test: int = 2000  # the paper caps the eval split at 2,000
    # None: each method's chosen rate (learning_rates.toml); "shared": GD's chosen rate for
    # every method; "auto": chosen now on held-out training examples (lr_rule.py)
    lr: float | str | None = None
    data_dir: str | None = None
    position: str = DEFAULT_POSITION
    ablate: str = ""  # e.g. "3.5,7.*,attn4,mlp2" (see ablation.py)
    ablate_mode: str = "zero"
    n_heldout: int = 0  # train examples after the demos, scored after finetuning
    order: int = 0  # 0: the seed's demonstration order; p > 0: the p-th permutation of the same set
    batch_size: int = 16
    precision: str = DEFAULT_PRECISION  # float32 | mixed | bfloat16 | a candidate (precision.py)
    device: str = DEFAULT_DEVICE  # auto | cpu | cuda[:i] | mps; where, never what: not in ids or keys
    step_unit: str = "demo"  # one SGD step per demonstration (the paper's code) or per token
    balanced: bool = False  # demonstrations with an equal count per label (else a plain random sample)
    loss_reduction: str = DEFAULT_LOSS_REDUCTION  # each SGD step on the summed or token-mean loss (finetune.py)
    top_k: int = DEFAULT_TOP_K  # K of the output metrics' top-K token overlap (outputs.py)

    def validate(self) -> "RunConfig":
        """Check types and ranges before any compute; return a normalised copy."""
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise UserError(msg)

        check_int("seed", self.seed, -(2**63))
        for name, minimum in (("k", 1), ("n_test", 1), ("n_heldout", 0), ("order", 0), ("batch_size", 1), ("top_k", 1)):
            check_int(name, getattr(self, name), minimum)
        if isinstance(self.lr, str):
            need(self.lr in ("shared", "auto"), f"lr must be a number > 0, \"auto\" or \"shared\", got {self.lr!r}")
        elif self.lr is not None:
            check_lr(self.lr)
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
        lr = self.lr if self.lr is None or isinstance(self.lr, str) else float(self.lr)
        # learning_rates.toml holds rates chosen for the summed loss; mean steps are ~token-count smaller
        need(not (self.loss_reduction != "sum" and lr in (None, "shared") and set(ordered) & set(FT_METHODS)),
             f"--loss-reduction {self.loss_reduction} has no chosen learning rates yet (learning_rates.toml is for "
             f"the summed loss): pass --lr <rate> or --lr auto")
        # --lr auto scores held-out training examples; 32 unless the user chose a number
        n_heldout = AUTO_HELDOUT if lr == "auto" and not self.n_heldout and set(ordered) & set(FT_METHODS) else self.n_heldout
        return dataclasses.replace(self, methods=ordered, lr=lr, n_heldout=n_heldout)

    @property
    def ft_methods(self) -> tuple[str, ...]:
        return tuple(m for m in self.methods if m in FT_METHODS)


def default_lr(model: str, task: Task, method: str = "gd", shared: bool = False) -> tuple[float, str]:
    """The learning rate when none is given, and where it came from: the method's own rate
    chosen by the lr_sweep rule (learning_rates.toml), else GD's chosen rate (always so with
    `shared`), else the paper's value for its 1.3B model."""
    table = tomllib.loads(LEARNING_RATES_FILE.read_text()) if LEARNING_RATES_FILE.exists() else {}
    name = LEARNING_RATES_FILE.name
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
        return task.paper_lr, "paper (1.3B model)"
    raise UserError(f"task {task.name} has no default learning rate for {model}: pass --lr <rate> or --lr auto")


def lr_rule_of(lr: float | str | None) -> str:
    """How a run's rates are set: "default" (each method's chosen rate), "shared", "auto", "--lr"."""
    return "default" if lr is None else lr if isinstance(lr, str) else "--lr"


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
    rule = lr_rule_of(config.lr)
    if rule in ("default", "shared"):
        lrs = {m: default_lr(config.model, task, m, shared=rule == "shared") for m in config.ft_methods}
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


def auto_learning_rates(inp: Inputs, store: StageStore | None, lrs: tuple[float, ...] = AUTO_LRS) -> dict[tuple[str, float], dict]:
    """`--lr auto`: the lr_sweep rule on this cell's held-out training examples. Each
    finetuning method is trained at every rate of `lrs` and scored on the held-out
    examples; it then runs at its best rate (ties: the largest). Every (method, rate) is a
    stage, so a rerun or a cell sharing the sweep reuses it. Returns the swept stages."""
    if not inp.prompts.heldout:
        raise UserError("--lr auto needs held-out training examples: set --n-heldout above 0")
    for lr in lrs:
        check_lr(lr)
    swept, info = {}, {}
    for m in inp.config.ft_methods:
        curve: dict[float, float | None] = {}
        for lr in lrs:
            key = stage_keys(inp, {m: lr})[m]
            stage = store.load(m, key) if store else None
            if stage is None:
                log.info("%s: lr %g on %d held-out examples (--lr auto)", m, lr, len(inp.prompts.heldout))
                try:
                    stage = compute_stage(inp, m, lr)
                except TrainingDiverged:  # this rate is out; the others decide
                    curve[lr] = None
                    continue
                if store:
                    store.save(m, key, stage)
            swept[(m, lr)] = stage
            curve[lr] = stage["heldout"].accuracy()
        if all(acc is None for acc in curve.values()):
            raise UserError(f"--lr auto: {m} diverged at every learning rate of {', '.join(f'{x:g}' for x in lrs)}")
        chosen = best_lr(curve)
        info[m] = {"chosen": chosen, "curve": {f"{lr:g}": acc for lr, acc in curve.items()}}
    resolve_lrs(inp, {m: (v["chosen"], f"--lr auto (best held-out accuracy of {len(lrs)} rates)") for m, v in info.items()})
    inp.lr_auto = info
    return swept


def permute_demos(prompts: PromptSet, seed: int, order: int) -> None:
    """Reorder the demonstrations (the same set) by the order-th of a seeded sequence of
    distinct permutations; order 0 is the identity, so no two orders coincide."""
    k = prompts.k
    if order >= math.factorial(k):
        raise UserError(f"{k} demonstrations have only {math.factorial(k)} orders; ask for fewer --orders or a larger k")
    rng, perms = random.Random(f"order-{seed}"), [tuple(range(k))]
    while len(perms) <= order:
        perm = list(range(k))
        rng.shuffle(perm)
        if tuple(perm) not in perms:
            perms.append(tuple(perm))
    perm = perms[order]
    prompts.demos = [prompts.demos[i] for i in perm]
    prompts.demo_rows = [prompts.demo_rows[i] for i in perm]
    prompts.demo_labels = [prompts.demo_labels[i] for i in perm]


def run_orders(config: RunConfig, n_orders: int, out: str | Path, loaded: LoadedModel | None = None) -> dict[str, Any]:
    """Order sensitivity (Shen et al.): the same demonstrations in `n_orders` orders
    (order 0 is the seed's). Sequential GD, like ICL, depends on the order; full-batch GD
    would not. Each order is a full run in out/order<p>; the spread across orders goes to
    out/orders.json and out/orders.csv."""
    check_int("--orders", n_orders, 2)
    config = config.validate()
    out = check_writable(Path(out))
    if loaded is None:
        loaded = load_model(config.model, config.baseline, config.seed, device=config.device)
    per_order = [run(dataclasses.replace(config, order=p), out / f"order{p}", loaded, out / "stages") for p in range(n_orders)]
    settings = ["zs"] + list(config.methods)
    preds = {s: pd.DataFrame({p: pd.read_csv(out / f"order{p}" / "examples.csv")[f"{s}_pred"] for p in range(n_orders)}) for s in settings}
    table = []
    for p, r in enumerate(per_order):
        row: dict[str, Any] = {"order": p, "demo_rows": r["config"]["demo_rows"]}
        row.update({f"acc_{s}": r["accuracy"][s] for s in settings})
        for m, metrics in r["metrics"].items():
            row.update({f"{m}_{name}": v["mean"] for name, v in metrics.items()})
        if "alpha" in r:
            row["alpha"] = r["alpha"]["mean"]
        table.append(row)
    df = pd.DataFrame(table)
    spread = {}
    for col in df.columns.drop(["order", "demo_rows"]):
        vals = df[col].astype(float)
        spread[col] = {"mean": vals.mean(), "std": vals.std(), "min": vals.min(), "max": vals.max()}
    stability = {}
    for s, frame in preds.items():
        same = (frame.nunique(axis=1) == 1).mean()
        pairs = [(a, b) for a in range(n_orders) for b in range(a + 1, n_orders)]
        flips = np.mean([(frame[a] != frame[b]).mean() for a, b in pairs])
        stability[s] = {"same_prediction_in_every_order": float(same), "mean_pairwise_disagreement": float(flips)}
    summary = {"config": {**dataclasses.asdict(config), "methods": list(config.methods), "orders": n_orders},
               "spread": spread, "prediction_stability": stability}
    atomic_write_json(out / "orders.json", summary)
    atomic_write_bytes(out / "orders.csv", df.to_csv(index=False).encode())
    return summary


def orders_table(summary: dict) -> str:
    lines = [f"{'setting':<8}{'acc mean':>10}{'acc std':>9}{'acc min':>9}{'acc max':>9}{'same pred':>11}{'flip rate':>11}"]
    for s, st in summary["prediction_stability"].items():
        a = summary["spread"][f"acc_{s}"]
        lines.append(f"{s.upper():<8}{a['mean']:>10.3f}{a['std']:>9.3f}{a['min']:>9.3f}{a['max']:>9.3f}"
                     f"{st['same_prediction_in_every_order']:>11.2f}{st['mean_pairwise_disagreement']:>11.3f}")
    for name in ("SimAOU", "SimAM_delta"):
        for m in ("gd", "lcgd"):
            if f"{m}_{name}" in summary["spread"]:
                v = summary["spread"][f"{m}_{name}"]
                lines.append(f"{m.upper()} {name}: mean {v['mean']:.3f} std {v['std']:.3f} (min {v['min']:.3f}, max {v['max']:.3f})")
    return "\n".join(lines)


def stage_keys(inp: Inputs, lrs: dict[str, float] | None = None) -> dict[str, str]:
    """The identity of each stage: exactly what its numbers depend on. `lrs` overrides
    the rate of some finetuning methods (the --lr auto sweep)."""
    c, p, lm = inp.config, inp.prompts, inp.loaded
    base = {
        "model": lm.name, "checksum": lm.checksum, "baseline": lm.baseline,
        "init_seed": c.seed if lm.baseline != "trained" else None,
        "position": c.position, "ablation": inp.ablation,
        "queries": config_key({"q": [(q.index, q.label, q.prompt) for q in p.queries], "o": p.options}),
        "bos": p.bos,
    }
    # Each stage's own precision modes, only where not float32 (so float32 keys stay as
    # they were, and a stage computed alike under two presets is shared).
    pol = policy(c.precision)
    modes = {"zs": {"zs": pol.zs}, "icl": {"icl": pol.icl}} | {m: {"train": pol.train, "eval": pol.eval} for m in FT_METHODS}
    extra = {s: ({"precision": v} if set(v.values()) != {FLOAT32} else {}) for s, v in modes.items()}
    keys = {"zs": config_key({**base, "stage": "zs", **extra["zs"]})}
    icl = {**base, "prefix": config_key(p.icl_prefix())}
    keys["icl"] = config_key({**icl, "stage": "icl", **extra["icl"]})
    for m in FT_METHODS:
        lr = (lrs or {}).get(m, inp.lr_by_method.get(m, c.lr))
        # only a finetuning stage records the held-out examples (--lr auto scores them), so
        # ZS and ICL stay shared by cells whose held-out examples differ (every seed's)
        ft = {**icl, "stage": m, "lr": lr, "kv_bias": lm.kv_bias, "demos": config_key(p.demos),
              "heldout": config_key([(q.index, q.prompt) for q in p.heldout]), **extra[m]}
        if c.step_unit != "demo":  # only when not neutral: default stage keys stay as they were
            ft["step_unit"] = c.step_unit
        if c.loss_reduction != "sum":  # the committed cells' stage keys stay as they were
            ft["loss_reduction"] = c.loss_reduction
        keys[m] = config_key(ft)
    return keys


def compute_stage(inp: Inputs, stage: str, lr: float | None = None) -> dict[str, Any]:
    """Run one stage; returns {"recording", "heldout"?, "log"?, "seconds"}."""
    c, p, lm = inp.config, inp.prompts, inp.loaded
    model = lm.model
    pol = policy(c.precision)
    t0 = time.perf_counter()

    def rec(prefix: list[int], queries, mode: str) -> Recording:
        return record(model, prefix, queries, p.options, c.position, c.batch_size, inp.hooks, precision=mode)

    out: dict[str, Any] = {}
    if stage == "zs":
        out["recording"] = rec(p.zs_prefix(), p.queries, pol.zs)
    elif stage == "icl":
        out["recording"] = rec(p.icl_prefix(), p.queries, pol.icl)
    else:
        check_method(stage)
        assert lr is not None
        with finetuned(model, p.demos, p.bos, stage, lr, lm.kv_bias, inp.hooks, precision=pol.train,
                       step_unit=c.step_unit, loss_reduction=c.loss_reduction) as ft_log:
            out["recording"] = rec(p.zs_prefix(), p.queries, pol.eval)
            if p.heldout:
                out["heldout"] = rec(p.zs_prefix(), p.heldout, pol.eval)
        out["log"] = ft_log
    out["seconds"] = time.perf_counter() - t0
    return out


def compare(zs: Recording, icl: Recording, ft: Recording, seed: int) -> dict[str, Any]:
    """Every ICL-vs-finetuning metric of one method, per example/layer(/head). The random
    vectors depend on the seed only, never on the method."""
    uniform = M.uniform_vectors(zs.attn_out.shape, seed)
    return {
        "SimAOU": M.simaou(icl.attn_out, zs.attn_out, ft.attn_out),
        "SimAOU_norm": M.simaou_norm(icl.attn_out, zs.attn_out, ft.attn_out),
        "SimAOU_random": M.simaou_random(icl.attn_out, zs.attn_out, uniform),
        "SimAOU_random_text": M.simaou_random_text(icl.attn_out, zs.attn_out, uniform),
        "SimAOU_random_matched": M.simaou_random_matched(icl.attn_out, zs.attn_out, M.random_update(ft.attn_out, seed)),
        "SimAM": M.simam(icl.attn_scores, ft.attn_scores),
        "SimAM_delta": M.simam_delta(icl.attn_scores, zs.attn_scores, ft.attn_scores),
    }


def run(config: RunConfig, out: str | Path | None, loaded: LoadedModel | None = None,
        stages_dir: str | Path | None = None, auto_lrs: tuple[float, ...] = AUTO_LRS,
        trained: LoadedModel | None = None, trained_results: str | Path | None = None) -> dict[str, Any]:
    """Run one cell end to end; write results to `out` (if given) and return them.
    Finished stages are kept in `stages_dir` (default `<out>/stages`), where a rerun, or
    another cell sharing them, finds them. `auto_lrs`: the rates `lr="auto"` tries.
    `trained`: the trained model a re-initialised `lr="auto"` cell takes its rates from
    (loaded when not given); `trained_results`: that trained cell's results.json, whose
    recorded choice is taken when it exists."""
    config = config.validate()
    if out is None:
        return _run(config, None, loaded, stages_dir, auto_lrs, trained, trained_results)
    with removed_if_empty_on_error(Path(out)):
        check_writable(Path(out))
        return _run(config, Path(out), loaded, stages_dir or Path(out) / "stages", auto_lrs, trained,
                    trained_results)


def rates_of_trained_model(inp: Inputs, store: StageStore | None, lrs: tuple[float, ...] = AUTO_LRS,
                           loaded: LoadedModel | None = None, trained_results: Path | None = None) -> None:
    """`--lr auto` on a re-initialised baseline: the rates the rule chooses for the trained
    model on the same held-out examples and demonstrations, since the paper trains every
    baseline of a task at one rate (a re-initialised model's own held-out accuracy is
    chance and would pick its rate by noise). When the trained cell has finished
    (`trained_results`, its results.json), its recorded choice is taken, so a grid resumed
    on another machine does not redo the sweep; else the sweep's stages are the trained
    cell's, reused when that cell ran first on the same scratch directory."""
    info = recorded_lr_auto(trained_results, inp, lrs) if trained_results else None
    if info is None:
        trained = prepare(dataclasses.replace(inp.config, baseline="trained"), loaded)
        auto_learning_rates(trained, store, lrs)
        info = trained.lr_auto
    else:
        log.info("--lr auto: the trained model's rates, from the finished cell %s", trained_results.parent.name)
    resolve_lrs(inp, {m: (v["chosen"], f"--lr auto on the trained model (best held-out accuracy of {len(lrs)} rates)")
                      for m, v in info.items()})
    inp.lr_auto = {m: {**v, "chosen_on": "trained"} for m, v in info.items()}


def recorded_lr_auto(path: Path, inp: Inputs, lrs: tuple[float, ...]) -> dict[str, dict] | None:
    """The `--lr auto` choice a finished trained cell recorded, if it is this cell's twin
    (same model, task, demonstrations, held-out count, precision, methods and rates); else None."""
    if not path.is_file():
        return None
    c, p = json.loads(path.read_text())["config"], inp.prompts
    auto = c.get("lr_auto") or {}
    twin = (c["baseline"] == "trained" and c["model"] == inp.config.model and c["task"] == inp.config.task
            and c["demo_rows"] == p.demo_rows and c["n_heldout"] == inp.config.n_heldout
            and c["precision_policy"] == policy(inp.config.precision).as_dict()
            and all(m in auto and list(auto[m]["curve"]) == [f"{lr:g}" for lr in lrs] for m in inp.config.ft_methods))
    return {m: {"chosen": auto[m]["chosen"], "curve": auto[m]["curve"]} for m in inp.config.ft_methods} if twin else None


def _run(config: RunConfig, out: Path | None, loaded: LoadedModel | None, stages_dir,
         auto_lrs: tuple[float, ...] = AUTO_LRS, trained: LoadedModel | None = None,
         trained_results: str | Path | None = None) -> dict[str, Any]:
    t_start = time.perf_counter()
    if stages_dir is not None:
        remove_stale_temp_files(Path(stages_dir).parent)
    # measured, not assumed: a bfloat16 phase where bfloat16 is slower stops here, before the model loads
    bf16 = require_fast_bf16(config.precision, model_device(loaded.model) if loaded else resolve_device(config.device))
    inp = prepare(config, loaded)
    c, p = inp.config, inp.prompts
    store = StageStore(Path(stages_dir)) if stages_dir is not None else None
    swept = {}
    if inp.lr_rule == "auto" and c.ft_methods:
        if c.baseline == "trained":
            swept = auto_learning_rates(inp, store, auto_lrs)
        else:
            rates_of_trained_model(inp, store, auto_lrs, trained, Path(trained_results) if trained_results else None)
    c = inp.config
    keys = stage_keys(inp)

    stages: dict[str, dict[str, Any]] = {}
    reused: list[str] = []
    for stage in ("zs",) + c.methods:
        cached = store.load(stage, keys[stage]) if store else swept.get((stage, inp.lr_by_method.get(stage)))
        if cached is not None:
            log.info("%s: reusing the finished stage", stage)
            stages[stage] = cached
            reused.append(stage)
            continue
        log.info("%s: running on %d test examples%s", stage, len(p.queries), f" (k={p.k})" if stage != "zs" else "")
        stages[stage] = compute_stage(inp, stage, inp.lr_by_method.get(stage))
        if store:
            store.save(stage, keys[stage], stages[stage])

    outputs = compare_outputs(inp, stages)
    results = assemble_results(inp, stages, outputs)
    # Wall times live apart from the results, which are byte-for-byte reproducible.
    timings = {s: round(stages[s]["seconds"], 2) for s in stages} | {"total": round(time.perf_counter() - t_start, 2)}
    if reused:  # their seconds are the run that computed them; `total` is this run's own time
        timings["reused"] = reused
    # the process's peak resident memory so far (in a grid: over the cells run before, too)
    timings["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    timings["machine"] = describe_cpu()  # what the seconds were measured on
    if bf16 is not None:
        timings["bf16_probe"] = bf16.as_dict()
    if out is not None:
        atomic_write_json(Path(out) / "timings.json", timings)
        write_results(Path(out), results, examples_table(inp, stages, outputs), per_layer_table(inp, stages))
    return {**results, "timings_s": timings}


def _setting_names(stages: dict[str, Any]) -> list[str]:
    return ["zs"] + [m for m in SETTINGS if m in stages]


def output_pairs(settings: list[str]) -> list[tuple[str, str]]:
    """The compared pairs of next-token distributions: ZS-ICL (the baseline), ICL against
    each finetuned method, each method against ZS (its KL is an update size), GD-LCGD."""
    ft = [m for m in FT_METHODS if m in settings]
    pairs = [("zs", "icl")] if "icl" in settings else []
    pairs += [("icl", m) for m in ft if "icl" in settings] + [("zs", m) for m in ft]
    return pairs + ([("gd", "lcgd")] if {"gd", "lcgd"} <= set(settings) else [])


def compare_outputs(inp: Inputs, stages: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """outputs.output_metrics for every recorded setting, per example; None for stages
    recorded before the prediction position's residual was kept."""
    names = _setting_names(stages)
    recs = {s: stages[s]["recording"] for s in names}
    if any(r.final_resid is None for r in recs.values()):
        return None
    model = inp.loaded.model
    gold = torch.tensor([inp.prompts.options[q.label][0] for q in inp.prompts.queries])
    return output_metrics(model.unembed.W_U, model.unembed.b_U, {s: r.final_resid for s, r in recs.items()}, gold,
                          output_pairs(names), inp.config.top_k, model.cfg.output_logits_soft_cap)


def _nan_none(x: float) -> float | None:
    return None if math.isnan(x) else x


def assemble_results(inp: Inputs, stages: dict[str, dict[str, Any]], outputs: dict[str, Any] | None = None) -> dict[str, Any]:
    c, p, lm = inp.config, inp.prompts, inp.loaded
    zs = stages["zs"]["recording"]
    config = {
        **dataclasses.asdict(c), "methods": list(c.methods),
        "k_requested": p.k_requested, "k_effective": p.k, "n_test_effective": len(p.queries),
        "lr_source": inp.lr_source if c.ft_methods else None, "recorded_position": c.position,
        "lr_rule": inp.lr_rule, "lr_by_method": inp.lr_by_method or None, "lr_source_by_method": inp.lr_sources or None,
        **({"lr_auto": inp.lr_auto} if inp.lr_auto else {}),
        "n_steps": {m: stages[m]["log"].grad_norms.shape[1] for m in c.ft_methods if m in stages},
        "recorded_position_meaning": "first token of the first answer option after the test prompt (original code)"
        if c.position == "answer" else "last token of the test prompt",
        "task_spec": inp.task.spec(), "separator": "\\n", "model_source": lm.source,
        "model_checksum_sha256": lm.checksum, "kv_bias_trained": lm.kv_bias, "ablation": inp.ablation,
        "demo_rows": p.demo_rows, "demo_labels": p.demo_labels,
        "demo_label_counts": {a: p.demo_labels.count(i) for i, a in enumerate(inp.task.answers)},
        "eval_rows": [q.index for q in p.queries], "context_window": p.n_ctx,
        # per phase; beyond the default precision (the fastest within fidelity of float32) is opt-in
        "precision_policy": policy(c.precision).as_dict(), "precision_within_fidelity": within_fidelity(c.precision),
    }
    results: dict[str, Any] = {
        "config": config,
        "accuracy": {s: stages[s]["recording"].accuracy() for s in _setting_names(stages)},
        "metrics": {},
        "grad_norms": {},
        "losses": {},
        "environment": environment(),
    }
    if "icl" in stages:
        icl = stages["icl"]["recording"]
        results["zs_simam"] = M.summarize(M.zs_simam(icl.attn_scores, zs.attn_scores))
        # |h - h_ZS| / |h_ZS| at hook_attn_out per layer: how far each setting moved (finetuned methods below)
        results["update_size"] = {"icl": M.summarize(M.update_size(zs.attn_out, icl.attn_out))}
        for m in c.ft_methods:
            ft = stages[m]["recording"]
            per = compare(zs, icl, ft, c.seed)
            entry = {name: M.summarize(v) for name, v in per.items()}
            value, n = M.rec2ftp(zs.correct, ft.correct, icl.correct)
            # A prediction-level metric: one value for the model, none per layer.
            entry["Rec2FTP"] = {"mean": None if math.isnan(value) else value, "per_layer": None, "n_examples": n}
            # Dai et al.'s F2T subset: ZS wrong, ICL and this method right
            f2t = M.f2t_mask(zs.correct, icl.correct, ft.correct)
            entry["f2t"] = {"n_examples": int(f2t.sum()),
                            **{name: M.summarize(v[f2t])["mean"] if f2t.any() else None for name, v in per.items()}}
            if outputs is not None:
                entry["f2t"] |= {f"output_{name}": _nan_none(v[f2t].mean().item()) if f2t.any() else None
                                 for name, v in outputs["pairs"][f"icl-{m}"].items()}
            results["metrics"][m] = entry
            results["update_size"][m] = M.summarize(M.update_size(zs.attn_out, ft.attn_out))
            results["grad_norms"][m] = stages[m]["log"].grad_norms.tolist()
            results["losses"][m] = stages[m]["log"].losses.tolist()
            if "heldout" in stages[m]:
                results.setdefault("heldout_accuracy", {})[m] = stages[m]["heldout"].accuracy()
    if outputs is not None:
        results["outputs"] = {
            "top_k": c.top_k, "position": "last prompt token",
            "token_accuracy": {s: v.float().mean().item() for s, v in outputs["token_correct"].items()},
            "pairs": {pair: {name: _nan_none(v.mean().item()) for name, v in vals.items()} for pair, vals in outputs["pairs"].items()},
        }
        for s in results.get("update_size", {}):  # KL(p_ZS || p_setting): the update's size at the output
            results["update_size"][s]["kl_from_zs"] = results["outputs"]["pairs"][f"zs-{s}"]["kl"]
    if "gd" in stages and "lcgd" in stages:
        results["alpha"] = M.summarize(M.alpha(stages["lcgd"]["recording"].attn_scores, stages["gd"]["recording"].attn_scores, zs.attn_scores))
    return results


def environment() -> dict[str, str]:
    import transformer_lens
    import transformers

    return {
        "python": platform.python_version(), "torch": torch.__version__,
        "transformer_lens": transformer_lens.__version__ if hasattr(transformer_lens, "__version__") else _dist_version("transformer_lens"),
        "transformers": transformers.__version__, "pandas": pd.__version__,
        "threads": str(torch.get_num_threads()), "machine": platform.machine(),
    }


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def examples_table(inp: Inputs, stages: dict[str, dict[str, Any]], outputs: dict[str, Any] | None = None) -> pd.DataFrame:
    """One row per test example: label, each setting's prediction, per-example metrics
    (mean over layers), output metrics, F2T membership."""
    p, answers = inp.prompts, inp.task.answers
    zs = stages["zs"]["recording"]
    df = pd.DataFrame({
        "eval_row": [q.index for q in p.queries],
        "prompt": [inp.task.prompt(inp.eval_rows[q.index]) for q in p.queries],
        "label": [answers[q.label] for q in p.queries],
    })
    for s in _setting_names(stages):
        r = stages[s]["recording"]
        df[f"{s}_pred"] = [answers[i] for i in r.predictions.tolist()]
        df[f"{s}_correct"] = r.correct.numpy()
    if "icl" in stages:
        for m in inp.config.ft_methods:
            per = compare(zs, stages["icl"]["recording"], stages[m]["recording"], inp.config.seed)
            for name, v in per.items():
                df[f"{m}_{name}"] = (v if v.dim() == 2 else v.nanmean(-1)).nanmean(-1).numpy()
            df[f"{m}_f2t"] = M.f2t_mask(zs.correct, stages["icl"]["recording"].correct, stages[m]["recording"].correct).numpy()
    if outputs is not None:
        for s, v in outputs["token_correct"].items():
            df[f"{s}_token_correct"] = v.numpy()
        for pair, vals in outputs["pairs"].items():
            for name, v in vals.items():
                df[f"{pair}_{name}"] = v.numpy()
    return df


def per_layer_table(inp: Inputs, stages: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """Long format: one row per (method, example, layer) with every metric."""
    if "icl" not in stages:
        return pd.DataFrame()
    zs, icl = stages["zs"]["recording"], stages["icl"]["recording"]
    frames = []
    rows = torch.tensor([q.index for q in inp.prompts.queries])
    for m in inp.config.ft_methods:
        per = compare(zs, icl, stages[m]["recording"], inp.config.seed)
        n, L = per["SimAOU"].shape
        frame = {"method": m, "eval_row": rows.repeat_interleave(L).numpy(), "layer": torch.arange(L).repeat(n).numpy()}
        for name, v in per.items():
            frame[name] = (v if v.dim() == 2 else v.nanmean(-1)).reshape(-1).numpy()
        frames.append(pd.DataFrame(frame))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def write_results(out: Path, results: dict, examples: pd.DataFrame, per_layer: pd.DataFrame) -> None:
    """Tables first, results.json last: its presence marks a finished run."""
    import io

    atomic_write_bytes(out / "examples.csv", examples.to_csv(index=False).encode())
    if len(per_layer):
        buf = io.BytesIO()
        per_layer.to_parquet(buf, index=False)
        atomic_write_bytes(out / "per_layer.parquet", buf.getvalue())
    atomic_write_json(out / "results.json", results)


def _lr_text(c: dict) -> str:
    lrs = c.get("lr_by_method") or {}
    if len(set(lrs.values())) > 1:
        return ", ".join(f"{m.upper()} {lr:g}" for m, lr in lrs.items()) + f" ({c['lr_rule']})"
    return format(c["lr"], "g") if isinstance(c["lr"], (int, float)) else "-"


def summary_table(results: dict) -> str:
    """A human-readable summary for stdout."""
    c = results["config"]
    lines = [
        f"task {c['task']} | model {c['model']} ({c['baseline']}) | k {c['k_effective']} (asked {c['k_requested']}) "
        f"| n_test {c['n_test_effective']} | seed {c['seed']} | lr {_lr_text(c)} | position {c['recorded_position']}",
        "accuracy: " + "  ".join(f"{s.upper()} {v * 100:.1f}%" for s, v in results["accuracy"].items()),
    ]
    names = ["SimAOU", "SimAOU_norm", "SimAOU_random", "SimAOU_random_text", "SimAOU_random_matched", "SimAM",
             "SimAM_delta", "Rec2FTP"]
    if results["metrics"]:
        lines.append(f"{'metric (mean over layers)':<28}" + "".join(f"{m.upper():>10}" for m in results["metrics"]))
        for name in names:
            vals = [results["metrics"][m][name]["mean"] for m in results["metrics"]]
            lines.append(f"{name:<28}" + "".join(f"{'n/a' if v is None else f'{v:.3f}':>10}" for v in vals))
    if "zs_simam" in results:
        z = results["zs_simam"]["mean"]
        lines.append(f"{'ZS SimAM (ICL vs ZS)':<28}{'n/a' if z is None else f'{z:.3f}':>10}")
    if "alpha" in results:
        a = results["alpha"]["mean"]
        lines.append(f"{'alpha (GD vs LCGD SimAM_delta)':<28}{'n/a' if a is None else f'{a:.3f}':>10}")
    if "outputs" in results:
        o = results["outputs"]
        lines.append("top-1 token accuracy (whole vocabulary): " + "  ".join(f"{s.upper()} {v * 100:.1f}%" for s, v in o["token_accuracy"].items()))
        lines.append(f"{'next-token output (K ' + str(o['top_k']) + ')':<28}" + "".join(f"{pair.upper():>10}" for pair in o["pairs"]))
        for name in PAIR_METRICS:
            vals = [o["pairs"][pair][name] for pair in o["pairs"]]
            lines.append(f"{name:<28}" + "".join(f"{'n/a' if v is None else f'{v:.3f}':>10}" for v in vals))
    f2t = {m: e["f2t"] for m, e in results["metrics"].items() if "f2t" in e}
    if f2t:
        lines.append("F2T subset (ZS wrong, ICL and the method right): " + "  ".join(
            f"{m.upper()} n={e['n_examples']} SimAM_delta {'n/a' if e['SimAM_delta'] is None else format(e['SimAM_delta'], '.3f')}"
            for m, e in f2t.items()))
    lines.append(f"wall time {results['timings_s']['total']:.0f} s, peak memory {results['timings_s']['peak_rss_mb']} MB")
    return "\n".join(lines)
