"""GGUF block formats the kernels do not compute, decoded so that a store can hold them in one they do.

llama.cpp's files carry a few more types than our kernels run: Q5_0, Q5_1 and Q4_1, which
llama-quantize falls back to where a row is not a multiple of 256 weights (Q4_K -> Q5_0, Q5_K -> Q5_1).
`mer-tui convert` stores such a tensor as q8_0: Q5_0 exactly (its 5-bit integers and scale fit q8_0's
block as they are), the others re-quantized from their values, an 8-bit rounding of 5-bit weights.
Plain numpy; gguf-py's dequantizers are the reference in tests.
"""
from __future__ import annotations

import numpy as np

from . import formats
from .formats import FormatError, _f16

# format -> (weights per block, bytes per block)
BLOCK: dict[str, tuple[int, int]] = {"q4_1": (32, 20), "q5_0": (32, 22), "q5_1": (32, 24)}
FORMATS = tuple(BLOCK)


def row_bytes(fmt: str, cols: int) -> int:
    return formats.row_bytes(fmt, cols, BLOCK)


def _nibbles32(qs: np.ndarray) -> np.ndarray:
    """16 bytes per block -> its 32 4-bit values: low nibbles are weights 0-15, high ones 16-31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _high_bits32(qh: np.ndarray) -> np.ndarray:
    """4 bytes (a little-endian uint32) per block -> bit j of it for weights 0-31, as 0 or 16."""
    bits = np.unpackbits(np.ascontiguousarray(qh), axis=1, bitorder="little")
    return bits.astype(np.uint8) << 4


def _q5_0_ints(b: np.ndarray) -> np.ndarray:
    return (_nibbles32(b[:, 6:]) | _high_bits32(b[:, 2:6])).astype(np.int8) - np.int8(16)


def _deq_q4_1(b: np.ndarray) -> np.ndarray:
    return _f16(b[:, 0:2]) * _nibbles32(b[:, 4:]).astype(np.float32) + _f16(b[:, 2:4])


def _deq_q5_0(b: np.ndarray) -> np.ndarray:
    return _f16(b[:, 0:2]) * _q5_0_ints(b).astype(np.float32)


def _deq_q5_1(b: np.ndarray) -> np.ndarray:
    q = (_nibbles32(b[:, 8:]) | _high_bits32(b[:, 4:8])).astype(np.float32)
    return _f16(b[:, 0:2]) * q + _f16(b[:, 2:4])


_DEQ = {"q4_1": _deq_q4_1, "q5_0": _deq_q5_0, "q5_1": _deq_q5_1}


def dequantize(q: np.ndarray, fmt: str, cols: int) -> np.ndarray:
    """uint8 (rows, row_bytes) of `fmt` -> float32 (rows, cols)."""
    rows = q.shape[0]
    per, nbytes = BLOCK[fmt]
    if q.shape[1] != row_bytes(fmt, cols):
        raise FormatError(f"{fmt}: rows of {q.shape[1]} bytes, expected {row_bytes(fmt, cols)} for {cols} columns")
    return _DEQ[fmt](np.ascontiguousarray(q).reshape(-1, nbytes)).reshape(rows, cols)


def q5_0_as_q8_0(q: np.ndarray) -> np.ndarray:
    """Q5_0 rows -> the same values as q8_0 rows, exactly: each block's f16 scale kept, its integers
    (-16..15) written as int8."""
    rows = q.shape[0]
    b = np.ascontiguousarray(q).reshape(-1, 22)
    out = np.empty((b.shape[0], 34), dtype=np.uint8)
    out[:, :2] = b[:, :2]
    out[:, 2:] = _q5_0_ints(b).view(np.uint8)
    return out.reshape(rows, -1)
