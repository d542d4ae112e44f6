"""The narrow interface the rest of the server uses to put targets into the update repository.

Releases (``fleet-server release add``) and model packages (``fleet-server model publish``) become
targets of the delegated roles ``firmware`` and ``models``; the MQTT fetch handler and the HTTP
routes read repository files.  They depend on this :class:`TargetStore` only, not on python-tuf.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from protocol.encoding import JsonValue

FIRMWARE_ROLE = "firmware"
MODELS_ROLE = "models"
TARGET_ROLES = (FIRMWARE_ROLE, MODELS_ROLE)


@dataclass(frozen=True, slots=True)
class TargetInfo:
    """A target as the repository now lists it."""

    role: str
    path: str  # the TUF target path, e.g. ``firmware/edge-camera/1.3.0.fwb``
    length: int
    sha256: bytes
    custom: Mapping[str, JsonValue]
    published: bool  # False while the role's new version still lacks threshold signatures (offline keys)


class TargetStore(Protocol):
    def add_target(self, role: str, path: str, data: bytes, custom: Mapping[str, JsonValue]) -> TargetInfo:
        """Add (or replace) ``path`` in ``role`` with these bytes and signed custom metadata.

        Signs the role's new version with the keys available here; when they reach the threshold,
        snapshot and timestamp are renewed and the target is published.  Raises an
        :class:`~protocol.errors.EdgeError` subclass for a bad role or path.
        """
        ...

    def remove_target(self, role: str, path: str) -> bool:
        """Withdraw ``path`` from ``role`` (a new signed version); False when it was not listed."""
        ...

    def list_targets(self, role: str) -> list[TargetInfo]:
        """The targets ``role`` lists now (published or pending)."""
        ...

    def read_file(self, path: str) -> bytes | None:
        """A file of the served repository (``metadata/...`` or ``targets/...``), or None."""
        ...
