"""Model configuration shared by the engine, the loaders and (later) the control plane.

One slotted dataclass describes both Llama 4 text models and dense Llama: a dense Llama is the
degenerate case with no MoE layers, RoPE on every layer and rotate-half RoPE pairs. The fields
mirror transformers' `Llama4TextConfig` / `LlamaConfig` so that `from_hf_config` is a renaming,
not a reinterpretation.
"""

from __future__ import annotations

import math
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
            if not 1 <= getattr(self, name) <= LIMITS[name]:
                key = HF_KEYS.get(name, name)
                problems.append(f"{key} must be from 1 to {LIMITS[name]}, not {getattr(self, name)}")
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


# Bounds far beyond any real model (Llama 4 Maverick: vocab 202048, hidden 5120, 48 layers, 128 experts) and far
# below what would make sizing a model from them absurd: a config.json outside them is hostile or broken, and is
# refused before anything is allocated from it.
LIMITS = {"vocab_size": 1 << 24, "hidden_size": 1 << 17, "num_layers": 1 << 10, "num_heads": 1 << 12,
          "num_kv_heads": 1 << 12, "head_dim": 1 << 11, "intermediate_size": 1 << 20, "intermediate_size_mlp": 1 << 20,
          "max_position_embeddings": (1 << 31) - 1, "num_experts": 1 << 12, "attention_chunk_size": (1 << 31) - 1}
# transformers' names for the ModelConfig fields that are renamed.
HF_KEYS = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
           "num_kv_heads": "num_key_value_heads", "num_experts": "num_local_experts"}
_REQUIRED: Any = object()
INT32_MAX = (1 << 31) - 1


def from_hf_config(raw: Any, source: str = "config.json") -> ModelConfig:
    """Translate a transformers config.json (Llama4ForConditionalGeneration, Llama4ForCausalLM, Llama).

    Every value is checked for its JSON type and range before anything is sized from it: a ModelLoadError
    names `source` (the file) and the key.
    """
    try:
        return _from_fields(_HFFields(raw))
    except ModelLoadError as err:
        raise ModelLoadError(f"{source}: {err}") from None


def _from_fields(fields: _HFFields) -> ModelConfig:
    model_type = fields.text("model_type", None)
    if model_type == "llama4":
        fields = _HFFields(fields.mapping("text_config"), "text_config.")
        model_type = "llama4_text"
    if model_type not in SUPPORTED_MODEL_TYPES:
        archs = fields.raw.get("architectures")
        arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else model_type
        raise ModelLoadError(f"unsupported architecture {arch!r} (model_type {model_type!r}); Garrison serves "
                             "Llama 4 text models (llama4, llama4_text) and dense Llama (llama)")
    if fields.text("hidden_act", "silu") != "silu":
        raise ModelLoadError(f"unsupported hidden_act {fields.raw['hidden_act']!r}; only 'silu' is implemented")
    return _llama4_config(fields) if model_type == "llama4_text" else _llama_config(fields)


class _HFFields:
    """Typed, bounded reads of a config.json object; each refusal names the key (`prefix` for a nested one)."""

    def __init__(self, raw: Any, prefix: str = "") -> None:
        if not isinstance(raw, dict):
            where = prefix.rstrip(".") or "the file"
            raise ModelLoadError(f"{where} must hold a JSON object, not {type(raw).__name__}")
        self.raw, self.prefix = raw, prefix

    def _get(self, key: str, default: Any) -> tuple[Any, bool]:
        """(value, present); a missing or null key gives the default, or an error when it is required."""
        value = self.raw.get(key)
        if value is not None:
            return value, True
        if default is _REQUIRED:
            raise ModelLoadError(f"required key {self.prefix}{key} is missing")
        return default, False

    def _refuse(self, key: str, what: str) -> ModelLoadError:
        shown = repr(self.raw.get(key))
        shown = shown if len(shown) < 60 else shown[:57] + "..."
        return ModelLoadError(f"{self.prefix}{key} must be {what}, not {shown}")

    def integer(self, key: str, default: Any = _REQUIRED, low: int = 1, high: int = INT32_MAX) -> Any:
        value, present = self._get(key, default)
        if not present:
            return value
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self._refuse(key, f"an integer from {low} to {high}")
        return value

    def size(self, key: str, field: str, default: Any = _REQUIRED) -> Any:
        """A count or width (>= 1) bounded by LIMITS[field]."""
        return self.integer(key, default, 1, LIMITS[field])

    def number(self, key: str, default: Any = _REQUIRED, positive: bool = False) -> Any:
        value, present = self._get(key, default)
        if not present:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or (positive and value <= 0):
            raise self._refuse(key, "a finite number" + (" > 0" if positive else ""))
        return float(value)

    def flag(self, key: str, default: bool) -> bool:
        value, present = self._get(key, default)
        if present and not isinstance(value, bool):
            raise self._refuse(key, "true or false")
        return value

    def text(self, key: str, default: Any = _REQUIRED) -> Any:
        value, present = self._get(key, default)
        if present and not isinstance(value, str):
            raise self._refuse(key, "a string")
        return value

    def mapping(self, key: str, default: Any = _REQUIRED) -> Any:
        value, present = self._get(key, default)
        if present and not isinstance(value, dict):
            raise self._refuse(key, "a JSON object")
        return value

    def ints(self, key: str, low: int, high: int) -> list[int] | None:
        value, present = self._get(key, None)
        if present and (not isinstance(value, list) or len(value) > LIMITS["num_layers"] or any(
                isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high for v in value)):
            raise self._refuse(key, f"a list of at most {LIMITS['num_layers']} integers from {low} to {high}")
        return value

    def token_ids(self, key: str) -> tuple[int, ...]:
        value, present = self._get(key, None)
        ids = (value if isinstance(value, list) else [value]) if present else []
        if len(ids) > 1024 or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i <= INT32_MAX
                                  for i in ids):
            raise self._refuse(key, "a token id or a list of token ids")
        return tuple(ids)


def _rope(f: _HFFields) -> tuple[float, RopeScaling | None]:
    key = "rope_parameters" if f.raw.get("rope_parameters") is not None else "rope_scaling"
    p = _HFFields(f.mapping(key, {}), f"{f.prefix}{key}.")
    theta = p.number("rope_theta", None, positive=True) or f.number("rope_theta", 10000.0, positive=True)
    rope_type = p.text("rope_type", None) or p.text("type", "default")
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ModelLoadError(f"unsupported rope_type {rope_type!r}; only 'default' and 'llama3' are implemented")
    scaling = RopeScaling(p.number("factor", positive=True), p.number("low_freq_factor"), p.number("high_freq_factor"),
                          p.integer("original_max_position_embeddings"))
    return theta, scaling


def _common(f: _HFFields) -> dict[str, Any]:
    num_heads = f.size("num_attention_heads", "num_heads")
    hidden_size = f.size("hidden_size", "hidden_size")
    theta, scaling = _rope(f)
    bos = f.token_ids("bos_token_id")
    return dict(
        vocab_size=f.size("vocab_size", "vocab_size"), hidden_size=hidden_size,
        num_layers=f.size("num_hidden_layers", "num_layers"), num_heads=num_heads,
        num_kv_heads=f.size("num_key_value_heads", "num_kv_heads", num_heads),
        head_dim=f.size("head_dim", "head_dim", max(hidden_size // num_heads, 1)),
        intermediate_size=f.size("intermediate_size", "intermediate_size"),
        rms_norm_eps=f.number("rms_norm_eps", 1e-5, positive=True),
        rope_theta=theta, rope_scaling=scaling,
        max_position_embeddings=f.size("max_position_embeddings", "max_position_embeddings", 4096),
        tie_word_embeddings=f.flag("tie_word_embeddings", False),
        attention_bias=f.flag("attention_bias", False),
        bos_token_id=bos[0] if bos else None, eos_token_ids=f.token_ids("eos_token_id"),
    )


def _llama_config(f: _HFFields) -> ModelConfig:
    common = _common(f)
    return ModelConfig(architecture="llama", rope_style="half",
                       rope_layers=(True,) * common["num_layers"], **common)


def _llama4_config(f: _HFFields) -> ModelConfig:
    common = _common(f)
    num_layers = common["num_layers"]
    step = f.integer("interleave_moe_layer_step", 1, 1, num_layers)
    moe_layers = f.ints("moe_layers", 0, num_layers - 1)
    if moe_layers is None:
        moe_layers = list(range(step - 1, num_layers, step))
    interval = f.integer("no_rope_layer_interval", 4)
    no_rope_layers = f.ints("no_rope_layers", 0, 1) or [int((i + 1) % interval != 0) for i in range(num_layers)]
    num_experts = f.size("num_local_experts", "num_experts", 16)
    global_attention = "attention_chunk_size" in f.raw and f.raw["attention_chunk_size"] is None
    return ModelConfig(
        architecture="llama4", rope_style="interleaved",
        intermediate_size_mlp=f.size("intermediate_size_mlp", "intermediate_size_mlp", common["intermediate_size"]),
        num_experts=num_experts, num_experts_per_tok=f.integer("num_experts_per_tok", 1, 1, num_experts),
        moe_layers=tuple(moe_layers), rope_layers=tuple(bool(x) for x in no_rope_layers[:num_layers]),
        attention_chunk_size=None if global_attention else f.size("attention_chunk_size", "attention_chunk_size", 8192),
        use_qk_norm=f.flag("use_qk_norm", True), attn_temperature_tuning=f.flag("attn_temperature_tuning", True),
        floor_scale=f.number("floor_scale", 8192.0, positive=True), attn_scale=f.number("attn_scale", 0.1), **common)


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
