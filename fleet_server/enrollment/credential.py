"""TPM2_MakeCredential in pure Python (the server side of credential activation; no TPM, no TSS).

The server proves that an attestation key (AK) lives in the same TPM as a certified endorsement key
(EK) by encrypting a secret that only that TPM can release, and only for that AK: TPM2_ActivateCredential
(TPM 2.0 Part 3, 12.5) decrypts it with the EK and checks that the AK loaded beside it has the Name the
credential was made for.  This module computes what TPM2_MakeCredential (Part 3, 12.6) would, following
TPM 2.0 Part 1, section 24 'Credential Protection':

1. **Seed** (Part 1, 24.4 and Annex B.10.3 / C.6.1, 'Secret Sharing'): a fresh seed of the EK's nameAlg
   digest size, shared with the EK under the label ``"IDENTITY"`` (with its terminating NUL):

   * RSA EK: ``encryptedSecret = RSAES-OAEP(EK, seed)`` with the nameAlg as OAEP hash and MGF1 hash
     and ``"IDENTITY\\0"`` as the OAEP label (Part 1, B.10.3);
   * ECC EK: one-pass ECDH with an ephemeral key ``(d_e, Q_e)`` on the EK's curve (Part 1, C.6.1):
     ``Z = x(d_e * Q_EK)``, ``seed = KDFe(nameAlg, Z, "IDENTITY\\0", x(Q_e), x(Q_EK), bits)`` and
     ``encryptedSecret = TPMS_ECC_POINT(Q_e)``.

2. **Symmetric key** (Part 1, 24.4): ``symKey = KDFa(nameAlg, seed, "STORAGE", name, "", keyBits)``
   where ``name`` is the AK's Name, and ``encIdentity = CFB(symKey, IV = 0, TPM2B_DIGEST(secret))`` with
   the EK's symmetric algorithm (AES; a zero IV is safe because each key encrypts one message).

3. **Integrity** (Part 1, 24.5): ``HMACkey = KDFa(nameAlg, seed, "INTEGRITY", "", "", digestBits)``
   and ``outerHMAC = HMAC_nameAlg(HMACkey, encIdentity || name)``.

4. Output: ``TPM2B_ID_OBJECT`` = size || TPM2B_DIGEST(outerHMAC) || encIdentity, and
   ``TPM2B_ENCRYPTED_SECRET`` = size || encryptedSecret (Part 2, 12.4.3 and 11.4.33).

KDFa is SP 800-108 counter-mode HMAC (Part 1, 11.4.10.2), KDFe SP 800-56A concatenation KDF
(Part 1, 11.4.10.3); both are implemented here over :mod:`hmac`/:mod:`hashlib`.  Only ``cryptography``
is used for RSA-OAEP, ECDH and AES: the server does not need tpm2-pytss.

``rng`` supplies every random value this module chooses (the seed and the ephemeral ECC scalar), so
tests can make the output reproducible; the random padding inside RSA-OAEP comes from OpenSSL.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Callable

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

try:  # cryptography >= 47 keeps CFB among the "decrepit" modes; TPM 2.0 credential protection needs it
    from cryptography.hazmat.decrepit.ciphers.modes import CFB
except ImportError:  # pragma: no cover - older cryptography
    from cryptography.hazmat.primitives.ciphers.modes import CFB

from protocol.errors import StructureError, VerificationError
from protocol.tpm.constants import HASH_ALGS, Alg, ECCCurve, ObjectAttr
from protocol.tpm.structures import EccParms, EccPoint, PublicArea, RsaParms, alg_name

__all__ = [
    "IDENTITY_LABEL",
    "INTEGRITY_LABEL",
    "STORAGE_LABEL",
    "CredentialError",
    "kdfa",
    "kdfe",
    "make_credential",
]

# Labels are NUL-terminated strings and the NUL is part of the KDF input (Part 1, 11.4.10.2:
# "Label ... a NULL-terminated string"; B.10.3 for the OAEP label).
IDENTITY_LABEL = b"IDENTITY\x00"
STORAGE_LABEL = b"STORAGE\x00"
INTEGRITY_LABEL = b"INTEGRITY\x00"

_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")

# Hashes usable as an EK nameAlg here: hashlib name and the cryptography hash class.
_HASHES: dict[int, tuple[str, type[hashes.HashAlgorithm]]] = {
    Alg.SHA1: ("sha1", hashes.SHA1),  # legacy only; no EK template uses it
    Alg.SHA256: ("sha256", hashes.SHA256),
    Alg.SHA384: ("sha384", hashes.SHA384),
    Alg.SHA512: ("sha512", hashes.SHA512),
    Alg.SHA3_256: ("sha3_256", hashes.SHA3_256),
    Alg.SHA3_384: ("sha3_384", hashes.SHA3_384),
    Alg.SHA3_512: ("sha3_512", hashes.SHA3_512),
}

# TPM_ECC_CURVE -> (curve, coordinate bytes, group order n) for the ephemeral key of C.6.1.
# The orders are those of FIPS 186-4, D.1.2 (the tests check them against the curve arithmetic).
_CURVES: dict[int, tuple[ec.EllipticCurve, int, int]] = {
    ECCCurve.NIST_P256: (ec.SECP256R1(), 32, int(
        "FFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551", 16)),
    ECCCurve.NIST_P384: (ec.SECP384R1(), 48, int(
        "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF"
        "581A0DB248B0A77AECEC196ACCC52973", 16)),
    ECCCurve.NIST_P521: (ec.SECP521R1(), 66, int(
        "01FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFA"
        "51868783BF2F966B7FCC0148F709A5D03BB5C9B8899C47AEBB6FB71E91386409", 16)),
}

#: Most bytes a credential may have: it is a TPM2B_DIGEST (Part 2, 10.4.2), and TPM2_MakeCredential
#: also refuses credentials larger than the digest of the EK's nameAlg (Part 3, 12.6.1, TPM_RC_SIZE).
MAX_CREDENTIAL = 64


class CredentialError(VerificationError):
    """MakeCredential cannot be done for this EK, Name or secret (not an EK-like storage key, etc.)."""


# --------------------------------------------------------------------------------------------------
# key derivation (TPM 2.0 Part 1, 11.4.10)
# --------------------------------------------------------------------------------------------------
def _hash_name(hash_alg: int) -> str:
    entry = _HASHES.get(hash_alg)
    if entry is None:
        raise CredentialError(f"unsupported hash algorithm {alg_name(hash_alg)}")
    return entry[0]


def kdfa(hash_alg: int, key: bytes, label: bytes, context_u: bytes, context_v: bytes, bits: int) -> bytes:
    """KDFa (Part 1, 11.4.10.2): SP 800-108 KDF in counter mode with HMAC_hashAlg as the PRF.

    ``K(i) = HMAC(key, [i]_32 || label || contextU || contextV || [bits]_32)`` for i = 1, 2, ...,
    concatenated and truncated to ``bits``.  ``label`` must carry its terminating NUL (the TPM hashes
    it); e.g. :data:`STORAGE_LABEL`.
    """
    if bits <= 0 or bits % 8:
        raise ValueError("KDFa output size must be a positive multiple of 8 bits")
    name = _hash_name(hash_alg)
    fixed = label + context_u + context_v + _U32.pack(bits)
    out = bytearray()
    counter = 0
    while len(out) * 8 < bits:
        counter += 1
        out += hmac.new(key, _U32.pack(counter) + fixed, name).digest()
    return bytes(out[: bits // 8])


def kdfe(hash_alg: int, z: bytes, use: bytes, party_u: bytes, party_v: bytes, bits: int) -> bytes:
    """KDFe (Part 1, 11.4.10.3): SP 800-56A concatenation KDF.

    ``K(i) = H([i]_32 || Z || Use || PartyUInfo || PartyVInfo)`` for i = 1, 2, ..., truncated to
    ``bits``; ``Z`` is the x-coordinate of the shared point, ``Use`` the NUL-terminated label.
    """
    if bits <= 0 or bits % 8:
        raise ValueError("KDFe output size must be a positive multiple of 8 bits")
    name = _hash_name(hash_alg)
    other = z + use + party_u + party_v
    out = bytearray()
    counter = 0
    while len(out) * 8 < bits:
        counter += 1
        out += hashlib.new(name, _U32.pack(counter) + other).digest()
    return bytes(out[: bits // 8])


# --------------------------------------------------------------------------------------------------
# seed sharing (Part 1, Annex B.10.3 and C.6.1)
# --------------------------------------------------------------------------------------------------
def _rsa_seed(ek: PublicArea, hash_alg: int, rng: Callable[[int], bytes]) -> tuple[bytes, bytes]:
    """(seed, encrypted seed): RSAES-OAEP with the nameAlg and the label "IDENTITY\\0" (B.10.3)."""
    key = ek.public_key()
    if not isinstance(key, rsa.RSAPublicKey):  # pragma: no cover - type and parameters agree (parser)
        raise CredentialError("EK type and key disagree")
    size = hashlib.new(_hash_name(hash_alg)).digest_size
    seed = _random(rng, size)
    algorithm = _HASHES[hash_alg][1]()
    try:
        encrypted = key.encrypt(seed, padding.OAEP(padding.MGF1(algorithm), algorithm, IDENTITY_LABEL))
    except ValueError as exc:  # modulus too small for OAEP with this hash
        raise CredentialError(f"cannot OAEP-encrypt to the RSA EK: {exc}") from None
    return seed, encrypted


def _ecc_seed(ek: PublicArea, params: EccParms, hash_alg: int, rng: Callable[[int], bytes]
              ) -> tuple[bytes, bytes]:
    """(seed, marshalled TPMS_ECC_POINT of the ephemeral key): one-pass ECDH + KDFe (C.6.1)."""
    curve_info = _CURVES.get(params.curve)
    if curve_info is None:
        raise CredentialError(f"unsupported EK curve 0x{params.curve:04x}")
    curve, size, order = curve_info
    key = ek.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):  # pragma: no cover - parser guarantees it
        raise CredentialError("EK type and key disagree")
    # Ephemeral scalar in [1, n-1] from rng, with 64 extra bits so the reduction bias is negligible
    # (FIPS 186-4, B.4.1 'Key Pair Generation Using Extra Random Bits').
    d = int.from_bytes(_random(rng, size + 8), "big") % (order - 1) + 1
    ephemeral = ec.derive_private_key(d, curve)
    numbers = ephemeral.public_key().public_numbers()
    qe_x, qe_y = numbers.x.to_bytes(size, "big"), numbers.y.to_bytes(size, "big")
    z = ephemeral.exchange(ec.ECDH(), key)  # x-coordinate of d_e * Q_EK, padded to the field size
    if not isinstance(ek.unique, EccPoint):  # pragma: no cover - parser guarantees it
        raise CredentialError("EK type and public point disagree")
    ek_x = ek.unique.x
    digest_bits = hashlib.new(_hash_name(hash_alg)).digest_size * 8
    # PartyUInfo is the ephemeral x and PartyVInfo the EK's x, as the TPM feeds them (C.6.1).
    seed = kdfe(hash_alg, z, IDENTITY_LABEL, qe_x, ek_x, digest_bits)
    point = _U16.pack(size) + qe_x + _U16.pack(size) + qe_y  # TPMS_ECC_POINT (Part 2, 11.2.5.2)
    return seed, point


def _random(rng: Callable[[int], bytes], size: int) -> bytes:
    value = rng(size)
    if not isinstance(value, bytes) or len(value) != size:
        raise ValueError(f"rng must return exactly {size} bytes")
    return value


# --------------------------------------------------------------------------------------------------
# MakeCredential
# --------------------------------------------------------------------------------------------------
def _check_ek(ek: PublicArea) -> tuple[int, int]:
    """(nameAlg, symmetric key bits) of an EK fit for credential protection, or raise."""
    attrs = ek.object_attributes
    # Part 3, 12.6.1: the key must be a restricted decryption key (TPM_RC_TYPE / TPM_RC_ATTRIBUTES).
    if not (attrs & ObjectAttr.RESTRICTED and attrs & ObjectAttr.DECRYPT) or attrs & ObjectAttr.SIGN_ENCRYPT:
        raise CredentialError(f"the EK is not a restricted decryption key (objectAttributes 0x{attrs:08x})")
    if ek.name_alg not in _HASHES or ek.name_alg not in HASH_ALGS:
        raise CredentialError(f"EK nameAlg {alg_name(ek.name_alg)} is not supported")
    params = ek.parameters
    if not isinstance(params, RsaParms | EccParms):  # pragma: no cover - the parser allows nothing else
        raise CredentialError("EK is neither RSA nor ECC")
    sym = params.symmetric
    # Part 1, 24.4: encIdentity uses the EK's symmetric algorithm in CFB mode.
    if sym.algorithm != Alg.AES or sym.mode != Alg.CFB or sym.key_bits not in (128, 192, 256):
        raise CredentialError(f"EK symmetric definition {alg_name(sym.algorithm)}-{sym.key_bits}-"
                              f"{alg_name(sym.mode)} is not supported (AES-CFB expected)")
    return ek.name_alg, sym.key_bits


def _check_name(name: bytes) -> None:
    """A Name of a key object: nameAlg (UINT16) || digest of that algorithm (Part 1, 16)."""
    if not isinstance(name, bytes) or len(name) < 2:
        raise CredentialError("AK name must be bytes: nameAlg || digest")
    alg = _U16.unpack_from(name)[0]
    entry = HASH_ALGS.get(alg)
    if entry is None or len(name) != 2 + entry[1]:
        raise CredentialError(f"AK name of {len(name)} bytes with nameAlg {alg_name(alg)} is not a key Name")


def make_credential(ek_public: PublicArea, ak_name: bytes, secret: bytes, *,
                    rng: Callable[[int], bytes] = os.urandom) -> tuple[bytes, bytes]:
    """TPM2_MakeCredential(EK, secret, AK name) in software.

    Returns ``(credential_blob, encrypted_secret)``: the marshalled TPM2B_ID_OBJECT and
    TPM2B_ENCRYPTED_SECRET that :meth:`agent.tpm.adapter.TpmAdapter.activate_credential` (i.e.
    TPM2_ActivateCredential) turns back into ``secret`` - only in the TPM holding ``ek_public``'s
    private key, and only when the activated object's Name is ``ak_name``.

    ``secret`` is 1 up to the EK nameAlg's digest size bytes (32 for the usual SHA-256 EK).  Raises
    :class:`CredentialError` for an EK that is not an RSA/ECC restricted decryption key with an
    AES-CFB symmetric definition, for a malformed Name or an out-of-range secret.
    """
    hash_alg, sym_bits = _check_ek(ek_public)
    _check_name(ak_name)
    digest_size = hashlib.new(_hash_name(hash_alg)).digest_size
    if not isinstance(secret, bytes) or not 1 <= len(secret) <= min(digest_size, MAX_CREDENTIAL):
        raise CredentialError(f"the credential secret must be 1..{digest_size} bytes")

    try:
        if isinstance(ek_public.parameters, RsaParms):
            seed, encrypted_seed = _rsa_seed(ek_public, hash_alg, rng)
        else:
            seed, encrypted_seed = _ecc_seed(ek_public, ek_public.parameters, hash_alg, rng)
    except StructureError as exc:  # not a valid public key (bad modulus, point not on the curve)
        raise CredentialError(f"the EK public key is unusable: {exc}") from None

    # Part 1, 24.4: symKey = KDFa(nameAlg, seed, "STORAGE", Name, NULL, keyBits); CFB with a zero IV.
    sym_key = kdfa(hash_alg, seed, STORAGE_LABEL, ak_name, b"", sym_bits)
    encryptor = Cipher(algorithms.AES(sym_key), CFB(bytes(16))).encryptor()
    enc_identity = encryptor.update(_U16.pack(len(secret)) + secret) + encryptor.finalize()

    # Part 1, 24.5: HMACkey = KDFa(nameAlg, seed, "INTEGRITY", NULL, NULL, digest bits);
    # outerHMAC = HMAC(HMACkey, encIdentity || Name).
    hmac_key = kdfa(hash_alg, seed, INTEGRITY_LABEL, b"", b"", digest_size * 8)
    outer_hmac = hmac.new(hmac_key, enc_identity + ak_name, _hash_name(hash_alg)).digest()

    id_object = _U16.pack(len(outer_hmac)) + outer_hmac + enc_identity
    credential_blob = _U16.pack(len(id_object)) + id_object          # TPM2B_ID_OBJECT
    encrypted_secret = _U16.pack(len(encrypted_seed)) + encrypted_seed  # TPM2B_ENCRYPTED_SECRET
    return credential_blob, encrypted_secret
