"""The resident (non-expert) weights: embeddings, attention, norms, routers, dense MLPs, lm_head."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kernels import QMatrix, dequantize, layout

from .checkpoint import Checkpoint
from .experts import load_matrix
from .spec import ModelSpec


@dataclass
class LayerWeights:
    attn_norm: np.ndarray
    mlp_norm: np.ndarray
    q: QMatrix
    k: QMatrix
    v: QMatrix
    o: QMatrix
    q_bias: np.ndarray | None = None
    k_bias: np.ndarray | None = None
    v_bias: np.ndarray | None = None
    o_bias: np.ndarray | None = None
    q_norm: np.ndarray | None = None
    k_norm: np.ndarray | None = None
    router: QMatrix | None = None
    dense: tuple[QMatrix, QMatrix, QMatrix] | None = None   # gate, up, down of a dense MLP
    shared: tuple[QMatrix, QMatrix, QMatrix] | None = None  # Qwen2-MoE's shared expert
    shared_gate: QMatrix | None = None


@dataclass
class ResidentWeights:
    embed: QMatrix
    layers: list[LayerWeights]
    final_norm: np.ndarray
    lm_head: QMatrix

    @property
    def nbytes(self) -> int:
        total = self.embed.nbytes + self.final_norm.nbytes
        if self.lm_head is not self.embed:
            total += self.lm_head.nbytes
        for lw in self.layers:
            for v in vars(lw).values():
                for m in v if isinstance(v, tuple) else (v,):
                    if isinstance(m, QMatrix | np.ndarray):
                        total += m.nbytes
        return total


def _vector(ckpt: Checkpoint, name: str, size: int) -> np.ndarray:
    """A norm weight or bias as float32 (they are small; float32 keeps the math simple)."""
    raw, fmt = ckpt.read(name, (size,))
    return dequantize(raw.view("uint8").reshape(1, -1), fmt, size)[0]


def head_format(dense_quant: str | None) -> str | None:
    """lm_head's format under `dense_quant`.  As llama.cpp does for its 4-bit types, the output
    projection keeps more bits (q8_0): its error lands on the logits directly, with no later layer
    to average it out."""
    return "q8_0" if dense_quant in ("q4_0", "q4_k") else dense_quant


def dense_formats(spec: ModelSpec, dense_quant: str | None) -> dict[str, tuple[tuple[int, int], str | None]]:
    """The large dense matrices `dense_quant` applies to -- attention q/k/v/o, dense MLP layers, shared
    experts, an untied lm_head -- as {tensor name (without .weight): ((rows, cols), format)}; format
    None keeps the checkpoint's own; a block format is named in the kernels' layout for it
    (kernels.layout: q4_0x8, q4_kx8, q8_0x8 where the rows allow).  Embedding, norms, biases and
    routers are not in it: they stay in their own format.  load_resident and `mer-tui convert
    --dense-quant` both follow this one list."""
    H, Q, KV = spec.hidden_size, spec.q_size, spec.kv_size
    out: dict[str, tuple[tuple[int, int], str | None]] = {}

    def mlp(names: tuple[str, ...], width: int, i: int) -> None:
        for n, shape in zip(names, ((width, H), (width, H), (H, width))):
            out[n.format(i=i)] = (shape, layout(dense_quant, shape[0]))

    for i in range(spec.num_layers):
        for key, shape in (("q", (Q, H)), ("k", (KV, H)), ("v", (KV, H)), ("o", (H, Q))):
            out[spec.name(key, i)] = (shape, layout(dense_quant, shape[0]))
        if spec.moe_layers[i]:
            if spec.shared_expert_size:
                mlp(spec.names["shared"], spec.shared_expert_size, i)
        else:
            mlp(spec.names["dense"], spec.intermediate_size, i)
    if not spec.tie_word_embeddings:
        out["lm_head"] = ((spec.vocab_size, H), layout(head_format(dense_quant), spec.vocab_size))
    return out


def load_resident(ckpt: Checkpoint, spec: ModelSpec, quant: str | None = None,
                  relayout: bool = False) -> ResidentWeights:
    """Read every non-expert tensor; `quant` (if given) is the format of the large dense matrices
    (dense_formats); None keeps each in the format it is stored in (a store's may be quantized), in the
    kernels' faster layout of it with `relayout` (load_matrix)."""
    H, Q, KV = spec.hidden_size, spec.q_size, spec.kv_size
    plan = dense_formats(spec, quant)

    def dense(name: str) -> QMatrix:
        shape, fmt = plan[name]
        return load_matrix(ckpt, name, shape, fmt, relayout)

    def mat(key: str, i: int, shape: tuple[int, int]) -> QMatrix:   # routers, shared-expert gates
        return load_matrix(ckpt, spec.name(key, i), shape, None)

    def mlp(names: tuple[str, ...], i: int) -> tuple[QMatrix, QMatrix, QMatrix]:
        return tuple(dense(n.format(i=i)) for n in names)  # type: ignore[return-value]

    layers = []
    for i in range(spec.num_layers):
        lw = LayerWeights(
            attn_norm=_vector(ckpt, spec.name("attn_norm", i) + ".weight", H),
            mlp_norm=_vector(ckpt, spec.name("mlp_norm", i) + ".weight", H),
            q=dense(spec.name("q", i)), k=dense(spec.name("k", i)), v=dense(spec.name("v", i)),
            o=dense(spec.name("o", i)),
        )
        if spec.qkv_bias:
            lw.q_bias = _vector(ckpt, spec.name("q", i) + ".bias", Q)
            lw.k_bias = _vector(ckpt, spec.name("k", i) + ".bias", KV)
            lw.v_bias = _vector(ckpt, spec.name("v", i) + ".bias", KV)
        if spec.o_bias:
            lw.o_bias = _vector(ckpt, spec.name("o", i) + ".bias", H)
        if spec.qk_norm:
            qn, kn = (Q, KV) if spec.qk_norm == "full" else (spec.head_dim, spec.head_dim)
            lw.q_norm = _vector(ckpt, spec.name("q_norm", i) + ".weight", qn)
            lw.k_norm = _vector(ckpt, spec.name("k_norm", i) + ".weight", kn)
        if spec.moe_layers[i]:
            # Routers stay in their own format: top-k choices are sensitive to their precision.
            lw.router = mat("router", i, (spec.num_experts, H))
            if spec.shared_expert_size:
                lw.shared = mlp(spec.names["shared"], i)
                lw.shared_gate = mat("shared_gate", i, (1, H))
        else:
            lw.dense = mlp(spec.names["dense"], i)
        layers.append(lw)

    embed = load_matrix(ckpt, "model.embed_tokens", (spec.vocab_size, H), None)
    lm_head = embed if spec.tie_word_embeddings else dense("lm_head")
    final_norm = _vector(ckpt, "model.norm.weight", H)
    return ResidentWeights(embed, layers, final_norm, lm_head)
