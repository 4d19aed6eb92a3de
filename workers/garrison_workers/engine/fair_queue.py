"""Weighted fair queueing across tenants (start-time fair queueing, one line per tenant).

Each tenant's items wait in a FIFO line of their own. The item at the head of a tenant's line carries
a virtual start tag `max(V, F)`, where `F` is the tenant's finish tag; `pop` serves the head with the
smallest start tag, moves the virtual clock `V` to that tag and the tenant's `F` to `start + cost /
weight`. A tenant that floods the queue only lengthens its own line, so a quiet tenant's next item is
served within one item of arriving, and backlogged tenants receive service (measured in `cost`, here
tokens) in proportion to their weights. A tenant is charged only for what is served: an item
withdrawn while it waits (its client cancelled) costs nothing. Plain Python: no locks, no asyncio;
the router calls it from one event loop.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(order=True, slots=True)
class _Head:
    """A tenant's turn in the heap: the start tag of the item at the head of its line."""

    start: float
    seq: int  # FIFO among equal tags
    tenant: str = field(compare=False)
    stale: bool = field(default=False, compare=False)  # that item was withdrawn; dropped lazily by pop


@dataclass(slots=True)
class _Waiting(Generic[T]):
    item: T
    cost: float
    weight: float


class FairQueue(Generic[T]):
    def __init__(self) -> None:
        self._heap: list[_Head] = []  # one live entry per tenant with items waiting
        self._lines: dict[str, deque[_Waiting[T]]] = {}
        self._heads: dict[str, _Head] = {}
        self._finish: dict[str, float] = {}  # per tenant: the finish tag of its last served item
        self._tenant_of: dict[int, str] = {}  # id(item) -> tenant, for remove()
        self._virtual_time = 0.0
        self._order = itertools.count()

    def __len__(self) -> int:
        return len(self._tenant_of)

    def queued(self, tenant: str) -> int:
        line = self._lines.get(tenant)
        return len(line) if line else 0

    def push(self, tenant: str, item: T, cost: float, weight: float) -> None:
        if cost <= 0 or weight <= 0:
            raise ValueError("cost and weight must be positive")
        if id(item) in self._tenant_of:  # items are tracked by identity, for remove()
            raise ValueError("this item is already queued")
        line = self._lines.setdefault(tenant, deque())
        line.append(_Waiting(item, cost, weight))
        self._tenant_of[id(item)] = tenant
        if len(line) == 1:
            self._next_turn(tenant)

    def tenants(self) -> list[str]:
        """Tenants with items waiting."""
        return list(self._lines)

    def pop(self, accept: Callable[[str], bool] | None = None) -> T | None:
        """The next item in fair order, or with `accept`, the next one whose tenant it accepts (None if none is);
        IndexError when empty."""
        if accept is None:
            while True:
                head = heapq.heappop(self._heap)
                if not head.stale:
                    break
        else:
            head = next((h for h in sorted(self._heap) if not h.stale and accept(h.tenant)), None)
            if head is None:
                if not self._heap:
                    raise IndexError("pop from an empty FairQueue")
                return None
            head.stale = True  # its entry leaves the heap lazily
        served = self._lines[head.tenant].popleft()
        del self._tenant_of[id(served.item)]
        if accept is None:  # the clock follows what is served in fair order; a pick out of order leaves it be
            self._virtual_time = head.start
        self._finish[head.tenant] = head.start + served.cost / served.weight
        self._next_turn(head.tenant)
        return served.item

    def remove(self, item: T) -> bool:
        """Withdraw a queued item (its client went away) without charging its tenant; False if it is not queued."""
        tenant = self._tenant_of.pop(id(item), None)
        if tenant is None:
            return False
        line = self._lines[tenant]
        index = next(i for i, waiting in enumerate(line) if waiting.item is item)
        del line[index]
        if index == 0:  # its turn in the heap belonged to this item: give the next one a turn
            self._heads[tenant].stale = True
            self._next_turn(tenant)
        return True

    def _next_turn(self, tenant: str) -> None:
        """Tag the item now at the head of the tenant's line, or forget the empty line."""
        if not self._lines[tenant]:
            del self._lines[tenant], self._heads[tenant]
            return
        head = _Head(max(self._virtual_time, self._finish.get(tenant, 0.0)), next(self._order), tenant)
        self._heads[tenant] = head
        heapq.heappush(self._heap, head)
