"""Attention over the paged KV cache, and the per-step metadata that describes where tokens live.

The model runner lays out each step's tokens as: all decode rows first (one query token each, over
a context of at most one key block), then every prefill chunk contiguously. Decode rows are
attended in one padded batch; prefill chunks one sequence at a time, each against its own blocks,
and so is a one-token row over a longer context (a long prompt decoding), which padding would
otherwise impose on every row of the batch. Masks are built once per step (one for global layers,
one for chunked-local layers) and shared by every layer.

Long contexts stay in bounded memory: a chunked-local layer gathers only its window, and a global
layer whose context exceeds one key block is attended block by block with an online softmax, so
neither a prefill chunk nor a decode row materializes a (queries × context) matrix or gathers the
whole context at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from garrison_workers import native

_KERNEL_DTYPES = (torch.float32, torch.bfloat16)  # decode_attention's, for queries and cache alike


@dataclass(slots=True)
class PrefillSegment:
    """One sequence's prefill chunk: queries `[query_start, query_start+query_len)` of the step."""

    query_start: int
    query_len: int
    slots_L: torch.Tensor  # cache slots of every key the chunk may see (context so far + itself)
    positions_Q: torch.Tensor
    mask_global_QL: torch.Tensor | None  # bool, True = may attend; None when attended blockwise
    chunked_key_start: int  # keys before this are outside every query's local window
    mask_chunked_QL: torch.Tensor  # bool over keys[chunked_key_start:]
    key_block: int  # keys per block of the blockwise path


@dataclass(slots=True)
class AttentionMetadata:
    positions_T: torch.Tensor  # absolute position of every token of the step
    slot_mapping_T: torch.Tensor  # cache slot each token's K/V is written to
    num_decode: int
    decode_slots_BL: torch.Tensor | None  # padded gather index of every decode row's keys
    decode_mask_global_B11L: torch.Tensor | None
    decode_mask_chunked_B11W: torch.Tensor | None
    decode_chunked_slots_BW: torch.Tensor | None  # only the keys inside each row's local window
    prefills: list[PrefillSegment]


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k_TKD: torch.Tensor, v_TKD: torch.Tensor,
             slot_mapping_T: torch.Tensor) -> None:
    """The step's new K/V into their slots (the slots live with the cache, which may be in host memory)."""
    k_cache.index_copy_(0, slot_mapping_T, k_TKD.to(k_cache.device))
    v_cache.index_copy_(0, slot_mapping_T, v_TKD.to(v_cache.device))


DecodeKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def decode_kernel(head_dim: int) -> DecodeKernel | None:
    """Garrison's `decode_attention` op (`native`) where this process can run it, else None (decode rows then
    gather their keys and use sdpa): it reads each key where it lies in the cache instead of copying them all."""
    if head_dim % 16 or not native.attention_available():
        return None
    return native.ops().decode_attention


def paged_attention(q_THD: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, chunked: bool, scale: float,
                    kernel: DecodeKernel | None = None) -> torch.Tensor:
    """Attention of every query row of the step; the step's own K/V must already be in the cache. `kernel`
    (`decode_kernel`) attends the decode rows when their tensors are on the CPU."""
    out_THD = torch.empty_like(q_THD)
    if meta.num_decode:
        _decode_attention(q_THD, out_THD, k_cache, v_cache, meta, chunked, scale, kernel)
    for seg in meta.prefills:
        _prefill_attention(q_THD, out_THD, k_cache, v_cache, seg, chunked, scale)
    return out_THD


def _decode_attention(q_THD: torch.Tensor, out_THD: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      meta: AttentionMetadata, chunked: bool, scale: float, kernel: DecodeKernel | None) -> None:
    assert meta.decode_slots_BL is not None
    num_decode = meta.num_decode
    # Padding points at the runner's pad slot, which no sequence writes (zeros): masked keys add exact zeros.
    slots = meta.decode_chunked_slots_BW if chunked else meta.decode_slots_BL
    mask = meta.decode_mask_chunked_B11W if chunked else meta.decode_mask_global_B11L
    assert slots is not None and mask is not None
    if (kernel is not None and q_THD.device.type == k_cache.device.type == "cpu"
            and q_THD.dtype in _KERNEL_DTYPES and k_cache.dtype in _KERNEL_DTYPES):
        o_BHD = kernel(q_THD[:num_decode], k_cache, v_cache, slots, mask.view(num_decode, -1), scale)
        out_THD[:num_decode] = o_BHD.to(out_THD.dtype)
        return
    q_BH1D = q_THD[:num_decode].unsqueeze(2)
    k_BKLD = _gather(k_cache, slots, q_THD.device).transpose(1, 2)
    v_BKLD = _gather(v_cache, slots, q_THD.device).transpose(1, 2)
    if q_BH1D.device.type == "cpu" and q_BH1D.dtype != torch.float32:
        # On CPU, one query row per sequence attends several times faster in float32 than in 16 bits (the
        # 16-bit kernel is slower per element and does not parallelize a batch of single rows), and no less
        # exactly: the result is rounded to the model's dtype once.
        q_BH1D, k_BKLD, v_BKLD = q_BH1D.float(), k_BKLD.float(), v_BKLD.float()
    o_BH1D = F.scaled_dot_product_attention(q_BH1D, k_BKLD, v_BKLD, attn_mask=mask, scale=scale, enable_gqa=True)
    out_THD[:num_decode] = o_BH1D.squeeze(2).to(out_THD.dtype)


def _prefill_attention(q_THD: torch.Tensor, out_THD: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       seg: PrefillSegment, chunked: bool, scale: float) -> None:
    rows = slice(seg.query_start, seg.query_start + seg.query_len)
    q_HQD = q_THD[rows].transpose(0, 1)
    if not chunked and seg.mask_global_QL is None:
        out_THD[rows] = _blockwise_attention(q_HQD, k_cache, v_cache, seg, scale).transpose(0, 1)
        return
    slots_L = seg.slots_L[seg.chunked_key_start:] if chunked else seg.slots_L
    mask_QL = seg.mask_chunked_QL if chunked else seg.mask_global_QL
    k_KLD = _gather(k_cache, slots_L, q_THD.device).transpose(0, 1)
    v_KLD = _gather(v_cache, slots_L, q_THD.device).transpose(0, 1)
    # 4-D inputs: on CPU only those reach the fused (flash) kernel; 3-D ones materialize the scores.
    o_1HQD = F.scaled_dot_product_attention(q_HQD[None], k_KLD[None], v_KLD[None], attn_mask=mask_QL,
                                            scale=scale, enable_gqa=True)
    out_THD[rows] = o_1HQD[0].transpose(0, 1)


def _blockwise_attention(q_HQD: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         seg: PrefillSegment, scale: float) -> torch.Tensor:
    """Causal attention over a long context one key block at a time (the flash-attention recurrence).

    Each query row keeps a running max `m`, normalizer `l` and weighted sum `acc`; memory is
    O(query_len × key_block) whatever the context length. Query heads are grouped under their KV
    head (GQA) so keys are gathered once per KV head.

    The score tile is one buffer that every block overwrites in place: a fresh tile per operation and block (tens
    of MB for a 2k-token chunk) cost more in allocation and page faults than the arithmetic, 2-4x the time of
    the whole function on a CPU.
    """
    num_heads, num_queries, head_dim = q_HQD.shape
    num_kv = k_cache.shape[1]
    rows = num_heads // num_kv * num_queries
    q_KRD = q_HQD.reshape(num_kv, rows, head_dim) * scale
    positions_R = seg.positions_Q.to(q_HQD.device).repeat(num_heads // num_kv)
    m_KR1 = q_KRD.new_full((num_kv, rows, 1), float("-inf"))
    l_KR1 = q_KRD.new_zeros((num_kv, rows, 1))
    acc_KRD = q_KRD.new_zeros((num_kv, rows, head_dim))
    context = seg.slots_L.shape[0]
    tile = q_KRD.new_empty(num_kv * rows * min(seg.key_block, context))
    for start in range(0, context, seg.key_block):
        stop = min(start + seg.key_block, context)
        slots = seg.slots_L[start:stop]
        s_KRB = tile[:num_kv * rows * (stop - start)].view(num_kv, rows, stop - start)
        torch.matmul(q_KRD, _gather(k_cache, slots, q_HQD.device).permute(1, 2, 0), out=s_KRB)
        if stop - 1 > int(seg.positions_Q[0]):  # the block reaches past the first query: mask the future
            keys_B = torch.arange(start, stop, device=q_HQD.device)
            s_KRB.masked_fill_(keys_B[None, :] > positions_R[:, None], float("-inf"))
        m_new = torch.maximum(m_KR1, s_KRB.amax(dim=-1, keepdim=True))  # finite: key 0 is always visible
        p_KRB = s_KRB.sub_(m_new).exp_()
        correction = torch.exp(m_KR1 - m_new)
        l_KR1 = l_KR1 * correction + p_KRB.sum(dim=-1, keepdim=True)
        acc_KRD = acc_KRD * correction + p_KRB @ _gather(v_cache, slots, q_HQD.device).transpose(0, 1)
        m_KR1 = m_new
    return (acc_KRD / l_KR1).reshape(num_heads, num_queries, head_dim)


def _gather(cache: torch.Tensor, slots: torch.Tensor, device: torch.device) -> torch.Tensor:
    """cache[slots] for an index of any shape, on `device` (only these keys cross from a host-memory cache);
    index_select is several times faster than advanced indexing on CPU."""
    return cache.index_select(0, slots.flatten()).view(*slots.shape, *cache.shape[1:]).to(device)


def causal_masks(positions_Q: torch.Tensor, context_len: int, chunk_size: int | None, key_block: int
                 ) -> tuple[torch.Tensor | None, int, torch.Tensor]:
    """Masks of queries at `positions_Q` over keys 0..context_len-1: global causal, and local chunked.

    The global mask is None when the context exceeds `key_block` (attended blockwise instead).
    Chunked layers (Llama 4's RoPE layers) let position p see keys in `[p // c * c, p]`, as
    transformers' `create_chunked_causal_mask` does. Returns the chunked mask cut to the keys from
    the first query's window start, so chunked layers never gather keys no query can see.
    """
    keys_L = torch.arange(context_len)
    global_QL = keys_L[None, :] <= positions_Q[:, None] if context_len <= key_block else None
    if chunk_size is None:
        no_chunked_layers = torch.empty((0, 0), dtype=torch.bool)
        return global_QL, 0, no_chunked_layers
    key_start = int(positions_Q[0]) // chunk_size * chunk_size
    local_keys = keys_L[key_start:]
    chunked_QL = (local_keys[None, :] <= positions_Q[:, None]) & (
        local_keys[None, :] // chunk_size == positions_Q[:, None] // chunk_size)
    return global_QL, key_start, chunked_QL
