"""The tenancy service: admin operations, authentication and the usage ledger over one database.

Methods are synchronous, short (one transaction each) and thread-safe: every call opens its own
session from a shared engine, and returns plain records (garrison.tenancy.records), never ORM rows.
An asyncio gateway may call them directly or through asyncio.to_thread.

Every admin method takes the calling `Principal` first and refuses non-admins itself, so the
gateway cannot forget to; every admin mutation writes its audit event in the same transaction, so
an action is never recorded without happening or done without being recorded.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import fields
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import Engine, delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from garrison.tenancy import auth, keys
from garrison.tenancy.auth import AuthSnapshot, KeyRecord
from garrison.tenancy.errors import (AlreadyExistsError, InvalidArgumentError, NotFoundError,
                                     PermissionDeniedError, StoreUnavailableError)
from garrison.tenancy.records import (SYSTEM, ApiKey, AuditEvent, Authorization, CreatedKey, Principal, Quota,
                                      QuotaUpdate, Tenant, UsageRow, check_model_name, check_tenant_name)
from garrison.tenancy.ledger import BATCH_RETENTION_DAYS, UsageBatch, UsageCount
from garrison.tenancy.schema import (USAGE_COUNTERS, ApiKeyRow, AuditEventRow, ModelGrantRow, QuotaRow, TenantRow,
                                     UsageBatchRow, UsageLedgerRow)
from garrison.tenancy.store import make_engine, migrate, redact_url, unavailable_as_error, writer

QUOTA_FIELDS = tuple(f.name for f in fields(QuotaUpdate))
DEFAULT_AUDIT_LIMIT = 100
MAX_AUDIT_LIMIT = 10_000
MAX_DESCRIPTION = 1024
MAX_GRANTS = 1024


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def require_admin(actor: Principal) -> None:
    if not actor.admin:
        raise PermissionDeniedError(f"key {actor.key_id} is a tenant key; garrison.v1.Admin needs an admin key")


class TenancyService:
    def __init__(self, engine: Engine, *, clock: Callable[[], datetime] = utc_now) -> None:
        self.engine = engine
        self._clock = clock
        self._url = engine.url.render_as_string(hide_password=False)  # only to scrub the password from messages
        self._reads = sessionmaker(engine, expire_on_commit=False)
        self._writes = sessionmaker(writer(engine), expire_on_commit=False)

    @classmethod
    def open(cls, url: str, *, clock: Callable[[], datetime] = utc_now, **engine_kwargs: Any) -> TenancyService:
        """Connect to `url` and migrate its schema to the newest revision (run once at startup)."""
        engine = make_engine(url, **engine_kwargs)
        try:
            with unavailable_as_error(url):
                migrate(engine)
        except StoreUnavailableError as err:
            engine.dispose()
            raise StoreUnavailableError(f"cannot open the tenant database {redact_url(url)}: {err}",
                                        retry_after_s=err.retry_after_s) from None
        return cls(engine, clock=clock)

    @contextlib.contextmanager
    def _read(self) -> Iterator[Session]:
        with unavailable_as_error(self._url), self._reads() as session:
            yield session

    @contextlib.contextmanager
    def _write(self) -> Iterator[Session]:
        """One write transaction (BEGIN IMMEDIATE on SQLite), committed when the block ends without an error."""
        with unavailable_as_error(self._url), self._writes.begin() as session:
            yield session

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> TenancyService:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- authentication (every request) --------------------------------------------------------

    def authenticate(self, secret: str) -> Principal:
        """Who holds this bearer token; UnauthenticatedError for a malformed, unknown or revoked key."""
        with self._read() as session:
            return auth.authenticate(secret, lambda key_id: _key_record(session.get(ApiKeyRow, key_id)))

    def authorize(self, secret: str, model: str) -> Authorization:
        """Authenticate a tenant key for an inference request on `model` and load its limits, in one read."""
        with self._read() as session:
            principal = auth.authenticate(secret, lambda key_id: _key_record(session.get(ApiKeyRow, key_id)))
            row = session.scalar(select(TenantRow).where(TenantRow.name == principal.tenant,
                                                         TenantRow.deleted_at.is_(None))) if principal.tenant else None
            return auth.authorize(principal, _tenant(row) if row is not None else None, model)

    def auth_version(self) -> int:
        """The newest audit event's id: it changes whenever a key, tenant, grant or quota does (AuthSnapshot)."""
        with self._read() as session:
            return session.scalar(select(func.max(AuditEventRow.id))) or 0

    def auth_snapshot(self) -> AuthSnapshot:
        """Every key and live tenant, read in one transaction, for a gateway to authenticate in memory."""
        with self._read() as session:
            version = session.scalar(select(func.max(AuditEventRow.id))) or 0
            records = {row.id: _key_record(row) for row in session.scalars(select(ApiKeyRow))}
            tenants = {row.name: _tenant(row) for row in session.scalars(
                select(TenantRow).where(TenantRow.deleted_at.is_(None)))}
            return AuthSnapshot(version, records, tenants)

    def ensure_bootstrap_admin_key(self, description: str = "bootstrap admin key") -> CreatedKey | None:
        """Mint an admin key when no unrevoked one exists (first start, or after revoking the last)."""
        with self._write() as session:
            active = session.scalar(select(ApiKeyRow.id).where(ApiKeyRow.admin, ApiKeyRow.revoked_at.is_(None)))
            return None if active else self._create_key(session, SYSTEM, None, description)

    def ensure_admin_key(self, secret: str, description: str) -> ApiKey:
        """The admin key whose secret this is, created (hash stored, audited) when no key has its id.

        A key revoked since stays revoked (the answer says so); an id held by a tenant key or by another
        secret is refused, since the secret would not open it."""
        key_id = keys.key_id_of(secret)
        if key_id is None:
            raise InvalidArgumentError("not an API key secret: make one with `garrison keys new-secret`")
        try:
            return self._admin_key_from(key_id, secret, description)
        except IntegrityError:  # gateways starting together: another created it between our check and our commit
            return self._admin_key_from(key_id, secret, description)

    def _admin_key_from(self, key_id: str, secret: str, description: str) -> ApiKey:
        with self._write() as session:
            row = session.get(ApiKeyRow, key_id)
            if row is None:
                return self._add_key(session, SYSTEM, key_id, secret, None, description).key
            if not row.admin or not keys.secret_matches(secret, row.secret_hash):
                raise AlreadyExistsError(f"API key {key_id} exists with another secret or as a tenant key: make a "
                                         f"new secret with `garrison keys new-secret`")
            return _api_key(row)

    # -- tenants ----------------------------------------------------------------------------------

    def create_tenant(self, actor: Principal, name: str, models: Iterable[str] = (),
                      quota: QuotaUpdate | None = None) -> Tenant:
        require_admin(actor)
        check_tenant_name(name)
        models = list(models)
        if len(models) > MAX_GRANTS:
            raise InvalidArgumentError(f"a tenant may be granted at most {MAX_GRANTS} models, got {len(models)}")
        models = sorted({check_model_name(model) for model in models})
        limits = {field: getattr(Quota(name), field) for field in QUOTA_FIELDS} | (quota or QuotaUpdate()).present()
        try:
            with self._write() as session:
                if session.scalar(select(TenantRow).where(TenantRow.name == name)) is not None:
                    raise _name_taken(name)
                row = TenantRow(name=name, created_at=self._clock(), quota=QuotaRow(**limits),
                                grants=[ModelGrantRow(model=model) for model in models])
                session.add(row)
                self._audit(session, actor, "tenants.create", name, models=models, quota=limits)
                session.flush()
                return _tenant(row)
        except IntegrityError:  # another gateway created it between our check and our commit
            raise _name_taken(name) from None

    def list_tenants(self, actor: Principal) -> list[Tenant]:
        require_admin(actor)
        with self._read() as session:
            rows = session.scalars(select(TenantRow).where(TenantRow.deleted_at.is_(None)).order_by(TenantRow.name))
            return [_tenant(row) for row in rows]

    def get_tenant(self, actor: Principal, name: str) -> Tenant:
        _require_admin_or_member(actor, name)
        with self._read() as session:
            return _tenant(_live_tenant(session, name))

    def delete_tenant(self, actor: Principal, name: str) -> None:
        """Mark the tenant deleted and revoke its keys; its usage stays in the ledger, its name stays taken."""
        require_admin(actor)
        with self._write() as session:
            row = _live_tenant(session, name)
            now = self._clock()
            row.deleted_at = now
            revoked = list(session.scalars(select(ApiKeyRow.id).where(
                ApiKeyRow.tenant_id == row.id, ApiKeyRow.revoked_at.is_(None)).order_by(ApiKeyRow.id)))
            session.execute(update(ApiKeyRow).where(ApiKeyRow.id.in_(revoked)).values(revoked_at=now))
            self._audit(session, actor, "tenants.delete", name, revoked_keys=revoked)

    # -- API keys ---------------------------------------------------------------------------------

    def create_key(self, actor: Principal, *, tenant: str | None = None, admin: bool = False,
                   description: str = "") -> CreatedKey:
        """A new key; the secret is in the answer only. Pass `tenant` for a tenant key, or `admin=True`."""
        require_admin(actor)
        if admin and tenant:
            raise InvalidArgumentError("an admin key belongs to no tenant: leave tenant empty or unset admin")
        if not admin and not tenant:
            raise InvalidArgumentError("set tenant for a tenant key, or admin for an admin key")
        if not isinstance(description, str) or len(description) > MAX_DESCRIPTION:
            raise InvalidArgumentError(f"description must be text of at most {MAX_DESCRIPTION} characters")
        with self._write() as session:
            owner = _live_tenant(session, tenant) if tenant else None
            return self._create_key(session, actor, owner, description)

    def list_keys(self, actor: Principal, tenant: str | None = None) -> list[ApiKey]:
        """All keys, or one tenant's (deleted tenants included), revoked ones too, oldest first."""
        require_admin(actor)
        with self._read() as session:
            query = select(ApiKeyRow).order_by(ApiKeyRow.created_at, ApiKeyRow.id)
            if tenant:
                query = query.where(ApiKeyRow.tenant_id == _any_tenant(session, tenant).id)
            return [_api_key(row) for row in session.scalars(query)]

    def revoke_key(self, actor: Principal, key_id: str) -> ApiKey:
        """Revoke at once; revoking a revoked key changes nothing. If the last admin key goes, the
        next server start mints a new bootstrap key (ensure_bootstrap_admin_key)."""
        require_admin(actor)
        with self._write() as session:
            row = session.get(ApiKeyRow, key_id) if keys.is_key_id(key_id) else None
            if row is None:
                raise NotFoundError(f"no API key {key_id!r}: list keys with `garrison keys list`")
            if row.revoked_at is None:
                row.revoked_at = self._clock()
                self._audit(session, actor, "keys.revoke", row.id, tenant=_tenant_name(row))
            return _api_key(row)

    # -- model grants and quotas -----------------------------------------------------------------

    def grant_model(self, actor: Principal, tenant: str, model: str) -> Tenant:
        """Allow the tenant to use `model` (granting twice changes nothing)."""
        require_admin(actor)
        check_model_name(model)
        with self._write() as session:
            row = _live_tenant(session, tenant)
            if model not in {grant.model for grant in row.grants}:
                row.grants.append(ModelGrantRow(model=model))
                self._audit(session, actor, "models.grant", tenant, model=model)
                session.flush()
            return _tenant(row)

    def revoke_model(self, actor: Principal, tenant: str, model: str) -> Tenant:
        require_admin(actor)
        with self._write() as session:
            row = _live_tenant(session, tenant)
            grant = next((grant for grant in row.grants if grant.model == model), None)
            if grant is None:
                raise NotFoundError(f"tenant {tenant!r} has no grant for model {model!r}")
            row.grants.remove(grant)
            self._audit(session, actor, "models.revoke", tenant, model=model)
            session.flush()
            return _tenant(row)

    def set_quota(self, actor: Principal, tenant: str, quota: QuotaUpdate) -> Quota:
        """Change the limits present in `quota`, keep the others; the gateway applies them to the next request."""
        require_admin(actor)
        changes = quota.present()
        with self._write() as session:
            row = _live_tenant(session, tenant)
            if changes:
                for field, value in changes.items():
                    setattr(row.quota, field, value)
                self._audit(session, actor, "quota.set", tenant, **changes)
            return _quota(row)

    def get_quota(self, actor: Principal, tenant: str) -> Quota:
        _require_admin_or_member(actor, tenant)
        with self._read() as session:
            return _quota(_live_tenant(session, tenant))

    # -- usage ledger -----------------------------------------------------------------------------

    def record_usage(self, tenant: str, model: str, *, requests: int = 0, prompt_tokens: int = 0,
                     output_tokens: int = 0, rejected_requests: int = 0, at: datetime | None = None) -> None:
        """Add to the tenant's (model, hour) row, creating it if needed, in one atomic upsert."""
        row = UsageCount(tenant, model, _hour(_aware(at, "at") if at else self._clock()), requests, prompt_tokens,
                         output_tokens, rejected_requests)
        with self._write() as session:
            _add_usage(session, row)

    def record_usage_batch(self, batch: UsageBatch) -> bool:
        """Write every row of `batch` and its id in one transaction; False (nothing written) when its id is
        already recorded, so retrying or replaying a batch never counts it twice."""
        try:
            with self._write() as session:
                if session.get(UsageBatchRow, batch.id) is not None:
                    return False
                session.add(UsageBatchRow(id=batch.id, recorded_at=self._clock()))
                for row in batch.rows:
                    _add_usage(session, row)
                return True
        except IntegrityError:  # the same batch committed by a concurrent replay between our check and commit
            return False

    def prune_usage_batches(self, older_than: timedelta = timedelta(days=BATCH_RETENTION_DAYS)) -> int:
        """Forget batch ids older than the retention (they only guard replays of older spools)."""
        with self._write() as session:
            cutoff = self._clock() - older_than
            result = session.execute(delete(UsageBatchRow).where(UsageBatchRow.recorded_at < cutoff))
            return result.rowcount or 0

    def usage(self, actor: Principal, *, tenant: str | None = None, model: str | None = None,
              since: datetime | None = None, until: datetime | None = None) -> list[UsageRow]:
        """Ledger rows with hour in [since, until). A tenant key sees only its own tenant; `tenant=None`
        means the caller's own tenant for a tenant key and every tenant for an admin key."""
        if not actor.admin:
            if tenant and tenant != actor.tenant:
                raise PermissionDeniedError(f"key {actor.key_id} may read only tenant {actor.tenant!r}'s usage")
            tenant = actor.tenant
        query = select(UsageLedgerRow).order_by(UsageLedgerRow.hour, UsageLedgerRow.tenant, UsageLedgerRow.model)
        # Filters are checked as names are (PostgreSQL refuses a NUL byte in a query with an error of its own).
        if tenant:
            query = query.where(UsageLedgerRow.tenant == check_tenant_name(tenant))
        if model:
            query = query.where(UsageLedgerRow.model == check_model_name(model))
        if since:
            query = query.where(UsageLedgerRow.hour >= _aware(since, "since"))
        if until:
            query = query.where(UsageLedgerRow.hour < _aware(until, "until"))
        with self._read() as session:
            return [UsageRow(row.tenant, row.model, row.hour, *(getattr(row, name) for name in USAGE_COUNTERS))
                    for row in session.scalars(query)]

    # -- audit log --------------------------------------------------------------------------------

    def audit_events(self, actor: Principal, *, since: datetime | None = None, limit: int = 0) -> list[AuditEvent]:
        """Oldest first: the first `limit` events at or after `since`, or without `since` the latest
        `limit` events. `limit` 0 means 100."""
        require_admin(actor)
        if isinstance(limit, bool) or not isinstance(limit, int) or not 0 <= limit <= MAX_AUDIT_LIMIT:
            raise InvalidArgumentError(f"limit must be from 0 (meaning {DEFAULT_AUDIT_LIMIT}) to {MAX_AUDIT_LIMIT}")
        limit = limit or DEFAULT_AUDIT_LIMIT
        query = select(AuditEventRow)
        if since:
            query = query.where(AuditEventRow.time >= _aware(since, "since")).order_by(AuditEventRow.id).limit(limit)
        else:
            query = query.order_by(AuditEventRow.id.desc()).limit(limit)
        with self._read() as session:
            rows = sorted(session.scalars(query), key=lambda row: row.id)
            return [AuditEvent(row.id, row.time, row.actor, row.action, row.target, row.detail) for row in rows]

    # -- helpers that need the clock --------------------------------------------------------------

    def _audit(self, session: Session, actor: Principal, action: str, target: str, **detail: Any) -> None:
        session.add(AuditEventRow(time=self._clock(), actor=actor.key_id, action=action, target=target,
                                  detail=json.dumps(detail, sort_keys=True)))

    def _create_key(self, session: Session, actor: Principal, owner: TenantRow | None,
                    description: str) -> CreatedKey:
        # 32 random bits per id: retry the rare collision instead of failing the call.
        key_id = keys.new_key_id()
        while session.get(ApiKeyRow, key_id) is not None:
            key_id = keys.new_key_id()
        return self._add_key(session, actor, key_id, keys.new_secret(key_id), owner, description)

    def _add_key(self, session: Session, actor: Principal, key_id: str, secret: str, owner: TenantRow | None,
                 description: str) -> CreatedKey:
        row = ApiKeyRow(id=key_id, secret_hash=keys.hash_secret(secret), tenant=owner, admin=owner is None,
                        description=description, created_at=self._clock())
        session.add(row)
        self._audit(session, actor, "keys.create", key_id, tenant=_tenant_name(row), admin=row.admin,
                    description=description)
        return CreatedKey(_api_key(row), secret)


def _key_record(row: ApiKeyRow | None) -> KeyRecord | None:
    if row is None:
        return None
    return KeyRecord(row.id, row.secret_hash, _tenant_name(row), row.admin, row.revoked_at)


def _add_usage(session: Session, row: UsageCount) -> None:
    counts = row.counts()
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in counts.values()):
        raise InvalidArgumentError(f"usage counts must be non-negative integers, not {counts}")
    values = dict(tenant=check_tenant_name(row.tenant), model=check_model_name(row.model),
                  hour=_hour(_aware(row.hour, "hour")), **counts)
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    upsert = dialect.insert(UsageLedgerRow).values(values)
    session.execute(upsert.on_conflict_do_update(
        index_elements=["tenant", "model", "hour"],
        set_={name: getattr(UsageLedgerRow, name) + upsert.excluded[name] for name in USAGE_COUNTERS}))


def _require_admin_or_member(actor: Principal, tenant: str) -> None:
    if not actor.admin and actor.tenant != tenant:
        raise PermissionDeniedError(f"key {actor.key_id} may act only on tenant {actor.tenant!r}")


def _any_tenant(session: Session, name: str) -> TenantRow:
    row = session.scalar(select(TenantRow).where(TenantRow.name == check_tenant_name(name)))
    if row is None:
        raise NotFoundError(f"no tenant {name!r}: list tenants with `garrison tenants list`")
    return row


def _live_tenant(session: Session, name: str) -> TenantRow:
    row = _any_tenant(session, name)
    if row.deleted_at is not None:
        raise NotFoundError(f"tenant {name!r} was deleted at {row.deleted_at:%Y-%m-%d %H:%M:%S} UTC")
    return row


def _name_taken(name: str) -> AlreadyExistsError:
    return AlreadyExistsError(f"tenant name {name!r} is taken (names of deleted tenants are not reused, "
                              f"so their usage and audit history stay unambiguous): choose another name")


def _aware(moment: datetime, name: str) -> datetime:
    if not isinstance(moment, datetime) or moment.tzinfo is None:
        raise InvalidArgumentError(f"{name} must be a timezone-aware datetime, not {moment!r}")
    return moment


def _hour(moment: datetime) -> datetime:
    return moment.astimezone(timezone.utc).replace(minute=0, second=0, microsecond=0)


def _tenant_name(key: ApiKeyRow) -> str | None:
    return key.tenant.name if key.tenant is not None else None


def _quota(row: TenantRow) -> Quota:
    return Quota(row.name, **{field: getattr(row.quota, field) for field in QUOTA_FIELDS})


def _tenant(row: TenantRow) -> Tenant:
    return Tenant(row.name, row.created_at, tuple(sorted(grant.model for grant in row.grants)), _quota(row))


def _api_key(row: ApiKeyRow) -> ApiKey:
    return ApiKey(row.id, _tenant_name(row), row.admin, row.description, row.created_at, row.revoked_at)
