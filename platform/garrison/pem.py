"""Checks of PEM files before gRPC reads them: its C core aborts the whole process (SIGABRT) on a
certificate or key it cannot parse, so a wrong path or file must be refused here, with its name."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization

MAX_PEM_BYTES = 1 << 20
Kind = Literal["certificate", "private key"]


def pem_problem(path: Path, kind: Kind) -> str | None:
    """Why `path` is not a readable PEM `kind` (None: it is)."""
    try:
        if path.stat().st_size > MAX_PEM_BYTES:
            return f"{path} is over {MAX_PEM_BYTES >> 20} MiB: not a PEM {kind}"
        data = path.read_bytes()
    except OSError as err:
        return f"cannot read {path}: {err.strerror}"
    try:
        if kind == "certificate":
            x509.load_pem_x509_certificates(data)
        else:
            serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        return f"{path} is not a PEM {kind}" + (" (without a passphrase)" if kind == "private key" else "")
    return None
