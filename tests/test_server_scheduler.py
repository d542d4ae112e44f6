"""The re-attestation scheduler against a real database, with a manual clock: due devices are claimed
exactly once even by concurrent workers, overdue devices are spread after a restart, missed challenges
make a device unreachable and good evidence brings it back."""

from __future__ import annotations

import dataclasses
import hashlib
import threading

import pytest

from fleet_server.config import ServerConfig
from fleet_server.keys import ResultSigner
from fleet_server.service import admin
from fleet_server.service.common import Counters, ManualClock
from fleet_server.service.context import ServiceContext
from fleet_server.service.processor import Processor
from fleet_server.service.scheduler import EXPIRE_PERIOD_MS, EXPIRY_GRACE_MS, RoundResult, Scheduler
from fleet_server.storage.db import create_engine
from fleet_server.storage.models import DeviceState
from fleet_server.storage.repo import NewDevice, Repository
from protocol import topics
from protocol.messages import Challenge, decode_signed

pytest.register_assert_rewrite("server_fixtures")
from server_fixtures import BOTH_DATABASES, DeviceFactory, SimDevice, attest_once, enroll, one  # noqa: E402

pytest_plugins = ("mqtt_fixtures", "server_fixtures", "pg_fixtures")
pytestmark = BOTH_DATABASES

INTERVAL_MS = 60_000


def _add_devices(
        repo: Repository, count: int, *, next_at: int, state: str = DeviceState.TRUSTED,
        prefix: str = "dev") -> list[str]:
    ids = [f"{prefix}-{i:04d}" for i in range(count)]
    with repo.write() as tx:
        for device_id in ids:
            tx.insert_device(NewDevice(
                id=device_id, state=state, device_class="edge-camera", firmware_version="1.2.0",
                ek_cert=b"cert", ek_fingerprint=hashlib.sha256(device_id.encode()).hexdigest(),
                ek_public=b"ek", ak_public=b"ak",
                ak_name=b"name", csr=None, enroll_request_id=None, cert_serial=None, now=next_at,
                next_attestation_at=next_at), cause="test")
    return ids


def _challenged(out: list, signer: ResultSigner) -> list[str]:
    ids = []
    for o in out:
        device_id = o.topic.split("/")[3]
        assert o.topic == topics.device_down(device_id, "challenge")
        message = decode_signed(o.payload, keys={signer.kid: signer.public_key}, aud=device_id).message
        assert isinstance(message, Challenge) and len(message.nonce) == 32
        ids.append(device_id)
    return ids


def test_due_devices_are_claimed_once_by_concurrent_workers(
        ctx: ServiceContext, repo: Repository, server_config: ServerConfig, signer: ResultSigner,
        clock: ManualClock) -> None:
    now = clock.now_ms()
    ids = _add_devices(repo, 60, next_at=now - 500)
    _add_devices(repo, 5, next_at=now + 1_000, prefix="later")
    _add_devices(repo, 5, next_at=now - 500, state=DeviceState.REVOKED, prefix="revoked")
    _add_devices(repo, 5, next_at=now - 500, state=DeviceState.PENDING, prefix="pending")
    engines = [create_engine(server_config.database_url) for _ in range(3)]
    schedulers = [Scheduler(ctx, Repository(e), Counters()) for e in engines]
    barrier = threading.Barrier(len(schedulers))
    outs: list[list] = [[] for _ in schedulers]

    def run(i: int) -> None:
        barrier.wait()
        for _ in range(3):
            outs[i] += schedulers[i].run_once()[1]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(schedulers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for e in engines:
        e.dispose()
    challenged = [d for out in outs for d in _challenged(out, signer)]
    assert sorted(challenged) == ids  # every due device once; none that is not due or not attested
    for device_id in ids:
        [open_challenge] = repo.open_challenges(device_id)
        assert open_challenge.cause == "periodic" and open_challenge.deadline == now + 10_000
        assert repo.device(device_id).next_attestation_at == now + INTERVAL_MS  # type: ignore[union-attr]
    # Nothing is due any more.
    assert Scheduler(ctx, repo, Counters()).run_once()[0].challenged == 0


def test_restart_spreads_overdue_devices_over_one_interval(
        ctx: ServiceContext, repo: Repository, signer: ResultSigner, clock: ManualClock) -> None:
    now = clock.now_ms()
    overdue = _add_devices(repo, 300, next_at=now - 3_600_000)  # the server was down for an hour
    recent = _add_devices(repo, 3, next_at=now - 2_000, prefix="recent")
    scheduler = Scheduler(ctx, repo, Counters())
    result, out = scheduler.run_once()
    assert sorted(_challenged(out, signer)) == recent
    assert (result.challenged, result.spread) == (3, 300)
    times = [repo.device(d).next_attestation_at for d in overdue]  # type: ignore[union-attr]
    assert all(t is not None and now <= t <= now + INTERVAL_MS for t in times)
    buckets = {(t - now) * 10 // (INTERVAL_MS + 1) for t in times if t is not None}
    assert buckets == set(range(10))  # spread over the whole interval, not bunched
    # Later rounds challenge them a few at a time, as their new times come due.
    clock.advance(INTERVAL_MS // 10)
    result, out = scheduler.run_once()
    assert 0 < result.challenged < 100 and result.spread == 0


def _enrolled(processor: Processor, repo: Repository, signer: ResultSigner, make_device: DeviceFactory,
              clock: ManualClock, device_id: str) -> SimDevice:
    dev = make_device(device_id)
    admin.preregister_ek(repo, dev.tpm.ek_certificate(), now=clock.now_ms())
    assert enroll(processor, signer, dev).status == "admitted"
    return dev


def _miss_one(scheduler: Scheduler, repo: Repository, clock: ManualClock, device_id: str) -> RoundResult:
    """Move to the device's next attestation time, let its challenge go unanswered and expire."""
    record = repo.device(device_id)
    assert record is not None and record.next_attestation_at is not None
    clock.set(record.next_attestation_at)
    result, out = scheduler.run_once()
    assert result.challenged == 1 and len(out) == 1
    clock.advance(10_000 + EXPIRY_GRACE_MS + 1)
    return scheduler.run_once()[0]


@pytest.mark.swtpm
def test_missed_challenges_make_a_device_unreachable_until_it_answers(
        ctx: ServiceContext, processor: Processor, repo: Repository, signer: ResultSigner,
        make_device: DeviceFactory, golden_policy: admin.StoredPolicy, clock: ManualClock) -> None:
    dev = _enrolled(processor, repo, signer, make_device, clock, "cam-30")
    scheduler = Scheduler(ctx, repo, processor.counters)
    # Just admitted: due now, challenged by the scheduler; answering makes it trusted.
    result, out = scheduler.run_once()
    assert result.challenged == 1
    challenge = decode_signed(out[0].payload, keys={signer.kid: signer.public_key}, aud="cam-30").message
    assert isinstance(challenge, Challenge)
    assert one(signer, processor.handle_batch([dev.up("evidence", dev.evidence(challenge))]), "cam-30",
               "result").verdict == "trusted"

    first = _miss_one(scheduler, repo, clock, "cam-30")
    assert first.expired == 1 and first.unreachable == ()
    record = repo.device("cam-30")
    assert record is not None and record.state == "trusted" and record.missed_challenges == 1
    second = _miss_one(scheduler, repo, clock, "cam-30")
    assert second.unreachable == ("cam-30",)
    record = repo.device("cam-30")
    assert record is not None and record.state == "unreachable" and record.trusted_until is None
    change = repo.state_history("cam-30")[0]
    assert (change.from_state, change.to_state) == ("trusted", "unreachable")
    assert change.cause == "missed 2 consecutive challenges"
    # The device comes back (reconnects, asks for a challenge): trusted again, without an admin.
    assert attest_once(processor, signer, dev, "reconnect").verdict == "trusted"
    record = repo.device("cam-30")
    assert record is not None and record.state == "trusted" and record.missed_challenges == 0
    assert [h.to_state for h in repo.state_history("cam-30")][:2] == ["trusted", "unreachable"]


@pytest.mark.swtpm
def test_quarantined_device_stays_quarantined_when_missing_challenges(
        ctx: ServiceContext, processor: Processor, repo: Repository, signer: ResultSigner,
        make_device: DeviceFactory, clock: ManualClock) -> None:
    _enrolled(processor, repo, signer, make_device, clock, "cam-31")
    admin.quarantine_device(repo, "cam-31", signer=signer, now=clock.now_ms())
    scheduler = Scheduler(ctx, repo, processor.counters)
    assert scheduler.run_once()[0].challenged == 1  # still attested
    clock.advance(10_000 + EXPIRY_GRACE_MS + 1)
    scheduler.run_once()
    for _ in range(2):
        _miss_one(scheduler, repo, clock, "cam-31")
    record = repo.device("cam-31")
    assert record is not None and record.state == "quarantined" and record.missed_challenges == 3



def test_expiry_runs_at_most_once_per_expire_period_whatever_the_tick(
        ctx: ServiceContext, repo: Repository, clock: ManualClock, monkeypatch: pytest.MonkeyPatch) -> None:
    scheduler = Scheduler(ctx, repo, Counters())
    calls: list[int] = []
    real = scheduler._expire

    def counted(now: int) -> tuple[int, list[str]]:
        calls.append(now)
        return real(now)

    monkeypatch.setattr(scheduler, "_expire", counted)
    start = clock.now_ms()
    for _ in range(30):  # rounds every 100 ms for 3 s
        scheduler.run_once()
        clock.advance(100)
    assert [t - start for t in calls] == [0, EXPIRE_PERIOD_MS, 2 * EXPIRE_PERIOD_MS]


def test_a_device_still_answering_keeps_its_fresh_challenge_a_stale_one_is_replaced(
        ctx: ServiceContext, repo: Repository, signer: ResultSigner, clock: ManualClock) -> None:
    # An interval shorter than the challenge timeout (a saturated fleet): a due device whose newest
    # open challenge has more than half its time left keeps it (one narrow query of open deadlines).
    fast = dataclasses.replace(ctx, settings=dataclasses.replace(ctx.settings, interval=2.0, jitter=0.0))
    scheduler = Scheduler(fast, repo, Counters())
    now = clock.now_ms()
    [device_id] = _add_devices(repo, 1, next_at=now)
    assert _challenged(scheduler.run_once()[1], signer) == [device_id]
    [first] = repo.open_challenges(device_id)
    clock.advance(2_000)  # due again, 8 s of the 10 s left: still answering
    result, out = scheduler.run_once()
    assert (result.challenged, out) == (0, [])
    assert [c.id for c in repo.open_challenges(device_id)] == [first.id]
    clock.advance(4_000)  # due again, 4 s left: replaced
    assert _challenged(scheduler.run_once()[1], signer) == [device_id]
    [second] = repo.open_challenges(device_id)
    assert second.id != first.id and second.deadline == clock.now_ms() + 10_000
    with repo.write() as tx:
        assert tx.open_challenge_deadlines([device_id, "unknown"]) == {device_id: second.deadline}
        assert tx.open_challenge_deadlines([]) == {}
