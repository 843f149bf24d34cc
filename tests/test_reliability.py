"""Reproducibility, adversarial task data, API input checks: across the pipeline
(the damaged model caches are in test_models.py)."""

import json
import random

import pandas as pd
import pytest
import torch

from conftest import TEST_DATA, run_cli, tiny_model
from lens_iclgd.errors import UserError
from lens_iclgd.finetune import train
from lens_iclgd.prompts import build_prompts
from lens_iclgd.recording import record
from lens_iclgd.tasks import load_split, load_task


def test_same_cell_twice_is_byte_identical(tmp_path, tiny_hf_dir):
    args = ["run", "--task", "sst2", "--data-dir", str(TEST_DATA), "--model", str(tiny_hf_dir),
            "--k", "4", "--n-test", "12", "--lr", "0.02", "--n-heldout", "5"]
    for name in ("a", "b"):  # separate directories: nothing is reused
        proc = run_cli(args + ["--out", str(tmp_path / name)])
        assert proc.returncode == 0, proc.stderr
    for f in ("results.json", "examples.csv", "per_layer.parquet"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    r = json.loads((tmp_path / "a" / "results.json").read_text())
    assert {"torch", "transformer_lens", "transformers", "python"} <= set(r["environment"])
    # a local directory has no pinned weights file: its checksum is recorded as unknown
    assert r["config"]["model_source"] == "local-hf" and r["config"]["model_checksum_sha256"] is None
    assert (r["config"]["k_effective"], r["config"]["n_test_effective"], r["config"]["n_heldout"]) == (4, 12, 5)


ADVERSARIAL = ["", " ", "{text}", "{0}", "}{", "{{}}", "\x00\x01\x1b[31m\x7f", "\t\n\r\n", "日本語のレビュー",
               "Ελληνικά και العربية", "😀🎬🍿", "a" * 3000, "word " * 400, "\\u0000", "%s %d %(x)s", "\u202e\u200b"]


def _write_task(folder, texts_train, texts_test):
    folder.mkdir(parents=True, exist_ok=True)
    for split, texts in (("train", texts_train), ("test", texts_test)):
        with open(folder / f"{split}.jsonl", "w") as f:
            for i, t in enumerate(texts):
                f.write(json.dumps({"text": t, "label": i % 2}) + "\n")
    (folder / "task.toml").write_text('name = "fuzz"\ntemplate = "Text: {text} Label:"\nanswers = ["Negative", "Positive"]\n'
                                      'eval_split = "test"\n[files]\ntrain = "train.jsonl"\ntest = "test.jsonl"\n')
    return folder / "task.toml"


def _fuzz_texts(rng: random.Random, n: int) -> list[str]:
    alphabet = "ab {}\\%\x00\x1f\u00e9\u4e2d\U0001f600\n\t\"'"
    out = []
    for _ in range(n):
        if rng.random() < 0.4:
            out.append(rng.choice(ADVERSARIAL[:12]))
        else:
            out.append("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))))
    return out


def test_fuzzed_task_data_in_process(tmp_path, tokenizer):
    """Many random datasets through prompts, recording and training: each either works
    with finite outputs or raises a UserError (never another exception)."""
    lm = tiny_model(tokenizer, n_ctx=256)
    rng = random.Random(1234)
    outcomes = {"ok": 0, "user error": 0}
    for i in range(25):
        task = load_task(str(_write_task(tmp_path / f"t{i}", _fuzz_texts(rng, 12), _fuzz_texts(rng, 6))))
        try:
            p = build_prompts(lm.model, task, load_split(task, "train"), load_split(task, "test"), 3, i, 6)
            rec = record(lm.model, p.icl_prefix(), p.queries, p.options)
            assert torch.isfinite(rec.attn_out).all() and torch.isfinite(rec.option_logprobs).all()
            train(lm.model, p.demos, p.bos, "lcgd", 0.01, False)
            outcomes["ok"] += 1
        except UserError as e:
            assert "\n" not in str(e)
            outcomes["user error"] += 1
    assert outcomes["ok"] > 0


@pytest.mark.parametrize("texts,expect_ok", [
    (ADVERSARIAL[:11] + ["fine film"] * 9, True),  # braces, control characters, scripts, emoji
    (["word " * 400] * 20, False),  # cannot fit the context
])
def test_fuzzed_task_data_through_the_cli(tmp_path, tiny_hf_dir, texts, expect_ok):
    task = _write_task(tmp_path / "task", texts, list(reversed(texts)))
    out = tmp_path / "out"
    proc = run_cli(["run", "--task", str(task), "--model", str(tiny_hf_dir), "--k", "3", "--n-test", "10",
                    "--lr", "0.01", "--out", str(out)])
    if expect_ok:
        assert proc.returncode == 0, proc.stderr
        r = json.loads((out / "results.json").read_text())
        assert (r["config"]["k_effective"], r["config"]["n_test_effective"]) == (3, 10)
        assert set(r["accuracy"]) == {"zs", "icl", "gd", "lcgd"} and all(0 <= a <= 1 for a in r["accuracy"].values())
        assert len(pd.read_csv(out / "examples.csv", keep_default_na=False)) == 10
    else:
        assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
        assert "Traceback" not in proc.stderr and not (out / "results.json").exists()


def test_api_functions_check_their_input(gqa_model, sst2_rows):
    task = load_task("sst2")
    for kwargs, msg in (({"k": 0}, "k must be an integer >= 1"), ({"n_test": -1}, "n_test must be"),
                        ({"seed": "0"}, "seed must be an integer")):
        args = {"k": 2, "seed": 0, "n_test": 3} | kwargs
        with pytest.raises(UserError, match=msg):
            build_prompts(gqa_model.model, task, sst2_rows["train"], sst2_rows["validation"], **args)
    p = build_prompts(gqa_model.model, task, sst2_rows["train"], sst2_rows["validation"], 2, 0, 3)
    for lr in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(UserError, match="lr must be"):
            train(gqa_model.model, p.demos, p.bos, "gd", lr, False)
    with pytest.raises(UserError, match="unknown finetuning method"):
        train(gqa_model.model, p.demos, p.bos, "adam", 0.1, False)
    with pytest.raises(UserError, match="at least one test example"):
        record(gqa_model.model, p.zs_prefix(), [], p.options)
    with pytest.raises(UserError, match="unknown recorded position"):
        record(gqa_model.model, p.zs_prefix(), p.queries, p.options, position="middle")
