"""What keeps the database off each request's path: every key and tenant mirrored in memory, and a usage buffer
written once a second.

Measured (ops/bench/gateway.py): three queries to authorize plus one ledger write cost ~2.7 ms of gateway CPU per
request. `AuthMirror` holds an `AuthSnapshot` (garrison.tenancy.auth) of every key and live tenant, and polls the
tenancy version (one indexed query) every `AUTH_POLL_S`: a change made through any gateway (several share one
PostgreSQL) takes effect on every gateway within that interval plus one reload, well under a second, and one made
through this gateway at once. A request, and an unknown or malformed key above all, costs no database round trip:
a flood of bad keys is refused from memory. While the database is unreachable a gateway keeps deciding from its
last snapshot (a change made meanwhile reaches it when the database is back). Usage is flushed every
`FLUSH_INTERVAL_S`, before any usage read, and at shutdown; UsageBuffer's docstring says exactly what a crash or an
outage can lose.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Collection
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from garrison.tenancy.auth import AuthSnapshot
from garrison.tenancy.errors import InvalidArgumentError, StoreUnavailableError
from garrison.tenancy.ledger import COUNTS, Spool, UsageBatch, UsageCount
from garrison.tenancy.records import Authorization, Principal, Tenant
from garrison.tenancy.service import TenancyService

log = logging.getLogger(__name__)

AUTH_POLL_S = 0.25
FLUSH_INTERVAL_S = 1.0
SHUTDOWN_FLUSH_S = 5.0


class AuthMirror:
    def __init__(self, tenancy: TenancyService, poll_s: float = AUTH_POLL_S) -> None:
        self.tenancy, self.poll_s = tenancy, poll_s
        self._snapshot = AuthSnapshot(-1, {}, {})
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._reachable = True

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.get_running_loop().create_task(self._follow())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def authenticate(self, secret: str) -> Principal:
        return self._snapshot.authenticate(secret)

    def authorize(self, secret: str, model: str, served: Collection[str] | None = None) -> Authorization:
        return self._snapshot.authorize(secret, model, served)

    def tenant(self, name: str) -> Tenant | None:
        return self._snapshot.tenants.get(name)

    async def refresh(self, version: int | None = None) -> None:
        """Read the snapshot again (at once after a change made through this gateway), unless it is at `version`."""
        async with self._lock:
            if version is None or version != self._snapshot.version:
                self._snapshot = await asyncio.to_thread(self.tenancy.auth_snapshot)

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.refresh(await asyncio.to_thread(self.tenancy.auth_version))
            except Exception as err:  # the database is unreachable: decide from the last snapshot meanwhile
                if self._reachable:
                    log.warning("cannot read keys and tenants (%s); deciding from those read last", type(err).__name__)
                self._reachable = False
            else:
                self._reachable = True


class UsageBuffer:
    """Usage counts of finished requests, written to the ledger in batches once a second.

    What can be lost or counted twice, precisely:
    - Counted twice: nothing. Each flush is one batch with an id, written in one transaction together
      with that id; a batch whose id is recorded is skipped, so retries and replays are idempotent.
    - A failed write (database down, locked, out of connections) keeps the batch in memory, retried every
      second, and appends it to the spool (`<data_dir>/usage-spool.jsonl`, 0600) at once.
    - A clean stop (SIGTERM, SIGINT) loses nothing: the last flush gets `SHUTDOWN_FLUSH_S`; whatever the
      database has not confirmed by then is in the spool, replayed (idempotently) at the next start.
    - A process that dies without stopping (SIGKILL, OOM kill, power loss) loses the usage of requests
      that ended after the last batch the database confirmed or the spool holds: at most the last
      `FLUSH_INTERVAL_S`, plus the batch being written at that moment if it had not committed. Requests in
      flight then are never counted (usage is added when a request ends). A spool that cannot be written
      (disk full, read-only) is logged at ERROR with its counts, which are then kept in memory only.
    """

    def __init__(self, tenancy: TenancyService, spool: Path | None = None) -> None:
        self.tenancy = tenancy
        self._spool = Spool(spool) if spool is not None else None
        self._pending: dict[tuple[str, str, datetime], list[int]] = {}
        self._unwritten: list[UsageBatch] = []  # oldest first; each is written (or skipped) before the next
        self._spooled: set[str] = set()  # ids of unwritten batches already in the spool
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    def add(self, tenant: str, model: str, **counts: int) -> None:
        hour = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)
        row = self._pending.setdefault((tenant, model, hour), [0] * len(COUNTS))
        for index, name in enumerate(COUNTS):
            row[index] += counts.get(name, 0)

    def replay_spool(self) -> int:
        """At start, before serving: take back what the last run could not write (written at the next flush)."""
        if self._spool is None:
            return 0
        batches = self._spool.read()
        self._unwritten[:0] = batches
        self._spooled.update(batch.id for batch in batches)
        return len(batches)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._flush_forever())

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            try:
                await self.flush()
            except StoreUnavailableError:  # logged by the store; the batches wait in memory and the spool
                pass
            except Exception:
                log.exception("could not write usage; will retry")

    async def flush(self) -> None:
        """Write every unwritten batch, oldest first (the counts added so far become one more batch)."""
        async with self._lock:
            self._seal()
            while self._unwritten:
                batch = self._unwritten[0]
                try:
                    await _in_daemon_thread(self.tenancy.record_usage_batch, batch)
                except InvalidArgumentError as err:  # a row the ledger refuses will never be written: drop it
                    log.error("usage batch %s refused and dropped: %s (%s)", batch.id, err, batch.to_json())
                except Exception:
                    self._spool_unwritten()
                    raise
                self._unwritten.pop(0)
                self._spooled.discard(batch.id)
            if self._spool is not None and not self._spooled:
                self._spool.clear()  # every batch it held is confirmed

    def _seal(self) -> None:
        if self._pending:
            self._unwritten.append(UsageBatch.new(
                UsageCount(tenant, model, hour, *counts) for (tenant, model, hour), counts in self._pending.items()))
            self._pending = {}

    def _spool_unwritten(self) -> None:
        fresh = [batch for batch in self._unwritten if batch.id not in self._spooled]
        if self._spool is None or not fresh:
            return
        try:
            self._spool.append(fresh)
        except OSError as err:
            log.error("cannot write the usage spool %s (%s); usage not yet in the database: %s", self._spool.path,
                      err.strerror, "; ".join(batch.to_json() for batch in fresh))
            return
        self._spooled.update(batch.id for batch in fresh)

    async def stop(self, timeout_s: float = SHUTDOWN_FLUSH_S) -> None:
        """A last flush, for at most `timeout_s`; what the database has not confirmed by then goes to the spool."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        try:
            await asyncio.wait_for(self.flush(), timeout_s)
        except (Exception, asyncio.TimeoutError) as err:
            log.warning("usage not written at shutdown (%s); kept in the spool for the next start",
                        str(err) or type(err).__name__)
        self._seal()
        self._spool_unwritten()


def _in_daemon_thread(fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
    """`fn(*args)` on a daemon thread: a write still blocked (a locked database) when the process exits is
    abandoned, not waited for; it either committed or did not, and its batch is in the spool either way."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def settle(error: BaseException | None, result: Any) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def run() -> None:
        try:
            result, error = fn(*args), None
        except BaseException as err:  # handed to the awaiting coroutine
            result, error = None, err
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits any more
            loop.call_soon_threadsafe(settle, error, result)

    threading.Thread(target=run, name="usage-write", daemon=True).start()
    return future
