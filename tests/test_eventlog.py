"""TCG event log parser, replay and ``fleet-server eventlog``.

The reference for replay is tpm2-tools 5.4 (``*.bin.pcrs.json`` beside each real log, and
``tpm2_eventlog`` itself where installed).  Hostile inputs are built here byte by byte, each with the
exact one-line error it must produce.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import struct
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from fleet_server.cli import main
from fleet_server.verifier.eventlog import (
    Event,
    EventLog,
    FrozenDict,
    Replayer,
    describe_event,
    extend_eventlog,
    parse_eventlog,
    replay,
)
from protocol.errors import EventLogError, MalformedInputError
from protocol.tpm.constants import EventType as ET

# --- building logs ---------------------------------------------------------------------------------

ALG_IDS = {"sha1": 0x0004, "sha256": 0x000B, "sha384": 0x000C, "sha512": 0x000D}
SIZES = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64}


def spec_header(algs: Sequence[tuple[int, int]] = ((4, 20), (11, 32)), *, pcr: int = 0,
                digest: bytes = bytes(20), vendor: bytes = b"", count: int | None = None,
                vendor_size: int | None = None, event_size: int | None = None) -> bytes:
    """The Spec ID Event03 header record (PFP 10.4.5.1), with knobs to break it."""
    n_algs = len(algs) if count is None else count
    body = (b"Spec ID Event03\0" + struct.pack("<IBBBBI", 0, 0, 2, 0, 2, n_algs)
            + b"".join(struct.pack("<HH", a, s) for a, s in algs)
            + bytes([len(vendor) if vendor_size is None else vendor_size]) + vendor)
    size = len(body) if event_size is None else event_size
    return struct.pack("<II20sI", pcr, ET.EV_NO_ACTION, digest, size) + body


def digests_of(payload: bytes, banks: Sequence[str] = ("sha1", "sha256")) -> list[tuple[int, bytes]]:
    return [(ALG_IDS[b], hashlib.new(b, payload).digest()) for b in banks]


def ev2(pcr: int, etype: int, data: bytes, digests: Sequence[tuple[int, bytes]] | None = None, *,
        count: int | None = None, size: int | None = None) -> bytes:
    """A TCG_PCR_EVENT2 record; digests default to the hashes of ``data`` in sha1 and sha256."""
    digests = digests_of(data) if digests is None else digests
    return (struct.pack("<III", pcr, etype, len(digests) if count is None else count)
            + b"".join(struct.pack("<H", a) + d for a, d in digests)
            + struct.pack("<I", len(data) if size is None else size) + data)


def legacy(pcr: int, etype: int, data: bytes, digest: bytes | None = None) -> bytes:
    digest = hashlib.sha1(data).digest() if digest is None else digest
    return struct.pack("<II20sI", pcr, etype, digest, len(data)) + data


def uefi_variable(name: str, value: bytes, guid: bytes = bytes(range(16))) -> bytes:
    return guid + struct.pack("<QQ", len(name), len(value)) + name.encode("utf-16-le") + value


def startup_locality(locality: int, *, pcr: int = 0) -> bytes:
    return ev2(pcr, ET.EV_NO_ACTION, b"StartupLocality\0" + bytes([locality]),
               [(4, bytes(20)), (11, bytes(32))])


def extend(old: bytes, digest: bytes, bank: str) -> bytes:
    return hashlib.new(bank, old + digest).digest()


HEADER = spec_header()  # 69 bytes: 32 + 37
POST = ev2(0, ET.EV_POST_CODE, b"POST CODE", digests_of(b"the firmware volume"))  # offset 69
ACTION_DATA = b"Calling EFI Application from Boot Option"
ACTION = ev2(4, ET.EV_EFI_ACTION, ACTION_DATA)
BASE = HEADER + POST + ACTION
END = len(BASE)


def test_base_log_is_valid() -> None:
    log = parse_eventlog(BASE)
    assert log.format == "crypto-agile"
    assert log.banks == ("sha1", "sha256")
    assert dict(log.digest_sizes) == {4: 20, 11: 32}
    assert [(e.index, e.offset, e.pcr, e.type) for e in log.events] == [
        (0, 0, 0, ET.EV_NO_ACTION), (1, 69, 0, ET.EV_POST_CODE), (2, 69 + len(POST), 4, ET.EV_EFI_ACTION)]
    assert log.size == END and log.padding == 0 and log.startup_locality is None
    assert log.events[1].data == b"POST CODE"
    assert log.events[1].digests == {"sha1": hashlib.sha1(b"the firmware volume").digest(),
                                     "sha256": hashlib.sha256(b"the firmware volume").digest()}


# --- hostile input: every case has its exact one-line error ---------------------------------------

A1 = 69 + len(POST)  # offset of event 2
HOSTILE: list[tuple[str, bytes, dict[str, object], str]] = [
    ("empty", b"", {}, "event 0, offset 0: empty event log"),
    ("short", bytes(10), {}, "event 0, offset 0: truncated event header: 32 bytes needed, 10 remain"),
    ("spec zero algorithms", spec_header(()) + POST, {},
     "event 0, offset 0: Spec ID header lists zero algorithms"),
    ("spec algorithm count huge", spec_header(count=0xFFFFFFFF) + POST, {},
     "event 0, offset 0: Spec ID header lists 4294967295 algorithms, more than its 37 data bytes hold"),
    ("spec duplicate algorithm", spec_header(((4, 20), (11, 32), (4, 20))), {},
     "event 0, offset 0: Spec ID header lists algorithm 0x0004 twice"),
    ("spec wrong size of known algorithm", spec_header(((4, 20), (11, 20))), {},
     "event 0, offset 0: Spec ID header gives sha256 digest size 20, must be 32"),
    ("spec zero digest size", spec_header(((4, 20), (0x1234, 0))), {},
     "event 0, offset 0: Spec ID header gives algorithm 0x1234 digest size 0"),
    ("spec non-zero digest", spec_header(digest=b"\x01" * 20) + POST, {},
     "event 0, offset 0: Spec ID header has a non-zero digest"),
    ("spec not in PCR 0", spec_header(pcr=1) + POST, {},
     "event 0, offset 0: Spec ID header is in PCR 1, must be in PCR 0"),
    ("spec vendorInfoSize mismatch", spec_header(vendor_size=3) + POST, {},
     "event 0, offset 0: Spec ID header vendorInfoSize 3 disagrees with its event size 37"),
    ("spec size claims gigabytes", spec_header(event_size=0xFFFFFFF0) + POST, {},
     f"event 0, offset 0: Spec ID header data truncated: 4294967280 bytes declared, {37 + len(POST)} remain"),
    ("spec size too short", spec_header(event_size=20) + bytes(40), {},
     "event 0, offset 0: Spec ID header data is 20 bytes, too short"),
    ("zero digests", HEADER + ev2(0, ET.EV_POST_CODE, b"x", []), {},
     "event 1, offset 69: event has no digests"),
    ("digest count huge", HEADER + ev2(0, ET.EV_POST_CODE, b"x", count=0xFFFFFFFF), {},
     "event 1, offset 69: digest count 4294967295 exceeds the 2 algorithms of the Spec ID header"),
    ("algorithm not in header", HEADER + ev2(0, ET.EV_POST_CODE, b"x", [(0x0C, bytes(48))]), {},
     "event 1, offset 69: digest algorithm 0x000c is not in the Spec ID header"),
    ("unknown algorithm", HEADER + ev2(0, ET.EV_POST_CODE, b"x", [(0x7777, bytes(20))]), {},
     "event 1, offset 69: digest algorithm 0x7777 is not in the Spec ID header"),
    ("duplicate digest", HEADER + ev2(0, ET.EV_POST_CODE, b"x", [(4, bytes(20)), (4, bytes(20))]), {},
     "event 1, offset 69: digest algorithm sha1 appears twice"),
    ("event size claims gigabytes", HEADER + ev2(0, ET.EV_POST_CODE, b"abc", size=0xFFFFFFFF), {},
     "event 1, offset 69: event data truncated: 4294967295 bytes declared, 3 remain"),
    ("event size beyond end", BASE[:-1], {},
     f"event 2, offset {A1}: event data truncated: 40 bytes declared, 39 remain"),
    ("truncated in digest", HEADER + ev2(0, ET.EV_POST_CODE, b"x")[:50], {},
     "event 1, offset 69: truncated sha256 digest"),
    ("truncated before digest algorithm", HEADER + ev2(0, ET.EV_POST_CODE, b"x")[:35], {},
     "event 1, offset 69: truncated digest list"),
    ("truncated before eventSize", HEADER + ev2(0, ET.EV_POST_CODE, b"x")[:68], {},
     "event 1, offset 69: truncated event header: no eventSize field"),
    ("truncated header", HEADER + b"\x01\x00\x00\x00\x05", {},
     "event 1, offset 69: truncated event header: 12 bytes needed, 5 remain"),
    ("trailing garbage", BASE + b"\x01\x02\x03\x04\x05", {},
     f"event 3, offset {END}: truncated event header: 12 bytes needed, 5 remain"),
    ("trailing zero padding", BASE + bytes(16), {},
     f"event 3, offset {END}: log ends with 16 bytes of 0x00 padding (padding not allowed)"),
    ("trailing 0xff padding", BASE + b"\xff" * 100, {},
     f"event 3, offset {END}: log ends with 100 bytes of 0xff padding (padding not allowed)"),
    ("too many events", BASE, {"max_events": 2}, f"event 2, offset {A1}: more than 2 events"),
    ("separator digest", HEADER + ev2(7, ET.EV_SEPARATOR, bytes(4), digests_of(b"\xff" * 4)), {},
     "event 1, offset 69: EV_SEPARATOR: sha1 digest is not the hash of the event data"),
    ("action digest in one bank", HEADER + ev2(4, ET.EV_EFI_ACTION, b"Boot",
                                               [(4, hashlib.sha1(b"Boot").digest()), (11, bytes(32))]), {},
     "event 1, offset 69: EV_EFI_ACTION: sha256 digest is not the hash of the event data"),
    ("boot variable digest", HEADER + ev2(1, ET.EV_EFI_VARIABLE_BOOT, uefi_variable("BootOrder", b"\1\0"),
                                          digests_of(b"\2\0")), {},
     "event 1, offset 69: EV_EFI_VARIABLE_BOOT: sha1 digest is the hash of neither the event data nor its "
     "VariableData"),
    ("driver config digest", HEADER + ev2(7, ET.EV_EFI_VARIABLE_DRIVER_CONFIG, uefi_variable("PK", b""),
                                          digests_of(b"")), {},
     "event 1, offset 69: EV_EFI_VARIABLE_DRIVER_CONFIG: sha1 digest is not the hash of the event data"),
    ("crtm version digest", HEADER + ev2(0, ET.EV_S_CRTM_VERSION, b"1\0", digests_of(b"2\0")), {},
     "event 1, offset 69: EV_S_CRTM_VERSION: sha1 digest is not the hash of the event data"),
    ("gpt digest", HEADER + ev2(5, ET.EV_EFI_GPT_EVENT, b"EFI PART", digests_of(b"")), {},
     "event 1, offset 69: EV_EFI_GPT_EVENT: sha1 digest is not the hash of the event data"),
    ("startup locality after PCR 0", BASE + startup_locality(3), {},
     f"event 3, offset {END}: StartupLocality event after PCR 0 was extended"),
    ("startup locality twice", HEADER + startup_locality(3) + startup_locality(3), {},
     f"event 2, offset {69 + len(startup_locality(3))}: duplicate StartupLocality event"),
    ("startup locality bad size", HEADER + ev2(0, ET.EV_NO_ACTION, b"StartupLocality\0\3\0"), {},
     "event 1, offset 69: StartupLocality event data is 18 bytes, must be 17"),
    ("startup locality not PCR 0", HEADER + startup_locality(3, pcr=3), {},
     "event 1, offset 69: StartupLocality event is in PCR 3, must be in PCR 0"),
    ("startup locality 2", HEADER + startup_locality(2), {},
     "event 1, offset 69: StartupLocality names locality 2, must be 0, 3 or 4"),
    ("H-CRTM after PCR 0", BASE + ev2(0, ET.EV_EFI_HCRTM_EVENT, b"HCRTM"), {},
     f"event 3, offset {END}: EV_EFI_HCRTM_EVENT after PCR 0 was extended"),
    ("legacy truncated data", legacy(0, ET.EV_POST_CODE, b"abcdef")[:-2], {},
     "event 0, offset 0: event data truncated: 6 bytes declared, 4 remain"),
    ("legacy all-zero record", legacy(0, ET.EV_POST_CODE, b"a") + bytes(32) + legacy(1, 1, b"b"), {},
     "event 1, offset 33: all-zero event record"),
    ("legacy zero padding", legacy(0, ET.EV_POST_CODE, b"a") + bytes(40), {},
     "event 1, offset 33: log ends with 40 bytes of 0x00 padding (padding not allowed)"),
    ("legacy separator digest", legacy(0, ET.EV_SEPARATOR, bytes(4), bytes(20)), {},
     "event 0, offset 0: EV_SEPARATOR: sha1 digest is not the hash of the event data"),
    ("all padding", b"\xff" * 64, {"allow_padding": True},
     "event 0, offset 0: event data truncated: 4294967295 bytes declared, 32 remain"),
    ("zeros", bytes(64), {"allow_padding": True}, "event 0, offset 0: all-zero event record"),
]


@pytest.mark.parametrize(("data", "kwargs", "message"), [c[1:] for c in HOSTILE], ids=[c[0] for c in HOSTILE])
def test_hostile_input_gives_exact_one_line_error(data: bytes, kwargs: dict[str, object],
                                                  message: str) -> None:
    with pytest.raises(EventLogError) as info:
        parse_eventlog(data, **kwargs)  # type: ignore[arg-type]
    assert str(info.value) == message
    assert info.value.diagnostics() == message  # already one line
    assert info.value.index is not None and info.value.offset is not None
    assert 0 <= info.value.offset <= len(data)


def test_digest_rules_are_skipped_without_verification() -> None:
    bad = HEADER + ev2(7, ET.EV_SEPARATOR, bytes(4), digests_of(b"\xff" * 4))
    assert len(parse_eventlog(bad, verify_digests=False).events) == 2


def test_boot_variable_digest_may_cover_whole_structure_or_variable_data() -> None:
    var = uefi_variable("BootOrder", b"\1\0\2\0")
    whole = HEADER + ev2(1, ET.EV_EFI_VARIABLE_BOOT, var)  # what the PFP says
    edk2 = HEADER + ev2(1, ET.EV_EFI_VARIABLE_BOOT, var, digests_of(b"\1\0\2\0"))  # what EDK II does
    assert parse_eventlog(whole).events[1].data == var
    assert parse_eventlog(edk2).events[1].data == var


def test_authority_and_ipl_digests_are_not_enforced() -> None:
    # Old shim logs EV_EFI_VARIABLE_AUTHORITY digests over neither data nor VariableData; GRUB's EV_IPL
    # digests cover only part of the string.
    log = HEADER + ev2(7, ET.EV_EFI_VARIABLE_AUTHORITY, uefi_variable("Shim", b"cert"), digests_of(b"?"))
    log += ev2(8, ET.EV_IPL, b"grub_cmd: linux /vmlinuz\0", digests_of(b"linux /vmlinuz"))
    assert len(parse_eventlog(log).events) == 3


@pytest.mark.parametrize("fill", [b"\x00", b"\xff"])
def test_padding_is_accepted_when_allowed(fill: bytes) -> None:
    log = parse_eventlog(BASE + fill * 37, allow_padding=True)
    assert log.padding == 37 and log.size == END + 37 and len(log.events) == 3
    assert replay(log) == replay(parse_eventlog(BASE))
    with pytest.raises(EventLogError) as info:
        extend_eventlog(log, ACTION)
    assert str(info.value) == f"event 3, offset {END + 37}: cannot extend a log that ends in padding"


def test_legacy_padding_is_accepted_when_allowed() -> None:
    log = parse_eventlog(legacy(0, ET.EV_POST_CODE, b"a") + bytes(40), allow_padding=True)
    assert log.format == "sha1" and log.padding == 40 and len(log.events) == 1


def test_unknown_algorithm_in_header_is_parsed_but_not_replayed() -> None:
    header = spec_header(((4, 20), (0x1234, 24), (11, 32)))
    event = ev2(4, ET.EV_POST_CODE, b"x", [(4, b"\1" * 20), (0x1234, b"\2" * 24), (11, b"\3" * 32)])
    log = parse_eventlog(header + event)
    assert log.banks == ("sha1", "alg_0x1234", "sha256")
    assert dict(log.digest_sizes) == {4: 20, 0x1234: 24, 11: 32}
    assert log.events[1].digests["alg_0x1234"] == b"\2" * 24
    values = replay(log)
    assert set(values) == {"sha1", "sha256"}
    assert values["sha256"] == {4: extend(bytes(32), b"\3" * 32, "sha256")}
    with pytest.raises(EventLogError, match="cannot replay bank 'alg_0x1234'"):
        replay(log, ["alg_0x1234"])


def test_parse_accepts_bytes_like_and_rejects_bad_max_events() -> None:
    assert parse_eventlog(bytearray(BASE)) == parse_eventlog(memoryview(BASE)) == parse_eventlog(BASE)
    with pytest.raises(ValueError, match="max_events"):
        parse_eventlog(BASE, max_events=0)


def test_values_are_immutable_hashable_and_picklable() -> None:
    import pickle

    log = parse_eventlog(BASE)
    with pytest.raises(TypeError):
        log.events[1].digests["sha1"] = b""  # type: ignore[index]
    with pytest.raises(TypeError):
        log.digest_sizes.clear()  # type: ignore[attr-defined]
    assert isinstance(log.events[1].digests, FrozenDict)
    assert hash(log) == hash(parse_eventlog(BASE))
    assert pickle.loads(pickle.dumps(log)) == log


# --- replay semantics ------------------------------------------------------------------------------


def test_replay_extends_each_bank_and_skips_no_action() -> None:
    d1 = hashlib.sha1(b"the firmware volume").digest()
    d256 = hashlib.sha256(b"the firmware volume").digest()
    no_action = ev2(5, ET.EV_NO_ACTION, b"NvIndexInstance\0", [(4, bytes(20)), (11, bytes(32))])
    log = parse_eventlog(BASE + no_action)
    a1 = hashlib.sha1(ACTION_DATA).digest()
    a256 = hashlib.sha256(ACTION_DATA).digest()
    assert replay(log) == {
        "sha1": {0: extend(bytes(20), d1, "sha1"), 4: extend(bytes(20), a1, "sha1")},
        "sha256": {0: extend(bytes(32), d256, "sha256"), 4: extend(bytes(32), a256, "sha256")},
    }
    assert replay(log, ["sha256"]) == {"sha256": replay(log)["sha256"]}



NO_PCR = 0xFFFFFFFF  # the index firmware gives vendor / EV_NO_ACTION-like records (issue 9)
NO_PCR_EVENT = ev2(NO_PCR, ET.EV_POST_CODE, b"vendor record")


def test_event_outside_pcrs_0_to_23_is_kept_but_extends_nothing() -> None:
    # Before issue 9 the parser refused the whole log: "PCR index 4294967295 out of range 0-23".
    for extra in (NO_PCR_EVENT, ev2(24, ET.EV_EFI_ACTION, ACTION_DATA)):
        log = parse_eventlog(HEADER + POST + extra + ACTION)
        assert [(e.index, e.pcr) for e in log.events][2] == (2, struct.unpack_from("<I", extra)[0])
        assert replay(log) == replay(parse_eventlog(BASE))
        assert [describe_event(e)["extended"] for e in log.events] == [False, True, False, True]
    legacy_log = parse_eventlog(legacy(0, ET.EV_POST_CODE, b"a") + legacy(NO_PCR, ET.EV_POST_CODE, b"b"))
    assert legacy_log.events[1].pcr == NO_PCR
    assert replay(legacy_log) == replay(parse_eventlog(legacy(0, ET.EV_POST_CODE, b"a")))
    # Other malformations of such an event stay errors.
    with pytest.raises(EventLogError, match=f"event 2, offset {A1}: event has no digests"):
        parse_eventlog(HEADER + POST + ev2(NO_PCR, ET.EV_POST_CODE, b"x", []))


def test_replayer_skips_event_outside_pcrs_incrementally() -> None:
    log = parse_eventlog(BASE + NO_PCR_EVENT)
    replayer = Replayer.for_log(log)
    replayer.feed(log.events[:3])
    replayer.feed(log.events[3:])
    assert replayer.next_index == 4
    assert replayer.values() == replay(parse_eventlog(BASE))


def test_cli_replay_and_show_with_event_outside_pcrs(tmp_path: Path) -> None:
    path = tmp_path / "vendor.bin"
    path.write_bytes(HEADER + POST + NO_PCR_EVENT + ACTION)
    proc = run_cli("eventlog", "replay", str(path), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"pcrs": as_json(replay(parse_eventlog(BASE)))}
    show = run_cli("eventlog", "show", str(path))
    assert show.returncode == 0, show.stderr
    assert f"#2    PCR 0xffffffff (not extended) EV_POST_CODE  (offset {A1}, 13 data bytes)" in show.stdout
    assert show.stdout.count("not extended") == 1
    doc = json.loads(run_cli("eventlog", "show", str(path), "--json").stdout)
    assert [(e["pcr"], e["extended"]) for e in doc["events"]] == [(0, False), (0, True), (NO_PCR, False),
                                                                   (4, True)]


def test_event_with_a_subset_of_banks_extends_only_those() -> None:
    log = parse_eventlog(HEADER + ev2(3, ET.EV_POST_CODE, b"x", [(11, b"\7" * 32)]))
    assert replay(log) == {"sha1": {}, "sha256": {3: extend(bytes(32), b"\7" * 32, "sha256")}}


@pytest.mark.parametrize("locality", [0, 3, 4])
def test_startup_locality_sets_pcr0_initial_value(locality: int) -> None:
    log = parse_eventlog(HEADER + startup_locality(locality) + POST)
    assert log.startup_locality == locality
    d256 = hashlib.sha256(b"the firmware volume").digest()
    start = bytes(31) + bytes([locality])
    assert replay(log)["sha256"] == {0: extend(start, d256, "sha256")}
    # A log that only announces the locality still reports PCR 0 (its value is not the default).
    only = parse_eventlog(HEADER + startup_locality(locality))
    assert replay(only) == {"sha1": {0: bytes(19) + bytes([locality])}, "sha256": {0: start}}


def test_hcrtm_event_starts_pcr0_at_locality_4() -> None:
    digests = [(4, b"\5" * 20), (11, b"\6" * 32)]
    log = parse_eventlog(HEADER + ev2(0, ET.EV_EFI_HCRTM_EVENT, b"HCRTM", digests) + POST)
    d256 = hashlib.sha256(b"the firmware volume").digest()
    expected = extend(extend(bytes(31) + b"\4", b"\6" * 32, "sha256"), d256, "sha256")
    assert replay(log)["sha256"] == {0: expected}


def test_drtm_pcrs_start_at_all_ones_unless_a_dynamic_launch_reset_them() -> None:
    log = parse_eventlog(HEADER + ev2(17, ET.EV_POST_CODE, b"x", [(11, b"\1" * 32)]))
    assert replay(log)["sha256"] == {17: extend(b"\xff" * 32, b"\1" * 32, "sha256")}
    assert replay(log, drtm=True)["sha256"] == {17: extend(bytes(32), b"\1" * 32, "sha256")}


def test_replay_of_a_missing_bank_is_an_error() -> None:
    with pytest.raises(EventLogError, match=r"^the event log has no sha384 bank \(it has sha1, sha256\)$"):
        replay(parse_eventlog(BASE), ["sha384"])


def test_replayer_is_incremental_atomic_and_checks_order(shared_eventlogs: Path) -> None:
    log = parse_eventlog((shared_eventlogs / "event-bootorder.bin").read_bytes())
    whole = replay(log)
    r = Replayer.for_log(log)
    assert r.banks == ("sha1", "sha256") and r.next_index == 0
    r.feed(log.events[:10])
    fork = r.copy()
    with pytest.raises(EventLogError, match=r"^event 12, offset \d+: replay expected event 10 next$"):
        r.feed(log.events[12:20])
    assert r.next_index == 10  # the failed batch changed nothing
    for i in range(10, len(log.events), 7):
        r.feed(log.events[i : i + 7])
    assert r.values() == whole
    fork.feed(log.events[10:])
    assert fork.values() == whole
    with pytest.raises(EventLogError, match="replay expected event"):
        r.feed(log.events[-1:])  # feeding an event twice


def test_replayer_rejects_unknown_bank() -> None:
    with pytest.raises(EventLogError, match="cannot replay bank 'md5'"):
        Replayer(["md5"])


# --- the real logs ----------------------------------------------------------------------------------


def real_logs(folder: Path) -> list[Path]:
    logs = sorted(folder.glob("*.bin"))
    assert logs, f"no event logs in {folder}"
    return logs


def reference(path: Path) -> dict[str, Any]:
    """The tpm2-tools replay stored beside a log."""
    result: dict[str, Any] = json.loads(path.with_name(path.name + ".pcrs.json").read_text())
    return result


def as_json(values: dict[str, dict[int, bytes]]) -> dict[str, dict[str, str]]:
    return {bank: {str(p): v.hex() for p, v in pcrs.items()} for bank, pcrs in values.items() if pcrs}


def test_replay_of_real_logs_matches_tpm2_tools(shared_eventlogs: Path) -> None:
    for path in real_logs(shared_eventlogs):
        log = parse_eventlog(path.read_bytes())
        ref = reference(path)
        assert as_json(replay(log)) == ref["pcrs"], path.name
        for bank in ref["pcrs"]:
            assert as_json(replay(log, [bank])) == {bank: ref["pcrs"][bank]}, (path.name, bank)
        if log.format == "crypto-agile":
            # For the SHA-1 log the fixture's count is not an event count (tpm2-tools prints that format as
            # one YAML mapping, so counting its entries gives the number of distinct keys).
            assert len(log.events) == ref["source_events"], path.name
        assert log.size == path.stat().st_size


def test_real_logs_have_expected_formats(shared_eventlogs: Path) -> None:
    formats = {p.name: parse_eventlog(p.read_bytes()).format for p in real_logs(shared_eventlogs)}
    assert formats.get("event-uefi-sha1-log.bin") == "sha1"
    assert formats.get("event-bootorder.bin") == "crypto-agile"


def test_cli_replay_json_matches_tpm2_tools(shared_eventlogs: Path) -> None:
    for path in real_logs(shared_eventlogs):
        proc = run_cli("eventlog", "replay", str(path), "--json")
        assert proc.returncode == 0, (path.name, proc.stderr)
        assert proc.stderr == ""
        assert json.loads(proc.stdout) == {"pcrs": reference(path)["pcrs"]}, path.name


def test_extend_at_every_event_boundary_equals_whole_parse(shared_eventlogs: Path) -> None:
    for path in real_logs(shared_eventlogs):
        data = path.read_bytes()
        whole = parse_eventlog(data)
        bounds = [ev.offset for ev in whole.events[1:]] + [len(data)]
        for cut in bounds:
            prefix = parse_eventlog(data[:cut])
            assert extend_eventlog(prefix, data[cut:]) == whole, (path.name, cut)
        # Three pieces, with a replayer kept across them, as the server does within one boot.
        first, second = bounds[len(bounds) // 3], bounds[2 * len(bounds) // 3]
        log = parse_eventlog(data[:first])
        replayer = Replayer.for_log(log)
        replayer.feed(log.events)
        for piece in (data[first:second], data[second:]):
            before = len(log.events)
            log = extend_eventlog(log, piece)
            replayer.feed(log.events[before:])
        assert log == whole
        assert replayer.values() == replay(whole), path.name


def test_extend_rejects_partial_events_with_absolute_positions() -> None:
    log = parse_eventlog(HEADER + POST)
    with pytest.raises(EventLogError) as info:
        extend_eventlog(log, ACTION[:-1])
    assert str(info.value) == f"event 2, offset {A1}: event data truncated: 40 bytes declared, 39 remain"
    assert extend_eventlog(log, b"") is log


def test_extend_carries_startup_locality_rules_across_pieces() -> None:
    log = parse_eventlog(HEADER + startup_locality(3))
    with pytest.raises(EventLogError, match="duplicate StartupLocality event"):
        extend_eventlog(log, startup_locality(3))
    grown = extend_eventlog(log, POST)
    assert grown.startup_locality == 3
    assert grown == parse_eventlog(HEADER + startup_locality(3) + POST)
    with pytest.raises(EventLogError, match="after PCR 0 was extended"):
        extend_eventlog(parse_eventlog(HEADER + POST), startup_locality(3))


def test_extend_counts_max_events_over_the_whole_log() -> None:
    log = parse_eventlog(HEADER + POST, max_events=3)
    assert len(extend_eventlog(log, ACTION, max_events=3).events) == 3
    with pytest.raises(EventLogError, match=r"^event 3, offset \d+: more than 3 events$"):
        extend_eventlog(extend_eventlog(log, ACTION), ACTION, max_events=3)


def test_every_real_event_is_described_as_json(shared_eventlogs: Path) -> None:
    for path in real_logs(shared_eventlogs):
        for ev in parse_eventlog(path.read_bytes()).events:
            described = describe_event(ev)
            json.dumps(described)
            assert described["index"] == ev.index and described["pcr"] == ev.pcr
            assert "note" not in described["data"], (path.name, ev.index)  # type: ignore[operator]


def _event(log: EventLog, index: int) -> dict[str, object]:
    return describe_event(log.events[index])


def test_describe_decodes_known_structures(shared_eventlogs: Path) -> None:
    def load(name: str) -> EventLog:
        return parse_eventlog((shared_eventlogs / name).read_bytes())

    header = _event(load("event.bin"), 0)
    assert header["type_name"] == "EV_NO_ACTION"
    assert header["data"] == {
        "signature": "Spec ID Event03", "platform_class": 0, "spec_version": "2.0", "spec_errata": 0,
        "uintn_size": 2, "vendor_info": "",
        "algorithms": [{"algorithm_id": 4, "name": "sha1", "digest_size": 20},
                       {"algorithm_id": 11, "name": "sha256", "digest_size": 32},
                       {"algorithm_id": 12, "name": "sha384", "digest_size": 48},
                       {"algorithm_id": 13, "name": "sha512", "digest_size": 64}]}
    assert _event(load("event.bin"), 1)["data"] == {"blob_base": "0x900000", "blob_length": "0xb00000"}
    assert _event(load("event-uefiaction.bin"), 1)["data"] == {"text": ACTION_DATA.decode()}
    var = _event(load("event-uefivar.bin"), 1)
    assert var["type_name"] == "EV_EFI_VARIABLE_DRIVER_CONFIG"
    assert var["data"] == {"variable_guid": "8be4df61-93ca-11d2-aa0d-00e098032b8c", "name": "SecureBoot",
                           "data_length": 1, "enabled": True, "data": "01"}
    boot = load("event-bootorder.bin")
    assert _event(boot, 12)["data"]["boot_order"] == ["Boot0001", "Boot0000", "Boot0002"]  # type: ignore[index]
    option = _event(boot, 15)["data"]["load_option"]  # type: ignore[index]
    assert option["description"] == "EFI Internal Shell" and option["active"] is True
    assert _event(boot, 9)["data"] == {"value": "0x00000000", "error": False}
    grub = "grub_cmd: [ -z (hd0,gpt15)/boot/grub -o ! -e (hd0,gpt15)/boot/grub ]"
    assert _event(boot, 27)["data"] == {"text": grub}
    arch = load("event-arch-linux.bin")
    gpt = _event(arch, 17)["data"]
    assert gpt["disk_guid"] == "f9f4bb69-5418-46bb-9501-2d615a3edc79"  # type: ignore[index]
    assert [p["name"] for p in gpt["partitions"]] == ["EFI System", "Linux RAID", "Linux filesystem"]  # type: ignore[index]
    image = _event(arch, 23)["data"]
    assert image["device_path"].endswith("/\\vmlinuz-linux-lts")  # type: ignore[index]
    assert image["image_length"] == 9180448  # type: ignore[index]
    assert _event(arch, 24)["data"]["text"].startswith("initrd=\\intel-ucode.img")  # type: ignore[index]
    sha1 = load("event-uefi-sha1-log.bin")
    assert _event(sha1, 0)["data"] == {"guid": "546bfb1e-1d0c-4055-a4ad-4ef4bf17b83a"}
    assert _event(sha1, 0)["digests"] == {"sha1": "c42fedad268200cb1d15f97841c344e79dae3320"}
    tag = _event(load("event-sd-boot-fedora37.bin"), 25)["data"]
    assert tag == {"tag": "0x8f3b22ec", "size": 13, "text": "Linux initrd"}


def test_describe_startup_locality_and_garbled_data() -> None:
    log = parse_eventlog(HEADER + startup_locality(3))
    assert _event(log, 1)["data"] == {"signature": "StartupLocality", "locality": 3}
    garbled = Event(5, 0, 7, ET.EV_EFI_VARIABLE_DRIVER_CONFIG, FrozenDict(), b"\1\2\3")
    assert describe_event(garbled)["data"] == {"hex": "010203",
                                               "note": "data does not match the structure of its event type"}
    unknown = Event(5, 0, 7, 0x1234, FrozenDict(), b"\xff")
    assert describe_event(unknown)["type_name"] == "EV_UNKNOWN_0x00001234"


# --- tpm2_eventlog as an independent reader ----------------------------------------------------------


def tpm2_tools_events(path: Path) -> list[tuple[int, str, dict[str, str]]]:
    """(PCR, type name, digests) of every event, from ``tpm2_eventlog``'s YAML (read line by line: its
    SHA-1-log output is not a valid YAML sequence)."""
    text = subprocess.run(["tpm2_eventlog", str(path)], capture_output=True, text=True, check=True).stdout
    events: list[tuple[int, str, dict[str, str]]] = []
    alg = "sha1"
    for line in text.splitlines():
        if m := re.match(r"^\s*PCRIndex: (\d+)$", line):
            events.append((int(m.group(1)), "", {}))
            alg = "sha1"  # the header record and SHA-1 logs print a bare Digest
        elif (m := re.match(r"^\s*EventType: (\w+)$", line)) and events:
            events[-1] = (events[-1][0], m.group(1), events[-1][2])
        elif m := re.match(r"^\s*- AlgorithmId: (\w+)$", line):
            alg = m.group(1)
        elif (m := re.match(r'^\s*Digest: "([0-9a-f]+)"$', line)) and events:
            events[-1][2][alg] = m.group(1)
    return events


@pytest.mark.skipif(shutil.which("tpm2_eventlog") is None, reason="tpm2-tools is not installed")
def test_show_agrees_with_tpm2_eventlog(shared_eventlogs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for path in real_logs(shared_eventlogs):
        assert main(["eventlog", "show", str(path), "--json"]) == 0
        shown = json.loads(capsys.readouterr().out)
        ours = [(e["pcr"], e["type_name"], e["digests"]) for e in shown["events"]]
        theirs = tpm2_tools_events(path)
        assert len(ours) == len(theirs), path.name
        assert ours == theirs, path.name


# --- CLI contract ------------------------------------------------------------------------------------


def run_cli(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
    """Run ``fleet-server`` as a separate process, the way users and scripts do."""
    proc = subprocess.run([sys.executable, "-m", "fleet_server.cli", *args], input=stdin, capture_output=True,
                          check=False)
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode())


def test_cli_malformed_log_is_one_line_exit_1(tmp_path: Path) -> None:
    bad = tmp_path / "bad.bin"
    bad.write_bytes(HEADER + ev2(0, ET.EV_POST_CODE, b"abc", size=0xFFFFFFFF))
    for command in ("replay", "show"):
        proc = run_cli("eventlog", command, str(bad), "--json")
        assert proc.returncode == 1
        assert proc.stdout == ""
        assert proc.stderr == ("fleet-server: event 1, offset 69: event data truncated: 4294967295 bytes "
                               "declared, 3 remain\n")


def test_cli_missing_file_directory_and_oversized_file(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.bin"
    assert main(["eventlog", "replay", str(missing)]) == 1
    assert capsys.readouterr().err == f"fleet-server: cannot read {missing}: No such file or directory\n"
    assert main(["eventlog", "show", str(tmp_path)]) == 1
    assert capsys.readouterr().err == f"fleet-server: cannot read {tmp_path}: Is a directory\n"
    huge = tmp_path / "huge.bin"
    with huge.open("wb") as handle:  # sparse: costs no disk
        handle.truncate(64 * 1024 * 1024 + 1)
    assert main(["eventlog", "replay", str(huge), "--json"]) == 1
    assert capsys.readouterr().err == (f"fleet-server: {huge} is 67108865 bytes, over the 67108864-byte "
                                       "limit for event logs\n")


def test_cli_reads_unsized_input_with_a_bound() -> None:
    import io

    from fleet_server.commands import eventlog_cmd

    class Pipe(io.BytesIO):
        def fileno(self) -> int:
            raise OSError("not a file")

    assert eventlog_cmd._read_bounded(Pipe(b"x" * 100), "-", 100) == b"x" * 100
    with pytest.raises(MalformedInputError, match=r"^- is over the 99-byte limit for event logs$"):
        eventlog_cmd._read_bounded(Pipe(b"x" * 100), "-", 99)


def test_cli_usage_errors_exit_2(tmp_path: Path) -> None:
    for args in (["eventlog"], ["eventlog", "replay"], ["eventlog", "replay", "x", "--bogus"],
                 ["eventlog", "frobnicate", "x"]):
        proc = run_cli(*args)
        assert proc.returncode == 2, args
        assert "usage:" in proc.stderr


def test_cli_replay_table_bank_filter_and_stdin(shared_eventlogs: Path) -> None:
    path = shared_eventlogs / "event-gce-ubuntu-2104-log.bin"
    ref = reference(path)["pcrs"]
    table = run_cli("eventlog", "replay", str(path))
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0] == "crypto-agile event log, 112 events, banks: sha1, sha256, sha384"
    assert lines[1].split() == ["bank", "pcr", "value"]
    rows = {(b, p): v for b, p, v in (line.split() for line in lines[2:])}
    assert rows == {(b, p): v for b, pcrs in ref.items() for p, v in pcrs.items()}
    only = run_cli("eventlog", "replay", str(path), "--json", "--bank", "sha384")
    assert json.loads(only.stdout) == {"pcrs": {"sha384": ref["sha384"]}}
    piped = run_cli("eventlog", "replay", "-", "--json", stdin=path.read_bytes())
    assert piped.returncode == 0, piped.stderr
    assert json.loads(piped.stdout) == {"pcrs": ref}
    missing = run_cli("eventlog", "replay", str(path), "--bank", "sha512")
    assert missing.returncode == 1
    assert missing.stderr == "fleet-server: the event log has no sha512 bank (it has sha1, sha256, sha384)\n"


def test_cli_show_text(shared_eventlogs: Path) -> None:
    proc = run_cli("eventlog", "show", str(shared_eventlogs / "event-uefiaction.bin"))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("crypto-agile event log: 2 events, 189 bytes, "
                          "banks: sha1, sha256, sha384, sha512\n")
    assert "#1    PCR 4  EV_EFI_ACTION  (offset 77, 40 data bytes)" in out
    assert "      sha256: 3d6772b4f84ed47595d72a2c4c5ffd15f5bb72c7507fe26f2aaee2c69d5633ba" in out
    assert '"Calling EFI Application from Boot Option"' in out


def test_cli_show_json_document(shared_eventlogs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = shared_eventlogs / "event-uefi-sha1-log.bin"
    assert main(["eventlog", "show", str(path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    keys = ("format", "banks", "digest_sizes", "size", "padding", "startup_locality")
    assert {k: doc[k] for k in keys} == {
        "format": "sha1", "banks": ["sha1"], "digest_sizes": {"4": 20}, "size": 9870, "padding": 0,
        "startup_locality": None}
    assert len(doc["events"]) == 17
    assert doc["events"][16]["type_name"] == "EV_EFI_BOOT_SERVICES_APPLICATION"


def test_cli_padding_and_verification_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    padded = tmp_path / "padded.bin"
    padded.write_bytes(BASE + bytes(8))
    assert main(["eventlog", "replay", str(padded), "--json"]) == 1
    assert "padding not allowed" in capsys.readouterr().err
    assert main(["eventlog", "replay", str(padded), "--json", "--allow-padding"]) == 0
    assert json.loads(capsys.readouterr().out) == {"pcrs": as_json(replay(parse_eventlog(BASE)))}
    tampered = tmp_path / "tampered.bin"
    tampered.write_bytes(HEADER + ev2(7, ET.EV_SEPARATOR, bytes(4), digests_of(b"\xff" * 4)))
    assert main(["eventlog", "show", str(tampered)]) == 1
    assert capsys.readouterr().err == ("fleet-server: event 1, offset 69: EV_SEPARATOR: sha1 digest is not "
                                       "the hash of the event data\n")
    assert main(["eventlog", "show", str(tampered), "--no-verify-digests"]) == 0


def test_continuation_errors_name_the_offset_in_the_whole_log(shared_eventlogs: Path) -> None:
    data = (shared_eventlogs / "event-arch-linux.bin").read_bytes()
    whole = parse_eventlog(data)
    cut = whole.events[10].offset
    head = parse_eventlog(data[:cut])
    with pytest.raises(EventLogError, match=f"event 10, offset {cut}: truncated"):
        extend_eventlog(head, data[cut : cut + 7])
