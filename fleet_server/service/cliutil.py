"""Helpers shared by the server's administrative commands (``fleet_server/commands/*_cmd.py``).

The configuration is found with :func:`fleet_server.config.find_config` (``--config``, else
``$FLEET_SERVER_CONFIG``, else ``./server.toml``). Commands other than ``init``, ``run`` and
``db upgrade`` refuse a database whose schema is not the newest one instead of migrating it behind
the operator's back.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from fleet_server.config import ServerConfig, find_config, load_config
from fleet_server.console.audit import AuditLog, Checkpointing
from fleet_server.migrations import current_revision, head_revision
from fleet_server.storage.db import create_engine, describe_url
from fleet_server.storage.repo import Repository
from protocol.errors import StorageError


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE",
                        help="server configuration (default: $FLEET_SERVER_CONFIG, else ./server.toml)")


def load(args: argparse.Namespace) -> ServerConfig:
    """The configuration chosen by ``--config`` / ``$FLEET_SERVER_CONFIG`` / ``./server.toml``."""
    return load_config(find_config(getattr(args, "config", None)))


@contextmanager
def repository(config: ServerConfig, *, require_current: bool = True,
               checkpoint: bool = True) -> Iterator[Repository]:
    """A repository on the configured database (disposed at the end). When the command succeeds, an
    audit checkpoint is signed if one is due (its audit entries, written with :func:`record_cli`,
    may have made one due); ``checkpoint=False`` for commands that must write nothing."""
    engine = create_engine(config.database_url)
    try:
        if require_current:
            current = current_revision(engine)
            head = head_revision()
            if current != head:
                raise StorageError(f"the database {describe_url(config.database_url)} is at schema revision "
                                   f"{current or 'none'}, not {head}: run `fleet-server db upgrade`")
        yield Repository(engine)
        if require_current and checkpoint:
            AuditLog(engine, Checkpointing.from_settings(config.audit)).checkpoint_if_due(now=now_ms())
    finally:
        engine.dispose()


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def iso(ms: int | None) -> str:
    """``2026-01-02T03:04:05Z`` for a time in ms, ``-`` for None."""
    if ms is None:
        return "-"
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def emit(lines: Sequence[str]) -> int:
    sys.stdout.write("".join(f"{line}\n" for line in lines))
    sys.stdout.flush()
    return 0


def emit_json(value: Any) -> int:
    sys.stdout.write(json.dumps(value, indent=1, sort_keys=True) + "\n")
    sys.stdout.flush()
    return 0


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A plain text table."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return out
