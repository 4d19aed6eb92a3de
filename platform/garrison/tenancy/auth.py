"""Who a bearer token is and what it may use: the decisions, over key and tenant records wherever they were read.

The tenancy service decides from one row of the database; a gateway decides from an `AuthSnapshot`, all keys and
tenants read in one transaction and held in memory, so that no request (a flood of unknown keys least of all)
waits for the database. A snapshot carries the version it was read at: the id of the newest audit event. Every
change that can alter a decision (a key created or revoked, a tenant created or deleted, a grant, a quota) writes
an audit event in its own transaction, so a gateway that polls the version sees each change once it commits.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import datetime

from garrison.tenancy import keys
from garrison.tenancy.errors import InvalidArgumentError, PermissionDeniedError, UnauthenticatedError
from garrison.tenancy.records import Authorization, Principal, Tenant


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """What authentication needs of a key: its hash, never its secret."""

    id: str
    secret_hash: bytes
    tenant: str | None  # None for admin keys
    admin: bool
    revoked_at: datetime | None


def authenticate(secret: str, lookup: Callable[[str], KeyRecord | None]) -> Principal:
    """Who holds `secret`; UnauthenticatedError for a malformed, unknown or revoked key. `lookup` finds a key by id."""
    key_id = keys.key_id_of(secret)
    if key_id is None:
        raise UnauthenticatedError("malformed API key: send the whole secret that `garrison keys create` "
                                   "printed, as 'authorization: Bearer gk_...'")
    record = lookup(key_id)
    if record is None or not keys.secret_matches(secret, record.secret_hash):
        raise UnauthenticatedError(f"unknown API key {key_id}: check the key, or ask an administrator for one")
    if record.revoked_at is not None:
        raise UnauthenticatedError(f"API key {key_id} was revoked at {record.revoked_at:%Y-%m-%d %H:%M:%S} UTC: "
                                   f"ask an administrator for a new one")
    return Principal(key_id=record.id, tenant=record.tenant, admin=record.admin)


def authorize(principal: Principal, tenant: Tenant | None, model: str,
              served: Collection[str] | None = None) -> Authorization:
    """Clear a tenant key to run inference on `model` (granted to `tenant`, the key's live tenant). `served`: the
    models the caller serves, named (with the grants) when no model is given."""
    if principal.tenant is None:
        raise PermissionDeniedError(f"key {principal.key_id} is an admin key, which runs no inference: "
                                    f"create a tenant key with `garrison keys create --tenant NAME`")
    if tenant is None:  # deleted after the key was read: its keys are revoked in the same transaction
        raise UnauthenticatedError(f"API key {principal.key_id}: its tenant {principal.tenant!r} was deleted")
    if not model:
        usable = [m for m in tenant.models if served is None or m in served]
        raise InvalidArgumentError(f"set model: tenant {tenant.name!r} may use "
                                   f"{', '.join(usable) or 'no model served here (ask an administrator for a grant)'}")
    if model not in tenant.models:
        raise PermissionDeniedError(f"tenant {tenant.name!r} may not use model {model!r}: "
                                    f"ask an administrator to grant it (garrison.v1.Admin/GrantModel)")
    return Authorization(principal, model, tenant.quota)


@dataclass(frozen=True, slots=True)
class AuthSnapshot:
    version: int  # the newest audit event's id when read (0: none yet)
    keys: Mapping[str, KeyRecord]
    tenants: Mapping[str, Tenant]  # live tenants only

    def authenticate(self, secret: str) -> Principal:
        return authenticate(secret, self.keys.get)

    def authorize(self, secret: str, model: str, served: Collection[str] | None = None) -> Authorization:
        principal = self.authenticate(secret)
        return authorize(principal, self.tenants.get(principal.tenant or ""), model, served)
