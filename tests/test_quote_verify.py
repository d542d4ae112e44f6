"""Quote verification: the API on fixed swtpm vectors and software-made quotes, then `fleet-server quote
verify` end to end on real swtpm instances driven by tpm2-tools."""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from conftest import tools_env
from cryptography.hazmat.primitives.asymmetric import ec

from firmware_sim.bench.quote_bench import AK_ATTRIBUTES, build_quote, sign_ecdsa, software_ak
from firmware_sim.swtpm import Swtpm
from fleet_server.commands.quote_cmd import UsageError, load_pcr_file
from fleet_server.verifier.quote import (
    AttestationKey,
    QuoteInfo,
    check_ak_attributes,
    check_replay,
    verify_quote,
)
from protocol.errors import (
    EventLogMismatchError,
    QuoteError,
    SignatureError,
    StructureError,
    VerificationError,
)
from protocol.tpm.constants import Alg, ECCCurve, ObjectAttr, StructureTag
from protocol.tpm.structures import (
    Attest,
    AttestedCertify,
    AttestedQuote,
    ClockInfo,
    EccParms,
    PcrSelection,
    PublicArea,
    Scheme,
    SymDef,
    parse_attest,
    parse_tpm2b_public,
)

# =================================================================================================
# Fixed vectors: real swtpm output (tpm2-tools 5.4), quote of sha256:0,1,7 (+ sha1:0 for the ECC one)
# after `tpm2_pcrextend 7:sha256=11..11`, nonce abcd1234.
# =================================================================================================
NONCE = bytes.fromhex("abcd1234")
PCRS_SHA256 = {0: bytes(32), 1: bytes(32),
               7: bytes.fromhex("8878b15a7d6a3a4f464e8f9f42591dbc0cf4bedea0ec309003d2b2ee53655ef8")}
PCRS_SHA1 = {0: bytes(20)}
VECTORS: dict[str, dict[str, bytes]] = {
    "ecdsa": {
        "ak": bytes.fromhex(
            "00580023000b00050072000000100018000b00030010002017e4f5a0b4a21dbd052980cda4c29ea9bd902587e31a"
            "8d7acd7d93e5b7550e0800206b8c41af23a1406f454003a437c607b4d2fac26817f4c4c838aee42650229418"),
        "msg": bytes.fromhex(
            "ff54434780180022000b51182e05c2d8375972f2ec066d401c59ecda66d6695d695a1b6b603b7cf2bbba0004abcd"
            "1234000000000000036c000000020000000001201910230016363600000002000b03830000000403010000002092"
            "7865dc2baaaa2f37ce501f8a70f8c6e0188d67dbb03904a3e15ae508422c45"),
        "sig": bytes.fromhex(
            "0018000b0020bfd3fe945a3de5f6538a8e6f310768bbe42691a4a87667a3563a6f3db9f1518d002079530b8b948e"
            "46677e5fc51c2bf1f2dfcea5db5e9a4cb6035dadca38e63132dc"),
    },
    "rsassa": {
        "ak": bytes.fromhex(
            "01180001000b00050072000000100014000b0800000000000100a8f7e3aa5301f7993c35203dbadd467be9ee1f81"
            "db362a71e23c93c2c1a65bf01096c274f79f32f099d9f1ae95998ffdabd7570a0c4a42ea68f480a643efda225a2b"
            "b64e5c5464eb23adf0489645e6b8521b3b78144acf166c5f6be496d7d61fd293b85eccff4870a6bd871ed305f8bf"
            "56f10197c1ac4b8cbf4892fe499aedcc4970522a54a9c3c0d067d9615253f69a824ff01dfcd6ef4e7527197bd38d"
            "882cbe1a98b76e405b99c27e004a0bc3dc15d45eb18aa5e7caa0b0804ffe01d96186e5e86ea6419263e667e031c6"
            "8a8a173b1e5bc0fb5062315af12ffc3d04fafc110c8260969d05fc7647cc5e4109f21a2d44ce262d647e445a8550"
            "1083dc7c3b55"),
        "msg": bytes.fromhex(
            "ff54434780180022000b7ddb52ee87c52e16f20ee2a5151a1aba747eb1ff8bf28b44b0da10c416a457470004abcd"
            "12340000000000000396000000020000000001201910230016363600000001000b038300000020da84a32b9caf4d"
            "5626e80cc0a696991fc96112611a7101c37dbe7755a582a1fe"),
        "sig": bytes.fromhex(
            "0014000b010015590ea5c6e385cc4a6e8458e90e26203ca89fb1f5ca460155182465d368d6517b15831e572e43f9"
            "97f131092271e9cc0eeac5c31d2f134b554814edfd9533a5e8ee1700b183d1455574c892f061fcafd1a15252413e"
            "dd96e67d8d9588b978c68e3afd7b9021bd4dc041b2abcf42dfd9bc893d0bce7afa8013e9d42bbced958dd494b60b"
            "addfd64a607294d0ad35a9c93a6d340bc4dd982d6e75ec22360d6b8c046bde249717a8fc50fdc33529b24b5be0b8"
            "25073dfd7258b959971b842901d714c7125e20204a7e16e1ef5195414be73f4aeb9c54c117098e87a8090076fbcc"
            "f725fc2603eb1dc684b1917c465bee127f5a7ba3fb6f88d81f64b5eaa55dc062"),
    },
    "rsapss": {
        "ak": bytes.fromhex(
            "01180001000b00050072000000100016000b0800000000000100910daa4d2b39bed9a25b681250154eb2e42c9958"
            "2781d9d51b5e930dec3ddbd10a5978b2c2550fe472b0ea642c61969e1e49fb02056014b1f5c26255a24e80681126"
            "c3d8bf5459b6e5ccd77474bf28680dc6c412b81f1d2dda80aeb95f2c699e6227263cf7458e8543327f8515626087"
            "5e03cda99f968a955e6cb0569eaf943dd7aaae9aea18050a5302d960cdfa37f38ddba2ff58a0f2deb037329ef945"
            "51c4424d343b4a525e00d07ca4ed4a322743269aaeb8073d6132c684abc98b2191365ed252c0c9c62cc101999bfb"
            "84295ecf23d5c10eaee368dd715f206b1e8174f740c0e9401548b4fdb0db2bae148ce0d36773a908f09f0e400455"
            "8456fb55db1d"),
        "msg": bytes.fromhex(
            "ff54434780180022000b0d66bd12adb2eafb17b96394e2c6978202a656854147fe9bf3e37dddd820bb190004abcd"
            "123400000000000003c8000000020000000001201910230016363600000001000b038300000020da84a32b9caf4d"
            "5626e80cc0a696991fc96112611a7101c37dbe7755a582a1fe"),
        "sig": bytes.fromhex(
            "0016000b010050a42df5ecfbe61c44e1da42b24e4a5d975dd3dbd62a8bf306492345f7684341c07d062337f9ab0f"
            "8b4b0cd3469e4b369dc30652201ee4579a8e419cc1aab842b73c05f8879dbe32145b5a17ae87ac61162beb579d47"
            "8b525b58da2a7dd6e6f21ae3102db95f8393cd13f4ef7882665fc86879e2c98c08ff82c3e636cea8f99dfb13cca3"
            "90c3c355a0e1d9b6b62571f6d42850294dcbbafba759d859cd9b6dc754f69fe074ecb4f59dcb8e8a847d797a9efd"
            "5cc9fe25e7af75f0200842b384a81f39f7ea5701d146a2aaed949c04ad63520b59cf8b0358fdba0dfc8eb075e53b"
            "97a872732d1bd4a8812ede65b46baf245fcc3c7bf34ea38cf86d8a07a6fd5bbc"),
    },
}


def _vector_pcrs(name: str) -> dict[str, dict[int, bytes]]:
    if name == "ecdsa":
        return {"sha256": dict(PCRS_SHA256), "sha1": dict(PCRS_SHA1)}
    return {"sha256": dict(PCRS_SHA256)}


def _verify_vector(name: str, **overrides: Any) -> QuoteInfo:
    v = VECTORS[name]
    kwargs: dict[str, Any] = {
        "ak": AttestationKey.from_tpm2b_public(v["ak"]), "attest": v["msg"], "signature": v["sig"],
        "nonce": NONCE, "pcr_values": _vector_pcrs(name), "allow_sha1": name == "ecdsa",
    }
    kwargs.update(overrides)
    return verify_quote(**kwargs)


def _flip(data: bytes, offset: int, mask: int = 0x01) -> bytes:
    return data[:offset] + bytes([data[offset] ^ mask]) + data[offset + 1:]


# =================================================================================================
# verify_quote on the fixed vectors
# =================================================================================================
@pytest.mark.parametrize("name", sorted(VECTORS))
def test_vector_verifies(name: str) -> None:
    info = _verify_vector(name)
    attest = parse_attest(VECTORS[name]["msg"])
    assert info.sig_alg == name and info.hash_alg == "sha256"
    assert (info.clock, info.reset_count, info.restart_count, info.safe) == (
        attest.clock_info.clock, 2, 0, True)
    assert info.clock_info == attest.clock_info
    assert info.firmware_version == 0x2019102300163636
    assert info.qualified_signer == attest.qualified_signer
    want = [("sha256", (0, 1, 7))] + ([("sha1", (0,))] if name == "ecdsa" else [])
    assert list(info.selection) == want
    assert info.selection_dict() == {bank: list(pcrs) for bank, pcrs in want}
    expected_digest = hashlib.sha256(b"".join(PCRS_SHA256[i] for i in (0, 1, 7))
                                     + (bytes(20) if name == "ecdsa" else b"")).digest()
    assert info.pcr_digest == expected_digest


def test_ak_name_matches_tpm2_tools() -> None:
    ak = AttestationKey.from_tpm2b_public(VECTORS["ecdsa"]["ak"])
    assert ak.name == b"\x00\x0b" + hashlib.sha256(VECTORS["ecdsa"]["ak"][2:]).digest()
    check_ak_attributes(ak.public)


@pytest.mark.parametrize(("name", "overrides", "error", "message"), [
    ("ecdsa", {"nonce": bytes.fromhex("abcd1235")}, QuoteError, "nonce"),
    ("ecdsa", {"nonce": b""}, QuoteError, "nonce"),
    ("rsassa", {"nonce": NONCE + b"\x00"}, QuoteError, "nonce"),
    ("ecdsa", {"allow_sha1": False}, QuoteError, "SHA-1 PCR bank"),
    ("ecdsa", {"pcr_values": {"sha256": PCRS_SHA256}}, QuoteError, r"selection \(sha256:0,1,7; sha1:0\)"),
    ("rsassa", {"pcr_values": {"sha256": {**PCRS_SHA256, 7: bytes(32)}}}, QuoteError, "PCR digest"),
    ("rsapss", {"pcr_values": {"sha256": {**PCRS_SHA256, 2: bytes(32)}}}, QuoteError, "selection"),
    ("rsapss", {"pcr_values": {"sha256": {0: bytes(32), 1: bytes(32)}}}, QuoteError, "selection"),
    ("rsassa", {"expected_selection": {"sha256": [0, 1, 7, 8]}}, QuoteError, "expected selection"),
    ("rsassa", {"expected_selection": {"sha384": [0, 1, 7]}}, QuoteError, "expected selection"),
    # The quote covers PCRs 0,1,7: a value for PCR 8 would be unauthenticated.
    ("rsassa", {"expected_selection": {"sha256": [0, 1, 7]},
                "pcr_values": {"sha256": {**PCRS_SHA256, 8: bytes(32)}}}, QuoteError, "supplied PCR values"),
    ("rsassa", {"pcr_values": {"sha256": {**PCRS_SHA256, 1: bytes(31)}}}, QuoteError, "PCR 1 is 31 bytes"),
    ("rsassa", {"pcr_values": {"sha256": {str(k): v for k, v in PCRS_SHA256.items()}}}, QuoteError,
     "selection"),
    ("ecdsa", {"signature": _flip(VECTORS["ecdsa"]["sig"], 10)}, SignatureError, "does not verify"),
    ("rsassa", {"signature": _flip(VECTORS["rsassa"]["sig"], 100)}, SignatureError, "does not verify"),
    ("rsapss", {"signature": _flip(VECTORS["rsapss"]["sig"], 259, 0x80)}, SignatureError, "does not verify"),
    ("rsassa", {"signature": VECTORS["rsapss"]["sig"]}, SignatureError, "differs from the AK's RSASSA"),
    ("ecdsa", {"signature": VECTORS["ecdsa"]["sig"][:-1]}, StructureError, "truncated"),
    ("ecdsa", {"attest": _flip(VECTORS["ecdsa"]["msg"], 70)}, SignatureError, "does not verify"),
    ("ecdsa", {"attest": VECTORS["ecdsa"]["msg"][:-3]}, StructureError, "truncated"),
    ("ecdsa", {"attest": VECTORS["ecdsa"]["msg"] + b"\x00"}, StructureError, "trailing"),
    ("ecdsa", {"attest": VECTORS["rsassa"]["msg"]}, SignatureError, "does not verify"),
    ("ecdsa", {"ak": AttestationKey.from_tpm2b_public(VECTORS["rsassa"]["ak"])}, SignatureError,
     "ECDSA signature from an RSA attestation key"),
    ("rsassa", {"ak": AttestationKey.from_tpm2b_public(VECTORS["rsapss"]["ak"])}, SignatureError,
     "differs from the AK's RSAPSS"),
    ("rsassa", {"ak": AttestationKey.from_tpm2b_public(VECTORS["ecdsa"]["ak"])}, SignatureError,
     "RSASSA signature from an ECC attestation key"),
])
def test_vector_rejected(name: str, overrides: dict[str, Any], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message) as info:
        _verify_vector(name, **overrides)
    assert isinstance(info.value, VerificationError | StructureError)


# =================================================================================================
# verify_quote on quotes made in software (what a TPM would never produce)
# =================================================================================================
SOFT_PCRS = {"sha256": {i: hashlib.sha256(bytes([i])).digest() for i in (0, 2, 4)}}


def _ak_with_scheme(key: ec.EllipticCurvePrivateKey, scheme: Scheme) -> AttestationKey:
    _, tpm2b = software_ak(key)
    public = parse_tpm2b_public(tpm2b)
    assert isinstance(public.parameters, EccParms)
    params = EccParms(SymDef(), scheme, ECCCurve.NIST_P256, Scheme())
    return AttestationKey(PublicArea(public.type, public.name_alg, public.object_attributes, b"", params,
                                     public.unique))


def test_software_quote_verifies_and_each_check_bites() -> None:
    key, tpm2b = software_ak()
    ak = AttestationKey.from_tpm2b_public(tpm2b)
    nonce = secrets.token_bytes(32)

    def quote(**kwargs: Any) -> tuple[bytes, bytes]:
        attest = build_quote(nonce=nonce, pcr_values=kwargs.pop("pcrs", SOFT_PCRS), **kwargs)
        return attest, sign_ecdsa(key, attest)

    attest, sig = quote()
    info = verify_quote(ak=ak, attest=attest, signature=sig, nonce=nonce, pcr_values=SOFT_PCRS)
    assert info.selection == (("sha256", (0, 2, 4)),) and info.reset_count == 3

    attest, sig = quote(magic=0xFF544348)
    with pytest.raises(QuoteError, match="magic 0xff544348 is not TPM_GENERATED_VALUE"):
        verify_quote(ak=ak, attest=attest, signature=sig, nonce=nonce, pcr_values=SOFT_PCRS)

    # A correctly signed TPMS_ATTEST of another type is not a quote: neither a relabelled quote nor a
    # real TPMS_CERTIFY_INFO.
    relabelled = bytes.fromhex("ff5443478017") + attest[6:]
    with pytest.raises(QuoteError, match="attestation type 0x8017 is not TPM_ST_ATTEST_QUOTE"):
        verify_quote(ak=ak, attest=relabelled, signature=sign_ecdsa(key, relabelled), nonce=nonce,
                     pcr_values=SOFT_PCRS)
    certify = Attest(0xFF544347, StructureTag.ATTEST_CERTIFY, b"", nonce, ClockInfo(1, 2, 3, True), 4,
                     AttestedCertify(b"\x00\x0b" + bytes(32), b"\x00\x0b" + bytes(32))).marshal()
    with pytest.raises(QuoteError, match="attestation type 0x8017 is not TPM_ST_ATTEST_QUOTE"):
        verify_quote(ak=ak, attest=certify, signature=sign_ecdsa(key, certify), nonce=nonce,
                     pcr_values=SOFT_PCRS)

    # SHA-1 signatures need allow_sha1, and then the AK must not fix a different hash.
    loose_ak = _ak_with_scheme(key, Scheme())
    attest, _ = quote(digest_alg=hashlib.sha1)
    sha1_sig = sign_ecdsa(key, attest, Alg.SHA1)
    with pytest.raises(SignatureError, match="SHA-1 signature refused"):
        verify_quote(ak=loose_ak, attest=attest, signature=sha1_sig, nonce=nonce, pcr_values=SOFT_PCRS)
    info = verify_quote(ak=loose_ak, attest=attest, signature=sha1_sig, nonce=nonce, pcr_values=SOFT_PCRS,
                        allow_sha1=True)
    assert info.hash_alg == "sha1"
    with pytest.raises(SignatureError, match="ECDSA/SHA1 differs from the AK's ECDSA/SHA256"):
        verify_quote(ak=ak, attest=attest, signature=sha1_sig, nonce=nonce, pcr_values=SOFT_PCRS,
                     allow_sha1=True)

    # pcrDigest uses the signature's hash: SHA-384 signature -> SHA-384 over the SHA-256 PCR values.
    attest, _ = quote(digest_alg=hashlib.sha384)
    sig384 = sign_ecdsa(key, attest, Alg.SHA384)
    assert verify_quote(ak=loose_ak, attest=attest, signature=sig384, nonce=nonce,
                        pcr_values=SOFT_PCRS).hash_alg == "sha384"
    sha256_digest_attest = quote()[0]  # pcrDigest made with SHA-256 but signed with SHA-384
    with pytest.raises(QuoteError, match="PCR digest"):
        verify_quote(ak=loose_ak, attest=sha256_digest_attest, nonce=nonce, pcr_values=SOFT_PCRS,
                     signature=sign_ecdsa(key, sha256_digest_attest, Alg.SHA384))


def test_duplicate_bank_in_selection_is_refused() -> None:
    key, tpm2b = software_ak()
    ak = AttestationKey.from_tpm2b_public(tpm2b)
    values = SOFT_PCRS["sha256"]
    sel = (PcrSelection(Alg.SHA256, (0, 2)), PcrSelection(Alg.SHA256, (4,)))
    digest = hashlib.sha256(values[0] + values[2] + values[4]).digest()
    attest = Attest(0xFF544347, StructureTag.ATTEST_QUOTE, b"", b"n", ClockInfo(1, 1, 0, True), 0,
                    AttestedQuote(sel, digest)).marshal()
    with pytest.raises(QuoteError, match="selects PCR bank sha256 more than once"):
        verify_quote(ak=ak, attest=attest, signature=sign_ecdsa(key, attest), nonce=b"n",
                     pcr_values=SOFT_PCRS)


def test_values_must_have_the_bank_digest_size() -> None:
    """Values of wrong sizes that concatenate to the quoted bytes must not pass as per-PCR values."""
    key, tpm2b = software_ak()
    ak = AttestationKey.from_tpm2b_public(tpm2b)
    attest = build_quote(nonce=b"n", pcr_values=SOFT_PCRS)
    v = SOFT_PCRS["sha256"]
    shifted = {"sha256": {0: v[0] + v[2][:1], 2: v[2][1:], 4: v[4]}}
    with pytest.raises(QuoteError, match="PCR 0 is 33 bytes, expected 32"):
        verify_quote(ak=ak, attest=attest, signature=sign_ecdsa(key, attest), nonce=b"n", pcr_values=shifted)


def test_check_ak_attributes() -> None:
    _, tpm2b = software_ak()
    check_ak_attributes(parse_tpm2b_public(tpm2b))
    for missing, name in ((ObjectAttr.FIXED_TPM, "fixedTPM"), (ObjectAttr.FIXED_PARENT, "fixedParent"),
                          (ObjectAttr.SENSITIVE_DATA_ORIGIN, "sensitiveDataOrigin"),
                          (ObjectAttr.RESTRICTED, "restricted"), (ObjectAttr.SIGN_ENCRYPT, "sign")):
        _, weak = software_ak(attributes=AK_ATTRIBUTES & ~missing)
        with pytest.raises(VerificationError, match=f"missing {name}$"):
            check_ak_attributes(parse_tpm2b_public(weak))
    _, both = software_ak(attributes=AK_ATTRIBUTES | ObjectAttr.DECRYPT)
    with pytest.raises(VerificationError, match="decrypt is set"):
        check_ak_attributes(parse_tpm2b_public(both))
    # An EK is a restricted decryption key, not an AK.
    ek = parse_tpm2b_public(bytes.fromhex(
        "007a0023000b000300b20020837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa0006"
        "008000430010000300100020a5c0ae7325effb175deee1d847aac984efc2d1fd6908184a2d4e07816be430f00020"
        "a1f23bd2135587b58f733b690c04fb2e5e0d5beb5d6043730183c697fbf5f0f1"))
    with pytest.raises(VerificationError, match="missing sign; decrypt is set"):
        check_ak_attributes(ek)


def test_check_replay() -> None:
    quoted = {"sha256": {0: b"\x00" * 32, 7: b"\x07" * 32, 9: b"\x09" * 32}, "sha1": {0: b"\x00" * 20}}
    log = {"sha256": {0: b"\x00" * 32, 7: b"\x07" * 32, 8: b"\x08" * 32}, "sha384": {0: b"\x00" * 48}}
    # PCR 9 (not in the log), PCR 8 (not quoted), sha1 and sha384 (one side only) are not judged.
    assert check_replay(log, quoted) == (("sha256", 0), ("sha256", 7))
    assert check_replay({}, quoted) == ()
    bad = {"sha256": {0: b"\x01" * 32, 7: b"\x08" * 32}, "sha1": {0: b"\x01" * 20}}
    with pytest.raises(EventLogMismatchError,
                       match=r"of sha256 PCR 0, sha256 PCR 7, sha1 PCR 0$"):
        check_replay(bad, quoted)


# =================================================================================================
# `fleet-server quote verify` on real swtpm instances
# =================================================================================================
FLEET_SERVER = str(Path(sys.executable).with_name("fleet-server"))
EXTEND_7 = "7:sha1=" + "22" * 20 + ",sha256=" + "11" * 32


class Tpm2Tools:
    """Runs tpm2-tools against one swtpm in one working directory, flushing after every command."""

    def __init__(self, tpm: Swtpm, cwd: Path) -> None:
        self.env = tools_env(tpm)
        self.cwd = cwd
        cwd.mkdir(parents=True, exist_ok=True)

    def __call__(self, *args: str) -> str:
        res = subprocess.run(args, cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=60,
                             check=False)
        # swtpm has no resource manager: transient objects and sessions stay loaded until flushed.
        for flag in ("-t", "-s"):
            subprocess.run(["tpm2_flushcontext", flag], cwd=self.cwd, env=self.env, capture_output=True,
                           timeout=60, check=False)
        assert res.returncode == 0, f"{' '.join(args)} failed: {res.stderr}"
        return res.stdout

    def make_ak(self, name: str, key: str = "ecc", scheme: str = "ecdsa") -> Path:
        if not (self.cwd / "ek.ctx").exists():
            self("tpm2_createek", "-c", "ek.ctx", "-G", "ecc", "-u", "ek.pub")
        self("tpm2_createak", "-C", "ek.ctx", "-G", key, "-g", "sha256", "-s", scheme, "-u", f"{name}.pub",
             "-n", f"{name}.name", "-c", f"{name}.ctx")
        return self.cwd / f"{name}.pub"

    def quote(self, ak: str, selection: str, nonce: str, out: str, *extra: str) -> tuple[Path, Path]:
        self("tpm2_quote", "-c", f"{ak}.ctx", "-l", selection, "-q", nonce, "-m", f"{out}.msg",
             "-s", f"{out}.sig", "-o", f"{out}.pcrs", "-g", "sha256", *extra)
        return self.cwd / f"{out}.msg", self.cwd / f"{out}.sig"

    def pcr_json(self, selection: str, out: str) -> Path:
        """`tpm2_pcrread` output as it prints it (YAML), which `--pcrs` reads directly."""
        path = self.cwd / out
        path.write_text(self("tpm2_pcrread", selection))
        return path


def fleet_server(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FLEET_SERVER, *map(str, args)], capture_output=True, text=True, timeout=120,
                          check=False)


class Evidence:
    """One quote from a real swtpm and the arguments to verify it."""

    def __init__(self, tools: Tpm2Tools, ak: str = "ak", selection: str = "sha256:0,1,7,16",
                 key: str = "ecc", scheme: str = "ecdsa", *quote_args: str) -> None:
        self.tools = tools
        self.ak_pub = tools.make_ak(ak, key, scheme) if not (tools.cwd / f"{ak}.pub").exists() \
            else tools.cwd / f"{ak}.pub"
        self.nonce = secrets.token_hex(16)
        self.msg, self.sig = tools.quote(ak, selection, self.nonce, f"q-{ak}", *quote_args)
        self.pcrs = tools.pcr_json(selection, f"pcrs-{ak}.yaml")

    def args(self, **replace: str | Path | None) -> list[str | Path]:
        opts: dict[str, str | Path | None] = {"--ak-public": self.ak_pub, "--message": self.msg,
                                              "--signature": self.sig, "--nonce": self.nonce,
                                              "--pcrs": self.pcrs}
        opts.update({"--" + k.replace("_", "-"): v for k, v in replace.items()})
        out: list[str | Path] = ["quote", "verify"]
        for k, v in opts.items():
            if v is not None:
                out += [k, v]
        return out

    def write(self, name: str, data: bytes | str) -> Path:
        path = self.tools.cwd / name
        if isinstance(data, str):
            path.write_text(data)
        else:
            path.write_bytes(data)
        return path

    def pcr_doc(self) -> dict[str, Any]:
        """The PCR values in the JSON form, for tests that change them."""
        values = load_pcr_file(self.pcrs.read_bytes())
        return {"pcrs": {bank: {str(i): v.hex() for i, v in pcrs.items()} for bank, pcrs in values.items()}}


@pytest.fixture
def tools(swtpm: Swtpm, tmp_path: Path) -> Tpm2Tools:
    t = Tpm2Tools(swtpm, tmp_path / "tpm-a")
    t("tpm2_pcrextend", EXTEND_7)
    t("tpm2_pcrextend", "16:sha256=" + "33" * 32)
    return t


@pytest.fixture
def evidence(tools: Tpm2Tools) -> Evidence:
    return Evidence(tools)


def _assert_invalid(res: subprocess.CompletedProcess[str], reason: str) -> None:
    assert res.returncode == 1, (res.returncode, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fleet-server: "), res.stderr
    assert re.search(reason, lines[0]), lines[0]


@pytest.mark.swtpm
def test_cli_accepts_real_quote_and_agrees_with_tpm2_checkquote(evidence: Evidence) -> None:
    res = fleet_server(*evidence.args())
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    assert "quote valid: ecdsa/sha256 over sha256:0,1,7,16" in res.stdout
    # Independent oracle: tpm2_checkquote accepts the same quote.
    evidence.tools("tpm2_checkquote", "-u", str(evidence.ak_pub), "-m", str(evidence.msg), "-s",
                   str(evidence.sig), "-f", "q-ak.pcrs", "-g", "sha256", "-q", evidence.nonce)
    doc = evidence.pcr_doc()
    assert doc["pcrs"]["sha256"]["0"] == "00" * 32 and len(doc["pcrs"]["sha256"]["7"]) == 64


@pytest.mark.swtpm
def test_cli_json_output(evidence: Evidence) -> None:
    res = fleet_server(*evidence.args(), "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["valid"] is True and out["reason"] is None
    assert out["selection"] == {"sha256": [0, 1, 7, 16]}
    assert (out["sig_alg"], out["hash_alg"]) == ("ecdsa", "sha256")
    assert set(out["clock"]) == {"clock", "reset_count", "restart_count", "safe"}
    assert out["ak_name"] == (evidence.tools.cwd / "ak.name").read_bytes().hex()
    attest = parse_attest(evidence.msg.read_bytes())
    assert out["clock"]["reset_count"] == attest.clock_info.reset_count
    assert out["firmware_version"] == attest.firmware_version
    assert out["qualified_signer"] == attest.qualified_signer.hex()

    bad = fleet_server(*evidence.args(nonce="00" + evidence.nonce), "--json")
    assert bad.returncode == 1
    out = json.loads(bad.stdout)
    assert out["valid"] is False and "nonce" in out["reason"]


@pytest.mark.swtpm
def test_cli_rejects_wrong_nonce(evidence: Evidence) -> None:
    other = secrets.token_hex(16)
    _assert_invalid(fleet_server(*evidence.args(nonce=other)), "nonce")


@pytest.mark.swtpm
def test_cli_rejects_flipped_signature_bit(evidence: Evidence) -> None:
    sig = evidence.sig.read_bytes()
    for offset in (8, len(sig) - 1):  # a bit of r, a bit of s
        flipped = evidence.write(f"flipped-{offset}.sig", _flip(sig, offset))
        _assert_invalid(fleet_server(*evidence.args(signature=flipped)), "signature does not verify")


@pytest.mark.swtpm
def test_cli_rejects_changed_pcr_value(evidence: Evidence) -> None:
    doc = evidence.pcr_doc()
    doc["pcrs"]["sha256"]["7"] = "ab" * 32
    changed = evidence.write("changed.json", json.dumps(doc))
    _assert_invalid(fleet_server(*evidence.args(pcrs=changed)), "PCR digest")


@pytest.mark.swtpm
def test_cli_rejects_selection_mismatch(evidence: Evidence) -> None:
    doc = evidence.pcr_doc()
    doc["pcrs"]["sha256"]["2"] = "00" * 32  # a PCR the quote does not cover
    _assert_invalid(fleet_server(*evidence.args(pcrs=evidence.write("more.json", json.dumps(doc)))),
                    r"quoted PCR selection \(sha256:0,1,7,16\) differs")
    doc = evidence.pcr_doc()
    del doc["pcrs"]["sha256"]["16"]
    _assert_invalid(fleet_server(*evidence.args(pcrs=evidence.write("less.json", json.dumps(doc)))),
                    r"differs from the expected selection \(sha256:0,1,7\)")


@pytest.mark.swtpm
def test_cli_rejects_garbled_message(evidence: Evidence) -> None:
    msg = evidence.msg.read_bytes()
    _assert_invalid(fleet_server(*evidence.args(message=evidence.write("g1.msg", _flip(msg, 0)))),
                    "signature does not verify")  # magic changed: the TPM did not sign this
    _assert_invalid(fleet_server(*evidence.args(message=evidence.write("g2.msg", msg[:-5]))),
                    r"TPMS_ATTEST\.pcrDigest at offset \d+: truncated")
    _assert_invalid(fleet_server(*evidence.args(message=evidence.write("g3.msg", b""))), "truncated")
    _assert_invalid(fleet_server(*evidence.args(signature=evidence.write("g.sig", b"\x00\x05\x00\x0b"))),
                    "unsupported signature scheme HMAC")
    _assert_invalid(fleet_server(*evidence.args(ak_public=evidence.write("g.pub", b"\x00\x01\x00"))),
                    r"TPM2B_PUBLIC")


@pytest.mark.swtpm
def test_cli_rejects_ak_of_another_tpm(evidence: Evidence, make_swtpm: Callable[[str], Swtpm],
                                       tmp_path: Path) -> None:
    other_tools = Tpm2Tools(make_swtpm("other"), tmp_path / "tpm-b")
    other_ak = other_tools.make_ak("ak")
    assert other_ak.read_bytes() != evidence.ak_pub.read_bytes()
    _assert_invalid(fleet_server(*evidence.args(ak_public=other_ak)), "signature does not verify")
    # ... while the other TPM's own quote verifies with its own AK, and not with ours.
    theirs = Evidence(other_tools)
    assert fleet_server(*theirs.args()).returncode == 0
    _assert_invalid(fleet_server(*theirs.args(ak_public=evidence.ak_pub)), "signature does not verify")


@pytest.mark.swtpm
def test_cli_sha1_bank_needs_allow_sha1(tools: Tpm2Tools) -> None:
    ev = Evidence(tools, "ak", "sha256:0,7+sha1:0,7")
    assert set(ev.pcr_doc()["pcrs"]) == {"sha1", "sha256"}
    _assert_invalid(fleet_server(*ev.args()), "SHA-1 PCR bank")
    res = fleet_server(*ev.args(), "--allow-sha1", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["selection"] == {"sha256": [0, 7], "sha1": [0, 7]}


EMPTY_NONCE_WARNING = "fleet-server: warning: empty nonce: the quote's freshness is not proven"


@pytest.mark.swtpm
def test_cli_empty_nonce_checks_a_quote_without_qualifying_data(tools: Tpm2Tools) -> None:
    """A cloud shielded VM's quote: RSA AK, SHA-1 bank, no qualifying data (tpm2_quote without -q)."""
    tools.make_ak("rsa-ak", "rsa", "rsassa")
    tools("tpm2_quote", "-c", "rsa-ak.ctx", "-l", "sha1:0,7", "-m", "bare.msg", "-s", "bare.sig",
          "-o", "bare.pcrs", "-g", "sha256")
    assert parse_attest((tools.cwd / "bare.msg").read_bytes()).extra_data == b""
    pcrs = tools.pcr_json("sha1:0,7", "bare.yaml")
    # Independent oracle: tpm2_checkquote without -q accepts it.
    tools("tpm2_checkquote", "-u", "rsa-ak.pub", "-m", "bare.msg", "-s", "bare.sig", "-f", "bare.pcrs",
          "-g", "sha256")
    args = ["quote", "verify", "--ak-public", tools.cwd / "rsa-ak.pub", "--message", tools.cwd / "bare.msg",
            "--signature", tools.cwd / "bare.sig", "--pcrs", pcrs, "--nonce", "", "--allow-sha1"]
    res = fleet_server(*args)
    assert res.returncode == 0, res.stderr
    assert "quote valid: rsassa/sha256 over sha1:0,7" in res.stdout
    assert res.stderr.splitlines() == [EMPTY_NONCE_WARNING + " (it may be replayed)"]
    # The verdict still decides the exit code: without --allow-sha1 the SHA-1 bank is refused.
    refused = fleet_server(*args[:-1])
    assert refused.returncode == 1
    assert refused.stderr.splitlines()[0].startswith(EMPTY_NONCE_WARNING)
    assert "SHA-1 PCR bank" in refused.stderr.splitlines()[1]
    # Any nonce given for this quote is wrong.
    _assert_invalid(fleet_server(*args[:-3], "--nonce", "abcd", "--allow-sha1"), "does not match")


@pytest.mark.swtpm
def test_cli_empty_nonce_refuses_a_quote_with_qualifying_data(evidence: Evidence) -> None:
    res = fleet_server(*evidence.args(nonce=""), "--json")
    assert res.returncode == 1
    assert json.loads(res.stdout)["valid"] is False
    lines = res.stderr.splitlines()
    assert lines[0].startswith(EMPTY_NONCE_WARNING) and len(lines) == 2
    assert "quote has a nonce (extraData of 16 bytes) where none was expected" in lines[1]


@pytest.mark.swtpm
@pytest.mark.parametrize(("key", "scheme"), [("rsa", "rsassa"), ("rsa", "rsapss"), ("ecc", "ecdsa")])
def test_cli_accepts_each_ak_kind(tools: Tpm2Tools, key: str, scheme: str) -> None:
    ev = Evidence(tools, f"ak-{scheme}", "sha256:0,1,7", key, scheme, "--scheme", scheme)
    res = fleet_server(*ev.args(), "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["sig_alg"] == scheme
    check_ak_attributes(parse_tpm2b_public(ev.ak_pub.read_bytes()))
    sig = ev.sig.read_bytes()
    flipped = ev.write("flip.sig", _flip(sig, len(sig) // 2))
    _assert_invalid(fleet_server(*ev.args(signature=flipped)), "signature does not verify")


@pytest.mark.swtpm
def test_cli_reads_tpm2_tools_pcr_files(tools: Tpm2Tools) -> None:
    """--pcrs takes tpm2_pcrread's YAML and tpm2_quote -o (serialized) as written, besides JSON."""
    # 12 values: more than one TPML_DIGEST (8 each) in the serialized file; two banks.
    selection = "sha256:0,1,2,3,4,5,6,7,8,9,16+sha1:7"
    ev = Evidence(tools, "ak", selection)
    assert ev.pcrs.read_text().lstrip().startswith("sha256:")  # as tpm2_pcrread prints it
    res = fleet_server(*ev.args(), "--json", "--allow-sha1")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["selection"] == {"sha256": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 16], "sha1": [7]}
    # Leading zeros kept: PCR 0 is 32 zero bytes, not the integer 0.
    assert ev.pcr_doc()["pcrs"]["sha256"]["0"] == "00" * 32
    serialized = tools.cwd / "q-ak.pcrs"  # tpm2_quote -o, default format
    assert load_pcr_file(serialized.read_bytes()) == load_pcr_file(ev.pcrs.read_bytes())
    assert fleet_server(*ev.args(pcrs=serialized), "--allow-sha1").returncode == 0
    # The same with -F serialized given explicitly, and one that differs from the PCRs quoted now.
    tools("tpm2_quote", "-c", "ak.ctx", "-l", "sha256:7", "-q", ev.nonce, "-m", "s.msg", "-s", "s.sig",
          "-o", "s.pcrs", "-F", "serialized", "-g", "sha256")
    explicit = ev.args(message=tools.cwd / "s.msg", signature=tools.cwd / "s.sig", pcrs=tools.cwd / "s.pcrs")
    assert fleet_server(*explicit).returncode == 0
    tools("tpm2_pcrextend", EXTEND_7)
    tools("tpm2_quote", "-c", "ak.ctx", "-l", "sha256:7", "-q", ev.nonce, "-m", "s2.msg", "-s", "s2.sig",
          "-g", "sha256")
    _assert_invalid(fleet_server(*ev.args(message=tools.cwd / "s2.msg", signature=tools.cwd / "s2.sig",
                                          pcrs=tools.cwd / "s.pcrs")), "PCR digest")

    # Garbage in any form is one clear usage error.
    data = serialized.read_bytes()
    cases: list[tuple[bytes, str]] = [
        (data[:-1], "is not JSON, tpm2_pcrread output or a tpm2-tools serialized PCR file"),
        (data + bytes(532), "(2 banks, 2 digest lists in 1732 bytes)"),
        (b"\x11" + data[1:], "(17 banks, 2 digest lists"),
        (b"\x03" + data[1:], "unknown PCR bank algorithm 0x0000"),  # an empty slot
        (data[:4] + b"\x99\x99" + data[6:], "unknown PCR bank algorithm 0x9999"),
        (json.dumps({"pcrs": {}}).encode("utf-32-le"), "serialized PCR file"),
        (b"\xff\xfe garbage", "is not JSON, tpm2_pcrread output"),
        (b"hello world\n", "(line 1: 'hello world')"),
        (b"sha256:\n  0 : 0x00\n", "sha256 PCR 0 value has 1 bytes, expected 32"),
        (b"sha256:\n  0 : 0x" + b"0" * 63 + b"\n", "not whole bytes"),
        (b"  0 : 0x" + b"00" * 32 + b"\n", "before any bank"),
        (b"md5:\n", "unknown PCR bank 'md5'"),
        (b"sha256:\n  0 : 0x" + b"00" * 32 + b"\n  0 : 0x" + b"00" * 32 + b"\n", "PCR 0 is given twice"),
    ]
    for n, (content, message) in enumerate(cases):
        res = fleet_server(*ev.args(pcrs=ev.write(f"garbage-{n}", content)))
        assert res.returncode == 2, (n, res.returncode, res.stderr)
        lines = res.stderr.splitlines()
        assert len(lines) == 1 and message in lines[0], (n, res.stderr)


def test_load_pcr_yaml_keeps_digest_bytes() -> None:
    text = "pcrs:\n  sha1:\n    7 : 0x" + "00" * 19 + "0A\n    10: 0x" + "ff" * 20 + "\n  sha256:\n"
    assert load_pcr_file(text.encode()) == {"sha1": {7: bytes(19) + b"\x0a", 10: b"\xff" * 20}, "sha256": {}}
    with pytest.raises(UsageError, match="no PCR banks"):
        load_pcr_file(b"\n")


@pytest.mark.swtpm
def test_cli_usage_errors_exit_2(evidence: Evidence) -> None:
    cases: list[tuple[list[str | Path], str]] = [
        (evidence.args(nonce="xyz"), "not hexadecimal"),
        (evidence.args(nonce="abc"), "not hexadecimal"),
        (evidence.args(nonce="0x"), "hex string"),
        (evidence.args(nonce=None), "required: --nonce"),
        (evidence.args(pcrs=None), "required: --pcrs"),
        (evidence.args(ak_public=None), "required: --ak-public"),
        (evidence.args(message=evidence.tools.cwd / "missing.msg"), "cannot read quote message file"),
        (evidence.args(pcrs=evidence.write("bad.json", "{not json")), "not JSON"),
        (evidence.args(pcrs=evidence.write("list.json", "[1, 2]")), '"pcrs" object'),
        (evidence.args(pcrs=evidence.write("nopcrs.json", '{"values": {}}')), '"pcrs" object'),
        (evidence.args(pcrs=evidence.write("bank.json", '{"pcrs": {"md5": {}}}')), "unknown PCR bank"),
        (evidence.args(pcrs=evidence.write("idx.json", '{"pcrs": {"sha256": {"x": "00"}}}')), "not a PCR"),
        (evidence.args(pcrs=evidence.write("hex.json", '{"pcrs": {"sha256": {"0": "zz"}}}')), "not hex"),
        (evidence.args(pcrs=evidence.write("len.json", '{"pcrs": {"sha256": {"0": "00"}}}')), "1 bytes"),
        (evidence.args(pcrs=evidence.write("num.json", '{"pcrs": {"sha256": {"0": 0}}}')), "hex string"),
        (evidence.args(eventlog=evidence.tools.cwd / "missing.log"), "cannot read event log"),
        (["quote"], "SUBCOMMAND"),
        ([*evidence.args(), "--bogus"], "unrecognized arguments"),
    ]
    for args, message in cases:
        res = fleet_server(*args)
        assert res.returncode == 2, (args, res.returncode, res.stderr)
        assert message in res.stderr, (args, res.stderr)
        assert "Traceback" not in res.stderr


def _extend_from_log(tools: Tpm2Tools, log_path: Path) -> None:
    from fleet_server.verifier.eventlog import parse_eventlog

    log = parse_eventlog(log_path.read_bytes())
    assert log.startup_locality is None  # PCR 0 of a fresh swtpm starts at zero, as the replay assumes
    for event in log.events:
        if event.type == 0x3:  # EV_NO_ACTION is never extended (PFP 10.4.5)
            continue
        spec = ",".join(f"{bank}={event.digests[bank].hex()}" for bank in ("sha1", "sha256"))
        tools("tpm2_pcrextend", f"{event.pcr}:{spec}")


@pytest.mark.swtpm
def test_cli_eventlog_replay(swtpm: Swtpm, tmp_path: Path, shared_eventlogs: Path) -> None:
    tools = Tpm2Tools(swtpm, tmp_path / "tpm")
    log_path = shared_eventlogs / "event-arch-linux.bin"
    _extend_from_log(tools, log_path)
    # PCRs 0-8 are covered by the log, PCR 9 is not (and stays zero).
    ev = Evidence(tools, "ak", "sha256:0,1,2,3,4,5,6,7,8,9")
    reference = json.loads((shared_eventlogs / "event-arch-linux.bin.pcrs.json").read_text())["pcrs"]
    assert ev.pcr_doc()["pcrs"]["sha256"]["7"] == reference["sha256"]["7"]
    res = fleet_server(*ev.args(eventlog=log_path), "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["eventlog"] == {"checked": [f"sha256:{i}" for i in range(9)]}
    plain = fleet_server(*ev.args(eventlog=log_path))
    assert plain.returncode == 0 and "event log matches 9 quoted PCRs" in plain.stdout

    # Something measured into PCR 8 that the log does not record: quote valid, log replay is not.
    tools("tpm2_pcrextend", "8:sha256=" + "44" * 32)
    ev2 = Evidence(tools, "ak", "sha256:0,7,8")
    _assert_invalid(fleet_server(*ev2.args(eventlog=log_path)),
                    r"event log replay differs from the quoted value of sha256 PCR 8$")
    assert fleet_server(*ev2.args()).returncode == 0
    # A log that is not a log is malformed evidence (exit 1), not a usage error.
    _assert_invalid(fleet_server(*ev2.args(eventlog=ev2.write("junk.log", b"\x01\x02\x03"))), ".")


def _pcr_values(doc: Mapping[str, Mapping[str, str]]) -> dict[str, dict[int, bytes]]:
    return {bank: {int(i): bytes.fromhex(v) for i, v in values.items()} for bank, values in doc.items()}


@pytest.mark.swtpm
def test_api_on_live_quote(evidence: Evidence) -> None:
    ak = AttestationKey.from_tpm2b_public(evidence.ak_pub.read_bytes())
    assert ak.name == (evidence.tools.cwd / "ak.name").read_bytes()
    pcrs = _pcr_values(evidence.pcr_doc()["pcrs"])
    info = verify_quote(ak=ak, attest=evidence.msg.read_bytes(), signature=evidence.sig.read_bytes(),
                        nonce=bytes.fromhex(evidence.nonce), pcr_values=pcrs,
                        expected_selection={"sha256": [16, 7, 1, 0]})
    assert info.selection == (("sha256", (0, 1, 7, 16)),)
    assert check_replay({"sha256": {7: pcrs["sha256"][7]}}, pcrs) == (("sha256", 7),)


def test_quote_bench_runs() -> None:
    """The benchmark's offline quote passes verify_quote (checked inside run()) and it reports both rates."""
    from firmware_sim.bench import quote_bench

    result = quote_bench.run(n=5)
    assert set(result) == {"ecdsa_p256_verify_per_s", "quote_verify_only_per_s"}
    assert all(rate > 0 for rate in result.values())
