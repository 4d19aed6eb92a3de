"""More than one node: a Ray cluster of a head and two worker nodes on this machine (ray.cluster_utils: each node its
own raylet and object store), ranks placed across them, and the faults of a cluster: a whole node lost, an engine
core lost, a layout the cluster cannot hold.

The head runs no ranks (no CPU slots); node A and node B each advertise two slots and a resource of their own
(`node-a`, `node-b`), which a group names to be placed there. The cluster's failure detection is shortened
(health checks every second, three missed) as an operator would for fast failover.
"""

from __future__ import annotations

import functools
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import ray
import torch
from ray.cluster_utils import Cluster

from conftest import (NEW_TOKENS, greedy_with_logprobs, hf_reference, save_tiny_llama, save_tiny_llama4,
                      wait_until)
from garrison.serving.background import BackgroundServer
from garrison.serving.config import EngineConfig, GroupConfig, ModelDeploymentConfig, ServeConfig
from garrison.serving.controller import Controller, find_cores
from garrison.v1 import inference_pb2 as pb
from garrison.v1 import inference_pb2_grpc
from garrison_workers.engine.disagg import DisaggregatedEngine
from garrison_workers.engine.llm_engine import LLMEngine
from garrison_workers.engine.sequence import SamplingParams
from garrison_workers.errors import LayoutError
from garrison_workers.parallel.dims import ParallelDims
from garrison_workers.placement import GroupPlacement

# A cluster of three raylets on this machine, its faults and a rollout (~3 minutes in all): with the slow checks,
# which CI runs.
pytestmark = pytest.mark.slow

ENGINE = EngineConfig(block_size=4, max_num_batched_tokens=16, num_kv_blocks=128, worker_threads=1)
NODE_SLOTS = 2


@pytest.fixture(scope="module")
def cluster():
    system = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
    cluster = Cluster(initialize_head=True, connect=True, head_node_args={"num_cpus": 0, "_system_config": system})
    nodes = {name: cluster.add_node(num_cpus=NODE_SLOTS, resources={f"node-{name}": NODE_SLOTS}) for name in "ab"}
    cluster.wait_for_nodes()
    yield cluster, nodes
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory) -> Path:
    return save_tiny_llama4(tmp_path_factory.mktemp("moe"), seed=5, num_local_experts=6, num_experts_per_tok=2,
                            interleave_moe_layer_step=2, num_hidden_layers=4)


def test_a_tp2_group_with_a_rank_on_each_node_matches_one_process_and_transformers(cluster, tiny_moe: Path) -> None:
    prompt = torch.randint(3, 512, (37,), generator=torch.Generator().manual_seed(1)).tolist()
    tokens, logprobs = greedy_with_logprobs(LLMEngine.from_path(tiny_moe, ENGINE), prompt, NEW_TOKENS)
    hf_logits, hf_tokens = hf_reference(tiny_moe, prompt, NEW_TOKENS, tokens)
    spread = LLMEngine.from_path(tiny_moe, ENGINE, ParallelDims(tp=2), placement=GroupPlacement("spread"))
    try:
        nodes = spread.executor.nodes  # type: ignore[attr-defined]
        got_tokens, got_logprobs = greedy_with_logprobs(spread, prompt, NEW_TOKENS)
    finally:
        spread.shutdown()
    assert len(set(nodes)) == 2, nodes
    assert got_tokens == tokens == hf_tokens
    assert (got_logprobs - logprobs).abs().max().item() < 1e-4
    assert (got_logprobs - torch.log_softmax(hf_logits, dim=-1)).abs().max().item() < 1e-4


@pytest.mark.parametrize("transport", ["ray", "torch"])
def test_prefill_on_one_node_and_decode_on_another_give_the_colocated_tokens(cluster, tiny_moe: Path,
                                                                            transport: str) -> None:
    config = replace(ENGINE, kv_transport=transport)
    prompts = [torch.randint(3, 512, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (9, 23, 41)]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    expected = [c.token_ids for c in LLMEngine.from_path(tiny_moe, ENGINE).generate(prompts, params)]
    prefill = LLMEngine.from_path(tiny_moe, config, role="prefill", on_ray=True,
                                  placement=GroupPlacement(resource="node-a"))
    decode = LLMEngine.from_path(tiny_moe, config, ParallelDims(tp=2), role="decode",
                                 placement=GroupPlacement(resource="node-b"))
    engine = DisaggregatedEngine(prefill, [decode])
    try:
        nodes = (prefill.executor.nodes, decode.executor.nodes)  # type: ignore[attr-defined]
        got = [[] for _ in prompts]
        for i, prompt in enumerate(prompts):
            engine.add_request(f"r{i}", prompt, params)
        while engine.has_unfinished_requests():
            for out in engine.step():
                assert out.error is None, out.error
                got[int(out.request_id[1:])] += out.new_token_ids
    finally:
        prefill.shutdown()
        decode.shutdown()
    assert not set(nodes[0]) & set(nodes[1]), nodes
    assert got == expected


def serve(tmp_path: Path, *models: ModelDeploymentConfig, cluster_address: str) -> BackgroundServer:
    return BackgroundServer(ServeConfig(data_dir=tmp_path / "data", listen="127.0.0.1:0", ray_address=cluster_address,
                                        ray_namespace=f"test-{uuid.uuid4().hex[:8]}", bootstrap=True, models=models,
                                        gateway=replace(ServeConfig().gateway, drain_seconds=1.0)))


def stream(address: str, key: str, model: str, max_tokens: int,
           prompt: tuple[int, ...] = (5, 6, 7, 8)) -> tuple[list[int], str | None, float]:
    """(tokens, the error's code and message if it failed, when it ended)."""
    tokens: list[int] = []
    try:
        with grpc.insecure_channel(address) as channel:
            for piece in inference_pb2_grpc.InferenceStub(channel).Generate(
                    pb.GenerateRequest(model=model, token_ids=prompt, max_tokens=max_tokens),
                    metadata=(("authorization", f"Bearer {key}"),), timeout=120):
                tokens += piece.token_ids
        return tokens, None, time.monotonic()
    except grpc.RpcError as err:
        return tokens, f"{err.code().name}: {err.details()}", time.monotonic()


def idle(server: BackgroundServer, model: str) -> bool:
    load = server.server.router.load(model)
    return (load.in_flight, load.queued, load.kv_blocks_used, server.server.quotas.total_in_flight()) == (0, 0, 0, 0)


def on_node(name: str, node: str, model_dir: Path) -> ModelDeploymentConfig:
    return ModelDeploymentConfig(name, str(model_dir), groups=(GroupConfig(resource=f"node-{node}"),),
                                 engine=replace(ENGINE, num_kv_blocks=512, max_num_seqs=8))


def streams_through(server: BackgroundServer, key: str, fault) -> tuple[dict[tuple[str, int], tuple], float]:
    """Two 400-token streams on each of `left` and `right`, `fault()` half a second in: (each stream's outcome, by
    model and index; when the fault struck)."""
    with ThreadPoolExecutor(4) as pool:
        runs = {(model, i): pool.submit(stream, server.address, key, model, 400)
                for model in ("left", "right") for i in range(2)}
        time.sleep(0.5)
        struck = time.monotonic()
        fault()
        return {run: future.result() for run, future in runs.items()}, struck


def test_a_lost_node_fails_only_its_streams_and_its_replica_comes_back_by_itself(cluster, tmp_path: Path) -> None:
    ray_cluster, nodes = cluster
    tiny = save_tiny_llama(tmp_path / "tiny", eos_token_id=None)
    with serve(tmp_path, on_node("left", "a", tiny), on_node("right", "b", tiny),
               cluster_address=ray_cluster.address) as server:
        key = (tmp_path / "data" / "tenant.key").read_text().strip()
        expected = stream(server.address, key, "right", 400)[0]
        # Every tenant's limits outlive any worker node: the limits actor runs on the head, as the cores do.
        limits_node = ray.get(server.server.quotas.actor.__ray_call__.remote(
            lambda _: ray.get_runtime_context().get_node_id()))
        assert limits_node == ray_cluster.head_node.node_id
        # Node A's raylet and everything on it.
        results, killed = streams_through(server, key, lambda: ray_cluster.remove_node(nodes["a"],
                                                                                        allow_graceful=False))
        for i in range(2):
            tokens, error, ended = results[("left", i)]
            assert error is not None and error.startswith("UNAVAILABLE") and "rank 0" in error and "on node" in error
            assert ended - killed < 10, ended - killed
            assert results[("right", i)][1] is None, results[("right", i)][1]
            assert results[("right", i)][0] == expected
        wait_until(lambda: idle(server, "left") and idle(server, "right"), timeout=10)
        nodes["a"] = ray_cluster.add_node(num_cpus=NODE_SLOTS, resources={"node-a": NODE_SLOTS})
        returned = time.monotonic()
        wait_until(lambda: stream(server.address, key, "left", 4)[1] is None, timeout=120, poll=0.5)
        print(f"left served again {time.monotonic() - returned:.1f} s after node A came back")


def test_a_lost_engine_core_fails_its_streams_and_is_started_again(cluster, tmp_path: Path) -> None:
    ray_cluster, _ = cluster
    tiny = save_tiny_llama(tmp_path / "tiny", eos_token_id=None)
    with serve(tmp_path, on_node("left", "a", tiny), on_node("right", "b", tiny),
               cluster_address=ray_cluster.address) as server:
        key = (tmp_path / "data" / "tenant.key").read_text().strip()
        expected = stream(server.address, key, "left", 400)[0]
        results, killed = streams_through(server, key, lambda: ray.kill(server.server.controller.core("core/right/0"),
                                                                        no_restart=True))
        for i in range(2):
            _, error, ended = results[("right", i)]
            assert error is not None and error.startswith("UNAVAILABLE") and "engine core" in error
            assert ended - killed < 10
            assert results[("left", i)][:2] == (expected, None)
        wait_until(lambda: idle(server, "left") and server.server.quotas.total_in_flight() == 0, timeout=10)
        took = wait_until(lambda: stream(server.address, key, "right", 4)[1] is None, timeout=120, poll=0.5)
        print(f"right served again {took:.1f} s after its core was lost")
        # What the controller exports (garrison_replicas, garrison_replica_restarts_total): one restart of right's core.
        controller = server.server.controller
        assert {m["model"]: n["replica_restarts"] for m, n in controller.restart_rows()} == {"left": 0, "right": 1}
        serving = {m["model"]: n["replicas"] for m, n in controller.replica_rows() if m["state"] == "serving"}
        assert serving == {"left": 1, "right": 1}


def test_a_layout_the_cluster_cannot_hold_is_refused_up_front(cluster, tiny_moe: Path, tmp_path: Path) -> None:
    """tp 2 × ep 2 spread one rank per node needs four nodes with a slot; the cluster has two."""
    ray_cluster, _ = cluster
    model = ModelDeploymentConfig("wide", str(tiny_moe), groups=(GroupConfig(tp=2, ep=2, placement="spread"),),
                                  engine=ENGINE)
    began = time.monotonic()
    with pytest.raises(LayoutError, match=r"4 ranks of .* \(spread\) do not fit the Ray cluster's nodes even when "
                                          r"idle \(each holds [0-9, ]+\)"):
        serve(tmp_path, model, cluster_address=ray_cluster.address).start()
    assert time.monotonic() - began < 60


def test_a_rollout_drains_the_cores_it_drops_or_changes_and_their_streams_finish(cluster, tmp_path: Path) -> None:
    """A new config with fewer replicas and other engine settings: the old controller goes, the new one drains the
    core it drops and the core it keeps (built from the old settings) and starts that one again; every stream in
    flight finishes with its whole answer; afterwards one core serves, built from the new settings."""
    ray_cluster, _ = cluster
    tiny = save_tiny_llama(tmp_path / "tiny", eos_token_id=None)
    model = replace(on_node("m", "a", tiny), replicas=2)
    with serve(tmp_path, model, cluster_address=ray_cluster.address) as server:
        key = (tmp_path / "data" / "tenant.key").read_text().strip()
        old = server.server.controller
        old.stop(stop_cores=False)
        # From now on this gateway finds the cores by name, as the gateways of a cluster do, not from its controller.
        server.server.discovery.find = functools.partial(find_cores, old.namespace)
        changed = replace(model, replicas=1, engine=replace(model.engine, max_num_seqs=6))
        config = replace(server.server.config, models=(changed,),
                         gateway=replace(server.server.config.gateway, drain_seconds=60.0))
        with ThreadPoolExecutor(4) as pool:
            # Prompts with nothing in common: no prefix affinity, so the router spreads them by load.
            runs = [pool.submit(stream, server.address, key, "m", 300, (5 + i, 6, 7, 8)) for i in range(4)]
            for name in ("core/m/0", "core/m/1"):
                wait_until(lambda: ray.get(old.core(name).poll.remote("test", 0)).load.running > 0, timeout=30,
                           poll=0.05)
            new = Controller(config, old.namespace, detached=True)
            new.start()  # drains core/m/0 and starts it from the new settings; drains core/m/1 and stops it
            results = [run.result() for run in runs]
        try:
            assert [(len(tokens), error) for tokens, error, _ in results] == [(300, None)] * 4
            wait_until(lambda: sorted(find_cores(old.namespace)) == ["core/m/0"], timeout=10)
            assert ray.get(new.core("core/m/0").poll.remote("test", 0)).load.slots == 6
            wait_until(lambda: stream(server.address, key, "m", 4)[1] is None, timeout=30, poll=0.5)
        finally:
            new.stop(stop_cores=True)
