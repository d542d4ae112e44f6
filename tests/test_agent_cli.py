"""``edge-agent``: version, usage and error exits, the status command, and ``run`` as a real process
(enrolls and attests against the protocol simulator, then stops cleanly on SIGTERM)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.register_assert_rewrite("mqtt_fixtures", "agent_fixtures")
from agent_fixtures import FleetSim, write_agent_config  # noqa: E402
from mqtt_fixtures import WAIT, Credentials, wait_until  # noqa: E402

from agent.cli import main  # noqa: E402
from agent.version import agent_version  # noqa: E402
from firmware_sim.broker import MosquittoBroker  # noqa: E402
from firmware_sim.device import SimulatedDevice  # noqa: E402

pytest_plugins = ("mqtt_fixtures", "agent_fixtures")

EDGE_AGENT = Path(sys.executable).with_name("edge-agent")
LINE = re.compile(r"^ts=\S+ level=(debug|info|warning|error) event=[a-z_]+( |$)")


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main(capsys, "version") == (0, f"edge-agent {agent_version()}\n", "")


@pytest.mark.parametrize("argv", [(), ("launch",), ("run",), ("status",), ("run", "--config")])
def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], argv: tuple[str, ...]) -> None:
    code, _, err = run_main(capsys, *argv)
    assert code == 2 and "usage: edge-agent" in err


def test_errors_are_one_line_and_exit_1(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, err = run_main(capsys, "run", "--config", str(tmp_path / "missing.toml"))
    assert (code, out) == (1, "")
    assert err.startswith("edge-agent: error: cannot read configuration") and err.count("\n") == 1

    cfg = minimal_config(tmp_path, tmp_path / "server.pem")
    cfg.write_text("bogus = 1\n" + cfg.read_text())
    code, _, err = run_main(capsys, "status", "--config", str(cfg))
    assert code == 1 and err.startswith("edge-agent: error: ") and "bogus: unknown key" in err


def minimal_config(folder: Path, key: Path) -> Path:
    cfg = folder / "agent.toml"
    cfg.write_text(f"""device_id = "cam-1"
device_class = "camera"
firmware_version = "1.0"
state_dir = "state"
[mqtt]
host = "127.0.0.1"
ca_cert = "ca.pem"
claim_cert = "claim.pem"
claim_key = "claim.key"
[server]
signing_public_key = "{key}"
""")
    return cfg


def test_run_with_an_unusable_server_key_fails_before_starting(capsys: pytest.CaptureFixture[str],
                                                               tmp_path: Path) -> None:
    key = tmp_path / "server.pem"
    key.write_text("not a key")
    code, _, err = run_main(capsys, "run", "--config", str(minimal_config(tmp_path, key)))
    assert code == 1 and "server.signing_public_key" in err
    assert [line for line in err.splitlines() if not LINE.match(line)] == [err.splitlines()[-1]]
    assert err.splitlines()[-1].startswith("edge-agent: error: ")


def test_status_reads_the_status_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cfg = minimal_config(tmp_path, tmp_path / "server.pem")
    code, _, err = run_main(capsys, "status", "--config", str(cfg))
    assert code == 1 and "no status file" in err and err.count("\n") == 1

    state = tmp_path / "state"
    state.mkdir()
    status = {"device_id": "cam-1", "phase": "running", "enrolled": True, "connected": True,
              "verdict": "trusted", "trusted": True, "trusted_until": 1_790_000_000.0,
              "verdict_reasons": [], "last_request_reason": "boot", "error": None, "updated": time.time(),
              "pid": os.getpid(), "counters": {"challenges_answered": 3}}
    (state / "status.json").write_text(json.dumps(status))
    code, out, _ = run_main(capsys, "status", "--config", str(cfg))
    assert code == 0
    assert "device: cam-1\nrunning: yes\nphase: running\nenrolled: yes\n" in out
    assert "verdict: trusted\n" in out and "trusted_until: 2026-09-21T" in out
    assert "counters: challenges_answered=3\n" in out
    code, out, _ = run_main(capsys, "status", "--config", str(cfg), "--json")
    assert code == 0 and json.loads(out) == {**status, "running": True}

    (state / "status.json").write_text(json.dumps({**status, "phase": "stopped"}))
    assert "running: no\n" in run_main(capsys, "status", "--config", str(cfg))[1]
    (state / "status.json").write_text("{not json")
    code, _, err = run_main(capsys, "status", "--config", str(cfg))
    assert code == 1 and "not valid JSON" in err


@pytest.mark.swtpm
@pytest.mark.mqtt
def test_run_as_a_process_attests_and_stops_cleanly_on_sigterm(
        tmp_path: Path, sim_device: SimulatedDevice, mqtt_broker: MosquittoBroker, credentials: Credentials,
        fleet: FleetSim) -> None:
    assert mqtt_broker.port is not None
    cfg = write_agent_config(tmp_path / "agent", device_id="cam-0007", device=sim_device,
                             broker_port=mqtt_broker.port, credentials=credentials,
                             server_key=fleet.write_public_key(tmp_path / "server.pub.pem"))
    stderr_path = tmp_path / "stderr.log"
    with open(stderr_path, "wb") as stderr:
        proc = subprocess.Popen([str(EDGE_AGENT), "run", "--config", str(cfg)], stdout=subprocess.DEVNULL,
                                stderr=stderr)
    try:
        def status() -> dict[str, object]:
            out = subprocess.run([str(EDGE_AGENT), "status", "--config", str(cfg), "--json"],
                                 capture_output=True, text=True, timeout=WAIT, check=False)
            return json.loads(out.stdout) if out.returncode == 0 else {}

        wait_until(lambda: status().get("trusted") is True, what="the agent process to be trusted")
        current = status()
        assert current["running"] is True and current["pid"] == proc.pid and current["enrolled"] is True
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(WAIT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    final = status()
    assert final["phase"] == "stopped" and final["running"] is False and final["connected"] is False
    lines = stderr_path.read_text().splitlines()
    assert lines and all(LINE.match(line) for line in lines), [ln for ln in lines if not LINE.match(ln)]
    events = [re.search(r"event=(\S+)", line).group(1) for line in lines]  # type: ignore[union-attr]
    for expected in ("agent_starting", "enrolled", "connected", "challenge_answered", "attestation_result",
                     "signal_received", "agent_stopped"):
        assert expected in events


def test_run_with_update_builds_the_update_channel_from_root_file_and_a_reboot_command(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = tmp_path / "server.pem"
    key.write_bytes(ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    cfg = minimal_config(tmp_path, key)
    (tmp_path / "boot").mkdir()
    cfg.write_text(cfg.read_text() + '[update]\nboot_dir = "boot"\nroot_file = "update-root.json"\n'
                   'reboot_command = ["/bin/true"]\n')
    # `run` supplies the rebooter and the agent its own TUF client: what is left to fail is the root.
    code, _, err = run_main(capsys, "run", "--config", str(cfg))
    assert code == 1
    missing = tmp_path / "update-root.json"
    assert err.splitlines()[-1] == f"edge-agent: error: update.root_file: {missing} does not exist"
