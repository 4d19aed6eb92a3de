"""The time of one engine step of one worker group, from what the step computes and moves.

Per rank and layer: the GEMMs of attention projections, dense MLPs, shared and routed experts (FLOPs at the
peak times an efficiency; weight bytes at the memory bandwidth times an efficiency, combined as a roofline
`max` on a GPU or a `sum` where they do not overlap), attention over each sequence's context (QK^T and PV
FLOPs: quadratic in a prompt on global layers, bounded by the window on chunked-local layers; KV bytes read),
then the collectives: two TP all-reduces per layer, and per MoE layer under EP the all-to-alls of dispatch and
combine and an all-gather. MoE: each EP rank routes 1/ep of the step's tokens; the busiest rank gets
`imbalance` times the mean share of (token, expert) pairs, and reads the weights of each local expert that
some token chose. Fixed costs per step, layer, sequence, prefill segment and expert come from calibration; a
calibrated profile prices each GEMM at the rate measured for its row count, and on a time-shared host (a CPU)
a group's ranks share its devices and stretch each other's compute as calibration fitted to its EP steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from garrison_workers.config import ModelConfig

from garrison.planner.dtypes import COMPUTE_DTYPE, kv_bytes, weight_bytes
from garrison.planner.hardware import Hardware, Link
from garrison.planner.layout import Group
from garrison.planner.memory import Precision
from garrison.planner.models import model_key, param_counts


@dataclass(slots=True, frozen=True)
class Row:
    """One sequence's share of a step: `new_tokens` computed after `context` tokens already in the cache."""

    new_tokens: int
    context: int
    logits: bool = True


@dataclass(slots=True)
class StepCost:
    """What a step costs on one rank, as the features calibration fits (seconds at efficiency 1, counts)."""

    # GEMM FLOPs / peak (GEMMs of at least SMALL_GEMM_TOKENS tokens); with a measured GEMM curve, every GEMM's
    # FLOPs / its rate at its rows
    gemm_flops_s: float = 0.0
    small_gemm_flops_s: float = 0.0  # the same for GEMMs of fewer tokens
    stream_bytes_s: float = 0.0  # weights and KV read / bandwidth
    attention_flops_s: float = 0.0  # attention FLOPs / peak
    attention_pairs: float = 0.0  # (query, key, head) pairs of prefill segments on this rank, masked ones included
    decode_pairs: float = 0.0  # (query, key, head) pairs of the decode batch, padded to its longest context
    blockwise_pairs: float = 0.0  # of those, on global layers over contexts longer than one key block
    spill_pairs: float = 0.0  # of those, in score tiles larger than the hardware's cache
    # iterations of the blockwise path: one key block of one segment on one global layer (a dozen small operations
    # each, whatever the queries: a decode row over a long context pays them for a single query)
    key_blocks: float = 0.0
    layers: int = 0
    rows: int = 0
    segments: int = 0  # layers × rows attended as prefill segments (each its own attention call, gathers, mask)
    experts: float = 0.0  # routed experts run on this rank
    comm_s: float = 0.0  # collectives (not scaled by any efficiency fitted here)
    # (flops_s, bytes_s, kind) of each GEMM group and each layer kind's attention
    ops: list[tuple[float, float, str]] = field(default_factory=list)


def step_kind(cost: StepCost) -> str:
    """"decode" for a step of one-token rows only; with any prefill segment (the engine's per-row attention calls)
    "blockwise" where a global layer attends past a key block (the engine's other attention path, whose cost per
    key a model's steps within one block do not tell), else "prefill"."""
    if not cost.segments:
        return "decode"
    return "blockwise" if cost.blockwise_pairs else "prefill"


def attended_keys(context: int, new: int, window: int | None) -> int:
    """Keys that `new` queries after `context` attend together, as the engine lays them out: on a chunked-local
    layer from the first query's window start (`attention.causal_masks`), on a global layer from key 0, to the
    last query. The engine computes every (query, key) pair of that rectangle, masked ones too (SDPA with an
    explicit mask and the blockwise path skip nothing), so a prompt chunk costs queries × these keys."""
    return context + new - (context // window * window if window else 0)


SMALL_GEMM_TOKENS = 64  # GEMMs of fewer rows (decode batches, one expert's tokens) run at `Efficiency.gemm_small`


class StepTimeModel:
    def __init__(self, model: ModelConfig, hardware: Hardware, precision: Precision, group: Group,
                 on_ray: bool = True, imbalance: float = 1.0, key_block: int = 1024) -> None:
        if imbalance < 1:
            raise ValueError(f"imbalance is the busiest rank's share over the mean, >= 1; got {imbalance}")
        self.model, self.hw, self.precision, self.group = model, hardware, precision, group
        self.on_ray, self.imbalance, self.key_block = on_ray, imbalance, key_block
        self.num_global = sum(not model.is_chunked_layer(i) for i in range(model.num_layers))
        self.counts = param_counts(model)
        self.key = model_key(model)
        self.flops = hardware.peak_flops(COMPUTE_DTYPE[precision.weights])
        self.w_bytes, self.kv_bytes = weight_bytes(precision.weights), kv_bytes(precision.kv)
        self.act_bytes = 4.0 if precision.weights == "fp32" else 2.0
        self.link = hardware.scaleout if group.spans_nodes(hardware.gpus_per_node) and not hardware.time_shared \
            else hardware.nvlink

    # -- the step ---------------------------------------------------------------------------------

    def seconds(self, rows: list[Row]) -> float:
        """The step's fastest run (what calibration fits; the simulation adds the machine's spread to it)."""
        return self.combine(self.cost(rows))

    def combine(self, cost: StepCost) -> float:
        stretched, rest = self.parts(cost)
        return stretched * (self.hw.efficiency.stretch(self.group.gpus) if self.hw.time_shared else 1.0) + rest

    def parts(self, cost: StepCost) -> tuple[float, float]:
        """The step's seconds as (the ranks' compute, which ranks stepping at once on a time-shared host stretch by
        `Efficiency.stretch`; the rest: step overhead, collectives, the group's call)."""
        eff, hw = self.hw.efficiency, self.hw
        join = max if eff.overlap == "max" else (lambda a, b: a + b)
        share = {"gemm": eff.gemm, "small": eff.gemm_small, "attention": eff.attention}
        compute = sum(join(f / share[kind], b / eff.memory) for f, b, kind in cost.ops)
        compute += (cost.attention_pairs * eff.attention_pair_s + cost.decode_pairs * eff.decode_pair_s
                    + cost.blockwise_pairs * eff.blockwise_pair_s + cost.spill_pairs * eff.spill_pair_s
                    + cost.key_blocks * eff.key_block_s)
        fixed = (cost.layers * eff.layer_overhead_s + cost.rows * eff.row_overhead_s
                 + cost.segments * eff.segment_overhead_s
                 + cost.experts * eff.expert_overhead_s)
        devices = max(1.0, self.group.gpus / hw.gpus_per_node) if hw.time_shared else 1.0
        # A colocated group's steps overlap (the engine's async scheduling): the call's round trip is hidden behind
        # the step before. A disaggregated replica's groups run one step after the other and pay it.
        call = eff.group_call_s if self.on_ray and self.group.role != "both" else 0.0
        # where calibration timed this model's own steps, the rank's part as they ran (collectives and calls are
        # measured apart)
        own = eff.own_ratio(self.key, step_kind(cost), compute + fixed + eff.step_overhead_s)
        return (compute + fixed) * devices * own, eff.step_overhead_s * own + cost.comm_s + call

    def cost(self, rows: list[Row]) -> StepCost:
        cost = StepCost(layers=self.model.num_layers, rows=len(rows))
        cost.segments = self.model.num_layers * sum(not self._decodes(r) for r in rows)
        tokens = sum(r.new_tokens for r in rows)
        if not tokens:
            return cost
        self._linear_ops(cost, tokens, sum(r.logits for r in rows))
        self._attention(cost, rows, chunked=False, layers=self.num_global)
        self._attention(cost, rows, chunked=True, layers=self.model.num_layers - self.num_global)
        cost.comm_s = self._comm(tokens)
        return cost

    # -- parts ------------------------------------------------------------------------------------

    def _gemm(self, cost: StepCost, tokens: float, params: float, w_bytes: float) -> None:
        """GEMMs of `params` weights over `tokens` tokens."""
        if tokens > 0 and params > 0:
            self._op(cost, 2 * tokens * params / self.flops, params * w_bytes / self.hw.hbm_bandwidth, tokens)

    def _op(self, cost: StepCost, flops_s: float, bytes_s: float, rows: float) -> None:
        """A GEMM (or a group of them) with `rows` tokens per call."""
        eff = self.hw.efficiency
        if eff.gemm_curve:  # the measured rate at these rows, its weights' reads included
            seconds = flops_s / eff.curve_share(rows)
            cost.gemm_flops_s += seconds
            cost.ops.append((seconds, 0.0, "gemm"))
            return
        small = rows < SMALL_GEMM_TOKENS
        if small:
            cost.small_gemm_flops_s += flops_s
        else:
            cost.gemm_flops_s += flops_s
        cost.stream_bytes_s += bytes_s
        cost.ops.append((flops_s, bytes_s, "small" if small else "gemm"))

    def _linear_ops(self, cost: StepCost, tokens: int, logit_rows: int) -> None:
        m, c, tp, ep = self.model, self.counts, self.group.tp, self.group.ep
        whole = 4.0 if self.precision.unquantized == "fp32" else 2.0
        self._gemm(cost, tokens, c.attention / tp, self.w_bytes)
        self._gemm(cost, tokens, c.dense_mlp / tp, self.w_bytes)
        if c.num_moe_layers:
            local = tokens / ep
            self._gemm(cost, local, c.router, whole)
            self._gemm(cost, local, c.shared_expert / tp, self.w_bytes)
            pairs = local * c.top_k * self.imbalance
            local_experts = math.ceil(c.num_experts / ep)
            touched = local_experts * (1 - (1 - 1 / c.num_experts) ** (tokens * c.top_k))
            cost.experts += touched * c.num_moe_layers
            # FLOPs of the busiest rank's pairs, `pairs / touched` rows per expert; weights of the touched experts
            expert = c.routed_expert / tp * c.num_moe_layers
            self._op(cost, 2 * pairs * expert / self.flops, touched * expert * self.w_bytes / self.hw.hbm_bandwidth,
                     pairs / max(touched, 1e-9))
        self._gemm(cost, logit_rows, m.vocab_size * m.hidden_size, whole)

    def _attention(self, cost: StepCost, rows: list[Row], chunked: bool, layers: int) -> None:
        """Attention of every row on `layers` layers of one kind (global, or chunked-local)."""
        if not layers:
            return
        m, tp = self.model, self.group.tp
        q_heads, kv_heads = max(1, m.num_heads // tp), max(1, m.num_kv_heads // tp)
        window = (m.attention_chunk_size or 1) if chunked else None
        # The padded decode batch: every one-token row within a key block reads as many keys as the longest does.
        decode = [attended_keys(r.context, 1, window) for r in rows if self._decodes(r)]
        decode_pairs = len(decode) * max(decode, default=0)
        pairs, keys, blockwise, spill, blocks = 0, decode_pairs, 0, 0, 0
        for row in rows:
            if self._decodes(row):
                continue
            k = attended_keys(row.context, row.new_tokens, window)
            p = row.new_tokens * k
            if not chunked and row.context + row.new_tokens > self.key_block:
                blockwise += p
                blocks += -(-(row.context + row.new_tokens) // self.key_block)
                tile = q_heads // kv_heads * row.new_tokens * self.key_block * 4
                spill += p if self.hw.cache_bytes and tile > self.hw.cache_bytes else 0
            pairs, keys = pairs + p, keys + k
        flops_s = 4 * (pairs + decode_pairs) * m.head_dim * q_heads / self.flops * layers
        bytes_s = keys * 2 * kv_heads * m.head_dim * self.kv_bytes / self.hw.hbm_bandwidth * layers
        cost.attention_flops_s += flops_s
        cost.stream_bytes_s += bytes_s
        cost.attention_pairs += pairs * q_heads * layers
        cost.decode_pairs += decode_pairs * q_heads * layers
        cost.blockwise_pairs += blockwise * q_heads * layers
        cost.spill_pairs += spill * q_heads * layers
        cost.key_blocks += blocks * layers
        cost.ops.append((flops_s, bytes_s, "attention"))

    def _decodes(self, row: Row) -> bool:
        """As the model runner lays rows out: one token within a key block joins the padded decode batch; any other
        row is a prefill segment of its own on every layer."""
        return row.new_tokens == 1 and row.context + 1 <= self.key_block

    def _comm(self, tokens: int) -> float:
        m, c, tp, ep = self.model, self.counts, self.group.tp, self.group.ep
        row = m.hidden_size * self.act_bytes
        seconds = 0.0
        if tp > 1:
            seconds += 2 * m.num_layers * _collective(self.link, tp, 2 * (tp - 1) / tp * tokens * row)
        if ep > 1 and c.num_moe_layers:
            moved = tokens / ep * c.top_k * self.imbalance * row * (ep - 1) / ep
            gathered = tokens / ep * row * (ep - 1)
            per_layer = (_collective(self.link, ep, 0) * 2 + _collective(self.link, ep, moved) * 2
                         + _collective(self.link, ep, gathered))
            seconds += c.num_moe_layers * per_layer
        return seconds

    # -- handoff ----------------------------------------------------------------------------------

    def handoff_seconds(self, tokens: int, link: Link) -> float:
        """Moving a prompt's KV (every layer, as the block manager holds it) from a prefill to a decode group."""
        m = self.model
        nbytes = tokens * 2 * m.num_kv_heads * m.head_dim * m.num_layers * self.kv_bytes
        return link.latency(2) + nbytes / (link.bandwidth * link.efficiency * max(1, self.group.tp))


def _collective(link: Link, ranks: int, nbytes: float) -> float:
    return link.latency(ranks) + nbytes / (link.bandwidth * link.efficiency)
