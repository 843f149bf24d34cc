"""Writes tests/data/ from ../shared/data: the test fixture, real rows only.

    python tests/data/make_fixture.py [SOURCE] [OUT]   (defaults: ../shared/data, tests/data)

Which rows, deterministically (no shuffle, no sampling):
- sst2 train and validation: the first 300 lines of each file. These are the rows the
  `sst2_rows` fixture of tests/conftest.py reads, and the word-level tokenizer's vocabulary
  is built from them, so the tokenizer is the same whether the real data is present or not.
- every other split file of every task: the first PER_LABEL lines of each label, kept in
  file order (all of a label's lines where it has fewer), so every label is present for
  balanced demonstrations. The first line of each file is always kept.
Lines are copied byte for byte, so the schema is the real files' own.
tests/test_tasks.py checks, where ../shared/data is present, that this script rebuilds the
committed fixture exactly.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
SST2_ROWS = 300
PER_LABEL = 16


def fixture_lines(task: str, split: str, lines: list[str]) -> list[str]:
    lines = [line for line in lines if line.strip()]
    if task == "sst2":
        return lines[:SST2_ROWS]
    taken: Counter = Counter()
    kept = []
    for line in lines:
        label = json.loads(line)["label"]
        if taken[label] < PER_LABEL:
            taken[label] += 1
            kept.append(line)
    return kept


def build(source: Path, out: Path) -> list[Path]:
    written = []
    for path in sorted(source.glob("*/*.jsonl")):
        task, split = path.parent.name, path.stem
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        target = out / task / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("".join(fixture_lines(task, split, lines)), encoding="utf-8")
        written.append(target)
    return written


if __name__ == "__main__":
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE.parents[1].parent / "shared" / "data"
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else HERE
    for f in build(source, out):
        print(f"{f}: {sum(1 for _ in f.open())} rows")
