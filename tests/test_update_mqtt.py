"""Signed updates over MQTT end to end: a real Mosquitto broker (TLS, per-device certificates, ACL),
the real worker serving ``tuf-fetch`` from a real python-tuf repository (:mod:`tuf_fixtures`), and
the agent's :class:`~agent.update.tuf_client.UpdateClient` with its MQTT fetcher.

Refresh and download; a tampered target and one longer than its signed length refused (ngclient's
length check, hit while the chunks arrive); a file missing from the repository (``not_found``) and a
worker without a repository as clean errors; metadata kept across restarts (the second refresh
downloads nothing but the timestamp and the probe for a newer root; a replayed older timestamp is
refused); devices held by an administrator refused; a device cannot fetch on another's topic nor
read another's answers; the benchmark hook."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

import pytest

from fleet_server.service.common import ManualClock
from fleet_server.storage.models import DeviceState
from fleet_server.storage.repo import Repository
from protocol import topics
from protocol.errors import TransportError, UpdateError, UpdateVerificationError
from protocol.messages import TufFetch, encode_plain, new_message_id

pytest.register_assert_rewrite("mqtt_fixtures", "tuf_fixtures", "update_fixtures")
from mqtt_fixtures import WAIT, wait_until  # noqa: E402
from tuf_fixtures import TestRepository  # noqa: E402
from update_fixtures import TufDeviceFactory, WorkerFactory, insert_devices  # noqa: E402

from agent.update.mqtt_fetcher import CHUNK_KIND  # noqa: E402
from agent.update.tuf_client import measure_refresh_ms  # noqa: E402

pytest_plugins = ("mqtt_fixtures", "server_fixtures", "update_fixtures")
pytestmark = pytest.mark.mqtt

TARGET = "firmware/edge-camera/1.3.0.fwb"
IMAGE = bytes(range(256)) * 40  # 10240 bytes: ten 1 KiB chunks


@pytest.fixture
def repository(tmp_path: Path) -> TestRepository:
    repo = TestRepository(tmp_path / "tuf-repo")
    repo.add_target(TARGET, IMAGE, {"version": "1.3.0", "hardware_class": "edge-camera"})
    return repo


@pytest.fixture
def tuf_root(repository: TestRepository) -> bytes:
    return repository.root_bytes()


def test_refresh_and_download_a_verified_target(
        make_worker: WorkerFactory, make_tuf_device: TufDeviceFactory, repository: TestRepository,
        repo: Repository, clock: ManualClock) -> None:
    insert_devices(repo, clock, **{"dev-a": DeviceState.TRUSTED})
    worker = make_worker(repository)
    device = make_tuf_device("dev-a")
    client = device.update_client()
    target = client.fetch_target(TARGET, max_length=1 << 20)  # refreshes first
    assert target.path == TARGET and target.data == IMAGE
    assert dict(target.custom) == {"version": "1.3.0", "hardware_class": "edge-camera"}
    assert list(device.fetcher.fetched) == [
        "metadata/2.root.json", "metadata/timestamp.json", "metadata/2.snapshot.json",
        "metadata/1.targets.json", "metadata/2.firmware.json",
        f"targets/firmware/edge-camera/{hashlib.sha256(IMAGE).hexdigest()}.1.3.0.fwb"]
    assert worker.counters.get("tuf.not_found") == 1  # the probe for a newer root
    # Trusted metadata on disk: folders 0700, files 0600 (root.json is ngclient's symlink into root_history).
    folder = client.metadata_dir
    for path in [folder, *folder.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        if path.is_symlink():
            assert path.name == "root.json"
        else:
            assert mode == (0o700 if path.is_dir() else 0o600), (path, oct(mode))
    assert {p.name for p in folder.iterdir()} == {
        "root.json", "root_history", "timestamp.json", "snapshot.json", "targets.json", "firmware.json"}


def test_tampered_and_overlong_targets_are_refused(
        make_worker: WorkerFactory, make_tuf_device: TufDeviceFactory, repository: TestRepository,
        repo: Repository, clock: ManualClock) -> None:
    insert_devices(repo, clock, **{"dev-a": DeviceState.UNTRUSTED})  # an untrusted device may update
    make_worker(repository)
    device = make_tuf_device("dev-a")
    client = device.update_client()
    client.refresh()
    repository.write_target_file(TARGET, IMAGE[:-1] + b"\0")  # same length, one byte changed
    with pytest.raises(UpdateVerificationError, match="refused by TUF: LengthOrHashMismatchError"):
        client.fetch_target(TARGET, max_length=1 << 20)
    # Longer than signed: ngclient stops reading once more than the signed length arrived, so the
    # fetcher asks for one chunk past it, not for the whole (here 100 KiB longer) file.
    repository.write_target_file(TARGET, IMAGE + b"\0" * 100 * 1024)
    before = device.fetcher.requests
    with pytest.raises(UpdateVerificationError, match="DownloadLengthMismatchError: Downloaded 11264 bytes "
                                                      "exceeding the maximum allowed length of 10240"):
        client.fetch_target(TARGET, max_length=1 << 20, refresh=False)
    assert device.fetcher.requests - before == len(IMAGE) // 1024 + 1


def test_missing_files_and_no_repository_are_clean_errors(
        make_worker: WorkerFactory, make_tuf_device: TufDeviceFactory, repository: TestRepository,
        repo: Repository, clock: ManualClock) -> None:
    insert_devices(repo, clock, **{"dev-a": DeviceState.ENROLLED})
    worker = make_worker(repository)
    device = make_tuf_device("dev-a")
    client = device.update_client()
    client.refresh()
    repository.target_file(TARGET).unlink()  # listed in the signed metadata, but not served
    with pytest.raises(UpdateError, match=r"downloading target .*: DownloadHTTPError: .*not in the update "
                                          "repository") as info:
        client.fetch_target(TARGET, max_length=1 << 20, refresh=False)
    assert not isinstance(info.value, UpdateVerificationError)
    wait_until(lambda: worker.counters.get("tuf.not_found") == 2, what="two not_found answers")
    worker.stop()
    make_worker(None)  # a worker without an update repository: nothing is found
    with pytest.raises(UpdateError, match=r"refreshing the update metadata: DownloadHTTPError: "
                                          r"mqtt://fleet/metadata/timestamp\.json: not in the update "
                                          "repository"):
        device.update_client().refresh()


def test_metadata_persists_across_restarts_and_rollbacks_are_refused(
        make_worker: WorkerFactory, make_tuf_device: TufDeviceFactory, repository: TestRepository,
        repo: Repository, clock: ManualClock) -> None:
    insert_devices(repo, clock, **{"dev-a": DeviceState.TRUSTED})
    make_worker(repository)
    device = make_tuf_device("dev-a")
    first = device.update_client()
    first.refresh()
    first.fetch_target(TARGET, max_length=1 << 20)
    old_timestamp = repository.read_file("metadata/timestamp.json")
    assert old_timestamp is not None
    # A restart: nothing new in the repository -> only the timestamp and the newer-root probe.
    second = device.update_client()
    second.refresh()
    assert list(device.fetcher.fetched) == ["metadata/2.root.json", "metadata/timestamp.json"]
    # firmware.json from the cache
    assert second.fetch_target(TARGET, max_length=1 << 20, refresh=False).data == IMAGE
    assert list(device.fetcher.fetched)[2:] == [
        f"targets/firmware/edge-camera/{hashlib.sha256(IMAGE).hexdigest()}.1.3.0.fwb"]
    # The repository moves on, the device follows; then the old timestamp is replayed: refused
    # against the version the device kept on disk (a new Updater is built for every refresh).
    repository.new_timestamp()
    third = device.update_client()
    third.refresh()
    (repository.folder / "metadata" / "timestamp.json").write_bytes(old_timestamp)
    with pytest.raises(UpdateVerificationError, match="refused by TUF: BadVersionNumberError"):
        third.refresh()
    # ... and a client whose refresh failed downloads nothing on the metadata of its earlier refresh.
    with pytest.raises(UpdateVerificationError, match="refused by TUF: BadVersionNumberError"):
        third.fetch_target(TARGET, max_length=1 << 20, refresh=False)


def test_held_devices_are_refused(
        make_worker: WorkerFactory, make_tuf_device: TufDeviceFactory, repository: TestRepository,
        repo: Repository, clock: ManualClock) -> None:
    insert_devices(repo, clock, **{"dev-q": DeviceState.QUARANTINED, "dev-p": DeviceState.PENDING})
    worker = make_worker(repository)
    for device_id in ("dev-q", "dev-p"):
        with pytest.raises(UpdateError, match="the server refused the request"):
            make_tuf_device(device_id).update_client().refresh()
    assert worker.counters.get("rejected.device_held") == 2


def test_a_device_cannot_fetch_for_or_read_the_answers_of_another(
        make_worker: WorkerFactory, make_tuf_device: TufDeviceFactory, repository: TestRepository,
        repo: Repository, clock: ManualClock) -> None:
    insert_devices(repo, clock, **{"dev-a": DeviceState.TRUSTED, "dev-b": DeviceState.TRUSTED})
    worker = make_worker(repository)
    # A subscribes to every device's down topics too: the broker grants it, but its ACL filters deliveries.
    a = make_tuf_device("dev-a", extra_filters=("fleet/v1/devices/+/down/#",))
    spoofed = encode_plain(TufFetch(request_id=new_message_id(), path="metadata/timestamp.json", offset=0,
                                    length=1024), ts=clock.now_ms())
    with pytest.raises(TransportError, match="Not authorized"):
        a.client.publish(topics.device_up("dev-b", "tuf-fetch"), spoofed).wait(WAIT)
    b = make_tuf_device("dev-b")
    b_client = b.update_client()
    b_client.refresh()
    b_client.fetch_target(TARGET, max_length=1 << 20)
    # The worker answered B on B's topic only; A, fetching after B (one worker connection: in order),
    # saw only its own answers.
    a.update_client().refresh()
    assert a.topics and set(a.topics) == {topics.device_down("dev-a", CHUNK_KIND)}
    assert worker.counters.get("received.tuf-fetch") == b.fetcher.requests + a.fetcher.requests


def test_refresh_benchmark_hook(
        make_worker: WorkerFactory, make_tuf_device: TufDeviceFactory, repository: TestRepository,
        repo: Repository, clock: ManualClock) -> None:
    insert_devices(repo, clock, **{"dev-a": DeviceState.TRUSTED})
    make_worker(repository)
    device = make_tuf_device("dev-a")
    client = device.update_client()
    assert measure_refresh_ms(client, rounds=3) > 0
    assert list(device.fetcher.fetched)[-2:] == ["metadata/2.root.json", "metadata/timestamp.json"]
