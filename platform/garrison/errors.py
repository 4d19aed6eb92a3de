"""The one place where an error a user can cause becomes a gRPC status (DESIGN.md rule 8).

The table is ordered most specific first; `grpc_status_for` answers the status of the first class
the exception is an instance of. Anything that is not a GarrisonError is a bug: INTERNAL.
"""

from __future__ import annotations

import grpc

from garrison.tenancy.errors import (AlreadyExistsError, InvalidArgumentError, NotFoundError, PermissionDeniedError,
                                     QuotaExceededError, RequestTooLargeError, StoreUnavailableError,
                                     UnauthenticatedError)
from garrison_workers.errors import (CapacityError, ContextLengthError, GarrisonError, InvalidRequestError,
                                     LayoutError, ModelLoadError, QueueFullError, SequenceError,
                                     UnavailableError)

GRPC_STATUS: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (AlreadyExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (QuotaExceededError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (QueueFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    # Per-request limits and malformed fields: the same request can never succeed.
    (RequestTooLargeError, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT),
    (ContextLengthError, grpc.StatusCode.INVALID_ARGUMENT),
    # The request needs more KV cache than the worker group has even when it runs alone.
    (CapacityError, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    # A lost rank, a failed KV handoff, no serving replica: a retry may succeed.
    (UnavailableError, grpc.StatusCode.UNAVAILABLE),
    # The tenant database is down, locked or out of connections: retry after the hint (a retry-after trailer).
    (StoreUnavailableError, grpc.StatusCode.UNAVAILABLE),
    # One sequence failed inside the engine (NaN logits): the server's fault, not the client's; the others go on.
    (SequenceError, grpc.StatusCode.INTERNAL),
    # Server-side setup (a model that will not load, a layout that does not fit): the operator must act.
    (ModelLoadError, grpc.StatusCode.FAILED_PRECONDITION),
    (LayoutError, grpc.StatusCode.FAILED_PRECONDITION),
    (GarrisonError, grpc.StatusCode.FAILED_PRECONDITION),
)


def grpc_status_for(exc: BaseException) -> grpc.StatusCode:
    for cls, status in GRPC_STATUS:
        if isinstance(exc, cls):
            return status
    return grpc.StatusCode.INTERNAL
