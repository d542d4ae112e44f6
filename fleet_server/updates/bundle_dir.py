"""Reading a firmware bundle folder (``firmware-sim release build`` writes one) for ``release add``.

The folder's format and its strict reader are :mod:`protocol.release` (exactly ``release.json``,
``reference-values.json`` and ``images/``; every image's size and SHA-256 as the manifest says);
here the release is also checked against what the administrator gives (class and version) and the
reference values are parsed as a :class:`ReferencePolicy`.  Raises :class:`BundleDirError` with one
line naming the problem.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fleet_server.appraisal.policy import ReferencePolicy
from protocol.encoding import JsonValue
from protocol.errors import MalformedInputError
from protocol.firmware_bundle import pack
from protocol.release import ReleaseError, load_bundle_folder


class BundleDirError(MalformedInputError):
    """A firmware bundle folder is missing a part, has an extra one, or is inconsistent."""


@dataclass(frozen=True, slots=True)
class BundleDir:
    manifest: Mapping[str, JsonValue]
    reference: ReferencePolicy
    images: Mapping[str, bytes]

    def pack(self) -> bytes:
        """The single ``.fwb`` file of this release (:func:`protocol.firmware_bundle.pack`)."""
        return pack(self.manifest, self.images)


def read_bundle_dir(folder: Path, *, device_class: str, version: str) -> BundleDir:
    """Read and check the bundle folder ``folder`` for a release of ``device_class`` ``version``."""
    try:
        manifest, images, policy = load_bundle_folder(folder)
    except ReleaseError as exc:
        raise BundleDirError(f"bundle: {exc.diagnostics()}") from None
    except OSError as exc:
        raise BundleDirError(f"bundle: cannot read {folder}: {exc.strerror or exc}") from None
    for key, want in (("device_class", device_class), ("version", version)):
        found = manifest.get(key)
        if found != want:
            raise BundleDirError(f"bundle: release.json says {key} {str(found)[:64]!r}, not {want!r}")
    try:
        reference = ReferencePolicy.from_json(policy)
    except MalformedInputError as exc:
        raise BundleDirError(f"bundle: reference-values.json: {exc.diagnostics()}") from None
    return BundleDir(manifest=manifest, reference=reference, images=images)
