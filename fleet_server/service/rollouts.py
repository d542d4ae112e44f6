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
from fleet_server.service.models import DOWN_KEY_DENIED, DOWN_MODEL_OFFER
from fleet_server.service.releases import ReleaseError, assign_in_tx
from fleet_server.storage.alerting import NewAlert
from fleet_server.storage.model_repo import VersionRecord
from fleet_server.storage.model_tables import LeaseState
from fleet_server.storage.release_repo import ReleaseRecord
from fleet_server.storage.release_tables import FINAL_ASSIGNMENT_STATES, AssignmentState, ReleaseState
from fleet_server.storage.repo import Repository, Tx
from fleet_server.storage.rollout_repo import MemberRecord, RolloutRecord
from fleet_server.storage.rollout_tables import FINAL_ROLLOUT_STATES, MemberState, RolloutState
from protocol import topics
from protocol.messages import KeyDenied, ModelOffer, ModelRef, new_message_id
from protocol.modelpkg import parse_version
from protocol.topics import validate_device_id

log = logging.getLogger(__name__)

ROLLOUT_ABORTED = "rollout_aborted"
FIRMWARE, MODEL = "firmware", "model"
_LEASES_HELD = (LeaseState.ACTIVE, LeaseState.SUPERSEDED)
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


def _model_version(tx: Tx, model: tuple[str, str]) -> VersionRecord:
    """The published, not yet deployed version a model rollout may stage (newer than the deployed one)."""
    name, version = model
    found = tx.models.version(name, version)
    if found is None:
        raise RolloutError(f"no published model {name[:64]!r} version {version[:32]!r}")
    if found.deployed:
        raise RolloutError(f"model {name} {version} is deployed already")
    deployed = [x for x in tx.models.versions(found.model_id) if x.deployed]
    newest = max(deployed, key=lambda x: x.order, default=None)
    if newest is not None and newest.order > found.order:
        raise RolloutError(f"model {name} {version} is older than the deployed version {newest.version}")
    return found


def _subject(tx: Tx, target: str | None, model: tuple[str, str] | None) -> ReleaseRecord | VersionRecord:
    if target is not None and model is None:
        return _release(tx, target)
    if model is not None and target is None:
        return _model_version(tx, model)
    raise RolloutError("a rollout takes a release or a model version")


def _group_members(tx: Tx, subject: ReleaseRecord | VersionRecord, group: Group) -> list[str]:
    if isinstance(subject, ReleaseRecord) and group.device_class != subject.device_class:
        raise RolloutError(f"the group is of class {group.device_class}, the release is for "
                           f"{subject.device_class}")
    found = tx.rollouts.group_devices(group.device_class, firmware=group.firmware, tags=group.tags,
                                      devices=group.devices)
    missing = sorted(set(group.devices) - set(found))
    if missing:
        raise RolloutError(f"device {missing[0]!r} is not an admitted device of class {group.device_class}"
                           + (f" on firmware {group.firmware}" if group.firmware else "")
                           + (f" tagged {', '.join(group.tags)}" if group.tags else ""))
    if isinstance(subject, VersionRecord):  # only entitled devices are ever offered the model
        entitled = [i for i in found if tx.models.entitled(subject.model_id, i, group.device_class)]
        missing = sorted(set(group.devices) - set(entitled))
        if missing:
            raise RolloutError(f"device {missing[0]!r} is not entitled to model {subject.name}")
        return entitled
    return found


def _label(subject: ReleaseRecord | VersionRecord) -> str:
    return subject.target if isinstance(subject, ReleaseRecord) else f"model {subject.name} {subject.version}"


def _load_subject(tx: Tx, rec: RolloutRecord) -> ReleaseRecord | VersionRecord:
    if rec.kind == MODEL:
        assert rec.model_version_id is not None
        found = tx.models.version_by_id(rec.model_version_id)
        assert found is not None
        return found
    assert rec.release_id is not None
    return tx.releases.releases_by_id([rec.release_id])[rec.release_id]


@dataclass(frozen=True, slots=True)
class DryRun:
    rollout_id: str
    phases: list[list[str]]  # device ids of each phase (index 0: the canary)


def dry_run(repo: Repository, *, target: str | None = None, model: tuple[str, str] | None = None,
            group: Group, plan: Plan, rollout_id: str | None = None) -> DryRun:
    """The devices each phase would take (nothing is stored; pass the same ``rollout_id`` to
    :func:`create_rollout` for exactly this split)."""
    rid = _rollout_id(rollout_id)
    with repo.write("planning a rollout") as tx:
        subject = _subject(tx, target, model)
        placed = split_phases(rid, plan, _group_members(tx, subject, group))
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


def create_rollout(repo: Repository, *, target: str | None = None, model: tuple[str, str] | None = None,
                   group: Group, plan: Plan, now: int, actor: str, draft: bool = False,
                   rollout_id: str | None = None) -> RolloutRecord:
    """Store and start a rollout of the release ``target`` or of the model version ``model`` (name,
    version) (see the module docstring)."""
    rid = _rollout_id(rollout_id)
    with repo.write("creating a rollout") as tx:
        subject = _subject(tx, target, model)
        if tx.rollouts.rollout(rid) is not None:
            raise RolloutError(f"rollout {rid} exists already")
        device_ids = _group_members(tx, subject, group)
        if not device_ids:
            raise RolloutError("the target group has no devices")
        busy = tx.rollouts.active_memberships(device_ids)
        if busy:
            first = sorted(busy)[0]
            raise RolloutError(f"device {first} is in rollout {busy[first]} still (cancel it first)")
        if isinstance(subject, VersionRecord):
            other = tx.rollouts.active_model_rollout(subject.model_id)
            if other is not None:
                raise RolloutError(f"model {subject.name} is in rollout {other} still (one at a time)")
        placed = split_phases(rid, plan, device_ids)
        state = RolloutState.DRAFT if draft else RolloutState.RUNNING
        is_model = isinstance(subject, VersionRecord)
        rec = RolloutRecord(id=rid, kind=MODEL if is_model else FIRMWARE,
                            release_id=None if is_model else subject.id, target_group=group.to_json(),
                            plan=plan.to_json(), state=state, phase=0, reason="", created_at=now,
                            created_by=actor, started_at=None if draft else now, updated_at=now,
                            abort_trigger_at=None, finished_at=None,
                            model_version_id=subject.id if is_model else None)
        tx.rollouts.insert_rollout(rec)
        tx.rollouts.insert_members(_new_members(tx, rid, subject, placed, now))
    return rec


def _new_members(tx: Tx, rid: str, subject: ReleaseRecord | VersionRecord, rows: Sequence[Placed], now: int
                 ) -> list[MemberRecord]:
    attested = (tx.releases.attested_releases([p.device_id for p in rows])
                if isinstance(subject, ReleaseRecord) else {})
    out: list[MemberRecord] = []
    for p in rows:
        done = attested.get(p.device_id) == subject.id
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
        subject = _load_subject(tx, rec)
        members = tx.rollouts.members(rollout_id)
        if isinstance(subject, ReleaseRecord) and subject.state != ReleaseState.ACTIVE:
            reason = f"release {subject.target} was withdrawn"
            trigger = min(now, subject.withdrawn_at or now)
            _abort(tx, rec, subject, plan, members, reason, trigger, now, signer)
            return StepResult(rollout_id, RolloutState.ABORTED, rec.phase, (), (), "", reason, now - trigger)
        joined = _join(tx, rec, subject, group, plan, members, now)
        if joined:
            members = tx.rollouts.members(rollout_id)
        members = _judge(tx, rec, subject, plan, members, now)
        views = [_member(m) for m in members]
        approved = set(tx.rollouts.approvals(rollout_id))
        decision = engine.decide(plan, rec.phase, views, approved=approved, now=now)
        if decision.state == RolloutState.ABORTED:
            assert decision.abort_trigger_at is not None
            _abort(tx, rec, subject, plan, members, decision.reason, decision.abort_trigger_at, now, signer)
            latency = max(0, now - decision.abort_trigger_at)
            return StepResult(rollout_id, RolloutState.ABORTED, decision.phase, (), joined, "",
                              decision.reason, latency)
        values: dict[str, object] = {"phase": decision.phase, "updated_at": now}
        if decision.state == RolloutState.COMPLETED:
            values.update(state=RolloutState.COMPLETED, finished_at=now)
            if isinstance(subject, VersionRecord) and not subject.deployed:
                # The same effect as `model deploy`: every entitled device is offered it from now on.
                tx.models.deploy_version(subject.id, now=now, actor=f"rollout:{rollout_id}")
        tx.rollouts.set_rollout(rollout_id, values)
        by_id = {m.device_id: m for m in members}
        assigned: list[str] = []
        for device_id in decision.assign:
            m = by_id[device_id]
            if isinstance(subject, VersionRecord):
                tx.rollouts.set_member(rollout_id, device_id, {
                    "state": MemberState.ASSIGNED, "attempts": m.attempts + 1, "assigned_at": now,
                    "finished_at": None})
                _offer_now(tx, [device_id], now, signer)
                assigned.append(device_id)
                continue
            try:
                a = assign_in_tx(tx, subject, device_id, signer=signer, now=now,
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


def _offer_now(tx: Tx, device_ids: Sequence[str], now: int, signer: ResultSigner) -> list[str]:
    """Queue a signed ``model-offer`` (what :meth:`ModelTx.offers` gives now, so the rollout's
    staging is applied) for those of the devices that are trusted with a fresh verdict; the others
    are offered it with their next trusted attestation. Returns the devices an offer was queued for."""
    trust = tx.models.device_trust(device_ids)
    fresh = [(i, trust[i][1]) for i in sorted(set(device_ids))
             if i in trust and trust[i][0] == "trusted" and (trust[i][2] or 0) > now]
    sent: list[str] = []
    for device_id, offered in sorted(tx.models.offers(fresh).items()):
        refs = tuple(ModelRef(name=o.name, version=o.version, size=o.package_size,
                              package_sha256=o.package_sha256) for o in offered)
        tx.add_outbox(topics.device_down(device_id, DOWN_MODEL_OFFER),
                      signer.sign(ModelOffer(models=refs), aud=device_id, ts=now), now)
        sent.append(device_id)
    return sent


def _join(tx: Tx, rec: RolloutRecord, subject: ReleaseRecord | VersionRecord, group: Group, plan: Plan,
          members: Sequence[MemberRecord], now: int) -> tuple[str, ...]:
    """Devices that match the group now but are not members join the last phase (an explicit
    device list does not grow)."""
    if group.devices:
        return ()
    have = {m.device_id for m in members}
    new = [i for i in tx.rollouts.group_devices(group.device_class, firmware=group.firmware, tags=group.tags,
                                                devices=()) if i not in have]
    if isinstance(subject, VersionRecord):
        new = [i for i in new if tx.models.entitled(subject.model_id, i, group.device_class)]
    if not new:
        return ()
    busy = tx.rollouts.active_memberships(new)
    new = [i for i in new if i not in busy]
    last = plan.phase_count() - 1
    tx.rollouts.insert_members(_new_members(tx, rec.id, subject,
                                            [Placed(i, last, order_key(rec.id, i)) for i in new], now))
    return tuple(new)


def _observe(tx: Tx, subject: ReleaseRecord | VersionRecord, members: Sequence[MemberRecord], ids: list[str],
             now: int) -> dict[str, tuple[engine.Observed | engine.ModelObserved, str | None]]:
    """Per assigned member: what its kind's judge looks at, and (firmware) the assignment to close
    on a retry."""
    states = tx.rollouts.device_states(ids)
    out: dict[str, tuple[engine.Observed | engine.ModelObserved, str | None]] = {}
    if isinstance(subject, VersionRecord):
        loads = tx.models.load_status(ids, subject.model_id, subject.version)
        for m in members:
            if m.device_id not in ids:
                continue
            state, changed_at = states.get(m.device_id, ("revoked", now))
            load = loads.get(m.device_id)
            if load is not None and load[3] < (m.assigned_at or 0):
                load = None  # a report from before this assignment
            out[m.device_id] = (engine.ModelObserved(
                load[0] if load else None, load[1] if load else "", load[2] if load else "",
                load[3] if load else now, state, changed_at), None)
        return out
    latest = tx.releases.latest_assignments(ids)
    attested = tx.releases.attested_releases(ids)
    for m in members:
        if m.device_id not in ids:
            continue
        a = latest.get(m.device_id)
        if a is None or a.id != m.assignment_id:
            a = tx.releases.assignment(m.assignment_id or "")
        state, changed_at = states.get(m.device_id, ("revoked", now))
        seen = engine.Observed(a.state if a else None, a.reason if a else "", a.updated_at if a else now,
                               attested.get(m.device_id) == subject.id, state, changed_at)
        out[m.device_id] = (seen, a.id if a is not None and a.state not in FINAL_ASSIGNMENT_STATES else None)
    return out


def _judge(tx: Tx, rec: RolloutRecord, subject: ReleaseRecord | VersionRecord, plan: Plan,
           members: list[MemberRecord], now: int) -> list[MemberRecord]:
    """Judge the assigned members; returns the members as they are now."""
    ids = [m.device_id for m in members if m.state == MemberState.ASSIGNED]
    if not ids:
        return members
    observed = _observe(tx, subject, members, ids, now)
    out: list[MemberRecord] = []
    for m in members:
        if m.state != MemberState.ASSIGNED:
            out.append(m)
            continue
        seen, open_assignment = observed[m.device_id]
        judged = engine.judge(_member(m), seen, plan, now)
        if judged is None:
            out.append(m)
            continue
        values: dict[str, object] = {"state": judged.state, "reason": judged.reason,
                                     "finished_at": judged.finished_at}
        if judged.state == MemberState.PENDING and open_assignment is not None:
            # Retry: close the timed-out assignment so the next one may replace it.
            tx.releases.set_assignment_state(open_assignment, state=AssignmentState.FAILED,
                                             reason=judged.reason, now=now)
        tx.rollouts.set_member(rec.id, m.device_id, values)
        out.append(MemberRecord(m.rollout_id, m.device_id, m.phase, m.order_key, judged.state, m.attempts,
                                m.assignment_id, judged.reason, m.joined_at, m.assigned_at,
                                judged.finished_at))
    return out


def _abort(tx: Tx, rec: RolloutRecord, subject: ReleaseRecord | VersionRecord, plan: Plan,
           members: Sequence[MemberRecord], reason: str, trigger_at: int, now: int,
           signer: ResultSigner) -> None:
    tx.rollouts.set_rollout(rec.id, {"state": RolloutState.ABORTED, "reason": reason[:512],
                                      "abort_trigger_at": trigger_at, "finished_at": now, "updated_at": now})
    if isinstance(subject, VersionRecord):
        sent_back = _unstage(tx, rec, subject, members, now, signer, why="rollout aborted")
    else:
        sent_back = _roll_back(tx, rec, subject, plan, members, now, signer) if plan.rollback_on_abort else 0
    label = _label(subject)
    tx.rollouts.raise_alert(NewAlert(
        kind=ROLLOUT_ABORTED, severity="critical", dedup_key=f"{ROLLOUT_ABORTED}:{rec.id}",
        message=f"rollout {rec.id} of {label} aborted: {reason}",
        details={"rollout": rec.id, "release": label, "reason": reason, "phase": rec.phase,
                 "sent_back": sent_back}), now)
    log_event(log, logging.WARNING, "rollout_aborted", rollout=rec.id, release=label,
              reason=reason, abort_ms=now - trigger_at)


def _unstage(tx: Tx, rec: RolloutRecord, version: VersionRecord, members: Sequence[MemberRecord], now: int,
             signer: ResultSigner | None, *, why: str) -> int:
    """A model rollout ended without deploying its version (the rollout's row is no longer running,
    so offers no longer stage it): the members it assigned lose their leases of the version (a
    signed ``key-denied`` each: the agent locks the model and zeroizes its key) and are offered the
    deployed version again. Returns how many were offered it."""
    reached = [m for m in members if m.assigned_at is not None]
    if not reached:
        return 0
    ids = [m.device_id for m in reached]
    revoked = tx.models.end_leases(state=LeaseState.REVOKED, reason=f"{why} ({rec.id})"[:256], now=now,
                                   device_ids=ids, model_id=version.model_id, version=version.version,
                                   from_states=_LEASES_HELD)
    deployed = [x for x in tx.models.versions(version.model_id) if x.deployed]
    previous = max(deployed, key=lambda x: parse_version(x.version), default=None)
    offered: list[str] = []
    if signer is not None:
        for device_id in sorted({x.device_id for x in revoked}):
            denied = KeyDenied(name=version.name, version=version.version,
                               reasons=(f"model {version.name} {version.version}: {why}",))
            tx.add_outbox(topics.device_down(device_id, DOWN_KEY_DENIED),
                          signer.sign(denied, aud=device_id, ts=now), now)
        offered = _offer_now(tx, ids, now, signer) if previous is not None else []
    for m in reached:
        note = (f"{why}: offered {version.name} {previous.version} again" if previous is not None
                else f"{why}: no deployed version of {version.name} to go back to")
        tx.rollouts.set_member(rec.id, m.device_id, {"reason": f"{m.reason}; {note}" if m.reason else note})
    return len(offered)


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


def cancel(repo: Repository, rollout_id: str, *, now: int, actor: str,
           signer: ResultSigner | None = None) -> RolloutRecord:
    """Stop the rollout for good without an alert or a rollback (firmware assignments in flight go
    on). A model rollout's version is not deployed then: the devices it assigned go back to the
    deployed version as on an abort (with ``signer`` they are told at once)."""
    return _move(repo, rollout_id, (RolloutState.DRAFT, RolloutState.RUNNING, RolloutState.PAUSED),
                 RolloutState.CANCELLED, now=now, reason=f"cancelled by {actor}", signer=signer)


def _move(repo: Repository, rollout_id: str, from_states: Sequence[str], to_state: str, *, now: int,
          reason: str = "", signer: ResultSigner | None = None) -> RolloutRecord:
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
        if to_state == RolloutState.CANCELLED and rec.kind == MODEL:
            version = _load_subject(tx, rec)
            assert isinstance(version, VersionRecord)
            _unstage(tx, rec, version, tx.rollouts.members(rollout_id), now, signer, why="rollout cancelled")
        found = tx.rollouts.rollout(rollout_id)
    assert found is not None
    return found


def abort(repo: Repository, rollout_id: str, *, signer: ResultSigner, now: int, actor: str) -> RolloutRecord:
    """Abort by hand: like an automatic abort (alert; rollback when the plan says so)."""
    with repo.write("aborting a rollout") as tx:
        rec = _locked(tx, rollout_id)
        if rec.state not in (RolloutState.RUNNING, RolloutState.PAUSED, RolloutState.DRAFT):
            raise RolloutError(f"rollout {rollout_id} is {rec.state} already")
        _abort(tx, rec, _load_subject(tx, rec), Plan.from_json(rec.plan), tx.rollouts.members(rollout_id),
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
    release: ReleaseRecord | None  # a firmware rollout's
    model: VersionRecord | None    # a model rollout's
    plan: Plan
    group: Group
    phases: list[engine.PhaseProgress]
    members: list[MemberRecord]
    approvals: dict[int, tuple[str, int]]
    waiting: str

    @property
    def subject(self) -> str:
        """What is rolled out: the release's target, or ``model NAME VERSION``."""
        if self.release is not None:
            return self.release.target
        assert self.model is not None
        return f"model {self.model.name} {self.model.version}"


def view(repo: Repository, rollout_id: str, *, now: int) -> RolloutView:
    with repo.rollouts.reading("reading a rollout") as tx:
        rec = tx.rollout(rollout_id)
        if rec is None:
            raise RolloutError(f"no rollout {rollout_id[:40]!r}")
        members = tx.members(rollout_id)
        approvals = tx.approvals(rollout_id)
    release: ReleaseRecord | None = None
    model: VersionRecord | None = None
    if rec.kind == MODEL:
        assert rec.model_version_id is not None
        with repo.models.reading("reading a rollout's model version") as mtx:
            model = mtx.version_by_id(rec.model_version_id)
    else:
        assert rec.release_id is not None
        with repo.releases.reading("reading a rollout's release") as rtx:
            release = rtx.releases_by_id([rec.release_id])[rec.release_id]
    plan = Plan.from_json(rec.plan)
    views = [_member(m) for m in members]
    waiting = ""
    if rec.state == RolloutState.RUNNING:
        waiting = engine.decide(plan, rec.phase, views, approved=set(approvals), now=now).waiting
    elif rec.state in (RolloutState.PAUSED, RolloutState.DRAFT):
        waiting = rec.state
    return RolloutView(rec, release, model, plan, Group.from_json(rec.target_group),
                       engine.progress(views, plan.phase_count()), members, approvals, waiting)


def view_json(v: RolloutView) -> dict[str, object]:
    r = v.rollout
    return {
        "id": r.id, "kind": r.kind, "release": v.release.target if v.release else None,
        "model": {"name": v.model.name, "version": v.model.version} if v.model else None,
        "state": r.state, "phase": r.phase,
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
