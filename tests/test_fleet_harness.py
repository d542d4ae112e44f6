"""The fleet harness (``firmware-sim fleet``) and the changes made to shared modules for the fleet's speed.

* the CLI run end to end, as its users call it: a small fleet, its report's exact keys and sensible
  values, and nothing left behind (processes, workspace);
* Ctrl-C while the fleet is running: everything stops, exit status 130, no traceback;
* usage and configuration errors: one line, exit status 1 or 2, nothing started;
* the report's arithmetic (pure);
* regressions for the fixes made in other modules while measuring with the harness: the server
  withdrawing a challenge for a dropped log, the agent's PCR-value cache (checked against the
  quote's signed digest), the agent's status-file throttle, the encoder's single walk, and the MQTT
  publish handle's lazy event.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.tpm.adapter import TpmAdapter
from firmware_sim.cli import main as firmware_sim
from firmware_sim.fleet import FleetConfig
from firmware_sim.fleet_report import DeviceInfo, DeviceRow, Window, build_report, percentile
from firmware_sim.swtpm import Swtpm
from fleet_server.keys import ResultSigner
from fleet_server.service import admin
from fleet_server.service.common import ManualClock
from fleet_server.service.context import ServiceContext
from fleet_server.service.processor import Processor
from fleet_server.service.scheduler import Scheduler
from fleet_server.storage.repo import Repository
from protocol import encoding
from protocol.errors import ConfigError, MessageError, TransportError
from protocol.messages import decode_signed
from protocol.mqtt import PublishHandle

pytest.register_assert_rewrite("server_fixtures")
from conftest import tools_env  # noqa: E402
from server_fixtures import DeviceFactory, attest_once, enroll, one, replies  # noqa: E402

pytest_plugins = ("mqtt_fixtures", "server_fixtures")

CONTRACT_KEYS = {"devices", "attestations_total", "attestations_per_s", "latency_ms"}
DEVICE_KEYS = {"id", "profile", "state", "attestations", "reasons"}


def _live_processes_mentioning(fragment: str) -> list[str]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if fragment in cmdline:
            found.append(f"{entry}: {cmdline[:160]}")
    return found


def _fleet_cmd(workdir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "firmware_sim.cli", "fleet", "--workdir", str(workdir), *args]


# --------------------------------------------------------------------------------------------------
# the CLI, end to end
# --------------------------------------------------------------------------------------------------
@pytest.mark.swtpm
@pytest.mark.mqtt
@pytest.mark.slow
def test_fleet_run_writes_the_report_and_leaves_nothing_behind(tmp_path: Path) -> None:
    workdir, report_path = tmp_path / "work", tmp_path / "out" / "report.json"
    res = subprocess.run(_fleet_cmd(workdir, "--devices", "4", "--tampered", "1", "--interval", "1",
                                    "--duration", "10", "--report", str(report_path)),
                         capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""
    progress = res.stderr.splitlines()
    assert all(line.startswith("firmware-sim fleet: ") for line in progress), progress
    assert any("report in" in line for line in progress)

    report: dict[str, Any] = json.loads(report_path.read_text())
    assert set(report) >= CONTRACT_KEYS
    assert set(report["latency_ms"]) == {"p50", "p99"}
    devices = report["devices"]
    assert [d["id"] for d in devices] == ["dev-000", "dev-001", "dev-002", "dev-003"]
    assert all(set(d) == DEVICE_KEYS for d in devices)

    tampered, *golden = devices
    assert tampered["profile"] == "tampered-kernel" and tampered["state"] == "untrusted"
    reasons = " | ".join(tampered["reasons"])
    assert "PCR 4" in reasons and "PCR 9" in reasons and "vmlinuz" in reasons, reasons
    for device in golden:
        assert (device["profile"], device["state"], device["reasons"]) == ("golden", "trusted", [])

    # Per device counts are for the window; the totals agree; a 1 s interval over 10 s gives several.
    assert all(d["attestations"] >= 2 for d in devices), devices
    assert report["attestations_total"] == sum(d["attestations"] for d in devices)
    assert report["attestations_per_s"] == pytest.approx(report["attestations_total"] / report["duration_s"],
                                                         rel=0.01)
    assert 0 < report["latency_ms"]["p50"] <= report["latency_ms"]["p99"]
    assert report["server_cpu_ms_per_attestation"] > 0
    assert report["verdicts"]["untrusted"] == tampered["attestations"]
    assert report["interrupted"] is False

    # Stopped and cleaned up: no process of the run survives, the workspace it made is gone.
    assert _live_processes_mentioning(str(workdir)) == []
    assert not workdir.exists()


@pytest.mark.swtpm
@pytest.mark.mqtt
@pytest.mark.slow
def test_fleet_with_a_model_serves_it_on_trusted_devices_only_and_counts_refusals(tmp_path: Path) -> None:
    model = tmp_path / "classifier.onnx"
    built = subprocess.run([sys.executable, "-m", "firmware_sim.cli", "model", "build", str(model),
                            "--seed", "3"], capture_output=True, text=True, timeout=60, check=False)
    assert built.returncode == 0, built.stderr
    plaintext = model.read_bytes()
    # A lease quota of 5 requests: the sixth and later are refused by the guard, and counted.
    policy = tmp_path / "policy.toml"
    policy.write_text("output_mode = \"topk\"\nk = 2\nlease_quota = 5\n")
    workdir, report_path = tmp_path / "work", tmp_path / "report.json"
    res = subprocess.run(_fleet_cmd(workdir, "--devices", "3", "--tampered", "1", "--interval", "1",
                                    "--duration", "4", "--model", str(model), "--model-policy", str(policy),
                                    "--queries", "8", "--keep", "--report", str(report_path)),
                         capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    report: dict[str, Any] = json.loads(report_path.read_text())
    tampered, *golden = report["devices"]
    assert all(set(d) == DEVICE_KEYS | {"model"} for d in report["devices"])
    assert tampered["state"] == "untrusted"
    assert tampered["model"]["unlocked"] is False
    assert (tampered["model"]["served"], tampered["model"]["refused"]) == (0, 8)
    for device in golden:
        assert device["state"] == "trusted"
        usage = device["model"]
        assert usage["unlocked"] is True
        assert (usage["served"], usage["refused"]) == (5, 3), usage
        assert usage["refusals"] == {"quota_exceeded": 3}
    summary = report["model"]
    assert (summary["name"], summary["unlocked_devices"], summary["served_total"]) == ("classifier", 2, 10)
    assert summary["refused_total"] == 8 + 3 + 3

    # No plaintext model anywhere in the workspace: not in the server's package store, not in any
    # device's or agent's folder (packages are kept as received, encrypted).
    checked = 0
    for path in workdir.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert plaintext not in path.read_bytes(), path
            checked += 1
    assert checked > 20
    assert list(workdir.glob("agents/dev-001/state/models/*.pkg"))  # the device did hold the package
    assert _live_processes_mentioning(str(workdir)) == []


def _model_onnxruntime_refuses(path: Path) -> None:
    """A valid ONNX model (the server's checks pass) with an operator of a domain onnxruntime does not
    have, as a model built for a vendor's accelerator would: only the device finds it cannot load it."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    node = helper.make_node("EdgeNpuOp", ["x"], ["y"], domain="com.example.npu")
    model = helper.make_model(helper.make_graph([node], "npu", [x], [y]), ir_version=8,
                              opset_imports=[helper.make_opsetid("", 13),
                                             helper.make_opsetid("com.example.npu", 1)])
    path.write_bytes(model.SerializeToString())


@pytest.mark.swtpm
@pytest.mark.mqtt
@pytest.mark.slow
def test_a_model_the_devices_cannot_load_ends_the_run_early_with_onnxruntimes_reason(tmp_path: Path) -> None:
    from agent.inference.runtime import ONNXRUNTIME_VERSION
    from fleet_server.config import load_config
    from fleet_server.console import create_app
    from fleet_server.console.app import dispose
    from fleet_server.console.services import EXTENSION

    reason = "com.example.npu:EdgeNpuOp(-1) is not a registered function/op"
    model = tmp_path / "npu.onnx"
    _model_onnxruntime_refuses(model)
    workdir, report_path = tmp_path / "work", tmp_path / "report.json"
    # A 600 s settle timeout and window: the run ends as soon as the devices report the failure.
    res = subprocess.run(_fleet_cmd(workdir, "--devices", "2", "--interval", "2", "--duration", "600",
                                    "--settle-timeout", "600", "--model", str(model), "--queries", "3",
                                    "--keep", "--report", str(report_path)),
                         capture_output=True, text=True, timeout=400, check=False)
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("firmware-sim: model npu 1.0.0 could not be loaded on 2 devices"), last
    assert reason in last, last
    report: dict[str, Any] = json.loads(report_path.read_text())
    for device in report["devices"]:
        assert device["state"] == "trusted"
        assert device["model"]["unlocked"] is False
        assert reason in device["model"]["load_error"], device
        assert device["model"]["served"] == 0
    assert report["model"]["load_failed_devices"] == 2
    assert report["duration_s"] < 5  # nothing measured

    # The server has it: the console's device and model pages and the API show the reason.
    config = load_config(workdir / "server" / "server.toml")
    config = dataclasses.replace(config, console=dataclasses.replace(
        config.console, argon2_time_cost=1, argon2_memory_kib=64, argon2_parallelism=1))
    app = create_app(config, flask_config={"TESTING": True})
    try:
        svc = app.extensions[EXTENSION]
        svc.accounts.add_user("admin", "admin", "correct horse battery staple", now=svc.now())
        client = app.test_client()
        page = client.get("/login")
        token = re.search(r'name="csrf_token" value="([0-9a-f]+)"', page.text)
        assert token is not None
        assert client.post("/login", data={"username": "admin", "password": "correct horse battery staple",
                                           "csrf_token": token.group(1)}).status_code == 303
        device_page = client.get("/devices/dev-000").text
        assert reason in device_page and f"onnxruntime</dt><dd>{ONNXRUNTIME_VERSION}" in device_page
        model_page = client.get("/models/npu").text
        assert "2 devices could not load 1.0.0" in model_page
        assert reason in model_page and "dev-001" in model_page
        device_json = client.get("/api/v1/devices/dev-001").get_json()
        assert device_json["onnxruntime"]["version"] == ONNXRUNTIME_VERSION
        [load] = device_json["model_loads"]
        assert (load["name"], load["version"], load["state"]) == ("npu", "1.0.0", "failed")
        assert reason in load["error"]
        failures = client.get("/api/v1/models/npu").get_json()["load_failures"]
        assert sorted(f["device_id"] for f in failures) == ["dev-000", "dev-001"]
    finally:
        dispose(app)
    assert _live_processes_mentioning(str(workdir)) == []


@pytest.mark.swtpm
@pytest.mark.mqtt
@pytest.mark.slow
def test_fleet_with_a_release_commits_it_on_golden_devices_and_rolls_back_the_one_booting_another_image(
        tmp_path: Path) -> None:
    bundle, workdir, report_path = tmp_path / "bundle-1.3.0", tmp_path / "work", tmp_path / "report.json"
    assert firmware_sim(["release", "build", str(bundle), "--from", "golden", "--version", "1.3.0"]) == 0
    res = subprocess.run(_fleet_cmd(workdir, "--devices", "3", "--release", str(bundle), "--bad-update", "1",
                                    "--interval", "1", "--duration", "6", "--report", str(report_path)),
                         capture_output=True, text=True, timeout=400, check=False)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""
    assert all(line.startswith("firmware-sim fleet: ") for line in res.stderr.splitlines()), res.stderr

    report: dict[str, Any] = json.loads(report_path.read_text())
    assert set(report) >= CONTRACT_KEYS
    devices = report["devices"]
    assert [d["id"] for d in devices] == ["dev-000", "dev-001", "dev-002"]
    assert all(set(d) == DEVICE_KEYS | {"update", "trust"} for d in devices)
    assert all(set(d["update"]) == {"from", "to", "state", "reason", "version_after", "trial_tamper"}
               and set(d["trust"]) == {"before", "during", "after"} for d in devices)
    bad, *good = devices
    for device in good:  # installed, booted the new slot, attested trusted on the release, committed
        assert device["update"] == {"from": "1.2.0", "to": "1.3.0", "state": "committed", "reason": None,
                                    "version_after": "1.3.0", "trial_tamper": None}, device
        assert device["trust"] == {"before": "trusted", "during": ["trusted"], "after": "trusted"}, device
        assert device["state"] == "trusted"
    # The first golden device boots a patched kernel from the trial slot: untrusted with the failing
    # event named, rolled back, trusted again on 1.2.0.
    update = bad["update"]
    assert (update["state"], update["version_after"], update["trial_tamper"]) == ("rolled_back", "1.2.0",
                                                                                  "kernel"), bad
    assert update["reason"].startswith("attestation verdict untrusted:"), update
    assert "EV_EFI_BOOT_SERVICES_APPLICATION" in update["reason"] and "vmlinuz" in update["reason"], update
    assert bad["trust"]["before"] == "trusted" and "untrusted" in bad["trust"]["during"], bad
    assert bad["trust"]["after"] == "trusted" and bad["state"] == "trusted", bad
    summary = report["update"]
    assert summary["target"] == "firmware/edge-camera/1.3.0.fwb" and summary["assigned_devices"] == 3
    assert summary["states"] == {"committed": 2, "rolled_back": 1}
    assert 0 <= summary["assigned_at_s"] < report["duration_s"]
    assert report["settings"]["bad_update"] == 1
    assert _live_processes_mentioning(str(workdir)) == []


@pytest.mark.swtpm
@pytest.mark.mqtt
@pytest.mark.slow
def test_ctrl_c_stops_every_process_cleanly(tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    proc = subprocess.Popen(_fleet_cmd(workdir, "--devices", "2", "--duration", "600", "--keep"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr or []), daemon=True)
    reader.start()
    try:
        # Interrupt while everything runs: broker, server, swtpms and the agent host.
        deadline = time.monotonic() + 240
        while not any("measuring for" in line for line in lines):
            assert proc.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, f"the fleet did not start: {''.join(lines)}"
            time.sleep(0.1)
        assert _live_processes_mentioning(str(workdir))  # the run's processes exist...
        proc.send_signal(signal.SIGINT)
        assert proc.wait(120) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(10)
    text = "".join(lines)
    assert "Traceback" not in text and "SIGINT: stopping" in text
    assert _live_processes_mentioning(str(workdir)) == []  # ... and none survives
    assert (workdir / "server" / "fleet.db").is_file()  # --keep: the workspace stays for inspection


def test_bad_arguments_are_one_line_errors_and_start_nothing(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    cases = [
        (["--devices", "0", "--duration", "1"], "devices"),
        (["--devices", "2", "--tampered", "3", "--duration", "1"], "tampered"),
        (["--devices", "2", "--tampered-profile", "no-such-profile", "--duration", "1"], "no-such-profile"),
        (["--devices", "2", "--interval", "1", "--jitter", "2", "--duration", "1"], "jitter"),
        (["--devices", "2", "--queries", "5", "--duration", "1"], "model"),
        (["--devices", "2", "--model", str(tmp_path / "absent.onnx"), "--duration", "1"], "absent.onnx"),
        (["--devices", "2", "--model", __file__, "--model-name", "Bad Name", "--duration", "1"],
         "model_name"),
        (["--devices", "2", "--release", str(tmp_path / "absent"), "--duration", "1"], "absent"),
        (["--devices", "2", "--release", str(tmp_path), "--duration", "1"], "release.json"),
        (["--devices", "2", "--bad-update", "1", "--duration", "1"], "bad_update"),
        (["--devices", "2", "--soft-tpm", "--release", str(tmp_path), "--duration", "1"], "no A/B slots"),
        (["--devices", "2", "--release", str(tmp_path), "--update-at", "5", "--duration", "1"], "update_at"),
        (["--devices", "2", "--tampered", "2", "--bad-update", "1", "--duration", "1"], "bad_update"),
    ]
    for args, word in cases:
        status = firmware_sim(["fleet", "--workdir", str(tmp_path / "w"), *args])
        err = capsys.readouterr().err
        assert status == 1, (args, err)
        assert len(err.strip().splitlines()) == 1 and word in err and "Traceback" not in err
    assert not (tmp_path / "w").exists()
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "something").write_text("x")
    used = ["fleet", "--workdir", str(tmp_path / "used"), "--devices", "1", "--duration", "1"]
    assert firmware_sim(used) == 1
    assert "not an empty folder" in capsys.readouterr().err
    assert (tmp_path / "used" / "something").read_text() == "x"
    with pytest.raises(SystemExit) as exc:
        firmware_sim(["fleet", "--duration", "1"])  # --devices is required
    assert exc.value.code == 2


def test_config_defaults_follow_the_interval_and_fleet_size() -> None:
    cfg = FleetConfig(devices=100, interval=0.3)
    assert cfg.effective_jitter == pytest.approx(0.03)
    assert cfg.effective_tick == pytest.approx(0.1)
    assert FleetConfig(devices=4, interval=2).effective_tick == pytest.approx(0.5)
    assert FleetConfig(devices=4, interval=60).effective_tick == 1.0
    assert 1 <= cfg.effective_agent_processes <= 2 * (os.cpu_count() or 1)
    assert FleetConfig(devices=3).effective_agent_processes == 1
    assert FleetConfig(devices=10, agent_processes=50).effective_agent_processes == 10
    for bad in (dict(devices=0), dict(tampered=-1), dict(interval=0.0), dict(duration=0.0),
                dict(server_workers=0), dict(device_prefix="Bad_Prefix"), dict(batch_linger=2.0),
                dict(database_url="fleet.db")):
        with pytest.raises(ConfigError):
            FleetConfig(**bad).check()  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------------------
def test_percentile_interpolates_between_ranks() -> None:
    assert percentile([], 50) == 0.0
    assert percentile([7], 99) == 7.0
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile(list(range(1, 101)), 99) == pytest.approx(99.01)
    assert percentile([5, 1, 3], 0) == 1 and percentile([5, 1, 3], 100) == 5


def test_report_counts_the_window_and_divides_cpu_by_attestations() -> None:
    window = Window(start_ms=1_000, end_ms=5_000, counts={"a": 6, "b": 2},
                    latencies_ms=[10, 20, 30, 40, 50, 60, 70, 80], verdicts={"trusted": 6, "untrusted": 2})
    rows = {"a": DeviceRow("a", "trusted", ()), "b": DeviceRow("b", "untrusted", ("PCR 4: x",))}
    report = build_report(devices=[DeviceInfo("a", "golden"), DeviceInfo("b", "tampered-kernel"),
                                   DeviceInfo("c", "golden")],
                          rows=rows, window=window, cpu={"server": 0.004, "agents": 0.016},
                          mqtt_messages=24, extra={"settings": {"devices": 3}})
    assert report["devices"] == [
        {"id": "a", "profile": "golden", "state": "trusted", "attestations": 6, "reasons": []},
        {"id": "b", "profile": "tampered-kernel", "state": "untrusted", "attestations": 2,
         "reasons": ["PCR 4: x"]},
        {"id": "c", "profile": "golden", "state": "unknown", "attestations": 0, "reasons": []},
    ]
    assert report["attestations_total"] == 8 and report["attestations_per_s"] == 2.0
    assert report["latency_ms"] == {"p50": 45.0, "p99": 79.3}
    assert report["server_cpu_ms_per_attestation"] == 0.5
    assert report["cpu_ms_per_attestation"]["agents"] == 2.0
    assert report["cpu_cores"]["server"] == 0.001
    assert report["mqtt_msgs_per_s"] == 6.0 and report["settings"] == {"devices": 3}
    empty = build_report(devices=[], rows={}, window=Window(0, 1000, {}, [], {}), cpu={"server": 1.0},
                         mqtt_messages=None, extra={})
    assert empty["attestations_total"] == 0 and empty["server_cpu_ms_per_attestation"] == 0.0
    assert "mqtt_msgs_per_s" not in empty


# --------------------------------------------------------------------------------------------------
# fixes in other modules, found while measuring with the harness
# --------------------------------------------------------------------------------------------------
@pytest.mark.swtpm
def test_boot_request_withdraws_the_challenge_for_the_log_it_drops(
        processor: Processor, repo: Repository, signer: ResultSigner, make_device: DeviceFactory,
        golden_policy: admin.StoredPolicy, clock: ManualClock) -> None:
    """An agent restarts (no reboot) while a challenge offering the held log is open: its boot
    request drops the held log, so that challenge must go too.  Before the fix its answer (a log
    continuation against an empty held log) was appraised untrusted, and the device revoked."""
    dev = make_device("cam-91")
    admin.preregister_ek(repo, dev.tpm.ek_certificate(), now=clock.now_ms())
    assert enroll(processor, signer, dev).status == "admitted"
    assert attest_once(processor, signer, dev).verdict == "trusted"
    clock.advance(2_000)
    asked = processor.handle_batch([dev.up("hello", dev.hello("manual"))])
    periodic = one(signer, asked, dev.id, "challenge")
    assert periodic.log_offset > 0
    answer = dev.evidence(periodic)  # the restarted agent got the challenge and answers it

    # Its boot request comes within the rate limit: no new challenge now, the held log is dropped.
    assert processor.handle_batch([dev.up("hello", dev.hello("boot"))]) == []
    assert processor.counters.get("rejected.rate_limited") == 1

    out = processor.handle_batch([dev.up("evidence", answer)])
    assert replies(signer, out, dev.id, "result") == []
    assert processor.counters.get("rejected.challenge_superseded") == 1
    record = repo.device(dev.id)
    assert record is not None and record.state == "trusted" and repo.outbox() == []

    clock.advance(1_000)
    fresh = one(signer, processor.handle_batch([dev.up("hello", dev.hello("manual"))]), dev.id, "challenge")
    assert fresh.log_offset == 0  # the whole log, since the server holds none now
    result = one(signer, processor.handle_batch([dev.up("evidence", dev.evidence(fresh))]), dev.id, "result")
    assert result.verdict == "trusted"


@pytest.mark.swtpm
def test_a_proof_for_a_superseded_enrollment_request_is_dropped_not_rejected(
        processor: Processor, repo: Repository, signer: ResultSigner, make_device: DeviceFactory,
        clock: ManualClock) -> None:
    """The agent re-sends enroll.request on every reconnect and after enroll_retry; the server makes
    a new session each time.  A proof for the older session used to get a final "rejected", which
    stops the agent (seen with 200 devices enrolling at once and a 5 s retry)."""
    dev = make_device("cam-92", fresh_tpm=True)
    admin.preregister_ek(repo, dev.tpm.ek_certificate(), now=clock.now_ms())
    first = one(signer, processor.handle_batch([dev.enroll_up("request", dev.enroll_request())]), dev.id,
                "challenge")
    clock.advance(5_000)
    second = one(signer, processor.handle_batch([dev.enroll_up("request", dev.enroll_request())]), dev.id,
                 "challenge")
    assert first.request_id != second.request_id

    out = processor.handle_batch([dev.enroll_up("proof", dev.enroll_proof(first))])
    assert replies(signer, out, dev.id, "result") == []  # no final answer for a stale proof
    assert processor.counters.get("rejected.enroll_session_superseded") == 1
    result = one(signer, processor.handle_batch([dev.enroll_up("proof", dev.enroll_proof(second))]), dev.id,
                 "result")
    assert result.status == "admitted" and result.device_cert is not None


@pytest.mark.swtpm
def test_short_interval_scheduler_keeps_a_fresh_challenge_instead_of_superseding_it(
        processor: Processor, repo: Repository, signer: ResultSigner, make_device: DeviceFactory,
        golden_policy: admin.StoredPolicy, clock: ManualClock, ctx: ServiceContext) -> None:
    """With an interval shorter than the challenge timeout, a challenge the device is still answering
    is not superseded by the next periodic one (under overload that wasted every attestation: the
    harness saw the rate collapse); one not answered within half its timeout is replaced."""
    dev = make_device("cam-93")
    admin.preregister_ek(repo, dev.tpm.ek_certificate(), now=clock.now_ms())
    assert enroll(processor, signer, dev).status == "admitted"
    assert attest_once(processor, signer, dev).verdict == "trusted"
    short = dataclasses.replace(ctx, settings=dataclasses.replace(ctx.settings, interval=1.0, jitter=0.0))
    scheduler = Scheduler(short, repo, processor.counters)
    timeout = short.settings.challenge_timeout_ms

    clock.advance(ctx.settings.interval_ms)  # due under the long interval the device got at boot
    result, out = scheduler.run_once()
    assert result.challenged == 1
    first = decode_signed(out[0].payload, keys={signer.kid: signer.public_key}, aud=dev.id).message
    answer = dev.evidence(first)

    clock.advance(1_000)  # due again, its challenge still being answered: kept, not replaced
    assert scheduler.run_once()[0].challenged == 0
    assert processor.counters.get("schedule.deferred") == 1
    assert repo.challenge(first.challenge_id).status == "open"  # type: ignore[union-attr]
    result_msg = one(signer, processor.handle_batch([dev.up("evidence", answer)]), dev.id, "result")
    assert result_msg.verdict == "trusted"

    clock.advance(1_000)  # answered: the next one comes on schedule
    result, out = scheduler.run_once()
    assert result.challenged == 1
    second = decode_signed(out[0].payload, keys={signer.kid: signer.public_key}, aud=dev.id).message
    clock.advance(timeout // 2 + 1)  # never answered (lost): replaced once half its timeout passed
    assert scheduler.run_once()[0].challenged == 1
    assert repo.challenge(second.challenge_id).status == "superseded"  # type: ignore[union-attr]


@pytest.mark.swtpm
def test_quote_reuses_pcr_values_only_while_they_hash_to_the_signed_digest(swtpm: Swtpm,
                                                                           tmp_path: Path) -> None:
    from fleet_server.verifier.quote import AttestationKey, verify_quote

    adapter = TpmAdapter(swtpm.tcti, tmp_path / "state")
    reads: list[int] = []
    real_read = adapter._read_pcrs

    def counting_read(sel: Any) -> dict[str, dict[int, bytes]]:
        reads.append(1)
        return real_read(sel)

    adapter._read_pcrs = counting_read  # type: ignore[method-assign]
    sel = {"sha256": [0, 7, 16]}
    try:
        ak = AttestationKey.from_tpm2b_public(adapter.ak_public)

        def quote_and_verify(nonce: bytes) -> dict[str, dict[int, bytes]]:
            q = adapter.quote(nonce, sel)
            verify_quote(ak=ak, attest=q.attest, signature=q.signature, nonce=nonce, pcr_values=q.pcrs)
            return q.pcrs

        first = quote_and_verify(b"1" * 32)
        second = quote_and_verify(b"2" * 32)
        assert second == first and len(reads) == 1  # the second quote needed no TPM2_PCR_Read
        subprocess.run(["tpm2_pcrextend", f"16:sha256={hashlib.sha256(b'changed').hexdigest()}"],
                       env=tools_env(swtpm), check=True, capture_output=True, timeout=60)
        third = quote_and_verify(b"3" * 32)
        assert len(reads) == 2 and third["sha256"][16] != first["sha256"][16]
        assert third["sha256"][0] == first["sha256"][0]
    finally:
        adapter.close()


def test_status_file_changes_of_counters_alone_are_throttled(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from agent import service as agent_service
    from agent.config import load_config
    from agent.service import Agent

    (tmp_path / "key.pem").write_text("unused")
    config_path = tmp_path / "agent.toml"
    config_path.write_text('device_id = "cam-1"\ndevice_class = "camera"\nfirmware_version = "1.0"\n'
                           'state_dir = "state"\n[mqtt]\nhost = "127.0.0.1"\nca_cert = "ca.pem"\n'
                           'claim_cert = "c.pem"\nclaim_key = "c.key"\n[server]\n'
                           'signing_public_key = "key.pem"\n')
    agent = Agent(load_config(config_path))
    agent.config.state_dir.mkdir()
    now = [1000.0]
    monkeypatch.setattr(agent_service.time, "monotonic", lambda: now[0])
    path = agent.config.status_path

    def on_disk() -> dict[str, Any]:
        data: dict[str, Any] = json.loads(path.read_text())
        return data

    agent._write_status(force=True)
    agent._count("challenges_received")
    now[0] += 0.5
    agent._write_status()
    assert on_disk()["counters"] == {}  # counters alone: not yet
    agent._set_phase("running")
    agent._write_status()
    assert on_disk()["phase"] == "running"  # anything else: at once (with the counters)
    assert on_disk()["counters"] == {"challenges_received": 1}
    agent._count("challenges_answered")
    now[0] += agent_service.STATUS_MIN_INTERVAL - 0.1
    agent._write_status()
    assert "challenges_answered" not in on_disk()["counters"]
    now[0] += 0.2
    agent._write_status()
    assert on_disk()["counters"] == {"challenges_answered": 1, "challenges_received": 1}


def _reference_check_no_floats(value: Any, depth: int) -> None:
    """The encoder's walk before it was made single-pass (the behaviour to keep)."""
    if depth > encoding.MAX_DEPTH:
        raise MessageError("message nests too deeply")
    if isinstance(value, float):
        raise MessageError("floats are not allowed in canonical messages")
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise MessageError("object keys must be strings")
            _reference_check_no_floats(v, depth + 1)
    elif isinstance(value, list | tuple):
        for v in value:
            _reference_check_no_floats(v, depth + 1)


def _outcome(fn: Callable[[], object]) -> str:
    try:
        fn()
    except MessageError as exc:
        return str(exc)
    return "ok"


def _nest(depth: int, leaf: Any, *, as_list: bool = False) -> Any:
    value = leaf
    for _ in range(depth):
        value = [value] if as_list else {"k": value}
    return value


def test_encoder_and_decoder_walks_keep_their_errors_and_order() -> None:
    m = encoding.MAX_DEPTH
    cases: list[Any] = [
        {"a": 1, "b": "x", "c": None, "d": True, "e": [1, 2, {"f": "g"}]},
        {"a": 1.5}, {"a": [1, 2.0]}, {1: "x"}, {"a": {2: 1.0}}, {"a": {"b": 1.0}, 3: "x"},
        _nest(m, 1), _nest(m + 1, 1), _nest(m, {}), _nest(m, []), _nest(m, [1], as_list=True),
        _nest(m - 1, [1]), _nest(m, {1: 2}), _nest(m, 1.5), _nest(m + 3, 1.5), (1, (2.5,)),
        {"a": _nest(m, "deep"), "b": 1.0}, {"b": 1.0, "a": _nest(m, "deep")},
    ]
    for value in cases:
        expected = _outcome(lambda v=value: _reference_check_no_floats(v, 0))
        assert _outcome(lambda v=value: encoding._check_no_floats(v, 0)) == expected, value
        if expected == "ok" and isinstance(value, dict):
            data = encoding.canonical_bytes(value)
            assert encoding.decode_object(data, max_size=1 << 16) == json.loads(data)
    # Decoding: the same depth limit as the old walk (every node checked, scalars included).
    def reference_depth(value: Any, depth: int) -> None:
        if depth > m:
            raise MessageError("message nests too deeply")
        for v in value.values() if isinstance(value, dict) else value if isinstance(value, list) else ():
            reference_depth(v, depth + 1)

    for depth in (m - 1, m, m + 1):
        for leaf in (1, "x", {}, [], [1], {"a": None}):
            for as_list in (False, True):
                value = {"root": _nest(depth, leaf, as_list=as_list)}
                data = json.dumps(value).encode()
                expected = _outcome(lambda v=value: reference_depth(v, 0))
                got = _outcome(lambda d=data: encoding.decode_object(d, max_size=1 << 16))
                assert got == expected, (depth, leaf, as_list)
    assert _outcome(lambda: encoding.decode_object(json.dumps(_nest(m + 1, 1)).encode(), max_size=1 << 16)) \
        == "message nests too deeply"


def test_publish_handle_makes_its_event_only_for_waiters() -> None:
    done_first = PublishHandle(1, 0, "t")
    done_first._resolve(0, None)
    assert done_first.done and done_first._event is None
    done_first.wait(0)  # resolved: returns at once

    refused = PublishHandle(2, 1, "t")
    refused._resolve(0x87, "broker refused")
    refused._resolve(0, None)  # the first outcome stays
    assert refused.reason_code == 0x87
    with pytest.raises(TransportError, match="broker refused"):
        refused.wait(0)

    waiting = PublishHandle(3, 1, "t")
    with pytest.raises(TransportError, match="no acknowledgement"):
        waiting.wait(0.01)
    threading.Timer(0.05, waiting._resolve, args=(0, None)).start()
    waiting.wait(30)  # woken by the resolution from another thread
    assert waiting.done and waiting.error is None
