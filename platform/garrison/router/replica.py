"""One model replica's engine, driven by a thread of its own and watched by a supervisor of its own.

`LLMEngine.step()` is synchronous (a step takes milliseconds, a long prompt's chunk up to a second),
so it must not run on the gateway's event loop. The engine thread owns the engine: other threads only
enqueue commands (add, abort, lost) and receive each request's outputs through the sink they gave, which
the engine thread calls (so a sink must be thread-safe, e.g. `loop.call_soon_threadsafe`).

What fails is sized to its cause (DESIGN.md, "One request, end to end"):
- one sequence's fault (its logits, its text, its KV handoff) ends that request only; the engine goes on;
- a lost rank fails the requests of its worker group, and the supervisor brings the group back;
- an exception out of a step that no sequence can be blamed for fails the replica's requests in flight, and
  the replica keeps serving the next ones.

The supervisor does not depend on traffic: every `SUPERVISE_S` it asks each worker group whether a rank has died
(seen at once, without a call to the ranks), has the engine thread fail that group's requests, and restarts the
group on its own thread with a backoff, while the engine thread goes on with the replica's other groups (a
disaggregated replica's decode groups keep streaming while its prefill group comes back). A restart that cannot
be placed says why in `status` (shown by health, ListModels and the logs) and is tried again until it can.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from garrison_workers.engine.disagg import DisaggregatedEngine
from garrison_workers.engine.llm_engine import LLMEngine, RequestOutput
from garrison_workers.engine.sequence import SamplingParams
from garrison_workers.errors import GarrisonError, UnplaceableError, WorkerLostError

log = logging.getLogger(__name__)

Engine = LLMEngine | DisaggregatedEngine
# Receives every streaming delta of one request, or the error that ended it; called on the engine thread.
Sink = Callable[[RequestOutput | BaseException], None]

SUPERVISE_S = 0.25
FIRST_BACKOFF_S, MAX_BACKOFF_S = 1.0, 30.0


class ReplicaState(Enum):
    SERVING = "serving"
    RESTARTING = "restarting"  # a worker group was lost; it is being (or will be) started again
    UNPLACEABLE = "unplaceable"  # a restart found the cluster's slots taken; tried again until they free up
    STOPPED = "stopped"


@dataclass(slots=True, frozen=True)
class ReplicaStatus:
    name: str
    state: ReplicaState
    detail: str = ""  # why it is not serving, and what happens next
    restarts: int = 0  # successful restarts since it started


@dataclass(slots=True, frozen=True)
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    salt: bytes
    sink: Sink
    on_start: Callable[[], Any] | None = None  # called on the engine thread when the engine takes it


@dataclass(slots=True, frozen=True)
class _Abort:
    request_id: str


@dataclass(slots=True, frozen=True)
class _Lost:
    """A worker group lost a rank while no step saw it: fail its requests (on the engine thread, which owns them)."""

    engine: LLMEngine
    error: WorkerLostError


_STOP = object()


class Replica:
    def __init__(self, name: str, engine: Engine) -> None:
        self.name, self.engine = name, engine
        self._commands: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._sinks: dict[str, Sink] = {}
        self._thread = threading.Thread(target=self._run, name=f"engine-{name}", daemon=True)
        self._supervisor = threading.Thread(target=self._supervise, name=f"supervise-{name}", daemon=True)
        self._stopping = threading.Event()
        self._status = ReplicaStatus(name, ReplicaState.SERVING)
        self._backoff_s, self._next_attempt = FIRST_BACKOFF_S, 0.0

    @property
    def status(self) -> ReplicaStatus:
        return self._status

    @property
    def serving(self) -> bool:
        return self._status.state is ReplicaState.SERVING

    @property
    def kv_blocks(self) -> tuple[int, int]:
        """(used, total) KV blocks of the engine that decodes (a snapshot; read without a lock)."""
        engines = self.engine.decoders if isinstance(self.engine, DisaggregatedEngine) else [self.engine]
        total = sum(e.block_manager.num_blocks for e in engines)
        return total - sum(e.block_manager.num_free_blocks for e in engines), total

    def start(self) -> "Replica":
        self._thread.start()
        self._supervisor.start()
        return self

    def add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, salt: bytes, sink: Sink,
            on_start: Callable[[], Any] | None = None) -> None:
        self._commands.put(_Add(request_id, prompt_token_ids, params, salt, sink, on_start))

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping.set()
        self._commands.put(_STOP)
        self._thread.join(timeout)
        self._supervisor.join(timeout)
        for engine in self._engines():
            engine.shutdown()
        self._status = ReplicaStatus(self.name, ReplicaState.STOPPED, "stopped", self._status.restarts)

    def _engines(self) -> list[LLMEngine]:
        if isinstance(self.engine, DisaggregatedEngine):
            return [self.engine.prefill, *self.engine.decoders]
        return [self.engine]

    # -- the engine thread ------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            idle = not self.engine.has_unfinished_requests()
            try:
                command = self._commands.get(block=idle)  # sleep only when there is nothing to compute
            except queue.Empty:
                command = None
            while command is not None:
                if command is _STOP:
                    self._fail_all(GarrisonError(f"replica {self.name} is shutting down"))
                    return
                self._apply(command)
                command = self._next_command()
            if self.engine.has_unfinished_requests():
                self._step()

    def _next_command(self) -> Any:
        try:
            return self._commands.get_nowait()
        except queue.Empty:
            return None

    def _apply(self, command: _Add | _Abort | _Lost) -> None:
        if isinstance(command, _Abort):
            self._sinks.pop(command.request_id, None)
            self.engine.abort_request(command.request_id)
        elif isinstance(command, _Lost):
            if command.engine.failure is None:
                self._deliver_all(command.engine.fail_all(command.error))
        else:
            self._admit(command)

    def _admit(self, command: _Add) -> None:
        try:
            self.engine.add_request(command.request_id, command.prompt_token_ids, command.params, command.salt)
        except GarrisonError as err:
            _deliver(command.sink, err)
            return
        self._sinks[command.request_id] = command.sink
        if command.on_start is not None:
            command.on_start()

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as err:  # a bug, not a user error: fail what was running, keep serving
            log.exception("replica %s: engine step failed", self.name)
            self._fail_all(GarrisonError(f"replica {self.name} failed a step ({type(err).__name__}); retry"))
            return
        self._deliver_all(outputs)

    def _deliver_all(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            sink = self._sinks.pop(out.request_id, None) if out.finished else self._sinks.get(out.request_id)
            if sink is not None:
                _deliver(sink, out)

    def _fail_all(self, err: BaseException) -> None:
        for request_id, sink in list(self._sinks.items()):
            self.engine.abort_request(request_id)
            _deliver(sink, err)
        self._sinks.clear()

    # -- the supervisor ---------------------------------------------------------------------------

    def _supervise(self) -> None:
        while not self._stopping.wait(SUPERVISE_S):
            try:
                self._check()
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
        if not failed:
            self._settle(ReplicaState.SERVING, "")
        elif time.monotonic() >= self._next_attempt:
            self._restart([engine for engine in failed if engine.failure is not None])

    def _restart(self, engines: list[LLMEngine]) -> None:
        for engine in engines:
            if self._stopping.is_set():
                return
            cause = str(engine.failure)
            self._settle(ReplicaState.RESTARTING, f"restarting a worker group after: {cause}")
            try:
                engine.restart()
            except UnplaceableError as err:
                self._retry_later(ReplicaState.UNPLACEABLE, str(err))
                return
            except Exception as err:  # a model that no longer loads, a layout the cluster lost: keep trying
                log.exception("replica %s: restart failed", self.name)
                self._retry_later(ReplicaState.RESTARTING, f"restart failed ({type(err).__name__}: {err})")
                return
            self._backoff_s = FIRST_BACKOFF_S
            self._status = ReplicaStatus(self.name, self._status.state, self._status.detail, self._status.restarts + 1)
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


def _deliver(sink: Sink, item: RequestOutput | BaseException) -> None:
    """A sink that fails (its event loop closed) loses its own output, never the engine thread."""
    try:
        sink(item)
    except Exception:
        log.exception("could not deliver an output; the request's receiver is gone")
