"""`garrison keys rotate-kek` and `garrison keys create-kek`: key-encryption keys of the weight store.

The `keys` group is created in `garrison.cli`; other modules may register their own subcommands
in it (API keys, for instance) beside these.
"""

from __future__ import annotations

import argparse
from typing import Any

from garrison.cli.store_options import add_kek_options, add_store_option, provider_from_args, store_from_args
from garrison.weight_store.keys import create_kek_file, require
from garrison_workers.errors import KeyUnavailableError


def register(keys_commands: Any) -> None:
    rotate = keys_commands.add_parser(
        "rotate-kek", help="rewrap every stored model's data key under a new key-encryption key",
        description="Unwrap each model's data key with the current KEK and wrap it with the new one. Tensor "
                    "files and manifests are not touched; afterwards only the new KEK opens the models.")
    add_store_option(rotate)
    rotate.add_argument("--model", action="append", dest="models", metavar="NAME",
                        help="rotate only this model (repeatable; default: every model in the store)")
    add_kek_options(rotate)
    add_kek_options(rotate, prefix="new-", title="new key-encryption key (required, one of)")
    rotate.set_defaults(run=run_rotate)

    create = keys_commands.add_parser(
        "create-kek", help="write a new random key-encryption key to a file (mode 0600)",
        description="Write 32 random bytes, base64, to FILE with mode 0600. The key is never printed; keep the "
                    "file apart from the store (or load it into a Kubernetes Secret).")
    create.add_argument("file", metavar="FILE", help="where to write the key (must not exist)")
    create.set_defaults(run=run_create)


def run_rotate(args: argparse.Namespace) -> int:
    store = store_from_args(args)
    old = require(provider_from_args(args), "rotate-kek needs the current KEK to unwrap the data keys")
    new = provider_from_args(args, "new-")
    if new is None:
        raise KeyUnavailableError("rotate-kek needs the new KEK: pass --new-kek-file PATH, --new-kek-env VAR or "
                                  "--new-kek-secret-dir DIR (`garrison keys create-kek FILE` makes one)")
    rotated = store.rotate_kek(old, new, args.models)
    print(f"rewrapped {len(rotated)} model(s) in {store.root} under KEK id {new.key_id()}"
          + (f": {', '.join(rotated)}" if rotated else " (all were already under it)"))
    return 0


def run_create(args: argparse.Namespace) -> int:
    provider = create_kek_file(args.file)
    print(f"wrote a new key-encryption key to {provider.path} (KEK id {provider.key_id()}, mode 0600)")
    return 0

