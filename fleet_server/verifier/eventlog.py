"""TCG PC Client firmware event log: strict parser, digest checks and PCR replay.

Pure code, no I/O: bytes in, frozen dataclasses out, or :class:`~protocol.errors.EventLogError` with a
one-line message naming the event index and byte offset.  Spec references are to the TCG PC Client
Platform Firmware Profile Specification (PFP), Family "2.0", Level 00, Revision 1.05, and to the
TCG PC Client Platform TPM Profile (PTP) for TPM 2.0.

Formats
-------
* **crypto-agile** (PFP 10.2.2): the first record is a legacy ``TCG_PCClientPCREvent`` (PFP 10.2.1)
  with PCR 0, EV_NO_ACTION, a zero SHA-1-sized digest and, as data, a ``TCG_EfiSpecIDEvent``
  (PFP 10.4.5.1, signature ``"Spec ID Event03"``) listing ``(algorithmId, digestSize)`` pairs.  Every
  further record is a ``TCG_PCR_EVENT2``: pcrIndex, eventType, ``TPML_DIGEST_VALUES``, eventSize, data.
* **sha1** (legacy, PFP 10.2.1): ``TCG_PCClientPCREvent`` records throughout.  A log whose first
  record is not a Spec ID Event03 is parsed in this format.

Decisions (each enforced by :func:`parse_eventlog`)
---------------------------------------------------
* Digest sizes come from the Spec ID header.  An algorithm the project does not know is accepted if
  the header gives its size (non-zero): its digests are parsed, kept under the bank name
  ``"alg_0x<id>"`` and never replayed or verified (no hash function).  A known algorithm whose
  header size differs from its real size, a zero size, a duplicate algorithm or zero algorithms
  is an error, as is an event digest whose algorithm the header does not list.
* An event may carry a *subset* of the header's banks (real logs do; tpm2-tools accepts it), each
  algorithm at most once, in any order; a bank absent from an event is not extended by it.
* An event whose PCR index is outside 0-23 (the 24 PCRs of a PC Client TPM, PTP "PCR Initial and
  Reset Values") is kept, with its index, but extends nothing: real firmware logs contain vendor and
  EV_NO_ACTION-like records with index 0xFFFFFFFF, and refusing them made the whole log unusable.
  :func:`extends_pcr` says whether an event is extended; appraisal uses it too.
* EV_NO_ACTION records are never extended (PFP 10.4.5).  A ``StartupLocality`` EV_NO_ACTION
  (PFP 10.4.5.3: 16-byte signature ``"StartupLocality\\0"`` + UINT8 locality) must be in PCR 0,
  appear at most once and before any PCR 0 measurement, and name locality 0, 3 or 4 (TPM2_Startup is
  only allowed from 0 or 3; 4 marks an H-CRTM).  An EV_EFI_HCRTM_EVENT in PCR 0 must precede every
  other PCR 0 measurement (TPM 2.0 Part 1, "H-CRTM": _TPM_Hash_Start/_TPM_Hash_End run before
  TPM2_Startup).
* Trailing bytes that do not form a complete event are an error.  A run of only 0x00 or only 0xFF
  bytes starting at an event boundary (padding of a raw firmware log area) is accepted only with
  ``allow_padding=True`` and then recorded in :attr:`EventLog.padding`.  None of the reference logs
  has padding, and Linux's ``binary_bios_measurements`` never includes it.  In a SHA-1 log an
  all-zero record (PCR 0, type 0, zero digest, no data) is where Linux stops reading, so it only
  counts as padding.

Digest checks (``verify_digests=True``)
---------------------------------------
Enforced only where the PFP says the digest is the hash of the event data *and* every reference
log (``tpm2-tools`` fixtures from real machines and VMs) complies; checked in every bank we can hash:

=============================== ==============================================================
EV_SEPARATOR                    H(event data) (PFP 10.4.1)
EV_EFI_ACTION                   H(action string) (PFP 10.4.1, 10.4.4)
EV_S_CRTM_VERSION               H(event data) (PFP 10.4.1)
EV_EFI_VARIABLE_DRIVER_CONFIG   H(UEFI_VARIABLE_DATA) (PFP 10.4.1, 10.2.6)
EV_EFI_GPT_EVENT                H(UEFI_GPT_DATA) (PFP 10.4.1)
EV_EFI_VARIABLE_BOOT / BOOT2    H(UEFI_VARIABLE_DATA) *or* H(VariableData): the PFP says the
                                whole structure, EDK II hashes only VariableData (both occur in
                                the reference logs, 21 and 18 events)
=============================== ==============================================================

Not enforced: EV_EFI_VARIABLE_AUTHORITY (older shim logs its vendor certificate with digests that
match neither the data nor VariableData: event-postcode.bin events 40 and 54); EV_IPL (GRUB and
systemd hash strings differently from what they log; tpm2-tools' own heuristic fails on
event-arch-linux.bin event 24); image, blob, handoff-table and POST code events (the digest covers
code or memory not in the log); EV_NO_ACTION (not extended).

Replay
------
``PCR_new = H(PCR_old || digest)`` per bank (TPM 2.0 Part 1, "PCR Extend").  Initial values follow
the PTP: all zeros, except PCRs 17-22 (DRTM) which are all 0xFF until a dynamic launch resets them
(``drtm=True`` starts them at zero instead), and PCR 0 whose last byte is the StartupLocality
locality, or 4 when an H-CRTM event is logged.  :func:`replay` reports a PCR in a bank when at
least one event extends it in that bank, plus PCR 0 in every bank when the log sets its initial value
(StartupLocality or H-CRTM).  tpm2-tools would additionally list PCRs touched only by EV_NO_ACTION
digests (with their initial value); no reference log has such an event.

Incremental use
---------------
A verifier that keeps a device's appraised log within one boot calls :func:`extend_eventlog` with
only the bytes appended since (cost O(len(more)) for parsing) and feeds only the new events to a
:class:`Replayer` it kept, instead of replaying from scratch.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import ipaddress
import struct
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

from protocol.errors import EventLogError
from protocol.tpm.constants import HASH_ALGS, Alg, EventType, event_type_name

__all__ = [
    "DEFAULT_MAX_EVENTS",
    "DRTM_PCRS",
    "NUM_PCRS",
    "Event",
    "EventLog",
    "FrozenDict",
    "Replayer",
    "bank_name",
    "describe_event",
    "extend_eventlog",
    "extends_pcr",
    "iter_descriptions",
    "parse_eventlog",
    "replay",
    "replayable_banks",
]

DEFAULT_MAX_EVENTS = 100_000
#: A PC Client TPM has 24 PCRs (PTP, "PCR Initial and Reset Values").
NUM_PCRS = 24
#: PCRs reset to all ones at TPM2_Startup and to zero by a dynamic launch (PTP, same table).
DRTM_PCRS = range(17, 23)

SPEC_ID_SIGNATURE = b"Spec ID Event03\x00"  # PFP 10.4.5.1
STARTUP_LOCALITY_SIGNATURE = b"StartupLocality\x00"  # PFP 10.4.5.3
_STARTUP_LOCALITIES = frozenset({0, 3, 4})
_HCRTM_LOCALITY = 4

_EV_NO_ACTION = int(EventType.EV_NO_ACTION)
_EV_HCRTM = int(EventType.EV_EFI_HCRTM_EVENT)

_LEGACY = struct.Struct("<II20sI")  # TCG_PCClientPCREvent: pcrIndex, eventType, digest, eventDataSize
_EV2_HEAD = struct.Struct("<III")  # TCG_PCR_EVENT2: pcrIndex, eventType, TPML_DIGEST_VALUES.count
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_SPEC_ID_FIXED = struct.Struct("<16sIBBBBI")  # signature .. numberOfAlgorithms (28 bytes)
_ALG_SIZE = struct.Struct("<HH")  # TCG_EfiSpecIdEventAlgorithmSize
_ZERO20 = bytes(20)

_K = TypeVar("_K")
_V = TypeVar("_V")


class FrozenDict(dict[_K, _V]):
    """A read-only, hashable, picklable ``dict`` (lookups run at plain-dict speed)."""

    __slots__ = ()

    def _readonly(self, *args: object, **kwargs: object) -> NoReturn:
        raise TypeError(f"{type(self).__name__} is read-only")

    __setitem__ = _readonly
    __delitem__ = _readonly
    __ior__ = _readonly
    clear = _readonly
    pop = _readonly
    popitem = _readonly
    setdefault = _readonly
    update = _readonly

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(frozenset(self.items()))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (dict(self),))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dict.__repr__(self)})"


@dataclass(frozen=True, slots=True)
class Event:
    """One event log record.

    ``index`` is its position in the log (0 is the Spec ID header of a crypto-agile log), ``offset``
    the byte offset of its first byte.  ``digests`` maps bank name (``"sha256"``) to digest, in log
    order; the header record of a crypto-agile log has its zero ``{"sha1": ...}`` digest.
    """

    index: int
    offset: int
    pcr: int
    type: int
    digests: Mapping[str, bytes]
    data: bytes


@dataclass(frozen=True, slots=True)
class EventLog:
    """A parsed event log.

    ``format`` is ``"crypto-agile"`` or ``"sha1"``; ``banks`` the digest banks in header order;
    ``digest_sizes`` algorithm id -> digest size from the header (``{4: 20}`` for a SHA-1 log);
    ``size`` the bytes consumed (the whole input, including ``padding`` trailing padding bytes);
    ``startup_locality`` the locality of the StartupLocality event, or None if there is none.
    """

    format: str
    banks: tuple[str, ...]
    digest_sizes: Mapping[int, int]
    events: tuple[Event, ...]
    size: int
    startup_locality: int | None
    padding: int = 0


# Building an Event through the frozen dataclass __init__ costs about twice as much as filling its
# slots directly, and the parser makes one per record.  The slot setters bypass the frozen __setattr__
# exactly as dataclasses' own __init__ does; the assertion keeps this in step with the field list.
_EVENT_FIELDS = ("index", "offset", "pcr", "type", "digests", "data")
if tuple(f.name for f in dataclasses.fields(Event)) != _EVENT_FIELDS:  # pragma: no cover
    raise RuntimeError("Event fields changed: update _EVENT_FIELDS and _event()")
_new_object = object.__new__
_set_index, _set_offset, _set_pcr, _set_type, _set_digests, _set_data = (
    getattr(Event, name).__set__ for name in _EVENT_FIELDS)


def _event(index: int, offset: int, pcr: int, etype: int, digests: Mapping[str, bytes], data: bytes) -> Event:
    """``Event(...)`` without the frozen-dataclass __init__ overhead (same resulting object)."""
    ev: Event = _new_object(Event)
    _set_index(ev, index)
    _set_offset(ev, offset)
    _set_pcr(ev, pcr)
    _set_type(ev, etype)
    _set_digests(ev, digests)
    _set_data(ev, data)
    return ev


# --- hash functions ------------------------------------------------------------------------------

_Hasher = Callable[[bytes], Any]


def _find_hashers() -> dict[str, _Hasher]:
    found: dict[str, _Hasher] = {}
    for bank, size, hname in HASH_ALGS.values():
        ctor: _Hasher | None = getattr(hashlib, hname, None)
        if ctor is None:
            ctor = functools.partial(hashlib.new, hname)
        try:
            ok = ctor(b"").digest_size == size
        except (ValueError, TypeError):  # not provided by this OpenSSL (e.g. sm3)
            ok = False
        if ok:
            found[bank] = ctor
    return found


#: Bank name -> hashlib constructor, for the banks this interpreter can hash.
_HASHERS: dict[str, _Hasher] = _find_hashers()


def bank_name(alg: int) -> str:
    """Bank name of a TPM hash algorithm id: ``"sha256"``, or ``"alg_0x1234"`` if unknown."""
    known = HASH_ALGS.get(alg)
    return known[0] if known is not None else f"alg_0x{alg:04x}"


def replayable_banks(log: EventLog) -> tuple[str, ...]:
    """The banks of ``log`` that can be replayed (and verified) here, in header order."""
    return tuple(b for b in log.banks if b in _HASHERS)


# Small-input digest cache for digest verification: separators and action strings repeat in every log
# of a fleet.  Bounded (cleared when full), keyed by the full input, so it cannot be poisoned.
_DIGEST_CACHE: dict[tuple[str, bytes], bytes] = {}
_DIGEST_CACHE_MAX = 4096
_DIGEST_CACHE_INPUT_MAX = 128


def _digest(bank: str, hasher: _Hasher, data: bytes) -> bytes:
    if len(data) > _DIGEST_CACHE_INPUT_MAX:
        return hasher(data).digest()
    key = (bank, data)
    value = _DIGEST_CACHE.get(key)
    if value is None:
        if len(_DIGEST_CACHE) >= _DIGEST_CACHE_MAX:
            _DIGEST_CACHE.clear()
        value = _DIGEST_CACHE[key] = hasher(data).digest()
    return value


# --- layouts ---------------------------------------------------------------------------------------


_FastDecode = Callable[[tuple[Any, ...]], "FrozenDict[str, bytes] | None"]


def _fast_decoder(algs: tuple[int, ...], names: tuple[str, ...]) -> _FastDecode:
    """Digests from the unpacked usual record head (count, then every bank in header order), or None.

    ``v`` is ``(pcr, type, count, alg0, digest0, alg1, digest1, ..., eventSize)``.  Written out for up to
    four banks (every real log) because a dict display is three times faster than ``dict(zip(...))``.
    """
    n = len(algs)
    if n == 1:
        (a0,), (n0,) = algs, names
        return lambda v: FrozenDict({n0: v[4]}) if v[2] == 1 and v[3] == a0 else None
    if n == 2:
        (a0, a1), (n0, n1) = algs, names
        return lambda v: (FrozenDict({n0: v[4], n1: v[6]})
                          if v[2] == 2 and v[3] == a0 and v[5] == a1 else None)
    if n == 3:
        (a0, a1, a2), (n0, n1, n2) = algs, names
        return lambda v: (FrozenDict({n0: v[4], n1: v[6], n2: v[8]})
                          if v[2] == 3 and v[3] == a0 and v[5] == a1 and v[7] == a2 else None)
    if n == 4:
        (a0, a1, a2, a3), (n0, n1, n2, n3) = algs, names
        return lambda v: (FrozenDict({n0: v[4], n1: v[6], n2: v[8], n3: v[10]})
                          if v[2] == 4 and v[3] == a0 and v[5] == a1 and v[7] == a2 and v[9] == a3 else None)
    return lambda v: (FrozenDict(zip(names, v[4:-1:2], strict=True))
                      if v[2] == n and v[3:-1:2] == algs else None)


@dataclass(frozen=True, slots=True)
class _Layout:
    """Everything the event loop needs about a log's banks, computed once per header."""

    algs: tuple[int, ...]
    names: tuple[str, ...]
    sizes: FrozenDict[int, int]
    name_of: Mapping[int, str]
    fast: struct.Struct  # the usual record head: all banks in header order, then eventSize
    decode: _FastDecode  # digests from ``fast``'s values, or None if the record is not usual
    verify: tuple[tuple[str, _Hasher], ...]  # banks we can hash


@functools.lru_cache(maxsize=64)
def _layout(pairs: tuple[tuple[int, int], ...]) -> _Layout:
    algs = tuple(a for a, _ in pairs)
    names = tuple(bank_name(a) for a in algs)
    fmt = "<III" + "".join(f"H{size}s" for _, size in pairs) + "I"
    return _Layout(
        algs=algs,
        names=names,
        sizes=FrozenDict(pairs),
        name_of=dict(zip(algs, names, strict=True)),
        fast=struct.Struct(fmt),
        decode=_fast_decoder(algs, names),
        verify=tuple((n, _HASHERS[n]) for n in names if n in _HASHERS),
    )


_SHA1_LAYOUT = _layout(((int(Alg.SHA1), 20),))


# --- parser -----------------------------------------------------------------------------------------


class _State:
    """Cross-event parse state that a continuation (:func:`extend_eventlog`) must carry over."""

    __slots__ = ("prior", "startup_locality")

    def __init__(self, prior: Sequence[Event], startup_locality: int | None) -> None:
        self.prior = prior
        self.startup_locality = startup_locality


def _fail(message: str, index: int, offset: int) -> NoReturn:
    raise EventLogError(message, index=index, offset=offset)


def _pcr0_measured(state: _State, current: Sequence[Event]) -> bool:
    # Only called for the rare StartupLocality / H-CRTM events, so scanning is fine (at most twice
    # per log: a second such event is rejected).
    for seq in (state.prior, current):
        for ev in seq:
            if ev.pcr == 0 and ev.type != _EV_NO_ACTION:
                return True
    return False


def _check_special(ev: Event, state: _State, current: Sequence[Event]) -> None:
    """Rules for StartupLocality (PFP 10.4.5.3) and H-CRTM events."""
    if ev.type == _EV_NO_ACTION:
        if not ev.data.startswith(STARTUP_LOCALITY_SIGNATURE):
            return
        if len(ev.data) != 17:
            _fail(f"StartupLocality event data is {len(ev.data)} bytes, must be 17", ev.index, ev.offset)
        if ev.pcr != 0:
            _fail(f"StartupLocality event is in PCR {ev.pcr}, must be in PCR 0", ev.index, ev.offset)
        locality = ev.data[16]
        if locality not in _STARTUP_LOCALITIES:
            _fail(f"StartupLocality names locality {locality}, must be 0, 3 or 4", ev.index, ev.offset)
        if state.startup_locality is not None:
            _fail("duplicate StartupLocality event", ev.index, ev.offset)
        if _pcr0_measured(state, current):
            _fail("StartupLocality event after PCR 0 was extended", ev.index, ev.offset)
        state.startup_locality = locality
    elif ev.type == _EV_HCRTM and ev.pcr == 0 and _pcr0_measured(state, current):
        _fail("EV_EFI_HCRTM_EVENT after PCR 0 was extended", ev.index, ev.offset)


def _variable_data(data: bytes) -> bytes | None:
    """VariableData of a UEFI_VARIABLE_DATA (PFP 10.2.6), or None if the structure does not fit."""
    if len(data) < 32:
        return None
    name_len, data_len = struct.unpack_from("<QQ", data, 16)
    start = 32 + 2 * name_len
    if start + data_len > len(data):
        return None
    return data[start : start + data_len]


def _verify_data(ev: Event, layout: _Layout) -> None:
    for bank, hasher in layout.verify:
        expected = ev.digests.get(bank)
        if expected is not None and _digest(bank, hasher, ev.data) != expected:
            _fail(f"{event_type_name(ev.type)}: {bank} digest is not the hash of the event data",
                  ev.index, ev.offset)


def _verify_boot_variable(ev: Event, layout: _Layout) -> None:
    var_data: bytes | None = None
    for bank, hasher in layout.verify:
        expected = ev.digests.get(bank)
        if expected is None or _digest(bank, hasher, ev.data) == expected:
            continue
        if var_data is None:
            var_data = _variable_data(ev.data)
        if var_data is None or hasher(var_data).digest() != expected:
            _fail(f"{event_type_name(ev.type)}: {bank} digest is the hash of neither the event data "
                  "nor its VariableData", ev.index, ev.offset)


_VERIFIERS: dict[int, Callable[[Event, _Layout], None]] = {
    EventType.EV_SEPARATOR: _verify_data,
    EventType.EV_EFI_ACTION: _verify_data,
    EventType.EV_S_CRTM_VERSION: _verify_data,
    EventType.EV_EFI_VARIABLE_DRIVER_CONFIG: _verify_data,
    EventType.EV_EFI_GPT_EVENT: _verify_data,
    EventType.EV_EFI_VARIABLE_BOOT: _verify_boot_variable,
    EventType.EV_EFI_VARIABLE_BOOT2: _verify_boot_variable,
}


def _padding_at(buf: bytes, start: int) -> int | None:
    """The fill byte if ``buf[start:]`` is non-empty and all 0x00 or all 0xFF, else None."""
    if start >= len(buf):
        return None
    fill = buf[start]
    if fill not in (0x00, 0xFF) or buf.count(fill.to_bytes(1, "little"), start) != len(buf) - start:
        return None
    return fill


def _spec_id(buf: bytes) -> tuple[tuple[tuple[int, int], ...], int] | None:
    """Decode the first record if it is a Spec ID Event03 header: ((alg, size), ...), end offset.

    Returns None for a legacy log (first record is not a Spec ID Event03).
    """
    if len(buf) < _LEGACY.size:
        _fail(f"truncated event header: {_LEGACY.size} bytes needed, {len(buf)} remain", 0, 0)
    pcr, etype, digest, size = _LEGACY.unpack_from(buf, 0)
    if etype != _EV_NO_ACTION or buf[32:48] != SPEC_ID_SIGNATURE:
        return None
    # PFP 10.4.5.1: the header is a legacy-format EV_NO_ACTION record in PCR 0 with a zero digest.
    if pcr != 0:
        _fail(f"Spec ID header is in PCR {pcr}, must be in PCR 0", 0, 0)
    if digest != _ZERO20:
        _fail("Spec ID header has a non-zero digest", 0, 0)
    end = _LEGACY.size + size
    if end > len(buf):
        _fail(f"Spec ID header data truncated: {size} bytes declared, {len(buf) - _LEGACY.size} remain",
              0, 0)
    if size < _SPEC_ID_FIXED.size + 1:
        _fail(f"Spec ID header data is {size} bytes, too short", 0, 0)
    count = _SPEC_ID_FIXED.unpack_from(buf, 32)[-1]
    if count == 0:
        _fail("Spec ID header lists zero algorithms", 0, 0)
    table = 32 + _SPEC_ID_FIXED.size
    if count > (size - _SPEC_ID_FIXED.size - 1) // _ALG_SIZE.size:
        _fail(f"Spec ID header lists {count} algorithms, more than its {size} data bytes hold", 0, 0)
    pairs: list[tuple[int, int]] = []
    seen: set[int] = set()
    for i in range(count):
        alg, dsize = _ALG_SIZE.unpack_from(buf, table + 4 * i)
        if alg in seen:
            _fail(f"Spec ID header lists algorithm 0x{alg:04x} twice", 0, 0)
        seen.add(alg)
        known = HASH_ALGS.get(alg)
        if known is not None and known[1] != dsize:
            _fail(f"Spec ID header gives {known[0]} digest size {dsize}, must be {known[1]}", 0, 0)
        if dsize == 0:
            _fail(f"Spec ID header gives algorithm 0x{alg:04x} digest size 0", 0, 0)
        pairs.append((alg, dsize))
    vendor_at = table + 4 * count
    vendor_size = buf[vendor_at]
    if vendor_at + 1 + vendor_size != end:
        _fail(f"Spec ID header vendorInfoSize {vendor_size} disagrees with its event size {size}", 0, 0)
    return tuple(pairs), end


def _slow_event2(buf: bytes, off: int, end: int, index: int, layout: _Layout, base: int = 0
                 ) -> tuple[int, int, FrozenDict[str, bytes], int, int]:
    """Decode a TCG_PCR_EVENT2 head field by field: (pcr, type, digests, eventSize, data offset).

    ``base`` is the log offset of ``buf[0]`` (non-zero for a continuation), used in error messages.
    """
    start = base + off
    if end - off < _EV2_HEAD.size:
        _fail(f"truncated event header: {_EV2_HEAD.size} bytes needed, {end - off} remain", index, start)
    pcr, etype, count = _EV2_HEAD.unpack_from(buf, off)
    if count == 0:
        _fail("event has no digests", index, start)
    if count > len(layout.algs):
        _fail(f"digest count {count} exceeds the {len(layout.algs)} algorithms of the Spec ID header",
              index, start)
    off += _EV2_HEAD.size
    digests: dict[str, bytes] = {}
    for _ in range(count):
        if end - off < 2:
            _fail("truncated digest list", index, start)
        (alg,) = _U16.unpack_from(buf, off)
        dsize = layout.sizes.get(alg)
        if dsize is None:
            _fail(f"digest algorithm 0x{alg:04x} is not in the Spec ID header", index, start)
        name = layout.name_of[alg]
        if name in digests:
            _fail(f"digest algorithm {name} appears twice", index, start)
        off += 2
        if end - off < dsize:
            _fail(f"truncated {name} digest", index, start)
        digests[name] = buf[off : off + dsize]
        off += dsize
    if end - off < 4:
        _fail("truncated event header: no eventSize field", index, start)
    (esize,) = _U32.unpack_from(buf, off)
    return pcr, etype, FrozenDict(digests), esize, off + 4


def _parse_events(buf: bytes, off: int, base: int, index: int, fmt: str, layout: _Layout,
                  state: _State, verify: bool, max_events: int, allow_padding: bool
                  ) -> tuple[list[Event], int]:
    """Parse records from ``buf[off:]``; offsets in events are ``base + position``.

    Returns (events, padding bytes).
    """
    end = len(buf)
    events: list[Event] = []
    append = events.append
    verifiers = _VERIFIERS if verify else {}
    legacy = fmt == "sha1"
    legacy_unpack = _LEGACY.unpack_from
    legacy_size = _LEGACY.size
    fast_unpack = layout.fast.unpack_from
    fast_size = layout.fast.size
    decode = layout.decode
    new_event = _event
    frozen = FrozenDict
    special = (_EV_NO_ACTION, _EV_HCRTM)
    start = off
    try:
        while off < end:
            start = off
            pos = base + off
            if index >= max_events:
                _fail(f"more than {max_events} events", index, pos)
            if legacy:
                if end - off < legacy_size:
                    _fail(f"truncated event header: {legacy_size} bytes needed, {end - off} remain",
                          index, pos)
                pcr, etype, digest, esize = legacy_unpack(buf, off)
                if pcr == 0 and etype == 0 and esize == 0 and digest == _ZERO20:
                    _fail("all-zero event record", index, pos)
                digests: FrozenDict[str, bytes] = frozen(sha1=digest)
                off += legacy_size
            else:
                # Fast path: one unpack for the usual record head (all banks, in header order).
                vals = fast_unpack(buf, off) if end - off >= fast_size else None
                fast_digests = decode(vals) if vals is not None else None
                if vals is not None and fast_digests is not None:
                    pcr, etype, esize = vals[0], vals[1], vals[-1]
                    digests = fast_digests
                    off += fast_size
                else:
                    pcr, etype, digests, esize, off = _slow_event2(buf, off, end, index, layout, base)
            if esize > end - off:
                _fail(f"event data truncated: {esize} bytes declared, {end - off} remain", index, pos)
            ev = new_event(index, pos, pcr, etype, digests, buf[off : off + esize])
            off += esize
            if etype in special:
                _check_special(ev, state, events)
            check = verifiers.get(etype)
            if check is not None:
                check(ev, layout)
            append(ev)
            index += 1
    except EventLogError:
        fill = _padding_at(buf, start)
        if fill is None:
            raise
        if not events and base + start == 0:
            raise
        if not allow_padding:
            _fail(f"log ends with {end - start} bytes of 0x{fill:02x} padding (padding not allowed)",
                  index, base + start)
        return events, end - start
    return events, 0


def _as_bytes(data: bytes | bytearray | memoryview) -> bytes:
    return data if type(data) is bytes else bytes(data)


def parse_eventlog(data: bytes | bytearray | memoryview, *, verify_digests: bool = True,
                   max_events: int = DEFAULT_MAX_EVENTS, allow_padding: bool = False) -> EventLog:
    """Parse a crypto-agile or legacy SHA-1 TCG event log.

    ``verify_digests`` checks the digests the module docstring lists; ``max_events`` bounds the number
    of records (header included); ``allow_padding`` accepts trailing 0x00/0xFF fill.  Raises
    :class:`EventLogError` (one line, naming event index and byte offset) for any malformed input.
    """
    if max_events < 1:
        raise ValueError("max_events must be at least 1")
    buf = _as_bytes(data)
    if not buf:
        _fail("empty event log", 0, 0)
    header = _spec_id(buf)
    state = _State((), None)
    if header is None:
        fmt, layout, events0, off, index = "sha1", _SHA1_LAYOUT, [], 0, 0
    else:
        pairs, off = header
        fmt, layout, index = "crypto-agile", _layout(pairs), 1
        events0 = [Event(0, 0, 0, _EV_NO_ACTION, FrozenDict(sha1=_ZERO20), buf[32:off])]
    events, padding = _parse_events(buf, off, 0, index, fmt, layout, state, verify_digests, max_events,
                                    allow_padding)
    return EventLog(
        format=fmt,
        banks=layout.names,
        digest_sizes=layout.sizes,
        events=tuple(events0 + events) if events0 else tuple(events),
        size=len(buf),
        startup_locality=state.startup_locality,
        padding=padding,
    )


def extend_eventlog(log: EventLog, more: bytes | bytearray | memoryview, *, verify_digests: bool = True,
                    max_events: int = DEFAULT_MAX_EVENTS, allow_padding: bool = False) -> EventLog:
    """Parse ``more``, the bytes appended to the log since ``log``, and return the whole log.

    ``parse_eventlog(a)`` then ``extend_eventlog(log, b)`` equals ``parse_eventlog(a + b)`` (the same
    keyword arguments must be used).  Parsing costs O(len(more)); the result's events tuple is the
    old one plus the new events.  Offsets of new events continue from ``log.size``.
    """
    if max_events < 1:
        raise ValueError("max_events must be at least 1")
    buf = _as_bytes(more)
    if not buf:
        return log
    if log.padding:
        _fail("cannot extend a log that ends in padding", len(log.events), log.size)
    if log.format == "sha1":
        layout = _SHA1_LAYOUT
    elif log.format == "crypto-agile":
        layout = _layout(tuple(log.digest_sizes.items()))
    else:
        raise ValueError(f"unknown event log format {log.format!r}")
    state = _State(log.events, log.startup_locality)
    events, padding = _parse_events(buf, 0, log.size, len(log.events), log.format, layout, state,
                                    verify_digests, max_events, allow_padding)
    return EventLog(
        format=log.format,
        banks=log.banks,
        digest_sizes=log.digest_sizes,
        events=log.events + tuple(events),
        size=log.size + len(buf),
        startup_locality=state.startup_locality,
        padding=padding,
    )


# --- replay ----------------------------------------------------------------------------------------


class Replayer:
    """Per-bank PCR state that events are fed to in log order, possibly in several batches.

    ``Replayer.for_log(log)`` replays the log's hashable banks (or those asked for).  ``feed(events)``
    extends the PCRs with events whose ``index`` continues where the previous batch ended (the first
    batch starts at index 0), so a verifier can keep a replayer per device and boot and feed it only
    events appended since (see :func:`extend_eventlog`).  A batch is applied atomically: if it raises
    :class:`EventLogError` the state is unchanged.  ``values()`` gives the PCRs that at least one event
    extended, plus PCR 0 when a StartupLocality or H-CRTM event set its initial value.  ``copy()``
    forks the state (e.g. to evaluate a candidate extension without committing it).

    Events must come from :func:`parse_eventlog`/:func:`extend_eventlog` (digest sizes are trusted).
    A replayer is not thread-safe; the module's functions are pure and are.
    """

    __slots__ = ("_banks", "_initial", "_next_index", "_pcr0_extended", "_pcr0_set", "_pcrs")

    def __init__(self, banks: Iterable[str], *, drtm: bool = False) -> None:
        """Start from the TPM2_Startup values of ``banks`` (with ``drtm``: PCRs 17-22 at zero)."""
        names = tuple(dict.fromkeys(banks))
        initial: dict[str, list[bytes]] = {}
        for name in names:
            hasher = _HASHERS.get(name)
            if hasher is None:
                raise EventLogError(f"cannot replay bank {name!r}: no hash function for it here")
            size = hasher(b"").digest_size
            zero, ones = bytes(size), b"\xff" * size
            initial[name] = [ones if (p in DRTM_PCRS and not drtm) else zero for p in range(NUM_PCRS)]
        self._banks = tuple((n, _HASHERS[n]) for n in names)
        # Initial values are kept as distinct objects: a PCR whose list entry is still the very
        # same object was never extended (every extend stores a fresh digest object).
        self._initial = {n: tuple(v) for n, v in initial.items()}
        self._pcrs = initial
        self._next_index = 0
        self._pcr0_extended = False
        self._pcr0_set = False

    @classmethod
    def for_log(cls, log: EventLog, banks: Iterable[str] | None = None, *, drtm: bool = False
                ) -> Replayer:
        """A replayer for ``log``'s banks: ``banks`` (each must be in the log), else all hashable ones."""
        if banks is None:
            names = replayable_banks(log)
        else:
            names = tuple(dict.fromkeys(banks))
            for name in names:
                if name not in log.banks:
                    raise EventLogError(f"the event log has no {name} bank (it has {', '.join(log.banks)})")
        return cls(names, drtm=drtm)

    @property
    def banks(self) -> tuple[str, ...]:
        """The banks being replayed."""
        return tuple(n for n, _ in self._banks)

    @property
    def next_index(self) -> int:
        """Index of the next event :meth:`feed` expects."""
        return self._next_index

    def copy(self) -> Replayer:
        """An independent replayer with the same state."""
        other = Replayer.__new__(Replayer)
        other._banks = self._banks
        other._initial = self._initial
        other._pcrs = {n: list(v) for n, v in self._pcrs.items()}
        other._next_index = self._next_index
        other._pcr0_extended = self._pcr0_extended
        other._pcr0_set = self._pcr0_set
        return other

    def feed(self, events: Iterable[Event]) -> None:
        """Extend the PCRs with ``events`` (consecutive indices starting at :attr:`next_index`)."""
        pcrs = {n: list(v) for n, v in self._pcrs.items()}
        work = [(name, hasher, pcrs[name]) for name, hasher in self._banks]
        nxt = self._next_index
        pcr0_extended = self._pcr0_extended
        pcr0_set = self._pcr0_set
        # Pass 1, in log order: checks, and PCR 0 start values (which by these checks come before any
        # PCR 0 extension); collects what to extend.
        todo: list[tuple[int, Mapping[str, bytes]]] = []
        add = todo.append
        for ev in events:
            if ev.index != nxt:
                raise EventLogError(f"replay expected event {nxt} next", index=ev.index, offset=ev.offset)
            nxt += 1
            etype = ev.type
            pcr = ev.pcr
            if etype == _EV_NO_ACTION:
                # PFP 10.4.5: never extended.  StartupLocality sets PCR 0's initial value (10.4.5.3).
                if ev.data.startswith(STARTUP_LOCALITY_SIGNATURE) and len(ev.data) == 17 and pcr == 0:
                    if pcr0_extended or pcr0_set:
                        raise EventLogError("StartupLocality event after PCR 0 was set or extended",
                                            index=ev.index, offset=ev.offset)
                    self._set_pcr0(work, ev.data[16])
                    pcr0_set = True
                continue
            if pcr == 0:
                if etype == _EV_HCRTM:
                    # TPM 2.0 Part 1, H-CRTM: PCR 0 starts at 0...04 and is extended with the H-CRTM.
                    if pcr0_extended:
                        raise EventLogError("EV_EFI_HCRTM_EVENT after PCR 0 was extended",
                                            index=ev.index, offset=ev.offset)
                    self._set_pcr0(work, _HCRTM_LOCALITY)
                    pcr0_set = True
                pcr0_extended = True
            elif pcr >= NUM_PCRS:
                continue  # no such PCR: the event is kept in the log but extends nothing
            add((pcr, ev.digests))
        # Pass 2, bank by bank: PCR_new = H(PCR_old || digest) (TPM 2.0 Part 1, "PCR Extend").
        for name, hasher, values in work:
            for pcr, digests in todo:
                digest = digests.get(name)
                if digest is not None:
                    values[pcr] = hasher(values[pcr] + digest).digest()
        self._pcrs = pcrs
        self._next_index = nxt
        self._pcr0_extended = pcr0_extended
        self._pcr0_set = pcr0_set

    @staticmethod
    def _set_pcr0(work: list[tuple[str, _Hasher, list[bytes]]], locality: int) -> None:
        for _, _, values in work:
            values[0] = bytes(len(values[0]) - 1) + bytes((locality,))

    def values(self) -> dict[str, dict[int, bytes]]:
        """bank -> PCR -> value for every PCR an event extended (and PCR 0 if its start was set)."""
        out: dict[str, dict[int, bytes]] = {}
        for name, _ in self._banks:
            values = self._pcrs[name]
            initial = self._initial[name]
            out[name] = {p: bytes(v) for p, v in enumerate(values)
                         if v is not initial[p] or (p == 0 and self._pcr0_set)}
        return out


def extends_pcr(event: Event) -> bool:
    """Whether replay extends a PCR with ``event``: not EV_NO_ACTION (PFP 10.4.5), PCR index 0-23."""
    return event.type != _EV_NO_ACTION and event.pcr < NUM_PCRS


def replay(log: EventLog, banks: Iterable[str] | None = None, *, drtm: bool = False
           ) -> dict[str, dict[int, bytes]]:
    """Replay ``log``: bank -> PCR -> value (see :class:`Replayer` for which PCRs are reported).

    ``banks`` limits the work to those banks (each must be in the log); by default every bank this
    interpreter can hash is replayed (unknown algorithms are skipped).  Every replayed bank is a key of
    the result, with an empty mapping if no event extends anything in it.
    """
    replayer = Replayer.for_log(log, banks, drtm=drtm)
    replayer.feed(log.events)
    return replayer.values()


# --- display --------------------------------------------------------------------------------------


def _guid(raw: bytes) -> str:
    """EFI_GUID (UEFI spec, Appendix A: three little-endian fields, then 8 bytes) as text."""
    return str(uuid.UUID(bytes_le=bytes(raw[:16])))


def _printable(text: str) -> bool:
    return all(c.isprintable() or c in "\t\r\n" for c in text)


def _text(data: bytes) -> str | None:
    """Decode a UCS-2 or ASCII/UTF-8 string (trailing NULs dropped), or None if it is not text."""
    if not data:
        return ""
    # UCS-2 (UTF-16LE) when at least half the high bytes are zero; some loaders append one NUL byte.
    body = data[:-1] if len(data) % 2 and data[-1] == 0 else data
    if len(body) >= 2 and len(body) % 2 == 0 and body[1::2].count(0) * 4 >= len(body):
        try:
            text = body.decode("utf-16-le").rstrip("\0")
        except UnicodeDecodeError:
            text = None
        if text is not None and _printable(text):
            return text
    try:
        text = data.decode("utf-8").rstrip("\0")
    except UnicodeDecodeError:
        return None
    return text if _printable(text) else None


def _ucs2z(data: bytes, start: int) -> tuple[str, int]:
    """NUL-terminated UCS-2 string at ``start``: (text, offset after the terminator)."""
    pos = start
    while pos + 1 < len(data) and (data[pos] or data[pos + 1]):
        pos += 2
    return data[start:pos].decode("utf-16-le", "replace"), pos + 2


_DP_MAX_NODES = 64


def _device_path(raw: bytes) -> str:
    """Render an EFI_DEVICE_PATH_PROTOCOL (UEFI spec 10.3) in the usual text form, best effort."""
    parts: list[str] = []
    pos = 0
    while pos + 4 <= len(raw) and len(parts) < _DP_MAX_NODES:
        dtype, sub, length = raw[pos], raw[pos + 1], _U16.unpack_from(raw, pos + 2)[0]
        if length < 4 or pos + length > len(raw):
            parts.append(f"<bad node at {pos}>")
            break
        body = raw[pos + 4 : pos + length]
        pos += length
        if dtype == 0x7F:  # end of path (instance)
            if sub == 0xFF:
                break
            continue
        parts.append(_device_path_node(dtype, sub, body))
    return "/".join(parts)


_DP_VENDOR = {(1, 4): "VenHw", (3, 10): "VenMsg", (4, 3): "VenMedia"}


def _device_path_node(dtype: int, sub: int, body: bytes) -> str:
    """One device path node in the UEFI spec's text form (10.6.1), for the common node types."""
    if dtype == 1 and sub == 1 and len(body) >= 2:
        return f"Pci(0x{body[1]:x},0x{body[0]:x})"
    if (dtype, sub) in _DP_VENDOR and len(body) >= 16:
        extra = f",{body[16:].hex()}" if len(body) > 16 else ""
        return f"{_DP_VENDOR[dtype, sub]}({_guid(body)}{extra})"
    if dtype == 2 and sub == 1 and len(body) >= 8:
        hid, uid = struct.unpack_from("<II", body)
        if hid == 0x0A0341D0:
            return f"PciRoot(0x{uid:x})"
        return f"Acpi(0x{hid:08x},0x{uid:x})"
    if dtype == 3 and sub == 2 and len(body) >= 4:
        pun, lun = struct.unpack_from("<HH", body)
        return f"Scsi(0x{pun:x},0x{lun:x})"
    if dtype == 3 and sub == 5 and len(body) >= 2:
        return f"USB(0x{body[0]:x},0x{body[1]:x})"
    if dtype == 3 and sub == 11 and len(body) >= 6:
        return f"MAC({body[:6].hex()})"
    if dtype == 3 and sub == 12 and len(body) >= 8:
        return f"IPv4({'.'.join(str(b) for b in body[4:8])})"
    if dtype == 3 and sub == 13 and len(body) >= 32:
        return f"IPv6({ipaddress.IPv6Address(body[16:32])})"
    if dtype == 3 and sub == 18 and len(body) >= 6:
        hba, mult, lun = struct.unpack_from("<HHH", body)
        return f"Sata(0x{hba:x},0x{mult:x},0x{lun:x})"
    if dtype == 3 and sub == 23 and len(body) >= 4:
        return f"NVMe(0x{_U32.unpack_from(body)[0]:x})"
    if dtype == 3 and sub == 24:
        return f"Uri({body.decode('ascii', 'replace')})"
    if dtype == 4 and sub == 1 and len(body) >= 38:
        number, start, size = struct.unpack_from("<IQQ", body)
        fmt, sig_type = body[36], body[37]
        signature = _guid(body[20:36]) if sig_type == 2 else body[20:24].hex()
        return f"HD({number},{'GPT' if fmt == 2 else 'MBR'},{signature},0x{start:x},0x{size:x})"
    if dtype == 4 and sub == 4:
        return body.decode("utf-16-le", "replace").rstrip("\0")
    if dtype == 4 and sub in (6, 7) and len(body) >= 16:
        return f"{'FvFile' if sub == 6 else 'Fv'}({_guid(body)})"
    if dtype == 4 and sub == 8 and len(body) >= 20:
        first, last = struct.unpack_from("<QQ", body, 4)
        return f"Offset(0x{first:x},0x{last:x})"
    if dtype == 5 and sub == 1 and len(body) >= 4:
        return f"BBS(0x{_U16.unpack_from(body)[0]:x},{body[4:].rstrip(bytes(1)).decode('ascii', 'replace')})"
    return f"Path({dtype},{sub},{body.hex()})"


def _is_boot_option(name: str) -> bool:
    """``Boot####`` (four upper-case hex digits, UEFI spec 3.1.1), not BootNext/BootOrder."""
    return len(name) == 8 and name.startswith("Boot") and all(c in "0123456789ABCDEF" for c in name[4:])


def _uefi_variable(data: bytes) -> dict[str, object]:
    """UEFI_VARIABLE_DATA (PFP 10.2.6)."""
    name_len, data_len = struct.unpack_from("<QQ", data, 16)
    if 32 + 2 * name_len > len(data):
        raise ValueError("UnicodeName overruns the event")
    name = data[32 : 32 + 2 * name_len].decode("utf-16-le", "replace")
    value = data[32 + 2 * name_len : 32 + 2 * name_len + data_len]
    out: dict[str, object] = {"variable_guid": _guid(data), "name": name, "data_length": data_len}
    if len(value) != data_len:
        out["note"] = f"VariableData truncated to {len(value)} bytes"
    if name == "BootOrder" and len(value) % 2 == 0:
        out["boot_order"] = [f"Boot{n:04X}" for (n,) in struct.iter_unpack("<H", value)]
    elif _is_boot_option(name) and len(value) >= 6:
        attributes, path_len = struct.unpack_from("<IH", value)
        description, after = _ucs2z(value, 6)
        out["load_option"] = {"active": bool(attributes & 1), "description": description,
                              "device_path": _device_path(value[after : after + path_len])}
    elif name in ("SecureBoot", "DeployedMode", "AuditMode", "SetupMode") and len(value) == 1:
        out["enabled"] = bool(value[0])
    out["data"] = value.hex()
    return out


def _image_load(data: bytes) -> dict[str, object]:
    """UEFI_IMAGE_LOAD_EVENT (PFP 10.2, UEFI structures)."""
    location, length, link, path_len = struct.unpack_from("<QQQQ", data)
    path = data[32 : 32 + path_len]
    return {"image_location": f"0x{location:x}", "image_length": length, "link_time_address": f"0x{link:x}",
            "device_path": _device_path(path), "device_path_length": path_len}


def _firmware_blob(data: bytes) -> dict[str, object]:
    """UEFI_PLATFORM_FIRMWARE_BLOB (PFP 10.2, UEFI structures)."""
    base, length = struct.unpack_from("<QQ", data)
    return {"blob_base": f"0x{base:x}", "blob_length": f"0x{length:x}"}


def _firmware_blob2(data: bytes) -> dict[str, object]:
    """UEFI_PLATFORM_FIRMWARE_BLOB2 (PFP 10.2): a length-prefixed description, then base and length."""
    dlen = data[0]
    description = data[1 : 1 + dlen]
    base, length = struct.unpack_from("<QQ", data, 1 + dlen)
    return {"description": _text(description) or description.hex(), "blob_base": f"0x{base:x}",
            "blob_length": f"0x{length:x}"}


def _handoff_tables(data: bytes, described: bool) -> dict[str, object]:
    """UEFI_HANDOFF_TABLE_POINTERS(2) (PFP 10.2): entries of (VendorGuid, VendorTable)."""
    out: dict[str, object] = {}
    pos = 0
    if described:
        dlen = data[0]
        out["description"] = _text(data[1 : 1 + dlen]) or data[1 : 1 + dlen].hex()
        pos = 1 + dlen
    (count,) = struct.unpack_from("<Q", data, pos)
    pos += 8
    tables = []
    for _ in range(min(count, (len(data) - pos) // 24)):
        tables.append({"guid": _guid(data[pos : pos + 16]),
                       "table": f"0x{struct.unpack_from('<Q', data, pos + 16)[0]:x}"})
        pos += 24
    out["number_of_tables"] = count
    out["tables"] = tables
    return out


def _gpt(data: bytes) -> dict[str, object]:
    """UEFI_GPT_DATA (PFP 10.2): EFI_PARTITION_TABLE_HEADER, NumberOfPartitions, entries."""
    if data[:8] != b"EFI PART":
        raise ValueError("no GPT signature")
    header_size = _U32.unpack_from(data, 12)[0]
    disk_guid = _guid(data[56:72])
    entry_size = _U32.unpack_from(data, 84)[0]
    (count,) = struct.unpack_from("<Q", data, header_size)
    pos = header_size + 8
    partitions = []
    if entry_size >= 128:
        for _ in range(min(count, (len(data) - pos) // entry_size)):
            entry = data[pos : pos + entry_size]
            first, last = struct.unpack_from("<QQ", entry, 32)
            partitions.append({"type_guid": _guid(entry[:16]), "unique_guid": _guid(entry[16:32]),
                               "first_lba": first, "last_lba": last,
                               "name": entry[56:128].decode("utf-16-le", "replace").rstrip("\0")})
            pos += entry_size
    return {"disk_guid": disk_guid, "number_of_partitions": count, "partitions": partitions}


def _spec_id_event(data: bytes) -> dict[str, object]:
    signature, platform_class, minor, major, errata, uintn, count = _SPEC_ID_FIXED.unpack_from(data)
    algorithms = []
    for i in range(min(count, (len(data) - 28) // 4)):
        alg, size = _ALG_SIZE.unpack_from(data, 28 + 4 * i)
        algorithms.append({"algorithm_id": alg, "name": bank_name(alg), "digest_size": size})
    vendor_at = 28 + 4 * len(algorithms)
    vendor = data[vendor_at + 1 : vendor_at + 1 + data[vendor_at]] if vendor_at < len(data) else b""
    return {"signature": signature.rstrip(b"\0").decode("ascii", "replace"), "platform_class": platform_class,
            "spec_version": f"{major}.{minor}", "spec_errata": errata, "uintn_size": uintn,
            "algorithms": algorithms, "vendor_info": vendor.hex()}


def _no_action(data: bytes) -> dict[str, object]:
    """EV_NO_ACTION payloads (PFP 10.4.5) are identified by their 16-byte signature."""
    if data.startswith(SPEC_ID_SIGNATURE):
        return _spec_id_event(data)
    if data.startswith(STARTUP_LOCALITY_SIGNATURE) and len(data) == 17:
        return {"signature": "StartupLocality", "locality": data[16]}
    signature = data[:16].rstrip(b"\0")
    if len(data) >= 16 and signature.isascii() and signature.decode("ascii").isprintable():
        return {"signature": signature.decode("ascii"), "data": data[16:].hex()}
    return {"hex": data.hex()}


def _separator(data: bytes) -> dict[str, object]:
    if len(data) == 4:
        (value,) = _U32.unpack_from(data)
        # PFP 10.4.1, EV_SEPARATOR: 0 = normal, 1 (all ones in older firmware) = an error occurred.
        return {"value": f"0x{value:08x}", "error": value != 0}
    return {"hex": data.hex()}


def _text_or_hex(data: bytes) -> dict[str, object]:
    text = _text(data)
    return {"text": text} if text is not None else {"hex": data.hex()}


def _crtm_version(data: bytes) -> dict[str, object]:
    text = _text(data)
    if text is not None:
        return {"text": text}
    if len(data) == 16:
        return {"guid": _guid(data)}
    return {"hex": data.hex()}


def _post_code(data: bytes) -> dict[str, object]:
    # PFP 10.4.1: either a UEFI_PLATFORM_FIRMWARE_BLOB or (POST code string) text.
    if len(data) == 16:
        return _firmware_blob(data)
    return _text_or_hex(data)


def _tagged(data: bytes) -> dict[str, object]:
    """TCG_PCClientTaggedEvent (PFP, EV_EVENT_TAG): taggedEventID, taggedEventDataSize, data."""
    tag, size = struct.unpack_from("<II", data)
    payload = data[8 : 8 + size]
    out: dict[str, object] = {"tag": f"0x{tag:08x}", "size": size}
    out.update(_text_or_hex(payload))
    return out


_DECODERS: dict[int, Callable[[bytes], dict[str, object]]] = {
    EventType.EV_NO_ACTION: _no_action,
    EventType.EV_SEPARATOR: _separator,
    EventType.EV_ACTION: _text_or_hex,
    EventType.EV_EFI_ACTION: _text_or_hex,
    EventType.EV_IPL: _text_or_hex,
    EventType.EV_S_CRTM_VERSION: _crtm_version,
    EventType.EV_S_CRTM_CONTENTS: _firmware_blob,
    EventType.EV_POST_CODE: _post_code,
    EventType.EV_POST_CODE2: _post_code,
    EventType.EV_OMIT_BOOT_DEVICE_EVENTS: _text_or_hex,
    EventType.EV_EFI_HCRTM_EVENT: _text_or_hex,
    EventType.EV_NONHOST_INFO: _text_or_hex,
    EventType.EV_EVENT_TAG: _tagged,
    EventType.EV_EFI_VARIABLE_DRIVER_CONFIG: _uefi_variable,
    EventType.EV_EFI_VARIABLE_BOOT: _uefi_variable,
    EventType.EV_EFI_VARIABLE_BOOT2: _uefi_variable,
    EventType.EV_EFI_VARIABLE_AUTHORITY: _uefi_variable,
    EventType.EV_EFI_BOOT_SERVICES_APPLICATION: _image_load,
    EventType.EV_EFI_BOOT_SERVICES_DRIVER: _image_load,
    EventType.EV_EFI_RUNTIME_SERVICES_DRIVER: _image_load,
    EventType.EV_EFI_PLATFORM_FIRMWARE_BLOB: _firmware_blob,
    EventType.EV_EFI_PLATFORM_FIRMWARE_BLOB2: _firmware_blob2,
    EventType.EV_EFI_HANDOFF_TABLES: lambda d: _handoff_tables(d, False),
    EventType.EV_EFI_HANDOFF_TABLES2: lambda d: _handoff_tables(d, True),
    EventType.EV_EFI_GPT_EVENT: _gpt,
    EventType.EV_EFI_GPT_EVENT2: _gpt,
}


def describe_event(event: Event) -> dict[str, object]:
    """A JSON-ready description of ``event``, its data decoded where the structure is known.

    Keys: index, offset, pcr, extended (:func:`extends_pcr`), type, type_name, digests (bank -> hex),
    data_size and data, a dict such
    as ``{"text": ...}``, ``{"name": ..., "variable_guid": ..., ...}`` or ``{"hex": ...}`` when the data
    is not understood (decoding never raises: garbled data falls back to hex with a note).
    """
    decoder = _DECODERS.get(event.type)
    data: dict[str, object]
    if decoder is None:
        data = {"hex": event.data.hex()}
    else:
        try:
            data = decoder(event.data)
        except (struct.error, ValueError, IndexError, OverflowError):
            data = {"hex": event.data.hex(), "note": "data does not match the structure of its event type"}
    return {
        "index": event.index,
        "offset": event.offset,
        "pcr": event.pcr,
        "extended": extends_pcr(event),
        "type": event.type,
        "type_name": event_type_name(event.type),
        "digests": {bank: digest.hex() for bank, digest in event.digests.items()},
        "data_size": len(event.data),
        "data": data,
    }


def iter_descriptions(log: EventLog) -> Iterator[dict[str, object]]:
    """:func:`describe_event` for every event of ``log``, in order."""
    return (describe_event(ev) for ev in log.events)
