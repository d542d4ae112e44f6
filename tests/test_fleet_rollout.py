"""Staged rollouts in the fleet harness (``firmware-sim fleet --rollout PLAN.toml --release BUNDLE_DIR
[--bad K]``), end to end with real swtpm, Mosquitto and ``fleet-server run`` (whose workers step the
rollout):

* a good release reaches every golden device phase by phase (each phase assigned only after the one
  before succeeded), the report's ``rollout`` completed with its per-phase counts;
* a release the canary device boots a wrong image after (``--bad 1``) aborts the rollout after the
  canary: the other devices are never assigned, the server raised a critical ``rollout_aborted``
  alert, and the abort latency is recorded;
* a device offline when its phase is assigned times out and is assigned again (``retries``);
* plan-file and option errors are one line, before anything starts; the canary arithmetic (pure).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.register_assert_rewrite("fleet_fixtures")

from fleet_fixtures import TARGET, Step, build_bundle, run_rollout  # noqa: E402

from firmware_sim.cli import main as firmware_sim  # noqa: E402
from firmware_sim.fleet import FleetConfig, FleetHarness  # noqa: E402
from firmware_sim.fleet_rollout import canary_for  # noqa: E402
from fleet_server.config import load_config  # noqa: E402
from fleet_server.rollouts.plan import parse_plan  # noqa: E402
from fleet_server.storage.db import create_engine  # noqa: E402
from fleet_server.storage.repo import Repository  # noqa: E402

PLAN = """\
canary = 1
phases = [50, 100]
abort_failure_percent = 20
min_executed = 1
device_timeout_s = 120
"""
UPDATE_KEYS = {"from", "to", "state", "reason", "phase", "attempts", "assignment_state", "version_after",
               "trial_tamper"}


def _run(tmp_path: Path, *args: str) -> tuple[dict[str, Any], Repository]:
    """Run a kept fleet of 4 devices with the plan and the release; its report and its server database."""
    plan = tmp_path / "plan.toml"
    plan.write_text(PLAN)
    workdir, report_path = tmp_path / "work", tmp_path / "report.json"
    cmd = [sys.executable, "-m", "firmware_sim.cli", "fleet", "--workdir", str(workdir), "--keep",
           "--devices", "4", "--release", str(build_bundle(tmp_path)), "--rollout", str(plan), *args,
           "--interval", "1", "--duration", "2", "--update-at", "0", "--report", str(report_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=400, check=False)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""
    assert all(line.startswith("firmware-sim fleet: ") for line in res.stderr.splitlines()), res.stderr
    config = load_config(workdir / "server" / "server.toml")
    return json.loads(report_path.read_text()), Repository(create_engine(config.database_url))


@pytest.mark.swtpm
@pytest.mark.mqtt
@pytest.mark.slow
def test_a_good_release_reaches_every_device_phase_by_phase(tmp_path: Path) -> None:
    report, repo = _run(tmp_path)
    try:
        rollout = report["rollout"]
        assert rollout["state"] == "completed" and rollout["reason"] is None, rollout
        # 4 devices: the canary (1), phase 1 up to 50% (1 more), phase 2 up to 100% (2 more).
        assert [(p["devices"], p["succeeded"], p["failed"], p["pending"], p["assigned"])
                for p in rollout["phases"]] == [(1, 1, 0, 0, 0), (1, 1, 0, 0, 0), (2, 2, 0, 0, 0)]
        assert rollout["devices_per_min"] > 0 and rollout["abort_s"] is None
        devices = report["devices"]
        assert all(set(d["update"]) == UPDATE_KEYS for d in devices)
        for device in devices:
            assert {k: device["update"][k] for k in ("from", "to", "state", "reason", "assignment_state",
                                                     "version_after", "attempts")} == {
                "from": "1.2.0", "to": "1.3.0", "state": "succeeded", "reason": None,
                "assignment_state": "committed", "version_after": "1.3.0", "attempts": 1}, device
            assert device["trust"] == {"before": "trusted", "during": ["trusted"], "after": "trusted"}, device
        assert sorted(d["update"]["phase"] for d in devices) == [0, 1, 2, 2]
        assert report["update"]["states"] == {"succeeded": 4} and report["update"]["assigned_devices"] == 4
        # Phase by phase: no device of a phase was assigned before every device of the one before
        # had succeeded (the server's own record of the members).
        with repo.rollouts.reading("reading the members") as tx:
            members = tx.members(rollout["id"])
        for phase in (1, 2):
            before = [m for m in members if m.phase == phase - 1]
            now = [m for m in members if m.phase == phase]
            assert max(m.finished_at or 0 for m in before) <= min(m.assigned_at or 0 for m in now), members
    finally:
        repo.dispose()


@pytest.mark.swtpm
@pytest.mark.mqtt
@pytest.mark.slow
def test_a_canary_that_boots_a_wrong_image_aborts_the_rollout_with_the_rest_untouched_and_an_alert(
        tmp_path: Path) -> None:
    report, repo = _run(tmp_path, "--bad", "1")
    try:
        rollout = report["rollout"]
        assert rollout["state"] == "aborted" and rollout["phase"] == 0, rollout
        assert [(p["devices"], p["succeeded"], p["failed"], p["pending"], p["assigned"])
                for p in rollout["phases"]] == [(1, 0, 1, 0, 0), (1, 0, 0, 1, 0), (2, 0, 0, 2, 0)]
        assert rollout["abort_s"] is not None and rollout["abort_s"] >= 0
        bad, *rest = report["devices"]
        # The first golden device boots a patched kernel from the trial slot; it was named into the
        # canary (the plan's canary of 1 keeps its size), attested untrusted there, rolled back.
        assert bad["update"]["phase"] == 0 and bad["update"]["trial_tamper"] == "kernel", bad
        assert bad["update"]["state"] in ("untrusted_after_update", "rolled_back"), bad
        assert bad["update"]["version_after"] == "1.2.0" and "untrusted" in bad["trust"]["during"], bad
        assert bad["trust"]["after"] == "trusted", bad
        for device in rest:  # never assigned: still on 1.2.0, trusted throughout
            update = device["update"]
            assert (update["state"], update["attempts"], update["assignment_state"],
                    update["version_after"]) == ("pending", 0, None, "1.2.0"), device
            assert device["trust"] == {"before": "trusted", "during": ["trusted"], "after": "trusted"}, device
        release = repo.releases.release(TARGET)
        assert release is not None
        assigned = {a.device_id for a in repo.releases.assignments(release_id=release.id)}
        assert assigned == {bad["id"]}
        alerts = repo.models.alerts(kind="rollout_aborted")
        assert len(alerts) == 1 and alerts[0].severity == "critical", alerts
        assert rollout["id"] in alerts[0].message
    finally:
        repo.dispose()


def test_plan_and_option_errors_are_one_line_and_start_nothing(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    bundle = build_bundle(tmp_path)
    plans = {"unknown.toml": "canary = 1\nspeed = 3\n", "broken.toml": "canary = [\n",
             "negative.toml": "phases = [50, 20]\n", "good.toml": PLAN}
    for name, text in plans.items():
        (tmp_path / name).write_text(text)
    base = ["--devices", "3", "--duration", "1", "--release", str(bundle), "--rollout"]
    cases = [
        (["--devices", "3", "--duration", "1", "--rollout", str(tmp_path / "good.toml")], "needs a release"),
        ([*base, str(tmp_path / "absent.toml")], "absent.toml"),
        ([*base, str(tmp_path / "unknown.toml")], "'speed'"),
        ([*base, str(tmp_path / "broken.toml")], "not valid TOML"),
        ([*base, str(tmp_path / "negative.toml")], "must not decrease"),
        ([*base, str(tmp_path / "good.toml"), "--bad", "4"], "bad_update"),
    ]
    for args, word in cases:
        status = firmware_sim(["fleet", "--workdir", str(tmp_path / "w"), *args])
        err = capsys.readouterr().err
        assert status == 1, (args, err)
        assert len(err.strip().splitlines()) == 1 and word in err and "Traceback" not in err, (args, err)
    assert not (tmp_path / "w").exists()


def test_the_bad_devices_are_named_into_the_canary_without_growing_it() -> None:
    assert canary_for(parse_plan({"canary": 1}), 4, ["dev-000"]) == (0, ["dev-000"])
    assert canary_for(parse_plan({"canary": 3}), 10, ["dev-000"]) == (2, ["dev-000"])
    assert canary_for(parse_plan({"canary": 1}), 4, ["dev-000", "dev-001"]) == (0, ["dev-000", "dev-001"])
    assert canary_for(parse_plan({"canary": "25%"}), 10, ["dev-000"]) == (2, ["dev-000"])  # ceil(2.5)
    # The plan's named device and one counted: the bad device takes the counted one's place.
    assert canary_for(parse_plan({"canary": 1, "canary_devices": ["dev-009"]}), 10, ["dev-000"]) == (
        0, ["dev-009", "dev-000"])
    assert canary_for(parse_plan({"canary": 2, "canary_devices": ["dev-000"]}), 10, ["dev-000"]) == (
        2, ["dev-000"])
    assert canary_for(parse_plan({"canary": 2}), 10, []) == (2, [])


@pytest.mark.swtpm
@pytest.mark.mqtt
@pytest.mark.slow
def test_a_device_offline_when_its_phase_is_assigned_times_out_and_is_assigned_again(tmp_path: Path) -> None:
    # dev-000 is named the canary; dev-001 (phase 1) is offline when the phase is assigned, so it never
    # receives its assignment (the agents' MQTT sessions start clean). It comes back online at once;
    # after device_timeout_s its member times out, goes back to pending (retries = 1), and the
    # assignment sent again reaches it: it installs, is attested trusted on the release, succeeds.
    plan = tmp_path / "plan.toml"
    plan.write_text('canary = 0\ncanary_devices = ["dev-000"]\nphases = [100]\nretries = 1\n'
                    "device_timeout_s = 30\nabort_failure_percent = 50\n")
    config = FleetConfig(devices=3, interval=1.0, duration=1.0, update_at=0.0, release=build_bundle(tmp_path),
                         rollout=plan, update_deadline=240.0, workdir=tmp_path / "work")
    offline = "dev-001"
    seen: list[tuple[str, int]] = []

    def bring_back(harness: FleetHarness, view: dict[str, Any]) -> None:  # its assignment was lost
        member = next(m for m in view["members"] if m["device_id"] == offline)
        seen.append((member["state"], member["attempts"]))
        harness.start_agent(offline)

    def assigned(view: dict[str, Any]) -> bool:
        return any(m["device_id"] == offline and m["state"] == "assigned" for m in view["members"])

    report = run_rollout(config, [Step(assigned, bring_back)],
                         before=lambda harness: harness.stop_agent(offline)).report
    assert seen == [("assigned", 1)]
    rollout = report["rollout"]
    assert rollout["state"] == "completed", rollout
    assert [(p["devices"], p["succeeded"]) for p in rollout["phases"]] == [(1, 1), (2, 2)]
    devices = {d["id"]: d for d in report["devices"]}
    assert devices[offline]["update"]["attempts"] == 2 and devices[offline]["update"]["state"] == "succeeded"
    assert devices[offline]["update"]["version_after"] == "1.3.0"
    assert devices["dev-000"]["update"]["attempts"] == 1 and devices["dev-002"]["update"]["attempts"] == 1
