"""A software TPM for large simulated fleets: the agent's TPM interface in memory, in pure Python.

:class:`SoftTpm` implements :class:`agent.tpm.interface.AgentTpm`, the operations the agent calls on
:class:`agent.tpm.adapter.TpmAdapter`, without a TPM process: PCR banks, an EK with an EK certificate
issued by the simulator's manufacturer CA (:class:`EkIssuer`, as swtpm devices get theirs), an AK, an
NV counter and NV data indices, and PCR-bound keys live in the object.  What it returns has the
byte formats a TPM produces (TPM 2.0 Part 2), so the fleet server runs its usual verification path:

* public keys: TPM2B_PUBLIC with the templates the adapter uses (AK: ``tpm2_createak``'s restricted
  signing key, ECC P-256/ECDSA-SHA256 or RSA-2048/RSASSA-SHA256; EK: TCG EK Credential Profile 2.0
  templates L-1 (RSA-2048) and L-2 (ECC P-256); bound keys: :func:`agent.tpm.templates.bound_key_template`);
* quotes: TPMS_ATTEST (magic TPM_GENERATED_VALUE, TPM_ST_ATTEST_QUOTE, qualifiedSigner = the AK's
  qualified name, extraData = the nonce, TPMS_CLOCK_INFO, firmwareVersion, TPMS_QUOTE_INFO) and
  TPMT_SIGNATURE; the AK lives in the endorsement hierarchy, so clock, reset and restart counts and
  the firmware version are not obfuscated (TPM 2.0 Part 3, 18.1), as with the adapter's AK;
* credential activation: TPM2_ActivateCredential (Part 3, 12.5) on the output of TPM2_MakeCredential
  (:mod:`fleet_server.enrollment.credential`): the seed by RSA-OAEP or ECDH + KDFe (Part 1, B.10.3 and
  C.6.1), the integrity HMAC and the CFB-decrypted credential (Part 1, section 24);
* bound keys: RSA-2048 OAEP-SHA256 keys whose decryption is refused unless the PCRs hold the values
  their authPolicy was computed from (the effect of the adapter's PolicyPCR session), certified by the
  AK with TPMS_ATTEST TPM_ST_ATTEST_CERTIFY.

The state is volatile and per object: :meth:`SoftTpm.power_cycle` is TPM2_Startup(CLEAR) after a reset
(PCRs back to their reset values, resetCount + 1); NV and keys stay as long as the object.  ``open`` and
``close`` do nothing (there is no connection), so one object can serve an agent across its TPM reopens:
``Agent(config, tpm_factory=tpm.factory())``.

Not modelled: hierarchies' authorizations, sessions, locality, the TPM's internal key seeds (keys are
fresh random keys, not derived from seeds), the obfuscation of clock values for keys outside the
endorsement and platform hierarchies, TPM2_PCR_Read's eight-digest limit.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import struct
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.x509.oid import NameOID, ObjectIdentifier

try:  # cryptography >= 47 keeps CFB among the "decrepit" modes; TPM 2.0 credential protection needs it
    from cryptography.hazmat.decrepit.ciphers.modes import CFB
except ImportError:  # pragma: no cover - older cryptography
    from cryptography.hazmat.primitives.ciphers.modes import CFB

from agent.tpm.interface import AgentTpm, AttestationKey, BoundKey, Certification, Quote
from firmware_sim.boot import DEFAULT_BANKS, BootMedia, BootRecord, BootSettings, build_boot_log
from firmware_sim.eventlog_writer import LogEvent
from firmware_sim.manufacturer import ManufacturerCA
from fleet_server.enrollment.credential import IDENTITY_LABEL, INTEGRITY_LABEL, STORAGE_LABEL, kdfa, kdfe
from protocol.errors import ConfigError, EdgeError, MalformedInputError, StructureError, TpmError
from protocol.tpm.constants import (
    BANK_TO_ALG,
    HASH_ALGS,
    TPM_GENERATED_VALUE,
    Alg,
    ECCCurve,
    ObjectAttr,
    StructureTag,
)
from protocol.tpm.marshal import Reader
from protocol.tpm.policy import (
    PCR_COUNT,
    Selection,
    bound_key_policy,
    canonical_selection,
    marshal_pcr_selection,
    pcr_composite,
    pcr_digest,
)
from protocol.tpm.structures import (
    MAX_DIGEST,
    MAX_ECC_BYTES,
    MAX_RSA_BYTES,
    Attest,
    AttestedCertify,
    AttestedQuote,
    ClockInfo,
    EccParms,
    EccPoint,
    EccSignature,
    PublicArea,
    RsaParms,
    RsaSignature,
    Scheme,
    SymDef,
    parse_pcr_selection,
)

__all__ = [
    "AK_ATTRIBUTES",
    "EK_ATTRIBUTES",
    "EK_AUTH_POLICY",
    "SOFT_FIRMWARE_VERSION",
    "EkIssuer",
    "SoftTpm",
    "qualified_name",
    "soft_measured_boot",
]

#: tpm2_createak's restricted signing key plus noDA (as :data:`agent.tpm.templates.AK_ATTRIBUTES`).
AK_ATTRIBUTES = (ObjectAttr.FIXED_TPM | ObjectAttr.FIXED_PARENT | ObjectAttr.SENSITIVE_DATA_ORIGIN
                 | ObjectAttr.USER_WITH_AUTH | ObjectAttr.NO_DA | ObjectAttr.RESTRICTED
                 | ObjectAttr.SIGN_ENCRYPT)
#: EK Credential Profile 2.0, B.3.3 templates L-1/L-2: 0x000300B2.
EK_ATTRIBUTES = (ObjectAttr.FIXED_TPM | ObjectAttr.FIXED_PARENT | ObjectAttr.SENSITIVE_DATA_ORIGIN
                 | ObjectAttr.ADMIN_WITH_POLICY | ObjectAttr.RESTRICTED | ObjectAttr.DECRYPT)
#: PolicySecret(TPM_RH_ENDORSEMENT), the authPolicy of the low-range EK templates (B.3.2).
EK_AUTH_POLICY = bytes.fromhex("837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa")
#: As :data:`agent.tpm.templates.BOUND_KEY_ATTRIBUTES`.
BOUND_KEY_ATTRIBUTES = (ObjectAttr.FIXED_TPM | ObjectAttr.FIXED_PARENT | ObjectAttr.SENSITIVE_DATA_ORIGIN
                        | ObjectAttr.DECRYPT | ObjectAttr.ADMIN_WITH_POLICY)
#: TPMS_ATTEST.firmwareVersion the soft TPM reports unless told otherwise.
SOFT_FIRMWARE_VERSION = 0x0000_0001_0000_0000

TPM_RH_OWNER = 0x40000001
TPM_RH_ENDORSEMENT = 0x4000000B
#: NV index ranges and defaults as in :mod:`agent.tpm.adapter`.
NV_OWNER_RANGE = (0x01800000, 0x01BFFFFF)
DEFAULT_COUNTER_INDEX = 0x01800A01
MAX_QUALIFYING_DATA = 64

_SHA256 = int(Alg.SHA256)
_NULL_SYM = SymDef()
_AES128_CFB = SymDef(int(Alg.AES), 128, int(Alg.CFB))
_NULL_SCHEME = Scheme()
_OAEP_IDENTITY = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(),
                              label=IDENTITY_LABEL)
_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())
_PKCS1 = padding.PKCS1v15()
_U16 = struct.Struct(">H")
_AK_ALGS = ("ecc", "rsa")
_EK_ALGS = ("ecc", "rsa")
# TCG OIDs of the EK certificate's subjectAltName directoryName (EK Credential Profile 3.2.9).
_TCG_MANUFACTURER = ObjectIdentifier("2.23.133.2.1")
_TCG_MODEL = ObjectIdentifier("2.23.133.2.2")
_TCG_VERSION = ObjectIdentifier("2.23.133.2.3")
_EK_NOT_AFTER = dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC)  # RFC 5280 4.1.2.5: no expiry

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


# ---------------------------------------------------------------------------------------------
# Public areas and names
# ---------------------------------------------------------------------------------------------
def _coordinate(value: int) -> bytes:
    return value.to_bytes(32, "big")


def _public_area(key: PrivateKey, *, attributes: int, auth_policy: bytes, symmetric: SymDef,
                 scheme: Scheme) -> PublicArea:
    """The TPMT_PUBLIC of ``key`` (RSA-2048 with exponent 0 = 65537, or ECC P-256), re-parsed so that its
    ``raw`` bytes are the marshalled form."""
    public = key.public_key()
    area: PublicArea
    if isinstance(public, rsa.RSAPublicKey):
        modulus = public.public_numbers().n.to_bytes(public.key_size // 8, "big")
        area = PublicArea(int(Alg.RSA), _SHA256, attributes, auth_policy,
                          RsaParms(symmetric, scheme, public.key_size, 0), modulus)
    else:
        numbers = public.public_numbers()
        area = PublicArea(int(Alg.ECC), _SHA256, attributes, auth_policy,
                          EccParms(symmetric, scheme, int(ECCCurve.NIST_P256), _NULL_SCHEME),
                          EccPoint(_coordinate(numbers.x), _coordinate(numbers.y)))
    raw = area.marshal()
    return PublicArea(area.type, area.name_alg, area.object_attributes, area.auth_policy, area.parameters,
                      area.unique, raw)


def _spki(key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def qualified_name(parent_qualified_name: bytes, name: bytes) -> bytes:
    """Qualified Name of an object (TPM 2.0 Part 1, 16): ``nameAlg || H(QN(parent) || Name)`` (sha256).

    A hierarchy's qualified name is its handle, e.g. ``TPM_RH_ENDORSEMENT.to_bytes(4, "big")``.
    """
    return _U16.pack(_SHA256) + hashlib.sha256(parent_qualified_name + name).digest()


def _generate(alg: str) -> PrivateKey:
    if alg == "ecc":
        return ec.generate_private_key(ec.SECP256R1())
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


# ---------------------------------------------------------------------------------------------
# EK certificates
# ---------------------------------------------------------------------------------------------
class EkIssuer:
    """Issues EK certificates with the issuing CA of a :class:`~firmware_sim.manufacturer.ManufacturerCA`.

    Load it once per process (:meth:`from_ca`) and issue many: an EK certificate costs one RSA signature.
    The certificates have the form of swtpm_localca's: an end-entity certificate for the EK's key with a
    critical subjectAltName naming the TPM (manufacturer, model, version), never expiring.
    """

    def __init__(self, issuer_cert: x509.Certificate,
                 issuer_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> None:
        self._cert = issuer_cert
        self._key = issuer_key

    @classmethod
    def from_ca(cls, ca: ManufacturerCA) -> EkIssuer:
        try:
            cert = x509.load_pem_x509_certificate(ca.issuer_cert.read_bytes())
            key = serialization.load_pem_private_key(ca.issuer_key.read_bytes(), password=None)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load the manufacturer issuing CA in {ca.directory}: {exc}") from exc
        if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
            raise ConfigError(f"{ca.issuer_key} is not an RSA or ECC private key")
        return cls(cert, key)

    def issue(self, ek: rsa.RSAPublicKey | ec.EllipticCurvePublicKey, *, now: dt.datetime,
              serial: int | None = None) -> bytes:
        """DER EK certificate for ``ek``, valid from a little before ``now``."""
        tpm_name = x509.Name([x509.RelativeDistinguishedName([
            x509.NameAttribute(_TCG_MANUFACTURER, "id:53575450"),  # "SWTP", as swtpm reports
            x509.NameAttribute(_TCG_MODEL, "soft-tpm"),
            x509.NameAttribute(_TCG_VERSION, "id:00010000"),
        ])])
        usage = isinstance(ek, rsa.RSAPublicKey)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "unknown")]))
            .issuer_name(self._cert.subject)
            .public_key(ek)
            .serial_number(serial if serial is not None else x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(_EK_NOT_AFTER)
            .add_extension(x509.SubjectAlternativeName([x509.DirectoryName(tpm_name)]), critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, usage, False, not usage, False, False, False, False),
                           critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                           critical=False)
            .sign(self._key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.DER)


# ---------------------------------------------------------------------------------------------
# The soft TPM
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _SoftBoundKey:
    key: BoundKey
    private: rsa.RSAPrivateKey


def _reset_value(index: int, size: int) -> bytes:
    # PC Client PTP: PCRs 17-22 (DRTM) reset to all ones at TPM2_Startup, the others to zeros.
    return (b"\xff" if 17 <= index <= 22 else b"\x00") * size


def _check_qualifying_data(data: bytes, what: str) -> bytes:
    if not isinstance(data, bytes | bytearray) or not 1 <= len(data) <= MAX_QUALIFYING_DATA:
        raise MalformedInputError(f"{what} must be 1..{MAX_QUALIFYING_DATA} bytes")
    return bytes(data)


def _tpm2b(data: bytes, what: str, max_size: int) -> tuple[bytes, Reader]:
    """Contents of a marshalled TPM2B that must fill ``data`` exactly, and a reader over them."""
    try:
        r = Reader(bytes(data), what)
        body = r.tpm2b("size", max_size)
        r.expect_end()
    except StructureError as exc:
        raise MalformedInputError(str(exc)) from None
    return body, Reader(body, what)


class SoftTpm:
    """An in-memory TPM implementing :class:`agent.tpm.interface.AgentTpm` (see the module docstring).

    Make one with :meth:`manufacture`.  ``clock`` gives seconds on a monotonic scale (the TPM's Clock
    counts milliseconds from the object's creation, continuing across :meth:`power_cycle`); ``banks`` the
    allocated PCR banks.  Thread-safe: one lock serialises all operations, as the adapter's does.
    """

    def __init__(self, *, ek_key: PrivateKey, ek_certificate: bytes, ak_alg: str = "ecc",
                 clock: Callable[[], float] = time.monotonic, banks: Sequence[str] = DEFAULT_BANKS,
                 firmware_version: int = SOFT_FIRMWARE_VERSION,
                 counter_index: int = DEFAULT_COUNTER_INDEX) -> None:
        if ak_alg not in _AK_ALGS:
            raise ConfigError(f"unknown AK algorithm {ak_alg!r}; expected one of {', '.join(_AK_ALGS)}")
        unknown = [bank for bank in banks if bank not in BANK_TO_ALG]
        if unknown or not banks:
            raise ConfigError(f"unknown or no PCR banks {unknown or list(banks)}")
        self._lock = threading.RLock()
        self._clock = clock
        self._clock_start = clock()
        self._firmware_version = firmware_version
        self._counter_index = counter_index
        self._banks = {bank: HASH_ALGS[BANK_TO_ALG[bank]][1] for bank in banks}
        self._pcrs: dict[str, list[bytes]] = {}
        self._reset_count = 0
        self._restart_count = 0
        self._reset_pcrs()
        # EK (endorsement hierarchy primary)
        self._ek_alg = "rsa" if isinstance(ek_key, rsa.RSAPrivateKey) else "ecc"
        if isinstance(ek_key, ec.EllipticCurvePrivateKey) and not isinstance(ek_key.curve, ec.SECP256R1):
            raise ConfigError("the soft TPM's ECC EK must be on NIST P-256")
        self._ek_key = ek_key
        self._ek_area = _public_area(ek_key, attributes=EK_ATTRIBUTES, auth_policy=EK_AUTH_POLICY,
                                     symmetric=_AES128_CFB, scheme=_NULL_SCHEME)
        self._ek_certificate = bytes(ek_certificate)
        try:
            certified = x509.load_der_x509_certificate(self._ek_certificate).public_key()
        except ValueError as exc:
            raise ConfigError(f"the soft TPM's EK certificate is not DER X.509: {exc}") from None
        if not isinstance(certified, rsa.RSAPublicKey | ec.EllipticCurvePublicKey) \
                or _spki(certified) != _spki(ek_key.public_key()):
            raise ConfigError("the soft TPM's EK certificate does not certify its EK")
        ek_qn = qualified_name(TPM_RH_ENDORSEMENT.to_bytes(4, "big"), self._ek_area.name())
        # AK (child of the EK, as the adapter's)
        self._ak_key = _generate(ak_alg)
        ak_scheme = Scheme(int(Alg.ECDSA if ak_alg == "ecc" else Alg.RSASSA), _SHA256)
        ak_area = _public_area(self._ak_key, attributes=AK_ATTRIBUTES, auth_policy=b"", symmetric=_NULL_SYM,
                               scheme=ak_scheme)
        self._ak = AttestationKey(public=ak_area.marshal_tpm2b(), name=ak_area.name(), alg=ak_alg)
        self._ak_qualified_name = qualified_name(ek_qn, self._ak.name)
        # SRK (owner hierarchy primary) parenting the bound keys
        self._srk_qualified_name = qualified_name(TPM_RH_OWNER.to_bytes(4, "big"), _public_area(
            ec.generate_private_key(ec.SECP256R1()), attributes=ObjectAttr.FIXED_TPM | ObjectAttr.FIXED_PARENT
            | ObjectAttr.SENSITIVE_DATA_ORIGIN | ObjectAttr.USER_WITH_AUTH | ObjectAttr.NO_DA
            | ObjectAttr.RESTRICTED | ObjectAttr.DECRYPT, auth_policy=b"", symmetric=_AES128_CFB,
            scheme=_NULL_SCHEME).name())
        self._bound: dict[str, _SoftBoundKey] = {}
        self._counters: dict[int, int] = {}
        self._nv_data: dict[int, tuple[int, bytes | None]] = {}

    @classmethod
    def manufacture(cls, issuer: EkIssuer, *, now: dt.datetime, ek_alg: str = "ecc", ak_alg: str = "ecc",
                    clock: Callable[[], float] = time.monotonic, banks: Sequence[str] = DEFAULT_BANKS,
                    firmware_version: int = SOFT_FIRMWARE_VERSION) -> SoftTpm:
        """A new soft TPM with a fresh ``ek_alg`` EK ("ecc": P-256, cheap; "rsa": RSA-2048) certified by
        ``issuer`` at ``now``; the other arguments are the constructor's."""
        if ek_alg not in _EK_ALGS:
            raise ConfigError(f"unknown EK algorithm {ek_alg!r}; expected one of {', '.join(_EK_ALGS)}")
        key = _generate(ek_alg)
        return cls(ek_key=key, ek_certificate=issuer.issue(key.public_key(), now=now), ak_alg=ak_alg,
                   clock=clock, banks=banks, firmware_version=firmware_version)

    # -- lifecycle (nothing to connect to) -----------------------------------------------------------
    def open(self) -> None:
        """Nothing to do: the soft TPM is always there."""

    def close(self) -> None:
        """Nothing to do; the state stays (an agent reopening its TPM finds the same one)."""

    def factory(self) -> Callable[[], AgentTpm]:
        """For ``Agent(config, tpm_factory=tpm.factory())``: every (re)open of the agent's TPM is this one."""
        def reopen() -> AgentTpm:
            return self

        return reopen

    def power_cycle(self) -> None:
        """A TPM reset followed by TPM2_Startup(CLEAR): PCRs to their reset values, resetCount + 1."""
        with self._lock:
            self._reset_pcrs()
            self._reset_count += 1
            self._restart_count = 0

    def _reset_pcrs(self) -> None:
        self._pcrs = {bank: [_reset_value(i, size) for i in range(PCR_COUNT)]
                      for bank, size in self._banks.items()}

    @property
    def clock_info(self) -> ClockInfo:
        """The TPMS_CLOCK_INFO a quote made now would carry."""
        with self._lock:
            clock = int((self._clock() - self._clock_start) * 1000)
            return ClockInfo(clock, self._reset_count, self._restart_count, True)

    # -- EK and AK -----------------------------------------------------------------------------------
    def _check_ek_alg(self, alg: str | None) -> None:
        if alg is not None and alg != self._ek_alg:
            if alg not in _EK_ALGS:
                raise ConfigError(f"unknown EK algorithm {alg!r}; expected one of {', '.join(_EK_ALGS)}")
            raise TpmError(f"this soft TPM has no {alg.upper()} EK (its EK is {self._ek_alg.upper()})")

    def ek_certificate(self, alg: str | None = None) -> bytes:
        """DER EK certificate (``alg`` must be the soft TPM's EK algorithm or None)."""
        self._check_ek_alg(alg)
        return self._ek_certificate

    def ek_public(self, alg: str | None = None) -> bytes:
        """Marshalled TPM2B_PUBLIC of the EK (EK Credential Profile template L-1 or L-2)."""
        self._check_ek_alg(alg)
        return self._ek_area.marshal_tpm2b()

    @property
    def ak(self) -> AttestationKey:
        return self._ak

    @property
    def ak_public(self) -> bytes:
        return self._ak.public

    @property
    def ak_name(self) -> bytes:
        return self._ak.name

    # -- PCRs ----------------------------------------------------------------------------------------
    def extend(self, pcr: int, digests: Iterable[tuple[int, bytes]]) -> None:
        """TPM2_PCR_Extend of ``pcr`` with ``(TPM_ALG_ID, digest)`` pairs (banks not given are left alone)."""
        if not 0 <= pcr < PCR_COUNT:
            raise MalformedInputError(f"PCR index {pcr} is outside 0..{PCR_COUNT - 1}")
        with self._lock:
            for alg, digest in digests:
                entry = HASH_ALGS.get(alg)
                bank = entry[0] if entry is not None else None
                if entry is None or bank not in self._pcrs:
                    raise TpmError(f"PCR bank 0x{alg:04x} is not allocated in this soft TPM")
                if len(digest) != entry[1]:
                    raise MalformedInputError(f"{bank} digest for PCR {pcr} has {len(digest)} bytes")
                values = self._pcrs[bank]
                values[pcr] = hashlib.new(entry[2], values[pcr] + digest).digest()

    def extend_events(self, events: Iterable[LogEvent]) -> None:
        """Extend every extending event of a boot log (EV_NO_ACTION events are only logged)."""
        for event in events:
            if event.extends:
                self.extend(event.pcr, event.digests)

    def _selection(self, selection: Mapping[str, Sequence[int]]) -> Selection:
        sel = canonical_selection(selection)
        missing = [bank for bank, _ in sel if bank not in self._pcrs]
        if missing:
            raise TpmError(f"PCR bank {', '.join(missing)} is not allocated in this soft TPM")
        return sel

    def _values(self, sel: Selection) -> dict[str, dict[int, bytes]]:
        return {bank: {i: self._pcrs[bank][i] for i in pcrs} for bank, pcrs in sel}

    def read_pcrs(self, selection: Mapping[str, Sequence[int]]) -> dict[str, dict[int, bytes]]:
        """PCR values ``{bank: {index: digest}}`` of ``selection``."""
        sel = self._selection(selection)
        with self._lock:
            return self._values(sel)

    # -- quotes --------------------------------------------------------------------------------------
    def _sign(self, attest: bytes) -> bytes:
        key = self._ak_key
        if isinstance(key, ec.EllipticCurvePrivateKey):
            r, s = decode_dss_signature(key.sign(attest, _ECDSA_SHA256))
            return EccSignature(int(Alg.ECDSA), _SHA256, _coordinate(r), _coordinate(s)).marshal()
        return RsaSignature(int(Alg.RSASSA), _SHA256, key.sign(attest, _PKCS1, hashes.SHA256())).marshal()

    def _attest(self, qualifying_data: bytes, attested: AttestedQuote | AttestedCertify) -> bytes:
        quote = isinstance(attested, AttestedQuote)
        kind = int(StructureTag.ATTEST_QUOTE if quote else StructureTag.ATTEST_CERTIFY)
        return Attest(TPM_GENERATED_VALUE, kind, self._ak_qualified_name, qualifying_data, self.clock_info,
                      self._firmware_version, attested).marshal()

    def quote(self, nonce: bytes, selection: Mapping[str, Sequence[int]], *, with_pcrs: bool = True) -> Quote:
        """TPM2_Quote of ``selection`` by the AK with ``nonce`` as qualifyingData (1..64 bytes)."""
        nonce = _check_qualifying_data(nonce, "nonce")
        sel = self._selection(selection)
        with self._lock:
            values = self._values(sel)
            info = AttestedQuote(parse_pcr_selection(marshal_pcr_selection(sel)), pcr_digest(sel, values))
            attest = self._attest(nonce, info)
            return Quote(attest=attest, signature=self._sign(attest), pcrs=values if with_pcrs else {})

    # -- credential activation -----------------------------------------------------------------------
    def activate_credential(self, credential_blob: bytes, encrypted_secret: bytes) -> bytes:
        """TPM2_ActivateCredential with the AK as object and the EK as key; returns the secret.

        Same inputs as :meth:`agent.tpm.adapter.TpmAdapter.activate_credential`; a credential made for
        another AK name or EK fails the integrity check (:class:`TpmError`, as TPM_RC_INTEGRITY).
        """
        blob, blob_reader = _tpm2b(credential_blob, "credential blob (TPM2B_ID_OBJECT)", 1024)
        secret, secret_reader = _tpm2b(encrypted_secret, "encrypted secret (TPM2B_ENCRYPTED_SECRET)", 1024)
        try:
            integrity = blob_reader.tpm2b("integrityHMAC", MAX_DIGEST)
        except StructureError as exc:
            raise MalformedInputError(str(exc)) from None
        enc_identity = blob[2 + len(integrity):]
        seed = self._seed(secret, secret_reader)
        name = self._ak.name
        hmac_key = kdfa(_SHA256, seed, INTEGRITY_LABEL, b"", b"", 256)
        if not hmac.compare_digest(hmac.new(hmac_key, enc_identity + name, "sha256").digest(), integrity):
            raise TpmError("TPM2_ActivateCredential: TPM_RC_INTEGRITY (the credential was not made for this "
                           "AK and EK)")
        sym_key = kdfa(_SHA256, seed, STORAGE_LABEL, name, b"", 128)
        decryptor = Cipher(algorithms.AES(sym_key), CFB(bytes(16))).decryptor()
        plain = decryptor.update(enc_identity) + decryptor.finalize()
        if len(plain) < 2 or _U16.unpack_from(plain)[0] != len(plain) - 2:
            raise TpmError("TPM2_ActivateCredential: TPM_RC_SIZE (the credential is not a TPM2B_DIGEST)")
        return plain[2:]

    def _seed(self, secret: bytes, reader: Reader) -> bytes:
        key = self._ek_key
        if isinstance(key, rsa.RSAPrivateKey):
            try:
                return key.decrypt(secret, _OAEP_IDENTITY)
            except ValueError:
                raise TpmError("TPM2_ActivateCredential: TPM_RC_VALUE (the EK cannot decrypt the seed)"
                               ) from None
        try:
            x = reader.tpm2b("x", MAX_ECC_BYTES)
            y = reader.tpm2b("y", MAX_ECC_BYTES)
            reader.expect_end()
            point = ec.EllipticCurvePublicKey.from_encoded_point(
                ec.SECP256R1(), b"\x04" + x.rjust(32, b"\x00") + y.rjust(32, b"\x00"))
        except (StructureError, ValueError) as exc:
            raise TpmError(f"TPM2_ActivateCredential: TPM_RC_ECC_POINT ({exc})") from None
        z = key.exchange(ec.ECDH(), point)
        ek_x = _coordinate(key.public_key().public_numbers().x)
        return kdfe(_SHA256, z, IDENTITY_LABEL, _coordinate(point.public_numbers().x), ek_x, 256)

    # -- bound keys ----------------------------------------------------------------------------------
    def create_bound_key(self, pcr_selection: Mapping[str, Sequence[int]],
                         pcr_values: Mapping[str, Mapping[int, bytes]] | None = None) -> BoundKey:
        """An RSA-2048 OAEP-SHA256 key that decrypts only while ``pcr_selection`` holds ``pcr_values``
        (default: the current values); kept in memory under the returned ``key_id``."""
        sel = self._selection(pcr_selection)
        if pcr_values is not None:
            pcr_composite(sel, pcr_values)
        with self._lock:
            values = self._values(sel) if pcr_values is None else pcr_values
            policy = bound_key_policy(sel, values)
            private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            area = _public_area(private, attributes=BOUND_KEY_ATTRIBUTES, auth_policy=policy.digest,
                                symmetric=_NULL_SYM, scheme=Scheme(int(Alg.OAEP), _SHA256))
            name = area.name()
            key = BoundKey(key_id=name[2:18].hex(), public=area.marshal_tpm2b(), name=name, policy=policy,
                           pcr_selection=sel)
            self._bound[key.key_id] = _SoftBoundKey(key, private)
            return key

    def _stored(self, key: BoundKey | str) -> _SoftBoundKey:
        key_id = key.key_id if isinstance(key, BoundKey) else key
        stored = self._bound.get(key_id) if isinstance(key_id, str) else None
        if stored is None:
            raise TpmError(f"no bound key {key_id!r} in this soft TPM")
        return stored

    def bound_key(self, key_id: str) -> BoundKey:
        """The bound key created under ``key_id``."""
        with self._lock:
            return self._stored(key_id).key

    def certify(self, key: BoundKey | str, qualifying_data: bytes) -> Certification:
        """TPM2_Certify of a bound key by the AK (TPMS_CERTIFY_INFO: its name and qualified name)."""
        qualifying_data = _check_qualifying_data(qualifying_data, "qualifying data")
        with self._lock:
            name = self._stored(key).key.name
            info = AttestedCertify(name, qualified_name(self._srk_qualified_name, name))
            attest = self._attest(qualifying_data, info)
            return Certification(attest=attest, signature=self._sign(attest))

    def unwrap(self, key: BoundKey | str, ciphertext: bytes, label: bytes = b"") -> bytes:
        """TPM2_RSA_Decrypt (OAEP-SHA256) with a bound key, refused unless its PCRs hold the bound values."""
        if label and not label.endswith(b"\x00"):
            raise MalformedInputError("OAEP label must be empty or end with a zero octet")
        if len(ciphertext) > MAX_RSA_BYTES:
            raise MalformedInputError("ciphertext is larger than an RSA block")
        with self._lock:
            stored = self._stored(key)
            bound = stored.key
            now = bound_key_policy(bound.pcr_selection, self._values(bound.pcr_selection))
            if not hmac.compare_digest(now.digest, bound.policy.digest):
                raise TpmError("TPM2_RSA_Decrypt: a policy check failed (TPM_RC_POLICY_FAIL): the PCRs are "
                               "not in the state the key is bound to")
            try:
                return stored.private.decrypt(ciphertext, padding.OAEP(
                    mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=label or None))
            except ValueError:
                raise TpmError("TPM2_RSA_Decrypt: TPM_RC_VALUE (the ciphertext does not decrypt)") from None

    # -- NV counter and data indices -----------------------------------------------------------------
    def counter_define(self) -> None:
        """Define the NV counter unless it exists (readable at once, value 1)."""
        with self._lock:
            if self._counter_index in self._nv_data:
                raise TpmError(f"NV index 0x{self._counter_index:08x} exists but is not a counter")
            self._counters.setdefault(self._counter_index, 1)

    def _counter(self) -> int:
        value = self._counters.get(self._counter_index)
        if value is None:
            raise TpmError(f"NV counter 0x{self._counter_index:08x} is not defined; call counter_define()")
        return value

    def counter_read(self) -> int:
        with self._lock:
            return self._counter()

    def counter_increment(self) -> int:
        with self._lock:
            value = self._counter() + 1
            self._counters[self._counter_index] = value
            return value

    @staticmethod
    def _check_nv_data_index(index: int, size: int) -> None:
        if not NV_OWNER_RANGE[0] <= index <= NV_OWNER_RANGE[1]:
            raise ConfigError(f"NV index 0x{index:08x} is outside the owner range "
                              f"0x{NV_OWNER_RANGE[0]:08x}-0x{NV_OWNER_RANGE[1]:08x}")
        if not 1 <= size <= 64:
            raise ConfigError(f"NV data index size {size} is outside 1..64 bytes")

    def _nv_entry(self, index: int, size: int) -> tuple[int, bytes | None] | None:
        entry = self._nv_data.get(index)
        if index in self._counters or (entry is not None and entry[0] != size):
            raise TpmError(f"NV index 0x{index:08x} exists but is not an owner-authorized {size}-byte data "
                           "index; choose another index")
        return entry

    def nv_data_read(self, index: int, size: int) -> bytes | None:
        """The ``size`` bytes of NV data index ``index``, or None if undefined or never written."""
        self._check_nv_data_index(index, size)
        with self._lock:
            entry = self._nv_entry(index, size)
            return None if entry is None else entry[1]

    def nv_data_write(self, index: int, data: bytes) -> None:
        """Write ``data`` to NV data index ``index``, defining it (``len(data)`` bytes) if needed."""
        self._check_nv_data_index(index, len(data))
        with self._lock:
            self._nv_entry(index, len(data))
            self._nv_data[index] = (len(data), bytes(data))


# ---------------------------------------------------------------------------------------------
# Boot
# ---------------------------------------------------------------------------------------------
def soft_measured_boot(tpm: SoftTpm, media: BootMedia, settings: BootSettings, eventlog_path: Path,
                       banks: Sequence[str] = DEFAULT_BANKS) -> BootRecord:
    """:func:`firmware_sim.boot.measured_boot` on a soft TPM: power cycle, extend the boot's events,
    then write the event log (atomically, after the extends)."""
    log = build_boot_log(media, settings, banks)
    tpm.power_cycle()
    try:
        tpm.extend_events(log.events)
    except EdgeError:
        Path(eventlog_path).unlink(missing_ok=True)
        raise
    log.write(Path(eventlog_path))
    return BootRecord(events=log.events, eventlog=log.to_bytes(), pcrs=log.replay())

