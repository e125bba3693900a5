"""Two weight layouts of the same product, alternating in one C process (no Python in the timing).

    .venv/bin/python -m bench.layout_ab                      # q4_0, q4_k, q8_0 against their x8 layouts
    .venv/bin/python -m bench.layout_ab --pairs q4_0:q4_0x8 --shapes 2048x1024 --threads 1 --ring-mib 0

Builds bench/layout_ab.c with kernels/qkernels.c and the C kernels' AVX2 flags (into a temporary
folder), then prints, per pair and shape, each layout's bytes/s and the median over the samples of
B's time / A's.  --ring-mib: the copies walked so that no call finds its weights cached (default 128,
4x this machine's L3; 0 times one copy over and over, hot).  Not run in CI.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from kernels import cpu_c

HERE = Path(__file__).resolve().parent


def build(out_dir: Path) -> Path:
    exe = out_dir / "layout_ab"
    flags = [f for f in cpu_c.FLAGS["avx2"] + cpu_c.COMMON_FLAGS if f not in ("-shared", "-fPIC")]
    cmd = [cpu_c._compiler(), *flags, f"-I{cpu_c.SOURCE.parent}", "-o", str(exe), str(HERE / "layout_ab.c"), "-lm"]
    subprocess.run(cmd, check=True)
    return exe


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", default="q4_0:q4_0x8,q4_k:q4_kx8,q8_0:q8_0x8", help="A:B format pairs")
    p.add_argument("--shapes", default="2048x1024,8192x4096,4096x14336", help="ROWSxCOLS, comma-separated")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ring-mib", type=int, default=128)
    p.add_argument("--samples", type=int, default=31)
    args = p.parse_args(argv)
    if not cpu_c.runs_here("avx2"):
        print("layout_ab: this CPU runs the portable kernels only; nothing to compare", file=sys.stderr)
        return 2
    try:
        pairs = [tuple(pair.split(":")) for pair in args.pairs.split(",")]
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
        codes = [(cpu_c.FMT_CODE[a], cpu_c.FMT_CODE[b]) for a, b in pairs]
    except (KeyError, ValueError) as e:
        print(f"layout_ab: bad --pairs or --shapes ({e})", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        exe = build(Path(tmp))
        print(f"{'shape':>11} {'A':>7} {'B':>7} {'A GB/s':>7} {'B GB/s':>7} {'B/A time':>8}")
        for (a, b), (ca, cb) in zip(pairs, codes):
            for rows, cols in shapes:
                r = subprocess.run([str(exe), str(ca), str(cb), str(rows), str(cols), str(args.threads),
                                    str(args.ring_mib << 20), str(args.samples)], capture_output=True, text=True)
                if r.returncode:
                    print(f"{rows}x{cols} {a} {b}: {r.stderr.strip()}")
                    continue
                d = json.loads(r.stdout)
                print(f"{rows}x{cols:<5} {a:>7} {b:>7} {d['a_bytes_per_s'] / 1e9:7.1f} {d['b_bytes_per_s'] / 1e9:7.1f} "
                      f"{d['b_over_a_time']:8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
