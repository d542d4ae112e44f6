"""SQL of the rollout tables and device tags (:mod:`fleet_server.storage.rollout_tables`).

Reached as ``tx.rollouts`` (a :class:`RolloutTx` in the caller's write transaction) and
``repo.rollouts`` (:class:`RolloutReads`). A step locks its rollout's row first
(:meth:`RolloutTx.rollout` with ``lock``; ``SKIP LOCKED`` for the workers' steps on PostgreSQL,
SQLite serialises writers), so two workers never step one rollout at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, Table, delete, insert, select, update
from sqlalchemy.exc import SQLAlchemyError

from fleet_server.storage import alerting, models
from fleet_server.storage.db import storage_error
from fleet_server.storage.rollout_tables import MemberState, RolloutState

_TABLES = models.SQLModel.metadata.tables
_ROLLOUT: Table = _TABLES["rollout"]
_MEMBER: Table = _TABLES["rolloutmember"]
_APPROVAL: Table = _TABLES["rolloutapproval"]
_TAG: Table = _TABLES["device_tag"]
_DEVICE: Table = _TABLES["device"]
ro, rm, ap, tg, d = _ROLLOUT.c, _MEMBER.c, _APPROVAL.c, _TAG.c, _DEVICE.c
_NOT_IN_GROUPS = ("pending", "revoked")


@dataclass(frozen=True, slots=True)
class RolloutRecord:
    id: str
    kind: str
    release_id: int | None
    target_group: str
    plan: str
    state: str
    phase: int
    reason: str
    created_at: int
    created_by: str
    started_at: int | None
    updated_at: int
    abort_trigger_at: int | None
    finished_at: int | None
    model_version_id: int | None = None


@dataclass(frozen=True, slots=True)
class MemberRecord:
    rollout_id: str
    device_id: str
    phase: int
    order_key: str
    state: str
    attempts: int
    assignment_id: str | None
    reason: str
    joined_at: int
    assigned_at: int | None
    finished_at: int | None


_ROLLOUT_COLUMNS = (ro.id, ro.kind, ro.release_id, ro.target_group, ro.plan, ro.state, ro.phase, ro.reason,
                    ro.created_at, ro.created_by, ro.started_at, ro.updated_at, ro.abort_trigger_at,
                    ro.finished_at, ro.model_version_id)
_MEMBER_COLUMNS = (rm.rollout_id, rm.device_id, rm.phase, rm.order_key, rm.state, rm.attempts,
                   rm.assignment_id, rm.reason, rm.joined_at, rm.assigned_at, rm.finished_at)


def _rollout(row: Any) -> RolloutRecord:
    return RolloutRecord(*row)


def _member(row: Any) -> MemberRecord:
    return MemberRecord(*row)


class RolloutTx:
    """Statements on the rollout tables inside one transaction (``tx.rollouts``)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    # -- rollouts ----------------------------------------------------------------------------------
    def insert_rollout(self, rec: RolloutRecord) -> None:
        self.conn.execute(insert(_ROLLOUT).values(
            id=rec.id, kind=rec.kind, release_id=rec.release_id, target_group=rec.target_group,
            plan=rec.plan, state=rec.state, phase=rec.phase, reason=rec.reason[:512],
            created_at=rec.created_at, created_by=rec.created_by[:64], started_at=rec.started_at,
            updated_at=rec.updated_at, abort_trigger_at=rec.abort_trigger_at, finished_at=rec.finished_at,
            model_version_id=rec.model_version_id))

    def rollout(self, rollout_id: str, *, lock: bool = False,
                skip_locked: bool = False) -> RolloutRecord | None:
        stmt = select(*_ROLLOUT_COLUMNS).where(ro.id == rollout_id)
        if lock or skip_locked:
            stmt = stmt.with_for_update(skip_locked=skip_locked)
        row = self.conn.execute(stmt).first()
        return None if row is None else _rollout(row)

    def rollouts(self, states: Sequence[str] | None = None) -> list[RolloutRecord]:
        """Rollouts, newest first (optionally only those in ``states``)."""
        stmt = select(*_ROLLOUT_COLUMNS).order_by(ro.created_at.desc(), ro.id)
        if states is not None:
            stmt = stmt.where(ro.state.in_(list(states)))
        return [_rollout(row) for row in self.conn.execute(stmt)]

    def set_rollout(self, rollout_id: str, values: Mapping[str, Any]) -> None:
        self.conn.execute(update(_ROLLOUT).where(ro.id == rollout_id).values(**values))

    # -- members -----------------------------------------------------------------------------------
    def insert_members(self, rows: Sequence[MemberRecord]) -> None:
        if rows:
            self.conn.execute(insert(_MEMBER), [
                {"rollout_id": m.rollout_id, "device_id": m.device_id, "phase": m.phase,
                 "order_key": m.order_key, "state": m.state, "attempts": m.attempts,
                 "assignment_id": m.assignment_id, "reason": m.reason[:512], "joined_at": m.joined_at,
                 "assigned_at": m.assigned_at, "finished_at": m.finished_at} for m in rows])

    def members(self, rollout_id: str) -> list[MemberRecord]:
        """The rollout's members in rollout order (phase, then order key)."""
        stmt = (select(*_MEMBER_COLUMNS).where(rm.rollout_id == rollout_id)
                .order_by(rm.phase, rm.order_key, rm.device_id))
        return [_member(row) for row in self.conn.execute(stmt)]

    def set_member(self, rollout_id: str, device_id: str, values: Mapping[str, Any]) -> None:
        if "reason" in values:
            values = {**values, "reason": str(values["reason"])[:512]}
        self.conn.execute(update(_MEMBER).where(rm.rollout_id == rollout_id, rm.device_id == device_id)
                          .values(**values))

    def active_memberships(self, device_ids: Sequence[str]) -> dict[str, str]:
        """For devices of ``device_ids`` that are unfinished members of a running or paused rollout:
        the rollout id."""
        if not device_ids:
            return {}
        stmt = (select(rm.device_id, rm.rollout_id)
                .select_from(_MEMBER.join(_ROLLOUT, ro.id == rm.rollout_id))
                .where(rm.device_id.in_(sorted(set(device_ids))),
                       ro.state.in_([RolloutState.RUNNING, RolloutState.PAUSED, RolloutState.DRAFT]),
                       rm.state.in_([MemberState.PENDING, MemberState.ASSIGNED])))
        return {row.device_id: row.rollout_id for row in self.conn.execute(stmt)}

    def active_model_rollout(self, model_id: int) -> str | None:
        """The id of an unfinished (draft, running or paused) rollout of a version of the model."""
        versions = _TABLES["modelversion"]
        stmt = (select(ro.id).select_from(_ROLLOUT.join(versions, versions.c.id == ro.model_version_id))
                .where(versions.c.model_id == model_id,
                       ro.state.in_([RolloutState.RUNNING, RolloutState.PAUSED, RolloutState.DRAFT])))
        row = self.conn.execute(stmt).first()
        return None if row is None else str(row[0])

    # -- approvals ---------------------------------------------------------------------------------
    def approvals(self, rollout_id: str) -> dict[int, tuple[str, int]]:
        rows = self.conn.execute(select(ap.phase, ap.approved_by, ap.approved_at)
                                 .where(ap.rollout_id == rollout_id))
        return {row.phase: (row.approved_by, row.approved_at) for row in rows}

    def insert_approval(self, rollout_id: str, phase: int, by: str, now: int) -> None:
        self.conn.execute(insert(_APPROVAL).values(rollout_id=rollout_id, phase=phase, approved_by=by[:64],
                                                   approved_at=now))

    def raise_alert(self, alert: alerting.NewAlert, now: int) -> None:
        alerting.raise_alerts(self.conn, [alert], now)

    # -- devices -----------------------------------------------------------------------------------
    def group_devices(self, device_class: str, *, firmware: str | None, tags: Sequence[str],
                      devices: Sequence[str]) -> list[str]:
        """Ids of admitted, not revoked devices of the class matching every criterion given."""
        stmt = select(d.id).where(d.device_class == device_class, d.state.not_in(_NOT_IN_GROUPS))
        if firmware is not None:
            stmt = stmt.where(d.firmware_version == firmware)
        if devices:
            stmt = stmt.where(d.id.in_(sorted(set(devices))))
        for tag in sorted(set(tags)):
            stmt = stmt.where(d.id.in_(select(tg.device_id).where(tg.tag == tag)))
        return [row[0] for row in self.conn.execute(stmt.order_by(d.id))]

    def device_states(self, device_ids: Sequence[str]) -> dict[str, tuple[str, int]]:
        """``{device id: (state, state_changed_at)}``."""
        if not device_ids:
            return {}
        rows = self.conn.execute(select(d.id, d.state, d.state_changed_at)
                                 .where(d.id.in_(sorted(set(device_ids)))))
        return {row.id: (row.state, int(row.state_changed_at or 0)) for row in rows}

    def tags(self, device_id: str) -> list[str]:
        return [row[0] for row in self.conn.execute(
            select(tg.tag).where(tg.device_id == device_id).order_by(tg.tag))]

    def add_tags(self, device_id: str, tags: Sequence[str]) -> list[str]:
        """Add the tags the device does not have yet; returns those added."""
        have = set(self.tags(device_id))
        new = [t for t in dict.fromkeys(tags) if t not in have]
        if new:
            self.conn.execute(insert(_TAG), [{"device_id": device_id, "tag": t} for t in new])
        return new

    def remove_tags(self, device_id: str, tags: Sequence[str]) -> list[str]:
        """Remove the tags the device has; returns those removed."""
        have = set(self.tags(device_id))
        gone = [t for t in dict.fromkeys(tags) if t in have]
        if gone:
            self.conn.execute(delete(_TAG).where(tg.device_id == device_id, tg.tag.in_(gone)))
        return gone


class RolloutReads:
    """Reads of the rollout tables, each in a short transaction (``repo.rollouts``)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @contextlib.contextmanager
    def reading(self, what: str) -> Iterator[RolloutTx]:
        """A read transaction for several of :class:`RolloutTx`'s queries (do not write in it)."""
        try:
            with self.engine.connect() as conn, conn.begin():
                yield RolloutTx(conn)
        except SQLAlchemyError as exc:
            raise storage_error(exc, what) from None

    def rollout(self, rollout_id: str) -> RolloutRecord | None:
        with self.reading("reading a rollout") as tx:
            return tx.rollout(rollout_id)

    def rollouts(self, states: Sequence[str] | None = None) -> list[RolloutRecord]:
        with self.reading("listing rollouts") as tx:
            return tx.rollouts(states)

    def members(self, rollout_id: str) -> list[MemberRecord]:
        with self.reading("reading rollout members") as tx:
            return tx.members(rollout_id)

    def tags(self, device_id: str) -> list[str]:
        with self.reading("reading device tags") as tx:
            return tx.tags(device_id)
