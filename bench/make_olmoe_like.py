"""A random-weight model with OLMoE-1B-7B's real dimensions, written as a Hugging Face folder.

Why random weights: no model downloads are possible here, and for speed only the shapes, the
formats and the routing matter.  Weights are N(0, 1/sqrt(fan_in)) so activations keep a sane
scale through 16 layers; every tensor gets its own seed (derived from its name), so any tensor
can be regenerated alone and the result does not depend on the order of writing.

The folder holds bf16 safetensors, one shard per layer, written tensor by tensor straight to
disk: the full model is ~13 GB in bf16 and this machine has 24 GiB shared, so nothing bigger than
one tensor is ever held in memory.  The q4_0 expert store (`mer-tui convert --quant q4_0`) and the
GGUF (bench/gguf_export.py) are both made from this folder, by the same quantizer.

    .venv/bin/python -m bench.make_olmoe_like /work/bench-models/olmoe-like-hf            # full size
    .venv/bin/python -m bench.make_olmoe_like /tmp/olmoe-small-hf --small
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

# Bumped when the weights a given (dims, seed) produce change, so cached folders are rebuilt.
BUILD_VERSION = 1
MARKER = "bench_build.json"


@dataclass(frozen=True)
class Dims:
    """The shape of an OLMoE-style model; the defaults are OLMoE-1B-7B's."""

    hidden: int = 2048
    layers: int = 16
    experts: int = 64
    width: int = 1024      # intermediate size of one expert
    top_k: int = 8
    heads: int = 16
    vocab: int = 50304
    context: int = 4096

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


FULL = Dims()
# Small enough to build in seconds and to compare logits against llama.cpp exactly; every row
# length is a multiple of 32 so q4_0 holds it.
SMALL = Dims(hidden=256, layers=2, experts=8, width=128, top_k=2, heads=4, vocab=1024, context=512)

EOS_ID = 1  # a plain token: decoding benchmarks ignore eos anyway


def hf_config(d: Dims) -> dict:
    """config.json as transformers writes it for OlmoeForCausalLM."""
    return {
        "architectures": ["OlmoeForCausalLM"],
        "model_type": "olmoe",
        "hidden_size": d.hidden,
        "intermediate_size": d.width,
        "num_hidden_layers": d.layers,
        "num_attention_heads": d.heads,
        "num_key_value_heads": d.heads,
        "num_experts": d.experts,
        "num_experts_per_tok": d.top_k,
        "norm_topk_prob": False,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "max_position_embeddings": d.context,
        "vocab_size": d.vocab,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "clip_qkv": None,
        "hidden_act": "silu",
        "output_router_logits": False,
        "router_aux_loss_coef": 0.01,
        "bos_token_id": None,
        "eos_token_id": EOS_ID,
        "pad_token_id": 0,
        "torch_dtype": "bfloat16",
    }


def tensor_plan(d: Dims) -> list[tuple[str, tuple[int, ...], int]]:
    """(HF name, shape, shard) of every tensor; shard 0 holds embeddings and the head, shard i+1 layer i."""
    H, W = d.hidden, d.width
    plan: list[tuple[str, tuple[int, ...], int]] = [
        ("model.embed_tokens.weight", (d.vocab, H), 0),
        ("model.norm.weight", (H,), 0),
        ("lm_head.weight", (d.vocab, H), 0),
    ]
    for i in range(d.layers):
        p, s = f"model.layers.{i}", i + 1
        plan += [
            (f"{p}.input_layernorm.weight", (H,), s),
            (f"{p}.self_attn.q_proj.weight", (H, H), s),
            (f"{p}.self_attn.k_proj.weight", (H, H), s),
            (f"{p}.self_attn.v_proj.weight", (H, H), s),
            (f"{p}.self_attn.o_proj.weight", (H, H), s),
            (f"{p}.self_attn.q_norm.weight", (H,), s),   # OLMoE: RMSNorm over the whole projection
            (f"{p}.self_attn.k_norm.weight", (H,), s),
            (f"{p}.post_attention_layernorm.weight", (H,), s),
            (f"{p}.mlp.gate.weight", (d.experts, H), s),
        ]
        for e in range(d.experts):
            plan += [
                (f"{p}.mlp.experts.{e}.gate_proj.weight", (W, H), s),
                (f"{p}.mlp.experts.{e}.up_proj.weight", (W, H), s),
                (f"{p}.mlp.experts.{e}.down_proj.weight", (H, W), s),
            ]
    return plan


def make_tensor(name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """The float32 values of one tensor (before bf16 rounding); deterministic in (name, seed).

    Uniform rather than normal draws, with the same standard deviation: they are ~3x cheaper and
    the full model needs 7 billion of them on two shared cores.
    """
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    x = rng.random(shape, dtype=np.float32)
    x -= np.float32(0.5)                      # U(-0.5, 0.5): standard deviation 1/sqrt(12)
    if len(shape) == 1:
        # Norm gains near 1, not exactly 1, so a swapped or missing norm would show in a logit check.
        x *= np.float32(0.2 * np.sqrt(12.0))
        x += np.float32(1.0)
        return x
    std = 1.0 if name == "model.embed_tokens.weight" else 1.0 / np.sqrt(shape[1])   # N(0, 1/sqrt(fan_in))-like
    x *= np.float32(std * np.sqrt(12.0))
    return x


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits (uint16), round to nearest even as torch and gguf-py do (no NaNs here)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).copy()
    u += np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))
    u >>= np.uint32(16)
    return u.astype(np.uint16)


class SafetensorsStream:
    """Writes one safetensors file tensor by tensor: the header is known up front, data streams after it."""

    def __init__(self, path: Path, entries: list[tuple[str, tuple[int, ...]]], dtype: str = "BF16", itemsize: int = 2):
        self.path = path
        self.order = [name for name, _ in entries]
        self.sizes: dict[str, int] = {}
        header: dict[str, dict] = {"__metadata__": {"format": "pt"}}  # type: ignore[dict-item]
        offset = 0
        for name, shape in entries:
            n = int(np.prod(shape)) * itemsize
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
            self.sizes[name] = n
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)   # keep the data 8-byte aligned, as the reference writer does
        self.f = open(path, "wb")
        self.f.write(len(raw).to_bytes(8, "little") + raw)
        self.next = 0

    def write(self, name: str, data: np.ndarray) -> None:
        if self.next >= len(self.order) or self.order[self.next] != name:
            raise RuntimeError(f"{self.path}: wrote {name} out of order")
        if data.nbytes != self.sizes[name]:
            raise RuntimeError(f"{self.path}: {name} has {data.nbytes} bytes, header says {self.sizes[name]}")
        np.ascontiguousarray(data).tofile(self.f)
        self.next += 1

    def close(self) -> None:
        if self.next != len(self.order):
            raise RuntimeError(f"{self.path}: only {self.next} of {len(self.order)} tensors written")
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()


def shard_name(s: int, n: int) -> str:
    return f"model-{s + 1:05d}-of-{n:05d}.safetensors"


def _marker(d: Dims, seed: int) -> dict:
    return {"version": BUILD_VERSION, "dims": asdict(d), "seed": seed}


def is_built(folder: Path, d: Dims, seed: int) -> bool:
    m = folder / MARKER
    try:
        return json.loads(m.read_text()) == _marker(d, seed)
    except (OSError, ValueError):
        return False


def build_hf(folder: str | Path, d: Dims = FULL, seed: int = 0, force: bool = False,
             log=print) -> Path:
    """Write the HF folder (cached: an existing folder built from the same dims and seed is kept)."""
    folder = Path(folder)
    if is_built(folder, d, seed) and not force:
        log(f"{folder}: already built, kept")
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    plan = tensor_plan(d)
    n_shards = d.layers + 1
    by_shard: dict[int, list[tuple[str, tuple[int, ...]]]] = {}
    for name, shape, s in plan:
        by_shard.setdefault(s, []).append((name, shape))
    weight_map: dict[str, str] = {}
    total = 0
    t0 = time.perf_counter()
    for s in range(n_shards):
        fname = shard_name(s, n_shards)
        out = SafetensorsStream(tmp / fname, by_shard[s])
        for name, shape in by_shard[s]:
            b = to_bf16(make_tensor(name, shape, seed))
            out.write(name, b)
            weight_map[name] = fname
            total += b.nbytes
        out.close()
        log(f"  shard {s + 1}/{n_shards}: {total / 1e9:.2f} GB written, {time.perf_counter() - t0:.0f} s")
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (tmp / "config.json").write_text(json.dumps(hf_config(d), indent=2))
    (tmp / "generation_config.json").write_text(json.dumps({"eos_token_id": EOS_ID}, indent=2))
    (tmp / MARKER).write_text(json.dumps(_marker(d, seed)))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def dims_for(small: bool) -> Dims:
    return SMALL if small else FULL


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="folder to write (a Hugging Face checkpoint)")
    p.add_argument("--small", action="store_true", help="a tiny model of the same architecture (for checks)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="rebuild even if a matching folder exists")
    args = p.parse_args(argv)
    build_hf(args.out, dims_for(args.small), args.seed, args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
