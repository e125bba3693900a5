"""`mer-tui generate`: headless generation that streams text to stdout."""
from __future__ import annotations

import argparse
import json
import sys
import time

import engine
from engine import format_size

from .cli import CliError
from .textfile import TextFileError, read_text


def load_from_args(args: argparse.Namespace) -> engine.Model:
    """The model named by --model with the cache options shared by generate, bench and launch."""
    return engine.load(args.model, ram_cache=args.ram_cache, io=args.io, policy=args.policy,
                       prefetch=not args.no_prefetch, quant=args.quant, dense_quant=args.dense_quant,
                       threads=args.threads, kv_cache=args.kv_cache)


def prompt_text(args: argparse.Namespace) -> str:
    """--prompt's text, or --file's (standard input for '-'), read before the model is loaded.  A file's
    last newline ends its last line and is not part of the prompt (llama.cpp's -f drops it too)."""
    if args.file is None:
        return args.prompt
    if args.file == "-":
        return _without_last_newline(sys.stdin.read())
    try:
        return _without_last_newline(read_text(args.file))
    except TextFileError as e:
        raise CliError(f"--file: {e}") from None


def context_size(asked: int | None, trained: int | None) -> int | None:
    """The tokens a generation may fill: --ctx-size up to the trained context (positions past it were never
    trained: a model's text falls apart there), the trained one by default; None where neither is known."""
    if asked is not None and asked < 2:
        raise CliError(f"--ctx-size: must be at least 2, got {asked}")
    if asked is None or trained is None:
        return trained if asked is None else asked
    return min(asked, trained)


def _without_last_newline(text: str) -> str:
    return text[:-1] if text.endswith("\n") else text


def run_generate(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 0:
        raise CliError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    prompt = prompt_text(args)
    t_load = time.perf_counter()
    model = load_from_args(args)
    load_s = time.perf_counter() - t_load
    tok = model.tokenizer
    if tok is None:
        raise CliError(f"{args.model}: no tokenizer.json, so text prompts cannot be encoded")
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": prompt})
        ids = tok.encode_chat(messages)
    else:
        ids = tok.encode(prompt)
    source = "--prompt" if args.file is None else "--file"
    if not ids:
        raise CliError(f"{source}: encodes to no tokens")
    context = context_size(args.ctx_size, model.spec.max_position_embeddings)
    if context is not None and len(ids) >= context:
        trained = model.spec.max_position_embeddings
        raise CliError(f"{source}: the prompt is {len(ids)} tokens, more than the {context}-token context holds with "
                       f"a reply (--ctx-size; the model was trained for {trained or 'an unknown number of'} tokens)")
    max_new = args.max_new_tokens if context is None else min(args.max_new_tokens, context - len(ids))

    stream = tok.stream(stop=args.stop)
    out: list[int] = []
    parts: list[str] = []
    t0 = time.perf_counter()
    t_first = None
    gen = model.generate(ids, max_new_tokens=max_new, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                         repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop)
    for token in gen:
        if t_first is None:
            t_first = time.perf_counter()
        out.append(token)
        piece = stream.push(token)
        parts.append(piece)
        if piece and not args.json:
            sys.stdout.write(piece)
            sys.stdout.flush()
    tail = stream.flush()
    parts.append(tail)
    t_end = time.perf_counter()
    text = "".join(parts)
    snap = model.telemetry()
    timings = {
        "load_s": round(load_s, 4),
        "ttft_s": round((t_first - t0) if t_first is not None else 0.0, 4),
        "total_s": round(t_end - t0, 4),
        "prefill_tokens_per_s": round(snap["prefill_tokens_per_s"], 2),
        # the first token comes out of the prefill: the decode rate counts the ones after it
        "decode_tokens_per_s": round((len(out) - 1) / (t_end - t_first), 2)
        if len(out) > 1 and t_end > t_first else 0.0,
    }
    if args.json:
        print(json.dumps({"prompt_ids": ids, "ids": out, "text": text, "timings": timings}))
    else:
        sys.stdout.write(tail + "\n")
        sys.stdout.flush()
        line = summary(len(ids), len(out), timings, snap)
        if max_new < args.max_new_tokens and len(out) == max_new:
            line += f" · stopped at the end of the {context}-token context"
        print(line, file=sys.stderr)
    model.close()
    return 0


def summary(n_prompt: int, n_reply: int, timings: dict, snap: dict) -> str:
    """One line for stderr after the text, as llama.cpp prints its timings: the speeds, and what the
    expert cache did."""
    def tokens(n: int) -> str:
        return f"{n} token" + ("" if n == 1 else "s")

    parts = [f"prompt {tokens(n_prompt)}, {timings['prefill_tokens_per_s']:.1f} tok/s",
             *([f"first token after {timings['ttft_s']:.2f} s"] if n_reply else []),
             f"reply {tokens(n_reply)}" + (f", {timings['decode_tokens_per_s']:.1f} tok/s"
                                           if timings["decode_tokens_per_s"] else "")]
    io, tiers = snap.get("io") or {}, snap.get("tiers") or {}
    if io.get("backend", "ram") == "ram":
        parts.append("experts held in RAM")
    else:
        ram, ssd = tiers.get("ram") or {}, tiers.get("ssd") or {}
        seen = (ram.get("hits") or 0) + (ram.get("misses") or 0)
        hits = f"{100 * (ram.get('hit_rate') or 0.0):.1f}% hits" if seen else "no lookups"
        reader = io["backend"] + (" O_DIRECT" if io.get("direct") else "")
        parts.append(f"RAM cache {hits}, {format_size(ssd.get('bytes_read') or 0)} read ({reader})")
    parts.append(f"loaded in {timings['load_s']:.1f} s")
    return "mer-tui: " + " · ".join(parts)
