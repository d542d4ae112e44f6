"""The model vault service: wires store, fetch, keys, leases, counters, unlock and telemetry into the agent.

:class:`ModelVault` is created by :class:`agent.service.Agent` when ``[models]`` is configured. The
agent calls it from its main thread for every verified server message that concerns models, and the
vault does the slow work (downloads, TPM certification and unwrapping, decryption, onnxruntime) on
its own thread, ``agent-<id>-vault``. Locking is the exception: a revocation or an untrusted verdict
locks every model *synchronously*, on the main thread, before the agent takes the next message -
inference is refused from that moment (the guard's lock is a mutex and a pointer swap).

Flow (docs/model-protection.md, "Device side"):

1. ``model-offer`` (signed): for each offered model that is newer than the held version, download
   the package in chunks (``model-fetch`` up, ``model-chunk`` down); vet it (offer digest, signed
   manifest, not older than the highest accepted version); raise the version mark in the TPM-signed,
   NV-counter-protected state file; keep the package (ciphertext, 0600). An older version is refused.
   With an update channel (the agent's TUF client, ``channel``) the package is instead the ``models``
   role's target ``models/<name>/<version>.pkg``, downloaded on the channel thread
   (``agent-<id>-vault-tuf``) and vetted the same way once its signed custom metadata names the
   offered package; ``model-fetch`` is used then only for a package the verified metadata does not
   list, never after TUF refused one (docs/model-protection.md, "Packages through the update channel").
2. When the device is trusted (latest verified verdict) and a model is held but not serving: a bound
   key for the current PCR state of the server's selection, certified by the AK with the key-request
   qualifier -> ``key-request`` up.
3. ``key-release`` (signed): unwrap the data key with the TPM, decrypt in memory, onnxruntime from
   bytes, guard unlocked with the release's lease and the signed policy, data key zeroized.
   ``key-denied``: recorded; asked again after ``key_retry`` seconds.
4. Every verified trusted result renews the leases (``lease_until``); a lease that passes unrenewed
   locks its model (checked on every request by the guard and on the vault's timer). A revocation or
   an untrusted verdict locks everything at once. A locked model needs a new key release.
5. Quota counters are saved every N requests / T seconds and at stop (NV counter increment each);
   telemetry every ``telemetry_interval``; audit records are written by the vault's thread.
6. ``model-status`` up: the agent's onnxruntime version and, per model, whether onnxruntime loaded the
   version released to it (and onnxruntime's own reason when it did not); sent on every (re)connection
   and whenever a load outcome changes, so the server shows why a device does not serve a model.

A rollback of the state file (or anything else that makes the counters untrustworthy) puts the vault
in a failed state: every model stays locked with the reason, and no key is requested, until an
operator intervenes (docs/agent.md).
"""

from __future__ import annotations

import collections
import contextlib
import hmac
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from agent.config import AgentConfig, InferenceConfig, ModelsConfig
from agent.inference import RollbackError
from agent.inference.guard import AuditRecord, ClientInfo, GuardPolicy, InferenceGuard
from agent.inference.http import InferenceApi, TcpInferenceServer, UnixInferenceServer, serve_in_thread
from agent.inference.limits import CounterState
from agent.inference.monitor import ExtractionMonitor
from agent.inference.runtime import ONNXRUNTIME_VERSION, ModelLoadError, zeroize
from agent.log import EventLogger
from agent.statefile import ensure_dir
from agent.tpm.interface import AgentTpm
from agent.trust import TrustState, load_signing_keys
from agent.update.tuf_client import TargetNotFound
from agent.vault import KeyReleaseRefused, VaultError
from agent.vault.clients import ClientEntry, client_table, load_clients
from agent.vault.counters import SavePolicy, StateKeeper, VaultState
from agent.vault.fetch import Download
from agent.vault.keys import BoundKeys, StateSigner
from agent.vault.leases import LeaseClock
from agent.vault.store import PackageStore, map_file
from agent.vault.telemetry import AuditLog, UsageTracker, build_telemetry, verify_chain
from agent.vault.unlock import ModelBuffer, VaultRuntime, guard_policy, harden_process, open_session
from protocol import topics
from protocol.errors import ConfigError, EdgeError, TpmError, TransportError, UpdateVerificationError
from protocol.messages import (
    MAX_LOAD_ERROR,
    AttestationResult,
    Envelope,
    KeyDenied,
    KeyRelease,
    Message,
    ModelLoad,
    ModelOffer,
    ModelPolicy,
    ModelRef,
    ModelStatus,
    Revocation,
    decode_chunk,
    encode_plain,
)
from protocol.modelpkg import Manifest, ModelPackageError
from protocol.mqtt import MqttClient

__all__ = ["VAULT_DIR", "ModelChannel", "ModelVault", "model_target"]

VAULT_DIR = "vault"
MODELS_DIR = "models"
AUDIT_FILE = "audit.jsonl"
TICK = 0.2
"""Longest the vault's thread sleeps while a download runs (retransmits)."""
IDLE_TICK = 1.0
"""Longest it sleeps otherwise (saves, telemetry, audit writes; with many agents in one process, idle
wake-ups add up). Lease expiries are not polled: the thread wakes at the next one exactly."""
STATE_RETRY = 5.0
PUBLISH_TIMEOUT = 5.0
NEGATIVE_VERDICTS = frozenset({"untrusted", "revoked", "quarantined"})
CHANNEL_RETRY = 60.0
"""Seconds before a package whose download through the update channel failed (or was refused) is
tried again through it, when offered again; it is never fetched with ``model-fetch`` instead."""

TpmGetter = Callable[[], AgentTpm]


class ChannelTarget(Protocol):
    """A target the update channel verified: its bytes and the ``models`` role's signed custom metadata."""

    @property
    def data(self) -> bytes: ...

    @property
    def custom(self) -> Mapping[str, Any]: ...


class ModelChannel(Protocol):
    """The device's verified update channel (:class:`agent.update.tuf_client.UpdateClient`).

    ``fetch_target`` refreshes the repository metadata and returns the target only if it verifies;
    it raises :class:`~agent.update.tuf_client.TargetNotFound` when the verified metadata lists no
    such target, :class:`~protocol.errors.UpdateVerificationError` when TUF refuses metadata or
    bytes, another :class:`~protocol.errors.EdgeError` when it cannot download. It may block for
    its timeouts: the vault calls it on a thread of its own."""

    def fetch_target(self, target_path: str, *, max_length: int) -> ChannelTarget: ...


def model_target(name: str, version: str) -> str:
    """The TUF target path of a model package (``model publish`` adds it): ``models/<name>/<version>.pkg``."""
    return f"models/{name}/{version}.pkg"


@dataclass(eq=False)
class _Model:
    """Everything the vault keeps about one model."""

    name: str
    counters: CounterState
    monitor: ExtractionMonitor = field(default_factory=ExtractionMonitor)
    buffer: ModelBuffer = field(default_factory=ModelBuffer)
    version: str | None = None            # accepted and stored
    manifest: Manifest | None = None
    guard: InferenceGuard | None = None
    runtime: VaultRuntime | None = None
    serving_version: str | None = None
    lock_reason: str = "no key released yet"
    locked_at: float | None = None
    key_requested_at: float | None = None
    key_requested_version: str | None = None
    denied: tuple[str, ...] = ()
    last_error: str | None = None
    guard_clients: dict[bytes, ClientInfo] | None = None
    rekey: bool = False                   # the server re-offered the serving version: ask for a new key
    load: ModelLoad | None = None         # the latest load outcome, reported in model-status


@dataclass
class _Fetch:
    download: Download
    fd: int
    started: float


class ModelVault:
    """The device's model vault (see the module docstring). Thread-safe entry points:
    :meth:`on_chunk`, :meth:`on_challenge`, :meth:`on_message`, :meth:`on_result`,
    :meth:`on_revocation`, :meth:`lock_all`, :meth:`status`."""

    def __init__(self, config: AgentConfig, *, tpm: TpmGetter, trust: TrustState, clock: Callable[[], float],
                 log: EventLogger, channel: ModelChannel | None = None) -> None:
        if config.models is None:
            raise ConfigError("models: the model vault is not configured")
        self._config = config
        self._mcfg: ModelsConfig = config.models
        self._icfg: InferenceConfig | None = config.inference
        self._device_id = config.device_id
        self._tpm = tpm
        self._trust = trust
        self._clock = clock
        self._log = log.bind(part="vault")
        try:
            self._model_keys = load_signing_keys(self._mcfg.signing_public_key)
        except ConfigError as exc:
            message = exc.diagnostics().replace("server.signing_public_key", "models.signing_public_key")
            raise ConfigError(message) from None
        self._clients: tuple[ClientEntry, ...] = ()
        if self._icfg is not None:
            self._clients = load_clients(self._icfg.clients_file)
        self._folder = config.state_dir / VAULT_DIR
        self._lock = threading.RLock()
        self._epoch = 0
        self._jobs: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: MqttClient | None = None
        self._selection: dict[str, tuple[int, ...]] | None = None
        self._models: dict[str, _Model] = {}
        self._fetches: dict[str, _Fetch] = {}
        self._refused: set[bytes] = set()
        self._leases = LeaseClock(self._mcfg.offline_grace)
        self._usage = UsageTracker(clock())
        self._audit: AuditLog | None = None
        self._counts: collections.Counter[str] = collections.Counter()
        self._save_policy = SavePolicy(self._mcfg.counter_save_requests, self._mcfg.counter_save_interval)
        self._store: PackageStore | None = None
        self._keeper: StateKeeper | None = None
        self._binder: BoundKeys | None = None
        self._error: str | None = None
        self._state_retry_at = 0.0
        self._last_save = clock()
        self._last_telemetry = clock()
        self._counters_changed = False
        self._audit_chain = "unknown"
        self._hardening: dict[str, bool] = {}
        self._api: InferenceApi | None = None
        self._server: TcpInferenceServer | UnixInferenceServer | None = None
        self._last_lock: dict[str, Any] | None = None
        self._status_connects = -1        # connection count at the last model-status sent
        self._status_due = False
        self._channel = channel
        self._channel_jobs: queue.Queue[ModelRef] = queue.Queue()
        self._channel_thread: threading.Thread | None = None
        self._channel_pending: dict[str, tuple[ModelRef, float]] = {}  # name -> (ref, started)
        self._channel_retry: dict[bytes, float] = {}  # package digest -> not before (after a failure)
        self._not_in_channel: set[bytes] = set()      # digests the verified metadata does not list

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Open the vault state (TPM needed), start the inference API and the vault's thread.

        Raises :class:`~protocol.errors.ConfigError` / :class:`~protocol.errors.StorageError` for an
        unusable setup. A rolled-back state does not raise: the vault starts failed-closed (every
        model locked with the reason) so the agent keeps attesting and the API explains the refusal.
        """
        ensure_dir(self._folder)
        if self._mcfg.harden_process:
            self._hardening = harden_process()
        if self._icfg is not None:
            self._audit = AuditLog(self._config.state_dir / AUDIT_FILE, max_bytes=self._icfg.audit_max_bytes,
                                   keep=self._icfg.audit_keep)
        self._open_state()
        if self._icfg is not None:
            self._start_api(self._icfg)
        self._thread = threading.Thread(target=self._run, name=f"agent-{self._device_id}-vault", daemon=True)
        self._thread.start()
        if self._channel is not None:
            self._channel_thread = threading.Thread(target=self._run_channel, args=(self._channel,),
                                                    name=f"agent-{self._device_id}-vault-tuf", daemon=True)
            self._channel_thread.start()

    def attach(self, client: MqttClient | None) -> None:
        """The MQTT client to publish fetches, key requests and telemetry with (``None``: none now)."""
        self._client = client

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the thread, lock every model, save the counters, write the audit log, stop the API."""
        self._stop.set()
        for thread in (self._thread, self._channel_thread):
            if thread is not None and thread is not threading.current_thread():
                thread.join(timeout)
        self.lock_all("the agent is stopping", count=False)
        if self._keeper is not None and self._error is None:
            try:
                self._save()
            except EdgeError as exc:
                self._log.warning("counters_not_saved", error=exc.diagnostics())
        if self._audit is not None:
            with contextlib.suppress(EdgeError):
                self._audit.flush()
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        with self._lock:
            for m in self._models.values():
                m.buffer.release()
        for name in list(self._fetches):
            self._abort_fetch(name)

    def _open_state(self) -> None:
        """Load the state file against the NV counter (or create it on the first start)."""
        signer = StateSigner(self._tpm, self._folder)
        keeper = StateKeeper(self._folder, self._tpm, signer)
        try:
            state = keeper.load()
        except RollbackError as exc:
            self._fail_closed(f"vault state rollback detected: {exc.diagnostics()}")
            self._placeholders_from_disk()
            return
        except TpmError as exc:
            self._log.warning("vault_state_unavailable", error=exc.diagnostics(), retry_in=STATE_RETRY)
            self._state_retry_at = self._clock() + STATE_RETRY
            return
        self._keeper = keeper
        self._binder = BoundKeys(self._tpm, self._folder, self._device_id, clock=self._clock)
        store = PackageStore(self._config.state_dir / MODELS_DIR, self._model_keys, state.versions)
        store.prune()
        held = store.held()
        self._store = store
        with self._lock:
            for name, manifest in held.items():
                m = self._model(name, state)
                m.version, m.manifest = manifest.version, manifest
                self._register_locked(m)  # only if the API already runs (a delayed open)
            for name in state.counters:
                self._model(name, state)
        if self._audit is not None:
            self._audit_chain = verify_chain(self._audit.files(), state.audit_head)
            if self._audit_chain == "broken":
                self._log.warning("audit_log_tampered", file=str(self._audit.path))
        self._log.info("vault_opened", generation=state.generation, models=",".join(sorted(held)) or "-")

    def _model(self, name: str, state: VaultState | None = None) -> _Model:
        m = self._models.get(name)
        if m is None:
            counters = None if state is None else state.counters.get(name)
            if counters is None:
                generation = self._keeper.generation if self._keeper is not None else 0
                counters = CounterState.initial(nv_counter=max(0, generation), now=self._clock())
            m = self._models[name] = _Model(name=name, counters=counters)
        return m

    def _placeholders_from_disk(self) -> None:
        """In a failed state: locked guards for whatever packages verify on disk, so API clients are
        told why they are refused (the version marks themselves cannot be trusted)."""
        try:
            store = PackageStore(self._config.state_dir / MODELS_DIR, self._model_keys)
            for path in sorted(store.root.glob("*.pkg")):
                name, _, version = path.name[:-4].rpartition("-")
                try:
                    manifest = store.read(name, version)
                except EdgeError:
                    continue
                with self._lock:
                    m = self._model(name)
                    m.version, m.manifest = version, manifest
                    m.lock_reason = self._error or m.lock_reason
        except EdgeError as exc:
            self._log.warning("vault_store_unreadable", error=exc.diagnostics())

    def _start_api(self, cfg: InferenceConfig) -> None:
        api = InferenceApi({})
        with self._lock:
            self._api = api
            for m in self._models.values():
                self._register_locked(m)
        if cfg.socket is not None:
            if not cfg.socket.parent.exists():
                ensure_dir(cfg.socket.parent)  # a folder only the agent's user may enter
            server: TcpInferenceServer | UnixInferenceServer = UnixInferenceServer(api, cfg.socket)
        else:
            server = TcpInferenceServer(api, "127.0.0.1", cfg.port or 0)
        self._server = server
        serve_in_thread(server)
        self._log.info("inference_api_listening", address=self.inference_address)

    @property
    def inference_address(self) -> str | None:
        """``127.0.0.1:<port>`` or the Unix socket path of the local API (``None`` if not running)."""
        server = self._server
        if server is None:
            return None
        if isinstance(server, UnixInferenceServer):
            return server.path
        host, port = server.server_address[:2]
        return f"{host!s}:{port}"

    # -- entry points from the agent's main thread -------------------------------------------------
    def on_chunk(self, payload: bytes) -> None:
        """A ``model-chunk`` frame arrived (unverified bytes: checked on the vault's thread)."""
        self._jobs.put(("chunk", payload))

    def on_challenge(self, selection: dict[str, tuple[int, ...]]) -> None:
        """A verified challenge: remember the PCR selection the server quotes (key requests bind to it)."""
        with self._lock:
            self._selection = {bank: tuple(pcrs) for bank, pcrs in selection.items()}

    def on_message(self, envelope: Envelope) -> None:
        """A verified ``model-offer``, ``key-release`` or ``key-denied``."""
        msg: Message = envelope.message
        with self._lock:
            epoch = self._epoch
        if isinstance(msg, ModelOffer):
            self._jobs.put(("offer", msg))
        elif isinstance(msg, KeyRelease):
            self._count("key_releases_received")
            self._jobs.put(("release", msg, epoch))
        elif isinstance(msg, KeyDenied):
            self._jobs.put(("denied", msg))

    def on_result(self, msg: AttestationResult, *, server_ts: int) -> None:
        """A verified attestation result: an untrusted verdict locks everything now; a trusted one
        renews the leases and lets the vault ask for keys of models that are not serving."""
        if msg.verdict != "trusted":
            self.lock_all(f"attestation verdict {msg.verdict}: {'; '.join(msg.reasons)[:300]}",
                          verdict_ts=server_ts)
            return
        now = self._clock()
        if msg.lease_until > 0:
            with self._lock:
                for m in self._models.values():
                    runtime, guard = m.runtime, m.guard
                    if runtime is None or guard is None or runtime.closed:
                        continue
                    lease = self._leases.renew(m.name, lease_until_ms=msg.lease_until, now=now)
                    if lease is None:
                        continue
                    guard.unlock(runtime, lease=lease)
                    if runtime.closed:  # the guard's own expiry check ran in between
                        self._lock_model(m, f"lease {lease.lease_id} expired", now)
                    else:
                        self._count("leases_renewed")
        self._jobs.put(("keys",))

    def on_revocation(self, msg: Revocation, *, server_ts: int) -> None:
        """A verified revocation: lock every model now (zeroize, drop the sessions)."""
        self.lock_all(f"revoked by the fleet server ({msg.state}): {'; '.join(msg.reasons)[:300]}",
                      verdict_ts=server_ts)

    def lock_all(self, reason: str, *, verdict_ts: int | None = None, count: bool = True) -> None:
        """Lock every model synchronously; later releases received before this are not used."""
        started = time.perf_counter()
        now = self._clock()
        with self._lock:
            self._epoch += 1
            locked = [m.name for m in self._models.values() if m.runtime is not None]
            for m in self._models.values():
                self._lock_model(m, reason, now)
            if count:
                self._count("lock_all")
                self._last_lock = {"reason": reason, "locked_at": now, "verdict_ts": verdict_ts,
                                   "lock_seconds": time.perf_counter() - started, "models": locked}
        if locked:
            self._log.warning("models_locked", reason=reason, models=",".join(locked))

    def _count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    def _lock_model(self, m: _Model, reason: str, now: float) -> None:
        """Lock one model (caller holds the state lock): session dropped, lease forgotten, a new key
        release needed. The data key was zeroized at unlock; the plaintext buffer holds zeros."""
        if m.guard is not None:
            m.guard.lock(reason)
        if m.runtime is not None:
            m.runtime.close()
        m.runtime = None
        m.serving_version = None
        m.lock_reason = reason
        m.locked_at = now
        m.key_requested_at = None
        self._leases.drop(m.name)

    # -- the vault's thread ------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:  # the main thread changes leases (renewals, locks) under the same lock
                deadline = self._leases.next_deadline()
            tick = TICK if self._fetches else IDLE_TICK
            wait = tick if deadline is None else max(0.0, min(tick, deadline - self._clock()))
            try:
                job = self._jobs.get(timeout=wait)
            except queue.Empty:
                job = None
            try:
                if job is not None:
                    self._do(job)
                self._tick()
            except EdgeError as exc:
                self._count("errors")
                self._log.warning("vault_error", error=exc.diagnostics())
            except Exception as exc:  # a bug must be visible, and must not end the thread
                self._count("errors")
                self._log.error("vault_internal_error", error=f"{type(exc).__name__}: {exc}")

    def _do(self, job: tuple[Any, ...]) -> None:
        kind = job[0]
        if kind == "chunk":
            self._do_chunk(job[1])
        elif kind == "offer":
            self._do_offer(job[1])
        elif kind == "release":
            self._do_release(job[1], job[2])
        elif kind == "denied":
            self._do_denied(job[1])
        elif kind == "channel":
            self._do_channel_result(job[1], job[2], job[3])
        # "keys" needs nothing beyond the tick

    def _tick(self) -> None:
        now = self._clock()
        if self._audit is not None:
            self._audit.flush()  # also while failed closed: refusals are audited too
        if self._keeper is None:
            if self._error is None and now >= self._state_retry_at:
                self._open_state()
            return
        self._expire_leases(now)
        self._send_status()
        for name in list(self._fetches):
            self._send_fetches(name, now)
        if self._error is None:
            self._request_keys(now)
            if self._save_due(now):
                self._save()
        if now - self._last_telemetry >= self._mcfg.telemetry_interval or now < self._last_telemetry:
            self._last_telemetry = now
            self._send_telemetry(now)

    def _expire_leases(self, now: float) -> None:
        with self._lock:
            for m in self._models.values():
                terms = self._leases.get(m.name)
                closed = m.runtime is not None and m.runtime.closed  # the guard locked itself
                if closed or (terms is not None and m.name in self._leases.expired(now)):
                    lease_id = terms.lease_id if terms is not None else "?"
                    self._lock_model(m, f"lease {lease_id} expired", now)
                    self._count("leases_expired")
                    self._log.warning("lease_expired", model=m.name, lease_id=lease_id)

    # -- offers and downloads ----------------------------------------------------------------------
    def _do_offer(self, offer: ModelOffer) -> None:
        store = self._store
        if store is None or self._error is not None:
            return
        for ref in offer.models:
            if ref.package_sha256 in self._refused:
                continue
            if ref.size > self._mcfg.max_package_size:
                self._refuse(ref, f"package of {ref.size} bytes exceeds models.max_package_size")
                continue
            if store.older_than_held(ref):
                self._refuse(ref, f"version {ref.version} is older than the held version "
                                  f"{store.version(ref.name)}")
                continue
            held = not store.newer_than_held(ref)
            if held and store.package_path(ref.name, ref.version).exists():
                # The server offers a version this device holds only when the device has no active
                # lease for it (e.g. the policy changed and the old lease was superseded): ask again.
                with self._lock:
                    m = self._models.get(ref.name)
                    if (m is not None and m.version == ref.version and m.runtime is not None
                            and not m.rekey):
                        m.rekey, m.key_requested_at = True, None
                continue
            if self._channel is not None and ref.package_sha256 not in self._not_in_channel:
                self._offer_to_channel(ref)
                continue
            current = self._fetches.get(ref.name)
            if current is not None:
                if current.download.ref == ref:
                    continue
                self._abort_fetch(ref.name)
            fd = store.open_partial(ref.name, ref.version, ref.size)

            def sink(offset: int, data: bytes, fd: int = fd) -> None:
                os.pwrite(fd, data, offset)

            download = Download(ref, sink, chunk=self._mcfg.fetch_chunk, window=self._mcfg.fetch_window,
                                timeout=self._mcfg.fetch_timeout)
            with self._lock:  # status() reads the downloads from the main thread
                self._fetches[ref.name] = _Fetch(download=download, fd=fd, started=self._clock())
            self._log.info("model_download_started", model=ref.name, version=ref.version, size=ref.size)
            self._send_fetches(ref.name, self._clock())

    def _refuse(self, ref: ModelRef, reason: str) -> None:
        self._refused.add(ref.package_sha256)
        self._count("packages_refused")
        with self._lock:
            m = self._models.get(ref.name)
            if m is not None:
                m.last_error = f"{ref.version} refused: {reason}"
        self._log.warning("model_refused", model=ref.name, version=ref.version, reason=reason)

    def _send_fetches(self, name: str, now: float) -> None:
        fetch = self._fetches.get(name)
        client = self._client
        if fetch is None or client is None or not client.connected:
            return  # requests are sent (or repeated) once connected again
        try:
            requests = fetch.download.requests(now)
        except VaultError as exc:
            self._abort_fetch(name)
            self._count("downloads_failed")
            self._log.warning("model_download_failed", model=name, error=exc.diagnostics())
            return
        for req in requests:
            if self._publish("model-fetch", req):
                self._count("model_fetch_requests")

    def _abort_fetch(self, name: str) -> None:
        with self._lock:
            fetch = self._fetches.pop(name, None)
        if fetch is None:
            return
        with contextlib.suppress(OSError):
            os.close(fetch.fd)
        if self._store is not None:
            self._store.discard_partial(name, fetch.download.ref.version)

    def _do_chunk(self, payload: bytes) -> None:
        try:
            chunk = decode_chunk(payload)
        except EdgeError as exc:
            self._count("chunks_rejected")
            self._log.debug("model_chunk_rejected", error=exc.diagnostics())
            return
        fetch = self._fetches.get(chunk.name)
        if fetch is None or not fetch.download.accept(chunk):
            self._count("chunks_ignored")
            return
        self._count("chunks_received")
        if fetch.download.complete:
            self._finish_download(chunk.name)
        else:
            self._send_fetches(chunk.name, self._clock())

    def _finish_download(self, name: str) -> None:
        with self._lock:
            fetch = self._fetches.pop(name)
        self._store_package(fetch.download.ref, fetch.fd, fetch.started)

    def _store_package(self, ref: ModelRef, fd: int, started: float) -> None:
        """Vet and keep the complete package written to ``fd`` (its partial file; closed here): the
        same path whether it came with ``model-fetch`` or through the update channel."""
        name = ref.name
        store = self._store
        assert store is not None
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            manifest = store.vet(ref)
        except ModelPackageError as exc:
            self._refuse(ref, exc.diagnostics())
            return
        previous = store.version(name)
        store.accept(manifest)
        try:
            self._save()  # the new version mark is rollback-protected before the package is used
        except BaseException:
            store.revert(name, previous)
            store.discard_partial(name, ref.version)
            raise
        store.commit(name, ref.version)
        with self._lock:
            m = self._model(name)
            m.version, m.manifest = manifest.version, manifest
            m.key_requested_at, m.denied, m.last_error = None, (), None
            self._register_locked(m)
        self._count("packages_stored")
        self._log.info("model_stored", model=name, version=manifest.version, size=ref.size,
                       seconds=round(self._clock() - started, 3))

    # -- the update channel (TUF) ------------------------------------------------------------------
    def _offer_to_channel(self, ref: ModelRef) -> None:
        """Have the channel thread fetch ``ref``'s package (vault thread): one download per model at
        a time; a package that failed waits :data:`CHANNEL_RETRY` seconds before the next offer of it
        is tried again (through the channel only)."""
        now = self._clock()
        not_before = self._channel_retry.get(ref.package_sha256)
        if not_before is not None and 0 < not_before - now <= CHANNEL_RETRY:  # a clock step back retries
            return
        with self._lock:
            if ref.name in self._channel_pending:
                return  # the one in flight finishes first; the offer is repeated until a lease exists
            self._channel_pending[ref.name] = (ref, now)
        self._channel_retry.pop(ref.package_sha256, None)
        self._abort_fetch(ref.name)
        self._log.info("model_download_started", model=ref.name, version=ref.version, size=ref.size,
                       channel="tuf")
        self._channel_jobs.put(ref)

    def _run_channel(self, channel: ModelChannel) -> None:
        """The channel thread: TUF refreshes and downloads block (MQTT round trips, timeouts), so
        neither the receive loop nor the vault's thread (leases, locks) waits for them."""
        while not self._stop.is_set():
            try:
                ref = self._channel_jobs.get(timeout=IDLE_TICK)
            except queue.Empty:
                continue
            try:
                target = channel.fetch_target(model_target(ref.name, ref.version), max_length=ref.size)
            except EdgeError as exc:
                self._jobs.put(("channel", ref, None, exc))
            except Exception as exc:  # a bug must be visible, and must not end the thread
                self._log.error("vault_internal_error", error=f"{type(exc).__name__}: {exc}")
                self._jobs.put(("channel", ref, None, UpdateVerificationError(f"internal error: {exc}")))
            else:
                self._jobs.put(("channel", ref, target, None))

    def _do_channel_result(self, ref: ModelRef, target: ChannelTarget | None,
                           error: EdgeError | None) -> None:
        with self._lock:
            _, started = self._channel_pending.pop(ref.name, (ref, self._clock()))
        store = self._store
        if store is None or self._error is not None:
            return
        if isinstance(error, TargetNotFound):
            # Signed metadata that does not list the package (published before `updates init`):
            # model-fetch is safe, as the package is checked against the signed offer's digest and
            # its own signed manifest either way.
            self._not_in_channel.add(ref.package_sha256)
            self._count("tuf_not_found")
            self._log.info("model_not_in_update_channel", model=ref.name, version=ref.version,
                           fallback="model-fetch")
            self._do_offer(ModelOffer(models=(ref,)))
            return
        if error is not None:
            refused = isinstance(error, UpdateVerificationError)
            self._channel_failed(ref, error.diagnostics(), refused=refused)
            return
        assert target is not None
        mismatch = _custom_mismatch(ref, target.custom)
        if mismatch is not None:
            self._channel_failed(ref, mismatch, refused=True)
            return
        if len(target.data) != ref.size:
            self._channel_failed(ref, f"the target has {len(target.data)} bytes, the offer says {ref.size}",
                                 refused=True)
            return
        if not store.newer_than_held(ref):
            return  # stored meanwhile
        self._count("tuf_downloads")
        fd = store.open_partial(ref.name, ref.version, ref.size)
        try:
            view = memoryview(target.data)
            written = 0
            while written < len(view):
                written += os.pwrite(fd, view[written:], written)
        except OSError as exc:
            os.close(fd)
            store.discard_partial(ref.name, ref.version)
            self._channel_failed(ref, f"cannot write the package: {exc.strerror or exc}", refused=False)
            return
        self._store_package(ref, fd, started)

    def _channel_failed(self, ref: ModelRef, reason: str, *, refused: bool) -> None:
        """Report a package the channel did not deliver; never fall back to model-fetch for it."""
        self._count("tuf_refused" if refused else "tuf_failures")
        self._channel_retry[ref.package_sha256] = self._clock() + CHANNEL_RETRY
        what = "refused by the update channel" if refused else "not delivered by the update channel"
        with self._lock:
            m = self._model(ref.name)
            m.last_error = f"{ref.version} {what}: {reason}"[:600]
        self._log.warning("model_channel_refused" if refused else "model_channel_failed", model=ref.name,
                          version=ref.version, error=reason)

    # -- keys --------------------------------------------------------------------------------------
    def _request_keys(self, now: float) -> None:
        client = self._client
        binder = self._binder
        with self._lock:
            selection = self._selection
            wanted = [(m.name, m.version) for m in self._models.values()
                      if m.version is not None and m.manifest is not None
                      and (m.runtime is None or m.serving_version != m.version or m.rekey)
                      and not (m.key_requested_version == m.version and m.key_requested_at is not None
                               and 0 <= now - m.key_requested_at < self._mcfg.key_retry)]
        if not wanted or client is None or not client.connected or binder is None or selection is None:
            return
        if not self._trust.trusted(now):
            return
        for name, version in wanted:
            assert version is not None
            try:
                request = binder.request(name, version, selection)
            except EdgeError as exc:
                self._count("key_request_failures")
                self._log.warning("key_request_failed", model=name, version=version, error=exc.diagnostics())
                with self._lock:
                    m = self._models[name]
                    m.key_requested_at, m.key_requested_version = now, version
                    m.last_error = f"key request failed: {exc.diagnostics()}"
                continue
            with self._lock:
                m = self._models[name]
                m.key_requested_at, m.key_requested_version = now, version
            if self._publish("key-request", request):
                self._count("key_requests_sent")
                self._log.info("key_request_sent", model=name, version=version)

    def _may_unlock(self, epoch: int) -> None:
        """Raise unless nothing locked the vault since the release arrived and the latest verdict is
        not negative (caller holds the state lock or re-checks under it)."""
        if epoch != self._epoch:
            raise KeyReleaseRefused("the device was revoked or judged untrusted after this key release "
                                    "arrived")
        verdict = self._trust.verdict
        if verdict.revoked or verdict.state in NEGATIVE_VERDICTS:
            raise KeyReleaseRefused(f"the latest verdict is {verdict.state}")
        if self._error is not None:
            raise KeyReleaseRefused(self._error)

    def _do_release(self, release: KeyRelease, epoch: int) -> None:
        try:
            self._unlock(release, epoch)
        except (KeyReleaseRefused, ModelPackageError, TpmError) as exc:
            what = "unwrap_failures" if isinstance(exc, TpmError) else "releases_refused"
            self._counts[what] += 1
            with self._lock:
                m = self._models.get(release.name)
                if m is not None:
                    m.last_error = exc.diagnostics()
                    if isinstance(exc, ModelPackageError):  # the package did not open: tell the server why
                        reason = exc.reason if isinstance(exc, ModelLoadError) else exc.diagnostics()
                        self._set_load(m, ModelLoad(name=m.name, version=release.version, state="failed",
                                                    error=_one_line(reason)))
            self._log.warning("key_release_refused", model=release.name, version=release.version,
                              error=exc.diagnostics())

    def _unlock(self, release: KeyRelease, epoch: int) -> None:
        store, binder = self._store, self._binder
        if store is None or binder is None:
            raise KeyReleaseRefused(self._error or "the vault state is not open")
        with self._lock:
            m = self._models.get(release.name)
            if m is None or m.version != release.version or m.manifest is None:
                raise KeyReleaseRefused(f"key release for {release.name} {release.version}, which this "
                                        "device does not hold")
            manifest = m.manifest
            self._may_unlock(epoch)
        now = self._clock()
        lease = self._leases.grant(release.name, lease_id=release.lease_id, expires_ms=release.lease_expires,
                                   quota=release.policy.lease_quota, now=now)
        data_key = binder.unwrap(release)
        try:
            with map_file(store.package_path(release.name, release.version)) as package:
                runtime = open_session(package, manifest, data_key, m.buffer, threads=self._mcfg.ort_threads)
        finally:
            zeroize(data_key)
        policy = guard_policy(manifest, release.policy)
        with self._lock:
            try:
                self._may_unlock(epoch)
            except KeyReleaseRefused:
                runtime.close()
                raise
            guard = m.guard
            clients = client_table(self._clients, release.policy, m.name)
            if guard is None or guard.policy != policy or m.guard_clients != clients:
                new = self._new_guard(m, release.policy, policy)
                if guard is not None:
                    guard.lock("replaced by a new policy")
                guard = m.guard = new
            guard.unlock(runtime, lease=lease)
            if m.runtime is not None and m.runtime is not runtime:
                m.runtime.close()
            m.runtime, m.serving_version = runtime, release.version
            m.lock_reason, m.locked_at, m.denied, m.last_error = "", None, (), None
            m.rekey = False
            self._set_load(m, ModelLoad(name=m.name, version=release.version, state="loaded"))
            self._leases.commit(m.name, lease, now=now, server_until=release.lease_expires / 1000)
            if self._api is not None:
                self._api.guards[m.name] = guard
        self._count("models_unlocked")
        self._log.info("model_unlocked", model=m.name, version=release.version, lease_id=release.lease_id,
                       lease_expires=release.lease_expires, buffer_locked=m.buffer.locked)

    def _register_locked(self, m: _Model) -> None:
        """Give a held model that has no guard yet a locked one in the API (caller holds the state lock),
        so clients are told why it does not serve (423 and the reason) rather than 404."""
        if self._api is None or m.guard is not None or m.manifest is None:
            return
        placeholder = GuardPolicy(model=m.name, io_signature=m.manifest.io_signature)
        m.guard = self._new_guard(m, ModelPolicy(), placeholder)
        m.guard.lock(m.lock_reason)
        self._api.guards[m.name] = m.guard

    def _new_guard(self, m: _Model, policy: ModelPolicy, gp: GuardPolicy) -> InferenceGuard:
        """A locked guard for ``m`` that continues its counters (caller holds the state lock)."""
        counters = m.guard.counters() if m.guard is not None else m.counters
        clients = client_table(self._clients, policy, m.name)
        m.guard_clients = clients
        return InferenceGuard(gp, None, clients, self._clock, self._audit_sink, counters=counters,
                              monitor=m.monitor)

    def _do_denied(self, msg: KeyDenied) -> None:
        """A signed refusal also ends any session of that model: the server sends it when the device
        lost its entitlement or trust, and leases are renewed per device, not per model."""
        self._count("key_denied")
        now = self._clock()
        with self._lock:
            m = self._models.get(msg.name)
            if m is not None:
                if m.runtime is not None or (m.guard is not None and not m.guard.locked):
                    self._lock_model(m, "key denied: " + "; ".join(msg.reasons)[:400], now)
                m.denied = msg.reasons
                m.key_requested_at, m.key_requested_version = now, msg.version
        self._log.warning("key_denied", model=msg.name, version=msg.version, reasons="; ".join(msg.reasons))

    # -- counters, telemetry, audit ----------------------------------------------------------------
    def _audit_sink(self, record: AuditRecord) -> None:
        if self._audit is not None:
            self._audit.append(record)
        self._usage.observe(record)

    def _save_due(self, now: float) -> bool:
        charged = self._usage.charged()
        if charged:
            self._counters_changed = True
        return self._save_policy.due(requests=charged, changed=self._counters_changed,
                                     last_save=self._last_save, now=now)

    def _save(self) -> None:
        """Save versions and counters (state file, then NV increment). A rollback fails the vault closed."""
        keeper, store = self._keeper, self._store
        if keeper is None or store is None:
            return
        if self._audit is not None:
            self._audit.flush()
        with self._lock:
            counters = {m.name: (m.guard.counters() if m.guard is not None else m.counters)
                        for m in self._models.values()}

        def written(state: VaultState) -> None:
            with self._lock:
                for name, cs in state.counters.items():
                    m = self._models.get(name)
                    if m is None:
                        continue
                    m.counters = cs
                    if m.guard is not None:
                        m.guard.counters_saved(cs)

        self._usage.charged(reset=True)
        try:
            keeper.save(store.versions(), counters, self._audit.head if self._audit is not None else b"",
                        on_written=written)
        except RollbackError as exc:
            self._fail_closed(f"vault state rollback detected: {exc.diagnostics()}")
            raise
        self._counters_changed = False
        self._last_save = self._clock()
        self._count("state_saves")

    def _fail_closed(self, reason: str) -> None:
        self._error = reason
        self._log.error("vault_failed", error=reason)
        self.lock_all(reason, count=False)

    def _send_telemetry(self, now: float) -> None:
        client = self._client
        if client is None or not client.connected:
            return  # the usage keeps accumulating until it can be sent
        with self._lock:
            models = [(m.name, m.serving_version or m.version, m.guard) for m in self._models.values()]
        active = set(self._usage.active())
        for name, version, guard in models:
            report = guard.extraction_report() if guard is not None else {}
            alarm = any(r.get("alarm") for r in report.values())
            if version is None or (name not in active and not alarm):
                continue
            usage = self._usage.take(name, now)
            if self._publish("telemetry", build_telemetry(name, version, usage, now, report)):
                self._count("telemetry_sent")

    def _publish(self, kind: str, msg: Message) -> bool:
        client = self._client
        if client is None or not client.connected:
            # Never wait on a broker that is away: the vault's thread also drops expired sessions.
            self._count("publish_skipped")
            return False
        try:
            client.publish(topics.device_up(self._device_id, kind),
                           encode_plain(msg, ts=int(self._clock() * 1000)), qos=1, timeout=PUBLISH_TIMEOUT)
        except TransportError as exc:
            self._count("publish_failures")
            self._log.warning("publish_failed", type=msg.TYPE, error=exc.diagnostics())
            return False
        return True

    def _set_load(self, m: _Model, load: ModelLoad) -> None:
        """Record a load outcome (caller holds the state lock); a change is reported to the server."""
        if m.load != load:
            m.load = load
            self._status_due = True

    def _send_status(self) -> None:
        """``model-status`` once per connection, and again when a load outcome changed."""
        client = self._client
        if client is None or not client.connected:
            return
        connects = client.stats().connects
        with self._lock:
            if connects == self._status_connects and not self._status_due:
                return
            loads = tuple(m.load for m in sorted(self._models.values(), key=lambda x: x.name)
                          if m.load is not None)
            self._status_due = False
        if self._publish("model-status", ModelStatus(runtime=ONNXRUNTIME_VERSION, models=loads[:64])):
            self._status_connects = connects
            self._count("status_sent")
        else:
            with self._lock:
                self._status_due = True

    # -- status ------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """JSON-ready state of the vault for the agent's status (nothing secret)."""
        with self._lock:
            models = {}
            for m in sorted(self._models.values(), key=lambda x: x.name):
                terms = self._leases.get(m.name)
                fetch = self._fetches.get(m.name)
                models[m.name] = {
                    "version": m.version, "serving_version": m.serving_version,
                    "locked": m.runtime is None or m.runtime.closed, "lock_reason": m.lock_reason or None,
                    "lease_id": None if terms is None else terms.lease_id,
                    "lease_expires": None if terms is None else terms.expires_at(self._leases.offline_grace),
                    "download": None if fetch is None else fetch.download.progress(),
                    "denied": list(m.denied), "last_error": m.last_error,
                    "load": None if m.load is None else m.load.to_json(),
                }
            for name, (ref, _) in self._channel_pending.items():
                if name in models:
                    models[name]["download"] = {"size": ref.size, "channel": "tuf"}
                else:
                    models[name] = {"version": None, "serving_version": None, "locked": True,
                                    "lock_reason": "downloading", "lease_id": None, "lease_expires": None,
                                    "download": {"size": ref.size, "channel": "tuf"}, "denied": [],
                                    "last_error": None}
            for name, fetch in self._fetches.items():
                if name not in models:
                    models[name] = {"version": None, "serving_version": None, "locked": True,
                                    "lock_reason": "downloading", "lease_id": None, "lease_expires": None,
                                    "download": fetch.download.progress(), "denied": [], "last_error": None}
            return {
                "error": self._error, "models": models, "counters": dict(sorted(self._counts.items())),
                "channel": "model-fetch" if self._channel is None else "tuf",
                "state_generation": None if self._keeper is None else self._keeper.generation,
                "audit_chain": self._audit_chain, "inference_address": self.inference_address,
                "onnxruntime": ONNXRUNTIME_VERSION,
                "hardening": dict(self._hardening), "last_lock": None if self._last_lock is None
                else dict(self._last_lock),
            }

    def model_runs(self, name: str) -> int:
        """Requests that reached the model ``name`` through its current session (0 if none)."""
        with self._lock:
            m = self._models.get(name)
            return 0 if m is None or m.runtime is None else m.runtime.runs

    def guard(self, name: str) -> InferenceGuard | None:
        """The guard serving ``name`` (tests and diagnostics; applications use the local API)."""
        with self._lock:
            m = self._models.get(name)
            return None if m is None else m.guard

    @property
    def folder(self) -> Path:
        """``<state_dir>/vault``."""
        return self._folder


def _custom_mismatch(ref: ModelRef, custom: Mapping[str, Any]) -> str | None:
    """Why the target's signed custom metadata does not name the signed offer's package, or None."""
    name, version, digest = custom.get("name"), custom.get("version"), custom.get("package_sha256")
    if name != ref.name or version != ref.version:
        return f"the target's signed metadata names {name!r} {version!r}, the offer {ref.name} {ref.version}"
    if not isinstance(digest, str) or not hmac.compare_digest(digest.lower(), ref.package_sha256.hex()):
        return "the target's signed package_sha256 is not the offer's"
    return None


def _one_line(text: str) -> str:
    """``text`` as the wire wants a load error: one line, no control characters, at most 512 characters."""
    flat = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return flat[:MAX_LOAD_ERROR] or "no reason given"
