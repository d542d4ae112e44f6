"""Policies: reference values per device class and firmware version, and a new policy made from a
chosen device's event log (the log the server holds for the device's current boot).

Storing reuses :func:`fleet_server.service.admin.store_policy` (the new policy becomes the active one
of its class and firmware version; workers pick it up within a second) and is audited.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

from flask import Blueprint, abort, redirect, render_template, request, url_for
from werkzeug.wrappers import Response as BaseResponse

from fleet_server.appraisal.policy import DEFAULT_BANK, ReferencePolicy, policy_from_eventlog
from fleet_server.console.auth import current_principal
from fleet_server.console.rbac import Right, require
from fleet_server.console.services import services
from fleet_server.service import admin
from fleet_server.service.policies import ANY_CLASS
from fleet_server.storage.models import DeviceState
from fleet_server.verifier.eventlog import parse_eventlog
from protocol.errors import EdgeError, MalformedInputError
from protocol.messages import NAME_RE
from protocol.topics import validate_device_id

bp = Blueprint("policies", __name__)


@bp.get("/")
@require(Right.VIEW_FLEET)
def index() -> str:
    svc = services()
    headers = svc.repo.policies()
    counts = svc.queries.devices_per_pair()
    per_policy: dict[int, int] = {}
    for h in headers:
        if h.device_class == ANY_CLASS:
            per_policy[h.id] = sum(n for (_, fw), n in counts.items() if fw == h.firmware_version)
        else:
            per_policy[h.id] = counts.get((h.device_class, h.firmware_version), 0)
    covered = {(h.device_class, h.firmware_version) for h in headers if h.active}
    uncovered = sorted((pair, n) for pair, n in counts.items()
                       if pair not in covered and (ANY_CLASS, pair[1]) not in covered)
    return render_template("policies/list.html", headers=headers, per_policy=per_policy, uncovered=uncovered,
                           done=request.args.get("done"))


@bp.get("/<int(max=9223372036854775807):policy_id>")
@require(Right.VIEW_FLEET)
def detail(policy_id: int) -> str:
    record = services().repo.policy(policy_id=policy_id)
    if record is None:
        abort(404)
    try:
        policy: ReferencePolicy | None = ReferencePolicy.from_json(json.loads(record.reference))
        error = None
    except (EdgeError, ValueError) as exc:
        policy, error = None, (exc.diagnostics() if isinstance(exc, EdgeError) else str(exc))
    return render_template("policies/detail.html", record=record, policy=policy, error=error,
                           created=request.args.get("done") == "created")


def _form_defaults(device_id: str) -> dict[str, str]:
    svc = services()
    device = svc.repo.device(device_id) if device_id else None
    if device is None:
        return {"device": device_id, "name": "", "device_class": "", "firmware_version": "", "pcrs": ""}
    stamp = datetime.fromtimestamp(svc.now() / 1000, UTC).strftime("%Y%m%d")
    return {"device": device.id, "name": f"{device.device_class}-{device.firmware_version}-{stamp}"[:64],
            "device_class": device.device_class, "firmware_version": device.firmware_version, "pcrs": ""}


def _new_page(values: dict[str, str], error: str | None = None, status: int = 200) -> tuple[str, int]:
    svc = services()
    device = None
    if values.get("device"):
        try:
            device = svc.repo.device(validate_device_id(values["device"]))
        except MalformedInputError:
            device = None
    return render_template("policies/new.html", values=values, device=device, error=error,
                           any_class=ANY_CLASS, trusted=DeviceState.TRUSTED), status


@bp.get("/new")
@require(Right.EDIT_POLICIES)
def new() -> tuple[str, int]:
    return _new_page(_form_defaults(request.args.get("device", "").strip()[:63]))


def _pcrs(text: str) -> list[int] | None:
    if not text.strip():
        return None
    try:
        values = [int(p) for p in text.replace(" ", "").split(",") if p]
    except ValueError:
        raise MalformedInputError("PCRs: comma-separated numbers 0-23") from None
    if not values or not all(0 <= v < 24 for v in values):
        raise MalformedInputError("PCRs: comma-separated numbers 0-23")
    return values


@bp.post("/new")
@require(Right.EDIT_POLICIES)
def create() -> BaseResponse | tuple[str, int]:
    svc = services()
    principal = current_principal()
    assert principal is not None
    values = {k: request.form.get(k, "").strip()[:64] for k in ("device", "name", "device_class",
                                                                 "firmware_version", "pcrs")}
    replace = request.form.get("replace") == "yes"
    try:
        device_id = validate_device_id(values["device"])
        for label, key in (("name", "name"), ("device class", "device_class"),
                           ("firmware version", "firmware_version")):
            if not NAME_RE.fullmatch(values[key]):
                raise MalformedInputError(f"{label}: letters, digits, '.', '_', '+', '-' (at most 64)")
        if svc.repo.device(device_id) is None:
            raise MalformedInputError(f"no device {device_id!r}")
        raw = svc.queries.held_log(device_id)
        if not raw:
            raise MalformedInputError(f"the server holds no event log of device {device_id} (it has not been "
                                      "attested in its current boot)")
        policy = policy_from_eventlog(parse_eventlog(raw), name=values["name"],
                                      device_class=values["device_class"],
                                      firmware_version=values["firmware_version"], bank=DEFAULT_BANK,
                                      pcrs=_pcrs(values["pcrs"]))
        stored = admin.store_policy(svc.repo, policy, now=svc.now(), created_by=principal.actor,
                                    replace=replace)
    except EdgeError as exc:
        return _new_page(values, exc.diagnostics(), 400)
    svc.record(principal, "policy.create", f"policy:{stored.name}",
               {"id": stored.id, "sha256": stored.sha256, "from_device": device_id,
                "device_class": policy.device_class, "firmware_version": policy.firmware_version,
                "replace": replace})
    return redirect(url_for("policies.detail", policy_id=stored.id, done="created"), code=303)
