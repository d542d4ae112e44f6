"""``fleet-server db upgrade`` / ``db current``: schema migrations of the server's database (Alembic)."""

from __future__ import annotations

import argparse
from typing import Any

from fleet_server.console.audit import Checkpointing, record_cli
from fleet_server.migrations import current_revision, head_revision, upgrade
from fleet_server.service.cliutil import add_config_argument, emit, load, now_ms
from fleet_server.storage.db import create_engine, describe_url


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("db", help="database schema commands",
                                   description="Database schema migrations (Alembic).")
    sub = parser.add_subparsers(dest="db_command", metavar="SUBCOMMAND", required=True)
    up = sub.add_parser("upgrade", help="migrate the database to the newest schema")
    add_config_argument(up)
    up.set_defaults(handler=_upgrade)
    cur = sub.add_parser("current", help="print the database's schema revision")
    add_config_argument(cur)
    cur.set_defaults(handler=_current)


def _upgrade(args: argparse.Namespace) -> int:
    config = load(args)
    engine = create_engine(config.database_url)
    try:
        before, after = upgrade(engine)
        # With the key: the first upgrade to signed checkpoints checkpoints the existing chain at once.
        record_cli(engine, "db.upgrade", "database", {"from": before, "to": after}, now=now_ms(),
                   checkpoints=Checkpointing.from_settings(config.audit))
    finally:
        engine.dispose()
    where = describe_url(config.database_url)
    if before == after:
        return emit([f"{where}: schema is up to date ({after})"])
    return emit([f"{where}: schema upgraded {before or 'empty'} -> {after}"])


def _current(args: argparse.Namespace) -> int:
    config = load(args)
    engine = create_engine(config.database_url)
    try:
        current = current_revision(engine)
    finally:
        engine.dispose()
    head = head_revision()
    state = "up to date" if current == head else f"needs `fleet-server db upgrade` to {head}"
    return emit([f"{describe_url(config.database_url)}: schema {current or 'empty'} ({state})"])
