"""`make demo` (``firmware-sim demo``) as a newcomer sees it: two exact lines on stdout, a console
that accepts that login and shows the tampered device untrusted with its failing event, metrics,
the demo's firmware release committed on the golden devices, the password kept (0600) across runs,
and Ctrl-C stopping everything it started."""

from __future__ import annotations

import http.cookiejar
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.swtpm, pytest.mark.mqtt, pytest.mark.slow]

CONSOLE_RE = re.compile(r"^Console: http://127\.0\.0\.1:(\d+)/$")
LOGIN_RE = re.compile(r"^Login: (\S+) / (\S+)$")


def _start(state_dir: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "firmware_sim.cli", "demo", "--state-dir", str(state_dir),
                             "--interval", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _two_lines(proc: subprocess.Popen[str]) -> tuple[str, str]:
    assert proc.stdout is not None
    first, second = proc.stdout.readline().rstrip("\n"), proc.stdout.readline().rstrip("\n")
    if not first:
        proc.wait(30)
        pytest.fail(f"demo exited: {proc.stderr.read() if proc.stderr else ''}")
    return first, second


def _stop(proc: subprocess.Popen[str]) -> tuple[str, str]:
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the terminal's whole process group
    try:
        out, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("the demo did not stop within 90 s of Ctrl-C")
    return out, err


def _session(base: str, user: str, password: str) -> urllib.request.OpenerDirector:
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    page = opener.open(base + "login", timeout=30).read().decode()
    token = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert token, "no CSRF token in the login form"
    form = urllib.parse.urlencode({"username": user, "password": password, "csrf_token": token.group(1)})
    landed = opener.open(base + "login", form.encode(), timeout=30)
    assert not landed.geturl().endswith("/login"), "the printed login was refused"
    return opener


def _survivors(fragment: str) -> list[str]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                raw = Path(f"/proc/{entry}/cmdline").read_bytes()
                cmdline = raw.replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if fragment in cmdline:
                found.append(cmdline[:160])
    return found


def test_demo_prints_the_console_and_login_serves_the_fleet_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    state = tmp_path / "demo-state"
    proc = _start(state)
    try:
        console, login = _two_lines(proc)
        port = CONSOLE_RE.match(console)
        credentials = LOGIN_RE.match(login)
        assert port and credentials, (console, login)
        base = f"http://127.0.0.1:{port.group(1)}/"
        user, password = credentials.groups()
        saved = state / "console-login.json"
        assert stat.S_IMODE(saved.stat().st_mode) == 0o600
        assert json.loads(saved.read_text()) == {"user": user, "password": password}

        opener = _session(base, user, password)
        devices = opener.open(base + "devices", timeout=30).read().decode()
        row = re.search(r'href="/devices/(dev-000)".*?</tr>', devices, re.S)
        assert row and "untrusted" in row.group(0)
        detail = opener.open(base + "devices/dev-000", timeout=30).read().decode()
        assert "vmlinuz" in detail and "differs from reference" in detail
        metrics = opener.open(base + "metrics", timeout=30).read().decode()
        assert 'edge_attestations_total{result="untrusted"}' in metrics

        # The trusted devices were given the demo model's key; the tampered one never was.
        deadline = time.monotonic() + 60
        while "classifier" not in (page := opener.open(base + "devices/dev-001", timeout=30).read().decode()):
            assert time.monotonic() < deadline, "no model lease shown for a trusted device"
            time.sleep(1)
        assert "classifier" in page

        # The demo ships firmware 1.3.0 to its golden devices: they install it, power-cycle into
        # the new slot, attest trusted on it and commit; the device and release pages show it.
        deadline = time.monotonic() + 240
        while 'class="update-state">committed' not in (
                page := opener.open(base + "devices/dev-001", timeout=30).read().decode()):
            assert time.monotonic() < deadline, "the demo's release was not committed on dev-001"
            time.sleep(2)
        assert "firmware/edge-camera/1.3.0.fwb" in page
        releases = opener.open(base + "releases", timeout=30).read().decode()
        link = re.search(r'href="/releases/(\d+)">firmware/edge-camera/1\.3\.0\.fwb<', releases)
        assert link, releases
        detail = opener.open(base + f"releases/{link.group(1)}", timeout=30).read().decode()
        assert "dev-001" in detail and "committed" in detail
        assert "dev-000" not in detail  # the tampered device is not offered the release
    finally:
        out, err = _stop(proc)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert all(line.startswith("demo: ") for line in err.splitlines()), err
    assert out == ""  # only the two lines on stdout
    workspace = re.search(r"^demo: workspace (\S+)$", err, re.M)
    assert workspace, err
    assert _survivors(workspace.group(1)) == []  # swtpm, mosquitto, fleet-server, agents: all gone
    assert not Path(workspace.group(1)).exists()

    # A second run reuses the password.
    again = _start(state)
    try:
        _, login2 = _two_lines(again)
    finally:
        _stop(again)
    assert login2 == login
