"""Staged rollouts of firmware releases: create, step, and the operators' operations (see
docs/rollouts.md).

* :func:`create_rollout` stores a rollout, its members (the target group split into phases by
  :func:`fleet_server.rollouts.plan.split_phases`) and starts it (``running``, or ``draft`` until
  :func:`resume`). :func:`dry_run` gives the same split without storing anything.
* :func:`step_rollout` (every worker, every scheduler tick, through :class:`RolloutStepper`) does
  one step of one running rollout in one write transaction that first locks the rollout's row
  (``SKIP LOCKED`` on PostgreSQL: another worker stepping it is skipped; SQLite serialises
  writers). Devices that now match the group join the last phase; assigned members are judged
  (:func:`fleet_server.rollouts.engine.judge`); :func:`~fleet_server.rollouts.engine.decide`
  aborts, advances, completes, or names the devices to assign, which get the release through
  :func:`fleet_server.service.releases.assign_in_tx` (the signed UpdateAssignment into the outbox)
  in the same transaction as their member row. A step after a restart reads everything from the
  database, so nobody is assigned twice.
* On abort: no new assignments, a critical ``rollout_aborted`` alert, and with
  ``rollback_on_abort`` the updated devices are assigned their previous release (when it is a
  catalog release; otherwise the member records that it cannot be).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

from fleet_server.keys import ResultSigner
from fleet_server.rollouts import engine
from fleet_server.rollouts.plan import (
    Group,
    Placed,
    Plan,
    RolloutError,
    order_key,
    split_phases,
    validate_tag,
)
from fleet_server.service.common import Counters, log_event
from fleet_server.service.releases import ReleaseError, assign_in_tx
from fleet_server.storage.alerting import NewAlert
from fleet_server.storage.release_repo import ReleaseRecord
from fleet_server.storage.release_tables import FINAL_ASSIGNMENT_STATES, AssignmentState, ReleaseState
from fleet_server.storage.repo import Repository, Tx
from fleet_server.storage.rollout_repo import MemberRecord, RolloutRecord
from fleet_server.storage.rollout_tables import FINAL_ROLLOUT_STATES, MemberState, RolloutState
from protocol.messages import new_message_id
from protocol.topics import validate_device_id

log = logging.getLogger(__name__)

ROLLOUT_ABORTED = "rollout_aborted"
ROLLOUT_ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,31}$")
RESERVED_IDS = frozenset({"new"})  # a page of the console's /rollouts/


def _member(m: MemberRecord) -> engine.Member:
    return engine.Member(m.device_id, m.phase, m.order_key, m.state, m.attempts, m.assigned_at, m.finished_at)


def _release(tx: Tx, target: str) -> ReleaseRecord:
    release = tx.releases.release(target)
    if release is None:
        raise RolloutError(f"no release {target[:200]!r}")
    if release.state != ReleaseState.ACTIVE:
        raise RolloutError(f"release {target} is {release.state}")
    return release


def _group_members(tx: Tx, release: ReleaseRecord, group: Group) -> list[str]:
    if group.device_class != release.device_class:
        raise RolloutError(f"the group is of class {group.device_class}, the release is for "
                           f"{release.device_class}")
    found = tx.rollouts.group_devices(group.device_class, firmware=group.firmware, tags=group.tags,
                                      devices=group.devices)
    missing = sorted(set(group.devices) - set(found))
    if missing:
        raise RolloutError(f"device {missing[0]!r} is not an admitted device of class {group.device_class}"
                           + (f" on firmware {group.firmware}" if group.firmware else "")
                           + (f" tagged {', '.join(group.tags)}" if group.tags else ""))
    return found


@dataclass(frozen=True, slots=True)
class DryRun:
    rollout_id: str
    phases: list[list[str]]  # device ids of each phase (index 0: the canary)


def dry_run(repo: Repository, *, target: str, group: Group, plan: Plan,
            rollout_id: str | None = None) -> DryRun:
    """The devices each phase would take (nothing is stored; pass the same ``rollout_id`` to
    :func:`create_rollout` for exactly this split)."""
    rid = _rollout_id(rollout_id)
    with repo.write("planning a rollout") as tx:
        release = _release(tx, target)
        placed = split_phases(rid, plan, _group_members(tx, release, group))
    phases: list[list[str]] = [[] for _ in range(plan.phase_count())]
    for p in placed:
        phases[p.phase].append(p.device_id)
    return DryRun(rid, phases)


def _rollout_id(rollout_id: str | None) -> str:
    if rollout_id is None:
        return new_message_id()
    if ROLLOUT_ID_RE.fullmatch(rollout_id) is None:
        raise RolloutError(f"rollout id {rollout_id[:40]!r}: lowercase letters, digits, '.', '_', '-' "
                           "(at most 32)")
    if rollout_id in RESERVED_IDS:
        raise RolloutError(f"rollout id {rollout_id!r} is reserved (the console's /rollouts/{rollout_id})")
    return rollout_id


def create_rollout(repo: Repository, *, target: str, group: Group, plan: Plan, now: int, actor: str,
                   draft: bool = False, rollout_id: str | None = None) -> RolloutRecord:
    """Store and start a rollout of the release ``target`` (see the module docstring)."""
    rid = _rollout_id(rollout_id)
    with repo.write("creating a rollout") as tx:
        release = _release(tx, target)
        if tx.rollouts.rollout(rid) is not None:
            raise RolloutError(f"rollout {rid} exists already")
        device_ids = _group_members(tx, release, group)
        if not device_ids:
            raise RolloutError("the target group has no devices")
        busy = tx.rollouts.active_memberships(device_ids)
        if busy:
            first = sorted(busy)[0]
            raise RolloutError(f"device {first} is in rollout {busy[first]} still (cancel it first)")
        placed = split_phases(rid, plan, device_ids)
        state = RolloutState.DRAFT if draft else RolloutState.RUNNING
        rec = RolloutRecord(id=rid, kind="firmware", release_id=release.id, target_group=group.to_json(),
                            plan=plan.to_json(), state=state, phase=0, reason="", created_at=now,
                            created_by=actor, started_at=None if draft else now, updated_at=now,
                            abort_trigger_at=None, finished_at=None)
        tx.rollouts.insert_rollout(rec)
        tx.rollouts.insert_members(_new_members(tx, rid, release, placed, now))
    return rec


def _new_members(tx: Tx, rid: str, release: ReleaseRecord, rows: Sequence[Placed], now: int
                 ) -> list[MemberRecord]:
    attested = tx.releases.attested_releases([p.device_id for p in rows])
    out: list[MemberRecord] = []
    for p in rows:
        done = attested.get(p.device_id) == release.id
        out.append(MemberRecord(rid, p.device_id, p.phase, p.order_key,
                                MemberState.SUCCEEDED if done else MemberState.PENDING, 0, None,
                                "runs the release already" if done else "", now, None, now if done else None))
    return out


# -- the step ----------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class StepResult:
    rollout_id: str
    state: str
    phase: int
    assigned: tuple[str, ...]
    joined: tuple[str, ...]
    waiting: str
    reason: str
    abort_latency_ms: int | None  # aborted in this step: from the crossing failure to the abort


def step_rollout(repo: Repository, rollout_id: str, *, signer: ResultSigner, now: int) -> StepResult | None:
    """One step of a running rollout (see the module docstring); None when it is not running or
    another worker holds it."""
    with repo.write("stepping a rollout") as tx:
        rec = tx.rollouts.rollout(rollout_id, skip_locked=True)
        if rec is None or rec.state != RolloutState.RUNNING:
            return None
        plan, group = Plan.from_json(rec.plan), Group.from_json(rec.target_group)
        release = tx.releases.releases_by_id([rec.release_id])[rec.release_id]
        members = tx.rollouts.members(rollout_id)
        if release.state != ReleaseState.ACTIVE:
            reason = f"release {release.target} was withdrawn"
            trigger = min(now, release.withdrawn_at or now)
            _abort(tx, rec, release, plan, members, reason, trigger, now, signer)
            return StepResult(rollout_id, RolloutState.ABORTED, rec.phase, (), (), "", reason, now - trigger)
        joined = _join(tx, rec, release, group, plan, members, now)
        if joined:
            members = tx.rollouts.members(rollout_id)
        members = _judge(tx, rec, release, plan, members, now)
        views = [_member(m) for m in members]
        approved = set(tx.rollouts.approvals(rollout_id))
        decision = engine.decide(plan, rec.phase, views, approved=approved, now=now)
        if decision.state == RolloutState.ABORTED:
            assert decision.abort_trigger_at is not None
            _abort(tx, rec, release, plan, members, decision.reason, decision.abort_trigger_at, now, signer)
            latency = max(0, now - decision.abort_trigger_at)
            return StepResult(rollout_id, RolloutState.ABORTED, decision.phase, (), joined, "",
                              decision.reason, latency)
        values: dict[str, object] = {"phase": decision.phase, "updated_at": now}
        if decision.state == RolloutState.COMPLETED:
            values.update(state=RolloutState.COMPLETED, finished_at=now)
        tx.rollouts.set_rollout(rollout_id, values)
        by_id = {m.device_id: m for m in members}
        assigned: list[str] = []
        for device_id in decision.assign:
            m = by_id[device_id]
            try:
                a = assign_in_tx(tx, release, device_id, signer=signer, now=now,
                                 deadline=now + plan.device_timeout_ms, grace_ms=round(plan.grace_s * 1000),
                                 actor=f"rollout:{rollout_id}")
            except ReleaseError as exc:
                tx.rollouts.set_member(rollout_id, device_id, {
                    "state": MemberState.FAILED, "attempts": m.attempts + 1, "reason": exc.diagnostics(),
                    "finished_at": now})
                continue
            tx.rollouts.set_member(rollout_id, device_id, {
                "state": MemberState.ASSIGNED, "attempts": m.attempts + 1, "assignment_id": a.assignment_id,
                "assigned_at": now, "finished_at": None})
            assigned.append(device_id)
        return StepResult(rollout_id, decision.state, decision.phase, tuple(assigned), joined,
                          decision.waiting, "", None)


def _join(tx: Tx, rec: RolloutRecord, release: ReleaseRecord, group: Group, plan: Plan,
          members: Sequence[MemberRecord], now: int) -> tuple[str, ...]:
    """Devices that match the group now but are not members join the last phase (an explicit
    device list does not grow)."""
    if group.devices:
        return ()
    have = {m.device_id for m in members}
    new = [i for i in tx.rollouts.group_devices(group.device_class, firmware=group.firmware, tags=group.tags,
                                                devices=()) if i not in have]
    if not new:
        return ()
    busy = tx.rollouts.active_memberships(new)
    new = [i for i in new if i not in busy]
    last = plan.phase_count() - 1
    tx.rollouts.insert_members(_new_members(tx, rec.id, release,
                                            [Placed(i, last, order_key(rec.id, i)) for i in new], now))
    return tuple(new)


def _judge(tx: Tx, rec: RolloutRecord, release: ReleaseRecord, plan: Plan, members: list[MemberRecord],
           now: int) -> list[MemberRecord]:
    """Judge the assigned members; returns the members as they are now."""
    ids = [m.device_id for m in members if m.state == MemberState.ASSIGNED]
    if not ids:
        return members
    latest = tx.releases.latest_assignments(ids)
    attested = tx.releases.attested_releases(ids)
    states = tx.rollouts.device_states(ids)
    out: list[MemberRecord] = []
    for m in members:
        if m.state != MemberState.ASSIGNED:
            out.append(m)
            continue
        a = latest.get(m.device_id)
        if a is None or a.id != m.assignment_id:
            a = tx.releases.assignment(m.assignment_id or "")
        state, changed_at = states.get(m.device_id, ("revoked", now))
        seen = engine.Observed(a.state if a else None, a.reason if a else "", a.updated_at if a else now,
                               attested.get(m.device_id) == release.id, state, changed_at)
        judged = engine.judge(_member(m), seen, plan, now)
        if judged is None:
            out.append(m)
            continue
        values: dict[str, object] = {"state": judged.state, "reason": judged.reason,
                                     "finished_at": judged.finished_at}
        if judged.state == MemberState.PENDING and a is not None and a.state not in FINAL_ASSIGNMENT_STATES:
            # Retry: close the timed-out assignment so the next one may replace it.
            tx.releases.set_assignment_state(a.id, state=AssignmentState.FAILED, reason=judged.reason,
                                             now=now)
        tx.rollouts.set_member(rec.id, m.device_id, values)
        out.append(MemberRecord(m.rollout_id, m.device_id, m.phase, m.order_key, judged.state, m.attempts,
                                m.assignment_id, judged.reason, m.joined_at, m.assigned_at,
                                judged.finished_at))
    return out


def _abort(tx: Tx, rec: RolloutRecord, release: ReleaseRecord, plan: Plan, members: Sequence[MemberRecord],
           reason: str, trigger_at: int, now: int, signer: ResultSigner) -> None:
    tx.rollouts.set_rollout(rec.id, {"state": RolloutState.ABORTED, "reason": reason[:512],
                                      "abort_trigger_at": trigger_at, "finished_at": now, "updated_at": now})
    sent_back = _roll_back(tx, rec, release, plan, members, now, signer) if plan.rollback_on_abort else 0
    tx.rollouts.raise_alert(NewAlert(
        kind=ROLLOUT_ABORTED, severity="critical", dedup_key=f"{ROLLOUT_ABORTED}:{rec.id}",
        message=f"rollout {rec.id} of {release.target} aborted: {reason}",
        details={"rollout": rec.id, "release": release.target, "reason": reason, "phase": rec.phase,
                 "sent_back": sent_back}), now)
    log_event(log, logging.WARNING, "rollout_aborted", rollout=rec.id, release=release.target,
              reason=reason, abort_ms=now - trigger_at)


def _roll_back(tx: Tx, rec: RolloutRecord, release: ReleaseRecord, plan: Plan,
               members: Sequence[MemberRecord], now: int, signer: ResultSigner) -> int:
    """Assign their previous release to the members that run the rollout's release (succeeded, or
    untrusted after it); returns how many were sent back."""
    sent = 0
    for m in members:
        updated = m.state in (MemberState.SUCCEEDED, MemberState.UNTRUSTED_AFTER_UPDATE)
        if not updated or m.assignment_id is None:
            continue
        a = tx.releases.assignment(m.assignment_id)
        if a is None:
            continue
        previous = (tx.releases.releases_by_id([a.previous_release_id]).get(a.previous_release_id)
                    if a.previous_release_id is not None else None)
        if previous is None:
            note = (f"cannot roll back: the previous firmware ({a.previous_class} {a.previous_version}) is "
                    "not a release in the catalog")
        else:
            if a.state not in FINAL_ASSIGNMENT_STATES:
                tx.releases.set_assignment_state(a.id, state=AssignmentState.FAILED, reason="rollout aborted",
                                                 now=now)
            try:
                back = assign_in_tx(tx, previous, m.device_id, signer=signer, now=now,
                                    deadline=now + plan.device_timeout_ms,
                                    grace_ms=round(plan.grace_s * 1000),
                                    actor=f"rollout:{rec.id}")
            except ReleaseError as exc:
                note = f"cannot roll back: {exc.diagnostics()}"
            else:
                note = f"sent back to {previous.target} (assignment {back.assignment_id})"
                sent += 1
        tx.rollouts.set_member(rec.id, m.device_id, {"reason": f"{m.reason}; {note}" if m.reason else note})
    return sent


def step_all(repo: Repository, *, signer: ResultSigner, now: int) -> list[StepResult]:
    """One step of every running rollout this worker can lock."""
    with repo.rollouts.reading("listing running rollouts") as rtx:
        ids = [r.id for r in rtx.rollouts([RolloutState.RUNNING])]
    out: list[StepResult] = []
    for rid in ids:
        result = step_rollout(repo, rid, signer=signer, now=now)
        if result is not None:
            out.append(result)
    return out


class RolloutStepper:
    """The workers' periodic rollout step (one per worker; see the module docstring)."""

    def __init__(self, repo: Repository, signer: ResultSigner, counters: Counters) -> None:
        self.repo = repo
        self.signer = signer
        self.counters = counters

    def run_once(self, now: int) -> list[StepResult]:
        results = step_all(self.repo, signer=self.signer, now=now)
        for r in results:
            if r.assigned:
                self.counters.add("rollouts.assigned", len(r.assigned))
            if r.abort_latency_ms is not None:
                self.counters.add("rollouts.aborted")
            elif r.state == RolloutState.COMPLETED:
                self.counters.add("rollouts.completed")
        return results


# -- operations --------------------------------------------------------------------------------------
def _locked(tx: Tx, rollout_id: str) -> RolloutRecord:
    rec = tx.rollouts.rollout(rollout_id, lock=True)
    if rec is None:
        raise RolloutError(f"no rollout {rollout_id[:40]!r}")
    return rec


def pause(repo: Repository, rollout_id: str, *, now: int) -> RolloutRecord:
    """``running`` -> ``paused``: no new assignments (devices in flight are still judged on resume)."""
    return _move(repo, rollout_id, (RolloutState.RUNNING,), RolloutState.PAUSED, now=now)


def resume(repo: Repository, rollout_id: str, *, now: int) -> RolloutRecord:
    """``paused`` or ``draft`` -> ``running``."""
    return _move(repo, rollout_id, (RolloutState.PAUSED, RolloutState.DRAFT), RolloutState.RUNNING, now=now)


def cancel(repo: Repository, rollout_id: str, *, now: int, actor: str) -> RolloutRecord:
    """Stop the rollout for good without an alert or a rollback (assignments in flight go on)."""
    return _move(repo, rollout_id, (RolloutState.DRAFT, RolloutState.RUNNING, RolloutState.PAUSED),
                 RolloutState.CANCELLED, now=now, reason=f"cancelled by {actor}")


def _move(repo: Repository, rollout_id: str, from_states: Sequence[str], to_state: str, *, now: int,
          reason: str = "") -> RolloutRecord:
    with repo.write(f"moving a rollout to {to_state}") as tx:
        rec = _locked(tx, rollout_id)
        if rec.state not in from_states:
            raise RolloutError(f"rollout {rollout_id} is {rec.state}; {to_state} applies to "
                               f"{' or '.join(from_states)} rollouts")
        values: dict[str, object] = {"state": to_state, "updated_at": now}
        if to_state == RolloutState.RUNNING and rec.started_at is None:
            values["started_at"] = now
        if to_state in FINAL_ROLLOUT_STATES:
            values.update(finished_at=now, reason=reason)
        tx.rollouts.set_rollout(rollout_id, values)
        found = tx.rollouts.rollout(rollout_id)
    assert found is not None
    return found


def abort(repo: Repository, rollout_id: str, *, signer: ResultSigner, now: int, actor: str) -> RolloutRecord:
    """Abort by hand: like an automatic abort (alert; rollback when the plan says so)."""
    with repo.write("aborting a rollout") as tx:
        rec = _locked(tx, rollout_id)
        if rec.state not in (RolloutState.RUNNING, RolloutState.PAUSED, RolloutState.DRAFT):
            raise RolloutError(f"rollout {rollout_id} is {rec.state} already")
        release = tx.releases.releases_by_id([rec.release_id])[rec.release_id]
        _abort(tx, rec, release, Plan.from_json(rec.plan), tx.rollouts.members(rollout_id),
               f"aborted by {actor}", now, now, signer)
        found = tx.rollouts.rollout(rollout_id)
    assert found is not None
    return found


def approve(repo: Repository, rollout_id: str, *, now: int, actor: str, phase: int | None = None) -> int:
    """Approve a phase (default: the first not approved yet); returns it."""
    with repo.write("approving a rollout phase") as tx:
        rec = _locked(tx, rollout_id)
        if rec.state in FINAL_ROLLOUT_STATES:
            raise RolloutError(f"rollout {rollout_id} is {rec.state}")
        plan = Plan.from_json(rec.plan)
        if not plan.approval:
            raise RolloutError(f"rollout {rollout_id} needs no approvals (its plan has no approval)")
        approved = tx.rollouts.approvals(rollout_id)
        count = plan.phase_count()
        if phase is None:
            phase = next((p for p in range(1, count) if p not in approved), None)
            if phase is None:
                raise RolloutError(f"every phase of rollout {rollout_id} is approved already")
        if not 1 <= phase < count:
            raise RolloutError(f"rollout {rollout_id} has phases 1 to {count - 1} to approve "
                               "(0 is the canary)")
        if phase in approved:
            raise RolloutError(f"phase {phase} of rollout {rollout_id} is approved already")
        tx.rollouts.insert_approval(rollout_id, phase, actor, now)
    return phase


# -- progress ----------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RolloutView:
    """A rollout with its progress (what ``rollout show`` and the API print)."""

    rollout: RolloutRecord
    release: ReleaseRecord
    plan: Plan
    group: Group
    phases: list[engine.PhaseProgress]
    members: list[MemberRecord]
    approvals: dict[int, tuple[str, int]]
    waiting: str


def view(repo: Repository, rollout_id: str, *, now: int) -> RolloutView:
    with repo.rollouts.reading("reading a rollout") as tx:
        rec = tx.rollout(rollout_id)
        if rec is None:
            raise RolloutError(f"no rollout {rollout_id[:40]!r}")
        members = tx.members(rollout_id)
        approvals = tx.approvals(rollout_id)
    with repo.releases.reading("reading a rollout's release") as rtx:
        release = rtx.releases_by_id([rec.release_id])[rec.release_id]
    plan = Plan.from_json(rec.plan)
    views = [_member(m) for m in members]
    waiting = ""
    if rec.state == RolloutState.RUNNING:
        waiting = engine.decide(plan, rec.phase, views, approved=set(approvals), now=now).waiting
    elif rec.state in (RolloutState.PAUSED, RolloutState.DRAFT):
        waiting = rec.state
    return RolloutView(rec, release, plan, Group.from_json(rec.target_group),
                       engine.progress(views, plan.phase_count()), members, approvals, waiting)


def view_json(v: RolloutView) -> dict[str, object]:
    r = v.rollout
    return {
        "id": r.id, "kind": r.kind, "release": v.release.target, "state": r.state, "phase": r.phase,
        "reason": r.reason, "waiting": v.waiting, "created_at": r.created_at, "created_by": r.created_by,
        "started_at": r.started_at, "finished_at": r.finished_at, "abort_trigger_at": r.abort_trigger_at,
        "group": {"class": v.group.device_class, "firmware": v.group.firmware, "tags": list(v.group.tags),
                  "devices": list(v.group.devices)},
        "phases": [{"devices": p.devices, "succeeded": p.succeeded, "failed": p.failed, "pending": p.pending,
                    "assigned": p.assigned, "approved": i in v.approvals} for i, p in enumerate(v.phases)],
        "members": [{"device_id": m.device_id, "phase": m.phase, "state": m.state, "attempts": m.attempts,
                     "assignment_id": m.assignment_id, "reason": m.reason, "assigned_at": m.assigned_at,
                     "finished_at": m.finished_at} for m in v.members],
    }


# -- device tags (target groups select by them) -----------------------------------------------------
def tag_device(repo: Repository, device_id: str, tags: Sequence[str]) -> list[str]:
    """Add tags to a device; returns those it did not have."""
    return _tags(repo, device_id, tags, add=True)


def untag_device(repo: Repository, device_id: str, tags: Sequence[str]) -> list[str]:
    """Remove tags from a device; returns those it had."""
    return _tags(repo, device_id, tags, add=False)


def _tags(repo: Repository, device_id: str, tags: Sequence[str], *, add: bool) -> list[str]:
    validate_device_id(device_id)
    if not tags:
        raise RolloutError("give at least one tag")
    checked = [validate_tag(t) for t in tags]
    with repo.write("tagging a device") as tx:
        if tx.device_identity(device_id) is None:
            raise RolloutError(f"no device {device_id!r}")
        if add:
            return tx.rollouts.add_tags(device_id, checked)
        return tx.rollouts.remove_tags(device_id, checked)
