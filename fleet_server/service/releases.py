"""Firmware releases: add, withdraw and assign them (the CLI and the API), and the rules for the
installation progress devices report (the processor).

* :func:`add_release` packs a bundle folder into one ``.fwb`` file, makes it the target
  ``firmware/<class>/<version>.fwb`` of the update repository's ``firmware`` role (through a
  :class:`~fleet_server.updates.targets.TargetStore`) with the class, version and reference values in
  its signed custom metadata, and stores the release.
* :func:`assign_release` writes one assignment per device and, in the same transaction, the signed
  :class:`~protocol.messages.UpdateAssignment` into the outbox (topic ``.../down/update``), which a
  worker publishes.  The device still verifies everything through TUF.
* :func:`status_problem` says whether a reported :class:`~protocol.messages.UpdateStatus` may move an
  assignment (strict: only forward, never out of a final state, ``committed`` only once the device's
  trusted evidence matched the release).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleet_server.keys import ResultSigner
from fleet_server.storage.models import ATTESTED_STATES
from fleet_server.storage.release_repo import AssignmentRecord, NewAssignment, NewRelease, ReleaseRecord
from fleet_server.storage.release_tables import AssignmentState, ReleaseState
from fleet_server.storage.repo import Repository, Tx
from fleet_server.updates.bundle_dir import read_bundle_dir
from fleet_server.updates.targets import FIRMWARE_ROLE, TargetStore
from protocol import topics
from protocol.encoding import JsonValue
from protocol.errors import EdgeError
from protocol.firmware_bundle import SUFFIX
from protocol.messages import TARGET_PATH_RE, VERSION_RE, UpdateAssignment, new_message_id
from protocol.topics import validate_device_id

DOWN_UPDATE = "update"
DEFAULT_DEADLINE_S = 3600.0
DEFAULT_GRACE_S = 86_400.0
MAX_DEADLINE_S = 30 * 86_400.0
CLASS_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
"""A device class that can name a release (it is a component of the TUF target path)."""

# Forward order of the progress states; rolled_back and failed may follow any non-final state.
_ORDER = {AssignmentState.ASSIGNED: 0, AssignmentState.DOWNLOADING: 1, AssignmentState.INSTALLED: 2,
          AssignmentState.REBOOTING: 3, AssignmentState.COMMITTED: 4}
_FINAL = (AssignmentState.COMMITTED, AssignmentState.ROLLED_BACK, AssignmentState.FAILED)


class ReleaseError(EdgeError):
    """A release operation cannot be carried out (bad class or version, unknown release or device...)."""


def release_target(device_class: str, version: str) -> str:
    """The TUF target path of a release: ``firmware/<class>/<version>.fwb``."""
    if CLASS_RE.fullmatch(device_class) is None:
        raise ReleaseError(f"release class {device_class[:80]!r}: lowercase letters, digits, '.', '_', '-' "
                           "(at most 64)")
    if VERSION_RE.fullmatch(version) is None:
        raise ReleaseError(f"release version {version[:40]!r}: expected MAJOR.MINOR.PATCH")
    target = f"{FIRMWARE_ROLE}/{device_class}/{version}{SUFFIX}"
    if TARGET_PATH_RE.fullmatch(target) is None:  # pragma: no cover - implied by the two checks
        raise ReleaseError(f"release target {target!r} is not a valid target path")
    return target


def add_release(repo: Repository, store: TargetStore, bundle_dir: Path, *, device_class: str, version: str,
                now: int, actor: str) -> ReleaseRecord:
    """Publish the bundle folder as a release (see the module docstring)."""
    target = release_target(device_class, version)
    bundle = read_bundle_dir(bundle_dir, device_class=device_class, version=version)
    if repo.releases.release(target) is not None:
        raise ReleaseError(f"release {target} exists already (withdrawn releases are not replaced)")
    data = bundle.pack()
    reference = bundle.reference.canonical_bytes().decode("utf-8")
    custom: dict[str, JsonValue] = {"kind": "firmware", "device_class": device_class, "version": version,
                                    "reference_values": bundle.reference.to_json()}
    info = store.add_target(FIRMWARE_ROLE, target, data, custom)
    if info.length != len(data) or info.sha256 != hashlib.sha256(data).digest():
        raise ReleaseError(f"the update repository stored {target} with another length or digest")
    with repo.write("storing a release") as tx:
        if tx.releases.release(target) is not None:
            raise ReleaseError(f"release {target} exists already")
        return tx.releases.insert_release(NewRelease(
            target=target, device_class=device_class, version=version, reference=reference,
            reference_sha256=bundle.reference.sha256(), bundle_sha256=info.sha256, bundle_length=info.length,
            created_at=now, created_by=actor))


def withdraw_release(repo: Repository, store: TargetStore, target: str, *, now: int) -> ReleaseRecord:
    """Remove the release's target from the repository and refuse new assignments of it."""
    with repo.write("withdrawing a release") as tx:
        found = tx.releases.release(target)
        if found is None:
            raise ReleaseError(f"no release {target[:200]!r}")
        if found.state == ReleaseState.WITHDRAWN:
            raise ReleaseError(f"release {target} is already withdrawn")
        store.remove_target(FIRMWARE_ROLE, target)
        tx.releases.withdraw(found.id, now)
        withdrawn = tx.releases.release(target)
    assert withdrawn is not None
    return withdrawn


@dataclass(frozen=True, slots=True)
class Assigned:
    assignment_id: str
    device_id: str
    target: str
    deadline: int


def assign_release(repo: Repository, target: str, device_ids: Sequence[str], *, signer: ResultSigner,
                   now: int, deadline_s: float = DEFAULT_DEADLINE_S, grace_s: float = DEFAULT_GRACE_S,
                   actor: str) -> list[Assigned]:
    """Assign an active release to devices of its class (one transaction; see the module docstring)."""
    if not device_ids:
        raise ReleaseError("give at least one device")
    if not 0 < deadline_s <= MAX_DEADLINE_S:
        raise ReleaseError(f"the deadline must be more than 0 and at most {MAX_DEADLINE_S:.0f} s")
    if not 0 <= grace_s <= MAX_DEADLINE_S:
        raise ReleaseError(f"the grace must be 0 to {MAX_DEADLINE_S:.0f} s")
    for device_id in device_ids:
        validate_device_id(device_id)
    deadline = now + round(deadline_s * 1000)
    with repo.write("assigning a release") as tx:
        release = tx.releases.release(target)
        if release is None:
            raise ReleaseError(f"no release {target[:200]!r}")
        return [assign_in_tx(tx, release, device_id, signer=signer, now=now, deadline=deadline,
                             grace_ms=round(grace_s * 1000), actor=actor)
                for device_id in sorted(set(device_ids))]


def assign_in_tx(tx: Tx, release: ReleaseRecord, device_id: str, *, signer: ResultSigner, now: int,
                 deadline: int, grace_ms: int, actor: str) -> Assigned:
    """Assign ``release`` to one device in the caller's write transaction (the checks and the signed
    message of :func:`assign_release`; a staged rollout assigns through it too)."""
    if release.state != ReleaseState.ACTIVE:
        raise ReleaseError(f"release {release.target} is {release.state}")
    device = tx.device_identity(device_id)
    if device is None:
        raise ReleaseError(f"no device {device_id!r}")
    if device.state not in ATTESTED_STATES:
        raise ReleaseError(f"device {device_id} is {device.state}; releases go to attested devices")
    if device.device_class != release.device_class:
        raise ReleaseError(f"device {device_id} is of class {device.device_class}, the release is "
                           f"for {release.device_class}")
    current = tx.releases.latest_assignments([device_id]).get(device_id)
    attested = tx.releases.attested_releases([device_id]).get(device_id)
    if current is not None and current.state not in _FINAL:
        if now < current.deadline:
            raise ReleaseError(f"device {device_id} is still installing {current.target} "
                               f"({current.state}) until {current.deadline}")
        # Its deadline passed without a commit (and without a report): it is over.
        tx.releases.set_assignment_state(current.id, state=AssignmentState.FAILED,
                                         reason="deadline passed without a commit", now=now)
    if attested == release.id:
        raise ReleaseError(f"device {device_id} runs {release.target} already")
    assignment_id = new_message_id()
    tx.releases.insert_assignment(NewAssignment(
        id=assignment_id, device_id=device_id, release_id=release.id, deadline=deadline,
        grace_ms=grace_ms, previous_release_id=attested, previous_class=device.device_class,
        previous_version=device.firmware_version, created_at=now, created_by=actor))
    message = UpdateAssignment(assignment_id=assignment_id, kind="firmware", target=release.target,
                               version=release.version, deadline=deadline)
    tx.add_outbox(topics.device_down(device_id, DOWN_UPDATE), signer.sign(message, aud=device_id, ts=now),
                  now)
    return Assigned(assignment_id, device_id, release.target, deadline)


def status_problem(assignment: AssignmentRecord, *, state: str, target: str, reason: str,
                   attested_release_id: int | None) -> str | None:
    """Why a reported ``state`` cannot move ``assignment``, or None (see the module docstring)."""
    if target != assignment.target:
        return f"assignment {assignment.id} is for {assignment.target}, not {target}"
    if assignment.state in _FINAL:
        return f"assignment {assignment.id} is {assignment.state} already"
    if state in (AssignmentState.ROLLED_BACK, AssignmentState.FAILED):
        return None if reason.strip() else f"a {state} status must give its reason"
    if _ORDER[AssignmentState(state)] < _ORDER[AssignmentState(assignment.state)]:
        return f"assignment {assignment.id} is {assignment.state}; it cannot go back to {state}"
    if state == AssignmentState.COMMITTED and attested_release_id != assignment.release_id:
        return (f"assignment {assignment.id}: committed before any trusted evidence matched "
                f"{assignment.target}")
    return None


def release_json(rec: ReleaseRecord) -> dict[str, Any]:
    """A release as the CLI and the API print it."""
    return {"target": rec.target, "device_class": rec.device_class, "version": rec.version,
            "state": rec.state, "bundle_sha256": rec.bundle_sha256.hex(), "bundle_length": rec.bundle_length,
            "reference_sha256": rec.reference_sha256, "created_at": rec.created_at,
            "created_by": rec.created_by, "withdrawn_at": rec.withdrawn_at}


def assignment_json(rec: AssignmentRecord) -> dict[str, Any]:
    """An assignment as the CLI and the API print it."""
    return {"assignment_id": rec.id, "device_id": rec.device_id, "target": rec.target, "version": rec.version,
            "state": rec.state, "reason": rec.reason, "deadline": rec.deadline, "created_at": rec.created_at,
            "updated_at": rec.updated_at, "committed_at": rec.committed_at, "grace_until": rec.grace_until}
