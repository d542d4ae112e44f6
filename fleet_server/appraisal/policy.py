"""Reference policies: the PCR values (and the events behind them) a device class and firmware must show.

A :class:`ReferencePolicy` names a device class and firmware version and holds

* ``selection`` - the PCRs the server asks devices of that class to quote (bank -> PCR indices);
* ``pcrs`` - the reference value of every selected PCR (bank -> PCR -> digest): the verdict compares
  the *quoted* values with these, so they alone decide trust;
* ``events`` - the reference event sequence of the policy's ``bank`` (PCR, type, digest, description)
  of the selected PCRs.  They are used only to explain a differing PCR: the appraisal walks a
  device's events of that PCR against them and names the first one that differs (changed, missing or
  unexpected), so an operator reads "PCR 4: EV_EFI_BOOT_SERVICES_APPLICATION (event 23,
  "\\EFI\\BOOT\\grubx64.efi") differs from reference" instead of two hex strings.

Where a policy lists events for a PCR, its reference value must be their replay (checked on
construction; TPM 2.0 Part 1, 17.2 'Extend': ``PCR_new = H(PCR_old || digest)`` from the PTP reset
value), so explanation and verdict cannot disagree.  A PCR without reference events is a value-only
reference.

:func:`policy_from_eventlog` builds a policy from a known-good device's event log.  Its default
selection is every PCR the log extends in the bank; for this project's simulated devices that is
sha256 PCRs 0-9, 13 and 14 (:data:`SIMULATOR_PCRS`, see :mod:`firmware_sim.boot`), the selection
docs/attestation-service.md names as the default.

JSON form (``to_json``/``from_json``, strict; :meth:`ReferencePolicy.canonical_bytes` is its canonical
encoding, whose SHA-256 keys policy caches)::

    {"format": 1, "name": "edge-camera-1.2.0", "device_class": "edge-camera",
     "firmware_version": "1.2.0", "bank": "sha256",
     "selection": {"sha256": [0, 1, 2]},
     "pcrs": {"sha256": {"0": "<hex>", "1": "<hex>", "2": "<hex>"}},
     "events": [{"pcr": 0, "type": "EV_S_CRTM_VERSION", "digest": "<hex>",
                 "description": "EdgeSim Firmware 1.2.0"}, ...]}

Pure: values in, frozen dataclasses out, or :class:`PolicyFormatError`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fleet_server.verifier.eventlog import (
    DRTM_PCRS,
    NUM_PCRS,
    Event,
    EventLog,
    FrozenDict,
    Replayer,
    describe_event,
    extends_pcr,
)
from protocol.encoding import JsonValue, canonical_bytes
from protocol.errors import EventLogError, MalformedInputError, MessageError
from protocol.messages import NAME_RE, Fields, pcrs_from_json, pcrs_to_json, selection_from_json
from protocol.tpm.constants import BANK_TO_ALG, HASH_ALGS, EventType, event_type_name

__all__ = [
    "DEFAULT_BANK",
    "POLICY_FORMAT",
    "SIMULATOR_PCRS",
    "PolicyFormatError",
    "ReferenceEvent",
    "ReferencePolicy",
    "event_description",
    "policy_from_eventlog",
]

POLICY_FORMAT = 1
DEFAULT_BANK = "sha256"
#: The PCRs a boot of this project's simulated devices extends (firmware_sim.boot.MEASURED_PCRS):
#: the default selection of a policy made from one of their logs.
SIMULATOR_PCRS: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 14)
MAX_POLICY_EVENTS = 4096
MAX_DESCRIPTION = 160

_EV_NO_ACTION = int(EventType.EV_NO_ACTION)
_UNKNOWN_TYPE_RE = re.compile(r"^EV_UNKNOWN_0x([0-9a-f]{8})$")
_HEX_RE = re.compile(r"^[0-9a-f]*$")
_BANK_SIZES: dict[str, int] = {name: size for name, size, _ in HASH_ALGS.values()}
_HASHERS: dict[str, str] = {name: hname for name, _, hname in HASH_ALGS.values()}


class PolicyFormatError(MalformedInputError):
    """A reference policy (or its JSON) is malformed or inconsistent."""


# --------------------------------------------------------------------------------------------------
# event descriptions
# --------------------------------------------------------------------------------------------------
def _clean(text: str) -> str:
    """One printable line of at most MAX_DESCRIPTION characters (for reasons and the console)."""
    cleaned = "".join(c if c.isprintable() and c != '"' else "?" for c in text.strip())
    if len(cleaned) > MAX_DESCRIPTION:
        cleaned = cleaned[: MAX_DESCRIPTION - 3] + "..."
    return cleaned


def event_description(event: Event) -> str:
    """A short description of ``event`` from :func:`~fleet_server.verifier.eventlog.describe_event`.

    Image loads give the file of their device path (``\\EFI\\BOOT\\BOOTAA64.EFI``), UEFI variables
    their name (with the Secure Boot state where it is one), text events (EV_IPL, EV_EFI_ACTION,
    S-CRTM version) their text, firmware blobs their description; anything else its size.
    """
    data = describe_event(event)["data"]
    if not isinstance(data, dict):  # pragma: no cover - describe_event always gives a dict
        return ""
    text: str
    if "device_path" in data:
        path = str(data["device_path"])
        last = path.rsplit("/", 1)[-1]
        text = last if last.startswith("\\") else path
    elif "name" in data:
        text = str(data["name"])
        if "enabled" in data:
            text += " (enabled)" if data["enabled"] else " (disabled)"
    elif "text" in data:
        text = str(data["text"])
    elif "description" in data:
        text = str(data["description"])
    elif "error" in data:
        text = "separator (error)" if data["error"] else "separator"
    elif "signature" in data:
        text = str(data["signature"])
    elif "guid" in data:
        text = str(data["guid"])
    else:
        text = f"{len(event.data)} bytes"
    return _clean(text)


# --------------------------------------------------------------------------------------------------
# values
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ReferenceEvent:
    """One measured event of the reference boot: PCR, TCG event type, digest in the policy's bank."""

    pcr: int
    type: int
    digest: bytes
    description: str = ""

    @property
    def type_name(self) -> str:
        """``"EV_SEPARATOR"``, or ``"EV_UNKNOWN_0x..."`` for a type the PFP does not name."""
        return event_type_name(self.type)


def _initial(bank: str, pcr: int, locality: int = 0) -> bytes:
    """PCR reset value (PTP 'PCR Initial and Reset Values'); PCR 0 ends in the startup locality."""
    size = _BANK_SIZES[bank]
    if pcr == 0:
        return bytes(size - 1) + bytes((locality,))
    return b"\xff" * size if pcr in DRTM_PCRS else bytes(size)


def _replay(bank: str, start: bytes, digests: Iterable[bytes]) -> bytes:
    value = start
    for digest in digests:
        value = hashlib.new(_HASHERS[bank], value + digest).digest()
    return value


def _selection(value: Mapping[str, Iterable[int]]) -> FrozenDict[str, tuple[int, ...]]:
    if not isinstance(value, Mapping) or not value:
        raise PolicyFormatError("policy selection must name at least one bank")
    out: dict[str, tuple[int, ...]] = {}
    for bank, pcrs in value.items():
        if bank not in BANK_TO_ALG:
            raise PolicyFormatError(f"policy selection: unknown PCR bank {bank!r}")
        indices = tuple(pcrs)
        if (not indices or len(set(indices)) != len(indices)
                or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < NUM_PCRS
                           for i in indices)):
            raise PolicyFormatError(f"policy selection {bank}: expected distinct PCR indices "
                                    f"0-{NUM_PCRS - 1}")
        out[bank] = tuple(sorted(indices))
    return FrozenDict(out)


def _pcr_values(value: Mapping[str, Mapping[int, bytes]], selection: Mapping[str, tuple[int, ...]]
                ) -> FrozenDict[str, FrozenDict[int, bytes]]:
    if not isinstance(value, Mapping) or set(value) != set(selection):
        raise PolicyFormatError("policy PCR values must cover exactly the banks of the selection")
    out: dict[str, FrozenDict[int, bytes]] = {}
    for bank, pcrs in selection.items():
        values = value[bank]
        if not isinstance(values, Mapping) or set(values) != set(pcrs):
            raise PolicyFormatError(f"policy PCR values of bank {bank} must cover exactly its selected PCRs")
        size = _BANK_SIZES[bank]
        for pcr, digest in values.items():
            if not isinstance(digest, bytes) or len(digest) != size:
                raise PolicyFormatError(f"policy {bank} PCR {pcr}: reference value must be {size} bytes")
        out[bank] = FrozenDict((p, values[p]) for p in pcrs)
    return FrozenDict(out)


@dataclass(frozen=True, slots=True)
class ReferencePolicy:
    """Reference values of one device class and firmware version (see the module docstring).

    Construction validates everything and raises :class:`PolicyFormatError`; mappings are stored as
    read-only :class:`~fleet_server.verifier.eventlog.FrozenDict` (the policy is hashable and shared
    between threads).  ``events_by_pcr`` (derived) groups the reference events by PCR, in order.
    """

    name: str
    device_class: str
    firmware_version: str
    selection: Mapping[str, tuple[int, ...]]
    pcrs: Mapping[str, Mapping[int, bytes]]
    events: tuple[ReferenceEvent, ...] = ()
    bank: str = DEFAULT_BANK
    events_by_pcr: Mapping[int, tuple[ReferenceEvent, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for label, value in (("name", self.name), ("device class", self.device_class),
                             ("firmware version", self.firmware_version)):
            if not isinstance(value, str) or not NAME_RE.fullmatch(value):
                raise PolicyFormatError(f"policy {label} {str(value)[:80]!r} is not a valid name "
                                        "(letters, digits, '.', '_', '+', '-'; at most 64)")
        selection = _selection(self.selection)
        if self.bank not in selection:
            raise PolicyFormatError(f"policy bank {self.bank!r} is not in its selection")
        pcrs = _pcr_values(self.pcrs, selection)
        events = tuple(self.events)
        if len(events) > MAX_POLICY_EVENTS:
            raise PolicyFormatError(f"policy has more than {MAX_POLICY_EVENTS} reference events")
        size = _BANK_SIZES[self.bank]
        selected = frozenset(selection[self.bank])
        by_pcr: dict[int, list[ReferenceEvent]] = {}
        for i, ev in enumerate(events):
            if not isinstance(ev, ReferenceEvent):
                raise PolicyFormatError(f"policy event {i} is not a ReferenceEvent")
            if ev.pcr not in selected:
                raise PolicyFormatError(f"policy event {i} is in PCR {ev.pcr}, which the policy does not "
                                        "select")
            if not isinstance(ev.type, int) or not 0 <= ev.type <= 0xFFFFFFFF or ev.type == _EV_NO_ACTION:
                raise PolicyFormatError(f"policy event {i}: invalid or non-extending event type")
            if not isinstance(ev.digest, bytes) or len(ev.digest) != size:
                raise PolicyFormatError(f"policy event {i}: digest must be {size} bytes ({self.bank})")
            if not isinstance(ev.description, str) or ev.description != _clean(ev.description):
                raise PolicyFormatError(f"policy event {i}: description must be one printable line of at "
                                        f"most {MAX_DESCRIPTION} characters without double quotes")
            by_pcr.setdefault(ev.pcr, []).append(ev)
        for pcr, evs in by_pcr.items():
            # The reference value must be the replay of the reference events; PCR 0 may start with the
            # StartupLocality locality 0, 3 or 4 (PFP 10.4.5.3; 4 also for an H-CRTM, Part 1 'H-CRTM').
            starts = [_initial(self.bank, pcr, loc) for loc in ((0, 3, 4) if pcr == 0 else (0,))]
            if pcr in DRTM_PCRS:
                starts.append(bytes(size))  # after a dynamic launch (PTP)
            digests = [e.digest for e in evs]
            if not any(_replay(self.bank, s, digests) == pcrs[self.bank][pcr] for s in starts):
                raise PolicyFormatError(f"policy {self.bank} PCR {pcr}: the reference value is not the "
                                        "replay of the policy's reference events for that PCR")
        object.__setattr__(self, "selection", selection)
        object.__setattr__(self, "pcrs", pcrs)
        object.__setattr__(self, "events", events)
        object.__setattr__(self, "events_by_pcr", FrozenDict((p, tuple(e)) for p, e in by_pcr.items()))

    # -- JSON ----------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, JsonValue]:
        """The policy as a JSON-ready dict (see the module docstring for the form)."""
        return {
            "format": POLICY_FORMAT,
            "name": self.name,
            "device_class": self.device_class,
            "firmware_version": self.firmware_version,
            "bank": self.bank,
            "selection": {bank: list(pcrs) for bank, pcrs in self.selection.items()},
            "pcrs": pcrs_to_json(self.pcrs),
            "events": [{"pcr": e.pcr, "type": e.type_name, "digest": e.digest.hex(),
                        "description": e.description} for e in self.events],
        }

    @classmethod
    def from_json(cls, obj: Any) -> ReferencePolicy:
        """Parse the JSON form strictly: unknown or missing fields, wrong types, bad sizes are refused."""
        try:
            f = Fields(obj, "policy")
            fmt = f.integer("format", lo=0, hi=1000)
            if fmt != POLICY_FORMAT:
                raise PolicyFormatError(f"unsupported policy format {fmt}")
            name = f.text("name", max_len=64, pattern=NAME_RE)
            device_class = f.text("device_class", max_len=64, pattern=NAME_RE)
            firmware_version = f.text("firmware_version", max_len=64, pattern=NAME_RE)
            bank = f.text("bank", max_len=16, choices=tuple(BANK_TO_ALG))
            selection = selection_from_json(f.raw("selection"), "policy.selection")
            pcrs = pcrs_from_json(f.raw("pcrs"), "policy.pcrs")
            raw_events = f.raw("events")
            f.done()
            if not isinstance(raw_events, list) or len(raw_events) > MAX_POLICY_EVENTS:
                raise PolicyFormatError(f"policy.events: expected a list of at most {MAX_POLICY_EVENTS} "
                                        "events")
            events = tuple(_event_from_json(e, i, bank) for i, e in enumerate(raw_events))
        except MessageError as exc:
            raise PolicyFormatError(exc.diagnostics()) from None
        return cls(name=name, device_class=device_class, firmware_version=firmware_version,
                   selection=selection, pcrs=pcrs, events=events, bank=bank)

    def canonical_bytes(self) -> bytes:
        """Canonical JSON bytes (sorted keys, compact) of :meth:`to_json`: what is hashed and stored."""
        return canonical_bytes(self.to_json())

    def sha256(self) -> str:
        """SHA-256 (hex) of :meth:`canonical_bytes`: the policy's content identity (cache key)."""
        return hashlib.sha256(self.canonical_bytes()).hexdigest()


def _event_type(text: str, where: str) -> int:
    m = _UNKNOWN_TYPE_RE.fullmatch(text)
    if m:
        return int(m.group(1), 16)
    try:
        return int(EventType[text])
    except KeyError:
        raise PolicyFormatError(f"{where}.type: unknown event type {text[:40]!r}") from None


def _event_from_json(obj: JsonValue, i: int, bank: str) -> ReferenceEvent:
    where = f"policy.events[{i}]"
    f = Fields(obj, where)
    pcr = f.integer("pcr", lo=0, hi=NUM_PCRS - 1)
    etype = _event_type(f.text("type", max_len=40), where)
    digest_hex = f.text("digest", max_len=2 * 64)
    description = f.text("description", max_len=MAX_DESCRIPTION)
    f.done()
    if not _HEX_RE.fullmatch(digest_hex) or len(digest_hex) != 2 * _BANK_SIZES[bank]:
        raise PolicyFormatError(f"{where}.digest: expected {_BANK_SIZES[bank]} bytes of lowercase hex")
    return ReferenceEvent(pcr=pcr, type=etype, digest=bytes.fromhex(digest_hex), description=description)


# --------------------------------------------------------------------------------------------------
# building a policy from a known-good log
# --------------------------------------------------------------------------------------------------
def policy_from_eventlog(log: EventLog, *, name: str, device_class: str, firmware_version: str,
                         bank: str = DEFAULT_BANK, pcrs: Iterable[int] | None = None) -> ReferencePolicy:
    """A policy whose reference is ``log`` (the parsed event log of a known-good boot).

    The selection is the PCRs the log extends in ``bank`` (for the simulator: :data:`SIMULATOR_PCRS`),
    restricted to ``pcrs`` when given; the reference values are the log's replay; the reference events
    are the log's extending events of those PCRs with their ``bank`` digests and
    :func:`event_description`.  Raises :class:`PolicyFormatError` if the log has no such bank or the
    selection is empty.
    """
    if bank not in log.banks:
        raise PolicyFormatError(f"the event log has no {bank} bank (it has {', '.join(log.banks)})")
    try:
        replayer = Replayer.for_log(log, [bank])
        replayer.feed(log.events)
    except EventLogError as exc:
        raise PolicyFormatError(f"the event log cannot be replayed: {exc.diagnostics()}") from None
    values = replayer.values()[bank]
    chosen = sorted(values) if pcrs is None else sorted(set(values) & set(pcrs))
    if not chosen:
        raise PolicyFormatError("the event log extends none of the requested PCRs")
    selected = frozenset(chosen)
    events = tuple(ReferenceEvent(pcr=ev.pcr, type=ev.type, digest=ev.digests[bank],
                                  description=event_description(ev))
                   for ev in log.events
                   if extends_pcr(ev) and ev.pcr in selected and bank in ev.digests)
    return ReferencePolicy(name=name, device_class=device_class, firmware_version=firmware_version,
                           selection={bank: tuple(chosen)}, pcrs={bank: {p: values[p] for p in chosen}},
                           events=events, bank=bank)
