"""The audit log: the pure hash chain (every kind of tampering is named at its first broken link), its
storage (serialised writers, verify against the head), ``fleet-server audit verify`` exit codes, and
the console's verify button."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import pytest
from flask.testing import FlaskClient
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import delete, update

from fleet_server.cli import main
from fleet_server.config import ServerConfig
from fleet_server.console.audit import (
    GENESIS_HASH,
    AuditLog,
    AuditRecord,
    ChainHead,
    canonical_details,
    entry_hash,
    record_hash,
    verify_chain,
)
from fleet_server.console.services import ConsoleServices
from fleet_server.storage import models

pytest.register_assert_rewrite("console_fixtures")
from console_fixtures import login  # noqa: E402

pytest_plugins = ("console_fixtures",)

ENTRY = models.SQLModel.metadata.tables["auditentry"]
HEAD = models.SQLModel.metadata.tables["audithead"]


def chain(n: int) -> list[AuditRecord]:
    out: list[AuditRecord] = []
    prev = GENESIS_HASH
    for seq in range(1, n + 1):
        details = canonical_details({"n": seq, "note": "é"})
        h = entry_hash(seq=seq, at=1000 + seq, actor="alice", action="device.revoke", target=f"device:d{seq}",
                       details=details, prev_hash=prev)
        out.append(AuditRecord(seq, 1000 + seq, "alice", "device.revoke", f"device:d{seq}", details, prev, h))
        prev = h
    return out


def head_of(records: list[AuditRecord]) -> ChainHead:
    return ChainHead(records[-1].seq, records[-1].hash) if records else ChainHead(0, GENESIS_HASH)


# --------------------------------------------------------------------------------------------------
# pure chain
# --------------------------------------------------------------------------------------------------
def test_intact_chain() -> None:
    records = chain(10)
    report = verify_chain(records, head_of(records))
    assert (report.ok, report.entries, report.last_seq, report.first_bad_seq) == (True, 10, 10, None)
    assert verify_chain([], ChainHead(0, GENESIS_HASH)).ok
    assert "intact: 10 entries" in report.summary()


def test_altered_entry() -> None:
    records = chain(10)
    records[4] = dataclasses.replace(records[4], actor="mallory")
    report = verify_chain(records, head_of(chain(10)))
    assert (report.ok, report.first_bad_seq) == (False, 5) and "altered" in report.reason
    assert report.summary().startswith("audit log BROKEN at seq 5")


def test_altered_entry_with_recomputed_hash_breaks_the_next_link() -> None:
    records = chain(10)
    forged = dataclasses.replace(records[4], details=canonical_details({"n": 0}))
    records[4] = dataclasses.replace(forged, hash=record_hash(forged))
    report = verify_chain(records, head_of(chain(10)))
    assert (report.ok, report.first_bad_seq) == (False, 6) and "link broken" in report.reason


def test_deleted_entry() -> None:
    records = chain(10)
    del records[3]
    report = verify_chain(records, head_of(records))
    assert (report.ok, report.first_bad_seq) == (False, 4) and "missing" in report.reason
    records = chain(10)
    del records[3:6]
    assert "entry 4-6 is missing" in verify_chain(records, None).reason


def test_deleted_tail_is_caught_by_the_head() -> None:
    full = chain(10)
    report = verify_chain(full[:8], head_of(full))
    assert (report.ok, report.first_bad_seq) == (False, 9) and "9-10 are missing" in report.reason
    # ... and entries appended behind the writer's back.
    report = verify_chain(chain(12), head_of(full))
    assert (report.ok, report.first_bad_seq) == (False, 11)


def test_reordered_entries() -> None:
    records = chain(10)
    a, b = records[2], records[6]
    records[2] = dataclasses.replace(b, seq=3)
    records[6] = dataclasses.replace(a, seq=7)
    report = verify_chain(records, head_of(chain(10)))
    assert (report.ok, report.first_bad_seq) == (False, 3)


def test_forged_first_entry() -> None:
    records = chain(3)
    forged = dataclasses.replace(records[0], prev_hash="1" * 64)
    records[0] = dataclasses.replace(forged, hash=record_hash(forged))
    report = verify_chain(records, None)
    assert (report.ok, report.first_bad_seq) == (False, 1) and "start of the chain" in report.reason


@given(n=st.integers(2, 25), data=st.data())
def test_any_single_alteration_is_found_at_its_seq(n: int, data: st.DataObject) -> None:
    records = chain(n)
    i = data.draw(st.integers(0, n - 1))
    field = data.draw(st.sampled_from(["at", "actor", "action", "target", "details", "prev_hash", "hash"]))
    old = getattr(records[i], field)
    new: object = old + 1 if isinstance(old, int) else (old[:-1] + ("0" if old[-1:] != "0" else "1"))
    records[i] = dataclasses.replace(records[i], **{field: new})
    report = verify_chain(records, head_of(chain(n)))
    assert not report.ok and report.first_bad_seq == i + 1


# --------------------------------------------------------------------------------------------------
# storage and CLI
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def log(svc: ConsoleServices) -> AuditLog:
    for i in range(1, 8):
        svc.audit.append(actor="alice", action="device.revoke", target=f"device:d{i}", details={"i": i},
                         now=1000 + i)
    return svc.audit


def _verify_cli(config: ServerConfig, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    assert config.source is not None
    status = main(["audit", "verify", "--config", str(config.source)])
    out, err = capsys.readouterr()
    return status, out, err


def test_stored_chain_verifies_and_the_cli_says_so(log: AuditLog, console_config: ServerConfig,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    report = log.verify(chunk=3)  # several chunks
    assert report.ok and report.entries == 7
    assert log.head() == ChainHead(7, log.entries(limit=1)[0].hash)
    intact = "audit log intact: 7 entries, chain verified up to seq 7\n"
    assert _verify_cli(console_config, capsys) == (0, intact, "")


@pytest.mark.parametrize(("tamper", "bad"), [
    ("alter", 4),
    ("delete", 4),
    ("delete-last", 7),
    ("swap", 2),
])
def test_tampered_rows_are_reported_with_their_seq(log: AuditLog, console_config: ServerConfig,
                                                   capsys: pytest.CaptureFixture[str], tamper: str,
                                                   bad: int) -> None:
    with log.engine.begin() as conn:
        if tamper == "alter":
            conn.execute(update(ENTRY).where(ENTRY.c.seq == 4).values(actor="mallory"))
        elif tamper.startswith("delete"):
            conn.execute(delete(ENTRY).where(ENTRY.c.seq == bad))
        else:  # swap the contents of entries 2 and 5 (a re-ordering)
            rows = {r.seq: r for r in conn.execute(ENTRY.select().where(ENTRY.c.seq.in_([2, 5])))}
            for seq, other in ((2, 5), (5, 2)):
                values = {k: v for k, v in rows[other]._mapping.items() if k != "seq"}
                conn.execute(update(ENTRY).where(ENTRY.c.seq == seq).values(**values))
    report = log.verify()
    assert not report.ok and report.first_bad_seq == bad
    status, out, err = _verify_cli(console_config, capsys)
    assert status == 1 and out == ""
    assert err.startswith(f"fleet-server: audit log BROKEN at seq {bad}: ") and err.count("\n") == 1
    main(["audit", "verify", "--json", "--config", str(console_config.source)])
    assert f'"first_bad_seq": {bad}' in capsys.readouterr().out


def test_concurrent_writers_never_fork_the_chain(svc: ConsoleServices) -> None:
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            for i in range(15):
                svc.audit.append(actor=f"w{n}", action="test.write", target=str(i), now=svc.now())
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    report = svc.audit.verify()
    assert report.ok and report.entries == 90
    assert sorted(e.seq for e in svc.audit.entries(limit=200)) == list(range(1, 91))


def test_audit_list_cli(log: AuditLog, console_config: ServerConfig,
                        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "list", "--limit", "2", "--config", str(console_config.source)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["SEQ", "TIME", "ACTOR", "ACTION", "TARGET", "DETAILS"]
    assert [line.split()[0] for line in out[1:]] == ["7", "6"]


def test_the_verify_button(client: FlaskClient, users: dict[str, int], log: AuditLog) -> None:
    csrf = login(client, "security")
    page = client.post("/audit/verify", data={"csrf_token": csrf})
    assert page.status_code == 200 and b"audit log intact" in page.data
    with log.engine.begin() as conn:
        conn.execute(update(ENTRY).where(ENTRY.c.seq == 3).values(details='{"i":99}'))
    page = client.post("/audit/verify", data={"csrf_token": csrf})
    assert b"audit log BROKEN at seq 3" in page.data
    # The verification itself is audited (and, appended after the break, it does not hide it).
    assert log.entries(limit=1)[0].action == "audit.verify"
    assert log.verify().first_bad_seq == 3
    listing = client.get("/audit/?action=audit.verify")
    assert listing.status_code == 200 and b"audit.verify" in listing.data


def test_head_row_exists_after_migration(svc: ConsoleServices, tmp_path: Path) -> None:
    with svc.engine.connect() as conn:
        assert conn.execute(HEAD.select()).all()[0]._mapping["hash"] == GENESIS_HASH
