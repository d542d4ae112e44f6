"""End to end, the way an operator runs it: `fleet-server init` creates the PKI and configuration, a
Mosquitto broker runs with the broker files init wrote, a worker runs from `server.toml`, a policy is
made with `fleet-server policy from-eventlog` from a golden boot, the device is provisioned with
`fleet-server claim issue`, the real agent (agent.service.Agent) on a simulated device enrolls with its
claim certificate, stays pending until `fleet-server device approve`, becomes trusted, and after a
reboot is trusted again without any admin action."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.service import Agent
from firmware_sim.broker import MosquittoBroker
from firmware_sim.device import SimulatedDevice
from firmware_sim.manufacturer import ManufacturerCA
from fleet_server.cli import main as cli
from fleet_server.service.worker import Worker

pytest.register_assert_rewrite("mqtt_fixtures", "agent_fixtures")
from agent_fixtures import AgentFactory, wait_status  # noqa: E402

pytest_plugins = ("mqtt_fixtures", "agent_fixtures", "operator_fixtures")
pytestmark = [pytest.mark.swtpm, pytest.mark.mqtt, pytest.mark.slow]

DEVICE = "cam-0777"


@pytest.fixture
def broker(broker: MosquittoBroker, data_dir: Path) -> MosquittoBroker:
    """The operator's broker, with a 20 s re-attestation interval in server.toml (before the worker)."""
    config = data_dir / "server.toml"
    text = config.read_text().replace("interval = 300.0", "interval = 20.0")
    config.write_text(text.replace("jitter = 30.0", "jitter = 2.0"))
    return broker


def _agent_config(folder: Path, device: SimulatedDevice, claim: Path, broker: MosquittoBroker) -> Path:
    folder.mkdir(parents=True)
    path = folder / "agent.toml"
    path.write_text(f"""
device_id = "{DEVICE}"
device_class = "edge-camera"
firmware_version = "1.2.0"
state_dir = "state"
eventlog = "{device.eventlog_path}"
[tpm]
tcti = "{device.tcti}"
[mqtt]
host = "127.0.0.1"
port = {broker.port}
ca_cert = "{claim / 'fleet-ca.pem'}"
claim_cert = "{claim / 'claim.pem'}"
claim_key = "{claim / 'claim.key'}"
reconnect_min = 0.1
reconnect_max = 1.0
[server]
signing_public_key = "{claim / 'server-signing.pub.pem'}"
""")
    return path


def test_operator_flow_claim_approve_trusted_and_back_after_reboot(
        tmp_path: Path, data_dir: Path, broker: MosquittoBroker, worker: Worker,
        manufacturer_ca: ManufacturerCA, make_agent: AgentFactory,
        capsys: pytest.CaptureFixture[str]) -> None:
    config = str(data_dir / "server.toml")
    device = SimulatedDevice.create(tmp_path / "device", ca=manufacturer_ca)
    try:
        device.boot()
        # Reference values from this golden boot (firmware version read from the log).
        assert cli(["policy", "from-eventlog", str(device.eventlog_path), "--name", "edge-camera-1.2.0",
                    "--device-class", "edge-camera", "--config", config]) == 0
        claim = tmp_path / "provisioning"
        assert cli(["claim", "issue", DEVICE, "--out", str(claim), "--config", config]) == 0
        capsys.readouterr()

        agent: Agent = make_agent(_agent_config(tmp_path / "agent", device, claim, broker))
        wait_status(agent, lambda s: s.phase == "pending", "the server to hold the device pending")
        assert cli(["device", "list", "--state", "pending", "--config", config]) == 0
        assert DEVICE in capsys.readouterr().out

        assert cli(["device", "approve", DEVICE, "--config", config]) == 0
        wait_status(agent, lambda s: s.trusted, "a trusted verdict after approval")
        status = agent.status()
        assert status.enrolled and status.verdict_reasons == ()

        # Power cycle: the device asks for a challenge on its own and is trusted again.
        agent.stop()
        device.power_cycle()
        again: Agent = make_agent(_agent_config(tmp_path / "agent2", device, claim, broker), start=False)
        # The same state folder: the agent keeps its AK and device certificate across restarts.
        (tmp_path / "agent2" / "state").symlink_to(tmp_path / "agent" / "state")
        again.start()
        wait_status(again, lambda s: s.trusted and s.last_request_reason == "boot",
                    "trusted again after the reboot")

        capsys.readouterr()
        assert cli(["device", "show", DEVICE, "--config", config]) == 0
        shown = capsys.readouterr().out
        assert "state             trusted" in shown and "approved by admin" in shown
        assert "enrolled -> trusted" in shown
        record = worker.repo.device(DEVICE)
        assert record is not None and record.boot_reset_count is not None and record.boot_reset_count >= 1
        history = [h.to_state for h in worker.repo.state_history(DEVICE)]
        assert "untrusted" not in history and history[-2:] == ["enrolled", "pending"]
    finally:
        device.shutdown()
