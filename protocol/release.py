"""A firmware release's manifest (``release.json``) and the bundle folder that carries it.

``firmware-sim release build`` (the vendor's build) writes a bundle *folder*::

    OUT_DIR/
      release.json            the manifest below
      reference-values.json   the reference policy its boot produces (fleet_server.appraisal.policy
                              JSON form: device_class, firmware_version, pcrs, events)
      images/                 one file per boot stage (firmware.bin, bootloader.efi, vmlinuz, ...)

``release.json`` (format 1; also written into every A/B boot slot next to its images, see
:mod:`agent.update.bootctl`)::

    {"format": 1, "device_class": "edge-camera", "version": "1.3.0",
     "components": {"firmware": {"file": "firmware.bin", "size": 98304, "sha256": "<hex>"}, ...},
     "boot": {"secure_boot": true, "kernel_cmdline": "root=...", "startup_locality": null}}

``boot`` holds the platform settings that are not images but change the measurements (UEFI Secure
Boot state, the kernel command line GRUB passes, the optional StartupLocality event), so the
release's reference values can be reproduced from the folder alone.

:meth:`ReleaseManifest.from_json` is pure and strict.  :func:`load_bundle_folder` is the one I/O
function: the fleet server's ``release add`` uses it to read a folder before packing it with
:func:`protocol.firmware_bundle.pack` (``manifest`` = release.json's content, ``files`` = images); it
is here, not in the simulator, so the server reads a vendor's folder without importing the simulator.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from protocol.encoding import JsonValue
from protocol.errors import MalformedInputError, MessageError
from protocol.firmware_bundle import FILE_NAME_RE, MAX_FILES
from protocol.messages import NAME_RE, Fields

RELEASE_FORMAT = 1
RELEASE_FILE = "release.json"
REFERENCE_VALUES_FILE = "reference-values.json"
IMAGES_DIR = "images"
COMPONENT_RE = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
MAX_CMDLINE = 1024
MAX_IMAGE_SIZE = 256 * 1024 * 1024
MAX_JSON_FILE = 4 * 1024 * 1024
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class ReleaseError(MalformedInputError):
    """A release manifest or bundle folder is malformed or inconsistent."""


@dataclass(frozen=True, slots=True)
class ReleaseComponent:
    """One boot stage's image: its file name inside ``images/`` (and a slot), size and SHA-256."""

    file: str
    size: int
    sha256: str


@dataclass(frozen=True, slots=True)
class ReleaseBoot:
    """Platform settings of the release's boot (see the module docstring)."""

    secure_boot: bool = True
    kernel_cmdline: str = ""
    startup_locality: int | None = None


@dataclass(frozen=True, slots=True)
class ReleaseManifest:
    device_class: str
    version: str
    components: Mapping[str, ReleaseComponent]
    boot: ReleaseBoot

    def to_json(self) -> dict[str, JsonValue]:
        return {
            "format": RELEASE_FORMAT,
            "device_class": self.device_class,
            "version": self.version,
            "components": {name: {"file": c.file, "size": c.size, "sha256": c.sha256}
                           for name, c in self.components.items()},
            "boot": {"secure_boot": self.boot.secure_boot, "kernel_cmdline": self.boot.kernel_cmdline,
                     "startup_locality": self.boot.startup_locality},
        }

    def to_bytes(self) -> bytes:
        """The file form: indented JSON with sorted keys and a final newline (deterministic)."""
        return (json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, obj: JsonValue) -> ReleaseManifest:
        """Parse strictly: unknown or missing fields, bad names, sizes or digests are refused."""
        try:
            f = Fields(obj, "release")
            if f.integer("format", lo=0, hi=1000) != RELEASE_FORMAT:
                raise ReleaseError(f"release: unsupported format (expected {RELEASE_FORMAT})")
            device_class = f.text("device_class", max_len=64, pattern=NAME_RE)
            version = f.text("version", max_len=32, pattern=NAME_RE)
            raw_components = f.raw("components")
            b = Fields(f.raw("boot"), "release.boot")
            f.done()
            secure_boot = b.flag("secure_boot")
            cmdline = b.text("kernel_cmdline", max_len=MAX_CMDLINE)
            locality = b.raw("startup_locality")
            b.done()
            if locality is not None and (not isinstance(locality, int) or isinstance(locality, bool)
                                         or locality not in (0, 3, 4)):
                raise ReleaseError("release.boot.startup_locality: expected null, 0, 3 or 4")
            if not cmdline.isprintable():
                raise ReleaseError("release.boot.kernel_cmdline: must be printable text")
            if not isinstance(raw_components, dict) or not 0 < len(raw_components) <= MAX_FILES:
                raise ReleaseError(f"release.components: expected an object of 1-{MAX_FILES} components")
            components: dict[str, ReleaseComponent] = {}
            files: set[str] = set()
            for name, raw in raw_components.items():
                where = f"release.components.{str(name)[:40]}"
                if COMPONENT_RE.fullmatch(name) is None:
                    raise ReleaseError(f"{where}: invalid component name")
                c = Fields(raw, where)
                comp = ReleaseComponent(file=c.text("file", max_len=64, pattern=FILE_NAME_RE),
                                        size=c.integer("size", hi=MAX_IMAGE_SIZE),
                                        sha256=c.text("sha256", max_len=64, pattern=_SHA256_RE))
                c.done()
                if comp.file in files or comp.file in (RELEASE_FILE, REFERENCE_VALUES_FILE):
                    raise ReleaseError(f"{where}.file: {comp.file!r} is used twice or reserved")
                files.add(comp.file)
                components[name] = comp
        except MessageError as exc:
            raise ReleaseError(exc.diagnostics()) from None
        return cls(device_class=device_class, version=version, components=MappingProxyType(components),
                   boot=ReleaseBoot(secure_boot=secure_boot, kernel_cmdline=cmdline,
                                    startup_locality=locality))


def _read_json(path: Path) -> JsonValue:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_JSON_FILE + 1)
    except FileNotFoundError:
        raise ReleaseError(f"{path} is missing") from None
    except OSError as exc:
        raise ReleaseError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_JSON_FILE:
        raise ReleaseError(f"{path} is larger than {MAX_JSON_FILE} bytes")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ReleaseError(f"{path} is not JSON: {str(exc)[:120]}") from None


def load_bundle_folder(path: Path) -> tuple[dict[str, JsonValue], dict[str, bytes], dict[str, JsonValue]]:
    """Read and check a bundle folder: ``(manifest, files, reference_policy_json)``.

    ``manifest`` is release.json's content (validated by :meth:`ReleaseManifest.from_json`);
    ``files`` maps each component's file name to its bytes, whose size and SHA-256 must match the
    manifest, and ``images/`` may hold nothing else; ``reference_policy_json`` is the parsed
    reference-values.json, whose ``device_class`` and ``firmware_version`` must be the manifest's
    (its full validation is the server's ``ReferencePolicy.from_json``).  Raises :class:`ReleaseError`.
    """
    folder = Path(path)
    if not folder.is_dir() or folder.is_symlink():
        raise ReleaseError(f"{folder} is not a bundle folder")
    entries = {p.name for p in folder.iterdir()}
    if entries != {RELEASE_FILE, REFERENCE_VALUES_FILE, IMAGES_DIR}:
        raise ReleaseError(f"{folder}: a bundle folder holds exactly {RELEASE_FILE}, {REFERENCE_VALUES_FILE} "
                           f"and {IMAGES_DIR}/ (found {', '.join(sorted(entries)[:8]) or 'nothing'})")
    raw_manifest = _read_json(folder / RELEASE_FILE)
    try:
        manifest = ReleaseManifest.from_json(raw_manifest)
    except ReleaseError as exc:
        raise ReleaseError(f"{folder / RELEASE_FILE}: {exc.diagnostics()}") from None
    images = folder / IMAGES_DIR
    if images.is_symlink() or not images.is_dir():
        raise ReleaseError(f"{images} is not a folder")
    try:
        present = {p.name for p in images.iterdir()}
    except OSError as exc:
        raise ReleaseError(f"cannot list {images}: {exc.strerror or exc}") from None
    expected = {c.file for c in manifest.components.values()}
    if present != expected:
        extra, missing = sorted(present - expected), sorted(expected - present)
        raise ReleaseError(f"{images}: " + "; ".join(
            ([f"missing {', '.join(missing)}"] if missing else [])
            + ([f"not in release.json: {', '.join(extra)}"] if extra else [])))
    files: dict[str, bytes] = {}
    for name, comp in manifest.components.items():
        file_path = images / comp.file
        info = file_path.lstat()
        if not stat.S_ISREG(info.st_mode) or info.st_size != comp.size:
            raise ReleaseError(f"{file_path}: not a file of {comp.size} bytes as release.json says ({name})")
        try:
            data = file_path.read_bytes()
        except OSError as exc:
            raise ReleaseError(f"cannot read {file_path}: {exc.strerror or exc}") from None
        if len(data) != comp.size or not hmac.compare_digest(hashlib.sha256(data).hexdigest(), comp.sha256):
            raise ReleaseError(f"{file_path}: content does not match its sha256 in release.json")
        files[comp.file] = data
    policy = _read_json(folder / REFERENCE_VALUES_FILE)
    if not isinstance(policy, dict):
        raise ReleaseError(f"{folder / REFERENCE_VALUES_FILE}: expected a JSON object")
    names = (policy.get("device_class"), policy.get("firmware_version"))
    if names != (manifest.device_class, manifest.version):
        raise ReleaseError(f"{folder / REFERENCE_VALUES_FILE}: device_class/firmware_version differ from "
                           f"release.json ({manifest.device_class} {manifest.version})")
    assert isinstance(raw_manifest, dict)
    return raw_manifest, files, policy
