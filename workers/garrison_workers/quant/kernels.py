"""Matmuls with quantized weights: `make_kernel` picks the fastest kernel the device and shapes allow.

Every kernel computes y[T, N] = x[T, K] @ W.T for the W that the canonical tensors stand for
(`codec.dequantize`), in the activations' dtype (a8_mm: float32), and holds its weights in its own layout
(derived once, at load). The choices, fastest first:

- CPU int4 and int8 with AVX512-VNNI, int8 activations (kernel dtype torch.int8, engine dtype "auto"'s):
  Garrison's `a8_mm` (`native`, garrison_workers/csrc/a8_cpu.cpp), llama.cpp's arithmetic: each block of 32
  activations rounded to int8 with its own scale, multiplied by the weights' codes with integer dot products;
  its matmuls 2-3x faster than PyTorch's kernels here, its activations with ~2x the rounding error of bf16
  ones. It needs N % 16 == 0 and groups (or a per-channel row) of a multiple of 32 inputs. Without it (or for
  other shapes, or bf16 activations asked for), with bf16 activations:
- CPU int4: PyTorch's packed int4 matmul (`_weight_int4pack_mm_for_cpu`), bf16 activations: codes
  stay 4-bit in memory and are widened tile by tile. It needs N % 16 == 0 and groups of 32..256 (a
  per-channel scale is repeated over groups of 256..32, which is exact).
- CPU int8 per channel: `_weight_int8pack_mm`.
- CPU int8 with group scales (GGUF Q8_0): the int8 code q is split exactly into 16 h + l (h signed,
  l in 0..15) and computed as two packed int4 matmuls: d q = 16 d h + d l, bytes read as int8's.
- FP8 on CPU: the weight stays FP8 and is widened per call (a correctness path, as the issue allows);
  `fp8_dynamic` first rounds each token's activations to FP8 with its own scale, the arithmetic of
  the FP8 GEMM (W8A8) the checkpoint was calibrated for.
- CUDA: FP8 through `torch._scaled_mm` (per-token activation scales, per-channel weight scales);
  int4 through `_weight_int4pack_mm` (tinygemm, bf16).
- Anything else (odd shapes): the weight stays quantized and is dequantized per call.

Kernels of one kind that read the same input (a layer's q, k and v) stack into one (`stack_kernels`, for
`garrison_workers.fusion`): one call instead of several, checked once against its parts.

With float32 activations on CPU (an engine asked for float32: exact arithmetic), int4 and int8 weights are
dequantized once, at load, into a float32 matrix: the packed kernels' float32 paths are 5-10x slower than a
dense float32 matmul, and the result is the same to float32 rounding. Low-bit weights stay low-bit in memory
with int8 or bf16 activations (engine dtype "auto"; a8_mm also takes float32 ones, see `input_dtype`).
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from garrison_workers import native
from garrison_workers.quant.codec import FP8_MAX, dequantize, expand_groups, unpack_int4

INT4_GROUPS = (256, 128, 64, 32)  # what the packed int4 kernels accept, widest first
INT4_PACK_ROWS = 64  # the CPU int4 packing's block of rows (BLOCK_N of PyTorch's int4mm kernel)
INT8_BLOCK = 32  # inputs per activation scale of a8_mm
# Makes a per-token amax [T, 1] of this rank's input shard that of the whole row (a MAX over the TP group), so
# that a row-parallel FP8 layer rounds its activations exactly as one device would.
AmaxReduce = Callable[[torch.Tensor], torch.Tensor]


class Kernel(Protocol):
    def __call__(self, x_TK: torch.Tensor) -> torch.Tensor: ...

    def tensors(self) -> list[torch.Tensor]:
        """What the kernel holds (for memory accounting)."""
        ...


def make_kernel(kind: str, payload: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                dtype: torch.dtype, amax_reduce: AmaxReduce | None = None) -> Kernel:
    """The kernel for a canonical weight [N, K] on its tensors' device, computing in `dtype`: torch.int8 asks for
    activations rounded to int8 (a8_mm), where it runs, and bfloat16 elsewhere (`activation_dtype`)."""
    int8_activations, dtype = dtype == torch.int8, activation_dtype(dtype)
    out_features, in_features = scale.shape[0], payload.shape[-1] * (2 if kind == "int4" else 1)
    group = in_features // scale.shape[-1]
    cuda = payload.device.type == "cuda"
    if kind.startswith("fp8"):
        if cuda and _scaled_mm_ok(out_features, in_features) and scale.shape[-1] == 1:
            return ScaledMMFp8(payload, scale, dtype, amax_reduce)
        return WideFp8(payload, scale, dtype, dynamic=kind == "fp8_dynamic", amax_reduce=amax_reduce)
    packed_group = _int4_group(group, in_features)
    if not cuda and dtype == torch.float32:
        return Dense(dequantize(kind, payload, scale, zero))
    if cuda:
        if kind == "int4" and packed_group and dtype == torch.bfloat16 and in_features % 1024 == 0:
            return Int4CUDA(unpack_int4(payload), scale, zero, group, packed_group)
        return Dequantized(kind, payload, scale, zero, dtype)
    if (int8_activations and kind in ("int4", "int8") and out_features % 16 == 0 and group % INT8_BLOCK == 0
            and native.available()):
        return A8CPU(kind, payload, scale, zero)
    if out_features % 16 == 0 and packed_group:
        if kind == "int4":
            return Int4CPU(unpack_int4(payload), scale, zero, group, packed_group, dtype)
        if scale.shape[-1] > 1:
            return SplitInt8CPU(payload, scale, group, packed_group, dtype)
    if kind == "int8" and scale.shape[-1] == 1:
        return Int8CPU(payload, scale, dtype)
    return Dequantized(kind, payload, scale, zero, dtype)


def _int4_group(group: int, in_features: int) -> int | None:
    """A group size the packed kernels accept that divides `group` (scales repeat over its subgroups)."""
    return next((g for g in INT4_GROUPS if group % g == 0 and in_features % g == 0), None)


def _scales_and_zeros(scale: torch.Tensor, zero: torch.Tensor | None, group: int, packed_group: int,
                      dtype: torch.dtype) -> torch.Tensor:
    """[K / packed_group, N, 2]: the packed kernels' per-group (scale, zero), with w = (q - 8) * scale + zero."""
    repeat = group // packed_group
    scale = scale.float().repeat_interleave(repeat, dim=-1)
    zero = torch.zeros_like(scale) if zero is None else zero.float().repeat_interleave(repeat, dim=-1)
    return torch.stack((scale.t(), zero.t()), dim=-1).to(dtype).contiguous()


class Int4CPU:
    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group: int,
                 packed_group: int, dtype: torch.dtype) -> None:
        # [N, K / 2] bytes, a row per output feature: stacking kernels stacks these rows.
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
        self.group = packed_group
        self.scales_zeros = _scales_and_zeros(scale, zero, group, packed_group, dtype)

    def __call__(self, x_TK: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x_TK, self.packed, self.group, self.scales_zeros)

    def tensors(self) -> list[torch.Tensor]:
        return [self.packed, self.scales_zeros]

    @staticmethod
    def stacked(parts: "list[Int4CPU]") -> "Int4CPU | None":
        # The packed layout interleaves rows in blocks of INT4_PACK_ROWS: stacked, a part that ended inside a
        # block would shift every row after it. The stacked kernel is checked against its parts all the same.
        if len({(p.group, p.packed.shape[1], p.scales_zeros.dtype) for p in parts}) > 1 or any(
                p.packed.shape[0] % INT4_PACK_ROWS for p in parts[:-1]):
            return None
        merged = Int4CPU.__new__(Int4CPU)
        merged.group = parts[0].group
        merged.packed = torch.cat([p.packed for p in parts])
        merged.scales_zeros = torch.cat([p.scales_zeros for p in parts], dim=1).contiguous()
        return merged if _computes_as(merged, parts) else None


def tile_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes [N, K] -> a8_mm's layout [N / 16, K * bits / 512, 64] (see csrc/a8_cpu.cpp): per 16
    rows, 64 bytes hold 4 inputs (int8: byte 4 r + j is row r's input j) or 8 (int4: input j in the low nibble,
    input 4 + j in the high one)."""
    n, k = codes.shape
    if bits == 8:
        return codes.to(torch.uint8).view(n // 16, 16, k // 4, 4).transpose(1, 2).reshape(n // 16, k // 4, 64)
    nibbles = codes.to(torch.uint8).view(n // 16, 16, k // 8, 2, 4).permute(0, 2, 1, 4, 3)  # tile, chunk, r, j, lo|hi
    return (nibbles[..., 0] | nibbles[..., 1] << 4).reshape(n // 16, k // 8, 64).contiguous()


class A8CPU:
    """int4 or int8 weights by activations rounded to int8 per block of 32 (a8_mm; `native`): float32
    outputs, from bf16 or float32 inputs (see `input_dtype`)."""

    INPUTS = (torch.bfloat16, torch.float32)

    def __init__(self, kind: str, payload: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> None:
        self.bits = 4 if kind == "int4" else 8
        self.op = native.ops().a8_mm  # held, not looked up per call: torch.compile would guard each lookup
        # Unsigned codes u with w = u s + o: int4 codes are u - 8, int8's q is stored as u = q + 128.
        codes = unpack_int4(payload) if kind == "int4" else payload.to(torch.int32) + 128
        mid = 8 if kind == "int4" else 128
        self.group = codes.shape[1] // scale.shape[1]
        self.codes = tile_codes(codes, self.bits)
        scale = scale.float()
        offset = -mid * scale if zero is None else zero.float() - mid * scale
        # [N / 16, K / group, 16]; float16 when that holds them exactly (a GGUF file's scales are float16): half the
        # bytes to read.
        exact = all(torch.equal(t.half().float(), t) for t in (scale, offset))
        self.scales, self.offsets = (t.to(torch.float16 if exact else torch.float32).view(-1, 16, t.shape[1])
                                     .transpose(1, 2).contiguous() for t in (scale, offset))

    def __call__(self, x_TK: torch.Tensor) -> torch.Tensor:
        return self.op(x_TK, self.codes, self.scales, self.offsets, self.group, self.bits)

    def tensors(self) -> list[torch.Tensor]:
        return [self.codes, self.scales, self.offsets]

    @property
    def in_features(self) -> int:
        return self.codes.shape[1] * 512 // (16 * self.bits)

    @staticmethod
    def stacked(parts: "list[A8CPU]") -> "A8CPU | None":
        # Tiles are independent: the stacked kernel's tiles are the parts' tiles one after the other.
        if len({(p.bits, p.group, p.codes.shape[1], p.scales.dtype) for p in parts}) > 1:
            return None
        merged = A8CPU.__new__(A8CPU)
        merged.op, merged.bits, merged.group = parts[0].op, parts[0].bits, parts[0].group
        merged.codes, merged.scales, merged.offsets = (torch.cat([getattr(p, name) for p in parts])
                                                       for name in ("codes", "scales", "offsets"))
        return merged if _computes_as(merged, parts) else None


class SplitInt8CPU:
    """Group-scaled int8 as two exact int4 halves: q = 16 h + l, h = q >> 4 in -8..7, l = q & 15."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, group: int, packed_group: int, dtype: torch.dtype) -> None:
        wide = q.to(torch.int32)
        high, low = (wide >> 4) + 8, wide & 15  # the kernel reads code c as c - 8
        self.high = Int4CPU(high, 16 * scale.float(), None, group, packed_group, dtype)
        self.low = Int4CPU(low, scale.float(), 8 * scale.float(), group, packed_group, dtype)

    def __call__(self, x_TK: torch.Tensor) -> torch.Tensor:
        return self.high(x_TK) + self.low(x_TK)

    def tensors(self) -> list[torch.Tensor]:
        return self.high.tensors() + self.low.tensors()

    @staticmethod
    def stacked(parts: "list[SplitInt8CPU]") -> "SplitInt8CPU | None":
        high, low = Int4CPU.stacked([p.high for p in parts]), Int4CPU.stacked([p.low for p in parts])
        if high is None or low is None:
            return None
        merged = SplitInt8CPU.__new__(SplitInt8CPU)
        merged.high, merged.low = high, low
        return merged


class Int8CPU:
    def __init__(self, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> None:
        self.q, self.scale = q.contiguous(), scale.reshape(-1).to(dtype)

    def __call__(self, x_TK: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x_TK, self.q, self.scale)

    def tensors(self) -> list[torch.Tensor]:
        return [self.q, self.scale]

    @staticmethod
    def stacked(parts: "list[Int8CPU]") -> "Int8CPU | None":
        if len({(p.q.shape[1], p.scale.dtype) for p in parts}) > 1:
            return None
        merged = Int8CPU.__new__(Int8CPU)
        merged.scale = torch.cat([p.scale for p in parts])
        merged.q = torch.cat([p.q for p in parts])
        return merged if _computes_as(merged, parts) else None


class WideFp8:
    def __init__(self, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, dynamic: bool,
                 amax_reduce: AmaxReduce | None = None) -> None:
        self.q, self.scale, self.dtype, self.dynamic = q, scale.float(), dtype, dynamic
        self.group = q.shape[-1] // scale.shape[-1]
        self.amax_reduce = amax_reduce

    def __call__(self, x_TK: torch.Tensor) -> torch.Tensor:
        weight = (self.q.float() * expand_groups(self.scale, self.group)).to(x_TK.dtype)
        if not self.dynamic:
            return x_TK @ weight.t()
        x_q, x_scale = quantize_fp8_per_token(x_TK, self.amax_reduce)
        return ((x_q.to(x_TK.dtype) @ weight.t()).float() * x_scale).to(x_TK.dtype)

    def tensors(self) -> list[torch.Tensor]:
        return [self.q, self.scale]


def quantize_fp8_per_token(x_TK: torch.Tensor, amax_reduce: AmaxReduce | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row to FP8 with its own scale amax / 448 (as compressed-tensors' dynamic `token` strategy)."""
    x = x_TK.float()
    amax = x.abs().amax(-1, keepdim=True)
    if amax_reduce is not None:
        amax = amax_reduce(amax)
    scale = (amax / FP8_MAX).clamp_min(torch.finfo(torch.float32).eps)
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def _scaled_mm_ok(out_features: int, in_features: int) -> bool:
    return out_features % 16 == 0 and in_features % 16 == 0


class ScaledMMFp8:
    """CUDA FP8 GEMM: per-token activation scales (rowwise) and per-channel weight scales."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
                 amax_reduce: AmaxReduce | None = None) -> None:
        self.q_t, self.dtype = q.t(), dtype  # _scaled_mm wants the weight column-major
        self.scale = scale.float().reshape(1, -1)
        self.amax_reduce = amax_reduce

    def __call__(self, x_TK: torch.Tensor) -> torch.Tensor:
        x_q, x_scale = quantize_fp8_per_token(x_TK, self.amax_reduce)
        return torch._scaled_mm(x_q, self.q_t, scale_a=x_scale, scale_b=self.scale, out_dtype=x_TK.dtype)

    def tensors(self) -> list[torch.Tensor]:
        return [self.q_t, self.scale]


class Int4CUDA:
    """tinygemm: bf16 activations, codes packed two per byte with the even element in the high nibble."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group: int,
                 packed_group: int) -> None:
        as_bytes = (codes[:, 0::2] << 4 | codes[:, 1::2]).to(torch.uint8)
        self.packed = torch.ops.aten._convert_weight_to_int4pack(as_bytes.contiguous(), 8)
        self.group = packed_group
        self.scales_zeros = _scales_and_zeros(scale, zero, group, packed_group, torch.bfloat16)

    def __call__(self, x_TK: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm(x_TK, self.packed, self.group, self.scales_zeros)

    def tensors(self) -> list[torch.Tensor]:
        return [self.packed, self.scales_zeros]


class Dense:
    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight

    def __call__(self, x_TK: torch.Tensor) -> torch.Tensor:
        return x_TK @ self.weight.t()

    def tensors(self) -> list[torch.Tensor]:
        return [self.weight]

    @staticmethod
    def stacked(parts: "list[Dense]") -> "Dense | None":
        if len({(p.weight.shape[1], p.weight.dtype) for p in parts}) > 1:
            return None
        return Dense(torch.cat([p.weight for p in parts]))


class Dequantized:
    def __init__(self, kind: str, payload: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                 dtype: torch.dtype) -> None:
        self.kind, self.payload, self.scale, self.zero = kind, payload, scale, zero

    def __call__(self, x_TK: torch.Tensor) -> torch.Tensor:
        return x_TK @ dequantize(self.kind, self.payload, self.scale, self.zero).to(x_TK.dtype).t()

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.payload, self.scale, self.zero) if t is not None]


def activation_dtype(kernel_dtype: torch.dtype) -> torch.dtype:
    """The float dtype a kernel made for `kernel_dtype` takes: int8 activations are a8_mm's to round (from
    float32 or bfloat16); any other kernel made for them takes bfloat16."""
    return torch.bfloat16 if kernel_dtype == torch.int8 else kernel_dtype


def input_dtype(kernel: Kernel, kernel_dtype: torch.dtype, x_dtype: torch.dtype) -> torch.dtype:
    """The dtype `kernel` is fed activations of `x_dtype` in: a8_mm rounds float32 activations to int8
    itself (a cast to bf16 first would round them twice, and cost a pass over them); every other kernel takes
    `activation_dtype(kernel_dtype)`."""
    inner = kernel.kernel if isinstance(kernel, Rows) else kernel
    return x_dtype if isinstance(inner, A8CPU) and x_dtype in A8CPU.INPUTS else activation_dtype(kernel_dtype)


def stack_kernels(kernels: list[Kernel]) -> Kernel | None:
    """One kernel whose output is the `kernels`' outputs side by side, for inputs they share (attention's q, k
    and v), or None when they differ in kind or layout: their weights stacked by output row."""
    kind = type(kernels[0])
    stacked = getattr(kind, "stacked", None)
    if stacked is None or any(type(k) is not kind for k in kernels):
        return None
    return stacked(kernels)


class Rows:
    """Output features [start, stop) of another kernel (a part of a stacked kernel, which holds the weights)."""

    def __init__(self, kernel: Kernel, start: int, stop: int) -> None:
        self.kernel, self.start, self.stop = kernel, start, stop

    def __call__(self, x_TK: torch.Tensor) -> torch.Tensor:
        return self.kernel(x_TK)[:, self.start:self.stop]

    def tensors(self) -> list[torch.Tensor]:
        return []


def _computes_as(merged: Kernel, parts: list[Kernel]) -> bool:
    """Whether `merged` computes its `parts`' outputs side by side, exactly, on a probe input: a packed layout is
    the kernel library's, not ours to assume."""
    if isinstance(merged, A8CPU):
        k, dtype = merged.in_features, torch.bfloat16
    else:
        k = merged.tensors()[0].shape[-1] * (2 if isinstance(merged, Int4CPU) else 1)
        dtype = merged.tensors()[-1].dtype
    probe = torch.randn(2, k, generator=torch.Generator().manual_seed(0)).to(dtype)
    return torch.equal(merged(probe), torch.cat([part(probe) for part in parts], dim=-1))
