"""garrison.v1.Inference: what applications call with a tenant key."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import grpc
from opentelemetry import context as otel_context
from opentelemetry.trace import Span

from garrison.gateway import convert
from garrison.gateway.calls import DrainingError, bearer_token, new_request_id, parse
from garrison.gateway.hot_path import AuthMirror, UsageBuffer
from garrison.gateway.render import ChatRenderer
from garrison.gateway.requests import prompt_token_ids, sampling_params
from garrison.router.router import Deployment, RouteRequest, Router
from garrison.telemetry import Telemetry
from garrison.tenancy.errors import NotFoundError, QuotaExceededError
from garrison.tenancy.shared_limits import AdmitLease, Quotas
from garrison.tenancy.records import Authorization
from garrison.tenancy.service import TenancyService
from garrison.v1 import inference_pb2 as pb
from garrison.v1 import usage_pb2
from garrison_workers.engine.llm_engine import RequestOutput
from garrison_workers.errors import QueueFullError

log = logging.getLogger(__name__)

FINISH_REASONS = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}
SERVICE = "garrison.v1.Inference"
METHODS = {
    "Generate": ("generate", "stream", pb.GenerateResponse),
    "Tokenize": ("tokenize", "unary", pb.TokenizeResponse),
    "ListModels": ("list_models", "unary", pb.ListModelsResponse),
    "GetUsage": ("get_usage", "unary", usage_pb2.GetUsageResponse),
}


@dataclass(slots=True)
class _Progress:
    """What one Generate call has produced so far, for usage and metrics."""

    arrived: float
    first_token: float | None = None
    last_token: float | None = None
    output_tokens: int = 0
    cached_prompt_tokens: int = 0


class InferenceService:
    def __init__(self, tenancy: TenancyService, quotas: Quotas, router: Router, telemetry: Telemetry,
                 max_request_bytes: int, auth: AuthMirror, usage: UsageBuffer, renderer: ChatRenderer) -> None:
        self.tenancy, self.quotas, self.router, self.telemetry = tenancy, quotas, router, telemetry
        self.max_request_bytes = max_request_bytes
        self.auth, self.usage, self.renderer = auth, usage, renderer
        self.draining = False
        self.streams = 0  # Generate calls in progress

    @contextlib.contextmanager
    def _stream(self) -> Iterator[None]:
        if self.draining:
            raise DrainingError("this gateway is shutting down and takes no new streams: retry (another gateway, "
                                "or this one restarted, takes it)")
        self.streams += 1
        try:
            yield
        finally:
            self.streams -= 1

    async def generate(self, data: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        request_id = new_request_id()
        with self._stream(), self.telemetry.tracer.start_as_current_span("gateway.Generate") as span:
            span.set_attribute("garrison.request_id", request_id)
            request = parse(data, pb.GenerateRequest, self.max_request_bytes)
            auth = self.auth.authorize(bearer_token(context), request.model, self.router.deployments)
            tenant = auth.principal.tenant or ""
            span.set_attributes({"garrison.tenant": tenant, "garrison.model": request.model})
            deployment = self._deployment(request.model)
            prompt = await prompt_token_ids(request, deployment, self.renderer)
            params = sampling_params(request, deployment, auth.quota, len(prompt))
            lease = await self._admit(auth, len(prompt), params.max_tokens)
            progress = _Progress(time.perf_counter())
            # The salt keeps each tenant's prefix-cache blocks its own: the same prompt from two
            # tenants hashes to different blocks, so no tenant can learn another's prompts by timing.
            route = RouteRequest(request_id, tenant, auth.quota.priority_weight, request.model, prompt, params,
                                 salt=f"tenant:{tenant}".encode())
            status = "error"
            try:
                async with contextlib.aclosing(self._traced_stream(route)) as outputs:
                    async for out in outputs:
                        yield self._response(request_id, out, progress, len(prompt))
                status = "ok"
            except asyncio.CancelledError:
                status = "cancelled"
                raise
            except (QuotaExceededError, QueueFullError) as err:  # the tenant's line at the replica is full
                status = "rejected"
                self._reject(auth, err)
                raise
            finally:
                lease.release(progress.output_tokens)
                if status != "rejected":
                    self._account(auth, request.model, len(prompt), progress, status)

    async def _traced_stream(self, route: RouteRequest) -> AsyncIterator[RequestOutput]:
        """The router's stream, with the router's and the worker's spans in the request's trace."""
        tracer = self.telemetry.tracer
        parent = otel_context.get_current()
        queued = tracer.start_span("router.queue", context=parent)  # until the replica's admission lets it in
        engine_spans: list[Span] = []

        def started() -> None:
            queued.end()
            engine_spans.append(tracer.start_span("worker.engine", context=parent))

        route.on_start = started
        try:
            # Closed here, not left to the garbage collector: closing it aborts the request at its replica.
            async with contextlib.aclosing(self.router.stream(route)) as outputs:
                async for out in outputs:
                    if out.error is not None:
                        raise out.error
                    yield out
        finally:
            for span in (queued, *engine_spans):
                if span.is_recording():
                    span.end()

    def _deployment(self, model: str) -> Deployment:
        deployment = self.router.deployments.get(model)
        if deployment is None:
            raise NotFoundError(f"model {model!r} is not served here; ListModels shows the models you may use")
        return deployment

    async def _admit(self, auth: Authorization, prompt_tokens: int, max_new_tokens: int) -> AdmitLease:
        tenant = auth.principal.tenant or ""
        try:
            return await self.quotas.admit(tenant, auth.quota, prompt_tokens, max_new_tokens)
        except QuotaExceededError as err:
            self._reject(auth, err)
            raise

    def _reject(self, auth: Authorization, err: QuotaExceededError | QueueFullError) -> None:
        tenant = auth.principal.tenant or ""
        limit = err.limit if isinstance(err, QuotaExceededError) else "max_queued_per_tenant"
        self.telemetry.rejections.add(1, {"tenant": tenant, "model": auth.model, "limit": limit})
        self.usage.add(tenant, auth.model, rejected_requests=1)

    def _response(self, request_id: str, out: RequestOutput, progress: _Progress,
                  num_prompt_tokens: int) -> pb.GenerateResponse:
        now = time.perf_counter()
        if out.new_token_ids:
            if progress.first_token is None:
                progress.first_token = now
            progress.last_token = now
        progress.output_tokens = out.num_output_tokens
        progress.cached_prompt_tokens = out.num_cached_prompt_tokens
        response = pb.GenerateResponse(id=request_id, text=out.new_text, token_ids=out.new_token_ids)
        if any(lp is not None for lp in out.new_logprobs):
            response.logprobs.extend(lp if lp is not None else float("nan") for lp in out.new_logprobs)
        if out.finished:
            response.finish_reason = FINISH_REASONS.get(out.finish_reason or "", pb.FINISH_REASON_UNSPECIFIED)
            response.usage.CopyFrom(pb.Usage(prompt_tokens=num_prompt_tokens, output_tokens=out.num_output_tokens,
                                             cached_prompt_tokens=out.num_cached_prompt_tokens))
        return response

    def _account(self, auth: Authorization, model: str, prompt_tokens: int, progress: _Progress, status: str) -> None:
        tenant = auth.principal.tenant or ""
        attributes = {"tenant": tenant, "model": model}
        t = self.telemetry
        t.requests.add(1, {**attributes, "status": status})
        t.tokens.add(prompt_tokens, {**attributes, "kind": "prompt"})
        t.tokens.add(progress.output_tokens, {**attributes, "kind": "output"})
        if progress.first_token is not None:
            t.ttft.record(progress.first_token - progress.arrived, attributes)
            if progress.output_tokens > 1 and progress.last_token is not None:
                t.tpot.record((progress.last_token - progress.first_token) / (progress.output_tokens - 1), attributes)
        self.usage.add(tenant, model, requests=1, prompt_tokens=prompt_tokens, output_tokens=progress.output_tokens)

    async def tokenize(self, data: bytes, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        request = parse(data, pb.TokenizeRequest, self.max_request_bytes)
        self.auth.authorize(bearer_token(context), request.model, self.router.deployments)
        return pb.TokenizeResponse(token_ids=await prompt_token_ids(request, self._deployment(request.model),
                                                                    self.renderer))

    async def list_models(self, data: bytes, context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        parse(data, pb.ListModelsRequest, self.max_request_bytes)
        principal = self.auth.authenticate(bearer_token(context))
        granted = set(self.router.deployments)
        if not principal.admin:  # an admin key sees every model served here
            tenant = self.auth.tenant(principal.tenant or "")
            granted &= set(tenant.models if tenant is not None else ())
        return pb.ListModelsResponse(models=[convert.model_info(self.router.deployments[name])
                                             for name in sorted(granted)])

    async def get_usage(self, data: bytes, context: grpc.aio.ServicerContext) -> usage_pb2.GetUsageResponse:
        request = parse(data, usage_pb2.GetUsageRequest, self.max_request_bytes)
        principal = self.auth.authenticate(bearer_token(context))
        await self.usage.flush()  # a tenant reads its own requests, however recent
        return await convert.usage(self.tenancy, principal, request)
