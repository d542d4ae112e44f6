"""Schema migrations: the migrated database equals the models (alembic compare_metadata), upgrades are
idempotent, and commands refuse a database that is not at the newest revision.

Every check runs on SQLite and on a real PostgreSQL server that the tests start themselves
(``tests/pg_fixtures.py``); set ``FLEET_TEST_POSTGRES_URL`` to use an existing server instead.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlmodel import SQLModel

from fleet_server.migrations import current_revision, head_revision, upgrade
from fleet_server.storage import models  # noqa: F401  (the tables)
from fleet_server.storage.db import create_engine

pytest_plugins = ("mqtt_fixtures", "server_fixtures", "pg_fixtures")
pytestmark = pytest.mark.usefixtures("quiet_root_logging")

POSTGRES_URL = os.environ.get("FLEET_TEST_POSTGRES_URL")
URLS = ["sqlite", "postgres"]


@pytest.fixture(params=URLS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fleet.db'}"
    if POSTGRES_URL is None:
        return str(request.getfixturevalue("postgres_db"))
    engine = create_engine(POSTGRES_URL)
    with engine.begin() as conn:  # start from an empty schema
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()
    return POSTGRES_URL


def test_migrated_schema_equals_the_models(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        assert current_revision(engine) is None
        before, after = upgrade(engine)
        assert (before, after) == (None, head_revision())
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}),
                                    SQLModel.metadata)
        assert diff == [], f"models and migrations differ (add a revision): {diff}"
        tables = set(inspect(engine).get_table_names())
        assert set(SQLModel.metadata.tables) <= tables and "alembic_version" in tables
        # Idempotent: a second upgrade changes nothing.
        assert upgrade(engine) == (head_revision(), head_revision())
    finally:
        engine.dispose()


def test_sqlite_engine_settings(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'fleet.db'}")
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert (conn.exec_driver_sql("PRAGMA busy_timeout").scalar() or 0) >= 1000
    finally:
        engine.dispose()


def test_commands_refuse_an_old_schema(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fleet_server.cli import main

    data = tmp_path / "srv"
    assert main(["init", "--data-dir", str(data)]) == 0
    config = str(data / "server.toml")
    engine = create_engine(f"sqlite:///{data / 'fleet.db'}")
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM alembic_version"))
    engine.dispose()
    capsys.readouterr()
    assert main(["device", "list", "--config", config]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("fleet-server: ") and "fleet-server db upgrade" in err and "\n" not in err
    # `db upgrade` on a database whose tables exist without a revision fails cleanly (one line) ...
    assert main(["db", "upgrade", "--config", config]) == 1
    assert "migration failed" in capsys.readouterr().err
    # ... and on a fresh file it creates the schema.
    (data / "fleet.db").unlink()
    for suffix in ("-wal", "-shm"):
        Path(f"{data / 'fleet.db'}{suffix}").unlink(missing_ok=True)
    assert main(["db", "upgrade", "--config", config]) == 0
    assert "schema upgraded empty -> " in capsys.readouterr().out
    assert main(["device", "list", "--config", config]) == 0
