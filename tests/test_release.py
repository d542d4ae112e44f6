"""Firmware releases on the simulator side: ``firmware-sim release build``, the bundle folder reader,
A/B boot slots of a simulated device, and power cycles requested through a Rebooter.

The reference values a release build computes in software must be what a real swtpm holds after a
device boots the bundle's images from its trial slot (checked with tpm2-tools too), per PCR and per
event.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_firmware_sim import diff_pcrs, tpm2_eventlog, tpm2_pcrread

from agent.update import bootctl
from firmware_sim import cli
from firmware_sim.device import SimulatedDevice
from firmware_sim.fleet_agents import AgentHost, _Host
from firmware_sim.images import COMPONENTS, IMAGE_FILES
from firmware_sim.manufacturer import ManufacturerCA
from firmware_sim.power import PowerCycler
from firmware_sim.profiles import UPDATED_FIRMWARE_VERSION, reference_pcrs
from fleet_server.appraisal.policy import ReferencePolicy, policy_from_eventlog
from fleet_server.verifier.eventlog import parse_eventlog
from protocol import firmware_bundle
from protocol.errors import ConfigError
from protocol.release import ReleaseError, ReleaseManifest, load_bundle_folder

VERSION = "1.3.0"


def build(out: Path, source: str = "golden", version: str = VERSION) -> Path:
    assert cli.main(["release", "build", str(out), "--from", source, "--version", version]) == 0
    return out


def install(dev: SimulatedDevice, bundle: Path, slot: str = "b") -> None:
    """What the agent does with a bundle: its images and release.json into the inactive slot, then a trial."""
    target = dev.slot_dir(slot)
    for path in (bundle / "images").iterdir():
        shutil.copyfile(path, target / path.name)
    shutil.copyfile(bundle / "release.json", target / "release.json")
    version = json.loads((bundle / "release.json").read_text())["version"]
    bootctl.begin_trial(dev.boot_dir, slot=slot, assignment_id="ab" * 16, version=version, deadline=2**40)


def sha256_pcrs(policy: ReferencePolicy) -> dict[int, bytes]:
    return dict(policy.pcrs["sha256"])


# --- release build ----------------------------------------------------------------------------------


def test_release_build_writes_a_bundle_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "rel"
    assert cli.main(["release", "build", str(out), "--from", "golden", "--version", VERSION, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["version"] == VERSION and summary["device_class"] == "edge-camera"
    assert sorted(p.name for p in out.iterdir()) == ["images", "reference-values.json", "release.json"]
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(IMAGE_FILES.values())

    manifest_json, files, policy_json = load_bundle_folder(out)
    assert manifest_json == json.loads((out / "release.json").read_text())
    manifest = ReleaseManifest.from_json(manifest_json)
    assert set(manifest.components) == set(COMPONENTS)
    assert files == {name: (out / "images" / name).read_bytes() for name in IMAGE_FILES.values()}
    assert manifest.boot.secure_boot and manifest.boot.startup_locality is None

    policy = ReferencePolicy.from_json(policy_json)
    assert (policy.name, policy.device_class, policy.firmware_version) == ("edge-camera-1.3.0", "edge-camera",
                                                                           VERSION)
    # The golden images at firmware 1.3.0 are the updated-firmware profile: same values in software.
    assert sha256_pcrs(policy) == reference_pcrs("updated-firmware")["sha256"]
    assert VERSION == UPDATED_FIRMWARE_VERSION
    assert summary["reference_values"]["name"] == policy.name
    assert summary["reference_values"]["events"] == len(policy.events)

    # The server packs the folder into one file: it round-trips.
    bundle = firmware_bundle.unpack(firmware_bundle.pack(manifest_json, files))
    assert dict(bundle.manifest) == manifest_json and dict(bundle.files) == files


def test_release_build_is_deterministic(tmp_path: Path) -> None:
    a, b = build(tmp_path / "a"), build(tmp_path / "b")
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    # A folder source (the bundle itself) reproduces it byte for byte.
    c = build(tmp_path / "c", source=str(a))
    for rel in files_a:
        assert (c / rel).read_bytes() == (a / rel).read_bytes(), rel


def test_a_new_version_measures_differently_in_pcr0_only(tmp_path: Path) -> None:
    one = ReferencePolicy.from_json(load_bundle_folder(build(tmp_path / "a", version="1.3.0"))[2])
    two = ReferencePolicy.from_json(load_bundle_folder(build(tmp_path / "b", version="1.4.0"))[2])
    diff = {i for i, v in sha256_pcrs(one).items() if sha256_pcrs(two)[i] != v}
    assert diff == {0}


def test_release_build_keeps_the_profile_boot_settings(tmp_path: Path) -> None:
    out = build(tmp_path / "rel", source="tampered-cmdline", version="1.2.0")
    manifest = ReleaseManifest.from_json(load_bundle_folder(out)[0])
    assert manifest.boot.kernel_cmdline.endswith("init=/bin/sh")
    policy = ReferencePolicy.from_json(load_bundle_folder(out)[2])
    assert sha256_pcrs(policy) == reference_pcrs("tampered-cmdline")["sha256"]


def _one_line_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("firmware-sim: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_release_build_bad_inputs_are_one_line_errors(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    good = build(tmp_path / "good")
    capsys.readouterr()
    base = ["release", "build"]
    assert "neither a folder nor a profile" in _one_line_error(
        [*base, str(tmp_path / "x"), "--from", "no-such-profile", "--version", VERSION], capsys)
    assert "release version" in _one_line_error(
        [*base, str(tmp_path / "x"), "--from", "golden", "--version", "1.3 beta"], capsys)
    assert "not an empty folder" in _one_line_error(
        [*base, str(good), "--from", "golden", "--version", VERSION], capsys)
    assert "not --version" in _one_line_error(
        [*base, str(tmp_path / "x"), "--from", str(good), "--version", "9.9.9"], capsys)
    broken = tmp_path / "broken"
    shutil.copytree(good, broken)
    (broken / "images" / "initrd.img").unlink()
    assert "initrd" in _one_line_error([*base, str(tmp_path / "x"), "--from", str(broken), "--version",
                                        VERSION], capsys)
    (broken / "release.json").write_text("{not json")
    assert "not JSON" in _one_line_error([*base, str(tmp_path / "y"), "--from", str(broken), "--version",
                                          VERSION], capsys)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "images" / "vmlinuz").write_bytes(b"evil"), "vmlinuz"),
    (lambda d: (d / "images" / "extra.bin").write_bytes(b"x"), "not in release.json"),
    (lambda d: (d / "reference-values.json").unlink(), "holds exactly"),
    (lambda d: (d / "notes.txt").write_text("x"), "holds exactly"),
    (lambda d: ((d / "images" / "vmlinuz").unlink(),
                (d / "images" / "vmlinuz").symlink_to(d / "release.json")), "not a file"),
    (lambda d: (d / "release.json").write_text(
        (d / "release.json").read_text().replace('"version": "1.3.0"', '"version": "1.3.1"')),
     "differ from release.json"),
    (lambda d: (d / "release.json").write_text(
        (d / "release.json").read_text().replace('"format": 1', '"format": 1, "extra": 1')),
     "unknown field"),
    (lambda d: (d / "release.json").write_text(
        (d / "release.json").read_text().replace('"file": "vmlinuz"', '"file": "../vmlinuz"')),
     "invalid value"),
])
def test_load_bundle_folder_refuses_inconsistent_folders(tmp_path: Path, damage: Callable[[Path], object],
                                                         message: str) -> None:
    folder = build(tmp_path / "rel")
    damage(folder)
    with pytest.raises(ReleaseError, match=message):
        load_bundle_folder(folder)


# --- A/B slots and power cycles on a real swtpm -----------------------------------------------------


@pytest.fixture
def device(tmp_path: Path, manufacturer_ca: ManufacturerCA) -> Iterator[SimulatedDevice]:
    dev = SimulatedDevice.create(tmp_path / "dev", ca=manufacturer_ca)
    try:
        yield dev
    finally:
        dev.shutdown()


def test_new_device_has_factory_slot_a(device: SimulatedDevice) -> None:
    assert device.images_dir == device.slot_dir("a") == device.boot_dir / "slot-a"
    assert list(device.slot_dir("b").iterdir()) == []
    manifest = ReleaseManifest.from_json(json.loads((device.slot_dir("a") / "release.json").read_text()))
    assert manifest.version == "1.2.0" and manifest.device_class == "edge-camera"
    assert bootctl.read(device.boot_dir) == bootctl.BootControl()


@pytest.mark.swtpm
def test_reference_values_equal_a_real_boot_of_the_bundle(tmp_path: Path, device: SimulatedDevice) -> None:
    bundle = build(tmp_path / "rel")
    policy = ReferencePolicy.from_json(load_bundle_folder(bundle)[2])
    device.boot()
    assert device.booted_slot == "a"
    assert tpm2_pcrread(device.tcti) == reference_pcrs("golden")

    install(device, bundle)
    record = device.power_cycle()
    assert device.booted_slot == "b"
    tpm = tpm2_pcrread(device.tcti)
    assert tpm["sha256"] == sha256_pcrs(policy)  # the TPM holds exactly the release's reference values
    assert tpm == record.pcrs
    replayed, _ = tpm2_eventlog(device.eventlog_path)  # independent replay of the new log
    assert replayed == tpm
    # ... and the device's events are the reference events, one for one.
    measured = policy_from_eventlog(parse_eventlog(device.eventlog_path.read_bytes()), name=policy.name,
                                    device_class=policy.device_class,
                                    firmware_version=policy.firmware_version)
    assert measured == policy
    assert diff_pcrs(tpm, reference_pcrs("golden")) == {0}


@pytest.mark.swtpm
def test_trial_boots_once_then_the_spent_counter_returns_to_the_active_slot(
        tmp_path: Path, device: SimulatedDevice) -> None:
    install(device, build(tmp_path / "rel"))
    device.boot()
    ctl = bootctl.read(device.boot_dir)
    assert device.booted_slot == "b" and ctl.in_trial and ctl.trial is not None and ctl.trial.tries_left == 0
    assert tpm2_pcrread(device.tcti) == reference_pcrs("updated-firmware")

    device.power_cycle()  # not committed: the boot counter is spent
    ctl = bootctl.read(device.boot_dir)
    assert device.booted_slot == "a" and ctl.trial is None and ctl.active == "a"
    assert ctl.last_rollback is not None and "boot counter" in ctl.last_rollback.reason
    assert tpm2_pcrread(device.tcti) == reference_pcrs("golden")


@pytest.mark.swtpm
def test_committed_slot_keeps_booting(tmp_path: Path, device: SimulatedDevice) -> None:
    install(device, build(tmp_path / "rel"))
    device.boot()
    bootctl.commit(device.boot_dir)
    device.power_cycle()
    assert device.booted_slot == "b" and device.images_dir == device.slot_dir("b")
    assert tpm2_pcrread(device.tcti) == reference_pcrs("updated-firmware")


@pytest.mark.swtpm
def test_unbootable_trial_slot_falls_back_to_the_active_slot(device: SimulatedDevice) -> None:
    bootctl.begin_trial(device.boot_dir, slot="b", assignment_id="cd" * 16, version=VERSION, deadline=2**40)
    device.boot()  # slot b is empty (a power cut before the install finished)
    ctl = bootctl.read(device.boot_dir)
    assert device.booted_slot == "a" and ctl.trial is None
    assert ctl.last_rollback is not None and "does not boot" in ctl.last_rollback.reason
    assert tpm2_pcrread(device.tcti) == reference_pcrs("golden")


@pytest.mark.swtpm
def test_device_that_boots_something_else_from_its_trial_slot(tmp_path: Path,
                                                              manufacturer_ca: ManufacturerCA) -> None:
    bundle = build(tmp_path / "rel")
    policy = ReferencePolicy.from_json(load_bundle_folder(bundle)[2])
    with SimulatedDevice.create(tmp_path / "evil", ca=manufacturer_ca, trial_tamper="kernel") as dev:
        dev.boot()
        assert tpm2_pcrread(dev.tcti) == reference_pcrs("golden")  # the factory slot is untouched
        install(dev, bundle)
        dev.power_cycle()
        tpm = tpm2_pcrread(dev.tcti)
        assert dev.booted_slot == "b"
        assert {i for i, v in sha256_pcrs(policy).items() if tpm["sha256"][i] != v} == {4, 9}
        assert SimulatedDevice(dev.folder).trial_tamper == "kernel"  # stored with the device
        dev.power_cycle()  # rolled back: the old slot attests as before
        assert tpm2_pcrread(dev.tcti) == reference_pcrs("golden")


def test_unknown_trial_tamper_component_is_refused(tmp_path: Path, manufacturer_ca: ManufacturerCA) -> None:
    with pytest.raises(ConfigError, match="unknown component"):
        SimulatedDevice.create(tmp_path / "dev", ca=manufacturer_ca, trial_tamper="bios")
    assert not (tmp_path / "dev").exists()


@pytest.mark.swtpm
def test_reboot_from_the_agent_thread_power_cycles_into_the_trial_slot(tmp_path: Path,
                                                                      device: SimulatedDevice) -> None:
    from tpm2_pytss import ESAPI, TPML_DIGEST_VALUES, TPMT_HA
    from tpm2_pytss.constants import ESYS_TR, TPM2_ALG

    device.boot()
    # Something extends a PCR after boot: a power cycle must reset it.
    with ESAPI(device.tcti) as ectx:
        ha = TPMT_HA(hashAlg=TPM2_ALG.SHA256)
        ha.digest.sha256 = b"\x42" * 32
        ectx.pcr_extend(ESYS_TR.PCR16, TPML_DIGEST_VALUES([ha]))
    assert tpm2_pcrread(device.tcti, (16,))["sha256"][16] != bytes(32)
    install(device, build(tmp_path / "rel"))

    agent_stack: list[str] = []

    def cycle(device_id: str, reason: str) -> None:
        agent_stack.append(threading.current_thread().name)
        device.power_cycle()

    cycler = PowerCycler(cycle)
    try:
        caller = threading.Thread(target=lambda: cycler.rebooter("dev-1").reboot("install 1.3.0"),
                                  name="agent-worker")
        caller.start()
        caller.join()
        assert cycler.wait_for("dev-1", 1, timeout=60)
    finally:
        cycler.close()
    assert cycler.history[0].device_id == "dev-1" and cycler.history[0].reason == "install 1.3.0"
    assert cycler.history[0].error is None
    assert agent_stack == ["power-cycler"]  # not in the agent's call stack
    assert device.booted_slot == "b"
    assert tpm2_pcrread(device.tcti, (16,))["sha256"][16] == bytes(32)
    assert tpm2_pcrread(device.tcti) == reference_pcrs("updated-firmware")


def test_power_cycler_merges_pending_requests_and_records_failures() -> None:
    release = threading.Event()
    seen: list[str] = []

    def cycle(device_id: str, reason: str) -> None:
        release.wait(30)
        seen.append(f"{device_id}:{reason}")
        if device_id == "bad":
            raise ConfigError("cannot boot")

    cycler = PowerCycler(cycle)
    try:
        cycler.request("bad", "first")  # running (waits for `release`)
        cycler.request("d", "one")
        cycler.request("d", "two")  # merged with the pending "one"
        release.set()
        assert cycler.wait_idle(30)
    finally:
        cycler.close()
    assert seen == ["bad:first", "d:one"]
    assert cycler.cycles("bad")[0].error == "cannot boot"


def test_agent_host_reboot_requests_reach_the_harness() -> None:
    ctx = multiprocessing.get_context("spawn")
    events_in, events_out = ctx.Pipe(duplex=False)
    host = _Host(events_out)
    host.rebooter("cam-001").reboot("trial of 1.3.0")
    got: list[tuple[str, str]] = []
    harness_side = AgentHost(0, Path("/dev/null"), on_reboot=lambda d, r: got.append((d, r)))
    reader = threading.Thread(target=harness_side._read_events, args=(events_in,))
    reader.start()
    events_out.close()  # the host process ended: the reader stops at EOF
    reader.join(30)
    assert not reader.is_alive()
    assert got == [("cam-001", "trial of 1.3.0")]
