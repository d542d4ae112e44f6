"""Model packages on the device's disk, and the highest version accepted per model.

Layout under ``<state_dir>/models/`` (folder 0700, files 0600)::

    <name>-<version>.pkg          a package exactly as received: header, signed manifest, ciphertext
    .<name>-<version>.partial     a download in progress (written at the offsets the chunks name)

Only ciphertext is ever written here; the data key and the plaintext never are.

**Vetting** (:meth:`PackageStore.vet`), before a package is kept, in this order: its length is the
offer's ``size``; its SHA-256 is the signed offer's ``package_sha256``; its manifest verifies with
the pinned model-signing key (:func:`protocol.modelpkg.read_manifest`: signature over the manifest
bytes as carried, strict parse, exact length, ciphertext SHA-256); the manifest names the offered
model and version; and the version is not older than the highest one accepted for that model
(:func:`protocol.modelpkg.require_not_older`). A package failing any check is deleted.

**Versions**: the high-water mark per model lives in the vault's state file with the quota counters
(:mod:`agent.vault.counters`), so restoring an old state file to make an old version acceptable
again is caught by the same TPM NV counter. The store keeps the marks in memory; the vault saves
them. Only a package file whose version *equals* the mark is used: an older file left on disk (or
put back) is ignored and removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import mmap
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

from agent.statefile import FILE_MODE, ensure_dir
from protocol.errors import EdgeError, StorageError
from protocol.messages import MODEL_NAME_RE, ModelRef, VerifyKey
from protocol.modelpkg import (
    Manifest,
    PackageFormatError,
    PackageIntegrityError,
    compare_versions,
    read_manifest,
    require_not_older,
)

__all__ = ["PackageStore"]

MODELS_DIR = "models"
_PACKAGE_RE = re.compile(r"^([a-z0-9][a-z0-9._-]{0,63})-(\d+\.\d+\.\d+)\.pkg$")


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (best effort: not every filesystem lets a folder be fsynced)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _sha256_file(view: mmap.mmap | memoryview, step: int = 1 << 20) -> bytes:
    h = hashlib.sha256()
    mv = memoryview(view)
    try:
        for i in range(0, len(mv), step):
            h.update(mv[i:i + step])
    finally:
        mv.release()
    return h.digest()


@contextlib.contextmanager
def map_file(path: Path) -> Iterator[mmap.mmap]:
    """A read-only ``mmap`` of ``path`` (no copy of the package in memory)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise PackageFormatError(f"{path.name} is empty")
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        yield mapped
    finally:
        # A memoryview into the map may still be referenced (by the traceback of an error raised while
        # reading it): then the map closes when that goes away.
        with contextlib.suppress(BufferError):
            mapped.close()


class PackageStore:
    """Packages under ``root`` and the accepted-version marks (see the module docstring).

    ``trusted_keys``: the pinned model-signing key(s), ``{key_id: public key}``. Not thread-safe: the
    vault uses it from its own thread.
    """

    def __init__(self, root: Path, trusted_keys: Mapping[str, VerifyKey],
                 versions: Mapping[str, str] | None = None) -> None:
        self.root = ensure_dir(Path(root))
        self._keys = dict(trusted_keys)
        self._versions: dict[str, str] = dict(versions or {})

    # -- versions ----------------------------------------------------------------------------------
    def versions(self) -> dict[str, str]:
        """The highest accepted version per model (what the vault persists)."""
        return dict(self._versions)

    def version(self, name: str) -> str | None:
        """The highest accepted version of ``name``, or ``None``."""
        return self._versions.get(name)

    # -- paths -------------------------------------------------------------------------------------
    @staticmethod
    def _check(name: str, version: str) -> None:
        if not MODEL_NAME_RE.fullmatch(name):
            raise PackageFormatError(f"model name {name!r} is not allowed")
        require_not_older(version, None)  # validates MAJOR.MINOR.PATCH

    def package_path(self, name: str, version: str) -> Path:
        """Where the kept package of ``name`` ``version`` lives."""
        self._check(name, version)
        return self.root / f"{name}-{version}.pkg"

    def partial_path(self, name: str, version: str) -> Path:
        """Where a download of ``name`` ``version`` is assembled."""
        self._check(name, version)
        return self.root / f".{name}-{version}.partial"

    # -- downloads ---------------------------------------------------------------------------------
    def open_partial(self, name: str, version: str, size: int) -> int:
        """Create (truncate) the partial file of a download, 0600, ``size`` bytes; returns its fd."""
        path = self.partial_path(name, version)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
            os.fchmod(fd, FILE_MODE)
            os.ftruncate(fd, size)
        except OSError as exc:
            raise StorageError(f"cannot create {path}: {exc.strerror or exc}") from None
        return fd

    def discard_partial(self, name: str, version: str) -> None:
        """Remove a download's partial file (after a failure or once it was committed)."""
        with contextlib.suppress(FileNotFoundError):
            self.partial_path(name, version).unlink()

    def vet(self, ref: ModelRef) -> Manifest:
        """Check the completed download of ``ref`` (see the module docstring); the verified manifest.

        Raises a :class:`~protocol.modelpkg.ModelPackageError` (the package is refused and its partial
        file removed) or :class:`StorageError`.
        """
        path = self.partial_path(ref.name, ref.version)
        try:
            with map_file(path) as mapped:
                if len(mapped) != ref.size:
                    raise PackageFormatError(f"package of {len(mapped)} bytes; the offer says {ref.size}")
                if not hmac.compare_digest(_sha256_file(mapped), ref.package_sha256):
                    raise PackageIntegrityError(f"package {ref.name} {ref.version} does not match the "
                                                "SHA-256 of the signed offer")
                manifest = read_manifest(mapped, trusted_keys=self._keys)
            if manifest.name != ref.name or manifest.version != ref.version:
                raise PackageFormatError(f"the signed manifest is for {manifest.name} {manifest.version}, "
                                         f"not the offered {ref.name} {ref.version}")
            require_not_older(manifest.version, self._versions.get(manifest.name))
        except BaseException:
            self.discard_partial(ref.name, ref.version)
            raise
        return manifest

    def accept(self, manifest: Manifest) -> None:
        """Raise the version mark of the model to the vetted ``manifest``'s version (in memory; the
        vault saves the marks *before* it calls :meth:`commit`)."""
        require_not_older(manifest.version, self._versions.get(manifest.name))
        self._versions[manifest.name] = manifest.version

    def revert(self, name: str, previous: str | None) -> None:
        """Undo :meth:`accept` when the new mark could not be saved."""
        if previous is None:
            self._versions.pop(name, None)
        else:
            self._versions[name] = previous

    def commit(self, name: str, version: str) -> Path:
        """Move a vetted, accepted download into place (fsynced) and delete other versions' files."""
        partial, final = self.partial_path(name, version), self.package_path(name, version)
        try:
            fd = os.open(partial, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(partial, final)
        except OSError as exc:
            raise StorageError(f"cannot store {final}: {exc.strerror or exc}") from None
        _fsync_dir(self.root)
        self.prune(name)
        return final

    # -- kept packages -----------------------------------------------------------------------------
    def prune(self, name: str | None = None) -> list[Path]:
        """Delete package files that are not the accepted version of their model (all models, or one).

        Stale partial files go too. Returns what was removed."""
        removed = []
        for path in sorted(self.root.iterdir()):
            m = _PACKAGE_RE.fullmatch(path.name)
            if m is not None:
                model, version = m.group(1), m.group(2)
                if (name is None or model == name) and self._versions.get(model) != version:
                    removed.append(path)
            elif name is None and path.name.startswith(".") and path.name.endswith(".partial"):
                removed.append(path)
        for path in removed:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        return removed

    def held(self) -> dict[str, Manifest]:
        """The kept packages whose version is the accepted one, with their verified manifests.

        A package file that no longer verifies (altered on disk) is left out and deleted, so the next
        offer fetches it again.
        """
        out: dict[str, Manifest] = {}
        for name, version in sorted(self._versions.items()):
            path = self.package_path(name, version)
            if not path.exists():
                continue
            try:
                manifest = self.read(name, version)
            except EdgeError:  # altered on disk, or signed by a key no longer pinned: fetch it again
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            out[name] = manifest
        return out

    def read(self, name: str, version: str) -> Manifest:
        """Verify the kept package of ``name`` ``version`` again and return its manifest."""
        with map_file(self.package_path(name, version)) as mapped:
            manifest = read_manifest(mapped, trusted_keys=self._keys)
        if manifest.name != name or manifest.version != version:
            raise PackageFormatError(f"{name}-{version}.pkg holds {manifest.name} {manifest.version}")
        return manifest

    def newer_than_held(self, ref: ModelRef) -> bool:
        """True if ``ref`` is newer than the accepted version (or none is accepted)."""
        held = self._versions.get(ref.name)
        return held is None or compare_versions(ref.version, held) > 0

    def older_than_held(self, ref: ModelRef) -> bool:
        """True if ``ref`` is older than the accepted version (an offer the agent must refuse)."""
        held = self._versions.get(ref.name)
        return held is not None and compare_versions(ref.version, held) < 0
