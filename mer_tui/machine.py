"""Measured facts about this machine that bound decode speed: DRAM and O_DIRECT read bandwidth."""
from __future__ import annotations

import mmap
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def dram_read_bandwidth(nbytes: int = 128 * 1024**2, repeats: int = 5) -> float:
    """Bytes/s of a streaming read over a buffer far larger than the caches (median of repeats).

    128 MiB is 4x the largest L3 of this class of machine, and small enough to measure inside the
    memory limit a benchmark runs under.

    A float64 sum reads each byte once and does too little arithmetic to be compute-bound, so
    it is the read side of a STREAM-like test.
    """
    buf = np.ones(nbytes // 8, dtype=np.float64)
    buf.sum()  # fault the pages in before timing
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        buf.sum()
        times.append(time.perf_counter() - t)
    return nbytes / float(np.median(times))


def direct_read_bandwidth(path: str | os.PathLike, seconds: float = 1.5, block: int = 4 * 1024**2,
                          queue_depth: int = 8, max_bytes: int | None = None) -> tuple[float, str]:
    """Bytes/s of O_DIRECT reads of `path` (random 4 MiB blocks at `queue_depth`), and how it was read.

    Falls back to buffered reads (and says so) on a filesystem that refuses O_DIRECT.
    """
    path = Path(path)
    size = path.stat().st_size
    nblocks = max(1, size // block)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        how = "O_DIRECT"
    except OSError:
        fd = os.open(path, os.O_RDONLY)
        how = "buffered (O_DIRECT refused)"
    rng = np.random.default_rng(0)
    bufs = [mmap.mmap(-1, block) for _ in range(queue_depth)]  # page-aligned, as O_DIRECT needs
    total = 0
    try:
        with ThreadPoolExecutor(queue_depth) as pool:
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < seconds and (max_bytes is None or total < max_bytes):
                offs = rng.integers(0, nblocks, queue_depth) * block
                got = pool.map(lambda a: os.preadv(fd, [a[0]], int(a[1])), zip(bufs, offs))
                total += sum(got)
            elapsed = time.perf_counter() - t0
    finally:
        os.close(fd)
        for b in bufs:
            b.close()
    return total / elapsed, how


def best_direct_read_bandwidth(path: str | os.PathLike, samples: int = 3, seconds: float = 0.5) -> tuple[float, str]:
    """The best of a few short samples: on a shared disk a single sample swings by 2x, and the
    roofline wants what the device can do, not what it did while someone else was reading."""
    runs = [direct_read_bandwidth(path, seconds=seconds) for _ in range(samples)]
    return max(runs)


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM).  getrusage's ru_maxrss is not used: Linux carries it
    across exec, so a child started from a large parent reports the parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0
