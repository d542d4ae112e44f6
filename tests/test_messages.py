"""Wire messages: canonical encoding, strict decoding, signatures over received bytes."""

from __future__ import annotations

import base64
import contextlib
import json
import os

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.encoding import canonical_bytes, decode_object
from protocol.errors import MessageError, SignatureError
from protocol.messages import (
    MAX_EVIDENCE_MESSAGE,
    REGISTRY,
    AttestationResult,
    AttestRequest,
    Challenge,
    ClientUsage,
    EnrollChallenge,
    EnrollProof,
    EnrollRequest,
    EnrollResult,
    Evidence,
    Fields,
    KeyDenied,
    KeyRelease,
    KeyRequest,
    ModelChunk,
    ModelFetch,
    ModelLoad,
    ModelOffer,
    ModelPolicy,
    ModelRef,
    ModelStatus,
    Revocation,
    Telemetry,
    TufChunk,
    TufFetch,
    UpdateAssignment,
    UpdateStatus,
    decode_chunk,
    decode_plain,
    decode_signed,
    decode_tuf_chunk,
    encode_chunk,
    encode_plain,
    encode_signed,
    encode_tuf_chunk,
    enroll_proof,
    key_id,
    new_message_id,
)

KEY = ec.generate_private_key(ec.SECP256R1())
KID = key_id(KEY.public_key())
KEYS = {KID: KEY.public_key()}


def samples() -> list[object]:
    rid = new_message_id()
    return [
        EnrollRequest(ek_cert=os.urandom(700), ek_public=os.urandom(300), ak_public=os.urandom(90),
                      csr=os.urandom(300), device_class="edge-cam", firmware_version="1.2.0"),
        EnrollChallenge(request_id=rid, credential_blob=os.urandom(70), encrypted_secret=os.urandom(258)),
        EnrollProof(request_id=rid, proof=enroll_proof(os.urandom(32), rid)),
        EnrollResult(request_id=rid, status="admitted", reasons=(), device_cert=os.urandom(500)),
        EnrollResult(request_id=rid, status="pending", reasons=("awaiting admin approval",)),
        AttestRequest(reason="boot", agent_version="0.1.0"),
        Challenge(challenge_id=rid, nonce=os.urandom(32), selection={"sha256": (0, 1, 7)},
                  deadline=1_790_000_000_000, log_offset=1234, log_sha256=os.urandom(32)),
        Evidence(challenge_id=rid, attest=os.urandom(145), signature=os.urandom(72),
                 pcrs={"sha256": {0: os.urandom(32), 7: os.urandom(32)}}, eventlog_offset=0,
                 eventlog=os.urandom(5000)),
        AttestationResult(challenge_id=rid, verdict="untrusted", reasons=("PCR 4: event 12 differs",),
                          expires=1_790_000_060_000, evidence_sha256=os.urandom(32)),
        Revocation(state="revoked", reasons=("revoked by admin",)),
        ModelOffer(models=(ModelRef(name="cam-detector", version="1.2.0", size=1234,
                                    package_sha256=os.urandom(32)),)),
        ModelFetch(name="cam-detector", version="1.2.0", offset=0, length=262144),
        KeyRequest(name="cam-detector", version="1.2.0", key_public=os.urandom(280),
                   certify_attest=os.urandom(150), certify_signature=os.urandom(72)),
        KeyRelease(name="cam-detector", version="1.2.0", key_name=os.urandom(34), wrapped_key=os.urandom(256),
                   lease_id=rid, lease_expires=1_790_000_060_000,
                   policy=ModelPolicy(output_mode="topk", k=2, labels=("cat", "dog"),
                                      device_daily_quota=1000)),
        KeyDenied(name="cam-detector", version="1.2.0", reasons=("device is not trusted",)),
        Telemetry(name="cam-detector", version="1.2.0", since=1, until=2, served=10, refused=1,
                  clients=(ClientUsage(client="app-1", served=10, refused=1, statistic=0.912345,
                                       alarm=True),)),
        AttestationResult(challenge_id=rid, verdict="trusted", reasons=(), expires=1_790_000_060_000,
                          evidence_sha256=os.urandom(32), release="firmware/edge-camera/1.3.0.fwb"),
        UpdateAssignment(assignment_id=rid, kind="firmware", target="firmware/edge-camera/1.3.0.fwb",
                         version="1.3.0", deadline=1_790_000_600_000),
        UpdateStatus(assignment_id=rid, target="firmware/edge-camera/1.3.0.fwb", state="rolled_back",
                     from_version="1.2.0", to_version="1.3.0", reason="verdict untrusted: PCR 0 differs"),
        TufFetch(request_id=rid, path="metadata/2.root.json", offset=0, length=65536),
        ModelStatus(runtime="1.31.1"),
        ModelStatus(runtime="1.31.1", models=(
            ModelLoad(name="cam-detector", version="1.2.0", state="loaded"),
            ModelLoad(name="cam-detector", version="1.3.0", state="failed",
                      error="Unsupported model IR version: 14, max supported IR version: 13"))),
    ]


@pytest.mark.parametrize("msg", samples(), ids=lambda m: type(m).__name__)
def test_plain_round_trip_is_canonical(msg: object) -> None:
    raw = encode_plain(msg, ts=1, msg_id="0" * 32)  # type: ignore[arg-type]
    env = decode_plain(raw, max_size=MAX_EVIDENCE_MESSAGE)
    assert env.message == msg and env.raw == raw and env.ts == 1
    # canonical: re-encoding the decoded JSON yields the same bytes
    assert canonical_bytes(json.loads(raw)) == raw


@pytest.mark.parametrize("msg", samples(), ids=lambda m: type(m).__name__)
def test_signed_round_trip(msg: object) -> None:
    raw = encode_signed(msg, key=KEY, kid=KID, aud="dev-1", ts=5)  # type: ignore[arg-type]
    env = decode_signed(raw, keys=KEYS, aud="dev-1", max_size=MAX_EVIDENCE_MESSAGE)
    assert env.message == msg and env.aud == "dev-1"


def _signed_obj() -> dict[str, object]:
    raw = encode_signed(Revocation(state="revoked", reasons=("x",)), key=KEY, kid=KID, aud="dev-1", ts=5)
    return json.loads(raw)


def test_signed_wrong_audience_refused() -> None:
    raw = encode_signed(Revocation(state="revoked", reasons=()), key=KEY, kid=KID, aud="dev-1", ts=5)
    with pytest.raises(MessageError, match="addressed to"):
        decode_signed(raw, keys=KEYS, aud="dev-2")


def test_signed_tampered_payload_refused() -> None:
    obj = _signed_obj()
    payload = bytearray(base64.b64decode(obj["payload"]))  # type: ignore[arg-type]
    payload[payload.index(b"revoked")] ^= 0x20
    obj["payload"] = base64.b64encode(bytes(payload)).decode()
    with pytest.raises(SignatureError):
        decode_signed(json.dumps(obj).encode(), keys=KEYS, aud="dev-1")


def test_signed_unknown_key_refused() -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    raw = encode_signed(Revocation(state="revoked", reasons=()), key=other, kid=key_id(other.public_key()),
                        aud="dev-1", ts=5)
    with pytest.raises(SignatureError, match="unknown key"):
        decode_signed(raw, keys=KEYS, aud="dev-1")


def test_signed_with_right_kid_but_wrong_key_refused() -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    raw = encode_signed(Revocation(state="revoked", reasons=()), key=other, kid=KID, aud="dev-1", ts=5)
    with pytest.raises(SignatureError):
        decode_signed(raw, keys=KEYS, aud="dev-1")


def test_signature_covers_bytes_not_reserialization() -> None:
    # A payload whose JSON is equivalent but whose bytes differ (whitespace) must fail.
    obj = _signed_obj()
    payload = base64.b64decode(obj["payload"])  # type: ignore[arg-type]
    obj["payload"] = base64.b64encode(payload.replace(b",", b", ", 1)).decode()
    with pytest.raises(SignatureError):
        decode_signed(json.dumps(obj).encode(), keys=KEYS, aud="dev-1")


def _plain(body: dict[str, object], mtype: str = "attest.request", **env: object) -> bytes:
    obj: dict[str, object] = {"v": 1, "type": mtype, "id": "a" * 32, "ts": 1, "body": body}
    obj.update(env)
    return json.dumps(obj).encode()


GOOD_HELLO = {"reason": "boot", "agent_version": "1"}


@pytest.mark.parametrize(("raw", "match"), [
    (b"", "not valid JSON"),
    (b"[]", "must be a JSON object"),
    (b"\xff\xfe", "not UTF-8"),
    (b'{"a": 1, "a": 2}', "duplicate key"),
    (b'{"a": 1.5}', "floats"),
    (b'{"a": NaN}', "not allowed"),
    (b"[" * 5000 + b"]" * 5000, "nests too deeply|must be a JSON object"),
    (_plain(GOOD_HELLO, v=2), "unsupported version"),
    (_plain(GOOD_HELLO, id="xyz"), "invalid value"),
    (_plain(GOOD_HELLO, mtype="nope"), "unexpected message type"),
    (_plain({**GOOD_HELLO, "extra": 1}), "unknown field"),
    (_plain({"reason": "bogus", "agent_version": "1"}), "must be one of"),
    (_plain({"reason": "boot"}), "missing"),
    (_plain({"reason": 5, "agent_version": "1"}), "expected a string"),
    (_plain(GOOD_HELLO, ts=True), "expected an integer"),
    (_plain(GOOD_HELLO, ts=-1), "out of range"),
    (b'{"x": "' + b"a" * 20000 + b'"}', "exceeds the limit"),
])
def test_plain_malformed_refused(raw: bytes, match: str) -> None:
    with pytest.raises(MessageError, match=match):
        decode_plain(raw)


def test_type_not_allowed_on_this_topic() -> None:
    raw = encode_plain(AttestRequest(reason="boot"), ts=1)
    with pytest.raises(MessageError, match="unexpected message type"):
        decode_plain(raw, allowed=[Evidence])


@pytest.mark.parametrize(("pcrs", "match"), [
    ({"md5": {"0": "00" * 16}}, "unknown PCR bank"),
    ({"sha256": {"24": "00" * 32}}, "invalid PCR index"),
    ({"sha256": {"0": "00" * 20}}, "expected 32 bytes"),
    ({"sha256": {"0": "zz" * 32}}, "invalid hex"),
    ({"sha256": []}, "expected an object"),
])
def test_evidence_pcr_values_validated(pcrs: object, match: str) -> None:
    body = Evidence(challenge_id="b" * 32, attest=b"a" * 20, signature=b"s" * 20, pcrs={},
                    eventlog_offset=0, eventlog=b"").body()
    body["pcrs"] = pcrs
    with pytest.raises(MessageError, match=match):
        decode_plain(_plain(body, mtype="evidence"), max_size=MAX_EVIDENCE_MESSAGE)


def test_nonce_must_be_32_bytes() -> None:
    body = Challenge(challenge_id="b" * 32, nonce=b"n" * 32, selection={"sha256": (0,)}, deadline=1).body()
    body["nonce"] = base64.b64encode(b"n" * 16).decode()
    with pytest.raises(MessageError, match="nonce"):
        decode_plain(_plain(body, mtype="challenge"))


def test_base64_strict() -> None:
    body = EnrollProof(request_id="c" * 32, proof=b"p" * 32).body()
    body["proof"] = "cHJvb2Y=\n"
    with pytest.raises(MessageError, match="base64"):
        decode_plain(_plain(body, mtype="enroll.proof"))


def test_registry_has_every_type() -> None:
    assert {type(m).TYPE for m in samples()} == set(REGISTRY)


@settings(max_examples=2000, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400) | st.text(max_size=400).map(str.encode))
def test_decode_never_raises_anything_else(data: bytes) -> None:
    for decode in (lambda d: decode_plain(d), lambda d: decode_signed(d, keys=KEYS, aud="dev-1")):
        with contextlib.suppress(MessageError, SignatureError):
            decode(data)


@settings(max_examples=1000, deadline=None, derandomize=True, database=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=5), c, max_size=4),
                    max_leaves=30))
def test_decode_object_json_values(value: object) -> None:
    raw = json.dumps({"k": value}).encode()
    with contextlib.suppress(MessageError):
        assert decode_object(raw, max_size=1 << 20)["k"] == value


def test_model_chunk_frame_round_trip_and_bounds() -> None:
    chunk = ModelChunk(name="m", version="1.0.0", offset=10, total=100, data=b"x" * 50)
    assert decode_chunk(encode_chunk(chunk)) == chunk
    raw = encode_chunk(chunk)
    for bad in (raw[:6], b"XXXX" + raw[4:], raw[:8] + b"[" + raw[9:],
                encode_chunk(ModelChunk(name="m", version="1.0.0", offset=90, total=100, data=b"x" * 50)),
                encode_chunk(ModelChunk(name="m", version="1.0.0", offset=0, total=100, data=b""))):
        with pytest.raises(MessageError):
            decode_chunk(bad)


def test_model_policy_strict() -> None:
    good = ModelPolicy().to_json()
    assert ModelPolicy.from_json(good) == ModelPolicy()
    for key, value in (("output_mode", "raw"), ("k", 0), ("client_daily_quota", -1), ("extra", 1)):
        with pytest.raises(MessageError):
            ModelPolicy.from_json({**good, key: value})


@pytest.mark.parametrize("path", ["metadata/../keys/x", "targets/../../etc/passwd", "/metadata/1.root.json",
                                  "keys/root.pem", "metadata/", "metadata//1.root.json"])
def test_tuf_fetch_refuses_paths_outside_the_repository(path: str) -> None:
    body = {"request_id": "0" * 32, "path": path, "offset": 0, "length": 10}
    with pytest.raises(MessageError):
        TufFetch.from_body(Fields(body, "tuf.fetch"))


def test_tuf_chunk_frame_round_trips_and_refuses_bad_frames() -> None:
    chunk = TufChunk(request_id="1" * 32, path="metadata/timestamp.json", status="ok", offset=2, total=10,
                     data=b"abcd")
    raw = encode_tuf_chunk(chunk)
    assert decode_tuf_chunk(raw) == chunk
    for bad in (raw[:6], b"XXXX" + raw[4:], raw + b"x" * 5,
                encode_tuf_chunk(TufChunk("1" * 32, "metadata/1.root.json", "not_found", 0, 3, b"abc"))):
        with pytest.raises(MessageError):
            decode_tuf_chunk(bad)


def test_model_status_is_strict_and_bounded() -> None:
    failed = {"name": "m", "version": "1.0.0", "state": "failed", "error": "Unsupported model IR version: 14"}
    good = {"runtime": "1.31.1", "models": [failed]}
    assert ModelStatus.from_body(Fields(good, "model.status")).models[0].error == failed["error"]
    bad_items = (
        {**failed, "error": "x" * 513},                   # longer than 512
        {**failed, "error": "line one\nline two"},        # one line only
        {**failed, "error": "  "},                        # a failure says why
        {"name": "m", "version": "1.0.0", "state": "loaded", "error": "?"},
        {**failed, "state": "crashed"},
        {**failed, "extra": 1},
        {**failed, "name": "Bad Name"},
    )
    for item in bad_items:
        with pytest.raises(MessageError):
            ModelStatus.from_body(Fields({**good, "models": [item]}, "model.status"))
    for body in ({**good, "runtime": "1.31.1; rm -rf"}, {**good, "runtime": ""},
                 {**good, "models": [failed] * 2},
                 {**good, "models": [{**failed, "version": f"1.0.{i}"} for i in range(65)]}):
        with pytest.raises(MessageError):
            ModelStatus.from_body(Fields(body, "model.status"))
