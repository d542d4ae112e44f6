"""Role key files of the update repository: ``<updates>/keys/<role>/<keyid>.pem`` (PKCS#8, 0600).

Every key is Ed25519 (:class:`securesystemslib.signer.CryptoSigner`).  ``fleet-server updates init``
writes all of them here; the keys of the offline roles (root, targets, firmware, models) are meant to
be moved off this machine afterwards, leaving at most fewer than their threshold (docs/updates.md).
A role whose key files are gone still works: its new versions wait for signatures made elsewhere.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner

from protocol.errors import ConfigError

KEY_SUFFIX = ".pem"


def generate() -> CryptoSigner:
    """A fresh Ed25519 role key."""
    return CryptoSigner.generate_ed25519()


def load_key_file(path: Path) -> CryptoSigner:
    """A role key from a PKCS#8 PEM file (refused when readable by group or others)."""
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the key file {path}: {exc.strerror or exc}") from None
    if mode & 0o077:
        raise ConfigError(f"the key file {path} is readable by others (mode {mode & 0o777:o}); chmod 600 it")
    try:
        key = load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise ConfigError(f"{path} is not an unencrypted PKCS#8 PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} is not an Ed25519 key")
    return CryptoSigner(key)


def write_private(path: Path, data: bytes) -> None:
    """Write a secret file atomically with mode 0600 (its folder 0700)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"cannot write the key file {path}: {exc.strerror or exc}") from None


class KeyDir:
    """The local key files, one folder per role."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def role_dir(self, role: str) -> Path:
        return self.root / role

    def save(self, role: str, signer: CryptoSigner) -> Path:
        for folder in (self.root, self.role_dir(role)):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(folder, 0o700)
        path = self.role_dir(role) / f"{signer.public_key.keyid}{KEY_SUFFIX}"
        write_private(path, signer.private_bytes)
        return path

    def signers(self, role: str) -> list[CryptoSigner]:
        """The keys of ``role`` present here (possibly none: they live offline)."""
        folder = self.role_dir(role)
        if not folder.is_dir():
            return []
        return [load_key_file(p) for p in sorted(folder.glob(f"*{KEY_SUFFIX}"))]

    def remove(self, role: str, keyid: str) -> bool:
        """Delete the local file of a retired key; False when there is none."""
        path = self.role_dir(role) / f"{keyid}{KEY_SUFFIX}"
        if not path.is_file():
            return False
        path.unlink()
        return True
