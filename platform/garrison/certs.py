"""A private certificate authority for clusters with no public PKI: a CA, the gateway's server
certificate and mTLS client certificates, all ECDSA P-256 (which gRPC's BoringSSL speaks).

Files in the output directory: `ca.crt`/`ca.key`, `server.crt`/`server.key`, and
`client-<NAME>.crt`/`client-<NAME>.key` per client. Keys are unencrypted PEM (gRPC reads them as
is) with mode 0600, so the directory itself is created 0700.

An existing CA is reused, so certificates for new clients can be added later and still be trusted
by the running server. Nothing existing is overwritten without `force`: a new CA (`new_ca`) also
remakes the server certificate, since the old one would no longer verify. All refusals are decided
before the first file is written.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from garrison_workers.errors import GarrisonError

DEFAULT_HOSTS = ("localhost", "127.0.0.1")
CA_DAYS = 3650
LEAF_DAYS = 825  # the longest lifetime common TLS clients accept for a leaf certificate
CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
DNS_NAME = re.compile(r"(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")


class CertificateError(GarrisonError):
    """The certificate files cannot be made as asked: they exist, are half there, or a name is invalid."""


@dataclass(frozen=True, slots=True)
class CertKeyPair:
    cert: Path
    key: Path

    def exists(self) -> bool:
        return self.cert.exists() or self.key.exists()


@dataclass(frozen=True, slots=True)
class CertFiles:
    """The files of one output directory; `made` names those written by this run."""

    ca: CertKeyPair
    server: CertKeyPair | None
    clients: dict[str, CertKeyPair]
    made: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, object]:
        return {"ca_cert": str(self.ca.cert), "ca_key": str(self.ca.key),
                "server_cert": str(self.server.cert) if self.server else None,
                "server_key": str(self.server.key) if self.server else None,
                "clients": {name: {"cert": str(p.cert), "key": str(p.key)} for name, p in self.clients.items()}, "made": list(self.made)}


def layout(out_dir: Path) -> tuple[CertKeyPair, CertKeyPair]:
    return (CertKeyPair(out_dir / "ca.crt", out_dir / "ca.key"),
            CertKeyPair(out_dir / "server.crt", out_dir / "server.key"))


def client_files(out_dir: Path, name: str) -> CertKeyPair:
    return CertKeyPair(out_dir / f"client-{name}.crt", out_dir / f"client-{name}.key")


def make_certs(out_dir: Path, *, hosts: Sequence[str] | None = None, clients: Sequence[str] = (),
               new_ca: bool = False, force: bool = False, days: int = LEAF_DAYS) -> CertFiles:
    """Make what is missing or asked for in `out_dir` (see the module docstring for the rules).

    `hosts` (DNS names or IP addresses) asks for a server certificate with those SANs; None makes
    one for localhost and 127.0.0.1 only if there is none yet.
    """
    out_dir = Path(out_dir).expanduser()
    ca_files, server_files = layout(out_dir)
    names = list(dict.fromkeys(_check_client(name) for name in clients))
    sans = [_san(host) for host in dict.fromkeys(hosts or DEFAULT_HOSTS)]
    if days < 1:
        raise CertificateError(f"--days must be at least 1, not {days}")
    make_ca = new_ca or not ca_files.exists()
    make_server = make_ca or hosts is not None or not server_files.exists()
    planned = ([("CA", ca_files)] if make_ca else []) + ([("server", server_files)] if make_server else []) + [
        (f"client {name}", client_files(out_dir, name)) for name in names]
    _refuse_overwrites(planned, force, ca_reused=not make_ca, ca_files=ca_files)

    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    now = datetime.now(timezone.utc) - timedelta(minutes=5)  # tolerate clocks slightly behind ours
    if make_ca:
        ca_key, ca_cert = _new_ca(now)
        _write(ca_files, ca_key, ca_cert)
    else:
        ca_key, ca_cert = _load(ca_files)
    if make_server:
        subject = str(sans[0].value)
        key, cert = _leaf(ca_key, ca_cert, subject, sans, ExtendedKeyUsageOID.SERVER_AUTH, now, days)
        _write(server_files, key, cert)
    for name in names:
        key, cert = _leaf(ca_key, ca_cert, name, [], ExtendedKeyUsageOID.CLIENT_AUTH, now, days)
        _write(client_files(out_dir, name), key, cert)
    existing = {path.name[len("client-"):-len(".crt")] for path in out_dir.glob("client-*.crt")}
    return CertFiles(ca=ca_files, server=server_files if server_files.cert.exists() else None,
                     clients={name: client_files(out_dir, name) for name in sorted(existing)},
                     made=tuple(what for what, _ in planned))


def _refuse_overwrites(planned: list[tuple[str, CertKeyPair]], force: bool, *, ca_reused: bool,
                       ca_files: CertKeyPair) -> None:
    if ca_reused and not (ca_files.cert.exists() and ca_files.key.exists()):
        missing = ca_files.key if ca_files.cert.exists() else ca_files.cert
        raise CertificateError(f"{missing} is missing but its partner exists: restore it, "
                               f"or make a new CA with --new-ca --force (every certificate must then be remade)")
    if force:
        return
    existing = [str(path) for _, pair in planned for path in (pair.cert, pair.key) if path.exists()]
    if existing:
        raise CertificateError(f"refusing to overwrite {', '.join(existing)}: pass --force to replace "
                               f"{'them' if len(existing) > 1 else 'it'}")


def _check_client(name: str) -> str:
    if not CLIENT_NAME.fullmatch(name):
        raise CertificateError(f"client name {name!r} is invalid: use letters, digits, '.', '_' and '-' "
                               f"(it becomes the certificate's CN and part of a file name)")
    return name


def _san(host: str) -> x509.GeneralName:
    host = host.strip()
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if len(host) > 253 or not DNS_NAME.fullmatch(host):
        raise CertificateError(f"--host {host!r} is neither an IP address nor a DNS name")
    return x509.DNSName(host.lower())


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _new_ca(now: datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Garrison"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "Garrison private CA")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(cert_sign=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def _leaf(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, common_name: str,
          sans: list[x509.GeneralName], usage: x509.ObjectIdentifier, now: datetime,
          days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _new_key()
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
               .issuer_name(ca_cert.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now).not_valid_after(min(now + timedelta(days=days), ca_cert.not_valid_after_utc))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(_key_usage(cert_sign=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                              critical=False))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=not cert_sign, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign,
                         crl_sign=cert_sign, encipher_only=False, decipher_only=False)


def _load(files: CertKeyPair) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    try:
        key = serialization.load_pem_private_key(files.key.read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    except (ValueError, TypeError) as err:
        raise CertificateError(f"cannot read the CA in {files.cert.parent}: {err}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise CertificateError(f"{files.key} is not the ECDSA key of {files.cert}")
    return key, cert


def _write(files: CertKeyPair, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
    _write_atomic(files.key, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()), mode=0o600)
    _write_atomic(files.cert, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)


def _write_atomic(path: Path, data: bytes, *, mode: int) -> None:
    # mkstemp creates the file 0600, so a key is never readable by others, not even for a moment.
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            os.fchmod(file.fileno(), mode)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
