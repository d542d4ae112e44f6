"""A local "TPM manufacturer" certificate authority for simulated TPMs.

Real TPMs ship an EK certificate signed by their vendor's CA; the fleet server trusts a bundle of
such vendor roots.  For swtpm we play the vendor: a root CA (ECDSA P-256) and an issuing CA (RSA-2048,
because swtpm's certificate tool signs with it) whose certificates go into the server's trust bundle
and whose issuing key swtpm_localca uses to sign each simulated TPM's EK certificate.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

ROOT_CERT = "manufacturer-root.pem"
ROOT_KEY = "manufacturer-root.key"
ISSUER_CERT = "manufacturer-issuer.pem"
ISSUER_KEY = "manufacturer-issuer.key"
BUNDLE = "manufacturer-bundle.pem"


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _name(cn: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "EdgeSim TPM Manufacturing"),
        x509.NameAttribute(NameOID.COMMON_NAME, cn),
    ])


@dataclass(frozen=True)
class ManufacturerCA:
    """Paths of a manufacturer CA on disk. ``bundle`` is what the fleet server trusts."""

    directory: Path

    @property
    def root_cert(self) -> Path:
        return self.directory / ROOT_CERT

    @property
    def issuer_cert(self) -> Path:
        return self.directory / ISSUER_CERT

    @property
    def issuer_key(self) -> Path:
        return self.directory / ISSUER_KEY

    @property
    def bundle(self) -> Path:
        """PEM bundle (root then issuer) of the CAs an EK certificate chains to."""
        return self.directory / BUNDLE

    @classmethod
    def load_or_create(cls, directory: Path, *, name: str = "EdgeSim TPM") -> ManufacturerCA:
        """Open the CA in ``directory``, creating it (keys 0600) if it does not exist yet."""
        ca = cls(Path(directory))
        if ca.bundle.exists() and ca.issuer_key.exists():
            return ca
        ca.directory.mkdir(parents=True, exist_ok=True)
        now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
        root_key = ec.generate_private_key(ec.SECP256R1())
        root = (
            x509.CertificateBuilder()
            .subject_name(_name(f"{name} Root CA"))
            .issuer_name(_name(f"{name} Root CA"))
            .public_key(root_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=3650 * 2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                           critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), critical=False)
            .sign(root_key, hashes.SHA256())
        )
        issuer_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        issuer = (
            x509.CertificateBuilder()
            .subject_name(_name(f"{name} EK Issuing CA"))
            .issuer_name(root.subject)
            .public_key(issuer_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                           critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(issuer_key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()),
                           critical=False)
            .sign(root_key, hashes.SHA256())
        )
        pem = serialization.Encoding.PEM
        no_enc = serialization.NoEncryption()
        _write_private(ca.directory / ROOT_KEY,
                       root_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, no_enc))
        _write_private(ca.issuer_key,
                       issuer_key.private_bytes(pem, serialization.PrivateFormat.TraditionalOpenSSL, no_enc))
        ca.root_cert.write_bytes(root.public_bytes(pem))
        ca.issuer_cert.write_bytes(issuer.public_bytes(pem))
        # Write the bundle last: its presence marks a complete CA.
        ca.bundle.write_bytes(root.public_bytes(pem) + issuer.public_bytes(pem))
        return ca

    def write_swtpm_config(self, directory: Path, *, pcr_banks: str = "sha1,sha256") -> Path:
        """Write swtpm_setup + swtpm_localca config files that sign EK certs with this CA.

        Returns the path of the ``swtpm_setup.conf`` to pass with ``--config``.
        """
        directory.mkdir(parents=True, exist_ok=True)
        localca_conf = directory / "swtpm-localca.conf"
        localca_opts = directory / "swtpm-localca.options"
        setup_conf = directory / "swtpm_setup.conf"
        localca_conf.write_text(
            f"statedir = {self.directory}\n"
            f"signingkey = {self.issuer_key}\n"
            f"issuercert = {self.issuer_cert}\n"
            f"certserial = {self.directory / 'certserial'}\n"
        )
        localca_opts.write_text(
            "--platform-manufacturer EdgeSim\n--platform-version 1.0\n--platform-model edge-sim\n"
        )
        setup_conf.write_text(
            "create_certs_tool = /usr/bin/swtpm_localca\n"
            f"create_certs_tool_config = {localca_conf}\n"
            f"create_certs_tool_options = {localca_opts}\n"
            f"active_pcr_banks = {pcr_banks}\n"
        )
        return setup_conf
