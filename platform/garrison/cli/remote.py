"""The connection options every remote command shares: `garrison [--server] [--key-file] [--tls-*] COMMAND`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from garrison.client import DEFAULT_SERVER, GarrisonClient, TLSFiles
from garrison.paths import default_data_dir
from garrison.pem import pem_problem
from garrison.tenancy.keys import read_key_file
from garrison_workers.errors import GarrisonError


def add_connection_options(parser: argparse.ArgumentParser) -> None:
    """The options with their defaults, on the top-level parser (`garrison --server X chat`)."""
    _add(parser, {"server": os.environ.get("GARRISON_SERVER", DEFAULT_SERVER),
                  "key_file": os.environ.get("GARRISON_KEY_FILE"), "tls_ca": None, "tls_cert": None, "tls_key": None})


def connection_parent() -> argparse.ArgumentParser:
    """The same options for a subcommand (`garrison chat --server X`), without defaults that would
    override what was given before the subcommand."""
    parent = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    _add(parent, None)
    return parent


def _add(parser: argparse.ArgumentParser, defaults: dict[str, object] | None) -> None:
    group = parser.add_argument_group("connection (for commands that call a server)")
    options = (
        ("--server", "server", str, f"HOST:PORT of the Garrison gRPC server (env GARRISON_SERVER; default {DEFAULT_SERVER})"),
        ("--key-file", "key_file", Path, "file holding the API key (env GARRISON_KEY_FILE; default: the data dir's "
                                         "admin.key for admin commands, tenant.key for chat)"),
        ("--tls-ca", "tls_ca", Path, "CA certificate to verify the server (turns on TLS)"),
        ("--tls-cert", "tls_cert", Path, "client certificate, for servers that require mTLS"),
        ("--tls-key", "tls_key", Path, "client certificate's private key"),
    )
    for flag, dest, kind, help_text in options:
        if defaults is None:
            group.add_argument(flag, dest=dest, type=kind, help=help_text)
        else:
            group.add_argument(flag, dest=dest, type=kind, default=defaults[dest], help=help_text)


def connect(args: argparse.Namespace, default_key: str) -> GarrisonClient:
    """A client for the options given, after checking them: a key file that holds a key, TLS files that are
    PEM certificates and keys (gRPC would abort the process on anything else)."""
    key = read_key_file(Path(args.key_file or default_data_dir() / default_key))
    tls = None
    if args.tls_ca or args.tls_cert or args.tls_key:
        tls = TLSFiles(args.tls_ca, args.tls_cert, args.tls_key)
        _check_tls(tls)
    return GarrisonClient(args.server, key=key, tls=tls, timeout=None)


def _check_tls(tls: TLSFiles) -> None:
    if (tls.cert is None) != (tls.key is None):
        raise GarrisonError("a client certificate needs its key: pass both --tls-cert and --tls-key")
    for path, kind in ((tls.ca, "certificate"), (tls.cert, "certificate"), (tls.key, "private key")):
        problem = pem_problem(Path(path).expanduser(), kind) if path is not None else None  # type: ignore[arg-type]
        if problem:
            raise GarrisonError(problem)
