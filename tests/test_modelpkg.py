"""Encrypted model packages: round trip, every refusal, version rollback, fuzzed manifests."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
import sys
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from firmware_sim.testmodel import classifier_io_signature, small_classifier
from protocol import modelpkg, outbuf
from protocol.encoding import b64encode, canonical_bytes
from protocol.errors import MalformedInputError, SignatureError, VerificationError
from protocol.messages import key_id, sign_bytes
from protocol.modelpkg import (
    HEADER_SIZE,
    KID_SIZE,
    MAGIC,
    SIG_SIZE,
    SIGNING_CONTEXT,
    TAG_SIZE,
    ChunkAuthenticationError,
    IoSignature,
    Manifest,
    ModelPackageError,
    PackageFormatError,
    PackageIntegrityError,
    PackageKeyError,
    PackageSignatureError,
    TensorSpec,
    VersionRollbackError,
    build_package,
    chunk_aad,
    compare_versions,
    decrypt_package,
    key_commitment,
    parse_version,
    read_manifest,
    require_not_older,
)

KEY = ec.generate_private_key(ec.SECP256R1())
KID = key_id(KEY.public_key())
TRUSTED = {KID: KEY.public_key()}
OTHER_KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_KID = key_id(OTHER_KEY.public_key())
DATA_KEY = bytes(range(32))
OTHER_DATA_KEY = bytes(range(1, 33))
PID = bytes.fromhex("00112233445566778899aabbccddeeff")
CHUNK = 1024
# 10.5 chunks of distinct, recognisable bytes: every chunk differs from every other
MODEL = b"".join(hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(336))
IO = classifier_io_signature()


def make(model: bytes = MODEL, *, name: str = "classifier", version: str = "1.2.3",
         data_key: bytes = DATA_KEY, package_id: bytes | None = PID, chunk_size: int = CHUNK,
         key: ec.EllipticCurvePrivateKey = KEY, kid: str = KID) -> bytes:
    return build_package(model, name=name, version=version, io_signature=IO, signing_key=key, key_id=kid,
                         data_key=data_key, created_at=1_790_000_000_000, chunk_size=chunk_size,
                         package_id=package_id)


# ---- package surgery: what an attacker (or an insider with only the signing key) can do ------------
def split(pkg: bytes) -> tuple[dict[str, object], list[bytes]]:
    """(manifest JSON, chunk records) of a well-formed package."""
    (mlen,) = struct.unpack_from(">I", pkg, 8)
    manifest = json.loads(pkg[HEADER_SIZE:HEADER_SIZE + mlen])
    data = pkg[HEADER_SIZE + mlen + KID_SIZE + SIG_SIZE:]
    size, cs = manifest["plaintext_size"], manifest["chunk_size"]
    records, pos, left = [], 0, size
    while left > 0:
        n = min(cs, left)
        records.append(data[pos:pos + n + TAG_SIZE])
        pos, left = pos + n + TAG_SIZE, left - n
    return manifest, records


def assemble(manifest: dict[str, object], records: list[bytes], *, key: ec.EllipticCurvePrivateKey = KEY,
             kid: str = KID, fix_ciphertext_hash: bool = True) -> bytes:
    """A package from a (possibly edited) manifest and records, signed with ``key``."""
    body = b"".join(records)
    if fix_ciphertext_hash:
        manifest = {**manifest, "ciphertext_sha256": b64encode(hashlib.sha256(body).digest())}
    raw = canonical_bytes(manifest)
    signature = sign_bytes(key, SIGNING_CONTEXT + raw)
    return MAGIC + struct.pack(">HI", 1, len(raw)) + raw + kid.encode() + signature + body


def records_of(pkg: bytes) -> list[bytes]:
    return split(pkg)[1]


# ---- round trip ------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [1, CHUNK - 1, CHUNK, CHUNK + 1, 5 * CHUNK, len(MODEL)])
@pytest.mark.parametrize("threaded", [False, True])
def test_round_trip(size: int, threaded: bool) -> None:
    model = MODEL[:size]
    pkg = make(model)
    manifest = read_manifest(pkg, trusted_keys=TRUSTED)
    assert (manifest.name, manifest.version, manifest.package_id) == ("classifier", "1.2.3", PID)
    assert manifest.plaintext_size == size and manifest.chunk_count == -(-size // CHUNK)
    assert manifest.plaintext_sha256 == hashlib.sha256(model).digest()
    assert manifest.io_signature == IO and manifest.key_id == KID
    assert manifest.data_offset + manifest.ciphertext_size == len(pkg)
    plain = decrypt_package(pkg, manifest, DATA_KEY, threaded_hash=threaded)
    assert isinstance(plain, bytearray) and plain == model
    if size >= 32:
        assert model[:32] not in pkg  # the model is not in the package in the clear


def test_round_trip_real_model_into_given_buffer_from_memoryview() -> None:
    model = small_classifier()
    pkg = bytearray(make(model, package_id=None))
    manifest = read_manifest(memoryview(pkg), trusted_keys=TRUSTED)
    out = bytearray(len(model))
    assert decrypt_package(memoryview(pkg), manifest, DATA_KEY, out=out) is out
    assert out == model


def test_package_ids_are_random_and_chunks_differ_per_package() -> None:
    a, b = make(package_id=None), make(package_id=None)
    ma, mb = read_manifest(a, trusted_keys=TRUSTED), read_manifest(b, trusted_keys=TRUSTED)
    assert ma.package_id != mb.package_id
    assert records_of(a)[0] != records_of(b)[0]  # same key and model, different nonce and AAD


def test_manifest_is_canonical_and_signed_over_bytes_as_carried() -> None:
    pkg = make()
    manifest = read_manifest(pkg, trusted_keys=TRUSTED)
    assert manifest.raw == canonical_bytes(manifest.body())
    # the same JSON re-serialised with other whitespace is a different byte string: refused
    obj, records = split(pkg)
    raw = json.dumps(obj, indent=1).encode()
    sig = sign_bytes(KEY, SIGNING_CONTEXT + manifest.raw)  # a signature over the canonical bytes
    forged = MAGIC + struct.pack(">HI", 1, len(raw)) + raw + KID.encode() + sig + b"".join(records)
    with pytest.raises(PackageSignatureError, match="does not verify"):
        read_manifest(forged, trusted_keys=TRUSTED)


def test_aad_binds_every_field() -> None:
    base = chunk_aad(PID, "m", "1.0.0", 3, 10)
    variants = [chunk_aad(bytes(16), "m", "1.0.0", 3, 10), chunk_aad(PID, "n", "1.0.0", 3, 10),
                chunk_aad(PID, "m", "1.0.1", 3, 10), chunk_aad(PID, "m", "1.0.0", 4, 10),
                chunk_aad(PID, "m", "1.0.0", 3, 11), chunk_aad(PID, "m", "1.0.0", 3, 4)]
    assert len({base, *variants}) == 7
    assert chunk_aad(PID, "m", "1.0.0", 9, 10)[-1] == 1 and base[-1] == 0
    assert base.startswith(MAGIC)


# ---- refusals (table-driven) ------------------------------------------------------------------------
def _flip(data: bytes, pos: int) -> bytes:
    return data[:pos] + bytes([data[pos] ^ 0x01]) + data[pos + 1:]


def _manifest_edit(**changes: object) -> bytes:
    obj, records = split(make())
    return assemble({**obj, **changes}, records)


def _swap_records(i: int, j: int) -> bytes:
    obj, records = split(make())
    records[i], records[j] = records[j], records[i]
    return assemble(obj, records)


def _transplant(**other: str) -> bytes:
    """Chunk 1 replaced by chunk 1 of a package with the same key and id but another name/version."""
    obj, records = split(make())
    records[1] = records_of(make(**other))[1]  # type: ignore[arg-type]
    return assemble(obj, records)


def _truncated_resigned() -> bytes:
    """Last chunk dropped and the manifest re-signed to match (an insider without the data key)."""
    obj, records = split(make())
    n = len(records) - 1
    return assemble({**obj, "chunk_count": n, "plaintext_size": n * CHUNK}, records[:n])


def _duplicated() -> bytes:
    obj, records = split(make())
    records[2] = records[1]
    return assemble(obj, records)


PKG = make()
MLEN = struct.unpack_from(">I", PKG, 8)[0]
DATA_OFFSET = HEADER_SIZE + MLEN + KID_SIZE + SIG_SIZE

READ_REFUSALS: list[tuple[str, Callable[[], bytes], type[Exception], str]] = [
    ("empty", lambda: b"", PackageFormatError, "shorter than its header"),
    ("bad magic", lambda: b"XXMPKG" + PKG[6:], PackageFormatError, "bad magic"),
    ("future format", lambda: PKG[:6] + struct.pack(">H", 2) + PKG[8:], PackageFormatError,
     "format version 2"),
    ("manifest length 0", lambda: PKG[:8] + struct.pack(">I", 0) + PKG[12:], PackageFormatError,
     "out of bounds"),
    ("manifest length huge", lambda: PKG[:8] + struct.pack(">I", 1 << 30) + PKG[12:], PackageFormatError,
     "out of bounds"),
    ("cut in signature", lambda: PKG[:DATA_OFFSET - 1], PackageFormatError, "truncated inside"),
    ("bad key id", lambda: PKG[:HEADER_SIZE + MLEN] + b"Z" * 16 + PKG[HEADER_SIZE + MLEN + 16:],
     PackageFormatError, "key id"),
    ("tampered manifest", lambda: _flip(PKG, HEADER_SIZE + 40), PackageSignatureError, "does not verify"),
    ("tampered signature", lambda: _flip(PKG, DATA_OFFSET - 3), PackageSignatureError, "does not verify"),
    ("unknown signer", lambda: make(key=OTHER_KEY, kid=OTHER_KID), PackageSignatureError, "unknown key"),
    ("untrusted key, trusted key id", lambda: make(key=OTHER_KEY, kid=KID), PackageSignatureError,
     "does not verify"),
    ("tampered chunk", lambda: _flip(PKG, DATA_OFFSET + 5), PackageIntegrityError, "ciphertext SHA-256"),
    ("tampered tag", lambda: _flip(PKG, len(PKG) - 1), PackageIntegrityError, "ciphertext SHA-256"),
    ("missing last chunk", lambda: PKG[:len(PKG) - (len(MODEL) % CHUNK + TAG_SIZE)], PackageFormatError,
     "truncated"),
    ("one byte short", lambda: PKG[:-1], PackageFormatError, "truncated"),
    ("trailing bytes", lambda: PKG + b"\0", PackageFormatError, "extra bytes"),
    ("reordered chunks", lambda: assemble(*_reordered(), fix_ciphertext_hash=False), PackageIntegrityError,
     "ciphertext SHA-256"),
    ("unknown manifest field", lambda: _manifest_edit(extra=1), PackageFormatError, "unknown field"),
    ("wrong cipher", lambda: _manifest_edit(cipher="AES-128-GCM"), PackageFormatError, "cipher"),
    ("inconsistent chunk count", lambda: _manifest_edit(chunk_count=3), PackageFormatError, "chunk_count"),
    ("chunk size below bound", lambda: _manifest_edit(chunk_size=16), PackageFormatError, "chunk_size"),
    ("bad version string", lambda: _manifest_edit(version="1.2"), PackageFormatError, "version"),
    ("float in manifest", lambda: _manifest_json_with_float(), PackageFormatError, "float"),
    ("bad io signature", lambda: _manifest_edit(io_signature={"inputs": [], "outputs": []}),
     PackageFormatError, "io_signature"),
]


def _reordered() -> tuple[dict[str, object], list[bytes]]:
    obj, records = split(make())
    records[0], records[1] = records[1], records[0]
    return obj, records


def _manifest_json_with_float() -> bytes:
    obj, records = split(make())
    raw = canonical_bytes(obj).replace(b'"created_at":1790000000000', b'"created_at":1.5')
    sig = sign_bytes(KEY, SIGNING_CONTEXT + raw)
    return MAGIC + struct.pack(">HI", 1, len(raw)) + raw + KID.encode() + sig + b"".join(records)


@pytest.mark.parametrize(("case", "build", "error", "reason"), READ_REFUSALS,
                         ids=[c[0] for c in READ_REFUSALS])
def test_read_manifest_refuses(case: str, build: Callable[[], bytes], error: type[Exception],
                               reason: str) -> None:
    with pytest.raises(error, match=reason) as info:
        read_manifest(build(), trusted_keys=TRUSTED)
    assert isinstance(info.value, ModelPackageError) and isinstance(info.value, VerificationError)
    assert "\n" not in info.value.diagnostics()


# Refusals at decryption. Each package passes read_manifest (its manifest is validly signed, as an
# insider holding the signing key but not the data key could arrange), so only the AEAD, the AAD and
# the digests stand in the way.
DECRYPT_REFUSALS: list[tuple[str, Callable[[], bytes], type[Exception], str]] = [
    ("reordered chunks", lambda: _swap_records(0, 1), ChunkAuthenticationError, "chunk 0 of 11"),
    ("duplicated chunk", _duplicated, ChunkAuthenticationError, "chunk 2 of 11"),
    ("chunk from another model", lambda: _transplant(name="other-model"), ChunkAuthenticationError,
     "chunk 1 of 11"),
    ("chunk from another version", lambda: _transplant(version="1.2.4"), ChunkAuthenticationError,
     "chunk 1 of 11"),
    ("truncated, re-signed", _truncated_resigned, ChunkAuthenticationError, "chunk 0 of 10"),
    ("wrong plaintext digest", lambda: _manifest_edit(plaintext_sha256=b64encode(bytes(32))),
     PackageIntegrityError, "plaintext SHA-256"),
    ("key check of another key",
     lambda: _manifest_edit(key_check=b64encode(key_commitment(OTHER_DATA_KEY, PID))),
     PackageKeyError, "wrong data key"),
]


@pytest.mark.parametrize(("case", "build", "error", "reason"), DECRYPT_REFUSALS,
                         ids=[c[0] for c in DECRYPT_REFUSALS])
def test_decrypt_refuses_and_leaves_no_plaintext(case: str, build: Callable[[], bytes],
                                                 error: type[Exception], reason: str) -> None:
    pkg = build()
    manifest = read_manifest(pkg, trusted_keys=TRUSTED)
    out = bytearray(manifest.plaintext_size)
    with pytest.raises(error, match=reason):
        decrypt_package(pkg, manifest, DATA_KEY, out=out)
    assert out == bytearray(len(out))  # zeroed: no partial plaintext survives a failure


def test_wrong_data_key_is_named_as_such() -> None:
    manifest = read_manifest(PKG, trusted_keys=TRUSTED)
    with pytest.raises(PackageKeyError, match=r"wrong data key for model classifier 1\.2\.3"):
        decrypt_package(PKG, manifest, OTHER_DATA_KEY)
    with pytest.raises(PackageKeyError, match="32 bytes"):
        decrypt_package(PKG, manifest, DATA_KEY[:16])


def test_wrong_key_with_forged_key_check_fails_at_the_first_chunk() -> None:
    pkg = _manifest_edit(key_check=b64encode(key_commitment(OTHER_DATA_KEY, PID)))
    manifest = read_manifest(pkg, trusted_keys=TRUSTED)
    with pytest.raises(ChunkAuthenticationError, match="chunk 0 of 11"):
        decrypt_package(pkg, manifest, OTHER_DATA_KEY)


def test_decrypt_checks_the_package_matches_the_manifest() -> None:
    manifest = read_manifest(PKG, trusted_keys=TRUSTED)
    other = make(package_id=None)
    with pytest.raises(PackageFormatError, match="does not carry the given manifest"):
        decrypt_package(other, manifest, DATA_KEY)
    with pytest.raises(PackageFormatError, match="length does not match"):
        decrypt_package(PKG[:-1], manifest, DATA_KEY)
    with pytest.raises(PackageFormatError, match="output buffer"):
        decrypt_package(PKG, manifest, DATA_KEY, out=bytearray(10))


def test_tampered_chunk_fails_decryption_even_when_hash_check_is_bypassed() -> None:
    manifest = read_manifest(PKG, trusted_keys=TRUSTED)
    tampered = _flip(PKG, DATA_OFFSET + 3 * (CHUNK + TAG_SIZE) + 7)
    with pytest.raises(ChunkAuthenticationError, match="chunk 3 of 11"):
        decrypt_package(tampered, manifest, DATA_KEY)


def test_forged_manifest_object_cannot_skip_the_last_chunk() -> None:
    """A caller-side Manifest edited in memory (never signed) still cannot drop the last chunk."""
    manifest = read_manifest(PKG, trusted_keys=TRUSTED)
    forged = dataclasses.replace(manifest, chunk_count=10, plaintext_size=10 * CHUNK)
    with pytest.raises(PackageFormatError):
        decrypt_package(PKG, forged, DATA_KEY)


# ---- build-side validation ----------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "error"), [
    ({"name": "bad name"}, PackageFormatError),
    ({"version": "1.0"}, PackageFormatError),
    ({"data_key": b"short"}, PackageKeyError),
    ({"chunk_size": 10}, PackageFormatError),
    ({"model": b""}, PackageFormatError),
    ({"package_id": b"short"}, PackageFormatError),
    ({"kid": "NOT-HEX"}, PackageFormatError),
])
def test_build_refuses_bad_parameters(kwargs: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error):
        make(**kwargs)  # type: ignore[arg-type]


def test_build_refuses_non_p256_key() -> None:
    with pytest.raises(PackageFormatError, match="P-256"):
        make(key=ec.generate_private_key(ec.SECP384R1()))


# ---- io signature -----------------------------------------------------------------------------------------
def test_io_signature_normalises_dynamic_dims_and_round_trips() -> None:
    spec = TensorSpec("x", "float32", (-1, 3, None))
    assert spec.shape == (None, 3, None)
    sig = IoSignature(inputs=(spec,), outputs=(TensorSpec("y", "int64", (-1,)),))
    assert IoSignature.from_json(json.loads(json.dumps(sig.to_json())), "io") == sig
    assert sig.to_json()["inputs"] == [{"name": "x", "dtype": "float32", "shape": [None, 3, None]}]


@pytest.mark.parametrize("bad", [
    lambda: TensorSpec("x", "complex64", (1,)),
    lambda: TensorSpec("bad name", "float32", (1,)),
    lambda: TensorSpec("x", "float32", (0,)),
    lambda: TensorSpec("x", "float32", (1,) * 9),
    lambda: IoSignature(inputs=(), outputs=(TensorSpec("y", "float32", (1,)),)),
    lambda: IoSignature(inputs=(TensorSpec("x", "float32", (1,)),) * 2,
                        outputs=(TensorSpec("y", "float32", (1,)),)),
])
def test_io_signature_refuses(bad: Callable[[], object]) -> None:
    with pytest.raises(PackageFormatError):
        bad()


# ---- versions ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "parsed"), [("0.0.0", (0, 0, 0)), ("1.2.3", (1, 2, 3)),
                                              ("10.20.300", (10, 20, 300)),
                                              ("999999999.0.1", (999999999, 0, 1))])
def test_parse_version(text: str, parsed: tuple[int, int, int]) -> None:
    assert parse_version(text) == parsed


@pytest.mark.parametrize("text", ["", "1", "1.2", "1.2.3.4", "01.2.3", "1.02.3", "v1.2.3", "1.2.3-rc1",
                                  "1.2.3+build", " 1.2.3", "1.2.3\n", "1.-2.3", "1.2.x", "\u0661.2.3",
                                  "1234567890.0.0"])
def test_parse_version_refuses(text: str) -> None:
    with pytest.raises(PackageFormatError):
        parse_version(text)


def test_versions_compare_numerically() -> None:
    assert compare_versions("1.10.0", "1.9.9") == 1
    assert compare_versions("1.2.3", "1.2.3") == 0
    assert compare_versions("0.9.10", "1.0.0") == -1
    assert compare_versions("2.0.0", "10.0.0") == -1


def test_older_version_is_refused() -> None:
    require_not_older("1.2.3", None)
    require_not_older("1.2.4", "1.2.3")
    require_not_older("1.2.3", "1.2.3")
    with pytest.raises(VersionRollbackError, match=r"older than the held version 1\.10\.0"):
        require_not_older("1.9.0", "1.10.0")
    with pytest.raises(VersionRollbackError, match="already held"):
        require_not_older("1.2.3", "1.2.3", allow_same=False)
    with pytest.raises(PackageFormatError):
        require_not_older("1.2", "1.0.0")


def test_error_family() -> None:
    assert issubclass(PackageFormatError, MalformedInputError)
    assert issubclass(PackageSignatureError, SignatureError)
    for cls in (ChunkAuthenticationError, PackageIntegrityError, PackageKeyError, VersionRollbackError):
        assert issubclass(cls, ModelPackageError) and issubclass(cls, VerificationError)


# ---- fuzz ----------------------------------------------------------------------------------------------
SMALL = make(MODEL[:3000])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(SMALL) - 1), st.integers(1, 255)), min_size=1, max_size=4),
       st.integers(0, len(SMALL)), st.binary(max_size=8))
def test_fuzz_read_manifest_on_mutated_packages(flips: list[tuple[int, int]], cut: int, tail: bytes) -> None:
    data = bytearray(SMALL)
    for pos, mask in flips:
        data[pos] ^= mask
    mutated = bytes(data[:cut]) + tail
    try:
        manifest = read_manifest(mutated, trusted_keys=TRUSTED)
    except ModelPackageError as exc:
        assert exc.diagnostics()
        return
    # Only a mutation that left the package intact (e.g. cut + tail restored it) can be accepted.
    assert mutated == SMALL
    assert isinstance(manifest, Manifest)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_read_manifest_on_arbitrary_bytes_after_magic(junk: bytes) -> None:
    for data in (junk, MAGIC + junk, MAGIC + b"\x00\x01" + junk):
        with pytest.raises(ModelPackageError):
            read_manifest(data, trusted_keys=TRUSTED)


# ---- large packages: the output buffer without zero-fill, paged in on a second thread --------------
BIG = os.urandom(9 << 20) + MODEL  # above outbuf.MIN_SIZE, not a multiple of the chunk size


def test_large_package_round_trips_through_an_unzeroed_prefaulted_buffer(
        monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[tuple[bytearray, outbuf.Prefaulter | None]] = []

    def spy(size: int) -> tuple[bytearray, outbuf.Prefaulter | None]:
        made.append(outbuf.output_buffer(size))
        return made[-1]

    monkeypatch.setattr(modelpkg, "output_buffer", spy)
    pkg = make(BIG, chunk_size=1 << 20, package_id=None)
    manifest = read_manifest(pkg, trusted_keys=TRUSTED)
    plain = decrypt_package(pkg, manifest, DATA_KEY)
    assert isinstance(plain, bytearray) and plain == BIG
    (buffer, prefault), = made
    assert buffer is plain and len(buffer) == len(BIG)
    if sys.platform.startswith("linux") and sys.implementation.name == "cpython":
        assert prefault is not None  # the large path was taken here
    assert outbuf.output_buffer(outbuf.MIN_SIZE - 1) == (bytearray(outbuf.MIN_SIZE - 1), None)


def test_large_package_failing_late_leaves_its_fresh_buffer_zeroed(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[bytearray] = []

    def spy(size: int) -> tuple[bytearray, outbuf.Prefaulter | None]:
        buffer, prefault = outbuf.output_buffer(size)
        made.append(buffer)
        return buffer, prefault

    monkeypatch.setattr(modelpkg, "output_buffer", spy)
    manifest_json, records = split(make(BIG, chunk_size=1 << 20))
    last = bytearray(records[-1])
    last[0] ^= 1  # the last chunk tampered with: every chunk before it decrypts first
    pkg = assemble(manifest_json, [*records[:-1], bytes(last)])
    manifest = read_manifest(pkg, trusted_keys=TRUSTED)
    with pytest.raises(ChunkAuthenticationError, match="chunk 9 of 10"):
        decrypt_package(pkg, manifest, DATA_KEY)
    (buffer,) = made
    assert buffer == bytearray(len(BIG))  # the nine decrypted chunks (and the rest) are zeroed
