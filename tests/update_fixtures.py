"""Fixtures for signed-update tests: the worker serving an update repository over real Mosquitto, a
device's TUF client on its own MQTT connection, and a device's A/B boot folder with the installer.

Test modules load them with ``pytest_plugins = ("mqtt_fixtures", "server_fixtures", "update_fixtures")``
and define the fixture ``tuf_root`` (the root metadata devices are provisioned with).

* ``make_worker(files)`` - a started :class:`~fleet_server.service.worker.Worker` on the test broker
  serving ``files`` (any :class:`~fleet_server.service.tuf_files.RepositoryFiles`, or None).
* ``make_tuf_device(device_id, **fetcher_options)`` - a :class:`TufDevice`: the device's MQTT
  connection (its certificate, its subtree) with a receive loop feeding ``tuf-chunk`` frames to its
  fetcher; :meth:`TufDevice.update_client` is the agent's :class:`~agent.update.tuf_client.UpdateClient`.
* ``tpm`` - a :class:`~agent.tpm.adapter.TpmAdapter` on a fresh swtpm (the anti-rollback floor).
* :class:`BootDevice` - a boot folder with the factory release in slot a, the agent's update state
  folder and an :class:`~agent.update.installer.Installer`; :meth:`BootDevice.power_cycle` runs the
  bootloader's decision and starts a new installer, as after a power cycle.
* :func:`insert_devices` - device rows in given states (the worker serves admitted devices only).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.log import EventLogger
from agent.tpm.adapter import TpmAdapter
from agent.update import bootctl
from agent.update.floor import TpmVersionFloor
from agent.update.installer import Installer, InstallerSettings, StatusOutbox, TargetSource
from agent.update.mqtt_fetcher import CHUNK_KIND, MqttFetcher
from agent.update.tuf_client import UpdateClient
from firmware_sim.broker import BrokerPki, MosquittoBroker
from firmware_sim.manufacturer import ManufacturerCA
from firmware_sim.swtpm import Swtpm
from fleet_server.config import ServerConfig
from fleet_server.service.common import ManualClock
from fleet_server.service.context import ServiceContext
from fleet_server.service.tuf_files import RepositoryFiles
from fleet_server.service.worker import Worker
from fleet_server.storage.models import DeviceState
from fleet_server.storage.repo import NewDevice, Repository
from protocol import topics
from protocol.encoding import canonical_bytes
from protocol.mqtt import MqttClient

pytest.register_assert_rewrite("mqtt_fixtures", "server_fixtures")
from mqtt_fixtures import WAIT, ClientFactory, Credentials  # noqa: E402
from server_fixtures import make_config  # noqa: E402

# -- the server side ---------------------------------------------------------------------------------
WorkerFactory = Callable[[RepositoryFiles | None], Worker]


@pytest.fixture
def make_worker(server_config: ServerConfig, fleet_pki: BrokerPki, manufacturer_ca: ManufacturerCA,
                mqtt_broker: MosquittoBroker, ctx: ServiceContext,
                repo: Repository) -> Iterator[WorkerFactory]:
    assert mqtt_broker.port is not None
    config = make_config(server_config.data_dir, fleet_pki, manufacturer_ca.bundle, port=mqtt_broker.port,
                         database_url=server_config.database_url)
    made: list[Worker] = []

    def factory(files: RepositoryFiles | None) -> Worker:
        worker = Worker(config, ctx=ctx, repo=repo, update_files=files).start()
        made.append(worker)
        worker.wait_connected(WAIT)
        return worker

    try:
        yield factory
    finally:
        for worker in made:
            worker.stop()


def insert_devices(repo: Repository, clock: ManualClock, **states: DeviceState) -> None:
    """Device rows (class ``edge-camera``, firmware 1.2.0) in the given states."""
    now = clock.now_ms()
    with repo.write() as tx:
        for device_id, state in states.items():
            tx.insert_device(NewDevice(
                id=device_id, state=state, device_class="edge-camera", firmware_version="1.2.0", ek_cert=b"c",
                ek_fingerprint=hashlib.sha256(device_id.encode()).hexdigest(), ek_public=b"e", ak_public=b"a",
                ak_name=b"n", csr=None, enroll_request_id=None, cert_serial=None, now=now,
                next_attestation_at=now + 3_600_000), cause="test")


# -- the device's TUF client over MQTT -----------------------------------------------------------------
class TufDevice:
    """A device's MQTT connection with the agent's receive loop reduced to what updates need: every
    ``tuf-chunk`` frame goes to the fetcher, every topic received is recorded."""

    def __init__(self, client: MqttClient, device_id: str, state_dir: Path, root: bytes,
                 **options: object) -> None:
        self.client, self.device_id, self.state_dir, self.root = client, device_id, state_dir, root
        self.options = options
        self.topics: list[str] = []
        self.fetcher = self._fetcher()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _fetcher(self) -> MqttFetcher:
        self.options.setdefault("chunk", 1024)
        self.options.setdefault("timeout", WAIT)
        return MqttFetcher(self.client, self.device_id, **self.options)  # type: ignore[arg-type]

    def _pump(self) -> None:
        chunk_topic = topics.device_down(self.device_id, CHUNK_KIND)
        while not self._stop.is_set():
            inbound = self.client.receive(0.1)
            if inbound is None:
                continue
            self.topics.append(inbound.topic)
            if inbound.topic == chunk_topic:
                self.fetcher.deliver(inbound.payload)

    def update_client(self) -> UpdateClient:
        """A new UpdateClient on the same state folder and a new fetcher (an agent restart)."""
        self.fetcher = self._fetcher()
        return UpdateClient(metadata_dir=self.state_dir / "tuf", root=self.root, fetcher=self.fetcher)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


TufDeviceFactory = Callable[..., TufDevice]


@pytest.fixture
def make_tuf_device(make_client: ClientFactory, credentials: Credentials, tmp_path: Path,
                    tuf_root: bytes) -> Iterator[TufDeviceFactory]:
    made: list[TufDevice] = []

    def factory(device_id: str, *, extra_filters: tuple[str, ...] = (), **options: object) -> TufDevice:
        client = make_client(credentials.device(device_id), client_id=device_id,
                             subscriptions=(topics.device_down_filter(device_id), *extra_filters))
        device = TufDevice(client, device_id, tmp_path / f"state-{device_id}", tuf_root, **options)
        made.append(device)
        return device

    try:
        yield factory
    finally:
        for device in made:
            device.stop()


# -- the device's boot folder and installer ------------------------------------------------------------
class RecordingRebooter:
    """The platform's reboot, recorded (the test power-cycles with :meth:`BootDevice.power_cycle`)."""

    def __init__(self) -> None:
        self.reasons: list[str] = []

    def reboot(self, reason: str) -> None:
        self.reasons.append(reason)


class BootDevice:
    """A boot folder with the factory release ``running`` in slot a, the agent's state folder, the TPM."""

    def __init__(self, root: Path, tpm: TpmAdapter, source: TargetSource, *, device_class: str,
                 running: str, now: float, checks: list[tuple[str, Any]] | None = None) -> None:
        self.root = root
        self.boot = root / "boot"
        self.state = root / "state" / "update"
        self.tpm = tpm
        self.source = source
        self.device_class = device_class
        self.rebooter = RecordingRebooter()
        self.now = now
        self.checks = checks or []
        slot_a = bootctl.slot_dir(self.boot, "a")
        slot_a.mkdir(parents=True)
        (slot_a / "firmware.bin").write_bytes(b"factory firmware")
        release = canonical_bytes({"device_class": device_class, "version": running})
        (slot_a / bootctl.RELEASE_FILE).write_bytes(release)
        bootctl.choose_boot_slot(self.boot)
        self.installer = self.new_installer()

    def new_installer(self) -> Installer:
        settings = InstallerSettings(boot_dir=self.boot, device_class=self.device_class,
                                     fallback_version="0.0.1", max_target_size=1 << 20)
        return Installer(settings, state_dir=self.state, source=self.source,
                         floor=TpmVersionFloor(lambda: self.tpm), rebooter=self.rebooter,
                         outbox=StatusOutbox(self.state / "outbox.json"), health_checks=self.checks,
                         clock=lambda: self.now, log=EventLogger(logging.getLogger("test.update")))

    def power_cycle(self, source: TargetSource | None = None) -> bootctl.BootControl:
        """The bootloader picks a slot, the agent starts again (state read back from the files), with
        ``source`` as its update channel when given (a restarted agent's new TUF client)."""
        if source is not None:
            self.source = source
        ctl = bootctl.choose_boot_slot(self.boot)
        self.installer = self.new_installer()
        self.installer.on_boot()
        return ctl

    def states(self) -> list[str]:
        return [s.state for s in self.installer.outbox.statuses()]

    def last(self) -> Any:
        return self.installer.outbox.statuses()[-1]

    def trusted(self, release: str, *, this_boot: bool = True) -> None:
        self.installer.on_verdict(verdict="trusted", release=release, reasons=(), this_boot=this_boot)

    def slot_files(self, slot: str) -> dict[str, bytes]:
        folder = bootctl.slot_dir(self.boot, slot)
        return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.exists() else {}

    def boot_files(self) -> dict[str, bytes]:
        """Every file of the boot folder (both slots and ``bootctl.json``) by its relative path."""
        return {str(p.relative_to(self.boot)): p.read_bytes() for p in sorted(self.boot.rglob("*"))
                if p.is_file()}

    def assert_untouched(self, slot_a: dict[str, bytes]) -> None:
        """Nothing was written: slot a as before, no slot b, no trial, no reboot asked."""
        assert self.slot_files("a") == slot_a
        assert not bootctl.slot_dir(self.boot, "b").exists()
        assert bootctl.read(self.boot).trial is None
        assert sorted(p.name for p in self.boot.iterdir()) == ["bootctl.json", "slot-a"]
        assert self.rebooter.reasons == []


@pytest.fixture
def tpm(swtpm: Swtpm, tmp_path: Path) -> Iterator[TpmAdapter]:
    adapter = TpmAdapter(swtpm.tcti, tmp_path / "tpm-state")
    adapter.open()
    try:
        yield adapter
    finally:
        adapter.close()
