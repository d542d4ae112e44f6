"""System tests: the whole product as it runs, with real processes and nothing simulated but the devices.

One fleet (:class:`firmware_sim.fleet.FleetHarness`) per test process: Mosquitto, ``fleet-server run``
as a subprocess, four swtpm-backed devices (one booting a tampered kernel) with their real agents in
an agent host process.  The tests then break things the way production breaks them and check that
the system heals without an administrator:

* a golden device becomes trusted, the tampered one untrusted with reasons naming the PCR and event;
* the server is killed with SIGKILL and restarted: re-attestation resumes from the schedule in the
  database (agents stay connected to the broker and send no request of their own);
* a device is power-cycled: it is trusted again, never untrusted on the way (also when its agent
  asks for the reboot: the harness's power cycler runs it);
* the broker restarts: agents *and* server workers reconnect and attestations continue.

Waiting is always for an event with a generous timeout, never a timed assertion.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from firmware_sim.fleet import FleetConfig, FleetHarness

pytestmark = [pytest.mark.swtpm, pytest.mark.mqtt, pytest.mark.slow, pytest.mark.xdist_group("fleet-system")]
# Each test waits for what it needs from the fleet (it does not rely on the ones before it), so the
# tests may also be split between xdist workers, each with its own fleet.

WAIT = 90.0
"""Generous: the box is shared with other test runs."""
TAMPERED = "dev-000"
GOLDEN = ("dev-001", "dev-002", "dev-003")


def _processes_mentioning(fragment: str) -> list[str]:
    """Command lines of live processes that mention ``fragment`` (e.g. a workspace path)."""
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
            found.append(f"{entry}: {cmdline[:200]}")
    return found


@pytest.fixture(scope="session")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FleetHarness]:
    # Session scope: under pytest-xdist another module's tests may run between these in the same
    # worker, which would tear a module-scoped fleet down and build it again.
    workdir = tmp_path_factory.mktemp("system") / "fleet"
    config = FleetConfig(devices=4, tampered=1, interval=1.0, duration=None, workdir=workdir,
                         challenge_timeout=10.0, agent_log_level="info")
    harness = FleetHarness(config)
    harness.start()
    hosts = list(harness.hosts)
    try:
        yield harness
    finally:
        harness.close()
    # Nothing is left behind: no swtpm, broker or server (their command lines name the workspace),
    # no agent host, no workspace.
    assert _processes_mentioning(str(workdir)) == []
    assert all(not host.alive for host in hosts)
    assert not workdir.exists()


def _counts(fleet: FleetHarness) -> dict[str, int]:
    counts = fleet.attestation_counts()
    return {d: counts.get(d, 0) for d in fleet.device_ids}


def _wait_every_device_attested_after(fleet: FleetHarness, before: dict[str, int], what: str,
                                      more: int = 2) -> None:
    fleet.wait_for(lambda: all(n >= before[d] + more for d, n in _counts(fleet).items()),
                   f"{what} (every device attested {more} more times)", WAIT)


def _state_history(fleet: FleetHarness, device_id: str, since_ms: int) -> list[str]:
    with fleet._db().connect() as conn:
        rows = conn.execute(text("SELECT to_state FROM statechange WHERE device_id = :d AND at >= :t "
                                 "ORDER BY id"), {"d": device_id, "t": since_ms}).all()
    return [r[0] for r in rows]


def _now_ms() -> int:
    import time

    return time.time_ns() // 1_000_000


def test_golden_devices_are_trusted_and_the_tampered_kernel_is_untrusted_with_pcr_and_event(
        fleet: FleetHarness) -> None:
    rows = fleet.device_states()
    for device_id in GOLDEN:
        assert rows[device_id].state == "trusted", rows[device_id]
        assert rows[device_id].reasons == ()
    tampered = rows[TAMPERED]
    assert fleet.profile_of(TAMPERED) == "tampered-kernel"
    assert tampered.state == "untrusted"
    reasons = " | ".join(tampered.reasons)
    # A patched vmlinuz is measured by the firmware (PCR 4) and by GRUB (PCR 9).
    assert "PCR 4" in reasons and "PCR 9" in reasons, reasons
    assert "EV_EFI_BOOT_SERVICES_APPLICATION" in reasons and "vmlinuz" in reasons, reasons

    # The agents hold the server's signed verdicts.
    fleet.wait_for(lambda: all(s.verdict == ("untrusted" if d == TAMPERED else "trusted")
                               for d, s in fleet.agent_status().items()),
                   "every agent to hold its verdict", WAIT)
    assert not fleet.agent_status()[TAMPERED].trusted
    assert all(fleet.agent_status()[d].trusted for d in GOLDEN)


def test_server_killed_and_restarted_resumes_attestation_from_the_schedule(fleet: FleetHarness) -> None:
    _wait_every_device_attested_after(fleet, _counts(fleet), "attestation before the crash", more=1)
    requests_before = {d: s.counters.get("attest_requests_sent", 0) for d, s in fleet.agent_status().items()}

    fleet.kill_server()
    assert fleet.server_pid is None
    at_restart = _counts(fleet)
    fleet.start_server()
    _wait_every_device_attested_after(fleet, at_restart, "attestation after the restart")

    # The agents never lost the broker, so they asked for nothing: the server found its schedule
    # (device.next_attestation_at) in the database.
    requests_after = {d: s.counters.get("attest_requests_sent", 0) for d, s in fleet.agent_status().items()}
    assert requests_after == requests_before
    rows = fleet.device_states()
    assert [rows[d].state for d in GOLDEN] == ["trusted"] * len(GOLDEN)
    assert rows[TAMPERED].state == "untrusted"


def test_power_cycled_device_is_trusted_again_without_admin_action(fleet: FleetHarness) -> None:
    device_id = GOLDEN[0]
    since = _now_ms()
    before = _counts(fleet)[device_id]
    fleet.power_cycle(device_id)

    def trusted_again() -> bool:
        status = fleet.agent_status()[device_id]
        return (status.trusted and status.counters.get("results_received", 0) >= 1
                and _counts(fleet)[device_id] > before)

    fleet.wait_for(trusted_again, f"{device_id} trusted after its power cycle", WAIT)
    status = fleet.agent_status()[device_id]
    assert status.phase == "running" and status.verdict == "trusted"
    assert status.counters.get("enroll_requests_sent", 0) == 0  # same AK and certificate: no re-enrollment
    assert fleet.device_states()[device_id].state == "trusted"
    # The TPM really restarted (resetCount went up), and the device was never untrusted on the way.
    with fleet._db().connect() as conn:
        reset_counts = [r[0] for r in conn.execute(
            text("SELECT DISTINCT reset_count FROM attestation "
                 "WHERE device_id = :d AND reset_count IS NOT NULL"), {"d": device_id}).all()]
    assert len(reset_counts) >= 2, reset_counts
    assert "untrusted" not in _state_history(fleet, device_id, since)


def test_a_reboot_an_agent_requests_runs_on_the_harness_side(fleet: FleetHarness) -> None:
    """What an agent's Rebooter does (from one of the agent's threads): the harness power-cycles the
    device and restarts its agent, which attests again on the same identity."""
    import threading

    device_id = GOLDEN[1]
    assert fleet.power is not None
    done = len(fleet.power.cycles(device_id))
    before = _counts(fleet)[device_id]
    caller = threading.Thread(target=fleet.power.rebooter(device_id).reboot, args=("test: reboot requested",))
    caller.start()
    caller.join()  # returns at once: the cycle runs on the cycler's thread
    assert fleet.power.wait_for(device_id, done + 1, WAIT)
    record = fleet.power.cycles(device_id)[-1]
    assert (record.reason, record.error) == ("test: reboot requested", None)
    assert fleet.devices[device_id].sim.booted_slot == "a"

    def trusted_again() -> bool:
        status = fleet.agent_status()[device_id]
        return status.trusted and _counts(fleet)[device_id] > before

    fleet.wait_for(trusted_again, f"{device_id} trusted after the requested reboot", WAIT)
    assert fleet.agent_status()[device_id].counters.get("enroll_requests_sent", 0) == 0


def test_broker_restart_reconnects_agents_and_server_workers(fleet: FleetHarness) -> None:
    _wait_every_device_attested_after(fleet, _counts(fleet), "attestation before the broker restart", more=1)
    requests_before = {d: s.counters.get("attest_requests_sent", 0) for d, s in fleet.agent_status().items()}

    fleet.restart_broker()
    at_restart = _counts(fleet)

    # Agents reconnect (and ask for a challenge, reason "reconnect"); the server's worker reconnects
    # and resubscribes, or no evidence would reach it and no attestation would be stored.
    def agents_back() -> bool:
        statuses = fleet.agent_status()
        return all(s.connected and s.counters.get("attest_requests_sent", 0) > requests_before[d]
                   for d, s in statuses.items())

    fleet.wait_for(agents_back, "every agent to reconnect and ask for a challenge", WAIT)
    _wait_every_device_attested_after(fleet, at_restart, "attestation after the broker restart")
    rows = fleet.device_states()
    assert [rows[d].state for d in GOLDEN] == ["trusted"] * len(GOLDEN)
    assert rows[TAMPERED].state == "untrusted"


def test_server_log_has_no_internal_errors(fleet: FleetHarness) -> None:
    """Whatever happened above, the server never failed a batch or a housekeeping step."""
    log = Path(fleet.data_dir / "logs" / "fleet-server.log").read_text(errors="replace")
    for marker in ("event=batch_failed", "event=message_failed", "event=housekeeping_failed",
                   "rejected.internal_error", "Traceback"):
        assert marker not in log, marker
