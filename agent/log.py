"""Structured one-line logs: ``ts=... level=... event=... key=value ...``.

The agent logs *events* (``connected``, ``challenge_answered``, ``result``...) with a few fields
through an :class:`EventLogger` bound to one device, so that many agents in one process (a test
harness, a fleet simulator) keep their lines apart without any global state.  Lines of other
libraries (``protocol.mqtt``, the TPM adapter) go through the same formatter as ``event=log`` with
their text in ``msg``.

Never secrets: the logger renders ``bytes`` values only as their length, and replaces fields whose
name says they hold a secret (``secret``, ``proof``, ``key``, ``nonce``...) with ``<redacted>``.
Nonces are not secret, but logs stay lean and a caller cannot leak a key by naming it badly.

:func:`configure_logging` installs the formatter on the root logger; only the CLI calls it, a library
user keeps its own logging setup.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Mapping
from typing import IO, Any

FORMATS = ("kv", "json")
_REDACTED = "<redacted>"
_SECRET_NAMES = re.compile(r"(secret|proof|private|password|passphrase|token|nonce|(^|_)key$)")
_PLAIN = re.compile(r"[A-Za-z0-9_.:/@+,%<>-]+")
_MAX_VALUE = 512
_LEVEL_NAMES = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
                "error": logging.ERROR}
_ATTR = "edge_fields"  # LogRecord attribute carrying an event's fields


def _clean(name: str, value: object) -> object:
    """The value as it may appear in a log line (secrets redacted, bytes as a length, text bounded)."""
    if _SECRET_NAMES.search(name):
        return _REDACTED
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes>"
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, list | tuple | set | frozenset):
        return ",".join(str(_clean(name + "_item", v)) for v in value)[:_MAX_VALUE]
    text = " ".join(str(value).split())  # one line: no newline can forge another log line
    return text[:_MAX_VALUE]


def _kv_value(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    if text and _PLAIN.fullmatch(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _timestamp(created: float) -> str:
    ms = int(created * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{ms:03d}Z"


def record_fields(record: logging.LogRecord) -> dict[str, object]:
    """The ordered fields of one log line: ts, level, event, then the event's own fields."""
    fields: dict[str, object] = {"ts": _timestamp(record.created), "level": record.levelname.lower()}
    extra = getattr(record, _ATTR, None)
    if isinstance(extra, Mapping):
        fields["event"] = record.msg
        for name, value in extra.items():
            fields[str(name)] = _clean(str(name), value)
    else:
        fields["event"] = "log"
        fields["logger"] = record.name
        fields["msg"] = _clean("msg", record.getMessage())
    if record.exc_info and record.exc_info[1] is not None:
        exc = record.exc_info[1]
        fields.setdefault("error", _clean("error", f"{type(exc).__name__}: {exc}"))
    return fields


class KeyValueFormatter(logging.Formatter):
    """``ts=2024-05-01T12:00:00.123Z level=info event=connected device=cam-1 reason=boot``."""

    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{k}={_kv_value(v)}" for k, v in record_fields(record).items())


class JsonFormatter(logging.Formatter):
    """One JSON object per line with the same fields as :class:`KeyValueFormatter`."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(record_fields(record), separators=(",", ":"), default=str)


class EventLogger:
    """Emits structured events on a stdlib logger, with fields bound once (e.g. ``device=...``)."""

    __slots__ = ("_bound", "_logger")

    def __init__(self, logger: logging.Logger, **bound: object) -> None:
        self._logger = logger
        self._bound = dict(bound)

    def bind(self, **fields: object) -> EventLogger:
        """A logger that adds ``fields`` to every event."""
        return EventLogger(self._logger, **{**self._bound, **fields})

    def enabled(self, level: int) -> bool:
        """True if an event at ``level`` would be emitted."""
        return self._logger.isEnabledFor(level)

    def event(self, level: int, event: str, **fields: Any) -> None:
        """Log ``event`` (a short snake_case name) with ``fields`` at ``level``."""
        if self._logger.isEnabledFor(level):
            self._logger.log(level, event, extra={_ATTR: {**self._bound, **fields}})

    def debug(self, event: str, **fields: Any) -> None:
        self.event(logging.DEBUG, event, **fields)

    def info(self, event: str, **fields: Any) -> None:
        self.event(logging.INFO, event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self.event(logging.WARNING, event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        self.event(logging.ERROR, event, **fields)


def level_number(name: str) -> int:
    """The ``logging`` level of a configured level name (``debug``, ``info``, ``warning``, ``error``)."""
    try:
        return _LEVEL_NAMES[name]
    except KeyError:
        raise ValueError(f"unknown log level {name!r}") from None


def configure_logging(level: str = "info", fmt: str = "kv", stream: IO[str] | None = None) -> logging.Handler:
    """Send all log records to ``stream`` (stderr) as structured lines; returns the handler installed.

    Replaces handlers a previous call installed, so calling it twice does not duplicate lines.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(KeyValueFormatter() if fmt == "kv" else JsonFormatter())
    handler.set_name("edge-agent")
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "edge-agent"]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level_number(level))
    return handler
