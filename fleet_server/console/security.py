"""HTTP hardening of the console: CSRF protection, security headers, error pages, and the fail-closed
check that every route declares its right.

**CSRF.** Every state-changing request (POST, PUT, PATCH, DELETE) must carry a token, in the form
field ``csrf_token`` or the header ``X-CSRF-Token``, else it is refused with 400 before the view
runs. The token is HMAC-SHA256 keyed with the session id from the cookie (for the login form: a
random pre-session cookie), so it needs no server-side storage and cannot be derived from the
database (which holds only the session id's hash). Requests authenticated with
``Authorization: Bearer`` (API tokens) are exempt: a browser never adds that header on its own. A
browser's ``Sec-Fetch-Site: cross-site`` on a state-changing request is refused as well.

**Headers** on every response: a Content-Security-Policy without inline scripts or styles
(``default-src 'self'``, ``frame-ancestors 'none'``), ``X-Content-Type-Options``,
``Referrer-Policy``, ``X-Frame-Options: DENY``, ``Permissions-Policy``, cross-origin isolation
headers, ``Cache-Control: no-store`` (except static files) and HSTS when cookies are ``Secure``.

**Errors** render a short page (or JSON for API requests) with the status and a generic text; a
traceback goes to the log only.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets

from flask import Flask, Response, current_app, g, jsonify, render_template, request
from werkzeug.exceptions import HTTPException

from fleet_server.console.rbac import required_of
from protocol.errors import EdgeError, StorageError

log = logging.getLogger("fleet_server.console")

UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
LOGIN_SEED_COOKIE = "console_login_seed"

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "font-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
       "frame-ancestors 'none'")
HEADERS: dict[str, str] = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=(), usb=(), interest-cohort=()",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}

ERROR_TEXT: dict[int, tuple[str, str]] = {
    400: ("Bad request", "The request was not understood, or its security token is missing or expired. "
                         "Reload the page and try again."),
    401: ("Login required", "Log in to continue."),
    403: ("Forbidden", "Your role does not allow this."),
    404: ("Not found", "There is nothing at this address."),
    405: ("Method not allowed", "This address does not accept that kind of request."),
    409: ("Conflict", "The request conflicts with the current state."),
    413: ("Too large", "The request is too large."),
    429: ("Too many attempts", "Too many attempts. Wait a while and try again."),
    500: ("Server error", "Something went wrong on the server. The error was logged."),
    503: ("Unavailable", "The database is not available right now. Try again shortly."),
}


# --------------------------------------------------------------------------------------------------
# CSRF
# --------------------------------------------------------------------------------------------------
def csrf_token_for(binding: str) -> str:
    """The CSRF token of a session (or pre-session) id."""
    return hmac.new(binding.encode("utf-8"), b"fleet-console csrf v1", hashlib.sha256).hexdigest()


def session_cookie_name(secure: bool) -> str:
    """``__Host-`` cookies are refused by browsers unless Secure, host-only and Path=/ (hardening)."""
    return "__Host-console_session" if secure else "console_session"


def _binding() -> str | None:
    from fleet_server.console.services import services

    cookie = request.cookies.get(session_cookie_name(services().settings.secure_cookies))
    return cookie or request.cookies.get(LOGIN_SEED_COOKIE)


def csrf_token() -> str:
    """The CSRF token for forms of this response (creating a pre-session seed cookie if needed)."""
    binding = _binding() or g.get("login_seed")
    if binding is None:
        binding = g.login_seed = secrets.token_urlsafe(32)
    return csrf_token_for(binding)


def is_bearer() -> bool:
    return request.headers.get("Authorization", "").startswith("Bearer ")


def csrf_ok() -> bool:
    """True if this state-changing request carries the right token (or is token-authenticated)."""
    if is_bearer():
        return True
    binding = _binding()
    if binding is None:
        return False
    sent = request.headers.get(CSRF_HEADER) or request.form.get(CSRF_FIELD, "")
    return bool(sent) and hmac.compare_digest(sent, csrf_token_for(binding))


# --------------------------------------------------------------------------------------------------
# error pages
# --------------------------------------------------------------------------------------------------
def wants_json() -> bool:
    """API clients get JSON errors: ``/api/`` paths, bearer tokens, or an Accept header preferring it."""
    if request.path.startswith("/api/") or is_bearer():
        return True
    best = request.accept_mimetypes.best_match(["text/html", "application/json"])
    accept = request.accept_mimetypes
    return best == "application/json" and accept[best] > accept["text/html"]


def error_response(status: int, detail: str | None = None) -> Response:
    title, text = ERROR_TEXT.get(status, ERROR_TEXT[500] if status >= 500 else ERROR_TEXT[400])
    if wants_json():
        response = jsonify({"error": title.lower().replace(" ", "_"), "status": status,
                            "detail": detail or text})
    else:
        response = Response(render_template("error.html", status=status, title=title, text=detail or text),
                            mimetype="text/html")
    response.status_code = status
    if status == 401 and wants_json():
        response.headers["WWW-Authenticate"] = 'Bearer realm="fleet-console"'
    return response


def _http_error(exc: HTTPException) -> Response:
    status = exc.code or 500
    response = error_response(status)
    if status == 405 and exc.get_response().headers.get("Allow"):
        response.headers["Allow"] = exc.get_response().headers["Allow"]
    return response


def _unexpected(exc: Exception) -> Response:
    if isinstance(exc, HTTPException):
        return _http_error(exc)
    if isinstance(exc, StorageError):
        log.warning("event=console_storage_error path=%s error=%s", request.path, exc.diagnostics())
        return error_response(503)
    if isinstance(exc, EdgeError):
        log.warning("event=console_error path=%s error=%s", request.path, exc.diagnostics())
        return error_response(500)
    log.error("event=console_exception path=%s error=%s", request.path, type(exc).__name__, exc_info=True)
    return error_response(500)


# --------------------------------------------------------------------------------------------------
# installation
# --------------------------------------------------------------------------------------------------
def _before() -> Response | None:
    if request.endpoint is not None:
        view = current_app.view_functions.get(request.endpoint)
        if view is not None and required_of(view) is None:
            # Fail closed: a route that declares no right is never served.
            log.error("event=console_route_undeclared endpoint=%s", request.endpoint)
            return error_response(403)
    if _has_nul():
        # No text column takes a NUL (PostgreSQL refuses it): refuse it here, for every route.
        return error_response(400, "The request contains a NUL character.")
    if request.method in UNSAFE_METHODS:
        if request.headers.get("Sec-Fetch-Site") == "cross-site" and not is_bearer():
            return error_response(403, "Cross-site requests are refused.")
        if not csrf_ok():
            return error_response(400, "The security token (CSRF) of this form is missing or expired. "
                                       "Reload the page and try again.")
    return None


def _has_nul() -> bool:
    if "\x00" in request.path:
        return True
    for values in (request.args, request.form if request.method in UNSAFE_METHODS else None):
        if values is not None and any("\x00" in k or "\x00" in v for k, v in values.items(multi=True)):
            return True
    return False


def _after(response: Response) -> Response:
    from fleet_server.console.services import services

    settings = services().settings
    for name, value in HEADERS.items():
        response.headers.setdefault(name, value)
    if request.endpoint != "static":
        response.headers["Cache-Control"] = "no-store"
        response.headers["Pragma"] = "no-cache"
    if settings.secure_cookies:
        response.headers.setdefault("Strict-Transport-Security", "max-age=31536000; includeSubDomains")
    seed = g.get("login_seed")
    if seed is not None:
        response.set_cookie(LOGIN_SEED_COOKIE, seed, max_age=3600, secure=settings.secure_cookies,
                            httponly=True, samesite="Strict", path="/")
    return response


def install(app: Flask) -> None:
    """Register the CSRF check, the headers and the error handlers on ``app``."""
    app.before_request(_before)
    app.after_request(_after)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected)
