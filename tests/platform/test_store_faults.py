"""Database faults (locked, every connection taken, server down) answer UNAVAILABLE with a retry-after hint on
every RPC that touches the database, never INTERNAL, and never show the database URL's password."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from conftest import save_tiny_llama
from garrison.serving.background import BackgroundServer
from garrison.serving.config import EngineConfig, ModelDeploymentConfig, ServeConfig
from garrison.tenancy import SYSTEM, TenancyService, database_url
from garrison.tenancy.errors import StoreUnavailableError
from garrison.v1 import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc, usage_pb2
from postgres_server import PostgresServer, throwaway

PASSWORD = "s3cret-Pw-41"


def test_a_locked_database_is_unavailable_with_a_retry_hint(tmp_path: Path) -> None:
    with TenancyService.open(database_url(tmp_path / "data"), sqlite_busy_timeout_s=0.2) as service:
        holder = sqlite3.connect(tmp_path / "data" / "garrison.db", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        for write in (lambda: service.create_tenant(SYSTEM, "acme"), lambda: service.ensure_bootstrap_admin_key(),
                      lambda: service.record_usage("acme", "m", requests=1)):
            with pytest.raises(StoreUnavailableError, match="locked") as info:
                write()
            assert info.value.retry_after_s > 0
        holder.execute("ROLLBACK")
        holder.close()
        service.create_tenant(SYSTEM, "acme")  # the lock gone, it works again


def test_an_exhausted_connection_pool_is_unavailable(tmp_path: Path) -> None:
    url = database_url(tmp_path / "data")
    with TenancyService.open(url, pool_size=1, max_overflow=0, pool_timeout=0.2) as service:
        secret = service.ensure_bootstrap_admin_key().secret
        with service.engine.connect():  # the pool's only connection, taken
            with pytest.raises(StoreUnavailableError, match="connection"):
                service.authenticate(secret)
        assert service.authenticate(secret).admin


# -- a server whose PostgreSQL goes down ------------------------------------------------------------------


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    with throwaway() as server:
        yield server


@pytest.fixture(scope="module")
def served(postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, str]]:
    """A server on that PostgreSQL (its URL with a password), an admin key and a tenant key."""
    root = tmp_path_factory.mktemp("faults")
    url = postgres.url.replace("garrison@", f"garrison:{PASSWORD}@")  # trust auth: any password is accepted
    config = ServeConfig(data_dir=root / "data", listen="127.0.0.1:0", database_url=url,
                         models=(ModelDeploymentConfig("tiny", str(save_tiny_llama(root / "tiny")), on_ray=False,
                                                       engine=EngineConfig(kv_cache_bytes=4 << 20, max_num_seqs=4)),))
    with BackgroundServer(config) as server:
        admin = (root / "data" / "admin.key").read_text().strip()
        tenant = (root / "data" / "tenant.key").read_text().strip()
        yield server.address, admin, tenant


def calls(channel: grpc.Channel) -> dict[str, tuple[object, object, bool]]:
    """Every RPC: (method, request, whether it takes the admin key)."""
    admin, inference = admin_pb2_grpc.AdminStub(channel), inference_pb2_grpc.InferenceStub(channel)
    table: dict[str, tuple[object, object, bool]] = {
        name: (getattr(admin, name), getattr(admin_pb2, request)(), True) for name, request in (
            ("CreateTenant", "CreateTenantRequest"), ("ListTenants", "ListTenantsRequest"),
            ("DeleteTenant", "DeleteTenantRequest"), ("CreateApiKey", "CreateApiKeyRequest"),
            ("ListApiKeys", "ListApiKeysRequest"), ("RevokeApiKey", "RevokeApiKeyRequest"),
            ("GrantModel", "ModelGrantRequest"), ("RevokeModel", "ModelGrantRequest"),
            ("SetQuota", "SetQuotaRequest"), ("GetQuota", "GetQuotaRequest"), ("ListAuditEvents",
                                                                                "ListAuditEventsRequest"))}
    table["Admin/GetUsage"] = (admin.GetUsage, usage_pb2.GetUsageRequest(), True)
    table["Generate"] = (inference.Generate, inference_pb2.GenerateRequest(model="tiny", token_ids=[1, 2],
                                                                           max_tokens=1), False)
    table["Tokenize"] = (inference.Tokenize, inference_pb2.TokenizeRequest(model="tiny", text="hi"), False)
    table["ListModels"] = (inference.ListModels, inference_pb2.ListModelsRequest(), False)
    table["Inference/GetUsage"] = (inference.GetUsage, usage_pb2.GetUsageRequest(), False)
    return table


def outcome(method, request, key: str) -> tuple[grpc.StatusCode, str, dict[str, str]]:
    try:
        answer = method(request, metadata=(("authorization", f"Bearer {key}"),), timeout=60)
        if hasattr(answer, "__iter__") and not hasattr(answer, "ListFields"):
            list(answer)
        return grpc.StatusCode.OK, "", {}
    except grpc.RpcError as err:
        return err.code(), err.details() or "", dict(err.trailing_metadata() or ())


# Inference needs no database round trip (keys and tenants are mirrored in the gateway, usage is buffered and
# spooled): it goes on while the database is down. Everything that reads or writes the database waits for it.
SERVED_WITHOUT_THE_DATABASE = {"Generate", "Tokenize", "ListModels"}


def test_every_rpc_answers_unavailable_with_a_hint_while_the_database_is_down(served, postgres) -> None:
    address, admin_key, tenant_key = served
    with grpc.insecure_channel(address) as channel:
        table = calls(channel)
        assert outcome(*table["ListTenants"][:2], admin_key)[0] == grpc.StatusCode.OK
        postgres.stop()
        try:
            time.sleep(1.0)  # the gateway's mirror of keys and tenants has noticed
            for name, (method, request, admin) in table.items():
                code, details, trailers = outcome(method, request, admin_key if admin else tenant_key)
                if name in SERVED_WITHOUT_THE_DATABASE:  # answered as usual (the tiny model has no tokenizer)
                    assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT), (name, code, details)
                    continue
                assert code == grpc.StatusCode.UNAVAILABLE, (name, code, details)
                assert float(trailers["retry-after"]) > 0 and "retry" in details, (name, details, trailers)
                assert PASSWORD not in details and "127.0.0.1" not in details, (name, details)
        finally:
            postgres.start()
        deadline = time.monotonic() + 30
        while outcome(*table["ListTenants"][:2], admin_key)[0] != grpc.StatusCode.OK:  # back without a restart
            assert time.monotonic() < deadline, "the server did not recover when the database came back"
            time.sleep(0.5)
        assert outcome(*table["Generate"][:2], tenant_key)[0] == grpc.StatusCode.OK
