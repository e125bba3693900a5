"""Demo models built on this machine: a large random MoE, written straight into the expert store format.

`stress_model()` is what `mer-tui launch --demo stress` opens: 8 layers x 32 experts of hidden 512 and
width 1024 in bf16 (768 MiB of experts, top-4 routing), built once into the user cache in seconds
(rebuilt when missing, incomplete, or of other parameters),
so the UI has an I/O-heavy model to show without a download.  The weights are random (the text
is gibberish); what matters is that the expert bytes are far larger than a small RAM budget.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from engine.store import (
    EXPERT_FILE,
    INDEX,
    RESIDENT_FILE,
    ExpertFileWriter,
    SafetensorsWriter,
    is_store,
    staged_folder,
    write_index,
)

Progress = Callable[[int, int], None]

SPECIALS = ["<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@dataclass(frozen=True)
class RandomMoE:
    """The shape of a random Mixtral-style model."""

    layers: int = 8
    experts: int = 32
    top_k: int = 4
    hidden: int = 512
    width: int = 1024
    heads: int = 8
    kv_heads: int = 4
    seed: int = 0
    # Embeddings this many octaves louder than the other weights: the current token then steers the
    # router, so routing spreads over the experts with some locality (at a quarter of the experts in
    # RAM, LRU hits about 60%) instead of collapsing onto a few, as in a random net left alone.
    embed_octaves: int = 3

    @property
    def vocab(self) -> int:
        return 256 + len(SPECIALS)

    @property
    def bundle_bytes(self) -> int:
        return 3 * self.hidden * self.width * 2

    @property
    def expert_bytes(self) -> int:
        return self.layers * self.experts * self.bundle_bytes


def _random_bf16(rng: np.random.Generator, rows: int, cols: int, octaves: int = 0) -> np.ndarray:
    """Random bf16 weights of magnitude about 2^octaves/sqrt(cols), made from integer bits (no float math).

    Sign and mantissa bits are random; the exponent spans four octaves just below that magnitude.
    """
    top = int(np.floor(np.log2(cols ** -0.5))) + octaves
    u = rng.integers(0, 1 << 16, size=(rows, cols), dtype=np.uint16)
    exp = (127 + top - 3 + ((u >> 7) & 3)).astype(np.uint16)
    return (u & np.uint16(0x807F)) | (exp << np.uint16(7))


def _config(m: RandomMoE) -> dict:
    return {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": m.vocab,
        "hidden_size": m.hidden, "intermediate_size": m.width, "num_hidden_layers": m.layers,
        "num_attention_heads": m.heads, "num_key_value_heads": m.kv_heads, "num_local_experts": m.experts,
        "num_experts_per_tok": m.top_k, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False, "bos_token_id": 256, "eos_token_id": 257, "torch_dtype": "bfloat16",
    }


def _tokenizer(folder: Path) -> None:
    """Byte-level tokenizer: the 256 byte symbols as ids 0..255, no merges, then the specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda c: _byte_of(c))
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|bos|>", "eos_token": "<|end|>", "add_bos_token": False}))
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)


def _byte_of(ch: str) -> int:
    """The byte a ByteLevel alphabet character stands for (GPT-2's bytes_to_unicode, inverted)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    c = ord(ch)
    if c in printable:
        return c
    rest = [b for b in range(256) if b not in printable]
    return rest[c - 256]


def build_random_store(folder: str | Path, m: RandomMoE = RandomMoE(), force: bool = False,
                       progress: Progress | None = None) -> Path:
    """Write a random Mixtral-style model of shape `m` as an expert store into `folder` (staged, renamed)."""
    from engine.spec import spec_from_config

    folder = Path(folder)
    rng = np.random.default_rng(m.seed)
    cfg = _config(m)
    spec = spec_from_config(cfg)
    H, W, E = m.hidden, m.width, m.experts
    hd = H // m.heads
    resident: list[tuple[str, tuple[int, int]]] = [("model.embed_tokens.weight", (m.vocab, H))]
    for i in range(m.layers):
        p = f"model.layers.{i}"
        resident += [(f"{p}.input_layernorm.weight", (H,)), (f"{p}.post_attention_layernorm.weight", (H,)),
                     (f"{p}.self_attn.q_proj.weight", (m.heads * hd, H)),
                     (f"{p}.self_attn.k_proj.weight", (m.kv_heads * hd, H)),
                     (f"{p}.self_attn.v_proj.weight", (m.kv_heads * hd, H)),
                     (f"{p}.self_attn.o_proj.weight", (H, m.heads * hd)),
                     (f"{p}.block_sparse_moe.gate.weight", (E, H))]
    resident += [("model.norm.weight", (H,)), ("lm_head.weight", (m.vocab, H))]
    total = m.expert_bytes + sum(2 * int(np.prod(s)) for _, s in resident)
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total)

    with staged_folder(folder, force) as tmp:
        (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
        (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": 256, "eos_token_id": 257}))
        _tokenizer(tmp)
        entries = [(n, "BF16", s, 2 * int(np.prod(s))) for n, s in resident]
        st = SafetensorsWriter(tmp / RESIDENT_FILE, entries)
        for name, shape in resident:
            st.begin(name)
            if len(shape) == 1:   # norms near 1
                w = (np.float32(1.0) + rng.standard_normal(shape[0], np.float32) * 0.05).view(np.uint32)
                st.write((w >> 16).astype(np.uint16))
            else:
                st.write(_random_bf16(rng, *shape, octaves=m.embed_octaves if "embed" in name else 0))
            advance(2 * int(np.prod(shape)))
        st.close()
        ef = ExpertFileWriter(tmp / EXPERT_FILE)
        for i in range(m.layers):
            for e in range(E):
                ef.begin_bundle(i, e)
                for shape in ((W, H), (W, H), (H, W)):
                    ef.begin_part("bf16", shape)
                    ef.write(_random_bf16(rng, *shape))
                    advance(2 * shape[0] * shape[1])
                ef.end_bundle()
        ef.close()
        write_index(tmp, ef, spec, "bf16", None, {"random": asdict(m)})
    return folder


STRESS = RandomMoE()
STRESS_NAME = "demo-stress-v1"


def stress_model(progress: Progress | None = None) -> Path:
    """The stress demo's folder, built on first use into the user cache (MER_TUI_CACHE_DIR overrides it),
    rebuilt if missing, incomplete or of other parameters."""
    import os

    from platformdirs import user_cache_dir

    folder = Path(os.environ.get("MER_TUI_CACHE_DIR") or user_cache_dir("mer-tui")) / STRESS_NAME
    if _complete(folder):
        if progress:
            progress(STRESS.expert_bytes, STRESS.expert_bytes)
        return folder
    return build_random_store(folder, STRESS, force=True, progress=progress)


def _complete(folder: Path) -> bool:
    """Whether a previous build finished: the index is written last (then the folder renamed), so an
    index that opens and an expert file of the size it names mean a whole store."""
    if not is_store(folder):
        return False
    try:
        index = json.loads((folder / INDEX).read_text())
        need = int(index["expert_file_bytes"])
        return (folder / EXPERT_FILE).stat().st_size == need and (folder / RESIDENT_FILE).is_file() \
            and (folder / "tokenizer.json").is_file() and index.get("random") == asdict(STRESS)
    except (OSError, ValueError, KeyError, TypeError):
        return False
