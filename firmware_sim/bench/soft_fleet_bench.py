"""Benchmark: the soft-TPM fleet (``firmware-sim fleet --soft-tpm``) on this machine.

Two :class:`~firmware_sim.soft_fleet.SoftFleetHarness` runs (Mosquitto, ``fleet-server run`` with one
worker, the real agents on :class:`~firmware_sim.soft_tpm.SoftTpm` in :data:`HOSTS` agent hosts):

1. capacity: :data:`DEVICES` devices re-attested every :data:`INTERVAL` seconds (an offered load
   above what the box sustains), :data:`DURATION` seconds measured: ``e2e_soft_attestations_per_s``,
   ``e2e_soft_latency_ms_p50`` / ``_p99``, ``soft_server_cpu_ms_per_attestation``,
   ``soft_agents_cpu_ms_per_attestation``, ``server_rss_kb_per_device`` (the server's process tree
   RSS divided by the devices it holds) and ``agent_hosts_rss_kb_per_device``;
2. held: for each size of :data:`HELD_SIZES` (ascending, stopping at the first that fails), a fleet
   re-attested every 60 s, measured for 60 s + jitter + slack; ``fleet_devices_held_60s`` is the
   largest size whose every device was re-attested within ``interval + jitter`` (+1 s) all through
   the window (0 if none; a size whose devices are not all attested once within
   :data:`SETTLE_TIMEOUT` s after their start is not held).  Each size costs its start
   (``size / START_RATE`` s, then the first attestation of every device) plus a 67 s window, so
   ``make bench`` measures only a small size; set ``SOFT_FLEET_HELD_SIZES=1000,5000,10000`` to
   measure more by hand.

Everything shares the machine's cores with the server, so the numbers are bounded by the sum of the
parts' CPU costs (``docs/harness.md``, "The soft-TPM fleet").
"""

from __future__ import annotations

import os

from firmware_sim.fleet import FleetConfig, HarnessError
from firmware_sim.soft_fleet import measure_soft

DEVICES = int(os.environ.get("SOFT_FLEET_BENCH_DEVICES", "300"))
INTERVAL = float(os.environ.get("SOFT_FLEET_BENCH_INTERVAL", "0.5"))
DURATION = float(os.environ.get("SOFT_FLEET_BENCH_DURATION", "20"))
HOSTS = int(os.environ.get("SOFT_FLEET_BENCH_HOSTS", "4"))
START_RATE = float(os.environ.get("SOFT_FLEET_BENCH_START_RATE", "100"))
HELD_SIZES = tuple(int(n) for n in os.environ.get("SOFT_FLEET_HELD_SIZES", "300").split(",") if n.strip())
HELD_INTERVAL = 60.0
SETTLE_TIMEOUT = float(os.environ.get("SOFT_FLEET_BENCH_SETTLE", "120"))
"""A size whose devices are not all attested once within this many seconds is not held."""


def _config(devices: int, interval: float, duration: float) -> FleetConfig:
    return FleetConfig(devices=devices, interval=interval, duration=duration, soft_tpm=True,
                       agent_processes=HOSTS, start_rate=START_RATE,
                       settle_timeout=SETTLE_TIMEOUT + devices / START_RATE)


def held(sizes: tuple[int, ...] = HELD_SIZES) -> int:
    """The largest of ``sizes`` held at a 60 s interval (see the module docstring)."""
    best = 0
    jitter = HELD_INTERVAL / 10
    for size in sorted(sizes):
        try:
            report = measure_soft(_config(size, HELD_INTERVAL, HELD_INTERVAL + jitter + 1.0))
        except HarnessError:  # e.g. not every device attested once within the settle timeout
            break
        if not report["soft_tpm"]["held"]["all_held"]:
            break
        best = size
    return best


def run() -> dict[str, float]:
    """Measure the capacity run and the held sizes (see the module docstring)."""
    report = measure_soft(_config(DEVICES, INTERVAL, DURATION))
    per = report["cpu_ms_per_attestation"]
    soft = report["soft_tpm"]
    return {
        "e2e_soft_attestations_per_s": float(report["attestations_per_s"]),
        "e2e_soft_latency_ms_p50": float(report["latency_ms"]["p50"]),
        "e2e_soft_latency_ms_p99": float(report["latency_ms"]["p99"]),
        "soft_server_cpu_ms_per_attestation": float(report["server_cpu_ms_per_attestation"]),
        "soft_agents_cpu_ms_per_attestation": float(per["agents"]),
        "soft_broker_cpu_ms_per_attestation": float(per["broker"]),
        "server_rss_kb_per_device": float(soft["server_rss_kb_per_device"]),
        "agent_hosts_rss_kb_per_device": float(soft["hosts_rss_kb_per_device"]),
        "soft_fleet_devices": float(DEVICES),
        "fleet_devices_held_60s": float(held()),
    }


if __name__ == "__main__":  # pragma: no cover - manual use: python -m firmware_sim.bench.soft_fleet_bench
    import json

    print(json.dumps(run(), indent=2))
