"""Model protection in the worker: downloads, key releases, leases, offers, telemetry.

The processor (:mod:`fleet_server.service.processor`) parses and de-duplicates the device's
messages as usual, then hands the kinds below to :meth:`ModelService.handle`, and calls
:meth:`ModelService.on_appraised` inside every evidence transaction.

Device -> server (``fleet/v1/devices/<id>/up/<kind>``):

* ``model-fetch`` (:class:`ModelFetch`): bytes ``[offset, offset + length)`` of a package, for a
  device that is trusted (fresh verdict) and entitled to the model. Answered with one binary
  ``model-chunk`` frame (:func:`protocol.messages.encode_chunk`; the package carries its own
  integrity). Read from the package file after a read-only check; no write transaction.
* ``key-request`` (:class:`KeyRequest`): in one write transaction with the device row locked: the
  device must be ``trusted`` with an unexpired verdict whose attestation is its latest, entitled to
  the model, and its certified key must pass :func:`fleet_server.keybroker.check_key_request`;
  then the data key is unsealed with the KEK, wrapped to the device's TPM key, a lease is written
  (earlier active leases of the device for the model are superseded) and a signed ``key-release``
  goes out. Otherwise a signed ``key-denied`` with the reasons; an untrusted, revoked or
  quarantined device also raises the alert ``key_request_untrusted``.
* ``telemetry`` (:class:`Telemetry`): usage totals per device, model and UTC day, per-client
  extraction statistics; a client's extraction alarm raises ``extraction_suspected`` (one open
  alert per device, model and client).
* ``model-status`` (:class:`ModelStatus`): the agent's onnxruntime version, and per model version it
  tried to open whether onnxruntime loaded it, with the runtime's own reason when not (shown on the
  console's device and model pages). Versions the server never published are refused.

Server -> device: ``model-offer`` (signed :class:`ModelOffer`, with a trusted attestation result,
listing the newest deployed version of every model the device is entitled to and holds no active lease
for - or, for a device a running model rollout assigned, the rollout's version (docs/rollouts.md): a
lost offer is repeated with the next trusted result, and stops once the device holds the
key), ``model-chunk``, ``key-release``, ``key-denied``.

Leases: every trusted result renews the device's active leases until
:meth:`ModelService.lease_until` (also carried in the result as ``lease_until``); an untrusted
result revokes them; the scheduler expires the ones not renewed in time and revokes those of
devices revoked or quarantined by an admin (:meth:`ModelTx.sweep_leases`).

Business hours (``[alerts] business_hours``): a key release or download outside the window raises
``key_release_off_hours`` / ``model_download_off_hours`` and is refused when
``alerts.block_off_hours`` is set.

Like the processor: every refusal is counted under ``rejected.<reason>`` and logged as one
``message_rejected`` line; no exception escapes :meth:`ModelService.handle`; data keys are never
logged (they exist in the clear only between unsealing and wrapping, in a buffer zeroed after use).
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from fleet_server.keybroker import (
    BootCounters,
    CertifiedKey,
    KeyRequestError,
    check_key_request,
    wrap_data_key,
)
from fleet_server.modelstore.kek import DataKeyError, Kek, SealedKey
from fleet_server.modelstore.policy import policy_from_text
from fleet_server.modelstore.store import PackageStore
from fleet_server.service.common import Counters, Outgoing, log_event
from fleet_server.service.context import ServiceContext
from fleet_server.storage import alerting
from fleet_server.storage.model_repo import ModelTx, NewLease, VersionRecord
from fleet_server.storage.model_tables import LeaseState
from fleet_server.storage.models import ATTESTED_STATES, DeviceState
from fleet_server.storage.repo import Repository, Tx
from fleet_server.verifier.quote import AttestationKey
from protocol import topics
from protocol.errors import EdgeError, MalformedInputError, StorageError
from protocol.messages import (
    MAX_CHUNK,
    MAX_PLAIN_MESSAGE,
    MAX_REASON_LEN,
    Envelope,
    KeyDenied,
    KeyRelease,
    KeyRequest,
    Message,
    ModelChunk,
    ModelFetch,
    ModelOffer,
    ModelRef,
    ModelStatus,
    Telemetry,
    encode_chunk,
    new_message_id,
    pcrs_from_json,
)

log = logging.getLogger(__name__)

# Topic kinds (docs/model-protection.md).
KIND_MODEL_FETCH = "model-fetch"
KIND_KEY_REQUEST = "key-request"
KIND_TELEMETRY = "telemetry"
KIND_MODEL_STATUS = "model-status"
DOWN_MODEL_OFFER = "model-offer"
DOWN_MODEL_CHUNK = "model-chunk"
DOWN_KEY_RELEASE = "key-release"
DOWN_KEY_DENIED = "key-denied"

MAX_TELEMETRY_MESSAGE = 64 * 1024
MODEL_KINDS: dict[str, tuple[type[Message], int]] = {
    KIND_MODEL_FETCH: (ModelFetch, MAX_PLAIN_MESSAGE),
    KIND_KEY_REQUEST: (KeyRequest, MAX_PLAIN_MESSAGE),
    KIND_TELEMETRY: (Telemetry, MAX_TELEMETRY_MESSAGE),
    KIND_MODEL_STATUS: (ModelStatus, MAX_PLAIN_MESSAGE),
}
"""Device -> server kinds handled here, with the size limit of their payload."""

# Alert kinds and how often one worker writes the same off-hours download alert.
ALERT_KEY_REQUEST_UNTRUSTED = "key_request_untrusted"
ALERT_KEY_RELEASE_OFF_HOURS = "key_release_off_hours"
ALERT_DOWNLOAD_OFF_HOURS = "model_download_off_hours"
ALERT_EXTRACTION = "extraction_suspected"
DOWNLOAD_ALERT_EVERY_MS = 60_000

MAX_OFFERED = 64
MAX_TELEMETRY_PERIOD_MS = 7 * 86_400_000
MAX_CLOCK_SKEW_MS = 10 * 60_000
AK_CACHE_SIZE = 1024
UNTRUSTED_STATES = frozenset({DeviceState.UNTRUSTED, DeviceState.REVOKED, DeviceState.QUARANTINED})


class InboundLike(Protocol):
    """What the handlers read of a parsed inbound message (the processor's ``Inbound``)."""

    @property
    def identity(self) -> str: ...
    @property
    def device_id(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def envelope(self) -> Envelope: ...


@dataclass(frozen=True, slots=True)
class Notice:
    """A message to sign and publish after the transaction that produced it commits."""

    topic: str
    aud: str
    message: Message
    kind: str


class _Refused(Exception):
    """Internal: a message is refused. ``reply``: answer the device with a signed ``key-denied``."""

    def __init__(self, reason: str, detail: str, *, reply: bool = True) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.reply = reply


@dataclass(slots=True)
class _Effects:
    """What a transaction produced; discarded if it rolls back."""

    notices: list[Notice] = field(default_factory=list)
    counters: collections.Counter[str] = field(default_factory=collections.Counter)
    logs: list[tuple[int, str, dict[str, object]]] = field(default_factory=list)

    def event(self, level: int, event: str, **fields: object) -> None:
        self.logs.append((level, event, fields))

    def reject(self, item: InboundLike, reason: str, detail: str) -> None:
        self.counters[f"rejected.{reason}"] += 1
        self.event(logging.WARNING, "message_rejected", reason=reason, identity=item.identity, kind=item.kind,
                   msg_id=item.envelope.id, detail=detail)


def _dedup_key(kind: str, *parts: str) -> str:
    """``kind:part:...``, hashed when longer than the column allows (160)."""
    key = ":".join((kind, *parts))
    if len(key) <= 160:
        return key
    return f"{kind}:{hashlib.sha256(key.encode()).hexdigest()[:64]}"


class ModelService:
    """Model protection for one worker (see the module docstring). Not thread-safe: called from the
    processing thread only (the processor serialises its batches)."""

    def __init__(self, ctx: ServiceContext, repo: Repository, counters: Counters, *,
                 store: PackageStore | None = None) -> None:
        self.ctx = ctx
        self.repo = repo
        self.counters = counters
        self.store = store or PackageStore(ctx.models.store_dir)
        self._aks: collections.OrderedDict[bytes, AttestationKey] = collections.OrderedDict()
        self._download_alerts: collections.OrderedDict[tuple[str, str], int] = collections.OrderedDict()

    # -- leases ------------------------------------------------------------------------------------
    def lease_until(self, now: int) -> int:
        """Expiry of a lease released or renewed at ``now``: ``[models] lease_duration`` (default
        2 x interval + result_grace) plus ``offline_grace``."""
        return now + self.ctx.models.lease_ms(self.ctx.settings)

    def on_appraised(self, tx: Tx, results: Sequence[tuple[str, str, bool]], now: int) -> list[Notice]:
        """In the evidence transaction: (device id, class, trusted) per appraisal. Trusted devices get
        their active leases renewed and an offer of what they are entitled to but hold no lease for;
        untrusted ones (quarantined included) lose their leases."""
        models = tx.models
        untrusted = [device_id for device_id, _, ok in results if not ok]
        if untrusted:
            models.end_leases(state=LeaseState.REVOKED, reason="attestation untrusted", now=now,
                              device_ids=untrusted, from_states=(LeaseState.ACTIVE, LeaseState.SUPERSEDED))
        trusted = [(device_id, device_class) for device_id, device_class, ok in results if ok]
        if not trusted:
            return []
        models.renew_leases([device_id for device_id, _ in trusted], now=now,
                            expires_at=self.lease_until(now))
        notices = []
        for device_id, offered in sorted(models.offers(trusted).items()):
            refs = tuple(ModelRef(name=o.name, version=o.version, size=o.package_size,
                                  package_sha256=o.package_sha256) for o in offered[:MAX_OFFERED])
            notices.append(Notice(topics.device_down(device_id, DOWN_MODEL_OFFER), device_id,
                                  ModelOffer(models=refs), "model.offer"))
        return notices

    # -- inbound -----------------------------------------------------------------------------------
    def handle(self, items: Sequence[InboundLike], now: int) -> list[Outgoing]:
        """Handle model-protection messages (kinds of :data:`MODEL_KINDS`); returns what to publish.

        Key requests, telemetry and status reports share one write transaction (each message again in
        a transaction of its own if it fails); downloads are checked in a read transaction and served from the
        package files. Never raises."""
        out: list[Outgoing] = []
        try:
            writes = [i for i in items if i.kind in (KIND_KEY_REQUEST, KIND_TELEMETRY, KIND_MODEL_STATUS)]
            if writes:
                out += self._finish(self._transactional(writes, now), now)
            fetches = [i for i in items if i.kind == KIND_MODEL_FETCH]
            if fetches:
                out += self._serve(fetches, now)
        except Exception as exc:  # last resort: nothing escapes a worker's batch
            self.counters.add("rejected.internal_error", len(items))
            log.error("%s", f"event=model_batch_failed messages={len(items)} error={_describe(exc)}",
                      exc_info=True)
        return out

    def _transactional(self, items: Sequence[InboundLike], now: int) -> _Effects:
        fx = _Effects()
        try:
            with self.repo.write("handling model messages") as tx:
                for item in items:
                    self._one(tx, item, now, fx)
            return fx
        except Exception as exc:
            self.counters.add("batch.retried")
            log_event(log, logging.WARNING, "batch_retried", messages=len(items), error=_describe(exc))
        total = _Effects()
        for item in items:
            one = _Effects()
            try:
                with self.repo.write("handling a model message") as tx:
                    self._one(tx, item, now, one)
            except Exception as exc:
                total.counters["rejected.internal_error"] += 1
                log.error("%s", f"event=message_failed identity={item.identity} kind={item.kind} "
                                f"error={_describe(exc)}", exc_info=not isinstance(exc, StorageError))
                continue
            total.notices += one.notices
            total.counters.update(one.counters)
            total.logs += one.logs
        return total

    def _one(self, tx: Tx, item: InboundLike, now: int, fx: _Effects) -> None:
        message = item.envelope.message
        try:
            if isinstance(message, KeyRequest):
                self._key_request(tx, item, message, now, fx)
            elif isinstance(message, Telemetry):
                self._telemetry(tx, item, message, now, fx)
            elif isinstance(message, ModelStatus):
                self._model_status(tx, item, message, now, fx)
            else:  # pragma: no cover - handle() routes only these kinds here
                raise _Refused("kind_unknown", f"no handler for {item.kind}", reply=False)
        except _Refused as exc:
            fx.reject(item, exc.reason, exc.detail)
            if exc.reply and isinstance(message, KeyRequest):
                fx.counters["keys.denied"] += 1
                fx.notices.append(Notice(
                    topics.device_down(item.device_id, DOWN_KEY_DENIED), item.device_id,
                    KeyDenied(name=message.name, version=message.version,
                              reasons=(exc.detail[:MAX_REASON_LEN],)), "key.denied"))

    def _finish(self, fx: _Effects, now: int) -> list[Outgoing]:
        for name, n in fx.counters.items():
            self.counters.add(name, n)
        for level, event, fields in fx.logs:
            log_event(log, level, event, **fields)
        return [Outgoing(n.topic, self.ctx.signer.sign(n.message, aud=n.aud, ts=now), n.kind)
                for n in fx.notices]

    # -- key requests ------------------------------------------------------------------------------
    def _attestation_key(self, ak_public: bytes) -> AttestationKey:
        ak = self._aks.get(ak_public)
        if ak is None:
            ak = AttestationKey.from_tpm2b_public(ak_public)
            self._aks[ak_public] = ak
            if len(self._aks) > AK_CACHE_SIZE:
                self._aks.popitem(last=False)
        return ak

    def _alert(self, tx: Tx, kind: str, severity: str, message: str, dedup: tuple[str, ...], now: int, *,
               device_id: str | None, model: str | None, details: Mapping[str, object], fx: _Effects) -> None:
        alerting.raise_alerts(tx.conn, [alerting.NewAlert(
            kind=kind, severity=severity, message=message, dedup_key=_dedup_key(kind, *dedup),
            device_id=device_id, model=model, details=dict(details))], now)
        fx.counters[f"alerts.{kind}"] += 1
        fx.event(logging.WARNING, "alert_raised", kind=kind, device=device_id, model=model)

    def _key_request(self, tx: Tx, item: InboundLike, req: KeyRequest, now: int, fx: _Effects) -> None:
        device_id = item.device_id
        models: ModelTx = tx.models
        device = models.device_key_context(device_id)
        if device is None:
            raise _Refused("device_unknown", f"no device {device_id}", reply=False)
        what = f"{req.name} {req.version}"
        if device.state in UNTRUSTED_STATES:
            self._alert(tx, ALERT_KEY_REQUEST_UNTRUSTED, "critical",
                        f"device {device_id} ({device.state}) asked for the key of model {what}",
                        (device_id,), now, device_id=device_id, model=req.name,
                        details={"state": device.state, "version": req.version}, fx=fx)
            raise _Refused("device_untrusted", f"device {device_id} is {device.state}: no model keys")
        if device.state != DeviceState.TRUSTED:
            raise _Refused("device_not_trusted", f"device {device_id} is {device.state}: it must attest as "
                                                 "trusted before it can receive model keys")
        if device.trusted_until is None or now >= device.trusted_until:
            raise _Refused("trust_expired", f"the trusted verdict of device {device_id} has expired; attest "
                                            "again first")
        if (device.latest_verdict != DeviceState.TRUSTED or device.last_pcrs is None
                or device.reset_count is None or device.restart_count is None):
            raise _Refused("trust_expired", f"the latest attestation of device {device_id} is not a trusted "
                                            "one of its current boot; attest again first")
        version = models.version(req.name, req.version)
        if version is None:
            raise _Refused("model_unknown", f"no published model {what}")
        if not version.deployed and not _staged(models, device_id, version):
            # published but not deployed (nor staged to this device by a model rollout)
            raise _Refused("not_deployed", f"model {what} is not deployed")
        if not models.entitled(version.model_id, device_id, device.device_class):
            raise _Refused("not_entitled", f"device {device_id} is not entitled to model {req.name}")
        kek = self.ctx.kek
        if kek is None:
            fx.event(logging.ERROR, "key_release_disabled", detail="no key-encryption key configured")
            raise _Refused("key_release_disabled", "the server cannot release model keys now")
        try:
            pcrs = pcrs_from_json(json.loads(device.last_pcrs), "device.last_pcrs")
            ak = self._attestation_key(device.ak_public)
        except (ValueError, MalformedInputError) as exc:
            raise _Refused("unusable_state", f"stored attestation state of {device_id} is unusable: "
                                             f"{_describe(exc)}") from None
        try:
            certified = check_key_request(
                req, device_id=device_id, ak=ak, attested_pcrs=pcrs,
                selection={bank: tuple(sorted(values)) for bank, values in pcrs.items()}, now=now,
                trusted_until=device.trusted_until,
                boot=BootCounters(device.reset_count, device.restart_count),
                allow_sha1=self.ctx.settings.allow_sha1)
        except KeyRequestError as exc:
            raise _Refused(f"key_{exc.reason}", exc.diagnostics()) from None
        if self.ctx.alerts.off_hours(now):
            self._alert(tx, ALERT_KEY_RELEASE_OFF_HOURS, "warning",
                        f"model key {what} requested by {device_id} outside business hours "
                        f"({self.ctx.alerts.business_hours})", (device_id, req.name), now,
                        device_id=device_id, model=req.name,
                        details={"version": req.version, "blocked": self.ctx.alerts.block_off_hours}, fx=fx)
            if self.ctx.alerts.block_off_hours:
                raise _Refused("off_hours", f"model keys are released only during business hours "
                                            f"({self.ctx.alerts.business_hours})")
        wrapped = self._wrap(version, kek, certified, fx)
        policy = policy_from_text(version.policy)
        lease_id = new_message_id()
        expires = self.lease_until(now)
        models.end_leases(state=LeaseState.SUPERSEDED, reason=f"superseded by lease {lease_id}", now=now,
                          device_ids=[device_id], model_id=version.model_id)
        models.insert_lease(NewLease(lease_id=lease_id, device_id=device_id, model_id=version.model_id,
                                     version=version.version, issued_at=now, expires_at=expires,
                                     key_name=certified.name))
        fx.counters["keys.released"] += 1
        fx.event(logging.INFO, "key_released", device=device_id, model=req.name, version=req.version,
                 lease=lease_id, lease_expires=expires, key_name=certified.name.hex()[:20])
        fx.notices.append(Notice(
            topics.device_down(device_id, DOWN_KEY_RELEASE), device_id,
            KeyRelease(name=req.name, version=req.version, key_name=certified.name, wrapped_key=wrapped,
                       lease_id=lease_id, lease_expires=expires, policy=policy), "key.release"))

    @staticmethod
    def _wrap(version: VersionRecord, kek: Kek, certified: CertifiedKey, fx: _Effects) -> bytes:
        """Unseal the version's data key, wrap it to the certified key, zero the plaintext copy."""
        sealed = SealedKey(version.kek_id, version.data_key_nonce, version.encrypted_data_key)
        try:
            data_key = kek.unseal(sealed, name=version.name, version=version.version,
                                  package_id=bytes.fromhex(version.package_id))
        except DataKeyError as exc:
            fx.event(logging.ERROR, "data_key_unavailable", model=version.name, version=version.version,
                     detail=exc.diagnostics())
            raise _Refused("data_key_unavailable", "the server cannot open this model's data key") from None
        try:
            return wrap_data_key(data_key, certified)
        finally:
            data_key[:] = bytes(len(data_key))

    # -- telemetry ---------------------------------------------------------------------------------
    def _telemetry(self, tx: Tx, item: InboundLike, t: Telemetry, now: int, fx: _Effects) -> None:
        device_id = item.device_id
        models = tx.models
        state = models.device_trust([device_id]).get(device_id)
        if state is None:
            raise _Refused("device_unknown", f"no device {device_id}", reply=False)
        if state[0] == DeviceState.REVOKED:
            raise _Refused("device_revoked", f"device {device_id} is revoked", reply=False)
        if state[0] not in ATTESTED_STATES:
            raise _Refused("device_not_attested", f"device {device_id} is {state[0]}", reply=False)
        model = models.model(t.name)
        if model is None or models.version(t.name, t.version) is None:
            raise _Refused("model_unknown", f"no published model {t.name} {t.version}", reply=False)
        if not (t.since <= t.until <= now + MAX_CLOCK_SKEW_MS
                and t.until - t.since <= MAX_TELEMETRY_PERIOD_MS):
            raise _Refused("telemetry_invalid", f"telemetry period [{t.since}, {t.until}) is not a period of "
                                                "at most 7 days ending before now", reply=False)
        if not models.record_usage(device_id, model.id, since=t.since, until=t.until, served=t.served,
                                   refused=t.refused, now=now):
            raise _Refused("telemetry_overlap", f"telemetry period starting {t.since} overlaps one already "
                                                "recorded (replay?)", reply=False)
        for client in t.clients:
            stat = None if client.statistic is None else round(client.statistic * 1_000_000)
            models.record_client(device_id, model.id, client=client.client, served=client.served,
                                 refused=client.refused, statistic_micro=stat, alarm=client.alarm, now=now)
            if client.alarm:
                self._alert(tx, ALERT_EXTRACTION, "critical",
                            f"extraction suspected: client {client.client} of model {t.name} on {device_id} "
                            f"(statistic {client.statistic if client.statistic is not None else '-'})",
                            (device_id, t.name, client.client), now, device_id=device_id, model=t.name,
                            details={"client": client.client, "version": t.version,
                                     "statistic_micro": stat, "served": client.served}, fx=fx)
        fx.counters["telemetry.accepted"] += 1

    # -- runtime and load status ------------------------------------------------------------------
    def _model_status(self, tx: Tx, item: InboundLike, st: ModelStatus, now: int, fx: _Effects) -> None:
        device_id = item.device_id
        models = tx.models
        state = models.device_trust([device_id]).get(device_id)
        if state is None:
            raise _Refused("device_unknown", f"no device {device_id}", reply=False)
        if state[0] == DeviceState.REVOKED:
            raise _Refused("device_revoked", f"device {device_id} is revoked", reply=False)
        ids: list[int] = []
        for load in st.models:  # all or nothing: check every entry before writing any
            version = models.version(load.name, load.version)
            if version is None:
                raise _Refused("model_unknown", f"no published model {load.name} {load.version}", reply=False)
            ids.append(version.model_id)
        models.record_runtime(device_id, st.runtime, now=now)
        for load, model_id in zip(st.models, ids, strict=True):
            models.record_load(device_id, model_id, load.version, state=load.state, error=load.error,
                               onnxruntime=st.runtime, now=now)
            if load.state == "failed":
                fx.counters["model.load_failures"] += 1
                fx.event(logging.WARNING, "model_load_failed", device=device_id, model=load.name,
                         version=load.version, onnxruntime=st.runtime, error=load.error)
        fx.counters["model_status.accepted"] += 1

    # -- downloads ---------------------------------------------------------------------------------
    def _serve(self, items: Sequence[InboundLike], now: int) -> list[Outgoing]:
        plans: list[tuple[InboundLike, ModelFetch, VersionRecord, int]] = []
        fx = _Effects()
        alerts: list[tuple[str, str, str]] = []
        with self.repo.models.reading("checking model downloads") as tx:
            trust = tx.device_trust([i.device_id for i in items])
            for item in items:
                fetch = item.envelope.message
                assert isinstance(fetch, ModelFetch)
                try:
                    version, length = self._check_fetch(tx, item, fetch, trust, now)
                except _Refused as exc:
                    fx.reject(item, exc.reason, exc.detail)
                    continue
                if self.ctx.alerts.off_hours(now):
                    alerts.append((item.device_id, fetch.name, fetch.version))
                    if self.ctx.alerts.block_off_hours:
                        fx.reject(item, "off_hours", "model downloads are served only during business hours "
                                                     f"({self.ctx.alerts.business_hours})")
                        continue
                plans.append((item, fetch, version, length))
        if alerts:
            self._download_alerts_raised(alerts, now, fx)
        out: list[Outgoing] = []
        for item, fetch, version, length in plans:
            try:
                data = self.store.read(version.name, version.version, fetch.offset, length)
            except StorageError as exc:
                fx.event(logging.ERROR, "package_unreadable", model=version.name, version=version.version,
                         detail=exc.diagnostics())
                fx.reject(item, "package_missing", f"package {version.name} {version.version} is unreadable")
                continue
            if len(data) != length:
                fx.event(logging.ERROR, "package_unreadable", model=version.name, version=version.version,
                         detail=f"file shorter than the {version.package_size} bytes recorded")
                fx.reject(item, "package_missing", f"package {version.name} {version.version} is unreadable")
                continue
            frame = encode_chunk(ModelChunk(name=version.name, version=version.version, offset=fetch.offset,
                                            total=version.package_size, data=data))
            out.append(Outgoing(topics.device_down(item.device_id, DOWN_MODEL_CHUNK), frame, "model.chunk"))
            fx.counters["model.chunks_sent"] += 1
            fx.counters["model.bytes_sent"] += len(data)
        self._finish(fx, now)
        return out

    def _check_fetch(self, tx: ModelTx, item: InboundLike, fetch: ModelFetch,
                     trust: Mapping[str, tuple[str, str, int | None]], now: int) -> tuple[VersionRecord, int]:
        found = trust.get(item.device_id)
        if found is None:
            raise _Refused("device_unknown", f"no device {item.device_id}", reply=False)
        state, device_class, trusted_until = found
        if state != DeviceState.TRUSTED or trusted_until is None or now >= trusted_until:
            raise _Refused("device_not_trusted", f"device {item.device_id} is {state} (trusted until "
                                                 f"{trusted_until}): downloads need a fresh trusted verdict",
                           reply=False)
        version = tx.version(fetch.name, fetch.version)
        if version is None:
            raise _Refused("model_unknown", f"no published model {fetch.name} {fetch.version}", reply=False)
        if not version.deployed and not _staged(tx, item.device_id, version):
            raise _Refused("not_deployed", f"model {fetch.name} {fetch.version} is not deployed", reply=False)
        if not tx.entitled(version.model_id, item.device_id, device_class):
            raise _Refused("not_entitled", f"device {item.device_id} is not entitled to model {fetch.name}",
                           reply=False)
        if fetch.offset >= version.package_size:
            raise _Refused("fetch_out_of_range", f"offset {fetch.offset} is past the end of the "
                                                 f"{version.package_size}-byte package", reply=False)
        return version, min(fetch.length, MAX_CHUNK, version.package_size - fetch.offset)

    def _download_alerts_raised(self, alerts: Sequence[tuple[str, str, str]], now: int, fx: _Effects) -> None:
        """Off-hours download alerts, at most one write per device and model per
        :data:`DOWNLOAD_ALERT_EVERY_MS` from this worker (a download is hundreds of fetches)."""
        due = []
        for device_id, name, version in alerts:
            last = self._download_alerts.get((device_id, name))
            if last is not None and now - last < DOWNLOAD_ALERT_EVERY_MS:
                continue
            self._download_alerts[(device_id, name)] = now
            if len(self._download_alerts) > 10_000:
                self._download_alerts.popitem(last=False)
            due.append((device_id, name, version))
        if not due:
            return
        try:
            with self.repo.write("raising download alerts") as tx:
                for device_id, name, version in due:
                    self._alert(tx, ALERT_DOWNLOAD_OFF_HOURS, "warning",
                                f"model {name} {version} downloaded by {device_id} outside business hours "
                                f"({self.ctx.alerts.business_hours})", (device_id, name), now,
                                device_id=device_id, model=name,
                                details={"version": version, "blocked": self.ctx.alerts.block_off_hours},
                                fx=fx)
        except EdgeError as exc:
            fx.event(logging.WARNING, "alert_failed", kind=ALERT_DOWNLOAD_OFF_HOURS, error=exc.diagnostics())


def _staged(models: ModelTx, device_id: str, version: VersionRecord) -> bool:
    """Whether a running or paused model rollout assigned ``version`` to the device."""
    staged = models.staged([device_id]).get((device_id, version.model_id))
    return staged is not None and staged[1] == version.version


def _describe(exc: BaseException) -> str:
    return exc.diagnostics() if isinstance(exc, EdgeError) else f"{type(exc).__name__}: {exc}"


__all__ = [
    "DOWN_KEY_DENIED", "DOWN_KEY_RELEASE", "DOWN_MODEL_CHUNK", "DOWN_MODEL_OFFER", "KIND_KEY_REQUEST",
    "KIND_MODEL_FETCH", "KIND_MODEL_STATUS", "KIND_TELEMETRY", "MODEL_KINDS", "ModelService", "Notice",
]
