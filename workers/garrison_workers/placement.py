"""Where a worker group's ranks may go on a Ray cluster: a bundle of resources per rank, packed or spread over nodes.

"pack" puts the ranks on as few nodes as possible (Ray's PACK: one node, one NVLink domain, when they fit there);
"spread" puts each on a node of its own (STRICT_SPREAD). A group may also name a custom resource that its ranks each
take one unit of: only the nodes that advertise it (a KubeRay worker group's pods, say) can hold them, which is
how a disaggregated replica's prefill group and decode groups land on the nodes meant for each.

`capacity` answers, from the nodes' totals alone, how many of a group's ranks the cluster could ever hold: a layout
it could not hold even empty is refused up front, with the numbers, instead of waiting for a placement that will
never come.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Strategy = Literal["pack", "spread"]
RAY_STRATEGY = {"pack": "PACK", "spread": "STRICT_SPREAD"}


@dataclass(slots=True, frozen=True)
class GroupPlacement:
    strategy: Strategy = "pack"
    resource: str | None = None  # a custom Ray resource each rank takes one unit of

    def bundle(self, gpu: bool) -> dict[str, float]:
        """What one rank takes: a CPU slot, a GPU on a GPU engine, and one unit of the group's resource."""
        bundle = {"GPU": 1.0, "CPU": 1.0} if gpu else {"CPU": 1.0}
        if self.resource is not None:
            bundle[self.resource] = 1.0
        return bundle


def ranks_per_node(nodes: list[dict[str, float]], bundle: dict[str, float]) -> list[int]:
    """How many bundles each node could hold, by its total resources."""
    return [int(min(node.get(name, 0.0) // amount for name, amount in bundle.items())) for node in nodes]


def capacity(nodes: list[dict[str, float]], bundle: dict[str, float], strategy: Strategy) -> int:
    """The most ranks of `bundle` the nodes could ever hold together under `strategy`."""
    per_node = ranks_per_node(nodes, bundle)
    return sum(per_node) if strategy == "pack" else sum(1 for n in per_node if n > 0)


def alive_nodes() -> list[dict[str, float]]:
    """Each live node's total resources, as the Ray cluster knows them."""
    import ray

    return [node["Resources"] for node in ray.nodes() if node.get("Alive")]


def on_head_node() -> Any:
    """A scheduling strategy for the actors that must outlive any worker node: the engine cores and the limits
    actor. They take no slot on the head, and a worker node lost with its ranks then fails only the requests on
    those ranks, while the cores (which name the rank and node, and restart the group once capacity returns) and
    every tenant's limits live on. The affinity is hard: Ray's default and soft affinity placed them on worker
    nodes, whose loss then took the cluster's limits with them."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    head = next((node["NodeID"] for node in ray.nodes()
                 if node.get("Alive") and "node:__internal_head__" in node.get("Resources", {})), None)
    return NodeAffinitySchedulingStrategy(head, soft=False) if head is not None else "DEFAULT"
