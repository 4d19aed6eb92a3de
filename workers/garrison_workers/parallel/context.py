"""Where this rank sits in its replica, and the collectives the parallel layers use.

With tp = ep = 1 every collective is a no-op, so single-process engines run the same model code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from garrison_workers.parallel.dims import ParallelDims


@dataclass(slots=True)
class ParallelContext:
    dims: ParallelDims
    rank: int = 0
    tp_group: dist.ProcessGroup | None = None
    ep_group: dist.ProcessGroup | None = None

    @classmethod
    def single(cls) -> "ParallelContext":
        return cls(ParallelDims())

    @classmethod
    def from_initialized(cls, dims: ParallelDims, rank: int) -> "ParallelContext":
        """Create the TP and EP subgroups; every rank must call this, in the same order (new_group is collective)."""
        ctx = cls(dims, rank)
        for ep_rank in range(dims.ep):
            group = dist.new_group(dims.tp_group_ranks(ep_rank))
            if dims.coords(rank)[0] == ep_rank:
                ctx.tp_group = group
        for tp_rank in range(dims.tp):
            group = dist.new_group(dims.ep_group_ranks(tp_rank))
            if dims.coords(rank)[1] == tp_rank:
                ctx.ep_group = group
        return ctx

    @property
    def tp_rank(self) -> int:
        return self.dims.coords(self.rank)[1]

    @property
    def ep_rank(self) -> int:
        return self.dims.coords(self.rank)[0]

    def all_reduce_tp(self, x: torch.Tensor) -> torch.Tensor:
        if self.dims.tp > 1:
            dist.all_reduce(x, group=self.tp_group)
        return x

    def all_reduce_tp_max(self, x: torch.Tensor) -> torch.Tensor:
        if self.dims.tp > 1:
            dist.all_reduce(x, op=dist.ReduceOp.MAX, group=self.tp_group)
        return x
