"""Administrator operations on devices, EK pre-registrations and policies (used by the CLI).

Each operation is one write transaction: the state change, its ``statechange`` row and the signed
message it causes (``enroll.result`` with the device certificate on approval, ``revocation`` on
revoke and quarantine) are written together, the message into the outbox, which a running worker
publishes (the CLI never talks MQTT).

State rules (docs/attestation-service.md, "States"):

* ``approve``: ``pending`` -> ``enrolled`` (signs the device's CSR and sends it its certificate);
  ``revoked``, ``quarantined`` or ``untrusted`` -> ``enrolled`` (the device is challenged at once and
  is trusted only by good evidence; lifting ``untrusted`` lets a device that lost its AK enroll a new
  one, which enrolling cannot do while it is held);
* ``unquarantine``: ``quarantined`` -> ``enrolled`` only (the same re-admission as ``approve``, for an
  admin who means to lift a quarantine and nothing else);
* ``revoke``: any state -> ``revoked`` (open challenges superseded, schedule cleared);
* ``quarantine``: an attested state -> ``quarantined`` (attested, never trusted, until lifted).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fleet_server import pki
from fleet_server.appraisal.policy import ReferencePolicy
from fleet_server.enrollment.ekcert import verify_ek_certificate
from fleet_server.keys import ResultSigner
from fleet_server.service.crl import record_issued
from fleet_server.service.processor import DOWN_RESULT, DOWN_REVOCATION
from fleet_server.storage.models import ATTESTED_STATES, HELD_STATES, DeviceState
from fleet_server.storage.repo import Repository, Tx, selection_json
from protocol import topics
from protocol.errors import ConfigError, EdgeError, MalformedInputError, VerificationError
from protocol.messages import MAX_REASON_LEN, EnrollResult, Revocation
from protocol.topics import validate_device_id


class AdminError(EdgeError):
    """An administrator's request cannot be carried out (unknown device, wrong state...)."""


@dataclass(frozen=True, slots=True)
class StateTransition:
    """The outcome of an admin operation on a device."""

    device_id: str
    from_state: str
    to_state: str
    messages: int
    """Signed messages queued in the outbox."""
    cert_serial: str | None = None


def _device(tx: Tx, device_id: str) -> tuple[str, str, bytes | None, str | None]:
    validate_device_id(device_id)
    identity = tx.device_identity(device_id)
    if identity is None:
        raise AdminError(f"no device {device_id!r}")
    return identity.state, identity.device_class, identity.csr, identity.enroll_request_id


APPROVABLE_STATES: frozenset[str] = frozenset({DeviceState.PENDING, *HELD_STATES})
"""States ``approve`` admits from: pending, and every state enrolling again cannot lift."""


def approve_device(repo: Repository, device_id: str, *, signer: ResultSigner, fleet_ca: pki.FleetCA,
                   now: int, actor: str = "admin") -> StateTransition:
    """Admit a pending device (or re-admit a held one); see the module docstring."""
    with repo.write("approving a device") as tx:
        state, _, csr, request_id = _device(tx, device_id)
        if state not in APPROVABLE_STATES:
            raise AdminError(f"device {device_id} is {state}; only pending, revoked, quarantined or "
                             "untrusted devices can be approved")
        return _admit(tx, device_id, state, csr, request_id, signer=signer, fleet_ca=fleet_ca, now=now,
                      cause=f"approved by {actor}")


def unquarantine_device(repo: Repository, device_id: str, *, signer: ResultSigner, fleet_ca: pki.FleetCA,
                        now: int, actor: str = "admin") -> StateTransition:
    """Lift a quarantine: ``quarantined`` -> ``enrolled``, challenged now, trusted by good evidence only."""
    with repo.write("lifting a quarantine") as tx:
        state, _, csr, request_id = _device(tx, device_id)
        if state != DeviceState.QUARANTINED:
            raise AdminError(f"device {device_id} is {state}, not quarantined")
        return _admit(tx, device_id, state, csr, request_id, signer=signer, fleet_ca=fleet_ca, now=now,
                      cause=f"quarantine lifted by {actor}")


def _admit(tx: Tx, device_id: str, state: str, csr: bytes | None, request_id: str | None, *,
           signer: ResultSigner, fleet_ca: pki.FleetCA, now: int, cause: str) -> StateTransition:
    """Move the device to ``enrolled`` (challenged now); a device still waiting gets its certificate."""
    extra: dict[str, object] = {"next_attestation_at": now, "missed_challenges": 0, "trusted_until": None}
    messages = 0
    serial = None
    if csr is not None:
        # The device never received a certificate: it waits on its claim connection for this.
        try:
            cert_pem = pki.sign_device_csr(fleet_ca, csr, device_id, now=now / 1000)
        except VerificationError as exc:
            raise AdminError(f"cannot issue the certificate of {device_id}: "
                             f"{exc.diagnostics()}") from None
        cert = x509.load_pem_x509_certificate(cert_pem)
        serial = format(cert.serial_number, "x")
        extra.update(cert_serial=serial, csr=None)
        record_issued(tx, device_id, cert_pem, now=now)
        result = EnrollResult(request_id=request_id or "0" * 32, status="admitted", reasons=(),
                              device_cert=cert.public_bytes(serialization.Encoding.DER))
        tx.add_outbox(topics.enroll_down(device_id, DOWN_RESULT),
                      signer.sign(result, aud=topics.claim_identity(device_id), ts=now), now)
        messages += 1
    tx.set_state(device_id, from_state=state, to_state=DeviceState.ENROLLED, now=now, cause=cause,
                 extra=extra)
    return StateTransition(device_id, state, DeviceState.ENROLLED, messages, serial)


def _notice(tx: Tx, signer: ResultSigner, device_id: str, state: str, reasons: Sequence[str],
            now: int) -> None:
    notice = Revocation(state=state, reasons=tuple(r[:MAX_REASON_LEN] for r in reasons))
    tx.add_outbox(topics.device_down(device_id, DOWN_REVOCATION), signer.sign(notice, aud=device_id, ts=now),
                  now)


def revoke_device(repo: Repository, device_id: str, *, signer: ResultSigner, now: int, reason: str = "",
                  actor: str = "admin") -> StateTransition:
    """Revoke a device: no more challenges, its evidence is refused, a signed revocation is sent."""
    text = reason.strip() or f"revoked by {actor}"
    with repo.write("revoking a device") as tx:
        state, _, _, _ = _device(tx, device_id)
        if state == DeviceState.REVOKED:
            raise AdminError(f"device {device_id} is already revoked")
        tx.supersede_open_challenges([device_id])
        tx.set_state(device_id, from_state=state, to_state=DeviceState.REVOKED, now=now,
                     cause=f"revoked by {actor}: {text}", reasons=[text],
                     extra={"next_attestation_at": None, "trusted_until": None})
        _notice(tx, signer, device_id, DeviceState.REVOKED, [text], now)
    return StateTransition(device_id, state, DeviceState.REVOKED, 1)


def quarantine_device(repo: Repository, device_id: str, *, signer: ResultSigner, now: int, reason: str = "",
                      actor: str = "admin") -> StateTransition:
    """Hold an attested device: still challenged and appraised, never trusted, until lifted."""
    text = reason.strip() or f"quarantined by {actor}"
    with repo.write("quarantining a device") as tx:
        state, _, _, _ = _device(tx, device_id)
        if state == DeviceState.QUARANTINED:
            raise AdminError(f"device {device_id} is already quarantined")
        if state not in ATTESTED_STATES:
            raise AdminError(f"device {device_id} is {state}; only attested devices can be quarantined")
        tx.set_state(device_id, from_state=state, to_state=DeviceState.QUARANTINED, now=now,
                     cause=f"quarantined by {actor}: {text}", reasons=[text], extra={"trusted_until": None})
        _notice(tx, signer, device_id, DeviceState.QUARANTINED, [text], now)
    return StateTransition(device_id, state, DeviceState.QUARANTINED, 1)


# --------------------------------------------------------------------------------------------------
# pre-registration and policies
# --------------------------------------------------------------------------------------------------
def ek_certificate_der(data: bytes) -> bytes:
    """An EK certificate file's DER (the file may be DER or PEM)."""
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(data).public_bytes(serialization.Encoding.DER)
        x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise MalformedInputError(f"not an X.509 certificate (PEM or DER): {exc}") from None
    return data


@dataclass(frozen=True, slots=True)
class Preregistration:
    fingerprint: str
    subject: str
    created: bool
    verified: bool


def preregister_ek(repo: Repository, cert_data: bytes, *, now: int, device_class: str | None = None,
                   note: str = "", trust_bundle: Sequence[x509.Certificate] = ()) -> Preregistration:
    """Pre-register an EK certificate: a device proving this EK is admitted without approval.

    With a ``trust_bundle`` the certificate must chain to it (as enrollment will require anyway).
    """
    der = ek_certificate_der(cert_data)
    fingerprint = hashlib.sha256(der).hexdigest()
    subject = x509.load_der_x509_certificate(der).subject.rfc4514_string() or "<empty subject>"
    verified = False
    if trust_bundle:
        verify_ek_certificate(der, trust_bundle, now=dt.datetime.fromtimestamp(now / 1000, dt.UTC))
        verified = True
    with repo.write("pre-registering an EK") as tx:
        created = tx.preregister(fingerprint, device_class=device_class, note=note, now=now)
    return Preregistration(fingerprint, subject, created, verified)


@dataclass(frozen=True, slots=True)
class StoredPolicy:
    id: int
    name: str
    sha256: str


def store_policy(repo: Repository, policy: ReferencePolicy, *, now: int, created_by: str = "admin",
                 replace: bool = False) -> StoredPolicy:
    """Store ``policy`` as the active policy of its device class and firmware version."""
    body = policy.canonical_bytes()
    digest = hashlib.sha256(body).hexdigest()
    try:
        reference = body.decode("utf-8")
        json.loads(reference)
    except (UnicodeDecodeError, ValueError) as exc:  # pragma: no cover - canonical_bytes is UTF-8 JSON
        raise ConfigError(f"policy {policy.name} does not serialise: {exc}") from None
    with repo.write("storing a policy") as tx:
        policy_id = tx.insert_policy(name=policy.name, device_class=policy.device_class,
                                     firmware_version=policy.firmware_version, reference=reference,
                                     reference_sha256=digest, selection=selection_json(policy.selection),
                                     now=now, created_by=created_by, replace=replace)
    return StoredPolicy(policy_id, policy.name, digest)
