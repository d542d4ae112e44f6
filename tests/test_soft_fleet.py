"""The soft-TPM fleet (``firmware-sim fleet --soft-tpm``): real server, real Mosquitto, no swtpm.

* the CLI run end to end: every device manufactured with a soft TPM, enrolled through the real
  server with its claim credential, re-attested over its own MQTT connection; the golden ones
  trusted, the tampered ones untrusted with the PCRs and events that differ; the swtpm report's
  fields plus ``soft_tpm`` (hosts' and server's RSS per device, whether every device was held);
* the soft fleet's own rules: the device limit, and the held-gap computation (pure).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from firmware_sim.fleet import FleetConfig
from firmware_sim.soft_fleet import read_max_gaps
from protocol.errors import ConfigError

DEVICES = 24
TAMPERED = 3


@pytest.mark.mqtt
@pytest.mark.slow
def test_soft_fleet_enrolls_and_re_attests_every_device_and_reports_memory(tmp_path: Path) -> None:
    workdir, report_path = tmp_path / "work", tmp_path / "report.json"
    cmd = [sys.executable, "-m", "firmware_sim.cli", "fleet", "--soft-tpm", "--workdir", str(workdir),
           "--devices", str(DEVICES), "--tampered", str(TAMPERED), "--interval", "2", "--duration", "8",
           "--start-rate", "100", "--report", str(report_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""
    assert any("KiB/device" in line for line in res.stderr.splitlines()), res.stderr

    report: dict[str, Any] = json.loads(report_path.read_text())
    assert set(report) >= {"devices", "attestations_total", "attestations_per_s", "latency_ms", "verdicts",
                           "server_cpu_ms_per_attestation", "settings", "soft_tpm"}
    devices = report["devices"]
    assert len(devices) == DEVICES
    tampered, golden = devices[:TAMPERED], devices[TAMPERED:]
    for device in tampered:
        assert (device["profile"], device["state"]) == ("tampered-kernel", "untrusted"), device
        reasons = " | ".join(device["reasons"])
        assert "PCR 4" in reasons and "vmlinuz" in reasons, reasons
    for device in golden:
        assert (device["profile"], device["state"], device["reasons"]) == ("golden", "trusted", []), device
    # Re-attested during the window (a 2 s interval over 8 s), every one of them.
    assert all(d["attestations"] >= 2 for d in devices), devices
    assert report["verdicts"]["untrusted"] == sum(d["attestations"] for d in tampered)
    assert report["verdicts"]["trusted"] == sum(d["attestations"] for d in golden)
    assert 0 < report["latency_ms"]["p50"] <= report["latency_ms"]["p99"]

    soft = report["soft_tpm"]
    assert len(soft["hosts_rss_kb"]) == soft["agent_hosts"] == report["settings"]["agent_processes"] >= 1
    assert all(kb > 0 for kb in soft["hosts_rss_kb"])
    assert soft["hosts_rss_kb_per_device"] == pytest.approx(sum(soft["hosts_rss_kb"]) / DEVICES, abs=0.1)
    assert soft["server_rss_kb"] > 0 and soft["server_rss_kb_per_device"] > 0
    assert set(soft["held"]) == {"all_held", "late_devices", "max_gap_ms", "allowed_gap_ms"}
    assert soft["held"]["allowed_gap_ms"] == int((2 + 0.2 + 1.0) * 1000)

    assert not workdir.exists()  # stopped and cleaned up


def test_soft_fleet_takes_up_to_100000_devices_swtpm_5000() -> None:
    FleetConfig(devices=100_000, soft_tpm=True).check()
    with pytest.raises(ConfigError, match="between 1 and 5000"):
        FleetConfig(devices=5001).check()
    with pytest.raises(ConfigError, match="between 1 and 100000"):
        FleetConfig(devices=100_001, soft_tpm=True).check()
    with pytest.raises(ConfigError, match="start_rate"):
        FleetConfig(soft_tpm=True, start_rate=0).check()


def test_max_gaps_count_from_the_window_start_to_its_end(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'a.db'}")
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE attestation (device_id TEXT, stored_at INTEGER)"))
        for device_id, at in [("a", 1500), ("a", 4000), ("a", 9000), ("b", 1200), ("z", 500)]:
            conn.execute(text("INSERT INTO attestation VALUES (:d, :t)"), {"d": device_id, "t": at})
    # window [1000, 10000): a: 500, 2500, 5000, 1000 -> 5000; b: 200 then 8800 to the end; z: outside
    assert read_max_gaps(engine, 1000, 10000) == {"a": 5000, "b": 8800}
    engine.dispose()
