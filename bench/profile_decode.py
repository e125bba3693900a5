"""Where one mer-tui decode run spends its time: I/O wait, expert compute, attention, the rest.

Wall-clock timers wrap the engine's stages on the decoding thread (only while decoding, not during
prefill), so the split adds up to the decode time; then, optionally, a cProfile of a second decode
lists the functions with the most time of their own.

    .venv/bin/python -m bench.profile_decode --model STORE --ram-cache 700MiB --io uring --json

Categories (times on the thread that decodes):
- I/O wait: inside the expert source's get(): cache lookups, and blocking on reads not yet done;
- expert compute: kernels.experts_ffn and expert_ffn (gate, up, silu, down of the chosen experts);
- attention: the attention block (q/k/v/o matmuls, qk-norm, rope, scores, KV cache);
- lm_head: the output projection over the vocabulary;
- prefetch: guessing the next layer's experts (its router) and queueing reads;
- other (Python overhead): router, norms, top-k, weighting, sampling, loops - everything else.
"""
from __future__ import annotations

import argparse
import cProfile
import functools
import io
import json
import pstats
import sys
import time
from collections import defaultdict

import numpy as np


class Timers:
    def __init__(self) -> None:
        self.total: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.on = False
        self.depth = 0

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
                self.total[name] += time.perf_counter() - t0
                self.calls[name] += 1
        return timed


def instrument(model, timers: Timers) -> None:
    import kernels

    model._attention = timers.wrap("attention", model._attention)
    model._prefetch = timers.wrap("prefetch", model._prefetch)
    model.experts.get = timers.wrap("io_wait", model.experts.get)
    # engine/model.py calls kernels.expert_ffn through the module, so patching the module is enough.
    kernels.expert_ffn = timers.wrap("expert_compute", kernels.expert_ffn)
    kernels.experts_ffn = timers.wrap("expert_compute", kernels.experts_ffn)
    head = model.weights.lm_head
    object.__setattr__(head, "matmul", timers.wrap("lm_head", head.matmul))   # QMatrix is a frozen dataclass


def decode(model, prompt: list[int], n: int, timers: Timers | None) -> tuple[float, int]:
    """Seconds from the first token to the last, and tokens decoded in that time."""
    t_first = None
    count = 0
    for _ in model.generate(prompt, max_new_tokens=n, ignore_eos=True):
        count += 1
        if t_first is None:
            t_first = time.perf_counter()
            if timers:
                timers.on = True
    if timers:
        timers.on = False
    return time.perf_counter() - (t_first or time.perf_counter()), max(count - 1, 0)


def main(argv: list[str] | None = None) -> int:
    import engine

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--ram-cache")
    p.add_argument("--io", default="auto")
    p.add_argument("--no-prefetch", action="store_true")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--decode-tokens", type=int, default=16)
    p.add_argument("--cprofile", action="store_true", help="also profile a second decode with cProfile")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    model = engine.load(args.model, ram_cache=args.ram_cache, io=args.io, prefetch=not args.no_prefetch)
    prompt = np.random.default_rng(0).integers(0, model.spec.vocab_size, args.prompt_tokens).tolist()
    timers = Timers()
    instrument(model, timers)
    decode(model, prompt, 2, None)              # warm up: JIT compilation, first reads
    seconds, tokens = decode(model, prompt, args.decode_tokens, timers)
    parts = dict(timers.total)
    parts["other"] = seconds - sum(parts.values())
    result: dict = {
        "decode_s": seconds, "decode_tokens": tokens,
        "decode_tokens_per_s": tokens / seconds if seconds else 0.0,
        "seconds": parts, "calls": dict(timers.calls),
        "share": {k: v / seconds for k, v in parts.items()} if seconds else {},
        "telemetry": {k: model.telemetry().get(k) for k in ("tiers", "io", "prefetch")},
    }
    if args.cprofile:
        prof = cProfile.Profile()
        prof.enable()
        decode(model, prompt, args.decode_tokens, None)
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
        if "cprofile_top" in result:
            print(result["cprofile_top"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
