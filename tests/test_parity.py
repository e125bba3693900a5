"""The engine against transformers: logits, greedy tokens, incremental decoding."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import engine
import engine.kv_cache
from tests.checkpoints import VARIANTS, load_reference

IDS = [3, 17, 42, 5, 88, 9, 61, 23, 7, 50, 12, 31]


def _reference_logits(folder, ids):
    ref = load_reference(folder)
    with torch.no_grad():
        return ref(torch.tensor([ids])).logits[0].numpy(), ref


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(checkpoint_dir, variant, dtype):
    folder = checkpoint_dir(variant, dtype)
    ours = engine.load(folder).forward(IDS)
    ref, _ = _reference_logits(folder, IDS)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    err = np.abs(ours - ref).max()
    assert err <= 1e-3 * np.abs(ref).max(), f"{variant}/{dtype}: max|d|={err:.3g}"


@pytest.mark.parametrize("variant", ["mixtral", "qwen2_moe", "qwen3"])
def test_float16_checkpoints_match_transformers(checkpoint_dir, variant):
    folder = checkpoint_dir(variant, "float16")
    model = engine.load(folder)
    assert model.weights.layers[0].q.fmt == "f16"
    ours = model.forward(IDS)
    ref, _ = _reference_logits(folder, IDS)
    assert np.abs(ours - ref).max() <= 1e-3 * np.abs(ref).max()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_tokens_match_transformers(checkpoint_dir, variant):
    folder = checkpoint_dir(variant, "float32")
    model = engine.load(folder)
    ours = list(model.generate(IDS[:5], max_new_tokens=12, temperature=0.0))
    _, ref = _reference_logits(folder, IDS[:1])
    with torch.no_grad():
        out = ref.generate(torch.tensor([IDS[:5]]), max_new_tokens=12, do_sample=False,
                           eos_token_id=None, pad_token_id=0, min_new_tokens=12)
    theirs = out[0, 5:].tolist()
    # We stop at eos without yielding it; random models may hit an eos id, so compare that prefix.
    assert ours == theirs[: len(ours)]
    assert len(ours) == 12 or theirs[len(ours)] in model.spec.eos_token_ids


# Keys and values in float16 round each to 11 significant bits (a relative error up to 2**-11): the logits
# move by 2.5e-4 to 9.6e-4 of their largest on these checkpoints, in float32 by 3e-7 to 7e-7.
KV_ATOL = {"f32": 1e-4, "f16": 3e-3}


@pytest.mark.parametrize("kv", ["f32", "f16"])
@pytest.mark.parametrize("variant", ["mixtral", "mixtral-window", "qwen3_moe", "mistral"])
def test_incremental_decoding_equals_full_recompute(checkpoint_dir, variant, kv):
    model = engine.load(checkpoint_dir(variant), kv_cache=kv)
    ids = np.array(IDS * 3)   # longer than mistral's and mixtral-window's sliding windows
    full = model.forward(ids)
    cache = model._new_cache()
    assert cache.k[0].dtype == np.dtype(np.float16 if kv == "f16" else np.float32)
    steps = [model._step(ids[:4], cache, last_only=False)]
    for t in ids[4:]:
        steps.append(model._step(np.array([t]), cache, last_only=False))
    inc = np.concatenate(steps)
    np.testing.assert_allclose(inc, full, rtol=0, atol=KV_ATOL[kv] * np.abs(full).max())


def test_q8_0_keys_and_values_are_the_rounded_ones(checkpoint_dir, monkeypatch):
    """With --kv-cache q8_0 the keys and values are ggml's q8_0 of them, and a decode computes with exactly
    those: the same logits as float32 keys and values rounded through q8_0 (head size 64, two KV heads).
    How far that rounding moves the logits depends on the model (7% of the largest here: transformers'
    small random init, whose largest logit is 1.1)."""
    import kernels
    from kernels import formats

    folder = checkpoint_dir("quant")
    ids = np.array(IDS * 3)

    def decode(model):
        cache = model._new_cache()
        steps = [model._step(ids[:4], cache, last_only=False)]
        steps += [model._step(np.array([t]), cache, last_only=False) for t in ids[4:]]
        return np.concatenate(steps), cache

    ours, cache = decode(engine.load(folder, kv_cache="q8_0"))
    assert cache.fmt == "q8_0" and cache.k[0].dtype == np.uint8 and cache.k[0].shape[2] == 64 // 32 * 34
    real = kernels.kv_rows

    def rounded(x, fmt):   # float32 rows holding q8_0's values
        q = real(x, "q8_0")
        return formats.dequantize_ref(q.reshape(-1, q.shape[-1]), "q8_0", x.shape[-1]).reshape(x.shape)

    monkeypatch.setattr(kernels, "kv_rows", lambda x, fmt: rounded(x, fmt) if fmt == "f32" else real(x, fmt))
    want, _ = decode(engine.load(folder, kv_cache="f32"))
    np.testing.assert_allclose(ours, want, rtol=0, atol=1e-5 * np.abs(want).max())
    with pytest.raises(engine.EngineError, match="multiple of 32"):
        engine.load(checkpoint_dir("mixtral"), kv_cache="q8_0")   # a head size of 8


def test_sliding_window_changes_the_result(checkpoint_dir):
    """The window is really applied: beyond it, logits differ from full attention."""
    model = engine.load(checkpoint_dir("mixtral-window"))
    ids = IDS * 2
    windowed = model.forward(ids)
    from dataclasses import replace

    model.spec = replace(model.spec, sliding_window=(None,) * model.spec.num_layers)
    full = model.forward(ids)
    assert np.allclose(windowed[:5], full[:5], atol=1e-5)
    assert not np.allclose(windowed[-1], full[-1], atol=1e-3)


def test_generation_is_not_quadratic_in_copies(checkpoint_dir):
    """KV cache capacity doubles: after 300 appended tokens it was grown only a few times."""
    model = engine.load(checkpoint_dir("qwen3"))
    cache = model._new_cache()
    caps = set()
    for t in range(300):
        model._step(np.array([t % 90]), cache, last_only=True)
        caps.add(cache.capacity)
    assert cache.length == 300 and len(caps) <= 2


def test_a_generation_makes_room_for_itself_once(checkpoint_dir, monkeypatch):
    """generate sizes its KV cache for the prompt and every new token at the start: growing it mid-way
    copied every layer's keys and values (1.0 s on an OLMoE-sized model when a decode passed 2048 tokens)."""
    from engine import kv_cache

    if not kv_cache.ROOM_IS_FREE:
        pytest.skip("this numpy cannot map a cache's room lazily, so none is reserved")
    model = engine.load(checkpoint_dir("qwen3"))
    grown = []
    real_grow = kv_cache.KVCache._grow
    monkeypatch.setattr(kv_cache.KVCache, "_grow", lambda self, need: (grown.append(need), real_grow(self, need)))
    out = list(model.generate([t % 90 for t in range(300)], max_new_tokens=40, ignore_eos=True))
    assert len(out) == 40 and grown == []
    model.forward([t % 90 for t in range(600)])
    assert grown == []


def test_reserved_kv_room_is_not_resident():
    """Room for 8192 tokens of OLMoE's shape (2 GiB) holding 10 costs a few MiB of RSS, not the 960 MiB that
    numpy's huge pages made of it: a RAM budget the user gives counts what a cache holds, not its room."""
    psutil = pytest.importorskip("psutil")
    from engine import kv_cache

    if not kv_cache.ROOM_IS_FREE:
        pytest.skip("this numpy cannot map a cache's room lazily")
    proc = psutil.Process()
    before = proc.memory_info().rss
    cache = kv_cache.KVCache(16, 16, 128, capacity=8192)
    for layer in range(16):
        cache.append(layer, np.ones((10, 16, 128), np.float32), np.ones((10, 16, 128), np.float32))
    assert proc.memory_info().rss - before < 64 << 20


def test_attention_shared_out_among_threads_equals_one_thread(checkpoint_dir, monkeypatch):
    """Without the C kernels a prompt's attention over many (query, key) pairs runs its KV heads on the kernel
    threads (kernels.PARALLEL_ATTENTION_PAIRS): each head's products are the same, so the logits are identical."""
    import kernels

    before = kernels.backend()
    kernels.set_backend("numpy")
    try:
        model = engine.load(checkpoint_dir("mixtral"))
        ids = IDS * 3
        monkeypatch.setattr(kernels, "PARALLEL_ATTENTION_PAIRS", 1 << 40)
        serial = model.forward(ids)
        calls = []
        real_map = kernels.map_threads
        monkeypatch.setattr(kernels, "map_threads",
                            lambda fn, items: (calls.append(len(items)), real_map(fn, items))[1])
        monkeypatch.setattr(kernels, "PARALLEL_ATTENTION_PAIRS", 0)
        kernels.set_threads(2)
        try:
            parallel = model.forward(ids)
        finally:
            kernels.set_threads(None)
    finally:
        kernels.set_backend(before)
    assert calls and all(c == 2 for c in calls)
    assert np.array_equal(parallel, serial)


def _prefilled(model, monkeypatch) -> list[int]:
    """The number of tokens each step of `model` computes, as they run: a generation of k new tokens is its
    prompt's step and k - 1 of one token, so its prompt's is sizes[-k] after it."""
    sizes: list[int] = []
    real = model._step
    monkeypatch.setattr(model, "_step", lambda ids, *a, **k: (sizes.append(len(ids)), real(ids, *a, **k))[1])
    return sizes


def test_a_kept_context_computes_only_what_is_new(checkpoint_dir, monkeypatch):
    """A chat's second turn resends the first: with the context kept, only the new tokens are computed,
    and the reply is the one a fresh generation of the whole prompt gives."""
    model = engine.load(checkpoint_dir("qwen3"))
    fresh = engine.load(checkpoint_dir("qwen3"))
    ctx, sizes = model.new_context(), _prefilled(model, monkeypatch)
    turn1 = IDS[:6]
    reply1 = list(model.generate(turn1, max_new_tokens=5, ignore_eos=True, context=ctx))
    # the last token was chosen, never run: the cache holds the prompt and the replies before it
    assert sizes == [6, 1, 1, 1, 1] and ctx.ids == turn1 + reply1[:-1] and ctx.kept == 0
    turn2 = turn1 + reply1 + [5, 9, 11]
    reply2 = list(model.generate(turn2, max_new_tokens=6, ignore_eos=True, context=ctx))
    assert ctx.kept == 10 and sizes[-6] == len(turn2) - 10 == 4
    assert reply2 == list(fresh.generate(turn2, max_new_tokens=6, ignore_eos=True))
    # the same prompt again: everything but its last token is kept
    again = list(model.generate(turn2, max_new_tokens=6, ignore_eos=True, context=ctx))
    assert ctx.kept == len(turn2) - 1 and sizes[-6] == 1 and again == reply2
    # a prompt that parts from the context after 3 tokens keeps 3
    turn3 = turn1[:3] + [70, 71, 72, 73]
    reply3 = list(model.generate(turn3, max_new_tokens=6, ignore_eos=True, context=ctx))
    assert ctx.kept == 3 and sizes[-6] == 4
    assert reply3 == list(fresh.generate(turn3, max_new_tokens=6, ignore_eos=True))
    ctx.clear()
    assert len(ctx) == ctx.cache.length == 0   # the ids always name what the cache holds
    list(model.generate(turn3, max_new_tokens=1, context=ctx))
    assert ctx.kept == 0 and sizes[-1] == len(turn3)


def test_a_context_left_mid_reply_holds_what_was_computed(checkpoint_dir):
    """A reply stopped after two tokens (a closed generator) leaves the prompt and the first of them, whose
    step ran; a prompt stopped between two of its chunks leaves the cache as it was before it (a prompt runs
    layer by layer, and its tokens count only once the last layer has them).  The next turn then agrees with
    a fresh generation."""
    from engine import model as model_mod

    m = engine.load(checkpoint_dir("qwen3"))
    fresh = engine.load(checkpoint_dir("qwen3"))
    ctx = m.new_context()
    gen = m.generate(IDS, max_new_tokens=20, ignore_eos=True, context=ctx)
    got = [next(gen), next(gen)]
    gen.close()
    assert ctx.ids == IDS + got[:1] and ctx.cache.length == len(IDS) + 1
    cancel = threading.Event()
    real_attention = m._attention

    def attention_then_cancel(*args):
        cancel.set()       # stop after the first chunk of the first layer
        return real_attention(*args)

    m._attention = attention_then_cancel
    old_chunk, model_mod.PREFILL_CHUNK = model_mod.PREFILL_CHUNK, 4
    try:
        assert list(m.generate(IDS + got + IDS, max_new_tokens=3, context=ctx, cancel=cancel)) == []
    finally:
        model_mod.PREFILL_CHUNK = old_chunk
        del m._attention
    assert ctx.ids == IDS + got[:1] and ctx.cache.length == len(IDS) + 1
    prompt = IDS + got + IDS[:3] + [70]
    assert list(m.generate(prompt, max_new_tokens=5, ignore_eos=True, context=ctx)) == \
        list(fresh.generate(prompt, max_new_tokens=5, ignore_eos=True))
    assert ctx.kept == len(IDS) + 1


def test_a_context_serves_only_its_model(checkpoint_dir):
    a, b = engine.load(checkpoint_dir("qwen3")), engine.load(checkpoint_dir("qwen3"))
    with pytest.raises(engine.EngineError, match="another model"):
        b.generate(IDS, context=a.new_context())


@pytest.mark.parametrize("variant", ["mixtral-window", "qwen2_moe", "olmoe"])
def test_a_prompt_in_many_chunks_matches_transformers(checkpoint_dir, variant, monkeypatch):
    """A prompt runs layer by layer, each layer over all its chunks before the next: with chunks of 5 rows, 36
    tokens (longer than mixtral-window's window) give transformers' logits, and the experts are asked for a
    layer at a time, each layer once a chunk."""
    from engine import model as model_mod

    folder = checkpoint_dir(variant)
    ids = IDS * 3
    ref, _ = _reference_logits(folder, ids)
    model = engine.load(folder)
    asked = []
    real_request = model.experts.request
    monkeypatch.setattr(model.experts, "request", lambda layer, picked: (asked.append(layer),
                                                                         real_request(layer, picked))[1])
    monkeypatch.setattr(model_mod, "PREFILL_CHUNK", 5)
    ours = model.forward(ids)
    assert np.abs(ours - ref).max() <= 1e-3 * np.abs(ref).max()
    chunks = -(-len(ids) // 5)
    assert asked == [layer for layer in model.moe_layer_ids for _ in range(chunks)]
    # a cache with room for 4 grows before the first chunk, not under a later one (chunks write past its length)
    s = model.spec
    small = engine.kv_cache.KVCache(s.num_layers, s.num_kv_heads, s.head_dim, capacity=4, fmt="f32")
    np.testing.assert_allclose(model._step(np.array(ids), small, last_only=False), ours, rtol=0,
                               atol=1e-5 * np.abs(ours).max())
