"""kernels: byte-exactness with gguf-py, accuracy of every product path, the public API contract."""
from __future__ import annotations

import ctypes
import mmap
import os
import subprocess
import threading

import numpy as np
import pytest

import kernels
from kernels import QMatrix, cpu_c, formats

gguf_quants = pytest.importorskip("gguf.quants")
from gguf import GGMLQuantizationType as T  # noqa: E402

GT = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0, "q4_k": T.Q4_K,
      "q6_k": T.Q6_K, "q5_k": T.Q5_K, "q3_k": T.Q3_K, "q2_k": T.Q2_K,
      "iq4_nl": T.IQ4_NL, "iq4_xs": T.IQ4_XS, "q4_1": T.Q4_1, "q5_0": T.Q5_0, "q5_1": T.Q5_1}
QUANT = ("q8_0", "q4_0", "q4_k", "q6_k", *formats.READ_ONLY)
NOT_F32 = ("f16", "bf16", *QUANT)


def _backends() -> list[str]:
    return ["numpy", "numba", "c-generic", *(f"c-{v}" for v in ("avx2", "avxvnni", "avx512") if cpu_c.runs_here(v))]


BACKENDS = _backends()


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Runs a test on one kernel path, restoring the previous one afterwards."""
    before = kernels.backend()
    assert kernels.set_backend(request.param) == request.param
    yield request.param
    kernels.set_backend(before)


def gguf_bytes(x: np.ndarray, fmt: str) -> np.ndarray:
    q = gguf_quants.quantize(x, GT[fmt])
    return np.ascontiguousarray(q).view(np.uint8).reshape(x.shape[0], -1)


def gguf_deq(q: np.ndarray, fmt: str, cols: int) -> np.ndarray:
    return np.asarray(gguf_quants.dequantize(q, GT[fmt]), dtype=np.float32).reshape(q.shape[0], cols)


def same_floats(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-identical, except that NaNs only need to be NaNs (F16C quiets signalling NaNs)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if a.shape != b.shape or not np.array_equal(np.isnan(a), np.isnan(b)):
        return False
    ok = ~np.isnan(a)
    return np.array_equal(a[ok].view(np.uint32), b[ok].view(np.uint32))


def hard_matrix(cols: int = 64) -> np.ndarray:
    """Rows meant to break quantizers: zeros, -0.0, huge, tiny, denormal, mixed, ties."""
    rng = np.random.default_rng(7)
    rows = [
        np.zeros(cols),
        np.full(cols, -0.0),
        np.where(np.arange(cols) % 2, -0.0, 0.0),
        rng.standard_normal(cols) * 1e30,
        np.full(cols, 3e38) * np.where(np.arange(cols) % 3, 1, -1),
        rng.standard_normal(cols) * 1e-30,
        rng.standard_normal(cols) * 1e-40,   # float32 denormals: 1/d overflows in q8_0/q4_0
        np.full(cols, 1e-45),
        np.concatenate([np.full(cols // 2, 1e-38), np.full(cols - cols // 2, 5e4)]),
        rng.standard_normal(cols) * 7e4,     # f16 overflow
        rng.standard_normal(cols) * 6e-8,    # f16 subnormals
        (np.arange(cols) - cols / 2) / 8.0,  # exact halves: rounding ties
        np.where(np.arange(cols) == 5, 1.0, 0.0),
        rng.standard_normal(cols),
    ]
    return np.stack(rows).astype(np.float32)


def random_blocks(fmt: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Valid random bytes in `fmt`: random payload, finite f16 scales."""
    rng = np.random.default_rng(seed)
    rb = formats.row_bytes(fmt, cols)
    if fmt == "f16":
        v = rng.standard_normal((rows, cols)).astype(np.float32) * np.float32(100)
        v.ravel()[::7] = np.float32(3e-6)  # f16 subnormals
        v.ravel()[::11] = -0.0
        return v.astype(np.float16).view(np.uint8)
    if fmt == "bf16":  # any bit pattern is a bf16 value; include inf, NaN and denormals
        return rng.integers(0, 1 << 16, (rows, cols), dtype=np.uint32).astype(np.uint16).view(np.uint8)
    q = rng.integers(0, 256, (rows, rb), dtype=np.uint8)
    per, nbytes = formats.BLOCK[fmt]
    blocks = q.reshape(-1, nbytes)

    def put(off: int, scale: float) -> None:
        d = (rng.standard_normal(blocks.shape[0]) * scale).astype(np.float16)
        blocks[:, off:off + 2] = d.view(np.uint8).reshape(-1, 2)

    if fmt in ("q8_0", "q4_0", "iq4_nl", "q5_0"):
        put(0, 0.02)
    elif fmt in ("q4_1", "q5_1"):
        put(0, 0.02)
        put(2, 0.1)
    elif fmt == "iq4_xs":
        put(0, 0.0005)
    elif fmt in ("q4_k", "q5_k"):
        put(0, 0.002)
        put(2, 0.002)
    elif fmt == "q6_k":
        put(208, 0.001)
    elif fmt == "q3_k":
        put(108, 0.002)
    elif fmt == "q2_k":
        put(80, 0.002)
        put(82, 0.002)
    return q


# ---------------------------------------------------------------- bytes: quantize == gguf-py

@pytest.mark.parametrize("fmt", ["f16", "bf16", "q8_0", "q4_0"])
def test_quantize_bytes_match_gguf(fmt):
    rng = np.random.default_rng(1)
    x = np.concatenate([hard_matrix(64), rng.standard_normal((9, 64)).astype(np.float32)])
    with np.errstate(all="ignore"):
        want = gguf_bytes(x, fmt)
        got = kernels.quantize(x, fmt)
    assert got.dtype == np.uint8 and got.shape == (x.shape[0], formats.row_bytes(fmt, 64))
    assert np.array_equal(got, want)


def test_bf16_quantize_specials_match_gguf():
    x = np.array([[np.inf, -np.inf, np.nan, -np.nan, 1e-45, -0.0, 3.3895314e38, 1.0000001]],
                 dtype=np.float32)
    x = np.repeat(x, 4, axis=1)
    assert np.array_equal(kernels.quantize(x, "bf16"), gguf_bytes(x, "bf16"))


def test_quantize_large_matrix_in_chunks_matches_gguf():
    # more rows than one numpy chunk: the chunking must not change a byte
    x = np.random.default_rng(2).standard_normal((2100, 2048)).astype(np.float32)
    for fmt in ("q8_0", "q4_0"):
        assert np.array_equal(kernels.quantize(x, fmt), gguf_bytes(x, fmt))


# ---------------------------------------------------------------- values: dequantize == gguf-py

@pytest.mark.parametrize("fmt", NOT_F32)
def test_dequantize_matches_gguf(backend, fmt):
    cols = 512
    q = random_blocks(fmt, 13, cols, seed=3)
    got = kernels.dequantize(q, fmt, cols)
    assert got.dtype == np.float32 and got.shape == (13, cols)
    assert same_floats(got, gguf_deq(q, fmt, cols))


@pytest.mark.parametrize("fmt", ["q4_k", "q6_k"])
def test_k_quant_bytes_read_back_by_gguf(fmt):
    x = np.concatenate([hard_matrix(256)[[0, 1, 5, 11, 12, 13]],
                        np.random.default_rng(4).standard_normal((8, 256)).astype(np.float32)])
    q = kernels.quantize(x, fmt)
    assert q.shape == (x.shape[0], formats.row_bytes(fmt, 256))
    back = gguf_deq(q, fmt, 256)
    assert same_floats(kernels.dequantize(q, fmt, 256), back)
    assert np.all(back[:2] == 0)  # all-zero rows stay zero
    # rows of ordinary magnitude come back close
    err = np.sqrt(np.mean((back[-8:] - x[-8:]) ** 2))
    assert err < (0.12 if fmt == "q4_k" else 0.03)


def test_q4_k_rms_no_worse_than_q4_0():
    x = np.random.default_rng(5).standard_normal((64, 2048)).astype(np.float32)
    rms = {}
    for fmt in ("q4_0", "q4_k", "q6_k"):
        q = kernels.quantize(x, fmt)
        rms[fmt] = float(np.sqrt(np.mean((gguf_deq(q, fmt, 2048) - x) ** 2)))
    assert rms["q4_k"] <= rms["q4_0"]
    assert rms["q6_k"] < rms["q4_k"] / 2


@pytest.mark.parametrize("fmt", formats.READ_ONLY)
def test_read_only_formats_have_no_quantizer(fmt):
    """The READ_ONLY formats come from llama.cpp's files; asking to write one says so instead of guessing."""
    with pytest.raises(kernels.FormatError, match=f"no quantizer for {fmt}"):
        kernels.quantize(np.ones((1, 256), np.float32), fmt)
    with pytest.raises(kernels.FormatError, match=f"no quantizer for {fmt}"):
        QMatrix.from_float(np.ones((1, 256), np.float32), fmt)


def test_f16_rounding_of_k_quant_scales():
    # the f16 rounding inside the k-quantizers (numba) agrees with numpy's float16 cast
    from kernels.kquant import _f16_round
    vals = np.array([0.1, 1 / 3, 65504.0, 65519.0, 65520.0, 6.1e-5, 5.96e-8, 2.98e-8, 3e-8, 1e-9,
                     -2.5e-6, 1234.567], dtype=np.float32)
    with np.errstate(over="ignore"):
        want = vals.astype(np.float16).astype(np.float32)
    got = np.array([_f16_round(v) for v in vals], dtype=np.float32)
    assert same_floats(got, want)


# ---------------------------------------------------------------- products

def _ref(q: np.ndarray, fmt: str, cols: int, X: np.ndarray) -> np.ndarray:
    if fmt in formats.INTERLEAVED:  # gguf-py reads the GGUF format it moves
        q, fmt = formats.deinterleave(q, fmt), formats.gguf_format(fmt)
    W = gguf_deq(q, fmt, cols).astype(np.float64)
    return X.astype(np.float64) @ W.T


def _rel(Y: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(Y - ref) / np.linalg.norm(ref))


def _tol(fmt: str, n: int) -> float:
    """How far a product may be from the float one: int16 activations (~1e-4) or int8 ones (llama.cpp's
    q8_0 of the activations: ~1e-2 over the whole product with llm_like's outliers, up to ~3e-2 of the
    largest output at one output; kernels.int8_activations).  test_int8_kernels_round_activations_as_llama_cpp
    holds the int8 products to 1e-6 of the float product of the rounded activations."""
    return 4e-2 if kernels.int8_activations(fmt, n) else 3e-3


def int8_rounded(X: np.ndarray) -> np.ndarray:
    """X as the int8 kernels see it: per 32-block, codes round(x / d) with d = max|x| / 127 in float32."""
    B = X.astype(np.float32).reshape(X.shape[0], -1, 32)
    d = np.abs(B).max(axis=-1, keepdims=True) / np.float32(127)
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d > 0)
    return (np.rint(B * inv) * d).reshape(X.shape)


def llm_like(n: int, cols: int, seed: int) -> np.ndarray:
    """Activations with a few outlier channels, as LLM hidden states have."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, cols)).astype(np.float32)
    X[:, rng.choice(cols, 3, replace=False)] *= 60
    return X


@pytest.mark.parametrize("fmt", NOT_F32)
@pytest.mark.parametrize("n", [1, 2, 3, 6, 9, 20])
def test_matmul_matches_dequantized_product(backend, fmt, n):
    rows, cols = 37, 512  # rows not a multiple of 4: the kernels' remainder path
    q = random_blocks(fmt, rows, cols, seed=6) if fmt != "bf16" else kernels.quantize(
        np.random.default_rng(6).standard_normal((rows, cols)).astype(np.float32), "bf16")
    X = llm_like(n, cols, seed=n)
    Y = kernels.matmul(q, fmt, cols, X)
    assert Y.dtype == np.float32 and Y.shape == (n, rows)
    ref = _ref(q, fmt, cols, X)
    assert _rel(Y, ref) < _tol(fmt, n)
    assert np.max(np.abs(Y - ref)) < _tol(fmt, n) * np.max(np.abs(ref))
    if fmt in ("f16", "bf16"):  # float formats: as accurate as float32 arithmetic
        assert _rel(Y, ref) < 1e-5


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0"])
@pytest.mark.parametrize("cols", [512, 4096])
def test_decode_short_and_long_rows(backend, fmt, cols):
    # The C decode reads short q8_0 rows one at a time and long ones four side by side (qkernels.c,
    # SEQ_ROW_BYTES): both ways must give the same products.
    rows = 37
    q = random_blocks(fmt, rows, cols, seed=16)
    x = llm_like(1, cols, seed=17)
    y = kernels.matvec(q, fmt, cols, x[0])
    ref = _ref(q, fmt, cols, x)[0]
    assert _rel(y, ref) < 3e-3
    assert np.array_equal(kernels.matmul(q, fmt, cols, x)[0], y)


@pytest.mark.parametrize("fmt", [f for f in kernels.FORMATS if kernels.gguf_format(f) not in kernels.READ_ONLY])
def test_matvec_and_qmatrix(backend, fmt):
    rows, cols = (24 if fmt in formats.INTERLEAVED else 21), 256
    w = np.random.default_rng(8).standard_normal((rows, cols)).astype(np.float32)
    m = QMatrix.from_float(w, fmt)
    assert (m.rows, m.cols, m.fmt) == (rows, cols, fmt)
    assert m.nbytes == rows * formats.row_bytes(fmt, cols)
    x = llm_like(1, cols, seed=9)[0]
    y = m.matvec(x)
    assert y.shape == (rows,)
    assert np.array_equal(y, kernels.matvec(m.data, fmt, cols, x))
    assert np.array_equal(y, m.matmul(x[None, :])[0])  # n=1 is the matvec path
    ref = x.astype(np.float64) @ m.to_float().astype(np.float64).T
    assert _rel(y, ref) < 3e-3
    idx = np.array([3, 0, 20, 3, 9])
    assert same_floats(m.rows_f32(idx), m.to_float()[idx])
    assert m.rows_f32(5).shape == (1, cols)


# ---------------------------------------------------------------- x8 layouts: runs of eight rows interleaved

X8 = tuple(formats.INTERLEAVED)


def test_q4_0x8_moves_q4_0s_bytes():
    x = np.concatenate([hard_matrix(64), np.random.default_rng(30).standard_normal((10, 64)).astype(np.float32)])
    with np.errstate(all="ignore"):
        plain = gguf_bytes(x, "q4_0")
        x8 = kernels.quantize(x, "q4_0x8")
    assert x8.shape == plain.shape and not np.array_equal(x8, plain)
    assert np.array_equal(np.sort(x8, axis=None), np.sort(plain, axis=None))  # the same bytes, moved
    assert np.array_equal(formats.deinterleave(x8, "q4_0x8"), plain)
    # the documented layout: run 1 (rows 8-15), block 1: scales of rows 8..15, then bytes 2k, 2k+1 row by row
    blk = x8[8:16].reshape(-1)[144:288]
    assert np.array_equal(blk[:16], plain[8:16, 18:20].reshape(-1))
    k, r = 5, 3
    assert np.array_equal(blk[16 + 16 * k + 2 * r:18 + 16 * k + 2 * r], plain[8 + r, 18 + 2 + 2 * k:18 + 4 + 2 * k])


def test_q8_0x8_moves_q8_0s_bytes():
    x = np.concatenate([hard_matrix(64)[:8], np.random.default_rng(34).standard_normal((8, 64)).astype(np.float32)])
    with np.errstate(all="ignore"):
        plain, x8 = gguf_bytes(x, "q8_0"), kernels.quantize(x, "q8_0x8")
    assert np.array_equal(formats.deinterleave(x8, "q8_0x8"), plain)
    blk = x8[8:16].reshape(-1)[272:544]   # run 1, block 1
    assert np.array_equal(blk[:16], plain[8:16, 34:36].reshape(-1))
    k, r = 15, 7
    assert np.array_equal(blk[16 + 16 * k + 2 * r:18 + 16 * k + 2 * r], plain[8 + r, 34 + 2 + 2 * k:34 + 4 + 2 * k])


def test_q4_kx8_moves_q4_ks_bytes():
    x = np.random.default_rng(33).standard_normal((16, 512)).astype(np.float32)
    plain, x8 = kernels.quantize(x, "q4_k"), kernels.quantize(x, "q4_kx8")
    assert np.array_equal(np.sort(x8, axis=None), np.sort(plain, axis=None))
    assert np.array_equal(formats.deinterleave(x8, "q4_kx8"), plain)
    # run 1, super-block 1: d of rows 8..15, dmin of rows 8..15, then scale byte t of rows 8..15 for each t
    blk, src = x8[8:16].reshape(-1)[1152:2304], plain[8:16, 144:288]
    assert np.array_equal(blk[:16], src[:, 0:2].reshape(-1)) and np.array_equal(blk[16:32], src[:, 2:4].reshape(-1))
    assert np.array_equal(blk[32:128].reshape(12, 8), src[:, 4:16].T)
    k, r = 40, 6
    assert np.array_equal(blk[128 + 16 * k + 2 * r:130 + 16 * k + 2 * r], src[r, 16 + 2 * k:18 + 2 * k])


@pytest.mark.parametrize("fmt", X8)
def test_x8_dequantizes_as_its_gguf_format(backend, fmt):
    base = formats.INTERLEAVED[fmt]
    q = random_blocks(base, 40, 512, seed=31)
    assert same_floats(kernels.dequantize(formats.interleave(q, fmt), fmt, 512), gguf_deq(q, base, 512))


@pytest.mark.parametrize("fmt", X8)
@pytest.mark.parametrize("n", [1, 2, 3, 5, 20, 40])
def test_x8_products_match_dequantized(backend, fmt, n):
    rows, cols = 48, 512
    q = formats.interleave(random_blocks(formats.INTERLEAVED[fmt], rows, cols, seed=32), fmt)
    X = llm_like(n, cols, seed=n + 40)
    Y = kernels.matmul(q, fmt, cols, X)
    ref = _ref(q, fmt, cols, X)
    assert Y.shape == (n, rows) and _rel(Y, ref) < _tol(fmt, n)
    assert np.max(np.abs(Y - ref)) < _tol(fmt, n) * np.max(np.abs(ref))
    assert np.array_equal(kernels.matvec(q, fmt, cols, X[0]), kernels.matmul(q, fmt, cols, X[:1])[0])


@pytest.mark.parametrize("fmt", X8)
def test_x8_needs_runs_of_eight_rows(backend, fmt):
    w = np.ones((12, 256), np.float32)
    with pytest.raises(kernels.FormatError, match="divisible by 8"):
        kernels.quantize(w, fmt)
    base = formats.INTERLEAVED[fmt]   # iq4_xs has no quantizer: its bytes are made up
    q = formats.interleave(random_blocks(base, 8, 256), fmt) if base in formats.READ_ONLY else \
        kernels.quantize(w[:8], fmt)
    with pytest.raises(kernels.FormatError, match="divisible by 8"):
        QMatrix(q[:4], fmt, 4, 256)
    with pytest.raises(kernels.FormatError, match="divisible by 8"):
        kernels.matvec(q[:4], fmt, 256, np.ones(256, np.float32))


@pytest.mark.parametrize("fmt", ["q4_0", "q4_0x8"])
def test_matvec_fast_path_still_checks(backend, fmt):
    # matvec's one-look path for the common case must send every odd input through the full checks.
    w = llm_like(16, 64, seed=7)
    q = kernels.quantize(w, fmt)
    x = llm_like(1, 64, seed=8)[0]
    y = kernels.matvec(q, fmt, 64, x)   # the fast path
    assert np.array_equal(kernels.matvec(q, fmt, 64, x), y)
    assert _rel(y, _ref(q, fmt, 64, x[None])[0]) < 3e-3
    with pytest.raises(kernels.FormatError, match="columns"):
        kernels.matvec(q, fmt, 64, np.ones(32, np.float32))
    with pytest.raises(kernels.FormatError, match="shape"):
        kernels.matvec(q[:, :-2], fmt, 64, x)
    if fmt in formats.INTERLEAVED:
        with pytest.raises(kernels.FormatError, match="divisible by 8"):
            kernels.matvec(q[:12], fmt, 64, x)
    else:   # a view of every other row: not contiguous, still the right product
        assert np.array_equal(kernels.matvec(q[::2], fmt, 64, x), y[::2])
    assert np.array_equal(kernels.matvec(q, fmt, 64, x.astype(np.float64)), y)


@pytest.mark.parametrize("fmt", ["q4_0x8", "q8_0x8"])
def test_x8_products_reach_tiles_later_on_avx2(backend, fmt):
    # The x8 kernels stay ahead of dequantize-then-BLAS up to 64 vectors (kernels.SMALL_N), the int8 ones
    # (kernels.TO_CHUNK: q8_0x8 has none on the avx2 variant) up to 256: below that the kernels (int16
    # activations, or int8 ones: a small error), above it float32 tiles.
    q = formats.interleave(random_blocks(formats.INTERLEAVED[fmt], 48, 512, seed=35), fmt)
    chunk = fmt in kernels.TO_CHUNK.get(backend.removeprefix("c-"), ())
    below, above = (200, 260) if chunk else (48, 80)
    err = {n: _rel(kernels.matmul(q, fmt, 512, X), _ref(q, fmt, 512, X))
           for n, X in ((below, llm_like(below, 512, seed=36)), (above, llm_like(above, 512, seed=37)))}
    assert err[above] < 1e-5 and err[below] < _tol(fmt, below)
    assert not kernels.int8_activations(fmt, above)
    if backend in ("c-avx2", "c-avx512", "c-avxvnni"):
        assert err[below] > 1e-6     # the kernels, not the tiles
    else:
        assert err[below] < 1e-5     # elsewhere x8 takes the tiles above 32 (c-generic) or 2 (numba)


@pytest.mark.parametrize("fmt", [*kernels.INT8_FORMATS, *kernels.INT8_PACKED])
def test_int8_kernels_round_activations_as_llama_cpp(backend, fmt):
    # The avx512 variant's products in the x8 layouts of q4_0, q8_0, q4_k, q5_k and iq4_xs from 2 vectors,
    # and in those GGUF formats and q6_k from INT8_LEAST (a chunk of rows packed first), up to 256,
    # compute with the activations rounded to int8 per 32-block: exactly the float product of those
    # rounded values, for every count of vectors a pass (1-8), with a last run of eight rows (40 rows:
    # 16 + 16 + 8) or, in a GGUF format, a run padded with zero rows (37).  So do the avxvnni variant's
    # (eight rows and up to four vectors a pass), and the avx2 variant's where vpmaddubsw cannot saturate
    # (kernels.INT8_LEAST["avx2"]: not q8_0 or iq4_xs).  One vector (decode) keeps int16 activations, as
    # do fewer than INT8_LEAST in a GGUF format; elsewhere nothing rounds to int8.
    x8 = fmt in kernels.INT8_FORMATS
    rows, cols = (40, 512) if x8 else (37, 512)
    base = formats.INTERLEAVED[fmt] if x8 else fmt
    q = random_blocks(base, rows, cols, seed=72)
    q = formats.interleave(q, fmt) if x8 else q
    least = kernels.INT8_LEAST.get(backend.removeprefix("c-"), {}).get(fmt)
    for n in (2, 3, 7, 8, 13, 15, 16, 33, 200):
        X = llm_like(n, cols, seed=73 + n)
        Y = kernels.matmul(q, fmt, cols, X)
        to_int8 = _rel(Y, _ref(q, fmt, cols, int8_rounded(X)))
        if least is not None and n >= least:
            assert kernels.int8_activations(fmt, n) and to_int8 < 1e-6, (n, to_int8)
        else:
            assert not kernels.int8_activations(fmt, n) and to_int8 > 1e-3, (n, to_int8)
        assert _rel(Y, _ref(q, fmt, cols, X)) < _tol(fmt, n)
    x = llm_like(1, cols, seed=80)
    assert not kernels.int8_activations(fmt, 1)
    assert _rel(kernels.matmul(q, fmt, cols, x), _ref(q, fmt, cols, x)) < 3e-3


def test_x8_c_kernels_refuse_a_row_stride():
    # a run of eight rows is one piece of memory: the C library refuses any other stride rather than
    # reading rows that are not there (kernels' own wrappers never pass one)
    ck = cpu_c.load("generic")
    q = kernels.quantize(np.ones((16, 256), np.float32), "q4_0x8")
    wide = np.zeros((16, 2 * q.shape[1]), np.uint8)
    wide[:, :q.shape[1]] = q
    with pytest.raises(RuntimeError, match="failed with -1"):
        ck.matmul(wide[:, :q.shape[1]], "q4_0x8", 256, np.ones((1, 256), np.float32), 1)


def test_layout_picks_the_interleaved_formats():
    assert kernels.layout("q4_0", 1024) == "q4_0x8" and kernels.layout("q4_0", 1020) == "q4_0"
    assert kernels.layout("q4_k", 2048) == "q4_kx8" and kernels.layout("q4_k", 12) == "q4_k"
    assert kernels.layout("q8_0", 1024) == "q8_0x8" and kernels.layout("q6_k", 1024) == "q6_k"
    assert kernels.layout("bf16", 1024) == "bf16" and kernels.layout(None, 8) is None
    assert kernels.gguf_format("q4_0x8") == "q4_0" and kernels.gguf_format("q4_kx8") == "q4_k"
    assert kernels.gguf_format("q4_k") == "q4_k"


def test_f32_matmul_is_numpy_exactly(backend):
    rng = np.random.default_rng(10)
    w = rng.standard_normal((19, 200)).astype(np.float32)
    X = rng.standard_normal((5, 200)).astype(np.float32)
    m = QMatrix.from_float(w, "f32")
    assert np.array_equal(m.matmul(X), X @ w.T)
    assert np.array_equal(m.matmul(X[:1]), X[:1] @ w.T)


@pytest.mark.parametrize("fmt", ["f16", "bf16"])
def test_float_formats_any_length(backend, fmt):
    # f16/bf16 rows need not be a multiple of the SIMD width
    rng = np.random.default_rng(11)
    w = rng.standard_normal((9, 75)).astype(np.float32)
    m = QMatrix.from_float(w, fmt)
    X = rng.standard_normal((2, 75)).astype(np.float32)
    ref = X.astype(np.float64) @ m.to_float().astype(np.float64).T
    assert _rel(m.matmul(X), ref) < 1e-5
    assert _rel(m.matmul(X[:1]), ref[:1]) < 1e-5


def test_large_batch_uses_tiles_and_stays_accurate(backend):
    rows, cols = 300, 256
    q = random_blocks("q4_k", rows, cols, seed=12)
    X = llm_like(max(kernels.SMALL_N.values()) + 1, cols, seed=13)   # more vectors than any kernel takes
    assert _rel(kernels.matmul(q, "q4_k", cols, X), _ref(q, "q4_k", cols, X)) < 1e-5


@pytest.mark.parametrize("fmt", kernels.KSB_FORMATS)
def test_super_block_products_at_their_largest(backend, fmt):
    # Every weight at its format's largest |code * scale| (q6_k: code 0 - 32 with scale -128, 4096;
    # iq4_xs -127 * -32; q5_k 31 * 63; q4_k 15 * 63; q3_k -4 * -32; q2_k 3 * 15) against activations all
    # at their largest: dot_ksb sums 16 such products a lane in int32, which holds them only just (q6_k:
    # 16 * 4096 * 32767 < 2^31).
    rows, cols, base = 8, 512, formats.INTERLEAVED.get(fmt, fmt)
    q = np.full((rows, formats.row_bytes(base, cols)), 0xFF, np.uint8)
    blocks = q.reshape(-1, formats.BLOCK[base][1])
    if base == "q6_k":
        blocks[:, :192] = 0          # ql, qh: code 0, weight -32
        blocks[:, 192:208] = 0x80    # scales -128
        blocks[:, 208:210] = np.array([2 ** -10], np.float16).view(np.uint8)
    elif base == "iq4_xs":
        blocks[:, 2:] = 0            # scales 0 - 32, codes 0: -127
        blocks[:, 0:2] = np.array([2 ** -10], np.float16).view(np.uint8)
    elif base == "q3_k":
        blocks[:, :108] = 0          # hmask clear, codes 0: -4; scales 0 - 32
        blocks[:, 108:110] = np.array([2 ** -10], np.float16).view(np.uint8)
    elif base == "q2_k":
        blocks[:, :16] = 0x0F        # scales 15, mins 0; codes 3
        blocks[:, 80:82] = np.array([2 ** -10], np.float16).view(np.uint8)
        blocks[:, 82:84] = 0
    else:
        blocks[:, 0:2] = np.array([2 ** -10], np.float16).view(np.uint8)   # d; dmin stays 0xFFFF: NaN,
        blocks[:, 2:4] = 0                                                     # so make it 0
    if fmt in formats.INTERLEAVED:
        q = formats.interleave(q, fmt)
    # six vectors (the x8 layouts' own 512-bit kernels take up to 32, dot_ksb the plain ones)
    X = np.stack([np.ones(cols), -np.ones(cols), np.full(cols, 1e-3), np.ones(cols), -np.ones(cols),
                  np.full(cols, 0.5)]).astype(np.float32)
    ref = _ref(q, fmt, cols, X)
    assert np.all(np.abs(ref[:2]) >= 22.5)   # 512 weights of 45 / 1024 (q2_k) and more
    assert _rel(kernels.matmul(q, fmt, cols, X), ref) < 1e-4
    assert _rel(kernels.matmul(q, fmt, cols, X[:2]), ref[:2]) < 1e-4


@pytest.mark.parametrize("fmt", kernels.KSB_FORMATS)
def test_super_block_kernels_take_whole_prompt_chunks(backend, fmt):
    # On the avx512 variant the super-block formats' kernels (dot_ksb, or the int8 ones) stay ahead of the
    # float32 tiles up to a prompt chunk's 256 vectors: 200 vectors go through them (int16 or int8
    # activations, a small error), eight at a time with a remainder of 0; on the avxvnni and avx2 variants
    # those kernels.TO_CHUNK names (the int8 kernels, their rows packed); elsewhere 200 vectors take the tiles.
    rows, cols = 24, 512
    q = random_blocks(formats.INTERLEAVED.get(fmt, fmt), rows, cols, seed=70)
    q = formats.interleave(q, fmt) if fmt in formats.INTERLEAVED else q
    X = llm_like(200, cols, seed=71)
    err = _rel(kernels.matmul(q, fmt, cols, X), _ref(q, fmt, cols, X))
    assert err < _tol(fmt, 200)
    if fmt in kernels.TO_CHUNK.get(backend.removeprefix("c-"), ()):
        assert err > 1e-6
    else:
        assert err < 1e-5


def test_empty_and_strided_inputs(backend):
    cols = 64
    q = random_blocks("q8_0", 10, cols, seed=14)
    assert kernels.matmul(q, "q8_0", cols, np.zeros((0, cols), np.float32)).shape == (0, 10)
    X = llm_like(1, cols, seed=15)
    view = q[::2]  # every other row: a row stride of two rows
    assert np.array_equal(kernels.matmul(view, "q8_0", cols, X),
                          kernels.matmul(np.ascontiguousarray(view), "q8_0", cols, X))
    X64 = X.astype(np.float64)  # other dtypes are converted
    assert np.array_equal(kernels.matmul(q, "q8_0", cols, X64), kernels.matmul(q, "q8_0", cols, X))
    # one vector takes a shorter path on the C backend: the same products on a strided matrix, and
    # from a vector that is itself a strided view
    assert np.array_equal(kernels.matvec(view, "q8_0", cols, X[0]), kernels.matmul(view, "q8_0", cols, X)[0])
    wide = np.repeat(X, 2, axis=1)
    assert np.array_equal(kernels.matvec(q, "q8_0", cols, wide[0, ::2]), kernels.matmul(q, "q8_0", cols, X)[0])


def _ffn_ref(gate: QMatrix, up: QMatrix, down: QMatrix, X: np.ndarray) -> np.ndarray:
    X = X.astype(np.float64)
    g = X @ gate.to_float().astype(np.float64).T
    u = X @ up.to_float().astype(np.float64).T
    return (g / (1 + np.exp(-g)) * u) @ down.to_float().astype(np.float64).T


@pytest.mark.parametrize("fmts", [("q4_0", "q8_0"), ("q4_k", "q6_k"), ("bf16", "bf16"), ("f32", "f16"),
                                  ("q8_0", "q4_k"), ("q4_0x8", "q4_0x8"), ("q4_kx8", "q4_kx8"), ("q8_0x8", "q8_0x8")])
@pytest.mark.parametrize("n", [1, 4, 12])
def test_expert_ffn(backend, fmts, n):
    hidden, inter = 256, 512
    rng = np.random.default_rng(16)
    gate = QMatrix.from_float(rng.standard_normal((inter, hidden)).astype(np.float32) * 0.1, fmts[0])
    up = QMatrix.from_float(rng.standard_normal((inter, hidden)).astype(np.float32) * 0.1, fmts[0])
    down = QMatrix.from_float(rng.standard_normal((hidden, inter)).astype(np.float32) * 0.1, fmts[1])
    X = llm_like(n, hidden, seed=17)
    Y = kernels.expert_ffn(gate, up, down, X)
    assert Y.shape == (n, hidden) and Y.dtype == np.float32
    assert _rel(Y, _ffn_ref(gate, up, down, X)) < max(_tol(up.fmt, n), _tol(down.fmt, n))
    assert kernels.expert_ffn(gate, up, down, X[0]).shape == (hidden,)


@pytest.mark.parametrize("fmts", [("q3_k", "q5_k"), ("q2_k", "q3_k"), ("q5_k", "q6_k"), ("iq4_xs", "iq4_nl"),
                                  ("q4_k", "q5_0"), ("q5_1", "q4_1")])
@pytest.mark.parametrize("n", [1, 4, 12])
def test_expert_ffn_in_llama_cpp_formats(backend, fmts, n):
    """Q3_K_M, Q2_K, Q5_K_M and IQ4_XS files' expert formats and llama-quantize's fallbacks (q5_0, q5_1, q4_1,
    iq4_nl), as the files hold them (no quantizer here): the fused FFN on every path equals the float
    product of their values."""
    hidden, inter = 256, 512
    gate, up = (QMatrix(random_blocks(fmts[0], inter, hidden, seed=s), fmts[0], inter, hidden) for s in (60, 61))
    down = QMatrix(random_blocks(fmts[1], hidden, inter, seed=62), fmts[1], hidden, inter)
    X = llm_like(n, hidden, seed=63) * np.float32(0.02)   # random-byte weights are large: keep silu in range
    Y = kernels.expert_ffn(gate, up, down, X)
    assert _rel(Y, _ffn_ref(gate, up, down, X)) < max(_tol(up.fmt, n), _tol(down.fmt, n))
    Ys = kernels.experts_ffn([(gate, up, down)] * 2, [X, X[:1]])
    assert np.array_equal(Ys[0], Y) and _rel(Ys[1], _ffn_ref(gate, up, down, X[:1])) < 3e-3


def _experts(fmts: tuple[str, str], E: int, hidden: int, inter: int, seed: int) -> list:
    rng = np.random.default_rng(seed)

    def m(rows: int, cols: int, fmt: str) -> QMatrix:
        return QMatrix.from_float(rng.standard_normal((rows, cols)).astype(np.float32) * 0.1, fmt)

    return [(m(inter, hidden, fmts[0]), m(inter, hidden, fmts[0]), m(hidden, inter, fmts[1])) for _ in range(E)]


@pytest.mark.parametrize("fmts", [("q4_0", "q8_0"), ("q4_k", "q6_k"), ("bf16", "bf16"), ("f32", "f16"),
                                  ("q4_0x8", "q8_0"), ("q4_kx8", "q6_k")])
def test_experts_ffn_equals_one_expert_at_a_time(backend, fmts):
    # One layer's experts in one call (the fused C path splits all of them over the threads) must
    # give each expert exactly what expert_ffn gives it alone; big enough to use every thread.
    hidden, inter = 512, 1024
    counts = [1, 3, 1, 2, 1, 4, 1]
    experts = _experts(fmts, len(counts), hidden, inter, seed=50)
    Xs = [llm_like(n, hidden, seed=51 + e) for e, n in enumerate(counts)]
    Ys = kernels.experts_ffn(experts, Xs)
    for ex, X, Y in zip(experts, Xs, Ys, strict=True):
        assert Y.shape == X.shape and Y.dtype == np.float32
        assert np.array_equal(Y, kernels.expert_ffn(*ex, X))
        assert _rel(Y, _ffn_ref(*ex, X)) < max(_tol(ex[1].fmt, len(X)), _tol(ex[2].fmt, len(X)))


def test_experts_ffn_mixed_experts_fall_back(backend):
    hidden, inter = 256, 512
    experts = _experts(("q4_0", "q8_0"), 2, hidden, inter, seed=60) + _experts(("q8_0", "q8_0"), 1, hidden, inter, 61)
    Xs = [llm_like(n, hidden, seed=62 + n) for n in (1, 2, 40)]  # 40 tokens: past the fused path's limit
    for ex, X, Y in zip(experts, Xs, kernels.experts_ffn(experts, Xs), strict=True):
        assert np.array_equal(Y, kernels.expert_ffn(*ex, X))
    assert kernels.experts_ffn([], []) == []
    with pytest.raises(ValueError):
        kernels.experts_ffn(experts, Xs[:2])


def test_expert_ffn_shape_mismatch():
    a = QMatrix.from_float(np.ones((64, 32), np.float32), "f32")
    with pytest.raises(kernels.FormatError):
        kernels.expert_ffn(a, a, a, np.ones((1, 32), np.float32))


# ---------------------------------------------------------------- threads, backends, errors

def test_concurrent_calls_agree_with_serial(backend):
    cols = 512
    mats = [QMatrix(random_blocks(f, 64, cols, seed=i), f, 64, cols) for i, f in enumerate(QUANT)]
    Xs = [llm_like(1 + i % 3, cols, seed=20 + i) for i in range(8)]
    want = [[m.matmul(X) for m in mats] for X in Xs]
    got: list = [None] * len(Xs)
    errors: list = []

    def work(i: int) -> None:
        try:
            got[i] = [m.matmul(Xs[i]) for m in mats for _ in range(3)][::3]
        except Exception as e:  # surfaced below
            errors.append(e)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(len(Xs))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors
    for g, w in zip(got, want, strict=True):
        assert all(np.array_equal(a, b) for a, b in zip(g, w, strict=True))


def test_thread_count_does_not_change_results(backend):
    q = random_blocks("q4_0", 256, 1024, seed=30)  # big enough to split across threads
    X = llm_like(1, 1024, seed=31)
    try:
        kernels.set_threads(1)
        one = kernels.matmul(q, "q4_0", 1024, X)
        kernels.set_threads(2)
        two = kernels.matmul(q, "q4_0", 1024, X)
    finally:
        kernels.set_threads(None)
    assert np.array_equal(one, two)
    assert kernels.threads() == len(os.sched_getaffinity(0))
    with pytest.raises(ValueError):
        kernels.set_threads(0)


@pytest.mark.parametrize("nthreads", [2, 3, 5, 8])
def test_pool_covers_every_row_once(backend, nthreads):
    # More threads than cores: regions nobody adopts in time are stolen from the back, and every
    # row must still be computed exactly once (a row done twice is harmless, a row skipped is a
    # zero or garbage from np.empty; both would differ from the one-thread result).
    rows, cols = 1000, 4096  # 2.3 MB of q4_0: ~80 chunks, an uneven split into regions
    q = random_blocks("q4_0", rows, cols, seed=40)
    Xs = [llm_like(1, cols, seed=41 + i) for i in range(4)]
    try:
        kernels.set_threads(1)
        want = [kernels.matmul(q, "q4_0", cols, X) for X in Xs]
        kernels.set_threads(nthreads)
        got: list = [None] * len(Xs)

        def work(i: int) -> None:  # several jobs open in the pool at once
            got[i] = [kernels.matmul(q, "q4_0", cols, Xs[i]) for _ in range(5)]

        ts = [threading.Thread(target=work, args=(i,)) for i in range(len(Xs))]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    finally:
        kernels.set_threads(None)
    for g, w in zip(got, want, strict=True):
        assert all(np.array_equal(a, w) for a in g)


def test_backend_from_environment(monkeypatch):
    before = kernels.backend()
    try:
        monkeypatch.setenv("MER_TUI_KERNELS", "numpy")
        assert kernels.set_backend() == "numpy" == kernels.backend()
        monkeypatch.setenv("MER_TUI_KERNELS", "numba")
        assert kernels.set_backend() == "numba"
        with pytest.raises(ValueError):
            kernels.set_backend("cuda")
    finally:
        kernels.set_backend(before)


def test_c_build_failure_falls_back_to_numba(monkeypatch, tmp_path):
    before = kernels.backend()
    monkeypatch.setattr(cpu_c, "_loaded", {})
    monkeypatch.setenv("MER_TUI_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "/bin/false")
    try:
        assert kernels.set_backend("c") == "numba"
        with pytest.raises(cpu_c.CompileError):
            kernels.set_backend("c-generic")
    finally:
        monkeypatch.undo()
        kernels.set_backend(before)


def test_c_library_is_cached_per_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("MER_TUI_CACHE_DIR", str(tmp_path))
    lib = cpu_c._build("generic")
    assert lib.parent.parent == tmp_path and lib.name.endswith(".so")
    mtime = lib.stat().st_mtime_ns
    assert cpu_c._build("generic") == lib and lib.stat().st_mtime_ns == mtime  # not rebuilt


def test_warmup_runs_in_background(backend):
    t = kernels.warmup(background=True)
    assert isinstance(t, threading.Thread)
    t.join(timeout=120)
    assert not t.is_alive()
    assert kernels.warmup(background=False) is None


def test_bad_input_names_the_problem():
    with pytest.raises(kernels.FormatError, match="unknown weight format"):
        kernels.quantize(np.ones((2, 32), np.float32), "q3_x")
    with pytest.raises(kernels.FormatError, match="divisible by 256"):
        kernels.quantize(np.ones((2, 32), np.float32), "q4_k")
    with pytest.raises(kernels.FormatError, match="2-D"):
        kernels.quantize(np.ones(32, np.float32), "q8_0")
    q = kernels.quantize(np.ones((2, 32), np.float32), "q8_0")
    with pytest.raises(kernels.FormatError, match="columns"):
        kernels.matmul(q, "q8_0", 32, np.ones((1, 64), np.float32))
    with pytest.raises(kernels.FormatError, match="shape"):
        kernels.dequantize(q[:, :10], "q8_0", 32)
    with pytest.raises(kernels.FormatError):
        QMatrix(q, "q8_0", 3, 32)


def test_kernels_import_without_ui():
    import subprocess
    import sys
    code = "import sys, kernels; assert 'textual' not in sys.modules and 'mer_tui' not in sys.modules; " \
           "assert 'torch' not in sys.modules"
    env = dict(os.environ)
    env.pop("MER_TUI_KERNELS", None)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)),
                   env=env)


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "iq4_nl", "q5_0"])
@pytest.mark.parametrize("cols", [32, 96, 160, 544])
def test_block_counts_not_multiple_of_four(backend, fmt, cols):
    # q4_0's and q5_0's products fold four blocks at a time, iq4_nl's eight; the rest go one by one
    q = random_blocks(fmt, 9, cols, seed=cols)
    for n in (1, 2, 5):
        X = llm_like(n, cols, seed=n)
        assert _rel(kernels.matmul(q, fmt, cols, X), _ref(q, fmt, cols, X)) < _tol(fmt, n)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_c_kernels_work_in_a_forked_child():
    before = kernels.backend()
    try:
        kernels.set_backend("c-generic")
        kernels.set_threads(2)
        q = random_blocks("q8_0", 512, 1024, seed=40)  # large enough to use the helper threads
        X = llm_like(1, 1024, seed=41)
        want = kernels.matmul(q, "q8_0", 1024, X)
        pid = os.fork()
        if pid == 0:  # the child: helpers do not survive fork; the pool must start afresh
            ok = np.array_equal(kernels.matmul(q, "q8_0", 1024, X), want)
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        kernels.set_threads(None)
        kernels.set_backend(before)


def _before_a_guard_page(q: np.ndarray) -> tuple[np.ndarray, mmap.mmap]:
    """A copy of q whose last byte is the last one before a page that cannot be read."""
    page = mmap.PAGESIZE
    size = (q.nbytes + page - 1) // page * page
    region = mmap.mmap(-1, size + page)
    libc = ctypes.CDLL(None, use_errno=True)
    base = ctypes.addressof(ctypes.c_char.from_buffer(region))
    assert libc.mprotect(ctypes.c_void_p(base + size), page, 0) == 0, os.strerror(ctypes.get_errno())
    copy = np.frombuffer(region, np.uint8, q.nbytes, size - q.nbytes).reshape(q.shape)
    copy[:] = q
    return copy, region


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("fmt", [*X8, *kernels.INT8_PACKED])
def test_x8_kernels_read_nothing_past_the_matrix(backend, fmt):
    # 40 rows: the int8 kernels take sixteen rows a call and compute the last run of eight on its own; 37
    # rows of a GGUF format: the last run they interleave is padded.  A read past the matrix's last byte
    # would fault on the guard page (in a child, so the run survives it).
    x8 = fmt in X8
    rows, cols = (40, 512) if x8 else (37, 512)
    q = random_blocks(formats.INTERLEAVED[fmt] if x8 else fmt, rows, cols, seed=81)
    q = formats.interleave(q, fmt) if x8 else q
    want = {n: kernels.matmul(q, fmt, cols, llm_like(n, cols, seed=82)) for n in (1, 5, 20)}
    guarded, region = _before_a_guard_page(q)
    pid = os.fork()
    if pid == 0:
        ok = all(np.array_equal(kernels.matmul(guarded, fmt, cols, llm_like(n, cols, seed=82)), y)
                 for n, y in want.items())
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    del guarded
    region.close()
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize("variant", sorted(cpu_c.FLAGS))
def test_c_source_compiles_without_warnings(variant):
    # gcc only warns of some mistakes (an initializer with more rows than its array: a call through a
    # pointer past the table); each variant's source, whatever this CPU runs, is held to -Wall -Wextra
    try:
        cc = cpu_c._compiler()
    except cpu_c.CompileError:
        pytest.skip("no C compiler")
    p = subprocess.run([cc, *cpu_c.FLAGS[variant], *cpu_c.COMMON_FLAGS, "-Wall", "-Wextra", "-Werror",
                        "-fsyntax-only", str(cpu_c.SOURCE)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]


def test_blas_runs_on_one_thread_beside_the_c_kernels():
    # numpy's OpenBLAS spins its workers ~0.1 s after a threaded call, and the C kernels called right after
    # (a router product, then a layer's experts) ran 30-50% slower beside them: with the C kernels BLAS gets
    # one thread, the float32 tiles run on threads of our own (their products still agree with the float
    # ones), and another backend gets BLAS's threads back.
    before = kernels.backend()
    try:
        kernels.set_backend("numpy")
        threaded = kernels.blas_threads()
        kernels.set_backend("c")
        assert kernels.blas_threads() == 1
        kernels.set_threads(2)
        q = kernels.quantize(np.random.default_rng(90).standard_normal((37, 512), dtype=np.float32), "bf16")
        X = llm_like(40, 512, seed=91)
        assert _rel(kernels.matmul(q, "bf16", 512, X), _ref(q, "bf16", 512, X)) < 1e-5
        assert kernels.blas_threads() == 1
        kernels.set_backend("numpy")
        assert kernels.blas_threads() == threaded
    finally:
        kernels.set_threads(None)
        kernels.set_backend(before)


def test_unwritable_cache_dir_falls_back_to_tmp(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("MER_TUI_CACHE_DIR", str(blocker / "cache"))
    lib = cpu_c._build("generic")
    assert lib.exists() and not str(lib).startswith(str(blocker))


def test_a_variant_the_compiler_cannot_build_gives_way(monkeypatch):
    # An old compiler without -mavx512vnni (or -mavxvnni) must cost that variant's kernels only, not every
    # C kernel: the next variant this CPU runs takes over.
    best = cpu_c.best_variant()
    if best == "generic":
        pytest.skip("this CPU runs only the portable kernels")
    monkeypatch.setattr(cpu_c, "FLAGS", {**cpu_c.FLAGS, best: [*cpu_c.FLAGS[best], "-mno-such-option-here"]})
    monkeypatch.setattr(cpu_c, "_loaded", {k: v for k, v in cpu_c._loaded.items() if k != best})
    with pytest.raises(cpu_c.CompileError, match="no-such-option"):
        cpu_c.load(best)
    runnable = [v for v in cpu_c.PREFERENCE if cpu_c.runs_here(v)]
    assert cpu_c.load().variant == runnable[runnable.index(best) + 1]


@pytest.mark.parametrize(("flags", "best"), [({"avx2", "fma", "f16c"}, "avx2"),
                                             ({"avx2", "fma", "f16c", "avx_vnni"}, "avxvnni"),
                                             ({"avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw",
                                               "avx512vl", "avx512_vnni"}, "avx512"),
                                             ({"avx_vnni"}, "generic")])
def test_best_variant_follows_the_cpus_flags(monkeypatch, flags, best):
    # Intel's client cores since Alder Lake have AVX-VNNI without AVX-512: the avxvnni variant is theirs.
    monkeypatch.setattr(cpu_c, "cpu_flags", lambda: flags)
    assert cpu_c.best_variant() == best


@pytest.mark.parametrize("variant", [v for v in cpu_c.PREFERENCE if cpu_c.runs_here(v)])
def test_crc32_equals_zlibs(variant):
    # The engine checks every bundle it reads against index.json's zlib CRC-32: the folded C code must
    # agree with zlib at every length (the 64-byte folds, the 16-byte steps, the bitwise tail), at any
    # alignment, and when continuing a running value (the store writes a bundle in parts).
    import zlib
    ck = cpu_c.load(variant)
    if "pclmulqdq" in cpu_c.cpu_flags():
        assert ck.crc32_fast   # so that the folds are what this test checks
    rng = np.random.default_rng(5)
    data = rng.integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()
    for n in (0, 1, 15, 16, 17, 63, 64, 65, 79, 80, 127, 128, 129, 1000, 4096, 65536 + 13, 1 << 20):
        for start in (0, 1, 7):
            chunk = memoryview(data)[start:start + n]
            for value in (0, 0x1234_5678, 0xFFFF_FFFF):
                assert ck.crc32(chunk, value) == zlib.crc32(chunk, value), (n, start, value)
    half = len(data) // 3
    assert ck.crc32(data[half:], ck.crc32(data[:half])) == zlib.crc32(data)
    assert ck.crc32(bytes(4096)) == zlib.crc32(bytes(4096)) and ck.crc32(b"\xff" * 200) == zlib.crc32(b"\xff" * 200)


def test_crc32_falls_back_to_zlib(backend):
    import zlib
    buf = np.random.default_rng(6).integers(0, 256, 70_000, dtype=np.uint8)
    assert kernels.crc32(buf) == zlib.crc32(buf) and kernels.crc32(buf[3:], 99) == zlib.crc32(buf[3:], 99)


def _attention_reference(q, K, V, t0, T, scale):
    Kf, Vf = K[:, t0:T].astype(np.float64), V[:, t0:T].astype(np.float64)
    s = q.astype(np.float64) @ Kf.transpose(0, 2, 1) * scale
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)) @ Vf


def _stored(x: np.ndarray, fmt: str) -> tuple[np.ndarray, np.ndarray]:
    """(the cache's buffer of x in `fmt`, the float values it holds)."""
    rows = kernels.kv_rows(x.astype(np.float32), fmt)
    if fmt != "q8_0":
        return rows, rows.astype(np.float64)
    d = x.shape[-1]
    held = formats.dequantize_ref(rows.reshape(-1, rows.shape[-1]), "q8_0", d).reshape(x.shape)
    return rows, held.astype(np.float64)


ATTENTION_SHAPES = [(4, 1, 128, 300, 512, 0), (2, 4, 64, 33, 33, 0), (3, 2, 72, 1000, 1024, 600), (1, 1, 32, 1, 4, 0),
                    # groups of four and more go through float32 tiles: eight queries with the row's 8-float chunks
                    # not a whole number of blocks, six (a block of four and one of two), seven on a head size
                    # that no vector path takes
                    (2, 8, 40, 77, 80, 3), (3, 6, 96, 257, 300, 1), (1, 7, 20, 50, 50, 0)]


@pytest.mark.parametrize("kv,heads,group,d,T,cap,t0", [(kv, *shape) for kv in ("f16", "f32", "q8_0")
                                                       for shape in ATTENTION_SHAPES
                                                       if kv != "q8_0" or shape[2] % 32 == 0])   # whole blocks
def test_a_decoded_tokens_attention_over_the_cache(backend, kv, heads, group, d, T, cap, t0):
    # A decoded token's attention reads the cache's buffers as they are: float16 and q8_0 ones by the C kernels
    # (F16C, or the portable conversion), numpy's casts elsewhere.  Against float64 on the same stored values:
    # grouped queries (GQA), a window (t0 > 0), a head size not a multiple of 16 (the tail loops), one key.
    rng = np.random.default_rng(heads * 100 + d + T)
    q = rng.standard_normal((heads, group, d), dtype=np.float32)
    K, Kheld = _stored(rng.standard_normal((heads, cap, d)) * 3, kv)
    V, Vheld = _stored(rng.standard_normal((heads, cap, d)), kv)
    got = kernels.attend_one(q, K, V, t0, T, d ** -0.5)
    ref = _attention_reference(q, Kheld, Vheld, t0, T, d ** -0.5)
    assert got.dtype == np.float32 and got.shape == (heads, group, d)
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-6 * max(1.0, np.abs(ref).max()))


def _prompt_reference(q, K, V, start, window, scale):
    """float64 attention of q (n, heads, group, d) at positions start.. over K, V (heads, T, d) held values."""
    T = start + q.shape[0]
    s = np.einsum("nhgd,htd->nhgt", q.astype(np.float64), K[:, :T]) * scale
    pos, key = np.arange(start, T)[:, None], np.arange(T)[None, :]
    allowed = (key <= pos) & ((key > pos - window) if window else True)
    s = np.where(allowed[:, None, None, :], s, -np.inf)
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return np.einsum("nhgt,htd->nhgd", e / e.sum(axis=-1, keepdims=True), V[:, :T])


PROMPT_SHAPES = [  # heads, group, d, n, start, cap, window
    (2, 1, 64, 70, 0, 80, 0),        # one query a head: items of 32 rows, a ragged last one
    (2, 8, 128, 9, 300, 320, 0),     # a later chunk: keys before the rows, eight queries a head
    (1, 4, 40, 37, 5, 50, 7),        # a sliding window shorter than the chunk; head size in 8-float chunks
    (3, 3, 20, 12, 0, 12, 0),        # three queries a head, a head size no vector path takes
    (1, 16, 32, 5, 1, 6, 0),         # sixteen queries: two rows an item
]


@pytest.mark.parametrize("kv,heads,group,d,n,start,cap,window", [
    (kv, *shape) for kv in ("f32", "f16", "q8_0") for shape in PROMPT_SHAPES if kv != "q8_0" or shape[2] % 32 == 0])
def test_a_prompts_attention_over_the_cache(backend, kv, heads, group, d, n, start, cap, window):
    # A prompt chunk's rows each see the keys up to their own position (and within the window): the C kernel
    # reads the cache's rows as they are (tiles converted once for a block of rows), numpy widens them.
    rng = np.random.default_rng(heads * 1000 + d + n)
    q = rng.standard_normal((n, heads, group, d), dtype=np.float32)
    K, Kheld = _stored(rng.standard_normal((heads, cap, d)) * 3, kv)
    V, Vheld = _stored(rng.standard_normal((heads, cap, d)), kv)
    got = kernels.attend_prompt(q, K, V, start, window, d ** -0.5)
    ref = _prompt_reference(q, Kheld, Vheld, start, window, d ** -0.5)
    assert got.dtype == np.float32 and got.shape == q.shape
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-6 * max(1.0, np.abs(ref).max()))
    if backend == "c-generic":   # kernels.attend_prompt keeps BLAS there; the portable C must be right all the same
        ck = cpu_c.load("generic")
        np.testing.assert_allclose(ck.attend_prompt(q, K, V, kv, start, window, d ** -0.5, 2), ref, rtol=0,
                                   atol=2e-6 * max(1.0, np.abs(ref).max()))


@pytest.mark.parametrize("kv", ["f16", "q8_0"])
def test_attention_over_scores_spread_far_apart(backend, kv):
    # Scores hundreds apart: the C kernels' vector exp clamps below -87.3 (1e-38 where expf gives 0 or a
    # subnormal), which a softmax's sum of at least 1 does not notice.  Float32 scores of a few hundred are
    # off by ~1e-4 themselves (numpy's too), so the bound is that: a wrong clamp would be off by the whole.
    rng = np.random.default_rng(12)
    q = rng.standard_normal((2, 3, 64), dtype=np.float32)
    K, Kheld = _stored(rng.standard_normal((2, 700, 64)) * 12, kv)
    V, Vheld = _stored(rng.standard_normal((2, 700, 64)), kv)
    got = kernels.attend_one(q, K, V, 0, 700, 1.0)
    ref = _attention_reference(q, Kheld, Vheld, 0, 700, 1.0)
    assert np.ptp(q.astype(np.float64) @ Kheld.transpose(0, 2, 1)) > 500
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, ref, rtol=0, atol=5e-4 * np.abs(ref).max())


def test_kv_rows_in_q8_0_are_ggmls_bytes(backend):
    # The C kernels quantize a KV cache's rows themselves (the numpy reference costs 7 ms a prompt chunk's layer):
    # ggml's q8_0, byte for byte, scales' float16 rounding (subnormal, overflowing, tie cases) included.
    rng = np.random.default_rng(9)
    x = rng.standard_normal((50, 128)).astype(np.float32)
    x[1] *= 1e-6            # scales in float16's subnormal range
    x[2] *= 1e-9            # below it
    x[3] = 0.0              # an all-zero block: scale 0
    x[4, :32] = 127 * 65530.0      # a scale that rounds past float16's largest: infinity, as ggml writes it
    x[4, 32:64] = 127 * 65519.0    # one just under the boundary: 65504
    x[5, :32] = 127 * 2.0 ** -25   # a scale of exactly 2**-25: ties to even, 0
    x[6, :32] = [127, 2.5, -3.5, 0.5, -0.5, 1.5, -1.5, 126.5] + [0.25] * 24   # scale 1: ties round away from 0
    x[7, :32] = 127 * (1 + 2.0 ** -11)   # a scale half-way between two float16s: to the even one, 1.0
    with np.errstate(over="ignore", invalid="ignore"):   # numpy's float16 of the overflowing scale
        got = kernels.kv_rows(x, "q8_0")
        want = gguf_bytes(x, "q8_0")
    assert got.dtype == np.uint8 and got.shape == (50, 136)
    np.testing.assert_array_equal(got, want)
    many = rng.standard_normal((3, 7, 64)).astype(np.float32)   # any leading shape
    assert kernels.kv_rows(many, "q8_0").shape == (3, 7, 68)


def test_widen_is_an_exact_cast(backend):
    K = np.random.default_rng(8).standard_normal((3, 50, 40)).astype(np.float16)
    K[0, 0, :4] = [np.inf, -np.inf, 6e-8, -0.0]   # a subnormal and the signs survive too
    got = kernels.widen(K[:, :37])
    assert got.dtype == np.float32 and np.array_equal(got, K[:, :37].astype(np.float32))
    assert np.signbit(got[0, 0, 3])
    # keys and values widened for one prompt chunk live side by side, in slots of their own
    V = -K
    k32, v32 = kernels.widen(K[:, :20], 0), kernels.widen(V[:, :20], 1)
    assert np.array_equal(k32, K[:, :20].astype(np.float32)) and np.array_equal(v32, V[:, :20].astype(np.float32))
    f32 = np.ones((2, 3, 4), np.float32)
    assert kernels.widen(f32) is f32
    # q8_0 rows widen to the values they hold
    x = np.random.default_rng(10).standard_normal((2, 9, 64)).astype(np.float32)
    rows, held = _stored(x, "q8_0")
    assert np.array_equal(kernels.widen(rows[:, :5]), held[:, :5].astype(np.float32))
    assert kernels.kv_format() == ("f16" if backend.startswith("c-") else "f32")


@pytest.mark.parametrize("variant", [v for v in cpu_c.PREFERENCE if cpu_c.runs_here(v)])
@pytest.mark.parametrize("kv", ["f16", "q8_0"])
def test_attention_over_few_heads_splits_their_keys_among_threads(variant, kv):
    # One KV head on eight threads: its 3000 keys go out in parts (at least 256 each) whose softmaxes merge
    # into one; the result is the one-thread one's within float32's reordering, and float64's.
    ck = cpu_c.load(variant)
    rng = np.random.default_rng(11)
    q = rng.standard_normal((1, 4, 64), dtype=np.float32)
    K, Kheld = _stored(rng.standard_normal((1, 3100, 64)) * 3, kv)
    V, Vheld = _stored(rng.standard_normal((1, 3100, 64)), kv)
    ref = _attention_reference(q, Kheld, Vheld, 50, 3050, 0.125)
    one = ck.attend(q, K, V, kv, 50, 3050, 0.125, 1)
    many = ck.attend(q, K, V, kv, 50, 3050, 0.125, 8)
    for got in (one, many):   # float32 sums of 3000 terms: a few 1e-6 of the largest from float64's
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    assert not np.array_equal(one, many)   # the parts did run: their sums come in another order
