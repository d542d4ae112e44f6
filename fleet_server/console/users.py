"""Users and roles, and API tokens (Admin only): add a user (a generated password is shown once),
change a role, disable or enable, reset a password, clear a login lockout; create and revoke API
tokens (the token is shown once). Every change is written to the audit log. The last enabled admin
can neither be demoted nor disabled, and nobody disables their own account.
"""

from __future__ import annotations

from flask import Blueprint, abort, redirect, render_template, request, url_for
from werkzeug.wrappers import Response as BaseResponse

from fleet_server.console.accounts import AccountError, generate_password
from fleet_server.console.auth import current_principal
from fleet_server.console.rbac import MATRIX, Principal, Right, Role, require
from fleet_server.console.services import services

bp = Blueprint("users", __name__)

DAY_MS = 86_400_000
DONE = {"role": "Role changed.", "disabled": "User disabled; their sessions ended.",
        "enabled": "User enabled.", "unlocked": "Login lockout cleared.", "revoked": "API token revoked."}


def _principal() -> Principal:
    principal = current_principal()
    if principal is None:  # pragma: no cover - require() ran first
        abort(401)
    return principal


def _page(*, error: str | None = None, secret: tuple[str, str, str] | None = None, status: int = 200
          ) -> tuple[str, int]:
    svc = services()
    now = svc.now()
    return render_template("users.html", users=svc.accounts.users(), tokens=svc.accounts.tokens(), now=now,
                           roles=list(Role), matrix=MATRIX, rights=list(Right), error=error, secret=secret,
                           done=DONE.get(request.args.get("done", ""))), status


@bp.get("/")
@require(Right.MANAGE_USERS)
def index() -> tuple[str, int]:
    return _page()


@bp.post("/new")
@require(Right.MANAGE_USERS)
def create() -> tuple[str, int]:
    svc, principal = services(), _principal()
    name = request.form.get("name", "").strip()[:64]
    role = request.form.get("role", "")[:32]
    password = generate_password()
    try:
        user = svc.accounts.add_user(name, role, password, now=svc.now())
    except AccountError as exc:
        return _page(error=exc.diagnostics(), status=400)
    svc.record(principal, "user.add", f"user:{user.name}", {"role": user.role})
    return _page(secret=("password", user.name, password))


def _user_or_404(user_id: int) -> None:
    if services().accounts.user(user_id=user_id) is None:
        abort(404)


@bp.post("/<int(max=9223372036854775807):user_id>/role")
@require(Right.MANAGE_USERS)
def set_role(user_id: int) -> BaseResponse | tuple[str, int]:
    svc, principal = services(), _principal()
    _user_or_404(user_id)
    try:
        user, before = svc.accounts.set_role(user_id, request.form.get("role", "")[:32], now=svc.now())
    except AccountError as exc:
        return _page(error=exc.diagnostics(), status=400)
    svc.record(principal, "user.set_role", f"user:{user.name}", {"from": before, "to": user.role})
    return redirect(url_for("users.index", done="role"), code=303)


@bp.post("/<int(max=9223372036854775807):user_id>/disable")
@require(Right.MANAGE_USERS)
def disable(user_id: int) -> BaseResponse | tuple[str, int]:
    svc, principal = services(), _principal()
    _user_or_404(user_id)
    if principal.kind == "user" and principal.id == user_id:
        return _page(error="You cannot disable your own account.", status=400)
    try:
        user = svc.accounts.set_disabled(user_id, True, now=svc.now())
    except AccountError as exc:
        return _page(error=exc.diagnostics(), status=400)
    svc.record(principal, "user.disable", f"user:{user.name}")
    return redirect(url_for("users.index", done="disabled"), code=303)


@bp.post("/<int(max=9223372036854775807):user_id>/enable")
@require(Right.MANAGE_USERS)
def enable(user_id: int) -> BaseResponse | tuple[str, int]:
    svc, principal = services(), _principal()
    _user_or_404(user_id)
    user = svc.accounts.set_disabled(user_id, False, now=svc.now())
    svc.record(principal, "user.enable", f"user:{user.name}")
    return redirect(url_for("users.index", done="enabled"), code=303)


@bp.post("/<int(max=9223372036854775807):user_id>/reset-password")
@require(Right.MANAGE_USERS)
def reset_password(user_id: int) -> tuple[str, int]:
    svc, principal = services(), _principal()
    _user_or_404(user_id)
    password = generate_password()
    user = svc.accounts.set_password(user_id, password, now=svc.now())
    svc.record(principal, "user.reset_password", f"user:{user.name}")
    return _page(secret=("password", user.name, password))


@bp.post("/<int(max=9223372036854775807):user_id>/unlock")
@require(Right.MANAGE_USERS)
def unlock(user_id: int) -> BaseResponse:
    svc, principal = services(), _principal()
    user = svc.accounts.user(user_id=user_id)
    if user is None:
        abort(404)
    cleared = svc.accounts.unlock(user.name)
    svc.record(principal, "user.unlock", f"user:{user.name}", {"was_locked": cleared})
    return redirect(url_for("users.index", done="unlocked"), code=303)


@bp.post("/tokens/new")
@require(Right.MANAGE_USERS)
def create_token() -> tuple[str, int]:
    svc, principal = services(), _principal()
    name = request.form.get("name", "").strip()[:64]
    role = request.form.get("role", "")[:32]
    days_text = request.form.get("days", "").strip()
    now = svc.now()
    try:
        days = int(days_text) if days_text else 0
        if not 0 <= days <= 3650:
            raise ValueError
    except ValueError:
        return _page(error="Expiry: a number of days between 0 (never) and 3650.", status=400)
    try:
        record, secret = svc.accounts.create_token(name, role, created_by=principal.actor, now=now,
                                                   expires_at=now + days * DAY_MS if days else None)
    except AccountError as exc:
        return _page(error=exc.diagnostics(), status=400)
    svc.record(principal, "token.create", f"token:{record.name}",
               {"role": record.role, "prefix": record.prefix, "expires_at": record.expires_at})
    return _page(secret=("token", record.name, secret))


@bp.post("/tokens/<int(max=9223372036854775807):token_id>/revoke")
@require(Right.MANAGE_USERS)
def revoke_token(token_id: int) -> BaseResponse | tuple[str, int]:
    svc, principal = services(), _principal()
    try:
        record = svc.accounts.revoke_token(token_id, now=svc.now())
    except AccountError as exc:
        if not any(t.id == token_id for t in svc.accounts.tokens()):
            abort(404)
        return _page(error=exc.diagnostics(), status=400)
    svc.record(principal, "token.revoke", f"token:{record.name}")
    return redirect(url_for("users.index", done="revoked"), code=303)
