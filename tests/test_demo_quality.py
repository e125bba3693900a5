"""The shipped demo model (assets/demo): a plain Mixtral checkpoint that answers questions about a
story and tells one, decoded greedily through our engine on questions training never saw."""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest

from training.corpus import END, make_qa, names_fact, render, sentences, vocabulary

DEMO = Path(__file__).resolve().parent.parent / "assets" / "demo"
# Far from the small seeds training uses (train_demo --seed 0), so these stories are unseen.
UNSEEN_SEED = 1_000_003
KINDS = ("place", "colour", "animal", "feeling")

pytestmark = pytest.mark.skipif(not (DEMO / "config.json").exists(), reason="assets/demo not built")


@pytest.fixture(scope="module")
def demo():
    engine = pytest.importorskip("engine")
    return engine.load(DEMO)


def _reply(model, messages: list[dict[str, str]], max_new: int) -> tuple[str, bool]:
    tok = model.tokenizer
    ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))
    out = list(model.generate(ids, max_new_tokens=max_new, temperature=0.0))
    # generate stops at eos without yielding it: fewer than max_new tokens means it met eos
    return tok.decode(out), len(out) < max_new


def test_checkpoint_is_plain_hf_mixtral_with_per_expert_tensors():
    from safetensors import safe_open

    cfg = json.loads((DEMO / "config.json").read_text())
    assert cfg["model_type"] == "mixtral" and cfg["architectures"] == ["MixtralForCausalLM"]
    vocab = json.loads((DEMO / "tokenizer.json").read_text())["added_tokens"]
    end_id = next(t["id"] for t in vocab if t["content"] == END)
    assert cfg["eos_token_id"] == end_id
    tcfg = json.loads((DEMO / "tokenizer_config.json").read_text())
    assert tcfg["eos_token"] == END and "add_generation_prompt" in tcfg["chat_template"]
    assert json.loads((DEMO / "generation_config.json").read_text())["eos_token_id"] == end_id
    with safe_open(str(DEMO / "model.safetensors"), "np") as f:
        keys = set(f.keys())
    for layer in range(cfg["num_hidden_layers"]):
        assert f"model.layers.{layer}.block_sparse_moe.gate.weight" in keys
        for e in range(cfg["num_local_experts"]):
            for w in ("w1", "w2", "w3"):
                assert f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight" in keys
    raw = (DEMO / "model.safetensors").read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    size = sum(p.stat().st_size for p in DEMO.iterdir() if p.is_file())
    assert size < 8_000_000, size


def test_chat_template_is_the_one_trained_on(demo):
    msgs = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Tell me a story."}]
    assert demo.tokenizer.apply_chat_template(msgs, add_generation_prompt=True) == render(msgs, True)


def test_engine_logits_match_transformers(demo):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32).eval()
    ids = demo.tokenizer.encode(render([{"role": "user", "content": "Tell me a story."}], True))
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0].numpy()
    got = demo.forward(ids)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-3 * np.abs(want).max())
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.95


def test_answers_questions_about_an_unseen_story(demo):
    rng = random.Random(UNSEEN_SEED)
    questions = [make_qa(rng, KINDS[i % 4]) for i in range(100)]
    right = {k: 0 for k in KINDS}
    misses = []
    for user, word, kind in questions:
        reply, _ = _reply(demo, [{"role": "user", "content": user}], 14)
        if names_fact(reply, word, kind):
            right[kind] += 1
        else:
            misses.append((user.rsplit(".", 1)[-1].strip(), word, reply))
    total = sum(right.values())
    assert total >= 80, f"{total}/100 right ({right}); e.g. {misses[:5]}"


def test_tells_a_grammatical_story_that_ends_its_turn(demo):
    reply, stopped = _reply(demo, [{"role": "user", "content": "Tell me a story."}], 160)
    assert stopped, f"no end-of-turn token within 160 tokens: {reply!r}"
    sents = sentences(reply)
    assert len(sents) >= 3, reply
    assert all(s[0].isupper() for s in sents), reply
    # every word is one the corpus uses: no made-up words or broken spellings
    unknown = set(re.findall(r"[a-z']+", reply.lower())) - vocabulary()
    assert not unknown, (unknown, reply)
