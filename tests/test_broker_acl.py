"""The fleet's Mosquitto broker: lifecycle, and what its TLS listener and ACL allow and refuse.

Negative checks never wait for "nothing happened": after the forbidden action the test sends a
*marker* message on the same path that is allowed, waits for it, and then asserts that the
forbidden message did not arrive before it (the broker handles one client's packets in order).
"""

from __future__ import annotations

import os
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import firmware_sim.broker as broker_mod
from firmware_sim.broker import ACL, BrokerPki, MosquittoBroker
from protocol import topics
from protocol.errors import ProcessError, TransportError
from protocol.mqtt import InboundMessage, MqttClient, TlsFiles
from protocol.topics import Subtree

pytest.register_assert_rewrite("mqtt_fixtures")  # before the import below, which loads it first
from mqtt_fixtures import (  # noqa: E402
    FAST_BACKOFF,
    WAIT,
    ClientFactory,
    Credentials,
    RawClient,
    probe_connect,
    wait_until,
)

pytest_plugins = ("mqtt_fixtures", "operator_fixtures")
pytestmark = pytest.mark.mqtt

NOT_AUTHORIZED = 0x87


def _until_marker(client: MqttClient, marker: str) -> list[InboundMessage]:
    """Everything ``client`` receives up to and including the message on topic ``marker``."""
    seen: list[InboundMessage] = []
    while True:
        msg = client.receive(WAIT)
        assert msg is not None, f"marker {marker} never arrived; got {[m.topic for m in seen]}"
        seen.append(msg)
        if msg.topic == marker:
            return seen


def _raw_until_marker(raw: RawClient, marker: str) -> list[str]:
    seen: list[str] = []
    while True:
        msg = raw.messages.get(timeout=WAIT)
        seen.append(msg.topic)
        if msg.topic == marker:
            return seen


@pytest.fixture
def server(make_client: ClientFactory, credentials: Credentials) -> MqttClient:
    """A fleet-server worker subscribed with the shared subscriptions."""
    return make_client(credentials.server(), client_id="fleet-server-1",
                       subscriptions=topics.server_subscriptions())


# -- lifecycle -------------------------------------------------------------------------------------
def test_generated_config_and_acl(mqtt_broker: MosquittoBroker, fleet_pki: BrokerPki) -> None:
    conf = mqtt_broker.conf_path.read_text().splitlines()
    for line in ("allow_anonymous false", "require_certificate true", "use_identity_as_username true",
                 "persistence false", f"max_packet_size {broker_mod.DEFAULT_MAX_PACKET_SIZE}",
                 f"listener {mqtt_broker.port} 127.0.0.1", f"acl_file {mqtt_broker.acl_path}",
                 f"log_dest file {mqtt_broker.log_path}"):
        assert line in conf
    assert mqtt_broker.acl_path.read_text() == ACL
    assert "user fleet-server\ntopic readwrite fleet/v1/#\n" in ACL
    for pattern in ("pattern write fleet/v1/devices/%u/up/#", "pattern read fleet/v1/devices/%u/down/#",
                    "pattern write fleet/v1/enroll/%u/up/#", "pattern read fleet/v1/enroll/%u/down/#"):
        assert pattern in ACL.splitlines()
    assert not any("readwrite" in ln for ln in ACL.splitlines() if ln.startswith("pattern"))
    assert "running" in mqtt_broker.log_path.read_text()
    assert stat.S_IMODE(os.stat(fleet_pki.broker_key).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(fleet_pki.ca_key).st_mode) == 0o600


def test_stop_leaves_no_process(tmp_path: Path, fleet_pki: BrokerPki) -> None:
    with MosquittoBroker.for_pki(tmp_path / "b", fleet_pki) as broker:
        pid = broker.pid
        assert pid is not None and broker.running
    assert not broker.running and broker.port is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    broker.stop()  # idempotent


def test_restart_keeps_the_port(mqtt_broker: MosquittoBroker) -> None:
    port, pid = mqtt_broker.port, mqtt_broker.pid
    mqtt_broker.restart()
    assert mqtt_broker.port == port and mqtt_broker.running and mqtt_broker.pid != pid
    assert pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_missing_mosquitto_is_a_clear_error(tmp_path: Path, fleet_pki: BrokerPki,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(broker_mod, "MOSQUITTO", str(tmp_path / "no-such-mosquitto"))
    with pytest.raises(ProcessError, match="not installed"):
        MosquittoBroker.for_pki(tmp_path / "b", fleet_pki).start()


def test_startup_failure_reports_the_broker_log(tmp_path: Path, fleet_pki: BrokerPki) -> None:
    bad_key = tmp_path / "bad.key"
    bad_key.write_text("not a key\n")
    broker = MosquittoBroker(tmp_path / "b", fleet_pki.ca_cert, fleet_pki.broker_cert, bad_key)
    with pytest.raises(ProcessError) as info:
        broker.start(attempts=1)
    # Mosquitto's own words about the cause, not a generic "exited".
    assert "Unable to load server key file" in info.value.diagnostics()
    assert not broker.running


def test_start_retries_when_the_port_is_taken(tmp_path: Path, fleet_pki: BrokerPki,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process binds the chosen port first (the race free_port cannot exclude)."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        ports: Iterator[int] = iter([taken])
        real_free_port = broker_mod.free_port
        monkeypatch.setattr(broker_mod, "free_port", lambda host="127.0.0.1": next(ports, None)
                            or real_free_port(host))
        with MosquittoBroker.for_pki(tmp_path / "b", fleet_pki) as broker:
            assert broker.port is not None and broker.port != taken
            assert probe_connect(broker.port, fleet_pki.ca_cert, fleet_pki.server_cert,
                                 fleet_pki.server_key) == "accepted"


# -- authentication --------------------------------------------------------------------------------
def test_only_fleet_ca_client_certificates_connect(mqtt_broker: MosquittoBroker, fleet_pki: BrokerPki,
                                                   credentials: Credentials) -> None:
    assert mqtt_broker.port is not None
    device = credentials.device("dev-a")
    # Positive control: the probe does connect with a proper certificate.
    assert probe_connect(mqtt_broker.port, fleet_pki.ca_cert, device.cert, device.key) == "accepted"
    assert probe_connect(mqtt_broker.port, fleet_pki.ca_cert).startswith("rejected")
    forged = credentials.foreign_device("dev-a")
    assert probe_connect(mqtt_broker.port, fleet_pki.ca_cert, forged.cert, forged.key).startswith("rejected")


def test_mqtt_client_with_foreign_certificate_never_connects(make_client: ClientFactory,
                                                             credentials: Credentials) -> None:
    client = make_client(credentials.foreign_device("dev-a"), client_id="dev-a", connect=False)
    wait_until(lambda: client.stats().connect_failures >= 2, what="two failed attempts")
    assert client.stats().connects == 0 and not client.connected
    assert client.last_error
    with pytest.raises(TransportError, match="not connected"):
        client.wait_connected(0.01)


# -- authorization (ACL) ---------------------------------------------------------------------------
def test_device_publishes_on_its_up_topic_and_server_receives(server: MqttClient, make_client: ClientFactory,
                                                             credentials: Credentials) -> None:
    device = make_client(credentials.device("dev-a"), client_id="dev-a")
    handle = device.publish(topics.device_up("dev-a", "evidence"), b"quote")
    handle.wait(WAIT)
    assert handle.reason_code == 0
    msg = server.receive(WAIT)
    assert msg is not None and msg.payload == b"quote"
    assert topics.parse_server_topic(msg.topic) == (Subtree.DEVICES, "dev-a", "evidence")


def test_rsa_device_certificate_works(server: MqttClient, make_client: ClientFactory,
                                      credentials: Credentials) -> None:
    device = make_client(credentials.device("dev-r", use_rsa=True), client_id="dev-r")
    device.publish(topics.device_up("dev-r", "evidence"), b"rsa").wait(WAIT)
    msg = server.receive(WAIT)
    assert msg is not None and msg.topic == topics.device_up("dev-r", "evidence")


def test_device_cannot_publish_as_another_device(server: MqttClient, make_client: ClientFactory,
                                                 credentials: Credentials) -> None:
    device_a = make_client(credentials.device("dev-a"), client_id="dev-a")
    forbidden = device_a.publish(topics.device_up("dev-b", "evidence"), b"spoofed")
    with pytest.raises(TransportError, match="Not authorized"):
        forbidden.wait(WAIT)
    assert forbidden.reason_code == NOT_AUTHORIZED
    assert device_a.stats().publish_refused == 1
    marker = topics.device_up("dev-a", "marker")
    device_a.publish(marker, b"").wait(WAIT)
    assert [m.topic for m in _until_marker(server, marker)] == [marker]
    assert device_a.connected  # a refused publish does not cost the connection


def test_device_cannot_read_another_devices_down_topics(server: MqttClient, make_client: ClientFactory,
                                                        credentials: Credentials,
                                                        mqtt_broker: MosquittoBroker) -> None:
    assert mqtt_broker.port is not None
    device_b = make_client(credentials.device("dev-b"), client_id="dev-b",
                           subscriptions=(topics.device_down_filter("dev-b"),))
    with RawClient(mqtt_broker.port, credentials.device("dev-a"), "dev-a") as device_a:
        # Mosquitto 2.0 grants the SUBACK but applies the read ACL to every delivery; a broker that
        # refuses the subscription outright is just as good.
        codes = [device_a.subscribe(f) for f in (topics.device_down_filter("dev-b"), "fleet/v1/#", "#")]
        device_a.subscribe(topics.device_down_filter("dev-a"))
        secret = topics.device_down("dev-b", "key")
        server.publish(secret, b"wrapped key for b").wait(WAIT)
        received_b = device_b.receive(WAIT)
        assert received_b is not None and received_b.topic == secret  # it was delivered, to B only
        marker = topics.device_down("dev-a", "marker")
        server.publish(marker, b"").wait(WAIT)
        seen = _raw_until_marker(device_a, marker)
    assert seen.count(marker) >= 1 and secret not in seen, (codes, seen)


def test_device_cannot_publish_on_its_own_down_topic(server: MqttClient, make_client: ClientFactory,
                                                     credentials: Credentials) -> None:
    device = make_client(credentials.device("dev-a"), client_id="dev-a",
                         subscriptions=(topics.device_down_filter("dev-a"),))
    fake = device.publish(topics.device_down("dev-a", "result"), b"I am trusted")
    with pytest.raises(TransportError):
        fake.wait(WAIT)
    assert fake.reason_code == NOT_AUTHORIZED
    marker = topics.device_down("dev-a", "marker")
    server.publish(marker, b"").wait(WAIT)
    assert [m.topic for m in _until_marker(device, marker)] == [marker]


def test_claim_certificate_reaches_only_its_enrollment_topics(server: MqttClient, make_client: ClientFactory,
                                                              credentials: Credentials) -> None:
    claim = make_client(credentials.claim("dev-c"), client_id="claim-dev-c",
                        subscriptions=(topics.enroll_down_filter("dev-c"),
                                       topics.device_down_filter("dev-c")))
    # Allowed: its own enrollment up topic.
    claim.publish(topics.enroll_up("dev-c", "hello"), b"ek cert").wait(WAIT)
    msg = server.receive(WAIT)
    assert msg is not None
    assert topics.parse_server_topic(msg.topic) == (Subtree.ENROLL, "claim:dev-c", "hello")
    # Refused: the device topics of the id it claims, and another device's enrollment.
    for topic in (topics.device_up("dev-c", "evidence"), topics.enroll_up("dev-d", "hello")):
        handle = claim.publish(topic, b"x")
        with pytest.raises(TransportError):
            handle.wait(WAIT)
        assert handle.reason_code == NOT_AUTHORIZED
    # The ACL pattern also lets it write fleet/v1/devices/claim:dev-c/up/...; the server's topic
    # parser refuses that identity, so it reaches no handler.
    stray = "fleet/v1/devices/claim:dev-c/up/evidence"
    claim.publish(stray, b"x").wait(WAIT)
    marker = topics.enroll_up("dev-c", "marker")
    claim.publish(marker, b"").wait(WAIT)
    seen = [m.topic for m in _until_marker(server, marker)]
    assert seen == [stray, marker]
    with pytest.raises(topics.TopicError):
        topics.parse_server_topic(stray)
    # Reading: the device's down topics are not delivered to the claim identity, its enroll ones are.
    server.publish(topics.device_down("dev-c", "key"), b"not for a claim cert").wait(WAIT)
    answer = topics.enroll_down("dev-c", "cert")
    server.publish(answer, b"device certificate").wait(WAIT)
    assert [m.topic for m in _until_marker(claim, answer)] == [answer]


def test_device_certificate_cannot_use_enrollment_of_its_claim(server: MqttClient, make_client: ClientFactory,
                                                               credentials: Credentials) -> None:
    device = make_client(credentials.device("dev-c"), client_id="dev-c")
    handle = device.publish(topics.enroll_up("dev-c", "hello"), b"x")
    with pytest.raises(TransportError):
        handle.wait(WAIT)
    assert handle.reason_code == NOT_AUTHORIZED


def test_oversized_message_is_refused_by_the_broker(server: MqttClient, make_client: ClientFactory,
                                                    credentials: Credentials,
                                                    mqtt_broker: MosquittoBroker) -> None:
    assert mqtt_broker.port is not None
    limit = broker_mod.DEFAULT_MAX_PACKET_SIZE
    tls = credentials.device("dev-a")
    with RawClient(mqtt_broker.port, tls, "dev-a-raw") as raw:
        # Positive control: just below the limit is delivered.
        fits = topics.device_up("dev-a", "fits")
        raw.wait_ack(raw.publish(fits, b"f" * (limit - 1024)))
        msg = server.receive(WAIT)
        assert msg is not None and msg.topic == fits
        # Over the limit: the broker disconnects the sender instead of delivering.
        raw.publish(topics.device_up("dev-a", "huge"), b"h" * (limit + 1))
        assert raw.disconnected.wait(WAIT)
    assert "oversize" in mqtt_broker.log_path.read_text()
    device = make_client(tls, client_id="dev-a")
    marker = topics.device_up("dev-a", "marker")
    device.publish(marker, b"").wait(WAIT)
    assert [m.topic for m in _until_marker(server, marker)] == [marker]


# --------------------------------------------------------------------------------------------------
# the broker `fleet-server init` sets up: device and server listeners, client ids bound to identities
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def init_broker(broker: MosquittoBroker, data_dir: Path) -> tuple[MosquittoBroker, Path]:
    """The broker `fleet-server init` configures (operator_fixtures), with its data folder."""
    return broker, data_dir


def _device_tls(data_dir: Path, folder: Path, device_id: str) -> TlsFiles:
    """A device certificate from the fleet CA `fleet-server init` made (its pki/ is a BrokerPki)."""
    return Credentials(folder, BrokerPki(data_dir / "pki")).device(device_id)


def _client(broker: MosquittoBroker, port: int | None, tls: TlsFiles, client_id: str,
            *subscriptions: str) -> MqttClient:
    assert port is not None
    return MqttClient("127.0.0.1", port, tls, client_id=client_id, subscriptions=subscriptions,
                      backoff=FAST_BACKOFF).start()


def test_a_device_cannot_take_over_another_clients_session_by_its_client_id(
        init_broker: tuple[MosquittoBroker, Path], tmp_path: Path) -> None:
    broker, data_dir = init_broker
    server_tls = TlsFiles(data_dir / "pki/fleet-ca.pem", data_dir / "pki/fleet-server.pem",
                          data_dir / "pki/fleet-server.key")
    victim_tls = _device_tls(data_dir, tmp_path / "creds", "dev-victim")
    attacker_tls = _device_tls(data_dir, tmp_path / "creds", "dev-attacker")
    server = _client(broker, broker.server_port, server_tls, "fleet-server-test-0")
    victim = _client(broker, broker.port, victim_tls, "dev-victim", topics.device_down_filter("dev-victim"))
    clients = [server, victim]
    try:
        server.wait_connected(WAIT)
        victim.wait_connected(WAIT)
        # The attacker, with a valid certificate of its own, connects under the victim's client id
        # (and then under the server's): without use_username_as_clientid the broker would close the
        # victim's connection ("already connected, closing old connection"), again at every retry.
        for stolen in ("dev-victim", "fleet-server-test-0"):
            attacker = _client(broker, broker.port, attacker_tls, stolen)
            clients.append(attacker)
            attacker.wait_connected(WAIT)
        marker = topics.device_down("dev-victim", "marker")
        server.publish(marker, b"still here").wait(WAIT)
        got = victim.receive(WAIT)
        assert got is not None and got.topic == marker
        assert victim.stats().disconnects == 0 and server.stats().disconnects == 0
        assert victim.connected and server.connected
        log = broker.log_path.read_text()
        assert "Client dev-victim already connected" not in log
        assert "Client fleet-server-test-0 already connected" not in log
        # (the attacker's second connection did replace its first: both were dev-attacker)
        assert "Client dev-attacker already connected, closing old connection" in log
        assert " as dev-attacker " in log  # the broker used the certificate's name as its client id

        # A device certificate does not get through the server listener at all (other CA).
        outcome = probe_connect(broker.server_port or 0, data_dir / "pki/fleet-ca.pem",
                                victim_tls.cert, victim_tls.key)
        assert outcome.startswith("rejected"), outcome
        # ... while the server's own certificate is refused on the device listener's CA check too.
        assert probe_connect(broker.port or 0, data_dir / "pki/fleet-ca.pem", server_tls.cert,
                             server_tls.key).startswith("rejected")
    finally:
        for client in clients:
            client.stop()


def test_server_workers_keep_their_own_client_ids_on_the_server_listener(
        init_broker: tuple[MosquittoBroker, Path]) -> None:
    broker, data_dir = init_broker
    tls = TlsFiles(data_dir / "pki/fleet-ca.pem", data_dir / "pki/fleet-server.pem",
                   data_dir / "pki/fleet-server.key")
    workers = [_client(broker, broker.server_port, tls, f"fleet-server-w{i}") for i in range(2)]
    try:
        for worker in workers:
            worker.wait_connected(WAIT)
        # Both stay connected: they share the identity fleet-server but not a client id.
        workers[0].publish(topics.device_down("dev-x", "probe"), b"x").wait(WAIT)
        assert all(w.connected and w.stats().disconnects == 0 for w in workers)
        log = broker.log_path.read_text()
        assert " as fleet-server-w0 " in log and " as fleet-server-w1 " in log
    finally:
        for worker in workers:
            worker.stop()


def test_a_revoked_device_certificate_is_refused_once_the_broker_reloads_the_crl(
        init_broker: tuple[MosquittoBroker, Path], tmp_path: Path) -> None:
    from cryptography import x509

    from fleet_server import pki

    broker, data_dir = init_broker
    revoked = _device_tls(data_dir, tmp_path / "creds", "dev-stolen")
    other = _device_tls(data_dir, tmp_path / "creds", "dev-fine")
    ca_pem = data_dir / "pki/fleet-ca.pem"
    assert probe_connect(broker.port or 0, ca_pem, revoked.cert, revoked.key) == "accepted"
    serial = format(x509.load_pem_x509_certificate(revoked.cert.read_bytes()).serial_number, "x")
    ca = pki.load_ca_files(ca_pem, data_dir / "pki/fleet-ca.key")
    # What `fleet-server device revoke` writes, then what `systemctl reload mosquitto` does.
    pki.write_certificate(data_dir / "pki/fleet-ca.crl.pem", pki.build_crl(ca, [serial], now=time.time()))
    broker.reload()
    wait_until(lambda: "revoked" in probe_connect(broker.port or 0, ca_pem, revoked.cert, revoked.key),
               what="the broker to refuse the revoked certificate")
    assert probe_connect(broker.port or 0, ca_pem, other.cert, other.key) == "accepted"


def test_every_certificate_of_a_revoked_device_and_a_replaced_one_are_refused(
        init_broker: tuple[MosquittoBroker, Path], tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    from fleet_server import pki
    from fleet_server.config import load_config
    from fleet_server.keys import load_signing_key
    from fleet_server.migrations import upgrade
    from fleet_server.service.admin import revoke_device
    from fleet_server.service.crl import record_issued, write_crl
    from fleet_server.storage.db import create_engine
    from fleet_server.storage.models import DeviceState
    from fleet_server.storage.repo import NewDevice, Repository

    broker, data_dir = init_broker
    config = load_config(data_dir / "server.toml")
    engine = create_engine(config.database_url)
    upgrade(engine)
    repo = Repository(engine)
    ca = pki.load_ca_files(config.fleet_ca_cert, config.fleet_ca_key)
    signer = load_signing_key(config.signing_key)
    ca_pem = config.fleet_ca_cert
    now = int(time.time() * 1000)

    def enroll(device_id: str, n: int) -> TlsFiles:
        """One (re-)enrollment as the processor admits it: a new key, a certificate from its CSR,
        stored with record_issued in the same transaction; returns the device's TLS files."""
        key = ec.generate_private_key(ec.SECP256R1())
        cert_pem = pki.sign_device_csr(ca, pki.make_device_csr(key, device_id), device_id, now=time.time())
        with repo.write("test enrollment") as tx:
            if tx.device_identity(device_id) is None:
                tx.insert_device(NewDevice(
                    id=device_id, state=DeviceState.ENROLLED, device_class="test", firmware_version="1",
                    ek_cert=b"ek-" + device_id.encode(), ek_fingerprint=device_id.ljust(64, "0"),
                    ek_public=b"ek", ak_public=b"ak", ak_name=b"ak", csr=None, enroll_request_id=None,
                    cert_serial=None, now=now, next_attestation_at=None), cause="test")
            record_issued(tx, device_id, cert_pem, now=now + n)
        cert, key_path = pki.write_credential(tmp_path / f"{device_id}-{n}", device_id,
                                              pki.IssuedCredential(cert_pem, pki.private_key_pem(key)))
        return TlsFiles(ca_pem, cert, key_path)

    def reload_and_wait(tls: TlsFiles, what: str) -> None:
        write_crl(repo, config, now=time.time())
        broker.reload()
        wait_until(lambda: "revoked" in probe_connect(broker.port or 0, ca_pem, tls.cert, tls.key), what=what)

    try:
        old = enroll("dev-twice", 1)
        current = enroll("dev-twice", 2)
        good = enroll("dev-good", 1)
        # Re-enrollment: the replaced certificate is refused, the new one still connects.
        reload_and_wait(old, "the broker to refuse the replaced certificate")
        assert probe_connect(broker.port or 0, ca_pem, current.cert, current.key) == "accepted"
        # Revocation: every certificate the device was issued is refused; another device connects.
        revoke_device(repo, "dev-twice", signer=signer, now=now + 10)
        reload_and_wait(current, "the broker to refuse the revoked device's current certificate")
        assert probe_connect(broker.port or 0, ca_pem, old.cert, old.key).startswith("rejected")
        assert probe_connect(broker.port or 0, ca_pem, good.cert, good.key) == "accepted"
    finally:
        repo.dispose()


@pytest.mark.slow
def test_run_renews_the_crl_before_it_lapses_and_the_broker_reloads_it(
        init_broker: tuple[MosquittoBroker, Path], tmp_path: Path) -> None:
    import datetime as dt
    import signal
    import subprocess
    import sys

    from cryptography import x509

    from fleet_server import pki

    broker, data_dir = init_broker
    config_path = data_dir / "server.toml"
    config_path.write_text(config_path.read_text().replace(
        "crl_lifetime = 2592000.0", f'crl_lifetime = 6.0\nbroker_pid_file = "{broker.pid_path}"'))
    crl_path = data_dir / "pki/fleet-ca.crl.pem"
    ca_pem = data_dir / "pki/fleet-ca.pem"
    ca = pki.load_ca_files(ca_pem, data_dir / "pki/fleet-ca.key")
    # A CRL about to lapse (what a 6-second lifetime issues), loaded by the broker.
    pki.write_certificate(crl_path, pki.build_crl(ca, [], now=time.time(),
                                                  validity=dt.timedelta(seconds=6)))
    broker.reload()

    def next_update() -> float:
        stamp = x509.load_pem_x509_crl(crl_path.read_bytes()).next_update_utc
        assert stamp is not None
        return stamp.timestamp()

    first = next_update()
    good = _device_tls(data_dir, tmp_path / "creds", "dev-good")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "fleet_server.cli", "run", "--config", str(config_path)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        wait_until(lambda: next_update() > first, timeout=WAIT + 30, what="run to renew the CRL")
        wait_until(lambda: time.time() > first + 1 and next_update() > time.time(), timeout=WAIT + 30,
                   what="the original CRL to have lapsed while a renewed one is current")
        assert probe_connect(broker.port or 0, ca_pem, good.cert, good.key) == "accepted"
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(WAIT + 30)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
