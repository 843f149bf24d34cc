"""How much the loss reduction alone changes a cell's metrics (issue 31, item 1).

    python experiments/loss_reduction_effect.py [--model M] [--task T] [--k 32] [--n-test 200]
        [--lr 1e-5] [--out artifacts/loss_reduction] [--stages runs/loss_reduction_stages]

The same cell (model, task, demonstrations, test examples) twice, GD and LCGD at one shared
rate: once on the summed loss at `--lr`, once on the token-mean loss (the paper's code) at
`--lr` x the demonstrations' mean target count, the rate that gives the same mean step. ZS
and ICL are one shared stage. Writes each run's results.json and a table of the
differences (summary.md) to `--out`. Update size: |h_FT - h_ZS| / |h_ZS| at hook_attn_out,
mean over test examples and layers. A rerun reuses every stage and only rewrites the tables.
"""

import argparse
import dataclasses
import json
from pathlib import Path

from lens_iclgd.config import RunConfig
from lens_iclgd.inputs import prepare
from lens_iclgd.runner import run

METRICS = ("SimAOU", "SimAOU_norm", "SimAM", "SimAM_delta")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--task", default="rt_snippets")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-5, help="the summed-loss rate (default: qwen's GD rate for MR)")
    ap.add_argument("--out", type=Path, default=Path("artifacts/loss_reduction"))
    ap.add_argument("--stages", type=Path, default=Path("runs/loss_reduction_stages"))
    args = ap.parse_args()

    base = RunConfig(task=args.task, model=args.model, k=args.k, n_test=args.n_test, seed=args.seed, lr=args.lr,
                     data_dir=args.data_dir)
    inp = prepare(base.validate())
    targets = [len(inp.prompts.bos) + len(d) - 1 for d in inp.prompts.demos]  # next-token targets per demonstration
    mean_targets = sum(targets) / len(targets)
    runs = {"sum": base, "mean": dataclasses.replace(base, loss_reduction="mean", lr=args.lr * mean_targets)}
    results = {name: run(c, args.out / name, loaded=inp.loaded, stages_dir=args.stages) for name, c in runs.items()}

    lines = [f"# Loss reduction alone: {args.model}, {args.task}, k {inp.prompts.k}, n-test {len(inp.prompts.queries)}, "
             f"seed {args.seed}", "",
             f"Demonstrations: {len(targets)}, next-token targets per demonstration {min(targets)}-{max(targets)} "
             f"(mean {mean_targets:.2f}). Summed loss at lr {args.lr:g}; token-mean loss at lr {args.lr * mean_targets:.4g} "
             f"(= {args.lr:g} x {mean_targets:.2f}, the same mean step). GD and LCGD at the same rate.", "",
             "| method | quantity | sum | mean | mean - sum |", "|---|---|---|---|---|"]
    for m in ("gd", "lcgd"):
        acc = {n: r["accuracy"][m] for n, r in results.items()}
        lines.append(f"| {m.upper()} | accuracy | {acc['sum']:.3f} | {acc['mean']:.3f} | {acc['mean'] - acc['sum']:+.3f} |")
        for metric in METRICS:
            v = {n: r["metrics"][m][metric]["mean"] for n, r in results.items()}
            lines.append(f"| {m.upper()} | {metric} | {v['sum']:.4f} | {v['mean']:.4f} | {v['mean'] - v['sum']:+.4f} |")
        u = {n: r["update_size"][m]["mean"] for n, r in results.items()}
        lines.append(f"| {m.upper()} | update size | {u['sum']:.4f} | {u['mean']:.4f} | {u['mean'] - u['sum']:+.4f} |")
    a = {n: r["alpha"]["mean"] for n, r in results.items()}
    lines.append(f"| both | alpha | {a['sum']:.4f} | {a['mean']:.4f} | {a['mean'] - a['sum']:+.4f} |")
    zs, icl = results["sum"]["accuracy"]["zs"], results["sum"]["accuracy"]["icl"]
    lines += ["", f"ZS accuracy {zs:.3f}, ICL {icl:.3f} (shared); ICL's update size "
              f"{results['sum']['update_size']['icl']['mean']:.4f}. Regenerate: `python experiments/loss_reduction_effect.py "
              f"--model {args.model} --task {args.task} --k {args.k} --n-test {args.n_test} --seed {args.seed} --lr {args.lr:g}`."]
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    (args.out / "targets.json").write_text(json.dumps({"targets_per_demo": targets, "mean": mean_targets}) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
