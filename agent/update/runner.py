"""The agent's update thread and status delivery: runs the :class:`~agent.update.installer.Installer`.

The agent's main thread only verifies messages and hands them over here (:meth:`UpdateRunner.assign`,
:meth:`UpdateRunner.verdict`), so a download never holds up challenges or results.  The update thread
(``agent-<id>-update``) first reconciles the install record with the boot control file
(:meth:`Installer.on_boot`), then takes the events in order and calls :meth:`Installer.tick` at least
every :data:`TICK` seconds (the trial deadline).

:meth:`UpdateRunner.pump`, called by the main thread on each loop, publishes the oldest pending
``update.status`` (QoS 1) and removes it from the persisted outbox once the broker acknowledged it;
one at a time, so the server sees the states in order.  A refused or lost publish is retried after
:data:`RETRY` seconds.
"""

from __future__ import annotations

import functools
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from agent.log import EventLogger
from agent.update.installer import Installer
from protocol import topics
from protocol.errors import EdgeError, TransportError
from protocol.messages import UpdateAssignment
from protocol.mqtt import MqttClient, PublishHandle

TICK = 1.0
RETRY = 5.0
PUBLISH_TIMEOUT = 30.0
STATUS_KIND = "update-status"


@dataclass(frozen=True, slots=True)
class _Verdict:
    verdict: str
    release: str
    reasons: tuple[str, ...]
    this_boot: bool


class UpdateRunner:
    """Owns the installer's thread and sends its statuses (see the module docstring)."""

    def __init__(self, installer: Installer, *, device_id: str, log: EventLogger,
                 on_error: Callable[[], None] | None = None) -> None:
        self.installer = installer
        self._device_id = device_id
        self._log = log
        self._on_error = on_error
        self._events: queue.Queue[UpdateAssignment | _Verdict] = queue.Queue(maxsize=64)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._inflight: tuple[str, PublishHandle] | None = None
        self._retry_at = 0.0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"agent-{self._device_id}-update", daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def assign(self, assignment: UpdateAssignment) -> None:
        self._put(assignment)

    def verdict(self, *, verdict: str, release: str, reasons: tuple[str, ...], this_boot: bool) -> None:
        self._put(_Verdict(verdict, release, reasons, this_boot))

    def _put(self, event: UpdateAssignment | _Verdict) -> None:
        try:
            self._events.put_nowait(event)
        except queue.Full:
            self._log.warning("update_event_dropped", type=type(event).__name__)

    # -- update thread -------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        except Exception as exc:  # a bug must be visible in the log, not silently end the thread
            self._log.error("update_thread_failed", error=f"internal error: {type(exc).__name__}: {exc}")
            if self._on_error is not None:
                self._on_error()

    def _loop(self) -> None:
        self._guarded(self.installer.on_boot)
        while not self._stop.is_set():
            try:
                event = self._events.get(timeout=TICK)
            except queue.Empty:
                event = None
            if self._stop.is_set():
                break
            if isinstance(event, UpdateAssignment):
                self._guarded(functools.partial(self.installer.on_assignment, event))
            elif isinstance(event, _Verdict):
                self._guarded(functools.partial(self.installer.on_verdict, verdict=event.verdict,
                                                release=event.release, reasons=event.reasons,
                                                this_boot=event.this_boot))
            self._guarded(self.installer.tick)

    def _guarded(self, step: Callable[[], None]) -> None:
        try:
            step()
        except EdgeError as exc:  # the boot folder or the TPM failed: the record says where to resume
            self._log.warning("update_step_failed", error=exc.diagnostics())
            if self._on_error is not None:
                self._on_error()

    # -- status delivery (main thread) ---------------------------------------------------------------
    def pump(self, client: MqttClient) -> None:
        """Publish the oldest pending status, or collect the outcome of the one in flight."""
        inflight = self._inflight
        if inflight is not None:
            msg_id, handle = inflight
            if not handle.done:
                return
            self._inflight = None
            if handle.error is None:
                self.installer.outbox.remove(msg_id)
            else:
                self._log.warning("update_status_not_delivered", msg_id=msg_id, error=handle.error)
                self._retry_at = time.monotonic() + RETRY
        if not client.connected or time.monotonic() < self._retry_at:
            return
        pending = self.installer.outbox.pending()
        if not pending:
            return
        msg_id, payload = pending[0]
        try:
            handle = client.publish(topics.device_up(self._device_id, STATUS_KIND), payload, qos=1,
                                    timeout=PUBLISH_TIMEOUT)
        except TransportError as exc:
            self._log.warning("update_status_not_delivered", msg_id=msg_id, error=exc.diagnostics())
            self._retry_at = time.monotonic() + RETRY
            return
        self._inflight = (msg_id, handle)
