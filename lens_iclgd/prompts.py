"""From task rows to token sequences: demonstrations, test prompts, answer options.

Every sequence a run feeds is a concatenation of separately tokenized pieces:

    ZS   : [BOS] test_prompt option
    ICL  : [BOS] demo_1 SEP demo_2 SEP ... demo_k SEP test_prompt option
    GD   : [BOS] demo_i          (one demonstration per SGD step)

so the ICL demonstrations are token-for-token the sequences GD trains on, and the ICL
prefix ([BOS] demo_1 SEP ... demo_k SEP) is one shared prefix whose key/value cache can be
reused for every test example.
"""

from __future__ import annotations

import math
import random

from dataclasses import dataclass, field
from typing import Any

from transformer_lens import HookedTransformer

from .errors import UserError, check_int
from .tasks import Task, demo_indices, eval_indices

SEPARATOR = "\n"  # between demonstrations, and between the last one and the test prompt


@dataclass
class Query:
    """One test example as token ids: the prompt and each answer word's tokens."""

    index: int  # row in the split it came from
    label: int
    prompt: list[int]


@dataclass
class PromptSet:
    """Everything tokenized that one (task, model, seed, k, n_test) run feeds the model."""

    task: Task
    bos: list[int]
    separator: list[int]
    options: list[list[int]]  # tokens of " " + answer word, by label id
    demos: list[list[int]]  # [BOS] not included; truncated to what fits the context
    demo_rows: list[int]
    demo_labels: list[int]
    queries: list[Query]
    heldout: list[Query] = field(default_factory=list)
    k_requested: int = 0
    n_ctx: int = 0

    @property
    def k(self) -> int:
        return len(self.demos)

    def icl_prefix(self) -> list[int]:
        prefix = list(self.bos)
        for demo in self.demos:
            prefix += demo + self.separator
        return prefix

    def zs_prefix(self) -> list[int]:
        return list(self.bos)


def encode(model: HookedTransformer, text: str) -> list[int]:
    assert model.tokenizer is not None, "the model needs a tokenizer"
    return list(model.tokenizer(text, add_special_tokens=False)["input_ids"])


def bos_tokens(model: HookedTransformer) -> list[int]:
    tok = model.tokenizer
    if model.cfg.default_prepend_bos and tok is not None and tok.bos_token_id is not None:
        return [int(tok.bos_token_id)]
    return []


def answer_options(model: HookedTransformer, task: Task) -> list[list[int]]:
    options = [encode(model, " " + a) for a in task.answers]
    for word, toks in zip(task.answers, options):
        if not toks:
            raise UserError(f"task {task.name}: answer word {word!r} tokenizes to nothing; choose another word")
    seen: dict[tuple[int, ...], str] = {}
    for word, toks in zip(task.answers, options):
        if tuple(toks) in seen:
            raise UserError(
                f"task {task.name}: answer words {seen[tuple(toks)]!r} and {word!r} tokenize to the same "
                "tokens, so they cannot be told apart; choose distinct answer words"
            )
        seen[tuple(toks)] = word
    return options


def build_prompts(
    model: HookedTransformer,
    task: Task,
    train_rows: list[dict[str, Any]],
    eval_rows: list[dict[str, Any]],
    k: int,
    seed: int,
    n_test: int,
    n_heldout: int = 0,
    balanced: bool = False,
) -> PromptSet:
    """Sample and order demonstrations by `seed`, pick the test examples, tokenize, and
    keep the longest prefix of demonstrations that fits the context together with the
    longest test prompt (docs/protocol.md). `balanced`: an equal count per label
    (tasks.demo_indices)."""
    check_int("seed", seed, -(2**63))
    for name, value, minimum in (("k", k, 1), ("n_test", n_test, 1), ("n_heldout", n_heldout, 0)):
        check_int(name, value, minimum)
    bos, sep = bos_tokens(model), encode(model, SEPARATOR)
    options = answer_options(model, task)
    labels = [int(r[task.label_field]) for r in train_rows] if balanced else None
    demo_idx, heldout_idx = demo_indices(len(train_rows), k, seed, n_heldout, labels, len(task.answers))
    demos = [encode(model, task.demonstration(train_rows[i])) for i in demo_idx]

    def query(rows: list[dict[str, Any]], i: int) -> Query:
        return Query(i, int(rows[i][task.label_field]), encode(model, task.prompt(rows[i])))

    queries = [query(eval_rows, i) for i in eval_indices(len(eval_rows), n_test)]
    heldout = [query(train_rows, i) for i in heldout_idx]

    n_ctx = model.cfg.n_ctx
    longest_option = max(len(o) for o in options)
    longest = max(queries + heldout, key=lambda q: len(q.prompt))
    query_len = len(longest.prompt) + longest_option
    if len(bos) + query_len > n_ctx:
        raise UserError(
            f"task {task.name}: example {longest.index} needs {len(bos) + query_len} tokens but the model's "
            f"context holds {n_ctx}, even with zero demonstrations; shorten the template or drop long examples"
        )
    budget, fits = n_ctx - len(bos) - query_len, 0
    for demo in demos:
        budget -= len(demo) + len(sep)
        if budget < 0:
            break
        fits += 1
    if fits == 0:
        raise UserError(
            f"task {task.name}: no demonstration fits the {n_ctx}-token context next to the longest test "
            f"prompt ({query_len} tokens); use a model with a longer context or shorter examples"
        )
    # GD trains on [BOS] + demo, which fits whenever the ICL prompt does.
    return PromptSet(
        task=task, bos=bos, separator=sep, options=options, demos=demos[:fits],
        demo_rows=demo_idx[:fits], demo_labels=[int(train_rows[i][task.label_field]) for i in demo_idx[:fits]],
        queries=queries, heldout=heldout, k_requested=k, n_ctx=n_ctx,
    )


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
