"""Appraisal of attestation evidence: quote, TPM clock, event log, reference values.  Pure, hot path.

:func:`appraise` turns one piece of evidence into a verdict.  It never raises for bad evidence: every
problem becomes a reason of an ``untrusted`` :class:`Appraisal` (exceptions are left for programming
errors).  Steps (docs/attestation-service.md, 'Appraisal'):

1. **Quote** (:func:`~fleet_server.verifier.quote.verify_quote`): signature by the enrolled AK over the
   TPMS_ATTEST as received, TPM_GENERATED magic, quote type, the challenge nonce as extraData, the
   challenge's PCR selection, pcrDigest over the supplied PCR values (TPM 2.0 Part 3, 18.4).  A failure
   ends the appraisal (reason ``quote: ...``, no new boot state): nothing else in the evidence is
   authentic.
2. **TPM clock** (TPMS_CLOCK_INFO, Part 2, 10.11.1), against the state held for the device:
   ``resetCount`` higher is a reboot (TPM Reset, Part 1 'System Modes'): the held event log is dropped
   and only a whole log is accepted; a higher ``restartCount`` (TPM Restart: PCRs reset too) likewise.
   ``resetCount`` lower, or ``restartCount`` lower within the same reset, or ``clock`` lower within the
   same reset and restart, means the TPM's state was rolled back (Part 1, 36 'Time': Clock only
   advances, except TPM2_Clear): untrusted, and the held high-water mark is kept.  The clock is not
   compared across resets: after a disorderly shutdown the TPM may legitimately lose up to one NV
   update interval of Clock (and reports ``safe`` = NO).
3. **Event log**: ``eventlog_offset`` 0 parses the whole log; an offset > 0 continues the log held for
   this boot, allowed only when resetCount and restartCount equal the held ones and the offset equals
   the held length; only the new events are parsed (:func:`~fleet_server.verifier.eventlog.
   extend_eventlog`) and fed to a copy of the held :class:`~fleet_server.verifier.eventlog.Replayer`,
   so a continuation costs O(new events).  The replay must equal every quoted PCR the log covers
   (:func:`~fleet_server.verifier.quote.check_replay`), so a continuation cannot hide another boot.
4. **Reference values**: every PCR of the policy's selection must have been quoted and equal the
   policy's value.  For each differing PCR the device's events of that PCR are walked against the
   policy's reference events and the first difference is named (changed digest or type, an
   unexpected extra event, a missing event), e.g. ``PCR 4: EV_EFI_BOOT_SERVICES_APPLICATION (event 23,
   "\\EFI\\BOOT\\grubx64.efi") differs from reference``; it is also returned as a
   :class:`FailingEvent` for the console.  No policy: untrusted ("no reference values ...").

The state the server keeps per device and boot is a :class:`BootState`: the TPM counters and clock of
the last verified quote and the appraised log bytes.  Its parsed log and replay state are derived from
the bytes (rebuilt on demand, never persisted); :class:`BootStateCache` keeps them between
attestations so the steady state (a continuation with no or few new events) does not parse again.
Correctness never depends on the cache: a miss rebuilds from :attr:`BootState.log`.

Freshness of the challenge (deadline, single use) is checked by the service before it calls this.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from fleet_server.appraisal.policy import ReferenceEvent, ReferencePolicy, event_description
from fleet_server.verifier.eventlog import (
    Event,
    EventLog,
    Replayer,
    extend_eventlog,
    extends_pcr,
    parse_eventlog,
    replayable_banks,
)
from fleet_server.verifier.quote import AttestationKey, QuoteInfo, check_replay, verify_quote
from protocol.errors import EdgeError
from protocol.messages import MAX_EVENTLOG, Evidence
from protocol.tpm.constants import event_type_name

__all__ = [
    "EMPTY_SHA256",
    "MAX_HELD_LOG",
    "TRUSTED",
    "UNTRUSTED",
    "Appraisal",
    "BootState",
    "BootStateCache",
    "ChallengeRecord",
    "FailingEvent",
    "appraise",
    "first_event_difference",
]

TRUSTED = "trusted"
UNTRUSTED = "untrusted"
#: Most bytes of event log held for one boot (the challenge's log_offset allows at most this much).
MAX_HELD_LOG = 64 * MAX_EVENTLOG
EMPTY_SHA256 = hashlib.sha256(b"").digest()

PcrValues = dict[str, dict[int, bytes]]


# --------------------------------------------------------------------------------------------------
# values
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ChallengeRecord:
    """A challenge as the server stored it: nonce, PCR selection, issue time and deadline (ms)."""

    challenge_id: str
    nonce: bytes
    selection: Mapping[str, tuple[int, ...]]
    issued_at: int
    deadline: int


@dataclass(frozen=True, slots=True)
class BootState:
    """What the server keeps per device within one boot (the service persists the first five fields).

    ``reset_count``/``restart_count``/``clock`` come from the last verified quote; ``log`` is the
    appraised event log of this boot so far (empty: nothing held, the next evidence must carry the
    whole log) and ``log_sha256`` its SHA-256.  ``parsed``, ``replayer`` and ``replayed`` are derived
    from ``log`` (parsed log, replay state, replayed PCR values); they are never persisted and are
    rebuilt from ``log`` when absent.  The replayer is never mutated once it is in a BootState.
    """

    reset_count: int
    restart_count: int
    clock: int
    log: bytes
    log_sha256: bytes
    parsed: EventLog | None = field(default=None, repr=False, compare=False)
    replayer: Replayer | None = field(default=None, repr=False, compare=False)
    replayed: Mapping[str, Mapping[int, bytes]] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def create(cls, *, reset_count: int, restart_count: int, clock: int, log: bytes = b"") -> BootState:
        """A state with ``log_sha256`` computed from ``log`` (derived data built on first use)."""
        return cls(reset_count, restart_count, clock, log, hashlib.sha256(log).digest())

    @property
    def prepared(self) -> bool:
        """True if the derived data is present (no parse needed to continue this log)."""
        return self.parsed is not None and self.replayer is not None and self.replayed is not None


@dataclass(frozen=True, slots=True)
class FailingEvent:
    """An event the appraisal blames for a PCR that differs from the reference.

    ``kind`` is ``"changed"`` (digest or type differ from the reference event at that position),
    ``"unexpected"`` (the device has more events in that PCR than the reference) or ``"missing"``
    (the reference has an event the device lacks; ``index`` is then None and type and description
    are the reference's).
    """

    pcr: int
    index: int | None
    type_name: str
    description: str
    kind: str


@dataclass(frozen=True, slots=True)
class Appraisal:
    """The outcome of :func:`appraise`.

    ``quote`` is set when the quote verified; ``boot`` is the state to persist for the device (None
    when the quote did not verify or the TPM clock went backwards: keep the previous state);
    ``pcrs`` the quoted PCR values (empty if the quote did not verify); ``failing`` the events named
    in the reasons, for the console.
    """

    verdict: str
    reasons: tuple[str, ...]
    quote: QuoteInfo | None
    boot: BootState | None
    pcrs: PcrValues
    failing: tuple[FailingEvent, ...] = ()

    @property
    def trusted(self) -> bool:
        return self.verdict == TRUSTED


# --------------------------------------------------------------------------------------------------
# held log
# --------------------------------------------------------------------------------------------------
class _HeldLogError(Exception):
    """Internal: the held log cannot be used (reason in args[0])."""


def _replay_banks(log: EventLog, wanted: Iterable[str]) -> tuple[str, ...]:
    """The banks of ``wanted`` that ``log`` carries and that can be hashed here, in log order."""
    want = set(wanted)
    return tuple(b for b in replayable_banks(log) if b in want)


def _prepare(state: BootState, banks: Iterable[str]) -> BootState:
    """``state`` with derived data replaying at least ``banks`` (those the log has), parsing and
    replaying ``state.log`` if the data is absent or replays too few banks."""
    if state.prepared:
        assert state.parsed is not None and state.replayer is not None
        needed = _replay_banks(state.parsed, banks)
        if set(needed) <= set(state.replayer.banks):
            return state
        banks = set(needed) | set(state.replayer.banks)
    if not state.log:
        raise _HeldLogError("no event log of this boot is held")
    if hashlib.sha256(state.log).digest() != state.log_sha256:
        raise _HeldLogError("the held event log does not match its SHA-256 (corrupt state)")
    try:
        parsed = parse_eventlog(state.log)
        replayer = Replayer.for_log(parsed, _replay_banks(parsed, banks))
        replayer.feed(parsed.events)
    except EdgeError as exc:
        raise _HeldLogError(f"the held event log cannot be used: {exc.diagnostics()}") from None
    return BootState(state.reset_count, state.restart_count, state.clock, state.log, state.log_sha256,
                     parsed, replayer, replayer.values())


# --------------------------------------------------------------------------------------------------
# reference comparison
# --------------------------------------------------------------------------------------------------
def _label(bank: str, pcr: int, policy: ReferencePolicy) -> str:
    return f"PCR {pcr}" if bank == policy.bank else f"{bank} PCR {pcr}"


def _explain(bank: str, pcr: int, policy: ReferencePolicy, parsed: EventLog | None,
             covered: bool) -> tuple[str, FailingEvent | None]:
    """Reason (and blamed event) for a PCR whose quoted value differs from the reference."""
    label = _label(bank, pcr, policy)
    if parsed is None:
        return f"{label}: value differs from reference (no usable event log to explain it)", None
    if not covered:
        return f"{label}: value differs from reference; the event log has no events for this PCR", None
    refs: tuple[ReferenceEvent, ...] = policy.events_by_pcr.get(pcr, ())
    if not refs:  # a value-only reference: there is nothing to compare events with
        return f"{label}: value differs from reference (the policy has no reference events for it)", None
    found = _walk(label, pcr, policy, parsed)
    if found is not None:
        return found
    return f"{label}: value differs from reference, but its events match the reference events", None


def _walk(label: str, pcr: int, policy: ReferencePolicy, parsed: EventLog) -> tuple[str, FailingEvent] | None:
    """The first of the device's events of ``pcr`` that differs from the policy's, or None."""
    refs: tuple[ReferenceEvent, ...] = policy.events_by_pcr.get(pcr, ())
    ref_bank = policy.bank
    device: list[Event] = [ev for ev in parsed.events
                           if ev.pcr == pcr and extends_pcr(ev) and ref_bank in ev.digests]
    for i in range(max(len(device), len(refs))):
        if i >= len(device):
            ref = refs[i]
            return (f'{label}: {ref.type_name} ("{ref.description}") expected by the reference is missing',
                    FailingEvent(pcr, None, ref.type_name, ref.description, "missing"))
        ev = device[i]
        name = event_type_name(ev.type)
        if i >= len(refs):
            desc = event_description(ev)
            return (f'{label}: unexpected {name} (event {ev.index}, "{desc}") not in the reference',
                    FailingEvent(pcr, ev.index, name, desc, "unexpected"))
        ref = refs[i]
        if ev.type != ref.type or ev.digests[ref_bank] != ref.digest:
            desc = event_description(ev)
            return (f'{label}: {name} (event {ev.index}, "{desc}") differs from reference',
                    FailingEvent(pcr, ev.index, name, desc, "changed"))
    return None


def first_event_difference(policy: ReferencePolicy, parsed: EventLog) -> tuple[str, FailingEvent] | None:
    """The first event of ``parsed`` (in PCR order) that differs from ``policy``'s reference events.

    An event-level match, stricter than comparing PCR values: equal values already imply equal
    digest sequences, but not equal event *types* (the type is not extended; TCG PFP 10.4.1), and a
    release's reference values name every event of its boot.  PCRs without reference events are
    value-only references and are skipped.  Returns the reason and the blamed event, or None.
    """
    for pcr in sorted(policy.events_by_pcr):
        found = _walk(_label(policy.bank, pcr, policy), pcr, policy, parsed)
        if found is not None:
            return found
    return None


def _check_policy(policy: ReferencePolicy, pcrs: Mapping[str, Mapping[int, bytes]], parsed: EventLog | None,
                  replayed: Mapping[str, Mapping[int, bytes]] | None,
                  reasons: list[str], failing: list[FailingEvent]) -> None:
    for bank, selected in policy.selection.items():
        reference = policy.pcrs[bank]
        quoted = pcrs.get(bank)
        if quoted == reference:  # the usual case, one dict comparison (public values, no timing concern)
            continue
        for pcr in selected:
            value = quoted.get(pcr) if quoted is not None else None
            if value is None:
                reasons.append(f"{_label(bank, pcr, policy)} is in the policy {policy.name} but was not "
                               "quoted")
                continue
            if value == reference[pcr]:  # public values: no need for a constant-time compare
                continue
            covered = replayed is not None and pcr in replayed.get(bank, {})
            reason, blamed = _explain(bank, pcr, policy, parsed, covered)
            reasons.append(reason)
            if blamed is not None:
                failing.append(blamed)


# --------------------------------------------------------------------------------------------------
# appraisal
# --------------------------------------------------------------------------------------------------
def _clock_problem(previous: BootState, quote: QuoteInfo) -> str | None:
    """Why the quote's TPMS_CLOCK_INFO is older than the held one, or None (see step 2)."""
    if quote.reset_count < previous.reset_count:
        return (f"TPM clock went backwards: resetCount {quote.reset_count} is lower than the "
                f"{previous.reset_count} seen before (TPM state rolled back or cleared)")
    if quote.reset_count > previous.reset_count:
        return None
    if quote.restart_count < previous.restart_count:
        return (f"TPM clock went backwards: restartCount {quote.restart_count} is lower than the "
                f"{previous.restart_count} seen before in the same boot (TPM state rolled back)")
    if quote.restart_count == previous.restart_count and quote.clock < previous.clock:
        return (f"TPM clock went backwards: clock {quote.clock} ms is lower than the {previous.clock} ms "
                "seen before in the same boot (TPM state rolled back)")
    return None


def _replay_matches(replayed: Mapping[str, Mapping[int, bytes]], pcrs: Mapping[str, Mapping[int, bytes]]
                    ) -> bool:
    """Fast path of :func:`check_replay`: True if the log replays exactly the quoted PCRs of every
    quoted bank (one dict comparison per bank); False means 'compare PCR by PCR'."""
    for bank, values in pcrs.items():
        if replayed.get(bank) != values:
            return False
    return bool(pcrs)


def _untrusted(reason: str) -> Appraisal:
    return Appraisal(UNTRUSTED, (reason,), None, None, {})


def appraise(*, ak: AttestationKey, challenge: ChallengeRecord, evidence: Evidence,
             previous: BootState | None, policy: ReferencePolicy | None, allow_sha1: bool = False,
             device_class: str | None = None, firmware_version: str | None = None) -> Appraisal:
    """Appraise ``evidence`` answering ``challenge`` from the device whose AK is ``ak``.

    ``previous`` is the device's :class:`BootState` (None before its first verified quote), ``policy``
    the reference policy of its class and firmware (None if there is none).  ``device_class`` and
    ``firmware_version`` (optional) name the device's enrolled class and firmware: they appear in the
    "no reference values" reason and must match the policy's when given.  See the module docstring for
    the steps.  Returns an :class:`Appraisal`; never raises for bad evidence.
    """
    if evidence.challenge_id != challenge.challenge_id:
        return _untrusted(f"evidence answers challenge {evidence.challenge_id}, not {challenge.challenge_id}")
    try:
        quote = verify_quote(ak=ak, attest=evidence.attest, signature=evidence.signature,
                             nonce=challenge.nonce, pcr_values=evidence.pcrs,
                             expected_selection=challenge.selection, allow_sha1=allow_sha1)
    except EdgeError as exc:  # StructureError, SignatureError, QuoteError
        return _untrusted(f"quote: {exc.diagnostics()}")
    pcrs: PcrValues = {bank: dict(values) for bank, values in evidence.pcrs.items()}

    # -- 2. TPM clock --------------------------------------------------------------------------------
    if previous is not None:
        problem = _clock_problem(previous, quote)
        if problem is not None:
            return Appraisal(UNTRUSTED, (problem,), quote, None, pcrs)
    same_boot = (previous is not None and quote.reset_count == previous.reset_count
                 and quote.restart_count == previous.restart_count)

    # -- 3. event log ------------------------------------------------------------------------------
    reasons: list[str] = []
    state: BootState | None = None  # the new held log, when the evidence's log is consistent
    offset = evidence.eventlog_offset
    suffix = evidence.eventlog
    # Only the banks the quote covers are replayed: the others cannot be checked against the TPM.
    banks = tuple(bank for bank, _ in quote.selection)
    if offset == 0:
        try:
            parsed = parse_eventlog(suffix)
            replayer = Replayer.for_log(parsed, _replay_banks(parsed, banks))
            replayer.feed(parsed.events)
        except EdgeError as exc:
            reasons.append(f"event log: {exc.diagnostics()}")
        else:
            state = BootState(quote.reset_count, quote.restart_count, quote.clock, bytes(suffix),
                              hashlib.sha256(suffix).digest(), parsed, replayer, replayer.values())
    elif previous is None:
        reasons.append(f"event log continuation at offset {offset}, but no event log of this device is "
                       "held: the whole log is required")
    elif not same_boot:
        reasons.append(f"event log continuation at offset {offset} across a reboot refused (resetCount "
                       f"{previous.reset_count} -> {quote.reset_count}, restartCount "
                       f"{previous.restart_count} -> {quote.restart_count}): the whole log of the new boot "
                       "is required")
    elif offset != len(previous.log):
        reasons.append(f"event log continuation at offset {offset} does not match the {len(previous.log)} "
                       "bytes held for this boot: the whole log is required")
    elif offset + len(suffix) > MAX_HELD_LOG:
        reasons.append(f"event log of this boot would exceed {MAX_HELD_LOG} bytes")
    else:
        try:
            held = _prepare(previous, banks)
        except _HeldLogError as exc:
            reasons.append(f"event log continuation refused: {exc.args[0]}; the whole log is required")
            previous = BootState(previous.reset_count, previous.restart_count, previous.clock, b"",
                                 EMPTY_SHA256)
        else:
            previous = held
            assert held.parsed is not None and held.replayer is not None and held.replayed is not None
            if not suffix:  # the steady state: nothing new since the last appraisal
                state = BootState(quote.reset_count, quote.restart_count, quote.clock, held.log,
                                  held.log_sha256, held.parsed, held.replayer, held.replayed)
            else:
                try:
                    parsed = extend_eventlog(held.parsed, suffix)
                    replayer = held.replayer.copy()  # never mutate a replayer another state holds
                    replayer.feed(parsed.events[len(held.parsed.events):])
                except EdgeError as exc:
                    reasons.append(f"event log continuation: {exc.diagnostics()}")
                else:
                    log = held.log + bytes(suffix)
                    state = BootState(quote.reset_count, quote.restart_count, quote.clock, log,
                                      hashlib.sha256(log).digest(), parsed, replayer, replayer.values())

    if state is not None:
        assert state.replayed is not None
        try:
            checked = _replay_matches(state.replayed, pcrs) or check_replay(state.replayed, pcrs)
        except EdgeError as exc:  # EventLogMismatchError names bank and PCR of each mismatch
            reasons.append(exc.diagnostics())
            state = None
        else:
            if not checked:  # fail closed: a log that explains none of the quoted PCRs proves nothing
                reasons.append("event log covers none of the quoted PCRs (" + ", ".join(
                    f"{bank}: {','.join(map(str, p))}" for bank, p in quote.selection) + ")")
                state = None

    # -- 4. reference values ------------------------------------------------------------------------
    failing: list[FailingEvent] = []
    if policy is None:
        reasons.append(f"no reference values for class {device_class or '(unknown)'} firmware "
                       f"{firmware_version or '(unknown)'}")
    else:
        if device_class is not None and device_class != policy.device_class:
            reasons.append(f"policy {policy.name} is for class {policy.device_class}, not {device_class}")
        if firmware_version is not None and firmware_version != policy.firmware_version:
            reasons.append(f"policy {policy.name} is for firmware {policy.firmware_version}, "
                           f"not {firmware_version}")
        _check_policy(policy, pcrs, state.parsed if state is not None else None,
                      state.replayed if state is not None else None, reasons, failing)

    # -- new boot state -------------------------------------------------------------------------------
    if state is None:
        # The quote is authentic, so its clock is the new high-water mark.  Within the same boot the
        # previously appraised prefix stays valid; otherwise nothing is held (whole log next time).
        if same_boot and previous is not None:
            state = BootState(quote.reset_count, quote.restart_count, quote.clock, previous.log,
                              previous.log_sha256, previous.parsed, previous.replayer, previous.replayed)
        else:
            state = BootState(quote.reset_count, quote.restart_count, quote.clock, b"", EMPTY_SHA256)
    return Appraisal(UNTRUSTED if reasons else TRUSTED, tuple(reasons), quote, state, pcrs, tuple(failing))


# --------------------------------------------------------------------------------------------------
# cache
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Derived:
    size: int
    parsed: EventLog
    replayer: Replayer
    replayed: Mapping[str, Mapping[int, bytes]]


class BootStateCache:
    """Bounded LRU of the derived data (parsed log, replayer, replayed PCRs) of held event logs.

    Keyed by ``(device_id, log_sha256)``: content-addressed, so an entry can never be stale; the TPM
    counters and clock always come from the persisted :class:`BootState`.  Use::

        previous = cache.attach(device_id, state_from_database)   # hit: no parse in appraise()
        result = appraise(..., previous=previous, ...)
        if result.boot is not None:
            persist(result.boot)
            cache.store(device_id, result.boot)

    Thread-safe.  A miss is harmless: :func:`appraise` rebuilds the data from ``BootState.log``.
    """

    def __init__(self, max_entries: int = 1024) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._max = max_entries
        self._entries: OrderedDict[tuple[str, bytes], _Derived] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def attach(self, device_id: str, state: BootState) -> BootState:
        """``state`` with the cached derived data of its log, or ``state`` itself on a miss."""
        if state.prepared or not state.log:
            return state
        key = (device_id, state.log_sha256)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self.hits += 1
            else:
                self.misses += 1
        if entry is None or entry.size != len(state.log):
            return state
        return BootState(state.reset_count, state.restart_count, state.clock, state.log, state.log_sha256,
                         entry.parsed, entry.replayer, entry.replayed)

    def store(self, device_id: str, state: BootState) -> None:
        """Remember the derived data of ``state`` (ignored if it has none or holds no log)."""
        if not state.log or state.parsed is None or state.replayer is None or state.replayed is None:
            return
        key = (device_id, state.log_sha256)
        entry = _Derived(len(state.log), state.parsed, state.replayer, state.replayed)
        with self._lock:
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
