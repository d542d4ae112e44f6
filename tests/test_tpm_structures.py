"""TPM structure codecs: table-driven cases, truncation and garbling, a deterministic fuzz, and Names
checked against tpm2-tools on a real swtpm."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import tools_env
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from firmware_sim.swtpm import Swtpm
from protocol.errors import StructureError
from protocol.tpm.constants import TPM_GENERATED_VALUE, Alg, ECCCurve, ObjectAttr, StructureTag
from protocol.tpm.marshal import Reader, Writer
from protocol.tpm.structures import (
    Attest,
    AttestedCertify,
    AttestedCommandAudit,
    AttestedCreation,
    AttestedNV,
    AttestedNVDigest,
    AttestedQuote,
    AttestedSessionAudit,
    AttestedTime,
    ClockInfo,
    EccParms,
    EccPoint,
    EccSignature,
    PcrSelection,
    PublicArea,
    RsaParms,
    RsaSignature,
    Scheme,
    SymDef,
    marshal_pcr_selection,
    parse_attest,
    parse_pcr_selection,
    parse_signature,
    parse_tpm2b_public,
    parse_tpmt_public,
    pcr_selection_from_mapping,
)

# --- real tpm2-tools output from swtpm (tpm2_createek/createak/quote, tpm2-tools 5.4) --------------
# TPMS_ATTEST of `tpm2_quote -l sha256:0,1,7+sha1:0 -q abcd1234 -g sha256` by an ECC AK.
QUOTE_MSG = bytes.fromhex(
    "ff54434780180022000b51182e05c2d8375972f2ec066d401c59ecda66d6695d695a1b6b603b7cf2bbba0004abcd1234"
    "000000000000036c000000020000000001201910230016363600000002000b038300000004030100000020927865dc2b"
    "aaaa2f37ce501f8a70f8c6e0188d67dbb03904a3e15ae508422c45")
QUOTE_SIG = bytes.fromhex(
    "0018000b0020bfd3fe945a3de5f6538a8e6f310768bbe42691a4a87667a3563a6f3db9f1518d002079530b8b948e4667"
    "7e5fc51c2bf1f2dfcea5db5e9a4cb6035dadca38e63132dc")
# `tpm2_createak -G ecc -g sha256 -s ecdsa -u`: TPM2B_PUBLIC.
AK_ECC_PUB = bytes.fromhex(
    "00580023000b00050072000000100018000b00030010002017e4f5a0b4a21dbd052980cda4c29ea9bd902587e31a8d7a"
    "cd7d93e5b7550e0800206b8c41af23a1406f454003a437c607b4d2fac26817f4c4c838aee42650229418")
# `tpm2_createek -G ecc -u`: TPM2B_PUBLIC with the EK policy and AES-128-CFB.
EK_ECC_PUB = bytes.fromhex(
    "007a0023000b000300b20020837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa00060080"
    "00430010000300100020a5c0ae7325effb175deee1d847aac984efc2d1fd6908184a2d4e07816be430f00020a1f23bd2"
    "135587b58f733b690c04fb2e5e0d5beb5d6043730183c697fbf5f0f1")
EK_ECC_NAME = bytes.fromhex("000b746594efb97af42642be0f2ea7b4031430a3146e66811c697967ca2525f632db")
# TPM 2.0 Part 2, B.3.3 / EK Credential Profile: PolicySecret(TPM_RH_ENDORSEMENT) digest.
EK_POLICY = bytes.fromhex("837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa")


def _rsa_sig(size: int = 256, alg: int = Alg.RSASSA) -> bytes:
    return RsaSignature(alg, Alg.SHA256, bytes(range(256))[:size]).marshal()


def _ecc_public(**overrides: object) -> PublicArea:
    fields: dict[str, object] = {
        "type": Alg.ECC, "name_alg": Alg.SHA256,
        "object_attributes": 0x00050072, "auth_policy": b"",
        "parameters": EccParms(SymDef(), Scheme(Alg.ECDSA, Alg.SHA256), ECCCurve.NIST_P256, Scheme()),
        "unique": EccPoint(b"\x01" * 32, b"\x02" * 32),
    }
    fields.update(overrides)
    return PublicArea(**fields)  # type: ignore[arg-type]


def _rsa_public(modulus: bytes = b"\xc1" * 256, **overrides: object) -> PublicArea:
    fields: dict[str, object] = {
        "type": Alg.RSA, "name_alg": Alg.SHA256, "object_attributes": 0x000300B2,
        "auth_policy": EK_POLICY,
        "parameters": RsaParms(SymDef(Alg.AES, 128, Alg.CFB), Scheme(), 8 * len(modulus), 0),
        "unique": modulus,
    }
    fields.update(overrides)
    return PublicArea(**fields)  # type: ignore[arg-type]


def _attest(attested: object, st_type: int) -> Attest:
    return Attest(TPM_GENERATED_VALUE, st_type, b"\x00\x0b" + b"\x11" * 32, b"nonce",
                  ClockInfo(10, 2, 1, True), 0x1122334455667788, attested)  # type: ignore[arg-type]


# One valid instance of every structure, for round trips and truncation tables.
ATTESTS: dict[str, Attest] = {
    "quote": _attest(AttestedQuote((PcrSelection(Alg.SHA256, (0, 7, 23)),), b"\xaa" * 32),
                     StructureTag.ATTEST_QUOTE),
    "certify": _attest(AttestedCertify(b"\x00\x0b" + b"\x01" * 32, b"\x00\x0b" + b"\x02" * 32),
                       StructureTag.ATTEST_CERTIFY),
    "creation": _attest(AttestedCreation(b"\x00\x0b" + b"\x03" * 32, b"\x04" * 32),
                        StructureTag.ATTEST_CREATION),
    "command_audit": _attest(AttestedCommandAudit(7, Alg.SHA256, b"\x05" * 32, b"\x06" * 32),
                             StructureTag.ATTEST_COMMAND_AUDIT),
    "session_audit": _attest(AttestedSessionAudit(True, b"\x07" * 32), StructureTag.ATTEST_SESSION_AUDIT),
    "time": _attest(AttestedTime(99, ClockInfo(5, 6, 7, False), 42), StructureTag.ATTEST_TIME),
    "nv": _attest(AttestedNV(b"\x00\x0b" + b"\x08" * 32, 4, b"counter!"), StructureTag.ATTEST_NV),
    "nv_digest": _attest(AttestedNVDigest(b"\x00\x0b" + b"\x09" * 32, b"\x0a" * 32),
                         StructureTag.ATTEST_NV_DIGEST),
}
SIGNATURES: dict[str, bytes] = {
    "ecdsa": QUOTE_SIG,
    "rsassa": _rsa_sig(),
    "rsapss": _rsa_sig(alg=Alg.RSAPSS),
}
PUBLICS: dict[str, bytes] = {
    "ak_ecc": AK_ECC_PUB,
    "ek_ecc": EK_ECC_PUB,
    "rsa_ek_like": _rsa_public().marshal_tpm2b(),
    "ecc_ecdaa_kdf": _ecc_public(parameters=EccParms(SymDef(), Scheme(Alg.ECDAA, Alg.SHA256, 5),
                                                     ECCCurve.NIST_P256, Scheme(0x0020, Alg.SHA256))
                                 ).marshal_tpm2b(),
}
SAMPLES: list[tuple[str, bytes, Callable[[bytes], object]]] = (
    [(f"attest-{k}", v.marshal(), parse_attest) for k, v in ATTESTS.items()]
    + [("attest-real-quote", QUOTE_MSG, parse_attest)]
    + [(f"sig-{k}", v, parse_signature) for k, v in SIGNATURES.items()]
    + [(f"public-{k}", v, parse_tpm2b_public) for k, v in PUBLICS.items()]
)


# =================================================================================================
# Reader / Writer
# =================================================================================================
def test_reader_reads_big_endian_and_reports_field_and_offset() -> None:
    r = Reader(bytes.fromhex("01 0203 04050607 08090a0b0c0d0e0f 0002abcd"), "T")
    assert (r.u8("a"), r.u16("b"), r.u32("c"), r.u64("d")) == (1, 0x0203, 0x04050607, 0x08090A0B0C0D0E0F)
    assert r.tpm2b("e", 2) == b"\xab\xcd"
    r.expect_end()
    with pytest.raises(StructureError, match=r"^T\.f at offset 19: truncated: needs 4 bytes, 0 left$"):
        r.u32("f")


@pytest.mark.parametrize(("data", "message"), [
    (b"\x00", r"T\.x\.size at offset 0: truncated: needs 2 bytes, 1 left"),
    (b"\x00\x05abc", r"T\.x at offset 2: truncated: needs 5 bytes, 3 left"),
    (b"\x00\x09" + bytes(9), r"T\.x\.size at offset 0: size 9 exceeds the maximum 8"),
])
def test_reader_tpm2b_errors(data: bytes, message: str) -> None:
    with pytest.raises(StructureError, match=message):
        Reader(data, "T").tpm2b("x", 8)


def test_reader_sized_bounds_nested_structure() -> None:
    r = Reader(b"\x00\x03\x00\x01\x02\xff", "Outer")
    inner = r.sized("body", 10)
    assert inner.u16("a") == 1
    with pytest.raises(StructureError, match=r"Outer\.body\.end at offset 4: 1 unexpected trailing bytes"):
        inner.expect_end()
    with pytest.raises(StructureError, match=r"Outer\.body\.b at offset 4: truncated: needs 2 bytes, 1 left"):
        inner.u16("b")
    assert r.u8("tail") == 0xFF


def test_writer_marshals_and_range_checks() -> None:
    w = Writer("W").u8(1).u16(0x0203).u32(0x04050607).u64(1).tpm2b(b"xy").raw(b"z")
    assert w.to_bytes() == bytes.fromhex("01 0203 04050607 0000000000000001 0002 7879 7a")
    assert len(w) == 20
    with pytest.raises(StructureError, match=r"W\.f: value 65536 does not fit in UINT16"):
        Writer("W").u16(0x10000, "f")
    with pytest.raises(StructureError, match=r"W\.g: value -1 does not fit in UINT8"):
        Writer("W").u8(-1, "g")
    with pytest.raises(StructureError, match="exceed the maximum 2"):
        Writer("W").tpm2b(b"abc", max_size=2)


# =================================================================================================
# TPMS_ATTEST
# =================================================================================================
def test_real_quote_fields() -> None:
    a = parse_attest(QUOTE_MSG)
    assert a.magic == TPM_GENERATED_VALUE
    assert a.type == StructureTag.ATTEST_QUOTE
    assert a.qualified_signer.hex() == "000b51182e05c2d8375972f2ec066d401c59ecda66d6695d695a1b6b603b7cf2bbba"
    assert a.extra_data == bytes.fromhex("abcd1234")
    assert a.clock_info == ClockInfo(clock=0x36C, reset_count=2, restart_count=0, safe=True)
    assert a.firmware_version == 0x2019102300163636
    assert isinstance(a.attested, AttestedQuote)
    assert a.attested.pcr_select == (PcrSelection(Alg.SHA256, (0, 1, 7), 3), PcrSelection(Alg.SHA1, (0,), 3))
    assert [s.bank for s in a.attested.pcr_select] == ["sha256", "sha1"]
    assert a.attested.pcr_digest.hex() == "927865dc2baaaa2f37ce501f8a70f8c6e0188d67dbb03904a3e15ae508422c45"
    assert a.raw == QUOTE_MSG
    assert a.marshal() == QUOTE_MSG


@pytest.mark.parametrize("name", sorted(ATTESTS))
def test_attest_round_trip_every_arm(name: str) -> None:
    value = ATTESTS[name]
    data = value.marshal()
    parsed = parse_attest(data)
    assert parsed == value
    assert parsed.raw == data
    assert parsed.marshal() == data


def test_certify_layout_is_name_then_qualified_name() -> None:
    data = ATTESTS["certify"].marshal()
    # Part 2, 10.12.3: TPMS_CERTIFY_INFO = TPM2B_NAME name, TPM2B_NAME qualifiedName, at the very end.
    tail = b"\x00\x22\x00\x0b" + b"\x01" * 32 + b"\x00\x22\x00\x0b" + b"\x02" * 32
    assert data.endswith(tail)
    parsed = parse_attest(data).attested
    assert isinstance(parsed, AttestedCertify)
    assert parsed.name == b"\x00\x0b" + b"\x01" * 32


def _patch(data: bytes, offset: int, new: bytes) -> bytes:
    return data[:offset] + new + data[offset + len(new):]


# Offsets into QUOTE_MSG: magic 0, type 4, qualifiedSigner 6 (2+34), extraData 42 (2+4), clockInfo 48
# (safe at 64), firmwareVersion 65, TPML_PCR_SELECTION 73 (count, then hash 77, sizeofSelect 79,
# pcrSelect 80, second selection 83), pcrDigest 89, end 123.
@pytest.mark.parametrize(("mutate", "message"), [
    (lambda d: _patch(d, 4, b"\x80\x99"), r"TPMS_ATTEST\.type at offset 4: not a TPMI_ST_ATTEST value"),
    (lambda d: _patch(d, 6, b"\x00\x43"), r"qualifiedSigner\.size at offset 6: size 67 exceeds the max"),
    (lambda d: _patch(d, 42, b"\xff\xff"), r"extraData\.size at offset 42: size 65535 exceeds"),
    (lambda d: _patch(d, 64, b"\x02"), r"clockInfo\.safe at offset 64: TPMI_YES_NO must be 0 or 1, got 2"),
    (lambda d: _patch(d, 73, b"\x00\x00\x00\x11"), r"pcrSelections\.count at offset 73: 17 selections"),
    (lambda d: _patch(d, 77, b"\x00\x99"), r"pcrSelections\[0\]\.hash at offset 77: not a supported hash"),
    (lambda d: _patch(d, 79, b"\x21"), r"pcrSelections\[0\]\.sizeofSelect at offset 79: 33 exceeds"),
    (lambda d: _patch(d, 79, b"\x20"), r"pcrSelections\[1\]\.hash at offset 112: not a supported hash"),
    (lambda d: _patch(d, 73, b"\x00\x00\x00\x03"), r"pcrSelections\[2\]\.hash at offset 89: not a"),
    (lambda d: _patch(d, 89, b"\x00\x41"), r"pcrDigest\.size at offset 89: size 65 exceeds the maximum 64"),
    (lambda d: _patch(d, 89, b"\x00\x21"), r"pcrDigest at offset 91: truncated: needs 33 bytes, 32 left"),
    (lambda d: d + b"\x00", r"TPMS_ATTEST\.end at offset 123: 1 unexpected trailing bytes"),
    (lambda d: d[:3], r"TPMS_ATTEST\.magic at offset 0: truncated: needs 6 bytes, 3 left"),
    (lambda d: b"", r"truncated"),
    (lambda d: d + bytes(4096), r"exceed the maximum 4096"),
])
def test_garbled_attest(mutate: Callable[[bytes], bytes], message: str) -> None:
    with pytest.raises(StructureError, match=message):
        parse_attest(mutate(QUOTE_MSG))


def test_attest_marshal_refuses_mismatched_union() -> None:
    bad = _attest(AttestedCertify(b"", b""), StructureTag.ATTEST_QUOTE)
    with pytest.raises(StructureError, match="does not match type"):
        bad.marshal()


# =================================================================================================
# TPMT_SIGNATURE
# =================================================================================================
def test_real_ecdsa_signature_fields() -> None:
    s = parse_signature(QUOTE_SIG)
    assert isinstance(s, EccSignature)
    assert (s.sig_alg, s.hash_alg) == (Alg.ECDSA, Alg.SHA256)
    assert s.r.hex() == "bfd3fe945a3de5f6538a8e6f310768bbe42691a4a87667a3563a6f3db9f1518d"
    assert s.s.hex() == "79530b8b948e46677e5fc51c2bf1f2dfcea5db5e9a4cb6035dadca38e63132dc"
    assert s.raw == QUOTE_SIG and s.marshal() == QUOTE_SIG


@pytest.mark.parametrize("alg", [Alg.RSASSA, Alg.RSAPSS])
def test_rsa_signature_fields(alg: int) -> None:
    data = _rsa_sig(256, alg)
    s = parse_signature(data)
    assert isinstance(s, RsaSignature)
    assert (s.sig_alg, s.hash_alg, s.sig) == (alg, Alg.SHA256, bytes(range(256)))
    assert s.marshal() == data


@pytest.mark.parametrize(("data", "message"), [
    # HMAC, ECDAA, SM2, ECSCHNORR and NULL signatures are refused by name.
    (bytes.fromhex("0005000b") + bytes(32), r"sigAlg at offset 0: unsupported signature scheme HMAC"),
    (bytes.fromhex("001a000b00020001") + bytes(4), r"unsupported signature scheme ECDAA"),
    (bytes.fromhex("001b000b"), r"unsupported signature scheme SM2"),
    (bytes.fromhex("001c000b"), r"unsupported signature scheme ECSCHNORR"),
    (bytes.fromhex("0010"), r"truncated"),
    (bytes.fromhex("00100010"), r"unsupported signature scheme NULL"),
    (bytes.fromhex("00180099000100000100"), r"signature\.hash at offset 2: not a supported hash algorithm"),
    (bytes.fromhex("0018000b0051") + bytes(81), r"signatureR\.size at offset 4: size 81 exceeds the max"),
    (bytes.fromhex("0014000b0201") + bytes(513), r"signature\.sig\.size at offset 4: size 513 exceeds"),
    (QUOTE_SIG + b"\x00", r"TPMT_SIGNATURE\.end at offset 72: 1 unexpected trailing bytes"),
    (QUOTE_SIG[:-1], r"signatureS at offset 40: truncated: needs 32 bytes, 31 left"),
])
def test_garbled_signature(data: bytes, message: str) -> None:
    with pytest.raises(StructureError, match=message):
        parse_signature(data)


# =================================================================================================
# TPM2B_PUBLIC
# =================================================================================================
def test_real_ek_public_fields_and_name() -> None:
    p = parse_tpm2b_public(EK_ECC_PUB)
    assert (p.type, p.name_alg, p.object_attributes) == (Alg.ECC, Alg.SHA256, 0x000300B2)
    assert p.auth_policy == EK_POLICY
    assert p.parameters == EccParms(SymDef(Alg.AES, 128, Alg.CFB), Scheme(), ECCCurve.NIST_P256, Scheme())
    assert isinstance(p.unique, EccPoint) and len(p.unique.x) == len(p.unique.y) == 32
    assert p.raw == EK_ECC_PUB[2:]
    assert p.name() == EK_ECC_NAME
    assert p.marshal() == p.raw and p.marshal_tpm2b() == EK_ECC_PUB


def test_real_ak_public_fields() -> None:
    p = parse_tpm2b_public(AK_ECC_PUB)
    want = (ObjectAttr.FIXED_TPM | ObjectAttr.FIXED_PARENT | ObjectAttr.SENSITIVE_DATA_ORIGIN
            | ObjectAttr.USER_WITH_AUTH | ObjectAttr.RESTRICTED | ObjectAttr.SIGN_ENCRYPT)
    assert p.object_attributes == want
    assert p.parameters == EccParms(SymDef(), Scheme(Alg.ECDSA, Alg.SHA256), ECCCurve.NIST_P256, Scheme())
    key = p.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)
    assert isinstance(p.unique, EccPoint)
    assert key.public_numbers().x == int.from_bytes(p.unique.x, "big")


@pytest.mark.parametrize("name", sorted(PUBLICS))
def test_public_round_trip(name: str) -> None:
    data = PUBLICS[name]
    p = parse_tpm2b_public(data)
    assert p.marshal_tpm2b() == data
    assert parse_tpmt_public(data[2:]) == p


def test_public_key_conversion_matches_software_keys() -> None:
    priv = ec.generate_private_key(ec.SECP384R1())
    n = priv.public_key().public_numbers()
    x, y = n.x.to_bytes(48, "big"), n.y.to_bytes(48, "big")
    params = EccParms(SymDef(), Scheme(Alg.ECDSA, Alg.SHA384), ECCCurve.NIST_P384, Scheme())
    p = _ecc_public(parameters=params, unique=EccPoint(x.lstrip(b"\x00"), y))  # a short coordinate is valid
    assert p.public_key().public_numbers() == n
    rsa_priv = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    modulus = rsa_priv.public_key().public_numbers().n.to_bytes(256, "big")
    rp = parse_tpm2b_public(_rsa_public(modulus).marshal_tpm2b())
    assert rp.public_key().public_numbers() == rsa_priv.public_key().public_numbers()  # exponent 0 = 65537


@pytest.mark.parametrize(("public", "message"), [
    (_ecc_public(unique=EccPoint(b"\x01" * 32, b"\x02" * 32)), "not a point on the curve"),
    (_ecc_public(parameters=EccParms(SymDef(), Scheme(), ECCCurve.BN_P256, Scheme())), "unsupported curve"),
    (_ecc_public(unique=EccPoint(b"\x01" * 33, b"\x02" * 32)), "coordinate longer than 32 bytes"),
    (_rsa_public(b"\xc1" * 255, parameters=RsaParms(SymDef(), Scheme(), 2048, 0)),
     "255-byte modulus for a 2048-bit key"),
    (_rsa_public(b"\xc1" * 256, parameters=RsaParms(SymDef(), Scheme(), 2048, 4)), "invalid RSA public key"),
])
def test_public_key_conversion_refuses_bad_keys(public: PublicArea, message: str) -> None:
    parsed = parse_tpm2b_public(public.marshal_tpm2b())
    with pytest.raises(StructureError, match=message):
        parsed.public_key()


def test_name_requires_a_name_algorithm() -> None:
    p = parse_tpm2b_public(_ecc_public(name_alg=Alg.NULL).marshal_tpm2b())
    with pytest.raises(StructureError, match="nameAlg: NULL has no Name digest"):
        p.name()


def test_name_is_computed_over_bytes_as_received() -> None:
    p = parse_tpm2b_public(AK_ECC_PUB)
    import hashlib

    assert p.name() == b"\x00\x0b" + hashlib.sha256(AK_ECC_PUB[2:]).digest()


# Offsets into AK_ECC_PUB: size 0, type 2, nameAlg 4, attributes 6, authPolicy 10, symmetric 12,
# scheme 14 (hash 16), curveID 18, kdf 20, x 22 (2+32), y 56 (2+32), end 90.
@pytest.mark.parametrize(("mutate", "message"), [
    (lambda d: _patch(d, 2, b"\x00\x08"), r"TPM2B_PUBLIC\.publicArea\.type at offset 2: unsupported key type "
                                          r"KEYEDHASH"),
    (lambda d: _patch(d, 2, b"\x00\x25"), r"unsupported key type SYMCIPHER"),
    (lambda d: _patch(d, 4, b"\x00\x77"), r"nameAlg at offset 4: not a supported hash algorithm: 0x0077"),
    (lambda d: _patch(d, 12, b"\x00\x0a"), r"symmetric\.algorithm at offset 12: not a symmetric object"),
    (lambda d: _patch(d, 14, b"\x00\x14"), r"parameters\.scheme\.scheme at offset 14: scheme RSASSA is not"),
    (lambda d: _patch(d, 16, b"\x00\x10"), r"scheme\.details\.hashAlg at offset 16: not a supported hash"),
    (lambda d: _patch(d, 20, b"\x00\x18"), r"kdf\.scheme at offset 20: scheme ECDSA is not allowed here"),
    (lambda d: _patch(d, 0, b"\x00\x59"), r"TPM2B_PUBLIC\.publicArea at offset 2: truncated"),
    (lambda d: _patch(d, 0, b"\x00\x57"), r"unique\.ecc\.y at offset 58: truncated: needs 32 bytes, 31 left"),
    (lambda d: _patch(d, 0, b"\x04\x01"), r"size 1025 exceeds the maximum 1024"),
    (lambda d: d + b"\x00", r"TPM2B_PUBLIC\.end at offset 90: 1 unexpected trailing bytes"),
    (lambda d: b"\x00\x00", r"empty public area"),
    (lambda d: d[:1], r"truncated"),
])
def test_garbled_public(mutate: Callable[[bytes], bytes], message: str) -> None:
    with pytest.raises(StructureError, match=message):
        parse_tpm2b_public(mutate(AK_ECC_PUB))


def test_rsa_scheme_table() -> None:
    # RSAES has no details, OAEP/RSASSA/RSAPSS a hash; an ECC scheme is refused for an RSA key.
    for scheme in (Scheme(Alg.RSAES), Scheme(Alg.OAEP, Alg.SHA256), Scheme(Alg.RSAPSS, Alg.SHA384)):
        p = _rsa_public(parameters=RsaParms(SymDef(), scheme, 2048, 65537))
        assert parse_tpm2b_public(p.marshal_tpm2b()).parameters.scheme == scheme
    bad = _rsa_public(parameters=RsaParms(SymDef(), Scheme(Alg.ECDSA, Alg.SHA256), 2048, 0)).marshal_tpm2b()
    with pytest.raises(StructureError, match="scheme ECDSA is not allowed here"):
        parse_tpm2b_public(bad)


# =================================================================================================
# PCR selections
# =================================================================================================
@pytest.mark.parametrize(("selection", "hex_bytes"), [
    ({"sha256": [0, 1, 7]}, "00000001 000b 03 830000"),
    ({"sha256": [23], "sha1": [0, 8, 16]}, "00000002 000b 03 000080 0004 03 010101"),
    ({"sha384": [24]}, "00000001 000c 04 00000001"),  # sizeofSelect grows to fit PCR 24
    ({"sha256": []}, "00000001 000b 03 000000"),
    ({}, "00000000"),
])
def test_marshal_pcr_selection(selection: dict[str, list[int]], hex_bytes: str) -> None:
    data = marshal_pcr_selection(selection)
    assert data == bytes.fromhex(hex_bytes)
    parsed = parse_pcr_selection(data)
    assert {s.bank: list(s.pcrs) for s in parsed} == {b: sorted(p) for b, p in selection.items()}
    assert marshal_pcr_selection(parsed) == data


def test_pcr_selection_errors() -> None:
    with pytest.raises(StructureError, match="unknown PCR bank 'md5'"):
        marshal_pcr_selection({"md5": [0]})
    with pytest.raises(StructureError, match="negative PCR index"):
        pcr_selection_from_mapping({"sha256": [-1]})
    with pytest.raises(StructureError, match="PCR 24 does not fit in sizeofSelect 3"):
        marshal_pcr_selection({"sha256": [24]}, size_of_select=3)
    with pytest.raises(StructureError, match=r"TPML_PCR_SELECTION\.end at offset 10: 1 unexpected"):
        parse_pcr_selection(bytes.fromhex("00000001000b03830000ff"))


# =================================================================================================
# truncation and fuzzing: only StructureError may escape
# =================================================================================================
@pytest.mark.parametrize(("name", "data", "parse"), SAMPLES, ids=[s[0] for s in SAMPLES])
def test_every_truncation_raises_structure_error(name: str, data: bytes,
                                                 parse: Callable[[bytes], object]) -> None:
    parse(data)  # the sample itself is valid
    for cut in range(len(data)):
        with pytest.raises(StructureError):
            parse(data[:cut])
    with pytest.raises(StructureError):
        parse(data + b"\x00")


def _outcome(parse: Callable[[bytes], object], data: bytes) -> None:
    try:
        parse(data)
    except StructureError as exc:
        assert exc.diagnostics()  # one readable line
        assert "\n" not in exc.diagnostics()
        assert "invalid TPM2B" not in str(exc)  # the inline fast paths always report the precise error


@settings(max_examples=3000, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(SAMPLES), st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), max_size=4),
       st.integers(-8, 8), st.binary(max_size=8))
def test_fuzz_mutated_structures(sample: tuple[str, bytes, Callable[[bytes], object]],
                                 flips: list[tuple[int, int]], cut: int, tail: bytes) -> None:
    data = sample[1]
    buf = bytearray(data)
    for pos, value in flips:
        buf[pos % len(buf)] = value
    if cut < 0:
        del buf[cut:]
    else:
        buf += tail[:cut]
    for parser in (parse_attest, parse_signature, parse_tpm2b_public, parse_pcr_selection):
        _outcome(parser, bytes(buf))


@settings(max_examples=1000, derandomize=True, database=None, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(data: bytes) -> None:
    for parser in (parse_attest, parse_signature, parse_tpm2b_public, parse_tpmt_public, parse_pcr_selection):
        _outcome(parser, data)


_u8 = st.integers(0, 0xFF)
_u16 = st.integers(0, 0xFFFF)
_u32 = st.integers(0, 0xFFFFFFFF)
_u64 = st.integers(0, 2**64 - 1)
_hashes = st.sampled_from([Alg.SHA1, Alg.SHA256, Alg.SHA384, Alg.SHA512])
_names = st.binary(max_size=66)
_digests = st.binary(max_size=64)
_clocks = st.builds(ClockInfo, _u64, _u32, _u32, st.booleans())
_selections = st.lists(
    st.builds(lambda alg, pcrs: PcrSelection(alg, tuple(sorted(pcrs)), 3), _hashes,
              st.sets(st.integers(0, 23))), max_size=4).map(tuple)
_attested = st.one_of(
    st.tuples(st.just(StructureTag.ATTEST_QUOTE), st.builds(AttestedQuote, _selections, _digests)),
    st.tuples(st.just(StructureTag.ATTEST_CERTIFY), st.builds(AttestedCertify, _names, _names)),
    st.tuples(st.just(StructureTag.ATTEST_CREATION), st.builds(AttestedCreation, _names, _digests)),
    st.tuples(st.just(StructureTag.ATTEST_COMMAND_AUDIT),
              st.builds(AttestedCommandAudit, _u64, _hashes, _digests, _digests)),
    st.tuples(st.just(StructureTag.ATTEST_SESSION_AUDIT),
              st.builds(AttestedSessionAudit, st.booleans(), _digests)),
    st.tuples(st.just(StructureTag.ATTEST_TIME), st.builds(AttestedTime, _u64, _clocks, _u64)),
    st.tuples(st.just(StructureTag.ATTEST_NV), st.builds(AttestedNV, _names, _u16, st.binary(max_size=64))),
    st.tuples(st.just(StructureTag.ATTEST_NV_DIGEST), st.builds(AttestedNVDigest, _names, _digests)),
)


@settings(max_examples=1000, derandomize=True, database=None, deadline=None)
@given(_u32, _attested, _names, st.binary(max_size=66), _clocks, _u64)
def test_generated_attest_round_trips(magic: int, attested: tuple[int, object], signer: bytes, extra: bytes,
                                      clock: ClockInfo, firmware: int) -> None:
    st_type, arm = attested
    value = Attest(magic, st_type, signer, extra, clock, firmware, arm)  # type: ignore[arg-type]
    data = value.marshal()
    parsed = parse_attest(data)
    assert parsed == value and parsed.raw == data


# =================================================================================================
# Names against tpm2-tools on a real swtpm
# =================================================================================================
def _tool(tpm: Swtpm, cwd: Path, *args: str) -> str:
    env = tools_env(tpm)
    res = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=False)
    # No resource manager with swtpm: flush transient objects and sessions after every command.
    for flag in ("-t", "-s"):
        subprocess.run(["tpm2_flushcontext", flag], cwd=cwd, env=env, capture_output=True, timeout=60,
                       check=False)
    assert res.returncode == 0, f"{' '.join(args)}: {res.stderr}"
    return res.stdout


def _yaml_name(output: str) -> bytes:
    match = re.search(r"^name: ([0-9a-f]+)$", output, re.MULTILINE)
    assert match, output
    return bytes.fromhex(match.group(1))


@pytest.mark.swtpm
def test_names_match_tpm2_readpublic(swtpm: Swtpm, tmp_path: Path) -> None:
    _tool(swtpm, tmp_path, "tpm2_createek", "-c", "ek.ctx", "-G", "rsa", "-u", "ek.pub")
    _tool(swtpm, tmp_path, "tpm2_createak", "-C", "ek.ctx", "-G", "ecc", "-g", "sha256", "-s", "ecdsa",
          "-u", "ak.pub", "-n", "ak.name", "-c", "ak.ctx")
    _tool(swtpm, tmp_path, "tpm2_createak", "-C", "ek.ctx", "-G", "rsa", "-g", "sha256", "-s", "rsapss",
          "-u", "akr.pub", "-n", "akr.name", "-c", "akr.ctx")
    for ctx, pub, name_file in (("ek.ctx", "ek.pub", None), ("ak.ctx", "ak.pub", "ak.name"),
                                ("akr.ctx", "akr.pub", "akr.name")):
        out = _tool(swtpm, tmp_path, "tpm2_readpublic", "-c", ctx, "-o", f"{ctx}.readpub")
        expected = _yaml_name(out)
        for data in ((tmp_path / pub).read_bytes(), (tmp_path / f"{ctx}.readpub").read_bytes()):
            public = parse_tpm2b_public(data)
            assert public.name() == expected
            assert public.marshal_tpm2b() == data
            public.public_key()
        if name_file:
            assert (tmp_path / name_file).read_bytes() == expected
    ek = parse_tpm2b_public((tmp_path / "ek.pub").read_bytes())
    assert ek.type == Alg.RSA and ek.auth_policy == EK_POLICY
    assert ek.parameters == RsaParms(SymDef(Alg.AES, 128, Alg.CFB), Scheme(), 2048, 0)


# =================================================================================================
# cross-check with an independent implementation (tpm2-tss marshalling, via tpm2-pytss)
# =================================================================================================
# TPM_ST_ATTEST_NV_DIGEST is newer than tpm2-tss 3.2's unmarshaller: no independent reference for it.
TSS_SAMPLES = [s for s in SAMPLES if s[0] != "attest-nv_digest"]


@pytest.mark.parametrize(("name", "data", "parse"), TSS_SAMPLES, ids=[s[0] for s in TSS_SAMPLES])
def test_tpm2_tss_reads_what_we_marshal(name: str, data: bytes, parse: Callable[[bytes], object]) -> None:
    from tpm2_pytss import types
    cls = {parse_attest: types.TPMS_ATTEST, parse_signature: types.TPMT_SIGNATURE,
           parse_tpm2b_public: types.TPM2B_PUBLIC}[parse]  # type: ignore[index]
    obj, consumed = cls.unmarshal(data)
    assert consumed == len(data)
    assert bytes(obj.marshal()) == data
    if parse is parse_attest:
        ours = parse_attest(data)
        assert (int(obj.magic), int(obj.type)) == (ours.magic, ours.type)
        assert bytes(obj.extraData) == ours.extra_data
        assert int(obj.clockInfo.resetCount) == ours.clock_info.reset_count
