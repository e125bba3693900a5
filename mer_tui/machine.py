"""Measured facts about this machine that bound decode speed: DRAM and O_DIRECT read bandwidth."""
from __future__ import annotations

import functools
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from engine.io.buffers import BufferPool, read_buffer


def dram_read_bandwidth(nbytes: int = 128 * 1024**2, repeats: int = 5, threads: int | None = None,
                        stat: str = "median") -> float:
    """Bytes/s of a streaming read by `threads` threads (None: all the kernels use) over a buffer far
    larger than the caches; the median (or "min": the fastest) of `repeats` reads.

    128 MiB is 4x the largest L3 of this class of machine, and small enough to measure inside the
    memory limit a benchmark runs under.  All threads, because the decode kernels read the cached
    weights with all threads: one numpy thread saw about half of this machine's bandwidth (18 of
    ~35 GB/s), which made a roofline built on it easy to reach.
    """
    import kernels

    b = kernels.backend()
    if b.startswith("c-"):
        from kernels import cpu_c
        read_sum = cpu_c.load(b[2:]).read_sum
    else:
        from kernels import matvec_numba
        read_sum = matvec_numba.read_sum
    read = functools.partial(read_sum, threads=threads or kernels.threads())
    buf = np.ones(nbytes // 4, dtype=np.float32)
    read(buf)  # fault the pages in (and compile) before timing
    times = []
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        read(buf)
        times.append(time.perf_counter() - t)
    return buf.nbytes / float(np.min(times) if stat == "min" else np.median(times))


def direct_read_bandwidth(path: str | os.PathLike, seconds: float = 1.5, block: int = 4 * 1024**2,
                          queue_depth: int = 8, pages: str = "slab", seed: int = 0) -> tuple[float, str]:
    """Bytes/s of O_DIRECT reads of `path` (random 4 MiB blocks, `queue_depth` always in flight), and
    how it was read.  The reads land in the engine's own buffers (pages="slab": slots of BufferPool's
    huge-page slabs); "huge" reads into a map of their own (huge pages but a tail in small pages
    where the block is no whole number of them), "small" into 4 KiB pages (bench/disk_requests.py
    compares the three).  `seed` picks the blocks (reader i draws from seed + i).

    Each of `queue_depth` threads reads on its own until the time is up, so the device always has
    that many requests: reading in rounds (all of them, then the next all) left it waiting for each
    round's slowest read, and measured less than the engine's own io_uring reads achieved.
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
    # The engine's own kind of buffer (page-aligned, as O_DIRECT needs, and in huge pages where the
    # kernel grants them): with 4 KiB pages the block layer splits each 4 MiB read into 1 MiB
    # requests, and this probe measured half of what the disk gives the engine (engine/io/buffers.py).
    if pages not in ("slab", "huge", "small"):
        raise ValueError(f"pages: 'slab', 'huge' or 'small', not {pages!r}")
    if pages == "slab":
        pool = BufferPool(0)
        bufs = [memoryview(pool.get(block)).cast("B") for _ in range(queue_depth)]
    else:
        bufs = [memoryview(read_buffer(block, pages == "huge")) for _ in range(queue_depth)]

    def reader(i: int) -> int:
        rng = np.random.default_rng(seed + i)
        got = 0
        while time.perf_counter() < deadline:
            got += os.preadv(fd, [bufs[i]], int(rng.integers(0, nblocks)) * block)
        return got

    try:
        with ThreadPoolExecutor(queue_depth) as pool:
            t0 = time.perf_counter()
            deadline = t0 + seconds
            total = sum(pool.map(reader, range(queue_depth)))
            elapsed = time.perf_counter() - t0   # includes the reads that ran past the deadline
    finally:
        os.close(fd)
        for b in bufs:
            b.release()
    return total / elapsed, how


def best_direct_read_bandwidth(path: str | os.PathLike, samples: int = 3, seconds: float = 0.5) -> tuple[float, str]:
    """The best of a few short samples: on a shared disk a single sample swings by 2x, and the
    roofline wants what the device can do, not what it did while someone else was reading."""
    runs = [direct_read_bandwidth(path, seconds=seconds) for _ in range(samples)]
    return max(runs)


def block_device(path: str | os.PathLike) -> str | None:
    """The /proc/diskstats name of the block device that holds `path` (None where there is none: a
    tmpfs, an overlay, a machine without sysfs)."""
    try:
        st = os.stat(path)
        return Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}").resolve(strict=True).name
    except OSError:
        return None


def disk_counters(device: str, stats: str | os.PathLike = "/proc/diskstats") -> tuple[int, float] | None:
    """(bytes read, seconds with a request in flight) of `device` since boot, from /proc/diskstats
    (sectors read x 512, io_ticks): the device's own view, every process's requests included."""
    try:
        with open(stats) as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 13 and fields[2] == device:
                    return int(fields[5]) * 512, int(fields[12]) / 1000
    except (OSError, ValueError):
        return None
    return None


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM).  getrusage's ru_maxrss is not used: Linux carries it
    across exec, so a child started from a large parent reports the parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0
