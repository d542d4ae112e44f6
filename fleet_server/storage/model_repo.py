"""SQL of the model-protection tables (:mod:`fleet_server.storage.model_tables`).

Reached through the repository: ``tx.models`` (a :class:`ModelTx` in the caller's write
transaction) and ``repo.models`` (:class:`ModelReads`, short read transactions). Like
:mod:`fleet_server.storage.repo`, rows become frozen dataclasses here and table classes never
leave; database failures become :class:`~protocol.errors.StorageError`.

Model protection is off the attestation hot path except for :meth:`ModelTx.renew_leases`,
:meth:`ModelTx.end_leases` and :meth:`ModelTx.offers`, which the evidence transaction runs once
per batch (one statement each; :meth:`ModelTx.offers` stops after one query when none of the
batch's devices is entitled to anything).
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    CursorResult,
    Engine,
    Table,
    and_,
    bindparam,
    delete,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.exc import SQLAlchemyError

from fleet_server.storage import models
from fleet_server.storage.db import storage_error
from fleet_server.storage.model_tables import EntitlementKind, LeaseState
from protocol.modelpkg import parse_version

_TABLES = models.SQLModel.metadata.tables
_MODEL: Table = _TABLES["model"]
_VERSION: Table = _TABLES["modelversion"]
_ENTITLEMENT: Table = _TABLES["entitlement"]
_LEASE: Table = _TABLES["lease"]
_USAGE: Table = _TABLES["modelusage"]
_CLIENT: Table = _TABLES["modelclientusage"]
_RUNTIME: Table = _TABLES["deviceruntime"]
_LOAD: Table = _TABLES["modelloadstatus"]
_DEVICE: Table = _TABLES["device"]
_ATTESTATION: Table = _TABLES["attestation"]
_ALERT: Table = _TABLES["alert"]
_ROLLOUT: Table = _TABLES["rollout"]
_MEMBER: Table = _TABLES["rolloutmember"]
m, v, e, le = _MODEL.c, _VERSION.c, _ENTITLEMENT.c, _LEASE.c
DAY_MS = 86_400_000


# --------------------------------------------------------------------------------------------------
# values
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ModelRecord:
    id: int
    name: str
    created_at: int
    created_by: str


@dataclass(frozen=True, slots=True)
class NewVersion:
    """A version to store (see :class:`fleet_server.storage.model_tables.ModelVersion`)."""

    model_id: int
    version: str
    package_id: str
    package_path: str
    package_size: int
    package_sha256: bytes
    plaintext_size: int
    plaintext_sha256: bytes
    ciphertext_sha256: bytes
    signing_key_id: str
    kek_id: str
    data_key_nonce: bytes
    encrypted_data_key: bytes
    policy: str
    manifest: str
    created_at: int
    created_by: str


@dataclass(frozen=True, slots=True)
class VersionRecord:
    """A published version with its model's name."""

    id: int
    model_id: int
    name: str
    version: str
    package_id: str
    package_path: str
    package_size: int
    package_sha256: bytes
    plaintext_size: int
    plaintext_sha256: bytes
    ciphertext_sha256: bytes
    signing_key_id: str
    kek_id: str
    data_key_nonce: bytes
    encrypted_data_key: bytes
    policy: str
    manifest: str
    created_at: int
    created_by: str
    deployed_at: int | None = None
    deployed_by: str = ""

    @property
    def deployed(self) -> bool:
        """True once a principal holding ``model:deploy`` deployed it (devices may receive it)."""
        return self.deployed_at is not None

    @property
    def order(self) -> tuple[int, int, int]:
        """Sort key: the version as numbers."""
        return parse_version(self.version)


@dataclass(frozen=True, slots=True)
class ModelSummary:
    """A model for listings: newest version, counts."""

    name: str
    created_at: int
    versions: int
    newest: str | None
    entitlements: int
    active_leases: int
    deployed: str | None = None
    """The newest deployed version (the one devices are offered), or None."""


@dataclass(frozen=True, slots=True)
class EntitlementRecord:
    model: str
    kind: str
    subject: str
    created_at: int
    created_by: str


@dataclass(frozen=True, slots=True)
class NewLease:
    lease_id: str
    device_id: str
    model_id: int
    version: str
    issued_at: int
    expires_at: int
    key_name: bytes


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    lease_id: str
    device_id: str
    model: str
    version: str
    state: str
    issued_at: int
    expires_at: int
    renewed_at: int | None
    revoked_at: int | None
    reason: str
    key_name: bytes


@dataclass(frozen=True, slots=True)
class DeviceKeyContext:
    """What a key request needs of its device: state, trust expiry, AK, and the latest attestation
    (its verdict, PCR values and TPM boot counters)."""

    device_id: str
    state: str
    device_class: str
    trusted_until: int | None
    ak_public: bytes
    last_pcrs: str | None
    latest_verdict: str | None
    reset_count: int | None
    restart_count: int | None


@dataclass(frozen=True, slots=True)
class OfferedVersion:
    """The newest version of a model a device is entitled to and holds no active lease for."""

    device_id: str
    name: str
    version: str
    package_size: int
    package_sha256: bytes


@dataclass(frozen=True, slots=True)
class UsageRecord:
    device_id: str
    model: str
    day: int
    served: int
    refused: int
    reports: int
    last_until: int
    updated_at: int

    @property
    def date(self) -> str:
        """The UTC date (``YYYY-MM-DD``)."""
        return (dt.date(1970, 1, 1) + dt.timedelta(days=self.day)).isoformat()


@dataclass(frozen=True, slots=True)
class ClientUsageRecord:
    device_id: str
    model: str
    client: str
    served: int
    refused: int
    statistic_micro: int | None
    alarm: bool
    alarm_at: int | None
    updated_at: int


@dataclass(frozen=True, slots=True)
class AlertRecord:
    id: int
    kind: str
    severity: str
    device_id: str | None
    model: str | None
    message: str
    details: str
    dedup_key: str
    status: str
    count: int
    created_at: int
    last_seen_at: int


_VERSION_COLUMNS = (v.id, v.model_id, m.name, v.version, v.package_id, v.package_path, v.package_size,
                    v.package_sha256, v.plaintext_size, v.plaintext_sha256, v.ciphertext_sha256,
                    v.signing_key_id, v.kek_id, v.data_key_nonce, v.encrypted_data_key, v.policy,
                    v.manifest, v.created_at, v.created_by, v.deployed_at, v.deployed_by)
_LEASE_COLUMNS = (le.lease_id, le.device_id, m.name, le.version, le.state, le.issued_at, le.expires_at,
                  le.renewed_at, le.revoked_at, le.reason, le.key_name)


@dataclass(frozen=True, slots=True)
class LoadRecord:
    """A device's latest report of one model version: ``loaded`` or ``failed`` with onnxruntime's reason."""

    device_id: str
    name: str
    version: str
    state: str
    error: str
    onnxruntime: str
    reported_at: int


def _version(r: object) -> VersionRecord:
    x = r._mapping  # type: ignore[attr-defined]
    return VersionRecord(
        id=x["id"], model_id=x["model_id"], name=x["name"], version=x["version"], package_id=x["package_id"],
        package_path=x["package_path"], package_size=x["package_size"],
        package_sha256=bytes(x["package_sha256"]),
        plaintext_size=x["plaintext_size"], plaintext_sha256=bytes(x["plaintext_sha256"]),
        ciphertext_sha256=bytes(x["ciphertext_sha256"]), signing_key_id=x["signing_key_id"],
        kek_id=x["kek_id"], data_key_nonce=bytes(x["data_key_nonce"]),
        encrypted_data_key=bytes(x["encrypted_data_key"]), policy=x["policy"], manifest=x["manifest"],
        created_at=x["created_at"], created_by=x["created_by"], deployed_at=x["deployed_at"],
        deployed_by=x["deployed_by"] or "")


def _lease(r: object) -> LeaseRecord:
    x = r._mapping  # type: ignore[attr-defined]
    return LeaseRecord(lease_id=x["lease_id"], device_id=x["device_id"], model=x["name"],
                       version=x["version"], state=x["state"], issued_at=x["issued_at"],
                       expires_at=x["expires_at"], renewed_at=x["renewed_at"], revoked_at=x["revoked_at"],
                       reason=x["reason"], key_name=bytes(x["key_name"]))


def _newest(versions: Sequence[VersionRecord]) -> VersionRecord | None:
    return max(versions, key=lambda r: r.order, default=None)


_IN_SQL: dict[tuple[str, str, int], tuple[str, tuple[str, ...] | None]] = {}


def _in_execute(conn: Connection, key: str, build: Callable[[list[Any]], Any], values: Sequence[Any],
                params: Mapping[str, Any] | None = None) -> CursorResult[Any]:
    """Execute ``build([bindparam, ...])`` for an ``IN`` list of ``values`` (plus named ``params``).

    Compiled by SQLAlchemy once per dialect and list length and executed by the driver, like the
    repository's hot-path queries: the evidence transaction runs these once per batch, and building
    and compiling the statement each time would cost more than executing it.
    """
    cache_key = (key, conn.dialect.name, len(values))
    found = _IN_SQL.get(cache_key)
    if found is None:
        compiled = build([bindparam(f"v{i}") for i in range(len(values))]).compile(dialect=conn.dialect)
        order = tuple(compiled.positiontup or ()) if conn.dialect.positional else None
        found = _IN_SQL[cache_key] = (compiled.string, order)
    sql, order = found
    named: dict[str, Any] = {f"v{i}": v for i, v in enumerate(values)}
    named.update(params or {})
    return conn.exec_driver_sql(sql, tuple(named[k] for k in order) if order is not None else named)


def _renew_statement(binds: list[Any]) -> Any:
    return (update(_LEASE).where(le.device_id.in_(binds), le.state == bindparam("b_active"),
                                 le.expires_at < bindparam("b_expires"))
            .values(renewed_at=bindparam("b_now"), expires_at=bindparam("b_expires")))


def _entitlement_statement(binds: list[Any]) -> Any:
    return select(e.model_id, e.kind, e.subject).where(e.subject.in_(binds))


def _versions_statement(binds: list[Any]) -> Any:
    return (select(v.model_id, m.name, v.version, v.package_size, v.package_sha256)
            .select_from(_VERSION.join(_MODEL, m.id == v.model_id))
            .where(v.model_id.in_(binds), v.deployed_at.is_not(None)))


def _staged_statement(binds: list[Any]) -> Any:
    ro, rm = _ROLLOUT.c, _MEMBER.c
    return (select(rm.device_id, v.model_id, m.name, v.version, v.package_size, v.package_sha256)
            .select_from(_MEMBER.join(_ROLLOUT, ro.id == rm.rollout_id)
                         .join(_VERSION, v.id == ro.model_version_id).join(_MODEL, m.id == v.model_id))
            .where(rm.device_id.in_(binds), ro.kind == bindparam("b_kind"),
                   ro.state.in_([bindparam("b_running"), bindparam("b_paused")]),
                   rm.assigned_at.is_not(None)))


def _held_statement(binds: list[Any]) -> Any:
    return (select(le.device_id, le.model_id, le.version)
            .where(le.device_id.in_(binds), le.state == bindparam("b_active")))


# --------------------------------------------------------------------------------------------------
# in a write transaction
# --------------------------------------------------------------------------------------------------
class ModelTx:
    """Statements on the model-protection tables inside one transaction (``tx.models``)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    # -- models and versions -----------------------------------------------------------------------
    def model(self, name: str) -> ModelRecord | None:
        row = self.conn.execute(select(m.id, m.name, m.created_at, m.created_by)
                                .where(m.name == name)).first()
        return None if row is None else ModelRecord(row.id, row.name, row.created_at, row.created_by)

    def ensure_model(self, name: str, *, now: int, actor: str) -> ModelRecord:
        """The model called ``name``, created if it does not exist yet."""
        found = self.model(name)
        if found is not None:
            return found
        self.conn.execute(insert(_MODEL).values(name=name, created_at=now, created_by=actor[:64]))
        created = self.model(name)
        assert created is not None
        return created

    def versions(self, model_id: int, *, lock: bool = False) -> list[VersionRecord]:
        """Every version of a model, newest first."""
        stmt = (select(*_VERSION_COLUMNS).select_from(_VERSION.join(_MODEL, m.id == v.model_id))
                .where(v.model_id == model_id))
        if lock:
            stmt = stmt.with_for_update(of=_VERSION)
        rows = [_version(r) for r in self.conn.execute(stmt)]
        return sorted(rows, key=lambda r: r.order, reverse=True)

    def version(self, name: str, version: str) -> VersionRecord | None:
        row = self.conn.execute(select(*_VERSION_COLUMNS)
                                .select_from(_VERSION.join(_MODEL, m.id == v.model_id))
                                .where(m.name == name, v.version == version)).first()
        return None if row is None else _version(row)

    def version_by_id(self, version_id: int) -> VersionRecord | None:
        row = self.conn.execute(select(*_VERSION_COLUMNS)
                                .select_from(_VERSION.join(_MODEL, m.id == v.model_id))
                                .where(v.id == version_id)).first()
        return None if row is None else _version(row)

    def insert_version(self, n: NewVersion) -> int:
        result = self.conn.execute(insert(_VERSION).values(
            model_id=n.model_id, version=n.version, package_id=n.package_id, package_path=n.package_path,
            package_size=n.package_size, package_sha256=n.package_sha256, plaintext_size=n.plaintext_size,
            plaintext_sha256=n.plaintext_sha256, ciphertext_sha256=n.ciphertext_sha256,
            signing_key_id=n.signing_key_id, kek_id=n.kek_id, data_key_nonce=n.data_key_nonce,
            encrypted_data_key=n.encrypted_data_key, policy=n.policy, manifest=n.manifest,
            created_at=n.created_at, created_by=n.created_by[:64], deployed_at=None,
            deployed_by="").returning(v.id))
        return int(result.scalar_one())

    def deploy_version(self, version_id: int, *, now: int, actor: str) -> None:
        """Mark a version deployed: from now on devices are offered it (if it is the newest deployed)."""
        self.conn.execute(update(_VERSION).where(v.id == version_id)
                          .values(deployed_at=now, deployed_by=actor[:64]))

    def set_policy(self, version_id: int, policy: str) -> None:
        self.conn.execute(update(_VERSION).where(v.id == version_id).values(policy=policy))

    # -- entitlements ------------------------------------------------------------------------------
    def add_entitlement(self, model_id: int, kind: str, subject: str, *, now: int, actor: str) -> bool:
        """Entitle ``subject`` (a device id or class); False if it already was."""
        if self.conn.execute(select(e.id).where(e.model_id == model_id, e.kind == kind,
                                                e.subject == subject)).first() is not None:
            return False
        self.conn.execute(insert(_ENTITLEMENT).values(model_id=model_id, kind=kind, subject=subject,
                                                      created_at=now, created_by=actor[:64]))
        return True

    def remove_entitlement(self, model_id: int, kind: str, subject: str) -> bool:
        result = self.conn.execute(delete(_ENTITLEMENT).where(e.model_id == model_id, e.kind == kind,
                                                              e.subject == subject))
        return bool(result.rowcount)

    def entitled(self, model_id: int, device_id: str, device_class: str) -> bool:
        """True if the device (by id or by class) is entitled to the model."""
        return self.conn.execute(select(e.id).where(e.model_id == model_id, _subject_matches(device_id,
                                                                                             device_class))
                                 .limit(1)).first() is not None

    def entitlements(self, model_id: int | None = None) -> list[EntitlementRecord]:
        stmt = (select(m.name, e.kind, e.subject, e.created_at, e.created_by)
                .select_from(_ENTITLEMENT.join(_MODEL, m.id == e.model_id))
                .order_by(m.name, e.kind, e.subject))
        if model_id is not None:
            stmt = stmt.where(e.model_id == model_id)
        return [EntitlementRecord(r.name, r.kind, r.subject, r.created_at, r.created_by)
                for r in self.conn.execute(stmt)]

    # -- devices -----------------------------------------------------------------------------------
    def device_key_context(self, device_id: str) -> DeviceKeyContext | None:
        """The device (row locked until commit) and its latest attestation."""
        d = _DEVICE.c
        row = self.conn.execute(select(d.id, d.state, d.device_class, d.trusted_until, d.ak_public,
                                       d.last_pcrs)
                                .where(d.id == device_id).with_for_update()).first()
        if row is None:
            return None
        a = _ATTESTATION.c
        latest = self.conn.execute(select(a.verdict, a.reset_count, a.restart_count)
                                   .where(a.device_id == device_id)
                                   .order_by(a.stored_at.desc(), a.id.desc()).limit(1)).first()
        return DeviceKeyContext(
            device_id=row.id, state=row.state, device_class=row.device_class, trusted_until=row.trusted_until,
            ak_public=bytes(row.ak_public), last_pcrs=row.last_pcrs,
            latest_verdict=None if latest is None else latest.verdict,
            reset_count=None if latest is None else latest.reset_count,
            restart_count=None if latest is None else latest.restart_count)

    def device_trust(self, device_ids: Sequence[str]) -> dict[str, tuple[str, str, int | None]]:
        """device id -> (state, class, trusted_until) of the known ids among ``device_ids``."""
        d = _DEVICE.c
        if not device_ids:
            return {}
        rows = self.conn.execute(select(d.id, d.state, d.device_class, d.trusted_until)
                                 .where(d.id.in_(sorted(set(device_ids)))))
        return {r.id: (r.state, r.device_class, r.trusted_until) for r in rows}

    # -- leases ------------------------------------------------------------------------------------
    def insert_lease(self, n: NewLease) -> None:
        self.conn.execute(insert(_LEASE).values(
            lease_id=n.lease_id, device_id=n.device_id, model_id=n.model_id, version=n.version,
            state=LeaseState.ACTIVE, issued_at=n.issued_at, expires_at=n.expires_at, renewed_at=None,
            revoked_at=None, reason="", key_name=n.key_name))

    def leases(self, *, device_ids: Sequence[str] | None = None, model_id: int | None = None,
               version: str | None = None, state: str | None = None, states: Sequence[str] | None = None,
               limit: int | None = None) -> list[LeaseRecord]:
        """Leases matching every given filter (``state``, or any of ``states``), newest first."""
        stmt = (select(*_LEASE_COLUMNS).select_from(_LEASE.join(_MODEL, m.id == le.model_id))
                .order_by(le.issued_at.desc(), le.id.desc()))
        if device_ids is not None:
            stmt = stmt.where(le.device_id.in_(sorted(set(device_ids))))
        if model_id is not None:
            stmt = stmt.where(le.model_id == model_id)
        if version is not None:
            stmt = stmt.where(le.version == version)
        if state is not None:
            stmt = stmt.where(le.state == state)
        if states is not None:
            stmt = stmt.where(le.state.in_(list(states)))
        if limit is not None:
            stmt = stmt.limit(limit)
        return [_lease(r) for r in self.conn.execute(stmt)]

    def end_leases(self, *, state: str, reason: str, now: int, device_ids: Sequence[str] | None = None,
                   model_id: int | None = None, version: str | None = None,
                   from_states: Sequence[str] = (LeaseState.ACTIVE,)) -> list[LeaseRecord]:
        """Move the leases in ``from_states`` (default: active) matching the filters to ``state``
        (revoked, superseded...); returns them as they were. With no device, model or version filter,
        nothing is changed."""
        if device_ids is None and model_id is None and version is None:
            return []
        if device_ids is not None and not device_ids:
            return []
        ended = self.leases(device_ids=device_ids, model_id=model_id, version=version, states=from_states)
        if ended:
            self.conn.execute(update(_LEASE).where(le.lease_id.in_([x.lease_id for x in ended]))
                              .values(state=state, revoked_at=now, reason=reason[:256]))
        return ended

    def renew_leases(self, device_ids: Sequence[str], *, now: int, expires_at: int) -> int:
        """A trusted attestation renews every active lease of its device until ``expires_at``."""
        if not device_ids:
            return 0
        result = _in_execute(self.conn, "renew-leases", _renew_statement, sorted(set(device_ids)),
                             {"b_active": str(LeaseState.ACTIVE), "b_expires": expires_at, "b_now": now})
        return int(result.rowcount or 0)

    def sweep_leases(self, now: int, *, limit: int = 1000) -> tuple[int, int]:
        """Expire active leases past their expiry; revoke active leases of devices that are no longer
        trusted (untrusted, revoked, quarantined, back to pending or enrolled; an unreachable
        device's leases run out by themselves). Returns (expired, revoked)."""
        # SKIP LOCKED (PostgreSQL): two workers sweeping at once take different rows.
        expired = self.conn.execute(select(le.id).where(le.state == LeaseState.ACTIVE, le.expires_at <= now)
                                    .limit(limit).with_for_update(skip_locked=True)).scalars().all()
        if expired:
            self.conn.execute(update(_LEASE).where(le.id.in_(list(expired)))
                              .values(state=LeaseState.EXPIRED, revoked_at=now, reason="lease expired"))
        d = _DEVICE.c
        untrusted = (select(le.id, d.state).select_from(_LEASE.join(_DEVICE, d.id == le.device_id))
                     .where(le.state == LeaseState.ACTIVE,
                            d.state.in_(["untrusted", "revoked", "quarantined", "pending", "enrolled"]))
                     .limit(limit).with_for_update(skip_locked=True, of=_LEASE))
        revoked = self.conn.execute(untrusted).all()
        for lease_pk, state in revoked:
            self.conn.execute(update(_LEASE).where(le.id == lease_pk).values(
                state=LeaseState.REVOKED, revoked_at=now, reason=f"device is {state}"))
        return len(expired), len(revoked)

    # -- offers ------------------------------------------------------------------------------------
    def offers(self, devices: Sequence[tuple[str, str]]) -> dict[str, list[OfferedVersion]]:
        """For (device id, class) pairs: the newest deployed version of each model the device is
        entitled to and holds no active lease for (published but undeployed versions are never
        offered)."""
        if not devices:
            return {}
        ids = {d for d, _ in devices}
        classes = {c for _, c in devices}
        found: Sequence[Any] = _in_execute(self.conn, "entitlements-of", _entitlement_statement,
                                           sorted(ids | classes)).all()
        rows = [(int(model_id), str(kind), str(subject)) for model_id, kind, subject in found
                if subject in (ids if kind == EntitlementKind.DEVICE else classes)]
        if not rows:
            return {}
        by_device: dict[str, set[int]] = {}
        for device_id, device_class in devices:
            for model_id, kind, subject in rows:
                if subject == (device_id if kind == EntitlementKind.DEVICE else device_class):
                    by_device.setdefault(device_id, set()).add(model_id)
        model_ids = sorted({mid for mids in by_device.values() for mid in mids})
        versions: dict[int, list[tuple[str, str, int, bytes]]] = {}
        version_rows: Sequence[Any] = _in_execute(self.conn, "versions-of", _versions_statement,
                                                  model_ids).all()
        for model_id, name, version, size, sha in version_rows:
            versions.setdefault(model_id, []).append((name, version, size, bytes(sha)))
        newest = {mid: max(vs, key=lambda x: parse_version(x[1])) for mid, vs in versions.items()}
        staged = self.staged(sorted(by_device))
        lease_rows: Sequence[Any] = _in_execute(self.conn, "held-leases", _held_statement, sorted(by_device),
                                                {"b_active": str(LeaseState.ACTIVE)}).all()
        held = {(device_id, model_id, version) for device_id, model_id, version in lease_rows}
        out: dict[str, list[OfferedVersion]] = {}
        for device_id, mids in by_device.items():
            for mid in sorted(mids):
                chosen = staged.get((device_id, mid)) or newest.get(mid)
                if chosen is None:
                    continue  # entitled to a model with no deployed version yet
                name, version, size, sha = chosen
                if (device_id, mid, version) not in held:
                    out.setdefault(device_id, []).append(OfferedVersion(device_id, name, version, size, sha))
        return out

    def staged(self, device_ids: Sequence[str]) -> dict[tuple[str, int], tuple[str, str, int, bytes]]:
        """``{(device id, model id): (name, version, size, package sha256)}`` of the model version a
        running or paused model rollout assigned to the device: offered (and its key released) to
        that device instead of the deployed one. Empty without model rollouts."""
        if not device_ids:
            return {}
        rows: Sequence[Any] = _in_execute(
            self.conn, "staged-versions", _staged_statement, sorted(set(device_ids)),
            {"b_kind": "model", "b_running": "running", "b_paused": "paused"}).all()
        return {(str(d), int(mid)): (str(name), str(ver), int(size), bytes(sha))
                for d, mid, name, ver, size, sha in rows}

    # -- telemetry ---------------------------------------------------------------------------------
    def record_usage(self, device_id: str, model_id: int, *, since: int, until: int, served: int,
                     refused: int, now: int) -> bool:
        """Add a telemetry period to the device's totals of ``until``'s UTC day. False (nothing
        written) if the period starts before the end of the last period recorded that day (a
        replayed or overlapping report)."""
        u = _USAGE.c
        day = until // DAY_MS
        row = self.conn.execute(select(u.last_until).where(u.device_id == device_id, u.model_id == model_id,
                                                           u.day == day).with_for_update()).first()
        if row is None:
            self.conn.execute(insert(_USAGE).values(device_id=device_id, model_id=model_id, day=day,
                                                    served=served, refused=refused, reports=1,
                                                    last_until=until, updated_at=now))
            return True
        if since < row.last_until:
            return False
        self.conn.execute(update(_USAGE).where(u.device_id == device_id, u.model_id == model_id, u.day == day)
                          .values(served=u.served + served, refused=u.refused + refused,
                                  reports=u.reports + 1, last_until=until, updated_at=now))
        return True

    def record_client(self, device_id: str, model_id: int, *, client: str, served: int, refused: int,
                      statistic_micro: int | None, alarm: bool, now: int) -> bool:
        """Add a client's counts and keep its latest extraction statistic; True if this report
        raises the client's alarm for the first time."""
        c = _CLIENT.c
        key = and_(c.device_id == device_id, c.model_id == model_id, c.client == client)
        row = self.conn.execute(select(c.alarm).where(key).with_for_update()).first()
        if row is None:
            self.conn.execute(insert(_CLIENT).values(
                device_id=device_id, model_id=model_id, client=client, served=served, refused=refused,
                statistic_micro=statistic_micro, alarm=alarm, alarm_at=now if alarm else None,
                updated_at=now))
            return alarm
        values: dict[str, object] = {"served": c.served + served, "refused": c.refused + refused,
                                     "statistic_micro": statistic_micro, "alarm": alarm, "updated_at": now}
        if alarm and not row.alarm:
            values["alarm_at"] = now
        self.conn.execute(update(_CLIENT).where(key).values(**values))
        return alarm and not row.alarm


    # -- runtime and load status reported by devices ------------------------------------------------
    def record_runtime(self, device_id: str, onnxruntime: str, *, now: int) -> None:
        """Keep the onnxruntime version the device reports (the latest report wins)."""
        r = _RUNTIME.c
        stmt = select(r.device_id).where(r.device_id == device_id).with_for_update()
        if self.conn.execute(stmt).first() is None:
            self.conn.execute(insert(_RUNTIME).values(device_id=device_id, onnxruntime=onnxruntime,
                                                      reported_at=now))
        else:
            self.conn.execute(update(_RUNTIME).where(r.device_id == device_id)
                              .values(onnxruntime=onnxruntime, reported_at=now))

    def load_status(self, device_ids: Sequence[str], model_id: int, version: str
                    ) -> dict[str, tuple[str, str, str, int]]:
        """``{device id: (state, error, onnxruntime, reported_at)}``: the devices' latest load report
        of one model version."""
        if not device_ids:
            return {}
        c = _LOAD.c
        rows = self.conn.execute(select(c.device_id, c.state, c.error, c.onnxruntime, c.reported_at).where(
            c.device_id.in_(sorted(set(device_ids))), c.model_id == model_id, c.version == version))
        return {r.device_id: (r.state, r.error, r.onnxruntime, int(r.reported_at)) for r in rows}

    def record_load(self, device_id: str, model_id: int, version: str, *, state: str, error: str,
                    onnxruntime: str, now: int) -> None:
        """Keep the device's latest load outcome of one model version."""
        c = _LOAD.c
        key = and_(c.device_id == device_id, c.model_id == model_id, c.version == version)
        values = {"state": state, "error": error, "onnxruntime": onnxruntime, "reported_at": now}
        if self.conn.execute(select(c.state).where(key).with_for_update()).first() is None:
            self.conn.execute(insert(_LOAD).values(device_id=device_id, model_id=model_id, version=version,
                                                   **values))
        else:
            self.conn.execute(update(_LOAD).where(key).values(**values))


def _subject_matches(device_id: str, device_class: str) -> ColumnElement[bool]:
    return or_(and_(e.kind == EntitlementKind.DEVICE, e.subject == device_id),
               and_(e.kind == EntitlementKind.CLASS, e.subject == device_class))


# --------------------------------------------------------------------------------------------------
# reads
# --------------------------------------------------------------------------------------------------
class ModelReads:
    """Reads of the model-protection tables, each in a short transaction of its own (``repo.models``)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @contextlib.contextmanager
    def reading(self, what: str) -> Iterator[ModelTx]:
        """A read transaction for several of :class:`ModelTx`'s queries (do not write in it)."""
        try:
            with self.engine.connect() as conn, conn.begin():
                yield ModelTx(conn)
        except SQLAlchemyError as exc:
            raise storage_error(exc, what) from None

    def models(self) -> list[ModelSummary]:
        """Every model with its newest version and counts, by name."""
        with self.reading("listing models") as tx:
            names = tx.conn.execute(select(m.id, m.name, m.created_at).order_by(m.name)).all()
            versions: dict[int, list[str]] = {}
            deployed: dict[int, list[str]] = {}
            for r in tx.conn.execute(select(v.model_id, v.version, v.deployed_at)):
                versions.setdefault(r.model_id, []).append(r.version)
                if r.deployed_at is not None:
                    deployed.setdefault(r.model_id, []).append(r.version)
            ents: dict[int, int] = {r[0]: int(r[1]) for r in tx.conn.execute(
                select(e.model_id, func.count()).group_by(e.model_id))}
            leases: dict[int, int] = {r[0]: int(r[1]) for r in tx.conn.execute(
                select(le.model_id, func.count()).where(le.state == LeaseState.ACTIVE).group_by(le.model_id))}
        return [ModelSummary(name=r.name, created_at=r.created_at, versions=len(versions.get(r.id, [])),
                             newest=max(versions[r.id], key=parse_version) if versions.get(r.id) else None,
                             entitlements=int(ents.get(r.id, 0)), active_leases=int(leases.get(r.id, 0)),
                             deployed=max(deployed[r.id], key=parse_version) if deployed.get(r.id) else None)
                for r in names]

    def model(self, name: str) -> ModelRecord | None:
        with self.reading("reading a model") as tx:
            return tx.model(name)

    def versions(self, name: str) -> list[VersionRecord]:
        """Every version of model ``name``, newest first (empty if there is no such model)."""
        with self.reading("reading model versions") as tx:
            found = tx.model(name)
            return [] if found is None else tx.versions(found.id)

    def version(self, name: str, version: str) -> VersionRecord | None:
        with self.reading("reading a model version") as tx:
            return tx.version(name, version)

    def newest(self, name: str) -> VersionRecord | None:
        return _newest(self.versions(name))

    def entitlements(self, name: str | None = None) -> list[EntitlementRecord]:
        with self.reading("reading entitlements") as tx:
            if name is None:
                return tx.entitlements()
            found = tx.model(name)
            return [] if found is None else tx.entitlements(found.id)

    def leases(self, *, device_id: str | None = None, name: str | None = None, state: str | None = None,
               limit: int | None = None) -> list[LeaseRecord]:
        """Leases, newest first, filtered by device, model and state."""
        with self.reading("reading leases") as tx:
            model_id = None
            if name is not None:
                found = tx.model(name)
                if found is None:
                    return []
                model_id = found.id
            return tx.leases(device_ids=None if device_id is None else [device_id], model_id=model_id,
                             state=state, limit=limit)

    def usage(self, *, device_id: str | None = None, name: str | None = None) -> list[UsageRecord]:
        """Telemetry totals per device, model and day, newest day first."""
        u = _USAGE.c
        stmt = (select(u.device_id, m.name, u.day, u.served, u.refused, u.reports, u.last_until, u.updated_at)
                .select_from(_USAGE.join(_MODEL, m.id == u.model_id)).order_by(u.day.desc(), u.device_id))
        if device_id is not None:
            stmt = stmt.where(u.device_id == device_id)
        if name is not None:
            stmt = stmt.where(m.name == name)
        with self.reading("reading model usage") as tx:
            return [UsageRecord(r.device_id, r.name, r.day, r.served, r.refused, r.reports, r.last_until,
                                r.updated_at) for r in tx.conn.execute(stmt)]

    def client_usage(self, *, device_id: str | None = None,
                     name: str | None = None) -> list[ClientUsageRecord]:
        c = _CLIENT.c
        stmt = (select(c.device_id, m.name, c.client, c.served, c.refused, c.statistic_micro, c.alarm,
                       c.alarm_at, c.updated_at)
                .select_from(_CLIENT.join(_MODEL, m.id == c.model_id))
                .order_by(c.device_id, m.name, c.client))
        if device_id is not None:
            stmt = stmt.where(c.device_id == device_id)
        if name is not None:
            stmt = stmt.where(m.name == name)
        with self.reading("reading client usage") as tx:
            return [ClientUsageRecord(r.device_id, r.name, r.client, r.served, r.refused, r.statistic_micro,
                                      bool(r.alarm), r.alarm_at, r.updated_at) for r in tx.conn.execute(stmt)]

    def runtime(self, device_id: str) -> tuple[str, int] | None:
        """The onnxruntime version the device last reported and when (``None``: never reported)."""
        r = _RUNTIME.c
        with self.reading("reading the device runtime") as tx:
            row = tx.conn.execute(select(r.onnxruntime, r.reported_at)
                                  .where(r.device_id == device_id)).first()
        return None if row is None else (row.onnxruntime, row.reported_at)

    def loads(self, *, device_id: str | None = None, name: str | None = None, version: str | None = None,
              state: str | None = None) -> list[LoadRecord]:
        """Load outcomes devices reported, by model, version and device."""
        c = _LOAD.c
        stmt = (select(c.device_id, m.name, c.version, c.state, c.error, c.onnxruntime, c.reported_at)
                .select_from(_LOAD.join(_MODEL, m.id == c.model_id)).order_by(m.name, c.version, c.device_id))
        if device_id is not None:
            stmt = stmt.where(c.device_id == device_id)
        if name is not None:
            stmt = stmt.where(m.name == name)
        if version is not None:
            stmt = stmt.where(c.version == version)
        if state is not None:
            stmt = stmt.where(c.state == state)
        with self.reading("reading model load status") as tx:
            return [LoadRecord(r.device_id, r.name, r.version, r.state, r.error, r.onnxruntime, r.reported_at)
                    for r in tx.conn.execute(stmt)]

    def alerts(self, *, kind: str | None = None, device_id: str | None = None) -> list[AlertRecord]:
        """Alerts, oldest first, optionally of one kind or device."""
        a = _ALERT.c
        stmt = select(a.id, a.kind, a.severity, a.device_id, a.model, a.message, a.details, a.dedup_key,
                      a.status, a.count, a.created_at, a.last_seen_at).order_by(a.id)
        if kind is not None:
            stmt = stmt.where(a.kind == kind)
        if device_id is not None:
            stmt = stmt.where(a.device_id == device_id)
        with self.reading("reading alerts") as tx:
            rows = tx.conn.execute(stmt).all()
        return [AlertRecord(id=x["id"], kind=x["kind"], severity=x["severity"], device_id=x["device_id"],
                            model=x["model"], message=x["message"], details=x["details"],
                            dedup_key=x["dedup_key"], status=x["status"], count=x["count"],
                            created_at=x["created_at"], last_seen_at=x["last_seen_at"])
                for x in (r._mapping for r in rows)]


__all__ = [
    "AlertRecord", "ClientUsageRecord", "DeviceKeyContext", "EntitlementRecord", "LeaseRecord", "LoadRecord",
    "ModelReads",
    "ModelRecord", "ModelSummary", "ModelTx", "NewLease", "NewVersion", "OfferedVersion", "UsageRecord",
    "VersionRecord",
]
