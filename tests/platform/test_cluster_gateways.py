"""The cluster form: one controller and several stateless gateway processes on one Ray cluster and one PostgreSQL.

A real Ray cluster (ray.cluster_utils: its own GCS and raylet processes), a real PostgreSQL (make test starts
one; without GARRISON_TEST_POSTGRES_URL these tests skip), `garrison controller` and `garrison gateway` as the
processes a platform team runs, and gRPC clients in this process. The model is a tiny Llama in a directory.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import ray
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from ray.cluster_utils import Cluster

from conftest import postgres_schema_url, save_tiny_llama, wait_until
from garrison.client import GarrisonClient
from garrison.v1 import admin_pb2
from garrison.v1 import inference_pb2 as pb
from garrison.v1 import inference_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
MODEL = "tiny"
MAX_TOKENS = 16


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def healthy(address: str, service: str = "", timeout: float = 0.5) -> bool:
    try:
        with grpc.insecure_channel(address) as channel:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                               timeout=timeout)
        return answer.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


@dataclass
class Process:
    """A `garrison` subprocess (controller or gateway), with the code under test on its path."""

    argv: list[str]
    log: Path
    handle: subprocess.Popen | None = None

    def start(self) -> "Process":
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        with self.log.open("ab") as out:
            self.handle = subprocess.Popen([sys.executable, "-m", "garrison.cli", *self.argv], env=env, stdout=out,
                                           stderr=subprocess.STDOUT, cwd=ROOT)
        return self

    def signal(self, sig: int) -> None:
        assert self.handle is not None
        self.handle.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.handle is not None
        return self.handle.wait(timeout)

    def stop(self) -> None:
        if self.handle is not None and self.handle.poll() is None:
            self.handle.kill()
            self.handle.wait(30)


@dataclass
class Deployment:
    directory: Path
    config: dict
    address: str  # the Ray cluster's
    controller_metrics: str  # HOST:PORT of the controller's /metrics
    gateways: list[Process] = field(default_factory=list)
    addresses: list[str] = field(default_factory=list)  # of the gateways that serve

    def gateway(self, name: str) -> tuple[Process, str]:
        """Start a gateway with a data directory and a port of its own; (process, its gRPC address) once serving."""
        port, data = free_port(), self.directory / f"data-{name}"
        data.mkdir(mode=0o700)
        config = dict(self.config, listen=f"127.0.0.1:{port}", data_dir=str(data))
        path = self.directory / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        process = Process(["gateway", "--config", str(path)], self.directory / f"{name}.log").start()
        self.gateways.append(process)
        address = f"127.0.0.1:{port}"
        wait_until(lambda: healthy(address, "garrison.v1.Inference") or process.handle.poll() is not None, 120)
        assert process.handle.poll() is None, (self.directory / f"{name}.log").read_text()[-3000:]
        self.addresses.append(address)
        return process, address

    def admin(self, address: str) -> GarrisonClient:
        return GarrisonClient(address, key_file=self.directory / "admin.key")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory) -> Iterator[Deployment]:
    with postgres_schema_url() as database_url:
        if database_url is None:
            pytest.skip("the multi-gateway tests run on PostgreSQL: set GARRISON_TEST_POSTGRES_URL (make test does)")
        directory = tmp_path_factory.mktemp("cluster")
        cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 4})
        controller, deployment = None, None
        try:
            secret = subprocess.run([sys.executable, "-m", "garrison.cli", "keys", "new-secret"], capture_output=True,
                                    text=True, check=True, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
            key_file = directory / "admin.key"
            key_file.write_text(secret.stdout.split()[0] + "\n")
            key_file.chmod(0o600)
            health = f"127.0.0.1:{free_port()}"
            config = {"ray_address": cluster.address, "ray_namespace": f"test-{uuid.uuid4().hex[:8]}",
                      "database_url": database_url, "admin_key_file": str(key_file),
                      "controller": {"health_listen": health},
                      "gateway": {"drain_seconds": 30},
                      "models": [{"name": MODEL, "source": str(save_tiny_llama(directory / "tiny", eos_token_id=None)),
                                  "engine": {"block_size": 4, "num_kv_blocks": 512, "max_num_seqs": 16,
                                             "max_num_batched_tokens": 64, "worker_threads": 1}}]}
            metrics = f"127.0.0.1:{free_port()}"  # the controller's only: each gateway would need a port of its own
            (directory / "controller.yaml").write_text(yaml.safe_dump(dict(
                config, data_dir=str(directory / "c"), telemetry={"prometheus_listen": metrics})))
            controller = Process(["controller", "--config", str(directory / "controller.yaml"), "--stop-engines"],
                                 directory / "controller.log").start()
            wait_until(lambda: healthy(health) or controller.handle.poll() is not None, 300)
            assert controller.handle.poll() is None, (directory / "controller.log").read_text()[-3000:]
            ray.init(address=cluster.address, namespace=config["ray_namespace"], log_to_driver=False)
            deployment = Deployment(directory, config, cluster.address, metrics)
            yield deployment
        finally:
            for gateway in deployment.gateways if deployment is not None else ():
                gateway.stop()
            if ray.is_initialized():
                ray.shutdown()
            if controller is not None:
                controller.signal(signal.SIGTERM)
                try:
                    controller.wait(60)
                finally:
                    controller.stop()
            cluster.shutdown()


@pytest.fixture(scope="module")
def two_gateways(deployment: Deployment) -> list[str]:
    return [deployment.gateway("a")[1], deployment.gateway("b")[1]]


def new_tenant(deployment: Deployment, address: str, **limits) -> str:
    """A tenant and its key, made through `address`; known to every running gateway (within a second) when this
    returns."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    with deployment.admin(address) as admin:
        admin.admin.create_tenant(name=name, models=[MODEL], quota=admin_pb2.Quota(tenant=name, **limits))
        key = admin.admin.create_api_key(tenant=name).secret
    for gateway in deployment.addresses:
        wait_until(lambda: knows(gateway, key), timeout=1.0, poll=0.02)
    return key


def knows(address: str, key: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            inference_pb2_grpc.InferenceStub(channel).ListModels(
                pb.ListModelsRequest(), metadata=(("authorization", f"Bearer {key}"),), timeout=10)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.UNAUTHENTICATED:
                raise
            return False
    return True


def generate(address: str, key: str, max_tokens: int = MAX_TOKENS) -> list[int]:
    with grpc.insecure_channel(address) as channel:
        pieces = inference_pb2_grpc.InferenceStub(channel).Generate(
            pb.GenerateRequest(model=MODEL, token_ids=[5, 6, 7, 8], max_tokens=max_tokens),
            metadata=(("authorization", f"Bearer {key}"),), timeout=120)
        return [t for piece in pieces for t in piece.token_ids]


def test_gateways_find_the_one_replica_and_load_no_model(deployment: Deployment, two_gateways: list[str]) -> None:
    key = new_tenant(deployment, two_gateways[0])
    assert generate(two_gateways[0], key) == generate(two_gateways[1], key)  # the same replica, the same tokens
    cores = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == deployment.config["ray_namespace"] and a["name"].startswith("core/")]
    assert cores == [f"core/{MODEL}/0"]


def test_the_controller_exports_its_replicas_on_metrics(deployment: Deployment) -> None:
    """`garrison controller` serves /metrics on telemetry.prometheus_listen: the model's one replica serving, none
    in another state, no core restarted (the chart's PodMonitor scrapes this; the alerts read garrison_replicas)."""
    with urllib.request.urlopen(f"http://{deployment.controller_metrics}/metrics", timeout=10) as page:
        families = {f.name: f for f in text_string_to_metric_families(page.read().decode())}
    replicas = {s.labels["state"]: s.value for s in families["garrison_replicas"].samples
                if s.labels["model"] == MODEL}
    assert replicas == {"serving": 1, "restarting": 0, "unplaceable": 0, "draining": 0, "stopped": 0}
    [restarts] = [s for s in families["garrison_replica_restarts"].samples
                  if s.name == "garrison_replica_restarts_total" and s.labels["model"] == MODEL]
    assert restarts.value == 0


def test_a_revoked_key_is_refused_by_every_gateway_within_a_second(deployment: Deployment,
                                                                    two_gateways: list[str]) -> None:
    key = new_tenant(deployment, two_gateways[0])
    for address in two_gateways:
        assert len(generate(address, key, max_tokens=1)) == 1
    with deployment.admin(two_gateways[0]) as admin:
        admin.admin.revoke_api_key(id=key[:11])
    revoked = time.monotonic()
    for address in two_gateways:
        def refused() -> bool:
            try:
                generate(address, key, max_tokens=1)
            except grpc.RpcError as err:
                return err.code() == grpc.StatusCode.UNAUTHENTICATED
            return False

        wait_until(refused, timeout=5, poll=0.02)
        print(f"{address}: refused {time.monotonic() - revoked:.3f} s after the revocation")
        assert time.monotonic() - revoked < 1.0


@dataclass
class Flood:
    """Streams of one tenant through several gateways; how many were streaming at once, seen from the clients."""

    streaming: int = 0
    most: int = 0
    completed: int = 0
    refused: int = 0
    calls: list[tuple[float, int]] = field(default_factory=list)  # (start, prompt + output tokens) of completed

    async def stream(self, address: str, key: str, until: float) -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            while time.monotonic() < until:
                started, received, usage = time.monotonic(), 0, None
                try:
                    async for piece in stub.Generate(pb.GenerateRequest(model=MODEL, token_ids=[5, 6, 7, 8],
                                                                        max_tokens=MAX_TOKENS),
                                                     metadata=(("authorization", f"Bearer {key}"),)):
                        if received == 0:
                            self.streaming += 1
                            self.most = max(self.most, self.streaming)
                        received += len(piece.token_ids)
                        usage = piece.usage if piece.HasField("usage") else usage
                except grpc.aio.AioRpcError as err:
                    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (err.code(), err.details())
                    self.refused += 1
                    await asyncio.sleep(0.05)
                    continue
                finally:
                    if received:
                        self.streaming -= 1
                self.completed += 1
                assert usage is not None
                self.calls.append((started, usage.prompt_tokens + usage.output_tokens))


def core_in_flight(deployment: Deployment, tenant_key: str) -> int:
    """The tenant's requests in the replica's engine, as the core's own load snapshot says."""
    core = ray.get_actor(f"core/{MODEL}/0", namespace=deployment.config["ray_namespace"])
    load = ray.get(core.poll.remote("test-observer", 0.0)).load
    return sum(n for tenant, n in load.in_flight_by_tenant.items() if tenant.startswith("t-"))


def test_a_tenants_concurrency_limit_holds_across_both_gateways(deployment: Deployment,
                                                                 two_gateways: list[str]) -> None:
    """max_concurrent_requests 8, flooded by 12 streams through each gateway for 15 s: never more than 8 streaming,
    counted by the clients, nor admitted by the replica's core; and the limit is reached."""
    key = new_tenant(deployment, two_gateways[0], max_concurrent_requests=8)
    flood, seen_by_core = Flood(), []

    async def main() -> None:
        until = time.monotonic() + 15
        streams = [asyncio.create_task(flood.stream(a, key, until)) for a in two_gateways for _ in range(12)]
        while time.monotonic() < until:
            seen_by_core.append(await asyncio.to_thread(core_in_flight, deployment, key))
            await asyncio.sleep(0.05)
        await asyncio.gather(*streams)

    asyncio.run(main())
    print(f"most streaming {flood.most}, most in the core {max(seen_by_core)}, {flood.completed} completed, "
          f"{flood.refused} refused")
    assert flood.most <= 8 and max(seen_by_core) <= 8
    assert flood.most == 8 and flood.refused > 0 and flood.completed > 50


@pytest.mark.slow
def test_tokens_per_minute_hold_across_both_gateways(deployment: Deployment, two_gateways: list[str]) -> None:
    """tokens_per_minute 6000 (prompt plus output tokens), flooded through both gateways for a minute and more: what
    the calls that started in the first minute were served is the limit, within 10%."""
    limit = 6000
    key = new_tenant(deployment, two_gateways[0], tokens_per_minute=limit)
    flood = Flood()

    async def main() -> None:
        until = time.monotonic() + 65
        await asyncio.gather(*(flood.stream(a, key, until) for a in two_gateways for _ in range(6)))

    began = time.monotonic()
    asyncio.run(main())
    first_minute = sum(tokens for start, tokens in flood.calls if start < began + 60)
    print(f"tokens served to calls started in the first minute: {first_minute} (limit {limit}); "
          f"{flood.completed} completed, {flood.refused} refused")
    assert 0.9 * limit <= first_minute <= 1.1 * limit


def test_killing_a_gateway_leaves_the_other_streaming_and_a_new_one_serves_within_10_s(
        deployment: Deployment) -> None:
    doomed, doomed_address = deployment.gateway("doomed")
    _, survivor = deployment.gateway("survivor")
    key = new_tenant(deployment, survivor)
    expected = generate(survivor, key, max_tokens=200)
    outcomes: dict[str, list[int] | str] = {}

    async def main() -> None:
        async def stream(name: str, address: str) -> None:
            tokens: list[int] = []
            try:
                async with grpc.aio.insecure_channel(address) as channel:
                    async for piece in inference_pb2_grpc.InferenceStub(channel).Generate(
                            pb.GenerateRequest(model=MODEL, token_ids=[5, 6, 7, 8], max_tokens=200),
                            metadata=(("authorization", f"Bearer {key}"),)):
                        tokens += piece.token_ids
                outcomes[name] = tokens
            except grpc.aio.AioRpcError as err:
                outcomes[name] = err.code().name

        streams = [asyncio.create_task(stream(f"{side}-{i}", address)) for i in range(4)
                   for side, address in (("doomed", doomed_address), ("survivor", survivor))]
        await asyncio.sleep(0.5)
        doomed.signal(signal.SIGKILL)
        deployment.addresses.remove(doomed_address)
        await asyncio.gather(*streams)

    asyncio.run(main())
    assert all(outcomes[f"survivor-{i}"] == expected for i in range(4)), outcomes
    assert all(outcomes[f"doomed-{i}"] == "UNAVAILABLE" for i in range(4)), outcomes
    began = time.monotonic()
    _, restarted = deployment.gateway("restarted")
    assert generate(restarted, key) == expected[:MAX_TOKENS]
    serving_s = time.monotonic() - began
    print(f"a new gateway served {serving_s:.1f} s after its process started")
    assert serving_s < 10


def test_sigterm_drains_a_gateway(deployment: Deployment) -> None:
    """20 streams in flight at SIGTERM all finish; a new stream meanwhile is refused with UNAVAILABLE and a
    retry hint; the gateway then exits by itself."""
    draining, address = deployment.gateway("draining")
    key = new_tenant(deployment, address)
    expected = generate(address, key, max_tokens=200)
    outcomes: list[list[int] | str] = []
    refusal: list[tuple[str, str, str | None]] = []

    async def main() -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            metadata = (("authorization", f"Bearer {key}"),)

            async def stream() -> None:
                tokens: list[int] = []
                try:
                    async for piece in stub.Generate(pb.GenerateRequest(model=MODEL, token_ids=[5, 6, 7, 8],
                                                                        max_tokens=200), metadata=metadata):
                        tokens += piece.token_ids
                    outcomes.append(tokens)
                except grpc.aio.AioRpcError as err:
                    outcomes.append(err.code().name)

            streams = [asyncio.create_task(stream()) for _ in range(20)]
            await asyncio.sleep(0.5)
            draining.signal(signal.SIGTERM)
            deployment.addresses.remove(address)
            await asyncio.sleep(0.3)
            try:
                async for _ in stub.Generate(pb.GenerateRequest(model=MODEL, token_ids=[1], max_tokens=1),
                                             metadata=metadata):
                    pass
            except grpc.aio.AioRpcError as err:
                refusal.append((err.code().name, err.details() or "", dict(err.trailing_metadata() or ()).get(
                    "retry-after")))
            await asyncio.gather(*streams)

    asyncio.run(main())
    assert outcomes == [expected] * 20
    assert refusal and refusal[0][0] == "UNAVAILABLE" and "retry" in refusal[0][1] and refusal[0][2], refusal
    assert draining.wait(60) == 0


@pytest.mark.slow  # ~50 s (waits out cluster_lost_seconds): a cluster fault, with the slow checks CI runs
def test_a_controller_and_a_gateway_that_lose_their_ray_cluster_exit_for_their_supervisor(
        deployment: Deployment) -> None:
    """A Ray driver whose cluster is gone waits for ever in Ray's calls (and Ray spins a core meanwhile), and never
    reconnects to a new head: the controller and the gateway notice that the cluster has not answered for
    cluster_lost_seconds and exit with status 1, saying why, instead of living on as processes that can never
    serve again (a gateway's liveness probe would still pass)."""
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 2})
    config = dict(deployment.config, ray_address=cluster.address, cluster_lost_seconds=3,
                  ray_namespace=f"orphan-{uuid.uuid4().hex[:8]}",
                  controller={"health_listen": f"127.0.0.1:{free_port()}"})
    processes: dict[str, Process] = {}
    try:
        port = free_port()
        for command in ("controller", "gateway"):
            name = f"orphan-{command}"
            (deployment.directory / name).mkdir(mode=0o700)
            (deployment.directory / f"{name}.yaml").write_text(yaml.safe_dump(dict(
                config, data_dir=str(deployment.directory / name), listen=f"127.0.0.1:{port}")))
            processes[name] = Process([command, "--config", str(deployment.directory / f"{name}.yaml")],
                                      deployment.directory / f"{name}.log").start()
            deployment.gateways.append(processes[name])  # stopped by the fixture, whatever happens here
            address = config["controller"]["health_listen"] if command == "controller" else f"127.0.0.1:{port}"
            service = "" if command == "controller" else "garrison.v1.Inference"
            wait_until(lambda: healthy(address, service) or processes[name].handle.poll() is not None, 300)
            assert processes[name].handle.poll() is None, (deployment.directory / f"{name}.log").read_text()[-3000:]
    finally:
        cluster.shutdown()
    lost = time.monotonic()
    for name, process in processes.items():
        log_text = (deployment.directory / f"{name}.log").read_text
        assert process.wait(60) == 1, log_text()[-3000:]
        exited_s = time.monotonic() - lost
        print(f"{name} exited {exited_s:.1f} s after its cluster was shut down")
        assert "the Ray cluster has not answered for" in log_text() and "exiting" in log_text(), log_text()[-3000:]
        assert exited_s < 3 + 15, log_text()[-3000:]
