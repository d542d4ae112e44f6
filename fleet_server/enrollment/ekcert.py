"""EK certificates: chain validation to a trusted TPM manufacturer CA, and EK public area checks.

A TPM's endorsement key (EK) certificate is issued by the TPM's manufacturer (TCG EK Credential
Profile for TPM Family 2.0, section 3 'EK Certificate').  The fleet server trusts a *bundle* of
manufacturer CA certificates (roots and issuing CAs); an EK certificate is accepted only if it chains
through CA certificates of that bundle to a self-signed root of that bundle, every certificate of the
chain being within its validity period at ``now`` (RFC 5280, 6.1 'Basic Path Validation', simplified
to what a closed trust bundle needs: no name constraints, no policies, no revocation).

EK certificates differ from web PKI certificates in ways this module tolerates on purpose:

* the subject is often empty or meaningless (swtpm: ``CN=unknown``); the TPM identity is in a
  *critical* subjectAltName holding a directoryName with the TCG attributes tcg-at-tpmManufacturer,
  tcg-at-tpmModel and tcg-at-tpmVersion (EK Credential Profile 3.2.9);
* a subjectDirectoryAttributes extension carries the TPM specification level (3.2.10), which
  ``cryptography`` does not parse (it stays an ``UnrecognizedExtension``; being non-critical it is
  ignored, as RFC 5280 4.2 allows);
* notAfter is often 99991231235959Z ('no well-defined expiration', RFC 5280 4.1.2.5).

Unrecognized *critical* extensions are refused (RFC 5280, 4.2).

:func:`check_ek_public_matches` ties the TPM2B_PUBLIC the device sent to the certificate: same key,
and the object attributes of a real EK (EK Credential Profile 2.0, B.3.3 'Template L-1' and the other
templates: fixedTPM, fixedParent, sensitiveDataOrigin, restricted, decrypt; never sign).

Pure: DER/PEM bytes and a time in, a frozen :class:`EkIdentity` out, or
:class:`~protocol.errors.VerificationError` (:class:`EkCertificateError`, or
:class:`~protocol.errors.SignatureError` for a signature that does not verify).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from protocol.errors import ConfigError, SignatureError, StructureError, VerificationError
from protocol.tpm.constants import HASH_ALGS, Alg, ObjectAttr
from protocol.tpm.structures import EccParms, PublicArea, RsaParms, alg_name

__all__ = [
    "EK_FORBIDDEN_ATTRIBUTES",
    "EK_REQUIRED_ATTRIBUTES",
    "MAX_CHAIN_LENGTH",
    "EkCertificateError",
    "EkIdentity",
    "EkPublic",
    "check_ek_public_matches",
    "load_trust_bundle",
    "verify_ek_certificate",
]

#: Most certificates a chain may have, EK certificate and root included (EK certificates in the field
#: use root -> issuing CA -> EK, sometimes with one more intermediate).
MAX_CHAIN_LENGTH = 5
#: An EK certificate is about 1 KiB; anything much larger is refused before parsing.
MAX_EK_CERT_BYTES = 8 * 1024
MAX_BUNDLE_BYTES = 4 * 1024 * 1024

#: TPMA_OBJECT bits every EK template sets (EK Credential Profile 2.0, B.3.3 - B.3.4 'Template L-1'
#: ... 'H-7'): a restricted decryption (storage) key that cannot leave the TPM, created inside it.
EK_REQUIRED_ATTRIBUTES: dict[str, int] = {
    "fixedTPM": ObjectAttr.FIXED_TPM,
    "fixedParent": ObjectAttr.FIXED_PARENT,
    "sensitiveDataOrigin": ObjectAttr.SENSITIVE_DATA_ORIGIN,
    "restricted": ObjectAttr.RESTRICTED,
    "decrypt": ObjectAttr.DECRYPT,
}
#: TPMA_OBJECT bits an EK never has: a signing EK would let the TPM sign with its identity key.
EK_FORBIDDEN_ATTRIBUTES: dict[str, int] = {"sign": ObjectAttr.SIGN_ENCRYPT}

# Signature hashes refused in certificate chains (collision attacks make such signatures forgeable).
_WEAK_HASHES = ("md5", "sha1")

EkPublic = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


class EkCertificateError(VerificationError):
    """An EK certificate (or its chain) is malformed, untrusted, expired or of the wrong kind."""


@dataclass(frozen=True, slots=True)
class EkIdentity:
    """A verified EK certificate.

    ``fingerprint`` is the SHA-256 of the certificate DER (lowercase hex): the EK's identity in the
    fleet (what admins pre-register).  ``subject``/``issuer`` are RFC 4514 strings, ``key_kind`` is
    ``"rsa"`` or ``"ecc"``.  ``chain`` lists the subjects of the CA certificates used, issuing CA first,
    root last.
    """

    fingerprint: str
    subject: str
    issuer: str
    serial: int
    public_key: EkPublic = field(repr=False)
    key_kind: str
    certificate: x509.Certificate = field(repr=False, compare=False)
    chain: tuple[str, ...] = ()


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def _name(name: x509.Name) -> str:
    try:
        text = name.rfc4514_string()
    except (ValueError, TypeError):  # exotic attribute values: show something, never fail on display
        text = repr(name)
    return text or "<empty name>"


def _check_now(now: dt.datetime) -> dt.datetime:
    if not isinstance(now, dt.datetime) or now.tzinfo is None:
        raise ValueError("now must be a timezone-aware datetime")
    return now.astimezone(dt.UTC)


def _check_validity(cert: x509.Certificate, what: str, now: dt.datetime) -> None:
    """RFC 5280 6.1.3 (a)(2): the certificate validity period includes the current time."""
    if now < cert.not_valid_before_utc:
        raise EkCertificateError(f"{what} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M:%S}Z")
    if now > cert.not_valid_after_utc:
        raise EkCertificateError(f"{what} expired at {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S}Z")


def _extensions(cert: x509.Certificate, what: str) -> x509.Extensions:
    try:
        exts = cert.extensions
    except (ValueError, TypeError) as exc:  # duplicate or malformed extensions
        raise EkCertificateError(f"{what} has malformed extensions: {exc}") from None
    for ext in exts:
        if ext.critical and isinstance(ext.value, x509.UnrecognizedExtension):
            # RFC 5280, 4.2: a certificate with an unrecognized critical extension must be rejected.
            raise EkCertificateError(f"{what} has an unrecognized critical extension {ext.oid.dotted_string}")
    return exts


def _basic_constraints(exts: x509.Extensions) -> x509.BasicConstraints | None:
    try:
        return exts.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return None


def _check_ca(cert: x509.Certificate, what: str, below: int, now: dt.datetime) -> None:
    """``cert`` may issue certificates: a CA (RFC 5280 4.2.1.9) allowed to sign certificates
    (4.2.1.3 keyCertSign) with a pathLenConstraint admitting the ``below`` intermediates under it."""
    exts = _extensions(cert, what)
    basic = _basic_constraints(exts)
    if basic is None or not basic.ca:
        raise EkCertificateError(f"{what} is not a CA certificate (basicConstraints cA is not set)")
    if basic.path_length is not None and below > basic.path_length:
        raise EkCertificateError(f"{what} allows {basic.path_length} intermediate CA(s) below it, "
                                 f"the chain has {below}")
    try:
        usage = exts.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is not None and not usage.key_cert_sign:
        raise EkCertificateError(f"{what} may not sign certificates (keyUsage lacks keyCertSign)")
    _check_validity(cert, what, now)


def _check_hash(cert: x509.Certificate, what: str) -> None:
    try:
        algorithm = cert.signature_hash_algorithm
    except UnsupportedAlgorithm as exc:
        raise EkCertificateError(f"{what} uses an unsupported signature algorithm: {exc}") from None
    if algorithm is not None and algorithm.name in _WEAK_HASHES:
        raise EkCertificateError(f"{what} is signed with {algorithm.name.upper()}, which is not accepted")


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """True if ``issuer``'s key verifies ``cert``'s signature (and the names chain)."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        return False
    return True


def _self_signed(cert: x509.Certificate) -> bool:
    return cert.subject == cert.issuer and _issued_by(cert, cert)


def _ek_key(key: object, what: str) -> tuple[EkPublic, str]:
    """The certified key and its kind ("rsa"/"ecc"); EKs are RSA or ECC (EK Credential Profile 2.0, 2.1)."""
    if isinstance(key, rsa.RSAPublicKey):
        return key, "rsa"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return key, "ecc"
    raise EkCertificateError(f"{what} holds a {type(key).__name__}, not an RSA or ECC key")


# --------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------
def load_trust_bundle(pem: bytes) -> tuple[x509.Certificate, ...]:
    """Parse a PEM bundle of TPM manufacturer CA certificates (roots and issuing CAs).

    Every certificate must be a CA certificate, and at least one must be a self-signed root (a chain
    can only end at a root of the bundle).  Raises :class:`~protocol.errors.ConfigError`.
    """
    if not isinstance(pem, bytes | bytearray) or len(pem) > MAX_BUNDLE_BYTES:
        raise ConfigError(f"the trust bundle must be PEM bytes of at most {MAX_BUNDLE_BYTES} bytes")
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise ConfigError("the trust bundle holds no certificate (PEM 'BEGIN CERTIFICATE' block)")
    try:
        certs = tuple(x509.load_pem_x509_certificates(bytes(pem)))
    except ValueError as exc:
        raise ConfigError(f"the trust bundle is not a PEM certificate bundle: {exc}") from None
    if not certs:
        raise ConfigError("the trust bundle holds no certificate")
    for i, cert in enumerate(certs):
        what = f"trust bundle certificate {i} ({_name(cert.subject)})"
        try:
            basic = _basic_constraints(_extensions(cert, what))
        except EkCertificateError as exc:
            raise ConfigError(str(exc)) from None
        if basic is None or not basic.ca:
            raise ConfigError(f"{what} is not a CA certificate")
    if not any(_self_signed(c) for c in certs):
        raise ConfigError("the trust bundle has no self-signed root CA certificate")
    return certs


def verify_ek_certificate(cert_der: bytes, trust_bundle: Sequence[x509.Certificate], *,
                          now: dt.datetime) -> EkIdentity:
    """Validate an EK certificate (DER) against ``trust_bundle`` at ``now``; return its identity.

    The chain is built upwards from the EK certificate: the issuer is looked up by name among the
    bundle's certificates and must verify the signature (several CAs may share a name across key
    rollovers: every candidate is tried), must be a CA allowed to sign certificates with a path length
    admitting the chain, and must be valid at ``now``; this repeats until a self-signed root of the
    bundle is reached, within :data:`MAX_CHAIN_LENGTH` certificates.  The EK certificate itself must
    be valid at ``now``, must not be a CA, and must hold an RSA or ECC key.  Signatures with SHA-1
    or MD5 are refused.

    Raises :class:`EkCertificateError` (malformed, untrusted issuer, expired, wrong kind) or
    :class:`~protocol.errors.SignatureError` (an issuer of that name exists but its key does not
    verify the signature: a forged or foreign certificate).
    """
    now = _check_now(now)
    if not isinstance(cert_der, bytes | bytearray) or not 0 < len(cert_der) <= MAX_EK_CERT_BYTES:
        raise EkCertificateError(f"EK certificate must be 1..{MAX_EK_CERT_BYTES} bytes of DER")
    try:
        cert = x509.load_der_x509_certificate(bytes(cert_der))
        public_key = cert.public_key()
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise EkCertificateError(f"EK certificate is not a valid X.509 DER certificate: {exc}") from None
    what = "EK certificate"
    exts = _extensions(cert, what)
    basic = _basic_constraints(exts)
    if basic is not None and basic.ca:
        raise EkCertificateError("EK certificate is a CA certificate, not an end-entity certificate")
    _check_validity(cert, what, now)
    ek_key, kind = _ek_key(public_key, what)

    chain: list[str] = []
    current, current_what = cert, what
    for depth in range(MAX_CHAIN_LENGTH - 1):
        candidates = [ca for ca in trust_bundle if ca.subject == current.issuer]
        if not candidates:
            if depth == 0:
                raise EkCertificateError(f"EK certificate issuer {_name(cert.issuer)} is not a trusted TPM "
                                         "manufacturer CA")
            raise EkCertificateError(f"{current_what} is issued by {_name(current.issuer)}, which is not in "
                                     "the trusted TPM manufacturer CA bundle")
        _check_hash(current, current_what)
        issuer = next((ca for ca in candidates if _issued_by(current, ca)), None)
        if issuer is None:
            raise SignatureError(f"{current_what}'s signature does not verify with the key of the trusted CA "
                                 f"{_name(current.issuer)} (forged, or issued by another CA of that name)")
        issuer_what = f"CA certificate {_name(issuer.subject)}"
        # RFC 5280 6.1.4 (l)/(m): ``depth`` intermediate CAs sit between this CA and the EK certificate.
        _check_ca(issuer, issuer_what, depth, now)
        chain.append(_name(issuer.subject))
        if _self_signed(issuer):
            return EkIdentity(
                fingerprint=hashlib.sha256(bytes(cert_der)).hexdigest(),
                subject=_name(cert.subject),
                issuer=_name(cert.issuer),
                serial=cert.serial_number,
                public_key=ek_key,
                key_kind=kind,
                certificate=cert,
                chain=tuple(chain),
            )
        current, current_what = issuer, issuer_what
    raise EkCertificateError(f"EK certificate chain is longer than {MAX_CHAIN_LENGTH} certificates or "
                             "does not end at a self-signed root of the trust bundle")


def _same_key(a: EkPublic, b: object) -> bool:
    if isinstance(a, rsa.RSAPublicKey):
        return isinstance(b, rsa.RSAPublicKey) and a.public_numbers() == b.public_numbers()
    return (isinstance(b, ec.EllipticCurvePublicKey) and a.curve.name == b.curve.name
            and a.public_numbers() == b.public_numbers())


def check_ek_public_matches(cert: x509.Certificate | EkIdentity, ek_public: PublicArea) -> None:
    """Require ``ek_public`` (the device's EK TPMT_PUBLIC) to be a real EK holding the certified key.

    Checks, failing closed: the object attributes are those of an EK (all of
    :data:`EK_REQUIRED_ATTRIBUTES`, none of :data:`EK_FORBIDDEN_ATTRIBUTES`; EK Credential Profile
    2.0, B.3), a symmetric algorithm is defined (an EK is a storage key: TPM 2.0 Part 1, 24.4 protects
    credentials with it), the nameAlg is a hash, and the public key equals the certificate's key
    (RSA modulus and exponent, where exponent 0 means 65537 (Part 2, 12.2.3.5); or ECC curve and point).
    Raises :class:`EkCertificateError`.
    """
    certificate = cert.certificate if isinstance(cert, EkIdentity) else cert
    attrs = ek_public.object_attributes
    problems = [f"missing {name}" for name, bit in EK_REQUIRED_ATTRIBUTES.items() if not attrs & bit]
    problems += [f"{name} is set" for name, bit in EK_FORBIDDEN_ATTRIBUTES.items() if attrs & bit]
    params = ek_public.parameters
    if not isinstance(params, RsaParms | EccParms) or params.symmetric.algorithm == Alg.NULL:
        problems.append("no symmetric algorithm (not a storage key)")
    if ek_public.name_alg not in HASH_ALGS:
        problems.append(f"nameAlg is {alg_name(ek_public.name_alg)}")
    if problems:
        raise EkCertificateError("EK public area is not an endorsement key "
                                 f"(objectAttributes 0x{attrs:08x}): " + "; ".join(problems))
    try:
        key = ek_public.public_key()
    except StructureError as exc:
        raise EkCertificateError(f"EK public area does not hold a usable key: {exc}") from None
    try:
        cert_key = certificate.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise EkCertificateError(f"EK certificate key is unusable: {exc}") from None
    if not _same_key(key, cert_key):
        raise EkCertificateError("EK public area holds another key than the EK certificate")
