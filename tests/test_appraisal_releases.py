"""Pure core of release reference values (fleet_server.appraisal.releases): which values a device may
match at a given time, and which candidate's appraisal wins; plus the event-level match."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from fleet_server.appraisal.appraise import TRUSTED, UNTRUSTED, Appraisal, BootState, first_event_difference
from fleet_server.appraisal.releases import (
    ASSIGNED,
    CURRENT,
    PREVIOUS,
    AssignmentTerms,
    Candidate,
    candidate_roles,
    choose,
)
from fleet_server.verifier.eventlog import parse_eventlog

pytest.register_assert_rewrite("release_fixtures")
from release_fixtures import profile_policy  # noqa: E402

DEADLINE = 10_000
GRACE_UNTIL = 20_000


@pytest.mark.parametrize(("now", "state", "grace_until", "expected"), [
    (0, None, None, (CURRENT,)),
    (5_000, "assigned", None, (ASSIGNED, PREVIOUS)),
    (5_000, "downloading", None, (ASSIGNED, PREVIOUS)),
    (5_000, "rebooting", None, (ASSIGNED, PREVIOUS)),
    (DEADLINE, "rebooting", None, (PREVIOUS,)),            # deadline passed without commit
    (DEADLINE + 1, "installed", None, (PREVIOUS,)),
    (5_000, "rolled_back", None, (PREVIOUS,)),             # rolled back: release refused even in time
    (5_000, "failed", None, (PREVIOUS,)),
    (15_000, "committed", GRACE_UNTIL, (ASSIGNED, PREVIOUS)),  # after the deadline: commit counts
    (GRACE_UNTIL, "committed", GRACE_UNTIL, (ASSIGNED,)),  # grace over: previous retired
    (15_000, "committed", None, (ASSIGNED,)),
])
def test_candidate_roles(now: int, state: str | None, grace_until: int | None,
                         expected: tuple[str, ...]) -> None:
    terms = None if state is None else AssignmentTerms(state, DEADLINE, grace_until)
    assert candidate_roles(now, terms) == expected


_QUOTE: Any = object()  # stands for a verified quote (choose() only checks that there is one)


def _appraisal(verdict: str, reasons: tuple[str, ...] = (), *, quote: Any = _QUOTE,
               boot: BootState | None = None) -> Appraisal:
    if boot is None and quote is not None:
        boot = BootState.create(reset_count=1, restart_count=0, clock=1)
    return Appraisal(verdict, reasons, quote, boot, {})


def _candidate(role: str, release: str = "") -> Candidate:
    return Candidate(role=role, policy=None, device_class="edge-camera", firmware_version="1.2.0",
                     release=release)


@pytest.mark.parametrize(("verdicts", "winner", "calls"), [
    ([(TRUSTED, ())], 0, 1),
    ([(UNTRUSTED, ("a", "b")), (TRUSTED, ())], 1, 2),
    ([(TRUSTED, ()), (UNTRUSTED, ("a",))], 0, 1),                 # the first trusted wins, no more work
    ([(UNTRUSTED, ("a", "b")), (UNTRUSTED, ("c",))], 1, 2),       # fewest reasons
    ([(UNTRUSTED, ("a",)), (UNTRUSTED, ("c",))], 0, 2),           # tie: the first
])
def test_choose(verdicts: list[tuple[str, tuple[str, ...]]], winner: int, calls: int) -> None:
    candidates = [_candidate(CURRENT), _candidate(PREVIOUS)][: len(verdicts)]
    seen: list[Candidate] = []

    def appraise_with(c: Candidate) -> Appraisal:
        seen.append(c)
        return _appraisal(*verdicts[candidates.index(c)])

    choice = choose(candidates, appraise_with)
    assert choice.candidate is candidates[winner] and len(seen) == calls


def test_choose_stops_when_the_quote_fails() -> None:
    candidates = [_candidate(ASSIGNED, "firmware/x/1.0.0.fwb"), _candidate(PREVIOUS)]
    calls: list[Candidate] = []

    def appraise_with(c: Candidate) -> Appraisal:
        calls.append(c)
        return _appraisal(UNTRUSTED, ("quote: bad signature",), quote=None)

    assert choose(candidates, appraise_with).candidate is candidates[0] and len(calls) == 1
    with pytest.raises(ValueError):
        choose([], appraise_with)


def test_release_candidate_must_match_events_too() -> None:
    """Equal PCR values with an event of another type: trusted by values, refused by the event match."""
    policy = profile_policy("updated-firmware", device_class="edge-camera", version="1.3.0")
    from firmware_sim.boot import BootMedia, build_boot_log
    from firmware_sim.profiles import get_profile

    chosen = get_profile("updated-firmware")
    log = parse_eventlog(build_boot_log(BootMedia.from_specs(chosen.image_specs()),
                                        chosen.boot_settings).to_bytes())
    assert first_event_difference(policy, log) is None
    # The same digests, one event's type changed (the type is not extended into the PCR).
    victim = next(i for i, e in enumerate(policy.events) if e.pcr == 4)
    events = list(policy.events)
    events[victim] = dataclasses.replace(events[victim], type=events[victim].type ^ 0x1)
    other = dataclasses.replace(policy, events=tuple(events))
    found = first_event_difference(other, log)
    assert found is not None and found[0].startswith("PCR 4: ") and found[1].kind == "changed"

    boot = BootState(1, 0, 1, b"x", b"\0" * 32, log)
    candidate = Candidate(role=ASSIGNED, policy=other, device_class="edge-camera", firmware_version="1.3.0",
                          release="firmware/edge-camera/1.3.0.fwb")
    choice = choose([candidate], lambda c: _appraisal(TRUSTED, boot=boot))
    assert choice.appraisal.verdict == UNTRUSTED
    assert choice.appraisal.reasons[0].startswith("release firmware/edge-camera/1.3.0.fwb: PCR 4: ")
    # The administrator's policy is judged by its values as before.
    admin = dataclasses.replace(candidate, role=CURRENT, release="")
    assert choose([admin], lambda c: _appraisal(TRUSTED, boot=boot)).appraisal.verdict == TRUSTED
