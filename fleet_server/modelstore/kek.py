"""The key-encryption key (KEK): how model data keys are stored at rest on the server.

Every published model version has its own 256-bit data key. The database never holds it in the
clear: it holds ``AES-256-GCM(KEK, nonce, data key, aad)`` with a fresh 96-bit nonce, where the
associated data binds the model name, version and package id
(``"edge-attest/data-key/v1\\0" ‖ name ‖ "\\0" ‖ version ‖ "\\0" ‖ package id``), so a sealed key
copied onto another version's row does not decrypt. The KEK itself lives outside the database:

* ``$FLEET_SERVER_KEK``: 64 hex digits (e.g. injected by a secrets manager), else
* ``[models] kek_file`` (default ``keys/model-kek.key``, created by ``fleet-server init``): 64 hex
  digits, mode 0600 (a file that group or others may access is refused).

Each sealed key records the KEK's id (HMAC-SHA256(KEK, context), 8 bytes hex: it names the KEK
without revealing anything about it), so a wrong KEK is reported as such, not as a corrupt row.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fleet_server.keys import check_private_mode
from fleet_server.pki import write_private_key
from protocol.errors import ConfigError, VerificationError

__all__ = ["KEK_ENV", "KEK_SIZE", "DataKeyError", "Kek", "SealedKey", "create_kek_file", "load_kek",
           "read_kek_file"]

KEK_ENV = "FLEET_SERVER_KEK"
KEK_SIZE = 32
NONCE_SIZE = 12
_AAD_CONTEXT = b"edge-attest/data-key/v1\x00"
_KID_CONTEXT = b"edge-attest/kek-id/v1"


class DataKeyError(VerificationError):
    """A sealed data key cannot be opened: another KEK, or the row was altered."""


@dataclass(frozen=True, slots=True)
class SealedKey:
    """A data key encrypted under a KEK: what the ``modelversion`` row stores."""

    kek_id: str
    nonce: bytes
    ciphertext: bytes  # 32-byte key + 16-byte tag


def _aad(name: str, version: str, package_id: bytes) -> bytes:
    return b"".join((_AAD_CONTEXT, name.encode(), b"\x00", version.encode(), b"\x00", package_id))


@dataclass(frozen=True, slots=True)
class Kek:
    """A loaded key-encryption key. Its bytes never appear in a ``repr`` or a log line."""

    key: bytes = field(repr=False)
    kid: str = ""

    def __post_init__(self) -> None:
        if len(self.key) != KEK_SIZE:
            raise ConfigError(f"a key-encryption key has {KEK_SIZE} bytes, not {len(self.key)}")
        kid = hmac.new(self.key, _KID_CONTEXT, hashlib.sha256).hexdigest()[:16]
        object.__setattr__(self, "kid", kid)

    def seal(self, data_key: bytes | bytearray, *, name: str, version: str, package_id: bytes) -> SealedKey:
        """Encrypt ``data_key`` for the row of (``name``, ``version``, ``package_id``)."""
        nonce = secrets.token_bytes(NONCE_SIZE)
        ciphertext = AESGCM(self.key).encrypt(nonce, bytes(data_key), _aad(name, version, package_id))
        return SealedKey(self.kid, nonce, ciphertext)

    def unseal(self, sealed: SealedKey, *, name: str, version: str, package_id: bytes) -> bytearray:
        """The data key of (``name``, ``version``, ``package_id``), in a buffer the caller zeroes."""
        if not hmac.compare_digest(sealed.kek_id.encode(), self.kid.encode()):
            raise DataKeyError(f"the data key of {name} {version} is sealed under KEK {sealed.kek_id}; "
                               f"the configured KEK is {self.kid}")
        out = bytearray(len(sealed.ciphertext) - 16) if len(sealed.ciphertext) >= 16 else bytearray()
        try:
            AESGCM(self.key).decrypt_into(sealed.nonce, sealed.ciphertext, _aad(name, version, package_id),
                                          out)
        except (InvalidTag, ValueError):
            out[:] = bytes(len(out))
            raise DataKeyError(f"the stored data key of {name} {version} does not decrypt under the KEK "
                               "(altered or moved between rows)") from None
        return out

    def __repr__(self) -> str:
        return f"Kek(kid={self.kid!r}, key=<redacted>)"


def _parse(text: bytes, where: str) -> Kek:
    data = text.strip()
    try:
        key = bytes.fromhex(data.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        key = b""
    if len(key) != KEK_SIZE:
        # Never quote the content: it is (a damaged copy of) a secret.
        raise ConfigError(f"{where}: expected {2 * KEK_SIZE} hex digits (a {KEK_SIZE}-byte key)")
    return Kek(key)


def read_kek_file(path: Path) -> Kek:
    """Load the KEK from ``path`` (64 hex digits, mode 0600)."""
    path = Path(path)
    check_private_mode(path, "key-encryption key")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read key-encryption key {path}: {exc.strerror or exc}") from None
    return _parse(data, str(path))


def load_kek(path: Path | None, *, environ: Mapping[str, str] | None = None) -> Kek | None:
    """The configured KEK: ``$FLEET_SERVER_KEK`` if set, else the file ``path`` if it exists, else None."""
    env = os.environ if environ is None else environ
    value = env.get(KEK_ENV)
    if value:
        return _parse(value.encode(), f"${KEK_ENV}")
    if path is None or not Path(path).exists():
        return None
    return read_kek_file(Path(path))


def create_kek_file(path: Path) -> Kek:
    """Generate a new KEK and write it to ``path`` (0600, atomically); refuses to replace a file."""
    path = Path(path)
    if path.exists():
        raise ConfigError(f"{path} exists; refusing to replace the key-encryption key (every published "
                          "model's data key is sealed under it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(KEK_SIZE)
    write_private_key(path, key.hex().encode() + b"\n")
    return Kek(key)
