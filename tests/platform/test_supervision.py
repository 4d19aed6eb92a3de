"""Replica supervision that does not wait for traffic: a lost rank is found and its group restarted by itself; a
restart that cannot be placed says why (ListModels, health, the error a request gets) and succeeds once capacity
returns; a disaggregated replica's prefill group dying during a handoff leaves its decode group streaming.

A real local Ray instance and a real gRPC server; faults come through the hooks the workers offer (kill a rank,
make one exit at a point of its code), and the capacity that disappears is taken by a placement group of our own.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import ray
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ray.util.placement_group import placement_group, remove_placement_group

from conftest import save_tiny_llama
from garrison.client import GarrisonClient
from garrison.serving.background import BackgroundServer
from garrison.serving.config import EngineConfig, GroupConfig, ModelDeploymentConfig, ServeConfig
from garrison.v1 import inference_pb2 as pb
from garrison.v1 import inference_pb2_grpc
from garrison_workers.faults import Fault

pytestmark = pytest.mark.usefixtures("local_ray")

ENGINE = EngineConfig(block_size=4, num_kv_blocks=256, max_num_seqs=8, max_num_batched_tokens=32, worker_threads=1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny"))


def serve(tmp_path: Path, *models: ModelDeploymentConfig) -> BackgroundServer:
    return BackgroundServer(ServeConfig(data_dir=tmp_path / "data", listen="127.0.0.1:0", models=models))


def tenant_key(server: BackgroundServer) -> str:
    return (server.server.config.data_dir / "tenant.key").read_text().strip()


def replicas(server: BackgroundServer, model: str) -> list[pb.ReplicaStatus]:
    with GarrisonClient(server.address, key=tenant_key(server)) as client:
        return [r for m in client.list_models() if m.name == model for r in m.replicas]


def wait_for(what, timeout: float, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = what()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(poll)


def generate(server: BackgroundServer, model: str, token_ids: list[int], max_tokens: int = 6) -> list[int]:
    stub = inference_pb2_grpc.InferenceStub(grpc.insecure_channel(server.address))
    pieces = stub.Generate(pb.GenerateRequest(model=model, token_ids=token_ids, max_tokens=max_tokens),
                           metadata=(("authorization", f"Bearer {tenant_key(server)}"),), timeout=120)
    return [t for piece in pieces for t in piece.token_ids]


def model_health(server: BackgroundServer, model: str) -> int:
    with grpc.insecure_channel(server.address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=f"garrison.v1.Inference/{model}"), timeout=10).status


def test_a_restart_that_cannot_be_placed_says_why_and_recovers_when_capacity_returns(tiny: Path, tmp_path: Path):
    model = ModelDeploymentConfig("tiny", str(tiny), groups=(GroupConfig(tp=2),), engine=ENGINE)
    with serve(tmp_path, model) as server:
        prompt = [5, 6, 7, 8]
        expected = generate(server, "tiny", prompt)
        # Every CPU slot of the cluster, asked for now: granted only once the group's own slots are free, and then
        # before the group's restart asks for them (placement groups wait in order).
        squatter = placement_group([{"CPU": 1}] * int(ray.cluster_resources()["CPU"]))
        try:
            core = server.server.controller.core("core/tiny/0")
            ray.get(core.kill_rank.remote(0, 1))  # no traffic after this
            unplaceable = wait_for(lambda: [r for r in replicas(server, "tiny")
                                            if r.state == pb.REPLICA_STATE_UNPLACEABLE], timeout=60)
            assert unplaceable, replicas(server, "tiny")
            assert "2 ranks need 2 CPU" in unplaceable[0].detail and "next attempt in" in unplaceable[0].detail
            assert wait_for(lambda: model_health(server, "tiny") == health_pb2.HealthCheckResponse.NOT_SERVING, 5)
            with pytest.raises(grpc.RpcError) as refused:
                generate(server, "tiny", prompt)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and "unplaceable" in refused.value.details()
        finally:
            remove_placement_group(squatter)
        freed = time.monotonic()
        serving = wait_for(lambda: [r for r in replicas(server, "tiny") if r.state == pb.REPLICA_STATE_SERVING],
                           timeout=90)
        assert serving and serving[0].restarts == 1, replicas(server, "tiny")
        print(f"serving again {time.monotonic() - freed:.1f} s after the capacity returned")
        assert wait_for(lambda: model_health(server, "tiny") == health_pb2.HealthCheckResponse.SERVING, timeout=5)
        assert generate(server, "tiny", prompt) == expected


@pytest.mark.parametrize("transport", ["ray", "torch"])
def test_a_prefill_rank_dying_in_a_handoff_leaves_the_decode_group_streaming(tiny: Path, tmp_path: Path,
                                                                           transport: str) -> None:
    """A stream decodes while a new request's prefill rank dies as it exports that request's KV: the new request
    fails with UNAVAILABLE naming the rank, the stream reads exactly as it does alone, and the prefill group is
    restarted by itself, so the next request is served."""
    groups = (GroupConfig(role="prefill"), GroupConfig(role="decode"))
    engine = EngineConfig(block_size=4, num_kv_blocks=256, max_num_seqs=8, max_num_batched_tokens=32,
                          worker_threads=1, kv_transport=transport)
    with serve(tmp_path, ModelDeploymentConfig("disagg", str(tiny), groups=groups, engine=engine)) as server:
        stream_prompt, doomed_prompt = [3, 4, 5, 6, 7], [9, 10, 11, 12, 13, 14]
        expected_stream = generate(server, "disagg", stream_prompt, max_tokens=60)
        expected_doomed = generate(server, "disagg", doomed_prompt)
        core = server.server.controller.core("core/disagg/0")
        with ThreadPoolExecutor(1) as pool:
            stream = pool.submit(generate, server, "disagg", stream_prompt, 60)
            time.sleep(0.5)  # the stream is decoding on the decode group
            ray.get(core.inject_fault.remote(0, 0, "export_kv", Fault("exit")))  # group 0: the prefill group
            with pytest.raises(grpc.RpcError) as failed:
                generate(server, "disagg", doomed_prompt)
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE and "rank 0" in failed.value.details()
            assert stream.result() == expected_stream
        assert wait_for(lambda: all(r.state == pb.REPLICA_STATE_SERVING and r.restarts == 1
                                    for r in replicas(server, "disagg")), timeout=90), replicas(server, "disagg")
        assert generate(server, "disagg", doomed_prompt) == expected_doomed
