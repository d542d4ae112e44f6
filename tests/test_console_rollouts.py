"""Rollouts in the API (/api/v1/rollouts): create (fleet:deploy), dry run, list and show (fleet:view),
pause/resume/approve/cancel/abort, device tags; strict input; every change audited."""

from __future__ import annotations

from pathlib import Path

import pytest
from flask.testing import FlaskClient

from fleet_server.console.rbac import Right, has_right
from fleet_server.console.services import ConsoleServices
from fleet_server.modelstore import admin as model_admin
from fleet_server.service import rollouts
from fleet_server.service.releases import add_release
from fleet_server.storage.release_repo import ReleaseRecord

pytest.register_assert_rewrite("console_fixtures", "release_fixtures", "browser_fixtures")
from browser_fixtures import MODEL, publish_test_model  # noqa: E402
from console_fixtures import CLASS, SoftDevice  # noqa: E402
from release_fixtures import MemoryTargetStore, write_bundle_dir  # noqa: E402

pytest_plugins = ("console_fixtures",)

API = "/api/v1"
TARGET = "firmware/edge-camera/1.3.0.fwb"


def bearer(svc: ConsoleServices, role: str) -> dict[str, str]:
    _, secret = svc.accounts.create_token(f"t-{role}", role, created_by="test", now=svc.now())
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture
def release(svc: ConsoleServices, tmp_path: Path) -> ReleaseRecord:
    return add_release(svc.repo, MemoryTargetStore(), write_bundle_dir(tmp_path / "bundle"),
                       device_class="edge-camera", version="1.3.0", now=svc.now(), actor="test")


def _audit(svc: ConsoleServices) -> tuple[str, str, str]:
    entry = svc.audit.entries(limit=1)[0]
    return entry.actor, entry.action, entry.target


def test_rollout_api(client: FlaskClient, svc: ConsoleServices, release: ReleaseRecord,
                     users: dict[str, int]) -> None:
    for i in range(4):
        SoftDevice(f"cam-{i}", svc.repo, now=svc.now())
    deploy, viewer = bearer(svc, "production_system"), bearer(svc, "data_scientist")
    tagged = client.post(f"{API}/devices/cam-1/tags", headers=deploy, json={"add": ["lab", "north"]})
    assert tagged.status_code == 200 and tagged.get_json() == {"device_id": "cam-1", "tags": ["lab", "north"]}
    assert _audit(svc) == ("token:t-production_system", "device.tag", "device:cam-1")
    assert client.post(f"{API}/devices/cam-1/tags", headers=deploy,
                       json={"remove": ["north"]}).get_json()["tags"] == ["lab"]
    assert client.post(f"{API}/devices/cam-404/tags", headers=deploy, json={"add": ["x"]}).status_code == 404

    body = {"release": TARGET, "id": "r1", "plan": {"canary": 1, "phases": [50, 100], "approval": True}}
    for headers in (viewer, bearer(svc, "security")):  # no fleet:deploy
        assert client.post(f"{API}/rollouts", headers=headers, json=body).status_code == 403
    for bad in ({**body, "plan": {"canary": "x"}}, {**body, "plan": {"phases": [50, 10]}},
                {**body, "extra": 1}, {**body, "group": {"color": "red"}}, {**body, "id": "Bad Id"}):
        assert client.post(f"{API}/rollouts", headers=deploy, json=bad).status_code == 400, bad
    assert client.post(f"{API}/rollouts", headers=deploy,
                       json={**body, "release": "firmware/edge-camera/9.9.9.fwb"}).status_code == 404
    assert client.post(f"{API}/rollouts", headers=deploy,
                       json={**body, "group": {"devices": ["cam-404"]}}).status_code == 409

    planned = client.post(f"{API}/rollouts/dry-run", headers=deploy, json=body)
    assert planned.status_code == 200
    phases = planned.get_json()["phases"]
    assert [len(p) for p in phases] == [1, 1, 2] and planned.get_json()["rollout_id"] == "r1"
    assert client.get(f"{API}/rollouts", headers=viewer).get_json() == {"items": []}

    created = client.post(f"{API}/rollouts", headers=deploy, json=body)
    assert created.status_code == 201, created.data
    doc = created.get_json()
    assert (doc["id"], doc["state"], doc["release"]) == ("r1", "running", TARGET)
    assert [[m["device_id"] for m in doc["members"] if m["phase"] == p] for p in range(3)] == phases
    assert _audit(svc) == ("token:t-production_system", "rollout.create", "rollout:r1")
    assert client.post(f"{API}/rollouts", headers=deploy, json=body).status_code == 409  # exists

    [item] = client.get(f"{API}/rollouts", headers=viewer).get_json()["items"]
    assert item["id"] == "r1" and [p["devices"] for p in item["phases"]] == [1, 1, 2]
    assert client.get(f"{API}/rollouts?state=paused", headers=viewer).get_json() == {"items": []}
    assert client.get(f"{API}/rollouts/nope", headers=viewer).status_code == 404

    # The workers' step assigns the canary.
    step = rollouts.step_rollout(svc.repo, "r1", signer=svc.signer(), now=svc.now())
    assert step is not None and step.assigned == tuple(phases[0])
    shown = client.get(f"{API}/rollouts/r1", headers=viewer).get_json()
    assert shown["phases"][0] == {"devices": 1, "succeeded": 0, "failed": 0, "pending": 0, "assigned": 1,
                                  "approved": False}

    for action, state in (("pause", "paused"), ("resume", "running")):
        done = client.post(f"{API}/rollouts/r1/{action}", headers=deploy)
        assert done.status_code == 200 and done.get_json()["state"] == state
        assert _audit(svc) == ("token:t-production_system", f"rollout.{action}", "rollout:r1")
    assert client.post(f"{API}/rollouts/r1/resume", headers=deploy).status_code == 409
    approved = client.post(f"{API}/rollouts/r1/approve", headers=deploy, json={"phase": 1})
    assert approved.status_code == 200 and approved.get_json()["phases"][1]["approved"] is True
    assert client.post(f"{API}/rollouts/r1/approve", headers=deploy, json={"phase": 1}).status_code == 409
    assert client.post(f"{API}/rollouts/r1/abort", headers=viewer).status_code == 403
    aborted = client.post(f"{API}/rollouts/r1/abort", headers=deploy)
    assert aborted.status_code == 200 and aborted.get_json()["state"] == "aborted"
    assert aborted.get_json()["reason"] == "aborted by token:t-production_system"
    assert _audit(svc) == ("token:t-production_system", "rollout.abort", "rollout:r1")
    assert client.post(f"{API}/rollouts/r1/cancel", headers=deploy).status_code == 409
    assert [a.kind for a in svc.repo.models.alerts(kind="rollout_aborted")] == ["rollout_aborted"]


def test_model_rollouts_need_model_deploy(client: FlaskClient, svc: ConsoleServices,
                                          users: dict[str, int]) -> None:
    for i in range(2):
        SoftDevice(f"cam-{i}", svc.repo, now=svc.now())
    publish_test_model(svc, version="1.0.0")
    publish_test_model(svc, version="1.1.0", seed=1, deploy=False)
    model_admin.entitle(svc.repo, MODEL, device_class=CLASS, now=svc.now())
    body = {"model": {"name": MODEL, "version": "1.1.0"}, "id": "m1", "group": {"class": CLASS},
            "plan": {"canary": 1}}
    # A Data Scientist may publish (model:write) but not deploy: no model rollout either.
    assert has_right("data_scientist", Right.MODEL_WRITE)
    assert not has_right("data_scientist", Right.MODEL_DEPLOY)
    scientist, engineer = bearer(svc, "data_scientist"), bearer(svc, "ml_engineer")
    assert client.post(f"{API}/rollouts", headers=scientist, json=body).status_code == 403
    assert client.post(f"{API}/rollouts/dry-run", headers=scientist, json=body).status_code == 403
    for bad in ({**body, "release": TARGET}, {**body, "group": {}}, {**body, "model": {"name": MODEL}},
                {**body, "model": {"name": MODEL, "version": "latest"}}):
        assert client.post(f"{API}/rollouts", headers=engineer, json=bad).status_code == 400, bad
    assert client.post(f"{API}/rollouts", headers=engineer,
                       json={**body, "model": {"name": MODEL, "version": "9.9.9"}}).status_code == 404
    assert client.post(f"{API}/rollouts", headers=engineer,
                       json={**body, "model": {"name": MODEL, "version": "1.0.0"}}).status_code == 409
    planned = client.post(f"{API}/rollouts/dry-run", headers=engineer, json=body)
    assert planned.status_code == 200 and [len(p) for p in planned.get_json()["phases"]] == [1, 1]

    created = client.post(f"{API}/rollouts", headers=engineer, json=body)
    assert created.status_code == 201, created.data
    doc = created.get_json()
    assert (doc["kind"], doc["model"], doc["release"]) == ("model", {"name": MODEL, "version": "1.1.0"}, None)
    assert _audit(svc) == ("token:t-ml_engineer", "rollout.create", "rollout:m1")
    assert client.post(f"{API}/rollouts/m1/pause", headers=scientist).status_code == 403
    assert client.post(f"{API}/rollouts/m1/pause", headers=engineer).get_json()["state"] == "paused"
    cancelled = client.post(f"{API}/rollouts/m1/cancel", headers=engineer)
    assert cancelled.status_code == 200 and cancelled.get_json()["state"] == "cancelled"
    assert _audit(svc) == ("token:t-ml_engineer", "rollout.cancel", "rollout:m1")
    # Cancelled: the version was not deployed.
    assert [v.version for v in svc.repo.models.versions(MODEL) if v.deployed] == ["1.0.0"]
