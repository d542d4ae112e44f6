"""Fixtures of the console tests (``pytest_plugins = ("console_fixtures",)``).

* ``console_config`` - a :class:`ServerConfig` of a data folder made by ``fleet-server init`` (keys,
  fleet CA, migrated SQLite database; ``$FLEET_TEST_DATABASE_URL`` replaces the database, e.g. with
  an emptied PostgreSQL schema), with cheap argon2 parameters (tests hash many passwords) and
  ``Secure`` cookies on (the production default).
* ``app``, ``client``, ``runner`` - the Flask application (``create_app``) on that configuration, its
  test client and CLI runner; ``svc`` - its :class:`ConsoleServices`.
* ``users`` - one user per role (name = role value, password :data:`PASSWORD`); ``login(client,
  name)`` logs a client in and returns its CSRF token.
* ``SoftDevice`` - a device whose TPM is software (a P-256 AK and the quote helpers of
  ``firmware_sim.bench.quote_bench``) booting a ``firmware_sim`` profile: its evidence goes through the
  server's real :class:`~fleet_server.service.processor.Processor` (challenge row, appraisal against the
  stored policy, attestation row, device state, held event log, alert rules).
"""

from __future__ import annotations

import dataclasses
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from flask import Flask
from flask.testing import FlaskClient, FlaskCliRunner
from sqlalchemy import text

from firmware_sim.bench.quote_bench import build_quote, sign_ecdsa, software_ak
from firmware_sim.boot import BootMedia, build_boot_log
from firmware_sim.profiles import get_profile
from fleet_server.appraisal.policy import SIMULATOR_PCRS, ReferencePolicy, policy_from_eventlog
from fleet_server.cli import main
from fleet_server.config import ServerConfig, load_config
from fleet_server.console import create_app
from fleet_server.console.app import dispose
from fleet_server.console.rbac import Role
from fleet_server.console.services import EXTENSION, ConsoleServices
from fleet_server.keys import load_signing_key
from fleet_server.migrations import upgrade
from fleet_server.service import admin
from fleet_server.service.common import Counters, ManualClock
from fleet_server.service.context import ServiceContext
from fleet_server.service.processor import Processor
from fleet_server.storage.db import create_engine
from fleet_server.storage.repo import NewChallenge, NewDevice, Repository, selection_json
from fleet_server.verifier.eventlog import parse_eventlog, replay
from protocol import topics
from protocol.messages import Evidence, encode_plain, new_message_id
from protocol.mqtt import InboundMessage
from protocol.tpm.structures import ClockInfo

PASSWORD = "correct horse battery staple"
FAST_ARGON2 = {"argon2_time_cost": 1, "argon2_memory_kib": 64, "argon2_parallelism": 1}
CLASS = "edge-camera"
FIRMWARE = "1.2.0"
CSRF_RE = re.compile(r'name="csrf_token" value="([0-9a-f]+)"')


# --------------------------------------------------------------------------------------------------
# configuration, app, client
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def console_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data folder made by `fleet-server init` (copied per test: key generation is the slow part)."""
    folder = tmp_path_factory.mktemp("console-template") / "srv"
    assert main(["init", "--data-dir", str(folder), "--mqtt-port", "18883"]) == 0
    return folder


def console_settings(config: ServerConfig, **changes: Any) -> ServerConfig:
    """``config`` with console settings changed (cheap argon2 always)."""
    console = dataclasses.replace(config.console, **{**FAST_ARGON2, **changes})
    return dataclasses.replace(config, console=console)


@pytest.fixture
def console_config(tmp_path: Path, console_template: Path,
                   capsys: pytest.CaptureFixture[str]) -> ServerConfig:
    folder = tmp_path / "srv"
    shutil.copytree(console_template, folder)
    toml = (folder / "server.toml").read_text().replace(str(console_template), str(folder))
    (folder / "server.toml").write_text(toml)
    capsys.readouterr()
    config = console_settings(load_config(folder / "server.toml"))
    url = os.environ.get("FLEET_TEST_DATABASE_URL")
    if url:  # e.g. PostgreSQL: start from an empty, migrated schema
        engine = create_engine(url)
        try:
            if engine.dialect.name == "postgresql":
                with engine.begin() as conn:
                    conn.execute(text("DROP SCHEMA public CASCADE"))
                    conn.execute(text("CREATE SCHEMA public"))
            upgrade(engine)
        finally:
            engine.dispose()
        config = dataclasses.replace(config, database_url=url)
        toml = (folder / "server.toml").read_text()
        toml = toml.replace("[server]\n", f'[server]\ndatabase_url = "{url}"\n', 1)
        (folder / "server.toml").write_text(toml)  # for the CLI, which reads the file
    return config


@pytest.fixture
def console_clock() -> ManualClock:
    import time

    return ManualClock(time.time_ns() // 1_000_000)


class BufferedClient(FlaskClient):
    """A test client whose responses are read completely and closed (static files are streamed)."""

    def open(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("buffered", True)
        return super().open(*args, **kwargs)


@pytest.fixture
def app(console_config: ServerConfig, console_clock: ManualClock) -> Iterator[Flask]:
    application = create_app(console_config, clock=console_clock.now_ms, flask_config={"TESTING": True})
    application.test_client_class = BufferedClient
    try:
        yield application
    finally:
        dispose(application)


@pytest.fixture
def svc(app: Flask) -> ConsoleServices:
    found: ConsoleServices = app.extensions[EXTENSION]
    return found


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def runner(app: Flask) -> FlaskCliRunner:
    return app.test_cli_runner()


@pytest.fixture
def users(svc: ConsoleServices) -> dict[str, int]:
    """One user per role, named after the role; returns name -> user id."""
    return {role.value: svc.accounts.add_user(role.value, role.value, PASSWORD, now=svc.now()).id
            for role in Role}


def csrf_of(html: bytes | str) -> str:
    text = html.decode() if isinstance(html, bytes) else html
    found = CSRF_RE.search(text)
    assert found is not None, "no CSRF token in the page"
    return found.group(1)


def form_csrf(client: FlaskClient) -> str:
    """A CSRF token for the client's next form: from the login page, or (logged in) the account page."""
    page = client.get("/login")
    return csrf_of(page.data if page.status_code == 200 else client.get("/account").data)


def login(client: FlaskClient, name: str, password: str = PASSWORD) -> str:
    """Log ``client`` in (asserting success); returns the session's CSRF token."""
    token = form_csrf(client)
    response = client.post("/login", data={"username": name, "password": password, "csrf_token": token})
    assert response.status_code == 303, response.data[:300]
    return csrf_of(client.get("/account").data)


# --------------------------------------------------------------------------------------------------
# devices with real evidence
# --------------------------------------------------------------------------------------------------
def boot_log(profile: str = "golden") -> bytes:
    """The TCG event log a firmware_sim device booting ``profile`` writes."""
    p = get_profile(profile)
    return build_boot_log(BootMedia.from_specs(p.image_specs()), p.boot_settings).to_bytes()


def golden_policy(name: str = "edge-camera-1.2.0") -> ReferencePolicy:
    return policy_from_eventlog(parse_eventlog(boot_log()), name=name, device_class=CLASS,
                                firmware_version=FIRMWARE)


def ek_certificate(device_id: str) -> bytes:
    """A DER EK certificate issued by a throw-away "TPM manufacturer" CA (what the page shows)."""
    import datetime as dt

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ek_key = ec.generate_private_key(ec.SECP256R1())
    issuer = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "EdgeSim TPM"),
                        x509.NameAttribute(NameOID.COMMON_NAME, "EdgeSim TPM EK Issuing CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.SERIAL_NUMBER,
                                                                                  f"tpm-{device_id}")]))
            .issuer_name(issuer).public_key(ek_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=3650))
            .sign(ca_key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.DER)


class SoftDevice:
    """A device with a software AK; :meth:`attest` runs one attestation through the Processor."""

    def __init__(self, device_id: str, repo: Repository, *, state: str = "enrolled", now: int,
                 device_class: str = CLASS, firmware: str = FIRMWARE) -> None:
        self.id = device_id
        self.key, self.ak_public = software_ak()
        self.ek_cert = ek_certificate(device_id)
        self.clock = ClockInfo(clock=50_000, reset_count=1, restart_count=0, safe=True)
        with repo.write("adding a test device") as tx:
            tx.insert_device(NewDevice(
                id=device_id, state=state, device_class=device_class, firmware_version=firmware,
                ek_cert=self.ek_cert, ek_fingerprint=secrets.token_hex(32), ek_public=b"ek-public",
                ak_public=self.ak_public, ak_name=b"\x00\x0b" + secrets.token_bytes(32),
                csr=None, enroll_request_id=None, cert_serial=None, now=now,
                next_attestation_at=now + 60_000 if state != "pending" else None), cause="test device")

    def attest(self, processor: Processor, repo: Repository, profile: str = "golden") -> None:
        now = processor.ctx.clock.now_ms()
        selection = {"sha256": SIMULATOR_PCRS}
        challenge = NewChallenge(id=new_message_id(), device_id=self.id, nonce=secrets.token_bytes(32),
                                 selection=selection_json(selection), issued_at=now, deadline=now + 30_000,
                                 cause="periodic", log_offset=0, log_sha256=b"")
        with repo.write("issuing a test challenge") as tx:
            tx.supersede_open_challenges([self.id])
            tx.insert_challenges([challenge])
        log = boot_log(profile)
        values = replay(parse_eventlog(log))
        pcrs = {"sha256": {p: values["sha256"].get(p, bytes(32)) for p in SIMULATOR_PCRS}}
        self.clock = dataclasses.replace(self.clock, clock=self.clock.clock + 1000)
        attest = build_quote(nonce=challenge.nonce, pcr_values=pcrs, clock=self.clock)
        evidence = Evidence(challenge.id, attest, sign_ecdsa(self.key, attest), pcrs, 0, log)
        payload = encode_plain(evidence, ts=now)
        processor.handle_batch([InboundMessage(topic=topics.device_up(self.id, "evidence"), payload=payload,
                                               qos=1)])


@pytest.fixture
def console_processor(svc: ConsoleServices, console_clock: ManualClock) -> Processor:
    """The server's message processor on the console's database (the worker's code path)."""
    ctx = ServiceContext(settings=svc.config.attestation, signer=load_signing_key(svc.config.signing_key),
                         fleet_ca=None, clock=console_clock)
    return Processor(ctx, svc.repo, Counters())


@pytest.fixture
def stored_golden_policy(svc: ConsoleServices) -> admin.StoredPolicy:
    return admin.store_policy(svc.repo, golden_policy(), now=svc.now())
