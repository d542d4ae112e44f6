"""agent.statefile and agent.identity: atomic 0600 files in a 0700 folder, the device's TLS key and
CSR, and which certificates it accepts and keeps across restarts."""

from __future__ import annotations

import datetime as dt
import os
import stat
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.identity import CERT_FILE, KEY_FILE, DeviceIdentity
from agent.statefile import ensure_dir, read_optional, write_atomic
from fleet_server import pki
from protocol.errors import MessageError, StorageError

DEVICE = "cam-0001"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- statefile -------------------------------------------------------------------------------------
def test_write_atomic_replaces_content_with_mode_0600_and_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    write_atomic(path, b"one")
    assert path.read_bytes() == b"one" and mode(path) == 0o600
    path.chmod(0o644)
    write_atomic(path, b"two")
    assert path.read_bytes() == b"two" and mode(path) == 0o600
    write_atomic(tmp_path / "g.pem", b"cert", mode=0o644)
    assert mode(tmp_path / "g.pem") == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin", "g.pem"]
    with pytest.raises(StorageError, match="cannot write"):
        write_atomic(tmp_path / "missing" / "f.bin", b"x")


def test_ensure_dir_creates_and_tightens_to_0700(tmp_path: Path) -> None:
    folder = ensure_dir(tmp_path / "a" / "state")
    assert folder.is_dir() and mode(folder) == 0o700
    folder.chmod(0o755)
    ensure_dir(folder)
    assert mode(folder) == 0o700
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match="not a folder"):
        ensure_dir(tmp_path / "file")


def test_read_optional(tmp_path: Path) -> None:
    assert read_optional(tmp_path / "none", max_size=10) is None
    (tmp_path / "f").write_bytes(b"12345")
    assert read_optional(tmp_path / "f", max_size=5) == b"12345"
    with pytest.raises(StorageError, match="larger than 4 bytes"):
        read_optional(tmp_path / "f", max_size=4)


# -- identity --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ca() -> pki.FleetCA:
    return pki.create_ca(now=time.time())


def der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


def test_key_is_made_once_kept_0600_and_identical_after_restart(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = DeviceIdentity(state, DEVICE)
    key = first.key()
    assert isinstance(key.curve, ec.SECP256R1)
    assert mode(state) == 0o700 and mode(state / KEY_FILE) == 0o600
    raw = (state / KEY_FILE).read_bytes()
    again = DeviceIdentity(state, DEVICE)  # a restarted agent
    assert again.key().private_numbers() == key.private_numbers()
    assert (state / KEY_FILE).read_bytes() == raw
    assert not again.enrolled and again.certificate() is None


def test_csr_is_der_cn_device_id_and_accepted_by_the_fleet_ca(tmp_path: Path, ca: pki.FleetCA) -> None:
    ident = DeviceIdentity(tmp_path, DEVICE)
    csr_der = ident.csr()
    csr = x509.load_der_x509_csr(csr_der)
    assert csr.is_signature_valid
    assert [a.value for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)] == [DEVICE]
    assert csr.public_key() == ident.key().public_key()
    pem = pki.sign_device_csr(ca, csr_der, DEVICE, now=time.time())  # what the server does with it

    cert = ident.store_certificate(der(pem), now=time.time())
    assert mode(tmp_path / CERT_FILE) == 0o600
    restarted = DeviceIdentity(tmp_path, DEVICE)
    assert restarted.enrolled and restarted.certificate() == cert
    tls = restarted.tls_files(tmp_path / "ca.pem")
    assert (tls.cert, tls.key) == (tmp_path / CERT_FILE, tmp_path / KEY_FILE)


def test_certificates_for_another_key_or_device_or_expired_are_refused(tmp_path: Path,
                                                                       ca: pki.FleetCA) -> None:
    ident = DeviceIdentity(tmp_path, DEVICE)
    now = time.time()
    other_key = ec.generate_private_key(ec.SECP256R1())
    foreign_key_cert = pki.sign_device_csr(ca, pki.make_device_csr(other_key, DEVICE), DEVICE, now=now)
    other_id_cert = pki.sign_device_csr(ca, pki.make_device_csr(ident.key(), "cam-0002"), "cam-0002", now=now)
    good = pki.sign_device_csr(ca, ident.csr(), DEVICE, now=now, validity=dt.timedelta(days=1))
    cases = [(der(foreign_key_cert), now, "does not certify this device's key"),
             (der(other_id_cert), now, "names \\['cam-0002'\\]"),
             (der(good), now + 3 * 86400, "expired"),
             (b"\x30\x03\x02\x01\x00", now, "malformed")]
    for data, when, match in cases:
        with pytest.raises(MessageError, match=match):
            ident.store_certificate(data, now=when)
        assert not (tmp_path / CERT_FILE).exists()


def test_unusable_state_files_are_storage_errors(tmp_path: Path, ca: pki.FleetCA) -> None:
    ident = DeviceIdentity(tmp_path, DEVICE)
    cert = pki.sign_device_csr(ca, ident.csr(), DEVICE, now=time.time())
    ident.store_certificate(der(cert), now=time.time())
    # The key file was replaced after enrollment: the stored certificate no longer fits; no guessing.
    os.unlink(tmp_path / KEY_FILE)
    with pytest.raises(StorageError, match="does not certify"):
        DeviceIdentity(tmp_path, DEVICE).certificate()
    (tmp_path / CERT_FILE).write_text("garbage")
    with pytest.raises(StorageError, match="unusable"):
        DeviceIdentity(tmp_path, DEVICE).certificate()
    (tmp_path / KEY_FILE).write_text("garbage")
    with pytest.raises(StorageError, match="not a readable private key"):
        DeviceIdentity(tmp_path, DEVICE).key()
    (tmp_path / KEY_FILE).write_bytes(pki.private_key_pem(ec.generate_private_key(ec.SECP384R1())))
    with pytest.raises(StorageError, match="P-256"):
        DeviceIdentity(tmp_path, DEVICE).key()
