"""Model configuration shared by the engine, the loaders and (later) the control plane.

One slotted dataclass describes both Llama 4 text models and dense Llama: a dense Llama is the
degenerate case with no MoE layers, RoPE on every layer and rotate-half RoPE pairs. The fields
mirror transformers' `Llama4TextConfig` / `LlamaConfig` so that `from_hf_config` is a renaming,
not a reinterpretation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from garrison_workers.errors import ModelLoadError

RopeStyle = Literal["interleaved", "half"]
SUPPORTED_MODEL_TYPES = ("llama4", "llama4_text", "llama")


@dataclass(slots=True, frozen=True)
class RopeScaling:
    """Llama 3 style frequency scaling (`rope_type: llama3`), used by Llama 3.1+ and Llama 4 Scout."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def __post_init__(self) -> None:
        if self.factor <= 0 or self.high_freq_factor <= self.low_freq_factor:
            raise ModelLoadError(f"invalid llama3 rope scaling {self}: need factor > 0 and high > low freq factor")


@dataclass(slots=True, frozen=True)
class ModelConfig:
    architecture: Literal["llama4", "llama"]
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # the expert width for Llama 4, the MLP width for dense Llama
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_style: RopeStyle
    rope_scaling: RopeScaling | None = None
    intermediate_size_mlp: int = 0  # width of Llama 4's dense (non-MoE) layers
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_layers: tuple[int, ...] = ()
    rope_layers: tuple[bool, ...] = ()  # True where the layer applies RoPE (HF's `no_rope_layers` == 1)
    attention_chunk_size: int | None = None  # local attention window of RoPE layers; None = global
    use_qk_norm: bool = False
    attn_temperature_tuning: bool = False
    floor_scale: float = 8192.0
    attn_scale: float = 0.1
    attention_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        problems = []
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "intermediate_size", "max_position_embeddings"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1")
        if self.num_heads % max(self.num_kv_heads, 1):
            problems.append(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if len(self.rope_layers) != self.num_layers:
            problems.append(f"rope_layers has {len(self.rope_layers)} entries for {self.num_layers} layers")
        if any(not 0 <= i < self.num_layers for i in self.moe_layers):
            problems.append(f"moe_layers {self.moe_layers} name layers outside 0..{self.num_layers - 1}")
        if self.moe_layers and not 1 <= self.num_experts_per_tok <= self.num_experts:
            problems.append(f"num_experts_per_tok ({self.num_experts_per_tok}) must be in 1..num_experts ({self.num_experts})")
        if self.moe_layers and len(self.moe_layers) < self.num_layers and self.intermediate_size_mlp < 1:
            problems.append("intermediate_size_mlp must be >= 1 when some layers are dense")
        if self.head_dim % 2:
            problems.append(f"head_dim ({self.head_dim}) must be even for RoPE")
        if problems:
            raise ModelLoadError("invalid model config: " + "; ".join(problems))

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def is_moe_layer(self, layer: int) -> bool:
        return layer in self.moe_layers

    def is_chunked_layer(self, layer: int) -> bool:
        """RoPE layers of Llama 4 attend only within their `attention_chunk_size` window."""
        return self.attention_chunk_size is not None and self.rope_layers[layer]

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes


def from_hf_config(raw: dict[str, Any]) -> ModelConfig:
    """Translate a transformers config.json (Llama4ForConditionalGeneration, Llama4ForCausalLM, Llama)."""
    model_type = raw.get("model_type")
    if model_type == "llama4":
        raw = dict(raw.get("text_config") or {}, model_type="llama4_text")
        model_type = "llama4_text"
    if model_type not in SUPPORTED_MODEL_TYPES:
        archs = raw.get("architectures") or [model_type]
        raise ModelLoadError(
            f"unsupported architecture {archs[0]!r} (model_type {model_type!r}); Garrison serves "
            "Llama 4 text models (llama4, llama4_text) and dense Llama (llama)")
    if raw.get("hidden_act", "silu") != "silu":
        raise ModelLoadError(f"unsupported hidden_act {raw['hidden_act']!r}; only 'silu' is implemented")
    try:
        return _llama4_config(raw) if model_type == "llama4_text" else _llama_config(raw)
    except KeyError as missing:
        raise ModelLoadError(f"config.json lacks required field {missing}") from None


def _rope(raw: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in (None, "default"):
        return theta, None
    if rope_type != "llama3":
        raise ModelLoadError(f"unsupported rope_type {rope_type!r}; only 'default' and 'llama3' are implemented")
    scaling = RopeScaling(float(params["factor"]), float(params["low_freq_factor"]),
                          float(params["high_freq_factor"]), int(params["original_max_position_embeddings"]))
    return theta, scaling


def _eos_ids(raw: dict[str, Any]) -> tuple[int, ...]:
    eos = raw.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def _common(raw: dict[str, Any]) -> dict[str, Any]:
    num_heads = int(raw["num_attention_heads"])
    theta, scaling = _rope(raw)
    return dict(
        vocab_size=int(raw["vocab_size"]), hidden_size=int(raw["hidden_size"]),
        num_layers=int(raw["num_hidden_layers"]), num_heads=num_heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
        head_dim=int(raw.get("head_dim") or raw["hidden_size"] // num_heads),
        intermediate_size=int(raw["intermediate_size"]), rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
        rope_theta=theta, rope_scaling=scaling,
        max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=bool(raw.get("attention_bias", False)),
        bos_token_id=raw.get("bos_token_id"), eos_token_ids=_eos_ids(raw),
    )


def _llama_config(raw: dict[str, Any]) -> ModelConfig:
    common = _common(raw)
    return ModelConfig(architecture="llama", rope_style="half",
                       rope_layers=(True,) * common["num_layers"], **common)


def _llama4_config(raw: dict[str, Any]) -> ModelConfig:
    common = _common(raw)
    num_layers = common["num_layers"]
    step = int(raw.get("interleave_moe_layer_step", 1))
    moe_layers = raw.get("moe_layers")
    if moe_layers is None:
        moe_layers = list(range(step - 1, num_layers, step))
    interval = int(raw.get("no_rope_layer_interval", 4))
    no_rope_layers = raw.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(num_layers)]
    return ModelConfig(
        architecture="llama4", rope_style="interleaved",
        intermediate_size_mlp=int(raw.get("intermediate_size_mlp", common["intermediate_size"])),
        num_experts=int(raw.get("num_local_experts", 16)), num_experts_per_tok=int(raw.get("num_experts_per_tok", 1)),
        moe_layers=tuple(int(i) for i in moe_layers), rope_layers=tuple(bool(x) for x in no_rope_layers[:num_layers]),
        attention_chunk_size=raw.get("attention_chunk_size", 8192), use_qk_norm=bool(raw.get("use_qk_norm", True)),
        attn_temperature_tuning=bool(raw.get("attn_temperature_tuning", True)),
        floor_scale=float(raw.get("floor_scale", 8192)), attn_scale=float(raw.get("attn_scale", 0.1)), **common)


def llama4_scout() -> ModelConfig:
    """Llama 4 Scout 17B-16E: 16 experts, every layer MoE, NoPE every 4th layer, llama3 RoPE scaling."""
    return from_hf_config(dict(
        model_type="llama4_text", vocab_size=202048, hidden_size=5120, intermediate_size=8192,
        intermediate_size_mlp=16384, num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8,
        head_dim=128, max_position_embeddings=10485760, num_local_experts=16, num_experts_per_tok=1,
        interleave_moe_layer_step=1, attention_chunk_size=8192, use_qk_norm=True, floor_scale=8192,
        attn_scale=0.1, rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=16.0,
                                             low_freq_factor=1.0, high_freq_factor=4.0,
                                             original_max_position_embeddings=8192),
        bos_token_id=200000, eos_token_id=[200001, 200007, 200008]))


def llama4_maverick() -> ModelConfig:
    """Llama 4 Maverick 17B-128E: 128 experts on every other layer, no QK norm, no RoPE scaling."""
    return from_hf_config(dict(
        model_type="llama4_text", vocab_size=202048, hidden_size=5120, intermediate_size=8192,
        intermediate_size_mlp=16384, num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8,
        head_dim=128, max_position_embeddings=1048576, num_local_experts=128, num_experts_per_tok=1,
        interleave_moe_layer_step=2, attention_chunk_size=8192, use_qk_norm=False, floor_scale=8192,
        attn_scale=0.1, rope_parameters=dict(rope_type="default", rope_theta=500000.0),
        bos_token_id=200000, eos_token_id=[200001, 200007, 200008]))


def llama3_70b() -> ModelConfig:
    """Llama 3.1 70B (dense): GQA with 8 KV heads, llama3 RoPE scaling to a 128k context."""
    return from_hf_config(dict(
        model_type="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5,
        rope_scaling=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=8192),
        rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=[128001, 128008, 128009]))


def tiny_llama4(**overrides: Any) -> dict[str, Any]:
    """A few-MB Llama 4 text config (as a transformers config dict) for tests and benchmarks.

    Small `attention_chunk_size` and `floor_scale` make local attention and temperature tuning
    matter within a few dozen tokens.
    """
    raw: dict[str, Any] = dict(
        model_type="llama4_text", vocab_size=512, hidden_size=64, intermediate_size=48,
        intermediate_size_mlp=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, max_position_embeddings=4096, num_local_experts=4, num_experts_per_tok=1,
        interleave_moe_layer_step=1, no_rope_layer_interval=2, attention_chunk_size=16, use_qk_norm=True,
        attn_temperature_tuning=True, floor_scale=8, attn_scale=0.1, rms_norm_eps=1e-5,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0), tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    raw.update(overrides)
    return raw
