"""Usage telemetry for the fleet server, and the local audit log.

**Usage** (:class:`UsageTracker`): the guard reports every request as an
:class:`~agent.inference.guard.AuditRecord`; the tracker counts, per model and per client, samples
served and requests refused since the last report. Every ``[models] telemetry_interval`` seconds the
vault sends one :class:`~protocol.messages.Telemetry` per model with activity, with the extraction
monitor's statistic (Shapiro-Wilk ``W`` of the client's query distances) and alarm per client
(:func:`build_telemetry`).

**Audit log** (:class:`AuditLog`): every record is appended to ``<state_dir>/audit.jsonl`` (0600),
one JSON object per line - time, client, model, outcome, rows, input shapes, latency, reason; never
input or output data. The request path only appends to a bounded in-memory queue; the vault's
thread writes the queue out. When the file would exceed ``audit_max_bytes`` it is rotated
(``audit.jsonl.1`` ... ``.N``, the oldest deleted), so the log's size is bounded by
``(audit_keep + 1) * audit_max_bytes``.

Each line carries ``prev``, the running SHA-256 hash chain head before it (``head' = SHA-256(head ||
line)``), and the vault stores the head in its TPM-signed state file at every save. A line edited,
inserted or removed before the last save therefore breaks the chain against a head that cannot be
forged off the device (:func:`verify_chain`); what was written after the last save is only
chained, not signed.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agent.inference.guard import AuditRecord
from protocol.errors import StorageError
from protocol.messages import ClientUsage, Telemetry

__all__ = ["AuditLog", "Usage", "UsageTracker", "build_telemetry", "verify_chain"]

MAX_PENDING = 100_000
MAX_TELEMETRY_CLIENTS = 256
GENESIS = bytes(32)
MAX_PERIOD_SECONDS = 6 * 86_400


# --------------------------------------------------------------------------------------------------
# usage
# --------------------------------------------------------------------------------------------------
@dataclass(slots=True)
class Usage:
    """One model's usage over ``[since, now)``: samples served, requests refused, per client."""

    since: float
    served: int = 0
    refused: int = 0
    clients: dict[str, list[int]] = field(default_factory=dict)  # client -> [served, refused]


class UsageTracker:
    """Counts audit records per model and client (thread-safe: the guard calls from request threads)."""

    def __init__(self, now: float) -> None:
        self._lock = threading.Lock()
        self._start = now
        self._usage: dict[str, Usage] = {}
        self._charged = 0  # requests that counted against a quota since the last counter save

    def observe(self, record: AuditRecord) -> None:
        """Count one request (served: its rows; refused: one request)."""
        with self._lock:
            usage = self._usage.get(record.model)
            if usage is None:
                usage = self._usage[record.model] = Usage(since=self._start)
            served = record.rows if record.outcome == "ok" else 0
            refused = 0 if record.outcome == "ok" else 1
            usage.served += served
            usage.refused += refused
            if record.client_id is not None:
                entry = usage.clients.setdefault(record.client_id, [0, 0])
                entry[0] += served
                entry[1] += refused
            if record.rows > 0:  # rows are known only after validation; quota was charged then
                self._charged += 1

    def take(self, model: str, now: float) -> Usage:
        """The usage of ``model`` since the last take, and start a new period."""
        with self._lock:
            usage = self._usage.pop(model, None) or Usage(since=self._start)
            self._usage[model] = Usage(since=now)
            return usage

    def active(self) -> list[str]:
        """Models with requests since their last take."""
        with self._lock:
            return sorted(m for m, u in self._usage.items() if u.served or u.refused)

    def charged(self, *, reset: bool = False) -> int:
        """Requests charged to a quota since the last reset."""
        with self._lock:
            n = self._charged
            if reset:
                self._charged = 0
            return n


def build_telemetry(name: str, version: str, usage: Usage, now: float,
                    monitor: Mapping[str, Mapping[str, object]]) -> Telemetry:
    """The telemetry message of one model: ``usage`` plus the extraction monitor's per-client report
    (``InferenceGuard.extraction_report()``: client -> {"w", "alarm", ...})."""
    clients = sorted(set(usage.clients) | set(monitor))[:MAX_TELEMETRY_CLIENTS]
    items = []
    for cid in clients:
        served, refused = usage.clients.get(cid, [0, 0])
        report = monitor.get(cid, {})
        w = report.get("w")
        items.append(ClientUsage(client=cid[:64], served=served, refused=refused,
                                 statistic=float(w) if isinstance(w, int | float) else None,
                                 alarm=bool(report.get("alarm", False))))
    # The server accepts periods of at most 7 days: a longer one (idle, or offline that long) is
    # reported as the last 6 days, its counts included.
    since = max(usage.since, now - MAX_PERIOD_SECONDS)
    return Telemetry(name=name, version=version, since=int(min(since, now) * 1000), until=int(now * 1000),
                     served=usage.served, refused=usage.refused, clients=tuple(items))


# --------------------------------------------------------------------------------------------------
# the audit log
# --------------------------------------------------------------------------------------------------
def _record_json(record: AuditRecord) -> dict[str, object]:
    return {"time_ms": int(record.time * 1000), "client": record.client_id, "model": record.model,
            "outcome": record.outcome, "rows": record.rows,
            "shapes": {name: list(shape) for name, shape in record.input_shapes},
            "latency_us": int(record.latency_us), "reason": record.reason[:300]}


def _encode(obj: Mapping[str, object]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode() + b"\n"


def _chain(head: bytes, line: bytes) -> bytes:
    return hashlib.sha256(head + line).digest()


def _last_line(path: Path, max_tail: int = 64 * 1024) -> bytes | None:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_tail))
            tail = f.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror or exc}") from None
    lines = [ln for ln in tail.split(b"\n") if ln]
    return lines[-1] + b"\n" if lines else None


def _prev_of(line: bytes) -> bytes | None:
    try:
        obj = json.loads(line)
        text = obj.get("prev") if isinstance(obj, dict) else None
        prev = bytes.fromhex(text) if isinstance(text, str) else b""
    except (ValueError, KeyError):
        return None
    return prev if len(prev) == 32 else None


class AuditLog:
    """The append-only audit file with rotation and a hash chain (see the module docstring)."""

    def __init__(self, path: Path, *, max_bytes: int = 8 << 20, keep: int = 4) -> None:
        if max_bytes < 1024 or keep < 1:
            raise ValueError("max_bytes must be at least 1024 and keep at least 1")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.keep = keep
        self._pending: collections.deque[AuditRecord] = collections.deque()
        self._write_lock = threading.Lock()
        self.dropped = 0
        self.written = 0
        last = _last_line(self.path)
        prev = None if last is None else _prev_of(last)
        self._head = GENESIS if last is None or prev is None else _chain(prev, last)

    @property
    def head(self) -> bytes:
        """The hash chain head after the last line written."""
        return self._head

    def append(self, record: AuditRecord) -> None:
        """Queue one record (the guard's audit sink: no I/O, bounded)."""
        if len(self._pending) >= MAX_PENDING:
            self.dropped += 1
            return
        self._pending.append(record)

    def flush(self) -> int:
        """Write the queued records; returns how many."""
        with self._write_lock:
            lines = []
            head = self._head
            while self._pending:
                obj = _record_json(self._pending.popleft())
                obj["prev"] = head.hex()
                line = _encode(obj)
                head = _chain(head, line)
                lines.append(line)
            if not lines:
                return 0
            data = b"".join(lines)
            self._rotate_if_needed(len(data))
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    os.fchmod(fd, 0o600)
                    os.write(fd, data)
                finally:
                    os.close(fd)
            except OSError as exc:
                raise StorageError(f"cannot write {self.path}: {exc.strerror or exc}") from None
            self._head = head
            self.written += len(lines)
            return len(lines)

    def _rotate_if_needed(self, incoming: int) -> None:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return
        if size + incoming <= self.max_bytes:
            return
        with contextlib.suppress(FileNotFoundError):
            self.rotated(self.keep).unlink()
        for i in range(self.keep - 1, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                os.replace(self.rotated(i), self.rotated(i + 1))
        os.replace(self.path, self.rotated(1))

    def rotated(self, index: int) -> Path:
        """Path of the ``index``-th rotated file (1: the most recent)."""
        return self.path.with_name(f"{self.path.name}.{index}")

    def files(self) -> list[Path]:
        """The log's files, oldest first."""
        out = [self.rotated(i) for i in range(self.keep, 0, -1) if self.rotated(i).exists()]
        if self.path.exists():
            out.append(self.path)
        return out


def verify_chain(files: Sequence[Path], signed_head: bytes) -> str:
    """Check the audit log against the head stored in the signed vault state.

    ``"ok"``: the chain is intact and passes through ``signed_head``; ``"broken"``: a line was edited,
    inserted or removed (the chain breaks, or never reaches the signed head); ``"unknown"``: no signed
    head yet, or the part holding it was rotated away.
    """
    if not signed_head or signed_head == GENESIS:
        return "unknown"
    heads: list[bytes] = []
    head: bytes | None = None
    for path in files:
        try:
            data = path.read_bytes()
        except OSError:
            return "broken"
        for raw in data.split(b"\n"):
            if not raw:
                continue
            line = raw + b"\n"
            prev = _prev_of(line)
            if prev is None or (head is not None and prev != head):
                return "broken"
            if head is None:
                heads.append(prev)
            head = _chain(prev, line)
            heads.append(head)
    if signed_head in heads:
        return "ok"
    first = heads[0] if heads else None
    return "unknown" if first not in (None, GENESIS) else "broken"
