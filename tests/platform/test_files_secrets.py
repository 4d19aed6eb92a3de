"""Files and secrets: a private data directory, an owner-only database, key files never written through a link,
database passwords never shown, store names never shadowed by folders, and local-only defaults for what is
exposed (the metrics endpoint; an admin key provisioned from a file instead of exec-ing into a pod)."""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from conftest import save_tiny_llama
from garrison.client import GarrisonClient
from garrison.cli import main
from garrison.model_refs import resolve_model, resolve_source
from garrison.paths import DataDirError, ensure_private_dir
from garrison.secret_files import SecretFileError, write_secret_file
from garrison.serving.background import BackgroundServer
from garrison.serving.config import ConfigError, EngineConfig, ModelDeploymentConfig, ServeConfig, TelemetryConfig
from garrison.serving.server import GarrisonServer
from garrison.tenancy import SYSTEM, InvalidArgumentError, TenancyService, database_url
from garrison.tenancy.errors import AlreadyExistsError, StoreUnavailableError
from garrison.tenancy.keys import key_id_of, new_key_id, new_secret
from garrison.tenancy.store import make_engine
from garrison.weight_store.store import Store

PASSWORD = "hunter2-Zq9"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.fixture
def umask_022() -> Iterator[None]:
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_the_data_directory_is_created_private_and_refused_when_others_can_write(tmp_path: Path, umask_022) -> None:
    data = ensure_private_dir(tmp_path / "a" / "data")
    assert mode(data) == 0o700
    for loose in (0o770, 0o777, 0o707):
        data.chmod(loose)
        with pytest.raises(DataDirError, match="chmod 700"):
            ensure_private_dir(data)
    data.chmod(0o750)  # readable by the group is the operator's choice; writable is not
    ensure_private_dir(data)


def test_a_server_refuses_a_writable_data_directory_before_starting_anything(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o777)
    server = GarrisonServer(ServeConfig(data_dir=data, listen="127.0.0.1:0", models=(
        ModelDeploymentConfig("m", str(tmp_path / "absent"), on_ray=False),)))
    with pytest.raises(ConfigError) as info:
        asyncio.run(server.start())
    assert {p.place for p in info.value.problems} == {"config.data_dir", "config.models[0].source"}
    assert not (data / "garrison.db").exists()


def test_the_sqlite_database_and_its_wal_and_shm_are_owner_only(tmp_path: Path, umask_022) -> None:
    with TenancyService.open(database_url(tmp_path / "data")) as service:
        service.ensure_bootstrap_admin_key()
        service.record_usage("t", "m", requests=1)
        files = sorted(p.name for p in (tmp_path / "data").iterdir())
        assert files == ["garrison.db", "garrison.db-shm", "garrison.db-wal"]
        assert {name: mode(tmp_path / "data" / name) for name in files} == dict.fromkeys(files, 0o600)


def test_secret_files_are_never_written_through_a_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    link = tmp_path / "admin.key"
    link.symlink_to(victim)
    with pytest.raises(SecretFileError, match="already exists"):
        write_secret_file(link, b"secret\n")
    write_secret_file(link, b"secret\n", replace=True)  # the link itself is replaced
    assert victim.read_text() == "precious\n" and not link.is_symlink()
    assert link.read_text() == "secret\n" and mode(link) == 0o600
    dangling = tmp_path / "new.key"
    dangling.symlink_to(tmp_path / "somewhere-else")
    with pytest.raises(SecretFileError, match="already exists"):
        write_secret_file(dangling, b"secret\n")
    assert not (tmp_path / "somewhere-else").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["admin.key", "new.key", "victim"]  # no temp file left


def test_a_database_password_never_reaches_an_error_or_a_log(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    for url in (f"mysql://admin:{PASSWORD}@db/garrison", f"admin:{PASSWORD}@db/garrison"):
        with pytest.raises(InvalidArgumentError) as info:
            make_engine(url)
        assert PASSWORD not in str(info.value)
    pytest.importorskip("psycopg")
    with pytest.raises(StoreUnavailableError) as down:  # nothing listens on port 1
        TenancyService.open(f"postgresql+psycopg://admin:{PASSWORD}@127.0.0.1:1/garrison?connect_timeout=2")
    assert "postgresql+psycopg://admin:***@127.0.0.1:1/garrison" in str(down.value)
    assert PASSWORD not in str(down.value) and down.value.retry_after_s > 0
    assert caplog.records and all(PASSWORD not in record.getMessage() for record in caplog.records)


def test_a_folder_never_shadows_a_store_or_bundled_model_name(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "smollm2").mkdir()
    (tmp_path / "smollm2" / "config.json").write_text("{}")
    store = Store(tmp_path / "store")
    assert str(resolve_model("smollm2", store)).endswith(".gguf")  # the bundled model, not the folder
    assert str(resolve_source("smollm2")).endswith(".gguf")
    assert resolve_model("./smollm2", store) == Path("smollm2")  # a path is spelled as one
    (tmp_path / "mine").mkdir()
    with pytest.raises(Exception, match=r"write \./mine"):
        resolve_model("mine", store)


def test_admin_key_secrets_are_made_offline_and_provisioned_idempotently(tmp_path: Path) -> None:
    out = tmp_path / "admin.secret"
    assert main(["keys", "new-secret", "--out", str(out)]) == 0
    secret = out.read_text().strip()
    assert key_id_of(secret) is not None and mode(out) == 0o600
    with TenancyService.open(database_url(tmp_path / "data")) as service:
        created = service.ensure_admin_key(secret, "from a file")
        assert service.ensure_admin_key(secret, "from a file") == created  # a restart changes nothing
        assert service.authenticate(secret).admin
        assert [e.action for e in service.audit_events(SYSTEM)] == ["keys.create"]
        service.revoke_key(SYSTEM, created.id)
        assert service.ensure_admin_key(secret, "from a file").revoked_at is not None  # revoked stays revoked
        impostor = secret[:12] + new_secret(new_key_id())[12:]  # the same id, another secret
        with pytest.raises(AlreadyExistsError):
            service.ensure_admin_key(impostor, "from a file")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[BackgroundServer, Path, Path, str]]:
    """One server on a bootstrap configuration, started with its tenant.key path planted as a symlink to another
    file, an admin key to provision from a file, and the metrics endpoint given only a port."""
    root = tmp_path_factory.mktemp("served")
    model = save_tiny_llama(root / "tiny")
    data = root / "data"
    data.mkdir(mode=0o700)
    victim = root / "victim"
    victim.write_text("precious\n")
    (data / "tenant.key").symlink_to(victim)
    admin_file = root / "admin.secret"
    secret = new_secret(new_key_id())
    admin_file.write_text(secret + "\n")
    config = ServeConfig(data_dir=data, listen="127.0.0.1:0", admin_key_file=admin_file,
                         telemetry=TelemetryConfig(prometheus_listen=":0"),
                         models=(ModelDeploymentConfig("tiny", str(model), on_ray=False,
                                                       engine=EngineConfig(kv_cache_bytes=4 << 20, max_num_seqs=4)),))
    with BackgroundServer(config) as server:
        yield server, data, victim, secret


def test_bootstrap_keys_are_not_written_through_a_planted_symlink(served) -> None:
    server, data, victim, _ = served
    assert victim.read_text() == "precious\n"
    key = data / "tenant.key"
    assert not key.is_symlink() and mode(key) == 0o600 and key_id_of(key.read_text().strip()) is not None


def test_the_admin_key_file_is_provisioned_at_start(served) -> None:
    server, data, _, secret = served
    assert not (data / "admin.key").exists()  # no bootstrap admin key: the provisioned one is active
    with GarrisonClient(server.address, key=secret) as admin:
        events = admin.admin.list_audit_events().events
        assert any(e.action == "keys.create" and e.target == key_id_of(secret) and e.actor == "system" for e in events)
        tenant = admin.admin.get_quota(tenant="default")
    # The bootstrap tenant's limits (see BOOTSTRAP_QUOTA in garrison.serving.server).
    assert (tenant.max_concurrent_requests, tenant.tokens_per_minute, tenant.max_new_tokens) == (16, 200_000, 4096)


def test_the_metrics_endpoint_binds_loopback_unless_a_host_is_given(served) -> None:
    server, *_ = served
    port = server.server.telemetry.prometheus_port
    listening = [c.laddr for c in psutil.Process().net_connections(kind="tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
    assert [address.ip for address in listening] == ["127.0.0.1"]
