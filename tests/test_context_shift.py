"""A context that shifts (llama.cpp's context shift): a prompt that leaves out a middle part of the context
keeps what follows it too, those keys moved up and rotated to their new positions."""
from __future__ import annotations

import numpy as np
import pytest

import engine
import kernels
from engine.context import SHIFT_MIN_MATCH, _matched_span
from engine.kv_cache import KVCache
from tests.checkpoints import build_checkpoint

P = [3, 17, 42, 5]                                         # the beginning every turn keeps (a system prompt)
D = [60, 61, 62, 63, 64, 65, 66, 67, 68, 69]               # the oldest turns, left out
K = [11, 23, 7, 50, 12, 31, 44, 19, 27, 8, 33, 14]         # the later turns, kept
X = [81, 82, 83]                                           # the new message


@pytest.mark.parametrize("fmt", ["f32", "f16", "q8_0"])
def test_removing_tokens_moves_the_later_ones_up(fmt):
    rng = np.random.default_rng(0)
    cache = KVCache(layers=2, kv_heads=2, head_dim=32, capacity=16, fmt=fmt)
    for layer in range(2):
        cache.append(layer, rng.standard_normal((12, 2, 32)).astype(np.float32),
                     rng.standard_normal((12, 2, 32)).astype(np.float32))
    cache.advance(12)
    before = [(k.copy(), v.copy()) for k, v in zip(cache.k, cache.v)]
    turned = []
    cache.remove(3, 4, lambda keys: (turned.append(keys.shape), keys)[1])   # no rotation: the rows as they were
    assert cache.length == 8 and turned == [(2, 5, 32)] * 2               # only the five rows after move
    for (k0, v0), k, v in zip(before, cache.k, cache.v):
        for old, new in ((k0, k), (v0, v)):
            np.testing.assert_array_equal(new[:, :3], old[:, :3])
            np.testing.assert_array_equal(new[:, 3:8], old[:, 7:12])   # q8_0's blocks quantize back to themselves
    cache.remove(8, 0, None)   # nothing to take out
    with pytest.raises(ValueError, match="outside"):
        cache.remove(6, 3, lambda keys: keys)


def test_the_span_the_prompt_goes_on_with_is_the_longest():
    held = P + D + K + [90]
    assert _matched_span(held, P + K + X, len(P)) == (len(D), len(K))
    # the prompt's continuation found twice: the longer match wins
    held = P + K[:SHIFT_MIN_MATCH] + [99] + D + K
    assert _matched_span(held, P + K + X, len(P)) == (SHIFT_MIN_MATCH + 1 + len(D), len(K))
    # fewer than SHIFT_MIN_MATCH tokens in common: nothing worth moving
    assert _matched_span(P + D + K[:SHIFT_MIN_MATCH - 1], P + K + X, len(P)) == (0, 0)
    assert _matched_span(P + D, P + X, len(P)) == (0, 0)


@pytest.mark.parametrize("variant", ["mixtral", "llama"])   # llama: llama3's scaled frequencies
@pytest.mark.parametrize("kv", ["f32", "f16"])
def test_in_one_layer_the_shifted_keys_are_the_ones_a_fresh_prompt_computes(tmp_path, variant, kv):
    # With one layer a token's key and value depend on the token and its position alone, so the kept keys,
    # moved up and rotated back, are those the shorter prompt computes afresh, and so is the reply.
    folder = build_checkpoint(variant, tmp_path, num_hidden_layers=1)
    model, fresh = engine.load(folder, kv_cache=kv), engine.load(folder, kv_cache=kv)
    ctx = model.new_context(shift=True)
    list(model.generate(P + D + K, max_new_tokens=1, context=ctx))
    assert ctx.ids == P + D + K
    prompt, ref = P + K + X, fresh.new_context()
    want = list(fresh.generate(prompt, max_new_tokens=6, ignore_eos=True, context=ref))
    got = list(model.generate(prompt, max_new_tokens=6, ignore_eos=True, context=ctx))
    assert ctx.kept == len(P + K) and ctx.shifted == len(D) and ctx.ids == ref.ids
    assert got == want
    n = len(ctx.ids)
    for a, b in zip(ctx.cache.k + ctx.cache.v, ref.cache.k + ref.cache.v):
        a, b = kernels.widen(a[:, :n]).copy(), kernels.widen(b[:, :n])
        # float32 rotations; float16 rows rounded once more after theirs
        tol = (1e-5 if kv == "f32" else 2e-3) * np.abs(b).max()
        np.testing.assert_allclose(a, b, rtol=0, atol=tol)


def test_a_shift_keeps_the_later_turns_where_a_plain_context_computes_them_again(checkpoint_dir):
    folder = checkpoint_dir("qwen3")
    model, fresh = engine.load(folder), engine.load(folder)
    ctx = model.new_context(shift=True)
    list(model.generate(P + D + K, max_new_tokens=1, context=ctx))
    reply = list(model.generate(P + K + X, max_new_tokens=4, ignore_eos=True, context=ctx))
    assert ctx.kept == len(P + K) and ctx.shifted == len(D) and ctx.ids == P + K + X + reply[:-1]
    ref = fresh.new_context()
    list(fresh.generate(P + K + X, max_new_tokens=1, context=ref))
    n = len(P + K)
    # layer 0's keys and values of the kept tokens are a fresh prompt's; the next layers' saw the left-out turns
    k0, r0 = kernels.widen(ctx.cache.k[0][:, :n]).copy(), kernels.widen(ref.cache.k[0][:, :n])
    np.testing.assert_allclose(k0, r0, rtol=0, atol=2e-3 * np.abs(r0).max())
    v1, r1 = kernels.widen(ctx.cache.v[1][:, len(P):n]).copy(), kernels.widen(ref.cache.v[1][:, len(P):n])
    assert np.abs(v1 - r1).max() > 1e-2 * np.abs(r1).max()
    # the turn after keeps all of it, as without a shift
    again = P + K + X + reply + [70, 71]
    list(model.generate(again, max_new_tokens=1, context=ctx))
    assert ctx.kept == len(again) - 3 and ctx.shifted == 0
    # without shift the same prompts keep only the beginning
    plain = fresh.new_context()
    list(fresh.generate(P + D + K, max_new_tokens=1, context=plain))
    list(fresh.generate(P + K + X, max_new_tokens=1, context=plain))
    assert plain.kept == len(P) and plain.shifted == 0


def test_keep_leaves_ids_that_name_what_the_cache_holds(checkpoint_dir):
    model = engine.load(checkpoint_dir("qwen3"))
    ctx = model.new_context(shift=True)
    list(model.generate(P + D + K, max_new_tokens=1, context=ctx))
    assert ctx.keep(P + K + X, model._rotation) == len(P + K)
    assert ctx.ids == P + K and ctx.cache.length == len(P + K) and ctx.shifted == len(D)
    # a prompt that is all kept but its last token (computed again for its logits)
    assert ctx.keep(P + K, model._rotation) == len(P + K) - 1 and ctx.ids == P + K[:-1] and ctx.shifted == 0
