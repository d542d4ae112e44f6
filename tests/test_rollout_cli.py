"""``fleet-server rollout ...`` on an initialised data folder: --dry-run output, --plan files with
options overriding their keys, show/list, and one-line errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from firmware_sim.testmodel import small_classifier
from fleet_server.cli import main
from fleet_server.config import load_config
from fleet_server.console.audit import AuditLog, Checkpointing
from fleet_server.service.releases import add_release
from fleet_server.storage.db import create_engine
from fleet_server.storage.models import DeviceState
from fleet_server.storage.repo import NewDevice, Repository

pytest.register_assert_rewrite("release_fixtures")
from release_fixtures import MemoryTargetStore, write_bundle_dir  # noqa: E402

pytestmark = pytest.mark.usefixtures("quiet_root_logging")
pytest_plugins = ("server_fixtures",)

RELEASE = "firmware/edge-camera/1.3.0.fwb"
DEVICES = [f"cam-{i}" for i in range(10)]


@pytest.fixture
def config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    folder = tmp_path / "srv"
    assert main(["init", "--data-dir", str(folder), "--mqtt-port", "18883",
                 "--server-mqtt-port", "18884"]) == 0
    path = str(folder / "server.toml")
    engine = create_engine(load_config(Path(path)).database_url)
    try:
        repo = Repository(engine)
        add_release(repo, MemoryTargetStore(), write_bundle_dir(tmp_path / "bundle"),
                    device_class="edge-camera", version="1.3.0", now=1_790_000_000_000, actor="test")
        with repo.write() as tx:
            for i in DEVICES:
                tx.insert_device(NewDevice(
                    id=i, state=DeviceState.TRUSTED, device_class="edge-camera", firmware_version="1.2.0",
                    ek_cert=b"c", ek_fingerprint=hashlib.sha256(i.encode()).hexdigest(), ek_public=b"e",
                    ak_public=b"a", ak_name=b"n", csr=None, enroll_request_id=None, cert_serial=None,
                    now=1_790_000_000_000, next_attestation_at=None), cause="test")
    finally:
        engine.dispose()
    capsys.readouterr()
    return path


def test_dry_run_prints_the_devices_of_each_phase_and_stores_nothing(
        config: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["rollout", "create", RELEASE, "--id", "r1", "--canary", "2", "--phases", "50,100",
            "--config", config]
    assert main([*argv, "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("dry run of rollout r1 of firmware/edge-camera/1.3.0.fwb (10 devices")
    assert out[1].startswith("  canary: 2 device(s): ") and out[2].startswith("  phase 1: 3 device(s): ")
    assert out[3].startswith("  phase 2: 5 device(s): ")
    planned = [line.split(": ", 2)[2].split(", ") for line in out[1:]]
    assert sorted(d for phase in planned for d in phase) == sorted(DEVICES)
    assert main(["rollout", "list", "--config", config]) == 0
    assert capsys.readouterr().out.strip() == "no rollouts"
    # The same id and plan create exactly that split.
    assert main(argv) == 0
    capsys.readouterr()
    assert main(["rollout", "show", "r1", "--json", "--config", config]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [[m["device_id"] for m in shown["members"] if m["phase"] == p] for p in range(3)] == planned
    assert [p["devices"] for p in shown["phases"]] == [2, 3, 5] and shown["state"] == "running"


def test_plan_file_keys_and_options_overriding_them(
        config: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = tmp_path / "plan.toml"
    plan.write_text('canary = 1\nphases = [20, 100]\nabort_failure_percent = 5\nmin_executed = 3\n'
                    'device_timeout_s = 120\nretries = 2\nwindow = "22-04"\n')
    assert main(["rollout", "create", RELEASE, "--plan", str(plan), "--canary", "3", "--id", "r1", "--json",
                 "--config", config]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [p["devices"] for p in shown["phases"]] == [3, 0, 7]
    assert main(["rollout", "show", "r1", "--config", config]) == 0
    text = capsys.readouterr().out
    assert text.startswith("rollout r1 of firmware/edge-camera/1.3.0.fwb: running, phase 0")


@pytest.mark.parametrize(("extra", "message"), [
    (["--phases", "50,10"], "phases are cumulative percentages and must not decrease"),
    (["--retries", "11"], "retries must be a whole number from 0 to 10"),
    (["--window", "22"], "expected START-END"),
    (["--device", "cam-404"], "device 'cam-404' is not an admitted device of class edge-camera"),
    (["--class", "edge-gateway"], "the group is of class edge-gateway"),
])
def test_bad_options_fail_in_one_line(config: str, capsys: pytest.CaptureFixture[str], extra: list[str],
                                      message: str) -> None:
    assert main(["rollout", "create", RELEASE, *extra, "--config", config]) != 0
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err


def test_a_model_rollout_from_the_cli_is_audited(config: str, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(small_classifier())
    for argv in (["model", "publish", str(onnx), "--name", "classifier", "--version", "1.0.0", "--deploy"],
                 ["model", "publish", str(onnx), "--name", "classifier", "--version", "1.1.0"],
                 ["model", "entitle", "classifier", "--device-class", "edge-camera"]):
        assert main([*argv, "--config", config]) == 0, argv
    capsys.readouterr()
    model = ["--model", "classifier", "--version", "1.1.0"]
    for extra, message in ((["--model", "classifier"], "both --model NAME and --version V"),
                           ([RELEASE, *model], "not both"), (model, "needs the group's --class"),
                           (["--model", "classifier", "--version", "1.0.0", "--class", "edge-camera"],
                            "is deployed already")):
        assert main(["rollout", "create", *extra, "--config", config]) != 0
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err and "Traceback" not in err, err
    argv = ["rollout", "create", *model, "--class", "edge-camera", "--id", "m1", "--canary", "1",
            "--config", config]
    assert main([*argv, "--dry-run"]) == 0
    assert capsys.readouterr().out.startswith("dry run of rollout m1 of model classifier 1.1.0 (10 devices")
    assert main(argv) == 0
    assert capsys.readouterr().out.startswith("rollout m1 of model classifier 1.1.0 running: 10 devices")
    assert main(["rollout", "show", "m1", "--json", "--config", config]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["kind"], shown["model"], shown["release"]) == (
        "model", {"name": "classifier", "version": "1.1.0"}, None)
    assert main(["rollout", "cancel", "m1", "--config", config]) == 0
    loaded = load_config(Path(config))
    engine = create_engine(loaded.database_url)
    try:
        entries = AuditLog(engine, Checkpointing.from_settings(loaded.audit)).entries(limit=10)
    finally:
        engine.dispose()
    assert [(x.action, x.target) for x in entries if x.action.startswith("rollout.")][:2] in (
        [("rollout.cancel", "rollout:m1"), ("rollout.create", "rollout:m1")],
        [("rollout.create", "rollout:m1"), ("rollout.cancel", "rollout:m1")])
