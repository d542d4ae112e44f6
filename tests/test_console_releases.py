"""Releases in the console and the API: list and show (fleet:view), assign (fleet:deploy: Admin, ML
Engineer, Production System), a device's release and update progress on its page and in its JSON."""

from __future__ import annotations

from pathlib import Path

import pytest
from flask.testing import FlaskClient

from fleet_server.console.services import ConsoleServices
from fleet_server.service import admin
from fleet_server.service.processor import Processor
from fleet_server.service.releases import add_release
from fleet_server.storage.release_repo import ReleaseRecord
from protocol import topics
from protocol.messages import UpdateAssignment, UpdateStatus, decode_signed, encode_plain
from protocol.mqtt import InboundMessage

pytest.register_assert_rewrite("console_fixtures", "release_fixtures")
from console_fixtures import SoftDevice, login  # noqa: E402
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


def test_release_api_list_show_assign_and_device_progress(
        client: FlaskClient, svc: ConsoleServices, console_processor: Processor,
        stored_golden_policy: admin.StoredPolicy, release: ReleaseRecord, users: dict[str, int]) -> None:
    device = SoftDevice("cam-1", svc.repo, now=svc.now())
    viewer = bearer(svc, "data_scientist")
    listed = client.get(f"{API}/releases", headers=viewer)
    assert listed.status_code == 200
    [item] = listed.get_json()["items"]
    assert (item["id"], item["target"], item["state"]) == (release.id, TARGET, "active")
    shown = client.get(f"{API}/releases/{release.id}", headers=viewer).get_json()
    assert shown["target"] == TARGET and shown["assignments"] == []
    assert client.get(f"{API}/releases/999999", headers=viewer).status_code == 404

    body = {"devices": ["cam-1"], "deadline_s": 600}
    for headers in (bearer(svc, "security"), viewer):  # no fleet:deploy
        refused = client.post(f"{API}/releases/{release.id}/assign", headers=headers, json=body)
        assert refused.status_code == 403
    deploy = bearer(svc, "production_system")
    for bad in ({"devices": []}, {"devices": ["Bad Id"]}, {"devices": ["cam-1"], "deadline_s": -1},
                {"devices": ["cam-1"], "extra": 1}):
        assert client.post(f"{API}/releases/{release.id}/assign", headers=deploy, json=bad).status_code == 400
    assert client.post(f"{API}/releases/{release.id}/assign", headers=deploy,
                       json={"devices": ["cam-404"]}).status_code == 409
    assigned = client.post(f"{API}/releases/{release.id}/assign", headers=deploy, json=body)
    assert assigned.status_code == 200, assigned.data
    [a] = assigned.get_json()["assignments"]
    assert a["device_id"] == "cam-1" and assigned.get_json()["target"] == TARGET
    entry = svc.audit.entries(limit=1)[0]
    assert (entry.actor, entry.action, entry.target) == ("token:t-production_system", "release.assign",
                                                         f"release:{TARGET}")
    [row] = [r for r in svc.repo.outbox() if r.topic == topics.device_down("cam-1", "update")]
    signer = svc.signer()
    message = decode_signed(row.payload, keys={signer.kid: signer.public_key}, aud="cam-1").message
    assert isinstance(message, UpdateAssignment) and message.assignment_id == a["assignment_id"]
    assert client.post(f"{API}/releases/{release.id}/assign", headers=deploy, json=body).status_code == 409

    # The device reports progress and then attests on the release.
    status = UpdateStatus(assignment_id=a["assignment_id"], target=TARGET, state="rebooting",
                          from_version="1.2.0", to_version="1.3.0")
    console_processor.handle_batch([InboundMessage(topic=topics.device_up("cam-1", "update-status"),
                                                   payload=encode_plain(status, ts=svc.now()), qos=1)])
    device.attest(console_processor, svc.repo, "updated-firmware")
    got = client.get(f"{API}/devices/cam-1", headers=viewer).get_json()
    assert got["release"] == TARGET and got["firmware_version"] == "1.3.0" and got["state"] == "trusted"
    assert got["update"]["state"] == "rebooting" and got["update"]["assignment_id"] == a["assignment_id"]

    login(client, "data_scientist")
    page = client.get("/devices/cam-1")
    assert page.status_code == 200
    text = page.get_data(as_text=True)
    assert 'id="update"' in text and "rebooting" in text and TARGET in text
    releases_page = client.get("/releases/").get_data(as_text=True)
    assert TARGET in releases_page
    detail = client.get(f"/releases/{release.id}").get_data(as_text=True)
    assert "cam-1" in detail and "rebooting" in detail
    assert client.get("/releases/999999").status_code == 404
