"""lens_iclgd: does in-context learning behave like gradient descent inside a real model?

A TransformerLens toolkit reproducing Deutch et al., "In-context Learning and Gradient
Descent Revisited" (arXiv 2311.07772). Data flow, one module each:

    models    load a HookedTransformer (offline GGUF, hub, local) and its baselines
    tasks     task definitions (TOML) and their rows
    prompts   demonstrations, test prompts and answer options as tokens
    record    ZS/ICL recordings: hook_attn_out, hook_attn_scores, predictions
    finetune  GD and layer-causal GD on the attention K/V projections
    metrics   SimAOU, SimAM, alpha, Rec2FTP, ...
    ablation  head / layer ablations through hooks, in every setting
    runner    one experiment cell end to end, results.json
"""

__version__ = "0.1.0"
