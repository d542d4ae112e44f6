"""The console on PostgreSQL (the session's throwaway server, ``tests/pg_fixtures.py``): the audit chain
with concurrent writers serialised by the head row lock, tamper detection, login throttling, and every
page of the application. (The whole console suite also runs on PostgreSQL with
``FLEET_TEST_DATABASE_URL``.)"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator

import pytest
from flask import Flask
from sqlalchemy import update

from fleet_server.config import ServerConfig
from fleet_server.console import create_app
from fleet_server.console.app import dispose
from fleet_server.console.audit import AuditLog
from fleet_server.console.services import EXTENSION, ConsoleServices
from fleet_server.migrations import upgrade
from fleet_server.service.common import ManualClock
from fleet_server.storage import models
from fleet_server.storage.db import create_engine

pytest.register_assert_rewrite("console_fixtures")
from console_fixtures import BufferedClient, SoftDevice, login  # noqa: E402

pytest_plugins = ("console_fixtures", "pg_fixtures")


@pytest.fixture
def pg_app(console_config: ServerConfig, postgres_db: str, console_clock: ManualClock) -> Iterator[Flask]:
    engine = create_engine(postgres_db)
    try:
        upgrade(engine)
    finally:
        engine.dispose()
    config = dataclasses.replace(console_config, database_url=postgres_db)
    app = create_app(config, clock=console_clock.now_ms, flask_config={"TESTING": True})
    app.test_client_class = BufferedClient
    try:
        yield app
    finally:
        dispose(app)


@pytest.fixture
def pg_svc(pg_app: Flask) -> ConsoleServices:
    found: ConsoleServices = pg_app.extensions[EXTENSION]
    return found


def test_audit_chain_on_postgres(pg_svc: ConsoleServices) -> None:
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            for i in range(15):
                pg_svc.audit.append(actor=f"w{n}", action="test.write", target=str(i), now=pg_svc.now())
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    log = AuditLog(pg_svc.engine)
    report = log.verify(chunk=7)
    assert report.ok and report.entries == 90
    entry = models.SQLModel.metadata.tables["auditentry"]
    with pg_svc.engine.begin() as conn:
        conn.execute(update(entry).where(entry.c.seq == 42).values(target="forged"))
    assert log.verify().first_bad_seq == 42


def test_throttling_on_postgres(pg_svc: ConsoleServices) -> None:
    accounts = pg_svc.accounts
    accounts.add_user("admin", "admin", "correct horse battery", now=1000)
    limit = pg_svc.settings.login_max_failures
    results = [accounts.login("admin", "wrong password", ip="10.0.0.1", user_agent="", now=2000 + i)
               for i in range(limit)]
    assert [r.locked for r in results] == [False] * (limit - 1) + [True]
    assert accounts.login("admin", "correct horse battery", ip="10.0.0.2", user_agent="", now=3000).locked


def test_pages_on_postgres(pg_app: Flask, pg_svc: ConsoleServices, console_clock: ManualClock) -> None:
    pg_svc.accounts.add_user("admin", "admin", "correct horse battery", now=pg_svc.now())
    SoftDevice("cam-1", pg_svc.repo, now=console_clock.now_ms())
    client = pg_app.test_client()
    csrf = login(client, "admin", "correct horse battery")
    for url in ("/", "/dashboard/data", "/devices/", "/devices/?q=CAM&state=enrolled", "/devices/cam-1",
                "/policies/", "/policies/new?device=cam-1", "/models/", "/alerts/", "/users/", "/audit/",
                "/account"):
        assert client.get(url).status_code == 200, url
    revoke = client.post("/devices/cam-1/revoke", data={"csrf_token": csrf, "reason": "test"})
    assert revoke.status_code == 303
    assert client.get("/devices/", query_string={"q": "\x00"}).status_code == 400
    assert pg_svc.audit.verify().ok
