"""Roles and rights: the matrix as the issue states it, every route's declared right, and a walk of
every role (browser session and API token) and an anonymous visitor against every route and method of
the application's URL map - console pages, model actions, /metrics and every /api/v1 operation -
expecting allow or deny.

New routes (the JSON API under /api/v1 included) are picked up from the URL map: a route without a
declaration fails :func:`test_every_route_declares_what_it_requires`, and the walk checks it against the
matrix. Give URL parameters of new routes a sample value in :data:`GET_SAMPLES` if the default does not
fit.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.routing import Rule
from werkzeug.test import TestResponse

from fleet_server.console.rbac import (
    AUTHENTICATED,
    MATRIX,
    PUBLIC,
    Declared,
    Right,
    Role,
    has_right,
    required_of,
)
from fleet_server.console.services import ConsoleServices
from fleet_server.rollouts.plan import Group, parse_plan
from fleet_server.service import admin, rollouts
from fleet_server.service.common import ManualClock
from fleet_server.service.releases import add_release

pytest.register_assert_rewrite("console_fixtures")
pytest.register_assert_rewrite("browser_fixtures", "release_fixtures")
from browser_fixtures import publish_test_model  # noqa: E402
from console_fixtures import SoftDevice, csrf_of, golden_policy, login  # noqa: E402
from release_fixtures import MemoryTargetStore, write_bundle_dir  # noqa: E402

pytest_plugins = ("console_fixtures",)

MODEL = {"model:read", "model:write", "model:delete", "model:deploy"}
FLEET_ADMIN = {"fleet:approve", "fleet:revoke", "fleet:quarantine", "fleet:reattest", "fleet:edit_policies"}
# The issue's matrix, written out independently of fleet_server.console.rbac.
EXPECTED_RIGHTS: dict[str, set[str]] = {
    "data_scientist": {"model:read", "model:write", "fleet:view"},
    "ml_engineer": {"model:read", "model:write", "model:delete", "model:deploy", "fleet:view",
                    "fleet:deploy"},
    "security": {"model:read", "fleet:view", "audit:view", "alerts:manage"} | FLEET_ADMIN,
    "production_system": {"model:read", "model:deploy", "fleet:view", "fleet:deploy"},
    "admin": MODEL | FLEET_ADMIN | {"fleet:view", "fleet:deploy", "audit:view", "alerts:manage",
                                    "users:manage"},
}

# What each console route requires (a change here is a deliberate change of the access model).
CONSOLE_ROUTES: dict[str, Declared] = {
    "static": PUBLIC,
    "healthz": PUBLIC,
    "updates.metadata": PUBLIC,  # the TUF repository: signed files, read-only
    "updates.target": PUBLIC,
    "auth.login": PUBLIC,
    "auth.login_post": PUBLIC,
    "auth.logout": AUTHENTICATED,
    "auth.account": AUTHENTICATED,
    "auth.account_password": AUTHENTICATED,
    "dashboard.index": Right.VIEW_FLEET,
    "dashboard.data": Right.VIEW_FLEET,
    "devices.index": Right.VIEW_FLEET,
    "devices.detail": Right.VIEW_FLEET,
    "devices.approve": Right.APPROVE,
    "devices.reattest": Right.REATTEST,
    "devices.revoke": Right.REVOKE,
    "devices.quarantine": Right.QUARANTINE,
    "devices.unquarantine": Right.APPROVE,
    "devices.tags": Right.DEPLOY,
    "policies.index": Right.VIEW_FLEET,
    "policies.detail": Right.VIEW_FLEET,
    "policies.new": Right.EDIT_POLICIES,
    "policies.create": Right.EDIT_POLICIES,
    "releases.index": Right.VIEW_FLEET,
    "releases.detail": Right.VIEW_FLEET,
    "rollouts.index": Right.VIEW_FLEET,
    "rollouts.detail": Right.VIEW_FLEET,
    "rollouts.new": Right.DEPLOY,
    "rollouts.dry_run": Right.DEPLOY,
    "rollouts.create": Right.DEPLOY,
    "rollouts.pause": Right.DEPLOY,
    "rollouts.resume": Right.DEPLOY,
    "rollouts.approve": Right.DEPLOY,
    "rollouts.cancel": Right.DEPLOY,
    "rollouts.abort": Right.DEPLOY,
    "models.index": Right.MODEL_READ,
    "models.detail": Right.MODEL_READ,
    "models.publish": Right.MODEL_WRITE,
    "models.set_policy": Right.MODEL_WRITE,
    "models.deploy": Right.MODEL_DEPLOY,
    "models.entitle": Right.MODEL_DEPLOY,
    "models.withdraw": Right.MODEL_DEPLOY,
    "models.retire_one": Right.MODEL_DELETE,
    "models.retire_all": Right.MODEL_DELETE,
    "alerts.index": Right.VIEW_FLEET,
    "alerts.acknowledge": Right.MANAGE_ALERTS,
    "alerts.resolve": Right.MANAGE_ALERTS,
    "users.index": Right.MANAGE_USERS,
    "users.create": Right.MANAGE_USERS,
    "users.set_role": Right.MANAGE_USERS,
    "users.disable": Right.MANAGE_USERS,
    "users.enable": Right.MANAGE_USERS,
    "users.reset_password": Right.MANAGE_USERS,
    "users.unlock": Right.MANAGE_USERS,
    "users.create_token": Right.MANAGE_USERS,
    "users.revoke_token": Right.MANAGE_USERS,
    "auditlog.index": Right.VIEW_AUDIT,
    "auditlog.verify": Right.VIEW_AUDIT,
    "metrics.metrics": Right.VIEW_FLEET,
}

# The JSON API (/api/v1): the same matrix, operation by operation.
API_ROUTES: dict[str, Declared] = {
    "api.openapi": PUBLIC,
    "api.whoami": AUTHENTICATED,
    "api.list_devices": Right.VIEW_FLEET,
    "api.get_device": Right.VIEW_FLEET,
    "api.device_attestations": Right.VIEW_FLEET,
    "api.device_history": Right.VIEW_FLEET,
    "api.device_eventlog": Right.VIEW_FLEET,
    "api.approve_device": Right.APPROVE,
    "api.revoke_device": Right.REVOKE,
    "api.quarantine_device": Right.QUARANTINE,
    "api.unquarantine_device": Right.APPROVE,
    "api.reattest": Right.REATTEST,
    "api.list_attestations": Right.VIEW_FLEET,
    "api.list_policies": Right.VIEW_FLEET,
    "api.get_policy": Right.VIEW_FLEET,
    "api.create_policy": Right.EDIT_POLICIES,
    "api.list_releases": Right.VIEW_FLEET,
    "api.get_release": Right.VIEW_FLEET,
    "api.assign_release": Right.DEPLOY,
    "api.list_rollouts": Right.VIEW_FLEET,
    "api.get_rollout": Right.VIEW_FLEET,
    "api.create_rollout": Right.DEPLOY,
    "api.plan_rollout": Right.DEPLOY,
    "api.pause_rollout": Right.DEPLOY,
    "api.resume_rollout": Right.DEPLOY,
    "api.approve_rollout": Right.DEPLOY,
    "api.cancel_rollout": Right.DEPLOY,
    "api.abort_rollout": Right.DEPLOY,
    "api.tag_device": Right.DEPLOY,
    "api.list_models": Right.MODEL_READ,
    "api.get_model": Right.MODEL_READ,
    "api.get_version": Right.MODEL_READ,
    "api.publish_model": Right.MODEL_WRITE,
    "api.update_policy": Right.MODEL_WRITE,
    "api.deploy_version": Right.MODEL_DEPLOY,
    "api.retire_version": Right.MODEL_DELETE,
    "api.retire_model": Right.MODEL_DELETE,
    "api.entitle": Right.MODEL_DEPLOY,
    "api.withdraw": Right.MODEL_DEPLOY,
    "api.list_alerts": Right.VIEW_FLEET,
    "api.get_alert": Right.VIEW_FLEET,
    "api.acknowledge_alert": Right.MANAGE_ALERTS,
    "api.resolve_alert": Right.MANAGE_ALERTS,
    "api.list_audit": Right.VIEW_AUDIT,
    "api.verify_audit": Right.VIEW_AUDIT,
}

UNSAFE = {"POST", "PUT", "PATCH", "DELETE"}
# URL parameter values: GET requests name things that exist (filled in by the fixture); state-changing
# requests name things that do not, so the walk changes nothing (an allowed request then gets 404).
GET_SAMPLES: dict[str, Any] = {"filename": "console.css", "name": "classifier", "version": "1.0.0",
                               "kind": "class", "subject": "edge-camera"}
UNSAFE_SAMPLES: dict[str, Any] = {"device_id": "no-such-device", "name": "no-such-model", "version": "9.9.9",
                                  "kind": "device", "subject": "no-such-device",
                                  "rollout_id": "no-such-rollout"}


def test_matrix_is_the_issues_matrix() -> None:
    assert {role.value: {r.value for r in rights} for role, rights in MATRIX.items()} == EXPECTED_RIGHTS
    assert not has_right("root", Right.VIEW_FLEET)


def test_every_route_declares_what_it_requires(app: Flask) -> None:
    undeclared = sorted(e for e, view in app.view_functions.items() if required_of(view) is None)
    assert undeclared == [], f"routes without a declared right: {undeclared}"
    declared = {e: required_of(v) for e, v in app.view_functions.items()}
    for endpoint, requirement in {**CONSOLE_ROUTES, **API_ROUTES}.items():
        assert declared.get(endpoint) == requirement, endpoint
    api = {e for e in declared if e.startswith("api.")}
    assert api == set(API_ROUTES), "every API route is pinned here (and nothing else)"


def test_an_undeclared_route_is_refused(app: Flask, users: dict[str, int]) -> None:
    @app.get("/undeclared")
    def undeclared() -> str:
        return "should never be served"

    client = app.test_client()
    login(client, "admin")
    response = client.get("/undeclared")
    assert response.status_code == 403 and b"should never" not in response.data


def _walk(app: Flask) -> Iterator[tuple[Rule, str]]:
    rules = sorted(app.url_map.iter_rules(), key=lambda r: (r.endpoint == "auth.logout", r.rule))
    for rule in rules:
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            yield rule, method


def _url(rule: Rule, method: str, samples: dict[str, Any]) -> str:
    values: dict[str, Any] = {}
    for name in rule.arguments:
        table = UNSAFE_SAMPLES if method in UNSAFE else samples
        default = 999_999 if type(rule._converters[name]).__name__ == "IntegerConverter" else "sample"
        values[name] = table.get(name, default if method in UNSAFE else samples.get(name, default))
    return rule.build(values, append_unknown=False)[1]  # type: ignore[index]


@pytest.fixture
def samples(svc: ConsoleServices, users: dict[str, int], console_clock: ManualClock,
            tmp_path: Path) -> dict[str, Any]:
    SoftDevice("cam-1", svc.repo, now=console_clock.now_ms())
    release = add_release(svc.repo, MemoryTargetStore(), write_bundle_dir(tmp_path / "bundle"),
                          device_class="edge-camera", version="1.3.0", now=svc.now(), actor="test")
    rollouts.create_rollout(svc.repo, target=release.target, group=Group("edge-camera"), plan=parse_plan({}),
                            now=svc.now(), actor="test", rollout_id="r1")
    stored = admin.store_policy(svc.repo, golden_policy(), now=console_clock.now_ms())
    from fleet_server.storage import alerting

    publish_test_model(svc)
    with svc.repo.write("test alert") as tx:
        alerting.raise_alerts(tx.conn, [alerting.NewAlert("unreachable", "warning", "m", "k", "cam-1")],
                              console_clock.now_ms())
    return {**GET_SAMPLES, "device_id": "cam-1", "policy_id": stored.id, "alert_id": 1,
            "user_id": users["data_scientist"], "token_id": 1, "release_id": release.id, "rollout_id": "r1"}


def _request(client: FlaskClient, rule: Rule, method: str, samples: dict[str, Any],
             headers: dict[str, str], csrf: str | None) -> TestResponse:
    data = {"csrf_token": csrf} if csrf and method in UNSAFE else None
    return client.open(_url(rule, method, samples), method=method, data=data, headers=headers)


def _access_refusal(response: TestResponse) -> str | None:
    """"denied" (403 of the right check), "unauthenticated" (401 / redirect to login), or None: the
    view ran (whatever it answered, e.g. 404 for a sample that does not exist, 401 for a failed login)."""
    if response.status_code == 403:
        return "denied"
    login_page = b"Login required" in response.data or b"login_required" in response.data
    if response.status_code == 401 and login_page:
        return "unauthenticated"
    if response.status_code == 302 and response.headers["Location"].startswith("/login?next="):
        return "unauthenticated"
    return None


def _allowed(requirement: Declared | None, role: str) -> bool:
    if requirement in (PUBLIC, AUTHENTICATED):
        return True
    assert isinstance(requirement, Right)
    return requirement.value in EXPECTED_RIGHTS[role]


@pytest.mark.parametrize("role", [r.value for r in Role])
@pytest.mark.parametrize("via", ["session", "token"])
def test_every_role_against_every_route(app: Flask, svc: ConsoleServices, samples: dict[str, Any], role: str,
                                        via: str) -> None:
    client = app.test_client()
    headers: dict[str, str] = {}
    csrf: str | None = None
    if via == "session":
        csrf = login(client, role)
    else:
        _, secret = svc.accounts.create_token(f"walk-{role}", role, created_by="test", now=svc.now())
        headers = {"Authorization": f"Bearer {secret}"}
    checked = 0
    for rule, method in _walk(app):
        requirement = required_of(app.view_functions[rule.endpoint])
        response = _request(client, rule, method, samples, headers, csrf)
        where = f"{role} via {via}: {method} {rule.rule} ({rule.endpoint}) -> {response.status_code}"
        assert response.status_code < 500, where
        assert _access_refusal(response) == (None if _allowed(requirement, role) else "denied"), where
        checked += 1
    assert checked >= len(CONSOLE_ROUTES) + len(API_ROUTES)


def test_anonymous_against_every_route(app: Flask, samples: dict[str, Any]) -> None:
    client = app.test_client()
    seed_csrf = csrf_of(client.get("/login").data)  # a valid pre-session CSRF token
    for rule, method in _walk(app):
        requirement = required_of(app.view_functions[rule.endpoint])
        response = _request(client, rule, method, samples, {}, seed_csrf)
        where = f"anonymous: {method} {rule.rule} -> {response.status_code}"
        assert response.status_code < 500, where
        expected = None if requirement == PUBLIC else "unauthenticated"
        assert _access_refusal(response) == expected, where
        if expected and method not in UNSAFE:
            # A browser is sent to the login page; an API client is told 401 (JSON).
            assert response.status_code == (401 if rule.rule.startswith("/api/") else 302), where
