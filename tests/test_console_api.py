"""The JSON API (/api/v1) and the console's model actions: the description matches the routes, tokens
and sessions, strict input with JSON errors, devices, attestations, policies, models (publish, policy,
entitlements, retirement - and the plaintext upload never kept), alerts, the audit log; every
state-changing call audited."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from firmware_sim.testmodel import small_classifier
from fleet_server.console import openapi
from fleet_server.console.rbac import Right, required_of
from fleet_server.console.services import ConsoleServices
from fleet_server.service.common import ManualClock
from fleet_server.service.processor import Processor
from fleet_server.storage.model_repo import NewLease
from protocol import topics

pytest.register_assert_rewrite("console_fixtures", "browser_fixtures")
from browser_fixtures import MODEL, Fleet, publish_test_model, seed_fleet  # noqa: E402
from console_fixtures import csrf_of, login  # noqa: E402

pytest_plugins = ("console_fixtures",)

API = "/api/v1"


def bearer(svc: ConsoleServices, role: str, name: str | None = None) -> dict[str, str]:
    """An Authorization header with a new API token of ``role``."""
    _, secret = svc.accounts.create_token(name or f"t-{role}", role, created_by="test", now=svc.now())
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture
def fleet(svc: ConsoleServices, console_processor: Processor) -> Fleet:
    return seed_fleet(svc, console_processor)


@pytest.fixture
def admin_h(svc: ConsoleServices) -> dict[str, str]:
    return bearer(svc, "admin")


def _error(response: TestResponse, status: int, *fragments: str) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.data[:400])
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert set(body) == {"error", "status", "detail"} and body["status"] == status
    for fragment in fragments:
        assert fragment in body["detail"], body["detail"]
    assert b"Traceback" not in response.data
    return body


def _last_audit(svc: ConsoleServices) -> Any:
    return svc.audit.entries(limit=1)[0]


# --------------------------------------------------------------------------------------------------
# the description
# --------------------------------------------------------------------------------------------------
def _openapi_path(rule: str) -> str:
    return re.sub(r"<(?:[a-z]+(?:\([^)]*\))?:)?([a-z_]+)>", r"{\1}", rule)


def test_description_matches_the_routes_and_their_rights(app: Flask) -> None:
    routes = {(_openapi_path(r.rule), m.lower(), r.endpoint)
              for r in app.url_map.iter_rules() if r.rule.startswith(API + "/")
              for m in (r.methods or set()) - {"HEAD", "OPTIONS"}}
    described = {(openapi.PREFIX + op.path, op.method, op.endpoint) for op in openapi.OPERATIONS}
    assert routes == described
    for op in openapi.OPERATIONS:
        assert required_of(app.view_functions[op.endpoint]) == op.right, op.endpoint
    doc = app.test_client().get(f"{API}/openapi.json").get_json()
    assert doc["openapi"].startswith("3.1")
    assert {(p, m) for p, item in doc["paths"].items() for m in item} == {(p, m) for p, m, _ in described}
    assert doc["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer",
        "description": doc["components"]["securitySchemes"]["bearerAuth"]["description"]}
    # Every $ref resolves, every operation documents its errors as JSON.
    text = json.dumps(doc)
    for name in set(re.findall(r'"#/components/schemas/([A-Za-z]+)"', text)):
        assert name in doc["components"]["schemas"], name
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            assert "400" in operation["responses"], (path, method)
            assert operation["x-required-right"] in {*(r.value for r in Right), "public", "authenticated"}


def test_docs_list_every_operation_with_its_right() -> None:
    text = (Path(__file__).parent.parent / "docs" / "api.md").read_text()
    for op in openapi.OPERATIONS:
        assert f"| `{op.method.upper()} {openapi.PREFIX}{op.path}` | `{op.right}` |" in text, op.endpoint


# --------------------------------------------------------------------------------------------------
# authentication and input
# --------------------------------------------------------------------------------------------------
def test_tokens_sessions_and_refusals(client: FlaskClient, svc: ConsoleServices, users: dict[str, int],
                                      fleet: Fleet) -> None:
    anonymous = client.get(f"{API}/devices")
    _error(anonymous, 401)
    assert anonymous.headers["WWW-Authenticate"].startswith("Bearer")
    _error(client.get(f"{API}/devices", headers={"Authorization": "Bearer fst_not-a-token"}), 401)
    ds = bearer(svc, "data_scientist")
    who = client.get(f"{API}/whoami", headers=ds).get_json()
    assert who == {"name": "t-data_scientist", "kind": "token", "role": "data_scientist",
                   "rights": ["fleet:view", "model:read", "model:write"]}
    assert client.get(f"{API}/devices", headers=ds).status_code == 200
    _error(client.post(f"{API}/devices/{fleet.pending}/approve", headers=ds), 403)
    _error(client.get(f"{API}/audit", headers=ds), 403)
    # A revoked token is refused at once.
    token_id = next(t.id for t in svc.accounts.tokens() if t.name == "t-data_scientist")
    svc.accounts.revoke_token(token_id, now=svc.now())
    _error(client.get(f"{API}/devices", headers=ds), 401)
    # The console's session works for the API too; its state-changing calls need the CSRF header.
    csrf = login(client, "security")
    assert client.get(f"{API}/devices/{fleet.pending}").get_json()["state"] == "pending"
    _error(client.post(f"{API}/devices/{fleet.pending}/approve"), 400, "CSRF")
    ok = client.post(f"{API}/devices/{fleet.pending}/approve", headers={"X-CSRF-Token": csrf})
    assert ok.status_code == 200 and ok.get_json()["to_state"] == "enrolled"
    assert _last_audit(svc).actor == "security"


def test_strict_input_and_json_errors(client: FlaskClient, admin_h: dict[str, str], fleet: Fleet) -> None:
    _error(client.get(f"{API}/devices?colour=red", headers=admin_h), 400, "unknown query parameter 'colour'")
    _error(client.get(f"{API}/devices?limit=1&limit=2", headers=admin_h), 400, "more than once")
    _error(client.get(f"{API}/devices?limit=0", headers=admin_h), 400, "between 1 and 200")
    _error(client.get(f"{API}/devices?limit=abc", headers=admin_h), 400, "integer")
    _error(client.get(f"{API}/devices?state=happy", headers=admin_h), 400, "'state'")
    _error(client.get(f"{API}/devices?state=", headers=admin_h), 400, "empty")
    _error(client.get(f"{API}/devices/NOT_AN_ID", headers=admin_h), 404)
    _error(client.get(f"{API}/devices/cam-9999", headers=admin_h), 404, "no device")
    _error(client.get(f"{API}/policies/99999999999999999999999", headers=admin_h), 404)  # past BIGINT
    _error(client.get(f"{API}/nothing-here", headers=admin_h), 404)
    _error(client.put(f"{API}/devices", headers=admin_h), 405)
    url = f"{API}/devices/{fleet.trusted[0]}/revoke"
    _error(client.post(url, headers=admin_h, data="{", content_type="application/json"), 400,
           "not valid JSON")
    _error(client.post(url, headers=admin_h, data="[]", content_type="application/json"), 400, "JSON object")
    _error(client.post(url, headers=admin_h, data="reason=x", content_type="text/plain"), 400, "Content-Type")
    _error(client.post(url, headers=admin_h, json={"reason": "x", "why": 1}), 400, "unknown key 'why'")
    _error(client.post(url, headers=admin_h, json={"reason": 7}), 400, "expected a string")
    _error(client.post(url, headers=admin_h, json={"reason": "x" * 201}), 400, "at most 200")
    _error(client.post(url, headers=admin_h, json={"reason": "a\u0000b"}), 400)
    _error(client.post(url, headers=admin_h, data='{"reason": "\\ud800"}', content_type="application/json"),
           400, "Unicode")
    _error(client.post(url, headers=admin_h, data='{"reason": "a", "reason": "b"}',
                       content_type="application/json"), 400, "duplicate")
    _error(client.post(url, headers=admin_h, data='{"reason": NaN}', content_type="application/json"), 400)
    _error(client.post(url, headers=admin_h, data=b"{" + b" " * (2 << 20) + b"}",
                       content_type="application/json"), 413)
    assert client.get(f"{API}/devices/{fleet.trusted[0]}", headers=admin_h).get_json()["state"] == "trusted"


# --------------------------------------------------------------------------------------------------
# devices, attestations
# --------------------------------------------------------------------------------------------------
def test_device_list_filters_and_pages(client: FlaskClient, admin_h: dict[str, str], fleet: Fleet) -> None:
    seen: list[str] = []
    url = f"{API}/devices?limit=2"
    while True:
        page = client.get(url, headers=admin_h).get_json()
        assert page["total"] == 5
        seen += [d["id"] for d in page["items"]]
        if page["next_after"] is None:
            break
        url = f"{API}/devices?limit=2&after={page['next_after']}"
    assert seen == sorted([*fleet.trusted, fleet.tampered, fleet.pending])
    untrusted = client.get(f"{API}/devices?state=untrusted", headers=admin_h).get_json()
    assert [d["id"] for d in untrusted["items"]] == [fleet.tampered] and untrusted["total"] == 1
    assert untrusted["items"][0]["last_verdict"] == "untrusted"
    found = client.get(f"{API}/devices?q=066&device_class=edge-camera&firmware_version=1.2.0",
                       headers=admin_h).get_json()
    assert [d["id"] for d in found["items"]] == [fleet.tampered]


def test_device_detail_attestations_history_and_event_log(client: FlaskClient, admin_h: dict[str, str],
                                                          fleet: Fleet) -> None:
    bad = client.get(f"{API}/devices/{fleet.tampered}", headers=admin_h).get_json()
    assert bad["state"] == "untrusted" and bad["policy"]["id"] == fleet.policy_id
    assert any("PCR" in r for r in bad["state_reasons"])
    assert bad["identity"]["ek_subject"].startswith("2.5.4.5=tpm-cam-0666")
    assert bad["pcrs"]["sha256"]["4"]
    attestations = client.get(f"{API}/devices/{fleet.tampered}/attestations", headers=admin_h).get_json()
    [latest] = attestations["items"]
    assert latest["verdict"] == "untrusted" and latest["device_id"] == fleet.tampered
    assert re.fullmatch(r"[0-9a-f]{64}", latest["evidence_sha256"])
    history = client.get(f"{API}/devices/{fleet.tampered}/history", headers=admin_h).get_json()["items"]
    assert [h["to_state"] for h in history] == ["untrusted", "enrolled"]
    log = client.get(f"{API}/devices/{fleet.tampered}/eventlog", headers=admin_h).get_json()
    assert log["held"] and log["policy"]["id"] == fleet.policy_id and log["problems"] >= 1
    failing = [e for e in log["events"] if e["failing"]]
    assert failing and all(e["status"] == "differs" for e in failing)
    assert "initrd" in " ".join(e["description"] for e in failing).lower()
    good = client.get(f"{API}/devices/{fleet.trusted[0]}/eventlog", headers=admin_h).get_json()
    assert good["problems"] == 0 and not any(e["failing"] for e in good["events"])
    pending = client.get(f"{API}/devices/{fleet.pending}/eventlog", headers=admin_h).get_json()
    assert pending["held"] is False and pending["events"] == []
    fleetwide = client.get(f"{API}/attestations?verdict=trusted&limit=2", headers=admin_h).get_json()
    assert len(fleetwide["items"]) == 2 and {a["verdict"] for a in fleetwide["items"]} == {"trusted"}
    rest = client.get(f"{API}/attestations?verdict=trusted&before={fleetwide['next_before']}",
                      headers=admin_h).get_json()
    ids = [a["id"] for a in fleetwide["items"] + rest["items"]]
    assert len(ids) == 3 == len(set(ids)) and ids == sorted(ids, reverse=True)


def test_device_actions_change_state_queue_messages_and_are_audited(
        client: FlaskClient, svc: ConsoleServices, fleet: Fleet) -> None:
    sec = bearer(svc, "security", "sec-bot")
    before = len(svc.repo.outbox())
    approved = client.post(f"{API}/devices/{fleet.pending}/approve", headers=sec)
    assert approved.status_code == 200
    # A device without a CSR (pre-made in the test) needs no certificate: nothing to send.
    assert approved.get_json() == {"device_id": fleet.pending, "from_state": "pending",
                                   "to_state": "enrolled", "messages_queued": 0, "cert_serial": None}
    entry = _last_audit(svc)
    assert (entry.actor, entry.action, entry.target) == ("token:sec-bot", "device.approve",
                                                         f"device:{fleet.pending}")
    revoked = client.post(f"{API}/devices/{fleet.trusted[1]}/revoke", headers=sec,
                          json={"reason": "stolen  van"})
    assert revoked.get_json()["to_state"] == "revoked" and revoked.get_json()["messages_queued"] == 1
    assert svc.repo.device(fleet.trusted[1]).state == "revoked"  # type: ignore[union-attr]
    assert svc.repo.device(fleet.trusted[1]).state_reasons == ("stolen van",)  # type: ignore[union-attr]
    assert _last_audit(svc).details_dict()["reason"] == "stolen van"
    outbox = svc.repo.outbox()
    assert len(outbox) == before + 1
    assert outbox[-1].topic == topics.device_down(fleet.trusted[1], "revocation")
    _error(client.post(f"{API}/devices/{fleet.trusted[1]}/revoke", headers=sec), 409, "already revoked")
    quarantined = client.post(f"{API}/devices/{fleet.tampered}/quarantine", headers=sec)
    assert quarantined.get_json()["to_state"] == "quarantined"
    _error(client.post(f"{API}/devices/{fleet.trusted[1]}/quarantine", headers=sec), 409, "only attested")
    lifted = client.post(f"{API}/devices/{fleet.tampered}/unquarantine", headers=sec)
    assert lifted.get_json()["from_state"] == "quarantined" and lifted.get_json()["to_state"] == "enrolled"
    _error(client.post(f"{API}/devices/{fleet.tampered}/unquarantine", headers=sec), 409, "not quarantined")
    reattest = client.post(f"{API}/devices/{fleet.trusted[0]}/reattest", headers=sec)
    assert reattest.get_json()["to_state"] == "trusted"
    assert svc.repo.device(fleet.trusted[0]).next_attestation_at == svc.now()  # type: ignore[union-attr]
    _error(client.post(f"{API}/devices/cam-9999/revoke", headers=sec), 404)
    actions = [e.action for e in svc.audit.entries(actor="token:sec-bot")]
    assert actions == ["device.reattest", "device.unquarantine", "device.quarantine", "device.revoke",
                       "device.approve"]


# --------------------------------------------------------------------------------------------------
# policies
# --------------------------------------------------------------------------------------------------
def test_policies(client: FlaskClient, svc: ConsoleServices, admin_h: dict[str, str], fleet: Fleet) -> None:
    listed = client.get(f"{API}/policies", headers=admin_h).get_json()["items"]
    assert [p["name"] for p in listed] == ["edge-camera-1.2.0"] and listed[0]["active"]
    detail = client.get(f"{API}/policies/{fleet.policy_id}", headers=admin_h).get_json()
    assert detail["reference"]["name"] == "edge-camera-1.2.0" and detail["selection"]["sha256"]
    _error(client.get(f"{API}/policies/999", headers=admin_h), 404)
    body = {"device": fleet.trusted[0], "name": "cam-golden-2", "pcrs": [0, 4, 7]}
    created = client.post(f"{API}/policies", headers=admin_h, json=body)
    assert created.status_code == 201
    made = created.get_json()
    assert made["active"] and made["device_class"] == "edge-camera"
    assert made["selection"] == {"sha256": [0, 4, 7]}
    assert _last_audit(svc).action == "policy.create"
    assert not client.get(f"{API}/policies/{fleet.policy_id}", headers=admin_h).get_json()["active"]
    _error(client.post(f"{API}/policies", headers=admin_h, json=body), 409, "already exists")
    assert client.post(f"{API}/policies", headers=admin_h, json={**body, "replace": True}).status_code == 201
    _error(client.post(f"{API}/policies", headers=admin_h, json={**body, "pcrs": [0, 0]}), 400, "twice")
    _error(client.post(f"{API}/policies", headers=admin_h, json={**body, "pcrs": [24]}), 400, "PCR numbers")
    _error(client.post(f"{API}/policies", headers=admin_h, json={"name": "x"}), 400, "'device' is required")
    _error(client.post(f"{API}/policies", headers=admin_h, json={**body, "device": fleet.pending,
                                                                   "name": "p2"}), 409, "no event log")
    _error(client.post(f"{API}/policies", headers=admin_h, json={**body, "name": "bad name"}), 400, "'name'")
    _error(client.post(f"{API}/policies", headers=bearer(svc, "ml_engineer"), json=body), 403)


# --------------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------------
def _upload(client: FlaskClient, headers: dict[str, str], name: str, version: str,
            data: bytes | None = None, **extra: str) -> TestResponse:
    form: dict[str, Any] = {"name": name, "version": version, **extra,
                            "file": (io.BytesIO(small_classifier(1) if data is None else data), "model.onnx")}
    return client.post(f"{API}/models", headers=headers, data=form, content_type="multipart/form-data")


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_publish_policy_entitle_and_retire(client: FlaskClient, svc: ConsoleServices, fleet: Fleet,
                                           tmp_path: Path) -> None:
    ds, mle = bearer(svc, "data_scientist"), bearer(svc, "ml_engineer")
    prod = bearer(svc, "production_system")
    store = svc.config.models.store_dir
    published = _upload(client, ds, MODEL, "1.1.0", policy='{"output_mode": "topk", "k": 2}')
    assert published.status_code == 201, published.data
    info = published.get_json()
    assert info["policy"]["output_mode"] == "topk" and info["io_signature"]["inputs"][0]["name"] == "input"
    assert _files(store) == [f"{MODEL}/1.0.0.pkg", f"{MODEL}/1.1.0.pkg"]  # ciphertext only: no upload kept
    assert small_classifier(1) not in (store / MODEL / "1.1.0.pkg").read_bytes()
    entry = _last_audit(svc)
    assert (entry.action, entry.details_dict()["version"]) == ("model.publish", "1.1.0")
    _error(_upload(client, ds, MODEL, "1.1.0"), 409, "not newer")
    _error(_upload(client, ds, MODEL, "1.2.0", data=b"not onnx"), 400, "ONNX")
    _error(_upload(client, ds, MODEL, "1.2.0", policy='{"k": 0}'), 400, "policy")
    _error(_upload(client, ds, "Bad Name", "1.2.0"), 400, "'name'")
    _error(client.post(f"{API}/models", headers=ds, json={"name": MODEL}), 400, "multipart")
    _error(_upload(client, prod, MODEL, "1.2.0"), 403)

    model = client.get(f"{API}/models/{MODEL}", headers=prod).get_json()
    assert [v["version"] for v in model["versions"]] == ["1.1.0", "1.0.0"]
    assert model["entitlements"][0]["subject"] == "edge-camera"
    version = client.get(f"{API}/models/{MODEL}/versions/1.1.0", headers=prod).get_json()
    assert version["manifest"]["name"] == MODEL and version["policy"]["k"] == 2

    # Policy: model:write.
    _error(client.patch(f"{API}/models/{MODEL}/versions/1.1.0/policy", headers=prod, json={"k": 3}), 403)
    # Loosening (more top-k labels) needs model:deploy; tightening stays with model:write.
    _error(client.patch(f"{API}/models/{MODEL}/versions/1.1.0/policy", headers=ds, json={"k": 3}), 403,
           "model:deploy")
    change = client.patch(f"{API}/models/{MODEL}/versions/1.1.0/policy", headers=ds,
                          json={"k": 1, "lease_quota": 500, "labels": ["cat", "dog"]})
    assert change.status_code == 200
    assert change.get_json()["after"]["k"] == 1 and change.get_json()["after"]["labels"] == ["cat", "dog"]
    assert _last_audit(svc).details_dict()["changed"]["k"] == {"from": 2, "to": 1}
    _error(client.patch(f"{API}/models/{MODEL}/versions/1.1.0/policy", headers=ds, json={"k": "3"}), 400)
    _error(client.patch(f"{API}/models/{MODEL}/versions/1.1.0/policy", headers=ds, json={"z": 1}), 400)
    _error(client.patch(f"{API}/models/{MODEL}/versions/1.1.0/policy", headers=ds, json={}), 400)
    _error(client.patch(f"{API}/models/{MODEL}/versions/9.9.9/policy", headers=ds, json={"k": 1}), 404)

    # Entitlements: model:deploy.
    _error(client.post(f"{API}/models/{MODEL}/entitlements", headers=ds,
                       json={"kind": "device", "subject": "cam-0001"}), 403)
    added = client.post(f"{API}/models/{MODEL}/entitlements", headers=prod,
                        json={"kind": "device", "subject": "cam-0001"})
    assert added.status_code == 201 and added.get_json()["created"]
    again = client.post(f"{API}/models/{MODEL}/entitlements", headers=prod,
                        json={"kind": "device", "subject": "cam-0001"})
    assert again.status_code == 200 and not again.get_json()["created"]
    _error(client.post(f"{API}/models/{MODEL}/entitlements", headers=prod,
                       json={"kind": "team", "subject": "x"}), 400)
    # A device holding an active lease: withdrawing its class and device entitlements revokes it.
    with svc.repo.write("test lease") as tx:
        model_id = tx.models.model(MODEL).id  # type: ignore[union-attr]
        tx.models.insert_lease(NewLease(lease_id="l" * 32, device_id="cam-0001", model_id=model_id,
                                        version="1.1.0", issued_at=svc.now(), expires_at=svc.now() + 60_000,
                                        key_name=b"\x00\x0b" + bytes(32)))
    _error(client.delete(f"{API}/models/{MODEL}/versions/1.1.0", headers=mle), 409, "in use", "cam-0001")
    _error(client.delete(f"{API}/models/{MODEL}", headers=mle), 409, "in use")
    withdrawn = client.delete(f"{API}/models/{MODEL}/entitlements/class/edge-camera", headers=prod)
    assert withdrawn.get_json()["leases_revoked"] == 0  # still entitled by device id
    withdrawn = client.delete(f"{API}/models/{MODEL}/entitlements/device/cam-0001", headers=prod)
    assert withdrawn.get_json() == {"name": MODEL, "kind": "device", "subject": "cam-0001",
                                    "leases_revoked": 1, "devices_denied": ["cam-0001"]}
    assert svc.repo.outbox()[-1].topic == topics.device_down("cam-0001", "key-denied")
    _error(client.delete(f"{API}/models/{MODEL}/entitlements/device/cam-0001", headers=prod), 404)

    # Retirement: model:delete; the row (with its sealed data key) and the package go.
    _error(client.delete(f"{API}/models/{MODEL}/versions/1.1.0", headers=ds), 403)
    retired = client.delete(f"{API}/models/{MODEL}/versions/1.1.0", headers=mle)
    assert retired.status_code == 200
    assert retired.get_json()["versions"][0]["file_removed"] is True
    assert svc.repo.models.version(MODEL, "1.1.0") is None and _files(store) == [f"{MODEL}/1.0.0.pkg"]
    assert _last_audit(svc).action == "model.retire_version"
    assert client.get(f"{API}/models/{MODEL}", headers=mle).get_json()["retired_versions"] == ["1.1.0"]
    _error(_upload(client, ds, MODEL, "1.1.0"), 409, "retired", "never reused")
    assert _upload(client, ds, MODEL, "1.1.1").status_code == 201
    whole = client.delete(f"{API}/models/{MODEL}", headers=mle).get_json()
    assert sorted(v["version"] for v in whole["versions"]) == ["1.0.0", "1.1.1"]
    assert whole["model_removed"] is False  # its lease history stays, and so does the name
    assert _files(store) == [] and svc.repo.models.versions(MODEL) == []
    _error(client.delete(f"{API}/models/{MODEL}/versions/1.0.0", headers=mle), 404)
    # A model nothing refers to is removed entirely.
    publish_test_model(svc, "scratch", "0.1.0")
    assert client.delete(f"{API}/models/scratch", headers=mle).get_json()["model_removed"] is True
    _error(client.get(f"{API}/models/scratch", headers=mle), 404)


def test_uploads_are_bounded_by_the_configuration(console_config: Any, console_clock: ManualClock,
                                                  tmp_path: Path) -> None:
    import dataclasses

    from fleet_server.console import create_app
    from fleet_server.console.app import dispose
    from fleet_server.console.services import EXTENSION

    config = dataclasses.replace(console_config, console=dataclasses.replace(console_config.console,
                                                                             max_upload_mib=1))
    app = create_app(config, clock=console_clock.now_ms, flask_config={"TESTING": True})
    try:
        svc: ConsoleServices = app.extensions[EXTENSION]
        headers = bearer(svc, "admin")
        client = app.test_client()
        big = _upload(client, headers, "big", "1.0.0", data=b"\x00" * ((1 << 20) + 100 * 1024))
        _error(big, 413)
        assert not (config.models.store_dir / "big").exists()
        # A file that fits the limit gets past it (and is then checked as a model).
        assert _upload(client, headers, "big", "1.0.0", data=b"\x00" * 1000).status_code == 400
        assert _upload(client, headers, "big", "1.0.0").status_code == 201
    finally:
        dispose(app)


# --------------------------------------------------------------------------------------------------
# alerts, audit
# --------------------------------------------------------------------------------------------------
def test_alerts(client: FlaskClient, svc: ConsoleServices, fleet: Fleet) -> None:
    sec, ds = bearer(svc, "security"), bearer(svc, "data_scientist")
    listed = client.get(f"{API}/alerts", headers=ds).get_json()
    assert listed["total"] == 1
    [alert] = listed["items"]
    assert (alert["kind"], alert["severity"], alert["device_id"], alert["status"]) == (
        "attestation_failure", "critical", fleet.tampered, "open")
    _error(client.post(f"{API}/alerts/{alert['id']}/acknowledge", headers=ds), 403)
    acked = client.post(f"{API}/alerts/{alert['id']}/acknowledge", headers=sec).get_json()
    assert acked["status"] == "acknowledged" and acked["acknowledged_by"] == "token:t-security"
    _error(client.post(f"{API}/alerts/{alert['id']}/acknowledge", headers=sec), 409)
    assert client.post(f"{API}/alerts/{alert['id']}/resolve", headers=sec).get_json()["status"] == "resolved"
    assert client.get(f"{API}/alerts", headers=ds).get_json()["total"] == 0
    assert client.get(f"{API}/alerts?status=resolved&kind=attestation_failure",
                      headers=ds).get_json()["total"] == 1
    _error(client.get(f"{API}/alerts/77", headers=ds), 404)
    assert [e.action for e in svc.audit.entries(limit=2)] == ["alert.resolve", "alert.acknowledge"]


def test_audit_list_and_verify(client: FlaskClient, svc: ConsoleServices, fleet: Fleet) -> None:
    sec = bearer(svc, "security")
    for device_id in fleet.trusted:
        client.post(f"{API}/devices/{device_id}/reattest", headers=sec)
    page = client.get(f"{API}/audit?limit=2&action=device.reattest", headers=sec).get_json()
    assert [e["target"] for e in page["items"]] == ["device:cam-0003", "device:cam-0002"]
    rest = client.get(f"{API}/audit?action=device.reattest&before={page['next_before']}",
                      headers=sec).get_json()
    assert [e["target"] for e in rest["items"]] == ["device:cam-0001"]
    report = client.post(f"{API}/audit/verify", headers=sec).get_json()
    assert report["ok"] and report["entries"] == 3 and report["first_bad_seq"] is None
    assert _last_audit(svc).action == "audit.verify"
    _error(client.get(f"{API}/audit", headers=bearer(svc, "ml_engineer")), 403)


# --------------------------------------------------------------------------------------------------
# the console's model actions
# --------------------------------------------------------------------------------------------------
def test_console_model_pages_and_actions(app: Flask, svc: ConsoleServices, users: dict[str, int],
                                         fleet: Fleet) -> None:
    viewer, writer, engineer = app.test_client(), app.test_client(), app.test_client()
    login(viewer, "security")
    page = viewer.get("/models/").data.decode()
    assert f'href="/models/{MODEL}"' in page and "Publish a version" not in page  # no model:write
    detail = viewer.get(f"/models/{MODEL}").data.decode()
    assert "output_mode=label" in detail and "Retire" not in detail and "Save policy" not in detail
    assert viewer.get("/models/no-such-model").status_code == 404

    csrf = login(writer, "data_scientist")
    assert "Publish a version" in writer.get("/models/").data.decode()
    form = {"csrf_token": csrf, "name": MODEL, "version": "2.0.0",
            "file": (io.BytesIO(small_classifier(2)), "model.onnx")}
    done = writer.post("/models/publish", data=form, content_type="multipart/form-data")
    assert done.status_code == 303 and done.headers["Location"] == f"/models/{MODEL}?done=published"
    assert svc.repo.models.version(MODEL, "2.0.0") is not None
    assert (_last_audit(svc).actor, _last_audit(svc).action) == ("data_scientist", "model.publish")
    again = writer.post("/models/publish", data={**form, "file": (io.BytesIO(small_classifier(2)), "m.onnx")},
                        content_type="multipart/form-data")
    assert again.status_code == 409 and b"not newer" in again.data
    no_csrf = writer.post("/models/publish", data={"name": MODEL, "version": "3.0.0",
                                                   "file": (io.BytesIO(small_classifier(3)), "m.onnx")},
                          content_type="multipart/form-data")
    assert no_csrf.status_code == 400
    changed = writer.post(f"/models/{MODEL}/versions/2.0.0/policy",
                          data={"csrf_token": csrf,
                                "settings": "output_mode=label\nk=1\n# comment\nlease_quota=1"})
    assert changed.status_code == 303  # tightening: model:write is enough
    assert json.loads(svc.repo.models.version(MODEL, "2.0.0").policy)["k"] == 1  # type: ignore[union-attr]
    looser = writer.post(f"/models/{MODEL}/versions/2.0.0/policy",
                         data={"csrf_token": csrf, "settings": "lease_quota=none"})
    assert looser.status_code == 403 and b"model:deploy" in looser.data
    bad = writer.post(f"/models/{MODEL}/versions/2.0.0/policy",
                      data={"csrf_token": csrf, "settings": "k=zero"})
    assert bad.status_code == 400 and b"expected an integer" in bad.data
    assert writer.post(f"/models/{MODEL}/entitle", data={"csrf_token": csrf, "kind": "device",
                                                          "subject": "cam-0002"}).status_code == 403
    assert writer.post(f"/models/{MODEL}/versions/2.0.0/retire", data={"csrf_token": csrf}).status_code == 403

    csrf = login(engineer, "ml_engineer")
    assert engineer.post(f"/models/{MODEL}/entitle", data={"csrf_token": csrf, "kind": "device",
                                                            "subject": "cam-0002"}).status_code == 303
    assert ("device", "cam-0002") in {(e.kind, e.subject) for e in svc.repo.models.entitlements(MODEL)}
    assert engineer.post(f"/models/{MODEL}/withdraw", data={"csrf_token": csrf, "kind": "device",
                                                             "subject": "cam-0002"}).status_code == 303
    assert _last_audit(svc).action == "model.withdraw"
    retired = engineer.post(f"/models/{MODEL}/versions/2.0.0/retire", data={"csrf_token": csrf})
    assert retired.status_code == 303 and svc.repo.models.version(MODEL, "2.0.0") is None
    assert "retired: 2.0.0" in engineer.get(f"/models/{MODEL}").data.decode()
    gone = engineer.post(f"/models/{MODEL}/retire", data={"csrf_token": csrf})
    assert gone.status_code == 303 and svc.repo.models.models() == []  # nothing referred to it
    assert [e.action for e in svc.audit.entries(actor="ml_engineer", limit=4)] == [
        "model.retire", "model.retire_version", "model.withdraw", "model.entitle"]
    assert csrf_of(engineer.get("/models/").data)
