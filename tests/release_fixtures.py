"""Helpers for release tests: an in-memory TargetStore and firmware bundle folders.

:class:`MemoryTargetStore` implements :class:`fleet_server.updates.targets.TargetStore` (the real one is
the python-tuf repository); :func:`write_bundle_dir` writes the folder ``firmware-sim release build``
produces, with the reference values computed from a firmware_sim profile's boot (no TPM).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

from firmware_sim.boot import BootMedia, build_boot_log
from firmware_sim.profiles import get_profile
from firmware_sim.release import build_release, from_profile
from fleet_server.appraisal.policy import ReferencePolicy, policy_from_eventlog
from fleet_server.updates.targets import TARGET_ROLES, TargetInfo
from fleet_server.verifier.eventlog import parse_eventlog
from protocol.encoding import JsonValue
from protocol.errors import MalformedInputError
from protocol.messages import TARGET_PATH_RE


class MemoryTargetStore:
    """Targets kept in a dict (a TargetStore for tests; nothing is signed)."""

    def __init__(self) -> None:
        self.targets: dict[tuple[str, str], tuple[bytes, TargetInfo]] = {}

    def add_target(self, role: str, path: str, data: bytes, custom: Mapping[str, JsonValue]) -> TargetInfo:
        if role not in TARGET_ROLES or TARGET_PATH_RE.fullmatch(path) is None:
            raise MalformedInputError(f"bad role or target path {role}:{path}")
        info = TargetInfo(role=role, path=path, length=len(data), sha256=hashlib.sha256(data).digest(),
                          custom=dict(custom), published=True)
        self.targets[(role, path)] = (data, info)
        return info

    def remove_target(self, role: str, path: str) -> bool:
        return self.targets.pop((role, path), None) is not None

    def list_targets(self, role: str) -> list[TargetInfo]:
        return [info for (r, _), (_, info) in sorted(self.targets.items()) if r == role]

    def read_file(self, path: str) -> bytes | None:
        for (_, p), (data, _) in self.targets.items():
            if path == f"targets/{p}":
                return data
        return None


def profile_policy(profile: str, *, device_class: str, version: str) -> ReferencePolicy:
    """The reference values of a profile's boot, as a release of ``device_class`` ``version``."""
    chosen = get_profile(profile)
    log = build_boot_log(BootMedia.from_specs(chosen.image_specs()), chosen.boot_settings).to_bytes()
    return policy_from_eventlog(parse_eventlog(log), name=f"{device_class}-{version}",
                                device_class=device_class, firmware_version=version)


def write_bundle_dir(folder: Path, *, profile: str = "updated-firmware", version: str = "1.3.0") -> Path:
    """A bundle folder (release.json, reference-values.json, images/) as ``firmware-sim release build``
    writes it for ``profile``'s boot at ``version``."""
    build_release(folder, from_profile(profile, version))
    return folder
