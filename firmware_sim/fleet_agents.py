"""Agent host processes of the fleet harness: many :class:`agent.service.Agent` instances per process.

A simulated fleet of hundreds of devices cannot afford one Python process per agent on a small
machine, and one process for all of them would make the GIL the bottleneck.  The harness therefore
spawns a few *agent hosts* (``multiprocessing`` ``spawn`` context, so nothing of the harness's
state is inherited) and gives each a share of the devices.  An agent in a host is exactly the
agent a device runs (``Agent(load_config(agent.toml))``); only the process is shared.

The harness talks to a host over a ``multiprocessing`` pipe with small request/reply commands
(:class:`AgentHost` is the harness side, :func:`host_main` the process side):

=========================  ==========================================================================
command                    effect and reply
=========================  ==========================================================================
``start [(id, toml)]``     load each configuration and start its agent (an id already running is
                           stopped first); reply ``None``
``stop [id] | None``       stop those agents (all with ``None``), in parallel; reply ``None``
``status``                 ``{id: AgentSnapshot-as-dict}`` of every agent of the host
``exit``                   stop every agent and end the process
=========================  ==========================================================================

Replies are ``(True, value)`` or ``(False, one-line error)``; an error never kills the host.

A second, one-way pipe carries the host's own requests to the harness: ``("reboot", id, reason)``
when an agent asks its platform to reboot (:meth:`_Host.rebooter` gives each agent a
:class:`~firmware_sim.power.RequestedReboot` that sends it).  :class:`AgentHost` reads that pipe on a
thread and passes each request to its ``on_reboot`` callback (the harness's
:class:`~firmware_sim.power.PowerCycler`), so the power cycle runs on the harness's side, never in
the agent's call stack.  The
host ignores SIGINT (the harness decides when agents stop; a Ctrl-C in the terminal reaches the
whole foreground process group) and ends when its pipe closes, so it cannot outlive the harness.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import signal
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from firmware_sim.power import RebootSink, RequestedReboot
from protocol.errors import EdgeError, ProcessError

#: Seconds the harness waits for a host's reply before declaring it dead.
REPLY_TIMEOUT = 120.0
#: Seconds an agent may take to stop (its MQTT DISCONNECT, its worker thread, its TPM adapter).
AGENT_STOP_TIMEOUT = 20.0


@dataclass(frozen=True, slots=True)
class AgentSnapshot:
    """What the harness needs to know about one running agent (a subset of ``AgentStatus``)."""

    device_id: str
    phase: str
    verdict: str
    trusted: bool
    connected: bool
    reasons: tuple[str, ...]
    error: str | None
    counters: Mapping[str, int] = field(default_factory=dict)
    inference_address: str | None = None
    """``host:port`` of the agent's local inference API (with ``[inference]``)."""
    models: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """Per model of the vault: ``serving_version``, ``locked``, ``lock_reason``."""

    def model_unlocked(self, name: str) -> bool:
        """The model ``name`` is held, keyed and serving (not locked)."""
        m = self.models.get(name) or {}
        return bool(m.get("serving_version")) and not m.get("locked", True)

    @property
    def messages(self) -> int:
        """MQTT messages this agent exchanged with the server (both directions) so far."""
        c = self.counters
        return sum(c.get(k, 0) for k in ("attest_requests_sent", "challenges_received", "challenges_answered",
                                         "results_received", "revocations_received", "messages_rejected"))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["reasons"] = list(self.reasons)
        out["counters"] = dict(self.counters)
        out["models"] = {name: dict(m) for name, m in self.models.items()}
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AgentSnapshot:
        return cls(device_id=str(data["device_id"]), phase=str(data["phase"]), verdict=str(data["verdict"]),
                   trusted=bool(data["trusted"]), connected=bool(data["connected"]),
                   reasons=tuple(data["reasons"]), error=data["error"], counters=dict(data["counters"]),
                   inference_address=data.get("inference_address"),
                   models={name: dict(m) for name, m in (data.get("models") or {}).items()})


# --------------------------------------------------------------------------------------------------
# the host process
# --------------------------------------------------------------------------------------------------
class _Host:
    """The agents of one host process, keyed by device id."""

    def __init__(self, events: multiprocessing.connection.Connection | None = None) -> None:
        from agent.service import Agent

        self._agent_type = Agent
        self.agents: dict[str, Agent] = {}
        self._log = logging.getLogger("agent")
        self._events = events
        self._events_lock = threading.Lock()  # agents' threads share the pipe

    def rebooter(self, device_id: str) -> RequestedReboot:
        """The :class:`~agent.update.bootctl.Rebooter` of ``device_id``'s agent: its request goes to
        the harness over the event pipe."""
        return RequestedReboot(device_id, self._send_reboot)

    def _send_reboot(self, device_id: str, reason: str) -> None:
        if self._events is None:
            raise ProcessError("this agent host has no event pipe to the harness: cannot reboot")
        with self._events_lock:
            try:
                self._events.send(("reboot", device_id, reason))
            except (OSError, ValueError) as exc:
                raise ProcessError(f"cannot reach the harness to reboot {device_id}: {exc}") from None

    def start(self, entries: Sequence[tuple[str, str]]) -> None:
        from agent.config import load_config

        self.stop([device_id for device_id, _ in entries if device_id in self.agents])
        for device_id, config_path in entries:
            config = load_config(Path(config_path))
            # With [update] the agent's reboots become power cycles run by the harness (RequestedReboot).
            agent = self._agent_type(config, logger=self._log, rebooter=self.rebooter(device_id))
            agent.start()
            self.agents[device_id] = agent

    def stop(self, device_ids: Iterable[str] | None) -> None:
        ids = list(self.agents) if device_ids is None else [d for d in device_ids if d in self.agents]
        if not ids:
            return
        chosen = [self.agents.pop(d) for d in ids]
        # Agents stop in parallel: each waits for its threads (poll intervals of a few hundred ms),
        # so stopping hundreds one after the other would take minutes.
        with ThreadPoolExecutor(max_workers=min(64, len(chosen))) as pool:
            list(pool.map(lambda a: a.stop(AGENT_STOP_TIMEOUT), chosen))

    def status(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for device_id, agent in self.agents.items():
            s = agent.status()
            vault = s.models or {}
            models = {name: {k: m.get(k) for k in ("serving_version", "locked", "lock_reason")}
                      for name, m in (vault.get("models") or {}).items()}
            out[device_id] = AgentSnapshot(device_id=device_id, phase=s.phase, verdict=s.verdict,
                                           trusted=s.trusted, connected=s.connected,
                                           reasons=tuple(s.verdict_reasons), error=s.error,
                                           counters=dict(s.counters),
                                           inference_address=vault.get("inference_address"),
                                           models=models).to_dict()
        return out


def host_main(conn: multiprocessing.connection.Connection, log_path: str, log_level: str,
              events: multiprocessing.connection.Connection | None = None) -> None:
    """Entry point of an agent host process (see the module docstring)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    host = _Host(events)
    serve_host(conn, log_path, log_level, host, {"start": lambda arg: host.start(arg)}, events)


HostCommand = Callable[[Any], Any]


def serve_host(conn: multiprocessing.connection.Connection, log_path: str, log_level: str, host: _Host,
               commands: dict[str, HostCommand],
               events: multiprocessing.connection.Connection | None) -> None:
    """The command loop of a host process: ``commands`` plus ``stop``, ``status`` and ``exit``.

    Every command is answered ``(True, reply)`` or ``(False, one-line reason)``; no bad command ends
    the host. When the harness goes away (the pipe closes) every agent is stopped.
    """
    from agent.log import configure_logging

    stream = open(log_path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - lives as long as the process
    configure_logging(log_level, "kv", stream)
    try:
        while True:
            try:
                command, arg = conn.recv()
            except (EOFError, OSError):  # the harness is gone: stop everything and leave
                break
            try:
                reply: Any = None
                if command in commands:
                    reply = commands[command](arg)
                elif command == "stop":
                    host.stop(arg)
                elif command == "status":
                    reply = host.status()
                elif command == "exit":
                    host.stop(None)
                    conn.send((True, None))
                    break
                else:
                    raise ProcessError(f"unknown agent host command {command!r}")
            except EdgeError as exc:
                conn.send((False, exc.diagnostics()))
                continue
            except Exception as exc:  # never let one bad command end the host
                conn.send((False, f"{type(exc).__name__}: {exc}"))
                continue
            conn.send((True, reply))
    finally:
        host.stop(None)
        with contextlib.suppress(OSError):
            conn.close()
        if events is not None:
            with contextlib.suppress(OSError):
                events.close()
        stream.close()


# --------------------------------------------------------------------------------------------------
# the harness side
# --------------------------------------------------------------------------------------------------
class AgentHost:
    """One agent host process, seen from the harness.  Thread-safe (one command at a time)."""

    entry = staticmethod(host_main)
    """The host process's entry point (a subclass runs another host, e.g. the soft-TPM one)."""

    def __init__(self, index: int, log_path: Path, log_level: str = "warning", *,
                 on_reboot: RebootSink | None = None) -> None:
        self.index = index
        self.log_path = Path(log_path)
        self.log_level = log_level
        self.device_ids: list[str] = []
        self._ctx = multiprocessing.get_context("spawn")
        self._conn: multiprocessing.connection.Connection | None = None
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._lock = threading.Lock()
        self._on_reboot = on_reboot
        self._events: multiprocessing.connection.Connection | None = None
        self._reader: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    def launch(self) -> None:
        """Start the process (returns at once; the first command waits for it to be ready)."""
        parent, child = self._ctx.Pipe(duplex=True)
        events_in, events_out = self._ctx.Pipe(duplex=False)
        proc = self._ctx.Process(target=type(self).entry,
                                 args=(child, str(self.log_path), self.log_level, events_out),
                                 name=f"fleet-agents-{self.index}", daemon=True)
        proc.start()
        child.close()
        events_out.close()
        self._conn, self._proc, self._events = parent, proc, events_in
        self._reader = threading.Thread(target=self._read_events, args=(events_in,),
                                        name=f"fleet-agents-{self.index}-events", daemon=True)
        self._reader.start()

    def _read_events(self, events: multiprocessing.connection.Connection) -> None:
        """The host's requests (``("reboot", id, reason)``), until its pipe closes."""
        log = logging.getLogger("firmware_sim.fleet")
        while True:
            try:
                message = events.recv()
            except (EOFError, OSError):
                return
            if (isinstance(message, tuple) and len(message) == 3 and message[0] == "reboot"
                    and all(isinstance(m, str) for m in message)):
                if self._on_reboot is not None:
                    self._on_reboot(message[1], message[2])
                else:
                    log.warning("agent host %d: reboot of %s requested, nobody to run it", self.index,
                                message[1])
            else:
                log.warning("agent host %d sent an unknown event", self.index)

    def call(self, command: str, arg: Any = None, *, timeout: float = REPLY_TIMEOUT) -> Any:
        """Send one command and return its reply; :class:`ProcessError` on failure or timeout."""
        with self._lock:
            conn = self._conn
            if conn is None or not self.alive:
                raise ProcessError(f"agent host {self.index} is not running (see {self.log_path})")
            try:
                conn.send((command, arg))
                if not conn.poll(timeout):
                    raise ProcessError(f"agent host {self.index} did not answer {command!r} within "
                                       f"{timeout:.0f}s")
                ok, value = conn.recv()
            except (EOFError, OSError, BrokenPipeError):
                raise ProcessError(f"agent host {self.index} exited (see {self.log_path})") from None
        if not ok:
            raise ProcessError(f"agent host {self.index}: {value}")
        return value

    def start_agents(self, entries: Sequence[tuple[str, Path]]) -> None:
        self.call("start", [(device_id, str(path)) for device_id, path in entries])

    def stop_agents(self, device_ids: Sequence[str] | None = None) -> None:
        self.call("stop", None if device_ids is None else list(device_ids))

    def status(self) -> dict[str, AgentSnapshot]:
        raw = self.call("status")
        return {device_id: AgentSnapshot.from_dict(data) for device_id, data in raw.items()}

    def close(self, timeout: float = 60.0) -> None:
        """Stop every agent and end the process (killing it if it does not end in time)."""
        proc, conn = self._proc, self._conn
        if proc is None:
            return
        if proc.is_alive() and conn is not None:
            with contextlib.suppress(ProcessError):
                self.call("exit", timeout=timeout)
        proc.join(10)
        if proc.is_alive():
            proc.terminate()
            proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
        if conn is not None:
            conn.close()
        if self._reader is not None:
            self._reader.join(5)  # the host's end closed with the process: the reader sees EOF
        if self._events is not None:
            self._events.close()
        self._proc, self._conn, self._events, self._reader = None, None, None, None
        with contextlib.suppress(ValueError):
            proc.close()


def launch_hosts(count: int, log_dir: Path, log_level: str, *,
                 on_reboot: RebootSink | None = None) -> list[AgentHost]:
    """Start ``count`` hosts with SIGINT ignored while they spawn (see the module docstring);
    ``on_reboot(device_id, reason)`` receives their agents' reboot requests."""
    hosts = [AgentHost(i, log_dir / f"agents-{i}.log", log_level, on_reboot=on_reboot)
             for i in range(count)]
    launch_all(hosts)
    return hosts


def launch_all(hosts: Sequence[AgentHost]) -> None:
    """Spawn ``hosts`` with SIGINT ignored meanwhile (when called on the main thread)."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        # A spawned interpreter that starts with SIGINT ignored installs no KeyboardInterrupt
        # handler, so a Ctrl-C while it is still importing cannot print a traceback.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        for host in hosts:
            host.launch()
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


__all__ = ["AgentHost", "AgentSnapshot", "host_main", "launch_all", "launch_hosts", "serve_host"]
