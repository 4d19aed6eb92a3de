"""A deployment's shape: one replica's worker groups (role, tp, ep), how many replicas, and the nodes they take.

A colocated replica is one group of role `both`; a disaggregated replica is one `prefill` group and one or more
identical `decode` groups (Garrison's `DisaggregatedEngine`). A group larger than a node spans whole nodes, and
its collectives then cross the scale-out network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from garrison_workers.config import ModelConfig
from garrison_workers.errors import LayoutError
from garrison_workers.parallel.dims import ParallelDims

Role = Literal["both", "prefill", "decode"]


@dataclass(slots=True, frozen=True)
class Group:
    role: Role
    tp: int
    ep: int

    def __post_init__(self) -> None:
        if self.role not in ("both", "prefill", "decode"):
            raise LayoutError(f"a group's role is both, prefill or decode, not {self.role!r}")
        ParallelDims(self.tp, self.ep)  # checks tp, ep >= 1

    @property
    def gpus(self) -> int:
        return self.tp * self.ep

    def hosts(self, gpus_per_node: int) -> int:
        return math.ceil(self.gpus / gpus_per_node)

    def spans_nodes(self, gpus_per_node: int) -> bool:
        return self.gpus > gpus_per_node

    def describe(self) -> str:
        return f"tp{self.tp}" + (f"·ep{self.ep}" if self.ep > 1 else "")


@dataclass(slots=True, frozen=True)
class Layout:
    groups: tuple[Group, ...]  # one replica's
    replicas: int = 1

    def __post_init__(self) -> None:
        roles = [g.role for g in self.groups]
        colocated = roles == ["both"]
        disaggregated = roles[:1] == ["prefill"] and len(roles) > 1 and all(r == "decode" for r in roles[1:])
        if not (colocated or disaggregated):
            raise LayoutError(f"a replica is one 'both' group, or one 'prefill' group and decode groups; got {roles}")
        if self.replicas < 1:
            raise LayoutError(f"replicas must be >= 1, got {self.replicas}")
        if disaggregated and len(set(self.groups[1:])) != 1:
            raise LayoutError("a replica's decode groups must be alike (same tp and ep)")

    @classmethod
    def colocated(cls, tp: int, ep: int = 1, replicas: int = 1) -> Layout:
        return cls((Group("both", tp, ep),), replicas)

    @classmethod
    def disaggregated(cls, prefill: tuple[int, int], decode: tuple[int, int], num_decode: int = 1,
                      replicas: int = 1) -> Layout:
        return cls((Group("prefill", *prefill), *[Group("decode", *decode)] * num_decode), replicas)

    @property
    def is_disaggregated(self) -> bool:
        return self.groups[0].role == "prefill"

    @property
    def prefill(self) -> Group:
        return self.groups[0]

    @property
    def decode(self) -> Group:
        """The group that decodes (the `both` group of a colocated replica)."""
        return self.groups[-1]

    @property
    def num_decode_groups(self) -> int:
        return len(self.groups) - 1 if self.is_disaggregated else 1

    @property
    def gpus_per_replica(self) -> int:
        return sum(g.gpus for g in self.groups)

    @property
    def gpus(self) -> int:
        return self.replicas * self.gpus_per_replica

    def nodes(self, gpus_per_node: int) -> int:
        """Groups that span nodes take whole nodes; the others are packed onto nodes (first fit, largest first)."""
        whole = sum(g.hosts(gpus_per_node) for g in self.groups if g.spans_nodes(gpus_per_node)) * self.replicas
        free: list[int] = []
        small = sorted((g.gpus for g in self.groups if not g.spans_nodes(gpus_per_node)), reverse=True)
        for size in small * self.replicas:
            slot = next((i for i, room in enumerate(free) if room >= size), None)
            if slot is None:
                free.append(gpus_per_node - size)
            else:
                free[slot] -= size
        return whole + len(free)

    def validate(self, model: ModelConfig, gpus_per_node: int) -> None:
        """Raise LayoutError if a group does not fit the model or cannot be placed on whole nodes."""
        for group in self.groups:
            ParallelDims(group.tp, group.ep).validate(model)
            if group.spans_nodes(gpus_per_node) and group.gpus % gpus_per_node:
                raise LayoutError(f"group {group.describe()} has {group.gpus} GPUs: a group larger than a node "
                                  f"must fill whole nodes of {gpus_per_node}")

    def describe(self) -> str:
        if self.is_disaggregated:
            decode = f"{self.num_decode_groups}×" if self.num_decode_groups > 1 else ""
            text = f"P {self.prefill.describe()} + D {decode}{self.decode.describe()}"
        else:
            text = self.decode.describe()
        return text + (f" ×{self.replicas}" if self.replicas > 1 else "")
