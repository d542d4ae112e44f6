"""Reading a firmware bundle folder (``firmware-sim release build`` writes one) for ``release add``.

A bundle folder holds exactly::

    release.json            the release manifest (a JSON object; becomes the .fwb header's manifest)
    reference-values.json   the reference values of the release's boot (ReferencePolicy JSON)
    images/<name>           the boot images (plain files, names as protocol.firmware_bundle allows)

Everything is checked strictly: no other entries, no symbolic links or folders inside ``images/``,
bounded sizes, the manifest's ``device_class``/``version`` (when present) and the reference values'
class and firmware equal to the ones the administrator gives.  Raises :class:`BundleDirError` with
one line naming the problem.
"""

from __future__ import annotations

import json
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fleet_server.appraisal.policy import ReferencePolicy
from protocol.encoding import JsonValue, decode_object
from protocol.errors import MalformedInputError
from protocol.firmware_bundle import FILE_NAME_RE, MAX_BUNDLE, MAX_FILES, MAX_HEADER, pack

RELEASE_FILE = "release.json"
REFERENCE_FILE = "reference-values.json"
IMAGES_DIR = "images"
MAX_REFERENCE = 4 * 1024 * 1024


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


def _read_regular(path: Path, limit: int) -> bytes:
    try:
        info = path.lstat()
    except OSError as exc:
        raise BundleDirError(f"bundle: cannot read {path.name}: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise BundleDirError(f"bundle: {path.name} is not a regular file")
    if info.st_size > limit:
        raise BundleDirError(f"bundle: {path.name} is larger than {limit} bytes")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BundleDirError(f"bundle: cannot read {path.name}: {exc.strerror}") from None
    if len(data) > limit:
        raise BundleDirError(f"bundle: {path.name} is larger than {limit} bytes")
    return data


def read_bundle_dir(folder: Path, *, device_class: str, version: str) -> BundleDir:
    """Read and check the bundle folder ``folder`` for a release of ``device_class`` ``version``."""
    if not folder.is_dir() or folder.is_symlink():
        raise BundleDirError(f"bundle: {folder} is not a folder")
    entries = {p.name for p in folder.iterdir()}
    expected = {RELEASE_FILE, REFERENCE_FILE, IMAGES_DIR}
    if entries != expected:
        missing, extra = sorted(expected - entries), sorted(entries - expected)
        raise BundleDirError("bundle: expected release.json, reference-values.json and images/"
                             + (f"; missing {', '.join(missing)}" if missing else "")
                             + (f"; unexpected {', '.join(extra[:5])}" if extra else ""))
    try:
        manifest = decode_object(_read_regular(folder / RELEASE_FILE, MAX_HEADER), max_size=MAX_HEADER)
    except MalformedInputError as exc:
        raise BundleDirError(f"bundle: release.json: {exc.diagnostics()}") from None
    for key, want in (("device_class", device_class), ("version", version)):
        if key in manifest and manifest[key] != want:
            raise BundleDirError(f"bundle: release.json says {key} {str(manifest[key])[:64]!r}, not {want!r}")
    try:
        raw = _read_regular(folder / REFERENCE_FILE, MAX_REFERENCE)
        reference = ReferencePolicy.from_json(json.loads(raw))
    except ValueError as exc:
        raise BundleDirError(f"bundle: reference-values.json is not JSON: {exc}") from None
    except MalformedInputError as exc:
        raise BundleDirError(f"bundle: reference-values.json: {exc.diagnostics()}") from None
    if reference.device_class != device_class or reference.firmware_version != version:
        raise BundleDirError(f"bundle: reference-values.json is for class {reference.device_class} firmware "
                             f"{reference.firmware_version}, not {device_class} {version}")
    images_dir = folder / IMAGES_DIR
    if images_dir.is_symlink() or not images_dir.is_dir():
        raise BundleDirError("bundle: images is not a folder")
    images: dict[str, bytes] = {}
    total = 0
    for path in sorted(images_dir.iterdir()):
        if FILE_NAME_RE.fullmatch(path.name) is None:
            raise BundleDirError(f"bundle: images/{path.name[:80]!r} is not a valid image name")
        if len(images) >= MAX_FILES:
            raise BundleDirError(f"bundle: more than {MAX_FILES} images")
        data = _read_regular(path, MAX_BUNDLE - total)
        total += len(data)
        images[path.name] = data
    if not images:
        raise BundleDirError("bundle: images/ is empty")
    return BundleDir(manifest=manifest, reference=reference, images=images)
