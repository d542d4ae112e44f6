"""The agent's only door to the TPM: an ESAPI (tpm2-pytss) adapter.

One :class:`TpmAdapter` owns one ESAPI connection, given as a TCTI configuration string:
``device:/dev/tpmrm0`` on hardware (always through the kernel resource manager), or
``swtpm:host=127.0.0.1,port=P`` on the simulator.  Without a resource manager every transient
object and session is flushed as soon as it is no longer needed; the attestation key (AK) is the
only object the adapter keeps loaded, so that each attestation costs exactly one TPM signature.

Keys
----
* **EK**: TCG EK Credential Profile 2.0 template, re-derived with TPM2_CreatePrimary in the
  endorsement hierarchy and checked against the EK certificate in NV (fail closed).  Default is the
  RSA-2048 EK (``ek_alg="rsa"``); ``"ecc"`` uses the ECC EK (low range P-256, or swtpm's high-range
  P-384).  The EK is loaded only while it is needed (AK load, ActivateCredential).
* **AK**: restricted signing key, child of the EK (as ``tpm2_createak``), ECC P-256/ECDSA-SHA256 or
  RSA-2048/RSASSA-SHA256.  Its TPM2B_PUBLIC and TPM2B_PRIVATE are kept in ``state_dir`` so it is the
  same key across restarts.
* **SRK**: TCG Provisioning Guidance ECC P-256 storage key, re-derived in the owner hierarchy.
* **Bound keys**: RSA-2048 OAEP-SHA256 decryption keys under the SRK that decrypt only in a measured
  state (see :mod:`protocol.tpm.policy` for the policy and why it has a Certify branch).

Byte formats returned (all TPM wire format, big-endian, as TPM 2.0 Part 2 defines them)
----------------------------------------------------------------------------------------
* public keys: marshalled **TPM2B_PUBLIC** (2-byte size + TPMT_PUBLIC), what ``tpm2_createak -u`` and
  ``tpm2_readpublic -o`` write;
* names: the TPM name, ``nameAlg (UINT16) || H_nameAlg(TPMT_PUBLIC)`` (34 bytes for sha256), i.e. the
  TPM2B_NAME contents without its size;
* attestations: marshalled **TPMS_ATTEST** exactly as the TPM signed it (``tpm2_quote -m``);
* signatures: marshalled **TPMT_SIGNATURE** (``tpm2_quote -s``);
* EK certificates: DER X.509, NV padding removed.

Errors
------
Every failure is a :class:`protocol.errors.EdgeError`: TPM and transport failures are
:class:`~protocol.errors.TpmError` (with the response code and its decoded description), bad caller
input :class:`~protocol.errors.MalformedInputError`, state-file problems
:class:`~protocol.errors.StorageError`, bad configuration :class:`~protocol.errors.ConfigError`.
No ``TSS2_Exception`` leaves this module.

Resets and transport loss
-------------------------
If the TPM was reset under a live connection (the AK handle no longer refers to a loaded object),
the adapter reloads the AK from ``state_dir`` and retries the operation once, transparently.  If the
transport fails, it reconnects to the same TCTI once and retries; if that fails too, it raises
:class:`TpmError` and the caller must open a new adapter (e.g. with the new swtpm port).

Secrets
-------
Nothing secret is logged.  The outputs of :meth:`TpmAdapter.activate_credential` and
:meth:`TpmAdapter.unwrap` are secrets: never log them, keep them only as long as needed.  They cross
the TPM bus encrypted (response parameter encryption in a session salted with the EK resp. SRK).
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import os
import re
import struct
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from tpm2_pytss import ESAPI, TSS2_Exception
from tpm2_pytss.constants import (
    ESYS_TR,
    TPM2_ALG,
    TPM2_CAP,
    TPM2_CC,
    TPM2_ECC,
    TPM2_NT,
    TPM2_PT_NV,
    TPM2_SE,
    TPMA_NV,
    TPMA_OBJECT,
    TPMA_SESSION,
)
from tpm2_pytss.types import (
    TPM2B_ENCRYPTED_SECRET,
    TPM2B_ID_OBJECT,
    TPM2B_NV_PUBLIC,
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPML_DIGEST,
    TPML_PCR_SELECTION,
    TPMS_ATTEST,
    TPMS_NV_PUBLIC,
    TPMT_RSA_DECRYPT,
    TPMT_SIG_SCHEME,
    TPMT_SYM_DEF,
    TPMU_SYM_KEY_BITS,
    TPMU_SYM_MODE,
)
from tpm2_pytss.utils import NoSuchIndex, create_ek_template

from agent.tpm.interface import AttestationKey, BoundKey, Certification, Quote
from agent.tpm.templates import (
    AK_ALGS,
    EK_ALGS,
    EK_PROFILES,
    EkProfile,
    ak_template,
    bound_key_template,
    same_template,
    srk_template,
)
from protocol.errors import ConfigError, MalformedInputError, StorageError, TpmError
from protocol.tpm.constants import HASH_ALGS, describe_rc
from protocol.tpm.policy import (
    BoundKeyPolicy,
    Selection,
    bound_key_policy,
    canonical_selection,
    marshal_pcr_selection,
    pcr_composite,
    pcr_digest,
    policy_or,
    selection_to_dict,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

# Owner range of NV indices (TCG "Registry of Reserved TPM 2.0 Handles and Localities", 2.2).
NV_OWNER_RANGE = (0x01800000, 0x01BFFFFF)
DEFAULT_COUNTER_INDEX = 0x01800A01

# TPM2B_DATA holds at most sizeof(TPMT_HA) = 66 octets; 64 keeps to digest-sized values.
MAX_QUALIFYING_DATA = 64
RSA2048_BYTES = 256
# Hash of the AK signing scheme (both AK templates use SHA-256): the hash of TPMS_QUOTE_INFO.pcrDigest.
AK_HASH = "sha256"
_QUOTE_ATTEMPTS = 3
_PCR_READ_ATTEMPTS = 5

# TPM response codes the adapter reacts to (TPM 2.0 Part 2, 6.6).
_RC_HANDLE = 0x08B  # format-one TPM_RC_HANDLE (handle number stripped)
_RC_VALUE = 0x084
_RC_FAILURE = 0x101
_RC_INITIALIZE = 0x100
_RC_NV_DEFINED = 0x14C
_LAYER_TCTI = 0x0A
_ESYS_RC_BAD_SEQUENCE = 0x00070007  # ESYS refuses to continue after an interrupted command

_KEY_ID = re.compile(r"[0-9a-f]{32}")
_STATE_FORMAT = 1

_AES128_CFB = TPMT_SYM_DEF(
    algorithm=TPM2_ALG.AES, keyBits=TPMU_SYM_KEY_BITS(aes=128), mode=TPMU_SYM_MODE(aes=TPM2_ALG.CFB)
)
_NO_SYM = TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL)


class _AkLost(Exception):
    """Internal: the AK handle no longer refers to the AK (never leaves the adapter)."""


@dataclass(frozen=True, slots=True)
class _StoredBoundKey:
    key: BoundKey
    public: Any  # TPM2B_PUBLIC
    private: Any  # TPM2B_PRIVATE
    srk_name: bytes


# ---------------------------------------------------------------------------------------------
# Error conversion and small helpers
# ---------------------------------------------------------------------------------------------
def _tpm_message(op: str, exc: TSS2_Exception) -> str:
    return f"{op} failed: {exc} [{describe_rc(int(exc.rc))}]"


def _error_code(exc: TSS2_Exception) -> int:
    """The response code with the handle/parameter/session number stripped."""
    return int(exc.error)


def _is_transport_error(exc: TSS2_Exception) -> bool:
    rc = int(exc.rc)
    return (rc >> 16) & 0xFF == _LAYER_TCTI or rc == _ESYS_RC_BAD_SEQUENCE


def _unmarshal_exact(cls: Any, data: bytes, what: str) -> Any:
    """Unmarshal a TPM structure that must fill ``data`` exactly."""
    if not isinstance(data, bytes | bytearray):
        raise MalformedInputError(f"{what}: expected bytes, got {type(data).__name__}")
    try:
        value, used = cls.unmarshal(bytes(data))
    except (TSS2_Exception, ValueError, TypeError) as exc:
        raise MalformedInputError(f"{what}: cannot unmarshal ({exc})") from exc
    if used != len(data):
        raise MalformedInputError(f"{what}: {len(data) - used} trailing bytes after the structure")
    return value


def _tpml_selection(selection: Selection) -> Any:
    tpml, _ = TPML_PCR_SELECTION.unmarshal(marshal_pcr_selection(selection))
    return tpml


def _selection_entries(tpml: Any) -> list[tuple[int, list[int]]]:
    """(hash alg, ascending PCR indices) for each entry of a TPML_PCR_SELECTION from the TPM.

    Parsed from the marshalled bytes (Part 2, 10.9.7): tpm2-pytss attribute access costs about as
    much as the TPM command on swtpm.
    """
    data = bytes(tpml.marshal())
    (count,) = struct.unpack_from(">I", data)
    out, pos = [], 4
    for _ in range(count):
        alg, size = struct.unpack_from(">HB", data, pos)
        bitmap = data[pos + 3:pos + 3 + size]
        pos += 3 + size
        out.append((alg, [8 * n + b for n, octet in enumerate(bitmap) for b in range(8) if octet >> b & 1]))
    return out


def _digest_list(tpml: Any) -> list[bytes]:
    """The digests of a TPML_DIGEST, parsed from its marshalled bytes (Part 2, 10.9.2)."""
    data = bytes(tpml.marshal())
    (count,) = struct.unpack_from(">I", data)
    out, pos = [], 4
    for _ in range(count):
        (size,) = struct.unpack_from(">H", data, pos)
        out.append(data[pos + 2:pos + 2 + size])
        pos += 2 + size
    return out


def _der_length(data: bytes, what: str) -> int:
    """Length of the DER SEQUENCE at the start of ``data`` (header included).

    EK certificate NV indices are often larger than the certificate and padded with 0x00 or 0xFF
    (TCG EK Credential Profile 2.0, 2.2.1.5 leaves the padding unspecified), so the only reliable end
    is the one the DER header states (X.690, 8.1.3).
    """
    if len(data) < 2 or data[0] != 0x30:
        raise TpmError(f"{what} does not start with a DER SEQUENCE")
    first = data[1]
    if first < 0x80:
        header, length = 2, first
    else:
        count = first & 0x7F
        if not 1 <= count <= 4 or len(data) < 2 + count:
            raise TpmError(f"{what} has an invalid DER length")
        header, length = 2 + count, int.from_bytes(data[2:2 + count], "big")
    if header + length > len(data):
        raise TpmError(f"{what} is truncated: DER says {header + length} bytes, NV holds {len(data)}")
    return header + length


_CURVES: dict[int, ec.EllipticCurve] = {
    TPM2_ECC.NIST_P256: ec.SECP256R1(),
    TPM2_ECC.NIST_P384: ec.SECP384R1(),
    TPM2_ECC.NIST_P521: ec.SECP521R1(),
}


def _crypto_public_key(area: Any) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey:
    """The key of a TPMT_PUBLIC as a ``cryptography`` public key (ValueError if unsupported)."""
    if area.type == TPM2_ALG.RSA:
        exponent = int(area.parameters.rsaDetail.exponent) or 65537  # 0 means 2^16+1 (Part 2, 12.2.3.5)
        return rsa.RSAPublicNumbers(exponent, int.from_bytes(bytes(area.unique.rsa), "big")).public_key()
    if area.type == TPM2_ALG.ECC:
        curve = _CURVES.get(int(area.parameters.eccDetail.curveID))
        if curve is None:
            raise ValueError(f"unsupported ECC curve 0x{int(area.parameters.eccDetail.curveID):04x}")
        return ec.EllipticCurvePublicNumbers(int.from_bytes(bytes(area.unique.ecc.x), "big"),
                                             int.from_bytes(bytes(area.unique.ecc.y), "big"),
                                             curve).public_key()
    raise ValueError(f"unsupported key type 0x{int(area.type):04x}")


def _public_key_matches(area: Any, cert: x509.Certificate) -> bool:
    """True if the TPMT_PUBLIC's key is the certificate's subject public key."""
    try:
        key = _crypto_public_key(area)
    except ValueError:
        return False
    cert_key = cert.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        return isinstance(cert_key, rsa.RSAPublicKey) and key.public_numbers() == cert_key.public_numbers()
    return (isinstance(cert_key, ec.EllipticCurvePublicKey) and cert_key.curve.name == key.curve.name
            and key.public_numbers() == cert_key.public_numbers())


def _verify_signature(key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey, message: bytes,
                      signature: bytes) -> bool:
    """Check a marshalled TPMT_SIGNATURE (ECDSA or RSASSA with SHA-256) over ``message`` in software.

    Parsed by hand (Part 2, 11.3.4): sigAlg, hash, then the TPM2B fields of the scheme.
    """
    def tpm2b(pos: int) -> tuple[bytes, int]:
        (size,) = struct.unpack_from(">H", signature, pos)
        if pos + 2 + size > len(signature):
            raise ValueError("truncated")
        return signature[pos + 2:pos + 2 + size], pos + 2 + size

    try:
        sig_alg, hash_alg = struct.unpack_from(">HH", signature)
        if hash_alg != TPM2_ALG.SHA256:
            return False
        if isinstance(key, ec.EllipticCurvePublicKey):
            if sig_alg != TPM2_ALG.ECDSA:
                return False
            r, pos = tpm2b(4)
            s, pos = tpm2b(pos)
            if pos != len(signature):
                return False
            der = encode_dss_signature(int.from_bytes(r, "big"), int.from_bytes(s, "big"))
            key.verify(der, message, ec.ECDSA(hashes.SHA256()))
        else:
            if sig_alg != TPM2_ALG.RSASSA:
                return False
            sig, pos = tpm2b(4)
            if pos != len(signature):
                return False
            key.verify(sig, message, padding.PKCS1v15(), hashes.SHA256())
    except (InvalidSignature, ValueError, struct.error):
        return False
    return True


def _write_state(path: Path, data: bytes) -> None:
    """Write a state file atomically (temp file in the same directory + os.replace), mode 0600."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise StorageError(f"cannot write {path}: {exc.strerror or exc}") from exc
    with contextlib.suppress(OSError):  # make the rename durable; not all filesystems allow this
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _read_state(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _check_qualifying_data(data: bytes, what: str) -> bytes:
    if not isinstance(data, bytes | bytearray):
        raise MalformedInputError(f"{what} must be bytes")
    if not 1 <= len(data) <= MAX_QUALIFYING_DATA:
        raise MalformedInputError(f"{what} must be 1..{MAX_QUALIFYING_DATA} bytes, got {len(data)}")
    return bytes(data)


# ---------------------------------------------------------------------------------------------
# The adapter
# ---------------------------------------------------------------------------------------------
class TpmAdapter:
    """ESAPI adapter: EK, AK, quotes, PCRs, credential activation, bound keys, NV counter.

    ``tcti`` is a TCTI configuration string (``device:/dev/tpmrm0``, ``swtpm:host=…,port=…``);
    ``state_dir`` holds the AK and bound-key blobs (created 0700, files 0600).  ``ak_alg`` is
    ``"ecc"`` (P-256/ECDSA-SHA256, default) or ``"rsa"`` (RSA-2048/RSASSA-SHA256); ``ek_alg`` picks
    the EK that parents the AK and activates credentials.  ``counter_index`` is the NV index of the
    monotonic counter (owner range 0x01800000-0x01BFFFFF).

    The connection opens on first use (or with :meth:`open` / ``with``); :meth:`close` flushes the AK
    and ends it.  All methods are serialised by an internal lock, so one adapter may be shared
    between threads.  Owner and endorsement hierarchy authorizations are assumed empty (the usual
    provisioning of edge devices, and what ``tpm2_createek``/``tpm2_createak`` assume).
    """

    def __init__(self, tcti: str, state_dir: Path, *, ak_alg: str = "ecc", ek_alg: str = "rsa",
                 counter_index: int = DEFAULT_COUNTER_INDEX) -> None:
        if not isinstance(tcti, str) or not tcti.strip():
            raise ConfigError("TCTI configuration string is empty")
        if ak_alg not in AK_ALGS:
            raise ConfigError(f"unknown AK algorithm {ak_alg!r}; expected one of {', '.join(AK_ALGS)}")
        if ek_alg not in EK_ALGS:
            raise ConfigError(f"unknown EK algorithm {ek_alg!r}; expected one of {', '.join(EK_ALGS)}")
        if not NV_OWNER_RANGE[0] <= counter_index <= NV_OWNER_RANGE[1]:
            raise ConfigError(f"NV counter index 0x{counter_index:08x} is outside the owner range "
                              f"0x{NV_OWNER_RANGE[0]:08x}-0x{NV_OWNER_RANGE[1]:08x}")
        self._tcti = tcti
        self._state_dir = Path(state_dir)
        self._ak_alg = ak_alg
        self._ek_alg = ek_alg
        self._counter_index = counter_index
        self._lock = threading.RLock()
        self._ctx: Any = None  # ESAPI while connected
        self._closed = False
        self._ak_handle: Any = None  # ESYS_TR of the loaded AK
        self._ak: AttestationKey | None = None
        self._ak_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey | None = None
        self._ek_cache: dict[str, tuple[bytes, bytes]] = {}  # alg -> (cert DER, TPM2B_PUBLIC)
        self._nv_buffer_max = 0
        # PCR values last read per selection: a quote whose signed pcrDigest they hash to needs no
        # TPM2_PCR_Read (see _quote).
        self._pcr_cache: dict[Selection, dict[str, dict[int, bytes]]] = {}

    # -- lifecycle ---------------------------------------------------------------------------------
    def open(self) -> None:
        """Connect, check the EK against its certificate, and load (or create) the AK."""
        with self._lock:
            self._ensure_open()

    def close(self) -> None:
        """Flush the AK and end the connection.  The adapter cannot be used afterwards."""
        with self._lock:
            self._disconnect()
            self._closed = True

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    def __enter__(self) -> TpmAdapter:
        self.open()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _ensure_open(self) -> None:
        if self._closed:
            raise TpmError("the TPM adapter is closed")
        if self._ctx is None:
            self._connect()
        elif self._ak_handle is None:  # an earlier reload failed (e.g. TPM not started yet): try again
            with self._converted("loading the AK"):
                self._load_or_create_ak()

    def _connect(self) -> None:
        try:
            self._state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create state directory {self._state_dir}: {exc}") from exc
        try:
            ctx = ESAPI(self._tcti)
        except TSS2_Exception as exc:
            raise TpmError(f"cannot connect to the TPM through TCTI {self._tcti!r}: {exc}",
                           rc=int(exc.rc)) from exc
        self._ctx = ctx
        self._ek_cache.clear()
        try:
            with self._converted("setting up the TPM connection"):
                self._nv_buffer_max = self._query_nv_buffer_max()
                self._load_or_create_ak()
        except BaseException:
            self._disconnect()
            raise
        assert self._ak is not None
        log.info("TPM connected via %s; AK %s loaded", self._tcti.split(":", 1)[0], self._ak.name.hex())

    def _disconnect(self) -> None:
        handle = self._ak_handle
        if self._ctx is not None and handle is not None and self._ak_is_loaded():
            with contextlib.suppress(TSS2_Exception):
                self._ctx.flush_context(handle)
        ctx, self._ctx, self._ak_handle = self._ctx, None, None
        if ctx is not None:
            with contextlib.suppress(TSS2_Exception):
                ctx.close()

    @contextlib.contextmanager
    def _converted(self, op: str) -> Iterator[None]:
        try:
            yield
        except TSS2_Exception as exc:
            raise self._explain(op, exc) from exc

    def _explain(self, op: str, exc: TSS2_Exception) -> TpmError:
        message = _tpm_message(op, exc)
        if int(exc.rc) == _RC_INITIALIZE:
            message += ": the TPM has not been started (TPM2_Startup is the platform firmware's job)"
        elif _is_transport_error(exc):
            message += (f": the TPM connection ({self._tcti}) is lost; open a new adapter once the TPM "
                        "is reachable")
        return TpmError(message, rc=int(exc.rc))

    def _run(self, op: str, fn: Callable[[], T], *, uses_ak: bool = False, retry: bool = True) -> T:
        """Run ``fn`` (which issues TPM commands) with TSS errors converted to :class:`TpmError`.

        If ``fn`` uses the AK and fails because the TPM no longer holds it (TPM reset, or flushed by
        someone sharing a TPM without resource manager), the AK is reloaded from ``state_dir`` and
        ``fn`` runs once more.  On a transport error the connection is re-established once and ``fn``
        repeated, unless ``retry`` is false (for commands that must not run twice: the TPM may have
        executed the one whose response was lost).
        """
        self._ensure_open()
        try:
            return fn()
        except _AkLost:
            self._reload_ak(op)
        except TSS2_Exception as exc:
            if _is_transport_error(exc):
                if not retry:
                    self._disconnect()
                    raise self._explain(op, exc) from exc
                log.warning("TPM transport failed during %s (%s); reconnecting once", op, exc)
                self._disconnect()
                self._connect()
            elif uses_ak and int(exc.rc) != _RC_INITIALIZE and not self._ak_is_loaded():
                self._reload_ak(op)
            else:
                raise self._explain(op, exc) from exc
        try:
            return fn()
        except _AkLost as exc:
            raise TpmError(f"{op} failed: the AK is not usable even after reloading it") from exc
        except TSS2_Exception as exc:
            if _is_transport_error(exc):
                self._disconnect()
            raise self._explain(op, exc) from exc

    def _ak_is_loaded(self) -> bool:
        """True if our AK handle still refers to our AK (TPM2_ReadPublic, compared by name)."""
        if self._ak_handle is None or self._ak is None:
            return False
        try:
            _, name, _ = self._ctx.read_public(self._ak_handle)
        except TSS2_Exception:
            return False
        return bytes(name) == self._ak.name

    def _check_ak(self) -> None:
        """Raise _AkLost unless the AK handle is still ours.

        Called before commands that load other objects first: after a TPM reset those objects get
        the handle numbers the AK used to have, and the stale AK handle would silently address them.
        """
        if not self._ak_is_loaded():
            raise _AkLost

    def _reload_ak(self, op: str) -> None:
        log.warning("the TPM no longer holds the AK (TPM reset?) during %s; reloading it", op)
        handle, self._ak_handle = self._ak_handle, None
        if handle is not None:
            # tr_close drops ESYS's record only: never flush, the handle may now be another object.
            with contextlib.suppress(TSS2_Exception):
                self._ctx.tr_close(handle)
        with self._converted("reloading the AK"):
            self._load_or_create_ak()

    def _flush(self, handle: Any) -> None:
        """Flush a transient object or session, never masking an error already in flight."""
        with contextlib.suppress(TSS2_Exception):
            self._ctx.flush_context(handle)

    @contextlib.contextmanager
    def _transient(self, handle: Any) -> Iterator[Any]:
        try:
            yield handle
        finally:
            self._flush(handle)

    # -- EK ----------------------------------------------------------------------------------------
    def ek_certificate(self, alg: str | None = None) -> bytes:
        """DER EK certificate from NV (``alg`` "rsa" or "ecc"; default: the adapter's EK).

        RSA is read from 0x01C00002; ECC from 0x01C0000A, else the high-range 0x01C00016 (swtpm's
        P-384 EK).  Raises :class:`TpmError` if there is none, or if the EK the TPM derives does not
        hold the certified key.
        """
        return self._ek_info(alg)[0]

    def ek_public(self, alg: str | None = None) -> bytes:
        """Marshalled TPM2B_PUBLIC of the EK (TCG template), verified to match :meth:`ek_certificate`."""
        return self._ek_info(alg)[1]

    def _ek_info(self, alg: str | None) -> tuple[bytes, bytes]:
        alg = self._ek_alg if alg is None else alg
        if alg not in EK_ALGS:
            raise ConfigError(f"unknown EK algorithm {alg!r}; expected one of {', '.join(EK_ALGS)}")
        with self._lock:
            self._ensure_open()
            if alg not in self._ek_cache:
                def derive() -> None:
                    handle, _ = self._create_ek(alg)
                    self._flush(handle)

                self._run(f"deriving the {alg.upper()} EK", derive)
            return self._ek_cache[alg]

    def _query_nv_buffer_max(self) -> int:
        _, data = self._ctx.get_capability(TPM2_CAP.TPM_PROPERTIES, TPM2_PT_NV.BUFFER_MAX, 1)
        for prop in data.data.tpmProperties:
            if prop.property == TPM2_PT_NV.BUFFER_MAX and prop.value:
                return int(prop.value)
        return 512  # conservative: every TPM 2.0 accepts NV reads of this size

    def _nv_read_all(self, index: int) -> bytes:
        """Whole contents of an NV index readable with its own (empty) auth; NoSuchIndex if undefined."""
        ctx = self._ctx
        handle = self._nv_handle(index)
        if handle is None:
            raise NoSuchIndex(index)
        try:
            nv_public, _ = ctx.nv_read_public(handle)
            size = int(nv_public.nvPublic.dataSize)
            data = bytearray()
            while len(data) < size:
                chunk = bytes(ctx.nv_read(handle, min(self._nv_buffer_max, size - len(data)), len(data)))
                if not chunk:
                    raise TpmError(f"NV index 0x{index:08x} returned no data at offset {len(data)}")
                data += chunk
            return bytes(data)
        finally:
            with contextlib.suppress(TSS2_Exception):
                ctx.tr_close(handle)

    def _find_ek_certificate(self, alg: str) -> tuple[EkProfile, bytes, bytes]:
        """(profile, raw NV contents, trimmed DER) of the first EK certificate present for ``alg``."""
        for profile in EK_PROFILES[alg]:
            try:
                raw = self._nv_read_all(profile.cert_index)
            except NoSuchIndex:
                continue
            where = f"EK certificate in NV 0x{profile.cert_index:08x}"
            return profile, raw, raw[:_der_length(raw, where)]
        indices = ", ".join(f"0x{p.cert_index:08x}" for p in EK_PROFILES[alg])
        raise TpmError(f"no {alg.upper()} EK certificate in NV (looked at {indices})")

    def _create_ek(self, alg: str) -> tuple[Any, Any]:
        """CreatePrimary the EK for ``alg``; check it against its certificate. Returns (handle, public).

        Fails closed: a TPM whose EK does not hold the certified key is not used at all.
        """
        ctx = self._ctx
        profile, raw_cert, cert_der = self._find_ek_certificate(alg)
        where = f"EK certificate in NV 0x{profile.cert_index:08x}"
        try:
            cert = x509.load_der_x509_certificate(cert_der)
        except ValueError as exc:
            raise TpmError(f"{where} is not a valid X.509 certificate: {exc}") from exc

        def nv_reader(index: int) -> bytes:
            return raw_cert if index == profile.cert_index else self._nv_read_all(index)

        # create_ek_template applies the EK Credential Profile's optional template and nonce indices.
        try:
            _, template = create_ek_template(profile.template_name, nv_reader)
        except ValueError as exc:  # e.g. an EK template NV index that does not unmarshal
            raise TpmError(f"cannot build the EK template for the {where}: {exc}") from exc
        handle, public, _, _, _ = ctx.create_primary(TPM2B_SENSITIVE_CREATE(), template, ESYS_TR.ENDORSEMENT)
        ok = same_template(public.publicArea, template.publicArea) and _public_key_matches(public.publicArea,
                                                                                          cert)
        if not ok:
            self._flush(handle)
            raise TpmError(f"the EK derived by the TPM does not match the {where}: refusing to use it")
        self._ek_cache[alg] = (cert_der, bytes(public.marshal()))
        return handle, public

    @contextlib.contextmanager
    def _ek_session(self, ek: Any, ek_public: Any, *, encrypt: bool = False) -> Iterator[Any]:
        """A session authorizing the EK's USER role.

        Low-range EK templates have no userWithAuth and the policy PolicySecret(TPM_RH_ENDORSEMENT)
        (EK Credential Profile 2.0, B.6), so this is a policy session satisfying it; high-range
        templates set userWithAuth with an empty authValue, so an HMAC session does.  With ``encrypt``
        the session is salted with the EK (whose key was checked against its certificate) and encrypts
        the response's first parameter, so a secret output never crosses the bus in clear.
        """
        ctx = self._ctx
        area = ek_public.publicArea
        salt = ek if encrypt else ESYS_TR.NONE
        sym = _AES128_CFB if encrypt else _NO_SYM
        if area.objectAttributes & TPMA_OBJECT.USERWITHAUTH:
            session = ctx.start_auth_session(salt, ESYS_TR.NONE, TPM2_SE.HMAC, sym, area.nameAlg)
        else:
            session = ctx.start_auth_session(salt, ESYS_TR.NONE, TPM2_SE.POLICY, sym, area.nameAlg)
        try:
            if not area.objectAttributes & TPMA_OBJECT.USERWITHAUTH:
                ctx.policy_secret(ESYS_TR.ENDORSEMENT, session, b"", b"", b"", 0)
            if encrypt:
                ctx.trsess_set_attributes(session, TPMA_SESSION.CONTINUESESSION | TPMA_SESSION.ENCRYPT)
            yield session
        finally:
            self._flush(session)

    # -- AK ----------------------------------------------------------------------------------------
    @property
    def ak(self) -> AttestationKey:
        """The attestation key's public identity (loads or creates it on first use)."""
        with self._lock:
            self._ensure_open()
            assert self._ak is not None  # set by _connect
            return self._ak

    @property
    def ak_public(self) -> bytes:
        """Marshalled TPM2B_PUBLIC of the AK."""
        return self.ak.public

    @property
    def ak_name(self) -> bytes:
        """TPM name of the AK (nameAlg ‖ digest), the name MakeCredential binds to."""
        return self.ak.name

    def _ak_paths(self) -> tuple[Path, Path]:
        base = f"ak-{self._ak_alg}.ek-{self._ek_alg}"
        return self._state_dir / f"{base}.pub", self._state_dir / f"{base}.priv"

    def _load_or_create_ak(self) -> None:
        ctx = self._ctx
        pub_path, priv_path = self._ak_paths()
        expected = ak_template(self._ak_alg)
        ek, ek_public = self._create_ek(self._ek_alg)
        with self._transient(ek):
            if pub_path.exists():
                public = _stored(TPM2B_PUBLIC, pub_path)
                private = _stored(TPM2B_PRIVATE, priv_path)
                if not same_template(public.publicArea, expected.publicArea):
                    raise StorageError(f"{pub_path} is not a {self._ak_alg.upper()} AK with the expected "
                                       "attributes; refusing to use it")
                try:
                    with self._ek_session(ek, ek_public) as session:
                        handle = ctx.load(ek, private, public, session1=session)
                except TSS2_Exception as exc:
                    # Only a format-one error (integrity, binding, key) says these blobs do not belong to
                    # this TPM; warnings such as TPM_RC_RETRY or TPM_RC_OBJECT_MEMORY are transient.
                    if _is_transport_error(exc) or not exc.fmt1:
                        raise
                    raise TpmError(
                        f"this TPM cannot load the AK saved in {pub_path} ({exc}); if the TPM was replaced "
                        f"or its endorsement seed changed, remove {pub_path.name} and {priv_path.name} to "
                        "create a new AK (the device must then enroll again)", rc=int(exc.rc)) from exc
                created = False
            else:
                with self._ek_session(ek, ek_public) as session:
                    private, public, _, _, _ = ctx.create(ek, TPM2B_SENSITIVE_CREATE(), expected,
                                                          session1=session)
                # Private first: the public file's presence marks a complete pair.
                _write_state(priv_path, bytes(private.marshal()))
                _write_state(pub_path, bytes(public.marshal()))
                with self._ek_session(ek, ek_public) as session:
                    handle = ctx.load(ek, private, public, session1=session)
                created = True
        self._ak_handle = handle
        self._ak_key = _crypto_public_key(public.publicArea)
        self._ak = AttestationKey(public=bytes(public.marshal()), name=bytes(public.get_name()),
                                  alg=self._ak_alg)
        if created:
            log.info("created %s AK %s (saved in %s)", self._ak_alg.upper(), self._ak.name.hex(), pub_path)

    # -- PCRs and quotes ---------------------------------------------------------------------------
    def read_pcrs(self, selection: Mapping[str, Sequence[int]]) -> dict[str, dict[int, bytes]]:
        """PCR values ``{bank: {index: digest}}`` of ``selection`` (e.g. ``{"sha256": [0, 7]}``).

        TPM2_PCR_Read returns at most 8 digests per call; the adapter loops, and starts over if a PCR
        changed between two calls, so the result is one consistent snapshot.  Raises
        :class:`TpmError` if a bank is not allocated.
        """
        sel = canonical_selection(selection)
        with self._lock:
            return self._run("TPM2_PCR_Read", lambda: self._read_pcrs(sel))

    def _read_pcrs(self, sel: Selection) -> dict[str, dict[int, bytes]]:
        for _ in range(_PCR_READ_ATTEMPTS):
            result: dict[str, dict[int, bytes]] = {bank: {} for bank, _ in sel}
            counter: int | None = None
            consistent = True
            while True:
                remaining = tuple((bank, tuple(i for i in pcrs if i not in result[bank]))
                                  for bank, pcrs in sel)
                remaining = tuple((bank, pcrs) for bank, pcrs in remaining if pcrs)
                if not remaining:
                    break
                update_counter, got_sel, digests = self._ctx.pcr_read(_tpml_selection(remaining))
                if counter is not None and int(update_counter) != counter:
                    consistent = False
                    break
                counter = int(update_counter)
                values = _digest_list(digests)
                got = [(alg, i) for alg, pcrs in _selection_entries(got_sel) for i in pcrs]
                if not got or len(got) != len(values):
                    missing = ", ".join(f"{bank}:{','.join(map(str, pcrs))}" for bank, pcrs in remaining)
                    raise TpmError(f"the TPM returned no values for PCRs {missing} (bank not allocated?)")
                for (alg, index), value in zip(got, values, strict=True):
                    bank_values = result.get(HASH_ALGS[alg][0]) if alg in HASH_ALGS else None
                    if bank_values is None or index in bank_values:
                        raise TpmError(f"TPM2_PCR_Read returned an unrequested PCR "
                                       f"(alg 0x{alg:04x}, index {index})")
                    bank_values[index] = value
            if consistent:
                return result
            log.debug("PCRs changed while reading them; reading again")
        raise TpmError("PCR values kept changing while reading them")

    def quote(self, nonce: bytes, selection: Mapping[str, Sequence[int]], *, with_pcrs: bool = True) -> Quote:
        """TPM2_Quote of ``selection`` by the AK with ``nonce`` as qualifyingData (1..64 bytes).

        One TPM signature per call in the normal case.  With ``with_pcrs`` the PCR values are read
        after the quote and must hash to the quote's pcrDigest; if a PCR was extended in between, the
        quote is made again (at most 3 times).  The AK stays loaded between calls.
        """
        nonce = _check_qualifying_data(nonce, "nonce")
        sel = canonical_selection(selection)
        with self._lock:
            return self._run("TPM2_Quote", lambda: self._quote(nonce, sel, with_pcrs), uses_ak=True)

    def _signed_by_ak(self, message: bytes, signature: bytes) -> bool:
        return self._ak_key is not None and _verify_signature(self._ak_key, message, signature)

    def _quote(self, nonce: bytes, sel: Selection, with_pcrs: bool) -> Quote:
        tpml = _tpml_selection(sel)
        expected_selection = marshal_pcr_selection(sel)
        for _ in range(_QUOTE_ATTEMPTS):
            quoted, signature = self._ctx.quote(self._ak_handle, tpml, nonce,
                                                TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL))
            attest = bytes(quoted)  # the TPM2B_ATTEST buffer: TPMS_ATTEST exactly as signed
            sig = bytes(signature.marshal())
            if not self._signed_by_ak(attest, sig):
                # The handle addressed another signing key: the AK was flushed or the TPM reset.
                raise _AkLost
            info, _ = TPMS_ATTEST.unmarshal(attest)
            quoted_sel = bytes(info.attested.quote.pcrSelect.marshal())
            if quoted_sel != expected_selection:
                raise TpmError("the TPM quoted another PCR selection than requested (bank not allocated?)")
            if not with_pcrs:
                return Quote(attest=attest, signature=sig, pcrs={})
            quoted_digest = bytes(info.attested.quote.pcrDigest)
            # Within a boot the PCRs rarely change: if the values read for an earlier quote hash to
            # this quote's (TPM-signed) pcrDigest, they are exactly the quoted values, and the PCR
            # reads (two TPM round trips for 12 PCRs) are saved.  Any change misses and reads.
            cached = self._pcr_cache.get(sel)
            if cached is not None and hmac.compare_digest(pcr_digest(sel, cached, AK_HASH), quoted_digest):
                return Quote(attest=attest, signature=sig, pcrs={b: dict(v) for b, v in cached.items()})
            pcrs = self._read_pcrs(sel)
            if hmac.compare_digest(pcr_digest(sel, pcrs, AK_HASH), quoted_digest):
                self._pcr_cache[sel] = {b: dict(v) for b, v in pcrs.items()}
                return Quote(attest=attest, signature=sig, pcrs=pcrs)
            log.info("a quoted PCR changed before it could be read; quoting again")
        raise TpmError("PCR values kept changing between quote and read")

    # -- credential activation ---------------------------------------------------------------------
    def activate_credential(self, credential_blob: bytes, encrypted_secret: bytes) -> bytes:
        """TPM2_ActivateCredential with the AK as object and the EK as key; returns the secret.

        ``credential_blob`` is the marshalled **TPM2B_ID_OBJECT** (UINT16 size, then the
        integrityHMAC as TPM2B_DIGEST followed by encIdentity), ``encrypted_secret`` the marshalled
        **TPM2B_ENCRYPTED_SECRET** (UINT16 size, then the EK-encrypted seed) — the two outputs of
        TPM2_MakeCredential / ``tpm2_pytss.utils.make_credential``.  (``tpm2_makecredential`` writes
        both after an 8-byte header: magic 0xBADCC0DE and version 1.)  Raises :class:`TpmError`
        (TPM_RC_INTEGRITY) if the credential was made for another AK name or another EK.

        The returned secret is sensitive: never log it.
        """
        blob = _unmarshal_exact(TPM2B_ID_OBJECT, credential_blob, "credential blob (TPM2B_ID_OBJECT)")
        secret = _unmarshal_exact(TPM2B_ENCRYPTED_SECRET, encrypted_secret,
                                  "encrypted secret (TPM2B_ENCRYPTED_SECRET)")
        with self._lock:
            return self._run("TPM2_ActivateCredential", lambda: self._activate(blob, secret), uses_ak=True)

    def _activate(self, blob: Any, secret: Any) -> bytes:
        self._check_ak()
        ek, ek_public = self._create_ek(self._ek_alg)
        with self._transient(ek), self._ek_session(ek, ek_public, encrypt=True) as session:
            # activateHandle (AK) needs ADMIN: its empty authValue via a password session; keyHandle (EK)
            # needs USER: the EK session (TPM 2.0 Part 3, 12.5).
            cert_info = self._ctx.activate_credential(self._ak_handle, ek, blob, secret,
                                                      session1=ESYS_TR.PASSWORD, session2=session)
        return bytes(cert_info)

    # -- bound keys (model protection) -------------------------------------------------------------
    def create_bound_key(self, pcr_selection: Mapping[str, Sequence[int]],
                         pcr_values: Mapping[str, Mapping[int, bytes]] | None = None) -> BoundKey:
        """Create an RSA-2048 OAEP-SHA256 decryption key that works only while ``pcr_selection`` holds
        ``pcr_values`` (default: the current values).

        The key lives under the SRK; its blobs and metadata are saved in ``state_dir`` under the
        returned ``key_id``.  Its authPolicy is described in :mod:`protocol.tpm.policy`.
        """
        sel = canonical_selection(pcr_selection)
        if pcr_values is not None:
            pcr_composite(sel, pcr_values)  # validates presence and sizes before touching the TPM
        with self._lock:
            return self._run("creating a bound key", lambda: self._create_bound_key(sel, pcr_values))

    def _create_bound_key(self, sel: Selection, values: Mapping[str, Mapping[int, bytes]] | None) -> BoundKey:
        ctx = self._ctx
        if values is None:
            values = self._read_pcrs(sel)
        policy = bound_key_policy(sel, values)
        srk, srk_public = ctx.create_primary(TPM2B_SENSITIVE_CREATE(), srk_template(), ESYS_TR.OWNER)[:2]
        with self._transient(srk):
            template = bound_key_template(policy.digest)
            private, public, _, _, _ = ctx.create(srk, TPM2B_SENSITIVE_CREATE(), template)
        if bytes(public.publicArea.authPolicy) != policy.digest:
            raise TpmError("the TPM created the bound key with a different authPolicy")
        name = bytes(public.get_name())
        key = BoundKey(key_id=name[2:18].hex(), public=bytes(public.marshal()), name=name, policy=policy,
                       pcr_selection=sel)
        meta = {
            "format": _STATE_FORMAT,
            "pcr_selection": selection_to_dict(sel),
            "policy": {"digest": policy.digest.hex(), "decrypt_branch": policy.decrypt_branch.hex(),
                       "certify_branch": policy.certify_branch.hex()},
            "srk_name": bytes(srk_public.get_name()).hex(),
        }
        base = self._state_dir / f"bound-{key.key_id}"
        _write_state(base.with_suffix(".priv"), bytes(private.marshal()))
        _write_state(base.with_suffix(".json"), json.dumps(meta, sort_keys=True).encode())
        _write_state(base.with_suffix(".pub"), key.public)  # last: marks a complete key
        log.info("created bound key %s over %s", key.key_id, selection_to_dict(sel))
        return key

    def bound_key(self, key_id: str) -> BoundKey:
        """The bound key saved in ``state_dir`` under ``key_id`` (no TPM access)."""
        return self._stored_bound_key(key_id).key

    def _stored_bound_key(self, key: BoundKey | str) -> _StoredBoundKey:
        key_id = key.key_id if isinstance(key, BoundKey) else key
        if not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id):
            raise MalformedInputError(f"invalid bound key id {key_id!r}")
        base = self._state_dir / f"bound-{key_id}"
        public = _stored(TPM2B_PUBLIC, base.with_suffix(".pub"))
        private = _stored(TPM2B_PRIVATE, base.with_suffix(".priv"))
        meta_path = base.with_suffix(".json")
        try:
            meta = json.loads(_read_state(meta_path))
            if meta["format"] != _STATE_FORMAT:
                raise StorageError(f"{meta_path}: unsupported format {meta['format']!r}")
            sel = canonical_selection(meta["pcr_selection"])
            policy = BoundKeyPolicy(decrypt_branch=bytes.fromhex(meta["policy"]["decrypt_branch"]),
                                    certify_branch=bytes.fromhex(meta["policy"]["certify_branch"]),
                                    digest=bytes.fromhex(meta["policy"]["digest"]))
            srk_name = bytes.fromhex(meta["srk_name"])
        except (ValueError, KeyError, TypeError, MalformedInputError) as exc:
            raise StorageError(f"{meta_path} is corrupt: {exc}") from exc
        name = bytes(public.get_name())
        consistent = (name[2:18].hex() == key_id
                      and policy_or(list(policy.branches)) == policy.digest
                      and bytes(public.publicArea.authPolicy) == policy.digest
                      and same_template(public.publicArea, bound_key_template(policy.digest).publicArea))
        if not consistent:
            raise StorageError(f"bound key {key_id}: stored public area, name and policy disagree")
        bound = BoundKey(key_id=key_id, public=bytes(public.marshal()), name=name, policy=policy,
                         pcr_selection=sel)
        return _StoredBoundKey(key=bound, public=public, private=private, srk_name=srk_name)

    @contextlib.contextmanager
    def _bound_key_loaded(self, stored: _StoredBoundKey, *, keep_srk: bool) -> Iterator[tuple[Any, Any]]:
        """Load a bound key under a fresh SRK; yields (key handle, SRK handle or None)."""
        ctx = self._ctx
        srk, srk_public = ctx.create_primary(TPM2B_SENSITIVE_CREATE(), srk_template(), ESYS_TR.OWNER)[:2]
        srk_loaded = True
        try:
            if bytes(srk_public.get_name()) != stored.srk_name:
                # Also catches an interposer presenting its own SRK to learn the session salt.
                raise TpmError(f"bound key {stored.key.key_id}: the storage root key differs from the one it "
                               "was created under (TPM cleared or replaced?)")
            handle = ctx.load(srk, stored.private, stored.public)
            with self._transient(handle):
                if not keep_srk:  # free the object slot before the command that needs the AK too
                    srk_loaded = False
                    self._flush(srk)
                yield handle, (srk if keep_srk else None)
        finally:
            if srk_loaded:
                self._flush(srk)

    def _bound_key_session(self, stored: _StoredBoundKey, command: int, salt_key: Any) -> Any:
        """A policy session satisfying the bound key's policy for ``command`` (caller flushes it)."""
        ctx = self._ctx
        sym = _AES128_CFB if salt_key is not None else _NO_SYM
        session = ctx.start_auth_session(salt_key if salt_key is not None else ESYS_TR.NONE, ESYS_TR.NONE,
                                         TPM2_SE.POLICY, sym, TPM2_ALG.SHA256)
        try:
            if salt_key is not None:
                ctx.trsess_set_attributes(session, TPMA_SESSION.CONTINUESESSION | TPMA_SESSION.ENCRYPT)
            if command == TPM2_CC.RSA_Decrypt:
                # Empty pcrDigest: the TPM hashes the current values (Part 3, 23.7).
                ctx.policy_pcr(session, b"", _tpml_selection(stored.key.pcr_selection))
            ctx.policy_command_code(session, command)
            try:
                ctx.policy_or(session, TPML_DIGEST(list(stored.key.policy.branches)))
            except TSS2_Exception as exc:
                if _error_code(exc) == _RC_VALUE:
                    raise TpmError(
                        f"bound key {stored.key.key_id}: a policy check failed: the current values of "
                        f"PCRs {selection_to_dict(stored.key.pcr_selection)} differ from those the key is "
                        "bound to",
                        rc=int(exc.rc)) from exc
                raise
        except BaseException:
            self._flush(session)
            raise
        return session

    def certify(self, key: BoundKey | str, qualifying_data: bytes) -> Certification:
        """TPM2_Certify of a bound key by the AK, with ``qualifying_data`` (1..64 bytes, e.g. a nonce).

        The attested TPMS_CERTIFY_INFO carries the key's name, which binds its public area (and so its
        authPolicy and attributes) to this TPM's AK.
        """
        qualifying_data = _check_qualifying_data(qualifying_data, "qualifying data")
        stored = self._stored_bound_key(key)
        with self._lock:
            return self._run("TPM2_Certify", lambda: self._certify(stored, qualifying_data), uses_ak=True)

    def _certify(self, stored: _StoredBoundKey, qualifying_data: bytes) -> Certification:
        self._check_ak()
        with self._bound_key_loaded(stored, keep_srk=False) as (handle, _):
            session = self._bound_key_session(stored, TPM2_CC.Certify, None)
            with self._transient(session):
                attest, signature = self._ctx.certify(handle, self._ak_handle, qualifying_data,
                                                      TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL),
                                                      session1=session, session2=ESYS_TR.PASSWORD)
        cert = Certification(attest=bytes(attest), signature=bytes(signature.marshal()))
        if not self._signed_by_ak(cert.attest, cert.signature):
            raise _AkLost
        return cert

    def unwrap(self, key: BoundKey | str, ciphertext: bytes, label: bytes = b"") -> bytes:
        """TPM2_RSA_Decrypt of an OAEP-SHA256 ``ciphertext`` with a bound key, in a policy session.

        ``label`` is the exact OAEP label the sender used; the TPM requires it to be empty or to end
        with a zero octet (TPM 2.0 Part 1, B.4: the label is a NUL-terminated string and the NUL is part
        of it).  Raises :class:`TpmError` saying "a policy check failed" when the PCRs are not in the
        bound state, and :class:`TpmError` if the ciphertext was not made for this key.

        The returned plaintext is a secret (a data key): never log it, drop it as soon as it is used.
        """
        if not isinstance(ciphertext, bytes | bytearray) or len(ciphertext) != RSA2048_BYTES:
            raise MalformedInputError(f"ciphertext must be {RSA2048_BYTES} bytes (RSA-2048)")
        if not isinstance(label, bytes | bytearray) or len(label) > MAX_QUALIFYING_DATA:
            raise MalformedInputError(f"label must be bytes of at most {MAX_QUALIFYING_DATA} octets")
        if label and label[-1] != 0:
            raise MalformedInputError("a non-empty OAEP label must end with a zero octet (TPM requirement)")
        stored = self._stored_bound_key(key)
        with self._lock:
            return self._run("unwrapping with a bound key",
                             lambda: self._unwrap(stored, bytes(ciphertext), bytes(label)))

    def _unwrap(self, stored: _StoredBoundKey, ciphertext: bytes, label: bytes) -> bytes:
        with self._bound_key_loaded(stored, keep_srk=True) as (handle, srk):
            # Salted with the SRK (its name was checked above) and response-encrypted: the data key
            # does not cross the TPM bus in clear.
            session = self._bound_key_session(stored, TPM2_CC.RSA_Decrypt, srk)
            with self._transient(session):
                try:
                    scheme = TPMT_RSA_DECRYPT(scheme=TPM2_ALG.NULL)  # the key's own OAEP-SHA256
                    plaintext = self._ctx.rsa_decrypt(handle, ciphertext, scheme, label, session1=session)
                except TSS2_Exception as exc:
                    # swtpm answers TPM_RC_FAILURE, hardware TPM_RC_VALUE, when OAEP decoding fails.
                    if _error_code(exc) in (_RC_VALUE, _RC_FAILURE):
                        raise TpmError(f"bound key {stored.key.key_id}: the ciphertext does not decrypt "
                                       "under this key (made for another key, other label, or corrupted)",
                                       rc=int(exc.rc)) from exc
                    raise
        return bytes(plaintext)

    # -- monotonic NV counter ----------------------------------------------------------------------
    @property
    def counter_index(self) -> int:
        """NV index of the monotonic counter."""
        return self._counter_index

    def counter_define(self) -> None:
        """Define the NV counter (TPM_NT_COUNTER, owner read/write) unless it exists; idempotent.

        A new counter is incremented once so that it is readable (TPM 2.0 Part 3, 31.8: a counter
        starts at the highest value any counter had, and only after its first increment).  An index
        that exists with other attributes is refused.
        """
        with self._lock:
            self._run("defining the NV counter", self._counter_define)

    def _counter_attributes(self) -> int:
        return int(TPMA_NV.OWNERWRITE | TPMA_NV.OWNERREAD | (TPM2_NT.COUNTER << TPMA_NV.TPM2_NT_SHIFT))

    def _counter_define(self) -> None:
        ctx = self._ctx
        index = self._counter_index
        handle = self._nv_handle(index)
        if handle is None:
            nv_public = TPM2B_NV_PUBLIC(nvPublic=TPMS_NV_PUBLIC(
                nvIndex=index, nameAlg=TPM2_ALG.SHA256, attributes=self._counter_attributes(), dataSize=8))
            try:
                handle = ctx.nv_define_space(b"", nv_public, auth_handle=ESYS_TR.OWNER)
                log.info("defined NV counter 0x%08x", index)
            except TSS2_Exception as exc:
                if _error_code(exc) != _RC_NV_DEFINED:  # lost a race with another definer: fine
                    raise
                handle = self._nv_handle(index)
                if handle is None:
                    raise
        try:
            nv_public, _ = ctx.nv_read_public(handle)
            attrs = int(nv_public.nvPublic.attributes)
            mask = ~int(TPMA_NV.WRITTEN)
            if (attrs & mask) != self._counter_attributes() or int(nv_public.nvPublic.dataSize) != 8:
                raise TpmError(f"NV index 0x{index:08x} exists but is not an owner-authorized counter "
                               f"(attributes 0x{attrs:08x}); choose another counter index")
            if not attrs & int(TPMA_NV.WRITTEN):
                ctx.nv_increment(handle, auth_handle=ESYS_TR.OWNER)
        finally:
            with contextlib.suppress(TSS2_Exception):
                ctx.tr_close(handle)

    def _nv_handle(self, index: int) -> Any:
        """ESYS handle of an NV index (caller tr_closes it), or None if the index is not defined.

        Asks TPM2_GetCapability first: looking up an undefined index through TPM2_NV_ReadPublic works
        too, but makes tpm2-tss log an ERROR line for what is an expected answer.
        """
        _, data = self._ctx.get_capability(TPM2_CAP.HANDLES, index, 1)
        handles = list(data.data.handles)
        if not handles or int(handles[0]) != index:
            return None
        try:
            return self._ctx.tr_from_tpmpublic(index)
        except TSS2_Exception as exc:
            if _error_code(exc) == _RC_HANDLE:  # undefined in between
                return None
            raise

    def _counter_handle(self) -> Any:
        handle = self._nv_handle(self._counter_index)
        if handle is None:
            raise TpmError(f"NV counter 0x{self._counter_index:08x} is not defined; call counter_define()")
        return handle

    def counter_increment(self) -> int:
        """Increment the NV counter; returns the new value.

        Not retried after a transport failure (the increment may have happened): the caller then
        sees :class:`TpmError`, and the counter may be one higher — the safe direction.
        """
        def increment() -> int:
            handle = self._counter_handle()
            try:
                self._ctx.nv_increment(handle, auth_handle=ESYS_TR.OWNER)
                return self._counter_value(handle)
            finally:
                with contextlib.suppress(TSS2_Exception):
                    self._ctx.tr_close(handle)

        with self._lock:
            return self._run("TPM2_NV_Increment", increment, retry=False)

    def counter_read(self) -> int:
        """Current value of the NV counter."""
        def read() -> int:
            handle = self._counter_handle()
            try:
                return self._counter_value(handle)
            finally:
                with contextlib.suppress(TSS2_Exception):
                    self._ctx.tr_close(handle)

        with self._lock:
            return self._run("TPM2_NV_Read", read)

    def _counter_value(self, handle: Any) -> int:
        return int.from_bytes(bytes(self._ctx.nv_read(handle, 8, 0, auth_handle=ESYS_TR.OWNER)), "big")

    # -- small owner-authorized NV data index ------------------------------------------------------
    def _nv_data_attributes(self) -> int:
        return int(TPMA_NV.OWNERWRITE | TPMA_NV.OWNERREAD | (TPM2_NT.ORDINARY << TPMA_NV.TPM2_NT_SHIFT))

    def nv_data_read(self, index: int, size: int) -> bytes | None:
        """The ``size`` bytes of the NV data index ``index``, or ``None`` if it is undefined or was never
        written.  An index of another type or size is refused (:class:`TpmError`)."""
        def read() -> bytes | None:
            handle = self._nv_handle(index)
            if handle is None:
                return None
            try:
                attrs = self._check_nv_data(handle, index, size)
                if not attrs & int(TPMA_NV.WRITTEN):
                    return None
                return bytes(self._ctx.nv_read(handle, size, 0, auth_handle=ESYS_TR.OWNER))
            finally:
                with contextlib.suppress(TSS2_Exception):
                    self._ctx.tr_close(handle)

        self._check_nv_data_index(index, size)
        with self._lock:
            return self._run("TPM2_NV_Read", read)

    def nv_data_write(self, index: int, data: bytes) -> None:
        """Write ``data`` to the NV data index ``index`` (owner read/write, ``len(data)`` bytes), defining
        it first if it does not exist.  TPM NV has a finite write endurance: call it rarely."""
        size = len(data)

        def write() -> None:
            handle = self._nv_handle(index)
            if handle is None:
                nv_public = TPM2B_NV_PUBLIC(nvPublic=TPMS_NV_PUBLIC(
                    nvIndex=index, nameAlg=TPM2_ALG.SHA256, attributes=self._nv_data_attributes(),
                    dataSize=size))
                handle = self._ctx.nv_define_space(b"", nv_public, auth_handle=ESYS_TR.OWNER)
                log.info("defined NV data index 0x%08x (%d bytes)", index, size)
            try:
                self._check_nv_data(handle, index, size)
                self._ctx.nv_write(handle, data, 0, auth_handle=ESYS_TR.OWNER)
            finally:
                with contextlib.suppress(TSS2_Exception):
                    self._ctx.tr_close(handle)

        self._check_nv_data_index(index, size)
        with self._lock:
            self._run("TPM2_NV_Write", write)

    @staticmethod
    def _check_nv_data_index(index: int, size: int) -> None:
        if not NV_OWNER_RANGE[0] <= index <= NV_OWNER_RANGE[1]:
            raise ConfigError(f"NV index 0x{index:08x} is outside the owner range "
                              f"0x{NV_OWNER_RANGE[0]:08x}-0x{NV_OWNER_RANGE[1]:08x}")
        if not 1 <= size <= 64:
            raise ConfigError(f"NV data index size {size} is outside 1..64 bytes")

    def _check_nv_data(self, handle: Any, index: int, size: int) -> int:
        nv_public, _ = self._ctx.nv_read_public(handle)
        attrs = int(nv_public.nvPublic.attributes)
        if (attrs & ~int(TPMA_NV.WRITTEN)) != self._nv_data_attributes() \
                or int(nv_public.nvPublic.dataSize) != size:
            raise TpmError(f"NV index 0x{index:08x} exists but is not an owner-authorized {size}-byte data "
                           f"index (attributes 0x{attrs:08x}); choose another index")
        return attrs


def _stored(cls: Any, path: Path) -> Any:
    """Unmarshal a TPM structure saved in a state file (StorageError if missing or corrupt)."""
    data = _read_state(path)
    try:
        return _unmarshal_exact(cls, data, str(path))
    except MalformedInputError as exc:
        raise StorageError(str(exc)) from exc


__all__ = [
    "DEFAULT_COUNTER_INDEX",
    "AttestationKey",
    "BoundKey",
    "BoundKeyPolicy",
    "Certification",
    "Quote",
    "TpmAdapter",
]
