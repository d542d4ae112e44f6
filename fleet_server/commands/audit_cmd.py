"""``fleet-server audit ...``: the tamper-evident audit log.

* ``audit verify [--json]`` - walk the hash chain and check every signed checkpoint; exit 0 if intact
  (and name the last good checkpoint), 1 otherwise with the first broken link (the first altered,
  missing or re-ordered entry) and one line per failing checkpoint (another key, a bad signature,
  a head hash the rewritten chain no longer has)
* ``audit checkpoint [--json]`` - sign a checkpoint of the chain head now (audited)
* ``audit list [--limit N] [--actor A] [--action X] [--json]`` - newest entries first
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from fleet_server.console.audit import AuditLog, Checkpointing, record_cli
from fleet_server.console.checkpoint import Checkpoint
from fleet_server.service.cliutil import (
    add_config_argument,
    emit,
    emit_json,
    iso,
    load,
    now_ms,
    repository,
    table,
)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("audit", help="the audit log",
                                   description="Verify and read the audit log.")
    sub = parser.add_subparsers(dest="audit_command", metavar="SUBCOMMAND", required=True)

    verify = sub.add_parser("verify", help="verify the hash chain (exit 1 at the first broken link)")
    verify.add_argument("--json", action="store_true")
    add_config_argument(verify)
    verify.set_defaults(handler=_verify)

    checkpoint = sub.add_parser("checkpoint", help="sign a checkpoint of the audit chain head now")
    checkpoint.add_argument("--json", action="store_true")
    add_config_argument(checkpoint)
    checkpoint.set_defaults(handler=_checkpoint)

    ls = sub.add_parser("list", help="newest entries first")
    ls.add_argument("--limit", type=int, default=50, metavar="N")
    ls.add_argument("--actor")
    ls.add_argument("--action")
    ls.add_argument("--json", action="store_true")
    add_config_argument(ls)
    ls.set_defaults(handler=_list)


def _checkpoint_json(cp: Checkpoint | None) -> dict[str, Any] | None:
    return None if cp is None else {"id": cp.id, "seq": cp.seq, "head_hash": cp.head_hash, "at": cp.at,
                                    "kid": cp.kid}


def _verify(args: argparse.Namespace) -> int:
    config = load(args)
    with repository(config, checkpoint=False) as repo:
        report = AuditLog(repo.engine, Checkpointing.from_settings(config.audit)).verify()
    checked = report.checkpoints
    if args.json:
        emit_json({"ok": report.ok, "entries": report.entries, "last_seq": report.last_seq,
                   "first_bad_seq": report.first_bad_seq, "reason": report.reason,
                   "checkpoints": checked.checked if checked else 0,
                   "last_good_checkpoint": _checkpoint_json(checked.last_good if checked else None),
                   "checkpoint_problems": list(checked.problems) if checked else []})
    elif report.ok:
        emit(report.lines())
    else:
        for line in report.lines():
            print(f"fleet-server: {line}", file=sys.stderr)
    return 0 if report.ok else 1


def _checkpoint(args: argparse.Namespace) -> int:
    config = load(args)
    with repository(config) as repo:
        cp = AuditLog(repo.engine, Checkpointing.from_settings(config.audit)).checkpoint(now=now_ms())
        record_cli(repo.engine, "audit.checkpoint", "audit",
                   {"checkpoint": cp.id, "seq": cp.seq, "kid": cp.kid}, now=now_ms())
    if args.json:
        return emit_json(_checkpoint_json(cp))
    return emit([f"signed {cp.describe()}"])


def _list(args: argparse.Namespace) -> int:
    config = load(args)
    with repository(config) as repo:
        entries = AuditLog(repo.engine).entries(limit=max(1, min(args.limit, 10_000)), actor=args.actor,
                                                action=args.action)
    if args.json:
        return emit_json([{"seq": e.seq, "at": e.at, "actor": e.actor, "action": e.action, "target": e.target,
                           "details": e.details_dict(), "prev_hash": e.prev_hash, "hash": e.hash}
                          for e in entries])
    if not entries:
        return emit(["the audit log is empty"])
    return emit(table(["SEQ", "TIME", "ACTOR", "ACTION", "TARGET", "DETAILS"],
                      [[str(e.seq), iso(e.at), e.actor, e.action, e.target, e.details[:80]]
                       for e in entries]))
