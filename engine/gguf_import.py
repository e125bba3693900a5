"""A GGUF file seen as a Hugging Face checkpoint: its tensors under the names a ModelSpec uses, and the
config.json its metadata stands for, so that `mer-tui convert model.gguf DST` writes an expert store
with the converter's one code path.

What llama.cpp's converter (convert_hf_to_gguf.py) changed on the way in is undone here, as data:
- names: blk.N.attn_q -> the spec's "q" of layer N, and so on (_LAYER_KEYS);
- experts: each layer's experts merged into one tensor (ffn_{gate,up,down}_exps, numpy shape
  (experts, rows, cols)) are seen as one tensor per expert: a slice of whole rows, no copy (older files
  hold one tensor per expert, blk.N.ffn_gate.E: taken as they are);
- the llama architecture (Mixtral) permutes the rows of q and k so that ggml's rope can rotate adjacent
  pairs; the spec rotates halves as Hugging Face does, so those rows are read in the inverse order
  (row_order); olmoe, qwen2moe and qwen3moe keep Hugging Face's order;
- a qwen2moe shared expert's gate is a vector {n_embd} there, a (1, n_embd) matrix here.
Block formats need no change: GGUF's q8_0, q4_0, q4_1, q5_0, q5_1, the k-quants q2_k ... q6_k and
iq4_nl, iq4_xs are the kernels' own.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from .checkpoint import Checkpoint
from .errors import EngineError
from .gguf import GGML_FORMATS, GgufFile, GgufTensor
from .gguf_vocab import tokenizer_files
from .safetensors_file import FLOAT_DTYPES, TensorInfo, read_tensor
from .spec import ModelSpec, spec_from_config

# GGUF architecture -> our model_type (the MoE ones; a dense GGUF has no experts to stream)
ARCHES = {"llama": "mixtral", "olmoe": "olmoe", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}
# blk.N.<name>.weight -> the spec's key for layer N
_LAYER_KEYS = {"attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_output": "o", "attn_q_norm": "q_norm",
               "attn_k_norm": "k_norm", "attn_norm": "attn_norm", "ffn_norm": "mlp_norm", "ffn_gate_inp": "router",
               "ffn_gate_inp_shexp": "shared_gate"}
# blk.N.<name>.weight -> (the spec's key of a (gate, up, down) triple, its index)
_TRIPLE_KEYS = {"ffn_gate_shexp": ("shared", 0), "ffn_up_shexp": ("shared", 1), "ffn_down_shexp": ("shared", 2),
                "ffn_gate": ("dense", 0), "ffn_up": ("dense", 1), "ffn_down": ("dense", 2)}
_EXPERTS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
_SPLIT_EXPERTS = ("ffn_gate", "ffn_up", "ffn_down")   # blk.N.<name>.E.weight
_SHARD_NAME = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}


def is_gguf(path: str | Path) -> bool:
    """A file that starts with GGUF's magic."""
    p = Path(path)
    if not p.is_file():
        return False
    try:
        with open(p, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def gguf_files(path: str | Path) -> list[GgufFile]:
    """The GGUF file at `path`, or every file of the split GGUF it belongs to, the first first.

    llama.cpp's gguf-split (and gguf-py) write a model too large for one file as NAME-00001-of-00003.gguf
    and so on, the metadata in the first, `split.count` in each; any of the files may be given."""
    g = GgufFile(path)
    count = int(g.get("split.count", 1) or 1)
    if count <= 1:
        return [g]
    m = _SHARD_NAME.match(g.path.name)
    if m is None or int(m["count"]) != count:
        no = int(g.get("split.no", 0)) + 1
        raise EngineError(f"{g.path}: one of {count} files of a split GGUF, but not named "
                          f"NAME-{no:05d}-of-{count:05d}.gguf, so the others cannot be found")
    out = []
    for i in range(1, count + 1):
        shard = g.path.with_name(f"{m['stem']}-{i:05d}-of-{count:05d}.gguf")
        if shard == g.path:
            out.append(g)
        elif not shard.is_file():
            raise EngineError(f"{shard}: missing (file {i} of the {count} of this split GGUF)")
        else:
            out.append(GgufFile(shard))
    return out


def gguf_config(shards: list[GgufFile]) -> dict:
    """The Hugging Face config.json that a GGUF's metadata (in its first file) and tensors stand for."""
    g = shards[0]
    tensors = {name: t for shard in shards for name, t in shard.tensors.items()}
    arch = g.get("general.architecture")
    where = str(g.path)
    if arch not in ARCHES:
        known = ", ".join(sorted(ARCHES))
        raise EngineError(f"{where}: architecture {arch!r} is not supported (MoE architectures: {known})")

    def meta(key: str, default=None, need: bool = False):
        v = g.get(f"{arch}.{key}", default)
        if need and v is None:
            raise EngineError(f"{where}: metadata {arch}.{key} is missing")
        return v

    experts = int(meta("expert_count", 0) or 0)
    if experts <= 0:
        raise EngineError(f"{where}: a dense {arch} model ({arch}.expert_count is 0): it has no experts to stream")
    layers = int(meta("block_count", need=True))
    hidden = int(meta("embedding_length", need=True))
    heads = int(meta("attention.head_count", need=True))
    tokens = g.get("tokenizer.ggml.tokens")
    embd = tensors.get("token_embd.weight")
    # The embedding's rows are what the weights hold (a vocabulary may list fewer tokens than it pads to).
    vocab = (embd and embd.dims[-1]) or meta("vocab_size") or (len(tokens) if isinstance(tokens, list) else None)
    if not vocab:
        raise EngineError(f"{where}: no vocabulary size (no {arch}.vocab_size, tokens or token_embd.weight)")
    cfg: dict = {
        "model_type": ARCHES[arch],
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta("attention.head_count_kv", heads)),
        "rms_norm_eps": float(meta("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(meta("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta("context_length", 4096)),
        "num_experts_per_tok": int(meta("expert_used_count", need=True)),
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": g.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": g.get("tokenizer.ggml.eos_token_id"),
    }
    if meta("attention.key_length") is not None:
        cfg["head_dim"] = int(meta("attention.key_length"))
    scaling = meta("rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise EngineError(f"{where}: rope scaling {scaling!r} is not supported (linear)")
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(meta("rope.scaling.factor", 1.0))}
    if meta("attention.clamp_kqv") is not None:
        cfg["clip_qkv"] = float(meta("attention.clamp_kqv"))
    ffn = meta("feed_forward_length")
    if arch in ("llama", "olmoe"):
        cfg.update(num_local_experts=experts, num_experts=experts, intermediate_size=int(ffn or 0))
    else:
        # Which layers route (llama.cpp's qwen MoE files may carry dense layers as ffn_gate/up/down).
        dense = [i for i in range(layers) if f"blk.{i}.ffn_gate_exps.weight" not in tensors]
        cfg.update(num_experts=experts, moe_intermediate_size=int(meta("expert_feed_forward_length", need=True)),
                   intermediate_size=int(ffn or 0), decoder_sparse_step=1, mlp_only_layers=dense,
                   # as llama.cpp computes these models: qwen2moe's top-k weights unnormalised, qwen3moe's normalised
                   norm_topk_prob=bool(meta("expert_weights_norm", arch == "qwen3moe")))
        if arch == "qwen2moe":
            cfg["shared_expert_intermediate_size"] = int(meta("expert_shared_feed_forward_length", 0) or 0)
            cfg["qkv_bias"] = "blk.0.attn_q.bias" in tensors
    if arch == "olmoe":
        cfg["norm_topk_prob"] = bool(meta("expert_weights_norm", False))
    return cfg


class _Table:
    """What Checkpoint expects of a shard: a path, tensors by name, and reading one."""

    def __init__(self, path: Path, row_order: dict[str, np.ndarray]):
        self.path = path
        self.tensors: dict[str, TensorInfo] = {}
        self.row_order = row_order

    def read(self, name: str) -> np.ndarray:
        arr = read_tensor(self.path, self.tensors[name])
        order = self.row_order.get(name)
        return arr if order is None else np.ascontiguousarray(arr[order])


class GgufCheckpoint(Checkpoint):
    """The tensors of a GGUF file under the spec's names (see the module docstring).

    row_order[name], where present, is the order in which the file's rows make the tensor (read(),
    and the converter, apply it)."""

    def __init__(self, path: str | Path):   # not Checkpoint's: that one reads a folder of shards
        shards = gguf_files(path)
        self.gguf = shards[0]                  # the metadata: the first file of a split GGUF holds it
        self.folder = self.gguf.path
        self.config = gguf_config(shards)
        self.spec: ModelSpec = spec_from_config(self.config, str(self.folder))
        self.row_order: dict[str, np.ndarray] = {}
        self.files = {}
        self.where = {}
        spec = self.spec
        for shard in shards:
            table = self.files[shard.path.name] = _Table(shard.path, self.row_order)
            for t in shard.tensors.values():
                for name, info in self._infos(t):
                    table.tensors[name] = info
                    self.where[name] = table
        if self.gguf.get("general.architecture") == "llama":
            for key, n_heads in (("q", spec.num_heads), ("k", spec.num_kv_heads)):
                for i in range(spec.num_layers):
                    name = spec.name(key, i) + ".weight"
                    if name in self.where:
                        self.row_order[name] = _unpermute(self.where[name].tensors[name].shape[0], n_heads)

    def _infos(self, t: GgufTensor) -> list[tuple[str, TensorInfo]]:
        """The spec's name(s) and header entries of GGUF tensor `t` (several for merged experts)."""
        fmt = t.fmt
        if fmt is None:
            readable = ", ".join(f.upper() for f in GGML_FORMATS.values())
            raise EngineError(f"{self.folder}: tensor {t.name} is {t.type_name}, which mer-tui cannot read "
                              f"(it reads {readable}; requantize with llama-quantize, e.g. to Q4_K_M or Q4_0)")
        spec = self.spec
        if t.name in _TOP:
            return [(_TOP[t.name], _info(_TOP[t.name], t, t.start, t.shape))]
        parts = t.name.split(".")
        if len(parts) == 5 and parts[2] in _SPLIT_EXPERTS and parts[3].isdigit():
            # blk.N.ffn_gate.E.weight: each expert its own tensor, as llama.cpp wrote Mixtral before
            # merging them (early 2024; many of the Mixtral GGUFs shared then)
            name = spec.expert_names(int(parts[1]), int(parts[3]))[_SPLIT_EXPERTS.index(parts[2])] + ".weight"
            return [(name, _info(name, t, t.start, t.shape))]
        if len(parts) != 4 or parts[0] != "blk" or not parts[1].isdigit():
            raise EngineError(f"{self.folder}: tensor {t.name} is not one mer-tui knows for {spec.model_type}")
        layer, base, kind = int(parts[1]), parts[2], parts[3]
        if base in _EXPERTS:
            n, rows, cols = t.shape
            if n != spec.num_experts:
                raise EngineError(f"{self.folder}: tensor {t.name} holds {n} experts, expected {spec.num_experts}")
            which = _EXPERTS.index(base)
            per = t.nbytes // n
            return [(name, _info(name, t, t.start + e * per, (rows, cols), per))
                    for e in range(n) for name in [spec.expert_names(layer, e)[which] + ".weight"]]
        if base in _LAYER_KEYS and _LAYER_KEYS[base] in spec.names:
            prefix = spec.name(_LAYER_KEYS[base], layer)
        elif base in _TRIPLE_KEYS and _TRIPLE_KEYS[base][0] in spec.names:
            key, idx = _TRIPLE_KEYS[base]
            prefix = spec.names[key][idx].format(i=layer)
        else:
            raise EngineError(f"{self.folder}: tensor {t.name} is not one mer-tui knows for {spec.model_type}")
        shape = (1, t.dims[0]) if base == "ffn_gate_inp_shexp" and len(t.dims) == 1 else t.shape
        name = f"{prefix}.{kind}"
        return [(name, _info(name, t, t.start, shape))]


def _info(name: str, t: GgufTensor, start: int, shape: tuple[int, ...], nbytes: int | None = None) -> TensorInfo:
    """A safetensors-style header entry for bytes of `t`: float formats as their dtype, block formats as
    U8 (rows, row bytes) marked with their format and columns, as a store's model.safetensors has them."""
    nbytes = t.nbytes if nbytes is None else nbytes
    fmt = t.fmt
    if fmt in FLOAT_DTYPES:
        return TensorInfo(name, FLOAT_DTYPES[fmt], tuple(shape), start, start + nbytes)  # type: ignore[arg-type]
    rows = int(np.prod(shape[:-1], dtype=np.int64))
    return TensorInfo(name, "U8", (rows, nbytes // max(rows, 1)), start, start + nbytes, quant=fmt, cols=shape[-1])


def _unpermute(rows: int, n_heads: int) -> np.ndarray:
    """The order of a GGUF q/k matrix's rows that gives Hugging Face's: llama.cpp's converter wrote each
    head's rows (two halves of head_dim/2) interleaved pairwise, row h*d + 2j + t from Hugging Face's
    h*d + t*d/2 + j; this is the inverse of that permutation."""
    half = rows // n_heads // 2
    written = np.arange(rows).reshape(n_heads, 2, half).swapaxes(1, 2).reshape(-1)   # file row -> HF row
    return np.argsort(written)


def gguf_side_files(ckpt: GgufCheckpoint) -> tuple[dict[str, str], str | None]:
    """({file name: text}, why there is no tokenizer or None): what a converted store holds besides
    weights, config.json and the tokenizer files (engine.gguf_vocab).  A vocabulary that cannot be
    rebuilt does not stop the weights from loading (token ids still work: `mer-tui bench`); the reason
    is returned for the caller to say."""
    files = {"config.json": json.dumps(ckpt.config, indent=1) + "\n"}
    try:
        files.update(tokenizer_files(ckpt.gguf.metadata, str(ckpt.folder)))
    except EngineError as e:
        return files, f"no tokenizer: {e}"
    return files, None
