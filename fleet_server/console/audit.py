"""The audit log: append-only and tamper-evident (a hash chain), with its storage.

Every administrative action (console, API and CLI) appends one entry ``(seq, at, actor, action,
target, details, prev_hash, hash)``:

* ``seq`` counts 1, 2, 3, ... without gaps;
* ``prev_hash`` is the ``hash`` of entry ``seq - 1`` (:data:`GENESIS_HASH` for the first);
* ``hash`` = SHA-256 over the canonical bytes (:func:`entry_bytes`) of every other field, including
  ``prev_hash`` and the stored ``details`` text itself (the bytes as stored are hashed, never a
  re-serialisation).

Altering a row breaks its own hash; deleting a row leaves a gap in ``seq``; re-computing the hash of
an altered row breaks the next row's ``prev_hash``; swapping rows breaks the hashes (``seq`` is
hashed); deleting the newest rows is caught by the head row (``audithead``: newest seq and hash),
which is written in the same transaction as every entry. :func:`verify_chain` (pure) walks the entries
in order and reports the **first** broken link.

A consistent rewrite of *every* row (and the head) by someone with database access is caught by the
signed checkpoints (:mod:`fleet_server.console.checkpoint`): with a :class:`Checkpointing` (the key
file and the interval), :class:`AuditLog` signs the head in the transaction of every entry that makes
a checkpoint due, and :meth:`AuditLog.verify` checks every checkpoint against the chain.

Writers are serialised so that two concurrent writers can never fork the chain: on SQLite the write
transaction starts with ``BEGIN IMMEDIATE`` (one writer at a time); on PostgreSQL the head row is
locked (``SELECT ... FOR UPDATE``) before the next ``seq`` is chosen.

The pure part (:func:`entry_bytes`, :func:`entry_hash`, :func:`verify_chain`) has no I/O;
:class:`AuditLog` is the storage. Nothing here imports Flask: CLI commands use :func:`record_cli`.
"""

from __future__ import annotations

import dataclasses
import getpass
import hashlib
import json
import logging
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519
from sqlalchemy import Connection, Engine, Table, insert, select, update
from sqlalchemy.exc import SQLAlchemyError

from fleet_server.config import AuditSettings
from fleet_server.console.checkpoint import (
    Checkpoint,
    CheckpointReport,
    sign_checkpoint,
    signature_problem,
    verify_checkpoints,
)
from fleet_server.keys import CheckpointSigningKey, load_checkpoint_public_key, load_or_create_checkpoint_key
from fleet_server.storage import audit_checkpoints, models
from fleet_server.storage.db import storage_error, write_connection
from protocol.encoding import canonical_bytes
from protocol.errors import VerificationError

log = logging.getLogger("fleet_server.audit")

GENESIS_HASH = "0" * 64
"""``prev_hash`` of the first entry."""
FORMAT = 1
MAX_ACTOR = 96
MAX_ACTION = 64
MAX_TARGET = 256
MAX_DETAILS = 16_000

_TABLES = models.SQLModel.metadata.tables
_ENTRY: Table = _TABLES["auditentry"]
_HEAD: Table = _TABLES["audithead"]
e = _ENTRY.c
HEAD_ID = 1


# --------------------------------------------------------------------------------------------------
# pure core
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One entry as stored (``details`` is the canonical JSON text)."""

    seq: int
    at: int
    actor: str
    action: str
    target: str
    details: str
    prev_hash: str
    hash: str

    def details_dict(self) -> dict[str, Any]:
        """``details`` parsed (an empty dict if the stored text is not a JSON object)."""
        try:
            value = json.loads(self.details)
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}


def canonical_details(details: Mapping[str, Any] | None) -> str:
    """The canonical JSON text of ``details`` (sorted keys, compact; values that JSON lacks become
    strings). Raises ValueError if it is longer than :data:`MAX_DETAILS`."""
    text = json.dumps(dict(details or {}), sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False, default=str)
    if len(text) > MAX_DETAILS:
        raise ValueError(f"audit details longer than {MAX_DETAILS} characters")
    return text


def entry_bytes(*, seq: int, at: int, actor: str, action: str, target: str, details: str,
                prev_hash: str) -> bytes:
    """The canonical bytes an entry's hash covers."""
    return canonical_bytes({"format": FORMAT, "seq": seq, "at": at, "actor": actor, "action": action,
                            "target": target, "details": details, "prev_hash": prev_hash})


def entry_hash(*, seq: int, at: int, actor: str, action: str, target: str, details: str,
               prev_hash: str) -> str:
    """SHA-256 (lowercase hex) of :func:`entry_bytes`."""
    return hashlib.sha256(entry_bytes(seq=seq, at=at, actor=actor, action=action, target=target,
                                      details=details, prev_hash=prev_hash)).hexdigest()


def record_hash(r: AuditRecord) -> str:
    """The hash ``r`` should carry, computed from its other fields."""
    return entry_hash(seq=r.seq, at=r.at, actor=r.actor, action=r.action, target=r.target,
                      details=r.details, prev_hash=r.prev_hash)


@dataclass(frozen=True, slots=True)
class ChainHead:
    """The newest entry as the head row records it."""

    seq: int
    hash: str


@dataclass(frozen=True, slots=True)
class ChainReport:
    """Outcome of :func:`verify_chain`: ``ok``, the entries checked, and the first broken link; with
    the signed checkpoints checked too (:meth:`AuditLog.verify`), their report (``ok`` is then False
    if any checkpoint fails)."""

    ok: bool
    entries: int
    last_seq: int
    first_bad_seq: int | None = None
    reason: str = ""
    checkpoints: CheckpointReport | None = None

    def summary(self) -> str:
        """One line for the CLI and the console."""
        if self.ok:
            return f"audit log intact: {self.entries} entries, chain verified up to seq {self.last_seq}"
        if self.reason or self.checkpoints is None or not self.checkpoints.problems:
            return f"audit log BROKEN at seq {self.first_bad_seq}: {self.reason}"
        return f"audit log BROKEN: {self.checkpoints.problems[0]}"

    def lines(self) -> list[str]:
        """Every line of the report: the summary and, on success, the last good checkpoint; on failure,
        the broken link and one line per failing checkpoint."""
        if self.ok:
            last = self.checkpoints.last_good if self.checkpoints is not None else None
            return [self.summary()] + ([self.checkpoints.summary()] if self.checkpoints and last else [])
        out = [f"audit log BROKEN at seq {self.first_bad_seq}: {self.reason}"] if self.reason else []
        problems = self.checkpoints.problems if self.checkpoints is not None else ()
        return out + [f"audit log BROKEN: {p}" for p in problems]


def verify_chain(records: Iterable[AuditRecord], head: ChainHead | None, *, start_seq: int = 1,
                 start_hash: str = GENESIS_HASH) -> ChainReport:
    """Walk ``records`` (ascending ``seq``) and report the first broken link (pure). ``start_seq`` and
    ``start_hash`` check a tail of the chain only: its first entry links to ``start_hash``."""
    expected = start_seq
    prev = start_hash
    count = 0
    for r in records:
        if r.seq != expected:
            if r.seq > expected:
                gap = f"{expected}" if r.seq == expected + 1 else f"{expected}-{r.seq - 1}"
                return ChainReport(False, count, expected - 1, expected,
                                   f"entry {gap} is missing (deleted): the next entry is seq {r.seq}")
            return ChainReport(False, count, expected - 1, r.seq,
                               f"entry out of order: seq {r.seq} where {expected} was expected")
        if record_hash(r) != r.hash:
            return ChainReport(False, count, expected - 1, r.seq,
                               "entry altered: its hash does not match its contents")
        if r.prev_hash != prev:
            what = "the start of the chain" if r.seq == 1 else f"entry {r.seq - 1}"
            if r.seq == start_seq and start_seq > 1:
                what = f"entry {r.seq - 1} as checkpointed"
            return ChainReport(False, count, expected - 1, r.seq,
                               f"link broken: prev_hash does not match the hash of {what} "
                               f"(entry {r.seq - 1} was altered, or this one re-linked)")
        prev = r.hash
        count += 1
        expected += 1
    last = expected - 1
    if head is not None:
        if head.seq > last:
            return ChainReport(False, count, last, last + 1,
                               f"entries {last + 1}-{head.seq} are missing (deleted from the end; the head "
                               f"records seq {head.seq})")
        if head.seq < last:
            return ChainReport(False, count, last, head.seq + 1,
                               f"entries after seq {head.seq} were not written by the audit log writer "
                               "(the head does not record them)")
        if head.hash != prev:
            return ChainReport(False, count, last, last or None,
                               "the head's hash does not match the newest entry")
    return ChainReport(True, count, last)


# --------------------------------------------------------------------------------------------------
# storage
# --------------------------------------------------------------------------------------------------
def _record(row: Any) -> AuditRecord:
    return AuditRecord(seq=int(row.seq), at=int(row.at), actor=row.actor, action=row.action,
                       target=row.target, details=row.details, prev_hash=row.prev_hash, hash=row.hash)


_COLUMNS = (e.seq, e.at, e.actor, e.action, e.target, e.details, e.prev_hash, e.hash)


def append_in(conn: Connection, *, actor: str, action: str, target: str = "",
              details: Mapping[str, Any] | None = None, now: int) -> AuditRecord:
    """Append an entry in the caller's write transaction (see :func:`write_connection`); the head row
    is locked first, so concurrent writers queue up behind it."""
    text = canonical_details(details)
    actor, action, target = actor[:MAX_ACTOR], action[:MAX_ACTION], target[:MAX_TARGET]
    head = conn.execute(select(_HEAD.c.seq, _HEAD.c.hash).where(_HEAD.c.id == HEAD_ID)
                        .with_for_update()).first()
    if head is None:  # a database created without the migration's head row
        conn.execute(insert(_HEAD).values(id=HEAD_ID, seq=0, hash=GENESIS_HASH, updated_at=now))
        seq, prev = 1, GENESIS_HASH
    else:
        seq, prev = int(head.seq) + 1, head.hash
    digest = entry_hash(seq=seq, at=now, actor=actor, action=action, target=target, details=text,
                        prev_hash=prev)
    conn.execute(insert(_ENTRY).values(seq=seq, at=now, actor=actor, action=action, target=target,
                                       details=text, prev_hash=prev, hash=digest))
    conn.execute(update(_HEAD).where(_HEAD.c.id == HEAD_ID).values(seq=seq, hash=digest, updated_at=now))
    return AuditRecord(seq, now, actor, action, target, text, prev, digest)


class Checkpointing:
    """The checkpoint key (a file, loaded, or created on first use) and how often to sign: what an
    :class:`AuditLog` needs to sign and verify checkpoints (:mod:`fleet_server.console.checkpoint`)."""

    def __init__(self, key_path: Path, interval: int) -> None:
        self.key_path = Path(key_path)
        self.interval = interval
        self._key: CheckpointSigningKey | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: AuditSettings) -> Checkpointing:
        return cls(settings.checkpoint_key, settings.checkpoint_interval)

    def signing_key(self) -> CheckpointSigningKey:
        with self._lock:
            if self._key is None:
                self._key = load_or_create_checkpoint_key(self.key_path)
            return self._key

    def public_key(self) -> ed25519.Ed25519PublicKey | None:
        """The key checkpoints are verified with (None if no key exists yet)."""
        with self._lock:
            if self._key is not None:
                return self._key.public_key
        return load_checkpoint_public_key(self.key_path)

    def __repr__(self) -> str:
        return f"Checkpointing(key_path={str(self.key_path)!r}, interval={self.interval})"


class AuditLog:
    """The audit log on one database engine; with ``checkpoints``, it signs a checkpoint in the
    transaction of every entry that makes one due, and :meth:`verify` checks the checkpoints too."""

    def __init__(self, engine: Engine, checkpoints: Checkpointing | None = None) -> None:
        self.engine = engine
        self.checkpoints = checkpoints

    def append(self, *, actor: str, action: str, target: str = "", details: Mapping[str, Any] | None = None,
               now: int) -> AuditRecord:
        """Append one entry in a write transaction of its own (and a checkpoint if one is due)."""
        try:
            with write_connection(self.engine) as conn, conn.begin():
                record = append_in(conn, actor=actor, action=action, target=target, details=details, now=now)
                if self.checkpoints is not None:
                    self._checkpoint_in(conn, ChainHead(record.seq, record.hash), now=now, force=False)
                return record
        except SQLAlchemyError as exc:
            raise storage_error(exc, "writing the audit log") from None

    # ---------------------------------------------------------------------------------------------
    # checkpoints
    # ---------------------------------------------------------------------------------------------
    def checkpoint(self, *, now: int) -> Checkpoint:
        """Sign a checkpoint of the current head now (``fleet-server audit checkpoint``). Raises
        :class:`VerificationError` if the log is empty or the entries since the newest checkpoint
        do not verify (a broken chain is never signed)."""
        if self.checkpoints is None:
            raise VerificationError("no checkpoint key is configured")
        try:
            with write_connection(self.engine) as conn, conn.begin():
                head = self._locked_head(conn)
                if head is None or head.seq == 0:
                    raise VerificationError("the audit log is empty: there is nothing to checkpoint")
                written = self._checkpoint_in(conn, head, now=now, force=True)
                assert written is not None
                return written
        except SQLAlchemyError as exc:
            raise storage_error(exc, "writing an audit checkpoint") from None

    def checkpoint_if_due(self, *, now: int) -> Checkpoint | None:
        """Sign a checkpoint of the head if ``interval`` entries follow the newest one (for writers
        that appended without a key, e.g. a CLI command: run when it ends)."""
        if self.checkpoints is None:
            return None
        try:
            with self.engine.connect() as conn:  # cheap test first: no write lock unless due
                row = conn.execute(select(_HEAD.c.seq).where(_HEAD.c.id == HEAD_ID)).first()
                latest = audit_checkpoints.latest_checkpoint(conn)
            if row is None or int(row.seq) - (latest.seq if latest else 0) < self.checkpoints.interval:
                return None
            with write_connection(self.engine) as conn, conn.begin():
                head = self._locked_head(conn)
                return None if head is None else self._checkpoint_in(conn, head, now=now, force=False)
        except SQLAlchemyError as exc:
            raise storage_error(exc, "writing an audit checkpoint") from None

    @staticmethod
    def _locked_head(conn: Connection) -> ChainHead | None:
        row = conn.execute(select(_HEAD.c.seq, _HEAD.c.hash).where(_HEAD.c.id == HEAD_ID)
                           .with_for_update()).first()
        return None if row is None else ChainHead(int(row.seq), row.hash)

    def _checkpoint_in(self, conn: Connection, head: ChainHead, *, now: int,
                       force: bool) -> Checkpoint | None:
        """Sign ``head`` in the caller's write transaction (the head row is locked) if due or
        ``force``. The entries since the newest checkpoint are checked first: a chain that does not
        link to the last signed head is not signed (forced: raises; automatic: logged, skipped)."""
        assert self.checkpoints is not None
        latest = audit_checkpoints.latest_checkpoint(conn)
        since = latest.seq if latest is not None else 0
        if head.seq <= since or (not force and head.seq - since < self.checkpoints.interval):
            return None
        key = self.checkpoints.signing_key()
        problem = None if latest is None else signature_problem(latest, key.public_key)
        if problem is None:
            report = verify_chain(self._walk(conn, 2000, after=since), head, start_seq=since + 1,
                                  start_hash=latest.head_hash if latest is not None else GENESIS_HASH)
            problem = None if report.ok else report.summary()
        if problem is not None:
            if force:
                raise VerificationError(f"refusing to sign a checkpoint: {problem}")
            log.warning("audit checkpoint not signed: %s", problem)
            return None
        return audit_checkpoints.insert_checkpoint(
            conn, sign_checkpoint(key, seq=head.seq, head_hash=head.hash, at=now))

    def checkpoint_status(self) -> CheckpointReport:
        """The checkpoints checked against their key and the entries they sign (no walk of the whole
        chain: that is :meth:`verify`). For the console's audit page."""
        try:
            with self.engine.connect() as conn:
                if conn.dialect.name == "postgresql":
                    conn = conn.execution_options(isolation_level="REPEATABLE READ")
                with conn.begin():
                    row = conn.execute(select(_HEAD.c.seq).where(_HEAD.c.id == HEAD_ID)).first()
                    found = audit_checkpoints.all_checkpoints(conn)
                    hashes = audit_checkpoints.entry_hashes(conn, (cp.seq for cp in found))
        except SQLAlchemyError as exc:
            raise storage_error(exc, "reading the audit checkpoints") from None
        return self._check(found, hashes, last_seq=int(row.seq) if row is not None else 0)

    def _check(self, found: list[Checkpoint], hashes: Mapping[int, str], *,
               last_seq: int) -> CheckpointReport:
        public = self.checkpoints.public_key() if self.checkpoints is not None else None
        interval = self.checkpoints.interval if self.checkpoints is not None else 1 << 62
        return verify_checkpoints(found, hashes, last_seq=last_seq, public_key=public, interval=interval)

    def head(self) -> ChainHead | None:
        try:
            with self.engine.connect() as conn:
                row = conn.execute(select(_HEAD.c.seq, _HEAD.c.hash).where(_HEAD.c.id == HEAD_ID)).first()
        except SQLAlchemyError as exc:
            raise storage_error(exc, "reading the audit log") from None
        return None if row is None else ChainHead(int(row.seq), row.hash)

    def entries(self, *, before_seq: int | None = None, limit: int = 50, actor: str | None = None,
                action: str | None = None, target: str | None = None) -> list[AuditRecord]:
        """Newest first, at most ``limit``, older than ``before_seq`` if given (keyset pagination)."""
        stmt = select(*_COLUMNS).order_by(e.seq.desc()).limit(limit)
        if before_seq is not None:
            stmt = stmt.where(e.seq < before_seq)
        if actor:
            stmt = stmt.where(e.actor == actor)
        if action:
            stmt = stmt.where(e.action == action)
        if target:
            stmt = stmt.where(e.target == target)
        try:
            with self.engine.connect() as conn:
                return [_record(r) for r in conn.execute(stmt)]
        except SQLAlchemyError as exc:
            raise storage_error(exc, "reading the audit log") from None

    def actions(self) -> list[str]:
        """The distinct actions recorded (for a filter)."""
        try:
            with self.engine.connect() as conn:
                return [r[0] for r in conn.execute(select(e.action).distinct().order_by(e.action))]
        except SQLAlchemyError as exc:
            raise storage_error(exc, "reading the audit log") from None

    def verify(self, *, chunk: int = 2000) -> ChainReport:
        """Verify the whole chain against the head, and every signed checkpoint against its key and the
        chain's hash at its seq, in one read snapshot."""
        try:
            with self.engine.connect() as conn:
                if conn.dialect.name == "postgresql":
                    conn = conn.execution_options(isolation_level="REPEATABLE READ")
                with conn.begin():
                    row = conn.execute(select(_HEAD.c.seq, _HEAD.c.hash)
                                       .where(_HEAD.c.id == HEAD_ID)).first()
                    head = None if row is None else ChainHead(int(row.seq), row.hash)
                    found = audit_checkpoints.all_checkpoints(conn)
                    wanted = {cp.seq for cp in found}
                    hashes: dict[int, str] = {}

                    def walk() -> Iterator[AuditRecord]:
                        for r in self._walk(conn, chunk):
                            if r.seq in wanted:
                                hashes[r.seq] = r.hash
                            yield r

                    report = verify_chain(walk(), head)
                    if not report.ok:  # the walk stopped at the first break: look the rest up
                        hashes.update(audit_checkpoints.entry_hashes(conn, wanted - hashes.keys()))
        except SQLAlchemyError as exc:
            raise storage_error(exc, "verifying the audit log") from None
        last_seq = max(report.last_seq, head.seq if head is not None else 0)
        checked = self._check(found, hashes, last_seq=last_seq)
        return dataclasses.replace(report, ok=report.ok and checked.ok, checkpoints=checked)

    @staticmethod
    def _walk(conn: Connection, chunk: int, *, after: int | None = None) -> Iterator[AuditRecord]:
        last: int | None = after
        while True:
            stmt = select(*_COLUMNS).order_by(e.seq).limit(chunk)
            if last is not None:
                stmt = stmt.where(e.seq > last)
            rows = conn.execute(stmt).all()
            if not rows:
                return
            for row in rows:
                yield _record(row)
            last = int(rows[-1].seq)


def cli_actor() -> str:
    """``cli:<login name>`` for entries written by ``fleet-server`` commands."""
    try:
        name = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        name = "unknown"
    return f"cli:{name}"[:MAX_ACTOR]


def record_cli(engine: Engine, action: str, target: str = "", details: Mapping[str, Any] | None = None, *,
               now: int, checkpoints: Checkpointing | None = None) -> AuditRecord:
    """Append an entry for an administrative CLI command (the actor is the operating-system user);
    with ``checkpoints``, a checkpoint is signed too if the entry makes one due (commands run through
    :func:`fleet_server.service.cliutil.repository` catch up when they end instead)."""
    return AuditLog(engine, checkpoints).append(actor=cli_actor(), action=action, target=target,
                                                details=details, now=now)
