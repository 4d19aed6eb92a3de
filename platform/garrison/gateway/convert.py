"""Between the tenancy library's records and garrison.v1 messages (the library never sees protobuf)."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone

from google.protobuf.timestamp_pb2 import Timestamp

from garrison.router.router import Deployment
from garrison.tenancy import records
from garrison.tenancy.errors import InvalidArgumentError
from garrison.tenancy.records import Principal, QuotaUpdate
from garrison.tenancy.service import TenancyService
from garrison.v1 import admin_pb2, inference_pb2, usage_pb2
from garrison_workers.engine_core import ReplicaState

QUOTA_FIELDS = ("max_concurrent_requests", "tokens_per_minute", "max_prompt_tokens", "max_new_tokens",
                "priority_weight")


def timestamp(moment: datetime | None) -> Timestamp | None:
    if moment is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


# What a Timestamp may hold (google/protobuf/timestamp.proto): 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z.
MIN_SECONDS, MAX_SECONDS = -62_135_596_800, 253_402_300_799


def moment(message: object, field: str) -> datetime | None:
    """A Timestamp field as an aware UTC datetime, or None when unset."""
    if not message.HasField(field):  # type: ignore[attr-defined]
        return None
    stamp = getattr(message, field)
    if not (MIN_SECONDS <= stamp.seconds <= MAX_SECONDS and 0 <= stamp.nanos <= 999_999_999):
        raise InvalidArgumentError(f"{field} must be a time from 0001-01-01 to 9999-12-31 UTC (seconds "
                                   f"{MIN_SECONDS}..{MAX_SECONDS}, nanos 0..999999999), got seconds={stamp.seconds} "
                                   f"nanos={stamp.nanos}")
    return stamp.ToDatetime(tzinfo=timezone.utc)


REPLICA_STATES = {ReplicaState.SERVING: inference_pb2.REPLICA_STATE_SERVING,
                  ReplicaState.RESTARTING: inference_pb2.REPLICA_STATE_RESTARTING,
                  ReplicaState.UNPLACEABLE: inference_pb2.REPLICA_STATE_UNPLACEABLE,
                  ReplicaState.DRAINING: inference_pb2.REPLICA_STATE_DRAINING,
                  ReplicaState.STOPPED: inference_pb2.REPLICA_STATE_STOPPED}


def model_info(deployment: Deployment) -> inference_pb2.ModelInfo:
    config = deployment.model_config
    replicas = [inference_pb2.ReplicaStatus(name=s.name, state=REPLICA_STATES[s.state], detail=s.detail,
                                            restarts=s.restarts) for s in (r.status for r in deployment.replicas)]
    return inference_pb2.ModelInfo(name=deployment.name, max_context_tokens=deployment.max_model_len,
                                   architecture=config.architecture, num_experts=config.num_experts,
                                   replicas=replicas)


def quota(q: records.Quota) -> admin_pb2.Quota:
    return admin_pb2.Quota(tenant=q.tenant, **{name: getattr(q, name) for name in QUOTA_FIELDS})


def quota_update(message: admin_pb2.Quota) -> QuotaUpdate:
    return QuotaUpdate(**{name: getattr(message, name) for name in QUOTA_FIELDS if message.HasField(name)})


def tenant(t: records.Tenant) -> admin_pb2.Tenant:
    return admin_pb2.Tenant(name=t.name, created_at=timestamp(t.created_at), models=t.models, quota=quota(t.quota))


def api_key(k: records.ApiKey) -> admin_pb2.ApiKey:
    return admin_pb2.ApiKey(id=k.id, tenant=k.tenant or "", admin=k.admin, description=k.description,
                            created_at=timestamp(k.created_at), revoked_at=timestamp(k.revoked_at))


def audit_event(e: records.AuditEvent) -> admin_pb2.AuditEvent:
    return admin_pb2.AuditEvent(id=e.id, time=timestamp(e.time), actor=e.actor, action=e.action, target=e.target,
                                detail=e.detail)


async def usage(tenancy: TenancyService, principal: Principal,
                request: usage_pb2.GetUsageRequest) -> usage_pb2.GetUsageResponse:
    rows = await asyncio.to_thread(tenancy.usage, principal, tenant=request.tenant or None,
                                   model=request.model or None, since=moment(request, "since"),
                                   until=moment(request, "until"))
    return usage_pb2.GetUsageResponse(rows=[
        usage_pb2.UsageRow(tenant=r.tenant, model=r.model, hour=timestamp(r.hour), requests=r.requests,
                           prompt_tokens=r.prompt_tokens, output_tokens=r.output_tokens,
                           rejected_requests=r.rejected_requests) for r in rows])
