"""Alerts raised by rules on events, written in the transaction of the event.

Two parts:

* :func:`state_change_alerts` - the pure rules on device state changes: a change to ``untrusted``
  raises ``attestation_failure`` (critical), a change to ``unreachable`` (the device missed
  ``missed_challenges_limit`` consecutive challenges: its grace period is over) raises
  ``unreachable`` (warning). The repository calls it from
  :meth:`~fleet_server.storage.repo.Tx.insert_state_changes`, the one place every state change is
  recorded (appraisals, the scheduler, admin commands), so no path can change a state without its
  rule being evaluated.
* :func:`raise_alerts` - the storage: one open alert per ``dedup_key``. A rule firing again while its
  alert is open or acknowledged bumps ``count`` and ``last_seen_at`` (and takes the newest message);
  after the alert was resolved, a new alert is opened.

Other areas (model protection: off-hours key release, extraction) raise their alerts with
:func:`raise_alerts` too. The rules cost nothing on the hot path unless a state changes to one of
the states above.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy import Connection, Table, insert, select, update

from fleet_server.storage import models
from fleet_server.storage.models import AlertStatus, DeviceState

_ALERT: Table = models.SQLModel.metadata.tables["alert"]
a = _ALERT.c

ATTESTATION_FAILURE = "attestation_failure"
UNREACHABLE = "unreachable"
MAX_MESSAGE = 512


@dataclass(frozen=True, slots=True)
class NewAlert:
    """An alert a rule raised (see :class:`fleet_server.storage.models.Alert` for the columns)."""

    kind: str
    severity: str
    message: str
    dedup_key: str
    device_id: str | None = None
    model: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)


class StateChangeLike(Protocol):
    """What the rules read of a state change (``repo.NewStateChange`` has these attributes)."""

    @property
    def device_id(self) -> str: ...
    @property
    def from_state(self) -> str | None: ...
    @property
    def to_state(self) -> str: ...
    @property
    def cause(self) -> str: ...


def state_change_alerts(changes: Iterable[StateChangeLike]) -> list[NewAlert]:
    """The alerts the rules raise for ``changes`` (pure)."""
    out: list[NewAlert] = []
    for ch in changes:
        if ch.to_state == DeviceState.UNTRUSTED:
            out.append(NewAlert(
                kind=ATTESTATION_FAILURE, severity="critical", device_id=ch.device_id,
                dedup_key=f"{ATTESTATION_FAILURE}:{ch.device_id}",
                message=f"device {ch.device_id} failed attestation: {ch.cause}"[:MAX_MESSAGE],
                details={"from_state": ch.from_state, "cause": ch.cause[:1000]}))
        elif ch.to_state == DeviceState.UNREACHABLE:
            out.append(NewAlert(
                kind=UNREACHABLE, severity="warning", device_id=ch.device_id,
                dedup_key=f"{UNREACHABLE}:{ch.device_id}",
                message=f"device {ch.device_id} is unreachable: {ch.cause}"[:MAX_MESSAGE],
                details={"from_state": ch.from_state, "cause": ch.cause[:1000]}))
    return out


def _dumps(value: Mapping[str, Any]) -> str:
    return json.dumps(dict(value), sort_keys=True, separators=(",", ":"), default=str)


def raise_alerts(conn: Connection, alerts: Sequence[NewAlert], now: int) -> int:
    """Open or bump each alert in the caller's transaction; returns the number of new alerts."""
    opened = 0
    for alert in alerts:
        existing = conn.execute(
            select(a.id).where(a.dedup_key == alert.dedup_key,
                               a.status.in_([AlertStatus.OPEN, AlertStatus.ACKNOWLEDGED]))
            .order_by(a.id.desc()).limit(1).with_for_update()).scalar()
        if existing is not None:
            conn.execute(update(_ALERT).where(a.id == existing).values(
                count=a.count + 1, last_seen_at=now, message=alert.message[:MAX_MESSAGE],
                details=_dumps(alert.details)))
            continue
        conn.execute(insert(_ALERT).values(
            kind=alert.kind, severity=alert.severity, device_id=alert.device_id, model=alert.model,
            message=alert.message[:MAX_MESSAGE], details=_dumps(alert.details), dedup_key=alert.dedup_key,
            status=AlertStatus.OPEN, count=1, created_at=now, last_seen_at=now))
        opened += 1
    return opened


class AlertStateError(ValueError):
    """An alert cannot take the requested step (unknown, or already past it)."""


def acknowledge_alert(conn: Connection, alert_id: int, *, by: str, now: int) -> str:
    """``open`` -> ``acknowledged``; returns the previous status. Raises :class:`AlertStateError`."""
    status = conn.execute(select(a.status).where(a.id == alert_id).with_for_update()).scalar()
    if status is None:
        raise AlertStateError(f"no alert {alert_id}")
    if status != AlertStatus.OPEN:
        raise AlertStateError(f"alert {alert_id} is {status}; only open alerts can be acknowledged")
    conn.execute(update(_ALERT).where(a.id == alert_id).values(
        status=AlertStatus.ACKNOWLEDGED, acknowledged_by=by[:64], acknowledged_at=now))
    return str(status)


def resolve_alert(conn: Connection, alert_id: int, *, by: str, now: int) -> str:
    """``open``/``acknowledged`` -> ``resolved``; returns the previous status."""
    status = conn.execute(select(a.status).where(a.id == alert_id).with_for_update()).scalar()
    if status is None:
        raise AlertStateError(f"no alert {alert_id}")
    if status == AlertStatus.RESOLVED:
        raise AlertStateError(f"alert {alert_id} is already resolved")
    conn.execute(update(_ALERT).where(a.id == alert_id).values(
        status=AlertStatus.RESOLVED, resolved_by=by[:64], resolved_at=now))
    return str(status)
