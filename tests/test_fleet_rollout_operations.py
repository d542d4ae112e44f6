"""Operating a staged rollout while it runs, end to end in the fleet harness (real swtpm devices,
Mosquitto and ``fleet-server run`` processes, whose workers step the rollout; tests/fleet_fixtures.py):

* ``rollout pause`` while the canary updates: nothing is assigned while it is paused (even once the
  canary has committed), ``resume`` and it completes;
* ``rollout cancel`` while a phase updates: nothing is assigned after it, the rollout is cancelled,
  the devices it reached keep the release, the others their firmware;
* the server killed (SIGKILL of its process group) while a phase updates and started again: the
  rollout resumes and completes, no device assigned twice (one assignment row and one attempt each);
* ``fleet-server run --workers 2`` on PostgreSQL: a full rollout, no device assigned twice.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

pytest.register_assert_rewrite("fleet_fixtures")

from fleet_fixtures import TARGET, Run, Step, build_bundle, member_in, now_ms, run_rollout  # noqa: E402

from firmware_sim.fleet import FleetConfig, FleetHarness  # noqa: E402

pytest_plugins = ("pg_fixtures",)

pytestmark = [pytest.mark.swtpm, pytest.mark.mqtt, pytest.mark.slow]

PLAN = """\
canary = 1
phases = [50, 100]
abort_failure_percent = 20
min_executed = 1
device_timeout_s = 120
"""
HOLD_S = 3.0
"""How long a paused rollout is watched after its canary committed (many scheduler ticks: 0.25 s)."""


def _config(tmp_path: Path, devices: int = 4, **kw: Any) -> FleetConfig:
    plan = tmp_path / "plan.toml"
    plan.write_text(PLAN)
    return FleetConfig(devices=devices, interval=1.0, duration=2.0, update_at=0.0,
                       release=build_bundle(tmp_path), rollout=plan, update_deadline=240.0,
                       workdir=tmp_path / "work", **kw)


def _assert_assigned_once(run: Run) -> None:
    """Every member was assigned exactly once: one attempt, one assignment row of the release."""
    members = run.members()
    assert {d: m["attempts"] for d, m in members.items()} == dict.fromkeys(members, 1), members
    assert {d: len(rows) for d, rows in run.assignments.items()} == dict.fromkeys(members, 1), run.assignments
    for device_id, m in members.items():
        assert run.assignments[device_id][0]["assignment_id"] == m["assignment_id"], (m, run.assignments)


def _assert_all_updated(run: Run) -> None:
    rollout = run.report["rollout"]
    assert rollout["state"] == "completed", rollout
    assert [(p["devices"], p["succeeded"]) for p in rollout["phases"]] == [(1, 1), (1, 1), (2, 2)], rollout
    for device in run.report["devices"]:
        update = device["update"]
        assert (update["state"], update["version_after"]) == ("succeeded", "1.3.0"), device


def _committed_and_appraised(harness: FleetHarness, device_id: str, assignment_id: str) -> bool:
    """The assignment committed and the device was appraised after (on the release)."""
    found = harness.assignments(TARGET).get(assignment_id, {})
    return found.get("state") == "committed" and \
        harness.last_appraisals([device_id]).get(device_id, 0) > int(found["updated_at"])


def test_a_paused_rollout_assigns_nothing_until_it_is_resumed_then_completes(tmp_path: Path) -> None:
    seen: dict[str, Any] = {}

    def pause(harness: FleetHarness, view: dict[str, Any]) -> None:
        rid = str(view["id"])
        assert harness.rollout_operation("pause", rid) == f"rollout {rid}: paused"
        seen["paused_ms"] = now_ms()
        seen["at_pause"] = harness.rollout(rid)
        canary = next(m for m in seen["at_pause"]["members"] if m["phase"] == 0)
        # The canary goes on updating; a running rollout would assign phase 1 once it succeeded.
        harness.wait_for(lambda: _committed_and_appraised(harness, canary["device_id"],
                                                          str(canary["assignment_id"])),
                         "the canary to commit and be appraised", 120)
        time.sleep(HOLD_S)
        seen["before_resume"] = harness.rollout(rid)
        seen["resume_ms"] = now_ms()
        assert harness.rollout_operation("resume", rid) == f"rollout {rid}: running"

    run = run_rollout(_config(tmp_path), [Step(member_in(0, "assigned"), pause)])
    at_pause, before_resume = seen["at_pause"], seen["before_resume"]
    assert at_pause["state"] == before_resume["state"] == "paused"
    assert before_resume["members"] == at_pause["members"]  # nothing assigned (or judged) while paused
    assert [m["phase"] for m in at_pause["members"] if m["assigned_at"] is not None] == [0]
    for m in run.rollout["members"]:
        assert m["phase"] == 0 or m["assigned_at"] >= seen["resume_ms"], m
        assert m["assigned_at"] <= seen["paused_ms"] or m["assigned_at"] >= seen["resume_ms"], m
    _assert_all_updated(run)
    _assert_assigned_once(run)


def test_a_cancelled_rollout_assigns_nothing_more_and_the_updated_devices_keep_the_release(
        tmp_path: Path) -> None:
    seen: dict[str, Any] = {}

    def cancel(harness: FleetHarness, view: dict[str, Any]) -> None:
        rid = str(view["id"])
        assert harness.rollout_operation("cancel", rid) == f"rollout {rid}: cancelled"
        seen["cancelled_ms"] = now_ms()
        seen["at_cancel"] = harness.rollout(rid)

    run = run_rollout(_config(tmp_path), [Step(member_in(1, "assigned"), cancel)])
    rollout = run.rollout
    assert rollout["state"] == "cancelled" and rollout["reason"].startswith("cancelled by "), rollout
    assert rollout["phase"] == 1
    reached = {m["device_id"] for m in seen["at_cancel"]["members"] if m["assigned_at"] is not None}
    # Nothing assigned after the cancel: the members (and assignment rows) are those it had reached.
    assert {m["device_id"] for m in rollout["members"] if m["assigned_at"] is not None} == reached
    assert all(m["assigned_at"] <= seen["cancelled_ms"] for m in rollout["members"] if m["assigned_at"])
    assert set(run.assignments) == reached and len(reached) == 2
    _assert_assigned_once(Run(run.report, {**rollout, "members": [
        m for m in rollout["members"] if m["device_id"] in reached]}, run.assignments))
    for device in run.report["devices"]:
        update = device["update"]
        if device["id"] in reached:  # the canary, and the phase-1 device whose update went on
            assert update["assignment_state"] == "committed" and update["version_after"] == "1.3.0", device
        else:
            assert (update["state"], update["attempts"], update["assignment_state"],
                    update["version_after"]) == ("pending", 0, None, "1.2.0"), device
        assert device["trust"]["after"] == "trusted", device


def test_a_server_killed_mid_rollout_resumes_it_after_a_restart_without_assigning_anyone_twice(
        tmp_path: Path) -> None:
    seen: dict[str, Any] = {}

    def crash(harness: FleetHarness, view: dict[str, Any]) -> None:
        harness.kill_server()  # SIGKILL of `fleet-server run` and its workers: no clean shutdown
        seen["at_kill"] = harness.rollout(str(view["id"]))
        harness.start_server()

    run = run_rollout(_config(tmp_path), [Step(member_in(1, "assigned"), crash)])
    at_kill = seen["at_kill"]
    assert at_kill["state"] == "running" and at_kill["phase"] == 1, at_kill
    assert any(m["phase"] == 2 and m["state"] == "pending" for m in at_kill["members"]), at_kill
    _assert_all_updated(run)
    _assert_assigned_once(run)


def test_two_server_workers_on_postgresql_do_not_double_assign(tmp_path: Path, postgres_db: str) -> None:
    run = run_rollout(_config(tmp_path, server_workers=2, database_url=postgres_db))
    assert run.report["settings"]["server_workers"] == 2
    _assert_all_updated(run)
    _assert_assigned_once(run)
