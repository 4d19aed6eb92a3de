"""A replica's engine core: admission, the engine loop, its worker groups' supervision, and each client's outputs.

In the cluster form an engine core is a long-lived, named Ray actor, one per replica, started by the controller;
gateways (its clients, any number of them) find it by name, send it requests and collect their outputs. In one
process (tests, the CPU quick path) the same class is used directly. Either way it owns:

- admission (engine.admission): requests wait in a fair queue across tenants, whichever gateway sent them, until
  a slot of the engine (max_num_seqs) is free;
- the engine (an LLMEngine, or a DisaggregatedEngine over a prefill group and its decode groups; the same
  protocol), stepped by a thread of its own. The engine's worker ranks sample and return only token ids and the
  log-probabilities asked for; the core detokenizes and checks stop strings;
- a supervisor thread, which does not wait for traffic: every `SUPERVISE_S` it asks each worker group whether a
  rank has died (seen at once, without a call to the ranks), has the engine thread fail that group's requests,
  and restarts the group with a backoff while the engine thread goes on with the replica's other groups (a
  disaggregated replica's decode groups keep streaming while its prefill group comes back). A restart that cannot
  be placed says why in `status` and is tried again until it can. It also forgets clients that stopped polling
  (a gateway that died) and aborts their requests, so their blocks and slots are free again;
- outputs, per client: `poll` returns everything the client's requests gained since its last poll (a few bytes
  per token, batched per step), with the replica's status and a snapshot of its load (for routing).

What fails is sized to its cause: one sequence's fault (its logits, its text, its KV handoff) ends that request
only; a lost rank fails the requests of its worker group; an exception out of a step that no sequence can be
blamed for fails the requests in flight, and the core keeps serving the next ones.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal

from garrison_workers.config import ModelConfig
from garrison_workers.engine.admission import Admission, Waiting
from garrison_workers.engine.config import EngineConfig
from garrison_workers.engine.disagg import DisaggregatedEngine
from garrison_workers.engine.llm_engine import LLMEngine, RequestOutput
from garrison_workers.engine.sequence import SamplingParams
from garrison_workers.errors import (GarrisonError, LayoutError, UnavailableError, UnplaceableError,
                                     WorkerLostError)
from garrison_workers.faults import Fault
from garrison_workers.loader import ModelLocation
from garrison_workers.parallel.dims import ParallelDims
from garrison_workers.placement import GroupPlacement

log = logging.getLogger(__name__)

Role = Literal["both", "prefill", "decode"]
Engine = LLMEngine | DisaggregatedEngine

SUPERVISE_S = 0.25
FIRST_BACKOFF_S, MAX_BACKOFF_S = 1.0, 30.0
CLIENT_TTL_S = 15.0  # a client (gateway) that has not polled for this long is gone: its requests are aborted


@dataclass(slots=True, frozen=True)
class GroupSpec:
    role: Role = "both"
    tp: int = 1
    ep: int = 1
    placement: GroupPlacement = GroupPlacement()


@dataclass(slots=True, frozen=True)
class CoreSpec:
    """How to build one replica."""

    name: str  # the replica's: "<model>/<index>"
    model: str
    location: ModelLocation
    groups: tuple[GroupSpec, ...]
    engine: EngineConfig
    on_ray: bool = True  # a single-rank group in a Ray actor of its own too (False: in the core's process)
    max_queued_per_tenant: int = 256


@dataclass(slots=True, frozen=True)
class CoreRequest:
    request_id: str
    tenant: str
    weight: float  # the tenant's priority weight
    prompt_token_ids: list[int]
    params: SamplingParams
    salt: bytes  # prefix-cache salt: requests share cached blocks only with the same salt


@dataclass(slots=True, frozen=True)
class CoreInfo:
    """What a gateway needs to check requests against the replica's model, without loading it."""

    name: str
    model: str
    model_config: ModelConfig
    tokenizer_files: dict[str, bytes] | None  # garrison_workers.tokenizer.Tokenizer.from_files reads them
    max_model_len: int  # prompt plus output tokens that fit (the model's context and the KV cache)
    slots: int


class ReplicaState(Enum):
    SERVING = "serving"
    RESTARTING = "restarting"  # a worker group was lost; it is being (or will be) started again
    UNPLACEABLE = "unplaceable"  # a restart found the cluster's slots taken; tried again until they free up
    DRAINING = "draining"  # being stopped on purpose: takes no new requests, lets those running finish
    STOPPED = "stopped"


@dataclass(slots=True, frozen=True)
class ReplicaStatus:
    name: str
    state: ReplicaState
    detail: str = ""  # why it is not serving, and what happens next
    restarts: int = 0  # successful worker-group restarts since it started


@dataclass(slots=True, frozen=True)
class CoreLoad:
    queued: int = 0
    running: int = 0
    slots: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    in_flight_by_tenant: dict[str, int] = field(default_factory=dict)
    queued_by_tenant: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class Polled:
    outputs: list[RequestOutput]
    status: ReplicaStatus
    load: CoreLoad


@dataclass(slots=True)
class _Client:
    outputs: deque[RequestOutput] = field(default_factory=deque)
    requests: set[str] = field(default_factory=set)
    seen: float = field(default_factory=time.monotonic)


@dataclass(slots=True, frozen=True)
class _Add:
    client: str
    request: CoreRequest


@dataclass(slots=True, frozen=True)
class _Abort:
    request_id: str


@dataclass(slots=True, frozen=True)
class _Lost:
    """A worker group lost a rank while no step saw it: fail its requests (on the engine thread, which owns them)."""

    engine: LLMEngine
    error: WorkerLostError


_STOP = object()


def build_engine(spec: CoreSpec) -> Engine:
    """The replica's engine: one `both` group, or a prefill group and its decode groups."""
    def group(g: GroupSpec) -> LLMEngine:
        dims = ParallelDims(tp=g.tp, ep=g.ep)
        return LLMEngine.from_path(spec.location, spec.engine, dims, role=g.role,
                                   on_ray=spec.on_ray or dims.world_size > 1, placement=g.placement)

    if all(g.role == "both" for g in spec.groups):
        return group(spec.groups[0])
    engines: list[LLMEngine] = []
    try:
        for g in sorted(spec.groups, key=lambda g: g.role != "prefill"):
            engines.append(group(g))
        return DisaggregatedEngine(engines[0], engines[1:])
    except BaseException:
        for engine in engines:
            engine.shutdown()
        raise


class EngineCore:
    def __init__(self, spec: CoreSpec) -> None:
        self.spec, self.name = spec, spec.name
        self.engine = build_engine(spec)
        self.admission = Admission(spec.engine.max_num_seqs, spec.max_queued_per_tenant)
        self._commands: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._requests: dict[str, tuple[str, CoreRequest]] = {}  # request id -> (client, request)
        self._clients: dict[str, _Client] = {}
        self._outputs = threading.Condition()  # guards _clients
        self._stopping = threading.Event()
        self._status = ReplicaStatus(self.name, ReplicaState.SERVING)
        self._load = CoreLoad(slots=spec.engine.max_num_seqs)
        self._backoff_s, self._next_attempt = FIRST_BACKOFF_S, 0.0
        self._draining = False
        self._thread = threading.Thread(target=self._run, name=f"engine-{self.name}", daemon=True)
        self._supervisor = threading.Thread(target=self._supervise, name=f"supervise-{self.name}", daemon=True)
        self._snapshot()
        self._thread.start()
        self._supervisor.start()

    # -- what clients call ------------------------------------------------------------------------

    def serves(self, spec: CoreSpec) -> bool:
        """Whether this core was built from `spec` (a controller adopting it after a config change asks)."""
        return spec == self.spec

    def describe(self) -> CoreInfo:
        decoders = self._decoders()
        tokenizer = decoders[0].tokenizer
        return CoreInfo(self.name, self.spec.model, decoders[0].model_config,
                        tokenizer.to_files() if tokenizer is not None else None,
                        min(d.max_model_len for d in decoders), self.spec.engine.max_num_seqs)

    def add(self, client: str, request: CoreRequest) -> None:
        """Queue a request; its outputs (a first one when it enters the engine, then its tokens, or the error that
        refused it) come to `client`'s polls."""
        with self._outputs:
            self._clients.setdefault(client, _Client()).requests.add(request.request_id)
        self._commands.put(_Add(client, request))

    def abort(self, client: str, request_id: str) -> None:
        """Drop a request wherever it is (queued, in the engine, in a KV handoff); its blocks and slot are freed."""
        with self._outputs:
            box = self._clients.get(client)
            if box is not None:
                box.requests.discard(request_id)
        self._commands.put(_Abort(request_id))

    def poll(self, client: str, timeout: float) -> Polled:
        """What `client`'s requests gained since its last poll, waiting up to `timeout` s for something."""
        with self._outputs:
            box = self._clients.setdefault(client, _Client())
            box.seen = time.monotonic()
            if not box.outputs:
                self._outputs.wait_for(lambda: bool(box.outputs) or self._stopping.is_set(), timeout)
            outputs, box.outputs = list(box.outputs), deque()
        return Polled(outputs, self._status, self._load)

    @property
    def status(self) -> ReplicaStatus:
        return self._status

    @property
    def load(self) -> CoreLoad:
        return self._load

    def drain(self, seconds: float) -> int:
        """Stop on purpose (scale-down, upgrade) the way a gateway does: take no new requests (gateways route
        elsewhere; one that arrives anyway is refused with UNAVAILABLE) and give those here up to `seconds` to
        finish; then stop. Returns how many had to be failed at the deadline."""
        self._draining = True
        self._status = ReplicaStatus(self.name, ReplicaState.DRAINING, "stopping: new requests go to other "
                                     "replicas", self._status.restarts)
        deadline = time.monotonic() + seconds
        while (self._requests or self._undelivered()) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = len(self._requests)
        self.shutdown()
        return left

    def _undelivered(self) -> bool:
        """Outputs a live client has not polled yet: a request's last piece is only delivered once collected."""
        now = time.monotonic()
        with self._outputs:
            return any(box.outputs and now - box.seen < CLIENT_TTL_S for box in self._clients.values())

    def watch(self) -> None:
        """Answers only when the core stops: a caller keeps one call pending to learn of its death or its end."""
        self._stopping.wait()

    def kill_rank(self, group: int, rank: int) -> None:
        """Fault injection: kill one rank of the replica's `group`-th worker group (prefill first)."""
        self._engines()[group].executor.kill_rank(rank)  # type: ignore[attr-defined]

    def inject_fault(self, group: int, rank: int, point: str, fault: Fault | None) -> None:
        """Fault injection: arm `fault` at `point` (faults.POINTS) of one rank of the `group`-th worker group."""
        self._engines()[group].executor.inject_fault(rank, point, fault)  # type: ignore[attr-defined]

    def shutdown(self, timeout: float = 30.0) -> None:
        self._stopping.set()
        self._commands.put(_STOP)
        self._thread.join(timeout)
        self._supervisor.join(timeout)
        for engine in self._engines():
            engine.shutdown()
        self._status = ReplicaStatus(self.name, ReplicaState.STOPPED, "stopped", self._status.restarts)
        with self._outputs:
            self._outputs.notify_all()

    def _engines(self) -> list[LLMEngine]:
        if isinstance(self.engine, DisaggregatedEngine):
            return [self.engine.prefill, *self.engine.decoders]
        return [self.engine]

    def _decoders(self) -> list[LLMEngine]:
        return self.engine.decoders if isinstance(self.engine, DisaggregatedEngine) else [self.engine]

    # -- the engine thread ------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            busy = self.engine.has_unfinished_requests() or (len(self.admission) and self._admitting())
            try:
                command = self._commands.get(block=not busy)  # sleep only when there is nothing to compute
            except queue.Empty:
                command = None
            while command is not None:
                if command is _STOP:
                    self._fail_all(GarrisonError(f"replica {self.name} is shutting down; retry"))
                    return
                self._apply(command)
                command = self._next_command()
            self._admit()
            if self.engine.has_unfinished_requests():
                self._step()
            self._snapshot()

    def _next_command(self) -> Any:
        try:
            return self._commands.get_nowait()
        except queue.Empty:
            return None

    def _apply(self, command: _Add | _Abort | _Lost) -> None:
        if isinstance(command, _Add):
            self._queue(command)
        elif isinstance(command, _Abort):
            if self._requests.pop(command.request_id, None) is not None:
                self.admission.done(command.request_id)
                self.engine.abort_request(command.request_id)
        elif command.engine.failure is None:
            self._deliver(command.engine.fail_all(command.error))

    def _queue(self, command: _Add) -> None:
        request = command.request
        if self._draining:
            self._emit(command.client, _failure(request, UnavailableError(f"replica {self.name} is stopping; "
                                                                          "retry (another replica takes it)")))
            return
        if request.request_id in self._requests:
            self._emit(command.client, _failure(request, GarrisonError(f"request id {request.request_id!r} is in "
                                                                       "use on this replica")))
            return
        cost = len(request.prompt_token_ids) + request.params.max_tokens
        try:
            self.admission.push(Waiting(request.request_id, request.tenant, request.weight, cost))
        except GarrisonError as err:
            self._emit(command.client, _failure(request, err))
            return
        self._requests[request.request_id] = (command.client, request)

    def _admitting(self) -> bool:
        """Requests enter the engine only while all its groups serve: those waiting meanwhile wait for the restart."""
        return all(engine.failure is None for engine in self._engines())

    def _admit(self) -> None:
        while self._admitting() and (waiting := self.admission.next()) is not None:
            client, request = self._requests[waiting.request_id]
            try:
                self.engine.add_request(request.request_id, request.prompt_token_ids, request.params, request.salt)
            except GarrisonError as err:
                self._finish(request.request_id)
                self._emit(client, _failure(request, err))
                continue
            self._emit(client, _started(request))

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as err:  # a bug, not a user error: fail what was running, keep serving
            log.exception("replica %s: engine step failed", self.name)
            self._fail_all(GarrisonError(f"replica {self.name} failed a step ({type(err).__name__}); retry"))
            return
        self._deliver(outputs)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        owned = []
        for out in outputs:
            owner = self._requests.get(out.request_id)
            if owner is None:  # aborted meanwhile
                continue
            if out.finished:
                self._finish(out.request_id)
            owned.append((owner[0], out))
        self._emit_all(owned)

    def _finish(self, request_id: str) -> None:
        self._requests.pop(request_id, None)
        self.admission.done(request_id)

    def _fail_all(self, err: GarrisonError) -> None:
        for request_id, (client, request) in list(self._requests.items()):
            self.engine.abort_request(request_id)
            self._finish(request_id)
            self._emit(client, _failure(request, err))

    def _emit(self, client: str, output: RequestOutput) -> None:
        self._emit_all([(client, output)])

    def _emit_all(self, outputs: list[tuple[str, RequestOutput]]) -> None:
        """Hand outputs to their clients at once: a step's outputs then reach a client in one poll, not one
        output in the first and the rest in the next."""
        if not outputs:
            return
        with self._outputs:
            for client, output in outputs:
                box = self._clients.get(client)
                if box is None:  # a client forgotten as gone: nobody collects its outputs
                    continue
                box.outputs.append(output)
                if output.finished:
                    box.requests.discard(output.request_id)
            self._outputs.notify_all()

    def _snapshot(self) -> None:
        """The load clients see, taken on this thread (which owns what it reads) and swapped in whole."""
        decoders = self._decoders()
        total = sum(d.block_manager.num_blocks for d in decoders)
        self._load = CoreLoad(len(self.admission), self.admission.running, self.admission.slots,
                              total - sum(d.block_manager.num_free_blocks for d in decoders), total,
                              dict(self.admission.in_flight), self.admission.queued_by_tenant())

    # -- the supervisor ---------------------------------------------------------------------------

    def _supervise(self) -> None:
        while not self._stopping.wait(SUPERVISE_S):
            try:
                self._check()
                self._forget_gone_clients()
            except Exception:  # a supervisor that dies would leave the replica unwatched
                log.exception("replica %s: supervision failed; trying again", self.name)

    def _check(self) -> None:
        failed = []
        for engine in self._engines():
            if engine.failure is None:
                lost = engine.lost()
                if lost is not None:
                    self._commands.put(_Lost(engine, lost))
                    failed.append(engine)
            else:
                failed.append(engine)
        if self._draining:
            return
        if not failed:
            self._settle(ReplicaState.SERVING, "")
        elif time.monotonic() >= self._next_attempt:
            self._restart([engine for engine in failed if engine.failure is not None])

    def _restart(self, engines: list[LLMEngine]) -> None:
        for engine in engines:
            if self._stopping.is_set():
                return
            self._settle(ReplicaState.RESTARTING, f"restarting a worker group after: {engine.failure}")
            try:
                engine.restart()
            except (UnplaceableError, LayoutError) as err:  # slots taken, or nodes gone: it waits for capacity
                self._retry_later(ReplicaState.UNPLACEABLE, str(err))
                return
            except Exception as err:  # a model that no longer loads, a layout the cluster lost: keep trying
                log.exception("replica %s: restart failed", self.name)
                self._retry_later(ReplicaState.RESTARTING, f"restart failed ({type(err).__name__}: {err})")
                return
            self._backoff_s = FIRST_BACKOFF_S
            self._status = ReplicaStatus(self.name, self._status.state, self._status.detail, self._status.restarts + 1)
            self._commands.put(None)  # wake the engine thread: requests that waited for the group may go in
            log.warning("replica %s: a worker group is serving again", self.name)

    def _retry_later(self, state: ReplicaState, why: str) -> None:
        self._next_attempt = time.monotonic() + self._backoff_s
        self._settle(state, f"{why}; next attempt in {self._backoff_s:g} s")
        self._backoff_s = min(2 * self._backoff_s, MAX_BACKOFF_S)

    def _settle(self, state: ReplicaState, detail: str) -> None:
        if (state, detail) != (self._status.state, self._status.detail):
            (log.info if state is ReplicaState.SERVING else log.warning)("replica %s: %s%s", self.name, state.value,
                                                                        f": {detail}" if detail else "")
        self._status = ReplicaStatus(self.name, state, detail, self._status.restarts)

    def _forget_gone_clients(self) -> None:
        cutoff = time.monotonic() - CLIENT_TTL_S
        with self._outputs:
            gone = [name for name, box in self._clients.items() if box.seen < cutoff]
            requests = [r for name in gone for r in self._clients.pop(name).requests]
        for request_id in requests:
            self._commands.put(_Abort(request_id))
        if gone:
            log.warning("replica %s: clients %s stopped polling; aborted their %d requests", self.name,
                        ", ".join(gone), len(requests))


def _started(request: CoreRequest) -> RequestOutput:
    return RequestOutput(request.request_id, [], "", [], False, None, len(request.prompt_token_ids), 0, 0,
                         started=True)


def _failure(request: CoreRequest, err: GarrisonError) -> RequestOutput:
    return RequestOutput(request.request_id, [], "", [], True, "error", len(request.prompt_token_ids), 0, 0,
                         error=err)
