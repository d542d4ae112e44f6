"""Tables of firmware releases: the release catalog, per-device assignments, and the release each
device was last attested on. (Imported by :mod:`fleet_server.storage.models`; migration 0008.)

A ``release`` is one firmware bundle published as a target of the update repository's ``firmware``
role (``target`` is its TUF target path) with the reference values its boot produces (``reference``,
ReferencePolicy JSON). ``state``: ``active`` (may be assigned) or ``withdrawn`` (removed from the
repository; no new assignments).

A ``releaseassignment`` tells one device to install one release (``id`` is the assignment id of the
signed UpdateAssignment). Its ``state`` follows the device's UpdateStatus reports: ``assigned`` ->
``downloading`` -> ``installed`` -> ``rebooting`` -> ``committed``, or ``rolled_back`` / ``failed``
(with ``reason``). ``previous_release_id`` (or, for a device that ran the administrator's policy,
``previous_class``/``previous_version``) is what the device ran when assigned: the verifier keeps
accepting it until the commit and for ``grace_ms`` after it (``grace_until``).

``devicerelease`` is the release whose reference values a device's last trusted evidence matched.
"""

from __future__ import annotations

from enum import StrEnum

from sqlalchemy import BigInteger
from sqlmodel import Field, SQLModel


class ReleaseState(StrEnum):
    ACTIVE = "active"
    WITHDRAWN = "withdrawn"


class AssignmentState(StrEnum):
    """Life of an assignment (see the module docstring)."""

    ASSIGNED = "assigned"
    DOWNLOADING = "downloading"
    INSTALLED = "installed"
    REBOOTING = "rebooting"
    COMMITTED = "committed"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"


FINAL_ASSIGNMENT_STATES = (AssignmentState.COMMITTED, AssignmentState.ROLLED_BACK, AssignmentState.FAILED)


class Release(SQLModel, table=True):
    """One firmware release: its TUF target, class, version, reference values and bundle digest."""

    id: int | None = Field(default=None, primary_key=True)
    target: str = Field(unique=True, max_length=200)                    # TUF target path
    device_class: str = Field(index=True, max_length=64)
    version: str = Field(max_length=32)
    reference: str                                                      # ReferencePolicy JSON (canonical)
    reference_sha256: str = Field(max_length=64)
    bundle_sha256: bytes
    bundle_length: int = Field(sa_type=BigInteger)
    state: str = Field(default=ReleaseState.ACTIVE, max_length=16)
    created_at: int = Field(sa_type=BigInteger)
    created_by: str = Field(default="", max_length=64)
    withdrawn_at: int | None = Field(default=None, sa_type=BigInteger)


class ReleaseAssignment(SQLModel, table=True):
    """One release assigned to one device (see the module docstring)."""

    id: str = Field(primary_key=True, max_length=32)                    # the assignment id (wire)
    device_id: str = Field(foreign_key="device.id", index=True, max_length=63)
    release_id: int = Field(foreign_key="release.id", index=True)
    state: str = Field(default=AssignmentState.ASSIGNED, max_length=16)
    reason: str = Field(default="", max_length=512)
    deadline: int = Field(sa_type=BigInteger)                           # ms: commit by then
    grace_ms: int = Field(sa_type=BigInteger)
    previous_release_id: int | None = Field(default=None, foreign_key="release.id")
    previous_class: str = Field(max_length=64)
    previous_version: str = Field(max_length=64)
    created_at: int = Field(index=True, sa_type=BigInteger)
    created_by: str = Field(default="", max_length=64)
    updated_at: int = Field(sa_type=BigInteger)
    committed_at: int | None = Field(default=None, sa_type=BigInteger)
    grace_until: int | None = Field(default=None, sa_type=BigInteger)


class DeviceRelease(SQLModel, table=True):
    """The release whose reference values the device's last trusted evidence matched."""

    device_id: str = Field(primary_key=True, foreign_key="device.id", max_length=63)
    release_id: int = Field(foreign_key="release.id", index=True)
    attested_at: int = Field(sa_type=BigInteger)
