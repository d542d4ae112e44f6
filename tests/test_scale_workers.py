"""Several server workers sharing one PostgreSQL database and one broker (``$share``), and faults.

Real processes throughout (:class:`firmware_sim.fleet.FleetHarness`): Mosquitto, ``fleet-server run
--workers N`` against PostgreSQL, swtpm-backed devices with their real agents.

* 1, 2 and 4 workers: every device attested every round, trusted at the end;
* one worker killed with SIGKILL mid-run (the supervisor starts a new one), PostgreSQL stopped and
  started, the broker restarted: the workers survive (no traceback in the server's log) and every
  device is re-attested and back to its true state within two intervals of the fault's end.

After each run the ledger in the database is checked (:func:`_check_ledger`):

* no attestation recorded twice: one attestation per challenge, and it used that challenge;
* no device challenged twice for one round: two challenges of one device are at least
  ``min(request_min_interval, interval - jitter)`` apart (the scheduler gives a claimed device its
  next time in the claiming transaction, ``FOR UPDATE SKIP LOCKED`` lets one worker claim it);
* nothing lost silently: a challenge that was not answered (its evidence lost with a killed worker,
  a broker or database outage) is followed by another challenge of the device, answered.

Waits are for states, bounded; the "two intervals" are checked on the server's own timestamps.
"""

from __future__ import annotations

import itertools
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from firmware_sim.fleet import FleetConfig, FleetHarness, running_fleet

pytest.register_assert_rewrite("pg_fixtures")
from pg_fixtures import PostgresCluster, running_cluster  # noqa: E402

pytest_plugins = ("pg_fixtures",)
pytestmark = [pytest.mark.swtpm, pytest.mark.mqtt, pytest.mark.slow,
              pytest.mark.xdist_group("scale-workers")]

DEVICES = 4
INTERVAL = 2.0
JITTER = 0.1
REQUEST_MIN_INTERVAL = 1.0  # what the harness sets: min(1 s, interval)
SLACK_MS = 50
"""Clock resolution of the gaps checked (milliseconds rounded in the challenge rows)."""
REBOOTED = "dev-001"
WAIT = 90.0
"""Generous bound of each wait for a state (the box is shared)."""


def _config(database_url: str, workers: int, workdir: Path) -> FleetConfig:
    return FleetConfig(devices=DEVICES, interval=INTERVAL, jitter=JITTER, challenge_timeout=INTERVAL,
                       duration=None, server_workers=workers, database_url=database_url, workdir=workdir)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _rows(fleet: FleetHarness, sql: str, **params: object) -> list[tuple[object, ...]]:
    with fleet._db().connect() as conn:
        return [tuple(r) for r in conn.execute(text(sql), params).all()]


def _counts(fleet: FleetHarness) -> dict[str, int]:
    counts = fleet.attestation_counts()
    return {d: counts.get(d, 0) for d in fleet.device_ids}


def _wait_attested(fleet: FleetHarness, rounds: int, what: str) -> None:
    """Wait until every device has ``rounds`` more attestations, and is trusted."""
    before = _counts(fleet)
    fleet.wait_for(lambda: all(n >= before[d] + rounds for d, n in _counts(fleet).items())
                   and all(r.state == "trusted" for r in fleet.device_states().values()),
                   f"{what}: every device attested {rounds} more times and trusted", WAIT)


def _check_ledger(fleet: FleetHarness) -> None:
    """The invariants of the module docstring, over everything the database holds."""
    twice = _rows(fleet, "SELECT challenge_id, count(*) FROM attestation GROUP BY challenge_id "
                         "HAVING count(*) > 1")
    assert twice == [], f"attestations recorded twice: {twice}"
    orphans = _rows(fleet, "SELECT a.id, a.challenge_id, c.status FROM attestation a LEFT JOIN challenge c "
                           "ON c.id = a.challenge_id AND c.device_id = a.device_id "
                           "WHERE c.id IS NULL OR c.status <> 'used'")
    assert orphans == [], f"attestations without their used challenge: {orphans}"
    min_gap = int(min(REQUEST_MIN_INTERVAL, INTERVAL - JITTER) * 1000) - SLACK_MS
    challenges = _rows(fleet, "SELECT c.device_id, c.issued_at, c.status, c.id, c.cause, count(a.id) "
                              "FROM challenge c LEFT JOIN attestation a ON a.challenge_id = c.id "
                              "GROUP BY c.id ORDER BY c.device_id, c.issued_at, c.id")
    by_device: dict[str, list[tuple[int, str, str, str, int]]] = {}
    for device_id, issued_at, status, cid, cause, n in challenges:
        by_device.setdefault(str(device_id), []).append(
            (int(str(issued_at)), str(status), str(cid), str(cause), int(str(n))))
    assert sorted(by_device) == fleet.device_ids
    for device_id, rows in by_device.items():
        for (t0, status0, c0, _, n0), (t1, _, c1, cause1, _) in itertools.pairwise(rows):
            if cause1 == "full-log":
                # The evidence of c0 was authentic but continued the log of a boot before a reboot
                # the server was not told of: c0 is used without a verdict and the whole log asked
                # for at once (Processor._rechallenge) - the same round, one more round trip.
                assert status0 == "used" and n0 == 0 and t1 - t0 >= 0, (device_id, c0, c1)
                continue
            assert t1 - t0 >= min_gap, f"{device_id} challenged twice in one round: {c0} and {c1} " \
                                       f"{t1 - t0} ms apart"
        for (_, status0, c0, _, n0), after in itertools.zip_longest(rows, rows[1:]):
            if status0 == "used" and n0 == 0:
                assert after is not None and after[3] == "full-log", \
                    f"{device_id}: challenge {c0} used without an attestation or a full-log challenge"
        # Nothing lost silently: a challenge that was not answered is followed by one that was (at
        # most the newest two, issued since the last answer, may still be waiting for theirs).
        last_used = max((i for i, (_, status, *_) in enumerate(rows) if status == "used"), default=-1)
        waiting = rows[last_used + 1:]
        assert last_used >= 0 and len(waiting) <= 2, f"{device_id}: not answered since {waiting}"


def _assert_recovered_within_two_intervals(fleet: FleetHarness, fault_end_ms: int) -> None:
    """Every device has an attestation whose challenge was issued within two intervals (plus the
    scheduler's tick) after ``fault_end_ms``, and is trusted."""
    bound = fault_end_ms + int(2 * (INTERVAL + JITTER) * 1000) + 500
    rows = dict(_rows(fleet, "SELECT device_id, min(issued_at) FROM attestation WHERE issued_at >= :t "
                             "GROUP BY device_id", t=fault_end_ms))
    late = {d: (None if t is None else int(str(t)) - fault_end_ms) for d in fleet.device_ids
            if (t := rows.get(d)) is None or int(str(t)) > bound}
    assert late == {}, f"devices not re-attested within two intervals (ms after the fault): {late}"
    states = {d: r.state for d, r in fleet.device_states().items()}
    assert states == dict.fromkeys(fleet.device_ids, "trusted")


def _server_log(fleet: FleetHarness) -> str:
    parts = []
    for path in (fleet.data_dir / "logs" / "fleet-server.log", fleet.logs_dir / "server.stderr.log"):
        if path.exists():
            parts.append(path.read_text(errors="replace"))
    return "\n".join(parts)


def _assert_no_traceback(fleet: FleetHarness) -> None:
    log = _server_log(fleet)
    assert "Traceback" not in log, log[log.index("Traceback") - 2000:][:6000]


def _just_challenged(fleet: FleetHarness) -> None:
    """Return as soon as a challenge was issued (its evidence is then on its way to a worker)."""
    newest = _rows(fleet, "SELECT max(issued_at) FROM challenge")[0][0]
    fleet.wait_for(lambda: _rows(fleet, "SELECT max(issued_at) FROM challenge")[0][0] != newest,
                   "a new challenge", WAIT, poll=0.005)


def _worker_pids(server_pid: int) -> list[int]:
    """The worker processes ``fleet-server run --workers N`` spawned (not the resource tracker)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == server_pid and b"spawn_main" in cmdline:
            pids.append(int(entry))
    return sorted(pids)


# --------------------------------------------------------------------------------------------------
# 1, 2 and 4 workers
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [1, 2, 4])
def test_workers_share_the_fleet_every_device_attested_every_round_once(
        workers: int, postgres_db: str, tmp_path: Path) -> None:
    with running_fleet(_config(postgres_db, workers, tmp_path / "fleet")) as fleet:
        if workers > 1:
            assert fleet.server_pid is not None
            assert len(_worker_pids(fleet.server_pid)) == workers
        start_ms = _now_ms()
        _wait_attested(fleet, 4, f"{workers} workers")
        end_ms = _now_ms()
        _check_ledger(fleet)
        # Every round: no device skipped one in the window (a skipped round leaves a gap of two).
        for device_id in fleet.device_ids:
            stored = _rows(fleet, "SELECT stored_at FROM attestation WHERE device_id = :d "
                                  "AND stored_at BETWEEN :a AND :b", d=device_id, a=start_ms, b=end_ms)
            assert len(stored) >= 3, (device_id, stored)
        if workers > 1:  # the load is shared: more than one worker handles evidence (counters are
            # flushed every few seconds)
            fleet.wait_for(lambda: len(_rows(fleet, "SELECT worker FROM counter WHERE value > 0 AND "
                                                    "name = 'received.evidence'")) >= 2,
                           "evidence handled by two workers", WAIT)
        _assert_no_traceback(fleet)


# --------------------------------------------------------------------------------------------------
# faults: one fleet of 2 workers on a PostgreSQL cluster of its own
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster() -> Iterator[PostgresCluster]:
    with running_cluster() as c:
        yield c


@pytest.fixture(scope="module")
def faulty_fleet(cluster: PostgresCluster,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[FleetHarness]:
    import psycopg

    dsn = cluster.url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute('CREATE DATABASE "fleet"')
    url = cluster.url.rsplit("/", 1)[0] + "/fleet"
    with running_fleet(_config(url, 2, tmp_path_factory.mktemp("scale") / "fleet")) as fleet:
        yield fleet


def test_a_worker_killed_mid_run_loses_nothing_and_is_replaced(faulty_fleet: FleetHarness) -> None:
    fleet = faulty_fleet
    _wait_attested(fleet, 1, "before the kill")
    assert fleet.server_pid is not None
    before = _worker_pids(fleet.server_pid)
    assert len(before) == 2
    _just_challenged(fleet)
    os.kill(before[0], signal.SIGKILL)
    fleet.wait_for(lambda: len(set(_worker_pids(fleet.server_pid or 0)) - {before[0]}) == 2,
                   "the supervisor to start a new worker", WAIT)
    fault_end = _now_ms()
    _wait_attested(fleet, 3, "after the kill")
    _check_ledger(fleet)
    _assert_recovered_within_two_intervals(fleet, fault_end)
    _assert_no_traceback(fleet)


def test_postgresql_restarted_mid_run_the_workers_reconnect(faulty_fleet: FleetHarness,
                                                           cluster: PostgresCluster) -> None:
    fleet = faulty_fleet
    _wait_attested(fleet, 1, "before the database restart")
    assert fleet.server_pid is not None
    workers = _worker_pids(fleet.server_pid)
    _just_challenged(fleet)
    cluster.stop()  # evidence arrives without a database
    fleet._db().dispose()
    # A device reboots meanwhile: its request for a challenge ("boot") finds no database either.
    fleet.power_cycle(REBOOTED)
    time.sleep(INTERVAL)
    cluster.start()
    fault_end = _now_ms()
    _wait_attested(fleet, 3, "after the database restart")
    assert _worker_pids(fleet.server_pid) == workers  # the same processes: none crashed
    assert "database error" in _server_log(fleet)  # the outage was noticed, and logged
    states = fleet.states_between(REBOOTED, "trusted", fault_end - int(INTERVAL * 1000) - 5000, None)
    assert states == ["trusted"], states  # never untrusted on the way
    _check_ledger(fleet)
    _assert_recovered_within_two_intervals(fleet, fault_end)
    _assert_no_traceback(fleet)


def test_broker_restarted_mid_run_the_workers_reconnect(faulty_fleet: FleetHarness) -> None:
    fleet = faulty_fleet
    _wait_attested(fleet, 1, "before the broker restart")
    assert fleet.server_pid is not None
    workers = _worker_pids(fleet.server_pid)
    fleet.restart_broker()
    fault_end = _now_ms()
    _wait_attested(fleet, 3, "after the broker restart")
    assert _worker_pids(fleet.server_pid) == workers
    _check_ledger(fleet)
    _assert_recovered_within_two_intervals(fleet, fault_end)
    _assert_no_traceback(fleet)
