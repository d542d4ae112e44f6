"""The outbox: signed messages written to the database in the transaction that caused them.

Admin commands (``device approve``, ``revoke``, ``quarantine``) and state changes of the evidence
path (revocation notices on ``untrusted``) do not publish themselves: they add a row to ``outbox``
in the same transaction as the change, so the message exists exactly when the change does. Every
worker runs :meth:`OutboxPublisher.run_once` regularly (and right after a commit that wrote rows):
it leases up to :data:`BATCH` unsent rows for :data:`LEASE_MS` (so two workers rarely send the same
row), publishes them with QoS 1, waits for the broker's acknowledgements and marks the acknowledged
rows sent. Delivery is at-least-once: a row whose publish failed, or whose worker died, is sent
again after its lease; agents drop duplicates by message id.
"""

from __future__ import annotations

import logging
from typing import Protocol

from fleet_server.service.common import Clock, Counters, log_event
from fleet_server.storage.repo import Repository
from protocol.errors import EdgeError

log = logging.getLogger(__name__)

BATCH = 100
LEASE_MS = 30_000
ACK_TIMEOUT = 10.0


class Acknowledgeable(Protocol):
    """What a publish returns (:class:`protocol.mqtt.PublishHandle`)."""

    def wait(self, timeout: float | None = None) -> None:
        """Block until the broker acknowledged the message; raise EdgeError otherwise."""
        ...


class Publisher(Protocol):
    """Publishes one message (:meth:`protocol.mqtt.MqttClient.publish` fits)."""

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> Acknowledgeable:
        """Queue ``payload`` for ``topic``."""
        ...


class OutboxPublisher:
    """Publishes outbox rows (see the module docstring)."""

    def __init__(self, repo: Repository, clock: Clock, counters: Counters) -> None:
        self.repo = repo
        self.clock = clock
        self.counters = counters

    def run_once(self, publisher: Publisher, *, limit: int = BATCH) -> int:
        """Publish one batch of due rows; returns how many were acknowledged and marked sent."""
        now = self.clock.now_ms()
        with self.repo.write("leasing outbox rows") as tx:
            rows = tx.claim_outbox(now, LEASE_MS, limit)
        if not rows:
            return 0
        handles = []
        for row in rows:
            try:
                handles.append((row, publisher.publish(row.topic, row.payload, 1)))
            except EdgeError as exc:
                self.counters.add("outbox.failed")
                log_event(log, logging.WARNING, "outbox_publish_failed", id=row.id, topic=row.topic,
                          error=exc.diagnostics())
        sent: list[int] = []
        for row, handle in handles:
            try:
                handle.wait(ACK_TIMEOUT)
            except EdgeError as exc:
                self.counters.add("outbox.failed")
                log_event(log, logging.WARNING, "outbox_publish_failed", id=row.id, topic=row.topic,
                          attempt=row.attempts, error=exc.diagnostics())
                continue
            sent.append(row.id)
        if sent:
            with self.repo.write("marking outbox rows sent") as tx:
                tx.mark_outbox_sent(sent, self.clock.now_ms())
            self.counters.add("outbox.sent", len(sent))
        return len(sent)
