"""The fleet CA: the certificates of the MQTT transport (broker, fleet server, devices).

One ECDSA P-256 CA issues

* the broker's TLS server certificate (SAN IP ``127.0.0.1``, DNS ``localhost`` and configured names),
* the fleet server's MQTT client certificate (CN ``fleet-server``),
* per-device *claim* (bootstrap) certificates, CN ``claim:<device_id>``, used only to enroll,
* per-device *operational* certificates, CN ``<device_id>``, issued from a CSR the device sends at
  enrollment so that its TLS private key never leaves it.

The broker uses the CN as the MQTT username (Mosquitto ``use_identity_as_username``) and its ACL
confines each username to its own topics (see :mod:`protocol.topics`), so *what CN this CA signs*
is the access-control decision.  That is why :func:`sign_device_csr` fails closed on anything
unexpected and never copies names or extensions from the request.

The core is pure: CA objects and PEM bytes in, PEM bytes out, the time passed in as ``now`` (Unix
seconds).  The file helpers at the end write private keys 0600 atomically (temporary file +
``os.replace``) and refuse to load a CA key that others can read.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import stat
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from protocol.errors import ConfigError, SignatureError, VerificationError
from protocol.topics import SERVER_IDENTITY, claim_identity, validate_device_id

ORGANIZATION = "Edge Fleet"
CA_VALIDITY = dt.timedelta(days=3650)
BROKER_VALIDITY = dt.timedelta(days=825)
SERVER_VALIDITY = dt.timedelta(days=825)
CLAIM_VALIDITY = dt.timedelta(days=30)
DEVICE_VALIDITY = dt.timedelta(days=365)
CLOCK_SKEW = dt.timedelta(minutes=5)
CRL_VALIDITY = dt.timedelta(days=30)
"""How long a CRL is current (``nextUpdate``): it is re-issued on every revocation and approval, and
must be re-issued before then (``fleet-server run`` does, see ``server.crl_lifetime``): OpenSSL refuses
an expired CRL."""
"""Certificates start this long before ``now`` so that peers with slightly late clocks accept them."""

IDENTITY_URI_PREFIX = "urn:edge-fleet:identity:"
"""Client certificates carry their identity twice: as the CN (which Mosquitto's
``use_identity_as_username`` uses) and as a URI SAN ``urn:edge-fleet:identity:<CN>`` so that
RFC 5280/6125 verifiers that ignore the CN (and require a SAN) see the same identity."""

MAX_CSR_BYTES = 16 * 1024
"""A CSR is a few hundred bytes; anything much larger is refused before parsing."""

RSA_MIN_BITS = 2048
RSA_MAX_BITS = 8192
ALLOWED_CSR_HASHES = (hashes.SHA256, hashes.SHA384, hashes.SHA512)


class CertificateRequestError(VerificationError):
    """A certificate signing request was refused (malformed, bad signature, wrong name or key)."""


class CertificateError(VerificationError):
    """A certificate does not chain to the fleet CA, is outside its validity, or has the wrong use."""


# -- values ----------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class FleetCA:
    """The fleet CA's certificate and private key (ECDSA P-256)."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM (a method, not a property, to make copies explicit)."""
        return private_key_pem(self.key)

    def __repr__(self) -> str:  # never print key material
        return f"FleetCA(subject={self.cert.subject.rfc4514_string()!r})"


@dataclass(frozen=True, slots=True)
class IssuedCredential:
    """A certificate and the private key generated for it, both PEM."""

    cert_pem: bytes
    key_pem: bytes

    def __repr__(self) -> str:  # never print key material
        return f"IssuedCredential(cert={len(self.cert_pem)} bytes PEM, key=<redacted>)"


# -- helpers ---------------------------------------------------------------------------------------
def _utc(now: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(now, dt.UTC)


def _name(common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def private_key_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    """``key`` as unencrypted PKCS#8 PEM (for files written with :func:`write_private_key`)."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _validity(ca: FleetCA, now: float, validity: dt.timedelta) -> tuple[dt.datetime, dt.datetime]:
    if validity <= dt.timedelta(0):
        raise ConfigError("certificate validity must be positive")
    start = _utc(now)
    ca_end = ca.cert.not_valid_after_utc
    if start >= ca_end:
        raise ConfigError("the fleet CA certificate has expired")
    # A certificate never outlives its issuer (RFC 5280 path validation would reject it anyway).
    return start - CLOCK_SKEW, min(start + validity, ca_end)


def _leaf(ca: FleetCA, subject: x509.Name, public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
          *, now: float, validity: dt.timedelta, eku: x509.ObjectIdentifier,
          san: Sequence[x509.GeneralName] = ()) -> x509.Certificate:
    not_before, not_after = _validity(ca, now, validity)
    # RFC 5280 4.2.1.3: ECDSA keys sign (digitalSignature); RSA client keys may also need
    # keyEncipherment for TLS 1.2 RSA key transport, which only matters on the server side.
    is_rsa = isinstance(public_key, rsa.RSAPublicKey)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=is_rsa, data_encipherment=False, key_agreement=False,
                                     key_cert_sign=False, crl_sign=False, encipher_only=False,
                                     decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
                       critical=False)
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(san)), critical=False)
    return builder.sign(ca.key, hashes.SHA256())


def _client_san(identity: str) -> list[x509.GeneralName]:
    return [x509.UniformResourceIdentifier(IDENTITY_URI_PREFIX + identity)]


def _credential(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> IssuedCredential:
    return IssuedCredential(cert.public_bytes(serialization.Encoding.PEM), private_key_pem(key))


def common_name(cert: x509.Certificate) -> str:
    """The single CN of ``cert``'s subject; :class:`CertificateError` if there is none or several."""
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1 or not isinstance(cns[0].value, str):
        raise CertificateError("certificate subject must have exactly one common name")
    return cns[0].value


# -- the CA ----------------------------------------------------------------------------------------
def create_ca(*, now: float, common_name: str = "Edge Fleet CA",
              validity: dt.timedelta = CA_VALIDITY) -> FleetCA:
    """Create a new fleet CA (ECDSA P-256, self-signed, may sign end-entity certificates only)."""
    key = _new_key()
    name = _name(common_name)
    start = _utc(now)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - CLOCK_SKEW)
        .not_valid_after(start + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     key_cert_sign=True, crl_sign=True, encipher_only=False,
                                     decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return FleetCA(cert, key)


def load_ca(cert_pem: bytes, key_pem: bytes) -> FleetCA:
    """Load a fleet CA from PEM; checks that the key is P-256, matches the certificate, and is a CA."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"cannot load the fleet CA: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ConfigError("the fleet CA key must be an ECDSA P-256 key")
    if cert.public_key() != key.public_key():
        raise ConfigError("the fleet CA key does not match its certificate")
    try:
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise ConfigError("the fleet CA certificate has no basicConstraints") from None
    if not basic.ca:
        raise ConfigError("the fleet CA certificate is not a CA certificate")
    return FleetCA(cert, key)


# -- issuing ---------------------------------------------------------------------------------------
def issue_broker_cert(ca: FleetCA, *, now: float, dns_names: Sequence[str] = ("localhost",),
                      ip_addresses: Sequence[str] = ("127.0.0.1",),
                      validity: dt.timedelta = BROKER_VALIDITY) -> IssuedCredential:
    """A new key and TLS server certificate for the MQTT broker.

    ``localhost`` and ``127.0.0.1`` are always included; ``dns_names`` / ``ip_addresses`` add more.
    """
    dns = list(dict.fromkeys(["localhost", *dns_names]))
    try:
        ips = [ipaddress.ip_address(a) for a in dict.fromkeys(["127.0.0.1", *ip_addresses])]
    except ValueError as exc:
        raise ConfigError(f"invalid broker IP address: {exc}") from None
    for name in dns:
        if not name or len(name) > 253 or any(c.isspace() for c in name):
            raise ConfigError(f"invalid broker DNS name {name[:80]!r}")
    san: list[x509.GeneralName] = [x509.DNSName(n) for n in dns]
    san += [x509.IPAddress(ip) for ip in ips]
    key = _new_key()
    cert = _leaf(ca, _name(dns[0]), key.public_key(), now=now, validity=validity,
                 eku=ExtendedKeyUsageOID.SERVER_AUTH, san=san)
    return _credential(cert, key)


def issue_server_client_cert(ca: FleetCA, *, now: float,
                             validity: dt.timedelta = SERVER_VALIDITY) -> IssuedCredential:
    """A new key and MQTT client certificate for the fleet server (CN ``fleet-server``)."""
    key = _new_key()
    cert = _leaf(ca, _name(SERVER_IDENTITY), key.public_key(), now=now, validity=validity,
                 eku=ExtendedKeyUsageOID.CLIENT_AUTH, san=_client_san(SERVER_IDENTITY))
    return _credential(cert, key)


def issue_claim_cert(ca: FleetCA, device_id: str, *, now: float,
                     validity: dt.timedelta = CLAIM_VALIDITY) -> IssuedCredential:
    """A new key and claim (bootstrap) certificate for ``device_id``: CN ``claim:<device_id>``.

    The claim certificate only lets the device reach its enrollment topics; it is provisioned at
    manufacturing or onboarding and is short-lived.
    """
    identity = claim_identity(device_id)
    key = _new_key()
    cert = _leaf(ca, _name(identity), key.public_key(), now=now, validity=validity,
                 eku=ExtendedKeyUsageOID.CLIENT_AUTH, san=_client_san(identity))
    return _credential(cert, key)


def load_csr(csr_pem: bytes) -> x509.CertificateSigningRequest:
    """Parse a PEM (or DER) CSR; :class:`CertificateRequestError` if it is oversized or malformed."""
    if not isinstance(csr_pem, bytes | bytearray):
        raise CertificateRequestError("a CSR must be bytes")
    if len(csr_pem) > MAX_CSR_BYTES:
        raise CertificateRequestError(f"CSR is larger than {MAX_CSR_BYTES} bytes")
    try:
        if bytes(csr_pem).lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_csr(bytes(csr_pem))
        return x509.load_der_x509_csr(bytes(csr_pem))
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise CertificateRequestError(f"malformed CSR: {exc}") from None


def check_device_csr(csr: x509.CertificateSigningRequest, device_id: str
                     ) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
    """Check a device's CSR and return its public key, or raise :class:`CertificateRequestError`.

    Requirements: valid self-signature (proof of possession of the private key) with SHA-256/384/512;
    subject with exactly one CN, equal to ``device_id``; key ECDSA P-256 or RSA 2048-8192 bits with
    exponent 65537.  Requested extensions are ignored: the CA decides every extension itself.
    """
    device_id = validate_device_id(device_id)
    try:
        signature_ok = csr.is_signature_valid
        hash_alg = csr.signature_hash_algorithm
        public_key = csr.public_key()
        cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except (ValueError, TypeError, UnsupportedAlgorithm, InvalidSignature) as exc:
        raise CertificateRequestError(f"unsupported CSR: {exc}") from None
    if not signature_ok:
        raise CertificateRequestError("CSR signature does not verify (no proof of possession)")
    if not isinstance(hash_alg, ALLOWED_CSR_HASHES):
        name = hash_alg.name if hash_alg is not None else "none"
        raise CertificateRequestError(f"CSR signature hash {name} is not allowed")
    if len(cns) != 1:
        raise CertificateRequestError(f"CSR subject must have exactly one CN, found {len(cns)}")
    cn = cns[0].value
    if cn != device_id:
        shown = cn if isinstance(cn, str) else repr(cn)
        raise CertificateRequestError(f"CSR CN {shown[:80]!r} does not match device id {device_id!r}")
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if not isinstance(public_key.curve, ec.SECP256R1):
            raise CertificateRequestError(f"CSR key curve {public_key.curve.name} is not allowed "
                                          "(P-256 only)")
        return public_key
    if isinstance(public_key, rsa.RSAPublicKey):
        if not RSA_MIN_BITS <= public_key.key_size <= RSA_MAX_BITS:
            raise CertificateRequestError(f"CSR RSA key of {public_key.key_size} bits is not allowed "
                                          f"({RSA_MIN_BITS}-{RSA_MAX_BITS})")
        if public_key.public_numbers().e != 65537:
            raise CertificateRequestError("CSR RSA public exponent must be 65537")
        return public_key
    raise CertificateRequestError(f"CSR key type {type(public_key).__name__} is not allowed "
                                  "(ECDSA P-256 or RSA >= 2048)")


def sign_device_csr(ca: FleetCA, csr_pem: bytes, device_id: str, *, now: float,
                    validity: dt.timedelta = DEVICE_VALIDITY) -> bytes:
    """Issue ``device_id``'s operational MQTT certificate (PEM) from the CSR it sent.

    The caller has already decided that ``device_id`` may be admitted (enrollment); this function
    only checks the CSR itself (see :func:`check_device_csr`).  The certificate's subject is built
    here (O, CN = device id), with the identity URI SAN and clientAuth only.
    """
    public_key = check_device_csr(load_csr(csr_pem), device_id)
    cert = _leaf(ca, _name(device_id), public_key, now=now, validity=validity,
                 eku=ExtendedKeyUsageOID.CLIENT_AUTH, san=_client_san(device_id))
    return cert.public_bytes(serialization.Encoding.PEM)


def make_device_csr(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, device_id: str) -> bytes:
    """A CSR (PEM) for ``device_id`` signed by ``key``: what a device sends at enrollment.

    Lives here so that the simulator, tests and the agent build requests the CA accepts; it needs
    only ``cryptography`` and no CA material.
    """
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, validate_device_id(device_id))]))
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM)


# -- verifying -------------------------------------------------------------------------------------
def build_crl(ca: FleetCA, serials: Iterable[str], *, now: float,
              validity: dt.timedelta = CRL_VALIDITY) -> bytes:
    """A PEM CRL signed by the fleet CA listing the certificates with these serial numbers (hex)."""
    start = _utc(now)
    builder = (x509.CertificateRevocationListBuilder()
               .issuer_name(ca.cert.subject)
               .last_update(start - CLOCK_SKEW)
               .next_update(start + validity))
    for serial in sorted(set(serials)):
        try:
            number = int(serial, 16)
        except ValueError:
            raise ConfigError(f"not a certificate serial number: {serial[:80]!r}") from None
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(number).revocation_date(start).build())
    return builder.sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def verify_client_cert(ca_cert_pem: bytes, cert_pem: bytes, *, now: float) -> str:
    """Check that ``cert_pem`` was issued by the fleet CA for TLS client use and is valid at ``now``.

    Returns the certificate's CN (a device id, ``claim:<id>`` or ``fleet-server``).  Raises
    :class:`CertificateError` (or :class:`~protocol.errors.SignatureError` for a bad signature).
    """
    try:
        ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise CertificateError(f"malformed certificate: {exc}") from None
    try:
        cert.verify_directly_issued_by(ca_cert)
    except InvalidSignature:
        raise SignatureError("certificate signature does not verify with the fleet CA key") from None
    except (ValueError, TypeError) as exc:
        raise CertificateError(f"certificate was not issued by the fleet CA: {exc}") from None
    when = _utc(now)
    if not cert.not_valid_before_utc <= when <= cert.not_valid_after_utc:
        raise CertificateError("certificate is not valid at this time")
    try:
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound as exc:
        raise CertificateError(f"certificate lacks a required extension: {exc}") from None
    if basic.ca or ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        raise CertificateError("certificate is not a TLS client certificate")
    return common_name(cert)


# -- files -----------------------------------------------------------------------------------------
def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)  # mkstemp creates 0600; set the final mode before any data is written
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_private_key(path: Path, key_pem: bytes) -> Path:
    """Write a private key file atomically with mode 0600 (never readable by others, even briefly)."""
    _atomic_write(Path(path), key_pem, 0o600)
    return Path(path)


def write_certificate(path: Path, cert_pem: bytes) -> Path:
    """Write a certificate (public) file atomically with mode 0644."""
    _atomic_write(Path(path), cert_pem, 0o644)
    return Path(path)


def write_credential(directory: Path, name: str, credential: IssuedCredential) -> tuple[Path, Path]:
    """Write ``<name>.pem`` (0644) and ``<name>.key`` (0600) in ``directory``; returns both paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key = write_private_key(directory / f"{name}.key", credential.key_pem)
    cert = write_certificate(directory / f"{name}.pem", credential.cert_pem)
    return cert, key


def save_ca(ca: FleetCA, cert_path: Path, key_path: Path) -> None:
    """Write the CA certificate (0644) and key (0600)."""
    write_private_key(Path(key_path), ca.key_pem())
    write_certificate(Path(cert_path), ca.cert_pem)


def load_ca_files(cert_path: Path, key_path: Path) -> FleetCA:
    """Load the fleet CA from files; refuses a key file that group or others may access."""
    try:
        mode = stat.S_IMODE(os.stat(key_path).st_mode)
        if mode & 0o077:
            raise ConfigError(f"fleet CA key {key_path} has mode {mode:04o}; it must be 0600")
        return load_ca(Path(cert_path).read_bytes(), Path(key_path).read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read the fleet CA: {exc.strerror or exc}: {exc.filename}") from None
