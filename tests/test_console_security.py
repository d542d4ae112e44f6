"""Console hardening: CSRF on every state-changing route, security headers on every response, error pages
without tracebacks (500 and database failures), debug mode only in development, query arguments that
never break a page."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from fleet_server.config import ServerConfig
from fleet_server.console import create_app
from fleet_server.console.app import dispose
from fleet_server.console.rbac import public
from fleet_server.console.security import CSP, csrf_token_for
from fleet_server.console.services import ConsoleServices
from fleet_server.rollouts.plan import Group, parse_plan
from fleet_server.service import rollouts
from fleet_server.service.common import ManualClock
from fleet_server.service.releases import add_release

pytest.register_assert_rewrite("console_fixtures", "release_fixtures")
from console_fixtures import SoftDevice, console_settings, csrf_of, login  # noqa: E402
from release_fixtures import MemoryTargetStore, write_bundle_dir  # noqa: E402

pytest_plugins = ("console_fixtures",)

UNSAFE = {"POST", "PUT", "PATCH", "DELETE"}
SAMPLES: dict[str, Any] = {"device_id": "cam-1", "policy_id": 1, "alert_id": 1, "user_id": 1, "token_id": 1,
                           "release_id": 1, "rollout_id": "r1",
                           "filename": "console.css"}


def _unsafe_routes(app: Flask) -> list[tuple[str, str, str]]:
    out = []
    for rule in app.url_map.iter_rules():
        for method in sorted((rule.methods or set()) & UNSAFE):
            values = {name: SAMPLES.get(name, "sample") for name in rule.arguments}
            out.append((rule.endpoint, method, rule.build(values, append_unknown=False)[1]))  # type: ignore[index]
    return sorted(out)


def _get_routes(app: Flask) -> list[tuple[str, str]]:
    out = []
    for rule in app.url_map.iter_rules():
        if "GET" in (rule.methods or set()):
            values = {name: SAMPLES.get(name, "sample") for name in rule.arguments}
            out.append((rule.endpoint, rule.build(values, append_unknown=False)[1]))  # type: ignore[index]
    return sorted(out)


@pytest.fixture
def admin_client(client: FlaskClient, users: dict[str, int], svc: ConsoleServices,
                 console_clock: ManualClock, tmp_path: Path) -> FlaskClient:
    SoftDevice("cam-1", svc.repo, now=console_clock.now_ms())
    release = add_release(svc.repo, MemoryTargetStore(), write_bundle_dir(tmp_path / "bundle"),
                          device_class="edge-camera", version="1.3.0", now=svc.now(), actor="test")
    assert release.id == SAMPLES["release_id"]
    rollouts.create_rollout(svc.repo, target=release.target, group=Group("edge-camera"), plan=parse_plan({}),
                            now=svc.now(), actor="test", rollout_id=SAMPLES["rollout_id"])
    login(client, "admin")
    return client


# --------------------------------------------------------------------------------------------------
# CSRF
# --------------------------------------------------------------------------------------------------
def test_every_state_changing_route_needs_a_csrf_token(app: Flask, admin_client: FlaskClient,
                                                       svc: ConsoleServices) -> None:
    routes = _unsafe_routes(app)
    assert len(routes) >= 15
    head = svc.audit.head()
    device = svc.repo.device("cam-1")
    for endpoint, method, url in routes:
        for data, headers in (({}, {}), ({"csrf_token": "0" * 64}, {}), ({}, {"X-CSRF-Token": "forged"})):
            response = admin_client.open(url, method=method, data=data, headers=headers)
            assert response.status_code in (400, 403), (endpoint, method, data, headers, response.status_code)
            assert b"CSRF" in response.data or response.status_code == 403
    # Nothing happened: no audit entry, the device unchanged, still logged in.
    assert svc.audit.head() == head
    assert svc.repo.device("cam-1") == device
    assert admin_client.get("/").status_code == 200


def test_the_token_may_come_in_a_header_and_is_bound_to_the_session(
        admin_client: FlaskClient, app: Flask, users: dict[str, int], svc: ConsoleServices) -> None:
    csrf = csrf_of(admin_client.get("/devices/cam-1").data)
    response = admin_client.post("/devices/cam-1/reattest", headers={"X-CSRF-Token": csrf})
    assert response.status_code == 303
    other = app.test_client()
    other_csrf = login(other, "security")
    assert other_csrf != csrf
    # One session's token does not work for another session.
    assert other.post("/devices/cam-1/reattest", data={"csrf_token": csrf}).status_code == 400
    assert other.post("/devices/cam-1/reattest", data={"csrf_token": other_csrf}).status_code == 303
    cookie = admin_client.get_cookie("__Host-console_session")
    assert cookie is not None and csrf == csrf_token_for(cookie.value)


def test_cross_site_requests_are_refused(admin_client: FlaskClient) -> None:
    csrf = csrf_of(admin_client.get("/devices/cam-1").data)
    response = admin_client.post("/devices/cam-1/reattest", data={"csrf_token": csrf},
                                 headers={"Sec-Fetch-Site": "cross-site"})
    assert response.status_code == 403
    same = admin_client.post("/devices/cam-1/reattest", data={"csrf_token": csrf},
                             headers={"Sec-Fetch-Site": "same-origin"})
    assert same.status_code == 303


def test_login_form_needs_its_csrf_token(client: FlaskClient, users: dict[str, int]) -> None:
    response = client.post("/login", data={"username": "admin", "password": "x"})
    assert response.status_code == 400
    page = client.get("/login")
    seed = [c for c in page.headers.getlist("Set-Cookie") if c.startswith("console_login_seed=")]
    assert seed and "HttpOnly" in seed[0] and "Secure" in seed[0] and "SameSite=Strict" in seed[0]


def test_bearer_requests_need_no_csrf_token(client: FlaskClient, svc: ConsoleServices,
                                            console_clock: ManualClock) -> None:
    SoftDevice("cam-1", svc.repo, now=console_clock.now_ms())
    _, secret = svc.accounts.create_token("ops", "security", created_by="test", now=svc.now())
    response = client.post("/devices/cam-1/reattest", headers={"Authorization": f"Bearer {secret}"})
    assert response.status_code == 303
    assert svc.audit.entries(limit=1)[0].actor == "token:ops"


# --------------------------------------------------------------------------------------------------
# headers
# --------------------------------------------------------------------------------------------------
def _check_headers(response: Any, where: str, *, static: bool = False) -> None:
    h = response.headers
    assert h["Content-Security-Policy"] == CSP, where
    assert "'unsafe-inline'" not in CSP and "frame-ancestors 'none'" in CSP and "default-src 'self'" in CSP
    assert h["X-Content-Type-Options"] == "nosniff", where
    assert h["X-Frame-Options"] == "DENY", where
    assert h["Referrer-Policy"] == "same-origin", where
    assert "camera=()" in h["Permissions-Policy"], where
    assert h["Strict-Transport-Security"].startswith("max-age="), where
    if not static:
        assert h["Cache-Control"] == "no-store", where


def test_security_headers_on_every_page(app: Flask, admin_client: FlaskClient) -> None:
    seen = 0
    for endpoint, url in _get_routes(app):
        response = admin_client.get(url)
        assert response.status_code < 500, (url, response.status_code)
        _check_headers(response, url, static=endpoint == "static")
        seen += 1
    assert seen >= 15
    for url in ("/no/such/page", "/devices/NOT-VALID", "/policies/987654"):
        response = admin_client.get(url)
        assert response.status_code == 404
        _check_headers(response, url)
    anonymous = app.test_client()
    for url in ("/login", "/", "/healthz"):
        _check_headers(anonymous.get(url), url)
    static = anonymous.get("/static/console.css")
    assert static.status_code == 200 and "no-store" not in static.headers.get("Cache-Control", "")


def test_pages_have_no_inline_scripts_or_styles(app: Flask, admin_client: FlaskClient) -> None:
    for endpoint, url in _get_routes(app):
        if endpoint == "static":
            continue
        body = admin_client.get(url).data
        if not body.lstrip().startswith(b"<!doctype html>"):
            continue
        assert b"<script>" not in body and b" style=" not in body and b"<style" not in body, url
        assert re.search(rb"<[^>]*\son[a-z]+\s*=", body) is None, url  # no inline event handlers
        assert b"javascript:" not in body, url
        for chunk in body.split(b"<script")[1:]:
            assert b'src="/static/' in chunk.split(b">")[0], url


# --------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------
def test_an_unexpected_error_is_a_generic_500_page(app: Flask, client: FlaskClient) -> None:
    @app.get("/boom")
    @public
    def boom() -> str:
        raise RuntimeError("secret internal detail")

    response = client.get("/boom")
    assert response.status_code == 500
    assert b"Traceback" not in response.data and b"secret internal detail" not in response.data
    assert b"Server error" in response.data
    _check_headers(response, "/boom")
    api = client.get("/boom", headers={"Accept": "application/json"})
    assert api.status_code == 500 and api.is_json and api.get_json()["error"] == "server_error"


def test_a_database_failure_is_a_503_page(admin_client: FlaskClient, svc: ConsoleServices) -> None:
    with svc.engine.begin() as conn:
        conn.execute(text("DROP TABLE alert"))
    response = admin_client.get("/alerts/")
    assert response.status_code == 503
    assert b"Traceback" not in response.data and b"no such table" not in response.data


def test_debug_only_in_development(console_config: ServerConfig) -> None:
    production = create_app(console_config)
    development = create_app(console_settings(console_config, development=True))
    try:
        assert production.debug is False and development.debug is True
    finally:
        dispose(production)
        dispose(development)


def test_nul_characters_are_refused(admin_client: FlaskClient) -> None:
    assert admin_client.get("/devices/", query_string={"q": "a\x00b"}).status_code == 400
    csrf = csrf_of(admin_client.get("/devices/cam-1").data)
    response = admin_client.post("/devices/cam-1/revoke", data={"csrf_token": csrf, "reason": "x\x00y"})
    assert response.status_code == 400


def test_healthz(client: FlaskClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200 and response.get_json() == {"status": "ok"}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(args=st.dictionaries(st.sampled_from(["q", "state", "class", "firmware", "model", "after", "before",
                                             "n", "status", "kind", "device", "page", "actor", "action"]),
                            st.text(max_size=80), max_size=6))
def test_query_arguments_never_break_a_page(admin_client: FlaskClient, args: dict[str, str]) -> None:
    for url in ("/devices/", "/alerts/", "/audit/", "/policies/new"):
        response = admin_client.get(url, query_string=args)
        allowed = (200, 404, 400) if any("\x00" in v for v in args.values()) else (200, 404)
        assert response.status_code in allowed, (url, args, response.status_code)
