"""Acceptance: a real `garrison serve` (tiny model from --config, SQLite or PostgreSQL) serves streams, is sent
SIGTERM while some are in flight, and is started again: the ledger then holds exactly what the clients were
served (the usage of each final GenerateResponse), also when the database is locked or down at shutdown."""

from __future__ import annotations

import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import save_tiny_llama
from garrison.client import GarrisonClient
from garrison.tenancy.keys import new_key_id, new_secret
from garrison.tenancy.ledger import SPOOL_FILE
from garrison.v1 import inference_pb2, inference_pb2_grpc
from postgres_server import PostgresServer, throwaway

pytestmark = pytest.mark.slow  # two or three server starts per case

STREAMS, LATE = 8, 3  # streams in flight at SIGTERM; requests sent after it (refused, never counted)
MAX_TOKENS = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Deployment:
    root: Path
    config: Path
    address: str
    admin_key: str
    database: Path | None  # the SQLite file, when SQLite


def deployment(root: Path, model: Path, database_url: str | None = None) -> Deployment:
    port = free_port()
    admin_key = new_secret(new_key_id())
    (root / "admin.secret").write_text(admin_key + "\n")
    settings = {"listen": f"127.0.0.1:{port}", "data_dir": "data", "admin_key_file": "admin.secret",
                "models": [{"name": "tiny", "source": str(model), "on_ray": False,
                            "engine": {"kv_cache_bytes": 16 << 20, "max_num_seqs": STREAMS}}]}
    if database_url:
        settings["database_url"] = database_url
    (root / "serve.yaml").write_text(yaml.safe_dump(settings))
    return Deployment(root, root / "serve.yaml", f"127.0.0.1:{port}", admin_key,
                      None if database_url else root / "data" / "garrison.db")


class Serve:
    """`garrison serve --config FILE` in a process of its own."""

    def __init__(self, d: Deployment) -> None:
        self.d = d
        self.log = d.root / f"serve-{time.monotonic_ns()}.log"
        self.process = subprocess.Popen([sys.executable, "-m", "garrison", "serve", "--config", str(d.config)],
                                        cwd=d.root, stdout=subprocess.DEVNULL, stderr=self.log.open("w"))
        self._wait_serving()

    def _wait_serving(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.d.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                assert self.process.poll() is None, f"garrison serve exited:\n{self.log.read_text()}"
                try:
                    if health.Check(health_pb2.HealthCheckRequest(service="garrison.v1.Inference"),
                                    timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.3)
        raise AssertionError(f"not serving after {timeout} s:\n{self.log.read_text()}")

    def terminate(self, timeout: float = 60) -> float:
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            assert self.process.wait(timeout) == 0, self.log.read_text()
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError(f"garrison serve did not stop within {timeout} s:\n{self.log.read_text()}") from None
        return time.monotonic() - started


@dataclass
class Served:
    """What the clients got: counted only for streams that ended with a final response (its usage)."""

    requests: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    refused: list[grpc.StatusCode] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def stream(address: str, key: str, prompt: list[int], served: Served, started: threading.Event) -> None:
    with grpc.insecure_channel(address) as channel:
        call = inference_pb2_grpc.InferenceStub(channel).Generate(
            inference_pb2.GenerateRequest(model="tiny", token_ids=prompt, max_tokens=MAX_TOKENS),
            metadata=(("authorization", f"Bearer {key}"),), timeout=120)
        try:
            for response in call:
                started.set()
                if response.HasField("usage"):
                    with served.lock:
                        served.requests += 1
                        served.prompt_tokens += response.usage.prompt_tokens
                        served.output_tokens += response.usage.output_tokens
        except grpc.RpcError as err:
            started.set()
            with served.lock:
                served.refused.append(err.code())


def tenant_key(d: Deployment) -> str:
    with GarrisonClient(d.address, key=d.admin_key) as admin:
        admin.admin.create_tenant(name="acme", models=["tiny"])
        return admin.admin.create_api_key(tenant="acme").secret


def ledger(d: Deployment) -> tuple[int, int, int]:
    with GarrisonClient(d.address, key=d.admin_key) as admin:
        rows = admin.admin.get_usage(tenant="acme").rows
    return sum(r.requests for r in rows), sum(r.prompt_tokens for r in rows), sum(r.output_tokens for r in rows)


def serve_then_sigterm(d: Deployment, before_sigterm: Callable[[], None] = lambda: None) -> Served:
    """Warm-up requests, then STREAMS streams, SIGTERM once each has a token, then LATE more requests."""
    server = Serve(d)
    key = tenant_key(d)
    served = Served()
    for i in range(3):  # finished, and flushed, long before the signal
        stream(d.address, key, [5 + i] * (4 + i), served, threading.Event())
    time.sleep(1.5)
    events = [threading.Event() for _ in range(STREAMS)]
    threads = [threading.Thread(target=stream, args=(d.address, key, [7 + i] * (3 + i), served, events[i]))
               for i in range(STREAMS)]
    for thread in threads:
        thread.start()
    assert all(event.wait(120) for event in events)
    before_sigterm()
    in_flight = STREAMS + 3 - served.requests
    errors: list[BaseException] = []
    stopper = threading.Thread(target=lambda: _capture(errors, server.terminate))
    stopper.start()
    time.sleep(0.3)  # the server is draining: new calls are refused
    late = [threading.Thread(target=stream, args=(d.address, key, [9], served, threading.Event())) for _ in range(LATE)]
    for thread in late:
        thread.start()
    for thread in threads + late + [stopper]:
        thread.join(120)
    if errors:
        raise errors[0]
    assert in_flight > 0, "every stream ended before SIGTERM: nothing was in flight"
    assert served.requests == STREAMS + 3, f"streams in flight at SIGTERM were cut: {served.refused}"
    assert len(served.refused) == LATE
    return served


def _capture(errors: list[BaseException], action: Callable[[], object]) -> None:
    try:
        action()
    except BaseException as err:  # re-raised by the test's thread
        errors.append(err)


def assert_ledger_after_restart(d: Deployment, served: Served) -> None:
    server = Serve(d)
    try:
        assert ledger(d) == (served.requests, served.prompt_tokens, served.output_tokens)
        assert not (d.root / "data" / SPOOL_FILE).exists()  # replayed and cleared
    finally:
        server.terminate()


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny"))


def test_a_sigterm_with_streams_in_flight_loses_and_doubles_no_usage(tmp_path: Path, model: Path) -> None:
    d = deployment(tmp_path, model)
    served = serve_then_sigterm(d)
    assert_ledger_after_restart(d, served)


def test_usage_a_locked_database_refused_at_shutdown_is_written_at_the_next_start(tmp_path: Path, model: Path) -> None:
    d = deployment(tmp_path, model)
    holder: list[sqlite3.Connection] = []

    def lock() -> None:  # another writer holds SQLite's write lock from before SIGTERM until after the exit
        holder.append(sqlite3.connect(d.database, isolation_level=None))
        holder[0].execute("BEGIN IMMEDIATE")

    served = serve_then_sigterm(d, lock)
    assert (d.root / "data" / SPOOL_FILE).exists()
    holder[0].execute("ROLLBACK")
    holder[0].close()
    assert_ledger_after_restart(d, served)


@pytest.fixture
def postgres() -> Iterator[PostgresServer]:
    with throwaway() as server:
        yield server


def test_usage_written_while_postgresql_is_down_is_written_at_the_next_start(tmp_path: Path, model: Path,
                                                                            postgres: PostgresServer) -> None:
    d = deployment(tmp_path, model, postgres.url)
    served = serve_then_sigterm(d, postgres.stop)
    assert (d.root / "data" / SPOOL_FILE).exists()
    postgres.start()
    assert_ledger_after_restart(d, served)
