"""RAM-tier hit rates of the demo model's real routing, per budget and policy.

Records the routing of 200 chat turns of the trained demo (greedy replies, the same unseen
dialogues as training/evaluate_demo.py's routing entropy) as a JSONL trace written by the
streaming source itself (configure(trace=...)), then replays that trace through the engine's own
RamCache at 25%, 50% and 75% of the expert bytes with each policy.

    .venv/bin/python -m bench.routing_replay [--model assets/demo] [--trace /tmp/demo-trace.jsonl]

Replaying the recorded trace (rather than rerunning the model per setting) gives every setting the
same accesses; prefetch is left out, so these are demand hit rates.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import engine
from engine.cache import POLICIES, RamCache
from training.corpus import make_dialogues
from training.evaluate_demo import EVAL_SEED

FRACTIONS = (0.25, 0.50, 0.75)


def record(model_dir: str, trace: Path, turns: int = 200, max_new: int = 96) -> int:
    """Generate `turns` chat replies and write the routing trace; returns the tokens processed."""
    model = engine.load(model_dir, io="pread", prefetch=False)   # streaming, no budget: the trace hook
    tok = model.tokenizer
    trace.unlink(missing_ok=True)
    model.experts.configure(trace=str(trace))
    tokens = 0
    for dialogue in make_dialogues(EVAL_SEED + 1, turns):
        first_user = next(i for i, m in enumerate(dialogue) if m["role"] == "user")
        ids = tok.encode_chat(dialogue[: first_user + 1])
        tokens += len(ids) + len(list(model.generate(ids, max_new_tokens=max_new)))
    model.experts.configure(trace=None)
    model.close()
    return tokens


def replay(trace: Path, bundle_bytes: int, budget: int, policy: str) -> float:
    """Demand hit rate of a RamCache of `budget` bytes over the trace."""
    cache = RamCache(budget, policy)
    hits = misses = 0
    last_step = None
    with trace.open() as f:
        for line in f:
            rec = json.loads(line)
            if rec["step"] != last_step:
                cache.step()
                last_step = rec["step"]
            if "probs" in rec:   # the router's probabilities (traces since the router policy)
                cache.observe(rec["layer"], rec["probs"], rec["experts"])
            for e in rec["experts"]:
                key = (rec["layer"], e)
                hit = cache.lookup(key) is not None
                cache.touch(key)
                if hit:
                    hits += 1
                else:
                    misses += 1
                    cache.insert(key, True, bundle_bytes)
    return hits / max(hits + misses, 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="assets/demo")
    p.add_argument("--trace", type=Path, default=Path("/tmp/demo-trace.jsonl"))
    p.add_argument("--turns", type=int, default=200)
    p.add_argument("--reuse", action="store_true", help="replay an existing trace without recording")
    args = p.parse_args(argv)
    if not (args.reuse and args.trace.exists()):
        tokens = record(args.model, args.trace, args.turns)
        print(f"recorded {args.turns} chat turns, {tokens} tokens -> {args.trace}")
    model = engine.load(args.model)
    bundle = model.experts.get(model.moe_layer_ids[0], [0])[0].nbytes
    total = bundle * len(model.moe_layer_ids) * model.spec.num_experts
    print(f"\nexpert bytes {total} ({bundle} per bundle)\n")
    print("| budget | " + " | ".join(POLICIES) + " |")
    print("|---|" + "---|" * len(POLICIES))
    for frac in FRACTIONS:
        rates = [replay(args.trace, bundle, int(total * frac), pol) for pol in POLICIES]
        print(f"| {frac:.0%} ({engine.format_size(int(total * frac))}) | "
              + " | ".join(f"{r:.1%}" for r in rates) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
