"""Errors a tenant or an administrator can cause.

Each class is one kind of mistake with a message that says what to do, and maps to exactly one gRPC
status in `garrison.errors.grpc_status_for`. All subclass `GarrisonError`, so the CLI prints them as
`garrison: error: ...` instead of a traceback.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from garrison_workers.errors import GarrisonError, InvalidRequestError


class UnauthenticatedError(GarrisonError):
    """No key, an unknown key, or a revoked key."""


class PermissionDeniedError(GarrisonError):
    """A valid key asked for something it may not do: a model not granted, an admin call with a tenant key."""


class NotFoundError(GarrisonError):
    """The named tenant, key or grant does not exist."""


class AlreadyExistsError(GarrisonError):
    """A tenant name is taken (names of deleted tenants are never reused)."""


class InvalidArgumentError(InvalidRequestError):
    """A field is malformed: a tenant name with upper-case letters, a negative limit, a NaN weight."""


class RequestTooLargeError(InvalidArgumentError):
    """One request exceeds a per-request limit of its tenant, so no retry can succeed.

    `limit` is the quota field (`max_prompt_tokens`, `max_new_tokens`, or `tokens_per_minute` when
    the request alone needs more than a minute's allowance).
    """

    def __init__(self, message: str, *, limit: str, maximum: int) -> None:
        super().__init__(message)
        self.limit = limit
        self.maximum = maximum

    def __reduce__(self) -> tuple:  # raised by the cluster's limits actor, across processes
        return _rebuild, (type(self), str(self), {"limit": self.limit, "maximum": self.maximum})


class QuotaExceededError(GarrisonError):
    """The tenant is over a rate or concurrency limit now; the same request can succeed later.

    `limit` is the quota field that refused it (`max_concurrent_requests` or `tokens_per_minute`).
    `retry_after_s` is how long until enough of the limit frees up, or None when that depends on a
    request in flight finishing; `resets_at` is the same moment as a UTC wall-clock time.
    """

    def __init__(self, message: str, *, limit: str, retry_after_s: float | None) -> None:
        super().__init__(message)
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.resets_at: datetime | None = (
            None if retry_after_s is None else datetime.now(timezone.utc) + timedelta(seconds=retry_after_s))

    def __reduce__(self) -> tuple:  # raised by the cluster's limits actor, across processes
        return _rebuild, (type(self), str(self), {"limit": self.limit, "retry_after_s": self.retry_after_s})


class StoreUnavailableError(GarrisonError):
    """The tenant database cannot answer now (down, locked, every connection in use); the same call can
    succeed later. `retry_after_s` is a hint of when to try again."""

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def _rebuild(cls: type, message: str, fields: dict) -> GarrisonError:
    return cls(message, **fields)
