"""Repository behaviour that the handler tests do not reach: counter upserts summed over workers,
outbox leases, retention, policy replacement, and StorageError for database failures."""

from __future__ import annotations

import hashlib

import pytest

from fleet_server.storage.models import DeviceState
from fleet_server.storage.repo import (
    NewAttestation,
    NewChallenge,
    NewDevice,
    Repository,
    selection_from_text,
    selection_json,
)
from protocol.errors import StorageError

pytest.register_assert_rewrite("server_fixtures")
from server_fixtures import BOTH_DATABASES  # noqa: E402

pytest_plugins = ("mqtt_fixtures", "server_fixtures", "pg_fixtures")
pytestmark = BOTH_DATABASES

NOW = 1_790_000_000_000
DAY = 86_400_000


def _device(repo: Repository, device_id: str) -> None:
    with repo.write() as tx:
        tx.insert_device(NewDevice(
            id=device_id, state=DeviceState.TRUSTED, device_class="c", firmware_version="1",
            ek_cert=b"c", ek_fingerprint=hashlib.sha256(device_id.encode()).hexdigest(), ek_public=b"e",
            ak_public=b"a", ak_name=b"n", csr=None, enroll_request_id=None, cert_serial=None, now=NOW,
            next_attestation_at=None), cause="test")


def test_counters_are_added_per_worker_and_summed(repo: Repository) -> None:
    with repo.write() as tx:
        tx.add_counters("w1", {"rejected.malformed": 2, "attestations": 5, "zero": 0}, NOW)
        tx.add_counters("w2", {"rejected.malformed": 1}, NOW)
    with repo.write() as tx:
        tx.add_counters("w1", {"rejected.malformed": 3}, NOW + 1)
    assert repo.counters() == {"rejected.malformed": 6, "attestations": 5}


def test_outbox_leases_and_marks_sent(repo: Repository) -> None:
    with repo.write() as tx:
        ids = [tx.add_outbox(f"fleet/v1/devices/d{i}/down/revocation", b"x%d" % i, NOW) for i in range(3)]
    with repo.write() as tx:
        first = tx.claim_outbox(NOW, 30_000, 2)
    with repo.write() as tx:
        second = tx.claim_outbox(NOW + 1, 30_000, 10)
    assert [m.id for m in first] == ids[:2] and [m.id for m in second] == ids[2:]  # never twice
    with repo.write() as tx:
        tx.mark_outbox_sent([first[0].id], NOW + 2)
    with repo.write() as tx:  # after the lease, what was not acknowledged is offered again
        again = tx.claim_outbox(NOW + 30_002, 30_000, 10)
    assert [(m.id, m.attempts) for m in again] == [(ids[1], 2), (ids[2], 2)]
    assert [m.id for m in repo.outbox()] == ids[1:]


def test_prune_deletes_only_old_history(repo: Repository) -> None:
    _device(repo, "d1")
    with repo.write() as tx:
        tx.insert_challenges([NewChallenge(id=f"{i:032x}", device_id="d1", nonce=b"n" * 32, selection="{}",
                                           issued_at=NOW - i * DAY, deadline=NOW - i * DAY + 1,
                                           cause="periodic", log_offset=0, log_sha256=b"") for i in range(3)])
        tx.mark_challenges([f"{i:032x}" for i in (1, 2)], "used")
        tx.insert_attestations([NewAttestation(
            device_id="d1", challenge_id=f"{i:032x}", issued_at=NOW - i * DAY, received_at=NOW - i * DAY,
            stored_at=NOW - i * DAY, verdict="trusted", reasons=(), evidence_sha256=b"s" * 32, policy_id=None,
            reset_count=1, restart_count=0, clock=1) for i in range(3)])
    with repo.write() as tx:
        deleted = tx.prune(attestations_before=NOW - DAY - 1, challenges_before=NOW - DAY // 2,
                           sessions_before=NOW, outbox_before=NOW)
    assert deleted == 1 + 2
    assert [a.challenge_id for a in repo.attestations("d1")] == [f"{i:032x}" for i in (0, 1)]
    assert repo.challenge(f"{0:032x}") is not None  # open challenges are never pruned
    assert repo.challenge(f"{1:032x}") is None


def test_policy_names_are_unique_unless_replaced(repo: Repository) -> None:
    def store(name: str, version: str, *, replace: bool = False) -> int:
        with repo.write() as tx:
            return tx.insert_policy(name=name, device_class="cam", firmware_version=version, reference="{}",
                                    reference_sha256=name + version, selection='{"sha256":[0]}', now=NOW,
                                    created_by="test", replace=replace)

    first = store("p", "1")
    with pytest.raises(StorageError, match="already exists"):
        store("p", "2")
    second = store("p", "1", replace=True)
    active = repo.active_policies()
    assert [h.id for h in active] == [second] and active[0].selection == {"sha256": (0,)}
    old = repo.policy(policy_id=first)
    assert old is not None and not old.header.active and old.header.name != "p"


def test_database_failures_are_storage_errors(repo: Repository) -> None:
    _device(repo, "d2")
    with pytest.raises(StorageError) as exc:
        _device(repo, "d2")  # duplicate primary key
    text = exc.value.diagnostics()
    assert text.startswith("database error while writing: ") and "\n" not in text


def test_selection_text_parse_is_cached_but_each_caller_gets_its_own_dict(repo: Repository) -> None:
    # (pure; ``repo`` only because this module runs every test on both databases)
    text = selection_json({"sha256": (7, 0, 1), "sha1": (0,)})
    first = selection_from_text(text)
    assert first == {"sha256": (0, 1, 7), "sha1": (0,)}
    first["sha256"] = (9,)
    del first["sha1"]
    assert selection_from_text(text) == {"sha256": (0, 1, 7), "sha1": (0,)}
    assert selection_from_text('{"sha384": [16]}') == {"sha384": (16,)}
