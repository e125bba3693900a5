"""`mer-tui bench`: prefill and decode speed of a model, set against this machine's roofline.

The roofline says how fast decoding could be if it were bound only by moving bytes: every
decoded token reads its active weights once, the cached part from DRAM and the missed experts
from the SSD, so  best tokens/s = 1 / (cached_bytes / DRAM_bw + missed_bytes / SSD_bw).
That sum has the two one after the other; an engine that reads the SSD while it computes can beat
it, up to  1 / max(cached_bytes / DRAM_bw, missed_bytes / SSD_bw),  reported as the overlapped
bound (over a memory limit, the disk's time alone).  The SSD's figure is the probe's, or the speed
the engine's own reads reached while the disk was busy where that was faster.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import engine
from engine import format_size
from engine.telemetry import most_waited

from .cli import CliError
from .generate import load_from_args
from .machine import best_direct_read_bandwidth, block_device, disk_counters, dram_read_bandwidth, peak_rss_bytes

#: a decode's reads count as a measure of the disk only when they kept it busy this long in all: a few
#: reads in a few milliseconds (or ones the host's own cache served) say little about its speed
MIN_BUSY_S = 0.25


def device_share(dev0: tuple[int, float], dev1: tuple[int, float], seconds: float) -> dict[str, float]:
    """The device's own view of `seconds` of decoding from two disk_counters samples: the share of the
    time it had a request in flight, and its read speed then.  io_ticks advances in whole ticks (1-4 ms
    by the kernel's HZ), so a decode shorter than MIN_BUSY_S gets no figures (a 6 ms one read 8 ms
    busy), and a longer one's share is capped at the whole interval its tick rounding can pass."""
    if seconds < MIN_BUSY_S:
        return {}
    dev_bytes, dev_busy = dev1[0] - dev0[0], dev1[1] - dev0[1]
    return {"device_busy_fraction": min(dev_busy / seconds, 1.0),
            "device_read_bytes_per_s_while_busy": dev_bytes / dev_busy if dev_busy >= max(MIN_BUSY_S, 1e-3) else 0.0}


def _resident_bytes_per_token(model: engine.Model) -> int:
    """Bytes of non-expert weights one decoded token reads (the embedding only one row of)."""
    w = model.weights
    row = w.embed.nbytes // max(w.embed.rows, 1)
    total = w.nbytes - w.embed.nbytes + row
    if w.lm_head is w.embed:   # tied: lm_head reads the whole matrix
        total += w.embed.nbytes
    return total


def _expert_bytes_per_token(model: engine.Model) -> int:
    s = model.spec
    if not s.is_moe:
        return 0
    layer = model.moe_layer_ids[0]
    bundle = model.experts.get(layer, [0])[0]
    return bundle.nbytes * s.top_k * len(model.moe_layer_ids)


def _waits_per_token(start: dict | None, end: dict) -> list[float]:
    """Milliseconds a decoded token waited for each layer's experts between two snapshots."""
    w0, w1 = (start or {}).get("waits") or {}, end.get("waits") or {}
    steps = (w1.get("steps") or 0) - (w0.get("steps") or 0)
    t1 = w1.get("total_s") or []
    t0 = w0.get("total_s") or [0.0] * len(t1)
    return [1e3 * (b - a) / steps if steps > 0 else 0.0 for a, b in zip(t0, t1)]


def waits_line(by_layer: list[float], top: int = 3) -> str:
    """'12.3 ms a token for experts; most at layers 0 (8.1), 3 (1.2), 1 (0.9)': the total and where it gathers."""
    total = sum(by_layer)
    worst = most_waited(by_layer, top)
    return f"{total:.1f} ms a token for experts" + (
        "; most at layer" + ("s " if len(worst) > 1 else " ")
        + ", ".join(f"{i} ({by_layer[i]:.1f})" for i in worst) if worst else "")


def roofline_tokens_per_s(active_bytes: float, missed_bytes: float, dram_bw: float,
                          disk_bw: float) -> tuple[float, float]:
    """Best decode tokens/s for a token reading `active_bytes`, `missed_bytes` of them from the disk
    and the rest from DRAM: (the two reads one after the other, the two fully overlapped)."""
    dram_s, disk_s = (active_bytes - missed_bytes) / dram_bw, missed_bytes / disk_bw
    return tuple(1.0 / t if t > 0 else float("inf") for t in (dram_s + disk_s, max(dram_s, disk_s)))


def preload_experts(model: engine.Model) -> int:
    """Read experts into the RAM cache, layer by layer, until its budget is full; returns how many.
    With no budget that is every expert: the model then runs from RAM, as llama.cpp's does after
    mmap with MAP_POPULATE.  Shows a line of progress on a terminal (a 4 GB model takes seconds)."""
    experts = model.experts
    cache = getattr(experts, "cache", None)   # a streaming source; one in memory holds every expert already
    if cache is None:
        return 0
    n_exp = model.spec.num_experts
    bundle = experts.get(model.moe_layer_ids[0], [0])[0].nbytes
    budget = cache.budget
    fit = len(model.moe_layer_ids) * n_exp if budget is None else max(0, budget // max(bundle, 1))
    done = 0
    for layer in model.moe_layer_ids:
        take = min(n_exp, fit - done)
        if take <= 0:
            break
        experts.get(layer, list(range(take)))
        done += take
        if sys.stderr.isatty():
            print(f"\rpreloading experts: {done}/{fit}", end="", file=sys.stderr, flush=True)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    return done


def _largest_weight_file(folder: Path) -> Path:
    if folder.is_file():   # a GGUF: the model is the one file
        return folder
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin", ".experts")]
    files = files or [p for p in folder.iterdir() if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def _tier(snap: dict, name: str) -> dict:
    return snap.get("tiers", {}).get(name, {})


def bench_inputs(vocab_size: int, prompt_tokens: int, decode_tokens: int,
                 repeats: int) -> list[tuple[list[int], list[int]]]:
    """Per repeat, a prompt and the continuation to decode (random token ids), the same for every
    runner: bench.run_llama feeds llama.cpp these too.

    Each repeat gets its own prompt.  One prompt repeated gives the second run the first one's exact
    routing, which a cache with a long memory remembers: over the 2 GiB limit, lfu-decay read 78-82 MB
    a token in its second run and 122-123 in its first, so the median measured the repetition.
    The continuation is forced (Model.generate's `forced`) rather than sampled: greedy decoding of
    a model with random weights falls into loops of one to a few tokens within ~10 tokens, whose
    repeated routing hits the cache every time; on a real model it would be real text."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(repeats):
        prompt = rng.integers(0, vocab_size, prompt_tokens).tolist()
        out.append((prompt, rng.integers(0, vocab_size, decode_tokens).tolist()))
    return out


def run_bench(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    if not args.model:
        raise CliError("bench: --model PATH is required (or `mer-tui bench kernels`)")
    for opt in ("prompt_tokens", "decode_tokens", "repeats"):
        if getattr(args, opt) < 1:
            raise CliError(f"--{opt.replace('_', '-')} must be >= 1, got {getattr(args, opt)}")
    for opt in ("dram_bw", "disk_bw"):
        if getattr(args, opt) is not None and getattr(args, opt) <= 0:
            raise CliError(f"--{opt.replace('_', '-')} must be > 0 bytes/s, got {getattr(args, opt)}")
    model = load_from_args(args)
    inputs = bench_inputs(model.spec.vocab_size, args.prompt_tokens, args.decode_tokens, args.repeats)
    expert_bpt = _expert_bytes_per_token(model)
    resident_bpt = _resident_bytes_per_token(model)
    preloaded = preload_experts(model) if getattr(args, "preload", False) else 0
    model.reset_telemetry()
    # The device's own view of the same decoding (io_ticks): the engine's counts a batch of reads busy
    # until the reader hands the whole batch back, which the device may have finished long before.
    weight_file = _largest_weight_file(Path(args.model))
    device = block_device(weight_file)

    runs = []
    waits: list[list[float]] = []   # each run's ms a decoded token waited for experts, by layer
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=None, transient=True, disable=not sys.stderr.isatty()) as bar:
        task = bar.add_task("benchmark", total=args.repeats * args.decode_tokens)
        for r in range(args.repeats):
            bar.update(task, description=f"run {r + 1}/{args.repeats}")
            t0 = time.perf_counter()
            t_first = None
            n = 0
            start_snap = dev0 = None
            prompt, continuation = inputs[r]
            read0 = _tier(model.telemetry(), "ssd").get("bytes_read", 0)
            for _ in model.generate(prompt, max_new_tokens=args.decode_tokens, ignore_eos=True, forced=continuation):
                n += 1
                if t_first is None:
                    t_first = time.perf_counter()
                    start_snap, dev0 = model.telemetry(), device and disk_counters(device)
                bar.advance(task)
            t_end = time.perf_counter()
            end_snap, dev1 = model.telemetry(), device and disk_counters(device)
            ssd0, ssd1 = _tier(start_snap, "ssd"), _tier(end_snap, "ssd")
            # bytes read, seconds the disk was busy, requests' seconds in flight: while decoding
            read, busy, in_flight = (ssd1.get(k, 0) - ssd0.get(k, 0) for k in ("bytes_read", "busy_s", "request_s"))
            waits.append(_waits_per_token(start_snap, end_snap))
            runs.append({
                "wait_ms_per_token": sum(waits[-1]),
                "ttft_s": t_first - t0,
                "prefill_tokens_per_s": args.prompt_tokens / (t_first - t0),
                # what the prompt read (a prompt runs layer by layer: each expert once, when the cache holds a layer)
                "prefill_read_bytes": ssd0.get("bytes_read", 0) - read0,
                "decode_tokens_per_s": (n - 1) / (t_end - t_first) if n > 1 else 0.0,
                "missed_bytes_per_token": read / max(n - 1, 1),
                # while decoding: the share of the time some read was under way, and the speed the
                # disk delivered then (the engine's own measure of the disk, at the very moment)
                "disk_busy_fraction": busy / (t_end - t_first) if n > 1 else 0.0,
                "read_bytes_per_s_while_busy": read / busy if busy >= MIN_BUSY_S else 0.0,
                # and how many requests it had on average then (their latencies summed over the busy
                # time): the probe of the roofline keeps 8 in flight
                "requests_in_flight_while_busy": in_flight / busy if busy >= MIN_BUSY_S else 0.0,
            })
            if dev0 and dev1 and n > 1:
                runs[-1].update(device_share(dev0, dev1, t_end - t_first))
    peak_rss = peak_rss_bytes()
    snap = model.telemetry()
    model.close()

    # Bandwidths may come from the caller (measured once for a whole suite, outside a memory limit).
    dram_bw = args.dram_bw or dram_read_bandwidth()
    if args.disk_bw:
        disk_bw, disk_how = args.disk_bw, "given with --disk-bw"
    else:
        disk_bw, disk_how = best_direct_read_bandwidth(weight_file)
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0] if all(k in r for r in runs)}
    # The disk's speed only from the runs that kept it busy long enough (the others say 0, which a
    # median would average in: two runs, one short, gave half the speed).
    for key in ("read_bytes_per_s_while_busy", "requests_in_flight_while_busy", "device_read_bytes_per_s_while_busy"):
        if key in med:
            measured = [r[key] for r in runs if r[key] > 0]
            med[key] = statistics.median(measured) if measured else 0.0
    # A bound the engine's own reads beat is no bound: where they were faster while the disk was busy
    # than the probe (this VM's disk drifts from minute to minute), the roofline takes their speed.
    engine_bw = med["read_bytes_per_s_while_busy"]
    if engine_bw > disk_bw:
        disk_bw, disk_how = engine_bw, f"the engine's own reads while the disk was busy (faster than {disk_how})"
    active = resident_bpt + expert_bpt
    missed = min(med["missed_bytes_per_token"], expert_bpt)
    best, best_overlapped = roofline_tokens_per_s(active, missed, dram_bw, disk_bw)
    ram = _tier(snap, "ram")
    result = {
        "model": str(args.model),
        "io": snap.get("io", {}).get("backend"),
        "policy": snap.get("policy"),
        "kv_cache": snap["kv"]["format"],
        "ram_cache": ram.get("bytes_budget"),
        "prompt_tokens": args.prompt_tokens,
        "decode_tokens": args.decode_tokens,
        "repeats": args.repeats,
        "preloaded_experts": preloaded,
        "device": device,
        **{k: round(v, 4) for k, v in med.items()},
        "runs": runs,
        "wait_ms_per_token_by_layer": [round(statistics.median(w), 3) for w in zip(*waits)],
        "hit_rate": {name: t.get("hit_rate") for name, t in snap.get("tiers", {}).items() if "hit_rate" in t},
        "read_mb_s": _tier(snap, "ssd").get("read_mb_s", 0.0),
        "queue_depth_max": snap.get("io", {}).get("queue_depth_max", 0),
        "peak_rss_bytes": peak_rss,
        "roofline": {
            "dram_read_bytes_per_s": dram_bw,
            "disk_read_bytes_per_s": disk_bw,
            "disk_read_mode": disk_how,
            "resident_bytes_per_token": resident_bpt,
            "expert_bytes_per_token": expert_bpt,
            "best_decode_tokens_per_s": best,
            "fraction_reached": med["decode_tokens_per_s"] / best if best else 0.0,
            "best_decode_tokens_per_s_overlapped": best_overlapped,
            "fraction_reached_overlapped": med["decode_tokens_per_s"] / best_overlapped if best_overlapped else 0.0,
        },
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_report(result)
    return 0


def _print_report(r: dict) -> None:
    roof = r["roofline"]
    gb = 1e9
    lines = [
        f"model            {r['model']}  (io={r['io']}, policy={r['policy']}, "
        f"ram cache={format_size(r['ram_cache'])})",
        f"prompt/decode    {r['prompt_tokens']} / {r['decode_tokens']} tokens, median of {r['repeats']} runs",
        f"prefill          {r['prefill_tokens_per_s']:.1f} tokens/s   (time to first token {r['ttft_s']:.3f} s"
        + (f", {format_size(r['prefill_read_bytes'])} read" if r.get("prefill_read_bytes") else "") + ")",
        f"decode           {r['decode_tokens_per_s']:.2f} tokens/s",
        "hit rate         " + ", ".join(f"{k} {v:.1%}" for k, v in r["hit_rate"].items() if v is not None),
        f"missed bytes     {format_size(r['missed_bytes_per_token'])} per token, read {r['read_mb_s']:.0f} MB/s, "
        f"queue depth max {r['queue_depth_max']}",
        *([f"waits            {waits_line(r['wait_ms_per_token_by_layer'])}"]
          if any(r.get("wait_ms_per_token_by_layer") or []) else []),
        f"disk busy        {r['disk_busy_fraction']:.0%} of decoding, "
        + (f"{r['read_bytes_per_s_while_busy'] / 1e6:.0f} MB/s while busy with "
           f"{r['requests_in_flight_while_busy']:.1f} requests in flight on average"
           if r["read_bytes_per_s_while_busy"] else f"too little (under {MIN_BUSY_S} s a run) to time the disk"),
        *([f"device busy      {r['device_busy_fraction']:.0%} of decoding, "
           + (f"{r['device_read_bytes_per_s_while_busy'] / 1e6:.0f} MB/s while busy"
              if r["device_read_bytes_per_s_while_busy"] else "too little to time it")
           + f" ({r['device']}, /proc/diskstats)"]
          if "device_busy_fraction" in r else []),
        f"peak RSS         {format_size(r['peak_rss_bytes'])}",
        f"DRAM read        {roof['dram_read_bytes_per_s'] / gb:.2f} GB/s",
        f"disk read        {roof['disk_read_bytes_per_s'] / gb:.2f} GB/s ({roof['disk_read_mode']})",
        f"bytes per token  {format_size(roof['resident_bytes_per_token'])} resident + "
        f"{format_size(roof['expert_bytes_per_token'])} experts",
        f"roofline         {roof['best_decode_tokens_per_s']:.2f} tokens/s best; "
        f"reached {roof['fraction_reached']:.0%}",
        f"overlapped       {roof['best_decode_tokens_per_s_overlapped']:.2f} tokens/s best if reads and compute "
        f"overlap fully; reached {roof['fraction_reached_overlapped']:.0%}",
    ]
    print("\n".join(lines))
