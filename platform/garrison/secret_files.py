"""Files that hold secrets (API keys, KEKs, signing keys): owner-only, whole, and never written through a link.

A secret is first written to a new temporary file beside its destination, created with O_CREAT | O_EXCL |
O_NOFOLLOW and mode 0600 (whatever the umask), and flushed; it then takes the destination's name in one
step. `os.link` places it when the destination must not exist yet: it fails on any entry already there, a
symlink included, so nothing planted at that name is followed or overwritten. `os.replace` places it when
the destination is to be replaced: a rename swaps the directory entry, so a symlink there is replaced
itself, never written through. Readers refuse a key file that group or others may access (as ssh does).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from pathlib import Path

from garrison_workers.errors import GarrisonError


class SecretFileError(GarrisonError):
    """A secret file cannot be written or read safely (exists already, wrong mode, unreadable)."""


def write_secret_file(path: Path, data: bytes, *, replace: bool = False) -> Path:
    """Write `data` to `path` (mode 0600); refuse an existing `path` unless `replace`."""
    path = Path(path)
    if not path.name or path.is_dir():
        raise SecretFileError(f"{path} is a directory: give the name of the file to write")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        _place(temp, path, replace)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
    return path


def _place(temp: Path, path: Path, replace: bool) -> None:
    if replace:
        os.replace(temp, path)
        return
    try:
        os.link(temp, path)
    except FileExistsError:
        raise SecretFileError(f"{path} already exists; refusing to overwrite a key file") from None
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        if os.path.lexists(path):  # a filesystem without hard links: check, then rename
            raise SecretFileError(f"{path} already exists; refusing to overwrite a key file") from None
        os.rename(temp, path)


def read_secret_file(path: Path, what: str, hint: str) -> bytes:
    """A key file's bytes, refusing one that group or others may read or write."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise SecretFileError(f"{what} {path} does not exist; {hint}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecretFileError(f"{what} {path} is accessible to group or others (mode {stat.S_IMODE(mode):04o}); "
                              f"run `chmod 600 {path}`")
    try:
        return path.read_bytes()
    except OSError as err:
        raise SecretFileError(f"cannot read {what} {path}: {err.strerror}") from None
