"""Conversions between checkpoint encodings and the canonical form (see the package docstring), and back.

Pure tensor code, no file access: the sources call it on what they read. The canonical int4 code is
unsigned (0..15) with the midpoint 8, so that every 4-bit encoding maps onto it exactly:

    GGUF Q4_0       w = (q - 8) d           scale d, no zero
    GGUF Q4_1       w = q d + m             scale d, zero m + 8 d
    compressed-tensors int4, symmetric      w = q_s s  (q_s = q - 8)      scale s, no zero
    compressed-tensors int4, asymmetric     w = (q_s - zp) s              scale s, zero -zp s
"""

from __future__ import annotations

import numpy as np
import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def unpack_int4(payload: torch.Tensor) -> torch.Tensor:
    """[..., K/2] uint8 -> [..., K] int32 codes 0..15 (element 2j from the low nibble)."""
    low, high = payload & 0xF, payload >> 4
    return torch.stack((low, high), dim=-1).flatten(-2).to(torch.int32)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """[..., K] codes 0..15 -> [..., K/2] uint8 (the inverse of unpack_int4)."""
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def expand_groups(per_group: torch.Tensor, group_size: int) -> torch.Tensor:
    return per_group.repeat_interleave(group_size, dim=-1)


def dequantize(kind: str, payload: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """The float32 weight [..., N, K] a canonical quantized weight stands for."""
    codes = unpack_int4(payload).float() - 8 if kind == "int4" else payload.float()
    group = codes.shape[-1] // scale.shape[-1]
    weight = codes * expand_groups(scale.float(), group)
    return weight + expand_groups(zero.float(), group) if zero is not None else weight


def quantize_rtn(weight: torch.Tensor, kind: str, group_size: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest of a float weight [..., N, K] into (payload, scale, zero).

    int4 is asymmetric (each group's min..max onto 0..15: one more level than symmetric, and no level
    wasted on a range the group does not use); int8 is symmetric (q in -127..127)."""
    w = weight.float().unflatten(-1, (-1, group_size))
    if kind == "int8":
        scale = (w.abs().amax(-1) / 127).clamp_min(1e-12)
        q = torch.round(w / scale[..., None]).clamp(-127, 127).to(torch.int8)
        return q.flatten(-2), scale, None
    if kind != "int4":
        raise ValueError(f"quantize_rtn makes int4 or int8, not {kind}")
    low, high = w.amin(-1).clamp_max(0), w.amax(-1).clamp_min(0)
    scale = ((high - low) / 15).clamp_min(1e-12)
    q = torch.round((w - low[..., None]) / scale[..., None]).clamp(0, 15)
    return pack_int4(q.flatten(-2)), scale, low + 8 * scale


# -- GGUF blocks (llama.cpp's ggml-common.h) -------------------------------------------------------------

GGUF_BLOCK = 32


def from_gguf_blocks(kind: str, raw: np.ndarray, rows: int, cols: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A GGUF tensor's raw blocks ([rows, bytes per row] uint8) as canonical (payload, scale, zero)."""
    blocks = np.ascontiguousarray(raw).reshape(rows, cols // GGUF_BLOCK, -1)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if kind == "Q8_0":
        q = blocks[..., 2:].copy().view(np.int8).reshape(rows, cols)
        return torch.from_numpy(q), torch.from_numpy(d), None
    start = 2 if kind == "Q4_0" else 4
    qs = blocks[..., start:start + 16]
    # A block keeps element j in the low nibble of byte j and element j + 16 in its high nibble.
    codes = np.concatenate((qs & 0xF, qs >> 4), axis=-1).reshape(rows, cols)
    payload = pack_int4(torch.from_numpy(codes))
    if kind == "Q4_0":
        return payload, torch.from_numpy(d), None
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    return payload, torch.from_numpy(d), torch.from_numpy(m + 8 * d)


# -- compressed-tensors ---------------------------------------------------------------------------------


def from_packed_int32(packed: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' `weight_packed` (int32 [..., K/8], 4-bit codes + 8, element i at bit 4i of the
    little-endian row) is the canonical nibble layout once seen as bytes."""
    return packed.contiguous().view(torch.uint8)


def zero_points_from_packed(packed: torch.Tensor, rows: int) -> torch.Tensor:
    """compressed-tensors packs int4 zero points along dim 0 (int32 [ceil(N/8), G]): signed [N, G]."""
    nibbles = packed.transpose(-1, -2).contiguous().view(torch.uint8)
    return (unpack_int4(nibbles)[..., :rows] - 8).transpose(-1, -2)
