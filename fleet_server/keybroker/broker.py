"""The key broker's checks: pure, no I/O, fail closed.

A device asks for a model's data key with a ``key.request``
(:class:`protocol.messages.KeyRequest`): the TPM2B_PUBLIC of a decryption key in its TPM, and
TPM2_Certify of that key by the device's attestation key (AK). :func:`check_key_request` decides
whether the data key may be wrapped to that key; :func:`wrap_data_key` wraps it.

What the checks establish, in order (each refusal raises :class:`KeyRequestError` with a reason
code and one line saying what is wrong):

1. **freshness** (``stale``): the device's latest trusted verdict has not expired;
2. **structures** (``malformed``): TPMS_ATTEST, TPMT_SIGNATURE and TPM2B_PUBLIC parse strictly;
3. **signature** (``signature``): the TPMT_SIGNATURE verifies with the device's enrolled AK over the
   TPMS_ATTEST bytes exactly as received (before anything in them is believed);
4. **TPM-made certification** (``not_certification``): ``magic`` is TPM_GENERATED_VALUE (only the TPM
   signs structures that start with it, TPM 2.0 Part 2, 10.12.12) and ``type`` is
   TPM_ST_ATTEST_CERTIFY;
5. **purpose** (``qualifier``): ``extraData`` equals
   :func:`protocol.messages.key_request_qualifier` of (device id from the topic, model name,
   version): a certification made for another device, model or version is refused;
6. **the key is the certified one** (``name``): the certified Name equals the Name of the
   ``key_public`` sent (nameAlg ‖ H(TPMT_PUBLIC), Part 1, 16): the Name covers the whole public area,
   so attributes, authPolicy and modulus below are the TPM's, not the device's claims;
7. **what kind of key** (``attributes``, ``key_type``): fixedTPM and fixedParent (the TPM created it
   and it can never leave: Part 1, 'Object Attributes'; TPM2_Import and TPM2_LoadExternal with a
   private part both refuse these bits, and a public-only external object cannot be authorised for
   TPM2_Certify), sensitiveDataOrigin, decrypt and adminWithPolicy set; sign, x509sign, restricted
   and userWithAuth clear (with userWithAuth clear, only the authPolicy authorises use: Part 1,
   'Authorization Roles'); SHA-256 Name; RSA-2048 with no symmetric part and scheme OAEP-SHA256 or
   NULL;
8. **bound to the attested state** (``policy``): authPolicy equals
   :func:`protocol.tpm.policy.bound_key_policy` of the PCR selection and values of the device's
   latest trusted attestation, so TPM2_RSA_Decrypt works only while those PCRs hold those values;
9. **made in the attested boot** (``boot``): the certification's resetCount and restartCount equal
   those of the latest trusted quote. A device rebooted into other firmware cannot present a key
   certified in its new, unattested boot before the server has seen that boot.

Why ``qualifiedName`` is not checked: it is H(parent's qualifiedName ‖ Name) and only says where in
the hierarchy the key sits (under which storage key). The server cannot know the SRK's name, and it
does not need to: the Name already binds every property that matters, fixedTPM (certified by the
TPM itself) proves the key lives in the TPM that holds the AK, and the AK was proven at enrollment
to share a TPM with a manufacturer-certified EK.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from fleet_server.verifier.quote import AttestationKey
from protocol.errors import MalformedInputError, SignatureError, VerificationError
from protocol.messages import WRAP_LABEL, KeyRequest, key_request_qualifier
from protocol.tpm.constants import TPM_GENERATED_VALUE, Alg, ObjectAttr, StructureTag
from protocol.tpm.policy import bound_key_policy, canonical_selection
from protocol.tpm.structures import (
    AttestedCertify,
    ClockInfo,
    PublicArea,
    RsaParms,
    alg_name,
    parse_attest,
    parse_signature,
    parse_tpm2b_public,
)

__all__ = [
    "BOUND_KEY_FORBIDDEN",
    "BOUND_KEY_REQUIRED",
    "DATA_KEY_SIZE",
    "BootCounters",
    "CertifiedKey",
    "KeyRequestError",
    "check_bound_key_public",
    "check_key_request",
    "wrap_data_key",
]

DATA_KEY_SIZE = 32
RSA_BITS = 2048

# TPMA_OBJECT bits of a PCR-bound data-key decryption key (Part 2, 8.3; agent/tpm/templates.py).
BOUND_KEY_REQUIRED: dict[str, int] = {
    "fixedTPM": ObjectAttr.FIXED_TPM,
    "fixedParent": ObjectAttr.FIXED_PARENT,
    "sensitiveDataOrigin": ObjectAttr.SENSITIVE_DATA_ORIGIN,
    "decrypt": ObjectAttr.DECRYPT,
    "adminWithPolicy": ObjectAttr.ADMIN_WITH_POLICY,
}
BOUND_KEY_FORBIDDEN: dict[str, int] = {
    "sign": ObjectAttr.SIGN_ENCRYPT,
    "x509sign": ObjectAttr.X509_SIGN,
    "restricted": ObjectAttr.RESTRICTED,
    "userWithAuth": ObjectAttr.USER_WITH_AUTH,
}

_OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=WRAP_LABEL)


class KeyRequestError(VerificationError):
    """A key request is refused. ``reason`` is a short code (counters, tests); the message says why."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class BootCounters:
    """TPMS_CLOCK_INFO resetCount and restartCount of a boot (from its latest trusted quote)."""

    reset_count: int
    restart_count: int


@dataclass(frozen=True, slots=True)
class CertifiedKey:
    """A device's TPM decryption key that passed :func:`check_key_request`.

    ``name`` is its TPM Name (what :class:`protocol.messages.KeyRelease` names), ``public_key`` the
    RSA key to wrap data keys to, ``clock_info`` the TPM clock of the certification.
    """

    public: PublicArea
    name: bytes
    policy_digest: bytes
    clock_info: ClockInfo
    public_key: rsa.RSAPublicKey = field(repr=False)


def _fail(reason: str, message: str) -> KeyRequestError:
    return KeyRequestError(reason, message)


def check_bound_key_public(public: PublicArea) -> rsa.RSAPublicKey:
    """Check the attributes and algorithm of a bound key's public area; return its RSA key.

    Raises :class:`KeyRequestError` (``attributes`` or ``key_type``) naming every problem found.
    """
    attrs = public.object_attributes
    problems = [f"{name} is not set" for name, bit in BOUND_KEY_REQUIRED.items() if not attrs & bit]
    problems += [f"{name} is set" for name, bit in BOUND_KEY_FORBIDDEN.items() if attrs & bit]
    if problems:
        raise _fail("attributes", f"the key's attributes (0x{attrs:08x}) do not make it a TPM-bound "
                                  "decryption key usable only by policy: " + "; ".join(problems))
    p = public.parameters
    if public.type != Alg.RSA or not isinstance(p, RsaParms) or not isinstance(public.unique, bytes):
        raise _fail("key_type", f"the key is {alg_name(public.type)}, not RSA")
    kind = []
    if public.name_alg != Alg.SHA256:
        kind.append(f"its nameAlg is {alg_name(public.name_alg)}, not SHA256")
    if p.key_bits != RSA_BITS or len(public.unique) * 8 != RSA_BITS:
        kind.append(f"it has {p.key_bits} bits (modulus of {len(public.unique)} bytes), not {RSA_BITS}")
    if p.symmetric.algorithm != Alg.NULL:
        kind.append(f"it has a symmetric part ({alg_name(p.symmetric.algorithm)}): not a plain "
                    "decryption key")
    if not (p.scheme.scheme == Alg.NULL or (p.scheme.scheme == Alg.OAEP and p.scheme.hash_alg == Alg.SHA256)):
        kind.append(f"its scheme is {alg_name(p.scheme.scheme)}/{alg_name(p.scheme.hash_alg)}, "
                    "not OAEP/SHA256 or NULL")
    if p.exponent not in (0, 65537):
        kind.append(f"its public exponent is {p.exponent}, not 65537")
    if kind:
        raise _fail("key_type", "the key is not an RSA-2048 OAEP-SHA256 decryption key: " + "; ".join(kind))
    try:
        key = public.public_key()
    except MalformedInputError as exc:
        raise _fail("key_type", f"the key's public area is not a usable key: {exc.diagnostics()}") from None
    if not isinstance(key, rsa.RSAPublicKey):  # pragma: no cover - type checked above
        raise _fail("key_type", "the key is not RSA")
    return key


def check_key_request(req: KeyRequest, *, device_id: str, ak: AttestationKey,
                      attested_pcrs: Mapping[str, Mapping[int, bytes]],
                      selection: Mapping[str, Sequence[int]], now: int,
                      trusted_until: int | None = None, boot: BootCounters | None = None,
                      allow_sha1: bool = False) -> CertifiedKey:
    """Check a key request; return the certified key or raise :class:`KeyRequestError`.

    ``device_id``: the sender (from the topic). ``ak``: the device's enrolled attestation key.
    ``attested_pcrs`` and ``selection``: PCR values and selection of the device's latest trusted
    attestation (the bound key must be bound to exactly these). ``now`` (ms) is compared with
    ``trusted_until``, the expiry of that verdict, when given. ``boot``: the resetCount and
    restartCount of that attestation's quote; when given, the certification must come from the same
    boot. See the module docstring for every check.
    """
    if trusted_until is not None and now >= trusted_until:
        raise _fail("stale", f"the device's trusted verdict expired {now - trusted_until} ms ago; "
                             "attest again first")
    try:
        signature = parse_signature(req.certify_signature)
        attest = parse_attest(req.certify_attest)
        public = parse_tpm2b_public(req.key_public)
    except MalformedInputError as exc:
        raise _fail("malformed", f"key request structures do not parse: {exc.diagnostics()}") from None
    try:
        ak.verify_signature(signature, req.certify_attest, allow_sha1=allow_sha1)
    except SignatureError as exc:
        raise _fail("signature", "the certification is not signed by the device's attestation key: "
                                 + exc.diagnostics().replace("quote signature", "signature")) from None
    if attest.magic != TPM_GENERATED_VALUE:
        raise _fail("not_certification", f"certification magic 0x{attest.magic:08x} is not "
                                         "TPM_GENERATED_VALUE: not made by a TPM")
    if attest.type != StructureTag.ATTEST_CERTIFY or not isinstance(attest.attested, AttestedCertify):
        raise _fail("not_certification", f"attestation type 0x{attest.type:04x} is not TPM_ST_ATTEST_CERTIFY")
    expected = key_request_qualifier(device_id, req.name, req.version)
    if not hmac.compare_digest(attest.extra_data, expected):
        raise _fail("qualifier", "the certification's qualifying data is not the one of this device, model "
                                 f"and version ({device_id}, {req.name} {req.version})")
    try:
        name = public.name()
    except MalformedInputError as exc:
        raise _fail("malformed", f"the key has no Name: {exc.diagnostics()}") from None
    if not hmac.compare_digest(attest.attested.name, name):
        raise _fail("name", "the certified Name is not the Name of the key sent: the certification is "
                            "of another key")
    rsa_key = check_bound_key_public(public)
    try:
        policy = bound_key_policy(canonical_selection(selection), attested_pcrs)
    except MalformedInputError as exc:
        raise _fail("policy", f"no attested PCR values to bind the key to: {exc.diagnostics()}") from None
    if not hmac.compare_digest(public.auth_policy, policy.digest):
        raise _fail("policy", "the key's authPolicy is not PolicyOR(PolicyPCR + RSA_Decrypt, Certify) over "
                              "the PCR values of the device's latest trusted attestation "
                              f"({_describe(selection)}): it would decrypt in another state")
    clock = attest.clock_info
    certified_boot = (clock.reset_count, clock.restart_count)
    if boot is not None and certified_boot != (boot.reset_count, boot.restart_count):
        raise _fail("boot", f"the key was certified in a boot the server has not attested (resetCount "
                            f"{clock.reset_count}/restartCount {clock.restart_count}, attested "
                            f"{boot.reset_count}/{boot.restart_count}); attest again first")
    return CertifiedKey(public=public, name=name, policy_digest=public.auth_policy, clock_info=clock,
                        public_key=rsa_key)


def wrap_data_key(data_key: bytes | bytearray, key_public: bytes | PublicArea | CertifiedKey) -> bytes:
    """RSA-OAEP-SHA256 (MGF1-SHA256, label :data:`protocol.messages.WRAP_LABEL`) of ``data_key`` to a
    bound key (its TPM2B_PUBLIC bytes, parsed public area or :class:`CertifiedKey`).

    Only the TPM holding that key can unwrap the result, and only in a policy session that satisfies
    its authPolicy (TPM2_RSA_Decrypt with the same label: Part 1, B.4 — hence the label's NUL end).
    """
    if len(data_key) != DATA_KEY_SIZE:
        raise MalformedInputError(f"a data key has {DATA_KEY_SIZE} bytes, not {len(data_key)}")
    if isinstance(key_public, CertifiedKey):
        key = key_public.public_key
    else:
        public = parse_tpm2b_public(key_public) if isinstance(key_public, bytes) else key_public
        key = check_bound_key_public(public)
    return key.encrypt(bytes(data_key), _OAEP)


def _describe(selection: Mapping[str, Sequence[int]]) -> str:
    return "; ".join(f"{bank}:{','.join(map(str, sorted(pcrs)))}" for bank, pcrs in selection.items())
