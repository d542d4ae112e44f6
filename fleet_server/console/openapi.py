"""The OpenAPI 3.1 description of ``/api/v1`` (:mod:`fleet_server.console.api`), served at
``/api/v1/openapi.json`` without authentication (it holds no data: clients need it before they
hold a token).

One description, written here once: :data:`OPERATIONS` (method, path, the view's endpoint, the
right it requires, parameters, body, responses) and :data:`SCHEMAS` (the JSON shapes).
:func:`document` assembles the OpenAPI document from them. ``tests/test_console_api.py`` checks
that every ``/api/v1`` rule of the application's URL map is an operation here and vice versa, and
that each operation's ``x-required-right`` is the right its view declares;
``tests/test_console_schemathesis.py`` runs schemathesis over every operation against the document.
Nothing beyond the standard library is needed at run time.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fleet_server.console.rbac import AUTHENTICATED, PUBLIC, Declared, Right
from fleet_server.storage.models import AlertStatus, DeviceState
from fleet_server.storage.release_tables import AssignmentState
from fleet_server.storage.rollout_tables import MemberState, RolloutState
from protocol.messages import OUTPUT_MODES

__all__ = ["OPERATIONS", "PREFIX", "SCHEMAS", "Operation", "document"]

PREFIX = "/api/v1"
OPENAPI_VERSION = "3.1.0"
API_VERSION = "1.0.0"
MAX_ID = (1 << 63) - 1
MAX_PAGE = 200

Schema = dict[str, Any]


# --------------------------------------------------------------------------------------------------
# schema helpers
# --------------------------------------------------------------------------------------------------
def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: Schema) -> Schema:
    """``schema`` or null (OpenAPI 3.1: JSON Schema 2020-12)."""
    if "$ref" in schema:
        return {"anyOf": [schema, {"type": "null"}]}
    out = dict(schema)
    out["type"] = [schema["type"], "null"]
    return out


def obj(properties: Mapping[str, Schema], *, required: Sequence[str] | None = None,
        description: str | None = None) -> Schema:
    """A closed object; every property required unless ``required`` says otherwise."""
    out: Schema = {"type": "object", "properties": dict(properties),
                   "required": list(properties if required is None else required),
                   "additionalProperties": False}
    if description:
        out["description"] = description
    return out


def array(items: Schema, **extra: Any) -> Schema:
    return {"type": "array", "items": items, **extra}


STR: Schema = {"type": "string"}
INT: Schema = {"type": "integer"}
BOOL: Schema = {"type": "boolean"}
TIME: Schema = {"type": "integer", "description": "milliseconds since the Unix epoch"}
HEX: Schema = {"type": "string", "pattern": "^[0-9a-f]*$"}
FREE_OBJECT: Schema = {"type": "object"}
DEVICE_ID: Schema = {"type": "string", "pattern": "^[a-z0-9][a-z0-9-]{0,62}$", "maxLength": 63}
NAME: Schema = {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$", "maxLength": 64}
MODEL_NAME: Schema = {"type": "string", "pattern": "^[a-z0-9][a-z0-9._-]{0,63}$", "maxLength": 64}
_PART = "(0|[1-9][0-9]{0,8})"
VERSION: Schema = {"type": "string", "pattern": f"^{_PART}\\.{_PART}\\.{_PART}$", "maxLength": 32}
STATE: Schema = {"type": "string", "enum": [s.value for s in DeviceState]}
REASON: Schema = {"type": "string", "maxLength": 200}
COUNT: Schema = {"type": "integer", "minimum": 0}

POLICY_KEYS: dict[str, Schema] = {
    "output_mode": {"type": "string", "enum": list(OUTPUT_MODES)},
    "k": {"type": "integer", "minimum": 1, "maximum": 1000},
    "decimals": {"type": "integer", "minimum": 0, "maximum": 6},
    "labels": array({"type": "string", "maxLength": 128}, maxItems=10_000),
    "max_batch": {"type": "integer", "minimum": 1, "maximum": 65_536},
    "client_rate": {"type": "integer", "minimum": 1, "maximum": 1_000_000},
    "client_burst": {"type": "integer", "minimum": 1, "maximum": 1_000_000},
    "client_daily_quota": {"type": ["integer", "null"], "minimum": 0, "maximum": 1 << 62},
    "device_daily_quota": {"type": ["integer", "null"], "minimum": 0, "maximum": 1 << 62},
    "lease_quota": {"type": ["integer", "null"], "minimum": 0, "maximum": 1 << 62},
    "block_on_alarm": BOOL,
}

ROLLOUT_ID: Schema = {"type": "string", "pattern": "^[a-z0-9][a-z0-9._-]{0,31}$", "maxLength": 32}
TAG: Schema = {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$", "maxLength": 64}
ROLLOUT_STATE: Schema = {"type": "string", "enum": [s.value for s in RolloutState]}
MEMBER_STATE: Schema = {"type": "string", "enum": [s.value for s in MemberState]}
_ROLLOUT: dict[str, Schema] = {
    "id": STR, "kind": {"type": "string", "enum": ["firmware", "model"]},
    "release": {**nullable(STR), "description": "a firmware rollout's release target"},
    "model": {**nullable(obj({"name": MODEL_NAME, "version": STR})),
              "description": "a model rollout's version"},
    "state": ROLLOUT_STATE,
    "phase": {**COUNT, "description": "the phase executing (0: the canary)"},
    "reason": {**STR, "description": "why it was aborted or cancelled"},
    "waiting": {**STR, "description": "why no device is assigned now (approval, window, rate), or empty"},
    "created_at": TIME, "created_by": STR, "started_at": nullable(TIME), "finished_at": nullable(TIME),
    "abort_trigger_at": {**nullable(TIME), "description": "when the failure that crossed the abort "
                                                         "threshold happened"},
    "group": ref("RolloutGroup"), "phases": array(ref("RolloutPhase"))}

SCHEMAS: dict[str, Schema] = {
    "Error": obj({"error": STR, "status": INT, "detail": STR},
                 description="Every error: a short code (`bad_request`, `forbidden`, ...), the HTTP status "
                             "and a sentence saying what was wrong."),
    "WhoAmI": obj({"name": STR, "kind": {"type": "string", "enum": ["user", "token"]}, "role": STR,
                   "rights": array(STR)}),
    "DeviceSummary": obj({"id": DEVICE_ID, "state": STATE, "device_class": STR, "firmware_version": STR,
                          "last_verdict": nullable(STR), "last_attestation_at": nullable(TIME),
                          "trusted_until": nullable(TIME), "state_changed_at": TIME}),
    "DeviceList": obj({"items": array(ref("DeviceSummary")), "total": COUNT,
                       "next_after": {**nullable(STR), "description": "pass as `after` for the next page"}}),
    "Device": obj({
        "id": DEVICE_ID, "state": STATE, "device_class": STR, "firmware_version": STR,
        "state_reasons": array(STR), "state_changed_at": TIME, "created_at": TIME, "updated_at": TIME,
        "last_attestation_at": nullable(TIME), "last_verdict": nullable(STR), "trusted_until": nullable(TIME),
        "next_attestation_at": nullable(TIME), "missed_challenges": COUNT, "cert_serial": nullable(STR),
        "ek_fingerprint": STR, "held_log_size": COUNT,
        "boot": obj({"reset_count": nullable(INT), "restart_count": nullable(INT)}),
        "pcrs": {"type": ["object", "null"], "additionalProperties": {"type": "object",
                                                                      "additionalProperties": STR},
                 "description": "latest quoted PCR values: bank -> PCR index -> hex"},
        "policy": nullable(obj({"id": INT, "name": STR, "active": BOOL})),
        "identity": nullable(obj({"ek_subject": STR, "ek_issuer": STR, "ek_serial": STR, "ek_not_before": STR,
                                  "ek_not_after": STR, "ak_name": STR, "ak_key": STR, "ak_sha256": STR})),
        "onnxruntime": {**nullable(obj({"version": STR, "reported_at": TIME})),
                        "description": "the inference runtime the device's agent reports"},
        "model_loads": array(ref("ModelLoad")),
        "release": {**nullable(STR),
                    "description": "the release (TUF target) its last trusted evidence matched"},
        "update": {**nullable(ref("Assignment")), "description": "its newest release assignment"},
    }),
    "ModelLoad": obj({"device_id": DEVICE_ID, "name": MODEL_NAME, "version": STR,
                      "state": {"type": "string", "enum": ["loaded", "failed"]},
                      "error": {**STR, "description": "onnxruntime's own reason when the load failed"},
                      "onnxruntime": STR, "reported_at": TIME},
                     description="a device's latest report of loading one model version"),
    "Assignment": obj({"assignment_id": STR, "device_id": STR, "target": STR, "version": STR,
                       "state": {"type": "string", "enum": [s.value for s in AssignmentState]},
                       "reason": STR, "deadline": TIME, "created_at": TIME, "updated_at": TIME,
                       "committed_at": nullable(TIME), "grace_until": nullable(TIME)}),
    "Release": obj({"id": INT, "target": STR, "device_class": STR, "version": STR,
                    "state": {"type": "string", "enum": ["active", "withdrawn"]}, "bundle_sha256": HEX,
                    "bundle_length": COUNT, "reference_sha256": HEX, "created_at": TIME, "created_by": STR,
                    "withdrawn_at": nullable(TIME)}),
    "ReleaseList": obj({"items": array(ref("Release"))}),
    "NewAssignment": obj({"devices": array(DEVICE_ID, minItems=1, maxItems=1000),
                          "deadline_s": {"type": "number", "minimum": 0, "maximum": 30 * 86_400,
                                         "description": "seconds to commit (default 3600)"},
                          "grace_s": {"type": "number", "minimum": 0, "maximum": 30 * 86_400,
                                      "description": "seconds the previous values stay acceptable after "
                                                     "the commit (default 86400)"}},
                         required=["devices"]),
    "Assigned": obj({"target": STR, "assignments": array(obj({"assignment_id": STR, "device_id": STR,
                                                               "deadline": TIME}))}),
    "RolloutPhase": obj({"devices": COUNT, "succeeded": COUNT, "failed": COUNT, "pending": COUNT,
                         "assigned": COUNT, "approved": BOOL},
                        description="One phase (index 0: the canary); `failed` counts every failure kind"),
    "RolloutGroup": obj({"class": STR, "firmware": nullable(STR), "tags": array(STR), "devices": array(STR)}),
    "Rollout": obj(_ROLLOUT),
    "RolloutDetail": obj({**_ROLLOUT, "members": array(obj({
        "device_id": STR, "phase": COUNT, "state": MEMBER_STATE, "attempts": COUNT,
        "assignment_id": nullable(STR), "reason": STR, "assigned_at": nullable(TIME),
        "finished_at": nullable(TIME)}))}),
    "RolloutList": obj({"items": array(ref("Rollout"))}),
    "NewRollout": obj({
        "release": {"type": "string", "maxLength": 200,
                    "description": "the release's target (a firmware rollout; fleet:deploy)"},
        "model": obj({"name": MODEL_NAME, "version": VERSION},
                     description="the published model version (a model rollout, instead of `release`; "
                                 "needs model:deploy)"),
        "id": {**ROLLOUT_ID, "description": "the rollout's id (default: random)"},
        "group": obj({"class": NAME, "firmware": NAME, "tags": array(TAG, maxItems=32),
                      "devices": array(DEVICE_ID, maxItems=10_000)}, required=[],
                     description="the target group: every criterion given must match"),
        "plan": {"type": "object",
                 "description": "the plan's keys (docs/rollouts.md): canary, canary_devices, phases, "
                                "phase_counts, abort_failure_percent, min_executed, abort_on, "
                                "device_timeout_s, retries, max_rate, approval, window, ..."},
        "draft": {**BOOL, "description": "store it as a draft (resume starts it)"}},
        required=[]),
    "RolloutPlan": obj({"rollout_id": STR, "release": STR, "phases": array(array(STR))}, required=[],
                       description="the device ids of each phase (index 0: the canary)"),
    "Approval": obj({"phase": {"type": "integer", "minimum": 0, "maximum": 1000}}, required=[]),
    "DeviceTags": obj({"add": array(TAG, maxItems=32), "remove": array(TAG, maxItems=32)}, required=[]),
    "Tags": obj({"device_id": DEVICE_ID, "tags": array(STR)}),
    "Attestation": obj({"id": INT, "device_id": STR, "challenge_id": STR, "issued_at": TIME,
                        "received_at": TIME, "stored_at": TIME, "latency_ms": INT,
                        "verdict": STR, "reasons": array(STR), "evidence_sha256": HEX,
                        "policy_id": nullable(INT), "reset_count": nullable(INT),
                        "restart_count": nullable(INT)}),
    "AttestationList": obj({"items": array(ref("Attestation")),
                            "next_before": {**nullable(INT),
                                            "description": "pass as `before` for the next page"}}),
    "StateHistory": obj({"items": array(obj({"at": TIME, "from_state": nullable(STR), "to_state": STR,
                                             "cause": STR}))}),
    "EventLog": obj({
        "device_id": STR, "held": BOOL, "error": nullable(STR),
        "policy": nullable(obj({"id": INT, "name": STR})), "bank": STR, "problems": COUNT,
        "events": array(obj({"index": nullable(INT), "pcr": INT, "type": STR, "description": STR,
                             "digest": HEX, "reference_digest": HEX,
                             "status": {"type": "string", "enum": ["match", "differs", "extra", "missing",
                                                                   "value_only", "not_covered",
                                                                   "not_measured"]},
                             "blamed": BOOL, "failing": BOOL})),
    }, description="The held boot event log, each event marked against the reference values; `failing` "
                   "events are those the latest attestation's reasons name."),
    "Transition": obj({"device_id": STR, "from_state": STR, "to_state": STR,
                       "messages_queued": {**COUNT, "description": "signed messages written to the outbox"},
                       "cert_serial": nullable(STR)}),
    "Reason": obj({"reason": REASON}, required=[]),
    "PolicyHeader": obj({"id": INT, "name": STR, "device_class": STR, "firmware_version": STR,
                         "reference_sha256": STR,
                         "selection": {"type": "object", "additionalProperties": array(INT)},
                         "created_at": TIME, "created_by": STR, "active": BOOL}),
    "PolicyList": obj({"items": array(ref("PolicyHeader"))}),
    "NewPolicy": obj({"device": DEVICE_ID, "name": NAME, "device_class": NAME, "firmware_version": NAME,
                      "pcrs": array({"type": "integer", "minimum": 0, "maximum": 23}, minItems=1, maxItems=24,
                                    uniqueItems=True),
                      "replace": BOOL}, required=["device", "name"],
                     description="A policy from the event log the server holds for `device`; class and "
                                 "firmware version default to the device's."),
    "ModelPolicy": obj(POLICY_KEYS),
    "PolicyPatch": {**obj(POLICY_KEYS, required=[]), "minProperties": 1},
    "ModelSummary": obj({"name": MODEL_NAME, "created_at": TIME, "versions": COUNT, "newest": nullable(STR),
                         "deployed": nullable(STR), "entitlements": COUNT, "active_leases": COUNT}),
    "ModelList": obj({"items": array(ref("ModelSummary"))}),
    "Version": obj({"name": MODEL_NAME, "version": STR, "package_id": STR, "package_size": INT,
                    "package_sha256": HEX, "plaintext_size": INT, "plaintext_sha256": HEX,
                    "ciphertext_sha256": HEX, "signing_key_id": STR, "kek_id": STR, "created_at": TIME,
                    "created_by": STR, "deployed_at": nullable(TIME), "deployed_by": STR,
                    "policy": nullable(ref("ModelPolicy")), "manifest": FREE_OBJECT}),
    "Entitlement": obj({"kind": {"type": "string", "enum": ["device", "class"]}, "subject": STR,
                        "created_at": TIME, "created_by": STR}),
    "Lease": obj({"lease_id": STR, "device_id": STR, "version": STR, "state": STR, "issued_at": TIME,
                  "expires_at": TIME, "renewed_at": nullable(TIME), "revoked_at": nullable(TIME),
                  "reason": STR}),
    "Model": obj({"name": MODEL_NAME, "created_at": TIME, "created_by": STR,
                  "versions": array(ref("Version")),
                  "retired_versions": array(STR), "entitlements": array(ref("Entitlement")),
                  "active_leases": COUNT, "leases": array(ref("Lease")),
                  "load_failures": array(ref("ModelLoad"))}),
    "Upload": obj({"name": MODEL_NAME, "version": VERSION, "file": {"type": "string", "format": "binary"},
                   "policy": {"type": "string", "description": "optional JSON object of usage-policy keys"}},
                  required=["name", "version", "file"]),
    "Published": obj({"name": MODEL_NAME, "version": STR, "package_id": STR, "package_size": INT,
                      "package_sha256": HEX, "plaintext_size": INT, "io_signature": FREE_OBJECT,
                      "policy": ref("ModelPolicy"), "signing_key_id": STR, "kek_id": STR}),
    "Deployment": obj({"name": STR, "version": STR,
                       "deployed": {**BOOL, "description": "false if it was already deployed"},
                       "previous": nullable(STR)}),
    "PolicyChange": obj({"name": STR, "version": STR, "before": ref("ModelPolicy"),
                         "after": ref("ModelPolicy"),
                         "superseded": {**COUNT, "description": "active leases superseded"}}),
    "Retirement": obj({"name": STR,
                       "versions": array(obj({"version": STR, "package_id": STR, "package_sha256": HEX,
                                              "file_removed": BOOL})),
                       "leases_revoked": COUNT, "devices_denied": array(STR), "entitlements_removed": COUNT,
                       "model_removed": BOOL}),
    "NewEntitlement": obj({"kind": {"type": "string", "enum": ["device", "class"]},
                           "subject": {"type": "string", "maxLength": 64,
                                       "description": "a device id, or a device class"}}),
    "EntitlementResult": obj({"name": STR, "kind": STR, "subject": STR, "created": BOOL}),
    "Withdrawal": obj({"name": STR, "kind": STR, "subject": STR, "leases_revoked": COUNT,
                       "devices_denied": array(STR)}),
    "Alert": obj({"id": INT, "kind": STR, "severity": STR, "device_id": nullable(STR), "model": nullable(STR),
                  "message": STR, "details": FREE_OBJECT,
                  "status": {"type": "string", "enum": [s.value for s in AlertStatus]},
                  "count": INT, "created_at": TIME, "last_seen_at": TIME, "acknowledged_by": nullable(STR),
                  "acknowledged_at": nullable(TIME), "resolved_by": nullable(STR),
                  "resolved_at": nullable(TIME)}),
    "AlertList": obj({"items": array(ref("Alert")), "total": COUNT}),
    "AuditEntry": obj({"seq": INT, "at": TIME, "actor": STR, "action": STR, "target": STR,
                       "details": FREE_OBJECT, "prev_hash": STR, "hash": STR}),
    "AuditList": obj({"items": array(ref("AuditEntry")), "next_before": nullable(INT)}),
    "AuditReport": obj({"ok": BOOL, "entries": COUNT, "last_seq": COUNT, "first_bad_seq": nullable(INT),
                        "reason": STR, "summary": STR}),
}


# --------------------------------------------------------------------------------------------------
# parameters
# --------------------------------------------------------------------------------------------------
def path_param(name: str, schema: Schema, example: Any, description: str = "") -> Schema:
    out: Schema = {"name": name, "in": "path", "required": True, "schema": schema, "example": example}
    if description:
        out["description"] = description
    return out


def query(name: str, schema: Schema, description: str) -> Schema:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


LIMIT = query("limit", {"type": "integer", "minimum": 1, "maximum": MAX_PAGE}, "page size")
ID_SCHEMA: Schema = {"type": "integer", "minimum": 0, "maximum": MAX_ID}
P_DEVICE = path_param("device_id", {"type": "string", "maxLength": 200}, "cam-0001")
P_POLICY = path_param("policy_id", ID_SCHEMA, 1)
P_MODEL = path_param("name", {"type": "string", "maxLength": 200}, "classifier")
P_VERSION = path_param("version", {"type": "string", "maxLength": 64}, "1.0.0")
P_ALERT = path_param("alert_id", ID_SCHEMA, 1)
P_RELEASE = path_param("release_id", ID_SCHEMA, 1)
P_ROLLOUT = path_param("rollout_id", {"type": "string", "maxLength": 200}, "r1")
P_KIND = path_param("kind", {"type": "string", "maxLength": 16}, "class", "`device` or `class`")
P_SUBJECT = path_param("subject", {"type": "string", "maxLength": 200}, "edge-camera",
                       "the device id or device class")


# --------------------------------------------------------------------------------------------------
# operations
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Operation:
    """One API operation: what the view (``endpoint``) serves and what the description says of it."""

    method: str
    path: str                     # OpenAPI form, below PREFIX: "/devices/{device_id}"
    endpoint: str                 # Flask endpoint of the view: "api.get_device"
    right: Declared
    tag: str
    summary: str
    ok: tuple[int, str]           # success status, response schema name ("" for a free object)
    parameters: tuple[Schema, ...] = ()
    body: str | None = None       # request schema name (JSON), "Upload" for multipart
    body_required: bool = True
    errors: tuple[int, ...] = ()  # besides 400, 401, 403 and 503 (and 404 with path parameters)
    description: str = ""
    extra_ok: tuple[int, ...] = ()


OPERATIONS: tuple[Operation, ...] = (
    Operation("get", "/openapi.json", "api.openapi", PUBLIC, "meta", "This description", (200, "")),
    Operation("get", "/whoami", "api.whoami", AUTHENTICATED, "meta", "Who the caller is: name, role, rights",
              (200, "WhoAmI")),
    # devices
    Operation("get", "/devices", "api.list_devices", Right.VIEW_FLEET, "devices",
              "Devices, filtered, by id (keyset pages)", (200, "DeviceList"), (
                  query("q", {"type": "string", "pattern": "^[A-Za-z0-9-]{1,63}$"}, "part of the device id"),
                  query("state", STATE, "only devices in this state"),
                  query("device_class", NAME, "only this device class"),
                  query("firmware_version", NAME, "only this firmware version"),
                  query("model", MODEL_NAME, "only devices holding an active lease of this model"),
                  query("after", DEVICE_ID, "the page after this device id (`next_after`)"), LIMIT)),
    Operation("get", "/devices/{device_id}", "api.get_device", Right.VIEW_FLEET, "devices",
              "One device: state, attestation, identity, policy", (200, "Device"), (P_DEVICE,)),
    Operation("get", "/devices/{device_id}/attestations", "api.device_attestations", Right.VIEW_FLEET,
              "devices", "A device's attestation results, newest first", (200, "AttestationList"),
              (P_DEVICE, query("before", ID_SCHEMA, "results older than this id (`next_before`)"), LIMIT)),
    Operation("get", "/devices/{device_id}/history", "api.device_history", Right.VIEW_FLEET, "devices",
              "A device's state changes, newest first", (200, "StateHistory"), (P_DEVICE, LIMIT)),
    Operation("get", "/devices/{device_id}/eventlog", "api.device_eventlog", Right.VIEW_FLEET, "devices",
              "A device's boot event log marked against its policy", (200, "EventLog"), (P_DEVICE,)),
    Operation("post", "/devices/{device_id}/approve", "api.approve_device", Right.APPROVE, "devices",
              "Approve a pending (or re-admit a revoked, quarantined or untrusted) device",
              (200, "Transition"),
              (P_DEVICE,), errors=(409,),
              description="A pending device's certificate is signed and queued for it in the outbox."),
    Operation("post", "/devices/{device_id}/unquarantine", "api.unquarantine_device", Right.APPROVE,
              "devices",
              "Lift a quarantine: the device is enrolled and challenged at once", (200, "Transition"),
              (P_DEVICE,), errors=(409,)),
    Operation("post", "/devices/{device_id}/revoke", "api.revoke_device", Right.REVOKE, "devices",
              "Revoke a device (a signed revocation is queued)", (200, "Transition"), (P_DEVICE,), "Reason",
              body_required=False, errors=(409,)),
    Operation("post", "/devices/{device_id}/quarantine", "api.quarantine_device", Right.QUARANTINE, "devices",
              "Quarantine an attested device (a signed revocation is queued)", (200, "Transition"),
              (P_DEVICE,), "Reason", body_required=False, errors=(409,)),
    Operation("post", "/devices/{device_id}/tags", "api.tag_device", Right.DEPLOY, "devices",
              "Add or remove a device's tags (rollout target groups select by tag)", (200, "Tags"),
              (P_DEVICE,), "DeviceTags", errors=(409,)),
    Operation("post", "/devices/{device_id}/reattest", "api.reattest", Right.REATTEST, "devices",
              "Challenge an attested device at the scheduler's next round", (200, "Transition"), (P_DEVICE,),
              errors=(409,)),
    # attestations
    Operation("get", "/attestations", "api.list_attestations", Right.VIEW_FLEET, "attestations",
              "Attestation results of the fleet, newest first", (200, "AttestationList"), (
                  query("device", DEVICE_ID, "only this device"),
                  query("verdict", {"type": "string", "enum": ["trusted", "untrusted"]}, "only this verdict"),
                  query("since", {"type": "integer", "minimum": 0, "maximum": 1 << 53},
                        "stored at or after (ms)"),
                  query("until", {"type": "integer", "minimum": 0, "maximum": 1 << 53}, "stored before (ms)"),
                  query("before", ID_SCHEMA, "results older than this id (`next_before`)"), LIMIT)),
    # policies
    Operation("get", "/policies", "api.list_policies", Right.VIEW_FLEET, "policies",
              "Reference policies (without their values)", (200, "PolicyList"),
              (query("active", {"type": "string", "enum": ["true", "false"]}, "only (in)active ones"),)),
    Operation("post", "/policies", "api.create_policy", Right.EDIT_POLICIES, "policies",
              "A new active policy from a device's held event log", (201, "PolicyDetail"), (), "NewPolicy",
              errors=(409,)),
    Operation("get", "/policies/{policy_id}", "api.get_policy", Right.VIEW_FLEET, "policies",
              "One policy with its reference values and events", (200, "PolicyDetail"), (P_POLICY,)),
    # releases
    Operation("get", "/releases", "api.list_releases", Right.VIEW_FLEET, "releases",
              "Firmware releases, newest first", (200, "ReleaseList")),
    Operation("get", "/releases/{release_id}", "api.get_release", Right.VIEW_FLEET, "releases",
              "One release with its assignments (installation progress per device)", (200, "ReleaseDetail"),
              (P_RELEASE, LIMIT)),
    Operation("post", "/releases/{release_id}/assign", "api.assign_release", Right.DEPLOY, "releases",
              "Assign a release to devices of its class (a signed UpdateAssignment is queued for each)",
              (200, "Assigned"), (P_RELEASE,), "NewAssignment", errors=(409,),
              description="The release's reference values are accepted for a device from now until the "
                          "deadline, and for good once it commits; what it ran before stays acceptable "
                          "until the commit plus the grace."),
    # rollouts
    Operation("get", "/rollouts", "api.list_rollouts", Right.VIEW_FLEET, "rollouts",
              "Staged rollouts, newest first, with their progress per phase", (200, "RolloutList"),
              (query("state", ROLLOUT_STATE, "only rollouts in this state"),)),
    Operation("get", "/rollouts/{rollout_id}", "api.get_rollout", Right.VIEW_FLEET, "rollouts",
              "One rollout: progress per phase and every device", (200, "RolloutDetail"), (P_ROLLOUT,)),
    Operation("post", "/rollouts", "api.create_rollout", Right.DEPLOY, "rollouts",
              "Create and start (unless `draft`) a staged rollout of a firmware release or a model version",
              (201, "RolloutDetail"), (), "NewRollout", errors=(404, 409),
              description="The workers assign the devices, phase by phase."),
    Operation("post", "/rollouts/dry-run", "api.plan_rollout", Right.DEPLOY, "rollouts",
              "The devices each phase of a new rollout would take (nothing is stored)", (200, "RolloutPlan"),
              (), "PlannedRollout", errors=(404, 409),
              description="Creating the rollout with the answered `rollout_id` as `id` gives exactly this "
                          "split."),
    Operation("post", "/rollouts/{rollout_id}/pause", "api.pause_rollout", Right.DEPLOY, "rollouts",
              "Pause a running rollout (no new assignments)", (200, "RolloutDetail"), (P_ROLLOUT,),
              errors=(409,)),
    Operation("post", "/rollouts/{rollout_id}/resume", "api.resume_rollout", Right.DEPLOY, "rollouts",
              "Resume a paused rollout, or start a draft", (200, "RolloutDetail"), (P_ROLLOUT,),
              errors=(409,)),
    Operation("post", "/rollouts/{rollout_id}/approve", "api.approve_rollout", Right.DEPLOY, "rollouts",
              "Approve a phase (default: the first not approved yet)", (200, "RolloutDetail"), (P_ROLLOUT,),
              "Approval", body_required=False, errors=(409,)),
    Operation("post", "/rollouts/{rollout_id}/cancel", "api.cancel_rollout", Right.DEPLOY, "rollouts",
              "Stop a rollout for good (no alert, no rollback)", (200, "RolloutDetail"), (P_ROLLOUT,),
              errors=(409,)),
    Operation("post", "/rollouts/{rollout_id}/abort", "api.abort_rollout", Right.DEPLOY, "rollouts",
              "Abort a rollout: a critical alert; updated devices go back to their previous release if "
              "the plan says so", (200, "RolloutDetail"), (P_ROLLOUT,), errors=(409,)),
    # models
    Operation("get", "/models", "api.list_models", Right.MODEL_READ, "models", "Published models",
              (200, "ModelList")),
    Operation("post", "/models", "api.publish_model", Right.MODEL_WRITE, "models",
              "Publish an ONNX file as a new version (multipart upload)", (201, "Published"), (), "Upload",
              errors=(409, 413),
              description="The file is checked with onnx, encrypted under a fresh data key into a package "
                          "signed with the model-signing key; the plaintext upload is not kept. At most "
                          "`[console] max_upload_mib`. The version must be newer than every published or "
                          "retired version."),
    Operation("get", "/models/{name}", "api.get_model", Right.MODEL_READ, "models",
              "A model: versions with their policies, entitlements, leases", (200, "Model"),
              (P_MODEL, query("leases", {"type": "integer", "minimum": 0, "maximum": MAX_PAGE},
                              "how many of the newest leases (default 50)"))),
    Operation("delete", "/models/{name}", "api.retire_model", Right.MODEL_DELETE, "models",
              "Retire a model: every version and its entitlements", (200, "Retirement"), (P_MODEL,),
              errors=(409,),
              description="Refused (409) while a device holds an active lease of it."),
    Operation("get", "/models/{name}/versions/{version}", "api.get_version", Right.MODEL_READ, "models",
              "One version", (200, "Version"), (P_MODEL, P_VERSION)),
    Operation("delete", "/models/{name}/versions/{version}", "api.retire_version", Right.MODEL_DELETE,
              "models", "Retire a version: row, sealed data key and package file are removed",
              (200, "Retirement"), (P_MODEL, P_VERSION), errors=(409,),
              description="Refused (409) while a device holds an active lease of it; devices holding a "
                          "superseded lease get a signed key.denied."),
    Operation("patch", "/models/{name}/versions/{version}/policy", "api.update_policy", Right.MODEL_WRITE,
              "models", "Change keys of a version's usage policy", (200, "PolicyChange"),
              (P_MODEL, P_VERSION), "PolicyPatch",
              description="Active leases of the version are superseded; trusted holders are offered it again "
                          "and get the new policy with their next key release. A change that loosens "
                          "limits (higher quotas or rates, a more revealing output mode, alarm blocking "
                          "off) needs `model:deploy` (else 403)."),
    Operation("post", "/models/{name}/versions/{version}/deploy", "api.deploy_version", Right.MODEL_DEPLOY,
              "models", "Deploy a published version to the entitled devices", (200, "Deployment"),
              (P_MODEL, P_VERSION), errors=(409,),
              description="Publishing is not deploying: devices are offered the newest deployed version. "
                          "Refused (409) for a version older than the deployed one."),
    Operation("post", "/models/{name}/entitlements", "api.entitle", Right.MODEL_DEPLOY, "models",
              "Entitle a device or a device class", (201, "EntitlementResult"), (P_MODEL,), "NewEntitlement",
              extra_ok=(200,), description="201 if created, 200 if it already existed."),
    Operation("delete", "/models/{name}/entitlements/{kind}/{subject}", "api.withdraw", Right.MODEL_DEPLOY,
              "models", "Withdraw an entitlement", (200, "Withdrawal"), (P_MODEL, P_KIND, P_SUBJECT),
              description="Leases it no longer covers are revoked; each device gets a signed key.denied."),
    # alerts
    Operation("get", "/alerts", "api.list_alerts", Right.VIEW_FLEET, "alerts", "Alerts, newest first",
              (200, "AlertList"), (
                  query("status", {"type": "string", "enum": ["active", "open", "acknowledged", "resolved",
                                                              "all"]},
                        "default `active` (open or acknowledged)"),
                  query("kind", {"type": "string", "pattern": "^[a-z0-9_.-]{1,48}$"}, "only this kind"),
                  query("device", DEVICE_ID, "only this device"), LIMIT,
                  query("offset", {"type": "integer", "minimum": 0, "maximum": 1_000_000},
                        "skip this many"))),
    Operation("get", "/alerts/{alert_id}", "api.get_alert", Right.VIEW_FLEET, "alerts", "One alert",
              (200, "Alert"), (P_ALERT,)),
    Operation("post", "/alerts/{alert_id}/acknowledge", "api.acknowledge_alert", Right.MANAGE_ALERTS,
              "alerts", "Acknowledge an open alert", (200, "Alert"), (P_ALERT,), errors=(409,)),
    Operation("post", "/alerts/{alert_id}/resolve", "api.resolve_alert", Right.MANAGE_ALERTS, "alerts",
              "Resolve an open or acknowledged alert", (200, "Alert"), (P_ALERT,), errors=(409,)),
    # audit
    Operation("get", "/audit", "api.list_audit", Right.VIEW_AUDIT, "audit", "Audit log entries, newest first",
              (200, "AuditList"), (
                  query("actor", {"type": "string", "maxLength": 96}, "only this actor"),
                  query("action", {"type": "string", "pattern": "^[a-z0-9_.]{1,64}$"}, "only this action"),
                  query("target", {"type": "string", "maxLength": 256}, "only this target"),
                  query("before", ID_SCHEMA, "entries older than this seq (`next_before`)"), LIMIT)),
    Operation("post", "/audit/verify", "api.verify_audit", Right.VIEW_AUDIT, "audit",
              "Verify the audit log's hash chain", (200, "AuditReport")),
)

SCHEMAS["PlannedRollout"] = obj(
    {k: v for k, v in SCHEMAS["NewRollout"]["properties"].items() if k != "draft"}, required=[])
SCHEMAS["ReleaseDetail"] = obj({**SCHEMAS["Release"]["properties"], "assignments": array(ref("Assignment"))},
                               description="A release with its newest assignments.")
SCHEMAS["PolicyDetail"] = obj({**SCHEMAS["PolicyHeader"]["properties"], "reference": FREE_OBJECT},
                              description="A policy with its reference document (values and events).")

ERROR_TEXT = {400: "Invalid input (the detail names the parameter or key)", 401: "No valid credentials",
              403: "The caller's role lacks the right", 404: "No such thing",
              409: "Conflicts with the current state", 413: "The upload is too large",
              503: "The database (or a key this needs) is unavailable"}

TAGS = (("meta", "The description and the caller"), ("devices", "Devices and the fleet actions on them"),
        ("attestations", "Appraisal results"), ("policies", "Reference values"),
        ("releases", "Firmware releases and their assignment to devices"),
        ("rollouts", "Staged rollouts of firmware releases, gated on attestation"),
        ("models", "Protected models: publishing, policies, entitlements, retirement"),
        ("alerts", "Alerts and their handling"), ("audit", "The hash-chained audit log"))


DESCRIPTION = ("Devices, attestations, reference policies, protected models, alerts and the audit log of "
               "the fleet server, for automation. Authenticate with an API token (`Authorization: Bearer "
               "fst_...`); each operation names the right it needs (`x-required-right`) from the console's "
               "role matrix. Times are milliseconds since the Unix epoch. See docs/api.md.")


def _json(schema: Schema) -> Schema:
    return {"application/json": {"schema": schema}}


def _operation(op: Operation) -> Schema:
    out: Schema = {"operationId": op.endpoint.split(".", 1)[1], "summary": op.summary, "tags": [op.tag],
                   "x-required-right": str(op.right)}
    if op.description:
        out["description"] = op.description
    if op.parameters:
        out["parameters"] = [copy.deepcopy(p) for p in op.parameters]
    if op.body == "Upload":
        out["requestBody"] = {"required": True, "content": {"multipart/form-data": {
            "schema": ref("Upload"), "encoding": {"file": {"contentType": "application/octet-stream"}}}}}
    elif op.body is not None:
        out["requestBody"] = {"required": op.body_required, "content": _json(ref(op.body))}
    status, schema = op.ok
    ok_schema = ref(schema) if schema else FREE_OBJECT
    responses: dict[str, Any] = {str(status): {"description": "Success", "content": _json(ok_schema)}}
    for extra in op.extra_ok:
        responses[str(extra)] = {"description": "Success", "content": _json(ok_schema)}
    errors = {400, 503, *op.errors}
    if op.right != PUBLIC:
        errors |= {401}
    if isinstance(op.right, Right):
        errors |= {403}
    if any(p["in"] == "path" for p in op.parameters):
        errors |= {404}
    for code in sorted(errors):
        responses[str(code)] = {"description": ERROR_TEXT[code], "content": _json(ref("Error"))}
    out["responses"] = responses
    out["security"] = [] if op.right == PUBLIC else [{"bearerAuth": []}, {"sessionCookie": []}]
    return out


@functools.cache
def _document() -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        paths.setdefault(PREFIX + op.path, {})[op.method] = _operation(op)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": "Fleet server API", "version": API_VERSION,
                 "description": DESCRIPTION},
        "servers": [{"url": "/"}],
        "tags": [{"name": name, "description": text} for name, text in TAGS],
        "paths": paths,
        "components": {
            "schemas": copy.deepcopy(SCHEMAS),
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer",
                               "description": "An API token (`fleet-server token create`), bound to a role"},
                "sessionCookie": {"type": "apiKey", "in": "cookie", "name": "__Host-console_session",
                                  "description": "The console's session (state-changing calls then need the "
                                                 "`X-CSRF-Token` header); `console_session` when "
                                                 "`secure_cookies` is off"},
            },
        },
    }


def document() -> dict[str, Any]:
    """The OpenAPI document (a fresh copy; built once)."""
    return copy.deepcopy(_document())
