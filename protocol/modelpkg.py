"""Encrypted, signed model packages (see docs/model-package.md for the byte layout).

A package carries one model (an ONNX file) encrypted with AES-256-GCM under a fresh 256-bit data
key, in fixed-size chunks, behind a manifest signed by the publisher with ECDSA P-256::

    magic "EAMPKG" | u16 format | u32 manifest length | manifest | key id (16 hex) | r||s | chunks

* The **publisher** (fleet server) calls :func:`build_package`; the data key comes from the caller
  (``secrets.token_bytes(32)``, one per version) and is later wrapped to each trusted device's TPM key.
* The **device** calls :func:`read_manifest` when a package arrives (signature over the manifest
  bytes as received, strict parse, bounds, ciphertext SHA-256: all without the data key), and
  :func:`decrypt_package` once the key broker has released the data key (every chunk's GCM tag, the
  key commitment and the plaintext SHA-256). :func:`require_not_older` refuses a version rollback.

Chunk ``i`` is sealed with nonce ``package_id[:4] || u64be(i)`` and associated data binding the
magic, format, package id, model name, version, chunk index, chunk count and a last-chunk flag, so a
chunk cannot be moved, dropped, duplicated or transplanted between packages even by someone who
holds the data key of both.

Everything here is pure: bytes in, bytes/values out, errors from the :class:`ModelPackageError`
family. Nothing is written anywhere; the plaintext exists only in the buffer that
:func:`decrypt_package` returns (and is zeroed there before any failure is raised).
"""

from __future__ import annotations

import hashlib
import hmac
import mmap
import re
import secrets
import struct
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from queue import SimpleQueue

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from protocol.encoding import JsonValue, b64encode, canonical_bytes, decode_object
from protocol.errors import MalformedInputError, MessageError, SignatureError, VerificationError
from protocol.messages import KID_RE, NAME_RE, Fields, sign_bytes, verify_bytes
from protocol.outbuf import output_buffer

__all__ = [
    "CIPHER",
    "DTYPES",
    "FORMAT_VERSION",
    "MAGIC",
    "ChunkAuthenticationError",
    "IoSignature",
    "Manifest",
    "ModelPackageError",
    "PackageFormatError",
    "PackageIntegrityError",
    "PackageKeyError",
    "PackageSignatureError",
    "TensorSpec",
    "VersionRollbackError",
    "build_package",
    "chunk_aad",
    "chunk_nonce",
    "compare_versions",
    "decrypt_package",
    "key_commitment",
    "parse_version",
    "read_manifest",
    "require_not_older",
]

# --------------------------------------------------------------------------------------------------
# format constants and bounds
# --------------------------------------------------------------------------------------------------
MAGIC = b"EAMPKG"
FORMAT_VERSION = 1
CIPHER = "AES-256-GCM"
MANIFEST_TYPE = "edge-attest/model-package"
_HEADER = struct.Struct(">6sHI")           # magic, format version, manifest length
HEADER_SIZE = _HEADER.size                  # 12
KID_SIZE = 16                               # protocol.messages.key_id(): 16 lowercase hex characters
SIG_SIZE = 64                               # ECDSA P-256 r || s
TAG_SIZE = 16                               # AES-GCM tag
KEY_SIZE = 32                               # AES-256
PACKAGE_ID_SIZE = 16

# Domain separation: the publisher's key may sign other things (wire messages); a manifest signature
# must never be valid as anything else, nor the other way round.
SIGNING_CONTEXT = b"edge-attest/model-package/v1/manifest\x00"
KEY_CHECK_CONTEXT = b"edge-attest/model-package/v1/key-check\x00"

MAX_MANIFEST_SIZE = 64 * 1024
MIN_CHUNK_SIZE = 1024
MAX_CHUNK_SIZE = 64 * 1024 * 1024
MAX_PLAINTEXT_SIZE = 2**31                  # protobuf (ONNX) cannot hold a larger model anyway
MAX_TENSORS = 64
MAX_RANK = 8
MAX_DIM = 2**31 - 1
MAX_VERSION_PART = 999_999_999

DTYPES = ("float32", "float16", "float64", "int8", "uint8", "int16", "int32", "int64", "bool")
TENSOR_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:/-]{0,127}$")
VERSION_RE = re.compile(r"^(0|[1-9][0-9]{0,8})\.(0|[1-9][0-9]{0,8})\.(0|[1-9][0-9]{0,8})$")
PACKAGE_ID_RE = re.compile(r"^[0-9a-f]{32}$")

BytesLike = bytes | bytearray | memoryview | mmap.mmap


# --------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------
class ModelPackageError(VerificationError):
    """A model package must not be used: malformed, unsigned, tampered with, or the wrong key."""


class PackageFormatError(ModelPackageError, MalformedInputError):
    """The package bytes or its manifest are malformed, out of bounds, or do not fit together."""


class PackageSignatureError(ModelPackageError, SignatureError):
    """The manifest is signed by an unknown key or its signature does not verify."""


class PackageIntegrityError(ModelPackageError):
    """A digest named in the signed manifest does not match the bytes (ciphertext or plaintext)."""


class PackageKeyError(ModelPackageError):
    """The data key is malformed or is not the key this package was sealed with."""


class ChunkAuthenticationError(ModelPackageError):
    """A chunk's AES-GCM tag failed: tampered, truncated, reordered or taken from another package."""


class VersionRollbackError(ModelPackageError):
    """A package is older than the version the device already holds."""


# --------------------------------------------------------------------------------------------------
# io signature
# --------------------------------------------------------------------------------------------------
Dim = int | None


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One model input or output: name, element type and shape (``None`` marks a dynamic dimension).

    ``-1`` is accepted for a dynamic dimension and normalised to ``None``.
    """

    name: str
    dtype: str
    shape: tuple[Dim, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not TENSOR_NAME_RE.fullmatch(self.name):
            raise PackageFormatError(f"tensor name {self.name!r} is not allowed")
        if self.dtype not in DTYPES:
            raise PackageFormatError(f"tensor {self.name}: dtype {self.dtype!r} is not one of "
                                     f"{', '.join(DTYPES)}")
        shape = tuple(None if d == -1 else d for d in self.shape)
        if len(shape) > MAX_RANK:
            raise PackageFormatError(f"tensor {self.name}: rank {len(shape)} exceeds {MAX_RANK}")
        for d in shape:
            if d is not None and (not isinstance(d, int) or isinstance(d, bool) or not 1 <= d <= MAX_DIM):
                raise PackageFormatError(f"tensor {self.name}: dimension {d!r} must be 1..{MAX_DIM} "
                                         "or dynamic")
        object.__setattr__(self, "shape", shape)

    def to_json(self) -> dict[str, JsonValue]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, obj: JsonValue, where: str) -> TensorSpec:
        f = Fields(obj, where)
        name = f.text("name", max_len=128, pattern=TENSOR_NAME_RE)
        dtype = f.text("dtype", max_len=16, choices=DTYPES)
        shape = f.raw("shape")
        f.done()
        if not isinstance(shape, list) or len(shape) > MAX_RANK:
            raise MessageError(f"{where}.shape: expected a list of at most {MAX_RANK} dimensions")
        for d in shape:
            if d is not None and (not isinstance(d, int) or isinstance(d, bool) or not 1 <= d <= MAX_DIM):
                raise MessageError(f"{where}.shape: dimensions must be 1..{MAX_DIM} or null")
        return cls(name=name, dtype=dtype, shape=tuple(shape))


@dataclass(frozen=True, slots=True)
class IoSignature:
    """The model's inputs and outputs, as the device validates requests against them."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def __post_init__(self) -> None:
        for side, specs in (("inputs", self.inputs), ("outputs", self.outputs)):
            if not 1 <= len(specs) <= MAX_TENSORS:
                raise PackageFormatError(f"io signature: 1..{MAX_TENSORS} {side} required")
            names = [s.name for s in specs]
            if len(set(names)) != len(names):
                raise PackageFormatError(f"io signature: duplicate names among {side}")

    def input(self, name: str) -> TensorSpec:
        """The input spec called ``name`` (``KeyError`` if absent)."""
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise KeyError(name)

    def to_json(self) -> dict[str, JsonValue]:
        return {"inputs": [s.to_json() for s in self.inputs], "outputs": [s.to_json() for s in self.outputs]}

    @classmethod
    def from_json(cls, obj: JsonValue, where: str) -> IoSignature:
        f = Fields(obj, where)
        sides: list[tuple[TensorSpec, ...]] = []
        for side in ("inputs", "outputs"):
            items = f.raw(side)
            if not isinstance(items, list) or not 1 <= len(items) <= MAX_TENSORS:
                raise MessageError(f"{where}.{side}: expected a list of 1..{MAX_TENSORS} tensors")
            sides.append(tuple(TensorSpec.from_json(item, f"{where}.{side}[{i}]")
                               for i, item in enumerate(items)))
        f.done()
        return cls(inputs=sides[0], outputs=sides[1])


# --------------------------------------------------------------------------------------------------
# versions
# --------------------------------------------------------------------------------------------------
def parse_version(text: str) -> tuple[int, int, int]:
    """``"1.2.3"`` -> ``(1, 2, 3)``. Only MAJOR.MINOR.PATCH of decimal numbers without leading zeros."""
    m = VERSION_RE.fullmatch(text) if isinstance(text, str) else None
    if m is None:
        raise PackageFormatError(f"version {text!r} is not MAJOR.MINOR.PATCH")
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1 as version ``a`` is older than, equal to or newer than ``b`` (numeric per part)."""
    va, vb = parse_version(a), parse_version(b)
    return (va > vb) - (va < vb)


def require_not_older(candidate: str, held: str | None, *, allow_same: bool = True) -> None:
    """Refuse ``candidate`` if it is older than the ``held`` version (or equal, unless ``allow_same``).

    ``held`` is the highest version the device has accepted for this model (``None``: none yet). The
    agent must persist that high-water mark with the same rollback protection as its counters.
    """
    parse_version(candidate)
    if held is None:
        return
    order = compare_versions(candidate, held)
    if order < 0 or (order == 0 and not allow_same):
        raise VersionRollbackError(f"model version {candidate} is older than the held version {held}"
                                   if order < 0 else f"model version {candidate} is already held")


# --------------------------------------------------------------------------------------------------
# manifest
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Manifest:
    """A verified manifest. ``raw`` is the manifest bytes exactly as signed and received."""

    name: str
    version: str
    package_id: bytes
    cipher: str
    plaintext_size: int
    chunk_size: int
    chunk_count: int
    plaintext_sha256: bytes
    ciphertext_sha256: bytes
    key_check: bytes
    io_signature: IoSignature
    created_at: int  # ms since the epoch
    key_id: str = ""
    raw: bytes = field(default=b"", repr=False)

    @property
    def data_offset(self) -> int:
        """Offset of the first chunk record in the package."""
        return HEADER_SIZE + len(self.raw) + KID_SIZE + SIG_SIZE

    @property
    def ciphertext_size(self) -> int:
        """Total length of the chunk records (ciphertext plus one tag per chunk)."""
        return self.plaintext_size + TAG_SIZE * self.chunk_count

    def chunk_length(self, index: int) -> int:
        """Plaintext length of chunk ``index`` (every chunk is full except possibly the last)."""
        if index == self.chunk_count - 1:
            return self.plaintext_size - self.chunk_size * index
        return self.chunk_size

    def body(self) -> dict[str, JsonValue]:
        """The manifest's JSON object (what is canonically encoded and signed)."""
        return {
            "type": MANIFEST_TYPE, "format": FORMAT_VERSION, "name": self.name, "version": self.version,
            "package_id": self.package_id.hex(), "cipher": self.cipher,
            "plaintext_size": self.plaintext_size, "chunk_size": self.chunk_size,
            "chunk_count": self.chunk_count, "plaintext_sha256": b64encode(self.plaintext_sha256),
            "ciphertext_sha256": b64encode(self.ciphertext_sha256), "key_check": b64encode(self.key_check),
            "io_signature": self.io_signature.to_json(), "created_at": self.created_at,
        }


def _parse_manifest(raw: bytes, key_id: str) -> Manifest:
    obj = decode_object(raw, max_size=MAX_MANIFEST_SIZE)
    f = Fields(obj, "manifest")
    f.text("type", max_len=64, choices=(MANIFEST_TYPE,))
    fmt = f.integer("format", hi=1000)
    if fmt != FORMAT_VERSION:
        raise MessageError(f"manifest: unsupported format {fmt}")
    name = f.text("name", max_len=64, pattern=NAME_RE)
    version = f.text("version", max_len=32, pattern=VERSION_RE)
    package_id = bytes.fromhex(f.text("package_id", max_len=32, pattern=PACKAGE_ID_RE))
    cipher = f.text("cipher", max_len=32, choices=(CIPHER,))
    size = f.integer("plaintext_size", lo=1, hi=MAX_PLAINTEXT_SIZE)
    chunk_size = f.integer("chunk_size", lo=MIN_CHUNK_SIZE, hi=MAX_CHUNK_SIZE)
    count = f.integer("chunk_count", lo=1, hi=MAX_PLAINTEXT_SIZE // MIN_CHUNK_SIZE + 1)
    plain_sha = f.blob("plaintext_sha256", min_len=32, max_len=32)
    cipher_sha = f.blob("ciphertext_sha256", min_len=32, max_len=32)
    key_check = f.blob("key_check", min_len=32, max_len=32)
    io_sig = IoSignature.from_json(f.raw("io_signature"), "manifest.io_signature")
    created_at = f.integer("created_at")
    f.done()
    if count != -(-size // chunk_size):
        raise MessageError(f"manifest: chunk_count {count} does not match {size} bytes "
                           f"in chunks of {chunk_size}")
    return Manifest(name=name, version=version, package_id=package_id, cipher=cipher, plaintext_size=size,
                    chunk_size=chunk_size, chunk_count=count, plaintext_sha256=plain_sha,
                    ciphertext_sha256=cipher_sha, key_check=key_check, io_signature=io_sig,
                    created_at=created_at, key_id=key_id, raw=raw)


# --------------------------------------------------------------------------------------------------
# per-chunk cryptography
# --------------------------------------------------------------------------------------------------
def chunk_nonce(package_id: bytes, index: int) -> bytes:
    """96-bit GCM nonce of chunk ``index``: ``package_id[:4] || u64be(index)``.

    Unique per key because every version gets a fresh data key and indices never repeat within a
    package; the package-id prefix keeps nonces apart even if a publisher wrongly reused a key.
    """
    return package_id[:4] + index.to_bytes(8, "big")


def _aad_prefix(package_id: bytes, name: str, version: str) -> bytes:
    n, v = name.encode("utf-8"), version.encode("ascii")
    return (MAGIC + FORMAT_VERSION.to_bytes(2, "big") + package_id
            + len(n).to_bytes(1, "big") + n + len(v).to_bytes(1, "big") + v)


def chunk_aad(package_id: bytes, name: str, version: str, index: int, count: int) -> bytes:
    """Associated data of chunk ``index`` of ``count`` (see docs/model-package.md, "AAD")."""
    last = 1 if index == count - 1 else 0
    return _aad_prefix(package_id, name, version) + struct.pack(">IIB", index, count, last)


def key_commitment(data_key: bytes, package_id: bytes) -> bytes:
    """HMAC-SHA256(data_key, context || package_id): commits the manifest to one data key.

    AES-GCM is not key-committing; with this value in the signed manifest a package cannot be made
    to decrypt to two different models under two different keys, and a wrong key is reported as such.
    """
    return hmac.new(data_key, KEY_CHECK_CONTEXT + package_id, hashlib.sha256).digest()


# --------------------------------------------------------------------------------------------------
# publisher side
# --------------------------------------------------------------------------------------------------
def build_package(model: bytes, *, name: str, version: str, io_signature: IoSignature,
                  signing_key: ec.EllipticCurvePrivateKey, key_id: str, data_key: bytes,
                  created_at: int, chunk_size: int = 1 << 20, package_id: bytes | None = None) -> bytes:
    """Encrypt ``model`` into a signed package.

    ``data_key``: 32 fresh random bytes from the caller (``secrets.token_bytes(32)``), never reused
    for another version. ``created_at``: ms since the epoch. ``package_id``: 16 bytes, random by
    default (a parameter so tests can build packages that differ in one field only).
    """
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise PackageFormatError(f"model name {name!r} is not allowed")
    parse_version(version)
    if not KID_RE.fullmatch(key_id):
        raise PackageFormatError("key id must be 16 lowercase hex characters")
    if not isinstance(signing_key.curve, ec.SECP256R1):
        raise PackageFormatError("the signing key must be ECDSA P-256")
    if len(data_key) != KEY_SIZE:
        raise PackageKeyError(f"data key must be {KEY_SIZE} bytes")
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise PackageFormatError(f"chunk size must be {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}")
    if not 1 <= len(model) <= MAX_PLAINTEXT_SIZE:
        raise PackageFormatError(f"model must be 1..{MAX_PLAINTEXT_SIZE} bytes")
    if created_at < 0:
        raise PackageFormatError("created_at must be ms since the epoch")
    pid = secrets.token_bytes(PACKAGE_ID_SIZE) if package_id is None else bytes(package_id)
    if len(pid) != PACKAGE_ID_SIZE:
        raise PackageFormatError(f"package id must be {PACKAGE_ID_SIZE} bytes")

    size = len(model)
    count = -(-size // chunk_size)
    aes = AESGCM(data_key)
    prefix = _aad_prefix(pid, name, version)
    records = bytearray(size + TAG_SIZE * count)
    src, dst = memoryview(model), memoryview(records)
    for i in range(count):
        start = i * chunk_size
        n = min(chunk_size, size - start)
        out = i * (chunk_size + TAG_SIZE)
        aad = prefix + struct.pack(">IIB", i, count, 1 if i == count - 1 else 0)
        aes.encrypt_into(chunk_nonce(pid, i), src[start:start + n], aad, dst[out:out + n + TAG_SIZE])
    manifest = Manifest(
        name=name, version=version, package_id=pid, cipher=CIPHER, plaintext_size=size,
        chunk_size=chunk_size, chunk_count=count, plaintext_sha256=hashlib.sha256(model).digest(),
        ciphertext_sha256=hashlib.sha256(records).digest(), key_check=key_commitment(data_key, pid),
        io_signature=io_signature, created_at=created_at)
    raw = canonical_bytes(manifest.body())
    if len(raw) > MAX_MANIFEST_SIZE:
        raise PackageFormatError(f"manifest of {len(raw)} bytes exceeds {MAX_MANIFEST_SIZE}")
    signature = sign_bytes(signing_key, SIGNING_CONTEXT + raw)
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, len(raw))
    return b"".join((header, raw, key_id.encode("ascii"), signature, records))


# --------------------------------------------------------------------------------------------------
# device side
# --------------------------------------------------------------------------------------------------
def _split(package: BytesLike) -> tuple[memoryview, bytes, str, bytes]:
    """Bounds-checked header split: (view of the package, manifest bytes, key id, signature)."""
    view = memoryview(package).cast("B")
    if len(view) < HEADER_SIZE:
        raise PackageFormatError(f"package of {len(view)} bytes is shorter than its header")
    magic, fmt, mlen = _HEADER.unpack_from(view, 0)
    if magic != MAGIC:
        raise PackageFormatError("not a model package (bad magic)")
    if fmt != FORMAT_VERSION:
        raise PackageFormatError(f"unsupported package format version {fmt}")
    if not 1 <= mlen <= MAX_MANIFEST_SIZE:
        raise PackageFormatError(f"manifest length {mlen} is out of bounds (1..{MAX_MANIFEST_SIZE})")
    end = HEADER_SIZE + mlen
    if len(view) < end + KID_SIZE + SIG_SIZE:
        raise PackageFormatError("package is truncated inside its manifest or signature")
    raw = bytes(view[HEADER_SIZE:end])
    kid_bytes = bytes(view[end:end + KID_SIZE])
    kid = kid_bytes.decode("ascii", "replace")
    if not KID_RE.fullmatch(kid):
        raise PackageFormatError("package key id is not 16 lowercase hex characters")
    sig = bytes(view[end + KID_SIZE:end + KID_SIZE + SIG_SIZE])
    return view, raw, kid, sig


def read_manifest(package: BytesLike, *, trusted_keys: Mapping[str, ec.EllipticCurvePublicKey]) -> Manifest:
    """Verify and parse a package's manifest; check the chunk records against it.

    In order: header bounds; the signature (by a key in ``trusted_keys``, over the manifest bytes as
    received, before anything in them is interpreted); a strict parse with bounds on every field;
    the exact length of the chunk records; their SHA-256. Needs no data key, so the agent can vet a
    package as it arrives. ``package`` may be an ``mmap`` of the package file (no copy is made).
    """
    view, raw, kid, sig = _split(package)
    pub = trusted_keys.get(kid)
    if pub is None:
        raise PackageSignatureError(f"package signed by unknown key {kid}")
    try:
        verify_bytes(pub, sig, SIGNING_CONTEXT + raw)
    except SignatureError:
        raise PackageSignatureError(f"manifest signature by key {kid} does not verify") from None
    try:
        manifest = _parse_manifest(raw, kid)
    except (MessageError, PackageFormatError) as exc:
        raise PackageFormatError(f"signed manifest is invalid: {exc.diagnostics()}") from None
    records = view[manifest.data_offset:]
    if len(records) != manifest.ciphertext_size:
        what = "truncated" if len(records) < manifest.ciphertext_size else "followed by extra bytes"
        raise PackageFormatError(f"package is {what}: {len(records)} bytes of chunk records, "
                                 f"the manifest requires {manifest.ciphertext_size}")
    if not hmac.compare_digest(_sha256(records), manifest.ciphertext_sha256):
        raise PackageIntegrityError("chunk records do not match the ciphertext SHA-256 "
                                    "in the signed manifest")
    return manifest


def _sha256(view: memoryview, step: int = 1 << 20) -> bytes:
    h = hashlib.sha256()
    for i in range(0, len(view), step):
        h.update(view[i:i + step])
    return h.digest()


class _Hasher:
    """SHA-256 over a sequence of buffers on a second thread.

    hashlib releases the GIL while it hashes more than 2 KiB, while AES-GCM in ``cryptography``
    holds it; so hashing chunk ``i`` on this thread overlaps decrypting chunk ``i + 1`` on the
    caller's, and the chunk is hashed while it is still in cache.
    """

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._queue: SimpleQueue[memoryview | None] = SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="modelpkg-sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            self._hash.update(item)
            item.release()

    def update(self, view: memoryview) -> None:
        self._queue.put(view)

    def digest(self) -> bytes:
        self._queue.put(None)
        self._thread.join()
        return self._hash.digest()


class _InlineHasher:
    """The same interface as :class:`_Hasher`, hashing on the caller's thread (small packages)."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()

    def update(self, view: memoryview) -> None:
        self._hash.update(view)
        view.release()

    def digest(self) -> bytes:
        return self._hash.digest()


def _zero(view: memoryview, step: int = 1 << 20) -> None:
    zeros = bytes(min(step, len(view)))
    for i in range(0, len(view), step):
        n = min(step, len(view) - i)
        view[i:i + n] = zeros[:n]


def decrypt_package(package: BytesLike, manifest: Manifest, data_key: bytes, *,
                    out: bytearray | None = None, threaded_hash: bool | None = None) -> bytearray:
    """Decrypt a package whose ``manifest`` came from :func:`read_manifest`, into one buffer.

    Checks, in order: the data key against the manifest's key commitment; that ``package`` carries
    exactly this manifest and length; every chunk's GCM tag (with the nonce and AAD of its expected
    position); the plaintext SHA-256. The plaintext hash runs on a second thread, overlapped with
    decryption (``threaded_hash=None`` chooses: threaded for more than 4 chunks).

    ``out``: an optional preallocated buffer of exactly ``plaintext_size`` bytes to decrypt into
    (the agent may keep one, page-locked, across lock/unlock cycles); by default a new ``bytearray``
    (:func:`protocol.outbuf.output_buffer`: large ones are not zero-filled first, and are paged in
    on a second thread while decryption fills their beginning).
    On any failure the buffer is zeroed before the error is raised: no partial plaintext survives.
    """
    if len(data_key) != KEY_SIZE:
        raise PackageKeyError(f"data key must be {KEY_SIZE} bytes, not {len(data_key)}")
    if not hmac.compare_digest(key_commitment(data_key, manifest.package_id), manifest.key_check):
        raise PackageKeyError(f"wrong data key for model {manifest.name} {manifest.version} "
                              "(key check failed)")
    view, raw, _, _ = _split(package)
    if not hmac.compare_digest(raw, manifest.raw):
        raise PackageFormatError("package does not carry the given manifest")
    if len(view) - manifest.data_offset != manifest.ciphertext_size:
        raise PackageFormatError("package length does not match its manifest (truncated or extended)")
    size, cs, count = manifest.plaintext_size, manifest.chunk_size, manifest.chunk_count
    prefault = None
    if out is None:  # contents undefined until written: every byte is decrypted into, or zeroed
        out, prefault = output_buffer(size)
    elif len(out) != size:
        raise PackageFormatError(f"output buffer of {len(out)} bytes; the model has {size}")
    dst = memoryview(out)
    aes = AESGCM(data_key)
    prefix = _aad_prefix(manifest.package_id, manifest.name, manifest.version)
    pid = manifest.package_id
    base = manifest.data_offset
    use_thread = count > 4 if threaded_hash is None else threaded_hash
    hasher = _Hasher() if use_thread else _InlineHasher()
    failed: ModelPackageError | None = None
    try:
        for i in range(count):
            start = i * cs
            n = cs if i < count - 1 else size - start
            rec = base + i * (cs + TAG_SIZE)
            aad = prefix + struct.pack(">IIB", i, count, 1 if i == count - 1 else 0)
            try:
                aes.decrypt_into(chunk_nonce(pid, i), view[rec:rec + n + TAG_SIZE], aad, dst[start:start + n])
            except InvalidTag:
                failed = ChunkAuthenticationError(
                    f"chunk {i} of {count} failed authentication: tampered with, truncated, reordered "
                    "or taken from another package")
                break
            hasher.update(dst[start:start + n])
        digest = hasher.digest()
        if failed is None and not hmac.compare_digest(digest, manifest.plaintext_sha256):
            failed = PackageIntegrityError("decrypted model does not match the plaintext SHA-256 "
                                           "in the manifest")
    except BaseException:
        hasher.digest()
        _zero(dst)
        raise
    finally:
        if prefault is not None:
            prefault.stop()
    if failed is not None:
        _zero(dst)
        dst.release()
        raise failed
    dst.release()
    return out
