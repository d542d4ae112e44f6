"""Read-model queries of the console: SQLAlchemy Core on the storage tables, shaped for pages.

Built for a large fleet (100 000 devices and more):

* the device list filters on indexed columns (state, class, firmware version; the id for keyset
  pagination) and pages by **keyset** (``id > last id``), so page 1 000 costs what page 1 costs; one
  query for the page (``LIMIT n + 1`` tells whether there is more), one for the count of matches,
  one existence probe for "is there a previous page"; no per-row queries;
* filter choices (classes, firmware versions) come from the indexes and are cached for a few
  seconds;
* the dashboard's hourly attestation series is maintained **incrementally**
  (:class:`AttestationSeries`): settled hours are counted once and kept, each refresh only counts the
  rows stored since the previous one, so a poll does not re-aggregate a day of attestations.

The model-protection tables (``fleet_server.storage.model_tables``) belong to another area and may
not exist yet: :class:`ModelTables` finds them by class name and every model query degrades to
"nothing" without them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy import (
    Column,
    Connection,
    Engine,
    LargeBinary,
    Table,
    and_,
    case,
    exists,
    func,
    select,
    true,
)
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.sql.elements import ColumnElement

from fleet_server.storage import model_tables, models
from fleet_server.storage.db import storage_error
from fleet_server.storage.models import AlertStatus, DeviceState

_TABLES = models.SQLModel.metadata.tables
_DEVICE: Table = _TABLES["device"]
_ATTESTATION: Table = _TABLES["attestation"]
_ALERT: Table = _TABLES["alert"]
_POLICY: Table = _TABLES["policy"]
_HELDLOG: Table = _TABLES["heldlog"]
_STATECHANGE: Table = _TABLES["statechange"]
d = _DEVICE.c
al = _ALERT.c

HOUR_MS = 3_600_000
SERIES_HOURS = 24
SETTLE_MS = 30_000
"""Rows stored more than this long ago are counted once and cached (a batch's rows carry the time
its transaction started, so very recent rows may still be committing)."""
MAX_PAGE = 200
FACET_TTL_S = 30.0
STATE_ORDER = tuple(s.value for s in DeviceState)

T = TypeVar("T")


class TtlCache(Generic[T]):
    """One value recomputed at most every ``ttl`` seconds (thread-safe)."""

    def __init__(self, ttl: float, compute: Callable[[], T]) -> None:
        self.ttl = ttl
        self._compute = compute
        self._value: T | None = None
        self._at = float("-inf")
        self._lock = threading.Lock()

    def get(self) -> T:
        with self._lock:
            if self._value is None or time.monotonic() - self._at >= self.ttl:
                self._value = self._compute()
                self._at = time.monotonic()
            return self._value

    def clear(self) -> None:
        with self._lock:
            self._value = None


# --------------------------------------------------------------------------------------------------
# values
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class DeviceFilter:
    """What the device list shows: filters, and the keyset page position (``after``/``before`` id)."""

    q: str = ""
    state: str = ""
    device_class: str = ""
    firmware: str = ""
    model: str = ""
    after: str = ""
    before: str = ""
    limit: int = 50

    def query_args(self, **changes: str | int) -> dict[str, str | int]:
        """URL arguments for this filter (empty values left out), with ``changes`` applied."""
        base = dataclasses.replace(self, after="", before="", **changes)  # type: ignore[arg-type]
        out: dict[str, str | int] = {}
        for name, key in (("q", "q"), ("state", "state"), ("device_class", "class"), ("firmware", "firmware"),
                          ("model", "model"), ("after", "after"), ("before", "before")):
            value = getattr(base, name)
            if value:
                out[key] = value
        if base.limit != 50:
            out["n"] = base.limit
        return out


@dataclass(frozen=True, slots=True)
class DeviceRow:
    id: str
    state: str
    device_class: str
    firmware_version: str
    last_verdict: str | None
    last_attestation_at: int | None
    trusted_until: int | None
    state_changed_at: int


@dataclass(frozen=True, slots=True)
class DevicePage:
    rows: tuple[DeviceRow, ...]
    total: int
    has_prev: bool
    has_next: bool

    @property
    def first_id(self) -> str:
        return self.rows[0].id if self.rows else ""

    @property
    def last_id(self) -> str:
        return self.rows[-1].id if self.rows else ""


@dataclass(frozen=True, slots=True)
class Facets:
    """Choices of the device filters."""

    states: tuple[str, ...]
    classes: tuple[str, ...]
    firmwares: tuple[str, ...]
    models: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SeriesPoint:
    hour: int           # start of the hour, ms
    total: int
    failed: int
    partial: bool = False
    """Not every row of this hour is counted yet (the history is still being counted)."""


@dataclass(frozen=True, slots=True)
class AlertRow:
    id: int
    kind: str
    severity: str
    device_id: str | None
    model: str | None
    message: str
    details: str
    status: str
    count: int
    created_at: int
    last_seen_at: int
    acknowledged_by: str | None
    acknowledged_at: int | None
    resolved_by: str | None
    resolved_at: int | None


@dataclass(frozen=True, slots=True)
class AttestationRow:
    """One stored appraisal result (``attestation`` row) with its id (the API pages by it)."""

    id: int
    device_id: str
    challenge_id: str
    issued_at: int
    received_at: int
    stored_at: int
    latency_ms: int
    verdict: str
    reasons: tuple[str, ...]
    evidence_sha256: bytes
    policy_id: int | None
    reset_count: int | None
    restart_count: int | None


@dataclass(frozen=True, slots=True)
class RevocationRow:
    device_id: str
    at: int
    reasons: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class GenericRows:
    """Rows of a table whose schema this module does not own (model protection): column names and
    printable values."""

    title: str
    table: str
    columns: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]

    def as_dicts(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, r, strict=True)) for r in self.rows]


def _alert(row: Any) -> AlertRow:
    m = row._mapping
    return AlertRow(**{f.name: m[f.name] for f in dataclasses.fields(AlertRow)})


_ALERT_COLUMNS = tuple(getattr(al, f.name) for f in dataclasses.fields(AlertRow))
_DEVICE_ROW_COLUMNS = (d.id, d.state, d.device_class, d.firmware_version, d.last_verdict,
                       d.last_attestation_at, d.trusted_until, d.state_changed_at)


def _reasons(text: str | None) -> tuple[str, ...]:
    try:
        value = json.loads(text or "[]")
    except ValueError:
        return (text or "",)
    return tuple(str(v) for v in value) if isinstance(value, list) else (str(value),)


# --------------------------------------------------------------------------------------------------
# model-protection tables (owned by another area; optional)
# --------------------------------------------------------------------------------------------------
class ModelTables:
    """The model-protection tables present in this build, by role (found by class name)."""

    ROLES: Mapping[str, tuple[str, ...]] = {
        "model": ("Model",),
        "version": ("ModelVersion",),
        "entitlement": ("Entitlement", "ModelEntitlement"),
        "lease": ("Lease", "ModelLease", "KeyLease"),
        "usage": ("ModelUsage", "Usage", "UsageReport"),
        "client_usage": ("ModelClientUsage",),
    }
    TITLES: Mapping[str, str] = {"model": "Published models", "version": "Versions (query limits and output "
                                 "policy)", "entitlement": "Entitlements", "lease": "Leases",
                                 "usage": "Query usage per day", "client_usage": "Query usage per client app"}
    HIDDEN_COLUMNS = frozenset({"manifest", "package_path", "signing_key_id", "kek_id", "key_name"})
    """Columns the pages leave out: long documents and key material identifiers (bytes are never shown)."""

    def __init__(self, module: Any = model_tables) -> None:
        by_class: dict[str, Table] = {}
        for name, obj in vars(module).items():
            table = getattr(obj, "__table__", None)
            if isinstance(table, Table) and getattr(obj, "__module__", None) == module.__name__:
                by_class[name.lower()] = table
        self.tables: dict[str, Table] = {}
        for role, names in self.ROLES.items():
            for name in names:
                if name.lower() in by_class:
                    self.tables[role] = by_class[name.lower()]
                    break

    def get(self, role: str) -> Table | None:
        return self.tables.get(role)

    @staticmethod
    def column(table: Table, *names: str) -> Column[Any] | None:
        for name in names:
            if name in table.c:
                return table.c[name]
        return None

    def model_name_of(self, table: Table) -> tuple[ColumnElement[Any] | None, Table | None]:
        """An expression giving the model name of ``table``'s rows, and the table to join (if any)."""
        direct = self.column(table, "model", "model_name")
        if direct is not None:
            return direct, None
        model = self.get("model")
        ref = self.column(table, "model_id")
        if model is not None and ref is not None and "id" in model.c and "name" in model.c:
            return model.c.name, model
        return None, None

    def leases_for_model(self, name: str) -> Any | None:
        """``SELECT device_id FROM lease WHERE <model is name>`` (None if leases cannot say)."""
        lease = self.get("lease")
        if lease is None or "device_id" not in lease.c:
            return None
        expr, join = self.model_name_of(lease)
        if expr is None:
            return None
        stmt = select(lease.c.device_id)
        if join is not None:
            stmt = stmt.select_from(lease.join(join, join.c.id == lease.c.model_id))
        if "state" in lease.c:  # holding a lease = an active one
            stmt = stmt.where(lease.c.state == "active")
        return stmt.where(expr == name)


def _printable(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(bytes(value))} bytes>"
    if isinstance(value, str) and len(value) > 600:
        return value[:597] + "..."
    return value


# --------------------------------------------------------------------------------------------------
# the hourly series
# --------------------------------------------------------------------------------------------------
class AttestationSeries:
    """Attestations and failures (verdict other than trusted) per hour over the last 24 hours.

    Counted rows are kept in hourly buckets in memory; every row is counted once:

    * **forward**: each :meth:`points` call counts the rows stored between the previous settled mark
      and ``now - settle_ms`` (a few seconds of rows), plus the unsettled tail (not kept);
    * **backfill**: the history before the first mark (the day before this process started) is
      counted newest first in chunks, within ``budget_ms`` per call (the chunk span adapts to the
      table's size), so no request waits for a whole day of a large fleet's attestations. Until it is
      done, the hours not yet counted are reported as ``partial``.

    Rows committed more than ``settle_ms`` after their ``stored_at`` are missed by the forward count
    (a batch transaction stamps its rows when it starts; 30 s is far beyond a batch's duration).
    Safe across threads.
    """

    MAX_SPAN_MS = HOUR_MS

    def __init__(self, settle_ms: int = SETTLE_MS, budget_ms: float = 60.0,
                 min_span_ms: int = 60_000) -> None:
        self.settle_ms = settle_ms
        self.budget_ms = budget_ms
        self.min_span_ms = min(min_span_ms, self.MAX_SPAN_MS)
        self._buckets: dict[int, list[int]] = {}
        self._mark: int | None = None          # rows stored in [filled_from, mark) are counted
        self._filled_from = 0
        self._span = max(self.min_span_ms, 15 * 60_000)
        self._lock = threading.Lock()

    @staticmethod
    def _count(conn: Connection, start: int, end: int) -> dict[int, tuple[int, int]]:
        a = _ATTESTATION.c
        hour = (a.stored_at // HOUR_MS).label("h")
        failed = func.sum(case((a.verdict != "trusted", 1), else_=0))
        rows = conn.execute(select(hour, func.count(), failed)
                            .where(a.stored_at >= start, a.stored_at < end).group_by(hour)).all()
        return {int(r[0]) * HOUR_MS: (int(r[1]), int(r[2] or 0)) for r in rows}

    def _add(self, counts: Mapping[int, tuple[int, int]], into: dict[int, list[int]]) -> None:
        for hour, (n, bad) in counts.items():
            bucket = into.setdefault(hour, [0, 0])
            bucket[0] += n
            bucket[1] += bad

    def points(self, conn: Connection, now: int) -> list[SeriesPoint]:
        first = (now // HOUR_MS - (SERIES_HOURS - 1)) * HOUR_MS
        settled = max(first, now - self.settle_ms)
        with self._lock:
            if self._mark is None or self._mark < first:
                self._mark, self._filled_from, self._buckets = settled, settled, {}
            if settled > self._mark:
                self._add(self._count(conn, self._mark, settled), self._buckets)
                self._mark = settled
            self._filled_from = max(self._filled_from, first)
            started = time.perf_counter()
            while self._filled_from > first:
                start = max(first, self._filled_from - self._span)
                t0 = time.perf_counter()
                self._add(self._count(conn, start, self._filled_from), self._buckets)
                self._filled_from = start
                took = (time.perf_counter() - t0) * 1000
                if took > self.budget_ms / 2:
                    self._span = max(self.min_span_ms, self._span // 2)
                elif took < self.budget_ms / 8:
                    self._span = min(self.MAX_SPAN_MS, self._span * 2)
                if (time.perf_counter() - started) * 1000 >= self.budget_ms:
                    break
            for hour in [h for h in self._buckets if h < first]:
                del self._buckets[hour]
            merged = {h: list(v) for h, v in self._buckets.items()}
            mark, filled_from = self._mark, self._filled_from
        self._add(self._count(conn, mark, now + 1), merged)
        out = []
        for h in range(first, first + SERIES_HOURS * HOUR_MS, HOUR_MS):
            total, failed = merged.get(h, (0, 0))
            out.append(SeriesPoint(h, total, failed, partial=h < filled_from))
        return out


# --------------------------------------------------------------------------------------------------
# the queries
# --------------------------------------------------------------------------------------------------
class ConsoleQueries:
    """Reads for the console pages, over one engine."""

    def __init__(self, engine: Engine, *, model_tables_module: Any = model_tables) -> None:
        self.engine = engine
        self.models = ModelTables(model_tables_module)
        self.series = AttestationSeries()
        self._facets: TtlCache[Facets] = TtlCache(FACET_TTL_S, self._compute_facets)

    @contextlib.contextmanager
    def _read(self, what: str) -> Iterator[Connection]:
        try:
            with self.engine.connect() as conn, conn.begin():
                yield conn
        except SQLAlchemyError as exc:
            raise storage_error(exc, what) from None

    # -- devices -----------------------------------------------------------------------------------
    def _device_conditions(self, f: DeviceFilter) -> list[ColumnElement[bool]]:
        cond: list[ColumnElement[bool]] = []
        if f.state:
            cond.append(d.state == f.state)
        if f.device_class:
            cond.append(d.device_class == f.device_class)
        if f.firmware:
            cond.append(d.firmware_version == f.firmware)
        if f.q:
            # Device ids are lowercase ([a-z0-9-]): lower the query once instead of every row (the
            # match can then scan the id index alone).
            cond.append(d.id.contains(f.q.lower(), autoescape=True))
        if f.model:
            leases = self.models.leases_for_model(f.model)
            cond.append(d.id.in_(leases) if leases is not None else ~true())
        return cond

    def devices_page(self, f: DeviceFilter) -> DevicePage:
        """One page of the device list (see the module docstring for the cost)."""
        limit = max(1, min(f.limit, MAX_PAGE))
        cond = self._device_conditions(f)
        where = and_(true(), *cond)
        backwards = bool(f.before)
        stmt = select(*_DEVICE_ROW_COLUMNS).where(where)
        if backwards:
            stmt = stmt.where(d.id < f.before).order_by(d.id.desc())
        else:
            if f.after:
                stmt = stmt.where(d.id > f.after)
            stmt = stmt.order_by(d.id)
        stmt = stmt.limit(limit + 1)
        with self._read("listing devices") as conn:
            rows = [DeviceRow(*r) for r in conn.execute(stmt)]
            more = len(rows) > limit
            rows = rows[:limit]
            if backwards:
                rows.reverse()
            if not backwards and not f.after and not more:
                total = len(rows)  # the first page holds every match: no count query (narrow searches)
            else:
                total = int(conn.execute(select(func.count()).select_from(_DEVICE).where(where)).scalar_one())
            if backwards:
                has_prev = more
                has_next = bool(rows) and bool(conn.execute(
                    select(exists().where(where, d.id > rows[-1].id))).scalar())
            else:
                has_next = more
                has_prev = bool(f.after) and bool(conn.execute(
                    select(exists().where(where, d.id <= f.after))).scalar())
        return DevicePage(tuple(rows), total, has_prev, has_next)

    def _compute_facets(self) -> Facets:
        with self._read("reading filter choices") as conn:
            classes = tuple(r[0] for r in conn.execute(
                select(d.device_class).distinct().order_by(d.device_class)))
            firmwares = tuple(r[0] for r in conn.execute(
                select(d.firmware_version).distinct().order_by(d.firmware_version)))
            names: tuple[str, ...] = ()
            model = self.models.get("model")
            if model is not None and "name" in model.c:
                names = tuple(str(r[0]) for r in conn.execute(select(model.c.name).distinct()
                                                              .order_by(model.c.name)))
        return Facets(STATE_ORDER, classes, firmwares, names)

    def facets(self) -> Facets:
        """Filter choices (cached for :data:`FACET_TTL_S` seconds)."""
        return self._facets.get()

    def device_ids(self, prefix: str, limit: int = 20) -> list[str]:
        """Device ids starting with ``prefix`` (index range), for pickers."""
        stmt = select(d.id).order_by(d.id).limit(limit)
        if prefix:
            stmt = stmt.where(d.id >= prefix, d.id < prefix + "\U0010ffff")
        with self._read("listing device ids") as conn:
            return [r[0] for r in conn.execute(stmt)]

    def held_log(self, device_id: str) -> bytes | None:
        with self._read("reading a held event log") as conn:
            row = conn.execute(select(_HELDLOG.c.log).where(_HELDLOG.c.device_id == device_id)).first()
        return None if row is None else bytes(row[0])

    def device_identity_blobs(self, device_id: str) -> tuple[bytes, bytes, bytes] | None:
        """(EK certificate DER, AK TPM2B_PUBLIC, AK name) of a device."""
        with self._read("reading a device") as conn:
            row = conn.execute(select(d.ek_cert, d.ak_public, d.ak_name).where(d.id == device_id)).first()
        return None if row is None else (bytes(row[0]), bytes(row[1]), bytes(row[2]))

    def attestations(self, *, device_id: str = "", verdict: str = "", since: int | None = None,
                     until: int | None = None, before_id: int | None = None, limit: int = 50
                     ) -> list[AttestationRow]:
        """Stored results newest first (by id; ``before_id`` pages on), filtered by device, verdict and
        storage time (``since`` <= stored_at < ``until``)."""
        a = _ATTESTATION.c
        stmt = (select(a.id, a.device_id, a.challenge_id, a.issued_at, a.received_at, a.stored_at,
                       a.latency_ms, a.verdict, a.reasons, a.evidence_sha256, a.policy_id, a.reset_count,
                       a.restart_count)
                .order_by(a.id.desc()).limit(max(1, min(limit, MAX_PAGE))))
        if device_id:
            stmt = stmt.where(a.device_id == device_id)
        if verdict:
            stmt = stmt.where(a.verdict == verdict)
        if since is not None:
            stmt = stmt.where(a.stored_at >= since)
        if until is not None:
            stmt = stmt.where(a.stored_at < until)
        if before_id is not None:
            stmt = stmt.where(a.id < before_id)
        with self._read("reading attestations") as conn:
            rows = conn.execute(stmt).all()
        return [AttestationRow(int(r.id), r.device_id, r.challenge_id, int(r.issued_at), int(r.received_at),
                               int(r.stored_at), int(r.latency_ms), r.verdict, _reasons(r.reasons),
                               bytes(r.evidence_sha256), r.policy_id, r.reset_count, r.restart_count)
                for r in rows]

    # -- dashboard ---------------------------------------------------------------------------------
    def states(self) -> dict[str, int]:
        with self._read("counting devices") as conn:
            found = {r[0]: int(r[1]) for r in conn.execute(select(d.state, func.count()).group_by(d.state))}
        ordered = {s: found.get(s, 0) for s in STATE_ORDER}
        return ordered | {k: v for k, v in found.items() if k not in STATE_ORDER}

    def attestation_series(self, now: int) -> list[SeriesPoint]:
        with self._read("counting attestations") as conn:
            return self.series.points(conn, now)

    def recent_revocations(self, limit: int = 10) -> list[RevocationRow]:
        """Devices revoked, newest revocation first (from the device rows: the state index)."""
        with self._read("reading revocations") as conn:
            rows = conn.execute(select(d.id, d.state_changed_at, d.state_reasons)
                                .where(d.state == DeviceState.REVOKED)
                                .order_by(d.state_changed_at.desc()).limit(limit)).all()
        return [RevocationRow(r[0], int(r[1]), _reasons(r[2])) for r in rows]

    # -- alerts ------------------------------------------------------------------------------------
    def alert_counts(self) -> dict[str, int]:
        """Alerts per status, and open+acknowledged per severity (``open:critical``...)."""
        with self._read("counting alerts") as conn:
            out = {r[0]: int(r[1]) for r in conn.execute(select(al.status, func.count()).group_by(al.status))}
            for sev, n in conn.execute(select(al.severity, func.count())
                                       .where(al.status != AlertStatus.RESOLVED).group_by(al.severity)):
                out[f"active:{sev}"] = int(n)
        return out

    def alerts(self, *, status: str = "", kind: str = "", device_id: str = "", limit: int = 50,
               offset: int = 0) -> tuple[list[AlertRow], int]:
        """Alerts newest first, with the number of matches."""
        cond: list[ColumnElement[bool]] = []
        if status == "active":
            cond.append(al.status != AlertStatus.RESOLVED)
        elif status:
            cond.append(al.status == status)
        if kind:
            cond.append(al.kind == kind)
        if device_id:
            cond.append(al.device_id == device_id)
        where = and_(true(), *cond)
        with self._read("listing alerts") as conn:
            stmt = (select(*_ALERT_COLUMNS).where(where).order_by(al.last_seen_at.desc(), al.id.desc())
                    .limit(max(1, min(limit, MAX_PAGE))).offset(max(0, offset)))
            rows = [_alert(r) for r in conn.execute(stmt)]
            total = int(conn.execute(select(func.count()).select_from(_ALERT).where(where)).scalar_one())
        return rows, total

    def alert(self, alert_id: int) -> AlertRow | None:
        with self._read("reading an alert") as conn:
            row = conn.execute(select(*_ALERT_COLUMNS).where(al.id == alert_id)).first()
        return None if row is None else _alert(row)

    def alert_kinds(self) -> list[str]:
        with self._read("listing alert kinds") as conn:
            return [r[0] for r in conn.execute(select(al.kind).distinct().order_by(al.kind))]

    # -- policies ----------------------------------------------------------------------------------
    def devices_per_pair(self) -> dict[tuple[str, str], int]:
        """Devices per (class, firmware version)."""
        with self._read("counting devices") as conn:
            return {(r[0], r[1]): int(r[2]) for r in conn.execute(
                select(d.device_class, d.firmware_version, func.count())
                .group_by(d.device_class, d.firmware_version))}

    # -- models ------------------------------------------------------------------------------------
    def generic_rows(self, role: str, *, where: Sequence[ColumnElement[bool]] = (), limit: int = 200
                     ) -> GenericRows | None:
        """Rows of a model-protection table (newest first by primary key), or None if it does not exist."""
        table = self.models.get(role)
        if table is None:
            return None
        columns: list[Any] = [c for c in table.c if not isinstance(c.type, LargeBinary)
                              and c.name not in self.models.HIDDEN_COLUMNS]
        source: Any = table
        model = self.models.get("model")
        if role != "model" and "model_id" in table.c and model is not None and "name" in model.c:
            # Name the model instead of its id.
            columns = [model.c.name.label("model") if c.name == "model_id" else c for c in columns]
            source = table.join(model, model.c.id == table.c.model_id)
        stmt = select(*columns).select_from(source).limit(limit)
        pk = list(table.primary_key.columns)
        if pk:
            stmt = stmt.order_by(*(c.desc() for c in pk))
        for cond in where:
            stmt = stmt.where(cond)
        with self._read(f"reading {table.name}") as conn:
            rows = tuple(tuple(_printable(v) for v in r) for r in conn.execute(stmt))
        return GenericRows(self.models.TITLES.get(role, role), table.name, tuple(c.name for c in columns),
                           rows)

    def model_overview(self) -> list[GenericRows]:
        """Every model-protection table present, for the models page."""
        out = []
        for role in self.models.ROLES:
            rows = self.generic_rows(role)
            if rows is not None:
                out.append(rows)
        return out

    def device_model_rows(self, device_id: str) -> list[GenericRows]:
        """Leases and usage rows of one device (tables with a ``device_id`` column)."""
        out = []
        for role in ("lease", "usage", "client_usage"):
            table = self.models.get(role)
            if table is None or "device_id" not in table.c:
                continue
            rows = self.generic_rows(role, where=[table.c.device_id == device_id], limit=50)
            if rows is not None:
                out.append(rows)
        return out
