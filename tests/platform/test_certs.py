"""`garrison certs` makes files a real gRPC server and client use for mutual TLS."""

from __future__ import annotations

import ipaddress
import json
import stat
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from garrison.certs import CertificateError, CertKeyPair, make_certs
from garrison.cli import main


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pki") / "certs"
    make_certs(out, clients=["alice"])
    return out


@pytest.fixture(scope="module")
def mtls_port(pki: Path):
    """A gRPC server with the health service that requires a client certificate from our CA."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    credentials = grpc.ssl_server_credentials(
        [((pki / "server.key").read_bytes(), (pki / "server.crt").read_bytes())],
        root_certificates=(pki / "ca.crt").read_bytes(), require_client_auth=True)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    yield port
    server.stop(grace=None)


def check_health(port: int, ca: Path, client: CertKeyPair | None, target_host: str | None = None) -> str:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(), private_key=client.key.read_bytes() if client else None,
        certificate_chain=client.cert.read_bytes() if client else None)
    options = [("grpc.ssl_target_name_override", target_host)] if target_host else []
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials, options=options) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def test_server_accepts_a_client_with_our_certificate(pki: Path, mtls_port: int) -> None:
    alice = CertKeyPair(pki / "client-alice.crt", pki / "client-alice.key")
    assert check_health(mtls_port, pki / "ca.crt", alice) == "SERVING"  # IP SAN 127.0.0.1
    assert check_health(mtls_port, pki / "ca.crt", alice, target_host="localhost") == "SERVING"  # DNS SAN


def test_server_rejects_clients_without_a_certificate_from_our_ca(pki: Path, mtls_port: int,
                                                                  tmp_path: Path) -> None:
    stranger = make_certs(tmp_path / "other", clients=["mallory"])
    for ca, client in ((pki / "ca.crt", None), (pki / "ca.crt", stranger.clients["mallory"])):
        with pytest.raises(grpc.RpcError) as err:
            check_health(mtls_port, ca, client)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    # And a client that trusts only another CA refuses our server.
    with pytest.raises(grpc.RpcError):
        check_health(mtls_port, stranger.ca.cert, CertKeyPair(pki / "client-alice.crt", pki / "client-alice.key"))
    with pytest.raises(grpc.RpcError):  # a name the server certificate does not carry
        check_health(mtls_port, pki / "ca.crt", CertKeyPair(pki / "client-alice.crt", pki / "client-alice.key"),
                     target_host="gateway.example")


def test_a_client_added_later_is_signed_by_the_same_ca(pki: Path, mtls_port: int) -> None:
    files = make_certs(pki, clients=["bob"])
    assert files.made == ("client bob",) and set(files.clients) == {"alice", "bob"}
    assert check_health(mtls_port, pki / "ca.crt", files.clients["bob"]) == "SERVING"


def test_certificates_say_what_they_are_for(tmp_path: Path) -> None:
    files = make_certs(tmp_path, hosts=["gw.internal", "10.0.0.7", "::1"], clients=["ci"])
    ca = x509.load_pem_x509_certificate(files.ca.cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server.cert.read_bytes())
    client = x509.load_pem_x509_certificate(files.clients["ci"].cert.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["gw.internal"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.7"), ipaddress.ip_address("::1")]
    assert list(server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH]
    assert client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "ci"
    assert list(client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH]
    for cert in (server, client):
        cert.verify_directly_issued_by(ca)
    for key in (files.ca.key, files.server.key, files.clients["ci"].key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(tmp_path.stat().st_mode) != 0o600 and stat.S_IMODE(files.ca.cert.stat().st_mode) == 0o644


def test_existing_files_are_never_overwritten_without_force(tmp_path: Path) -> None:
    first = make_certs(tmp_path, clients=["ci"])
    assert first.made == ("CA", "server", "client ci")
    ca_bytes, key_bytes = first.ca.key.read_bytes(), first.clients["ci"].key.read_bytes()
    for kwargs in (dict(clients=["ci"]), dict(hosts=["localhost"]), dict(new_ca=True)):
        with pytest.raises(CertificateError, match="--force"):
            make_certs(tmp_path, **kwargs)
    assert first.ca.key.read_bytes() == ca_bytes and first.clients["ci"].key.read_bytes() == key_bytes
    assert make_certs(tmp_path).made == ()  # nothing asked, nothing missing: nothing written
    again = make_certs(tmp_path, clients=["ci"], force=True)
    assert again.made == ("client ci",) and again.clients["ci"].key.read_bytes() != key_bytes
    assert first.ca.key.read_bytes() == ca_bytes  # --force alone never replaces the CA
    assert make_certs(tmp_path, new_ca=True, force=True).made == ("CA", "server")
    assert first.ca.key.read_bytes() != ca_bytes
    for bad in (dict(clients=["../x"]), dict(hosts=["bad host"]), dict(days=0)):
        with pytest.raises(CertificateError):
            make_certs(tmp_path / "bad", **bad)


def test_cli_prints_json_and_reports_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["certs", "--data-dir", str(tmp_path), "--client", "alice", "--host", "gw,10.1.2.3", "--json"]) == 0
    paths = json.loads(capsys.readouterr().out)
    assert paths["ca_cert"] == str(tmp_path / "certs" / "ca.crt")
    assert Path(paths["clients"]["alice"]["key"]).exists() and paths["made"] == ["CA", "server", "client alice"]
    assert main(["certs", "--out", str(tmp_path / "certs"), "--client", "alice"]) == 1
    assert capsys.readouterr().err.startswith("garrison: error: refusing to overwrite")
    assert main(["certs", "--out", str(tmp_path / "certs"), "--client", "bob"]) == 0
    table = capsys.readouterr().out
    assert "client bob" in table and "(new)" in table and "client alice" in table
