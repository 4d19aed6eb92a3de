"""What the tenancy service returns: immutable values that map 1:1 onto garrison.v1 messages.

They are plain dataclasses, never ORM rows, so the gateway can hold them across threads and the
library never imports the generated protobuf code. Times are timezone-aware UTC datetimes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any

from garrison.tenancy.errors import InvalidArgumentError

TENANT_NAME = re.compile(r"[a-z0-9-]{1,63}")
# Model names are opaque here (the gateway knows which exist); they only must be printable and short.
MODEL_NAME = re.compile(r"[^\s\x00-\x1f\x7f]{1,255}")
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1


def check_tenant_name(name: str) -> str:
    if not isinstance(name, str) or not TENANT_NAME.fullmatch(name):
        raise InvalidArgumentError(
            f"tenant name {name!r} is invalid: use 1-63 lower-case letters, digits and '-'")
    return name


def check_model_name(model: str) -> str:
    if not isinstance(model, str) or not MODEL_NAME.fullmatch(model):
        raise InvalidArgumentError(
            f"model name {model!r} is invalid: use 1-255 printable characters without spaces")
    return model


@dataclass(frozen=True, slots=True)
class Quota:
    """A tenant's limits (garrison.v1.Quota). 0 means no limit for every count."""

    tenant: str
    max_concurrent_requests: int = 0
    tokens_per_minute: int = 0
    max_prompt_tokens: int = 0
    max_new_tokens: int = 0
    # Share of the workers under saturation relative to other tenants; > 0.
    priority_weight: float = 1.0


@dataclass(frozen=True, slots=True)
class QuotaUpdate:
    """A partial Quota: None keeps the current value (SetQuota sends only the fields present)."""

    max_concurrent_requests: int | None = None
    tokens_per_minute: int | None = None
    max_prompt_tokens: int | None = None
    max_new_tokens: int | None = None
    priority_weight: float | None = None

    def __post_init__(self) -> None:
        for name, maximum in (("max_concurrent_requests", INT32_MAX), ("tokens_per_minute", INT64_MAX),
                              ("max_prompt_tokens", INT32_MAX), ("max_new_tokens", INT32_MAX)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not 0 <= value <= maximum):
                raise InvalidArgumentError(f"{name} must be an integer from 0 (no limit) to {maximum}, not {value!r}")
        weight = self.priority_weight
        if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float))
                                   or not math.isfinite(weight) or weight <= 0):
            raise InvalidArgumentError(f"priority_weight must be a finite number > 0, not {weight!r}")

    def present(self) -> dict[str, Any]:
        """The fields that were set, for applying and for the audit detail."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    created_at: datetime
    models: tuple[str, ...]
    quota: Quota


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A key's public record (garrison.v1.ApiKey); the secret is never part of it."""

    id: str
    tenant: str | None  # None for admin keys
    admin: bool
    description: str
    created_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True, slots=True)
class CreatedKey:
    """CreateApiKey's answer: the only time the secret exists outside the caller's hands."""

    key: ApiKey
    secret: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the result of authenticating a bearer token."""

    key_id: str
    tenant: str | None
    admin: bool


# The actor recorded for actions the server takes on its own, such as minting the bootstrap admin key.
SYSTEM = Principal(key_id="system", tenant=None, admin=True)


@dataclass(frozen=True, slots=True)
class Authorization:
    """A tenant key cleared to use one model, with the limits the gateway enforces on the request."""

    principal: Principal
    model: str
    quota: Quota


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One tenant's use of one model during one UTC hour (garrison.v1.UsageRow)."""

    tenant: str
    model: str
    hour: datetime
    requests: int
    prompt_tokens: int
    output_tokens: int
    rejected_requests: int


@dataclass(frozen=True, slots=True)
class AuditEvent:
    id: int
    time: datetime
    actor: str
    action: str
    target: str
    detail: str  # a JSON object; never holds a secret
