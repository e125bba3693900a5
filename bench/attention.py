"""A decoded token's attention over a KV cache: the C kernels (float16 and q8_0 keys and values) on one
thread and on all of them, against numpy over float32 (the path without the C kernels), in one process.

Each case times one layer of `--layers` different caches in turn (so that they come from DRAM, as a
decode's do), `--rounds` times, and prints the medians in milliseconds a layer.

    .venv/bin/python -m bench.attention                         # KV heads 1, 4, 16; 4096 keys; head size 128
    .venv/bin/python -m bench.attention --heads 8 --group 4 --keys 2048,8192 --json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

import kernels


def _time(fn, layers: int, rounds: int) -> float:
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        for i in range(layers):
            fn(i)
        out.append((time.perf_counter() - t) / layers * 1e3)
    return statistics.median(out)


def case(ck, heads: int, group: int, keys: int, d: int, layers: int, rounds: int) -> dict:
    rng = np.random.default_rng(heads * 1000 + keys)
    q = rng.standard_normal((heads, group, d), dtype=np.float32)
    f32 = [rng.standard_normal((heads, keys, d), dtype=np.float32) for _ in range(layers)]
    row = {"kv_heads": heads, "group": group, "keys": keys, "head_dim": d}
    scale = d ** -0.5

    # float32 buffers take attend_one's numpy path (BLAS on one thread, as beside the C kernels)
    row["numpy_f32_ms"] = _time(lambda i: kernels.attend_one(q, f32[i], f32[i], 0, keys, scale), layers, rounds)
    for fmt in ("f16", "q8_0"):
        cache = [kernels.kv_rows(k, fmt) for k in f32]
        for threads in (1, kernels.threads()):
            def attend(i: int, cache=cache, fmt=fmt, threads=threads) -> None:
                ck.attend(q, cache[i], cache[i], fmt, 0, keys, scale, threads)
            row[f"{fmt}_{threads}t_ms"] = _time(attend, layers, rounds)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.attention", description=__doc__.split("\n\n")[0])
    p.add_argument("--heads", default="1,4,16", help="KV heads, comma-separated (default 1,4,16)")
    p.add_argument("--group", type=int, default=0, help="queries a KV head (default: 16 / heads, at least 1)")
    p.add_argument("--keys", default="4096", help="tokens of context, comma-separated (default 4096)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    try:
        heads = [int(v) for v in args.heads.split(",")]
        keys = [int(v) for v in args.keys.split(",")]
    except ValueError:
        print("attention: --heads and --keys take comma-separated numbers", file=sys.stderr)
        return 2
    if min(heads + keys) < 1 or args.head_dim % 32 or min(args.layers, args.rounds) < 1 or args.group < 0:
        print("attention: --heads, --keys, --layers and --rounds must be >= 1, --head-dim a multiple of 32",
              file=sys.stderr)
        return 2
    ck = kernels._state()[1]
    if ck is None:
        print(f"attention: the C kernels are not in use here ({kernels.backend()}): nothing to compare",
              file=sys.stderr)
        return 2
    rows = [case(ck, h, args.group or max(1, 16 // h), k, args.head_dim, args.layers, args.rounds)
            for h in heads for k in keys]
    if args.json:
        print(json.dumps({"backend": kernels.backend(), "threads": kernels.threads(), "rows": rows}, indent=1))
        return 0
    n = kernels.threads()
    print(f"{kernels.backend()}, ms a layer (median of {args.rounds}), 1 and {n} threads")
    print(f"| KV heads x queries | keys | numpy f32 | f16 1t | f16 {n}t | q8_0 1t | q8_0 {n}t |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kv_heads']} x {r['group']} | {r['keys']} | {r['numpy_f32_ms']:.3f} | {r['f16_1t_ms']:.3f} | "
              f"{r[f'f16_{n}t_ms']:.3f} | {r['q8_0_1t_ms']:.3f} | {r[f'q8_0_{n}t_ms']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
