"""Local inference API for apps on the device (stdlib HTTP; no web framework on the device).

Listens on loopback TCP or on a Unix socket (file mode 0600, set between ``bind`` and ``listen`` so
no other user can ever connect). Routes::

    GET  /v1/health                       -> 200 {"status": "ok", "models": {name: {"locked": bool}}}
    POST /v1/models/<name>:predict        -> 200 {"model": name, "outputs": {...}}
         Authorization: Bearer <token>
         {"inputs": {"<input name>": <number or nested lists>}}

Refusals answer with the status of the :class:`~agent.inference.InferenceRefused` (401, 403, 429,
400, 423; 500 for a failed inference) and ``{"error": {"code": ..., "message": ...}}``; 429 adds
``Retry-After``, 401 adds ``WWW-Authenticate: Bearer``. Transport limits: a body needs a
``Content-Length`` of at most ``max_body`` bytes (411/413 otherwise, the body is not read); reads
time out; at most ``max_connections`` connections are served at once (503 beyond). No traceback
ever reaches a response or stderr: every request is audited by the guard instead.

:class:`InferenceApi` is the transport-independent core (method, path, headers, body -> status,
headers, body); the server classes only move bytes.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import math
import os
import re
import socket
import socketserver
import stat
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from agent.inference import InferenceRefused, InvalidInput, RateLimited
from agent.inference.guard import InferenceGuard
from protocol.errors import ConfigError

__all__ = ["ApiConfig", "InferenceApi", "TcpInferenceServer", "UnixInferenceServer", "serve_in_thread"]

_PREDICT_RE = re.compile(r"^/v1/models/([A-Za-z0-9][A-Za-z0-9._+-]{0,63}):predict$")
_JSON = "application/json"

Response = tuple[int, dict[str, str], bytes]


@dataclass(frozen=True, slots=True)
class ApiConfig:
    """Transport limits of the local API."""

    max_body: int = 1 << 20
    request_timeout: float = 10.0
    max_connections: int = 32


def _body(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("utf-8")


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    return status, dict(headers or {}), _body({"error": {"code": code, "message": message}})


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _decode_request(body: bytes) -> Mapping[str, Any] | InvalidInput:
    """``{"inputs": {...}}`` -> the inputs mapping, or the ``InvalidInput`` to raise at validation."""
    try:
        obj = json.loads(body.decode("utf-8"), object_pairs_hook=_no_duplicates,
                         parse_constant=_reject_constant)
    except RecursionError:
        return InvalidInput("request body nests too deeply")
    except UnicodeDecodeError:
        return InvalidInput("request body is not UTF-8")
    except ValueError as exc:  # json.JSONDecodeError is a ValueError, as are the hooks' refusals
        return InvalidInput(f"request body is not valid JSON: {str(exc)[:120]}")
    if not isinstance(obj, dict) or set(obj) != {"inputs"} or not isinstance(obj["inputs"], dict):
        return InvalidInput('request body must be {"inputs": {"<name>": <values>}}')
    return obj["inputs"]


def _bearer(headers: Mapping[str, str]) -> str | None:
    value = headers.get("authorization")
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


class InferenceApi:
    """The API's request handling, independent of sockets. ``guards``: model name -> guard."""

    def __init__(self, guards: Mapping[str, InferenceGuard], config: ApiConfig | None = None) -> None:
        self.guards = dict(guards)
        self.config = config or ApiConfig()

    def health(self) -> Response:
        models = {name: {"locked": guard.locked} for name, guard in sorted(self.guards.items())}
        return 200, {}, _body({"status": "ok", "models": models})

    def route(self, method: str, path: str) -> Response | InferenceGuard:
        """The guard a request is for, or the response that ends it (404/405)."""
        path = path.split("?", 1)[0]
        if path == "/v1/health":
            return self.health() if method in ("GET", "HEAD") else _error(405, "method_not_allowed",
                                                                         "use GET", {"Allow": "GET"})
        m = _PREDICT_RE.fullmatch(path)
        guard = self.guards.get(m.group(1)) if m else None
        if guard is None:
            return _error(404, "not_found", "no such endpoint or model")
        if method != "POST":
            return _error(405, "method_not_allowed", "use POST", {"Allow": "POST"})
        return guard

    def predict(self, guard: InferenceGuard, headers: Mapping[str, str], body: bytes) -> Response:
        """Run a predict request (headers with lower-case names) through ``guard``."""
        try:
            outputs = guard.predict(_bearer(headers), _decode_request(body))
        except RateLimited as exc:
            return _error(exc.status, exc.code, exc.diagnostics(),
                          {"Retry-After": str(max(1, math.ceil(exc.retry_after)))})
        except InferenceRefused as exc:
            extra = {"WWW-Authenticate": 'Bearer realm="edge-inference"'} if exc.status == 401 else None
            return _error(exc.status, exc.code, exc.diagnostics(), extra)
        except Exception:  # never a traceback in a response; the guard audited the request
            return _error(500, "internal", "internal error")
        return 200, {}, _body({"model": guard.policy.model, "outputs": outputs})


class _Handler(BaseHTTPRequestHandler):
    """Moves bytes between a socket and :class:`InferenceApi`."""

    protocol_version = "HTTP/1.1"
    server_version = "edge-inference/1"

    def version_string(self) -> str:
        """The ``Server`` header: no Python version on the wire."""
        return self.server_version

    @property
    def _api(self) -> InferenceApi:
        server = self.server
        assert isinstance(server, _ApiServer)
        return server.api

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self._api.config.request_timeout)  # slow clients cannot pin a thread

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Protocol-level errors (malformed request line, unsupported method) as JSON, then close."""
        self.close_connection = True
        if getattr(self, "request_version", "HTTP/0.9") == "HTTP/0.9":
            self.request_version = "HTTP/1.0"  # unparsable request line: answer with a status line anyway
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "Error"
        body = _body({"error": {"code": f"http_{code}", "message": (message or phrase)[:200]}})
        self.send_response(code, phrase)
        self.send_header("Content-Type", _JSON)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD" and code >= 200 and code not in (204, 304):
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the default stderr access log: the guard's audit records every request."""

    def _send(self, response: Response, *, head: bool = False) -> None:
        status, headers, body = response
        self.send_response(status)
        self.send_header("Content-Type", _JSON)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in headers.items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _dispatch(self, method: str) -> None:
        api = self._api
        try:
            target = api.route(method, self.path)
            if not isinstance(target, InferenceGuard):
                if self.headers.get("Content-Length", "0") != "0" or "Transfer-Encoding" in self.headers:
                    self.close_connection = True  # a body we do not read cannot stay on a kept-alive line
                self._send(target, head=method == "HEAD")
                return
            if "Transfer-Encoding" in self.headers:  # header lookup is case-insensitive
                self.close_connection = True
                self._send(_error(411, "length_required", "chunked bodies are not accepted"))
                return
            length_text = self.headers.get("Content-Length")
            if length_text is None or not length_text.isdigit():
                self.close_connection = True
                self._send(_error(411, "length_required", "a Content-Length header is required"))
                return
            length = int(length_text)
            if length > api.config.max_body:
                self.close_connection = True  # the body is not read: this connection cannot continue
                self._send(_error(413, "body_too_large", f"request body exceeds {api.config.max_body} bytes"))
                return
            body = self.rfile.read(length)
            if len(body) != length:
                self.close_connection = True
                return
            headers = {k.lower(): v for k, v in self.headers.items()}
            self._send(api.predict(target, headers, body))
        except (TimeoutError, ConnectionError):
            self.close_connection = True
        except Exception:
            self.close_connection = True
            with contextlib.suppress(OSError):
                self._send(_error(500, "internal", "internal error"))

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")


_BUSY_BODY = _body({"error": {"code": "busy", "message": "too many connections"}})
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
         b"Content-Length: " + str(len(_BUSY_BODY)).encode() + b"\r\n\r\n" + _BUSY_BODY)


class _ApiServer(socketserver.ThreadingMixIn):
    """Connection limit, quiet error handling and the API object, shared by both servers."""

    api: InferenceApi
    daemon_threads = True
    block_on_close = False
    _slots: threading.BoundedSemaphore

    def _init_api(self, api: InferenceApi) -> None:
        self.api = api
        self._slots = threading.BoundedSemaphore(api.config.max_connections)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            with contextlib.suppress(OSError):
                request.sendall(_BUSY)
            self.shutdown_request(request)  # type: ignore[attr-defined]
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """No traceback on stderr: a handler failure only closes that connection."""


class TcpInferenceServer(_ApiServer, ThreadingHTTPServer):
    """The API on a loopback TCP address (``port=0``: an ephemeral port, see ``server_address``)."""

    def __init__(self, api: InferenceApi, host: str = "127.0.0.1", port: int = 0) -> None:
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ConfigError(f"the inference API listens on loopback only, not on {host!r}")
        if ipaddress.ip_address(host).version == 6:
            self.address_family = socket.AF_INET6
        self._init_api(api)
        ThreadingHTTPServer.__init__(self, (host, port), _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host name (getfqdn), which may block on DNS; not needed.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)


class UnixInferenceServer(_ApiServer, socketserver.UnixStreamServer):
    """The API on a Unix socket at ``path``, mode 0600 (only the agent's user may connect).

    A stale socket file at ``path`` is replaced; any other kind of file is refused. Put the socket
    in a directory only the agent's user can write (e.g. ``/run/edge-agent``, mode 0700).
    """

    def __init__(self, api: InferenceApi, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        try:
            mode = os.lstat(self.path).st_mode
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(mode):
                raise ConfigError(f"{self.path} exists and is not a socket")
            os.unlink(self.path)
        self._init_api(api)
        socketserver.UnixStreamServer.__init__(self, self.path, _Handler)

    def server_bind(self) -> None:
        super().server_bind()
        os.chmod(self.path, 0o600)  # before listen(): nobody can connect until this holds

    def server_close(self) -> None:
        super().server_close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def serve_in_thread(server: socketserver.BaseServer, *, poll_interval: float = 0.1) -> threading.Thread:
    """Run ``server.serve_forever`` on a daemon thread; stop with ``server.shutdown()`` (returns
    within ``poll_interval``) then ``server.server_close()``."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": poll_interval},
                              name="inference-api", daemon=True)
    thread.start()
    return thread
