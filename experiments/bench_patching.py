"""What the cheap patching path saves: layer patching (3 components x every layer) of an
ICL source into ZS, timed the cheap way (patching.patch_layers: the prompt minus its last
token cached once per example, the last token run once per patch) and the naive way
(patching.patch_layers_reference: a full forward of the whole prompt per patch, through
transformer_lens.patching.generic_activation_patch), on the same examples; and the largest
difference between the two. Prints figures; asserts nothing.

    python experiments/bench_patching.py --model smollm2-135m --task sst2 --data-dir ../shared/data --examples 4
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # generic_activation_patch draws a bar per call

import torch

from lens_iclgd import patching as P
from lens_iclgd.config import RunConfig
from lens_iclgd.hardware import describe_cpu
from lens_iclgd.inputs import prepare


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="rt_snippets")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--examples", type=int, default=4)
    args = ap.parse_args()

    inp = prepare(RunConfig(task=args.task, model=args.model, k=args.k, n_test=args.examples, data_dir=args.data_dir,
                            methods=("icl",)).validate())
    p, model = inp.prompts, inp.loaded.model
    print(f"machine: {describe_cpu()} | torch threads {torch.get_num_threads()}")
    print(f"model {args.model}: {model.cfg.n_layers} layers | task {args.task} | k {p.k} | {len(p.queries)} examples, "
          f"mean ZS prompt {sum(len(q.prompt) for q in p.queries) / len(p.queries) + len(p.bos):.0f} tokens")
    t0 = time.perf_counter()
    icl = P.last_token_activations(model, p.icl_prefix(), p.queries, p.options)
    print(f"ICL source recorded in {time.perf_counter() - t0:.1f} s")
    n_patches = len(P.COMPONENTS) * model.cfg.n_layers * len(p.queries)
    times = {}
    for name, fn in (("cheap", P.patch_layers), ("full forward per patch", P.patch_layers_reference)):
        t0 = time.perf_counter()
        out = fn(model, p.queries, p.options, icl, prefix=p.zs_prefix())
        times[name] = time.perf_counter() - t0
        print(f"{name:>24}: {times[name]:7.2f} s for {n_patches} patches ({times[name] / n_patches * 1000:.1f} ms each)")
        if name == "cheap":
            cheap = out
    diff = max((cheap[c]["logit_diff"] - out[c]["logit_diff"]).abs().max().item() for c in P.COMPONENTS)
    print(f"largest logit-diff difference between the two: {diff:.2e}")
    print(f"speedup: {times['full forward per patch'] / times['cheap']:.1f}")


if __name__ == "__main__":
    main()
