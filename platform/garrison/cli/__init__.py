"""The `garrison` command: one entry point, one module per subcommand."""

from __future__ import annotations

import argparse
import sys

from garrison import __version__
from garrison.cli import generate, kek, models
from garrison_workers.errors import GarrisonError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="garrison", description="Serve Mixture-of-Experts language models on your own GPU cluster.")
    parser.add_argument("--version", action="version", version=f"garrison {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    generate.register(commands)
    models.register(commands)
    keys = commands.add_parser("keys", help="key management (key-encryption keys of the weight store)",
                               description="Key management. Each subcommand group registers itself here.")
    keys_commands = keys.add_subparsers(dest="keys_command", metavar="KEYS_COMMAND", required=True)
    kek.register(keys_commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except GarrisonError as err:
        print(f"garrison: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("garrison: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
