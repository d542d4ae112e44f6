"""Firmware anti-rollback: the lowest firmware version the device may still install, kept in TPM NV.

A version floor in a state file would not survive its own attack: restoring the agent's state
folder (and the boot folder) from a backup would bring back an old floor, and with it the old slot
and "running version", and a signed but superseded release would install again.  So the floor lives
in the TPM, in a small owner-authorized NV data index (default ``[update] floor_nv_index`` 0x01800A02, next to
the vault's monotonic counter) holding ``major``, ``minor`` and ``patch`` as three big-endian
32-bit integers.  No file on the disk takes part, so no restored file can lower it.

The agent raises the floor to a release's version when it commits that release
(:meth:`TpmVersionFloor.raise_to` never lowers it); an update below the floor is refused even if it
is newer than what the restored slot says it runs.  What this does not stop: code running on the
device with the TPM's (empty) owner authorization can write the index itself - the same limit as the
vault's counters (docs/model-protection.md).  One NV write per committed update: far below any NV
write endurance.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from agent.config import DEFAULT_FLOOR_INDEX
from agent.tpm.interface import AgentTpm
from protocol.errors import MalformedInputError
from protocol.messages import VERSION_RE

FLOOR_SIZE = 12

Version = tuple[int, int, int]


class VersionError(MalformedInputError):
    """A firmware version is not ``MAJOR.MINOR.PATCH``."""


def parse_version(text: str, what: str = "version") -> Version:
    """``"1.3.0"`` -> ``(1, 3, 0)``; :class:`VersionError` for anything else (semantic versions, no
    pre-release or build suffixes: releases are totally ordered)."""
    if not isinstance(text, str) or VERSION_RE.fullmatch(text) is None:
        raise VersionError(f"{what} {str(text)[:40]!r} is not a MAJOR.MINOR.PATCH version")
    major, minor, patch = (int(p) for p in text.split("."))
    return major, minor, patch


def format_version(v: Version) -> str:
    return f"{v[0]}.{v[1]}.{v[2]}"


class VersionFloor(Protocol):
    """Where the anti-rollback floor is kept (the TPM on a device)."""

    def minimum(self) -> Version | None:
        """The lowest installable version; ``None`` before the first committed update."""
        ...

    def raise_to(self, version: Version) -> None:
        """Make ``version`` the floor unless the floor is already at or above it."""
        ...


class TpmVersionFloor:
    """:class:`VersionFloor` in a TPM NV data index (see the module docstring)."""

    def __init__(self, tpm: Callable[[], AgentTpm], index: int = DEFAULT_FLOOR_INDEX) -> None:
        self._tpm = tpm
        self.index = index

    def minimum(self) -> Version | None:
        raw = self._tpm().nv_data_read(self.index, FLOOR_SIZE)
        if raw is None:
            return None
        return (int.from_bytes(raw[0:4], "big"), int.from_bytes(raw[4:8], "big"),
                int.from_bytes(raw[8:12], "big"))

    def raise_to(self, version: Version) -> None:
        current = self.minimum()
        if current is not None and current >= version:
            return
        self._tpm().nv_data_write(self.index, b"".join(p.to_bytes(4, "big") for p in version))
