"""The device's MQTT identity: its TLS key (made here, never leaves the device) and certificate.

Files in ``state_dir`` (both 0600, written atomically, see :mod:`agent.statefile`):

* ``device.key``: ECDSA P-256 private key, PKCS#8 PEM, generated with ``cryptography`` on first use
  and kept for the life of the enrollment.  It is sent nowhere: enrollment sends a CSR it signed.
* ``device.pem``: the device certificate the fleet CA issued from that CSR (received in a signed
  ``enroll.result``), stored only after checking that it certifies *this* key for *this* device id.

The presence of a valid ``device.pem`` is what "enrolled" means to the agent: with it the agent
connects with the device certificate and never enrolls again.
"""

from __future__ import annotations

import datetime as dt
import hmac
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.statefile import ensure_dir, read_optional, write_atomic
from protocol.errors import MessageError, StorageError
from protocol.mqtt import TlsFiles
from protocol.topics import validate_device_id

KEY_FILE = "device.key"
CERT_FILE = "device.pem"
MAX_PEM = 16 * 1024


def _spki(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _common_names(name: x509.Name) -> list[str]:
    return [str(attr.value) for attr in name.get_attributes_for_oid(NameOID.COMMON_NAME)]


class DeviceIdentity:
    """The TLS key and device certificate of ``device_id``, kept in ``state_dir``.

    Not thread-safe by itself; the agent uses it from its main thread only.
    """

    def __init__(self, state_dir: Path, device_id: str) -> None:
        self.state_dir = Path(state_dir)
        self.device_id = validate_device_id(device_id)
        self._key: ec.EllipticCurvePrivateKey | None = None

    @property
    def key_path(self) -> Path:
        return self.state_dir / KEY_FILE

    @property
    def cert_path(self) -> Path:
        return self.state_dir / CERT_FILE

    # -- key ---------------------------------------------------------------------------------------
    def key(self) -> ec.EllipticCurvePrivateKey:
        """The device's TLS private key: loaded from ``device.key``, or generated and stored there."""
        if self._key is not None:
            return self._key
        ensure_dir(self.state_dir)
        pem = read_optional(self.key_path, max_size=MAX_PEM)
        if pem is None:
            key = ec.generate_private_key(ec.SECP256R1())
            write_atomic(self.key_path, key.private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
        else:
            try:
                loaded = serialization.load_pem_private_key(pem, password=None)
            except (ValueError, TypeError, UnsupportedAlgorithm):
                raise StorageError(f"{self.key_path} is not a readable private key") from None
            if not isinstance(loaded, ec.EllipticCurvePrivateKey):
                raise StorageError(f"{self.key_path} is not an ECDSA key")
            if not isinstance(loaded.curve, ec.SECP256R1):
                raise StorageError(f"{self.key_path} is not on curve P-256")
            key = loaded
        self._key = key
        return key

    def csr(self) -> bytes:
        """A DER certificate signing request, CN = device id, signed by the device key (SHA-256)."""
        request = (x509.CertificateSigningRequestBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.device_id)]))
                   .sign(self.key(), hashes.SHA256()))
        return request.public_bytes(serialization.Encoding.DER)

    # -- certificate -------------------------------------------------------------------------------
    def _check(self, cert: x509.Certificate, *, now: float | None) -> None:
        """Raise :class:`MessageError` unless ``cert`` is for this device id and this key."""
        cns = _common_names(cert.subject)
        if cns != [self.device_id]:
            raise MessageError(f"device certificate names {cns!r}, not {self.device_id!r}")
        public = cert.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey) or not hmac.compare_digest(
                _spki(public), _spki(self.key().public_key())):
            raise MessageError("device certificate does not certify this device's key")
        if now is not None:
            when = dt.datetime.fromtimestamp(now, dt.UTC)
            if when > cert.not_valid_after_utc:
                raise MessageError(f"device certificate expired at {cert.not_valid_after_utc.isoformat()}")

    def store_certificate(self, der: bytes, *, now: float) -> x509.Certificate:
        """Check a certificate received at enrollment (DER) and store it as ``device.pem``.

        Raises :class:`MessageError` if it is malformed, expired, or not for this key and device id.
        """
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError as exc:
            raise MessageError(f"device certificate is malformed: {exc}") from None
        self._check(cert, now=now)
        write_atomic(self.cert_path, cert.public_bytes(serialization.Encoding.PEM))
        return cert

    def certificate(self) -> x509.Certificate | None:
        """The stored device certificate, or ``None`` if the device has not been admitted yet.

        Raises :class:`StorageError` if ``device.pem`` exists but is unreadable or belongs to another
        key or device (for example a key file that was replaced): the agent does not guess.
        """
        pem = read_optional(self.cert_path, max_size=MAX_PEM)
        if pem is None:
            return None
        try:
            cert = x509.load_pem_x509_certificate(pem)
            self._check(cert, now=None)
        except (ValueError, MessageError) as exc:
            detail = exc.diagnostics() if isinstance(exc, MessageError) else str(exc)
            raise StorageError(f"{self.cert_path} is unusable: {detail}") from None
        return cert

    @property
    def enrolled(self) -> bool:
        """True if a device certificate for this key is stored."""
        return self.certificate() is not None

    def tls_files(self, ca_cert: Path) -> TlsFiles:
        """The mutual-TLS files to connect with the device certificate."""
        return TlsFiles(Path(ca_cert), self.cert_path, self.key_path)
