"""Picks a replica for each request and streams its outputs; the replicas' engine cores do the queueing.

A replica's slots, and the fair queue in front of them, live in its engine core (garrison_workers.engine.
admission), so fairness across tenants and each tenant's queue bound hold whichever gateways the requests come
through. The router picks, among a model's serving replicas, the one with the least load in its last snapshot
(requests waiting, then running, then KV blocks in use; counting what this gateway sent it since), but keeps a tenant's requests that start with the same
prompt block on the replica that served the first of them while that replica is not much busier (prefix-cache
affinity within a tenant: another tenant's salt never shares blocks anyway). Runs on the gateway's event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from garrison.router.replica import ReplicaClient
from garrison_workers.config import ModelConfig
from garrison_workers.engine.llm_engine import RequestOutput
from garrison_workers.engine.sequence import SamplingParams
from garrison_workers.engine_core import CoreRequest, ReplicaStatus
from garrison_workers.errors import UnavailableError
from garrison_workers.tokenizer import Tokenizer

AFFINITY_TOKENS = 16  # the prompt's first block of a default-sized cache
AFFINITY_ENTRIES = 65536
AFFINITY_SLACK = 2  # requests the affine replica may have waiting beyond the least busy one's


@dataclass(slots=True)
class Deployment:
    """One served model: its replicas, and what the gateway needs to check requests against it."""

    name: str
    model_config: ModelConfig
    tokenizer: Tokenizer | None
    replicas: list[ReplicaClient]
    max_model_len: int  # prompt plus output tokens that fit (the model's context and the KV cache)
    expected_replicas: int = 0  # how many the configuration asks for; fewer are up while the controller starts some


@dataclass(slots=True)
class RouteRequest:
    request_id: str
    tenant: str
    weight: float  # the tenant's priority weight
    model: str
    prompt_token_ids: list[int]
    params: SamplingParams
    salt: bytes  # prefix-cache salt: requests share cached blocks only with the same salt
    on_start: Callable[[], Any] | None = None  # called when the request enters its replica's engine


@dataclass(slots=True, frozen=True)
class ModelLoad:
    queued: int
    in_flight: int
    slots: int
    kv_blocks_used: int
    kv_blocks_total: int
    in_flight_by_tenant: dict[str, int]


@dataclass(slots=True)
class Router:
    deployments: dict[str, Deployment] = field(default_factory=dict)
    _affinity: OrderedDict[bytes, str] = field(default_factory=OrderedDict)  # prefix -> replica name

    async def stream(self, request: RouteRequest) -> AsyncIterator[RequestOutput]:
        """Send one request to a replica and stream it. Closing the iterator early aborts it and frees its slot."""
        deployment = self.deployments[request.model]
        replica = self._pick(deployment, request)
        outputs: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        replica.add(CoreRequest(request.request_id, request.tenant, request.weight, request.prompt_token_ids,
                                request.params, request.salt), outputs.put_nowait)
        finished = False
        try:
            while not finished:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                if item.started:
                    if request.on_start is not None:
                        request.on_start()
                    continue
                yield item
        finally:
            if not finished:
                replica.abort(request.request_id)

    def _pick(self, deployment: Deployment, request: RouteRequest) -> ReplicaClient:
        serving = [r for r in deployment.replicas if r.serving]
        if not serving:
            states = "; ".join(_describe(r.status) for r in deployment.replicas) or "none started yet"
            raise UnavailableError(f"model {deployment.name!r} has no serving replica now: {states}; retry later")
        best = min(serving, key=_busyness)
        key = hashlib.sha256(request.salt + b"".join(
            t.to_bytes(4, "little") for t in request.prompt_token_ids[:AFFINITY_TOKENS])).digest()
        affine = next((r for r in serving if r.name == self._affinity.get(key)), None)
        chosen = affine if affine is not None and affine.load.queued <= best.load.queued + AFFINITY_SLACK else best
        self._affinity[key] = chosen.name
        self._affinity.move_to_end(key)
        if len(self._affinity) > AFFINITY_ENTRIES:
            self._affinity.popitem(last=False)
        return chosen

    def load(self, model: str) -> ModelLoad:
        """The model's load, as its replicas' last snapshots tell it."""
        loads = [r.load for r in self.deployments[model].replicas if r.lost is None]
        by_tenant: dict[str, int] = {}
        for load in loads:
            for tenant, count in load.in_flight_by_tenant.items():
                by_tenant[tenant] = by_tenant.get(tenant, 0) + count
        return ModelLoad(sum(x.queued for x in loads), sum(x.running for x in loads), sum(x.slots for x in loads),
                         sum(x.kv_blocks_used for x in loads), sum(x.kv_blocks_total for x in loads), by_tenant)


def _busyness(replica: ReplicaClient) -> tuple[int, float, int]:
    """Its last snapshot, with the requests sent to it since (they run while slots are free, then wait)."""
    load = replica.load
    running = load.running + replica.unseen
    return load.queued + max(0, running - load.slots), min(running, load.slots) / max(1, load.slots), \
        load.kv_blocks_used


def _describe(status: ReplicaStatus) -> str:
    return f"{status.name} {status.state.value}" + (f" ({status.detail})" if status.detail else "")
