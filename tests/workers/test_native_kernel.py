"""a8_mm (csrc/a8_cpu.cpp, garrison_workers.native): int4/int8 weights by activations rounded to int8 per block of 32.

Two oracles, both computed here in float64 from the canonical tensors (codec.dequantize), never from the kernel's
layout:
- its arithmetic: x rounded as the kernel documents (d = max|x| / 127 per block of 32, nearest even), the exact
  sum over the weights it stands for: the kernel's float32 sums are within a few float32 ulps of it;
- the float product x @ W.T: within the bound the activation rounding allows, sum over blocks of (d_b / 2) times
  the block's |W| (each int8 value is within half a step of x / d_b). A wrong scale, offset, nibble order or
  tile would break it by far more.
"""

from __future__ import annotations

import pytest
import torch

from conftest import use_kernel
from garrison_workers import native
from garrison_workers.quant import kernels
from garrison_workers.quant.codec import dequantize, pack_int4

BLOCK = 32


def quantized_weight(kind: str, n: int, k: int, group: int, zero: bool, half: bool, seed: int):
    gen = torch.Generator().manual_seed(seed)
    if kind == "int4":
        payload = pack_int4(torch.randint(0, 16, (n, k), generator=gen))
    else:
        payload = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    scale = torch.rand(n, k // group, generator=gen) / 16 + 1e-3
    low = torch.randn(n, k // group, generator=gen) / 8
    if half:  # a GGUF file's scales and minimums: float16, which the kernel then keeps in float16
        scale, low = scale.half().float(), low.half().float()
    # The canonical zero of w = (q - 8) s + zero; GGUF Q4_1's is its minimum + 8 s (codec.from_gguf_blocks)
    return payload, scale, low + 8 * scale if zero else None


def rounded_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x rounded to int8 per block as float64 [T, K], the blocks' scales d [T, K / 32])."""
    blocks = x.float().unflatten(-1, (-1, BLOCK))
    amax = blocks.abs().amax(-1, keepdim=True)
    # float32 divisions as the kernel's (`127 / tensor` would be PyTorch's reciprocal times 127: rounded twice)
    inverse = torch.where(amax > 0, torch.full_like(amax, 127) / amax, torch.zeros_like(amax))
    q = torch.round(blocks * inverse).double()  # torch.round: nearest, ties to even, as the kernel
    return q.flatten(-2), (amax / torch.full_like(amax, 127)).double().squeeze(-1)


@pytest.fixture(autouse=True)
def needs_native(monkeypatch) -> None:
    use_kernel(monkeypatch, "native")


@pytest.mark.parametrize("kind, n, k, group, zero, half", [
    ("int4", 48, 96, 32, False, False),      # GGUF Q4_0's shape of groups; 3 tiles
    ("int4", 64, 256, 64, True, True),       # Q4_1: a zero per group, float16 scales
    ("int4", 32, 384, 128, True, False),     # compressed-tensors' groups of 128, asymmetric
    ("int4", 16, 160, 160, False, False),    # per channel, K a multiple of 32 only
    ("int8", 48, 128, 32, False, True),      # GGUF Q8_0
    ("int8", 32, 192, 192, False, False),    # per-channel int8 (models import --quantize int8)
])
@pytest.mark.parametrize("rows", [1, 3, 4, 9, 15])  # the kernel takes rows 8 at a time, then 4, 2 and 1
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a8_mm_computes_its_documented_arithmetic(kind, n, k, group, zero, half, rows, dtype) -> None:
    payload, scale, offset = quantized_weight(kind, n, k, group, zero, half, seed=rows)
    kernel = kernels.make_kernel(kind, payload, scale, offset, torch.int8)
    assert isinstance(kernel, kernels.A8CPU)
    assert kernel.scales.dtype == (torch.float16 if half else torch.float32)
    x = (torch.randn(rows, k, generator=torch.Generator().manual_seed(k)) * 3).to(dtype)
    x[0, :BLOCK] = 0  # a block of zeros: scale 0, nothing divided by it
    got = kernel(x)
    assert got.dtype == torch.float32
    got = got.double()

    weight = dequantize(kind, payload, scale, offset).double()
    q, d = rounded_activations(x)
    rounded = (q.unflatten(-1, (-1, BLOCK)) * d[..., None]).flatten(-2)
    arithmetic = rounded @ weight.t()
    # float32 sums: within a few float32 ulps of the largest terms the kernel adds, s * u * x (codes u up to 15 or
    # 255) and offset * x (offset = zero - 8 s or - 128 s)
    largest_code = 15 if kind == "int4" else 255
    term = scale.abs().max() * largest_code + (weight.abs().max() + scale.abs().max() * (largest_code + 1) / 2)
    magnitude = rounded.abs().sum(-1, keepdim=True) * term
    assert ((got - arithmetic).abs() <= magnitude * 2.0 ** -20).all()

    exact = x.double() @ weight.t()
    bound = (d / 2).repeat_interleave(BLOCK, -1) @ weight.abs().t() + magnitude * 2.0 ** -20
    assert ((got - exact).abs() <= bound).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_input_gives_its_row_no_finite_output(bad: float) -> None:
    """As a float matmul would (NaN, or inf times weights of either sign): the row's outputs are not finite, so
    the sampler fails that sequence alone, never a finite answer made of a NaN rounded to an int8 value; the
    other rows are untouched."""
    kernel = kernels.make_kernel("int4", *quantized_weight("int4", 32, 64, 32, True, False, seed=0), torch.int8)
    x = torch.randn(3, 64)
    clean = kernel(x)
    x[1, 40] = bad
    got = kernel(x)
    assert not got[1].isfinite().any()
    assert torch.equal(got[[0, 2]], clean[[0, 2]])


@pytest.mark.parametrize("magnitude", [1e-39, 1e-33, 1e-20, 1e30])
def test_tiny_and_huge_activations_keep_their_relative_accuracy(magnitude: float) -> None:
    """Rounding to int8 is relative to each block's largest value, so the result's relative error does not depend
    on the activations' magnitude: subnormal blocks included (127 / max would overflow there), up to where a
    float32 product itself would overflow."""
    payload, scale, offset = quantized_weight("int4", 32, 64, 32, True, False, seed=0)
    kernel = kernels.make_kernel("int4", payload, scale, offset, torch.int8)
    weight = dequantize("int4", payload, scale, offset).double()
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(1)) * magnitude
    x[0, :5] = 0
    got = kernel(x).double()
    scale_of_terms = x.double().abs() @ weight.abs().t()
    assert ((got - x.double() @ weight.t()).abs() <= 0.02 * scale_of_terms).all()


def test_a8_mm_stacks_tiles_exactly() -> None:
    parts = [quantized_weight("int4", rows, 128, 32, True, True, seed=i) for i, rows in enumerate((48, 16, 32))]
    separate = [kernels.make_kernel("int4", *part, torch.int8) for part in parts]
    stacked = kernels.stack_kernels(separate)
    assert isinstance(stacked, kernels.A8CPU)
    x = torch.randn(5, 128).to(torch.bfloat16)
    assert torch.equal(stacked(x), torch.cat([kernel(x) for kernel in separate], dim=-1))
    # Different groups or scale dtypes do not stack.
    other = kernels.make_kernel("int4", *quantized_weight("int4", 16, 128, 64, True, True, seed=9), torch.int8)
    assert kernels.stack_kernels([separate[0], other]) is None


def test_a8_mm_compiles_into_a_graph() -> None:
    kernel = kernels.make_kernel("int4", *quantized_weight("int4", 32, 64, 32, True, False, seed=0), torch.int8)
    x = torch.randn(2, 64).to(torch.bfloat16)
    compiled = torch.compile(lambda x: kernel(x) * 2, fullgraph=True, dynamic=True)
    assert torch.equal(compiled(x), kernel(x) * 2)


def test_a8_mm_refuses_what_it_cannot_compute() -> None:
    kernel = kernels.make_kernel("int4", *quantized_weight("int4", 16, 64, 32, False, False, seed=0), torch.int8)
    with pytest.raises(RuntimeError, match="bfloat16 or float32"):
        native.ops().a8_mm(torch.randn(1, 64).half(), kernel.codes, kernel.scales, kernel.offsets, 32, 4)
    with pytest.raises(RuntimeError, match="inputs"):
        native.ops().a8_mm(torch.randn(1, 96).bfloat16(), kernel.codes, kernel.scales, kernel.offsets, 32, 4)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        native.ops().a8_mm(torch.randn(1, 64).bfloat16(), kernel.codes, kernel.scales, kernel.offsets, 16, 4)
    # Shapes the kernel cannot take go to PyTorch's kernels: output rows not a multiple of 16, groups of 16.
    assert not isinstance(kernels.make_kernel("int4", *quantized_weight("int4", 24, 64, 32, False, False, seed=0),
                                              torch.int8), kernels.A8CPU)
    assert not isinstance(kernels.make_kernel("int4", *quantized_weight("int4", 16, 64, 16, False, False, seed=0),
                                              torch.int8), kernels.A8CPU)
    # bf16 activations asked for (kernel_dtype bfloat16): PyTorch's kernel, fed bf16.
    bf16 = kernels.make_kernel("int4", *quantized_weight("int4", 16, 64, 32, False, False, seed=0), torch.bfloat16)
    assert isinstance(bf16, kernels.Int4CPU)
    assert kernels.input_dtype(bf16, torch.bfloat16, torch.float32) == torch.bfloat16


def test_switched_off_by_the_environment(monkeypatch) -> None:
    monkeypatch.setenv(native.ENV, "0")
    assert not native.available()
    kernel = kernels.make_kernel("int4", *quantized_weight("int4", 16, 64, 32, False, False, seed=0), torch.int8)
    assert isinstance(kernel, kernels.Int4CPU)
