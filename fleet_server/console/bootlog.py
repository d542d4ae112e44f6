"""A device's boot event log marked against its reference values, for the device page. Pure.

Each measured event of the policy's bank is compared, PCR by PCR and position by position, with the
policy's reference events - the same walk the appraisal does to explain a differing PCR
(:func:`fleet_server.appraisal.appraise._explain`):

* ``match`` - same type and digest as the reference event at that position;
* ``differs`` - another type or digest;
* ``extra`` - more events in the PCR than the reference has;
* ``missing`` - a reference event the device lacks (a row without an event index);
* ``value_only`` - the policy has a reference value for the PCR but no events to compare with;
* ``not_covered`` - the PCR is not in the policy's selection (or there is no policy);
* ``not_measured`` - EV_NO_ACTION records (never extended into a PCR).

The first event that is not a match in each PCR is ``blamed`` (what the appraisal names), and the
events named in the latest attestation's reasons are ``failing`` (highlighted).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from fleet_server.appraisal.policy import DEFAULT_BANK, ReferencePolicy, event_description
from fleet_server.verifier.eventlog import Event, EventLog
from protocol.tpm.constants import EventType, event_type_name

_EV_NO_ACTION = int(EventType.EV_NO_ACTION)
_CHANGED_RE = re.compile(r"^(?:(\w+) )?PCR (\d+): .*?\(event (\d+),")
_MISSING_RE = re.compile(r"^(?:(\w+) )?PCR (\d+): (\S+) \(\"(.*)\"\) expected by the reference is missing")

MATCH = "match"
DIFFERS = "differs"
EXTRA = "extra"
MISSING = "missing"
VALUE_ONLY = "value_only"
NOT_COVERED = "not_covered"
NOT_MEASURED = "not_measured"
PROBLEMS = frozenset({DIFFERS, EXTRA, MISSING})


@dataclass(frozen=True, slots=True)
class MarkedEvent:
    """One row of the marked log."""

    index: int | None
    pcr: int
    type_name: str
    description: str
    digest: str
    reference_digest: str
    status: str
    blamed: bool = False
    failing: bool = False


@dataclass(frozen=True, slots=True)
class FailingRef:
    """An event named by an attestation reason: PCR and event index (None for a missing event)."""

    pcr: int
    index: int | None
    type_name: str = ""


@dataclass(frozen=True, slots=True)
class PcrRow:
    """A quoted PCR value against its reference value."""

    bank: str
    pcr: int
    value: str
    reference: str
    status: str          # match | differs | not_covered | not_quoted


def failing_from_reasons(reasons: Iterable[str]) -> tuple[FailingRef, ...]:
    """The events named in appraisal reasons (``PCR 4: EV_... (event 23, "...") differs ...``)."""
    out: list[FailingRef] = []
    for reason in reasons:
        changed = _CHANGED_RE.match(reason)
        if changed is not None:
            out.append(FailingRef(int(changed.group(2)), int(changed.group(3))))
            continue
        missing = _MISSING_RE.match(reason)
        if missing is not None:
            out.append(FailingRef(int(missing.group(2)), None, missing.group(3)))
    return tuple(out)


def _measured(ev: Event, bank: str) -> bool:
    return ev.type != _EV_NO_ACTION and bank in ev.digests


def mark_events(log: EventLog, policy: ReferencePolicy | None,
                failing: Sequence[FailingRef] = ()) -> list[MarkedEvent]:
    """Every event of ``log`` with its mark (see the module docstring), missing reference events
    inserted after the last event of their PCR."""
    bank = policy.bank if policy is not None else DEFAULT_BANK
    selected = frozenset(policy.selection.get(bank, ())) if policy is not None else frozenset()
    refs_by_pcr = policy.events_by_pcr if policy is not None else {}
    failing_changed = {(f.pcr, f.index) for f in failing if f.index is not None}
    failing_missing = {f.pcr for f in failing if f.index is None}
    position: dict[int, int] = {}
    blamed_pcrs: set[int] = set()
    last_row_of_pcr: dict[int, int] = {}
    rows: list[MarkedEvent] = []
    for ev in log.events:
        name = event_type_name(ev.type)
        desc = event_description(ev)
        digest = ev.digests.get(bank, b"").hex()
        if ev.type == _EV_NO_ACTION:
            rows.append(MarkedEvent(ev.index, ev.pcr, name, desc, digest, "", NOT_MEASURED))
            continue
        ref_digest = ""
        if policy is None or ev.pcr not in selected:
            status = NOT_COVERED
        elif not refs_by_pcr.get(ev.pcr):
            status = VALUE_ONLY
        elif not _measured(ev, bank):
            status = NOT_COVERED
        else:
            i = position.get(ev.pcr, 0)
            position[ev.pcr] = i + 1
            refs = refs_by_pcr[ev.pcr]
            if i >= len(refs):
                status = EXTRA
            else:
                ref = refs[i]
                ref_digest = ref.digest.hex()
                status = MATCH if ev.type == ref.type and ev.digests[bank] == ref.digest else DIFFERS
        blamed = status in PROBLEMS and ev.pcr not in blamed_pcrs
        if blamed:
            blamed_pcrs.add(ev.pcr)
        rows.append(MarkedEvent(ev.index, ev.pcr, name, desc, digest, ref_digest, status, blamed,
                                (ev.pcr, ev.index) in failing_changed))
        last_row_of_pcr[ev.pcr] = len(rows) - 1
    # Reference events the device lacks, after the last event of their PCR.
    inserts: list[tuple[int, list[MarkedEvent]]] = []
    for pcr, refs in sorted(refs_by_pcr.items()):
        seen = position.get(pcr, 0)
        if pcr not in selected or seen >= len(refs):
            continue
        missing: list[MarkedEvent] = []
        for ref in refs[seen:]:
            blamed = pcr not in blamed_pcrs
            if blamed:
                blamed_pcrs.add(pcr)
            missing.append(MarkedEvent(None, pcr, ref.type_name, ref.description, "", ref.digest.hex(),
                                       MISSING, blamed, blamed and pcr in failing_missing))
        inserts.append((last_row_of_pcr.get(pcr, len(rows) - 1), missing))
    for at, missing in sorted(inserts, key=lambda x: x[0], reverse=True):
        rows[at + 1:at + 1] = missing
    return rows


def pcr_rows(last_pcrs: str | None, policy: ReferencePolicy | None) -> list[PcrRow]:
    """The latest quoted PCRs (``device.last_pcrs`` JSON) against the policy's reference values."""
    quoted: dict[str, dict[int, str]] = {}
    if last_pcrs:
        try:
            raw = json.loads(last_pcrs)
            quoted = {str(b): {int(p): str(v) for p, v in vals.items()} for b, vals in raw.items()}
        except (ValueError, AttributeError, TypeError):
            quoted = {}
    reference: Mapping[str, Mapping[int, bytes]] = policy.pcrs if policy is not None else {}
    out: list[PcrRow] = []
    banks = sorted(set(quoted) | set(reference))
    for bank in banks:
        indices = sorted(set(quoted.get(bank, {})) | set(reference.get(bank, {})))
        for pcr in indices:
            value = quoted.get(bank, {}).get(pcr, "")
            ref = reference.get(bank, {}).get(pcr)
            if ref is None:
                status = "not_covered"
            elif not value:
                status = "not_quoted"
            else:
                status = "match" if value == ref.hex() else "differs"
            out.append(PcrRow(bank, pcr, value, ref.hex() if ref is not None else "", status))
    return out
