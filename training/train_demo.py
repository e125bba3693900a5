"""Train the embedded demo MoE (a 4-layer Mixtral-style model) and write it as an HF folder.

    .venv/bin/python -m training.train_demo --seed 0 --out assets/demo

Training-time only (torch, transformers); the app never imports this.  The run is bounded by a
token budget (--tokens) so that its result does not depend on how busy the shared cores are, and
capped by wall time (--minutes): the learning-rate schedule (warmup, then cosine) follows whichever
budget is further spent, so a run cut short by the cap still ends at a low learning rate.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import random
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, MixtralConfig, MixtralForCausalLM

from training.corpus import CHAT_TEMPLATE, END, PAD, SPECIAL_TOKENS, corpus_text, names_fact, render

VOCAB = 512


def build_tokenizer(texts: list[str], vocab_size: int = VOCAB) -> Tokenizer:
    """Byte-level BPE with the chat's special tokens at ids 0..4 (pad, end, user, assistant, system)."""
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False: the chat template puts text straight after "\n", as written.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    return tok


def model_config(vocab_size: int, *, hidden: int = 128, layers: int = 4, experts: int = 8,
                 ffn: int = 256, max_len: int = 512) -> MixtralConfig:
    end_id, pad_id = SPECIAL_TOKENS.index(END), SPECIAL_TOKENS.index(PAD)
    return MixtralConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
        num_local_experts=experts, num_experts_per_tok=2, max_position_embeddings=max_len,
        rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        # The template has no BOS: a chat starts with its first role token.
        bos_token_id=None, eos_token_id=end_id, pad_token_id=pad_id,
        output_router_logits=True, router_aux_loss_coef=0.02,
    )


def make_batches(ids: list[list[int]], tokens_per_batch: int, rng: random.Random) -> list[list[int]]:
    """Index lists of documents of similar length, so padding wastes little compute.

    One document per row, starting at position 0, exactly as a chat is seen at inference.
    """
    order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), rng.random()))
    batches, cur, cur_max = [], [], 0
    for i in order:
        n = len(ids[i])
        if cur and max(cur_max, n) * (len(cur) + 1) > tokens_per_batch:
            batches.append(cur)
            cur, cur_max = [], 0
        cur.append(i)
        cur_max = max(cur_max, n)
    if cur:
        batches.append(cur)
    rng.shuffle(batches)
    return batches


def collate(ids: list[list[int]], batch: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids[i]) for i in batch)
    x = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for r, i in enumerate(batch):
        x[r, : len(ids[i])] = torch.tensor(ids[i])
        mask[r, : len(ids[i])] = 1
    labels = x.masked_fill(mask == 0, -100)
    return {"input_ids": x, "attention_mask": mask, "labels": labels}


def lr_at(frac: float, step: int, peak: float, warmup: int) -> float:
    """Linear warmup over `warmup` steps, then cosine to 10% of peak over the time budget."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def save(model: MixtralForCausalLM, tok: Tokenizer, out: Path, max_len: int) -> None:
    """Write a plain HF folder: config, bf16 safetensors, tokenizer, chat template, generation config."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    model.generation_config = GenerationConfig(
        eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id, bos_token_id=None,
        do_sample=False, max_new_tokens=128,
    )
    bf16 = copy.deepcopy(model).to(torch.bfloat16)  # a copy: training goes on in fp32
    bf16.config.output_router_logits = False  # inference default; training turns it on
    bf16.save_pretrained(out, safe_serialization=True)
    tok.save(str(out / "tokenizer.json"))
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None, "eos_token": END, "pad_token": PAD, "unk_token": None,
        "additional_special_tokens": SPECIAL_TOKENS[2:],
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": END, "pad_token": PAD, "additional_special_tokens": SPECIAL_TOKENS[2:]}, indent=2) + "\n")


class ThreadTuner:
    """Picks 1 or 2 torch threads by measured throughput, re-probing now and then.

    The cores are shared with other jobs; when they are busy, two threads that wait on each
    other at every barrier run several times slower than one.  A fixed count (> 0) disables this.
    """

    def __init__(self, fixed: int, window_s: float = 20.0, probe_every: int = 6) -> None:
        self.fixed, self.window_s, self.probe_every = fixed, window_s, probe_every
        self.choices = [1, 2] if fixed <= 0 else [fixed]
        self.rate = {c: 0.0 for c in self.choices}
        self.current = self.choices[-1]
        self.best = self.current
        self.windows = 0
        self._begin_window()

    def _begin_window(self) -> None:
        torch.set_num_threads(self.current)
        self.t0, self.tokens = time.time(), 0

    def record(self, tokens: int) -> None:
        self.tokens += tokens
        el = time.time() - self.t0
        if el < self.window_s or len(self.choices) == 1:
            return
        r = self.tokens / el
        old = self.rate[self.current]
        self.rate[self.current] = r if old == 0.0 else 0.5 * old + 0.5 * r
        self.windows += 1
        self.best = max(self.choices, key=lambda c: self.rate[c])
        untried = [c for c in self.choices if self.rate[c] == 0.0]
        if untried:
            self.current = untried[0]
        elif self.windows % self.probe_every == 0:
            self.current = min(self.choices, key=lambda c: self.rate[c])  # re-probe the loser
        else:
            self.current = self.best
        self._begin_window()


def qa_probe(model: MixtralForCausalLM, tok: Tokenizer, n: int = 20) -> float:
    """Share of `n` unseen story questions answered right, greedy: a cheap progress signal."""
    from training.evaluate_demo import qa_questions

    model.eval()
    right = 0
    for user, word, kind in qa_questions(n):
        ids = torch.tensor([tok.encode(render([{"role": "user", "content": user}], True)).ids])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=12, do_sample=False,
                                 eos_token_id=model.config.eos_token_id, pad_token_id=model.config.pad_token_id)
        right += names_fact(tok.decode(out[0, ids.shape[1]:].tolist()), word, kind)
    return right / n


def train(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    t0 = time.time()

    texts = corpus_text(args.seed, args.dialogues)
    tok = build_tokenizer(texts[: min(len(texts), 20000)])
    ids = [e.ids for e in tok.encode_batch(texts)]
    long = sum(len(x) > args.max_len for x in ids)
    ids = [x for x in ids if len(x) <= args.max_len]
    n_tok = sum(map(len, ids))
    print(f"corpus: {len(ids)} dialogues, {n_tok / 1e6:.2f}M tokens ({long} over {args.max_len} dropped), "
          f"vocab {tok.get_vocab_size()}, built in {time.time() - t0:.0f}s", flush=True)

    cfg = model_config(tok.get_vocab_size(), max_len=512)
    # grouped_mm: one batched matmul per projection instead of a Python loop over experts.
    model = MixtralForCausalLM._from_config(cfg, experts_implementation="grouped_mm")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters", flush=True)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))

    budget = args.minutes * 60.0
    threads = ThreadTuner(args.threads)
    start = time.time()
    step, epoch, seen, ema = 0, 0, 0, None
    last_print = last_save = start
    model.train()
    done = False
    while not done:
        for b in make_batches(ids, args.batch_tokens, rng):
            frac = max((time.time() - start) / budget, seen / args.tokens)
            if frac >= 1.0:
                done = True
                break
            lr = lr_at(frac, step, args.lr, args.warmup)
            for g in opt.param_groups:
                g["lr"] = lr
            batch = collate(ids, b, cfg.pad_token_id)
            out = model(**batch)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            n = int(batch["attention_mask"].sum())
            seen += n
            threads.record(n)
            lm = out.loss.item() - cfg.router_aux_loss_coef * out.aux_loss.item()
            ema = lm if ema is None else 0.98 * ema + 0.02 * lm
            now = time.time()
            if now - last_print >= args.log_every or step == 1:
                el = now - start
                print(f"step {step:6d} epoch {epoch} {el / 60:5.1f}min tokens {seen / 1e6:6.2f}M "
                      f"loss {lm:.4f} (ema {ema:.4f}) aux {out.aux_loss.item():.3f} lr {lr:.2e} "
                      f"{seen / el:.0f} tok/s, {torch.get_num_threads()} threads", flush=True)
                last_print = now
            if now - last_save >= args.save_every:
                save(model, tok, Path(args.out), 512)
                print(f"checkpoint: QA probe {qa_probe(model, tok):.0%} right", flush=True)
                model.train()
                last_save = time.time()
        epoch += 1
    el = time.time() - start
    print(f"done: {step} steps, {epoch} epochs started, {seen / 1e6:.2f}M tokens in {el / 60:.1f} min, "
          f"final loss (ema) {ema:.4f}", flush=True)
    save(model, tok, Path(args.out), 512)
    print(f"wrote {args.out} ({sum(f.stat().st_size for f in Path(args.out).iterdir()) / 1e6:.2f} MB)",
          flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=float, default=6e6, help="training budget in (unpadded) tokens")
    p.add_argument("--minutes", type=float, default=60.0, help="wall-time cap on training")
    p.add_argument("--seed", type=int, default=0, help="seeds the corpus, the init and the batch order")
    p.add_argument("--out", default="assets/demo", help="output HF folder")
    p.add_argument("--dialogues", type=int, default=60_000, help="corpus size in dialogues")
    p.add_argument("--max-len", type=int, default=512, help="longest dialogue kept, in tokens")
    p.add_argument("--batch-tokens", type=int, default=2048, help="padded tokens per batch")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=100, help="warmup steps")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads; 0 = pick 1 or 2 by measured speed (shared cores)")
    p.add_argument("--log-every", type=float, default=20.0, help="seconds between loss lines")
    p.add_argument("--save-every", type=float, default=600.0, help="seconds between checkpoints")
    train(p.parse_args(argv))


if __name__ == "__main__":
    main()
