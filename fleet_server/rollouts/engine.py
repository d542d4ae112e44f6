"""The progress rules of a rollout (pure: the service reads the rows, passes the time in, and writes
what these functions decide).

* :func:`judge` - the new state of one assigned member from what the server observed, judged per
  rollout kind (:class:`Observed` for firmware: ``succeeded`` once the assignment is committed
  **and** the device is trusted on the release, ``rolled_back`` / ``failed`` as the device
  reported; :class:`ModelObserved` for a model version: ``succeeded`` once the device reported the
  version ``loaded`` **and** is trusted, ``failed`` on a load failure report with onnxruntime's
  reason); for both ``untrusted_after_update`` when the device turned untrusted after it was
  assigned, ``timed_out`` after ``device_timeout_s``. A device
  that timed out or failed to install goes back to ``pending`` while it has retries left.
* :func:`progress` - per phase: devices, succeeded, failed, and those pending or in flight.
* :func:`decide` - one step: abort (a failure kind over its threshold after ``min_executed``
  finished devices, or a phase that finished below its success threshold), advance phases whose
  success rate reached their threshold, complete after the last, and which pending devices to
  assign now (the current phase and earlier ones; not outside the window, not before the phase's
  approval, at most ``max_rate`` per minute).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from fleet_server.rollouts.plan import Plan, in_window

PENDING, ASSIGNED, SUCCEEDED = "pending", "assigned", "succeeded"
FINAL = frozenset({SUCCEEDED, "failed", "rolled_back", "timed_out", "untrusted_after_update"})
RETRIED = frozenset({"failed", "timed_out"})
RATE_WINDOW_MS = 60_000


@dataclass(frozen=True, slots=True)
class Member:
    device_id: str
    phase: int
    order_key: str
    state: str
    attempts: int
    assigned_at: int | None
    finished_at: int | None


@dataclass(frozen=True, slots=True)
class Judged:
    state: str
    reason: str
    finished_at: int | None


def _untrusted(member: Member, device_state: str, changed_at: int) -> Judged | None:
    assert member.assigned_at is not None
    if device_state == "untrusted" and changed_at >= member.assigned_at:
        return Judged("untrusted_after_update", "the device attested untrusted after the update", changed_at)
    return None


@dataclass(frozen=True, slots=True)
class Observed:
    """What the server knows of an assigned member's device (a firmware rollout)."""

    assignment_state: str | None  # of the member's assignment (None: it is gone)
    assignment_reason: str
    assignment_updated_at: int
    on_release: bool  # the device's last trusted evidence matched the rollout's release
    device_state: str
    device_state_changed_at: int

    def outcome(self, member: Member) -> Judged | None:
        """Succeeded: committed and trusted on the release; else rolled back, failed, untrusted."""
        if self.assignment_state == "committed" and self.on_release and self.device_state == "trusted":
            return Judged(SUCCEEDED, "", self.assignment_updated_at)
        if self.assignment_state == "rolled_back":
            return Judged("rolled_back", self.assignment_reason, self.assignment_updated_at)
        if self.assignment_state == "failed":
            return Judged("failed", self.assignment_reason or "install failed", self.assignment_updated_at)
        return _untrusted(member, self.device_state, self.device_state_changed_at)


@dataclass(frozen=True, slots=True)
class ModelObserved:
    """What the server knows of an assigned member's device (a model rollout)."""

    load_state: str | None  # the device's load report of the version since it was assigned (None: none)
    load_error: str         # onnxruntime's own reason of a failed load
    onnxruntime: str
    reported_at: int
    device_state: str
    device_state_changed_at: int

    def outcome(self, member: Member) -> Judged | None:
        """Succeeded: onnxruntime loaded the version and the device is trusted; else failed (a load
        failure report) or untrusted."""
        if self.load_state == "loaded" and self.device_state == "trusted":
            return Judged(SUCCEEDED, "", self.reported_at)
        if self.load_state == "failed":
            reason = f"onnxruntime {self.onnxruntime or '?'} failed to load it: {self.load_error or '-'}"
            return Judged("failed", reason[:512], self.reported_at)
        return _untrusted(member, self.device_state, self.device_state_changed_at)


def judge(member: Member, seen: Observed | ModelObserved, plan: Plan, now: int) -> Judged | None:
    """The assigned member's new state, or None while it is still in flight (see the module doc):
    the kind's own judgement of what it observed (``seen.outcome``), then the shared timeout and
    retry rules."""
    assert member.state == ASSIGNED and member.assigned_at is not None
    out = seen.outcome(member)
    if out is not None and out.state == SUCCEEDED:
        return out
    if out is None and now >= member.assigned_at + plan.device_timeout_ms:
        what = "trusted commit" if isinstance(seen, Observed) else "trusted load of the version"
        out = Judged("timed_out", f"no {what} within {plan.device_timeout_s:g} s",
                     member.assigned_at + plan.device_timeout_ms)
    if out is not None and out.state in RETRIED and member.attempts <= plan.retries:
        return Judged(PENDING, f"{out.state} (attempt {member.attempts}): {out.reason}"[:512], None)
    return out


@dataclass(frozen=True, slots=True)
class PhaseProgress:
    devices: int
    succeeded: int
    failed: int
    pending: int
    assigned: int

    def success_percent(self) -> float:
        return 100.0 if self.devices == 0 else 100.0 * self.succeeded / self.devices


def progress(members: Sequence[Member], phase_count: int) -> list[PhaseProgress]:
    counts = [[0, 0, 0, 0, 0] for _ in range(phase_count)]
    for m in members:
        c = counts[min(m.phase, phase_count - 1)]
        c[0] += 1
        if m.state == SUCCEEDED:
            c[1] += 1
        elif m.state in FINAL:
            c[2] += 1
        elif m.state == PENDING:
            c[3] += 1
        else:
            c[4] += 1
    return [PhaseProgress(*c) for c in counts]


@dataclass(frozen=True, slots=True)
class Decision:
    phase: int
    state: str  # running | completed | aborted
    reason: str
    abort_trigger_at: int | None
    assign: tuple[str, ...]
    waiting: str  # why nothing is assigned now ("" when devices are, or none are left)


def abort_reason(members: Sequence[Member], plan: Plan) -> tuple[str, int] | None:
    """Why the failures call for an abort, and when the crossing failure happened; or None."""
    done = [m for m in members if m.state in FINAL]
    if len(done) < plan.min_executed:
        return None
    for kind in plan.abort_on:
        failed = [m for m in done if m.state == kind]
        share = 100.0 * len(failed) / len(done)
        if failed and share > plan.abort_failure_percent:
            at = max(m.finished_at or 0 for m in failed)
            return (f"{len(failed)} of {len(done)} finished devices {kind} ({share:.0f}% > "
                    f"{plan.abort_failure_percent:g}%)"), at
    return None


def decide(plan: Plan, phase: int, members: Sequence[Member], *, approved: Collection[int],
           now: int) -> Decision:
    """One step of a running rollout whose members were judged already (see the module doc)."""
    abort = abort_reason(members, plan)
    if abort is not None:
        return Decision(phase, "aborted", abort[0], abort[1], (), "")
    count = plan.phase_count()
    phases = progress(members, count)
    while True:
        p = phases[phase]
        if p.success_percent() < plan.threshold(phase):
            if p.pending == 0 and p.assigned == 0:
                at = max((m.finished_at or 0 for m in members if m.phase == phase), default=now)
                return Decision(phase, "aborted", f"phase {phase} finished with {p.success_percent():.0f}% "
                                f"succeeded (needs {plan.threshold(phase):g}%)", at, (), "")
            break
        if phase == count - 1:
            if all(m.state in FINAL for m in members):
                return Decision(phase, "completed", "", None, (), "")
            break
        phase += 1
    if plan.approval and phase > 0 and phase not in approved:
        waiting = f"phase {phase} waits for its approval"
    elif not in_window(plan.window, now):
        waiting = "outside the maintenance window"
    else:
        waiting = ""
    if waiting:
        return Decision(phase, "running", "", None, (), waiting)
    pending = sorted((m for m in members if m.state == PENDING and m.phase <= phase),
                     key=lambda m: (m.phase, m.order_key, m.device_id))
    limit = len(pending)
    if plan.max_rate is not None:
        recent = sum(1 for m in members if m.assigned_at is not None and m.assigned_at > now - RATE_WINDOW_MS)
        limit = max(0, min(limit, plan.max_rate - recent))
        if pending and limit == 0:
            waiting = f"at the maximum rate ({plan.max_rate}/min)"
    return Decision(phase, "running", "", None, tuple(m.device_id for m in pending[:limit]), waiting)
