"""Queues requests fairly across tenants and dispatches them to a model's replicas.

Each model has a fixed number of slots: its serving replicas times the sequences one replica batches. A
request takes a slot from dispatch until it finishes or is cancelled, and returns it at once. While
every slot is taken, requests wait in a weighted fair queue (cost: the tokens they may use), so a
tenant flooding the model delays mostly itself. Some slots (the headroom, a quarter) are kept for light
tenants: those holding fewer slots than the headroom and than their fair share (the slots times their weight
over the active tenants' weights). The other requests fill the rest, and a light tenant's request starts at
the next step instead of waiting for a slot to free, so its latency under a flood stays near its latency on a
busy but unsaturated server. A light tenant's request takes one of the other slots while there is one: the
headroom is used only once they are all taken. A dispatched request goes to the
serving replica with the fewest requests in flight. Runs on the gateway's event loop; replicas run on their
own threads.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from garrison.router.fair_queue import FairQueue
from garrison.router.replica import Replica, ReplicaStatus
from garrison.tenancy.errors import QuotaExceededError
from garrison_workers.config import ModelConfig
from garrison_workers.engine.llm_engine import RequestOutput
from garrison_workers.engine.sequence import SamplingParams
from garrison_workers.errors import UnavailableError
from garrison_workers.tokenizer import Tokenizer


QUEUE_FULL_RETRY_S = 1.0
HEADROOM_FRACTION = 4  # a quarter of the slots are kept for light tenants


@dataclass(slots=True)
class Deployment:
    """One served model: its replicas, and what the gateway needs to check requests against it."""

    name: str
    model_config: ModelConfig
    tokenizer: Tokenizer | None
    replicas: list[Replica]
    slots_per_replica: int
    max_model_len: int  # prompt plus output tokens that fit (the model's context and the KV cache)


@dataclass(slots=True)
class RouteRequest:
    request_id: str
    tenant: str
    weight: float  # the tenant's priority weight
    model: str
    prompt_token_ids: list[int]
    params: SamplingParams
    salt: bytes  # prefix-cache salt: requests share cached blocks only with the same salt
    on_dispatch: Callable[[], Any] | None = None  # called when the request leaves the queue
    on_start: Callable[[], Any] | None = None  # called on the engine thread when the engine takes it


@dataclass(slots=True)
class _Ticket:
    request: RouteRequest
    dispatched: asyncio.Future[int]  # the replica's index
    reserved: bool = False  # holds one of the slots kept for light tenants (the headroom)


@dataclass(slots=True)
class _ModelState:
    queue: FairQueue[_Ticket] = field(default_factory=FairQueue)
    in_flight: list[int] = field(default_factory=list)  # per replica
    reserved: int = 0  # requests in flight on the headroom's slots
    tenants: Counter[str] = field(default_factory=Counter)  # in flight per tenant
    weights: dict[str, float] = field(default_factory=dict)  # each tenant's priority weight, as last seen


@dataclass(slots=True, frozen=True)
class ModelLoad:
    queued: int
    in_flight: int
    slots: int
    kv_blocks_used: int
    kv_blocks_total: int
    in_flight_by_tenant: dict[str, int]


class Router:
    def __init__(self, deployments: list[Deployment], max_queued_per_tenant: int = 256) -> None:
        """`max_queued_per_tenant`: requests one tenant may have waiting for a model's slots; more are refused."""
        self.deployments = {d.name: d for d in deployments}
        self.max_queued_per_tenant = max_queued_per_tenant
        self._state = {d.name: _ModelState(in_flight=[0] * len(d.replicas)) for d in deployments}

    async def stream(self, request: RouteRequest) -> AsyncIterator[RequestOutput]:
        """Queue, dispatch and stream one request. Closing the iterator early aborts it and frees its slot."""
        loop = asyncio.get_running_loop()
        deployment, state = self.deployments[request.model], self._state[request.model]
        if not any(replica.serving for replica in deployment.replicas):
            raise UnavailableError(f"model {request.model!r} has no serving replica now: "
                                   f"{'; '.join(_describe(r.status) for r in deployment.replicas)}; retry later")
        queued = state.queue.queued(request.tenant)
        if queued >= self.max_queued_per_tenant:
            raise QuotaExceededError(f"tenant {request.tenant!r} has {queued} requests waiting for model "
                                     f"{request.model!r}, its max_queued_per_tenant: retry when some have started",
                                     limit="max_queued_per_tenant", retry_after_s=QUEUE_FULL_RETRY_S)
        ticket = _Ticket(request, loop.create_future())
        state.weights[request.tenant] = request.weight
        cost = len(request.prompt_token_ids) + request.params.max_tokens
        state.queue.push(request.tenant, ticket, cost, request.weight)
        self._dispatch(request.model)
        index: int | None = None
        finished = False
        try:
            index = await ticket.dispatched
            outputs: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
            deployment.replicas[index].add(request.request_id, request.prompt_token_ids, request.params,
                                           request.salt, lambda item: loop.call_soon_threadsafe(outputs.put_nowait, item),
                                           request.on_start)
            while not finished:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            if index is None and ticket.dispatched.done() and not ticket.dispatched.cancelled():
                index = ticket.dispatched.result()  # dispatched just as the caller went away
            if index is None:
                state.queue.remove(ticket)
                ticket.dispatched.cancel()
            else:
                if not finished:
                    deployment.replicas[index].abort(request.request_id)
                state.in_flight[index] -= 1
                state.reserved -= ticket.reserved
                state.tenants[request.tenant] -= 1
                if state.tenants[request.tenant] == 0:
                    del state.tenants[request.tenant]
                self._dispatch(request.model)
            if request.tenant not in state.tenants and not state.queue.queued(request.tenant):
                state.weights.pop(request.tenant, None)  # idle again: it holds no state

    def _dispatch(self, model: str) -> None:
        state, deployment = self._state[model], self.deployments[model]
        while len(state.queue):
            serving = [i for i, replica in enumerate(deployment.replicas) if replica.serving]
            if not serving:  # queued requests wait for a replica to come back (or for their deadline)
                return
            index = min(serving, key=state.in_flight.__getitem__)
            if state.in_flight[index] >= deployment.slots_per_replica:
                return
            slots = deployment.slots_per_replica * len(serving)
            headroom = max(1, slots // HEADROOM_FRACTION)
            reserved = sum(state.in_flight[i] for i in serving) - state.reserved >= slots - headroom
            if not reserved:
                ticket = state.queue.pop()
            else:  # only the headroom is left: for light tenants, below their fair share and the headroom itself
                ticket = state.queue.pop(lambda tenant: state.tenants[tenant] < min(
                    headroom, self._fair_share(state, tenant, slots)))
                if ticket is None:
                    return
            if ticket.dispatched.done():
                # Its caller was cancelled: cancelling a task cancels the future it awaits at once, but
                # the task's own cleanup (withdrawing the ticket) runs only at its next step.
                continue
            state.in_flight[index] += 1
            ticket.reserved = reserved
            state.reserved += reserved
            state.tenants[ticket.request.tenant] += 1
            ticket.dispatched.set_result(index)
            if ticket.request.on_dispatch is not None:
                ticket.request.on_dispatch()

    @staticmethod
    def _fair_share(state: _ModelState, tenant: str, slots: int) -> float:
        active = set(state.tenants) | set(state.queue.tenants())
        return slots * state.weights[tenant] / sum(state.weights[t] for t in active)

    def load(self, model: str) -> ModelLoad:
        deployment, state = self.deployments[model], self._state[model]
        used_total = [replica.kv_blocks for replica in deployment.replicas]
        return ModelLoad(len(state.queue), sum(state.in_flight), deployment.slots_per_replica * len(deployment.replicas),
                         sum(u for u, _ in used_total), sum(t for _, t in used_total), dict(state.tenants))

    def replica_changed(self, model: str) -> None:
        """A replica of `model` serves again: requests that waited for one may go."""
        self._dispatch(model)

    def stop(self) -> None:
        for deployment in self.deployments.values():
            for replica in deployment.replicas:
                replica.stop()


def _describe(status: ReplicaStatus) -> str:
    return f"{status.name} {status.state.value}" + (f" ({status.detail})" if status.detail else "")
