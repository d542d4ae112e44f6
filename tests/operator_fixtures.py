"""Fixtures for tests that set the fleet up the way an operator does (``pytest_plugins``):

* ``data_dir``: ``fleet-server init`` with the test manufacturer CA as trust bundle;
* ``broker``: Mosquitto with the files init made (device and server listeners, device CRL), and
  ``server.toml`` pointed at its server listener;
* ``worker``: a fleet-server worker from that ``server.toml``, connected, serving the update
  repository's files over MQTT as ``fleet-server run`` does (none before ``updates init``).

A test module may override ``broker`` (requesting ``broker``) to adjust ``server.toml`` before the
worker reads it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from firmware_sim.broker import MosquittoBroker
from firmware_sim.manufacturer import ManufacturerCA
from fleet_server.cli import main as fleet_server
from fleet_server.config import load_config
from fleet_server.service.worker import Worker, served_update_files

WAIT = 30.0


@pytest.fixture
def data_dir(tmp_path: Path, manufacturer_ca: ManufacturerCA, capsys: pytest.CaptureFixture[str]) -> Path:
    folder = tmp_path / "fleet"
    bundle = str(manufacturer_ca.bundle)
    assert fleet_server(["init", "--data-dir", str(folder), "--trust-bundle", bundle]) == 0
    capsys.readouterr()
    return folder


@pytest.fixture
def broker(tmp_path: Path, data_dir: Path) -> Iterator[MosquittoBroker]:
    mosquitto = MosquittoBroker.for_data_dir(tmp_path / "mosquitto", data_dir)
    mosquitto.start()
    config = data_dir / "server.toml"
    config.write_text(config.read_text().replace("port = 8884", f"port = {mosquitto.server_port}"))
    try:
        yield mosquitto
    finally:
        mosquitto.stop()


@pytest.fixture
def worker(data_dir: Path, broker: MosquittoBroker) -> Iterator[Worker]:
    config = load_config(data_dir / "server.toml")
    running = Worker(config, update_files=served_update_files(config)).start()
    try:
        running.wait_connected(WAIT)
        yield running
    finally:
        running.stop()
        running.repo.dispose()
