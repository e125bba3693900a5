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
