"""The application factory behind :func:`fleet_server.console.create_app` (see the package docstring)."""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flask import Flask
from sqlalchemy import text
from werkzeug.middleware.proxy_fix import ProxyFix

from fleet_server.config import ServerConfig, find_config, load_config
from fleet_server.console import (
    alerts,
    api,
    auditlog,
    auth,
    dashboard,
    devices,
    metrics,
    models,
    policies,
    releases,
    rollouts,
    security,
    updates,
    users,
)
from fleet_server.console.accounts import Accounts
from fleet_server.console.audit import AuditLog, Checkpointing
from fleet_server.console.queries import ConsoleQueries
from fleet_server.console.rbac import AUTHENTICATED, Declared, Right, public
from fleet_server.console.services import EXTENSION, ConsoleServices, services, system_now_ms
from fleet_server.storage.db import create_engine
from fleet_server.storage.repo import Repository
from protocol.errors import EdgeError

MAX_REQUEST_BYTES = 1 << 20

# Navigation: (endpoint, label, what it needs).
NAV: tuple[tuple[str, str, Declared], ...] = (
    ("dashboard.index", "Dashboard", Right.VIEW_FLEET),
    ("devices.index", "Devices", Right.VIEW_FLEET),
    ("policies.index", "Policies", Right.VIEW_FLEET),
    ("releases.index", "Releases", Right.VIEW_FLEET),
    ("rollouts.index", "Rollouts", Right.VIEW_FLEET),
    ("models.index", "Models", Right.MODEL_READ),
    ("alerts.index", "Alerts", Right.VIEW_FLEET),
    ("auditlog.index", "Audit log", Right.VIEW_AUDIT),
    ("users.index", "Users", Right.MANAGE_USERS),
)


def _load(config: ServerConfig | str | Path | None) -> ServerConfig:
    if isinstance(config, ServerConfig):
        return config
    return load_config(find_config(config))


def iso_time(ms: int | None) -> str:
    """``2026-01-02 03:04:05 UTC`` for a time in ms, ``-`` for None."""
    if ms is None:
        return "-"
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


# Words for the model-protection tables' columns (the rest: "created_at" -> "Created at").
_COLUMN_LABELS = {"day": "Date (UTC)", "last_until": "Latest period until", "device_id": "Device",
                  "statistic_micro": "Extraction statistic", "kek_id": "KEK", "lease_id": "Lease",
                  "package_id": "Package id", "plaintext_size": "Model size", "client": "Client app"}


def column_label(name: str) -> str:
    """A column name in words."""
    return _COLUMN_LABELS.get(name) or name.replace("_", " ").capitalize()


def cell(value: Any, column: str) -> str:
    """A table value as a reader wants it: dates as dates, sizes in bytes, flags as yes/no."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        if column == "day":  # days since the epoch (UTC)
            return (dt.date(1970, 1, 1) + dt.timedelta(days=value)).isoformat()
        if column.endswith(("_at", "_until")):
            return iso_time(value) if value > 0 else "-"
        if column.endswith("_size"):
            return f"{value:,} bytes"
        if column == "statistic_micro":
            return f"{value / 1e6:.3f}"
        return f"{value:,}"
    return str(value)


def ago(ms: int | None, now: int | None = None) -> str:
    """``5 s ago`` / ``3 min ago`` / ``in 2 h`` relative to now."""
    if ms is None:
        return "-"
    delta = (now if now is not None else services().now()) - ms
    future = delta < 0
    delta = abs(delta) // 1000
    if delta < 60:
        text_ = f"{delta} s"
    elif delta < 3600:
        text_ = f"{delta // 60} min"
    elif delta < 86400 * 2:
        text_ = f"{delta // 3600} h"
    else:
        text_ = f"{delta // 86400} d"
    return f"in {text_}" if future else f"{text_} ago"


def build_app(config: ServerConfig | str | Path | None = None, *, clock: Callable[[], int] | None = None,
              flask_config: Mapping[str, Any] | None = None) -> Flask:
    """See :func:`fleet_server.console.create_app`."""
    cfg = _load(config)
    settings = cfg.console
    engine = create_engine(cfg.database_url)
    svc = ConsoleServices(config=cfg, engine=engine, repo=Repository(engine),
                          accounts=Accounts(engine, settings),
                          audit=AuditLog(engine, Checkpointing.from_settings(cfg.audit)),
                          queries=ConsoleQueries(engine), clock=clock or system_now_ms)

    app = Flask("fleet_server.console", static_folder="static", template_folder="templates")
    app.config.update(
        SECRET_KEY=secrets.token_bytes(32),  # Flask's own session is not used; sessions live in the DB
        DEBUG=settings.development,
        PROPAGATE_EXCEPTIONS=False,
        MAX_CONTENT_LENGTH=MAX_REQUEST_BYTES,
        TEMPLATES_AUTO_RELOAD=settings.development,
        SESSION_COOKIE_SECURE=settings.secure_cookies,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        SEND_FILE_MAX_AGE_DEFAULT=3600,
    )
    if flask_config:
        app.config.update(flask_config)
    if not settings.development:
        app.debug = False  # never debug (tracebacks, the debugger) outside development
    if settings.proxy_hops:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.proxy_hops,  # type: ignore[method-assign]
                                x_proto=settings.proxy_hops, x_host=settings.proxy_hops)
    app.extensions[EXTENSION] = svc

    security.install(app)
    app.register_blueprint(auth.bp)
    app.register_blueprint(dashboard.bp)
    app.register_blueprint(devices.bp, url_prefix="/devices")
    app.register_blueprint(policies.bp, url_prefix="/policies")
    app.register_blueprint(releases.bp, url_prefix="/releases")
    app.register_blueprint(rollouts.bp, url_prefix="/rollouts")
    app.register_blueprint(models.bp, url_prefix="/models")
    app.register_blueprint(alerts.bp, url_prefix="/alerts")
    app.register_blueprint(users.bp, url_prefix="/users")
    app.register_blueprint(auditlog.bp, url_prefix="/audit")
    app.register_blueprint(api.bp, url_prefix=api.PREFIX)
    app.register_blueprint(metrics.bp)
    app.register_blueprint(updates.bp, url_prefix="/updates")

    static_view = app.view_functions["static"]

    @public
    def static(filename: str) -> Any:
        return static_view(filename=filename)

    app.view_functions["static"] = static

    @app.get("/healthz")
    @public
    def healthz() -> tuple[dict[str, str], int]:
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception:  # any database failure means "not healthy"
            return {"status": "database unavailable"}, 503
        return {"status": "ok"}, 200

    app.jinja_env.filters["time"] = iso_time
    app.jinja_env.filters["ago"] = ago
    app.jinja_env.filters["column_label"] = column_label
    app.jinja_env.filters["cell"] = cell
    # Globals (not only context): macros imported from _macros.html see them too.
    app.jinja_env.globals["csrf_token"] = security.csrf_token

    @app.context_processor
    def _globals() -> dict[str, Any]:
        try:
            principal = auth.current_principal()
        except EdgeError:  # the database is down: still render the error page
            principal = None

        def can(right: Right) -> bool:
            return principal is not None and principal.can(right)

        nav = [(endpoint, label) for endpoint, label, need in NAV
               if principal is not None
               and (need == AUTHENTICATED or (isinstance(need, Right) and can(need)))]
        return {"principal": principal, "can": can, "Right": Right,
                "nav": nav, "refresh_seconds": settings.dashboard_refresh_seconds}

    return app


def dispose(app: Flask) -> None:
    """Close the application's database connections (tests, shutdown)."""
    app.extensions[EXTENSION].engine.dispose()
