"""`garrison serve` as an operator runs it: the embedded default in its own process (local Ray,
SQLite, SmolLM2), called by a client that knows only the address, administered with the CLI, and
restarted with everything kept."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from conftest import postgres_schema_url

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    def __init__(self, data_dir: Path, port: int, database_url: str | None) -> None:
        self.address = f"127.0.0.1:{port}"
        self.log = data_dir.parent / f"serve-{port}-{time.monotonic_ns()}.log"
        env = {**os.environ, "GARRISON_DATA_DIR": str(data_dir)}  # the flag-free default, via the environment
        if database_url:
            env["GARRISON_DATABASE_URL"] = database_url
        self.process = subprocess.Popen([sys.executable, "-m", "garrison", "serve", "--listen", self.address],
                                        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=self.log.open("w"))

    def wait_serving(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise AssertionError(f"garrison serve exited {self.process.returncode}:\n{self.log.read_text()}")
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(service="garrison.v1.Inference"), timeout=2)
                    if status.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.5)
        raise AssertionError(f"not serving after {timeout} s:\n{self.log.read_text()}")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError(f"garrison serve ignored SIGTERM:\n{self.log.read_text()}") from None


def cli(*args: str, data_dir: Path, address: str, key_file: Path | None = None) -> str:
    command = [sys.executable, "-m", "garrison", "--server", address, *(["--key-file", str(key_file)] if key_file else []),
               *args]
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, "GARRISON_DATA_DIR": str(data_dir)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def reflected_generate(address: str, key: str, prompt: str) -> str:
    """A client with no generated code: services and messages come from the server's reflection."""
    with grpc.insecure_channel(address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert "garrison.v1.Inference" in database.get_services()
        pool = descriptor_pool.DescriptorPool(database)
        method = pool.FindServiceByName("garrison.v1.Inference").methods_by_name["Generate"]
        assert method.server_streaming
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        call = channel.unary_stream("/garrison.v1.Inference/Generate", request_serializer=request_cls.SerializeToString,
                                    response_deserializer=response_cls.FromString)
        request = request_cls(model="smollm2", max_tokens=16)
        message = request.messages.add()
        message.role, message.content = "user", prompt
        return "".join(piece.text for piece in call(request, metadata=(("authorization", f"Bearer {key}"),),
                                                    timeout=120))


@pytest.fixture
def database_url():
    with postgres_schema_url() as url:  # None: the default, SQLite under the data dir
        yield url


def test_embedded_default_serves_is_administered_and_survives_a_restart(tmp_path: Path, database_url) -> None:
    data_dir = tmp_path / "data"
    port = free_port()
    server = ServeProcess(data_dir, port, database_url)
    try:
        server.wait_serving()
        admin_key, tenant_key = data_dir / "admin.key", data_dir / "tenant.key"
        for key in (admin_key, tenant_key, data_dir / "kek.key"):
            assert key.stat().st_mode & 0o777 == 0o600
        # SmolLM2 was imported into the encrypted store on this first start, and is served from it.
        assert (data_dir / "store" / "smollm2" / "manifest.json").is_file()
        assert "smollm2" in cli("models", "list", **dict(data_dir=data_dir, address=server.address))
        assert "Paris" in reflected_generate(server.address, tenant_key.read_text().strip(),
                                             "What is the capital of France?")
        assert admin_key.read_text().strip() not in server.log.read_text()  # the key is never logged

        run = dict(data_dir=data_dir, address=server.address)
        cli("tenants", "create", "team-a", "--models", "smollm2", "--max-concurrent", "3", **run)
        team_key = cli("keys", "create", "--tenant", "team-a", "--description", "e2e", **run).strip()
        (tmp_path / "team.key").write_text(team_key)
        answer = json.loads(cli("chat", "--prompt", "What is the capital of France?", "--max-tokens", "16", "--json",
                                key_file=tmp_path / "team.key", **run))
        assert "Paris" in answer["text"] and answer["output_tokens"] == len(answer["token_ids"])
        cli("quota", "set", "team-a", "--tokens-per-minute", "5000", **run)
        tenants = {t["name"]: t for t in json.loads(cli("tenants", "list", "--json", **run))}
        assert tenants["team-a"]["quota"]["tokens_per_minute"] == "5000"  # int64 is a string in proto JSON
        time.sleep(1.0)  # usage is recorded just after each stream ends
        usage_before = json.loads(cli("usage", "--json", **run))
        assert {"default", "team-a"} <= {row["tenant"] for row in usage_before}
        actions = [e["action"] for e in json.loads(cli("audit", "--json", **run))]
        assert actions[-3:] == ["tenants.create", "keys.create", "quota.set"]
        csv = cli("usage", "--csv", "--tenant", "team-a", **run).splitlines()
        assert csv[0].startswith("hour,tenant,model,requests") and len(csv) == 2
    finally:
        server.stop()

    admin_before = admin_key.read_text()
    server = ServeProcess(data_dir, port, database_url)
    try:
        server.wait_serving()
        run = dict(data_dir=data_dir, address=server.address)
        assert admin_key.read_text() == admin_before  # written once, never rewritten
        tenants = {t["name"]: t for t in json.loads(cli("tenants", "list", "--json", **run))}
        assert tenants["team-a"]["quota"]["tokens_per_minute"] == "5000"
        assert tenants["team-a"]["quota"]["max_concurrent_requests"] == 3
        assert json.loads(cli("usage", "--json", **run)) == usage_before
        assert "Paris" in reflected_generate(server.address, team_key, "What is the capital of France?")
        cli("keys", "revoke", team_key[:11], **run)
        with pytest.raises(grpc.RpcError) as info:
            reflected_generate(server.address, team_key, "Hi")
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        server.stop()
