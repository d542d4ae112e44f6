"""Writer for TCG PC Client crypto-agile binary event logs, and the UEFI structures events carry.

This is the simulator's counterpart of the log a UEFI firmware hands to the OS (on Linux:
``/sys/kernel/security/tpm0/binary_bios_measurements``).  Pure code, no I/O except :meth:`write`.

Layout (TCG PC Client Platform Firmware Profile (PFP) Specification, Family "2.0", Level 00,
Revision 1.05; all integers little-endian):

* The first record is a SHA-1-format ``TCG_PCClientPCREvent`` (PFP 10.2.1): ``pcrIndex`` 0,
  ``eventType`` EV_NO_ACTION, a 20-byte zero digest, and as event data the
  ``TCG_EfiSpecIDEvent`` (PFP 10.4.5.1) whose signature ``"Spec ID Event03"`` announces the
  crypto-agile format and lists the hash algorithms (here SHA-1 and SHA-256) with their sizes.
* Every further record is a ``TCG_PCR_EVENT2`` (PFP 10.2.2): ``pcrIndex`` (UINT32), ``eventType``
  (UINT32), ``TPML_DIGEST_VALUES`` (UINT32 count, then count x ``TPMT_HA`` = UINT16 algorithm id +
  digest, in the order of the Spec ID event), ``eventSize`` (UINT32) and the event data.
* EV_NO_ACTION records (PFP 10.4.5) are informational: their digests are zero and are never
  extended.  The optional StartupLocality event (PFP 10.4.5.3) tells a verifier the locality of
  TPM2_Startup, which sets the initial value of PCR 0.

Event-data builders here produce the UEFI structures of PFP 10.2.3-10.2.6 and the UEFI
specification (EFI_GUID, device paths, EFI_LOAD_OPTION, EFI_SIGNATURE_LIST).  Which bytes an
event's digest covers is the caller's choice (``measured=``): for most event types the PFP says it
is the event data itself, for image and blob events it is the measured code.
"""

from __future__ import annotations

import os
import struct
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from protocol.errors import EventLogError
from protocol.tpm.constants import HASH_ALGS, Alg, EventType, digest_size, hash_name, new_hash

# --- constants ------------------------------------------------------------------------------------

#: Signature of the TCG_EfiSpecIDEvent of a crypto-agile log (PFP 10.4.5.1), NUL-terminated, 16 bytes.
SPEC_ID_SIGNATURE = b"Spec ID Event03\x00"
#: Signature of the TCG_EfiStartupLocalityEvent (PFP 10.4.5.3), NUL-terminated, 16 bytes.
STARTUP_LOCALITY_SIGNATURE = b"StartupLocality\x00"
#: PFP 10.4.5.1: platformClass 0 = client platform, spec version 2.0, errata 0 as in 1.05 logs.
SPEC_VERSION_MAJOR = 2
SPEC_VERSION_MINOR = 0
SPEC_ERRATA = 0
#: PFP 10.4.5.1 uintnSize: 1 = UINT32, 2 = UINT64 (a 64-bit UEFI firmware).
UINTN_SIZE_UINT64 = 2
#: EV_SEPARATOR event data of a normal boot (PFP 3.3.2.2 / 10.4.1): four zero bytes.  An error
#: separator would be 0x00000001.
SEPARATOR_DATA = b"\x00\x00\x00\x00"
#: Highest PCR index a PC Client TPM has (PFP 3.3.3: PCRs 0-23).
MAX_PCR = 23
#: Banks this project's logs carry, in log order.
DEFAULT_BANKS: tuple[int, ...] = (Alg.SHA1, Alg.SHA256)

# GUIDs (UEFI specification 2.x, sections 3.3 and 32.4.1).
EFI_GLOBAL_VARIABLE_GUID = uuid.UUID("8be4df61-93ca-11d2-aa0d-00e098032b8c")
EFI_IMAGE_SECURITY_DATABASE_GUID = uuid.UUID("d719b2cb-3d3a-4596-a3bc-dad00e67656f")
EFI_CERT_X509_GUID = uuid.UUID("a5c059a1-94e4-4aa7-87b5-ab155c2bf072")
EFI_CERT_SHA256_GUID = uuid.UUID("c1c41626-504c-4092-aca9-41f936934328")

#: EFI_LOAD_OPTION attribute LOAD_OPTION_ACTIVE (UEFI specification 3.1.3).
LOAD_OPTION_ACTIVE = 0x00000001

_HEADER = struct.Struct("<II20sI")  # TCG_PCClientPCREvent fixed part (PFP 10.2.1)


# --- primitive encoders ---------------------------------------------------------------------------


def ucs2(text: str, *, terminate: bool = True) -> bytes:
    """UCS-2 little-endian encoding (UEFI CHAR16), NUL-terminated unless ``terminate`` is False.

    Raises :class:`EventLogError` for characters outside the Basic Multilingual Plane, which
    CHAR16 cannot represent.
    """
    if any(ord(c) > 0xFFFF for c in text):
        raise EventLogError(f"{text!r} has characters outside UCS-2")
    data = text.encode("utf-16-le")
    return data + b"\x00\x00" if terminate else data


def efi_guid(value: uuid.UUID) -> bytes:
    """An EFI_GUID: the first three fields little-endian, the last 8 bytes as is (UEFI App. A)."""
    return value.bytes_le


# --- UEFI structures carried as event data ---------------------------------------------------------


def uefi_variable_data(vendor_guid: uuid.UUID, name: str, data: bytes) -> bytes:
    """UEFI_VARIABLE_DATA (PFP 10.2.6): VariableName GUID, UINT64 UnicodeNameLength (characters,
    no terminator), UINT64 VariableDataLength, CHAR16 UnicodeName[], BYTE VariableData[]."""
    name16 = ucs2(name, terminate=False)
    return (efi_guid(vendor_guid) + struct.pack("<QQ", len(name16) // 2, len(data)) + name16 + data)


def uefi_platform_firmware_blob2(description: bytes, base: int, length: int) -> bytes:
    """UEFI_PLATFORM_FIRMWARE_BLOB2 (PFP 10.2.5): UINT8 BlobDescriptionSize, BYTE
    BlobDescription[], UEFI_PHYSICAL_ADDRESS (UINT64) BlobBase, UINT64 BlobLength."""
    if len(description) > 0xFF:
        raise EventLogError("firmware blob description longer than 255 bytes")
    return struct.pack("<B", len(description)) + description + struct.pack("<QQ", base, length)


def uefi_image_load_event(location: int, length: int, link_time_address: int,
                          device_path: bytes) -> bytes:
    """UEFI_IMAGE_LOAD_EVENT (PFP 10.2.3): UINT64 ImageLocationInMemory, UINT64
    ImageLengthInMemory, UINT64 ImageLinkTimeAddress, UINT64 LengthOfDevicePath, then the
    EFI_DEVICE_PATH_PROTOCOL bytes."""
    return struct.pack("<QQQQ", location, length, link_time_address, len(device_path)) + device_path


def startup_locality_event(locality: int) -> bytes:
    """TCG_EfiStartupLocalityEvent (PFP 10.4.5.3): 16-byte signature, UINT8 StartupLocality."""
    if not 0 <= locality <= 4:
        raise EventLogError(f"startup locality {locality} is not 0-4")
    return STARTUP_LOCALITY_SIGNATURE + bytes([locality])


def device_path_node(node_type: int, subtype: int, payload: bytes) -> bytes:
    """One EFI_DEVICE_PATH_PROTOCOL node: UINT8 Type, UINT8 SubType, UINT16 Length (UEFI 10.2)."""
    return struct.pack("<BBH", node_type, subtype, 4 + len(payload)) + payload


def hard_drive_node(partition: int, start_lba: int, size_lba: int, partition_guid: uuid.UUID) -> bytes:
    """Media / Hard Drive node for a GPT partition (UEFI 10.3.5.1; MBRType 2 = GPT,
    SignatureType 2 = GUID)."""
    payload = struct.pack("<IQQ", partition, start_lba, size_lba) + efi_guid(partition_guid) + b"\x02\x02"
    return device_path_node(0x04, 0x01, payload)


def file_path_node(path: str) -> bytes:
    """Media / File Path node: a NUL-terminated CHAR16 path (UEFI 10.3.5.4)."""
    return device_path_node(0x04, 0x04, ucs2(path))


def end_of_device_path() -> bytes:
    """End Entire Device Path node (UEFI 10.3.1)."""
    return device_path_node(0x7F, 0xFF, b"")


def efi_load_option(description: str, device_path: bytes, *, attributes: int = LOAD_OPTION_ACTIVE,
                    optional_data: bytes = b"") -> bytes:
    """EFI_LOAD_OPTION, the value of a Boot#### variable (UEFI 3.1.3): UINT32 Attributes,
    UINT16 FilePathListLength, CHAR16 Description[] (NUL-terminated), FilePathList, OptionalData."""
    return (struct.pack("<IH", attributes, len(device_path)) + ucs2(description) + device_path
            + optional_data)


def efi_signature_list(signature_type: uuid.UUID, entries: Sequence[tuple[uuid.UUID, bytes]]) -> bytes:
    """EFI_SIGNATURE_LIST (UEFI 32.4.1) of equally sized EFI_SIGNATURE_DATA entries
    (SignatureOwner GUID + SignatureData), with an empty SignatureHeader."""
    if not entries:
        return b""
    sizes = {len(data) for _, data in entries}
    if len(sizes) != 1:
        raise EventLogError("EFI_SIGNATURE_LIST entries must all have the same size")
    signature_size = 16 + sizes.pop()
    body = b"".join(efi_signature_data(owner, data) for owner, data in entries)
    header = efi_guid(signature_type) + struct.pack("<III", 28 + len(body), 0, signature_size)
    return header + body


def efi_signature_data(owner: uuid.UUID, data: bytes) -> bytes:
    """EFI_SIGNATURE_DATA (UEFI 32.4.1): SignatureOwner GUID followed by the signature data."""
    return efi_guid(owner) + data


# --- events and the log ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LogEvent:
    """One TCG_PCR_EVENT2 record: the PCR, the event type, one digest per bank, the event data."""

    pcr: int
    event_type: int
    digests: tuple[tuple[int, bytes], ...]  # (TPM_ALG_ID, digest), in the log's bank order
    data: bytes

    def digest(self, alg: int) -> bytes:
        """The digest for bank ``alg``; raises KeyError if the event has none."""
        for a, d in self.digests:
            if a == alg:
                return d
        raise KeyError(alg)

    @property
    def extends(self) -> bool:
        """False for EV_NO_ACTION: such events are logged but never extended (PFP 10.4.5)."""
        return self.event_type != EventType.EV_NO_ACTION

    def encode(self) -> bytes:
        """The TCG_PCR_EVENT2 bytes (PFP 10.2.2)."""
        parts = [struct.pack("<III", self.pcr, self.event_type, len(self.digests))]
        for alg, digest in self.digests:
            parts.append(struct.pack("<H", alg) + digest)
        parts.append(struct.pack("<I", len(self.data)))
        parts.append(self.data)
        return b"".join(parts)


def spec_id_event(banks: Sequence[int] = DEFAULT_BANKS, *, platform_class: int = 0,
                  uintn_size: int = UINTN_SIZE_UINT64, vendor_info: bytes = b"") -> bytes:
    """The TCG_EfiSpecIDEvent structure (PFP 10.4.5.1): signature, UINT32 platformClass, UINT8
    specVersionMinor/Major, UINT8 specErrata, UINT8 uintnSize, UINT32 numberOfAlgorithms,
    {UINT16 algorithmId, UINT16 digestSize}[], UINT8 vendorInfoSize, BYTE vendorInfo[]."""
    if not banks:
        raise EventLogError("a crypto-agile log needs at least one hash algorithm")
    if len(vendor_info) > 0xFF:
        raise EventLogError("vendorInfo longer than 255 bytes")
    out = SPEC_ID_SIGNATURE + struct.pack("<IBBBBI", platform_class, SPEC_VERSION_MINOR,
                                          SPEC_VERSION_MAJOR, SPEC_ERRATA, uintn_size, len(banks))
    for alg in banks:
        out += struct.pack("<HH", alg, digest_size(alg))
    return out + struct.pack("<B", len(vendor_info)) + vendor_info


def header_record(spec_id: bytes) -> bytes:
    """The SHA-1-format first record that carries the Spec ID event (PFP 10.2.1, 10.4.5.1)."""
    return _HEADER.pack(0, EventType.EV_NO_ACTION, b"\x00" * 20, len(spec_id)) + spec_id


class EventLogWriter:
    """Accumulates events of one boot and serialises them as a crypto-agile TCG event log.

    Every extending event gets one digest per bank in ``banks`` (default SHA-1 and SHA-256),
    computed over ``measured`` or, if not given, over the event data itself.
    """

    def __init__(self, banks: Sequence[int] = DEFAULT_BANKS, *, vendor_info: bytes = b"") -> None:
        for alg in banks:
            if alg not in HASH_ALGS:
                raise EventLogError(f"unsupported hash algorithm 0x{alg:04x}")
        if len(set(banks)) != len(banks):
            raise EventLogError("duplicate hash algorithm in banks")
        self.banks: tuple[int, ...] = tuple(banks)
        self._spec_id = spec_id_event(self.banks, vendor_info=vendor_info)
        self._events: list[LogEvent] = []

    @property
    def events(self) -> tuple[LogEvent, ...]:
        """The TCG_PCR_EVENT2 events added so far (the Spec ID header is not among them)."""
        return tuple(self._events)

    @property
    def spec_id(self) -> bytes:
        """The TCG_EfiSpecIDEvent structure of the header record."""
        return self._spec_id

    def extend(self, pcr: int, event_type: int, data: bytes, *, measured: bytes | None = None) -> LogEvent:
        """Log an event whose digests are the hashes of ``measured`` (default: of ``data``)."""
        content = data if measured is None else measured
        digests = {}
        for alg in self.banks:
            h = new_hash(alg)
            h.update(content)
            digests[alg] = h.digest()
        return self.add(pcr, event_type, data, digests)

    def add(self, pcr: int, event_type: int, data: bytes, digests: Mapping[int, bytes]) -> LogEvent:
        """Log an event with precomputed digests (one per bank, of the right sizes)."""
        if not 0 <= pcr <= MAX_PCR:
            raise EventLogError(f"PCR index {pcr} is not 0-{MAX_PCR}")
        if not 0 <= event_type <= 0xFFFFFFFF:
            raise EventLogError(f"event type {event_type} does not fit a UINT32")
        if len(data) > 0xFFFFFFFF:
            raise EventLogError("event data too large for a UINT32 size")
        if set(digests) != set(self.banks):
            raise EventLogError("an event needs exactly one digest per bank of the log")
        ordered = []
        for alg in self.banks:
            d = bytes(digests[alg])
            if len(d) != digest_size(alg):
                raise EventLogError(f"{hash_name(alg)} digest has {len(d)} bytes, not {digest_size(alg)}")
            ordered.append((alg, d))
        event = LogEvent(pcr, int(event_type), tuple(ordered), bytes(data))
        self._events.append(event)
        return event

    def no_action(self, data: bytes, *, pcr: int = 0) -> LogEvent:
        """Log an EV_NO_ACTION event: zero digests, never extended (PFP 10.4.5)."""
        return self.add(pcr, EventType.EV_NO_ACTION, data,
                        {alg: b"\x00" * digest_size(alg) for alg in self.banks})

    def to_bytes(self) -> bytes:
        """The whole binary log: the Spec ID header record, then every TCG_PCR_EVENT2."""
        return header_record(self._spec_id) + b"".join(e.encode() for e in self._events)

    def write(self, path: Path) -> None:
        """Write the log to ``path`` atomically (readers never see a half-written log)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(self.to_bytes())
        os.replace(tmp, path)

    def replay(self) -> dict[str, dict[int, bytes]]:
        """The PCR values extending these events into reset PCRs yields (see :func:`replay`)."""
        return replay(self._events, self.banks)


def startup_locality_of(events: Iterable[LogEvent]) -> int:
    """The locality of the StartupLocality event in PCR 0, or 0 if the log has none (PFP 10.4.5.3)."""
    for e in events:
        if (e.event_type == EventType.EV_NO_ACTION and e.pcr == 0
                and e.data[:16] == STARTUP_LOCALITY_SIGNATURE and len(e.data) >= 17):
            return e.data[16]
    return 0


def replay(events: Iterable[LogEvent], banks: Sequence[int] = DEFAULT_BANKS) -> dict[str, dict[int, bytes]]:
    """Replay events into software PCRs: ``PCR_new = H(PCR_old || digest)`` per bank (TPM 2.0 Part 1,
    17.2 "Extend"), starting from all zeros except PCR 0, whose last byte is the startup locality
    (PFP 10.4.5.3).  Only PCRs some event extends appear in the result: bank name -> index -> value.
    """
    events = list(events)
    locality = startup_locality_of(events)
    result: dict[str, dict[int, bytes]] = {hash_name(alg): {} for alg in banks}
    for e in events:
        if not e.extends:
            continue
        for alg in banks:
            pcrs = result[hash_name(alg)]
            size = digest_size(alg)
            if e.pcr not in pcrs:
                initial = bytearray(size)
                if e.pcr == 0:
                    initial[-1] = locality
                pcrs[e.pcr] = bytes(initial)
            h = new_hash(alg)
            h.update(pcrs[e.pcr])
            h.update(e.digest(alg))
            pcrs[e.pcr] = h.digest()
    return {bank: dict(sorted(values.items())) for bank, values in result.items()}
