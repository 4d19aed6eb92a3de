"""garrison.v1.Admin: tenants, keys, grants, quotas, usage and the audit log, for admin keys only.

Each handler authenticates the caller and hands the tenancy service the principal; the service
refuses tenant keys (PERMISSION_DENIED) and writes every change and its audit event in one
transaction. Store calls run off the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from garrison.gateway import convert
from garrison.gateway.calls import bearer_token, parse
from garrison.gateway.hot_path import AuthMirror, UsageBuffer
from garrison.tenancy.records import Principal
from garrison.tenancy.service import TenancyService, require_admin
from garrison.v1 import admin_pb2 as pb
from garrison.v1 import usage_pb2

SERVICE = "garrison.v1.Admin"
METHODS = {
    "CreateTenant": ("create_tenant", "unary", pb.Tenant),
    "ListTenants": ("list_tenants", "unary", pb.ListTenantsResponse),
    "DeleteTenant": ("delete_tenant", "unary", pb.DeleteTenantResponse),
    "CreateApiKey": ("create_api_key", "unary", pb.CreateApiKeyResponse),
    "ListApiKeys": ("list_api_keys", "unary", pb.ListApiKeysResponse),
    "RevokeApiKey": ("revoke_api_key", "unary", pb.ApiKey),
    "GrantModel": ("grant_model", "unary", pb.Tenant),
    "RevokeModel": ("revoke_model", "unary", pb.Tenant),
    "SetQuota": ("set_quota", "unary", pb.Quota),
    "GetQuota": ("get_quota", "unary", pb.Quota),
    "GetUsage": ("get_usage", "unary", usage_pb2.GetUsageResponse),
    "ListAuditEvents": ("list_audit_events", "unary", pb.ListAuditEventsResponse),
}

R = TypeVar("R", bound=Message)


class AdminService:
    def __init__(self, tenancy: TenancyService, max_request_bytes: int, auth: AuthMirror, usage: UsageBuffer) -> None:
        self.tenancy, self.max_request_bytes = tenancy, max_request_bytes
        self.auth, self.usage = auth, usage

    async def _call(self, data: bytes, context: grpc.aio.ServicerContext, request_type: type[R],
                    action: Callable[[Principal, R], Any]) -> Any:
        request = parse(data, request_type, self.max_request_bytes)
        principal = self.auth.authenticate(bearer_token(context))
        try:
            return await asyncio.to_thread(action, principal, request)
        finally:
            await self.auth.refresh()  # a revoked key, a removed grant or a new quota applies to the next request

    async def create_tenant(self, data: bytes, context: grpc.aio.ServicerContext) -> pb.Tenant:
        def act(actor: Principal, r: pb.CreateTenantRequest) -> pb.Tenant:
            update = convert.quota_update(r.quota) if r.HasField("quota") else None
            return convert.tenant(self.tenancy.create_tenant(actor, r.name, list(r.models), update))

        return await self._call(data, context, pb.CreateTenantRequest, act)

    async def list_tenants(self, data: bytes, context: grpc.aio.ServicerContext) -> pb.ListTenantsResponse:
        return await self._call(data, context, pb.ListTenantsRequest, lambda actor, r: pb.ListTenantsResponse(
            tenants=[convert.tenant(t) for t in self.tenancy.list_tenants(actor)]))

    async def delete_tenant(self, data: bytes, context: grpc.aio.ServicerContext) -> pb.DeleteTenantResponse:
        def act(actor: Principal, r: pb.DeleteTenantRequest) -> pb.DeleteTenantResponse:
            self.tenancy.delete_tenant(actor, r.name)
            return pb.DeleteTenantResponse()

        return await self._call(data, context, pb.DeleteTenantRequest, act)

    async def create_api_key(self, data: bytes, context: grpc.aio.ServicerContext) -> pb.CreateApiKeyResponse:
        def act(actor: Principal, r: pb.CreateApiKeyRequest) -> pb.CreateApiKeyResponse:
            created = self.tenancy.create_key(actor, tenant=r.tenant or None, admin=r.admin, description=r.description)
            return pb.CreateApiKeyResponse(key=convert.api_key(created.key), secret=created.secret)

        return await self._call(data, context, pb.CreateApiKeyRequest, act)

    async def list_api_keys(self, data: bytes, context: grpc.aio.ServicerContext) -> pb.ListApiKeysResponse:
        return await self._call(data, context, pb.ListApiKeysRequest, lambda actor, r: pb.ListApiKeysResponse(
            keys=[convert.api_key(k) for k in self.tenancy.list_keys(actor, r.tenant or None)]))

    async def revoke_api_key(self, data: bytes, context: grpc.aio.ServicerContext) -> pb.ApiKey:
        return await self._call(data, context, pb.RevokeApiKeyRequest,
                                lambda actor, r: convert.api_key(self.tenancy.revoke_key(actor, r.id)))

    async def grant_model(self, data: bytes, context: grpc.aio.ServicerContext) -> pb.Tenant:
        return await self._call(data, context, pb.ModelGrantRequest,
                                lambda actor, r: convert.tenant(self.tenancy.grant_model(actor, r.tenant, r.model)))

    async def revoke_model(self, data: bytes, context: grpc.aio.ServicerContext) -> pb.Tenant:
        return await self._call(data, context, pb.ModelGrantRequest,
                                lambda actor, r: convert.tenant(self.tenancy.revoke_model(actor, r.tenant, r.model)))

    async def set_quota(self, data: bytes, context: grpc.aio.ServicerContext) -> pb.Quota:
        return await self._call(data, context, pb.SetQuotaRequest, lambda actor, r: convert.quota(
            self.tenancy.set_quota(actor, r.quota.tenant, convert.quota_update(r.quota))))

    async def get_quota(self, data: bytes, context: grpc.aio.ServicerContext) -> pb.Quota:
        return await self._call(data, context, pb.GetQuotaRequest,
                                lambda actor, r: convert.quota(self.tenancy.get_quota(actor, r.tenant)))

    async def get_usage(self, data: bytes, context: grpc.aio.ServicerContext) -> usage_pb2.GetUsageResponse:
        request = parse(data, usage_pb2.GetUsageRequest, self.max_request_bytes)
        principal = self.auth.authenticate(bearer_token(context))
        require_admin(principal)  # unlike Inference/GetUsage, which serves a tenant its own usage
        await self.usage.flush()
        return await convert.usage(self.tenancy, principal, request)

    async def list_audit_events(self, data: bytes, context: grpc.aio.ServicerContext) -> pb.ListAuditEventsResponse:
        return await self._call(data, context, pb.ListAuditEventsRequest, lambda actor, r: pb.ListAuditEventsResponse(
            events=[convert.audit_event(e) for e in self.tenancy.audit_events(
                actor, since=convert.moment(r, "since"), limit=r.limit)]))
