"""Rollouts: the list (state, release, group, a progress bar per phase), a rollout's page (plan,
phases, the members' states over time as a chart, failures with their reasons, the members) with
the operators' buttons (pause, resume, approve, cancel, abort), and the wizard that creates one:
release, target group and plan (the plan file's key names), a dry run that shows each phase's
devices, then "Start".

Everything goes through :mod:`fleet_server.service.rollouts` (as the API and the CLI do) and every
change is written to the audit log with the API's action names (``rollout.create``,
``rollout.pause``, ...). The chart is an SVG drawn on the server (no script; the CSP allows none
inline).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, abort, redirect, render_template, request, url_for
from werkzeug.wrappers import Response as BaseResponse

from fleet_server.console.auth import current_principal
from fleet_server.console.rbac import Principal, Right, require
from fleet_server.console.services import services
from fleet_server.rollouts import engine
from fleet_server.rollouts.plan import Group, Plan, RolloutError, parse_plan
from fleet_server.service import rollouts
from fleet_server.storage.release_tables import ReleaseState
from fleet_server.storage.rollout_repo import MemberRecord
from fleet_server.storage.rollout_tables import FAILURE_KINDS, MemberState, RolloutState
from protocol.messages import NAME_RE

bp = Blueprint("rollouts", __name__)

DEVICE_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
MAX_GROUP_DEVICES = 10_000
MAX_TAGS = 32
ACTIONS = ("pause", "resume", "approve", "cancel", "abort")
DONE_MESSAGES = {
    "create": "Rollout created.",
    "pause": "Rollout paused: no new assignments until it is resumed.",
    "resume": "Rollout resumed: the workers assign its devices at their next step.",
    "approve": "Phase approved.",
    "cancel": "Rollout cancelled (assignments in flight go on).",
    "abort": "Rollout aborted: no new assignments; an alert is raised.",
}
# The wizard's plan fields: (plan file key, kind). Text fields are handed to parse_plan as typed.
PLAN_FIELDS: tuple[tuple[str, str], ...] = (
    ("canary", "text"), ("canary_devices", "list"), ("phases", "text"), ("phase_counts", "text"),
    ("canary_success_percent", "number"), ("success_percent", "number"),
    ("abort_failure_percent", "number"), ("min_executed", "integer"), ("abort_on", "text"),
    ("device_timeout_s", "number"), ("retries", "integer"), ("max_rate", "integer"), ("window", "text"),
    ("grace_s", "number"), ("approval", "flag"), ("rollback_on_abort", "flag"))
# The chart's series, bottom to top.
SERIES = ("succeeded", "failed", "assigned", "pending")
CHART_W, CHART_H, CHART_PAD, CHART_POINTS = 960, 200, 24, 40
MEMBER_LIMIT = 500  # members listed on a rollout's page (failures are always listed in full)


# --------------------------------------------------------------------------------------------------
# progress bars and the chart (pure)
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Segment:
    kind: str
    x: float
    width: float
    count: int


def phase_bar(p: engine.PhaseProgress) -> list[Segment]:
    """A phase's bar on a 0-100 scale: succeeded, failed, assigned, pending."""
    total = max(p.devices, 1)
    out: list[Segment] = []
    x = 0.0
    for kind, count in (("succeeded", p.succeeded), ("failed", p.failed), ("assigned", p.assigned),
                        ("pending", p.pending)):
        if count:
            width = round(100 * count / total, 2)
            out.append(Segment(kind, round(x, 2), width, count))
            x += width
    return out


@dataclass(frozen=True, slots=True)
class Point:
    at: int
    counts: dict[str, int]  # SERIES -> devices


def member_state_at(m: MemberRecord, at: int) -> str | None:
    """What a member was at time ``at`` (from its record: joined, assigned, finished), or None
    before it joined. A member retried after a time-out counts as assigned from its last
    assignment."""
    if m.joined_at > at:
        return None
    if m.finished_at is not None and m.finished_at <= at and m.state != MemberState.PENDING:
        return "succeeded" if m.state == MemberState.SUCCEEDED else "failed"
    if m.assigned_at is not None and m.assigned_at <= at and m.state != MemberState.PENDING:
        return "assigned"
    return "pending"


def state_series(members: Sequence[MemberRecord], start: int, end: int,
                 points: int = CHART_POINTS) -> list[Point]:
    """The members' counts per state at ``points`` evenly spaced times from ``start`` to ``end``
    (the last at ``end``)."""
    end = max(end, start)
    n = max(1, points if end > start else 1)
    times = [end] if n == 1 else [start + (end - start) * i // (n - 1) for i in range(n)]
    out: list[Point] = []
    for t in times:
        counts = dict.fromkeys(SERIES, 0)
        for m in members:
            s = member_state_at(m, t)
            if s is not None:
                counts[s] += 1
        out.append(Point(t, counts))
    return out


@dataclass(frozen=True, slots=True)
class Column:
    at: int
    x: float
    width: float
    rects: list[tuple[str, float, float, int]]  # (series, y, height, count)


def chart_columns(series: Sequence[Point]) -> tuple[list[Column], int]:
    """Stacked columns of :func:`state_series` (the SVG's geometry) and the scale max."""
    top = max([sum(p.counts.values()) for p in series] + [1])
    inner_h = CHART_H - CHART_PAD
    step = CHART_W / max(len(series), 1)
    cols: list[Column] = []
    for i, p in enumerate(series):
        y = float(inner_h)
        rects: list[tuple[str, float, float, int]] = []
        for kind in SERIES:
            count = p.counts[kind]
            if count:
                h = inner_h * count / top
                y -= h
                rects.append((kind, round(y, 1), round(h, 1), count))
        cols.append(Column(p.at, round(i * step + 1, 1), round(max(step - 2, 1), 1), rects))
    return cols, top


# --------------------------------------------------------------------------------------------------
# pages
# --------------------------------------------------------------------------------------------------
def _principal() -> Principal:
    principal = current_principal()
    if principal is None:  # pragma: no cover - require() ran first
        abort(401)
    return principal


@bp.get("/")
@require(Right.VIEW_FLEET)
def index() -> str:
    svc = services()
    now = svc.now()
    views = [rollouts.view(svc.repo, r.id, now=now) for r in svc.repo.rollouts.rollouts()]
    return render_template("rollouts/list.html", views=views, bars=[[phase_bar(p) for p in v.phases]
                                                                    for v in views])


def _view(rollout_id: str) -> rollouts.RolloutView:
    svc = services()
    if rollouts.ROLLOUT_ID_RE.fullmatch(rollout_id) is None or svc.repo.rollouts.rollout(rollout_id) is None:
        abort(404)
    return rollouts.view(svc.repo, rollout_id, now=svc.now())


def _detail(rollout_id: str, *, error: str | None = None, status: int = 200) -> tuple[str, int]:
    svc = services()
    v = _view(rollout_id)
    r = v.rollout
    start = r.started_at if r.started_at is not None else r.created_at
    end = r.finished_at if r.finished_at is not None else svc.now()
    series = state_series(v.members, start, end)
    columns, top = chart_columns(series)
    failures = [m for m in v.members if m.state in FAILURE_KINDS]
    approvable = (v.plan.approval and r.state not in (RolloutState.COMPLETED, RolloutState.ABORTED,
                                                      RolloutState.CANCELLED)
                  and any(p not in v.approvals for p in range(1, v.plan.phase_count())))
    return render_template(
        "rollouts/detail.html", v=v, bars=[phase_bar(p) for p in v.phases], columns=columns, top=top,
        series=series, failures=failures, approvable=approvable, plan_rows=plan_rows(v.plan),
        chart_w=CHART_W, chart_h=CHART_H, chart_pad=CHART_PAD, series_names=SERIES, error=error,
        member_limit=MEMBER_LIMIT,
        done=DONE_MESSAGES.get(request.args.get("done", ""))), status


@bp.get("/<rollout_id>")
@require(Right.VIEW_FLEET)
def detail(rollout_id: str) -> tuple[str, int]:
    return _detail(rollout_id)


def plan_rows(plan: Plan) -> list[tuple[str, str]]:
    """The plan as (plan file key, value) for the page."""
    canary = f"{plan.canary_percent:g}%" if plan.canary_percent is not None else str(plan.canary)
    rows = [("canary", canary)]
    if plan.canary_devices:
        rows.append(("canary_devices", ", ".join(plan.canary_devices)))
    if plan.phase_counts:
        rows.append(("phase_counts", ", ".join(str(c) for c in plan.phase_counts)))
    else:
        rows.append(("phases", ", ".join(f"{p:g}%" for p in plan.phases)))
    rows += [("canary_success_percent", f"{plan.canary_success_percent:g}"),
             ("success_percent", f"{plan.success_percent:g}"),
             ("abort_failure_percent", f"{plan.abort_failure_percent:g}"),
             ("min_executed", str(plan.min_executed)), ("abort_on", ", ".join(plan.abort_on)),
             ("device_timeout_s", f"{plan.device_timeout_s:g}"), ("retries", str(plan.retries)),
             ("max_rate", str(plan.max_rate) if plan.max_rate else "unlimited"),
             ("approval", "yes" if plan.approval else "no"),
             ("window", f"{plan.window[0]:02d}-{plan.window[1]:02d} UTC" if plan.window else "always"),
             ("rollback_on_abort", "yes" if plan.rollback_on_abort else "no"),
             ("grace_s", f"{plan.grace_s:g}")]
    return rows


# --------------------------------------------------------------------------------------------------
# actions
# --------------------------------------------------------------------------------------------------
def _act(rollout_id: str, action: str) -> BaseResponse | tuple[str, int]:
    svc, principal = services(), _principal()
    _view(rollout_id)  # 404 first
    details: dict[str, Any] = {}
    try:
        if action == "pause":
            rollouts.pause(svc.repo, rollout_id, now=svc.now())
        elif action == "resume":
            rollouts.resume(svc.repo, rollout_id, now=svc.now())
        elif action == "cancel":
            rollouts.cancel(svc.repo, rollout_id, now=svc.now(), actor=principal.actor)
        elif action == "abort":
            rollouts.abort(svc.repo, rollout_id, signer=svc.signer(), now=svc.now(), actor=principal.actor)
        else:
            details["phase"] = rollouts.approve(svc.repo, rollout_id, now=svc.now(), actor=principal.actor)
    except RolloutError as exc:
        return _detail(rollout_id, error=exc.diagnostics(), status=409)
    rec = svc.repo.rollouts.rollout(rollout_id)
    assert rec is not None
    svc.record(principal, f"rollout.{action}", f"rollout:{rollout_id}", {"state": rec.state, **details})
    return redirect(url_for("rollouts.detail", rollout_id=rollout_id, done=action), code=303)


@bp.post("/<rollout_id>/pause")
@require(Right.DEPLOY)
def pause(rollout_id: str) -> BaseResponse | tuple[str, int]:
    return _act(rollout_id, "pause")


@bp.post("/<rollout_id>/resume")
@require(Right.DEPLOY)
def resume(rollout_id: str) -> BaseResponse | tuple[str, int]:
    return _act(rollout_id, "resume")


@bp.post("/<rollout_id>/approve")
@require(Right.DEPLOY)
def approve(rollout_id: str) -> BaseResponse | tuple[str, int]:
    return _act(rollout_id, "approve")


@bp.post("/<rollout_id>/cancel")
@require(Right.DEPLOY)
def cancel(rollout_id: str) -> BaseResponse | tuple[str, int]:
    return _act(rollout_id, "cancel")


@bp.post("/<rollout_id>/abort", endpoint="abort")
@require(Right.DEPLOY)
def abort_rollout(rollout_id: str) -> BaseResponse | tuple[str, int]:
    return _act(rollout_id, "abort")


# --------------------------------------------------------------------------------------------------
# the wizard
# --------------------------------------------------------------------------------------------------
class FormError(RolloutError):
    """A field of the wizard's form is invalid."""


@dataclass(frozen=True, slots=True)
class RolloutRequest:
    target: str
    rollout_id: str | None
    group: Group
    plan: Plan
    draft: bool


def _field(name: str, max_len: int = 200) -> str:
    value = request.form.get(name, "").strip()
    if len(value) > max_len:
        raise FormError(f"{name}: at most {max_len} characters")
    return value


def _words(name: str, pattern: re.Pattern[str], most: int) -> tuple[str, ...]:
    words = tuple(dict.fromkeys(w for w in re.split(r"[\s,]+", _field(name, 700_000)) if w))
    if len(words) > most:
        raise FormError(f"{name}: at most {most}")
    bad = [w for w in words if pattern.fullmatch(w) is None]
    if bad:
        raise FormError(f"{name}: {bad[0][:70]!r} is not valid")
    return words


def _plan_keys() -> dict[str, Any]:
    keys: dict[str, Any] = {}
    for key, kind in PLAN_FIELDS:
        if kind == "flag":
            if request.form.get(key):
                keys[key] = True
            continue
        if kind == "list":
            names = _words(key, DEVICE_ID_RE, MAX_GROUP_DEVICES)
            if names:
                keys[key] = list(names)
            continue
        text = _field(key)
        if not text:
            continue
        if kind == "text":
            keys[key] = text
            continue
        try:
            keys[key] = int(text) if kind == "integer" or re.fullmatch(r"-?\d+", text) else float(text)
        except ValueError:
            raise FormError(f"plan: {key} must be a {'whole ' if kind == 'integer' else ''}number, "
                            f"not {text[:40]!r}") from None
    return keys


def parse_request() -> RolloutRequest:
    """The wizard's form as a rollout request (raises :class:`RolloutError` with the field)."""
    target = _field("release")
    if not target:
        raise FormError("choose a release")
    release = services().repo.releases.release(target)
    if release is None:
        raise FormError(f"no release {target!r}")
    rollout_id = _field("id", 40) or None
    if rollout_id is not None and rollouts.ROLLOUT_ID_RE.fullmatch(rollout_id) is None:
        raise FormError(f"rollout id {rollout_id!r}: lowercase letters, digits, '.', '_', '-' (at most 32)")
    device_class = _field("class", 64) or release.device_class
    firmware = _field("firmware", 64) or None
    for name, value in (("class", device_class), ("firmware", firmware)):
        if value is not None and NAME_RE.fullmatch(value) is None:
            raise FormError(f"{name}: {value!r} is not valid")
    group = Group(device_class, firmware, _words("tags", re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$"),
                                                 MAX_TAGS),
                  _words("devices", DEVICE_ID_RE, MAX_GROUP_DEVICES))
    try:
        plan = parse_plan(_plan_keys())
    except FormError:
        raise
    except RolloutError as exc:
        raise FormError(exc.diagnostics()) from None
    return RolloutRequest(target, rollout_id, group, plan, bool(request.form.get("draft")))


def _wizard(*, error: str | None = None, planned: rollouts.DryRun | None = None,
            status: int = 200) -> tuple[str, int]:
    svc = services()
    releases = [r for r in svc.repo.releases.releases() if r.state == ReleaseState.ACTIVE]
    form = request.form if request.method == "POST" else request.args
    values = {k: form.get(k, "") for k in ("release", "id", "class", "firmware", "tags", "devices", "draft",
                                           *(key for key, _ in PLAN_FIELDS))}
    if planned is not None:
        values["id"] = planned.rollout_id
    return render_template("rollouts/new.html", releases=releases, values=values, plan_fields=PLAN_FIELDS,
                           planned=planned, error=error), status


@bp.get("/new")
@require(Right.DEPLOY)
def new() -> tuple[str, int]:
    return _wizard()


@bp.post("/new")
@require(Right.DEPLOY)
def dry_run() -> tuple[str, int]:
    try:
        req = parse_request()
        planned = rollouts.dry_run(services().repo, target=req.target, group=req.group, plan=req.plan,
                                   rollout_id=req.rollout_id)
    except FormError as exc:
        return _wizard(error=exc.diagnostics(), status=400)
    except RolloutError as exc:
        return _wizard(error=exc.diagnostics(), status=409)
    return _wizard(planned=planned)


@bp.post("/")
@require(Right.DEPLOY)
def create() -> BaseResponse | tuple[str, int]:
    svc, principal = services(), _principal()
    try:
        req = parse_request()
        rec = rollouts.create_rollout(svc.repo, target=req.target, group=req.group, plan=req.plan,
                                      now=svc.now(), actor=principal.actor, draft=req.draft,
                                      rollout_id=req.rollout_id)
    except FormError as exc:
        return _wizard(error=exc.diagnostics(), status=400)
    except RolloutError as exc:
        return _wizard(error=exc.diagnostics(), status=409)
    members = svc.repo.rollouts.members(rec.id)
    svc.record(principal, "rollout.create", f"rollout:{rec.id}",
               {"release": req.target, "state": rec.state, "devices": len(members),
                "plan": req.plan.to_json(), "group": req.group.to_json()})
    return redirect(url_for("rollouts.detail", rollout_id=rec.id, done="create"), code=303)
