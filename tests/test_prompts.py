"""Prompts (prompts.py): the tokenized demonstrations, test prompts and options of every
paper task, truncation to the context, balanced demonstrations."""

import pytest
import torch

from conftest import TEST_DATA, tiny_model, word_tokenizer
from lens_iclgd.errors import UserError
from lens_iclgd.prompts import build_prompts, encode
from lens_iclgd.recording import record, record_reference
from lens_iclgd.tasks import PAPER_TASKS, eval_indices, load_split, load_task, task_from_dict


@pytest.mark.parametrize("name", PAPER_TASKS)
def test_every_paper_task_builds_balanced_prompts_and_records(name):
    """Each paper task on the fixture's real rows (cb's two fields, agnews's long articles,
    sst5's five labels) through prompts and recording, every label among the demonstrations.
    A tokenizer of the task's own words: the session one knows only sst2's."""
    task = load_task(name)
    train_rows, eval_rows = (load_split(task, s, TEST_DATA) for s in (task.train_split, task.eval_split))
    n_labels = len(task.answers)
    tok = word_tokenizer([task.demonstration(r) for r in train_rows] + [task.prompt(r) for r in eval_rows])
    lm = tiny_model(tok, n_ctx=2048)
    p = build_prompts(lm.model, task, train_rows, eval_rows, k=2 * n_labels, seed=0, n_test=6, balanced=True)
    assert p.k == 2 * n_labels and sorted(p.demo_labels) == sorted(2 * list(range(n_labels)))
    assert [q.index for q in p.queries] == eval_indices(len(eval_rows), 6)
    for q in p.queries:
        assert q.label == eval_rows[q.index]["label"] and q.prompt == encode(lm.model, task.prompt(eval_rows[q.index]))
    for demo, i in zip(p.demos, p.demo_rows):  # each demonstration ends in its gold answer's tokens
        option = p.options[train_rows[i]["label"]]
        assert demo == encode(lm.model, task.demonstration(train_rows[i])) and demo[-len(option):] == option
    zs = record(lm.model, p.zs_prefix(), p.queries, p.options)
    icl = record(lm.model, p.icl_prefix(), p.queries, p.options, batch_size=4)
    ref = record_reference(lm.model, p.icl_prefix(), p.queries, p.options)
    assert icl.option_logprobs.shape == (6, n_labels) and icl.labels.tolist() == [q.label for q in p.queries]
    assert torch.allclose(icl.option_logprobs, ref.option_logprobs, atol=1e-5)
    assert torch.allclose(icl.attn_out, ref.attn_out, atol=1e-5)
    assert not torch.allclose(zs.attn_out, icl.attn_out)


def test_truncation_keeps_the_longest_prefix_that_fits(tokenizer, sst2_rows):
    task = load_task("sst2")
    full = build_prompts(tiny_model(tokenizer).model, task, sst2_rows["train"], sst2_rows["validation"], 16, 0, 8)
    longest = max(len(q.prompt) for q in full.queries) + 1  # + the one-token answer
    # a context that holds exactly 5 demonstrations next to the longest test example
    n_ctx = len(full.bos) + sum(len(d) + len(full.separator) for d in full.demos[:5]) + longest
    small = tiny_model(tokenizer, n_ctx=n_ctx).model
    p = build_prompts(small, task, sst2_rows["train"], sst2_rows["validation"], 16, 0, 8)
    assert p.k == 5 and p.k_requested == 16 and p.demos == full.demos[:5]
    assert len(p.icl_prefix()) + longest == n_ctx
    assert build_prompts(tiny_model(tokenizer, n_ctx=n_ctx - 1).model, task, sst2_rows["train"], sst2_rows["validation"], 16, 0, 8).k == 4


def test_prompt_longer_than_context(tokenizer, sst2_rows):
    small = tiny_model(tokenizer, n_ctx=8).model
    with pytest.raises(UserError, match="even with zero demonstrations"):
        build_prompts(small, load_task("sst2"), sst2_rows["train"], sst2_rows["validation"], 4, 0, 8)
    just_the_test = max(len(q.prompt) for q in build_prompts(
        tiny_model(tokenizer).model, load_task("sst2"), sst2_rows["train"], sst2_rows["validation"], 1, 0, 8).queries) + 2
    with pytest.raises(UserError, match="no demonstration fits"):
        build_prompts(tiny_model(tokenizer, n_ctx=just_the_test).model, load_task("sst2"), sst2_rows["train"], sst2_rows["validation"], 4, 0, 8)


def test_answer_words_with_identical_tokens(tokenizer, sst2_rows, tmp_path):
    # both words are unknown to the tiny word-level tokenizer: the same <unk> token
    task = task_from_dict({"name": "custom", "template": "Text: {sentence} Label:", "answers": ["Zyxwv", "Qwrtp"],
                           "files": {"train": "x.jsonl", "validation": "y.jsonl"}}, tmp_path / "task.toml")
    with pytest.raises(UserError, match="tokenize to the same tokens"):
        build_prompts(tiny_model(tokenizer).model, task, sst2_rows["train"], sst2_rows["validation"], 1, 0, 2)


def test_balanced_prompts_record_their_labels(tokenizer, sst2_rows):
    lm = tiny_model(tokenizer)
    task = load_task("sst2")
    p = build_prompts(lm.model, task, sst2_rows["train"], sst2_rows["validation"], k=6, seed=0, n_test=4, n_heldout=5, balanced=True)
    assert sorted(p.demo_labels) == [0, 0, 0, 1, 1, 1]
    assert p.demo_labels == [sst2_rows["train"][i]["label"] for i in p.demo_rows]
    assert not {q.index for q in p.heldout} & set(p.demo_rows)
