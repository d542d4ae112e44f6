"""The repository: the only code of the fleet server that runs SQL.

Rows are converted to frozen dataclasses here; table classes never leave this module. Two kinds of
access:

* **Reads** on :class:`Repository` run in their own short transaction and never take the write
  lock (admin commands, the console, cache misses).
* **Writes** go through :meth:`Repository.write`, a context manager yielding a :class:`Tx`: one
  database transaction that commits when the block ends and rolls back on an exception. On SQLite
  it begins with ``BEGIN IMMEDIATE`` (writers are serialised from the first statement, so what a
  :class:`Tx` reads stays true until it commits); on PostgreSQL the queries of a :class:`Tx` that
  decide something lock their rows (``SELECT ... FOR UPDATE``, with ``SKIP LOCKED`` where rows are
  handed out: due devices, outbox rows), so concurrent workers never hand out a row twice.

The hot path costs a constant number of statements per batch, not per message: one query for the
contexts of all evidence of the batch (challenge joined with device), one for the devices of all
``attest.request`` and their open challenges, and one ``executemany`` per kind of change. These
statements are SQLAlchemy Core statements on the SQLModel tables, compiled once per dialect (and
``IN`` list length) and executed with the driver directly, so neither compilation nor SQLAlchemy's
per-row parameter and result processing is paid per message; no ORM objects anywhere.

Database failures are converted to :class:`~protocol.errors.StorageError` (one line, no parameters).
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    Row,
    Table,
    and_,
    bindparam,
    delete,
    func,
    insert,
    literal_column,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from fleet_server.storage import alerting, models
from fleet_server.storage.db import storage_error, write_connection
from fleet_server.storage.model_repo import ModelReads, ModelTx
from fleet_server.storage.models import ATTESTED_STATES, ChallengeStatus, DeviceState
from fleet_server.storage.release_repo import ReleaseReads, ReleaseTx
from fleet_server.storage.rollout_repo import RolloutReads, RolloutTx
from protocol.errors import StorageError

_TABLES = models.SQLModel.metadata.tables
_DEVICE: Table = _TABLES["device"]
_PREREG: Table = _TABLES["preregisteredek"]
_SESSION: Table = _TABLES["enrollmentsession"]
_CHALLENGE: Table = _TABLES["challenge"]
_ATTESTATION: Table = _TABLES["attestation"]
_STATECHANGE: Table = _TABLES["statechange"]
_POLICY: Table = _TABLES["policy"]
_COUNTER: Table = _TABLES["counter"]
_OUTBOX: Table = _TABLES["outbox"]
_HELDLOG: Table = _TABLES["heldlog"]
_DEVCERT: Table = _TABLES["devicecertificate"]

d = _DEVICE.c
c = _CHALLENGE.c

# Schedule queries filter with NOT IN so that SQLite's planner walks the next_attestation_at index in
# order instead of the state index followed by a sort of every attested device.
_NOT_ATTESTED = sorted(str(s) for s in DeviceState if s not in ATTESTED_STATES)


# --------------------------------------------------------------------------------------------------
# JSON helpers (canonical: sorted keys, compact)
# --------------------------------------------------------------------------------------------------
def dumps(value: Any) -> str:
    """Canonical compact JSON text for a JSON column."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def reasons_json(reasons: Sequence[str]) -> str:
    """A JSON list of reasons (the common empty list without calling the encoder)."""
    return dumps(list(reasons)) if reasons else "[]"


def _reasons(text: str | None) -> tuple[str, ...]:
    if not text:
        return ()
    try:
        value = json.loads(text)
    except ValueError:
        return (text,)
    return tuple(str(v) for v in value) if isinstance(value, list) else (str(value),)


def _opt_bytes(value: Any) -> bytes | None:
    return None if value is None else bytes(value)


def selection_json(selection: Mapping[str, Iterable[int]]) -> str:
    """``{"sha256": [0, 1, ...]}`` as canonical JSON text."""
    return dumps({bank: sorted(set(pcrs)) for bank, pcrs in selection.items()})


def selection_from_text(text: str) -> dict[str, tuple[int, ...]]:
    """Inverse of :func:`selection_json` (trusted input: written by this module). A new dict on each
    call; the parse is cached by text (a fleet has a few selections, read for every challenge)."""
    return dict(_parsed_selection(text))


@functools.lru_cache(maxsize=256)
def _parsed_selection(text: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return tuple((bank, tuple(pcrs)) for bank, pcrs in json.loads(text).items())


def pcrs_json(values: Mapping[str, Mapping[int, bytes]]) -> str:
    """``{"sha256": {"0": "<hex>"}}`` as canonical JSON text."""
    return dumps({bank: {str(i): v.hex() for i, v in sorted(vals.items())} for bank, vals in values.items()})


# --------------------------------------------------------------------------------------------------
# values returned by the repository
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class DeviceRecord:
    """A device without its large columns (certificates, public areas, held event log)."""

    id: str
    state: str
    device_class: str
    firmware_version: str
    ek_fingerprint: str
    cert_serial: str | None
    created_at: int
    updated_at: int
    state_changed_at: int
    state_reasons: tuple[str, ...]
    last_attestation_at: int | None
    last_verdict: str | None
    trusted_until: int | None
    next_attestation_at: int | None
    missed_challenges: int
    boot_reset_count: int | None
    boot_restart_count: int | None
    last_clock: int | None
    held_log_size: int
    policy_id: int | None
    last_pcrs: str | None


@dataclass(frozen=True, slots=True)
class DeviceIdentity:
    """What enrollment and approval need of a device: its keys, CSR and the request it proved."""

    id: str
    state: str
    device_class: str
    firmware_version: str
    ek_fingerprint: str
    ek_cert: bytes
    ek_public: bytes
    ak_public: bytes
    ak_name: bytes
    csr: bytes | None
    enroll_request_id: str | None
    cert_serial: str | None


@dataclass(frozen=True, slots=True)
class StateChangeRecord:
    device_id: str
    at: int
    from_state: str | None
    to_state: str
    cause: str


@dataclass(frozen=True, slots=True)
class AttestationRecord:
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
    clock: int | None


@dataclass(frozen=True, slots=True)
class PolicyHeader:
    """A policy without its reference values (enough to pick one and key a cache)."""

    id: int
    name: str
    device_class: str
    firmware_version: str
    reference_sha256: str
    selection: Mapping[str, tuple[int, ...]]
    created_at: int
    created_by: str
    active: bool


@dataclass(frozen=True, slots=True)
class PolicyRecord:
    header: PolicyHeader
    reference: str


@dataclass(frozen=True, slots=True)
class EvidenceContext:
    """Everything the evidence path needs of one challenge and its device, read in one query."""

    challenge_id: str
    device_id: str
    nonce: bytes
    selection: Mapping[str, tuple[int, ...]]
    issued_at: int
    deadline: int
    status: str
    log_offset: int
    log_sha256: bytes
    device_state: str
    state_changed_at: int
    ak_public: bytes
    device_class: str
    firmware_version: str
    policy_id: int | None
    boot_reset_count: int | None
    boot_restart_count: int | None
    last_clock: int | None
    held_log_sha256: bytes | None


@dataclass(frozen=True, slots=True)
class HeldLog:
    """The appraised event log of a device's current boot (rebuilds a worker's cache after a miss)."""

    device_id: str
    log: bytes
    sha256: bytes
    reset_count: int | None
    restart_count: int | None
    clock: int | None


@dataclass(frozen=True, slots=True)
class HelloContext:
    """What answering an ``attest.request`` needs: the device, its open challenge, its held log."""

    device_id: str
    state: str
    device_class: str
    firmware_version: str
    policy_id: int | None
    last_challenge_at: int | None
    next_attestation_at: int | None
    held_log_size: int
    held_log_sha256: bytes | None
    open_challenge: IssuedChallenge | None


@dataclass(frozen=True, slots=True)
class DueDevice:
    """A device the scheduler claimed."""

    id: str
    next_attestation_at: int
    device_class: str
    firmware_version: str
    policy_id: int | None
    held_log_size: int
    held_log_sha256: bytes | None


@dataclass(frozen=True, slots=True)
class IssuedChallenge:
    """A challenge as stored (and as re-sent while open)."""

    id: str
    device_id: str
    nonce: bytes
    selection: Mapping[str, tuple[int, ...]]
    issued_at: int
    deadline: int
    status: str
    cause: str
    log_offset: int
    log_sha256: bytes


@dataclass(frozen=True, slots=True)
class ExpiredChallenge:
    id: str
    device_id: str


@dataclass(frozen=True, slots=True)
class MissedDevice:
    """A device after a missed challenge: its state and consecutive misses."""

    id: str
    state: str
    missed_challenges: int


@dataclass(frozen=True, slots=True)
class EnrollmentSessionRecord:
    id: str
    device_id: str
    proof_sha256: bytes
    ek_cert: bytes
    ek_fingerprint: str
    ek_public: bytes
    ak_public: bytes
    csr: bytes
    device_class: str
    firmware_version: str
    created_at: int
    expires_at: int
    status: str


@dataclass(frozen=True, slots=True)
class PreregistrationRecord:
    ek_fingerprint: str
    device_class: str | None
    note: str
    created_at: int


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    id: int
    topic: str
    payload: bytes = b""
    attempts: int = 0


# --------------------------------------------------------------------------------------------------
# values written by the hot path
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class NewChallenge:
    id: str
    device_id: str
    nonce: bytes
    selection: str        # JSON, see selection_json
    issued_at: int
    deadline: int
    cause: str
    log_offset: int
    log_sha256: bytes


@dataclass(frozen=True, slots=True)
class NewAttestation:
    device_id: str
    challenge_id: str
    issued_at: int
    received_at: int
    stored_at: int
    verdict: str
    reasons: tuple[str, ...]
    evidence_sha256: bytes
    policy_id: int | None
    reset_count: int | None
    restart_count: int | None
    clock: int | None


@dataclass(frozen=True, slots=True)
class AppraisedDevice:
    """The device columns an appraisal sets. The held log is written only when ``held_log_set``
    (``held_log`` empty or ``None`` then clears it)."""

    id: str
    state: str
    state_changed_at: int
    state_reasons: tuple[str, ...]
    last_attestation_at: int
    last_verdict: str
    trusted_until: int | None
    boot_reset_count: int | None
    boot_restart_count: int | None
    last_clock: int | None
    last_pcrs: str | None
    held_log: bytes | None = None
    held_log_sha256: bytes | None = None
    held_log_set: bool = False
    policy_id: int | None = None


@dataclass(frozen=True, slots=True)
class NewStateChange:
    device_id: str
    at: int
    from_state: str | None
    to_state: str
    cause: str


@dataclass(frozen=True, slots=True)
class NewDevice:
    id: str
    state: str
    device_class: str
    firmware_version: str
    ek_cert: bytes
    ek_fingerprint: str
    ek_public: bytes
    ak_public: bytes
    ak_name: bytes
    csr: bytes | None
    enroll_request_id: str | None
    cert_serial: str | None
    now: int
    next_attestation_at: int | None


# --------------------------------------------------------------------------------------------------
# row conversion
# --------------------------------------------------------------------------------------------------
_DEVICE_COLUMNS = (d.id, d.state, d.device_class, d.firmware_version, d.ek_fingerprint, d.cert_serial,
                   d.created_at, d.updated_at, d.state_changed_at, d.state_reasons, d.last_attestation_at,
                   d.last_verdict, d.trusted_until, d.next_attestation_at, d.missed_challenges,
                   d.boot_reset_count, d.boot_restart_count, d.last_clock,
                   d.held_log_size, d.policy_id, d.last_pcrs)


def _device(row: Any) -> DeviceRecord:
    m = row._mapping
    return DeviceRecord(
        id=m["id"], state=m["state"], device_class=m["device_class"], firmware_version=m["firmware_version"],
        ek_fingerprint=m["ek_fingerprint"], cert_serial=m["cert_serial"], created_at=m["created_at"],
        updated_at=m["updated_at"], state_changed_at=m["state_changed_at"],
        state_reasons=_reasons(m["state_reasons"]), last_attestation_at=m["last_attestation_at"],
        last_verdict=m["last_verdict"], trusted_until=m["trusted_until"],
        next_attestation_at=m["next_attestation_at"], missed_challenges=m["missed_challenges"],
        boot_reset_count=m["boot_reset_count"], boot_restart_count=m["boot_restart_count"],
        last_clock=m["last_clock"], held_log_size=int(m["held_log_size"] or 0), policy_id=m["policy_id"],
        last_pcrs=m["last_pcrs"])


_IDENTITY_COLUMNS = (d.id, d.state, d.device_class, d.firmware_version, d.ek_fingerprint, d.ek_cert,
                     d.ek_public, d.ak_public, d.ak_name, d.csr, d.enroll_request_id, d.cert_serial)


def _identity(row: Any) -> DeviceIdentity:
    m = row._mapping
    return DeviceIdentity(id=m["id"], state=m["state"], device_class=m["device_class"],
                          firmware_version=m["firmware_version"], ek_fingerprint=m["ek_fingerprint"],
                          ek_cert=bytes(m["ek_cert"]), ek_public=bytes(m["ek_public"]),
                          ak_public=bytes(m["ak_public"]), ak_name=bytes(m["ak_name"]),
                          csr=None if m["csr"] is None else bytes(m["csr"]),
                          enroll_request_id=m["enroll_request_id"], cert_serial=m["cert_serial"])


_POLICY_HEADER_COLUMNS = (_POLICY.c.id, _POLICY.c.name, _POLICY.c.device_class, _POLICY.c.firmware_version,
                          _POLICY.c.reference_sha256, _POLICY.c.selection, _POLICY.c.created_at,
                          _POLICY.c.created_by, _POLICY.c.active)


def _policy_header(row: Any) -> PolicyHeader:
    m = row._mapping
    return PolicyHeader(id=m["id"], name=m["name"], device_class=m["device_class"],
                        firmware_version=m["firmware_version"], reference_sha256=m["reference_sha256"],
                        selection=selection_from_text(m["selection"] or "{}"), created_at=m["created_at"],
                        created_by=m["created_by"], active=bool(m["active"]))


_CHALLENGE_COLUMNS = (c.id, c.device_id, c.nonce, c.selection, c.issued_at, c.deadline, c.status, c.cause,
                      c.log_offset, c.log_sha256)


def _challenge(row: Any) -> IssuedChallenge:
    m = row._mapping
    return IssuedChallenge(id=m["id"], device_id=m["device_id"], nonce=bytes(m["nonce"]),
                           selection=selection_from_text(m["selection"]), issued_at=m["issued_at"],
                           deadline=m["deadline"], status=m["status"], cause=m["cause"],
                           log_offset=m["log_offset"], log_sha256=bytes(m["log_sha256"]))


_SESSION_COLUMNS = tuple(_SESSION.c)


def _session(row: Any) -> EnrollmentSessionRecord:
    m = row._mapping
    return EnrollmentSessionRecord(
        id=m["id"], device_id=m["device_id"], proof_sha256=bytes(m["proof_sha256"]),
        ek_cert=bytes(m["ek_cert"]), ek_fingerprint=m["ek_fingerprint"], ek_public=bytes(m["ek_public"]),
        ak_public=bytes(m["ak_public"]),
        csr=bytes(m["csr"]), device_class=m["device_class"], firmware_version=m["firmware_version"],
        created_at=m["created_at"], expires_at=m["expires_at"], status=m["status"])


# Statements of the hot path, built once (SQLAlchemy caches their compiled form).
_EVIDENCE_CONTEXT_COLUMNS = (
    c.id, c.device_id, c.nonce, c.selection, c.issued_at, c.deadline, c.status, c.log_offset, c.log_sha256,
    d.state, d.state_changed_at, d.ak_public, d.device_class, d.firmware_version, d.policy_id,
    d.boot_reset_count, d.boot_restart_count, d.last_clock, d.held_log_sha256)
_ACTIVE_POLICIES = select(*_POLICY_HEADER_COLUMNS).where(_POLICY.c.active.is_(True))
_MARK_CHALLENGE = (
    update(_CHALLENGE).where(c.id == bindparam("b_id")).values(status=bindparam("b_status"))
)
_APPRAISED_COMMON: dict[str, Any] = {
    "state": bindparam("b_state"), "state_changed_at": bindparam("b_state_changed_at"),
    "state_reasons": bindparam("b_state_reasons"), "last_attestation_at": bindparam("b_last_attestation_at"),
    "last_verdict": bindparam("b_last_verdict"), "trusted_until": bindparam("b_trusted_until"),
    "missed_challenges": bindparam("b_missed"), "boot_reset_count": bindparam("b_boot_reset_count"),
    "boot_restart_count": bindparam("b_boot_restart_count"), "last_clock": bindparam("b_last_clock"),
    "last_pcrs": bindparam("b_last_pcrs"), "updated_at": bindparam("b_last_attestation_at"),
    "policy_id": bindparam("b_policy_id"),
}
_UPDATE_APPRAISED = update(_DEVICE).where(d.id == bindparam("b_id")).values(**_APPRAISED_COMMON)
_UPDATE_APPRAISED_LOG = update(_DEVICE).where(d.id == bindparam("b_id")).values(
    **_APPRAISED_COMMON, held_log_size=bindparam("b_held_log_size"),
    held_log_sha256=bindparam("b_held_log_sha256"))
_ATTESTATION_KEYS = ("device_id", "challenge_id", "issued_at", "received_at", "stored_at", "latency_ms",
                     "verdict", "reasons", "evidence_sha256", "policy_id", "reset_count", "restart_count",
                     "clock")
_STATECHANGE_KEYS = ("device_id", "at", "from_state", "to_state", "cause")
_CHALLENGE_KEYS = ("id", "device_id", "nonce", "selection", "issued_at", "deadline", "status", "cause",
                   "log_offset", "log_sha256")
# ``inline()``: no RETURNING of generated keys (the hot path never needs them).
_INSERT_ATTESTATION = insert(_ATTESTATION).inline()
_INSERT_STATECHANGE = insert(_STATECHANGE).inline()
_INSERT_CHALLENGE = insert(_CHALLENGE).inline()


_IN_SQL: dict[tuple[str, str, int], tuple[str, tuple[str, ...] | None]] = {}


def _in_rows(conn: Connection, key: str, build: Callable[[list[Any]], Any], values: Sequence[Any]
             ) -> Sequence[Any]:
    """Rows (plain tuples) of the query ``build([bindparam, ...])`` for an ``IN`` list of ``values``.

    The query is compiled by SQLAlchemy once per dialect and number of values (cached under ``key``)
    and executed by the driver: the hot path pays neither compilation nor SQLAlchemy's per-row
    result processing.
    """
    cache_key = (key, conn.dialect.name, len(values))
    found = _IN_SQL.get(cache_key)
    if found is None:
        compiled = build([bindparam(f"v{i}") for i in range(len(values))]).compile(dialect=conn.dialect)
        order = tuple(compiled.positiontup or ()) if conn.dialect.positional else None
        found = _IN_SQL[cache_key] = (compiled.string, order)
    sql, order = found
    named = {f"v{i}": v for i, v in enumerate(values)}
    params: Any = tuple(named[k] for k in order) if order is not None else named
    return conn.exec_driver_sql(sql, params).all()


def _context_query(binds: list[Any]) -> Any:
    return (select(*_EVIDENCE_CONTEXT_COLUMNS).select_from(_CHALLENGE.join(_DEVICE, d.id == c.device_id))
            .where(c.id.in_(binds)).with_for_update())


_HELLO_DEVICE_COLUMNS = (d.id, d.state, d.device_class, d.firmware_version, d.policy_id, d.last_challenge_at,
                         d.next_attestation_at, d.held_log_size, d.held_log_sha256)


def _hello_devices_query(binds: list[Any]) -> Any:
    return select(*_HELLO_DEVICE_COLUMNS).where(d.id.in_(binds)).with_for_update()


def _open_deadlines_query(binds: list[Any]) -> Any:
    return (select(c.device_id, c.deadline)
            .where(c.device_id.in_(binds), c.status == literal_column("'open'")).order_by(c.issued_at))


def _open_challenges_query(binds: list[Any]) -> Any:
    return (select(*_CHALLENGE_COLUMNS)
            .where(c.device_id.in_(binds), c.status == literal_column("'open'")).order_by(c.issued_at))


_SET_NEXT = update(_DEVICE).where(d.id == bindparam("b_id")).values(next_attestation_at=bindparam("b_next"))
_SET_NEXT_LAST = update(_DEVICE).where(d.id == bindparam("b_id")).values(
    next_attestation_at=bindparam("b_next"), last_challenge_at=bindparam("b_last"))


class _Compiled:
    """A Core statement compiled once per dialect, executed with the DBAPI's ``executemany``.

    SQLAlchemy's own ``executemany`` processes every parameter set in Python (type processors, key
    escaping); for the few plain columns of the hot path (str, int, bytes, None: no processors are
    needed on SQLite or psycopg) binding them directly costs a fraction of that. ``keys`` must name
    every bound parameter of the statement.
    """

    _cache: dict[tuple[int, str], _Compiled] = {}

    def __init__(self, stmt: Any, keys: Sequence[str] | None, dialect: Any) -> None:
        compiled = stmt.compile(dialect=dialect, column_keys=list(keys) if keys is not None else None)
        self.sql = compiled.string
        self.order: tuple[str, ...] | None = (tuple(compiled.positiontup or ())
                                               if dialect.positional else None)
        names = set(self.order) if self.order is not None else set(compiled.binds)
        if keys is not None and not names <= set(keys):
            raise StorageError(f"statement needs parameters {sorted(names - set(keys))}")

    @classmethod
    def of(cls, stmt: Any, keys: Sequence[str] | None, conn: Connection) -> _Compiled:
        key = (id(stmt), conn.dialect.name)
        found = cls._cache.get(key)
        if found is None:
            found = cls._cache[key] = cls(stmt, keys, conn.dialect)
        return found

    def executemany(self, conn: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
        if self.order is not None:
            order = self.order
            conn.exec_driver_sql(self.sql, [tuple(row[k] for k in order) for row in rows])
        else:
            conn.exec_driver_sql(self.sql, [dict(row) for row in rows])


def _appraised_params(u: AppraisedDevice) -> dict[str, Any]:
    params = {"b_id": u.id, "b_state": u.state, "b_state_changed_at": u.state_changed_at,
              "b_state_reasons": reasons_json(u.state_reasons),
              "b_last_attestation_at": u.last_attestation_at,
              "b_last_verdict": u.last_verdict, "b_trusted_until": u.trusted_until,
              "b_boot_reset_count": u.boot_reset_count, "b_boot_restart_count": u.boot_restart_count,
              "b_last_clock": u.last_clock, "b_last_pcrs": u.last_pcrs, "b_policy_id": u.policy_id,
              "b_missed": 0}
    if u.held_log_set:
        params["b_held_log_size"] = len(u.held_log or b"")
        params["b_held_log_sha256"] = u.held_log_sha256 if u.held_log else None
    return params


# --------------------------------------------------------------------------------------------------
# the write transaction
# --------------------------------------------------------------------------------------------------
class Tx:
    """One write transaction (see :meth:`Repository.write`). Methods run in it; none commits."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._postgres = conn.dialect.name == "postgresql"

    @property
    def models(self) -> ModelTx:
        """The model-protection tables in this transaction (:mod:`fleet_server.storage.model_repo`)."""
        return ModelTx(self.conn)

    @property
    def releases(self) -> ReleaseTx:
        """The release tables in this transaction (:mod:`fleet_server.storage.release_repo`)."""
        return ReleaseTx(self.conn)

    @property
    def rollouts(self) -> RolloutTx:
        """The rollout tables and device tags in this transaction
        (:mod:`fleet_server.storage.rollout_repo`)."""
        return RolloutTx(self.conn)

    # -- generic -----------------------------------------------------------------------------------
    def _all(self, stmt: Any, params: Mapping[str, Any] | None = None) -> Sequence[Row[Any]]:
        return self.conn.execute(stmt, params or {}).all()

    # -- evidence ----------------------------------------------------------------------------------
    def evidence_contexts(self, challenge_ids: Sequence[str]) -> dict[str, EvidenceContext]:
        """The context of every known challenge id in ``challenge_ids``: challenge and device in one
        query (rows locked until commit)."""
        out: dict[str, EvidenceContext] = {}
        if challenge_ids:
            for r in _in_rows(self.conn, "evidence-context", _context_query, sorted(set(challenge_ids))):
                out[r[0]] = EvidenceContext(
                    challenge_id=r[0], device_id=r[1], nonce=bytes(r[2]), selection=selection_from_text(r[3]),
                    issued_at=r[4], deadline=r[5], status=r[6], log_offset=r[7], log_sha256=bytes(r[8]),
                    device_state=r[9], state_changed_at=r[10], ak_public=bytes(r[11]), device_class=r[12],
                    firmware_version=r[13], policy_id=r[14], boot_reset_count=r[15], boot_restart_count=r[16],
                    last_clock=r[17], held_log_sha256=None if r[18] is None else bytes(r[18]))
        return out

    def active_policies(self) -> list[PolicyHeader]:
        """Headers of every active policy (small; read once per batch)."""
        return [_policy_header(r) for r in self.conn.execute(_ACTIVE_POLICIES)]

    def held_log(self, device_id: str) -> HeldLog | None:
        """The device's held event log, or ``None`` if it holds none."""
        h = _HELDLOG.c
        stmt = (select(h.log, h.sha256, d.boot_reset_count, d.boot_restart_count, d.last_clock)
                .select_from(_HELDLOG.join(_DEVICE, d.id == h.device_id)).where(h.device_id == device_id))
        row = self.conn.execute(stmt).first()
        if row is None:
            return None
        return HeldLog(device_id, bytes(row.log), bytes(row.sha256), row.boot_reset_count,
                       row.boot_restart_count, row.last_clock)

    def mark_challenges(self, ids: Iterable[str], status: str) -> None:
        """Set the status of challenges ``ids`` (e.g. ``used``)."""
        params = [{"b_id": i, "b_status": status} for i in ids]
        if params:
            _Compiled.of(_MARK_CHALLENGE, ("b_id", "b_status"), self.conn).executemany(self.conn, params)

    def insert_attestations(self, rows: Sequence[NewAttestation]) -> None:
        if not rows:
            return
        _Compiled.of(_INSERT_ATTESTATION, _ATTESTATION_KEYS, self.conn).executemany(self.conn, [
            {"device_id": a.device_id, "challenge_id": a.challenge_id, "issued_at": a.issued_at,
             "received_at": a.received_at, "stored_at": a.stored_at, "latency_ms": a.stored_at - a.issued_at,
             "verdict": a.verdict, "reasons": reasons_json(a.reasons), "evidence_sha256": a.evidence_sha256,
             "policy_id": a.policy_id, "reset_count": a.reset_count, "restart_count": a.restart_count,
             "clock": a.clock} for a in rows])

    def update_appraised_devices(self, rows: Sequence[AppraisedDevice]) -> None:
        """Write appraisal outcomes: rows that carry a new held log and rows that do not, one
        ``executemany`` each (the log is written only when it changed)."""
        plain = [_appraised_params(u) for u in rows if not u.held_log_set]
        with_log = [_appraised_params(u) for u in rows if u.held_log_set]
        if plain:
            _Compiled.of(_UPDATE_APPRAISED, None, self.conn).executemany(self.conn, plain)
        if with_log:
            _Compiled.of(_UPDATE_APPRAISED_LOG, None, self.conn).executemany(self.conn, with_log)
            self.set_held_logs([(u.id, u.held_log or b"", u.held_log_sha256) for u in rows if u.held_log_set])

    def set_held_logs(self, rows: Sequence[tuple[str, bytes, bytes | None]]) -> None:
        """Replace the held event logs of devices: (device id, log, its SHA-256); an empty log deletes.
        The caller sets ``device.held_log_sha256``/``held_log_size`` to match."""
        ids = [device_id for device_id, _, _ in rows]
        if not ids:
            return
        self.conn.execute(delete(_HELDLOG).where(_HELDLOG.c.device_id.in_(ids)))
        keep = [{"device_id": i, "log": log, "sha256": sha} for i, log, sha in rows if log and sha]
        if keep:
            self.conn.execute(insert(_HELDLOG), keep)

    def clear_held_log(self, device_id: str) -> None:
        """Drop the device's held log (and its digest on the device row)."""
        self.conn.execute(update(_DEVICE).where(d.id == device_id)
                          .values(held_log_sha256=None, held_log_size=0))
        self.set_held_logs([(device_id, b"", None)])

    def insert_state_changes(self, rows: Sequence[NewStateChange]) -> None:
        """Record state changes; the alert rules on state changes run here, in this transaction."""
        if rows:
            _Compiled.of(_INSERT_STATECHANGE, _STATECHANGE_KEYS, self.conn).executemany(self.conn, [
                {"device_id": s.device_id, "at": s.at, "from_state": s.from_state, "to_state": s.to_state,
                 "cause": s.cause[:2000]} for s in rows])
            alerts = alerting.state_change_alerts(rows)
            if alerts:
                alerting.raise_alerts(self.conn, alerts, max(s.at for s in rows))

    # -- challenges --------------------------------------------------------------------------------
    def hello_contexts(self, device_ids: Sequence[str]) -> dict[str, HelloContext]:
        """Each known device of ``device_ids`` (locked) with its newest open challenge: two queries
        for a whole batch of ``attest.request``."""
        ids = sorted(set(device_ids))
        if not ids:
            return {}
        newest: dict[str, IssuedChallenge] = {}
        for r in _in_rows(self.conn, "open-challenges", _open_challenges_query, ids):
            newest[r[1]] = IssuedChallenge(id=r[0], device_id=r[1], nonce=bytes(r[2]),
                                           selection=selection_from_text(r[3]), issued_at=r[4], deadline=r[5],
                                           status=r[6], cause=r[7], log_offset=r[8], log_sha256=bytes(r[9]))
        return {r[0]: HelloContext(device_id=r[0], state=r[1], device_class=r[2], firmware_version=r[3],
                                   policy_id=r[4], last_challenge_at=r[5], next_attestation_at=r[6],
                                   held_log_size=int(r[7] or 0), held_log_sha256=_opt_bytes(r[8]),
                                   open_challenge=newest.get(r[0]))
                for r in _in_rows(self.conn, "hello-devices", _hello_devices_query, ids)}

    def open_challenge_deadlines(self, device_ids: Sequence[str]) -> dict[str, int]:
        """The deadline of the newest open challenge of each device of ``device_ids`` that has one
        (one narrow query: the scheduler's check for devices still answering)."""
        ids = sorted(set(device_ids))
        if not ids:
            return {}
        return {r[0]: r[1] for r in _in_rows(self.conn, "open-deadlines", _open_deadlines_query, ids)}

    def hello_context(self, device_id: str) -> HelloContext | None:
        """The device and its newest open challenge, locked (``attest.request``)."""
        return self.hello_contexts([device_id]).get(device_id)

    def supersede_open_challenges(self, device_ids: Iterable[str]) -> int:
        """Mark every open challenge of ``device_ids`` superseded (one open challenge per device)."""
        ids = sorted(set(device_ids))
        if not ids:
            return 0
        result = self.conn.execute(
            update(_CHALLENGE).where(c.device_id.in_(ids), c.status == literal_column("'open'"))
            .values(status=ChallengeStatus.SUPERSEDED))
        return int(result.rowcount or 0)

    def insert_challenges(self, rows: Sequence[NewChallenge]) -> None:
        if rows:
            _Compiled.of(_INSERT_CHALLENGE, _CHALLENGE_KEYS, self.conn).executemany(self.conn, [
                {"id": n.id, "device_id": n.device_id, "nonce": n.nonce, "selection": n.selection,
                 "issued_at": n.issued_at, "deadline": n.deadline, "status": ChallengeStatus.OPEN,
                 "cause": n.cause[:16], "log_offset": n.log_offset, "log_sha256": n.log_sha256}
                for n in rows])

    def set_schedule(self, rows: Sequence[tuple[str, int, int | None]]) -> None:
        """(device id, next_attestation_at, last_challenge_at or None to keep it) per device."""
        with_challenge = [{"b_id": i, "b_next": n, "b_last": last} for i, n, last in rows if last is not None]
        without = [{"b_id": i, "b_next": n} for i, n, last in rows if last is None]
        if with_challenge:
            _Compiled.of(_SET_NEXT_LAST, ("b_id", "b_next", "b_last"), self.conn).executemany(
                self.conn, with_challenge)
        if without:
            _Compiled.of(_SET_NEXT, ("b_id", "b_next"), self.conn).executemany(self.conn, without)

    def claim_due_devices(self, now: int, limit: int) -> list[DueDevice]:
        """Attested devices whose ``next_attestation_at`` is due, oldest first (``SKIP LOCKED`` on
        PostgreSQL). The caller must move their schedule in this transaction."""
        stmt = (select(d.id, d.next_attestation_at, d.device_class, d.firmware_version, d.policy_id,
                       d.held_log_size, d.held_log_sha256)
                .where(d.next_attestation_at <= now, d.state.not_in(_NOT_ATTESTED))
                .order_by(d.next_attestation_at).limit(limit).with_for_update(skip_locked=True))
        return [DueDevice(id=r.id, next_attestation_at=r.next_attestation_at, device_class=r.device_class,
                          firmware_version=r.firmware_version, policy_id=r.policy_id,
                          held_log_size=int(r.held_log_size or 0),
                          held_log_sha256=None if r.held_log_sha256 is None else bytes(r.held_log_sha256))
                for r in self._all(stmt)]

    def overdue_devices(self, before: int, limit: int) -> list[str]:
        """Ids of attested devices whose ``next_attestation_at`` is before ``before`` (``SKIP LOCKED``
        on PostgreSQL). The caller must move their schedule in this transaction."""
        stmt = (select(d.id).where(d.next_attestation_at < before, d.state.not_in(_NOT_ATTESTED))
                .order_by(d.next_attestation_at).limit(limit).with_for_update(skip_locked=True))
        return [r[0] for r in self._all(stmt)]

    def expire_challenges(self, before: int, limit: int) -> list[ExpiredChallenge]:
        """Mark open challenges whose deadline is before ``before`` expired; return them."""
        # The literal (not a bound parameter) lets PostgreSQL's generic plans use the partial index
        # of open challenges too.
        rows = self._all(select(c.id, c.device_id)
                         .where(c.status == literal_column("'open'"), c.deadline < before)
                         .order_by(c.deadline).limit(limit).with_for_update(skip_locked=True))
        if not rows:
            return []
        self.conn.execute(update(_CHALLENGE).where(c.id.in_([r.id for r in rows]))
                          .values(status=ChallengeStatus.EXPIRED))
        return [ExpiredChallenge(r.id, r.device_id) for r in rows]

    def count_misses(self, device_ids: Sequence[str], now: int) -> list[MissedDevice]:
        """Add one missed challenge per entry of ``device_ids``; return the devices afterwards."""
        counts: dict[str, int] = {}
        for i in device_ids:
            counts[i] = counts.get(i, 0) + 1
        if not counts:
            return []
        self.conn.execute(update(_DEVICE).where(d.id == bindparam("b_id"))
                          .values(missed_challenges=d.missed_challenges + bindparam("b_n"), updated_at=now),
                          [{"b_id": i, "b_n": n} for i, n in sorted(counts.items())])
        rows = self._all(select(d.id, d.state, d.missed_challenges).where(d.id.in_(sorted(counts))))
        return [MissedDevice(r.id, r.state, r.missed_challenges) for r in rows]

    # -- device state ------------------------------------------------------------------------------
    def device_identity(self, device_id: str) -> DeviceIdentity | None:
        """The device's identity columns, locked."""
        row = self.conn.execute(select(*_IDENTITY_COLUMNS).where(d.id == device_id).with_for_update()).first()
        return None if row is None else _identity(row)

    def device_id_by_ek(self, ek_fingerprint: str) -> str | None:
        return self.conn.execute(select(d.id).where(d.ek_fingerprint == ek_fingerprint)).scalar()

    def set_state(self, device_id: str, *, from_state: str | None, to_state: str, cause: str, now: int,
                  reasons: Sequence[str] = (), extra: Mapping[str, Any] | None = None) -> None:
        """Change a device's state and record the change (``from_state`` as read in this transaction).

        ``extra`` sets further device columns in the same statement.
        """
        values: dict[str, Any] = {"state": to_state, "state_changed_at": now, "updated_at": now,
                                  "state_reasons": dumps(list(reasons))}
        values.update(extra or {})
        self.conn.execute(update(_DEVICE).where(d.id == device_id).values(**values))
        self.insert_state_changes([NewStateChange(device_id, now, from_state, to_state, cause)])

    def update_device(self, device_id: str, values: Mapping[str, Any]) -> None:
        """Set device columns (by name) without a state change."""
        allowed = set(_DEVICE.c.keys()) - {"id"}
        unknown = set(values) - allowed
        if unknown:
            raise StorageError(f"unknown device column {sorted(unknown)[0]!r}")
        self.conn.execute(update(_DEVICE).where(d.id == device_id).values(**values))

    def insert_device(self, n: NewDevice, cause: str) -> None:
        """Create a device row and record its first state."""
        self.conn.execute(insert(_DEVICE).values(
            id=n.id, state=n.state, device_class=n.device_class, firmware_version=n.firmware_version,
            ek_cert=n.ek_cert, ek_fingerprint=n.ek_fingerprint, ek_public=n.ek_public, ak_public=n.ak_public,
            ak_name=n.ak_name, csr=n.csr, enroll_request_id=n.enroll_request_id, cert_serial=n.cert_serial,
            created_at=n.now, updated_at=n.now, state_changed_at=n.now, state_reasons="[]",
            missed_challenges=0, next_attestation_at=n.next_attestation_at))
        self.insert_state_changes([NewStateChange(n.id, n.now, None, n.state, cause)])

    def record_device_certificate(self, device_id: str, serial: str, *, not_after: int, now: int) -> None:
        """Record a certificate just issued to ``device_id``; the device's earlier certificates are
        marked replaced, which puts them on the CRL (:meth:`Repository.crl_serials`) until they expire."""
        self.conn.execute(update(_DEVCERT).where(_DEVCERT.c.device_id == device_id,
                                                 _DEVCERT.c.replaced_at.is_(None)).values(replaced_at=now))
        self.conn.execute(insert(_DEVCERT).values(serial=serial, device_id=device_id, issued_at=now,
                                                  not_after=not_after, replaced_at=None))

    # -- enrollment --------------------------------------------------------------------------------
    def preregistration(self, ek_fingerprint: str) -> PreregistrationRecord | None:
        row = self.conn.execute(select(*_PREREG.c).where(_PREREG.c.ek_fingerprint == ek_fingerprint)).first()
        if row is None:
            return None
        return PreregistrationRecord(row.ek_fingerprint, row.device_class, row.note, row.created_at)

    def insert_session(self, s: EnrollmentSessionRecord) -> None:
        """Store a new enrollment session, superseding the device's open ones."""
        self.conn.execute(update(_SESSION).where(_SESSION.c.device_id == s.device_id,
                                                 _SESSION.c.status == "open").values(status="superseded"))
        self.conn.execute(insert(_SESSION).values(
            id=s.id, device_id=s.device_id, proof_sha256=s.proof_sha256, ek_cert=s.ek_cert,
            ek_fingerprint=s.ek_fingerprint, ek_public=s.ek_public, ak_public=s.ak_public, csr=s.csr,
            device_class=s.device_class, firmware_version=s.firmware_version, created_at=s.created_at,
            expires_at=s.expires_at, status=s.status))

    def session(self, request_id: str) -> EnrollmentSessionRecord | None:
        row = self.conn.execute(select(*_SESSION_COLUMNS).where(_SESSION.c.id == request_id)
                                .with_for_update()).first()
        return None if row is None else _session(row)

    def set_session_status(self, request_id: str, status: str) -> None:
        self.conn.execute(update(_SESSION).where(_SESSION.c.id == request_id).values(status=status))

    def preregister(self, ek_fingerprint: str, *, device_class: str | None, note: str, now: int) -> bool:
        """Register an EK fingerprint; False if it already was (then nothing changes)."""
        if self.preregistration(ek_fingerprint) is not None:
            return False
        self.conn.execute(insert(_PREREG).values(ek_fingerprint=ek_fingerprint, device_class=device_class,
                                                 note=note, created_at=now))
        return True

    # -- policies ----------------------------------------------------------------------------------
    def insert_policy(self, *, name: str, device_class: str, firmware_version: str, reference: str,
                      reference_sha256: str, selection: str, now: int, created_by: str,
                      replace: bool = False) -> int:
        """Store a policy; an active policy for the same class and firmware version is deactivated.

        A policy of the same name is refused unless ``replace`` (then the old row is renamed away
        inactive, so attestation rows keep pointing at what they were appraised with).
        """
        existing = self.conn.execute(select(_POLICY.c.id).where(_POLICY.c.name == name)).scalar()
        if existing is not None:
            if not replace:
                raise StorageError(f"a policy named {name!r} already exists")
            self.conn.execute(update(_POLICY).where(_POLICY.c.id == existing)
                              .values(name=f"{name[:40]}~{existing}", active=False))
        self.conn.execute(update(_POLICY).where(_POLICY.c.device_class == device_class,
                                                _POLICY.c.firmware_version == firmware_version,
                                                _POLICY.c.active.is_(True)).values(active=False))
        result = self.conn.execute(insert(_POLICY).values(
            name=name, device_class=device_class, firmware_version=firmware_version, reference=reference,
            reference_sha256=reference_sha256, selection=selection, created_at=now, created_by=created_by,
            active=True).returning(_POLICY.c.id))
        return int(result.scalar_one())

    # -- outbox, counters, retention ---------------------------------------------------------------
    def add_outbox(self, topic: str, payload: bytes, now: int) -> int:
        """Queue a signed message for publication by a worker (same transaction as its cause)."""
        result = self.conn.execute(insert(_OUTBOX).values(topic=topic, payload=payload, created_at=now,
                                                          attempts=0).returning(_OUTBOX.c.id))
        return int(result.scalar_one())

    def claim_outbox(self, now: int, lease_ms: int, limit: int) -> list[OutboxMessage]:
        """Unsent messages not leased by another worker, oldest first; leased until ``now + lease_ms``."""
        o = _OUTBOX.c
        rows = self._all(select(o.id, o.topic, o.payload, o.attempts)
                         .where(o.sent_at.is_(None), or_(o.claimed_until.is_(None), o.claimed_until < now))
                         .order_by(o.id).limit(limit).with_for_update(skip_locked=True))
        if not rows:
            return []
        self.conn.execute(update(_OUTBOX).where(o.id.in_([r.id for r in rows]))
                          .values(claimed_until=now + lease_ms, attempts=o.attempts + 1))
        return [OutboxMessage(r.id, r.topic, bytes(r.payload), r.attempts + 1) for r in rows]

    def mark_outbox_sent(self, ids: Sequence[int], now: int) -> None:
        if ids:
            self.conn.execute(update(_OUTBOX).where(_OUTBOX.c.id.in_(list(ids))).values(sent_at=now))

    def add_counters(self, worker: str, deltas: Mapping[str, int], now: int) -> None:
        """Add ``deltas`` to this worker's counters (upsert)."""
        rows = [{"worker": worker, "name": name[:96], "value": int(v), "updated_at": now}
                for name, v in sorted(deltas.items()) if v]
        if not rows:
            return
        if self.conn.dialect.name in ("sqlite", "postgresql"):
            ins = (sqlite_insert(_COUNTER) if self.conn.dialect.name == "sqlite" else pg_insert(_COUNTER))
            stmt = ins.on_conflict_do_update(
                index_elements=[_COUNTER.c.worker, _COUNTER.c.name],
                set_={"value": _COUNTER.c.value + ins.excluded.value, "updated_at": ins.excluded.updated_at})
            self.conn.execute(stmt, rows)
            return
        for row in rows:  # other databases: update, else insert
            result = self.conn.execute(update(_COUNTER).where(_COUNTER.c.worker == worker,
                                                              _COUNTER.c.name == row["name"])
                                       .values(value=_COUNTER.c.value + row["value"], updated_at=now))
            if not result.rowcount:
                self.conn.execute(insert(_COUNTER).values(**row))

    def prune(self, *, attestations_before: int, challenges_before: int, sessions_before: int,
              outbox_before: int, limit: int = 5000) -> int:
        """Delete old history rows (at most ``limit`` per table); returns the number deleted."""
        total = 0
        for table, cond in (
            (_ATTESTATION, _ATTESTATION.c.stored_at < attestations_before),
            (_CHALLENGE, and_(c.status != ChallengeStatus.OPEN, c.issued_at < challenges_before)),
            (_SESSION, and_(_SESSION.c.status != "open", _SESSION.c.created_at < sessions_before)),
            (_OUTBOX, and_(_OUTBOX.c.sent_at.is_not(None), _OUTBOX.c.sent_at < outbox_before)),
        ):
            pk = next(iter(table.primary_key.columns))
            victims = select(pk).where(cond).limit(limit).scalar_subquery()
            result = self.conn.execute(delete(table).where(pk.in_(victims)))
            total += int(result.rowcount or 0)
        return total


# --------------------------------------------------------------------------------------------------
# the repository
# --------------------------------------------------------------------------------------------------
class Repository:
    """Reads, and the door to write transactions (:meth:`write`), over one SQLAlchemy engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @contextlib.contextmanager
    def write(self, what: str = "writing") -> Iterator[Tx]:
        """One write transaction: commits at the end of the block, rolls back on an exception.

        Database failures become :class:`StorageError` naming ``what``.
        """
        try:
            with write_connection(self.engine) as conn, conn.begin():
                yield Tx(conn)
        except IntegrityError as exc:
            raise storage_error(exc, what) from None
        except SQLAlchemyError as exc:
            raise storage_error(exc, what) from None

    @contextlib.contextmanager
    def _read(self, what: str) -> Iterator[Connection]:
        try:
            with self.engine.connect() as conn, conn.begin():
                yield conn
        except SQLAlchemyError as exc:
            raise storage_error(exc, what) from None

    def dispose(self) -> None:
        """Close pooled connections (before a fork, or at exit)."""
        self.engine.dispose()

    @property
    def models(self) -> ModelReads:
        """Reads of the model-protection tables (:mod:`fleet_server.storage.model_repo`)."""
        return ModelReads(self.engine)

    @property
    def releases(self) -> ReleaseReads:
        """Reads of the release tables (:mod:`fleet_server.storage.release_repo`)."""
        return ReleaseReads(self.engine)

    @property
    def rollouts(self) -> RolloutReads:
        """Reads of the rollout tables (:mod:`fleet_server.storage.rollout_repo`)."""
        return RolloutReads(self.engine)

    # -- devices -----------------------------------------------------------------------------------
    def crl_serials(self, now: int) -> list[str]:
        """Serials (hex, sorted) of the unexpired device certificates to refuse: every certificate of a
        revoked device, and every certificate replaced by a newer one of its device."""
        cert = _DEVCERT.c
        stmt = (select(cert.serial).select_from(_DEVCERT.join(_DEVICE, d.id == cert.device_id))
                .where(cert.not_after > now,
                       or_(cert.replaced_at.is_not(None), d.state == DeviceState.REVOKED))
                .order_by(cert.serial))
        with self._read("listing revoked certificates") as conn:
            return [r[0] for r in conn.execute(stmt)]

    def device(self, device_id: str) -> DeviceRecord | None:
        with self._read("reading a device") as conn:
            row = conn.execute(select(*_DEVICE_COLUMNS).where(d.id == device_id)).first()
        return None if row is None else _device(row)

    def devices(self, state: str | None = None, *, limit: int | None = None) -> list[DeviceRecord]:
        """Devices ordered by id, optionally only those in ``state``."""
        stmt = select(*_DEVICE_COLUMNS).order_by(d.id)
        if state is not None:
            stmt = stmt.where(d.state == state)
        if limit is not None:
            stmt = stmt.limit(limit)
        with self._read("listing devices") as conn:
            return [_device(r) for r in conn.execute(stmt)]

    def device_identity(self, device_id: str) -> DeviceIdentity | None:
        with self._read("reading a device") as conn:
            row = conn.execute(select(*_IDENTITY_COLUMNS).where(d.id == device_id)).first()
        return None if row is None else _identity(row)

    def count_devices_by_state(self) -> dict[str, int]:
        with self._read("counting devices") as conn:
            return {r[0]: int(r[1]) for r in conn.execute(select(d.state, func.count()).group_by(d.state))}

    def state_history(self, device_id: str, *, limit: int = 50) -> list[StateChangeRecord]:
        """The device's most recent state changes, newest first."""
        s = _STATECHANGE.c
        with self._read("reading state history") as conn:
            rows = conn.execute(select(s.device_id, s.at, s.from_state, s.to_state, s.cause)
                                .where(s.device_id == device_id).order_by(s.at.desc(), s.id.desc())
                                .limit(limit)).all()
        return [StateChangeRecord(r.device_id, r.at, r.from_state, r.to_state, r.cause) for r in rows]

    def attestations(self, device_id: str, *, limit: int = 20) -> list[AttestationRecord]:
        """The device's most recent attestation results, newest first."""
        a = _ATTESTATION.c
        with self._read("reading attestations") as conn:
            rows = conn.execute(select(*_ATTESTATION.c).where(a.device_id == device_id)
                                .order_by(a.stored_at.desc(), a.id.desc()).limit(limit)).all()
        return [AttestationRecord(r.device_id, r.challenge_id, r.issued_at, r.received_at, r.stored_at,
                                  r.latency_ms, r.verdict, _reasons(r.reasons), bytes(r.evidence_sha256),
                                  r.policy_id, r.reset_count, r.restart_count, r.clock) for r in rows]

    def preregistration(self, ek_fingerprint: str) -> PreregistrationRecord | None:
        with self._read("reading pre-registrations") as conn:
            return Tx(conn).preregistration(ek_fingerprint)

    # -- the evidence path -------------------------------------------------------------------------
    def evidence_contexts(self, challenge_ids: Sequence[str]) -> dict[str, EvidenceContext]:
        """Challenge + device context of every known id in ``challenge_ids`` (without locking)."""
        with self._read("reading challenges") as conn:
            return Tx(conn).evidence_contexts(challenge_ids)

    def held_log(self, device_id: str) -> HeldLog | None:
        """The device's held event log, or ``None`` if it holds none."""
        with self._read("reading a held event log") as conn:
            return Tx(conn).held_log(device_id)

    def challenge(self, challenge_id: str) -> IssuedChallenge | None:
        with self._read("reading a challenge") as conn:
            row = conn.execute(select(*_CHALLENGE_COLUMNS).where(c.id == challenge_id)).first()
        return None if row is None else _challenge(row)

    def open_challenges(self, device_id: str | None = None) -> list[IssuedChallenge]:
        stmt = select(*_CHALLENGE_COLUMNS).where(c.status == literal_column("'open'")).order_by(c.issued_at)
        if device_id is not None:
            stmt = stmt.where(c.device_id == device_id)
        with self._read("reading challenges") as conn:
            return [_challenge(r) for r in conn.execute(stmt)]

    # -- policies ----------------------------------------------------------------------------------
    def active_policies(self) -> list[PolicyHeader]:
        """Headers of every active policy."""
        with self._read("reading policies") as conn:
            return Tx(conn).active_policies()

    def policies(self) -> list[PolicyHeader]:
        with self._read("listing policies") as conn:
            rows = conn.execute(select(*_POLICY_HEADER_COLUMNS).order_by(_POLICY.c.name)).all()
        return [_policy_header(r) for r in rows]

    def policy(self, *, name: str | None = None, policy_id: int | None = None) -> PolicyRecord | None:
        """One policy with its reference values, by name or id."""
        stmt = select(*_POLICY_HEADER_COLUMNS, _POLICY.c.reference)
        if policy_id is not None:
            stmt = stmt.where(_POLICY.c.id == policy_id)
        elif name is not None:
            stmt = stmt.where(_POLICY.c.name == name)
        else:
            raise StorageError("policy(): give a name or an id")
        with self._read("reading a policy") as conn:
            row = conn.execute(stmt).first()
        return None if row is None else PolicyRecord(_policy_header(row), row.reference)

    # -- counters and outbox -----------------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        """Every counter summed over workers."""
        with self._read("reading counters") as conn:
            rows = conn.execute(select(_COUNTER.c.name, func.sum(_COUNTER.c.value))
                                .group_by(_COUNTER.c.name)).all()
        return {r[0]: int(r[1] or 0) for r in rows}

    def outbox(self, *, unsent_only: bool = True) -> list[OutboxMessage]:
        o = _OUTBOX.c
        stmt = select(o.id, o.topic, o.payload, o.attempts).order_by(o.id)
        if unsent_only:
            stmt = stmt.where(o.sent_at.is_(None))
        with self._read("reading the outbox") as conn:
            return [OutboxMessage(r.id, r.topic, bytes(r.payload), r.attempts) for r in conn.execute(stmt)]
