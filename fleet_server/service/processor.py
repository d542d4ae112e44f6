"""Message handling of a worker: a batch of inbound MQTT messages in, signed replies out.

:class:`Processor` knows nothing of MQTT connections: :meth:`Processor.handle_batch` takes the
messages a worker drained from its queue and returns the :class:`~fleet_server.service.common.Outgoing`
messages to publish. Per batch:

1. **Parse** every message (no database): the topic gives the identity (the broker authorised it for
   the sender's certificate; :func:`protocol.topics.parse_server_topic`) and the kind; the payload is
   decoded strictly with the size limit of its kind. Claim identities are accepted only on
   enrollment topics, device ids only on device topics. Message ids already seen from the same
   identity are dropped (bounded LRU per worker; the single-use challenge in the database is the
   real guard). Enrollment requests are checked (EK chain, AK, CSR) and MakeCredential is computed.
2. **One write transaction** for the rest: one query reads every challenge the evidence answers
   with its device (locked until the commit: SQLite serialises writers from ``BEGIN IMMEDIATE``,
   PostgreSQL takes ``FOR UPDATE`` row locks) and the active policies; each challenge is checked
   (known, this device's, open, answered before its deadline, device attested) and the evidence
   appraised (pure :func:`~fleet_server.appraisal.appraise.appraise`); then challenges are consumed,
   attestation rows, device states, state changes and revocation notices (outbox) written with one
   ``executemany`` per kind, and ``attest.request`` and enrollment messages handled. Because the
   check and the write share the transaction, a challenge is consumed exactly once even with many
   workers, and an admin's revoke cannot slip in between.
3. **Reply** after the commit: replies are signed and returned (never for a transaction that rolled
   back).

If the batch transaction fails, every message of the batch is handled again in a transaction of
its own, so one poisonous message cannot block the others. Every rejection is counted under
``rejected.<reason>`` and logged as one line; no exception escapes :meth:`Processor.handle_batch`
(unexpected ones are logged with their traceback, which only the log file shows, and counted as
``rejected.internal_error``).
"""

from __future__ import annotations

import collections
import datetime as dt
import functools
import hashlib
import hmac
import json
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fleet_server import pki
from fleet_server.appraisal.appraise import (
    TRUSTED,
    UNTRUSTED,
    Appraisal,
    BootState,
    ChallengeRecord,
    appraise,
)
from fleet_server.appraisal.policy import ReferencePolicy
from fleet_server.appraisal.releases import (
    ASSIGNED,
    CURRENT,
    PREVIOUS,
    AssignmentTerms,
    Candidate,
    candidate_roles,
    choose,
)
from fleet_server.enrollment.credential import make_credential
from fleet_server.enrollment.request import EnrollmentCandidate, check_enrollment_request, expected_proof
from fleet_server.service.common import Counters, Outgoing, format_event, log_event
from fleet_server.service.context import ServiceContext
from fleet_server.service.crl import record_issued
from fleet_server.service.models import MODEL_KINDS, ModelService
from fleet_server.service.policies import ANY_CLASS, MAX_AGE_S, PolicyResolver
from fleet_server.service.releases import status_problem
from fleet_server.service.tuf_files import TUF_KINDS, RepositoryFiles, TufFileService
from fleet_server.storage.models import ATTESTED_STATES, HELD_STATES, ChallengeStatus, DeviceState
from fleet_server.storage.release_repo import ReleaseContext, ReleaseRecord
from fleet_server.storage.release_tables import AssignmentState
from fleet_server.storage.repo import (
    AppraisedDevice,
    EnrollmentSessionRecord,
    EvidenceContext,
    HelloContext,
    NewAttestation,
    NewChallenge,
    NewDevice,
    NewStateChange,
    Repository,
    Tx,
    pcrs_json,
    selection_json,
)
from fleet_server.verifier.quote import AttestationKey
from protocol import topics
from protocol.errors import EdgeError, MalformedInputError, StorageError
from protocol.messages import (
    MAX_EVIDENCE_MESSAGE,
    MAX_PLAIN_MESSAGE,
    MAX_REASON_LEN,
    MAX_REASONS,
    AttestationResult,
    AttestRequest,
    Challenge,
    EnrollChallenge,
    EnrollProof,
    EnrollRequest,
    EnrollResult,
    Envelope,
    Evidence,
    Message,
    Revocation,
    UpdateStatus,
    decode_plain,
    new_message_id,
)
from protocol.mqtt import InboundMessage
from protocol.topics import Subtree

log = logging.getLogger(__name__)

# Topic kinds of device -> server messages: (message class, size limit of the whole payload).
KIND_HELLO = "hello"
KIND_EVIDENCE = "evidence"
KIND_REQUEST = "request"
KIND_PROOF = "proof"
KIND_UPDATE_STATUS = "update-status"
DEVICE_KINDS: dict[str, tuple[type[Message], int]] = {
    KIND_HELLO: (AttestRequest, MAX_PLAIN_MESSAGE),
    KIND_EVIDENCE: (Evidence, MAX_EVIDENCE_MESSAGE),
    KIND_UPDATE_STATUS: (UpdateStatus, MAX_PLAIN_MESSAGE),
    **MODEL_KINDS,  # model-fetch, key-request, telemetry, model-status: fleet_server/service/models.py
    **TUF_KINDS,  # tuf-fetch: fleet_server/service/tuf_files.py
}
ENROLL_KINDS: dict[str, tuple[type[Message], int]] = {
    KIND_REQUEST: (EnrollRequest, MAX_PLAIN_MESSAGE),
    KIND_PROOF: (EnrollProof, MAX_PLAIN_MESSAGE),
}
# Topic kinds of server -> device messages.
DOWN_CHALLENGE = "challenge"
DOWN_RESULT = "result"
DOWN_REVOCATION = "revocation"

DEDUP_SIZE = 100_000
AK_CACHE_SIZE = 5000
BOOT_CACHE_SIZE = 5000
RELEASE_POLICY_CACHE_SIZE = 256
QUARANTINE_REASON = "device is quarantined by an administrator"


class Rejected(Exception):
    """Internal: a message is refused. ``reason`` is the counter suffix, ``detail`` the log text."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


# --------------------------------------------------------------------------------------------------
# values
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Inbound:
    """A parsed, authenticated-by-topic inbound message."""

    subtree: Subtree
    identity: str
    device_id: str
    kind: str
    envelope: Envelope
    payload: bytes
    received_at: int


@dataclass(frozen=True, slots=True)
class Reply:
    """A message to sign and publish once the transaction committed."""

    topic: str
    aud: str
    message: Message
    kind: str


@dataclass(slots=True)
class _Effects:
    """What a transaction produced; discarded if it rolls back."""

    replies: list[Reply] = field(default_factory=list)
    counters: collections.Counter[str] = field(default_factory=collections.Counter)
    logs: list[tuple[int, str, dict[str, object]]] = field(default_factory=list)
    after_commit: list[Callable[[], None]] = field(default_factory=list)
    outbox_written: bool = False

    def reject(self, item: Inbound, exc: Rejected) -> None:
        self.counters[f"rejected.{exc.reason}"] += 1
        self.logs.append((logging.WARNING, "message_rejected",
                          {"reason": exc.reason, "identity": item.identity, "kind": item.kind,
                           "msg_id": item.envelope.id, "detail": exc.detail}))

    def event(self, level: int, event: str, **fields: object) -> None:
        self.logs.append((level, event, fields))


@dataclass(frozen=True, slots=True)
class _EvidencePlan:
    item: Inbound
    evidence: Evidence
    ctx: EvidenceContext
    appraisal: Appraisal
    policy_id: int | None
    policy_name: str | None
    candidate: Candidate
    releases: ReleaseContext | None


@dataclass(frozen=True, slots=True)
class _EnrollPlan:
    item: Inbound
    candidate: EnrollmentCandidate
    request_id: str
    credential_blob: bytes
    encrypted_secret: bytes
    proof_sha256: bytes


class _Lru:
    """A small bounded LRU map (not thread-safe: one per processing thread)."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._data: collections.OrderedDict[Any, Any] = collections.OrderedDict()

    def get(self, key: Any) -> Any:
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def put(self, key: Any, value: Any) -> None:
        self._data[key] = value
        self._data.move_to_end(key)
        if len(self._data) > self._size:
            self._data.popitem(last=False)

    def seen(self, key: Any) -> bool:
        """True if ``key`` was added before; adds it otherwise."""
        if key in self._data:
            self._data.move_to_end(key)
            return True
        self.put(key, True)
        return False

    def __len__(self) -> int:
        return len(self._data)


def _bounded(reasons: Sequence[str]) -> tuple[str, ...]:
    """Reasons as the wire allows them (MAX_REASONS items of MAX_REASON_LEN characters)."""
    out = [r if len(r) <= MAX_REASON_LEN else r[: MAX_REASON_LEN - 3] + "..." for r in reasons]
    if len(out) > MAX_REASONS:
        out = [*out[: MAX_REASONS - 1], f"... and {len(out) - MAX_REASONS + 1} more reasons"]
    return tuple(out)


def _cert_der(cert_pem: bytes) -> tuple[bytes, str]:
    cert = x509.load_pem_x509_certificate(cert_pem)
    return cert.public_bytes(serialization.Encoding.DER), format(cert.serial_number, "x")


def _utc(ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC)


# --------------------------------------------------------------------------------------------------
# the processor
# --------------------------------------------------------------------------------------------------
class Processor:
    """Handles batches of inbound messages for one worker (see the module docstring).

    ``on_outbox`` is called after a commit that wrote outbox rows (the worker then publishes them
    without waiting for its next outbox round). ``update_files``: the update repository served to
    devices over MQTT (``None``: none configured, every ``tuf-fetch`` is answered ``not_found``).
    Calls of :meth:`handle_batch` are serialised by a lock (a worker has one processing thread); the
    caches are per instance.
    """

    def __init__(self, ctx: ServiceContext, repo: Repository, counters: Counters, *,
                 on_outbox: Callable[[], None] | None = None, ak_cache_size: int = AK_CACHE_SIZE,
                 boot_cache_size: int = BOOT_CACHE_SIZE, dedup_size: int = DEDUP_SIZE,
                 update_files: RepositoryFiles | None = None) -> None:
        self.ctx = ctx
        self.repo = repo
        self.counters = counters
        self.policies = PolicyResolver(repo, ctx.settings.selection)
        self._on_outbox = on_outbox
        self._seen = _Lru(dedup_size)
        self._aks = _Lru(ak_cache_size)
        # device id -> BootState with its derived data (parsed log, replayer): content-checked by
        # log_sha256 against the database on every use, so it can never be stale.
        self._boots = _Lru(boot_cache_size)
        # reference_sha256 of a release -> its parsed reference values (content-addressed: never stale)
        self._release_policies = _Lru(RELEASE_POLICY_CACHE_SIZE)
        self._lock = threading.Lock()
        self.models = ModelService(ctx, repo, counters)
        self.tuf = TufFileService(repo, counters, update_files)

    # -- public ------------------------------------------------------------------------------------
    def handle_batch(self, inbound: Sequence[InboundMessage]) -> list[Outgoing]:
        """Handle ``inbound`` (one database transaction); return the signed replies to publish."""
        with self._lock:
            try:
                return self._handle_batch(inbound)
            except Exception as exc:  # last resort: nothing escapes a worker's batch
                self.counters.add("rejected.internal_error", len(inbound))
                log.error("%s", _event_line("batch_failed", messages=len(inbound), error=_describe(exc)),
                          exc_info=True)
                return []

    def parse(self, message: InboundMessage, received_at: int) -> Inbound:
        """Parse one message (topic identity, kind, strict payload); raises :class:`Rejected`."""
        try:
            parsed = topics.parse_server_topic(message.topic)
        except MalformedInputError as exc:
            raise Rejected("topic_invalid", exc.diagnostics()) from None
        kinds = DEVICE_KINDS if parsed.subtree is Subtree.DEVICES else ENROLL_KINDS
        entry = kinds.get(parsed.kind)
        if entry is None:
            raise Rejected("kind_unknown", f"no message kind {parsed.kind!r} on {parsed.subtree} topics")
        cls, limit = entry
        if len(message.payload) > limit:
            raise Rejected("oversized", f"{len(message.payload)} bytes exceed the limit of {limit} for "
                                        f"{parsed.kind} messages")
        try:
            envelope = decode_plain(message.payload, allowed=(cls,), max_size=limit)
        except MalformedInputError as exc:
            raise Rejected("malformed", exc.diagnostics()) from None
        return Inbound(parsed.subtree, parsed.identity, parsed.device_id, parsed.kind, envelope,
                       message.payload, received_at)

    # -- the batch ---------------------------------------------------------------------------------
    def _handle_batch(self, inbound: Sequence[InboundMessage]) -> list[Outgoing]:
        now = self.ctx.clock.now_ms()
        items: list[Inbound] = []
        for message in inbound:
            try:
                item = self.parse(message, now)
            except Rejected as exc:
                self.counters.add(f"rejected.{exc.reason}")
                log_event(log, logging.WARNING, "message_rejected", reason=exc.reason,
                          topic=message.topic[:160], size=len(message.payload), detail=exc.detail)
                continue
            if self._seen.seen((item.identity, item.envelope.id)):
                self.counters.add("rejected.duplicate")
                log_event(log, logging.INFO, "message_rejected", reason="duplicate", identity=item.identity,
                          kind=item.kind, msg_id=item.envelope.id)
                continue
            self.counters.add(f"received.{item.kind}")
            items.append(item)
        if not items:
            return []

        prepared = _Effects()  # rejections found before the transaction (no rollback can undo them)
        evidence = [i for i in items if i.kind == KIND_EVIDENCE]
        hellos = [i for i in items if i.kind == KIND_HELLO]
        statuses = [i for i in items if i.kind == KIND_UPDATE_STATUS]
        work: list[Inbound | _EnrollPlan] = []
        for item in items:
            if item.kind == KIND_REQUEST:
                plan = self._prepare_enroll_request(item, prepared)  # pure: EK chain, MakeCredential
                if plan is not None:
                    work.append(plan)
            elif item.kind == KIND_PROOF:
                work.append(item)

        effects = _Effects()
        try:
            with self.repo.write("handling a batch") as tx:
                if evidence:
                    self._handle_evidence(tx, evidence, now, effects)
                if hellos:
                    self._handle_hellos(tx, hellos, now, effects)
                if statuses:
                    self._handle_statuses(tx, statuses, now, effects)
                for unit in work:
                    self._apply_one(tx, unit, now, effects)
        except Exception as exc:
            self.counters.add("batch.retried")
            log_event(log, logging.WARNING, "batch_retried", messages=len(items), error=_describe(exc))
            effects = self._fallback([*evidence, *hellos, *statuses, *work], now)
        out = self._finish(prepared, effects, now)
        model_items = [i for i in items if i.kind in MODEL_KINDS]
        if model_items:  # own transaction (key requests, telemetry) or a read (downloads)
            out += self.models.handle(model_items, now)
        tuf_items = [i for i in items if i.kind in TUF_KINDS]
        if tuf_items:  # a read of the device states, then files of the update repository
            out += self.tuf.handle(tuf_items, now)
        return out

    def _fallback(self, units: list[Inbound | _EnrollPlan], now: int) -> _Effects:
        """Handle every message in a transaction of its own (after a failed batch transaction)."""
        total = _Effects()
        for unit in units:
            item = unit.item if isinstance(unit, _EnrollPlan) else unit
            fx = _Effects()
            try:
                with self.repo.write("handling a message") as tx:
                    if isinstance(unit, Inbound) and unit.kind == KIND_EVIDENCE:
                        self._handle_evidence(tx, [unit], now, fx)
                    elif isinstance(unit, Inbound) and unit.kind == KIND_HELLO:
                        self._handle_hellos(tx, [unit], now, fx)
                    elif isinstance(unit, Inbound) and unit.kind == KIND_UPDATE_STATUS:
                        self._handle_statuses(tx, [unit], now, fx)
                    else:
                        self._apply_one(tx, unit, now, fx)
            except Exception as exc:
                total.counters["rejected.internal_error"] += 1
                log.error("%s", _event_line("message_failed", identity=item.identity, kind=item.kind,
                                            error=_describe(exc)),
                          exc_info=not isinstance(exc, StorageError))
                continue
            total.replies += fx.replies
            total.counters.update(fx.counters)
            total.logs += fx.logs
            total.after_commit += fx.after_commit
            total.outbox_written |= fx.outbox_written
        return total

    def _finish(self, prepared: _Effects, effects: _Effects, now: int) -> list[Outgoing]:
        out: list[Outgoing] = []
        for fx in (prepared, effects):
            for name, n in fx.counters.items():
                self.counters.add(name, n)
            for level, event, fields in fx.logs:
                log_event(log, level, event, **fields)
            for callback in fx.after_commit:
                callback()
            for reply in fx.replies:
                payload = self.ctx.signer.sign(reply.message, aud=reply.aud, ts=now)
                out.append(Outgoing(reply.topic, payload, reply.kind))
        if effects.outbox_written and self._on_outbox is not None:
            self._on_outbox()
        return out

    def _apply_one(self, tx: Tx, unit: Inbound | _EnrollPlan, now: int, fx: _Effects) -> None:
        item = unit.item if isinstance(unit, _EnrollPlan) else unit
        try:
            if isinstance(unit, _EnrollPlan):
                self._apply_enroll_request(tx, unit, now, fx)
            elif unit.kind == KIND_PROOF:
                self._apply_enroll_proof(tx, unit, now, fx)
            else:  # pragma: no cover - parse() admits no other kind
                raise Rejected("kind_unknown", f"no handler for {unit.kind}")
        except Rejected as exc:
            fx.reject(item, exc)

    # -- evidence ----------------------------------------------------------------------------------
    def _attestation_key(self, ak_public: bytes) -> AttestationKey:
        ak = self._aks.get(ak_public)
        if ak is None:
            ak = AttestationKey.from_tpm2b_public(ak_public)
            self._aks.put(ak_public, ak)
        return ak

    def _previous_boot(self, tx: Tx, ctx: EvidenceContext) -> BootState | None:
        """The device's held boot state, with cached derived data when the log digest matches."""
        if ctx.boot_reset_count is None or ctx.boot_restart_count is None or ctx.last_clock is None:
            return None
        if ctx.held_log_sha256 is None:
            return BootState.create(reset_count=ctx.boot_reset_count, restart_count=ctx.boot_restart_count,
                                    clock=ctx.last_clock)
        cached: BootState | None = self._boots.get(ctx.device_id)
        if cached is not None and hmac.compare_digest(cached.log_sha256, ctx.held_log_sha256):
            self.counters.add("bootcache.hit")
            return BootState(ctx.boot_reset_count, ctx.boot_restart_count, ctx.last_clock, cached.log,
                             cached.log_sha256, cached.parsed, cached.replayer, cached.replayed)
        self.counters.add("bootcache.miss")
        held = tx.held_log(ctx.device_id)
        if held is None or held.sha256 != ctx.held_log_sha256:  # pragma: no cover - same transaction
            return BootState.create(reset_count=ctx.boot_reset_count, restart_count=ctx.boot_restart_count,
                                    clock=ctx.last_clock)
        return BootState(ctx.boot_reset_count, ctx.boot_restart_count, ctx.last_clock, held.log, held.sha256)

    def _handle_evidence(self, tx: Tx, items: list[Inbound], now: int, fx: _Effects) -> None:
        """Check, appraise and record a batch of evidence inside the batch's transaction: the
        challenges and devices read here are locked (SQLite: the whole database, from ``BEGIN
        IMMEDIATE``; PostgreSQL: ``FOR UPDATE``) until the commit, so a challenge is consumed once and
        an admin's change cannot slip between the check and the write."""
        contexts = tx.evidence_contexts([i.envelope.message.challenge_id  # type: ignore[attr-defined]
                                         for i in items])
        self.policies.refresh_if_older(MAX_AGE_S, tx.active_policies)
        releases = tx.releases.release_contexts(sorted({c.device_id for c in contexts.values()}))
        self._apply_evidence(tx, self._prepare_evidence(tx, items, contexts, releases, now, fx), now, fx)

    # -- reference values: the administrator's policies and releases -------------------------------
    def _release_policy(self, release: ReleaseRecord) -> ReferencePolicy | None:
        """The parsed reference values of ``release`` (None if they are unusable: logged)."""
        cached: ReferencePolicy | None = self._release_policies.get(release.reference_sha256)
        if cached is not None:
            return cached
        try:
            parsed = ReferencePolicy.from_json(json.loads(release.reference))
        except (EdgeError, ValueError) as exc:
            detail = exc.diagnostics() if isinstance(exc, EdgeError) else str(exc)
            log_event(log, logging.ERROR, "release_reference_unusable", release=release.target, error=detail)
            return None
        self._release_policies.put(release.reference_sha256, parsed)
        return parsed

    def _admin_candidate(self, role: str, device_class: str, firmware_version: str) -> Candidate:
        header = self.policies.header(device_class, firmware_version)
        return Candidate(role=role, policy=self.policies.policy(header), device_class=device_class,
                         firmware_version=firmware_version, policy_id=None if header is None else header.id,
                         name="" if header is None else header.name)

    def _release_candidate(self, role: str, release: ReleaseRecord | None, ctx_class: str,
                           ctx_version: str) -> Candidate:
        if release is None:  # pragma: no cover - foreign keys keep assignments' releases
            return Candidate(role=role, policy=None, device_class=ctx_class, firmware_version=ctx_version)
        return Candidate(role=role, policy=self._release_policy(release), device_class=release.device_class,
                         firmware_version=release.version, release=release.target, release_id=release.id,
                         name=release.target)

    def _candidates(self, device_class: str, firmware_version: str, releases: ReleaseContext | None,
                    now: int) -> list[Candidate]:
        """The reference values the device may match now (fleet_server.appraisal.releases)."""
        assignment = releases.assignment if releases is not None else None
        if releases is None or assignment is None:
            return [self._admin_candidate(CURRENT, device_class, firmware_version)]
        terms = AssignmentTerms(assignment.state, assignment.deadline, assignment.grace_until)
        out: list[Candidate] = []
        for role in candidate_roles(now, terms):
            if role == ASSIGNED:
                out.append(self._release_candidate(ASSIGNED, releases.releases.get(assignment.release_id),
                                                   device_class, firmware_version))
            elif assignment.previous_release_id is not None:
                out.append(self._release_candidate(
                    PREVIOUS, releases.releases.get(assignment.previous_release_id), device_class,
                    firmware_version))
            else:
                out.append(self._admin_candidate(PREVIOUS, assignment.previous_class,
                                                 assignment.previous_version))
        return out

    def _appraise_candidate(self, candidate: Candidate, *, ak: AttestationKey, record: ChallengeRecord,
                            evidence: Evidence, previous: BootState | None) -> Appraisal:
        policy = candidate.policy
        # A class-independent policy ("any") is not compared with the device's class.
        any_class = policy is not None and policy.device_class == ANY_CLASS
        return appraise(ak=ak, challenge=record, evidence=evidence, previous=previous, policy=policy,
                        allow_sha1=self.ctx.settings.allow_sha1,
                        device_class=None if any_class else candidate.device_class,
                        firmware_version=candidate.firmware_version)

    def _selection(self, device_class: str, firmware_version: str, releases: ReleaseContext | None,
                   now: int) -> Mapping[str, tuple[int, ...]]:
        """The PCRs to quote: those of every reference values the device may match now."""
        candidates = self._candidates(device_class, firmware_version, releases, now)
        if len(candidates) == 1 and candidates[0].role == CURRENT:
            return self.policies.selection(device_class, firmware_version)
        merged: dict[str, set[int]] = {}
        for cand in candidates:
            selection = (cand.policy.selection if cand.policy is not None
                         else self.policies.selection(cand.device_class, cand.firmware_version))
            for bank, pcrs in selection.items():
                merged.setdefault(bank, set()).update(pcrs)
        return {bank: tuple(sorted(pcrs)) for bank, pcrs in sorted(merged.items())}

    # -- update status -----------------------------------------------------------------------------
    def _handle_statuses(self, tx: Tx, items: list[Inbound], now: int, fx: _Effects) -> None:
        """Record installation progress (UpdateStatus) in the device's assignment, strictly: an
        unknown assignment, another device's, a step back or out of a final state is refused."""
        for item in items:
            status = item.envelope.message
            assert isinstance(status, UpdateStatus)
            try:
                assignment = tx.releases.assignment(status.assignment_id, lock=True)
                if assignment is None or assignment.device_id != item.device_id:
                    raise Rejected("assignment_unknown", f"no assignment {status.assignment_id} of device "
                                                         f"{item.device_id}")
                attested = tx.releases.attested_releases([item.device_id]).get(item.device_id)
                problem = status_problem(assignment, state=status.state, target=status.target,
                                         reason=status.reason, attested_release_id=attested)
                if problem is not None:
                    raise Rejected("update_status_refused", problem)
            except Rejected as exc:
                fx.reject(item, exc)
                continue
            committed = status.state == AssignmentState.COMMITTED
            tx.releases.set_assignment_state(
                assignment.id, state=status.state, reason=status.reason, now=now,
                committed_at=now if committed else None,
                grace_until=now + assignment.grace_ms if committed else None)
            fx.counters[f"update.{status.state}"] += 1
            fx.event(logging.INFO, "update_status", device=item.device_id, assignment=assignment.id,
                     target=assignment.target, state=status.state, reason=status.reason[:160])

    def _prepare_evidence(self, tx: Tx, items: list[Inbound], contexts: Mapping[str, EvidenceContext],
                          releases: Mapping[str, ReleaseContext], now: int,
                          fx: _Effects) -> list[_EvidencePlan]:
        plans: list[_EvidencePlan] = []
        taken: set[str] = set()
        for item in items:
            evidence = item.envelope.message
            assert isinstance(evidence, Evidence)
            try:
                ctx = self._check_challenge(item, evidence, contexts.get(evidence.challenge_id), taken)
                ak = self._attestation_key(ctx.ak_public)
                record = ChallengeRecord(ctx.challenge_id, ctx.nonce, ctx.selection, ctx.issued_at,
                                         ctx.deadline)
                previous = self._previous_boot(tx, ctx)
                device_releases = releases.get(ctx.device_id)
                candidates = self._candidates(ctx.device_class, ctx.firmware_version, device_releases,
                                              item.received_at)
                choice = choose(candidates, functools.partial(
                    self._appraise_candidate, ak=ak, record=record, evidence=evidence, previous=previous))
            except Rejected as exc:
                fx.reject(item, exc)
                continue
            except EdgeError as exc:  # e.g. an AK that no longer parses: refuse, keep serving
                fx.reject(item, Rejected("unusable_state", exc.diagnostics()))
                continue
            taken.add(ctx.challenge_id)
            chosen = choice.candidate
            plans.append(_EvidencePlan(item, evidence, ctx, choice.appraisal, chosen.policy_id,
                                       chosen.name or None, chosen, device_releases))
        return plans

    @staticmethod
    def _check_challenge(item: Inbound, evidence: Evidence, ctx: EvidenceContext | None,
                         taken: set[str]) -> EvidenceContext:
        cid = evidence.challenge_id
        if ctx is None:
            raise Rejected("challenge_unknown", f"no challenge {cid}")
        if ctx.device_id != item.device_id:
            raise Rejected("challenge_wrong_device", f"challenge {cid} was issued to another device, not to "
                                                     f"{item.device_id}")
        if ctx.device_state == DeviceState.REVOKED:
            raise Rejected("device_revoked", f"device {item.device_id} is revoked")
        if ctx.device_state not in ATTESTED_STATES:
            raise Rejected("device_not_attested", f"device {item.device_id} is {ctx.device_state}")
        if ctx.status == ChallengeStatus.USED or cid in taken:
            raise Rejected("challenge_used", f"challenge {cid} was already answered (replay)")
        if ctx.status == ChallengeStatus.SUPERSEDED:
            raise Rejected("challenge_superseded", f"challenge {cid} was superseded by a newer one")
        if ctx.status == ChallengeStatus.EXPIRED:
            raise Rejected("challenge_expired", f"challenge {cid} expired")
        if ctx.status != ChallengeStatus.OPEN:  # pragma: no cover - no other status is written
            raise Rejected("challenge_unknown", f"challenge {cid} has status {ctx.status}")
        if item.received_at > ctx.deadline:
            raise Rejected("evidence_late", f"evidence for challenge {cid} arrived "
                                            f"{item.received_at - ctx.deadline} ms after the deadline")
        return ctx

    def _apply_evidence(self, tx: Tx, plans: Sequence[_EvidencePlan], now: int, fx: _Effects) -> None:
        if not plans:
            return
        settings = self.ctx.settings
        expires = now + settings.result_validity_ms
        lease_until = self.models.lease_until(now)  # trusted results renew the device's model leases
        appraised: list[tuple[str, str, bool]] = []
        used: list[str] = []
        attestations: list[NewAttestation] = []
        devices: list[AppraisedDevice] = []
        changes: list[NewStateChange] = []
        for plan in plans:
            ctx, appraisal = plan.ctx, plan.appraisal
            used.append(ctx.challenge_id)
            if _needs_full_log(plan):
                self._rechallenge(tx, plan, now, fx)
                continue
            verdict = appraisal.verdict
            reasons = list(appraisal.reasons)
            new_state = DeviceState.TRUSTED if verdict == TRUSTED else DeviceState.UNTRUSTED
            if ctx.device_state == DeviceState.QUARANTINED:
                new_state, verdict = DeviceState.QUARANTINED, UNTRUSTED
                reasons.insert(0, QUARANTINE_REASON)
            changed = new_state != ctx.device_state
            release = ""
            if verdict == TRUSTED:
                self._follow_attested_state(tx, plan, now, fx)
                release = plan.candidate.release
            evidence_sha256 = hashlib.sha256(plan.item.payload).digest()
            boot = appraisal.boot
            reset: int | None
            restart: int | None
            clock: int | None
            if boot is not None:
                held = boot.log_sha256 if boot.log else None
                log_changed = held != ctx.held_log_sha256
                reset, restart, clock = boot.reset_count, boot.restart_count, boot.clock
            else:
                log_changed = False
                reset, restart, clock = ctx.boot_reset_count, ctx.boot_restart_count, ctx.last_clock
            devices.append(AppraisedDevice(
                id=ctx.device_id, state=new_state, state_changed_at=now if changed else ctx.state_changed_at,
                state_reasons=tuple(reasons), last_attestation_at=now, last_verdict=verdict,
                trusted_until=expires if verdict == TRUSTED else None, boot_reset_count=reset,
                boot_restart_count=restart, last_clock=clock,
                last_pcrs=pcrs_json(appraisal.pcrs) if appraisal.pcrs else None,
                held_log=(boot.log if boot is not None else b"") if log_changed else None,
                held_log_sha256=(boot.log_sha256 if boot is not None and boot.log else None),
                held_log_set=log_changed, policy_id=plan.policy_id))
            attestations.append(NewAttestation(
                device_id=ctx.device_id, challenge_id=ctx.challenge_id, issued_at=ctx.issued_at,
                received_at=plan.item.received_at, stored_at=now, verdict=verdict, reasons=tuple(reasons),
                evidence_sha256=evidence_sha256, policy_id=plan.policy_id,
                reset_count=None if appraisal.quote is None else appraisal.quote.reset_count,
                restart_count=None if appraisal.quote is None else appraisal.quote.restart_count,
                clock=None if appraisal.quote is None else appraisal.quote.clock))
            if changed:
                cause = (f"appraisal: evidence matches policy {plan.policy_name or '?'}" if verdict == TRUSTED
                         else "appraisal: " + (reasons[0] if reasons else "untrusted"))
                changes.append(NewStateChange(ctx.device_id, now, ctx.device_state, new_state, cause))
                fx.event(logging.INFO, "state_changed", device=ctx.device_id, from_state=ctx.device_state,
                         to_state=new_state, cause=cause)
                if new_state == DeviceState.UNTRUSTED:
                    notice = Revocation(state=DeviceState.UNTRUSTED, reasons=_bounded(reasons))
                    payload = self.ctx.signer.sign(notice, aud=ctx.device_id, ts=now)
                    tx.add_outbox(topics.device_down(ctx.device_id, DOWN_REVOCATION), payload, now)
                    fx.outbox_written = True
            fx.replies.append(Reply(topics.device_down(ctx.device_id, DOWN_RESULT), ctx.device_id,
                                    AttestationResult(challenge_id=ctx.challenge_id, verdict=verdict,
                                                      reasons=_bounded(reasons), expires=expires,
                                                      evidence_sha256=evidence_sha256,
                                                      lease_until=lease_until if verdict == TRUSTED else 0,
                                                      release=release),
                                    "attestation.result"))
            appraised.append((ctx.device_id, ctx.device_class, verdict == TRUSTED))
            fx.counters[f"verdict.{verdict}"] += 1
            fx.counters["attestations"] += 1
            if boot is not None and boot.log and boot.prepared:
                fx.after_commit.append(functools.partial(self._boots.put, ctx.device_id, boot))
            if verdict != TRUSTED:
                fx.event(logging.INFO, "attestation_untrusted", device=ctx.device_id,
                         challenge=ctx.challenge_id, reasons=reasons[:5])
        tx.mark_challenges(used, ChallengeStatus.USED)
        tx.insert_attestations(attestations)
        tx.update_appraised_devices(devices)
        tx.insert_state_changes(changes)
        # Leases renewed or revoked with the verdicts; model offers go out after the results.
        fx.replies += [Reply(n.topic, n.aud, n.message, n.kind)
                       for n in self.models.on_appraised(tx, appraised, now)]

    @staticmethod
    def _follow_attested_state(tx: Tx, plan: _EvidencePlan, now: int, fx: _Effects) -> None:
        """After a trusted verdict: the device runs what its evidence matched. Its firmware version
        and class follow the matched release (or, back on what it ran before an assignment, that),
        and the matched release is recorded."""
        ctx, cand = plan.ctx, plan.candidate
        if cand.role == CURRENT:
            return
        attested = plan.releases.attested_release_id if plan.releases is not None else None
        if cand.release_id is not None and attested != cand.release_id:
            tx.releases.set_attested_release(ctx.device_id, cand.release_id, now)
        elif cand.release_id is None and attested is not None:
            tx.releases.clear_attested_release(ctx.device_id)
        if (ctx.device_class, ctx.firmware_version) != (cand.device_class, cand.firmware_version):
            tx.update_device(ctx.device_id, {"device_class": cand.device_class,
                                             "firmware_version": cand.firmware_version, "updated_at": now})
            fx.event(logging.INFO, "firmware_attested", device=ctx.device_id,
                     from_version=ctx.firmware_version, to_version=cand.firmware_version,
                     release=cand.release or "-")

    def _rechallenge(self, tx: Tx, plan: _EvidencePlan, now: int, fx: _Effects) -> None:
        """The device rebooted since the held log: its log continuation cannot be judged. Instead of
        an ``untrusted`` verdict, keep the authentic TPM clock, drop the held log and challenge again
        asking for the whole log (one more round trip after an unannounced reboot)."""
        ctx, quote = plan.ctx, plan.appraisal.quote
        assert quote is not None
        tx.update_device(ctx.device_id, {
            "boot_reset_count": quote.reset_count, "boot_restart_count": quote.restart_count,
            "last_clock": quote.clock, "updated_at": now})
        tx.clear_held_log(ctx.device_id)
        new = NewChallenge(id=new_message_id(), device_id=ctx.device_id, nonce=self.ctx.token(32),
                           selection=selection_json(ctx.selection), issued_at=now,
                           deadline=now + self.ctx.settings.challenge_timeout_ms, cause="full-log",
                           log_offset=0, log_sha256=b"")
        tx.supersede_open_challenges([ctx.device_id])
        tx.insert_challenges([new])
        tx.set_schedule([(ctx.device_id, self.ctx.next_attestation_at(now), now)])
        fx.counters["challenges.full_log"] += 1
        fx.event(logging.INFO, "full_log_required", device=ctx.device_id, challenge=ctx.challenge_id,
                 reset_count=quote.reset_count, restart_count=quote.restart_count)
        fx.replies.append(Reply(topics.device_down(ctx.device_id, DOWN_CHALLENGE), ctx.device_id,
                                challenge_message(new, ctx.selection), "challenge"))

    # -- attest.request ----------------------------------------------------------------------------
    def _handle_hellos(self, tx: Tx, items: list[Inbound], now: int, fx: _Effects) -> None:
        """Answer a batch of ``attest.request``: two queries for the devices and their open
        challenges, one ``executemany`` per kind of write."""
        self.policies.refresh_if_older(MAX_AGE_S, tx.active_policies)
        contexts = tx.hello_contexts([i.device_id for i in items])
        releases = tx.releases.release_contexts([i.device_id for i in items])
        issued: dict[str, tuple[NewChallenge, Mapping[str, tuple[int, ...]]]] = {}
        schedule: list[tuple[str, int, int | None]] = []
        for item in items:
            request = item.envelope.message
            assert isinstance(request, AttestRequest)
            try:
                hello = contexts.get(item.device_id)
                if hello is None:
                    raise Rejected("device_unknown", f"no device {item.device_id}")
                if hello.state == DeviceState.REVOKED:
                    raise Rejected("device_revoked", f"device {item.device_id} is revoked")
                if hello.state not in ATTESTED_STATES:
                    raise Rejected("device_not_attested", f"device {item.device_id} is {hello.state}")
                if item.device_id in issued:  # asked twice in one batch: the challenge just made
                    new, selection = issued[item.device_id]
                    fx.counters["challenges.resent"] += 1
                    fx.replies.append(Reply(topics.device_down(item.device_id, DOWN_CHALLENGE),
                                            item.device_id, challenge_message(new, selection), "challenge"))
                    continue
                made = self._hello(tx, item, request, hello, releases.get(item.device_id), now, fx,
                                   schedule)
            except Rejected as exc:
                fx.reject(item, exc)
                continue
            if made is not None:
                issued[item.device_id] = made
        if issued:
            tx.supersede_open_challenges(list(issued))
            tx.insert_challenges([new for new, _ in issued.values()])
        if schedule:
            tx.set_schedule(schedule)

    def _hello(self, tx: Tx, item: Inbound, request: AttestRequest, hello: HelloContext,
               releases: ReleaseContext | None, now: int, fx: _Effects,
               schedule: list[tuple[str, int, int | None]]
               ) -> tuple[NewChallenge, Mapping[str, tuple[int, ...]]] | None:
        """One ``attest.request``: re-send a fresh open challenge, or defer (rate limit), or make a
        new challenge (returned; the caller writes it)."""
        settings = self.ctx.settings
        open_challenge = hello.open_challenge
        held = hello.held_log_sha256
        if request.reason == "boot" and held is not None:
            # The device says its log restarted: the held log (of the last boot) cannot be continued,
            # so drop it and ask for the whole log. Trusting the claim costs nothing: a whole log is
            # the stricter check, and the quote's resetCount is verified anyway.
            tx.clear_held_log(item.device_id)
            held = None
            if open_challenge is not None and open_challenge.log_offset > 0:
                # It asks for a continuation of the log just dropped: answered (the device may have
                # it already), it could only fail appraisal. Withdraw it; a new challenge follows,
                # now or (rate limit) from the scheduler.
                tx.supersede_open_challenges([item.device_id])
                open_challenge = None
        if (open_challenge is not None and open_challenge.deadline - now >= settings.challenge_timeout_ms // 2
                and (held is not None or open_challenge.log_offset == 0)):
            # A fresh open challenge: send it again rather than a new one (rate limit, and the device
            # may simply have missed it while reconnecting).
            fx.counters["challenges.resent"] += 1
            fx.replies.append(Reply(
                topics.device_down(item.device_id, DOWN_CHALLENGE), item.device_id,
                Challenge(challenge_id=open_challenge.id, nonce=open_challenge.nonce,
                          selection=open_challenge.selection, deadline=open_challenge.deadline,
                          log_offset=open_challenge.log_offset, log_sha256=open_challenge.log_sha256),
                "challenge"))
            return None
        if (hello.last_challenge_at is not None
                and now - hello.last_challenge_at < settings.request_min_interval_ms):
            # Too soon for a new challenge: the scheduler issues one as soon as the limit allows, so
            # the device is not left waiting for its next periodic attestation.
            due = hello.last_challenge_at + settings.request_min_interval_ms
            if hello.next_attestation_at is None or hello.next_attestation_at > due:
                schedule.append((item.device_id, due, None))
            raise Rejected("rate_limited", f"device {item.device_id} asked for a challenge "
                                           f"{now - hello.last_challenge_at} ms after the previous one; "
                                           "deferred to the scheduler")
        selection = self._selection(hello.device_class, hello.firmware_version, releases, now)
        new = NewChallenge(id=new_message_id(), device_id=item.device_id, nonce=self.ctx.token(32),
                           selection=selection_json(selection), issued_at=now,
                           deadline=now + settings.challenge_timeout_ms, cause=request.reason,
                           log_offset=hello.held_log_size if held is not None else 0, log_sha256=held or b"")
        schedule.append((item.device_id, self.ctx.next_attestation_at(now), now))
        fx.counters[f"challenges.{request.reason}"] += 1
        fx.replies.append(Reply(topics.device_down(item.device_id, DOWN_CHALLENGE), item.device_id,
                                challenge_message(new, selection), "challenge"))
        return new, selection

    # -- enrollment --------------------------------------------------------------------------------
    def _enroll_reply(self, item: Inbound, request_id: str, status: str, reasons: Sequence[str] = (),
                      cert: bytes | None = None) -> Reply:
        return Reply(topics.enroll_down(item.device_id, DOWN_RESULT), item.identity,
                     EnrollResult(request_id=request_id, status=status, reasons=_bounded(reasons),
                                  device_cert=cert), "enroll.result")

    def _refuse_enrollment(self, item: Inbound, request_id: str, reason: str, detail: str,
                           fx: _Effects) -> None:
        fx.reject(item, Rejected(reason, detail))
        fx.replies.append(self._enroll_reply(item, request_id, "rejected", [detail]))

    def _prepare_enroll_request(self, item: Inbound, fx: _Effects) -> _EnrollPlan | None:
        request = item.envelope.message
        assert isinstance(request, EnrollRequest)
        if not self.ctx.trust_bundle:
            self._refuse_enrollment(item, item.envelope.id, "enroll_refused",
                                    "the server has no trusted TPM manufacturer CAs configured", fx)
            return None
        try:
            candidate = check_enrollment_request(request, device_id=item.device_id,
                                                 trust_bundle=self.ctx.trust_bundle,
                                                 now=_utc(item.received_at))
            request_id = new_message_id()
            secret = self.ctx.token(32)
            blob, encrypted = make_credential(candidate.ek_public, candidate.ak_name, secret)
        except EdgeError as exc:
            self._refuse_enrollment(item, item.envelope.id, "enroll_refused", exc.diagnostics(), fx)
            return None
        proof_sha256 = hashlib.sha256(expected_proof(secret, request_id)).digest()
        return _EnrollPlan(item, candidate, request_id, blob, encrypted, proof_sha256)

    def _apply_enroll_request(self, tx: Tx, plan: _EnrollPlan, now: int, fx: _Effects) -> None:
        item, cand = plan.item, plan.candidate
        request = item.envelope.message
        assert isinstance(request, EnrollRequest)
        fingerprint = cand.ek.fingerprint
        other = tx.device_id_by_ek(fingerprint)
        if other is not None and other != item.device_id:
            self._refuse_enrollment(item, item.envelope.id, "enroll_refused",
                                    "this TPM (EK) is already enrolled under another device id", fx)
            return
        existing = tx.device_identity(item.device_id)
        if existing is not None:
            if existing.ek_fingerprint != fingerprint:
                self._refuse_enrollment(item, item.envelope.id, "enroll_refused",
                                        f"device id {item.device_id} is enrolled with another TPM", fx)
                return
            if existing.state in HELD_STATES:
                self._refuse_enrollment(item, item.envelope.id, "enroll_held",
                                        held_reason(item.device_id, existing.state), fx)
                return
        tx.insert_session(EnrollmentSessionRecord(
            id=plan.request_id, device_id=item.device_id, proof_sha256=plan.proof_sha256,
            ek_cert=request.ek_cert, ek_fingerprint=fingerprint, ek_public=request.ek_public,
            ak_public=request.ak_public, csr=request.csr, device_class=cand.device_class,
            firmware_version=cand.firmware_version, created_at=now,
            expires_at=now + self.ctx.settings.enrollment_timeout_ms, status="open"))
        fx.counters["enroll.challenged"] += 1
        fx.event(logging.INFO, "enroll_challenged", device=item.device_id, request_id=plan.request_id,
                 ek=fingerprint[:16])
        challenge = EnrollChallenge(request_id=plan.request_id, credential_blob=plan.credential_blob,
                                    encrypted_secret=plan.encrypted_secret)
        fx.replies.append(Reply(topics.enroll_down(item.device_id, DOWN_CHALLENGE), item.identity, challenge,
                                "enroll.challenge"))

    def _apply_enroll_proof(self, tx: Tx, item: Inbound, now: int, fx: _Effects) -> None:
        proof = item.envelope.message
        assert isinstance(proof, EnrollProof)
        session = tx.session(proof.request_id)
        if session is None or session.device_id != item.device_id:
            self._refuse_enrollment(item, proof.request_id, "enroll_session_unknown",
                                    f"no enrollment request {proof.request_id} of this device", fx)
            return
        if session.status == "superseded":
            # The device sent a newer enroll.request (it does on every reconnect, and after
            # enroll_retry); that session's challenge is on its way and will be proved. A final
            # "rejected" for this stale proof would stop an agent that is merely a step behind.
            fx.reject(item, Rejected("enroll_session_superseded",
                                     f"enrollment request {proof.request_id} was superseded by a newer one"))
            return
        if session.status != "open":
            self._refuse_enrollment(item, proof.request_id, "enroll_session_used",
                                    f"enrollment request {proof.request_id} is {session.status}", fx)
            return
        if item.received_at > session.expires_at:
            tx.set_session_status(session.id, "failed")
            self._refuse_enrollment(item, proof.request_id, "enroll_session_expired",
                                    "the enrollment request expired; send a new one", fx)
            return
        if not hmac.compare_digest(hashlib.sha256(proof.proof).digest(), session.proof_sha256):
            tx.set_session_status(session.id, "failed")
            self._refuse_enrollment(item, proof.request_id, "enroll_proof_invalid",
                                    "the credential activation proof is wrong (AK not in the TPM of this EK)",
                                    fx)
            return
        tx.set_session_status(session.id, "done")
        try:
            status, cert = self._admit(tx, session, now, fx)
        except Rejected as exc:
            self._refuse_enrollment(item, session.id, exc.reason, exc.detail, fx)
            return
        fx.replies.append(self._enroll_reply(item, session.id, status, cert=cert))

    def _admit(self, tx: Tx, s: EnrollmentSessionRecord, now: int, fx: _Effects) -> tuple[str, bytes | None]:
        """Create or update the device after a correct proof; returns (status, certificate DER)."""
        ak = self._attestation_key(s.ak_public)
        prereg = tx.preregistration(s.ek_fingerprint)
        device_class = prereg.device_class if prereg is not None and prereg.device_class else s.device_class
        existing = tx.device_identity(s.device_id)
        other = tx.device_id_by_ek(s.ek_fingerprint)
        if other is not None and other != s.device_id:
            raise Rejected("enroll_refused", "this TPM (EK) was enrolled under another device id meanwhile")
        if existing is None:
            state: str = DeviceState.ENROLLED if prereg is not None else DeviceState.PENDING
            tx.insert_device(NewDevice(
                id=s.device_id, state=state, device_class=device_class, firmware_version=s.firmware_version,
                ek_cert=s.ek_cert, ek_fingerprint=s.ek_fingerprint, ek_public=s.ek_public,
                ak_public=s.ak_public, ak_name=ak.name, csr=s.csr, enroll_request_id=s.id, cert_serial=None,
                now=now, next_attestation_at=now if state == DeviceState.ENROLLED else None),
                cause="enrolled: EK pre-registered" if prereg is not None else "enrolled: awaiting approval")
            fx.event(logging.INFO, "device_enrolled", device=s.device_id, state=state)
            fx.counters[f"enroll.{state}"] += 1
        else:
            if existing.ek_fingerprint != s.ek_fingerprint:
                raise Rejected("enroll_refused", f"device {s.device_id} changed during enrollment")
            if existing.state in HELD_STATES:
                # Revoked, quarantined or judged untrusted after the request was challenged: the
                # proof must not reset the state nor earn a certificate.
                raise Rejected("enroll_held", held_reason(s.device_id, existing.state))
            state = existing.state
            values: dict[str, Any] = {"csr": s.csr, "enroll_request_id": s.id, "updated_at": now}
            if existing.ak_public != s.ak_public:
                # A new AK proven in the same TPM (e.g. the device lost its AK blobs). The boot state
                # of the old AK is dropped; without pre-registration an admin approves again.
                values.update(ak_public=s.ak_public, ak_name=ak.name, ek_public=s.ek_public,
                              boot_reset_count=None, boot_restart_count=None, last_clock=None,
                              trusted_until=None)
                tx.clear_held_log(s.device_id)
                state = DeviceState.ENROLLED if prereg is not None else DeviceState.PENDING
                if state == DeviceState.ENROLLED:
                    values["next_attestation_at"] = now
                tx.supersede_open_challenges([s.device_id])
                tx.set_state(s.device_id, from_state=existing.state, to_state=state, now=now,
                             cause="re-enrolled with a new attestation key", extra=values)
            else:
                tx.update_device(s.device_id, values)
            fx.counters["enroll.again"] += 1
            fx.event(logging.INFO, "device_reenrolled", device=s.device_id, state=state)
        if state == DeviceState.PENDING or self.ctx.fleet_ca is None:
            return "pending", None
        cert_pem = pki.sign_device_csr(self.ctx.fleet_ca, s.csr, s.device_id, now=now / 1000)
        der, serial = _cert_der(cert_pem)
        tx.update_device(s.device_id, {"cert_serial": serial, "csr": None})
        record_issued(tx, s.device_id, cert_pem, now=now)  # the certificate it replaces goes on the CRL
        return "admitted", der


def held_reason(device_id: str, state: str) -> str:
    """Why enrolling again is refused for a device in one of :data:`HELD_STATES` (sent and logged)."""
    if state == DeviceState.UNTRUSTED:
        return (f"device {device_id} is untrusted: enrolling again cannot reset its state; only good "
                "evidence from its enrolled attestation key makes it trusted again, or an administrator "
                "re-admits it (fleet-server device approve)")
    lift = "unquarantine or approve" if state == DeviceState.QUARANTINED else "approve"
    return (f"device {device_id} is {state}: enrolling again cannot change its state; only an "
            f"administrator can lift it (fleet-server device {lift})")


def _needs_full_log(plan: _EvidencePlan) -> bool:
    """True if the evidence continues a held log but its (authentic) quote shows a reboot since."""
    quote, ctx = plan.appraisal.quote, plan.ctx
    return (plan.evidence.eventlog_offset > 0 and quote is not None and plan.appraisal.boot is not None
            and ctx.boot_reset_count is not None
            and (quote.reset_count, quote.restart_count) != (ctx.boot_reset_count, ctx.boot_restart_count))


def challenge_message(new: NewChallenge, selection: Any) -> Challenge:
    """The wire ``challenge`` of a stored challenge."""
    return Challenge(challenge_id=new.id, nonce=new.nonce, selection=selection, deadline=new.deadline,
                     log_offset=new.log_offset, log_sha256=new.log_sha256)


def _describe(exc: BaseException) -> str:
    return exc.diagnostics() if isinstance(exc, EdgeError) else f"{type(exc).__name__}: {exc}"


def _event_line(event: str, **fields: object) -> str:
    return format_event(event, fields)


__all__ = ["DEVICE_KINDS", "ENROLL_KINDS", "Inbound", "Processor", "Rejected", "Reply", "challenge_message",
           "held_reason"]
