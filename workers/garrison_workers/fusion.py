"""Projections that read the same input, computed as one matmul: attention's q, k and v, an MLP's gate and up.

A decode step of a small model on CPU spends more of its time on calling kernels than inside them: a
quantized linear costs a dispatch, a round trip of its input through the kernel's dtype, and a kernel whose
threads start and join, for a matrix that takes microseconds to read. One call for the three projections
of a layer's attention, and one for the two of its MLP, does that once. The weights are stacked by output
row once, after loading, and held once (see `FusedLinears`); the output is split back into the projections'
parts. Projections that cannot be stacked (different formats or group sizes, a kernel without a stacked form
such as FP8 or CUDA's) compute one by one, as before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from garrison_workers.model import MLP, Attention
from garrison_workers.parallel.layers import RowParallelLinear
from garrison_workers.quant.kernels import Kernel, Rows, stack_kernels
from garrison_workers.quant.layers import QuantizedLinear, hold, run_kernel


class FusedLinears(nn.Module):
    """y_1, ..., y_n = x W_1^T + b_1, ..., x W_n^T + b_n, computed as x [W_1; ...; W_n]^T + [b_1, ..., b_n].

    Float weights: the linears' parameters are views of `weight`'s rows (they are what is counted and loaded).
    Quantized: the stacked kernel's tensors are this module's buffers, and each linear computes with its rows
    of the stacked kernel's output (`kernels.Rows`), holding nothing of its own."""

    def __init__(self, sizes: list[int], weight: torch.Tensor | None = None, kernel: Kernel | None = None,
                 kernel_dtype: torch.dtype | None = None, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.sizes, self.weight, self.kernel, self.kernel_dtype, self.bias = sizes, weight, kernel, kernel_dtype, bias
        if kernel is not None:
            hold(self, [kernel])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.kernel is None:
            out = F.linear(x, self.weight, self.bias)
        else:
            out = run_kernel(self.kernel, self.kernel_dtype, x)
            if self.bias is not None:
                out = out + self.bias
        return out.split(self.sizes, dim=-1)


def fuse_projections(model: nn.Module) -> None:
    """Stack the projections of every attention and MLP block of a loaded model that can be stacked."""
    for module in model.modules():
        if isinstance(module, Attention):
            q_and_k = module.q_proj.out_features + module.k_proj.out_features
            module.qkv = fuse_linears([module.q_proj, module.k_proj, module.v_proj],
                                      [q_and_k, module.v_proj.out_features])
        elif isinstance(module, MLP):
            module.gate_up = fuse_linears([module.gate_proj, module.up_proj])


def fuse_linears(linears: list[nn.Module], split: list[int] | None = None) -> FusedLinears | None:
    """The linears as one, giving their outputs (or, with `split`, groups of adjacent outputs of these widths),
    or None when they cannot be stacked. Row-parallel linears are never stacked (each sums its output over the
    TP group), nor linears of which only some have a bias."""
    if any(isinstance(linear, RowParallelLinear) for linear in linears):
        return None
    biases = [linear.bias for linear in linears]
    if any(b is None for b in biases) and any(b is not None for b in biases):
        return None
    sizes = split or [linear.out_features for linear in linears]
    if all(isinstance(linear, nn.Linear) for linear in linears):
        weights = [linear.weight for linear in linears]
        if len({(w.shape[1], w.dtype, w.device) for w in weights}) > 1:
            return None
        weight = _stack([w.data for w in weights], linears, "weight")
        return FusedLinears(sizes, weight=weight, bias=_stack_biases(biases, linears))
    if all(isinstance(linear, QuantizedLinear) for linear in linears):
        dtypes = {linear.kernel_dtype for linear in linears}
        kernel = stack_kernels([linear.kernel for linear in linears]) if len(dtypes) == 1 else None
        if kernel is None:
            return None
        start = 0
        for linear in linears:
            linear.compute_with(Rows(kernel, start, start + linear.out_features))
            start += linear.out_features
        return FusedLinears(sizes, kernel=kernel, kernel_dtype=dtypes.pop(), bias=_stack_biases(biases, linears))
    return None


def _stack_biases(biases: list[torch.Tensor | None], linears: list[nn.Module]) -> torch.Tensor | None:
    if biases[0] is None:
        return None
    return _stack([b.data for b in biases if b is not None], linears, "bias")


def _stack(tensors: list[torch.Tensor], linears: list[nn.Module], name: str) -> torch.Tensor:
    """The tensors stacked by rows; each linear's parameter `name` then holds a view of its rows."""
    stacked = torch.cat(tensors)
    start = 0
    for linear, tensor in zip(linears, tensors):
        getattr(linear, name).data = stacked[start:start + tensor.shape[0]]
        start += tensor.shape[0]
    return stacked
