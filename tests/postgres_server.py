"""A throwaway PostgreSQL server for the tests and `make test`: initdb into a temporary folder, pg_ctl start on a
free port of 127.0.0.1, trust authentication, fsync off; stopped and removed afterwards.

PostgreSQL refuses to run as root, so as root the server runs as an unprivileged user (`nobody`, or
$GARRISON_TEST_POSTGRES_USER). Where `initdb` and `pg_ctl` are not on the PATH, `available()` is False and the
PostgreSQL tests skip with that reason.

    python tests/postgres_server.py start DIR   # prints the URL (postgresql+psycopg://...)
    python tests/postgres_server.py stop DIR
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

USER = "garrison"
MISSING = "PostgreSQL's initdb and pg_ctl are not on the PATH"


def available() -> bool:
    return shutil.which("initdb") is not None and shutil.which("pg_ctl") is not None


class PostgresServer:
    def __init__(self, directory: Path | None = None) -> None:
        self.directory = Path(directory or tempfile.mkdtemp(prefix="garrison-pg-"))
        self.data = self.directory / "data"
        self.runner = os.environ.get("GARRISON_TEST_POSTGRES_USER", "nobody") if os.geteuid() == 0 else None
        self.port = 0

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://{USER}@127.0.0.1:{self.port}/postgres"

    def start(self) -> str:
        """initdb (first time only) and start; the URL of its `postgres` database."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.runner:
            entry = pwd.getpwnam(self.runner)
            os.chown(self.directory, entry.pw_uid, entry.pw_gid)
        if not self.data.exists():
            self._run("initdb", "-D", str(self.data), "-U", USER, "--auth=trust", "-E", "UTF8", "--no-sync")
        self.port = self.port or _free_port()
        (self.directory / "port").write_text(str(self.port))
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.directory / "log"), "-w", "start")
        return self.url

    def stop(self) -> None:
        """Stop now (fast shutdown: open connections are closed); the data stays for another start()."""
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def _run(self, *command: str) -> None:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "HOME": str(self.directory)}
        user = self.runner
        if user and shutil.which("runuser"):
            # runuser drops privileges in the new program; subprocess's own user= would fork without vfork, and
            # a fork of a process with gRPC threads running can crash the child.
            command, user = ("runuser", "-u", user, "--", *command), None
        done = subprocess.run(command, user=user, env=env, cwd=self.directory, capture_output=True, text=True,
                              timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}{done.stderr}")


@contextlib.contextmanager
def throwaway() -> Iterator[PostgresServer]:
    """A running server, removed afterwards; the test is skipped, saying why, where PostgreSQL is absent."""
    import pytest

    if not available():
        pytest.skip(MISSING)
    server = PostgresServer()
    server.start()
    try:
        yield server
    finally:
        server.remove()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print(__doc__, file=sys.stderr)
        return 2
    server = PostgresServer(Path(argv[1]))
    if argv[0] == "start":
        print(server.start())
    else:
        server.remove()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
