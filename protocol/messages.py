"""Typed wire messages between agents and the fleet server (see docs/protocol.md).

Two envelopes:

* **Plain** (device -> server; authenticated by the device's TLS certificate and topic, evidence
  additionally by the TPM quote)::

      {"v": 1, "type": "<type>", "id": "<32 hex>", "ts": <ms>, "body": {...}}

* **Signed** (server -> device; verified with the server's pinned ECDSA P-256 key)::

      {"v": 1, "kid": "<16 hex>", "payload": "<base64 of canonical JSON>", "sig": "<base64>"}

  where the payload is ``{"v": 1, "type", "id", "ts", "aud": "<recipient>", "body": {...}}``.
  The signature covers the payload bytes exactly as carried (never a re-serialization).

Every message is a frozen dataclass with ``TYPE``, ``body()`` and a strict ``from_body()``:
unknown fields, wrong types, out-of-range sizes are refused with :class:`MessageError`.
"""

from __future__ import annotations

import hmac
import re
import secrets
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self, TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from protocol.encoding import JsonValue, b64decode, b64encode, canonical_bytes, decode_object
from protocol.errors import MessageError, SignatureError
from protocol.tpm.constants import BANK_TO_ALG, HASH_ALGS

VERSION = 1
MSG_ID_RE = re.compile(r"^[0-9a-f]{32}$")
KID_RE = re.compile(r"^[0-9a-f]{16}$")
DEVICE_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
AUDIENCE_RE = re.compile(r"^(claim:)?[a-z0-9][a-z0-9-]{0,62}$")

# Size limits per direction (bytes of the whole MQTT payload). The broker's max packet size is the
# outer bound; these are checked before parsing.
MAX_PLAIN_MESSAGE = 16 * 1024
MAX_EVIDENCE_MESSAGE = 768 * 1024
MAX_SIGNED_MESSAGE = 64 * 1024
MAX_EVENTLOG = 512 * 1024
MAX_REASONS = 64
MAX_REASON_LEN = 512


def new_message_id() -> str:
    return secrets.token_hex(16)


SigningKey = ec.EllipticCurvePrivateKey
VerifyKey = ec.EllipticCurvePublicKey
_ECDSA = ec.ECDSA(hashes.SHA256())


def key_id(public_key: VerifyKey) -> str:
    """Key id of a server signing key: first 8 bytes of SHA-256 of its DER SubjectPublicKeyInfo, hex."""
    import hashlib

    from cryptography.hazmat.primitives import serialization

    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()[:16]


def sign_bytes(key: SigningKey, data: bytes) -> bytes:
    """ECDSA P-256/SHA-256 signature as fixed-size r || s (64 bytes)."""
    r, s = decode_dss_signature(key.sign(data, _ECDSA))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def verify_bytes(key: VerifyKey, sig: bytes, data: bytes) -> None:
    """Verify an r || s signature made by :func:`sign_bytes`; raises :class:`SignatureError`."""
    if len(sig) != 64 or not isinstance(key.curve, ec.SECP256R1):
        raise SignatureError("malformed signature or wrong key type")
    der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
    try:
        key.verify(der, data, _ECDSA)
    except InvalidSignature:
        raise SignatureError("signature does not verify") from None


# --------------------------------------------------------------------------------------------------
# strict field reader
# --------------------------------------------------------------------------------------------------
class Fields:
    """Reads fields out of a decoded JSON object strictly; ``done()`` refuses leftovers."""

    def __init__(self, obj: JsonValue, where: str) -> None:
        if not isinstance(obj, dict):
            raise MessageError(f"{where}: expected an object")
        self._obj: dict[str, JsonValue] = dict(obj)
        self._where = where

    def _take(self, key: str, optional: bool) -> JsonValue:
        if key not in self._obj:
            if optional:
                return None
            raise MessageError(f"{self._where}.{key}: missing")
        return self._obj.pop(key)

    def text(self, key: str, *, max_len: int = 256, pattern: re.Pattern[str] | None = None,
             choices: Sequence[str] | None = None) -> str:
        v = self._take(key, False)
        if not isinstance(v, str):
            raise MessageError(f"{self._where}.{key}: expected a string")
        if len(v) > max_len:
            raise MessageError(f"{self._where}.{key}: longer than {max_len} characters")
        if pattern is not None and not pattern.fullmatch(v):
            raise MessageError(f"{self._where}.{key}: invalid value")
        if choices is not None and v not in choices:
            raise MessageError(f"{self._where}.{key}: must be one of {', '.join(choices)}")
        return v

    def integer(self, key: str, *, lo: int = 0, hi: int = 2**63 - 1) -> int:
        v = self._take(key, False)
        if not isinstance(v, int) or isinstance(v, bool):
            raise MessageError(f"{self._where}.{key}: expected an integer")
        if not lo <= v <= hi:
            raise MessageError(f"{self._where}.{key}: out of range")
        return v

    def flag(self, key: str) -> bool:
        v = self._take(key, False)
        if not isinstance(v, bool):
            raise MessageError(f"{self._where}.{key}: expected true or false")
        return v

    def blob(self, key: str, *, max_len: int, min_len: int = 0) -> bytes:
        data = b64decode(self._take(key, False), field=f"{self._where}.{key}", max_len=max_len)
        if not min_len <= len(data) <= max_len:
            raise MessageError(f"{self._where}.{key}: must be {min_len}..{max_len} bytes")
        return data

    def opt_text(self, key: str, *, max_len: int = 256, pattern: re.Pattern[str] | None = None,
                 default: str = "") -> str:
        """An optional string field: ``default`` when absent (encoders omit the field at its default)."""
        if key not in self._obj:
            return default
        return self.text(key, max_len=max_len, pattern=pattern)

    def opt_blob(self, key: str, *, max_len: int, min_len: int = 0) -> bytes | None:
        if key not in self._obj:
            return None
        return self.blob(key, max_len=max_len, min_len=min_len)

    def text_list(self, key: str, *, max_items: int = MAX_REASONS, max_len: int = MAX_REASON_LEN
                  ) -> tuple[str, ...]:
        v = self._take(key, False)
        if not isinstance(v, list) or len(v) > max_items:
            raise MessageError(f"{self._where}.{key}: expected a list of at most {max_items} strings")
        if not all(isinstance(s, str) and len(s) <= max_len for s in v):
            raise MessageError(f"{self._where}.{key}: items must be strings of at most {max_len} characters")
        return tuple(v)

    def raw(self, key: str) -> JsonValue:
        return self._take(key, False)

    def done(self) -> None:
        if self._obj:
            raise MessageError(f"{self._where}: unknown field {sorted(self._obj)[0]!r}")


# --------------------------------------------------------------------------------------------------
# PCR selections and values
# --------------------------------------------------------------------------------------------------
PcrValues = Mapping[str, Mapping[int, bytes]]
PcrSelection = Mapping[str, tuple[int, ...]]


def _bank(name: Any, where: str) -> str:
    if not isinstance(name, str) or name not in BANK_TO_ALG:
        raise MessageError(f"{where}: unknown PCR bank {name!r}")
    return name


def selection_to_json(sel: PcrSelection) -> dict[str, list[int]]:
    return {bank: sorted(set(idx)) for bank, idx in sel.items()}


def selection_from_json(v: JsonValue, where: str) -> dict[str, tuple[int, ...]]:
    if not isinstance(v, dict) or not v or len(v) > 8:
        raise MessageError(f"{where}: expected a non-empty object of banks")
    out: dict[str, tuple[int, ...]] = {}
    for bank, idx in v.items():
        _bank(bank, where)
        if (not isinstance(idx, list) or not idx or len(idx) > 24
                or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 24 for i in idx)
                or len(set(idx)) != len(idx)):
            raise MessageError(f"{where}.{bank}: expected distinct PCR indices 0..23")
        out[bank] = tuple(sorted(idx))
    return out


def pcrs_to_json(values: PcrValues) -> dict[str, dict[str, str]]:
    return {bank: {str(i): d.hex() for i, d in sorted(v.items())} for bank, v in values.items()}


def pcrs_from_json(v: JsonValue, where: str) -> dict[str, dict[int, bytes]]:
    """Parse ``{"<bank>": {"<index>": "<hex>"}}`` strictly (digest sizes checked per bank)."""
    if not isinstance(v, dict) or len(v) > 8:
        raise MessageError(f"{where}: expected an object of banks")
    out: dict[str, dict[int, bytes]] = {}
    for bank, entries in v.items():
        size = HASH_ALGS[BANK_TO_ALG[_bank(bank, where)]][1]
        if not isinstance(entries, dict) or len(entries) > 24:
            raise MessageError(f"{where}.{bank}: expected an object of PCR values")
        vals: dict[int, bytes] = {}
        for k, hexval in entries.items():
            if not (isinstance(k, str) and k.isdigit() and len(k) <= 2 and int(k) < 24):
                raise MessageError(f"{where}.{bank}: invalid PCR index {k!r}")
            if not isinstance(hexval, str) or len(hexval) != 2 * size:
                raise MessageError(f"{where}.{bank}.{k}: expected {size} bytes of hex")
            try:
                vals[int(k)] = bytes.fromhex(hexval)
            except ValueError:
                raise MessageError(f"{where}.{bank}.{k}: invalid hex") from None
        out[bank] = vals
    return out


# --------------------------------------------------------------------------------------------------
# message types
# --------------------------------------------------------------------------------------------------
class Message(ABC):
    """Base of all message bodies: ``TYPE``, ``body()`` and a strict ``from_body()``."""

    __slots__ = ()
    TYPE: ClassVar[str]

    @abstractmethod
    def body(self) -> dict[str, JsonValue]:
        """The message body as JSON values (bytes as base64)."""

    @classmethod
    @abstractmethod
    def from_body(cls, f: Fields) -> Self:
        """Build the message from a strict field reader (the caller calls ``f.done()``)."""


M = TypeVar("M", bound=Message)
REGISTRY: dict[str, type[Message]] = {}


def register(cls: type[M]) -> type[M]:
    REGISTRY[cls.TYPE] = cls
    return cls


# ---- enrollment -----------------------------------------------------------------------------------
@register
@dataclass(frozen=True, slots=True)
class EnrollRequest(Message):
    """Device -> server (claim credential): identity evidence to enroll."""

    TYPE: ClassVar[str] = "enroll.request"
    ek_cert: bytes
    ek_public: bytes
    ak_public: bytes
    csr: bytes
    device_class: str
    firmware_version: str

    def body(self) -> dict[str, JsonValue]:
        return {"ek_cert": b64encode(self.ek_cert), "ek_public": b64encode(self.ek_public),
                "ak_public": b64encode(self.ak_public), "csr": b64encode(self.csr),
                "device_class": self.device_class, "firmware_version": self.firmware_version}

    @classmethod
    def from_body(cls, f: Fields) -> EnrollRequest:
        return cls(ek_cert=f.blob("ek_cert", min_len=64, max_len=4096),
                   ek_public=f.blob("ek_public", min_len=16, max_len=1024),
                   ak_public=f.blob("ak_public", min_len=16, max_len=1024),
                   csr=f.blob("csr", min_len=64, max_len=4096),
                   device_class=f.text("device_class", max_len=64, pattern=NAME_RE),
                   firmware_version=f.text("firmware_version", max_len=64, pattern=NAME_RE))


NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")


@register
@dataclass(frozen=True, slots=True)
class EnrollChallenge(Message):
    """Server -> device: MakeCredential output the device's TPM must activate."""

    TYPE: ClassVar[str] = "enroll.challenge"
    request_id: str
    credential_blob: bytes   # marshalled TPM2B_ID_OBJECT
    encrypted_secret: bytes  # marshalled TPM2B_ENCRYPTED_SECRET

    def body(self) -> dict[str, JsonValue]:
        return {"request_id": self.request_id, "credential_blob": b64encode(self.credential_blob),
                "encrypted_secret": b64encode(self.encrypted_secret)}

    @classmethod
    def from_body(cls, f: Fields) -> EnrollChallenge:
        return cls(request_id=f.text("request_id", pattern=MSG_ID_RE),
                   credential_blob=f.blob("credential_blob", min_len=4, max_len=1024),
                   encrypted_secret=f.blob("encrypted_secret", min_len=4, max_len=1024))


@register
@dataclass(frozen=True, slots=True)
class EnrollProof(Message):
    """Device -> server: proof that the TPM holding the EK activated the credential for the AK.

    ``proof`` = HMAC-SHA256(key=activated secret, msg=b"edge-attest/enroll-proof/v1" || request_id).
    """

    TYPE: ClassVar[str] = "enroll.proof"
    request_id: str
    proof: bytes

    def body(self) -> dict[str, JsonValue]:
        return {"request_id": self.request_id, "proof": b64encode(self.proof)}

    @classmethod
    def from_body(cls, f: Fields) -> EnrollProof:
        return cls(request_id=f.text("request_id", pattern=MSG_ID_RE),
                   proof=f.blob("proof", min_len=32, max_len=32))


def enroll_proof(secret: bytes, request_id: str) -> bytes:
    return hmac.new(secret, b"edge-attest/enroll-proof/v1" + request_id.encode(), "sha256").digest()


ENROLL_STATUSES = ("admitted", "pending", "rejected")


@register
@dataclass(frozen=True, slots=True)
class EnrollResult(Message):
    """Server -> device: the enrollment outcome; when admitted, the device's MQTT certificate."""

    TYPE: ClassVar[str] = "enroll.result"
    request_id: str
    status: str
    reasons: tuple[str, ...] = ()
    device_cert: bytes | None = None  # DER

    def body(self) -> dict[str, JsonValue]:
        out: dict[str, JsonValue] = {"request_id": self.request_id, "status": self.status,
                                     "reasons": list(self.reasons)}
        if self.device_cert is not None:
            out["device_cert"] = b64encode(self.device_cert)
        return out

    @classmethod
    def from_body(cls, f: Fields) -> EnrollResult:
        return cls(request_id=f.text("request_id", pattern=MSG_ID_RE),
                   status=f.text("status", choices=ENROLL_STATUSES),
                   reasons=f.text_list("reasons"),
                   device_cert=f.opt_blob("device_cert", min_len=64, max_len=4096))


# ---- attestation ----------------------------------------------------------------------------------
HELLO_REASONS = ("boot", "reconnect", "lease", "manual")


@register
@dataclass(frozen=True, slots=True)
class AttestRequest(Message):
    """Device -> server: please challenge me now (after boot or reconnect: push attestation)."""

    TYPE: ClassVar[str] = "attest.request"
    reason: str
    agent_version: str = ""

    def body(self) -> dict[str, JsonValue]:
        return {"reason": self.reason, "agent_version": self.agent_version}

    @classmethod
    def from_body(cls, f: Fields) -> AttestRequest:
        return cls(reason=f.text("reason", choices=HELLO_REASONS),
                   agent_version=f.text("agent_version", max_len=64))


@register
@dataclass(frozen=True, slots=True)
class Challenge(Message):
    """Server -> device: quote these PCRs with this nonce before the deadline.

    ``log_offset``/``log_sha256``: how much of this boot's event log the server already holds and the
    SHA-256 of that prefix. If the device's log starts with exactly that prefix it sends only the
    bytes after it; otherwise it sends the whole log (offset 0).
    """

    TYPE: ClassVar[str] = "challenge"
    challenge_id: str
    nonce: bytes
    selection: PcrSelection
    deadline: int  # ms since the epoch
    log_offset: int = 0
    log_sha256: bytes = b""

    def body(self) -> dict[str, JsonValue]:
        return {"challenge_id": self.challenge_id, "nonce": b64encode(self.nonce),
                "selection": selection_to_json(self.selection), "deadline": self.deadline,
                "log_offset": self.log_offset, "log_sha256": b64encode(self.log_sha256)}

    @classmethod
    def from_body(cls, f: Fields) -> Challenge:
        return cls(challenge_id=f.text("challenge_id", pattern=MSG_ID_RE),
                   nonce=f.blob("nonce", min_len=32, max_len=32),
                   selection=selection_from_json(f.raw("selection"), "challenge.selection"),
                   deadline=f.integer("deadline"),
                   log_offset=f.integer("log_offset", hi=MAX_EVENTLOG * 64),
                   log_sha256=f.blob("log_sha256", max_len=32))


@register
@dataclass(frozen=True, slots=True)
class Evidence(Message):
    """Device -> server: the answer to a challenge.

    ``attest``/``signature``: TPMS_ATTEST and TPMT_SIGNATURE exactly as the TPM produced them.
    ``eventlog``: the boot event log bytes from ``eventlog_offset`` on (0 = the whole log).
    """

    TYPE: ClassVar[str] = "evidence"
    challenge_id: str
    attest: bytes
    signature: bytes
    pcrs: PcrValues
    eventlog_offset: int
    eventlog: bytes

    def body(self) -> dict[str, JsonValue]:
        return {"challenge_id": self.challenge_id, "attest": b64encode(self.attest),
                "signature": b64encode(self.signature), "pcrs": pcrs_to_json(self.pcrs),
                "eventlog_offset": self.eventlog_offset, "eventlog": b64encode(self.eventlog)}

    @classmethod
    def from_body(cls, f: Fields) -> Evidence:
        return cls(challenge_id=f.text("challenge_id", pattern=MSG_ID_RE),
                   attest=f.blob("attest", min_len=16, max_len=2048),
                   signature=f.blob("signature", min_len=8, max_len=1024),
                   pcrs=pcrs_from_json(f.raw("pcrs"), "evidence.pcrs"),
                   eventlog_offset=f.integer("eventlog_offset", hi=MAX_EVENTLOG * 64),
                   eventlog=f.blob("eventlog", max_len=MAX_EVENTLOG))


VERDICTS = ("trusted", "untrusted")
TARGET_PATH_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}(/[a-z0-9][a-z0-9._-]{0,63}){0,3}$")
"""A TUF target path of this fleet, e.g. ``firmware/edge-camera/1.3.0.fwb`` (no ``..``, no leading ``/``)."""


@register
@dataclass(frozen=True, slots=True)
class AttestationResult(Message):
    """Server -> device (signed): the appraisal outcome of one piece of evidence."""

    TYPE: ClassVar[str] = "attestation.result"
    challenge_id: str
    verdict: str
    reasons: tuple[str, ...]
    expires: int  # ms since the epoch: the verdict is stale after this
    evidence_sha256: bytes
    lease_until: int = 0  # ms; a trusted verdict renews the device's model leases until then (0: none)
    release: str = ""  # the release (TUF target path) whose reference values the evidence matched; "": none

    def body(self) -> dict[str, JsonValue]:
        out: dict[str, JsonValue] = {
            "challenge_id": self.challenge_id, "verdict": self.verdict, "reasons": list(self.reasons),
            "expires": self.expires, "evidence_sha256": b64encode(self.evidence_sha256),
            "lease_until": self.lease_until}
        if self.release:
            out["release"] = self.release
        return out

    @classmethod
    def from_body(cls, f: Fields) -> AttestationResult:
        return cls(challenge_id=f.text("challenge_id", pattern=MSG_ID_RE),
                   verdict=f.text("verdict", choices=VERDICTS),
                   reasons=f.text_list("reasons"),
                   expires=f.integer("expires"),
                   evidence_sha256=f.blob("evidence_sha256", min_len=32, max_len=32),
                   lease_until=f.integer("lease_until"),
                   release=f.opt_text("release", max_len=200, pattern=TARGET_PATH_RE))


REVOCATION_STATES = ("untrusted", "revoked", "quarantined")


@register
@dataclass(frozen=True, slots=True)
class Revocation(Message):
    """Server -> device (signed): stop trusting yourself; drop keys and refuse inference."""

    TYPE: ClassVar[str] = "revocation"
    state: str
    reasons: tuple[str, ...]

    def body(self) -> dict[str, JsonValue]:
        return {"state": self.state, "reasons": list(self.reasons)}

    @classmethod
    def from_body(cls, f: Fields) -> Revocation:
        return cls(state=f.text("state", choices=REVOCATION_STATES), reasons=f.text_list("reasons"))


# ---- model protection -----------------------------------------------------------------------------
MODEL_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
VERSION_RE = re.compile(r"^(0|[1-9][0-9]{0,8})\.(0|[1-9][0-9]{0,8})\.(0|[1-9][0-9]{0,8})$")
OUTPUT_MODES = ("full", "topk", "label")
MAX_CHUNK = 256 * 1024
MAX_CHUNK_MESSAGE = MAX_CHUNK + 4096
WRAP_LABEL = b"EDGE-ATTEST MODEL KEY\0"  # OAEP label for data keys (TPM2_RSA_Decrypt wants a NUL end)


def _opt_int(f: Fields, key: str, hi: int = 2**62) -> int | None:
    v = f.raw(key)
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= hi:
        raise MessageError(f"{key}: expected null or a non-negative integer")
    return v


@dataclass(frozen=True, slots=True)
class ModelPolicy:
    """The usage policy of a model, set by the server and carried inside the signed key release.

    ``output_mode``: "full" (all scores, rounded to ``decimals``), "topk" (``k`` labels with scores)
    or "label" (argmax only). Rates are per client app on the device; quotas count samples (batch
    rows): per lease, per device per UTC day, per client per UTC day (``None``: unlimited).
    """

    output_mode: str = "label"
    k: int = 3
    decimals: int = 2
    labels: tuple[str, ...] = ()
    max_batch: int = 64
    client_rate: int = 10          # requests per second
    client_burst: int = 20
    client_daily_quota: int | None = None
    device_daily_quota: int | None = None
    lease_quota: int | None = None
    block_on_alarm: bool = False

    def to_json(self) -> dict[str, JsonValue]:
        return {"output_mode": self.output_mode, "k": self.k, "decimals": self.decimals,
                "labels": list(self.labels), "max_batch": self.max_batch, "client_rate": self.client_rate,
                "client_burst": self.client_burst, "client_daily_quota": self.client_daily_quota,
                "device_daily_quota": self.device_daily_quota, "lease_quota": self.lease_quota,
                "block_on_alarm": self.block_on_alarm}

    @classmethod
    def from_json(cls, obj: JsonValue, where: str = "policy") -> ModelPolicy:
        f = Fields(obj, where)
        out = cls(output_mode=f.text("output_mode", choices=OUTPUT_MODES),
                  k=f.integer("k", lo=1, hi=1000),
                  decimals=f.integer("decimals", lo=0, hi=6),
                  labels=f.text_list("labels", max_items=10_000, max_len=128),
                  max_batch=f.integer("max_batch", lo=1, hi=65_536),
                  client_rate=f.integer("client_rate", lo=1, hi=1_000_000),
                  client_burst=f.integer("client_burst", lo=1, hi=1_000_000),
                  client_daily_quota=_opt_int(f, "client_daily_quota"),
                  device_daily_quota=_opt_int(f, "device_daily_quota"),
                  lease_quota=_opt_int(f, "lease_quota"),
                  block_on_alarm=f.flag("block_on_alarm"))
        f.done()
        return out


@dataclass(frozen=True, slots=True)
class ModelRef:
    """A model version a device is entitled to; ``package_sha256`` is over the whole package file."""

    name: str
    version: str
    size: int
    package_sha256: bytes

    def to_json(self) -> dict[str, JsonValue]:
        return {"name": self.name, "version": self.version, "size": self.size,
                "package_sha256": b64encode(self.package_sha256)}

    @classmethod
    def from_json(cls, obj: JsonValue, where: str) -> ModelRef:
        f = Fields(obj, where)
        out = cls(name=f.text("name", max_len=64, pattern=MODEL_NAME_RE),
                  version=f.text("version", max_len=32, pattern=VERSION_RE),
                  size=f.integer("size", lo=1, hi=8 << 30),
                  package_sha256=f.blob("package_sha256", min_len=32, max_len=32))
        f.done()
        return out


@register
@dataclass(frozen=True, slots=True)
class ModelOffer(Message):
    """Server -> device (signed): the model versions this device is entitled to now."""

    TYPE: ClassVar[str] = "model.offer"
    models: tuple[ModelRef, ...]

    def body(self) -> dict[str, JsonValue]:
        return {"models": [m.to_json() for m in self.models]}

    @classmethod
    def from_body(cls, f: Fields) -> ModelOffer:
        items = f.raw("models")
        if not isinstance(items, list) or len(items) > 64:
            raise MessageError("model.offer.models: expected a list of at most 64 models")
        return cls(models=tuple(ModelRef.from_json(m, "model.offer.models[]") for m in items))


@register
@dataclass(frozen=True, slots=True)
class ModelFetch(Message):
    """Device -> server: send me ``length`` bytes of this package from ``offset``."""

    TYPE: ClassVar[str] = "model.fetch"
    name: str
    version: str
    offset: int
    length: int

    def body(self) -> dict[str, JsonValue]:
        return {"name": self.name, "version": self.version, "offset": self.offset, "length": self.length}

    @classmethod
    def from_body(cls, f: Fields) -> ModelFetch:
        return cls(name=f.text("name", max_len=64, pattern=MODEL_NAME_RE),
                   version=f.text("version", max_len=32, pattern=VERSION_RE),
                   offset=f.integer("offset", hi=8 << 30),
                   length=f.integer("length", lo=1, hi=MAX_CHUNK))


@register
@dataclass(frozen=True, slots=True)
class KeyRequest(Message):
    """Device -> server: release this model's data key to my TPM-resident, PCR-bound key.

    ``key_public`` is the bound key's TPM2B_PUBLIC; ``certify_attest``/``certify_signature`` are the
    TPMS_ATTEST (type CERTIFY) and TPMT_SIGNATURE of TPM2_Certify of that key by the device's AK, with
    qualifying data :func:`key_request_qualifier`.
    """

    TYPE: ClassVar[str] = "key.request"
    name: str
    version: str
    key_public: bytes
    certify_attest: bytes
    certify_signature: bytes

    def body(self) -> dict[str, JsonValue]:
        return {"name": self.name, "version": self.version, "key_public": b64encode(self.key_public),
                "certify_attest": b64encode(self.certify_attest),
                "certify_signature": b64encode(self.certify_signature)}

    @classmethod
    def from_body(cls, f: Fields) -> KeyRequest:
        return cls(name=f.text("name", max_len=64, pattern=MODEL_NAME_RE),
                   version=f.text("version", max_len=32, pattern=VERSION_RE),
                   key_public=f.blob("key_public", min_len=16, max_len=1024),
                   certify_attest=f.blob("certify_attest", min_len=16, max_len=2048),
                   certify_signature=f.blob("certify_signature", min_len=8, max_len=1024))


def key_request_qualifier(device_id: str, name: str, version: str) -> bytes:
    """TPM2_Certify qualifying data of a key request: binds the certification to its purpose."""
    import hashlib

    return hashlib.sha256(f"edge-attest/key-request/v1\0{device_id}\0{name}\0{version}".encode()).digest()


@register
@dataclass(frozen=True, slots=True)
class KeyRelease(Message):
    """Server -> device (signed): the model's data key wrapped (RSA-OAEP-SHA256, label
    :data:`WRAP_LABEL`) to the TPM key named ``key_name``, with the lease and the usage policy."""

    TYPE: ClassVar[str] = "key.release"
    name: str
    version: str
    key_name: bytes
    wrapped_key: bytes
    lease_id: str
    lease_expires: int  # ms
    policy: ModelPolicy

    def body(self) -> dict[str, JsonValue]:
        return {"name": self.name, "version": self.version, "key_name": b64encode(self.key_name),
                "wrapped_key": b64encode(self.wrapped_key), "lease_id": self.lease_id,
                "lease_expires": self.lease_expires, "policy": self.policy.to_json()}

    @classmethod
    def from_body(cls, f: Fields) -> KeyRelease:
        return cls(name=f.text("name", max_len=64, pattern=MODEL_NAME_RE),
                   version=f.text("version", max_len=32, pattern=VERSION_RE),
                   key_name=f.blob("key_name", min_len=34, max_len=66),
                   wrapped_key=f.blob("wrapped_key", min_len=128, max_len=512),
                   lease_id=f.text("lease_id", pattern=MSG_ID_RE),
                   lease_expires=f.integer("lease_expires"),
                   policy=ModelPolicy.from_json(f.raw("policy"), "key.release.policy"))


@register
@dataclass(frozen=True, slots=True)
class KeyDenied(Message):
    """Server -> device (signed): no key for this model now, and why."""

    TYPE: ClassVar[str] = "key.denied"
    name: str
    version: str
    reasons: tuple[str, ...]

    def body(self) -> dict[str, JsonValue]:
        return {"name": self.name, "version": self.version, "reasons": list(self.reasons)}

    @classmethod
    def from_body(cls, f: Fields) -> KeyDenied:
        return cls(name=f.text("name", max_len=64, pattern=MODEL_NAME_RE),
                   version=f.text("version", max_len=32, pattern=VERSION_RE),
                   reasons=f.text_list("reasons"))


@dataclass(frozen=True, slots=True)
class ClientUsage:
    """Per client app: samples served and refused in the period, and the extraction monitor's view."""

    client: str
    served: int
    refused: int
    statistic: float | None = None  # not on the wire as a float: sent as micro-units (int)
    alarm: bool = False

    def to_json(self) -> dict[str, JsonValue]:
        stat = None if self.statistic is None else round(self.statistic * 1_000_000)
        return {"client": self.client, "served": self.served, "refused": self.refused,
                "statistic_micro": stat, "alarm": self.alarm}

    @classmethod
    def from_json(cls, obj: JsonValue, where: str) -> ClientUsage:
        f = Fields(obj, where)
        client = f.text("client", max_len=64)
        served = f.integer("served", hi=2**40)
        refused = f.integer("refused", hi=2**40)
        stat = _opt_int(f, "statistic_micro", hi=1_000_000)
        alarm = f.flag("alarm")
        f.done()
        return cls(client=client, served=served, refused=refused,
                   statistic=None if stat is None else stat / 1_000_000, alarm=alarm)


@register
@dataclass(frozen=True, slots=True)
class Telemetry(Message):
    """Device -> server: usage of one model over ``[since, until)`` (ms) and extraction statistics."""

    TYPE: ClassVar[str] = "telemetry"
    name: str
    version: str
    since: int
    until: int
    served: int
    refused: int
    clients: tuple[ClientUsage, ...]

    def body(self) -> dict[str, JsonValue]:
        return {"name": self.name, "version": self.version, "since": self.since, "until": self.until,
                "served": self.served, "refused": self.refused,
                "clients": [c.to_json() for c in self.clients]}

    @classmethod
    def from_body(cls, f: Fields) -> Telemetry:
        name = f.text("name", max_len=64, pattern=MODEL_NAME_RE)
        version = f.text("version", max_len=32, pattern=VERSION_RE)
        since = f.integer("since")
        until = f.integer("until")
        served = f.integer("served", hi=2**40)
        refused = f.integer("refused", hi=2**40)
        items = f.raw("clients")
        if not isinstance(items, list) or len(items) > 256:
            raise MessageError("telemetry.clients: expected a list of at most 256 clients")
        return cls(name=name, version=version, since=since, until=until, served=served, refused=refused,
                   clients=tuple(ClientUsage.from_json(c, "telemetry.clients[]") for c in items))


MODEL_LOAD_STATES = ("loaded", "failed")
"""What a device reports of one model version it tried to open: onnxruntime loaded it, or refused it."""
MAX_LOAD_ERROR = 512
RUNTIME_VERSION_RE = re.compile(r"^[0-9][0-9A-Za-z.+-]{0,31}$")
"""An onnxruntime version string as ``onnxruntime.__version__`` gives it (``1.31.1``, ``1.32.0.dev1``)."""


@dataclass(frozen=True, slots=True)
class ModelLoad:
    """One model version's load outcome on the device; ``error`` (only when ``failed``) is
    onnxruntime's own reason, one line, at most :data:`MAX_LOAD_ERROR` characters."""

    name: str
    version: str
    state: str
    error: str = ""

    def to_json(self) -> dict[str, JsonValue]:
        out: dict[str, JsonValue] = {"name": self.name, "version": self.version, "state": self.state}
        if self.error:
            out["error"] = self.error
        return out

    @classmethod
    def from_json(cls, obj: JsonValue, where: str) -> ModelLoad:
        f = Fields(obj, where)
        out = cls(name=f.text("name", max_len=64, pattern=MODEL_NAME_RE),
                  version=f.text("version", max_len=32, pattern=VERSION_RE),
                  state=f.text("state", choices=MODEL_LOAD_STATES),
                  error=f.opt_text("error", max_len=MAX_LOAD_ERROR))
        f.done()
        if out.state == "loaded" and out.error:
            raise MessageError(f"{where}.error: a loaded model carries no error")
        if out.state == "failed" and not out.error.strip():
            raise MessageError(f"{where}.error: a failed load must say why")
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in out.error):
            raise MessageError(f"{where}.error: must be one line without control characters")
        return out


@register
@dataclass(frozen=True, slots=True)
class ModelStatus(Message):
    """Device -> server (topic kind ``model-status``): the agent's onnxruntime version and, per model
    version it tried to open since boot, whether onnxruntime loaded it (and why not). Sent once per
    connection and whenever a load succeeds or fails."""

    TYPE: ClassVar[str] = "model.status"
    runtime: str
    models: tuple[ModelLoad, ...] = ()

    def body(self) -> dict[str, JsonValue]:
        return {"runtime": self.runtime, "models": [m.to_json() for m in self.models]}

    @classmethod
    def from_body(cls, f: Fields) -> ModelStatus:
        runtime = f.text("runtime", max_len=32, pattern=RUNTIME_VERSION_RE)
        items = f.raw("models")
        if not isinstance(items, list) or len(items) > 64:
            raise MessageError("model.status.models: expected a list of at most 64 models")
        models = tuple(ModelLoad.from_json(m, "model.status.models[]") for m in items)
        if len({(m.name, m.version) for m in models}) != len(models):
            raise MessageError("model.status.models: a model version is listed twice")
        return cls(runtime=runtime, models=models)


# ---- signed updates (docs/updates.md) ------------------------------------------------------------
# Topic kinds: server -> device ``update`` (UpdateAssignment, signed) and ``tuf-chunk`` (binary TufChunk
# frame); device -> server ``update-status`` (UpdateStatus) and ``tuf-fetch`` (TufFetch).
UPDATE_KINDS = ("firmware", "model")
UPDATE_STATES = ("downloading", "installed", "rebooting", "committed", "rolled_back", "failed")
"""Installation progress a device reports; ``rolled_back`` and ``failed`` carry a reason."""
TUF_PATH_RE = re.compile(r"^(metadata|targets)(/[A-Za-z0-9][A-Za-z0-9._-]{0,127}){1,4}$")
"""A file of the update repository, relative to its root: ``metadata/3.root.json``,
``metadata/timestamp.json``, ``targets/firmware/edge-camera/<sha256>.1.3.0.fwb`` (no ``..``)."""
MAX_UPDATE_REASON = 512


@register
@dataclass(frozen=True, slots=True)
class UpdateAssignment(Message):
    """Server -> device (signed): install this target of the update repository.

    The device still verifies everything through TUF: this message only says *which* target (like
    Uptane's Director). ``deadline`` (ms since the epoch): commit by then, else fall back.
    """

    TYPE: ClassVar[str] = "update.assign"
    assignment_id: str
    kind: str
    target: str
    version: str
    deadline: int

    def body(self) -> dict[str, JsonValue]:
        return {"assignment_id": self.assignment_id, "kind": self.kind, "target": self.target,
                "version": self.version, "deadline": self.deadline}

    @classmethod
    def from_body(cls, f: Fields) -> UpdateAssignment:
        return cls(assignment_id=f.text("assignment_id", pattern=MSG_ID_RE),
                   kind=f.text("kind", choices=UPDATE_KINDS),
                   target=f.text("target", max_len=200, pattern=TARGET_PATH_RE),
                   version=f.text("version", max_len=32, pattern=VERSION_RE),
                   deadline=f.integer("deadline"))


@register
@dataclass(frozen=True, slots=True)
class UpdateStatus(Message):
    """Device -> server: installation progress of one assignment (see :data:`UPDATE_STATES`)."""

    TYPE: ClassVar[str] = "update.status"
    assignment_id: str
    target: str
    state: str
    from_version: str
    to_version: str
    reason: str = ""

    def body(self) -> dict[str, JsonValue]:
        return {"assignment_id": self.assignment_id, "target": self.target, "state": self.state,
                "from_version": self.from_version, "to_version": self.to_version, "reason": self.reason}

    @classmethod
    def from_body(cls, f: Fields) -> UpdateStatus:
        return cls(assignment_id=f.text("assignment_id", pattern=MSG_ID_RE),
                   target=f.text("target", max_len=200, pattern=TARGET_PATH_RE),
                   state=f.text("state", choices=UPDATE_STATES),
                   from_version=f.text("from_version", max_len=32),
                   to_version=f.text("to_version", max_len=32, pattern=VERSION_RE),
                   reason=f.text("reason", max_len=MAX_UPDATE_REASON))


@register
@dataclass(frozen=True, slots=True)
class TufFetch(Message):
    """Device -> server: send ``length`` bytes from ``offset`` of update-repository file ``path``."""

    TYPE: ClassVar[str] = "tuf.fetch"
    request_id: str
    path: str
    offset: int
    length: int

    def body(self) -> dict[str, JsonValue]:
        return {"request_id": self.request_id, "path": self.path, "offset": self.offset,
                "length": self.length}

    @classmethod
    def from_body(cls, f: Fields) -> TufFetch:
        path = f.text("path", max_len=300, pattern=TUF_PATH_RE)
        if ".." in path.split("/"):
            raise MessageError("tuf.fetch.path: invalid value")
        return cls(request_id=f.text("request_id", pattern=MSG_ID_RE), path=path,
                   offset=f.integer("offset", hi=8 << 30), length=f.integer("length", lo=1, hi=MAX_CHUNK))


TUF_CHUNK_STATUSES = ("ok", "not_found", "error")
_TUF_CHUNK_MAGIC = b"ETC1"


@dataclass(frozen=True, slots=True)
class TufChunk:
    """Server -> device (binary frame, unsigned: TUF verifies the bytes): part of a repository file.

    ``status`` ``ok``: ``data`` = bytes ``[offset, offset + len(data))`` of a file of ``total`` bytes
    (``data`` may be empty only for an empty file); ``not_found``/``error``: no data, ``total`` 0.
    """

    request_id: str
    path: str
    status: str
    offset: int
    total: int
    data: bytes


def encode_tuf_chunk(chunk: TufChunk) -> bytes:
    header = canonical_bytes({"v": VERSION, "type": "tuf.chunk", "request_id": chunk.request_id,
                              "path": chunk.path, "status": chunk.status, "offset": chunk.offset,
                              "total": chunk.total})
    return _TUF_CHUNK_MAGIC + len(header).to_bytes(4, "big") + header + chunk.data


def decode_tuf_chunk(raw: bytes) -> TufChunk:
    """Strictly decode a TUF chunk frame (sizes bounded; TUF checks lengths and hashes of the file)."""
    if len(raw) > MAX_CHUNK_MESSAGE or len(raw) < 8 or raw[:4] != _TUF_CHUNK_MAGIC:
        raise MessageError("tuf chunk: bad frame")
    hlen = int.from_bytes(raw[4:8], "big")
    if hlen > 1024 or 8 + hlen > len(raw):
        raise MessageError("tuf chunk: bad header length")
    f = Fields(decode_object(raw[8 : 8 + hlen], max_size=1024), "tuf.chunk")
    if f.integer("v", hi=1000) != VERSION or f.text("type", max_len=16) != "tuf.chunk":
        raise MessageError("tuf chunk: unsupported version or type")
    chunk = TufChunk(request_id=f.text("request_id", pattern=MSG_ID_RE),
                     path=f.text("path", max_len=300, pattern=TUF_PATH_RE),
                     status=f.text("status", choices=TUF_CHUNK_STATUSES),
                     offset=f.integer("offset", hi=8 << 30), total=f.integer("total", hi=8 << 30),
                     data=raw[8 + hlen :])
    f.done()
    if len(chunk.data) > MAX_CHUNK or chunk.offset + len(chunk.data) > chunk.total:
        raise MessageError("tuf chunk: data out of range")
    if chunk.status != "ok" and (chunk.data or chunk.total):
        raise MessageError("tuf chunk: a refusal carries no data")
    return chunk


# ---- model chunks: binary framing ------------------------------------------------------------------
# A package chunk is not a signed JSON message: base64 inside a base64 envelope would nearly double
# 100 MB downloads. Its integrity comes from the package itself (signed manifest with the SHA-256 of
# the ciphertext, AES-GCM per chunk), which the agent verifies before any key is requested.
# Frame: b"EAC1" | u32 header length | canonical JSON header | data.
_CHUNK_MAGIC = b"EAC1"


@dataclass(frozen=True, slots=True)
class ModelChunk:
    """Server -> device: ``data`` = package bytes ``[offset, offset + len(data))`` of ``total``."""

    name: str
    version: str
    offset: int
    total: int
    data: bytes


def encode_chunk(chunk: ModelChunk) -> bytes:
    header = canonical_bytes({"v": VERSION, "type": "model.chunk", "name": chunk.name,
                              "version": chunk.version, "offset": chunk.offset, "total": chunk.total})
    return _CHUNK_MAGIC + len(header).to_bytes(4, "big") + header + chunk.data


def decode_chunk(raw: bytes) -> ModelChunk:
    """Strictly decode a chunk frame (sizes bounded; the package digest is checked by the caller)."""
    if len(raw) > MAX_CHUNK_MESSAGE or len(raw) < 8 or raw[:4] != _CHUNK_MAGIC:
        raise MessageError("model chunk: bad frame")
    hlen = int.from_bytes(raw[4:8], "big")
    if hlen > 1024 or 8 + hlen > len(raw):
        raise MessageError("model chunk: bad header length")
    f = Fields(decode_object(raw[8 : 8 + hlen], max_size=1024), "model.chunk")
    if f.integer("v", hi=1000) != VERSION or f.text("type", max_len=16) != "model.chunk":
        raise MessageError("model chunk: unsupported version or type")
    chunk = ModelChunk(name=f.text("name", max_len=64, pattern=MODEL_NAME_RE),
                       version=f.text("version", max_len=32, pattern=VERSION_RE),
                       offset=f.integer("offset", hi=8 << 30), total=f.integer("total", lo=1, hi=8 << 30),
                       data=raw[8 + hlen :])
    f.done()
    if not chunk.data or len(chunk.data) > MAX_CHUNK or chunk.offset + len(chunk.data) > chunk.total:
        raise MessageError("model chunk: data out of range")
    return chunk


# --------------------------------------------------------------------------------------------------
# envelopes
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Envelope:
    """A decoded message with its envelope metadata. ``raw`` is the bytes as received."""

    type: str
    id: str
    ts: int
    message: Message
    raw: bytes = field(repr=False)
    aud: str | None = None


def _envelope_fields(obj: dict[str, JsonValue], where: str) -> tuple[Fields, str, str, int]:
    f = Fields(obj, where)
    v = f.integer("v", lo=0, hi=1000)
    if v != VERSION:
        raise MessageError(f"{where}: unsupported version {v}")
    mtype = f.text("type", max_len=64)
    msg_id = f.text("id", pattern=MSG_ID_RE)
    ts = f.integer("ts")
    return f, mtype, msg_id, ts


def _parse_body(mtype: str, body: JsonValue, allowed: Sequence[type[Message]] | None) -> Message:
    cls = REGISTRY.get(mtype)
    if cls is None or (allowed is not None and cls not in allowed):
        raise MessageError(f"unexpected message type {mtype!r}")
    bf = Fields(body, mtype)
    msg = cls.from_body(bf)
    bf.done()
    return msg


def encode_plain(msg: Message, *, ts: int, msg_id: str | None = None) -> bytes:
    """Encode a device -> server message."""
    return canonical_bytes({"v": VERSION, "type": msg.TYPE, "id": msg_id or new_message_id(), "ts": ts,
                            "body": msg.body()})


def decode_plain(data: bytes, *, allowed: Sequence[type[Message]] | None = None,
                 max_size: int = MAX_PLAIN_MESSAGE) -> Envelope:
    """Strictly decode a device -> server message of one of the ``allowed`` types."""
    obj = decode_object(data, max_size=max_size)
    f, mtype, msg_id, ts = _envelope_fields(obj, "message")
    body = f.raw("body")
    f.done()
    return Envelope(type=mtype, id=msg_id, ts=ts, message=_parse_body(mtype, body, allowed), raw=data)


def encode_signed(msg: Message, *, key: SigningKey, kid: str, aud: str, ts: int,
                  msg_id: str | None = None) -> bytes:
    """Encode and sign a server -> device message for recipient ``aud``."""
    payload = canonical_bytes({"v": VERSION, "type": msg.TYPE, "id": msg_id or new_message_id(), "ts": ts,
                               "aud": aud, "body": msg.body()})
    return canonical_bytes({"v": VERSION, "kid": kid, "payload": b64encode(payload),
                            "sig": b64encode(sign_bytes(key, payload))})


def decode_signed(data: bytes, *, keys: Mapping[str, VerifyKey], aud: str,
                  allowed: Sequence[type[Message]] | None = None,
                  max_size: int = MAX_SIGNED_MESSAGE) -> Envelope:
    """Verify a server -> device message with a pinned key, then decode it strictly.

    The signature is checked over the payload bytes as received before anything in them is
    interpreted. Raises :class:`SignatureError` for an unknown key or a bad signature and
    :class:`MessageError` for a malformed message or one addressed to someone else.
    Freshness and de-duplication (``ts``, ``id``) are the caller's job (it knows the time).
    """
    obj = decode_object(data, max_size=max_size)
    f = Fields(obj, "signed")
    v = f.integer("v", lo=0, hi=1000)
    if v != VERSION:
        raise MessageError(f"signed: unsupported version {v}")
    kid = f.text("kid", pattern=KID_RE)
    payload = f.blob("payload", max_len=max_size)
    sig = f.blob("sig", min_len=64, max_len=64)
    f.done()
    pub = keys.get(kid)
    if pub is None:
        raise SignatureError(f"message signed by unknown key {kid}")
    verify_bytes(pub, sig, payload)
    inner = decode_object(payload, max_size=max_size)
    pf, mtype, msg_id, ts = _envelope_fields(inner, "payload")
    to = pf.text("aud", pattern=AUDIENCE_RE)
    body = pf.raw("body")
    pf.done()
    if not hmac.compare_digest(to.encode(), aud.encode()):
        raise MessageError(f"message is addressed to {to!r}, not to {aud!r}")
    return Envelope(type=mtype, id=msg_id, ts=ts, message=_parse_body(mtype, body, allowed), raw=data, aud=to)


MessageFactory = Callable[[Fields], Message]
