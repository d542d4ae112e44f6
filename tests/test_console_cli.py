"""Console commands and serving: ``fleet-server user``/``token``/``audit``, the audit entries of the
existing device and policy commands, the ``[console]`` configuration, and the console served by waitress
(the thread ``fleet-server run`` starts, and ``fleet-server console``)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from fleet_server.cli import main
from fleet_server.config import ServerConfig, parse_config
from fleet_server.console.accounts import Accounts
from fleet_server.console.audit import AuditLog
from fleet_server.console.server import start_console
from fleet_server.service.common import ManualClock
from fleet_server.storage.db import create_engine
from protocol.errors import ConfigError

pytest.register_assert_rewrite("console_fixtures")
from console_fixtures import FAST_ARGON2, PASSWORD, SoftDevice, boot_log, console_settings  # noqa: E402

pytest_plugins = ("console_fixtures", "server_fixtures")
pytestmark = pytest.mark.usefixtures("quiet_root_logging")


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture
def cfg(console_config: ServerConfig) -> str:
    """The configuration file, with cheap argon2 parameters (the CLI reads the file)."""
    assert console_config.source is not None
    path = Path(console_config.source)
    extra = "\n[console]\n" + "".join(f"{k} = {v}\n" for k, v in FAST_ARGON2.items())
    path.write_text(path.read_text() + extra)
    return str(path)


def _audit(config: ServerConfig) -> list[tuple[str, str, str]]:
    engine = create_engine(config.database_url)
    try:
        return [(e.actor, e.action, e.target) for e in reversed(AuditLog(engine).entries(limit=100))]
    finally:
        engine.dispose()


def test_user_commands(cfg: str, console_config: ServerConfig, capsys: pytest.CaptureFixture[str],
                       monkeypatch: pytest.MonkeyPatch) -> None:
    status, out, _ = _run(capsys, "user", "add", "alice", "--role", "admin", "--config", cfg)
    assert status == 0 and out.startswith("user alice added with role admin\npassword: ")
    password = out.splitlines()[1].removeprefix("password: ")
    engine = create_engine(console_config.database_url)
    accounts = Accounts(engine, console_config.console)
    try:
        assert accounts.login("alice", password, ip="cli", user_agent="", now=1).ok
        monkeypatch.setattr(sys, "stdin", io.StringIO(PASSWORD + "\n"))
        assert _run(capsys, "user", "add", "bob", "--role", "security", "--password-stdin",
                    "--config", cfg)[1] == "user bob added with role security\n"
        assert accounts.login("bob", PASSWORD, ip="cli", user_agent="", now=2).ok
        status, out, _ = _run(capsys, "user", "list", "--json", "--config", cfg)
        assert [(u["name"], u["role"], u["disabled"]) for u in json.loads(out)] == [
            ("alice", "admin", False), ("bob", "security", False)]
        assert _run(capsys, "user", "set-role", "bob", "ml_engineer", "--config", cfg)[1] == \
            "user bob: role security -> ml_engineer\n"
        assert _run(capsys, "user", "disable", "bob", "--config", cfg)[0] == 0
        assert not accounts.login("bob", PASSWORD, ip="cli2", user_agent="", now=3).ok
        assert _run(capsys, "user", "enable", "bob", "--config", cfg)[0] == 0
        status, out, _ = _run(capsys, "user", "reset-password", "bob", "--config", cfg)
        new = out.splitlines()[1].removeprefix("password: ")
        assert status == 0 and accounts.login("bob", new, ip="cli3", user_agent="", now=4).ok
        assert _run(capsys, "user", "unlock", "bob", "--config", cfg)[1] == "user bob: was not locked\n"
        # Errors: one line, exit 1; usage errors exit 2.
        status, _, err = _run(capsys, "user", "disable", "alice", "--config", cfg)
        assert status == 1 and err == "fleet-server: the last enabled admin cannot be disabled\n"
        status, _, err = _run(capsys, "user", "add", "alice", "--role", "admin", "--config", cfg)
        assert status == 1 and "already exists" in err
        with pytest.raises(SystemExit) as usage:
            main(["user", "add", "carol", "--role", "root", "--config", cfg])
        assert usage.value.code == 2
        capsys.readouterr()
    finally:
        engine.dispose()
    actor = _audit(console_config)[0][0]
    assert actor.startswith("cli:")
    assert [(a, t) for _, a, t in _audit(console_config)] == [
        ("user.add", "user:alice"), ("user.add", "user:bob"), ("user.set_role", "user:bob"),
        ("user.disable", "user:bob"), ("user.enable", "user:bob"), ("user.reset_password", "user:bob"),
        ("user.unlock", "user:bob")]


def test_token_commands(cfg: str, console_config: ServerConfig, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = _run(capsys, "token", "create", "--name", "line-7", "--role", "production_system",
                          "--days", "7", "--config", cfg)
    assert status == 0
    secret = out.splitlines()[1].removeprefix("token: ")
    assert secret.startswith("fst_")
    engine = create_engine(console_config.database_url)
    try:
        accounts = Accounts(engine, console_config.console)
        principal = accounts.token_principal(secret, now=time.time_ns() // 1_000_000)
        assert principal is not None and principal.role == "production_system"
        status, out, _ = _run(capsys, "token", "list", "--json", "--config", cfg)
        [listed] = json.loads(out)
        assert listed["name"] == "line-7" and listed["active"] and secret not in out
        assert _run(capsys, "token", "revoke", "line-7", "--config", cfg)[1] == "token line-7 revoked\n"
        assert accounts.token_principal(secret, now=time.time_ns() // 1_000_000) is None
        assert _run(capsys, "token", "revoke", "nope", "--config", cfg)[0] == 1
    finally:
        engine.dispose()
    assert [a for _, a, _ in _audit(console_config)] == ["token.create", "token.revoke"]


def test_device_and_policy_commands_are_audited(cfg: str, console_config: ServerConfig, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str],
                                                console_clock: ManualClock) -> None:
    from fleet_server.storage.repo import Repository

    engine = create_engine(console_config.database_url)
    try:
        SoftDevice("cam-1", Repository(engine), now=console_clock.now_ms())
    finally:
        engine.dispose()
    log = tmp_path / "golden.bin"
    log.write_bytes(boot_log())
    assert _run(capsys, "policy", "from-eventlog", str(log), "--name", "golden", "--device-class",
                "edge-camera", "--config", cfg)[0] == 0
    assert _run(capsys, "device", "quarantine", "cam-1", "--reason", "check", "--config", cfg)[0] == 0
    assert _run(capsys, "device", "revoke", "cam-1", "--config", cfg)[0] == 0
    assert _run(capsys, "device", "approve", "cam-1", "--config", cfg)[0] == 0
    assert _run(capsys, "device", "revoke", "cam-1", "--config", cfg)[0] == 0
    assert _run(capsys, "device", "revoke", "cam-1", "--config", cfg)[0] == 1  # refused: not audited
    assert [(a, t) for _, a, t in _audit(console_config)] == [
        ("policy.create", "policy:golden"), ("device.quarantine", "device:cam-1"),
        ("device.revoke", "device:cam-1"), ("device.approve", "device:cam-1"),
        ("device.revoke", "device:cam-1")]
    assert _run(capsys, "audit", "verify", "--config", cfg)[0] == 0


# --------------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------------
def test_console_configuration(tmp_path: Path) -> None:
    config = parse_config({}, base=tmp_path)
    c = config.console
    assert (c.enabled, c.host, c.port) == (False, "127.0.0.1", 8080)
    assert (c.secure_cookies, c.development) == (True, False)
    assert c.session_idle_ms == 30 * 60_000 and c.lockout_ms == 15 * 60_000
    config = parse_config({"console": {"enabled": True, "port": 9000, "secure_cookies": False,
                                       "login_max_failures": 3}}, base=tmp_path)
    assert (config.console.enabled, config.console.port, config.console.secure_cookies) == (True, 9000, False)
    for bad, message in (({"prot": 1}, "console.prot: unknown key"),
                         ({"port": 0}, "console.port: must be between 1 and 65535"),
                         ({"secure_cookies": "no"}, "console.secure_cookies: expected true or false"),
                         ({"argon2_memory_kib": 8, "argon2_parallelism": 2}, "console.argon2_memory_kib")):
        with pytest.raises(ConfigError, match=message):
            parse_config({"console": bad}, base=tmp_path)


# --------------------------------------------------------------------------------------------------
# serving
# --------------------------------------------------------------------------------------------------
class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def _get(url: str) -> tuple[int, dict[str, str]]:
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(url, timeout=10) as response:
            return response.status, dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers)


def test_factory_without_arguments_reads_the_environment(cfg: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``waitress-serve --call fleet_server.console:create_app`` and gunicorn do."""
    from fleet_server.console import create_app
    from fleet_server.console.app import dispose

    monkeypatch.setenv("FLEET_SERVER_CONFIG", cfg)
    app = create_app()
    try:
        assert app.test_client().get("/healthz").status_code == 200
        assert app.debug is False
    finally:
        dispose(app)


def test_console_thread_of_fleet_server_run(console_config: ServerConfig) -> None:
    config = console_settings(console_config, enabled=True, port=0)
    server = start_console(config)
    try:
        status, headers = _get(f"{server.url}/devices/")
        assert status == 302 and headers["Location"] == "/login?next=/devices/"
        assert headers["X-Frame-Options"] == "DENY" and headers["Server"] == "fleet-console"
        assert _get(f"{server.url}/healthz")[0] == 200
    finally:
        server.stop()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{server.url}/healthz", timeout=2)


def test_a_port_in_use_is_a_one_line_error(cfg: str, capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        status, _, err = _run(capsys, "console", "--config", cfg, "--port", str(port))
    assert status == 1 and err.count("\n") == 1
    assert err.startswith(f"fleet-server: console: cannot listen on 127.0.0.1:{port}: ")


def test_fleet_server_console_command(cfg: str, tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "fleet_server.cli", "console", "--config", cfg, "--port",
                             str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    with proc:  # closes the pipes
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.startswith(f"fleet console on http://127.0.0.1:{port}"), line
            assert _get(f"http://127.0.0.1:{port}/healthz")[0] == 200
            csp = _get(f"http://127.0.0.1:{port}/login")[1]["Content-Security-Policy"]
            assert csp.startswith("default-src")
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0


def test_fleet_server_run_serves_the_console(cfg: str, console_config: ServerConfig) -> None:
    """``fleet-server run`` with ``[console] enabled``: the console answers while the workers run (no
    broker is needed for that: the workers keep reconnecting), and SIGTERM stops both cleanly."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    text = Path(cfg).read_text().replace("[console]\n", f"[console]\nenabled = true\nport = {port}\n", 1)
    Path(cfg).write_text(text)
    proc = subprocess.Popen([sys.executable, "-m", "fleet_server.cli", "run", "--config", cfg],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.2)  # not listening yet
        status = _get(f"http://127.0.0.1:{port}/healthz")[0] if proc.poll() is None else 0
        died = proc.poll() is not None and proc.stderr is not None
        assert status == 200, proc.stderr.read().decode() if died and proc.stderr else status
        assert _get(f"http://127.0.0.1:{port}/")[0] == 302
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(60) == 0
        log = (console_config.data_dir / "logs" / "fleet-server.log").read_text()
        assert "event=console_started" in log and "Traceback" not in log
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
        if proc.stderr:
            proc.stderr.close()
