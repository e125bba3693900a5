"""O_DIRECT read bandwidth with the cores idle and while they run the engine's own kernels.

The overlapped roofline (mer_tui.bench) takes the disk's speed from a probe on idle cores and
assumes reads keep that speed while the model computes.  Where reading needs CPU time that the
computing threads hold (a virtual disk emulated on the host's cores, an interrupt that waits for a
busy core, a reader thread that must be scheduled to issue its next request), they do not, and
the bound is one no engine on that machine can reach.  This measures it: the roofline's probe
(mer_tui.machine.direct_read_bandwidth: `readers` threads each reading random aligned blocks)
alone, then while one thread runs q4_0 matrix-vector products over a matrix far larger than the
CPU's caches on all of the kernels' threads, as decoding does; the two alternate, run by run.

    .venv/bin/python -m bench.disk_under_load /work/bench-models/olmoe-like-q4_0-dense-q8_0/experts.bin
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Iterator

import numpy as np

import kernels
from mer_tui.machine import direct_read_bandwidth

#: the load's matrix: q4_0 rows of 4096 columns, 256 MiB of them (decode's weights do not fit in cache)
LOAD_COLS = 4096
LOAD_BYTES = 256 << 20


@contextlib.contextmanager
def kernel_load(nbytes: int = LOAD_BYTES) -> Iterator[list[int]]:
    """Runs q4_0 matrix-vector products back to back on a thread (each product on all of the kernels'
    threads) until the block exits; yields a one-item list counting the products done."""
    rb = kernels.row_bytes("q4_0", LOAD_COLS)
    rows = max(8, nbytes // rb // 8 * 8)
    rng = np.random.default_rng(0)
    # Random bytes are valid q4_0 blocks but for their float16 scales, some of which would be NaN or
    # inf: every scale is set to a small finite value, so that the products compute ordinary numbers.
    data = rng.integers(0, 256, size=(rows, rb), dtype=np.uint8)
    scales = data.reshape(rows, -1, 18)[:, :, :2]
    scales[:] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    w = kernels.QMatrix(data, "q4_0", rows, LOAD_COLS)
    x = rng.standard_normal(LOAD_COLS).astype(np.float32)
    w.matvec(x)   # compile / warm up before the clock starts
    stop = threading.Event()
    done = [0]

    def run() -> None:
        while not stop.is_set():
            w.matvec(x)
            done[0] += 1

    t = threading.Thread(target=run, name="kernel-load", daemon=True)
    t.start()
    try:
        yield done
    finally:
        stop.set()
        t.join()


def measure(path: str, readers: list[int], seconds: float, rounds: int, block: int) -> list[dict]:
    """One row per (round, readers, idle|load): GB/s, and for a load the products a second it ran."""
    rows = []
    for r in range(rounds):
        for n in readers:
            order = ("idle", "load") if (r + n) % 2 == 0 else ("load", "idle")
            for cores in order:
                seed = 1000 * r + 10 * n + (cores == "load")   # no run rereads what another just read
                if cores == "idle":
                    bw, how = direct_read_bandwidth(path, seconds, block, n, seed=seed)
                    rate = 0.0
                else:
                    with kernel_load() as done:
                        t0, before = time.perf_counter(), done[0]
                        bw, how = direct_read_bandwidth(path, seconds, block, n, seed=seed)
                        rate = (done[0] - before) / (time.perf_counter() - t0)
                rows.append({"round": r, "readers": n, "cores": cores, "gb_s": bw / 1e9, "how": how,
                             "load_products_per_s": rate})
                print(f"  round {r}: {n} reader(s), cores {cores}: {bw / 1e9:.2f} GB/s", file=sys.stderr, flush=True)
    return rows


def summary(rows: list[dict]) -> dict[int, dict[str, float]]:
    """Median GB/s by readers and idle/load, and load / idle."""
    out: dict[int, dict[str, float]] = {}
    for n in sorted({r["readers"] for r in rows}):
        med = {c: statistics.median(r["gb_s"] for r in rows if r["readers"] == n and r["cores"] == c)
               for c in ("idle", "load")}
        out[n] = {**med, "ratio": med["load"] / med["idle"] if med["idle"] else 0.0}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.disk_under_load", description=__doc__.split("\n\n")[0])
    p.add_argument("file", help="a large file on the disk to measure (several GB, read only)")
    p.add_argument("--readers", default="1,2,4,8", help="readers in flight (default 1,2,4,8)")
    p.add_argument("--seconds", type=float, default=2.0, help="length of each run (default 2)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--block-mib", type=float, default=3.5, help="request size in MiB (default 3.5: a bundle)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    try:
        readers = [int(v) for v in args.readers.split(",")]
    except ValueError:
        print("disk_under_load: --readers takes comma-separated whole numbers", file=sys.stderr)
        return 2
    block = int(args.block_mib * (1 << 20)) // 4096 * 4096
    if min(readers) < 1 or args.rounds < 1 or args.seconds <= 0 or block < 4096:
        print("disk_under_load: --readers, --rounds, --seconds and --block-mib must be positive", file=sys.stderr)
        return 2
    if not os.path.isfile(args.file) or os.path.getsize(args.file) < 4 * block:
        print(f"disk_under_load: {args.file}: not a file of at least {4 * block >> 20} MiB", file=sys.stderr)
        return 2
    rows = measure(args.file, readers, args.seconds, args.rounds, block)
    med = summary(rows)
    if args.json:
        print(json.dumps({"file": args.file, "block": block, "threads": kernels.threads(), "runs": rows,
                          "median": {str(k): v for k, v in med.items()}}, indent=2))
        return 0
    print(f"O_DIRECT reads of {block / (1 << 20):g} MiB at random offsets, median GB/s of {args.rounds} "
          f"run(s) each; load: q4_0 products on {kernels.threads()} thread(s)")
    print(f"{'readers':>7} {'idle':>6} {'load':>6} {'load/idle':>9}")
    for n, m in med.items():
        print(f"{n:7d} {m['idle']:6.2f} {m['load']:6.2f} {m['ratio']:9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
