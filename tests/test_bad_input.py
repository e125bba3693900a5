"""Bad checkpoints and options: one EngineError naming the culprit; the CLI says it in one line, exit 2."""
from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import engine
from engine import EngineError


@pytest.fixture
def good(checkpoint_dir, tmp_path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(checkpoint_dir("mixtral"), dst)
    return dst


def _rewrite_header(path: Path, edit) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def case_missing_folder(good: Path) -> tuple[Path, list[str]]:
    return good.parent / "nope", ["nope", "no such model folder"]


def case_broken_config(good: Path):
    (good / "config.json").write_text('{"model_type": "mixtral", ')
    return good, ["config.json", "not valid JSON"]


def case_unknown_model_type(good: Path):
    cfg = json.loads((good / "config.json").read_text())
    cfg["model_type"] = "gpt-bogus"
    (good / "config.json").write_text(json.dumps(cfg))
    return good, ["config.json", "gpt-bogus", "not supported"]


def case_missing_field(good: Path):
    cfg = json.loads((good / "config.json").read_text())
    del cfg["hidden_size"]
    (good / "config.json").write_text(json.dumps(cfg))
    return good, ["config.json", "hidden_size"]


def case_header_past_end(good: Path):
    st = good / "model.safetensors"
    raw = st.read_bytes()
    st.write_bytes(struct.pack("<Q", len(raw) * 2) + raw[8:])
    return good, ["model.safetensors", "header length", "past the end"]


def case_data_past_end(good: Path):
    st = good / "model.safetensors"
    raw = st.read_bytes()
    st.write_bytes(raw[: len(raw) - 100])
    return good, ["model.safetensors", "truncated"]


def case_missing_tensor(good: Path):
    name = "model.layers.1.self_attn.k_proj.weight"
    _rewrite_header(good / "model.safetensors", lambda h: h.pop(name))
    return good, [good.name, name, "missing"]


def case_wrong_shape(good: Path):
    name = "model.layers.0.block_sparse_moe.experts.2.w2.weight"

    def edit(h):
        rows, cols = h[name]["shape"]
        h[name]["shape"] = [cols, rows]   # same bytes, transposed shape: only the shape check catches it

    _rewrite_header(good / "model.safetensors", edit)
    return good, ["model.safetensors", name, "shape"]


def case_no_weights(good: Path):
    (good / "model.safetensors").unlink()
    return good, ["no *.safetensors"]


CASES = {f.__name__[5:]: f for f in (case_missing_folder, case_broken_config, case_unknown_model_type,
                                      case_missing_field, case_header_past_end, case_data_past_end,
                                      case_missing_tensor, case_wrong_shape, case_no_weights)}


@pytest.mark.parametrize("case", list(CASES))
def test_load_raises_engine_error_naming_the_culprit(good, case):
    path, words = CASES[case](good)
    with pytest.raises(EngineError) as info:
        engine.load(path)
    msg = str(info.value)
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"


@pytest.mark.parametrize("case", ["broken_config", "header_past_end", "wrong_shape", "missing_tensor"])
def test_cli_prints_one_line_and_exits_2(good, case):
    path, words = CASES[case](good)
    r = subprocess.run([sys.executable, "-m", "mer_tui", "generate", "--model", str(path), "--prompt", "hi"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mer-tui: error:"), r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert words[-1] in lines[0]


@pytest.mark.parametrize("options, word", [
    (dict(quant="q3_x"), "quant"), (dict(io="floppy"), "io"), (dict(policy="random"), "policy"),
    (dict(ram_cache="lots"), "ram_cache"), (dict(threads=0), "threads"), (dict(kv_cache="q8_0"), "kv_cache"),
])
def test_bad_options_are_named(checkpoint_dir, options, word):
    with pytest.raises(EngineError, match=word):
        engine.load(checkpoint_dir("mixtral"), **options)


def test_bad_requests_are_named(checkpoint_dir):
    model = engine.load(checkpoint_dir("mixtral"))
    with pytest.raises(EngineError, match="outside the vocabulary"):
        model.forward([1, 10_000])
    with pytest.raises(EngineError, match="non-empty"):
        model.forward([])
    with pytest.raises(EngineError, match="temperature"):
        model.generate([1, 2], temperature=-1)
    with pytest.raises(EngineError, match="top_p"):
        model.generate([1, 2], temperature=1.0, top_p=1.5)


def test_cli_bad_option_value_exits_2():
    r = subprocess.run([sys.executable, "-m", "mer_tui", "generate", "--model", "x", "--prompt", "hi",
                        "--max-new-tokens", "many"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
