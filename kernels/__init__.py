"""Numeric kernels: GGUF-compatible block formats and matrix products over them.

Every weight matrix is held as uint8 bytes of shape (rows, row_bytes) plus a format name;
float formats are the same bytes viewed as their dtype.  This module's public API is the
contract the engine relies on; the implementations behind it live in submodules:

- formats.py: the layouts and the numpy reference codecs (byte-exact with gguf-py);
- kquant.py: the q4_k / q6_k quantizers (numba, ggml's reference algorithms);
- cpu_c.py + qkernels.c: C kernels (AVX2/FMA/F16C or portable), built once per machine;
- matvec_numba.py: numba kernels, the portable fallback.

Which products run where is the *backend*: "c" (default where a C compiler works; the variant
follows the CPU's flags), "numba", or "numpy" (dequantize, then BLAS; the slow reference).  Pick
one with the MER_TUI_KERNELS environment variable (auto, c, c-avx512, c-avxvnni, c-avx2, c-generic, numba, numpy) or
`set_backend`.  Every function here is thread-safe: the engine calls from a worker thread and a
prefetch thread at once.
"""
from __future__ import annotations

import functools
import logging
import os
import threading
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from threadpoolctl import ThreadpoolController

from .formats import (
    BLOCK,
    FLOAT_FORMATS,
    FORMATS,
    INTERLEAVED,
    READ_ONLY,
    X8_ROWS,
    FormatError,
    check_bytes,
    check_rows,
    deinterleave,
    dequantize_ref,
    gguf_format,
    interleave,
    layout,
    quantize_ref,
    row_bytes,
)

__all__ = [
    "BLOCK", "FLOAT_FORMATS", "FORMATS", "READ_ONLY", "FormatError", "QMatrix", "backend", "crc32", "dequantize",
    "expert_ffn", "experts_ffn", "gguf_format", "layout", "matmul", "matvec", "quantize", "row_bytes", "set_backend",
    "set_threads", "threads", "warmup", "X8_ROWS",
]

log = logging.getLogger(__name__)

BACKENDS = ("auto", "c", "c-avx512", "c-avxvnni", "c-avx2", "c-generic", "numba", "numpy")
# Up to this many vectors a product runs the matrix-vector kernels (the C ones decode each
# weight block once per four vectors); above it, tiles of rows are dequantized to float32 and
# multiplied by BLAS, whose matrix-matrix kernels win once there are enough vectors to reuse
# each dequantized weight.  Crossovers measured on one idle Zen 3 core (bench_kernels.py
# --batch): 16-32 vectors for the block formats, ~8 for f16/bf16 (whose dequantization is
# cheap).  The block formats take the upper end: at 32 vectors the kernels are within ~10% of
# BLAS on an idle machine, and on a busy one OpenBLAS's threads stall (its two-thread sgemv fell
# to a tenth of its speed here while other jobs ran) where the kernels' pool does not.
# The x8 layouts' AVX2 kernels (one row per lane, no fold) keep ahead of the tiles to 64 vectors:
# `bench kernels --formats q4_0x8,q8_0x8,q4_kx8 --shapes 2048x1024,8192x4096 --batch 64,65` (two
# cores, hot), tokens/s at 64 (kernels) vs 65 (tiles): 2048x1024 q4_0x8 34k vs 13k, q8_0x8 34k vs 12k,
# q4_kx8 29k vs 17k; 8192x4096 2.8k vs 1.1k, 2.2k vs 0.7k, 1.3k vs 0.7k.  At 128 vectors the tiles win
# on 8192x4096 q4_kx8 (1.6k).
# The avx512 variant's kernels for the super-block formats (qkernels.c's dot_ksb) stay ahead of the tiles up
# to the longest prompt chunk (engine.model.PREFILL_CHUNK, 256 tokens).  On two Zen 5 cores (`mer-tui bench
# kernels --backend c-avx512` and `--backend c-avx2`, which takes the tiles above 32 vectors; `--formats
# q4_k,q6_k,iq4_xs,q4_kx8 --shapes 1024x2048,2048x1024 --batch 4,32,256 --repeats 5`), tokens/s at 256
# vectors: q4_k 96-102k vs 45-52k, q6_k 87-93k vs 43-50k, iq4_xs 86-94k vs 45-51k, q4_kx8 93-95k vs 40-45k;
# with SMALL_N set past 256 the tiles did no better (q4_k 1024x2048: 46k).
# So do its 512-bit q4_0x8 and q8_0x8 kernels (dot_x8_32_512), with SMALL_N patched past 256, tokens/s
# (kernels vs tiles): q4_0x8 1024x2048 at 64 vectors 93k vs 30k, 256 99k vs 45k; q8_0x8 2048x2048 43k vs
# 12k, 32k vs 21k; and their int8 successors (dot_x16) twice that.
SMALL_N = {("c", "quant"): 32, ("c", "x8"): 64, ("c", "chunk"): 256, ("c", "half"): 8, ("numba", "quant"): 2,
           ("numba", "half"): 2, ("numpy", "quant"): 0, ("numpy", "half"): 0}
# The formats of dot_ksb (the avx512 variant's products of several vectors, where the int8 kernels below
# do not take them).
KSB_FORMATS = ("q4_k", "q5_k", "q6_k", "q3_k", "q2_k", "iq4_xs")
# The x8 layouts the int8 kernels compute from two vectors on (llama.cpp's q8_0 of the activations; decode
# keeps int16): the avx512 variant's dot_x16 (one vpdpbusd per 64 products), the avxvnni variant's
# dot_x8_i8 (256-bit, 32) and the avx2 variant's (vpmaddubsw, whose int16 sums only 4-6-bit codes keep
# from saturating: not q8_0 or iq4_xs).
INT8_FORMATS = ("q4_0x8", "q8_0x8", "q4_kx8", "q5_kx8", "iq4_xsx8")
# Their GGUF formats too, a chunk of rows interleaved first (x8_pack), and q6_k (no x8 layout: q6_pack), from
# more vectors (where the copy costs less than it saves: 2048x1024 on the avxvnni variant, n=4 0.7-1.6x
# the int16 kernels, n=8 1.2-2x; q6_k n=4 1.4x).
INT8_PACKED = (*(INTERLEAVED[f] for f in INT8_FORMATS), "q6_k")
# From how many vectors each C variant rounds a format's activations to int8 (qkernels.c's i8_runs).
_INT8_X8 = {**{f: 2 for f in INT8_FORMATS}, **{INTERLEAVED[f]: 8 for f in INT8_FORMATS}}
INT8_LEAST = {"avx512": {**_INT8_X8, "q6_k": 16}, "avxvnni": {**_INT8_X8, "q6_k": 4},
              "avx2": {f: n for f, n in {**_INT8_X8, "q6_k": 4}.items()
                       if f not in ("q8_0x8", "iq4_xsx8", "q8_0", "iq4_xs")}}
# What each variant computes faster than the tiles up to a prompt chunk: SMALL_N's "chunk" kind.
TO_CHUNK = {"avx512": (*KSB_FORMATS, *INT8_FORMATS, *INT8_PACKED), "avxvnni": (*INT8_FORMATS, *INT8_PACKED),
            "avx2": tuple(INT8_LEAST["avx2"])}
# Bytes of float32 weights per dequantized tile: a few MB stays in L2/L3 for BLAS.
TILE_BYTES = 4 << 20


def _kind(variant: str | None, fmt: str) -> str:
    """SMALL_N's column for a product in `fmt` on the C kernels' `variant` (None: no C kernels)."""
    if fmt in FLOAT_FORMATS:
        return "half"
    if fmt in TO_CHUNK.get(variant, ()):
        return "chunk"
    if variant in ("avx2", "avx512", "avxvnni") and fmt in INTERLEAVED:
        return "x8"
    return "quant"


def int8_activations(fmt: str, n: int) -> bool:
    """Whether a product of n vectors in `fmt` rounds the activations to int8 per 32-block (llama.cpp's
    q8_0 of them: relative error ~1e-2 of the product where a block holds an outlier, a few 1e-3 else)
    rather than to int16 (~1e-4) or not at all (the float32 tiles), on the active backend."""
    b, ck = _state()
    least = INT8_LEAST.get(ck.variant, {}).get(fmt) if ck is not None else None
    return least is not None and least <= n <= _small_n(b, ck, (fmt,))


def _small_n(b: str, ck, fmts: Sequence[str]) -> int:
    """Up to how many vectors products in these formats run the matrix-vector kernels (`b`: the backend,
    `ck`: the C kernels or None): SMALL_N of the format that reaches the tiles first."""
    variant = ck.variant if ck is not None else None
    return min(SMALL_N["c" if ck is not None else b, _kind(variant, f)] for f in fmts)


_init_lock = threading.Lock()
# (backend name, cpu_c.CKernels or None), swapped as one object so that a thread never sees a
# name from one set_backend call and the library from another.  Resolved lazily: importing
# kernels must not start a compiler.
_active: tuple[str, object] | None = None
_threads: int = 0  # 0: every core this process may run on


def _default_threads() -> int:
    global _affinity
    if not _affinity:  # asked once: the products ask on every call
        try:
            _affinity = max(1, len(os.sched_getaffinity(0)))
        except (AttributeError, OSError):
            _affinity = max(1, os.cpu_count() or 1)
    return _affinity


_affinity = 0


def set_threads(n: int | None) -> None:
    """Threads the kernels may use (None: all cores).  BLAS (f32, prefill tiles) keeps its own."""
    global _threads
    if n is not None and int(n) < 1:
        raise ValueError(f"threads must be >= 1 or None, got {n}")
    _threads = 0 if n is None else int(n)


def threads() -> int:
    """Threads the kernels use now."""
    return _threads or _default_threads()


def _resolve(name: str) -> tuple[str, object]:
    """(backend name, C kernels or None) for a requested backend, falling back as needed."""
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r} (known: {', '.join(BACKENDS)})")
    if name in ("auto", "c", "c-avx512", "c-avxvnni", "c-avx2", "c-generic"):
        from . import cpu_c
        variant = name[2:] if name.startswith("c-") else None
        try:
            ck = cpu_c.load(variant)
            return f"c-{ck.variant}", ck
        except Exception as e:  # any build/load failure: the numba path still works
            if variant:
                raise
            log.warning("C kernels unavailable (%s); using numba", e)
            name = "numba"
    return name, None


def set_backend(name: str | None = None) -> str:
    """Choose the kernel backend (None: MER_TUI_KERNELS, else auto); returns the one in use.

    "auto" and "c" fall back to numba when the C kernels cannot be built; "c-avx512", "c-avxvnni",
    "c-avx2" and "c-generic" raise instead, so that tests can insist on a path.
    """
    global _active
    name = name or os.environ.get("MER_TUI_KERNELS", "auto").strip().lower() or "auto"
    _active = _resolve(name)
    _blas_threads(one=_active[1] is not None)
    return _active[0]


# numpy's BLAS (OpenBLAS) keeps its worker threads spinning for ~0.1 s after each multi-threaded call, and
# the C kernels' threads, called right after (a layer's router product, then its experts), shared the
# cores with them: 64 experts' FFNs on 2048 vectors took 55-60 ms after a 256x2048 @ 2048x64 product
# instead of 39, and a 256-token prompt prefilled 188-192 tok/s instead of 257-262 (the q4_0 store, two
# cores; docs/BENCHMARKS.md, "numpy's BLAS on one thread").
# So with the C kernels BLAS runs on the calling thread alone, and the float32 tiles (_tiled) are shared
# out among threads of our own.
_blas = ThreadpoolController()
_blas_limit = None   # the one-thread limit in force, or None
_blas_lock = threading.Lock()


def _blas_threads(one: bool) -> None:
    """BLAS on one thread (one=True; set_backend does it for the C kernels) or on its own count again."""
    global _blas_limit
    with _blas_lock:
        if one and _blas_limit is None:
            _blas_limit = _blas.limit(limits=1, user_api="blas")
        elif not one and _blas_limit is not None:
            _blas_limit.restore_original_limits()
            _blas_limit = None


def blas_threads() -> int:
    """The threads numpy's BLAS runs on now (1 beside the C kernels: _blas_threads)."""
    return max((i["num_threads"] for i in _blas.info() if i["user_api"] == "blas"), default=1)


def unlimit_blas() -> None:
    """Give numpy's BLAS its own thread count back while the C kernels stay in use: for a benchmark whose
    baseline is numpy itself (`mer-tui bench kernels`), which must run as numpy does everywhere else."""
    _blas_threads(one=False)


def _state() -> tuple[str, object]:
    active = _active
    if active is None:
        with _init_lock:
            if _active is None:
                set_backend()
        active = _active
    return active  # type: ignore[return-value]


def backend() -> str:
    """The backend in use ("c-avx512", "c-avxvnni", "c-avx2", "c-generic", "numba" or "numpy"), resolving it
    if needed."""
    return _state()[0]


def crc32(data, value: int = 0) -> int:
    """zlib.crc32(data, value) of a contiguous buffer: the C kernels fold it with carry-less multiplication
    where the CPU has PCLMULQDQ (a 3.5 MiB expert bundle in 0.29 ms, zlib's table code 0.98), else zlib
    computes it."""
    ck = _state()[1]
    if ck is not None and ck.crc32_fast:
        return ck.crc32(data, value)
    return zlib.crc32(data, value)


@functools.lru_cache(maxsize=1024)
def _kernel_row_bytes(fmt: str, cols: int) -> int | None:
    """row_bytes for matvec's fast path, looked up rather than computed and checked on every call; None
    for f32 (numpy's product) and for what row_bytes refuses (the general path names the problem)."""
    try:
        return None if fmt == "f32" else row_bytes(fmt, cols)
    except (ValueError, TypeError):
        return None


def _rows(q: np.ndarray, fmt: str, cols: int) -> np.ndarray:
    # The C kernels take a row stride, so a view of whole rows need not be copied.
    rb = row_bytes(fmt, cols)
    if fmt in INTERLEAVED:  # its rows come in runs of eight: no row view of it is a matrix
        if not (isinstance(q, np.ndarray) and q.dtype == np.uint8 and q.ndim == 2 and q.shape[1] == rb
                and q.strides == (rb, 1) and q.shape[0] % X8_ROWS == 0):
            q = check_bytes(q, fmt, cols)
            check_rows(fmt, q.shape[0])
        return q
    if (isinstance(q, np.ndarray) and q.dtype == np.uint8 and q.ndim == 2 and q.shape[1] == rb
            and q.strides[1] == 1 and q.strides[0] >= rb):
        return q
    return check_bytes(q, fmt, cols)


def _vectors(X: np.ndarray, cols: int) -> tuple[np.ndarray, bool]:
    X = np.asarray(X)
    one = X.ndim == 1
    X = np.ascontiguousarray(X.reshape(1, -1) if one else X, dtype=np.float32)
    if X.ndim != 2 or X.shape[1] != cols:
        raise FormatError(f"activations of shape {X.shape} do not fit a matrix with {cols} columns")
    return X, one


# ---------------------------------------------------------------- quantize / dequantize

def quantize(x: np.ndarray, fmt: str) -> np.ndarray:
    """float32 (rows, cols) -> uint8 (rows, row_bytes(fmt, cols)).

    f16, bf16, q8_0 and q4_0 give the same bytes as gguf-py (ggml's reference quantizers);
    q4_k and q6_k follow ggml's reference algorithms (gguf-py has no quantizer for them).
    The x8 layouts (q4_0x8, q8_0x8, q4_kx8) are their GGUF format's bytes with each run of eight
    rows interleaved (formats.interleave).  The READ_ONLY formats (llama.cpp's q5_k, q3_k, q2_k,
    iq4_xs, iq4_nl, q4_1, q5_0, q5_1) have no quantizer.
    """
    if fmt in READ_ONLY:
        raise FormatError(f"no quantizer for {fmt}: mer-tui computes it as llama.cpp's files hold it, "
                          f"and writes {', '.join(f for f in FORMATS if f not in READ_ONLY)}")
    if fmt in INTERLEAVED:
        check_rows(fmt, np.shape(x)[0])
        return interleave(quantize(x, INTERLEAVED[fmt]), fmt)
    if fmt in ("q4_k", "q6_k"):
        from .kquant import quantize_k
        return quantize_k(x, fmt)
    return quantize_ref(x, fmt)


def _dequant_fast(q: np.ndarray, fmt: str, cols: int, b: str, ck,
                  out: np.ndarray | None = None, nthreads: int | None = None) -> np.ndarray:
    if fmt == "f32":
        W = np.ascontiguousarray(q).view(np.float32).reshape(q.shape[0], cols)
    elif ck is not None:
        return ck.dequantize(q, fmt, cols, nthreads or threads(), out)
    elif b == "numba":
        from . import matvec_numba
        return matvec_numba.dequantize(np.ascontiguousarray(q), fmt, cols, nthreads or threads(), out)
    else:
        W = dequantize_ref(q, fmt, cols)
    if out is None:
        return W
    out[...] = W
    return out


def dequantize(q: np.ndarray, fmt: str, cols: int) -> np.ndarray:
    """uint8 (rows, row_bytes) -> float32 (rows, cols), bit-identical to gguf-py on every backend."""
    q = _rows(q, fmt, cols)
    b, ck = _state()
    return _dequant_fast(q, fmt, cols, b, ck)


# ---------------------------------------------------------------- products

_tls = threading.local()


def _scratch(n: int) -> np.ndarray:
    # One reusable float32 buffer per thread for the dequantized tiles: a fresh multi-MB array
    # per call is fresh pages from the kernel, and faulting them in costs as much as the work.
    buf = getattr(_tls, "buf", None)
    if buf is None or buf.size < n:
        buf = _tls.buf = np.empty(n, dtype=np.float32)
    return buf[:n]


_tile_pool: ThreadPoolExecutor | None = None


def _tile_threads() -> ThreadPoolExecutor:
    global _tile_pool
    with _blas_lock:
        if _tile_pool is None:
            _tile_pool = ThreadPoolExecutor(max_workers=max(1, (os.cpu_count() or 1) - 1),
                                            thread_name_prefix="mer-tiles")
        return _tile_pool


def map_threads(fn, items: Sequence) -> list:
    """[fn(item) for item in items], the items shared out among threads() threads (the calling one
    included): for numpy work that BLAS, on one thread beside the C kernels, no longer spreads over the
    cores itself (numpy's loops and BLAS calls release the GIL)."""
    nt = min(threads(), len(items))
    if nt <= 1:
        return [fn(it) for it in items]
    out: list = [None] * len(items)

    def run(k: int) -> None:
        for i in range(k, len(items), nt):
            out[i] = fn(items[i])

    others = [_tile_threads().submit(run, k) for k in range(1, nt)]
    run(0)
    for f in others:
        f.result()
    return out


# ---------------------------------------------------------------- attention over a KV cache

# A KV cache's rows by their numpy dtype: float32 and float16 as they are, q8_0 as uint8 bytes (34 a 32).
KV_FORMATS = {np.dtype(np.float32): "f32", np.dtype(np.float16): "f16", np.dtype(np.uint8): "q8_0"}


def kv_format() -> str:
    """What the engine keeps keys and values in by default: "f16" where the C kernels compute a decoded
    token's attention on it (half the bytes it reads: 256 MiB at 2048 tokens of OLMoE's shape), else "f32",
    since numpy has no float16 product and casting is slow (2048 keys of 16 heads: 5 ms)."""
    return "f16" if _state()[1] is not None else "f32"


def kv_rows(x: np.ndarray, fmt: str) -> np.ndarray:
    """(..., d) float32 keys or values as a KV cache of `fmt` keeps them: (..., d) float32 / float16, or
    (..., d / 32 * 34) uint8 q8_0 rows (ggml's bytes; the C kernels quantize, ~0.05 us a row)."""
    if fmt == "f32":
        return x.astype(np.float32, copy=False)
    if fmt == "f16":
        return x.astype(np.float16)
    flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1])
    ck = _state()[1]
    q = ck.quant_q8_0(flat) if ck is not None else quantize(flat, "q8_0")
    return q.reshape(*x.shape[:-1], q.shape[-1])


def attend_one(q: np.ndarray, K: np.ndarray, V: np.ndarray, t0: int, T: int, scale: float) -> np.ndarray:
    """One decoded token's attention.  q: (kv_heads, group, d) float32, each KV head's query rows; K, V:
    (kv_heads, cap, row) buffers of a KV cache (KV_FORMATS) whose rows [t0, T) it attends to.  Returns
    (kv_heads, group, d) float32 = softmax(scale * q K^T) V, in float32 whatever K and V hold."""
    fmt = KV_FORMATS[K.dtype]
    ck = _state()[1]
    if ck is not None and fmt != "f32":
        return ck.attend(q, K, V, fmt, t0, T, scale, threads())
    Kf, Vf = widen(K[:, t0:T], 0), widen(V[:, t0:T], 1)
    s = (q @ Kf.transpose(0, 2, 1)) * np.float32(scale)
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)) @ Vf


# Without the C kernels a prompt chunk's attention over at least this many (query, key) pairs has its KV heads
# shared out among the kernel threads (map_threads): numpy's loops run on one core, and BLAS is kept to one
# beside the kernels.  The figure puts a full prompt chunk (256 queries over 256 keys) on the threads and a
# 32-token prompt not; the crossover was not measured.
PARALLEL_ATTENTION_PAIRS = 1 << 16


def attend_prompt(q: np.ndarray, K: np.ndarray, V: np.ndarray, start: int, window: int | None,
                  scale: float) -> np.ndarray:
    """A prompt chunk's attention.  q: (n, kv_heads, group, d) float32, the queries of positions start ..
    start + n - 1; K, V: (kv_heads, cap, row) buffers of a KV cache (KV_FORMATS) holding the keys and values
    of positions 0 .. start + n - 1.  Each position attends to the keys up to its own, and within `window`
    of it where the model has one.  Returns (n, kv_heads, group, d) float32."""
    n, heads, group, d = q.shape
    T = start + n
    fmt = KV_FORMATS[K.dtype]
    ck = _state()[1]
    if ck is not None and ck.variant != "generic":   # the portable build's scalar loops would trail BLAS
        return ck.attend_prompt(q, K, V, fmt, start, window or 0, scale, threads())
    Kf, Vf = widen(K[:, :T], 0), widen(V[:, :T], 1)     # BLAS products run in float32
    qg = q.transpose(1, 2, 0, 3)                          # (heads, group, n, d)
    qpos = np.arange(start, T)[:, None]
    kpos = np.arange(T)[None, :]
    allowed = kpos <= qpos
    if window:
        allowed &= kpos > qpos - window
    mask = None if allowed.all() else allowed

    def attend(h: slice) -> np.ndarray:   # KV heads h and their query groups: (heads, group, n, d)
        s = (qg[h] @ Kf[h, None].transpose(0, 1, 3, 2)) * np.float32(scale)   # (heads, group, n, T)
        if mask is not None:
            s = np.where(mask, s, -np.inf)
        e = np.exp(s - s.max(axis=-1, keepdims=True))
        return (e / e.sum(axis=-1, keepdims=True)) @ Vf[h, None]

    if n * T >= PARALLEL_ATTENTION_PAIRS and heads > 1:
        nt = min(threads(), heads)
        cuts = [heads * k // nt for k in range(nt + 1)]
        out = np.concatenate(map_threads(attend, [slice(a, b) for a, b in zip(cuts, cuts[1:])]))
    else:
        out = attend(slice(None))
    return out.transpose(2, 0, 1, 3)


def widen(a: np.ndarray, slot: int = 0) -> np.ndarray:
    """float32 (heads, T, d) of a KV cache's first T rows (float16, or q8_0 bytes), in this thread's scratch
    buffer `slot`: valid until the next widen of that slot on this thread (a prompt chunk's attention widens
    K into slot 0, V into 1).  Fresh arrays cost their page faults every time: 64 MiB a layer at 4096 tokens
    of OLMoE's shape, 6% of a 4096-token prompt.  The C kernels convert on the kernel threads, numpy's cast
    being ~1 ns an element.  float32 comes back as it is."""
    fmt = KV_FORMATS[a.dtype]
    if fmt == "f32":
        return a
    heads, T, row = a.shape
    d = row if fmt == "f16" else row // 34 * 32
    bufs = getattr(_tls, "wide", None)
    if bufs is None:
        bufs = _tls.wide = {}
    buf = bufs.get(slot)
    if buf is None or buf.size < heads * T * d:
        buf = bufs[slot] = np.empty(heads * T * d, dtype=np.float32)
    out = buf[:heads * T * d].reshape(heads, T, d)
    b, ck = _state()
    for h in range(heads):   # a head's rows are (T, row bytes), each contiguous
        _dequant_fast(a[h].view(np.uint8), fmt, d, b, ck, out[h])
    return out


def _tiled(q: np.ndarray, fmt: str, cols: int, X: np.ndarray, b: str, ck) -> np.ndarray:
    # Prefill: dequantize a tile of rows to float32, then one BLAS sgemm per tile.  The result
    # is exactly float32 (dequantized weights) @ float32 activations, as accurate as numpy.
    # Where BLAS runs on one thread (with the C kernels: _blas_threads), the tiles are shared out among
    # threads() threads instead, each dequantizing and multiplying its own (bf16 2048x2048 by 256 vectors:
    # 11 ms on two cores, as BLAS's own two threads took, against 20 on one).
    rows = q.shape[0]
    nt = threads() if _blas_limit is not None else 1
    step = min(rows, max(16, TILE_BYTES // (4 * max(cols, 1))) // X8_ROWS * X8_ROWS)  # whole runs of an x8 layout
    if nt > 1:   # at least a tile a thread: rows / nt rounded up to whole runs
        share = -(-rows // nt)
        step = min(step, max(X8_ROWS, -(-share // X8_ROWS) * X8_ROWS))
    Yt = np.empty((rows, X.shape[0]), dtype=np.float32)

    def tile(r0: int) -> None:
        m = min(step, rows - r0)
        W = _dequant_fast(q[r0:r0 + m], fmt, cols, b, ck, _scratch(step * cols)[:m * cols].reshape(m, cols),
                          1 if nt > 1 else None)
        np.matmul(W, X.T, out=Yt[r0:r0 + m])

    starts = range(0, rows, step)
    if nt > 1:
        map_threads(tile, starts)
    else:
        for r0 in starts:
            tile(r0)
    return np.ascontiguousarray(Yt.T)


def matmul(q: np.ndarray, fmt: str, cols: int, X: np.ndarray) -> np.ndarray:
    """W @ X.T for X of shape (n, cols): returns float32 (n, rows).  (A 1-D x gives (rows,).)

    n up to a few vectors runs the matrix-vector kernels (n=1 is decode); more vectors
    (prefill) dequantize row tiles and use BLAS.  Quantized formats on the C backend round the
    activations to int16 per 32-block first (see qkernels.c): relative error ~1e-4 at most; products
    of several vectors in the formats of INT8_LEAST[variant], from that many vectors, round them to
    int8 as llama.cpp does (int8_activations).
    """
    return _matmul(_rows(q, fmt, cols), fmt, cols, X)


def _matmul(q: np.ndarray, fmt: str, cols: int, X: np.ndarray) -> np.ndarray:
    # matmul after the checks on q (a QMatrix has passed them at construction)
    active = _active
    if (active is not None and active[1] is not None and fmt != "f32" and type(X) is np.ndarray
            and X.ndim == 1 and X.dtype == np.float32 and X.shape[0] == cols and X.flags.c_contiguous
            and q.shape[0]):
        # Decode's case, one float32 vector, skips the general path's conversions: 1.7 us less
        # Python a call (7.0 -> 5.3 us for a 4-row product; a cold 2048x1024 q4_0 one takes ~60).
        return active[1].matvec(q, fmt, cols, X, _threads or _default_threads())
    X, one = _vectors(X, cols)
    n, rows = X.shape[0], q.shape[0]
    if n == 0 or rows == 0:
        Y = np.zeros((n, rows), dtype=np.float32)
    elif fmt == "f32":
        # numpy's own float32 product: the engine's parity tests rely on exactly this.
        Y = X @ np.ascontiguousarray(q).view(np.float32).reshape(rows, cols).T
    else:
        b, ck = _state()
        if n > _small_n(b, ck, (fmt,)):
            Y = _tiled(q, fmt, cols, X, b, ck)
        elif ck is not None:
            Y = ck.matmul(q, fmt, cols, X, threads())
        else:
            from . import matvec_numba
            Y = matvec_numba.matmul(np.ascontiguousarray(q), fmt, X, threads())
    return Y[0] if one else Y


def matvec(q: np.ndarray, fmt: str, cols: int, x: np.ndarray) -> np.ndarray:
    """W @ x for x of shape (cols,): returns float32 (rows,)."""
    active = _active
    if (active is not None and active[1] is not None and type(q) is np.ndarray and type(x) is np.ndarray
            and q.ndim == 2 and q.dtype == np.uint8 and q.flags.c_contiguous and q.shape[0]
            and x.ndim == 1 and x.dtype == np.float32 and x.flags.c_contiguous and x.shape[0] == cols
            and q.shape[1] == _kernel_row_bytes(fmt, cols) and (q.shape[0] % X8_ROWS == 0 or fmt not in INTERLEAVED)):
        # The checks of matmul's path, for the common case in one go: a small product spends ~9 us
        # in Python on the general path, ~5 on this one (a cold 2048x1024 q4_0 product takes ~60).
        return active[1].matvec(q, fmt, cols, x, _threads or _default_threads())
    x = np.asarray(x)
    if x.ndim != 1:
        raise FormatError(f"matvec expects a vector, got shape {x.shape}")
    return matmul(q, fmt, cols, x)


@dataclass(frozen=True)
class QMatrix:
    """One weight matrix in a block format: `data` is uint8 (rows, row_bytes(fmt, cols))."""

    data: np.ndarray
    fmt: str
    rows: int
    cols: int

    def __post_init__(self) -> None:
        rb = row_bytes(self.fmt, self.cols)
        check_rows(self.fmt, self.rows)
        data = self.data
        if not isinstance(data, np.ndarray) or data.shape != (self.rows, rb):
            raise FormatError(
                f"{self.fmt} matrix {self.rows}x{self.cols} needs data of shape {(self.rows, rb)}, "
                f"got {getattr(data, 'shape', type(data).__name__)}")
        if data.dtype != np.uint8 or data.strides[1] != 1 or data.strides[0] < rb:
            # Products take rows at any stride but bytes within a row contiguous: normalize once
            # here, so that every product can skip the checks.
            object.__setattr__(self, "data", check_bytes(data.view(np.uint8) if data.dtype.itemsize == 1
                                                         else data, self.fmt, self.cols))

    @classmethod
    def from_float(cls, w: np.ndarray, fmt: str = "f32") -> QMatrix:
        """Quantize a float matrix (rows, cols) to `fmt` (any format in FORMATS)."""
        w = np.asarray(w, dtype=np.float32)
        if w.ndim != 2:
            raise FormatError(f"QMatrix.from_float expects a 2-D matrix, got shape {w.shape}")
        return cls(quantize(w, fmt), fmt, w.shape[0], w.shape[1])

    def to_format(self, fmt: str) -> QMatrix:
        """This matrix in `fmt`: itself when it is already, its bytes moved when `fmt` is a layout of the
        same GGUF format (q4_0 <-> q4_0x8: no value changes), else quantized from its float values."""
        if fmt == self.fmt:
            return self
        if gguf_format(fmt) == gguf_format(self.fmt):
            check_rows(fmt, self.rows)
            plain = deinterleave(self.data, self.fmt) if self.fmt in INTERLEAVED else self.data
            return QMatrix(interleave(plain, fmt) if fmt in INTERLEAVED else plain, fmt, self.rows, self.cols)
        return QMatrix.from_float(self.to_float(), fmt)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def matmul(self, X: np.ndarray) -> np.ndarray:
        """(n, cols) -> (n, rows); n=1 takes the matrix-vector fast path."""
        return _matmul(self.data, self.fmt, self.cols, X)

    def matvec(self, x: np.ndarray) -> np.ndarray:
        """(cols,) -> (rows,)."""
        return matvec(self.data, self.fmt, self.cols, x)

    def rows_f32(self, idx: np.ndarray) -> np.ndarray:
        """Dequantized rows `idx` (an embedding lookup) as float32 (len(idx), cols)."""
        idx = np.atleast_1d(np.asarray(idx, dtype=np.int64))
        if self.fmt in INTERLEAVED:  # a row is spread over its run of eight: dequantize the runs
            runs = self.data.reshape(-1, X8_ROWS * self.data.shape[1])[idx // X8_ROWS]
            W = dequantize(runs.reshape(-1, self.data.shape[1]), self.fmt, self.cols)
            return W.reshape(len(idx), X8_ROWS, self.cols)[np.arange(len(idx)), idx % X8_ROWS]
        return dequantize(self.data[idx], self.fmt, self.cols)

    def to_float(self) -> np.ndarray:
        return dequantize(self.data, self.fmt, self.cols)


def _silu_mul(g: np.ndarray, u: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # exp overflow for very negative g is silu -> 0, as wanted
        return g / (np.float32(1.0) + np.exp(-g)) * u


def expert_ffn(gate: QMatrix, up: QMatrix, down: QMatrix, X: np.ndarray) -> np.ndarray:
    """down(silu(gate X) * (up X)) for X of shape (n, hidden): returns float32 (n, hidden).

    On the C backend a few tokens run as one fused call (gate and up rows share the thread
    team, then the down projection); otherwise three products.
    """
    hidden, inter = gate.cols, gate.rows
    if (up.rows, up.cols) != (inter, hidden) or (down.rows, down.cols) != (hidden, inter):
        raise FormatError(
            f"expert shapes do not fit: gate {gate.rows}x{gate.cols}, up {up.rows}x{up.cols}, "
            f"down {down.rows}x{down.cols}")
    X, one = _vectors(X, hidden)
    b, ck = _state()
    if (ck is not None and 0 < X.shape[0] <= _small_n(b, ck, (gate.fmt, down.fmt)) and gate.fmt == up.fmt
            and gate.fmt != "f32" and down.fmt != "f32"):
        g = _rows(gate.data, gate.fmt, hidden)
        u = _rows(up.data, up.fmt, hidden)
        if g.strides[0] == u.strides[0]:
            Y = ck.ffn(g, u, gate.fmt, _rows(down.data, down.fmt, inter), down.fmt, hidden, inter, X,
                       threads())
            return Y[0] if one else Y
    Y = down.matmul(_silu_mul(gate.matmul(X), up.matmul(X)))
    return Y[0] if one else Y


def experts_ffn(experts: Sequence[tuple[QMatrix, QMatrix, QMatrix]], Xs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """expert_ffn(*experts[e], Xs[e]) for every e: one layer's experts, each on its own tokens.

    On the C backend, when the experts share their formats and shapes and each has a few tokens,
    this is one call whose three phases (gate and up, activation, down) run over all the experts at
    once; the results equal expert_ffn's bit for bit.  Otherwise it is expert_ffn in a loop.
    """
    if len(experts) != len(Xs):
        raise ValueError(f"{len(experts)} experts but {len(Xs)} inputs")
    if not experts:
        return []
    b, ck = _state()
    g0, _, d0 = experts[0]
    small_n = _small_n(b, ck, (g0.fmt, d0.fmt))
    fused = (ck is not None and g0.fmt != "f32" and d0.fmt != "f32"
             and (d0.rows, d0.cols) == (g0.cols, g0.rows))   # else expert_ffn names the misfit
    if fused:
        gs, us, ds, vs = [], [], [], []
        for (g, u, d), X in zip(experts, Xs, strict=True):
            X, _ = _vectors(X, g.cols)
            if ((g.fmt, u.fmt, d.fmt) != (g0.fmt, g0.fmt, d0.fmt) or (g.rows, g.cols) != (g0.rows, g0.cols)
                    or (u.rows, u.cols) != (g0.rows, g0.cols) or (d.rows, d.cols) != (d0.rows, d0.cols)
                    or not 0 < X.shape[0] <= small_n):
                fused = False
                break
            gs.append(_rows(g.data, g.fmt, g.cols))
            us.append(_rows(u.data, u.fmt, u.cols))
            ds.append(_rows(d.data, d.fmt, d.cols))
            vs.append(X)
        # one row stride for every gate/up matrix and one for every down matrix (the C call takes one each)
        fused = fused and len({a.strides[0] for a in gs + us}) == 1 and len({a.strides[0] for a in ds}) == 1
    if fused:
        return ck.moe(gs, us, g0.fmt, ds, d0.fmt, g0.cols, g0.rows, vs, threads())
    return [expert_ffn(g, u, d, X) for (g, u, d), X in zip(experts, Xs, strict=True)]


def warmup(background: bool = True, quantizers: bool = True) -> threading.Thread | None:
    """Build/load everything the kernels will run, ahead of use: the C library or the numba
    products of the active backend, and (quantizers=True) the numba q4_k/q6_k quantizers.

    Compiling is paid once per machine (numba's cache, the C library cache); loading still takes
    a moment per process, so a UI calls this at start with background=True and never stalls.
    Returns the thread (background) or None.
    """
    def run() -> None:
        try:
            b, _ = _state()
            rng = np.random.default_rng(0)
            w = rng.standard_normal((8, 256)).astype(np.float32)
            x = rng.standard_normal((2, 256)).astype(np.float32)
            for fmt in FORMATS:
                slow = fmt in ("q4_k", "q6_k") and not quantizers
                q = np.zeros((8, row_bytes(fmt, 256)), dtype=np.uint8) if slow or gguf_format(fmt) in READ_ONLY \
                    else quantize(w, fmt)  # zeros: valid blocks (zero scales)
                dequantize(q, fmt, 256)
                matmul(q, fmt, 256, x[:1])
                if b == "numba":
                    matmul(q, fmt, 256, x)
        except Exception:  # warmup is best effort: the real call reports the error
            log.exception("kernel warmup failed")

    if not background:
        run()
        return None
    t = threading.Thread(target=run, name="kernels-warmup", daemon=True)
    t.start()
    return t
