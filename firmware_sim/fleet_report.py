"""Measurements of a fleet harness run: CPU time per process role from ``/proc``, the server
database's attestation rows, and the JSON report built from them.

Report (``firmware-sim fleet --report FILE``; the first five keys are a fixed contract)::

    {
      "devices": [{"id", "profile", "state", "attestations", "reasons"}, ...],
      "attestations_total": int,          # attestations stored in the run window
      "attestations_per_s": float,
      "latency_ms": {"p50": float, "p99": float},   # challenge issued -> result stored
      ... extra keys (see :func:`build_report`)
    }

Everything here is pure except :func:`read_cpu` and :func:`read_window` (``/proc`` and the
database); numbers are computed from what the server stored, never from the agents' view.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, text

from protocol.errors import StorageError

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

#: Roles whose CPU time is reported (``cpu_ms_per_attestation``).
ROLES = ("server", "broker", "agents", "swtpm", "harness")


# --------------------------------------------------------------------------------------------------
# /proc
# --------------------------------------------------------------------------------------------------
def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            raw = f.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may contain spaces: split after it.
    head, _, rest = raw.rpartition(")")
    return [head.partition("(")[2], *rest.split()]


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of one process (all its threads), in seconds; 0 if it is gone."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    # fields[0] is comm; then state(1) ppid(2) ... utime(12) stime(13) in this 0-based layout.
    return (int(fields[12]) + int(fields[13])) / _CLK_TCK


def process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command name) of every process visible in ``/proc``."""
    table: dict[int, tuple[int, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is not None:
            table[int(entry)] = (int(fields[2]), fields[0])
    return table


def descendants(root: int, table: Mapping[int, tuple[int, str]]) -> set[int]:
    """``root`` and every process below it."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        found.add(pid)
        todo.extend(children.get(pid, ()))
    return found


@dataclass(frozen=True, slots=True)
class CpuSample:
    """CPU seconds per role at one moment."""

    seconds: Mapping[str, float]

    def minus(self, earlier: CpuSample) -> dict[str, float]:
        return {role: max(0.0, self.seconds.get(role, 0.0) - earlier.seconds.get(role, 0.0))
                for role in ROLES}


def read_cpu(*, server: int | None, broker: int | None, agents: Iterable[int]) -> CpuSample:
    """CPU seconds of the server process tree, the broker, the agent hosts, every ``swtpm`` process
    below this one, and this process itself (the harness)."""
    table = process_table()
    me = os.getpid()
    seconds = dict.fromkeys(ROLES, 0.0)
    if server is not None:
        seconds["server"] = sum(process_cpu_seconds(p) for p in descendants(server, table))
    if broker is not None:
        seconds["broker"] = process_cpu_seconds(broker)
    seconds["agents"] = sum(process_cpu_seconds(p) for p in agents)
    seconds["swtpm"] = sum(process_cpu_seconds(p) for p in descendants(me, table)
                           if table.get(p, (0, ""))[1] == "swtpm")
    seconds["harness"] = process_cpu_seconds(me)
    return CpuSample(seconds)


# --------------------------------------------------------------------------------------------------
# the database
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class DeviceRow:
    id: str
    state: str
    reasons: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Window:
    """Attestations stored in ``[start_ms, end_ms)``: per device counts and latencies."""

    start_ms: int
    end_ms: int
    counts: Mapping[str, int]
    latencies_ms: Sequence[int]
    verdicts: Mapping[str, int]

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def seconds(self) -> float:
        return max(0.001, (self.end_ms - self.start_ms) / 1000)


def _reasons(raw: str | None) -> tuple[str, ...]:
    try:
        value = json.loads(raw or "[]")
    except ValueError:
        return (str(raw),)
    return tuple(str(r) for r in value) if isinstance(value, list) else (str(value),)


def read_devices(engine: Engine) -> dict[str, DeviceRow]:
    """Every device's state and state reasons."""
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT id, state, state_reasons FROM device")).all()
    except Exception as exc:
        raise StorageError(f"cannot read devices from the server database: {exc}") from None
    return {r[0]: DeviceRow(r[0], r[1], _reasons(r[2])) for r in rows}


def attestation_counts(engine: Engine) -> dict[str, int]:
    """device id -> attestations stored so far (all time)."""
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT device_id, COUNT(*) FROM attestation GROUP BY device_id")).all()
    except Exception as exc:
        raise StorageError(f"cannot count attestations: {exc}") from None
    return {r[0]: int(r[1]) for r in rows}


def read_load_failures(engine: Engine, name: str, version: str) -> dict[str, str]:
    """device id -> onnxruntime's reason, for the devices that reported they could not load ``name``
    ``version`` (``model-status``; empty before the server has such a table)."""
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT s.device_id, s.error FROM modelloadstatus s JOIN model m "
                                     "ON m.id = s.model_id WHERE m.name = :n AND s.version = :v "
                                     "AND s.state = 'failed'"), {"n": name, "v": version}).all()
    except Exception as exc:
        raise StorageError(f"cannot read model load failures: {exc}") from None
    return {r[0]: str(r[1]) for r in rows}


def read_window(engine: Engine, start_ms: int, end_ms: int) -> Window:
    """The attestations stored in ``[start_ms, end_ms)``."""
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT device_id, stored_at - issued_at, verdict FROM attestation "
                                     "WHERE stored_at >= :a AND stored_at < :b"),
                                {"a": start_ms, "b": end_ms}).all()
    except Exception as exc:
        raise StorageError(f"cannot read attestations: {exc}") from None
    counts: dict[str, int] = {}
    verdicts: dict[str, int] = {}
    latencies: list[int] = []
    for device_id, latency, verdict in rows:
        counts[device_id] = counts.get(device_id, 0) + 1
        verdicts[verdict] = verdicts.get(verdict, 0) + 1
        latencies.append(int(latency))
    return Window(start_ms, end_ms, counts, latencies, verdicts)


# --------------------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between ranks; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (rank - low))


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """A device of the run as the harness made it."""

    id: str
    profile: str


def build_report(*, devices: Sequence[DeviceInfo], rows: Mapping[str, DeviceRow], window: Window,
                 cpu: Mapping[str, float], mqtt_messages: int | None, extra: Mapping[str, Any],
                 per_device: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """The report dict (see the module docstring).

    Extra keys: ``duration_s`` (the measured window), ``verdicts`` (count per verdict),
    ``server_cpu_ms_per_attestation``, ``cpu_ms_per_attestation`` (per role: server, broker,
    agents, swtpm, harness), ``cpu_cores`` (average cores busy per role during the window),
    ``mqtt_msgs_per_s`` (messages between agents and server through the broker) and whatever
    ``extra`` holds (the run's settings).  ``per_device`` adds keys to a device's entry (``model``
    with a protected model: ``{"unlocked", "served", "refused", "refusals"}``).
    """
    total = window.total
    secs = window.seconds
    per = (lambda seconds: round(seconds * 1000 / total, 3)) if total else (lambda seconds: 0.0)
    report: dict[str, Any] = {
        "devices": [{"id": d.id, "profile": d.profile,
                     "state": rows[d.id].state if d.id in rows else "unknown",
                     "attestations": int(window.counts.get(d.id, 0)),
                     "reasons": list(rows[d.id].reasons) if d.id in rows else [],
                     **(per_device or {}).get(d.id, {})}
                    for d in devices],
        "attestations_total": total,
        "attestations_per_s": round(total / secs, 2),
        "latency_ms": {"p50": round(percentile(window.latencies_ms, 50), 1),
                       "p99": round(percentile(window.latencies_ms, 99), 1)},
        "duration_s": round(secs, 3),
        "verdicts": dict(sorted(window.verdicts.items())),
        "server_cpu_ms_per_attestation": per(cpu.get("server", 0.0)),
        "cpu_ms_per_attestation": {role: per(cpu.get(role, 0.0)) for role in ROLES},
        "cpu_cores": {role: round(cpu.get(role, 0.0) / secs, 3) for role in ROLES},
    }
    if mqtt_messages is not None:
        report["mqtt_msgs_per_s"] = round(mqtt_messages / secs, 1)
    report.update(extra)
    return report


def write_report(path: Path, report: Mapping[str, Any]) -> None:
    """Write ``report`` as indented JSON, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


__all__ = ["ROLES", "CpuSample", "DeviceInfo", "DeviceRow", "Window", "attestation_counts", "build_report",
           "descendants", "percentile", "process_cpu_seconds", "process_table", "read_cpu", "read_devices",
           "read_window", "write_report"]
