"""Weighted fair queueing across tenants (start-time fair queueing).

Each queued item gets a virtual start tag `max(V, last finish tag of its tenant)` and a finish tag
`start + cost / weight`; `pop` takes the smallest start tag and moves the virtual clock `V` to it.
A tenant that floods the queue only pushes its own tags further into the future, so a quiet tenant's
next request is served within one item of arriving, and backlogged tenants receive service
(measured in `cost`, here tokens) in proportion to their weights. Plain Python: no locks, no asyncio;
the router calls it from one event loop.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(order=True, slots=True)
class _Entry(Generic[T]):
    start: float
    seq: int  # FIFO among equal tags
    tenant: str = field(compare=False)
    finish: float = field(compare=False)
    item: T = field(compare=False)
    removed: bool = field(default=False, compare=False)


class FairQueue(Generic[T]):
    def __init__(self) -> None:
        self._heap: list[_Entry[T]] = []
        self._last_finish: dict[str, float] = {}
        self._by_item: dict[int, _Entry[T]] = {}
        self._virtual_time = 0.0
        self._order = itertools.count()
        self._num_queued = 0
        self._queued_per_tenant: dict[str, int] = {}

    def __len__(self) -> int:
        return self._num_queued

    def queued(self, tenant: str) -> int:
        return self._queued_per_tenant.get(tenant, 0)

    def push(self, tenant: str, item: T, cost: float, weight: float) -> None:
        if cost <= 0 or weight <= 0:
            raise ValueError("cost and weight must be positive")
        if id(item) in self._by_item:  # items are tracked by identity, for remove()
            raise ValueError("this item is already queued")
        start = max(self._virtual_time, self._last_finish.get(tenant, 0.0))
        finish = start + cost / weight
        self._last_finish[tenant] = finish
        entry = _Entry(start, next(self._order), tenant, finish, item)
        heapq.heappush(self._heap, entry)
        self._by_item[id(item)] = entry
        self._count(tenant, +1)

    def pop(self) -> T:
        """The next item in fair order; IndexError when empty."""
        while True:
            entry = heapq.heappop(self._heap)
            if not entry.removed:
                break
        del self._by_item[id(entry.item)]
        self._count(entry.tenant, -1)
        self._virtual_time = entry.start
        return entry.item

    def remove(self, item: T) -> bool:
        """Withdraw a queued item (its client went away); False if it is not queued."""
        entry = self._by_item.pop(id(item), None)
        if entry is None:
            return False
        entry.removed = True  # lazily dropped from the heap by pop
        self._count(entry.tenant, -1)
        return True

    def _count(self, tenant: str, delta: int) -> None:
        self._num_queued += delta
        left = self._queued_per_tenant.get(tenant, 0) + delta
        if left:
            self._queued_per_tenant[tenant] = left
        else:
            self._queued_per_tenant.pop(tenant, None)
