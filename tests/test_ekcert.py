"""EK certificate chain validation and EK public area checks.

Real EK certificates come from swtpm (issued by the test manufacturer CA through swtpm_localca, with
the critical directoryName SAN and the subjectDirectoryAttributes extension real EK certificates
carry); the failure cases use chains built here with ``cryptography`` (and one with ``openssl`` for a
SHA-1 signature, which ``cryptography`` will not produce).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from agent.tpm.adapter import TpmAdapter
from firmware_sim.manufacturer import ManufacturerCA
from firmware_sim.swtpm import Swtpm
from fleet_server.enrollment.ekcert import (
    EkCertificateError,
    check_ek_public_matches,
    load_trust_bundle,
    verify_ek_certificate,
)
from protocol.errors import ConfigError, SignatureError
from protocol.tpm.constants import ObjectAttr
from protocol.tpm.structures import PublicArea, parse_tpm2b_public

NOW = dt.datetime(2027, 6, 1, tzinfo=dt.UTC)


# ---------------------------------------------------------------------------------------------
# synthetic PKI
# ---------------------------------------------------------------------------------------------
def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Test TPM Vendor"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _cert(
    subject: str,
    key: Any,
    issuer: str | None = None,
    issuer_key: Any = None,
    *,
    ca: bool = True,
    path_length: int | None = None,
    key_cert_sign: bool = True,
    start: dt.datetime = NOW - dt.timedelta(days=30),
    end: dt.datetime = NOW + dt.timedelta(days=30),
    extra: list[tuple[x509.ExtensionType, bool]] | None = None,
    basic: bool = True,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer or subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
    )
    if basic:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), critical=True
        )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=key_cert_sign,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    for ext, critical in extra or []:
        builder = builder.add_extension(ext, critical=critical)
    return builder.sign(issuer_key or key, hashes.SHA256())


@dataclasses.dataclass
class Pki:
    root_key: ec.EllipticCurvePrivateKey
    root: x509.Certificate
    issuer_key: rsa.RSAPrivateKey
    issuer: x509.Certificate
    ek_key: rsa.RSAPrivateKey

    @property
    def bundle(self) -> tuple[x509.Certificate, ...]:
        return (self.root, self.issuer)

    def ek(self, **kwargs: Any) -> bytes:
        return _cert("ek", self.ek_key, "issuing", self.issuer_key, ca=False, **kwargs).public_bytes(
            serialization.Encoding.DER
        )


@pytest.fixture(scope="module")
def pki() -> Pki:
    root_key = ec.generate_private_key(ec.SECP256R1())
    issuer_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    root = _cert("root", root_key, path_length=1)
    issuer = _cert("issuing", issuer_key, "root", root_key, path_length=0)
    return Pki(
        root_key, root, issuer_key, issuer, rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


# ---------------------------------------------------------------------------------------------
# synthetic chains: what passes and what fails
# ---------------------------------------------------------------------------------------------
def test_synthetic_chain_verifies(pki: Pki) -> None:
    der = pki.ek()
    ident = verify_ek_certificate(der, pki.bundle, now=NOW)
    assert ident.fingerprint == hashlib.sha256(der).hexdigest()
    assert ident.key_kind == "rsa"
    assert ident.subject == "CN=ek,O=Test TPM Vendor"
    assert ident.issuer == "CN=issuing,O=Test TPM Vendor"
    assert ident.chain == ("CN=issuing,O=Test TPM Vendor", "CN=root,O=Test TPM Vendor")
    assert ident.serial == x509.load_der_x509_certificate(der).serial_number
    assert isinstance(ident.public_key, rsa.RSAPublicKey)
    assert ident.public_key.public_numbers() == pki.ek_key.public_key().public_numbers()
    # The bundle order does not matter, nor do unrelated CAs in it.
    other = _cert("unrelated", ec.generate_private_key(ec.SECP256R1()))
    assert verify_ek_certificate(der, (other, pki.issuer, pki.root), now=NOW) == ident


def _rollover(pki: Pki) -> tuple[tuple[x509.Certificate, ...], bytes]:
    """A second issuing CA with the same name (key rollover): both in the bundle, EK from the new one."""
    new_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    new_issuer = _cert("issuing", new_key, "root", pki.root_key, path_length=0)
    der = _cert("ek", pki.ek_key, "issuing", new_key, ca=False).public_bytes(serialization.Encoding.DER)
    return (pki.root, pki.issuer, new_issuer), der


def test_every_ca_of_the_issuer_name_is_tried(pki: Pki) -> None:
    bundle, der = _rollover(pki)
    assert verify_ek_certificate(der, bundle, now=NOW).key_kind == "rsa"


def _case_unknown_issuer(pki: Pki) -> tuple[bytes, tuple[x509.Certificate, ...]]:
    return pki.ek(), (pki.root,)


def _case_missing_root(pki: Pki) -> tuple[bytes, tuple[x509.Certificate, ...]]:
    return pki.ek(), (pki.issuer,)


def _case_expired(pki: Pki) -> tuple[bytes, tuple[x509.Certificate, ...]]:
    return pki.ek(end=NOW - dt.timedelta(seconds=1)), pki.bundle


def _case_not_yet_valid(pki: Pki) -> tuple[bytes, tuple[x509.Certificate, ...]]:
    return pki.ek(start=NOW + dt.timedelta(hours=1)), pki.bundle


def _case_expired_issuer(pki: Pki) -> tuple[bytes, tuple[x509.Certificate, ...]]:
    issuer = _cert(
        "issuing",
        pki.issuer_key,
        "root",
        pki.root_key,
        path_length=0,
        start=NOW - dt.timedelta(days=10),
        end=NOW - dt.timedelta(days=1),
    )
    return pki.ek(), (pki.root, issuer)


def _case_expired_root(pki: Pki) -> tuple[bytes, tuple[x509.Certificate, ...]]:
    root = _cert("root", pki.root_key, path_length=1, end=NOW - dt.timedelta(days=1))
    return pki.ek(), (root, pki.issuer)


def _case_issuer_not_ca(pki: Pki) -> tuple[bytes, tuple[x509.Certificate, ...]]:
    issuer = _cert("issuing", pki.issuer_key, "root", pki.root_key, ca=False)
    return pki.ek(), (pki.root, issuer)


def _case_issuer_without_basic_constraints(pki: Pki) -> tuple[bytes, tuple[x509.Certificate, ...]]:
    issuer = _cert("issuing", pki.issuer_key, "root", pki.root_key, basic=False)
    return pki.ek(), (pki.root, issuer)


def _case_issuer_without_key_cert_sign(pki: Pki) -> tuple[bytes, tuple[x509.Certificate, ...]]:
    issuer = _cert("issuing", pki.issuer_key, "root", pki.root_key, path_length=0, key_cert_sign=False)
    return pki.ek(), (pki.root, issuer)


def _case_path_length(pki: Pki) -> tuple[bytes, tuple[x509.Certificate, ...]]:
    root = _cert("root", pki.root_key, path_length=0)  # no intermediate allowed below the root
    return pki.ek(), (root, pki.issuer)


def _case_leaf_is_ca(pki: Pki) -> tuple[bytes, tuple[x509.Certificate, ...]]:
    der = _cert("ek", pki.ek_key, "issuing", pki.issuer_key, ca=True).public_bytes(serialization.Encoding.DER)
    return der, pki.bundle


def _case_unknown_critical_extension(pki: Pki) -> tuple[bytes, tuple[x509.Certificate, ...]]:
    ext = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.55555.1"), b"\x05\x00")
    return pki.ek(extra=[(ext, True)]), pki.bundle


def _case_forged_same_name(pki: Pki) -> tuple[bytes, tuple[x509.Certificate, ...]]:
    rogue_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    der = _cert("ek", pki.ek_key, "issuing", rogue_key, ca=False).public_bytes(serialization.Encoding.DER)
    return der, pki.bundle


def _case_garbage(pki: Pki) -> tuple[bytes, tuple[x509.Certificate, ...]]:
    return b"\x30\x03\x02\x01\x00", pki.bundle


def _case_empty(pki: Pki) -> tuple[bytes, tuple[x509.Certificate, ...]]:
    return b"", pki.bundle


def _case_cycle(pki: Pki) -> tuple[bytes, tuple[x509.Certificate, ...]]:
    """Two CAs that issued each other and no root: the walk must stop."""
    a_key = ec.generate_private_key(ec.SECP256R1())
    b_key = ec.generate_private_key(ec.SECP256R1())
    a = _cert("ca-a", a_key, "ca-b", b_key)
    b = _cert("ca-b", b_key, "ca-a", a_key)
    der = _cert("ek", pki.ek_key, "ca-a", a_key, ca=False).public_bytes(serialization.Encoding.DER)
    return der, (a, b)


CASES: list[tuple[Callable[[Pki], tuple[bytes, tuple[x509.Certificate, ...]]], type[Exception], str]] = [
    (
        _case_unknown_issuer,
        EkCertificateError,
        "EK certificate issuer CN=issuing,O=Test TPM Vendor is not a trusted TPM manufacturer CA",
    ),
    (
        _case_missing_root,
        EkCertificateError,
        "issued by CN=root,O=Test TPM Vendor, which is not in the trusted",
    ),
    (_case_expired, EkCertificateError, "EK certificate expired at"),
    (_case_not_yet_valid, EkCertificateError, "EK certificate is not valid before"),
    (_case_expired_issuer, EkCertificateError, "CA certificate CN=issuing,O=Test TPM Vendor expired at"),
    (_case_expired_root, EkCertificateError, "CA certificate CN=root,O=Test TPM Vendor expired at"),
    (_case_issuer_not_ca, EkCertificateError, "is not a CA certificate"),
    (_case_issuer_without_basic_constraints, EkCertificateError, "is not a CA certificate"),
    (_case_issuer_without_key_cert_sign, EkCertificateError, "lacks keyCertSign"),
    (_case_path_length, EkCertificateError, "allows 0 intermediate CA(s) below it, the chain has 1"),
    (_case_leaf_is_ca, EkCertificateError, "EK certificate is a CA certificate"),
    (
        _case_unknown_critical_extension,
        EkCertificateError,
        "unrecognized critical extension 1.3.6.1.4.1.55555.1",
    ),
    (_case_forged_same_name, SignatureError, "signature does not verify with the key of the trusted CA"),
    (_case_garbage, EkCertificateError, "not a valid X.509 DER certificate"),
    (_case_empty, EkCertificateError, "must be 1..8192 bytes"),
    (_case_cycle, EkCertificateError, "longer than 5 certificates"),
]


@pytest.mark.parametrize(("case", "error", "message"), CASES, ids=[c[0].__name__[6:] for c in CASES])
def test_chain_refused(
    pki: Pki,
    case: Callable[[Pki], tuple[bytes, tuple[x509.Certificate, ...]]],
    error: type[Exception],
    message: str,
) -> None:
    der, bundle = case(pki)
    with pytest.raises(error) as info:
        verify_ek_certificate(der, bundle, now=NOW)
    assert message in str(info.value)


def test_sha1_signed_ek_certificate_is_refused(pki: Pki, tmp_path: Path) -> None:
    # cryptography cannot sign with SHA-1; openssl can (as old vendor CAs did).
    (tmp_path / "ca.pem").write_bytes(_pem(pki.issuer))
    (tmp_path / "ca.key").write_bytes(
        pki.issuer_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    csr = x509.CertificateSigningRequestBuilder().subject_name(_name("ek")).sign(pki.ek_key, hashes.SHA256())
    (tmp_path / "ek.csr").write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    res = subprocess.run(
        [
            "openssl",
            "x509",
            "-req",
            "-sha1",
            "-in",
            "ek.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-set_serial",
            "7",
            "-days",
            "3650",
            "-outform",
            "DER",
            "-out",
            "ek.der",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    der = (tmp_path / "ek.der").read_bytes()
    now = dt.datetime.now(dt.UTC)
    with pytest.raises(EkCertificateError, match="signed with SHA1, which is not accepted"):
        verify_ek_certificate(der, pki.bundle, now=max(now, NOW - dt.timedelta(days=1)))


def test_now_must_be_timezone_aware(pki: Pki) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        verify_ek_certificate(pki.ek(), pki.bundle, now=NOW.replace(tzinfo=None))


def test_validity_is_judged_at_now_in_any_timezone(pki: Pki) -> None:
    der = pki.ek(end=NOW + dt.timedelta(minutes=30))
    in_tokyo = NOW.astimezone(dt.timezone(dt.timedelta(hours=9)))
    assert verify_ek_certificate(der, pki.bundle, now=in_tokyo).key_kind == "rsa"
    with pytest.raises(EkCertificateError, match="expired"):
        verify_ek_certificate(der, pki.bundle, now=in_tokyo + dt.timedelta(hours=1))


# ---------------------------------------------------------------------------------------------
# trust bundle
# ---------------------------------------------------------------------------------------------
def test_load_trust_bundle(pki: Pki) -> None:
    assert load_trust_bundle(_pem(pki.root, pki.issuer)) == (pki.root, pki.issuer)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: b"", "holds no certificate"),
        (lambda p: b"not pem at all", "holds no certificate|not a PEM"),
        (
            lambda p: b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            "not a PEM certificate",
        ),
        (lambda p: _pem(p.issuer), "no self-signed root"),
        (lambda p: _pem(p.root, x509.load_der_x509_certificate(p.ek())), "is not a CA certificate"),
    ],
)
def test_load_trust_bundle_refuses(pki: Pki, make: Callable[[Pki], bytes], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_trust_bundle(make(pki))


# ---------------------------------------------------------------------------------------------
# real swtpm EK certificates and public areas
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RealEk:
    bundle_pem: bytes
    certs: dict[str, bytes]
    publics: dict[str, bytes]
    ak_public: bytes


def _read_ek(tpm: Swtpm, state: Path) -> tuple[dict[str, bytes], dict[str, bytes], bytes]:
    with TpmAdapter(tpm.tcti, state) as adapter:
        certs = {alg: adapter.ek_certificate(alg) for alg in ("rsa", "ecc")}
        publics = {alg: adapter.ek_public(alg) for alg in ("rsa", "ecc")}
        return certs, publics, adapter.ak_public


@pytest.fixture(scope="module")
def real_ek(tmp_path_factory: pytest.TempPathFactory, manufacturer_ca: ManufacturerCA) -> Iterator[RealEk]:
    base = tmp_path_factory.mktemp("ekcert")
    tpm = Swtpm(base / "tpm")
    tpm.manufacture(manufacturer_ca)
    tpm.start()
    try:
        certs, publics, ak = _read_ek(tpm, base / "state")
    finally:
        tpm.destroy()
    yield RealEk(manufacturer_ca.bundle.read_bytes(), certs, publics, ak)


@pytest.mark.swtpm
@pytest.mark.parametrize(("alg", "key_type"), [("rsa", rsa.RSAPublicKey), ("ecc", ec.EllipticCurvePublicKey)])
def test_swtpm_ek_certificates_verify(real_ek: RealEk, alg: str, key_type: type) -> None:
    bundle = load_trust_bundle(real_ek.bundle_pem)
    der = real_ek.certs[alg]
    ident = verify_ek_certificate(der, bundle, now=dt.datetime.now(dt.UTC))
    assert ident.key_kind == alg
    assert isinstance(ident.public_key, key_type)
    assert ident.fingerprint == hashlib.sha256(der).hexdigest()
    assert ident.issuer == "CN=EdgeSim TPM EK Issuing CA,O=EdgeSim TPM Manufacturing"
    assert ident.chain[-1] == "CN=EdgeSim TPM Root CA,O=EdgeSim TPM Manufacturing"
    # The certificate has what real EK certificates have: a critical directoryName SAN with the TCG
    # TPM attributes and a subjectDirectoryAttributes extension cryptography does not parse.
    cert = ident.certificate
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical and san.value.get_values_for_type(x509.DirectoryName)
    assert any(isinstance(e.value, x509.UnrecognizedExtension) for e in cert.extensions)
    check_ek_public_matches(ident, parse_tpm2b_public(real_ek.publics[alg]))
    check_ek_public_matches(cert, parse_tpm2b_public(real_ek.publics[alg]))


@pytest.mark.swtpm
def test_swtpm_ek_certificate_from_another_manufacturer_is_refused(
    real_ek: RealEk, tmp_path: Path, make_swtpm: Callable[..., Swtpm]
) -> None:
    bundle = load_trust_bundle(real_ek.bundle_pem)
    rogue = ManufacturerCA.load_or_create(tmp_path / "rogue-ca", name="Rogue TPM")
    certs, _, _ = _read_ek(make_swtpm("rogue", rogue), tmp_path / "rogue-state")
    with pytest.raises(
        EkCertificateError,
        match=r"EK certificate issuer CN=Rogue TPM EK Issuing CA,"
        r"O=EdgeSim TPM Manufacturing is not a trusted TPM "
        r"manufacturer CA",
    ):
        verify_ek_certificate(certs["rsa"], bundle, now=dt.datetime.now(dt.UTC))
    # A CA that copies the trusted CA's names cannot pass either: the signature gives it away.
    copycat = ManufacturerCA.load_or_create(tmp_path / "copycat-ca")
    certs, _, _ = _read_ek(make_swtpm("copycat", copycat), tmp_path / "copycat-state")
    with pytest.raises(SignatureError, match="does not verify"):
        verify_ek_certificate(certs["ecc"], bundle, now=dt.datetime.now(dt.UTC))


def _with_attributes(public: PublicArea, attributes: int) -> PublicArea:
    return dataclasses.replace(public, object_attributes=attributes, raw=b"")


@pytest.mark.swtpm
@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p: _with_attributes(p, p.object_attributes & ~ObjectAttr.RESTRICTED), "missing restricted"),
        (lambda p: _with_attributes(p, p.object_attributes & ~ObjectAttr.DECRYPT), "missing decrypt"),
        (lambda p: _with_attributes(p, p.object_attributes & ~ObjectAttr.FIXED_TPM), "missing fixedTPM"),
        (
            lambda p: _with_attributes(p, p.object_attributes & ~ObjectAttr.FIXED_PARENT),
            "missing fixedParent",
        ),
        (lambda p: _with_attributes(p, p.object_attributes | ObjectAttr.SIGN_ENCRYPT), "sign is set"),
        (
            lambda p: dataclasses.replace(
                p,
                parameters=dataclasses.replace(
                    p.parameters, symmetric=dataclasses.replace(p.parameters.symmetric, algorithm=0x0010)
                ),
                raw=b"",
            ),
            "no symmetric algorithm",
        ),
        (
            lambda p: dataclasses.replace(p, unique=bytes(reversed(p.unique)), raw=b""),
            "holds another key than the EK certificate",
        ),
    ],
)
def test_ek_public_must_be_a_real_ek_with_the_certified_key(
    real_ek: RealEk, change: Callable[[Any], PublicArea], message: str
) -> None:
    cert = x509.load_der_x509_certificate(real_ek.certs["rsa"])
    public = parse_tpm2b_public(real_ek.publics["rsa"])
    check_ek_public_matches(cert, public)  # the unchanged one passes
    with pytest.raises(EkCertificateError, match=message):
        check_ek_public_matches(cert, change(public))


@pytest.mark.swtpm
def test_ek_public_of_the_other_kind_or_an_ak_is_refused(real_ek: RealEk) -> None:
    rsa_cert = x509.load_der_x509_certificate(real_ek.certs["rsa"])
    with pytest.raises(EkCertificateError, match="holds another key"):
        check_ek_public_matches(rsa_cert, parse_tpm2b_public(real_ek.publics["ecc"]))
    with pytest.raises(EkCertificateError, match=r"missing restricted|missing decrypt"):
        check_ek_public_matches(rsa_cert, parse_tpm2b_public(real_ek.ak_public))
