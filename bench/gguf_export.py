"""An OLMoE Hugging Face folder (bf16 safetensors) -> a GGUF llama.cpp loads, experts in q4_0.

A small stand-in for llama.cpp's convert_hf_to_gguf.py (OlmoeModel) + llama-quantize, written
because neither is installable here and because the benchmark needs the GGUF to hold *the same
q4_0 bytes* as our expert store: both are quantized from the same bf16 values by the same
quantizer (kernels.quantize, byte-identical to ggml's reference; gguf-py's as a fallback), and
`verify_same_experts` checks it against a converted store.

What llama.cpp's OLMoE loader expects (src/models/olmoe.cpp, conversion/olmo.py):
- experts merged per layer into blk.N.ffn_{gate,up,down}_exps of ggml shape {in, out, n_expert}
  (numpy (n_expert, out, in)); router blk.N.ffn_gate_inp {n_embd, n_expert};
- attn_q/attn_k/attn_v/attn_output, attn_q_norm/attn_k_norm over the whole projection
  ({n_embd}), attn_norm, ffn_norm, token_embd, output_norm, output;
- no Q/K permutation: OLMoE uses NEOX-style rope, the same rotate-half as Hugging Face;
- a gpt2 (byte-level BPE) vocabulary with merges; we generate a trivial one (benchmarks feed ids).

Memory stays at about one merged expert tensor (3 x 75 MB at full size): tensors are read from
the safetensors shards through np.memmap and written one by one.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import gguf
import numpy as np

import kernels
from kernels import formats

# Formats a matrix may take here; norms and routers stay f32 as in llama.cpp's own conversions.
DENSE_FORMATS = ("bf16", "f16", "f32", "q8_0", "q4_0")
_GGML = {
    "f32": gguf.GGMLQuantizationType.F32,
    "f16": gguf.GGMLQuantizationType.F16,
    "bf16": gguf.GGMLQuantizationType.BF16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
    "q4_0": gguf.GGMLQuantizationType.Q4_0,
}


class SafetensorsFolder:
    """Read-only access to the tensors of a folder of safetensors shards, via np.memmap (no copies)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.where: dict[str, tuple[Path, dict, int]] = {}
        for path in sorted(folder.glob("*.safetensors")):
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
            for name, info in header.items():
                if name != "__metadata__":
                    self.where[name] = (path, info, 8 + n)

    def f32(self, name: str) -> np.ndarray:
        path, info, base = self.where[name]
        a, b = info["data_offsets"]
        shape = tuple(info["shape"])
        dtype = info["dtype"]
        if dtype == "BF16":
            u = np.memmap(path, np.uint16, "r", base + a, shape)
            return (u.astype(np.uint32) << 16).view(np.float32)
        np_dtype = {"F32": np.float32, "F16": np.float16}[dtype]
        return np.memmap(path, np_dtype, "r", base + a, shape).astype(np.float32)


def quantize(x: np.ndarray, fmt: str) -> np.ndarray:
    """float32 (rows, cols) -> uint8 bytes in `fmt`, with the project's quantizer when it has `fmt`."""
    try:
        return kernels.quantize(x, fmt)
    except (kernels.FormatError, NotImplementedError):
        # gguf-py's reference quantizers; byte-identical to kernels' for f16/bf16/q8_0/q4_0 (tested there).
        return gguf.quants.quantize(np.ascontiguousarray(x, dtype=np.float32), _GGML[fmt])


# The GPT-2 byte-to-unicode map: byte-level BPE vocabularies spell every byte as one printable char.
def _bytes_to_unicode() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def trivial_vocab(n_vocab: int) -> tuple[list[str], list[str]]:
    """(tokens, merges) of a valid byte-level BPE vocabulary with exactly n_vocab tokens.

    The 256 byte tokens come first, then every lowercase string of length 2, 3, 4... in order;
    each of those is one merge of its prefix (already a token) with its last letter."""
    tokens = _bytes_to_unicode()
    merges: list[str] = []
    letters = "abcdefghijklmnopqrstuvwxyz"
    level = list(letters)
    while len(tokens) < n_vocab:
        nxt = []
        for prefix in level:
            for c in letters:
                if len(tokens) == n_vocab:
                    break
                tokens.append(prefix + c)
                merges.append(f"{prefix} {c}")
                nxt.append(prefix + c)
        level = nxt
    return tokens[:n_vocab], merges


def _plan(cfg: dict) -> list[tuple[str, str, tuple[int, ...], str]]:
    """(gguf name, source, numpy shape, kind) in file order; kind: dense, norm, router, experts."""
    H, W, E, V, L = (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_experts"], cfg["vocab_size"],
                     cfg["num_hidden_layers"])
    KV = cfg["num_key_value_heads"] * (H // cfg["num_attention_heads"])
    plan = [("token_embd.weight", "model.embed_tokens.weight", (V, H), "dense")]
    for i in range(L):
        p = f"model.layers.{i}"
        plan += [
            (f"blk.{i}.attn_norm.weight", f"{p}.input_layernorm.weight", (H,), "norm"),
            (f"blk.{i}.attn_q.weight", f"{p}.self_attn.q_proj.weight", (H, H), "dense"),
            (f"blk.{i}.attn_k.weight", f"{p}.self_attn.k_proj.weight", (KV, H), "dense"),
            (f"blk.{i}.attn_v.weight", f"{p}.self_attn.v_proj.weight", (KV, H), "dense"),
            (f"blk.{i}.attn_output.weight", f"{p}.self_attn.o_proj.weight", (H, H), "dense"),
            (f"blk.{i}.attn_q_norm.weight", f"{p}.self_attn.q_norm.weight", (H,), "norm"),
            (f"blk.{i}.attn_k_norm.weight", f"{p}.self_attn.k_norm.weight", (KV,), "norm"),
            (f"blk.{i}.ffn_norm.weight", f"{p}.post_attention_layernorm.weight", (H,), "norm"),
            (f"blk.{i}.ffn_gate_inp.weight", f"{p}.mlp.gate.weight", (E, H), "router"),
            (f"blk.{i}.ffn_gate_exps.weight", f"{p}.mlp.experts.{{e}}.gate_proj.weight", (E, W, H), "experts"),
            (f"blk.{i}.ffn_up_exps.weight", f"{p}.mlp.experts.{{e}}.up_proj.weight", (E, W, H), "experts"),
            (f"blk.{i}.ffn_down_exps.weight", f"{p}.mlp.experts.{{e}}.down_proj.weight", (E, H, W), "experts"),
        ]
    plan += [("output_norm.weight", "model.norm.weight", (H,), "norm"),
             ("output.weight", "lm_head.weight", (V, H), "dense")]
    return plan


def _byte_shape(shape: tuple[int, ...], fmt: str) -> tuple[int, ...]:
    return (*shape[:-1], kernels.row_bytes(fmt, shape[-1]))


def export_gguf(hf_dir: str | Path, out: str | Path, *, expert_fmt: str = "q4_0", dense_fmt: str = "bf16",
                embed_fmt: str | None = None, experts_from: str | Path | None = None, force: bool = False,
                log=print) -> Path:
    """Write `out` from the OLMoE folder `hf_dir` (cached: kept when built from the same inputs).

    `experts_from`: a GGUF exported earlier from the same folder whose expert tensors are copied
    instead of quantized again (same bytes, minutes saved) - for variants that differ in dense formats."""
    hf_dir, out = Path(hf_dir), Path(out)
    cfg = json.loads((hf_dir / "config.json").read_text())
    if cfg.get("model_type") != "olmoe":
        raise ValueError(f"{hf_dir}/config.json: model_type {cfg.get('model_type')!r}, expected 'olmoe'")
    stamp = {"source": str(hf_dir.resolve()), "source_mtime": (hf_dir / "config.json").stat().st_mtime,
             "expert_fmt": expert_fmt, "dense_fmt": dense_fmt, "embed_fmt": embed_fmt or dense_fmt,
             "experts_from": str(experts_from) if experts_from else None}
    stamp_path = out.with_name(out.name + ".json")
    if out.exists() and not force and stamp_path.exists() and json.loads(stamp_path.read_text()) == stamp:
        log(f"{out}: already exported, kept")
        return out
    src = SafetensorsFolder(hf_dir)
    H, heads = cfg["hidden_size"], cfg["num_attention_heads"]

    tmp = out.with_name(out.name + ".tmp")
    w = gguf.GGUFWriter(tmp, "olmoe")
    w.add_name("olmoe-like random (mer-tui bench)")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg.get("max_position_embeddings", 4096))
    w.add_embedding_length(H)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(float(cfg.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-5)))
    w.add_expert_count(cfg["num_experts"])
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    w.add_file_type({"q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                     "bf16": gguf.LlamaFileType.MOSTLY_BF16, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "f32": gguf.LlamaFileType.ALL_F32}[expert_fmt])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokens, merges = trivial_vocab(cfg["vocab_size"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.NORMAL] * len(tokens))
    w.add_token_merges(merges)
    eos = cfg.get("eos_token_id")
    w.add_eos_token_id(int(eos[0] if isinstance(eos, list) else eos if eos is not None else 1))
    w.add_bos_token_id(int(eos[0] if isinstance(eos, list) else eos if eos is not None else 1))
    w.add_add_bos_token(False)

    plan = _plan(cfg)
    fmt_of: dict[str, str] = {}
    for gname, _, shape, kind in plan:
        fmt = {"dense": dense_fmt, "norm": "f32", "router": "f32", "experts": expert_fmt}[kind]
        if gname == "token_embd.weight" and embed_fmt:
            fmt = embed_fmt
        fmt_of[gname] = fmt
        # Every tensor goes in as raw bytes with its ggml type: one path for floats and blocks alike.
        bshape = _byte_shape(shape, fmt)
        w.add_tensor_info(gname, bshape, np.dtype(np.uint8), int(np.prod(bshape)), raw_dtype=_GGML[fmt])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()

    ref = {t.name: t for t in gguf.GGUFReader(str(experts_from)).tensors} if experts_from else {}
    t0 = time.perf_counter()
    for n, (gname, sname, shape, kind) in enumerate(plan):
        fmt = fmt_of[gname]
        if kind == "experts" and gname in ref and ref[gname].tensor_type == _GGML[fmt]:
            w.write_tensor_data(np.ascontiguousarray(ref[gname].data).reshape(_byte_shape(shape, fmt)))
        elif kind == "experts":
            merged = np.empty(_byte_shape(shape, fmt), np.uint8)
            for e in range(shape[0]):
                merged[e] = quantize(src.f32(sname.format(e=e)), fmt)
            w.write_tensor_data(merged)
        else:
            x = src.f32(sname)
            w.write_tensor_data(quantize(x.reshape(1, -1) if x.ndim == 1 else x, fmt))
        if gname.endswith("ffn_down_exps.weight"):
            log(f"  {gname}: {n + 1}/{len(plan)} tensors, {time.perf_counter() - t0:.0f} s")
    w.close()
    tmp.rename(out)
    stamp_path.write_text(json.dumps(stamp))
    return out


def _as_gguf(q) -> tuple[str, np.ndarray]:
    """A QMatrix's GGUF format name and its bytes in GGUF's row order (an x8 layout de-interleaved)."""
    data = np.asarray(q.data).reshape(q.rows, -1)
    if q.fmt in formats.INTERLEAVED:
        data = formats.deinterleave(data, q.fmt)
    return kernels.gguf_format(q.fmt), data


def verify_same_experts(gguf_path: str | Path, model, pairs: list[tuple[int, int]]) -> None:
    """Check that the GGUF's expert bytes equal what our engine serves for these (layer, expert) pairs
    (the engine's x8 layouts hold the GGUF format's bytes interleaved: compared de-interleaved)."""
    reader = gguf.GGUFReader(str(gguf_path))
    by_name = {t.name: t for t in reader.tensors}
    for layer, e in pairs:
        bundle = model.experts.get(layer, [e])[e]
        for part, q in (("gate", bundle.gate), ("up", bundle.up), ("down", bundle.down)):
            t = by_name[f"blk.{layer}.ffn_{part}_exps.weight"]
            fmt, ours = _as_gguf(q)
            theirs = np.asarray(t.data)[e].reshape(q.rows, -1)
            if fmt != t.tensor_type.name.lower() or not np.array_equal(ours, theirs):
                raise AssertionError(f"layer {layer} expert {e} {part}: bytes differ (ours {q.fmt}, "
                                     f"gguf {t.tensor_type.name})")


def verify_same_dense(gguf_path: str | Path, model, layers: list[int]) -> int:
    """Check that the GGUF's attention matrices (in `layers`), lm_head and embedding hold the bytes our
    engine computes with, formats included; returns how many matrices were compared."""
    reader = gguf.GGUFReader(str(gguf_path))
    by_name = {t.name: t for t in reader.tensors}
    w = model.weights
    pairs = [("token_embd.weight", w.embed), ("output.weight", w.lm_head)]
    for i in layers:
        lw = w.layers[i]
        pairs += [(f"blk.{i}.attn_{g}.weight", getattr(lw, a))
                  for g, a in (("q", "q"), ("k", "k"), ("v", "v"), ("output", "o"))]
    for gname, q in pairs:
        t = by_name[gname]
        fmt, ours = _as_gguf(q)
        theirs = np.asarray(t.data).view(np.uint8).reshape(q.rows, -1)
        if fmt != t.tensor_type.name.lower() or not np.array_equal(ours, theirs):
            raise AssertionError(f"{gname}: bytes differ (ours {q.fmt}, gguf {t.tensor_type.name})")
    return len(pairs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("hf_dir")
    p.add_argument("out")
    p.add_argument("--expert-format", default="q4_0", choices=DENSE_FORMATS)
    p.add_argument("--dense-format", default="bf16", choices=DENSE_FORMATS)
    p.add_argument("--embed-format", choices=DENSE_FORMATS)
    p.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    export_gguf(args.hf_dir, args.out, expert_fmt=args.expert_format, dense_fmt=args.dense_format,
                embed_fmt=args.embed_format, force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
