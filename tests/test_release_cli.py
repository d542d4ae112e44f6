"""``fleet-server release add/list/show/withdraw/assign``: a bundle folder becomes a ``firmware`` target
(through an in-memory TargetStore) and a release row; ``--json`` prints the TUF target path; bad
bundles and requests are one line on stderr with exit status 1."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fleet_server.cli import main
from fleet_server.commands import release_cmd
from fleet_server.config import load_config
from fleet_server.keys import load_public_key, load_signing_key
from fleet_server.storage.db import create_engine
from fleet_server.storage.models import DeviceState
from fleet_server.storage.repo import Repository
from protocol import topics
from protocol.firmware_bundle import unpack
from protocol.messages import UpdateAssignment, decode_signed

pytest.register_assert_rewrite("server_fixtures", "release_fixtures")
from release_fixtures import MemoryTargetStore, write_bundle_dir  # noqa: E402
from server_fixtures import insert_pending_device  # noqa: E402

pytest_plugins = ("mqtt_fixtures", "server_fixtures")
pytestmark = pytest.mark.usefixtures("quiet_root_logging")

TARGET = "firmware/edge-camera/1.3.0.fwb"


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture
def config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    folder = tmp_path / "srv"
    assert _run(capsys, "init", "--data-dir", str(folder), "--mqtt-port", "18883",
                "--server-mqtt-port", "18884")[0] == 0
    return str(folder / "server.toml")


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch) -> MemoryTargetStore:
    memory = MemoryTargetStore()
    monkeypatch.setattr(release_cmd, "target_store_factory", lambda config: memory)
    return memory


def test_release_add_list_show_assign_withdraw(
        config: str, store: MemoryTargetStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bundle = write_bundle_dir(tmp_path / "bundle")
    status, out, err = _run(capsys, "release", "add", str(bundle), "--class", "edge-camera", "--version",
                            "1.3.0", "--json", "--config", config)
    assert status == 0, err
    added = json.loads(out)
    assert added["target"] == TARGET and added["state"] == "active"
    data, info = store.targets[("firmware", TARGET)]
    assert info.custom["kind"] == "firmware" and info.custom["device_class"] == "edge-camera"
    assert info.custom["version"] == "1.3.0"
    reference = json.loads((bundle / "reference-values.json").read_text())
    assert info.custom["reference_values"] == reference
    assert added["bundle_length"] == len(data) and added["bundle_sha256"] == info.sha256.hex()
    fwb = unpack(data)
    assert set(fwb.files) == {p.name for p in (bundle / "images").iterdir()}

    # A second add of the same class and version is refused.
    status, _, err = _run(capsys, "release", "add", str(bundle), "--class", "edge-camera", "--version",
                          "1.3.0", "--config", config)
    assert status == 1 and "exists already" in err and len(err.splitlines()) == 1

    status, out, _ = _run(capsys, "release", "list", "--json", "--config", config)
    assert status == 0 and [r["target"] for r in json.loads(out)] == [TARGET]
    status, out, _ = _run(capsys, "release", "list", "--config", config)
    assert status == 0 and TARGET in out

    engine = create_engine(load_config(Path(config)).database_url)
    repo = Repository(engine)
    try:
        insert_pending_device(repo, "cam-1")
        status, _, err = _run(capsys, "release", "assign", TARGET, "--device", "cam-1", "--config", config)
        assert status == 1 and "pending" in err  # releases go to attested devices only
        with repo.write() as tx:
            tx.update_device("cam-1", {"state": DeviceState.TRUSTED})
        status, out, err = _run(capsys, "release", "assign", TARGET, "--device", "cam-1", "--deadline-s",
                                "120", "--json", "--config", config)
        assert status == 0, err
        [assigned] = json.loads(out)["assignments"]
        [row] = [r for r in repo.outbox() if r.topic == topics.device_down("cam-1", "update")]
        signer_pub = load_config(Path(config)).signing_key.with_suffix(".pub.pem")
        kid = load_signing_key(load_config(Path(config)).signing_key).kid
        message = decode_signed(row.payload, keys={kid: load_public_key(signer_pub)}, aud="cam-1").message
        assert isinstance(message, UpdateAssignment) and message.assignment_id == assigned["assignment_id"]
        assert message.target == TARGET and message.deadline == assigned["deadline"]
    finally:
        engine.dispose()

    status, out, _ = _run(capsys, "release", "show", TARGET, "--json", "--config", config)
    shown = json.loads(out)
    assert status == 0 and shown["target"] == TARGET
    assert [(a["device_id"], a["state"]) for a in shown["assignments"]] == [("cam-1", "assigned")]
    status, out, _ = _run(capsys, "release", "show", TARGET, "--config", config)
    assert status == 0 and "cam-1" in out and "assigned" in out

    status, out, err = _run(capsys, "release", "withdraw", TARGET, "--json", "--config", config)
    assert status == 0, err
    assert json.loads(out)["state"] == "withdrawn" and ("firmware", TARGET) not in store.targets
    status, _, err = _run(capsys, "release", "withdraw", TARGET, "--config", config)
    assert status == 1 and "already withdrawn" in err
    status, _, err = _run(capsys, "release", "assign", TARGET, "--device", "cam-1", "--config", config)
    assert status == 1 and "is withdrawn" in err
    status, _, err = _run(capsys, "release", "show", "firmware/edge-camera/9.9.9.fwb", "--config", config)
    assert status == 1 and "no release" in err


def _set_version(bundle: Path, version: str) -> None:
    manifest = json.loads((bundle / "release.json").read_text())
    (bundle / "release.json").write_text(json.dumps({**manifest, "version": version}))


@pytest.mark.parametrize(("damage", "message"), [
    (lambda b: (b / "release.json").unlink(), "holds exactly release.json, reference-values.json"),
    (lambda b: (b / "extra.txt").write_text("x"), "found extra.txt"),
    (lambda b: (b / "release.json").write_text("[1]"), "release.json: release: expected an object"),
    (lambda b: _set_version(b, "2.0.0"), "differ from release.json"),
    (lambda b: (b / "reference-values.json").write_text("{"), "reference-values.json is not JSON"),
    (lambda b: (b / "reference-values.json").write_text('{"format": 1}'), "reference-values.json"),
    (lambda b: shutil.rmtree(b / "images") or (b / "images").mkdir(), "missing agent-class.toml"),
    (lambda b: (b / "images" / "Bad Name").write_bytes(b"x"), "not in release.json: Bad Name"),
    (lambda b: (b / "images" / "sub").mkdir(), "not in release.json: sub"),
    (lambda b: (b / "images" / "link").symlink_to(b / "release.json"), "not in release.json: link"),
    (lambda b: (b / "images" / "vmlinuz").write_bytes(b"patched"), "vmlinuz: not a file of"),
])
def test_release_add_refuses_a_bad_bundle(
        config: str, store: MemoryTargetStore, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        damage: object, message: str) -> None:
    bundle = write_bundle_dir(tmp_path / "bundle")
    damage(bundle)  # type: ignore[operator]
    status, out, err = _run(capsys, "release", "add", str(bundle), "--class", "edge-camera", "--version",
                            "1.3.0", "--config", config)
    assert status == 1 and out == "" and message in err and len(err.splitlines()) == 1, err
    assert not store.targets


def test_release_add_refuses_reference_values_of_another_version_or_class(
        config: str, store: MemoryTargetStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bundle = write_bundle_dir(tmp_path / "bundle", version="1.3.1")
    status, _, err = _run(capsys, "release", "add", str(bundle), "--class", "edge-camera", "--version",
                          "1.3.0", "--config", config)
    assert status == 1 and "release.json says version '1.3.1', not '1.3.0'" in err
    status, _, err = _run(capsys, "release", "add", str(bundle), "--class", "Edge+Cam", "--version", "1.3.1",
                          "--config", config)
    assert status == 1 and "release class" in err
    assert not store.targets


def test_release_commands_need_the_update_repository(
        config: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bundle = write_bundle_dir(tmp_path / "bundle")
    status, _, err = _run(capsys, "release", "add", str(bundle), "--class", "edge-camera", "--version",
                          "1.3.0", "--config", config)
    assert status == 1 and "no update repository" in err
