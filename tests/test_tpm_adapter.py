"""The agent's TPM adapter against real swtpm instances, checked by independent references.

References used instead of the adapter's own word: tpm2-tools (tpm2_checkquote, tpm2_pcrread,
tpm2_makecredential, tpm2_readpublic of the EKs swtpm_setup persisted, trial policy sessions),
``cryptography`` for signatures and OAEP, and tpm2_pytss.utils.make_credential.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import shutil
import stat
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import tools_env
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from tpm2_pytss.constants import TPM2_ALG, TPM2_ECC, TPM2_ST, TPMA_OBJECT
from tpm2_pytss.types import TPM2B_NAME, TPM2B_PUBLIC, TPML_PCR_SELECTION, TPMS_ATTEST, TPMT_SIGNATURE
from tpm2_pytss.utils import make_credential

import firmware_sim.swtpm as swtpm_module
from agent.tpm.adapter import TpmAdapter
from firmware_sim.manufacturer import ManufacturerCA
from firmware_sim.swtpm import Swtpm
from protocol.errors import ConfigError, EdgeError, MalformedInputError, TpmError
from protocol.tpm import policy

swtpm_test = pytest.mark.swtpm

SEL10: dict[str, list[int]] = {"sha256": list(range(10))}
TPM_GENERATED = 0xFF544347


# ---------------------------------------------------------------------------------------------
# Independent helpers (no adapter code)
# ---------------------------------------------------------------------------------------------
def tool(tpm: Swtpm, *args: str, cwd: Path | None = None,
         check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(list(args), env=tools_env(tpm), capture_output=True, text=True, cwd=cwd,
                         timeout=60, check=False)
    if check and res.returncode != 0:
        pytest.fail(f"{' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}")
    return res


def pcrread(tpm: Swtpm, spec: str) -> dict[str, dict[int, bytes]]:
    """Parse tpm2_pcrread's YAML-ish output by hand (a YAML reader would turn 0x… into integers)."""
    out: dict[str, dict[int, bytes]] = {}
    bank = None
    for line in tool(tpm, "tpm2_pcrread", spec).stdout.splitlines():
        if m := re.fullmatch(r"\s+(\w+):", line):
            bank = m.group(1)
            out[bank] = {}
        elif m := re.fullmatch(r"\s+(\d+)\s*:\s*0x([0-9A-Fa-f]+)", line):
            assert bank is not None
            out[bank][int(m.group(1))] = bytes.fromhex(m.group(2))
    return out


def extend(tpm: Swtpm, pcr: int, data: bytes) -> None:
    """tpm2_pcrextend PCR in both banks with the hashes of ``data``."""
    tool(tpm, "tpm2_pcrextend",
         f"{pcr}:sha1={hashlib.sha1(data).hexdigest()},sha256={hashlib.sha256(data).hexdigest()}")


def area(public: bytes) -> Any:  # tpm2_pytss is untyped
    value, used = TPM2B_PUBLIC.unmarshal(public)
    assert used == len(public)
    return value.publicArea


def crypto_key(public: bytes) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey:
    a = area(public)
    if a.type == TPM2_ALG.RSA:
        return rsa.RSAPublicNumbers(int(a.parameters.rsaDetail.exponent) or 65537,
                                    int.from_bytes(bytes(a.unique.rsa), "big")).public_key()
    curves = {TPM2_ECC.NIST_P256: ec.SECP256R1(), TPM2_ECC.NIST_P384: ec.SECP384R1()}
    curve = curves[a.parameters.eccDetail.curveID]
    return ec.EllipticCurvePublicNumbers(int.from_bytes(bytes(a.unique.ecc.x), "big"),
                                         int.from_bytes(bytes(a.unique.ecc.y), "big"), curve).public_key()


def verify_tpm_signature(public: bytes, message: bytes, signature: bytes) -> None:
    """Raise InvalidSignature unless ``signature`` (TPMT_SIGNATURE) signs ``message`` with ``public``."""
    sig, used = TPMT_SIGNATURE.unmarshal(signature)
    assert used == len(signature)
    key = crypto_key(public)
    if isinstance(key, ec.EllipticCurvePublicKey):
        assert sig.sigAlg == TPM2_ALG.ECDSA and sig.signature.ecdsa.hash == TPM2_ALG.SHA256
        der = encode_dss_signature(int.from_bytes(bytes(sig.signature.ecdsa.signatureR), "big"),
                                   int.from_bytes(bytes(sig.signature.ecdsa.signatureS), "big"))
        key.verify(der, message, ec.ECDSA(hashes.SHA256()))
    else:
        assert sig.sigAlg == TPM2_ALG.RSASSA and sig.signature.rsassa.hash == TPM2_ALG.SHA256
        key.verify(bytes(sig.signature.rsassa.sig), message, padding.PKCS1v15(), hashes.SHA256())


def oaep_wrap(public: bytes, plaintext: bytes, label: bytes | None = None) -> bytes:
    key = crypto_key(public)
    assert isinstance(key, rsa.RSAPublicKey)
    return key.encrypt(plaintext, padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), label))


def attest_info(attest: bytes) -> Any:
    info, used = TPMS_ATTEST.unmarshal(attest)
    assert used == len(attest)
    assert info.magic == TPM_GENERATED
    return info


def transient_handles(tpm: Swtpm) -> list[str]:
    out = tool(tpm, "tpm2_getcap", "handles-transient").stdout
    return [line for line in out.splitlines() if line.strip()]


def loaded_sessions(tpm: Swtpm) -> list[str]:
    out = tool(tpm, "tpm2_getcap", "handles-loaded-session").stdout
    return [line for line in out.splitlines() if line.strip()]


def ctrl_init(tpm: Swtpm) -> None:
    """TPM_Init over swtpm's control channel: a platform reset under a live connection."""
    assert tpm.port is not None
    subprocess.run(["swtpm_ioctl", "--tcp", f"{tpm.host}:{tpm.port + 1}", "-i"], check=True, timeout=30)


def tools_credential(path: Path) -> tuple[bytes, bytes]:
    """Split a tpm2_makecredential output file into marshalled TPM2B_ID_OBJECT and TPM2B_ENCRYPTED_SECRET."""
    data = path.read_bytes()
    magic, version = struct.unpack(">II", data[:8])
    assert (magic, version) == (0xBADCC0DE, 1)
    (id_size,) = struct.unpack(">H", data[8:10])
    id_object = data[8:10 + id_size]
    rest = data[10 + id_size:]
    (secret_size,) = struct.unpack(">H", rest[:2])
    assert len(rest) == 2 + secret_size
    return id_object, rest


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "agent-state"


@pytest.fixture
def adapter(swtpm: Swtpm, state_dir: Path) -> Iterator[TpmAdapter]:
    with TpmAdapter(swtpm.tcti, state_dir) as a:
        yield a


# ---------------------------------------------------------------------------------------------
# EK
# ---------------------------------------------------------------------------------------------
@swtpm_test
def test_rsa_ek_certificate_chains_to_manufacturer_and_matches_ek(adapter: TpmAdapter, swtpm: Swtpm,
                                                                  manufacturer_ca: ManufacturerCA,
                                                                  tmp_path: Path) -> None:
    der = adapter.ek_certificate()
    cert = x509.load_der_x509_certificate(der)
    assert cert.public_bytes(serialization.Encoding.DER) == der  # exactly the certificate, no padding
    issuer = x509.load_pem_x509_certificate(manufacturer_ca.issuer_cert.read_bytes())
    assert cert.issuer == issuer.subject
    cert.verify_directly_issued_by(issuer)

    ek_public = adapter.ek_public()
    key = crypto_key(ek_public)
    assert isinstance(key, rsa.RSAPublicKey)
    assert key.public_numbers() == cert.public_key().public_numbers()
    # swtpm_setup persisted the EK it certified at 0x81010001: the adapter re-derived the same one.
    tool(swtpm, "tpm2_readpublic", "-c", "0x81010001", "-o", str(tmp_path / "ek.pub"))
    assert (tmp_path / "ek.pub").read_bytes() == ek_public
    a = area(ek_public)
    assert not a.objectAttributes & TPMA_OBJECT.USERWITHAUTH  # low-range template: PolicySecret only
    assert a.objectAttributes & TPMA_OBJECT.RESTRICTED and a.objectAttributes & TPMA_OBJECT.DECRYPT


@swtpm_test
def test_ecc_ek_falls_back_to_high_range_p384(adapter: TpmAdapter, swtpm: Swtpm,
                                              manufacturer_ca: ManufacturerCA, tmp_path: Path) -> None:
    cert = x509.load_der_x509_certificate(adapter.ek_certificate("ecc"))
    issuer = x509.load_pem_x509_certificate(manufacturer_ca.issuer_cert.read_bytes())
    cert.verify_directly_issued_by(issuer)
    key = crypto_key(adapter.ek_public("ecc"))
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp384r1"
    assert key.public_numbers() == cert.public_key().public_numbers()
    tool(swtpm, "tpm2_readpublic", "-c", "0x81010016", "-o", str(tmp_path / "ekecc.pub"))
    assert (tmp_path / "ekecc.pub").read_bytes() == adapter.ek_public("ecc")


def _replace_nv_cert(tpm: Swtpm, index: str, content: bytes, workdir: Path) -> None:
    """Re-provision an EK certificate index as the platform would (platform auth is empty on swtpm)."""
    blob = workdir / f"nv-{index}.bin"
    blob.write_bytes(content)
    tool(tpm, "tpm2_nvundefine", "-C", "p", index)
    tool(tpm, "tpm2_nvdefine", index, "-C", "p", "-s", str(len(content)),
         "-a", "ppwrite|ppread|ownerread|authread|no_da|platformcreate")
    tool(tpm, "tpm2_nvwrite", index, "-C", "p", "-i", str(blob))


@swtpm_test
def test_ek_certificate_padding_is_stripped_by_der_length(swtpm: Swtpm, state_dir: Path,
                                                          tmp_path: Path) -> None:
    with TpmAdapter(swtpm.tcti, state_dir) as a:
        rsa_cert, ecc_cert = a.ek_certificate(), a.ek_certificate("ecc")
    _replace_nv_cert(swtpm, "0x1c00002", rsa_cert + b"\xff" * 300, tmp_path)
    _replace_nv_cert(swtpm, "0x1c00016", ecc_cert + b"\x00" * 150, tmp_path)
    with TpmAdapter(swtpm.tcti, state_dir) as a:
        assert a.ek_certificate() == rsa_cert
        assert a.ek_certificate("ecc") == ecc_cert


@swtpm_test
def test_truncated_ek_certificate_is_refused(swtpm: Swtpm, state_dir: Path, tmp_path: Path) -> None:
    with TpmAdapter(swtpm.tcti, state_dir) as a:
        rsa_cert = a.ek_certificate()
    _replace_nv_cert(swtpm, "0x1c00002", rsa_cert[:500], tmp_path)
    with pytest.raises(TpmError, match="truncated"):
        TpmAdapter(swtpm.tcti, state_dir).open()


@swtpm_test
def test_ek_not_matching_its_certificate_fails_closed(swtpm: Swtpm, state_dir: Path, tmp_path: Path,
                                                      manufacturer_ca: ManufacturerCA) -> None:
    # A valid manufacturer-signed certificate, but for another TPM's EK.
    other = Swtpm(tmp_path / "other" / "tpm")
    other.manufacture(manufacturer_ca)
    with other, TpmAdapter(other.tcti, tmp_path / "other-state") as a:
        foreign_cert = a.ek_certificate()
    _replace_nv_cert(swtpm, "0x1c00002", foreign_cert, tmp_path)
    with pytest.raises(TpmError, match="does not match"):
        TpmAdapter(swtpm.tcti, state_dir).open()
    assert not any(state_dir.glob("ak-*"))  # no AK was made under an unverified EK
    assert transient_handles(swtpm) == []


# ---------------------------------------------------------------------------------------------
# AK
# ---------------------------------------------------------------------------------------------
def _check_ak_area(public: bytes, alg: str) -> None:
    a = area(public)
    attrs = a.objectAttributes
    for bit in (TPMA_OBJECT.FIXEDTPM, TPMA_OBJECT.FIXEDPARENT, TPMA_OBJECT.SENSITIVEDATAORIGIN,
                TPMA_OBJECT.USERWITHAUTH, TPMA_OBJECT.RESTRICTED, TPMA_OBJECT.SIGN_ENCRYPT):
        assert attrs & bit, bit
    assert not attrs & TPMA_OBJECT.DECRYPT
    assert a.nameAlg == TPM2_ALG.SHA256
    if alg == "ecc":
        assert a.type == TPM2_ALG.ECC and a.parameters.eccDetail.curveID == TPM2_ECC.NIST_P256
        assert a.parameters.eccDetail.scheme.scheme == TPM2_ALG.ECDSA
    else:
        assert a.type == TPM2_ALG.RSA and a.parameters.rsaDetail.keyBits == 2048
        assert a.parameters.rsaDetail.scheme.scheme == TPM2_ALG.RSASSA
    assert a.parameters.asymDetail.scheme.details.anySig.hashAlg == TPM2_ALG.SHA256


@swtpm_test
@pytest.mark.parametrize("alg", ["ecc", "rsa"])
def test_ak_is_persisted_and_identical_after_reopening(swtpm: Swtpm, state_dir: Path, alg: str) -> None:
    with TpmAdapter(swtpm.tcti, state_dir, ak_alg=alg) as a:
        first = a.ak
    _check_ak_area(first.public, alg)
    assert first.alg == alg
    value, _ = TPM2B_PUBLIC.unmarshal(first.public)
    assert bytes(value.get_name()) == first.name and first.name[:2] == b"\x00\x0b"

    files = sorted(p.name for p in state_dir.iterdir())
    assert files == [f"ak-{alg}.ek-rsa.priv", f"ak-{alg}.ek-rsa.pub"]  # no temp files left behind
    for p in state_dir.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
    blobs = {p.name: p.read_bytes() for p in state_dir.iterdir()}

    with TpmAdapter(swtpm.tcti, state_dir, ak_alg=alg) as b:  # a restarted agent
        assert b.ak == first
        quote = b.quote(b"after restart", {"sha256": [0]})
    verify_tpm_signature(first.public, quote.attest, quote.signature)
    assert {p.name: p.read_bytes() for p in state_dir.iterdir()} == blobs  # loaded, not re-created

    with TpmAdapter(swtpm.tcti, state_dir.parent / "fresh", ak_alg=alg) as c:
        assert c.ak.public != first.public  # another state dir: another AK


@swtpm_test
def test_corrupt_ak_blob_is_a_clear_error(swtpm: Swtpm, state_dir: Path) -> None:
    with TpmAdapter(swtpm.tcti, state_dir):
        pass
    priv = state_dir / "ak-ecc.ek-rsa.priv"
    data = bytearray(priv.read_bytes())
    data[-1] ^= 1
    priv.write_bytes(bytes(data))
    with pytest.raises(TpmError, match="cannot load the AK saved in"):
        TpmAdapter(swtpm.tcti, state_dir).open()
    assert transient_handles(swtpm) == []


# ---------------------------------------------------------------------------------------------
# Quotes and PCRs
# ---------------------------------------------------------------------------------------------
@swtpm_test
@pytest.mark.parametrize("alg", ["ecc", "rsa"])
def test_quote_is_accepted_by_tpm2_checkquote(swtpm: Swtpm, state_dir: Path, tmp_path: Path,
                                              alg: str) -> None:
    extend(swtpm, 8, b"grub command line")
    extend(swtpm, 9, b"kernel image")
    nonce = secrets.token_bytes(20)
    with TpmAdapter(swtpm.tcti, state_dir, ak_alg=alg) as a:
        q = a.quote(nonce, SEL10)
        ak_public = a.ak_public

    info = attest_info(q.attest)
    assert info.type == TPM2_ST.ATTEST_QUOTE and bytes(info.extraData) == nonce
    assert sorted(q.pcrs) == ["sha256"] and sorted(q.pcrs["sha256"]) == list(range(10))
    assert q.pcrs["sha256"][9] != bytes(32)

    work = tmp_path / "checkquote"
    work.mkdir()
    (work / "ak.pub").write_bytes(ak_public)  # TPM2B_PUBLIC, as tpm2_createak -u writes it
    (work / "quote.msg").write_bytes(q.attest)
    (work / "quote.sig").write_bytes(q.signature)
    spec = "sha256:" + ",".join(map(str, range(10)))
    # The PCR file: tpm2_checkquote without -l reads tpm2-tools' "serialized" format (the default
    # of tpm2_quote -o).  With -l it would read plain values, but tpm2-tools 5.4 mis-splits more than
    # seven values into its 8-digest lists ("Something wrong, trying to print but nothing more"), so
    # the serialized file, written by tpm2_pcrread itself, is the reliable input for ten PCRs.
    tool(swtpm, "tpm2_pcrread", "-Q", "-F", "serialized", "-o", "pcrs.ser", spec, cwd=work)
    # The plain-values form of the same PCRs must equal what the adapter returned with the quote.
    tool(swtpm, "tpm2_pcrread", "-Q", "-o", "pcrs.bin", spec, cwd=work)
    assert (work / "pcrs.bin").read_bytes() == b"".join(q.pcrs["sha256"][i] for i in range(10))

    args = ["tpm2_checkquote", "-u", "ak.pub", "-m", "quote.msg", "-s", "quote.sig", "-f", "pcrs.ser",
            "-g", "sha256"]
    tool(swtpm, *args, "-q", nonce.hex(), cwd=work)
    wrong = tool(swtpm, *args, "-q", secrets.token_bytes(20).hex(), cwd=work, check=False)
    assert wrong.returncode != 0 and "nonce" in wrong.stderr
    # Values that are not the quoted ones are refused too.
    extend(swtpm, 9, b"another kernel")
    tool(swtpm, "tpm2_pcrread", "-Q", "-F", "serialized", "-o", "pcrs.ser", spec, cwd=work)
    stale = tool(swtpm, *args, "-q", nonce.hex(), cwd=work, check=False)
    assert stale.returncode != 0


@swtpm_test
def test_quote_signature_and_pcr_digest_verify_in_software(adapter: TpmAdapter, swtpm: Swtpm) -> None:
    extend(swtpm, 16, b"measured")
    sel = {"sha1": [16, 0], "sha256": [16, 7, 0]}
    q = adapter.quote(b"n" * 32, sel)
    verify_tpm_signature(adapter.ak_public, q.attest, q.signature)
    info = attest_info(q.attest)
    # The TPM orders banks by algorithm id and PCRs ascending; pcrDigest covers them in that order.
    assert bytes(info.attested.quote.pcrSelect.marshal()) == TPML_PCR_SELECTION.parse(
        "sha1:0,16+sha256:0,7,16").marshal()
    composite = b"".join([q.pcrs["sha1"][0], q.pcrs["sha1"][16], q.pcrs["sha256"][0], q.pcrs["sha256"][7],
                          q.pcrs["sha256"][16]])
    assert bytes(info.attested.quote.pcrDigest) == hashlib.sha256(composite).digest()
    tampered = bytearray(q.attest)
    tampered[-1] ^= 1
    with pytest.raises(InvalidSignature):
        verify_tpm_signature(adapter.ak_public, bytes(tampered), q.signature)
    bare = adapter.quote(b"n" * 32, sel, with_pcrs=False)
    assert bare.pcrs == {}
    verify_tpm_signature(adapter.ak_public, bare.attest, bare.signature)


@swtpm_test
def test_read_pcrs_equals_tpm2_pcrread_after_extend(adapter: TpmAdapter, swtpm: Swtpm) -> None:
    extend(swtpm, 16, b"first")
    extend(swtpm, 16, b"second")
    extend(swtpm, 23, b"debug")
    every = list(range(24))  # 24 PCRs per bank: the adapter must loop (8 digests per TPM2_PCR_Read)
    ours = adapter.read_pcrs({"sha256": every, "sha1": every})
    theirs = pcrread(swtpm, "sha1:" + ",".join(map(str, every)) + "+sha256:" + ",".join(map(str, every)))
    assert ours == theirs
    assert list(ours) == ["sha1", "sha256"] and list(ours["sha256"]) == every
    expected = bytes(32)
    for data in (b"first", b"second"):
        expected = hashlib.sha256(expected + hashlib.sha256(data).digest()).digest()
    assert ours["sha256"][16] == expected


@swtpm_test
def test_unallocated_bank_is_an_error(adapter: TpmAdapter) -> None:
    with pytest.raises(TpmError, match="bank not allocated"):
        adapter.read_pcrs({"sha384": [0]})
    with pytest.raises(TpmError, match="bank not allocated"):
        adapter.quote(b"nonce", {"sha384": [0], "sha256": [0]})


# ---------------------------------------------------------------------------------------------
# Credential activation
# ---------------------------------------------------------------------------------------------
@swtpm_test
def test_activate_credential_made_by_tpm2_makecredential(adapter: TpmAdapter, swtpm: Swtpm,
                                                         tmp_path: Path) -> None:
    secret = secrets.token_bytes(32)
    (tmp_path / "ek.pub").write_bytes(adapter.ek_public())
    (tmp_path / "secret.bin").write_bytes(secret)
    tool(swtpm, "tpm2_makecredential", "-T", "none", "-u", "ek.pub", "-s", "secret.bin",
         "-n", adapter.ak_name.hex(), "-o", "cred.out", cwd=tmp_path)
    id_object, encrypted_secret = tools_credential(tmp_path / "cred.out")
    assert adapter.activate_credential(id_object, encrypted_secret) == secret


@swtpm_test
def test_activate_credential_made_by_pytss_and_bound_to_ak_name(
        adapter: TpmAdapter, make_swtpm: Callable[..., Swtpm], tmp_path: Path) -> None:
    ek_public, _ = TPM2B_PUBLIC.unmarshal(adapter.ek_public())
    secret = secrets.token_bytes(32)
    blob, enc = make_credential(ek_public, secret, TPM2B_NAME(adapter.ak_name))
    assert adapter.activate_credential(bytes(blob.marshal()), bytes(enc.marshal())) == secret

    other_name = b"\x00\x0b" + secrets.token_bytes(32)
    blob, enc = make_credential(ek_public, secret, TPM2B_NAME(other_name))
    with pytest.raises(TpmError, match="integrity") as err:
        adapter.activate_credential(bytes(blob.marshal()), bytes(enc.marshal()))
    assert err.value.rc is not None

    other = make_swtpm("other")
    with TpmAdapter(other.tcti, tmp_path / "other-state") as b:
        foreign_ek, _ = TPM2B_PUBLIC.unmarshal(b.ek_public())
    blob, enc = make_credential(foreign_ek, secret, TPM2B_NAME(adapter.ak_name))
    with pytest.raises(TpmError):
        adapter.activate_credential(bytes(blob.marshal()), bytes(enc.marshal()))

    good_blob, good_enc = make_credential(ek_public, secret, TPM2B_NAME(adapter.ak_name))
    with pytest.raises(MalformedInputError, match="trailing"):
        adapter.activate_credential(bytes(good_blob.marshal()) + b"\x00", bytes(good_enc.marshal()))
    with pytest.raises(MalformedInputError):
        adapter.activate_credential(b"\x00", bytes(good_enc.marshal()))


@swtpm_test
def test_activate_credential_with_high_range_ecc_ek(swtpm: Swtpm, state_dir: Path) -> None:
    # The P-384 H-range EK has userWithAuth and PolicyB: the adapter authorizes it with an HMAC session.
    with TpmAdapter(swtpm.tcti, state_dir, ek_alg="ecc") as a:
        assert (state_dir / "ak-ecc.ek-ecc.pub").exists()
        ek_public, _ = TPM2B_PUBLIC.unmarshal(a.ek_public())
        assert ek_public.publicArea.parameters.eccDetail.curveID == TPM2_ECC.NIST_P384
        secret = secrets.token_bytes(32)
        blob, enc = make_credential(ek_public, secret, TPM2B_NAME(a.ak_name))
        assert a.activate_credential(bytes(blob.marshal()), bytes(enc.marshal())) == secret


# ---------------------------------------------------------------------------------------------
# Bound keys
# ---------------------------------------------------------------------------------------------
def _trial_policy(tpm: Swtpm, work: Path, selection: str) -> bytes:
    """The bound-key policy computed by the TPM itself, through tpm2-tools trial sessions."""
    work.mkdir(exist_ok=True)
    tool(tpm, "tpm2_startauthsession", "-S", "s.ctx", cwd=work)
    tool(tpm, "tpm2_policypcr", "-Q", "-S", "s.ctx", "-l", selection, cwd=work)
    tool(tpm, "tpm2_policycommandcode", "-Q", "-S", "s.ctx", "-L", "decrypt.dgst", "TPM2_CC_RSA_Decrypt",
         cwd=work)
    tool(tpm, "tpm2_flushcontext", "s.ctx", cwd=work)
    tool(tpm, "tpm2_startauthsession", "-S", "s.ctx", cwd=work)
    tool(tpm, "tpm2_policycommandcode", "-Q", "-S", "s.ctx", "-L", "certify.dgst", "TPM2_CC_Certify",
         cwd=work)
    tool(tpm, "tpm2_flushcontext", "s.ctx", cwd=work)
    tool(tpm, "tpm2_startauthsession", "-S", "s.ctx", cwd=work)
    tool(tpm, "tpm2_policyor", "-Q", "-S", "s.ctx", "-L", "or.dgst", "-l", "sha256:decrypt.dgst,certify.dgst",
         cwd=work)
    tool(tpm, "tpm2_flushcontext", "s.ctx", cwd=work)
    return (work / "or.dgst").read_bytes()


@swtpm_test
def test_bound_key_certify_unwrap_and_pcr_binding(adapter: TpmAdapter, swtpm: Swtpm, state_dir: Path,
                                                  tmp_path: Path) -> None:
    extend(swtpm, 16, b"good boot")
    key = adapter.create_bound_key({"sha256": [16, 0, 7]})
    assert re.fullmatch(r"[0-9a-f]{32}", key.key_id)
    assert key.pcr_selection == (("sha256", (0, 7, 16)),)

    a = area(key.public)
    for bit in (TPMA_OBJECT.FIXEDTPM, TPMA_OBJECT.FIXEDPARENT, TPMA_OBJECT.SENSITIVEDATAORIGIN,
                TPMA_OBJECT.DECRYPT, TPMA_OBJECT.ADMINWITHPOLICY):
        assert a.objectAttributes & bit, bit
    for bit in (TPMA_OBJECT.USERWITHAUTH, TPMA_OBJECT.RESTRICTED, TPMA_OBJECT.SIGN_ENCRYPT):
        assert not a.objectAttributes & bit, bit
    assert a.type == TPM2_ALG.RSA and a.parameters.rsaDetail.keyBits == 2048
    assert a.parameters.rsaDetail.scheme.scheme == TPM2_ALG.OAEP
    assert a.parameters.rsaDetail.scheme.details.anySig.hashAlg == TPM2_ALG.SHA256
    assert bytes(a.authPolicy) == key.policy_digest
    # The TPM computes the same policy for the current PCR values.
    assert _trial_policy(swtpm, tmp_path / "policy", "sha256:0,7,16") == key.policy_digest
    for suffix in (".pub", ".priv", ".json"):
        assert stat.S_IMODE((state_dir / f"bound-{key.key_id}{suffix}").stat().st_mode) == 0o600

    # Certification by the AK, checked with cryptography.
    nonce = secrets.token_bytes(16)
    cert = adapter.certify(key, nonce)
    verify_tpm_signature(adapter.ak_public, cert.attest, cert.signature)
    info = attest_info(cert.attest)
    assert info.type == TPM2_ST.ATTEST_CERTIFY and bytes(info.extraData) == nonce
    assert bytes(info.attested.certify.name) == key.name
    forged = bytearray(cert.attest)
    forged[-1] ^= 1
    with pytest.raises(InvalidSignature):
        verify_tpm_signature(adapter.ak_public, bytes(forged), cert.signature)

    # A data key wrapped in software unwraps in the TPM; the label takes part.
    data_key = secrets.token_bytes(32)
    assert adapter.unwrap(key, oaep_wrap(key.public, data_key)) == data_key
    labelled = oaep_wrap(key.public, data_key, b"model-v1\x00")
    assert adapter.unwrap(key.key_id, labelled, b"model-v1\x00") == data_key
    with pytest.raises(TpmError, match="does not decrypt"):
        adapter.unwrap(key, labelled)

    # A restarted agent finds the key by its id.  (One adapter per TPM at a time: without a resource
    # manager each keeps its AK loaded, and swtpm has three object slots.)
    adapter.close()
    with TpmAdapter(swtpm.tcti, state_dir) as again:
        assert again.bound_key(key.key_id) == key
        assert again.unwrap(key.key_id, oaep_wrap(key.public, data_key)) == data_key

        # Another boot state: the key refuses to decrypt, but can still be certified.
        extend(swtpm, 16, b"tampered boot")
        with pytest.raises(TpmError, match="a policy check failed") as err:
            again.unwrap(key, oaep_wrap(key.public, data_key))
        assert err.value.rc is not None
        late = again.certify(key, nonce)
        verify_tpm_signature(again.ak_public, late.attest, late.signature)


@swtpm_test
def test_bound_key_for_given_pcr_values(adapter: TpmAdapter, swtpm: Swtpm) -> None:
    now = adapter.read_pcrs({"sha256": [16]})
    future = hashlib.sha256(now["sha256"][16] + hashlib.sha256(b"update v2").digest()).digest()
    key = adapter.create_bound_key({"sha256": [16]}, {"sha256": {16: future}})
    ciphertext = oaep_wrap(key.public, b"k" * 32)
    with pytest.raises(TpmError, match="a policy check failed"):
        adapter.unwrap(key, ciphertext)
    extend(swtpm, 16, b"update v2")
    assert adapter.unwrap(key, ciphertext) == b"k" * 32
    with pytest.raises(MalformedInputError):
        adapter.create_bound_key({"sha256": [16]}, {"sha256": {16: b"short"}})
    with pytest.raises(MalformedInputError):
        adapter.create_bound_key({"sha256": [16, 17]}, {"sha256": {16: future}})


@swtpm_test
def test_ciphertext_for_tpm_a_fails_on_tpm_b(make_swtpm: Callable[..., Swtpm], tmp_path: Path) -> None:
    tpm_a, tpm_b = make_swtpm("a"), make_swtpm("b")
    sel = {"sha256": [0, 7]}
    data_key = secrets.token_bytes(32)
    with TpmAdapter(tpm_a.tcti, tmp_path / "state-a") as a, TpmAdapter(tpm_b.tcti, tmp_path / "state-b") as b:
        key_a, key_b = a.create_bound_key(sel), b.create_bound_key(sel)
        for_a = oaep_wrap(key_a.public, data_key)
        assert a.unwrap(key_a, for_a) == data_key
        with pytest.raises(TpmError, match="does not decrypt"):
            b.unwrap(key_b, for_a)
        # Even with A's key blobs, B cannot use A's key.
        for p in (tmp_path / "state-a").glob(f"bound-{key_a.key_id}.*"):
            shutil.copy2(p, tmp_path / "state-b" / p.name)
        with pytest.raises(TpmError):
            b.unwrap(key_a.key_id, for_a)
        assert len(transient_handles(tpm_b)) == 1


@swtpm_test
def test_bound_key_input_validation(adapter: TpmAdapter) -> None:
    key = adapter.create_bound_key({"sha256": [0]})
    with pytest.raises(MalformedInputError):
        adapter.unwrap(key, b"\x00" * 255)
    with pytest.raises(MalformedInputError, match="zero octet"):
        adapter.unwrap(key, oaep_wrap(key.public, b"k"), b"label")
    with pytest.raises(MalformedInputError):
        adapter.unwrap("../../etc/passwd", b"\x00" * 256)
    with pytest.raises(EdgeError):
        adapter.certify("0" * 32, b"nonce")  # no such key in the state dir
    with pytest.raises(MalformedInputError):
        adapter.certify(key, b"")


# ---------------------------------------------------------------------------------------------
# NV counter
# ---------------------------------------------------------------------------------------------
@swtpm_test
def test_nv_counter_is_monotonic_and_survives_power_cycle(swtpm: Swtpm, state_dir: Path) -> None:
    with TpmAdapter(swtpm.tcti, state_dir) as a:
        with pytest.raises(TpmError, match="not defined"):
            a.counter_read()
        a.counter_define()
        a.counter_define()  # idempotent
        start = a.counter_read()
        assert a.counter_increment() == start + 1
        assert a.counter_increment() == start + 2
        assert a.counter_read() == start + 2
    public = tool(swtpm, "tpm2_nvreadpublic", f"0x{a.counter_index:x}").stdout
    assert "nt=0x1" in public or "nt=counter" in public
    swtpm.power_cycle()
    with TpmAdapter(swtpm.tcti, state_dir) as b:
        b.counter_define()  # does not reset it
        assert b.counter_read() == start + 2
        assert b.counter_increment() == start + 3


@swtpm_test
def test_nv_counter_index_taken_by_something_else_is_refused(swtpm: Swtpm, state_dir: Path) -> None:
    tool(swtpm, "tpm2_nvdefine", "0x1800a01", "-C", "o", "-s", "8", "-a", "ownerread|ownerwrite")
    with TpmAdapter(swtpm.tcti, state_dir) as a, pytest.raises(TpmError, match="not an owner-authorized"):
        a.counter_define()
    with TpmAdapter(swtpm.tcti, state_dir, counter_index=0x01800B00) as a:
        a.counter_define()
        assert a.counter_increment() == a.counter_read()


# ---------------------------------------------------------------------------------------------
# Resets, transport loss, shared TPMs, DA lockout
# ---------------------------------------------------------------------------------------------
@swtpm_test
def test_power_cycle_with_new_port_needs_a_new_adapter(swtpm: Swtpm, state_dir: Path) -> None:
    """Decision: after the TPM's transport is gone the adapter raises TpmError; the caller opens a
    new adapter with the (new) TCTI, which loads the same AK."""
    extend(swtpm, 16, b"before power cycle")
    a = TpmAdapter(swtpm.tcti, state_dir)
    first = a.quote(b"before", {"sha256": [16]})
    ak = a.ak
    swtpm.stop()
    with pytest.raises(TpmError, match=r"cannot connect|connection") as err:
        a.quote(b"during", {"sha256": [16]})
    assert "Traceback" not in err.value.diagnostics()
    swtpm.start()  # swtpm comes back on other ports
    with pytest.raises(TpmError):
        a.quote(b"after", {"sha256": [16]})  # still pointed at the old port
    a.close()
    with TpmAdapter(swtpm.tcti, state_dir) as b:
        assert b.ak == ak
        second = b.quote(b"after", {"sha256": [16]})
    verify_tpm_signature(ak.public, second.attest, second.signature)
    assert second.pcrs["sha256"][16] == bytes(32)  # PCRs were reset by the power cycle
    assert attest_info(second.attest).clockInfo.resetCount > attest_info(first.attest).clockInfo.resetCount


@swtpm_test
def test_restart_on_the_same_port_reconnects_transparently(swtpm: Swtpm, adapter: TpmAdapter,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    first = adapter.quote(b"before", {"sha256": [0]})
    port = swtpm.port
    monkeypatch.setattr(swtpm_module, "free_port_pair", lambda host="127.0.0.1": port)
    swtpm.power_cycle()
    assert swtpm.port == port
    second = adapter.quote(b"after", {"sha256": [0]})
    verify_tpm_signature(adapter.ak_public, second.attest, second.signature)
    assert attest_info(second.attest).clockInfo.resetCount > attest_info(first.attest).clockInfo.resetCount
    assert len(transient_handles(swtpm)) == 1


@swtpm_test
def test_platform_reset_under_live_connection_reloads_ak(swtpm: Swtpm, adapter: TpmAdapter) -> None:
    first = adapter.quote(b"before", {"sha256": [0]})
    ctrl_init(swtpm)
    with pytest.raises(TpmError, match="TPM2_Startup"):
        adapter.quote(b"not started", {"sha256": [0]})
    tool(swtpm, "tpm2_startup", "-c")  # what platform firmware does after the reset
    second = adapter.quote(b"after", {"sha256": [0]})
    verify_tpm_signature(adapter.ak_public, second.attest, second.signature)
    assert attest_info(second.attest).clockInfo.resetCount > attest_info(first.attest).clockInfo.resetCount
    assert len(transient_handles(swtpm)) == 1


@swtpm_test
def test_ak_flushed_by_another_client_is_reloaded_before_use(swtpm: Swtpm, adapter: TpmAdapter) -> None:
    """Without a resource manager another client can flush the AK; its handle number is then reused
    by the next object the adapter loads, so the adapter must notice before it uses the handle."""
    key = adapter.create_bound_key({"sha256": [0]})
    ek_public, _ = TPM2B_PUBLIC.unmarshal(adapter.ek_public())
    for operation in ("certify", "activate", "quote"):
        tool(swtpm, "tpm2_flushcontext", "-t")
        assert transient_handles(swtpm) == []
        if operation == "certify":
            cert = adapter.certify(key, b"nonce")
            verify_tpm_signature(adapter.ak_public, cert.attest, cert.signature)
        elif operation == "activate":
            blob, enc = make_credential(ek_public, b"s" * 16, TPM2B_NAME(adapter.ak_name))
            assert adapter.activate_credential(bytes(blob.marshal()), bytes(enc.marshal())) == b"s" * 16
        else:
            q = adapter.quote(b"nonce", {"sha256": [0]})
            verify_tpm_signature(adapter.ak_public, q.attest, q.signature)
        assert len(transient_handles(swtpm)) == 1


@swtpm_test
def test_quote_is_never_signed_by_a_key_that_took_over_the_ak_handle(swtpm: Swtpm, adapter: TpmAdapter,
                                                                      tmp_path: Path) -> None:
    """Another client flushes everything and loads its own restricted signing key, which the TPM puts
    at the handle number the AK had: the stale handle now names a key that *can* quote."""
    (ak_handle,) = (int(h.strip("- "), 16) for h in transient_handles(swtpm))
    tool(swtpm, "tpm2_flushcontext", "-t")
    loaded: list[int] = []
    while ak_handle not in loaded:
        assert len(loaded) < 3
        attrs = "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda|restricted|sign"
        tool(swtpm, "tpm2_createprimary", "-Q", "-C", "o", "-G", "ecc256:ecdsa-sha256:null",
             "-c", "other.ctx", "-a", attrs, cwd=tmp_path)
        loaded = [int(h.strip("- "), 16) for h in transient_handles(swtpm)]
    for handle in loaded:
        if handle != ak_handle:
            tool(swtpm, "tpm2_flushcontext", hex(handle))
    assert [int(h.strip("- "), 16) for h in transient_handles(swtpm)] == [ak_handle]  # a foreign key now
    q = adapter.quote(b"nonce", {"sha256": [0]})
    verify_tpm_signature(adapter.ak_public, q.attest, q.signature)
    assert len(transient_handles(swtpm)) == 2
    tool(swtpm, "tpm2_flushcontext", "-t")


@swtpm_test
def test_attestation_keeps_working_in_dictionary_attack_lockout(swtpm: Swtpm, adapter: TpmAdapter,
                                                                tmp_path: Path) -> None:
    """Unclean power losses and failed authorizations lock DA-protected objects out; the AK (empty
    authValue, noDA) and the bound key (policy only) must stay usable."""
    key = adapter.create_bound_key({"sha256": [0]})
    ciphertext = oaep_wrap(key.public, b"k" * 32)
    tool(swtpm, "tpm2_createprimary", "-Q", "-C", "o", "-c", "p.ctx", cwd=tmp_path)
    tool(swtpm, "tpm2_flushcontext", "-t")
    tool(swtpm, "tpm2_create", "-Q", "-C", "p.ctx", "-p", "right", "-G", "ecc", "-u", "k.pub", "-r", "k.priv",
         cwd=tmp_path)
    tool(swtpm, "tpm2_flushcontext", "-t")
    tool(swtpm, "tpm2_load", "-Q", "-C", "p.ctx", "-u", "k.pub", "-r", "k.priv", "-c", "k.ctx", cwd=tmp_path)
    tool(swtpm, "tpm2_flushcontext", "-t")
    (tmp_path / "msg").write_bytes(b"x")
    for _ in range(4):
        tool(swtpm, "tpm2_sign", "-c", "k.ctx", "-p", "wrong", "-g", "sha256", "-o", "sig", "msg",
             cwd=tmp_path, check=False)
        tool(swtpm, "tpm2_flushcontext", "-t")
    assert re.search(r"inLockout:\s+1", tool(swtpm, "tpm2_getcap", "properties-variable").stdout)

    q = adapter.quote(b"nonce", {"sha256": [0]})
    verify_tpm_signature(adapter.ak_public, q.attest, q.signature)
    cert = adapter.certify(key, b"nonce")
    verify_tpm_signature(adapter.ak_public, cert.attest, cert.signature)
    assert adapter.unwrap(key, ciphertext) == b"k" * 32
    ek_public, _ = TPM2B_PUBLIC.unmarshal(adapter.ek_public())
    blob, enc = make_credential(ek_public, b"s" * 16, TPM2B_NAME(adapter.ak_name))
    assert adapter.activate_credential(bytes(blob.marshal()), bytes(enc.marshal())) == b"s" * 16


@swtpm_test
def test_no_transient_objects_or_sessions_leak(swtpm: Swtpm, state_dir: Path) -> None:
    with TpmAdapter(swtpm.tcti, state_dir) as a:
        for i in range(60):
            a.quote(i.to_bytes(4, "big"), SEL10)
        a.read_pcrs({"sha1": list(range(24)), "sha256": list(range(24))})
        ek_public, _ = TPM2B_PUBLIC.unmarshal(a.ek_public())
        for _ in range(5):
            blob, enc = make_credential(ek_public, b"s" * 16, TPM2B_NAME(a.ak_name))
            a.activate_credential(bytes(blob.marshal()), bytes(enc.marshal()))
        key = a.create_bound_key({"sha256": [16]})
        ciphertext = oaep_wrap(key.public, b"k" * 32)
        for _ in range(5):
            a.certify(key, b"nonce")
            a.unwrap(key, ciphertext)
        a.counter_define()
        a.counter_increment()
        # Failures must clean up too.
        with pytest.raises(TpmError):
            a.unwrap(key, oaep_wrap(key.public, b"k", b"other\x00"))
        blob, enc = make_credential(ek_public, b"s" * 16, TPM2B_NAME(b"\x00\x0b" + bytes(32)))
        with pytest.raises(TpmError):
            a.activate_credential(bytes(blob.marshal()), bytes(enc.marshal()))
        extend(swtpm, 16, b"changed")
        with pytest.raises(TpmError, match="policy check failed"):
            a.unwrap(key, ciphertext)
        assert len(transient_handles(swtpm)) == 1  # the AK, kept loaded on purpose
        assert loaded_sessions(swtpm) == []
    assert transient_handles(swtpm) == []
    assert loaded_sessions(swtpm) == []


@swtpm_test
def test_concurrent_quotes_from_threads(adapter: TpmAdapter, swtpm: Swtpm) -> None:
    results: list[tuple[bytes, bytes, bytes]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        try:
            for i in range(15):
                nonce = f"{n}-{i}".encode()
                q = adapter.quote(nonce, {"sha256": [0, 1, 2]})
                with lock:
                    results.append((nonce, q.attest, q.signature))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(results) == 60
    for nonce, attest, signature in results:
        verify_tpm_signature(adapter.ak_public, attest, signature)
        assert bytes(attest_info(attest).extraData) == nonce
    assert len(transient_handles(swtpm)) == 1


# ---------------------------------------------------------------------------------------------
# Configuration and input errors
# ---------------------------------------------------------------------------------------------
def test_connection_errors_are_tpm_errors(tmp_path: Path) -> None:
    from firmware_sim.procutil import free_port_pair

    port = free_port_pair()
    with pytest.raises(TpmError, match="cannot connect to the TPM") as err:
        TpmAdapter(f"swtpm:host=127.0.0.1,port={port}", tmp_path).open()
    assert err.value.rc is not None and "\n" not in err.value.diagnostics()
    with pytest.raises(TpmError, match="cannot connect"), TpmAdapter("no-such-tcti:foo", tmp_path) as a:
        a.quote(b"n", {"sha256": [0]})
    with pytest.raises(TpmError, match="cannot connect"):
        TpmAdapter("device:/dev/does-not-exist", tmp_path).read_pcrs({"sha256": [0]})


def test_configuration_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        TpmAdapter("", tmp_path)
    with pytest.raises(ConfigError):
        TpmAdapter("swtpm:port=1", tmp_path, ak_alg="dsa")
    with pytest.raises(ConfigError):
        TpmAdapter("swtpm:port=1", tmp_path, ek_alg="ecc521")
    with pytest.raises(ConfigError):
        TpmAdapter("swtpm:port=1", tmp_path, counter_index=0x01C00002)


@swtpm_test
def test_bad_inputs_and_closed_adapter(adapter: TpmAdapter) -> None:
    for nonce in (b"", b"x" * 65, "text"):
        with pytest.raises(MalformedInputError):
            adapter.quote(nonce, {"sha256": [0]})  # type: ignore[arg-type]
    bad_selections: list[Any] = [{}, {"md5": [0]}, {"sha256": [24]}, {"sha256": []}, {"sha256": [1, 1]},
                                 {"sha256": [True]}]
    for selection in bad_selections:
        with pytest.raises(MalformedInputError):
            adapter.read_pcrs(selection)
    with pytest.raises(ConfigError):
        adapter.ek_certificate("dsa")
    adapter.close()
    with pytest.raises(TpmError, match="closed"):
        adapter.quote(b"n", {"sha256": [0]})


# ---------------------------------------------------------------------------------------------
# Pure policy arithmetic (no TPM)
# ---------------------------------------------------------------------------------------------
def test_canonical_selection_orders_banks_by_algorithm_and_pcrs_ascending() -> None:
    sel = policy.canonical_selection({"sha256": [7, 0], "sha1": [3]})
    assert sel == (("sha1", (3,)), ("sha256", (0, 7)))
    assert policy.marshal_pcr_selection(sel) == TPML_PCR_SELECTION.parse("sha1:3+sha256:0,7").marshal()
    assert policy.selection_to_dict(sel) == {"sha1": [3], "sha256": [0, 7]}


def test_policy_formulas_match_the_spec_by_hand() -> None:
    sel = policy.canonical_selection({"sha256": [16]})
    values = {"sha256": {16: bytes(range(32))}}
    pcr_digest = hashlib.sha256(bytes(range(32))).digest()
    selection_bytes = bytes.fromhex("00000001" "000b" "03" "000001")
    after_pcr = hashlib.sha256(bytes(32) + bytes.fromhex("0000017f") + selection_bytes + pcr_digest).digest()
    decrypt = hashlib.sha256(after_pcr + bytes.fromhex("0000016c") + bytes.fromhex("00000159")).digest()
    certify = hashlib.sha256(bytes(32) + bytes.fromhex("0000016c") + bytes.fromhex("00000148")).digest()
    digest = hashlib.sha256(bytes(32) + bytes.fromhex("00000171") + decrypt + certify).digest()
    got = policy.bound_key_policy(sel, values)
    assert (got.decrypt_branch, got.certify_branch, got.digest) == (decrypt, certify, digest)
    with pytest.raises(MalformedInputError):
        policy.policy_or([decrypt])
