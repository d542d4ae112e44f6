"""The agent against the real fleet server: ``fleet_server.service.worker.Worker`` with a SQLite
database, on a real Mosquitto broker, with a simulated device (swtpm, measured boot).

Set up as an operator would: fleet PKI (the broker's), a result-signing key (the agent pins its
public half), the TPM manufacturer bundle, a reference policy made from a known-good boot log, and
either a pre-registered EK (admitted at once) or an approval.  The agent must enroll, attest
``trusted`` against the policy, and follow revocations, all through the server's own code; an
admin's quarantine or revocation holds whatever the agent does (reboot, reconnect, enroll again with
its claim certificate and a new AK) until an admin lifts it (issue 9).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.register_assert_rewrite("mqtt_fixtures", "agent_fixtures")
from agent_fixtures import AgentFactory, wait_status  # noqa: E402
from mqtt_fixtures import WAIT, Credentials, wait_until  # noqa: E402

from agent.service import Agent  # noqa: E402
from firmware_sim.broker import BrokerPki, MosquittoBroker  # noqa: E402
from firmware_sim.device import SimulatedDevice  # noqa: E402
from firmware_sim.manufacturer import ManufacturerCA  # noqa: E402
from fleet_server.appraisal.policy import policy_from_eventlog  # noqa: E402
from fleet_server.config import ServerConfig, load_config, render_config  # noqa: E402
from fleet_server.keys import create_signing_key, public_key_path  # noqa: E402
from fleet_server.migrations import upgrade  # noqa: E402
from fleet_server.service.admin import (  # noqa: E402
    approve_device,
    preregister_ek,
    quarantine_device,
    revoke_device,
    store_policy,
    unquarantine_device,
)
from fleet_server.service.processor import QUARANTINE_REASON  # noqa: E402
from fleet_server.service.worker import Worker  # noqa: E402
from fleet_server.storage.db import create_engine  # noqa: E402
from fleet_server.storage.repo import Repository  # noqa: E402
from fleet_server.verifier.eventlog import parse_eventlog  # noqa: E402

pytest_plugins = ("mqtt_fixtures", "agent_fixtures")
pytestmark = [pytest.mark.swtpm, pytest.mark.mqtt, pytest.mark.slow]

DEVICE = "cam-0100"


@dataclass
class Server:
    config: ServerConfig
    worker: Worker
    repo: Repository

    @property
    def signing_public_key(self) -> Path:
        return public_key_path(self.config.signing_key)

    def now_ms(self) -> int:
        return int(time.time() * 1000)


@pytest.fixture
def server(tmp_path: Path, fleet_pki: BrokerPki, mqtt_broker: MosquittoBroker,
           manufacturer_ca: ManufacturerCA) -> Iterator[Server]:
    assert mqtt_broker.port is not None
    data = tmp_path / "server"
    for sub in ("pki", "trust", "logs"):
        (data / sub).mkdir(parents=True)
    copies = ((fleet_pki.ca_cert, "fleet-ca.pem"), (fleet_pki.ca_key, "fleet-ca.key"),
              (fleet_pki.server_cert, "fleet-server.pem"), (fleet_pki.server_key, "fleet-server.key"))
    for src, name in copies:
        shutil.copy2(src, data / "pki" / name)
    shutil.copy2(manufacturer_ca.bundle, data / "trust" / "tpm-manufacturers.pem")
    create_signing_key(data / "keys" / "result-signing.key")
    (data / "server.toml").write_text(render_config(data_dir=data, mqtt_host="127.0.0.1",
                                                    mqtt_port=mqtt_broker.port))
    config = load_config(data / "server.toml")
    engine = create_engine(config.database_url)
    upgrade(engine)
    worker = Worker(config, repo=Repository(engine)).start()
    try:
        worker.wait_connected(WAIT)
        yield Server(config, worker, worker.repo)
    finally:
        worker.stop()
        engine.dispose()


def agent_config(folder: Path, device: SimulatedDevice, broker: MosquittoBroker, credentials: Credentials,
                 server: Server) -> Path:
    claim = credentials.claim(DEVICE)
    folder.mkdir(parents=True)
    cfg = folder / "agent.toml"
    cfg.write_text(f"""
device_id = "{DEVICE}"
device_class = "edge-camera"
firmware_version = "1.0.0"
state_dir = "state"
eventlog = "{device.eventlog_path}"
[tpm]
tcti = "{device.tcti}"
[mqtt]
host = "127.0.0.1"
port = {broker.port}
ca_cert = "{claim.ca_cert}"
claim_cert = "{claim.cert}"
claim_key = "{claim.key}"
reconnect_min = 0.1
reconnect_max = 1.0
[server]
signing_public_key = "{server.signing_public_key}"
""")
    return cfg


@pytest.fixture
def golden_policy(sim_device: SimulatedDevice, server: Server) -> None:
    """Reference values from a known-good (golden) boot of this device class and firmware."""
    log = parse_eventlog(sim_device.eventlog_path.read_bytes())
    policy = policy_from_eventlog(log, name="edge-camera-1.0.0", device_class="edge-camera",
                                  firmware_version="1.0.0")
    store_policy(server.repo, policy, now=server.now_ms())


@pytest.fixture
def setup(tmp_path: Path, sim_device: SimulatedDevice, mqtt_broker: MosquittoBroker,
          credentials: Credentials, server: Server, golden_policy: None) -> Path:
    return agent_config(tmp_path / "agent", sim_device, mqtt_broker, credentials, server)


def trusted(agent: Agent) -> None:
    wait_status(agent, lambda s: s.trusted, "a trusted verdict from the fleet server")


def test_preregistered_device_enrolls_and_is_trusted_by_the_real_server(
        setup: Path, sim_device: SimulatedDevice, server: Server, make_agent: AgentFactory) -> None:
    preregister_ek(server.repo, sim_device.ek_certificate("rsa"), now=server.now_ms())
    agent = make_agent(setup)
    trusted(agent)
    status = agent.status()
    assert status.enrolled and status.verdict_reasons == () and status.last_request_reason == "boot"
    assert status.trusted_until is not None and status.trusted_until > time.time()
    assert status.counters.get("messages_rejected", 0) == 0
    # Counted by the worker once it wakes from the PUBACK, possibly after the result was applied.
    wait_status(agent, lambda s: s.counters.get("challenges_answered", 0) >= 1, "the answer counted")


def test_pending_device_is_admitted_on_approval_and_follows_a_revocation(
        setup: Path, server: Server, make_agent: AgentFactory) -> None:
    agent = make_agent(setup)
    wait_status(agent, lambda s: s.phase == "pending", "the server to keep the device pending")
    assert not agent.status().enrolled
    ctx = server.worker.ctx
    assert ctx.fleet_ca is not None
    approve_device(server.repo, DEVICE, signer=ctx.signer, fleet_ca=ctx.fleet_ca, now=server.now_ms())
    server.worker.wake_outbox()
    trusted(agent)
    assert agent.status().enrolled

    revoke_device(server.repo, DEVICE, signer=ctx.signer, now=server.now_ms(), reason="stolen device")
    server.worker.wake_outbox()
    wait_status(agent, lambda s: s.verdict == "revoked", "the revocation")
    status = agent.status()
    assert not status.trusted and any("stolen device" in r for r in status.verdict_reasons)


def test_a_tampered_boot_is_untrusted_with_the_servers_reason(
        tmp_path: Path, sim_device: SimulatedDevice, mqtt_broker: MosquittoBroker, credentials: Credentials,
        server: Server, golden_policy: None, make_agent: AgentFactory) -> None:
    preregister_ek(server.repo, sim_device.ek_certificate("rsa"), now=server.now_ms())
    sim_device.boot("tampered-cmdline")  # the kernel command line (PCR 8) now differs from the policy
    agent = make_agent(agent_config(tmp_path / "agent", sim_device, mqtt_broker, credentials, server))
    wait_status(agent, lambda s: s.verdict == "untrusted", "an untrusted verdict")
    status = agent.status()
    assert not status.trusted and status.trusted_until is None
    assert any("PCR 8" in reason for reason in status.verdict_reasons), status.verdict_reasons


def _attestations(server: Server) -> int:
    return len(server.repo.attestations(DEVICE, limit=1000))


@pytest.mark.parametrize("hold", ["quarantined", "revoked"])
def test_a_held_device_stays_held_through_reboot_and_reenrollment_until_an_admin_lifts_it(
        hold: str, setup: Path, sim_device: SimulatedDevice, server: Server,
        make_agent: AgentFactory) -> None:
    preregister_ek(server.repo, sim_device.ek_certificate("rsa"), now=server.now_ms())
    ctx = server.worker.ctx
    assert ctx.fleet_ca is not None
    first = make_agent(setup)
    trusted(first)
    if hold == "quarantined":
        quarantine_device(server.repo, DEVICE, signer=ctx.signer, now=server.now_ms(), reason="investigation")
    else:
        revoke_device(server.repo, DEVICE, signer=ctx.signer, now=server.now_ms(), reason="stolen device")
    server.worker.wake_outbox()
    # (A quarantined device may be challenged again at once: its next verdict replaces the notice's.)
    wait_status(first, lambda s: s.counters.get("revocations_received", 0) >= 1, f"the {hold} notice")
    assert not first.status().trusted
    first.stop()
    held = server.repo.device_identity(DEVICE)
    assert held is not None and held.state == hold

    # 1. Reboot (fresh PCRs, a good boot) and reconnect with the device certificate.
    old_tcti = sim_device.tcti
    sim_device.power_cycle()
    setup.write_text(setup.read_text().replace(old_tcti, sim_device.tcti))  # swtpm's new port
    before = _attestations(server)
    refused = server.worker.counters.get("rejected.device_revoked")
    rebooted = make_agent(setup)
    if hold == "quarantined":
        # Still challenged and appraised (good evidence), but the verdict stays untrusted.
        wait_until(lambda: _attestations(server) > before, what="the rebooted device's evidence")
        latest = server.repo.attestations(DEVICE, limit=1)[0]
        assert latest.verdict == "untrusted" and latest.reasons[0] == QUARANTINE_REASON, latest.reasons
        wait_status(rebooted, lambda s: QUARANTINE_REASON in s.verdict_reasons, "the quarantined verdict")
    else:
        # No challenge at all: its hello is refused.
        wait_until(lambda: server.worker.counters.get("rejected.device_revoked") > refused,
                   what="the revoked device's hello refused")
        assert _attestations(server) == before
    assert not rebooted.status().trusted and rebooted.status().trusted_until is None
    rebooted.stop()
    device = server.repo.device(DEVICE)
    assert device is not None and device.state == hold and device.trusted_until is None

    # 2. Lose the agent's state (device certificate and AK blobs): it enrolls again with its claim
    #    certificate and a new AK. The server answers `rejected`; nothing changes.
    shutil.rmtree(setup.parent / "state")
    reenrolled = make_agent(setup)
    wait_status(reenrolled, lambda s: s.error is not None, "the re-enrollment refused")
    error = reenrolled.status().error or ""
    assert f"{DEVICE} is {hold}: enrolling again cannot change its state" in error, error
    assert not reenrolled.status().enrolled and not reenrolled.status().trusted
    after = server.repo.device_identity(DEVICE)
    assert after is not None and after.state == hold
    assert (after.ak_public, after.cert_serial) == (held.ak_public, held.cert_serial)  # new AK not taken
    reenrolled.stop()

    # 3. An admin lifts the hold; the agent (restarted by its supervisor) enrolls its new AK and is
    #    trusted again by good evidence.
    lift = unquarantine_device if hold == "quarantined" else approve_device
    assert lift(server.repo, DEVICE, signer=ctx.signer, fleet_ca=ctx.fleet_ca,
                now=server.now_ms()).to_state == "enrolled"
    back = make_agent(setup)
    trusted(back)
    assert back.status().enrolled
    lifted = server.repo.device_identity(DEVICE)
    assert lifted is not None and lifted.state == "trusted" and lifted.ak_public != held.ak_public
