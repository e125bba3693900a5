"""Where one mer-tui decode run spends its time: I/O wait, expert compute, attention, the rest.

Wall-clock timers wrap the engine's stages on the decoding thread (only while decoding, not during
prefill), so the split adds up to the decode time; then, optionally, a cProfile of a second decode
lists the functions with the most time of their own.

    .venv/bin/python -m bench.profile_decode --model STORE --ram-cache 700MiB --io uring --json

Categories (times on the thread that decodes):
- I/O wait: inside the expert source's request() and the wait for its misses: cache lookups, and
  blocking on reads not yet done (the cached experts are computed in between, as expert compute);
- expert compute: kernels.experts_ffn and expert_ffn (gate, up, silu, down of the chosen experts);
- attention: the attention block (q/k/v/o matmuls, qk-norm, rope, scores, KV cache);
- lm_head: the output projection over the vocabulary;
- prefetch: guessing the next layer's experts (its router) and queueing reads;
- other (Python overhead): router, norms, top-k, weighting, sampling, loops - everything else.

With an expert store it also times the reader's reads (from every thread: demand reads and the
prefetch worker's) and reports how much of decoding the disk was busy, and in which stage the
decoding thread was while the disk sat idle: reads can only overlap work that is still ahead; and, by
layer, how long decoding waited for experts (the engine's own telemetry) and how many were not ready.
And it splits the reads by kind (demand or prefetch: bundles a token, milliseconds a bundle, how much
of decoding both, one or neither was under way) and counts how many of a layer's experts were ready
(cached or prefetched) when the model asked for them.
"""
from __future__ import annotations

import argparse
import bisect
import cProfile
import functools
import io
import json
import pstats
import sys
import threading
import time
from collections import defaultdict


class Timers:
    def __init__(self) -> None:
        self.total: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.on = False
        self.depth = 0
        self.spans: list[tuple[str, float, float]] = []   # top-level stages on the decoding thread
        self.reads: list[tuple[float, float]] = []        # reader.read calls, any thread
        self.read_kinds: list[tuple[str, int]] = []       # for each of those: "prefetch" or "demand", bundles
        self.asked: list[tuple[int, int, int]] = []       # per request(): layer, bundles ready at once, asked for
        self.window = (0.0, 0.0)                          # the last timed decode, first token to last

    def wrap(self, name: str, fn):
        @functools.wraps(fn)
        def timed(*a, **k):
            if not self.on or self.depth:   # nested (experts_ffn falling back to expert_ffn): counted once
                return fn(*a, **k)
            t0 = time.perf_counter()
            self.depth += 1
            try:
                return fn(*a, **k)
            finally:
                self.depth -= 1
                t1 = time.perf_counter()
                self.total[name] += t1 - t0
                self.calls[name] += 1
                self.spans.append((name, t0, t1))
        return timed

    def wrap_reads(self, fn):
        @functools.wraps(fn)
        def timed(jobs, *a, **k):
            t0 = time.perf_counter()
            try:
                return fn(jobs, *a, **k)
            finally:
                if self.on:
                    self.reads.append((t0, time.perf_counter()))
                    # The prefetch worker's reads, and the rest: the demand thread's and the decoding thread's.
                    kind = "prefetch" if threading.current_thread().name.startswith("mer-prefetch") else "demand"
                    self.read_kinds.append((kind, len(jobs)))
        return timed

    def wrap_request(self, fn):
        """The source's request(), timed as I/O wait, counting the bundles it handed over at once."""
        timed = self.wrap("io_wait", fn)

        @functools.wraps(fn)
        def counted(layer, experts):
            pending = timed(layer, experts)
            if self.on:
                self.asked.append((layer, len(pending.ready), len(experts)))
            return pending
        return counted


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _covered(busy: list[tuple[float, float]], starts: list[float], a: float, b: float) -> float:
    """Seconds of [a, b) inside the sorted, disjoint `busy` intervals (starts: their starts)."""
    tot, i = 0.0, max(0, bisect.bisect_right(starts, a) - 1)
    while i < len(busy) and busy[i][0] < b:
        tot += max(0.0, min(b, busy[i][1]) - max(a, busy[i][0]))
        i += 1
    return tot


def disk_idle(timers: Timers, t0: float, t1: float, tokens: int) -> dict | None:
    """The disk's busy share of [t0, t1) (a read under way) and, per stage of the decoding thread,
    the milliseconds a token that the disk sat idle while that stage ran."""
    if not timers.reads or t1 <= t0:
        return None
    busy = _union([(max(a, t0), min(b, t1)) for a, b in timers.reads if b > t0 and a < t1])
    starts = [a for a, _ in busy]
    busy_s = sum(b - a for a, b in busy)
    idle: dict[str, float] = defaultdict(float)
    for name, a, b in timers.spans:
        if a < t1 and b > t0:
            a, b = max(a, t0), min(b, t1)
            idle[name] += (b - a) - _covered(busy, starts, a, b)
    idle["other"] = (t1 - t0 - busy_s) - sum(idle.values())
    per_token = max(tokens, 1)
    return {"busy_share": busy_s / (t1 - t0),
            "idle_ms_per_token": {k: 1e3 * v / per_token for k, v in sorted(idle.items(), key=lambda kv: -kv[1])}}


def reads_by_kind(timers: Timers, t0: float, t1: float, tokens: int) -> dict | None:
    """Demand and prefetch reads in [t0, t1): bundles a token, milliseconds a bundle (a read's time over
    its bundles), and the shares of the window in which both kinds, one, or none were under way."""
    rows = [(max(a, t0), min(b, t1), kind, n) for (a, b), (kind, n) in zip(timers.reads, timers.read_kinds, strict=True)
            if b > t0 and a < t1]   # clipped to the window, as disk_idle does
    if not rows or t1 <= t0:
        return None
    per_token = max(tokens, 1)
    out: dict = {}
    for kind in ("demand", "prefetch"):
        mine = [(a, b, n) for a, b, k, n in rows if k == kind]
        bundles = sum(n for _, _, n in mine)
        out[kind] = {"bundles_per_token": bundles / per_token,
                     "ms_per_bundle": 1e3 * sum(b - a for a, b, _ in mine) / bundles if bundles else 0.0}
    events = sorted([(a, kind, 1) for a, _, kind, _ in rows] + [(b, kind, -1) for _, b, kind, _ in rows]
                    + [(t1, "", 0)])
    open_ = {"demand": 0, "prefetch": 0}
    share = dict.fromkeys(("both", "demand_only", "prefetch_only", "none"), 0.0)
    last = t0
    for t, kind, step in events:
        d, p = open_["demand"] > 0, open_["prefetch"] > 0
        share["both" if d and p else "demand_only" if d else "prefetch_only" if p else "none"] += t - last
        last = t
        if kind:
            open_[kind] += step
    out["share"] = {k: v / (t1 - t0) for k, v in share.items()}
    return out


def waits_by_layer(timers: Timers, waits: dict, tokens: int) -> dict[int, dict[str, float]] | None:
    """By MoE layer: milliseconds a token the decoding thread waited for its experts (the engine's own
    count, telemetry's "waits" since the reset before the timed decode: request() and the wait for its
    misses), and how many of them a token were not ready when asked for."""
    if not timers.asked:
        return None
    per_token = max(tokens, 1)
    not_ready: dict[int, int] = defaultdict(int)
    for layer, ready, asked in timers.asked:
        not_ready[layer] += asked - ready
    total_s = waits.get("total_s") or []
    return {layer: {"wait_ms_per_token": 1e3 * (total_s[layer] if layer < len(total_s) else 0.0) / per_token,
                    "not_ready_per_token": not_ready[layer] / per_token} for layer in sorted(not_ready)}


def instrument(model, timers: Timers) -> None:
    import kernels
    from engine.experts import Pending

    model._attention = timers.wrap("attention", model._attention)
    model._prefetch = timers.wrap("prefetch", model._prefetch)
    # The model asks for a layer's experts with request() (the cached ones at once, misses read on the
    # demand thread) and then waits for the rest: both count as waiting for the source.
    model.experts.request = timers.wrap_request(model.experts.request)
    Pending.wait = timers.wrap("io_wait", Pending.wait)
    # engine/model.py calls kernels.expert_ffn through the module, so patching the module is enough.
    kernels.expert_ffn = timers.wrap("expert_compute", kernels.expert_ffn)
    kernels.experts_ffn = timers.wrap("expert_compute", kernels.experts_ffn)
    head = model.weights.lm_head
    object.__setattr__(head, "matmul", timers.wrap("lm_head", head.matmul))   # QMatrix is a frozen dataclass
    reader = getattr(model.experts, "reader", None)   # a streaming source; experts in RAM have none
    if reader is not None:
        reader.read = timers.wrap_reads(reader.read)


def decode(model, inputs: tuple[list[int], list[int]], n: int, timers: Timers | None) -> tuple[float, int]:
    """Seconds from the first token to the last, and tokens decoded in that time (timers.window:
    when that was).  `inputs`: a prompt and its forced continuation (mer_tui.bench.bench_inputs)."""
    t_first = None
    count = 0
    prompt, continuation = inputs
    for _ in model.generate(prompt, max_new_tokens=n, ignore_eos=True, forced=continuation):
        count += 1
        if t_first is None:
            t_first = time.perf_counter()
            if timers:
                timers.on = True
    t_end = time.perf_counter()
    if timers:
        timers.on = False
        timers.window = (t_first or t_end, t_end)
    return t_end - (t_first or t_end), max(count - 1, 0)


def main(argv: list[str] | None = None) -> int:
    import engine
    from mer_tui.bench import bench_inputs, preload_experts

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--ram-cache")
    p.add_argument("--io", default="auto")
    p.add_argument("--no-prefetch", action="store_true")
    p.add_argument("--preload", action="store_true",
                   help="read experts into the RAM cache first, up to its budget (all of them without one): "
                        "the in-RAM case, as `mer-tui bench --preload`")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--decode-tokens", type=int, default=16)
    p.add_argument("--cprofile", action="store_true", help="also profile a second decode with cProfile")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    model = engine.load(args.model, ram_cache=args.ram_cache, io=args.io, prefetch=not args.no_prefetch)
    if args.preload:
        preload_experts(model)
    # mer-tui bench's inputs: the warm-up, the timed decode and the cProfile'd one each a prompt of their own
    warm, timed, profiled = bench_inputs(model.spec.vocab_size, args.prompt_tokens, args.decode_tokens, 3)
    timers = Timers()
    instrument(model, timers)
    decode(model, warm, 2, None)                # warm up: JIT compilation, first reads
    model.reset_telemetry()                     # the counts below: the timed decode's (its prompt included)
    seconds, tokens = decode(model, timed, args.decode_tokens, timers)
    parts = dict(timers.total)
    parts["other"] = seconds - sum(parts.values())
    telemetry = model.telemetry()   # the timed decode's counts (reset before it)
    result: dict = {
        "decode_s": seconds, "decode_tokens": tokens,
        "decode_tokens_per_s": tokens / seconds if seconds else 0.0,
        "seconds": parts, "calls": dict(timers.calls),
        "share": {k: v / seconds for k, v in parts.items()} if seconds else {},
        "telemetry": {k: telemetry.get(k) for k in ("tiers", "io", "prefetch")},
        "disk": disk_idle(timers, *timers.window, tokens),
        "reads": reads_by_kind(timers, *timers.window, tokens),
        "ready_at_request": ({"ready": sum(r for _, r, _ in timers.asked) / len(timers.asked),
                              "asked": sum(n for _, _, n in timers.asked) / len(timers.asked)}
                             if timers.asked else None),
        "by_layer": waits_by_layer(timers, telemetry.get("waits") or {}, tokens),
    }
    if args.cprofile:
        prof = cProfile.Profile()
        prof.enable()
        decode(model, profiled, args.decode_tokens, None)
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(14)
        result["cprofile_top"] = out.getvalue()
    model.close()
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        for k, v in sorted(parts.items(), key=lambda kv: -kv[1]):
            print(f"{k:16s} {v:8.3f} s  {v / seconds:6.1%}")
        print(f"decode {tokens} tokens in {seconds:.2f} s = {tokens / seconds:.2f} tok/s")
        if result["disk"]:
            d = result["disk"]
            print(f"disk busy {d['busy_share']:.1%} of decoding; idle, by what the decoding thread was doing: "
                  + ", ".join(f"{k} {v:.1f}" for k, v in d["idle_ms_per_token"].items()) + " ms a token")
        if result["ready_at_request"]:
            r = result["ready_at_request"]
            print(f"a layer's experts: {r['ready']:.2f} of {r['asked']:.2f} ready when asked for (cached or "
                  "prefetched); the rest read on demand or still in flight")
        if result["by_layer"]:
            print("waiting for experts, by layer (ms a token, experts not ready a token): "
                  + ", ".join(f"{layer}: {v['wait_ms_per_token']:.1f} ({v['not_ready_per_token']:.1f})"
                              for layer, v in result["by_layer"].items()))
        pf = result["telemetry"].get("prefetch") or {}
        if pf.get("guess_recall") is not None:
            print(f"guesses of a layer's experts (prompt included): recall {pf['guess_recall']:.2f}, "
                  f"precision {pf['guess_precision']:.2f}")
        if result["reads"]:
            r = result["reads"]
            print("reads: " + "; ".join(f"{k} {r[k]['bundles_per_token']:.1f} bundles a token, "
                                         f"{r[k]['ms_per_bundle']:.2f} ms a bundle" for k in ("demand", "prefetch"))
                  + "; under way: " + ", ".join(f"{k.replace('_', ' ')} {v:.0%}" for k, v in r["share"].items()))
        if "cprofile_top" in result:
            print(result["cprofile_top"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
