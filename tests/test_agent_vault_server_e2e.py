"""The model vault against the real fleet server, the way an operator runs it: ``fleet-server init``,
Mosquitto with init's broker files, a worker from ``server.toml``, reference values from a golden boot,
``fleet-server model publish`` and ``model entitle``, ``claim issue`` (which bundles the pinned
model-signing key), the real agent with ``[models]`` and ``[inference]``; then ``device approve``. The
device is offered the model with its trusted result, downloads it, gets its data key released to its
PCR-bound TPM key, and serves it on the local API; ``fleet-server device revoke`` locks it at once."""

from __future__ import annotations

import hashlib
import http.client
import json
from pathlib import Path
from typing import Any

import pytest

from agent.service import Agent
from firmware_sim.broker import MosquittoBroker
from firmware_sim.device import SimulatedDevice
from firmware_sim.manufacturer import ManufacturerCA
from firmware_sim.testmodel import relu_model, small_classifier
from fleet_server.cli import main as cli
from fleet_server.service.processor import QUARANTINE_REASON
from fleet_server.service.worker import Worker

pytest.register_assert_rewrite("mqtt_fixtures", "agent_fixtures")
from agent_fixtures import AgentFactory, wait_status  # noqa: E402
from mqtt_fixtures import WAIT, wait_until  # noqa: E402

pytest_plugins = ("mqtt_fixtures", "agent_fixtures", "operator_fixtures")
pytestmark = [pytest.mark.swtpm, pytest.mark.mqtt, pytest.mark.slow]

DEVICE = "cam-0901"
TOKEN = "vision-app-token-0123456789"
ROW = [0.5] * 16


def _agent_config(folder: Path, device: SimulatedDevice, claim: Path, broker: MosquittoBroker) -> Path:
    folder.mkdir(parents=True)
    (folder / "clients.toml").write_text(
        f'[clients.vision-app]\ntoken_sha256 = "{hashlib.sha256(TOKEN.encode()).hexdigest()}"\n')
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
[models]
signing_public_key = "{claim / 'model-signing.pub.pem'}"
telemetry_interval = 1
harden_process = false
[inference]
port = 0
clients_file = "clients.toml"
""")
    return path


def _predict(agent: Agent, token: str) -> tuple[int, dict[str, Any]]:
    host, port = agent.status().models["inference_address"].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=WAIT)
    try:
        body = json.dumps({"inputs": {"input": [ROW]}}).encode()
        conn.request("POST", "/v1/models/classifier:predict", body,
                     {"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_operator_publishes_entitles_and_the_device_serves_the_model_until_revoked(
        tmp_path: Path, data_dir: Path, broker: MosquittoBroker, worker: Worker,
        manufacturer_ca: ManufacturerCA, make_agent: AgentFactory,
        capsys: pytest.CaptureFixture[str]) -> None:
    config = str(data_dir / "server.toml")
    device = SimulatedDevice.create(tmp_path / "device", ca=manufacturer_ca)
    try:
        device.boot()
        assert cli(["policy", "from-eventlog", str(device.eventlog_path), "--name", "edge-camera-1.2.0",
                    "--device-class", "edge-camera", "--config", config]) == 0
        model_file = tmp_path / "classifier.onnx"
        model = small_classifier(seed=5)
        model_file.write_bytes(model)
        assert cli(["model", "publish", str(model_file), "--name", "classifier", "--version", "1.0.0",
                    "--deploy",
                    "--chunk-size", "1024", "--config", config]) == 0
        assert cli(["model", "entitle", "classifier", "--device-class", "edge-camera",
                    "--config", config]) == 0
        claim = tmp_path / "provisioning"
        assert cli(["claim", "issue", DEVICE, "--out", str(claim), "--config", config]) == 0
        assert (claim / "model-signing.pub.pem").exists()
        capsys.readouterr()

        agent: Agent = make_agent(_agent_config(tmp_path / "agent", device, claim, broker))
        wait_status(agent, lambda s: s.phase == "pending", "the server to hold the device pending")
        assert agent.status().models["models"] == {}  # a pending device is offered nothing
        assert cli(["device", "approve", DEVICE, "--config", config]) == 0
        wait_status(agent, lambda s: s.trusted, "a trusted verdict after approval")

        def serving(s: Any) -> bool:
            m = s.models.get("models", {}).get("classifier") or {}
            return bool(m.get("serving_version") == "1.0.0" and not m.get("locked"))

        wait_status(agent, serving, "the model downloaded, keyed and unlocked")
        status, answer = _predict(agent, TOKEN)
        assert status == 200 and answer["model"] == "classifier"
        assert _predict(agent, "wrong-token")[0] == 401
        assert (agent.config.state_dir / "models" / "classifier-1.0.0.pkg").exists()

        assert cli(["device", "revoke", DEVICE, "--config", config]) == 0
        wait_status(agent, lambda s: s.counters.get("revocations_received", 0) >= 1, "the revocation")
        snapshot = agent.status()
        assert snapshot.models["models"]["classifier"]["locked"]
        assert snapshot.models["last_lock"]["lock_seconds"] < 1.0
        status, answer = _predict(agent, TOKEN)
        assert status == 423 and "revoked" in answer["error"]["message"]
        agent.stop()
        for path in (tmp_path / "agent").rglob("*"):
            if path.is_file():
                assert model not in path.read_bytes(), path
    finally:
        device.shutdown()


def test_a_policy_change_rekeys_the_device_and_a_withdrawn_entitlement_locks_it(
        tmp_path: Path, data_dir: Path, broker: MosquittoBroker, worker: Worker,
        manufacturer_ca: ManufacturerCA, make_agent: AgentFactory,
        capsys: pytest.CaptureFixture[str]) -> None:
    config = str(data_dir / "server.toml")
    device = SimulatedDevice.create(tmp_path / "device", ca=manufacturer_ca)
    try:
        device.boot()
        assert cli(["policy", "from-eventlog", str(device.eventlog_path), "--name", "edge-camera-1.2.0",
                    "--device-class", "edge-camera", "--config", config]) == 0
        model_file = tmp_path / "classifier.onnx"
        model_file.write_bytes(small_classifier(seed=6))
        assert cli(["model", "publish", str(model_file), "--name", "classifier", "--version", "1.0.0",
                    "--deploy",
                    "--config", config]) == 0
        assert cli(["model", "entitle", "classifier", "--device-class", "edge-camera",
                    "--config", config]) == 0
        assert cli(["device", "preregister", "--config", config,
                    str(_ek_cert_file(tmp_path, device))]) == 0
        claim = tmp_path / "provisioning"
        assert cli(["claim", "issue", DEVICE, "--out", str(claim), "--config", config]) == 0
        capsys.readouterr()
        agent: Agent = make_agent(_agent_config(tmp_path / "agent", device, claim, broker))

        def serving_with(lease_ids: set[str]) -> Any:
            def check(s: Any) -> bool:
                m = s.models.get("models", {}).get("classifier") or {}
                return bool(m.get("serving_version") == "1.0.0" and not m.get("locked")
                            and m.get("lease_id") not in lease_ids)
            return check

        wait_status(agent, serving_with(set()), "the model unlocked")
        first_lease = agent.status().models["models"]["classifier"]["lease_id"]
        status, answer = _predict(agent, TOKEN)
        assert status == 200 and "scores" not in answer["outputs"]  # default policy: labels only

        # The server supersedes the lease and offers the same version again: the device asks for a new
        # key, and the new signed policy (full scores) applies.
        assert cli(["model", "policy", "classifier", "--set", "output_mode=full", "--config", config]) == 0
        wait_status(agent, serving_with({first_lease}), "a new key release under the new policy")
        status, answer = _predict(agent, TOKEN)
        assert status == 200 and "scores" in answer["outputs"]

        # Withdrawing the entitlement ends the lease: the signed key.denied locks the model.
        assert cli(["model", "revoke-entitlement", "classifier", "--device-class", "edge-camera",
                    "--config", config]) == 0
        wait_status(agent, lambda s: (s.models["models"]["classifier"].get("locked") is True),
                    "the model locked by key.denied")
        status, answer = _predict(agent, TOKEN)
        assert status == 423 and "key denied" in answer["error"]["message"]
    finally:
        device.shutdown()


def _ek_cert_file(tmp_path: Path, device: SimulatedDevice) -> Path:
    path = tmp_path / "ek.der"
    path.write_bytes(device.ek_certificate())
    return path


def test_a_model_onnxruntime_refuses_is_reported_to_the_server_with_the_runtimes_reason(
        tmp_path: Path, data_dir: Path, broker: MosquittoBroker, worker: Worker,
        manufacturer_ca: ManufacturerCA, make_agent: AgentFactory, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The issue's case: a model of IR version 14 reaches a device whose onnxruntime stops at 13 (here
    published past the server's own check, as by a server whose limits table is out of date): the
    device tells the server onnxruntime's reason, with its runtime version."""
    from agent.inference.runtime import ONNXRUNTIME_VERSION
    from fleet_server.modelstore import onnxio

    config = str(data_dir / "server.toml")
    device = SimulatedDevice.create(tmp_path / "device", ca=manufacturer_ca)
    try:
        device.boot()
        assert cli(["policy", "from-eventlog", str(device.eventlog_path), "--name", "edge-camera-1.2.0",
                    "--device-class", "edge-camera", "--config", config]) == 0
        model_file = tmp_path / "relu.onnx"
        model_file.write_bytes(relu_model(ir_version=14))
        monkeypatch.setattr(onnxio, "_check_runtime_support", lambda proto: None)
        assert cli(["model", "publish", str(model_file), "--name", "classifier", "--version", "1.0.0",
                    "--deploy", "--config", config]) == 0
        monkeypatch.undo()
        assert cli(["model", "entitle", "classifier", "--device-class", "edge-camera",
                    "--config", config]) == 0
        claim = tmp_path / "provisioning"
        assert cli(["claim", "issue", DEVICE, "--out", str(claim), "--config", config]) == 0
        assert cli(["device", "preregister", "--config", config,
                    str(_ek_cert_file(tmp_path, device))]) == 0
        capsys.readouterr()

        agent: Agent = make_agent(_agent_config(tmp_path / "agent", device, claim, broker))
        reason = "Unsupported model IR version: 14, max supported IR version: 13"

        def failed(s: Any) -> bool:
            m = s.models.get("models", {}).get("classifier") or {}
            return (m.get("load") or {}).get("state") == "failed"

        wait_status(agent, failed, "the device to fail loading the model")
        load = agent.status().models["models"]["classifier"]["load"]
        assert load["error"] == reason and agent.status().models["onnxruntime"] == ONNXRUNTIME_VERSION

        repo = worker.repo
        wait_until(lambda: bool(repo.models.loads(name="classifier", state="failed")),
                   what="the server to store the load failure")
        [stored] = repo.models.loads(name="classifier", state="failed")
        assert (stored.device_id, stored.version, stored.error) == (DEVICE, "1.0.0", reason)
        assert stored.onnxruntime == ONNXRUNTIME_VERSION
        runtime = repo.models.runtime(DEVICE)
        assert runtime is not None and runtime[0] == ONNXRUNTIME_VERSION
    finally:
        device.shutdown()


def test_a_quarantined_device_gets_no_model_key_after_a_restart_until_the_quarantine_is_lifted(
        tmp_path: Path, data_dir: Path, broker: MosquittoBroker, worker: Worker,
        manufacturer_ca: ManufacturerCA, make_agent: AgentFactory,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 9: a quarantine holds across an agent restart (reconnect, a new attestation with good
    evidence): no trusted verdict, no data key; ``device unquarantine`` brings both back. (Re-enrolling
    with a new AK is covered in test_agent_fleet_server.py: the vault's state is signed by the AK, so
    a device with a new AK cannot reuse its old vault.)"""
    config = str(data_dir / "server.toml")
    device = SimulatedDevice.create(tmp_path / "device", ca=manufacturer_ca)
    try:
        device.boot()
        assert cli(["policy", "from-eventlog", str(device.eventlog_path), "--name", "edge-camera-1.2.0",
                    "--device-class", "edge-camera", "--config", config]) == 0
        model_file = tmp_path / "classifier.onnx"
        model_file.write_bytes(small_classifier(seed=7))
        assert cli(["model", "publish", str(model_file), "--name", "classifier", "--version", "1.0.0",
                    "--deploy", "--config", config]) == 0
        assert cli(["model", "entitle", "classifier", "--device-class", "edge-camera",
                    "--config", config]) == 0
        assert cli(["device", "preregister", "--config", config,
                    str(_ek_cert_file(tmp_path, device))]) == 0
        claim = tmp_path / "provisioning"
        assert cli(["claim", "issue", DEVICE, "--out", str(claim), "--config", config]) == 0
        capsys.readouterr()
        agent_toml = _agent_config(tmp_path / "agent", device, claim, broker)

        def serving_without(lease_ids: set[str]) -> Any:
            def check(s: Any) -> bool:
                m = s.models.get("models", {}).get("classifier") or {}
                return bool(m.get("serving_version") == "1.0.0" and not m.get("locked")
                            and m.get("lease_id") not in lease_ids)
            return check

        first: Agent = make_agent(agent_toml)
        wait_status(first, serving_without(set()), "the model unlocked")
        first_lease = first.status().models["models"]["classifier"]["lease_id"]
        assert cli(["device", "quarantine", DEVICE, "--reason", "investigation", "--config", config]) == 0
        wait_status(first, lambda s: s.counters.get("revocations_received", 0) >= 1, "the quarantine notice")
        assert first.status().models["models"]["classifier"]["locked"]
        first.stop()

        restarted: Agent = make_agent(agent_toml)
        wait_status(restarted, lambda s: QUARANTINE_REASON in s.verdict_reasons,
                    "the quarantined verdict on the good evidence of the restarted agent")
        assert not restarted.status().trusted
        assert _predict(restarted, TOKEN)[0] != 200  # no data key: nothing is served
        leases = worker.repo.models.leases(device_id=DEVICE, name="classifier")
        assert leases and all(x.state != "active" for x in leases), [(x.lease_id, x.state) for x in leases]

        assert cli(["device", "unquarantine", DEVICE, "--config", config]) == 0
        wait_status(restarted, serving_without({first_lease}), "a new key once the quarantine is lifted")
        assert restarted.status().trusted
        status, answer = _predict(restarted, TOKEN)
        assert status == 200 and answer["model"] == "classifier"
    finally:
        device.shutdown()
