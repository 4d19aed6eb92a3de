"""Python client for Garrison's gRPC API, for application developers: `GarrisonClient` (blocking) and
`AsyncGarrisonClient` (asyncio), with the same methods.

    from garrison.client import GarrisonClient
    with GarrisonClient("127.0.0.1:50051", key_file="tenant.key") as client:
        for piece in client.generate("smollm2", messages=[{"role": "user", "content": "Hi"}]):
            print(piece.text, end="", flush=True)

Failures raise `ClientError` with the gRPC status (`.code`) and the server's message.
Admin calls live on `.admin` (an admin key is needed).
"""

from __future__ import annotations

import re

from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import message_factory

from garrison.v1 import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc, usage_pb2
from garrison_workers.errors import GarrisonError

DEFAULT_SERVER = "127.0.0.1:50051"
Message = dict[str, str] | inference_pb2.ChatMessage


class ClientError(GarrisonError):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code, self.message = code, message


@dataclass(slots=True, frozen=True)
class TLSFiles:
    ca: Path | None = None  # the server's CA (a private CA from `garrison certs`); None: system roots
    cert: Path | None = None  # client certificate, for servers that require mTLS
    key: Path | None = None


@dataclass(slots=True)
class Completion:
    """A whole streamed answer."""

    id: str = ""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str = ""
    usage: inference_pb2.Usage | None = None


def read_key(key: str | None, key_file: str | Path | None) -> str | None:
    if key is not None:
        return key
    if key_file is None:
        return None
    try:
        return Path(key_file).expanduser().read_text().strip()
    except OSError as err:
        raise GarrisonError(f"cannot read the key file {key_file}: {err.strerror}") from None


def generate_request(model: str, prompt: str | None = None, messages: Sequence[Message] | None = None,
                     token_ids: Sequence[int] | None = None, **sampling: Any) -> inference_pb2.GenerateRequest:
    """A GenerateRequest; sampling keywords are the message's fields (max_tokens, temperature, top_p, top_k,
    seed, stop, logprobs); None leaves a field unset."""
    request = inference_pb2.GenerateRequest(model=model, prompt=prompt or "", token_ids=token_ids or [],
                                            messages=[_message(m) for m in messages or ()])
    for name, value in sampling.items():
        if value is None:
            continue
        if name == "stop":
            request.stop.extend([value] if isinstance(value, str) else value)
        else:
            setattr(request, name, value)
    return request


def _message(m: Message) -> inference_pb2.ChatMessage:
    return m if isinstance(m, inference_pb2.ChatMessage) else inference_pb2.ChatMessage(**m)


def _credentials(tls: TLSFiles) -> grpc.ChannelCredentials:
    def read(path: Path | None) -> bytes | None:
        return Path(path).expanduser().read_bytes() if path else None

    return grpc.ssl_channel_credentials(root_certificates=read(tls.ca), private_key=read(tls.key),
                                        certificate_chain=read(tls.cert))


def accumulate(completion: Completion, piece: inference_pb2.GenerateResponse) -> None:
    completion.id = piece.id
    completion.text += piece.text
    completion.token_ids += piece.token_ids
    completion.logprobs += piece.logprobs
    if piece.finish_reason:
        completion.finish_reason = inference_pb2.FinishReason.Name(piece.finish_reason).removeprefix(
            "FINISH_REASON_").lower()
        completion.usage = piece.usage


class _Base:
    def __init__(self, target: str, key: str | None, key_file: str | Path | None, tls: TLSFiles | None,
                 timeout: float | None) -> None:
        self.target, self.timeout = target, timeout
        secret = read_key(key, key_file)
        self._metadata = (("authorization", f"Bearer {secret}"),) if secret else ()
        self._credentials = _credentials(tls) if tls is not None else None


class GarrisonClient(_Base):
    def __init__(self, target: str = DEFAULT_SERVER, *, key: str | None = None, key_file: str | Path | None = None,
                 tls: TLSFiles | None = None, timeout: float | None = None) -> None:
        super().__init__(target, key, key_file, tls, timeout)
        self.channel = (grpc.secure_channel(target, self._credentials) if self._credentials
                        else grpc.insecure_channel(target))
        self._inference = inference_pb2_grpc.InferenceStub(self.channel)
        self.admin = _AdminCalls(admin_pb2_grpc.AdminStub(self.channel), self._metadata, timeout)

    def __enter__(self) -> "GarrisonClient":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def generate(self, model: str, prompt: str | None = None, *, messages: Sequence[Message] | None = None,
                 token_ids: Sequence[int] | None = None, **sampling: Any) -> Iterator[inference_pb2.GenerateResponse]:
        """Stream the answer piece by piece; leaving the loop early cancels the request on the server."""
        call = self._inference.Generate(generate_request(model, prompt, messages, token_ids, **sampling),
                                        metadata=self._metadata, timeout=self.timeout)
        try:
            yield from call
        except grpc.RpcError as err:
            raise ClientError(err.code(), err.details() or "") from None
        finally:
            call.cancel()

    def complete(self, model: str, prompt: str | None = None, **kwargs: Any) -> Completion:
        completion = Completion()
        for piece in self.generate(model, prompt, **kwargs):
            accumulate(completion, piece)
        return completion

    def tokenize(self, model: str, text: str | None = None, *, messages: Sequence[Message] | None = None) -> list[int]:
        request = inference_pb2.TokenizeRequest(model=model, text=text or "", messages=[_message(m) for m in messages or ()])
        return list(self._unary(self._inference.Tokenize, request).token_ids)

    def list_models(self) -> list[inference_pb2.ModelInfo]:
        return list(self._unary(self._inference.ListModels, inference_pb2.ListModelsRequest()).models)

    def usage(self, **filters: Any) -> list[usage_pb2.UsageRow]:
        return list(self._unary(self._inference.GetUsage, usage_pb2.GetUsageRequest(**filters)).rows)

    def _unary(self, method: Any, request: Any) -> Any:
        return _call(method, request, self._metadata, self.timeout)


def _call(method: Any, request: Any, metadata: Any, timeout: float | None) -> Any:
    try:
        return method(request, metadata=metadata, timeout=timeout)
    except grpc.RpcError as err:
        raise ClientError(err.code(), err.details() or "") from None


class _AdminCalls:
    """garrison.v1.Admin, method by method (snake_case), each taking the request message's fields."""

    # snake_case name -> (RPC, request class), read from the service's own descriptor so it never drifts.
    _REQUESTS = {re.sub(r"(?<!^)(?=[A-Z])", "_", m.name).lower(): (m.name, message_factory.GetMessageClass(m.input_type))
                 for m in admin_pb2.DESCRIPTOR.services_by_name["Admin"].methods}

    def __init__(self, stub: Any, metadata: Any, timeout: float | None, call: Any = _call) -> None:
        self._stub, self._metadata, self._timeout, self._call = stub, metadata, timeout, call

    def __getattr__(self, name: str) -> Any:
        if name not in self._REQUESTS:
            raise AttributeError(name)
        rpc, request_type = self._REQUESTS[name]
        method = getattr(self._stub, rpc)
        return lambda **fields: self._call(method, request_type(**fields), self._metadata, self._timeout)


class AsyncGarrisonClient(_Base):
    def __init__(self, target: str = DEFAULT_SERVER, *, key: str | None = None, key_file: str | Path | None = None,
                 tls: TLSFiles | None = None, timeout: float | None = None) -> None:
        super().__init__(target, key, key_file, tls, timeout)
        self.channel = (grpc.aio.secure_channel(target, self._credentials) if self._credentials
                        else grpc.aio.insecure_channel(target))
        self._inference = inference_pb2_grpc.InferenceStub(self.channel)
        self.admin = _AdminCalls(admin_pb2_grpc.AdminStub(self.channel), self._metadata, timeout, _acall)

    async def __aenter__(self) -> "AsyncGarrisonClient":
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def generate(self, model: str, prompt: str | None = None, *, messages: Sequence[Message] | None = None,
                       token_ids: Sequence[int] | None = None,
                       **sampling: Any) -> AsyncIterator[inference_pb2.GenerateResponse]:
        call = self._inference.Generate(generate_request(model, prompt, messages, token_ids, **sampling),
                                        metadata=self._metadata, timeout=self.timeout)
        try:
            async for piece in call:
                yield piece
        except grpc.RpcError as err:
            raise ClientError(err.code(), err.details() or "") from None
        finally:
            call.cancel()

    async def complete(self, model: str, prompt: str | None = None, **kwargs: Any) -> Completion:
        completion = Completion()
        async for piece in self.generate(model, prompt, **kwargs):
            accumulate(completion, piece)
        return completion

    async def tokenize(self, model: str, text: str | None = None, *,
                       messages: Sequence[Message] | None = None) -> list[int]:
        request = inference_pb2.TokenizeRequest(model=model, text=text or "", messages=[_message(m) for m in messages or ()])
        return list((await _acall(self._inference.Tokenize, request, self._metadata, self.timeout)).token_ids)

    async def list_models(self) -> list[inference_pb2.ModelInfo]:
        response = await _acall(self._inference.ListModels, inference_pb2.ListModelsRequest(), self._metadata,
                                self.timeout)
        return list(response.models)

    async def usage(self, **filters: Any) -> list[usage_pb2.UsageRow]:
        response = await _acall(self._inference.GetUsage, usage_pb2.GetUsageRequest(**filters), self._metadata,
                                self.timeout)
        return list(response.rows)


async def _acall(method: Any, request: Any, metadata: Any, timeout: float | None) -> Any:
    try:
        return await method(request, metadata=metadata, timeout=timeout)
    except grpc.RpcError as err:
        raise ClientError(err.code(), err.details() or "") from None
