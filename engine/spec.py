"""What differs between architectures, as data read from config.json.

One forward pass (engine/model.py) reads a ModelSpec; there are no per-architecture copies.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .errors import EngineError
from .jsonfile import read_json_object

# Tensor names per family.  {i} is the layer, {e} the expert.  The three expert matrices are
# always (gate, up, down) in that order, whatever the checkpoint calls them.
_LLAMA_ATTN = {
    "q": "model.layers.{i}.self_attn.q_proj",
    "k": "model.layers.{i}.self_attn.k_proj",
    "v": "model.layers.{i}.self_attn.v_proj",
    "o": "model.layers.{i}.self_attn.o_proj",
    "q_norm": "model.layers.{i}.self_attn.q_norm",
    "k_norm": "model.layers.{i}.self_attn.k_norm",
    "attn_norm": "model.layers.{i}.input_layernorm",
    "mlp_norm": "model.layers.{i}.post_attention_layernorm",
    "dense": ("model.layers.{i}.mlp.gate_proj", "model.layers.{i}.mlp.up_proj", "model.layers.{i}.mlp.down_proj"),
}
_MLP_EXPERTS = {
    "router": "model.layers.{i}.mlp.gate",
    "expert": ("model.layers.{i}.mlp.experts.{e}.gate_proj", "model.layers.{i}.mlp.experts.{e}.up_proj",
               "model.layers.{i}.mlp.experts.{e}.down_proj"),
    "shared": ("model.layers.{i}.mlp.shared_expert.gate_proj", "model.layers.{i}.mlp.shared_expert.up_proj",
               "model.layers.{i}.mlp.shared_expert.down_proj"),
    "shared_gate": "model.layers.{i}.mlp.shared_expert_gate",
}
_MIXTRAL_EXPERTS = {
    "router": "model.layers.{i}.block_sparse_moe.gate",
    "expert": ("model.layers.{i}.block_sparse_moe.experts.{e}.w1", "model.layers.{i}.block_sparse_moe.experts.{e}.w3",
               "model.layers.{i}.block_sparse_moe.experts.{e}.w2"),
}
NAMES = {
    "mixtral": {**_LLAMA_ATTN, **_MIXTRAL_EXPERTS},
    "olmoe": {**_LLAMA_ATTN, **_MLP_EXPERTS},
    "qwen2_moe": {**_LLAMA_ATTN, **_MLP_EXPERTS},
    "qwen3_moe": {**_LLAMA_ATTN, **_MLP_EXPERTS},
    "llama": _LLAMA_ATTN,
    "mistral": _LLAMA_ATTN,
    "qwen2": _LLAMA_ATTN,
    "qwen3": _LLAMA_ATTN,
}
SUPPORTED = tuple(NAMES)


@dataclass(frozen=True)
class ModelSpec:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    tie_word_embeddings: bool
    qkv_bias: bool          # biases on q, k, v projections
    o_bias: bool            # bias on the output projection
    qk_norm: str | None     # None, "full" (RMSNorm over the whole projection, OLMoE) or "head" (per head, Qwen3)
    clip_qkv: float | None
    sliding_window: tuple[int | None, ...]  # per layer: window in tokens, or None for full attention
    intermediate_size: int  # width of dense MLP layers
    moe_layers: tuple[bool, ...]            # per layer: routed experts (True) or a dense MLP
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    norm_topk_prob: bool
    shared_expert_size: int  # 0: none (a shared expert always comes with its sigmoid gate)
    eos_token_ids: tuple[int, ...]
    names: dict = field(repr=False, compare=False, default_factory=dict)
    max_position_embeddings: int | None = None   # the context the model was trained for, where known

    def name(self, key: str, layer: int, expert: int | None = None) -> str:
        return self.names[key].format(i=layer, e=expert)

    def expert_names(self, layer: int, expert: int) -> tuple[str, str, str]:
        return tuple(n.format(i=layer, e=expert) for n in self.names["expert"])  # type: ignore[return-value]

    @property
    def is_moe(self) -> bool:
        return any(self.moe_layers)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


def _ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def load_spec(folder: str | Path) -> ModelSpec:
    """Read config.json (and generation_config.json for extra eos ids) into a ModelSpec; or a GGUF
    file's metadata (engine.gguf_import)."""
    folder = Path(folder)
    if folder.is_file():
        from .gguf_import import gguf_config, gguf_files, is_gguf

        if is_gguf(folder):
            shards = gguf_files(folder)
            return spec_from_config(gguf_config(shards), str(shards[0].path))
    path = folder / "config.json"
    cfg = read_json_object(path, missing=f"{folder}: no config.json")
    gen_cfg = read_json_object(folder / "generation_config.json")
    return spec_from_config(cfg, str(path), gen_cfg)


def spec_from_config(cfg: dict, where: str = "config.json", gen_cfg: dict | None = None) -> ModelSpec:
    mt = cfg.get("model_type")
    if mt not in NAMES:
        raise EngineError(f"{where}: model_type {mt!r} is not supported (supported: {', '.join(SUPPORTED)})")

    def need(key: str, kind=int):
        if key not in cfg or cfg[key] is None:
            raise EngineError(f"{where}: missing field {key}")
        try:
            return kind(cfg[key])
        except (TypeError, ValueError):
            raise EngineError(f"{where}: field {key} should be {kind.__name__}, got {cfg[key]!r}") from None

    def get(key: str, default, kind=None):
        v = cfg.get(key)
        if v is None:
            return default
        try:
            return kind(v) if kind else v
        except (TypeError, ValueError):
            raise EngineError(f"{where}: field {key} should be {kind.__name__}, got {v!r}") from None

    hidden = need("hidden_size")
    layers = need("num_hidden_layers")
    heads = need("num_attention_heads")
    kv_heads = get("num_key_value_heads", heads, int)
    head_dim = get("head_dim", hidden // heads if heads else 0, int)
    for key, v in (("hidden_size", hidden), ("num_hidden_layers", layers), ("num_attention_heads", heads),
                   ("num_key_value_heads", kv_heads), ("head_dim", head_dim)):
        if v <= 0:
            raise EngineError(f"{where}: field {key} must be positive, got {v}")
    if heads % kv_heads:
        raise EngineError(f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")

    rope = dict(cfg.get("rope_parameters") or {})
    legacy_scaling = cfg.get("rope_scaling")
    if legacy_scaling:
        rope.update(legacy_scaling)
    rope_theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3"):
        raise EngineError(f"{where}: rope type {rope_type!r} is not supported (default, linear, llama3)")
    rope_scaling = None if rope_type == "default" else {**rope, "rope_type": rope_type}

    # Attention variants.
    if mt == "qwen2":
        qkv_bias, o_bias = True, False
    elif mt == "qwen2_moe":
        qkv_bias, o_bias = bool(get("qkv_bias", True)), False
    else:
        qkv_bias = o_bias = bool(get("attention_bias", False))
    qk_norm = {"olmoe": "full", "qwen3": "head", "qwen3_moe": "head"}.get(mt)

    window = get("sliding_window", None, int)
    layer_types = cfg.get("layer_types")
    if mt in ("mistral", "mixtral"):
        windows = (window,) * layers
    elif isinstance(layer_types, list) and len(layer_types) == layers:
        windows = tuple(window if t == "sliding_attention" and window else None for t in layer_types)
    elif cfg.get("use_sliding_window") and window:
        first_sliding = get("max_window_layers", layers, int)
        windows = tuple(window if i >= first_sliding else None for i in range(layers))
    else:
        windows = (None,) * layers

    # Mixture-of-experts layout.
    n_experts = 0
    for key in ("num_local_experts", "num_experts"):
        if cfg.get(key):
            n_experts = get(key, 0, int)
            break
    intermediate = get("intermediate_size", 0, int)
    if mt in ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe"):
        if n_experts <= 0:
            raise EngineError(f"{where}: missing field num_local_experts / num_experts")
        top_k = need("num_experts_per_tok")
        if not 0 < top_k <= n_experts:
            raise EngineError(f"{where}: num_experts_per_tok {top_k} must be between 1 and {n_experts}")
        if mt in ("mixtral", "olmoe"):
            moe_layers = (True,) * layers
            moe_width = need("intermediate_size")
        else:
            step = get("decoder_sparse_step", 1, int)
            only_dense = set(get("mlp_only_layers", []) or [])
            moe_layers = tuple(i not in only_dense and step > 0 and (i + 1) % step == 0 for i in range(layers))
            moe_width = need("moe_intermediate_size")
        norm_topk = True if mt == "mixtral" else bool(get("norm_topk_prob", False))
    else:
        n_experts, top_k, moe_width, norm_topk = 0, 0, 0, False
        moe_layers = (False,) * layers
    if not all(moe_layers) and intermediate <= 0:
        raise EngineError(f"{where}: missing field intermediate_size (needed by dense layers)")
    shared = get("shared_expert_intermediate_size", 0, int) if mt == "qwen2_moe" else 0

    eos = _ids(cfg.get("eos_token_id")) + _ids((gen_cfg or {}).get("eos_token_id"))
    return ModelSpec(
        model_type=mt,
        vocab_size=need("vocab_size"),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=get("rms_norm_eps", 1e-6, float),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        tie_word_embeddings=bool(get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        qk_norm=qk_norm,
        clip_qkv=get("clip_qkv", None, float),
        sliding_window=windows,
        intermediate_size=intermediate,
        moe_layers=moe_layers,
        num_experts=n_experts,
        top_k=top_k,
        moe_intermediate_size=moe_width,
        norm_topk_prob=norm_topk,
        shared_expert_size=shared,
        eos_token_ids=tuple(dict.fromkeys(eos)),
        names=NAMES[mt],
        max_position_embeddings=get("max_position_embeddings", None, int),
    )
