"""The local inference API end to end: a real encrypted package, decrypted in memory, loaded into
onnxruntime, served on a real loopback TCP socket and a real Unix socket. Every error status, and
a scan that the plaintext model never reaches the disk."""

from __future__ import annotations

import http.client
import json
import os
import socket
import stat
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from agent.inference.guard import AuditRecord, ClientInfo, GuardPolicy, InferenceGuard, Lease, token_hash
from agent.inference.harden import OutputPolicy
from agent.inference.http import (
    ApiConfig,
    InferenceApi,
    TcpInferenceServer,
    UnixInferenceServer,
    serve_in_thread,
)
from agent.inference.runtime import OrtRuntime
from firmware_sim.testmodel import LABELS, classifier_io_signature, reference_scores, small_classifier
from protocol.errors import ConfigError
from protocol.messages import key_id
from protocol.modelpkg import build_package, decrypt_package, read_manifest

T0 = 1_790_000_000.0
TOKEN = "app-token-3f1e0b7c9a"
QUOTA_TOKEN = "quota-token-a8c2d4"
SLOW_TOKEN = "slow-token-77e1"
KEY = ec.generate_private_key(ec.SECP256R1())
KID = key_id(KEY.public_key())
DATA_KEY = os.urandom(32)
MODEL = small_classifier(seed=5)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def unlock_model(package: bytes) -> OrtRuntime:
    """What the agent does once the key broker released the data key: verify, decrypt, load, wipe."""
    manifest = read_manifest(package, trusted_keys={KID: KEY.public_key()})
    plaintext = decrypt_package(package, manifest, DATA_KEY)
    runtime = OrtRuntime(plaintext, wipe_source=True)
    runtime.check_io(manifest.io_signature)
    return runtime


def make_package() -> bytes:
    return build_package(MODEL, name="classifier", version="1.0.0", io_signature=classifier_io_signature(),
                         signing_key=KEY, key_id=KID, data_key=DATA_KEY, created_at=int(T0 * 1000),
                         chunk_size=1024)


class Stack:
    """Guard + API for one test, with its audit log and clock."""

    def __init__(self, *, max_body: int = 1 << 20, max_connections: int = 32) -> None:
        self.clock = Clock()
        self.audit: list[AuditRecord] = []
        clients = {token_hash(TOKEN): ClientInfo("app", rate=1000, burst=1000),
                   token_hash(QUOTA_TOKEN): ClientInfo("quota-app", rate=1000, burst=1000, daily_quota=2),
                   token_hash(SLOW_TOKEN): ClientInfo("slow-app", rate=0.001, burst=1)}
        policy = GuardPolicy(model="classifier", io_signature=classifier_io_signature(),
                             output=OutputPolicy(mode="topk", k=2, decimals=3, labels=LABELS))
        self.guard = InferenceGuard(policy, unlock_model(make_package()), clients, self.clock,
                                    self.audit.append, lease=Lease("lease-1", T0 + 3600, quota=1000))
        config = ApiConfig(max_body=max_body, request_timeout=5.0, max_connections=max_connections)
        self.api = InferenceApi({"classifier": self.guard}, config)


@pytest.fixture
def stack() -> Stack:
    return Stack()


@pytest.fixture
def tcp(stack: Stack) -> Iterator[tuple[str, int]]:
    server = TcpInferenceServer(stack.api, "127.0.0.1", 0)
    thread = serve_in_thread(server)
    try:
        yield "127.0.0.1", server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=10)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(self.path)
        self.sock = sock


def call(conn: http.client.HTTPConnection, method: str, path: str, body: Any = None,
         token: str | None = TOKEN, raw: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], dict[str, Any]]:
    hdrs = dict(headers or {})
    if token is not None:
        hdrs["Authorization"] = f"Bearer {token}"
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    if data is not None:
        hdrs.setdefault("Content-Type", "application/json")
    conn.request(method, path, body=data, headers=hdrs)
    resp = conn.getresponse()
    payload = resp.read()
    assert b"Traceback" not in payload and b'File "' not in payload
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, json.loads(payload) if payload else {}


def rows(n: int, seed: int = 0) -> list[list[float]]:
    return np.random.default_rng(seed).standard_normal((n, 16)).round(4).tolist()


PREDICT = "/v1/models/classifier:predict"


# ---- success -----------------------------------------------------------------------------------------
def test_health_and_predict_over_tcp(tcp: tuple[str, int], stack: Stack) -> None:
    conn = http.client.HTTPConnection(*tcp, timeout=10)
    status, _, body = call(conn, "GET", "/v1/health", token=None)
    assert status == 200 and body == {"status": "ok", "models": {"classifier": {"locked": False}}}
    x = rows(3)
    status, headers, body = call(conn, "POST", PREDICT, {"inputs": {"input": x}})
    assert status == 200 and headers["content-type"] == "application/json"
    ref = reference_scores(np.array(x, dtype=np.float32), seed=5)
    assert body["model"] == "classifier"
    assert body["outputs"]["labels"] == [[LABELS[i] for i in np.argsort(-r)[:2]] for r in ref]
    assert body["outputs"]["scores"] == [[round(float(r[i]), 3) for i in np.argsort(-r)[:2]] for r in ref]
    # keep-alive: a second request on the same connection
    status, _, _ = call(conn, "POST", PREDICT, {"inputs": {"input": rows(1)}})
    assert status == 200
    assert [r.outcome for r in stack.audit] == ["ok", "ok"]
    conn.close()


# ---- every error status ------------------------------------------------------------------------------
ERRORS: list[tuple[str, dict[str, Any], int, str]] = [
    ("no token", {"body": {"inputs": {"input": rows(1)}}, "token": None}, 401, "unauthenticated"),
    ("wrong token", {"body": {"inputs": {"input": rows(1)}}, "token": "nope"}, 401, "unauthenticated"),
    ("basic auth", {"body": {"inputs": {"input": rows(1)}}, "token": None,
                    "headers": {"Authorization": "Basic YXBwOnB3"}}, 401, "unauthenticated"),
    ("bad shape", {"body": {"inputs": {"input": [[1.0] * 15]}}}, 400, "invalid_input"),
    ("bad JSON", {"raw": b'{"inputs": '}, 400, "invalid_input"),
    ("NaN literal", {"raw": b'{"inputs": {"input": [[NaN]]}}'}, 400, "invalid_input"),
    ("duplicate keys", {"raw": b'{"inputs": {}, "inputs": {}}'}, 400, "invalid_input"),
    ("deep nesting", {"raw": b'{"inputs": {"input": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}"}, 400,
     "invalid_input"),
    ("wrong envelope", {"body": {"data": [1]}}, 400, "invalid_input"),
    ("not UTF-8", {"raw": b'{"inputs": "\xff"}'}, 400, "invalid_input"),
    ("strings", {"body": {"inputs": {"input": [["a"] * 16]}}}, 400, "invalid_input"),
    ("unknown model", {"path": "/v1/models/other:predict", "body": {}}, 404, "not_found"),
    ("unknown path", {"path": "/admin", "body": {}}, 404, "not_found"),
    ("GET predict", {"method": "GET"}, 405, "method_not_allowed"),
]


@pytest.mark.parametrize(("case", "req", "status", "code"), ERRORS, ids=[e[0] for e in ERRORS])
def test_error_statuses(tcp: tuple[str, int], stack: Stack, case: str, req: dict[str, Any], status: int,
                        code: str) -> None:
    conn = http.client.HTTPConnection(*tcp, timeout=10)
    got, headers, body = call(conn, req.get("method", "POST"), req.get("path", PREDICT), req.get("body"),
                              token=req.get("token", TOKEN), raw=req.get("raw"), headers=req.get("headers"))
    assert got == status
    assert body["error"]["code"] == code and body["error"]["message"]
    if status == 401:
        assert headers["www-authenticate"].startswith("Bearer")


def test_invalid_json_is_refused_only_after_authentication(tcp: tuple[str, int], stack: Stack) -> None:
    conn = http.client.HTTPConnection(*tcp, timeout=10)
    status, _, _ = call(conn, "POST", PREDICT, raw=b"{not json", token="nope")
    assert status == 401
    assert stack.audit[-1].outcome == "unauthenticated"


def test_unread_bodies_close_the_connection(tcp: tuple[str, int]) -> None:
    sock = socket.create_connection(tcp, timeout=10)
    body = b'{"x": 1}'
    sock.sendall(b"POST /v1/models/nope:predict HTTP/1.1\r\nHost: x\r\nContent-Length: "
                 + str(len(body)).encode() + b"\r\n\r\n" + body
                 + b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
    reply = b""
    while chunk := sock.recv(4096):
        reply += chunk
    sock.close()
    assert reply.startswith(b"HTTP/1.1 404") and b"Connection: close" in reply
    assert reply.count(b"HTTP/1.1 ") == 1  # the pipelined request is not parsed out of a stale body


@pytest.mark.parametrize(("request_bytes", "status"), [
    (b"garbage\r\n\r\n", 400),
    (b"PATCH /v1/health HTTP/1.1\r\nHost: x\r\n\r\n", 501),
    (b"GET /v1/health HTTP/9.9\r\nHost: x\r\n\r\n", 505),
])
def test_protocol_errors_are_json_too(tcp: tuple[str, int], request_bytes: bytes, status: int) -> None:
    sock = socket.create_connection(tcp, timeout=10)
    sock.sendall(request_bytes)
    reply = b""
    while chunk := sock.recv(4096):
        reply += chunk
    sock.close()
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.") and f" {status} ".encode() in head.split(b"\r\n")[0]
    assert json.loads(body)["error"]["code"] == f"http_{status}"


def test_rate_limited_429_with_retry_after(tcp: tuple[str, int]) -> None:
    conn = http.client.HTTPConnection(*tcp, timeout=10)
    assert call(conn, "POST", PREDICT, {"inputs": {"input": rows(1)}}, token=SLOW_TOKEN)[0] == 200
    status, headers, body = call(conn, "POST", PREDICT, {"inputs": {"input": rows(1)}}, token=SLOW_TOKEN)
    assert status == 429 and body["error"]["code"] == "rate_limited"
    assert int(headers["retry-after"]) >= 1


def test_quota_exceeded_403(tcp: tuple[str, int]) -> None:
    conn = http.client.HTTPConnection(*tcp, timeout=10)
    assert call(conn, "POST", PREDICT, {"inputs": {"input": rows(2)}}, token=QUOTA_TOKEN)[0] == 200
    status, _, body = call(conn, "POST", PREDICT, {"inputs": {"input": rows(1)}}, token=QUOTA_TOKEN)
    assert status == 403 and body["error"]["code"] == "quota_exceeded"
    assert "daily quota of client quota-app exhausted" in body["error"]["message"]


def test_locked_423_until_unlocked(tcp: tuple[str, int], stack: Stack) -> None:
    conn = http.client.HTTPConnection(*tcp, timeout=10)
    stack.guard.lock("device revoked")
    status, _, body = call(conn, "POST", PREDICT, {"inputs": {"input": rows(1)}})
    assert status == 423 and body["error"] == {"code": "model_locked",
                                               "message": "model classifier is locked: device revoked"}
    assert call(conn, "GET", "/v1/health", token=None)[2]["models"]["classifier"]["locked"] is True
    stack.guard.unlock(unlock_model(make_package()))
    assert call(conn, "POST", PREDICT, {"inputs": {"input": rows(1)}})[0] == 200


def test_inference_failure_is_500_without_details(stack: Stack) -> None:
    """A failure after validation (here: a policy naming 3 labels for 10 classes) is a 500 with a
    one-line message, through the same request core the servers use."""
    policy = GuardPolicy(model="classifier", io_signature=classifier_io_signature(),
                         output=OutputPolicy(mode="label", labels=("a", "b", "c")))
    guard = InferenceGuard(policy, unlock_model(make_package()), {token_hash(TOKEN): ClientInfo("app")},
                           stack.clock, stack.audit.append)
    api = InferenceApi({"classifier": guard})
    target = api.route("POST", PREDICT)
    assert isinstance(target, InferenceGuard)
    status, _, body = api.predict(target, {"authorization": f"Bearer {TOKEN}"},
                                  json.dumps({"inputs": {"input": rows(1)}}).encode())
    error = json.loads(body)["error"]
    assert status == 500 and error["code"] == "inference_failed" and "Traceback" not in error["message"]
    assert stack.audit[-1].outcome == "inference_failed"


def test_body_limits(stack: Stack) -> None:
    small = Stack(max_body=256)
    server = TcpInferenceServer(small.api)
    thread = serve_in_thread(server)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
        status, headers, body = call(conn, "POST", PREDICT, {"inputs": {"input": rows(4)}})
        assert status == 413 and body["error"]["code"] == "body_too_large"
        assert headers["connection"] == "close"
        conn.close()
        sock = socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10)
        sock.sendall(b"POST " + PREDICT.encode() + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     + TOKEN.encode() + b"\r\n\r\n")
        reply = b""
        while chunk := sock.recv(4096):  # the server closes the connection after a 411
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 411") and b"length_required" in reply
        sock.close()
        assert small.audit == []  # transport refusals happen before the guard
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_connection_limit_answers_503() -> None:
    busy = Stack(max_connections=1)
    server = TcpInferenceServer(busy.api)
    thread = serve_in_thread(server)
    try:
        first = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
        assert call(first, "GET", "/v1/health", token=None)[0] == 200  # kept alive: holds the slot
        second = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
        status, _, body = call(second, "GET", "/v1/health", token=None)
        assert status == 503 and body["error"]["code"] == "busy"
        first.close()
        second.close()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_tcp_server_refuses_non_loopback(stack: Stack) -> None:
    for host in ("0.0.0.0", "192.168.1.10", "example.com", "::"):
        with pytest.raises(ConfigError, match="loopback only"):
            TcpInferenceServer(stack.api, host, 0)


# ---- Unix socket ---------------------------------------------------------------------------------------
def test_unix_socket_is_0600_and_serves(tmp_path: Path, stack: Stack) -> None:
    path = tmp_path / "inference.sock"
    path.touch()
    with pytest.raises(ConfigError, match="not a socket"):
        UnixInferenceServer(stack.api, path)
    path.unlink()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))  # a stale socket file from an earlier run is replaced
    stale.close()
    server = UnixInferenceServer(stack.api, path)
    thread = serve_in_thread(server)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        conn = UnixConnection(str(path))
        assert call(conn, "GET", "/v1/health", token=None)[0] == 200
        status, _, body = call(conn, "POST", PREDICT, {"inputs": {"input": rows(2)}})
        assert status == 200 and len(body["outputs"]["labels"]) == 2
        assert call(conn, "POST", PREDICT, {"inputs": {"input": rows(1)}}, token=None)[0] == 401
        conn.close()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert not path.exists()


# ---- the plaintext model never reaches the disk -----------------------------------------------------------
_WRITES: list[str] = []
_WATCHING = threading.Event()


def _audit_hook(event: str, args: tuple[Any, ...]) -> None:
    if not _WATCHING.is_set() or event != "open":
        return
    path, mode, flags = ((*tuple(args), None, None, None))[:3]
    writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
        isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND))
    if writing:
        _WRITES.append(str(path))


sys.addaudithook(_audit_hook)


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]


def test_plaintext_model_is_never_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("TMPDIR", str(work))
    monkeypatch.setattr(tempfile, "tempdir", str(work))
    package_file = tmp_path / "classifier.pkg"  # the agent stores packages encrypted: that is allowed
    package_file.write_bytes(make_package())
    before = {p: p.stat().st_size for p in _files(tmp_path)}

    _WRITES.clear()
    _WATCHING.set()
    try:
        stack = Stack()
        server = UnixInferenceServer(stack.api, work / "api.sock")
        thread = serve_in_thread(server)
        conn = UnixConnection(str(work / "api.sock"))
        for i in range(5):
            assert call(conn, "POST", PREDICT, {"inputs": {"input": rows(3, seed=i)}})[0] == 200
        conn.close()
        stack.guard.lock("test over")
        server.shutdown()
        server.server_close()
        thread.join(5)
    finally:
        _WATCHING.clear()

    assert _WRITES == []  # no Python-level open for writing anywhere during unlock and inference
    after = _files(tmp_path)
    assert {p: p.stat().st_size for p in after} == before  # nothing created or grown here either
    windows = [MODEL[i:i + 48] for i in range(len(MODEL) // 4, len(MODEL) - 48, len(MODEL) // 8)]
    assert len(windows) >= 4
    for path in after:
        data = path.read_bytes()
        assert not any(w in data for w in windows), f"plaintext model bytes found in {path}"
    assert not any(w in package_file.read_bytes() for w in windows)
