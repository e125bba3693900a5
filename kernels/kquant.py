"""q4_k and q6_k quantizers (numba): ggml's reference algorithms, in float32 as ggml computes them.

The k-quants pick each sub-block's scale (and min) by a small search that numpy cannot vectorize
well, so the block loops run in numba.  They follow ggml-quants.c's quantize_row_q4_K_ref and
quantize_row_q6_K_ref step by step; every intermediate is float32 (numba would widen to float64 on
any int or Python-float operand, hence the explicit casts), rounding is half-to-even like ggml's
nearest_int, and the f16 super-block scales round to nearest even as GGML_FP32_TO_FP16 does.
No fastmath: reassociating these sums would change which scale the search picks.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numba import njit

from .formats import QK_K, FormatError, quant_input

F0 = np.float32(0.0)
F1 = np.float32(1.0)
EPS = np.float32(1e-15)  # ggml's GROUP_MAX_EPS


@njit(cache=True)
def _f16_round(x):
    """float32 -> the float32 value of the nearest float16 (ties to even, overflow to inf)."""
    ax = abs(np.float64(x))
    if ax == 0.0 or not math.isfinite(ax):
        return x
    e = math.frexp(ax)[1]  # ax = m * 2**e with 0.5 <= m < 1
    ulp = math.ldexp(1.0, e - 11) if e - 1 >= -14 else math.ldexp(1.0, -24)
    r = np.rint(ax / ulp) * ulp  # exact in float64: ax has 24 significant bits
    if r > 65504.0:
        r = np.inf
    return np.float32(-r if x < 0 else r)


@njit(cache=True)
def _nearest(v):
    return int(np.rint(v))


@njit(cache=True)
def _make_qkx2(x, w, L, Laux, nmax, rmin, rdelta, nstep):
    """ggml make_qkx2_quants (use_mad=false): returns (scale, -min); fills L with 0..nmax."""
    n = x.shape[0]
    fmax = np.float32(nmax)
    mn = x[0]
    mx = x[0]
    sum_w = w[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < mn:
            mn = x[i]
        if x[i] > mx:
            mx = x[i]
        sum_w += w[i]
        sum_x += w[i] * x[i]
    if mn > F0:
        mn = F0
    if mx == mn:
        for i in range(n):
            L[i] = 0
        return F0, -mn
    iscale = fmax / (mx - mn)
    scale = F1 / iscale
    best = F0
    for i in range(n):
        l = min(nmax, max(0, _nearest(iscale * (x[i] - mn))))
        L[i] = l
        diff = scale * np.float32(l) + mn - x[i]
        best += w[i] * (diff * diff)
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * np.float32(step) + fmax) / (mx - mn)
        sum_l = F0
        sum_l2 = F0
        sum_xl = F0
        for i in range(n):
            l = min(nmax, max(0, _nearest(iscale * (x[i] - mn))))
            Laux[i] = l
            fl = np.float32(l)
            sum_l += w[i] * fl
            sum_l2 += w[i] * fl * fl
            sum_xl += w[i] * fl * x[i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > F0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > F0:
                this_min = F0
                this_scale = sum_xl / sum_l2
            cur = F0
            for i in range(n):
                diff = this_scale * np.float32(Laux[i]) + this_min - x[i]
                cur += w[i] * (diff * diff)
            if cur < best:
                for i in range(n):
                    L[i] = Laux[i]
                best = cur
                scale = this_scale
                mn = this_min
    return scale, -mn


@njit(nogil=True, cache=True)
def _q4_k(x, out, dd, dm):
    """x: float32 (nblocks, 256) -> out: uint8 (nblocks, 144); f16 d/dmin values go to dd, dm."""
    nb = x.shape[0]
    for i in range(nb):
        xb = x[i]
        L = np.zeros(QK_K, np.uint8)
        Laux = np.zeros(32, np.uint8)
        w = np.empty(32, np.float32)
        scales = np.empty(8, np.float32)
        mins = np.empty(8, np.float32)
        max_scale = F0
        max_min = F0
        for j in range(8):
            xs = xb[32 * j:32 * j + 32]
            sum_x2 = F0
            for l in range(32):
                sum_x2 += xs[l] * xs[l]
            av_x = np.sqrt(sum_x2 / np.float32(32))
            for l in range(32):
                w[l] = av_x + abs(xs[l])
            s, m = _make_qkx2(xs, w, L[32 * j:32 * j + 32], Laux, 15,
                              np.float32(-1.0), np.float32(0.1), 20)
            scales[j] = s
            mins[j] = m
            if s > max_scale:
                max_scale = s
            if m > max_min:
                max_min = m
        inv_scale = np.float32(63) / max_scale if max_scale > F0 else F0
        inv_min = np.float32(63) / max_min if max_min > F0 else F0
        ob = out[i]
        for k in range(12):
            ob[4 + k] = 0
        ls_all = np.empty(8, np.int64)
        lm_all = np.empty(8, np.int64)
        for j in range(8):
            ls = min(63, _nearest(inv_scale * scales[j]))
            lm = min(63, _nearest(inv_min * mins[j]))
            ls_all[j] = ls
            lm_all[j] = lm
            if j < 4:
                ob[4 + j] = ls
                ob[4 + j + 4] = lm
            else:
                ob[4 + j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
                ob[4 + j - 4] |= (ls >> 4) << 6
                ob[4 + j] |= (lm >> 4) << 6
        d = _f16_round(max_scale / np.float32(63))
        dmin = _f16_round(max_min / np.float32(63))
        dd[i] = d
        dm[i] = dmin
        for j in range(8):
            dj = d * np.float32(ls_all[j])
            if dj == F0:
                continue
            mj = dmin * np.float32(lm_all[j])
            for ii in range(32):
                l = _nearest((xb[32 * j + ii] + mj) / dj)
                L[32 * j + ii] = min(15, max(0, l))
        for c in range(4):
            for l in range(32):
                ob[16 + 32 * c + l] = L[64 * c + l] | (L[64 * c + 32 + l] << 4)


@njit(cache=True)
def _make_qx(x, L, nmax):
    """ggml make_qx_quants with rmse_type=1 (weights x**2) and no importance weights."""
    n = x.shape[0]
    fmax = np.float32(nmax)
    vmax = F0
    amax = F0
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            vmax = x[i]
    if amax < EPS:
        for i in range(n):
            L[i] = 0
        return F0
    iscale = -fmax / vmax
    sumlx = F0
    suml2 = F0
    for i in range(n):
        l = min(nmax - 1, max(-nmax, _nearest(iscale * x[i])))
        L[i] = l + nmax
        w = x[i] * x[i]
        fl = np.float32(l)
        sumlx += w * x[i] * fl
        suml2 += w * fl * fl
    scale = sumlx / suml2 if suml2 != F0 else F0
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(fmax + np.float32(0.1) * np.float32(step)) / vmax
        sumlx = F0
        suml2 = F0
        for i in range(n):
            l = min(nmax - 1, max(-nmax, _nearest(iscale * x[i])))
            w = x[i] * x[i]
            fl = np.float32(l)
            sumlx += w * x[i] * fl
            suml2 += w * fl * fl
        if suml2 > F0 and sumlx * sumlx > best * suml2:
            for i in range(n):
                L[i] = nmax + min(nmax - 1, max(-nmax, _nearest(iscale * x[i])))
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@njit(nogil=True, cache=True)
def _q6_k(x, out, dd):
    """x: float32 (nblocks, 256) -> out: uint8 (nblocks, 210); the f16 d value goes to dd."""
    nb = x.shape[0]
    for i in range(nb):
        xb = x[i]
        ob = out[i]
        L = np.zeros(QK_K, np.int64)
        scales = np.empty(16, np.float32)
        max_scale = F0
        max_abs = F0
        for ib in range(16):
            s = _make_qx(xb[16 * ib:16 * ib + 16], L[16 * ib:16 * ib + 16], 32)
            scales[ib] = s
            if abs(s) > max_abs:
                max_abs = abs(s)
                max_scale = s
        if max_abs < EPS:
            for k in range(210):
                ob[k] = 0
            dd[i] = F0
            continue
        iscale = np.float32(-128) / max_scale
        d = _f16_round(F1 / iscale)
        dd[i] = d
        for ib in range(16):
            ob[192 + ib] = np.uint8(np.int8(min(127, _nearest(iscale * scales[ib]))))
        for j in range(16):
            dj = d * np.float32(np.int8(ob[192 + j]))
            if dj == F0:
                continue
            for ii in range(16):
                l = _nearest(xb[16 * j + ii] / dj)
                L[16 * j + ii] = min(31, max(-32, l)) + 32
        for h in range(2):
            for l in range(32):
                a = L[128 * h + l]
                b = L[128 * h + l + 32]
                c = L[128 * h + l + 64]
                e = L[128 * h + l + 96]
                ob[64 * h + l] = (a & 0xF) | ((c & 0xF) << 4)
                ob[64 * h + l + 32] = (b & 0xF) | ((e & 0xF) << 4)
                ob[128 + 32 * h + l] = (a >> 4) | ((b >> 4) << 2) | ((c >> 4) << 4) | ((e >> 4) << 6)


def _in_threads(fn, nblocks: int) -> None:
    # The block loops release the GIL (nogil), so plain threads run them in parallel; this
    # compiles much faster than numba's parallel=True, which matters for a first run.
    nt = min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1,
             max(1, nblocks // 64))
    if nt <= 1:
        fn(0, nblocks)
        return
    bounds = [nblocks * i // nt for i in range(nt + 1)]
    with ThreadPoolExecutor(nt) as pool:
        for f in [pool.submit(fn, bounds[i], bounds[i + 1]) for i in range(nt)]:
            f.result()


def quantize_k(x: np.ndarray, fmt: str) -> np.ndarray:
    """float32 (rows, cols) -> uint8 (rows, row_bytes) in q4_k or q6_k."""
    x, rows, _, rb = quant_input(x, fmt)
    blocks = x.reshape(-1, QK_K)
    nbytes = 144 if fmt == "q4_k" else 210
    out = np.empty((blocks.shape[0], nbytes), dtype=np.uint8)
    dd = np.empty(blocks.shape[0], dtype=np.float32)
    if fmt == "q4_k":
        dm = np.empty(blocks.shape[0], dtype=np.float32)
        _in_threads(lambda a, b: _q4_k(blocks[a:b], out[a:b], dd[a:b], dm[a:b]), blocks.shape[0])
        # The values are already f16-exact, so these casts only re-encode them.
        out[:, 0:2] = dd.astype(np.float16).view(np.uint8).reshape(-1, 2)
        out[:, 2:4] = dm.astype(np.float16).view(np.uint8).reshape(-1, 2)
    elif fmt == "q6_k":
        _in_threads(lambda a, b: _q6_k(blocks[a:b], out[a:b], dd[a:b]), blocks.shape[0])
        out[:, 208:210] = dd.astype(np.float16).view(np.uint8).reshape(-1, 2)
    else:
        raise FormatError(f"quantize_k handles q4_k and q6_k, not {fmt}")
    return out.reshape(rows, rb)
