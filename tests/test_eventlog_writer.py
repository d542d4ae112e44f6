"""The TCG event log writer: byte layout per the PC Client PFP 1.05, UEFI structures, round trips.

The layout checks decode bytes by hand from the spec's field tables (not with the writer's own
code); round trips go through an independent minimal decoder, through tpm2-tools'
``tpm2_eventlog`` and, when present, through the project's parser.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import struct
import subprocess
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from firmware_sim import eventlog_writer as ew
from firmware_sim.eventlog_writer import EventLogWriter, LogEvent, replay
from protocol.errors import EventLogError
from protocol.tpm.constants import Alg, EventType

SHA1, SHA256 = int(Alg.SHA1), int(Alg.SHA256)


# --- an independent decoder, written from the PFP tables -------------------------------------------


def decode_log(data: bytes) -> tuple[bytes, list[tuple[int, int, list[tuple[int, bytes]], bytes]]]:
    """(spec id event data, [(pcr, type, [(alg, digest)], data)]) of a crypto-agile log."""
    pcr, etype, digest, size = struct.unpack_from("<II20sI", data, 0)
    assert (pcr, etype, digest) == (0, 3, b"\x00" * 20)
    spec = data[32:32 + size]
    (count,) = struct.unpack_from("<I", spec, 24)
    sizes = dict(struct.unpack_from("<HH", spec, 28 + 4 * i) for i in range(count))
    off = 32 + size
    events = []
    while off < len(data):
        pcr, etype, n = struct.unpack_from("<III", data, off)
        off += 12
        digests = []
        for _ in range(n):
            (alg,) = struct.unpack_from("<H", data, off)
            digests.append((alg, data[off + 2:off + 2 + sizes[alg]]))
            off += 2 + sizes[alg]
        (esize,) = struct.unpack_from("<I", data, off)
        events.append((pcr, etype, digests, data[off + 4:off + 4 + esize]))
        off += 4 + esize
    assert off == len(data)
    return spec, events


def parse_pcr_yaml(text: str) -> dict[str, dict[int, bytes]]:
    """PCR values from the ``pcrs:`` YAML of tpm2_eventlog or the output of tpm2_pcrread, parsed as
    text (a YAML reader would turn ``0x...`` into integers and drop leading zeros)."""
    pcrs: dict[str, dict[int, bytes]] = {}
    bank: str | None = None
    for line in text.splitlines():
        m = re.match(r"^\s+(sha1|sha256|sha384|sha512|sm3_256)\s*:\s*$", line)
        if m:
            bank = m.group(1)
            pcrs[bank] = {}
            continue
        m = re.match(r"^\s+(\d+)\s*:\s*0x([0-9A-Fa-f]+)\s*$", line)
        if m and bank is not None:
            pcrs[bank][int(m.group(1))] = bytes.fromhex(m.group(2))
    return pcrs


def tpm2_eventlog(path: Path) -> tuple[dict[str, dict[int, bytes]], str]:
    """Run tpm2_eventlog; return the PCRs it replays and its stderr (fails on a parse error)."""
    res = subprocess.run(["tpm2_eventlog", str(path)], capture_output=True, check=False)
    # Event data is echoed as is: decode leniently, only the pcrs section matters.
    stdout = res.stdout.decode(errors="replace")
    stderr = res.stderr.decode(errors="replace")
    assert res.returncode == 0, stderr
    marker = stdout.rfind("\npcrs:\n")
    if marker < 0:  # printed only when some event extends a PCR
        return {}, stderr
    return parse_pcr_yaml(stdout[marker:]), stderr


needs_tpm2_tools = pytest.mark.skipif(shutil.which("tpm2_eventlog") is None, reason="tpm2-tools missing")


# --- header -----------------------------------------------------------------------------------------


def test_header_record_layout() -> None:
    data = EventLogWriter().to_bytes()
    # TCG_PCClientPCREvent (PFP 10.2.1): pcrIndex, eventType, SHA-1 digest, eventDataSize.
    pcr, etype, digest, size = struct.unpack_from("<II20sI", data, 0)
    assert (pcr, etype, digest) == (0, EventType.EV_NO_ACTION, bytes(20))
    assert size == 37 == len(data) - 32  # an empty log is the header alone
    spec = data[32:]
    # TCG_EfiSpecIDEvent (PFP 10.4.5.1).
    assert spec[:16] == b"Spec ID Event03\x00"
    platform_class, minor, major, errata, uintn, count = struct.unpack_from("<IBBBBI", spec, 16)
    assert (platform_class, minor, major, errata, uintn, count) == (0, 0, 2, 0, 2, 2)
    assert struct.unpack_from("<HHHH", spec, 28) == (SHA1, 20, SHA256, 32)
    assert spec[36] == 0  # vendorInfoSize


def test_header_lists_banks_in_the_given_order_with_vendor_info() -> None:
    data = EventLogWriter([SHA256, SHA1], vendor_info=b"edge").to_bytes()
    spec = data[32:]
    assert struct.unpack_from("<HHHH", spec, 28) == (SHA256, 32, SHA1, 20)
    assert spec[36] == 4 and spec[37:] == b"edge"


@pytest.mark.parametrize("banks", [[], [SHA1, SHA1], [0x1234]])
def test_writer_rejects_bad_bank_lists(banks: list[int]) -> None:
    with pytest.raises(EventLogError):
        EventLogWriter(banks)


# --- TCG_PCR_EVENT2 ---------------------------------------------------------------------------------


def test_event2_layout() -> None:
    w = EventLogWriter()
    ev = w.extend(4, EventType.EV_EFI_ACTION, b"Calling EFI Application from Boot Option")
    raw = w.to_bytes()[32 + 37:]
    assert raw == ev.encode()
    pcr, etype, count = struct.unpack_from("<III", raw, 0)
    assert (pcr, etype, count) == (4, 0x80000007, 2)
    assert struct.unpack_from("<H", raw, 12)[0] == SHA1
    assert raw[14:34] == hashlib.sha1(b"Calling EFI Application from Boot Option").digest()
    assert struct.unpack_from("<H", raw, 34)[0] == SHA256
    assert raw[36:68] == hashlib.sha256(b"Calling EFI Application from Boot Option").digest()
    assert struct.unpack_from("<I", raw, 68)[0] == 40
    assert raw[72:] == b"Calling EFI Application from Boot Option"


def test_measured_bytes_replace_event_data_for_the_digest() -> None:
    w = EventLogWriter()
    ev = w.extend(9, EventType.EV_IPL, b"(hd0,gpt1)/vmlinuz\x00", measured=b"kernel bytes")
    assert ev.digest(SHA256) == hashlib.sha256(b"kernel bytes").digest()
    assert ev.data == b"(hd0,gpt1)/vmlinuz\x00"


def test_no_action_events_have_zero_digests_and_are_not_replayed() -> None:
    w = EventLogWriter()
    ev = w.no_action(b"anything")
    assert ev.digests == ((SHA1, bytes(20)), (SHA256, bytes(32)))
    assert not ev.extends
    assert w.replay() == {"sha1": {}, "sha256": {}}


@pytest.mark.parametrize("pcr", [-1, 24])
def test_writer_rejects_pcr_out_of_range(pcr: int) -> None:
    with pytest.raises(EventLogError):
        EventLogWriter().extend(pcr, EventType.EV_IPL, b"")


def test_writer_rejects_wrong_digests() -> None:
    w = EventLogWriter()
    with pytest.raises(EventLogError):
        w.add(0, EventType.EV_IPL, b"", {SHA1: bytes(20)})  # a bank missing
    with pytest.raises(EventLogError):
        w.add(0, EventType.EV_IPL, b"", {SHA1: bytes(20), SHA256: bytes(20)})  # wrong size
    assert w.events == ()


# --- replay -----------------------------------------------------------------------------------------


def test_replay_is_the_tpm_extend_chain() -> None:
    w = EventLogWriter()
    a = w.extend(7, EventType.EV_SEPARATOR, ew.SEPARATOR_DATA)
    b = w.extend(7, EventType.EV_EFI_ACTION, b"x")
    pcr = bytes(32)
    for ev in (a, b):
        pcr = hashlib.sha256(pcr + ev.digest(SHA256)).digest()
    result = w.replay()
    assert result["sha256"] == {7: pcr}
    sep1 = hashlib.sha1(b"\x00" * 4).digest()
    assert sep1.hex() == "9069ca78e7450a285173431b3e52c5c25299e473"  # the well-known separator
    assert result["sha1"][7] == hashlib.sha1(hashlib.sha1(bytes(20) + sep1).digest()
                                             + hashlib.sha1(b"x").digest()).digest()


def test_startup_locality_sets_the_initial_value_of_pcr0() -> None:
    w = EventLogWriter()
    w.no_action(ew.startup_locality_event(3))
    ev = w.extend(0, EventType.EV_S_CRTM_VERSION, ew.ucs2("v"))
    initial = bytes(31) + b"\x03"  # PFP 10.4.5.3: last byte = locality
    assert w.replay()["sha256"][0] == hashlib.sha256(initial + ev.digest(SHA256)).digest()
    assert ew.startup_locality_of(w.events) == 3


def test_startup_locality_event_layout() -> None:
    assert ew.startup_locality_event(0) == b"StartupLocality\x00\x00"
    with pytest.raises(EventLogError):
        ew.startup_locality_event(5)


def test_replay_rejects_events_without_a_requested_bank() -> None:
    w = EventLogWriter([SHA256])
    w.extend(0, EventType.EV_SEPARATOR, ew.SEPARATOR_DATA)
    with pytest.raises(KeyError):
        replay(w.events, [SHA1])


# --- UEFI structures --------------------------------------------------------------------------------


def test_ucs2_strings() -> None:
    assert ew.ucs2("PK") == b"P\x00K\x00\x00\x00"
    assert ew.ucs2("PK", terminate=False) == b"P\x00K\x00"
    with pytest.raises(EventLogError):
        ew.ucs2("\U0001f600")


def test_efi_guid_is_mixed_endian() -> None:
    # UEFI App. A: Data1 (UINT32), Data2, Data3 (UINT16) little-endian; Data4 bytes as written.
    assert ew.efi_guid(ew.EFI_GLOBAL_VARIABLE_GUID).hex() == "61dfe48bca93d211aa0d00e098032b8c"


def test_uefi_variable_data_layout() -> None:
    data = ew.uefi_variable_data(ew.EFI_GLOBAL_VARIABLE_GUID, "SecureBoot", b"\x01")
    assert data[:16] == ew.EFI_GLOBAL_VARIABLE_GUID.bytes_le
    assert struct.unpack_from("<QQ", data, 16) == (10, 1)  # characters, not bytes; no terminator
    assert data[32:52] == "SecureBoot".encode("utf-16-le")
    assert data[52:] == b"\x01"
    assert len(data) == 53


def test_uefi_platform_firmware_blob2_layout() -> None:
    data = ew.uefi_platform_firmware_blob2(b"FV MAIN", 0xFF000000, 0x18000)
    assert data[0] == 7 and data[1:8] == b"FV MAIN"
    assert struct.unpack_from("<QQ", data, 8) == (0xFF000000, 0x18000)
    assert len(data) == 24
    with pytest.raises(EventLogError):
        ew.uefi_platform_firmware_blob2(b"x" * 256, 0, 0)


def test_uefi_image_load_event_and_device_path_layout() -> None:
    part = uuid.UUID("3f0e4b6a-1c2d-4e5f-8a9b-0c1d2e3f4a5b")
    path = ew.hard_drive_node(1, 2048, 4096, part) + ew.file_path_node("\\a.efi") + ew.end_of_device_path()
    # Hard drive node: type 4, subtype 1, length 42 (UEFI 10.3.5.1).
    assert path[:4] == b"\x04\x01\x2a\x00"
    assert struct.unpack_from("<IQQ", path, 4) == (1, 2048, 4096)
    assert path[24:40] == part.bytes_le and path[40:42] == b"\x02\x02"
    # File path node: type 4, subtype 4, length 4 + UCS-2 path with terminator.
    assert path[42:46] == b"\x04\x04" + struct.pack("<H", 4 + 14)
    assert path[46:60] == "\\a.efi\x00".encode("utf-16-le")
    assert path[60:] == b"\x7f\xff\x04\x00"
    data = ew.uefi_image_load_event(0x7E000000, 1234, 0, path)
    assert struct.unpack_from("<QQQQ", data, 0) == (0x7E000000, 1234, 0, len(path))
    assert data[32:] == path


def test_efi_load_option_layout() -> None:
    path = ew.file_path_node("\\x") + ew.end_of_device_path()
    data = ew.efi_load_option("Linux", path)
    attributes, path_len = struct.unpack_from("<IH", data, 0)
    assert (attributes, path_len) == (ew.LOAD_OPTION_ACTIVE, len(path))
    assert data[6:18] == "Linux\x00".encode("utf-16-le")
    assert data[18:] == path


def test_efi_signature_list_layout() -> None:
    owner = uuid.UUID(int=1)
    entries = [(owner, b"a" * 32), (owner, b"b" * 32)]
    data = ew.efi_signature_list(ew.EFI_CERT_SHA256_GUID, entries)
    assert data[:16] == ew.EFI_CERT_SHA256_GUID.bytes_le
    list_size, header_size, sig_size = struct.unpack_from("<III", data, 16)
    assert (list_size, header_size, sig_size) == (len(data), 0, 48)
    assert data[28:44] == owner.bytes_le and data[44:76] == b"a" * 32
    assert data[76:92] == owner.bytes_le and data[92:] == b"b" * 32
    assert ew.efi_signature_list(ew.EFI_CERT_SHA256_GUID, []) == b""
    with pytest.raises(EventLogError):
        ew.efi_signature_list(ew.EFI_CERT_X509_GUID, [(owner, b"a"), (owner, b"bb")])


# --- round trips ------------------------------------------------------------------------------------

_event_types = st.sampled_from([EventType.EV_IPL, EventType.EV_SEPARATOR, EventType.EV_EFI_ACTION,
                                EventType.EV_EFI_BOOT_SERVICES_APPLICATION, EventType.EV_POST_CODE])
_events = st.lists(st.tuples(st.integers(0, 23), _event_types, st.binary(max_size=64)), max_size=25)
# tpm2_eventlog checks the structure of typed event data (e.g. UEFI_IMAGE_LOAD_EVENT): random data
# only for types it treats as opaque.
_opaque_events = st.lists(
    st.tuples(st.integers(0, 23),
              st.sampled_from([EventType.EV_IPL, EventType.EV_SEPARATOR, EventType.EV_EFI_ACTION,
                               EventType.EV_COMPACT_HASH]),
              st.binary(max_size=64)),
    max_size=25)


def _build(events: list[tuple[int, EventType, bytes]]) -> EventLogWriter:
    w = EventLogWriter()
    for pcr, etype, data in events:
        w.extend(pcr, etype, data)
    return w


@given(_events)
def test_round_trip_through_an_independent_decoder(events: list[tuple[int, EventType, bytes]]) -> None:
    w = _build(events)
    spec, decoded = decode_log(w.to_bytes())
    assert spec == w.spec_id
    assert [(p, t, d) for p, t, _, d in decoded] == [(p, int(t), d) for p, t, d in events]
    rebuilt = [LogEvent(p, t, tuple(ds), d) for p, t, ds, d in decoded]
    assert rebuilt == list(w.events)
    assert replay(rebuilt) == w.replay()


@needs_tpm2_tools
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_opaque_events)
def test_round_trip_through_tpm2_eventlog(tmp_path: Path, events: list[tuple[int, EventType, bytes]]) -> None:
    w = _build(events)
    path = tmp_path / "log.bin"
    w.write(path)
    replayed, _ = tpm2_eventlog(path)
    # tpm2_eventlog lists only PCRs some event extends, like our replay, and omits empty banks.
    assert replayed == {bank: values for bank, values in w.replay().items() if values}


def test_write_is_atomic_and_exact(tmp_path: Path) -> None:
    w = _build([(0, EventType.EV_SEPARATOR, ew.SEPARATOR_DATA)])
    path = tmp_path / "eventlog.bin"
    path.write_bytes(b"old")
    w.write(path)
    assert path.read_bytes() == w.to_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["eventlog.bin"]


def test_round_trip_through_the_project_parser() -> None:
    parser = pytest.importorskip("fleet_server.verifier.eventlog")
    w = EventLogWriter()
    w.no_action(ew.startup_locality_event(0))
    w.extend(0, EventType.EV_S_CRTM_VERSION, ew.ucs2("EdgeSim 1.0"))
    w.extend(7, EventType.EV_EFI_VARIABLE_DRIVER_CONFIG,
             ew.uefi_variable_data(ew.EFI_GLOBAL_VARIABLE_GUID, "SecureBoot", b"\x01"))
    for pcr in range(8):
        w.extend(pcr, EventType.EV_SEPARATOR, ew.SEPARATOR_DATA)
    log = parser.parse_eventlog(w.to_bytes())  # digest verification on
    assert log.format == "crypto-agile"
    assert tuple(log.banks) == ("sha1", "sha256")
    assert log.startup_locality == 0
    body = log.events[1:]  # events[0] is the Spec ID header
    assert [(e.pcr, e.type, bytes(e.data)) for e in body] == [(e.pcr, e.event_type, e.data)
                                                             for e in w.events]
    assert [dict(e.digests) for e in body] == [{"sha1": e.digest(SHA1), "sha256": e.digest(SHA256)}
                                               for e in w.events]
    assert parser.replay(log) == w.replay()
