"""Fixtures for fleet-server tests: a migrated temporary database, keys, a manual clock, and simulated
devices that talk to the server with real TPMs (swtpm) through the agent's TPM adapter.

Test modules load them with ``pytest_plugins = ("mqtt_fixtures", "server_fixtures")``.

* ``clock`` - a :class:`ManualClock` starting at the real time (certificates are checked against it).
* ``server_config`` - a :class:`ServerConfig` in a temporary data folder whose fleet CA is the test
  PKI's (so certificates the server issues are accepted by the test broker) and whose trust bundle is
  the simulated TPM manufacturer's.
* ``database_url`` - the database ``server_config`` uses: a SQLite file in its data folder (or
  ``$FLEET_TEST_DATABASE_URL``). A module runs its tests on both SQLite and PostgreSQL with
  ``pytestmark = BOTH_DATABASES``: each test then runs twice, the second time on a fresh database of
  the session's throwaway PostgreSQL server (``pg_fixtures``, which the module must load too).
* ``repo`` - a :class:`Repository` on the migrated database; ``ctx`` - the :class:`ServiceContext`.
* ``processor`` - a :class:`Processor` on ``repo`` and ``ctx``.
* ``make_device(name, profile="golden", fresh_tpm=False)`` - a booted :class:`SimDevice`.
* ``golden_policy`` - the reference policy of the golden profile, stored in ``repo``.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import text

from agent.attest import answer_challenge
from agent.tpm.adapter import TpmAdapter
from firmware_sim.broker import BrokerPki
from firmware_sim.device import SimulatedDevice
from firmware_sim.manufacturer import ManufacturerCA
from fleet_server import pki
from fleet_server.appraisal.policy import policy_from_eventlog
from fleet_server.config import ServerConfig, parse_config
from fleet_server.enrollment.ekcert import load_trust_bundle
from fleet_server.keys import ResultSigner, create_signing_key
from fleet_server.migrations import upgrade
from fleet_server.service import admin
from fleet_server.service.common import Counters, ManualClock, Outgoing
from fleet_server.service.context import ServiceContext
from fleet_server.service.processor import Processor
from fleet_server.storage.db import create_engine
from fleet_server.storage.models import DeviceState
from fleet_server.storage.repo import NewDevice, Repository
from fleet_server.verifier.eventlog import parse_eventlog
from protocol import topics
from protocol.messages import (
    AttestRequest,
    Challenge,
    EnrollChallenge,
    EnrollProof,
    EnrollRequest,
    EnrollResult,
    Envelope,
    Message,
    decode_signed,
    encode_plain,
    enroll_proof,
)
from protocol.mqtt import InboundMessage

DEVICE_CLASS = "edge-camera"
FIRMWARE = "1.2.0"
SELECTION: dict[str, list[int]] = {"sha256": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 14]}


def server_settings(**attestation: Any) -> dict[str, Any]:
    """The ``[attestation]`` table used by the tests (short interval and timeout, no jitter)."""
    base: dict[str, Any] = {"interval": 60.0, "jitter": 0.0, "challenge_timeout": 10.0,
                            "missed_challenges_limit": 2, "result_grace": 5.0, "request_min_interval": 1.0,
                            "scheduler_tick": 0.2}
    base.update(attestation)
    return base


def make_config(data_dir: Path, fleet_pki: BrokerPki, bundle: Path, *, port: int = 8883,
                database_url: str | None = None, **attestation: Any) -> ServerConfig:
    """A configuration in ``data_dir`` using the test PKI and the manufacturer bundle ``bundle``.

    The database is ``database_url``, else ``$FLEET_TEST_DATABASE_URL`` when set (e.g. a PostgreSQL
    database that the ``repo`` fixture empties before each test), else a SQLite file in ``data_dir``.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    url = database_url or os.environ.get("FLEET_TEST_DATABASE_URL") or f"sqlite:///{data_dir / 'fleet.db'}"
    return parse_config({
        "server": {"data_dir": str(data_dir), "database_url": url,
                   "signing_key": str(data_dir / "keys" / "result-signing.key"),
                   "fleet_ca_cert": str(fleet_pki.ca_cert), "fleet_ca_key": str(fleet_pki.ca_key),
                   "trust_bundle": str(bundle), "log_file": str(data_dir / "server.log"), "batch_size": 32},
        "mqtt": {"host": "127.0.0.1", "port": port, "ca_cert": str(fleet_pki.ca_cert),
                 "cert": str(fleet_pki.server_cert), "key": str(fleet_pki.server_key)},
        "attestation": server_settings(**attestation),
    }, base=data_dir)


@pytest.fixture
def quiet_root_logging() -> Iterator[None]:
    """Detach root-logger handlers that other tests left behind (an in-process CLI run configures
    logging onto a captured stream that is closed later): a record logged into such a handler
    prints "--- Logging error ---" onto the next test's stderr. pytest's own handlers stay."""
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers = [h for h in saved if type(h).__module__.startswith("_pytest")]
    try:
        yield
    finally:
        root.handlers = saved


@pytest.fixture
def clock() -> ManualClock:
    """Starts two minutes ahead of real time: EK certificates of TPMs manufactured during the test
    (valid from their creation second) are then already valid at every time the test uses."""
    return ManualClock(time.time_ns() // 1_000_000 + 120_000)


# Runs every test of a module once on SQLite and once on PostgreSQL (``pytestmark = BOTH_DATABASES``):
# the row locking that lets several workers share one database only exists on PostgreSQL.
BOTH_DATABASES = pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)


@pytest.fixture
def database_url(request: pytest.FixtureRequest) -> str | None:
    """None (``make_config``'s default: SQLite or ``$FLEET_TEST_DATABASE_URL``), or, when parametrized
    with "postgresql", a fresh database on the session's PostgreSQL server."""
    backend = getattr(request, "param", "sqlite")
    if backend == "postgresql":
        return str(request.getfixturevalue("postgres_db"))
    assert backend == "sqlite", backend
    return None


@pytest.fixture
def server_config(tmp_path: Path, fleet_pki: BrokerPki, manufacturer_ca: ManufacturerCA,
                  database_url: str | None) -> ServerConfig:
    return make_config(tmp_path / "server", fleet_pki, manufacturer_ca.bundle, database_url=database_url)


@pytest.fixture
def signer(server_config: ServerConfig) -> ResultSigner:
    return create_signing_key(server_config.signing_key)


@pytest.fixture
def repo(server_config: ServerConfig) -> Iterator[Repository]:
    engine = create_engine(server_config.database_url)
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            conn.execute(text("DROP SCHEMA public CASCADE"))
            conn.execute(text("CREATE SCHEMA public"))
    upgrade(engine)
    repository = Repository(engine)
    try:
        yield repository
    finally:
        engine.dispose()


@pytest.fixture
def ctx(server_config: ServerConfig, signer: ResultSigner, fleet_pki: BrokerPki,
        manufacturer_ca: ManufacturerCA, clock: ManualClock) -> ServiceContext:
    return ServiceContext(settings=server_config.attestation, signer=signer, fleet_ca=fleet_pki.load_ca(),
                          trust_bundle=load_trust_bundle(manufacturer_ca.bundle.read_bytes()), clock=clock,
                          rng=random.Random(1234))


@pytest.fixture
def processor(ctx: ServiceContext, repo: Repository) -> Processor:
    return Processor(ctx, repo, Counters())


# --------------------------------------------------------------------------------------------------
# simulated devices
# --------------------------------------------------------------------------------------------------
class SimDevice:
    """A simulated device (firmware_sim) with the agent's TPM adapter, speaking the wire protocol."""

    def __init__(self, device_id: str, sim: SimulatedDevice, state_dir: Path, clock: ManualClock) -> None:
        self.id = device_id
        self.sim = sim
        self.clock = clock
        self.state_dir = state_dir
        self.tpm = TpmAdapter(sim.tcti, state_dir)
        self.tls_key = ec.generate_private_key(ec.SECP256R1())
        self.device_class = DEVICE_CLASS
        self.firmware_version = FIRMWARE

    # -- messages the device sends -----------------------------------------------------------------
    def plain(self, message: Message) -> bytes:
        return encode_plain(message, ts=self.clock.now_ms())

    def enroll_request(self, *, csr_id: str | None = None) -> bytes:
        csr_pem = pki.make_device_csr(self.tls_key, csr_id or self.id)
        csr = x509.load_pem_x509_csr(csr_pem).public_bytes(serialization.Encoding.DER)
        return self.plain(EnrollRequest(ek_cert=self.tpm.ek_certificate(), ek_public=self.tpm.ek_public(),
                                        ak_public=self.tpm.ak_public, csr=csr, device_class=self.device_class,
                                        firmware_version=self.firmware_version))

    def enroll_proof(self, challenge: EnrollChallenge) -> bytes:
        secret = self.tpm.activate_credential(challenge.credential_blob, challenge.encrypted_secret)
        return self.plain(EnrollProof(request_id=challenge.request_id,
                                      proof=enroll_proof(secret, challenge.request_id)))

    def hello(self, reason: str = "boot") -> bytes:
        return self.plain(AttestRequest(reason=reason, agent_version="test"))

    def evidence(self, challenge: Challenge) -> bytes:
        answer = answer_challenge(challenge, tpm=self.tpm, eventlog_path=self.sim.eventlog_path,
                                  clock=lambda: self.clock.now_ms() / 1000)
        return self.plain(answer)

    # -- as the server receives them ---------------------------------------------------------------
    def up(self, kind: str, payload: bytes) -> InboundMessage:
        return InboundMessage(topic=topics.device_up(self.id, kind), payload=payload, qos=1)

    def enroll_up(self, kind: str, payload: bytes) -> InboundMessage:
        return InboundMessage(topic=topics.enroll_up(self.id, kind), payload=payload, qos=1)

    def power_cycle(self, profile: str | None = None) -> None:
        """Reboot (optionally into another profile): PCRs reset, resetCount goes up, new log."""
        self.tpm.close()
        if profile is not None:
            self.sim.reflash(profile)
        self.sim.power_cycle()
        self.tpm = TpmAdapter(self.sim.tcti, self.state_dir)

    def new_ak(self) -> None:
        """Lose the AK blobs (e.g. a wiped data partition): the adapter creates another AK in the
        same TPM, so the EK is the same and the AK public area differs."""
        old = self.tpm.ak_public
        self.tpm.close()
        shutil.rmtree(self.state_dir)
        self.tpm = TpmAdapter(self.sim.tcti, self.state_dir)
        assert self.tpm.ak_public != old

    def close(self) -> None:
        self.tpm.close()
        self.sim.shutdown()


DeviceFactory = Callable[..., SimDevice]


@pytest.fixture(scope="session")
def device_template(tmp_path_factory: pytest.TempPathFactory, manufacturer_ca: ManufacturerCA) -> Path:
    """One manufactured golden device, copied by ``make_device`` (same EK, fresh TPM state)."""
    folder = tmp_path_factory.mktemp("device-template") / "device"
    SimulatedDevice.create(folder, ca=manufacturer_ca, profile="golden").shutdown()
    return folder


@pytest.fixture
def make_device(tmp_path: Path, device_template: Path, manufacturer_ca: ManufacturerCA,
                clock: ManualClock) -> Iterator[DeviceFactory]:
    made: list[SimDevice] = []

    def factory(device_id: str, profile: str = "golden", *, fresh_tpm: bool = False,
                ca: ManufacturerCA | None = None) -> SimDevice:
        folder = tmp_path / "devices" / device_id
        if fresh_tpm or ca is not None:
            sim = SimulatedDevice.create(folder, ca=ca or manufacturer_ca, profile=profile)
        else:
            shutil.copytree(device_template, folder)
            sim = SimulatedDevice(folder)
            if profile != "golden":
                sim.reflash(profile)
        sim.boot()
        device = SimDevice(device_id, sim, tmp_path / "agent-state" / device_id, clock)
        made.append(device)
        return device

    try:
        yield factory
    finally:
        for device in made:
            device.close()


@pytest.fixture
def golden_policy(repo: Repository, device_template: Path, clock: ManualClock) -> admin.StoredPolicy:
    """The golden profile's reference values (from a golden boot's event log), stored and active."""
    from firmware_sim.boot import BootMedia, build_boot_log
    from firmware_sim.profiles import get_profile

    profile = get_profile("golden")
    log = build_boot_log(BootMedia.from_specs(profile.image_specs()), profile.boot_settings).to_bytes()
    policy = policy_from_eventlog(parse_eventlog(log), name="golden", device_class=DEVICE_CLASS,
                                  firmware_version=FIRMWARE)
    return admin.store_policy(repo, policy, now=clock.now_ms())


# --------------------------------------------------------------------------------------------------
# reading the server's replies
# --------------------------------------------------------------------------------------------------
def decode_reply(signer: ResultSigner, out: Outgoing, aud: str) -> Envelope:
    """Verify and decode a signed server reply addressed to ``aud``."""
    return decode_signed(out.payload, keys={signer.kid: signer.public_key}, aud=aud)


def replies(signer: ResultSigner, out: list[Outgoing], device_id: str, kind: str) -> list[Message]:
    """The messages of ``out`` on ``device_id``'s topic ``kind`` (device or enrollment down topics)."""
    found = []
    for o in out:
        if o.topic == topics.device_down(device_id, kind):
            found.append(decode_reply(signer, o, device_id).message)
        elif o.topic == topics.enroll_down(device_id, kind):
            found.append(decode_reply(signer, o, topics.claim_identity(device_id)).message)
    return found


def one(signer: ResultSigner, out: list[Outgoing], device_id: str, kind: str) -> Any:
    found = replies(signer, out, device_id, kind)
    assert len(found) == 1, f"expected one {kind} for {device_id}, got {len(found)}: {[o.topic for o in out]}"
    return found[0]


def enroll(processor: Processor, signer: ResultSigner, device: SimDevice) -> EnrollResult:
    """Run enroll.request -> enroll.challenge -> enroll.proof -> enroll.result through ``processor``."""
    out = processor.handle_batch([device.enroll_up("request", device.enroll_request())])
    challenge = one(signer, out, device.id, "challenge")
    assert isinstance(challenge, EnrollChallenge), challenge
    out = processor.handle_batch([device.enroll_up("proof", device.enroll_proof(challenge))])
    result = one(signer, out, device.id, "result")
    assert isinstance(result, EnrollResult)
    return result


def attest_once(processor: Processor, signer: ResultSigner, device: SimDevice, reason: str = "boot") -> Any:
    """attest.request -> challenge -> evidence -> attestation.result; returns the result message."""
    out = processor.handle_batch([device.up("hello", device.hello(reason))])
    challenge = one(signer, out, device.id, "challenge")
    out = processor.handle_batch([device.up("evidence", device.evidence(challenge))])
    return one(signer, out, device.id, "result")


def insert_pending_device(repo: Repository, device_id: str) -> ec.EllipticCurvePrivateKey:
    """A device row awaiting approval, with a real CSR of a fresh key (returned); the other enrollment
    fields are placeholders, for tests of the admin commands."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.load_pem_x509_csr(pki.make_device_csr(key, device_id)).public_bytes(serialization.Encoding.DER)
    with repo.write() as tx:
        tx.insert_device(NewDevice(
            id=device_id, state=DeviceState.PENDING, device_class="edge-camera", firmware_version="1.2.0",
            ek_cert=b"c", ek_fingerprint="ab" * 32, ek_public=b"e", ak_public=b"a", ak_name=b"n", csr=csr,
            enroll_request_id="1" * 32, cert_serial=None, now=1_790_000_000_000, next_attestation_at=None),
            cause="enrolled: awaiting approval")
    return key
