"""Fixtures and helpers for tests against a real Mosquitto broker with the fleet PKI.

Test modules load them with ``pytest_plugins = ("mqtt_fixtures",)`` (they could move to
``conftest.py``).  Every broker and client started here is stopped in the fixture's teardown.

* ``fleet_pki`` (session): CA + broker + fleet-server credentials in a temporary folder.
* ``mqtt_broker``: a running :class:`MosquittoBroker` on a free loopback port.
* ``credentials``: issues client credentials (device certificates through a real CSR, claim
  certificates, the server's, certificates from a foreign CA) as :class:`TlsFiles`.
* ``make_client``: creates and starts :class:`MqttClient` instances with a fast test backoff.
* :class:`RawClient`: a bare paho client, for what a misbehaving device could send.
"""

from __future__ import annotations

import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from firmware_sim.broker import BrokerPki, MosquittoBroker, create_test_pki
from fleet_server import pki
from protocol.mqtt import Backoff, InboundMessage, MqttClient, TlsFiles

FAST_BACKOFF = Backoff(initial=0.1, maximum=1.0, reset_after=5.0)
WAIT = 30.0
"""Generous timeout for waiting on events (never asserted as a duration)."""


def wait_until(predicate: Callable[[], bool], *, timeout: float = WAIT, what: str = "condition") -> None:
    """Poll ``predicate`` until it is true; fail the test if ``timeout`` passes first."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def drain(client: MqttClient, count: int, *, timeout: float = WAIT) -> list[InboundMessage]:
    """Receive exactly ``count`` messages (failing if they do not all arrive in time)."""
    out: list[InboundMessage] = []
    deadline = time.monotonic() + timeout
    while len(out) < count:
        msg = client.receive(max(0.0, deadline - time.monotonic()))
        if msg is None:
            raise AssertionError(f"received {len(out)} of {count} messages")
        out.append(msg)
    return out


class Credentials:
    """Issues client credentials from the test fleet CA into a temporary folder."""

    def __init__(self, folder: Path, fleet_pki: BrokerPki) -> None:
        self.folder = folder
        self.pki = fleet_pki
        self.ca = fleet_pki.load_ca()

    def _write(self, name: str, cert_pem: bytes, key_pem: bytes) -> TlsFiles:
        cert, key = pki.write_credential(self.folder, name, pki.IssuedCredential(cert_pem, key_pem))
        return TlsFiles(self.pki.ca_cert, cert, key)

    def device(self, device_id: str, *, use_rsa: bool = False) -> TlsFiles:
        """An operational device certificate, issued the real way: the device's key signs a CSR."""
        key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey = (
            rsa.generate_private_key(65537, 2048) if use_rsa else ec.generate_private_key(ec.SECP256R1()))
        cert = pki.sign_device_csr(self.ca, pki.make_device_csr(key, device_id), device_id, now=time.time())
        return self._write(f"device-{device_id}", cert, pki.private_key_pem(key))

    def claim(self, device_id: str) -> TlsFiles:
        """A claim (bootstrap) certificate ``claim:<device_id>``."""
        cred = pki.issue_claim_cert(self.ca, device_id, now=time.time())
        return self._write(f"claim-{device_id}", cred.cert_pem, cred.key_pem)

    def server(self) -> TlsFiles:
        """The fleet server's client credentials."""
        return TlsFiles(self.pki.ca_cert, self.pki.server_cert, self.pki.server_key)

    def foreign_device(self, device_id: str) -> TlsFiles:
        """A certificate with CN ``device_id`` from a CA the broker does not trust (a forgery)."""
        other = pki.create_ca(now=time.time(), common_name="Rogue CA")
        key = ec.generate_private_key(ec.SECP256R1())
        cert = pki.sign_device_csr(other, pki.make_device_csr(key, device_id), device_id, now=time.time())
        return self._write(f"foreign-{device_id}", cert, pki.private_key_pem(key))


@pytest.fixture(scope="session")
def fleet_pki(tmp_path_factory: pytest.TempPathFactory) -> BrokerPki:
    """A fleet CA with broker and fleet-server credentials (shared by the session)."""
    return create_test_pki(tmp_path_factory.mktemp("fleet-pki"))


@pytest.fixture
def credentials(tmp_path: Path, fleet_pki: BrokerPki) -> Credentials:
    """Issues client credentials from ``fleet_pki``."""
    return Credentials(tmp_path / "creds", fleet_pki)


@pytest.fixture
def mqtt_broker(tmp_path: Path, fleet_pki: BrokerPki) -> Iterator[MosquittoBroker]:
    """A running Mosquitto broker configured for the fleet, stopped after the test."""
    broker = MosquittoBroker.for_pki(tmp_path / "broker", fleet_pki)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


ClientFactory = Callable[..., MqttClient]


@pytest.fixture
def make_client(mqtt_broker: MosquittoBroker) -> Iterator[ClientFactory]:
    """``make_client(tls, client_id=..., subscriptions=(), connect=True, **options)``: a started
    :class:`MqttClient` on ``mqtt_broker`` (connected and subscribed unless ``connect=False``)."""
    made: list[MqttClient] = []

    def factory(tls: TlsFiles, *, client_id: str, subscriptions: tuple[str, ...] = (),
                connect: bool = True, **options: Any) -> MqttClient:
        assert mqtt_broker.port is not None
        options.setdefault("backoff", FAST_BACKOFF)
        client = MqttClient("127.0.0.1", mqtt_broker.port, tls, client_id=client_id,
                            subscriptions=subscriptions, **options)
        made.append(client)
        client.start()
        if connect:
            client.wait_connected(WAIT)
        return client

    try:
        yield factory
    finally:
        for client in made:
            client.stop()


class RawClient:
    """A bare paho MQTT v5 client that records every acknowledgement (for adversarial tests)."""

    def __init__(self, port: int, tls: TlsFiles | None, client_id: str) -> None:
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if tls is not None:
            ctx.load_verify_locations(cafile=str(tls.ca_cert))
            ctx.load_cert_chain(str(tls.cert), str(tls.key))
        self.client.tls_set_context(ctx)
        self.port = port
        self.connack: ReasonCode | None = None
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.messages: queue.Queue[paho.MQTTMessage] = queue.Queue()
        self.acks: dict[int, list[ReasonCode]] = {}
        self._ack_cond = threading.Condition()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *a: self.disconnected.set()
        self.client.on_message = lambda c, u, m: self.messages.put(m)
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe

    def _on_connect(self, client: paho.Client, userdata: Any, flags: paho.ConnectFlags, rc: ReasonCode,
                    props: Properties | None) -> None:
        self.connack = rc
        if not rc.is_failure:
            self.connected.set()

    def _record(self, mid: int, codes: list[ReasonCode]) -> None:
        with self._ack_cond:
            self.acks[mid] = codes
            self._ack_cond.notify_all()

    def _on_publish(self, client: Any, userdata: Any, mid: int, rc: ReasonCode, props: Properties) -> None:
        self._record(mid, [rc])

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, rcs: list[ReasonCode],
                      props: Properties) -> None:
        self._record(mid, list(rcs))

    def __enter__(self) -> RawClient:
        self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()
        assert self.connected.wait(WAIT), f"raw client not connected: {self.connack}"
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def wait_ack(self, mid: int) -> list[ReasonCode]:
        with self._ack_cond:
            assert self._ack_cond.wait_for(lambda: mid in self.acks, WAIT), f"no ack for mid {mid}"
            return self.acks[mid]

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> int:
        info = self.client.publish(topic, payload, qos=qos)
        return info.mid

    def subscribe(self, topic_filter: str) -> ReasonCode:
        rc, mid = self.client.subscribe(topic_filter, qos=1)
        assert rc == paho.MQTT_ERR_SUCCESS and mid is not None
        return self.wait_ack(mid)[0]


def _mqtt5_connect_packet(client_id: str) -> bytes:
    """A minimal MQTT v5 CONNECT packet (MQTT 5.0 section 3.1), clean start, no properties."""
    cid = client_id.encode()
    variable = b"\x00\x04MQTT\x05\x02\x00\x3c\x00"
    payload = len(cid).to_bytes(2, "big") + cid + b""
    body = variable + payload
    assert len(body) < 128
    return bytes([0x10, len(body)]) + body


def probe_connect(port: int, ca_cert: Path, cert: Path | None = None, key: Path | None = None) -> str:
    """Open TLS to the broker, send CONNECT, and report what happened.

    Returns ``"accepted"`` (CONNACK with reason 0), ``"refused"`` (CONNACK with an error code) or
    ``"rejected: <why>"`` when the TLS handshake fails or the broker closes the connection without
    a CONNACK.  Nothing here depends on timing: the broker always answers or closes.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(ca_cert))
    if cert is not None and key is not None:
        ctx.load_cert_chain(str(cert), str(key))
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.sendall(_mqtt5_connect_packet("probe"))
                reply = tls.recv(64)
        except (ssl.SSLError, ConnectionError) as exc:
            return f"rejected: {exc}"
    if not reply:
        return "rejected: closed without CONNACK"
    if reply[0] != 0x20 or len(reply) < 4:
        return f"rejected: unexpected reply {reply[:8].hex()}"
    return "accepted" if reply[3] == 0 else "refused"
