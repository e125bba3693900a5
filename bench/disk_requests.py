"""O_DIRECT read bandwidth by request size, readers in flight, and the buffers' page size.

Why the engine's read buffers sit in huge pages (engine/io/buffers.py): the block layer makes one
segment of each physically contiguous run of the destination and caps a request at max_segments of
them, so with 4 KiB pages a large read is cut into several requests; a disk that serves a bounded
number of requests a second then reads slower.  Each configuration runs `--seconds` with every
reader reading random aligned blocks of a large file (an expert store's experts.bin), the kinds of
buffer alternating run by run.

    .venv/bin/python -m bench.disk_requests /work/bench-models/olmoe-like-q4_0-dense-q8_0/experts.bin
"""
from __future__ import annotations

import argparse
import mmap
import os
import sys
import threading
import time

import numpy as np

from engine.io.buffers import aligned_buffer, read_buffer


def small_page_buffer(nbytes: int) -> mmap.mmap:
    buf = aligned_buffer(nbytes)
    advice = getattr(mmap, "MADV_NOHUGEPAGE", None)
    if advice is not None:
        buf.madvise(advice)
    np.frombuffer(buf, np.uint8)[::4096] = 0
    return buf


def bandwidth(path: str, size: int, readers: int, huge: bool, seconds: float, seed: int) -> float:
    """Bytes/s of `readers` threads, each reading random `size`-aligned blocks with its own buffer."""
    nblocks = os.path.getsize(path) // size
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    bufs = [(read_buffer if huge else small_page_buffer)(size) for _ in range(readers)]
    got = [0] * readers
    deadline = time.perf_counter() + seconds

    def read(i: int) -> None:
        rng = np.random.default_rng(seed + i)
        while time.perf_counter() < deadline:
            got[i] += os.preadv(fd, [bufs[i]], int(rng.integers(0, nblocks)) * size)

    threads = [threading.Thread(target=read, args=(i,)) for i in range(readers)]
    t0 = time.perf_counter()
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        os.close(fd)
    elapsed = time.perf_counter() - t0
    for b in bufs:
        b.close()
    return sum(got) / elapsed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.disk_requests", description=__doc__.split("\n\n")[0])
    p.add_argument("file", help="a large file on the disk to measure (several GB, read only)")
    p.add_argument("--sizes", default="1,4", help="request sizes in MiB (default 1,4)")
    p.add_argument("--readers", default="1,4", help="readers in flight (default 1,4)")
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    try:
        sizes = [int(float(v) * (1 << 20)) for v in args.sizes.split(",")]
        readers = [int(v) for v in args.readers.split(",")]
    except ValueError:
        print("disk_requests: --sizes and --readers take comma-separated numbers", file=sys.stderr)
        return 2
    if not os.path.isfile(args.file) or os.path.getsize(args.file) < 4 * max(sizes):
        print(f"disk_requests: {args.file}: not a file of at least {4 * max(sizes) >> 20} MiB", file=sys.stderr)
        return 2
    print(f"{'MiB':>5} {'readers':>7} {'4 KiB pages':>12} {'huge pages':>11}   (GB/s, O_DIRECT, random offsets)")
    for r in range(args.rounds):
        for size in sizes:
            for n in readers:
                small = bandwidth(args.file, size, n, False, args.seconds, seed=100 * r)
                huge = bandwidth(args.file, size, n, True, args.seconds, seed=100 * r + 50)
                print(f"{size / (1 << 20):5g} {n:7d} {small / 1e9:12.2f} {huge / 1e9:11.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
