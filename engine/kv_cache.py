"""Keys and values of the sequence so far, per layer, in buffers that grow by doubling; and each
layer's attention output for the sequence's last token, which the next token's resembles.

Doubling keeps appends amortised O(1), so a decoded token costs O(sequence) (the attention
itself), never O(sequence^2) in copies.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

import kernels

try:   # numpy >= 2
    from numpy._core.multiarray import _set_madvise_hugepage
except ImportError:   # pragma: no cover - numpy 1.x, or a numpy without the switch
    try:
        from numpy.core.multiarray import _set_madvise_hugepage
    except ImportError:
        _set_madvise_hugepage = None

#: whether room reserved ahead costs memory only as tokens fill it (Model reserves a generation's at its start)
ROOM_IS_FREE = _set_madvise_hugepage is not None

# A format's rows: (dtype, elements of it per `per` values, per)
ROWS = {"f32": (np.float32, 1, 1), "f16": (np.float16, 1, 1), "q8_0": (np.uint8, 34, 32)}


def _zeros(shape: tuple[int, int, int], dtype: np.dtype) -> np.ndarray:
    """Zeroes whose pages the kernel maps as they are first written.  numpy asks for transparent huge
    pages on large arrays (madvise), and a 2 MiB page for each head of each layer made room reserved for 8192
    tokens resident at once: +960 MiB after 10 tokens of OLMoE's shape, +4 MiB with 4 KiB pages."""
    if _set_madvise_hugepage is None:
        return np.zeros(shape, dtype)
    before = _set_madvise_hugepage(False)
    try:
        return np.zeros(shape, dtype)
    finally:
        _set_madvise_hugepage(before)


class KVCache:
    """Per layer, keys and values in (kv_heads, capacity, row) buffers of `fmt`: "f32", "f16" (where the kernels
    attend over it, kernels.kv_format: half the bytes a decoded token reads, as llama.cpp keeps them), or
    "q8_0" (ggml's 34-byte blocks of 32, as llama.cpp's --cache-type-k/v q8_0; head_dim a multiple of 32)."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, capacity: int = 256, fmt: str = "f32"):
        if fmt not in ROWS:
            raise ValueError(f"KVCache: unknown format {fmt!r} (choose from {', '.join(ROWS)})")
        if fmt == "q8_0" and head_dim % 32:
            raise ValueError(f"KVCache: q8_0 needs a head size that is a multiple of 32, not {head_dim}")
        self.length = 0
        self.fmt = fmt
        self.dtype = np.dtype(ROWS[fmt][0])
        self._row = head_dim * ROWS[fmt][1] // ROWS[fmt][2]   # a row's elements of dtype: d, or d / 32 * 34 bytes
        shape = (kv_heads, capacity, self._row)
        self.k = [_zeros(shape, self.dtype) for _ in range(layers)]
        self.v = [_zeros(shape, self.dtype) for _ in range(layers)]
        # (1, hidden) per layer, once a step has run: Model._prefetch adds these to the residual to guess
        # the experts of the layers ahead before their own attention has run
        self.last_attention: list[np.ndarray | None] = [None] * layers

    @property
    def bytes_per_token(self) -> int:
        """What one more token's keys and values take, over every layer."""
        return 2 * sum(k.shape[0] * k.shape[2] for k in self.k) * self.dtype.itemsize

    @property
    def capacity(self) -> int:
        return self.k[0].shape[1]

    def reserve(self, tokens: int) -> None:
        """Room for `tokens` in all, grown now (one copy) rather than in the middle of a generation."""
        if tokens > self.capacity:
            self._grow(tokens)

    def truncate(self, length: int) -> None:
        """Forget every token from `length` on (a kept context whose prompt changed there); their keys
        and values are written over by the next append."""
        if not 0 <= length <= self.length:
            raise ValueError(f"truncate: {length} is outside 0..{self.length}")
        self.length = length

    def remove(self, start: int, count: int, rotate_keys: Callable[[np.ndarray], np.ndarray]) -> None:
        """Take tokens [start, start + count) out: the ones after move up by `count`, their values as they
        are, their keys through `rotate_keys` (float32 (kv_heads, n, head_dim) -> the same rotated to their
        new positions: RoPE's rotation by -count; the format's rounding comes again, as in llama.cpp's
        context shift)."""
        if not (0 <= start and 0 <= count and start + count <= self.length):
            raise ValueError(f"remove: tokens {start}..{start + count} are outside 0..{self.length}")
        src, dst = slice(start + count, self.length), slice(start, self.length - count)
        if count and src.start < src.stop:   # else nothing moves
            for keys, values in zip(self.k, self.v):
                keys[:, dst] = kernels.kv_rows(rotate_keys(kernels.widen(keys[:, src])), self.fmt)
                values[:, dst] = values[:, src]   # numpy copies through a buffer where the two overlap
        self.length -= count

    def _grow(self, need: int) -> None:
        cap = self.capacity
        while cap < need:
            cap *= 2
        for buf in (self.k, self.v):
            for i, old in enumerate(buf):
                new = _zeros((old.shape[0], cap, old.shape[2]), self.dtype)
                new[:, : self.length] = old[:, : self.length]
                buf[i] = new

    def append(self, layer: int, k: np.ndarray, v: np.ndarray, at: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Put (n, kv_heads, head_dim) float32 keys/values at position `at` (default: the end), in the cache's
        format; return the layer's (kv_heads, at + n, row) buffers so far.

        `length` advances once per step, in `advance`, after every layer has appended all its rows (a
        prompt's chunks append at their own positions, layer by layer).
        """
        at = self.length if at is None else at
        end = at + k.shape[0]
        if end > self.capacity:
            self._grow(end)
        self.k[layer][:, at:end] = kernels.kv_rows(k, self.fmt).transpose(1, 0, 2)
        self.v[layer][:, at:end] = kernels.kv_rows(v, self.fmt).transpose(1, 0, 2)
        return self.k[layer][:, :end], self.v[layer][:, :end]

    def advance(self, n: int) -> None:
        self.length += n
