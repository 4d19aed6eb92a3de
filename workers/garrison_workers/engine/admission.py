"""Which waiting request an engine core lets into its engine next: fair across tenants, with room kept for light ones.

A replica has `slots` sequences (the engine's max_num_seqs). A request takes a slot from admission until it
finishes or is aborted. While every slot is taken, requests wait in a weighted fair queue (cost: the tokens they
may use; weight: the tenant's priority), so a tenant flooding the replica delays mostly itself, whichever gateway
its requests came through. Some slots (the headroom, a quarter) are kept for light tenants: those holding fewer
slots than the headroom and than their fair share (the slots times their weight over the active tenants'
weights). The other requests fill the rest, and a light tenant's request starts at the next step instead of
waiting for a slot to free, so its latency under a flood stays near its latency on a busy but unsaturated server.
A light tenant's request takes one of the other slots while there is one: the headroom is used only once they are
all taken. While a single tenant is active, nothing is kept back: it gets every slot (a tenant that arrives
then waits for the first to free). A tenant may have at most `max_queued_per_tenant` requests waiting: more are
refused (QueueFullError).

Plain Python, no locks: the engine core's engine thread owns it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from garrison_workers.engine.fair_queue import FairQueue
from garrison_workers.errors import QueueFullError

HEADROOM_FRACTION = 4  # a quarter of the slots are kept for light tenants
QUEUE_FULL_RETRY_S = 1.0


@dataclass(slots=True, eq=False)
class Waiting:
    """A request waiting for a slot; `reserved` once admitted on one of the headroom's slots."""

    request_id: str
    tenant: str
    weight: float
    cost: int  # prompt tokens plus the most it may generate
    reserved: bool = False


class Admission:
    def __init__(self, slots: int, max_queued_per_tenant: int) -> None:
        self.slots, self.max_queued_per_tenant = slots, max_queued_per_tenant
        self.headroom = max(1, slots // HEADROOM_FRACTION)
        self._queue: FairQueue[Waiting] = FairQueue()
        self._queued: dict[str, Waiting] = {}  # request id -> waiting
        self._admitted: dict[str, Waiting] = {}
        self._reserved = 0
        self.in_flight: Counter[str] = Counter()  # admitted per tenant
        self._weights: dict[str, float] = {}  # each active tenant's priority weight, as last seen

    def __len__(self) -> int:
        return len(self._queued)

    @property
    def running(self) -> int:
        return len(self._admitted)

    def push(self, waiting: Waiting) -> None:
        queued = self._queue.queued(waiting.tenant)
        if queued >= self.max_queued_per_tenant:
            raise QueueFullError(f"tenant {waiting.tenant!r} has {queued} requests waiting for this replica, its "
                                 f"max_queued_per_tenant: retry when some have started", QUEUE_FULL_RETRY_S)
        self._weights[waiting.tenant] = waiting.weight
        self._queue.push(waiting.tenant, waiting, waiting.cost, waiting.weight)
        self._queued[waiting.request_id] = waiting

    def next(self) -> Waiting | None:
        """The request to admit now, if a slot is free for it (it then holds the slot until `done`)."""
        if not self._queued or len(self._admitted) >= self.slots:
            return None
        # Kept only while another tenant is active: a lone tenant has no one to keep it from, and gets every slot.
        headroom = self.headroom if len(set(self.in_flight) | set(self._queue.tenants())) > 1 else 0
        reserved = len(self._admitted) - self._reserved >= self.slots - headroom
        waiting = self._queue.pop(self._light if reserved else None)
        if waiting is None:
            return None
        del self._queued[waiting.request_id]
        waiting.reserved = reserved
        self._reserved += reserved
        self._admitted[waiting.request_id] = waiting
        self.in_flight[waiting.tenant] += 1
        return waiting

    def done(self, request_id: str) -> Waiting | None:
        """Free the request's slot, or withdraw it from the queue; None if it is neither admitted nor queued."""
        waiting = self._admitted.pop(request_id, None)
        if waiting is not None:
            self._reserved -= waiting.reserved
            self.in_flight[waiting.tenant] -= 1
            if not self.in_flight[waiting.tenant]:
                del self.in_flight[waiting.tenant]
        else:
            waiting = self._queued.pop(request_id, None)
            if waiting is None:
                return None
            self._queue.remove(waiting)
        if waiting.tenant not in self.in_flight and not self._queue.queued(waiting.tenant):
            self._weights.pop(waiting.tenant, None)  # idle again: it holds no state
        return waiting

    def queued_by_tenant(self) -> dict[str, int]:
        return {tenant: self._queue.queued(tenant) for tenant in self._queue.tenants()}

    def _light(self, tenant: str) -> bool:
        active = set(self.in_flight) | set(self._queue.tenants())
        share = self.slots * self._weights[tenant] / sum(self._weights[t] for t in active)
        return self.in_flight[tenant] < min(self.headroom, share)
