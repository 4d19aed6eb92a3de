"""The usage ledger loses and doubles nothing: each flush is one idempotent batch; what the database does not
take (locked, down) is kept in a spool file and written once at the next start."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import stat
import threading
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest

from conftest import postgres_schema_url
from garrison.gateway.hot_path import UsageBuffer
from garrison.tenancy import SYSTEM, TenancyService, database_url
from garrison.tenancy.errors import StoreUnavailableError
from garrison.tenancy.ledger import SPOOL_FILE, Spool, UsageBatch, UsageCount

HOUR = datetime(2025, 3, 1, 12, tzinfo=timezone.utc)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield database_url(tmp_path / "data")
        return
    with postgres_schema_url() as url:
        if url is None:
            pytest.skip("set GARRISON_TEST_POSTGRES_URL=postgresql+psycopg://... to test PostgreSQL")
        yield url


def totals(service: TenancyService) -> dict[tuple[str, str], tuple[int, int, int, int]]:
    return {(r.tenant, r.model): (r.requests, r.prompt_tokens, r.output_tokens, r.rejected_requests)
            for r in service.usage(SYSTEM)}


def test_a_batch_is_counted_once_however_often_and_concurrently_it_is_written(url: str) -> None:
    batch = UsageBatch.new([UsageCount("acme", "m", HOUR, 1, 10, 20, 0), UsageCount("beta", "m", HOUR, 2, 3, 4, 1)])
    with TenancyService.open(url) as service:
        results: list[bool] = []
        threads = [threading.Thread(target=lambda: results.append(service.record_usage_batch(batch))) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not service.record_usage_batch(batch)  # a replay
        assert sorted(results) == [False, False, False, True]
        assert totals(service) == {("acme", "m"): (1, 10, 20, 0), ("beta", "m"): (2, 3, 4, 1)}


@pytest.fixture
def locked(tmp_path: Path) -> Iterator[tuple[TenancyService, sqlite3.Connection, Path]]:
    """A SQLite tenancy store with a short busy timeout, another connection that can hold its write lock, and
    where the usage spool goes."""
    url = database_url(tmp_path / "data")
    service = TenancyService.open(url, sqlite_busy_timeout_s=0.2)
    holder = sqlite3.connect(tmp_path / "data" / "garrison.db", isolation_level=None)
    yield service, holder, tmp_path / "data" / SPOOL_FILE
    holder.close()
    service.close()


def lock(holder: sqlite3.Connection) -> None:
    holder.execute("BEGIN IMMEDIATE")  # the write lock, as another writer mid-transaction holds it


def test_a_flush_the_database_refuses_is_spooled_then_written_once(locked) -> None:
    service, holder, spool = locked

    async def scenario() -> None:
        buffer = UsageBuffer(service, spool)
        buffer.add("acme", "m", requests=1, prompt_tokens=5, output_tokens=7)
        lock(holder)
        with pytest.raises(StoreUnavailableError) as info:
            await buffer.flush()
        assert info.value.retry_after_s > 0
        assert stat.S_IMODE(spool.stat().st_mode) == 0o600 and len(Spool(spool).read()) == 1
        buffer.add("acme", "m", requests=1, prompt_tokens=1, output_tokens=2)
        with pytest.raises(StoreUnavailableError):
            await buffer.flush()
        assert len(Spool(spool).read()) == 2  # the first batch is not spooled twice
        holder.execute("ROLLBACK")
        await buffer.flush()
        assert not spool.exists()  # every batch in it is confirmed

    asyncio.run(scenario())
    assert totals(service) == {("acme", "m"): (2, 6, 9, 0)}


def test_a_stop_with_the_database_locked_spools_and_the_next_start_writes_it_once(locked, tmp_path: Path) -> None:
    service, holder, spool = locked

    async def stop_while_locked() -> float:
        buffer = UsageBuffer(service, spool)
        buffer.add("acme", "m", requests=3, prompt_tokens=30, output_tokens=60)
        buffer.add("beta", "m", requests=1, rejected_requests=1)
        lock(holder)
        started = asyncio.get_running_loop().time()
        await buffer.stop(timeout_s=0.5)
        return asyncio.get_running_loop().time() - started

    assert asyncio.run(stop_while_locked()) < 3
    holder.execute("ROLLBACK")
    shutil.copy(spool, tmp_path / "copy")

    async def next_start() -> None:
        buffer = UsageBuffer(service, spool)
        assert buffer.replay_spool() == 1
        await buffer.flush()

    asyncio.run(next_start())
    assert not spool.exists()
    shutil.copy(tmp_path / "copy", spool)  # as if the last start died after writing, before clearing the spool
    asyncio.run(next_start())
    assert totals(service) == {("acme", "m"): (3, 30, 60, 0), ("beta", "m"): (1, 0, 0, 1)}


def test_a_torn_spool_line_is_skipped_and_the_rest_replayed(tmp_path: Path) -> None:
    spool = Spool(tmp_path / SPOOL_FILE)
    first = UsageBatch.new([UsageCount("acme", "m", HOUR, 1, 2, 3, 0)])
    spool.append([first])
    with spool.path.open("a") as file:
        file.write('{"id": "x", "rows": [["acme", "m"')  # the process died mid-append
    assert spool.read() == [first]
