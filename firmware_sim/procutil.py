"""Small helpers for the external programs the project starts (swtpm, mosquitto): free ports, waiting.

These are the only process-level utilities shared by the simulator, the harness and the tests.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import time

from protocol.errors import ProcessError


def _can_bind(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port_pair(host: str = "127.0.0.1", attempts: int = 200) -> int:
    """A port P such that P and P+1 are both free right now (swtpm's TCTI uses P+1 for control).

    Ports are drawn at random from a high range so that concurrent test workers rarely collide;
    callers still retry if the program then fails to bind.
    """
    for _ in range(attempts):
        port = random.randrange(20000, 60000, 2)
        if _can_bind(port, host) and _can_bind(port + 1, host):
            return port
    raise ProcessError("no free pair of loopback ports found")


def free_port(host: str = "127.0.0.1") -> int:
    """A free TCP port chosen by the kernel."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes] | None, *, host: str = "127.0.0.1",
                  timeout: float = 10.0) -> None:
    """Wait until something accepts connections on ``host:port``.

    Raises :class:`ProcessError` if ``proc`` exits first or the timeout passes.
    """
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise ProcessError(f"process exited with status {proc.returncode} before listening on {port}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.2)
            if s.connect_ex((host, port)) == 0:
                return
        if time.monotonic() > deadline:
            raise ProcessError(f"nothing listens on {host}:{port} after {timeout:.0f}s")
        time.sleep(0.01)


def stop_process(proc: subprocess.Popen[bytes] | None, *, timeout: float = 5.0) -> None:
    """Terminate a child started in its own session (SIGTERM to its group, then SIGKILL), and reap it."""
    if proc is None or proc.poll() is not None:
        if proc is not None:
            proc.wait()
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
