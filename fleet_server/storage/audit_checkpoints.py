"""SQL of the audit checkpoints (table ``auditcheckpoint``, :class:`~fleet_server.storage.console_tables.
AuditCheckpoint`): run inside the caller's connection, so that a checkpoint is written in the same
transaction as the audit entry it signs (:mod:`fleet_server.console.audit`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import Connection, Table, insert, select

from fleet_server.console.checkpoint import Checkpoint
from fleet_server.storage import models

_TABLES = models.SQLModel.metadata.tables
_CHECKPOINT: Table = _TABLES["auditcheckpoint"]
_ENTRY: Table = _TABLES["auditentry"]
c = _CHECKPOINT.c
_COLUMNS = (c.id, c.seq, c.head_hash, c.at, c.kid, c.signature)


def _checkpoint(row: Any) -> Checkpoint:
    return Checkpoint(seq=int(row.seq), head_hash=row.head_hash, at=int(row.at), kid=row.kid,
                      signature=row.signature, id=int(row.id))


def insert_checkpoint(conn: Connection, cp: Checkpoint) -> Checkpoint:
    """Store ``cp``; returns it with its row id."""
    result = conn.execute(insert(_CHECKPOINT).values(seq=cp.seq, head_hash=cp.head_hash, at=cp.at, kid=cp.kid,
                                                     signature=cp.signature).returning(c.id))
    return Checkpoint(cp.seq, cp.head_hash, cp.at, cp.kid, cp.signature, int(result.scalar_one()))


def latest_checkpoint(conn: Connection) -> Checkpoint | None:
    """The checkpoint of the highest ``seq`` (the newest of those)."""
    row = conn.execute(select(*_COLUMNS).order_by(c.seq.desc(), c.id.desc()).limit(1)).first()
    return None if row is None else _checkpoint(row)


def all_checkpoints(conn: Connection) -> list[Checkpoint]:
    """Every checkpoint, ascending ``seq``."""
    return [_checkpoint(r) for r in conn.execute(select(*_COLUMNS).order_by(c.seq, c.id))]


def entry_hashes(conn: Connection, seqs: Iterable[int]) -> dict[int, str]:
    """The stored hash of each entry of ``seqs`` that exists."""
    wanted = sorted(set(seqs))
    found: dict[int, str] = {}
    for i in range(0, len(wanted), 500):
        stmt = select(_ENTRY.c.seq, _ENTRY.c.hash).where(_ENTRY.c.seq.in_(wanted[i:i + 500]))
        found.update((int(r.seq), r.hash) for r in conn.execute(stmt))
    return found
