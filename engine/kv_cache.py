"""Keys and values of the sequence so far, per layer, in buffers that grow by doubling; and each
layer's attention output for the sequence's last token, which the next token's resembles.

Doubling keeps appends amortised O(1), so a decoded token costs O(sequence) (the attention
itself), never O(sequence^2) in copies.
"""
from __future__ import annotations

import numpy as np


class KVCache:
    def __init__(self, layers: int, kv_heads: int, head_dim: int, capacity: int = 256):
        self.length = 0
        self._shape = (kv_heads, capacity, head_dim)
        self.k = [np.zeros(self._shape, np.float32) for _ in range(layers)]
        self.v = [np.zeros(self._shape, np.float32) for _ in range(layers)]
        # (1, hidden) per layer, once a step has run: Model._prefetch adds these to the residual to guess
        # the experts of the layers ahead before their own attention has run
        self.last_attention: list[np.ndarray | None] = [None] * layers

    @property
    def capacity(self) -> int:
        return self.k[0].shape[1]

    def _grow(self, need: int) -> None:
        cap = self.capacity
        while cap < need:
            cap *= 2
        for buf in (self.k, self.v):
            for i, old in enumerate(buf):
                new = np.zeros((old.shape[0], cap, old.shape[2]), np.float32)
                new[:, : self.length] = old[:, : self.length]
                buf[i] = new

    def append(self, layer: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Add (n, kv_heads, head_dim) keys/values at the end; return all (kv_heads, T, head_dim).

        `length` advances once per step, in `advance`, after every layer has appended.
        """
        n = k.shape[0]
        end = self.length + n
        if end > self.capacity:
            self._grow(end)
        self.k[layer][:, self.length:end] = k.transpose(1, 0, 2)
        self.v[layer][:, self.length:end] = v.transpose(1, 0, 2)
        return self.k[layer][:, :end], self.v[layer][:, :end]

    def advance(self, n: int) -> None:
        self.length += n
