"""Signed checkpoints of the audit chain (issue 9: "a rewrite of the whole audit chain is detected").

Someone with write access to the database rewrites every entry and recomputes every hash, as the
hash chain alone cannot notice; the checkpoints, signed by a key that is a file and not in the
database, name the checkpoint whose signed head no longer matches. Also: forged and foreign
signatures, deleted checkpoints, the automatic checkpoint every N entries, ``fleet-server audit
checkpoint`` (audited) and ``audit verify``, the key file's mode, the console's audit page. The
storage tests run on SQLite and PostgreSQL.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from flask.testing import FlaskClient
from sqlalchemy import Engine, delete, insert, update

from fleet_server.cli import main
from fleet_server.config import ServerConfig, load_config
from fleet_server.console.audit import AuditLog, Checkpointing, cli_actor, entry_hash, verify_chain
from fleet_server.console.checkpoint import sign_checkpoint
from fleet_server.console.services import ConsoleServices
from fleet_server.keys import create_checkpoint_key, load_checkpoint_key, public_key_path
from fleet_server.migrations import upgrade
from fleet_server.storage import models
from fleet_server.storage.db import create_engine

pytest.register_assert_rewrite("console_fixtures", "server_fixtures")
from console_fixtures import login  # noqa: E402
from server_fixtures import BOTH_DATABASES  # noqa: E402

pytest_plugins = ("console_fixtures", "server_fixtures", "pg_fixtures", "mqtt_fixtures")

TABLES = models.SQLModel.metadata.tables
ENTRY, HEAD, CHECKPOINT = TABLES["auditentry"], TABLES["audithead"], TABLES["auditcheckpoint"]
INTERVAL = 3
Capsys = pytest.CaptureFixture[str]


@dataclass
class Setup:
    config: ServerConfig
    engine: Engine
    log: AuditLog

    @property
    def key_path(self) -> Path:
        return self.config.audit.checkpoint_key

    def cli(self, *argv: str) -> list[str]:
        return [*argv, "--config", str(self.config.source)]


@pytest.fixture
def setup(tmp_path: Path, database_url: str | None) -> Iterator[Setup]:
    url = database_url or f"sqlite:///{tmp_path / 'fleet.db'}"
    (tmp_path / "server.toml").write_text(f'[server]\ndatabase_url = "{url}"\nlog_file = "server.log"\n'
                                          f"[audit]\ncheckpoint_interval = {INTERVAL}\n")
    config = load_config(tmp_path / "server.toml")
    engine = create_engine(url)
    upgrade(engine)
    try:
        yield Setup(config, engine, AuditLog(engine, Checkpointing.from_settings(config.audit)))
    finally:
        engine.dispose()


def append(log: AuditLog, n: int) -> None:
    for i in range(n):
        log.append(actor="alice", action="device.revoke", target=f"device:d{i}", details={"i": i},
                   now=1000 + i)


def rewrite_every_row(engine: Engine) -> None:
    """What an attacker with database access does: change entry 2 and recompute every hash, every link
    and the head, so that the hash chain alone is consistent again."""
    with engine.begin() as conn:
        rows = list(conn.execute(ENTRY.select().order_by(ENTRY.c.seq)))
        prev = "0" * 64
        for row in rows:
            actor = "mallory" if row.seq == 2 else row.actor
            digest = entry_hash(seq=row.seq, at=row.at, actor=actor, action=row.action, target=row.target,
                                details=row.details, prev_hash=prev)
            conn.execute(update(ENTRY).where(ENTRY.c.seq == row.seq)
                         .values(actor=actor, prev_hash=prev, hash=digest))
            prev = digest
        conn.execute(update(HEAD).values(hash=prev))


# --------------------------------------------------------------------------------------------------
# storage (SQLite and PostgreSQL)
# --------------------------------------------------------------------------------------------------
@BOTH_DATABASES
def test_a_checkpoint_is_signed_automatically_every_n_entries(setup: Setup) -> None:
    assert not setup.key_path.exists()
    append(setup.log, 2)
    assert not setup.key_path.exists()  # nothing due yet: the key is created on first use
    append(setup.log, 5)
    with setup.engine.connect() as conn:
        rows = conn.execute(CHECKPOINT.select().order_by(CHECKPOINT.c.seq)).all()
    assert [r.seq for r in rows] == [3, 6]
    key = load_checkpoint_key(setup.key_path)
    assert {r.kid for r in rows} == {key.kid}
    assert stat.S_IMODE(os.stat(setup.key_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(public_key_path(setup.key_path)).st_mode) == 0o644
    report = setup.log.verify()
    assert report.ok and report.checkpoints is not None and report.checkpoints.checked == 2
    assert report.checkpoints.last_good is not None and report.checkpoints.last_good.seq == 6
    assert report.lines()[1].startswith("last good checkpoint: checkpoint 2 (seq 6, ")


@BOTH_DATABASES
def test_a_consistent_rewrite_of_every_row_is_detected(setup: Setup, capsys: Capsys) -> None:
    append(setup.log, 7)
    rewrite_every_row(setup.engine)
    chain_only = verify_chain(reversed(setup.log.entries(limit=100)), setup.log.head())
    assert chain_only.ok  # the hash chain alone is fooled

    report = setup.log.verify()
    assert not report.ok and report.first_bad_seq is None and report.checkpoints is not None
    assert [p.split(":")[0] for p in report.checkpoints.problems] == [
        "checkpoint 1 (seq 3, 1970-01-01T00", "checkpoint 2 (seq 6, 1970-01-01T00"]
    assert all("the chain was rewritten: entry" in p for p in report.checkpoints.problems)
    assert report.summary().startswith("audit log BROKEN: checkpoint 1 (seq 3, ")

    assert main(setup.cli("audit", "verify")) == 1
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert out == "" and len(lines) == 2
    assert lines[0].startswith("fleet-server: audit log BROKEN: checkpoint 1 (seq 3, ")
    assert lines[1].startswith("fleet-server: audit log BROKEN: checkpoint 2 (seq 6, ")
    assert "entry 6 has hash " in lines[1] and "the checkpoint signed " in lines[1]
    assert main(setup.cli("audit", "verify", "--json")) == 1
    assert '"ok": false' in capsys.readouterr().out


@BOTH_DATABASES
def test_concurrent_writers_checkpoint_every_n_entries(setup: Setup) -> None:
    log = AuditLog(setup.engine, Checkpointing(setup.key_path, 5))
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            for i in range(10):
                log.append(actor=f"w{n}", action="test.write", target=str(i), now=2000 + i)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with setup.engine.connect() as conn:
        assert [r.seq for r in conn.execute(CHECKPOINT.select().order_by(CHECKPOINT.c.seq))] == [
            5, 10, 15, 20, 25, 30, 35, 40]
    report = log.verify()
    assert report.ok and report.checkpoints is not None and report.checkpoints.checked == 8


@BOTH_DATABASES
def test_an_altered_or_forged_checkpoint_fails(setup: Setup) -> None:
    append(setup.log, 4)
    with setup.engine.begin() as conn:
        row = conn.execute(CHECKPOINT.select()).one()
        flipped = ("0" if row.signature[0] != "0" else "1") + row.signature[1:]
        conn.execute(update(CHECKPOINT).values(signature=flipped))
    problems = setup.log.verify().checkpoints.problems  # type: ignore[union-attr]
    assert problems[0].startswith("checkpoint 1 (seq 3, ")
    assert problems[0].endswith("the signature does not verify (the checkpoint was forged or altered)")

    with setup.engine.begin() as conn:  # the right signature, over another head (moved to seq 4)
        conn.execute(update(CHECKPOINT).values(signature=row.signature, seq=4))
    problems = setup.log.verify().checkpoints.problems  # type: ignore[union-attr]
    assert problems[0].startswith("checkpoint 1 (seq 4, ") and "signature does not verify" in problems[0]


@BOTH_DATABASES
def test_a_checkpoint_signed_by_another_key_fails(setup: Setup, tmp_path: Path) -> None:
    append(setup.log, 2)
    other = create_checkpoint_key(tmp_path / "other" / "audit-checkpoint.key")
    assert not setup.key_path.exists()  # no checkpoint due yet
    head = setup.log.head()
    assert head is not None
    forged = sign_checkpoint(other, seq=head.seq, head_hash=head.hash, at=5000)
    with setup.engine.begin() as conn:
        conn.execute(insert(CHECKPOINT).values(seq=forged.seq, head_hash=forged.head_hash, at=forged.at,
                                               kid=forged.kid, signature=forged.signature))
    append(setup.log, 1)  # the automatic checkpoint is due only 3 entries after the forged one
    ours = create_checkpoint_key(setup.key_path)
    problems = setup.log.verify().checkpoints.problems  # type: ignore[union-attr]
    assert problems == (f"checkpoint 1 (seq 2, 1970-01-01T00:00:05Z, key id {other.kid}): signed by key id "
                        f"{other.kid}, not by this server's checkpoint key {ours.kid}",)
    with setup.engine.begin() as conn:  # claiming our key id does not help
        conn.execute(update(CHECKPOINT).values(kid=ours.kid))
    problems = setup.log.verify().checkpoints.problems  # type: ignore[union-attr]
    assert len(problems) == 1 and problems[0].endswith("the signature does not verify "
                                                       "(the checkpoint was forged or altered)")


@BOTH_DATABASES
def test_deleting_the_checkpoints_is_noticed(setup: Setup) -> None:
    append(setup.log, 8)
    with setup.engine.begin() as conn:
        conn.execute(delete(CHECKPOINT))
    report = setup.log.verify()
    assert not report.ok and report.checkpoints is not None
    assert report.checkpoints.problems == (
        "entries 1-8 are covered by no good checkpoint, though one is signed at least every 3 entries "
        "(checkpoints deleted or failing)",)


@BOTH_DATABASES
def test_a_broken_chain_is_never_signed(setup: Setup, capsys: Capsys) -> None:
    append(setup.log, 4)
    with setup.engine.begin() as conn:
        conn.execute(update(ENTRY).where(ENTRY.c.seq == 4).values(actor="mallory"))
    append(setup.log, 2)  # seq 6 makes a checkpoint due: not signed over an altered entry
    with setup.engine.connect() as conn:
        assert [r.seq for r in conn.execute(CHECKPOINT.select())] == [3]
    assert main(setup.cli("audit", "checkpoint")) == 1
    err = capsys.readouterr().err
    assert err.startswith("fleet-server: refusing to sign a checkpoint: audit log BROKEN at seq 4: ")


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------
@BOTH_DATABASES
def test_audit_checkpoint_cli_signs_one_and_is_audited(setup: Setup, capsys: Capsys) -> None:
    assert main(setup.cli("audit", "checkpoint")) == 1
    assert capsys.readouterr().err == "fleet-server: the audit log is empty: there is nothing to checkpoint\n"
    append(setup.log, 2)
    assert main(setup.cli("audit", "checkpoint")) == 0
    out = capsys.readouterr().out
    kid = load_checkpoint_key(setup.key_path).kid
    assert out.startswith("signed checkpoint 1 (seq 2, ") and out.endswith(f"key id {kid})\n")
    entry = setup.log.entries(limit=1)[0]
    assert (entry.seq, entry.actor, entry.action) == (3, cli_actor(), "audit.checkpoint")
    assert entry.target == "audit"
    assert entry.details_dict() == {"checkpoint": 1, "seq": 2, "kid": kid}

    assert main(setup.cli("audit", "verify")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "audit log intact: 3 entries, chain verified up to seq 3"
    assert lines[1].startswith("last good checkpoint: checkpoint 1 (seq 2, ")
    assert lines[1].endswith(f"key id {kid}), 1 checkpoint(s) checked")


@BOTH_DATABASES
def test_db_upgrade_checkpoints_an_existing_chain(setup: Setup, capsys: Capsys) -> None:
    append(AuditLog(setup.engine), 5)  # written before checkpoints existed
    assert main(setup.cli("db", "upgrade")) == 0
    capsys.readouterr()
    with setup.engine.connect() as conn:
        assert [r.seq for r in conn.execute(CHECKPOINT.select())] == [6]  # its own entry included
    assert setup.log.verify().ok


@BOTH_DATABASES
def test_cli_commands_sign_the_checkpoint_they_make_due(setup: Setup, capsys: Capsys) -> None:
    unsigned = AuditLog(setup.engine)  # a writer without the key (e.g. `db upgrade`)
    append(unsigned, 3)
    assert main(setup.cli("audit", "list")) == 0  # any command run with the key catches up
    capsys.readouterr()
    with setup.engine.connect() as conn:
        assert [r.seq for r in conn.execute(CHECKPOINT.select())] == [3]
    assert setup.log.verify().ok


# --------------------------------------------------------------------------------------------------
# init and the console
# --------------------------------------------------------------------------------------------------
def test_init_creates_the_checkpoint_key(console_config: ServerConfig) -> None:
    path = console_config.audit.checkpoint_key
    assert path == console_config.data_dir / "keys" / "audit-checkpoint.key"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert public_key_path(path).exists()
    kid = load_checkpoint_key(path).kid
    assert main(["init", "--data-dir", str(console_config.data_dir), "--mqtt-port", "18883", "--force"]) == 0
    assert load_checkpoint_key(path).kid == kid  # never replaced: the stored checkpoints name it


def test_the_audit_page_shows_the_last_good_checkpoint(client: FlaskClient, users: dict[str, int],
                                                        svc: ConsoleServices) -> None:
    csrf = login(client, "security")
    first = client.get("/audit/")
    assert first.status_code == 200 and b"Warning: no signed checkpoint of the audit log yet" in first.data
    append(svc.audit, 3)
    cp = svc.audit.checkpoint(now=svc.now())
    page = client.get("/audit/").get_data(as_text=True)
    assert f"Last good checkpoint: seq {cp.seq}, " in page and f"key id <code>{cp.kid}</code>" in page
    assert '<p class="flash ok" role="status" id="checkpoint">' in page
    rewrite_every_row(svc.engine)
    page = client.get("/audit/").get_data(as_text=True)
    assert "Warning: the signed checkpoints do not verify." in page
    assert f"checkpoint 1 (seq {cp.seq}, " in page and "the chain was rewritten" in page
    page = client.post("/audit/verify", data={"csrf_token": csrf}).get_data(as_text=True)
    assert "audit log BROKEN: checkpoint 1 (seq " in page
