"""One model replica's engine, driven by a thread of its own.

`LLMEngine.step()` is synchronous (a step takes milliseconds, a long prompt's chunk up to a second),
so it must not run on the gateway's event loop. The thread owns the engine: other threads only
enqueue commands (add, abort) and receive each request's outputs through the sink they gave, which
the engine thread calls (so a sink must be thread-safe, e.g. `loop.call_soon_threadsafe`).
A failure inside a step fails the requests it touched, never the thread: the replica keeps serving.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from garrison_workers.engine.disagg import DisaggregatedEngine
from garrison_workers.engine.llm_engine import LLMEngine, RequestOutput
from garrison_workers.engine.sequence import SamplingParams
from garrison_workers.errors import GarrisonError

log = logging.getLogger(__name__)

Engine = LLMEngine | DisaggregatedEngine
# Receives every streaming delta of one request, or the error that ended it; called on the engine thread.
Sink = Callable[[RequestOutput | BaseException], None]


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


_STOP = object()


class Replica:
    def __init__(self, name: str, engine: Engine) -> None:
        self.name, self.engine = name, engine
        self._commands: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._sinks: dict[str, Sink] = {}
        self._thread = threading.Thread(target=self._run, name=f"engine-{name}", daemon=True)

    @property
    def kv_blocks(self) -> tuple[int, int]:
        """(used, total) KV blocks of the engine that decodes (a snapshot; read without a lock)."""
        engines = self.engine.decoders if isinstance(self.engine, DisaggregatedEngine) else [self.engine]
        total = sum(e.block_manager.num_blocks for e in engines)
        return total - sum(e.block_manager.num_free_blocks for e in engines), total

    def start(self) -> "Replica":
        self._thread.start()
        return self

    def add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, salt: bytes, sink: Sink,
            on_start: Callable[[], Any] | None = None) -> None:
        self._commands.put(_Add(request_id, prompt_token_ids, params, salt, sink, on_start))

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    def stop(self, timeout: float = 30.0) -> None:
        self._commands.put(_STOP)
        self._thread.join(timeout)
        for engine in self._engines():
            engine.shutdown()

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

    def _apply(self, command: _Add | _Abort) -> None:
        if isinstance(command, _Abort):
            self._sinks.pop(command.request_id, None)
            self.engine.abort_request(command.request_id)
            return
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
        for out in outputs:
            sink = self._sinks.pop(out.request_id, None) if out.finished else self._sinks.get(out.request_id)
            if sink is not None:
                _deliver(sink, out)
        self._recover()

    def _recover(self) -> None:
        """After a lost worker rank, bring the group back so the next request can be served."""
        for engine in self._engines():
            if engine.failure is not None:
                log.warning("replica %s: restarting after: %s", self.name, engine.failure)
                try:
                    engine.restart()
                except Exception:
                    log.exception("replica %s: restart failed; requests will be refused", self.name)

    def _fail_all(self, err: BaseException) -> None:
        for request_id, sink in list(self._sinks.items()):
            self.engine.abort_request(request_id)
            _deliver(sink, err)
        self._sinks.clear()


def _deliver(sink: Sink, item: RequestOutput | BaseException) -> None:
    """A sink that fails (its event loop closed) loses its own output, never the engine thread."""
    try:
        sink(item)
    except Exception:
        log.exception("could not deliver an output; the request's receiver is gone")
