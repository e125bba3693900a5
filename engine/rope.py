"""Rotary position embeddings (the rotate-half layout Hugging Face checkpoints use)."""
from __future__ import annotations

import math

import numpy as np

from .spec import ModelSpec


def inverse_frequencies(spec: ModelSpec) -> np.ndarray:
    d = spec.head_dim
    inv = 1.0 / spec.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    s = spec.rope_scaling
    if not s:
        return inv
    if s["rope_type"] == "linear":
        return inv / float(s["factor"])
    # llama3: long wavelengths slowed by `factor`, short ones kept, a smooth blend between.
    factor, lo, hi = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old / lo, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / hi) & (wavelen <= old / lo)
    return np.where(medium, blended, scaled)


class Rope:
    def __init__(self, spec: ModelSpec):
        self.inv = inverse_frequencies(spec)

    def tables(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ang = positions.astype(np.float64)[:, None] * self.inv[None, :]
        ang = np.concatenate([ang, ang], axis=1)
        return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)

    @staticmethod
    def apply(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        """x: (n, heads, head_dim); cos/sin: (n, head_dim)."""
        half = x.shape[-1] // 2
        rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        return x * cos[:, None, :] + rotated * sin[:, None, :]
