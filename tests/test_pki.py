"""fleet_server.pki: the fleet CA, the certificates it issues, CSR checks, and key files."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import stat
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fleet_server import pki
from fleet_server.pki import CertificateError, CertificateRequestError
from protocol.errors import ConfigError, SignatureError, VerificationError
from protocol.topics import TopicError

NOW = 1_800_000_000.0  # a fixed instant: validity is computed from the `now` passed in


@pytest.fixture(scope="module")
def ca() -> pki.FleetCA:
    return pki.create_ca(now=NOW)


def _p256() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _csr(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey,
         names: list[x509.NameAttribute], *, algorithm: hashes.SHA224 | hashes.SHA256 | None = None,
         extensions: tuple[x509.ExtensionType, ...] = ()) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(names))
    for ext in extensions:
        builder = builder.add_extension(ext, critical=False)
    alg = None if isinstance(key, ed25519.Ed25519PrivateKey) else (algorithm or hashes.SHA256())
    return builder.sign(key, alg).public_bytes(serialization.Encoding.PEM)


def _cn(value: str) -> x509.NameAttribute:
    return x509.NameAttribute(NameOID.COMMON_NAME, value)


def _load(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def _uris(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


def _eku(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


# -- the CA ----------------------------------------------------------------------------------------
def test_ca_is_a_p256_ca_certificate(ca: pki.FleetCA) -> None:
    cert = ca.cert
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert isinstance(ca.key.curve, ec.SECP256R1)
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca and basic.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    cert.verify_directly_issued_by(cert)  # self-signed
    assert cert.not_valid_before_utc < dt.datetime.fromtimestamp(NOW, dt.UTC) < cert.not_valid_after_utc


def test_ca_round_trips_through_pem(ca: pki.FleetCA) -> None:
    loaded = pki.load_ca(ca.cert_pem, ca.key_pem())
    assert loaded.cert == ca.cert
    assert loaded.key.private_numbers() == ca.key.private_numbers()


def test_load_ca_refuses_mismatched_key_and_non_ca(ca: pki.FleetCA) -> None:
    other = pki.create_ca(now=NOW)
    with pytest.raises(ConfigError, match="does not match"):
        pki.load_ca(ca.cert_pem, other.key_pem())
    leaf = pki.issue_server_client_cert(ca, now=NOW)
    with pytest.raises(ConfigError):
        pki.load_ca(leaf.cert_pem, leaf.key_pem)
    with pytest.raises(ConfigError):
        pki.load_ca(b"not pem", ca.key_pem())


def test_key_material_never_in_repr(ca: pki.FleetCA) -> None:
    cred = pki.issue_server_client_cert(ca, now=NOW)
    assert b"PRIVATE" not in repr(cred).encode() and "PRIVATE" not in repr(ca)
    assert str(ca.key.private_numbers().private_value) not in repr(ca)


# -- files -----------------------------------------------------------------------------------------
def test_ca_files_are_written_0600_and_loaded(tmp_path: Path, ca: pki.FleetCA) -> None:
    old = os.umask(0)  # even with a permissive umask the key must come out 0600
    try:
        pki.save_ca(ca, tmp_path / "ca.pem", tmp_path / "ca.key")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "ca.key").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "ca.pem").st_mode) == 0o644
    assert pki.load_ca_files(tmp_path / "ca.pem", tmp_path / "ca.key").cert == ca.cert


def test_load_ca_files_refuses_readable_key(tmp_path: Path, ca: pki.FleetCA) -> None:
    pki.save_ca(ca, tmp_path / "ca.pem", tmp_path / "ca.key")
    os.chmod(tmp_path / "ca.key", 0o640)
    with pytest.raises(ConfigError, match="0600"):
        pki.load_ca_files(tmp_path / "ca.pem", tmp_path / "ca.key")
    with pytest.raises(ConfigError):
        pki.load_ca_files(tmp_path / "ca.pem", tmp_path / "missing.key")


def test_private_key_replaced_atomically(tmp_path: Path, ca: pki.FleetCA) -> None:
    path = tmp_path / "k.key"
    path.write_bytes(b"old")
    os.chmod(path, 0o644)
    cred = pki.issue_claim_cert(ca, "dev-1", now=NOW)
    cert_path, key_path = pki.write_credential(tmp_path, "k", cred)
    assert key_path == path and path.read_bytes() == cred.key_pem
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert cert_path.read_bytes() == cred.cert_pem
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.key", "k.pem"]  # no temporary files left


# -- broker, server and claim certificates ---------------------------------------------------------
def test_broker_cert(ca: pki.FleetCA) -> None:
    cred = pki.issue_broker_cert(ca, now=NOW, dns_names=("broker.fleet.example",), ip_addresses=("10.0.0.5",))
    cert = _load(cred.cert_pem)
    cert.verify_directly_issued_by(ca.cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "broker.fleet.example"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address("127.0.0.1"),
                                                           ipaddress.ip_address("10.0.0.5")}
    assert _eku(cert) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    key = serialization.load_pem_private_key(cred.key_pem, None)
    assert key.public_key() == cert.public_key()
    with pytest.raises(ConfigError):
        pki.issue_broker_cert(ca, now=NOW, ip_addresses=("not-an-ip",))


def test_server_client_cert(ca: pki.FleetCA) -> None:
    cred = pki.issue_server_client_cert(ca, now=NOW)
    assert pki.verify_client_cert(ca.cert_pem, cred.cert_pem, now=NOW) == "fleet-server"


def test_claim_cert(ca: pki.FleetCA) -> None:
    cred = pki.issue_claim_cert(ca, "dev-7", now=NOW)
    cert = _load(cred.cert_pem)
    assert pki.common_name(cert) == "claim:dev-7"
    assert _uris(cert) == ["urn:edge-fleet:identity:claim:dev-7"]
    assert pki.verify_client_cert(ca.cert_pem, cred.cert_pem, now=NOW) == "claim:dev-7"
    assert cert.not_valid_after_utc == dt.datetime.fromtimestamp(NOW, dt.UTC) + pki.CLAIM_VALIDITY
    for bad in ("fleet-server", "Dev", "claim:dev-7", ""):
        with pytest.raises(TopicError):
            pki.issue_claim_cert(ca, bad, now=NOW)


# -- device CSRs -----------------------------------------------------------------------------------
def test_device_cert_from_csr(ca: pki.FleetCA) -> None:
    key = _p256()
    pem = pki.sign_device_csr(ca, pki.make_device_csr(key, "dev-1"), "dev-1", now=NOW)
    cert = _load(pem)
    assert pki.verify_client_cert(ca.cert_pem, pem, now=NOW) == "dev-1"  # chains to the CA
    cert.verify_directly_issued_by(ca.cert)
    assert cert.public_key() == key.public_key()  # the device's own key: it never left the device
    assert _eku(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert _uris(cert) == ["urn:edge-fleet:identity:dev-1"]
    start = dt.datetime.fromtimestamp(NOW, dt.UTC)
    assert cert.not_valid_before_utc == start - pki.CLOCK_SKEW
    assert cert.not_valid_after_utc == start + pki.DEVICE_VALIDITY


def test_device_cert_never_outlives_the_ca() -> None:
    short_ca = pki.create_ca(now=NOW, validity=dt.timedelta(days=10))
    pem = pki.sign_device_csr(short_ca, pki.make_device_csr(_p256(), "dev-1"), "dev-1", now=NOW,
                              validity=dt.timedelta(days=365))
    assert _load(pem).not_valid_after_utc == short_ca.cert.not_valid_after_utc
    with pytest.raises(ConfigError, match="expired"):
        pki.sign_device_csr(short_ca, pki.make_device_csr(_p256(), "dev-1"), "dev-1",
                            now=NOW + 11 * 86400)


def test_rsa_2048_csr_accepted(ca: pki.FleetCA) -> None:
    key = rsa.generate_private_key(65537, 2048)
    pem = pki.sign_device_csr(ca, pki.make_device_csr(key, "dev-rsa"), "dev-rsa", now=NOW)
    assert pki.verify_client_cert(ca.cert_pem, pem, now=NOW) == "dev-rsa"


def test_der_csr_accepted(ca: pki.FleetCA) -> None:
    csr = x509.load_pem_x509_csr(pki.make_device_csr(_p256(), "dev-1"))
    pem = pki.sign_device_csr(ca, csr.public_bytes(serialization.Encoding.DER), "dev-1", now=NOW)
    assert pki.common_name(_load(pem)) == "dev-1"


def test_csr_with_wrong_cn_refused(ca: pki.FleetCA) -> None:
    with pytest.raises(CertificateRequestError, match="does not match"):
        pki.sign_device_csr(ca, pki.make_device_csr(_p256(), "dev-2"), "dev-1", now=NOW)


@pytest.mark.parametrize("names", [
    [],
    [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dev-1")],
    [_cn("dev-1"), _cn("dev-2")],
    [_cn("claim:dev-1")],
    [_cn("fleet-server")],
    [_cn("DEV-1")],
])
def test_csr_subject_must_be_exactly_the_device_id(ca: pki.FleetCA, names: list[x509.NameAttribute]) -> None:
    with pytest.raises(CertificateRequestError):
        pki.sign_device_csr(ca, _csr(_p256(), names), "dev-1", now=NOW)


def test_reserved_or_invalid_expected_id_refused(ca: pki.FleetCA) -> None:
    for device_id in ("fleet-server", "claim:dev-1", "Dev-1"):
        with pytest.raises(TopicError):
            pki.sign_device_csr(ca, _csr(_p256(), [_cn(device_id)]), device_id, now=NOW)


@pytest.mark.parametrize("make_key", [
    lambda: ec.generate_private_key(ec.SECP384R1()),
    lambda: ec.generate_private_key(ec.SECP256K1()),
    lambda: rsa.generate_private_key(65537, 1024),
    lambda: rsa.generate_private_key(3, 2048),
    ed25519.Ed25519PrivateKey.generate,
], ids=["p384", "secp256k1", "rsa1024", "rsa-e3", "ed25519"])
def test_csr_key_types_refused(ca: pki.FleetCA, make_key: object) -> None:
    key = make_key()  # type: ignore[operator]
    with pytest.raises(CertificateRequestError):
        pki.sign_device_csr(ca, _csr(key, [_cn("dev-1")]), "dev-1", now=NOW)


def test_csr_signature_hash_outside_allowlist_refused(ca: pki.FleetCA) -> None:
    # SHA-224 is what OpenSSL 3 still signs with but the allowlist (SHA-256/384/512) excludes;
    # OpenSSL 3 refuses to create SHA-1 signatures at all, so it cannot be the example here.
    csr = _csr(_p256(), [_cn("dev-1")], algorithm=hashes.SHA224())
    with pytest.raises(CertificateRequestError, match="sha224"):
        pki.sign_device_csr(ca, csr, "dev-1", now=NOW)


def test_csr_with_bad_signature_refused(ca: pki.FleetCA) -> None:
    csr = x509.load_pem_x509_csr(pki.make_device_csr(_p256(), "dev-1"))
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # last byte of the ECDSA signature's s value
    with pytest.raises(CertificateRequestError, match="signature"):
        pki.sign_device_csr(ca, bytes(der), "dev-1", now=NOW)


def test_csr_requested_extensions_are_ignored(ca: pki.FleetCA) -> None:
    csr = _csr(_p256(), [_cn("dev-1")], extensions=(
        x509.BasicConstraints(ca=True, path_length=None),
        x509.SubjectAlternativeName([x509.DNSName("evil.example")]),
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
    ))
    cert = _load(pki.sign_device_csr(ca, csr, "dev-1", now=NOW))
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert _eku(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert _uris(cert) == ["urn:edge-fleet:identity:dev-1"]  # the requested DNS name was not copied
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == []


@pytest.mark.parametrize("blob", [b"", b"garbage", b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n"
                                  b"-----END CERTIFICATE REQUEST-----\n", b"0" * (pki.MAX_CSR_BYTES + 1)])
def test_malformed_csr_refused(ca: pki.FleetCA, blob: bytes) -> None:
    with pytest.raises(CertificateRequestError):
        pki.sign_device_csr(ca, blob, "dev-1", now=NOW)


def test_csr_errors_are_verification_errors() -> None:
    assert issubclass(CertificateRequestError, VerificationError)
    assert issubclass(CertificateError, VerificationError)


# -- verifying -------------------------------------------------------------------------------------
def test_verify_client_cert_refuses_other_ca_expired_and_server_certs(ca: pki.FleetCA) -> None:
    other = pki.create_ca(now=NOW)
    forged = pki.sign_device_csr(other, pki.make_device_csr(_p256(), "dev-1"), "dev-1", now=NOW)
    with pytest.raises((SignatureError, CertificateError)):
        pki.verify_client_cert(ca.cert_pem, forged, now=NOW)
    good = pki.sign_device_csr(ca, pki.make_device_csr(_p256(), "dev-1"), "dev-1", now=NOW)
    with pytest.raises(CertificateError, match="not valid"):
        pki.verify_client_cert(ca.cert_pem, good, now=NOW + pki.DEVICE_VALIDITY.total_seconds() + 1)
    with pytest.raises(CertificateError, match="not valid"):
        pki.verify_client_cert(ca.cert_pem, good, now=NOW - 3600)
    broker = pki.issue_broker_cert(ca, now=NOW)
    with pytest.raises(CertificateError, match="client"):
        pki.verify_client_cert(ca.cert_pem, broker.cert_pem, now=NOW)


def test_issued_certs_verify_with_a_standard_path_validator(ca: pki.FleetCA) -> None:
    """An RFC 5280 validator (cryptography's) accepts the chain: what OpenSSL in Mosquitto checks too."""
    from cryptography.x509.verification import PolicyBuilder, Store

    pem = pki.sign_device_csr(ca, pki.make_device_csr(_p256(), "dev-1"), "dev-1", now=NOW)
    verifier = (PolicyBuilder().store(Store([ca.cert])).time(dt.datetime.fromtimestamp(NOW, dt.UTC))
                .build_client_verifier())
    try:
        verified = verifier.verify(_load(pem), [])
    except Exception as exc:  # report what the validator disliked
        pytest.fail(f"path validation failed: {exc}")
    assert verified.chain[-1] == ca.cert
    broker = _load(pki.issue_broker_cert(ca, now=NOW).cert_pem)
    server_verifier = (PolicyBuilder().store(Store([ca.cert])).time(dt.datetime.fromtimestamp(NOW, dt.UTC))
                       .build_server_verifier(x509.IPAddress(ipaddress.ip_address("127.0.0.1"))))
    assert server_verifier.verify(broker, [])[-1] == ca.cert


def test_real_time_issue_is_valid_now(ca: pki.FleetCA) -> None:
    fresh = pki.create_ca(now=time.time())
    pem = pki.sign_device_csr(fresh, pki.make_device_csr(_p256(), "dev-1"), "dev-1", now=time.time())
    assert pki.verify_client_cert(fresh.cert_pem, pem, now=time.time()) == "dev-1"
