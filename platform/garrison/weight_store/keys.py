"""Key-encryption keys (KEKs), the providers that hold them, and the wrapped data keys they guard.

Each stored model has its own random data key; a KEK wraps it. A KeyProvider wraps and unwraps
through three methods and never hands the KEK out, so a provider backed by an HSM (PKCS#11:
C_WrapKey/C_UnwrapKey, or AES-GCM C_Encrypt/C_Decrypt on a key that never leaves the token) fits
the same interface. The providers here hold a 256-bit KEK in this process, read afresh on each
use: from a file (mode 0600), an environment variable, or a mounted Kubernetes Secret (which the
kubelet updates in place when the Secret is rotated).

Key bytes are never printed or logged: errors name the provider and the KEK id (a keyed hash
that identifies a KEK without revealing it).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from garrison import secret_files
from garrison_workers.errors import KeyUnavailableError, StoreIntegrityError, WrongKeyError
from garrison_workers.weights.store_format import FORMAT, DataKey, data_key_context

KEK_BYTES = 32
ENV_FILE, ENV_SECRET_DIR, ENV_KEY = "GARRISON_KEK_FILE", "GARRISON_KEK_SECRET_DIR", "GARRISON_KEK"
SECRET_KEY_NAME = "kek"  # the key inside the Kubernetes Secret
NO_PROVIDER = (f"no key-encryption key provider is configured: pass --kek-file PATH, --kek-env VAR or "
               f"--kek-secret-dir DIR, or set {ENV_FILE}, {ENV_SECRET_DIR} or {ENV_KEY}")


class KeyProvider(Protocol):
    def describe(self) -> str:
        """Where the KEK comes from, for messages (never the key itself)."""
        ...

    def key_id(self) -> str:
        """A stable fingerprint of the KEK that reveals nothing of it. Raises KeyUnavailableError."""
        ...

    def wrap(self, data_key: bytes, context: bytes) -> bytes:
        """`data_key` encrypted under the KEK, bound to `context` (associated data)."""
        ...

    def unwrap(self, wrapped: bytes, context: bytes) -> bytes:
        """The data key; WrongKeyError when this KEK (or this context) does not open `wrapped`."""
        ...


class _LocalKek:
    """A KEK held in this process: AES-256-GCM wrapping, nonce first."""

    def _kek(self) -> bytes:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def key_id(self) -> str:
        return hmac.new(self._kek(), b"garrison kek id v1", hashlib.sha256).hexdigest()[:16]

    def wrap(self, data_key: bytes, context: bytes) -> bytes:
        nonce = os.urandom(12)
        return nonce + AESGCM(self._kek()).encrypt(nonce, data_key, context)

    def unwrap(self, wrapped: bytes, context: bytes) -> bytes:
        try:
            return AESGCM(self._kek()).decrypt(wrapped[:12], wrapped[12:], context)
        except (InvalidTag, ValueError):
            raise WrongKeyError(f"the key-encryption key from {self.describe()} (KEK id {self.key_id()}) "
                                "does not unwrap it") from None


class FileKeyProvider(_LocalKek):
    def __init__(self, path: Path) -> None:
        self.path = Path(path).expanduser()

    def describe(self) -> str:
        return f"file {self.path}"

    def _kek(self) -> bytes:
        return parse_kek(read_secret_file(self.path, "KEK file",
                                          f"create one with `garrison keys create-kek {self.path}`"), self.describe())


class EnvKeyProvider(_LocalKek):
    def __init__(self, variable: str = ENV_KEY, environ: Mapping[str, str] | None = None) -> None:
        self.variable, self._environ = variable, os.environ if environ is None else environ

    def describe(self) -> str:
        return f"environment variable {self.variable}"

    def _kek(self) -> bytes:
        value = self._environ.get(self.variable)
        if not value:
            raise KeyUnavailableError(f"environment variable {self.variable} is not set; set it to the KEK "
                                      "(base64 or hex of 32 bytes) or choose another key provider")
        return parse_kek(value.encode(), self.describe())


class SecretDirKeyProvider(_LocalKek):
    """A Kubernetes Secret mounted as a directory, the KEK under key `kek` (mount it with defaultMode 0400)."""

    def __init__(self, directory: Path, key: str = SECRET_KEY_NAME) -> None:
        self.directory, self.key = Path(directory), key

    def describe(self) -> str:
        return f"Kubernetes Secret mounted at {self.directory} (key {self.key!r})"

    def _kek(self) -> bytes:
        path = self.directory / self.key
        try:
            raw = path.read_bytes()
        except OSError as err:
            raise KeyUnavailableError(f"cannot read the KEK from the {self.describe()}: {err.strerror}; mount "
                                      f"the Secret there with a {self.key!r} key") from None
        return parse_kek(raw, self.describe())


def provider_from_options(kek_file: str | None = None, kek_env: str | None = None, kek_secret_dir: str | None = None,
                          environ: Mapping[str, str] | None = None) -> KeyProvider | None:
    """The provider the options name, else the one the environment names, else None (none configured)."""
    environ = os.environ if environ is None else environ
    if kek_file:
        return FileKeyProvider(Path(kek_file))
    if kek_env:
        return EnvKeyProvider(kek_env, environ)
    if kek_secret_dir:
        return SecretDirKeyProvider(Path(kek_secret_dir))
    if environ.get(ENV_FILE):
        return FileKeyProvider(Path(environ[ENV_FILE]))
    if environ.get(ENV_SECRET_DIR):
        return SecretDirKeyProvider(Path(environ[ENV_SECRET_DIR]))
    if environ.get(ENV_KEY):
        return EnvKeyProvider(ENV_KEY, environ)
    return None


def require(provider: KeyProvider | None, why: str) -> KeyProvider:
    if provider is None:
        raise KeyUnavailableError(f"{why}, but {NO_PROVIDER}")
    return provider


def parse_kek(raw: bytes, where: str) -> bytes:
    """A 256-bit KEK written as 32 raw bytes, 64 hex digits or base64; the error never echoes the content."""
    if len(raw) == KEK_BYTES:
        return raw
    text = raw.strip()
    try:
        if len(text) == 2 * KEK_BYTES:
            return bytes.fromhex(text.decode("ascii"))
        decoded = base64.b64decode(text, validate=True)
        if len(decoded) == KEK_BYTES:
            return decoded
    except (ValueError, binascii.Error):
        pass
    raise KeyUnavailableError(f"the KEK in the {where} is not a 256-bit key: write 32 random bytes as base64, as "
                              "64 hex digits or raw (`garrison keys create-kek FILE` makes one)")


def create_kek_file(path: Path) -> FileKeyProvider:
    """A new random KEK, base64, in a new file of mode 0600."""
    write_secret_file(Path(path).expanduser(), base64.b64encode(os.urandom(KEK_BYTES)) + b"\n")
    return FileKeyProvider(path)


# -- secret files -----------------------------------------------------------------------------------


def write_secret_file(path: Path, data: bytes, replace: bool = False) -> None:
    """Write a key file only its owner can read (0600), never through a symlink; refuse to overwrite unless
    `replace` (see garrison.secret_files)."""
    try:
        secret_files.write_secret_file(path, data, replace=replace)
    except secret_files.SecretFileError as err:
        raise KeyUnavailableError(str(err)) from None


def read_secret_file(path: Path, what: str, hint: str) -> bytes:
    """A key file's bytes, refusing one that group or others may read or write (as ssh does)."""
    try:
        return secret_files.read_secret_file(path, what, hint)
    except secret_files.SecretFileError as err:
        raise KeyUnavailableError(str(err)) from None


# -- the manifest signing key -------------------------------------------------------------------------


def load_or_create_signing_key(path: Path) -> Ed25519PrivateKey:
    """The Ed25519 key that signs manifests at import (PEM, mode 0600), created on first use."""
    if not path.exists():
        key = Ed25519PrivateKey.generate()
        write_secret_file(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
        return key
    pem = read_secret_file(path, "signing key", "")
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        raise KeyUnavailableError(f"signing key {path} is not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyUnavailableError(f"signing key {path} is not an Ed25519 key")
    return key


def public_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


# -- wrapped data keys --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WrappedDataKey:
    """The content of a model's datakey.json; safe to read without the KEK, useless without it."""

    model_id: str
    signer: bytes
    kek_id: str  # which KEK wrapped it, so a wrong-key error can say which one is needed
    wrapped: bytes

    def to_bytes(self) -> bytes:
        return json.dumps({"format": FORMAT, "model_id": self.model_id, "signer": self.signer.hex(),
                           "kek_id": self.kek_id, "wrapped": base64.b64encode(self.wrapped).decode()},
                          indent=1).encode() + b"\n"

    @classmethod
    def read(cls, path: Path) -> "WrappedDataKey":
        try:
            raw = json.loads(path.read_bytes())
            return cls(str(raw["model_id"]), bytes.fromhex(raw["signer"]), str(raw["kek_id"]),
                       base64.b64decode(raw["wrapped"], validate=True))
        except OSError as err:
            raise StoreIntegrityError(f"cannot read {path}: {err.strerror}; the stored model is incomplete") from None
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise StoreIntegrityError(f"{path} is not a valid wrapped data key file; restore it from backup") from None


def wrap_data_key(provider: KeyProvider, model_id: str, signer: bytes, data_key: bytes) -> WrappedDataKey:
    return WrappedDataKey(model_id, signer, provider.key_id(),
                          provider.wrap(data_key, data_key_context(model_id, signer)))


def unwrap_data_key(provider: KeyProvider, wrapped: WrappedDataKey, model: str) -> DataKey:
    try:
        secret = provider.unwrap(wrapped.wrapped, data_key_context(wrapped.model_id, wrapped.signer))
    except WrongKeyError as err:
        raise WrongKeyError(
            f"cannot open model {model!r}: {err}. Its data key was wrapped under KEK id {wrapped.kek_id}: use that "
            "KEK (after `garrison keys rotate-kek`, the new one), or restore datakey.json if it was altered") from None
    return DataKey(wrapped.model_id, wrapped.signer, secret)
