"""`garrison serve --config FILE`: the YAML is checked strictly, and what it describes runs — TLS with
client certificates, a colocated and a disaggregated deployment of the same model."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import torch
import yaml

from conftest import save_tiny_llama4
from garrison.certs import make_certs
from garrison.client import ClientError, GarrisonClient, TLSFiles
from garrison.serving.background import BackgroundServer
from garrison.serving.controller import ray_ranks
from garrison.serving.config import ConfigError, load


def test_unknown_or_malformed_settings_are_refused_with_their_place(tmp_path: Path) -> None:
    cases = {
        "listne: 0.0.0.0:1\n": "config.listne: unknown setting (did you mean listen?)",
        "models:\n  - {name: m, source: x, groups: [{role: prefil}]}\n": "role: must be one of both, prefill, decode",
        "models:\n  - {name: m, source: x, groups: [{role: decode}]}\n": "one 'prefill'",
        "models:\n  - {name: m, source: x, engine: {kv_cache: 1}}\n": "config.models[0].engine.kv_cache: unknown",
        "models:\n  - {source: x}\n": "config.models[0]",
        "models: []\n": "non-empty list",
        "models:\n  - {name: m, source: x, engine: {device: gpu}}\n": "config.models[0].engine.device: must be cpu",
        "models:\n  - {name: m, source: x, engine: {dtype: fp8}}\n": "dtype: must be one of float32, bfloat16",
        "models:\n  - {name: m, source: x, engine: {kv_cache_device: cuda}}\n": "kv_cache_device must be the engine",
        "models:\n  - {name: m, source: x, engine: {kv_transport: nccl}}\n": "kv_transport: must be one of ray, torch",
        "- 1\n": "mapping",
        "listen: [unclosed\n": "not valid YAML",
    }
    for text, expected in cases.items():
        path = tmp_path / "serve.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError) as info:
            load(path)
        assert expected in str(info.value), (text, str(info.value))
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "missing.yaml")


def test_engine_settings_reach_the_engine_config(tmp_path: Path) -> None:
    """A GPU deployment's settings (no GPU needed to build its config): device, dtype, a host-memory KV cache."""
    path = tmp_path / "serve.yaml"
    path.write_text("models:\n  - {name: m, source: x, engine: {device: cuda, dtype: bfloat16, kv_cache_device: cpu,"
                    " kv_transport: torch, kv_cache_bytes: 4096}}\n")
    config = load(path).models[0].engine
    assert (config.device, config.dtype, config.kv_cache_device, config.kv_device, config.kv_transport,
            config.kv_cache_bytes) == ("cuda", torch.bfloat16, "cpu", "cpu", "torch", 4096)
    assert load(None).models[0].engine.kv_device == "cpu"  # the embedded default: all on the CPU


def test_a_local_ray_instance_has_a_slot_for_every_rank_configured(tmp_path: Path) -> None:
    """On one machine a disaggregated replica can want more ranks than there are cores; a local Ray instance
    started with only one slot per core could never place its groups (the start waited out its timeout)."""
    path = tmp_path / "serve.yaml"
    path.write_text("models:\n  - {name: a, source: x}\n  - {name: b, source: x, replicas: 2, groups: "
                    "[{role: prefill, tp: 2, ep: 2}, {role: decode, tp: 3}]}\n")
    assert ray_ranks(load(path)) == 1 + 2 * (4 + 3)


def test_a_config_file_serves_tls_clients_and_colocated_and_disaggregated_models(tmp_path: Path) -> None:
    model_dir = save_tiny_llama4(tmp_path / "tiny", seed=3, num_experts_per_tok=2)
    certs = make_certs(tmp_path / "certs", hosts=["localhost", "127.0.0.1"], clients=["app"])
    kek = tmp_path / "kek.key"
    kek.write_bytes(b"\x07" * 32)
    kek.chmod(0o600)
    engine = {"kv_cache_bytes": 8 << 20, "max_num_seqs": 4, "max_num_batched_tokens": 32, "block_size": 4}
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump({
        "listen": "127.0.0.1:0", "data_dir": "data", "kek_file": "kek.key",
        "tls": {"cert": str(certs.server.cert), "key": str(certs.server.key), "client_ca": str(certs.ca.cert)},
        "models": [
            {"name": "tiny", "source": str(model_dir), "on_ray": False, "engine": engine},
            {"name": "tiny-disagg", "source": "tiny-imported", "import_from": str(model_dir), "on_ray": False,
             "engine": engine, "groups": [{"role": "prefill"}, {"role": "decode"}]},
        ]}))
    config = load(tmp_path / "serve.yaml")
    assert config.data_dir == tmp_path / "data" and not config.bootstrap  # relative paths: from the file's folder
    with BackgroundServer(config) as server:
        admin_key = config.data_dir / "admin.key"
        client_tls = TLSFiles(ca=certs.ca.cert, cert=certs.clients["app"].cert, key=certs.clients["app"].key)
        with GarrisonClient(server.address, key_file=admin_key, tls=client_tls) as admin:
            admin.admin.create_tenant(name="app", models=["tiny", "tiny-disagg"])
            key = admin.admin.create_api_key(tenant="app").secret
        with GarrisonClient(server.address, key=key, tls=client_tls) as client:
            prompt = list(range(5, 40))
            colocated = client.complete("tiny", token_ids=prompt, max_tokens=10)
            disaggregated = client.complete("tiny-disagg", token_ids=prompt, max_tokens=10)
            assert len(colocated.token_ids) == 10 and disaggregated.token_ids == colocated.token_ids
            assert {m.name for m in client.list_models()} == {"tiny", "tiny-disagg"}
        # Without a client certificate the TLS handshake itself fails; plaintext is not spoken at all.
        with GarrisonClient(server.address, key=key, tls=TLSFiles(ca=certs.ca.cert), timeout=10) as stranger:
            with pytest.raises(ClientError) as info:
                stranger.complete("tiny", token_ids=prompt, max_tokens=1)
            assert info.value.code == grpc.StatusCode.UNAVAILABLE
        with GarrisonClient(server.address, key=key, timeout=10) as plaintext:
            with pytest.raises(ClientError):
                plaintext.list_models()
    assert (config.data_dir / "store" / "tiny-imported" / "manifest.json").is_file()


def test_the_plaintext_health_port_answers_probes_while_the_grpc_port_requires_tls(tmp_path: Path) -> None:
    """gateway.health_listen: Kubernetes' gRPC probes cannot speak TLS, so the gateway also serves gRPC health in
    plaintext on a port of its own, with the main port's states (the server as a whole, the Inference service, each
    model), NOT_SERVING once draining; nothing else is served there, and the main port still requires mTLS."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    model_dir = save_tiny_llama4(tmp_path / "tiny", seed=3)
    certs = make_certs(tmp_path / "certs", hosts=["localhost", "127.0.0.1"], clients=["app"])
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump({
        "listen": "127.0.0.1:0", "data_dir": "data", "gateway": {"health_listen": "127.0.0.1:0"},
        "tls": {"cert": str(certs.server.cert), "key": str(certs.server.key), "client_ca": str(certs.ca.cert)},
        "models": [{"name": "tiny", "source": str(model_dir), "on_ray": False,
                    "engine": {"kv_cache_bytes": 8 << 20, "max_num_seqs": 4, "max_num_batched_tokens": 32,
                               "block_size": 4}}]}))
    services = ("", "garrison.v1.Inference", "garrison.v1.Inference/tiny")
    client_tls = grpc.ssl_channel_credentials(certs.ca.cert.read_bytes(), certs.clients["app"].key.read_bytes(),
                                              certs.clients["app"].cert.read_bytes())

    def statuses(channel: grpc.Channel) -> dict[str, str]:
        stub = health_pb2_grpc.HealthStub(channel)
        return {s: health_pb2.HealthCheckResponse.ServingStatus.Name(
            stub.Check(health_pb2.HealthCheckRequest(service=s), timeout=10).status) for s in services}

    with BackgroundServer(load(tmp_path / "serve.yaml")) as background:
        server = background.server
        assert server.health_port not in (0, server.port)
        probe_address = f"127.0.0.1:{server.health_port}"
        with grpc.insecure_channel(probe_address) as probe, \
                grpc.secure_channel(background.address, client_tls) as secure:
            assert statuses(probe) == statuses(secure) == dict.fromkeys(services, "SERVING")
            # Health alone: not the API, not reflection.
            for method in ("/garrison.v1.Inference/ListModels",
                           "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"):
                with pytest.raises(grpc.RpcError) as info:
                    probe.unary_unary(method)(b"", timeout=10)
                assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED, method
            # The main port speaks TLS only: a plaintext health check there fails.
            with grpc.insecure_channel(background.address) as plaintext:
                with pytest.raises(grpc.RpcError) as info:
                    health_pb2_grpc.HealthStub(plaintext).Check(health_pb2.HealthCheckRequest(), timeout=10)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            background.call(server.drain(0.0))
            drained = statuses(probe)
            assert drained == statuses(secure)
            assert drained[""] == drained["garrison.v1.Inference"] == "NOT_SERVING"
