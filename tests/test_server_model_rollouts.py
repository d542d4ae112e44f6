"""Staged rollouts of model versions (fleet_server/service/rollouts.py, kind ``model``), SQLite and
PostgreSQL, with real swtpm devices through the Processor: trusted evidence and ``model-status``
reports as a device's agent sends them. While the rollout runs only its assigned members are
offered (and released the key of) the new version, the others keep the deployed one; completion
deploys it; an abort (here: canary load failures) offers the deployed version again.
"""

from __future__ import annotations

import dataclasses
import secrets
from pathlib import Path
from typing import Any

import pytest

from firmware_sim.testmodel import small_classifier
from fleet_server.config import ModelSettings
from fleet_server.keys import ResultSigner, create_model_signing_key
from fleet_server.modelstore import admin as model_admin
from fleet_server.modelstore.kek import Kek
from fleet_server.modelstore.store import PackageStore, publish_model
from fleet_server.rollouts.plan import Group, RolloutError, parse_plan
from fleet_server.service import admin, rollouts
from fleet_server.service.common import Counters, ManualClock, Outgoing
from fleet_server.service.context import ServiceContext
from fleet_server.service.processor import Processor
from fleet_server.storage.repo import Repository
from protocol import topics
from protocol.messages import (
    Challenge,
    KeyRequest,
    ModelLoad,
    ModelOffer,
    ModelStatus,
    decode_signed,
    key_request_qualifier,
)

pytest.register_assert_rewrite("server_fixtures")
from server_fixtures import (  # noqa: E402
    BOTH_DATABASES,
    DEVICE_CLASS,
    DeviceFactory,
    SimDevice,
    enroll,
    one,
)

pytest_plugins = ("mqtt_fixtures", "server_fixtures", "pg_fixtures")
pytestmark = [BOTH_DATABASES, pytest.mark.swtpm, pytest.mark.usefixtures("quiet_root_logging")]

NAME = "classifier"
GROUP = Group(DEVICE_CLASS)


@pytest.fixture
def proc(repo: Repository, ctx: ServiceContext, tmp_path: Path, golden_policy: admin.StoredPolicy,
         clock: ManualClock) -> Processor:
    """A processor whose context has a KEK and a package store; version 1.0.0 published, deployed
    and entitled to the class, 1.1.0 published only."""
    kek = Kek(secrets.token_bytes(32))
    store = PackageStore(tmp_path / "models")
    model_ctx = dataclasses.replace(ctx, kek=kek, models=ModelSettings(store_dir=store.root))
    signing = create_model_signing_key(tmp_path / "model-keys" / "model-signing.key")
    for seed, version in enumerate(("1.0.0", "1.1.0")):
        publish_model(repo, model=small_classifier(seed=seed), name=NAME, version=version,
                      signing_key=signing, kek=kek, store=store, now=clock.now_ms(), policy=None)
    model_admin.deploy(repo, NAME, "1.0.0", now=clock.now_ms())
    model_admin.entitle(repo, NAME, device_class=DEVICE_CLASS, now=clock.now_ms())
    return Processor(model_ctx, repo, Counters())


def _offered(signer: ResultSigner, out: list[Outgoing] | list[tuple[str, bytes]],
             device_id: str) -> list[str]:
    """Versions of ``NAME`` in the signed model offers to the device among ``out``."""
    topic = topics.device_down(device_id, "model-offer")
    found: list[str] = []
    for o in out:
        t, payload = (o.topic, o.payload) if isinstance(o, Outgoing) else o
        if t == topic:
            msg = decode_signed(payload, keys={signer.kid: signer.public_key}, aud=device_id).message
            assert isinstance(msg, ModelOffer)
            found += [ref.version for ref in msg.models if ref.name == NAME]
    return found


def _outbox(repo: Repository, device_id: str, kind: str) -> list[tuple[str, bytes]]:
    topic = topics.device_down(device_id, kind)
    return [(r.topic, r.payload) for r in repo.outbox() if r.topic == topic]


def _attest(proc: Processor, signer: ResultSigner, clock: ManualClock,
            dev: SimDevice) -> tuple[str, list[str], dict[str, list[int]]]:
    """Verdict, offered versions and the challenge's PCR selection of one attestation."""
    clock.advance(2_000)  # past attestation.request_min_interval
    challenge = one(signer, proc.handle_batch([dev.up("hello", dev.hello("boot"))]), dev.id, "challenge")
    assert isinstance(challenge, Challenge)
    out = proc.handle_batch([dev.up("evidence", dev.evidence(challenge))])
    result = one(signer, out, dev.id, "result")
    return (str(result.verdict), _offered(signer, out, dev.id),
            {bank: list(pcrs) for bank, pcrs in challenge.selection.items()})


def _key(proc: Processor, signer: ResultSigner, dev: SimDevice, selection: dict[str, list[int]],
         version: str) -> str:
    """``released`` or the reason the server denied the device's key request for ``version``."""
    key = dev.tpm.create_bound_key(selection)
    cert = dev.tpm.certify(key, key_request_qualifier(dev.id, NAME, version))
    out = proc.handle_batch([dev.up("key-request", dev.plain(KeyRequest(
        name=NAME, version=version, key_public=key.public, certify_attest=cert.attest,
        certify_signature=cert.signature)))])
    if any(o.topic == topics.device_down(dev.id, "key-release") for o in out):
        return "released"
    denied: Any = one(signer, out, dev.id, "key-denied")
    return "; ".join(denied.reasons)


def _report(proc: Processor, dev: SimDevice, state: str, error: str = "") -> None:
    """The agent's ``model-status``: onnxruntime's outcome of opening version 1.1.0."""
    status = ModelStatus(runtime="1.31.1", models=(ModelLoad(name=NAME, version="1.1.0", state=state,
                                                             error=error),))
    proc.handle_batch([dev.up("model-status", dev.plain(status))])


@pytest.fixture
def fleet(proc: Processor, repo: Repository, signer: ResultSigner, make_device: DeviceFactory,
          clock: ManualClock) -> dict[str, SimDevice]:
    devices: dict[str, SimDevice] = {}
    for i in range(4):
        dev = make_device(f"cam-{i}", fresh_tpm=True)
        admin.preregister_ek(repo, dev.tpm.ek_certificate(), now=clock.now_ms())
        assert enroll(proc, signer, dev).status == "admitted"
        verdict, offered, _ = _attest(proc, signer, clock, dev)
        assert (verdict, offered) == ("trusted", ["1.0.0"])  # no rollout: the deployed version
        devices[dev.id] = dev
    return devices


def _step(repo: Repository, signer: ResultSigner, clock: ManualClock) -> rollouts.StepResult:
    result = rollouts.step_rollout(repo, "m1", signer=signer, now=clock.now_ms())
    assert result is not None
    return result


def _phases(repo: Repository, clock: ManualClock) -> list[tuple[int, int, int]]:
    return [(p.devices, p.succeeded, p.failed) for p in rollouts.view(repo, "m1", now=clock.now_ms()).phases]


def _deployed(repo: Repository) -> list[str]:
    return [v.version for v in repo.models.versions(NAME) if v.deployed]


def test_a_model_version_reaches_devices_phase_by_phase_and_is_deployed_on_completion(
        proc: Processor, repo: Repository, signer: ResultSigner, fleet: dict[str, SimDevice],
        clock: ManualClock) -> None:
    plan = parse_plan({"canary": 1, "phases": [50, 100], "device_timeout_s": 600})
    rec = rollouts.create_rollout(repo, model=(NAME, "1.1.0"), group=GROUP, plan=plan, now=clock.now_ms(),
                                  actor="test", rollout_id="m1")
    assert (rec.kind, rec.release_id) == ("model", None)
    assert _phases(repo, clock) == [(1, 0, 0), (1, 0, 0), (2, 0, 0)]
    with pytest.raises(RolloutError, match="in rollout m1 still"):
        rollouts.create_rollout(repo, model=(NAME, "1.1.0"), group=GROUP, plan=plan, now=clock.now_ms(),
                                actor="test")
    with pytest.raises(model_admin.ModelAdminError, match="is in rollout m1"):  # no `model deploy` meanwhile
        model_admin.deploy(repo, NAME, "1.1.0", now=clock.now_ms())
    reached: set[str] = set()
    for expected_phase, size in ((0, 1), (1, 1), (2, 2)):
        step = _step(repo, signer, clock)
        assert (step.phase, len(step.assigned)) == (expected_phase, size), step
        reached |= set(step.assigned)
        for device_id, dev in fleet.items():
            # Assigned devices were sent the new version at once (they are trusted); every device's
            # next trusted result offers it to the assigned ones (until they hold its key) and the
            # deployed one to the others.
            assert _offered(signer, _outbox(repo, device_id, "model-offer"), device_id) == (
                ["1.1.0"] if device_id in reached else [])
            verdict, offered, selection = _attest(proc, signer, clock, dev)
            expected = ["1.1.0"] if device_id in step.assigned else [] if device_id in reached else ["1.0.0"]
            assert (verdict, offered) == ("trusted", expected)
            if device_id in step.assigned:
                assert _key(proc, signer, dev, selection, "1.1.0") == "released"
            elif device_id not in reached:
                assert "not deployed" in _key(proc, signer, dev, selection, "1.1.0")
        assert _step(repo, signer, clock).assigned == ()  # nothing more while the phase is in flight
        for device_id in step.assigned:
            _report(proc, fleet[device_id], "loaded")
    assert _deployed(repo) == ["1.0.0"]  # not deployed while the rollout runs
    final = _step(repo, signer, clock)
    assert final.state == "completed"
    assert _phases(repo, clock) == [(1, 1, 0), (1, 1, 0), (2, 2, 0)]
    assert {m.state for m in repo.rollouts.members("m1")} == {"succeeded"}
    assert _deployed(repo) == ["1.1.0", "1.0.0"]  # completion is `model deploy`
    [v] = [v for v in repo.models.versions(NAME) if v.version == "1.1.0"]
    assert v.deployed_by == "rollout:m1"


def test_canary_load_failures_abort_with_the_rest_untouched_and_the_old_version_offered_again(
        proc: Processor, repo: Repository, signer: ResultSigner, fleet: dict[str, SimDevice],
        clock: ManualClock) -> None:
    plan = parse_plan({"canary": 1, "phases": [100], "abort_failure_percent": 10})
    rollouts.create_rollout(repo, model=(NAME, "1.1.0"), group=GROUP, plan=plan, now=clock.now_ms(),
                            actor="test", rollout_id="m1")
    [canary] = _step(repo, signer, clock).assigned
    verdict, offered, selection = _attest(proc, signer, clock, fleet[canary])
    assert (verdict, offered) == ("trusted", ["1.1.0"])
    assert _key(proc, signer, fleet[canary], selection, "1.1.0") == "released"
    # onnxruntime on the canary cannot open the new version.
    _report(proc, fleet[canary], "failed", "[ONNXRuntimeError] : 10 : INVALID_GRAPH : opset 99")
    clock.advance(500)
    step = _step(repo, signer, clock)
    assert step.state == "aborted" and step.assigned == () and "failed" in step.reason
    members = {m.device_id: m for m in repo.rollouts.members("m1")}
    failed = members.pop(canary)
    assert failed.state == "failed" and "onnxruntime 1.31.1" in failed.reason
    assert "INVALID_GRAPH" in failed.reason
    assert "offered classifier 1.0.0 again" in failed.reason
    assert {m.state for m in members.values()} == {"pending"}  # untouched
    [alert] = repo.models.alerts(kind="rollout_aborted")
    assert alert.severity == "critical" and "m1" in alert.message and "classifier 1.1.0" in alert.message
    # The canary lost its lease of the aborted version (a signed key-denied) and was offered the
    # deployed version again; so is it with its next trusted result, and 1.1.0's key is refused now.
    assert _outbox(repo, canary, "key-denied")
    assert _offered(signer, _outbox(repo, canary, "model-offer"), canary)[-1] == "1.0.0"
    assert [x.state for x in repo.models.leases(device_id=canary)] == ["revoked"]
    verdict, offered, selection = _attest(proc, signer, clock, fleet[canary])
    assert (verdict, offered) == ("trusted", ["1.0.0"])
    assert "not deployed" in _key(proc, signer, fleet[canary], selection, "1.1.0")
    for device_id in members:
        assert _outbox(repo, device_id, "model-offer") == []
    assert _deployed(repo) == ["1.0.0"]
    assert rollouts.step_rollout(repo, "m1", signer=signer, now=clock.now_ms() + 60_000) is None


def test_a_device_untrusted_after_the_assignment_fails_the_rollout(
        proc: Processor, repo: Repository, signer: ResultSigner, fleet: dict[str, SimDevice],
        clock: ManualClock) -> None:
    rollouts.create_rollout(repo, model=(NAME, "1.1.0"), group=GROUP, plan=parse_plan({"canary": 1}),
                            now=clock.now_ms(), actor="test", rollout_id="m1")
    [canary] = _step(repo, signer, clock).assigned
    fleet[canary].power_cycle("tampered-kernel")
    verdict, offered, _ = _attest(proc, signer, clock, fleet[canary])
    assert (verdict, offered) == ("untrusted", [])
    step = _step(repo, signer, clock)
    assert step.state == "aborted" and "untrusted_after_update" in step.reason


def test_creating_a_model_rollout_checks_the_version(
        proc: Processor, repo: Repository, signer: ResultSigner, clock: ManualClock,
        fleet: dict[str, SimDevice]) -> None:
    plan = parse_plan({})
    with pytest.raises(RolloutError, match="is deployed already"):
        rollouts.create_rollout(repo, model=(NAME, "1.0.0"), group=GROUP, plan=plan, now=clock.now_ms(),
                                actor="test")
    with pytest.raises(RolloutError, match="no published model"):
        rollouts.create_rollout(repo, model=(NAME, "9.0.0"), group=GROUP, plan=plan, now=clock.now_ms(),
                                actor="test")
    model_admin.revoke_entitlement(repo, NAME, device_class=DEVICE_CLASS, signer=signer, now=clock.now_ms())
    with pytest.raises(RolloutError, match="no devices"):
        rollouts.create_rollout(repo, model=(NAME, "1.1.0"), group=GROUP, plan=plan, now=clock.now_ms(),
                                actor="test")
