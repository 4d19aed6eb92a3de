"""Tensor-parallel linear layers that load only their own shard of the checkpoint tensor.

Each parameter carries a `weight_loader(read)` that receives `read(index)` (a reader of the named
checkpoint tensor, or a slice of it) and returns the tensor this rank keeps. With tp = 1 the shards
are the whole tensors and no collective runs.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from garrison_workers.parallel.context import ParallelContext

Reader = Callable[[Any], torch.Tensor]  # read(index) -> checkpoint tensor, sliced by `index` (None = whole)


def shard(size: int, parts: int, index: int) -> slice:
    """The `index`-th of `parts` equal slices of `size` (the layout check guarantees divisibility)."""
    step = size // parts
    return slice(index * step, (index + 1) * step)


Loader = Callable[[Reader], torch.Tensor]


def set_weight_loader(module: nn.Module, param_name: str, loader: Loader) -> None:
    """Register how `module.<param_name>` picks its shard. Kept on the module, not the parameter:
    `to_empty()` replaces parameters (and would drop anything attached to them)."""
    loaders = module.__dict__.setdefault("weight_loaders", {})
    loaders[param_name] = loader


def weight_loader(module: nn.Module, param_name: str) -> Loader | None:
    return module.__dict__.get("weight_loaders", {}).get(param_name)


class ColumnParallelLinear(nn.Linear):
    """Output features split across the TP group; the input is replicated and nothing is communicated."""

    def __init__(self, in_features: int, out_features: int, par: ParallelContext, bias: bool = False) -> None:
        super().__init__(in_features, out_features // par.dims.tp, bias=bias)
        rows = shard(out_features, par.dims.tp, par.tp_rank)
        set_weight_loader(self, "weight", lambda read: read((rows,)))
        if self.bias is not None:
            set_weight_loader(self, "bias", lambda read: read((rows,)))


class RowParallelLinear(nn.Linear):
    """Input features split across the TP group; partial outputs are summed by one all-reduce.

    `reduce=False` leaves the sum to the caller, so a block that adds several partial results (the
    MoE layer's routed and shared experts) pays for one all-reduce, not several.
    """

    def __init__(self, in_features: int, out_features: int, par: ParallelContext, bias: bool = False,
                 reduce: bool = True) -> None:
        if bias and not reduce:
            raise ValueError("a bias needs reduce=True: added before the sum it would count tp times")
        super().__init__(in_features // par.dims.tp, out_features, bias=bias)
        self.par, self.reduce = par, reduce
        cols = shard(in_features, par.dims.tp, par.tp_rank)
        set_weight_loader(self, "weight", lambda read: read((slice(None), cols)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight)
        if self.reduce:
            out = self.par.all_reduce_tp(out)
        # The bias is added once, after the sum, not once per rank.
        return out + self.bias if self.bias is not None else out
