"""Turning logits into a token: greedy, or seeded sampling with the usual filters.

The filters run in Hugging Face's order (repetition penalty, temperature, top-k, top-p, min-p),
so settings carry over from transformers and llama.cpp with the same meaning.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import EngineError


class Sampler:
    def __init__(self, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 min_p: float | None = None, repetition_penalty: float | None = None, seed: int | None = None):
        if temperature is None or temperature < 0:
            raise EngineError(f"temperature: must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise EngineError(f"top_k: must be >= 1, got {top_k}")
        if top_p is not None and not 0 < top_p <= 1:
            raise EngineError(f"top_p: must be in (0, 1], got {top_p}")
        if min_p is not None and not 0 <= min_p <= 1:
            raise EngineError(f"min_p: must be in [0, 1], got {min_p}")
        if repetition_penalty is not None and repetition_penalty <= 0:
            raise EngineError(f"repetition_penalty: must be > 0, got {repetition_penalty}")
        self.temperature, self.top_k, self.top_p, self.min_p = temperature, top_k, top_p, min_p
        self.repetition_penalty = repetition_penalty
        self.rng = np.random.default_rng(seed)

    def sample(self, logits: np.ndarray, history: Sequence[int]) -> int:
        x = np.asarray(logits, dtype=np.float64).copy()
        if self.repetition_penalty and self.repetition_penalty != 1.0 and len(history):
            seen = np.unique(np.asarray(history, dtype=np.int64))
            vals = x[seen]
            x[seen] = np.where(vals > 0, vals / self.repetition_penalty, vals * self.repetition_penalty)
        if self.temperature == 0:
            return int(np.argmax(x))
        x /= self.temperature
        if self.top_k is not None and self.top_k < x.size:
            kth = np.partition(x, -self.top_k)[-self.top_k]
            x[x < kth] = -np.inf
        p = np.exp(x - x.max())
        p /= p.sum()
        if self.top_p is not None and self.top_p < 1.0:
            order = np.argsort(-p, kind="stable")
            cum = np.cumsum(p[order])
            # keep the smallest prefix whose mass reaches top_p (always at least one token)
            cut = int(np.searchsorted(cum, self.top_p)) + 1
            mask = np.zeros_like(p, dtype=bool)
            mask[order[:cut]] = True
            p = np.where(mask, p, 0.0)
            p /= p.sum()
        if self.min_p:
            p = np.where(p >= self.min_p * p.max(), p, 0.0)
            p /= p.sum()
        return int(self.rng.choice(p.size, p=p))
