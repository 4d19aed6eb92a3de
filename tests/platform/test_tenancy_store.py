"""The tenancy store on real databases: SQLite files in tmp_path, and PostgreSQL when
GARRISON_TEST_POSTGRES_URL names one (each test then works in a schema of its own, dropped after)."""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import threading
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import grpc
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Column, Integer, MetaData, Table, create_engine, text

from garrison.errors import GRPC_STATUS, grpc_status_for
from garrison.tenancy import (SYSTEM, AlreadyExistsError, InvalidArgumentError, NotFoundError, PermissionDeniedError,
                              Principal, QuotaExceededError, QuotaUpdate, RequestTooLargeError, TenancyService,
                              UnauthenticatedError, database_url, make_engine, migrate)
from garrison.tenancy import keys
from garrison.tenancy.schema import Base
from garrison.tenancy.store import alembic_config
from garrison_workers.errors import GarrisonError

POSTGRES_URL = os.environ.get("GARRISON_TEST_POSTGRES_URL")
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)


class Clock:
    """A wall clock the test moves by hand."""

    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


class Store:
    """How to open the database under test again and again (a restart is close + open)."""

    def __init__(self, url: str, **engine_kwargs) -> None:
        self.url = url
        self.engine_kwargs = engine_kwargs

    def open(self, clock=None) -> TenancyService:
        return TenancyService.open(self.url, **({"clock": clock} if clock else {}), **self.engine_kwargs)


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path: Path):
    if request.param == "sqlite":
        yield Store(database_url(tmp_path / "data"))
        return
    if not POSTGRES_URL:
        pytest.skip("set GARRISON_TEST_POSTGRES_URL=postgresql+psycopg://... to test PostgreSQL")
    schema = f"garrison_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    try:
        yield Store(POSTGRES_URL, connect_args={"options": f"-csearch_path={schema}"})
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def service(store: Store, clock: Clock):
    with store.open(clock) as service:
        yield service


@pytest.fixture
def admin(service: TenancyService) -> Principal:
    return service.authenticate(service.ensure_bootstrap_admin_key().secret)


def test_migrations_from_empty_match_the_orm(store: Store) -> None:
    engine = make_engine(store.url, **store.engine_kwargs)
    migrate(engine)
    migrate(engine)  # a second start migrates nothing and fails nothing
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
        assert context.get_current_revision() == ScriptDirectory.from_config(alembic_config()).get_current_head()
        # The comparison does see differences: a table the database lacks is reported.
        extra = MetaData()
        for table in Base.metadata.tables.values():
            table.to_metadata(extra)
        Table("not_migrated", extra, Column("id", Integer, primary_key=True))
        assert [diff[0] for diff in compare_metadata(context, extra)] == ["add_table"]
    engine.dispose()


def test_restart_keeps_tenants_keys_quotas_usage_and_audit(store: Store, clock: Clock) -> None:
    with store.open(clock) as first:
        admin = first.authenticate(first.ensure_bootstrap_admin_key().secret)
        first.create_tenant(admin, "acme", ["smollm2"], QuotaUpdate(max_concurrent_requests=3, priority_weight=2.5))
        key = first.create_key(admin, tenant="acme", description="ci")
        first.record_usage("acme", "smollm2", requests=1, prompt_tokens=10, output_tokens=20)
        before = (first.list_tenants(admin), first.list_keys(admin), first.usage(admin), first.audit_events(admin))
    with store.open(clock) as second:
        assert second.ensure_bootstrap_admin_key() is None  # the first admin key is still there
        assert second.authorize(key.secret, "smollm2").quota.max_concurrent_requests == 3
        after = (second.list_tenants(admin), second.list_keys(admin), second.usage(admin), second.audit_events(admin))
    assert after == before
    assert after[0][0].quota.priority_weight == 2.5 and after[0][0].created_at == T0


def test_secret_is_shown_once_and_stored_only_as_a_hash(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with TenancyService.open(database_url(data)) as service:
        created = service.ensure_bootstrap_admin_key()
        admin = service.authenticate(created.secret)
        service.create_tenant(admin, "acme")
        tenant_key = service.create_key(admin, tenant="acme")
        assert tenant_key.secret.startswith(tenant_key.key.id + "_") and len(tenant_key.secret) == 55
        assert "secret" not in repr(tenant_key) and tenant_key.secret not in repr(service.list_keys(admin))
        assert all(created.secret not in event.detail for event in service.audit_events(admin))
    stored = b"".join(path.read_bytes() for path in data.iterdir())
    for secret in (created.secret, tenant_key.secret):
        assert secret.encode() not in stored and secret[12:].encode() not in stored
        assert hashlib.sha256(secret.encode()).digest() in stored  # we did read the database


def test_wrong_unknown_and_revoked_keys_are_unauthenticated(service: TenancyService, admin: Principal) -> None:
    service.create_tenant(admin, "acme", ["m"])
    key = service.create_key(admin, tenant="acme")
    forged = key.secret[:-4] + ("AAAA" if not key.secret.endswith("AAAA") else "BBBB")
    for secret in ("", "Bearer x", "gk_12345678_short", forged, "gk_00000000_" + "A" * 43):
        with pytest.raises(UnauthenticatedError) as err:
            service.authenticate(secret)
        assert grpc_status_for(err.value) == grpc.StatusCode.UNAUTHENTICATED
        assert key.secret not in str(err.value)
    assert service.revoke_key(admin, key.key.id).revoked_at is not None
    with pytest.raises(UnauthenticatedError, match="revoked"):
        service.authorize(key.secret, "m")
    assert service.revoke_key(admin, key.key.id) == service.list_keys(admin, "acme")[0]  # a second revoke is a no-op
    with pytest.raises(NotFoundError):
        service.revoke_key(admin, "gk_00000000")


def test_deleting_a_tenant_revokes_its_keys_and_keeps_its_usage(service: TenancyService, admin: Principal,
                                                                 clock: Clock) -> None:
    service.create_tenant(admin, "acme", ["m"])
    keys = [service.create_key(admin, tenant="acme") for _ in range(2)]
    service.record_usage("acme", "m", requests=2, prompt_tokens=7, output_tokens=9)
    clock.advance(minutes=5)
    service.delete_tenant(admin, "acme")
    for key in keys:
        with pytest.raises(UnauthenticatedError, match="revoked"):
            service.authenticate(key.secret)
    assert all(key.revoked_at == clock.now for key in service.list_keys(admin, "acme"))
    assert service.list_tenants(admin) == []
    assert [(row.tenant, row.requests) for row in service.usage(admin, tenant="acme")] == [("acme", 2)]
    for act in (lambda: service.create_key(admin, tenant="acme"), lambda: service.set_quota(
            admin, "acme", QuotaUpdate(max_new_tokens=1)), lambda: service.grant_model(admin, "acme", "m"),
            lambda: service.delete_tenant(admin, "acme")):
        with pytest.raises(NotFoundError, match="deleted"):
            act()
    with pytest.raises(AlreadyExistsError, match="not reused"):
        service.create_tenant(admin, "acme")
    event = service.audit_events(admin)[-1]
    assert (event.action, event.target) == ("tenants.delete", "acme") and keys[0].key.id in event.detail


def test_tenant_keys_are_confined_to_their_tenant(service: TenancyService, admin: Principal) -> None:
    for name in ("a", "b"):
        service.create_tenant(admin, name, ["m"])
        service.record_usage(name, "m", requests=1)
    a = service.authenticate(service.create_key(admin, tenant="a").secret)
    assert a == Principal(a.key_id, "a", False)
    for act in (lambda: service.create_tenant(a, "c"), lambda: service.list_tenants(a),
                lambda: service.create_key(a, tenant="a"), lambda: service.set_quota(a, "a", QuotaUpdate()),
                lambda: service.audit_events(a), lambda: service.usage(a, tenant="b"),
                lambda: service.get_quota(a, "b"), lambda: service.delete_tenant(a, "b")):
        with pytest.raises(PermissionDeniedError) as err:
            act()
        assert grpc_status_for(err.value) == grpc.StatusCode.PERMISSION_DENIED
    assert [row.tenant for row in service.usage(a)] == ["a"]
    assert service.get_quota(a, "a").tenant == "a"
    assert sorted(row.tenant for row in service.usage(admin)) == ["a", "b"]


def test_authorize_checks_model_grants_and_refuses_admin_keys(service: TenancyService, admin: Principal) -> None:
    created = service.ensure_bootstrap_admin_key()
    assert created is None
    service.create_tenant(admin, "acme", ["scout"])
    key = service.create_key(admin, tenant="acme")
    assert service.authorize(key.secret, "scout").principal.tenant == "acme"
    with pytest.raises(PermissionDeniedError, match="maverick"):
        service.authorize(key.secret, "maverick")
    assert service.grant_model(admin, "acme", "maverick").models == ("maverick", "scout")
    assert service.grant_model(admin, "acme", "maverick").models == ("maverick", "scout")  # idempotent
    assert service.authorize(key.secret, "maverick").model == "maverick"
    assert service.revoke_model(admin, "acme", "scout").models == ("maverick",)
    with pytest.raises(PermissionDeniedError):
        service.authorize(key.secret, "scout")
    with pytest.raises(NotFoundError):
        service.revoke_model(admin, "acme", "scout")
    admin_key = service.create_key(admin, admin=True, description="second admin")
    with pytest.raises(PermissionDeniedError, match="admin key"):
        service.authorize(admin_key.secret, "scout")
    grants = [event for event in service.audit_events(admin) if event.action.startswith("models.")]
    assert [event.action for event in grants] == ["models.grant", "models.revoke"]


def test_quota_is_set_partially_and_validated(service: TenancyService, admin: Principal) -> None:
    service.create_tenant(admin, "acme", quota=QuotaUpdate(tokens_per_minute=1000))
    quota = service.set_quota(admin, "acme", QuotaUpdate(max_new_tokens=256, priority_weight=0.5))
    assert (quota.tokens_per_minute, quota.max_new_tokens, quota.priority_weight, quota.max_concurrent_requests) == (
        1000, 256, 0.5, 0)
    assert service.get_quota(admin, "acme") == quota
    for bad in (dict(max_concurrent_requests=-1), dict(max_prompt_tokens=2**31), dict(priority_weight=0.0),
                dict(priority_weight=math.nan), dict(priority_weight=math.inf), dict(tokens_per_minute=1.5),
                dict(max_new_tokens=True)):
        with pytest.raises(InvalidArgumentError) as err:
            QuotaUpdate(**bad)
        assert grpc_status_for(err.value) == grpc.StatusCode.INVALID_ARGUMENT
    for name in ("", "Acme", "a" * 64, "a_b", "é", "a b"):
        with pytest.raises(InvalidArgumentError):
            service.create_tenant(admin, name)
    with pytest.raises(InvalidArgumentError):
        service.create_key(admin, tenant="acme", admin=True)
    with pytest.raises(InvalidArgumentError):
        service.create_key(admin)
    with pytest.raises(NotFoundError):
        service.get_quota(admin, "nobody")
    assert service.create_tenant(admin, "a-1" * 21).name == "a-1" * 21


def test_usage_upserts_by_increment_and_filters_half_open_hours(service: TenancyService, admin: Principal) -> None:
    for hours, tenant, model in ((0, "a", "m1"), (0, "a", "m1"), (0, "a", "m2"), (1, "a", "m1"), (2, "b", "m1")):
        service.record_usage(tenant, model, requests=1, prompt_tokens=3, output_tokens=5, rejected_requests=hours,
                             at=T0 + timedelta(hours=hours, minutes=59))
    rows = service.usage(admin)
    assert [(r.tenant, r.model, r.hour, r.requests, r.prompt_tokens) for r in rows] == [
        ("a", "m1", T0, 2, 6), ("a", "m2", T0, 1, 3), ("a", "m1", T0 + timedelta(hours=1), 1, 3),
        ("b", "m1", T0 + timedelta(hours=2), 1, 3)]
    assert len(service.usage(admin, tenant="a")) == 3 and len(service.usage(admin, model="m1")) == 3
    window = service.usage(admin, since=T0 + timedelta(minutes=30), until=T0 + timedelta(hours=2))
    assert [(r.hour, r.rejected_requests) for r in window] == [(T0 + timedelta(hours=1), 1)]
    with pytest.raises(InvalidArgumentError):
        service.usage(admin, since=datetime(2025, 1, 1))
    with pytest.raises(InvalidArgumentError):
        service.record_usage("a", "m1", requests=-1)


def test_every_mutation_is_audited_in_its_own_transaction(service: TenancyService, admin: Principal,
                                                          clock: Clock) -> None:
    service.create_tenant(admin, "acme", ["m"])
    key = service.create_key(admin, tenant="acme", description="ci")
    clock.advance(hours=1)
    service.set_quota(admin, "acme", QuotaUpdate(tokens_per_minute=10))
    service.revoke_key(admin, key.key.id)
    failed = len(service.audit_events(admin))
    with pytest.raises(AlreadyExistsError):
        service.create_tenant(admin, "acme")  # refused: no event
    events = service.audit_events(admin)
    assert len(events) == failed
    assert [e.action for e in events] == ["keys.create", "tenants.create", "keys.create", "quota.set", "keys.revoke"]
    assert events[0].actor == SYSTEM.key_id and all(e.actor == admin.key_id for e in events[1:])
    assert events[2].target == key.key.id and '"description": "ci"' in events[2].detail
    assert [e.action for e in service.audit_events(admin, since=clock.now)] == ["quota.set", "keys.revoke"]
    assert [e.action for e in service.audit_events(admin, limit=2)] == ["quota.set", "keys.revoke"]
    assert [e.action for e in service.audit_events(admin, since=T0, limit=1)] == ["keys.create"]


def test_the_database_refuses_to_change_the_audit_log(service: TenancyService, admin: Principal) -> None:
    for statement in ("UPDATE audit_events SET action = 'x'", "DELETE FROM audit_events"):
        with pytest.raises(Exception, match="append-only"):
            with service.engine.begin() as conn:
                conn.execute(text(statement))
    assert len(service.audit_events(admin)) == 1


def test_concurrent_writers_neither_fail_nor_lose_updates(service: TenancyService, admin: Principal) -> None:
    service.create_tenant(admin, "acme", ["m"])
    errors: list[BaseException] = []
    threads_n, rounds = 8, 15

    def work() -> None:
        try:
            for _ in range(rounds):
                service.record_usage("acme", "m", requests=1, output_tokens=2, at=T0)
                service.authenticate(service.create_key(admin, tenant="acme").secret)
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=work) for _ in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    [row] = service.usage(admin)
    assert (row.requests, row.output_tokens) == (threads_n * rounds, 2 * threads_n * rounds)
    assert len(service.list_keys(admin, "acme")) == threads_n * rounds


def test_bootstrap_admin_key_is_minted_only_when_no_admin_key_is_active(service: TenancyService) -> None:
    first = service.ensure_bootstrap_admin_key()
    assert first is not None and first.key.admin and first.key.tenant is None
    assert service.ensure_bootstrap_admin_key() is None
    service.revoke_key(service.authenticate(first.secret), first.key.id)
    assert service.ensure_bootstrap_admin_key().key.id != first.key.id


def test_database_urls_are_checked(tmp_path: Path) -> None:
    for url in ("mysql://localhost/db", "not a url", "sqlite://", "sqlite:///:memory:"):
        with pytest.raises(InvalidArgumentError):
            make_engine(url)
    assert database_url(tmp_path) == f"sqlite:///{tmp_path.resolve()}/garrison.db"


def test_postgresql_without_its_driver_says_what_to_install() -> None:
    if importlib.util.find_spec("psycopg") is not None:
        pytest.skip("psycopg is installed")
    with pytest.raises(InvalidArgumentError, match=r"garrison\[postgres\]"):
        make_engine("postgresql+psycopg://localhost/garrison")


def test_each_error_maps_to_one_grpc_status() -> None:
    quota = QuotaExceededError("busy", limit="tokens_per_minute", retry_after_s=2.0)
    assert quota.resets_at is not None and grpc_status_for(quota) == grpc.StatusCode.RESOURCE_EXHAUSTED
    too_large = RequestTooLargeError("long", limit="max_prompt_tokens", maximum=8)
    assert grpc_status_for(too_large) == grpc.StatusCode.INVALID_ARGUMENT
    assert grpc_status_for(NotFoundError("x")) == grpc.StatusCode.NOT_FOUND
    assert grpc_status_for(GarrisonError("x")) == grpc.StatusCode.FAILED_PRECONDITION
    assert grpc_status_for(RuntimeError("bug")) == grpc.StatusCode.INTERNAL
    classes = [cls for cls, _ in GRPC_STATUS]
    assert len(classes) == len(set(classes))
    # Most specific first: no class is shadowed by a base class listed before it.
    for i, cls in enumerate(classes):
        assert not any(issubclass(cls, earlier) for earlier in classes[:i]), cls


def test_gateways_starting_together_provision_one_admin_key_from_its_file(store: Store, clock: Clock) -> None:
    """Every gateway of a cluster provisions `admin_key_file` at start: eight at once, each its own service (its
    own connections, as separate processes have), all get the one key and none fails."""
    secret = keys.new_secret(keys.new_key_id())
    services = [store.open(clock) for _ in range(8)]
    barrier = threading.Barrier(len(services))
    outcomes: list[object] = []

    def start(service: TenancyService) -> None:
        barrier.wait()
        try:
            outcomes.append(service.ensure_admin_key(secret, "from admin_key_file").id)
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            outcomes.append(err)

    threads = [threading.Thread(target=start, args=(service,)) for service in services]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for service in services:
        service.close()
    assert outcomes == [keys.key_id_of(secret)] * len(services)
