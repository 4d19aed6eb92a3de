"""Options shared by every command that touches the encrypted store: where it is, and which KEK."""

from __future__ import annotations

import argparse

from garrison.weight_store.keys import ENV_FILE, ENV_KEY, ENV_SECRET_DIR, KeyProvider, provider_from_options
from garrison.weight_store.store import Store, default_store_dir


def add_store_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", metavar="DIR", default=None,
                        help=f"the store directory (default: the data dir's store/, here {default_store_dir()})")


def store_from_args(args: argparse.Namespace) -> Store:
    return Store(args.store or default_store_dir())


def add_kek_options(parser: argparse.ArgumentParser, prefix: str = "", title: str | None = None) -> None:
    """--{prefix}kek-file / --{prefix}kek-env / --{prefix}kek-secret-dir, at most one of them."""
    title = title or f"key-encryption key (one of; default from ${ENV_FILE}, ${ENV_SECRET_DIR} or ${ENV_KEY})"
    exclusive = parser.add_argument_group(title).add_mutually_exclusive_group()
    exclusive.add_argument(f"--{prefix}kek-file", metavar="PATH", help="file holding the KEK (mode 0600)")
    exclusive.add_argument(f"--{prefix}kek-env", metavar="VAR", help="environment variable holding the KEK")
    exclusive.add_argument(f"--{prefix}kek-secret-dir", metavar="DIR",
                           help="mounted Kubernetes Secret directory holding the KEK under key 'kek'")


def provider_from_args(args: argparse.Namespace, prefix: str = "") -> KeyProvider | None:
    """The provider the options name; without a prefix, else the one the environment names; else None."""
    attr = prefix.replace("-", "_")
    options = [getattr(args, f"{attr}kek_{name}", None) for name in ("file", "env", "secret_dir")]
    return provider_from_options(*options, environ={} if prefix else None)
