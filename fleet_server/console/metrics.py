"""``/metrics``: the fleet's numbers in the Prometheus text exposition format 0.0.4.

* ``edge_attestations_total{result}`` (counter): appraisals, from the workers' counters
  ``verdict.trusted`` / ``verdict.untrusted``;
* ``edge_verification_latency_seconds`` (histogram): ``attestation.latency_ms``, challenge issued to
  result stored, tallied incrementally from the attestation rows;
* ``edge_devices{state}`` (gauge): devices by state (the state index);
* ``edge_key_releases_total``, ``edge_key_denials_total`` (counters): workers' ``keys.released``,
  ``keys.denied``;
* ``edge_revocations_total{state}`` (counter): state changes into ``revoked``/``quarantined`` (an
  administrator) or ``untrusted`` (an appraisal) - each sends the device a signed revocation;
* ``edge_mqtt_messages_received_total{kind}``, ``edge_mqtt_messages_rejected_total{reason}``
  (counters): workers' ``received.<kind>`` and ``rejected.<reason>``;
* ``edge_alerts_active{severity}`` (gauge): open and acknowledged alerts.

**Cost at 100 000 devices.** The worker counters are one ``GROUP BY`` over the small ``counter`` table
(a row per worker and name). Device and alert gauges are one ``GROUP BY`` each on an indexed column.
The histogram and the revocations are tallied *incrementally* by :class:`RowTally`: each scrape counts
only the rows stored since the previous one (an index range on ``stored_at`` / ``at``), so a scrape
every 15 s reads ~5 000 attestation rows of a fleet attesting every 5 minutes, never the table. The
revocation tally starts from the whole state history (once per process); the histogram starts
:data:`LATENCY_BACKFILL_MS` before the process's first scrape (attestation rows are many and pruned
by retention) - it is a counter that, like every Prometheus counter, starts at a process start.

**Access**: a principal with ``fleet:view`` (API token or session), or the scrape-only bearer token
whose SHA-256 is ``[console] metrics_token_sha256`` (docs/operations.md).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import math
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from flask import Blueprint, Response, request
from sqlalchemy import Connection, Engine, Table, case, func, select
from sqlalchemy.exc import SQLAlchemyError

from fleet_server.console.auth import enforce
from fleet_server.console.rbac import Right
from fleet_server.console.security import is_bearer
from fleet_server.console.services import services
from fleet_server.storage import models
from fleet_server.storage.db import storage_error
from fleet_server.storage.models import AlertStatus, DeviceState

__all__ = ["CONTENT_TYPE", "LATENCY_BUCKETS_S", "MetricFamily", "RowTally", "Sample", "bp", "render"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS_S: tuple[float, ...] = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Upper bounds (seconds) of the verification latency histogram's buckets (+Inf added)."""
LATENCY_BACKFILL_MS = 10 * 60_000
SETTLE_MS = 30_000
"""Rows stored longer ago than this are counted once and kept; newer rows are re-counted each scrape
(a batch stamps its rows when its transaction starts, so a few may still be committing)."""
REVOCATION_STATES = (DeviceState.REVOKED.value, DeviceState.QUARANTINED.value, DeviceState.UNTRUSTED.value)

_TABLES = models.SQLModel.metadata.tables
_ATTESTATION: Table = _TABLES["attestation"]
_STATECHANGE: Table = _TABLES["statechange"]
_ALERT: Table = _TABLES["alert"]

bp = Blueprint("metrics", __name__)
F = TypeVar("F", bound=Callable[..., Any])


# --------------------------------------------------------------------------------------------------
# the exposition format (pure)
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Sample:
    """One line: ``<family name><suffix>{labels} value``."""

    suffix: str
    labels: tuple[tuple[str, str], ...]
    value: float


@dataclass(frozen=True, slots=True)
class MetricFamily:
    """A metric with its HELP and TYPE lines and its samples."""

    name: str
    kind: str            # counter | gauge | histogram
    help: str
    samples: tuple[Sample, ...]


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def format_value(value: float) -> str:
    """A sample value as the format writes it (integers without a decimal point)."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 1 << 53:
        return str(int(value))
    return repr(float(value))


def format_bound(bound: float) -> str:
    """An ``le`` label value: ``0.25``, ``1.0``, ``+Inf``."""
    return "+Inf" if math.isinf(bound) else repr(float(bound))


def render(families: Iterable[MetricFamily]) -> str:
    """The text exposition format 0.0.4 of ``families``."""
    lines: list[str] = []
    for family in families:
        lines.append(f"# HELP {family.name} {_escape_help(family.help)}")
        lines.append(f"# TYPE {family.name} {family.kind}")
        for s in family.samples:
            labels = ",".join(f'{k}="{_escape_label(v)}"' for k, v in s.labels)
            lines.append(f"{family.name}{s.suffix}{{{labels}}} {format_value(s.value)}" if labels
                         else f"{family.name}{s.suffix} {format_value(s.value)}")
    return "\n".join(lines) + "\n"


def counter(name: str, help_text: str, values: Mapping[str, int] | int, label: str = "") -> MetricFamily:
    """A counter family: one value, or one sample per label value."""
    if isinstance(values, int):
        return MetricFamily(name, "counter", help_text, (Sample("", (), values),))
    return MetricFamily(name, "counter", help_text,
                        tuple(Sample("", ((label, k),), v) for k, v in sorted(values.items())))


def gauge(name: str, help_text: str, values: Mapping[str, int], label: str) -> MetricFamily:
    return MetricFamily(name, "gauge", help_text,
                        tuple(Sample("", ((label, k),), v) for k, v in values.items()))


def histogram(name: str, help_text: str, bounds: Sequence[float], cumulative: Sequence[int], count: int,
              total: float) -> MetricFamily:
    """A histogram family from cumulative bucket counts (one per bound; +Inf is ``count``)."""
    samples = [Sample("_bucket", (("le", format_bound(b)),), n)
               for b, n in zip(bounds, cumulative, strict=True)]
    samples.append(Sample("_bucket", (("le", "+Inf"),), count))
    samples += [Sample("_sum", (), total), Sample("_count", (), count)]
    return MetricFamily(name, "histogram", help_text, tuple(samples))


# --------------------------------------------------------------------------------------------------
# incremental tallies
# --------------------------------------------------------------------------------------------------
class RowTally:
    """Cumulative counts over rows of a table with an indexed time column, each row counted once.

    ``count(conn, start, end)`` returns named counts of the rows with ``start <= time < end``. Each
    :meth:`totals` call counts the rows between the previous settled mark and ``now - settle_ms``
    and keeps them, and counts the unsettled tail without keeping it, so totals never go down and a
    row is never counted twice. The first call starts at ``now - backfill_ms`` (None: from the
    beginning). Thread-safe.
    """

    def __init__(self, count: Callable[[Connection, int, int], Mapping[str, int]], *,
                 backfill_ms: int | None, settle_ms: int = SETTLE_MS) -> None:
        self._count = count
        self.backfill_ms = backfill_ms
        self.settle_ms = settle_ms
        self._totals: dict[str, int] = {}
        self._mark: int | None = None
        self._lock = threading.Lock()

    @staticmethod
    def _add(into: dict[str, int], counts: Mapping[str, int]) -> None:
        for key, n in counts.items():
            into[key] = into.get(key, 0) + int(n)

    def totals(self, conn: Connection, now: int) -> dict[str, int]:
        with self._lock:
            if self._mark is None:
                self._mark = 0 if self.backfill_ms is None else max(0, now - self.backfill_ms)
            settled = now - self.settle_ms
            if settled > self._mark:
                self._add(self._totals, self._count(conn, self._mark, settled))
                self._mark = settled
            out, mark = dict(self._totals), self._mark
        self._add(out, self._count(conn, mark, now + 1))
        return out


def _latency_counts(conn: Connection, start: int, end: int) -> dict[str, int]:
    a = _ATTESTATION.c
    columns: list[Any] = [func.sum(case((a.latency_ms <= round(b * 1000), 1), else_=0))
                          for b in LATENCY_BUCKETS_S]
    row = conn.execute(select(*columns, func.count(), func.sum(a.latency_ms))
                       .where(a.stored_at >= start, a.stored_at < end)).one()
    out = {f"le:{format_bound(b)}": int(v or 0) for b, v in zip(LATENCY_BUCKETS_S, row, strict=False)}
    out["count"] = int(row[-2] or 0)
    out["sum_ms"] = int(row[-1] or 0)
    return out


def _revocation_counts(conn: Connection, start: int, end: int) -> dict[str, int]:
    s = _STATECHANGE.c
    rows = conn.execute(select(s.to_state, func.count()).where(s.at >= start, s.at < end,
                                                              s.to_state.in_(REVOCATION_STATES))
                        .group_by(s.to_state)).all()
    return {str(r[0]): int(r[1]) for r in rows}


class FleetMetrics:
    """Everything ``/metrics`` reports, read from one engine (one instance per application)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.latency = RowTally(_latency_counts, backfill_ms=LATENCY_BACKFILL_MS)
        self.revocations = RowTally(_revocation_counts, backfill_ms=None)

    def families(self, *, counters: Mapping[str, int], states: Mapping[str, int], now: int
                 ) -> list[MetricFamily]:
        try:
            with self.engine.connect() as conn, conn.begin():
                latency = self.latency.totals(conn, now)
                revocations = self.revocations.totals(conn, now)
                alerts = {str(r[0]): int(r[1]) for r in conn.execute(
                    select(_ALERT.c.severity, func.count()).where(_ALERT.c.status != AlertStatus.RESOLVED)
                    .group_by(_ALERT.c.severity))}
        except SQLAlchemyError as exc:
            raise storage_error(exc, "reading metrics") from None

        def prefixed(prefix: str) -> dict[str, int]:
            return {k[len(prefix):]: v for k, v in counters.items() if k.startswith(prefix)}

        verdicts = {"trusted": 0, "untrusted": 0} | prefixed("verdict.")
        return [
            counter("edge_attestations_total", "Appraisals recorded by the workers, by result.", verdicts,
                    "result"),
            histogram("edge_verification_latency_seconds",
                      "Time from a challenge's issue to its appraisal result being stored (attestation rows "
                      "stored since shortly before this console process started).",
                      LATENCY_BUCKETS_S, [latency.get(f"le:{format_bound(b)}", 0) for b in LATENCY_BUCKETS_S],
                      latency.get("count", 0), latency.get("sum_ms", 0) / 1000),
            gauge("edge_devices", "Devices by state.",
                  {s.value: int(states.get(s.value, 0)) for s in DeviceState} | dict(states), "state"),
            counter("edge_key_releases_total", "Model data keys released to devices.",
                    int(counters.get("keys.released", 0))),
            counter("edge_key_denials_total",
                    "Model key requests refused (answered with a signed key-denied).",
                    int(counters.get("keys.denied", 0))),
            counter("edge_revocations_total", "Signed revocations issued: devices moved to revoked or "
                                              "quarantined (an administrator) or untrusted (an appraisal).",
                    {s: int(revocations.get(s, 0)) for s in REVOCATION_STATES}, "state"),
            counter("edge_mqtt_messages_received_total", "Inbound MQTT messages accepted, by kind.",
                    prefixed("received."), "kind"),
            counter("edge_mqtt_messages_rejected_total", "Inbound MQTT messages refused, by reason.",
                    prefixed("rejected."), "reason"),
            gauge("edge_alerts_active", "Open and acknowledged alerts by severity.",
                  {"critical": 0, "warning": 0, "info": 0} | alerts, "severity"),
        ]


# --------------------------------------------------------------------------------------------------
# the route
# --------------------------------------------------------------------------------------------------
_EXTENSION = "fleet_console_metrics"
_INIT_LOCK = threading.Lock()


def _fleet_metrics() -> FleetMetrics:
    from flask import current_app

    with _INIT_LOCK:
        found = current_app.extensions.get(_EXTENSION)
        if not isinstance(found, FleetMetrics):
            found = current_app.extensions[_EXTENSION] = FleetMetrics(services().engine)
        return found


def scrape_token_ok() -> bool:
    """True if the request carries the configured scrape-only bearer token."""
    expected = services().settings.metrics_token_sha256
    if not expected or not is_bearer():
        return False
    presented = request.headers["Authorization"][7:].strip()
    digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).hexdigest()
    return hmac.compare_digest(digest, expected)


def require_or_scrape_token(right: Right) -> Callable[[F], F]:
    """Like :func:`~fleet_server.console.rbac.require` (the declared requirement is ``right``), but the
    scrape-only token passes too."""

    def decorator(view: F) -> F:
        @functools.wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not scrape_token_ok():
                refusal = enforce(right)
                if refusal is not None:
                    return refusal
            return view(*args, **kwargs)

        wrapper.required_right = right  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorator


@bp.get("/metrics")
@require_or_scrape_token(Right.VIEW_FLEET)
def metrics() -> Response:
    svc = services()
    families = _fleet_metrics().families(counters=svc.repo.counters(), states=svc.queries.states(),
                                         now=svc.now())
    return Response(render(families), status=200, headers={"Content-Type": CONTENT_TYPE})
