"""How well guesses of a layer's experts made before it runs predict its router's picks, by what they are made from.

The prefetch guesses a later MoE layer's experts by running that layer's router (through its own norm) on
an estimate of its input.  The input is the residual stream at this layer's router plus the updates in
between: this layer's expert output and the attention outputs of the layers up to the guessed one.  This
decodes a model (every expert in RAM), records at every decode step and layer the residual at the router,
the attention and expert outputs and the picks, and scores estimates made of what is known when the guess
is made, as recall: the share of the picks among the guess's top-k (k = the model's top-k, and 2 and 4 more).

    .venv/bin/python -m bench.guess_recall --model /work/bench-models/olmoe-like-q4_0-dense-q8_0
    .venv/bin/python -m bench.guess_recall --model assets/demo --text "Tell me a story" --text "Hi"

Without --text it decodes `mer-tui bench`'s inputs (random prompts, forced continuations); with --text,
sampled replies (temperature 0.8, seed 1) to each text on a model with a tokenizer.  The row "the layer's
own input" is the router's actual input: recall 1 by construction, a check on the bookkeeping.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

import engine

# (name, layers ahead, what the estimate adds to the residual at this layer's router):
# "experts" this layer's expert output, "attention" the previous token's attention outputs at the layers
# up to the guessed one, "truth" the guessed layer's actual router input (the check)
PREDICTORS = (
    ("next layer: residual", 1, ()),
    ("next layer: residual + this layer's experts", 1, ("experts",)),
    ("next layer: residual + attention of the token before (the engine's)", 1, ("attention",)),
    ("next layer: residual + experts + attention of the token before", 1, ("experts", "attention")),
    ("layer after next: residual", 2, ()),
    ("layer after next: residual + attention of the token before (the engine's)", 2, ("attention",)),
    ("the layer's own input", 0, ("truth",)),
)


def record(model: engine.Model, runs) -> list[dict]:
    """Per decode step, per layer: residual at the router, attention and expert outputs, picks."""
    steps: list[dict] = []
    step: dict = {}
    attention, moe, routed = model._attention, model._moe, model._telemetry.routed

    def on_attention(i, x, *rest):
        y = attention(i, x, *rest)
        if x.shape[0] == 1:
            step.setdefault(i, {})["attention"] = y
        return y

    def on_routed(i, top):   # the engine's own picks, reported by _moe
        if top.shape[0] == 1:
            step[i]["picks"] = set(top[0].tolist())
        routed(i, top)

    def on_moe(i, h, residual, cache, **kw):
        y = moe(i, h, residual, cache, **kw)
        if h.shape[0] == 1:
            step[i].update(residual=residual.copy(), experts=y)
            if i == model.moe_layer_ids[-1]:
                steps.append(dict(step))
                step.clear()
        return y

    model._attention, model._moe, model._telemetry.routed = on_attention, on_moe, on_routed
    try:
        for run in runs:
            steps.append({})   # a new sequence: no token before
            for _ in run():
                pass
    finally:
        del model._attention, model._moe, model._telemetry.routed   # the methods again
    return steps


def recall(model: engine.Model, steps: list[dict]) -> dict[str, list[float]]:
    s, moe_layers = model.spec, model.moe_layer_ids
    ks = (s.top_k, s.top_k + 2, s.top_k + 4)
    hits = {name: np.zeros(len(ks)) for name, _, _ in PREDICTORS}
    asked = dict.fromkeys(hits, 0)
    before: dict = {}
    for now in steps:
        for pos, layer in enumerate(moe_layers):
            if not now or not before:
                break
            for name, ahead, parts in PREDICTORS:
                if pos + ahead >= len(moe_layers):
                    continue
                target = moe_layers[pos + ahead]
                x = now[layer]["residual"]
                if "truth" in parts:
                    x = now[target]["residual"]
                if "experts" in parts:
                    x = x + now[layer]["experts"]
                if "attention" in parts:
                    x = x + sum(before[j]["attention"] for j in range(layer + 1, target + 1))
                ranked = model._rank_experts(target, x)[0]   # as the engine's prefetch ranks them
                picks = now[target]["picks"]
                hits[name] += [len(picks & set(ranked[:k].tolist())) for k in ks]
                asked[name] += len(picks)
        before = now
    return {name: (hits[name] / asked[name]).round(3).tolist() for name in hits if asked[name]}


def main(argv: list[str] | None = None) -> int:
    from mer_tui.bench import bench_inputs

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--text", action="append", help="a prompt to reply to (sampled); repeatable")
    p.add_argument("--prompts", type=int, default=3, help="without --text: how many of bench's inputs")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    try:
        model = engine.load(args.model, prefetch=False)
    except engine.EngineError as e:
        print(f"guess_recall: {e}", file=sys.stderr)
        return 2
    with model:
        if not model.moe_layer_ids:
            print("guess_recall: the model has no MoE layer", file=sys.stderr)
            return 2
        if args.text:
            if model.tokenizer is None:
                print("guess_recall: --text needs a model with a tokenizer", file=sys.stderr)
                return 2
            runs = [lambda t=t: model.generate(model.tokenizer.encode(t), max_new_tokens=args.decode_tokens,
                                               ignore_eos=True, temperature=0.8, seed=1) for t in args.text]
        else:
            runs = [lambda p=p, c=c: model.generate(p, max_new_tokens=args.decode_tokens, ignore_eos=True, forced=c)
                    for p, c in bench_inputs(model.spec.vocab_size, args.prompt_tokens, args.decode_tokens,
                                             args.prompts)]
        result = recall(model, record(model, runs))
        k = model.spec.top_k
    if args.json:
        print(json.dumps({"top_k": [k, k + 2, k + 4], "recall": result}, indent=2))
    else:
        print(f"{'guess made from':74s} " + " ".join(f"top-{n:<3d}" for n in (k, k + 2, k + 4)))
        for name, r in result.items():
            print(f"{name:74s} " + " ".join(f"{v:7.3f}" for v in r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
