"""Sampling: seeded reproducibility and each filter's effect on the distribution."""
from __future__ import annotations

import numpy as np
import pytest

import engine
from engine.sampling import Sampler

LOGITS = np.log(np.array([0.5, 0.2, 0.15, 0.1, 0.05]))


def _freq(sampler: Sampler, n: int = 4000, history=()) -> np.ndarray:
    draws = [sampler.sample(LOGITS, history) for _ in range(n)]
    return np.bincount(draws, minlength=LOGITS.size) / n


def test_greedy_is_argmax():
    assert Sampler(temperature=0).sample(LOGITS, []) == 0


def test_plain_sampling_follows_softmax():
    np.testing.assert_allclose(_freq(Sampler(temperature=1.0, seed=1)), np.exp(LOGITS), atol=0.03)


def test_top_k_top_p_min_p_cut_the_tail():
    assert set(np.nonzero(_freq(Sampler(temperature=1.0, top_k=2, seed=1)))[0]) == {0, 1}
    assert set(np.nonzero(_freq(Sampler(temperature=1.0, top_p=0.6, seed=1)))[0]) == {0, 1}
    assert set(np.nonzero(_freq(Sampler(temperature=1.0, min_p=0.25, seed=1)))[0]) == {0, 1, 2}
    f = _freq(Sampler(temperature=1.0, top_k=3, seed=2))
    np.testing.assert_allclose(f[:3], np.array([0.5, 0.2, 0.15]) / 0.85, atol=0.03)


def test_temperature_sharpens():
    assert _freq(Sampler(temperature=0.3, seed=1))[0] > 0.85


def test_repetition_penalty_demotes_seen_tokens():
    f = _freq(Sampler(temperature=1.0, repetition_penalty=3.0, seed=1), history=[0])
    assert f[0] < 0.3
    assert Sampler(temperature=0, repetition_penalty=100.0).sample(LOGITS, [0]) == 1


def test_seeded_generation_is_reproducible(checkpoint_dir):
    model = engine.load(checkpoint_dir("olmoe"))
    kw = dict(max_new_tokens=10, temperature=1.2, top_k=20, top_p=0.95, seed=1234)
    a = list(model.generate([1, 2, 3], **kw))
    b = list(model.generate([1, 2, 3], **kw))
    c = list(model.generate([1, 2, 3], **{**kw, "seed": 99}))
    assert a == b and a != c


@pytest.mark.parametrize("kw", [dict(temperature=-0.1), dict(top_k=0), dict(top_p=0), dict(min_p=2),
                                dict(repetition_penalty=0)])
def test_bad_settings_are_rejected(kw):
    with pytest.raises(engine.EngineError, match=next(iter(kw))):
        Sampler(**kw)


def test_cancel_ends_generation_between_tokens_and_before_prefill(checkpoint_dir):
    import threading

    model = engine.load(checkpoint_dir("mixtral"))
    cancel = threading.Event()
    got = []
    for tok in model.generate([1, 2, 3], max_new_tokens=20, ignore_eos=True, cancel=cancel):
        got.append(tok)
        if len(got) == 3:
            cancel.set()
    assert len(got) == 3
    assert list(model.generate([1, 2, 3], max_new_tokens=20, cancel=cancel)) == []


def test_forced_tokens_are_decoded_as_if_they_had_been_sampled(checkpoint_dir, monkeypatch):
    # Teacher forcing: the forced continuation comes out as given, and each decode step runs on the
    # token forced before it, as it would on a sampled one.
    model = engine.load(checkpoint_dir("olmoe"))
    prompt, forced = [1, 2, 3], [7, 11, 5, 9]
    fed = []
    real_step = model._step

    def step(ids, cache, last_only, **kw):
        fed.append(ids.tolist())
        return real_step(ids, cache, last_only, **kw)

    monkeypatch.setattr(model, "_step", step)
    assert list(model.generate(prompt, max_new_tokens=10, forced=forced)) == forced
    assert fed == [prompt, [7], [11], [5]]          # the last token is emitted, never stepped on
    fed.clear()
    assert list(model.generate(prompt, max_new_tokens=2, forced=forced)) == forced[:2]
    assert fed == [prompt, [7]]
    with pytest.raises(engine.EngineError, match="outside the vocabulary"):
        list(model.generate(prompt, max_new_tokens=2, forced=[10**9]))
