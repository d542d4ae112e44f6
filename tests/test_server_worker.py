"""Workers on a real Mosquitto broker (TLS, per-device certificates, ACL) with real swtpm devices:
enrollment and attestation end to end over MQTT, outbox delivery of approvals and revocations, the
broker's and the server's refusal of evidence on another device's topic, malformed traffic, shared
subscriptions across workers, and `fleet-server run` stopping cleanly on SIGTERM."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from firmware_sim.broker import BrokerPki, MosquittoBroker
from firmware_sim.manufacturer import ManufacturerCA
from fleet_server import pki
from fleet_server.cli import main as cli_main
from fleet_server.config import ServerConfig
from fleet_server.keys import ResultSigner
from fleet_server.rollouts.plan import Group, parse_plan
from fleet_server.service import admin, rollouts
from fleet_server.service.common import ManualClock
from fleet_server.service.context import ServiceContext
from fleet_server.service.releases import add_release
from fleet_server.service.worker import Worker
from fleet_server.storage.models import DeviceState
from fleet_server.storage.repo import NewDevice, Repository
from protocol import topics
from protocol.errors import TransportError
from protocol.messages import (
    AttestationResult,
    Challenge,
    EnrollChallenge,
    EnrollResult,
    Message,
    Revocation,
    decode_signed,
)
from protocol.mqtt import MqttClient, TlsFiles

pytest.register_assert_rewrite("mqtt_fixtures", "server_fixtures", "release_fixtures")
from mqtt_fixtures import WAIT, ClientFactory, Credentials, RawClient, wait_until  # noqa: E402
from release_fixtures import MemoryTargetStore, write_bundle_dir  # noqa: E402
from server_fixtures import BOTH_DATABASES, DeviceFactory, SimDevice, make_config  # noqa: E402

pytest_plugins = ("mqtt_fixtures", "server_fixtures", "pg_fixtures")
pytestmark = [pytest.mark.mqtt, BOTH_DATABASES]

WorkerFactory = Callable[..., Worker]


@pytest.fixture
def worker_config(
        server_config: ServerConfig, fleet_pki: BrokerPki, manufacturer_ca: ManufacturerCA,
        mqtt_broker: MosquittoBroker) -> ServerConfig:
    assert mqtt_broker.port is not None
    return make_config(server_config.data_dir, fleet_pki, manufacturer_ca.bundle, port=mqtt_broker.port,
                       database_url=server_config.database_url)


@pytest.fixture
def make_worker(
        worker_config: ServerConfig, ctx: ServiceContext, repo: Repository) -> Iterator[WorkerFactory]:
    made: list[Worker] = []

    def factory() -> Worker:
        worker = Worker(worker_config, index=len(made), ctx=ctx, repo=repo).start()
        made.append(worker)
        worker.wait_connected(WAIT)
        return worker

    try:
        yield factory
    finally:
        for worker in made:
            worker.stop()


class Inbox:
    """Signed messages a device client receives, verified with the pinned server key."""

    def __init__(self, client: MqttClient, signer: ResultSigner, aud: str) -> None:
        self.client, self.signer, self.aud = client, signer, aud

    def next(self, kind: type[Message], *, skip: Callable[[Any], bool] = lambda m: False) -> Any:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            inbound = self.client.receive(max(0.0, deadline - time.monotonic()))
            if inbound is None:
                break
            message = decode_signed(inbound.payload, keys={self.signer.kid: self.signer.public_key},
                                    aud=self.aud).message
            if isinstance(message, kind) and not skip(message):
                return message
        raise AssertionError(f"no {kind.__name__} for {self.aud} within {WAIT}s")


def _device_tls(tmp_path: Path, fleet_pki: BrokerPki, dev: SimDevice, cert_der: bytes) -> TlsFiles:
    cert_pem = x509.load_der_x509_certificate(cert_der).public_bytes(serialization.Encoding.PEM)
    cert, key = pki.write_credential(tmp_path / "device-creds", dev.id,
                                     pki.IssuedCredential(cert_pem, pki.private_key_pem(dev.tls_key)))
    return TlsFiles(fleet_pki.ca_cert, cert, key)


@pytest.mark.swtpm
def test_enrollment_approval_attestation_and_revocation_over_mqtt(
        make_worker: WorkerFactory, make_client: ClientFactory, credentials: Credentials, repo: Repository,
        signer: ResultSigner, make_device: DeviceFactory, golden_policy: admin.StoredPolicy,
        fleet_pki: BrokerPki, clock: ManualClock, tmp_path: Path) -> None:
    worker = make_worker()
    dev = make_device("cam-40")
    claim = make_client(credentials.claim("cam-40"), client_id="claim-cam-40",
                        subscriptions=(topics.enroll_down_filter("cam-40"),))
    inbox = Inbox(claim, signer, "claim:cam-40")
    claim.publish(topics.enroll_up("cam-40", "request"), dev.enroll_request()).wait(WAIT)
    challenge = inbox.next(EnrollChallenge)
    claim.publish(topics.enroll_up("cam-40", "proof"), dev.enroll_proof(challenge)).wait(WAIT)
    result = inbox.next(EnrollResult)
    assert result.status == "pending"
    # The admin approves (from the CLI side: database + outbox); a worker delivers the certificate.
    admin.approve_device(repo, "cam-40", signer=signer, fleet_ca=fleet_pki.load_ca(), now=clock.now_ms())
    admitted = inbox.next(EnrollResult)
    assert admitted.status == "admitted" and admitted.device_cert is not None
    wait_until(lambda: not repo.outbox(), what="outbox row marked sent")

    device = make_client(_device_tls(tmp_path, fleet_pki, dev, admitted.device_cert), client_id="cam-40",
                         subscriptions=(topics.device_down_filter("cam-40"),))
    inbox = Inbox(device, signer, "cam-40")
    device.publish(topics.device_up("cam-40", "hello"), dev.hello("boot")).wait(WAIT)
    challenge = inbox.next(Challenge)
    payload = dev.evidence(challenge)
    device.publish(topics.device_up("cam-40", "evidence"), payload).wait(WAIT)
    verdict = inbox.next(AttestationResult)
    assert verdict.verdict == "trusted" and verdict.challenge_id == challenge.challenge_id
    assert verdict.evidence_sha256 == hashlib.sha256(payload).digest()
    assert repo.device("cam-40").state == "trusted"  # type: ignore[union-attr]

    admin.revoke_device(repo, "cam-40", signer=signer, now=clock.now_ms(), reason="decommissioned")
    notice = inbox.next(Revocation)
    assert (notice.state, notice.reasons) == ("revoked", ("decommissioned",))
    wait_until(lambda: not repo.outbox(), what="revocation marked sent")

    def flushed_sent() -> int:  # the publisher counts a row just after committing it as sent
        worker.flush_counters()
        return repo.counters().get("outbox.sent", 0)

    wait_until(lambda: flushed_sent() >= 2, what="the outbox counters flushed")
    totals = repo.counters()
    assert totals["attestations"] == 1 and totals["verdict.trusted"] == 1 and totals["outbox.sent"] == 2


def _fake_devices(repo: Repository, ids: list[str], now: int) -> None:
    with repo.write() as tx:
        for device_id in ids:
            tx.insert_device(NewDevice(
                id=device_id, state=DeviceState.ENROLLED, device_class="edge-camera",
                firmware_version="1.2.0",
                ek_cert=b"c", ek_fingerprint=hashlib.sha256(device_id.encode()).hexdigest(), ek_public=b"e",
                ak_public=b"a", ak_name=b"n", csr=None, enroll_request_id=None, cert_serial=None, now=now,
                next_attestation_at=now + 3_600_000), cause="test")


def test_evidence_on_another_devices_topic_refused_by_broker_and_server(
        make_worker: WorkerFactory, make_client: ClientFactory, credentials: Credentials, repo: Repository,
        signer: ResultSigner, clock: ManualClock) -> None:
    worker = make_worker()
    _fake_devices(repo, ["dev-a", "dev-b"], clock.now_ms())
    a = make_client(credentials.device("dev-a"), client_id="dev-a",
                    subscriptions=(topics.device_down_filter("dev-a"),))
    inbox = Inbox(a, signer, "dev-a")
    a.publish(topics.device_up("dev-a", "hello"), SimHello.payload(clock)).wait(WAIT)
    challenge = inbox.next(Challenge)
    # A cannot publish on B's subtree: the broker refuses (MQTT v5 PUBACK 0x87 Not authorized).
    with pytest.raises(TransportError, match="0x87"):
        a.publish(topics.device_up("dev-b", "evidence"), SimHello.evidence_for(challenge, clock)).wait(WAIT)
    # Relayed by B itself (B holds its own certificate), the server refuses it: the challenge is A's.
    b = make_client(credentials.device("dev-b"), client_id="dev-b")
    b.publish(topics.device_up("dev-b", "evidence"), SimHello.evidence_for(challenge, clock)).wait(WAIT)
    wait_until(lambda: worker.counters.get("rejected.challenge_wrong_device") == 1, what="server refusal")
    assert worker.counters.get("received.evidence") == 1  # the broker never delivered A's attempt
    assert repo.challenge(challenge.challenge_id).status == "open"  # type: ignore[union-attr]


class SimHello:
    """Device messages that need no TPM."""

    @staticmethod
    def payload(clock: ManualClock, reason: str = "boot") -> bytes:
        from protocol.messages import AttestRequest, encode_plain

        return encode_plain(AttestRequest(reason=reason, agent_version="test"), ts=clock.now_ms())

    @staticmethod
    def evidence_for(challenge: Challenge, clock: ManualClock) -> bytes:
        from protocol.messages import Evidence, encode_plain

        return encode_plain(Evidence(challenge_id=challenge.challenge_id, attest=b"\0" * 64,
                                     signature=b"\0" * 16,
                                     pcrs={}, eventlog_offset=0, eventlog=b""), ts=clock.now_ms())


def test_malformed_traffic_is_counted_and_the_worker_keeps_serving(
        make_worker: WorkerFactory, make_client: ClientFactory, credentials: Credentials, repo: Repository,
        signer: ResultSigner, mqtt_broker: MosquittoBroker, clock: ManualClock) -> None:
    worker = make_worker()
    _fake_devices(repo, ["dev-c"], clock.now_ms())
    assert mqtt_broker.port is not None
    with RawClient(mqtt_broker.port, credentials.device("dev-c"), "dev-c-raw") as raw:
        hello = topics.device_up("dev-c", "hello")
        for junk in (b"", b"\xff\xfe", b"[]", b'{"v":1}', b"x" * 17_000, b'{"a":' * 40 + b"1" + b"}" * 40):
            raw.wait_ack(raw.publish(hello, junk))
        raw.wait_ack(raw.publish(topics.device_up("dev-c", "unknown-kind"), b"{}"))
    client = make_client(credentials.device("dev-c"), client_id="dev-c",
                         subscriptions=(topics.device_down_filter("dev-c"),))
    client.publish(topics.device_up("dev-c", "hello"), SimHello.payload(clock)).wait(WAIT)
    assert isinstance(Inbox(client, signer, "dev-c").next(Challenge), Challenge)
    counts = worker.counters.snapshot()
    assert counts["rejected.malformed"] == 5 and counts["rejected.oversized"] == 1
    assert counts["rejected.kind_unknown"] == 1


def test_two_workers_share_the_load(
        make_worker: WorkerFactory, make_client: ClientFactory, credentials: Credentials, repo: Repository,
        signer: ResultSigner, clock: ManualClock) -> None:
    workers = [make_worker(), make_worker()]
    assert workers[0].client_id != workers[1].client_id
    ids = [f"dev-s{i}" for i in range(12)]
    _fake_devices(repo, ids, clock.now_ms())
    clients = [make_client(credentials.device(d), client_id=d, subscriptions=(topics.device_down_filter(d),))
               for d in ids]
    for device_id, client in zip(ids, clients, strict=True):
        client.publish(topics.device_up(device_id, "hello"), SimHello.payload(clock)).wait(WAIT)
    for device_id, client in zip(ids, clients, strict=True):
        assert isinstance(Inbox(client, signer, device_id).next(Challenge), Challenge)
    served = [w.counters.get("received.hello") for w in workers]
    assert sum(served) == len(ids) and all(n > 0 for n in served), served  # each message to one worker


def _write_config(path: Path, config: ServerConfig, fleet_pki: BrokerPki, signing_key: Path) -> None:
    path.write_text("\n".join([
        "[server]", f'data_dir = "{config.data_dir}"', f'database_url = "{config.database_url}"',
        f'signing_key = "{signing_key}"', f'fleet_ca_cert = "{fleet_pki.ca_cert}"',
        f'fleet_ca_key = "{fleet_pki.ca_key}"', f'trust_bundle = "{config.trust_bundle}"',
        f'log_file = "{config.data_dir / "run.log"}"',
        "[mqtt]", 'host = "127.0.0.1"', f"port = {config.mqtt.port}", f'ca_cert = "{fleet_pki.ca_cert}"',
        f'cert = "{fleet_pki.server_cert}"', f'key = "{fleet_pki.server_key}"',
        "[attestation]", "scheduler_tick = 0.2", "",
    ]))


def test_sigterm_while_workers_are_still_starting_stops_them_all_cleanly(
        repo: Repository, worker_config: ServerConfig, fleet_pki: BrokerPki, signer: ResultSigner,
        tmp_path: Path) -> None:
    """SIGTERM as soon as the supervisor has spawned its workers (they are still importing): no worker
    is killed half-way; each stops through its own handler, and the server exits 0."""
    config_path = tmp_path / "server.toml"
    _write_config(config_path, worker_config, fleet_pki, worker_config.signing_key)
    log_path = worker_config.data_dir / "run.log"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "fleet_server.cli", "run", "--config", str(config_path),
                             "--workers", "2"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline and proc.poll() is None:
            if log_path.exists() and log_path.read_text().count("event=worker_process_started") >= 2:
                break
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGTERM)
        status = proc.wait(WAIT + 60)
        assert status == 0, proc.stderr.read().decode() if proc.stderr else status
        log = log_path.read_text()
        assert log.count("event=worker_stopped") == 2, log
        assert "worker_process_exited" not in log and "Traceback" not in log
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        if proc.stderr:
            proc.stderr.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_run_serves_and_stops_cleanly_on_sigterm(
        repo: Repository, workers: int, worker_config: ServerConfig, fleet_pki: BrokerPki,
        make_client: ClientFactory, credentials: Credentials, signer: ResultSigner, tmp_path: Path) -> None:
    config_path = tmp_path / "server.toml"
    _write_config(config_path, worker_config, fleet_pki, worker_config.signing_key)
    assert cli_main(["db", "upgrade", "--config", str(config_path)]) == 0  # already current: a no-op
    now = time.time_ns() // 1_000_000
    _fake_devices(repo, ["dev-r"], now)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "fleet_server.cli", "run", "--config", str(config_path),
                             "--workers", str(workers)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        client = make_client(credentials.device("dev-r"), client_id="dev-r",
                             subscriptions=(topics.device_down_filter("dev-r"),))
        # The workers may still be connecting: ask until a challenge arrives.
        deadline = time.monotonic() + WAIT
        got = None
        while got is None and time.monotonic() < deadline:
            client.publish(topics.device_up("dev-r", "hello"), SimHello.payload(ManualClock(now))).wait(WAIT)
            got = client.receive(1.0)
        assert got is not None, "the running server never answered"
        assert isinstance(decode_signed(got.payload, keys={signer.kid: signer.public_key},
                                        aud="dev-r").message,
                          Challenge)
        os.kill(proc.pid, signal.SIGTERM)
        status = proc.wait(WAIT + 30)
        assert status == 0, proc.stderr.read().decode() if proc.stderr else status
        log = (worker_config.data_dir / "run.log").read_text()
        assert log.count("event=worker_stopped") == workers
        assert "Traceback" not in log
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
        if proc.stderr:
            proc.stderr.close()


def test_the_workers_step_running_rollouts_and_publish_the_assignments(
        make_worker: WorkerFactory, repo: Repository, clock: ManualClock, tmp_path: Path) -> None:
    add_release(repo, MemoryTargetStore(), write_bundle_dir(tmp_path / "bundle"),
                device_class="edge-camera", version="1.3.0", now=clock.now_ms(), actor="test")
    _fake_devices(repo, ["cam-50", "cam-51"], clock.now_ms())
    rollouts.create_rollout(repo, target="firmware/edge-camera/1.3.0.fwb", group=Group("edge-camera"),
                            plan=parse_plan({"canary": 1}), now=clock.now_ms(), actor="test", rollout_id="r1")
    worker = make_worker()
    wait_until(lambda: [m.state for m in repo.rollouts.members("r1")].count("assigned") == 1,
               what="the canary assigned by the worker's housekeeping")
    wait_until(lambda: not repo.outbox(), what="the signed assignment published")
    worker.flush_counters()
    assert repo.counters().get("rollouts.assigned") == 1
