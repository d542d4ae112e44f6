"""check_enrollment_request with real swtpm identities, and the whole enrollment handshake.

The happy path and each refusal are driven from an ``enroll.request`` built the way the agent builds
it (EK certificate and public area, AK public area from the TPM adapter, CSR from fleet_server.pki).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import hmac
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from agent.tpm.adapter import TpmAdapter
from firmware_sim.bench.quote_bench import software_ak
from firmware_sim.manufacturer import ManufacturerCA
from firmware_sim.swtpm import Swtpm
from fleet_server.enrollment.credential import make_credential
from fleet_server.enrollment.ekcert import EkCertificateError, load_trust_bundle
from fleet_server.enrollment.request import AkError, check_enrollment_request, expected_proof
from fleet_server.pki import CertificateRequestError, make_device_csr
from protocol.errors import MessageError, TpmError, VerificationError
from protocol.messages import EnrollRequest, decode_plain, encode_plain, enroll_proof
from protocol.tpm.constants import Alg, ECCCurve
from protocol.tpm.structures import (
    EccParms,
    EccPoint,
    PublicArea,
    RsaParms,
    Scheme,
    SymDef,
    parse_tpm2b_public,
)

pytestmark = pytest.mark.swtpm

DEVICE = "cam-0001"


@dataclasses.dataclass(frozen=True)
class Identity:
    ek_certs: dict[str, bytes]
    ek_publics: dict[str, bytes]
    ak_public: bytes
    ak_name: bytes


def _identity(tpm: Swtpm, state: Path) -> Identity:
    with TpmAdapter(tpm.tcti, state) as a:
        return Identity(
            {k: a.ek_certificate(k) for k in ("rsa", "ecc")},
            {k: a.ek_public(k) for k in ("rsa", "ecc")},
            a.ak_public,
            a.ak_name,
        )


@pytest.fixture(scope="module")
def device(tmp_path_factory: pytest.TempPathFactory, manufacturer_ca: ManufacturerCA) -> Iterator[Identity]:
    base = tmp_path_factory.mktemp("enroll")
    tpm = Swtpm(base / "tpm")
    tpm.manufacture(manufacturer_ca)
    tpm.start()
    try:
        yield _identity(tpm, base / "state")
    finally:
        tpm.destroy()


@pytest.fixture(scope="module")
def bundle(manufacturer_ca: ManufacturerCA) -> tuple[x509.Certificate, ...]:
    return load_trust_bundle(manufacturer_ca.bundle.read_bytes())


def _csr(device_id: str = DEVICE, key: Any = None) -> bytes:
    pem = make_device_csr(key or ec.generate_private_key(ec.SECP256R1()), device_id)
    return x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER)


def _request(ident: Identity, kind: str = "rsa", **changes: Any) -> EnrollRequest:
    req = EnrollRequest(
        ek_cert=ident.ek_certs[kind],
        ek_public=ident.ek_publics[kind],
        ak_public=ident.ak_public,
        csr=_csr(),
        device_class="edge-camera",
        firmware_version="1.2.0",
    )
    return dataclasses.replace(req, **changes)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@pytest.mark.parametrize("kind", ["rsa", "ecc"])
def test_accepted_request(device: Identity, bundle: tuple[x509.Certificate, ...], kind: str) -> None:
    req = _request(device, kind)
    # The request survives the wire encoding the agent uses.
    wire = decode_plain(encode_plain(req, ts=1), allowed=[EnrollRequest]).message
    assert isinstance(wire, EnrollRequest)
    cand = check_enrollment_request(wire, device_id=DEVICE, trust_bundle=bundle, now=_now())
    assert cand.device_id == DEVICE
    assert cand.ek.fingerprint == hashlib.sha256(device.ek_certs[kind]).hexdigest()
    assert cand.ek.key_kind == kind
    assert cand.ek_public == parse_tpm2b_public(device.ek_publics[kind])
    assert cand.ak_name == device.ak_name == cand.ak.name
    assert cand.csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == DEVICE
    assert (cand.device_class, cand.firmware_version) == ("edge-camera", "1.2.0")


def _ak(**changes: Any) -> bytes:
    """A software AK public area with some fields changed."""
    _, raw = software_ak()
    public = dataclasses.replace(parse_tpm2b_public(raw), raw=b"", **changes)
    return public.marshal_tpm2b()


def _rsa_ak(bits: int) -> bytes:
    _, raw = software_ak()
    base = parse_tpm2b_public(raw)
    n = rsa.generate_private_key(public_exponent=65537, key_size=bits).public_key().public_numbers().n
    public = PublicArea(
        Alg.RSA,
        Alg.SHA256,
        base.object_attributes,
        b"",
        RsaParms(SymDef(), Scheme(Alg.RSASSA, Alg.SHA256), bits, 0),
        n.to_bytes(bits // 8, "big"),
    )
    return public.marshal_tpm2b()


def _p224_ak() -> bytes:
    key = ec.generate_private_key(ec.SECP224R1()).public_key().public_numbers()
    _, raw = software_ak()
    base = parse_tpm2b_public(raw)
    public = PublicArea(
        Alg.ECC,
        Alg.SHA256,
        base.object_attributes,
        b"",
        EccParms(SymDef(), Scheme(Alg.ECDSA, Alg.SHA256), ECCCurve.NIST_P224, Scheme()),
        EccPoint(key.x.to_bytes(28, "big"), key.y.to_bytes(28, "big")),
    )
    return public.marshal_tpm2b()


def _csr_with(cn: str, key: Any) -> bytes:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.DER)


REFUSED: list[tuple[str, Callable[[Identity], tuple[EnrollRequest, str]], type[Exception], str]] = [
    (
        "topic-id-differs-from-csr",
        lambda d: (_request(d), "cam-0002"),
        CertificateRequestError,
        "does not match device id 'cam-0002'",
    ),
    ("invalid-topic-id", lambda d: (_request(d), "Cam_1"), MessageError, "device id from the topic"),
    ("reserved-topic-id", lambda d: (_request(d), "fleet-server"), MessageError, "reserved"),
    (
        "ek-cert-garbage",
        lambda d: (_request(d, ek_cert=b"\x30" * 100), DEVICE),
        EkCertificateError,
        "not a valid X.509",
    ),
    (
        "ek-public-garbage",
        lambda d: (_request(d, ek_public=b"\x00\x10" + bytes(16)), DEVICE),
        MessageError,
        "enroll.request.ek_public",
    ),
    (
        "ek-public-of-other-kind",
        lambda d: (_request(d, ek_public=d.ek_publics["ecc"]), DEVICE),
        EkCertificateError,
        "holds another key than the EK certificate",
    ),
    (
        "ek-public-is-the-ak",
        lambda d: (_request(d, ek_public=d.ak_public), DEVICE),
        EkCertificateError,
        "not an endorsement key",
    ),
    (
        "ak-public-is-the-ek",
        lambda d: (_request(d, ak_public=d.ek_publics["rsa"]), DEVICE),
        VerificationError,
        "not an attestation key",
    ),
    (
        "ak-public-garbage",
        lambda d: (_request(d, ak_public=d.ak_public[:-3]), DEVICE),
        MessageError,
        "enroll.request.ak_public",
    ),
    (
        "ak-sha1-name",
        lambda d: (_request(d, ak_public=_ak(name_alg=Alg.SHA1)), DEVICE),
        AkError,
        "AK nameAlg SHA1 is too weak",
    ),
    (
        "ak-rsa-1024",
        lambda d: (_request(d, ak_public=_rsa_ak(1024)), DEVICE),
        AkError,
        "1024 bits is too small",
    ),
    (
        "ak-p224",
        lambda d: (_request(d, ak_public=_p224_ak()), DEVICE),
        AkError,
        "curve 0x0002 is not allowed",
    ),
    (
        "ak-not-restricted",
        lambda d: (_request(d, ak_public=_ak(object_attributes=0x40072)), DEVICE),
        VerificationError,
        "missing restricted",
    ),
    (
        "csr-garbage",
        lambda d: (_request(d, csr=b"\x30\x82" + bytes(80)), DEVICE),
        CertificateRequestError,
        "malformed CSR",
    ),
    (
        "csr-p384-key",
        lambda d: (_request(d, csr=_csr_with(DEVICE, ec.generate_private_key(ec.SECP384R1()))), DEVICE),
        CertificateRequestError,
        "P-256 only",
    ),
    (
        "csr-two-cns",
        lambda d: (
            _request(
                d,
                csr=x509.CertificateSigningRequestBuilder()
                .subject_name(
                    x509.Name(
                        [
                            x509.NameAttribute(NameOID.COMMON_NAME, DEVICE),
                            x509.NameAttribute(NameOID.COMMON_NAME, "cam-0002"),
                        ]
                    )
                )
                .sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256())
                .public_bytes(serialization.Encoding.DER),
            ),
            DEVICE,
        ),
        CertificateRequestError,
        "exactly one CN",
    ),
    (
        "bad-device-class",
        lambda d: (_request(d, device_class="edge camera"), DEVICE),
        MessageError,
        "enroll.request.device_class",
    ),
    (
        "bad-firmware-version",
        lambda d: (_request(d, firmware_version=""), DEVICE),
        MessageError,
        "enroll.request.firmware_version",
    ),
]


@pytest.mark.parametrize(
    ("make", "error", "message"), [(m, e, msg) for _, m, e, msg in REFUSED], ids=[r[0] for r in REFUSED]
)
def test_refused(
    device: Identity,
    bundle: tuple[x509.Certificate, ...],
    make: Callable[[Identity], tuple[EnrollRequest, str]],
    error: type[Exception],
    message: str,
) -> None:
    req, device_id = make(device)
    with pytest.raises(error, match=message) as info:
        check_enrollment_request(req, device_id=device_id, trust_bundle=bundle, now=_now())
    # Every refusal is one of the two kinds the service distinguishes.
    assert isinstance(info.value, VerificationError | MessageError)


def test_ek_certificate_outside_its_validity(device: Identity, bundle: tuple[x509.Certificate, ...]) -> None:
    long_ago = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
    with pytest.raises(EkCertificateError, match="not valid before"):
        check_enrollment_request(_request(device), device_id=DEVICE, trust_bundle=bundle, now=long_ago)


def test_ek_from_an_unknown_manufacturer(
    device: Identity, bundle: tuple[x509.Certificate, ...], tmp_path: Path, make_swtpm: Callable[..., Swtpm]
) -> None:
    other = ManufacturerCA.load_or_create(tmp_path / "other-ca", name="Other Vendor TPM")
    other_bundle = load_trust_bundle(other.bundle.read_bytes())  # a server trusting only the other vendor
    with pytest.raises(EkCertificateError, match="is not a trusted TPM manufacturer CA"):
        check_enrollment_request(_request(device), device_id=DEVICE, trust_bundle=other_bundle, now=_now())
    # ...and a TPM of that vendor is refused by a server trusting only the first one.
    rogue = _identity(make_swtpm("rogue", other), tmp_path / "rogue")
    with pytest.raises(EkCertificateError, match=r"Other Vendor TPM EK Issuing CA.* is not a trusted"):
        check_enrollment_request(_request(rogue), device_id=DEVICE, trust_bundle=bundle, now=_now())


def test_expected_proof() -> None:
    secret, rid = secrets.token_bytes(32), secrets.token_hex(16)
    proof = expected_proof(secret, rid)
    assert proof == enroll_proof(secret, rid)
    assert proof == hmac.new(secret, b"edge-attest/enroll-proof/v1" + rid.encode(), "sha256").digest()
    assert expected_proof(secret, secrets.token_hex(16)) != proof


def test_enrollment_handshake_end_to_end(
    swtpm: Swtpm, tmp_path: Path, bundle: tuple[x509.Certificate, ...]
) -> None:
    """enroll.request -> checks -> MakeCredential -> TPM2_ActivateCredential -> enroll.proof."""
    with TpmAdapter(swtpm.tcti, tmp_path / "state") as tpm:
        req = EnrollRequest(
            ek_cert=tpm.ek_certificate(),
            ek_public=tpm.ek_public(),
            ak_public=tpm.ak_public,
            csr=_csr(),
            device_class="edge-camera",
            firmware_version="1.2.0",
        )
        cand = check_enrollment_request(req, device_id=DEVICE, trust_bundle=bundle, now=_now())
        secret, rid = secrets.token_bytes(32), secrets.token_hex(16)
        blob, enc = make_credential(cand.ek_public, cand.ak_name, secret)
        stored = hashlib.sha256(expected_proof(secret, rid)).digest()  # what the server keeps
        proof = enroll_proof(tpm.activate_credential(blob, enc), rid)  # what the device sends
        assert hmac.compare_digest(hashlib.sha256(proof).digest(), stored)


def test_ak_from_another_tpm_cannot_complete_enrollment(
    make_swtpm: Callable[[str], Swtpm], tmp_path: Path, bundle: tuple[x509.Certificate, ...]
) -> None:
    """A request pairing TPM A's certified EK with TPM B's AK passes the static checks (nothing in the
    bytes links them) but neither TPM can activate the credential: A's EK can decrypt the seed but A has
    no key with B's AK name; B holds the AK but not A's EK."""
    tpm_a, tpm_b = make_swtpm("a"), make_swtpm("b")
    with TpmAdapter(tpm_a.tcti, tmp_path / "a") as a, TpmAdapter(tpm_b.tcti, tmp_path / "b") as b:
        req = EnrollRequest(
            ek_cert=a.ek_certificate(),
            ek_public=a.ek_public(),
            ak_public=b.ak_public,
            csr=_csr(),
            device_class="edge-camera",
            firmware_version="1.2.0",
        )
        cand = check_enrollment_request(req, device_id=DEVICE, trust_bundle=bundle, now=_now())
        assert cand.ak_name == b.ak_name != a.ak_name
        blob, enc = make_credential(cand.ek_public, cand.ak_name, secrets.token_bytes(32))
        with pytest.raises(TpmError):
            a.activate_credential(blob, enc)
        with pytest.raises(TpmError):
            b.activate_credential(blob, enc)
