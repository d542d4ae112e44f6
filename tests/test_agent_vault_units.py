"""The model vault's parts, one at a time: download window, package vetting and version marks,
lease clock, client table, telemetry and audit log, configuration - and, on a real swtpm, the
PCR-bound key (reuse, new key for a new state, unwrap refused after a PCR change or on another
TPM), the TPM-signed state file and its NV-counter rollback protection, and unlocking into
onnxruntime without plaintext left behind."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from tpm2_pytss import ESAPI, TPML_DIGEST_VALUES, TPMT_HA
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG

from agent.config import load_config
from agent.inference import QuotaExceeded, RollbackError
from agent.inference.guard import AuditRecord, InferenceGuard
from agent.inference.limits import CounterState
from agent.tpm.adapter import TpmAdapter
from agent.vault import FetchError, KeyReleaseRefused
from agent.vault.clients import client_table, parse_clients
from agent.vault.counters import STATE_FILE, SavePolicy, StateKeeper, VaultState
from agent.vault.fetch import Download
from agent.vault.keys import BoundKeys, StateSigner, wipe_bytes
from agent.vault.leases import LeaseClock
from agent.vault.store import PackageStore
from agent.vault.telemetry import AuditLog, UsageTracker, build_telemetry, verify_chain
from agent.vault.unlock import ModelBuffer, guard_policy, open_session
from agent.vault.vault import _custom_mismatch, model_target
from firmware_sim.swtpm import Swtpm
from firmware_sim.testmodel import classifier_io_signature, small_classifier
from fleet_server.keybroker import wrap_data_key
from protocol.encoding import b64encode, canonical_bytes
from protocol.errors import ConfigError, MalformedInputError, SignatureError, TpmError
from protocol.messages import KeyRelease, ModelChunk, ModelPolicy, ModelRef, key_id, sign_bytes
from protocol.modelpkg import (
    HEADER_SIZE,
    KID_SIZE,
    SIG_SIZE,
    SIGNING_CONTEXT,
    TAG_SIZE,
    ChunkAuthenticationError,
    PackageFormatError,
    PackageIntegrityError,
    PackageKeyError,
    PackageSignatureError,
    VersionRollbackError,
    build_package,
    read_manifest,
)
from protocol.tpm.constants import TPM_GENERATED_VALUE
from protocol.tpm.structures import parse_attest

MODEL = small_classifier(seed=7)
SIGNING = ec.generate_private_key(ec.SECP256R1())
KID = key_id(SIGNING.public_key())
TRUSTED = {KID: SIGNING.public_key()}
CHUNK = 1024
SELECTION = {"sha256": (0, 1, 2, 3, 4, 5, 6, 7)}


def package(version: str = "1.0.0", *, name: str = "classifier", data_key: bytes | None = None,
            signing: ec.EllipticCurvePrivateKey = SIGNING, model: bytes = MODEL) -> tuple[bytes, bytes]:
    key = data_key or secrets.token_bytes(32)
    pkg = build_package(model, name=name, version=version, io_signature=classifier_io_signature(),
                        signing_key=signing, key_id=key_id(signing.public_key()), data_key=key,
                        created_at=1_790_000_000_000, chunk_size=CHUNK)
    return pkg, key


def ref_of(pkg: bytes, version: str = "1.0.0", name: str = "classifier") -> ModelRef:
    return ModelRef(name=name, version=version, size=len(pkg), package_sha256=hashlib.sha256(pkg).digest())


# --------------------------------------------------------------------------------------------------
# fetch
# --------------------------------------------------------------------------------------------------
def chunk_for(ref: ModelRef, data: bytes, offset: int, length: int) -> ModelChunk:
    return ModelChunk(name=ref.name, version=ref.version, offset=offset, total=ref.size,
                      data=data[offset:offset + length])


def test_download_keeps_a_window_and_assembles_out_of_order_chunks() -> None:
    data = secrets.token_bytes(10_000)
    ref = ref_of(data)
    buf = bytearray(len(data))

    def sink(offset: int, chunk: bytes) -> None:
        buf[offset:offset + len(chunk)] = chunk

    d = Download(ref, sink, chunk=3000, window=2, timeout=10)
    first = d.requests(0.0)
    assert [(r.offset, r.length) for r in first] == [(0, 3000), (3000, 3000)]
    assert d.requests(1.0) == []  # window full, nothing timed out
    # answers in reverse order; each frees one slot
    assert d.accept(chunk_for(ref, data, 3000, 3000))
    assert [(r.offset, r.length) for r in d.requests(1.0)] == [(6000, 3000)]
    assert d.accept(chunk_for(ref, data, 0, 3000))
    assert d.progress() == {"size": 10_000, "percent": 60}
    assert [(r.offset, r.length) for r in d.requests(1.0)] == [(9000, 1000)]  # the last one is shorter
    assert d.accept(chunk_for(ref, data, 9000, 1000)) and d.accept(chunk_for(ref, data, 6000, 3000))
    assert d.complete and bytes(buf) == data and d.requests(2.0) == []


def test_download_ignores_chunks_that_answer_no_request_and_repeats_lost_ones() -> None:
    data = secrets.token_bytes(5000)
    ref = ref_of(data)
    written: list[int] = []
    d = Download(ref, lambda off, chunk: written.append(off), chunk=2000, window=1, timeout=5, max_attempts=2)
    assert [r.offset for r in d.requests(0.0)] == [0]
    assert not d.accept(chunk_for(ref, data, 2000, 2000))                 # not requested
    assert not d.accept(replace(chunk_for(ref, data, 0, 2000), data=data[:1999]))  # wrong length
    assert not d.accept(replace(chunk_for(ref, data, 0, 2000), version="9.9.9"))   # other version
    assert not d.accept(replace(chunk_for(ref, data, 0, 2000), total=4999))        # other total
    assert written == [] and d.ignored == 4
    assert [r.offset for r in d.requests(5.0)] == [0]   # timed out: asked again
    with pytest.raises(FetchError, match="requested 2 times, no answer"):
        d.requests(10.0)                                 # max_attempts reached
    assert d.accept(chunk_for(ref, data, 0, 2000))
    assert not d.accept(chunk_for(ref, data, 0, 2000))  # a duplicate


# --------------------------------------------------------------------------------------------------
# store
# --------------------------------------------------------------------------------------------------
def stage(store: PackageStore, data: bytes, ref: ModelRef) -> None:
    """What a finished download leaves: the partial file holding ``data``."""
    fd = store.open_partial(ref.name, ref.version, ref.size)
    try:
        os.pwrite(fd, data, 0)
    finally:
        os.close(fd)


@pytest.mark.parametrize(("custom", "reason"), [
    ({"name": "other", "version": "1.0.0"}, "names 'other' '1.0.0'"),
    ({"name": "classifier", "version": "0.9.0"}, "names 'classifier' '0.9.0'"),
    ({"name": "classifier", "version": "1.0.0", "package_sha256": "00" * 32}, "package_sha256 is not the"),
    ({"name": "classifier", "version": "1.0.0"}, "package_sha256 is not the"),
])
def test_a_channel_target_must_name_the_signed_offers_package(custom: dict[str, object], reason: str) -> None:
    digest = hashlib.sha256(b"package").digest()
    ref = ModelRef(name="classifier", version="1.0.0", size=7, package_sha256=digest)
    assert model_target("classifier", "1.0.0") == "models/classifier/1.0.0.pkg"
    assert _custom_mismatch(ref, {"name": "classifier", "version": "1.0.0",
                                  "package_sha256": digest.hex()}) is None
    mismatch = _custom_mismatch(ref, custom)
    assert mismatch is not None and reason in mismatch


def test_store_vets_accepts_and_commits_a_genuine_package(tmp_path: Path) -> None:
    store = PackageStore(tmp_path / "models", TRUSTED)
    pkg, _ = package()
    ref = ref_of(pkg)
    stage(store, pkg, ref)
    manifest = store.vet(ref)
    assert (manifest.name, manifest.version) == ("classifier", "1.0.0")
    store.accept(manifest)
    path = store.commit("classifier", "1.0.0")
    assert path.read_bytes() == pkg and path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "models").stat().st_mode & 0o777 == 0o700
    assert store.versions() == {"classifier": "1.0.0"}
    assert set(store.held()) == {"classifier"}
    assert not store.partial_path("classifier", "1.0.0").exists()


def _flip(pkg: bytes, offset: int) -> bytes:
    out = bytearray(pkg)
    out[offset] ^= 0x01
    return bytes(out)


def _reordered_and_resigned(pkg: bytes) -> bytes:
    """An insider with the signing key (not the data key) swaps chunks 0 and 1 and re-signs a manifest
    with the new ciphertext digest."""
    manifest = read_manifest(pkg, trusted_keys=TRUSTED)
    base = manifest.data_offset
    rec = CHUNK + TAG_SIZE
    records = bytearray(pkg[base:])
    records[0:rec], records[rec:2 * rec] = records[rec:2 * rec], records[0:rec]
    body = manifest.body()
    body["ciphertext_sha256"] = b64encode(hashlib.sha256(records).digest())
    raw = canonical_bytes(body)
    sig = sign_bytes(SIGNING, SIGNING_CONTEXT + raw)
    header = pkg[:6] + pkg[6:8] + len(raw).to_bytes(4, "big")
    return header + raw + KID.encode() + sig + bytes(records)


@pytest.mark.parametrize("case", ["bit flip in a chunk", "offer digest differs", "truncated", "extended",
                                  "foreign signer", "manifest byte changed", "manifest of other model"])
def test_store_refuses_bad_packages_and_deletes_them(tmp_path: Path, case: str) -> None:
    store = PackageStore(tmp_path / "models", TRUSTED)
    pkg, _ = package()
    mlen = int.from_bytes(pkg[8:12], "big")
    if case == "bit flip in a chunk":
        bad, ref = _flip(pkg, len(pkg) - 100), None       # the offer names the tampered bytes' digest
        expected: type[Exception] = PackageIntegrityError
    elif case == "offer digest differs":
        bad, ref = _flip(pkg, len(pkg) - 100), ref_of(pkg)  # the signed offer names the genuine digest
        expected = PackageIntegrityError
    elif case == "truncated":
        bad, ref, expected = pkg[:-500], None, PackageFormatError
    elif case == "extended":
        bad, ref, expected = pkg + b"\0" * 16, None, PackageFormatError
    elif case == "foreign signer":
        bad, ref, expected = package(signing=ec.generate_private_key(ec.SECP256R1()))[0], None, \
            PackageSignatureError
    elif case == "manifest byte changed":
        bad, ref, expected = _flip(pkg, HEADER_SIZE + 5), None, PackageSignatureError
    else:  # a genuine package of another model, offered under this model's name
        bad, expected = package(name="other")[0], PackageFormatError
        ref = replace(ref_of(bad), name="classifier")
    ref = ref or ref_of(bad)
    assert HEADER_SIZE + mlen + KID_SIZE + SIG_SIZE < len(pkg)
    stage(store, bad, ref)
    with pytest.raises(expected):
        store.vet(ref)
    assert not store.partial_path("classifier", "1.0.0").exists()
    assert store.versions() == {}


def test_store_refuses_an_older_version_and_prunes_superseded_files(tmp_path: Path) -> None:
    store = PackageStore(tmp_path / "models", TRUSTED)
    new, _ = package("1.10.0")
    stage(store, new, ref_of(new, "1.10.0"))
    store.accept(store.vet(ref_of(new, "1.10.0")))
    store.commit("classifier", "1.10.0")
    old, _ = package("1.9.9")
    assert store.older_than_held(ref_of(old, "1.9.9")) and not store.newer_than_held(ref_of(old, "1.9.9"))
    stage(store, old, ref_of(old, "1.9.9"))
    with pytest.raises(VersionRollbackError, match=r"older than the held version 1\.10\.0"):
        store.vet(ref_of(old, "1.9.9"))
    # an old package file put back on disk is not used, and goes at the next prune
    store.package_path("classifier", "1.9.9").write_bytes(old)
    assert set(store.held()) == {"classifier"} and store.held()["classifier"].version == "1.10.0"
    assert store.prune() == [store.package_path("classifier", "1.9.9")]
    # a kept package altered on disk no longer counts as held (it is fetched again)
    path = store.package_path("classifier", "1.10.0")
    path.write_bytes(_flip(new, len(new) - 3))
    assert store.held() == {} and not path.exists()


def test_reordered_chunks_under_a_resigned_manifest_pass_vetting_but_never_decrypt(tmp_path: Path) -> None:
    store = PackageStore(tmp_path / "models", TRUSTED)
    pkg, key = package()
    bad = _reordered_and_resigned(pkg)
    stage(store, bad, ref_of(bad))
    manifest = store.vet(ref_of(bad))  # signature and digests fit: only the data key can tell
    buf = ModelBuffer()
    with pytest.raises(ChunkAuthenticationError, match="chunk 0"):
        open_session(bad, manifest, bytearray(key), buf)
    assert buf.get(manifest.plaintext_size) == bytearray(manifest.plaintext_size)  # nothing left behind


# --------------------------------------------------------------------------------------------------
# unlock (no TPM needed)
# --------------------------------------------------------------------------------------------------
def test_open_session_loads_from_memory_and_leaves_no_plaintext_in_the_buffer() -> None:
    pkg, key = package()
    manifest = read_manifest(pkg, trusted_keys=TRUSTED)
    buf = ModelBuffer()
    runtime = open_session(pkg, manifest, bytearray(key), buf)
    out = runtime.run({"input": np.ones((2, 16), dtype=np.float32)})
    assert out["scores"].shape == (2, 10) and runtime.runs == 1
    kept = buf.get(manifest.plaintext_size)
    assert kept == bytearray(len(MODEL))  # wiped once the session existed
    runtime.close()
    assert runtime.closed
    buf.release()
    with pytest.raises(PackageKeyError):
        open_session(pkg, manifest, bytearray(secrets.token_bytes(32)), ModelBuffer())


def test_guard_policy_comes_from_the_manifest_and_the_signed_policy() -> None:
    pkg, _ = package()
    manifest = read_manifest(pkg, trusted_keys=TRUSTED)
    policy = ModelPolicy(output_mode="topk", k=2, decimals=3, max_batch=4, device_daily_quota=50,
                         block_on_alarm=True)
    gp = guard_policy(manifest, policy)
    assert gp.model == "classifier" and gp.io_signature == manifest.io_signature
    assert (gp.output.mode, gp.output.k, gp.output.decimals) == ("topk", 2, 3)
    assert gp.input_limits.max_batch == 4 and gp.device_daily_quota == 50 and gp.block_on_alarm


def test_wipe_bytes_clears_a_private_bytes_object() -> None:
    secret = bytes(bytearray(b"k" * 32))  # a fresh object, not a constant
    wipe_bytes(secret)
    assert secret == bytes(32)


# --------------------------------------------------------------------------------------------------
# leases
# --------------------------------------------------------------------------------------------------
def test_lease_clock_renews_only_live_leases_and_never_extends_past_the_offline_grace() -> None:
    clock = LeaseClock()
    lease = clock.grant("m", lease_id="a" * 32, expires_ms=100_000, quota=5, now=10.0)
    assert lease.expires_at == 100.0 and lease.quota == 5
    clock.commit("m", lease, now=10.0, server_until=100.0)
    assert clock.next_deadline() == 100.0 and clock.expired(99.9) == []
    renewed = clock.renew("m", lease_until_ms=200_000, now=50.0)
    assert renewed is not None and renewed.expires_at == 200.0 and renewed.lease_id == "a" * 32
    assert clock.renew("m", lease_until_ms=150_000, now=60.0).expires_at == 200.0  # type: ignore[union-attr]
    assert clock.expired(200.0) == ["m"]
    assert clock.renew("m", lease_until_ms=900_000, now=200.0) is None  # expired: never revived
    with pytest.raises(KeyReleaseRefused, match="already expired"):
        clock.grant("m", lease_id="b" * 32, expires_ms=5_000, quota=None, now=10.0)

    grace = LeaseClock(offline_grace=30.0)
    lease = grace.grant("m", lease_id="c" * 32, expires_ms=1_000_000, quota=None, now=10.0)
    assert lease.expires_at == 40.0  # the device's grace shortens the server's lease
    grace.commit("m", lease, now=10.0, server_until=1000.0)
    assert grace.renew("m", lease_until_ms=1_000_000, now=35.0).expires_at == 65.0  # type: ignore[union-attr]
    assert grace.expired(65.0) == ["m"]


# --------------------------------------------------------------------------------------------------
# clients
# --------------------------------------------------------------------------------------------------
def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def test_client_limits_never_exceed_the_signed_policy() -> None:
    entries = parse_clients({"clients": {
        "app": {"token_sha256": digest("t1"), "rate": 100, "burst": 2, "daily_quota": 1_000_000},
        "cam": {"token_sha256": digest("t2"), "models": ["other"]},
        "low": {"token_sha256": digest("t3"), "rate": 0.5, "daily_quota": 3},
    }})
    policy = ModelPolicy(client_rate=10, client_burst=20, client_daily_quota=100)
    table = client_table(entries, policy, "classifier")
    by_id = {info.client_id: info for info in table.values()}
    assert set(by_id) == {"app", "low"}  # cam may not use this model
    assert (by_id["app"].rate, by_id["app"].burst, by_id["app"].daily_quota) == (10, 2, 100)
    assert (by_id["low"].rate, by_id["low"].burst, by_id["low"].daily_quota) == (0.5, 20, 3)
    assert table[bytes.fromhex(digest("t1"))].models == frozenset({"classifier"})


@pytest.mark.parametrize(("data", "message"), [
    ({"clients": {"a": {"token_sha256": "00"}}}, "token_sha256"),
    ({"clients": {"a": {"token_sha256": digest("x"), "rate": "fast"}}}, "clients.a.rate"),
    ({"clients": {"a": {"token_sha256": digest("x"), "colour": 1}}}, "clients.a.colour: unknown key"),
    ({"clients": {"a": {"token_sha256": digest("x")}, "b": {"token_sha256": digest("x")}}}, "twice"),
    ({"clients": {"bad id!": {"token_sha256": digest("x")}}}, "invalid client id"),
    ({"other": {}}, "unknown key"),
])
def test_clients_file_errors_name_the_key(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_clients(data)


# --------------------------------------------------------------------------------------------------
# telemetry and audit
# --------------------------------------------------------------------------------------------------
def record(outcome: str = "ok", rows: int = 1, client: str | None = "app", t: float = 1000.0) -> AuditRecord:
    return AuditRecord(time=t, client_id=client, model="classifier", outcome=outcome, rows=rows,
                       input_shapes=(("input", (rows, 16)),), latency_us=42.0, reason="")


def test_usage_and_telemetry_per_client_with_the_extraction_statistic() -> None:
    usage = UsageTracker(now=100.0)
    for r in (record(rows=3), record(rows=2), record("quota_exceeded", rows=0), record("unauthenticated", 0,
                                                                                       None)):
        usage.observe(r)
    assert usage.active() == ["classifier"] and usage.charged() == 2
    u = usage.take("classifier", 160.0)
    t = build_telemetry("classifier", "1.0.0", u, 160.0,
                        {"app": {"w": 0.5, "alarm": True}, "scraper": {"w": 0.1, "alarm": True}})
    assert (t.since, t.until, t.served, t.refused) == (100_000, 160_000, 5, 2)
    clients = {c.client: c for c in t.clients}
    assert (clients["app"].served, clients["app"].refused, clients["app"].alarm) == (5, 1, True)
    assert clients["app"].statistic == 0.5 and clients["scraper"].served == 0
    assert usage.take("classifier", 200.0).since == 160.0 and usage.active() == []


def test_audit_log_rotates_within_its_bound_and_its_chain_detects_edits(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl", max_bytes=4096, keep=2)
    early = b""
    for i in range(200):
        log.append(record(t=1000.0 + i))
        if i % 10 == 9:
            log.flush()
            early = early or log.head
    files = log.files()
    assert len(files) == 3 and all(f.stat().st_mode & 0o777 == 0o600 for f in files)
    assert sum(f.stat().st_size for f in files) <= 3 * 4096
    line = json.loads(log.path.read_text().splitlines()[-1])
    assert line["model"] == "classifier" and line["rows"] == 1 and "inputs" not in line
    # the chain continues across a restart
    head = log.head
    again = AuditLog(tmp_path / "audit.jsonl", max_bytes=4096, keep=2)
    assert again.head == head
    assert verify_chain(again.files(), head) == "ok"
    assert verify_chain(again.files(), early) == "unknown"  # that part of the chain was rotated away
    fresh = AuditLog(tmp_path / "b.jsonl", max_bytes=1 << 20, keep=1)
    for i in range(5):
        fresh.append(record(t=float(i)))
    fresh.flush()
    signed = fresh.head
    assert verify_chain(fresh.files(), signed) == "ok"
    text = fresh.path.read_text().replace('"rows":1', '"rows":9', 1)
    fresh.path.write_text(text)
    assert verify_chain(fresh.files(), signed) == "broken"


def test_save_policy() -> None:
    p = SavePolicy(every_requests=10, every_seconds=60)
    assert p.due(requests=10, changed=True, last_save=0, now=1)
    assert not p.due(requests=3, changed=True, last_save=0, now=59)
    assert p.due(requests=3, changed=True, last_save=0, now=60)
    assert not p.due(requests=0, changed=False, last_save=0, now=1000)


# --------------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------------
BASE = """
device_id = "cam-0001"
device_class = "camera"
firmware_version = "1.4.2"
state_dir = "state"

[mqtt]
host = "mqtt.fleet.example"
ca_cert = "ca.pem"
claim_cert = "claim.pem"
claim_key = "claim.key"

[server]
signing_public_key = "server.pem"
"""


def test_models_and_inference_configuration(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(BASE + """
[models]
signing_public_key = "models.pem"
telemetry_interval = 10
offline_grace = 3600
fetch_chunk = 4096

[inference]
socket = "run/inference.sock"
clients_file = "clients.toml"
""")
    cfg = load_config(path)
    assert cfg.models is not None and cfg.inference is not None
    assert cfg.models.signing_public_key == tmp_path / "models.pem"
    m = cfg.models
    assert (m.telemetry_interval, m.offline_grace, m.fetch_chunk) == (10, 3600, 4096)
    assert cfg.models.fetch_window == 4 and cfg.models.harden_process
    assert cfg.inference.socket == tmp_path / "run" / "inference.sock" and cfg.inference.port is None
    assert load_config(_write(tmp_path, BASE)).models is None


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / f"c{secrets.token_hex(4)}.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(("extra", "message"), [
    ('[inference]\nport = 0\nclients_file = "c.toml"\n', "inference: needs a \\[models\\] table"),
    ('[models]\nsigning_public_key = "m.pem"\n[inference]\nclients_file = "c.toml"\n', "exactly one of"),
    ('[models]\nsigning_public_key = "m.pem"\n[inference]\nport = 1\nsocket = "s"\nclients_file = "c"\n',
     "exactly one of"),
    ('[models]\nsigning_public_key = "m.pem"\nfetch_chunk = 999999\n', "models.fetch_chunk"),
    ('[models]\nsigning_public_key = "m.pem"\ncolour = 1\n', "models.colour: unknown key"),
    ('[models]\ntelemetry_interval = 5\n', "models.signing_public_key: missing"),
    ('[models]\nsigning_public_key = "m.pem"\nharden_process = "yes"\n', "models.harden_process"),
])
def test_models_configuration_errors_name_the_key(tmp_path: Path, extra: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, BASE + extra))


# --------------------------------------------------------------------------------------------------
# on a real TPM
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def tpm(swtpm: Swtpm, tmp_path: Path) -> Iterator[TpmAdapter]:
    adapter = TpmAdapter(swtpm.tcti, tmp_path / "state" / "tpm")
    adapter.open()
    try:
        yield adapter
    finally:
        adapter.close()


def extend_pcr(tcti: str, index: int) -> None:
    """Extend a sha256 PCR through a second connection (the adapter under test must be closed first:
    swtpm serves one connection at a time)."""
    ha = TPMT_HA(hashAlg=TPM2_ALG.SHA256)
    ha.digest.sha256 = bytes.fromhex("ab" * 32)
    with ESAPI(tcti) as ctx:
        ctx.pcr_extend(ESYS_TR(ESYS_TR.PCR0 + index), TPML_DIGEST_VALUES([ha]))


def release_for(key_public: bytes, key_name: bytes, data_key: bytes, *, lease_ms: int = 60_000) -> KeyRelease:
    return KeyRelease(name="classifier", version="1.0.0", key_name=key_name,
                      wrapped_key=wrap_data_key(data_key, key_public), lease_id=secrets.token_hex(16),
                      lease_expires=int(time.time() * 1000) + lease_ms, policy=ModelPolicy())


@pytest.mark.swtpm
def test_bound_key_is_reused_in_the_same_state_and_unwraps_only_there(swtpm: Swtpm, tmp_path: Path) -> None:
    folder = tmp_path / "state" / "vault"
    folder.mkdir(parents=True)
    adapter = TpmAdapter(swtpm.tcti, tmp_path / "state" / "tpm")
    keys = BoundKeys(lambda: adapter, folder, "cam-0001", clock=time.time)
    key = keys.current_key(SELECTION)
    assert keys.current_key(SELECTION).key_id == key.key_id  # same PCR values: the same key
    request = keys.request("classifier", "1.0.0", SELECTION)
    assert request.key_public == key.public
    data_key = secrets.token_bytes(32)
    release = release_for(key.public, key.name, data_key)
    unwrapped = keys.unwrap(release)
    assert isinstance(unwrapped, bytearray) and bytes(unwrapped) == data_key
    # a release wrapped to a key this device never made is refused before the TPM is asked
    with pytest.raises(KeyReleaseRefused, match="does not hold"):
        keys.unwrap(replace(release, key_name=b"\x00\x0b" + bytes(32)))
    adapter.close()

    extend_pcr(swtpm.tcti, 7)  # the boot state changes (as after an update, or a tampered component)
    adapter = TpmAdapter(swtpm.tcti, tmp_path / "state" / "tpm")
    keys = BoundKeys(lambda: adapter, folder, "cam-0001", clock=time.time)
    with pytest.raises(TpmError, match="a policy check failed"):
        keys.unwrap(release)  # the replayed release cannot be unwrapped in the new state
    fresh = keys.current_key(SELECTION)
    assert fresh.key_id != key.key_id and len(keys.index.entries) == 2  # a new key for the new state
    assert bytes(keys.unwrap(release_for(fresh.public, fresh.name, data_key))) == data_key
    adapter.close()


@pytest.mark.swtpm
def test_a_release_and_the_key_blobs_copied_to_another_tpm_do_not_unwrap(make_swtpm: object,
                                                                          tmp_path: Path) -> None:
    tpm_a = make_swtpm("a")  # type: ignore[operator]
    tpm_b = make_swtpm("b")  # type: ignore[operator]
    a = TpmAdapter(tpm_a.tcti, tmp_path / "state-a" / "tpm")
    keys_a = BoundKeys(lambda: a, _mk(tmp_path / "state-a" / "vault"), "cam-a", clock=time.time)
    key = keys_a.current_key(SELECTION)
    release = release_for(key.public, key.name, secrets.token_bytes(32))
    a.close()
    # the attacker copies device A's whole state (bound key blobs and index) onto device B
    shutil.copytree(tmp_path / "state-a", tmp_path / "state-b")
    b = TpmAdapter(tpm_b.tcti, tmp_path / "state-b" / "tpm")
    try:
        keys_b = BoundKeys(lambda: b, tmp_path / "state-b" / "vault", "cam-b", clock=time.time)
        with pytest.raises(TpmError):
            keys_b.unwrap(release)
    finally:
        b.close()


def _mk(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.mark.swtpm
def test_state_signature_is_a_tpm_certification_only_this_tpm_can_make(tpm: TpmAdapter, make_swtpm: object,
                                                                        tmp_path: Path) -> None:
    signer = StateSigner(lambda: tpm, _mk(tmp_path / "vault"))
    digest_ = hashlib.sha256(b"state").digest()
    sig = signer.sign(digest_, create=True)
    signer.verify(digest_, sig)
    assert parse_attest(sig.attest).magic == TPM_GENERATED_VALUE
    with pytest.raises(SignatureError, match="other content"):
        signer.verify(hashlib.sha256(b"edited").digest(), sig)
    with pytest.raises(SignatureError):
        signer.verify(digest_, replace(sig, attest=sig.attest[:-1] + bytes([sig.attest[-1] ^ 1])))
    other_tpm = make_swtpm("other")  # type: ignore[operator]
    other = TpmAdapter(other_tpm.tcti, tmp_path / "state-other" / "tpm")
    try:
        other_signer = StateSigner(lambda: other, _mk(tmp_path / "state-other" / "vault"))
        foreign = other_signer.sign(digest_, create=True)
        with pytest.raises(SignatureError):
            signer.verify(digest_, foreign)
    finally:
        other.close()
    with pytest.raises(MalformedInputError):
        tpm.certify(tpm.bound_key(json.loads((tmp_path / "vault" / "state-key.json").read_text())["key_id"]),
                    b"")


@pytest.mark.swtpm
def test_state_file_rollback_deletion_and_edits_are_detected(tpm: TpmAdapter, tmp_path: Path) -> None:
    folder = _mk(tmp_path / "vault")

    def keeper() -> StateKeeper:
        return StateKeeper(folder, lambda: tpm, StateSigner(lambda: tpm, folder))

    k = keeper()
    first = k.load()  # first start: the NV counter is defined, generation = its value
    nv0 = tpm.counter_read()
    assert first.generation == nv0 and first.versions == {} and (folder / STATE_FILE).exists()
    counters = {"classifier": CounterState.initial(nv_counter=nv0, now=1000.0)}
    saved = k.save({"classifier": "1.0.0"}, counters)
    assert saved.generation == nv0 + 1 == tpm.counter_read()
    old = (folder / STATE_FILE).read_bytes()
    used = {"classifier": replace(saved.counters["classifier"], day_used=7, clients=(("app", 7),))}
    k.save({"classifier": "1.1.0"}, used)
    loaded = keeper().load()
    assert loaded.versions == {"classifier": "1.1.0"} and loaded.counters["classifier"].day_used == 7

    (folder / STATE_FILE).write_bytes(old)  # restore the old file to win back quota / allow 1.0.0 again
    with pytest.raises(RollbackError, match="older than the TPM NV counter"):
        keeper().load()

    # put the current file back, then edit its counters and keep the signature
    k.save(loaded.versions, loaded.counters)
    doc = json.loads((folder / STATE_FILE).read_text())
    body = json.loads(base64.b64decode(doc["body"]))
    body["counters"]["classifier"]["day_used"] = 0
    doc["body"] = b64encode(canonical_bytes(body))
    (folder / STATE_FILE).write_text(json.dumps(doc))
    with pytest.raises(RollbackError, match="does not verify"):
        keeper().load()

    (folder / STATE_FILE).unlink()  # delete it to start from zero
    with pytest.raises(RollbackError, match="was deleted"):
        keeper().load()


@pytest.mark.swtpm
def test_a_crash_between_write_and_nv_increment_is_caught_up_on_load(tpm: TpmAdapter, tmp_path: Path) -> None:
    folder = _mk(tmp_path / "vault")
    signer = StateSigner(lambda: tpm, folder)
    k = StateKeeper(folder, lambda: tpm, signer)
    k.load()
    nv = tpm.counter_read()

    class PowerLoss(Exception):
        pass

    def lose_power(state: VaultState) -> None:
        raise PowerLoss

    with pytest.raises(PowerLoss):
        k.save({"m": "1.0.0"}, {}, on_written=lose_power)
    assert tpm.counter_read() == nv  # the file is one ahead of the counter
    state = StateKeeper(folder, lambda: tpm, StateSigner(lambda: tpm, folder)).load()
    assert state.generation == nv + 1 == tpm.counter_read() and state.versions == {"m": "1.0.0"}


@pytest.mark.swtpm
def test_counter_state_from_another_device_does_not_load(make_swtpm: object, tmp_path: Path) -> None:
    tpm_a, tpm_b = make_swtpm("a"), make_swtpm("b")  # type: ignore[operator]
    a = TpmAdapter(tpm_a.tcti, tmp_path / "state-a" / "tpm")
    fa = _mk(tmp_path / "state-a" / "vault")
    StateKeeper(fa, lambda: a, StateSigner(lambda: a, fa)).load()
    a.close()
    b = TpmAdapter(tpm_b.tcti, tmp_path / "state-b" / "tpm")
    try:
        fb = _mk(tmp_path / "state-b" / "vault")
        StateKeeper(fb, lambda: b, StateSigner(lambda: b, fb)).load()
        shutil.copy(fa / STATE_FILE, fb / STATE_FILE)  # B's NV counter exists; A's state is copied in
        with pytest.raises(RollbackError):
            StateKeeper(fb, lambda: b, StateSigner(lambda: b, fb)).load()
    finally:
        b.close()


def test_guard_from_vault_counters_refuses_over_quota() -> None:
    # The vault hands the guard the loaded counters: the quota is counted from them, not from zero.
    pkg, key = package()
    manifest = read_manifest(pkg, trusted_keys=TRUSTED)
    runtime = open_session(pkg, manifest, bytearray(key), ModelBuffer())
    policy = ModelPolicy(client_daily_quota=3)
    clients = client_table(parse_clients({"clients": {"app": {"token_sha256": digest("tok")}}}), policy,
                           "classifier")
    now = 1_790_000_000.0
    loaded = CounterState(generation=5, day=int(now // 86400), day_used=2, clients=(("app", 2),))
    guard = InferenceGuard(guard_policy(manifest, policy), runtime, clients, lambda: now, lambda r: None,
                           counters=loaded)
    guard.predict("tok", {"input": np.ones((1, 16), dtype=np.float32)})
    with pytest.raises(QuotaExceeded, match="daily quota of client app exhausted"):
        guard.predict("tok", {"input": np.ones((1, 16), dtype=np.float32)})


def test_hardening_disables_core_dumps_and_ptrace_in_a_subprocess(tmp_path: Path) -> None:
    script = ("import ctypes, json, resource\n"
              "from agent.vault.unlock import harden_process\n"
              "done = harden_process()\n"
              "libc = ctypes.CDLL(None)\n"
              "core = resource.getrlimit(resource.RLIMIT_CORE)\n"
              "print(json.dumps([done, core, libc.prctl(3, 0, 0, 0, 0)]))\n")  # 3: PR_GET_DUMPABLE
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                         check=True, cwd=Path(__file__).resolve().parents[1])
    done, core, dumpable = json.loads(out.stdout)
    assert done == {"core_dumps_off": True, "not_dumpable": True}
    assert core == [0, 0] and dumpable == 0

