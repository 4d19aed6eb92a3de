"""Opening the tenancy database: engine, connection pool, and migrations to the current schema.

SQLite (the embedded default, `sqlite:///<data-dir>/garrison.db`) runs in WAL mode so readers never
wait for the writer, with a busy timeout so concurrent writers queue instead of failing with
"database is locked", and with write transactions opened as BEGIN IMMEDIATE: a deferred transaction
that reads and then writes can hit SQLITE_BUSY at once, without waiting, when another writer
committed in between. Its file (and SQLite's -wal and -shm beside it, which take the file's mode) is
created 0600. PostgreSQL (`postgresql+psycopg://...`) needs the `postgres` extra.

A database URL's password never reaches a message or a log: URLs are shown through `redact_url`, and a
driver's message through `scrub`. A database that cannot answer now (down, locked past the busy timeout,
every pooled connection taken) raises StoreUnavailableError (gRPC UNAVAILABLE with a retry hint), never
the driver's error (`unavailable_as_error`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import ArgumentError, DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from garrison.tenancy.errors import InvalidArgumentError, StoreUnavailableError

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).with_name("migrations")
# Execution option that asks for BEGIN IMMEDIATE on SQLite (ignored elsewhere).
WRITE_OPTION = "garrison_write"
SQLITE_BUSY_TIMEOUT_S = 30.0
# Seconds a client is told to wait before retrying: a lock or a full pool frees up soon; a server that is
# down takes longer to come back.
RETRY_BUSY_S, RETRY_DOWN_S = 1.0, 5.0
_LOG_EVERY_S = 10.0  # an outage fails every request: log its cause at most this often
# An arbitrary constant: the PostgreSQL advisory lock that serializes migrations of gateways starting at once.
PG_MIGRATION_LOCK = 0x6761727269736F6E


def database_url(data_dir: str | Path) -> str:
    """The embedded default: one SQLite file under the data directory."""
    return f"sqlite:///{Path(data_dir).expanduser().resolve() / 'garrison.db'}"


def make_engine(url: str, *, sqlite_busy_timeout_s: float = SQLITE_BUSY_TIMEOUT_S, **kwargs: Any) -> Engine:
    """An engine for `url` configured for concurrent use from many threads (extra kwargs go to create_engine)."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise InvalidArgumentError("the database URL is not a URL (not shown: it may hold a password): use "
                                   "sqlite:///PATH or postgresql+psycopg://USER@HOST/DB") from None
    shown = parsed.render_as_string(hide_password=True)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(shown, parsed.database, sqlite_busy_timeout_s, **kwargs)
    if parsed.get_backend_name() != "postgresql":
        raise InvalidArgumentError(f"database URL {shown!r}: Garrison supports sqlite:/// and postgresql+psycopg://")
    try:
        return create_engine(parsed, pool_pre_ping=True, hide_parameters=True, **kwargs)
    except ModuleNotFoundError as err:
        raise InvalidArgumentError(f"database URL {shown!r} needs the {err.name} driver: "
                                   f"pip install 'garrison[postgres]'") from None


def _sqlite_engine(url: str, database: str | None, busy_timeout_s: float, **kwargs: Any) -> Engine:
    if not database or database == ":memory:" or database.startswith("file:"):
        # Every pooled connection would see its own empty in-memory database.
        raise InvalidArgumentError(f"database URL {url!r}: SQLite needs a file, e.g. sqlite:////var/lib/garrison/garrison.db")
    _private_database_file(Path(database))
    engine = create_engine(url, connect_args={"timeout": busy_timeout_s}, hide_parameters=True, **kwargs)
    event.listen(engine, "connect", lambda connection, _record: _sqlite_connect(connection, busy_timeout_s))
    event.listen(engine, "begin", _sqlite_begin)
    return engine


def _private_database_file(path: Path) -> None:
    """The database file exists with mode 0600 before SQLite opens it, so its -wal and -shm get 0600 too."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)  # also narrows a file an older version left wider
    finally:
        os.close(fd)
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.chmod(f"{path}{suffix}", 0o600, follow_symlinks=False)


def _sqlite_connect(dbapi_connection: Any, busy_timeout_s: float) -> None:
    # Take BEGIN away from the sqlite3 module so _sqlite_begin decides what kind of transaction to open.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=ON",
                   f"busy_timeout={int(busy_timeout_s * 1000)}"):
        cursor.execute(f"PRAGMA {pragma}")
    cursor.close()


def _sqlite_begin(conn: Connection) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(WRITE_OPTION) else "BEGIN")


def writer(engine: Engine) -> Engine:
    """The same engine and pool, but its transactions take the write lock up front (SQLite)."""
    return engine.execution_options(**{WRITE_OPTION: True})


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic's configuration built in code: users need no alembic.ini on disk."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision (a no-op when it is there), in one transaction."""
    with writer(engine).begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({PG_MIGRATION_LOCK})")
        command.upgrade(alembic_config(conn), "head")


# -- faults and secrets ---------------------------------------------------------------------------------

_USERINFO_PASSWORD = re.compile(r"(://[^/@:\s]*:)[^@\s]*@")
_QUERY_PASSWORD = re.compile(r"(password=)[^&\s]*", re.IGNORECASE)


def redact_url(url: str) -> str:
    """`url` with its password replaced by ***, whether or not it parses as a URL."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError, TypeError):
        return _QUERY_PASSWORD.sub(r"\1***", _USERINFO_PASSWORD.sub(r"\1***@", url))


def scrub(text: str, url: str | None) -> str:
    """A message about a database with the URL's password (wherever it appears) and URL-like passwords hidden."""
    password = _password(url)
    if password:
        text = text.replace(password, "***")
    return _QUERY_PASSWORD.sub(r"\1***", _USERINFO_PASSWORD.sub(r"\1***@", text))


def _password(url: str | None) -> str | None:
    if not url:
        return None
    try:
        return make_url(url).password or None
    except (ArgumentError, ValueError, TypeError):
        return None


class _Throttle:
    def __init__(self) -> None:
        self.last = -_LOG_EVERY_S

    def ready(self) -> bool:
        now = time.monotonic()
        if now - self.last < _LOG_EVERY_S:
            return False
        self.last = now
        return True


_log_throttle = _Throttle()


@contextlib.contextmanager
def unavailable_as_error(url: str | None = None) -> Iterator[None]:
    """Turn a database that cannot answer now into StoreUnavailableError (logged, password hidden)."""
    try:
        yield
    except PoolTimeoutError:
        raise _unavailable("every database connection of this gateway is in use", RETRY_BUSY_S, url, None) from None
    except (OperationalError, InterfaceError, DisconnectionError) as err:
        text = str(getattr(err, "orig", None) or err).strip()
        detail = text.splitlines()[0] if text else type(err).__name__
        locked = "locked" in detail or "busy" in detail
        reason = "the database is locked by another writer" if locked else "the database cannot be reached"
        raise _unavailable(reason, RETRY_BUSY_S if locked else RETRY_DOWN_S, url, detail) from None


def _unavailable(reason: str, retry_after_s: float, url: str | None, detail: str | None) -> StoreUnavailableError:
    if _log_throttle.ready():
        where = f" {redact_url(url)}" if url else ""
        log.warning("tenant database%s unavailable: %s%s", where, reason,
                    f" ({scrub(detail, url)})" if detail else "")
    return StoreUnavailableError(f"the tenant database is unavailable ({reason}); retry in {retry_after_s:g} s",
                                 retry_after_s=retry_after_s)
