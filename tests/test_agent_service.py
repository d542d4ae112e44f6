"""The agent end to end: real swtpm (simulated device), real Mosquitto with TLS, and the protocol's
server side played by ``agent_fixtures.FleetSim`` (enrollment, challenges, appraisal, results).

Covers enrollment (admitted, pending then approved, rejected, re-sent on reconnect), challenge
answering with the incremental event log, verdict tracking and revocation, refusal of replayed
and misdirected server messages, broker restarts, agent restarts (same identity and AK, no second
enrollment), TPM errors, and that logs carry no secrets.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

pytest.register_assert_rewrite("mqtt_fixtures", "agent_fixtures")
from agent_fixtures import (  # noqa: E402
    AgentFactory,
    FleetSim,
    wait_status,
    write_agent_config,
)
from mqtt_fixtures import WAIT, Credentials  # noqa: E402

from agent.identity import CERT_FILE, KEY_FILE  # noqa: E402
from agent.log import KeyValueFormatter  # noqa: E402
from agent.service import TPM_SUBDIR, Agent, _Mailbox  # noqa: E402
from firmware_sim.broker import MosquittoBroker  # noqa: E402
from firmware_sim.device import SimulatedDevice  # noqa: E402
from firmware_sim.manufacturer import ManufacturerCA  # noqa: E402
from protocol import topics  # noqa: E402
from protocol.encoding import b64encode  # noqa: E402
from protocol.messages import AttestRequest, Challenge, Revocation  # noqa: E402

pytest_plugins = ("mqtt_fixtures", "agent_fixtures")
pytestmark = [pytest.mark.swtpm, pytest.mark.mqtt]

DEVICE = "cam-0001"


@pytest.fixture
def config_path(tmp_path: Path, sim_device: SimulatedDevice, mqtt_broker: MosquittoBroker,
                credentials: Credentials, fleet: FleetSim) -> Path:
    assert mqtt_broker.port is not None
    key = fleet.write_public_key(tmp_path / "server-signing.pub.pem")
    return write_agent_config(tmp_path / "agent", device_id=DEVICE, device=sim_device,
                              broker_port=mqtt_broker.port, credentials=credentials, server_key=key)


def trusted(agent: Agent) -> None:
    wait_status(agent, lambda s: s.trusted and s.verdict == "trusted", "a trusted verdict")


def test_enrolls_when_preregistered_then_attests_trusted(config_path: Path, fleet: FleetSim,
                                                         make_agent: AgentFactory) -> None:
    agent = make_agent(config_path)
    trusted(agent)
    # The worker counts its evidence once it wakes from the broker's PUBACK; the result (which
    # arrives right after the PUBACK) may be applied by the main thread first.
    wait_status(agent, lambda s: s.counters.get("challenges_answered") == 1, "the answer counted")
    status = agent.status()
    assert status.enrolled and status.connected and status.phase == "running"
    assert status.last_request_reason == "boot"
    assert status.trusted_until is not None
    assert status.counters["challenges_answered"] == 1

    # The wire, as the server saw it: one request with this TPM's identity, one proof, then the
    # device identity asked for a challenge and sent the whole event log (offset 0).
    assert fleet.count("enroll.request", topics.claim_identity(DEVICE)) == 1
    assert fleet.count("enroll.proof") == 1
    hello = fleet.of_type("attest.request", DEVICE)
    assert isinstance(hello[0], AttestRequest) and hello[0].reason == "boot"
    evidence = fleet.evidence[0]
    assert evidence.eventlog_offset == 0 and evidence.eventlog == Path(agent.config.eventlog).read_bytes()
    state = agent.config.state_dir
    assert (state / CERT_FILE).is_file() and (state / KEY_FILE).stat().st_mode & 0o777 == 0o600
    assert state.stat().st_mode & 0o777 == 0o700


def test_follow_up_challenges_send_only_the_log_suffix_or_the_whole_log(config_path: Path, fleet: FleetSim,
                                                                        make_agent: AgentFactory) -> None:
    agent = make_agent(config_path)
    trusted(agent)
    log = Path(agent.config.eventlog).read_bytes()

    # The server now holds the whole log: the agent sends nothing more, at offset len(log).
    fleet.challenge(DEVICE)
    fleet.wait_for(lambda: len(fleet.results) == 2, "second result")
    assert (fleet.evidence[1].eventlog_offset, fleet.evidence[1].eventlog) == (len(log), b"")
    assert fleet.results[1].verdict == "trusted", fleet.results[1].reasons

    # A server whose held prefix differs from the device's log (e.g. another boot) gets the whole log.
    with fleet._cond:
        fleet.devices[DEVICE].held_log = b"\x00" * len(log)
    fleet.challenge(DEVICE)
    fleet.wait_for(lambda: len(fleet.results) == 3, "third result")
    assert (fleet.evidence[2].eventlog_offset, fleet.evidence[2].eventlog) == (0, log)
    wait_status(agent, lambda s: s.counters.get("results_received") == 3, "three results")
    assert agent.status().trusted


def test_pending_device_waits_re_requests_on_reconnect_and_is_admitted_on_approval(
        config_path: Path, fleet: FleetSim, mqtt_broker: MosquittoBroker, make_agent: AgentFactory,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="agent")
    fleet.enroll_policy = "pending"
    agent = make_agent(config_path)
    wait_status(agent, lambda s: s.phase == "pending" and s.enrollment == "pending", "pending enrollment")
    status = agent.status()
    assert not status.enrolled and status.connected and "awaiting approval" in status.enrollment_reasons
    assert not (agent.config.state_dir / CERT_FILE).exists()

    # The broker restarts: the agent reconnects with its claim certificate and asks again.
    mqtt_broker.restart()
    wait_status(agent, lambda s: s.counters.get("enroll_requests_sent") == 2, "a second enroll.request")
    sent = [r for r in caplog.records if r.msg == "enroll_request_sent"]
    assert [r.edge_fields["why"] for r in sent] == ["connect", "connect"]  # type: ignore[attr-defined]
    assert agent.status().phase == "pending"

    fleet.client.wait_connected(WAIT)
    fleet.approve(DEVICE)
    trusted(agent)
    assert agent.status().enrolled and (agent.config.state_dir / CERT_FILE).is_file()


def test_rejected_enrollment_stops_the_agent_with_the_servers_reasons(config_path: Path, fleet: FleetSim,
                                                                      make_agent: AgentFactory) -> None:
    fleet.enroll_policy = "reject"
    agent = make_agent(config_path)
    assert agent.wait(WAIT), "the agent did not stop after the rejection"
    status = agent.status()
    assert status.phase == "failed" and not status.enrolled
    assert status.error is not None and "rejected" in status.error
    assert "EK not allowed in this fleet" in status.error
    on_disk = (agent.config.state_dir / "status.json").read_text()
    assert '"phase": "failed"' in on_disk and "EK not allowed" in on_disk


def test_agent_restart_keeps_identity_and_ak_and_does_not_enroll_again(config_path: Path, fleet: FleetSim,
                                                                       make_agent: AgentFactory) -> None:
    first = make_agent(config_path)
    trusted(first)
    first.stop()
    assert first.status().phase == "stopped"
    state = first.config.state_dir
    key_before = (state / KEY_FILE).read_bytes()
    cert_before = (state / CERT_FILE).read_bytes()
    ak_before = {p.name: p.read_bytes() for p in (state / TPM_SUBDIR).iterdir()}

    second = make_agent(config_path)
    trusted(second)  # the simulator verifies the quote with the AK enrolled by the first run
    assert second.status().last_request_reason == "boot"
    assert fleet.count("enroll.request") == 1 and fleet.count("enroll.proof") == 1
    assert [m.reason for m in fleet.of_type("attest.request", DEVICE)] == ["boot", "boot"]  # type: ignore[attr-defined]
    assert (state / KEY_FILE).read_bytes() == key_before
    assert (state / CERT_FILE).read_bytes() == cert_before
    assert {p.name: p.read_bytes() for p in (state / TPM_SUBDIR).iterdir()} == ak_before


def test_reconnects_after_broker_restart_and_asks_for_a_challenge(config_path: Path, fleet: FleetSim,
                                                                  mqtt_broker: MosquittoBroker,
                                                                  make_agent: AgentFactory) -> None:
    agent = make_agent(config_path)
    trusted(agent)
    mqtt_broker.restart()
    wait_status(agent, lambda s: s.last_request_reason == "reconnect" and s.connected, "a reconnect")
    assert agent.status().counters["attest_requests_sent"] == 2
    # The simulator reconnects too; whether it saw the request depends on who was back first, so
    # challenge explicitly as the scheduler would: the agent answers on its new connection.
    fleet.client.wait_connected(WAIT)
    before = agent.status().counters["results_received"]
    fleet.challenge(DEVICE)
    wait_status(agent, lambda s: s.counters["results_received"] > before and s.trusted,
                "a result after reconnect")


def test_revocation_ends_trust_until_a_newer_trusted_result(config_path: Path, fleet: FleetSim,
                                                            make_agent: AgentFactory) -> None:
    agent = make_agent(config_path)
    trusted(agent)
    fleet.revoke(DEVICE, "quarantined")
    wait_status(agent, lambda s: s.verdict == "quarantined", "the revocation")
    status = agent.status()
    assert not status.trusted and not agent.trusted() and status.trusted_until is None
    assert status.verdict_reasons == ("admin: quarantined",)
    fleet.challenge(DEVICE)
    trusted(agent)


def test_replayed_misdirected_and_mistyped_server_messages_are_refused(
        config_path: Path, fleet: FleetSim, make_agent: AgentFactory,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="agent")
    agent = make_agent(config_path)
    trusted(agent)
    good_result = next(p for t, p in fleet.sent if t == topics.device_down(DEVICE, "result"))
    revocation = Revocation(state="revoked", reasons=("forged",))
    challenge = Challenge(challenge_id="ab" * 16, nonce=b"n" * 32, selection={"sha256": (0,)},
                          deadline=2**62)
    attempts = [
        (topics.device_down(DEVICE, "result"), good_result),                       # replay
        (topics.device_down(DEVICE, "challenge"), fleet.sign(revocation, DEVICE)),  # wrong type for topic
        (topics.device_down(DEVICE, "revocation"), fleet.sign(revocation, "cam-0002")),  # another device's
        (topics.device_down(DEVICE, "revocation"), fleet.sign(revocation, DEVICE, ts=1_000)),  # stale
        (topics.device_down(DEVICE, "challenge"), fleet.sign(challenge, topics.claim_identity(DEVICE))),
        (topics.device_down(DEVICE, "result"), b'{"v":1}'),                         # malformed
    ]
    for topic, payload in attempts:
        fleet.publish(topic, payload)
    try:
        wait_status(agent, lambda s: s.counters.get("messages_rejected") == len(attempts), "all refusals")
    except AssertionError as exc:
        lines = "\n".join(KeyValueFormatter().format(r) for r in caplog.records)
        sent = "\n".join(f"{t} {p[:300]!r}" for t, p in fleet.sent)
        raise AssertionError(f"{exc}\nagent log:\n{lines}\nsimulator sent:\n{sent}") from None
    status = agent.status()
    assert status.trusted and status.verdict == "trusted"
    assert status.counters["challenges_received"] == 1 and status.counters["results_received"] == 1


def test_tpm_error_misses_one_challenge_and_the_agent_keeps_answering(config_path: Path, fleet: FleetSim,
                                                                      make_agent: AgentFactory) -> None:
    agent = make_agent(config_path)
    trusted(agent)
    evidence_before = len(fleet.evidence)
    fleet.challenge(DEVICE, selection={"sha384": (0, 1)})  # bank not allocated in this TPM
    wait_status(agent, lambda s: s.counters.get("tpm_errors") == 1, "the TPM error")
    assert agent.status().counters["challenges_missed"] == 1
    fleet.challenge(DEVICE)
    wait_status(agent, lambda s: s.counters["challenges_answered"] == 2
                and s.counters["results_received"] == 2, "the next challenge answered")
    assert len(fleet.evidence) == evidence_before + 1
    assert agent.status().trusted


def test_challenge_past_its_deadline_is_not_answered(config_path: Path, fleet: FleetSim,
                                                     make_agent: AgentFactory) -> None:
    agent = make_agent(config_path)
    trusted(agent)
    fleet.challenge(DEVICE, deadline_ms=1_000)
    wait_status(agent, lambda s: s.counters.get("challenges_missed") == 1, "the missed challenge")
    assert len(fleet.evidence) == 1 and agent.status().counters.get("tpm_errors", 0) == 0


def test_unreachable_tpm_is_retried_and_stop_is_prompt(tmp_path: Path, sim_device: SimulatedDevice,
                                                       mqtt_broker: MosquittoBroker, credentials: Credentials,
                                                       fleet: FleetSim, make_agent: AgentFactory) -> None:
    from firmware_sim.procutil import free_port_pair

    assert mqtt_broker.port is not None
    cfg = write_agent_config(tmp_path / "agent", device_id=DEVICE, device=sim_device,
                             broker_port=mqtt_broker.port, credentials=credentials,
                             server_key=fleet.write_public_key(tmp_path / "k.pem"),
                             tcti=f"swtpm:host=127.0.0.1,port={free_port_pair('127.0.0.1')}")
    agent = make_agent(cfg)
    wait_status(agent, lambda s: s.phase == "tpm_unavailable" and s.counters.get("tpm_errors", 0) >= 2,
                "repeated TPM attempts")
    agent.stop()
    assert agent.wait(0) and agent.status().phase == "stopped" and agent.status().error is None
    assert fleet.count("enroll.request") == 0


def test_two_agents_in_one_process_with_logs_free_of_secrets(
        config_path: Path, tmp_path: Path, fleet: FleetSim, mqtt_broker: MosquittoBroker,
        credentials: Credentials, manufacturer_ca: ManufacturerCA, make_agent: AgentFactory,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    assert mqtt_broker.port is not None
    with SimulatedDevice.create(tmp_path / "device-2", ca=manufacturer_ca) as other:
        other.boot()
        cfg2 = write_agent_config(tmp_path / "agent-2", device_id="cam-0002", device=other,
                                  broker_port=mqtt_broker.port, credentials=credentials,
                                  server_key=fleet.write_public_key(tmp_path / "k2.pem"))
        agents = [make_agent(config_path), make_agent(cfg2)]
        for agent in agents:
            trusted(agent)
            agent.stop()
    assert sorted(r.challenge_id for r in fleet.results) == sorted(c.challenge_id for c in fleet.challenges)

    # Challenges are answered on each agent's own worker thread, never on paho's network thread.
    answered = [r for r in caplog.records if r.msg == "challenge_answered"]
    assert sorted(str(r.threadName) for r in answered) == ["agent-cam-0001-attest", "agent-cam-0002-attest"]

    # Nothing secret in any line: no private key material, no nonce, no enrollment secret or proof.
    lines = [KeyValueFormatter().format(r) for r in caplog.records]
    forbidden = [c.nonce.hex() for c in fleet.challenges] + [b64encode(c.nonce) for c in fleet.challenges]
    for agent in agents:
        key_lines = (agent.config.state_dir / KEY_FILE).read_text().splitlines()[1:-1]
        forbidden += [line[:32] for line in key_lines]
    forbidden += [b64encode(p.proof) for p in fleet.of_type("enroll.proof")]  # type: ignore[attr-defined]
    assert len(lines) > 20
    for line in lines:
        assert "PRIVATE KEY" not in line
        assert not [f for f in forbidden if f in line], line


def test_a_credential_for_another_ak_is_not_proved_and_the_request_is_sent_again(
        tmp_path: Path, sim_device: SimulatedDevice, mqtt_broker: MosquittoBroker, credentials: Credentials,
        fleet: FleetSim, make_agent: AgentFactory) -> None:
    assert mqtt_broker.port is not None
    fleet.wrong_ak_credentials = 1
    cfg = write_agent_config(tmp_path / "agent", device_id=DEVICE, device=sim_device,
                             broker_port=mqtt_broker.port, credentials=credentials,
                             server_key=fleet.write_public_key(tmp_path / "k.pem"), enroll_retry=1)
    agent = make_agent(cfg)
    trusted(agent)
    counters = agent.status().counters
    assert counters["enroll_activation_failures"] == 1 and counters["enroll_requests_sent"] == 2
    assert fleet.count("enroll.proof") == 1  # only for the credential made for this TPM's AK


def test_mailbox_keeps_only_the_latest_challenge() -> None:
    box = _Mailbox()
    first, second = (Challenge(challenge_id=c * 32, nonce=b"n" * 32, selection={"sha256": (0,)}, deadline=1)
                     for c in "ab")
    assert box.take(0) is None
    assert box.put(first) is None
    assert box.put(second) is first  # superseded before the worker took it
    assert box.take(0) is second and box.take(0) is None
