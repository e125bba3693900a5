"""Measure the demo model: question answering, a told story, and how evenly it routes.

    .venv/bin/python -m training.evaluate_demo --model assets/demo [--backend engine] [--routing]

Questions come from the corpus generator with a seed training never used (training uses small
seeds; EVAL_SEED is far from them), decoded greedily.  Routing entropy is measured with
transformers (output_router_logits), over the tokens of generated chat turns.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Callable
from pathlib import Path

from training.corpus import make_dialogues, make_qa, make_question, make_story, names_fact, sentences, vocabulary

EVAL_SEED = 1_000_003
QA_KINDS = ("place", "colour", "animal", "feeling")

# generate(messages, max_new_tokens) -> (reply text, stopped at the end-of-turn token)
Generate = Callable[[list[dict[str, str]], int], tuple[str, bool]]


def engine_generator(model_dir: str) -> Generate:
    import engine

    model = engine.load(model_dir)
    tok = model.tokenizer

    def generate(messages: list[dict[str, str]], max_new: int) -> tuple[str, bool]:
        ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))
        out = list(model.generate(ids, max_new_tokens=max_new, temperature=0.0))
        # The engine does not yield eos: stopping short of max_new means it met it.
        return tok.decode(out), len(out) < max_new

    return generate


def transformers_generator(model_dir: str) -> Generate:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    eos = model.config.eos_token_id

    def generate(messages: list[dict[str, str]], max_new: int) -> tuple[str, bool]:
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=max_new, do_sample=False, eos_token_id=eos,
                                 pad_token_id=model.config.pad_token_id)[0, ids.shape[1]:].tolist()
        stopped = eos in out
        if stopped:
            out = out[: out.index(eos)]
        return tok.decode(out, skip_special_tokens=True), stopped

    return generate


def qa_questions(n: int = 100, seed: int = EVAL_SEED) -> list[tuple[str, str, str]]:
    """`n` (user text, expected word, kind), the four tested kinds in turn."""
    rng = random.Random(seed)
    return [make_qa(rng, QA_KINDS[i % len(QA_KINDS)]) for i in range(n)]


def qa_accuracy(generate: Generate, n: int = 100, seed: int = EVAL_SEED, max_new: int = 16) -> dict:
    per_kind: dict[str, list[int]] = {k: [0, 0] for k in QA_KINDS}
    misses = []
    for user, word, kind in qa_questions(n, seed):
        reply, _ = generate([{"role": "user", "content": user}], max_new)
        ok = names_fact(reply, word, kind)
        per_kind[kind][0] += ok
        per_kind[kind][1] += 1
        if not ok:
            misses.append({"question": user.split(".")[-1].strip() or user[-40:], "want": word, "got": reply})
    right = sum(v[0] for v in per_kind.values())
    return {"accuracy": right / n, "per_kind": {k: v[0] / max(v[1], 1) for k, v in per_kind.items()},
            "misses": misses[:10]}


def second_story_accuracy(generate: Generate, n: int = 40, seed: int = EVAL_SEED + 2) -> float:
    """Share right when a second story is told later in the same chat: answers must follow it."""
    rng = random.Random(seed)
    right = 0
    for i in range(n):
        first = make_story(rng)
        q, a = make_question(rng, first, QA_KINDS[(i + 1) % 4])
        user, word, kind = make_qa(rng, QA_KINDS[i % 4])
        chat = [{"role": "user", "content": f"{first.text} {q}"}, {"role": "assistant", "content": a},
                {"role": "user", "content": user}]
        reply, _ = generate(chat, 16)
        right += names_fact(reply, word, kind)
    return right / n


def story_check(generate: Generate, prompt: str = "Tell me a story.", max_new: int = 160) -> dict:
    reply, stopped = generate([{"role": "user", "content": prompt}], max_new)
    words = [w for w in reply.lower().replace(".", " ").replace(",", " ").split() if w]
    known = vocabulary()
    unknown = sorted({w.strip("!?") for w in words} - known - {""})
    return {"prompt": prompt, "reply": reply, "stopped_at_end": stopped,
            "sentences": len(sentences(reply)), "unknown_words": unknown}


def routing_entropy(model_dir: str, turns: int = 200, seed: int = EVAL_SEED + 1, max_new: int = 96) -> dict:
    """Entropy (bits) of the experts' share of top-k picks per layer, over generated chat turns.

    Counts every token the model processed in those turns (the prompt and its reply); the maximum
    for 8 experts is 3 bits, which would be perfectly even use.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    cfg = model.config
    counts = torch.zeros(cfg.num_hidden_layers, cfg.num_local_experts)
    gen_counts = torch.zeros_like(counts)
    for dialogue in make_dialogues(seed, turns):
        first_user = next(i for i, m in enumerate(dialogue) if m["role"] == "user")
        text = tok.apply_chat_template(dialogue[: first_user + 1], add_generation_prompt=True, tokenize=False)
        ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
        with torch.no_grad():
            full = model.generate(ids, max_new_tokens=max_new, do_sample=False, eos_token_id=cfg.eos_token_id,
                                  pad_token_id=cfg.pad_token_id)
            out = model(full, output_router_logits=True)
        for layer, logits in enumerate(out.router_logits):
            picks = logits.topk(cfg.num_experts_per_tok, dim=-1).indices
            counts[layer] += torch.bincount(picks.flatten(), minlength=cfg.num_local_experts)
            gen = picks[ids.shape[1]:]
            gen_counts[layer] += torch.bincount(gen.flatten(), minlength=cfg.num_local_experts)

    def entropy(row: torch.Tensor) -> float:
        p = row / row.sum()
        return float(-(p[p > 0] * p[p > 0].log2()).sum())

    return {"turns": turns, "max_bits": math.log2(cfg.num_local_experts),
            "bits_per_layer": [round(entropy(r), 3) for r in counts],
            "bits_per_layer_generated": [round(entropy(r), 3) for r in gen_counts],
            "share_per_layer": [[round(float(x), 3) for x in r / r.sum()] for r in counts],
            "tokens": int(counts[0].sum()) // cfg.num_experts_per_tok}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="assets/demo")
    p.add_argument("--backend", choices=["transformers", "engine"], default="transformers")
    p.add_argument("--n", type=int, default=100, help="questions")
    p.add_argument("--seed", type=int, default=EVAL_SEED)
    p.add_argument("--routing", action="store_true", help="also measure routing entropy (slow)")
    p.add_argument("--json", help="write the results here too")
    args = p.parse_args(argv)
    gen = (engine_generator if args.backend == "engine" else transformers_generator)(args.model)
    t0 = time.time()
    res = {"backend": args.backend, "qa": qa_accuracy(gen, args.n, args.seed)}
    res["qa_seconds"] = round(time.time() - t0, 1)
    res["second_story_accuracy"] = second_story_accuracy(gen)
    res["stories"] = [story_check(gen, pr) for pr in
                      ("Tell me a story.", "Tell me a story about a fox.", "Can you tell me a story?")]
    if args.routing:
        t0 = time.time()
        res["routing"] = routing_entropy(args.model)
        res["routing_seconds"] = round(time.time() - t0, 1)
    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
