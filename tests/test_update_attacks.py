"""Attacks on signed firmware updates that must fail (issue 10), end to end on real parts: the fleet
server's own update repository (:class:`~fleet_server.updates.repository.UpdateRepository`, 2-of-3
offline keys for root, targets and firmware, one online key each for snapshot and timestamp), served
by the real worker (:class:`~fleet_server.service.tuf_files.TufFileService`) over a real Mosquitto
broker (TLS, per-device certificates, ACL) to the agent's
:class:`~agent.update.tuf_client.UpdateClient`, which is the
:class:`~agent.update.installer.TargetSource` of the real installer writing a temporary A/B boot
folder, with its anti-rollback floor in a real swtpm's NV.

The attacker is given what each attack assumes: the server's disk (the online keys, the one firmware
key that may stay on the server, the served folder) or the device's state files, never a threshold of
offline keys.  Each test also shows the legitimate path still working where that is what the
protection must not break.

How the tests were checked to fail without their protection (each run once with a throwaway pytest
plugin, ``-p``, that patched the check away; nothing of it is kept):

* signature thresholds: with ``tuf.api.metadata.Root.verify_delegate`` and
  ``Targets.verify_delegate`` doing nothing, ``test_online_keys_alone_cannot_ship_firmware``
  [unsigned firmware, one firmware key, own key delegated] installs the attacker's (well-formed)
  bundle: ``rebooting`` instead of ``failed``.  (The first test still passes then: a version short
  of its threshold is not even published by the server.)
* expiry: with ``tuf.api.metadata.Signed.is_expired`` always False,
  ``test_a_timestamp_past_its_expiry_is_refused`` installs from the frozen repository.
* the TPM NV floor: with ``TpmVersionFloor.minimum`` returning None,
  ``test_an_older_release_is_refused_even_after_the_state_files_are_restored`` installs 1.2.5 on the
  restored device.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import DelegatedRole, Metadata, MetaFile, TargetFile

from agent.tpm.adapter import TpmAdapter
from agent.update import bootctl
from agent.update import installer as installer_mod
from agent.update.floor import TpmVersionFloor
from agent.update.mqtt_fetcher import MqttFetcher
from agent.update.tuf_client import UpdateClient
from fleet_server.config import ServerConfig
from fleet_server.service.common import ManualClock
from fleet_server.storage.models import DeviceState
from fleet_server.storage.repo import Repository
from fleet_server.updates.keys import load_key_file
from fleet_server.updates.repository import UpdateRepository, target_file_name
from protocol.firmware_bundle import pack
from protocol.messages import UpdateAssignment, new_message_id

pytest.register_assert_rewrite("update_fixtures")
from update_fixtures import (  # noqa: E402
    BootDevice,
    TufDevice,
    TufDeviceFactory,
    WorkerFactory,
    insert_devices,
)

pytest_plugins = ("mqtt_fixtures", "server_fixtures", "update_fixtures")
pytestmark = [pytest.mark.mqtt, pytest.mark.swtpm]

DEVICE = "dev-a"
CLASS = "edge-camera"
RUNNING = "1.2.0"
FIRMWARE = "firmware"
IMAGES = {"firmware.bin": b"FW" * 1000, "kernel.bin": b"KERNEL" * 500, "rootfs.img": b"R" * 8192}


def target_path(version: str, cls: str = CLASS) -> str:
    return f"firmware/{cls}/{version}.fwb"


def bundle(version: str, cls: str = CLASS) -> bytes:
    files = {name: content + version.encode() for name, content in IMAGES.items()}
    return pack({"device_class": cls, "version": version}, files)


def custom(version: str, cls: str = CLASS) -> dict[str, Any]:
    return {"kind": "firmware", "device_class": cls, "version": version}


def release(updates: UpdateRepository, version: str, cls: str = CLASS) -> str:
    """Add a release of ``cls`` to the firmware role (signed with the firmware keys on the server)."""
    path = target_path(version, cls)
    updates.add_target(FIRMWARE, path, bundle(version, cls), custom(version, cls))
    return path


def offline(updates: UpdateRepository, role: str, keep: int, into: Path) -> list[Path]:
    """Move all but ``keep`` of ``role``'s key files off the server (as docs/updates.md says to)."""
    into.mkdir(parents=True, exist_ok=True)
    moved = []
    for path in sorted(updates.keys.role_dir(role).glob("*.pem"))[keep:]:
        moved.append(Path(shutil.move(path, into / path.name)))
    return moved


def publish_forged(updates: UpdateRepository, role: str, md: Metadata[Any]) -> None:
    """The attacker on the server: put ``md`` into the served folder as the newest version of ``role``
    and re-sign snapshot and timestamp with the online keys (which the server holds)."""
    (updates.metadata_dir / f"{md.signed.version}.{role}.json").write_bytes(md.to_bytes())
    updates.do_snapshot(force=True)
    updates.do_timestamp(force=True)


class PowerCut(BaseException):
    """The device lost power: nothing in the agent can catch it (not an ``Exception``)."""


@dataclass
class Fleet:
    updates: UpdateRepository
    repo_clock: ManualClock
    tuf: TufDevice
    client: UpdateClient
    """The running agent's TUF client: the installer's target source."""
    boot: BootDevice

    def assign(self, version: str, path: str | None = None) -> Any:
        """Deliver a verified assignment of ``path`` (default: this class's ``version``) to the
        installer; returns the last status it reported."""
        a = UpdateAssignment(assignment_id=new_message_id(), kind="firmware",
                             target=path or target_path(version), version=version,
                             deadline=int(self.boot.now * 1000) + 3_600_000)
        self.boot.installer.on_assignment(a)
        return self.boot.last()

    def restart(self) -> bootctl.BootControl:
        """A power cycle: the bootloader's choice, then the agent with a new TUF client and fetcher."""
        self.client = self.tuf.update_client()  # the connection's chunks now go to its fetcher
        return self.boot.power_cycle(self.client)


@pytest.fixture
def repo_clock() -> ManualClock:
    """The update repository's clock (seconds = ms / 1000), at the real time unless a test moves it."""
    return ManualClock(time.time_ns() // 1_000_000)


@pytest.fixture
def updates(server_config: ServerConfig, repo_clock: ManualClock) -> UpdateRepository:
    """What ``fleet-server updates init`` makes: every role's keys here, first versions published."""
    return UpdateRepository.create(server_config.updates.dir, server_config.updates,
                                   clock=lambda: repo_clock.now_ms() / 1000)


@pytest.fixture
def tuf_root(updates: UpdateRepository) -> bytes:
    return updates.root_metadata()  # what ``fleet-server updates root --out`` exports


@pytest.fixture
def fleet(make_worker: WorkerFactory, make_tuf_device: TufDeviceFactory, updates: UpdateRepository,
          repo_clock: ManualClock, repo: Repository, clock: ManualClock, tpm: TpmAdapter,
          tmp_path: Path) -> Iterator[Fleet]:
    insert_devices(repo, clock, **{DEVICE: DeviceState.TRUSTED})
    make_worker(updates)
    tuf = make_tuf_device(DEVICE)
    client = tuf.update_client()
    boot = BootDevice(tmp_path / "dev", tpm, client, device_class=CLASS, running=RUNNING, now=time.time())
    yield Fleet(updates, repo_clock, tuf, client, boot)


def installs(fleet: Fleet, version: str, path: str | None = None) -> None:
    """The legitimate path: ``version`` downloads, boots on trial and commits on a trusted verdict."""
    fleet.assign(version, path)
    assert fleet.boot.states()[-3:] == ["downloading", "installed", "rebooting"], fleet.boot.last()
    assert fleet.restart().in_trial
    fleet.boot.trusted(path or target_path(version))
    assert fleet.boot.states()[-1] == "committed"
    assert bootctl.slot_dir(fleet.boot.boot, bootctl.read(fleet.boot.boot).active).joinpath(
        "rootfs.img").read_bytes() == IMAGES["rootfs.img"] + version.encode()


def refused(fleet: Fleet, version: str, reason: str, path: str | None = None) -> None:
    """``version`` is reported ``failed`` with ``reason``; nothing in the boot folder changed (no slot
    written, no trial marked) and no reboot was asked for."""
    before, reboots = fleet.boot.boot_files(), len(fleet.boot.rebooter.reasons)
    last = fleet.assign(version, path)
    assert last.state == "failed" and reason in last.reason, last.reason
    assert fleet.boot.boot_files() == before
    assert len(fleet.boot.rebooter.reasons) == reboots


# -- 1. too few signatures of the firmware role ---------------------------------------------------------
def test_a_release_signed_by_too_few_firmware_keys_is_not_installable(fleet: Fleet, tmp_path: Path) -> None:
    moved = offline(fleet.updates, FIRMWARE, 1, tmp_path / "offline")  # 1 of the 2-of-3 stays here
    path = release(fleet.updates, "1.3.0")
    assert [t.published for t in fleet.updates.list_targets(FIRMWARE)] == [False]
    refused(fleet, "1.3.0", f"the update repository's signed metadata lists no target {path}")
    # A second firmware key, on the offline machine, reaches the threshold: the same agent (no
    # restart) now installs it.
    outcome = fleet.updates.sign(FIRMWARE, [load_key_file(moved[0])])
    assert outcome.published and outcome.signatures == 2
    installs(fleet, "1.3.0")


# -- 2. the online keys (and what else a compromised server holds) alone -----------------------------
@pytest.mark.parametrize("attack", ["unsigned firmware", "one firmware key", "own key delegated",
                                    "swapped bytes"])
def test_online_keys_alone_cannot_ship_firmware(fleet: Fleet, tmp_path: Path, attack: str) -> None:
    """An attacker holding the fleet server (the snapshot and timestamp keys, at most one firmware
    key, the served folder) but no threshold of offline keys tries to make the device install its
    firmware 1.3.0: every way is refused by the device and nothing is written to a slot."""
    updates = fleet.updates
    real = release(updates, "1.3.0") if attack == "swapped bytes" else ""
    offline(updates, FIRMWARE, 1, tmp_path / "offline-firmware")
    offline(updates, "targets", 0, tmp_path / "offline-targets")
    path = target_path("1.3.0")
    evil = pack({"device_class": CLASS, "version": "1.3.0"}, {"rootfs.img": b"backdoor"})  # well-formed
    digest = TargetFile.from_data(path, evil, ["sha256"]).hashes["sha256"]
    firmware = updates.open(FIRMWARE)
    firmware.signed.version += 1
    firmware.signed.targets[path] = TargetFile(length=len(evil), hashes={"sha256": digest}, path=path,
                                               unrecognized_fields={"custom": custom("1.3.0")})
    firmware.signatures.clear()
    (updates.targets_dir / target_file_name(path, digest)).parent.mkdir(parents=True, exist_ok=True)
    (updates.targets_dir / target_file_name(path, digest)).write_bytes(evil)
    if attack == "unsigned firmware":
        publish_forged(updates, FIRMWARE, firmware)
        reason = "refused by TUF: UnsignedMetadataError"
    elif attack == "one firmware key":
        firmware.sign(updates.keys.signers(FIRMWARE)[0])
        publish_forged(updates, FIRMWARE, firmware)
        reason = "refused by TUF: UnsignedMetadataError"
    elif attack == "own key delegated":
        # Targets delegates firmware to the attacker's key (threshold 1); targets itself is signed by
        # the attacker's key too: none of the 2-of-3 offline targets keys.
        own = CryptoSigner.generate_ed25519()
        top = updates.open("targets")
        top.signed.version += 1
        assert top.signed.delegations is not None and top.signed.delegations.roles is not None
        top.signed.delegations.keys[own.public_key.keyid] = own.public_key
        top.signed.delegations.roles[FIRMWARE] = DelegatedRole(
            FIRMWARE, [own.public_key.keyid], 1, True, top.signed.delegations.roles[FIRMWARE].paths)
        top.signatures.clear()
        top.sign(own)
        firmware.sign(own)
        (updates.metadata_dir / f"{firmware.signed.version}.{FIRMWARE}.json").write_bytes(firmware.to_bytes())
        publish_forged(updates, "targets", top)
        reason = "refreshing the update metadata: refused by TUF: UnsignedMetadataError"
    else:  # a release legitimately signed, its bytes swapped on the server's disk (same length)
        info = updates.list_targets(FIRMWARE)[0]
        served = updates.targets_dir / target_file_name(real, info.sha256.hex())
        data = served.read_bytes()
        served.write_bytes(data[:-8] + b"backdoor")
        reason = "refused by TUF: LengthOrHashMismatchError"
    refused(fleet, "1.3.0", reason)


# -- 3. rollback: older metadata, an older release, restored state files --------------------------------
@pytest.mark.parametrize("attack", ["replayed timestamp", "timestamp naming an old snapshot",
                                    "snapshot naming an old firmware version"])
def test_older_metadata_is_refused(fleet: Fleet, attack: str) -> None:
    """The device trusts the metadata that listed 1.3.0; the attacker serves older metadata (to hide
    1.3.1, a security fix), replayed as it was or re-signed with the online keys."""
    updates = fleet.updates
    release(updates, "1.3.0")
    old_timestamp = updates.read_file("metadata/timestamp.json")
    old_snapshot = updates.published("snapshot")
    assert old_timestamp is not None and old_snapshot is not None
    installs(fleet, "1.3.0")
    release(updates, "1.3.1")
    fleet.client.refresh()  # the device now trusts the metadata listing 1.3.1
    if attack == "replayed timestamp":
        (updates.metadata_dir / "timestamp.json").write_bytes(old_timestamp)
    elif attack == "timestamp naming an old snapshot":
        timestamp = updates.open("timestamp")
        timestamp.signed.snapshot_meta = MetaFile(old_snapshot.signed.version)
        updates.close("timestamp", timestamp)  # signed with the online timestamp key, version + 1
    else:
        snapshot = updates.open("snapshot")
        old_firmware = old_snapshot.signed.meta[f"{FIRMWARE}.json"].version
        snapshot.signed.meta[f"{FIRMWARE}.json"] = MetaFile(old_firmware)
        updates.close("snapshot", snapshot)  # signed with the online snapshot key
        updates.do_timestamp(force=True)
    refused(fleet, "1.3.1", "refused by TUF: BadVersionNumberError")


def test_an_older_release_is_refused_even_after_the_state_files_are_restored(fleet: Fleet,
                                                                           tmp_path: Path) -> None:
    """1.2.5 and 1.3.0 are both correctly signed; once 1.3.0 is committed, 1.2.5 is refused, also
    after the attacker restores the device's boot folder and state (its TUF metadata folder and its
    update folder) from a backup made before the update: the floor is in TPM NV."""
    release(fleet.updates, "1.2.5")
    release(fleet.updates, "1.3.0")
    backup = tmp_path / "backup"
    folders = (fleet.boot.root, fleet.tuf.state_dir)
    fleet.client.refresh()  # the TUF folder exists before the backup
    for folder in folders:
        shutil.copytree(folder, backup / folder.name)
    installs(fleet, "1.3.0")
    assert TpmVersionFloor(lambda: fleet.boot.tpm).minimum() == (1, 3, 0)
    refused(fleet, "1.2.5", "version 1.2.5 is not newer than the running 1.3.0")
    for folder in folders:
        shutil.rmtree(folder)
        shutil.copytree(backup / folder.name, folder)
    ctl = fleet.restart()
    assert ctl.booted == "a" and fleet.boot.installer.running_version() == RUNNING
    fleet.boot.rebooter.reasons.clear()
    refused(fleet, "1.2.5", "version 1.2.5 is below the anti-rollback floor 1.3.0 kept in TPM NV")
    installs(fleet, "1.3.0")  # the committed release (and anything newer) still installs


# -- 4. a frozen repository ---------------------------------------------------------------------------
def test_a_timestamp_past_its_expiry_is_refused(fleet: Fleet) -> None:
    """The repository is frozen at a timestamp whose day of validity is over (here: re-signed with the
    online key but dated 25 hours ago): the device refuses it even though signature and version are
    good, and installs once ``fleet-server run`` renews the timestamp."""
    updates = fleet.updates
    release(updates, "1.3.0")
    fleet.client.refresh()
    now = fleet.repo_clock.now_ms()
    fleet.repo_clock.set(now - 25 * 3600 * 1000)
    updates.renew(force=True)
    refused(fleet, "1.3.0", "refreshing the update metadata: refused by TUF: ExpiredMetadataError")
    fleet.repo_clock.set(now)
    assert updates.renew() == ["timestamp"]  # what the renewer in `fleet-server run` does
    installs(fleet, "1.3.0")


# -- 5. metadata of two snapshots mixed ------------------------------------------------------------------
@pytest.mark.parametrize("mixed", ["snapshot", FIRMWARE])
def test_metadata_of_two_snapshots_mixed_is_refused(fleet: Fleet, mixed: str) -> None:
    """The new timestamp with the previous snapshot, or the new snapshot with the previous firmware
    metadata, each served under the name the newer one has (a mirror mixing two publications)."""
    updates = fleet.updates
    fleet.client.refresh()
    previous = updates.published(mixed)
    assert previous is not None
    release(updates, "1.3.0")
    current = updates.published(mixed)
    assert current is not None and current.signed.version == previous.signed.version + 1
    (updates.metadata_dir / f"{current.signed.version}.{mixed}.json").write_bytes(previous.to_bytes())
    refused(fleet, "1.3.0", "refused by TUF: BadVersionNumberError")
    (updates.metadata_dir / f"{current.signed.version}.{mixed}.json").write_bytes(current.to_bytes())
    installs(fleet, "1.3.0")  # the refusal left the device's trusted metadata usable


# -- 6. a download longer than its signed length ----------------------------------------------------------
def test_a_download_longer_than_its_signed_length_is_refused(fleet: Fleet) -> None:
    path = release(fleet.updates, "1.3.0")
    info = fleet.updates.list_targets(FIRMWARE)[0]
    served = fleet.updates.targets_dir / target_file_name(path, info.sha256.hex())
    served.write_bytes(served.read_bytes() + b"\0" * 64 * 1024)
    refused(fleet, "1.3.0", "refused by TUF: DownloadLengthMismatchError")


# -- 7. a release for another hardware class -------------------------------------------------------------
@pytest.mark.parametrize("where", ["its own path", "this class's path"])
def test_a_release_for_another_hardware_class_is_refused(fleet: Fleet, where: str) -> None:
    if where == "its own path":
        path = release(fleet.updates, "1.3.0", cls="doorbell")
    else:  # correctly signed, but its signed custom metadata names another class
        path = target_path("1.3.0")
        fleet.updates.add_target(FIRMWARE, path, bundle("1.3.0", "doorbell"), custom("1.3.0", "doorbell"))
    refused(fleet, "1.3.0", f"target {path} is for hardware class 'doorbell', this device is '{CLASS}'",
            path=path)


# -- 8. a power cut during the download or the install --------------------------------------------------
@pytest.mark.parametrize("when", ["download", "slot write"])
def test_a_power_cut_during_download_or_install_boots_the_old_slot_and_the_retry_installs(
        fleet: Fleet, monkeypatch: pytest.MonkeyPatch, when: str) -> None:
    release(fleet.updates, "1.3.0")
    slot_a = fleet.boot.slot_files("a")
    control = (fleet.boot.boot / bootctl.CONTROL_FILE).read_bytes()
    if when == "download":
        real_request = MqttFetcher._request
        target_chunks: list[int] = []

        def cut(self: MqttFetcher, url: str, path: str, offset: int, length: int, total: int | None) -> Any:
            if path.startswith("targets/"):
                target_chunks.append(offset)
                if len(target_chunks) == 3:
                    raise PowerCut()
            return real_request(self, url, path, offset, length, total)

        monkeypatch.setattr(MqttFetcher, "_request", cut)
    else:
        real_write = installer_mod._write_file
        written: list[Path] = []

        def cut_write(path: Path, data: bytes) -> None:
            written.append(path)
            if len(written) == 2:
                path.write_bytes(data[: len(data) // 2])  # a torn file, then the power goes
                raise PowerCut()
            real_write(path, data)

        monkeypatch.setattr(installer_mod, "_write_file", cut_write)
    with pytest.raises(PowerCut):
        fleet.assign("1.3.0")
    monkeypatch.undo()
    assert fleet.boot.slot_files("a") == slot_a
    assert (fleet.boot.boot / bootctl.CONTROL_FILE).read_bytes() == control
    assert not bootctl.slot_dir(fleet.boot.boot, "b").exists()
    assert fleet.boot.states() == ["downloading"]
    # Power back: the old slot boots, the agent drops what was half written and installs again.
    ctl = fleet.restart()
    assert ctl.booted == "a" and ctl.trial is None
    assert fleet.boot.states() == ["downloading", "downloading", "installed", "rebooting"]
    assert not any(p.name.endswith(".incoming") for p in fleet.boot.boot.iterdir())
    assert fleet.restart().in_trial
    fleet.boot.trusted(target_path("1.3.0"))
    assert fleet.boot.states()[-1] == "committed"
    assert fleet.boot.slot_files("b")["rootfs.img"] == IMAGES["rootfs.img"] + b"1.3.0"
