"""The fleet admin web console: Flask, one blueprint per area, server-rendered Jinja templates.

:func:`create_app` is the application factory (the ``flaskr`` pattern). It runs inside
``fleet-server run`` (a thread serving it with waitress, ``[console] enabled = true``), alone with
``fleet-server console``, or behind any WSGI server::

    FLEET_SERVER_CONFIG=/srv/fleet/server.toml waitress-serve --call fleet_server.console:create_app
    FLEET_SERVER_CONFIG=/srv/fleet/server.toml gunicorn 'fleet_server.console:create_app()'

Modules: :mod:`~fleet_server.console.rbac` (roles, rights, the matrix, route decorators),
:mod:`~fleet_server.console.accounts` (users, passwords, sessions, API tokens, throttling),
:mod:`~fleet_server.console.auth` (principal, login/logout), :mod:`~fleet_server.console.security`
(CSRF, headers, errors), :mod:`~fleet_server.console.audit` (hash-chained audit log),
:mod:`~fleet_server.console.queries` (read model), :mod:`~fleet_server.console.bootlog` (event log
against reference values), and the blueprints ``dashboard``, ``devices``, ``policies``, ``models``
(pages and the model actions), ``alerts``, ``users``, ``auditlog``, ``api`` (the JSON API under
``/api/v1``, described by :mod:`~fleet_server.console.openapi`) and ``metrics`` (``/metrics``).

Flask is imported only when an application is built, so that the CLI's audit helpers
(:mod:`fleet_server.console.audit`) and accounts work without loading the web stack.

Adding routes: write a blueprint (or a view in one), register it in
:func:`fleet_server.console.app.build_app`, and declare every view's requirement with
:func:`~fleet_server.console.rbac.require` (a :class:`~fleet_server.console.rbac.Right`),
:func:`~fleet_server.console.rbac.login_required` or :func:`~fleet_server.console.rbac.public`; an
undeclared view is refused with 403 and fails ``tests/test_console_rbac.py``, whose walk checks every
new route for every role. An ``/api/v1`` route also needs its operation in
:data:`fleet_server.console.openapi.OPERATIONS` (``tests/test_console_api.py`` compares them).
Inside a view, :func:`fleet_server.console.auth.current_principal` is the caller (a user from the
session cookie, or an API token from ``Authorization: Bearer``),
``services().record(principal, action, target, details)`` writes the audit entry, and
:func:`fleet_server.console.security.error_response` gives the JSON error for ``/api/`` paths and
bearer requests. Bearer requests need no CSRF token; browser JavaScript calling the API with the
session cookie sends the token of ``<meta name="csrf-token">`` as ``X-CSRF-Token``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flask import Flask

    from fleet_server.config import ServerConfig


def create_app(config: ServerConfig | str | Path | None = None, *, clock: Callable[[], int] | None = None,
               flask_config: Mapping[str, Any] | None = None) -> Flask:
    """Build the console application.

    ``config``: a loaded :class:`~fleet_server.config.ServerConfig`, a path to ``server.toml``, or
    None (``$FLEET_SERVER_CONFIG``, else ``./server.toml``). ``clock`` (ms since the epoch) replaces
    the system clock (tests); ``flask_config`` is merged into ``app.config`` (e.g. ``TESTING``).
    """
    from fleet_server.console.app import build_app

    return build_app(config, clock=clock, flask_config=flask_config)
