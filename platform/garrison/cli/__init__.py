"""The `garrison` command: one entry point, one module per subcommand."""

from __future__ import annotations

import argparse
import sys

from garrison import __version__
from garrison.cli import admin, certs, chat, controller, generate, kek, models, plan, serve
from garrison.cli.remote import add_connection_options
from garrison_workers.errors import GarrisonError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="garrison", description="Serve Mixture-of-Experts language models on your own GPU cluster.")
    parser.add_argument("--version", action="version", version=f"garrison {__version__}")
    add_connection_options(parser)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    serve.register(commands)  # and `garrison gateway`
    controller.register(commands)
    generate.register(commands)
    chat.register(commands)
    keys_commands = admin.register(commands)  # `garrison keys`: API keys here, the store's KEK below
    kek.register(keys_commands)
    models.register(commands)
    certs.register(commands)
    plan.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except GarrisonError as err:
        print(f"garrison: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # a path given that cannot be used (too long, not a directory, no permission...)
        where = f": {err.filename}" if err.filename else ""
        print(f"garrison: error: {err.strerror or err}{where}", file=sys.stderr)
        return 1
    except ValueError as err:  # a path with a NUL byte in it (the OS cannot take one)
        if "null byte" not in str(err):
            raise
        print("garrison: error: a path given contains a NUL byte", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("garrison: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
