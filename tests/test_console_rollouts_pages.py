"""Rollouts in the console: the list (state, release, group, a bar per phase), a rollout's page (phases,
the devices by state over time, failures with reasons), its buttons (pause / resume / approve / cancel /
abort: shown per state and right, audited, CSRF-protected), the wizard (dry run, then start) and the
device tags on a device's page."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from flask.testing import FlaskClient

from fleet_server.console.rollouts import member_state_at, state_series
from fleet_server.console.services import ConsoleServices
from fleet_server.rollouts.plan import Group, parse_plan
from fleet_server.service import rollouts
from fleet_server.service.releases import add_release
from fleet_server.storage.release_repo import ReleaseRecord
from fleet_server.storage.rollout_repo import MemberRecord

pytest.register_assert_rewrite("console_fixtures", "release_fixtures")
from console_fixtures import SoftDevice, login  # noqa: E402
from release_fixtures import MemoryTargetStore, write_bundle_dir  # noqa: E402

pytest_plugins = ("console_fixtures",)

TARGET = "firmware/edge-camera/1.3.0.fwb"


@pytest.fixture
def release(svc: ConsoleServices, tmp_path: Path) -> ReleaseRecord:
    return add_release(svc.repo, MemoryTargetStore(), write_bundle_dir(tmp_path / "bundle"),
                       device_class="edge-camera", version="1.3.0", now=svc.now(), actor="test")


@pytest.fixture
def devices(svc: ConsoleServices) -> list[str]:
    ids = [f"cam-{i}" for i in range(4)]
    for i in ids:
        SoftDevice(i, svc.repo, now=svc.now())
    return ids


def _create(svc: ConsoleServices, rollout_id: str = "r1", **plan: object) -> None:
    rollouts.create_rollout(svc.repo, target=TARGET, group=Group("edge-camera"),
                            plan=parse_plan({"canary": 1, "phases": [50, 100], **plan}), now=svc.now(),
                            actor="test", rollout_id=rollout_id)


def _last_audit(svc: ConsoleServices) -> tuple[str, str, str]:
    e = svc.audit.entries(limit=1)[0]
    return e.actor, e.action, e.target


def _no_inline_code(html: str) -> None:
    """What the CSP forbids (the same checks as test_console_security.py, on pages it cannot reach)."""
    assert "<script>" not in html and " style=" not in html and "<style" not in html
    assert re.search(r"<[^>]*\son[a-z]+\s*=", html) is None and "javascript:" not in html


def _buttons(html: str) -> list[str]:
    return re.findall(r'action="/rollouts/r1/(\w+)"', html)


def test_pages_render_and_buttons_follow_state_and_right(
        client: FlaskClient, svc: ConsoleServices, release: ReleaseRecord, devices: list[str],
        users: dict[str, int]) -> None:
    _create(svc, approval=True)
    login(client, "admin")
    listing = client.get("/rollouts/")
    assert listing.status_code == 200
    html = listing.data.decode()
    assert 'href="/rollouts/r1"' in html and TARGET in html and "running" in html
    assert html.count('class="progress"') == 3  # canary, phase 1, phase 2
    assert 'href="/rollouts/new"' in html and 'href="/rollouts/"' in html  # the wizard, the nav entry

    page = client.get("/rollouts/r1").data.decode()
    assert _buttons(page) == ["pause", "approve", "cancel", "abort"]
    assert "<code>abort_failure_percent</code>" in page and 'id="rollout-chart"' in page
    _no_inline_code(html)
    _no_inline_code(page)

    # A viewer sees the rollout but no buttons and no wizard; the buttons' routes refuse it.
    viewer = client.application.test_client()
    csrf = login(viewer, "data_scientist")
    assert viewer.get("/rollouts/").status_code == 200
    seen = viewer.get("/rollouts/r1").data.decode()
    assert _buttons(seen) == [] and 'href="/rollouts/new"' not in viewer.get("/rollouts/").data.decode()
    assert viewer.get("/rollouts/new").status_code == 403
    assert viewer.post("/rollouts/r1/pause", data={"csrf_token": csrf}).status_code == 403
    assert svc.repo.rollouts.rollout("r1").state == "running"  # type: ignore[union-attr]
    assert client.get("/rollouts/nope").status_code == 404
    assert client.get("/rollouts/Bad%20Id").status_code == 404


def test_buttons_change_the_state_are_audited_and_need_csrf(
        client: FlaskClient, svc: ConsoleServices, release: ReleaseRecord, devices: list[str],
        users: dict[str, int]) -> None:
    _create(svc, approval=True)
    csrf = login(client, "production_system")
    head = svc.audit.head()
    assert client.post("/rollouts/r1/pause").status_code == 400  # no CSRF token
    assert client.post("/rollouts/r1/pause", data={"csrf_token": "0" * 64}).status_code == 400
    assert svc.audit.head() == head and svc.repo.rollouts.rollout("r1").state == "running"  # type: ignore[union-attr]

    def act(action: str) -> str:
        response = client.post(f"/rollouts/r1/{action}", data={"csrf_token": csrf})
        assert response.status_code == 303, response.data[:400]
        assert response.headers["Location"] == f"/rollouts/r1?done={action}"
        assert _last_audit(svc) == ("production_system", f"rollout.{action}", "rollout:r1")
        return client.get(response.headers["Location"]).data.decode()

    page = act("pause")
    assert "Rollout paused" in page and _buttons(page) == ["resume", "approve", "cancel", "abort"]
    page = act("resume")
    assert _buttons(page) == ["pause", "approve", "cancel", "abort"]
    page = act("approve")
    assert svc.repo.rollouts.members("r1") and "approved by production_system" in page
    assert json.loads(svc.audit.entries(limit=1)[0].details)["phase"] == 1
    # A refused move says why (409) and changes nothing.
    refused = client.post("/rollouts/r1/resume", data={"csrf_token": csrf})
    assert refused.status_code == 409 and b"is running; running applies to paused or draft" in refused.data
    page = act("abort")
    assert _buttons(page) == [] and "aborted by production_system" in page
    assert svc.repo.rollouts.rollout("r1").state == "aborted"  # type: ignore[union-attr]
    assert [a.kind for a in svc.repo.models.alerts(kind="rollout_aborted")] == ["rollout_aborted"]
    assert client.post("/rollouts/r1/cancel", data={"csrf_token": csrf}).status_code == 409

    _create(svc, "r2")
    done = client.post("/rollouts/r2/cancel", data={"csrf_token": csrf})
    assert done.status_code == 303 and svc.repo.rollouts.rollout("r2").state == "cancelled"  # type: ignore[union-attr]
    assert _last_audit(svc) == ("production_system", "rollout.cancel", "rollout:r2")


def test_wizard_dry_run_then_start(client: FlaskClient, svc: ConsoleServices, release: ReleaseRecord,
                                   devices: list[str], users: dict[str, int]) -> None:
    csrf = login(client, "admin")
    rollouts.tag_device(svc.repo, "cam-0", ["lab"])
    page = client.get("/rollouts/new").data.decode()
    assert f'<option value="{TARGET}"' in page and 'name="abort_failure_percent"' in page
    form = {"csrf_token": csrf, "release": TARGET, "id": "w1", "canary": "1", "phases": "50, 100",
            "abort_failure_percent": "25", "device_timeout_s": "600", "approval": "1"}

    refusals = (({"canary": "x"}, 400, b"canary"), ({"min_executed": "1.5"}, 400, b"min_executed"),
                ({"id": "Bad Id"}, 400, b"rollout id"), ({"release": ""}, 400, b"choose a release"),
                ({"devices": "cam-404"}, 409, b"cam-404"), ({"tags": "bad tag!"}, 400, b"tags"),
                ({"id": "new"}, 409, b"is reserved"))
    for bad, status, message in refusals:
        response = client.post("/rollouts/new", data={**form, **bad})
        assert response.status_code == status and message in response.data, (bad, response.data[-800:])

    planned = client.post("/rollouts/new", data=form)
    assert planned.status_code == 200
    html = planned.data.decode()
    assert re.findall(r'<td class="count">(\d+)</td>', html) == ["1", "1", "2"]
    _no_inline_code(html)
    assert svc.repo.rollouts.rollouts() == []  # a dry run stores nothing
    start = html.split('id="start"')[1].split("</form>")[0]
    hidden = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', start))
    assert hidden["id"] == "w1" and hidden["abort_failure_percent"] == "25" and hidden["approval"] == "1"
    hidden["csrf_token"] = csrf

    head = svc.audit.head()
    without_csrf = {k: v for k, v in hidden.items() if k != "csrf_token"}
    assert client.post("/rollouts/", data=without_csrf).status_code == 400
    assert svc.audit.head() == head
    created = client.post("/rollouts/", data=hidden)
    assert created.status_code == 303 and created.headers["Location"] == "/rollouts/w1?done=create"
    v = rollouts.view(svc.repo, "w1", now=svc.now())
    assert v.rollout.state == "running" and v.plan.abort_failure_percent == 25 and v.plan.approval
    assert v.plan.device_timeout_s == 600 and [p.devices for p in v.phases] == [1, 1, 2]
    entry = svc.audit.entries(limit=1)[0]
    assert (entry.actor, entry.action, entry.target) == ("admin", "rollout.create", "rollout:w1")
    assert json.loads(entry.details)["devices"] == 4
    assert client.post("/rollouts/", data=hidden).status_code == 409  # exists already

    # A draft limited to a tag: created, not running, started by its Start button.
    draft = client.post("/rollouts/", data={"csrf_token": csrf, "release": TARGET, "id": "w2", "tags": "lab",
                                            "draft": "1"})
    assert draft.status_code == 409 and b"is in rollout w1 still" in draft.data
    client.post("/rollouts/w1/cancel", data={"csrf_token": csrf})
    draft = client.post("/rollouts/", data={"csrf_token": csrf, "release": TARGET, "id": "w2", "tags": "lab",
                                            "draft": "1"})
    assert draft.status_code == 303
    assert [m.device_id for m in svc.repo.rollouts.members("w2")] == ["cam-0"]
    assert "Start</button>" in client.get("/rollouts/w2").data.decode()


def _member(device: str, state: str, assigned: int | None, finished: int | None, joined: int = 0
            ) -> MemberRecord:
    return MemberRecord("r", device, 0, "k", state, 1 if assigned else 0, None, "", joined, assigned,
                        finished)


def test_state_series_counts_members_per_state_over_time() -> None:
    members = [_member("a", "succeeded", 100, 300), _member("b", "timed_out", 100, 500),
               _member("c", "assigned", 400, None), _member("d", "pending", None, None),
               _member("e", "pending", 200, 450, joined=0),  # retried after a time-out: pending again
               _member("f", "succeeded", 600, 700, joined=550)]  # joined later
    assert member_state_at(members[5], 500) is None
    points = state_series(members, 0, 1000, points=5)
    assert [p.at for p in points] == [0, 250, 500, 750, 1000]
    assert [p.counts for p in points] == [
        {"succeeded": 0, "failed": 0, "assigned": 0, "pending": 5},
        {"succeeded": 0, "failed": 0, "assigned": 2, "pending": 3},
        {"succeeded": 1, "failed": 1, "assigned": 1, "pending": 2},
        {"succeeded": 2, "failed": 1, "assigned": 1, "pending": 2},
        {"succeeded": 2, "failed": 1, "assigned": 1, "pending": 2},
    ]
    assert [p.at for p in state_series(members, 50, 50)] == [50]


def test_chart_and_failures_of_a_seeded_rollout(client: FlaskClient, svc: ConsoleServices,
                                                release: ReleaseRecord, devices: list[str],
                                                users: dict[str, int]) -> None:
    t0 = svc.now()
    _create(svc)
    members = svc.repo.rollouts.members("r1")
    ok, bad, flying = members[0].device_id, members[1].device_id, members[2].device_id
    with svc.repo.write("seeding a rollout's progress") as tx:
        tx.rollouts.set_member("r1", ok, {"state": "succeeded", "assigned_at": t0 + 1_000,
                                          "finished_at": t0 + 2_000})
        tx.rollouts.set_member("r1", bad, {"state": "untrusted_after_update", "assigned_at": t0 + 1_000,
                                           "finished_at": t0 + 3_000,
                                           "reason": "PCR 4 differs from the release's reference values"})
        tx.rollouts.set_member("r1", flying, {"state": "assigned", "assigned_at": t0 + 2_500})
        tx.rollouts.set_rollout("r1", {"state": "aborted", "finished_at": t0 + 4_000, "reason": "too many"})
    login(client, "security")
    page = client.get("/rollouts/r1").data.decode()
    chart = page.split('id="rollout-chart"')[1].split("</svg>")[0]
    columns = chart.split('<g class="axis">')[0]
    rects = re.findall(r'data-series="(\w+)" data-count="(\d+)"', columns)
    # The first column (at the start) has every device pending, the last (at the abort) the end state.
    assert rects[0] == ("pending", "4")
    assert rects[-4:] == [("succeeded", "1"), ("failed", "1"), ("assigned", "1"), ("pending", "1")]
    failures = page.split('id="failures"')[1].split("</table>")[0]
    assert bad in failures and "PCR 4 differs" in failures and ok not in failures
    assert _buttons(page) == []  # aborted: nothing to press (and Security may not deploy anyway)


def test_device_tags_on_the_device_page(client: FlaskClient, svc: ConsoleServices, devices: list[str],
                                        users: dict[str, int]) -> None:
    csrf = login(client, "ml_engineer")
    page = client.get("/devices/cam-1").data.decode()
    assert 'id="tags"' in page and "no tags" in page and 'action="/devices/cam-1/tags"' in page
    assert client.post("/devices/cam-1/tags", data={"add": "lab"}).status_code == 400  # no CSRF token
    done = client.post("/devices/cam-1/tags", data={"csrf_token": csrf, "add": "lab, north"})
    assert done.status_code == 303 and done.headers["Location"] == "/devices/cam-1?done=tags"
    assert svc.repo.rollouts.tags("cam-1") == ["lab", "north"]
    entry = svc.audit.entries(limit=1)[0]
    assert (entry.actor, entry.action, entry.target) == ("ml_engineer", "device.tag", "device:cam-1")
    assert json.loads(entry.details) == {"added": ["lab", "north"], "removed": []}
    assert "<li>lab</li><li>north</li>" in client.get("/devices/cam-1").data.decode()
    client.post("/devices/cam-1/tags", data={"csrf_token": csrf, "remove": "north"})
    assert svc.repo.rollouts.tags("cam-1") == ["lab"]
    bad = client.post("/devices/cam-1/tags", data={"csrf_token": csrf, "add": "no/slash"})
    assert bad.status_code == 400 and b"tag &#39;no/slash&#39;" in bad.data
    assert client.post("/devices/cam-1/tags", data={"csrf_token": csrf}).status_code == 400
    assert client.post("/devices/cam-404/tags", data={"csrf_token": csrf, "add": "x"}).status_code == 404

    # Security may view the device (and its tags) but not change them.
    other = client.application.test_client()
    other_csrf = login(other, "security")
    seen = other.get("/devices/cam-1").data.decode()
    assert "<li>lab</li>" in seen and 'action="/devices/cam-1/tags"' not in seen
    assert other.post("/devices/cam-1/tags", data={"csrf_token": other_csrf, "add": "x"}).status_code == 403
