"""Lifecycle of one Mosquitto broker for the fleet: config, ACL, start on a free port, stop, restart.

The broker has a TLS listener on loopback that requires a client certificate issued by the fleet
CA and uses the certificate's CN as the MQTT username (``use_identity_as_username``).  The ACL (see
:data:`ACL`) gives ``fleet-server`` the whole ``fleet/v1/#`` tree and every other identity only its
own ``up`` (write) and ``down`` (read) subtrees; :mod:`protocol.topics` documents the layout.

With ``server_ca_cert`` (what ``fleet-server init`` sets up, and the harness and demo use) there are
two listeners: the **device listener** (:attr:`MosquittoBroker.port`) additionally replaces each
client's MQTT client id with its username (``use_username_as_clientid``), so a device cannot take
over another client's session by connecting with that client's id (MQTT gives a client id to one
connection at a time: the older one is disconnected); the **server listener**
(:attr:`MosquittoBroker.server_port`) accepts only certificates of the separate server-clients CA,
so that the server's workers, which share one identity, can keep client ids of their own, and no
device can reach a listener where it could choose one.

``max_packet_size`` makes the broker disconnect a client that sends a larger packet, so
oversized messages are never delivered.  Persistence is off: sessions and queued messages do not
survive a restart, which is what clients expect (they re-subscribe on every connect).

Everything the broker writes (``mosquitto.conf``, ``acl``, ``mosquitto.log``, ``stderr.log``)
lives in its folder.  :func:`create_test_pki` builds a complete CA + broker + server credential set
for tests and demos with :mod:`fleet_server.pki`.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from firmware_sim.procutil import free_port, stop_process
from fleet_server import brokerconf, pki
from protocol.errors import ConfigError, ProcessError

MOSQUITTO = "mosquitto"
DEFAULT_MAX_PACKET_SIZE = 1024 * 1024
"""Largest MQTT packet (header + topic + properties + payload) the broker accepts: 1 MiB."""

ACL = brokerconf.ACL
"""The broker's ACL file (:data:`fleet_server.brokerconf.ACL`, the one `fleet-server init` writes)."""

_READY_MARK = " running"  # "mosquitto version 2.0.11 running": all listeners are bound
_ROOT_WARNING = "should not be run as root"  # expected as root (see `user` in the config): not a cause


def _check_path(path: Path) -> str:
    text = str(Path(path).resolve())
    # mosquitto.conf has no quoting: a path with whitespace or '#' would be cut or misread.
    if any(c.isspace() for c in text) or "#" in text:
        raise ConfigError(f"path not usable in mosquitto.conf (whitespace or '#'): {text!r}")
    return text


@dataclass(frozen=True, slots=True)
class BrokerPki:
    """Paths of a fleet PKI in a folder: the CA and the broker's and fleet server's credentials."""

    folder: Path

    @property
    def ca_cert(self) -> Path:
        return self.folder / "fleet-ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.folder / "fleet-ca.key"

    @property
    def broker_cert(self) -> Path:
        return self.folder / "broker.pem"

    @property
    def broker_key(self) -> Path:
        return self.folder / "broker.key"

    @property
    def server_cert(self) -> Path:
        return self.folder / "fleet-server.pem"

    @property
    def server_key(self) -> Path:
        return self.folder / "fleet-server.key"

    def load_ca(self) -> pki.FleetCA:
        """The fleet CA (certificate and key) of this PKI."""
        return pki.load_ca_files(self.ca_cert, self.ca_key)


def create_test_pki(folder: Path, *, now: float | None = None,
                    dns_names: tuple[str, ...] = ("localhost",)) -> BrokerPki:
    """Create (or reuse, if complete) a fleet CA with broker and fleet-server credentials in ``folder``.

    For tests and demos; production deployments keep the CA key offline.  Keys are written 0600.
    """
    out = BrokerPki(Path(folder))
    if all(p.exists() for p in (out.ca_cert, out.ca_key, out.broker_cert, out.broker_key,
                                out.server_cert, out.server_key)):
        return out
    out.folder.mkdir(parents=True, exist_ok=True)
    os.chmod(out.folder, 0o700)
    when = time.time() if now is None else now
    ca = pki.create_ca(now=when)
    pki.save_ca(ca, out.ca_cert, out.ca_key)
    pki.write_credential(out.folder, "broker", pki.issue_broker_cert(ca, now=when, dns_names=dns_names))
    pki.write_credential(out.folder, "fleet-server", pki.issue_server_client_cert(ca, now=when))
    return out


class MosquittoBroker:
    """One Mosquitto process configured for the fleet, with its files in ``folder``.

    Use as a context manager, or call :meth:`start` / :meth:`stop`.  :attr:`port` is the TLS port
    while it runs (and is kept across :meth:`restart`, so clients reconnect to the same address).
    """

    def __init__(self, folder: Path, ca_cert: Path, server_cert: Path, server_key: Path, *,
                 host: str = "127.0.0.1", max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
                 max_inflight_messages: int = 100, max_queued_messages: int = 10000,
                 server_ca_cert: Path | None = None, crl_file: Path | None = None) -> None:
        self.folder = Path(folder)
        self.crl_file = None if crl_file is None else Path(crl_file)
        """The device listener's ``crlfile`` (revoked device certificates; re-read by :meth:`reload`)."""
        self.ca_cert = Path(ca_cert)
        self.server_ca_cert = None if server_ca_cert is None else Path(server_ca_cert)
        """CA of the fleet server's client certificates: set, the broker has a separate server
        listener (:attr:`server_port`) and device client ids are their usernames (module docstring)."""
        self.server_cert = Path(server_cert)
        self.server_key = Path(server_key)
        self.host = host
        self.max_packet_size = max_packet_size
        self.max_inflight_messages = max_inflight_messages
        self.max_queued_messages = max_queued_messages
        self.port: int | None = None
        """The (device) listener's port while the broker runs."""
        self.server_port: int | None = None
        """The server listener's port while the broker runs (only with ``server_ca_cert``)."""
        self._last_ports: tuple[int, int | None] | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def for_pki(cls, folder: Path, fleet_pki: BrokerPki, *,
                max_packet_size: int = DEFAULT_MAX_PACKET_SIZE, max_inflight_messages: int = 100,
                max_queued_messages: int = 10000) -> MosquittoBroker:
        """A broker using the CA and broker credentials of ``fleet_pki``."""
        return cls(folder, fleet_pki.ca_cert, fleet_pki.broker_cert, fleet_pki.broker_key,
                   max_packet_size=max_packet_size, max_inflight_messages=max_inflight_messages,
                   max_queued_messages=max_queued_messages)

    @classmethod
    def for_data_dir(cls, folder: Path, data_dir: Path, *,
                     max_packet_size: int = DEFAULT_MAX_PACKET_SIZE) -> MosquittoBroker:
        """A broker with the files ``fleet-server init --data-dir data_dir`` made: the fleet CA for
        devices, the broker's certificate, and the server-clients CA for the server listener."""
        pki_dir = Path(data_dir) / "pki"
        return cls(folder, pki_dir / "fleet-ca.pem", pki_dir / "broker.pem", pki_dir / "broker.key",
                   max_packet_size=max_packet_size, server_ca_cert=pki_dir / "server-clients-ca.pem",
                   crl_file=pki_dir / "fleet-ca.crl.pem")

    # -- files -------------------------------------------------------------------------------------
    @property
    def conf_path(self) -> Path:
        return self.folder / "mosquitto.conf"

    @property
    def acl_path(self) -> Path:
        return self.folder / "acl"

    @property
    def pid_path(self) -> Path:
        """Mosquitto's ``pid_file`` (what ``server.broker_pid_file`` names to have the CRL reloaded)."""
        return self.folder / "mosquitto.pid"

    @property
    def log_path(self) -> Path:
        return self.folder / "mosquitto.log"

    @property
    def stderr_path(self) -> Path:
        return self.folder / "stderr.log"

    def config_text(self, port: int, server_port: int | None = None) -> str:
        """The ``mosquitto.conf`` this broker runs with on ``port`` (and ``server_port``, the server
        listener, with ``server_ca_cert``)."""
        for p in (self.ca_cert, self.server_cert, self.server_key,
                  *filter(None, [self.server_ca_cert, self.crl_file])):
            if not p.is_file():
                raise ConfigError(f"broker TLS file missing: {p}")
        lines = [
            "# Generated by firmware_sim.broker; rewritten on every start.",
            "per_listener_settings false",
            "allow_anonymous false",
            f"acl_file {_check_path(self.acl_path)}",
            "persistence false",
            # As root Mosquitto would switch to user 'mosquitto', who cannot read our 0600 key.
            f"user {getpass.getuser()}",
            f"log_dest file {_check_path(self.log_path)}",
            f"pid_file {_check_path(self.pid_path)}",  # `fleet-server run` SIGHUPs it (broker_pid_file)
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "log_timestamp true",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
            f"max_packet_size {int(self.max_packet_size)}",
            f"max_inflight_messages {int(self.max_inflight_messages)}",
            f"max_queued_messages {int(self.max_queued_messages)}",
            "set_tcp_nodelay true",
            "",
            *self._listener(port, self.ca_cert, devices_only=self.server_ca_cert is not None),
        ]
        if self.server_ca_cert is not None:
            if server_port is None:
                raise ConfigError("the server listener needs a port")
            lines += self._listener(server_port, self.server_ca_cert, devices_only=False)
        return "\n".join(lines)

    def _listener(self, port: int, client_ca: Path, *, devices_only: bool) -> list[str]:
        # devices_only: the device listener of a two-listener broker (the module docstring says why)
        crl = None if self.crl_file is None or client_ca != self.ca_cert else _check_path(self.crl_file)
        return brokerconf.listener_lines(f"{int(port)} {self.host}", client_ca=_check_path(client_ca),
                                         cert=_check_path(self.server_cert), key=_check_path(self.server_key),
                                         devices=devices_only, crl=crl)

    def _write_files(self, port: int, server_port: int | None) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        os.chmod(self.folder, 0o700)
        self.acl_path.write_text(ACL)
        self.conf_path.write_text(self.config_text(port, server_port))

    def _output_lines(self, log_mark: int = 0) -> list[str]:
        lines: list[str] = []
        for path, mark in ((self.log_path, log_mark), (self.stderr_path, 0)):
            with contextlib.suppress(OSError), open(path, "rb") as f:
                f.seek(mark)
                text = f.read().decode(errors="replace")
                lines += [ln.strip() for ln in text.splitlines()
                          if ln.strip() and _ROOT_WARNING not in ln]
        return lines

    def last_log_line(self, log_mark: int = 0) -> str:
        """Mosquitto's explanation of a failure, from its log (from byte ``log_mark``) and stderr.

        The first ``Error`` line (the cause, e.g. "Unable to load server key file") and the last
        line, when they differ; ``"no output"`` if there is nothing.
        """
        lines = self._output_lines(log_mark)
        if not lines:
            return "no output"
        first_error = next((ln for ln in lines if "Error" in ln), None)
        if first_error is None or first_error == lines[-1]:
            return lines[-1]
        return f"{first_error} ... {lines[-1]}"

    def _log_mark(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    # -- running -----------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """Process id of the running broker, or ``None``."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def url(self) -> str:
        if self.port is None:
            raise ProcessError("mosquitto is not running")
        return f"mqtts://{self.host}:{self.port}"

    def _launch(self, port: int, server_port: int | None, *, timeout: float) -> subprocess.Popen[bytes]:
        """Start mosquitto on ``port`` (and ``server_port``) and wait until it has bound its
        listeners, or raise."""
        self._write_files(port, server_port)
        mark = self._log_mark()
        with open(self.stderr_path, "wb") as err:
            try:
                proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf_path)], stdout=subprocess.DEVNULL,
                                        stderr=err, stdin=subprocess.DEVNULL, start_new_session=True)
            except FileNotFoundError as exc:
                raise ProcessError("mosquitto is not installed (Debian package mosquitto)") from exc
        try:
            # Mosquitto logs "... running" once every listener is bound (it exits if a bind fails).
            # Waiting for that line, rather than probing the port, cannot mistake another
            # process's socket for ours, and leaves no failed-handshake noise in the log.
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise ProcessError(f"mosquitto exited with status {proc.returncode}: "
                                       f"{self.last_log_line(mark)}")
                with contextlib.suppress(OSError), open(self.log_path, "rb") as log:
                    log.seek(mark)
                    if _READY_MARK.encode() in log.read():
                        break
                if time.monotonic() > deadline:
                    raise ProcessError(f"mosquitto did not start within {timeout:.0f}s: "
                                       f"{self.last_log_line(mark)}")
                time.sleep(0.01)
        except BaseException:
            stop_process(proc)
            raise
        return proc

    def start(self, *, attempts: int = 5, timeout: float = 10.0) -> None:
        """Start on a free loopback port (retrying if another process wins the race for it)."""
        if self.running:
            return
        last: ProcessError | None = None
        for _ in range(attempts):
            port = free_port(self.host)
            server_port = None
            if self.server_ca_cert is not None:
                while (server_port := free_port(self.host)) == port:
                    pass
            try:
                self._proc = self._launch(port, server_port, timeout=timeout)
            except ProcessError as exc:
                if "not installed" in str(exc):
                    raise
                last = exc
                continue
            self.port, self.server_port = port, server_port
            self._last_ports = (port, server_port)
            return
        detail = last.diagnostics() if last else ""
        raise ProcessError(f"mosquitto did not start after {attempts} attempts: {detail}")

    def reload(self) -> None:
        """SIGHUP: Mosquitto re-reads its configuration, certificates and CRL (open connections stay)."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            raise ProcessError("mosquitto is not running")
        proc.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL) and reap it; idempotent."""
        proc, self._proc = self._proc, None
        stop_process(proc)
        self.port = self.server_port = None

    def restart(self, *, attempts: int = 50, timeout: float = 10.0) -> None:
        """Stop and start again on the same ports, so that connected clients can reconnect to them.

        The ports are briefly free between stop and start; if they cannot be bound again (another
        process took one) this raises :class:`ProcessError` after ``attempts`` tries.
        """
        ports = self._last_ports
        self.stop()
        if ports is None:
            self.start(timeout=timeout)
            return
        port, server_port = ports
        last: ProcessError | None = None
        for _ in range(attempts):
            try:
                self._proc = self._launch(port, server_port, timeout=timeout)
            except ProcessError as exc:
                if "not installed" in str(exc):
                    raise
                last = exc
                time.sleep(0.1)
                continue
            self.port, self.server_port = port, server_port
            return
        detail = last.diagnostics() if last else ""
        raise ProcessError(f"mosquitto could not restart on port {port}: {detail}")

    def __enter__(self) -> MosquittoBroker:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def __del__(self) -> None:  # last resort: never leave a process behind
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.poll() is None:
            stop_process(proc)
