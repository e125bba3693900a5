"""The forward pass: one code path for every architecture, steered by the ModelSpec."""
from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence

import numpy as np

import kernels

from . import kv_cache
from .context import Context
from .errors import EngineError
from .experts import ExpertBundle, ExpertSource
from .kv_cache import KVCache
from .rope import Rope
from .sampling import Sampler
from .spec import ModelSpec
from .telemetry import Telemetry
from .weights import ResidentWeights


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    # einsum's sum of squares: 10-13 us for a (1, 2048) row against 15-34 for np.mean(np.square(x)) on the
    # work VM, and a decode step takes ~5 norms a layer
    var = np.einsum("...i,...i->...", x, x)[..., None] * np.float32(1.0 / x.shape[-1])
    return (x / np.sqrt(var + np.float32(eps))) * w


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# Prompts run in chunks so attention scores stay (heads x CHUNK x T), not (heads x T x T) (Model._step).
PREFILL_CHUNK = 256

# Decoding guesses this many MoE layers ahead (Model._prefetch).  Two against one, over the 2 GiB limit on
# the OLMoE-sized model: see docs/BENCHMARKS.md.
PREFETCH_AHEAD = 2


class Model:
    """A loaded model.  forward/generate may be called from one thread at a time (a lock enforces it);
    telemetry() and the settings methods may be called from any thread at any time."""

    def __init__(self, spec: ModelSpec, weights: ResidentWeights, experts: ExpertSource | None,
                 tokenizer=None, path: str = "", prefetch: bool = True, quant: str | None = None,
                 kv_cache: str | None = None):
        self.spec = spec
        self.weights = weights
        self.experts = experts
        self.tokenizer = tokenizer
        self.path = path
        self.quant = quant
        self.kv_cache = kv_cache   # "f16", "f32", "q8_0" or None: the kernels' choice (kernels.kv_format)
        self.prefetch_enabled = prefetch
        self.rope = Rope(spec)
        self.scale = spec.head_dim ** -0.5
        self.moe_layer_ids = [i for i in range(spec.num_layers) if spec.moe_layers[i]]
        self._next_moe = {a: b for a, b in zip(self.moe_layer_ids, self.moe_layer_ids[1:])}
        self._telemetry = Telemetry(spec.num_layers, spec.num_experts)
        self._run_lock = threading.Lock()
        self._kv: weakref.ref[KVCache] | None = None   # the cache a generation last ran on, while it lives
        self._guess_routers: dict[int, np.ndarray] = {}   # float32, the norm's weights folded in (_rank_experts)

    # ----------------------------------------------------------------- layers
    def _attention(self, i: int, x: np.ndarray, cache: KVCache, cos: np.ndarray, sin: np.ndarray,
                   start: int) -> np.ndarray:
        """Layer i's attention for rows x at positions start.. (their keys and values join the cache there)."""
        s, lw = self.spec, self.weights.layers[i]
        n = x.shape[0]
        h = rms_norm(x, lw.attn_norm, s.rms_norm_eps)
        q, k, v = lw.q.matmul(h), lw.k.matmul(h), lw.v.matmul(h)
        if lw.q_bias is not None:
            q, k, v = q + lw.q_bias, k + lw.k_bias, v + lw.v_bias
        if s.qk_norm == "full":
            q, k = rms_norm(q, lw.q_norm, s.rms_norm_eps), rms_norm(k, lw.k_norm, s.rms_norm_eps)
        if s.clip_qkv is not None:
            q, k, v = (np.clip(t, -s.clip_qkv, s.clip_qkv) for t in (q, k, v))
        q = q.reshape(n, s.num_heads, s.head_dim)
        k = k.reshape(n, s.num_kv_heads, s.head_dim)
        v = v.reshape(n, s.num_kv_heads, s.head_dim)
        if s.qk_norm == "head":
            q, k = rms_norm(q, lw.q_norm, s.rms_norm_eps), rms_norm(k, lw.k_norm, s.rms_norm_eps)
        q, k = Rope.apply(q, cos, sin), Rope.apply(k, cos, sin)
        T = cache.append(i, k, v, start)[0].shape[1]       # keys held: start + n
        group = s.num_heads // s.num_kv_heads
        window = s.sliding_window[i]
        if n == 1:   # a decoded token: every key up to its own, within the window; float16 ones read as they are
            t0 = max(0, start - window + 1) if window else 0
            out = kernels.attend_one(q.reshape(s.num_kv_heads, group, s.head_dim), cache.k[i], cache.v[i],
                                     t0, T, self.scale)
            y = lw.o.matmul(out.reshape(1, s.q_size))
            return y + lw.o_bias if lw.o_bias is not None else y
        out = kernels.attend_prompt(q.reshape(n, s.num_kv_heads, group, s.head_dim), cache.k[i], cache.v[i], start,
                                    window, self.scale)
        out = out.reshape(n, s.q_size)
        y = lw.o.matmul(out)
        return y + lw.o_bias if lw.o_bias is not None else y

    def _moe(self, i: int, h: np.ndarray, residual: np.ndarray, cache: KVCache, ahead: bool = True) -> np.ndarray:
        """Layer i's experts on h (the normalised residual); `residual` and the attention outputs of the
        token before (in `cache`) feed the prefetch of the layers ahead, unless `ahead` is False."""
        s, lw = self.spec, self.weights.layers[i]
        probs = softmax(lw.router.matmul(h).astype(np.float32))
        top = np.argsort(-probs, axis=-1, kind="stable")[:, : s.top_k]
        w = np.take_along_axis(probs, top, axis=-1)
        if s.norm_topk_prob:
            w = w / w.sum(axis=-1, keepdims=True)
        self._telemetry.routed(i, top)
        chosen = np.unique(top)
        if ahead and self.prefetch_enabled and i in self._next_moe and self.experts.wants_hints():
            self._prefetch(i, residual, cache)
        picked = chosen.tolist()
        self.experts.observe_routing(i, probs, picked)
        # The cached experts are computed while the source reads the others; the sums below run in the
        # chosen experts' order whatever came first, so the result does not depend on what was cached.
        t_ask = time.perf_counter()
        pending = self.experts.request(i, picked)
        waited = time.perf_counter() - t_ask
        ys: dict[int, np.ndarray] = {}
        decode = h.shape[0] == 1
        picks = {} if decode else {e: np.nonzero(top == e) for e in picked}   # (rows, slot) of its tokens

        def run(bundles: dict[int, ExpertBundle]) -> None:
            es = [e for e in picked if e in bundles]
            ffns = [(bundles[e].gate, bundles[e].up, bundles[e].down) for e in es]
            # Decode: one token, every chosen expert takes it (no row search: ~0.2 ms a layer of numpy).
            ys.update(zip(es, kernels.experts_ffn(ffns, [h if decode else h[picks[e][0]] for e in es]),
                          strict=True))

        run(pending.ready)
        t_wait = time.perf_counter()
        rest = pending.wait()
        if decode:   # the waits shown are per decoded token; a prompt's step waits once for many tokens
            self._telemetry.waited(i, waited + time.perf_counter() - t_wait)
        run(rest)
        out = np.zeros_like(h)
        if decode:
            for e, slot in zip(picked, np.argsort(top[0], kind="stable").tolist(), strict=True):
                out += w[:, slot:slot + 1] * ys[e]
        else:
            for e in picked:
                rows, slot = picks[e]
                out[rows] += w[rows, slot][:, None] * ys[e]
        return self._shared(lw, h, out)

    def _shared(self, lw, h: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Add the layer's shared expert (Qwen-MoE), if it has one, to the routed experts' `out`."""
        if lw.shared is not None:
            y = kernels.expert_ffn(*lw.shared, h)
            if lw.shared_gate is not None:
                y = y / (1.0 + np.exp(-lw.shared_gate.matmul(h)))
            out += y
        return out

    def _prefetch(self, layer: int, residual: np.ndarray, cache: KVCache) -> None:
        """Guess the experts of the MoE layers after `layer` from the residual stream and start reading them.

        A later layer's router input differs from the residual only by the updates in between: the
        experts' outputs and the attention outputs of the layers up to it.  Decoding, each attention
        output is estimated by the previous token's at that layer (in `cache`): its softmax mixes mostly
        the same values from one token to the next.  On the OLMoE-sized benchmark model that raised the
        guesses' recall of the next layer's picks from 0.73 to 0.92 (0.64 -> 0.90 for the layer after it),
        and on the trained demo from 0.70 to 0.73 (docs/BENCHMARKS.md).  So decoding guesses
        PREFETCH_AHEAD layers ahead, giving the disk a layer more of lead; a prompt's rows (no token
        before each) guess the next layer from the residual alone.  A wrong guess costs a wasted read,
        never a wrong result.
        """
        decode = residual.shape[0] == 1
        hints = []
        x, at = residual, layer
        while len(hints) < (PREFETCH_AHEAD if decode else 1):
            nxt = self._next_moe.get(at)
            if nxt is None:
                break
            if decode:
                before = cache.last_attention[at + 1:nxt + 1]
                if any(a is None for a in before):   # no step yet: nothing to estimate with
                    break
                x = x + sum(before)
            ranked = self._rank_experts(nxt, x)[:, : self.spec.top_k]
            # every row's first choice first, then the second ...: a source that reads only some of the
            # guesses before the layer comes reads the likeliest
            hints.append((nxt, list(dict.fromkeys(ranked.T.ravel().tolist()))))
            at = nxt
        if hints:
            self.experts.prefetch(hints)

    def _rank_experts(self, layer: int, x: np.ndarray) -> np.ndarray:
        """`layer`'s experts for each row of router input `x` (before the layer's norm), likeliest first."""
        # The norm divides each row by a positive number, which leaves the order of its logits as it is:
        # the router with the norm's weights folded in ranks the raw rows alike, in one product instead of
        # a norm and a product (17 vs 50 us a guess on the OLMoE-sized model, two guesses a layer).
        w = self._guess_routers.get(layer)
        if w is None:
            lw = self.weights.layers[layer]
            w = self._guess_routers[layer] = np.ascontiguousarray(lw.router.to_float() * lw.mlp_norm, np.float32)
        return np.argsort(-(x @ w.T), axis=-1, kind="stable")

    def _step(self, ids: np.ndarray, cache: KVCache, last_only: bool,
              cancel: threading.Event | None = None) -> np.ndarray | None:
        """Run `ids` through the model after what `cache` holds; return float32 logits (of the last row
        alone with last_only), or None if `cancel` was set between two chunks (the cache then holds what it
        held before: its length moves only at the end).

        A prompt runs in chunks of PREFILL_CHUNK rows, so attention scores stay (heads x CHUNK x T), and
        layer by layer: every chunk through a layer before the next layer.  A layer's experts are then
        asked for once a chunk in a row, and a cache holding one layer's experts reads each of them once a
        prompt; chunk by chunk through all layers, a prompt over a memory limit read the whole model once
        a chunk (docs/BENCHMARKS.md, "A prompt layer by layer")."""
        s, W = self.spec, self.weights
        start, n = cache.length, len(ids)
        cache.reserve(start + n)   # now: growing copies only what `length` counts, and chunks write past it
        x = W.embed.rows_f32(ids)
        cos, sin = self.rope.tables(np.arange(start, start + n))
        spans = [slice(a, min(a + PREFILL_CHUNK, n)) for a in range(0, n, PREFILL_CHUNK)]
        prompt = n > 1
        if prompt:
            self._telemetry.prompt_started(n, len(W.layers) * len(spans))
        try:
            for i, lw in enumerate(W.layers):
                for sp in spans:
                    if cancel is not None and cancel.is_set():
                        return None
                    xc = x[sp]
                    a = self._attention(i, xc, cache, cos[sp], sin[sp], start + sp.start)
                    xc = xc + a
                    h = rms_norm(xc, lw.mlp_norm, s.rms_norm_eps)
                    # A prompt guesses the next layer's experts from its first chunk alone: the reads then
                    # overlap the layer's other chunks, and later chunks' guesses (nearly every expert
                    # again) only evicted experts those chunks still needed.  2048 tokens over a 300 MiB
                    # cache read 8.2 GB guessing at every chunk, 4.7 at the first, 3.3 at the last; at the
                    # last the reads no longer overlap: 11.8 / 10.8 s against 10.7 / 9.7 at the first,
                    # over 1086 MiB with the disk at 1 GB/s (docs/BENCHMARKS.md, "A prompt layer by layer").
                    x[sp] = xc + (self._moe(i, h, xc, cache, ahead=sp is spans[0]) if s.moe_layers[i]
                                  else kernels.expert_ffn(*lw.dense, h))
                    if prompt:
                        self._telemetry.prompt_advanced()
                cache.last_attention[i] = a[-1:].copy()   # a copy: a chunk's whole output would stay alive
        finally:
            if prompt:
                self._telemetry.prompt_ended()
        cache.advance(n)
        if last_only:
            x = x[-1:]
        return W.lm_head.matmul(rms_norm(x, W.final_norm, s.rms_norm_eps)).astype(np.float32, copy=False)

    def _check_ids(self, ids: Sequence[int]) -> np.ndarray:
        arr = np.asarray(list(ids), dtype=np.int64)
        if arr.ndim != 1 or arr.size == 0:
            raise EngineError("ids: expected a non-empty sequence of token ids")
        bad = arr[(arr < 0) | (arr >= self.spec.vocab_size)]
        if bad.size:
            raise EngineError(f"ids: token id {int(bad[0])} is outside the vocabulary (size {self.spec.vocab_size})")
        return arr

    def _new_cache(self, tokens: int = 0, scratch: bool = False) -> KVCache:
        """A KV cache with room for `tokens` where room costs nothing until written (kv_cache.ROOM_IS_FREE);
        more grows it by doubling, which copies every layer's keys and values: 1.0 s on the OLMoE-sized
        model when a decode passed 2048 tokens (`mer-tui bench --prompt-tokens 2048 --decode-tokens 8`
        decoded at 5 tok/s).  A `scratch` cache, for forward()'s one pass, keeps float32: no token is
        decoded over it, so rounding its keys to float16 would save nothing."""
        s = self.spec
        room = max(256, tokens) if kv_cache.ROOM_IS_FREE else 256
        cache = KVCache(s.num_layers, s.num_kv_heads, s.head_dim, capacity=room,
                        fmt="f32" if scratch else self._kv_format())
        self._kv = weakref.ref(cache)
        return cache

    def _kv_format(self) -> str:
        return self.kv_cache or kernels.kv_format()

    # ----------------------------------------------------------------- public
    def new_context(self, shift: bool = False) -> Context:
        """An empty sequence to pass to successive `generate` calls (a chat's turns): each computes only
        the part of its prompt the one before had not.  With `shift`, a prompt that leaves out a middle
        part of the context (a chat's oldest turns) keeps what follows it too (engine.context)."""
        return Context(self, self._new_cache(), shift)

    def _rotation(self, by: int) -> Callable[[np.ndarray], np.ndarray]:
        """Keys (kv_heads, n, head_dim) rotated `by` positions back: RoPE's angles are position times a fixed
        frequency, so a key at p turns into the one at p - by."""
        cos, sin = self.rope.tables(np.array([-by]))
        return lambda keys: Rope.apply(keys, cos, sin)

    def forward(self, ids: Sequence[int]) -> np.ndarray:
        """float32 logits (len(ids), vocab) for a fresh sequence."""
        arr = self._check_ids(ids)
        with self._run_lock:
            return self._step(arr, self._new_cache(len(arr), scratch=True), last_only=False)

    def generate(self, ids: Sequence[int], max_new_tokens: int = 64, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                 repetition_penalty: float | None = None, seed: int | None = None,
                 stop: Sequence[str] | None = None, ignore_eos: bool = False,
                 cancel: threading.Event | None = None, forced: Sequence[int] | None = None,
                 context: Context | None = None) -> Iterator[int]:
        """Yield new token ids until max_new_tokens, an eos id (not yielded) or a stop string (yielded).

        ignore_eos decodes exactly max_new_tokens tokens (benchmarks).  Setting `cancel` ends the
        generation at the next prompt chunk or token, so a UI can stop even a long prefill.  `forced`
        gives the tokens to emit instead of sampled ones (teacher forcing, at most max_new_tokens of
        them): a benchmark can then make two engines do the same work whatever their logits say.
        With a `context` (new_context()) the generation starts from the keys and values the context
        holds where its tokens begin the prompt, and leaves there those of everything it computed."""
        arr = self._check_ids(ids)
        if context is not None and context.owner is not self:
            raise EngineError("context: it holds another model's keys and values")
        if max_new_tokens < 0:
            raise EngineError(f"max_new_tokens: must be >= 0, got {max_new_tokens}")
        if forced is not None:
            forced = self._check_ids(forced).tolist() if len(forced) else []
            max_new_tokens = min(max_new_tokens, len(forced))
        sampler = Sampler(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                          repetition_penalty=repetition_penalty, seed=seed)
        stops = [st for st in (stop or []) if st]
        if stops and self.tokenizer is None:
            raise EngineError("stop: stop strings need a tokenizer, and this model has none")
        eos = set() if ignore_eos else set(self.spec.eos_token_ids)
        return self._generate(arr, max_new_tokens, sampler, stops, eos, cancel or threading.Event(), forced,
                              context)

    def _generate(self, arr: np.ndarray, max_new: int, sampler: Sampler, stops: list[str],
                  eos: set[int], cancel: threading.Event, forced: list[int] | None = None,
                  context: Context | None = None) -> Iterator[int]:
        with self._run_lock:
            t0 = time.perf_counter()
            self._telemetry.generation_started()
            history = arr.tolist()   # the prompt and the tokens chosen so far; the cache holds a prefix of it
            if context is None:
                cache, kept = self._new_cache(len(arr) + max_new), 0
            else:
                cache, kept = context.cache, context.keep(history, self._rotation)
                self._kv = weakref.ref(cache)
                if kv_cache.ROOM_IS_FREE:
                    cache.reserve(len(arr) + max_new)
            try:
                logits = self._step(arr[kept:], cache, last_only=True, cancel=cancel)
                if logits is None:
                    return
                logits = logits[-1]
                self._telemetry.prefill_done(len(arr) - kept, time.perf_counter() - t0)
                new: list[int] = []
                for n in range(max_new):
                    if cancel.is_set():
                        return
                    tok = sampler.sample(logits, history) if forced is None else forced[n]
                    if tok in eos:
                        return
                    if n == 0:
                        self._telemetry.first_token(time.perf_counter() - t0)
                    self._telemetry.token()
                    history.append(tok)
                    new.append(tok)
                    yield tok
                    if stops:
                        # Decode only a short tail: enough to see any stop string end at this token.
                        tail = self.tokenizer.decode(new[-(max(map(len, stops)) + 8):])
                        if any(st in tail for st in stops):
                            return
                    if n + 1 < max_new:
                        logits = self._step(np.array([tok]), cache, last_only=True)[-1]
            finally:
                if context is not None:   # whatever ended the generation, the ids say what the cache holds
                    context.ids = history[:cache.length]

    # ----------------------------------------------------------------- telemetry and settings
    def telemetry(self) -> dict:
        snap = self._telemetry.snapshot()
        src = self.experts.stats() if self.experts is not None else {}
        snap.update(src)
        snap.setdefault("prefetch", {"enabled": False, "issued": 0, "useful": 0})
        snap["prefetch"]["enabled"] = self.prefetch_enabled
        snap["policy"] = src.get("policy", getattr(self.experts, "policy_name", "resident"))
        # The keys and values held now: a kept context's between turns, none once a generation's cache is gone.
        cache = self._kv() if self._kv is not None else None
        tokens = cache.length if cache is not None else 0
        snap["kv"] = {"tokens": tokens, "bytes": tokens * cache.bytes_per_token if cache is not None else 0,
                      "format": cache.fmt if cache is not None else self._kv_format(),
                      "context": self.spec.max_position_embeddings}
        return snap

    def set_prefetch(self, enabled: bool) -> None:
        self.prefetch_enabled = bool(enabled)
        if self.experts is not None:
            self.experts.configure(prefetch=self.prefetch_enabled)

    def configure(self, **settings) -> None:
        """Change cache settings while running: ram_cache, policy, prefetch."""
        if "prefetch" in settings:
            self.prefetch_enabled = bool(settings["prefetch"])
        if self.experts is not None:
            self.experts.configure(**settings)

    def reset_telemetry(self) -> None:
        self._telemetry.reset()
        if self.experts is not None:
            self.experts.reset_stats()

    def hottest_experts(self, n: int) -> list[tuple[int, int]]:
        """The n (layer, expert) pairs with the highest decayed activation counts."""
        counts = self._telemetry.counts_now()
        order = np.argsort(-counts, axis=None)[:n]
        return [(int(i // counts.shape[1]), int(i % counts.shape[1])) for i in order if counts.flat[i] > 0]

    def close(self) -> None:
        if self.experts is not None:
            self.experts.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
