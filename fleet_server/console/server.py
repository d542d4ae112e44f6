"""Serving the console with waitress (a production WSGI server, pure Python): in a background thread of
``fleet-server run`` (:func:`start_console`) or in the foreground (``fleet-server console``).

Waitress serves plain HTTP; put TLS in front (a reverse proxy such as nginx or Caddy, with
``console.proxy_hops`` set so the client address and scheme are taken from ``X-Forwarded-*``), or
bind to 127.0.0.1 for local use (docs/operations.md).
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any

from waitress import wasyncore
from waitress.server import create_server

from fleet_server.config import ServerConfig
from fleet_server.migrations import upgrade
from fleet_server.service.common import log_event
from fleet_server.storage.db import create_engine
from protocol.errors import ConfigError

log = logging.getLogger("fleet_server.console")


class ConsoleServer:
    """A waitress server for a WSGI application, run on a thread; :meth:`stop` ends it."""

    def __init__(self, app: Any, *, host: str, port: int, threads: int = 8,
                 behind_proxy: bool = False) -> None:
        # Waitress strips X-Forwarded-* unless told otherwise; behind a proxy the application's ProxyFix
        # (console.proxy_hops) decides which of them to believe.
        try:
            if port:  # a failed bind inside waitress leaks its sockets: try the address first
                family = socket.AF_INET6 if ":" in host else socket.AF_INET
                socket.create_server((host, port), family=family).close()
            self._server: Any = create_server(app, host=host, port=port, threads=threads,
                                              ident="fleet-console",
                                              clear_untrusted_proxy_headers=not behind_proxy)
        except OSError as exc:  # address in use, not ours to bind, unknown host
            raise ConfigError(f"console: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) actually bound (port 0 picks a free one)."""
        return str(self._server.effective_host), int(self._server.effective_port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}"

    def serve_forever(self) -> None:
        """Serve in the calling thread until :meth:`stop` (or Ctrl-C)."""
        self._server.run()

    def start(self) -> ConsoleServer:
        self._thread = threading.Thread(target=self.serve_forever, name="fleet-console", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, finish running requests (up to ``timeout``), close every connection."""
        self._server.task_dispatcher.shutdown(timeout=timeout)
        wasyncore.close_all(self._server._map)
        if self._thread is not None:
            self._thread.join(timeout)


def start_console(config: ServerConfig) -> ConsoleServer:
    """Migrate the database if needed, build the app and serve it on a thread (``fleet-server run``)."""
    from fleet_server.console import create_app

    engine = create_engine(config.database_url)
    try:
        upgrade(engine)
    finally:
        engine.dispose()
    settings = config.console
    server = ConsoleServer(create_app(config), host=settings.host, port=settings.port,
                           threads=settings.threads, behind_proxy=settings.proxy_hops > 0).start()
    log_event(log, logging.INFO, "console_started", url=server.url, secure_cookies=settings.secure_cookies)
    return server
