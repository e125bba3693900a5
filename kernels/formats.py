"""Block formats (GGUF/ggml layouts) and their portable numpy reference codecs.

Everything here is plain numpy and defines the bytes: the faster numba and C paths must agree
with `dequantize_ref` bit for bit, and `quantize_ref` reproduces ggml's reference quantizers
(and so gguf-py's) byte for byte for f16, bf16, q8_0 and q4_0.  The q4_k and q6_k quantizers are
iterative searches that numpy cannot vectorize well; they live in `kquant.py` (numba).
"""
from __future__ import annotations

import numpy as np

# format -> (weights per block, bytes per block)
BLOCK: dict[str, tuple[int, int]] = {
    "f32": (1, 4),
    "f16": (1, 2),
    "bf16": (1, 2),
    "q8_0": (32, 34),
    "q4_0": (32, 18),
    "q4_k": (256, 144),
    "q6_k": (256, 210),
    "q5_k": (256, 176),
    "q3_k": (256, 110),
    "q2_k": (256, 84),
    "iq4_nl": (32, 18),
    "iq4_xs": (256, 136),
    "q4_1": (32, 20),
    "q5_0": (32, 22),
    "q5_1": (32, 24),
    "q4_0x8": (32, 18),
    "q4_kx8": (256, 144),
    "q8_0x8": (32, 34),
    "iq4_xsx8": (256, 136),
    "q5_kx8": (256, 176),
}
FORMATS: tuple[str, ...] = tuple(BLOCK)
FLOAT_FORMATS: tuple[str, ...] = ("f32", "f16", "bf16")
# Formats the kernels compute but never write: they come from llama.cpp's files as they are (Q5_K_M,
# Q3_K_M, Q2_K, IQ4_XS files, and q4_1, q5_0, q5_1, iq4_nl where llama-quantize falls back on rows that
# are not whole 256-weight super-blocks) and have no quantizer here.
READ_ONLY: tuple[str, ...] = ("q5_k", "q3_k", "q2_k", "iq4_nl", "iq4_xs", "q4_1", "q5_0", "q5_1")
# The 16 values an iq4 nibble stands for (ggml's kvalues_iq4nl): a non-uniform grid, denser near 0.
IQ4_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8)
QK_K = 256

# Rows per numpy chunk when (de)quantizing: bounds the temporaries numpy creates (several copies
# of the chunk in float32) whatever the matrix size.
_CHUNK_WEIGHTS = 1 << 22


class FormatError(ValueError):
    """A format name or a shape the format cannot hold."""


def row_bytes(fmt: str, cols: int, blocks: dict[str, tuple[int, int]] = BLOCK) -> int:
    """Bytes one row of `cols` weights takes in `fmt` (a format of `blocks`: the kernels' by default)."""
    try:
        per_block, nbytes = blocks[fmt]
    except KeyError:
        raise FormatError(f"unknown weight format {fmt!r} (known: {', '.join(blocks)})") from None
    if cols % per_block:
        raise FormatError(f"format {fmt} needs a row length divisible by {per_block}, got {cols}")
    return cols // per_block * nbytes


def check_bytes(q: np.ndarray, fmt: str, cols: int) -> np.ndarray:
    """`q` as a C-contiguous uint8 (rows, row_bytes) matrix, or FormatError naming the mismatch."""
    rb = row_bytes(fmt, cols)
    q = np.asarray(q)
    if q.dtype != np.uint8:
        q = q.view(np.uint8) if q.flags.c_contiguous else np.ascontiguousarray(q).view(np.uint8)
    if q.ndim == 1:
        q = q.reshape(-1, rb) if q.size % rb == 0 else q
    if q.ndim != 2 or q.shape[1] != rb:
        raise FormatError(
            f"{fmt} data with {cols} columns needs shape (rows, {rb}) of uint8, got {q.shape}")
    return np.ascontiguousarray(q)


def bf16_to_f32(u16: np.ndarray) -> np.ndarray:
    """bfloat16 bits -> float32, exact (bf16 is the top half of a float32)."""
    return (u16.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, round to nearest even, NaNs kept quiet: ggml's (and gguf-py's) rule."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    # uint64 so that the rounding add cannot wrap for values just below 0xFFFFFFFF (NaNs, handled below).
    rounded = ((u.astype(np.uint64) + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    return np.where(nan, ((u >> 16) | 64).astype(np.uint16), rounded)


def _round_away(n: np.ndarray) -> np.ndarray:
    # ggml's roundf: halves away from zero (np.round would round halves to even).
    a = np.abs(n)
    floored = np.floor(a)
    return np.sign(n) * (floored + np.floor(2 * (a - floored)))


def _quant_q8_0(blocks: np.ndarray) -> np.ndarray:
    # Same operations, in the same float32 order, as ggml's quantize_row_q8_0_ref: byte-exact.
    d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
        qs = _round_away(blocks * inv).astype(np.int8)
    return np.concatenate([d.astype(np.float16).view(np.uint8), qs.view(np.uint8)], axis=1)


def _quant_q4_0(blocks: np.ndarray) -> np.ndarray:
    # ggml's quantize_row_q4_0_ref: the signed value of largest magnitude maps to -8.
    n = blocks.shape[0]
    imax = np.abs(blocks).argmax(axis=-1, keepdims=True)
    vmax = np.take_along_axis(blocks, imax, axis=-1)
    d = vmax / np.float32(-8)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
        qs = np.trunc(blocks * inv + np.float32(8.5)).astype(np.uint8).clip(0, 15)
    qs = qs.reshape(n, 2, 16)
    packed = qs[:, 0, :] | (qs[:, 1, :] << np.uint8(4))
    return np.concatenate([d.astype(np.float16).view(np.uint8), packed], axis=1)


# Interleaved layouts ("x8"): a GGUF block format with each run of eight rows interleaved block by
# block, so that a kernel reads eight rows as one sequential stream, finds each field of their block
# headers side by side (eight f16 scales in one 16-byte load), and puts one row in each 32-bit lane.
# Block b of rows 8g..8g+7 is eight blocks' bytes: each header field for rows 0..7 in turn (q4_0 and
# q8_0: the f16 scale; q4_k and q5_k: d, dmin, then each of the 12 packed scale bytes; iq4_xs: d, the 16
# high scale bits, then each of the 4 bytes of low scale bits), then the payload (the rest of the block:
# q5_k's 32 bytes of fifth bits, then its nibbles) two bytes at a time (bytes 2k, 2k+1 of row 0, of row
# 1, ... of row 7, for k = 0, 1, ...).  The same bytes, moved: what llama.cpp's CPU repacking does at
# load, here written so in stores.
X8_ROWS = 8
# layout -> (the GGUF format whose bytes it moves, its header fields as (count, bytes each))
X8_FIELDS: dict[str, tuple[str, tuple[tuple[int, int], ...]]] = {
    "q4_0x8": ("q4_0", ((1, 2),)),
    "q4_kx8": ("q4_k", ((2, 2), (12, 1))),
    "q8_0x8": ("q8_0", ((1, 2),)),
    "iq4_xsx8": ("iq4_xs", ((1, 2), (1, 2), (4, 1))),
    "q5_kx8": ("q5_k", ((2, 2), (12, 1))),
}
# A layout's format -> the GGUF format whose bytes it moves.
INTERLEAVED: dict[str, str] = {fmt: base for fmt, (base, _) in X8_FIELDS.items()}
_X8_OF = {base: fmt for fmt, base in INTERLEAVED.items()}


def check_rows(fmt: str, rows: int) -> None:
    """FormatError when `fmt` cannot hold a matrix of `rows` rows (an x8 layout: a multiple of 8)."""
    if fmt in INTERLEAVED and rows % X8_ROWS:
        raise FormatError(f"{fmt} needs a row count divisible by {X8_ROWS}, got {rows}")


def layout(fmt: str | None, rows: int) -> str | None:
    """The format the kernels hold a `rows`-row matrix of GGUF format `fmt` in: its x8 layout (q4_0x8,
    q4_kx8, q8_0x8) where there is one and the rows allow it, every other format (and None) as it is."""
    x8 = _X8_OF.get(fmt)  # type: ignore[arg-type]
    return x8 if x8 is not None and rows % X8_ROWS == 0 else fmt


def gguf_format(fmt: str) -> str:
    """The GGUF format whose bytes `fmt` holds: q4_0 for q4_0x8 (and so on), else `fmt` itself."""
    return INTERLEAVED.get(fmt, fmt)


def x8_positions(fmt: str) -> np.ndarray:
    """(8, block bytes) int64: where byte i of row r's block lies in an x8 run's block of 8 blocks."""
    base, fields = X8_FIELDS[fmt]
    nbytes = BLOCK[base][1]
    pos = np.empty((X8_ROWS, nbytes), dtype=np.int64)
    rows = np.arange(X8_ROWS)
    src = dst = 0
    for count, width in fields:
        for c in range(count):
            for t in range(width):
                pos[:, src + c * width + t] = dst + (c * X8_ROWS + rows) * width + t
        src += count * width
        dst += X8_ROWS * count * width
    for k in range((nbytes - src) // 2):
        for t in range(2):
            pos[:, src + 2 * k + t] = dst + 16 * k + 2 * rows + t
    return pos


def _runs(q: np.ndarray, fmt: str) -> tuple[int, int, int, np.ndarray]:
    check_rows(fmt, q.shape[0])
    nbytes = BLOCK[INTERLEAVED[fmt]][1]
    return q.shape[0] // X8_ROWS, q.shape[1] // nbytes, nbytes, x8_positions(fmt).reshape(-1)


def interleave(q: np.ndarray, fmt: str) -> np.ndarray:
    """GGUF bytes (rows, row_bytes) of gguf_format(fmt) -> the same matrix in x8 layout `fmt`."""
    g, nb, nbytes, pos = _runs(q, fmt)
    blocks = q.reshape(g, X8_ROWS, nb, nbytes).transpose(0, 2, 1, 3).reshape(g, nb, X8_ROWS * nbytes)
    source = np.empty_like(pos)   # which byte of the eight blocks each x8 byte is: a gather, which
    source[pos] = np.arange(pos.size)  # numpy does twice as fast as the scatter out[..., pos] = blocks
    return np.take(blocks, source, axis=2).reshape(q.shape)


def deinterleave(q: np.ndarray, fmt: str) -> np.ndarray:
    """x8 layout `fmt` -> the GGUF bytes it holds (interleave undone)."""
    g, nb, nbytes, pos = _runs(q, fmt)
    blocks = np.take(q.reshape(g, nb, X8_ROWS * nbytes), pos, axis=2).reshape(g, nb, X8_ROWS, nbytes)
    return np.ascontiguousarray(blocks.transpose(0, 2, 1, 3)).reshape(q.shape)


def quant_input(x: np.ndarray, fmt: str) -> tuple[np.ndarray, int, int, int]:
    """The checks every quantizer makes: (x as contiguous float32, rows, cols, row_bytes)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise FormatError(f"quantize expects a 2-D matrix, got shape {x.shape}")
    rows, cols = x.shape
    return x, rows, cols, row_bytes(fmt, cols)


def quantize_ref(x: np.ndarray, fmt: str) -> np.ndarray:
    """float32 (rows, cols) -> uint8 (rows, row_bytes) for the float formats, q8_0 and q4_0."""
    x, rows, cols, rb = quant_input(x, fmt)
    if fmt == "f32":
        return x.view(np.uint8).reshape(rows, rb)
    if fmt == "f16":
        return x.astype(np.float16).view(np.uint8).reshape(rows, rb)
    if fmt == "bf16":
        return f32_to_bf16(x).view(np.uint8).reshape(rows, rb)
    if fmt in INTERLEAVED:
        if INTERLEAVED[fmt] not in ("q8_0", "q4_0"):
            raise FormatError(f"no numpy quantizer for {fmt}")
        return interleave(quantize_ref(x, INTERLEAVED[fmt]), fmt)
    fn = {"q8_0": _quant_q8_0, "q4_0": _quant_q4_0}.get(fmt)
    if fn is None:
        raise FormatError(f"no numpy quantizer for {fmt}")
    out = np.empty((rows, rb), dtype=np.uint8)
    step = max(1, _CHUNK_WEIGHTS // max(cols, 1))
    for r0 in range(0, rows, step):
        chunk = x[r0:r0 + step]
        out[r0:r0 + step] = fn(chunk.reshape(-1, 32)).reshape(chunk.shape[0], rb)
    return out


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _deq_q8_0(b: np.ndarray) -> np.ndarray:
    return b[:, 2:].view(np.int8).astype(np.float32) * _f16(b[:, :2])


def nibbles32(qs: np.ndarray) -> np.ndarray:
    """16 bytes per 32-weight block -> its 32 4-bit values: low nibbles are weights 0-15, high ones 16-31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _high_bits32(qh: np.ndarray) -> np.ndarray:
    """4 bytes (a little-endian uint32) per block -> bit j of it for weights 0-31, as 0 or 16."""
    bits = np.unpackbits(np.ascontiguousarray(qh), axis=1, bitorder="little")
    return bits.astype(np.uint8) << 4


def _deq_q4_0(b: np.ndarray) -> np.ndarray:
    q = nibbles32(b[:, 2:]).astype(np.int8) - np.int8(8)
    return _f16(b[:, :2]) * q.astype(np.float32)


def _deq_q4_1(b: np.ndarray) -> np.ndarray:
    return _f16(b[:, 0:2]) * nibbles32(b[:, 4:]).astype(np.float32) + _f16(b[:, 2:4])


def _deq_q5_0(b: np.ndarray) -> np.ndarray:
    q = (nibbles32(b[:, 6:]) | _high_bits32(b[:, 2:6])).astype(np.int8) - np.int8(16)
    return _f16(b[:, 0:2]) * q.astype(np.float32)


def _deq_q5_1(b: np.ndarray) -> np.ndarray:
    q = (nibbles32(b[:, 8:]) | _high_bits32(b[:, 4:8])).astype(np.float32)
    return _f16(b[:, 0:2]) * q + _f16(b[:, 2:4])


def q4_k_scales_mins(sc12: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 12 packed bytes of q4_k super-blocks -> (scales, mins) as uint8 (n, 8), 6 bits each."""
    s = sc12.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=1)
    return sc, mn


def k_scales(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """q4_k / q5_k super-blocks' first 16 bytes (d, dmin, 12 packed bytes) -> each sub-block's scale
    and min as float32 (n, 8, 1): the products ggml forms first, so that a weight is then one
    multiply and one subtract, as in ggml."""
    n = b.shape[0]
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = q4_k_scales_mins(b[:, 4:16])
    return (d * sc.astype(np.float32)).reshape(n, 8, 1), (dmin * mn.astype(np.float32)).reshape(n, 8, 1)


def k_nibbles(qs: np.ndarray) -> np.ndarray:
    """128 bytes of 4-bit values per super-block -> (n, 8, 32) in sub-block order: sub-block s is
    nibble s % 2 of bytes 32 * (s // 2) ... + 32."""
    n = qs.shape[0]
    shifted = qs.reshape(n, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return (shifted & 0x0F).reshape(n, 8, 32)


def _deq_q4_k(b: np.ndarray) -> np.ndarray:
    ds, dm = k_scales(b)
    return (ds * k_nibbles(b[:, 16:]).astype(np.float32) - dm).reshape(b.shape[0], QK_K)


def _deq_q5_k(b: np.ndarray) -> np.ndarray:
    """q4_k's layout with a fifth bit per weight: bit s of byte l of qh for weight l of sub-block s."""
    n = b.shape[0]
    ds, dm = k_scales(b)
    hi = (b[:, 16:48].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
    q = (k_nibbles(b[:, 48:]) | (hi << 4)).astype(np.float32)
    return (ds * q - dm).reshape(n, QK_K)


def k_crumbs(qs: np.ndarray) -> np.ndarray:
    """64 bytes of 2-bit values per super-block (q2_k, q3_k) -> (n, 16, 16) in weight order: weight
    128 h + 32 j + l is bits 2j..2j+1 of byte 32 h + l."""
    n = qs.shape[0]
    shifted = qs.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    return (shifted & 3).reshape(n, 16, 16)


def q3_k_scales(sc12: np.ndarray) -> np.ndarray:
    """q3_k's 12 packed bytes -> its 16 signed 6-bit scales as int8 (n, 16): the low four bits of scale
    k are a nibble of byte k % 8 (low for k < 8), the high two bits 2 (k // 4) of byte 8 + k % 4."""
    k = np.arange(16)
    low = (sc12[:, k % 8] >> np.where(k < 8, 0, 4).astype(np.uint8)) & 0x0F
    high = (sc12[:, 8 + k % 4] >> (2 * (k // 4)).astype(np.uint8)) & 3
    return (low | (high << 4)).astype(np.int8) - np.int8(32)


def _deq_q3_k(b: np.ndarray) -> np.ndarray:
    # hmask bit 4 h + j of byte l (l < 32) is weight 128 h + 32 j + l's third bit; clear means minus 4.
    n = b.shape[0]
    hm, qs, sc, d = b[:, :32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
    hbit = (hm.reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
    q = k_crumbs(qs).astype(np.int8) - (np.int8(4) * (1 - hbit.astype(np.int8))).reshape(n, 16, 16)
    dl = (d * q3_k_scales(sc).astype(np.float32)).reshape(n, 16, 1)
    return (dl * q.astype(np.float32)).reshape(n, QK_K)


def _deq_q2_k(b: np.ndarray) -> np.ndarray:
    # 16 sub-blocks of 16: byte k of the scales holds sub-block k's scale (low nibble) and min (high).
    n = b.shape[0]
    sc, qs, d, dmin = b[:, :16], b[:, 16:80], _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (sc & 0x0F).astype(np.float32)).reshape(n, 16, 1)
    ml = (dmin * (sc >> 4).astype(np.float32)).reshape(n, 16, 1)
    return (dl * k_crumbs(qs).astype(np.float32) - ml).reshape(n, QK_K)


def _iq4_values(qs: np.ndarray) -> np.ndarray:
    """16 bytes per 32-weight block -> its 32 grid values as float32."""
    return IQ4_VALUES[nibbles32(qs)].astype(np.float32)


def _deq_iq4_nl(b: np.ndarray) -> np.ndarray:
    return _f16(b[:, :2]) * _iq4_values(b[:, 2:])


def _deq_iq4_xs(b: np.ndarray) -> np.ndarray:
    # d, then 16 high bits (two per 32-block), 4 bytes of low nibbles, 128 bytes of values: block k's
    # 6-bit scale (stored plus 32) is nibble k % 2 of byte k // 2, with bits 2k, 2k+1 of the high word.
    n = b.shape[0]
    high = b[:, 2:4].copy().view(np.uint16) >> (2 * np.arange(8, dtype=np.uint16))
    low = (b[:, 4:8].reshape(n, 4, 1) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2)).reshape(n, 8) & 0x0F
    scale = (low | ((high & 3).astype(np.uint8) << 4)).astype(np.int8) - np.int8(32)
    dl = (_f16(b[:, :2]) * scale.astype(np.float32)).reshape(n, 8, 1)
    return (dl * _iq4_values(b[:, 8:].reshape(n, 8, 16))).reshape(n, QK_K)


def _deq_q6_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    ql, qh, sc = b[:, :128], b[:, 128:192], b[:, 192:208]
    d = (_f16(b[:, 208:210]) * sc.view(np.int8).astype(np.float32)).reshape(n, 16, 1)
    lo = ql.reshape(n, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    lo = (lo & 0x0F).reshape(n, 2, 4, 32)
    hi = qh.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    hi = (hi & 0x03).reshape(n, 2, 4, 32)
    q = (lo | (hi << 4)).astype(np.int8) - np.int8(32)
    return (d * q.reshape(n, 16, 16).astype(np.float32)).reshape(n, QK_K)


_DEQ = {"q8_0": _deq_q8_0, "q4_0": _deq_q4_0, "q4_k": _deq_q4_k, "q6_k": _deq_q6_k, "q5_k": _deq_q5_k,
        "q3_k": _deq_q3_k, "q2_k": _deq_q2_k, "iq4_nl": _deq_iq4_nl, "iq4_xs": _deq_iq4_xs,
        "q4_1": _deq_q4_1, "q5_0": _deq_q5_0, "q5_1": _deq_q5_1}


def dequantize_ref(q: np.ndarray, fmt: str, cols: int) -> np.ndarray:
    """uint8 (rows, row_bytes) -> float32 (rows, cols), bit-identical to gguf-py and ggml."""
    q = check_bytes(q, fmt, cols)
    rows = q.shape[0]
    if fmt == "f32":
        return q.view(np.float32).reshape(rows, cols)
    if fmt == "f16":
        return q.view(np.float16).reshape(rows, cols).astype(np.float32)
    if fmt == "bf16":
        return bf16_to_f32(q.view(np.uint16).reshape(rows, cols))
    if fmt in INTERLEAVED:
        return dequantize_ref(deinterleave(q, fmt), INTERLEAVED[fmt], cols)
    per_block, nbytes = BLOCK[fmt]
    out = np.empty((rows, cols), dtype=np.float32)
    step = max(1, _CHUNK_WEIGHTS // max(cols, 1))
    for r0 in range(0, rows, step):
        chunk = q[r0:r0 + step]
        out[r0:r0 + step] = _DEQ[fmt](chunk.reshape(-1, nbytes)).reshape(chunk.shape[0], cols)
    return out
