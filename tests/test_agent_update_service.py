"""The agent service with ``[update]``: a signed ``update.assign`` over MQTT installs into the inactive
slot, the statuses reach the server, and after the power cycle the trusted verdict for the trial's
release commits it.  Real swtpm and Mosquitto; the server side is ``agent_fixtures.FleetSim``, the
update channel an in-memory implementation of the agent's ``TargetSource`` interface."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytest.register_assert_rewrite("mqtt_fixtures", "agent_fixtures")
from agent_fixtures import AgentFactory, FleetSim, wait_status, write_agent_config  # noqa: E402
from mqtt_fixtures import WAIT, Credentials, wait_until  # noqa: E402
from test_agent_update import MemorySource, publish  # noqa: E402

from agent.config import load_config  # noqa: E402
from agent.service import Agent  # noqa: E402
from agent.tpm.adapter import TpmAdapter  # noqa: E402
from agent.update import bootctl  # noqa: E402
from agent.update.floor import TpmVersionFloor  # noqa: E402
from agent.update.installer import StatusOutbox  # noqa: E402
from firmware_sim.broker import MosquittoBroker  # noqa: E402
from firmware_sim.device import SimulatedDevice  # noqa: E402
from protocol.errors import ConfigError  # noqa: E402
from protocol.messages import UpdateAssignment, UpdateStatus, new_message_id  # noqa: E402

pytest_plugins = ("mqtt_fixtures", "agent_fixtures")
pytestmark = [pytest.mark.swtpm, pytest.mark.mqtt]


@dataclass
class EventRebooter:
    reasons: list[str] = field(default_factory=list)
    asked: threading.Event = field(default_factory=threading.Event)

    def reboot(self, reason: str) -> None:
        self.reasons.append(reason)
        self.asked.set()


@pytest.fixture
def config_path(tmp_path: Path, sim_device: SimulatedDevice, mqtt_broker: MosquittoBroker,
                credentials: Credentials, fleet: FleetSim) -> Path:
    assert mqtt_broker.port is not None
    path = write_agent_config(tmp_path / "agent", device_id="cam-upd", device=sim_device,
                              broker_port=mqtt_broker.port, credentials=credentials,
                              server_key=fleet.write_public_key(tmp_path / "server.pem"))
    with open(path, "a") as f:
        f.write('\n[update]\nboot_dir = "boot"\nhealth_checks = ["config", "tpm"]\n')
    (tmp_path / "agent" / "boot").mkdir()
    return path


def statuses(fleet: FleetSim) -> list[str]:
    out = []
    for msg in fleet.of_type("update.status", "cam-upd"):
        assert isinstance(msg, UpdateStatus)
        out.append(msg.state)
    return out


def test_assignment_over_mqtt_installs_reboots_and_commits_on_the_trusted_trial_verdict(
        config_path: Path, fleet: FleetSim, make_agent: AgentFactory, sim_device: SimulatedDevice) -> None:
    boot = config_path.parent / "boot"
    source = MemorySource()
    # firmware_version in the test config is 1.0.0 and the class "camera"
    path = publish(source, "1.1.0")
    rebooter = EventRebooter()
    agent = make_agent(config_path, rebooter=rebooter, target_source=source)
    wait_status(agent, lambda s: s.trusted, "first trusted verdict")
    assignment = UpdateAssignment(assignment_id=new_message_id(), kind="firmware", target=path,
                                  version="1.1.0", deadline=int(time.time() * 1000) + 600_000)
    fleet.send_device("cam-upd", "update", assignment)
    assert rebooter.asked.wait(WAIT)
    fleet.wait_for(lambda: statuses(fleet) == ["downloading", "installed", "rebooting"], "install statuses")
    assert bootctl.read(boot).trial is not None
    # the power cycle: the agent stops, the bootloader boots the trial slot, the agent starts again
    agent.stop()
    assert bootctl.choose_boot_slot(boot).in_trial
    fleet.release = path
    rebooter2 = EventRebooter()
    again = make_agent(config_path, rebooter=rebooter2, target_source=source)
    fleet.wait_for(lambda: statuses(fleet)[-1:] == ["committed"], "committed status")
    ctl = bootctl.read(boot)
    assert ctl.active == "b" and ctl.trial is None
    wait_status(again, lambda s: s.update.get("last_status", {}).get("state") == "committed",
                "committed in the agent status")
    assert "in_progress" not in again.status().update
    assert rebooter2.reasons == []
    outbox = config_path.parent / "state" / "update" / "outbox.json"
    wait_until(lambda: b"update.status" not in outbox.read_bytes(), timeout=WAIT, what="the outbox drained")
    again.stop()
    tpm = TpmAdapter(sim_device.tcti, config_path.parent / "state" / "tpm")
    try:
        assert TpmVersionFloor(lambda: tpm).minimum() == (1, 1, 0)
    finally:
        tpm.close()


def test_update_config_without_rebooter_or_source_is_refused_at_start(config_path: Path) -> None:
    agent = Agent(load_config(config_path))
    with pytest.raises(ConfigError, match="needs a rebooter and a target source"):
        agent.start()


def test_status_left_in_the_outbox_before_a_reboot_is_sent_after_the_start(
        config_path: Path, fleet: FleetSim, make_agent: AgentFactory) -> None:
    folder = config_path.parent / "state" / "update"
    folder.mkdir(parents=True)
    outbox = StatusOutbox(folder / "outbox.json")
    status = UpdateStatus(assignment_id=new_message_id(), target="firmware/camera/1.1.0.fwb",
                          state="rolled_back", from_version="1.0.0", to_version="1.1.0",
                          reason="boot counter exhausted before the trial was committed")
    outbox.add(status, ts=int(time.time() * 1000))
    make_agent(config_path, rebooter=EventRebooter(), target_source=MemorySource())
    fleet.wait_for(lambda: status in fleet.of_type("update.status", "cam-upd"), "the pending status")
    wait_until(lambda: StatusOutbox(outbox.path).pending() == [], timeout=WAIT, what="the outbox drained")
