"""The demo model's corpus generator (training/corpus.py): seeded, well-formed, and truthful."""
from __future__ import annotations

import random
import re

import pytest

from training.corpus import (
    CHAT_TEMPLATE,
    END,
    FACT_WORDS,
    KINDS,
    SPECIAL_TOKENS,
    make_dialogues,
    make_qa,
    make_question,
    make_story,
    names_fact,
    render,
    sentences,
)


def test_same_seed_same_corpus_and_other_seed_differs():
    assert make_dialogues(7, 200) == make_dialogues(7, 200)
    assert make_dialogues(7, 200) != make_dialogues(8, 200)
    a, b = random.Random(3), random.Random(3)
    assert [make_qa(a) for _ in range(20)] == [make_qa(b) for _ in range(20)]


def test_every_assistant_turn_ends_with_end_of_turn():
    for d in make_dialogues(11, 500):
        text = render(d)
        turns = text.split("<|assistant|>\n")[1:]
        assert len(turns) == sum(m["role"] == "assistant" for m in d) >= 1
        for t in turns:
            reply = t.split(END)[0]
            assert t.startswith(reply + END) and reply.strip(), t
        # the dialogue's text never spells a special token itself
        for m in d:
            assert not any(s in m["content"] for s in SPECIAL_TOKENS)
        assert d[-1]["role"] == "assistant"


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def test_a_story_states_its_facts():
    rng = random.Random(5)
    for _ in range(300):
        s = make_story(rng)
        words = _words(s.text)
        for kind in KINDS:
            assert s.fact(kind).lower() in words, (kind, s)
        assert len(s.sentences) >= 4
        assert all(x[0].isupper() and x[-1] == "." for x in s.sentences), s.sentences


def test_pinned_facts_are_kept():
    rng = random.Random(1)
    s = make_story(rng, name="Mia", animal="owl", place="zoo")
    assert (s.name, s.animal, s.place, s.girl) == ("Mia", "owl", "zoo", True)
    assert "an owl" in s.text


def test_answers_name_the_asked_fact_and_only_it():
    rng = random.Random(9)
    for _ in range(300):
        s = make_story(rng)
        for kind in KINDS:
            q, a = make_question(rng, s, kind)
            assert q.endswith("?") and a.endswith(".")
            assert names_fact(a, s.fact(kind), kind), (kind, q, a)


def test_make_qa_expected_word_is_in_the_story():
    rng = random.Random(21)
    seen = set()
    for _ in range(200):
        user, word, kind = make_qa(rng)
        assert kind in ("place", "colour", "animal", "feeling")
        assert word in FACT_WORDS[kind]
        assert word.lower() in _words(user)
        seen.add(kind)
    assert len(seen) == 4


def test_names_fact_matches_whole_words_only():
    assert names_fact("Tom went to the park.", "park", "place")
    assert not names_fact("Tom went to the park and the zoo.", "park", "place")
    assert not names_fact("Tom felt scared.", "red", "colour")
    assert names_fact("Tom felt scared.", "scared", "feeling")
    assert sentences("One. Two! Three? four") == ["One.", "Two!", "Three?"]


def test_chat_template_renders_like_render():
    sandbox = pytest.importorskip("jinja2.sandbox")
    # the settings transformers and our engine use for chat templates
    env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    tpl = env.from_string(CHAT_TEMPLATE)
    for d in make_dialogues(3, 50):
        assert tpl.render(messages=d, add_generation_prompt=False) == render(d)
        head = d[: next(i for i, m in enumerate(d) if m["role"] == "user") + 1]
        assert tpl.render(messages=head, add_generation_prompt=True) == render(head, True)
        assert render(head, True).endswith("<|assistant|>\n")


def test_corpus_is_several_million_tokens_by_default():
    # ~3.3 characters per token with the demo's 512-token BPE: the default 100k dialogues are
    # well over 10M characters, i.e. several million tokens (the training log prints the count).
    d = make_dialogues(0, 1000)
    chars = sum(len(render(x)) for x in d)
    assert chars * 100 > 30e6
