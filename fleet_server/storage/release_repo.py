"""SQL of the release tables (:mod:`fleet_server.storage.release_tables`).

Reached through the repository: ``tx.releases`` (a :class:`ReleaseTx` in the caller's write
transaction) and ``repo.releases`` (:class:`ReleaseReads`, short read transactions). Rows become
frozen dataclasses here; database failures become :class:`~protocol.errors.StorageError`.

On the evidence path :meth:`ReleaseTx.release_contexts` reads, for a batch of devices, their newest
assignment and attested release with the releases involved (two queries, none when no device of the
batch ever had an assignment: one small query).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, Table, delete, insert, select, update
from sqlalchemy.exc import SQLAlchemyError

from fleet_server.storage import models
from fleet_server.storage.db import storage_error
from fleet_server.storage.release_tables import AssignmentState, ReleaseState

_TABLES = models.SQLModel.metadata.tables
_RELEASE: Table = _TABLES["release"]
_ASSIGNMENT: Table = _TABLES["releaseassignment"]
_DEVREL: Table = _TABLES["devicerelease"]
r, a, dr = _RELEASE.c, _ASSIGNMENT.c, _DEVREL.c


@dataclass(frozen=True, slots=True)
class ReleaseRecord:
    id: int
    target: str
    device_class: str
    version: str
    reference: str  # ReferencePolicy JSON
    reference_sha256: str
    bundle_sha256: bytes
    bundle_length: int
    state: str
    created_at: int
    created_by: str
    withdrawn_at: int | None


@dataclass(frozen=True, slots=True)
class NewRelease:
    target: str
    device_class: str
    version: str
    reference: str
    reference_sha256: str
    bundle_sha256: bytes
    bundle_length: int
    created_at: int
    created_by: str


@dataclass(frozen=True, slots=True)
class AssignmentRecord:
    id: str
    device_id: str
    release_id: int
    target: str
    version: str
    state: str
    reason: str
    deadline: int
    grace_ms: int
    previous_release_id: int | None
    previous_class: str
    previous_version: str
    created_at: int
    created_by: str
    updated_at: int
    committed_at: int | None
    grace_until: int | None


@dataclass(frozen=True, slots=True)
class NewAssignment:
    id: str
    device_id: str
    release_id: int
    deadline: int
    grace_ms: int
    previous_release_id: int | None
    previous_class: str
    previous_version: str
    created_at: int
    created_by: str


@dataclass(frozen=True, slots=True)
class ReleaseContext:
    """What the verifier needs of one device's releases (see :mod:`fleet_server.appraisal.releases`)."""

    device_id: str
    assignment: AssignmentRecord | None  # the newest assignment
    attested_release_id: int | None
    releases: dict[int, ReleaseRecord]  # every release the two above name


_RELEASE_COLUMNS = (r.id, r.target, r.device_class, r.version, r.reference, r.reference_sha256,
                    r.bundle_sha256, r.bundle_length, r.state, r.created_at, r.created_by, r.withdrawn_at)
_ASSIGNMENT_COLUMNS = (a.id, a.device_id, a.release_id, r.target, r.version, a.state, a.reason, a.deadline,
                       a.grace_ms, a.previous_release_id, a.previous_class, a.previous_version, a.created_at,
                       a.created_by, a.updated_at, a.committed_at, a.grace_until)


def _release(row: Any) -> ReleaseRecord:
    return ReleaseRecord(row.id, row.target, row.device_class, row.version, row.reference,
                         row.reference_sha256, bytes(row.bundle_sha256), int(row.bundle_length), row.state,
                         row.created_at, row.created_by, row.withdrawn_at)


def _assignment(row: Any) -> AssignmentRecord:
    return AssignmentRecord(*row)


def _assignments() -> Any:
    return select(*_ASSIGNMENT_COLUMNS).select_from(_ASSIGNMENT.join(_RELEASE, r.id == a.release_id))


class ReleaseTx:
    """Statements on the release tables inside one transaction (``tx.releases``)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    # -- releases ----------------------------------------------------------------------------------
    def insert_release(self, n: NewRelease) -> ReleaseRecord:
        self.conn.execute(insert(_RELEASE).values(
            target=n.target, device_class=n.device_class, version=n.version, reference=n.reference,
            reference_sha256=n.reference_sha256, bundle_sha256=n.bundle_sha256, bundle_length=n.bundle_length,
            state=ReleaseState.ACTIVE, created_at=n.created_at, created_by=n.created_by[:64]))
        found = self.release(n.target)
        assert found is not None
        return found

    def release(self, target: str) -> ReleaseRecord | None:
        row = self.conn.execute(select(*_RELEASE_COLUMNS).where(r.target == target)).first()
        return None if row is None else _release(row)

    def releases(self) -> list[ReleaseRecord]:
        """Every release, newest first."""
        return [_release(row) for row in self.conn.execute(
            select(*_RELEASE_COLUMNS).order_by(r.created_at.desc(), r.id.desc()))]

    def releases_by_id(self, ids: Sequence[int]) -> dict[int, ReleaseRecord]:
        if not ids:
            return {}
        rows = self.conn.execute(select(*_RELEASE_COLUMNS).where(r.id.in_(sorted(set(ids)))))
        return {row.id: _release(row) for row in rows}

    def withdraw(self, release_id: int, now: int) -> None:
        self.conn.execute(update(_RELEASE).where(r.id == release_id)
                          .values(state=ReleaseState.WITHDRAWN, withdrawn_at=now))

    # -- assignments -------------------------------------------------------------------------------
    def insert_assignment(self, n: NewAssignment) -> None:
        self.conn.execute(insert(_ASSIGNMENT).values(
            id=n.id, device_id=n.device_id, release_id=n.release_id, state=AssignmentState.ASSIGNED,
            reason="", deadline=n.deadline, grace_ms=n.grace_ms, previous_release_id=n.previous_release_id,
            previous_class=n.previous_class, previous_version=n.previous_version, created_at=n.created_at,
            created_by=n.created_by[:64], updated_at=n.created_at))

    def assignment(self, assignment_id: str, *, lock: bool = False) -> AssignmentRecord | None:
        stmt = _assignments().where(a.id == assignment_id)
        if lock:
            stmt = stmt.with_for_update(of=_ASSIGNMENT)
        row = self.conn.execute(stmt).first()
        return None if row is None else _assignment(row)

    def assignments(self, *, device_id: str | None = None, release_id: int | None = None,
                    limit: int = 100) -> list[AssignmentRecord]:
        """Assignments, newest first, optionally of one device or one release."""
        stmt = _assignments().order_by(a.created_at.desc(), a.id.desc()).limit(limit)
        if device_id is not None:
            stmt = stmt.where(a.device_id == device_id)
        if release_id is not None:
            stmt = stmt.where(a.release_id == release_id)
        return [_assignment(row) for row in self.conn.execute(stmt)]

    def latest_assignments(self, device_ids: Sequence[str]) -> dict[str, AssignmentRecord]:
        """The newest assignment of each device of ``device_ids`` that has one."""
        out: dict[str, AssignmentRecord] = {}
        if not device_ids:
            return out
        stmt = _assignments().where(a.device_id.in_(sorted(set(device_ids)))).order_by(
            a.created_at, a.id)
        for row in self.conn.execute(stmt):
            rec = _assignment(row)
            prev = out.get(rec.device_id)
            if prev is None or (rec.created_at, rec.id) >= (prev.created_at, prev.id):
                out[rec.device_id] = rec
        return out

    def set_assignment_state(self, assignment_id: str, *, state: str, reason: str, now: int,
                             committed_at: int | None = None, grace_until: int | None = None) -> None:
        values: dict[str, Any] = {"state": state, "reason": reason[:512], "updated_at": now}
        if committed_at is not None:
            values.update(committed_at=committed_at, grace_until=grace_until)
        self.conn.execute(update(_ASSIGNMENT).where(a.id == assignment_id).values(**values))

    # -- attested release --------------------------------------------------------------------------
    def attested_releases(self, device_ids: Sequence[str]) -> dict[str, int]:
        if not device_ids:
            return {}
        rows = self.conn.execute(select(dr.device_id, dr.release_id)
                                 .where(dr.device_id.in_(sorted(set(device_ids)))))
        return {row.device_id: row.release_id for row in rows}

    def clear_attested_release(self, device_id: str) -> None:
        self.conn.execute(delete(_DEVREL).where(dr.device_id == device_id))

    def set_attested_release(self, device_id: str, release_id: int, now: int) -> None:
        self.conn.execute(delete(_DEVREL).where(dr.device_id == device_id))
        self.conn.execute(insert(_DEVREL).values(device_id=device_id, release_id=release_id, attested_at=now))

    def release_contexts(self, device_ids: Sequence[str]) -> dict[str, ReleaseContext]:
        """The release context of every device of ``device_ids`` that had an assignment or runs a
        release (see the module docstring)."""
        latest = self.latest_assignments(device_ids)
        attested = self.attested_releases(device_ids) if latest else {}
        ids: set[int] = set(attested.values())
        for rec in latest.values():
            ids.add(rec.release_id)
            if rec.previous_release_id is not None:
                ids.add(rec.previous_release_id)
        releases = self.releases_by_id(sorted(ids))
        out: dict[str, ReleaseContext] = {}
        for device_id in set(latest) | set(attested):
            newest = latest.get(device_id)
            named = {x for x in (attested.get(device_id), newest.release_id if newest else None,
                                 newest.previous_release_id if newest else None) if x is not None}
            out[device_id] = ReleaseContext(device_id, newest, attested.get(device_id),
                                            {i: releases[i] for i in named if i in releases})
        return out


class ReleaseReads:
    """Reads of the release tables, each in a short transaction of its own (``repo.releases``)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @contextlib.contextmanager
    def reading(self, what: str) -> Iterator[ReleaseTx]:
        """A read transaction for several of :class:`ReleaseTx`'s queries (do not write in it)."""
        try:
            with self.engine.connect() as conn, conn.begin():
                yield ReleaseTx(conn)
        except SQLAlchemyError as exc:
            raise storage_error(exc, what) from None

    def releases(self) -> list[ReleaseRecord]:
        with self.reading("listing releases") as tx:
            return tx.releases()

    def release(self, target: str) -> ReleaseRecord | None:
        with self.reading("reading a release") as tx:
            return tx.release(target)

    def release_by_id(self, release_id: int) -> ReleaseRecord | None:
        with self.reading("reading a release") as tx:
            return tx.releases_by_id([release_id]).get(release_id)

    def assignments(self, *, device_id: str | None = None, release_id: int | None = None,
                    limit: int = 100) -> list[AssignmentRecord]:
        with self.reading("listing assignments") as tx:
            return tx.assignments(device_id=device_id, release_id=release_id, limit=limit)

    def attested_release(self, device_id: str) -> ReleaseRecord | None:
        with self.reading("reading a device's release") as tx:
            found = tx.attested_releases([device_id]).get(device_id)
            return None if found is None else tx.releases_by_id([found]).get(found)
