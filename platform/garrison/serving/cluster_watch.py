"""Calls into a Ray cluster that may be gone, and noticing that it is.

A Ray driver whose cluster's head is gone waits for ever in Ray's blocking calls (`ray.util.list_named_actors`,
`ray.get` without a timeout), and does not reconnect when a new head comes up. A gateway or controller that has
lost its cluster can therefore never serve again; what it can do is exit, for its supervisor (Kubernetes, systemd)
to start it again against the new head. `DetachedCall` runs a blocking call on a daemon thread of its own, one at
a time, so that a stuck call holds neither the threads of `asyncio.to_thread` (every other blocking call of the
process would queue behind it) nor the process's exit; `watch_cluster` tells when no call has answered for
`cluster_lost_seconds`.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)

PROBE_S = 1.0  # how often watch_cluster asks the cluster
PROBE_WAIT_S = 5.0  # how long one probe waits for its answer; a slower one is picked up by a later probe


class DetachedCall(Generic[T]):
    """`call()` on a daemon thread, at most one at a time: a call still running is waited for again, not repeated."""

    def __init__(self, call: Callable[[], T], name: str) -> None:
        self.call, self.name = call, name
        self._pending: asyncio.Future[T] | None = None

    async def result(self, wait: float | None) -> tuple[bool, T | None]:
        """(True, the call's result) once it has answered (its exception, raised); (False, None) while it has not
        within `wait` seconds (None: as long as it takes). The next call of this method starts a new call only
        once the last one has answered."""
        if self._pending is None:
            self._pending = self._start()
        done, _ = await asyncio.wait({self._pending}, timeout=wait)
        if not done:
            return False, None
        pending, self._pending = self._pending, None
        return True, pending.result()

    def cancel(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None

    def _start(self) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()

        def run() -> None:
            settle: Callable[[Any], object]
            try:
                outcome: Any = self.call()
                settle = future.set_result
            except BaseException as err:  # noqa: BLE001 - handed to the loop, which raises it in result()
                outcome, settle = err, future.set_exception
            try:
                loop.call_soon_threadsafe(lambda: future.cancelled() or settle(outcome))
            except RuntimeError:  # the loop closed meanwhile: nobody waits for this answer
                pass

        threading.Thread(target=run, name=self.name, daemon=True).start()
        return future


async def watch_cluster(probe: Callable[[], object], lost_after: float) -> str:
    """Ask the cluster with `probe` (a blocking Ray call) every PROBE_S until it has not answered for `lost_after`
    seconds; then return how long it has been silent, in words."""
    call: DetachedCall[object] = DetachedCall(probe, "cluster-probe")
    loop = asyncio.get_running_loop()
    answered_at = loop.time()
    try:
        while True:
            try:
                answered, _ = await call.result(PROBE_WAIT_S)
            except Exception:  # noqa: BLE001 - an error is no answer: the cluster is unreachable for now
                answered = False
            now = loop.time()
            if answered:
                answered_at = now
            elif now - answered_at > lost_after:
                why = f"the Ray cluster has not answered for {now - answered_at:.0f} s"
                log.error("%s: exiting, for this process's supervisor to start it again (a Ray driver does not "
                          "reconnect to a new head)", why)
                return why
            await asyncio.sleep(PROBE_S)
    finally:
        call.cancel()


def ray_answers() -> object:
    """A small question to the cluster's GCS (this namespace's named actors): blocks while the cluster is gone."""
    import ray

    return ray.util.list_named_actors()


async def until_stopped(lost: Awaitable[str]) -> str | None:
    """Wait for SIGINT or SIGTERM (None) or for `lost` to say that the cluster is gone (why, in words)."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    stop, gone = loop.create_task(stopping.wait()), asyncio.ensure_future(lost)
    try:
        await asyncio.wait({stop, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
        gone.cancel()
    return None if stopping.is_set() else gone.result()
