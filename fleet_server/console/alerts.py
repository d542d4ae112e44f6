"""Alerts: the list (by status, kind, device) and the two steps an operator takes: acknowledge
(someone is on it) and resolve (done). Each step is written to the audit log.

Alerts are raised by rules on events (:mod:`fleet_server.storage.alerting`): attestation failures
and unreachable devices on state changes, and the model-protection rules of that area.
"""

from __future__ import annotations

from flask import Blueprint, abort, redirect, render_template, request, url_for
from werkzeug.wrappers import Response as BaseResponse

from fleet_server.console.auth import current_principal
from fleet_server.console.rbac import Right, require
from fleet_server.console.services import services
from fleet_server.storage import alerting
from fleet_server.storage.models import AlertStatus

bp = Blueprint("alerts", __name__)

PAGE = 50
STATUSES = ("active", AlertStatus.OPEN.value, AlertStatus.ACKNOWLEDGED.value, AlertStatus.RESOLVED.value,
            "all")


@bp.get("/")
@require(Right.VIEW_FLEET)
def index() -> str:
    svc = services()
    status = request.args.get("status", "active")
    if status not in STATUSES:  # also guards the value echoed into forms
        status = "active"
    kind = request.args.get("kind", "")[:48]
    device = request.args.get("device", "")[:63]
    try:
        page = max(1, int(request.args.get("page", "1")))
    except ValueError:
        page = 1
    rows, total = svc.queries.alerts(status="" if status == "all" else status, kind=kind, device_id=device,
                                     limit=PAGE, offset=(page - 1) * PAGE)
    return render_template("alerts.html", rows=rows, total=total, status=status, kind=kind, device=device,
                           page=page, pages=max(1, -(-total // PAGE)), statuses=STATUSES,
                           kinds=svc.queries.alert_kinds(), counts=svc.queries.alert_counts(),
                           error=request.args.get("error") == "state")


def _step(alert_id: int, action: str) -> BaseResponse:
    svc = services()
    principal = current_principal()
    assert principal is not None
    step = alerting.acknowledge_alert if action == "acknowledge" else alerting.resolve_alert
    try:
        with svc.repo.write(f"{action} an alert") as tx:
            before = step(tx.conn, alert_id, by=principal.actor, now=svc.now())
    except alerting.AlertStateError:
        if svc.queries.alert(alert_id) is None:
            abort(404)
        # A fixed message code, never text from the URL (no attacker-chosen text on the page).
        return redirect(url_for("alerts.index", status=request.form.get("status", "active"), error="state"),
                        code=303)
    alert = svc.queries.alert(alert_id)
    svc.record(principal, f"alert.{action}", f"alert:{alert_id}",
               {"from": before, "kind": alert.kind if alert else None,
                "device_id": alert.device_id if alert else None})
    return redirect(url_for("alerts.index", status=request.form.get("status", "active")), code=303)


@bp.post("/<int(max=9223372036854775807):alert_id>/acknowledge")
@require(Right.MANAGE_ALERTS)
def acknowledge(alert_id: int) -> BaseResponse:
    return _step(alert_id, "acknowledge")


@bp.post("/<int(max=9223372036854775807):alert_id>/resolve")
@require(Right.MANAGE_ALERTS)
def resolve(alert_id: int) -> BaseResponse:
    return _step(alert_id, "resolve")
