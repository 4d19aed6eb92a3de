"""What every RPC handler shares: reading the request bytes, the caller's key, and turning errors into statuses.

Requests arrive as raw bytes and are parsed here, not by gRPC: a message gRPC cannot parse (invalid
UTF-8 in a string field, say) would otherwise become INTERNAL, and this is the client's mistake.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from garrison.errors import grpc_status_for
from garrison.tenancy.errors import InvalidArgumentError, QuotaExceededError, UnauthenticatedError
from garrison_workers.errors import UnavailableError

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)


def parse(data: bytes, message_type: type[M], max_bytes: int) -> M:
    if len(data) > max_bytes:
        raise InvalidArgumentError(f"the request is {len(data)} bytes; this server accepts at most {max_bytes}")
    try:
        return message_type.FromString(data)
    except DecodeError as err:
        raise InvalidArgumentError(f"the request is not a valid {message_type.DESCRIPTOR.full_name}: {err}") from None


def bearer_token(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            scheme, _, token = str(value).partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            break
    raise UnauthenticatedError("send your API key as metadata 'authorization: Bearer <key>'")


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex[:16]}"


async def abort(context: grpc.aio.ServicerContext, err: BaseException, request_id: str | None = None) -> None:
    """End the call with the status the error maps to; bugs become INTERNAL with an id to quote."""
    status = grpc_status_for(err)
    if status is grpc.StatusCode.INTERNAL:
        request_id = request_id or new_request_id()
        log.error("internal error in request %s", request_id, exc_info=err)
        message = f"internal error; quote request id {request_id} to the operator"
    else:
        message = str(err)
    # A quota, or the tenant database, frees up later: say when to retry.
    retry_after_s = getattr(err, "retry_after_s", None)  # quotas, queues, a database or a gateway that is busy
    if isinstance(retry_after_s, (int, float)):
        context.set_trailing_metadata((("retry-after", f"{retry_after_s:.1f}"),))
    await context.abort(status, message)


class CallLimit:
    """At most `maximum` Inference and Admin calls in flight on this gateway; the next is refused at once with
    RESOURCE_EXHAUSTED and a retry hint, before it costs anything. Health checks and reflection do not count, so a
    gateway at its limit still answers its probes."""

    def __init__(self, maximum: int) -> None:
        self.maximum, self.in_flight = maximum, 0

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        if self.in_flight >= self.maximum:
            raise QuotaExceededError(f"this gateway is serving {self.in_flight} calls, its max_concurrent_rpcs: retry "
                                     f"in a moment, or through another gateway", limit="max_concurrent_rpcs",
                                     retry_after_s=RETRY_BUSY_S)
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1


RETRY_BUSY_S = 1.0


class DrainingError(UnavailableError):
    """This gateway is shutting down: it takes no new streams while those running finish. Another gateway behind
    the same address (or this one, restarted) takes the retry."""

    retry_after_s = RETRY_BUSY_S


def unary(handler: Callable[[bytes, grpc.aio.ServicerContext], Awaitable[Any]], limit: CallLimit
          ) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[Any]]:
    async def call(data: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            with limit.held():
                return await handler(data, context)
        except grpc.aio.AbortError:
            raise
        except Exception as err:
            await abort(context, err)

    return call


def streaming(handler: Callable[[bytes, grpc.aio.ServicerContext], AsyncIterator[Any]], limit: CallLimit
              ) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[None]]:
    """A coroutine that writes the handler's items, not a generator yielding them: when the client
    cancels, the CancelledError lands in this frame and the handler's own cleanup (its quota lease,
    its router slot, its spans) runs at once, in this task. A generator handler would be left
    suspended for the garbage collector to close later, from another task."""
    async def call(data: bytes, context: grpc.aio.ServicerContext) -> None:
        try:
            with limit.held():
                await _write_all(handler(data, context), context)
        except grpc.aio.AbortError:
            raise
        except Exception as err:  # refused by the limit
            await abort(context, err)

    return call


async def _write_all(items: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> None:
    async with contextlib.aclosing(items):
        while True:
            try:
                item = await anext(items)
            except StopAsyncIteration:
                return
            except grpc.aio.AbortError:
                raise
            except Exception as err:
                await abort(context, err)
            # A failed write is grpc's own error (the client left mid-stream): grpc handles it.
            await context.write(item)


def method_handlers(service: Any, methods: dict[str, tuple[str, str, type[Message]]], limit: CallLimit
                    ) -> dict[str, grpc.RpcMethodHandler]:
    """gRPC handlers for `methods` (RPC name -> (service attribute, "unary" or "stream", response type))."""
    handlers = {}
    for name, (attribute, kind, response) in methods.items():
        fn = getattr(service, attribute)
        if kind == "stream":
            handlers[name] = grpc.unary_stream_rpc_method_handler(streaming(fn, limit),
                                                                  response_serializer=response.SerializeToString)
        else:
            handlers[name] = grpc.unary_unary_rpc_method_handler(unary(fn, limit),
                                                                 response_serializer=response.SerializeToString)
    return handlers
