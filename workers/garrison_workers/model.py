"""Llama 4 text and dense Llama, written for one device, computing what transformers computes.

Modules and parameter names follow transformers' `Llama4ForCausalLM` so a checkpoint's names map
one to one (dense Llama's `mlp.` is renamed `feed_forward.` by the loaders). Tokens are a flat
`[T, H]` batch of every sequence of the step; attention reads and writes the paged KV cache
through `AttentionMetadata`.

Tensor parallelism enters only through the column/row-parallel linear layers (with tp = 1 they are
plain linears), and expert parallelism through the MoE class the builder passes in
(`garrison_workers.parallel.moe.ParallelMoE`); the forward logic here is the same on one device or many.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from garrison_workers.attention import AttentionMetadata, decode_kernel, paged_attention, write_kv
from garrison_workers.config import ModelConfig
from garrison_workers.parallel.context import ParallelContext
from garrison_workers.parallel.layers import ColumnParallelLinear, RowParallelLinear

KVCaches = list[tuple[torch.Tensor, torch.Tensor]]
Projections = Callable[[torch.Tensor], tuple[torch.Tensor, ...]]  # several linears of one input (fusion.py)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # One fused op (the same arithmetic) instead of the seven below: a small model's decode step is
            # bound by how many ops it calls.
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return _rms(x, self.eps) * self.weight


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


class Rotary:
    """RoPE tables. Llama 4 rotates adjacent pairs (complex form); dense Llama rotates halves."""

    def __init__(self, config: ModelConfig) -> None:
        self.style = config.rope_style
        dim = config.head_dim
        # Explicit device: the model may be built under torch.device("meta") to skip weight init.
        exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
        inv_freq = 1.0 / (config.rope_theta ** exponents)
        if config.rope_scaling is not None:
            inv_freq = _llama3_scaled(inv_freq, config)
        self.inv_freq = inv_freq

    def tables(self, positions_T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs_TF = positions_T.float()[:, None] * self.inv_freq.to(positions_T.device)[None, :]
        if self.style == "half":
            freqs_TF = torch.cat((freqs_TF, freqs_TF), dim=-1)
        return freqs_TF.cos(), freqs_TF.sin()

    def apply(self, x_TND: torch.Tensor, cos_TF: torch.Tensor, sin_TF: torch.Tensor) -> torch.Tensor:
        cos, sin = cos_TF[:, None, :], sin_TF[:, None, :]
        if self.style == "half":
            x1, x2 = x_TND.chunk(2, dim=-1)
            # The tables are float32: without the cast a 16-bit model's K would not match its cache's dtype.
            return (x_TND * cos + torch.cat((-x2, x1), dim=-1) * sin).type_as(x_TND)
        pairs = x_TND.float().unflatten(-1, (-1, 2))
        real, imag = pairs[..., 0], pairs[..., 1]
        rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
        return rotated.flatten(-2).type_as(x_TND)


def _llama3_scaled(inv_freq: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """Llama 3.1 frequency scaling, as transformers' `_compute_llama3_parameters`."""
    s = config.rope_scaling
    assert s is not None
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class StepContext:
    """What every layer of one forward pass shares: attention metadata and RoPE/temperature tables."""

    def __init__(self, config: ModelConfig, rotary: Rotary, meta: AttentionMetadata) -> None:
        self.meta = meta
        self.cos_TF, self.sin_TF = rotary.tables(meta.positions_T)
        self.attn_scales_T: torch.Tensor | None = None
        if config.attn_temperature_tuning:
            # Llama 4 NoPE layers sharpen attention with depth into the context (arXiv 2501.19399).
            floors = torch.floor((meta.positions_T.float() + 1.0) / config.floor_scale)
            self.attn_scales_T = torch.log1p(floors) * config.attn_scale + 1.0


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, rotary: Rotary, par: ParallelContext) -> None:
        super().__init__()
        self.config, self.rotary = config, rotary
        self.head_dim = config.head_dim
        self.use_rope = config.rope_layers[layer]
        self.chunked = config.is_chunked_layer(layer)
        self.use_qk_norm = config.use_qk_norm and self.use_rope
        self.temperature_tuning = config.attn_temperature_tuning and not self.use_rope
        bias = config.attention_bias
        h, d = config.hidden_size, config.head_dim
        # Heads split across the TP group; each rank attends with its own heads and KV cache shard.
        self.q_proj = ColumnParallelLinear(h, config.num_heads * d, par, bias=bias)
        self.k_proj = ColumnParallelLinear(h, config.num_kv_heads * d, par, bias=bias)
        self.v_proj = ColumnParallelLinear(h, config.num_kv_heads * d, par, bias=bias)
        self.o_proj = RowParallelLinear(config.num_heads * d, h, par, bias=bias)
        # q and k (side by side), and v, from one matmul once loaded (fusion.fuse_projections)
        self.qkv: Projections | None = None
        self.decode_kernel = decode_kernel(d)

    def forward(self, x_TH: torch.Tensor, ctx: StepContext, kv_cache: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        d = self.head_dim
        # q and k side by side: RoPE and the QK norm (both per head) run on the two at once.
        qk_TN, v_TK = self.qkv(x_TH) if self.qkv is not None else (
            torch.cat((self.q_proj(x_TH), self.k_proj(x_TH)), dim=-1), self.v_proj(x_TH))
        qk_THD, v_TKD = qk_TN.unflatten(-1, (-1, d)), v_TK.unflatten(-1, (-1, d))
        if self.use_rope:
            qk_THD = self.rotary.apply(qk_THD, ctx.cos_TF, ctx.sin_TF)
        if self.use_qk_norm:  # after RoPE, as Llama 4 does; a weightless RMS norm
            qk_THD = _rms(qk_THD, self.config.rms_norm_eps)
        q_TND, k_TKD = qk_THD.split((self.q_proj.out_features // d, self.k_proj.out_features // d), dim=1)
        if self.temperature_tuning and ctx.attn_scales_T is not None:
            q_TND = q_TND * ctx.attn_scales_T[:, None, None].to(q_TND.dtype)
        k_cache, v_cache = kv_cache
        write_kv(k_cache, v_cache, k_TKD, v_TKD, ctx.meta.slot_mapping_T)
        o_TND = paged_attention(q_TND, k_cache, v_cache, ctx.meta, self.chunked, d ** -0.5, self.decode_kernel)
        return self.o_proj(o_TND.flatten(-2))


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, par: ParallelContext, reduce: bool = True) -> None:
        super().__init__()
        self.gate_proj = ColumnParallelLinear(hidden_size, intermediate_size, par)
        self.up_proj = ColumnParallelLinear(hidden_size, intermediate_size, par)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, par, reduce=reduce)
        self.gate_up: Projections | None = None  # gate and up as one matmul, once loaded (fusion.fuse_projections)

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        gate_TI, up_TI = self.gate_up(x_TH) if self.gate_up is not None else (self.gate_proj(x_TH), self.up_proj(x_TH))
        return self.down_proj(F.silu(gate_TI) * up_TI)


class Experts(nn.Module):
    """The routed experts of one MoE layer, fused as in the checkpoint: gate_up [E, H, 2I], down [E, I, H]."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, hidden_size, 2 * intermediate_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))

    def forward(self, x_PH: torch.Tensor, counts_E: list[int]) -> torch.Tensor:
        """Rows of `x_PH` are sorted by expert; `counts_E[e]` rows belong to local expert e."""
        out_PH = torch.empty_like(x_PH)
        start = 0
        for e, count in enumerate(counts_E):
            if count:
                rows = slice(start, start + count)
                gate_PI, up_PI = (x_PH[rows] @ self.gate_up_proj[e]).chunk(2, dim=-1)
                out_PH[rows] = (F.silu(gate_PI) * up_PI) @ self.down_proj[e]
                start += count
        return out_PH


class MoE(nn.Module):
    """The single-device MoE layer; `ParallelMoE` is its TP × EP counterpart."""

    def __init__(self, config: ModelConfig, par: ParallelContext) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.num_experts
        self.router = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = Experts(config.num_experts, config.hidden_size, config.intermediate_size)
        self.shared_expert = MLP(config.hidden_size, config.intermediate_size, par)

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        """1. route: top-k of the router logits, each kept score squashed by a sigmoid;
        2. expand each token into its k (token, expert) pairs, sort the pairs by expert, and scale
           each pair's input by its score (Llama 4 scales the expert's input, not its output);
        3. run each expert on its contiguous rows;
        4. add every pair's output back onto its token, on top of the shared expert's output.
        """
        topk_vals_TK, topk_ids_TK = torch.topk(self.router(x_TH), self.top_k, dim=-1)
        scores_TK = torch.sigmoid(topk_vals_TK.float()).to(x_TH.dtype)
        order_P = torch.argsort(topk_ids_TK.flatten(), stable=True)
        token_P = order_P // self.top_k
        counts_E = torch.bincount(topk_ids_TK.flatten(), minlength=self.num_experts).tolist()
        x_PH = x_TH[token_P] * scores_TK.flatten()[order_P, None]
        y_PH = self.experts(x_PH, counts_E)
        return self.shared_expert(x_TH).index_add_(0, token_P, y_PH)


MoEClass = type[nn.Module]  # built as cls(config, par); MoE or ParallelMoE


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, rotary: Rotary, par: ParallelContext, moe_cls: MoEClass) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer, rotary, par)
        self.feed_forward: nn.Module = (
            moe_cls(config, par) if config.is_moe_layer(layer)
            else MLP(config.hidden_size, config.intermediate_size_mlp or config.intermediate_size, par))
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x_TH: torch.Tensor, ctx: StepContext, kv_cache: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x_TH = x_TH + self.self_attn(self.input_layernorm(x_TH), ctx, kv_cache)
        return x_TH + self.feed_forward(self.post_attention_layernorm(x_TH))


class TextModel(nn.Module):
    def __init__(self, config: ModelConfig, rotary: Rotary, par: ParallelContext, moe_cls: MoEClass) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, rotary, par, moe_cls) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class CausalLM(nn.Module):
    """Embedding and LM head are replicated on every rank: small beside the experts, and it keeps
    sampling local to any rank."""

    def __init__(self, config: ModelConfig, par: ParallelContext | None = None, moe_cls: MoEClass = MoE) -> None:
        super().__init__()
        self.config = config
        self.par = par or ParallelContext.single()
        self.rotary = Rotary(config)
        self.model = TextModel(config, self.rotary, self.par, moe_cls)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids_T: torch.Tensor, meta: AttentionMetadata, kv_caches: KVCaches) -> torch.Tensor:
        """Final hidden states `[T, H]` of every token of the step; K/V of each token land in the cache."""
        ctx = StepContext(self.config, self.rotary, meta)
        x_TH = self.model.embed_tokens(input_ids_T)
        for layer, kv_cache in zip(self.model.layers, kv_caches):
            x_TH = layer(x_TH, ctx, kv_cache)
        return self.model.norm(x_TH)

    @property
    def num_local_kv_heads(self) -> int:
        return self.config.num_kv_heads // self.par.dims.tp

    def compute_logits(self, hidden_NH: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden_NH).float()
