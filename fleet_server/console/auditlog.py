"""The audit log page: entries newest first (keyset pages by ``seq``), filters by actor and action,
the last good signed checkpoint (or a warning when there is none or one fails), and a button that
verifies the whole hash chain and every checkpoint and names the first broken link
(:mod:`fleet_server.console.audit`; the same check as ``fleet-server audit verify``).
"""

from __future__ import annotations

from flask import Blueprint, render_template, request

from fleet_server.console.audit import ChainReport
from fleet_server.console.auth import current_principal
from fleet_server.console.rbac import Right, require
from fleet_server.console.services import services

bp = Blueprint("auditlog", __name__)

PAGE = 50


def _page(report: ChainReport | None = None) -> str:
    svc = services()
    args = request.args if request.method == "GET" else request.form
    actor = args.get("actor", "").strip()[:96]
    action = args.get("action", "").strip()[:64]
    try:
        before = int(args.get("before", "")) if args.get("before") else None
    except ValueError:
        before = None
    entries = svc.audit.entries(before_seq=before, limit=PAGE + 1, actor=actor or None, action=action or None)
    more = len(entries) > PAGE
    entries = entries[:PAGE]
    checkpoints = (report.checkpoints if report is not None and report.checkpoints is not None
                   else svc.audit.checkpoint_status())
    return render_template("auditlog.html", entries=entries, more=more, actor=actor, action=action,
                           actions=svc.audit.actions(), head=svc.audit.head(), report=report, before=before,
                           checkpoints=checkpoints, interval=svc.config.audit.checkpoint_interval)


@bp.get("/")
@require(Right.VIEW_AUDIT)
def index() -> str:
    return _page()


@bp.post("/verify")
@require(Right.VIEW_AUDIT)
def verify() -> str:
    svc = services()
    principal = current_principal()
    assert principal is not None
    report = svc.audit.verify()
    # Recorded after the walk: the report is about the chain as it was before this entry.
    svc.record(principal, "audit.verify", "audit", {"ok": report.ok, "entries": report.entries,
                                                    "first_bad_seq": report.first_bad_seq})
    return _page(report)
