"""Which reference values a device may match while it installs a firmware release.  Pure.

Reference values travel with a release (docs/updates.md): the verifier accepts a release's values for
a device only once that device has been assigned the release, only until the assignment's deadline
unless the device commits it, and after the commit keeps accepting the values of what the device ran
before for a grace period (a rollback to the old slot still attests), then retires them.

The service describes a device's newest assignment as :class:`AssignmentTerms`; :func:`candidate_roles`
says which reference values are acceptable now:

* ``current`` - no assignment: what the device runs (the administrator's policy of its class and
  firmware, as without releases);
* ``assigned`` - the assigned release;
* ``previous`` - what the device ran when it was assigned the release (a release, or the
  administrator's policy of the class and firmware it had).

:func:`choose` appraises the evidence against each candidate (the appraisal itself is passed in: it
is :func:`~fleet_server.appraisal.appraise.appraise` with the candidate's policy) and picks the one
that matches.  For a release's reference values the device's events must match too
(:func:`~fleet_server.appraisal.appraise.first_event_difference`), so the reason of a mismatch names
the first differing event.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from fleet_server.appraisal.appraise import TRUSTED, UNTRUSTED, Appraisal, first_event_difference
from fleet_server.appraisal.policy import ReferencePolicy

__all__ = ["ASSIGNED", "CURRENT", "PREVIOUS", "AssignmentTerms", "Candidate", "Choice", "candidate_roles",
           "choose"]

CURRENT = "current"
ASSIGNED = "assigned"
PREVIOUS = "previous"

_COMMITTED = "committed"
_ENDED = ("rolled_back", "failed")


@dataclass(frozen=True, slots=True)
class AssignmentTerms:
    """The parts of a device's newest assignment that decide which reference values it may match."""

    state: str  # an assignment state (fleet_server.storage.release_tables.AssignmentState)
    deadline: int  # ms: the release's values are accepted until then unless committed
    grace_until: int | None  # ms: after the commit, the previous values are accepted until then


def candidate_roles(now: int, terms: AssignmentTerms | None) -> tuple[str, ...]:
    """The acceptable reference values at ``now`` (ms), most expected first (see the module docstring).

    Committed: the release, plus the previous values before ``grace_until``.  Rolled back or failed:
    the previous values only.  In progress: the previous values, plus the release before ``deadline``.
    """
    if terms is None:
        return (CURRENT,)
    if terms.state == _COMMITTED:
        grace = terms.grace_until is not None and now < terms.grace_until
        return (ASSIGNED, PREVIOUS) if grace else (ASSIGNED,)
    if terms.state in _ENDED:
        return (PREVIOUS,)
    return (ASSIGNED, PREVIOUS) if now < terms.deadline else (PREVIOUS,)


@dataclass(frozen=True, slots=True)
class Candidate:
    """Reference values the evidence may match: ``release`` is its TUF target path ("" for the
    administrator's policy), ``policy`` None when there is no such policy (never matches)."""

    role: str
    policy: ReferencePolicy | None
    device_class: str  # what the device runs when it matches (its class and firmware follow it)
    firmware_version: str
    release: str = ""
    release_id: int | None = None
    policy_id: int | None = None
    name: str = ""  # the policy's or release's name, for causes and logs


@dataclass(frozen=True, slots=True)
class Choice:
    """The candidate the evidence was judged against and that appraisal."""

    candidate: Candidate
    appraisal: Appraisal


def _with_events(candidate: Candidate, appraisal: Appraisal) -> Appraisal:
    """A trusted appraisal against a release's values, untrusted if the device's events differ."""
    if not candidate.release or candidate.policy is None or appraisal.verdict != TRUSTED:
        return appraisal
    boot = appraisal.boot
    if boot is None or boot.parsed is None:
        return replace(appraisal, verdict=UNTRUSTED, reasons=(
            f"release {candidate.release}: no event log to match its reference events",))
    found = first_event_difference(candidate.policy, boot.parsed)
    if found is None:
        return appraisal
    reason, event = found
    return replace(appraisal, verdict=UNTRUSTED, reasons=(f"release {candidate.release}: {reason}",),
                   failing=(event,))


def choose(candidates: Sequence[Candidate], appraise_with: Callable[[Candidate], Appraisal]) -> Choice:
    """Appraise against each candidate in order; the first that is trusted wins.

    When none is, the verdict is the appraisal with the fewest reasons (the first on a tie): the
    candidate the device most nearly runs, so its reasons name what differs from it.  The quote,
    clock and boot state do not depend on the candidate, and neither does a failure before the
    reference values (it is the same for every candidate).
    """
    if not candidates:
        raise ValueError("choose() needs at least one candidate")
    best: Choice | None = None
    for candidate in candidates:
        appraisal = _with_events(candidate, appraise_with(candidate))
        if appraisal.verdict == TRUSTED:
            return Choice(candidate, appraisal)
        if best is None or len(appraisal.reasons) < len(best.appraisal.reasons):
            best = Choice(candidate, appraisal)
        if appraisal.quote is None or appraisal.boot is None:
            break  # quote or TPM clock failed: no candidate can do better
    assert best is not None
    return best
