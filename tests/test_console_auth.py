"""Console authentication: login and logout, session cookies and their lifetime, argon2id passwords,
throttling and lockout per user name and per address, API tokens, own password change."""

from __future__ import annotations

import dataclasses

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from fleet_server.config import ServerConfig
from fleet_server.console import create_app
from fleet_server.console.accounts import (
    AccountError,
    Accounts,
    ThrottleState,
    after_failure,
    is_locked,
)
from fleet_server.console.app import dispose
from fleet_server.console.services import EXTENSION, ConsoleServices
from fleet_server.service.common import ManualClock
from fleet_server.storage import models

pytest.register_assert_rewrite("console_fixtures")
from console_fixtures import PASSWORD, console_settings, csrf_of, form_csrf, login  # noqa: E402

pytest_plugins = ("console_fixtures",)

MIN = 60_000


def _cookie_header(response: object) -> str:
    cookies = [c for c in response.headers.getlist("Set-Cookie") if "console_session=" in c]  # type: ignore[attr-defined]
    assert len(cookies) == 1, cookies
    return cookies[0]


def _post_login(client: FlaskClient, name: str, password: str) -> int:
    token = form_csrf(client)
    data = {"username": name, "password": password, "csrf_token": token}
    return client.post("/login", data=data).status_code


def _actions(svc: ConsoleServices) -> list[tuple[str, str, str]]:
    return [(e.actor, e.action, e.target) for e in reversed(svc.audit.entries(limit=1000))]


# --------------------------------------------------------------------------------------------------
# login, cookies, logout
# --------------------------------------------------------------------------------------------------
def test_pages_redirect_to_login_until_logged_in(client: FlaskClient, users: dict[str, int]) -> None:
    response = client.get("/devices/?state=trusted")
    assert response.status_code == 302
    assert response.headers["Location"] == "/login?next=/devices/?state%3Dtrusted"
    assert client.get("/login").status_code == 200
    login(client, "admin")
    assert client.get("/devices/?state=trusted").status_code == 200


def test_session_cookie_is_secure_httponly_samesite(client: FlaskClient, users: dict[str, int]) -> None:
    token = csrf_of(client.get("/login").data)
    response = client.post("/login", data={"username": "security", "password": PASSWORD, "csrf_token": token,
                                           "next": "/alerts/"})
    assert response.status_code == 303 and response.headers["Location"] == "/alerts/"
    header = _cookie_header(response)
    assert header.startswith("__Host-console_session=")
    for flag in ("Secure", "HttpOnly", "SameSite=Strict", "Path=/"):
        assert flag in header.split("; "), header
    assert "Domain=" not in header


def test_plain_http_development_cookie_is_not_secure(console_config: ServerConfig, users: dict[str, int],
                                                     svc: ConsoleServices) -> None:
    app = create_app(console_settings(console_config, secure_cookies=False), flask_config={"TESTING": True})
    try:
        client = app.test_client()
        token = csrf_of(client.get("/login").data)
        response = client.post("/login", data={"username": "admin", "password": PASSWORD,
                                               "csrf_token": token})
        header = _cookie_header(response)
        assert header.startswith("console_session=") and "Secure" not in header
        assert "HttpOnly" in header and "SameSite=Strict" in header
        assert "Strict-Transport-Security" not in response.headers
    finally:
        dispose(app)


def test_login_refuses_a_foreign_next_url(client: FlaskClient, users: dict[str, int]) -> None:
    for target in ("https://evil.example/", "//evil.example/x", "/\\evil.example", "javascript:alert(1)"):
        fresh = client.application.test_client()
        token = csrf_of(fresh.get("/login").data)
        response = fresh.post("/login", data={"username": "admin", "password": PASSWORD, "csrf_token": token,
                                               "next": target})
        assert response.status_code == 303 and response.headers["Location"] == "/", target


def test_wrong_password_and_unknown_user_look_the_same(client: FlaskClient, users: dict[str, int],
                                                       svc: ConsoleServices) -> None:
    token = csrf_of(client.get("/login").data)
    wrong = client.post("/login", data={"username": "admin", "password": "nope nope nope",
                                        "csrf_token": token})
    unknown = client.post("/login", data={"username": "nobody", "password": "nope nope nope",
                                          "csrf_token": token})
    assert wrong.status_code == unknown.status_code == 401
    assert b"Wrong user name or password." in wrong.data and b"Wrong user name or password." in unknown.data
    assert not [c for c in wrong.headers.getlist("Set-Cookie") if "console_session=" in c]
    failed = [(a, t) for _, a, t in _actions(svc) if a == "login.failed"]
    assert failed == [("login.failed", "user:admin"), ("login.failed", "user:nobody")]


def test_logout_ends_the_session_server_side(client: FlaskClient, users: dict[str, int],
                                             svc: ConsoleServices) -> None:
    csrf = login(client, "admin")
    cookie = client.get_cookie("__Host-console_session")
    assert cookie is not None
    response = client.post("/logout", data={"csrf_token": csrf})
    assert response.status_code == 303 and response.headers["Location"] == "/login"
    assert client.get("/").status_code == 302
    # Replaying the old cookie does not work either: the session row is gone.
    client.set_cookie("__Host-console_session", cookie.value)
    assert client.get("/").status_code == 302
    assert ("admin", "logout", "user:admin") in _actions(svc)


def test_login_gives_a_new_session_id_each_time(client: FlaskClient, users: dict[str, int]) -> None:
    login(client, "admin")
    first = client.get_cookie("__Host-console_session")
    login(client, "admin")
    second = client.get_cookie("__Host-console_session")
    assert first is not None and second is not None and first.value != second.value


def test_session_idle_timeout_and_absolute_lifetime(client: FlaskClient, users: dict[str, int],
                                                    console_clock: ManualClock, svc: ConsoleServices) -> None:
    idle = svc.settings.session_idle_ms
    login(client, "admin")
    for _ in range(3):  # activity keeps it alive past the idle timeout
        console_clock.advance(idle // 2)
        assert client.get("/").status_code == 200
    console_clock.advance(idle + 1)
    assert client.get("/").status_code == 302
    login(client, "admin")
    step = idle - MIN
    elapsed = 0
    while elapsed + step < svc.settings.session_max_ms:
        console_clock.advance(step)
        elapsed += step
        assert client.get("/").status_code == 200
    console_clock.advance(step)
    assert client.get("/").status_code == 302  # past session_max_hours despite activity


def test_passwords_are_argon2id_and_rehashed_when_parameters_change(
        console_config: ServerConfig, svc: ConsoleServices, users: dict[str, int],
        client: FlaskClient) -> None:
    user = models.SQLModel.metadata.tables["consoleuser"]

    def stored() -> str:
        with svc.engine.connect() as conn:
            return str(conn.execute(select(user.c.password_hash).where(user.c.name == "admin")).scalar_one())

    first = stored()
    assert first.startswith("$argon2id$v=19$m=64,t=1,p=1$") and PASSWORD not in first
    stronger = console_settings(console_config, argon2_memory_kib=128, argon2_time_cost=2)
    app = create_app(stronger, flask_config={"TESTING": True})
    try:
        login(app.test_client(), "admin")
    finally:
        dispose(app)
    assert stored().startswith("$argon2id$v=19$m=128,t=2,p=1$")
    login(client, "admin")  # the old parameters still verify the new hash


def test_weak_or_invalid_accounts_are_refused(svc: ConsoleServices) -> None:
    now = svc.now()
    with pytest.raises(AccountError, match="at least 12"):
        svc.accounts.add_user("alice", "admin", "short", now=now)
    with pytest.raises(AccountError, match="unknown role"):
        svc.accounts.add_user("alice", "root", PASSWORD, now=now)
    with pytest.raises(AccountError, match="a name is"):
        svc.accounts.add_user("alice smith", "admin", PASSWORD, now=now)
    svc.accounts.add_user("alice", "admin", PASSWORD, now=now)
    with pytest.raises(AccountError, match="already exists"):
        svc.accounts.add_user("ALICE", "security", PASSWORD, now=now)


# --------------------------------------------------------------------------------------------------
# throttling and lockout
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("state", "now", "expected"), [
    (None, 1000, ThrottleState(1, 1000, None)),
    (ThrottleState(1, 1000, None), 2000, ThrottleState(2, 1000, None)),
    (ThrottleState(2, 1000, None), 3000, ThrottleState(3, 1000, 3000 + 900_000)),   # third: locked
    (ThrottleState(2, 1000, None), 1000 + 600_000, ThrottleState(1, 601_000, None)),  # window over
    (ThrottleState(3, 1000, 500_000), 400_000, ThrottleState(4, 1000, 500_000)),    # locked stays locked
    (ThrottleState(3, 1000, 500_000), 500_000, ThrottleState(1, 500_000, None)),    # lock over: new window
])
def test_throttle_rules(state: ThrottleState | None, now: int, expected: ThrottleState) -> None:
    assert after_failure(state, now, max_failures=3, window_ms=600_000, lockout_ms=900_000) == expected


def test_is_locked() -> None:
    assert not is_locked(None, 5)
    assert not is_locked(ThrottleState(9, 0, None), 5)
    assert is_locked(ThrottleState(3, 0, 10), 9)
    assert not is_locked(ThrottleState(3, 0, 10), 10)


@pytest.fixture
def strict_app(console_config: ServerConfig, console_clock: ManualClock, svc: ConsoleServices,
               users: dict[str, int]) -> Flask:
    app = create_app(console_settings(console_config, login_max_failures=3, login_max_failures_ip=5,
                                      login_window_minutes=10.0, lockout_minutes=15.0),
                     clock=console_clock.now_ms, flask_config={"TESTING": True})
    yield app
    dispose(app)


def test_lockout_after_repeated_failures_per_user(strict_app: Flask, console_clock: ManualClock) -> None:
    client = strict_app.test_client()
    svc: ConsoleServices = strict_app.extensions[EXTENSION]
    assert [_post_login(client, "admin", "wrong password!") for _ in range(3)] == [401, 401, 429]
    # Locked: even the right password is refused, and the page says so.
    assert _post_login(client, "admin", PASSWORD) == 429
    # Another user from the same address is not locked (the address limit is 5).
    assert _post_login(client, "security", PASSWORD) == 303
    logins = [(a, t) for _, a, t in _actions(svc) if a.startswith("login")]
    assert logins == [("login.failed", "user:admin"), ("login.failed", "user:admin"),
                      ("login.lockout", "user:admin"), ("login", "user:security")]
    console_clock.advance(15 * MIN)
    assert _post_login(client, "admin", PASSWORD) == 303
    # Success cleared the user's failures: two more failures do not lock.
    assert [_post_login(client, "admin", "wrong password!") for _ in range(2)] == [401, 401]


def test_lockout_per_address_across_user_names(strict_app: Flask, console_clock: ManualClock) -> None:
    client = strict_app.test_client()
    names = ["alpha", "bravo", "charlie", "delta", "echo"]
    assert [_post_login(client, n, "wrong password!") for n in names] == [401, 401, 401, 401, 429]
    assert _post_login(client, "admin", PASSWORD) == 429  # this address is locked out
    other = strict_app.test_client()
    token = csrf_of(other.get("/login").data)
    response = other.post("/login", data={"username": "admin", "password": PASSWORD, "csrf_token": token},
                          environ_base={"REMOTE_ADDR": "10.9.8.7"})
    assert response.status_code == 303  # another address is not


def test_unlock_clears_a_user_lockout(strict_app: Flask) -> None:
    client = strict_app.test_client()
    svc: ConsoleServices = strict_app.extensions[EXTENSION]
    for _ in range(3):
        _post_login(client, "admin", "wrong password!")
    assert _post_login(client, "admin", PASSWORD) == 429
    assert svc.accounts.unlock("admin") is True
    assert _post_login(client, "admin", PASSWORD) == 303


# --------------------------------------------------------------------------------------------------
# accounts: disable, role change, own password
# --------------------------------------------------------------------------------------------------
def test_disabling_a_user_ends_their_sessions(client: FlaskClient, users: dict[str, int],
                                              svc: ConsoleServices) -> None:
    login(client, "security")
    assert client.get("/alerts/").status_code == 200
    svc.accounts.set_disabled(users["security"], True, now=svc.now())
    assert client.get("/alerts/").status_code == 302
    assert _post_login(client, "security", PASSWORD) == 401


def test_role_changes_apply_to_open_sessions(client: FlaskClient, users: dict[str, int],
                                             svc: ConsoleServices) -> None:
    login(client, "data_scientist")
    assert client.get("/audit/").status_code == 403
    svc.accounts.set_role(users["data_scientist"], "security", now=svc.now())
    assert client.get("/audit/").status_code == 200


def test_the_last_admin_stays(svc: ConsoleServices, users: dict[str, int]) -> None:
    with pytest.raises(AccountError, match="last enabled admin"):
        svc.accounts.set_role(users["admin"], "security", now=svc.now())
    with pytest.raises(AccountError, match="last enabled admin"):
        svc.accounts.set_disabled(users["admin"], True, now=svc.now())
    second = svc.accounts.add_user("root2", "admin", PASSWORD, now=svc.now())
    svc.accounts.set_role(users["admin"], "security", now=svc.now())
    with pytest.raises(AccountError, match="last enabled admin"):
        svc.accounts.set_disabled(second.id, True, now=svc.now())


def test_change_own_password(client: FlaskClient, users: dict[str, int], svc: ConsoleServices) -> None:
    other = client.application.test_client()
    login(other, "ml_engineer")
    csrf = login(client, "ml_engineer")
    new = "a much better passphrase"
    bad = client.post("/account/password", data={"csrf_token": csrf, "current": "wrong", "new": new,
                                                 "confirm": new})
    assert bad.status_code == 400 and b"current password is wrong" in bad.data
    ok = client.post("/account/password", data={"csrf_token": csrf, "current": PASSWORD, "new": new,
                                                "confirm": new})
    assert ok.status_code == 303
    assert client.get("/").status_code == 200      # this session stays
    assert other.get("/").status_code == 302       # the other one ended
    assert _post_login(client.application.test_client(), "ml_engineer", new) == 303
    assert ("ml_engineer", "user.password_change", "user:ml_engineer") in _actions(svc)


# --------------------------------------------------------------------------------------------------
# API tokens
# --------------------------------------------------------------------------------------------------
def test_bearer_tokens(client: FlaskClient, svc: ConsoleServices, console_clock: ManualClock) -> None:
    record, secret = svc.accounts.create_token("ci", "security", created_by="test", now=svc.now(),
                                               expires_at=svc.now() + 10 * MIN)
    auth = {"Authorization": f"Bearer {secret}"}
    assert client.get("/alerts/", headers=auth).status_code == 200
    assert client.get("/users/", headers=auth).status_code == 403
    # A bearer request is never redirected to the login page: 401 with JSON and a challenge.
    bad = client.get("/alerts/", headers={"Authorization": "Bearer fst_not-a-token"})
    assert bad.status_code == 401 and bad.is_json and bad.headers["WWW-Authenticate"].startswith("Bearer")
    # Stored hashed: the secret is nowhere in the table.
    with svc.engine.connect() as conn:
        rows = conn.execute(select(models.SQLModel.metadata.tables["apitoken"])).all()
    assert secret not in repr(rows) and record.prefix == secret[:10]
    console_clock.advance(10 * MIN)
    assert client.get("/alerts/", headers=auth).status_code == 401  # expired
    _, second = svc.accounts.create_token("ci2", "admin", created_by="test", now=svc.now())
    assert client.get("/users/", headers={"Authorization": f"Bearer {second}"}).status_code == 200
    svc.accounts.revoke_token(next(t.id for t in svc.accounts.tokens() if t.name == "ci2"), now=svc.now())
    assert client.get("/users/", headers={"Authorization": f"Bearer {second}"}).status_code == 401


def test_a_bearer_header_never_falls_back_to_the_cookie(client: FlaskClient, users: dict[str, int]) -> None:
    login(client, "admin")
    assert client.get("/users/", headers={"Authorization": "Bearer fst_wrong"}).status_code == 401


def test_accounts_without_flask(console_config: ServerConfig, svc: ConsoleServices) -> None:
    """The CLI uses Accounts directly: login works there as in the app."""
    accounts = Accounts(svc.engine, dataclasses.replace(console_config.console))
    accounts.add_user("cli-user", "security", PASSWORD, now=1000)
    result = accounts.login("cli-user", PASSWORD, ip="127.0.0.1", user_agent="test", now=2000)
    assert result.ok and result.session_token
    principal = accounts.session_principal(result.session_token, now=3000)
    assert principal is not None and (principal.name, principal.role) == ("cli-user", "security")
