"""Periodic re-attestation: the schedule lives in the database (``device.next_attestation_at``).

Every worker runs :meth:`Scheduler.run_once` once per ``attestation.scheduler_tick``. One round:

1. **Spread** devices overdue by more than :attr:`Scheduler.overdue_after_ms` (the server was
   stopped, or could not keep up): they are not challenged now but rescheduled uniformly at random
   within the next interval (up to :data:`SPREAD_BATCH` per round), so that a restart after downtime
   spreads the backlog over one interval instead of challenging the whole fleet at once.
2. **Claim** up to ``claim_batch`` attested devices that are due (``next_attestation_at <= now``),
   oldest first, in the same write transaction (SQLite serialises writers; PostgreSQL uses
   ``FOR UPDATE SKIP LOCKED``), so a device is claimed by exactly one worker. Each claimed device
   gets its next time (now + interval +- jitter) in the same transaction, and a challenge (fresh
   32-byte nonce, the policy's PCR selection, deadline) that supersedes any open challenge of the
   device; the challenges are published after the commit. With an interval shorter than the
   challenge timeout, a device whose open challenge is still fresh keeps it and is only rescheduled
   (:meth:`Scheduler._answering`), so that overload levels the rate off instead of collapsing it.
3. **Expire** open challenges whose deadline passed more than :data:`EXPIRY_GRACE_MS` ago (evidence
   received before the deadline may still be in a worker's batch), count one miss per expired
   challenge, and move devices that reached ``missed_challenges_limit`` consecutive misses to
   ``unreachable`` (a quarantined device stays quarantined: the hold must not be lost). The next good
   evidence resets the count and brings the device back. Expiry (and the model-lease sweep in the
   same transaction) runs at most every :data:`EXPIRE_PERIOD_MS`: deadlines are seconds long, and
   with a short ``scheduler_tick`` its fixed cost per round would otherwise add up.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from fleet_server.service.common import Counters, Outgoing, log_event
from fleet_server.service.context import ServiceContext
from fleet_server.service.policies import PolicyResolver
from fleet_server.service.processor import DOWN_CHALLENGE, challenge_message
from fleet_server.storage.models import DeviceState
from fleet_server.storage.repo import NewChallenge, Repository, Tx, selection_json
from protocol import topics
from protocol.messages import new_message_id

log = logging.getLogger(__name__)

EXPIRY_GRACE_MS = 5_000
"""Open challenges are expired this long after their deadline (in-flight evidence is still judged
against the deadline itself)."""
EXPIRE_BATCH = 1000
EXPIRE_PERIOD_MS = 1000
"""Rounds expire challenges (and sweep model leases) at most this often."""
SPREAD_BATCH = 10_000
UNREACHABLE_FROM = frozenset({DeviceState.ENROLLED, DeviceState.TRUSTED, DeviceState.UNTRUSTED})


@dataclass(frozen=True, slots=True)
class RoundResult:
    """What one scheduler round did."""

    challenged: int
    spread: int
    expired: int
    unreachable: tuple[str, ...]


class Scheduler:
    """One worker's scheduler (see the module docstring). Not thread-safe: one thread per instance."""

    def __init__(self, ctx: ServiceContext, repo: Repository, counters: Counters, *,
                 policies: PolicyResolver | None = None, overdue_after_ms: int | None = None) -> None:
        self.ctx = ctx
        self.repo = repo
        self.counters = counters
        self.policies = policies or PolicyResolver(repo, ctx.settings.selection)
        settings = ctx.settings
        tick_ms = round(settings.scheduler_tick * 1000)
        self.overdue_after_ms = (overdue_after_ms if overdue_after_ms is not None
                                 else max(10_000, 5 * tick_ms, settings.challenge_timeout_ms))
        self._expired_at: int | None = None

    def run_once(self) -> tuple[RoundResult, list[Outgoing]]:
        """One round: claim and challenge due devices, expire missed challenges. Returns the signed
        challenges to publish (after the commit)."""
        now = self.ctx.clock.now_ms()
        challenged, spread, outgoing = self._challenge_due(now)
        expired: int = 0
        unreachable: list[str] = []
        if self._expired_at is None or now - self._expired_at >= EXPIRE_PERIOD_MS:
            expired, unreachable = self._expire(now)
            self._expired_at = now
        return RoundResult(challenged, spread, expired, tuple(unreachable)), outgoing

    # -- due devices -------------------------------------------------------------------------------
    def _challenge_due(self, now: int) -> tuple[int, int, list[Outgoing]]:
        settings = self.ctx.settings
        new: list[tuple[NewChallenge, Mapping[str, tuple[int, ...]]]] = []
        selections: dict[tuple[str, str], tuple[Mapping[str, tuple[int, ...]], str]] = {}
        spread = 0
        self.policies.refresh()
        with self.repo.write("claiming due devices") as tx:
            overdue = tx.overdue_devices(now - self.overdue_after_ms, SPREAD_BATCH)
            if overdue:
                tx.set_schedule([(device_id, now + self.ctx.rng.randint(1, settings.interval_ms), None)
                                 for device_id in overdue])
                spread = len(overdue)
            due = tx.claim_due_devices(now, settings.claim_batch)
            answering = self._answering(tx, [d.id for d in due], now)
            schedule: list[tuple[str, int, int | None]] = []
            for device in due:
                if device.id in answering:
                    schedule.append((device.id, self.ctx.next_attestation_at(now), None))
                    continue
                pair = (device.device_class, device.firmware_version)
                if pair not in selections:
                    chosen = self.policies.selection(*pair)
                    selections[pair] = (chosen, selection_json(chosen))
                selection, selection_text = selections[pair]
                offset = device.held_log_size if device.held_log_sha256 is not None else 0
                challenge = NewChallenge(
                    id=new_message_id(), device_id=device.id, nonce=self.ctx.token(32),
                    selection=selection_text, issued_at=now,
                    deadline=now + settings.challenge_timeout_ms, cause="periodic", log_offset=offset,
                    log_sha256=device.held_log_sha256 or b"")
                new.append((challenge, selection))
                schedule.append((device.id, self.ctx.next_attestation_at(now), now))
            if schedule:
                tx.set_schedule(schedule)
            if new:
                tx.supersede_open_challenges([c.device_id for c, _ in new])
                tx.insert_challenges([c for c, _ in new])
        sign = self.ctx.signer.sign
        outgoing = [Outgoing(topics.device_down(c.device_id, DOWN_CHALLENGE),
                             sign(challenge_message(c, sel), aud=c.device_id, ts=now), "challenge")
                    for c, sel in new]
        if new:
            self.counters.add("challenges.periodic", len(new))
        if answering:
            self.counters.add("schedule.deferred", len(answering))
        if spread:
            self.counters.add("schedule.spread", spread)
            log_event(log, logging.INFO, "schedule_spread", devices=spread,
                      over_ms=settings.interval_ms)
        return len(new), spread, outgoing

    def _answering(self, tx: Tx, device_ids: list[str], now: int) -> set[str]:
        """Due devices whose open challenge is still fresh (more than half its time to answer left,
        the rule ``attest.request`` uses to re-send rather than replace a challenge).

        Replacing such a challenge would supersede it while the device is answering it: the work is
        wasted, and when the attestation latency nears the interval every attestation is, so the
        rate collapses instead of levelling off. Such a device keeps its challenge and is due again
        one interval later; a challenge not answered within half its timeout is replaced as before.
        Only an interval shorter than the challenge timeout can meet a fresh challenge here (the
        check, one query, is skipped otherwise)."""
        settings = self.ctx.settings
        if not device_ids or settings.interval_ms >= settings.challenge_timeout_ms:
            return set()
        half = settings.challenge_timeout_ms // 2
        return {device_id for device_id, deadline in tx.open_challenge_deadlines(device_ids).items()
                if deadline - now >= half}

    # -- missed challenges -------------------------------------------------------------------------
    def _expire(self, now: int) -> tuple[int, list[str]]:
        limit = self.ctx.settings.missed_challenges_limit
        unreachable: list[str] = []
        with self.repo.write("expiring challenges") as tx:
            swept = tx.models.sweep_leases(now)  # model leases not renewed in time, or of untrusted devices
            expired = tx.expire_challenges(now - EXPIRY_GRACE_MS, EXPIRE_BATCH)
            _count_swept(self.counters, swept)
            if not expired:
                return 0, []
            for device in tx.count_misses([e.device_id for e in expired], now):
                if device.missed_challenges >= limit and device.state in UNREACHABLE_FROM:
                    cause = f"missed {device.missed_challenges} consecutive challenges"
                    tx.set_state(device.id, from_state=device.state, to_state=DeviceState.UNREACHABLE,
                                 cause=cause, now=now, reasons=[cause], extra={"trusted_until": None})
                    unreachable.append(device.id)
        self.counters.add("challenges.expired", len(expired))
        for device_id in unreachable:
            self.counters.add("state.unreachable")
            log_event(log, logging.WARNING, "state_changed", device=device_id, to_state="unreachable",
                      cause="missed challenges")
        return len(expired), unreachable


def _count_swept(counters: Counters, swept: tuple[int, int]) -> None:
    """Count model leases the round expired and revoked (fleet_server/service/models.py)."""
    for name, n in zip(("leases.expired", "leases.revoked"), swept, strict=True):
        if n:
            counters.add(name, n)
