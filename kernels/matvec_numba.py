"""numba kernels: dequantization (bit-exact with formats.dequantize_ref) and matrix-vector products.

The portable fast path: it runs wherever numba does, and it is the fallback when the C kernels
cannot be built.  Each kernel works on a range of rows and releases the GIL (nogil), and
`_run` spreads row ranges over a thread pool.  That, rather than parallel=True/prange, because
parfor compilation takes 2-3x longer (seconds per kernel, paid on every machine's first run and
by the test suite), and because numba's workqueue threading layer, where it is the only one,
aborts on concurrent calls while the engine calls from two threads.  Dot products use fastmath
(LLVM may reorder and vectorize the float32 sums: float32-level rounding only); dequantization
does not, so that every value rounds exactly as ggml's.  f16 scales are read through a
65536-entry table, because numba has no float16 arithmetic.

Each block format's decoding therefore appears twice, once exact in deq_* and once fused into the
fastmath product mm_*.  Sharing it (a block decoder writing into a row buffer that a fastmath dot
then reads, inlined or not) was tried and measured on 2048x4096 matrices, one thread: products
fell from 7.0-8.1 to 0.9-1.5 G weights/s for q8_0, q4_0 and q4_k, because the decode loops only
vectorize fused into the dot's fastmath loop.  The portable path keeps the copies for that speed.
"""
from __future__ import annotations

import itertools
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numba import njit

from .formats import IQ4_VALUES, x8_positions

# float16 bit pattern -> float32 value, exact for every pattern (NaNs and infinities included).
F16_TABLE = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)

F0 = np.float32(0.0)
F4 = np.float32(4.0)
F8 = np.float32(8.0)
F16 = np.float32(16.0)
F32 = np.float32(32.0)
INV4 = np.float32(0.25)
INV16 = np.float32(0.0625)


@njit(cache=True)
def _h(tab, q, r, o):
    return tab[np.int64(q[r, o]) | (np.int64(q[r, o + 1]) << 8)]


# ---------------------------------------------------------------- dequantization (exact)

@njit(nogil=True, cache=True)
def deq_f16(q, tab, out, r0, r1):
    cols = out.shape[1]
    for r in range(r0, r1):
        for i in range(cols):
            out[r, i] = _h(tab, q, r, 2 * i)


@njit(nogil=True, cache=True)
def deq_bf16(q, out, r0, r1):
    cols = out.shape[1]
    u = q.view(np.uint16)
    o32 = out.view(np.uint32)
    for r in range(r0, r1):
        for i in range(cols):
            o32[r, i] = np.uint32(u[r, i]) << np.uint32(16)


@njit(cache=True)
def _nibbles(vf):
    # Low and high nibble of a byte held as float32 (exact: small integers, power-of-two scale).
    # Integer masks would not do: numba widens every small-int operation to int64, and AVX2 has
    # no int64 -> float conversion, so LLVM falls back to scalar code (3x slower here).
    hi = np.floor(vf * INV16)
    return vf - F16 * hi, hi


@njit(cache=True)
def _crumbs(vf):
    # The four 2-bit fields of a byte held as float32, lowest first (same reason as _nibbles).
    f1 = np.floor(vf * INV4)
    f2 = np.floor(f1 * INV4)
    f3 = np.floor(f2 * INV4)
    return vf - F4 * f1, f1 - F4 * f2, f2 - F4 * f3, f3


@njit(nogil=True, cache=True)
def deq_q8_0(q, q8, tab, out, r0, r1):
    cols = out.shape[1]
    for r in range(r0, r1):
        for b in range(cols // 32):
            o = 34 * b
            d = _h(tab, q, r, o)
            for i in range(32):
                out[r, 32 * b + i] = np.float32(q8[r, o + 2 + i]) * d


@njit(nogil=True, cache=True)
def deq_q4_0(q, tab, out, r0, r1):
    cols = out.shape[1]
    for r in range(r0, r1):
        for b in range(cols // 32):
            o = 18 * b
            d = _h(tab, q, r, o)
            for i in range(16):
                lo, hi = _nibbles(np.float32(q[r, o + 2 + i]))
                out[r, 32 * b + i] = d * (lo - F8)
                out[r, 32 * b + 16 + i] = d * (hi - F8)


@njit(nogil=True, cache=True)
def _gather_row(qf, rb, pos, r, tmp):
    # Row r of an x8-layout matrix (flat bytes qf, row bytes rb) as its GGUF format holds it, into
    # tmp (1, rb): pos (8, block bytes) says where each byte of a row's block lies in its run's block.
    nbytes = pos.shape[1]
    base = (r - r % 8) * rb
    for b in range(rb // nbytes):
        o = base + 8 * nbytes * b
        for i in range(nbytes):
            tmp[0, nbytes * b + i] = qf[o + pos[r % 8, i]]


@njit(cache=True)
def _q4k_sm(q, r, o, j):
    # ggml get_scale_min_k4: 6-bit scale and min of sub-block j from the 12 packed bytes at o+4.
    s = o + 4
    if j < 4:
        return q[r, s + j] & 63, q[r, s + j + 4] & 63
    sc = (q[r, s + j + 4] & 0xF) | ((q[r, s + j - 4] >> 6) << 4)
    mn = (q[r, s + j + 4] >> 4) | ((q[r, s + j] >> 6) << 4)
    return sc, mn


@njit(cache=True)
def _k45(q, r, o, c, l, five):
    # Weights l and 32 + l of 64-weight run c of a q4_k (five=0) or q5_k super-block at o, as float32: the
    # nibbles of byte l of the run (q5_k's start at 48, after its 32 bytes of fifth bits), and for q5_k
    # bits 2c, 2c+1 of qh[l] as 16.
    if not five:
        return _nibbles(np.float32(q[r, o + 16 + 32 * c + l]))
    v = q[r, o + 48 + 32 * c + l]
    hb = q[r, o + 16 + l]
    return (np.float32((v & 15) | (((hb >> (2 * c)) & 1) << 4)),
            np.float32((v >> 4) | (((hb >> (2 * c + 1)) & 1) << 4)))


@njit(nogil=True, cache=True)
def deq_q45_k(q, tab, out, r0, r1, five):
    cols = out.shape[1]
    bs = 176 if five else 144
    for r in range(r0, r1):
        for s in range(cols // 256):
            o = bs * s
            d = _h(tab, q, r, o)
            dmin = _h(tab, q, r, o + 2)
            for c in range(4):
                sc1, m1 = _q4k_sm(q, r, o, 2 * c)
                sc2, m2 = _q4k_sm(q, r, o, 2 * c + 1)
                d1 = d * np.float32(sc1)
                dm1 = dmin * np.float32(m1)
                d2 = d * np.float32(sc2)
                dm2 = dmin * np.float32(m2)
                base = 256 * s + 64 * c
                for l in range(32):
                    lo, hi = _k45(q, r, o, c, l, five)
                    out[r, base + l] = d1 * lo - dm1
                    out[r, base + 32 + l] = d2 * hi - dm2


@njit(cache=True)
def _q6(q, r, ql, qh, l):
    # The four 6-bit codes (minus 32) that byte l of a q6_k half encodes, as float32.
    alo, ahi = _nibbles(np.float32(q[r, ql + l]))
    blo, bhi = _nibbles(np.float32(q[r, ql + l + 32]))
    h0, h1, h2, h3 = _crumbs(np.float32(q[r, qh + l]))
    return (alo + F16 * h0 - F32, blo + F16 * h1 - F32, ahi + F16 * h2 - F32, bhi + F16 * h3 - F32)


@njit(nogil=True, cache=True)
def deq_q6_k(q, q8, tab, out, r0, r1):
    cols = out.shape[1]
    for r in range(r0, r1):
        for s in range(cols // 256):
            o = 210 * s
            d = _h(tab, q, r, o + 208)
            for h in range(2):
                ql = o + 64 * h
                qh = o + 128 + 32 * h
                sc = o + 192 + 8 * h
                base = 256 * s + 128 * h
                for i in range(2):  # a constant scale per 16 weights
                    s1 = d * np.float32(q8[r, sc + i])
                    s2 = d * np.float32(q8[r, sc + i + 2])
                    s3 = d * np.float32(q8[r, sc + i + 4])
                    s4 = d * np.float32(q8[r, sc + i + 6])
                    for l in range(16 * i, 16 * i + 16):
                        q1, q2, q3, q4 = _q6(q, r, ql, qh, l)
                        out[r, base + l] = s1 * q1
                        out[r, base + l + 32] = s2 * q2
                        out[r, base + l + 64] = s3 * q3
                        out[r, base + l + 96] = s4 * q4


@njit(cache=True)
def _q23_group(q, tab, r, o, g, three):
    # Group g's scale and min (q3_k: min 0) of a q3_k (three=1) or q2_k super-block at byte o.
    if three:
        sc = o + 96
        low = (q[r, sc + g % 8] >> (0 if g < 8 else 4)) & 15
        high = (q[r, sc + 8 + g % 4] >> (2 * (g // 4))) & 3
        return _h(tab, q, r, o + 108) * np.float32(np.int64(low | (high << 4)) - 32), F0
    return (_h(tab, q, r, o + 80) * np.float32(q[r, o + g] & 15),
            _h(tab, q, r, o + 82) * np.float32(q[r, o + g] >> 4))


@njit(cache=True)
def _q23(q, r, o, g, l, three):
    # The code of weight l (0-31) of group g's run: two bits of qs, q3_k's hmask bit (clear: minus 4).
    h = g // 8
    j = g % 8 // 2
    v = np.int64((q[r, o + (32 if three else 16) + 32 * h + l] >> (2 * j)) & 3)
    if three and not (q[r, o + l] >> (4 * h + j)) & 1:
        v -= 4
    return np.float32(v)


@njit(nogil=True, cache=True)
def deq_q23_k(q, tab, out, r0, r1, three):
    cols = out.shape[1]
    bs = 110 if three else 84
    for r in range(r0, r1):
        for s in range(cols // 256):
            o = bs * s
            for g in range(16):
                dl, ml = _q23_group(q, tab, r, o, g, three)
                base = 256 * s + 128 * (g // 8) + 32 * (g % 8 // 2)
                for l in range(16 * (g % 2), 16 * (g % 2) + 16):
                    if three:
                        out[r, base + l] = dl * _q23(q, r, o, g, l, three)
                    else:
                        out[r, base + l] = dl * _q23(q, r, o, g, l, three) - ml


@njit(cache=True)
def _iq4_block(q, tab, r, b, xs):
    # 32-block b of an iq4_nl (xs=0) or iq4_xs row: (its weight scale, the byte offset of its 16 bytes).
    if not xs:
        return _h(tab, q, r, 18 * b), 18 * b + 2
    o = 136 * (b // 8)
    k = b % 8
    ls = ((q[r, o + 4 + k // 2] >> (4 * (k % 2))) & 15) | \
        (((np.int64(q[r, o + 2]) | (np.int64(q[r, o + 3]) << 8)) >> (2 * k)) & 3) << 4
    return _h(tab, q, r, o) * np.float32(ls - 32), o + 8 + 16 * k


@njit(nogil=True, cache=True)
def deq_iq4(q, tab, vals, out, r0, r1, xs):
    cols = out.shape[1]
    for r in range(r0, r1):
        for b in range(cols // 32):
            d, o = _iq4_block(q, tab, r, b, xs)
            for i in range(16):
                out[r, 32 * b + i] = d * vals[q[r, o + i] & 15]
                out[r, 32 * b + 16 + i] = d * vals[q[r, o + i] >> 4]


@njit(cache=True)
def _b32(q, r, o, qs, qh, j):
    # Codes of weights j and 16 + j (j < 16) of the q4_1/q5_0/q5_1 block at o: nibbles of byte qs + j,
    # bits j and j + 16 of the little-endian u32 at qh (qh < 0: none).
    v = q[r, o + qs + j]
    lo, hi = np.int64(v & 15), np.int64(v >> 4)
    if qh >= 0:
        h = o + qh
        word = (np.int64(q[r, h]) | (np.int64(q[r, h + 1]) << 8) | (np.int64(q[r, h + 2]) << 16)
                | (np.int64(q[r, h + 3]) << 24))
        lo |= ((word >> j) & 1) << 4
        hi |= ((word >> (j + 16)) & 1) << 4
    return lo, hi


@njit(nogil=True, cache=True)
def deq_b32(q, tab, out, r0, r1, bs, qs, qh, kind):
    # kind 0: q4_1 and q5_1 (d q + m), 1: q5_0 (d (q - 16))
    cols = out.shape[1]
    for r in range(r0, r1):
        for b in range(cols // 32):
            o = bs * b
            d = _h(tab, q, r, o)
            m = F0 if kind else _h(tab, q, r, o + 2)
            for j in range(16):
                lo, hi = _b32(q, r, o, qs, qh, j)
                if kind:
                    out[r, 32 * b + j] = np.float32(lo - 16) * d
                    out[r, 32 * b + 16 + j] = np.float32(hi - 16) * d
                else:
                    out[r, 32 * b + j] = np.float32(lo) * d + m
                    out[r, 32 * b + 16 + j] = np.float32(hi) * d + m


# ---------------------------------------------------------------- products: Y (n, rows) = X W^T
#
# Each kernel keeps one accumulator per lane of a block (an array of 16 or 32) and sums the
# lanes once per row: the block loops then have no reduction in them, which is what lets LLVM
# vectorize them (a per-block horizontal sum kept them scalar; 3x slower).

@njit(nogil=True, fastmath=True, cache=True)
def mm_f16(q, tab, X, Y, r0, r1):
    n, cols = X.shape
    acc = np.empty(16, np.float32)
    for r in range(r0, r1):
        for j in range(n):
            acc[:] = F0
            i = 0
            while i + 16 <= cols:
                for k in range(16):
                    acc[k] += _h(tab, q, r, 2 * (i + k)) * X[j, i + k]
                i += 16
            t = acc.sum()
            for k in range(i, cols):
                t += _h(tab, q, r, 2 * k) * X[j, k]
            Y[j, r] = t


@njit(nogil=True, fastmath=True, cache=True)
def mm_bf16(q, X, Y, r0, r1):
    n, cols = X.shape
    u = q.view(np.uint16)
    for r in range(r0, r1):
        w = np.empty(cols, np.uint32)
        for i in range(cols):
            w[i] = np.uint32(u[r, i]) << np.uint32(16)
        wf = w.view(np.float32)
        for j in range(n):
            acc = F0
            for i in range(cols):
                acc += wf[i] * X[j, i]
            Y[j, r] = acc


@njit(nogil=True, fastmath=True, cache=True)
def mm_q8_0(q, q8, tab, X, Y, r0, r1):
    n, cols = X.shape
    acc = np.empty(32, np.float32)
    for r in range(r0, r1):
        for j in range(n):
            acc[:] = F0
            for b in range(cols // 32):
                o = 34 * b
                d = _h(tab, q, r, o)
                for i in range(32):
                    acc[i] += d * np.float32(q8[r, o + 2 + i]) * X[j, 32 * b + i]
            Y[j, r] = acc.sum()


@njit(nogil=True, fastmath=True, cache=True)
def mm_q4_0(q, tab, X, Y, r0, r1):
    n, cols = X.shape
    acc = np.empty(16, np.float32)
    for r in range(r0, r1):
        for j in range(n):
            acc[:] = F0
            for b in range(cols // 32):
                o = 18 * b
                xo = 32 * b
                d = _h(tab, q, r, o)
                for i in range(16):
                    lo, hi = _nibbles(np.float32(q[r, o + 2 + i]))
                    acc[i] += d * ((lo - F8) * X[j, xo + i] + (hi - F8) * X[j, xo + 16 + i])
            Y[j, r] = acc.sum()


@njit(nogil=True, fastmath=True, cache=True)
def mm_q45_k(q, tab, X, Y, r0, r1, five):
    n, cols = X.shape
    bs = 176 if five else 144
    acc = np.empty(32, np.float32)
    for r in range(r0, r1):
        for j in range(n):
            acc[:] = F0
            for s in range(cols // 256):
                o = bs * s
                d = _h(tab, q, r, o)
                dmin = _h(tab, q, r, o + 2)
                for c in range(4):
                    sc1, m1 = _q4k_sm(q, r, o, 2 * c)
                    sc2, m2 = _q4k_sm(q, r, o, 2 * c + 1)
                    d1 = d * np.float32(sc1)
                    dm1 = dmin * np.float32(m1)
                    d2 = d * np.float32(sc2)
                    dm2 = dmin * np.float32(m2)
                    base = 256 * s + 64 * c
                    for l in range(32):
                        lo, hi = _k45(q, r, o, c, l, five)
                        acc[l] += (d1 * lo - dm1) * X[j, base + l] + (d2 * hi - dm2) * X[j, base + 32 + l]
            Y[j, r] = acc.sum()


@njit(nogil=True, fastmath=True, cache=True)
def mm_q6_k(q, q8, tab, X, Y, r0, r1):
    n, cols = X.shape
    acc = np.empty(16, np.float32)
    for r in range(r0, r1):
        for j in range(n):
            acc[:] = F0
            for s in range(cols // 256):
                o = 210 * s
                d = _h(tab, q, r, o + 208)
                for h in range(2):
                    ql = o + 64 * h
                    qh = o + 128 + 32 * h
                    sc = o + 192 + 8 * h
                    base = 256 * s + 128 * h
                    for i in range(2):  # a constant scale per 16 weights
                        s1 = d * np.float32(q8[r, sc + i])
                        s2 = d * np.float32(q8[r, sc + i + 2])
                        s3 = d * np.float32(q8[r, sc + i + 4])
                        s4 = d * np.float32(q8[r, sc + i + 6])
                        for k in range(16):
                            l = 16 * i + k
                            q1, q2, q3, q4 = _q6(q, r, ql, qh, l)
                            acc[k] += (s1 * q1 * X[j, base + l] + s2 * q2 * X[j, base + l + 32]
                                       + s3 * q3 * X[j, base + l + 64] + s4 * q4 * X[j, base + l + 96])
            Y[j, r] = acc.sum()


@njit(nogil=True, fastmath=True, cache=True)
def mm_q23_k(q, tab, X, Y, r0, r1, three):
    n, cols = X.shape
    bs = 110 if three else 84
    acc = np.empty(16, np.float32)
    for r in range(r0, r1):
        for j in range(n):
            acc[:] = F0
            for s in range(cols // 256):
                o = bs * s
                for g in range(16):
                    dl, ml = _q23_group(q, tab, r, o, g, three)
                    base = 256 * s + 128 * (g // 8) + 32 * (g % 8 // 2)
                    l0 = 16 * (g % 2)
                    for k in range(16):
                        acc[k] += (dl * _q23(q, r, o, g, l0 + k, three) - ml) * X[j, base + l0 + k]
            Y[j, r] = acc.sum()


@njit(nogil=True, fastmath=True, cache=True)
def mm_iq4(q, tab, vals, X, Y, r0, r1, xs):
    n, cols = X.shape
    acc = np.empty(16, np.float32)
    for r in range(r0, r1):
        for j in range(n):
            acc[:] = F0
            for b in range(cols // 32):
                d, o = _iq4_block(q, tab, r, b, xs)
                for i in range(16):
                    v = q[r, o + i]
                    acc[i] += d * (vals[v & 15] * X[j, 32 * b + i] + vals[v >> 4] * X[j, 32 * b + 16 + i])
            Y[j, r] = acc.sum()


@njit(nogil=True, fastmath=True, cache=True)
def mm_b32(q, tab, X, Y, r0, r1, bs, qs, qh, kind):
    n, cols = X.shape
    acc = np.empty(16, np.float32)
    for r in range(r0, r1):
        for j in range(n):
            acc[:] = F0
            for b in range(cols // 32):
                o = bs * b
                d = _h(tab, q, r, o)
                m = F0 if kind else _h(tab, q, r, o + 2)
                off = np.float32(16 * kind)
                for i in range(16):
                    lo, hi = _b32(q, r, o, qs, qh, i)
                    acc[i] += ((np.float32(lo) - off) * d + m) * X[j, 32 * b + i] + \
                        ((np.float32(hi) - off) * d + m) * X[j, 32 * b + 16 + i]
            Y[j, r] = acc.sum()


@njit(nogil=True, fastmath=True, cache=True)
def sum_range(buf, out, r0, r1):
    """Adds the sum of buf[r0:r1] to out[0]: one stream of the benchmark's DRAM read probe."""
    s = F0
    for i in range(r0, r1):
        s += buf[i]
    out[0] += s


# Below this many weight bytes a call runs on the calling thread: a pool round trip costs more.
SERIAL_BYTES = 256 * 1024
# Weight bytes per claimed chunk of rows.
CHUNK_BYTES = 256 * 1024

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


# x8 layouts: each row gathered back into its GGUF format's bytes (base: 0 q4_0, 1 q4_k, 2 q8_0, 3 iq4_xs,
# 4 q5_k),
# then the plain kernels.  The portable path: correct, not fast (the C kernels read the layout directly).
_X8_BASE = {"q4_0x8": 0, "q4_kx8": 1, "q8_0x8": 2, "iq4_xsx8": 3, "q5_kx8": 4}
# Formats that share kernels, and each one's flag: q4_k and q5_k (five), q3_k and q2_k (three), iq4_nl
# and iq4_xs (xs)
_K45 = {"q4_k": 0, "q5_k": 1}
_Q23 = {"q3_k": 1, "q2_k": 0}
_IQ4 = {"iq4_nl": 0, "iq4_xs": 1}
# q4_1, q5_0, q5_1: (bytes a block, where the nibbles start, where the fifth bits are or -1, q5_0's kind)
_B32 = {"q4_1": (20, 4, -1, 0), "q5_0": (22, 6, 2, 1), "q5_1": (24, 8, 4, 0)}
IQ4_F32 = IQ4_VALUES.astype(np.float32)


@njit(nogil=True, cache=True)
def deq_x8(qf, rb, pos, base, tab, out, r0, r1):
    tmp = np.empty((1, rb), np.uint8)
    for r in range(r0, r1):
        _gather_row(qf, rb, pos, r, tmp)
        if base == 0:
            deq_q4_0(tmp, tab, out[r:r + 1], 0, 1)
        elif base == 1 or base == 4:
            deq_q45_k(tmp, tab, out[r:r + 1], 0, 1, base == 4)
        elif base == 3:
            deq_iq4(tmp, tab, IQ4_F32, out[r:r + 1], 0, 1, 1)
        else:
            deq_q8_0(tmp, tmp.view(np.int8), tab, out[r:r + 1], 0, 1)


@njit(nogil=True, cache=True)
def mm_x8(qf, rb, pos, base, tab, X, Y, r0, r1):
    tmp = np.empty((1, rb), np.uint8)
    for r in range(r0, r1):
        _gather_row(qf, rb, pos, r, tmp)
        if base == 0:
            mm_q4_0(tmp, tab, X, Y[:, r:r + 1], 0, 1)
        elif base == 1 or base == 4:
            mm_q45_k(tmp, tab, X, Y[:, r:r + 1], 0, 1, base == 4)
        elif base == 3:
            mm_iq4(tmp, tab, IQ4_F32, X, Y[:, r:r + 1], 0, 1, 1)
        else:
            mm_q8_0(tmp, tmp.view(np.int8), tab, X, Y[:, r:r + 1], 0, 1)


def _get_pool(n: int) -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None or _pool._max_workers < n:
            _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="kernels-numba")
        return _pool


def run_rows(fn, rows: int, nbytes: int, threads: int, *args) -> None:
    """fn(*args, r0, r1) over `rows` rows in chunks, on up to `threads` threads.

    The caller claims chunks too, and helpers that have not started by the time the chunks are
    gone are cancelled: on a busy machine a call never waits for a thread that is not running
    (see the pool in qkernels.c for the same idea).
    """
    nt = max(1, min(threads, rows)) if nbytes >= SERIAL_BYTES else 1
    if nt == 1:
        fn(*args, 0, rows)
        return
    step = max(1, min(rows // nt, max(1, rows * CHUNK_BYTES // max(nbytes, 1))))
    nchunks = (rows + step - 1) // step
    counter = itertools.count()  # next() on it is atomic under the GIL

    def work() -> None:
        while (c := next(counter)) < nchunks:
            fn(*args, c * step, min(rows, (c + 1) * step))

    futures = [_get_pool(nt - 1).submit(work) for _ in range(nt - 1)]
    work()
    for f in futures:
        if not f.cancel():
            f.result()


def dequantize(q: np.ndarray, fmt: str, cols: int, threads: int = 1,
               out: np.ndarray | None = None) -> np.ndarray:
    """uint8 (rows, row_bytes), C-contiguous -> float32 (rows, cols) (into `out` if given)."""
    if out is None:
        out = np.empty((q.shape[0], cols), dtype=np.float32)
    if fmt == "f32":
        out[:] = q.view(np.float32).reshape(out.shape)
    elif fmt == "bf16":
        run_rows(deq_bf16, q.shape[0], q.nbytes, threads, q, out)
    elif fmt in ("q8_0", "q6_k"):  # these read signed bytes too: pass an int8 view of the same memory
        fn = deq_q8_0 if fmt == "q8_0" else deq_q6_k
        run_rows(fn, q.shape[0], q.nbytes, threads, q, q.view(np.int8), F16_TABLE, out)
    elif fmt in _X8_BASE:
        run_rows(deq_x8, q.shape[0], q.nbytes, threads, q.reshape(-1), q.shape[1], x8_positions(fmt),
                 _X8_BASE[fmt], F16_TABLE, out)
    elif fmt in _K45:
        run_rows(lambda *a: deq_q45_k(*a, _K45[fmt]), q.shape[0], q.nbytes, threads, q, F16_TABLE, out)
    elif fmt in _Q23:
        run_rows(lambda *a: deq_q23_k(*a, _Q23[fmt]), q.shape[0], q.nbytes, threads, q, F16_TABLE, out)
    elif fmt in _IQ4:
        run_rows(lambda *a: deq_iq4(*a, _IQ4[fmt]), q.shape[0], q.nbytes, threads, q, F16_TABLE, IQ4_F32, out)
    elif fmt in _B32:
        run_rows(lambda *a: deq_b32(*a, *_B32[fmt]), q.shape[0], q.nbytes, threads, q, F16_TABLE, out)
    else:
        fn = {"f16": deq_f16, "q4_0": deq_q4_0}[fmt]
        run_rows(fn, q.shape[0], q.nbytes, threads, q, F16_TABLE, out)
    return out


def matmul(q: np.ndarray, fmt: str, X: np.ndarray, threads: int = 1) -> np.ndarray:
    """Y (n, rows) = X W^T for C-contiguous uint8 q and float32 X (n, cols); not for f32."""
    Y = np.empty((X.shape[0], q.shape[0]), dtype=np.float32)
    work = q.nbytes * X.shape[0]
    if fmt == "bf16":
        run_rows(mm_bf16, q.shape[0], work, threads, q, X, Y)
    elif fmt in ("q8_0", "q6_k"):
        fn = mm_q8_0 if fmt == "q8_0" else mm_q6_k
        run_rows(fn, q.shape[0], work, threads, q, q.view(np.int8), F16_TABLE, X, Y)
    elif fmt in _X8_BASE:
        run_rows(mm_x8, q.shape[0], work, threads, q.reshape(-1), q.shape[1], x8_positions(fmt),
                 _X8_BASE[fmt], F16_TABLE, X, Y)
    elif fmt in _K45:
        run_rows(lambda *a: mm_q45_k(*a, _K45[fmt]), q.shape[0], work, threads, q, F16_TABLE, X, Y)
    elif fmt in _Q23:
        run_rows(lambda *a: mm_q23_k(*a, _Q23[fmt]), q.shape[0], work, threads, q, F16_TABLE, X, Y)
    elif fmt in _IQ4:
        run_rows(lambda *a: mm_iq4(*a, _IQ4[fmt]), q.shape[0], work, threads, q, F16_TABLE, IQ4_F32, X, Y)
    elif fmt in _B32:
        run_rows(lambda *a: mm_b32(*a, *_B32[fmt]), q.shape[0], work, threads, q, F16_TABLE, X, Y)
    else:
        fn = {"f16": mm_f16, "q4_0": mm_q4_0}[fmt]
        run_rows(fn, q.shape[0], work, threads, q, F16_TABLE, X, Y)
    return Y


def read_sum(buf: np.ndarray, threads: int) -> float:
    """Sum of a float32 buffer read by `threads` streams at once."""
    parts = np.zeros((threads, 1), dtype=np.float32)
    bounds = [buf.size * i // threads for i in range(threads + 1)]

    def one(i: int, a: int, b: int) -> None:
        sum_range(buf, parts[i], a, b)

    if threads == 1:
        one(0, 0, buf.size)
    else:
        futures = [_get_pool(threads - 1).submit(one, i, bounds[i], bounds[i + 1]) for i in range(1, threads)]
        one(0, bounds[0], bounds[1])
        for f in futures:
            f.result()
    return float(parts.sum())
