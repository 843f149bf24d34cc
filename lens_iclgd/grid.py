"""Experiment grids: every cell of a config file, resumable and shardable.

A grid config (TOML, see experiments/*.toml) lists models, baselines, tasks, seeds,
methods, learning rates and ablations; a *cell* is one (model, baseline, task, seed,
learning rate, ablation) and runs every listed method, exactly like `lens-iclgd run`.

    RESULTS/cells/<cell id>/results.json   a finished cell (written last, atomically)
    RESULTS/cells/<cell id>/failed.json    a cell whose training diverged (NaN/inf)
    RESULTS/stages/                        ZS, ICL and finetuned recordings, shared
                                           (`--scratch DIR`: DIR/stages instead)
    RESULTS/grids/<name>.json              the grid configs run here (for `report`)

The cell id ends in a hash of the cell's full settings, so a changed setting makes a new
cell instead of reusing a stale one. A `data_dir` enters the hash as a fingerprint of the
split files read from it, not as its path, so the same cell has the same id on every
machine; the fingerprints are recorded in grids/<name>.json, so `report` needs no data. ZS and ICL recordings are keyed by what they depend
on only, so every method and learning rate of a (model, baseline, task, seed) reuses
them. Rerunning after an interruption (Ctrl-C, kill -9) skips finished cells.
`--shard I/N` takes every N-th group of cells sharing ZS/ICL recordings, so N machines
sharing RESULTS split a grid with no cell run twice.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import DEFAULT_MODEL, RunConfig
from .config import fields as config_fields
from .device import resolve_device
from .errors import TrainingDiverged, UserError
from .lr_rule import AUTO_LRS, default_lr, lr_rule_of, parse_lr
from .models import LoadedModel, load_model, make_baseline
from .precision import FLOAT32, policy, require_fast_bf16
from .progress import bar, fmt_time
from .provenance import provenance
from .runner import run
from .store import atomic_write_json, check_writable, config_key, read_toml, remove_stale_temp_files
from .tasks import data_fingerprint, load_split, load_task

log = logging.getLogger("lens_iclgd")


# The grid's axes: a list each, every combination a cell (plural key -> RunConfig field).
AXES = {"models": "model", "baselines": "baseline", "tasks": "task", "seeds": "seed", "lrs": "lr", "ablations": "ablate"}
# Every other RunConfig field is a scalar key of the same name (k = 32, loss_reduction =
# "mean", ...): a setting added to RunConfig is a grid key at once.
SCALARS = tuple(f.name for f in config_fields() if f.name not in AXES.values())
GRID_METHODS = ["gd", "lcgd"]  # a grid's default methods (ICL is recorded with them)


@dataclass
class GridConfig:
    name: str
    tasks: list[str]
    models: list[str] = dataclasses.field(default_factory=lambda: [DEFAULT_MODEL])
    baselines: list[str] = dataclasses.field(default_factory=lambda: ["trained"])
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2])
    # None ("default"): each method's chosen rate; "shared": GD's for all; "auto": chosen per cell
    lrs: list[float | str | None] = dataclasses.field(default_factory=lambda: [None])
    ablations: list[str] = dataclasses.field(default_factory=lambda: [""])
    description: str = ""
    # the RunConfig fields the grid sets (SCALARS); the rest are RunConfig's defaults
    settings: dict[str, Any] = dataclasses.field(default_factory=lambda: {"methods": list(GRID_METHODS)})
    # task -> fingerprint of the data_dir files, filled by run_grid (not a config key)
    data_fingerprints: dict[str, str] = dataclasses.field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:  # grid.k, grid.data_dir: the grid's setting, else RunConfig's default
        if name in SCALARS and "settings" in self.__dict__:
            return self.settings.get(name, GRID_METHODS if name == "methods" else _RUN_DEFAULTS[name])
        raise AttributeError(name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in SCALARS:
            self.settings[name] = value
        else:
            super().__setattr__(name, value)

    def record(self, ids: list[str] | None = None) -> dict[str, Any]:
        """The flat form grids/<name>.json keeps (a grid config's keys), with the id of
        every cell, so `report` finds them without recomputing ids (or importing torch)."""
        flat = {"name": self.name, "description": self.description, **{k: getattr(self, k) for k in AXES},
                **self.settings, "data_fingerprints": self.data_fingerprints, "provenance": provenance()}
        if ids is not None:
            flat["cells"] = {i: {"model": c.model, "baseline": c.baseline, "task": c.task, "seed": c.seed}
                             for i, c in zip(ids, cells(self))}
        return flat


_RUN_DEFAULTS = {f.name: f.default for f in config_fields()}


def grid_from_record(raw: dict[str, Any]) -> GridConfig:
    """A GridConfig from its flat form (a config file's keys or a grids/*.json record)."""
    raw = dict(raw)
    raw.pop("cells", None)
    raw.pop("provenance", None)
    top = {k: raw.pop(k) for k in ("name", "description", "data_fingerprints", *AXES) if k in raw}
    return GridConfig(**top, settings={"methods": list(GRID_METHODS), **raw})


_KINDS = {"int": (int, "an integer"), "str": (str, "a string"), "bool": (bool, "true or false")}
_AXIS_KINDS = {"models": str, "baselines": str, "tasks": str, "seeds": int, "lrs": (int, float, str), "ablations": str}


def _check_key(path: Path, key: str, value: Any) -> None:
    """A grid key's type, from its RunConfig field's kind (config.py)."""
    if key in AXES or key == "methods":
        kind = _AXIS_KINDS.get(key, str)
        if not isinstance(value, list) or not value or not all(isinstance(x, kind) and not isinstance(x, bool) for x in value):
            raise UserError(f"grid config {path}: {key} must be a non-empty list of {getattr(kind, '__name__', 'numbers')}")
        return
    kind, words = _KINDS["str" if key in ("name", "description") else _FIELD_KINDS[key]]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise UserError(f"grid config {path}: {key} must be {words}")


_FIELD_KINDS = {f.name: f.metadata["kind"] for f in config_fields()}


def load_grid(path: str | Path) -> GridConfig:
    path = Path(path)
    raw = read_toml(path, "grid config", "pass a file like experiments/table2.toml")
    singular = {v: k for k, v in AXES.items()}
    unknown = set(raw) - set(AXES) - set(SCALARS) - {"name", "description"}
    if unknown:
        hints = [f"{k} (a list: {singular[k]} = [...])" if k in singular else k for k in sorted(unknown)]
        raise UserError(f"grid config {path}: unknown key(s) {', '.join(hints)}")
    if "tasks" not in raw or "name" not in raw:
        raise UserError(f"grid config {path}: needs at least name and tasks")
    for key, value in raw.items():
        _check_key(path, key, value)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", raw["name"]):
        raise UserError(f"grid config {path}: name {raw['name']!r} must use only letters, digits, '_', '.', '-'")
    lrs = []
    for lr in raw.get("lrs", [None]):
        try:
            lrs.append(parse_lr(lr))
        except ValueError:
            raise UserError(f"grid config {path}: lrs entries are numbers, \"default\", \"shared\" or \"auto\", got {lr!r}") from None
    raw["lrs"] = lrs
    if raw.get("data_dir"):  # relative to the config file
        raw["data_dir"] = str((path.parent / raw["data_dir"]).resolve())
    grid = grid_from_record(raw)
    for c in cells(grid):  # types and ranges, before any compute
        c.validate()
    return grid


def cells(grid: GridConfig) -> list[RunConfig]:
    """Every cell, in a fixed order: grouped by what shares ZS/ICL recordings."""
    settings = {**grid.settings, "methods": tuple(grid.methods)}
    out = []
    for model in grid.models:
        for baseline in grid.baselines:
            for seed in grid.seeds:
                for task in grid.tasks:
                    for ablate in grid.ablations:
                        for lr in grid.lrs:
                            out.append(RunConfig(task=task, model=model, baseline=baseline, seed=seed, lr=lr,
                                                 ablate=ablate, **settings))
    return out


def group_of(c: RunConfig) -> tuple:
    """Cells of one group share the ZS and ICL recordings."""
    return (c.model, c.baseline, c.seed, c.task, c.ablate)


def cell_id(c: RunConfig, fingerprints: dict[str, str] | None = None) -> str:
    """`fingerprints` (task -> data fingerprint, as recorded in grids/*.json) saves
    reading the data; without it the data_dir files are hashed (once per process)."""
    settings = dataclasses.asdict(c)
    if c.data_dir is not None:  # what the data is, not where it lies: the same id on every machine
        settings["data_dir"] = (fingerprints or {}).get(c.task) or data_fingerprint(load_task(c.task), c.data_dir)
    return _cell_id(c, settings)


def legacy_cell_id(c: RunConfig) -> str:
    """The id before data fingerprints (data_dir hashed as the path string given): how
    cells of older results directories are named. Equal to cell_id without a data_dir."""
    return _cell_id(c, dataclasses.asdict(c))


def _cell_id(c: RunConfig, settings: dict[str, Any]) -> str:
    settings.pop("batch_size")  # does not change the numbers beyond float tolerance
    settings.pop("device")  # where a cell runs, not what it computes
    if settings.pop("precision") != FLOAT32:  # hashed by what it means, so redefining a preset reruns
        settings["precision_policy"] = policy(c.precision).as_dict()
    for name, neutral in (("step_unit", "demo"), ("balanced", False), ("loss_reduction", "sum"), ("top_k", 10), ("orders", 1)):  # hashed only when set: old ids stay valid
        if settings[name] == neutral:
            settings.pop(name)
    if not c.ft_methods:  # an ICL-only cell trains nothing: the same cell under either loss
        settings.pop("loss_reduction", None)
    if not c.patching:  # hashed only for patching cells: old ids stay valid
        settings.pop("patching")
        settings.pop("patch_heads")
    rule = lr_rule_of(c.lr, c.loss_reduction)
    if rule in ("default", "shared") and c.ft_methods:  # the id follows learning_rates.toml, so an edit there reruns
        task = load_task(c.task)
        rates = {m: default_lr(c.model, task, m, shared=rule == "shared", loss_reduction=c.loss_reduction)[0]
                 for m in c.ft_methods}
        # one number when every method shares it (the ids of cells from before per-method rates)
        settings["lr_default"] = rates.popitem()[1] if len(set(rates.values())) == 1 else rates
    if c.lr == "auto":
        settings["lr_auto_grid"] = list(AUTO_LRS)
    lr = "default" if c.lr is None else c.lr if isinstance(c.lr, str) else f"{c.lr:g}"
    readable = f"{Path(c.model).name}__{c.baseline}__{Path(c.task).stem}__seed{c.seed}__lr{lr}"
    if c.step_unit != "demo":
        readable += f"__step-{c.step_unit}"
    if c.orders > 1:
        readable += f"__orders{c.orders}"
    if c.patching:
        readable += "__patching"
    if c.balanced:
        readable += "__balanced"
    if c.loss_reduction != "sum" and c.ft_methods:
        readable += f"__loss-{c.loss_reduction}"
    if c.ablate:
        readable += f"__ablate-{c.ablate_mode}-{c.ablate}"
    if c.precision != FLOAT32:
        readable += f"__{c.precision}"
    return re.sub(r"[^A-Za-z0-9_.+=-]", "-", readable) + "__" + config_key(settings)[:10]


def parse_shard(text: str | None) -> tuple[int, int]:
    if not text:
        return 0, 1
    m = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise UserError(f"--shard {text!r}: use I/N with 0 <= I < N, e.g. 0/4")
    return int(m.group(1)), int(m.group(2))


def shard(all_cells: list[RunConfig], index: int, count: int) -> list[RunConfig]:
    """Whole groups, dealt round-robin: disjoint, together the whole grid."""
    groups = list(dict.fromkeys(group_of(c) for c in all_cells))
    mine = set(groups[index::count])
    return [c for c in all_cells if group_of(c) in mine]


def adopt_legacy_cell(results_dir: Path, c: RunConfig) -> bool:
    """Rename a finished cell written under its legacy id (before data fingerprints) to
    its id, so a grid started by an older version resumes instead of rerunning it."""
    new, old = (results_dir / "cells" / name for name in (cell_id(c), legacy_cell_id(c)))
    if new == old or new.exists() or not old.is_dir():
        return False
    try:
        old.rename(new)
    except OSError:  # another shard got there first
        return False
    return True


def cell_status(results_dir: Path, c: RunConfig) -> str:
    folder = results_dir / "cells" / cell_id(c)
    if (folder / ("orders.json" if c.orders > 1 else "patching.json" if c.patching else "results.json")).exists():
        return "done"
    if (folder / "failed.json").exists():
        return "failed"
    return "todo"


def _check_inputs(todo: list[RunConfig]) -> None:
    """Fail before any compute if a task or its data cannot be read."""
    seen = set()
    for c in todo:
        if (c.task, c.data_dir) in seen:
            continue
        seen.add((c.task, c.data_dir))
        task = load_task(c.task)
        for split in (task.train_split, task.eval_split):
            load_split(task, split, c.data_dir)


def select(grid: GridConfig, all_cells: list[RunConfig], only: dict[str, list] | None) -> list[RunConfig]:
    """The cells whose seed/task/model is among `only`'s (e.g. {"seeds": [0]}: seed 0 of
    every task first). The grid itself, and what `report` expects of it, stays whole."""
    for key, value in (only or {}).items():
        allowed = getattr(grid, key)
        outside = [v for v in value if v not in allowed]
        if outside:
            raise UserError(f"--{key} {','.join(map(str, outside))}: not in grid {grid.name}'s {key} "
                            f"({', '.join(map(str, allowed))})")
    attr = {"seeds": "seed", "tasks": "task", "models": "model"}
    return [c for c in all_cells if all(getattr(c, attr[k]) in v for k, v in (only or {}).items())]


def run_grid(grid: GridConfig, results_dir: str | Path, shard_spec: str | None = None, retry_failed: bool = False,
             scratch_dir: str | Path | None = None, only: dict[str, list] | None = None,
             dry_run: bool = False) -> dict[str, int]:
    """Run the unfinished cells of this shard (of the cells `only` selects, see select());
    returns counts of done/failed/run cells. Recordings go to `scratch_dir`/stages
    (default RESULTS/stages): results can then live in a committed directory and the
    heavy recordings on a scratch disk. `dry_run`: list the cells to run, compute nothing
    (the grid is still recorded for `report`)."""
    results_dir = check_writable(Path(results_dir))
    stages_dir = (check_writable(Path(scratch_dir)) if scratch_dir is not None else results_dir) / "stages"
    remove_stale_temp_files(results_dir)  # left by a writer killed mid-write (kill -9)
    index, count = parse_shard(shard_spec)
    if grid.data_dir is not None:
        grid.data_fingerprints = {t: data_fingerprint(load_task(t), grid.data_dir) for t in grid.tasks}
    mine = shard(select(grid, cells(grid), only), index, count)
    adopted = sum(adopt_legacy_cell(results_dir, c) for c in mine)
    if adopted:
        print(f"grid {grid.name}: {adopted} finished cells renamed from their pre-fingerprint ids", flush=True)
    status = {cell_id(c): cell_status(results_dir, c) for c in mine}
    todo = [c for c in mine if status[cell_id(c)] == "todo" or (retry_failed and status[cell_id(c)] == "failed")]
    print(f"grid {grid.name}: {len(mine)} cells in shard {index}/{count}, "
          f"{sum(s == 'done' for s in status.values())} already done, {len(todo)} to run", flush=True)
    _check_inputs(todo)
    # what `report` counts as expected; several grids may share one results directory
    every = cells(grid)
    atomic_write_json(results_dir / "grids" / f"{grid.name}.json", grid.record([cell_id(c, grid.data_fingerprints) for c in every]))
    if dry_run:
        for c in todo:
            print(f"to run: {cell_id(c)}", flush=True)
        return {"cells": len(mine), "done": len(mine) - len(todo), "failed": 0, "ran": 0}

    for precision, device in sorted({(c.precision, c.device) for c in todo}):
        require_fast_bf16(precision, resolve_device(device))  # one line before any model loads, not one per cell
    models: dict[tuple, LoadedModel] = {}
    start, ran, failed = time.perf_counter(), 0, 0
    for i, c in bar(enumerate(todo, 1), f"grid {grid.name}", total=len(todo), unit="cell", leave=True):
        key = (c.model, c.baseline, c.seed if c.baseline != "trained" else None)
        if key not in models:
            trained = models.get((c.model, "trained", None)) or load_model(c.model, device=c.device)
            models = {(c.model, "trained", None): trained}  # keep at most one other baseline
            models[key] = make_baseline(trained, c.baseline, c.seed)
        folder = results_dir / "cells" / cell_id(c)
        t0 = time.perf_counter()
        try:
            twin = results_dir / "cells" / cell_id(dataclasses.replace(c, baseline="trained")) / "results.json"
            if c.orders > 1:  # an order-sensitivity cell: one run per order in folder/order<p>, then orders.json
                from .orders import run_orders

                run_orders(c, folder, models[key], stages_dir)
            elif c.patching:  # a causal-study cell: patching.json (causal.py)
                from .causal import run_patching

                run_patching(c, folder, models[key], stages_dir)
            else:
                run(c, folder, loaded=models[key], stages_dir=stages_dir, trained=models[(c.model, "trained", None)],
                    trained_results=twin if c.baseline != "trained" else None)
            (folder / "failed.json").unlink(missing_ok=True)
            outcome = "done"
        except TrainingDiverged as e:
            failed += 1
            atomic_write_json(folder / "failed.json", {"error": str(e), "method": e.method, "step": e.step,
                                                       "layer": e.layer, "config": dataclasses.asdict(c)})
            outcome = f"FAILED ({e})"
        ran += 1
        elapsed = time.perf_counter() - start
        eta = elapsed / ran * (len(todo) - i)
        print(f"[{i}/{len(todo)}] {cell_id(c)}: {outcome} in {time.perf_counter() - t0:.0f}s | "
              f"elapsed {fmt_time(elapsed)} | ETA {fmt_time(eta)}", flush=True)
    done = sum(cell_status(results_dir, c) == "done" for c in mine)
    print(f"grid {grid.name}: {done}/{len(mine)} cells done, {failed} failed in this run", flush=True)
    return {"cells": len(mine), "done": done, "failed": failed, "ran": ran}
