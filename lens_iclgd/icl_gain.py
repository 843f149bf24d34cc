"""The premise table: does each model learn in context at all (ICL - ZS accuracy)?

From every finished cell that recorded ZS and ICL on the trained model (no ablation),
one row per (model, task) and one "mean" row per model, as `icl_gain.csv`:

    model, task, zs, icl, gain, gain_std, seeds, k, n_test

zs, icl: mean accuracy over seeds; gain = icl - zs; gain_std: std over seeds of icl - zs
(of the task-averaged gain in the "mean" row); seeds: how many; k, n_test: the effective
values ("16", or "12-16" where the context cut k for some cells). Cells that differ only
in learning rate or finetuning methods share their ZS/ICL recordings and count once; if
a model was run at several (k, n_test, position) settings, the one covering the most
(task, seed) pairs is used (ties: the larger k, then n_test).

`icl_gain.md` adds the rule that picks the project's default model, from `make run`
wall times measured by hand (make_run_times.toml):

    # how and where the times were measured
    machine = "2-core x86_64, torch 2.13 CPU"
    [seconds]
    "gemma-3-270m" = 143
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .errors import UserError
from .report import _task_order
from .store import atomic_write_bytes, atomic_write_text

CSV_COLUMNS = ["model", "task", "zs", "icl", "gain", "gain_std", "seeds", "k", "n_test"]
MAKE_RUN_LIMIT_S = 300  # the rule: a `make run` cell of at most 5 minutes here
RULE = ("the largest mean ICL - ZS gain among the models whose `make run` cell takes at most "
        f"{MAKE_RUN_LIMIT_S // 60} minutes here")


def zs_icl_cells(cells: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per (model, task, seed) of the chosen setting: zs, icl, k, n_test."""
    rows = []
    for r in cells:
        c = r["config"]
        if c["baseline"] != "trained" or c.get("ablate") or c.get("order", 0) or "icl" not in r["accuracy"]:
            continue
        rows.append({"model": c["model"], "task": Path(c["task"]).stem, "seed": c["seed"],
                     "setting": (c["k"], c["n_test"], c["position"]), "zs": r["accuracy"]["zs"],
                     "icl": r["accuracy"]["icl"], "k": c["k_effective"], "n_test": c["n_test_effective"]})
    df = pd.DataFrame(rows, columns=["model", "task", "seed", "setting", "zs", "icl", "k", "n_test"])
    if df.empty:
        return df
    df = df.drop_duplicates(["model", "task", "seed", "setting"])
    coverage = df.groupby(["model", "setting"]).size().reset_index(name="n")
    coverage["rank"] = [(n, *s[:2]) for n, s in zip(coverage["n"], coverage["setting"])]
    best = coverage.loc[coverage.groupby("model")["rank"].idxmax(), ["model", "setting"]]
    return df.merge(best, on=["model", "setting"]).drop(columns="setting")


def _span(values) -> str:
    lo, hi = int(min(values)), int(max(values))
    return str(lo) if lo == hi else f"{lo}-{hi}"


def _std(values) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")


def icl_gain_table(cells: list[dict[str, Any]]) -> pd.DataFrame:
    """The CSV_COLUMNS table (see the module docstring); models sorted by name."""
    df = zs_icl_cells(cells)
    out = []
    for model in sorted(df["model"].unique()) if not df.empty else []:
        sub = df[df["model"] == model].assign(gain=lambda d: d["icl"] - d["zs"])
        tasks = _task_order(sub["task"])
        per_task = []
        for task in tasks:
            t = sub[sub["task"] == task]
            per_task.append({"model": model, "task": task, "zs": t["zs"].mean(), "icl": t["icl"].mean(),
                             "gain": t["icl"].mean() - t["zs"].mean(), "gain_std": _std(t["gain"]),
                             "seeds": t["seed"].nunique(), "k": _span(t["k"]), "n_test": _span(t["n_test"])})
        # the mean row's spread: over seeds that ran every task, of the task-averaged gain
        by_seed = sub.groupby("seed").filter(lambda g: g["task"].nunique() == len(tasks)).groupby("seed")["gain"].mean()
        means = pd.DataFrame(per_task)
        out += per_task + [{"model": model, "task": "mean", "zs": means["zs"].mean(), "icl": means["icl"].mean(),
                            "gain": means["gain"].mean(), "gain_std": _std(by_seed), "seeds": len(by_seed),
                            "k": _span(sub["k"]), "n_test": _span(sub["n_test"])}]
    return pd.DataFrame(out, columns=CSV_COLUMNS)


def read_make_run_times(path: str | Path | None) -> dict[str, Any] | None:
    """{"seconds": {model: s}, "machine": str} from a make_run_times.toml, or None."""
    if path is None:
        return None
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"make-run times file {path} does not exist: write model = seconds under [seconds]") from None
    except (tomllib.TOMLDecodeError, OSError, UnicodeDecodeError) as e:
        raise UserError(f"make-run times file {path} is not readable TOML ({e})") from None
    seconds = raw.get("seconds")
    if not isinstance(seconds, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in seconds.values()):
        raise UserError(f"make-run times file {path}: needs a [seconds] table of model = seconds")
    return {"seconds": {str(k): float(v) for k, v in seconds.items()}, "machine": str(raw.get("machine", "not stated"))}


def default_model_verdict(table: pd.DataFrame, times: dict[str, Any] | None) -> list[str]:
    """The rule's verdict as Markdown lines: which models qualify, and the winner."""
    lines = [f"**Rule for the default model:** {RULE}."]
    if times is None:
        return lines + ["", "No `make run` times given (make_run_times.toml): no verdict."]
    means = table[table["task"] == "mean"].set_index("model")["gain"]
    lines += ["", f"`make run` wall times (measured on: {times['machine']}):", "",
              "| model | make run s | qualifies | mean gain |", "|---|---|---|---|"]
    qualifying = {}
    for model in sorted(set(means.index) | set(times["seconds"])):
        s = times["seconds"].get(model)
        ok = s is not None and s <= MAKE_RUN_LIMIT_S and model in means.index
        if ok:
            qualifying[model] = means[model]
        gain = f"{means[model]:+.3f}" if model in means.index else "not run"
        lines.append(f"| {model} | {'not measured' if s is None else f'{s:.0f}'} | {'yes' if ok else 'no'} | {gain} |")
    if not qualifying:
        return lines + ["", "**Verdict:** no model qualifies."]
    winner = max(sorted(qualifying), key=lambda m: qualifying[m])
    return lines + ["", f"**Verdict:** {len(qualifying)} model(s) qualify ({', '.join(sorted(qualifying))}); "
                        f"the default is **{winner}** (mean gain {qualifying[winner]:+.3f})."]


def icl_gain_markdown(table: pd.DataFrame, times: dict[str, Any] | None, command: str | None) -> str:
    """icl_gain.md: the title, the command that made the results, and the body."""
    lines = ["# ICL gain: does each model learn in context?", ""]
    if command:
        lines += ["Produced by:", "", "```", command, "```", ""]
    return "\n".join(lines + icl_gain_body(table, times))


def icl_gain_body(table: pd.DataFrame, times: dict[str, Any] | None) -> list[str]:
    """Per model: each task's ZS -> ICL accuracy and the mean gain; the rule's verdict."""
    if table.empty:
        return ["No finished cells with ZS and ICL on the trained model.", ""]
    lines = []
    tasks = _task_order(table[table["task"] != "mean"]["task"])
    lines += ["| model | " + " | ".join(tasks) + " | mean gain (± std over seeds) | seeds | k | n-test |",
              "|---|" + "---|" * (len(tasks) + 4)]
    for model, sub in table.groupby("model", sort=True):
        by_task = sub.set_index("task")
        cells = [f"{by_task.loc[t, 'zs']:.3f} → {by_task.loc[t, 'icl']:.3f}" if t in by_task.index else "" for t in tasks]
        mean = by_task.loc["mean"]
        spread = "" if pd.isna(mean["gain_std"]) else f" ± {mean['gain_std']:.3f}"
        lines.append(f"| {model} | " + " | ".join(cells) + f" | {mean['gain']:+.3f}{spread} | {mean['seeds']} | "
                     f"{mean['k']} | {mean['n_test']} |")
    lines += ["", "Cells: ZS → ICL accuracy, mean over seeds (trained model, no finetuning). Mean gain: mean over "
              "tasks of ICL - ZS; its spread is the std over seeds of the task-averaged gain. Per-task spreads "
              "are in icl_gain.csv.", ""]
    return lines + default_model_verdict(table, times) + [""]


def write_icl_gain(cells: list[dict[str, Any]], out_dir: str | Path, command: str | None = None,
                   times: dict[str, Any] | None = None) -> pd.DataFrame:
    """icl_gain.csv and icl_gain.md in out_dir; returns the table."""
    out = Path(out_dir)
    table = icl_gain_table(cells)
    atomic_write_bytes(out / "icl_gain.csv", table.to_csv(index=False, float_format="%.4f").encode())
    atomic_write_text(out / "icl_gain.md", icl_gain_markdown(table, times, command))
    return table
