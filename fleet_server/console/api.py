"""The JSON API under ``/api/v1``: devices, attestations, policies, models, alerts and the audit log,
for automation. Described by :mod:`fleet_server.console.openapi` (served at
``/api/v1/openapi.json``; ``tests/test_console_api.py`` checks that the description and these
routes match, operation for operation, right for right).

* **Authentication**: ``Authorization: Bearer <API token>`` (tokens are bound to a role:
  ``fleet-server token create`` or the Users page); the console's session cookie is accepted too,
  and then state-changing calls need the session's CSRF token in ``X-CSRF-Token``.
* **Authorisation**: every view declares its right with :func:`~fleet_server.console.rbac.require`,
  like the console's pages; the rights matrix is the same.
* **Input**: query parameters and JSON bodies are checked strictly - an unknown parameter or key, a
  repeated parameter, a wrong type or an out-of-range value is a 400 naming it. Bodies are at most
  ``MAX_CONTENT_LENGTH`` (1 MiB), except model uploads (``[console] max_upload_mib``).
* **Output**: JSON only; times are integer milliseconds since the Unix epoch (``*_at``); digests
  are lowercase hex. Errors are ``{"error", "status", "detail"}`` with 400, 401, 403, 404, 409, 413
  or 503 - never a traceback.
* **Audit**: every state-changing call appends one audit entry after its change committed (the same
  actions as the console's: ``device.revoke``, ``model.publish``, ...; the actor is
  ``token:<name>`` or the user).

Operations on devices reuse :mod:`fleet_server.service.admin` (state change and signed message in
the outbox, in one transaction); operations on models share :mod:`fleet_server.console.models`.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NoReturn

from flask import Blueprint, Response, jsonify, request

from fleet_server.appraisal.policy import DEFAULT_BANK, policy_from_eventlog
from fleet_server.console import models as model_ops
from fleet_server.console.audit import AuditRecord
from fleet_server.console.auth import current_principal
from fleet_server.console.bootlog import failing_from_reasons, mark_events
from fleet_server.console.devices import identity_of, policy_for, reattest_device
from fleet_server.console.queries import MAX_PAGE, AlertRow, AttestationRow, DeviceFilter, DeviceRow
from fleet_server.console.rbac import MATRIX, Principal, Right, Role, login_required, public, require
from fleet_server.console.security import error_response
from fleet_server.console.services import ConsoleServices, services
from fleet_server.keys import ResultSigner
from fleet_server.modelstore import admin as model_admin
from fleet_server.modelstore.policy import policy_from_text
from fleet_server.modelstore.store import PackageStore, Published
from fleet_server.rollouts.plan import Group, Plan, RolloutError, parse_plan
from fleet_server.service import admin, releases, rollouts
from fleet_server.storage import alerting
from fleet_server.storage.model_repo import EntitlementRecord, LeaseRecord, LoadRecord, VersionRecord
from fleet_server.storage.model_tables import EntitlementKind
from fleet_server.storage.models import DeviceState
from fleet_server.storage.release_repo import ReleaseRecord
from fleet_server.storage.repo import DeviceRecord, PolicyHeader, PolicyRecord
from fleet_server.verifier.eventlog import parse_eventlog
from protocol.errors import ConfigError, EdgeError, MalformedInputError
from protocol.messages import MODEL_NAME_RE, NAME_RE, VERSION_RE
from protocol.topics import validate_device_id

log = logging.getLogger("fleet_server.console")
bp = Blueprint("api", __name__)

PREFIX = "/api/v1"
MAX_ID = (1 << 63) - 1
ID = f"int(max={MAX_ID})"
"""URL converter of row ids: larger numbers are not ids (404), never a database overflow."""
DEVICE_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
ROLLOUT_STATE_RE = re.compile(r"^(draft|running|paused|completed|aborted|cancelled)$")
ACTOR_RE = re.compile(r"^[^\x00-\x1f\x7f]{1,96}$")
TEXT_RE = re.compile(r"^[^\x00-\x1f\x7f]*$")
MAX_REASON = 200
ALERT_STATUSES = ("active", "open", "acknowledged", "resolved", "all")
VERDICTS = ("trusted", "untrusted")
MAX_TIME = 1 << 53


# --------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------
class ApiError(Exception):
    """Ends a request with a JSON error (``status``, and a ``detail`` for the caller)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def fail(status: int, detail: str) -> NoReturn:
    raise ApiError(status, detail)


@bp.errorhandler(ApiError)
def _api_error(exc: ApiError) -> Response:
    return error_response(exc.status, exc.detail)


@bp.errorhandler(model_ops.ModelActionError)
def _model_error(exc: model_ops.ModelActionError) -> Response:
    return error_response(exc.status, exc.diagnostics())


def _principal() -> Principal:
    principal = current_principal()
    if principal is None:  # pragma: no cover - require() ran first
        fail(401, "authentication required")
    return principal


def _signer(svc: ConsoleServices) -> ResultSigner:
    try:
        return svc.signer()
    except ConfigError as exc:
        _log_unavailable("signing key", exc)
        fail(503, "this server cannot sign messages to devices right now (see the server log)")


def _log_unavailable(what: str, exc: EdgeError) -> None:
    log.error("event=api_unavailable what=%s error=%s", what, exc.diagnostics())


# --------------------------------------------------------------------------------------------------
# strict input
# --------------------------------------------------------------------------------------------------
class Query:
    """The query string of an operation that takes ``allowed`` parameters (anything else is a 400)."""

    def __init__(self, *allowed: str) -> None:
        args = request.args
        for key in args:
            if key not in allowed:
                takes = ", ".join(allowed) or "none"
                fail(400, f"unknown query parameter {key[:40]!r} (this operation takes: {takes})")
            if len(args.getlist(key)) > 1:
                fail(400, f"query parameter {key!r} is given more than once")
        self._args = args

    def text(self, name: str, *, pattern: re.Pattern[str] | None = None, max_len: int = 64,
             choices: Iterable[str] | None = None, default: str = "") -> str:
        value = self._args.get(name)
        if value is None:
            return default
        if not value:
            fail(400, f"query parameter {name!r} is empty (leave it out instead)")
        if len(value) > max_len:
            fail(400, f"query parameter {name!r}: at most {max_len} characters")
        if choices is not None and value not in set(choices):
            fail(400, f"query parameter {name!r}: one of {', '.join(choices)}")
        if pattern is not None and not pattern.fullmatch(value):
            fail(400, f"query parameter {name!r}: must match {pattern.pattern}")
        if not TEXT_RE.fullmatch(value):
            fail(400, f"query parameter {name!r}: control characters are not allowed")
        return value

    def integer(self, name: str, *, lo: int, hi: int, default: int | None = None) -> int | None:
        value = self._args.get(name)
        if value is None:
            return default
        if not re.fullmatch(r"-?[0-9]{1,19}", value):
            fail(400, f"query parameter {name!r}: expected an integer")
        number = int(value)
        if not lo <= number <= hi:
            fail(400, f"query parameter {name!r}: must be between {lo} and {hi}")
        return number

    def limit(self, default: int = 50) -> int:
        found = self.integer("limit", lo=1, hi=MAX_PAGE, default=default)
        assert found is not None
        return found


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


class Body:
    """A JSON object body with the keys of ``allowed`` (anything else is a 400).

    ``optional``: an empty body (no bytes at all) stands for ``{}``."""

    def __init__(self, *allowed: str, optional: bool = False) -> None:
        data = request.get_data(cache=True)
        value: Any = {}
        if data:
            if request.mimetype != "application/json":
                fail(400, "the body must be JSON (Content-Type: application/json)")
            try:
                value = json.loads(data, parse_constant=_no_constant, object_pairs_hook=_no_duplicates)
            except RecursionError:
                fail(400, "the body is nested too deeply")
            except ValueError as exc:  # also UnicodeDecodeError
                fail(400, f"the body is not valid JSON: {str(exc)[:120]}")
        elif not optional:
            fail(400, "a JSON object body is required")
        if not model_ops.valid_unicode(value):
            fail(400, "the body's strings must be valid Unicode (no lone surrogates)")
        if not isinstance(value, dict):
            fail(400, "the body must be a JSON object")
        unknown = sorted(set(value) - set(allowed))
        if unknown:
            fail(400, f"unknown key {unknown[0][:40]!r} (this operation takes: {', '.join(allowed)})")
        self.value: dict[str, Any] = value

    def text(self, key: str, *, required: bool = False, pattern: re.Pattern[str] | None = None,
             max_len: int = 64) -> str | None:
        if key not in self.value:
            if required:
                fail(400, f"{key!r} is required")
            return None
        value = self.value[key]
        if not isinstance(value, str):
            fail(400, f"{key!r}: expected a string")
        if len(value) > max_len:
            fail(400, f"{key!r}: at most {max_len} characters")
        if not TEXT_RE.fullmatch(value):
            fail(400, f"{key!r}: control characters are not allowed")
        if pattern is not None and not pattern.fullmatch(value):
            fail(400, f"{key!r}: must match {pattern.pattern}")
        return value

    def flag(self, key: str) -> bool:
        value = self.value.get(key, False)
        if not isinstance(value, bool):
            fail(400, f"{key!r}: expected true or false")
        return value

    def pcrs(self, key: str) -> list[int] | None:
        if key not in self.value or self.value[key] is None:
            return None
        value = self.value[key]
        if not isinstance(value, list) or not value or len(value) > 24 or not all(
                isinstance(p, int) and not isinstance(p, bool) and 0 <= p <= 23 for p in value):
            fail(400, f"{key!r}: a list of 1-24 PCR numbers 0-23")
        if len(set(value)) != len(value):
            fail(400, f"{key!r}: a PCR is listed twice")
        return list(value)


def _device_id(device_id: str) -> str:
    """A device id from the path that can exist (else 404)."""
    if not DEVICE_ID_RE.fullmatch(device_id):
        fail(404, f"no device {device_id[:80]!r}")
    try:
        return validate_device_id(device_id)
    except MalformedInputError:
        fail(404, f"no device {device_id[:80]!r}")


def _ok(value: Any, status: int = 200) -> tuple[Response, int]:
    return jsonify(value), status


# --------------------------------------------------------------------------------------------------
# JSON shapes
# --------------------------------------------------------------------------------------------------
def device_row_json(r: DeviceRow) -> dict[str, Any]:
    return {"id": r.id, "state": r.state, "device_class": r.device_class,
            "firmware_version": r.firmware_version, "last_verdict": r.last_verdict,
            "last_attestation_at": r.last_attestation_at,
            "trusted_until": r.trusted_until, "state_changed_at": r.state_changed_at}


def _pcrs_json(text: str | None) -> dict[str, dict[str, str]] | None:
    if not text:
        return None
    try:
        value = json.loads(text)
        return {str(bank): {str(p): str(v) for p, v in vals.items()} for bank, vals in value.items()}
    except (ValueError, AttributeError, TypeError):
        return None


def device_json(d: DeviceRecord, svc: ConsoleServices) -> dict[str, Any]:
    record, _ = policy_for(svc.repo, d)
    blobs = svc.queries.device_identity_blobs(d.id)
    identity = identity_of(*blobs) if blobs is not None else None
    runtime = svc.repo.models.runtime(d.id)
    return {
        "id": d.id, "state": d.state, "device_class": d.device_class, "firmware_version": d.firmware_version,
        "state_reasons": list(d.state_reasons), "state_changed_at": d.state_changed_at,
        "created_at": d.created_at, "updated_at": d.updated_at, "last_attestation_at": d.last_attestation_at,
        "last_verdict": d.last_verdict, "trusted_until": d.trusted_until,
        "next_attestation_at": d.next_attestation_at, "missed_challenges": d.missed_challenges,
        "cert_serial": d.cert_serial, "ek_fingerprint": d.ek_fingerprint, "held_log_size": d.held_log_size,
        "boot": {"reset_count": d.boot_reset_count, "restart_count": d.boot_restart_count},
        "pcrs": _pcrs_json(d.last_pcrs),
        "policy": None if record is None else {"id": record.header.id, "name": record.header.name,
                                               "active": record.header.active},
        "identity": None if identity is None else {
            "ek_subject": identity.ek_subject, "ek_issuer": identity.ek_issuer,
            "ek_serial": identity.ek_serial,
            "ek_not_before": identity.ek_not_before, "ek_not_after": identity.ek_not_after,
            "ak_name": identity.ak_name, "ak_key": identity.ak_key, "ak_sha256": identity.ak_sha256},
        "onnxruntime": None if runtime is None else {"version": runtime[0], "reported_at": runtime[1]},
        "model_loads": [load_json(x) for x in svc.repo.models.loads(device_id=d.id)],
        **device_release_json(svc, d.id),
    }


def load_json(r: LoadRecord) -> dict[str, Any]:
    return {"device_id": r.device_id, "name": r.name, "version": r.version, "state": r.state,
            "error": r.error, "onnxruntime": r.onnxruntime, "reported_at": r.reported_at}


def device_release_json(svc: ConsoleServices, device_id: str) -> dict[str, Any]:
    """The release a device's evidence last matched, and its newest assignment (update progress)."""
    running = svc.repo.releases.attested_release(device_id)
    newest = svc.repo.releases.assignments(device_id=device_id, limit=1)
    return {"release": None if running is None else running.target,
            "update": releases.assignment_json(newest[0]) if newest else None}


def attestation_json(a: AttestationRow) -> dict[str, Any]:
    return {"id": a.id, "device_id": a.device_id, "challenge_id": a.challenge_id, "issued_at": a.issued_at,
            "received_at": a.received_at, "stored_at": a.stored_at, "latency_ms": a.latency_ms,
            "verdict": a.verdict, "reasons": list(a.reasons), "evidence_sha256": a.evidence_sha256.hex(),
            "policy_id": a.policy_id, "reset_count": a.reset_count, "restart_count": a.restart_count}


def policy_header_json(h: PolicyHeader) -> dict[str, Any]:
    return {"id": h.id, "name": h.name, "device_class": h.device_class,
            "firmware_version": h.firmware_version, "reference_sha256": h.reference_sha256,
            "selection": {bank: list(pcrs) for bank, pcrs in h.selection.items()},
            "created_at": h.created_at, "created_by": h.created_by, "active": h.active}


def policy_json(record: PolicyRecord) -> dict[str, Any]:
    try:
        reference = json.loads(record.reference)
    except ValueError:
        reference = {}
    return {**policy_header_json(record.header),
            "reference": reference if isinstance(reference, dict) else {}}


def version_json(v: VersionRecord) -> dict[str, Any]:
    try:
        policy: dict[str, Any] | None = dict(policy_from_text(v.policy).to_json())
    except ConfigError:
        policy = None
    try:
        manifest = json.loads(v.manifest)
    except ValueError:
        manifest = {}
    return {"name": v.name, "version": v.version, "package_id": v.package_id, "package_size": v.package_size,
            "package_sha256": v.package_sha256.hex(), "plaintext_size": v.plaintext_size,
            "plaintext_sha256": v.plaintext_sha256.hex(), "ciphertext_sha256": v.ciphertext_sha256.hex(),
            "signing_key_id": v.signing_key_id, "kek_id": v.kek_id, "created_at": v.created_at,
            "created_by": v.created_by, "deployed_at": v.deployed_at, "deployed_by": v.deployed_by,
            "policy": policy,
            "manifest": manifest if isinstance(manifest, dict) else {}}


def entitlement_json(e: EntitlementRecord) -> dict[str, Any]:
    return {"kind": e.kind, "subject": e.subject, "created_at": e.created_at, "created_by": e.created_by}


def lease_json(x: LeaseRecord) -> dict[str, Any]:
    return {"lease_id": x.lease_id, "device_id": x.device_id, "version": x.version, "state": x.state,
            "issued_at": x.issued_at, "expires_at": x.expires_at, "renewed_at": x.renewed_at,
            "revoked_at": x.revoked_at, "reason": x.reason}


def alert_json(a: AlertRow) -> dict[str, Any]:
    try:
        details = json.loads(a.details)
    except ValueError:
        details = {}
    return {"id": a.id, "kind": a.kind, "severity": a.severity, "device_id": a.device_id, "model": a.model,
            "message": a.message, "details": details if isinstance(details, dict) else {}, "status": a.status,
            "count": a.count, "created_at": a.created_at, "last_seen_at": a.last_seen_at,
            "acknowledged_by": a.acknowledged_by, "acknowledged_at": a.acknowledged_at,
            "resolved_by": a.resolved_by, "resolved_at": a.resolved_at}


def audit_json(r: AuditRecord) -> dict[str, Any]:
    return {"seq": r.seq, "at": r.at, "actor": r.actor, "action": r.action, "target": r.target,
            "details": r.details_dict(), "prev_hash": r.prev_hash, "hash": r.hash}


def transition_json(t: admin.StateTransition) -> dict[str, Any]:
    return {"device_id": t.device_id, "from_state": t.from_state, "to_state": t.to_state,
            "messages_queued": t.messages, "cert_serial": t.cert_serial}


# --------------------------------------------------------------------------------------------------
# meta
# --------------------------------------------------------------------------------------------------
@bp.get("/openapi.json")
@public
def openapi() -> Response:
    from fleet_server.console.openapi import document

    Query()
    return jsonify(document())


@bp.get("/whoami")
@login_required
def whoami() -> tuple[Response, int]:
    Query()
    principal = _principal()
    try:
        rights = sorted(r.value for r in MATRIX[Role(principal.role)])
    except ValueError:
        rights = []
    return _ok({"name": principal.name, "kind": principal.kind, "role": principal.role, "rights": rights})


# --------------------------------------------------------------------------------------------------
# devices
# --------------------------------------------------------------------------------------------------
@bp.get("/devices")
@require(Right.VIEW_FLEET)
def list_devices() -> tuple[Response, int]:
    q = Query("q", "state", "device_class", "firmware_version", "model", "after", "limit")
    f = DeviceFilter(q=q.text("q", pattern=re.compile(r"[A-Za-z0-9-]{1,63}"), max_len=63),
                     state=q.text("state", choices=[s.value for s in DeviceState], max_len=16),
                     device_class=q.text("device_class", pattern=NAME_RE),
                     firmware=q.text("firmware_version", pattern=NAME_RE),
                     model=q.text("model", pattern=MODEL_NAME_RE),
                     after=q.text("after", pattern=DEVICE_ID_RE, max_len=63), limit=q.limit())
    page = services().queries.devices_page(f)
    return _ok({"items": [device_row_json(r) for r in page.rows], "total": page.total,
                "next_after": page.last_id if page.has_next else None})


def _device(device_id: str) -> DeviceRecord:
    found = services().repo.device(_device_id(device_id))
    if found is None:
        fail(404, f"no device {device_id!r}")
    return found


@bp.get("/devices/<device_id>")
@require(Right.VIEW_FLEET)
def get_device(device_id: str) -> tuple[Response, int]:
    Query()
    return _ok(device_json(_device(device_id), services()))


@bp.get("/devices/<device_id>/attestations")
@require(Right.VIEW_FLEET)
def device_attestations(device_id: str) -> tuple[Response, int]:
    q = Query("before", "limit")
    before, limit = q.integer("before", lo=1, hi=MAX_ID), q.limit(20)
    found = _device(device_id)
    rows = services().queries.attestations(device_id=found.id, before_id=before, limit=limit)
    return _ok({"items": [attestation_json(a) for a in rows],
                "next_before": rows[-1].id if len(rows) == limit else None})


@bp.get("/devices/<device_id>/history")
@require(Right.VIEW_FLEET)
def device_history(device_id: str) -> tuple[Response, int]:
    q = Query("limit")
    limit = q.limit(50)
    found = _device(device_id)
    return _ok({"items": [{"at": h.at, "from_state": h.from_state, "to_state": h.to_state, "cause": h.cause}
                          for h in services().repo.state_history(found.id, limit=limit)]})


@bp.get("/devices/<device_id>/eventlog")
@require(Right.VIEW_FLEET)
def device_eventlog(device_id: str) -> tuple[Response, int]:
    Query()
    svc = services()
    found = _device(device_id)
    record, policy = policy_for(svc.repo, found)
    latest = svc.repo.attestations(found.id, limit=1)
    reasons = latest[0].reasons if latest else found.state_reasons
    raw = svc.queries.held_log(found.id)
    events, error = [], None
    if raw:
        try:
            events = mark_events(parse_eventlog(raw), policy, failing_from_reasons(reasons))
        except EdgeError as exc:
            error = exc.diagnostics()
    return _ok({"device_id": found.id, "held": bool(raw), "error": error,
                "policy": None if record is None else {"id": record.header.id, "name": record.header.name},
                "bank": policy.bank if policy is not None else DEFAULT_BANK,
                "problems": sum(1 for e in events if e.status in ("differs", "extra", "missing")),
                "events": [{"index": e.index, "pcr": e.pcr, "type": e.type_name, "description": e.description,
                            "digest": e.digest, "reference_digest": e.reference_digest, "status": e.status,
                            "blamed": e.blamed, "failing": e.failing} for e in events]})


def _device_action(device_id: str, action: str, run: Callable[[ConsoleServices, Principal, str], Any],
                   **details: Any) -> tuple[Response, int]:
    svc, principal = services(), _principal()
    found = _device(device_id)
    try:
        transition: admin.StateTransition = run(svc, principal, found.id)
    except admin.AdminError as exc:
        fail(409, exc.diagnostics())
    if action in ("approve", "revoke"):
        details = {**details, "crl": svc.refresh_crl()}
    svc.record(principal, f"device.{action}", f"device:{found.id}",
               {"from": transition.from_state, "to": transition.to_state, "messages": transition.messages,
                **details, **({"cert_serial": transition.cert_serial} if action == "approve" else {})})
    return _ok(transition_json(transition))


def _reason(body: Body) -> str:
    return " ".join((body.text("reason", max_len=MAX_REASON) or "").split())


@bp.post("/devices/<device_id>/approve")
@require(Right.APPROVE)
def approve_device(device_id: str) -> tuple[Response, int]:
    Query()
    Body(optional=True)

    def run(svc: ConsoleServices, principal: Principal, dev: str) -> admin.StateTransition:
        try:
            fleet_ca = svc.fleet_ca()
        except ConfigError as exc:
            _log_unavailable("fleet CA", exc)
            fail(503, "this server cannot sign device certificates right now (see the server log)")
        return admin.approve_device(svc.repo, dev, signer=_signer(svc), fleet_ca=fleet_ca, now=svc.now(),
                                    actor=principal.actor)

    return _device_action(device_id, "approve", run)


@bp.post("/devices/<device_id>/unquarantine")
@require(Right.APPROVE)
def unquarantine_device(device_id: str) -> tuple[Response, int]:
    Query()
    Body(optional=True)

    def run(svc: ConsoleServices, principal: Principal, dev: str) -> admin.StateTransition:
        try:
            fleet_ca = svc.fleet_ca()
        except ConfigError as exc:
            _log_unavailable("fleet CA", exc)
            fail(503, "this server cannot sign device certificates right now (see the server log)")
        return admin.unquarantine_device(svc.repo, dev, signer=_signer(svc), fleet_ca=fleet_ca, now=svc.now(),
                                         actor=principal.actor)

    return _device_action(device_id, "unquarantine", run)


@bp.post("/devices/<device_id>/revoke")
@require(Right.REVOKE)
def revoke_device(device_id: str) -> tuple[Response, int]:
    Query()
    reason = _reason(Body("reason", optional=True))
    return _device_action(device_id, "revoke", lambda svc, p, dev: admin.revoke_device(
        svc.repo, dev, signer=_signer(svc), now=svc.now(), reason=reason, actor=p.actor), reason=reason)


@bp.post("/devices/<device_id>/quarantine")
@require(Right.QUARANTINE)
def quarantine_device(device_id: str) -> tuple[Response, int]:
    Query()
    reason = _reason(Body("reason", optional=True))
    return _device_action(device_id, "quarantine", lambda svc, p, dev: admin.quarantine_device(
        svc.repo, dev, signer=_signer(svc), now=svc.now(), reason=reason, actor=p.actor), reason=reason)


@bp.post("/devices/<device_id>/reattest")
@require(Right.REATTEST)
def reattest(device_id: str) -> tuple[Response, int]:
    Query()
    Body(optional=True)
    return _device_action(device_id, "reattest", lambda svc, p, dev: reattest_device(svc.repo, dev,
                                                                                        now=svc.now()))


# --------------------------------------------------------------------------------------------------
# attestations
# --------------------------------------------------------------------------------------------------
@bp.get("/attestations")
@require(Right.VIEW_FLEET)
def list_attestations() -> tuple[Response, int]:
    q = Query("device", "verdict", "since", "until", "before", "limit")
    device = q.text("device", pattern=DEVICE_ID_RE, max_len=63)
    verdict = q.text("verdict", choices=VERDICTS, max_len=16)
    since, until = q.integer("since", lo=0, hi=MAX_TIME), q.integer("until", lo=0, hi=MAX_TIME)
    before, limit = q.integer("before", lo=1, hi=MAX_ID), q.limit(50)
    rows = services().queries.attestations(device_id=device, verdict=verdict, since=since, until=until,
                                           before_id=before, limit=limit)
    return _ok({"items": [attestation_json(a) for a in rows],
                "next_before": rows[-1].id if len(rows) == limit else None})


# --------------------------------------------------------------------------------------------------
# policies
# --------------------------------------------------------------------------------------------------
@bp.get("/policies")
@require(Right.VIEW_FLEET)
def list_policies() -> tuple[Response, int]:
    q = Query("active")
    active = q.text("active", choices=("true", "false"), max_len=5)
    headers = services().repo.policies()
    if active:
        headers = [h for h in headers if h.active == (active == "true")]
    return _ok({"items": [policy_header_json(h) for h in headers]})


@bp.get(f"/policies/<{ID}:policy_id>")
@require(Right.VIEW_FLEET)
def get_policy(policy_id: int) -> tuple[Response, int]:
    Query()
    record = services().repo.policy(policy_id=policy_id)
    if record is None:
        fail(404, f"no policy {policy_id}")
    return _ok(policy_json(record))


@bp.post("/policies")
@require(Right.EDIT_POLICIES)
def create_policy() -> tuple[Response, int]:
    Query()
    svc, principal = services(), _principal()
    body = Body("device", "name", "device_class", "firmware_version", "pcrs", "replace")
    device_id = body.text("device", required=True, pattern=DEVICE_ID_RE, max_len=63)
    name = body.text("name", required=True, pattern=NAME_RE)
    device_class = body.text("device_class", pattern=NAME_RE)
    firmware = body.text("firmware_version", pattern=NAME_RE)
    pcrs, replace = body.pcrs("pcrs"), body.flag("replace")
    assert device_id is not None and name is not None
    device = svc.repo.device(device_id)
    if device is None:
        fail(400, f"'device': no device {device_id!r}")
    if not replace and svc.repo.policy(name=name) is not None:
        fail(409, f"a policy named {name!r} already exists (set \"replace\": true to replace it)")
    raw = svc.queries.held_log(device.id)
    if not raw:
        fail(409, f"the server holds no event log of device {device.id} (it has not been attested in its "
                  "current boot)")
    try:
        policy = policy_from_eventlog(parse_eventlog(raw), name=name,
                                      device_class=device_class or device.device_class,
                                      firmware_version=firmware or device.firmware_version, bank=DEFAULT_BANK,
                                      pcrs=pcrs)
    except MalformedInputError as exc:
        fail(400, exc.diagnostics())
    stored = admin.store_policy(svc.repo, policy, now=svc.now(), created_by=principal.actor, replace=replace)
    svc.record(principal, "policy.create", f"policy:{stored.name}",
               {"id": stored.id, "sha256": stored.sha256, "from_device": device.id,
                "device_class": policy.device_class, "firmware_version": policy.firmware_version,
                "replace": replace})
    record = svc.repo.policy(policy_id=stored.id)
    assert record is not None
    return _ok(policy_json(record), 201)


# --------------------------------------------------------------------------------------------------
# releases
# --------------------------------------------------------------------------------------------------
MAX_ASSIGN_DEVICES = 1000


def _release(release_id: int) -> ReleaseRecord:
    found = services().repo.releases.release_by_id(release_id)
    if found is None:
        fail(404, f"no release {release_id}")
    return found


def _release_json(rec: ReleaseRecord) -> dict[str, Any]:
    return {"id": rec.id, **releases.release_json(rec)}


@bp.get("/releases")
@require(Right.VIEW_FLEET)
def list_releases() -> tuple[Response, int]:
    Query()
    return _ok({"items": [_release_json(r) for r in services().repo.releases.releases()]})


@bp.get(f"/releases/<{ID}:release_id>")
@require(Right.VIEW_FLEET)
def get_release(release_id: int) -> tuple[Response, int]:
    limit = Query("limit").limit()
    rec = _release(release_id)
    assignments = services().repo.releases.assignments(release_id=rec.id, limit=limit)
    return _ok({**_release_json(rec), "assignments": [releases.assignment_json(a) for a in assignments]})


def _seconds(body: Body, key: str, default: float) -> float:
    value = body.value.get(key, default)
    if (not isinstance(value, int | float) or isinstance(value, bool)
            or not 0 <= value <= releases.MAX_DEADLINE_S):
        fail(400, f"{key!r}: a number of seconds from 0 to {releases.MAX_DEADLINE_S:.0f}")
    return float(value)


@bp.post(f"/releases/<{ID}:release_id>/assign")
@require(Right.DEPLOY)
def assign_release(release_id: int) -> tuple[Response, int]:
    Query()
    svc, principal = services(), _principal()
    body = Body("devices", "deadline_s", "grace_s")
    devices = body.value.get("devices")
    if (not isinstance(devices, list) or not devices or len(devices) > MAX_ASSIGN_DEVICES
            or not all(isinstance(d, str) and DEVICE_ID_RE.fullmatch(d) for d in devices)):
        fail(400, f"'devices': a list of 1-{MAX_ASSIGN_DEVICES} device ids")
    deadline_s = _seconds(body, "deadline_s", releases.DEFAULT_DEADLINE_S)
    grace_s = _seconds(body, "grace_s", releases.DEFAULT_GRACE_S)
    rec = _release(release_id)
    try:
        done = releases.assign_release(svc.repo, rec.target, devices, signer=_signer(svc), now=svc.now(),
                                       deadline_s=deadline_s, grace_s=grace_s, actor=principal.actor)
    except releases.ReleaseError as exc:
        fail(409, exc.diagnostics())
    except MalformedInputError as exc:
        fail(400, exc.diagnostics())
    svc.record(principal, "release.assign", f"release:{rec.target}",
               {"devices": [a.device_id for a in done], "deadline": done[0].deadline,
                "assignments": [a.assignment_id for a in done]})
    return _ok({"target": rec.target, "assignments": [
        {"assignment_id": a.assignment_id, "device_id": a.device_id, "deadline": a.deadline} for a in done]})


# --------------------------------------------------------------------------------------------------
# rollouts (firmware: fleet:deploy; model versions: model:deploy too)
# --------------------------------------------------------------------------------------------------
MAX_GROUP_DEVICES = 10_000


def _rollout_view(rollout_id: str) -> rollouts.RolloutView:
    svc = services()
    if rollouts.ROLLOUT_ID_RE.fullmatch(rollout_id) is None or svc.repo.rollouts.rollout(rollout_id) is None:
        fail(404, f"no rollout {rollout_id[:40]!r}")
    return rollouts.view(svc.repo, rollout_id, now=svc.now())


def _rollout_summary(v: rollouts.RolloutView) -> dict[str, Any]:
    return {k: val for k, val in rollouts.view_json(v).items() if k != "members"}


@bp.get("/rollouts")
@require(Right.VIEW_FLEET)
def list_rollouts() -> tuple[Response, int]:
    state = Query("state").text("state", pattern=ROLLOUT_STATE_RE, max_len=16)
    svc = services()
    found = svc.repo.rollouts.rollouts([state] if state else None)
    return _ok({"items": [_rollout_summary(rollouts.view(svc.repo, r.id, now=svc.now())) for r in found]})


@bp.get("/rollouts/<rollout_id>")
@require(Right.VIEW_FLEET)
def get_rollout(rollout_id: str) -> tuple[Response, int]:
    Query()
    return _ok(rollouts.view_json(_rollout_view(rollout_id)))


def _strings(value: Any, key: str, pattern: re.Pattern[str], most: int) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > most or not all(
            isinstance(v, str) and pattern.fullmatch(v) for v in value):
        fail(400, f"{key!r}: a list of at most {most} strings matching {pattern.pattern}")
    return tuple(value)


def _group(value: Any, release: ReleaseRecord | None) -> Group:
    if not isinstance(value, dict):
        fail(400, "'group': an object with class, firmware, tags, devices")
    unknown = sorted(set(value) - {"class", "firmware", "tags", "devices"})
    if unknown:
        fail(400, f"'group': unknown key {unknown[0][:40]!r} (it takes class, firmware, tags, devices)")
    if release is None and "class" not in value:
        fail(400, "'group.class': a model rollout's group names its device class")
    device_class = value.get("class", release.device_class if release else None)
    firmware = value.get("firmware")
    if not isinstance(device_class, str) or not NAME_RE.fullmatch(device_class):
        fail(400, "'group.class': a device class")
    if firmware is not None and (not isinstance(firmware, str) or not NAME_RE.fullmatch(firmware)):
        fail(400, "'group.firmware': a firmware version")
    return Group(device_class, firmware, _strings(value.get("tags", []), "group.tags", TAG_RE, 32),
                 _strings(value.get("devices", []), "group.devices", DEVICE_ID_RE, MAX_GROUP_DEVICES))


def _kind_right(kind: str) -> None:
    """A model rollout also needs model:deploy (a firmware one fleet:deploy, declared on the route)."""
    if kind == rollouts.MODEL and not _principal().can(Right.MODEL_DEPLOY):
        fail(403, "a model rollout needs the model:deploy right")


@dataclass(frozen=True, slots=True)
class _NewRollout:
    body: Body
    target: str | None
    model: tuple[str, str] | None
    rollout_id: str | None
    plan: Plan
    group: Group

    @property
    def label(self) -> str:
        if self.model is not None:
            return f"model {self.model[0]} {self.model[1]}"
        return self.target or ""


def _rollout_request(*extra: str) -> _NewRollout:
    """The body of a new rollout: release or model, id, group, plan (and ``extra`` keys)."""
    body = Body("release", "model", "id", "group", "plan", *extra)
    target = body.text("release", max_len=200)
    model_ref = body.value.get("model")
    if (target is None) == (model_ref is None):
        fail(400, "give 'release' (a firmware rollout) or 'model' (a model version), not both")
    model: tuple[str, str] | None = None
    if model_ref is not None:
        if not isinstance(model_ref, dict) or set(model_ref) != {"name", "version"} or not all(
                isinstance(model_ref[k], str) for k in ("name", "version")):
            fail(400, "'model': an object with name and version")
        name, version = model_ref["name"], model_ref["version"]
        if MODEL_NAME_RE.fullmatch(name) is None or VERSION_RE.fullmatch(version) is None:
            fail(400, "'model': a model name and version")
        model = (name, version)
    _kind_right(rollouts.MODEL if model is not None else rollouts.FIRMWARE)
    rollout_id = body.text("id", pattern=rollouts.ROLLOUT_ID_RE, max_len=32)
    plan_keys = body.value.get("plan", {})
    if not isinstance(plan_keys, dict):
        fail(400, "'plan': an object of plan keys (docs/rollouts.md)")
    try:
        plan = parse_plan(plan_keys)
    except RolloutError as exc:
        fail(400, exc.diagnostics())
    release = None
    if target is not None:
        release = services().repo.releases.release(target)
        if release is None:
            fail(404, f"no release {target[:200]!r}")
    else:
        assert model is not None
        if services().repo.models.version(*model) is None:
            fail(404, f"no published model {model[0]!r} version {model[1][:32]!r}")
    return _NewRollout(body, target, model, rollout_id, plan, _group(body.value.get("group", {}), release))


@bp.post("/rollouts/dry-run")
@require(Right.DEPLOY)
def plan_rollout() -> tuple[Response, int]:
    Query()
    new = _rollout_request()
    try:
        planned = rollouts.dry_run(services().repo, target=new.target, model=new.model, group=new.group,
                                   plan=new.plan, rollout_id=new.rollout_id)
    except RolloutError as exc:
        fail(409, exc.diagnostics())
    return _ok({"rollout_id": planned.rollout_id, "release": new.label, "phases": planned.phases})


@bp.post("/rollouts")
@require(Right.DEPLOY)
def create_rollout() -> tuple[Response, int]:
    Query()
    svc, principal = services(), _principal()
    new = _rollout_request("draft")
    try:
        rec = rollouts.create_rollout(svc.repo, target=new.target, model=new.model, group=new.group,
                                      plan=new.plan, now=svc.now(), actor=principal.actor,
                                      draft=new.body.flag("draft"), rollout_id=new.rollout_id)
    except RolloutError as exc:
        fail(409, exc.diagnostics())
    view = rollouts.view(svc.repo, rec.id, now=svc.now())
    svc.record(principal, "rollout.create", f"rollout:{rec.id}",
               {"release": new.label, "kind": rec.kind, "state": rec.state, "devices": len(view.members),
                "plan": new.plan.to_json(), "group": new.group.to_json()})
    return _ok(rollouts.view_json(view), 201)


def _rollout_action(rollout_id: str, action: str) -> tuple[Response, int]:
    svc, principal = services(), _principal()
    _kind_right(_rollout_view(rollout_id).rollout.kind)  # 404 first
    details: dict[str, Any] = {}
    try:
        if action == "pause":
            rollouts.pause(svc.repo, rollout_id, now=svc.now())
        elif action == "resume":
            rollouts.resume(svc.repo, rollout_id, now=svc.now())
        elif action == "cancel":
            rollouts.cancel(svc.repo, rollout_id, now=svc.now(), actor=principal.actor, signer=_signer(svc))
        elif action == "abort":
            rollouts.abort(svc.repo, rollout_id, signer=_signer(svc), now=svc.now(), actor=principal.actor)
        else:
            phase = Body("phase", optional=True).value.get("phase")
            if phase is not None and (not isinstance(phase, int) or isinstance(phase, bool)
                                      or not 0 <= phase <= 1000):
                fail(400, "'phase': a phase number")
            details["phase"] = rollouts.approve(svc.repo, rollout_id, now=svc.now(), actor=principal.actor,
                                                phase=phase)
    except RolloutError as exc:
        fail(409, exc.diagnostics())
    view = _rollout_view(rollout_id)
    svc.record(principal, f"rollout.{action}", f"rollout:{rollout_id}",
               {"state": view.rollout.state, **details})
    return _ok(rollouts.view_json(view))


@bp.post("/rollouts/<rollout_id>/pause")
@require(Right.DEPLOY)
def pause_rollout(rollout_id: str) -> tuple[Response, int]:
    Query()
    Body(optional=True)
    return _rollout_action(rollout_id, "pause")


@bp.post("/rollouts/<rollout_id>/resume")
@require(Right.DEPLOY)
def resume_rollout(rollout_id: str) -> tuple[Response, int]:
    Query()
    Body(optional=True)
    return _rollout_action(rollout_id, "resume")


@bp.post("/rollouts/<rollout_id>/approve")
@require(Right.DEPLOY)
def approve_rollout(rollout_id: str) -> tuple[Response, int]:
    Query()
    return _rollout_action(rollout_id, "approve")


@bp.post("/rollouts/<rollout_id>/cancel")
@require(Right.DEPLOY)
def cancel_rollout(rollout_id: str) -> tuple[Response, int]:
    Query()
    Body(optional=True)
    return _rollout_action(rollout_id, "cancel")


@bp.post("/rollouts/<rollout_id>/abort")
@require(Right.DEPLOY)
def abort_rollout(rollout_id: str) -> tuple[Response, int]:
    Query()
    Body(optional=True)
    return _rollout_action(rollout_id, "abort")


@bp.post("/devices/<device_id>/tags")
@require(Right.DEPLOY)
def tag_device(device_id: str) -> tuple[Response, int]:
    Query()
    svc, principal = services(), _principal()
    dev = _device_id(device_id)
    body = Body("add", "remove")
    add = _strings(body.value.get("add", []), "add", TAG_RE, 32)
    remove = _strings(body.value.get("remove", []), "remove", TAG_RE, 32)
    if not add and not remove:
        fail(400, "give tags to 'add' or 'remove'")
    if svc.repo.device(dev) is None:
        fail(404, f"no device {dev!r}")
    try:
        added = rollouts.tag_device(svc.repo, dev, add) if add else []
        removed = rollouts.untag_device(svc.repo, dev, remove) if remove else []
    except RolloutError as exc:
        fail(409, exc.diagnostics())
    svc.record(principal, "device.tag", f"device:{dev}", {"added": added, "removed": removed})
    return _ok({"device_id": dev, "tags": svc.repo.rollouts.tags(dev)})


# --------------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------------
@bp.get("/models")
@require(Right.MODEL_READ)
def list_models() -> tuple[Response, int]:
    Query()
    return _ok({"items": [{"name": m.name, "created_at": m.created_at, "versions": m.versions,
                           "newest": m.newest, "deployed": m.deployed, "entitlements": m.entitlements,
                           "active_leases": m.active_leases}
                          for m in services().repo.models.models()]})


def _model_name(name: str) -> str:
    model_ops.check_model_name(name)
    if services().repo.models.model(name) is None:
        fail(404, f"no model {name!r}")
    return name


@bp.get("/models/<name>")
@require(Right.MODEL_READ)
def get_model(name: str) -> tuple[Response, int]:
    q = Query("leases")
    limit = q.integer("leases", lo=0, hi=MAX_PAGE, default=50)
    svc = services()
    model = svc.repo.models.model(model_ops.check_model_name(name))
    if model is None:
        fail(404, f"no model {name!r}")
    leases = svc.repo.models.leases(name=name, limit=limit) if limit else []
    active = next((m.active_leases for m in svc.repo.models.models() if m.name == name), 0)
    return _ok({"name": model.name, "created_at": model.created_at, "created_by": model.created_by,
                "versions": [version_json(v) for v in svc.repo.models.versions(name)],
                "retired_versions": model_ops.retired_versions(svc.audit, name),
                "entitlements": [entitlement_json(e) for e in svc.repo.models.entitlements(name)],
                "active_leases": active, "leases": [lease_json(x) for x in leases],
                "load_failures": [load_json(x) for x in svc.repo.models.loads(name=name, state="failed")]})


def published_json(p: Published) -> dict[str, Any]:
    return {"name": p.name, "version": p.version, "package_id": p.package_id, "package_size": p.package_size,
            "package_sha256": p.package_sha256.hex(), "plaintext_size": p.plaintext_size,
            "io_signature": p.io_signature.to_json(), "policy": p.policy.to_json(),
            "signing_key_id": p.signing_key_id, "kek_id": p.kek_id}


UPLOAD_FIELDS = frozenset({"name", "version", "policy", "csrf_token"})


@bp.post("/models")
@require(Right.MODEL_WRITE)
def publish_model() -> tuple[Response, int]:
    Query()
    svc, principal = services(), _principal()
    if request.mimetype != "multipart/form-data":
        fail(400, "upload the model as multipart/form-data (fields: name, version, file, optional policy)")
    if "file" in request.form:
        fail(400, "'file': send the model as a file part (with a filename), not as a text field")
    unknown = sorted((set(request.form) - UPLOAD_FIELDS) | (set(request.files) - {"file"}))
    if unknown:
        fail(400, f"unknown form field {unknown[0][:40]!r} (this operation takes: name, version, file, "
                  "policy)")
    for key in (*request.form, *request.files):
        if len(request.form.getlist(key)) + len(request.files.getlist(key)) > 1:
            fail(400, f"form field {key!r} is given more than once")
    name = request.form.get("name", "")
    version = request.form.get("version", "")
    if not MODEL_NAME_RE.fullmatch(name):
        fail(400, f"'name': must match {MODEL_NAME_RE.pattern}")
    if not VERSION_RE.fullmatch(version):
        fail(400, "'version': MAJOR.MINOR.PATCH (numbers without leading zeros)")
    upload = model_ops.upload_file()
    if upload is None:
        fail(400, "'file': the ONNX model file is required")
    try:
        data = upload.stream.read(svc.settings.max_upload_bytes + 1)
    finally:
        upload.close()
    if len(data) > svc.settings.max_upload_bytes:
        fail(413, f"the model file is larger than {svc.settings.max_upload_mib} MiB")
    policy = model_ops.parse_policy_json(request.form.get("policy", ""))
    published = model_ops.publish_upload(svc.config, svc.repo, svc.audit, name=name, version=version,
                                         model=data, policy=policy, now=svc.now(), actor=principal.actor)
    del data
    svc.record(principal, "model.publish", f"model:{published.name}", model_ops.publish_details(published))
    return _ok(published_json(published), 201)


@bp.url_value_preprocessor
def _upload_limit(endpoint: str | None, values: dict[str, Any] | None) -> None:
    # Before the application's request checks parse the body (see fleet_server.console.models).
    if endpoint == "api.publish_model":
        request.max_content_length = services().settings.max_upload_bytes + model_ops.UPLOAD_FORM_OVERHEAD


def _version(name: str, version: str) -> VersionRecord:
    model_ops.check_model_name(name)
    model_ops.check_model_version(name, version)
    found = services().repo.models.version(name, version)
    if found is None:
        fail(404, f"model {name} has no version {version}")
    return found


@bp.get("/models/<name>/versions/<version>")
@require(Right.MODEL_READ)
def get_version(name: str, version: str) -> tuple[Response, int]:
    Query()
    return _ok(version_json(_version(name, version)))


@bp.patch("/models/<name>/versions/<version>/policy")
@require(Right.MODEL_WRITE)
def update_policy(name: str, version: str) -> tuple[Response, int]:
    Query()
    svc, principal = services(), _principal()
    found = _version(name, version)
    body = Body(*model_ops.FIELDS)
    if not body.value:
        fail(400, "name at least one policy key to change")
    try:
        settings = model_ops.settings_from_json(body.value, policy_from_text(found.policy))
        change = model_admin.set_policy(svc.repo, name, settings, version=version, now=svc.now(),
                                        actor=principal.actor, signer=_signer(svc),
                                        may_loosen=principal.can(Right.MODEL_DEPLOY))
    except model_admin.LooseningRefused as exc:
        fail(403, exc.diagnostics())
    except ConfigError as exc:
        fail(400, exc.diagnostics())
    except model_admin.ModelAdminError as exc:  # retired meanwhile
        fail(404, exc.diagnostics())
    svc.record(principal, "model.policy", f"model:{name}", model_ops.policy_change_details(change))
    return _ok({"name": name, "version": version, "before": change.before.to_json(),
                "after": change.after.to_json(), "superseded": change.superseded})


@bp.post("/models/<name>/versions/<version>/deploy")
@require(Right.MODEL_DEPLOY)
def deploy_version(name: str, version: str) -> tuple[Response, int]:
    Query()
    svc, principal = services(), _principal()
    _version(name, version)
    try:
        deployment = model_ops.deploy_version(svc, principal, name, version)
    except model_ops.ModelActionError as exc:
        fail(exc.status, exc.diagnostics())
    return _ok({"name": name, "version": version, "deployed": deployment.deployed,
                "previous": deployment.previous})


def _retirement_json(r: model_ops.Retirement) -> dict[str, Any]:
    return {"name": r.name,
            "versions": [{"version": v.version, "package_id": v.package_id,
                          "package_sha256": v.package_sha256, "file_removed": v.package_removed}
                         for v in r.versions],
            "leases_revoked": len(r.leases_revoked),
            "devices_denied": sorted({x.device_id for x in r.leases_revoked}),
            "entitlements_removed": r.entitlements_removed, "model_removed": r.model_removed}


@bp.delete("/models/<name>/versions/<version>")
@require(Right.MODEL_DELETE)
def retire_version(name: str, version: str) -> tuple[Response, int]:
    Query()
    svc, principal = services(), _principal()
    retirement = model_ops.retire_version(svc.repo, PackageStore(svc.config.models.store_dir), name=name,
                                          version=version, signer=_signer(svc), now=svc.now(),
                                          actor=principal.actor)
    svc.record(principal, "model.retire_version", f"model:{name}", retirement.audit_details())
    return _ok(_retirement_json(retirement))


@bp.delete("/models/<name>")
@require(Right.MODEL_DELETE)
def retire_model(name: str) -> tuple[Response, int]:
    Query()
    svc, principal = services(), _principal()
    retirement = model_ops.retire_model(svc.repo, PackageStore(svc.config.models.store_dir), name=name,
                                        signer=_signer(svc), now=svc.now(), actor=principal.actor)
    svc.record(principal, "model.retire", f"model:{name}", retirement.audit_details())
    return _ok(_retirement_json(retirement))


def _subject(kind: str, subject: str) -> dict[str, str]:
    if kind == EntitlementKind.DEVICE:
        if not DEVICE_ID_RE.fullmatch(subject):
            fail(400, f"not a device id: {subject[:80]!r}")
        try:
            validate_device_id(subject)
        except MalformedInputError as exc:
            fail(400, exc.diagnostics())
    elif kind == EntitlementKind.CLASS:
        if not NAME_RE.fullmatch(subject):
            fail(400, f"not a device class: {subject[:80]!r}")
    else:
        fail(400, "kind: 'device' or 'class'")
    return model_ops.entitlement_subject(kind, subject)


@bp.post("/models/<name>/entitlements")
@require(Right.MODEL_DEPLOY)
def entitle(name: str) -> tuple[Response, int]:
    Query()
    svc, principal = services(), _principal()
    _model_name(name)
    body = Body("kind", "subject")
    kind = body.text("kind", required=True, max_len=8)
    subject = body.text("subject", required=True)
    assert kind is not None and subject is not None
    try:
        created = model_admin.entitle(svc.repo, name, **_subject(kind, subject), now=svc.now(),
                                      actor=principal.actor)
    except model_admin.ModelAdminError as exc:  # retired meanwhile
        fail(404, exc.diagnostics())
    svc.record(principal, "model.entitle", f"model:{name}",
               {"kind": kind, "subject": subject, "created": created})
    return _ok({"name": name, "kind": kind, "subject": subject, "created": created}, 201 if created else 200)


@bp.delete("/models/<name>/entitlements/<kind>/<subject>")
@require(Right.MODEL_DEPLOY)
def withdraw(name: str, kind: str, subject: str) -> tuple[Response, int]:
    Query()
    svc, principal = services(), _principal()
    _model_name(name)
    if kind not in (EntitlementKind.DEVICE, EntitlementKind.CLASS):
        fail(404, f"no entitlement kind {kind[:20]!r} (device or class)")
    try:
        who = _subject(kind, subject)
    except ApiError:  # nothing by that name can be entitled
        fail(404, f"{kind} {subject[:80]!r} has no entitlement to model {name}")
    try:
        result = model_admin.revoke_entitlement(svc.repo, name, signer=_signer(svc), now=svc.now(),
                                                actor=principal.actor, **who)
    except model_admin.ModelAdminError as exc:
        fail(404, exc.diagnostics())
    if not result.removed:
        fail(404, f"{kind} {subject} has no entitlement to model {name}")
    svc.record(principal, "model.withdraw", f"model:{name}",
               model_ops.withdrawal_details(kind, subject, result))
    return _ok({"name": name, "kind": kind, "subject": subject, "leases_revoked": len(result.revoked),
                "devices_denied": sorted({x.device_id for x in result.revoked})})


# --------------------------------------------------------------------------------------------------
# alerts
# --------------------------------------------------------------------------------------------------
@bp.get("/alerts")
@require(Right.VIEW_FLEET)
def list_alerts() -> tuple[Response, int]:
    q = Query("status", "kind", "device", "limit", "offset")
    status = q.text("status", choices=ALERT_STATUSES, max_len=16, default="active")
    kind = q.text("kind", pattern=re.compile(r"[a-z0-9_.-]{1,48}"), max_len=48)
    device = q.text("device", pattern=DEVICE_ID_RE, max_len=63)
    limit, offset = q.limit(50), q.integer("offset", lo=0, hi=1_000_000, default=0)
    rows, total = services().queries.alerts(status="" if status == "all" else status, kind=kind,
                                            device_id=device, limit=limit, offset=offset or 0)
    return _ok({"items": [alert_json(a) for a in rows], "total": total})


def _alert(alert_id: int) -> AlertRow:
    found = services().queries.alert(alert_id)
    if found is None:
        fail(404, f"no alert {alert_id}")
    return found


@bp.get(f"/alerts/<{ID}:alert_id>")
@require(Right.VIEW_FLEET)
def get_alert(alert_id: int) -> tuple[Response, int]:
    Query()
    return _ok(alert_json(_alert(alert_id)))


def _alert_step(alert_id: int, action: str) -> tuple[Response, int]:
    Query()
    Body(optional=True)
    svc, principal = services(), _principal()
    _alert(alert_id)
    step = alerting.acknowledge_alert if action == "acknowledge" else alerting.resolve_alert
    try:
        with svc.repo.write(f"{action} an alert") as tx:
            before = step(tx.conn, alert_id, by=principal.actor, now=svc.now())
    except alerting.AlertStateError as exc:
        fail(409, str(exc))
    alert = _alert(alert_id)
    svc.record(principal, f"alert.{action}", f"alert:{alert_id}",
               {"from": before, "kind": alert.kind, "device_id": alert.device_id})
    return _ok(alert_json(alert))


@bp.post(f"/alerts/<{ID}:alert_id>/acknowledge")
@require(Right.MANAGE_ALERTS)
def acknowledge_alert(alert_id: int) -> tuple[Response, int]:
    return _alert_step(alert_id, "acknowledge")


@bp.post(f"/alerts/<{ID}:alert_id>/resolve")
@require(Right.MANAGE_ALERTS)
def resolve_alert(alert_id: int) -> tuple[Response, int]:
    return _alert_step(alert_id, "resolve")


# --------------------------------------------------------------------------------------------------
# audit log
# --------------------------------------------------------------------------------------------------
@bp.get("/audit")
@require(Right.VIEW_AUDIT)
def list_audit() -> tuple[Response, int]:
    q = Query("actor", "action", "target", "before", "limit")
    actor = q.text("actor", pattern=ACTOR_RE, max_len=96)
    action = q.text("action", pattern=re.compile(r"[a-z0-9_.]{1,64}"), max_len=64)
    target = q.text("target", max_len=256)
    before, limit = q.integer("before", lo=1, hi=MAX_ID), q.limit(50)
    entries = services().audit.entries(before_seq=before, limit=limit, actor=actor or None,
                                       action=action or None, target=target or None)
    return _ok({"items": [audit_json(r) for r in entries],
                "next_before": entries[-1].seq if len(entries) == limit else None})


@bp.post("/audit/verify")
@require(Right.VIEW_AUDIT)
def verify_audit() -> tuple[Response, int]:
    Query()
    Body(optional=True)
    svc, principal = services(), _principal()
    report = svc.audit.verify()
    svc.record(principal, "audit.verify", "audit", {"ok": report.ok, "entries": report.entries,
                                                    "first_bad_seq": report.first_bad_seq})
    return _ok({"ok": report.ok, "entries": report.entries, "last_seq": report.last_seq,
                "first_bad_seq": report.first_bad_seq, "reason": report.reason, "summary": report.summary()})


