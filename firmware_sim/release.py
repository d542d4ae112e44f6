"""The vendor's release build: a firmware bundle folder and the reference values its boot produces.

``firmware-sim release build OUT_DIR --from PROFILE_OR_FOLDER --version V`` writes the folder
:mod:`protocol.release` describes (``images/``, ``release.json``, ``reference-values.json``).

The reference values are computed from the images the way a vendor's build would, with no TPM: the
boot chain of :func:`firmware_sim.boot.build_boot_log` gives the events a device booting these images
with these settings measures, and :func:`fleet_server.appraisal.policy.policy_from_eventlog` turns
that log into a reference policy (per PCR and per event, sha256 bank, PCRs 0-9, 13 and 14) named
``<device class>-<V>``.  A device booting the bundle's images on swtpm produces exactly these values
(tests/test_release.py checks it with the TPM and tpm2-tools).

``--from`` is a profile name (``golden``, ``updated-firmware``...; its firmware image is rebuilt at
version ``V``, so PCR 0 changes with every release) or a folder of images: a bundle folder, a device's
boot slot, or a plain folder with the six image files.  A folder's images are taken as they are, so
its firmware image must already report version ``V``; its boot settings come from its
``release.json`` if it has one, else the defaults.  Everything written is a function of the inputs:
the same inputs give the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from firmware_sim.boot import DEFAULT_BANKS, BootMedia, BootSettings, build_boot_log
from firmware_sim.images import (
    AGENT_CONFIG,
    COMPONENTS,
    FIRMWARE,
    IMAGE_FILES,
    ImageSpec,
    generate_image,
    parse_image_header,
)
from firmware_sim.profiles import PROFILES, Profile, get_profile
from protocol.encoding import JsonValue
from protocol.errors import ConfigError, MalformedInputError
from protocol.messages import NAME_RE
from protocol.release import (
    IMAGES_DIR,
    REFERENCE_VALUES_FILE,
    RELEASE_FILE,
    ReleaseBoot,
    ReleaseComponent,
    ReleaseError,
    ReleaseManifest,
)

#: The bank and PCRs of the reference values (the selection the server quotes by default).
REFERENCE_BANK = "sha256"


@dataclass(frozen=True, slots=True)
class ReleaseImages:
    """What a release boots: the bytes of every component and the platform settings."""

    device_class: str
    version: str
    images: Mapping[str, bytes]  # component -> bytes, in boot order
    settings: BootSettings

    @property
    def media(self) -> BootMedia:
        return BootMedia(**{c.replace("-", "_"): self.images[c] for c in COMPONENTS})


def _check_version(version: str) -> str:
    if not NAME_RE.fullmatch(version) or len(version) > 32:
        raise ConfigError(f"release version {version[:40]!r} must be 1-32 letters, digits, "
                          "'.', '_', '+', '-'")
    return version


def settings_to_boot(settings: BootSettings) -> ReleaseBoot:
    return ReleaseBoot(secure_boot=settings.secure_boot, kernel_cmdline=settings.kernel_cmdline,
                       startup_locality=settings.startup_locality)


def boot_to_settings(boot: ReleaseBoot) -> BootSettings:
    return BootSettings(secure_boot=boot.secure_boot, kernel_cmdline=boot.kernel_cmdline,
                        startup_locality=boot.startup_locality)


def from_profile(profile: Profile | str, version: str | None = None) -> ReleaseImages:
    """The images of ``profile``; with ``version``, its firmware image rebuilt at that version."""
    chosen = get_profile(profile)
    if version is not None:
        _check_version(version)
        chosen = chosen.replace(firmware=ImageSpec(FIRMWARE, version, chosen.firmware.variant))
    specs = chosen.image_specs()
    return ReleaseImages(device_class=chosen.device_class, version=chosen.firmware.version,
                         images={c: generate_image(specs[c]) for c in COMPONENTS},
                         settings=chosen.boot_settings)


def read_manifest(path: Path) -> ReleaseManifest:
    """Parse a ``release.json`` file; :class:`~protocol.release.ReleaseError` if malformed."""
    try:
        raw = json.loads(Path(path).read_bytes())
    except OSError as exc:
        raise ReleaseError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ReleaseError(f"{path} is not JSON: {str(exc)[:120]}") from None
    return ReleaseManifest.from_json(raw)


def _device_class_of(agent_config: bytes, where: Path) -> str:
    try:
        name = tomllib.loads(agent_config.decode())["class"]["name"]
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, KeyError, TypeError) as exc:
        raise ConfigError(f"{where}: cannot read the device class ([class] name): {exc}") from None
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ConfigError(f"{where}: invalid device class {str(name)[:40]!r}")
    return name


def from_folder(folder: Path, version: str) -> ReleaseImages:
    """The images of a folder (see the module docstring); its firmware must report ``version``."""
    folder = Path(folder)
    images_dir = folder / IMAGES_DIR if (folder / IMAGES_DIR).is_dir() else folder
    settings = BootSettings()
    if (folder / RELEASE_FILE).is_file():
        settings = boot_to_settings(read_manifest(folder / RELEASE_FILE).boot)
    images: dict[str, bytes] = {}
    for component in COMPONENTS:
        path = images_dir / IMAGE_FILES[component]
        try:
            images[component] = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read {component} image {path}: {exc.strerror or exc}") from None
    try:
        firmware_version = parse_image_header(images[FIRMWARE]).version
    except MalformedInputError as exc:
        raise ConfigError(f"{images_dir / IMAGE_FILES[FIRMWARE]}: {exc.diagnostics()}") from None
    if firmware_version != _check_version(version):
        raise ConfigError(f"{images_dir / IMAGE_FILES[FIRMWARE]} is firmware version {firmware_version!r}, "
                          f"not --version {version!r}")
    device_class = _device_class_of(images[AGENT_CONFIG], images_dir / IMAGE_FILES[AGENT_CONFIG])
    return ReleaseImages(device_class=device_class, version=version, images=images, settings=settings)


def resolve_source(source: str, version: str) -> ReleaseImages:
    """``--from``: an existing folder, else a profile name."""
    if Path(source).is_dir():
        return from_folder(Path(source), version)
    if source not in PROFILES:
        raise ConfigError(f"--from {source[:80]!r} is neither a folder nor a profile "
                          f"(profiles: {', '.join(PROFILES)})")
    return from_profile(source, version)


def manifest_of(release: ReleaseImages) -> ReleaseManifest:
    components = {c: ReleaseComponent(file=IMAGE_FILES[c], size=len(release.images[c]),
                                      sha256=hashlib.sha256(release.images[c]).hexdigest())
                  for c in COMPONENTS}
    return ReleaseManifest(device_class=release.device_class, version=release.version,
                           components=components, boot=settings_to_boot(release.settings))


def reference_values(release: ReleaseImages) -> dict[str, JsonValue]:
    """The reference policy (JSON form) of a boot of ``release``: no TPM, the boot chain in software."""
    from fleet_server.appraisal.policy import policy_from_eventlog
    from fleet_server.verifier.eventlog import parse_eventlog

    log = build_boot_log(release.media, release.settings, DEFAULT_BANKS)
    policy = policy_from_eventlog(parse_eventlog(log.to_bytes()),
                                  name=f"{release.device_class}-{release.version}",
                                  device_class=release.device_class, firmware_version=release.version,
                                  bank=REFERENCE_BANK)
    return policy.to_json()


def _json_bytes(value: Mapping[str, JsonValue]) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()


def write_slot(folder: Path, release: ReleaseImages) -> ReleaseManifest:
    """Write ``release``'s images and its ``release.json`` flat into ``folder`` (an A/B boot slot)."""
    from agent.statefile import write_atomic

    folder.mkdir(parents=True, exist_ok=True)
    manifest = manifest_of(release)
    for component in COMPONENTS:
        write_atomic(folder / IMAGE_FILES[component], release.images[component], mode=0o644)
    write_atomic(folder / RELEASE_FILE, manifest.to_bytes(), mode=0o644)
    return manifest


def build_release(out_dir: Path, release: ReleaseImages) -> dict[str, JsonValue]:
    """Write the bundle folder of ``release`` into ``out_dir`` (absent or empty); returns a summary."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} exists and is not an empty folder")
    manifest = manifest_of(release)
    policy = reference_values(release)
    created = not out.exists()
    images = out / IMAGES_DIR
    try:
        images.mkdir(parents=True, exist_ok=True)
        for component in COMPONENTS:
            (images / IMAGE_FILES[component]).write_bytes(release.images[component])
        (out / REFERENCE_VALUES_FILE).write_bytes(_json_bytes(policy))
        (out / RELEASE_FILE).write_bytes(manifest.to_bytes())  # last: a folder with it is complete
    except BaseException:
        shutil.rmtree(out if created else images, ignore_errors=True)
        if not created:
            for name in (REFERENCE_VALUES_FILE, RELEASE_FILE):
                (out / name).unlink(missing_ok=True)
        raise
    events = policy["events"]
    return {"out_dir": str(out), "device_class": release.device_class, "version": release.version,
            "components": manifest.to_json()["components"],
            "reference_values": {"name": policy["name"], "pcrs": policy["pcrs"],
                                 "events": len(events) if isinstance(events, list) else 0}}
