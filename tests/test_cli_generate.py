"""`mer-tui generate` end to end, in a subprocess as a user runs it."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

import engine


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mer_tui", "generate", *args],
                          capture_output=True, text=True, timeout=120)


def test_generate_prints_the_models_text(chat_model_dir):
    r = _run("--model", str(chat_model_dir), "--prompt", "the cat", "--max-new-tokens", "8")
    assert r.returncode == 0, r.stderr
    model = engine.load(chat_model_dir)
    ids = list(model.generate(model.tokenizer.encode("the cat"), max_new_tokens=8))
    assert r.stdout == model.tokenizer.decode(ids) + "\n"
    assert r.stdout.strip()


def test_generate_ends_with_its_timings_on_stderr(chat_model_dir):
    # As llama.cpp does: after the text (stdout, left as it was), one line of speeds and of what the
    # expert cache did.
    r = _run("--model", str(chat_model_dir), "--prompt", "the cat", "--max-new-tokens", "8", "--ram-cache", "64KiB")
    assert r.returncode == 0, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"mer-tui: prompt \d+ tokens, [\d.]+ tok/s · first token after [\d.]+ s · reply 8 tokens, "
                        r"[\d.]+ tok/s · RAM cache [\d.]+% hits, [\d.]+ [KMG]?i?B read \(\w+( O_DIRECT)?\) · "
                        r"loaded in [\d.]+ s", line), line
    r = _run("--model", str(chat_model_dir), "--prompt", "the cat", "--max-new-tokens", "8")
    assert "experts held in RAM" in r.stderr.strip().splitlines()[-1]
    r = _run("--model", str(chat_model_dir), "--prompt", "the cat", "--max-new-tokens", "0")
    line = r.stderr.strip().splitlines()[-1]
    assert "reply 0 tokens" in line and "first token" not in line     # no token: no time to it


def test_generate_json_chat(chat_model_dir):
    r = _run("--model", str(chat_model_dir), "--prompt", "hello", "--chat", "--json", "--max-new-tokens", "6",
             "--temperature", "0.8", "--seed", "7")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    model = engine.load(chat_model_dir)
    prompt = model.tokenizer.encode_chat([{"role": "user", "content": "hello"}])
    assert out["prompt_ids"] == prompt
    assert out["ids"] == list(model.generate(prompt, max_new_tokens=6, temperature=0.8, seed=7))
    assert out["text"] == model.tokenizer.decode(out["ids"])
    assert set(out["timings"]) >= {"ttft_s", "prefill_tokens_per_s", "decode_tokens_per_s", "total_s"}
    assert out["timings"]["total_s"] > 0


def test_generate_needs_a_tokenizer(checkpoint_dir):
    r = _run("--model", str(checkpoint_dir("mixtral")), "--prompt", "x")
    assert r.returncode == 2 and "tokenizer" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("kv, dtype", [("f32", np.float32), ("f16", np.float16)])
def test_kv_cache_option_reaches_the_model(chat_model_dir, kv, dtype):
    from mer_tui.cli import build_parser
    from mer_tui.generate import load_from_args

    args = build_parser().parse_args(["generate", "--model", str(chat_model_dir), "--prompt", "x", "--kv-cache", kv])
    with load_from_args(args) as model:
        ctx = model.new_context()
        list(model.generate([1, 2, 3], max_new_tokens=2, context=ctx))
        assert ctx.cache.k[0].dtype == dtype and ctx.cache.v[-1].dtype == dtype


def test_kv_cache_q8_0_needs_whole_blocks(chat_model_dir):
    r = _run("--model", str(chat_model_dir), "--prompt", "x", "--kv-cache", "q8_0")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].endswith("q8_0 needs a head size that is a multiple of 32, and this "
                                                      "model's is 8")


def test_the_prompt_can_come_from_a_file_or_standard_input(chat_model_dir, tmp_path):
    # as llama.cpp's -f: the file's text, less the newline that ends its last line
    model = engine.load(chat_model_dir)
    text = "the cat sat\non the mat"
    want = json.loads(_run("--model", str(chat_model_dir), "--prompt", text, "--json", "--max-new-tokens", "5").stdout)
    assert want["prompt_ids"] == model.tokenizer.encode(text)
    (tmp_path / "p.txt").write_text(text + "\n", encoding="utf-8")
    r = _run("--model", str(chat_model_dir), "-f", str(tmp_path / "p.txt"), "--json", "--max-new-tokens", "5")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["prompt_ids"] == want["prompt_ids"] and json.loads(r.stdout)["ids"] == want["ids"]
    r = subprocess.run([sys.executable, "-m", "mer_tui", "generate", "--model", str(chat_model_dir), "--file", "-",
                        "--json", "--max-new-tokens", "5"], input=text + "\n", capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["ids"] == want["ids"]


def test_a_prompt_file_that_cannot_be_read_is_named_before_the_model_loads(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("")
    missing_model = str(tmp_path / "no-model")   # never reached: the file is read first
    for path, message in ((tmp_path / "none.txt", f"--file: no such file: {tmp_path / 'none.txt'}"),
                          (tmp_path, f"--file: {tmp_path} is a folder, not a text file"),
                          (tmp_path / "latin1.txt", f"--file: {tmp_path / 'latin1.txt'} is not UTF-8 text (byte 3)")):
        r = _run("--model", missing_model, "-f", str(path))
        assert r.returncode == 2 and r.stderr.strip() == f"mer-tui: error: {message}"
    r = _run("--model", missing_model, "-f", str(tmp_path / "empty.txt"), "--prompt", "x")
    assert r.returncode == 2 and "not allowed with" in r.stderr and "Traceback" not in r.stderr


def test_the_context_bounds_the_prompt_and_the_reply(chat_model_dir):
    model = engine.load(chat_model_dir)
    trained = model.spec.max_position_embeddings
    ids = model.tokenizer.encode("the cat")
    # a reply stops where the context ends, and says so
    r = _run("--model", str(chat_model_dir), "--prompt", "the cat", "--ctx-size", str(len(ids) + 3),
             "--max-new-tokens", "20", "--temperature", "0", "--repetition-penalty", "1.0")
    want = list(model.generate(ids, max_new_tokens=3, repetition_penalty=1.0))
    assert r.returncode == 0 and len(want) == 3, r.stderr
    assert r.stdout == model.tokenizer.decode(want) + "\n"
    assert r.stderr.strip().endswith(f"stopped at the end of the {len(ids) + 3}-token context")
    # a prompt the context cannot hold with a reply is refused before anything runs; past the trained
    # context --ctx-size does not reach
    long = "the cat " * trained
    n = len(model.tokenizer.encode(long))
    for extra in ([], ["--ctx-size", str(10 * trained)]):
        r = _run("--model", str(chat_model_dir), "--prompt", long, *extra)
        assert r.returncode == 2 and r.stdout == ""
        assert r.stderr.strip() == (f"mer-tui: error: --prompt: the prompt is {n} tokens, more than the "
                                    f"{trained}-token context holds with a reply (--ctx-size; the model was "
                                    f"trained for {trained} tokens)")
    r = _run("--model", str(chat_model_dir), "--prompt", "x", "--ctx-size", "1")
    assert r.returncode == 2 and r.stderr.strip() == "mer-tui: error: --ctx-size: must be at least 2, got 1"
