"""Test harness for the agent: a small fleet server speaking the real protocol, and agent fixtures.

``fleet_server/service`` (the real worker) does not exist yet, so :class:`FleetSim` plays the server
side from the project's own building blocks, with no shortcuts on the wire:

* messages: :mod:`protocol.messages` (plain in, signed out with a P-256 result-signing key);
* enrollment: ``fleet_server.enrollment.credential.make_credential`` (software MakeCredential) for the
  credential challenge, ``fleet_server.enrollment.request.expected_proof`` for the proof, and
  ``fleet_server.pki.sign_device_csr`` for the device certificate (which the broker then accepts);
* appraisal: ``fleet_server.verifier.quote.verify_quote`` with the enrolled AK, and the event log
  parsed and replayed with ``fleet_server.verifier.eventlog`` (held prefix + suffix, as the server
  keeps it), compared with ``check_replay``.

It runs one :class:`~protocol.mqtt.MqttClient` with the fleet-server credential on the real broker.
Tests load these fixtures with ``pytest_plugins = ("mqtt_fixtures", "agent_fixtures")``.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from mqtt_fixtures import FAST_BACKOFF, WAIT, Credentials, wait_until

from agent.config import AgentConfig, load_config
from agent.service import Agent
from firmware_sim.broker import MosquittoBroker
from firmware_sim.device import SimulatedDevice
from firmware_sim.manufacturer import ManufacturerCA
from fleet_server import pki
from fleet_server.enrollment.credential import make_credential
from fleet_server.enrollment.request import expected_proof
from fleet_server.verifier.eventlog import parse_eventlog, replay
from fleet_server.verifier.quote import AttestationKey, check_replay, verify_quote
from protocol import topics
from protocol.errors import EdgeError
from protocol.messages import (
    MAX_EVIDENCE_MESSAGE,
    AttestationResult,
    AttestRequest,
    Challenge,
    EnrollChallenge,
    EnrollProof,
    EnrollRequest,
    EnrollResult,
    Evidence,
    Message,
    Revocation,
    UpdateStatus,
    decode_plain,
    encode_signed,
    key_id,
)
from protocol.mqtt import InboundMessage, MqttClient
from protocol.tpm.structures import parse_tpm2b_public

DEFAULT_SELECTION = {"sha256": (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 14)}
RESULT_LIFETIME_MS = 120_000


@dataclass
class SimDevice:
    """What the simulated server knows about one device."""

    device_id: str
    status: str = "new"  # new -> proved -> pending/admitted/rejected
    request: EnrollRequest | None = None
    ak: AttestationKey | None = None
    expected_proofs: dict[str, bytes] = field(default_factory=dict)  # request id -> SHA-256(proof)
    cert_der: bytes | None = None
    open_challenge: Challenge | None = None
    held_log: bytes = b""
    held_reset_count: int | None = None


@dataclass(frozen=True)
class Received:
    """A device -> server message the simulator took in, in arrival order."""

    topic: str
    identity: str
    type: str
    message: Message


class FleetSim:
    """A fleet server for agent tests (see the module docstring).  Thread-safe; use as a context manager.

    ``enroll_policy``: ``"admit"`` (EK pre-registered), ``"pending"`` (needs :meth:`approve`) or
    ``"reject"``.  ``auto_challenge``: answer ``attest.request`` with a challenge.
    """

    def __init__(self, port: int, credentials: Credentials, *, enroll_policy: str = "admit",
                 auto_challenge: bool = True, challenge_timeout_ms: int = 30_000) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.kid = key_id(self.key.public_key())
        self.ca = credentials.ca
        self.enroll_policy = enroll_policy
        self.wrong_ak_credentials = 0
        """How many of the next enrollment challenges are made for another AK name (activation fails)."""
        self.auto_challenge = auto_challenge
        self.challenge_timeout_ms = challenge_timeout_ms
        self.release = ""
        """``release`` of the trusted results it sends (the target whose reference values matched)."""
        self.devices: dict[str, SimDevice] = {}
        self.received: list[Received] = []
        self.sent: list[tuple[str, bytes]] = []
        self.results: list[AttestationResult] = []
        self.challenges: list[Challenge] = []
        self.evidence: list[Evidence] = []
        self.rejected_evidence: list[str] = []
        self.errors: list[str] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self.client = MqttClient("127.0.0.1", port, credentials.server(), client_id="fleet-sim",
                                 subscriptions=topics.server_subscriptions(), backoff=FAST_BACKOFF)
        self._thread = threading.Thread(target=self._run, name="fleet-sim", daemon=True)

    # -- lifecycle ---------------------------------------------------------------------------------
    def __enter__(self) -> FleetSim:
        self.client.start()
        self.client.wait_connected(WAIT)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(WAIT)
        self.client.stop()

    def public_pem(self) -> bytes:
        return self.key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo)

    def write_public_key(self, path: Path) -> Path:
        path.write_bytes(self.public_pem())
        return path

    # -- waiting -----------------------------------------------------------------------------------
    def wait_for(self, predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
        """Wait until ``predicate()`` (evaluated under the simulator's lock) is true."""
        with self._cond:
            if not self._cond.wait_for(predicate, timeout):
                raise AssertionError(f"timed out waiting for {what}; simulator errors: {self.errors}")

    def of_type(self, mtype: str, identity: str | None = None) -> list[Message]:
        with self._cond:
            return [r.message for r in self.received
                    if r.type == mtype and (identity is None or r.identity == identity)]

    def count(self, mtype: str, identity: str | None = None) -> int:
        return len(self.of_type(mtype, identity))

    # -- sending -----------------------------------------------------------------------------------
    def sign(self, msg: Message, aud: str, *, ts: int | None = None, msg_id: str | None = None) -> bytes:
        return encode_signed(msg, key=self.key, kid=self.kid, aud=aud,
                             ts=int(time.time() * 1000) if ts is None else ts, msg_id=msg_id)

    def publish(self, topic: str, payload: bytes) -> None:
        with self._cond:
            self.sent.append((topic, payload))
        self.client.publish(topic, payload).wait(WAIT)

    def send_device(self, device_id: str, kind: str, msg: Message, **kw: Any) -> bytes:
        payload = self.sign(msg, device_id, **kw)
        self.publish(topics.device_down(device_id, kind), payload)
        return payload

    def send_enroll(self, device_id: str, kind: str, msg: Message) -> bytes:
        payload = self.sign(msg, topics.claim_identity(device_id))
        self.publish(topics.enroll_down(device_id, kind), payload)
        return payload

    def challenge(self, device_id: str, *, selection: dict[str, tuple[int, ...]] | None = None,
                  deadline_ms: int | None = None) -> Challenge:
        """Send a new challenge (superseding the open one), with the held log's offset and digest."""
        with self._cond:
            dev = self.devices[device_id]
            held = dev.held_log
            challenge = Challenge(
                challenge_id=secrets.token_hex(16), nonce=secrets.token_bytes(32),
                selection=selection or DEFAULT_SELECTION,
                deadline=deadline_ms if deadline_ms is not None
                else int(time.time() * 1000) + self.challenge_timeout_ms,
                log_offset=len(held), log_sha256=hashlib.sha256(held).digest() if held else b"")
            dev.open_challenge = challenge
            self.challenges.append(challenge)
        self.send_device(device_id, "challenge", challenge)
        return challenge

    def approve(self, device_id: str) -> None:
        """The admin approves a pending device: sign its CSR and publish a new ``enroll.result``."""
        with self._cond:
            dev = self.devices[device_id]
            assert dev.request is not None and dev.status == "pending", dev.status
            dev.status = "admitted"
            dev.cert_der = self._issue(dev)
            result = EnrollResult(request_id=secrets.token_hex(16), status="admitted",
                                  device_cert=dev.cert_der)
        self.send_enroll(device_id, "result", result)

    def revoke(self, device_id: str, state: str = "revoked") -> None:
        self.send_device(device_id, "revocation", Revocation(state=state, reasons=(f"admin: {state}",)))

    # -- the server loop ---------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            inbound = self.client.receive(0.1)
            if inbound is None:
                continue
            try:
                self._handle(inbound)
            except EdgeError as exc:
                with self._cond:
                    self.errors.append(exc.diagnostics())
                    self._cond.notify_all()

    def _record(self, inbound: InboundMessage, identity: str, msg: Message) -> None:
        with self._cond:
            self.received.append(Received(inbound.topic, identity, msg.TYPE, msg))
            self._cond.notify_all()

    def _handle(self, inbound: InboundMessage) -> None:
        parsed = topics.parse_server_topic(inbound.topic)
        if parsed.subtree is topics.Subtree.ENROLL:
            env = decode_plain(inbound.payload, allowed=(EnrollRequest, EnrollProof))
            self._record(inbound, parsed.identity, env.message)
            if isinstance(env.message, EnrollRequest):
                self._on_enroll_request(parsed.device_id, env.id, env.message)
            elif isinstance(env.message, EnrollProof):
                self._on_proof(parsed.device_id, env.message)
            return
        env = decode_plain(inbound.payload, allowed=(AttestRequest, Evidence, UpdateStatus),
                           max_size=MAX_EVIDENCE_MESSAGE)
        self._record(inbound, parsed.identity, env.message)
        if isinstance(env.message, AttestRequest):
            if self.auto_challenge:
                self.challenge(parsed.device_id)
        elif isinstance(env.message, Evidence):
            self._appraise(parsed.device_id, env.message, inbound.payload)

    def _issue(self, dev: SimDevice) -> bytes:
        assert dev.request is not None
        pem = pki.sign_device_csr(self.ca, dev.request.csr, dev.device_id, now=time.time())
        return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)

    def _on_enroll_request(self, device_id: str, request_id: str, req: EnrollRequest) -> None:
        with self._cond:
            dev = self.devices.setdefault(device_id, SimDevice(device_id))
            known = dev.request is not None and dev.request.ak_public == req.ak_public \
                and dev.request.ek_public == req.ek_public
            if known and dev.status in ("pending", "admitted", "rejected"):
                # A known EK + AK under the same id gets the current status again.
                result = EnrollResult(request_id=request_id, status=dev.status, device_cert=dev.cert_der,
                                      reasons=("awaiting approval",) if dev.status == "pending" else ())
            else:
                result = None
                dev.request = req
                dev.ak = AttestationKey.from_tpm2b_public(req.ak_public)
                secret = secrets.token_bytes(32)
                name = dev.ak.name
                if self.wrong_ak_credentials > 0:
                    self.wrong_ak_credentials -= 1
                    name = name[:2] + secrets.token_bytes(len(name) - 2)
                blob, enc = make_credential(parse_tpm2b_public(req.ek_public), name, secret)
                dev.expected_proofs[request_id] = hashlib.sha256(expected_proof(secret, request_id)).digest()
        if result is not None:
            self.send_enroll(device_id, "result", result)
        else:
            challenge = EnrollChallenge(request_id=request_id, credential_blob=blob, encrypted_secret=enc)
            self.send_enroll(device_id, "challenge", challenge)

    def _on_proof(self, device_id: str, proof: EnrollProof) -> None:
        with self._cond:
            dev = self.devices[device_id]
            want = dev.expected_proofs.pop(proof.request_id, None)
            if want is None or hashlib.sha256(proof.proof).digest() != want:
                self.errors.append(f"bad enroll proof from {device_id}")
                self._cond.notify_all()
                return
            if self.enroll_policy == "reject":
                dev.status = "rejected"
                result = EnrollResult(request_id=proof.request_id, status="rejected",
                                      reasons=("EK not allowed in this fleet",))
            elif self.enroll_policy == "pending":
                dev.status = "pending"
                result = EnrollResult(request_id=proof.request_id, status="pending",
                                      reasons=("awaiting approval",))
            else:
                dev.status = "admitted"
                dev.cert_der = self._issue(dev)
                result = EnrollResult(request_id=proof.request_id, status="admitted",
                                      device_cert=dev.cert_der)
        self.send_enroll(device_id, "result", result)

    def _appraise(self, device_id: str, ev: Evidence, raw: bytes) -> None:
        with self._cond:
            dev = self.devices.get(device_id)
            challenge = dev.open_challenge if dev is not None else None
            if dev is None or dev.ak is None or challenge is None \
                    or challenge.challenge_id != ev.challenge_id:
                self.rejected_evidence.append(f"{device_id}: unknown or superseded challenge")
                self._cond.notify_all()
                return
            dev.open_challenge = None
            self.evidence.append(ev)
            held = dev.held_log
        reasons: list[str] = []
        log = b""
        try:
            info = verify_quote(ak=dev.ak, attest=ev.attest, signature=ev.signature, nonce=challenge.nonce,
                                pcr_values=ev.pcrs, expected_selection=challenge.selection)
            if ev.eventlog_offset == 0:
                log = ev.eventlog
            elif ev.eventlog_offset == len(held) and info.reset_count == dev.held_reset_count:
                log = held + ev.eventlog
            else:
                raise EdgeError(f"continuation at {ev.eventlog_offset} does not fit the held log")
            check_replay(replay(parse_eventlog(log)), ev.pcrs)
        except EdgeError as exc:
            reasons.append(exc.diagnostics())
        verdict = "untrusted" if reasons else "trusted"
        result = AttestationResult(challenge_id=ev.challenge_id, verdict=verdict, reasons=tuple(reasons),
                                   expires=int(time.time() * 1000) + RESULT_LIFETIME_MS,
                                   evidence_sha256=hashlib.sha256(raw).digest(),
                                   release="" if reasons else self.release)
        with self._cond:
            if not reasons:
                dev.held_log = log
                dev.held_reset_count = info.reset_count
            self.results.append(result)
            self._cond.notify_all()
        self.send_device(device_id, "result", result)


# -- agent configuration ---------------------------------------------------------------------------
def write_agent_config(folder: Path, *, device_id: str, device: SimulatedDevice, broker_port: int,
                       credentials: Credentials, server_key: Path, tcti: str | None = None,
                       enroll_retry: float = 30, reconnect: tuple[float, float] = (0.1, 1.0)) -> Path:
    """Write ``agent.toml`` (state folder relative to it) and the claim credential into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    claim = credentials.claim(device_id)
    cfg = folder / "agent.toml"
    cfg.write_text(f"""
device_id = "{device_id}"
device_class = "camera"
firmware_version = "1.0.0"
state_dir = "state"
eventlog = "{device.eventlog_path}"

[tpm]
tcti = "{tcti or device.tcti}"
ak_alg = "ecc"

[mqtt]
host = "127.0.0.1"
port = {broker_port}
ca_cert = "{claim.ca_cert}"
claim_cert = "{claim.cert}"
claim_key = "{claim.key}"
reconnect_min = {reconnect[0]}
reconnect_max = {reconnect[1]}

[server]
signing_public_key = "{server_key}"
max_clock_skew = 60
enroll_retry = {enroll_retry}

[log]
level = "debug"
""")
    return cfg


# -- fixtures --------------------------------------------------------------------------------------
@pytest.fixture
def sim_device(tmp_path: Path, manufacturer_ca: ManufacturerCA) -> Iterator[SimulatedDevice]:
    """A simulated device, booted (swtpm running, event log written); powered off afterwards."""
    dev = SimulatedDevice.create(tmp_path / "device", ca=manufacturer_ca)
    dev.boot()
    try:
        yield dev
    finally:
        dev.shutdown()


@pytest.fixture
def fleet(mqtt_broker: MosquittoBroker, credentials: Credentials) -> Iterator[FleetSim]:
    """A running :class:`FleetSim` (admits devices) on ``mqtt_broker``."""
    assert mqtt_broker.port is not None
    with FleetSim(mqtt_broker.port, credentials) as sim:
        yield sim


AgentFactory = Callable[..., Agent]


@pytest.fixture
def make_agent() -> Iterator[AgentFactory]:
    """``make_agent(config_or_path, start=True, **kwargs)``: an :class:`Agent`, stopped after the test."""
    made: list[Agent] = []

    def factory(config: AgentConfig | Path, *, start: bool = True, **kwargs: Any) -> Agent:
        cfg = config if isinstance(config, AgentConfig) else load_config(config)
        agent = Agent(cfg, **kwargs)
        made.append(agent)
        if start:
            agent.start()
        return agent

    try:
        yield factory
    finally:
        for agent in made:
            agent.stop()


def wait_status(agent: Agent, predicate: Callable[[Any], bool], what: str, timeout: float = WAIT) -> None:
    """Wait until ``predicate(agent.status())`` holds (failing with the last status otherwise)."""
    try:
        wait_until(lambda: predicate(agent.status()), timeout=timeout, what=what)
    except AssertionError:
        raise AssertionError(f"timed out waiting for {what}; status: {agent.status()}") from None
