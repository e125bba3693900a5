"""The C kernels (qkernels.c): compiled once per machine at first use, loaded with cffi (ABI mode).

ABI mode needs neither Python headers nor setuptools, only a C compiler; the shared library goes to
a per-user cache directory keyed by a hash of the source, the flags and the compiler, so every later
process just dlopens it.  The variant is chosen from /proc/cpuinfo: "avx2" (AVX2 + FMA + F16C
kernels; prompts over the 4-6-bit formats in int8 with vpmaddubsw) where the CPU has those flags,
"avx512" (those, plus AVX-512 VNNI ones for prefill) where it also has AVX-512 F/BW/VL and VNNI,
"avxvnni" (the AVX2 kernels plus 256-bit VNNI ones for prefill) where it has AVX-VNNI but not those
(Intel's client cores since Alder Lake), else "generic" (portable C).  Any failure (no compiler, a
sandbox that forbids exec) is reported by `load` as an exception the caller turns into a fallback to
numba.  cffi releases the GIL around each call, so threads can run kernels in parallel.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("qkernels.c")
FMT_CODE = {"f32": 0, "f16": 1, "bf16": 2, "q8_0": 3, "q4_0": 4, "q4_k": 5, "q6_k": 6,
            "q4_0x8": 7, "q4_kx8": 8, "q8_0x8": 9, "q5_k": 10, "q3_k": 11, "q2_k": 12,
            "iq4_nl": 13, "iq4_xs": 14, "q4_1": 15, "q5_0": 16, "q5_1": 17, "iq4_xsx8": 18,
            "q5_kx8": 19}
ABI_VERSION = 16

CDEF = """
int mk_version(void);
int mk_simd(void);
int mk_dequant(int fmt, const uint8_t *w, int64_t rb, int64_t rows, int64_t cols, float *out, int nthreads);
int mk_matmul(int fmt, const uint8_t *w, int64_t rb, int64_t rows, int64_t cols, const float *X,
              int64_t n, float *Y, int nthreads);
int mk_ffn(int fmt_gu, const uint8_t *g, const uint8_t *u, int64_t rb_gu, int fmt_d, const uint8_t *dn,
           int64_t rb_d, int64_t hidden, int64_t inter, const float *X, int64_t n, float *Y, int nthreads);
int mk_moe(int fmt_gu, int fmt_d, int64_t hidden, int64_t inter, int64_t E, const uint8_t *const *g,
           const uint8_t *const *u, int64_t rb_gu, const uint8_t *const *dn, int64_t rb_d,
           const float *const *X, const int64_t *n, float *const *Y, int nthreads);
int mk_attend(int fmt, const float *q, const uint8_t *K, const uint8_t *V, int64_t heads, int64_t group,
              int64_t cap, int64_t t0, int64_t T, int64_t d, float scale, float *out, int nthreads);
int mk_attend_prompt(int fmt, const float *q, const uint8_t *K, const uint8_t *V, int64_t heads, int64_t group,
                     int64_t cap, int64_t start, int64_t n, int64_t window, int64_t d, float scale, float *out,
                     int nthreads);
void mk_quant_q8_0(const float *x, int64_t rows, int64_t cols, uint8_t *out);
double mk_read_sum(const float *buf, int64_t n, int nthreads);
int mk_crc32_fast(void);
uint32_t mk_crc32(uint32_t crc, const uint8_t *p, int64_t n);
"""

_AVX2 = ["-O3", "-mavx2", "-mfma", "-mf16c"]
FLAGS = {"generic": ["-O3"], "avx2": _AVX2, "avx512": [*_AVX2, "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"],
         "avxvnni": [*_AVX2, "-mavxvnni"]}
# What each variant needs of the CPU (/proc/cpuinfo's names), and what mk_simd() says it was built with.
NEEDS = {"generic": set(), "avx2": {"avx2", "fma", "f16c"},
         "avx512": {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"},
         "avxvnni": {"avx2", "fma", "f16c", "avx_vnni"}}
SIMD_LEVEL = {"generic": 0, "avx2": 1, "avx512": 2, "avxvnni": 3}
# The variants from the most capable down: a CPU takes the first it runs.
PREFERENCE = ("avx512", "avxvnni", "avx2", "generic")
COMMON_FLAGS = ["-std=gnu11", "-fPIC", "-shared", "-pthread", "-ffp-contract=off", "-fno-math-errno"]


class CompileError(RuntimeError):
    """The C kernels could not be built or loaded on this machine."""


def cpu_flags() -> set[str]:
    """The CPU feature flags the kernel reports (empty where /proc/cpuinfo is not readable)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def runs_here(variant: str) -> bool:
    """Whether this CPU has what `variant` needs."""
    return NEEDS[variant] <= cpu_flags()


def best_variant() -> str:
    """The most capable variant this CPU runs: "avx512", "avxvnni", "avx2" or "generic"."""
    return next(v for v in PREFERENCE if runs_here(v))


def cache_dir() -> Path:
    """Per-user directory for the compiled libraries (MER_TUI_CACHE_DIR overrides it)."""
    env = os.environ.get("MER_TUI_CACHE_DIR")
    if env:
        return Path(env)
    try:
        from platformdirs import user_cache_dir
        return Path(user_cache_dir("mer-tui"))
    except ImportError:  # platformdirs is a dependency, but a missing one should not cost the kernels
        return Path.home() / ".cache" / "mer-tui"


def _compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise CompileError("no C compiler found (set CC, or install gcc)")
    return cc


def _compiler_id(cc: str) -> str:
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
        return out.stdout.splitlines()[0] if out.stdout else cc
    except (OSError, subprocess.SubprocessError) as e:
        raise CompileError(f"C compiler {cc} does not run: {e}") from e


def _build(variant: str) -> Path:
    cc = _compiler()
    src = SOURCE.read_bytes()
    key = hashlib.sha256(
        b"\0".join([src, " ".join(FLAGS[variant] + COMMON_FLAGS).encode(), _compiler_id(cc).encode(),
                    sys.platform.encode()])).hexdigest()[:16]
    lib = None
    for base in (cache_dir(), Path(tempfile.gettempdir()) / f"mer-tui-{getattr(os, 'getuid', lambda: 0)()}"):
        out_dir = base / f"kernels-{key}"
        lib = out_dir / f"libmerk_{variant}.so"
        if lib.exists():
            return lib
        try:  # an unwritable cache directory (read-only home, sandbox) falls back to /tmp
            out_dir.mkdir(parents=True, exist_ok=True)
            break
        except OSError:
            continue
    else:
        raise CompileError(f"no writable directory for the compiled kernels (tried {cache_dir()})")
    fd, tmp = tempfile.mkstemp(prefix=lib.name, suffix=".tmp", dir=out_dir)
    os.close(fd)
    cmd = [cc, *FLAGS[variant], *COMMON_FLAGS, "-o", tmp, str(SOURCE), "-lm"]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.SubprocessError) as e:
        os.unlink(tmp)
        raise CompileError(f"running {cc} failed: {e}") from e
    if res.returncode != 0:
        os.unlink(tmp)
        raise CompileError(f"compiling {SOURCE.name} ({variant}) failed:\n{res.stderr.strip()[-2000:]}")
    # Atomic: a concurrent process either sees no library or a complete one.
    os.replace(tmp, lib)
    return lib


class CKernels:
    """One loaded variant of the C library, with numpy-friendly wrappers."""

    def __init__(self, variant: str):
        import cffi

        self.variant = variant
        self.path = _build(variant)
        self.ffi = cffi.FFI()
        self.ffi.cdef(CDEF)
        try:
            self.lib = self.ffi.dlopen(str(self.path))
        except OSError as e:
            raise CompileError(f"cannot load {self.path}: {e}") from e
        if self.lib.mk_version() != ABI_VERSION:
            raise CompileError(f"{self.path} has ABI {self.lib.mk_version()}, expected {ABI_VERSION}")
        if self.lib.mk_simd() != SIMD_LEVEL[variant]:
            raise CompileError(f"{self.path} was built without its {variant} paths (level {self.lib.mk_simd()})")
        self.crc32_fast = bool(self.lib.mk_crc32_fast())
        # from_buffer with a type object rather than its name: ~0.3 us less per array and call
        self._u8, self._f32 = self.ffi.typeof("uint8_t[]"), self.ffi.typeof("float[]")

    def _p(self, a: np.ndarray, ctype: str):
        # A pointer to the array's first element.  from_buffer is the cheapest way (~0.5 us, and
        # fine for read-only arrays such as memory maps) but needs a contiguous buffer; a view
        # with a row stride goes by its address.  Callers keep `a` alive during the call.
        if a.flags.c_contiguous:
            return self.ffi.from_buffer(ctype + "[]", a)
        return self.ffi.cast(ctype + " *", a.__array_interface__["data"][0])

    def dequantize(self, q: np.ndarray, fmt: str, cols: int, threads: int,
                   out: np.ndarray | None = None) -> np.ndarray:
        rows = q.shape[0]
        if out is None:
            out = np.empty((rows, cols), dtype=np.float32)
        assert out.shape == (rows, cols) and out.dtype == np.float32 and out.flags.c_contiguous
        rc = self.lib.mk_dequant(FMT_CODE[fmt], self._p(q, "uint8_t"), q.strides[0], rows, cols,
                                 self._p(out, "float"), threads)
        if rc:
            raise RuntimeError(f"mk_dequant({fmt}) failed with {rc}")
        return out

    def matmul(self, q: np.ndarray, fmt: str, cols: int, X: np.ndarray, threads: int) -> np.ndarray:
        rows, n = q.shape[0], X.shape[0]
        Y = np.empty((n, rows), dtype=np.float32)
        rc = self.lib.mk_matmul(FMT_CODE[fmt], self._p(q, "uint8_t"), q.strides[0], rows, cols,
                                self._p(X, "float"), n, self._p(Y, "float"), threads)
        if rc:
            raise RuntimeError(f"mk_matmul({fmt}) failed with {rc}")
        return Y

    def matvec(self, q: np.ndarray, fmt: str, cols: int, x: np.ndarray, threads: int) -> np.ndarray:
        """matmul for one contiguous float32 vector x (cols,): returns (rows,)."""
        y = np.empty(q.shape[0], dtype=np.float32)
        buf = self.ffi.from_buffer
        rc = self.lib.mk_matmul(FMT_CODE[fmt], buf(self._u8, q) if q.flags.c_contiguous else self._p(q, "uint8_t"),
                                q.strides[0], q.shape[0], cols, buf(self._f32, x), 1, buf(self._f32, y), threads)
        if rc:
            raise RuntimeError(f"mk_matmul({fmt}) failed with {rc}")
        return y

    def ffn(self, g: np.ndarray, u: np.ndarray, fmt_gu: str, d: np.ndarray, fmt_d: str, hidden: int,
            inter: int, X: np.ndarray, threads: int) -> np.ndarray:
        n = X.shape[0]
        Y = np.empty((n, hidden), dtype=np.float32)
        rc = self.lib.mk_ffn(FMT_CODE[fmt_gu], self._p(g, "uint8_t"), self._p(u, "uint8_t"),
                             g.strides[0], FMT_CODE[fmt_d], self._p(d, "uint8_t"), d.strides[0],
                             hidden, inter, self._p(X, "float"), n, self._p(Y, "float"), threads)
        if rc:
            raise RuntimeError(f"mk_ffn failed with {rc}")
        return Y

    def moe(self, gs: list[np.ndarray], us: list[np.ndarray], fmt_gu: str, ds: list[np.ndarray], fmt_d: str,
            hidden: int, inter: int, Xs: list[np.ndarray], threads: int) -> list[np.ndarray]:
        """Expert FFNs of one layer in one call: expert e on Xs[e] (n_e, hidden).  Every gate/up
        matrix must share one row stride, every down matrix another."""
        E = len(gs)
        Ys = [np.empty((X.shape[0], hidden), dtype=np.float32) for X in Xs]
        ffi = self.ffi
        rc = self.lib.mk_moe(
            FMT_CODE[fmt_gu], FMT_CODE[fmt_d], hidden, inter, E,
            ffi.new("uint8_t *[]", [self._p(g, "uint8_t") for g in gs]),
            ffi.new("uint8_t *[]", [self._p(u, "uint8_t") for u in us]), gs[0].strides[0],
            ffi.new("uint8_t *[]", [self._p(d, "uint8_t") for d in ds]), ds[0].strides[0],
            ffi.new("float *[]", [self._p(X, "float") for X in Xs]),
            ffi.new("int64_t[]", [X.shape[0] for X in Xs]),
            ffi.new("float *[]", [self._p(Y, "float") for Y in Ys]), threads)
        if rc:
            raise RuntimeError(f"mk_moe failed with {rc}")
        return Ys

    def attend(self, q: np.ndarray, K: np.ndarray, V: np.ndarray, fmt: str, t0: int, T: int, scale: float,
               threads: int) -> np.ndarray:
        """One decoded token's attention: q (heads, group, d) float32 against keys and values [t0, T) of K, V
        (heads, cap, row bytes) buffers of `fmt` rows ("f16", or "q8_0" for d a multiple of 32); returns
        (heads, group, d) float32."""
        heads, group, d = q.shape
        assert K.shape == V.shape and K.shape[0] == heads and K.flags.c_contiguous and V.flags.c_contiguous
        q = np.ascontiguousarray(q, dtype=np.float32)
        out = np.empty_like(q)
        rc = self.lib.mk_attend(FMT_CODE[fmt], self._p(q, "float"), self._p(K.view(np.uint8), "uint8_t"),
                                self._p(V.view(np.uint8), "uint8_t"), heads, group, K.shape[1], t0, T, d, scale,
                                self._p(out, "float"), threads)
        if rc:
            raise RuntimeError(f"mk_attend({fmt}) failed with {rc}")
        return out

    def attend_prompt(self, q: np.ndarray, K: np.ndarray, V: np.ndarray, fmt: str, start: int, window: int,
                      scale: float, threads: int) -> np.ndarray:
        """A prompt chunk's attention: q (n, kv_heads, group, d) float32 for positions start.., against keys and
        values 0 .. start + n - 1 of K, V (kv_heads, cap, row bytes) buffers of `fmt` rows, each row seeing the
        keys up to its own (and within `window` of it, 0 for no window); returns q's shape, float32."""
        n, heads, group, d = q.shape
        assert K.shape == V.shape and K.shape[0] == heads and K.flags.c_contiguous and V.flags.c_contiguous
        q = np.ascontiguousarray(q, dtype=np.float32)
        out = np.empty_like(q)
        rc = self.lib.mk_attend_prompt(FMT_CODE[fmt], self._p(q, "float"), self._p(K.view(np.uint8), "uint8_t"),
                                       self._p(V.view(np.uint8), "uint8_t"), heads, group, K.shape[1], start, n,
                                       window, d, scale, self._p(out, "float"), threads)
        if rc:
            raise RuntimeError(f"mk_attend_prompt({fmt}) failed with {rc}")
        return out

    def quant_q8_0(self, x: np.ndarray) -> np.ndarray:
        """float32 (rows, cols), cols a multiple of 32 -> uint8 (rows, cols / 32 * 34): ggml's q8_0 bytes."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        rows, cols = x.shape
        out = np.empty((rows, cols // 32 * 34), dtype=np.uint8)
        self.lib.mk_quant_q8_0(self._p(x, "float"), rows, cols, self._p(out, "uint8_t"))
        return out

    def crc32(self, data, value: int = 0) -> int:
        """zlib.crc32(data, value) for any contiguous buffer."""
        return int(self.lib.mk_crc32(value, self.ffi.from_buffer(data), memoryview(data).nbytes))

    def read_sum(self, buf: np.ndarray, threads: int) -> float:
        buf = np.ascontiguousarray(buf, dtype=np.float32)
        return float(self.lib.mk_read_sum(self._p(buf, "float"), buf.size, threads))


_loaded: dict[str, CKernels] = {}
_lock = threading.Lock()


def load(variant: str | None = None) -> CKernels:
    """The C kernels for `variant` ("avx512", "avxvnni", "avx2", "generic"; None: the best this CPU runs),
    built if need be.  With None, a variant the compiler cannot build (an old gcc without -mavx512vnni or
    -mavxvnni) gives way to the next one."""
    if variant is None:
        tried = [v for v in PREFERENCE if runs_here(v)]
        for v in tried[:-1]:
            try:
                return load(v)
            except CompileError as e:
                log.warning("C kernels %s unavailable (%s); trying %s", v, e, tried[tried.index(v) + 1])
        return load(tried[-1])
    if variant not in FLAGS:
        raise CompileError(f"unknown C kernel variant {variant!r} (known: {', '.join(FLAGS)})")
    if not runs_here(variant):
        missing = ", ".join(sorted(NEEDS[variant] - cpu_flags()))
        raise CompileError(f"this CPU lacks {missing}; the {variant} kernels cannot run here")
    with _lock:  # one build per process even when warmup and a first call race
        if variant not in _loaded:
            _loaded[variant] = CKernels(variant)
        return _loaded[variant]
