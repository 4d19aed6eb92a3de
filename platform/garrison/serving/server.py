"""The server `garrison serve` runs: tenant store, telemetry, model replicas and the gRPC services.

Start order: the checks of the surroundings (ports, files, models: garrison.serving.preflight), the data
directory and tenant store (migrated), the usage the last run could not write (its spool), telemetry, the
model replicas (the slow part), the bootstrap keys, and last the gRPC port, so a client that connects finds
everything ready. Stop order is the reverse; in-flight streams get `grace` seconds to finish.
"""

from __future__ import annotations

import asyncio
import functools
import os
import socket
import uuid
from collections import Counter
import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.sdk.trace.export import SpanExporter

from garrison.gateway import admin, inference
from garrison.gateway.calls import CallLimit, method_handlers
from garrison.gateway.hot_path import AuthMirror, UsageBuffer
from garrison.gateway.render import ChatRenderer
from garrison.paths import ensure_private_dir
from garrison.router.discovery import Discovery
from garrison.router.router import Router
from garrison.secret_files import write_secret_file
from garrison.serving import preflight
from garrison.serving.cluster_watch import ray_answers, watch_cluster
from garrison.serving.controller import Controller, find_cores, needs_ray, ray_namespace, ray_ranks
from garrison_workers.worker_group import ensure_ray
from garrison.serving.config import ConfigError, ServeConfig
from garrison.telemetry import Telemetry
from garrison.tenancy.errors import AlreadyExistsError, StoreUnavailableError
from garrison.tenancy.keys import read_key_file
from garrison.tenancy.ledger import SPOOL_FILE
from garrison.tenancy.shared_limits import LocalQuotas, Quotas, SharedQuotas
from garrison.tenancy.records import SYSTEM, QuotaUpdate
from garrison.tenancy.service import TenancyService
from garrison.v1 import admin_pb2, inference_pb2
from garrison_workers.engine_core import ReplicaState

log = logging.getLogger(__name__)

ADMIN_KEY_FILE = "admin.key"
TENANT_KEY_FILE = "tenant.key"
BOOTSTRAP_TENANT = "default"
REPLICA_WATCH_S = 0.5
# The bootstrap tenant's limits: one person trying the embedded default, or a script that runs away. 16 streams
# at once is half the embedded engine's 32 slots, so a tenant created next still finds room; 200k tokens a
# minute is more than SmolLM2 on a CPU (or a small model on one GPU) produces, so a person never meets it,
# while a loop that floods the server is held to it; 4096 new tokens caps one answer at a long page, which
# no chat turn needs more of. Prompts are bounded by the model's context. `garrison quota set default` changes them.
BOOTSTRAP_QUOTA = QuotaUpdate(max_concurrent_requests=16, tokens_per_minute=200_000, max_new_tokens=4096)


@dataclass(slots=True, frozen=True)
class Bootstrap:
    """Key files written at this start (first start only), for the operator to pick up."""

    admin_key_file: Path | None = None
    tenant_key_file: Path | None = None


class GarrisonServer:
    def __init__(self, config: ServeConfig, span_exporter: SpanExporter | None = None,
                 run_controller: bool = True) -> None:
        """`run_controller`: start the engines here (`garrison serve`); False: a gateway that streams from the
        engine cores a controller runs on the Ray cluster (`garrison gateway`)."""
        self.config = config
        self.run_controller = run_controller
        self.controller: Controller | None = None
        self.discovery: Discovery | None = None
        self.client = f"gateway-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._span_exporter = span_exporter
        self.tenancy: TenancyService | None = None
        self.telemetry: Telemetry | None = None
        self.router: Router | None = None
        self.quotas: Quotas = LocalQuotas()
        self.inference: inference.InferenceService | None = None
        self.auth: AuthMirror | None = None
        self.usage: UsageBuffer | None = None
        self.renderer: ChatRenderer | None = None
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        self._health_server: grpc.aio.Server | None = None
        self.port = 0
        self.health_port = 0  # of gateway.health_listen; 0: none
        self._watcher: asyncio.Task[None] | None = None
        self.bootstrap = Bootstrap()
        self._started_ray = False
        self._cluster_watch: asyncio.Task[str] | None = None  # a cluster's: returns once the cluster is gone

    async def start(self) -> None:
        config = self.config
        found = await asyncio.to_thread(preflight.problems, config)
        if found:
            raise ConfigError.listing(found)
        ensure_private_dir(config.data_dir)
        self.tenancy = await asyncio.to_thread(TenancyService.open, config.resolved_database_url)
        self.usage = UsageBuffer(self.tenancy, config.data_dir / SPOOL_FILE)
        if self.usage.replay_spool():
            with contextlib.suppress(StoreUnavailableError):  # kept, and retried once serving
                await self.usage.flush()
        await asyncio.to_thread(self.tenancy.prune_usage_batches)
        self.telemetry = Telemetry(config.telemetry, self._span_exporter)
        if needs_ray(config) or not self.run_controller:
            # On this thread: Ray installs its signal handlers only from the main thread.
            self._started_ray = ensure_ray(config.ray_address, min_cpus=ray_ranks(config))
        namespace = ray_namespace(config)
        if self.run_controller:
            self.controller = Controller(config, namespace, detached=config.ray_address is not None)
            await asyncio.to_thread(self.controller.start)
            find = self.controller.links
        else:
            find = functools.partial(find_cores, namespace)
        if config.ray_address is not None:  # a cluster: its gateways admit through one set of limits
            self.quotas = SharedQuotas(namespace, self.client).start()
        self.router = Router()
        self.discovery = Discovery(self.router, find, self.client, {m.name: m.replicas for m in config.models})
        await self.discovery.start()
        self.telemetry.observe_load(self._load_rows)
        self.bootstrap = await asyncio.to_thread(self._bootstrap_keys)
        self.auth = AuthMirror(self.tenancy)
        await self.auth.start()
        self.usage.start()
        # A chat's text: the messages (at most a request's bytes) and the template's own markup around each.
        self.renderer = ChatRenderer(max_chars=4 * config.max_request_bytes)
        await self.renderer.start()
        self.inference = inference.InferenceService(self.tenancy, self.quotas, self.router, self.telemetry,
                                                    config.max_request_bytes, self.auth, self.usage, self.renderer)
        self._server = self._grpc_server()
        self._health_server = self._health_only_server()
        await self._server.start()
        if self._health_server is not None:
            await self._health_server.start()
        for service in (admin.SERVICE, ""):
            await self._set_health(service, health_pb2.HealthCheckResponse.SERVING)
        await self._watch_replicas_once({})
        self._watcher = asyncio.get_running_loop().create_task(self._watch_replicas())
        if config.ray_address is not None:
            self._cluster_watch = asyncio.get_running_loop().create_task(
                watch_cluster(ray_answers, config.cluster_lost_seconds))

    async def lost(self) -> str:
        """Return (why, in words) once the Ray cluster of a cluster's process is gone: it can never serve again.
        Never returns on a local instance."""
        if self._cluster_watch is None:
            await asyncio.Event().wait()
        assert self._cluster_watch is not None
        return await asyncio.shield(self._cluster_watch)

    async def _watch_replicas(self) -> None:
        """Health follows the replicas: `garrison.v1.Inference/<model>` serves while one of the model's replicas
        does, `garrison.v1.Inference` while any model serves; a replica serving again lets queued requests go."""
        serving: dict[str, bool] = {}
        while True:
            await asyncio.sleep(REPLICA_WATCH_S)
            try:
                serving = await self._watch_replicas_once(serving)
            except Exception:  # never let health stop following the replicas
                log.exception("could not update health from the replicas")

    async def _watch_replicas_once(self, before: dict[str, bool]) -> dict[str, bool]:
        assert self.router is not None
        now = {name: any(r.serving for r in d.replicas) for name, d in self.router.deployments.items()}
        for name, up in now.items():
            if before.get(name) != up:
                await self._set_health(f"{inference.SERVICE}/{name}", _health_status(up))
        if any(now.values()) != any(before.values()) or not before:
            await self._set_health(inference.SERVICE, _health_status(any(now.values())))
        return now

    def _grpc_server(self) -> grpc.aio.Server:
        config = self.config
        # gRPC's own size limit would answer RESOURCE_EXHAUSTED; ours (in calls.parse) answers INVALID_ARGUMENT.
        limit = config.max_request_bytes + (1 << 20)
        # No SO_REUSEPORT: a second server on a busy port must fail, not silently share its traffic.
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit),
                                          ("grpc.max_send_message_length", 64 << 20), ("grpc.so_reuseport", 0)])
        assert self.inference is not None and self.tenancy is not None
        limit = CallLimit(config.gateway.max_concurrent_rpcs)
        admin_service = admin.AdminService(self.tenancy, config.max_request_bytes, self.auth, self.usage)
        server.add_generic_rpc_handlers((
            grpc.method_handlers_generic_handler(inference.SERVICE,
                                                 method_handlers(self.inference, inference.METHODS, limit)),
            grpc.method_handlers_generic_handler(admin.SERVICE, method_handlers(admin_service, admin.METHODS, limit)),
        ))
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection((
            inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
            admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME), server)
        if config.tls is None:
            self.port = server.add_insecure_port(config.listen)
        else:
            self.port = server.add_secure_port(config.listen, _server_credentials(config))
        if self.port == 0:
            raise ConfigError(f"cannot listen on {config.listen}: the address is in use or not local")
        return server

    def _health_only_server(self) -> grpc.aio.Server | None:
        """gateway.health_listen: the health service, plaintext, alone on a port of its own, for probes that cannot
        speak TLS (Kubernetes'). It is the main port's servicer, so both answer the same states, drain included."""
        listen = self.config.gateway.health_listen
        if listen is None:
            return None
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        self.health_port = server.add_insecure_port(listen)
        if self.health_port == 0:
            raise ConfigError(f"cannot listen on {listen} (gateway.health_listen): the address is in use or not local")
        return server

    def _bootstrap_keys(self) -> Bootstrap:
        assert self.tenancy is not None and self.router is not None
        data_dir = self.config.data_dir
        admin_file = tenant_file = None
        if self.config.admin_key_file is not None:
            self._provision_admin_key(self.config.admin_key_file)
        created = self.tenancy.ensure_bootstrap_admin_key()
        if created is not None:
            admin_file = _write_secret(data_dir / ADMIN_KEY_FILE, created.secret)
        if self.config.bootstrap and not self.tenancy.list_tenants(SYSTEM):
            models = [model.name for model in self.config.models]
            try:
                self.tenancy.create_tenant(SYSTEM, BOOTSTRAP_TENANT, models, BOOTSTRAP_QUOTA)
            except AlreadyExistsError:  # gateways starting together: the first one made it and wrote its key
                return Bootstrap(admin_file, None)
            key = self.tenancy.create_key(SYSTEM, tenant=BOOTSTRAP_TENANT, description="embedded default tenant")
            tenant_file = _write_secret(data_dir / TENANT_KEY_FILE, key.secret)
        return Bootstrap(admin_file, tenant_file)

    def _provision_admin_key(self, path: Path) -> None:
        assert self.tenancy is not None
        key = self.tenancy.ensure_admin_key(read_key_file(path), description=f"from admin_key_file {path}")
        if key.revoked_at is not None:
            log.warning("the admin key %s in %s was revoked; it stays revoked: put a new secret there "
                        "(garrison keys new-secret)", key.id, path)

    def _load_rows(self):  # type: ignore[no-untyped-def]
        router = self.router
        if router is None:
            return []
        rows = []
        for name in router.deployments:
            load = router.load(name)
            usage = load.kv_blocks_used / load.kv_blocks_total if load.kv_blocks_total else 0.0
            rows.append(({"model": name}, {"queue_depth": load.queued, "kv_cache_usage": usage}))
            states = Counter(replica.status.state for replica in router.deployments[name].replicas)
            states[ReplicaState.RESTARTING] += max(0, router.deployments[name].expected_replicas
                                                   - len(router.deployments[name].replicas))
            rows += [({"model": name, "state": state.value}, {"replicas": states[state]}) for state in ReplicaState]
            rows += [({"model": name, "tenant": t}, {"in_flight": n}) for t, n in load.in_flight_by_tenant.items()]
        return rows

    async def _set_health(self, service: str, status: int) -> None:
        result = self._health.set(service, status)
        if asyncio.iscoroutine(result):
            await result

    async def wait(self) -> None:
        assert self._server is not None
        await self._server.wait_for_termination()

    async def drain(self, seconds: float) -> None:
        """Take no new streams (UNAVAILABLE with a retry hint; health says NOT_SERVING, so load balancers move on)
        and give those running up to `seconds` to finish."""
        if self.inference is None:
            return
        self.inference.draining = True
        if self._watcher is not None:  # health now says draining, whatever the replicas do
            self._watcher.cancel()
            self._watcher = None
        await self._set_health("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._set_health(inference.SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        deadline = asyncio.get_running_loop().time() + seconds
        while self.inference.streams and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)

    async def stop(self, grace: float = 5.0) -> None:
        for task in (self._watcher, self._cluster_watch):
            if task is not None:
                task.cancel()
        self._watcher = self._cluster_watch = None
        for service in (inference.SERVICE, admin.SERVICE, "", *(f"{inference.SERVICE}/{name}" for name in (
                self.router.deployments if self.router is not None else ()))):
            await self._set_health(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self._server is not None:
            await self._server.stop(grace)
        if self._health_server is not None:
            await self._health_server.stop(0)
        if self.usage is not None:
            await asyncio.sleep(0)  # handlers cancelled at the end of the grace record their usage first
            await self.usage.stop()
        if self.auth is not None:
            await self.auth.stop()
        await self.quotas.stop()
        if self.renderer is not None:
            await self.renderer.stop()
        if self.discovery is not None:
            await self.discovery.stop()
        if self.controller is not None:
            await asyncio.to_thread(self.controller.stop, True)
        if self._started_ray:
            import ray

            ray.shutdown()
            self._started_ray = False
        if self.telemetry is not None:
            self.telemetry.shutdown()
        if self.tenancy is not None:
            self.tenancy.close()


def _health_status(serving: bool) -> int:
    return health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING


def _server_credentials(config: ServeConfig) -> grpc.ServerCredentials:
    tls = config.tls
    assert tls is not None
    try:
        key, cert = tls.key.read_bytes(), tls.cert.read_bytes()
        ca = tls.client_ca.read_bytes() if tls.client_ca else None
    except OSError as err:
        raise ConfigError(f"cannot read a TLS file: {err.filename}: {err.strerror}") from None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def _write_secret(path: Path, secret: str) -> Path:
    """A key file readable by its owner only, never written through a symlink (garrison.secret_files)."""
    return write_secret_file(path, (secret + "\n").encode("ascii"), replace=True)
