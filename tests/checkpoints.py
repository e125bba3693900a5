"""Builders of tiny random Hugging Face checkpoints (transformers is the reference here)."""
from __future__ import annotations

import json
from pathlib import Path

# Small enough to build in well under a second, varied enough to exercise every spec field.
_COMMON = dict(vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=512)
_MOE = dict(num_experts_per_tok=2, intermediate_size=48)

VARIANTS: dict[str, tuple[str, dict]] = {
    "mixtral": ("mixtral", dict(num_local_experts=6, rope_theta=1e6)),
    "mixtral-window": ("mixtral", dict(num_local_experts=4, sliding_window=5)),
    "olmoe": ("olmoe", dict(num_experts=8, norm_topk_prob=False)),
    "olmoe-clip-norm": ("olmoe", dict(num_experts=8, norm_topk_prob=True, clip_qkv=0.05)),
    "qwen2_moe": ("qwen2_moe", dict(num_experts=6, moe_intermediate_size=16, shared_expert_intermediate_size=40,
                                    decoder_sparse_step=1, mlp_only_layers=[1], norm_topk_prob=False)),
    "qwen2_moe-step": ("qwen2_moe", dict(num_experts=4, moe_intermediate_size=24,
                                         shared_expert_intermediate_size=24, decoder_sparse_step=2,
                                         norm_topk_prob=True, tie_word_embeddings=True)),
    "qwen3_moe": ("qwen3_moe", dict(num_experts=8, moe_intermediate_size=16, head_dim=16, norm_topk_prob=True,
                                    mlp_only_layers=[0], tie_word_embeddings=True)),
    "llama": ("llama", dict(tie_word_embeddings=True, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16, "rope_theta": 500000.0})),
    "mistral": ("mistral", dict(sliding_window=6)),
    "qwen2": ("qwen2", dict(tie_word_embeddings=False)),
    "qwen3": ("qwen3", dict(head_dim=12, tie_word_embeddings=True)),
}
# Rows of 256 weights, so that every block format (q4_k's super-blocks included) can hold them.
QUANT_VARIANT = ("mixtral", dict(hidden_size=256, intermediate_size=256, num_local_experts=4,
                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=128))


def _config(variant: str, **extra):
    import transformers

    model_type, kw = QUANT_VARIANT if variant == "quant" else VARIANTS[variant]
    kw = {**_COMMON, **(_MOE if "moe" in model_type or model_type == "mixtral" else {}), **kw, **extra}
    if model_type in ("llama", "mistral", "qwen2", "qwen3"):
        kw["intermediate_size"] = 56
    return transformers.AutoConfig.for_model(model_type, **kw)


def build_checkpoint(variant: str, out: Path, dtype: str = "float32", seed: int = 0, decisive: bool = True,
                     **extra) -> Path:
    """Save a randomly initialised model of `variant` into `out` with weights in `dtype`.

    decisive=False keeps transformers' own initialisation (std 0.02), whose gentle attention and
    routing respond to small weight errors about as trained models do; quality-vs-quantization
    tests use it, since the decisive init deliberately amplifies every difference.
    """
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = _config(variant, **extra)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    # Default init (std 0.02) gives near-uniform logits; a wider spread makes top-k routing and
    # greedy choices decisive, so a mismatch in any component shows up in the comparison.
    with torch.no_grad():
        for name, p in model.named_parameters() if decisive else ():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif p.ndim == 2:
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
            else:
                p.copy_(0.1 * torch.randn_like(p))
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(out)
    return out


def load_reference(folder: Path):
    """The transformers model in float32 with eager attention: the numbers we must match."""
    import torch
    import transformers

    m = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                          attn_implementation="eager")
    return m.eval()


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIALS = ["<|end|>", "<|user|>", "<|assistant|>", "<|system|>", "<|bos|>"]


def build_tokenizer(out: Path, vocab_size: int = 300):
    """A byte-level BPE tokenizer trained on a few sentences, with chat specials and a template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["the cat sat on the mat", "a dog ran in the park", "héllo wörld ünïcode — ok", "日本語のテキスト"]
    tok.train_from_iterator(text * 20, trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|end|>", "bos_token": "<|bos|>", "chat_template": CHAT_TEMPLATE,
    }))
    return tok
