"""Schema migrations (Alembic) of the fleet server's database.

:func:`upgrade` brings a database to the newest revision; ``fleet-server db upgrade`` calls it, and
``init`` and ``run`` call it before anything else touches the database. Revisions live in
``versions/``; the first one creates the schema of :mod:`fleet_server.storage.models` as it was
then, and every later model change needs a revision (``tests/test_server_migrations.py`` compares
the migrated schema with the models).
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from fleet_server.storage.db import write_connection
from protocol.errors import StorageError

MIGRATIONS_DIR = Path(__file__).resolve().parent


def alembic_config() -> Config:
    """The Alembic configuration of this package (script location = this folder)."""
    cfg = Config(str(MIGRATIONS_DIR / "alembic.ini"))
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def head_revision() -> str:
    """The newest revision id shipped with this version of the server."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise StorageError("no database migrations are installed")
    return head


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at, or ``None`` for an empty database."""
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    except SQLAlchemyError as exc:
        raise StorageError(f"cannot read the schema revision: {type(exc).__name__}: "
                           f"{str(exc).splitlines()[0][:200]}") from None


def upgrade(engine: Engine, revision: str = "head") -> tuple[str | None, str]:
    """Migrate the database of ``engine`` to ``revision``; returns (revision before, revision after).

    Safe to call on an up-to-date database (nothing happens) and from several processes: on SQLite
    the migration runs in one transaction, which serialises concurrent callers.
    """
    before = current_revision(engine)
    cfg = alembic_config()
    try:
        with write_connection(engine) as conn, conn.begin():
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
    except SQLAlchemyError as exc:
        raise StorageError(f"database migration failed: {type(exc).__name__}: "
                           f"{str(exc).splitlines()[0][:200]}") from None
    after = current_revision(engine)
    return before, after or ""
