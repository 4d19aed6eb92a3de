"""The connection options every remote command shares: `garrison [--server] [--key-file] [--tls-*] COMMAND`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from garrison.client import DEFAULT_SERVER, GarrisonClient, TLSFiles
from garrison.paths import default_data_dir


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
    key_file = args.key_file or default_data_dir() / default_key
    tls = None
    if args.tls_ca or args.tls_cert:
        tls = TLSFiles(args.tls_ca, args.tls_cert, args.tls_key)
    return GarrisonClient(args.server, key_file=key_file, tls=tls, timeout=None)
