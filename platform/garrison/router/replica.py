"""A gateway's handle on one replica's engine core (garrison_workers.engine_core): requests go to it, and one poller
per core brings back the outputs of every request this gateway sent it, batched per engine step, with the
replica's status and a snapshot of its load (what the router routes by).

A core is reached through a `CoreLink`: a Ray actor (the cluster form: the core lives on the cluster, named, and
outlives any gateway) or an object in this process (tests, `on_ray: false`). Both answer the same calls. When a
core is lost (its actor died), the poller fails this gateway's requests on it with UNAVAILABLE and the replica
reads as lost until the controller has started it again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Protocol

from garrison_workers.engine.llm_engine import RequestOutput
from garrison_workers.engine_core import CoreInfo, CoreLoad, CoreRequest, EngineCore, Polled, ReplicaState, ReplicaStatus
from garrison_workers.errors import WorkerLostError

log = logging.getLogger(__name__)

POLL_S = 0.25  # an idle poll returns after this long, with the load and status of the replica
Sink = Callable[[RequestOutput | BaseException], None]


class CoreLink(Protocol):
    def add(self, client: str, request: CoreRequest) -> None: ...

    def abort(self, client: str, request_id: str) -> None: ...

    async def poll(self, client: str, timeout: float) -> Polled: ...

    async def describe(self) -> CoreInfo: ...


class LocalCore:
    """A core in this process: its calls are method calls (a poll waits on a thread)."""

    def __init__(self, core: EngineCore) -> None:
        self.core = core

    def add(self, client: str, request: CoreRequest) -> None:
        self.core.add(client, request)

    def abort(self, client: str, request_id: str) -> None:
        self.core.abort(client, request_id)

    async def poll(self, client: str, timeout: float) -> Polled:
        return await asyncio.to_thread(self.core.poll, client, timeout)

    async def describe(self) -> CoreInfo:
        return self.core.describe()


class RayCore:
    """A core that is a Ray actor: adds and aborts are sent without waiting (their errors come back as outputs)."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    def add(self, client: str, request: CoreRequest) -> None:
        self.actor.add.remote(client, request)

    def abort(self, client: str, request_id: str) -> None:
        self.actor.abort.remote(client, request_id)

    async def poll(self, client: str, timeout: float) -> Polled:
        return await self.actor.poll.remote(client, timeout)

    async def describe(self) -> CoreInfo:
        return await self.actor.describe.remote()


class ReplicaClient:
    def __init__(self, link: CoreLink, info: CoreInfo, client: str) -> None:
        self.link, self.info, self.client = link, info, client
        self.name = info.name
        self._sinks: dict[str, Sink] = {}
        self._status = ReplicaStatus(info.name, ReplicaState.SERVING)
        self._load = CoreLoad(slots=info.slots)
        self._task: asyncio.Task[None] | None = None
        self.lost: BaseException | None = None  # why the core was lost, once it was
        # Requests this gateway sent since the last snapshot came back: a burst arriving between two snapshots
        # counts them, or it would all go to the replica that looked least busy before it.
        self.unseen = 0

    @property
    def status(self) -> ReplicaStatus:
        return self._status

    @property
    def serving(self) -> bool:
        return self.lost is None and self._status.state is ReplicaState.SERVING

    @property
    def load(self) -> CoreLoad:
        return self._load

    def start(self) -> "ReplicaClient":
        self._task = asyncio.get_running_loop().create_task(self._follow())
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def add(self, request: CoreRequest, sink: Sink) -> None:
        if self.lost is not None:
            sink(WorkerLostError(f"replica {self.name}'s engine core was lost ({self.lost}); retry"))
            return
        self._sinks[request.request_id] = sink
        self.unseen += 1
        self.link.add(self.client, request)

    def abort(self, request_id: str) -> None:
        if self._sinks.pop(request_id, None) is not None and self.lost is None:
            self.link.abort(self.client, request_id)

    async def _follow(self) -> None:
        while True:
            try:
                polled = await self.link.poll(self.client, POLL_S)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # the core is gone (its actor died): this gateway's requests on it fail
                self._lose(err)
                return
            self._status, self._load, self.unseen = polled.status, polled.load, 0
            for out in polled.outputs:
                sink = self._sinks.pop(out.request_id, None) if out.finished else self._sinks.get(out.request_id)
                if sink is not None:
                    sink(out)

    def _lose(self, err: BaseException) -> None:
        self.lost = err
        log.error("replica %s: its engine core was lost: %s", self.name, err)
        self._status = ReplicaStatus(self.name, ReplicaState.RESTARTING, f"its engine core was lost ({err})",
                                     self._status.restarts)
        lost = WorkerLostError(f"replica {self.name}'s engine core was lost; retry")
        for sink in self._sinks.values():
            sink(lost)
        self._sinks.clear()
