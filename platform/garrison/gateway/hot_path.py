"""What keeps the database off each request's path: every key and tenant mirrored in memory, and a usage buffer
written once a second.

Measured (ops/bench/gateway.py): three queries to authorize plus one ledger write cost ~2.7 ms of gateway CPU per
request. `AuthMirror` holds an `AuthSnapshot` (garrison.tenancy.auth) of every key and live tenant, and polls the
tenancy version (one indexed query) every `AUTH_POLL_S`: a change made through any gateway (several share one
PostgreSQL) takes effect on every gateway within that interval plus one reload, well under a second, and one made
through this gateway at once. A request, and an unknown or malformed key above all, costs no database round trip:
a flood of bad keys is refused from memory. While the database is unreachable a gateway keeps deciding from its
last snapshot (a change made meanwhile reaches it when the database is back). Usage is flushed every
`FLUSH_INTERVAL_S`, before any usage read, and at shutdown.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Collection
from datetime import datetime, timezone

from garrison.tenancy.auth import AuthSnapshot
from garrison.tenancy.records import Authorization, Principal, Tenant
from garrison.tenancy.service import TenancyService

log = logging.getLogger(__name__)

AUTH_POLL_S = 0.25
FLUSH_INTERVAL_S = 1.0
_COUNTS = ("requests", "prompt_tokens", "output_tokens", "rejected_requests")


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
    def __init__(self, tenancy: TenancyService) -> None:
        self.tenancy = tenancy
        self._pending: defaultdict[tuple[str, str, datetime], list[int]] = defaultdict(lambda: [0] * len(_COUNTS))
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    def add(self, tenant: str, model: str, **counts: int) -> None:
        hour = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)
        row = self._pending[(tenant, model, hour)]
        for index, name in enumerate(_COUNTS):
            row[index] += counts.get(name, 0)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._flush_forever())

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            try:
                await self.flush()
            except Exception:  # the database is down: keep the counts and retry next time
                log.exception("could not write usage; will retry")

    async def flush(self) -> None:
        async with self._lock:
            pending, self._pending = self._pending, defaultdict(lambda: [0] * len(_COUNTS))
            try:
                await asyncio.to_thread(self._write, pending)
            except BaseException:
                for key, counts in pending.items():  # put back what was not written
                    row = self._pending[key]
                    for index, value in enumerate(counts):
                        row[index] += value
                raise

    def _write(self, pending: dict[tuple[str, str, datetime], list[int]]) -> None:
        while pending:
            (tenant, model, hour), counts = next(iter(pending.items()))
            self.tenancy.record_usage(tenant, model, at=hour, **dict(zip(_COUNTS, counts)))
            del pending[(tenant, model, hour)]  # written: never written twice if a later row fails

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        await self.flush()
