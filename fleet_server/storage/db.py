"""Database engines: SQLite (default, one file in the data folder) or any SQLAlchemy URL (PostgreSQL).

SQLite is configured for several worker processes sharing one file:

* ``journal_mode=WAL``: readers never block the writer and vice versa;
* ``busy_timeout``: a writer waits for the lock instead of failing at once with "database is locked";
* ``synchronous=NORMAL``: in WAL mode a commit survives a process crash; a power loss may lose the
  last few commits but never corrupts the file (attestation results are re-created by the next
  attestation);
* ``foreign_keys=ON``.

pysqlite's own transaction handling begins transactions lazily and cannot start a write
transaction up front, so the driver is put in autocommit mode and SQLAlchemy's ``begin`` emits the
``BEGIN`` itself: ``BEGIN IMMEDIATE`` for connections marked with the execution option
``sqlite_write=True`` (see :func:`write_connection`), so that a read-then-write transaction takes
the write lock before reading and two writers never deadlock on a lock upgrade.

No URL, password or query string is ever logged (:func:`describe_url` hides the password).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, event
from sqlalchemy import create_engine as _create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.pool import ConnectionPoolEntry

from protocol.errors import ConfigError, StorageError

DEFAULT_DB_FILE = "fleet.db"
SQLITE_BUSY_TIMEOUT_MS = 30_000


def default_database_url(data_dir: Path) -> str:
    """``sqlite:///<data_dir>/fleet.db`` (absolute path)."""
    return f"sqlite:///{(Path(data_dir).resolve() / DEFAULT_DB_FILE)}"


def describe_url(url: str) -> str:
    """The URL with its password hidden, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<invalid database URL>"


def is_sqlite(engine_or_url: Engine | str) -> bool:
    """True for SQLite engines or URLs."""
    if isinstance(engine_or_url, Engine):
        return engine_or_url.dialect.name == "sqlite"
    return make_url(engine_or_url).get_backend_name() == "sqlite"


def _sqlite_connect(dbapi_connection: Any, connection_record: ConnectionPoolEntry) -> None:
    # Autocommit at the driver level: SQLAlchemy's "begin" event below issues BEGIN explicitly.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


def _sqlite_begin(conn: Connection) -> None:
    if conn.get_execution_options().get("sqlite_write"):
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    else:
        conn.exec_driver_sql("BEGIN")


def create_engine(url: str, *, echo: bool = False) -> Engine:
    """An engine for ``url``; SQLite files get the pragmas of the module docstring.

    The folder of a SQLite file must exist. Raises :class:`ConfigError` for an unusable URL.
    """
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ConfigError(f"invalid database URL: {exc}") from None
    kwargs: dict[str, Any] = {"echo": echo, "future": True}
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database in ("", ":memory:"):
            raise ConfigError("an in-memory SQLite database cannot be shared by workers; use a file")
        if not Path(database).parent.is_dir():
            raise ConfigError(f"folder of the SQLite database does not exist: {Path(database).parent}")
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}
        kwargs["pool_size"] = 8
        kwargs["max_overflow"] = 8
    else:
        kwargs["pool_pre_ping"] = True
    try:
        engine = _create_engine(url, **kwargs)
    except (ArgumentError, ImportError) as exc:
        raise ConfigError(f"cannot use database {describe_url(url)}: {exc}") from None
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
    return engine


def write_connection(engine: Engine) -> Connection:
    """A connection whose transactions take the write lock at ``BEGIN`` on SQLite.

    Use as ``with write_connection(engine) as conn, conn.begin(): ...``. On other databases it is a
    plain connection (row locks are taken by the statements themselves).
    """
    conn = engine.connect()
    if engine.dialect.name == "sqlite":
        conn.execution_options(sqlite_write=True)
    return conn


def storage_error(exc: SQLAlchemyError | sqlite3.Error, what: str) -> StorageError:
    """A one-line :class:`StorageError` for a database failure (no SQL parameters in the text)."""
    orig = getattr(exc, "orig", None) or exc
    text = " ".join(str(orig).split("\n")[0].split())
    return StorageError(f"database error while {what}: {type(orig).__name__}: {text[:200]}")
