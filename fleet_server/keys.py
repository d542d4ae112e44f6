"""The server's result-signing key: ECDSA P-256, in one 0600 PEM file; agents pin its public key.

Every server -> device message (challenges, attestation results, enrollment answers, revocations)
is signed with this key (:func:`protocol.messages.encode_signed`); the key id carried in the
envelope is :func:`protocol.messages.key_id` of the public key.

Files are written atomically (temporary file + ``os.replace``) with their final mode set before
any byte is written, so the private key is never readable by others, not even briefly. Loading
refuses a private key file that group or others may access. The key object never appears in a
``repr``, a log line or the database.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from fleet_server.pki import private_key_pem, write_certificate, write_private_key
from protocol.errors import ConfigError
from protocol.messages import Message, SigningKey, VerifyKey, encode_signed, key_id


def public_key_path(private_path: Path) -> Path:
    """Where the public key of ``private_path`` is written: ``<stem>.pub.pem`` next to it."""
    private_path = Path(private_path)
    return private_path.with_name(f"{private_path.stem}.pub.pem")


def public_pem(public_key: VerifyKey) -> bytes:
    """SubjectPublicKeyInfo PEM of ``public_key`` (what agents pin)."""
    return public_key.public_bytes(serialization.Encoding.PEM,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass(frozen=True, slots=True)
class ResultSigner:
    """The loaded result-signing key with its key id; signs server -> device messages."""

    key: SigningKey = field(repr=False)
    kid: str

    @classmethod
    def from_key(cls, key: SigningKey) -> ResultSigner:
        if not isinstance(key.curve, ec.SECP256R1):
            raise ConfigError("the result-signing key must be an ECDSA P-256 key")
        return cls(key=key, kid=key_id(key.public_key()))

    @property
    def public_key(self) -> VerifyKey:
        return self.key.public_key()

    def public_pem(self) -> bytes:
        return public_pem(self.key.public_key())

    def sign(self, message: Message, *, aud: str, ts: int, msg_id: str | None = None) -> bytes:
        """The signed envelope of ``message`` for recipient ``aud`` (a device id or ``claim:<id>``)."""
        return encode_signed(message, key=self.key, kid=self.kid, aud=aud, ts=ts, msg_id=msg_id)

    def __repr__(self) -> str:
        return f"ResultSigner(kid={self.kid!r}, key=<redacted>)"


def create_signing_key(path: Path, *, overwrite: bool = False) -> ResultSigner:
    """Generate a new P-256 key, write it to ``path`` (0600) and its public key next to it (0644).

    Refuses to replace an existing key unless ``overwrite`` (every agent pinned the old one).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} already exists; refusing to replace the result-signing key")
    path.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    write_private_key(path, private_key_pem(key))
    write_certificate(public_key_path(path), public_pem(key.public_key()))
    return ResultSigner.from_key(key)


def check_private_mode(path: Path, what: str) -> None:
    """Refuse a private key file that group or others may read or write."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if mode & 0o077:
        raise ConfigError(f"{what} {path} has mode {mode:04o}; it must be 0600")


def load_signing_key(path: Path) -> ResultSigner:
    """Load the result-signing key from ``path`` (PKCS#8 PEM, mode 0600, ECDSA P-256)."""
    path = Path(path)
    check_private_mode(path, "result-signing key")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read result-signing key {path}: {exc.strerror or exc}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # The parser's message could quote key material; say only what is wrong.
        raise ConfigError(f"{path} is not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{path}: the result-signing key must be an ECDSA P-256 key")
    return ResultSigner.from_key(key)


def load_public_key(path: Path) -> VerifyKey:
    """Load a pinned server public key (SubjectPublicKeyInfo PEM), as agents do."""
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError(f"{path} is not a PEM public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ConfigError(f"{path}: expected an ECDSA P-256 public key")
    return key


# --------------------------------------------------------------------------------------------------
# the model-signing key (signs model package manifests; docs/model-protection.md)
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ModelSigningKey:
    """ECDSA P-256 key that signs model package manifests (``protocol.modelpkg.build_package``).

    Separate from the result-signing key: workers hold the latter, while this one is needed only
    by ``fleet-server model publish``. Devices pin its public key (``claim issue`` bundles it).
    """

    key: SigningKey = field(repr=False)
    kid: str

    @classmethod
    def from_key(cls, key: SigningKey) -> ModelSigningKey:
        if not isinstance(key.curve, ec.SECP256R1):
            raise ConfigError("the model-signing key must be an ECDSA P-256 key")
        return cls(key=key, kid=key_id(key.public_key()))

    @property
    def public_key(self) -> VerifyKey:
        return self.key.public_key()

    def public_pem(self) -> bytes:
        return public_pem(self.key.public_key())

    def __repr__(self) -> str:
        return f"ModelSigningKey(kid={self.kid!r}, key=<redacted>)"


def create_model_signing_key(path: Path, *, overwrite: bool = False) -> ModelSigningKey:
    """Generate the model-signing key at ``path`` (0600) with ``<stem>.pub.pem`` next to it (0644)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} already exists; refusing to replace the model-signing key")
    path.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    write_private_key(path, private_key_pem(key))
    write_certificate(public_key_path(path), public_pem(key.public_key()))
    return ModelSigningKey.from_key(key)


def load_model_signing_key(path: Path) -> ModelSigningKey:
    """Load the model-signing key from ``path`` (PKCS#8 PEM, mode 0600, ECDSA P-256)."""
    path = Path(path)
    check_private_mode(path, "model-signing key")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise ConfigError(f"cannot read model-signing key {path}: {exc.strerror or exc}") from None
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError(f"{path} is not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{path}: the model-signing key must be an ECDSA P-256 key")
    return ModelSigningKey.from_key(key)


# --------------------------------------------------------------------------------------------------
# the audit checkpoint key (signs checkpoints of the audit chain head; fleet_server.console.checkpoint)
# --------------------------------------------------------------------------------------------------
def ed25519_key_id(public_key: ed25519.Ed25519PublicKey) -> str:
    """Key id of an Ed25519 key, computed as :func:`protocol.messages.key_id` (first 8 bytes of the
    SHA-256 of its DER SubjectPublicKeyInfo, hex)."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class CheckpointSigningKey:
    """Ed25519 key that signs audit checkpoints. Kept in a file of its own (0600), never in the
    database: someone who can rewrite the database cannot re-sign the checkpoints."""

    key: ed25519.Ed25519PrivateKey = field(repr=False)
    kid: str

    @classmethod
    def from_key(cls, key: ed25519.Ed25519PrivateKey) -> CheckpointSigningKey:
        return cls(key=key, kid=ed25519_key_id(key.public_key()))

    @property
    def public_key(self) -> ed25519.Ed25519PublicKey:
        return self.key.public_key()

    def sign(self, data: bytes) -> bytes:
        return self.key.sign(data)

    def __repr__(self) -> str:
        return f"CheckpointSigningKey(kid={self.kid!r}, key=<redacted>)"


def _ed25519_public_pem(public_key: ed25519.Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.PEM,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


def create_checkpoint_key(path: Path, *, overwrite: bool = False) -> CheckpointSigningKey:
    """Generate the checkpoint key at ``path`` (0600) with ``<stem>.pub.pem`` next to it (0644).

    Without ``overwrite`` the key file is created exclusively (a hard link of a complete temporary
    file): when two processes create it at once, both end up using the one that won.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    if overwrite:
        write_private_key(path, pem)
    else:
        temp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        write_private_key(temp, pem)
        try:
            os.link(temp, path)
        except FileExistsError:
            return load_checkpoint_key(path)
        finally:
            temp.unlink(missing_ok=True)
    write_certificate(public_key_path(path), _ed25519_public_pem(key.public_key()))
    return CheckpointSigningKey.from_key(key)


def load_checkpoint_key(path: Path) -> CheckpointSigningKey:
    """Load the checkpoint key from ``path`` (PKCS#8 PEM, mode 0600, Ed25519); writes its public key
    file next to it if that is missing."""
    path = Path(path)
    check_private_mode(path, "audit checkpoint key")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise ConfigError(f"cannot read audit checkpoint key {path}: {exc.strerror or exc}") from None
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError(f"{path} is not an unencrypted PEM private key") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError(f"{path}: the audit checkpoint key must be an Ed25519 key")
    loaded = CheckpointSigningKey.from_key(key)
    if not public_key_path(path).exists():
        write_certificate(public_key_path(path), _ed25519_public_pem(loaded.public_key))
    return loaded


def load_or_create_checkpoint_key(path: Path) -> CheckpointSigningKey:
    """The checkpoint key at ``path``, created on first use."""
    path = Path(path)
    if path.exists():
        return load_checkpoint_key(path)
    return create_checkpoint_key(path)


def load_checkpoint_public_key(path: Path) -> ed25519.Ed25519PublicKey | None:
    """The public key verifying checkpoints: ``<stem>.pub.pem`` next to the private key ``path``;
    None when neither file exists yet (no checkpoint was ever signed here)."""
    public = public_key_path(Path(path))
    if not public.exists():
        return load_checkpoint_key(path).public_key if Path(path).exists() else None
    try:
        key = serialization.load_pem_public_key(public.read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read {public}: {exc.strerror or exc}") from None
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError(f"{public} is not a PEM public key") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ConfigError(f"{public}: expected an Ed25519 public key")
    return key
