"""The package store and publishing (``fleet-server model publish``).

:func:`publish_model` turns an ONNX file into a published version:

1. the model is parsed and checked with ``onnx``; its io signature comes from the graph;
2. the version must be newer than every published version of the model (numeric
   MAJOR.MINOR.PATCH);
3. a fresh 256-bit data key (``secrets``) encrypts it into a package (:func:`protocol.modelpkg.
   build_package`: AES-256-GCM chunks whose AAD binds name, version, chunk index and count; a
   manifest with both SHA-256s, sizes and the io signature, signed with the model-signing key);
4. the package is written to ``<store_dir>/<name>/<version>.pkg`` (0644: it is ciphertext);
5. the data key is sealed under the KEK (:mod:`fleet_server.modelstore.kek`) and stored with the
   version's row; the plaintext key is zeroed and never written anywhere.

:class:`PackageStore` reads byte ranges of stored packages for the download handler.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from fleet_server.keys import ModelSigningKey
from fleet_server.modelstore.kek import Kek
from fleet_server.modelstore.onnxio import inspect_onnx
from fleet_server.modelstore.policy import policy_from_text, policy_json
from fleet_server.storage.model_repo import NewVersion
from fleet_server.storage.repo import Repository
from fleet_server.updates.targets import MODELS_ROLE, TargetStore
from protocol.errors import ConfigError, EdgeError, MalformedInputError, StorageError
from protocol.messages import MODEL_NAME_RE, VERSION_RE, ModelPolicy
from protocol.modelpkg import IoSignature, build_package, compare_versions, read_manifest

__all__ = ["PackageStore", "PublishError", "Published", "model_target_path", "publish_model"]

DEFAULT_CHUNK_SIZE = 1 << 20


class PublishError(EdgeError):
    """A model cannot be published (bad name or version, not newer, store not writable...)."""


def check_name(name: str) -> str:
    """A model name as the wire protocol allows it (``^[a-z0-9][a-z0-9._-]{0,63}$``)."""
    if not isinstance(name, str) or not MODEL_NAME_RE.fullmatch(name):
        raise PublishError(f"model name {str(name)[:80]!r} is not allowed: lowercase letters, digits, '.', "
                           "'_' and '-', at most 64, starting with a letter or digit")
    return name


def check_version(version: str) -> str:
    if not isinstance(version, str) or not VERSION_RE.fullmatch(version):
        raise PublishError(f"version {str(version)[:40]!r} is not MAJOR.MINOR.PATCH (numbers without "
                           "leading zeros)")
    return version


@dataclass(frozen=True, slots=True)
class PackageStore:
    """Packages on disk: ``<root>/<name>/<version>.pkg`` (names and versions are checked, so a path
    never leaves ``root``)."""

    root: Path

    @staticmethod
    def relative_path(name: str, version: str) -> str:
        return f"{check_name(name)}/{check_version(version)}.pkg"

    def path(self, name: str, version: str) -> Path:
        return Path(self.root) / self.relative_path(name, version)

    def write(self, name: str, version: str, data: bytes) -> Path:
        """Write a package atomically (temporary file, fsync, rename); mode 0644."""
        path = self.path(name, version)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise PublishError(f"cannot write the package {path}: {exc.strerror or exc}") from None
        return path

    def read(self, name: str, version: str, offset: int, length: int) -> bytes:
        """Bytes ``[offset, offset + length)`` of a stored package (fewer at its end)."""
        path = self.path(name, version)
        try:
            with open(path, "rb") as fh:
                fh.seek(offset)
                return fh.read(length)
        except OSError as exc:
            raise StorageError(f"cannot read the package {path}: {exc.strerror or exc}") from None


@dataclass(frozen=True, slots=True)
class Published:
    """What :func:`publish_model` stored."""

    name: str
    version: str
    path: Path
    package_id: str
    package_size: int
    package_sha256: bytes
    plaintext_size: int
    io_signature: IoSignature
    policy: ModelPolicy
    signing_key_id: str
    kek_id: str


def publish_model(repo: Repository, *, model: bytes, name: str, version: str, signing_key: ModelSigningKey,
                  kek: Kek, store: PackageStore, now: int, actor: str = "admin",
                  policy: ModelPolicy | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                  targets: TargetStore | None = None) -> Published:
    """Publish ``model`` (ONNX bytes) as ``name`` ``version``; see the module docstring.

    ``policy``: the version's usage policy; by default the newest published version's, else the
    defaults.  ``targets``: the update repository (when it is initialised): the package also becomes
    the target ``models/<name>/<version>.pkg`` of the ``models`` role (:func:`model_target_path`).
    """
    check_name(name)
    check_version(version)
    io_signature = inspect_onnx(model)
    previous = repo.models.newest(name)
    _require_newer(name, version, None if previous is None else previous.version)
    chosen = policy or (policy_from_text(previous.policy) if previous is not None else ModelPolicy())

    data_key = bytearray(secrets.token_bytes(32))
    try:
        package = build_package(model, name=name, version=version, io_signature=io_signature,
                                signing_key=signing_key.key, key_id=signing_key.kid, data_key=bytes(data_key),
                                created_at=now, chunk_size=chunk_size)
        # What devices will check, checked once here (signature, bounds, ciphertext digest).
        manifest = read_manifest(package, trusted_keys={signing_key.kid: signing_key.public_key})
        sealed = kek.seal(data_key, name=name, version=version, package_id=manifest.package_id)
    finally:
        data_key[:] = bytes(len(data_key))
    package_sha256 = hashlib.sha256(package).digest()
    path = store.write(name, version, package)
    try:
        with repo.write("publishing a model version") as tx:
            record = tx.models.ensure_model(name, now=now, actor=actor)
            newest = next(iter(tx.models.versions(record.id, lock=True)), None)
            _require_newer(name, version, None if newest is None else newest.version)
            tx.models.insert_version(NewVersion(
                model_id=record.id, version=version, package_id=manifest.package_id.hex(),
                package_path=store.relative_path(name, version), package_size=len(package),
                package_sha256=package_sha256, plaintext_size=manifest.plaintext_size,
                plaintext_sha256=manifest.plaintext_sha256, ciphertext_sha256=manifest.ciphertext_sha256,
                signing_key_id=signing_key.kid, kek_id=sealed.kek_id, data_key_nonce=sealed.nonce,
                encrypted_data_key=sealed.ciphertext, policy=policy_json(chosen),
                manifest=manifest.raw.decode("utf-8"), created_at=now, created_by=actor))
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    if targets is not None:
        # The package is ciphertext: devices fetch it through the verified TUF channel; its data key
        # is still released only by the key broker.
        targets.add_target(MODELS_ROLE, model_target_path(name, version), package,
                           {"name": name, "version": version, "package_sha256": package_sha256.hex()})
    return Published(name=name, version=version, path=path, package_id=manifest.package_id.hex(),
                     package_size=len(package), package_sha256=package_sha256,
                     plaintext_size=manifest.plaintext_size, io_signature=io_signature, policy=chosen,
                     signing_key_id=signing_key.kid, kek_id=sealed.kek_id)


def model_target_path(name: str, version: str) -> str:
    """The TUF target path of a model package: ``models/<name>/<version>.pkg``."""
    return f"{MODELS_ROLE}/{PackageStore.relative_path(name, version)}"


def _require_newer(name: str, version: str, newest: str | None) -> None:
    if newest is not None and compare_versions(version, newest) <= 0:
        raise PublishError(f"{name} {version} is not newer than the newest published version {newest}")


def read_model_file(path: Path) -> bytes:
    """The bytes of a model file (one-line errors)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not data:
        raise MalformedInputError(f"{path} is empty")
    return data
