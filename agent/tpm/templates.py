"""TPMT_PUBLIC templates of the keys the agent creates (tpm2-pytss types).

Each template states its source: the TCG EK Credential Profile 2.0 for EKs (built by
``tpm2_pytss.utils.create_ek_template``, which also honours template/nonce NV indices), the TCG TPM v2.0
Provisioning Guidance for the storage root key, and tpm2-tools' ``tpm2_createak`` for attestation keys.
"""

from __future__ import annotations

from dataclasses import dataclass

from tpm2_pytss.constants import TPM2_ALG, TPM2_ECC, TPMA_OBJECT
from tpm2_pytss.types import (
    TPM2B_PUBLIC,
    TPMS_ECC_PARMS,
    TPMS_ECC_POINT,
    TPMS_RSA_PARMS,
    TPMS_SCHEME_HASH,
    TPMT_ECC_SCHEME,
    TPMT_KDF_SCHEME,
    TPMT_PUBLIC,
    TPMT_RSA_SCHEME,
    TPMT_SYM_DEF_OBJECT,
    TPMU_ASYM_SCHEME,
    TPMU_PUBLIC_ID,
    TPMU_PUBLIC_PARMS,
    TPMU_SYM_KEY_BITS,
    TPMU_SYM_MODE,
)

from protocol.errors import ConfigError

AK_ALGS = ("ecc", "rsa")
EK_ALGS = ("rsa", "ecc")

# Attestation key: a restricted signing key (TPM 2.0 Part 1, "Restricted signing keys"), the
# attributes tpm2_createak uses plus noDA.  Restricted means the TPM signs only digests it produced
# itself (quotes, certifications) or that carry a hash-check ticket, so the AK cannot be abused to sign
# forged TPMS_ATTEST structures.  noDA: the AK's authValue is empty, so dictionary-attack protection
# guards nothing, but without noDA the AK becomes unusable while the TPM is in DA lockout — which
# unclean power losses alone can cause (each one counts as a failure; swtpm locks out after 3) — and
# an edge device would stop attesting for the whole recovery time.
AK_ATTRIBUTES = (
    TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
    | TPMA_OBJECT.NODA
    | TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.SIGN_ENCRYPT
)

# Storage root key: TCG TPM v2.0 Provisioning Guidance, "SRK template" (ECC NIST P-256 variant, the
# one hardware TPMs create in milliseconds rather than seconds).
SRK_ATTRIBUTES = (
    TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
    | TPMA_OBJECT.NODA
    | TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.DECRYPT
)

# PCR-bound decryption key for model keys.  No userWithAuth: the USER role (RSA_Decrypt) is only
# reachable through the authPolicy; adminWithPolicy: the ADMIN role (Certify, ObjectChangeAuth) too.
BOUND_KEY_ATTRIBUTES = (
    TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.DECRYPT
    | TPMA_OBJECT.ADMINWITHPOLICY
)

_SHA256 = TPMU_ASYM_SCHEME(anySig=TPMS_SCHEME_HASH(hashAlg=TPM2_ALG.SHA256))
_AES128_CFB = TPMT_SYM_DEF_OBJECT(
    algorithm=TPM2_ALG.AES, keyBits=TPMU_SYM_KEY_BITS(aes=128), mode=TPMU_SYM_MODE(aes=TPM2_ALG.CFB)
)


def _null_sym() -> TPMT_SYM_DEF_OBJECT:
    return TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL)


def ak_template(alg: str) -> TPM2B_PUBLIC:
    """Attestation key template: ``"ecc"`` = P-256/ECDSA-SHA256, ``"rsa"`` = RSA-2048/RSASSA-SHA256."""
    if alg == "ecc":
        area = TPMT_PUBLIC(
            type=TPM2_ALG.ECC,
            nameAlg=TPM2_ALG.SHA256,
            objectAttributes=AK_ATTRIBUTES,
            parameters=TPMU_PUBLIC_PARMS(
                eccDetail=TPMS_ECC_PARMS(
                    symmetric=_null_sym(),
                    scheme=TPMT_ECC_SCHEME(scheme=TPM2_ALG.ECDSA, details=_SHA256),
                    curveID=TPM2_ECC.NIST_P256,
                    kdf=TPMT_KDF_SCHEME(scheme=TPM2_ALG.NULL),
                )
            ),
        )
    elif alg == "rsa":
        area = TPMT_PUBLIC(
            type=TPM2_ALG.RSA,
            nameAlg=TPM2_ALG.SHA256,
            objectAttributes=AK_ATTRIBUTES,
            parameters=TPMU_PUBLIC_PARMS(
                rsaDetail=TPMS_RSA_PARMS(
                    symmetric=_null_sym(),
                    scheme=TPMT_RSA_SCHEME(scheme=TPM2_ALG.RSASSA, details=_SHA256),
                    keyBits=2048,
                    exponent=0,
                )
            ),
        )
    else:
        raise ConfigError(f"unknown AK algorithm {alg!r}; expected one of {AK_ALGS}")
    return TPM2B_PUBLIC(publicArea=area)


def srk_template() -> TPM2B_PUBLIC:
    """Storage root key template (owner hierarchy), TCG Provisioning Guidance ECC P-256 SRK."""
    return TPM2B_PUBLIC(
        publicArea=TPMT_PUBLIC(
            type=TPM2_ALG.ECC,
            nameAlg=TPM2_ALG.SHA256,
            objectAttributes=SRK_ATTRIBUTES,
            parameters=TPMU_PUBLIC_PARMS(
                eccDetail=TPMS_ECC_PARMS(
                    symmetric=_AES128_CFB,
                    scheme=TPMT_ECC_SCHEME(scheme=TPM2_ALG.NULL),
                    curveID=TPM2_ECC.NIST_P256,
                    kdf=TPMT_KDF_SCHEME(scheme=TPM2_ALG.NULL),
                )
            ),
            # The guidance fills unique with zeros of the key size.
            unique=TPMU_PUBLIC_ID(ecc=TPMS_ECC_POINT(x=bytes(32), y=bytes(32))),
        )
    )


def bound_key_template(auth_policy: bytes) -> TPM2B_PUBLIC:
    """RSA-2048 OAEP-SHA256 decryption key whose only authorization is ``auth_policy``.

    The scheme is fixed in the key, so TPM2_RSA_Decrypt cannot be asked for raw RSA or PKCS#1 v1.5
    (no padding oracle).
    """
    return TPM2B_PUBLIC(
        publicArea=TPMT_PUBLIC(
            type=TPM2_ALG.RSA,
            nameAlg=TPM2_ALG.SHA256,
            objectAttributes=BOUND_KEY_ATTRIBUTES,
            authPolicy=auth_policy,
            parameters=TPMU_PUBLIC_PARMS(
                rsaDetail=TPMS_RSA_PARMS(
                    symmetric=_null_sym(),
                    scheme=TPMT_RSA_SCHEME(scheme=TPM2_ALG.OAEP, details=_SHA256),
                    keyBits=2048,
                    exponent=0,
                )
            ),
        )
    )


@dataclass(frozen=True, slots=True)
class EkProfile:
    """Where an EK's certificate lives and which EK Credential Profile template matches it."""

    alg: str
    cert_index: int
    template_name: str  # name understood by tpm2_pytss.utils.create_ek_template


# TCG EK Credential Profile 2.0, 2.2.1.4/2.2.1.5: low-range RSA-2048 and ECC P-256 EKs; swtpm 0.7 puts
# its ECC EK (P-384, template H-3) in the high range, so ECC falls back to that index.
EK_PROFILES: dict[str, tuple[EkProfile, ...]] = {
    "rsa": (EkProfile("rsa", 0x01C00002, "EK-RSA2048"),),
    "ecc": (EkProfile("ecc", 0x01C0000A, "EK-ECC256"), EkProfile("ecc", 0x01C00016, "EK-HIGH-ECC384")),
}


def same_template(a: TPMT_PUBLIC, b: TPMT_PUBLIC) -> bool:
    """True if two public areas agree on everything but the key itself (unique)."""
    def strip(area: TPMT_PUBLIC) -> bytes:
        copy, _ = TPMT_PUBLIC.unmarshal(area.marshal())
        if copy.type == TPM2_ALG.RSA:
            copy.unique.rsa = b""
        elif copy.type == TPM2_ALG.ECC:
            copy.unique.ecc = TPMS_ECC_POINT()
        return bytes(copy.marshal())

    return strip(a) == strip(b)
