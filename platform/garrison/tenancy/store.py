"""Opening the tenancy database: engine, connection pool, and migrations to the current schema.

SQLite (the embedded default, `sqlite:///<data-dir>/garrison.db`) runs in WAL mode so readers never
wait for the writer, with a busy timeout so concurrent writers queue instead of failing with
"database is locked", and with write transactions opened as BEGIN IMMEDIATE: a deferred transaction
that reads and then writes can hit SQLITE_BUSY at once, without waiting, when another writer
committed in between. PostgreSQL (`postgresql+psycopg://...`) needs the `postgres` extra.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import ArgumentError

from garrison.tenancy.errors import InvalidArgumentError

MIGRATIONS = Path(__file__).with_name("migrations")
# Execution option that asks for BEGIN IMMEDIATE on SQLite (ignored elsewhere).
WRITE_OPTION = "garrison_write"
SQLITE_BUSY_TIMEOUT_S = 30.0
# An arbitrary constant: the PostgreSQL advisory lock that serializes migrations of gateways starting at once.
PG_MIGRATION_LOCK = 0x6761727269736F6E


def database_url(data_dir: str | Path) -> str:
    """The embedded default: one SQLite file under the data directory."""
    return f"sqlite:///{Path(data_dir).expanduser().resolve() / 'garrison.db'}"


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for `url` configured for concurrent use from many threads (extra kwargs go to create_engine)."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise InvalidArgumentError(f"database URL {url!r} is not a URL: use sqlite:///PATH or "
                                   f"postgresql+psycopg://USER@HOST/DB") from None
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(url, parsed.database, **kwargs)
    if parsed.get_backend_name() != "postgresql":
        raise InvalidArgumentError(f"database URL {url!r}: Garrison supports sqlite:/// and postgresql+psycopg://")
    try:
        return create_engine(url, pool_pre_ping=True, **kwargs)
    except ModuleNotFoundError as err:
        raise InvalidArgumentError(f"database URL {url!r} needs the {err.name} driver: "
                                   f"pip install 'garrison[postgres]'") from None


def _sqlite_engine(url: str, database: str | None, **kwargs: Any) -> Engine:
    if not database or database == ":memory:" or database.startswith("file:"):
        # Every pooled connection would see its own empty in-memory database.
        raise InvalidArgumentError(f"database URL {url!r}: SQLite needs a file, e.g. sqlite:////var/lib/garrison/garrison.db")
    Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S}, **kwargs)
    event.listen(engine, "connect", _sqlite_connect)
    event.listen(engine, "begin", _sqlite_begin)
    return engine


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # Take BEGIN away from the sqlite3 module so _sqlite_begin decides what kind of transaction to open.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=ON",
                   f"busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}"):
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
