"""The enrollment client: from a claim certificate to a device certificate.

Protocol (``docs/attestation-service.md``, "Enrollment"), on the claim identity's topics
``fleet/v1/enroll/claim:<id>/{up,down}/...``:

1. on every (re)connection, and again after ``retry_after`` seconds without a final answer,
   publish ``enroll.request`` {EK certificate, EK public, AK public, CSR, class, firmware version};
2. on a verified ``enroll.challenge``: TPM2_ActivateCredential (succeeds only in the TPM that holds
   both the EK and the AK), then publish ``enroll.proof`` = HMAC(secret, request_id); the secret is
   dropped at once and never logged;
3. on a verified ``enroll.result``: ``admitted`` -> store the device certificate (after checking it
   certifies this device's key and id) and finish; ``pending`` -> keep the connection and wait
   (an admin approval makes the server publish a new result); ``rejected`` -> stop with
   :class:`EnrollmentRejectedError` naming the server's reasons.

Idempotent across restarts: the TLS key and the AK are persistent, so a restarted agent sends the
same request, and an enrolled device (``device.pem`` present) never runs this at all.

The MQTT client is created and started by the caller (the agent service), subscribed to
:attr:`agent.trust.Channel.subscription` of the enrollment channel; this module only uses it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from cryptography import x509

from agent.identity import DeviceIdentity
from agent.log import EventLogger
from agent.trust import Channel, MessageVerifier
from protocol import topics
from protocol.errors import AuthorizationError, EdgeError, MalformedInputError, TpmError, TransportError
from protocol.messages import (
    EnrollChallenge,
    EnrollProof,
    EnrollRequest,
    EnrollResult,
    encode_plain,
    enroll_proof,
    new_message_id,
)
from protocol.mqtt import InboundMessage, MqttClient

POLL = 0.2
"""Seconds the loop waits for a message before re-checking connection and stop flag."""


def subscription_state(client: MqttClient, log: EventLogger) -> str:
    """``ready`` once every subscription of the current connection is acknowledged (so an answer to
    what is sent now cannot arrive before its topic is subscribed), ``pending`` before, ``refused``
    (logged) if the broker refused one: nothing will come on this connection."""
    try:
        client.wait_connected(POLL)
    except TransportError as exc:
        if client.refused_subscriptions:
            log.error("subscription_refused", error=exc.diagnostics())
            return "refused"
        return "pending"
    return "ready"


class EnrollmentRejectedError(AuthorizationError):
    """The fleet server refused to enroll this device."""


class EnrollmentTpm(Protocol):
    """The TPM operations enrollment needs (implemented by ``TpmAdapter``)."""

    def ek_certificate(self, alg: str | None = None) -> bytes: ...

    def ek_public(self, alg: str | None = None) -> bytes: ...

    @property
    def ak_public(self) -> bytes: ...

    def activate_credential(self, credential_blob: bytes, encrypted_secret: bytes) -> bytes: ...


@dataclass(slots=True)
class EnrollmentProgress:
    """What the enrollment has seen so far (read by the agent's status)."""

    status: str = "starting"
    """``starting``, ``requested``, ``pending``, ``admitted`` or ``rejected``."""
    requests_sent: int = 0
    challenges: int = 0
    proofs_sent: int = 0
    activation_failures: int = 0
    messages_rejected: int = 0
    reasons: tuple[str, ...] = ()


class Enrollment:
    """Runs the enrollment protocol over an already started :class:`MqttClient` (see module docstring)."""

    def __init__(self, *, identity: DeviceIdentity, tpm: EnrollmentTpm, client: MqttClient,
                 verifier: MessageVerifier, device_class: str, firmware_version: str,
                 clock: Callable[[], float], log: EventLogger, stop: threading.Event,
                 retry_after: float = 300.0, on_tick: Callable[[], None] | None = None) -> None:
        self._identity = identity
        self._device_id = identity.device_id
        self._tpm = tpm
        self._client = client
        self._verifier = verifier
        self._channel = Channel.enroll(identity.device_id)
        self._device_class = device_class
        self._firmware_version = firmware_version
        self._clock = clock
        self._log = log
        self._stop = stop
        self._retry_after = retry_after
        self._on_tick = on_tick
        self.progress = EnrollmentProgress()

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def request(self) -> EnrollRequest:
        """The ``enroll.request`` of this device (reads the EK and AK from the TPM)."""
        return EnrollRequest(ek_cert=self._tpm.ek_certificate(), ek_public=self._tpm.ek_public(),
                             ak_public=self._tpm.ak_public, csr=self._identity.csr(),
                             device_class=self._device_class, firmware_version=self._firmware_version)

    def run(self) -> x509.Certificate | None:
        """Enroll; returns the stored device certificate, or ``None`` if ``stop`` was set first.

        ``on_tick`` (if given) is called about every :data:`POLL` seconds from this loop.

        Raises :class:`EnrollmentRejectedError` if the server rejects the device, and
        :class:`~protocol.errors.TpmError` if the EK or AK cannot be read (nothing to enroll with).
        """
        request = self.request()
        seen_connects = 0
        last_sent: float | None = None
        while not self._stop.is_set():
            connects = self._client.stats().connects
            if self._client.connected and connects != seen_connects:
                state = subscription_state(self._client, self._log)
                if state != "pending":
                    seen_connects = connects
                if state == "ready":
                    last_sent = self._send_request(request, "connect")
            elif (last_sent is not None and self._client.connected
                  and time.monotonic() - last_sent >= self._retry_after):
                last_sent = self._send_request(request, "retry")
            inbound = self._client.receive(POLL)
            if inbound is not None:
                cert = self._handle(inbound)
                if cert is not None:
                    return cert
            if self._on_tick is not None:
                self._on_tick()
        return None

    def _send_request(self, request: EnrollRequest, why: str) -> float:
        msg_id = new_message_id()
        if self._publish("request", encode_plain(request, ts=self._now_ms(), msg_id=msg_id)):
            self.progress.requests_sent += 1
            if self.progress.status == "starting":
                self.progress.status = "requested"
            self._log.info("enroll_request_sent", why=why, msg_id=msg_id)
        return time.monotonic()

    def _publish(self, kind: str, payload: bytes) -> bool:
        """Publish on ``enroll/claim:<id>/up/<kind>`` (QoS 1, held across a reconnect)."""
        try:
            self._client.publish(topics.enroll_up(self._device_id, kind), payload, qos=1)
        except TransportError as exc:
            self._log.warning("publish_failed", kind=kind, error=exc.diagnostics())
            return False
        return True

    def _handle(self, inbound: InboundMessage) -> x509.Certificate | None:
        try:
            envelope = self._verifier.verify(self._channel, inbound.topic, inbound.payload, now=self._clock())
        except EdgeError as exc:
            self.progress.messages_rejected += 1
            self._log.warning("server_message_rejected", channel="enroll", error=exc.diagnostics())
            return None
        msg = envelope.message
        if isinstance(msg, EnrollChallenge):
            self._answer(msg)
            return None
        if isinstance(msg, EnrollResult):
            return self._result(msg)
        return None  # unreachable: the channel admits only the two types above

    def _answer(self, challenge: EnrollChallenge) -> None:
        self.progress.challenges += 1
        try:
            secret = self._tpm.activate_credential(challenge.credential_blob, challenge.encrypted_secret)
        except (TpmError, MalformedInputError) as exc:
            # A credential made for another EK or AK name: not for us, or a corrupted message.
            self.progress.activation_failures += 1
            self._log.warning("credential_activation_failed", request_id=challenge.request_id,
                              error=exc.diagnostics())
            return
        proof = EnrollProof(request_id=challenge.request_id, proof=enroll_proof(secret, challenge.request_id))
        del secret
        if self._publish("proof", encode_plain(proof, ts=self._now_ms())):
            self.progress.proofs_sent += 1
            self._log.info("enroll_proof_sent", request_id=challenge.request_id)

    def _result(self, result: EnrollResult) -> x509.Certificate | None:
        self.progress.reasons = result.reasons
        if result.status == "rejected":
            self.progress.status = "rejected"
            reasons = "; ".join(result.reasons) or "no reason given"
            self._log.error("enrollment_rejected", request_id=result.request_id, reasons=reasons)
            raise EnrollmentRejectedError(f"the fleet server rejected the enrollment of "
                                          f"{self._device_id}: {reasons}")
        if result.status == "pending":
            if self.progress.status != "pending":
                self._log.info("enrollment_pending", request_id=result.request_id,
                               reasons="; ".join(result.reasons))
            self.progress.status = "pending"
            return None
        if result.device_cert is None:
            self._log.warning("enrollment_result_unusable", request_id=result.request_id,
                              error="admitted without a device certificate")
            return None
        try:
            cert = self._identity.store_certificate(result.device_cert, now=self._clock())
        except MalformedInputError as exc:
            self._log.warning("enrollment_result_unusable", request_id=result.request_id,
                              error=exc.diagnostics())
            return None
        self.progress.status = "admitted"
        self._log.info("enrolled", request_id=result.request_id,
                       serial=format(cert.serial_number, "x"),
                       not_after=cert.not_valid_after_utc.isoformat())
        return cert
