"""The TPM side of key release: the PCR-bound key, its certification, unwrapping; the state seal.

**Bound key** (:class:`BoundKeys`). For a key request the vault needs a TPM-resident RSA-2048
OAEP-SHA256 decryption key (fixedTPM, fixedParent, under the SRK; template and policy in
:mod:`agent.tpm.templates` and :mod:`protocol.tpm.policy`) whose authPolicy is
``PolicyOR(PolicyPCR(selection, values) + CommandCode(RSA_Decrypt), CommandCode(Certify))``, where
``selection`` is the PCR selection the server quotes (the latest challenge's) and ``values`` the
PCR values read from the TPM *now* - the state the server has just appraised. One key serves every
model while the boot state stays the same: it is looked up by (selection, SHA-256 of the values) in
``<state_dir>/vault/keys.json`` and reused only if the PCR values are unchanged; a new boot state
(a legitimate update, or anything else) gets a new key, certified and released to afresh.

The key request carries the key's TPM2B_PUBLIC and a TPM2_Certify of it by the AK, with qualifying
data :func:`protocol.messages.key_request_qualifier` (device id, model, version), so the server
knows the key lives in the TPM that holds the enrolled AK and which policy it enforces.

**Unwrap**: TPM2_RSA_Decrypt of the release's wrapped data key (OAEP-SHA256, label
:data:`protocol.messages.WRAP_LABEL`) in a policy session salted with the SRK and response-encrypted
(the key does not cross the TPM bus in clear). The TPM refuses unless the PCRs hold the bound values
(a tampered boot), and a release wrapped to another device's key does not decrypt here. The data key
is returned in a ``bytearray`` the caller zeroizes; the adapter's immutable copy is overwritten.

**State signature** (:class:`StateSigner`). The vault's state file (accepted versions and quota
counters) must not be forgeable by someone who can write the disk. The TPM adapter offers no
seal/unseal or TPM2_HMAC, and an RSA-OAEP "seal" to a TPM public key would not help: anyone can wrap
a secret of their own choice to a public key and swap the file. So the state file is instead
authenticated by the TPM's attestation key: TPM2_Certify of a dedicated bound key (the "state key")
by the AK, with SHA-256 of the file's body as qualifying data. The agent verifies it in software with
the AK's public key. An AK signature is made only inside this TPM (fixedTPM), so a state file edited
or written off the device, or copied from another device, does not verify; replaying an *older*
signed file is what the TPM NV counter catches (:mod:`agent.vault.counters`). What it does not stop
(code running on the device itself can ask the TPM to certify anything) is spelled out in
docs/model-protection.md.
"""

from __future__ import annotations

import ctypes
import hmac
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from agent.inference.runtime import zeroize
from agent.statefile import read_optional, write_atomic
from agent.tpm.interface import AgentTpm, BoundKey
from agent.vault import KeyReleaseRefused
from protocol.errors import MalformedInputError, SignatureError, StorageError
from protocol.messages import WRAP_LABEL, KeyRelease, KeyRequest, key_request_qualifier
from protocol.tpm.constants import TPM_GENERATED_VALUE, Alg, StructureTag
from protocol.tpm.policy import Selection, canonical_selection, pcr_digest, selection_to_dict
from protocol.tpm.structures import (
    AttestedCertify,
    EccSignature,
    RsaSignature,
    parse_attest,
    parse_signature,
    parse_tpm2b_public,
)

__all__ = ["BoundKeys", "KeyIndex", "StateSignature", "StateSigner", "wipe_bytes"]

INDEX_FILE = "keys.json"
STATE_KEY_FILE = "state-key.json"
# The state key is only ever certified (the Certify branch of its policy works in any PCR state);
# it needs *some* PCR binding to be a bound key at all: PCR 23 at its reset value.
SEAL_SELECTION: Mapping[str, Sequence[int]] = {"sha256": (23,)}
SEAL_VALUES: Mapping[str, Mapping[int, bytes]] = {"sha256": {23: bytes(32)}}
MAX_INDEX = 256 * 1024
MAX_KEYS = 256
DATA_KEY_SIZE = 32

TpmGetter = Callable[[], AgentTpm]


def wipe_bytes(data: bytes) -> None:
    """Overwrite a ``bytes`` object's payload that only the caller references (CPython only).

    For the data key the TPM adapter returns as ``bytes`` (immutable): copied into a ``bytearray``,
    then this clears the original. Never call it on bytes anyone else may hold (a literal, an
    interned or shared object); objects of one byte or less are interned by CPython and skipped.
    """
    if sys.implementation.name != "cpython" or len(data) <= 1:
        return
    offset = bytes.__basicsize__ - 1  # PyBytesObject header; ob_sval follows (the 1 is its NUL)
    ctypes.memset(id(data) + offset, 0, len(data))


# --------------------------------------------------------------------------------------------------
# the index of bound keys
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class IndexedKey:
    """One bound key the vault created: its id in the adapter, TPM name, and the state it needs."""

    key_id: str
    name: bytes
    selection: Selection
    pcr_digest: bytes
    created: int  # ms

    def to_json(self) -> dict[str, Any]:
        return {"key_id": self.key_id, "name": self.name.hex(),
                "selection": selection_to_dict(self.selection), "pcr_digest": self.pcr_digest.hex(),
                "created": self.created}

    @classmethod
    def from_json(cls, obj: Any) -> IndexedKey:
        if not isinstance(obj, dict) or set(obj) != {"key_id", "name", "selection", "pcr_digest", "created"}:
            raise MalformedInputError("key index entry has unexpected fields")
        created = obj["created"]
        if not isinstance(created, int) or isinstance(created, bool):
            raise MalformedInputError("key index entry: created must be an integer")
        return cls(key_id=str(obj["key_id"]), name=bytes.fromhex(str(obj["name"])),
                   selection=canonical_selection(obj["selection"]),
                   pcr_digest=bytes.fromhex(str(obj["pcr_digest"])), created=created)


class KeyIndex:
    """``keys.json``: the bound keys created for model key requests (nothing secret in it)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        data = read_optional(self.path, max_size=MAX_INDEX)
        entries: list[IndexedKey] = []
        if data is not None:
            try:
                raw = json.loads(data)
                ok = isinstance(raw, dict) and raw.get("format") == 1 and isinstance(raw.get("keys"), list)
                if not ok:
                    raise MalformedInputError("unsupported format")
                entries = [IndexedKey.from_json(e) for e in raw["keys"]]
            except (ValueError, MalformedInputError) as exc:
                raise StorageError(f"{self.path} is corrupt: {exc}") from None
        self._entries = entries

    @property
    def entries(self) -> tuple[IndexedKey, ...]:
        return tuple(self._entries)

    def find_state(self, selection: Selection, digest: bytes) -> IndexedKey | None:
        """The key bound to exactly this selection and these PCR values (by their digest), if any."""
        for entry in reversed(self._entries):
            if entry.selection == selection and entry.pcr_digest == digest:
                return entry
        return None

    def find_name(self, name: bytes) -> IndexedKey | None:
        """The key with TPM name ``name``, if the vault created it."""
        for entry in self._entries:
            if entry.name == name:
                return entry
        return None

    def add(self, entry: IndexedKey) -> None:
        """Record a new key (the oldest entries are forgotten beyond :data:`MAX_KEYS`)."""
        kept = [e for e in self._entries if e.key_id != entry.key_id][-(MAX_KEYS - 1):]
        self._entries = [*kept, entry]
        self._write()

    def remove(self, key_id: str) -> None:
        self._entries = [e for e in self._entries if e.key_id != key_id]
        self._write()

    def _write(self) -> None:
        body = {"format": 1, "keys": [e.to_json() for e in self._entries]}
        write_atomic(self.path, (json.dumps(body, sort_keys=True) + "\n").encode())


# --------------------------------------------------------------------------------------------------
# model keys
# --------------------------------------------------------------------------------------------------
class BoundKeys:
    """Bound keys for model key requests (see the module docstring)."""

    def __init__(self, tpm: TpmGetter, folder: Path, device_id: str, *, clock: Callable[[], float]) -> None:
        self._tpm = tpm
        self._device_id = device_id
        self._clock = clock
        self.index = KeyIndex(Path(folder) / INDEX_FILE)

    def current_key(self, selection: Mapping[str, Sequence[int]]) -> BoundKey:
        """The bound key for the PCR values ``selection`` has now: the stored one if they are unchanged,
        else a new key (which the server must certify and release to afresh)."""
        sel = canonical_selection(selection)
        tpm = self._tpm()
        values = tpm.read_pcrs(selection_to_dict(sel))
        digest = pcr_digest(sel, values)
        hit = self.index.find_state(sel, digest)
        if hit is not None:
            try:
                return tpm.bound_key(hit.key_id)
            except StorageError:  # its blobs are gone or damaged: make a new one
                self.index.remove(hit.key_id)
        key = tpm.create_bound_key(selection_to_dict(sel), values)
        self.index.add(IndexedKey(key_id=key.key_id, name=key.name, selection=sel, pcr_digest=digest,
                                  created=int(self._clock() * 1000)))
        return key

    def request(self, name: str, version: str, selection: Mapping[str, Sequence[int]]) -> KeyRequest:
        """A key request for model ``name`` ``version``: the current bound key, certified by the AK."""
        key = self.current_key(selection)
        cert = self._tpm().certify(key, key_request_qualifier(self._device_id, name, version))
        return KeyRequest(name=name, version=version, key_public=key.public, certify_attest=cert.attest,
                          certify_signature=cert.signature)

    def unwrap(self, release: KeyRelease) -> bytearray:
        """The data key of ``release``, unwrapped by the TPM, in a ``bytearray`` the caller zeroizes.

        Raises :class:`KeyReleaseRefused` if the release names a key this vault did not create, and
        :class:`~protocol.errors.TpmError` if the TPM refuses (PCRs not in the bound state: "a policy
        check failed"; wrapped to another key; another TPM's key blobs).
        """
        entry = self.index.find_name(release.key_name)
        if entry is None:
            raise KeyReleaseRefused(f"key release for {release.name} {release.version} is wrapped to a key "
                                    "this device does not hold")
        secret = self._tpm().unwrap(entry.key_id, release.wrapped_key, WRAP_LABEL)
        try:
            out = bytearray(secret)
        finally:
            wipe_bytes(secret)
        if len(out) != DATA_KEY_SIZE:
            zeroize(out)
            raise KeyReleaseRefused(f"unwrapped data key has {len(out)} bytes, not {DATA_KEY_SIZE}")
        return out


# --------------------------------------------------------------------------------------------------
# the state signature
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class StateSignature:
    """TPM2_Certify of the vault's state key by the AK, qualified with a state file's digest."""

    attest: bytes
    signature: bytes


class StateSigner:
    """Authenticates the vault's state file with the TPM (see the module docstring).

    ``sign(digest)``: TPM2_Certify of a dedicated bound key ("state key", created on first use, kept
    as ``state-key.json`` -> adapter key id) by the AK with ``digest`` as qualifying data.
    ``verify(digest, sig)``: in software, with the AK's public key: the TPMS_ATTEST was made by a TPM
    (TPM_GENERATED_VALUE), is a certification of *the state key*, carries ``digest`` as extraData, and
    the AK signed it. Only this TPM can produce that (the AK is fixedTPM), so a state file edited or
    written off the device, or taken from another device, does not verify.
    """

    def __init__(self, tpm: TpmGetter, folder: Path) -> None:
        self._tpm = tpm
        self.path = Path(folder) / STATE_KEY_FILE
        self._key: BoundKey | None = None

    def exists(self) -> bool:
        """True if the state key was created (the vault ran on this device before)."""
        return self.path.exists()

    def _state_key(self, *, create: bool) -> BoundKey:
        if self._key is not None:
            return self._key
        data = read_optional(self.path, max_size=4096)
        tpm = self._tpm()
        if data is None:
            if not create:
                raise StorageError(f"{self.path} is missing: the vault's state cannot be verified")
            key = tpm.create_bound_key(SEAL_SELECTION, SEAL_VALUES)
            write_atomic(self.path, (json.dumps({"format": 1, "key_id": key.key_id}) + "\n").encode())
        else:
            try:
                raw = json.loads(data)
                ok = isinstance(raw, dict) and raw.get("format") == 1 and isinstance(raw.get("key_id"), str)
                if not ok:
                    raise ValueError("unsupported format")
            except ValueError as exc:
                raise StorageError(f"{self.path} is corrupt: {exc}") from None
            key = tpm.bound_key(raw["key_id"])
        self._key = key
        return key

    def sign(self, digest: bytes, *, create: bool = False) -> StateSignature:
        """Certify the state key with ``digest`` (32 bytes) as qualifying data (one AK signature)."""
        cert = self._tpm().certify(self._state_key(create=create), digest)
        return StateSignature(attest=cert.attest, signature=cert.signature)

    def verify(self, digest: bytes, sig: StateSignature) -> None:
        """Raise :class:`~protocol.errors.VerificationError` unless ``sig`` certifies the state key with
        ``digest``, signed by this TPM's AK (no TPM command: the AK's public key is enough)."""
        key = self._state_key(create=False)
        try:
            attest = parse_attest(sig.attest)
            signature = parse_signature(sig.signature)
        except MalformedInputError as exc:
            raise SignatureError(f"state signature is malformed: {exc.diagnostics()}") from None
        if attest.magic != TPM_GENERATED_VALUE or attest.type != StructureTag.ATTEST_CERTIFY:
            raise SignatureError("state signature is not a TPM-generated certification")
        if not isinstance(attest.attested, AttestedCertify) or attest.attested.name != key.name:
            raise SignatureError("state signature certifies another key than the vault's state key")
        if not hmac.compare_digest(attest.extra_data, digest):
            raise SignatureError("state signature is over other content (the state file was changed)")
        _verify_ak_signature(self._tpm().ak_public, sig.attest, signature)


def _verify_ak_signature(ak_public: bytes, message: bytes, sig: RsaSignature | EccSignature) -> None:
    """Check a TPMT_SIGNATURE by the AK (ECDSA-SHA256 or RSASSA-SHA256, the AK templates) in software."""
    key = parse_tpm2b_public(ak_public).public_key()
    if sig.hash_alg != Alg.SHA256:
        raise SignatureError("state signature does not use SHA-256")
    try:
        if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(sig, EccSignature) \
                and sig.sig_alg == Alg.ECDSA:
            der = encode_dss_signature(int.from_bytes(sig.r, "big"), int.from_bytes(sig.s, "big"))
            key.verify(der, message, ec.ECDSA(hashes.SHA256()))
        elif (isinstance(key, rsa.RSAPublicKey) and isinstance(sig, RsaSignature)
              and sig.sig_alg == Alg.RSASSA):
            key.verify(sig.sig, message, padding.PKCS1v15(), hashes.SHA256())
        else:
            raise SignatureError("state signature scheme does not fit the AK")
    except (InvalidSignature, ValueError):
        raise SignatureError("state signature does not verify with this TPM's AK") from None
