"""Queues requests fairly across tenants and dispatches them to a model's replicas.

Each model has a fixed number of slots: its replicas times the sequences one replica batches. A
request takes a slot from dispatch until it finishes or is cancelled, and returns it at once. While
every slot is taken, requests wait in a weighted fair queue (cost: the tokens they may use), so a
tenant flooding the model delays mostly itself. A dispatched request goes to the replica with the
fewest requests in flight. Runs on the gateway's event loop; replicas run on their own threads.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from garrison.router.fair_queue import FairQueue
from garrison.router.replica import Replica
from garrison.tenancy.errors import QuotaExceededError
from garrison_workers.config import ModelConfig
from garrison_workers.engine.llm_engine import RequestOutput
from garrison_workers.engine.sequence import SamplingParams
from garrison_workers.tokenizer import Tokenizer


QUEUE_FULL_RETRY_S = 1.0


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


@dataclass(slots=True)
class _ModelState:
    queue: FairQueue[_Ticket] = field(default_factory=FairQueue)
    in_flight: list[int] = field(default_factory=list)  # per replica
    tenants: Counter[str] = field(default_factory=Counter)  # in flight per tenant


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
        queued = state.queue.queued(request.tenant)
        if queued >= self.max_queued_per_tenant:
            raise QuotaExceededError(f"tenant {request.tenant!r} has {queued} requests waiting for model "
                                     f"{request.model!r}, its max_queued_per_tenant: retry when some have started",
                                     limit="max_queued_per_tenant", retry_after_s=QUEUE_FULL_RETRY_S)
        ticket = _Ticket(request, loop.create_future())
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
                state.tenants[request.tenant] -= 1
                if state.tenants[request.tenant] == 0:
                    del state.tenants[request.tenant]
                self._dispatch(request.model)

    def _dispatch(self, model: str) -> None:
        state, slots = self._state[model], self.deployments[model].slots_per_replica
        while len(state.queue):
            index = min(range(len(state.in_flight)), key=state.in_flight.__getitem__)
            if state.in_flight[index] >= slots:
                return
            ticket = state.queue.pop()
            if ticket.dispatched.done():
                # Its caller was cancelled: cancelling a task cancels the future it awaits at once, but
                # the task's own cleanup (withdrawing the ticket) runs only at its next step.
                continue
            state.in_flight[index] += 1
            state.tenants[ticket.request.tenant] += 1
            ticket.dispatched.set_result(index)
            if ticket.request.on_dispatch is not None:
                ticket.request.on_dispatch()

    def load(self, model: str) -> ModelLoad:
        deployment, state = self.deployments[model], self._state[model]
        used_total = [replica.kv_blocks for replica in deployment.replicas]
        return ModelLoad(len(state.queue), sum(state.in_flight), deployment.slots_per_replica * len(deployment.replicas),
                         sum(u for u, _ in used_total), sum(t for _, t in used_total), dict(state.tenants))

    def stop(self) -> None:
        for deployment in self.deployments.values():
            for replica in deployment.replicas:
                replica.stop()
