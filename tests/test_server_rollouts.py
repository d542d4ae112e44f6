"""Staged rollouts on the server (fleet_server/service/rollouts.py), SQLite and PostgreSQL.

The first tests drive real swtpm devices through the Processor (UpdateStatus reports and evidence
of the new firmware, firmware_sim's ``golden`` = 1.2.0 and ``updated-firmware`` = 1.3.0) like
tests/test_server_releases.py does. The engine tests after them insert device rows and move the
assignments in the database (what the Processor would record), to exercise pause/resume, cancel,
restarts, two workers, timeouts, joining devices and rollback on abort.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest

from fleet_server.keys import ResultSigner
from fleet_server.rollouts.plan import Group, RolloutError, parse_plan
from fleet_server.service import admin, rollouts
from fleet_server.service.common import ManualClock
from fleet_server.service.processor import Processor
from fleet_server.service.releases import add_release, withdraw_release
from fleet_server.storage.db import create_engine
from fleet_server.storage.models import DeviceState
from fleet_server.storage.release_repo import ReleaseRecord
from fleet_server.storage.release_tables import AssignmentState
from fleet_server.storage.repo import NewDevice, Repository
from protocol import topics
from protocol.messages import UpdateStatus, encode_plain

pytest.register_assert_rewrite("server_fixtures", "release_fixtures")
from release_fixtures import MemoryTargetStore, write_bundle_dir  # noqa: E402
from server_fixtures import BOTH_DATABASES, DeviceFactory, SimDevice, attest_once, enroll  # noqa: E402

pytest_plugins = ("mqtt_fixtures", "server_fixtures", "pg_fixtures")
pytestmark = [BOTH_DATABASES]

TARGET = "firmware/edge-camera/1.3.0.fwb"
GROUP = Group("edge-camera")


@pytest.fixture
def release(repo: Repository, tmp_path: Path, clock: ManualClock) -> ReleaseRecord:
    bundle = write_bundle_dir(tmp_path / "bundle")
    return add_release(repo, MemoryTargetStore(), bundle, device_class="edge-camera", version="1.3.0",
                       now=clock.now_ms(), actor="test")


def _step(repo: Repository, signer: ResultSigner, clock: ManualClock, rid: str = "r1") -> rollouts.StepResult:
    result = rollouts.step_rollout(repo, rid, signer=signer, now=clock.now_ms())
    assert result is not None
    return result


def _phases(repo: Repository, clock: ManualClock, rid: str = "r1") -> list[tuple[int, int, int]]:
    return [(p.devices, p.succeeded, p.failed) for p in rollouts.view(repo, rid, now=clock.now_ms()).phases]


def _members(repo: Repository, rid: str = "r1") -> dict[str, str]:
    return {m.device_id: m.state for m in repo.rollouts.members(rid)}


def _assignment_counts(repo: Repository, device_ids: list[str]) -> dict[str, int]:
    return {i: len(repo.releases.assignments(device_id=i)) for i in device_ids}


# -- real devices through the Processor -----------------------------------------------------------------
def _status(processor: Processor, dev: SimDevice, assignment_id: str, state: str, reason: str = "") -> None:
    message = UpdateStatus(assignment_id=assignment_id, target=TARGET, state=state, from_version="1.2.0",
                           to_version="1.3.0", reason=reason)
    processor.handle_batch([dev.up("update-status", encode_plain(message, ts=dev.clock.now_ms()))])


def _install(processor: Processor, signer: ResultSigner, clock: ManualClock, repo: Repository,
             dev: SimDevice, profile: str) -> str:
    """The device installs its assignment and boots ``profile``; commits when it attests trusted."""
    [assignment] = repo.releases.assignments(device_id=dev.id, limit=1)
    for state in ("downloading", "installed", "rebooting"):
        _status(processor, dev, assignment.id, state)
    dev.power_cycle(profile)
    clock.advance(2_000)
    verdict = str(attest_once(processor, signer, dev).verdict)
    if verdict == "trusted":
        _status(processor, dev, assignment.id, "committed")
    return verdict


@pytest.fixture
def fleet(processor: Processor, repo: Repository, signer: ResultSigner, make_device: DeviceFactory,
          golden_policy: admin.StoredPolicy, clock: ManualClock) -> dict[str, SimDevice]:
    devices: dict[str, SimDevice] = {}
    for i in range(4):
        dev = make_device(f"cam-{i}", fresh_tpm=True)
        admin.preregister_ek(repo, dev.tpm.ek_certificate(), now=clock.now_ms())
        assert enroll(processor, signer, dev).status == "admitted"
        assert attest_once(processor, signer, dev).verdict == "trusted"
        devices[dev.id] = dev
    return devices


@pytest.mark.swtpm
def test_a_good_release_reaches_all_devices_phase_by_phase(
        processor: Processor, repo: Repository, signer: ResultSigner, fleet: dict[str, SimDevice],
        release: ReleaseRecord, clock: ManualClock) -> None:
    plan = parse_plan({"canary": 1, "phases": [50, 100], "device_timeout_s": 600})
    rollouts.create_rollout(repo, target=TARGET, group=GROUP, plan=plan, now=clock.now_ms(), actor="test",
                            rollout_id="r1")
    assert _phases(repo, clock) == [(1, 0, 0), (1, 0, 0), (2, 0, 0)]
    seen: list[tuple[int, ...]] = []
    for expected_phase, size in ((0, 1), (1, 1), (2, 2)):
        step = _step(repo, signer, clock)
        assert (step.phase, len(step.assigned)) == (expected_phase, size), step
        # Only the phase's devices got the signed assignment, each once.
        for device_id in step.assigned:
            assert sum(1 for r in repo.outbox() if r.topic == topics.device_down(device_id, "update")) == 1
        # Nothing more is assigned while the phase is in flight.
        assert _step(repo, signer, clock).assigned == ()
        for device_id in step.assigned:
            assert _install(processor, signer, clock, repo, fleet[device_id], "updated-firmware") == "trusted"
        seen.append(tuple(p[1] for p in _phases(repo, clock)))
    final = _step(repo, signer, clock)
    assert final.state == "completed"
    assert _phases(repo, clock) == [(1, 1, 0), (1, 1, 0), (2, 2, 0)]
    assert set(_members(repo).values()) == {"succeeded"}
    assert all(repo.device(i).firmware_version == "1.3.0" for i in fleet)  # type: ignore[union-attr]
    assert _assignment_counts(repo, list(fleet)) == dict.fromkeys(fleet, 1)


@pytest.mark.swtpm
def test_an_untrusted_canary_aborts_the_rollout_with_the_rest_untouched_and_an_alert(
        processor: Processor, repo: Repository, signer: ResultSigner, fleet: dict[str, SimDevice],
        release: ReleaseRecord, clock: ManualClock) -> None:
    plan = parse_plan({"canary": 1, "phases": [100], "abort_failure_percent": 10, "min_executed": 1,
                       "rollback_on_abort": True})
    rollouts.create_rollout(repo, target=TARGET, group=GROUP, plan=plan, now=clock.now_ms(), actor="test",
                            rollout_id="r1")
    [canary] = _step(repo, signer, clock).assigned
    # The canary boots a wrong image after installing: its evidence is untrusted.
    assert _install(processor, signer, clock, repo, fleet[canary], "tampered-kernel") == "untrusted"
    failed_at = clock.now_ms()
    clock.advance(500)
    step = _step(repo, signer, clock)
    assert step.state == "aborted" and step.assigned == ()
    assert step.abort_latency_ms is not None and step.abort_latency_ms >= 500
    view = rollouts.view(repo, "r1", now=clock.now_ms())
    assert view.rollout.state == "aborted" and "untrusted_after_update" in view.rollout.reason
    assert view.rollout.abort_trigger_at is not None and view.rollout.abort_trigger_at >= failed_at - 2_000
    members = _members(repo)
    assert members.pop(canary) == "untrusted_after_update"
    assert set(members.values()) == {"pending"}
    assert _assignment_counts(repo, list(members)) == dict.fromkeys(members, 0)  # untouched
    # The canary ran the administrator's golden policy, not a catalog release: it cannot be sent back.
    [m] = [m for m in repo.rollouts.members("r1") if m.device_id == canary]
    assert "cannot roll back" in m.reason
    [alert] = repo.models.alerts(kind="rollout_aborted")
    assert alert.severity == "critical" and "r1" in alert.message
    # An aborted rollout takes no more steps.
    assert rollouts.step_rollout(repo, "r1", signer=signer, now=clock.now_ms() + 60_000) is None


# -- the engine on database rows ----------------------------------------------------------------------
def _devices(repo: Repository, ids: list[str], now: int, *, firmware: str = "1.2.0",
             device_class: str = "edge-camera") -> list[str]:
    with repo.write() as tx:
        for i in ids:
            tx.insert_device(NewDevice(
                id=i, state=DeviceState.TRUSTED, device_class=device_class, firmware_version=firmware,
                ek_cert=b"c", ek_fingerprint=hashlib.sha256(i.encode()).hexdigest(), ek_public=b"e",
                ak_public=b"a", ak_name=b"n", csr=None, enroll_request_id=None, cert_serial=None, now=now,
                next_attestation_at=None), cause="test")
    return ids


def _succeed(repo: Repository, device_id: str, release_id: int, now: int) -> None:
    """What the Processor records for a device that attested trusted on the release and committed."""
    [a] = repo.releases.assignments(device_id=device_id, limit=1)
    with repo.write() as tx:
        tx.releases.set_attested_release(device_id, release_id, now)
        tx.releases.set_assignment_state(a.id, state=AssignmentState.COMMITTED, reason="", now=now,
                                         committed_at=now, grace_until=now + 1000)


def test_pause_and_resume(repo: Repository, signer: ResultSigner, release: ReleaseRecord,
                          clock: ManualClock) -> None:
    ids = _devices(repo, ["d0", "d1", "d2"], clock.now_ms())
    rollouts.create_rollout(repo, target=TARGET, group=GROUP, plan=parse_plan({"canary": 1}),
                            now=clock.now_ms(), actor="test", rollout_id="r1")
    [canary] = _step(repo, signer, clock).assigned
    assert rollouts.pause(repo, "r1", now=clock.now_ms()).state == "paused"
    _succeed(repo, canary, release.id, clock.now_ms())
    assert rollouts.step_rollout(repo, "r1", signer=signer, now=clock.now_ms()) is None
    assert _assignment_counts(repo, ids) == {i: 1 if i == canary else 0 for i in ids}
    with pytest.raises(RolloutError, match="is paused"):
        rollouts.pause(repo, "r1", now=clock.now_ms())
    assert rollouts.view(repo, "r1", now=clock.now_ms()).waiting == "paused"
    assert rollouts.resume(repo, "r1", now=clock.now_ms()).state == "running"
    step = _step(repo, signer, clock)
    assert step.phase == 1 and len(step.assigned) == 2
    assert _members(repo)[canary] == "succeeded"


def test_cancel_stops_new_assignments(repo: Repository, signer: ResultSigner, release: ReleaseRecord,
                                      clock: ManualClock) -> None:
    ids = _devices(repo, ["d0", "d1", "d2"], clock.now_ms())
    rollouts.create_rollout(repo, target=TARGET, group=GROUP, plan=parse_plan({"canary": 1}),
                            now=clock.now_ms(), actor="test", rollout_id="r1")
    [canary] = _step(repo, signer, clock).assigned
    rec = rollouts.cancel(repo, "r1", now=clock.now_ms(), actor="cli:alice")
    assert (rec.state, rec.reason) == ("cancelled", "cancelled by cli:alice")
    _succeed(repo, canary, release.id, clock.now_ms())
    assert rollouts.step_rollout(repo, "r1", signer=signer, now=clock.now_ms()) is None
    assert sum(_assignment_counts(repo, ids).values()) == 1
    assert not repo.models.alerts(kind="rollout_aborted")  # a cancel raises no alert
    with pytest.raises(RolloutError, match="is cancelled"):
        rollouts.resume(repo, "r1", now=clock.now_ms())
    # Its devices are free for a new rollout.
    rollouts.create_rollout(repo, target=TARGET, group=GROUP, plan=parse_plan({}), now=clock.now_ms(),
                            actor="test", rollout_id="r2")


def test_a_restart_mid_rollout_resumes_without_assigning_anyone_twice(
        repo: Repository, signer: ResultSigner, release: ReleaseRecord, clock: ManualClock) -> None:
    ids = _devices(repo, ["d0", "d1", "d2", "d3"], clock.now_ms())
    plan = parse_plan({"canary": 0, "phases": [100], "max_rate": 2})
    rollouts.create_rollout(repo, target=TARGET, group=GROUP, plan=plan, now=clock.now_ms(), actor="test",
                            rollout_id="r1")
    first = _step(repo, signer, clock).assigned
    assert len(first) == 2
    # "Restart": a new engine and repository on the same database, the same minute.
    engine = create_engine(repo.engine.url.render_as_string(hide_password=False))
    try:
        again = Repository(engine)
        assert _step(again, signer, clock).assigned == ()
        clock.advance(61_000)
        second = _step(again, signer, clock)
        assert len(second.assigned) == 2 and not set(second.assigned) & set(first)
        assert _assignment_counts(again, ids) == dict.fromkeys(ids, 1)
    finally:
        engine.dispose()


def test_two_workers_stepping_at_once_do_not_double_assign(
        repo: Repository, signer: ResultSigner, release: ReleaseRecord, clock: ManualClock) -> None:
    ids = _devices(repo, [f"d{i}" for i in range(8)], clock.now_ms())
    rollouts.create_rollout(repo, target=TARGET, group=GROUP, plan=parse_plan({"canary": 0}),
                            now=clock.now_ms(), actor="test", rollout_id="r1")
    url = repo.engine.url.render_as_string(hide_password=False)
    engines = [create_engine(url) for _ in range(2)]
    if repo.engine.dialect.name == "postgresql":
        # While one worker holds the rollout's row, another's step skips the rollout.
        with repo.write() as tx:
            assert tx.rollouts.rollout("r1", lock=True) is not None
            other = Repository(engines[0])
            assert rollouts.step_rollout(other, "r1", signer=signer, now=clock.now_ms()) is None
    barrier = threading.Barrier(2)
    assigned: list[list[str]] = [[], []]
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            workers_repo = Repository(engines[n])
            barrier.wait()
            for _ in range(5):
                result = rollouts.step_rollout(workers_repo, "r1", signer=signer, now=clock.now_ms())
                if result is not None:
                    assigned[n].extend(result.assigned)
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(2)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for e in engines:
            e.dispose()
    assert not errors, errors
    assert sorted(assigned[0] + assigned[1]) == sorted(ids)
    assert _assignment_counts(repo, ids) == dict.fromkeys(ids, 1)
    assert set(_members(repo).values()) == {"assigned"}
    assert sum(1 for r in repo.outbox() if r.topic.endswith("/down/update")) == len(ids)


def test_a_device_that_times_out_is_retried(repo: Repository, signer: ResultSigner, release: ReleaseRecord,
                                            clock: ManualClock) -> None:
    _devices(repo, ["d0", "d1"], clock.now_ms())
    plan = parse_plan({"canary": 1, "device_timeout_s": 60, "retries": 1})
    rollouts.create_rollout(repo, target=TARGET, group=GROUP, plan=plan, now=clock.now_ms(), actor="test",
                            rollout_id="r1")
    [canary] = _step(repo, signer, clock).assigned
    clock.advance(59_000)
    assert _step(repo, signer, clock).assigned == ()
    clock.advance(1_000)  # the device was offline: it timed out, and is assigned again
    assert _step(repo, signer, clock).assigned == (canary,)
    newest, first = repo.releases.assignments(device_id=canary)
    assert first.state == "failed" and "timed_out" in first.reason and newest.state == "assigned"
    [m] = [m for m in repo.rollouts.members("r1") if m.device_id == canary]
    assert (m.state, m.attempts) == ("assigned", 2)
    _succeed(repo, canary, release.id, clock.now_ms())
    step = _step(repo, signer, clock)
    assert step.phase == 1 and len(step.assigned) == 1
    [late] = step.assigned
    clock.advance(60_000)
    assert _step(repo, signer, clock).assigned == (late,)  # its retry
    # Without retries left the next timeout is final (and, here, over the abort threshold).
    clock.advance(60_000)
    step = _step(repo, signer, clock)
    assert step.state == "aborted" and "timed_out" in step.reason


def test_a_device_enrolling_during_the_rollout_joins_it(
        repo: Repository, signer: ResultSigner, release: ReleaseRecord, clock: ManualClock) -> None:
    _devices(repo, ["d0", "d1"], clock.now_ms())
    _devices(repo, ["other"], clock.now_ms(), device_class="edge-gateway")
    rollouts.create_rollout(repo, target=TARGET, group=GROUP, plan=parse_plan({"canary": 1}),
                            now=clock.now_ms(), actor="test", rollout_id="r1")
    _step(repo, signer, clock)
    _devices(repo, ["late"], clock.now_ms())
    step = _step(repo, signer, clock)
    assert step.joined == ("late",)
    [m] = [m for m in repo.rollouts.members("r1") if m.device_id == "late"]
    assert m.phase == 1 and m.state == "pending"
    assert "other" not in _members(repo)


def test_abort_sends_updated_devices_back_to_their_previous_release(
        repo: Repository, signer: ResultSigner, release: ReleaseRecord, tmp_path: Path,
        clock: ManualClock) -> None:
    old = add_release(repo, MemoryTargetStore(), write_bundle_dir(tmp_path / "old", profile="golden",
                                                                  version="1.2.0"),
                      device_class="edge-camera", version="1.2.0", now=clock.now_ms(), actor="test")
    ids = _devices(repo, ["d0", "d1", "d2"], clock.now_ms())
    with repo.write() as tx:
        for i in ids:
            tx.releases.set_attested_release(i, old.id, clock.now_ms())
    plan = parse_plan({"canary": 1, "rollback_on_abort": True})
    rollouts.create_rollout(repo, target=TARGET, group=GROUP, plan=plan, now=clock.now_ms(), actor="test",
                            rollout_id="r1")
    [canary] = _step(repo, signer, clock).assigned
    _succeed(repo, canary, release.id, clock.now_ms())
    phase1 = _step(repo, signer, clock).assigned
    clock.advance(1_000)
    rec = rollouts.abort(repo, "r1", signer=signer, now=clock.now_ms(), actor="cli:bob")
    assert (rec.state, rec.reason) == ("aborted", "aborted by cli:bob")
    newest = repo.releases.assignments(device_id=canary, limit=1)[0]
    assert newest.target == old.target and newest.state == "assigned"
    [m] = [m for m in repo.rollouts.members("r1") if m.device_id == canary]
    assert m.reason == f"sent back to {old.target} (assignment {newest.id})"
    # Devices still installing are left alone (no new assignments).
    assert _assignment_counts(repo, list(phase1)) == dict.fromkeys(phase1, 1)
    assert len(repo.models.alerts(kind="rollout_aborted")) == 1


def test_groups_approval_and_dry_run(repo: Repository, signer: ResultSigner, release: ReleaseRecord,
                                     clock: ManualClock) -> None:
    _devices(repo, ["d0", "d1", "d2", "d3"], clock.now_ms())
    _devices(repo, ["d9"], clock.now_ms(), firmware="1.1.0")
    rollouts.tag_device(repo, "d1", ["lab"])
    rollouts.tag_device(repo, "d2", ["lab", "north"])
    tagged = rollouts.dry_run(repo, target=TARGET, group=Group("edge-camera", tags=("lab",)),
                              plan=parse_plan({"canary": 0}), rollout_id="x").phases
    assert [sorted(p) for p in tagged] == [[], ["d1", "d2"]]
    assert rollouts.dry_run(repo, target=TARGET, group=Group("edge-camera", tags=("lab", "north")),
                            plan=parse_plan({"canary": 0}), rollout_id="x").phases == [[], ["d2"]]
    assert rollouts.dry_run(repo, target=TARGET, group=Group("edge-camera", firmware="1.1.0"),
                            plan=parse_plan({"canary": 0}), rollout_id="x").phases == [[], ["d9"]]
    plan = parse_plan({"canary": 1, "phases": [50, 100], "approval": True})
    planned = rollouts.dry_run(repo, target=TARGET, group=Group("edge-camera", firmware="1.2.0"), plan=plan,
                               rollout_id="r1")
    rollouts.create_rollout(repo, target=TARGET, group=Group("edge-camera", firmware="1.2.0"), plan=plan,
                            now=clock.now_ms(), actor="test", rollout_id="r1")
    stored = [[m.device_id for m in repo.rollouts.members("r1") if m.phase == p] for p in range(3)]
    assert [sorted(p) for p in planned.phases] == [sorted(p) for p in stored]  # the dry run is the split
    [canary] = _step(repo, signer, clock).assigned
    assert [canary] == planned.phases[0]
    _succeed(repo, canary, release.id, clock.now_ms())
    step = _step(repo, signer, clock)
    assert (step.phase, step.assigned, step.waiting) == (1, (), "phase 1 waits for its approval")
    assert rollouts.approve(repo, "r1", now=clock.now_ms(), actor="test") == 1
    assert _step(repo, signer, clock).assigned == tuple(planned.phases[1])
    with pytest.raises(RolloutError, match="not an admitted device"):
        rollouts.create_rollout(repo, target=TARGET, group=Group("edge-camera", devices=("nope",)),
                                plan=plan, now=clock.now_ms(), actor="test")
    with pytest.raises(RolloutError, match="in rollout r1 still"):
        rollouts.create_rollout(repo, target=TARGET, group=GROUP, plan=plan, now=clock.now_ms(), actor="test")


def test_a_withdrawn_release_aborts_its_rollout(
        repo: Repository, signer: ResultSigner, release: ReleaseRecord, clock: ManualClock) -> None:
    _devices(repo, ["d0", "d1"], clock.now_ms())
    rollouts.create_rollout(repo, target=TARGET, group=GROUP, plan=parse_plan({"canary": 1}),
                            now=clock.now_ms(), actor="test", rollout_id="r1")
    _step(repo, signer, clock)
    withdraw_release(repo, MemoryTargetStore(), TARGET, now=clock.now_ms())
    step = _step(repo, signer, clock)
    assert (step.state, step.reason, step.assigned) == ("aborted", f"release {TARGET} was withdrawn", ())
    assert len(repo.models.alerts(kind="rollout_aborted")) == 1
