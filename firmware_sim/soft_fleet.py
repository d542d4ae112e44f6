"""The soft-TPM fleet: :class:`~firmware_sim.fleet.FleetHarness` with devices on :class:`SoftTpm`.

``firmware-sim fleet --soft-tpm`` (``FleetConfig(soft_tpm=True)``) runs the same installation as the
swtpm fleet (Mosquitto, ``fleet-server run``, pre-registered EK certificates, a claim credential per
device, the real :class:`agent.service.Agent` per device with its own enrollment, device certificate,
MQTT connection, event log and re-attestation), but no TPM process: each device's TPM is a
:class:`~firmware_sim.soft_tpm.SoftTpm` made in the agent host that runs its agent
(:mod:`firmware_sim.soft_hosts`), with an ECC EK certified by the manufacturer CA and its measured
boot extended in memory and written to the device's event log file.

What differs from the swtpm harness:

* hosts: one per CPU by default (``agent_processes``); they are started before the devices are made
  (the TPMs live in them);
* the start is staggered: agents start at ``start_rate`` per second over all hosts (default
  :data:`DEFAULT_START_RATE`), so enrollment does not arrive as one burst;
* file limits: the harness raises its RLIMIT_NOFILE (inherited by Mosquitto, which holds one socket
  per device, and by the hosts) to what the fleet needs;
* :meth:`SoftFleetHarness.power_cycle` is not available (a soft TPM's state is in its host);
* the report adds ``soft_tpm``: each host's RSS and the RSS per device of the hosts and of the
  server, and ``held`` (whether every device was re-attested within ``interval + jitter`` plus
  :data:`HELD_SLACK_S` throughout the window, and the largest gap seen).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from sqlalchemy import text

from firmware_sim.device import SimulatedDevice
from firmware_sim.fleet import FleetConfig, FleetHarness, HarnessError, Measurement, _Device
from firmware_sim.fleet_report import descendants, process_table
from firmware_sim.manufacturer import ManufacturerCA
from firmware_sim.soft_hosts import FDS_PER_AGENT, SoftAgentHost, launch_soft_hosts, raise_nofile, read_rss_kb
from protocol.errors import StorageError

DEFAULT_START_RATE = 50.0
"""Agents started per second (over all hosts) when ``FleetConfig.start_rate`` is not set."""
HELD_SLACK_S = 1.0
"""Allowance beyond ``interval + jitter`` for a device to count as held: the scheduler's tick plus the
attestation's own latency."""
MAKE_CHUNK = 500
"""Devices per ``make`` command (progress lines between chunks)."""
MQTT_SETTINGS = {"reconnect_min": "2.0", "reconnect_max": "60.0"}
"""``[mqtt]`` of the soft devices' ``agent.toml`` instead of the swtpm harness's 0.2 .. 2 s: thousands of
clients retrying TLS handshakes every two seconds on a loaded host time out their own handshakes and
never connect (measured at 1000 devices); a wide backoff spreads the retries."""


@dataclass(frozen=True, slots=True)
class SoftDevice:
    """What the harness needs of a soft-TPM device (the TPM itself lives in its agent host)."""

    id: str
    eventlog_path: Path
    ek_certificate_der: bytes
    host: SoftAgentHost
    tcti: str = "none"
    """Written to ``[tpm]`` (unused: the agent gets the soft TPM as its ``tpm_factory``)."""

    def ek_certificate(self, alg: str | None = None) -> bytes:
        return self.ek_certificate_der

    def shutdown(self) -> None:
        """Nothing to power off: the soft TPM ends with its host."""


def read_max_gaps(engine: Any, start_ms: int, end_ms: int) -> dict[str, int]:
    """Per device, the longest time (ms) without a stored attestation in ``[start_ms, end_ms)``,
    counting from the window's start and to its end (a device with none: the whole window)."""
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT device_id, stored_at FROM attestation WHERE stored_at >= :a "
                                     "AND stored_at < :b ORDER BY device_id, stored_at"),
                                {"a": start_ms, "b": end_ms}).all()
    except Exception as exc:
        raise StorageError(f"cannot read attestations: {exc}") from None
    last: dict[str, int] = {}
    gaps: dict[str, int] = {}
    for device_id, stored_at in rows:
        previous = last.get(device_id, start_ms)
        gaps[device_id] = max(gaps.get(device_id, 0), int(stored_at) - previous)
        last[device_id] = int(stored_at)
    for device_id, stored_at in last.items():
        gaps[device_id] = max(gaps[device_id], end_ms - stored_at)
    return gaps


class SoftFleetHarness(FleetHarness):
    """A fleet of soft-TPM devices (see the module docstring)."""

    def __init__(self, config: FleetConfig, *, progress: Callable[[str], None] | None = None) -> None:
        if not config.soft_tpm:
            raise HarnessError("SoftFleetHarness needs FleetConfig(soft_tpm=True)")
        if config.model is not None or config.updates:
            raise HarnessError("the soft-TPM fleet runs attestation only (no --model, no updates)")
        super().__init__(config, progress=progress)
        self.soft_hosts: list[SoftAgentHost] = []
        self.nofile: int | None = None
        self._rss: dict[str, Any] = {}

    @property
    def host_count(self) -> int:
        cfg = self.config
        if cfg.agent_processes is not None:
            return min(cfg.agent_processes, cfg.devices)
        return max(1, min(os.cpu_count() or 1, cfg.devices))

    # -- setup steps (FleetHarness's, for soft devices) ---------------------------------------------
    def _start_broker(self) -> None:
        # Mosquitto holds a socket per device; it and the hosts inherit this process's limit.
        wanted = FDS_PER_AGENT * self.config.devices + 4096
        self.nofile = raise_nofile(wanted)
        if self.nofile < wanted:  # no CAP_SYS_RESOURCE: the hard limit stays
            self._progress(f"file limit {self.nofile} (the hard limit; {wanted} wanted): Mosquitto can hold "
                           f"about {self.nofile - 100} device connections")
        else:
            self._progress(f"file limit {self.nofile}")
        super()._start_broker()

    def _make_devices(self, ca: ManufacturerCA) -> None:
        plan = self._device_plan()
        count = self.host_count
        self._progress(f"making {len(plan)} soft-TPM devices ({self.config.tampered} with "
                       f"{self.config.tampered_profile}) in {count} agent hosts")
        self.soft_hosts = launch_soft_hosts(count, self.logs_dir, self.config.agent_log_level)
        self.hosts = list(self.soft_hosts)
        groups: list[list[tuple[str, str, Path]]] = [[] for _ in range(count)]
        for i, (device_id, profile) in enumerate(plan):
            groups[i % count].append((device_id, profile.name,
                                      self._path("devices", device_id, "eventlog.bin")))
        made: dict[str, bytes] = {}

        def make(index: int) -> None:
            host, entries = self.soft_hosts[index], groups[index]
            for start in range(0, len(entries), MAKE_CHUNK):
                if self.stop_requested:
                    return
                made.update(host.make_devices(ca.directory, entries[start:start + MAKE_CHUNK],
                                              timeout=600.0))
                if index == 0 and start + MAKE_CHUNK < len(entries):
                    self._progress(f"  about {len(made)}/{len(plan)} devices made")

        with ThreadPoolExecutor(max_workers=count) as pool:
            list(pool.map(make, range(count)))
        self._check_interrupted()
        for i, (device_id, profile) in enumerate(plan):
            soft = SoftDevice(device_id, self._path("devices", device_id, "eventlog.bin"), made[device_id],
                              self.soft_hosts[i % count])
            # _Device's sim is what the base harness uses of a device: eventlog_path, tcti,
            # ek_certificate(), shutdown() (power_cycle is overridden below).
            device = _Device(device_id, profile, cast(SimulatedDevice, soft), self._path("agents", device_id))
            device.host = soft.host
            soft.host.device_ids.append(device_id)
            self.devices[device_id] = device

    def _write_agent_config(self, device: _Device) -> Path:
        path = super()._write_agent_config(device)
        lines = path.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            key = line.split("=", 1)[0].strip()
            if key in MQTT_SETTINGS:
                lines[i] = f"{key} = {MQTT_SETTINGS[key]}"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path

    def _start_agents(self) -> None:
        cfg = self.config
        count = len(self.soft_hosts)
        rate = cfg.start_rate or DEFAULT_START_RATE
        stagger = count / rate
        self._progress(f"starting {len(self.devices)} agents in {count} processes, {rate:g} per second")
        groups: list[list[tuple[str, Path]]] = [[] for _ in range(count)]
        for i, device in enumerate(self.devices.values()):
            groups[i % count].append((device.id, device.agent_dir / "agent.toml"))
        with ThreadPoolExecutor(max_workers=count) as pool:
            list(pool.map(lambda pair: pair[0].start_soft_agents(pair[1], stagger),
                          zip(self.soft_hosts, groups, strict=True)))

    def wait_settled(self, timeout: float) -> None:
        cfg = self.config
        if cfg.settle_timeout is None:  # the default gets the staggered start's length on top
            timeout += cfg.devices / (cfg.start_rate or DEFAULT_START_RATE)
        super().wait_settled(timeout)

    def power_cycle(self, device_id: str, profile: str | None = None) -> None:
        raise HarnessError("power cycles are not available in the soft-TPM fleet")

    # -- measuring -----------------------------------------------------------------------------------
    def sample_rss(self) -> dict[str, Any]:
        """RSS (KiB) of each agent host and of the server's process tree, and per device."""
        hosts = [h.rss_kb() or 0 for h in self.soft_hosts]
        server_kb = 0
        if self.server_pid is not None:
            table = process_table()
            for pid in {self.server_pid, *descendants(self.server_pid, table)}:
                server_kb += read_rss_kb(pid) or 0
        n = max(1, len(self.devices))
        return {"hosts_rss_kb": hosts, "hosts_rss_kb_total": sum(hosts),
                "hosts_rss_kb_per_device": round(sum(hosts) / n, 1),
                "server_rss_kb": server_kb, "server_rss_kb_per_device": round(server_kb / n, 2)}

    def run(self, duration: float | None = None) -> Measurement:
        measurement = super().run(duration)
        self._rss = self.sample_rss()
        return measurement

    def report(self, measurement: Measurement) -> dict[str, Any]:
        out = super().report(measurement)
        cfg = self.config
        gaps = read_max_gaps(self._db(), measurement.start_ms, measurement.end_ms)
        allowed_ms = int((cfg.interval + cfg.effective_jitter + HELD_SLACK_S) * 1000)
        window_ms = measurement.end_ms - measurement.start_ms
        worst = max((gaps.get(d, window_ms) for d in self.devices), default=0)
        late = sum(1 for d in self.devices if gaps.get(d, window_ms) > allowed_ms)
        out["soft_tpm"] = {**self._rss, "agent_hosts": len(self.soft_hosts), "file_limit": self.nofile,
                           "start_rate": cfg.start_rate or DEFAULT_START_RATE,
                           "held": {"all_held": late == 0 and window_ms >= allowed_ms,
                                    "late_devices": late, "max_gap_ms": worst, "allowed_gap_ms": allowed_ms}}
        out["settings"]["agent_processes"] = len(self.soft_hosts)
        return out


def measure_soft(config: FleetConfig, *, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """:func:`firmware_sim.fleet.measure` for a soft-TPM fleet."""
    harness = SoftFleetHarness(config, progress=progress)
    try:
        harness.start()
        measurement = harness.run()
        harness.stop()
        return harness.report(measurement)
    finally:
        harness.close()


def held_summary(report: Mapping[str, Any]) -> str:
    soft = report["soft_tpm"]
    held = soft["held"]
    return (f"hosts RSS {soft['hosts_rss_kb_per_device']} KiB/device, server RSS "
            f"{soft['server_rss_kb_per_device']} KiB/device; "
            f"{'every device held' if held['all_held'] else str(held['late_devices']) + ' devices late'} "
            f"(largest gap {held['max_gap_ms'] / 1000:.1f} s, allowed {held['allowed_gap_ms'] / 1000:.1f} s)")


__all__ = ["DEFAULT_START_RATE", "SoftDevice", "SoftFleetHarness", "held_summary", "measure_soft",
           "read_max_gaps"]
