"""`mer-tui bench` as side_by_side runs it: one roofline for the whole suite.

The orchestrator measures DRAM and O_DIRECT bandwidth once, outside the memory cgroup (measured per
run, amid the other work on this machine, the disk figure swung 0.5-1.6 GB/s), and hands them over
in MER_BENCH_DRAM_BW / MER_BENCH_DISK_BW (bytes/s); this passes them on as --dram-bw / --disk-bw.

    MER_BENCH_DRAM_BW=... .venv/bin/python -m bench.run_mer --model STORE --ram-cache 700MiB --io uring --json
"""
from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> int:
    from mer_tui.cli import main as cli

    args = list(sys.argv[1:] if argv is None else argv)
    for env, opt in (("MER_BENCH_DRAM_BW", "--dram-bw"), ("MER_BENCH_DISK_BW", "--disk-bw")):
        if os.environ.get(env):
            args += [opt, os.environ[env]]
    return cli(["bench", *args])


if __name__ == "__main__":
    sys.exit(main())
