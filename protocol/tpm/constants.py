"""TPM 2.0 and TCG PC Client constants (values from TPM 2.0 Part 2 and the TCG PC Client PFP spec)."""

from __future__ import annotations

import hashlib
from enum import IntEnum


class Alg(IntEnum):
    """TPM_ALG_ID (TPM 2.0 Part 2, table 9) — the subset this project meets."""

    ERROR = 0x0000
    RSA = 0x0001
    SHA1 = 0x0004
    HMAC = 0x0005
    AES = 0x0006
    KEYEDHASH = 0x0008
    XOR = 0x000A
    SHA256 = 0x000B
    SHA384 = 0x000C
    SHA512 = 0x000D
    NULL = 0x0010
    SM3_256 = 0x0012
    RSASSA = 0x0014
    RSAES = 0x0015
    RSAPSS = 0x0016
    OAEP = 0x0017
    ECDSA = 0x0018
    ECDH = 0x0019
    ECDAA = 0x001A
    ECSCHNORR = 0x001C
    KDF1_SP800_56A = 0x0020
    KDF1_SP800_108 = 0x0022
    ECC = 0x0023
    SYMCIPHER = 0x0025
    CFB = 0x0043
    SHA3_256 = 0x0027
    SHA3_384 = 0x0028
    SHA3_512 = 0x0029


# Hash algorithms: TPM id -> (bank name as tpm2-tools spells it, digest size, hashlib name).
HASH_ALGS: dict[int, tuple[str, int, str]] = {
    Alg.SHA1: ("sha1", 20, "sha1"),
    Alg.SHA256: ("sha256", 32, "sha256"),
    Alg.SHA384: ("sha384", 48, "sha384"),
    Alg.SHA512: ("sha512", 64, "sha512"),
    Alg.SM3_256: ("sm3_256", 32, "sm3"),
    Alg.SHA3_256: ("sha3_256", 32, "sha3_256"),
    Alg.SHA3_384: ("sha3_384", 48, "sha3_384"),
    Alg.SHA3_512: ("sha3_512", 64, "sha3_512"),
}
BANK_TO_ALG: dict[str, int] = {name: alg for alg, (name, _, _) in HASH_ALGS.items()}


def hash_name(alg: int) -> str:
    """Bank name ('sha256') for a TPM hash algorithm id; raises KeyError if unknown."""
    return HASH_ALGS[alg][0]


def digest_size(alg: int) -> int:
    return HASH_ALGS[alg][1]


def new_hash(alg: int) -> hashlib._Hash:
    """A fresh hashlib object for a TPM hash algorithm (raises KeyError/ValueError if unsupported)."""
    return hashlib.new(HASH_ALGS[alg][2])


class ECCCurve(IntEnum):
    """TPM_ECC_CURVE (TPM 2.0 Part 2, table 10)."""

    NONE = 0x0000
    NIST_P192 = 0x0001
    NIST_P224 = 0x0002
    NIST_P256 = 0x0003
    NIST_P384 = 0x0004
    NIST_P521 = 0x0005
    BN_P256 = 0x0010
    BN_P638 = 0x0011
    SM2_P256 = 0x0020


class StructureTag(IntEnum):
    """TPM_ST (TPM 2.0 Part 2, table 19) — the attestation subset."""

    ATTEST_NV = 0x8014
    ATTEST_COMMAND_AUDIT = 0x8015
    ATTEST_SESSION_AUDIT = 0x8016
    ATTEST_CERTIFY = 0x8017
    ATTEST_QUOTE = 0x8018
    ATTEST_TIME = 0x8019
    ATTEST_CREATION = 0x801A
    ATTEST_NV_DIGEST = 0x801C


# TPM_GENERATED_VALUE: every TPMS_ATTEST made by a TPM starts with this magic (Part 2, 6.2).
TPM_GENERATED_VALUE = 0xFF544347


class ObjectAttr:
    """TPMA_OBJECT bits (TPM 2.0 Part 2, table 31)."""

    FIXED_TPM = 1 << 1
    ST_CLEAR = 1 << 2
    FIXED_PARENT = 1 << 4
    SENSITIVE_DATA_ORIGIN = 1 << 5
    USER_WITH_AUTH = 1 << 6
    ADMIN_WITH_POLICY = 1 << 7
    NO_DA = 1 << 10
    ENCRYPTED_DUPLICATION = 1 << 11
    RESTRICTED = 1 << 16
    DECRYPT = 1 << 17
    SIGN_ENCRYPT = 1 << 18
    X509_SIGN = 1 << 19


# NV indices of the EK certificates (TCG EK Credential Profile 2.0, section 2.2.1.5).
NV_EK_CERT_RSA = 0x01C00002
NV_EK_CERT_ECC = 0x01C0000A


class EventType(IntEnum):
    """TCG PC Client PFP event types (spec 1.05, section 10.4.1)."""

    EV_PREBOOT_CERT = 0x00000000
    EV_POST_CODE = 0x00000001
    EV_UNUSED = 0x00000002
    EV_NO_ACTION = 0x00000003
    EV_SEPARATOR = 0x00000004
    EV_ACTION = 0x00000005
    EV_EVENT_TAG = 0x00000006
    EV_S_CRTM_CONTENTS = 0x00000007
    EV_S_CRTM_VERSION = 0x00000008
    EV_CPU_MICROCODE = 0x00000009
    EV_PLATFORM_CONFIG_FLAGS = 0x0000000A
    EV_TABLE_OF_DEVICES = 0x0000000B
    EV_COMPACT_HASH = 0x0000000C
    EV_IPL = 0x0000000D
    EV_IPL_PARTITION_DATA = 0x0000000E
    EV_NONHOST_CODE = 0x0000000F
    EV_NONHOST_CONFIG = 0x00000010
    EV_NONHOST_INFO = 0x00000011
    EV_OMIT_BOOT_DEVICE_EVENTS = 0x00000012
    EV_POST_CODE2 = 0x00000013
    EV_EFI_EVENT_BASE = 0x80000000
    EV_EFI_VARIABLE_DRIVER_CONFIG = 0x80000001
    EV_EFI_VARIABLE_BOOT = 0x80000002
    EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000003
    EV_EFI_BOOT_SERVICES_DRIVER = 0x80000004
    EV_EFI_RUNTIME_SERVICES_DRIVER = 0x80000005
    EV_EFI_GPT_EVENT = 0x80000006
    EV_EFI_ACTION = 0x80000007
    EV_EFI_PLATFORM_FIRMWARE_BLOB = 0x80000008
    EV_EFI_HANDOFF_TABLES = 0x80000009
    EV_EFI_PLATFORM_FIRMWARE_BLOB2 = 0x8000000A
    EV_EFI_HANDOFF_TABLES2 = 0x8000000B
    EV_EFI_VARIABLE_BOOT2 = 0x8000000C
    EV_EFI_GPT_EVENT2 = 0x8000000D
    EV_EFI_HCRTM_EVENT = 0x80000010
    EV_EFI_VARIABLE_AUTHORITY = 0x800000E0
    EV_EFI_SPDM_FIRMWARE_BLOB = 0x800000E1
    EV_EFI_SPDM_FIRMWARE_CONFIG = 0x800000E2


def event_type_name(value: int) -> str:
    try:
        return EventType(value).name
    except ValueError:
        return f"EV_UNKNOWN_0x{value:08x}"


# TPM 2.0 response codes we name explicitly (Part 2, 6.6); the rest are decoded generically.
TPM_RC_NAMES: dict[int, str] = {
    0x000: "TPM_RC_SUCCESS",
    0x01E: "TPM_RC_BAD_TAG",
    0x100: "TPM_RC_INITIALIZE",
    0x101: "TPM_RC_FAILURE",
    0x103: "TPM_RC_SEQUENCE",
    0x10B: "TPM_RC_PRIVATE",
    0x119: "TPM_RC_HMAC",
    0x120: "TPM_RC_DISABLED",
    0x121: "TPM_RC_EXCLUSIVE",
    0x124: "TPM_RC_AUTH_TYPE",
    0x125: "TPM_RC_AUTH_MISSING",
    0x126: "TPM_RC_POLICY",
    0x127: "TPM_RC_PCR",
    0x128: "TPM_RC_PCR_CHANGED",
    0x12D: "TPM_RC_UPGRADE",
    0x12E: "TPM_RC_TOO_MANY_CONTEXTS",
    0x12F: "TPM_RC_AUTH_UNAVAILABLE",
    0x130: "TPM_RC_REBOOT",
    0x131: "TPM_RC_UNBALANCED",
    0x142: "TPM_RC_COMMAND_SIZE",
    0x143: "TPM_RC_COMMAND_CODE",
    0x144: "TPM_RC_AUTHSIZE",
    0x145: "TPM_RC_AUTH_CONTEXT",
    0x146: "TPM_RC_NV_RANGE",
    0x147: "TPM_RC_NV_SIZE",
    0x148: "TPM_RC_NV_LOCKED",
    0x149: "TPM_RC_NV_AUTHORIZATION",
    0x14A: "TPM_RC_NV_UNINITIALIZED",
    0x14B: "TPM_RC_NV_SPACE",
    0x14C: "TPM_RC_NV_DEFINED",
    0x150: "TPM_RC_BAD_CONTEXT",
    0x151: "TPM_RC_CPHASH",
    0x152: "TPM_RC_PARENT",
    0x153: "TPM_RC_NEEDS_TEST",
    0x154: "TPM_RC_NO_RESULT",
    0x155: "TPM_RC_SENSITIVE",
    0x081: "TPM_RC_ASYMMETRIC",
    0x082: "TPM_RC_ATTRIBUTES",
    0x083: "TPM_RC_HASH",
    0x084: "TPM_RC_VALUE",
    0x085: "TPM_RC_HIERARCHY",
    0x087: "TPM_RC_KEY_SIZE",
    0x088: "TPM_RC_MGF",
    0x089: "TPM_RC_MODE",
    0x08A: "TPM_RC_TYPE",
    0x08B: "TPM_RC_HANDLE",
    0x08C: "TPM_RC_KDF",
    0x08D: "TPM_RC_RANGE",
    0x08E: "TPM_RC_AUTH_FAIL",
    0x08F: "TPM_RC_NONCE",
    0x090: "TPM_RC_PP",
    0x092: "TPM_RC_SCHEME",
    0x095: "TPM_RC_SIZE",
    0x096: "TPM_RC_SYMMETRIC",
    0x097: "TPM_RC_TAG",
    0x098: "TPM_RC_SELECTOR",
    0x09A: "TPM_RC_INSUFFICIENT",
    0x09B: "TPM_RC_SIGNATURE",
    0x09C: "TPM_RC_KEY",
    0x09D: "TPM_RC_POLICY_FAIL",
    0x09F: "TPM_RC_INTEGRITY",
    0x0A0: "TPM_RC_TICKET",
    0x0A1: "TPM_RC_RESERVED_BITS",
    0x0A2: "TPM_RC_BAD_AUTH",
    0x0A3: "TPM_RC_EXPIRED",
    0x0A4: "TPM_RC_POLICY_CC",
    0x0A5: "TPM_RC_BINDING",
    0x0A6: "TPM_RC_CURVE",
    0x0A7: "TPM_RC_ECC_POINT",
    0x901: "TPM_RC_CONTEXT_GAP",
    0x902: "TPM_RC_OBJECT_MEMORY",
    0x903: "TPM_RC_SESSION_MEMORY",
    0x904: "TPM_RC_MEMORY",
    0x905: "TPM_RC_SESSION_HANDLES",
    0x906: "TPM_RC_OBJECT_HANDLES",
    0x907: "TPM_RC_LOCALITY",
    0x908: "TPM_RC_YIELDED",
    0x909: "TPM_RC_CANCELED",
    0x90A: "TPM_RC_TESTING",
    0x922: "TPM_RC_RETRY",
    0x923: "TPM_RC_NV_RATE",
    0x924: "TPM_RC_LOCKOUT",
    0x925: "TPM_RC_LOCKOUT",
    0x926: "TPM_RC_NV_UNAVAILABLE",
}


def describe_rc(rc: int) -> str:
    """Decode a TPM 2.0 response code into a readable name (Part 2, 6.6 'Response Codes').

    Format-one codes (bit 7 set) carry a parameter/handle/session number in bits 8-11.
    The layer (bits 16-23) tells TSS-generated codes from TPM ones.
    """
    layer = (rc >> 16) & 0xFF
    base = rc & 0xFFFF
    layer_name = {0: "TPM", 5: "TSS-FAPI", 6: "TSS-ESAPI", 7: "TSS-SYS", 8: "TSS-MU", 10: "TSS-TCTI",
                  11: "TPM(RM)", 12: "TSS-RM"}.get(layer, f"layer {layer}")
    if base & 0x80:  # format one: error number in bits 0-5, with parameter/handle/session info
        number = 0x080 | (base & 0x3F)
        name = TPM_RC_NAMES.get(number, f"TPM_RC_0x{number:03x}")
        n = (base >> 8) & 0xF
        if base & 0x40:
            where = f" (parameter {n})"
        elif n & 0x8:
            where = f" (session {n & 0x7})"
        elif n:
            where = f" (handle {n})"
        else:
            where = ""
        return f"{layer_name}: {name}{where}"
    name = TPM_RC_NAMES.get(base & 0xFFF, f"0x{base:03x}")
    return f"{layer_name}: {name}"
