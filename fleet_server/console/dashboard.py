"""The dashboard: devices by state, attestations and failures per hour over the last 24 hours (a
chart), open alerts and recent revocations. ``static/dashboard.js`` polls :func:`data` every
``console.dashboard_refresh_seconds`` and updates the numbers and the chart in place; the page is
complete without JavaScript.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flask import Blueprint, jsonify, render_template
from werkzeug.wrappers import Response as BaseResponse

from fleet_server.console.queries import SeriesPoint
from fleet_server.console.rbac import Right, require
from fleet_server.console.services import services
from fleet_server.storage.models import AlertStatus

bp = Blueprint("dashboard", __name__)

CHART_W, CHART_H, CHART_PAD = 960, 200, 24


@dataclass(frozen=True, slots=True)
class Bar:
    partial: bool
    x: float
    width: float
    y_total: float
    h_total: float
    y_failed: float
    h_failed: float
    label: str
    total: int
    failed: int


def chart_bars(points: list[SeriesPoint]) -> tuple[list[Bar], int]:
    """Bar geometry of the hourly chart (the same arithmetic as ``dashboard.js``), and the scale max."""
    top = max([p.total for p in points] + [1])
    inner_h = CHART_H - CHART_PAD
    step = CHART_W / max(len(points), 1)
    bars = []
    for i, p in enumerate(points):
        h_total = inner_h * p.total / top
        h_failed = inner_h * p.failed / top
        hour = (p.hour // 3_600_000) % 24
        bars.append(Bar(p.partial, round(i * step + 1, 1), round(step - 2, 1), round(inner_h - h_total, 1),
                        round(h_total, 1), round(inner_h - h_failed, 1), round(h_failed, 1), f"{hour:02d}:00",
                        p.total, p.failed))
    return bars, top


def dashboard_data() -> dict[str, Any]:
    """Everything the dashboard shows, as JSON-ready values."""
    svc = services()
    now = svc.now()
    q = svc.queries
    states = q.states()
    series = q.attestation_series(now)
    alerts, active = q.alerts(status="active", limit=8)
    counts = q.alert_counts()
    return {
        "generated_at": now,
        "states": states,
        "total_devices": sum(states.values()),
        "series": [{"hour": p.hour, "total": p.total, "failed": p.failed, "partial": p.partial}
                   for p in series],
        "series_partial": any(p.partial for p in series),
        "attestations_24h": sum(p.total for p in series),
        "failures_24h": sum(p.failed for p in series),
        "alerts": {"active": active, "open": counts.get(AlertStatus.OPEN, 0),
                   "critical": counts.get("active:critical", 0),
                   "items": [{"id": a.id, "kind": a.kind, "severity": a.severity, "device_id": a.device_id,
                              "message": a.message, "status": a.status, "count": a.count,
                              "last_seen_at": a.last_seen_at} for a in alerts]},
        "revocations": [{"device_id": r.device_id, "at": r.at, "reason": r.reasons[0] if r.reasons else ""}
                        for r in q.recent_revocations()],
    }


@bp.get("/")
@require(Right.VIEW_FLEET)
def index() -> str:
    data = dashboard_data()
    points = [SeriesPoint(p["hour"], p["total"], p["failed"], p["partial"]) for p in data["series"]]
    bars, top = chart_bars(points)
    return render_template("dashboard.html", data=data, bars=bars, top=top, chart_w=CHART_W, chart_h=CHART_H,
                           chart_pad=CHART_PAD)


@bp.get("/dashboard/data")
@require(Right.VIEW_FLEET)
def data() -> BaseResponse:
    return jsonify(dashboard_data())
