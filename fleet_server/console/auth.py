"""Authentication in the web layer: who the request comes from, the check behind every route's
declared right, and the login, logout and own-account pages.

A request's principal comes from ``Authorization: Bearer <API token>`` if present (then never from a
cookie), else from the session cookie (see :mod:`fleet_server.console.accounts` for sessions,
passwords and throttling). :func:`enforce` is what :func:`fleet_server.console.rbac.require` runs:
no principal -> redirect to the login page (browsers asking for a page) or 401; principal without
the right -> 403.

Session cookie: ``HttpOnly``, ``SameSite=Strict``, ``Secure`` (and the ``__Host-`` name prefix) unless
``console.secure_cookies`` is off for plain-http development.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from flask import Blueprint, g, redirect, render_template, request, url_for
from werkzeug.wrappers import Response as BaseResponse

from fleet_server.console.accounts import MAX_PASSWORD, AccountError
from fleet_server.console.rbac import (
    MATRIX,
    PUBLIC,
    Declared,
    Principal,
    Right,
    Role,
    login_required,
    public,
)
from fleet_server.console.security import (
    LOGIN_SEED_COOKIE,
    error_response,
    is_bearer,
    session_cookie_name,
    wants_json,
)
from fleet_server.console.services import services

bp = Blueprint("auth", __name__)


def current_principal() -> Principal | None:
    """The principal of this request (resolved once per request)."""
    if "principal" in g:
        found: Principal | None = g.principal
        return found
    svc = services()
    now = svc.now()
    principal: Principal | None = None
    if is_bearer():
        principal = svc.accounts.token_principal(request.headers["Authorization"][7:].strip(), now=now)
    else:
        cookie = request.cookies.get(session_cookie_name(svc.settings.secure_cookies))
        if cookie:
            principal = svc.accounts.session_principal(cookie, now=now)
    g.principal = principal
    return principal


def enforce(requirement: Declared) -> BaseResponse | None:
    """None if the request may proceed, else the refusal (see the module docstring)."""
    if requirement == PUBLIC:
        return None
    principal = current_principal()
    if principal is None:
        if request.method == "GET" and not wants_json():
            target = request.full_path if request.query_string else request.path
            return redirect(url_for("auth.login", next=target))
        return error_response(401)
    if isinstance(requirement, Right) and not principal.can(requirement):
        return error_response(403)
    return None


def client_ip() -> str:
    return (request.remote_addr or "unknown")[:64]


def safe_next(target: str | None) -> str:
    """A local path to go to after login (never another site: ``//host`` and schemes are refused)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return url_for("dashboard.index")
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return url_for("dashboard.index")
    return target


# --------------------------------------------------------------------------------------------------
# login / logout
# --------------------------------------------------------------------------------------------------
@bp.get("/login")
@public
def login() -> BaseResponse | str:
    if current_principal() is not None:
        return redirect(safe_next(request.args.get("next")))
    return render_template("login.html", next=request.args.get("next", ""), error=None, name="")


@bp.post("/login")
@public
def login_post() -> BaseResponse | tuple[str, int]:
    svc = services()
    name = request.form.get("username", "").strip()[:64]
    password = request.form.get("password", "")[:MAX_PASSWORD]
    target = request.form.get("next", "")
    now = svc.now()
    result = svc.accounts.login(name, password, ip=client_ip(), user_agent=request.user_agent.string,
                                now=now)
    if not result.ok or result.session_token is None or result.user is None:
        if result.reason != "locked":
            # Attempts while a lockout lasts are not recorded (nobody can fill the log with them);
            # the failure that starts a lockout is.
            action = "login.lockout" if result.locked else "login.failed"
            svc.audit.append(actor="anonymous", action=action, target=f"user:{name}",
                             details={"ip": client_ip(), "reason": result.reason}, now=now)
        if result.locked:
            message, status = "Too many failed attempts: this account or address is locked for a while.", 429
        else:
            message, status = "Wrong user name or password.", 401
        return render_template("login.html", next=target, error=message, name=name), status
    svc.audit.append(actor=result.user.name, action="login", target=f"user:{result.user.name}",
                     details={"ip": client_ip()}, now=now)
    response = redirect(safe_next(target), code=303)
    response.set_cookie(session_cookie_name(svc.settings.secure_cookies), result.session_token,
                        max_age=svc.settings.session_max_ms // 1000, secure=svc.settings.secure_cookies,
                        httponly=True, samesite="Strict", path="/")
    response.delete_cookie(LOGIN_SEED_COOKIE, path="/", secure=svc.settings.secure_cookies, httponly=True,
                           samesite="Strict")
    g.pop("login_seed", None)
    return response


@bp.post("/logout")
@login_required
def logout() -> BaseResponse:
    svc = services()
    principal = current_principal()
    if principal is not None and principal.session_id_sha256 is not None:
        svc.accounts.end_session(principal.session_id_sha256, hashed=True)
        svc.record(principal, "logout", f"user:{principal.name}")
    response = redirect(url_for("auth.login"), code=303)
    response.delete_cookie(session_cookie_name(svc.settings.secure_cookies), path="/",
                           secure=svc.settings.secure_cookies, httponly=True, samesite="Strict")
    return response


# --------------------------------------------------------------------------------------------------
# own account
# --------------------------------------------------------------------------------------------------
def _account_page(error: str | None = None, done: bool = False, status: int = 200) -> tuple[str, int]:
    principal = current_principal()
    assert principal is not None  # login_required ran
    try:
        rights = sorted(MATRIX[Role(principal.role)])
    except ValueError:
        rights = []
    return render_template("account.html", rights=rights, error=error, done=done), status


@bp.get("/account")
@login_required
def account() -> tuple[str, int]:
    return _account_page(done=request.args.get("done") == "password")


@bp.post("/account/password")
@login_required
def account_password() -> BaseResponse | tuple[str, int]:
    svc = services()
    principal = current_principal()
    assert principal is not None
    if principal.kind != "user":
        return error_response(400, "API tokens have no password.")
    current = request.form.get("current", "")[:MAX_PASSWORD]
    new = request.form.get("new", "")[:MAX_PASSWORD]
    if new != request.form.get("confirm", "")[:MAX_PASSWORD]:
        return _account_page("The new passwords differ.", status=400)
    if not svc.accounts.verify_password(principal.id, current):
        return _account_page("The current password is wrong.", status=400)
    try:
        svc.accounts.set_password(principal.id, new, now=svc.now(),
                                  keep_session_sha256=principal.session_id_sha256)
    except AccountError as exc:
        return _account_page(exc.diagnostics(), status=400)
    svc.record(principal, "user.password_change", f"user:{principal.name}")
    return redirect(url_for("auth.account", done="password"), code=303)
