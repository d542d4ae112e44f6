"""The agent service: enroll when needed, then keep the device attested over MQTT.

:class:`Agent` wires the pieces together; everything it needs is passed in (configuration, clock,
random source, logger), so one process can run many agents (a test harness, a fleet simulator).

Threads of one agent
--------------------
* **main** (``agent-<id>``): opens the TPM (retrying with backoff while it is unavailable), enrolls
  with the claim certificate if there is no device certificate (:mod:`agent.enroll`), then connects
  with the device certificate and loops: notices each new connection and publishes
  ``attest.request`` (reason ``boot`` for the first connection after start, ``reconnect`` after),
  takes inbound messages from the MQTT client's queue, verifies each (:mod:`agent.trust`), hands
  challenges to the worker, applies results and revocations, and keeps ``status.json`` current.
* **worker** (``agent-<id>-attest``): answers challenges (:mod:`agent.attest`) and publishes the
  evidence.  TPM work never runs on paho's network thread nor blocks message handling.  Only the
  latest unanswered challenge is kept: the server supersedes older ones anyway.
* with ``[update]``, the update thread (``agent-<id>-update``, :mod:`agent.update.runner`): installs
  assigned releases; its TUF client's refreshes and downloads run there, the main loop only hands it
  the ``tuf-chunk`` frames of the device's own topic (before any signature check: python-tuf
  verifies what they make up).  With ``[models]`` too, the vault's channel thread
  (``agent-<id>-vault-tuf``) downloads model packages through the same TUF client (one refresh or
  download at a time; see :mod:`agent.vault.vault`).
* the MQTT client's own network thread (:class:`protocol.mqtt.MqttClient`), which reconnects with
  exponential backoff and jitter (``mqtt.reconnect_min`` .. ``mqtt.reconnect_max``).

Failures
--------
Broker loss: the MQTT client reconnects; the agent then sends ``attest.request`` (``reconnect``).
TPM errors: logged and counted, the challenge is missed, and the adapter is reopened for the next
one.  A rejected enrollment, unusable configuration or state files end the agent with an error
(:attr:`AgentStatus.error`, exit status 1 of :meth:`Agent.run_forever`).
"""

from __future__ import annotations

import collections
import copy
import hashlib
import json
import logging
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from types import FrameType
from typing import Any

from agent.attest import ChallengeExpiredError, answer_challenge
from agent.config import AgentConfig, load_config
from agent.enroll import Enrollment, subscription_state
from agent.identity import DeviceIdentity
from agent.log import EventLogger
from agent.statefile import ensure_dir, write_atomic
from agent.tpm.adapter import TpmAdapter
from agent.tpm.interface import AgentTpm
from agent.trust import CHUNK_KIND, Channel, MessageVerifier, TrustState, load_signing_keys
from agent.update.bootctl import Rebooter
from agent.update.floor import TpmVersionFloor
from agent.update.installer import HealthCheck, Installer, InstallerSettings, StatusOutbox, TargetSource
from agent.update.mqtt_fetcher import CHUNK_KIND as TUF_CHUNK_KIND
from agent.update.runner import UpdateRunner
from agent.update.tuf_client import UpdateClient
from agent.vault.vault import ModelVault
from agent.version import agent_version
from protocol import topics
from protocol.errors import ConfigError, EdgeError, TpmError, TransportError
from protocol.messages import (
    AttestationResult,
    AttestRequest,
    Challenge,
    KeyDenied,
    KeyRelease,
    ModelOffer,
    Revocation,
    UpdateAssignment,
    encode_plain,
    new_message_id,
)
from protocol.mqtt import Backoff, InboundMessage, MqttClient, PublishHandle, TlsFiles

POLL = 0.2
"""Seconds a loop waits for work before re-checking the stop flag and the connection."""
STATUS_HEARTBEAT = 30.0
"""The status file is rewritten at least this often (its ``updated`` time shows the agent is alive)."""
STATUS_MIN_INTERVAL = 2.0
"""A change of only the counters or of the verdict's expiry (every attestation makes one) is written at
most this often: an atomic, durable rewrite costs about a millisecond of CPU, more than the rest of an
attestation on the device.  Any other change (phase, connection, verdict, reasons, error) is written
at once."""
_VOLATILE_STATUS = ("counters", "trusted_until")
STATUS_CHECK_INTERVAL = 1.0
"""Without a message handled, the main loop compares the status with the file at most this often
(building the status costs more than the rest of an idle poll; changes made by other threads reach
the file at most this much later)."""
WORKER_IDLE_WAIT = 5.0
"""Seconds the attestation worker waits for a challenge before re-checking the stop flag."""
EVIDENCE_ACK_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
TPM_SUBDIR = "tpm"
"""Sub-folder of ``state_dir`` where the TPM adapter keeps the AK blobs."""
UPDATE_SUBDIR = "update"
"""Sub-folder of ``state_dir`` with the firmware install record and the update status outbox."""
EVIDENCE_REMEMBERED = 16
"""Digests of this process's latest evidence messages: a result for one of them is for this boot."""

PHASES = ("new", "starting", "tpm_unavailable", "enrolling", "pending", "running", "stopped", "failed")


class AgentStateError(EdgeError):
    """The agent was used out of order (started twice, restarted after stop)."""


@dataclass(frozen=True, slots=True)
class AgentStatus:
    """A snapshot of a running agent (also what ``status.json`` holds)."""

    device_id: str
    phase: str
    """One of :data:`PHASES`."""
    enrolled: bool
    connected: bool
    verdict: str
    """``unknown``, ``trusted``, ``untrusted``, ``revoked`` or ``quarantined``."""
    trusted: bool
    """True only while the latest verdict is ``trusted`` and not expired."""
    trusted_until: float | None
    verdict_reasons: tuple[str, ...]
    last_request_reason: str | None
    """Reason of the last ``attest.request`` sent (``boot`` / ``reconnect``)."""
    counters: Mapping[str, int]
    error: str | None
    updated: float
    pid: int
    agent_version: str
    enrollment: str | None = None
    """Enrollment progress while enrolling (``requested``, ``pending``, ...), else ``None``."""
    enrollment_reasons: tuple[str, ...] = field(default=())
    models: Mapping[str, Any] = field(default_factory=dict)
    """The model vault's state (``ModelVault.status()``), empty without ``[models]``."""
    update: Mapping[str, Any] = field(default_factory=dict)
    """The firmware update in progress and the last status reported (``Installer.summary()``), empty
    without ``[update]``."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (tuples as lists)."""
        # Built field by field: dataclasses.asdict deep-copies recursively, and the agent's loop
        # calls this on every iteration to notice changes.
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["models"] = copy.deepcopy(dict(self.models)) if self.models else {}
        out["update"] = copy.deepcopy(dict(self.update)) if self.update else {}
        out["counters"] = dict(sorted(self.counters.items()))
        out["verdict_reasons"] = list(self.verdict_reasons)
        out["enrollment_reasons"] = list(self.enrollment_reasons)
        return out


class _Mailbox:
    """Holds the latest challenge not yet taken by the worker (a newer one replaces it)."""

    def __init__(self) -> None:
        self._item: Challenge | None = None
        self._cond = threading.Condition()

    def put(self, challenge: Challenge) -> Challenge | None:
        """Store ``challenge``; returns the one it replaced, if any."""
        with self._cond:
            replaced, self._item = self._item, challenge
            self._cond.notify_all()
            return replaced

    def take(self, timeout: float) -> Challenge | None:
        with self._cond:
            if self._item is None:
                self._cond.wait(timeout)
            item, self._item = self._item, None
            return item

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()


class _LatePublisher:
    """The TUF client's way out: the MQTT client of the current connection (set by ``_serve``).

    The update client is built at start (its root checked early), before the connection exists; a
    request while there is none fails like a refused publish (the fetcher reports a download error).
    """

    def __init__(self) -> None:
        self._client: MqttClient | None = None

    def attach(self, client: MqttClient | None) -> None:
        self._client = client

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> PublishHandle:
        client = self._client
        if client is None:
            raise TransportError("the agent has no MQTT connection")
        return client.publish(topic, payload, qos)


class Agent:
    """One device's attestation agent.  ``start()`` / ``stop()``, or ``run_forever()`` in a CLI.

    ``clock`` returns Unix seconds (freshness of server messages, challenge deadlines, status
    times); ``rng`` drives reconnect jitter; ``logger`` receives the structured events (default:
    the ``agent`` logger).  No module-level state: any number of agents may run in one process.

    With ``[update]`` configured, ``rebooter`` (the platform's reboot: a power cycle in the simulator)
    is required; ``target_source`` (what fetches verified targets) defaults to the agent's own TUF
    client (:class:`agent.update.tuf_client.UpdateClient` on the agent's MQTT connection, trusting
    ``update.root_file``), and must be given when no ``root_file`` is configured; see
    :mod:`agent.update.installer`.  ``rebooter.reboot`` is called on the agent's update thread and
    must return promptly (start the power cycle elsewhere); the agent does nothing more after it.

    ``tpm_factory`` opens the device's TPM (an :class:`~agent.tpm.interface.AgentTpm`); it is called
    again after the agent closed a TPM that failed.  Default: a :class:`~agent.tpm.adapter.TpmAdapter`
    on ``[tpm]``'s TCTI with its state in ``state_dir/tpm``.  A simulator passes a software TPM here
    (e.g. ``tpm_factory=lambda: soft_tpm``, see :mod:`firmware_sim.soft_tpm`).

    ``poll`` (default :data:`POLL`) is how long the main loop waits for a message before re-checking
    the stop flag and the connection: a new connection's ``attest.request`` and a stop wait up to
    that long.  A host running thousands of agents raises it (each idle wake-up costs CPU).
    """

    def __init__(self, config: AgentConfig, *, clock: Callable[[], float] = time.time,
                 rng: random.Random | None = None, logger: logging.Logger | None = None,
                 rebooter: Rebooter | None = None, target_source: TargetSource | None = None,
                 tpm_factory: Callable[[], AgentTpm] | None = None, poll: float = POLL) -> None:
        self.config = config
        self._poll = poll
        self._tpm_factory = tpm_factory or self._open_adapter
        self._clock = clock
        self._rng = rng or random.Random()
        self._log = EventLogger(logger or logging.getLogger("agent"), device=config.device_id)
        self._identity = DeviceIdentity(config.state_dir, config.device_id)
        self._backoff = Backoff(initial=config.mqtt.reconnect_min, maximum=config.mqtt.reconnect_max)
        self._trust = TrustState()
        self._mailbox = _Mailbox()
        self._stop = threading.Event()
        self._lock = threading.Lock()  # phase, error, counters, last reason
        self._counters: collections.Counter[str] = collections.Counter()
        self._phase = "new"
        self._error: str | None = None
        self._enrolled = False
        self._last_request_reason: str | None = None
        self._signal: int | None = None
        self._verifier: MessageVerifier | None = None
        self._enrollment: Enrollment | None = None
        self._client: MqttClient | None = None
        self._tpm: AgentTpm | None = None
        self._tpm_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._worker: threading.Thread | None = None
        self._publishes: list[tuple[str, PublishHandle]] = []
        self._status_written: dict[str, Any] | None = None
        self._status_written_at = 0.0
        self._status_error_logged = False
        self._version = agent_version()[:64]
        self._vault: ModelVault | None = None
        self._rebooter = rebooter
        self._target_source = target_source
        self._updates: UpdateRunner | None = None
        self._tuf: UpdateClient | None = None
        self._tuf_publisher = _LatePublisher()
        self._evidence_sent: collections.deque[bytes] = collections.deque(maxlen=EVIDENCE_REMEMBERED)

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Check the local setup and start the agent's thread; returns at once.

        Raises :class:`~protocol.errors.ConfigError` (unreadable server key) or
        :class:`~protocol.errors.StorageError` (state folder, unusable device certificate) here, so
        that a misconfigured agent fails before it runs.
        """
        if self._thread is not None:
            raise AgentStateError("Agent.start() was already called; create a new Agent to start again")
        ensure_dir(self.config.state_dir)
        keys = load_signing_keys(self.config.server.signing_public_key)
        self._verifier = MessageVerifier(keys, max_skew=self.config.server.max_clock_skew)
        if self.config.update is not None:
            self._updates = self._update_runner()
        if self.config.models is not None:  # pinned model key and clients file are checked here
            # With the agent's own TUF client, model packages come through it too (the vault's
            # channel thread); without one, with model-fetch.
            self._vault = ModelVault(self.config, tpm=self._tpm_adapter, trust=self._trust, clock=self._clock,
                                     log=self._log, channel=self._tuf)
        self._enrolled = self._identity.certificate() is not None
        self._set_phase("starting")
        self._log.info("agent_starting", version=self._version, enrolled=self._enrolled,
                       broker=f"{self.config.mqtt.host}:{self.config.mqtt.port}")
        self._thread = threading.Thread(target=self._main, name=f"agent-{self.config.device_id}", daemon=True)
        self._thread.start()

    def _update_runner(self) -> UpdateRunner:
        cfg = self.config.update
        assert cfg is not None
        if cfg.boot_dir is None:
            raise ConfigError("update.boot_dir: firmware updates need the A/B boot folder")
        source = self._target_source
        if source is None and cfg.root_file is not None:
            # The device's own TUF client: built now (the root is read and checked at start), its
            # requests go out on the MQTT connection _serve() opens; refresh and download run on the
            # update thread, the main loop hands it the tuf-chunk frames (_handle).
            self._tuf = UpdateClient.from_config(self.config, self._tuf_publisher, wall_clock=self._clock)
            source = self._tuf
        if self._rebooter is None or source is None:
            raise ConfigError("update: an agent with [update] needs a rebooter and a target source "
                              "(update.root_file, or one passed in)")
        folder = ensure_dir(self.config.state_dir / UPDATE_SUBDIR)
        settings = InstallerSettings(boot_dir=cfg.boot_dir, device_class=self.config.device_class,
                                     fallback_version=self.config.firmware_version,
                                     max_target_size=cfg.max_target_size, boot_tries=cfg.boot_tries)
        installer = Installer(settings, state_dir=folder, source=source,
                              floor=TpmVersionFloor(self._tpm_adapter, cfg.floor_nv_index),
                              rebooter=self._rebooter, outbox=StatusOutbox(folder / "outbox.json"),
                              health_checks=self._health_checks(cfg.health_checks), clock=self._clock,
                              log=self._log.bind(part="update"))
        return UpdateRunner(installer, device_id=self.config.device_id, log=self._log.bind(part="update"),
                            on_error=lambda: self._count("update_errors"))

    def _health_checks(self, names: tuple[str, ...]) -> list[HealthCheck]:
        checks: list[HealthCheck] = []
        source = self.config.source

        def config_loads() -> None:
            if source is not None:
                load_config(source)

        def tpm_answers() -> None:
            self._tpm_adapter().read_pcrs({"sha256": [0]})

        if "config" in names and source is not None:
            checks.append(("config", config_loads))
        if "tpm" in names:
            checks.append(("tpm", tpm_answers))
        return checks

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Ask the agent to stop and wait (up to ``timeout`` seconds) until it has shut down."""
        self._stop.set()
        self._mailbox.wake()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                self._log.warning("stop_timeout", seconds=timeout)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the agent's thread ended (stopped or failed); True if it has."""
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def run_forever(self, *, handle_signals: bool = True) -> int:
        """Start, run until SIGTERM/SIGINT (or a fatal error), shut down; 0 on a clean stop, 1 on failure.

        Signal handlers are installed only when called from the main thread, and restored after.
        """
        previous: dict[signal.Signals, Any] = {}
        if handle_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, self._on_signal)
        try:
            self.start()
            thread = self._thread
            assert thread is not None
            announced = False
            while thread.is_alive():
                thread.join(0.5)  # a bounded join lets the interpreter run signal handlers
                if self._signal is not None and not announced:
                    announced = True
                    self._log.info("signal_received", signal=signal.Signals(self._signal).name)
                    self.stop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return 1 if self._error is not None else 0

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only set flags here: the handler may interrupt code holding logging locks.
        self._signal = signum
        self._stop.set()
        self._mailbox.wake()

    # -- status ------------------------------------------------------------------------------------
    def status(self) -> AgentStatus:
        """A snapshot of the agent's state and counters."""
        verdict = self._trust.verdict
        now = self._clock()
        client = self._client
        enrollment = self._enrollment
        with self._lock:
            phase = self._phase
            if enrollment is not None and phase == "enrolling" and enrollment.progress.status == "pending":
                phase = "pending"
            counters = dict(self._counters)
            if enrollment is not None:
                progress = enrollment.progress
                counters.update(enroll_requests_sent=progress.requests_sent,
                                enroll_challenges=progress.challenges,
                                enroll_proofs_sent=progress.proofs_sent,
                                enroll_activation_failures=progress.activation_failures,
                                enroll_messages_rejected=progress.messages_rejected)
            return AgentStatus(
                device_id=self.config.device_id, phase=phase, enrolled=self._enrolled,
                connected=client is not None and client.connected, verdict=verdict.state,
                trusted=verdict.trusted(now), trusted_until=verdict.trusted_until,
                verdict_reasons=verdict.reasons, last_request_reason=self._last_request_reason,
                counters=counters, error=self._error, updated=now, pid=os.getpid(),
                agent_version=self._version,
                enrollment=None if enrollment is None or self._enrolled else enrollment.progress.status,
                enrollment_reasons=() if enrollment is None else enrollment.progress.reasons,
                models={} if self._vault is None else self._vault.status(),
                update={} if self._updates is None else self._updates.installer.summary())

    def trusted(self) -> bool:
        """True while the latest verified verdict is ``trusted`` and not expired."""
        return self._trust.trusted(self._clock())

    def _set_phase(self, phase: str) -> None:
        with self._lock:
            self._phase = phase

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counters[name] += n

    def _write_status(self, *, force: bool = False) -> None:
        status = self.status().to_dict()
        comparable = {k: v for k, v in status.items() if k != "updated"}
        since = time.monotonic() - self._status_written_at
        written = self._status_written
        if not force and since < STATUS_HEARTBEAT:
            if comparable == written:
                return
            if since < STATUS_MIN_INTERVAL and written is not None and all(
                    comparable[k] == written.get(k) for k in comparable if k not in _VOLATILE_STATUS):
                return  # written on a later call, at most STATUS_MIN_INTERVAL late
        try:
            write_atomic(self.config.status_path, (json.dumps(status, sort_keys=True) + "\n").encode())
        except EdgeError as exc:
            if not self._status_error_logged:  # once: a full disk must not flood the log
                self._status_error_logged = True
                self._log.warning("status_write_failed", error=exc.diagnostics())
            return
        self._status_written = comparable
        self._status_written_at = time.monotonic()

    # -- main thread -------------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            self._write_status(force=True)
            while not self._stop.is_set():
                self._open_tpm()
                if not self._stop.is_set() and not self._enrolled:
                    try:
                        self._enroll()
                    except TpmError as exc:  # e.g. the EK could not be read: back to waiting for the TPM
                        self._count("tpm_errors")
                        self._drop_tpm()
                        self._log.warning("enrollment_interrupted", error=exc.diagnostics())
                        self._stop.wait(self._backoff.delay(0, self._rng))
                        continue
                if not self._stop.is_set():
                    self._serve()
                break
        except EdgeError as exc:
            self._fail(exc.diagnostics())
        except Exception as exc:  # a bug must end the agent visibly, not silently kill a thread
            self._fail(f"internal error: {type(exc).__name__}: {exc}")
        finally:
            self._shutdown()

    def _fail(self, message: str) -> None:
        with self._lock:
            self._error = message
        self._log.error("agent_failed", error=message)

    def _open_tpm(self) -> None:
        """Open the TPM adapter and load the AK, retrying with backoff while the TPM is unreachable."""
        attempt = 0
        while not self._stop.is_set():
            try:
                ak = self._tpm_adapter().ak
            except TpmError as exc:
                self._count("tpm_errors")
                self._drop_tpm()
                self._set_phase("tpm_unavailable")
                delay = self._backoff.delay(attempt, self._rng)
                attempt += 1
                self._log.warning("tpm_unavailable", error=exc.diagnostics(), retry_in=round(delay, 2))
                self._write_status()
                self._stop.wait(delay)
                continue
            self._log.info("tpm_ready", ak_name=ak.name.hex(), ak_alg=ak.alg)
            return

    def _open_adapter(self) -> AgentTpm:
        cfg = self.config.tpm
        tpm: AgentTpm = TpmAdapter(cfg.tcti, self.config.state_dir / TPM_SUBDIR, ak_alg=cfg.ak_alg,
                                   ek_alg=cfg.ek_alg)
        tpm.open()
        return tpm

    def _tpm_adapter(self) -> AgentTpm:
        with self._tpm_lock:
            if self._tpm is None:
                self._tpm = self._tpm_factory()
            return self._tpm

    def _drop_tpm(self) -> None:
        """Close the adapter; the next use opens a new one (after a lost TPM connection)."""
        with self._tpm_lock:
            tpm, self._tpm = self._tpm, None
        if tpm is not None:
            try:
                tpm.close()
            except EdgeError as exc:
                self._log.debug("tpm_close_failed", error=exc.diagnostics())

    def _new_client(self, tls: TlsFiles, client_id: str, channel: Channel) -> MqttClient:
        mqtt = self.config.mqtt
        return MqttClient(mqtt.host, mqtt.port, tls, client_id=client_id,
                          subscriptions=(channel.subscription,), queue_size=32, max_inflight=16,
                          keepalive=mqtt.keepalive, backoff=self._backoff, rng=self._rng)

    def _enroll(self) -> None:
        assert self._verifier is not None
        self._set_phase("enrolling")
        mqtt = self.config.mqtt
        client = self._new_client(TlsFiles(mqtt.ca_cert, mqtt.claim_cert, mqtt.claim_key),
                                  f"claim-{self.config.device_id}", Channel.enroll(self.config.device_id))
        enrollment = Enrollment(identity=self._identity, tpm=self._tpm_adapter(), client=client,
                                verifier=self._verifier, device_class=self.config.device_class,
                                firmware_version=self.config.firmware_version, clock=self._clock,
                                log=self._log.bind(phase="enroll"), stop=self._stop,
                                retry_after=self.config.server.enroll_retry, on_tick=self._write_status)
        self._enrollment = enrollment
        self._client = client
        client.start()
        try:
            cert = enrollment.run()
        finally:
            client.stop()
            self._client = None
        if cert is not None:
            with self._lock:
                self._enrolled = True

    def _serve(self) -> None:
        assert self._verifier is not None
        device_id = self.config.device_id
        channel = Channel.device(device_id)
        client = self._new_client(self._identity.tls_files(self.config.mqtt.ca_cert), device_id, channel)
        self._client = client
        self._tuf_publisher.attach(client)
        client.start()
        if self._vault is not None:
            self._vault.attach(client)
            self._vault.start()
        self._set_phase("running")
        self._worker = threading.Thread(target=self._work, args=(client,), name=f"agent-{device_id}-attest",
                                        daemon=True)
        self._worker.start()
        updates = self._updates
        if updates is not None:
            updates.start()
        seen_connects = 0
        hello_sent = False
        was_connected = False
        status_checked = 0.0
        # A challenge changes only counters (volatile: written at most every STATUS_MIN_INTERVAL).
        challenge_topic = topics.device_down(device_id, "challenge")
        while not self._stop.is_set():
            connected = client.connected
            connects = client.stats().connects
            if connected and connects != seen_connects:
                state = subscription_state(client, self._log)
                if state == "ready":
                    reason = "boot" if not hello_sent else "reconnect"
                    hello_sent = True
                    self._log.info("connected", reason=reason, connects=connects)
                    self._send_hello(client, reason)
                if state != "pending":
                    seen_connects = connects
            elif was_connected and not connected:
                self._log.warning("disconnected", error=client.last_error)
            link_changed, was_connected = connected != was_connected, connected
            inbound = client.receive(self._poll)
            if inbound is not None:
                self._handle(channel, inbound)
            self._reap_publishes()
            if updates is not None:
                updates.pump(client)
            if (inbound is not None and inbound.topic != challenge_topic) or link_changed \
                    or time.monotonic() - status_checked >= STATUS_CHECK_INTERVAL:
                self._write_status()
                status_checked = time.monotonic()

    def _send_hello(self, client: MqttClient, reason: str) -> None:
        request = AttestRequest(reason=reason, agent_version=self._version)
        topic = topics.device_up(self.config.device_id, "hello")
        msg_id = new_message_id()
        try:
            handle = client.publish(topic, encode_plain(request, ts=int(self._clock() * 1000), msg_id=msg_id),
                                    qos=1, timeout=EVIDENCE_ACK_TIMEOUT)
        except TransportError as exc:
            self._count("publish_failures")
            self._log.warning("publish_failed", type="attest.request", error=exc.diagnostics())
            return
        self._publishes.append(("attest.request", handle))
        self._log.info("attest_request_sent", reason=reason, msg_id=msg_id)
        with self._lock:
            self._last_request_reason = reason
            self._counters["attest_requests_sent"] += 1

    def _reap_publishes(self) -> None:
        """Log publishes the broker refused (e.g. an ACL denial means a misconfigured identity)."""
        still: list[tuple[str, PublishHandle]] = []
        for what, handle in self._publishes:
            if not handle.done:
                still.append((what, handle))
            elif handle.error is not None:
                self._count("publish_failures")
                self._log.warning("publish_failed", type=what, error=handle.error)
        self._publishes = still

    def _handle(self, channel: Channel, inbound: InboundMessage) -> None:
        assert self._verifier is not None
        vault = self._vault
        if vault is not None and inbound.topic == topics.device_down(channel.device_id, CHUNK_KIND):
            vault.on_chunk(inbound.payload)  # binary package chunk, not a signed message: the vault vets it
            return
        tuf = self._tuf
        if tuf is not None and inbound.topic == topics.device_down(channel.device_id, TUF_CHUNK_KIND):
            tuf.fetcher.deliver(inbound.payload)  # repository bytes: python-tuf verifies what they make up
            return
        try:
            envelope = self._verifier.verify(channel, inbound.topic, inbound.payload, now=self._clock())
        except EdgeError as exc:
            self._count("messages_rejected")
            self._log.warning("server_message_rejected", topic=inbound.topic, error=exc.diagnostics())
            return
        msg = envelope.message
        if isinstance(msg, Challenge):
            self._count("challenges_received")
            replaced = self._mailbox.put(msg)
            if replaced is not None:
                self._count("challenges_superseded")
                self._log.info("challenge_superseded", challenge_id=replaced.challenge_id)
            self._log.debug("challenge_received", challenge_id=msg.challenge_id, deadline=msg.deadline,
                            log_offset=msg.log_offset)
            if vault is not None:
                vault.on_challenge(dict(msg.selection))
        elif isinstance(msg, AttestationResult):
            if vault is not None and msg.verdict != "trusted":
                vault.on_result(msg, server_ts=envelope.ts)  # locks every model before anything else
            applied = self._trust.apply(envelope)
            if vault is not None and msg.verdict == "trusted":
                vault.on_result(msg, server_ts=envelope.ts)  # renews leases, may ask for keys
            self._count("results_received")
            if self._updates is not None and applied:
                this_boot = msg.evidence_sha256 in self._evidence_sent
                self._updates.verdict(verdict=msg.verdict, release=msg.release,
                                      reasons=msg.reasons, this_boot=this_boot)
            self._log.info("attestation_result", challenge_id=msg.challenge_id, verdict=msg.verdict,
                           expires=msg.expires, applied=applied, msg_id=envelope.id,
                           reasons="; ".join(msg.reasons))
        elif isinstance(msg, Revocation):
            if vault is not None:
                vault.on_revocation(msg, server_ts=envelope.ts)  # locks every model before anything else
            applied = self._trust.apply(envelope)
            self._count("revocations_received")
            self._log.warning("revocation", state=msg.state, applied=applied, msg_id=envelope.id,
                              reasons="; ".join(msg.reasons))
        elif isinstance(msg, UpdateAssignment):
            self._count("update_assignments_received")
            self._log.info("update_assignment", assignment_id=msg.assignment_id, kind=msg.kind,
                           version=msg.version, msg_id=envelope.id)
            if self._updates is not None:
                self._updates.assign(msg)
            else:
                self._log.warning("update_assignment_ignored", reason="no [update] configured")
        elif isinstance(msg, ModelOffer | KeyRelease | KeyDenied):
            if vault is not None:
                vault.on_message(envelope)
            else:
                self._log.debug("model_message_ignored", type=envelope.type, reason="no [models] configured")

    # -- worker thread -----------------------------------------------------------------------------
    def _work(self, client: MqttClient) -> None:
        while not self._stop.is_set():
            # Every stop path wakes the mailbox, so an idle worker need not poll often (with many
            # agents in one process, idle wake-ups add up).
            challenge = self._mailbox.take(WORKER_IDLE_WAIT)
            if challenge is not None and not self._stop.is_set():
                self._answer(client, challenge)

    def _answer(self, client: MqttClient, challenge: Challenge) -> None:
        started = time.monotonic()
        try:
            evidence = answer_challenge(challenge, tpm=self._tpm_adapter(),
                                        eventlog_path=self.config.eventlog, clock=self._clock)
        except ChallengeExpiredError as exc:
            self._count("challenges_missed")
            self._log.warning("challenge_missed", challenge_id=challenge.challenge_id,
                              error=exc.diagnostics())
            return
        except TpmError as exc:
            self._count("challenges_missed")
            self._count("tpm_errors")
            self._drop_tpm()  # reopened for the next challenge
            self._log.warning("challenge_missed", challenge_id=challenge.challenge_id, cause="tpm",
                              error=exc.diagnostics())
            return
        except EdgeError as exc:
            self._count("challenges_missed")
            self._log.warning("challenge_missed", challenge_id=challenge.challenge_id,
                              error=exc.diagnostics())
            return
        tpm_ms = round((time.monotonic() - started) * 1000, 1)
        topic = topics.device_up(self.config.device_id, "evidence")
        payload = encode_plain(evidence, ts=int(self._clock() * 1000))
        self._evidence_sent.append(hashlib.sha256(payload).digest())
        try:
            handle = client.publish(topic, payload, qos=1, timeout=EVIDENCE_ACK_TIMEOUT)
            handle.wait(EVIDENCE_ACK_TIMEOUT)
        except TransportError as exc:
            self._count("challenges_missed")
            self._count("publish_failures")
            self._log.warning("evidence_not_delivered", challenge_id=challenge.challenge_id,
                              error=exc.diagnostics())
            return
        self._count("challenges_answered")
        self._log.info("challenge_answered", challenge_id=challenge.challenge_id,
                       eventlog_offset=evidence.eventlog_offset, eventlog_bytes=len(evidence.eventlog),
                       pcrs=sum(len(v) for v in evidence.pcrs.values()), evidence_ms=tpm_ms)

    # -- shutdown ----------------------------------------------------------------------------------
    def _shutdown(self) -> None:
        self._stop.set()
        self._mailbox.wake()
        client, self._client = self._client, None
        self._tuf_publisher.attach(None)
        if client is not None:
            client.stop()  # also fails a publish the worker waits on
        worker = self._worker
        if worker is not None:
            worker.join(STOP_TIMEOUT)
        if self._updates is not None:  # before the TPM goes: a commit raises the NV floor
            self._updates.stop(STOP_TIMEOUT)
        vault = self._vault
        if vault is not None:  # before the TPM goes: the counters are saved with an NV increment
            vault.attach(None)
            try:
                vault.stop()
            except EdgeError as exc:
                self._log.warning("vault_stop_failed", error=exc.diagnostics())
        self._drop_tpm()
        self._set_phase("failed" if self._error is not None else "stopped")
        self._write_status(force=True)
        self._log.info("agent_stopped", phase=self.status().phase)
