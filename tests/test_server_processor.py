"""The worker's message handling, at handler level: a real Repository on a temporary SQLite file, real
swtpm devices (firmware_sim boots, the agent's TPM adapter quotes and activates credentials), and the
Processor fed with the messages a device would publish. Replies are verified with the server's key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from firmware_sim.broker import BrokerPki
from firmware_sim.manufacturer import ManufacturerCA
from fleet_server import pki
from fleet_server.keys import ResultSigner
from fleet_server.service import admin
from fleet_server.service.common import ManualClock
from fleet_server.service.processor import Processor
from fleet_server.storage.repo import Repository
from protocol import topics
from protocol.errors import TpmError
from protocol.messages import (
    MAX_PLAIN_MESSAGE,
    AttestationResult,
    AttestRequest,
    Challenge,
    EnrollChallenge,
    EnrollProof,
    EnrollRequest,
    EnrollResult,
    Evidence,
    Revocation,
    decode_plain,
    decode_signed,
    encode_plain,
    new_message_id,
)
from protocol.mqtt import InboundMessage

pytest.register_assert_rewrite("server_fixtures")
from server_fixtures import (  # noqa: E402
    BOTH_DATABASES,
    DeviceFactory,
    SimDevice,
    attest_once,
    enroll,
    one,
    replies,
)

pytest_plugins = ("mqtt_fixtures", "server_fixtures", "pg_fixtures")
pytestmark = [pytest.mark.swtpm, BOTH_DATABASES]


def _prereg(repo: Repository, device: SimDevice, clock: ManualClock) -> None:
    admin.preregister_ek(repo, device.tpm.ek_certificate(), now=clock.now_ms())


def _reencode(payload: bytes, clock: ManualClock) -> bytes:
    """The same message body under a new message id (a replay that passes de-duplication)."""
    env = decode_plain(payload, max_size=1 << 20)
    return encode_plain(env.message, ts=clock.now_ms())


# --------------------------------------------------------------------------------------------------
# enrollment
# --------------------------------------------------------------------------------------------------
def test_enrollment_pending_until_approved(
        processor: Processor, repo: Repository, signer: ResultSigner, make_device: DeviceFactory,
        fleet_pki: BrokerPki, clock: ManualClock) -> None:
    dev = make_device("cam-1")
    result = enroll(processor, signer, dev)
    assert result.status == "pending" and result.device_cert is None
    record = repo.device("cam-1")
    assert record is not None and record.state == "pending"
    assert record.device_class == "edge-camera" and record.firmware_version == "1.2.0"
    assert record.ek_fingerprint == hashlib.sha256(dev.tpm.ek_certificate()).hexdigest()
    # A pending device is not challenged.
    out = processor.handle_batch([dev.up("hello", dev.hello())])
    assert out == [] and processor.counters.get("rejected.device_not_attested") == 1

    transition = admin.approve_device(repo, "cam-1", signer=signer, fleet_ca=fleet_pki.load_ca(),
                                      now=clock.now_ms())
    assert (transition.from_state, transition.to_state, transition.messages) == ("pending", "enrolled", 1)
    [row] = repo.outbox()
    assert row.topic == topics.enroll_down("cam-1", "result")
    sent = decode_signed(row.payload, keys={signer.kid: signer.public_key}, aud="claim:cam-1").message
    assert isinstance(sent, EnrollResult) and sent.status == "admitted" and sent.device_cert
    cert_pem = x509.load_der_x509_certificate(sent.device_cert).public_bytes(serialization.Encoding.PEM)
    assert pki.verify_client_cert(fleet_pki.ca_cert.read_bytes(), cert_pem, now=time.time()) == "cam-1"
    assert repo.device("cam-1").state == "enrolled"  # type: ignore[union-attr]
    history = [(h.from_state, h.to_state) for h in repo.state_history("cam-1")]
    assert history == [("pending", "enrolled"), (None, "pending")]


def test_enrollment_preregistered_is_admitted_with_certificate(
        processor: Processor, repo: Repository, signer: ResultSigner, make_device: DeviceFactory,
        fleet_pki: BrokerPki, clock: ManualClock) -> None:
    dev = make_device("cam-2")
    _prereg(repo, dev, clock)
    result = enroll(processor, signer, dev)
    assert result.status == "admitted" and result.device_cert is not None
    cert = x509.load_der_x509_certificate(result.device_cert)
    assert pki.common_name(cert) == "cam-2"
    assert cert.public_key() == dev.tls_key.public_key()  # issued from the device's own CSR
    record = repo.device("cam-2")
    assert record is not None and record.state == "enrolled"
    assert record.cert_serial == format(cert.serial_number, "x")
    # Enrolling again (a device that lost its certificate) proves the TPM again and gets a certificate.
    again = enroll(processor, signer, dev)
    assert again.status == "admitted" and again.device_cert
    assert repo.device("cam-2").state == "enrolled"  # type: ignore[union-attr]


def test_enrollment_refused_for_unknown_manufacturer(
        processor: Processor, repo: Repository, signer: ResultSigner, make_device: DeviceFactory,
        tmp_path: Path) -> None:
    rogue = ManufacturerCA.load_or_create(tmp_path / "rogue-ca", name="Rogue TPM")
    dev = make_device("cam-3", ca=rogue)
    out = processor.handle_batch([dev.enroll_up("request", dev.enroll_request())])
    result = one(signer, out, "cam-3", "result")
    assert isinstance(result, EnrollResult) and result.status == "rejected"
    assert "manufacturer" in result.reasons[0] or "trusted" in result.reasons[0]
    assert replies(signer, out, "cam-3", "challenge") == []
    assert processor.counters.get("rejected.enroll_refused") == 1
    assert repo.device("cam-3") is None


def test_enrollment_with_ak_of_another_tpm_cannot_be_proven(
        processor: Processor, repo: Repository, signer: ResultSigner, make_device: DeviceFactory,
        clock: ManualClock) -> None:
    victim = make_device("cam-4")
    other = make_device("cam-5", fresh_tpm=True)
    # The request names victim's EK (certificate and public area are public) but the other TPM's AK.
    req = decode_plain(victim.enroll_request(), max_size=MAX_PLAIN_MESSAGE).message
    assert isinstance(req, EnrollRequest)
    forged = encode_plain(dataclasses.replace(req, ak_public=other.tpm.ak_public), ts=clock.now_ms())
    out = processor.handle_batch([victim.enroll_up("request", forged)])
    challenge = one(signer, out, "cam-4", "challenge")
    assert isinstance(challenge, EnrollChallenge)
    # Neither TPM can activate it: the victim's TPM has another AK, the other TPM another EK.
    for tpm in (victim.tpm, other.tpm):
        with pytest.raises(TpmError):
            tpm.activate_credential(challenge.credential_blob, challenge.encrypted_secret)
    guess = encode_plain(EnrollProof(request_id=challenge.request_id, proof=bytes(32)), ts=clock.now_ms())
    out = processor.handle_batch([victim.enroll_up("proof", guess)])
    result = one(signer, out, "cam-4", "result")
    assert result.status == "rejected" and "proof" in result.reasons[0]
    assert processor.counters.get("rejected.enroll_proof_invalid") == 1
    assert repo.device("cam-4") is None
    # The session is spent: even the right proof is refused now.
    out = processor.handle_batch([victim.enroll_up("proof", _reencode(guess, clock))])
    assert one(signer, out, "cam-4", "result").status == "rejected"


def test_enrollment_refuses_csr_for_another_id_and_reused_ek(
        processor: Processor, repo: Repository, signer: ResultSigner, make_device: DeviceFactory,
        clock: ManualClock) -> None:
    dev = make_device("cam-6")
    out = processor.handle_batch([dev.enroll_up("request", dev.enroll_request(csr_id="cam-7"))])
    result = one(signer, out, "cam-6", "result")
    assert result.status == "rejected" and "CN" in result.reasons[0]
    _prereg(repo, dev, clock)
    assert enroll(processor, signer, dev).status == "admitted"
    # The same TPM under another id (e.g. a cloned claim certificate) is refused.
    twin = make_device("cam-8")  # a copy of the same manufactured TPM: same EK
    out = processor.handle_batch([twin.enroll_up("request", twin.enroll_request())])
    result = one(signer, out, "cam-8", "result")
    assert result.status == "rejected" and "another device id" in result.reasons[0]


# --------------------------------------------------------------------------------------------------
# attestation
# --------------------------------------------------------------------------------------------------
TrustedFactory = Callable[..., SimDevice]


@pytest.fixture
def trusted_device(
        processor: Processor, repo: Repository, signer: ResultSigner, make_device: DeviceFactory,
        golden_policy: admin.StoredPolicy, clock: ManualClock) -> TrustedFactory:
    def make(device_id: str, profile: str = "golden", *, fresh_tpm: bool = False) -> SimDevice:
        dev = make_device(device_id, profile, fresh_tpm=fresh_tpm)
        _prereg(repo, dev, clock)
        assert enroll(processor, signer, dev).status == "admitted"
        return dev
    return make


def test_good_evidence_is_trusted_and_stored(
        processor: Processor, repo: Repository, signer: ResultSigner, trusted_device: TrustedFactory,
        clock: ManualClock) -> None:
    dev = trusted_device("cam-10")
    out = processor.handle_batch([dev.up("hello", dev.hello("boot"))])
    challenge = one(signer, out, "cam-10", "challenge")
    assert isinstance(challenge, Challenge) and len(challenge.nonce) == 32
    assert challenge.selection == {"sha256": (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 14)}
    assert challenge.deadline == clock.now_ms() + 10_000 and challenge.log_offset == 0
    clock.advance(250)
    payload = dev.evidence(challenge)
    out = processor.handle_batch([dev.up("evidence", payload)])
    result = one(signer, out, "cam-10", "result")
    assert isinstance(result, AttestationResult)
    assert (result.verdict, result.reasons) == ("trusted", ())
    assert result.expires == clock.now_ms() + 2 * 60_000 + 5_000
    assert result.evidence_sha256 == hashlib.sha256(payload).digest()
    record = repo.device("cam-10")
    assert record is not None and record.state == "trusted" and record.trusted_until == result.expires
    assert record.held_log_size == dev.sim.eventlog_path.stat().st_size
    assert record.boot_reset_count is not None
    [row] = repo.attestations("cam-10")
    assert row.verdict == "trusted" and row.latency_ms == 250
    assert row.evidence_sha256 == result.evidence_sha256
    assert row.challenge_id == challenge.challenge_id
    assert repo.state_history("cam-10")[0].to_state == "trusted"
    assert repo.challenge(challenge.challenge_id).status == "used"  # type: ignore[union-attr]

    # Re-attestation within the boot: the challenge offers the held log; the device sends no log bytes.
    clock.advance(2_000)
    out = processor.handle_batch([dev.up("hello", dev.hello("manual"))])
    second = one(signer, out, "cam-10", "challenge")
    assert second.log_offset == record.held_log_size
    assert second.log_sha256 == hashlib.sha256(dev.sim.eventlog_path.read_bytes()).digest()
    payload = dev.evidence(second)
    evidence = decode_plain(payload, max_size=1 << 20).message
    assert isinstance(evidence, Evidence) and evidence.eventlog == b"" and evidence.eventlog_offset > 0
    out = processor.handle_batch([dev.up("evidence", payload)])
    assert one(signer, out, "cam-10", "result").verdict == "trusted"


def test_tampered_boot_is_untrusted_with_pcr_and_event(
        processor: Processor, repo: Repository, signer: ResultSigner, trusted_device: TrustedFactory) -> None:
    dev = trusted_device("cam-11", "tampered-bootloader")
    result = attest_once(processor, signer, dev)
    assert result.verdict == "untrusted"
    text = " | ".join(result.reasons)
    assert "PCR 4" in text and "EV_EFI_BOOT_SERVICES_APPLICATION" in text, text
    record = repo.device("cam-11")
    assert record is not None and record.state == "untrusted" and record.trusted_until is None
    assert any("PCR 4" in r for r in record.state_reasons)
    change = repo.state_history("cam-11")[0]
    assert (change.from_state, change.to_state) == ("enrolled", "untrusted") and "PCR 4" in change.cause
    # A signed revocation notice waits in the outbox.
    [row] = repo.outbox()
    notice = decode_signed(row.payload, keys={signer.kid: signer.public_key}, aud="cam-11").message
    assert row.topic == topics.device_down("cam-11", "revocation")
    assert isinstance(notice, Revocation) and notice.state == "untrusted" and "PCR 4" in notice.reasons[0]


def test_replayed_and_duplicate_evidence_rejected(
        processor: Processor, repo: Repository, signer: ResultSigner, trusted_device: TrustedFactory,
        clock: ManualClock) -> None:
    dev = trusted_device("cam-12")
    out = processor.handle_batch([dev.up("hello", dev.hello())])
    challenge = one(signer, out, "cam-12", "challenge")
    payload = dev.evidence(challenge)
    assert one(signer, processor.handle_batch([dev.up("evidence", payload)]), "cam-12",
               "result").verdict == "trusted"
    # The very same message again: dropped by message id.
    assert processor.handle_batch([dev.up("evidence", payload)]) == []
    assert processor.counters.get("rejected.duplicate") == 1
    # The same evidence under a new message id: the challenge is single-use.
    assert processor.handle_batch([dev.up("evidence", _reencode(payload, clock))]) == []
    assert processor.counters.get("rejected.challenge_used") == 1
    # Twice in one batch: only the first counts.
    clock.advance(1_500)
    challenge = one(signer, processor.handle_batch([dev.up("hello", dev.hello())]), "cam-12", "challenge")
    payload = dev.evidence(challenge)
    out = processor.handle_batch([dev.up("evidence", payload), dev.up("evidence", _reencode(payload, clock))])
    assert len(replies(signer, out, "cam-12", "result")) == 1
    assert processor.counters.get("rejected.challenge_used") == 2
    assert len(repo.attestations("cam-12")) == 2


def test_evidence_with_wrong_nonce_is_untrusted(
        processor: Processor, repo: Repository, signer: ResultSigner, trusted_device: TrustedFactory) -> None:
    dev = trusted_device("cam-13")
    challenge = one(signer, processor.handle_batch([dev.up("hello", dev.hello())]), "cam-13", "challenge")
    forged = Challenge(challenge_id=challenge.challenge_id, nonce=bytes(32), selection=challenge.selection,
                       deadline=challenge.deadline)
    out = processor.handle_batch([dev.up("evidence", dev.evidence(forged))])
    result = one(signer, out, "cam-13", "result")
    assert result.verdict == "untrusted" and "nonce" in result.reasons[0]
    assert repo.device("cam-13").state == "untrusted"  # type: ignore[union-attr]
    assert repo.challenge(challenge.challenge_id).status == "used"  # type: ignore[union-attr]


def test_late_unknown_and_superseded_challenges_rejected(
        processor: Processor, repo: Repository, signer: ResultSigner, trusted_device: TrustedFactory,
        clock: ManualClock) -> None:
    dev = trusted_device("cam-14")
    first = one(signer, processor.handle_batch([dev.up("hello", dev.hello())]), "cam-14", "challenge")
    # While fresh, asking again re-sends the same challenge (no new nonce).
    again = one(signer, processor.handle_batch([dev.up("hello", dev.hello("reconnect"))]), "cam-14",
                "challenge")
    assert again.challenge_id == first.challenge_id and again.nonce == first.nonce
    first_evidence = dev.evidence(first)
    # Past half its lifetime it is no longer fresh: a new challenge supersedes it.
    clock.advance(6_000)
    second = one(signer, processor.handle_batch([dev.up("hello", dev.hello("reconnect"))]), "cam-14",
                 "challenge")
    assert second.challenge_id != first.challenge_id
    assert processor.handle_batch([dev.up("evidence", first_evidence)]) == []
    assert processor.counters.get("rejected.challenge_superseded") == 1
    # Unknown challenge id.
    unknown = Evidence(challenge_id=new_message_id(), attest=b"\0" * 16, signature=b"\0" * 8, pcrs={},
                       eventlog_offset=0, eventlog=b"")
    assert processor.handle_batch([dev.up("evidence", dev.plain(unknown))]) == []
    assert processor.counters.get("rejected.challenge_unknown") == 1
    # Evidence made in time but received after the deadline.
    late = dev.evidence(second)
    clock.advance(10_001)
    assert processor.handle_batch([dev.up("evidence", late)]) == []
    assert processor.counters.get("rejected.evidence_late") == 1
    record = repo.device("cam-14")
    assert record is not None and record.state == "enrolled" and repo.attestations("cam-14") == []


def test_evidence_on_another_devices_topic_refused(
        processor: Processor, repo: Repository, signer: ResultSigner, trusted_device: TrustedFactory,
        make_device: DeviceFactory, clock: ManualClock) -> None:
    a = trusted_device("cam-15")
    b = trusted_device("cam-16", fresh_tpm=True)
    challenge = one(signer, processor.handle_batch([a.up("hello", a.hello())]), "cam-15", "challenge")
    payload = a.evidence(challenge)
    # B (or whoever holds B's certificate) relays A's evidence on B's topic.
    assert processor.handle_batch([b.up("evidence", payload)]) == []
    assert processor.counters.get("rejected.challenge_wrong_device") == 1
    assert repo.device("cam-16").state == "enrolled"  # type: ignore[union-attr]
    # A's challenge is untouched: A's own answer is still accepted.
    assert one(signer, processor.handle_batch([a.up("evidence", payload)]), "cam-15",
               "result").verdict == "trusted"


def test_malformed_and_oversized_messages_are_counted_and_do_not_stop_the_worker(
        processor: Processor, repo: Repository, signer: ResultSigner, trusted_device: TrustedFactory,
        clock: ManualClock) -> None:
    dev = trusted_device("cam-17")
    hello_topic = topics.device_up("cam-17", "hello")
    bad = [
        InboundMessage(hello_topic, b"not json", 1),
        InboundMessage(hello_topic, b'{"v":1,"type":"attest.request"}', 1),
        InboundMessage(hello_topic, b"{" * 20000, 1),                                  # oversized
        InboundMessage(hello_topic, dev.plain(Evidence(challenge_id="0" * 32, attest=b"\0" * 16,
                                                       signature=b"\0" * 8, pcrs={}, eventlog_offset=0,
                                                       eventlog=b"")), 1),           # wrong type for topic
        InboundMessage("fleet/v1/devices/claim:cam-17/up/hello", dev.hello(), 1),     # claim identity
        InboundMessage(topics.device_up("cam-17", "firmware"), dev.hello(), 1),        # unknown kind
        InboundMessage("fleet/v1/devices/cam-17/down/result", dev.hello(), 1),         # wrong direction
        InboundMessage(hello_topic, encode_plain(AttestRequest(reason="boot"), ts=1).replace(b'"v":1',
                                                                                             b'"v":2'),
                       1),                                                             # wrong version
    ]
    out = processor.handle_batch([*bad, dev.up("hello", dev.hello())])
    assert isinstance(one(signer, out, "cam-17", "challenge"), Challenge)
    counts = processor.counters.snapshot()
    assert counts["rejected.malformed"] == 4       # not JSON, no id, wrong type, wrong version
    assert counts["rejected.oversized"] == 1
    assert counts["rejected.topic_invalid"] == 2   # claim identity on a device topic, down direction
    assert counts["rejected.kind_unknown"] == 1
    assert sum(v for k, v in counts.items() if k.startswith("rejected.")) == len(bad)
    # An evidence message larger than the evidence limit.
    huge = InboundMessage(topics.device_up("cam-17", "evidence"), b" " * (768 * 1024 + 1), 1)
    assert processor.handle_batch([huge]) == []
    assert processor.counters.get("rejected.oversized") == 2


def test_rate_limit_and_revoked_device(
        processor: Processor, repo: Repository, signer: ResultSigner, trusted_device: TrustedFactory,
        clock: ManualClock) -> None:
    dev = trusted_device("cam-18")
    assert attest_once(processor, signer, dev).verdict == "trusted"
    # Right after a challenge was answered, a new one is not issued within request_min_interval.
    assert processor.handle_batch([dev.up("hello", dev.hello("manual"))]) == []
    assert processor.counters.get("rejected.rate_limited") == 1
    # ... but the scheduler is told to challenge it as soon as the limit allows.
    last = repo.attestations("cam-18")[0].issued_at
    assert repo.device("cam-18").next_attestation_at == last + 1_000  # type: ignore[union-attr]
    clock.advance(1_000)
    challenge = one(signer, processor.handle_batch([dev.up("hello", dev.hello("manual"))]), "cam-18",
                    "challenge")
    payload = dev.evidence(challenge)
    transition = admin.revoke_device(repo, "cam-18", signer=signer, now=clock.now_ms(), reason="stolen")
    assert (transition.from_state, transition.to_state) == ("trusted", "revoked")
    # The open challenge was withdrawn; evidence and requests of a revoked device are refused.
    assert processor.handle_batch([dev.up("evidence", payload)]) == []
    clock.advance(5_000)
    assert processor.handle_batch([dev.up("hello", dev.hello("manual"))]) == []
    assert processor.counters.get("rejected.device_revoked") == 2
    record = repo.device("cam-18")
    assert record is not None and record.state == "revoked" and record.state_reasons == ("stolen",)
    assert record.next_attestation_at is None and record.trusted_until is None
    [row] = repo.outbox()
    notice = decode_signed(row.payload, keys={signer.kid: signer.public_key}, aud="cam-18").message
    assert isinstance(notice, Revocation) and (notice.state, notice.reasons) == ("revoked", ("stolen",))


def test_reboot_returns_to_trusted_and_quarantine_holds(
        processor: Processor, repo: Repository, signer: ResultSigner, trusted_device: TrustedFactory,
        clock: ManualClock) -> None:
    dev = trusted_device("cam-19")
    assert attest_once(processor, signer, dev).verdict == "trusted"
    before = repo.device("cam-19")
    assert before is not None
    dev.power_cycle()
    clock.advance(2_000)
    out = processor.handle_batch([dev.up("hello", dev.hello("boot"))])
    challenge = one(signer, out, "cam-19", "challenge")
    assert challenge.log_offset == 0  # announced boot: the held log of the last boot is not offered
    payload = dev.evidence(challenge)
    assert decode_plain(payload, max_size=1 << 20).message.eventlog_offset == 0  # type: ignore[attr-defined]
    assert one(signer, processor.handle_batch([dev.up("evidence", payload)]), "cam-19",
               "result").verdict == "trusted"
    after = repo.device("cam-19")
    assert after is not None and after.boot_reset_count == before.boot_reset_count + 1  # type: ignore[operator]

    # A reboot the server was not told about: the device continues the held log (its new boot's log is
    # byte-identical), the quote shows the reboot, and the server asks again for the whole log instead
    # of judging the device untrusted.
    dev.power_cycle()
    clock.advance(2_000)
    challenge = one(signer, processor.handle_batch([dev.up("hello", dev.hello("reconnect"))]), "cam-19",
                    "challenge")
    assert challenge.log_offset > 0
    payload = dev.evidence(challenge)
    assert decode_plain(payload, max_size=1 << 20).message.eventlog_offset > 0  # type: ignore[attr-defined]
    again = one(signer, processor.handle_batch([dev.up("evidence", payload)]), "cam-19", "challenge")
    assert again.log_offset == 0 and again.challenge_id != challenge.challenge_id
    assert processor.counters.get("challenges.full_log") == 1
    assert one(signer, processor.handle_batch([dev.up("evidence", dev.evidence(again))]), "cam-19",
               "result").verdict == "trusted"
    assert "untrusted" not in [h.to_state for h in repo.state_history("cam-19")]
    assert repo.device("cam-19").boot_reset_count == before.boot_reset_count + 2  # type: ignore[union-attr,operator]

    admin.quarantine_device(repo, "cam-19", signer=signer, now=clock.now_ms(), reason="investigation")
    clock.advance(2_000)
    result = attest_once(processor, signer, dev, "manual")
    assert result.verdict == "untrusted" and result.reasons[0] == "device is quarantined by an administrator"
    assert repo.device("cam-19").state == "quarantined"  # type: ignore[union-attr]


def test_batch_with_a_failing_message_still_serves_the_others(
        processor: Processor, repo: Repository, signer: ResultSigner, trusted_device: TrustedFactory,
        clock: ManualClock) -> None:
    a, b = trusted_device("cam-20"), trusted_device("cam-21", fresh_tpm=True)
    challenges = [one(signer, processor.handle_batch([d.up("hello", d.hello())]), d.id, "challenge")
                  for d in (a, b)]
    payloads = [d.evidence(c) for d, c in zip((a, b), challenges, strict=True)]
    # Make every write about cam-20's attestation fail (a stand-in for any unexpected database error).
    postgres = repo.engine.dialect.name == "postgresql"
    with repo.write() as tx:
        if postgres:
            tx.conn.exec_driver_sql(
                "CREATE FUNCTION fail_cam20() RETURNS trigger AS $$ BEGIN IF NEW.device_id = 'cam-20' THEN "
                "RAISE EXCEPTION 'injected'; END IF; RETURN NEW; END $$ LANGUAGE plpgsql")
            tx.conn.exec_driver_sql("CREATE TRIGGER fail_cam20 BEFORE INSERT ON attestation FOR EACH ROW "
                                    "EXECUTE FUNCTION fail_cam20()")
        else:
            tx.conn.exec_driver_sql("CREATE TRIGGER fail_cam20 BEFORE INSERT ON attestation "
                                    "WHEN NEW.device_id = 'cam-20' "
                                    "BEGIN SELECT RAISE(ABORT, 'injected'); END")
    out = processor.handle_batch([a.up("evidence", payloads[0]), b.up("evidence", payloads[1])])
    # The batch transaction failed; each message was retried alone: cam-21 is served, cam-20 is not.
    assert replies(signer, out, "cam-20", "result") == []
    assert one(signer, out, "cam-21", "result").verdict == "trusted"
    assert processor.counters.get("batch.retried") == 1
    assert processor.counters.get("rejected.internal_error") == 1
    assert repo.device("cam-21").state == "trusted"  # type: ignore[union-attr]
    assert repo.device("cam-20").state == "enrolled"  # type: ignore[union-attr]
    assert repo.challenge(challenges[0].challenge_id).status == "open"  # type: ignore[union-attr]
    # The worker keeps serving: with the fault gone cam-20's evidence is accepted.
    with repo.write() as tx:
        tx.conn.exec_driver_sql("DROP TRIGGER fail_cam20" + (" ON attestation" if postgres else ""))
    out = processor.handle_batch([a.up("evidence", _reencode(payloads[0], clock))])
    assert one(signer, out, "cam-20", "result").verdict == "trusted"


def test_a_batch_of_requests_from_several_devices(
        processor: Processor, repo: Repository, signer: ResultSigner, trusted_device: TrustedFactory,
        clock: ManualClock) -> None:
    a, b = trusted_device("cam-22"), trusted_device("cam-23", fresh_tpm=True)
    out = processor.handle_batch([a.up("hello", a.hello()), b.up("hello", b.hello()),
                                  a.up("hello", a.hello())])
    first, again = replies(signer, out, "cam-22", "challenge")
    assert isinstance(first, Challenge) and isinstance(again, Challenge)
    assert first.challenge_id == again.challenge_id  # asked twice in one batch: one challenge
    other = one(signer, out, "cam-23", "challenge")
    assert [c.id for c in repo.open_challenges("cam-22")] == [first.challenge_id]
    assert [c.id for c in repo.open_challenges("cam-23")] == [other.challenge_id]
    payloads = [a.evidence(first), b.evidence(other)]
    out = processor.handle_batch([a.up("evidence", payloads[0]), b.up("evidence", payloads[1])])
    assert one(signer, out, "cam-22", "result").verdict == "trusted"
    assert one(signer, out, "cam-23", "result").verdict == "trusted"


def test_tpm_clock_going_backwards_is_untrusted(
        processor: Processor, repo: Repository, signer: ResultSigner, trusted_device: TrustedFactory,
        clock: ManualClock) -> None:
    dev = trusted_device("cam-24")
    assert attest_once(processor, signer, dev).verdict == "trusted"
    record = repo.device("cam-24")
    assert record is not None and record.boot_reset_count is not None
    # The server saw a later TPM state than the TPM now reports (its state was rolled back, e.g. a
    # restored snapshot): simulate by raising the held resetCount.
    with repo.write() as tx:
        tx.update_device("cam-24", {"boot_reset_count": record.boot_reset_count + 5})
    clock.advance(2_000)
    result = attest_once(processor, signer, dev, "manual")
    assert result.verdict == "untrusted" and "resetCount" in result.reasons[0]
    assert repo.device("cam-24").state == "untrusted"  # type: ignore[union-attr]
    # The high-water mark is kept: the device cannot come back by simply attesting again.
    assert repo.device("cam-24").boot_reset_count == record.boot_reset_count + 5  # type: ignore[union-attr]


# --------------------------------------------------------------------------------------------------
# held states: enrolling again changes nothing (issue 9)
# --------------------------------------------------------------------------------------------------
HELD = ("quarantined", "revoked", "untrusted")


def _hold(state: str, device_id: str, processor: Processor, repo: Repository, signer: ResultSigner,
          trusted_device: TrustedFactory, clock: ManualClock) -> SimDevice:
    dev = trusted_device(device_id, "tampered-bootloader" if state == "untrusted" else "golden")
    assert attest_once(processor, signer, dev).verdict == ("untrusted" if state == "untrusted" else "trusted")
    if state == "quarantined":
        admin.quarantine_device(repo, device_id, signer=signer, now=clock.now_ms(), reason="investigation")
    elif state == "revoked":
        admin.revoke_device(repo, device_id, signer=signer, now=clock.now_ms(), reason="stolen")
    assert repo.device(device_id).state == state  # type: ignore[union-attr]
    return dev


@pytest.mark.parametrize("state", HELD)
@pytest.mark.parametrize("new_ak", [False, True], ids=["claim-cert", "new-ak"])
def test_held_device_cannot_reenroll_and_stays_held_across_reboot(
        state: str, new_ak: bool, processor: Processor, repo: Repository, signer: ResultSigner,
        trusted_device: TrustedFactory, fleet_pki: BrokerPki, clock: ManualClock,
        caplog: pytest.LogCaptureFixture) -> None:
    dev = _hold(state, "held-1", processor, repo, signer, trusted_device, clock)
    before = repo.device("held-1")
    assert before is not None
    history = [(h.from_state, h.to_state) for h in repo.state_history("held-1")]
    clock.advance(2_000)
    if new_ak:
        dev.new_ak()
    out = processor.handle_batch([dev.enroll_up("request", dev.enroll_request())])
    assert replies(signer, out, "held-1", "challenge") == []  # no MakeCredential, no session
    result = one(signer, out, "held-1", "result")
    assert result.status == "rejected" and result.device_cert is None
    assert f"held-1 is {state}: enrolling again cannot" in result.reasons[0], result.reasons
    assert processor.counters.get("rejected.enroll_held") == 1
    assert "reason=enroll_held" in caplog.text
    after = repo.device("held-1")
    assert after is not None and after.state == state
    assert after.cert_serial == before.cert_serial
    identity = repo.device_identity("held-1")
    assert identity is not None and identity.ak_public != (dev.tpm.ak_public if new_ak else b"")
    assert [(h.from_state, h.to_state) for h in repo.state_history("held-1")] == history

    # Rebooting (into a good boot) and asking for a challenge do not lift an admin's hold either; for
    # untrusted, good evidence from the enrolled AK is the way back (as the design says).
    if new_ak:
        return  # the AK is gone: the device cannot attest until an admin acts
    dev.power_cycle("golden")
    clock.advance(2_000)
    if state == "revoked":
        assert processor.handle_batch([dev.up("hello", dev.hello("boot"))]) == []
        assert processor.counters.get("rejected.device_revoked") == 1
    else:
        verdict = attest_once(processor, signer, dev).verdict
        assert verdict == ("untrusted" if state == "quarantined" else "trusted")
        assert repo.device("held-1").state == ("quarantined" if state == "quarantined" else "trusted")  # type: ignore[union-attr]
        return
    assert repo.device("held-1").state == "revoked"  # type: ignore[union-attr]
    # Only an admin lifts it.
    admin.approve_device(repo, "held-1", signer=signer, fleet_ca=fleet_pki.load_ca(), now=clock.now_ms())
    clock.advance(2_000)
    assert attest_once(processor, signer, dev).verdict == "trusted"


@pytest.mark.parametrize("state", HELD)
def test_proof_after_the_device_was_held_earns_nothing(
        state: str, processor: Processor, repo: Repository, signer: ResultSigner,
        trusted_device: TrustedFactory, clock: ManualClock) -> None:
    """A request challenged while the device was trusted, proved after it was held."""
    dev = trusted_device("held-2")
    assert attest_once(processor, signer, dev).verdict == "trusted"
    serial = repo.device("held-2").cert_serial  # type: ignore[union-attr]
    challenge = one(signer, processor.handle_batch([dev.enroll_up("request", dev.enroll_request())]),
                    "held-2", "challenge")
    clock.advance(2_000)
    if state == "untrusted":
        dev.power_cycle("tampered-bootloader")
        assert attest_once(processor, signer, dev).verdict == "untrusted"
    elif state == "quarantined":
        admin.quarantine_device(repo, "held-2", signer=signer, now=clock.now_ms())
    else:
        admin.revoke_device(repo, "held-2", signer=signer, now=clock.now_ms())
    out = processor.handle_batch([dev.enroll_up("proof", dev.enroll_proof(challenge))])
    result = one(signer, out, "held-2", "result")
    assert result.status == "rejected" and result.device_cert is None
    assert f"held-2 is {state}" in result.reasons[0]
    assert processor.counters.get("rejected.enroll_held") == 1
    record = repo.device("held-2")
    assert record is not None and record.state == state and record.cert_serial == serial


@pytest.mark.parametrize("state", HELD)
def test_an_admins_lift_lets_a_held_device_that_lost_its_ak_enroll_again(
        state: str, processor: Processor, repo: Repository, signer: ResultSigner,
        trusted_device: TrustedFactory, fleet_pki: BrokerPki, clock: ManualClock) -> None:
    """``approve`` (or ``unquarantine``) lifts every held state, ``untrusted`` included; the device is
    then only ``enrolled``: a new AK enrolls, and trust comes from good evidence alone."""
    dev = _hold(state, "held-3", processor, repo, signer, trusted_device, clock)
    dev.new_ak()
    clock.advance(2_000)
    assert enroll_rejected(processor, signer, dev)
    lift = admin.unquarantine_device if state == "quarantined" else admin.approve_device
    transition = lift(repo, "held-3", signer=signer, fleet_ca=fleet_pki.load_ca(), now=clock.now_ms())
    assert (transition.from_state, transition.to_state) == (state, "enrolled")
    clock.advance(2_000)
    assert enroll(processor, signer, dev).status == "admitted"  # EK pre-registered: admitted at once
    record = repo.device("held-3")
    assert record is not None and record.state == "enrolled" and record.trusted_until is None
    identity = repo.device_identity("held-3")
    assert identity is not None and identity.ak_public == dev.tpm.ak_public
    clock.advance(2_000)
    # Untrusted boot stays untrusted: lifting the hold is no verdict.
    assert attest_once(processor, signer, dev).verdict == ("untrusted" if state == "untrusted" else "trusted")


def enroll_rejected(processor: Processor, signer: ResultSigner, dev: SimDevice) -> bool:
    out = processor.handle_batch([dev.enroll_up("request", dev.enroll_request())])
    return bool(one(signer, out, dev.id, "result").status == "rejected")
