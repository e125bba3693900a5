"""How a model routes while it decodes: per MoE layer, how evenly its picks spread over the experts.

Decoding of `--decode-tokens` tokens after a random prompt, both from `mer-tui bench`'s inputs (the
continuation forced, as the benchmarks decode it: greedy decoding of random weights loops), with
every expert in RAM;
the engine's routing telemetry hook counts each decode token's top-k picks. Per layer it prints the
entropy of the picks (log2 of the expert count when spread evenly), the share of picks on the
busiest 31% of the experts (the share of OLMoE's experts the side-by-side suite's cache holds), and
how many experts a token shares with the one before it. A cache's hit rate follows from these, so
the side-by-side suite's hit rates say how this model routes, not how every model does.

    .venv/bin/python -m bench.routing_stats --model /work/bench-models/olmoe-like-q4_0-dense-q8_0
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

import engine


def routing_stats(model, prompt_tokens: int = 32, decode_tokens: int = 64) -> dict:
    """Decode mer-tui bench's first inputs and summarize each MoE layer's picks (see the module docstring)."""
    from mer_tui.bench import bench_inputs

    E, L = model.spec.num_experts, model.spec.num_layers
    counts = np.zeros((L, E))
    picks: dict[int, list[set[int]]] = {}
    telemetry = model._telemetry
    record = telemetry.routed

    def routed(layer: int, top: np.ndarray) -> None:
        if top.shape[0] == 1:   # decode steps only: a prompt's pass routes all its tokens at once
            counts[layer, top[0]] += 1
            picks.setdefault(layer, []).append(set(top[0].tolist()))
        record(layer, top)

    telemetry.routed = routed
    try:
        prompt, continuation = bench_inputs(model.spec.vocab_size, prompt_tokens, decode_tokens, 1)[0]
        decoded = sum(1 for _ in model.generate(prompt, max_new_tokens=decode_tokens, ignore_eos=True,
                                                forced=continuation))
    finally:
        del telemetry.routed   # the class's method again
    busiest = max(1, round(0.31 * E))
    layers = []
    for layer in sorted(picks):
        p = counts[layer] / counts[layer].sum()
        nz = p[p > 0]
        seq = picks[layer]
        layers.append({
            "layer": layer,
            "picks": int(counts[layer].sum()),
            "entropy_bits": float(-(nz * np.log2(nz)).sum()),
            "busiest_share": float(np.sort(p)[::-1][:busiest].sum()),
            "shared_with_previous": float(np.mean([len(a & b) for a, b in zip(seq, seq[1:])])) if len(seq) > 1
            else 0.0,
        })
    return {"decode_tokens": decoded, "experts": E, "top_k": model.spec.top_k, "busiest_experts": busiest,
            "even_entropy_bits": float(np.log2(E)), "layers": layers}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.routing_stats", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    with engine.load(args.model) as model:
        res = routing_stats(model, args.prompt_tokens, args.decode_tokens)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"{res['decode_tokens']} decode tokens; {res['experts']} experts, top-{res['top_k']}; an even spread "
          f"has {res['even_entropy_bits']:.2f} bits")
    print(f"layer  entropy (bits)  share on the busiest {res['busiest_experts']}  "
          "experts shared with the previous token")
    for r in res["layers"]:
        print(f"{r['layer']:5d}  {r['entropy_bits']:14.2f}  {r['busiest_share']:24.2f}  "
              f"{r['shared_with_previous']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
