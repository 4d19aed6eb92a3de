"""Bytes per GPU of a layout: weights per rank, the KV cache per token, activations and runtime overhead.

Weights follow Garrison's layout (see `models.ParamCounts`): attention, dense MLPs and shared experts are split
by TP; routed experts by EP (the busiest rank holds ceil(E / ep) of them), each expert's width by TP; embeddings,
LM head, router and norms are whole on every rank. Every rank of a group holds the KV of its TP share of the
KV heads for every sequence of the group (attention is repeated on each EP rank).

KV per token, `hybrid`: Llama 4's chunked-attention layers keep at most one chunk per sequence
(`attention_chunk_size` tokens), only the global layers grow with the context. `uniform`: every layer keeps every
token, which is what Garrison's block manager allocates today (one block table for all layers) and what vLLM did
when it published its Llama 4 context figures (2025-04).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

from garrison_workers.config import ModelConfig

from garrison.planner.dtypes import kv_bytes, weight_bytes
from garrison.planner.hardware import Hardware
from garrison.planner.models import param_counts

KVLayout = Literal["hybrid", "uniform"]


@dataclass(slots=True, frozen=True)
class Precision:
    weights: str = "bf16"  # the linear layers of every block
    kv: str = "bf16"

    def __post_init__(self) -> None:
        weight_bytes(self.weights), kv_bytes(self.kv)  # refuse unknown names up front

    @property
    def unquantized(self) -> str:
        """Embeddings, LM head, router and norms stay in 16 bits whatever the blocks are quantized to."""
        return "fp32" if self.weights == "fp32" else "bf16"


@dataclass(slots=True, frozen=True)
class EngineLimits:
    """Per group: the engine settings that size activations (and go into the Helm values)."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    block_size: int = 16
    attention_key_block: int = 1024


@dataclass(slots=True, frozen=True)
class MemoryBreakdown:
    """One GPU of a group, in bytes."""

    hbm: float
    reserved: float  # HBM the engine leaves alone (memory_utilization) plus the runtime overhead
    embeddings: float  # embedding + LM head (whole on every rank)
    attention: float
    dense: float  # dense MLPs, shared experts, router, norms
    experts: float  # routed experts on this rank
    activations: float
    kv_cache: float  # what is left for KV (negative: the weights do not fit)
    kv_bytes_per_token: float  # per rank, at the longest context (global layers + amortized chunk)
    max_context: int  # tokens of one sequence that fit this KV cache, capped at the model's context
    kv_context: int  # the same without the cap: what the memory alone allows
    kv_layout: str

    @property
    def weights(self) -> float:
        return self.embeddings + self.attention + self.dense + self.experts

    @property
    def fits(self) -> bool:
        return self.kv_cache > 0

    def to_dict(self) -> dict[str, float | int | str]:
        return {**asdict(self), "weights": self.weights}


def weights_per_rank(model: ModelConfig, precision: Precision, tp: int, ep: int) -> dict[str, float]:
    counts = param_counts(model)
    w, whole = weight_bytes(precision.weights), weight_bytes(precision.unquantized)
    local_experts = math.ceil(counts.num_experts / ep) if counts.num_experts else 0
    return {
        "embeddings": (counts.embedding + counts.lm_head) * whole,
        "attention": counts.attention * w / tp,
        "dense": (counts.dense_mlp + counts.shared_expert) * w / tp + (counts.router + counts.norms) * whole,
        "experts": counts.routed_expert * counts.num_moe_layers * local_experts * w / tp,
    }


def kv_bytes_per_layer_token(model: ModelConfig, kv_dtype: str, tp: int) -> float:
    """K and V of one token in one layer on one rank (its TP share of the KV heads)."""
    return 2 * max(1, model.num_kv_heads // tp) * model.head_dim * kv_bytes(kv_dtype)


def layer_counts(model: ModelConfig) -> tuple[int, int]:
    """(global layers, chunked-local layers)."""
    chunked = sum(model.is_chunked_layer(i) for i in range(model.num_layers))
    return model.num_layers - chunked, chunked


def sequence_kv_bytes(model: ModelConfig, kv_dtype: str, tp: int, tokens: int, kv_layout: KVLayout) -> float:
    """KV of one sequence of `tokens` tokens on one rank."""
    per = kv_bytes_per_layer_token(model, kv_dtype, tp)
    if kv_layout == "uniform" or model.attention_chunk_size is None:
        return per * model.num_layers * tokens
    num_global, num_chunked = layer_counts(model)
    return per * (num_global * tokens + num_chunked * min(tokens, model.attention_chunk_size))


def max_context(model: ModelConfig, kv_dtype: str, tp: int, kv_budget: float, kv_layout: KVLayout) -> int:
    """Longest single sequence whose KV fits `kv_budget` bytes on one rank (the model's own context aside)."""
    if kv_budget <= 0:
        return 0
    per = kv_bytes_per_layer_token(model, kv_dtype, tp)
    num_global, num_chunked = layer_counts(model)
    chunk = model.attention_chunk_size
    if kv_layout == "uniform" or chunk is None or num_chunked == 0:
        tokens = int(kv_budget // (per * model.num_layers))
    elif kv_budget >= per * model.num_layers * chunk:
        tokens = int((kv_budget / per - num_chunked * chunk) // num_global)
    else:
        tokens = int(kv_budget // (per * model.num_layers))
    return tokens


def activation_bytes(model: ModelConfig, precision: Precision, tp: int, limits: EngineLimits) -> float:
    """Peak transient memory of a step: the widest intermediate of `max_num_batched_tokens` tokens (MLP
    gate/up, QKV, MoE dispatch buffers), a blockwise attention score tile, and the fp32 logits of every sequence."""
    act = 2.0 if precision.unquantized == "bf16" else 4.0
    t = limits.max_num_batched_tokens
    widest = max(model.intermediate_size_mlp, model.intermediate_size) * 2 // tp
    qkv = (model.num_heads + 2 * model.num_kv_heads) * model.head_dim // tp
    hidden = 4 * model.hidden_size * (1 + model.num_experts_per_tok)  # residual, norm, dispatch and combine rows
    scores = model.num_heads // tp * min(t, limits.attention_key_block) * limits.attention_key_block * 4
    logits = limits.max_num_seqs * model.vocab_size * 4
    return t * (widest + qkv + hidden) * act + scores + logits


def breakdown(model: ModelConfig, hardware: Hardware, precision: Precision, tp: int, ep: int,
              limits: EngineLimits = EngineLimits(), kv_layout: KVLayout = "hybrid") -> MemoryBreakdown:
    parts = weights_per_rank(model, precision, tp, ep)
    activations = activation_bytes(model, precision, tp, limits)
    reserved = hardware.hbm_bytes - hardware.usable_bytes
    kv_budget = hardware.usable_bytes - sum(parts.values()) - activations
    longest = max_context(model, precision.kv, tp, kv_budget, kv_layout)
    per_token = sequence_kv_bytes(model, precision.kv, tp, max(longest, 1), kv_layout) / max(longest, 1)
    return MemoryBreakdown(hardware.hbm_bytes, reserved, parts["embeddings"], parts["attention"], parts["dense"],
                           parts["experts"], activations, kv_budget, per_token,
                           min(longest, model.max_position_embeddings), longest, kv_layout)


def kv_blocks(model: ModelConfig, precision: Precision, tp: int, kv_budget: float, block_size: int) -> int:
    """Blocks of Garrison's block manager in `kv_budget` bytes per rank (every layer keeps every token)."""
    per_block = kv_bytes_per_layer_token(model, precision.kv, tp) * model.num_layers * block_size
    return max(0, int(kv_budget // per_block))

