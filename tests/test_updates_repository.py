"""The TUF update repository (fleet_server.updates) against an independent python-tuf client.

The client is python-tuf's own ``ngclient.Updater``, bootstrapped with the exported root, fetching
over HTTP from the real console server (waitress, ``start_console``) of a data folder made by
``fleet-server init``.  Nothing of python-tuf is mocked.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import shutil
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from tuf.api.exceptions import ExpiredMetadataError, UnsignedMetadataError
from tuf.api.metadata import Metadata
from tuf.ngclient import Updater

from firmware_sim.testmodel import small_classifier
from fleet_server.cli import main
from fleet_server.config import ServerConfig
from fleet_server.console.server import ConsoleServer, start_console
from fleet_server.keys import load_model_signing_key
from fleet_server.modelstore.kek import load_kek
from fleet_server.modelstore.store import PackageStore, model_target_path, publish_model
from fleet_server.storage.db import create_engine
from fleet_server.storage.repo import Repository
from fleet_server.updates.renewer import UpdateRenewer
from fleet_server.updates.repository import (
    ALL_ROLES,
    UpdateRepository,
    UpdatesError,
    open_update_repository,
    target_file_name,
)

pytest.register_assert_rewrite("console_fixtures")
from console_fixtures import console_settings  # noqa: E402

pytest_plugins = ("console_fixtures",)

FIRMWARE_PATH = "firmware/edge-camera/1.3.0.fwb"
FIRMWARE = b"firmware bundle 1.3.0 " * 100


@dataclass
class Clock:
    """Seconds since the epoch, set by the test."""

    offset: float = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@dataclass
class Served:
    config: ServerConfig
    repo: UpdateRepository
    clock: Clock
    server: ConsoleServer
    tmp: Path

    @property
    def base(self) -> str:
        return f"{self.server.url}/updates"

    def client(self, name: str = "device", root: bytes | None = None) -> Updater:
        folder = self.tmp / name
        (folder / "metadata").mkdir(parents=True, exist_ok=True)
        (folder / "targets").mkdir(exist_ok=True)
        return Updater(str(folder / "metadata"), f"{self.base}/metadata/", str(folder / "targets"),
                       f"{self.base}/targets/", bootstrap=root or self.repo.root_metadata())

    def get(self, path: str) -> tuple[int, dict[str, str], bytes]:
        host, port = self.server.address
        conn = http.client.HTTPConnection(host, port, timeout=10)
        try:
            conn.request("GET", path)  # sent as written: no client-side normalisation of ".."
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()


def _updates_config(config: ServerConfig, **changes: Any) -> ServerConfig:
    return dataclasses.replace(config, updates=dataclasses.replace(config.updates, **changes))


@pytest.fixture
def served(console_config: ServerConfig, tmp_path: Path) -> Iterator[Served]:
    config = console_settings(_updates_config(console_config, timestamp_expiry=3600.0), enabled=True, port=0)
    clock = Clock()
    repo = UpdateRepository.create(config.updates.dir, config.updates, clock=clock)
    server = start_console(config)
    try:
        yield Served(config, repo, clock, server, tmp_path)
    finally:
        server.stop()


def _offline(repo: UpdateRepository, role: str, keep: int, into: Path) -> list[Path]:
    """Move all but ``keep`` of ``role``'s key files off the server (into ``into``)."""
    into.mkdir(parents=True, exist_ok=True)
    moved = []
    for path in sorted(repo.keys.role_dir(role).glob("*.pem"))[keep:]:
        target = into / path.name
        shutil.move(path, target)
        moved.append(target)
    return moved


def test_key_files_are_0600_in_0700_folders(served: Served) -> None:
    keys = served.repo.keys.root
    files = list(keys.rglob("*.pem"))
    assert len(files) == 3 + 3 + 1 + 1 + 3 + 3  # root, targets, snapshot, timestamp, firmware, models
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for folder in [keys, *(p for p in keys.iterdir() if p.is_dir()), served.repo.folder]:
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder


def test_an_independent_client_refreshes_and_downloads_every_target(served: Served) -> None:
    served.repo.add_target("firmware", FIRMWARE_PATH, FIRMWARE, {"class": "edge-camera", "version": "1.3.0"})
    kek = load_kek(served.config.models.kek_file)
    assert kek is not None
    engine = create_engine(served.config.database_url)
    try:
        published = publish_model(Repository(engine), model=small_classifier(), name="classifier",
                                  version="1.0.0",
                                  signing_key=load_model_signing_key(served.config.models.signing_key),
                                  kek=kek, store=PackageStore(served.config.models.store_dir),
                                  now=time.time_ns() // 1_000_000, targets=served.repo)
    finally:
        engine.dispose()
    package = published.path.read_bytes()
    model_path = model_target_path("classifier", "1.0.0")
    assert model_path == "models/classifier/1.0.0.pkg"
    [listed] = served.repo.list_targets("models")
    assert listed.published and listed.custom == {"name": "classifier", "version": "1.0.0",
                                                  "package_sha256": published.package_sha256.hex()}

    client = served.client()
    client.refresh()
    expected = {FIRMWARE_PATH: FIRMWARE, model_path: package}
    for path, data in expected.items():
        info = client.get_targetinfo(path)
        assert info is not None, path
        downloaded = client.download_target(info)
        assert Path(downloaded).read_bytes() == data
    info = client.get_targetinfo(FIRMWARE_PATH)
    assert info is not None and info.custom == {"class": "edge-camera", "version": "1.3.0"}

    # The consistent-snapshot layout and content types the client used.
    status, headers, body = served.get("/updates/metadata/timestamp.json")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert Metadata.from_bytes(body).signed.type == "timestamp"
    digest = served.repo.list_targets("firmware")[0].sha256.hex()
    status, headers, body = served.get(f"/updates/targets/{target_file_name(FIRMWARE_PATH, digest)}")
    assert status == 200 and headers["Content-Type"] == "application/octet-stream" and body == FIRMWARE
    assert "Set-Cookie" not in headers  # no login, no session


def test_a_version_signed_by_too_few_keys_is_not_published(served: Served) -> None:
    offline = _offline(served.repo, "firmware", 1, served.tmp / "offline")
    info = served.repo.add_target("firmware", FIRMWARE_PATH, FIRMWARE, {})
    assert not info.published
    status = {r.role: r for r in served.repo.status()}["firmware"]
    assert (status.version, status.pending_version, status.pending_signatures,
            status.threshold) == (1, 2, 1, 2)
    client = served.client()
    client.refresh()
    assert client.get_targetinfo(FIRMWARE_PATH) is None
    # Not served either: only published files are.
    assert served.repo.read_file("metadata/2.firmware.json") is None
    # One more key (2 of 3) publishes it.
    outcome = served.repo.sign("firmware", [_load(offline[0])])
    assert outcome.published and outcome.signatures == 2
    client = served.client()  # an Updater refreshes once; the next one reuses its stored metadata
    client.refresh()
    assert client.get_targetinfo(FIRMWARE_PATH) is not None


def test_a_compromised_server_with_the_online_keys_cannot_ship_firmware(served: Served) -> None:
    """An attacker holding the server (one firmware key, snapshot and timestamp keys) publishes a
    firmware version signed by 1 of 2-of-3 keys anyway: the client refuses it."""
    _offline(served.repo, "firmware", 1, served.tmp / "offline")
    served.repo.add_target("firmware", FIRMWARE_PATH, b"evil firmware", {})
    pending = served.repo.pending("firmware")
    assert pending is not None and len(pending.signatures) == 1
    (served.repo.metadata_dir / "2.firmware.json").write_bytes(pending.to_bytes())
    served.repo.do_snapshot()
    served.repo.do_timestamp()
    client = served.client()
    client.refresh()  # timestamp and snapshot are validly signed by the online keys
    with pytest.raises(UnsignedMetadataError):
        client.get_targetinfo(FIRMWARE_PATH)


def _load(path: Path) -> Any:
    from fleet_server.updates.keys import load_key_file

    return load_key_file(path)


def _cli(config: ServerConfig, *argv: str) -> int:
    assert config.source is not None
    return main([*argv, "--config", str(config.source)])


def test_offline_signing_round_trip_through_the_cli(served: Served,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    offline = _offline(served.repo, "firmware", 1, served.tmp / "offline")
    served.repo.add_target("firmware", FIRMWARE_PATH, FIRMWARE, {"version": "1.3.0"})
    exported = served.tmp / "firmware.v2.json"
    assert _cli(served.config, "updates", "sign", "firmware", "--export", str(exported)) == 0
    signed = served.tmp / "firmware.v2.signed.json"
    # On the offline machine: no configuration needed.
    assert main(["updates", "sign", "firmware", "--metadata", str(exported), "--key", str(offline[0]),
                 "--out", str(signed)]) == 0
    out = capsys.readouterr().out
    assert "firmware/edge-camera/1.3.0.fwb" in out and "version 2" in out
    assert _cli(served.config, "updates", "add-signature", "firmware", str(signed)) == 0
    assert "2 of 2 signatures; published" in capsys.readouterr().out
    client = served.client()
    client.refresh()
    assert client.get_targetinfo(FIRMWARE_PATH) is not None

    # A signature over other bytes, or by a key of another role, is refused with one line.
    served.repo.add_target("firmware", "firmware/edge-camera/1.4.0.fwb", b"next", {})
    assert _cli(served.config, "updates", "add-signature", "firmware", str(signed)) == 1
    assert "not the pending version" in capsys.readouterr().err
    other = served.tmp / "other.json"
    assert _cli(served.config, "updates", "sign", "firmware", "--export", str(other)) == 0
    models_key = sorted(served.repo.keys.role_dir("models").glob("*.pem"))[0]
    assert main(["updates", "sign", "firmware", "--metadata", str(other), "--key", str(models_key),
                 "--out", str(signed)]) == 0
    capsys.readouterr()
    assert _cli(served.config, "updates", "add-signature", "firmware", str(signed)) == 1
    assert "not a key of firmware" in capsys.readouterr().err
    garbage = served.tmp / "garbage.json"
    garbage.write_text(json.dumps({"keyid": "ab", "sig": "cd"}))
    assert _cli(served.config, "updates", "add-signature", "firmware", str(garbage)) == 1
    assert "not a key of firmware" in capsys.readouterr().err


def test_rotating_root_firmware_and_timestamp_keys(served: Served) -> None:
    served.repo.add_target("firmware", FIRMWARE_PATH, FIRMWARE, {})
    old_root = served.repo.root_metadata()
    client = served.client()
    client.refresh()
    old_root_keys = {p.name for p in served.repo.keys.role_dir("root").glob("*.pem")}

    assert "root" in served.repo.rotate("root")
    new_root = Metadata.from_bytes(served.repo.root_metadata())
    assert new_root.signed.version == 2
    assert not old_root_keys & {p.name for p in served.repo.keys.role_dir("root").glob("*.pem")}
    # Signed by the old root keys too: a device provisioned with version 1 follows the rotation.
    assert len(set(new_root.signatures) & {k.removesuffix(".pem") for k in old_root_keys}) == 3
    served.repo.rotate("firmware")
    served.repo.rotate("timestamp")
    assert Metadata.from_bytes(served.repo.root_metadata()).signed.version == 3
    assert {r.role: r.pending_version for r in served.repo.status()} == dict.fromkeys(ALL_ROLES)

    for name, root in (("old-device", old_root), ("known-device", None)):
        device = served.client(name, root)
        device.refresh()
        info = device.get_targetinfo(FIRMWARE_PATH)
        assert info is not None
        assert Path(device.download_target(info)).read_bytes() == FIRMWARE
    client = served.client("device", old_root)  # the metadata stored before the rotations
    client.refresh()
    assert client.get_targetinfo(FIRMWARE_PATH) is not None


def test_a_root_rotation_waits_for_the_offline_root_keys(served: Served) -> None:
    offline = _offline(served.repo, "root", 1, served.tmp / "offline-root")
    served.repo.rotate("root")
    status = {r.role: r for r in served.repo.status()}["root"]
    assert status.version == 1 and status.pending_version == 2
    assert served.repo.read_file("metadata/2.root.json") is None
    outcome = served.repo.sign("root", [_load(offline[0])])  # old root: 2 of 3 now
    assert outcome.published
    served.client().refresh()


def test_status_lists_every_role(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    _offline(served.repo, "models", 1, served.tmp / "offline")
    served.repo.add_target("models", "models/classifier/1.0.0.pkg", b"pkg", {})
    assert _cli(served.config, "updates", "status", "--json") == 0
    roles = {r["role"]: r for r in json.loads(capsys.readouterr().out)["roles"]}
    assert set(roles) == set(ALL_ROLES)
    assert roles["models"]["pending_version"] == 2 and roles["models"]["pending_signatures"] == 1
    assert roles["timestamp"]["threshold"] == 1 and roles["root"]["threshold"] == 2
    assert roles["root"]["keys"] == 3 and roles["firmware"]["local_keys"] == 3
    expires = roles["timestamp"]["expires"]
    assert isinstance(expires, int) and 0 < expires - time.time() <= 3600
    assert _cli(served.config, "updates", "status") == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0].split() == ["ROLE", "VERSION", "EXPIRES", "THRESHOLD", "LOCAL", "KEYS",
                                            "PENDING"]
    assert "v2 1/2" in text
    out = served.tmp / "root.json"
    assert _cli(served.config, "updates", "root", "--out", str(out)) == 0
    assert out.read_bytes() == served.repo.root_metadata()


def test_the_renewer_keeps_a_short_timestamp_current(served: Served) -> None:
    served.repo.add_target("firmware", FIRMWARE_PATH, FIRMWARE, {})
    served.clock.offset = -2 * 3600.0  # sign a timestamp that expired an hour ago (expiry 1 h)
    served.repo.renew(force=True)
    with pytest.raises(ExpiredMetadataError):
        served.client("stale").refresh()
    served.clock.offset = 0.0
    renewer = UpdateRenewer(served.config, clock=served.clock)
    assert renewer.run_once() == ["timestamp"]
    assert renewer.run_once() == []  # not due again
    client = served.client("fresh")
    client.refresh()
    assert client.get_targetinfo(FIRMWARE_PATH) is not None


BAD_PATHS = [
    "/updates/metadata/../keys/root",
    "/updates/metadata/..%2fpending%2ffirmware.json",
    "/updates/metadata/root.json",
    "/updates/metadata/1.root.json.tmp",
    "/updates/metadata/0.root.json",
    "/updates/metadata/1.secret.json",
    "/updates/targets/../keys/root",
    "/updates/targets/%2e%2e/keys/timestamp",
    "/updates/targets/..%2f..%2fserver.toml",
    "/updates/targets/firmware/../../pending/firmware.json",
    "/updates/targets//etc/passwd",
    "/updates/targets/.lock",
    "/updates/keys/root",
    "/updates/pending/firmware.json",
    "/updates/",
    "/updates/targets/",
]


def test_the_http_routes_refuse_anything_but_published_files(served: Served) -> None:
    _offline(served.repo, "firmware", 1, served.tmp / "offline")
    served.repo.add_target("firmware", FIRMWARE_PATH, FIRMWARE, {})  # pending: not served
    keyfile = sorted(served.repo.keys.role_dir("timestamp").glob("*.pem"))[0]
    os.symlink(keyfile, served.repo.targets_dir / "firmware" / "leak.pem")
    os.symlink(served.repo.keys.role_dir("timestamp"), served.repo.targets_dir / "keydir")
    for path in [*BAD_PATHS, "/updates/targets/firmware/leak.pem", f"/updates/targets/keydir/{keyfile.name}",
                 f"/updates/targets/firmware/{keyfile.name}", "/updates/metadata/2.firmware.json"]:
        status, headers, body = served.get(path)
        if status == 308:  # werkzeug merges "//": followed once, it stays refused
            location = headers["Location"].removeprefix(served.server.url)
            assert location.startswith("/updates/"), path
            status, _, body = served.get(location)
        assert status in (400, 404), (path, status)
        assert b"PRIVATE KEY" not in body, path
    status, _, _ = served.get("/updates/metadata/1.root.json")
    assert status == 200
    host, port = served.server.address
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request("POST", "/updates/metadata/1.root.json")
        response = conn.getresponse()
        response.read()
        assert response.status in (400, 405)
    finally:
        conn.close()


@pytest.mark.parametrize("path", [
    "metadata/../keys", "metadata/root.json", "metadata/1.root.json/x", "targets/../keys/root",
    "targets/firmware/..", "/metadata/1.root.json", "keys/root", "pending/firmware.json", "",
    "metadata/1.root.json\x00", "targets/.lock", "metadata/ 1.root.json",
])
def test_read_file_refuses_other_paths(served: Served, path: str) -> None:
    assert served.repo.read_file(path) is None


def test_read_file_serves_what_the_routes_serve(served: Served) -> None:
    info = served.repo.add_target("firmware", FIRMWARE_PATH, FIRMWARE, {})
    assert served.repo.read_file(f"targets/{target_file_name(FIRMWARE_PATH, info.sha256.hex())}") == FIRMWARE
    for name in ("1.root.json", "timestamp.json", "2.snapshot.json", "1.targets.json", "2.firmware.json",
                 "1.models.json"):
        data = served.repo.read_file(f"metadata/{name}")
        assert data is not None and data == served.get(f"/updates/metadata/{name}")[2], name


def test_bad_roles_and_paths_are_one_line_errors(served: Served) -> None:
    with pytest.raises(UpdatesError, match="not a targets role"):
        served.repo.add_target("root", "root/x", b"", {})
    with pytest.raises(UpdatesError, match="under firmware/"):
        served.repo.add_target("firmware", "models/x/1.0.0.pkg", b"", {})
    with pytest.raises(UpdatesError, match="not allowed"):
        served.repo.add_target("firmware", "firmware/../x", b"", {})
    with pytest.raises(UpdatesError, match="longer than 63"):
        served.repo.add_target("firmware", "firmware/" + "a" * 64, b"", {})
    with pytest.raises(UpdatesError, match="no version waiting"):
        served.repo.export("firmware")
    with pytest.raises(UpdatesError, match="already exists"):
        UpdateRepository.create(served.repo.folder, served.config.updates, clock=served.clock)
    empty = _updates_config(served.config, dir=served.tmp / "none")
    with pytest.raises(UpdatesError, match="updates init"):
        open_update_repository(empty, clock=served.clock)


def test_remove_target(served: Served) -> None:
    served.repo.add_target("firmware", FIRMWARE_PATH, FIRMWARE, {})
    assert served.repo.remove_target("firmware", FIRMWARE_PATH)
    assert not served.repo.remove_target("firmware", FIRMWARE_PATH)
    client = served.client()
    client.refresh()
    assert client.get_targetinfo(FIRMWARE_PATH) is None


def test_model_publish_adds_the_package_as_a_models_target(served: Served,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    onnx = served.tmp / "m.onnx"
    onnx.write_bytes(small_classifier())
    assert _cli(served.config, "model", "publish", str(onnx), "--name", "classifier",
                "--version", "2.0.0") == 0
    capsys.readouterr()
    [target] = served.repo.list_targets("models")
    package = (served.config.models.store_dir / "classifier" / "2.0.0.pkg").read_bytes()
    assert target.path == "models/classifier/2.0.0.pkg" and target.published
    assert target.custom["version"] == "2.0.0" and target.length == len(package)
    client = served.client()
    client.refresh()
    info = client.get_targetinfo(target.path)
    assert info is not None and Path(client.download_target(info)).read_bytes() == package
