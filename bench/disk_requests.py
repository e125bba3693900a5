"""O_DIRECT read bandwidth by request size, readers in flight, and the buffers' pages.

Why the engine's read buffers are slots of huge-page slabs (engine/io/buffers.py): the block layer
makes one segment of each physically contiguous run of the destination and caps a request at
max_segments of them, so with 4 KiB pages a large read is cut into several requests; a disk that
serves a bounded number of requests a second then reads slower.  A buffer mapped on its own ends in
small pages where its size is no whole number of huge pages (a 3.5 MiB bundle: 1.5 MiB of them);
a slab's slots do not.  Each configuration runs the roofline's disk probe
(mer_tui.machine.direct_read_bandwidth: every reader reading random aligned blocks of a large file,
an expert store's experts.bin) for `--seconds`, the kinds of buffer alternating run by run.

    .venv/bin/python -m bench.disk_requests /work/bench-models/olmoe-like-q4_0-dense-q8_0/experts.bin
"""
from __future__ import annotations

import argparse
import os
import sys

from mer_tui.machine import direct_read_bandwidth


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.disk_requests", description=__doc__.split("\n\n")[0])
    p.add_argument("file", help="a large file on the disk to measure (several GB, read only)")
    p.add_argument("--sizes", default="1,3.5,4", help="request sizes in MiB (default 1,3.5,4)")
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
    kinds = {"small": "4 KiB pages", "huge": "own huge map", "slab": "slab slot"}
    print(f"{'MiB':>5} {'readers':>7} " + " ".join(f"{v:>12}" for v in kinds.values())
          + "   (GB/s, O_DIRECT, random offsets)")
    for r in range(args.rounds):
        for size in sizes:
            for n in readers:
                # different blocks for each run, so that no run reads what another just read
                gbs = [direct_read_bandwidth(args.file, args.seconds, size, n, pages=k, seed=100 * r + 30 * i)[0] / 1e9
                       for i, k in enumerate(kinds)]
                print(f"{size / (1 << 20):5g} {n:7d} " + " ".join(f"{v:12.2f}" for v in gbs), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
