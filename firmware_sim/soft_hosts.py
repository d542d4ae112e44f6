"""Agent hosts of the soft-TPM fleet: processes that make soft TPMs and run many agents on them.

The soft-TPM fleet (:mod:`firmware_sim.soft_fleet`) has no TPM processes: each device's
:class:`~firmware_sim.soft_tpm.SoftTpm` lives in the agent host process that runs its agent, so the
host also *manufactures* the device (EK certificate from the manufacturer CA) and runs its measured
boot (PCRs extended in memory, the event log written to the device's file).  The agent is the real
:class:`agent.service.Agent` (``Agent(load_config(agent.toml), tpm_factory=tpm.factory())``): its own
enrollment, client certificate, paho MQTT connection and re-attestation.

Commands, in addition to the ones of :mod:`firmware_sim.fleet_agents` (same pipe protocol, same
:class:`~firmware_sim.fleet_agents.AgentHost` on the harness's side):

=====================================  ===================================================================
command                                effect and reply
=====================================  ===================================================================
``make (ca_dir, [(id, profile, log)])``  manufacture a soft TPM per device, boot ``profile`` into it and
                                       its event log file; reply ``{id: EK certificate (DER)}``
``start ([(id, toml)], stagger)``      start those agents, ``stagger`` seconds apart; reply ``None``
=====================================  ===================================================================

Costs per agent (measured, ``docs/harness.md``): the agent runs three threads (its main loop, its
attestation worker, paho's network thread).  Their stacks are made small (:data:`THREAD_STACK`), the
main loop waits :data:`AGENT_POLL` seconds for a message instead of 0.2 (each idle wake-up of ten
thousand agents costs CPU), and the host's file limit is raised to its hard limit (one socket per
agent, plus paho's wake-up socket pair).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import multiprocessing.connection
import resource
import signal
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from firmware_sim.fleet_agents import AgentHost, _Host, launch_all, serve_host
from protocol.errors import ProcessError

THREAD_STACK = 512 * 1024
"""Stack size of the agents' threads (Python's default is the platform's 8 MiB of address space)."""
AGENT_POLL = 2.0
"""The agents' main-loop wait (``Agent(poll=...)``): a stop or a new connection is noticed this late."""
FDS_PER_AGENT = 4
"""File descriptors one agent holds: its TLS socket and paho's wake-up socket pair, plus slack."""


def raise_nofile(wanted: int) -> int:
    """Raise this process's RLIMIT_NOFILE soft limit to ``wanted`` (and the hard limit when allowed,
    e.g. as root, up to the kernel's ``fs.nr_open``); the soft limit reached."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if wanted <= soft:
        return soft
    if wanted > hard:
        try:
            nr_open = int(Path("/proc/sys/fs/nr_open").read_text().strip())
        except (OSError, ValueError):
            nr_open = hard
        target = min(wanted, nr_open)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, target))
            return target
        wanted = hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return wanted


class _SoftHost(_Host):
    """The soft TPMs and agents of one host process."""

    def __init__(self, events: multiprocessing.connection.Connection | None = None) -> None:
        super().__init__(events)
        from firmware_sim.soft_tpm import SoftTpm

        self.tpms: dict[str, SoftTpm] = {}

    def make(self, ca_dir: str, entries: Sequence[tuple[str, str, str]]) -> dict[str, bytes]:
        from firmware_sim.boot import BootMedia
        from firmware_sim.manufacturer import ManufacturerCA
        from firmware_sim.profiles import get_profile
        from firmware_sim.soft_tpm import EkIssuer, SoftTpm, soft_measured_boot

        issuer = EkIssuer.from_ca(ManufacturerCA(Path(ca_dir)))
        media: dict[str, BootMedia] = {}
        out: dict[str, bytes] = {}
        now = dt.datetime.now(dt.UTC)
        for device_id, profile_name, eventlog in entries:
            profile = get_profile(profile_name)
            if profile_name not in media:
                media[profile_name] = BootMedia.from_specs(profile.image_specs())
            tpm = SoftTpm.manufacture(issuer, now=now)
            path = Path(eventlog)
            path.parent.mkdir(parents=True, exist_ok=True)
            soft_measured_boot(tpm, media[profile_name], profile.boot_settings, path)
            self.tpms[device_id] = tpm
            out[device_id] = tpm.ek_certificate()
        return out

    def start_soft(self, entries: Sequence[tuple[str, str]], stagger: float) -> None:
        from agent.config import load_config

        self.stop([device_id for device_id, _ in entries if device_id in self.agents])
        for n, (device_id, config_path) in enumerate(entries):
            tpm = self.tpms.get(device_id)
            if tpm is None:
                raise ProcessError(f"device {device_id} was not made in this host")
            if n and stagger > 0:
                time.sleep(stagger)
            agent = self._agent_type(load_config(Path(config_path)), logger=self._log,
                                     tpm_factory=tpm.factory(), poll=AGENT_POLL)
            agent.start()
            self.agents[device_id] = agent

    def stop(self, device_ids: Iterable[str] | None) -> None:
        ids = list(self.agents) if device_ids is None else [d for d in device_ids if d in self.agents]
        if not ids:
            return
        chosen = [self.agents.pop(d) for d in ids]
        # Ask every agent first (no wait), then wait for each: their main loops end within AGENT_POLL
        # together, instead of one after the other.
        level = self._log.level
        self._log.setLevel(logging.ERROR)  # stop(0) logs a "stop_timeout" warning per agent
        try:
            for agent in chosen:
                agent.stop(0.0)
        finally:
            self._log.setLevel(level)
        for agent in chosen:
            agent.wait(20.0)


def soft_host_main(conn: multiprocessing.connection.Connection, log_path: str, log_level: str,
                   events: multiprocessing.connection.Connection | None = None) -> None:
    """Entry point of a soft agent host process (see the module docstring)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.stack_size(THREAD_STACK)
    raise_nofile(resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    host = _SoftHost(events)
    serve_host(conn, log_path, log_level, host,
               {"make": lambda arg: host.make(*arg), "start": lambda arg: host.start_soft(*arg)}, events)


class SoftAgentHost(AgentHost):
    """One soft agent host process, seen from the harness."""

    entry = staticmethod(soft_host_main)

    def make_devices(self, ca_dir: Path, entries: Sequence[tuple[str, str, Path]],
                     timeout: float) -> dict[str, bytes]:
        raw = self.call("make", (str(ca_dir), [(d, p, str(log)) for d, p, log in entries]), timeout=timeout)
        return {str(k): bytes(v) for k, v in raw.items()}

    def start_soft_agents(self, entries: Sequence[tuple[str, Path]], stagger: float) -> None:
        timeout = 120.0 + stagger * len(entries)
        self.call("start", ([(d, str(path)) for d, path in entries], stagger), timeout=timeout)

    def rss_kb(self) -> int | None:
        """The host process's resident set size (``VmRSS``), KiB; ``None`` if it is gone."""
        return read_rss_kb(self.pid) if self.pid is not None else None


def read_rss_kb(pid: int) -> int | None:
    """``VmRSS`` of ``pid`` in KiB (``None`` if the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def launch_soft_hosts(count: int, log_dir: Path, log_level: str) -> list[SoftAgentHost]:
    """Start ``count`` soft hosts with SIGINT ignored while they spawn (as
    :func:`firmware_sim.fleet_agents.launch_hosts`)."""
    hosts = [SoftAgentHost(i, log_dir / f"soft-agents-{i}.log", log_level) for i in range(count)]
    launch_all(hosts)
    return hosts


__all__ = ["AGENT_POLL", "SoftAgentHost", "launch_soft_hosts", "raise_nofile", "read_rss_kb",
           "soft_host_main"]
