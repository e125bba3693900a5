"""`mer-tui bench kernels`: matrix-vector speed of every weight format against numpy float32.

Decoding reads every active weight once per token, so the figure of merit is weight bytes per
second: a format that keeps up with DRAM turns its smaller size directly into more tokens/s.
For each format and shape this prints the bytes/s of `kernels.matvec` (median of repeats),
numpy's float32 matvec (BLAS sgemv) on the same shape as the baseline, their ratio, and how
much faster a token's product is than float32's.  It also measures the machine's DRAM read
bandwidth (all threads streaming a buffer far larger than the caches), the ceiling for both.

By default every timed call reads weights that are not in any cache ("cold"): a ring of copies
of the matrix, together several times the size of the last-level cache, is walked round, as a
decode step walks through many matrices.  --hot times the same matrix over and over instead.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence

import numpy as np

import kernels
from kernels import formats

REAL_SHAPES = "4096x14336,2048x1024,8192x4096"  # rows x cols: Mixtral FFN, OLMoE expert, Mixtral attention


class _Usage(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit status 2 (the CLI's convention)
        raise _Usage(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mer-tui bench kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--formats", default=",".join(f for f in formats.FORMATS if f != "f32"),
                   help="comma-separated weight formats (default: all quantized and half formats)")
    p.add_argument("--shapes", default=REAL_SHAPES, help=f"comma-separated ROWSxCOLS (default {REAL_SHAPES})")
    p.add_argument("--repeats", type=int, default=9, help="timed samples per measurement")
    p.add_argument("--stat", choices=("median", "min"), default="median",
                   help="which sample counts: the median (default) or the fastest (best case on a busy machine)")
    p.add_argument("--threads", type=int, default=None, help="kernel threads (default: all cores)")
    p.add_argument("--backend", default=None,
                   help="kernel backend: auto, c, c-avx512, c-avxvnni, c-avx2, c-generic, numba, numpy")
    p.add_argument("--hot", action="store_true", help="time one matrix repeatedly (cache-resident when it fits)")
    p.add_argument("--sample-ms", type=float, default=20.0,
                   help="length of one timed sample (default 20); short samples with --stat min find "
                        "the calls no other process interrupted")
    p.add_argument("--settle-ms", type=float, default=150.0,
                   help="untimed kernel calls before each kernel sample, so that numpy's BLAS workers, "
                        "which spin ~0.1 s after each call, have gone to sleep (default 150)")
    p.add_argument("--dram-mib", type=int, default=512,
                   help="buffer size of the DRAM read probe (default 512; at least 4x the last-level cache)")
    p.add_argument("--batch", default="", help="also time matmul for these token counts, e.g. 1,2,4,8,16,64")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return p


def _shapes(text: str) -> list[tuple[int, int]]:
    out = []
    for part in filter(None, (s.strip() for s in text.split(","))):
        try:
            r, c = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise _Usage(f"--shapes: {part!r} is not ROWSxCOLS") from None
        if r < 1 or c < 1:
            raise _Usage(f"--shapes: {part!r} must be positive")
        out.append((r, c))
    if not out:
        raise _Usage("--shapes: no shape given")
    return out


def l3_bytes() -> int:
    """Size of the largest cache (sysfs), or 32 MiB when unknown."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(base):
            try:
                with open(os.path.join(base, entry, "size")) as f:
                    text = f.read().strip().upper()
            except OSError:
                continue
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            best = max(best, int(text.rstrip("KMG")) * mult)
    except (OSError, ValueError):
        pass
    return best or 32 << 20


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def synthetic_weights(fmt: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Bytes in `fmt` with realistic values: speed does not depend on them, but denormal or NaN
    floats could (float formats come from Gaussian weights; block formats get random codes and
    ordinary f16 scales)."""
    if fmt in formats.FLOAT_FORMATS:
        w = rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(0.02)
        return kernels.quantize(w, fmt)
    if fmt in formats.INTERLEAVED:
        return formats.interleave(synthetic_weights(formats.INTERLEAVED[fmt], rows, cols, rng), fmt)
    q = rng.integers(0, 256, (rows, formats.row_bytes(fmt, cols)), dtype=np.uint8)
    _, nbytes = formats.BLOCK[fmt]
    blocks = q.reshape(-1, nbytes)
    offsets = {"q8_0": (0,), "q4_0": (0,), "q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208,), "q3_k": (108,),
               "q2_k": (80, 82), "iq4_nl": (0,), "iq4_xs": (0,),
               "q4_1": (0, 2), "q5_0": (0,), "q5_1": (0, 2)}[fmt]
    for off in offsets:
        d = (np.abs(rng.standard_normal(blocks.shape[0])) * 1e-3 + 1e-4).astype(np.float16)
        blocks[:, off:off + 2] = d.view(np.uint8).reshape(-1, 2)
    return q


def _ring(first: np.ndarray, ring_bytes: int, hot: bool) -> list[np.ndarray]:
    """Copies of `first` whose total exceeds `ring_bytes`, so that no call finds its weights cached."""
    if hot:
        return [first]
    n = max(1, math.ceil(ring_bytes / max(first.nbytes, 1)))
    return [first] + [first.copy() for _ in range(n - 1)]


class _Timer:
    """Times one call over a ring of inputs: `sample()` is the mean seconds of one call over a
    batch of about `sample_s` seconds, walking the ring round."""

    def __init__(self, call, items: list, sample_s: float = 0.02):
        self.call, self.items, self.k = call, items, 0
        for it in items:  # fault pages in, compile, warm the code
            call(it)
        t = time.perf_counter()
        call(items[0])
        one = max(time.perf_counter() - t, 1e-6)
        # The ring position carries over from sample to sample, so every call stays cold
        # however short the samples are.
        self.per_sample = max(1, math.ceil(sample_s / one))

    def run_for(self, seconds: float) -> None:
        """Untimed calls for `seconds` (the ring walked on, as by sample())."""
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            self.call(self.items[self.k % len(self.items)])
            self.k += 1

    def sample(self) -> float:
        t = time.perf_counter()
        for _ in range(self.per_sample):
            self.call(self.items[self.k % len(self.items)])
            self.k += 1
        return (time.perf_counter() - t) / self.per_sample


def _time(call, items: list, repeats: int, stat: str = "median", sample_s: float = 0.02,
          settle_s: float = 0.0) -> float:
    """Median (or minimum) seconds of one call, over `repeats` samples, after `settle_s` of untimed calls
    (a product timed right after numpy's shares the cores with its spinning BLAS workers: see _paired)."""
    timer = _Timer(call, items, sample_s)
    if settle_s > 0:
        timer.run_for(settle_s)
    samples = [timer.sample() for _ in range(max(1, repeats))]
    return float(np.min(samples) if stat == "min" else np.median(samples))


def _paired(a: _Timer, b: _Timer, repeats: int, stat: str = "median",
            settle_s: float = 0.0) -> tuple[float, float, float]:
    """Seconds of a, of b, and the ratio a/b, from samples taken in alternation.

    Interleaving makes both sides of each pair see the same load: when other processes take the
    cores, a ratio of two medians taken a minute apart measures the load as much as the code.
    stat "median": medians, and the median of the per-pair ratios; "min": the fastest samples
    (what each side does when nothing interrupts it: the closest to an idle machine).

    settle_s: untimed calls of a before each sample of a.  b is numpy, and OpenBLAS keeps its
    worker threads spinning for about 2**28 cycles (~0.1 s) after a multi-threaded call, waiting
    for the next; a sample of a taken at once shares the cores with them (on two cores the C
    kernels measured at half their speed that way).  Each side must be timed as it runs on its
    own, numpy with its spinning workers and the kernels without them.  The settling time is spent
    calling a, not sleeping: b's samples follow a's with no pause, and on this VM a sample taken
    after 150 ms idle ran 15-20% slower than one taken while the cores were busy (a cold 2048x1024
    q4_0 product, three pairs of processes; the cause is the VM's, not measured here), which
    counted against a alone."""
    ta, tb = [], []
    for _ in range(max(1, repeats)):
        if settle_s > 0:
            a.run_for(settle_s)
        ta.append(a.sample())
        tb.append(b.sample())
    ta_, tb_ = np.array(ta), np.array(tb)
    if stat == "min":
        return float(ta_.min()), float(tb_.min()), float(ta_.min() / tb_.min())
    return float(np.median(ta_)), float(np.median(tb_)), float(np.median(ta_ / tb_))


def dram_read_bandwidth(threads: int, repeats: int, nbytes: int, stat: str = "median") -> dict[str, float]:
    """Read bandwidth of a buffer far larger than the caches: all threads, and one numpy stream."""
    from .machine import dram_read_bandwidth as threads_read

    buf = np.ones(nbytes // 4, dtype=np.float32)
    return {"all_threads": threads_read(nbytes, repeats, threads, stat),
            "numpy_1_thread": buf.nbytes / _time(lambda _: buf.sum(dtype=np.float64), [None], repeats, stat)}


def run(args: argparse.Namespace) -> dict:
    fmts = [f.strip() for f in args.formats.split(",") if f.strip()]
    for f in fmts:
        if f not in formats.FORMATS:
            raise _Usage(f"--formats: unknown format {f!r} (known: {', '.join(formats.FORMATS)})")
    shapes = _shapes(args.shapes)
    for f in fmts:
        for r, c in shapes:
            if c % formats.BLOCK[f][0]:
                raise _Usage(f"--shapes: {r}x{c} has {c} columns, not a multiple of {f}'s block "
                             f"({formats.BLOCK[f][0]})")
    batch = [int(v) for v in args.batch.split(",") if v.strip()] if args.batch else []
    if args.repeats < 1:
        raise _Usage("--repeats must be at least 1")
    if args.threads is not None and args.threads < 1:
        raise _Usage("--threads must be at least 1")
    kernels.set_threads(args.threads)
    try:
        backend = kernels.set_backend(args.backend)
    except ValueError as e:
        raise _Usage(f"--backend: {e}") from None
    # The baseline is numpy's float32 product as numpy runs it, on all of BLAS's threads (the engine keeps
    # BLAS to one beside the C kernels); _paired's settle keeps its spinning workers off the kernels' samples.
    kernels.unlimit_blas()
    threads = kernels.threads()
    load_before = os.getloadavg()
    ring_bytes = 4 * l3_bytes()
    rng = np.random.default_rng(0)

    result: dict = {
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "l3_bytes": l3_bytes(),
                    "python": platform.python_version(), "numpy": np.__version__},
        "backend": backend, "threads": threads, "blas_threads": kernels.blas_threads(),
        "mode": "hot" if args.hot else "cold", "stat": args.stat,
        "sample_ms": args.sample_ms,
        "command": "mer-tui bench kernels " + " ".join(args.argv),
        # numpy's BLAS picks its thread count from these when numpy is imported
        "blas_env": {k: os.environ[k] for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS") if k in os.environ},
        "load_avg_before": list(load_before),
    }
    if args.sample_ms <= 0:
        raise _Usage("--sample-ms must be positive")
    sample_s = args.sample_ms / 1000
    if args.settle_ms < 0:
        raise _Usage("--settle-ms must not be negative")
    settle_s = args.settle_ms / 1000
    result["settle_ms"] = args.settle_ms
    if args.dram_mib < 1:
        raise _Usage("--dram-mib must be at least 1")
    dram_bytes = args.dram_mib << 20
    result["dram_read_bytes_per_s"] = dram_read_bandwidth(threads, args.repeats, dram_bytes, args.stat)
    rows_out = []
    for rows, cols in shapes:
        x = rng.standard_normal(cols, dtype=np.float32)
        W = rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(0.02)
        base = _Timer(lambda w, x=x: w @ x, _ring(W, ring_bytes, args.hot), sample_s)
        del W
        for fmt in fmts:
            q = synthetic_weights(fmt, rows, cols, rng)
            timer = _Timer(lambda m, fmt=fmt, cols=cols, x=x: kernels.matvec(m, fmt, cols, x),
                           _ring(q, ring_bytes, args.hot), sample_s)
            t, t32, speedup = _paired(timer, base, args.repeats, args.stat, settle_s)
            t32_over_t = 1.0 / speedup  # median of per-pair t32 / t
            rows_out.append({
                "shape": f"{rows}x{cols}", "format": fmt, "weight_bytes": int(q.nbytes),
                "seconds": t, "bytes_per_s": q.nbytes / t, "weights_per_s": rows * cols / t,
                "numpy_f32_seconds": t32, "numpy_f32_bytes_per_s": rows * cols * 4 / t32,
                "ratio": q.nbytes / (rows * cols * 4) * t32_over_t, "speedup_vs_f32": t32_over_t,
            })
            del timer
            for n in batch:
                X = rng.standard_normal((n, cols), dtype=np.float32)
                tb = _time(lambda m, fmt=fmt, cols=cols, X=X: kernels.matmul(m, fmt, cols, X), [q],
                           args.repeats, args.stat, sample_s, settle_s)
                rows_out[-1].setdefault("batch", []).append(
                    {"n": n, "seconds": tb, "tokens_per_s": n / tb, "bytes_per_s": q.nbytes / tb})
        del base
    result["results"] = rows_out
    # measured again at the end: a changed figure says the load changed during the run
    result["dram_read_bytes_per_s_after"] = dram_read_bandwidth(threads, args.repeats, dram_bytes, args.stat)
    result["load_avg_after"] = list(os.getloadavg())
    return result


def _gb(v: float) -> str:
    return f"{v / 1e9:.1f}"


def render(res: dict) -> str:
    dram = res["dram_read_bytes_per_s"]
    lines = [
        f"kernels: backend {res['backend']}, {res['threads']} threads, {res['mode']} weights, "
        f"{res['stat']} of samples; BLAS env {res['blas_env'] or 'default'}; "
        f"{res['machine']['cpu']}, {res['machine']['cores']} cores",
        f"DRAM read: {_gb(dram['all_threads'])} GB/s with {res['threads']} threads, "
        f"{_gb(dram['numpy_1_thread'])} GB/s numpy one thread (at the end: "
        f"{_gb(res['dram_read_bytes_per_s_after']['all_threads'])} and "
        f"{_gb(res['dram_read_bytes_per_s_after']['numpy_1_thread'])})",
        f"load average before/after: {res['load_avg_before'][0]:.2f} / {res['load_avg_after'][0]:.2f} "
        f"(on {res['machine']['cores']} cores; above ~0.5 other processes were competing)",
        "",
        f"{'shape':>11} {'format':>6} {'MB':>7} {'GB/s':>6} {'Gw/s':>6} {'f32 GB/s':>8} {'ratio':>6} "
        f"{'x f32':>6}",
    ]
    for r in res["results"]:
        lines.append(
            f"{r['shape']:>11} {r['format']:>6} {r['weight_bytes'] / 1e6:7.1f} {_gb(r['bytes_per_s']):>6} "
            f"{r['weights_per_s'] / 1e9:6.1f} {_gb(r['numpy_f32_bytes_per_s']):>8} {r['ratio']:6.2f} "
            f"{r['speedup_vs_f32']:6.2f}")
        for b in r.get("batch", []):
            lines.append(f"{'':>11} {'':>6}   n={b['n']:<4} {b['tokens_per_s']:10.0f} tokens/s "
                         f"({_gb(b['bytes_per_s'])} GB/s of weights per call)")
    lines += ["", "GB/s: weight bytes per second of kernels.matvec; f32 GB/s: numpy float32 matvec on the "
              "same shape, sampled in alternation with it; ratio: bytes/s over f32's bytes/s (with --stat "
              "median, the median of the per-pair ratios); x f32: f32's time per token over this format's."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        args.argv = argv
        res = run(args)
    except _Usage as e:
        print(f"mer-tui bench kernels: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res, indent=2) if args.json else render(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
