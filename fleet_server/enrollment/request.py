"""Checks of an ``enroll.request`` before the server answers it with a credential challenge.

Pure (no database, no I/O): the service calls :func:`check_enrollment_request` with the decoded
message, the device id taken from the MQTT topic (which the broker authorised for the sender's claim
certificate: never from the payload), the trusted TPM manufacturer bundle and the time.  What needs
the database (is this EK already enrolled under another id? pre-registered?) is the service's job,
using :attr:`EnrollmentCandidate.ek` ``.fingerprint``.

Checks, in order (the first failure raises):

1. the device id is a valid device id;
2. the EK certificate chains to the trusted manufacturer bundle and is valid at ``now``
   (:func:`~fleet_server.enrollment.ekcert.verify_ek_certificate`);
3. the EK public area parses, is an EK's, and holds the certified key
   (:func:`~fleet_server.enrollment.ekcert.check_ek_public_matches`);
4. the AK public area parses and is a restricted signing key (fixedTPM, fixedParent,
   sensitiveDataOrigin, restricted, sign, not decrypt:
   :func:`~fleet_server.verifier.quote.check_ak_attributes`), with a SHA-256-or-stronger nameAlg (its
   Name is what MakeCredential binds to: TPM 2.0 Part 1, 24.4) and a key of at least RSA-2048 or
   NIST P-256;
5. the CSR parses, its self-signature verifies, its subject CN is the device id, its key is ECDSA P-256
   or RSA >= 2048 (:func:`fleet_server.pki.check_device_csr`);
6. device class and firmware version are names (:data:`protocol.messages.NAME_RE`).

Failures are :class:`~protocol.errors.VerificationError` subclasses (untrusted or unacceptable
identity) or :class:`~protocol.errors.MessageError` (bytes that do not parse), each with a reason
that names the field.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography import x509

from fleet_server.enrollment.ekcert import EkIdentity, check_ek_public_matches, verify_ek_certificate
from fleet_server.pki import check_device_csr, load_csr
from fleet_server.verifier.quote import AttestationKey, check_ak_attributes
from protocol.errors import MalformedInputError, MessageError, StructureError, VerificationError
from protocol.messages import NAME_RE, EnrollRequest, enroll_proof
from protocol.topics import validate_device_id
from protocol.tpm.constants import Alg, ECCCurve
from protocol.tpm.structures import EccParms, PublicArea, RsaParms, alg_name, parse_tpm2b_public

__all__ = [
    "AK_NAME_ALGS",
    "AK_RSA_MIN_BITS",
    "AkError",
    "EnrollmentCandidate",
    "check_enrollment_request",
    "expected_proof",
]

#: Name algorithms accepted for an AK: SHA-256 or stronger.  The Name identifies the AK in
#: MakeCredential and in every quote's qualifiedSigner, so a weak Name hash would let a second key
#: claim the enrolled AK's identity.
AK_NAME_ALGS: frozenset[int] = frozenset({Alg.SHA256, Alg.SHA384, Alg.SHA512,
                                          Alg.SHA3_256, Alg.SHA3_384, Alg.SHA3_512})
AK_RSA_MIN_BITS = 2048
AK_ECC_CURVES: frozenset[int] = frozenset({ECCCurve.NIST_P256, ECCCurve.NIST_P384, ECCCurve.NIST_P521})


class AkError(VerificationError):
    """The attestation key of an enrollment request is not acceptable."""


@dataclass(frozen=True, slots=True)
class EnrollmentCandidate:
    """An enrollment request that passed every check that needs no database.

    ``ak_name`` is the AK's Name (nameAlg || H(TPMT_PUBLIC)): MakeCredential binds the challenge to it.
    """

    device_id: str
    ek: EkIdentity
    ek_public: PublicArea
    ak: AttestationKey
    ak_name: bytes
    csr: x509.CertificateSigningRequest = field(repr=False, compare=False)
    device_class: str
    firmware_version: str


def _parse_public(data: bytes, what: str) -> PublicArea:
    try:
        return parse_tpm2b_public(data)
    except StructureError as exc:
        raise MessageError(f"enroll.request.{what}: {exc.diagnostics()}") from None


def _check_ak(public: PublicArea) -> AttestationKey:
    check_ak_attributes(public)  # VerificationError naming the attributes
    if public.name_alg not in AK_NAME_ALGS:
        raise AkError(f"AK nameAlg {alg_name(public.name_alg)} is too weak (SHA-256 or stronger required)")
    params = public.parameters
    if isinstance(params, RsaParms) and params.key_bits < AK_RSA_MIN_BITS:
        raise AkError(f"AK RSA key of {params.key_bits} bits is too small ({AK_RSA_MIN_BITS} required)")
    if isinstance(params, EccParms) and params.curve not in AK_ECC_CURVES:
        raise AkError(f"AK curve 0x{params.curve:04x} is not allowed (NIST P-256, P-384 or P-521)")
    try:
        return AttestationKey.from_public(public)
    except StructureError as exc:
        raise MessageError(f"enroll.request.ak_public: {exc.diagnostics()}") from None


def _check_name(value: str, what: str) -> str:
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise MessageError(f"enroll.request.{what}: invalid value")
    return value


def check_enrollment_request(req: EnrollRequest, *, device_id: str, trust_bundle: Sequence[x509.Certificate],
                             now: dt.datetime) -> EnrollmentCandidate:
    """Check an enrollment request from the claim identity of ``device_id``; see the module docstring.

    ``device_id`` must come from the topic the message arrived on.  ``now`` is a timezone-aware
    datetime (EK certificate validity).  Returns the :class:`EnrollmentCandidate` to run
    MakeCredential for, or raises a :class:`~protocol.errors.VerificationError` subclass or
    :class:`~protocol.errors.MessageError`.
    """
    try:
        device_id = validate_device_id(device_id)
    except MalformedInputError as exc:
        raise MessageError(f"device id from the topic: {exc.diagnostics()}") from None
    device_class = _check_name(req.device_class, "device_class")
    firmware_version = _check_name(req.firmware_version, "firmware_version")

    ek = verify_ek_certificate(req.ek_cert, trust_bundle, now=now)
    ek_public = _parse_public(req.ek_public, "ek_public")
    check_ek_public_matches(ek, ek_public)

    ak_public = _parse_public(req.ak_public, "ak_public")
    ak = _check_ak(ak_public)

    csr = load_csr(req.csr)  # CertificateRequestError (a VerificationError) if oversized or malformed
    check_device_csr(csr, device_id)
    return EnrollmentCandidate(device_id=device_id, ek=ek, ek_public=ek_public, ak=ak, ak_name=ak.name,
                               csr=csr, device_class=device_class, firmware_version=firmware_version)


def expected_proof(secret: bytes, request_id: str) -> bytes:
    """The ``enroll.proof`` a device that activated ``secret`` must send for ``request_id``.

    HMAC-SHA256(secret, "edge-attest/enroll-proof/v1" || request_id), see
    :func:`protocol.messages.enroll_proof`; the service stores only its SHA-256 and compares in
    constant time.
    """
    return enroll_proof(secret, request_id)
