"""Model protection in the server's message handling (fleet_server/service/models.py): offers and lease
renewal with trusted results, key release to a TPM-bound key, downloads, telemetry, alerts, and the
lease life cycle - with real swtpm devices (firmware_sim boots, the agent's TPM adapter creates,
certifies and unwraps with bound keys), a real Repository, and at the end the same over a real Mosquitto
broker through a worker.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from firmware_sim.broker import BrokerPki, MosquittoBroker
from firmware_sim.manufacturer import ManufacturerCA
from firmware_sim.testmodel import small_classifier
from fleet_server.config import AlertSettings, ModelSettings, ServerConfig
from fleet_server.keybroker import BusinessHours
from fleet_server.keys import ModelSigningKey, ResultSigner, create_model_signing_key
from fleet_server.modelstore import admin as model_admin
from fleet_server.modelstore.kek import Kek, SealedKey
from fleet_server.modelstore.store import PackageStore, Published, publish_model
from fleet_server.service import admin
from fleet_server.service.common import Counters, ManualClock, Outgoing
from fleet_server.service.context import ServiceContext
from fleet_server.service.processor import Processor
from fleet_server.service.scheduler import Scheduler
from fleet_server.service.worker import Worker
from fleet_server.storage.repo import Repository
from protocol import topics
from protocol.errors import TpmError
from protocol.messages import (
    WRAP_LABEL,
    AttestationResult,
    Challenge,
    ClientUsage,
    KeyDenied,
    KeyRelease,
    KeyRequest,
    Message,
    ModelFetch,
    ModelLoad,
    ModelOffer,
    ModelPolicy,
    ModelStatus,
    Telemetry,
    decode_chunk,
    decode_signed,
    key_request_qualifier,
    new_message_id,
)
from protocol.modelpkg import decrypt_package, read_manifest
from protocol.mqtt import MqttClient

pytest.register_assert_rewrite("mqtt_fixtures", "server_fixtures")
from mqtt_fixtures import WAIT, ClientFactory, Credentials, wait_until  # noqa: E402
from server_fixtures import DEVICE_CLASS, DeviceFactory, SimDevice, enroll, make_config, one  # noqa: E402

pytest_plugins = ("mqtt_fixtures", "server_fixtures")
pytestmark = [pytest.mark.swtpm, pytest.mark.usefixtures("quiet_root_logging")]
NAME = "classifier"


# --------------------------------------------------------------------------------------------------
# the environment: a processor whose context has a KEK and a package store
# --------------------------------------------------------------------------------------------------
@dataclass
class Env:
    repo: Repository
    ctx: ServiceContext
    proc: Processor
    signer: ResultSigner
    kek: Kek
    signing: ModelSigningKey
    store: PackageStore
    clock: ManualClock
    models: dict[str, bytes] = dataclasses.field(default_factory=dict)

    def publish(self, version: str = "1.0.0", *, seed: int = 0,
                policy: ModelPolicy | None = None, deploy: bool = True) -> Published:
        """Publish (and, by default, deploy: publishing alone reaches no device) a version."""
        model = small_classifier(seed=seed)
        self.models[version] = model
        published = publish_model(self.repo, model=model, name=NAME, version=version,
                                  signing_key=self.signing, kek=self.kek, store=self.store,
                                  now=self.clock.now_ms(), policy=policy)
        if deploy:
            model_admin.deploy(self.repo, NAME, version, now=self.clock.now_ms())
        return published

    def entitle(self, *, device_class: str | None = None, device_id: str | None = None) -> None:
        model_admin.entitle(self.repo, NAME, device_class=device_class, device_id=device_id,
                            now=self.clock.now_ms())

    def with_context(self, **changes: Any) -> Env:
        """The same environment with a processor on a changed context (alerts, KEK...)."""
        ctx = dataclasses.replace(self.ctx, **changes)
        return dataclasses.replace(self, ctx=ctx, proc=Processor(ctx, self.repo, Counters()))

    def data_key(self, version: str = "1.0.0") -> bytes:
        row = self.repo.models.version(NAME, version)
        assert row is not None
        sealed = SealedKey(row.kek_id, row.data_key_nonce, row.encrypted_data_key)
        pid = bytes.fromhex(row.package_id)
        return bytes(self.kek.unseal(sealed, name=NAME, version=version, package_id=pid))


@pytest.fixture
def env(repo: Repository, ctx: ServiceContext, signer: ResultSigner, clock: ManualClock, tmp_path: Path,
        golden_policy: admin.StoredPolicy) -> Env:
    kek = Kek(secrets.token_bytes(32))
    store = PackageStore(tmp_path / "models")
    model_ctx = dataclasses.replace(ctx, kek=kek, models=ModelSettings(store_dir=store.root))
    signing = create_model_signing_key(tmp_path / "model-keys" / "model-signing.key")
    return Env(repo, model_ctx, Processor(model_ctx, repo, Counters()), signer, kek, signing, store, clock)


# --------------------------------------------------------------------------------------------------
# what a device does
# --------------------------------------------------------------------------------------------------
@dataclass
class Attested:
    result: AttestationResult
    offers: list[ModelOffer]
    selection: dict[str, list[int]]


def decoded(env: Env, out: list[Outgoing], device_id: str, kind: str) -> list[Any]:
    """Signed messages on ``device_id``'s down topic ``kind``, verified with the pinned key."""
    topic = topics.device_down(device_id, kind)
    return [decode_signed(o.payload, keys={env.signer.kid: env.signer.public_key}, aud=device_id).message
            for o in out if o.topic == topic]


def attest(env: Env, dev: SimDevice, reason: str = "boot") -> Attested:
    env.clock.advance(2_000)  # past attestation.request_min_interval
    out = env.proc.handle_batch([dev.up("hello", dev.hello(reason))])
    challenge = one(env.signer, out, dev.id, "challenge")
    assert isinstance(challenge, Challenge)
    out = env.proc.handle_batch([dev.up("evidence", dev.evidence(challenge))])
    result = one(env.signer, out, dev.id, "result")
    return Attested(result, decoded(env, out, dev.id, "model-offer"),
                    {bank: list(pcrs) for bank, pcrs in challenge.selection.items()})


def trusted(env: Env, make_device: DeviceFactory, device_id: str,
            **kwargs: Any) -> tuple[SimDevice, Attested]:
    dev = make_device(device_id, **kwargs)
    admin.preregister_ek(env.repo, dev.tpm.ek_certificate(), now=env.clock.now_ms())
    assert enroll(env.proc, env.signer, dev).status == "admitted"
    attested = attest(env, dev)
    return dev, attested


def key_request(dev: SimDevice, selection: dict[str, list[int]], version: str = "1.0.0", *,
                key: Any = None) -> tuple[bytes, Any]:
    """The device's ``key.request``: a bound key (new unless given) certified by its AK now."""
    key = key or dev.tpm.create_bound_key(selection)
    cert = dev.tpm.certify(key, key_request_qualifier(dev.id, NAME, version))
    return dev.plain(KeyRequest(name=NAME, version=version, key_public=key.public, certify_attest=cert.attest,
                                certify_signature=cert.signature)), key


def ask_key(env: Env, dev: SimDevice, payload: bytes) -> tuple[KeyRelease | None, KeyDenied | None]:
    out = env.proc.handle_batch([dev.up("key-request", payload)])
    releases = decoded(env, out, dev.id, "key-release")
    denials = decoded(env, out, dev.id, "key-denied")
    assert len(releases) + len(denials) <= 1, out
    return (releases[0] if releases else None), (denials[0] if denials else None)


def fetch_all(env: Env, dev: SimDevice, version: str, total: int, step: int) -> bytes:
    data = bytearray()
    while len(data) < total:
        fetch = dev.plain(ModelFetch(name=NAME, version=version, offset=len(data), length=step))
        out = env.proc.handle_batch([dev.up("model-fetch", fetch)])
        [frame] = [o for o in out if o.topic == topics.device_down(dev.id, "model-chunk")]
        chunk = decode_chunk(frame.payload)
        assert (chunk.name, chunk.version, chunk.offset, chunk.total) == (NAME, version, len(data), total)
        data += chunk.data
    return bytes(data)


# --------------------------------------------------------------------------------------------------
# offers, release, renewal
# --------------------------------------------------------------------------------------------------
def test_published_version_reaches_devices_only_once_deployed(env: Env, make_device: DeviceFactory) -> None:
    env.publish("1.0.0", deploy=False)
    env.entitle(device_class=DEVICE_CLASS)
    dev, first = trusted(env, make_device, "cam-1")
    assert first.offers == []  # published, not deployed: nothing to offer
    payload, _ = key_request(dev, first.selection)
    release, denied = ask_key(env, dev, payload)  # asking anyway is refused
    assert release is None and denied is not None and "not deployed" in denied.reasons[0]
    assert model_admin.deploy(env.repo, NAME, "1.0.0", now=env.clock.now_ms()).deployed
    env.clock.advance(1_000)
    [offer] = attest(env, dev, "manual").offers
    assert [r.version for r in offer.models] == ["1.0.0"]
    # A newer published version does not replace the deployed one until it is deployed too.
    env.publish("1.1.0", seed=1, deploy=False)
    env.clock.advance(1_000)
    [offer] = attest(env, dev, "manual").offers
    assert [r.version for r in offer.models] == ["1.0.0"]
    model_admin.deploy(env.repo, NAME, "1.1.0", now=env.clock.now_ms())
    env.clock.advance(1_000)
    [offer] = attest(env, dev, "manual").offers
    assert [r.version for r in offer.models] == ["1.1.0"]


def test_offer_release_unwrap_and_renewal(env: Env, make_device: DeviceFactory, tmp_path: Path) -> None:
    published = env.publish("1.0.0")
    env.entitle(device_class=DEVICE_CLASS)
    dev, first = trusted(env, make_device, "cam-1")
    now = env.clock.now_ms()
    assert first.result.verdict == "trusted"
    assert first.result.lease_until == now + env.ctx.models.lease_ms(env.ctx.settings) > now
    [offer] = first.offers
    [ref] = offer.models
    assert (ref.name, ref.version, ref.size, ref.package_sha256) == (
        NAME, "1.0.0", published.package_size, published.package_sha256)
    # The offer was lost (QoS 0): the next trusted result carries it again.
    env.clock.advance(1_000)
    assert [o.models for o in attest(env, dev, "reconnect").offers] == [offer.models]

    payload, key = key_request(dev, first.selection)
    release, denied = ask_key(env, dev, payload)
    assert denied is None and release is not None
    assert release.key_name == key.name
    assert release.lease_expires == env.clock.now_ms() + env.ctx.models.lease_ms(env.ctx.settings)
    assert release.policy == ModelPolicy()
    data_key = dev.tpm.unwrap(key, release.wrapped_key, WRAP_LABEL)
    assert data_key == env.data_key("1.0.0")
    package = published.path.read_bytes()
    manifest = read_manifest(package, trusted_keys={env.signing.kid: env.signing.public_key})
    assert bytes(decrypt_package(package, manifest, data_key)) == env.models["1.0.0"]
    [lease] = env.repo.models.leases(device_id="cam-1")
    assert (lease.lease_id, lease.state, lease.version, lease.key_name) == (
        release.lease_id, "active", "1.0.0", key.name)
    assert env.proc.counters.get("keys.released") == 1

    # Now the device holds the key: no offer with its results, and each one renews the lease.
    env.clock.advance(30_000)
    renewed = attest(env, dev, "manual")
    assert renewed.offers == []
    assert renewed.result.lease_until > release.lease_expires
    [lease] = env.repo.models.leases(device_id="cam-1")
    assert lease.expires_at == renewed.result.lease_until and lease.renewed_at == env.clock.now_ms()

    # A new version is offered (only the newest), while the old lease stays active until replaced.
    newer = env.publish("1.1.0", seed=1)
    env.clock.advance(1_000)
    [offer] = attest(env, dev, "manual").offers
    assert [(r.version, r.package_sha256) for r in offer.models] == [("1.1.0", newer.package_sha256)]
    payload, _ = key_request(dev, first.selection, "1.1.0", key=key)
    release2, _ = ask_key(env, dev, payload)
    assert release2 is not None
    assert dev.tpm.unwrap(key, release2.wrapped_key, WRAP_LABEL) == env.data_key("1.1.0")
    states = {(x.version, x.state) for x in env.repo.models.leases(device_id="cam-1")}
    assert states == {("1.0.0", "superseded"), ("1.1.0", "active")}


def test_release_is_useless_on_another_device_and_after_a_tampered_reboot(
        env: Env, make_device: DeviceFactory) -> None:
    env.publish()
    env.entitle(device_class=DEVICE_CLASS)
    a, attested_a = trusted(env, make_device, "cam-a")
    b, attested_b = trusted(env, make_device, "cam-b", fresh_tpm=True)
    payload, key_a = key_request(a, attested_a.selection)
    release, _ = ask_key(env, a, payload)
    assert release is not None
    data_key = env.data_key()

    # Device B holds its own bound key; A's release does not unwrap in B's TPM.
    key_b = b.tpm.create_bound_key(attested_b.selection)
    with pytest.raises(TpmError):
        b.tpm.unwrap(key_b, release.wrapped_key, WRAP_LABEL)
    # A's request relayed by B (on B's own topic) is refused: B's AK did not certify that key.
    relayed, denied = ask_key(env, b, payload)
    assert relayed is None and denied is not None and "attestation key" in denied.reasons[0]
    assert env.proc.counters.get("rejected.key_signature") == 1

    # A reboots into a tampered kernel: its TPM refuses to unwrap the release it holds.
    a.power_cycle("tampered-kernel")
    with pytest.raises(TpmError, match="policy check failed"):
        a.tpm.unwrap(key_a, release.wrapped_key, WRAP_LABEL)
    # Before attesting, a certification from the new boot is refused (not the attested boot) ...
    again, denied = ask_key(env, a, key_request(a, attested_a.selection, key=key_a)[0])
    assert again is None and denied is not None and "boot" in denied.reasons[0]
    # ... and after attesting, the device is untrusted: its lease is revoked, no key, an alert.
    tampered = attest(env, a)
    assert tampered.result.verdict == "untrusted" and tampered.result.lease_until == 0
    assert tampered.offers == []
    assert [x.state for x in env.repo.models.leases(device_id="cam-a")] == ["revoked"]
    again, denied = ask_key(env, a, key_request(a, attested_a.selection, key=key_a)[0])
    assert again is None and denied is not None and "untrusted" in denied.reasons[0]
    [alert] = env.repo.models.alerts(kind="key_request_untrusted")
    assert (alert.device_id, alert.model, alert.severity) == ("cam-a", NAME, "critical")
    # B is unaffected and A's good boot would still unwrap: the key is bound to PCRs, not erased.
    a.power_cycle("golden")
    assert a.tpm.unwrap(key_a, release.wrapped_key, WRAP_LABEL) == data_key


def test_untrusted_pending_and_unknown_devices_never_receive_a_key(env: Env,
                                                                   make_device: DeviceFactory) -> None:
    env.publish()
    env.entitle(device_class=DEVICE_CLASS)
    bad, attested = trusted(env, make_device, "cam-t", profile="tampered-kernel")
    assert attested.result.verdict == "untrusted" and attested.result.lease_until == 0
    assert attested.offers == []
    release, denied = ask_key(env, bad, key_request(bad, attested.selection)[0])
    assert release is None and denied is not None and "untrusted" in denied.reasons[0]
    assert env.repo.models.alerts(kind="key_request_untrusted")[0].device_id == "cam-t"
    # Nor a download.
    fetch = bad.plain(ModelFetch(name=NAME, version="1.0.0", offset=0, length=1024))
    assert env.proc.handle_batch([bad.up("model-fetch", fetch)]) == []

    pending = make_device("cam-p", fresh_tpm=True)  # another TPM: the template EK is enrolled already
    assert enroll(env.proc, env.signer, pending).status == "pending"
    release, denied = ask_key(env, pending, key_request(pending, attested.selection)[0])
    assert release is None and denied is not None and "pending" in denied.reasons[0]

    stranger = make_device("cam-x")
    unknown = stranger.up("key-request", key_request(stranger, attested.selection)[0])
    assert env.proc.handle_batch([unknown]) == []  # not even a denial to an unknown device
    counts = env.proc.counters.snapshot()
    assert counts["rejected.device_untrusted"] == 1 and counts["rejected.device_not_trusted"] == 2
    assert counts["rejected.device_unknown"] == 1 and counts.get("keys.released", 0) == 0
    assert env.repo.models.leases() == []


def test_entitlement_freshness_and_kek_are_required(env: Env, make_device: DeviceFactory) -> None:
    env.publish()
    dev, attested = trusted(env, make_device, "cam-2")
    assert attested.offers == []  # entitled to nothing yet
    payload, key = key_request(dev, attested.selection)
    release, denied = ask_key(env, dev, payload)
    assert release is None and denied is not None and "not entitled" in denied.reasons[0]
    release, denied = ask_key(env, dev, key_request(dev, attested.selection, "9.9.9", key=key)[0])
    assert denied is not None and "no published model" in denied.reasons[0]

    env.entitle(device_id="cam-2")
    no_kek = env.with_context(kek=None)
    release, denied = ask_key(no_kek, dev, key_request(dev, attested.selection, key=key)[0])
    assert release is None and denied is not None and "cannot release" in denied.reasons[0]
    release, denied = ask_key(env, dev, key_request(dev, attested.selection, key=key)[0])
    assert release is not None and denied is None

    # Once the verdict expires (no re-attestation), neither keys nor downloads.
    device = env.repo.device("cam-2")
    assert device is not None and device.trusted_until is not None
    env.clock.set(device.trusted_until)
    release, denied = ask_key(env, dev, key_request(dev, attested.selection, key=key)[0])
    assert release is None and denied is not None and "expired" in denied.reasons[0]
    fetch = dev.plain(ModelFetch(name=NAME, version="1.0.0", offset=0, length=1024))
    assert env.proc.handle_batch([dev.up("model-fetch", fetch)]) == []
    assert env.proc.counters.get("rejected.trust_expired") == 1
    assert env.proc.counters.get("rejected.device_not_trusted") == 1


# --------------------------------------------------------------------------------------------------
# downloads
# --------------------------------------------------------------------------------------------------
def test_chunks_reassemble_to_the_offered_package(env: Env, make_device: DeviceFactory) -> None:
    published = env.publish()
    env.entitle(device_class=DEVICE_CLASS)
    dev, attested = trusted(env, make_device, "cam-3")
    [ref] = attested.offers[0].models
    package = fetch_all(env, dev, "1.0.0", ref.size, step=1000)
    assert hashlib.sha256(package).digest() == ref.package_sha256 == published.package_sha256
    manifest = read_manifest(package, trusted_keys={env.signing.kid: env.signing.public_key})
    assert manifest.version == "1.0.0"
    assert env.proc.counters.get("model.bytes_sent") == ref.size
    assert env.proc.counters.get("model.chunks_sent") == -(-ref.size // 1000)
    # Past the end, or a version that does not exist: refused, nothing sent.
    for offset, version in ((ref.size, "1.0.0"), (0, "2.0.0")):
        fetch = dev.plain(ModelFetch(name=NAME, version=version, offset=offset, length=10))
        assert env.proc.handle_batch([dev.up("model-fetch", fetch)]) == []
    assert env.proc.counters.get("rejected.fetch_out_of_range") == 1
    assert env.proc.counters.get("rejected.model_unknown") == 1
    # A trusted device that is not entitled gets nothing either.
    model_admin.revoke_entitlement(env.repo, NAME, signer=env.signer, device_class=DEVICE_CLASS,
                                   now=env.clock.now_ms())
    fetch = dev.plain(ModelFetch(name=NAME, version="1.0.0", offset=0, length=10))
    assert env.proc.handle_batch([dev.up("model-fetch", fetch)]) == []
    assert env.proc.counters.get("rejected.not_entitled") == 1


# --------------------------------------------------------------------------------------------------
# business hours
# --------------------------------------------------------------------------------------------------
def _window_excluding(now_ms: int) -> BusinessHours:
    minute = (now_ms % 86_400_000) // 60_000
    start = (minute + 60) % 1440
    end = (minute + 120) % 1440 or 1440
    return BusinessHours(start, end) if start < end else BusinessHours(start, 1440)


def test_off_hours_releases_and_downloads_alert_or_are_blocked(env: Env, make_device: DeviceFactory) -> None:
    env.publish()
    env.entitle(device_class=DEVICE_CLASS)
    dev, attested = trusted(env, make_device, "cam-4")
    hours = _window_excluding(env.clock.now_ms())
    assert not hours.contains(env.clock.now_ms())
    warn = env.with_context(alerts=AlertSettings(business_hours=hours, block_off_hours=False))
    payload, key = key_request(dev, attested.selection)
    release, _ = ask_key(warn, dev, payload)
    assert release is not None
    [alert] = env.repo.models.alerts(kind="key_release_off_hours")
    assert (alert.device_id, alert.model, alert.count) == ("cam-4", NAME, 1)
    for offset in (0, 100):  # two fetches of one download: one alert
        fetch = dev.plain(ModelFetch(name=NAME, version="1.0.0", offset=offset, length=100))
        assert len(warn.proc.handle_batch([dev.up("model-fetch", fetch)])) == 1
    [alert] = env.repo.models.alerts(kind="model_download_off_hours")
    assert (alert.device_id, alert.count) == ("cam-4", 1)

    block = env.with_context(alerts=AlertSettings(business_hours=hours, block_off_hours=True))
    release, denied = ask_key(block, dev, key_request(dev, attested.selection, key=key)[0])
    assert release is None and denied is not None and "business hours" in denied.reasons[0]
    fetch = dev.plain(ModelFetch(name=NAME, version="1.0.0", offset=0, length=100))
    assert block.proc.handle_batch([dev.up("model-fetch", fetch)]) == []
    assert block.proc.counters.get("rejected.off_hours") == 2
    assert env.repo.models.alerts(kind="key_release_off_hours")[0].count == 2
    # Inside business hours nothing is raised.
    all_day = AlertSettings(business_hours=BusinessHours(0, 1440), block_off_hours=True)
    inside = env.with_context(alerts=all_day)
    release, _ = ask_key(inside, dev, key_request(dev, attested.selection, key=key)[0])
    assert release is not None and env.repo.models.alerts(kind="key_release_off_hours")[0].count == 2


# --------------------------------------------------------------------------------------------------
# telemetry
# --------------------------------------------------------------------------------------------------
def test_telemetry_usage_and_extraction_alarm(env: Env, make_device: DeviceFactory) -> None:
    env.publish()
    dev, _ = trusted(env, make_device, "cam-5")
    now = env.clock.now_ms()

    def report(since: int, until: int, clients: tuple[ClientUsage, ...], name: str = NAME) -> list[Outgoing]:
        t = Telemetry(name=name, version="1.0.0", since=since, until=until,
                      served=sum(c.served for c in clients), refused=sum(c.refused for c in clients),
                      clients=clients)
        return env.proc.handle_batch([dev.up("telemetry", dev.plain(t))])

    calm = ClientUsage(client="app-1", served=40, refused=1, statistic=0.97, alarm=False)
    thief = ClientUsage(client="scraper", served=500, refused=0, statistic=0.31, alarm=True)
    assert report(now - 60_000, now - 30_000, (calm,)) == []
    assert report(now - 30_000, now, (calm, thief)) == []
    [usage] = env.repo.models.usage(device_id="cam-5")
    assert (usage.served, usage.refused, usage.reports) == (580, 2, 2)
    clients = {c.client: c for c in env.repo.models.client_usage(device_id="cam-5")}
    assert clients["app-1"].served == 80 and not clients["app-1"].alarm
    assert clients["scraper"].alarm and clients["scraper"].statistic_micro == 310_000
    [alert] = env.repo.models.alerts(kind="extraction_suspected")
    assert (alert.device_id, alert.model, alert.severity, alert.count) == ("cam-5", NAME, "critical", 1)
    assert "scraper" in alert.message and "scraper" in alert.dedup_key
    # The same client again bumps the open alert; another client gets its own.
    env.clock.advance(60_000)
    later = env.clock.now_ms()
    other = dataclasses.replace(thief, client="scraper-2")
    report(now, later, (thief, other))
    alerts = {a.dedup_key: a.count for a in env.repo.models.alerts(kind="extraction_suspected")}
    assert sorted(alerts.values()) == [1, 2] and len(alerts) == 2
    # A replayed (overlapping) period, a nonsense period and an unknown model are refused.
    assert report(now, later, (calm,)) == []
    assert report(later + 10_000, later, (calm,)) == []
    assert report(later, later + 1, (calm,), name="nothing") == []
    counts = env.proc.counters.snapshot()
    assert (counts["rejected.telemetry_overlap"], counts["rejected.telemetry_invalid"],
            counts["rejected.model_unknown"], counts["telemetry.accepted"]) == (1, 1, 1, 3)
    assert env.repo.models.usage(device_id="cam-5")[0].served == 580 + 1000


# --------------------------------------------------------------------------------------------------
# runtime and load status (model-status)
# --------------------------------------------------------------------------------------------------
def test_model_status_stores_the_runtime_and_load_failures_and_refuses_bad_reports(
        env: Env, make_device: DeviceFactory) -> None:
    env.publish()
    dev, _ = trusted(env, make_device, "cam-9")
    reason = "Unsupported model IR version: 14, max supported IR version: 13"

    def report(status: ModelStatus | bytes) -> list[Outgoing]:
        payload = status if isinstance(status, bytes) else dev.plain(status)
        return env.proc.handle_batch([dev.up("model-status", payload)])

    assert report(ModelStatus(runtime="1.31.1")) == []
    assert env.repo.models.runtime("cam-9") == ("1.31.1", env.clock.now_ms())
    assert env.repo.models.loads(device_id="cam-9") == []
    failed = ModelLoad(name=NAME, version="1.0.0", state="failed", error=reason)
    assert report(ModelStatus(runtime="1.31.1", models=(failed,))) == []
    [load] = env.repo.models.loads(name=NAME, state="failed")
    assert (load.device_id, load.version, load.error) == ("cam-9", "1.0.0", reason)
    assert load.onnxruntime == "1.31.1"

    # Refused, and nothing of it stored: a version never published (the whole report), a malformed
    # report (an error of several lines, one too long, a failure without a reason), a revoked device.
    unknown = ModelLoad(name=NAME, version="9.9.9", state="loaded")
    assert report(ModelStatus(runtime="1.32.0", models=(unknown,))) == []
    assert env.repo.models.runtime("cam-9") is not None and env.repo.models.runtime("cam-9")[0] == "1.31.1"
    raw = json.loads(dev.plain(ModelStatus(runtime="1.31.1", models=(failed,))))
    for error in ("line one\nline two", "x" * 513, ""):
        raw["body"]["models"][0]["error"] = error
        raw["id"] = new_message_id()
        assert report(json.dumps(raw).encode()) == []
    counts = env.proc.counters.snapshot()
    assert (counts["rejected.model_unknown"], counts["rejected.malformed"],
            counts["model_status.accepted"], counts["model.load_failures"]) == (1, 3, 2, 1)

    # A later load succeeds: the latest report wins, the failure is gone.
    loaded = ModelLoad(name=NAME, version="1.0.0", state="loaded")
    assert report(ModelStatus(runtime="1.31.1", models=(loaded,))) == []
    assert env.repo.models.loads(name=NAME, state="failed") == []
    admin.revoke_device(env.repo, "cam-9", signer=env.signer, now=env.clock.now_ms())
    report(ModelStatus(runtime="1.31.1", models=(failed,)))
    assert env.proc.counters.snapshot()["rejected.device_revoked"] == 1
    assert [x.state for x in env.repo.models.loads(device_id="cam-9")] == ["loaded"]


# --------------------------------------------------------------------------------------------------
# the lease life cycle
# --------------------------------------------------------------------------------------------------
def test_leases_expire_are_revoked_and_follow_policy_changes(env: Env, make_device: DeviceFactory) -> None:
    env.publish()
    env.entitle(device_class=DEVICE_CLASS)
    a, att_a = trusted(env, make_device, "cam-6")
    b, att_b = trusted(env, make_device, "cam-7", fresh_tpm=True)
    c, att_c = trusted(env, make_device, "cam-8", fresh_tpm=True)
    key_a, key_c = None, None
    for dev, att in ((a, att_a), (b, att_b), (c, att_c)):
        payload, key = key_request(dev, att.selection)
        assert ask_key(env, dev, payload)[0] is not None
        key_a = key if dev is a else key_a
        key_c = key if dev is c else key_c
    scheduler = Scheduler(env.ctx, env.repo, env.proc.counters)

    # An admin revokes B: the sweep revokes its lease (the device acts on the signed revocation).
    admin.revoke_device(env.repo, "cam-7", signer=env.signer, now=env.clock.now_ms())
    scheduler.run_once()
    assert [x.state for x in env.repo.models.leases(device_id="cam-7")] == ["revoked"]
    assert env.proc.counters.get("leases.revoked") == 1

    # A policy change supersedes the active leases: the devices are offered the model again and the
    # next release carries the new policy.
    change = model_admin.set_policy(env.repo, NAME, ["lease_quota=10", "output_mode=topk"],
                                    now=env.clock.now_ms())
    assert change.superseded == 2 and change.after.lease_quota == 10
    env.clock.advance(1_000)
    [offer] = attest(env, a, "manual").offers
    assert offer.models[0].version == "1.0.0"
    release, _ = ask_key(env, a, key_request(a, att_a.selection, key=key_a)[0])
    assert release is not None and release.policy.lease_quota == 10 and release.policy.output_mode == "topk"

    # Withdrawing C's entitlement (C is entitled only through its class) revokes its lease and queues a
    # signed key-denied for it; A keeps its lease through its own device entitlement.
    env.entitle(device_id="cam-6")
    withdrawal = model_admin.revoke_entitlement(env.repo, NAME, signer=env.signer, device_class=DEVICE_CLASS,
                                                now=env.clock.now_ms())
    assert withdrawal.removed and [x.device_id for x in withdrawal.revoked] == ["cam-8"]
    [row] = [r for r in env.repo.outbox() if r.topic == topics.device_down("cam-8", "key-denied")]
    notice = decode_signed(row.payload, keys={env.signer.kid: env.signer.public_key}, aud="cam-8").message
    assert isinstance(notice, KeyDenied) and notice.name == NAME and "no longer entitled" in notice.reasons[0]
    assert {x.state for x in env.repo.models.leases(device_id="cam-6", state="active")} == {"active"}

    # A lease not renewed in time expires in the scheduler's sweep.
    [lease] = env.repo.models.leases(device_id="cam-6", state="active")
    env.clock.set(lease.expires_at)
    scheduler.run_once()
    assert env.repo.models.leases(device_id="cam-6", state="active") == []
    assert env.repo.models.leases(device_id="cam-6")[0].state == "expired"
    assert env.proc.counters.get("leases.expired") == 1
    del key_c


# --------------------------------------------------------------------------------------------------
# over a real broker, through a worker
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def worker_config(server_config: ServerConfig, fleet_pki: BrokerPki, manufacturer_ca: ManufacturerCA,
                  mqtt_broker: MosquittoBroker) -> ServerConfig:
    assert mqtt_broker.port is not None
    return make_config(server_config.data_dir, fleet_pki, manufacturer_ca.bundle, port=mqtt_broker.port,
                       database_url=server_config.database_url)


@pytest.fixture
def worker(worker_config: ServerConfig, env: Env) -> Iterator[Worker]:
    w = Worker(worker_config, ctx=env.ctx, repo=env.repo).start()
    try:
        w.wait_connected(WAIT)
        yield w
    finally:
        w.stop()


class DeviceInbox:
    """What a device receives: signed messages verified with the pinned key, and chunk frames."""

    def __init__(self, client: MqttClient, env: Env, device_id: str) -> None:
        self.client, self.env, self.device_id = client, env, device_id

    def next(self, kind: type[Message] | str) -> Any:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            inbound = self.client.receive(max(0.0, deadline - time.monotonic()))
            if inbound is None:
                break
            if inbound.topic == topics.device_down(self.device_id, "model-chunk"):
                if kind == "chunk":
                    return decode_chunk(inbound.payload)
                continue
            message = decode_signed(inbound.payload, keys={self.env.signer.kid: self.env.signer.public_key},
                                    aud=self.device_id).message
            if not isinstance(kind, str) and isinstance(message, kind):
                return message
        raise AssertionError(f"no {kind} for {self.device_id} within {WAIT}s")


@pytest.mark.mqtt
def test_over_mqtt_offer_release_and_download(env: Env, worker: Worker, make_device: DeviceFactory,
                                              make_client: ClientFactory, credentials: Credentials) -> None:
    published = env.publish()
    env.entitle(device_class=DEVICE_CLASS)
    dev = make_device("cam-9")
    admin.preregister_ek(env.repo, dev.tpm.ek_certificate(), now=env.clock.now_ms())
    assert enroll(env.proc, env.signer, dev).status == "admitted"
    client = make_client(credentials.device("cam-9"), client_id="cam-9",
                         subscriptions=(topics.device_down_filter("cam-9"),))
    inbox = DeviceInbox(client, env, "cam-9")
    send: Callable[[str, bytes], None] = lambda kind, payload: client.publish(  # noqa: E731
        topics.device_up("cam-9", kind), payload).wait(WAIT)

    send("hello", dev.hello("boot"))
    challenge = inbox.next(Challenge)
    send("evidence", dev.evidence(challenge))
    result = inbox.next(AttestationResult)
    assert result.verdict == "trusted" and result.lease_until > result.expires - 1
    [ref] = inbox.next(ModelOffer).models
    assert ref.package_sha256 == published.package_sha256

    package = bytearray()
    while len(package) < ref.size:  # 1 KiB fetches through the broker: binary frames on model-chunk
        fetch = ModelFetch(name=NAME, version=ref.version, offset=len(package), length=1024)
        send("model-fetch", dev.plain(fetch))
        chunk = inbox.next("chunk")
        assert chunk.offset == len(package)
        package += chunk.data
    assert hashlib.sha256(package).digest() == ref.package_sha256

    selection = {bank: list(pcrs) for bank, pcrs in challenge.selection.items()}
    send("key-request", key_request(dev, selection, ref.version)[0])
    release = inbox.next(KeyRelease)
    key = dev.tpm.bound_key(release.key_name[2:18].hex())
    data_key = dev.tpm.unwrap(key, release.wrapped_key, WRAP_LABEL)
    manifest = read_manifest(bytes(package), trusted_keys={env.signing.kid: env.signing.public_key})
    assert bytes(decrypt_package(bytes(package), manifest, data_key)) == env.models["1.0.0"]
    wait_until(lambda: worker.counters.get("keys.released") == 1, what="release counted")
