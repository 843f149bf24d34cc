"""Tasks (tasks.py): the paper's templates, data sources, sampling, errors; the test
fixture in tests/data and, where present, the real data it is taken from."""

import json
import runpy
import string
from pathlib import Path

import pytest

from conftest import DATA_FILES, SHARED_DATA, TEST_DATA, needs_shared_data
from lens_iclgd.errors import UserError
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
def test_paper_tasks_have_the_paper_templates_and_read_the_data(name):
    task = load_task(name)
    template, answers, eval_split = PAPER_TEMPLATES[name]
    assert (task.template, task.answers, task.eval_split, task.train_split) == (template, answers, eval_split, "train")
    fields = [f for _, f, _, _ in string.Formatter().parse(template) if f]
    for split in ("train", eval_split):
        rows = load_split(task, split, TEST_DATA)  # the fixture: real rows in the hub schema
        # every label id of the task occurs, so balanced demonstrations can be drawn
        assert {r["label"] for r in rows} == set(range(len(answers))), split
        for row in rows[:5]:
            prompt = task.prompt(row)
            assert prompt == template.format(**{f: str(row[f]).strip() for f in fields})
            assert task.demonstration(row) == f"{prompt} {answers[row['label']]}"


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


# --- the fixture and the real data --------------------------------------------------------------


def _shared_sizes() -> dict[str, int]:
    """Rows per split file of ../shared/data, from its README table (the hub's split sizes,
    agnews's 2,000 + 5,600 of the official test file)."""
    return {"sst2/train.jsonl": 6920, "sst2/validation.jsonl": 872, "sst5/train.jsonl": 8544,
            "sst5/validation.jsonl": 1101, "sst5/test.jsonl": 2210, "mr/train.jsonl": 8530,
            "mr/validation.jsonl": 1066, "mr/test.jsonl": 1066, "subj/train.jsonl": 8000, "subj/test.jsonl": 2000,
            "agnews/train.jsonl": 5600, "agnews/test.jsonl": 2000, "cb/train.jsonl": 250, "cb/validation.jsonl": 56}


def test_the_fixture_is_small_and_has_the_real_data_layout():
    assert set(DATA_FILES) == set(_shared_sizes())  # the same task folders and file names
    assert sum((TEST_DATA / f).stat().st_size for f in DATA_FILES) < 400_000
    for name in PAPER_TASKS:
        task = load_task(name)
        for split in (task.train_split, task.eval_split):
            assert 30 <= len(load_split(task, split, TEST_DATA)) <= 300, (name, split)


@needs_shared_data("to check that tests/data is make_fixture.py's selection of the real rows")
def test_the_fixture_is_rebuilt_from_the_shared_data(tmp_path):
    build = runpy.run_path(str(TEST_DATA / "make_fixture.py"))["build"]
    written = build(SHARED_DATA, tmp_path)
    assert sorted(str(f.relative_to(tmp_path)) for f in written) == sorted(DATA_FILES)
    for f in DATA_FILES:
        assert (tmp_path / f).read_bytes() == (TEST_DATA / f).read_bytes(), f
        real = (SHARED_DATA / f).read_text(encoding="utf-8").splitlines()
        fixture = (TEST_DATA / f).read_text(encoding="utf-8").splitlines()
        assert fixture[0] == real[0]
        positions = [real.index(line) for line in fixture]  # real rows, in the real file's order
        assert positions == sorted(positions), f


@needs_shared_data("the full splits' sizes and every row checked against its task")
def test_shared_data_has_the_full_splits():
    sizes = _shared_sizes()
    for name in PAPER_TASKS:
        task = load_task(name)
        for f in (f for f in sizes if f.startswith(f"{name}/")):
            rows = load_split(task, Path(f).stem, SHARED_DATA)  # checks fields and labels of every row
            assert len(rows) == sizes[f], f
            assert {r["label"] for r in rows} == set(range(len(task.answers))), f
