"""Reference policies: built from a golden log, strict JSON, validation, event descriptions."""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable
from typing import Any

import pytest

from firmware_sim import eventlog_writer as ew
from firmware_sim.boot import MEASURED_PCRS, BootMedia, build_boot_log
from firmware_sim.profiles import get_profile, reference_pcrs
from fleet_server.appraisal.policy import (
    SIMULATOR_PCRS,
    PolicyFormatError,
    ReferenceEvent,
    ReferencePolicy,
    event_description,
    policy_from_eventlog,
)
from fleet_server.verifier.eventlog import EventLog, parse_eventlog
from protocol.tpm.constants import Alg, EventType


def boot_log(profile: str = "golden") -> EventLog:
    p = get_profile(profile)
    return parse_eventlog(build_boot_log(BootMedia.from_specs(p.image_specs()), p.boot_settings).to_bytes())


def golden_policy(**kwargs: Any) -> ReferencePolicy:
    return policy_from_eventlog(
        boot_log(), name="edge-camera-1.2.0", device_class="edge-camera", firmware_version="1.2.0", **kwargs
    )


# ---------------------------------------------------------------------------------------------
# policy_from_eventlog
# ---------------------------------------------------------------------------------------------
def test_policy_from_golden_log() -> None:
    policy = golden_policy()
    assert SIMULATOR_PCRS == MEASURED_PCRS
    assert dict(policy.selection) == {"sha256": SIMULATOR_PCRS}
    # The reference values are the software reference of the profile (an independent computation).
    assert {p: v for p, v in policy.pcrs["sha256"].items()} == reference_pcrs("golden")["sha256"]
    log = boot_log()
    extending = [ev for ev in log.events if ev.type != EventType.EV_NO_ACTION]
    assert [(e.pcr, e.type, e.digest) for e in policy.events] == [
        (ev.pcr, ev.type, ev.digests["sha256"]) for ev in extending
    ]
    by_type = {(e.pcr, e.type_name, e.description) for e in policy.events}
    assert (4, "EV_EFI_BOOT_SERVICES_APPLICATION", "\\EFI\\BOOT\\BOOTAA64.EFI") in by_type
    assert (4, "EV_EFI_BOOT_SERVICES_APPLICATION", "\\vmlinuz") in by_type
    assert (0, "EV_S_CRTM_VERSION", "EdgeSim Firmware 1.2.0") in by_type
    assert (7, "EV_EFI_VARIABLE_DRIVER_CONFIG", "SecureBoot (enabled)") in by_type
    assert [e.description for e in policy.events_by_pcr[9]] == ["(hd0,gpt1)/vmlinuz", "(hd0,gpt1)/initrd.img"]


def test_policy_selection_can_be_restricted() -> None:
    policy = golden_policy(pcrs=[0, 4, 7, 10, 23])  # 10 and 23 are not extended: dropped
    assert dict(policy.selection) == {"sha256": (0, 4, 7)}
    assert set(policy.pcrs["sha256"]) == {0, 4, 7}
    assert {e.pcr for e in policy.events} == {0, 4, 7}


def test_policy_in_the_sha1_bank() -> None:
    policy = golden_policy(bank="sha1")
    assert dict(policy.pcrs["sha1"]) == reference_pcrs("golden")["sha1"]
    assert all(len(e.digest) == 20 for e in policy.events)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pcrs": [10, 11]}, "extends none of the requested PCRs"),
        ({"bank": "sha384"}, "has no sha384 bank"),
        ({"name": "bad name"}, "policy name 'bad name' is not a valid name"),
        ({"device_class": ""}, "device class"),
        ({"firmware_version": "x" * 65}, "firmware version"),
    ],
)
def test_policy_from_eventlog_refuses(kwargs: dict[str, Any], message: str) -> None:
    base: dict[str, Any] = {"name": "p", "device_class": "c", "firmware_version": "1"}
    base.update(kwargs)
    with pytest.raises(PolicyFormatError, match=message):
        policy_from_eventlog(boot_log(), **base)


def test_startup_locality_profile_gives_the_same_reference_values() -> None:
    golden = golden_policy()
    with_locality = policy_from_eventlog(
        boot_log("golden-startup-locality"), name="p", device_class="edge-camera", firmware_version="1.2.0"
    )
    assert with_locality.pcrs == golden.pcrs
    assert with_locality.events == golden.events  # EV_NO_ACTION is never a reference event


def test_locality_3_start_is_consistent() -> None:
    writer = ew.EventLogWriter()
    writer.no_action(ew.startup_locality_event(3))
    writer.extend(0, EventType.EV_S_CRTM_VERSION, ew.ucs2("fw"))
    policy = policy_from_eventlog(
        parse_eventlog(writer.to_bytes()), name="p", device_class="c", firmware_version="1"
    )
    expected = hashlib.sha256(bytes(31) + b"\x03" + hashlib.sha256(ew.ucs2("fw")).digest()).digest()
    assert policy.pcrs["sha256"][0] == expected


# ---------------------------------------------------------------------------------------------
# JSON
# ---------------------------------------------------------------------------------------------
def test_json_round_trip_and_canonical_bytes() -> None:
    policy = golden_policy()
    doc = policy.to_json()
    assert doc["format"] == 1 and doc["bank"] == "sha256"
    assert doc["selection"] == {"sha256": list(SIMULATOR_PCRS)}
    assert doc["pcrs"]["sha256"]["4"] == policy.pcrs["sha256"][4].hex()
    assert doc["events"][0] == {
        "pcr": 0,
        "type": "EV_S_CRTM_VERSION",
        "digest": policy.events[0].digest.hex(),
        "description": "EdgeSim Firmware 1.2.0",
    }
    again = ReferencePolicy.from_json(json.loads(json.dumps(doc)))
    assert again == policy
    assert again.canonical_bytes() == policy.canonical_bytes()
    assert policy.sha256() == hashlib.sha256(policy.canonical_bytes()).hexdigest()
    assert json.loads(policy.canonical_bytes()) == doc
    assert hash(again) == hash(policy)  # frozen and hashable (read-only mappings)
    with pytest.raises(TypeError):
        policy.pcrs["sha256"][4] = bytes(32)  # type: ignore[index]
    # Any change changes the content identity.
    other = golden_policy(pcrs=[0, 4])
    assert other.sha256() != policy.sha256()


def _mutate(path: list[Any], value: Any = None, *, delete: bool = False) -> Callable[[dict[str, Any]], None]:
    def apply(doc: dict[str, Any]) -> None:
        target: Any = doc
        for key in path[:-1]:
            target = target[key]
        if delete:
            del target[path[-1]]
        else:
            target[path[-1]] = value

    return apply


BAD_JSON: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("unknown-field", _mutate(["extra"], 1), "unknown field 'extra'"),
    ("missing-field", _mutate(["bank"], delete=True), "policy.bank: missing"),
    ("format-2", _mutate(["format"], 2), "unsupported policy format 2"),
    ("format-string", _mutate(["format"], "1"), "expected an integer"),
    ("bad-name", _mutate(["name"], "a b"), "policy.name: invalid value"),
    ("unknown-bank", _mutate(["bank"], "md5"), "policy.bank: must be one of"),
    ("bank-not-selected", lambda d: d.update(bank="sha1", events=[]), "bank 'sha1' is not in its selection"),
    ("selection-duplicate", _mutate(["selection", "sha256"], [0, 0]), "distinct PCR indices"),
    ("selection-range", _mutate(["selection", "sha256"], [24]), "distinct PCR indices"),
    (
        "pcrs-missing-pcr",
        _mutate(["pcrs", "sha256", "14"], delete=True),
        "must cover exactly its selected PCRs",
    ),
    ("pcr-short", _mutate(["pcrs", "sha256", "0"], "00" * 31), "expected 32 bytes of hex"),
    ("events-not-list", _mutate(["events"], {}), "expected a list"),
    ("event-unknown-field", _mutate(["events", 0, "note"], "x"), "unknown field 'note'"),
    ("event-unknown-type", _mutate(["events", 0, "type"], "EV_BOGUS"), "unknown event type 'EV_BOGUS'"),
    ("event-no-action", _mutate(["events", 0, "type"], "EV_NO_ACTION"), "non-extending event type"),
    ("event-type-int", _mutate(["events", 0, "type"], 8), "expected a string"),
    ("event-digest-upper", _mutate(["events", 0, "digest"], "AB" * 32), "lowercase hex"),
    ("event-digest-short", _mutate(["events", 0, "digest"], "ab" * 20), "expected 32 bytes"),
    ("event-pcr-unselected", _mutate(["events", 0, "pcr"], 12), "PCR 12, which the policy does not select"),
    ("event-description-quote", _mutate(["events", 0, "description"], 'say "hi"'), "without double quotes"),
    ("event-description-newline", _mutate(["events", 0, "description"], "a\nb"), "one printable line"),
    (
        "event-digest-changed",
        _mutate(["events", 0, "digest"], "00" * 32),
        "PCR 0: the reference value is not the replay",
    ),
    ("event-dropped", lambda d: d["events"].pop(3), "PCR 7: the reference value is not the replay"),
    ("pcr-value-changed", _mutate(["pcrs", "sha256", "9"], "11" * 32), "PCR 9: the reference value is not"),
    ("not-an-object", lambda d: d.clear(), "policy.format: missing"),
]


@pytest.mark.parametrize(
    ("mutate", "message"), [(m, msg) for _, m, msg in BAD_JSON], ids=[b[0] for b in BAD_JSON]
)
def test_from_json_is_strict(mutate: Callable[[dict[str, Any]], None], message: str) -> None:
    doc = copy.deepcopy(golden_policy().to_json())
    mutate(doc)
    with pytest.raises(PolicyFormatError, match=message):
        ReferencePolicy.from_json(doc)


@pytest.mark.parametrize("value", [None, [], "policy", 3])
def test_from_json_refuses_non_objects(value: Any) -> None:
    with pytest.raises(PolicyFormatError, match="expected an object"):
        ReferencePolicy.from_json(value)


def test_value_only_policy_and_unknown_event_types() -> None:
    """A PCR without reference events is a value-only reference; unknown event types round-trip."""
    digest = hashlib.sha256(b"x").digest()
    value = hashlib.sha256(bytes(32) + digest).digest()
    policy = ReferencePolicy(
        name="p",
        device_class="c",
        firmware_version="1",
        selection={"sha256": (10, 3)},
        pcrs={"sha256": {3: b"\x42" * 32, 10: value}},
        events=(ReferenceEvent(10, 0x1234, digest, "vendor event"),),
    )
    assert policy.selection["sha256"] == (3, 10)
    doc = policy.to_json()
    assert doc["events"][0]["type"] == "EV_UNKNOWN_0x00001234"
    assert ReferencePolicy.from_json(doc) == policy
    assert policy.events_by_pcr == {10: (ReferenceEvent(10, 0x1234, digest, "vendor event"),)}


def test_drtm_pcrs_may_start_from_either_reset_value() -> None:
    digest = hashlib.sha256(b"mle").digest()
    for start in (b"\xff" * 32, bytes(32)):
        value = hashlib.sha256(start + digest).digest()
        ReferencePolicy(
            name="p",
            device_class="c",
            firmware_version="1",
            selection={"sha256": (17,)},
            pcrs={"sha256": {17: value}},
            events=(ReferenceEvent(17, 0x402, digest, "mle"),),
        )


# ---------------------------------------------------------------------------------------------
# event descriptions
# ---------------------------------------------------------------------------------------------
def _event(etype: int, data: bytes, pcr: int = 8) -> Any:
    writer = ew.EventLogWriter([Alg.SHA256])
    writer.add(pcr, etype, data, {Alg.SHA256: bytes(32)})
    return parse_eventlog(writer.to_bytes(), verify_digests=False).events[1]


DESCRIPTIONS: list[tuple[int, bytes, str]] = [
    (EventType.EV_IPL, b"grub_cmd: linux /vmlinuz\0", "grub_cmd: linux /vmlinuz"),
    (EventType.EV_EFI_ACTION, b"Exit Boot Services Invocation", "Exit Boot Services Invocation"),
    (EventType.EV_S_CRTM_VERSION, ew.ucs2("EdgeSim Firmware 1.0.0"), "EdgeSim Firmware 1.0.0"),
    (EventType.EV_SEPARATOR, bytes(4), "separator"),
    (EventType.EV_SEPARATOR, b"\x01\x00\x00\x00", "separator (error)"),
    (
        EventType.EV_EFI_VARIABLE_DRIVER_CONFIG,
        ew.uefi_variable_data(ew.EFI_GLOBAL_VARIABLE_GUID, "SecureBoot", b"\x00"),
        "SecureBoot (disabled)",
    ),
    (
        EventType.EV_EFI_VARIABLE_BOOT,
        ew.uefi_variable_data(ew.EFI_GLOBAL_VARIABLE_GUID, "BootOrder", b"\0\0"),
        "BootOrder",
    ),
    (
        EventType.EV_EFI_BOOT_SERVICES_APPLICATION,
        ew.uefi_image_load_event(
            0x1000, 10, 0, ew.file_path_node("\\EFI\\BOOT\\grubx64.efi") + ew.end_of_device_path()
        ),
        "\\EFI\\BOOT\\grubx64.efi",
    ),
    (EventType.EV_EFI_PLATFORM_FIRMWARE_BLOB2, ew.uefi_platform_firmware_blob2(b"FV MAIN", 0, 16), "FV MAIN"),
    (EventType.EV_POST_CODE, b"\x01\x02\x03", "3 bytes"),
    (0x1234, b"\xff\xfe", "2 bytes"),
    (EventType.EV_IPL, b'say "hi"\n', "say ?hi?"),
    (EventType.EV_IPL, b"x" * 400, "x" * 157 + "..."),
]


@pytest.mark.parametrize(("etype", "data", "expected"), DESCRIPTIONS)
def test_event_description(etype: int, data: bytes, expected: str) -> None:
    assert event_description(_event(etype, data)) == expected
