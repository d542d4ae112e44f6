"""Alert rules on state changes (fleet_server.storage.alerting): the pure rules, one open alert per subject
(repeats bump the count), and the server paths that record state changes: an untrusted appraisal in the
Processor and a device reaching its missed-challenge limit in the Scheduler."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from fleet_server.console.services import ConsoleServices
from fleet_server.service import admin
from fleet_server.service.common import Counters, ManualClock
from fleet_server.service.processor import Processor
from fleet_server.service.scheduler import EXPIRY_GRACE_MS, Scheduler
from fleet_server.storage import alerting, models
from fleet_server.storage.repo import NewChallenge, NewStateChange

pytest.register_assert_rewrite("console_fixtures")
from console_fixtures import SoftDevice  # noqa: E402

pytest_plugins = ("console_fixtures",)

ALERT = models.SQLModel.metadata.tables["alert"]


def _alerts(svc: ConsoleServices) -> list[tuple[str, str | None, str, int, str]]:
    with svc.engine.connect() as conn:
        return [(r.kind, r.device_id, r.status, r.count, r.severity)
                for r in conn.execute(select(ALERT).order_by(ALERT.c.id))]


def test_rules() -> None:
    changes = [NewStateChange("a", 1, "trusted", "untrusted", "appraisal: PCR 4: x differs from reference"),
               NewStateChange("b", 1, "trusted", "unreachable", "missed 3 consecutive challenges"),
               NewStateChange("c", 1, "untrusted", "trusted", "appraisal: evidence matches policy p"),
               NewStateChange("d", 1, "pending", "enrolled", "approved by admin"),
               NewStateChange("e", 1, "trusted", "revoked", "revoked by admin: stolen")]
    alerts = alerting.state_change_alerts(changes)
    assert [(x.kind, x.severity, x.device_id, x.dedup_key) for x in alerts] == [
        ("attestation_failure", "critical", "a", "attestation_failure:a"),
        ("unreachable", "warning", "b", "unreachable:b")]
    assert alerts[0].message == "device a failed attestation: appraisal: PCR 4: x differs from reference"


def test_one_open_alert_per_subject(svc: ConsoleServices) -> None:
    alert = alerting.NewAlert("unreachable", "warning", "m1", "unreachable:x", "x")
    with svc.repo.write("t") as tx:
        assert alerting.raise_alerts(tx.conn, [alert], 1000) == 1
    with svc.repo.write("t") as tx:
        assert alerting.raise_alerts(tx.conn, [alert], 2000) == 0
    assert _alerts(svc) == [("unreachable", "x", "open", 2, "warning")]
    with svc.repo.write("t") as tx:
        alerting.acknowledge_alert(tx.conn, 1, by="sec", now=2500)
        alerting.raise_alerts(tx.conn, [alert], 3000)        # acknowledged still counts as open
    assert _alerts(svc) == [("unreachable", "x", "acknowledged", 3, "warning")]
    with svc.repo.write("t") as tx:
        alerting.resolve_alert(tx.conn, 1, by="sec", now=3500)
        alerting.raise_alerts(tx.conn, [alert], 4000)        # after resolving: a new alert
    assert _alerts(svc) == [("unreachable", "x", "resolved", 3, "warning"),
                            ("unreachable", "x", "open", 1, "warning")]
    with pytest.raises(alerting.AlertStateError), svc.repo.write("t") as tx:
        alerting.resolve_alert(tx.conn, 1, by="sec", now=5000)


def test_untrusted_appraisal_raises_attestation_failure(svc: ConsoleServices, console_processor: Processor,
                                                        stored_golden_policy: admin.StoredPolicy) -> None:
    dev = SoftDevice("cam-1", svc.repo, now=svc.now())
    dev.attest(console_processor, svc.repo, "golden")
    assert _alerts(svc) == []
    dev.attest(console_processor, svc.repo, "tampered-rootfs")
    # stays untrusted: no new state change, no new alert
    dev.attest(console_processor, svc.repo, "tampered-rootfs")
    assert _alerts(svc) == [("attestation_failure", "cam-1", "open", 1, "critical")]
    with svc.engine.connect() as conn:
        message = conn.execute(select(ALERT.c.message)).scalar_one()
    assert message.startswith("device cam-1 failed attestation: appraisal: PCR 13: ")
    dev.attest(console_processor, svc.repo, "golden")
    dev.attest(console_processor, svc.repo, "tampered-rootfs")  # fails again while the alert is open: bumped
    assert _alerts(svc) == [("attestation_failure", "cam-1", "open", 2, "critical")]


def test_missed_challenges_raise_unreachable(svc: ConsoleServices, console_processor: Processor,
                                             console_clock: ManualClock) -> None:
    scheduler = Scheduler(console_processor.ctx, svc.repo, Counters())
    SoftDevice("cam-1", svc.repo, state="trusted", now=svc.now())
    limit = console_processor.ctx.settings.missed_challenges_limit
    for _ in range(limit):
        now = console_clock.now_ms()
        with svc.repo.write("challenge") as tx:
            tx.insert_challenges([NewChallenge(id=f"{now:032x}"[-32:], device_id="cam-1", nonce=b"n" * 32,
                                               selection="{}", issued_at=now, deadline=now + 1000,
                                               cause="periodic", log_offset=0, log_sha256=b"")])
        console_clock.advance(1000 + EXPIRY_GRACE_MS + 1)
        scheduler._expire(console_clock.now_ms())
    assert svc.repo.device("cam-1").state == "unreachable"  # type: ignore[union-attr]
    assert _alerts(svc) == [("unreachable", "cam-1", "open", 1, "warning")]
