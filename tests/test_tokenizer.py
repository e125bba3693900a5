"""Tokenizer, chat template and streaming detokenization against transformers' own tokenizer."""
from __future__ import annotations

import pytest

import engine
from engine import EngineError, Tokenizer

TEXTS = ["the cat sat on the mat", "héllo wörld — ünïcode", "日本語のテキスト and 🙂 emoji", ""]


def test_encode_decode_match_transformers(chat_model_dir):
    from transformers import PreTrainedTokenizerFast

    ref = PreTrainedTokenizerFast(tokenizer_file=str(chat_model_dir / "tokenizer.json"))
    ours = Tokenizer(chat_model_dir)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref.encode(text)
        assert ours.decode(ids) == text


def test_chat_template_matches_transformers(chat_model_dir):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(chat_model_dir)
    ours = Tokenizer(chat_model_dir)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "a dog?"}]
    for gen in (True, False):
        text = ours.apply_chat_template(messages, add_generation_prompt=gen)
        assert text == ref.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
    assert ours.encode_chat(messages) == ref.apply_chat_template(messages, add_generation_prompt=True,
                                                                tokenize=True, return_dict=False)


def _with_template(tmp_path, src, template: str) -> Tokenizer:
    import json
    import shutil

    d = tmp_path / "m"
    shutil.copytree(src, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return Tokenizer(d)


def test_template_is_sandboxed(tmp_path, chat_model_dir):
    tok = _with_template(tmp_path, chat_model_dir, "{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(EngineError, match="chat_template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_raise_exception_in_template_is_an_engine_error(tmp_path, chat_model_dir):
    tok = _with_template(tmp_path, chat_model_dir, "{{ raise_exception('roles must alternate') }}")
    with pytest.raises(EngineError, match="roles must alternate"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_stream_never_splits_a_character(chat_model_dir):
    tok = Tokenizer(chat_model_dir)
    text = "日本語のテキスト and 🙂 — héllo"
    ids = tok.encode(text)
    stream = tok.stream()
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    # multi-byte characters arrive split over several byte-level tokens, so some pushes hold back
    assert any(p == "" for p in pieces[:-1])


def test_stream_cuts_at_stop_string_and_holds_back_prefixes(chat_model_dir):
    tok = Tokenizer(chat_model_dir)
    ids = tok.encode("the cat sat STOP on the mat")
    stream = tok.stream(stop=["STOP"])
    out = ""
    for i in ids:
        out += stream.push(i)
        assert "S" not in out or out.endswith("sat ") is False
    out += stream.flush()
    assert out == "the cat sat "
    assert stream.stopped


def test_generate_stops_at_eos_and_stop_strings(chat_model_dir):
    from dataclasses import replace

    model = engine.load(chat_model_dir)
    assert model.tokenizer.eos_id in model.spec.eos_token_ids
    prompt = model.tokenizer.encode_chat([{"role": "user", "content": "hi"}])
    model.spec = replace(model.spec, eos_token_ids=())
    free = list(model.generate(prompt, max_new_tokens=12, temperature=0.0))
    assert len(free) == 12

    # Declare the 5th token an eos id: generation ends just before its first occurrence, unyielded.
    model.spec = replace(model.spec, eos_token_ids=(free[4],))
    assert list(model.generate(prompt, max_new_tokens=12)) == free[: free.index(free[4])]

    model.spec = replace(model.spec, eos_token_ids=())
    stop = next(model.tokenizer.decode([t]) for t in free[3:] if model.tokenizer.decode([t]).strip())
    cut = list(model.generate(prompt, max_new_tokens=12, stop=[stop]))
    assert cut == free[: len(cut)] and len(cut) < 12
    assert stop in model.tokenizer.decode(cut) and stop not in model.tokenizer.decode(cut[:-1])
