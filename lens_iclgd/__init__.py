"""lens_iclgd: does in-context learning behave like gradient descent inside a real model?

A TransformerLens toolkit reproducing Deutch et al., "In-context Learning and Gradient
Descent Revisited" (arXiv 2311.07772). Data flow, one module each:

    zoo       offline models as TOML files: GGUF source, size/sha256, declared shape, cache paths
    models    load a HookedTransformer (offline GGUF, hub, local) and its baselines
    tasks     task definitions (TOML) and their rows
    prompts   demonstrations, test prompts and answer options as tokens
    recording ZS/ICL recordings: hook_attn_out, hook_attn_scores, predictions
    finetune  GD and layer-causal GD on the attention K/V projections
    vocab     the vocabulary projection without full logits
    fast      faster TransformerLens forward passes (same numbers, same hooks)
    metrics   SimAOU, SimAM, alpha, Rec2FTP, F2T, ...; `compare` (every metric of one method)
    outputs   output-level comparisons: top-K overlap, overlap cosine, KL, JS, top-1 token accuracy
    ablation  head / layer ablations through hooks, in every setting
    config    RunConfig: every run setting, declared once (CLI flags and grid keys come from it)
    inputs    a run's data, prompts, model and learning rates, prepared once
    results   results.json, examples.csv, per_layer.parquet from the recordings
    runner    one experiment cell end to end: stages (cached), then results
    orders    order sensitivity: the same demonstrations in several orders
    patching  activation patching at the prediction position: layers, heads, task vectors
    causal    one cell's causal study (lens-iclgd patch): patching.json and figures
    summary   the printed tables of a run
    grid      experiment configs: every cell, resumable, shardable
    report    the paper's tables, figures and findings (reads results; no torch)
    patch_report  the causal study's report sections (no torch)
    views     per-head / per-layer views of one run
    bench     optimised vs naive pipeline

The public API below is imported lazily (`import lens_iclgd` stays fast):

    lm = load_model("gemma-3-270m", baseline="trained")
    task = load_task("sst2"); rows = load_split(task, "train", data_dir)
    p = build_prompts(lm.model, task, train_rows, eval_rows, k=16, seed=0, n_test=100)
    zs, icl = record(lm.model, p.zs_prefix(), p.queries, p.options), record(lm.model, p.icl_prefix(), ...)
    with finetuned(lm.model, p.demos, p.bos, "lcgd", lr, lm.kv_bias) as log: ft = record(...)
    metrics.frame(compare(zs, icl, ft, seed=0))   # a pandas DataFrame
"""

from importlib import import_module

__version__ = "0.1.0"

_API = {
    "UserError": "errors", "TrainingDiverged": "errors",
    "load_model": "models", "make_baseline": "models", "LoadedModel": "models", "kv_parameters": "models",
    "OFFLINE_MODELS": "models", "BASELINES": "models", "load_model_file": "zoo", "resolve_device": "device",
    "PrecisionPolicy": "precision", "PRESETS": "precision", "computing": "precision",
    "Task": "tasks", "load_task": "tasks", "load_split": "tasks", "PAPER_TASKS": "tasks",
    "PromptSet": "prompts", "build_prompts": "prompts",
    "Recording": "recording", "record": "recording", "record_reference": "recording",
    "finetuned": "finetune", "train": "finetune", "FinetuneLog": "finetune",
    "parse_ablation": "ablation", "ablation_hooks": "ablation",
    "RunConfig": "config", "run": "runner", "run_orders": "orders", "compare": "metrics", "output_metrics": "outputs",
    "run_patching": "causal", "last_token_activations": "patching", "patch_layers": "patching",
    "head_indirect_effect": "patching", "task_vector_accuracy": "patching", "recovered_share": "patching",
    "load_grid": "grid", "run_grid": "grid",
    "collect": "report", "write_report": "report",
    "per_head_frame": "views", "per_layer_frame": "views", "write_views": "views", "load_results": "views",
}
__all__ = sorted(_API) + ["metrics"]


def __getattr__(name: str):
    if name == "metrics":
        return import_module(".metrics", __name__)
    if name in _API:
        return getattr(import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'lens_iclgd' has no attribute {name!r}")
