"""The agent's firmware install state machine (agent.update.installer) on a temporary boot folder.

The update channel is an in-memory :class:`~agent.update.installer.TargetSource` (the project's own
interface; the TUF client implements it on a device), reboots are the real bootloader decision
(:func:`agent.update.bootctl.choose_boot_slot`) followed by a new installer, as after a power cycle,
and the anti-rollback floor is in a real swtpm's NV.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent.config import DEFAULT_FLOOR_INDEX, HEALTH_CHECKS, parse_config
from agent.tpm.adapter import TpmAdapter
from agent.update import bootctl
from agent.update import installer as installer_mod
from agent.update.floor import TpmVersionFloor
from agent.update.installer import StatusOutbox, slot_version
from agent.update.reboot import CommandRebooter
from protocol.errors import ConfigError, EdgeError, ProcessError, TpmError, VerificationError
from protocol.firmware_bundle import pack
from protocol.messages import UpdateAssignment, new_message_id

pytest.register_assert_rewrite("update_fixtures")
from update_fixtures import BootDevice  # noqa: E402

pytest_plugins = ("update_fixtures",)  # the tpm fixture

CLASS = "camera"
RUNNING = "1.2.0"
NOW = 1_800_000_000.0
DEADLINE_MS = int(NOW * 1000) + 3_600_000
IMAGES = {"firmware.bin": b"FW" * 100, "kernel.bin": b"KERNEL" * 50, "rootfs.img": b"R" * 4096}


@dataclass(frozen=True)
class Target:
    data: bytes
    custom: Mapping[str, Any]


@dataclass
class MemorySource:
    """An in-memory TargetSource: path -> verified target."""

    targets: dict[str, Target] = field(default_factory=dict)
    fetched: list[tuple[str, int]] = field(default_factory=list)

    def fetch_target(self, target_path: str, *, max_length: int) -> Target:
        self.fetched.append((target_path, max_length))
        target = self.targets.get(target_path)
        if target is None:
            raise VerificationError(f"target {target_path} is not in the repository")
        if len(target.data) > max_length:
            raise VerificationError(f"target {target_path} is longer than {max_length} bytes")
        return target


def target_path(version: str, cls: str = CLASS) -> str:
    return f"firmware/{cls}/{version}.fwb"


def publish(source: MemorySource, version: str, *, cls: str = CLASS, custom_version: str | None = None,
            manifest_class: str | None = None) -> str:
    path = target_path(version, cls)
    manifest = {"device_class": manifest_class or cls, "version": version}
    files = {name: content + version.encode() for name, content in IMAGES.items()}
    source.targets[path] = Target(data=pack(manifest, files),
                                  custom={"device_class": cls, "version": custom_version or version,
                                          "kind": "firmware"})
    return path


def assignment(version: str, *, path: str | None = None, deadline: int = DEADLINE_MS,
               kind: str = "firmware") -> UpdateAssignment:
    return UpdateAssignment(assignment_id=new_message_id(), kind=kind, target=path or target_path(version),
                            version=version, deadline=deadline)


class Device(BootDevice):
    """A boot device whose update channel is an in-memory :class:`MemorySource`."""

    source: MemorySource

    def __init__(self, root: Path, tpm: TpmAdapter, *, checks: list[tuple[str, Any]] | None = None) -> None:
        super().__init__(root, tpm, MemorySource(), device_class=CLASS, running=RUNNING, now=NOW,
                         checks=checks)


@pytest.fixture
def device(tmp_path: Path, tpm: TpmAdapter) -> Device:
    return Device(tmp_path / "dev", tpm)


def install_and_boot_trial(dev: Device, version: str = "1.3.0") -> tuple[UpdateAssignment, str]:
    path = publish(dev.source, version)
    a = assignment(version, path=path)
    dev.installer.on_assignment(a)
    assert dev.states() == ["downloading", "installed", "rebooting"]
    assert len(dev.rebooter.reasons) == 1
    ctl = dev.power_cycle()
    assert ctl.in_trial and ctl.booted == "b"
    assert dev.installer.record is not None and dev.installer.record.phase == "trial"
    return a, path


# -- the happy path --------------------------------------------------------------------------------
@pytest.mark.swtpm
def test_assignment_installs_into_the_inactive_slot_and_commits_on_a_trusted_verdict(device: Device) -> None:
    slot_a = device.slot_files("a")
    a, path = install_and_boot_trial(device)
    assert device.source.fetched == [(path, 1 << 20)]
    files = device.slot_files("b")
    assert files["kernel.bin"] == IMAGES["kernel.bin"] + b"1.3.0"
    assert slot_version(device.boot, "b") == "1.3.0"
    assert device.slot_files("a") == slot_a
    assert device.installer.running_version() == "1.3.0"
    # a verdict for evidence of the previous boot does not commit
    device.trusted(path, this_boot=False)
    assert bootctl.read(device.boot).in_trial
    device.trusted(path)
    ctl = bootctl.read(device.boot)
    assert ctl.active == "b" and ctl.trial is None and not ctl.in_trial
    assert device.states() == ["downloading", "installed", "rebooting", "committed"]
    last = device.last()
    assert (last.assignment_id, last.from_version, last.to_version) == (a.assignment_id, RUNNING, "1.3.0")
    assert TpmVersionFloor(lambda: device.tpm).minimum() == (1, 3, 0)
    assert device.installer.record is None
    # after the next power cycle the committed slot boots and nothing more is reported
    assert device.power_cycle().booted == "b"
    assert device.states()[-1] == "committed" and len(device.states()) == 4
    # the same assignment delivered again is not installed again
    device.installer.on_assignment(a)
    assert len(device.states()) == 4


@pytest.mark.swtpm
def test_statuses_stay_in_the_outbox_until_removed(device: Device) -> None:
    install_and_boot_trial(device)
    outbox = StatusOutbox(device.state / "outbox.json")  # as read back after the reboot
    pending = outbox.pending()
    assert [s.state for s in outbox.statuses()] == ["downloading", "installed", "rebooting"]
    outbox.remove(pending[0][0])
    again = StatusOutbox(device.state / "outbox.json")
    assert [s.state for s in again.statuses()] == ["installed", "rebooting"]


# -- verdicts and deadlines that roll back ------------------------------------------------------------
@pytest.mark.swtpm
def test_untrusted_verdict_abandons_the_trial_and_reports_rolled_back_after_reboot(device: Device) -> None:
    a, _ = install_and_boot_trial(device)
    device.installer.on_verdict(verdict="untrusted", release="", reasons=("PCR 4: event 7 (kernel) differs",),
                                this_boot=True)
    assert len(device.rebooter.reasons) == 2
    assert bootctl.read(device.boot).trial is None
    ctl = device.power_cycle()
    assert ctl.booted == "a" and ctl.active == "a"
    last = device.last()
    assert last.state == "rolled_back" and last.assignment_id == a.assignment_id
    assert last.reason == "attestation verdict untrusted: PCR 4: event 7 (kernel) differs"
    assert device.installer.running_version() == RUNNING
    assert TpmVersionFloor(lambda: device.tpm).minimum() is None
    assert device.installer.record is None


@pytest.mark.swtpm
def test_trusted_verdict_for_another_release_does_not_commit(device: Device) -> None:
    install_and_boot_trial(device)
    device.trusted(target_path(RUNNING))
    device.power_cycle()
    assert device.last().state == "rolled_back"
    assert "not the trial's" in device.last().reason
    assert bootctl.read(device.boot).active == "a"


@pytest.mark.swtpm
def test_failing_health_check_rolls_back(tmp_path: Path, tpm: TpmAdapter) -> None:
    def broken() -> None:
        raise EdgeError("the configuration does not load")

    dev = Device(tmp_path / "dev", tpm, checks=[("config", broken)])
    _, path = install_and_boot_trial(dev)
    dev.trusted(path)
    dev.power_cycle()
    assert dev.last().state == "rolled_back"
    assert dev.last().reason == "health check config failed: the configuration does not load"


@pytest.mark.swtpm
def test_deadline_passing_in_the_trial_rolls_back(device: Device) -> None:
    install_and_boot_trial(device)
    device.installer.tick()
    assert bootctl.read(device.boot).in_trial  # not yet
    device.now = DEADLINE_MS / 1000 + 1
    device.installer.tick()
    assert len(device.rebooter.reasons) == 2
    device.power_cycle()
    assert device.last().state == "rolled_back" and "deadline passed" in device.last().reason
    assert bootctl.read(device.boot).active == "a"


@pytest.mark.swtpm
def test_bootloader_counter_exhausted_is_reported_as_rolled_back(device: Device) -> None:
    install_and_boot_trial(device)
    ctl = device.power_cycle()  # the trial boot died before a verdict: its one try is spent
    assert ctl.booted == "a" and ctl.trial is None
    last = device.last()
    assert last.state == "rolled_back" and "boot counter exhausted" in last.reason
    assert device.installer.record is None


# -- refusals: nothing written ---------------------------------------------------------------------
@pytest.mark.swtpm
@pytest.mark.parametrize(("case", "reason"), [
    ("wrong class", "is for hardware class 'doorbell', this device is 'camera'"),
    ("manifest class", "manifest does not match its signed metadata"),
    ("custom version", "is version '1.4.0', the assignment says 1.3.0"),
    ("too large", "longer than"),
    ("model kind", "installs firmware only"),
    ("deadline passed", "deadline has passed"),
])
def test_assignment_that_does_not_fit_fails_with_nothing_written(device: Device, case: str,
                                                                 reason: str) -> None:
    before = device.slot_files("a")
    if case == "wrong class":
        a = assignment("1.3.0", path=publish(device.source, "1.3.0", cls="doorbell"))
    elif case == "manifest class":
        a = assignment("1.3.0", path=publish(device.source, "1.3.0", manifest_class="doorbell"))
    elif case == "custom version":
        a = assignment("1.3.0", path=publish(device.source, "1.3.0", custom_version="1.4.0"))
    elif case == "too large":
        path = target_path("1.3.0")
        custom = {"device_class": CLASS, "version": "1.3.0", "kind": "firmware"}
        device.source.targets[path] = Target(data=b"x" * ((1 << 20) + 1), custom=custom)
        a = assignment("1.3.0", path=path)
    elif case == "model kind":
        a = assignment("1.3.0", path=publish(device.source, "1.3.0"), kind="model")
    else:
        a = assignment("1.3.0", path=publish(device.source, "1.3.0"), deadline=int(NOW * 1000) - 1)
    device.installer.on_assignment(a)
    last = device.last()
    assert last.state == "failed" and reason in last.reason, last.reason
    device.assert_untouched(before)


@pytest.mark.swtpm
@pytest.mark.parametrize("version", [RUNNING, "1.1.9", "0.9.0"])
def test_older_or_equal_version_fails_before_download(device: Device, version: str) -> None:
    before = device.slot_files("a")
    device.installer.on_assignment(assignment(version, path=publish(device.source, version)))
    assert device.states() == ["failed"]
    assert f"version {version} is not newer than the running {RUNNING}" == device.last().reason
    assert device.source.fetched == []
    device.assert_untouched(before)


@pytest.mark.swtpm
def test_nv_floor_refuses_a_rollback_after_state_files_are_restored_from_a_backup(device: Device,
                                                                                  tmp_path: Path) -> None:
    backup = tmp_path / "backup"
    shutil.copytree(device.root, backup)  # boot folder and agent state before the update
    _, path = install_and_boot_trial(device, "1.3.0")
    device.trusted(path)
    assert device.states()[-1] == "committed"
    # the attacker puts the old files back: slot a (1.2.0) active, no record of the update
    shutil.rmtree(device.root)
    shutil.copytree(backup, device.root)
    device.power_cycle()
    device.rebooter.reasons.clear()
    assert device.installer.running_version() == RUNNING
    before = device.slot_files("a")
    old = publish(device.source, "1.2.5")  # newer than the restored slot, older than the committed release
    device.installer.on_assignment(assignment("1.2.5", path=old))
    last = device.last()
    assert last.state == "failed" and "below the anti-rollback floor 1.3.0 kept in TPM NV" in last.reason
    device.assert_untouched(before)
    # the committed release itself and anything newer still install
    device.installer.on_assignment(assignment("1.3.0", path=path))
    assert device.states()[-3:] == ["downloading", "installed", "rebooting"]


@pytest.mark.swtpm
def test_floor_only_rises(tpm: TpmAdapter) -> None:
    floor = TpmVersionFloor(lambda: tpm, DEFAULT_FLOOR_INDEX)
    assert floor.minimum() is None
    floor.raise_to((1, 3, 0))
    floor.raise_to((1, 2, 9))
    assert floor.minimum() == (1, 3, 0)
    floor.raise_to((2, 0, 0))
    assert TpmVersionFloor(lambda: tpm).minimum() == (2, 0, 0)


# -- power loss while writing the slot -------------------------------------------------------------
class PowerCut(Exception):
    """The device lost power (raised in the middle of writing the slot)."""


@pytest.mark.swtpm
def test_power_cut_during_the_slot_write_leaves_the_active_slot_and_the_retry_installs(
        device: Device, monkeypatch: pytest.MonkeyPatch) -> None:
    before = device.slot_files("a")
    ctl_before = (device.boot / bootctl.CONTROL_FILE).read_bytes()
    real_write = installer_mod._write_file
    calls: list[Path] = []

    def cut_after_first(path: Path, data: bytes) -> None:
        calls.append(path)
        if len(calls) == 2:
            path.write_bytes(data[: len(data) // 2])  # a torn file, then the power goes
            raise PowerCut()
        real_write(path, data)

    monkeypatch.setattr(installer_mod, "_write_file", cut_after_first)
    path = publish(device.source, "1.3.0")
    with pytest.raises(PowerCut):
        device.installer.on_assignment(assignment("1.3.0", path=path))
    monkeypatch.setattr(installer_mod, "_write_file", real_write)
    assert device.slot_files("a") == before
    assert (device.boot / bootctl.CONTROL_FILE).read_bytes() == ctl_before
    assert not bootctl.slot_dir(device.boot, "b").exists()
    assert device.states() == ["downloading"]
    # power comes back: the bootloader boots slot a, the agent removes the torn folder and retries
    ctl = device.power_cycle()
    assert ctl.booted == "a" and ctl.trial is None
    assert device.states() == ["downloading", "downloading", "installed", "rebooting"]
    assert not any(p.name.endswith(".incoming") for p in device.boot.iterdir())
    assert device.power_cycle().in_trial
    device.trusted(path)
    assert device.states()[-1] == "committed"
    assert device.slot_files("b")["rootfs.img"] == IMAGES["rootfs.img"] + b"1.3.0"


# -- configuration ---------------------------------------------------------------------------------
BASE = {"device_id": "cam-1", "device_class": CLASS, "firmware_version": RUNNING, "state_dir": "state",
        "mqtt": {"host": "localhost", "ca_cert": "ca.pem", "claim_cert": "c.pem", "claim_key": "c.key"},
        "server": {"signing_public_key": "s.pem"}}


def test_update_config_is_parsed_strictly(tmp_path: Path) -> None:
    cfg = parse_config({**BASE, "update": {"boot_dir": "boot", "max_target_size": 4096, "boot_tries": 2,
                                           "health_checks": ["tpm"]}}, base=tmp_path)
    assert cfg.update is not None
    u = cfg.update
    assert (u.boot_dir, u.max_target_size, u.boot_tries) == (tmp_path / "boot", 4096, 2)
    assert cfg.update.health_checks == ("tpm",) and cfg.update.floor_nv_index == DEFAULT_FLOOR_INDEX
    default = parse_config({**BASE, "update": {"boot_dir": "/boot/edge"}}, base=tmp_path).update
    assert default is not None and default.health_checks == HEALTH_CHECKS
    assert parse_config(BASE, base=tmp_path).update is None
    for bad, message in [({}, "update: needs boot_dir"),
                         ({"boot_dir": "b", "health_checks": ["disk"]},
                          "update.health_checks: 'disk' is not"),
                         ({"boot_dir": "b", "max_target_size": 10}, "update.max_target_size: 10 is outside"),
                         ({"boot_dir": "b", "floor_nv_index": 1}, "update.floor_nv_index: 1 is outside"),
                         ({"boot_dir": "b", "reboot": True}, "update.reboot: unknown key")]:
        with pytest.raises(ConfigError, match=message):
            parse_config({**BASE, "update": bad}, base=tmp_path)


def test_reboot_command_defaults_to_systemctl_reboot_and_is_checked(tmp_path: Path) -> None:
    default = parse_config({**BASE, "update": {"boot_dir": "b"}}, base=tmp_path).update
    assert default is not None and default.reboot_command == ("systemctl", "reboot")
    custom = parse_config({**BASE, "update": {"boot_dir": "b", "reboot_command": ["/sbin/reboot", "-f"]}},
                          base=tmp_path).update
    assert custom is not None and custom.reboot_command == ("/sbin/reboot", "-f")
    for bad in ([], "systemctl reboot", ["systemctl", ""], ["systemctl", 1]):
        with pytest.raises(ConfigError, match=r"update\.reboot_command: expected a list of 1\.\.32"):
            parse_config({**BASE, "update": {"boot_dir": "b", "reboot_command": bad}}, base=tmp_path)


def test_command_rebooter_runs_the_command_without_waiting_and_reports_a_missing_one(tmp_path: Path) -> None:
    marker = tmp_path / "rebooted"
    rebooter = CommandRebooter([sys.executable, "-c", f"open({str(marker)!r}, 'w').write('x')"])
    rebooter.reboot("update 1.3.0: boot the trial slot")
    assert rebooter.process is not None and rebooter.process.wait(30) == 0
    assert marker.read_text() == "x"
    with pytest.raises(ProcessError, match="cannot run the reboot command"):
        CommandRebooter(["/nonexistent/reboot"]).reboot("update")


@pytest.mark.swtpm
def test_power_cut_right_after_the_trial_is_marked_boots_the_trial_and_commits(
        device: Device, monkeypatch: pytest.MonkeyPatch) -> None:
    real_begin = bootctl.begin_trial

    def begin_then_cut(*args: Any, **kwargs: Any) -> bootctl.BootControl:
        real_begin(*args, **kwargs)
        raise PowerCut()

    monkeypatch.setattr(bootctl, "begin_trial", begin_then_cut)
    path = publish(device.source, "1.3.0")
    with pytest.raises(PowerCut):
        device.installer.on_assignment(assignment("1.3.0", path=path))
    monkeypatch.setattr(bootctl, "begin_trial", real_begin)
    assert device.states() == ["downloading", "installed"]
    assert device.power_cycle().in_trial
    assert device.states() == ["downloading", "installed", "rebooting"]
    device.trusted(path)
    assert device.states()[-1] == "committed" and bootctl.read(device.boot).active == "b"


@pytest.mark.swtpm
def test_a_second_assignment_during_a_trial_fails_and_leaves_the_trial(device: Device) -> None:
    a, path = install_and_boot_trial(device)
    other = assignment("1.4.0", path=publish(device.source, "1.4.0"))
    device.installer.on_assignment(other)
    last = device.last()
    assert last.state == "failed" and last.assignment_id == other.assignment_id
    assert f"update {a.assignment_id} (1.3.0) is still in progress (trial)" == last.reason
    device.trusted(path)
    assert device.states()[-1] == "committed"


@pytest.mark.swtpm
def test_floor_index_of_another_type_is_refused(tpm: TpmAdapter) -> None:
    tpm.counter_define()  # a monotonic counter where the floor is configured to be
    with pytest.raises(TpmError, match="is not an owner-authorized 12-byte data index"):
        TpmVersionFloor(lambda: tpm, tpm.counter_index).minimum()
    with pytest.raises(ConfigError, match="outside the owner range"):
        TpmVersionFloor(lambda: tpm, 0x01000000).minimum()
