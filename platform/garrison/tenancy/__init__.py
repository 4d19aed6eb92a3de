"""Tenancy: tenants, API keys, model grants, quotas, the usage ledger and the audit log.

`TenancyService` (service.py) is the store and its admin operations over SQLAlchemy (SQLite or
PostgreSQL, migrated with alembic at startup); `QuotaEnforcer` (limits.py) admits requests against
a tenant's limits in memory, per gateway process. Neither imports the generated protobuf code: the
records they return map 1:1 onto garrison.v1 messages, and the gateway converts at its edge.
"""

from garrison.tenancy.errors import (AlreadyExistsError, InvalidArgumentError, NotFoundError, PermissionDeniedError,
                                     QuotaExceededError, RequestTooLargeError, StoreUnavailableError,
                                     UnauthenticatedError)
from garrison.tenancy.limits import Lease, QuotaEnforcer
from garrison.tenancy.records import (SYSTEM, ApiKey, AuditEvent, Authorization, CreatedKey, Principal, Quota,
                                      QuotaUpdate, Tenant, UsageRow)
from garrison.tenancy.service import TenancyService, require_admin
from garrison.tenancy.store import database_url, make_engine, migrate

__all__ = [
    "AlreadyExistsError", "ApiKey", "AuditEvent", "Authorization", "CreatedKey", "InvalidArgumentError", "Lease",
    "NotFoundError", "PermissionDeniedError", "Principal", "Quota", "QuotaEnforcer", "QuotaExceededError",
    "QuotaUpdate", "RequestTooLargeError", "SYSTEM", "StoreUnavailableError", "TenancyService", "Tenant",
    "UnauthenticatedError",
    "UsageRow", "database_url", "make_engine", "migrate", "require_admin",
]
