"""Fleet server workers: one process = one MQTT connection + a processing thread + a housekeeping thread.

Threads of a :class:`Worker`
----------------------------
* the MQTT client's network thread (:class:`protocol.mqtt.MqttClient`): only decodes packets and
  queues messages; no TPM, crypto or database work happens there;
* **processing** (``fleet-worker-<n>``): takes up to ``server.batch_size`` messages from the queue
  (after the first, waiting at most ``server.batch_linger`` for more), hands them to
  :class:`~fleet_server.service.processor.Processor` (one database transaction per batch), and
  publishes the signed replies after the commit;
* **housekeeping** (``fleet-house-<n>``): every ``attestation.scheduler_tick`` runs a
  :class:`~fleet_server.service.scheduler.Scheduler` round (only while connected: challenges sent
  into a dead connection would only count as misses) and a step of every running staged rollout
  (:class:`~fleet_server.service.rollouts.RolloutStepper`), publishes the outbox (also as soon as the
  processing thread committed outbox rows), flushes counters to the database every
  :data:`COUNTER_FLUSH_S` seconds and deletes old history every :data:`PRUNE_S` seconds.

Workers subscribe with the MQTT v5 shared subscriptions ``$share/<group>/fleet/v1/devices/+/up/#``
and ``$share/<group>/fleet/v1/enroll/+/up/#``: the broker gives each message to one worker of the
group, so any number of workers (processes, hosts) split the load; they share nothing but the
database. Each has a unique client id.

:func:`run_workers` runs ``N`` workers as processes (``spawn``), restarts one that dies, and stops
them all on SIGTERM/SIGINT: a worker finishes its current batch, flushes its counters and
disconnects.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import secrets
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from fleet_server.config import ServerConfig, load_config
from fleet_server.migrations import upgrade
from fleet_server.service.common import Clock, Counters, Outgoing, configure_logging, log_event
from fleet_server.service.context import ServiceContext
from fleet_server.service.crl import CrlRenewer
from fleet_server.service.outbox import OutboxPublisher
from fleet_server.service.processor import Processor
from fleet_server.service.rollouts import RolloutStepper
from fleet_server.service.scheduler import Scheduler
from fleet_server.service.tuf_files import RepositoryFiles
from fleet_server.storage.db import create_engine, describe_url
from fleet_server.storage.repo import Repository
from fleet_server.updates.renewer import UpdateRenewer
from fleet_server.updates.repository import UpdateRepository
from protocol import topics
from protocol.errors import EdgeError
from protocol.mqtt import MqttClient, TlsFiles

log = logging.getLogger(__name__)

POLL_S = 0.2
COUNTER_FLUSH_S = 5.0
PRUNE_S = 300.0
STOP_TIMEOUT_S = 30.0
SESSION_RETENTION_MS = 86_400_000
OUTBOX_RETENTION_MS = 7 * 86_400_000


def worker_name(index: int) -> str:
    """``<host>:<pid>:<index>``: the worker's row key in the ``counter`` table."""
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{index}"


class Worker:
    """One worker (see the module docstring). Everything it needs is passed in or built from ``config``.

    ``ctx`` and ``repo`` default to those built from ``config``; tests pass their own (manual clock,
    temporary database). ``client`` replaces the MQTT client built from ``config.mqtt``.
    ``update_files``: the update repository whose files devices fetch over MQTT (``tuf-fetch``; any
    :class:`~fleet_server.updates.targets.TargetStore`); ``None``: every fetch gets ``not_found``.
    """

    def __init__(self, config: ServerConfig, *, index: int = 0, ctx: ServiceContext | None = None,
                 repo: Repository | None = None, client: MqttClient | None = None,
                 clock: Clock | None = None, update_files: RepositoryFiles | None = None) -> None:
        self.config = config
        self.index = index
        self.name = worker_name(index)
        self.ctx = ctx or ServiceContext.from_config(config, clock=clock)
        self.repo = repo or Repository(create_engine(config.database_url))
        self.counters = Counters()
        self.processor = Processor(self.ctx, self.repo, self.counters, on_outbox=self.wake_outbox,
                                   ak_cache_size=config.cache_devices, boot_cache_size=config.cache_devices,
                                   update_files=update_files)
        self.scheduler = Scheduler(self.ctx, self.repo, self.counters)
        self.rollouts = RolloutStepper(self.repo, self.ctx.signer, self.counters)
        self.outbox = OutboxPublisher(self.repo, self.ctx.clock, self.counters)
        mq = config.mqtt
        self.client_id = (f"fleet-server-{socket.gethostname()[:24]}-{os.getpid()}-{index}-"
                          f"{secrets.token_hex(3)}")
        self.client = client or MqttClient(
            mq.host, mq.port, TlsFiles(mq.ca_cert, mq.cert, mq.key), client_id=self.client_id,
            subscriptions=topics.server_subscriptions(mq.share_group), queue_size=mq.queue_size,
            max_inflight=mq.max_inflight, keepalive=mq.keepalive)
        self._stop = threading.Event()
        self._outbox_due = threading.Event()
        self._threads: list[threading.Thread] = []
        self.batches = 0

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> Worker:
        """Connect (in the background) and start the processing and housekeeping threads."""
        self.client.start()
        for target, name in ((self._process_loop, f"fleet-worker-{self.index}"),
                             (self._housekeeping_loop, f"fleet-house-{self.index}")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        log_event(log, logging.INFO, "worker_started", worker=self.name, client_id=self.client_id,
                  broker=f"{self.config.mqtt.host}:{self.config.mqtt.port}",
                  database=describe_url(self.config.database_url))
        return self

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Finish the current batch, stop the threads, flush counters and disconnect."""
        self._stop.set()
        self._outbox_due.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self.client.stop()
        self.flush_counters()
        log_event(log, logging.INFO, "worker_stopped", worker=self.name, batches=self.batches)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def wait_connected(self, timeout: float) -> None:
        """Wait until connected and subscribed (TransportError on timeout)."""
        self.client.wait_connected(timeout)

    def wake_outbox(self) -> None:
        """Ask the housekeeping thread to publish the outbox now."""
        self._outbox_due.set()

    def run_forever(self, *, handle_signals: bool = True, stop: threading.Event | None = None) -> int:
        """Run until SIGTERM/SIGINT (or :meth:`stop` from another thread); returns an exit status.

        ``stop``: a stop request that may have arrived before this worker existed (``fleet-server
        run`` handles signals from its first moment): if set, the worker starts and stops at once."""
        if handle_signals:
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, self._on_signal)
        if stop is not None:
            threading.Thread(target=self._follow, args=(stop,), name=f"{self.name}-stop", daemon=True).start()
        self.start()
        try:
            while not self._stop.wait(1.0):
                pass
        finally:
            self.stop()
        return 0

    def _follow(self, stop: threading.Event) -> None:
        while not self._stop.is_set():
            if stop.wait(1.0):
                self._stop.set()
                self._outbox_due.set()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        log_event(log, logging.INFO, "worker_stopping", worker=self.name, signal=signal.Signals(signum).name)
        self._stop.set()
        self._outbox_due.set()

    # -- processing ----------------------------------------------------------------------------------
    def _process_loop(self) -> None:
        batch_size = self.config.batch_size
        linger = self.config.batch_linger
        while not self._stop.is_set():
            first = self.client.receive(POLL_S)
            if first is None:
                continue
            # A batch costs one transaction whatever its size: wait up to `batch_linger` for more
            # messages (bounded latency) so that the fixed cost is shared.
            batch = [first]
            deadline = time.monotonic() + linger
            while len(batch) < batch_size:
                more = self.client.receive(max(0.0, deadline - time.monotonic()))
                if more is None:
                    break
                batch.append(more)
            out = self.processor.handle_batch(batch)
            self.batches += 1
            self.publish(out)

    def publish(self, messages: list[Outgoing]) -> None:
        """Publish signed replies with ``mqtt.reply_qos`` (not waiting for acknowledgements);
        failures are counted and logged."""
        qos = self.config.mqtt.reply_qos
        for message in messages:
            try:
                self.client.publish(message.topic, message.payload, qos)
            except EdgeError as exc:
                self.counters.add("publish.failed")
                log_event(log, logging.WARNING, "publish_failed", topic=message.topic, kind=message.kind,
                          error=exc.diagnostics())
            else:
                self.counters.add(f"sent.{message.kind or 'message'}")

    # -- housekeeping --------------------------------------------------------------------------------
    def _housekeeping_loop(self) -> None:
        tick = self.config.attestation.scheduler_tick
        next_tick = time.monotonic()
        next_flush = time.monotonic() + COUNTER_FLUSH_S
        next_prune = time.monotonic() + min(PRUNE_S, 30.0)
        while not self._stop.is_set():
            self._outbox_due.wait(max(0.0, min(next_tick, next_flush) - time.monotonic()))
            if self._stop.is_set():
                break
            self._guard("outbox", self._publish_outbox)
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + tick
                if self.client.connected:
                    self._guard("scheduler", self._scheduler_round)
                    self._guard("rollouts", self._rollout_step)
            if now >= next_flush:
                next_flush = now + COUNTER_FLUSH_S
                self._guard("counters", self.flush_counters)
            if now >= next_prune:
                next_prune = now + PRUNE_S
                self._guard("prune", self.prune)

    def _guard(self, what: str, fn: Callable[[], object]) -> None:
        """Run one housekeeping step; an error is logged and counted, never fatal."""
        try:
            fn()
        except EdgeError as exc:
            self.counters.add(f"housekeeping.{what}_failed")
            log_event(log, logging.WARNING, "housekeeping_failed", step=what, error=exc.diagnostics())
        except Exception as exc:
            self.counters.add(f"housekeeping.{what}_failed")
            log.error("%s", f"event=housekeeping_failed step={what} error={type(exc).__name__}",
                      exc_info=True)

    def _publish_outbox(self) -> None:
        self._outbox_due.clear()
        if self.client.connected:
            while self.outbox.run_once(self.client) and not self._stop.is_set():
                pass

    def _scheduler_round(self) -> None:
        _, out = self.scheduler.run_once()
        self.publish(out)

    def _rollout_step(self) -> None:
        if any(r.assigned or r.abort_latency_ms is not None for r in
               self.rollouts.run_once(self.ctx.clock.now_ms())):
            self._outbox_due.set()

    def flush_counters(self) -> None:
        """Add this worker's counters accumulated since the last flush to the database."""
        deltas = self.counters.take_deltas()
        if not deltas:
            return
        try:
            with self.repo.write("flushing counters") as tx:
                tx.add_counters(self.name, deltas, self.ctx.clock.now_ms())
        except EdgeError:
            self.counters.restore_deltas(deltas)
            raise

    def prune(self) -> int:
        """Delete history older than the retention settings."""
        now = self.ctx.clock.now_ms()
        keep = self.config.retention
        with self.repo.write("pruning history") as tx:
            return tx.prune(attestations_before=now - keep.attestation_ms,
                            challenges_before=now - keep.challenge_ms,
                            sessions_before=now - SESSION_RETENTION_MS,
                            outbox_before=now - OUTBOX_RETENTION_MS)


# --------------------------------------------------------------------------------------------------
# processes
def served_update_files(config: ServerConfig) -> RepositoryFiles:
    """The update repository's published files as ``fleet-server run`` serves them over MQTT.

    Read per request from ``[updates] dir``: a repository initialised (or re-signed) while the
    workers run is served without a restart; before ``updates init`` every fetch is ``not_found``.
    """
    return UpdateRepository(config.updates.dir, config.updates, clock=time.time)


# --------------------------------------------------------------------------------------------------
def _child_main(config_path: str, index: int) -> None:
    """Entry point of a worker process (spawned: nothing is inherited but the arguments)."""
    config = load_config(Path(config_path))
    configure_logging(config.log_level, config.log_file)
    try:
        status = Worker(config, index=index, update_files=served_update_files(config)).run_forever()
    except EdgeError as exc:
        log_event(log, logging.ERROR, "worker_failed", index=index, error=exc.diagnostics())
        status = 1
    raise SystemExit(status)


class _Supervisor:
    """Runs ``count`` worker processes, restarts one that dies, stops them all on SIGTERM/SIGINT.

    A worker starts with SIGTERM and SIGINT *ignored* (dispositions set to ignore survive the spawn),
    so a signal during its start-up (imports, configuration) cannot kill it half-way; it installs
    its own handlers when it is ready, and the supervisor repeats SIGTERM every second until every
    worker has exited, so a request that arrived too early is not lost."""

    def __init__(self, config_path: Path, count: int, stop: threading.Event | None = None) -> None:
        self.config_path = config_path
        self.count = count
        self.ctx = multiprocessing.get_context("spawn")
        self.children: dict[int, multiprocessing.process.BaseProcess] = {}
        self.stopping = stop if stop is not None else threading.Event()

    def spawn(self, index: int) -> None:
        proc = self.ctx.Process(target=_child_main, args=(str(self.config_path), index),
                                name=f"fleet-worker-{index}", daemon=False)
        previous = {}
        if threading.current_thread() is threading.main_thread():
            previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            proc.start()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        self.children[index] = proc
        log_event(log, logging.INFO, "worker_process_started", index=index, pid=proc.pid)

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stopping.set()

    def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self.on_signal)
        for i in range(self.count):
            self.spawn(i)
        restarts: dict[int, float] = {}
        while not self.stopping.wait(0.5):
            for index, proc in list(self.children.items()):
                if proc.is_alive():
                    continue
                log_event(log, logging.ERROR, "worker_process_exited", index=index, pid=proc.pid,
                          status=proc.exitcode)
                # Restart, but not in a tight loop if it keeps failing at start.
                if time.monotonic() - restarts.get(index, 0.0) < 5.0:
                    time.sleep(1.0)
                restarts[index] = time.monotonic()
                self.spawn(index)
        deadline = time.monotonic() + STOP_TIMEOUT_S + 5
        while time.monotonic() < deadline:
            alive = [p for p in self.children.values() if p.is_alive() and p.pid is not None]
            if not alive:
                break
            for proc in alive:
                assert proc.pid is not None
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
            multiprocessing.connection.wait([p.sentinel for p in alive], timeout=1.0)
        for proc in self.children.values():
            if proc.is_alive():
                proc.kill()
            proc.join(5)
        log_event(log, logging.INFO, "workers_stopped", count=len(self.children))
        return 0


def run_workers(config_path: Path, config: ServerConfig, *, workers: int | None = None,
                stop: threading.Event | None = None) -> int:
    """Migrate the database, then run the workers until SIGTERM/SIGINT; returns an exit status.

    One worker runs in this process; more run as spawned processes under a small supervisor.
    ``stop`` is a stop request the caller may already have received (it handles the signals
    before this runs): once set, the workers stop.
    """
    engine = create_engine(config.database_url)
    try:
        before, after = upgrade(engine)
    finally:
        engine.dispose()
    if before != after:
        log_event(log, logging.INFO, "database_upgraded", before=before or "empty", after=after)
    count = workers or config.workers
    # One CRL renewer per `run` (in this process, not in each worker).
    repo = Repository(create_engine(config.database_url))
    renewer = CrlRenewer(repo, config).start()
    # Likewise one renewer of the update repository's snapshot and timestamp (online keys).
    tuf_renewer = UpdateRenewer(config).start()
    try:
        if count <= 1:
            return Worker(config, update_files=served_update_files(config)).run_forever(stop=stop)
        return _Supervisor(config_path, count, stop).run()
    finally:
        tuf_renewer.stop()
        renewer.stop()
        repo.dispose()
