"""agent.trust: every way a server message can fail verification, de-duplication bounds, the verdict."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from agent.trust import (
    Channel,
    MessageVerifier,
    ReplayedMessageError,
    StaleMessageError,
    TrustState,
    load_signing_keys,
)
from fleet_server import pki
from protocol import topics
from protocol.errors import ConfigError, EdgeError, MessageError, SignatureError
from protocol.messages import (
    AttestationResult,
    Challenge,
    EnrollChallenge,
    EnrollResult,
    Envelope,
    Message,
    Revocation,
    encode_signed,
    key_id,
    new_message_id,
)
from protocol.topics import TopicError

DEVICE = "cam-0001"
NOW = 1_790_000_000.0
NOW_MS = int(NOW * 1000)
SKEW = 60.0

SERVER_KEY = ec.generate_private_key(ec.SECP256R1())
KID = key_id(SERVER_KEY.public_key())
KEYS = {KID: SERVER_KEY.public_key()}
OTHER_KEY = ec.generate_private_key(ec.SECP256R1())

CHALLENGE = Challenge(challenge_id="c" * 32, nonce=b"\x01" * 32, selection={"sha256": (0, 7)},
                      deadline=NOW_MS + 30_000)
RESULT = AttestationResult(challenge_id="c" * 32, verdict="trusted", reasons=(), expires=NOW_MS + 600_000,
                           evidence_sha256=b"\x02" * 32)
REVOCATION = Revocation(state="revoked", reasons=("admin",))
ENROLL_CHALLENGE = EnrollChallenge(request_id="d" * 32, credential_blob=b"\x00\x04abcd",
                                   encrypted_secret=b"\x00\x04efgh")


def signed(msg: Message, *, aud: str = DEVICE, ts: int = NOW_MS, key: ec.EllipticCurvePrivateKey = SERVER_KEY,
           kid: str = KID, msg_id: str | None = None) -> bytes:
    return encode_signed(msg, key=key, kid=kid, aud=aud, ts=ts, msg_id=msg_id)


def down(kind: str) -> str:
    return topics.device_down(DEVICE, kind)


def verifier(**kw: int) -> MessageVerifier:
    return MessageVerifier(KEYS, max_skew=SKEW, **kw)


def tamper_signature(data: bytes) -> bytes:
    outer = json.loads(data)
    sig = bytearray(base64.b64decode(outer["sig"]))
    sig[5] ^= 1
    outer["sig"] = base64.b64encode(bytes(sig)).decode()
    return json.dumps(outer).encode()


def tamper_payload(data: bytes) -> bytes:
    outer = json.loads(data)
    payload = base64.b64decode(outer["payload"]).replace(b'"revoked"', b'"untrusted"')
    outer["payload"] = base64.b64encode(payload).decode()
    return json.dumps(outer).encode()


def test_a_good_message_verifies_and_decodes() -> None:
    env = verifier().verify(Channel.device(DEVICE), down("challenge"), signed(CHALLENGE), now=NOW)
    assert isinstance(env, Envelope) and env.message == CHALLENGE and env.aud == DEVICE and env.ts == NOW_MS


REFUSALS: list[tuple[str, str, Callable[[], bytes], type[EdgeError], str]] = [
    ("bad signature", "revocation", lambda: tamper_signature(signed(REVOCATION)), SignatureError,
     "does not verify"),
    ("tampered payload", "revocation", lambda: tamper_payload(signed(REVOCATION)), SignatureError,
     "does not verify"),
    ("unknown key", "revocation",
     lambda: signed(REVOCATION, key=OTHER_KEY, kid=key_id(OTHER_KEY.public_key())), SignatureError,
     "unknown key"),
    ("pinned kid, other key", "revocation", lambda: signed(REVOCATION, key=OTHER_KEY), SignatureError,
     "does not verify"),
    ("other device's aud", "revocation", lambda: signed(REVOCATION, aud="cam-0002"), MessageError,
     "addressed to 'cam-0002'"),
    ("claim aud on device channel", "challenge", lambda: signed(CHALLENGE, aud=topics.claim_identity(DEVICE)),
     MessageError, "addressed to"),
    ("stale", "result", lambda: signed(RESULT, ts=NOW_MS - int(SKEW * 1000) - 1), StaleMessageError,
     "too old"),
    ("from the future", "result", lambda: signed(RESULT, ts=NOW_MS + int(SKEW * 1000) + 1), StaleMessageError,
     "too far in the future"),
    ("revocation on the challenge topic", "challenge", lambda: signed(REVOCATION), MessageError,
     "unexpected message type 'revocation'"),
    ("challenge on the result topic", "result", lambda: signed(CHALLENGE), MessageError,
     "unexpected message type 'challenge'"),
    ("enrollment message on a device topic", "challenge", lambda: signed(ENROLL_CHALLENGE), MessageError,
     "unexpected message type 'enroll.challenge'"),
    ("unknown topic kind", "telemetry", lambda: signed(REVOCATION), MessageError,
     "no server message is expected"),
    ("not JSON", "result", lambda: b"\xff\xfe", MessageError, "not UTF-8"),
    ("oversized", "result", lambda: b" " * (64 * 1024 + 1), MessageError, "exceeds the limit"),
]


@pytest.mark.parametrize(("case", "kind", "payload", "error", "match"), REFUSALS,
                         ids=[r[0] for r in REFUSALS])
def test_refusals(case: str, kind: str, payload: Callable[[], bytes], error: type[EdgeError],
                  match: str) -> None:
    v = verifier()
    with pytest.raises(error, match=match):
        v.verify(Channel.device(DEVICE), down(kind), payload(), now=NOW)
    assert v.remembered == 0  # a refused message is never remembered


@pytest.mark.parametrize("topic", [
    topics.device_down("cam-0002", "challenge"),  # another device's topic
    topics.device_up(DEVICE, "evidence"),          # an up topic
    topics.enroll_down(DEVICE, "challenge"),       # the enrollment subtree
    "fleet/v1/devices/cam-0001/down",
])
def test_topics_outside_the_channel_are_refused(topic: str) -> None:
    with pytest.raises(TopicError):
        verifier().verify(Channel.device(DEVICE), topic, signed(CHALLENGE), now=NOW)


def test_the_freshness_window_is_inclusive() -> None:
    v = verifier()
    for ts in (NOW_MS - int(SKEW * 1000), NOW_MS + int(SKEW * 1000)):
        v.verify(Channel.device(DEVICE), down("result"), signed(RESULT, ts=ts), now=NOW)


def test_duplicate_message_id_is_refused_and_a_forgery_cannot_burn_an_id() -> None:
    v = verifier()
    msg_id = new_message_id()
    good = signed(REVOCATION, msg_id=msg_id)
    with pytest.raises(SignatureError):  # a forged copy with the id of the genuine message
        v.verify(Channel.device(DEVICE), down("revocation"), tamper_signature(good), now=NOW)
    v.verify(Channel.device(DEVICE), down("revocation"), good, now=NOW)
    with pytest.raises(ReplayedMessageError, match="already received"):
        v.verify(Channel.device(DEVICE), down("revocation"), good, now=NOW + 1)
    # The same id re-signed with a new timestamp is still a duplicate.
    with pytest.raises(ReplayedMessageError):
        v.verify(Channel.device(DEVICE), down("revocation"), signed(REVOCATION, msg_id=msg_id, ts=NOW_MS + 5),
                 now=NOW + 1)


def test_ids_are_forgotten_once_outside_the_window_where_freshness_takes_over() -> None:
    v = verifier()
    msg = signed(RESULT)
    v.verify(Channel.device(DEVICE), down("result"), msg, now=NOW)
    assert v.remembered == 1
    later = NOW + SKEW + 1
    with pytest.raises(StaleMessageError):
        v.verify(Channel.device(DEVICE), down("result"), msg, now=later)
    v.verify(Channel.device(DEVICE), down("result"), signed(RESULT, ts=int(later * 1000)), now=later)
    assert v.remembered == 1  # the first id was dropped


def test_the_memory_bound_never_opens_a_replay() -> None:
    v = verifier(max_remembered=2)
    msgs = [signed(REVOCATION, ts=NOW_MS + i) for i in range(3)]
    for m in msgs:
        v.verify(Channel.device(DEVICE), down("revocation"), m, now=NOW)
    assert v.remembered == 2
    # The oldest id was forgotten early: its replay (and anything not newer) is still refused.
    with pytest.raises(ReplayedMessageError, match="older than"):
        v.verify(Channel.device(DEVICE), down("revocation"), msgs[0], now=NOW)
    with pytest.raises(ReplayedMessageError):
        v.verify(Channel.device(DEVICE), down("revocation"), signed(REVOCATION, ts=NOW_MS - 10), now=NOW)
    v.verify(Channel.device(DEVICE), down("revocation"), signed(REVOCATION, ts=NOW_MS + 10), now=NOW)


def test_enrollment_channel() -> None:
    v = verifier()
    claim = topics.claim_identity(DEVICE)
    channel = Channel.enroll(DEVICE)
    assert channel.subscription == topics.enroll_down_filter(DEVICE)
    assert Channel.device(DEVICE).subscription == topics.device_down_filter(DEVICE)
    got = v.verify(channel, topics.enroll_down(DEVICE, "challenge"), signed(ENROLL_CHALLENGE, aud=claim),
                   now=NOW)
    assert got.message == ENROLL_CHALLENGE
    result = EnrollResult(request_id="d" * 32, status="pending")
    got = v.verify(channel, topics.enroll_down(DEVICE, "result"), signed(result, aud=claim), now=NOW)
    assert got.message == result
    with pytest.raises(MessageError, match="addressed to"):  # device aud on the claim channel
        v.verify(channel, topics.enroll_down(DEVICE, "result"), signed(result), now=NOW)
    with pytest.raises(MessageError, match="unexpected message type 'challenge'"):
        v.verify(channel, topics.enroll_down(DEVICE, "challenge"), signed(CHALLENGE, aud=claim), now=NOW)
    with pytest.raises(MessageError, match="no server message"):  # no revocations during enrollment
        v.verify(channel, topics.enroll_down(DEVICE, "revocation"), signed(REVOCATION, aud=claim), now=NOW)
    with pytest.raises(TopicError):
        v.verify(channel, down("challenge"), signed(CHALLENGE, aud=claim), now=NOW)


def test_verifier_arguments() -> None:
    with pytest.raises(ConfigError):
        MessageVerifier({}, max_skew=1)
    with pytest.raises(ConfigError):
        MessageVerifier(KEYS, max_skew=0)


# -- the pinned key file ---------------------------------------------------------------------------
def test_load_signing_keys(tmp_path: Path) -> None:
    pub = tmp_path / "server.pub.pem"
    pub.write_bytes(SERVER_KEY.public_key().public_bytes(serialization.Encoding.PEM,
                                                         serialization.PublicFormat.SubjectPublicKeyInfo))
    assert load_signing_keys(pub) == {KID: SERVER_KEY.public_key()}

    ca = pki.create_ca(now=time.time())  # a certificate holding the key is accepted too
    cert = tmp_path / "ca.pem"
    cert.write_bytes(ca.cert_pem)
    assert list(load_signing_keys(cert)) == [key_id(ca.key.public_key())]

    rsa_pub = tmp_path / "rsa.pem"
    rsa_pub.write_bytes(rsa.generate_private_key(65537, 2048).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    p384 = tmp_path / "p384.pem"
    p384.write_bytes(ec.generate_private_key(ec.SECP384R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key")
    for path, match in ((rsa_pub, "not an ECDSA P-256"), (p384, "not an ECDSA P-256"),
                        (garbage, "no PEM public key"), (tmp_path / "missing.pem", "cannot read")):
        with pytest.raises(ConfigError, match=f"^server.signing_public_key: .*{match}"):
            load_signing_keys(path)


# -- the verdict -----------------------------------------------------------------------------------
def env(msg: Message, ts: int) -> Envelope:
    return Envelope(type=msg.TYPE, id=new_message_id(), ts=ts, message=msg, raw=b"", aud=DEVICE)


def result(verdict: str, expires: int, challenge_id: str = "c" * 32) -> AttestationResult:
    reasons = () if verdict == "trusted" else ("r",)
    return AttestationResult(challenge_id=challenge_id, verdict=verdict, reasons=reasons, expires=expires,
                             evidence_sha256=b"\x00" * 32)


def test_trusted_until_expiry_only() -> None:
    state = TrustState()
    assert state.verdict.state == "unknown" and not state.trusted(NOW)
    assert state.apply(env(result("trusted", NOW_MS + 10_000), NOW_MS))
    assert state.trusted(NOW) and state.trusted(NOW + 9.999)
    assert not state.trusted(NOW + 10)  # expired: no longer trusted, without any message
    assert state.verdict.trusted_until == NOW + 10


def test_untrusted_and_out_of_order_results() -> None:
    state = TrustState()
    state.apply(env(result("untrusted", NOW_MS + 10_000), NOW_MS))
    assert not state.trusted(NOW) and state.verdict.trusted_until is None and state.verdict.reasons == ("r",)
    # An older result arriving late does not override a newer one.
    assert not state.apply(env(result("trusted", NOW_MS + 10_000), NOW_MS - 1))
    assert state.verdict.state == "untrusted"
    assert state.apply(env(result("trusted", NOW_MS + 10_000), NOW_MS + 1))
    assert state.trusted(NOW)


def test_revocation_ends_trust_and_wins_a_tie() -> None:
    state = TrustState()
    state.apply(env(result("trusted", NOW_MS + 10_000), NOW_MS))
    assert state.apply(env(REVOCATION, NOW_MS))  # same server time: the revocation wins
    assert not state.trusted(NOW) and state.verdict.state == "revoked" and state.verdict.revoked
    assert not state.apply(env(result("trusted", NOW_MS + 10_000), NOW_MS))  # same time: still revoked
    assert not state.apply(env(Revocation(state="untrusted", reasons=()), NOW_MS - 5))  # older: ignored
    assert state.verdict.state == "revoked"
    assert state.apply(env(result("trusted", NOW_MS + 10_000), NOW_MS + 1))  # re-approved and attested
    assert state.trusted(NOW)
    with pytest.raises(MessageError):
        state.apply(env(CHALLENGE, NOW_MS + 2))
