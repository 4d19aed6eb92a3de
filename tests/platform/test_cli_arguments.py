"""The `garrison` command never answers bad arguments with a traceback (or a crash): each subcommand, given
out-of-range numbers, malformed times, missing or wrong files, odd text, exits non-zero with a one-line
`garrison: error: ...` (or argparse's usage message), whatever the values."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from garrison.cli import build_parser, main
from garrison.tenancy.keys import new_key_id, new_secret

# Values an option may be given by mistake: out of range, malformed, empty, enormous, not text at all.
# (No NUL: a command line cannot carry one.)
BAD_VALUES = ["-1", "0", "-0.5", "nan", "inf", "1e999", "99999999999999999999999", "", " ", "x", "x" * 300,
              "1,2,x", "2026-13-45", "\u2603\u00e9", "missing/file", "junk.txt", "junkdir", "../../..", "-",
              "smollm3", "127.0.0.1:1", "[::1]:99999"]


def leaf_commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...],
                                                                                                    argparse.ArgumentParser]]:
    """Every runnable subcommand (`tenants create`, `keys new-secret`, ...) with its parser."""
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subparsers:
        yield prefix, parser
        return
    for name, sub in subparsers[0].choices.items():
        yield from leaf_commands(sub, prefix + (name,))


COMMANDS = dict(leaf_commands(build_parser()))


def options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, (argparse._HelpAction, argparse._VersionAction))]


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A working directory and data directory with junk files and valid-looking keys; no server listens at
    the address remote commands are sent to, so they get as far as connecting."""
    root = tmp_path_factory.mktemp("cli")
    data = root / "data"
    data.mkdir(mode=0o700)
    for name in ("admin.key", "tenant.key"):
        (data / name).write_text(new_secret(new_key_id()) + "\n")
        (data / name).chmod(0o600)
    (root / "junk.txt").write_bytes(b"\x00\xffnot a model, a key, a certificate or YAML: [\n")
    (root / "junkdir").mkdir()
    (root / "junkdir" / "config.json").write_text('{"model_type": "llama", "hidden_size": "wide"}')
    saved = (Path.cwd(), dict(os.environ))
    os.chdir(root)
    os.environ.update(GARRISON_DATA_DIR=str(data), GARRISON_SERVER="127.0.0.1:1")
    for name in ("GARRISON_KEY_FILE", "GARRISON_KEK_FILE", "GARRISON_KEK", "GARRISON_KEK_SECRET_DIR"):
        os.environ.pop(name, None)
    yield root
    os.chdir(saved[0])
    os.environ.clear()
    os.environ.update(saved[1])


def run(argv: list[str]) -> tuple[int, str]:
    """`garrison ARGV` in this process; (exit status, stderr). Any exception escaping main() fails the test."""
    err, out, stdin = io.StringIO(), io.StringIO(), sys.stdin
    sys.stdin = io.StringIO("")  # `chat` without --prompt reads turns from stdin: none
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            status = main(argv)
    except SystemExit as exit_:
        status = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.stdin = stdin
    return status, err.getvalue()


def safe(argv: list[str]) -> list[str]:
    """Never start a server (`serve` only checks), a gateway or controller (no cluster: refused), nor a calibration
    (minutes: the last --threads given, which wins, is never valid)."""
    if argv[:1] == ["serve"]:
        return argv + ["--check"]
    if argv[:2] == ["plan", "calibrate"]:
        return argv + ["--threads", "0"]
    return argv


def assert_refused_cleanly(argv: list[str]) -> None:
    status, stderr = run(safe(argv))
    assert "Traceback" not in stderr, (argv, stderr)
    if status != 0 and "--json" not in argv:  # --json commands answer their failure as JSON on stdout
        assert "error:" in stderr, (argv, stderr)


@pytest.mark.parametrize("command", sorted(COMMANDS), ids=" ".join)
def test_each_option_of_each_subcommand_with_bad_values(sandbox: Path, command: tuple[str, ...]) -> None:
    parser = COMMANDS[command]
    positionals = [a for a in options(parser) if not a.option_strings]
    for action in options(parser):
        if not action.option_strings or action.nargs == 0:
            continue
        for value in ("-1", "99999999999999999999999", "1e999", "x" * 300, "junk.txt", "junkdir", "2026-13-45"):
            argv = [*command, *["x"] * len(positionals), action.option_strings[-1], value]
            assert_refused_cleanly(argv)
    for i in range(len(positionals)):
        for value in ("", "../../..", "junk.txt", "junkdir", "-1"):
            args = ["x"] * len(positionals)
            args[i] = value
            assert_refused_cleanly([*command, *args])


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_random_argument_vectors_never_print_a_traceback(sandbox: Path, data: st.DataObject) -> None:
    command = data.draw(st.sampled_from(sorted(COMMANDS)))
    parser = COMMANDS[command]
    argv = list(command)
    flags = [a for a in options(parser) if a.option_strings]
    for action in data.draw(st.lists(st.sampled_from(flags), max_size=4)) if flags else []:
        argv.append(action.option_strings[-1])
        if action.nargs != 0:
            argv.append(data.draw(st.sampled_from(BAD_VALUES) | st.text(max_size=20)))
    argv += [data.draw(st.sampled_from(BAD_VALUES)) for a in options(parser) if not a.option_strings]
    assert_refused_cleanly(argv)


def test_unparseable_tls_files_are_refused_not_aborted_on(sandbox: Path) -> None:
    """gRPC's C core aborts the process (SIGABRT) on a certificate it cannot parse: the CLI checks first. The
    cases run in a process of their own, which an abort would end (with no exit status of 0 to report)."""
    cases = [["--tls-cert", "junk.txt"], ["--tls-cert", "junk.txt", "--tls-key", "junk.txt"],
             ["--tls-ca", "junk.txt"], ["--tls-ca", "missing/file"]]
    script = ("import contextlib, io, sys\nfrom garrison.cli import main\n"
              f"for flags in {cases!r}:\n"
              "    err = io.StringIO()\n"
              "    with contextlib.redirect_stderr(err):\n"
              "        status = main([*flags, 'tenants', 'list'])\n"
              "    print(status, err.getvalue().strip().replace(chr(10), ' '))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=sandbox, env=os.environ, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert len(lines) == len(cases) and all(line.startswith("1 garrison: error: ") for line in lines), lines


def _parsers(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...],
                                                                                              argparse.ArgumentParser]]:
    """Every parser of the command, those with subcommands included (`plan` has options of its own)."""
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, prefix + (name,))


@pytest.mark.parametrize("command", sorted(dict(_parsers(build_parser()))), ids=" ".join)
def test_help_states_each_default_once_and_only_where_there_is_one(command: tuple[str, ...]) -> None:
    parser = dict(_parsers(build_parser()))[command]
    formatter = parser._get_formatter()
    for action in parser._actions:
        text = formatter._expand_help(action) if action.help else ""
        assert text.count("default") <= 1, (action.option_strings, text)
        assert not text.endswith(("(default: None)", "(default: False)", "(default: [])")), (
            action.option_strings, text)
    assert "Traceback" not in parser.format_help()
