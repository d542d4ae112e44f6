"""Small shared pieces of the server's services: clock, outgoing messages, counters, structured logs.

* :class:`Clock` - the time source (``now_ms``); tests pass a :class:`ManualClock`.
* :class:`Outgoing` - a signed message to publish after the transaction that caused it commits.
* :class:`Counters` - thread-safe in-memory counters; :meth:`Counters.take_deltas` hands what
  accumulated since the last flush to the database (table ``counter``, summed over workers).
* :func:`log_event` - one structured ``key=value`` line per event. Values are made single-line and
  bounded; ``bytes`` are logged as their length and fields whose name suggests a secret are
  redacted, so that no key, secret or proof can reach a log line by accident.
"""

from __future__ import annotations

import collections
import logging
import re
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

_REDACTED = "<redacted>"
_SECRET_NAMES = re.compile(r"(secret|proof|private|password|passphrase|token|(^|_)key$|key_pem)")
_PLAIN = re.compile(r"[A-Za-z0-9_.:/@+,%-]+")
_MAX_VALUE = 512


class Clock(Protocol):
    """Time source of the services: integer milliseconds since the Unix epoch."""

    def now_ms(self) -> int:
        """The current time in ms."""
        ...


class SystemClock:
    """The real clock."""

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000


class ManualClock:
    """A clock that moves only when told to (tests, simulations)."""

    def __init__(self, start_ms: int = 1_790_000_000_000) -> None:
        self._now = int(start_ms)
        self._lock = threading.Lock()

    def now_ms(self) -> int:
        with self._lock:
            return self._now

    def advance(self, ms: int) -> int:
        """Move forward by ``ms`` (>= 0); returns the new time."""
        if ms < 0:
            raise ValueError("a clock does not go backwards")
        with self._lock:
            self._now += int(ms)
            return self._now

    def set(self, now_ms: int) -> None:
        with self._lock:
            self._now = int(now_ms)


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message to publish: topic and payload (already signed)."""

    topic: str
    payload: bytes
    kind: str = ""
    """What it is (``challenge``, ``attestation.result``...), for counters and logs."""


class Counters:
    """Named monotonic counters of one worker (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._totals: collections.Counter[str] = collections.Counter()
        self._pending: collections.Counter[str] = collections.Counter()

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._totals[name] += n
            self._pending[name] += n

    def get(self, name: str) -> int:
        with self._lock:
            return self._totals[name]

    def snapshot(self) -> dict[str, int]:
        """Totals since this process started."""
        with self._lock:
            return dict(self._totals)

    def take_deltas(self) -> dict[str, int]:
        """What was added since the previous call (to be added to the database)."""
        with self._lock:
            out = dict(self._pending)
            self._pending.clear()
            return out

    def restore_deltas(self, deltas: Mapping[str, int]) -> None:
        """Put back deltas whose flush failed, so they are flushed next time."""
        with self._lock:
            self._pending.update(deltas)


# --------------------------------------------------------------------------------------------------
# structured logs
# --------------------------------------------------------------------------------------------------
def _clean(name: str, value: object) -> object:
    if _SECRET_NAMES.search(name):
        return _REDACTED
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes>"
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, list | tuple | set | frozenset):
        return "; ".join(str(_clean(name + "_item", v)) for v in value)[:_MAX_VALUE]
    return " ".join(str(value).split())[:_MAX_VALUE]


def _kv(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    if text and _PLAIN.fullmatch(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def format_event(event: str, fields: Mapping[str, object]) -> str:
    """``event=<event> k=v ...`` with values cleaned (see the module docstring)."""
    parts = [f"event={_kv(event)}"]
    parts += [f"{k}={_kv(_clean(k, v))}" for k, v in fields.items()]
    return " ".join(parts)


def log_event(logger: logging.Logger, level: int, event: str, **fields: object) -> None:
    """Log one structured line (cheap when the level is disabled)."""
    if logger.isEnabledFor(level):
        logger.log(level, "%s", format_event(event, fields))


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = (f"ts={ts}.{int(record.msecs):03d}Z level={record.levelname.lower()} "
                f"logger={record.name} pid={record.process} ")
        message = record.getMessage()
        line += message if message.startswith("event=") else format_event("log", {"msg": message})
        if record.exc_info:
            # Tracebacks only reach the file handler (see configure_logging); kept multi-line there.
            line += "\n" + self.formatException(record.exc_info)
        return line


class _ConsoleFormatter(_Formatter):
    """One line per record: the traceback of an unexpected error goes only to the log file."""

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text
        record.exc_info, record.exc_text = None, None
        try:
            return super().format(record)
        finally:
            record.exc_info, record.exc_text = saved


LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure_logging(level: str, log_file: Path | None, *, console: bool = True) -> None:
    """Structured lines to stderr (no tracebacks) and, if given, to ``log_file`` (with tracebacks)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(LEVELS.get(level, logging.INFO))
    if console:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(_ConsoleFormatter())
        root.addHandler(stream)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file, encoding="utf-8")
        file_handler.setFormatter(_Formatter())
        root.addHandler(file_handler)
