"""Benchmark: parse + replay of a realistic 100-event crypto-agile (SHA-1 + SHA-256) event log.

The log is synthesized here with the shape of a UEFI + shim + GRUB boot (the reference logs in
``tests/data/eventlogs`` have this shape): Spec ID header, CRTM version and firmware blobs in PCR 0,
Secure Boot variables in PCR 7, boot variables in PCR 1, option ROM drivers in PCR 2, the GPT in PCR 5,
separators for PCRs 0-7, boot applications in PCR 4, a certificate authority event, then GRUB's
command lines (PCR 8) and files (PCR 9).  Digests the parser verifies are real hashes of the event data,
so the benchmark includes the digest checks a verifier runs (``verify_digests=True``).

``run()`` returns ``{"eventlog_replay_events_per_s": N}``: events per second through
:func:`parse_eventlog` followed by :func:`replay` of all banks, the best of several rounds.
"""

from __future__ import annotations

import hashlib
import struct
import time
import uuid

from fleet_server.verifier.eventlog import parse_eventlog, replay
from protocol.tpm.constants import Alg, EventType

_BANKS: tuple[tuple[int, str, int], ...] = ((Alg.SHA1, "sha1", 20), (Alg.SHA256, "sha256", 32))
_GLOBAL = uuid.UUID("8be4df61-93ca-11d2-aa0d-00e098032b8c")
_SECURITY_DB = uuid.UUID("d719b2cb-3d3a-4596-a3bc-dad00e67656f")


def _header() -> bytes:
    algs = b"".join(struct.pack("<HH", alg, size) for alg, _, size in _BANKS)
    spec = b"Spec ID Event03\0" + struct.pack("<IBBBBI", 0, 0, 2, 0, 2, len(_BANKS)) + algs + b"\0"
    return struct.pack("<II20sI", 0, EventType.EV_NO_ACTION, bytes(20), len(spec)) + spec


def _event(pcr: int, etype: int, data: bytes, measured: bytes | None = None) -> bytes:
    """A TCG_PCR_EVENT2 whose digests are the hashes of ``measured`` (default: the data)."""
    payload = data if measured is None else measured
    digests = b"".join(struct.pack("<H", alg) + hashlib.new(name, payload).digest()
                       for alg, name, _ in _BANKS)
    return struct.pack("<III", pcr, etype, len(_BANKS)) + digests + struct.pack("<I", len(data)) + data


def _variable(guid: uuid.UUID, name: str, value: bytes) -> bytes:
    encoded = name.encode("utf-16-le")
    return guid.bytes_le + struct.pack("<QQ", len(name), len(value)) + encoded + value


def _image(path: str, size: int) -> bytes:
    node = path.encode("utf-16-le") + b"\0\0"
    device_path = struct.pack("<BBH", 4, 4, 4 + len(node)) + node + b"\x7f\xff\x04\x00"
    return struct.pack("<QQQQ", 0x7F000000, size, 0, len(device_path)) + device_path


def realistic_log(n_events: int = 100) -> bytes:
    """A crypto-agile SHA-1 + SHA-256 log of exactly ``n_events`` records (header included, >= 60)."""
    if n_events < 60:
        raise ValueError("n_events must be at least 60")
    cert = bytes(range(256)) * 6  # stands in for a ~1.5 KiB X.509 certificate
    records: list[bytes] = [
        _header(),
        _event(0, EventType.EV_S_CRTM_VERSION, "1.0".encode("utf-16-le") + b"\0\0"),
        _event(0, EventType.EV_EFI_PLATFORM_FIRMWARE_BLOB, struct.pack("<QQ", 0x820000, 0xE0000), b"PEI"),
        _event(0, EventType.EV_EFI_PLATFORM_FIRMWARE_BLOB, struct.pack("<QQ", 0x900000, 0xB00000), b"DXE"),
        _event(7, EventType.EV_EFI_VARIABLE_DRIVER_CONFIG, _variable(_GLOBAL, "SecureBoot", b"\x01")),
        _event(7, EventType.EV_EFI_VARIABLE_DRIVER_CONFIG, _variable(_GLOBAL, "PK", cert)),
        _event(7, EventType.EV_EFI_VARIABLE_DRIVER_CONFIG, _variable(_GLOBAL, "KEK", cert)),
        _event(7, EventType.EV_EFI_VARIABLE_DRIVER_CONFIG, _variable(_SECURITY_DB, "db", cert + cert)),
        _event(7, EventType.EV_EFI_VARIABLE_DRIVER_CONFIG, _variable(_SECURITY_DB, "dbx", bytes(48) * 20)),
        _event(7, EventType.EV_SEPARATOR, bytes(4)),
    ]
    records += [_event(2, EventType.EV_EFI_BOOT_SERVICES_DRIVER, _image(f"\\rom{i}", 0x30000), b"rom%d" % i)
                for i in range(3)]
    boot_order = struct.pack("<4H", 1, 0, 2, 3)
    records.append(_event(1, EventType.EV_EFI_VARIABLE_BOOT, _variable(_GLOBAL, "BootOrder", boot_order),
                          boot_order))
    for i in range(4):
        option = struct.pack("<IH", 1, 0) + f"Boot option {i}".encode("utf-16-le") + b"\0\0"
        records.append(_event(1, EventType.EV_EFI_VARIABLE_BOOT,
                              _variable(_GLOBAL, f"Boot{i:04X}", option), option))
    records.append(_event(4, EventType.EV_EFI_ACTION, b"Calling EFI Application from Boot Option"))
    records += [_event(pcr, EventType.EV_SEPARATOR, bytes(4)) for pcr in range(7)]
    records.append(_event(5, EventType.EV_EFI_GPT_EVENT, b"EFI PART" + bytes(84) + struct.pack("<Q", 2)
                          + bytes(256)))
    records.append(_event(4, EventType.EV_EFI_BOOT_SERVICES_APPLICATION, _image("\\EFI\\BOOT\\shimx64.efi",
                                                                               0xE0000), b"shim"))
    records.append(_event(7, EventType.EV_EFI_VARIABLE_AUTHORITY, _variable(_SECURITY_DB, "db", cert)))
    records.append(_event(4, EventType.EV_EFI_BOOT_SERVICES_APPLICATION, _image("\\EFI\\BOOT\\grubx64.efi",
                                                                               0x240000), b"grub"))
    tail = [
        _event(4, EventType.EV_EFI_BOOT_SERVICES_APPLICATION, _image("\\vmlinuz", 0xB00000), b"kernel"),
        _event(5, EventType.EV_EFI_ACTION, b"Exit Boot Services Invocation"),
        _event(5, EventType.EV_EFI_ACTION, b"Exit Boot Services Returned with Success"),
    ]
    grub = n_events - len(records) - len(tail)
    for i in range(grub):
        if i % 4 == 3:
            path = f"(hd0,gpt2)/boot/grub/x86_64-efi/module{i}.mod\0".encode()
            records.append(_event(9, EventType.EV_IPL, path, b"module contents %d" % i))
        else:
            # GRUB logs "grub_cmd: <command>" but measures only the command.
            command = f"set option_{i}=value_{i}".encode()
            records.append(_event(8, EventType.EV_IPL, b"grub_cmd: " + command + b"\0", command))
    return b"".join(records + tail)


def _best_time(log: bytes, n: int, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(n):
            replay(parse_eventlog(log))
        best = min(best, time.perf_counter() - start)
    return best / n


def run(n: int = 200, rounds: int = 20, n_events: int = 100) -> dict[str, float]:
    """Events per second through parse + replay (the best of ``rounds`` runs of ``n`` logs)."""
    log = realistic_log(n_events)
    events = len(parse_eventlog(log).events)  # also proves the log is valid before timing it
    seconds = _best_time(log, n, rounds)
    return {"eventlog_replay_events_per_s": events / seconds}


if __name__ == "__main__":
    rate = run()["eventlog_replay_events_per_s"]
    print(f"eventlog_replay_events_per_s: {rate:,.0f} ({100 / rate * 1e6:.0f} µs per 100-event log)")
