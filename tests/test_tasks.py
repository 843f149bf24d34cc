"""Tasks and prompts: the paper's templates, data sources, sampling, truncation, errors."""

import json
from pathlib import Path

import pytest

from conftest import SHARED_DATA, tiny_model
from lens_iclgd.errors import UserError
from lens_iclgd.prompts import build_prompts
from lens_iclgd.tasks import PAPER_TASKS, demo_indices, eval_indices, load_split, load_task

PAPER_TEMPLATES = {
    "sst2": ("Sentence: {sentence} Label:", ("Negative", "Positive"), "validation"),
    "sst5": ("Sentence: {text} Label:", ("terrible", "bad", "neutral", "good", "great"), "validation"),
    "mr": ("Review: {text} Sentiment:", ("Negative", "Positive"), "validation"),
    "subj": ("Input: {text} Type:", ("objective", "subjective"), "test"),
    "agnews": ("Classify the news articles into the categories of World, Sports, Business, and Technology. Article: {text} Answer:",
               ("World", "Sports", "Business", "Technology"), "test"),
    "cb": ("{premise} Question: {hypothesis}. True, False, or Neither? Answer:", ("True", "False", "Neither"), "validation"),
}


@pytest.mark.parametrize("name", PAPER_TASKS)
def test_paper_tasks_have_the_paper_templates_and_read_the_shared_data(name):
    task = load_task(name)
    template, answers, eval_split = PAPER_TEMPLATES[name]
    assert (task.template, task.answers, task.eval_split, task.train_split) == (template, answers, eval_split, "train")
    if not SHARED_DATA.exists():
        pytest.skip("../shared/data is not present")
    rows = load_split(task, task.eval_split, SHARED_DATA)
    prompt = task.prompt(rows[0])
    assert prompt.endswith(template.rsplit("}", 1)[1]) and "{" not in prompt.replace(rows[0].get("text", ""), "")
    demo = task.demonstration(rows[0])
    assert demo == f"{prompt} {answers[rows[0]['label']]}"


def test_eval_subset_is_fixed_and_capped_demos_follow_the_seed():
    assert eval_indices(5000, 10_000) == eval_indices(5000, 2000)  # capped at 2,000
    assert len(eval_indices(5000, 10_000)) == 2000
    assert eval_indices(100, 10) == eval_indices(100, 20)[:10]  # a fixed shuffle, seed-free
    d0, h0 = demo_indices(100, 8, seed=0, n_heldout=4)
    d1, _ = demo_indices(100, 8, seed=1)
    assert d0 == demo_indices(100, 8, seed=0)[0] and d0 != d1
    assert not set(d0) & set(h0)


def test_k_larger_than_pool(tmp_path):
    with pytest.raises(UserError, match="more than the 10 training examples.*lower --k"):
        demo_indices(10, 11, seed=0)


def _write_task(tmp_path: Path, body: str, train=None, test=None) -> Path:
    rows = [{"text": "good film", "label": 1}, {"text": "bad film", "label": 0}]
    for split, data in (("train", train or rows), ("test", test or rows)):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    path = tmp_path / "task.toml"
    path.write_text(body)
    return path


GOOD = '''name = "custom"
template = "Text: {text} Label:"
answers = ["Negative", "Positive"]
eval_split = "test"
[files]
train = "train.jsonl"
test = "test.jsonl"
'''


def test_custom_task_file(tmp_path):
    task = load_task(str(_write_task(tmp_path, GOOD)))
    rows = load_split(task, "train")
    assert task.prompt(rows[0]) == "Text: good film Label:"


@pytest.mark.parametrize("body,train,message", [
    (GOOD.replace("{text}", "{review}"), None, r"template field \{review\} is not a column"),
    (GOOD.replace('["Negative", "Positive"]', '["Negative"]'), None, "at least two"),
    (GOOD, [{"text": "x", "label": 2}], "has label 2 but answers lists 2 words"),
    (GOOD, [{"text": "x", "label": "pos"}], "has label 'pos'"),
    (GOOD.replace('["Negative", "Positive"]', '["Yes", "Yes"]'), None, "repeat a word"),
    (GOOD.replace("Text: {text}", "Text: {text!r}"), None, "plain column name"),
    (GOOD.replace("Text: {text}", "Text: {text"), None, "malformed"),
    ("colour = 1\n" + GOOD, None, "unknown key"),
    (GOOD.replace('name = "custom"', 'name = "custom'), None, "not valid TOML"),
    (GOOD.replace('test = "test.jsonl"', 'test = "missing.jsonl"'), None, "missing data file"),
])
def test_bad_task_files_name_the_problem(tmp_path, body, train, message):
    with pytest.raises(UserError, match=message) as err:
        task = load_task(str(_write_task(tmp_path, body, train=train)))
        load_split(task, "train")
        load_split(task, "test")
    assert "\n" not in str(err.value)


def test_empty_split(tmp_path):
    path = _write_task(tmp_path, GOOD)
    (tmp_path / "train.jsonl").write_text("")
    with pytest.raises(UserError, match="split 'train' is empty"):
        load_split(load_task(str(path)), "train")


def test_unknown_task():
    with pytest.raises(UserError, match="unknown task 'sst3'"):
        load_task("sst3")


def test_missing_file_in_data_dir(tmp_path):
    with pytest.raises(UserError, match=r"missing data file .*sst2/train.jsonl"):
        load_split(load_task("sst2"), "train", tmp_path)


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
    path = _write_task(tmp_path, GOOD.replace('["Negative", "Positive"]', '["Zyxwv", "Qwrtp"]'))
    task = load_task(str(path))
    with pytest.raises(UserError, match="tokenize to the same tokens"):
        build_prompts(tiny_model(tokenizer).model, task, load_split(task, "train"), load_split(task, "test"), 1, 0, 2)


def _labels(n_rows: int, n_labels: int, seed: int = 7) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(n_labels) for _ in range(n_rows)]


@pytest.mark.parametrize("k,n_labels", [(12, 3), (14, 3), (5, 2), (3, 5)])
def test_balanced_demos_have_equal_counts_per_label(k, n_labels):
    from collections import Counter

    labels = _labels(300, n_labels)
    demos, heldout = demo_indices(300, k, seed=3, n_heldout=20, labels=labels, n_labels=n_labels)
    counts = Counter(labels[i] for i in demos)
    assert len(demos) == len(set(demos)) == k
    # k // L of every label; the k % L remaining demonstrations go to distinct labels
    assert sorted(counts.get(l, 0) for l in range(n_labels)) == [k // n_labels] * (n_labels - k % n_labels) + [k // n_labels + 1] * (k % n_labels)
    assert len(heldout) == 20 and not set(demos) & set(heldout)
    # the same seed, the same demonstrations in the same order; another seed, others
    assert demo_indices(300, k, seed=3, n_heldout=20, labels=labels, n_labels=n_labels) == (demos, heldout)
    assert demo_indices(300, k, seed=4, n_heldout=20, labels=labels, n_labels=n_labels)[0] != demos
    # the order is the seed's shuffle, so labels are interleaved rather than grouped
    plain, _ = demo_indices(300, 300, seed=3)
    assert demos == [i for i in plain if i in set(demos)]


def test_balanced_remainder_labels_follow_the_seed():
    labels = _labels(300, 3)
    extra = set()
    for seed in range(20):
        demos, _ = demo_indices(300, 4, seed=seed, labels=labels, n_labels=3)
        (label,) = [l for l in range(3) if sum(labels[i] == l for i in demos) == 2]
        extra.add(label)
    assert extra == {0, 1, 2}


def test_balanced_with_too_few_rows_of_a_label():
    labels = [0] * 50 + [1] * 3
    with pytest.raises(UserError, match="--balanced needs 5 training rows of label 1 but there are 3") as err:
        demo_indices(53, 10, seed=0, labels=labels, n_labels=2)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="label 2 but there are 0"):  # a label with no rows at all
        demo_indices(53, 6, seed=0, labels=labels, n_labels=3)


def test_balanced_prompts_record_their_labels(tokenizer, sst2_rows):
    lm = tiny_model(tokenizer)
    task = load_task("sst2")
    p = build_prompts(lm.model, task, sst2_rows["train"], sst2_rows["validation"], k=6, seed=0, n_test=4, n_heldout=5, balanced=True)
    assert sorted(p.demo_labels) == [0, 0, 0, 1, 1, 1]
    assert p.demo_labels == [sst2_rows["train"][i]["label"] for i in p.demo_rows]
    assert not {q.index for q in p.heldout} & set(p.demo_rows)
