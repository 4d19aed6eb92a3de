"""API key secrets: how they are minted, recognised and hashed.

A secret reads `gk_<8 hex>_<43 base64url chars>`; its first 11 characters are the key's public id
(safe to log and to look the key up by), the rest is 32 bytes from `secrets`. The store keeps only
SHA-256 of the whole secret: with 256 bits of entropy a fast unsalted hash cannot be brute-forced,
and unlike a password hash it costs microseconds on every request.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from pathlib import Path

from garrison.tenancy.errors import InvalidArgumentError

KEY_PREFIX = "gk_"
ID_LENGTH = len(KEY_PREFIX) + 8
SECRET = re.compile(r"gk_[0-9a-f]{8}_[A-Za-z0-9_-]{43}")
KEY_ID = re.compile(r"gk_[0-9a-f]{8}")
MAX_KEY_FILE_BYTES = 4096


def new_key_id() -> str:
    return KEY_PREFIX + secrets.token_hex(4)


def new_secret(key_id: str) -> str:
    return f"{key_id}_{secrets.token_urlsafe(32)}"


def is_key_id(text: object) -> bool:
    return isinstance(text, str) and KEY_ID.fullmatch(text) is not None


def key_id_of(secret: str) -> str | None:
    """The public id inside a well-formed secret, or None for anything else."""
    return secret[:ID_LENGTH] if isinstance(secret, str) and SECRET.fullmatch(secret) else None


def hash_secret(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("ascii")).digest()


def secret_matches(secret: str, stored_hash: bytes) -> bool:
    return hmac.compare_digest(hash_secret(secret), stored_hash)


def read_key_file(path: Path) -> str:
    """The secret in a key file (one line; e.g. a mounted Kubernetes Secret). The file's mode is not checked:
    a Secret mounted for a non-root user is group-readable. Errors never show the file's content."""
    try:
        with open(path, "rb") as file:
            raw = file.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as err:
        raise InvalidArgumentError(f"cannot read the key file {path}: {err.strerror}") from None
    try:
        secret = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        secret = ""
    if len(raw) > MAX_KEY_FILE_BYTES or key_id_of(secret) is None:
        raise InvalidArgumentError(f"{path} does not hold an API key secret (gk_<8 hex>_<43 characters>, one line): "
                                   f"make one with `garrison keys new-secret`")
    return secret
