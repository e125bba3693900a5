"""A chat past its context: the turn after its oldest turns are left out, with the context shifted (the
later turns' keys and values kept, moved up: `Model.new_context(shift=True)`) and without (computed again).

This plays a chat at the level of token ids, as the app's session does: a system prompt of
`--system-tokens`, turns of `--message-tokens` random ids and `--reply-tokens` forced ones; when a prompt
and its reply would pass `--context`, whole turns are left out, oldest first, until the prompt fills half
of it.  Two contexts follow the same chat, one shifting, one not, each turn alternating which goes first,
in one process.  It prints the time to the first token of every turn both ways; the turns right after a
trim are where the two part.

    .venv/bin/python -m bench.context_shift --model STORE --context 2048 --message-tokens 64 --reply-tokens 64
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

import numpy as np

import engine
from bench.chat_turns import first_token_s


def play(model: engine.Model, context: int, system_tokens: int, message_tokens: int, reply_tokens: int,
         trims: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    vocab = model.spec.vocab_size
    system = rng.integers(0, vocab, system_tokens).tolist()
    ways = {"shift": model.new_context(shift=True), "plain": model.new_context()}
    turns: list[list[int]] = []   # each a message and its reply
    rows: list[dict] = []
    while sum(1 for r in rows if r["trimmed"]) < trims:
        message = rng.integers(0, vocab, message_tokens).tolist()
        reply = rng.integers(0, vocab, reply_tokens).tolist()
        trimmed = 0
        if system_tokens + sum(map(len, turns)) + message_tokens + reply_tokens > context:
            # past the context: whole turns out until the prompt fills half of it
            while turns and system_tokens + sum(map(len, turns)) + message_tokens > context // 2:
                turns.pop(0)
                trimmed += 1
        prompt = system + [t for turn in turns for t in turn] + message
        row = {"turn": len(rows) + 1, "prompt_tokens": len(prompt), "trimmed": trimmed}
        order = list(ways) if len(rows) % 2 == 0 else list(ways)[::-1]
        for name in order:
            row[f"{name}_first_s"], _ = first_token_s(model, prompt, reply, ways[name])
            row[f"{name}_kept"] = ways[name].kept
        rows.append(row)
        turns.append(message + reply)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.context_shift", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="checkpoint folder, expert store or GGUF")
    p.add_argument("--context", type=int, default=2048, help="tokens of chat kept, the reply included")
    p.add_argument("--system-tokens", type=int, default=32)
    p.add_argument("--message-tokens", type=int, default=64)
    p.add_argument("--reply-tokens", type=int, default=64)
    p.add_argument("--trims", type=int, default=2, help="play until the chat was trimmed this many times")
    p.add_argument("--ram-cache", help="RAM budget for cached experts (default: every expert in RAM)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if min(args.system_tokens, args.message_tokens, args.reply_tokens, args.trims) < 1 or \
            args.system_tokens + 2 * (args.message_tokens + args.reply_tokens) > args.context // 2:
        print("context_shift: the system prompt and two turns must fit in half of --context, and every size "
              "must be at least 1", file=sys.stderr)
        return 2
    try:
        model = engine.load(args.model, ram_cache=args.ram_cache)
    except engine.EngineError as e:
        print(f"context_shift: {e}", file=sys.stderr)
        return 2
    with model:
        rows = play(model, args.context, args.system_tokens, args.message_tokens, args.reply_tokens, args.trims)
    after = [r for r in rows if r["trimmed"]]
    summary = {k: statistics.median(r[k] for r in after) for k in ("shift_first_s", "plain_first_s")}
    if args.json:
        print(json.dumps({"model": args.model, "context": args.context, "rows": rows,
                          "after_trim_median": summary}, indent=1))
        return 0
    print("| turn | prompt tokens | turns left out | first token shifted, s (kept) | not shifted, s (kept) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['turn']} | {r['prompt_tokens']} | {r['trimmed'] or ''} | {r['shift_first_s']:.3f} "
              f"({r['shift_kept']}) | {r['plain_first_s']:.3f} ({r['plain_kept']}) |")
    print(f"\nturns right after a trim ({len(after)}), median time to the first token: shifted "
          f"{summary['shift_first_s']:.3f} s, not shifted {summary['plain_first_s']:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
