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
import resource
import time
from pathlib import Path
from typing import Any

from .config import RunConfig
from .config import fields as config_fields
from .device import model_device, resolve_device
from .errors import TrainingDiverged, UserError, check_lr
from .finetune import METHODS as FT_METHODS
from .finetune import check_method, finetuned
from .hardware import describe_cpu
from .inputs import Inputs, prepare, resolve_lrs
from .lr_rule import AUTO_LRS, best_lr
from .models import LoadedModel
from .precision import FLOAT32, policy, require_fast_bf16
from .recording import Recording, record
from .results import assemble_results, compare_outputs, examples_table, per_layer_table, write_results
from .store import StageStore, atomic_write_json, config_key, check_writable, remove_stale_temp_files, removed_if_empty_on_error

log = logging.getLogger("lens_iclgd")


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


def refresh_heldout_shares(cell: str | Path, stages_dir: str | Path, loaded: LoadedModel | None = None) -> dict[str, float]:
    """Give a cell finished before `heldout_majority_share` was recorded its shares, read
    from its finetuning stages (nothing is trained: every stage must exist), after checking
    that those stages reproduce the cell's held-out accuracies. Only that entry is added to
    results.json, where a fresh run writes it; everything else stays as it was."""
    path = Path(cell) / "results.json"
    results = json.loads(path.read_text())
    c = results["config"]
    if not results.get("heldout_accuracy"):
        raise UserError(f"{cell} scored no held-out examples: there is no share to add")
    config = RunConfig(**{f.name: tuple(c[f.name]) if isinstance(c[f.name], list) else c[f.name]
                          for f in config_fields() if f.name in c})
    inp = prepare(config.validate(), loaded)
    keys, store = stage_keys(inp, c["lr_by_method"]), StageStore(Path(stages_dir))
    shares = {}
    for m, accuracy in results["heldout_accuracy"].items():
        stage = store.load(m, keys[m])
        if stage is None or "heldout" not in stage:
            raise UserError(f"stage {store.path(m, keys[m])} is missing: rerun the cell instead")
        if (scored := stage["heldout"].accuracy()) != accuracy:
            raise UserError(f"{cell}: its {m} stage scores the held-out examples {scored:.4f}, "
                            f"the cell {accuracy:.4f}: rerun the cell instead")
        shares[m] = stage["heldout"].majority_share()
    fresh = {}
    for name, value in results.items():  # where assemble_results puts it
        fresh[name] = value
        if name == "heldout_accuracy":
            fresh["heldout_majority_share"] = shares
    atomic_write_json(path, fresh)
    return shares
