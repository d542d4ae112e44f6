"""Signed A/B firmware updates end to end, the way an operator runs them, with nothing simulated but the
hardware: `fleet-server init`, Mosquitto with the files init wrote, a worker serving the update
repository over MQTT (`tuf-fetch`), `fleet-server updates init` / `updates root --out`, a release built
by `firmware-sim release build` and published with `fleet-server release add`, assigned with
`release assign`; the real agent (`agent.service.Agent` with `[update]` and its own TUF client) on a
simulated device (swtpm, measured A/B boot) whose reboots are power cycles
(:class:`firmware_sim.power.PowerCycler`).

* a golden device on 1.2.0 downloads 1.3.0 through TUF, installs slot b, power-cycles, attests trusted
  on the release and commits; the server saw every status and now records 1.3.0;
* a device that boots something else than what it installed (``trial_tamper``) is untrusted with the
  failing event named, rolls back, is trusted on 1.2.0 again, and the assignment is rolled_back with
  that reason;
* a device never assigned the release that boots its images is untrusted (its reference values are
  not accepted without an assignment);
* a download python-tuf refuses (the served target damaged) is reported ``failed`` with its reason,
  and the next assignment installs and commits;
* the fleet harness provisions its devices for updates (``FleetConfig(updates=True)``) and runs the
  power cycles its agents ask for;
* a model published after `updates init` reaches a device with `[update]` and `[models]` through TUF
  (the ``models`` role's target), not ``model-fetch``, and is unlocked and served; a damaged served
  package target is refused by TUF, reported, and not fetched with ``model-fetch`` instead; a model
  published before `updates init` (no such target in the verified metadata) comes with ``model-fetch``.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent.config import load_config
from agent.service import Agent
from agent.update import bootctl
from firmware_sim.broker import MosquittoBroker
from firmware_sim.cli import main as firmware_sim
from firmware_sim.device import SimulatedDevice
from firmware_sim.fleet import FleetConfig, running_fleet
from firmware_sim.manufacturer import ManufacturerCA
from firmware_sim.power import PowerCycler
from firmware_sim.testmodel import small_classifier
from fleet_server.cli import main as fleet_server
from fleet_server.service.worker import Worker

pytest.register_assert_rewrite("mqtt_fixtures", "agent_fixtures")
from agent_fixtures import AgentFactory, wait_status  # noqa: E402
from mqtt_fixtures import wait_until  # noqa: E402

pytest_plugins = ("mqtt_fixtures", "agent_fixtures", "operator_fixtures")
pytestmark = [pytest.mark.swtpm, pytest.mark.mqtt, pytest.mark.slow]

DEVICE = "cam-0900"
CLASS = "edge-camera"
TARGET = f"firmware/{CLASS}/1.3.0.fwb"
UPDATE_WAIT = 120.0
"""Download, install, power cycle and attestation of a release (seconds; generous for a loaded CI)."""


class ServerStatuses(logging.Handler):
    """The ``update_status`` events the worker's processor logs: the states the server accepted."""

    LOGGER = "fleet_server.service.processor"

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.states: list[str] = []
        self._lock_ = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if text.startswith("event=update_status "):
            match = re.search(r"\bstate=(\w+)", text)
            if match is not None:
                with self._lock_:
                    self.states.append(match.group(1))

    def seen(self) -> list[str]:
        with self._lock_:
            return list(self.states)


@pytest.fixture
def server_statuses() -> Iterator[ServerStatuses]:
    handler = ServerStatuses()
    logger = logging.getLogger(ServerStatuses.LOGGER)
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def run_cli(capsys: pytest.CaptureFixture[str], main: Callable[[Sequence[str]], int], *argv: str) -> str:
    """Run a CLI entry point (``fleet_server`` / ``firmware_sim``); its stdout, failing on exit != 0."""
    capsys.readouterr()
    status = main(list(argv))
    out, err = capsys.readouterr()
    assert status == 0, f"{' '.join(argv[:3])}: {err.strip()}"
    return out


@dataclass
class Rig:
    """One simulated device provisioned for updates, its agent, and the power cycles it asks for.

    Every (re)start writes the agent configuration anew (the swtpm listens on new ports after each
    power-on) into the same folder, so the agent keeps its state (AK, device certificate, TUF
    metadata, install record)."""

    folder: Path
    device: SimulatedDevice
    claim: Path
    root: Path
    broker: MosquittoBroker
    make_agent: AgentFactory
    agents: list[Agent] = field(default_factory=list)
    cycler: PowerCycler | None = None
    extra: str = ""
    """More agent configuration (``[models]``, ``[inference]``), appended to what every start writes."""

    @property
    def agent(self) -> Agent:
        return self.agents[-1]

    def write_config(self) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / "agent.toml"
        path.write_text(f"""
device_id = "{DEVICE}"
device_class = "{CLASS}"
firmware_version = "1.2.0"
state_dir = "state"
eventlog = "{self.device.eventlog_path}"
[tpm]
tcti = "{self.device.tcti}"
[mqtt]
host = "127.0.0.1"
port = {self.broker.port}
ca_cert = "{self.claim / 'fleet-ca.pem'}"
claim_cert = "{self.claim / 'claim.pem'}"
claim_key = "{self.claim / 'claim.key'}"
reconnect_min = 0.1
reconnect_max = 1.0
[server]
signing_public_key = "{self.claim / 'server-signing.pub.pem'}"
""" + self.device.update_table(self.root) + self.extra)
        return path

    def start_agent(self) -> Agent:
        assert self.cycler is not None
        agent = self.make_agent(self.write_config(), rebooter=self.cycler.rebooter(DEVICE))
        self.agents.append(agent)
        return agent

    def power_cycle(self, device_id: str, reason: str) -> None:
        """What the agent's reboot runs (on the cycler's thread): stop it, power-cycle, start again."""
        assert device_id == DEVICE
        self.agent.stop()
        self.device.power_cycle()
        self.start_agent()

    def cycles(self) -> int:
        assert self.cycler is not None
        return len(self.cycler.cycles(DEVICE))


@pytest.fixture
def fleet_dir(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """The operator's data folder with an update repository (`updates init`)."""
    run_cli(capsys, fleet_server, "updates", "init", "--config", str(data_dir / "server.toml"))
    return data_dir


def make_rig(tmp_path: Path, fleet_dir: Path, broker: MosquittoBroker, ca: ManufacturerCA,
             make_agent: AgentFactory, capsys: pytest.CaptureFixture[str], *,
             trial_tamper: str | None = None) -> Rig:
    """A golden device on 1.2.0, reference policy from its boot, its EK pre-registered, a claim
    credential and the exported update root: everything but the agent's start."""
    config = str(fleet_dir / "server.toml")
    device = SimulatedDevice.create(tmp_path / "device", ca=ca, trial_tamper=trial_tamper)
    device.boot()
    run_cli(capsys, fleet_server, "policy", "from-eventlog", str(device.eventlog_path), "--name",
            f"{CLASS}-1.2.0", "--device-class", CLASS, "--config", config)
    ek = tmp_path / "ek.der"
    ek.write_bytes(device.ek_certificate("rsa"))
    run_cli(capsys, fleet_server, "device", "preregister", str(ek), "--device-class", CLASS,
            "--config", config)
    claim = tmp_path / "provisioning"
    run_cli(capsys, fleet_server, "claim", "issue", DEVICE, "--out", str(claim), "--config", config)
    root = tmp_path / "update-root.json"
    run_cli(capsys, fleet_server, "updates", "root", "--out", str(root), "--config", config)
    return Rig(tmp_path / "agent", device, claim, root, broker, make_agent)


@pytest.fixture
def rig(tmp_path: Path, fleet_dir: Path, broker: MosquittoBroker, worker: Worker,
        manufacturer_ca: ManufacturerCA, make_agent: AgentFactory, capsys: pytest.CaptureFixture[str],
        request: pytest.FixtureRequest) -> Iterator[Rig]:
    """The device (``trial_tamper`` = the test's indirect parameter, if any) with its power cycler."""
    made = make_rig(tmp_path, fleet_dir, broker, manufacturer_ca, make_agent, capsys,
                    trial_tamper=getattr(request, "param", None))
    made.cycler = PowerCycler(made.power_cycle)
    try:
        yield made
    finally:
        made.cycler.close()  # before make_agent's teardown: no cycle may start an agent after it
        for agent in made.agents:
            agent.stop()
        made.device.shutdown()


def publish_release(tmp_path: Path, fleet_dir: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """`firmware-sim release build` 1.3.0 (the updated-firmware profile) and `fleet-server release add`;
    the TUF target path."""
    bundle = tmp_path / "bundle-1.3.0"
    run_cli(capsys, firmware_sim, "release", "build", str(bundle), "--from", "updated-firmware", "--version",
            "1.3.0")
    out = run_cli(capsys, fleet_server, "release", "add", str(bundle), "--class", CLASS, "--version", "1.3.0",
                  "--json", "--config", str(fleet_dir / "server.toml"))
    target = json.loads(out)["target"]
    assert target == TARGET
    return target


def assign(fleet_dir: Path, capsys: pytest.CaptureFixture[str], target: str) -> str:
    out = run_cli(capsys, fleet_server, "release", "assign", target, "--device", DEVICE, "--json",
                  "--config", str(fleet_dir / "server.toml"))
    [assigned] = json.loads(out)["assignments"]
    return str(assigned["assignment_id"])


def assignment(fleet_dir: Path, capsys: pytest.CaptureFixture[str], assignment_id: str) -> dict[str, object]:
    out = run_cli(capsys, fleet_server, "release", "show", TARGET, "--json", "--config",
                  str(fleet_dir / "server.toml"))
    [found] = [a for a in json.loads(out)["assignments"] if a["assignment_id"] == assignment_id]
    return dict(found)


def test_a_golden_device_downloads_installs_reboots_attests_and_commits_the_release(
        tmp_path: Path, fleet_dir: Path, rig: Rig, worker: Worker, server_statuses: ServerStatuses,
        capsys: pytest.CaptureFixture[str]) -> None:
    rig.start_agent()
    wait_status(rig.agent, lambda s: s.trusted, "trusted on 1.2.0")
    target = publish_release(tmp_path, fleet_dir, capsys)
    assignment_id = assign(fleet_dir, capsys, target)

    wait_until(lambda: assignment(fleet_dir, capsys, assignment_id)["state"] == "committed",
               timeout=UPDATE_WAIT, what="the assignment committed")
    assert rig.cycles() == 1  # one power cycle: into the trial slot, never back
    assert server_statuses.seen() == ["downloading", "installed", "rebooting", "committed"]
    ctl = bootctl.read(rig.device.boot_dir)
    assert ctl.active == "b" and ctl.trial is None and rig.device.booted_slot == "b"
    agent = rig.agent
    wait_status(agent, lambda s: s.trusted and s.update.get("last_status", {}).get("state") == "committed",
                "trusted and committed in the agent's status")
    record = worker.repo.device(DEVICE)
    assert record is not None and record.firmware_version == "1.3.0" and record.state == "trusted"
    attested = worker.repo.releases.attested_release(DEVICE)
    assert attested is not None and attested.target == TARGET  # the release its evidence matched
    # The agent's own TUF client (root_file, no injected source) keeps the metadata it verified.
    assert (rig.folder / "state" / "tuf" / "root.json").exists()


@pytest.mark.parametrize("rig", ["kernel"], indirect=True)
def test_a_device_booting_something_else_after_installing_rolls_back_and_stays_trusted_on_the_old_release(
        tmp_path: Path, fleet_dir: Path, rig: Rig, worker: Worker, server_statuses: ServerStatuses,
        capsys: pytest.CaptureFixture[str]) -> None:
    rig.start_agent()
    wait_status(rig.agent, lambda s: s.trusted, "trusted on 1.2.0")
    target = publish_release(tmp_path, fleet_dir, capsys)
    assignment_id = assign(fleet_dir, capsys, target)

    wait_until(lambda: assignment(fleet_dir, capsys, assignment_id)["state"] == "rolled_back",
               timeout=UPDATE_WAIT, what="the assignment rolled back")
    found = assignment(fleet_dir, capsys, assignment_id)
    reason = str(found["reason"])
    assert reason.startswith("attestation verdict untrusted:"), reason
    assert "EV_EFI_BOOT_SERVICES_APPLICATION" in reason and "vmlinuz" in reason, reason  # the failing event
    assert rig.cycles() == 2  # into the trial slot, and back
    assert server_statuses.seen() == ["downloading", "installed", "rebooting", "rolled_back"]
    ctl = bootctl.read(rig.device.boot_dir)
    assert ctl.active == "a" and ctl.trial is None and rig.device.booted_slot == "a"
    assert ctl.last_rollback is not None and ctl.last_rollback.assignment_id == assignment_id
    wait_status(rig.agent, lambda s: s.trusted, "trusted again on 1.2.0 after the rollback")
    record = worker.repo.device(DEVICE)
    assert record is not None and record.firmware_version == "1.2.0" and record.state == "trusted"
    history = [h.to_state for h in worker.repo.state_history(DEVICE)]
    assert "untrusted" in history  # the tampered trial boot was appraised as such


def test_the_reference_values_of_a_release_never_assigned_to_the_device_are_not_accepted(
        tmp_path: Path, fleet_dir: Path, rig: Rig, worker: Worker,
        capsys: pytest.CaptureFixture[str]) -> None:
    rig.start_agent()
    wait_status(rig.agent, lambda s: s.trusted, "trusted on 1.2.0")
    publish_release(tmp_path, fleet_dir, capsys)
    # The device boots exactly the release's images without ever being assigned it.
    rig.agent.stop()
    rig.device.reflash("updated-firmware")
    rig.device.power_cycle()
    agent = rig.start_agent()
    wait_status(agent, lambda s: s.verdict == "untrusted", "untrusted on the unassigned release's images")
    [reason] = agent.status().verdict_reasons
    assert "EV_S_CRTM_VERSION" in reason and "Firmware 1.3.0" in reason, reason
    record = worker.repo.device(DEVICE)
    assert record is not None and record.firmware_version == "1.2.0"
    assert worker.repo.releases.attested_release(DEVICE) is None


def test_a_download_python_tuf_refuses_is_reported_failed_and_a_later_assignment_commits(
        tmp_path: Path, fleet_dir: Path, rig: Rig, server_statuses: ServerStatuses,
        capsys: pytest.CaptureFixture[str]) -> None:
    rig.start_agent()
    wait_status(rig.agent, lambda s: s.trusted, "trusted on 1.2.0")
    target = publish_release(tmp_path, fleet_dir, capsys)
    # The server's copy of the target is damaged (same length): the signed hashes no longer match.
    [served] = (fleet_dir / "updates" / "targets" / "firmware" / CLASS).glob("*.1.3.0.fwb")
    good = served.read_bytes()
    served.write_bytes(good[:-1] + bytes([good[-1] ^ 0xFF]))
    first = assign(fleet_dir, capsys, target)
    wait_until(lambda: assignment(fleet_dir, capsys, first)["state"] == "failed", timeout=UPDATE_WAIT,
               what="the assignment failed")
    reason = str(assignment(fleet_dir, capsys, first)["reason"])
    assert f"downloading target {target}: refused by TUF: LengthOrHashMismatchError" in reason, reason
    assert rig.cycles() == 0 and bootctl.read(rig.device.boot_dir).trial is None
    assert rig.agent.status().phase == "running"
    # The update thread lives on: with the target repaired, the next assignment installs and commits.
    served.write_bytes(good)
    second = assign(fleet_dir, capsys, target)
    wait_until(lambda: assignment(fleet_dir, capsys, second)["state"] == "committed", timeout=UPDATE_WAIT,
               what="the second assignment committed")
    assert server_statuses.seen() == ["downloading", "failed", "downloading", "installed", "rebooting",
                                      "committed"]


def test_the_fleet_harness_provisions_its_devices_for_updates_and_power_cycles_them_on_request(
        tmp_path: Path) -> None:
    # Agents run in an agent host process; their reboot requests cross its event pipe to the
    # harness's PowerCycler, which power-cycles the device and starts the agent again.
    with running_fleet(FleetConfig(devices=1, interval=30.0, duration=None, updates=True,
                                   workdir=tmp_path / "fleet")) as harness:
        [device_id] = harness.device_ids
        device = harness.devices[device_id]
        assert harness.update_root is not None
        config = load_config(device.agent_dir / "agent.toml")
        assert config.update is not None
        assert (config.update.boot_dir, config.update.root_file) == (device.sim.boot_dir, harness.update_root)
        target = harness.publish_release("1.3.0")
        assignment_id = harness.assign_release(target, [device_id])[device_id]
        wait_until(lambda: harness.assignments(target)[assignment_id]["state"] == "committed",
                   timeout=UPDATE_WAIT, what="the harness's device committed the release")
        assert harness.power is not None and len(harness.power.cycles(device_id)) == 1
        assert device.sim.booted_slot == "b"
        wait_until(lambda: harness.agent_status()[device_id].trusted, timeout=UPDATE_WAIT,
                   what="the device trusted on the new release")
        assert harness.device_states()[device_id].state == "trusted"


# -- model packages through the update channel ---------------------------------------------------------
MODEL = "classifier"
MODEL_TOKEN = "vision-app-token-0123456789"


def publish_model(fleet_dir: Path, capsys: pytest.CaptureFixture[str]) -> bytes:
    """`model publish` (after `updates init`: the package is also a target of the ``models`` role) and
    `model entitle` for the device's class; the model's plaintext."""
    config = str(fleet_dir / "server.toml")
    model = small_classifier(seed=5)
    model_file = fleet_dir.parent / "classifier.onnx"
    model_file.write_bytes(model)
    run_cli(capsys, fleet_server, "model", "publish", str(model_file), "--name", MODEL, "--version", "1.0.0",
            "--deploy", "--config", config)
    run_cli(capsys, fleet_server, "model", "entitle", MODEL, "--device-class", CLASS, "--config", config)
    return model


def with_models(rig: Rig) -> None:
    """The rig's agent also runs the model vault and its local inference API."""
    rig.folder.mkdir(parents=True, exist_ok=True)
    (rig.folder / "clients.toml").write_text(
        f'[clients.vision-app]\ntoken_sha256 = "{hashlib.sha256(MODEL_TOKEN.encode()).hexdigest()}"\n')
    rig.extra = f"""
[models]
signing_public_key = "{rig.claim / 'model-signing.pub.pem'}"
telemetry_interval = 1
harden_process = false
[inference]
port = 0
clients_file = "clients.toml"
"""


def vault(agent: Agent) -> dict[str, Any]:
    return dict(agent.status().models)


def predict(agent: Agent) -> int:
    host, port = vault(agent)["inference_address"].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        body = json.dumps({"inputs": {"input": [[0.5] * 16]}}).encode()
        conn.request("POST", f"/v1/models/{MODEL}:predict", body,
                     {"Authorization": f"Bearer {MODEL_TOKEN}", "Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def test_a_model_published_after_updates_init_is_installed_through_tuf_and_served(
        fleet_dir: Path, rig: Rig, worker: Worker, capsys: pytest.CaptureFixture[str]) -> None:
    model = publish_model(fleet_dir, capsys)
    with_models(rig)
    agent = rig.start_agent()

    def serving(s: Any) -> bool:
        m = s.models.get("models", {}).get(MODEL) or {}
        return bool(m.get("serving_version") == "1.0.0" and not m.get("locked"))

    wait_status(agent, serving, "the model installed through TUF, keyed and unlocked", timeout=UPDATE_WAIT)
    assert predict(agent) == 200
    status = vault(agent)
    assert status["channel"] == "tuf"
    counters = status["counters"]
    assert counters.get("tuf_downloads") == 1 and counters.get("packages_stored") == 1, counters
    assert "model_fetch_requests" not in counters and "chunks_received" not in counters, counters
    assert worker.counters.get("sent.model.chunk") == 0  # the server answered no model-fetch
    package = (rig.folder / "state" / "models" / f"{MODEL}-1.0.0.pkg").read_bytes()
    assert worker.counters.get("tuf.bytes_sent") >= len(package)
    [served] = (fleet_dir / "updates" / "targets" / "models" / MODEL).glob("*.1.0.0.pkg")
    assert served.read_bytes() == package  # kept as served: ciphertext
    agent.stop()
    for path in rig.folder.rglob("*"):
        if path.is_file():
            assert model not in path.read_bytes(), path


def test_a_damaged_model_target_is_refused_by_tuf_reported_and_not_fetched_another_way(
        fleet_dir: Path, rig: Rig, worker: Worker, capsys: pytest.CaptureFixture[str]) -> None:
    publish_model(fleet_dir, capsys)
    # The server's copy of the package target is damaged (same length): its signed hashes no longer match.
    [served] = (fleet_dir / "updates" / "targets" / "models" / MODEL).glob("*.1.0.0.pkg")
    good = served.read_bytes()
    served.write_bytes(good[:-1] + bytes([good[-1] ^ 0xFF]))
    with_models(rig)
    agent = rig.start_agent()
    wait_status(agent, lambda s: s.models.get("counters", {}).get("tuf_refused", 0) >= 1,
                "TUF refusing the damaged package", timeout=UPDATE_WAIT)
    status = vault(agent)
    entry = status["models"][MODEL]
    assert entry["locked"] and entry["version"] is None, entry
    assert entry["last_error"].startswith("1.0.0 refused by the update channel: downloading target "
                                          f"models/{MODEL}/1.0.0.pkg: refused by TUF: "
                                          "LengthOrHashMismatchError"), entry
    counters = status["counters"]
    assert "model_fetch_requests" not in counters and "packages_stored" not in counters, counters
    assert worker.counters.get("sent.model.chunk") == 0
    assert not list((rig.folder / "state" / "models").glob("*.pkg"))
    assert agent.status().trusted  # the device itself stays trusted: only the package was refused


def test_a_model_published_before_updates_init_is_not_a_target_and_comes_with_model_fetch(
        tmp_path: Path, data_dir: Path, broker: MosquittoBroker, worker: Worker,
        manufacturer_ca: ManufacturerCA, make_agent: AgentFactory,
        capsys: pytest.CaptureFixture[str]) -> None:
    publish_model(data_dir, capsys)  # no update repository yet: the package is no TUF target
    run_cli(capsys, fleet_server, "updates", "init", "--config", str(data_dir / "server.toml"))
    rig = make_rig(tmp_path, data_dir, broker, manufacturer_ca, make_agent, capsys)
    rig.cycler = PowerCycler(rig.power_cycle)
    try:
        with_models(rig)
        agent = rig.start_agent()

        def serving(s: Any) -> bool:
            m = s.models.get("models", {}).get(MODEL) or {}
            return bool(m.get("serving_version") == "1.0.0" and not m.get("locked"))

        wait_status(agent, serving, "the model fetched with model-fetch, keyed and unlocked",
                    timeout=UPDATE_WAIT)
        counters = vault(agent)["counters"]
        # The verified metadata lists no such target: safe to fall back, the package is checked
        # against the signed offer's digest and its signed manifest all the same.
        assert counters.get("tuf_not_found") == 1 and "tuf_downloads" not in counters, counters
        assert counters.get("model_fetch_requests", 0) >= 1 and counters.get("packages_stored") == 1, counters
        assert worker.counters.get("sent.model.chunk") >= 1
        assert predict(agent) == 200
    finally:
        rig.cycler.close()
        for started in rig.agents:
            started.stop()
        rig.device.shutdown()
