"""The model vault end to end: real swtpm devices, real Mosquitto with TLS, the real agent, and the
server side played by :class:`ModelServer` - the agent tests' ``FleetSim`` (enrollment, challenges,
appraisal) plus model packages built with ``protocol.modelpkg``, chunk frames, and key releases
decided by the fleet server's own key-broker checks (``fleet_server.keybroker.check_key_request``:
AK signature, qualifier, certified name, attributes, PolicyPCR over the attested values, same boot)
and wrapped with ``fleet_server.keybroker.wrap_data_key``.

Covered: offer -> fetch -> key -> unlock -> inference over the local HTTP API with a token; telemetry;
no plaintext model or data key in any file; revocation and an untrusted verdict lock at once; an
expired lease locks; quota refusals, counters that survive restarts, and a restored state file
detected; malformed inputs never reach the model; tampered, truncated, mismatching, reordered and
older packages refused; a release for device A neither verifies on device B nor unwraps with A's key
blobs copied there; A rebooted into a tampered kernel cannot unwrap a replayed release (and gets a
new bound key); an untrusted device never asks for a key.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import secrets
import shutil
import socket as socket_module
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

pytest.register_assert_rewrite("mqtt_fixtures", "agent_fixtures")
from agent_fixtures import AgentFactory, FleetSim, wait_status, write_agent_config  # noqa: E402
from mqtt_fixtures import WAIT, Credentials  # noqa: E402

from agent.service import TPM_SUBDIR, Agent  # noqa: E402
from agent.tpm.adapter import TpmAdapter  # noqa: E402
from agent.vault.keys import INDEX_FILE, BoundKeys  # noqa: E402
from agent.vault.vault import VAULT_DIR  # noqa: E402
from firmware_sim.broker import MosquittoBroker  # noqa: E402
from firmware_sim.device import SimulatedDevice  # noqa: E402
from firmware_sim.manufacturer import ManufacturerCA  # noqa: E402
from firmware_sim.profiles import reference_pcrs  # noqa: E402
from firmware_sim.testmodel import LABELS, classifier_io_signature, small_classifier  # noqa: E402
from fleet_server.keybroker import BootCounters, KeyRequestError, check_key_request, wrap_data_key  # noqa: E402
from protocol import topics  # noqa: E402
from protocol.encoding import b64encode, canonical_bytes  # noqa: E402
from protocol.errors import TpmError  # noqa: E402
from protocol.messages import (  # noqa: E402
    AttestationResult,
    Evidence,
    KeyDenied,
    KeyRelease,
    KeyRequest,
    Message,
    ModelChunk,
    ModelFetch,
    ModelOffer,
    ModelPolicy,
    ModelRef,
    Telemetry,
    decode_plain,
    encode_chunk,
    key_id,
    new_message_id,
    sign_bytes,
)
from protocol.modelpkg import SIGNING_CONTEXT, TAG_SIZE, build_package, read_manifest  # noqa: E402
from protocol.mqtt import InboundMessage  # noqa: E402
from protocol.tpm.structures import parse_attest  # noqa: E402

pytest_plugins = ("mqtt_fixtures", "agent_fixtures")
pytestmark = [pytest.mark.swtpm, pytest.mark.mqtt]

MODEL = small_classifier(seed=11)
CHUNK = 1024
TOKEN = "app-token-0123456789abcdef"
OTHER_TOKEN = "cam-token-0123456789abcdef"
POLICY = ModelPolicy(output_mode="topk", k=2, decimals=3, labels=LABELS, max_batch=8, client_rate=1000,
                     client_burst=1000)
ROW = [0.25] * 16


# --------------------------------------------------------------------------------------------------
# the server side
# --------------------------------------------------------------------------------------------------
@dataclass
class Published:
    ref: ModelRef
    package: bytes
    data_key: bytes


@dataclass
class KeyDecision:
    """How the server answers key requests (tests change it)."""

    enabled: bool = True
    limit: int | None = None                         # releases per device at most
    only: set[str] | None = None                     # devices that may get keys
    lease_ms: int = 120_000
    policy: ModelPolicy = field(default_factory=lambda: POLICY)


class ModelServer(FleetSim):
    """``FleetSim`` plus model packages, chunks, key releases (real key-broker checks) and telemetry."""

    def __init__(self, port: int, credentials: Credentials) -> None:
        super().__init__(port, credentials)
        self.model_key = ec.generate_private_key(ec.SECP256R1())  # the model-signing key, not the result key
        self.published: dict[tuple[str, str], Published] = {}
        self.served_bytes: dict[tuple[str, str], bytes] = {}   # what fetches are answered from
        self.keys = KeyDecision()
        self.renew_leases = True
        self.reference: dict[str, dict[int, bytes]] | None = None
        self.verdicts: dict[str, tuple[str, Evidence | None]] = {}
        self.key_requests: list[tuple[str, KeyRequest]] = []
        self.releases: list[tuple[str, KeyRelease, bytes]] = []
        self.denials: list[tuple[str, KeyDenied]] = []
        self.telemetry: list[tuple[str, Telemetry]] = []
        self.fetches = 0

    # -- publishing --------------------------------------------------------------------------------
    def model_public_pem(self) -> bytes:
        return self.model_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                        serialization.PublicFormat.SubjectPublicKeyInfo)

    def build(self, version: str, *, name: str = "classifier", model: bytes = MODEL) -> Published:
        data_key = secrets.token_bytes(32)
        pkg = build_package(model, name=name, version=version, io_signature=classifier_io_signature(),
                            signing_key=self.model_key, key_id=key_id(self.model_key.public_key()),
                            data_key=data_key, created_at=int(time.time() * 1000), chunk_size=CHUNK)
        return Published(ModelRef(name=name, version=version, size=len(pkg),
                                  package_sha256=hashlib.sha256(pkg).digest()), pkg, data_key)

    def publish_model(self, pub: Published, *, serve: bytes | None = None) -> ModelRef:
        """Make ``pub`` available (fetches answered from ``serve`` if given: a tampering server)."""
        with self._cond:
            self.published[(pub.ref.name, pub.ref.version)] = pub
            self.served_bytes[(pub.ref.name, pub.ref.version)] = pub.package if serve is None else serve
        return pub.ref

    def offer(self, device_id: str, *refs: ModelRef) -> None:
        self.send_device(device_id, "model-offer", ModelOffer(models=tuple(refs)))

    # -- appraisal with reference values and leases ------------------------------------------------
    def send_device(self, device_id: str, kind: str, msg: Message, **kw: Any) -> bytes:
        if isinstance(msg, AttestationResult):
            with self._cond:
                ev = next((e for e in reversed(self.evidence) if e.challenge_id == msg.challenge_id), None)
                reference = self.reference
            if msg.verdict == "trusted" and reference is not None and ev is not None \
                    and ev.pcrs.get("sha256") != {i: reference["sha256"][i] for i in ev.pcrs["sha256"]}:
                msg = replace(msg, verdict="untrusted", reasons=("PCR values differ from the reference",))
            if msg.verdict == "trusted" and self.renew_leases:
                msg = replace(msg, lease_until=int(time.time() * 1000) + self.keys.lease_ms)
            with self._cond:
                self.verdicts[device_id] = (msg.verdict, ev)
        return super().send_device(device_id, kind, msg, **kw)

    # -- inbound -----------------------------------------------------------------------------------
    def _handle(self, inbound: InboundMessage) -> None:
        parsed = topics.parse_server_topic(inbound.topic)
        kinds = {"model-fetch": (ModelFetch,), "key-request": (KeyRequest,), "telemetry": (Telemetry,)}
        if parsed.subtree is not topics.Subtree.DEVICES or parsed.kind not in kinds:
            super()._handle(inbound)
            return
        env = decode_plain(inbound.payload, allowed=kinds[parsed.kind], max_size=64 * 1024)
        self._record(inbound, parsed.identity, env.message)
        msg = env.message
        if isinstance(msg, ModelFetch):
            self._fetch(parsed.device_id, msg)
        elif isinstance(msg, KeyRequest):
            self._key_request(parsed.device_id, msg)
        elif isinstance(msg, Telemetry):
            with self._cond:
                self.telemetry.append((parsed.device_id, msg))
                self._cond.notify_all()

    def _fetch(self, device_id: str, fetch: ModelFetch) -> None:
        with self._cond:
            data = self.served_bytes.get((fetch.name, fetch.version))
            self.fetches += 1
        if data is None:
            return
        piece = data[fetch.offset:fetch.offset + fetch.length]
        frame = encode_chunk(ModelChunk(name=fetch.name, version=fetch.version, offset=fetch.offset,
                                        total=len(data), data=piece))
        self.publish(topics.device_down(device_id, "model-chunk"), frame)

    def _key_request(self, device_id: str, req: KeyRequest) -> None:
        with self._cond:
            self.key_requests.append((device_id, req))
            verdict, ev = self.verdicts.get(device_id, ("unknown", None))
            dev = self.devices[device_id]
            pub = self.published.get((req.name, req.version))
            released = sum(1 for d, _, _ in self.releases if d == device_id)
            decision = self.keys
        reasons = []
        if verdict != "trusted" or ev is None or dev.ak is None:
            reasons.append(f"device {device_id} is {verdict}: no model keys")
        elif pub is None:
            reasons.append(f"no published model {req.name} {req.version}")
        elif not decision.enabled or (decision.only is not None and device_id not in decision.only) \
                or (decision.limit is not None and released >= decision.limit):
            reasons.append("no key for this device now")
        certified = None
        if not reasons:
            assert ev is not None and dev.ak is not None and pub is not None
            clock = parse_attest(ev.attest).clock_info
            try:
                certified = check_key_request(
                    req, device_id=device_id, ak=dev.ak, attested_pcrs=ev.pcrs,
                    selection={bank: tuple(sorted(v)) for bank, v in ev.pcrs.items()},
                    now=int(time.time() * 1000), boot=BootCounters(clock.reset_count, clock.restart_count))
            except KeyRequestError as exc:
                reasons.append(exc.diagnostics())
        if reasons or certified is None or pub is None:
            denied = KeyDenied(name=req.name, version=req.version, reasons=tuple(reasons))
            with self._cond:
                self.denials.append((device_id, denied))
                self._cond.notify_all()
            self.send_device(device_id, "key-denied", denied)
            return
        release = KeyRelease(name=req.name, version=req.version, key_name=certified.name,
                             wrapped_key=wrap_data_key(pub.data_key, certified), lease_id=new_message_id(),
                             lease_expires=int(time.time() * 1000) + decision.lease_ms,
                             policy=decision.policy)
        payload = self.sign(release, device_id)
        with self._cond:
            self.releases.append((device_id, release, payload))
            self._cond.notify_all()
        self.publish(topics.device_down(device_id, "key-release"), payload)


# --------------------------------------------------------------------------------------------------
# fixtures and helpers
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def server(mqtt_broker: MosquittoBroker, credentials: Credentials) -> Iterator[ModelServer]:
    assert mqtt_broker.port is not None
    with ModelServer(mqtt_broker.port, credentials) as sim:
        yield sim


@dataclass
class Device:
    id: str
    sim: SimulatedDevice
    folder: Path


@pytest.fixture
def make_device(tmp_path: Path, manufacturer_ca: ManufacturerCA) -> Iterator[Callable[..., Device]]:
    made: list[SimulatedDevice] = []

    def factory(device_id: str, profile: str = "golden") -> Device:
        sim = SimulatedDevice.create(tmp_path / f"sim-{device_id}", ca=manufacturer_ca, profile=profile)
        made.append(sim)
        sim.boot()
        return Device(device_id, sim, tmp_path / f"agent-{device_id}")

    try:
        yield factory
    finally:
        for sim in made:
            sim.shutdown()


def configure(dev: Device, server: ModelServer, broker: MosquittoBroker, credentials: Credentials,
              *, socket: Path | None = None, **models: object) -> Path:
    """Write ``agent.toml`` (with ``[models]`` and ``[inference]`` on an ephemeral loopback port, or on
    the Unix ``socket``), the model key and the clients file."""
    assert broker.port is not None
    server_key = server.write_public_key(dev.folder.parent / "server-signing.pub.pem")
    cfg = write_agent_config(dev.folder, device_id=dev.id, device=dev.sim, broker_port=broker.port,
                             credentials=credentials, server_key=server_key)
    (dev.folder / "models.pub.pem").write_bytes(server.model_public_pem())
    (dev.folder / "clients.toml").write_text(
        f'[clients.app]\ntoken_sha256 = "{hashlib.sha256(TOKEN.encode()).hexdigest()}"\n'
        f'[clients.cam]\ntoken_sha256 = "{hashlib.sha256(OTHER_TOKEN.encode()).hexdigest()}"\nrate = 1000\n')
    settings: dict[str, object] = {"telemetry_interval": 1, "fetch_chunk": CHUNK, "fetch_window": 3,
                                   "key_retry": 2, "counter_save_interval": 0.5, "harden_process": False}
    settings.update(models)
    lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in settings.items())
    listen = "port = 0" if socket is None else f'socket = "{socket}"'
    with cfg.open("a") as f:
        f.write(f'\n[models]\nsigning_public_key = "models.pub.pem"\n{lines}\n\n'
                f'[inference]\n{listen}\nclients_file = "clients.toml"\n')
    return cfg


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over the local API's Unix socket."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket_module.socket(socket_module.AF_UNIX, socket_module.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.path)
        self.sock = sock


def vault_status(agent: Agent) -> dict[str, Any]:
    return dict(agent.status().models)


def model_status(agent: Agent, name: str = "classifier") -> dict[str, Any]:
    return dict(vault_status(agent).get("models", {}).get(name) or {})


def wait_vault(agent: Agent, predicate: Callable[[dict[str, Any]], bool], what: str,
               timeout: float = WAIT) -> None:
    wait_status(agent, lambda s: predicate(dict(s.models)), what, timeout)


def wait_unlocked(agent: Agent, version: str = "1.0.0") -> None:
    def serving(v: dict[str, Any]) -> bool:
        m = v.get("models", {}).get("classifier") or {}
        return bool(m.get("serving_version") == version and not m["locked"])

    wait_vault(agent, serving, f"model {version} unlocked")


def counter(agent: Agent, name: str) -> int:
    return int(vault_status(agent).get("counters", {}).get(name, 0))


def predict(agent: Agent, token: str | None, inputs: Any = None, *, body: bytes | None = None,
            model: str = "classifier") -> tuple[int, dict[str, Any]]:
    address = vault_status(agent)["inference_address"]
    if address.startswith("/"):
        conn: http.client.HTTPConnection = UnixHTTPConnection(address, timeout=WAIT)
    else:
        host, port = address.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=WAIT)
    try:
        payload = body if body is not None else json.dumps({"inputs": inputs}).encode()
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        conn.request("POST", f"/v1/models/{model}:predict", payload, headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def bring_up(make_agent: AgentFactory, server: ModelServer, cfg: Path, dev: Device,
             pub: Published | None = None) -> tuple[Agent, Published]:
    """Start the agent, wait for trust, publish and offer the model, wait until it serves."""
    agent = make_agent(cfg)
    wait_status(agent, lambda s: s.trusted, "a trusted verdict")
    pub = pub or server.build("1.0.0")
    server.publish_model(pub)
    server.offer(dev.id, pub.ref)
    wait_unlocked(agent, pub.ref.version)
    return agent, pub


def files_under(*roots: Path) -> Iterator[Path]:
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                yield path


# --------------------------------------------------------------------------------------------------
# the tests
# --------------------------------------------------------------------------------------------------
def test_offer_fetch_key_unlock_and_inference_over_the_local_api(
        tmp_path: Path, server: ModelServer, mqtt_broker: MosquittoBroker, credentials: Credentials,
        make_device: Callable[..., Device], make_agent: AgentFactory) -> None:
    dev = make_device("cam-0001")
    agent, pub = bring_up(make_agent, server, configure(dev, server, mqtt_broker, credentials), dev)

    # the wire as the server saw it: chunked fetches within the window, one certified key request
    assert server.fetches >= pub.ref.size // CHUNK
    assert [d for d, _ in server.key_requests] == [dev.id] and len(server.releases) == 1
    status, answer = predict(agent, TOKEN, {"input": [ROW, ROW]})
    assert status == 200 and answer["model"] == "classifier"
    assert len(answer["outputs"]["labels"]) == 2 and set(answer["outputs"]["labels"][0]) <= set(LABELS)
    assert len(answer["outputs"]["labels"][0]) == 2  # topk with k = 2 from the signed policy
    assert predict(agent, None, {"input": [ROW]})[0] == 401
    assert predict(agent, "not-a-token", {"input": [ROW]})[0] == 401

    # telemetry: usage per client with the extraction monitor's view
    server.wait_for(lambda: any(t.served >= 2 for _, t in server.telemetry), "usage telemetry")
    usage = next(t for _, t in server.telemetry if t.served >= 2)
    assert (usage.name, usage.version) == ("classifier", "1.0.0")
    assert any(c.client == "app" and c.served >= 2 for c in usage.clients)

    # files: ciphertext package and state 0600; the vault's TPM-signed state has the version mark
    state = agent.config.state_dir
    pkg = state / "models" / "classifier-1.0.0.pkg"
    assert pkg.read_bytes() == pub.package and pkg.stat().st_mode & 0o777 == 0o600
    vault_state = state / VAULT_DIR / "state.json"
    assert vault_state.stat().st_mode & 0o777 == 0o600
    assert json.loads(base64.b64decode(json.loads(vault_state.read_text())["body"]))["versions"] == \
        {"classifier": "1.0.0"}
    audit = (state / "audit.jsonl").read_text().splitlines()
    assert any(json.loads(line)["outcome"] == "ok" for line in audit)
    assert any(json.loads(line)["outcome"] == "unauthenticated" for line in audit)

    # no plaintext model and no data key in any file of the device, the agent, or the test at all
    agent.stop()
    key = pub.data_key
    needles = [MODEL, MODEL[len(MODEL) // 2:len(MODEL) // 2 + 256], key, key.hex().encode(),
               base64.b64encode(key), b64encode(key).encode()]
    scanned = 0
    for path in files_under(dev.sim.folder, dev.folder, tmp_path):
        data = path.read_bytes()
        scanned += 1
        for needle in needles:
            assert needle not in data, f"secret bytes found in {path}"
    assert scanned > 20
    assert pub.package[-64:] in pkg.read_bytes()  # the scan does find what is there (ciphertext)


def test_revocation_locks_at_once_and_inference_is_refused(
        server: ModelServer, mqtt_broker: MosquittoBroker, credentials: Credentials,
        make_device: Callable[..., Device], make_agent: AgentFactory) -> None:
    dev = make_device("cam-0002")
    run = Path(tempfile.mkdtemp(prefix="vault-", dir="/tmp"))  # Unix socket paths must be short
    try:
        sock = run / "edge-agent" / "inference.sock"
        agent, _ = bring_up(make_agent, server, configure(dev, server, mqtt_broker, credentials, socket=sock),
                            dev)
        assert vault_status(agent)["inference_address"] == str(sock)
        assert sock.stat().st_mode & 0o777 == 0o600 and sock.parent.stat().st_mode & 0o777 == 0o700
        _revoke_and_check(agent, server, dev)
    finally:
        shutil.rmtree(run, ignore_errors=True)


def _revoke_and_check(agent: Agent, server: ModelServer, dev: Device) -> None:
    assert predict(agent, TOKEN, {"input": [ROW]})[0] == 200
    server.keys.enabled = False
    server.revoke(dev.id)
    wait_status(agent, lambda s: s.counters.get("revocations_received", 0) == 1, "the revocation")
    # The agent counts the revocation only after the vault has locked: any status that shows the
    # revocation shows the model locked.
    snapshot = agent.status()
    assert snapshot.counters["revocations_received"] == 1
    assert snapshot.models["models"]["classifier"]["locked"]
    last = snapshot.models["last_lock"]
    assert last["models"] == ["classifier"] and "revoked by the fleet server" in last["reason"]
    assert last["lock_seconds"] < 1.0  # synchronous on receipt: inference refused within the second
    status, answer = predict(agent, TOKEN, {"input": [ROW]})
    assert status == 423 and answer["error"]["code"] == "model_locked"
    assert "revoked" in answer["error"]["message"]


def test_an_expired_lease_locks_the_model(
        server: ModelServer, mqtt_broker: MosquittoBroker, credentials: Credentials,
        make_device: Callable[..., Device], make_agent: AgentFactory) -> None:
    dev = make_device("cam-0003")
    server.renew_leases = False  # results carry no lease renewal
    server.keys = KeyDecision(limit=1, lease_ms=5_000)
    agent, _ = bring_up(make_agent, server, configure(dev, server, mqtt_broker, credentials), dev)
    lease = model_status(agent)["lease_expires"]
    assert lease is not None and lease <= time.time() + 5
    wait_vault(agent, lambda v: v["models"]["classifier"]["locked"], "the lease to expire")
    assert "expired" in model_status(agent)["lock_reason"]
    status, answer = predict(agent, TOKEN, {"input": [ROW]})
    assert status == 423 and "expired" in answer["error"]["message"]
    # locked until a new release: the agent asks again (still trusted) and the server says no
    server.wait_for(lambda: len(server.denials) >= 1, "a second key request, denied")
    assert model_status(agent)["locked"]


def test_offline_grace_shortens_the_servers_lease(
        server: ModelServer, mqtt_broker: MosquittoBroker, credentials: Credentials,
        make_device: Callable[..., Device], make_agent: AgentFactory) -> None:
    dev = make_device("cam-0004")
    server.keys = KeyDecision(limit=1, lease_ms=600_000)
    cfg = configure(dev, server, mqtt_broker, credentials, offline_grace=3)
    agent, _ = bring_up(make_agent, server, cfg, dev)
    assert model_status(agent)["lease_expires"] <= time.time() + 3
    wait_vault(agent, lambda v: v["models"]["classifier"]["locked"], "the offline grace to pass")


def test_quota_refusal_counters_survive_restarts_and_a_restored_state_file_is_detected(
        server: ModelServer, mqtt_broker: MosquittoBroker, credentials: Credentials,
        make_device: Callable[..., Device], make_agent: AgentFactory) -> None:
    dev = make_device("cam-0005")
    server.keys.policy = replace(POLICY, client_daily_quota=3)
    cfg = configure(dev, server, mqtt_broker, credentials)
    agent, pub = bring_up(make_agent, server, cfg, dev)
    for _ in range(2):
        assert predict(agent, TOKEN, {"input": [ROW]})[0] == 200
    agent.stop()  # saves the counters (state file, then NV increment)
    state_file = agent.config.state_dir / VAULT_DIR / "state.json"
    old = state_file.read_bytes()

    agent = make_agent(cfg)
    wait_unlocked(agent)
    # same boot state: the bound key was reused for the new request, not created again
    index = json.loads((agent.config.state_dir / VAULT_DIR / INDEX_FILE).read_text())["keys"]
    assert len(index) == 1 and len({r.key_public for _, r in server.key_requests}) == 1
    assert predict(agent, TOKEN, {"input": [ROW]})[0] == 200  # the third sample of the day
    status, answer = predict(agent, TOKEN, {"input": [ROW]})
    assert status == 403 and answer["error"]["code"] == "quota_exceeded"
    assert "daily quota of client app exhausted: 3 of 3" in answer["error"]["message"]
    assert predict(agent, OTHER_TOKEN, {"input": [ROW]})[0] == 200  # another client has its own quota
    agent.stop()

    state_file.write_bytes(old)  # the attacker restores the state from before to win back quota
    requests_before = len(server.key_requests)
    agent = make_agent(cfg)
    wait_vault(agent, lambda v: v.get("error") is not None and v.get("inference_address") is not None,
               "the rollback to be detected (and the API up)")
    assert "rollback" in vault_status(agent)["error"] and "older than the TPM NV counter" in \
        vault_status(agent)["error"]
    status, answer = predict(agent, TOKEN, {"input": [ROW]})
    assert status == 423 and "rollback" in answer["error"]["message"]
    wait_status(agent, lambda s: s.trusted, "a trusted verdict")
    server.offer(dev.id, pub.ref)  # even when trusted and offered, no key is asked for
    server.challenge(dev.id)
    server.wait_for(lambda: len(server.results) >= 4, "another appraisal")
    wait_status(agent, lambda s: s.counters.get("results_received", 0) >= 2, "the second result")
    assert len(server.key_requests) == requests_before


def test_malformed_inputs_never_reach_the_model(
        server: ModelServer, mqtt_broker: MosquittoBroker, credentials: Credentials,
        make_device: Callable[..., Device], make_agent: AgentFactory) -> None:
    dev = make_device("cam-0006")
    agent, _ = bring_up(make_agent, server, configure(dev, server, mqtt_broker, credentials), dev)
    vault = agent._vault
    assert vault is not None
    cases: list[tuple[Any, bytes | None]] = [
        ({"input": [[0.1] * 15]}, None),                       # wrong fixed dimension
        ({"input": [ROW] * 9}, None),                          # batch above the policy's max_batch
        ({"input": [["x"] * 16]}, None),                       # strings
        ({"input": [[True] * 16]}, None),                      # booleans for floats
        ({"other": [ROW]}, None),                              # unknown input name
        ({}, None),                                            # missing input
        ({"input": ROW}, None),                                # wrong rank
        ({"input": [[1e39] * 16]}, None),                      # not a float32
        (None, b'{"inputs": {"input": [[NaN]]}}'),             # NaN
        (None, b'{"inputs": {"input": [[1.0]]}, "inputs": {}}'),  # duplicate key
        (None, b"\xff\xfe not json"),
    ]
    for inputs, body in cases:
        status, answer = predict(agent, TOKEN, inputs, body=body)
        assert (status, answer["error"]["code"]) == (400, "invalid_input"), (inputs, body, answer)
    assert vault.model_runs("classifier") == 0
    assert predict(agent, TOKEN, {"input": [ROW]})[0] == 200
    assert vault.model_runs("classifier") == 1


def _tampered(pkg: bytes) -> bytes:
    out = bytearray(pkg)
    out[-100] ^= 0x01
    return bytes(out)


def _reordered_resigned(server: ModelServer, pkg: bytes) -> bytes:
    """An insider with the model-signing key but not the data key swaps two chunks and re-signs."""
    manifest = read_manifest(pkg, trusted_keys={key_id(server.model_key.public_key()):
                                                server.model_key.public_key()})
    rec = CHUNK + TAG_SIZE
    records = bytearray(pkg[manifest.data_offset:])
    records[0:rec], records[rec:2 * rec] = records[rec:2 * rec], records[0:rec]
    body = manifest.body()
    body["ciphertext_sha256"] = b64encode(hashlib.sha256(records).digest())
    raw = canonical_bytes(body)
    return (pkg[:8] + len(raw).to_bytes(4, "big") + raw + key_id(server.model_key.public_key()).encode()
            + sign_bytes(server.model_key, SIGNING_CONTEXT + raw) + bytes(records))


def test_bad_and_older_packages_are_refused(
        server: ModelServer, mqtt_broker: MosquittoBroker, credentials: Credentials,
        make_device: Callable[..., Device], make_agent: AgentFactory) -> None:
    dev = make_device("cam-0007")
    agent = make_agent(configure(dev, server, mqtt_broker, credentials))
    wait_status(agent, lambda s: s.trusted, "a trusted verdict")

    good = server.build("1.1.0")
    bad_cases = [
        # the offer names the tampered bytes: the signed manifest's ciphertext digest catches them
        replace(good, package=_tampered(good.package)),
        # truncated, offered with the truncated size and digest
        replace(good, package=good.package[:-300]),
    ]
    for refused, case in enumerate(bad_cases, start=1):
        ref = replace(case.ref, size=len(case.package), package_sha256=hashlib.sha256(case.package).digest())
        server.publish_model(replace(case, ref=ref))
        server.offer(dev.id, ref)
        wait_vault(agent, lambda v, n=refused: v["counters"].get("packages_refused", 0) >= n, "a refusal")
    # the signed offer names the genuine digest, the server (or a network attacker) serves other bytes
    server.publish_model(good, serve=_tampered(good.package))
    server.offer(dev.id, good.ref)
    wait_vault(agent, lambda v: v["counters"].get("packages_refused", 0) >= 3, "a digest mismatch")
    assert server.key_requests == []
    assert not (agent.config.state_dir / "models" / "classifier-1.1.0.pkg").exists()

    # a genuine package is taken, then an older version is refused
    good = server.build("1.1.0")
    server.publish_model(good)
    server.offer(dev.id, good.ref)
    wait_unlocked(agent, "1.1.0")
    old = server.build("1.0.0")
    server.publish_model(old)
    server.offer(dev.id, old.ref)
    wait_vault(agent, lambda v: v["counters"].get("packages_refused", 0) >= 4, "the older version refused")
    assert "older than the held version 1.1.0" in model_status(agent)["last_error"]

    # reordered chunks under a re-signed manifest: stored (nothing without the key can tell), then the
    # decryption with the released key fails and the model never serves it
    newer = server.build("1.2.0")
    forged = _reordered_resigned(server, newer.package)
    server.publish_model(replace(newer, package=forged, ref=replace(
        newer.ref, size=len(forged), package_sha256=hashlib.sha256(forged).digest())))
    server.offer(dev.id, replace(newer.ref, size=len(forged), package_sha256=hashlib.sha256(forged).digest()))
    wait_vault(agent, lambda v: v["counters"].get("releases_refused", 0) >= 1, "the forged package's release")
    status = model_status(agent)
    assert "chunk 0 of" in status["last_error"] and status["serving_version"] == "1.1.0"
    assert predict(agent, TOKEN, {"input": [ROW]})[0] == 200  # 1.1.0 still serves


def test_a_release_for_device_a_does_not_unlock_device_b(
        server: ModelServer, mqtt_broker: MosquittoBroker, credentials: Credentials,
        make_device: Callable[..., Device], make_agent: AgentFactory) -> None:
    dev_a, dev_b = make_device("cam-00a"), make_device("cam-00b")
    server.keys.only = {dev_a.id}
    agent_a, pub = bring_up(make_agent, server, configure(dev_a, server, mqtt_broker, credentials), dev_a)
    agent_b = make_agent(configure(dev_b, server, mqtt_broker, credentials))
    wait_status(agent_b, lambda s: s.trusted, "device B trusted")
    server.offer(dev_b.id, pub.ref)
    server.wait_for(lambda: any(d == dev_b.id for d, _ in server.denials), "B's key request denied")
    _, release, payload = server.releases[0]

    # 1. A's signed release replayed to B on the wire: addressed to A, refused by B's verification
    rejected = agent_b.status().counters.get("messages_rejected", 0)
    server.publish(topics.device_down(dev_b.id, "key-release"), payload)
    wait_status(agent_b, lambda s: s.counters.get("messages_rejected", 0) == rejected + 1,
                "the replay refused")
    assert model_status(agent_b)["locked"] and counter(agent_b, "key_releases_received") == 0

    # 2. The attacker copies A's bound key blobs and key index onto B: B's TPM cannot use them
    agent_b.stop()
    state_a, state_b = agent_a.config.state_dir, agent_b.config.state_dir
    for blob in (state_a / TPM_SUBDIR).glob("bound-*"):
        shutil.copy(blob, state_b / TPM_SUBDIR / blob.name)
    shutil.copy(state_a / VAULT_DIR / INDEX_FILE, state_b / VAULT_DIR / INDEX_FILE)
    tpm_b = TpmAdapter(dev_b.sim.tcti, state_b / TPM_SUBDIR)
    try:
        keys_b = BoundKeys(lambda: tpm_b, state_b / VAULT_DIR, dev_b.id, clock=time.time)
        with pytest.raises(TpmError):
            keys_b.unwrap(release)
    finally:
        tpm_b.close()


def test_a_device_rebooted_into_a_tampered_kernel_cannot_unwrap_a_replayed_release(
        server: ModelServer, mqtt_broker: MosquittoBroker, credentials: Credentials,
        make_device: Callable[..., Device], make_agent: AgentFactory) -> None:
    dev = make_device("cam-0008")
    server.keys.limit = 1
    agent, _ = bring_up(make_agent, server, configure(dev, server, mqtt_broker, credentials), dev)
    _, release, payload = server.releases[0]
    assert release.lease_expires > time.time() * 1000 + 60_000
    agent.stop()

    dev.sim.reflash("tampered-kernel")
    dev.sim.power_cycle()
    # This server does not compare PCRs with reference values, so the tampered device is told it is
    # trusted and runs as if nothing happened: only the TPM stands between it and the data key.
    agent = make_agent(configure(dev, server, mqtt_broker, credentials))
    wait_status(agent, lambda s: s.trusted, "the tampered device's (naive) trusted verdict")
    server.wait_for(lambda: any(d == dev.id for d, _ in server.denials), "its new key request, denied")
    index = json.loads((agent.config.state_dir / VAULT_DIR / INDEX_FILE).read_text())["keys"]
    assert len(index) == 2  # the new boot state got a new bound key, certified afresh
    assert server.key_requests[-1][1].key_public != server.key_requests[0][1].key_public

    # the release captured before the reboot, replayed (still fresh, and new to this agent process)
    server.publish(topics.device_down(dev.id, "key-release"), payload)
    wait_vault(agent, lambda v: v["counters"].get("unwrap_failures", 0) == 1, "the TPM to refuse the unwrap")
    status = model_status(agent)
    assert status["locked"] and "a policy check failed" in status["last_error"]
    assert predict(agent, TOKEN, {"input": [ROW]})[0] == 423


def test_an_untrusted_device_never_asks_for_a_key(
        server: ModelServer, mqtt_broker: MosquittoBroker, credentials: Credentials,
        make_device: Callable[..., Device], make_agent: AgentFactory) -> None:
    dev = make_device("cam-0009", profile="tampered-kernel")
    server.reference = reference_pcrs("golden")
    agent = make_agent(configure(dev, server, mqtt_broker, credentials))
    wait_status(agent, lambda s: s.verdict == "untrusted", "the untrusted verdict")
    pub = server.build("1.0.0")
    server.publish_model(pub)
    server.offer(dev.id, pub.ref)  # even offered (which a real server would not), no key is asked for
    wait_vault(agent, lambda v: (v["models"].get("classifier") or {}).get("version") == "1.0.0",
               "the package stored")
    server.challenge(dev.id)
    wait_status(agent, lambda s: s.counters.get("results_received", 0) >= 2, "another untrusted result")
    assert server.key_requests == [] and model_status(agent)["locked"]
    assert predict(agent, TOKEN, {"input": [ROW]})[0] == 423
