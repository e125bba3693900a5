"""`mer-tui bench` as side_by_side runs it: the same command, minus one memory spike at its end.

After its runs, `mer-tui bench` measures DRAM bandwidth for its roofline over a fresh 512 MiB
buffer.  Inside a 2 GiB memory cgroup that buffer, on top of the resident weights and the RAM
cache, gets the process OOM-killed after it has measured everything (seen: anon RSS 2.09 GB).
So the orchestrator measures DRAM bandwidth once, outside the cgroup, with the same function,
and passes it in MER_BENCH_DRAM_BW (bytes/s); likewise the O_DIRECT disk bandwidth
(MER_BENCH_DISK_BW), so every run's roofline uses the same figures (measured per run, amid the
other work on this machine, it swung 0.5-1.6 GB/s).  Peak RSS is replaced by VmHWM (see below).
Everything else is `mer-tui bench` unchanged.

    MER_BENCH_DRAM_BW=... .venv/bin/python -m bench.run_mer --model STORE --ram-cache 700MiB --io uring --json
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys


def main(argv: list[str] | None = None) -> int:
    import mer_tui.bench

    dram = os.environ.get("MER_BENCH_DRAM_BW")
    if dram:
        mer_tui.bench.dram_read_bandwidth = lambda *a, **k: float(dram)
    disk = os.environ.get("MER_BENCH_DISK_BW")
    if disk:
        mer_tui.bench.direct_read_bandwidth = lambda *a, **k: (float(disk), "O_DIRECT, measured by side_by_side")
    from mer_tui.cli import main as cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli(["bench", *(sys.argv[1:] if argv is None else argv)])
    text = out.getvalue()
    try:
        result = json.loads(text)
    except ValueError:        # not --json, or an error: pass it through untouched
        sys.stdout.write(text)
        return rc
    # mer-tui bench reports getrusage's ru_maxrss, which Linux carries across exec: a child vforked from
    # a big parent reports the parent's peak.  VmHWM is this process's own.
    result["peak_rss_bytes"] = peak_rss(result.get("peak_rss_bytes", 0))
    print(json.dumps(result, indent=2))
    return rc


def peak_rss(fallback: int) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return fallback


if __name__ == "__main__":
    sys.exit(main())
