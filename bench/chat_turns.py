"""A chat's turns with the conversation's keys and values kept (engine.Context) and computed afresh.

Every turn of a chat resends the whole conversation.  This plays one of `--turns` turns at the level
of token ids (any model, with or without a tokenizer): turn k's prompt is turn k-1's, its reply and a
new message of `--message-tokens` random ids; each reply is `--reply-tokens` forced ids, so both ways
do the same work but for the prompt.  Each turn runs both ways, alternating which goes first, in one
process: afresh (a new cache, the whole prompt computed) and with the kept context (only what the
turn before had not computed).  It prints each turn's time to the first token both ways, and the
median ratio over the turns after the first.

    .venv/bin/python -m bench.chat_turns                      # the chat demo model (assets/demo)
    .venv/bin/python -m bench.chat_turns --model STORE --turns 6 --message-tokens 48 --json
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


def first_token_s(model: engine.Model, prompt: list[int], reply: list[int],
                  context: engine.Context | None) -> tuple[float, float]:
    """(seconds to the first token, seconds for the whole reply) of one turn."""
    t0 = time.perf_counter()
    gen = model.generate(prompt, max_new_tokens=len(reply), forced=reply, ignore_eos=True, context=context)
    first = None
    for _ in gen:
        if first is None:
            first = time.perf_counter() - t0
    return first or 0.0, time.perf_counter() - t0


def play(model: engine.Model, turns: int, message_tokens: int, reply_tokens: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    vocab = model.spec.vocab_size
    context = model.new_context()
    prompt: list[int] = []
    rows = []
    for k in range(turns):
        prompt = prompt + rng.integers(0, vocab, message_tokens).tolist()
        reply = rng.integers(0, vocab, reply_tokens).tolist()
        ways = [("fresh", None), ("kept", context)]
        if k % 2:
            ways.reverse()   # neither way always runs on a cache the other warmed
        row = {"turn": k + 1, "prompt_tokens": len(prompt)}
        for name, ctx in ways:
            row[f"{name}_first_s"], row[f"{name}_turn_s"] = first_token_s(model, prompt, reply, ctx)
        row["kept_tokens"] = context.kept
        rows.append(row)
        prompt = prompt + reply
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.chat_turns", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint folder, expert store or GGUF (default: the chat demo, assets/demo)")
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--message-tokens", type=int, default=32)
    p.add_argument("--reply-tokens", type=int, default=32)
    p.add_argument("--ram-cache", help="RAM budget for cached experts (default: every expert in RAM)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if min(args.turns, args.message_tokens, args.reply_tokens) < 1:
        print("chat_turns: --turns, --message-tokens and --reply-tokens must be at least 1", file=sys.stderr)
        return 2
    path = args.model or str(Path(__file__).resolve().parent.parent / "assets" / "demo")
    try:
        model = engine.load(path, ram_cache=args.ram_cache)
    except engine.EngineError as e:
        print(f"chat_turns: {e}", file=sys.stderr)
        return 2
    with model:
        rows = play(model, args.turns, args.message_tokens, args.reply_tokens)
    later = rows[1:] or rows
    ratio = statistics.median(r["fresh_first_s"] / r["kept_first_s"] for r in later)
    if args.json:
        print(json.dumps({"model": path, "rows": rows, "median_first_token_ratio": ratio}, indent=1))
        return 0
    print("| turn | prompt tokens | kept | first token afresh, s | kept, s | afresh / kept |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['turn']} | {r['prompt_tokens']} | {r['kept_tokens']} | {r['fresh_first_s']:.3f} | "
              f"{r['kept_first_s']:.3f} | {r['fresh_first_s'] / r['kept_first_s']:.2f} |")
    print(f"\nmedian afresh / kept over turns 2-{len(rows)}: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
