"""A worked example that uses only the public Python API of lens_iclgd.

Records ZS and ICL on a few test examples, finetunes with GD and LCGD (with one attention
layer ablated everywhere, to show the hooks composing), and compares them per layer.

    python experiments/api_example.py                          # offline: Rotten Tomatoes snippets
    python experiments/api_example.py --task sst2 --data-dir ../shared/data
"""

import argparse

import lens_iclgd as li


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="rt_snippets")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--n-test", type=int, default=40)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--ablate", default="attn3")
    args = ap.parse_args()

    lm = li.load_model(args.model, baseline="trained")
    task = li.load_task(args.task)
    train_rows = li.load_split(task, task.train_split, args.data_dir)
    eval_rows = li.load_split(task, task.eval_split, args.data_dir)
    p = li.build_prompts(lm.model, task, train_rows, eval_rows, k=args.k, seed=0, n_test=args.n_test)
    print(f"{task.name}: {p.k} demonstrations, ICL prefix of {len(p.icl_prefix())} tokens, {len(p.queries)} test examples")

    hooks = li.ablation_hooks(lm.model, li.parse_ablation(args.ablate), p)  # [] for no ablation
    zs = li.record(lm.model, p.zs_prefix(), p.queries, p.options, hooks=hooks)
    icl = li.record(lm.model, p.icl_prefix(), p.queries, p.options, hooks=hooks)
    print(f"accuracy with {args.ablate} ablated: ZS {zs.accuracy():.3f}, ICL {icl.accuracy():.3f}")

    frames = []
    for method in ("gd", "lcgd"):
        with li.finetuned(lm.model, p.demos, p.bos, method, args.lr, lm.kv_bias, hooks=hooks) as log:
            ft = li.record(lm.model, p.zs_prefix(), p.queries, p.options, hooks=hooks)
        print(f"{method.upper()}: accuracy {ft.accuracy():.3f}, mean gradient norm {log.grad_norms.mean():.1f}")
        frames.append(li.metrics.frame(li.compare(zs, icl, ft, seed=0)).assign(method=method))
    # weights are restored after each `finetuned` block: the model is the pretrained one again

    import pandas as pd

    df = pd.concat(frames)
    table = df[df.metric.isin(["SimAOU", "SimAM_delta"])].groupby(["method", "metric", "layer"])["value"].mean()
    print(table.unstack("layer").round(3).to_string())


if __name__ == "__main__":
    main()
