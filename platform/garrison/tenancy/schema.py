"""The tenancy tables as SQLAlchemy 2 ORM classes; the alembic migrations must produce exactly these.

Invariants the rest of the package relies on:
- A tenant row is never deleted: deletion stamps `deleted_at`, revokes its keys and keeps its usage,
  and its name is never reused, so ledger and audit rows that name it stay unambiguous.
- `api_keys.secret_hash` is SHA-256 of the whole bearer token; the token itself is never stored.
- `audit_events` is append-only: nothing in the service updates or deletes it, and the migration
  adds triggers that make the database refuse to.
- `usage` rows are keyed by (tenant name, model, UTC hour) and only ever incremented, a batch at a time:
  each batch's id goes into `usage_batches` in the same transaction, so a batch is counted once however
  often it is retried (garrison.tenancy.ledger).
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (BigInteger, Boolean, CheckConstraint, DateTime, Float, ForeignKey, Index, Integer,
                        LargeBinary, MetaData, String, Text)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in and out, whether the database keeps zones (PostgreSQL) or not (SQLite)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass an aware UTC time")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


# Audit ids grow without bound; SQLite only auto-increments a column declared INTEGER.
BigId = BigInteger().with_variant(Integer(), "sqlite")

NAMING = {"ix": "ix_%(table_name)s_%(column_0_N_name)s", "uq": "uq_%(table_name)s_%(column_0_N_name)s",
          "ck": "ck_%(table_name)s_%(constraint_name)s", "fk": "fk_%(table_name)s_%(column_0_name)s",
          "pk": "pk_%(table_name)s"}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class TenantRow(Base):
    __tablename__ = "tenants"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    quota: Mapped[QuotaRow] = relationship(lazy="joined", innerjoin=True)
    grants: Mapped[list[ModelGrantRow]] = relationship(lazy="selectin", order_by="ModelGrantRow.model",
                                                       cascade="all, delete-orphan")


class QuotaRow(Base):
    """One per tenant, created with it. 0 means no limit for every count."""

    __tablename__ = "quotas"

    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    max_concurrent_requests: Mapped[int] = mapped_column(Integer)
    tokens_per_minute: Mapped[int] = mapped_column(BigInteger)
    max_prompt_tokens: Mapped[int] = mapped_column(Integer)
    max_new_tokens: Mapped[int] = mapped_column(Integer)
    priority_weight: Mapped[float] = mapped_column(Float)


class ModelGrantRow(Base):
    __tablename__ = "model_grants"

    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    model: Mapped[str] = mapped_column(String(255), primary_key=True)


class ApiKeyRow(Base):
    __tablename__ = "api_keys"
    __table_args__ = (
        # Admin keys belong to no tenant; tenant keys are never admin.
        CheckConstraint("(admin AND tenant_id IS NULL) OR (NOT admin AND tenant_id IS NOT NULL)",
                        name="admin_xor_tenant"),
    )

    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    secret_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    tenant_id: Mapped[int | None] = mapped_column(ForeignKey("tenants.id"), index=True)
    admin: Mapped[bool] = mapped_column(Boolean)
    description: Mapped[str] = mapped_column(String(1024))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    tenant: Mapped[TenantRow | None] = relationship(lazy="joined")


class UsageLedgerRow(Base):
    __tablename__ = "usage"
    __table_args__ = (Index("ix_usage_hour", "hour"),)

    tenant: Mapped[str] = mapped_column(String(63), primary_key=True)
    model: Mapped[str] = mapped_column(String(255), primary_key=True)
    hour: Mapped[datetime] = mapped_column(UTCDateTime, primary_key=True)
    requests: Mapped[int] = mapped_column(BigInteger)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger)
    output_tokens: Mapped[int] = mapped_column(BigInteger)
    rejected_requests: Mapped[int] = mapped_column(BigInteger)


class UsageBatchRow(Base):
    """The id of every usage batch written (kept `BATCH_RETENTION` days): what makes a retry idempotent."""

    __tablename__ = "usage_batches"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class AuditEventRow(Base):
    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    time: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    actor: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(255))
    detail: Mapped[str] = mapped_column(Text)  # a JSON object, never a secret


USAGE_COUNTERS = ("requests", "prompt_tokens", "output_tokens", "rejected_requests")
