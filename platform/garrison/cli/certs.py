"""`garrison certs`: make a private CA, the server certificate and mTLS client certificates."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from garrison.certs import DEFAULT_HOSTS, LEAF_DAYS, CertFiles, make_certs
from garrison.paths import default_data_dir


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "certs", help="make a private CA, server and client certificates for TLS and mTLS",
        description="Make a private certificate authority (ECDSA P-256), a server certificate for the "
                    "gateway and client certificates for mTLS, for clusters with no public PKI. An existing "
                    "CA in the output directory is reused; existing files are never overwritten without --force.")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help=f"Garrison's data directory (default: {default_data_dir()})")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: <data-dir>/certs)")
    parser.add_argument("--host", action="append", default=None, metavar="NAME_OR_IP",
                        help=f"DNS name or IP address the server is reached at, repeatable or comma-separated "
                             f"(default on first run: {','.join(DEFAULT_HOSTS)}); giving it remakes the server "
                             f"certificate")
    parser.add_argument("--client", action="append", default=[], metavar="NAME",
                        help="make a client certificate with CN=NAME (repeatable)")
    parser.add_argument("--new-ca", action="store_true", help="make a new CA even if one exists (with --force)")
    parser.add_argument("--force", action="store_true", help="overwrite existing certificates and keys")
    parser.add_argument("--days", type=int, default=LEAF_DAYS, help=f"days the server and client certificates are valid (default: {LEAF_DAYS})")
    parser.add_argument("--json", action="store_true", help="print the file paths as one JSON object")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    out = args.out or (args.data_dir or default_data_dir()) / "certs"
    hosts = None if args.host is None else [h for value in args.host for h in value.split(",") if h.strip()]
    files = make_certs(out, hosts=hosts, clients=args.client, new_ca=args.new_ca, force=args.force, days=args.days)
    print(json.dumps(files.to_json(), indent=2) if args.json else _table(files))
    return 0


def _table(files: CertFiles) -> str:
    rows = [("CA", files.ca)] + ([("server", files.server)] if files.server else []) + [
        (f"client {name}", pair) for name, pair in files.clients.items()]
    width = max(len(what) for what, _ in rows)
    made = set(files.made)
    lines = [f"{what:<{width}}  {pair.cert}  {pair.key}{'  (new)' if what in made else ''}" for what, pair in rows]
    return "\n".join(lines + ["", f"Give clients {files.ca.cert} to trust the server; keep the .key files secret."])
