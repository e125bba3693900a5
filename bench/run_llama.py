"""llama.cpp (through llama-cpp-python) measured the way `mer-tui bench` measures mer-tui.

Same inputs (mer_tui.bench.bench_inputs: random token ids, a new prompt each repeat and a forced
continuation, no tokenizer), same counting: prefill tokens/s is
prompt tokens over the time to the first token; decode tokens/s is (decode_tokens - 1) over the
time from the first token to the last; the median of `repeats` runs in one process;
peak RSS as VmHWM.  Prints one JSON object.

    .venv/bin/python -m bench.run_llama --model M.gguf [--repack] [--prompt-tokens 32] [--decode-tokens 16]
    .venv/bin/python -m bench.run_llama --model M.gguf --logits out.npy --ids 1,2,3   # last-token logits

Repacking: llama.cpp 0.3.x copies q4_0 weights into an interleaved layout in anonymous memory
("extra buffer types", the CLI's --no-repack turns it off).  With it, mmap keeps nothing out of
RAM and a model larger than its memory cgroup is OOM-killed; without it, weights stay mmap'd and
the page cache serves them.  Llama() has no argument for it, so we wrap the default-params call.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

import numpy as np

from mer_tui.bench import bench_inputs


def load(model: str, *, repack: bool, n_ctx: int, n_batch: int, threads: int):
    import llama_cpp
    from llama_cpp import llama_cpp as ll

    default_params = ll.llama_model_default_params

    def params():
        p = default_params()
        p.use_extra_bufts = repack
        return p

    ll.llama_model_default_params = params
    try:
        return llama_cpp.Llama(model_path=model, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch,
                               n_threads=threads, n_threads_batch=threads, use_mmap=True,
                               logits_all=False, verbose=bool(os.environ.get("BENCH_VERBOSE")))
    finally:
        ll.llama_model_default_params = default_params


def madvise_random(path: str) -> int:
    """MADV_RANDOM on this process's mappings of `path`: page faults then read only what they touch.

    Not something llama.cpp does: a tuned variant for the over-the-limit case, where the kernel's
    read-ahead around each fault (read_ahead_kb, 8 MiB on this VM's disk) pulls in neighbouring
    experts that evict what the next token needs.  Returns the bytes advised."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    real, advised = os.path.realpath(path), 0
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip() == real:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                if libc.madvise(start, end - start, 1) == 0:   # 1: MADV_RANDOM
                    advised += end - start
    return advised


def last_logits(llm) -> np.ndarray:
    """The logits of the last evaluated token (llama-cpp-python keeps them only with logits_all)."""
    from llama_cpp import llama_cpp as ll

    ptr = ll.llama_get_logits_ith(llm._ctx.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy()


def peak_rss() -> int:
    """This process's peak RSS (VmHWM).  Not getrusage's ru_maxrss: Linux carries that across exec, so a
    child started by vfork from a big parent reports the parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def read_bytes() -> int:
    """Bytes this process has caused to be read from storage, page faults on mmap'd files included."""
    try:
        for line in open("/proc/self/io"):
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_once(llm, prompt: list[int], continuation: list[int]) -> dict:
    """Prefill `prompt`, then decode `continuation` forced (as mer-tui bench does): each token's logits
    are computed, the next token is the given one."""
    decode_tokens = len(continuation)
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    last_logits(llm)
    t_first = time.perf_counter()
    read0 = read_bytes()
    for tok in continuation[:-1]:
        llm.eval([tok])
        last_logits(llm)
    t_end = time.perf_counter()
    return {
        "ttft_s": t_first - t0,
        "prefill_tokens_per_s": len(prompt) / (t_first - t0),
        "decode_tokens_per_s": (decode_tokens - 1) / (t_end - t_first) if decode_tokens > 1 else 0.0,
        # comparable to mer-tui's missed_bytes_per_token: what decoding had to fetch from the disk
        "disk_read_bytes_per_token": (read_bytes() - read0) / max(decode_tokens - 1, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--repack", action="store_true", help="let llama.cpp repack weights (its default)")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--madvise-random", action="store_true",
                   help="turn off kernel read-ahead on the mmap'd model (a tuned variant, not llama.cpp's default)")
    p.add_argument("--logits", metavar="NPY", help="only write the logits of --ids (all positions' last row)")
    p.add_argument("--ids", help="comma-separated token ids for --logits")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    if args.logits:
        ids = [int(x) for x in args.ids.split(",")]
        llm = load(args.model, repack=args.repack, n_ctx=max(64, len(ids) + 8), n_batch=max(32, len(ids)),
                   threads=args.threads)
        rows = []
        for n in range(1, len(ids) + 1):   # one row per prefix: position-by-position comparison
            llm.reset()
            llm.eval(ids[:n])
            rows.append(last_logits(llm))
        np.save(args.logits, np.stack(rows))
        return 0

    llm = load(args.model, repack=args.repack, n_ctx=args.prompt_tokens + args.decode_tokens + 16,
               n_batch=max(args.prompt_tokens, 32), threads=args.threads)
    load_s = time.perf_counter() - t0
    advised = madvise_random(args.model) if args.madvise_random else 0
    inputs = bench_inputs(llm.n_vocab(), args.prompt_tokens, args.decode_tokens, args.repeats)  # mer-tui bench's
    runs = [run_once(llm, prompt, continuation) for prompt, continuation in inputs]
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    result = {
        "engine": "llama.cpp",
        "model": args.model,
        "repack": args.repack,
        "madvise_random_bytes": advised,
        "threads": args.threads,
        "prompt_tokens": args.prompt_tokens,
        "decode_tokens": args.decode_tokens,
        "repeats": args.repeats,
        "load_s": round(load_s, 3),
        **{k: round(v, 4) for k, v in med.items()},
        "runs": runs,
        "peak_rss_bytes": peak_rss(),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
