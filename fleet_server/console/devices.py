"""Devices: the list (search, filters, keyset pagination) and a device's page (identity, attestation
history, latest PCRs, the boot event log marked against the reference values, model leases and usage)
with the fleet actions: approve, re-attest now, revoke, quarantine, lift a quarantine.

Actions reuse :mod:`fleet_server.service.admin` (state change, ``statechange`` row and the signed
message in the outbox, in one transaction; a worker publishes it) and are written to the audit log.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from cryptography import x509
from flask import Blueprint, abort, redirect, render_template, request, url_for
from werkzeug.wrappers import Response as BaseResponse

from fleet_server.appraisal.policy import ReferencePolicy
from fleet_server.console.auth import current_principal
from fleet_server.console.bootlog import MarkedEvent, failing_from_reasons, mark_events, pcr_rows
from fleet_server.console.queries import MAX_PAGE, DeviceFilter
from fleet_server.console.rbac import Principal, Right, require
from fleet_server.console.services import ConsoleServices, services
from fleet_server.rollouts.plan import RolloutError
from fleet_server.service import admin, rollouts
from fleet_server.service.policies import ANY_CLASS
from fleet_server.storage.models import ATTESTED_STATES, DeviceState
from fleet_server.storage.repo import DeviceRecord, PolicyRecord, Repository
from fleet_server.verifier.eventlog import parse_eventlog
from fleet_server.verifier.quote import AttestationKey
from protocol.errors import EdgeError, MalformedInputError
from protocol.topics import validate_device_id

bp = Blueprint("devices", __name__)

MAX_REASON = 200
DONE_MESSAGES = {
    "approve": "Device approved: it is enrolled and will be challenged now; its certificate (if it was "
               "pending) is queued for the workers.",
    "reattest": "Re-attestation requested: the scheduler challenges the device at its next round.",
    "revoke": "Device revoked: a signed revocation is queued for the workers.",
    "quarantine": "Device quarantined: a signed revocation is queued; it stays untrusted until the "
                  "quarantine is lifted.",
    "unquarantine": "Quarantine lifted: the device is enrolled and will be challenged now; only good "
                    "evidence makes it trusted.",
    "tags": "Tags saved.",
}


def _arg(name: str, max_len: int = 64) -> str:
    return request.args.get(name, "").strip()[:max_len]


def device_filter() -> DeviceFilter:
    """The list's filter from the query string (unknown values are ignored, never an error)."""
    state = _arg("state", 16)
    if state not in {s.value for s in DeviceState}:
        state = ""
    try:
        limit = max(10, min(int(request.args.get("n", "50")), MAX_PAGE))
    except ValueError:
        limit = 50
    return DeviceFilter(q=_arg("q"), state=state, device_class=_arg("class"), firmware=_arg("firmware"),
                        model=_arg("model"), after=_arg("after", 63), before=_arg("before", 63), limit=limit)


@bp.get("/")
@require(Right.VIEW_FLEET)
def index() -> str:
    svc = services()
    f = device_filter()
    page = svc.queries.devices_page(f)
    return render_template("devices/list.html", f=f, page=page, facets=svc.queries.facets(),
                           models_available=svc.queries.models.get("lease") is not None)


# --------------------------------------------------------------------------------------------------
# a device
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Identity:
    """What the page shows of a device's EK certificate and AK."""

    ek_subject: str
    ek_issuer: str
    ek_serial: str
    ek_not_before: str
    ek_not_after: str
    ek_fingerprint: str
    ak_name: str
    ak_key: str
    ak_sha256: str


def identity_of(ek_der: bytes, ak_public: bytes, ak_name: bytes) -> Identity:
    """Parse the stored EK certificate and AK public area (never raises: unreadable parts say so)."""
    try:
        cert = x509.load_der_x509_certificate(ek_der)
        subject = cert.subject.rfc4514_string() or "(empty subject)"
        issuer = cert.issuer.rfc4514_string() or "(empty issuer)"
        serial = format(cert.serial_number, "x")
        not_before = cert.not_valid_before_utc.strftime("%Y-%m-%d %H:%M UTC")
        not_after = cert.not_valid_after_utc.strftime("%Y-%m-%d %H:%M UTC")
    except ValueError:
        subject = issuer = serial = not_before = not_after = "(unreadable certificate)"
    try:
        key = AttestationKey.from_tpm2b_public(ak_public).key
        curve = getattr(key, "curve", None)
        ak_key = f"ECC {curve.name}" if curve is not None else f"RSA {getattr(key, 'key_size', '?')}"
    except EdgeError:
        ak_key = "(unreadable public area)"
    return Identity(subject, issuer, serial, not_before, not_after, hashlib.sha256(ek_der).hexdigest(),
                    ak_name.hex(), ak_key, hashlib.sha256(ak_public).hexdigest())


def policy_for(repo: Repository, device: DeviceRecord) -> tuple[PolicyRecord | None, ReferencePolicy | None]:
    """The policy of the device's latest appraisal, else the active one for its class and firmware."""
    record = repo.policy(policy_id=device.policy_id) if device.policy_id is not None else None
    if record is None:
        headers = {(h.device_class, h.firmware_version): h for h in repo.active_policies()}
        header = headers.get((device.device_class, device.firmware_version)) or headers.get(
            (ANY_CLASS, device.firmware_version))
        record = repo.policy(policy_id=header.id) if header is not None else None
    if record is None:
        return None, None
    try:
        return record, ReferencePolicy.from_json(json.loads(record.reference))
    except (EdgeError, ValueError):
        return record, None


def _detail(device_id: str, *, error: str | None = None, status: int = 200) -> tuple[str, int]:
    svc = services()
    try:
        validate_device_id(device_id)
    except MalformedInputError:
        abort(404)
    device = svc.repo.device(device_id)
    blobs = svc.queries.device_identity_blobs(device_id)
    if device is None or blobs is None:
        abort(404)
    history = svc.repo.state_history(device_id, limit=30)
    attestations = svc.repo.attestations(device_id, limit=20)
    record, policy = policy_for(svc.repo, device)
    running = svc.repo.releases.attested_release(device_id)
    if running is not None:  # the device runs a release: its events are marked against the release's
        try:
            policy = ReferencePolicy.from_json(json.loads(running.reference))
        except (EdgeError, ValueError):
            policy = None
    newest = svc.repo.releases.assignments(device_id=device_id, limit=1)
    reasons = attestations[0].reasons if attestations else device.state_reasons
    events: list[MarkedEvent] = []
    log_error = None
    raw = svc.queries.held_log(device_id)
    if raw:
        try:
            events = mark_events(parse_eventlog(raw), policy, failing_from_reasons(reasons))
        except EdgeError as exc:
            log_error = exc.diagnostics()
    alerts, _ = svc.queries.alerts(device_id=device_id, status="active", limit=10)
    return render_template(
        "devices/detail.html", device=device, identity=identity_of(*blobs), history=history,
        attestations=attestations, policy_record=record, policy=policy, reasons=reasons,
        pcrs=pcr_rows(device.last_pcrs, policy), events=events, log_error=log_error,
        problems=sum(1 for e in events if e.status in ("differs", "extra", "missing")),
        model_rows=svc.queries.device_model_rows(device_id), alerts=alerts,
        runtime=svc.repo.models.runtime(device_id), model_loads=svc.repo.models.loads(device_id=device_id),
        attested=device.state in ATTESTED_STATES, error=error, running=running,
        update=newest[0] if newest else None, tags=svc.repo.rollouts.tags(device_id),
        done=DONE_MESSAGES.get(request.args.get("done", "")),
        reason_max=MAX_REASON), status


@bp.get("/<device_id>")
@require(Right.VIEW_FLEET)
def detail(device_id: str) -> tuple[str, int]:
    return _detail(device_id)


# --------------------------------------------------------------------------------------------------
# actions
# --------------------------------------------------------------------------------------------------
def _principal() -> Principal:
    principal = current_principal()
    if principal is None:  # pragma: no cover - require() ran first
        abort(401)
    return principal


def _reason() -> str:
    return " ".join(request.form.get("reason", "").split())[:MAX_REASON]


def _done(svc: ConsoleServices, principal: Principal, action: str, transition: admin.StateTransition,
          **details: object) -> BaseResponse:
    if action in ("approve", "revoke"):
        details = {**details, "crl": svc.refresh_crl()}
    svc.record(principal, f"device.{action}", f"device:{transition.device_id}",
               {"from": transition.from_state, "to": transition.to_state, "messages": transition.messages,
                **details})
    return redirect(url_for("devices.detail", device_id=transition.device_id, done=action), code=303)


def _refused(device_id: str, exc: EdgeError) -> tuple[str, int]:
    if services().repo.device(device_id) is None:
        abort(404)
    return _detail(device_id, error=exc.diagnostics(), status=409)


def reattest_device(repo: Repository, device_id: str, *, now: int) -> admin.StateTransition:
    """Move the device's schedule to now: the scheduler's next round challenges it."""
    validate_device_id(device_id)
    with repo.write("requesting a re-attestation") as tx:
        identity = tx.device_identity(device_id)
        if identity is None:
            raise admin.AdminError(f"no device {device_id!r}")
        if identity.state not in ATTESTED_STATES:
            raise admin.AdminError(f"device {device_id} is {identity.state}; only attested devices can be "
                                   "re-attested")
        tx.update_device(device_id, {"next_attestation_at": now, "updated_at": now})
    return admin.StateTransition(device_id, identity.state, identity.state, 0)


@bp.post("/<device_id>/approve")
@require(Right.APPROVE)
def approve(device_id: str) -> BaseResponse | tuple[str, int]:
    svc, principal = services(), _principal()
    try:
        transition = admin.approve_device(svc.repo, device_id, signer=svc.signer(), fleet_ca=svc.fleet_ca(),
                                          now=svc.now(), actor=principal.actor)
    except (admin.AdminError, MalformedInputError) as exc:
        return _refused(device_id, exc)
    return _done(svc, principal, "approve", transition, cert_serial=transition.cert_serial)


@bp.post("/<device_id>/unquarantine")
@require(Right.APPROVE)
def unquarantine(device_id: str) -> BaseResponse | tuple[str, int]:
    svc, principal = services(), _principal()
    try:
        transition = admin.unquarantine_device(svc.repo, device_id, signer=svc.signer(),
                                               fleet_ca=svc.fleet_ca(), now=svc.now(), actor=principal.actor)
    except (admin.AdminError, MalformedInputError) as exc:
        return _refused(device_id, exc)
    return _done(svc, principal, "unquarantine", transition)


@bp.post("/<device_id>/reattest")
@require(Right.REATTEST)
def reattest(device_id: str) -> BaseResponse | tuple[str, int]:
    svc, principal = services(), _principal()
    try:
        transition = reattest_device(svc.repo, device_id, now=svc.now())
    except (admin.AdminError, MalformedInputError) as exc:
        return _refused(device_id, exc)
    return _done(svc, principal, "reattest", transition)


@bp.post("/<device_id>/revoke")
@require(Right.REVOKE)
def revoke(device_id: str) -> BaseResponse | tuple[str, int]:
    svc, principal = services(), _principal()
    reason = _reason()
    try:
        transition = admin.revoke_device(svc.repo, device_id, signer=svc.signer(), now=svc.now(),
                                         reason=reason, actor=principal.actor)
    except (admin.AdminError, MalformedInputError) as exc:
        return _refused(device_id, exc)
    return _done(svc, principal, "revoke", transition, reason=reason)


@bp.post("/<device_id>/quarantine")
@require(Right.QUARANTINE)
def quarantine(device_id: str) -> BaseResponse | tuple[str, int]:
    svc, principal = services(), _principal()
    reason = _reason()
    try:
        transition = admin.quarantine_device(svc.repo, device_id, signer=svc.signer(), now=svc.now(),
                                             reason=reason, actor=principal.actor)
    except (admin.AdminError, MalformedInputError) as exc:
        return _refused(device_id, exc)
    return _done(svc, principal, "quarantine", transition, reason=reason)


@bp.post("/<device_id>/tags")
@require(Right.DEPLOY)
def tags(device_id: str) -> BaseResponse | tuple[str, int]:
    """Add the tags of the ``add`` field and remove those of ``remove`` (separated by commas or
    spaces); target groups of rollouts select devices by tag."""
    svc, principal = services(), _principal()
    add = [t for t in request.form.get("add", "").replace(",", " ").split() if t][:32]
    remove = [t for t in request.form.get("remove", "").replace(",", " ").split() if t][:32]
    try:
        validate_device_id(device_id)
        if svc.repo.device(device_id) is None:
            abort(404)
        if not add and not remove:
            raise RolloutError("give tags to add or remove")
        added = rollouts.tag_device(svc.repo, device_id, add) if add else []
        removed = rollouts.untag_device(svc.repo, device_id, remove) if remove else []
    except MalformedInputError:
        abort(404)
    except RolloutError as exc:
        return _detail(device_id, error=exc.diagnostics(), status=400)
    svc.record(principal, "device.tag", f"device:{device_id}", {"added": added, "removed": removed})
    return redirect(url_for("devices.detail", device_id=device_id, done="tags"), code=303)
