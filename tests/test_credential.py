"""MakeCredential in pure Python, checked three independent ways.

* against real TPMs: swtpm's TPM2_ActivateCredential (through the agent's adapter) releases the
  secret for its RSA-2048 EK and its ECC P-384 EK, and refuses a credential made for another AK name
  or another TPM's EK;
* against ``tpm2_pytss.utils.make_credential``: with the same seed (RSA) or the same ephemeral key
  (ECC) both produce the same bytes;
* against a software ActivateCredential written here from TPM 2.0 Part 1, 24 with ``cryptography``'s
  own KDFs, for the key kinds swtpm does not have (P-256, P-521, RSA-3072, SHA-384 name algorithms).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import secrets
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash
from cryptography.hazmat.primitives.kdf.kbkdf import KBKDFHMAC, CounterLocation, Mode
from tpm2_pytss.types import TPM2B_NAME, TPM2B_PUBLIC
from tpm2_pytss.utils import make_credential as pytss_make_credential

from agent.tpm.adapter import TpmAdapter
from firmware_sim.swtpm import Swtpm
from fleet_server.enrollment import credential as credential_module
from fleet_server.enrollment.credential import CredentialError, kdfa, kdfe, make_credential
from protocol.errors import TpmError
from protocol.tpm.constants import Alg, ECCCurve, ObjectAttr
from protocol.tpm.structures import (
    EccParms,
    EccPoint,
    PublicArea,
    RsaParms,
    Scheme,
    SymDef,
    parse_tpm2b_public,
)

try:
    from cryptography.hazmat.decrepit.ciphers.modes import CFB
except ImportError:  # pragma: no cover
    from cryptography.hazmat.primitives.ciphers.modes import CFB

# EK Credential Profile 2.0, B.3.3: fixedTPM, fixedParent, sensitiveDataOrigin, adminWithPolicy,
# restricted, decrypt.
EK_ATTRS = (
    ObjectAttr.FIXED_TPM
    | ObjectAttr.FIXED_PARENT
    | ObjectAttr.SENSITIVE_DATA_ORIGIN
    | ObjectAttr.ADMIN_WITH_POLICY
    | ObjectAttr.RESTRICTED
    | ObjectAttr.DECRYPT
)
HASHES: dict[int, hashes.HashAlgorithm] = {
    Alg.SHA256: hashes.SHA256(),
    Alg.SHA384: hashes.SHA384(),
    Alg.SHA512: hashes.SHA512(),
}
CURVES: dict[int, tuple[ec.EllipticCurve, int]] = {
    ECCCurve.NIST_P256: (ec.SECP256R1(), 32),
    ECCCurve.NIST_P384: (ec.SECP384R1(), 48),
    ECCCurve.NIST_P521: (ec.SECP521R1(), 66),
}


def ak_name(seed: bytes = b"ak") -> bytes:
    return struct.pack(">H", Alg.SHA256) + hashlib.sha256(seed).digest()


# ---------------------------------------------------------------------------------------------
# software EKs and a software ActivateCredential (TPM 2.0 Part 1, 24; Part 3, 12.5)
# ---------------------------------------------------------------------------------------------
def software_rsa_ek(
    bits: int = 2048, name_alg: int = Alg.SHA256, sym_bits: int = 128
) -> tuple[rsa.RSAPrivateKey, PublicArea]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    n = key.public_key().public_numbers().n
    public = PublicArea(
        Alg.RSA,
        name_alg,
        EK_ATTRS,
        bytes(32),
        RsaParms(SymDef(Alg.AES, sym_bits, Alg.CFB), Scheme(), bits, 0),
        n.to_bytes(bits // 8, "big"),
    )
    return key, public


def software_ecc_ek(
    curve_id: int = ECCCurve.NIST_P256, name_alg: int = Alg.SHA256, sym_bits: int = 128
) -> tuple[ec.EllipticCurvePrivateKey, PublicArea]:
    curve, size = CURVES[curve_id]
    key = ec.generate_private_key(curve)
    nums = key.public_key().public_numbers()
    public = PublicArea(
        Alg.ECC,
        name_alg,
        EK_ATTRS,
        bytes(32),
        EccParms(SymDef(Alg.AES, sym_bits, Alg.CFB), Scheme(), curve_id, Scheme()),
        EccPoint(nums.x.to_bytes(size, "big"), nums.y.to_bytes(size, "big")),
    )
    return key, public


def ref_kdfa(hash_alg: int, key: bytes, label: bytes, context: bytes, bits: int) -> bytes:
    """KDFa with cryptography's SP 800-108 implementation (it adds the 0x00 after the label)."""
    return KBKDFHMAC(
        algorithm=HASHES[hash_alg],
        mode=Mode.CounterMode,
        length=bits // 8,
        rlen=4,
        llen=4,
        location=CounterLocation.BeforeFixed,
        label=label,
        context=context,
        fixed=None,
    ).derive(key)


def software_activate(
    private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
    ek: PublicArea,
    name: bytes,
    blob: bytes,
    encrypted: bytes,
) -> bytes:
    """Recover the secret like TPM2_ActivateCredential would; raise ValueError on integrity failure."""
    halg = HASHES[ek.name_alg]
    size = halg.digest_size
    (enc_len,) = struct.unpack_from(">H", encrypted)
    assert enc_len == len(encrypted) - 2
    enc = encrypted[2:]
    if isinstance(private, rsa.RSAPrivateKey):
        seed = private.decrypt(enc, padding.OAEP(padding.MGF1(halg), halg, b"IDENTITY\x00"))
    else:
        (xl,) = struct.unpack_from(">H", enc)
        x = enc[2 : 2 + xl]
        (yl,) = struct.unpack_from(">H", enc, 2 + xl)
        y = enc[4 + xl : 4 + xl + yl]
        assert 4 + xl + yl == len(enc)
        assert isinstance(ek.parameters, EccParms)
        curve = CURVES[ek.parameters.curve][0]
        peer = ec.EllipticCurvePublicNumbers(int.from_bytes(x, "big"), int.from_bytes(y, "big"), curve)
        z = private.exchange(ec.ECDH(), peer.public_key())
        assert isinstance(ek.unique, EccPoint)
        seed = ConcatKDFHash(algorithm=halg, length=size, otherinfo=b"IDENTITY\x00" + x + ek.unique.x).derive(
            z
        )
    (blob_len,) = struct.unpack_from(">H", blob)
    assert blob_len == len(blob) - 2
    (hmac_len,) = struct.unpack_from(">H", blob, 2)
    integrity = blob[4 : 4 + hmac_len]
    enc_identity = blob[4 + hmac_len :]
    hmac_key = ref_kdfa(ek.name_alg, seed, b"INTEGRITY", b"", size * 8)
    if not hmac.compare_digest(hmac.new(hmac_key, enc_identity + name, halg.name).digest(), integrity):
        raise ValueError("integrity check failed")
    sym_bits = ek.parameters.symmetric.key_bits
    sym_key = ref_kdfa(ek.name_alg, seed, b"STORAGE", name, sym_bits)
    plain = Cipher(algorithms.AES(sym_key), CFB(bytes(16))).decryptor().update(enc_identity)
    (secret_len,) = struct.unpack_from(">H", plain)
    assert secret_len == len(plain) - 2
    return plain[2:]


SOFTWARE_EKS: list[tuple[str, Callable[[], tuple[Any, PublicArea]]]] = [
    ("rsa2048-sha256-aes128", lambda: software_rsa_ek()),
    ("rsa3072-sha384-aes256", lambda: software_rsa_ek(3072, Alg.SHA384, 256)),
    ("p256-sha256-aes128", lambda: software_ecc_ek()),
    ("p384-sha384-aes256", lambda: software_ecc_ek(ECCCurve.NIST_P384, Alg.SHA384, 256)),
    ("p521-sha512-aes256", lambda: software_ecc_ek(ECCCurve.NIST_P521, Alg.SHA512, 256)),
]


@pytest.mark.parametrize("make_ek", [m for _, m in SOFTWARE_EKS], ids=[i for i, _ in SOFTWARE_EKS])
def test_software_activation_recovers_the_secret(make_ek: Callable[[], tuple[Any, PublicArea]]) -> None:
    private, ek = make_ek()
    size = HASHES[ek.name_alg].digest_size
    for secret in (b"\x01", secrets.token_bytes(32), secrets.token_bytes(size)):
        blob, enc = make_credential(ek, ak_name(), secret)
        assert software_activate(private, ek, ak_name(), blob, enc) == secret
        with pytest.raises(ValueError, match="integrity"):
            software_activate(private, ek, ak_name(b"other"), blob, enc)


# ---------------------------------------------------------------------------------------------
# the KDFs and constants against independent implementations
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hash_alg", [Alg.SHA256, Alg.SHA384, Alg.SHA512])
@pytest.mark.parametrize("bits", [128, 256, 264, 520, 1024])
def test_kdfa_matches_sp800_108(hash_alg: int, bits: int) -> None:
    key, context = secrets.token_bytes(32), secrets.token_bytes(34)
    assert kdfa(hash_alg, key, b"STORAGE\x00", context, b"", bits) == ref_kdfa(
        hash_alg, key, b"STORAGE", context, bits
    )


@pytest.mark.parametrize("hash_alg", [Alg.SHA256, Alg.SHA384])
@pytest.mark.parametrize("bits", [256, 384, 776])
def test_kdfe_matches_sp800_56a(hash_alg: int, bits: int) -> None:
    z, u, v = secrets.token_bytes(48), secrets.token_bytes(48), secrets.token_bytes(48)
    expected = ConcatKDFHash(
        algorithm=HASHES[hash_alg], length=bits // 8, otherinfo=b"IDENTITY\x00" + u + v
    ).derive(z)
    assert kdfe(hash_alg, z, b"IDENTITY\x00", u, v, bits) == expected


@pytest.mark.parametrize("curve_id", list(CURVES))
def test_curve_orders(curve_id: int) -> None:
    curve, _, order = credential_module._CURVES[curve_id]
    # (n - 1) * G = -G: same x as G; n itself is out of range for a private scalar.
    assert (
        ec.derive_private_key(order - 1, curve).public_key().public_numbers().x
        == ec.derive_private_key(1, curve).public_key().public_numbers().x
    )
    with pytest.raises(ValueError):
        ec.derive_private_key(order, curve)


# ---------------------------------------------------------------------------------------------
# byte-for-byte against tpm2_pytss.utils.make_credential
# ---------------------------------------------------------------------------------------------
def _pytss_public(public: PublicArea) -> Any:
    value, _ = TPM2B_PUBLIC.unmarshal(public.marshal_tpm2b())
    return value


def test_same_bytes_as_pytss_for_rsa(monkeypatch: pytest.MonkeyPatch) -> None:
    private, ek = software_rsa_ek()
    seed = secrets.token_bytes(32)
    import tpm2_pytss.internal.crypto as pytss_crypto

    monkeypatch.setattr(pytss_crypto.secrets, "token_bytes", lambda n: seed[:n])
    secret, name = secrets.token_bytes(32), ak_name()
    their_blob, their_enc = pytss_make_credential(_pytss_public(ek), secret, TPM2B_NAME(name))
    blob, enc = make_credential(ek, name, secret, rng=lambda n: seed[:n])
    # The credential blob depends only on seed, name and secret: identical.
    assert blob == bytes(their_blob.marshal())
    # OAEP padding is randomized, so the encrypted seeds differ but both decrypt to the seed.
    oaep = padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), b"IDENTITY\x00")
    their = bytes(their_enc.marshal())
    assert len(enc) == len(their) == 2 + 256
    assert private.decrypt(enc[2:], oaep) == private.decrypt(their[2:], oaep) == seed


@pytest.mark.parametrize("curve_id", [ECCCurve.NIST_P256, ECCCurve.NIST_P384])
def test_same_bytes_as_pytss_for_ecc(monkeypatch: pytest.MonkeyPatch, curve_id: int) -> None:
    name_alg = Alg.SHA256 if curve_id == ECCCurve.NIST_P256 else Alg.SHA384
    _, ek = software_ecc_ek(curve_id, name_alg, 128 if name_alg == Alg.SHA256 else 256)
    curve, size, order = credential_module._CURVES[curve_id]
    randomness = secrets.token_bytes(size + 8)
    d = int.from_bytes(randomness, "big") % (order - 1) + 1  # how make_credential maps rng bytes
    import tpm2_pytss.internal.crypto as pytss_crypto

    real = ec.generate_private_key
    monkeypatch.setattr(
        pytss_crypto.ec,
        "generate_private_key",
        lambda c, *a: ec.derive_private_key(d, curve) if c.name == curve.name else real(c, *a),
    )
    secret, name = secrets.token_bytes(16), ak_name()
    their_blob, their_enc = pytss_make_credential(_pytss_public(ek), secret, TPM2B_NAME(name))
    blob, enc = make_credential(ek, name, secret, rng=lambda n: randomness[:n])
    assert blob == bytes(their_blob.marshal())
    assert enc == bytes(their_enc.marshal())


def test_output_structure_and_determinism() -> None:
    _, ek = software_ecc_ek()
    fixed = secrets.token_bytes(40)
    first = make_credential(ek, ak_name(), b"s" * 32, rng=lambda n: fixed[:n])
    assert make_credential(ek, ak_name(), b"s" * 32, rng=lambda n: fixed[:n]) == first
    assert make_credential(ek, ak_name(), b"s" * 32)[0] != first[0]  # os.urandom by default
    blob, enc = first
    # TPM2B_ID_OBJECT: size || TPM2B_DIGEST(integrityHMAC, 32) || encIdentity(2 + 32)
    assert struct.unpack_from(">HH", blob) == (len(blob) - 2, 32) and len(blob) == 2 + 2 + 32 + 34
    # TPM2B_ENCRYPTED_SECRET of an ECC EK: size || TPMS_ECC_POINT (two 32-byte coordinates).
    assert struct.unpack_from(">HH", enc) == (len(enc) - 2, 32) and len(enc) == 2 + 2 + 32 + 2 + 32


# ---------------------------------------------------------------------------------------------
# refusals
# ---------------------------------------------------------------------------------------------
def _rsa_ek() -> PublicArea:
    return software_rsa_ek()[1]


BAD: list[tuple[str, Callable[[], tuple[PublicArea, bytes, bytes]], str]] = [
    (
        "signing-key",
        lambda: (
            dataclasses.replace(_rsa_ek(), object_attributes=EK_ATTRS | ObjectAttr.SIGN_ENCRYPT),
            ak_name(),
            b"s",
        ),
        "not a restricted decryption key",
    ),
    (
        "not-restricted",
        lambda: (
            dataclasses.replace(_rsa_ek(), object_attributes=EK_ATTRS & ~ObjectAttr.RESTRICTED),
            ak_name(),
            b"s",
        ),
        "not a restricted decryption key",
    ),
    (
        "no-symmetric",
        lambda: (
            dataclasses.replace(_rsa_ek(), parameters=RsaParms(SymDef(), Scheme(), 2048, 0)),
            ak_name(),
            b"s",
        ),
        "AES-CFB expected",
    ),
    ("name-too-short", lambda: (_rsa_ek(), ak_name()[:-1], b"s"), "not a key Name"),
    ("name-unknown-alg", lambda: (_rsa_ek(), b"\x12\x34" + bytes(32), b"s"), "not a key Name"),
    ("handle-as-name", lambda: (_rsa_ek(), b"\x40\x00\x00\x01", b"s"), "not a key Name"),
    ("empty-secret", lambda: (_rsa_ek(), ak_name(), b""), "1..32 bytes"),
    ("secret-too-long", lambda: (_rsa_ek(), ak_name(), bytes(33)), "1..32 bytes"),
    (
        "point-off-curve",
        lambda: (
            dataclasses.replace(software_ecc_ek()[1], unique=EccPoint(b"\x01" * 32, b"\x02" * 32)),
            ak_name(),
            b"s",
        ),
        "EK public key is unusable",
    ),
]


@pytest.mark.parametrize(("make", "message"), [(m, msg) for _, m, msg in BAD], ids=[i for i, _, _ in BAD])
def test_refused(make: Callable[[], tuple[PublicArea, bytes, bytes]], message: str) -> None:
    ek, name, secret = make()
    with pytest.raises(CredentialError, match=message):
        make_credential(ek, name, secret)


def test_rng_must_return_the_requested_size() -> None:
    with pytest.raises(ValueError, match="exactly 32 bytes"):
        make_credential(_rsa_ek(), ak_name(), b"s", rng=lambda n: bytes(n - 1))


# ---------------------------------------------------------------------------------------------
# real TPMs
# ---------------------------------------------------------------------------------------------
@pytest.mark.swtpm
@pytest.mark.parametrize("ek_alg", ["rsa", "ecc"])
def test_swtpm_activates_the_credential(swtpm: Swtpm, tmp_path: Path, ek_alg: str) -> None:
    with TpmAdapter(swtpm.tcti, tmp_path / "state", ek_alg=ek_alg) as adapter:
        ek = parse_tpm2b_public(adapter.ek_public())
        if ek_alg == "ecc":  # swtpm's ECC EK: high-range P-384, SHA-384 Name, AES-256 (template H-3)
            assert isinstance(ek.parameters, EccParms) and ek.parameters.curve == ECCCurve.NIST_P384
        secret = secrets.token_bytes(32)
        blob, enc = make_credential(ek, adapter.ak_name, secret)
        assert adapter.activate_credential(blob, enc) == secret
        # Made for another AK name: the TPM's integrity check fails (TPM_RC_INTEGRITY).
        blob, enc = make_credential(ek, ak_name(b"some other key"), secret)
        with pytest.raises(TpmError):
            adapter.activate_credential(blob, enc)
        # A flipped bit anywhere in the credential blob is caught as well.
        blob, enc = make_credential(ek, adapter.ak_name, secret)
        flipped = blob[:-1] + bytes([blob[-1] ^ 1])
        with pytest.raises(TpmError):
            adapter.activate_credential(flipped, enc)


@pytest.mark.swtpm
def test_swtpm_refuses_a_credential_for_another_tpms_ek(
    make_swtpm: Callable[[str], Swtpm], tmp_path: Path
) -> None:
    tpm_a, tpm_b = make_swtpm("a"), make_swtpm("b")
    with TpmAdapter(tpm_a.tcti, tmp_path / "a") as a, TpmAdapter(tpm_b.tcti, tmp_path / "b") as b:
        ek_b = parse_tpm2b_public(b.ek_public())
        blob, enc = make_credential(ek_b, a.ak_name, secrets.token_bytes(32))
        with pytest.raises(TpmError):  # A's EK cannot recover a seed encrypted to B's EK
            a.activate_credential(blob, enc)
