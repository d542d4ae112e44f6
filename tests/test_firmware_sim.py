"""The measured-boot simulator: images, the boot's event list, profiles, and real devices on swtpm.

Devices are checked three ways that must agree: the PCRs the real swtpm holds (``tpm2_pcrread``),
the PCRs ``tpm2_eventlog`` replays from the device's ``eventlog.bin``, and the reference values the
profile yields in software.  Every swtpm a test starts is stopped by the test; the cleanup tests
look for leftovers in /proc.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from firmware_sim import cli
from firmware_sim import eventlog_writer as ew
from firmware_sim.boot import (
    MEASURED_PCRS,
    BootMedia,
    build_boot_log,
    crtm_version,
)
from firmware_sim.device import SimulatedDevice
from firmware_sim.images import (
    COMPONENTS,
    IMAGE_FILES,
    SIGNED_COMPONENTS,
    VENDOR_PUBLIC_KEY_HEX,
    ImageSpec,
    certificate_der,
    generate_image,
    parse_image_header,
    private_key,
    raw_public_key,
    vendor_public_key,
    verify_vendor_signature,
)
from firmware_sim.manufacturer import ManufacturerCA
from firmware_sim.profiles import (
    PROFILES,
    Profile,
    get_profile,
    golden_profile,
    pcrs_to_json,
    reference_pcrs,
)
from protocol.errors import ConfigError, MalformedInputError, SignatureError
from protocol.tpm.constants import Alg, EventType

REPO = Path(__file__).resolve().parents[1]
BANKS = ("sha1", "sha256")
SHA1, SHA256 = int(Alg.SHA1), int(Alg.SHA256)

#: The PCRs in which each profile must differ from golden (independent of the implementation's
#: own tables: a change of the PCR map must be a deliberate change here too).
EXPECTED_DIFF: dict[str, set[int]] = {
    "golden": set(),
    "golden-startup-locality": set(),
    "tampered-bootloader": {4},
    "tampered-kernel": {4, 9},
    "tampered-initrd": {9},
    "tampered-cmdline": {8},
    "tampered-rootfs": {13},
    "tampered-agent-config": {14},
    "rolled-back-firmware": {0},
    "updated-firmware": {0},
    "secureboot-disabled": {7},
}


# --- helpers ----------------------------------------------------------------------------------------


def parse_pcr_yaml(text: str) -> dict[str, dict[int, bytes]]:
    """PCRs from tpm2_pcrread output or tpm2_eventlog's ``pcrs:`` section, parsed as text (a YAML
    reader would turn ``0x...`` into integers)."""
    pcrs: dict[str, dict[int, bytes]] = {}
    bank: str | None = None
    for line in text.splitlines():
        m = re.match(r"^\s+(sha1|sha256|sha384|sha512)\s*:\s*$", line)
        if m:
            bank = m.group(1)
            pcrs[bank] = {}
            continue
        m = re.match(r"^\s+(\d+)\s*:\s*0x([0-9A-Fa-f]+)\s*$", line)
        if m and bank is not None:
            pcrs[bank][int(m.group(1))] = bytes.fromhex(m.group(2))
    return pcrs


def tpm2_eventlog(path: Path) -> tuple[dict[str, dict[int, bytes]], str]:
    """tpm2_eventlog's replayed PCRs and its stderr; fails the test if it cannot parse the log."""
    res = subprocess.run(["tpm2_eventlog", str(path)], capture_output=True, check=False)
    stdout, stderr = res.stdout.decode(errors="replace"), res.stderr.decode(errors="replace")
    assert res.returncode == 0, f"tpm2_eventlog failed: {stderr}"
    marker = stdout.rfind("\npcrs:\n")
    assert marker >= 0, "tpm2_eventlog printed no pcrs section"
    return parse_pcr_yaml(stdout[marker:]), stderr


def tpm2_pcrread(tcti: str, pcrs: tuple[int, ...] = MEASURED_PCRS) -> dict[str, dict[int, bytes]]:
    selection = "+".join(f"{bank}:{','.join(map(str, pcrs))}" for bank in BANKS)
    res = subprocess.run(["tpm2_pcrread", selection], capture_output=True, text=True, check=False,
                         env={**os.environ, "TPM2TOOLS_TCTI": tcti})
    assert res.returncode == 0, res.stderr
    return parse_pcr_yaml(res.stdout)


def pids_mentioning(text: str) -> list[int]:
    """PIDs of live processes whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if text.encode() in cmdline:
            found.append(int(entry.name))
    return found


def diff_pcrs(a: dict[str, dict[int, bytes]], b: dict[str, dict[int, bytes]]) -> set[int]:
    return {i for bank in BANKS for i in set(a[bank]) | set(b[bank]) if a[bank].get(i) != b[bank].get(i)}


def events_of(profile: Profile | str) -> tuple[ew.LogEvent, ...]:
    p = get_profile(profile)
    return build_boot_log(BootMedia.from_specs(p.image_specs()), p.boot_settings).events


# --- images -----------------------------------------------------------------------------------------


def test_vendor_key_is_the_documented_constant_seed_key() -> None:
    assert raw_public_key(vendor_public_key()).hex() == VENDOR_PUBLIC_KEY_HEX
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    seed = hashlib.sha256(b"edge-attest/firmware_sim/test-key/vendor/v1").digest()
    derived = Ed25519PrivateKey.from_private_bytes(seed).public_key()
    assert raw_public_key(derived).hex() == VENDOR_PUBLIC_KEY_HEX


def test_images_are_deterministic_and_modest() -> None:
    for spec in golden_profile().image_specs().values():
        first = generate_image(spec)
        generate_image.cache_clear()
        assert generate_image(spec) == first
        assert len(first) <= 256 * 1024
    assert certificate_der("vendor") == certificate_der("vendor")


def test_images_depend_on_component_and_version() -> None:
    a = generate_image(ImageSpec("firmware", "1.2.0"))
    assert a != generate_image(ImageSpec("firmware", "1.0.0"))
    assert a[128:] != generate_image(ImageSpec("kernel", "1.2.0"))[128:]


def test_genuine_signed_images_verify() -> None:
    for component, spec in golden_profile().image_specs().items():
        data = generate_image(spec)
        if component in SIGNED_COMPONENTS:
            header = verify_vendor_signature(data)
            assert (header.component, header.version) == (component, spec.version)
        elif component != "agent-config":
            assert not parse_image_header(data).signed
            with pytest.raises(SignatureError):
                verify_vendor_signature(data)


def test_rolled_back_firmware_is_properly_signed_and_older() -> None:
    header = verify_vendor_signature(generate_image(PROFILES["rolled-back-firmware"].firmware))
    golden = parse_image_header(generate_image(PROFILES["golden"].firmware))
    assert tuple(map(int, header.version.split("."))) < tuple(map(int, golden.version.split(".")))


@pytest.mark.parametrize("component", ["bootloader", "kernel"])
def test_tampered_images_keep_a_signature_that_no_longer_verifies(component: str) -> None:
    tampered = generate_image(ImageSpec(component, "1", "tampered"))
    genuine = generate_image(ImageSpec(component, "1"))
    assert len(tampered) == len(genuine) and tampered != genuine
    assert tampered[-108:] == genuine[-108:]  # the vendor signature block is kept
    with pytest.raises(SignatureError):
        verify_vendor_signature(tampered)


def test_signature_by_another_key_is_rejected() -> None:
    data = generate_image(ImageSpec("firmware", "1.2.0"))
    with pytest.raises(SignatureError):
        verify_vendor_signature(data, private_key("platform-key").public_key())


@pytest.mark.parametrize("data", [b"", b"x" * 200, b"EDGEIMG1" + bytes(120)])
def test_parse_image_header_rejects_non_images(data: bytes) -> None:
    with pytest.raises(MalformedInputError):
        parse_image_header(data)


def test_agent_config_is_class_level_toml() -> None:
    import tomllib

    text = generate_image(golden_profile().agent_config).decode()
    config = tomllib.loads(text)
    assert config["class"]["name"] == "edge-camera"
    assert config["inference"]["debug_shell"] is False
    other = generate_image(golden_profile("edge-gateway").agent_config)
    assert tomllib.loads(other.decode())["class"]["name"] == "edge-gateway"
    tampered = tomllib.loads(generate_image(PROFILES["tampered-agent-config"].agent_config).decode())
    assert tampered["inference"]["debug_shell"] is True


@pytest.mark.parametrize("spec", [("nope", "1"), ("kernel", ""), ("kernel", "x" * 33),
                                  ("agent-config", "no-slash")])
def test_image_spec_validation(spec: tuple[str, str]) -> None:
    with pytest.raises(MalformedInputError):
        ImageSpec(*spec)


# --- the boot's event list (no TPM) -----------------------------------------------------------------


def test_golden_event_sequence() -> None:
    E = EventType
    got = [(e.pcr, e.event_type) for e in events_of("golden")]
    expected = (
        [(0, E.EV_S_CRTM_VERSION), (0, E.EV_EFI_PLATFORM_FIRMWARE_BLOB2)]
        + [(7, E.EV_EFI_VARIABLE_DRIVER_CONFIG)] * 5 + [(7, E.EV_SEPARATOR)]
        + [(1, E.EV_EFI_VARIABLE_BOOT)] * 2 + [(4, E.EV_EFI_ACTION)]
        + [(pcr, E.EV_SEPARATOR) for pcr in range(7)]
        + [(7, E.EV_EFI_VARIABLE_AUTHORITY), (4, E.EV_EFI_BOOT_SERVICES_APPLICATION)]
        + [(8, E.EV_IPL), (9, E.EV_IPL), (8, E.EV_IPL), (8, E.EV_IPL), (9, E.EV_IPL)]
        + [(4, E.EV_EFI_BOOT_SERVICES_APPLICATION), (5, E.EV_EFI_ACTION), (5, E.EV_EFI_ACTION)]
        + [(13, E.EV_IPL), (14, E.EV_IPL)]
    )
    assert got == expected
    assert {e.pcr for e in events_of("golden")} == set(MEASURED_PCRS)


def _variable(data: bytes) -> tuple[bytes, str, bytes]:
    """(GUID bytes, name, value) of a UEFI_VARIABLE_DATA, decoded from the PFP 10.2.6 layout."""
    name_len, data_len = struct.unpack_from("<QQ", data, 16)
    name = data[32:32 + 2 * name_len].decode("utf-16-le")
    value = data[32 + 2 * name_len:]
    assert len(value) == data_len
    return data[:16], name, value


def test_digests_are_hashes_of_the_event_data_where_the_spec_says_so() -> None:
    E = EventType
    data_hashed = {E.EV_S_CRTM_VERSION, E.EV_SEPARATOR, E.EV_EFI_ACTION, E.EV_EFI_VARIABLE_DRIVER_CONFIG,
                   E.EV_EFI_VARIABLE_AUTHORITY}
    checked = 0
    for profile in ("golden", "secureboot-disabled"):
        for e in events_of(profile):
            if e.event_type in data_hashed:
                assert e.digest(SHA1) == hashlib.sha1(e.data).digest()
                assert e.digest(SHA256) == hashlib.sha256(e.data).digest()
                checked += 1
            elif e.event_type == E.EV_EFI_VARIABLE_BOOT:  # EDK II: the variable's value only
                assert e.digest(SHA256) == hashlib.sha256(_variable(e.data)[2]).digest()
                checked += 1
    assert checked > 30


def test_secure_boot_variables() -> None:
    golden = [_variable(e.data) for e in events_of("golden")
              if e.event_type == EventType.EV_EFI_VARIABLE_DRIVER_CONFIG]
    assert [(g, n) for g, n, _ in golden] == [
        (ew.EFI_GLOBAL_VARIABLE_GUID.bytes_le, "SecureBoot"), (ew.EFI_GLOBAL_VARIABLE_GUID.bytes_le, "PK"),
        (ew.EFI_GLOBAL_VARIABLE_GUID.bytes_le, "KEK"),
        (ew.EFI_IMAGE_SECURITY_DATABASE_GUID.bytes_le, "db"),
        (ew.EFI_IMAGE_SECURITY_DATABASE_GUID.bytes_le, "dbx")]
    assert golden[0][2] == b"\x01"
    # db is an EFI_SIGNATURE_LIST of X.509 certificates holding the vendor certificate.
    db = golden[3][2]
    assert db[:16] == ew.EFI_CERT_X509_GUID.bytes_le and db.endswith(certificate_der("vendor"))
    authority = [_variable(e.data) for e in events_of("golden")
                 if e.event_type == EventType.EV_EFI_VARIABLE_AUTHORITY]
    assert len(authority) == 1 and authority[0][1] == "db"
    assert authority[0][2][16:] == certificate_der("vendor")  # EFI_SIGNATURE_DATA: owner + cert

    disabled = events_of("secureboot-disabled")
    sb = [_variable(e.data) for e in disabled if e.event_type == EventType.EV_EFI_VARIABLE_DRIVER_CONFIG]
    assert sb[0][1:] == ("SecureBoot", b"\x00")
    assert not [e for e in disabled if e.event_type == EventType.EV_EFI_VARIABLE_AUTHORITY]


def test_image_events_measure_the_images() -> None:
    media = BootMedia.from_specs(golden_profile().image_specs())
    events = events_of("golden")
    apps = [e for e in events if e.event_type == EventType.EV_EFI_BOOT_SERVICES_APPLICATION]
    assert [a.digest(SHA256) for a in apps] == [hashlib.sha256(media.bootloader).digest(),
                                                hashlib.sha256(media.kernel).digest()]
    for app, image in zip(apps, (media.bootloader, media.kernel), strict=True):
        location, length, link, path_len = struct.unpack_from("<QQQQ", app.data, 0)
        assert location != 0 and link == 0
        assert length == len(image) and path_len == len(app.data) - 32
        assert app.data.endswith(b"\x7f\xff\x04\x00")
    blob = next(e for e in events if e.event_type == EventType.EV_EFI_PLATFORM_FIRMWARE_BLOB2)
    assert blob.digest(SHA256) == hashlib.sha256(media.firmware).digest()
    desc_len = blob.data[0]
    assert struct.unpack_from("<Q", blob.data, 1 + desc_len + 8)[0] == len(media.firmware)
    crtm = events[0]
    assert crtm.data == "EdgeSim Firmware 1.2.0\x00".encode("utf-16-le")


def test_grub_measurements() -> None:
    media = BootMedia.from_specs(golden_profile().image_specs())
    ipl = [e for e in events_of("golden") if e.event_type == EventType.EV_IPL]
    pcr8 = [e for e in ipl if e.pcr == 8]
    for e in pcr8:  # "<kind>: <text>\0", digest over <text> (what tpm2-tools verifies for PCR 8)
        assert e.data.endswith(b"\x00")
        text = e.data[:-1].split(b" ", 1)[1]
        assert e.digest(SHA256) == hashlib.sha256(text).digest()
    assert pcr8[1].data.startswith(b"kernel_cmdline: BOOT_IMAGE=/vmlinuz root=")
    pcr9 = {e.data: e.digest(SHA256) for e in ipl if e.pcr == 9}
    assert pcr9 == {b"(hd0,gpt1)/vmlinuz\x00": hashlib.sha256(media.kernel).digest(),
                    b"(hd0,gpt1)/initrd.img\x00": hashlib.sha256(media.initrd).digest()}
    rootfs, agent = (e for e in ipl if e.pcr in (13, 14))
    assert rootfs.digest(SHA256) == hashlib.sha256(media.rootfs).digest()
    assert agent.digest(SHA256) == hashlib.sha256(media.agent_config).digest()


def test_crtm_version_of_garbage_firmware() -> None:
    assert crtm_version(b"garbage") == "EdgeSim Firmware (unknown build)"


def test_startup_locality_event_is_optional_and_changes_no_pcr() -> None:
    with_event = events_of("golden-startup-locality")
    assert with_event[0].event_type == EventType.EV_NO_ACTION
    assert with_event[0].data == b"StartupLocality\x00\x00"
    assert with_event[1:] == events_of("golden")
    assert reference_pcrs("golden-startup-locality") == reference_pcrs("golden")


# --- profiles (no TPM) ------------------------------------------------------------------------------


def test_every_profile_has_an_expected_difference() -> None:
    assert set(PROFILES) == set(EXPECTED_DIFF)
    for name in ("golden", "tampered-bootloader", "tampered-kernel", "rolled-back-firmware",
                 "secureboot-disabled"):
        assert name in PROFILES


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_reference_values_differ_from_golden_in_exactly_the_expected_pcrs(name: str) -> None:
    ref = reference_pcrs(name)
    assert set(ref) == set(BANKS)
    assert set(ref["sha256"]) == set(MEASURED_PCRS)
    assert diff_pcrs(ref, reference_pcrs("golden")) == EXPECTED_DIFF[name]


def test_reference_values_are_copies() -> None:
    ref = reference_pcrs("golden")
    ref["sha256"][0] = b"x"
    assert reference_pcrs("golden")["sha256"][0] != b"x"


def test_profile_json_round_trip_and_validation() -> None:
    for profile in PROFILES.values():
        assert Profile.from_dict(json.loads(json.dumps(profile.to_dict()))) == profile
    broken = PROFILES["golden"].to_dict()
    broken["secure_boot"] = "yes"
    with pytest.raises(ConfigError):
        Profile.from_dict(broken)
    with pytest.raises(ConfigError):
        Profile.from_dict({"name": "x"})
    with pytest.raises(ConfigError):
        get_profile("no-such-profile")


def test_pcrs_to_json_form() -> None:
    js = pcrs_to_json({"sha256": {10: b"\x01" * 32, 2: b"\xab" * 32}})
    assert js == {"pcrs": {"sha256": {"2": "ab" * 32, "10": "01" * 32}}}


# --- real devices on swtpm --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def device(tmp_path_factory: pytest.TempPathFactory, manufacturer_ca: ManufacturerCA
           ) -> Iterator[SimulatedDevice]:
    """One device for the per-profile tests (reflashed and rebooted by each)."""
    dev = SimulatedDevice.create(tmp_path_factory.mktemp("module-device") / "dev", ca=manufacturer_ca)
    try:
        yield dev
    finally:
        dev.destroy()


def _boot_and_check(dev: SimulatedDevice, name: str) -> dict[str, dict[int, bytes]]:
    """Boot ``name``; check tpm2_eventlog replay == tpm2_pcrread == reference; return the TPM PCRs."""
    record = dev.boot(name)
    tpm = tpm2_pcrread(dev.tcti)
    replayed, stderr = tpm2_eventlog(dev.eventlog_path)
    reference = reference_pcrs(name)
    assert tpm == reference
    assert record.pcrs == reference
    assert dev.read_pcrs() == reference  # the ESAPI reader agrees with tpm2-tools
    if get_profile(name).log_startup_locality:
        # tpm2-tools 5.4 wrongly extends EV_NO_ACTION digests after the header into PCR 0;
        # every other PCR must still agree.
        assert {b: {i: v for i, v in vals.items() if i != 0} for b, vals in replayed.items()} == \
               {b: {i: v for i, v in vals.items() if i != 0} for b, vals in tpm.items()}
    else:
        assert replayed == tpm
    # tpm2_eventlog verifies digests against event data for CRTM version, separators, Secure Boot
    # variables and GRUB strings in PCR 8: none may mismatch.  Its only complaint is a heuristic:
    # it expects EV_IPL only in PCRs 8, 9, 12 and 14, and we use PCR 13 for the root filesystem.
    assert "does not match" not in stderr and "unexpected format" not in stderr, stderr
    warnings = [line for line in stderr.splitlines() if line.strip()]
    assert len(warnings) == 1 and "not extending either PCR" in warnings[0], stderr
    assert dev.eventlog_path.read_bytes() == record.eventlog
    return tpm


@pytest.mark.swtpm
@pytest.mark.parametrize("name", sorted(PROFILES))
def test_profile_boot_matches_tpm_eventlog_and_reference(device: SimulatedDevice, name: str) -> None:
    _boot_and_check(device, name)
    assert device.profile.name == name
    for component in COMPONENTS:  # the device booted the profile's images from disk
        expected = generate_image(getattr(device.profile, component.replace("-", "_")))
        assert device.image_path(component).read_bytes() == expected


@pytest.mark.swtpm
@pytest.mark.parametrize("name", sorted(set(PROFILES) - {"golden"}))
def test_profile_differs_from_golden_in_exactly_the_expected_pcrs_on_the_tpm(
        device: SimulatedDevice, name: str) -> None:
    golden = _boot_and_check(device, "golden")
    other = _boot_and_check(device, name)
    assert diff_pcrs(golden, other) == EXPECTED_DIFF[name]


@pytest.mark.swtpm
@pytest.mark.parametrize("name", sorted(PROFILES))
def test_project_parser_replay_of_device_logs_matches_the_tpm(device: SimulatedDevice, name: str) -> None:
    parser = pytest.importorskip("fleet_server.verifier.eventlog")
    device.boot(name)
    log = parser.parse_eventlog(device.eventlog_path.read_bytes())  # with digest verification
    assert parser.replay(log) == tpm2_pcrread(device.tcti)


@pytest.mark.swtpm
def test_power_cycle_resets_pcrs_and_reproduces_the_boot(tmp_path: Path, manufacturer_ca: ManufacturerCA
                                                         ) -> None:
    with SimulatedDevice.create(tmp_path / "dev", ca=manufacturer_ca) as dev:
        first = dev.boot()
        before = tpm2_pcrread(dev.tcti, (*MEASURED_PCRS, 16))
        log_before = dev.eventlog_path.read_bytes()
        # Runtime activity after boot: PCR 16 (debug) and PCR 4 extended once more.
        env = {**os.environ, "TPM2TOOLS_TCTI": dev.tcti}
        for pcr in (4, 16):
            subprocess.run(["tpm2_pcrextend", f"{pcr}:sha256=" + "11" * 32], env=env, check=True)
        dirty = tpm2_pcrread(dev.tcti, (4, 16))
        assert dirty["sha256"][4] != before["sha256"][4] and dirty["sha256"][16] != bytes(32)

        # Power off and on without booting: every PCR is back to its reset value (zero).
        dev.shutdown()
        dev.swtpm.start()
        reset = tpm2_pcrread(dev.tcti, (*MEASURED_PCRS, 16))
        assert all(v == bytes(len(v)) for bank in reset.values() for v in bank.values())

        second = dev.power_cycle()
        after = tpm2_pcrread(dev.tcti, (*MEASURED_PCRS, 16))
        assert after == before
        assert after["sha256"][16] == bytes(32)
        assert second.events == first.events
        assert dev.eventlog_path.read_bytes() == log_before
    assert not pids_mentioning(str(tmp_path / "dev"))


@pytest.mark.swtpm
def test_two_golden_devices_share_pcrs_but_not_ek_certificates(tmp_path: Path,
                                                                manufacturer_ca: ManufacturerCA) -> None:
    from cryptography import x509

    with SimulatedDevice.create(tmp_path / "a", ca=manufacturer_ca) as a, \
            SimulatedDevice.create(tmp_path / "b", ca=manufacturer_ca) as b:
        a.boot()
        b.boot()
        assert tpm2_pcrread(a.tcti) == tpm2_pcrread(b.tcti) == reference_pcrs("golden")
        assert a.eventlog_path.read_bytes() == b.eventlog_path.read_bytes()
        certs = {}
        for name, dev in (("a", a), ("b", b)):
            res = subprocess.run(["tpm2_nvread", "0x01c00002"], capture_output=True, check=True,
                                 env={**os.environ, "TPM2TOOLS_TCTI": dev.tcti})
            certs[name] = res.stdout
            assert dev.ek_certificate("rsa") == res.stdout
            assert dev.ek_certificate("ecc") != res.stdout
        assert certs["a"] != certs["b"]
        cert_a = x509.load_der_x509_certificate(certs["a"])
        cert_b = x509.load_der_x509_certificate(certs["b"])
        assert cert_a.public_key() != cert_b.public_key()
        issuer = x509.load_pem_x509_certificate(manufacturer_ca.issuer_cert.read_bytes())
        assert cert_a.issuer == cert_b.issuer == issuer.subject


@pytest.mark.swtpm
def test_attacker_replacing_the_kernel_on_disk_is_measured(tmp_path: Path,
                                                           manufacturer_ca: ManufacturerCA) -> None:
    with SimulatedDevice.create(tmp_path / "dev", ca=manufacturer_ca) as dev:
        dev.boot()
        evil = b"attacker's kernel"
        dev.write_image("kernel", evil)
        assert dev.profile.name == "golden"  # the flashed profile is unchanged, the disk is not
        record = dev.power_cycle()
        tpm = tpm2_pcrread(dev.tcti)
        assert tpm == record.pcrs
        assert diff_pcrs(tpm, reference_pcrs("golden")) == {4, 9}
        apps = [e for e in record.events if e.event_type == EventType.EV_EFI_BOOT_SERVICES_APPLICATION]
        assert apps[1].digest(SHA256) == hashlib.sha256(evil).digest()
        replayed, _ = tpm2_eventlog(dev.eventlog_path)
        assert replayed == tpm

        dev.reflash("golden")  # a legitimate re-install restores the golden state at next boot
        dev.power_cycle()
        assert tpm2_pcrread(dev.tcti) == reference_pcrs("golden")


@pytest.mark.swtpm
def test_destroy_stops_swtpm_and_removes_the_folder(tmp_path: Path, manufacturer_ca: ManufacturerCA) -> None:
    folder = tmp_path / "doomed"
    dev = SimulatedDevice.create(folder, ca=manufacturer_ca)
    dev.boot()
    assert pids_mentioning(str(folder))  # the check below can fail: swtpm is visible in /proc
    dev.destroy()
    assert not pids_mentioning(str(folder))
    assert not folder.exists()
    assert not dev.running


@pytest.mark.swtpm
def test_context_manager_stops_swtpm_even_on_error(tmp_path: Path, manufacturer_ca: ManufacturerCA) -> None:
    folder = tmp_path / "dev"
    with pytest.raises(RuntimeError), SimulatedDevice.create(folder, ca=manufacturer_ca) as dev:
        dev.boot()
        assert pids_mentioning(str(folder))
        raise RuntimeError("boom")
    assert not pids_mentioning(str(folder))
    assert SimulatedDevice(folder).profile.name == "golden"  # the folder stays; reopenable
    SimulatedDevice(folder).destroy()


def test_create_refuses_a_non_empty_folder(tmp_path: Path, manufacturer_ca: ManufacturerCA) -> None:
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError):
        SimulatedDevice.create(tmp_path / "dev", ca=manufacturer_ca)
    assert (tmp_path / "dev" / "keep.txt").read_text() == "mine"
    with pytest.raises(ConfigError):
        SimulatedDevice(tmp_path / "dev")  # not a device


def test_boot_fails_cleanly_without_images(tmp_path: Path, manufacturer_ca: ManufacturerCA) -> None:
    dev = SimulatedDevice.create(tmp_path / "dev", ca=manufacturer_ca)
    dev.image_path("initrd").unlink()
    with pytest.raises(ConfigError):
        dev.boot()
    assert not dev.running and not pids_mentioning(str(tmp_path / "dev"))
    assert set(IMAGE_FILES.values()) - {p.name for p in dev.images_dir.iterdir()} == {"initrd.img"}


# --- CLI --------------------------------------------------------------------------------------------


def test_cli_profiles(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["profiles"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert names == list(PROFILES)


def test_cli_reference_json_and_text(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["device", "reference", "--profile", "tampered-kernel", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {"profile": "tampered-kernel", **pcrs_to_json(reference_pcrs("tampered-kernel"))}
    assert cli.main(["device", "reference", "--profile", "golden", "--bank", "sha256"]) == 0
    assert parse_pcr_yaml(capsys.readouterr().out) == {"sha256": reference_pcrs("golden")["sha256"]}


@pytest.mark.parametrize("argv", [["device", "reference", "--profile", "nope"],
                                  ["device", "show", "/nonexistent/device"],
                                  ["device", "boot", "/nonexistent/device"]])
def test_cli_errors_are_one_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("firmware-sim: ") and err.count("\n") == 1 and "Traceback" not in err


def test_cli_usage_error_exits_2() -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["device", "create"])
    assert info.value.code == 2


def test_cli_commands_registry_is_extensible(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    def register(sub: object) -> None:
        p = sub.add_parser("hello")  # type: ignore[attr-defined]
        p.set_defaults(handler=lambda args: print("hi") or 0)

    monkeypatch.setitem(cli.COMMANDS, "hello", f"{__name__}:_registered_hello")
    monkeypatch.setitem(globals(), "_registered_hello", register)
    assert cli.main(["hello"]) == 0
    assert capsys.readouterr().out == "hi\n"


@pytest.mark.swtpm
def test_cli_create_show_reflash_destroy(tmp_path: Path, manufacturer_ca: ManufacturerCA,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "dev"
    assert cli.main(["device", "create", str(folder), "--profile", "secureboot-disabled",
                     "--ca", str(manufacturer_ca.directory)]) == 0
    assert SimulatedDevice(folder).profile.name == "secureboot-disabled"
    assert cli.main(["device", "reflash", str(folder), "--profile", "golden"]) == 0
    assert cli.main(["device", "show", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "profile:    golden" in out
    kernel_hash = hashlib.sha256(generate_image(golden_profile().kernel)).hexdigest()
    assert kernel_hash in out
    assert cli.main(["device", "destroy", str(folder)]) == 0
    assert not folder.exists()


@pytest.mark.swtpm
def test_cli_boot_runs_until_interrupted(tmp_path: Path, manufacturer_ca: ManufacturerCA) -> None:
    folder = tmp_path / "dev"
    SimulatedDevice.create(folder, ca=manufacturer_ca, profile="tampered-kernel")
    proc = subprocess.Popen([sys.executable, "-m", "firmware_sim.cli", "device", "boot", str(folder)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        tcti = proc.stdout.readline().strip()  # the TCTI is printed once the boot is measured
        assert tcti.startswith("swtpm:host=127.0.0.1,port="), proc.stderr.read() if proc.stderr else ""
        assert tpm2_pcrread(tcti) == reference_pcrs("tampered-kernel")
        assert pids_mentioning(str(folder / "tpm"))
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert not pids_mentioning(str(folder / "tpm"))
    SimulatedDevice(folder).destroy()


def test_model_build_writes_a_loadable_classifier_deterministically(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np
    import onnxruntime as ort

    from fleet_server.modelstore.onnxio import inspect_onnx

    first, second = tmp_path / "a.onnx", tmp_path / "b.onnx"
    assert cli.main(["model", "build", str(first), "--seed", "4"]) == 0
    assert cli.main(["model", "build", str(second), "--seed", "4"]) == 0
    out = capsys.readouterr().out
    assert first.read_bytes() == second.read_bytes()  # same seed, same bytes
    assert hashlib.sha256(first.read_bytes()).hexdigest() in out
    signature = inspect_onnx(first.read_bytes())  # what `fleet-server model publish` accepts
    assert [(t.name, t.dtype) for t in signature.inputs] == [("input", "float32")]
    session = ort.InferenceSession(first.read_bytes(), providers=["CPUExecutionProvider"])
    scores = session.run(None, {"input": np.zeros((2, 16), dtype=np.float32)})[0]
    assert scores.shape == (2, 10)

    assert cli.main(["model", "build", str(first)]) == 1  # exists: never overwritten silently
    assert "exists" in capsys.readouterr().err
    assert first.read_bytes() == second.read_bytes()
    assert cli.main(["model", "build", str(tmp_path / "absent" / "m.onnx")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a folder" in err
