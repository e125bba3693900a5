"""The resident (non-expert) weights: embeddings, attention, norms, routers, dense MLPs, lm_head."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kernels import QMatrix, dequantize

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


def load_resident(ckpt: Checkpoint, spec: ModelSpec, quant: str | None = None) -> ResidentWeights:
    """Read every non-expert tensor; `quant` (if given) applies to the large dense matrices."""
    H, Q, KV = spec.hidden_size, spec.q_size, spec.kv_size

    def mat(key: str, i: int, shape: tuple[int, int], q: str | None = quant) -> QMatrix:
        return load_matrix(ckpt, spec.name(key, i), shape, q)

    def mlp(names: tuple[str, str, str], width: int) -> tuple[QMatrix, QMatrix, QMatrix]:
        shapes = ((width, H), (width, H), (H, width))
        return tuple(load_matrix(ckpt, n, s, quant) for n, s in zip(names, shapes))  # type: ignore[return-value]

    layers = []
    for i in range(spec.num_layers):
        lw = LayerWeights(
            attn_norm=_vector(ckpt, spec.name("attn_norm", i) + ".weight", H),
            mlp_norm=_vector(ckpt, spec.name("mlp_norm", i) + ".weight", H),
            q=mat("q", i, (Q, H)), k=mat("k", i, (KV, H)), v=mat("v", i, (KV, H)), o=mat("o", i, (H, Q)),
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
            lw.router = mat("router", i, (spec.num_experts, H), None)
            if spec.shared_expert_size:
                names = tuple(n.format(i=i) for n in spec.names["shared"])
                lw.shared = mlp(names, spec.shared_expert_size)
                lw.shared_gate = mat("shared_gate", i, (1, H), None)
        else:
            lw.dense = mlp(tuple(n.format(i=i) for n in spec.names["dense"]), spec.intermediate_size)
        layers.append(lw)

    embed = load_matrix(ckpt, "model.embed_tokens", (spec.vocab_size, H), None)
    if spec.tie_word_embeddings:
        lm_head = embed
    else:
        # As llama.cpp does for its 4-bit types: the output projection keeps more bits, since its
        # error lands on the logits directly with no later layer to average it out.
        head_quant = "q8_0" if quant in ("q4_0", "q4_k") else quant
        lm_head = load_matrix(ckpt, "lm_head", (spec.vocab_size, H), head_quant)
    final_norm = _vector(ckpt, "model.norm.weight", H)
    return ResidentWeights(embed, layers, final_norm, lm_head)
