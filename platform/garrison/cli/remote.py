"""The connection options every remote command shares: `garrison [--server] [--key-file] [--tls-*] COMMAND`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from garrison.client import DEFAULT_SERVER, GarrisonClient, TLSFiles
from garrison.paths import default_data_dir


def add_connection_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("connection (for commands that call a server)")
    group.add_argument("--server", default=os.environ.get("GARRISON_SERVER", DEFAULT_SERVER),
                       help="HOST:PORT of the Garrison gRPC server (env GARRISON_SERVER; default %(default)s)")
    group.add_argument("--key-file", type=Path, default=os.environ.get("GARRISON_KEY_FILE"),
                       help="file holding the API key (env GARRISON_KEY_FILE; default: the data dir's admin.key "
                            "for admin commands, tenant.key for chat)")
    group.add_argument("--tls-ca", type=Path, help="CA certificate to verify the server (turns on TLS)")
    group.add_argument("--tls-cert", type=Path, help="client certificate, for servers that require mTLS")
    group.add_argument("--tls-key", type=Path, help="client certificate's private key")


def connect(args: argparse.Namespace, default_key: str) -> GarrisonClient:
    key_file = args.key_file or default_data_dir() / default_key
    tls = None
    if args.tls_ca or args.tls_cert:
        tls = TLSFiles(args.tls_ca, args.tls_cert, args.tls_key)
    return GarrisonClient(args.server, key_file=key_file, tls=tls, timeout=None)
