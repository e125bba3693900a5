"""Decode speed while streaming experts, against this machine's roofline (not run in CI).

    .venv/bin/python bench/bench_streaming.py [--model STORE] [--fraction 0.25] [--write-docs]

With the RAM cache at a quarter of the expert bytes, for each reader (uring, pread, mmap):
decode tokens/s, hit rate, MB/s from storage, the queue depth reached, read latency and the
prefetch counters; next to the roofline

    roofline s/token = demand-missed bytes per token / measured O_DIRECT bandwidth + compute s/token

Tokens are sampled (temperature 1, fixed seed: the same tokens every run), as greedy decoding of a
random model repeats one token and with it one routing.  The bandwidth is that of random
bundle-sized O_DIRECT reads of the expert file (io_uring, queue depth 16), the missed bytes come
from the same cache without prefetch, and compute is decoding with every expert already in RAM.
The default model is the stress demo (mer_tui.demo_models).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import engine  # noqa: E402
from engine.io import ReadJob, Span, open_reader  # noqa: E402
from engine.io.buffers import BufferPool  # noqa: E402
from engine.store import EXPERT_FILE, open_store  # noqa: E402

PROMPT = "The quick brown fox jumps over the lazy dog; a streaming MoE reads its experts from storage."


def storage_bytes() -> int:
    """Bytes this process has caused to be read from storage (not from the page cache)."""
    for line in open("/proc/self/io"):
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def disk_bandwidth(store: Path, bundle: int, kind: str = "uring", qd: int = 16, batches: int = 16,
                   per_batch: int = 8, staging: bool = False) -> float:
    """MB/s of random bundle-sized reads of the expert file, `per_batch` bundles in flight together."""
    path = store / EXPERT_FILE
    n_bundles = path.stat().st_size // bundle
    drop_cache(path)
    r = open_reader(kind, [path], queue_depth=qd, staging=staging)
    rng = np.random.default_rng(0)
    order = rng.permutation(n_bundles)[: batches * per_batch]
    pool = BufferPool(0)   # the engine's kind of buffer: slots of huge-page slabs
    bufs = [memoryview(pool.get(bundle)).cast("B") for _ in range(per_batch)]
    t = time.perf_counter()
    for i in range(batches):
        jobs = [ReadJob([Span(0, int(o) * bundle, bundle, bundle, b)])
                for o, b in zip(order[i * per_batch:(i + 1) * per_batch], bufs)]
        r.read(jobs)
        assert all(j.error is None for j in jobs), [j.error for j in jobs]
    dt = time.perf_counter() - t
    r.close()
    return batches * per_batch * bundle / dt / 1e6


def decode(store: Path, ids: list[int], *, io: str, budget: int | None, policy: str, prefetch: bool,
           warm: int, tokens: int, prime: bool = False) -> dict:
    """Decode `warm` tokens to fill the cache, then time `tokens` more; the telemetry of the timed part.
    prime: decode the same tokens once before (no budget: every expert the timed part needs is resident)."""
    drop_cache(store / EXPERT_FILE)
    with engine.load(store, io=io, ram_cache=budget, policy=policy, prefetch=prefetch) as m:
        if prime:
            for _ in m.generate(ids, max_new_tokens=warm + tokens, ignore_eos=True, temperature=1.0, seed=0):
                pass
        gen = m.generate(ids, max_new_tokens=warm + tokens, ignore_eos=True, temperature=1.0, seed=0)
        for _ in range(warm):
            next(gen)
        m.reset_telemetry()
        io0 = storage_bytes()
        t = time.perf_counter()
        n = sum(1 for _ in gen)
        dt = time.perf_counter() - t
        from_storage = storage_bytes() - io0
        snap = m.telemetry()
    ram, ssd, iox, pf = snap["tiers"]["ram"], snap["tiers"]["ssd"], snap["io"], snap["prefetch"]
    return {"s_per_token": dt / n, "tok_s": n / dt, "hit_rate": ram["hit_rate"], "misses": ram["misses"] / n,
            "bytes_per_token": ssd["bytes_read"] / n, "mb_s": ssd["bytes_read"] / dt / 1e6,
            "storage_per_token": from_storage / n,
            "qd_max": iox["queue_depth_max"], "qd_mean": iox["queue_depth_mean"], "p50": iox["read_ms_p50"],
            "p99": iox["read_ms_p99"], "backend": iox["backend"], "prefetch": pf}


# Python, numpy, the kernels, resident weights and one layer in flight, next to the RAM budget.
CAP_SLACK = 384 << 20


def make_cap(limit: int):
    """(cgroup, "") or (None, why not): bench/cgroup.py's memory cgroup."""
    from bench.cgroup import MemoryCgroup

    return MemoryCgroup.create("mer-bench-streaming", limit)


def run_config(cap, kw: dict) -> dict:
    """decode(**kw), in this process, or in a child inside the cgroup `cap`."""
    if cap is None:
        return decode(**kw)
    import subprocess

    cap.release_cache()
    arg = json.dumps({**kw, "store": str(kw["store"])})
    r = subprocess.run([sys.executable, __file__, "--child", arg], capture_output=True, text=True,
                       preexec_fn=cap.join_fn(), cwd=ROOT, timeout=1800)
    if r.returncode != 0:
        raise SystemExit(f"child run failed ({r.returncode}, oom kills {cap.oom_kills()}): "
                         f"{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def table(rows: list[dict], roof: dict) -> str:
    head = ("| reader | prefetch | tok/s | roofline tok/s | x roofline | hit rate | MB/s | MiB/token read "
            "(from storage) | queue max / mean | read ms p50 / p99 | prefetch precision / recall |")
    out = [head, "|" + "---|" * 11]
    for r in rows:
        pf = r["prefetch"]
        ratio = r["s_per_token"] / roof["s_per_token"]
        pfs = f"{pf['precision']:.2f} / {pf['recall']:.2f}" if pf["enabled"] else "-"
        out.append(f"| {r['backend']} | {'on' if pf['enabled'] else 'off'} | {r['tok_s']:.2f} | "
                   f"{1 / roof['s_per_token']:.2f} | {ratio:.2f} | {r['hit_rate']:.2f} | {r['mb_s']:.0f} | "
                   f"{r['bytes_per_token'] / 2**20:.1f} ({r['storage_per_token'] / 2**20:.1f}) | "
                   f"{r['qd_max']} / {r['qd_mean']:.1f} | "
                   f"{r['p50']:.1f} / {r['p99']:.1f} | {pfs} |")
    return "\n".join(out)


def write_docs(section: str) -> None:
    """Replace the body of the "## Streaming" section of docs/BENCHMARKS.md (only that section)."""
    path = ROOT / "docs" / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n\n## Streaming\n\n(pending)\n"
    lines = text.splitlines(keepends=True)
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "## Streaming")
    except StopIteration:
        lines += ["\n", "## Streaming\n"]
        start = len(lines) - 1
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    body = ["\n", section.rstrip("\n") + "\n", "\n"]
    path.write_text("".join(lines[:start + 1] + body + lines[end:]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="an expert store (default: the stress demo, built on first use)")
    ap.add_argument("--fraction", type=float, default=0.25, help="RAM budget: a fraction of the expert bytes")
    ap.add_argument("--policy", default="lru")
    ap.add_argument("--readers", default="uring,pread,mmap")
    ap.add_argument("--warm", type=int, default=8, help="tokens decoded before timing (fill the cache)")
    ap.add_argument("--tokens", type=int, default=48, help="tokens timed")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--write-docs", action="store_true", help="put the table into docs/BENCHMARKS.md")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--cap", action="store_true",
                    help="run each streaming configuration in a memory cgroup of budget + CAP_SLACK (RAM "
                         "and page cache together; needs root): the page cache cannot hold the model then")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:   # one configuration, in a child process (inside the cgroup): print its result
        kw = json.loads(args.child)
        kw["store"] = Path(kw["store"])
        print(json.dumps(decode(**kw)))
        return 0

    if args.model:
        store = Path(args.model)
    else:
        from mer_tui.demo_models import stress_model

        store = stress_model()
    spec = engine.load_spec(store)
    layout = open_store(store, spec)
    bundle = next(iter(layout.bundles.values())).nbytes
    expert_bytes = layout.total_bytes
    budget = int(expert_bytes * args.fraction)
    with engine.load(store) as m:
        tok = m.tokenizer
    ids = tok.encode(PROMPT) if tok is not None else list(range(1, 33))
    load0 = os.getloadavg()

    common = dict(store=store, ids=ids, policy=args.policy, warm=args.warm, tokens=args.tokens)
    readers = args.readers.split(",")
    cap, cap_note = None, "no memory cap: the page cache may hold what the mmap reader reads"
    if args.cap:
        cap, why = make_cap(budget + CAP_SLACK)
        cap_note = (f"each streaming run in a memory cgroup of {(budget + CAP_SLACK) / 2**20:.0f} MiB "
                    f"(budget + {CAP_SLACK >> 20} MiB; RAM and page cache together)" if cap
                    else f"no memory cap ({why})")
    configs = {"compute": dict(io="uring", budget=None, prefetch=False, prime=True),   # every expert in RAM
               "demand": dict(io="uring", budget=budget, prefetch=False),
               **{k: dict(io=k, budget=budget, prefetch=True) for k in readers}}
    # Rounds interleave every configuration (and the bandwidth probes), so a change in the machine's
    # load during the run spreads over all of them instead of skewing one.
    runs: dict[str, list[dict]] = {k: [] for k in configs}
    probes: dict[str, list[float]] = {"uring": [], "pread": [], "staging": []}
    for _ in range(args.repeats):
        probes["uring"].append(disk_bandwidth(store, bundle, "uring"))
        probes["pread"].append(disk_bandwidth(store, bundle, "pread"))
        probes["staging"].append(disk_bandwidth(store, bundle, "uring", staging=True))
        for name, kw in configs.items():
            # The compute baseline holds every expert in RAM: it runs uncapped, in this process.
            runs[name].append(run_config(cap if kw["budget"] is not None else None, {**common, **kw}))
    bw = {k: statistics.median(v) for k, v in probes.items()}
    bw_staging = bw["staging"]
    med = {k: sorted(v, key=lambda r: r["s_per_token"])[len(v) // 2] for k, v in runs.items()}
    compute, demand = med["compute"], med["demand"]
    roof_s = demand["misses"] * bundle / (bw["uring"] * 1e6) + compute["s_per_token"]
    roof = {"s_per_token": roof_s}
    rows = [demand] + [med[k] for k in readers]
    load1 = os.getloadavg()

    cmd = "python bench/bench_streaming.py " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = (f"Model: `{store.name}` ({spec.num_layers} layers x {spec.num_experts} experts, "
            f"top-{spec.top_k}, "
            f"{layout.bundles[0, 0].parts[0].fmt} experts, {expert_bytes / 2**20:.0f} MiB of experts, "
            f"{bundle / 2**20:.2f} MiB per bundle); RAM cache {budget / 2**20:.0f} MiB "
            f"({args.fraction:.2f} of the experts), policy {args.policy}; {args.warm} tokens to warm the "
            f"cache, then {args.tokens} timed; median of {args.repeats} rounds, each round running every "
            f"configuration once.")
    machine = (f"Machine: {platform.machine()}, {os.cpu_count()} cores, Linux {platform.release()}, "
               f"load average {load0[0]:.1f} before / {load1[0]:.1f} after (other work shares the cores); "
               f"{cap_note}.")
    overlap = max(roof_s - compute["s_per_token"], compute["s_per_token"])
    roofline = (f"Roofline: O_DIRECT random bundle reads {bw['uring']:.0f} MB/s with io_uring "
                f"({bw_staging:.0f} MB/s through registered staging buffers), {bw['pread']:.0f} MB/s with "
                f"the pread pool; without prefetch the cache misses {demand['misses']:.1f} bundles per token "
                f"({demand['misses'] * bundle / 2**20:.1f} MiB); compute with every expert in RAM "
                f"{compute['s_per_token'] * 1e3:.1f} ms/token ({compute['tok_s']:.1f} tok/s). So "
                f"{roof_s * 1e3:.1f} ms/token = {1 / roof_s:.2f} tok/s; perfect overlap of I/O and "
                f"compute would allow {1 / overlap:.2f}.")
    notes = ("x roofline: measured time per token over the roofline's (below 1 is possible: prefetch "
             "overlaps reads with compute, which the serial roofline does not count). MiB/token read: what "
             "the reader copied into the RAM tier per token, demand misses and prefetches; in brackets what "
             "/proc/self/io says came from storage (for mmap, the page cache serves the rest). Prefetch "
             "precision: prefetched bundles later asked for / prefetched bundles; recall: those / (those + "
             "demand misses). Queue depth and latency are per request (requests of up to 4 MiB: one per bundle here). "
             "Other work shares this machine's two cores and disk: rows of one run compare with each "
             "other; between runs, the load moves every figure, the roofline's compute term included.")
    section = "\n\n".join([f"`{cmd.strip()}`", meta, machine, roofline, table(rows, roof), notes])
    print(section)
    if args.json:
        print(json.dumps({"rows": rows, "roofline_s": roof_s, "bandwidth": bw, "compute": compute}, indent=1))
    if args.write_docs:
        write_docs(section)
    if cap is not None:
        cap.remove()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
