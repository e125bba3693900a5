"""Numeric kernels: GGUF-compatible block formats and matrix products over them.

Every weight matrix is held as uint8 bytes of shape (rows, row_bytes) plus a format name;
float formats are the same bytes viewed as their dtype.  This module's public API is the
contract the engine relies on; the implementations behind it may be replaced by faster ones.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# format -> (weights per block, bytes per block)
BLOCK = {
    "f32": (1, 4),
    "f16": (1, 2),
    "bf16": (1, 2),
    "q8_0": (32, 34),
    "q4_0": (32, 18),
    "q4_k": (256, 144),
    "q6_k": (256, 210),
}
FORMATS = tuple(BLOCK)


class FormatError(ValueError):
    """A format name or a shape the format cannot hold."""


def row_bytes(fmt: str, cols: int) -> int:
    """Bytes one row of `cols` weights takes in `fmt`."""
    try:
        per_block, nbytes = BLOCK[fmt]
    except KeyError:
        raise FormatError(f"unknown weight format {fmt!r} (known: {', '.join(FORMATS)})") from None
    if cols % per_block:
        raise FormatError(f"format {fmt} needs a row length divisible by {per_block}, got {cols}")
    return cols // per_block * nbytes


def _bf16_to_f32(u16: np.ndarray) -> np.ndarray:
    return (u16.astype(np.uint32) << 16).view(np.float32)


def _f32_to_bf16(x: np.ndarray) -> np.ndarray:
    # Round to nearest even, NaNs kept quiet: the rule gguf-py and torch use.
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    return np.where(nan, ((u >> 16) | 64).astype(np.uint16), rounded)


def quantize(x: np.ndarray, fmt: str) -> np.ndarray:
    """float32 (rows, cols) -> uint8 (rows, row_bytes(fmt, cols))."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise FormatError(f"quantize expects a 2-D matrix, got shape {x.shape}")
    row_bytes(fmt, x.shape[1])
    if fmt == "f32":
        return x.view(np.uint8).reshape(x.shape[0], -1)
    if fmt == "f16":
        return x.astype(np.float16).view(np.uint8).reshape(x.shape[0], -1)
    if fmt == "bf16":
        return _f32_to_bf16(x).view(np.uint8).reshape(x.shape[0], -1)
    raise FormatError(f"quantize to {fmt} is not implemented yet")


def dequantize(q: np.ndarray, fmt: str, cols: int) -> np.ndarray:
    """uint8 (rows, row_bytes) -> float32 (rows, cols)."""
    q = np.ascontiguousarray(q)
    rows = q.shape[0]
    if fmt == "f32":
        return q.view(np.float32).reshape(rows, cols)
    if fmt == "f16":
        return q.view(np.float16).reshape(rows, cols).astype(np.float32)
    if fmt == "bf16":
        return _bf16_to_f32(q.view(np.uint16).reshape(rows, cols))
    raise FormatError(f"dequantize from {fmt} is not implemented yet")


def matmul(q: np.ndarray, fmt: str, cols: int, X: np.ndarray) -> np.ndarray:
    """W @ X.T for X of shape (n, cols): returns float32 (n, rows)."""
    return np.asarray(X, dtype=np.float32) @ dequantize(q, fmt, cols).T


def matvec(q: np.ndarray, fmt: str, cols: int, x: np.ndarray) -> np.ndarray:
    """W @ x for x of shape (cols,): returns float32 (rows,)."""
    return matmul(q, fmt, cols, np.asarray(x, dtype=np.float32)[None, :])[0]


@dataclass(frozen=True)
class QMatrix:
    """One weight matrix in a block format: `data` is uint8 (rows, row_bytes(fmt, cols))."""

    data: np.ndarray
    fmt: str
    rows: int
    cols: int

    @classmethod
    def from_float(cls, w: np.ndarray, fmt: str = "f32") -> QMatrix:
        w = np.asarray(w, dtype=np.float32)
        return cls(quantize(w, fmt), fmt, w.shape[0], w.shape[1])

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def matmul(self, X: np.ndarray) -> np.ndarray:
        """(n, cols) -> (n, rows)."""
        return matmul(self.data, self.fmt, self.cols, X)

    def rows_f32(self, idx: np.ndarray) -> np.ndarray:
        """Dequantized rows `idx` (an embedding lookup) as float32 (len(idx), cols)."""
        return dequantize(self.data[np.asarray(idx)], self.fmt, self.cols)

    def to_float(self) -> np.ndarray:
        return dequantize(self.data, self.fmt, self.cols)


def expert_ffn(gate: QMatrix, up: QMatrix, down: QMatrix, X: np.ndarray) -> np.ndarray:
    """down(silu(gate X) * (up X)) for X of shape (n, hidden): returns float32 (n, hidden)."""
    g = gate.matmul(X)
    u = up.matmul(X)
    h = g / (1.0 + np.exp(-g)) * u
    return down.matmul(h)


def set_threads(n: int | None) -> None:
    """Threads the kernels may use (None: all cores)."""
