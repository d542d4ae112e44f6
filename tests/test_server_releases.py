"""Releases on the evidence path: a release's reference values are accepted for a device only once it
is assigned the release, until the deadline unless committed; after the commit the previous values
stay acceptable for the grace, then retire. Real swtpm devices (firmware_sim boots ``golden`` = 1.2.0
and ``updated-firmware`` = 1.3.0), the Processor, SQLite and PostgreSQL.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet_server.keys import ResultSigner
from fleet_server.service import admin
from fleet_server.service.common import ManualClock
from fleet_server.service.processor import Processor
from fleet_server.service.releases import Assigned, ReleaseError, add_release, assign_release
from fleet_server.storage.release_repo import ReleaseRecord
from fleet_server.storage.repo import Repository
from protocol import topics
from protocol.messages import UpdateAssignment, UpdateStatus, decode_signed, encode_plain

pytest.register_assert_rewrite("server_fixtures", "release_fixtures")
from release_fixtures import MemoryTargetStore, write_bundle_dir  # noqa: E402
from server_fixtures import BOTH_DATABASES, DeviceFactory, SimDevice, attest_once, enroll  # noqa: E402

pytest_plugins = ("mqtt_fixtures", "server_fixtures", "pg_fixtures")
pytestmark = [pytest.mark.swtpm, BOTH_DATABASES]

TARGET = "firmware/edge-camera/1.3.0.fwb"
DEADLINE_S = 600.0
GRACE_S = 300.0


@pytest.fixture
def release(repo: Repository, tmp_path: Path, clock: ManualClock) -> ReleaseRecord:
    bundle = write_bundle_dir(tmp_path / "bundle")
    return add_release(repo, MemoryTargetStore(), bundle, device_class="edge-camera", version="1.3.0",
                       now=clock.now_ms(), actor="test")


@pytest.fixture
def device(processor: Processor, repo: Repository, signer: ResultSigner, make_device: DeviceFactory,
           golden_policy: admin.StoredPolicy, clock: ManualClock) -> SimDevice:
    dev = make_device("cam-1")
    admin.preregister_ek(repo, dev.tpm.ek_certificate(), now=clock.now_ms())
    assert enroll(processor, signer, dev).status == "admitted"
    assert attest_once(processor, signer, dev).verdict == "trusted"
    return dev


def _attest(processor: Processor, signer: ResultSigner, dev: SimDevice, clock: ManualClock) -> object:
    clock.advance(2_000)  # past the challenge rate limit
    return attest_once(processor, signer, dev)


def _assign(repo: Repository, signer: ResultSigner, clock: ManualClock, device_id: str = "cam-1") -> Assigned:
    [assigned] = assign_release(repo, TARGET, [device_id], signer=signer, now=clock.now_ms(),
                                deadline_s=DEADLINE_S, grace_s=GRACE_S, actor="test")
    return assigned


def _status(processor: Processor, dev: SimDevice, assignment_id: str, state: str, reason: str = "",
            target: str = TARGET) -> None:
    message = UpdateStatus(assignment_id=assignment_id, target=target, state=state, from_version="1.2.0",
                           to_version="1.3.0", reason=reason)
    processor.handle_batch([dev.up("update-status", encode_plain(message, ts=dev.clock.now_ms()))])


def _firmware(repo: Repository, device_id: str = "cam-1") -> str:
    record = repo.device(device_id)
    assert record is not None
    return record.firmware_version


def test_release_values_are_not_accepted_for_a_device_never_assigned(
        processor: Processor, repo: Repository, signer: ResultSigner, device: SimDevice,
        release: ReleaseRecord, clock: ManualClock) -> None:
    device.power_cycle("updated-firmware")
    result = _attest(processor, signer, device, clock)
    assert result.verdict == "untrusted" and result.release == ""
    assert _firmware(repo) == "1.2.0"
    assert repo.releases.attested_release("cam-1") is None


def test_assigned_release_attests_until_commit_then_previous_values_retire_after_grace(
        processor: Processor, repo: Repository, signer: ResultSigner, device: SimDevice,
        release: ReleaseRecord, clock: ManualClock) -> None:
    assigned = _assign(repo, signer, clock)
    # The signed UpdateAssignment waits in the outbox for .../down/update.
    [row] = [r for r in repo.outbox() if r.topic == topics.device_down("cam-1", "update")]
    message = decode_signed(row.payload, keys={signer.kid: signer.public_key}, aud="cam-1").message
    assert isinstance(message, UpdateAssignment)
    assert (message.assignment_id, message.target, message.version, message.kind) == (
        assigned.assignment_id, TARGET, "1.3.0", "firmware")
    assert message.deadline == assigned.deadline

    # Before installing, the old values still attest (and the device stays on 1.2.0).
    result = _attest(processor, signer, device, clock)
    assert result.verdict == "trusted" and result.release == ""
    for state in ("downloading", "installed", "rebooting"):
        _status(processor, device, assigned.assignment_id, state)
    device.power_cycle("updated-firmware")
    result = _attest(processor, signer, device, clock)
    assert result.verdict == "trusted", result.reasons
    assert result.release == TARGET
    assert _firmware(repo) == "1.3.0"
    attested = repo.releases.attested_release("cam-1")
    assert attested is not None and attested.target == TARGET

    _status(processor, device, assigned.assignment_id, "committed")
    [assignment] = repo.releases.assignments(device_id="cam-1")
    assert assignment.state == "committed" and assignment.committed_at == clock.now_ms()
    assert assignment.grace_until == clock.now_ms() + GRACE_S * 1000

    # A rollback to the old slot within the grace still attests, on the old firmware.
    device.power_cycle("golden")
    result = _attest(processor, signer, device, clock)
    assert result.verdict == "trusted" and result.release == ""
    assert _firmware(repo) == "1.2.0" and repo.releases.attested_release("cam-1") is None
    # After the grace the previous values are retired; the committed release still attests.
    clock.advance(round(GRACE_S * 1000))
    result = _attest(processor, signer, device, clock)
    assert result.verdict == "untrusted"
    device.power_cycle("updated-firmware")
    result = _attest(processor, signer, device, clock)
    assert result.verdict == "trusted" and result.release == TARGET and _firmware(repo) == "1.3.0"


def test_release_values_are_refused_after_the_deadline_without_commit(
        processor: Processor, repo: Repository, signer: ResultSigner, device: SimDevice,
        release: ReleaseRecord, clock: ManualClock) -> None:
    _assign(repo, signer, clock)
    clock.advance(round(DEADLINE_S * 1000))
    device.power_cycle("updated-firmware")
    result = _attest(processor, signer, device, clock)
    assert result.verdict == "untrusted" and result.release == ""
    assert _firmware(repo) == "1.2.0"
    device.power_cycle("golden")  # the old slot still attests
    assert _attest(processor, signer, device, clock).verdict == "trusted"


def test_a_tampered_boot_of_the_release_names_the_failing_event(
        processor: Processor, repo: Repository, signer: ResultSigner, device: SimDevice,
        release: ReleaseRecord, clock: ManualClock) -> None:
    _assign(repo, signer, clock)
    device.power_cycle("tampered-kernel")
    result = _attest(processor, signer, device, clock)
    assert result.verdict == "untrusted" and result.release == ""
    assert any("differs from reference" in r for r in result.reasons), result.reasons


def test_update_status_is_strict(
        processor: Processor, repo: Repository, signer: ResultSigner, device: SimDevice,
        make_device: DeviceFactory, release: ReleaseRecord, clock: ManualClock) -> None:
    assigned = _assign(repo, signer, clock)
    _status(processor, device, "0" * 32, "downloading")  # unknown assignment id
    assert processor.counters.get("rejected.assignment_unknown") == 1
    other = make_device("cam-2")
    _status(processor, other, assigned.assignment_id, "downloading")  # another device's assignment
    assert processor.counters.get("rejected.assignment_unknown") == 2
    _status(processor, device, assigned.assignment_id, "downloading", target="firmware/edge-camera/9.9.9.fwb")
    _status(processor, device, assigned.assignment_id, "committed")  # no trusted evidence on the release
    assert processor.counters.get("rejected.update_status_refused") == 2
    _status(processor, device, assigned.assignment_id, "installed")
    _status(processor, device, assigned.assignment_id, "downloading")  # a step back
    _status(processor, device, assigned.assignment_id, "rolled_back")  # without a reason
    assert processor.counters.get("rejected.update_status_refused") == 4
    [assignment] = repo.releases.assignments(device_id="cam-1")
    assert assignment.state == "installed"
    _status(processor, device, assigned.assignment_id, "rolled_back", reason="health check failed")
    [assignment] = repo.releases.assignments(device_id="cam-1")
    assert (assignment.state, assignment.reason) == ("rolled_back", "health check failed")
    _status(processor, device, assigned.assignment_id, "installed")  # out of a final state
    assert processor.counters.get("rejected.update_status_refused") == 5
    # Rolled back: the release's values are no longer accepted.
    device.power_cycle("updated-firmware")
    assert _attest(processor, signer, device, clock).verdict == "untrusted"


def test_assign_refuses_unknown_release_other_class_and_twice(
        repo: Repository, signer: ResultSigner, device: SimDevice, release: ReleaseRecord,
        clock: ManualClock) -> None:
    with pytest.raises(ReleaseError, match="no release"):
        assign_release(repo, "firmware/edge-camera/9.9.9.fwb", ["cam-1"], signer=signer, now=clock.now_ms(),
                       actor="test")
    with pytest.raises(ReleaseError, match="no device"):
        assign_release(repo, TARGET, ["cam-404"], signer=signer, now=clock.now_ms(), actor="test")
    first = _assign(repo, signer, clock)
    with pytest.raises(ReleaseError, match="still installing"):
        _assign(repo, signer, clock)
    # Past its deadline without a report, the assignment is over: a new one replaces it.
    clock.advance(round(DEADLINE_S * 1000))
    second = _assign(repo, signer, clock)
    newest, old = repo.releases.assignments(device_id="cam-1")
    assert (newest.id, old.id) == (second.assignment_id, first.assignment_id)
    assert (old.state, old.reason) == ("failed", "deadline passed without a commit")
