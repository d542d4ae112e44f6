"""Console pages: dashboard (numbers, the incremental hourly series, the polling endpoint and its script),
policies (a policy made from a device's held event log makes that device trusted), alerts (acknowledge and
resolve, audited), users and API tokens (admin), models (the model-protection tables when present)."""

from __future__ import annotations

import hashlib
import re
import types
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import Table, insert, select

from fleet_server.console.queries import HOUR_MS, AttestationSeries, ConsoleQueries, ModelTables
from fleet_server.console.services import ConsoleServices
from fleet_server.service import admin
from fleet_server.service.common import ManualClock
from fleet_server.service.processor import Processor
from fleet_server.storage import alerting, model_tables, models
from fleet_server.storage.repo import NewAttestation

pytest.register_assert_rewrite("console_fixtures")
from console_fixtures import SoftDevice, csrf_of, golden_policy, login  # noqa: E402

pytest_plugins = ("console_fixtures",)

ATTESTATION = models.SQLModel.metadata.tables["attestation"]


def _attestations(svc: ConsoleServices, rows: list[tuple[int, str]]) -> None:
    with svc.repo.write("seeding attestations") as tx:
        tx.insert_attestations([NewAttestation(
            device_id="d", challenge_id=f"c{i}", issued_at=at - 5, received_at=at - 1, stored_at=at,
            verdict=verdict, reasons=(), evidence_sha256=b"x" * 32, policy_id=None, reset_count=None,
            restart_count=None, clock=None) for i, (at, verdict) in enumerate(rows)])


def _recount(svc: ConsoleServices, now: int) -> dict[int, tuple[int, int]]:
    first = (now // HOUR_MS - 23) * HOUR_MS
    out: dict[int, list[int]] = {}
    with svc.engine.connect() as conn:
        for stored_at, verdict in conn.execute(select(ATTESTATION.c.stored_at, ATTESTATION.c.verdict)):
            if first <= stored_at <= now:
                bucket = out.setdefault(stored_at // HOUR_MS * HOUR_MS, [0, 0])
                bucket[0] += 1
                bucket[1] += verdict != "trusted"
    return {h: (v[0], v[1]) for h, v in out.items()}


# --------------------------------------------------------------------------------------------------
# dashboard
# --------------------------------------------------------------------------------------------------
def test_incremental_series_equals_a_recount(svc: ConsoleServices, console_clock: ManualClock) -> None:
    import random

    rng = random.Random(7)
    series = AttestationSeries(settle_ms=30_000, budget_ms=float("inf"))  # history in one call
    now = console_clock.now_ms()
    _attestations(svc, [(now - rng.randint(0, 30 * HOUR_MS), rng.choice(["trusted", "untrusted"]))
                        for _ in range(400)])
    for _ in range(12):
        # New rows arrive (some in the unsettled tail), time moves on (sometimes into a new hour).
        console_clock.advance(rng.randint(1_000, 40 * 60_000))
        now = console_clock.now_ms()
        _attestations(svc, [(now - rng.randint(0, 25_000), rng.choice(["trusted", "untrusted", "trusted"]))
                            for _ in range(rng.randint(0, 30))])
        with svc.engine.connect() as conn:
            points = series.points(conn, now)
        assert len(points) == 24 and points[-1].hour == now // HOUR_MS * HOUR_MS
        got = {p.hour: (p.total, p.failed) for p in points if p.total}
        assert got == _recount(svc, now)


def test_history_is_counted_in_bounded_steps(svc: ConsoleServices, console_clock: ManualClock) -> None:
    now = console_clock.now_ms()
    _attestations(svc, [(now - i * 7 * 60_000, "untrusted" if i % 5 == 0 else "trusted") for i in range(200)])
    series = AttestationSeries(budget_ms=0.0, min_span_ms=HOUR_MS)  # one hour of history per call
    calls = 0
    while True:
        calls += 1
        with svc.engine.connect() as conn:
            points = series.points(conn, now)
        if not any(p.partial for p in points):
            break
        # Hours already counted are exact; the partial ones never over-count.
        exact = _recount(svc, now)
        for p in points:
            total, failed = exact.get(p.hour, (0, 0))
            assert (p.total, p.failed) == (total, failed) if not p.partial else p.total <= total
        assert calls <= 25
    assert calls > 3  # it took several calls: no single request counted the whole day
    assert {p.hour: (p.total, p.failed) for p in points if p.total} == _recount(svc, now)


def test_dashboard_page_and_data(client: FlaskClient, users: dict[str, int], svc: ConsoleServices,
                                 console_processor: Processor, stored_golden_policy: admin.StoredPolicy,
                                 console_clock: ManualClock) -> None:
    for i in range(3):
        SoftDevice(f"cam-{i}", svc.repo, now=svc.now()).attest(console_processor, svc.repo,
                                                               "golden" if i else "tampered-initrd")
    SoftDevice("cam-lost", svc.repo, now=svc.now())
    admin.revoke_device(svc.repo, "cam-lost", signer=console_processor.ctx.signer, now=svc.now(),
                        reason="stolen")
    login(client, "production_system")
    data = client.get("/dashboard/data").get_json()
    states = data["states"]
    assert (states["trusted"], states["untrusted"], states["revoked"]) == (2, 1, 1)
    assert data["total_devices"] == 4
    assert (data["attestations_24h"], data["failures_24h"]) == (3, 1)
    assert data["series"][-1]["total"] == 3 and len(data["series"]) == 24
    assert data["alerts"]["active"] == 1 and data["alerts"]["critical"] == 1
    assert data["alerts"]["items"][0]["device_id"] == "cam-0"
    assert data["revocations"] == [{"device_id": "cam-lost", "at": svc.now(), "reason": "stolen"}]
    page = client.get("/").data.decode()
    assert 'src="/static/dashboard.js"' in page and 'data-url="/dashboard/data"' in page
    assert len(re.findall(r'<rect class="bar-total"', page)) == 24
    assert re.search(r'data-field="states.trusted">2<', page) and "cam-lost" in page
    script = client.get("/static/dashboard.js")
    assert script.status_code == 200 and "javascript" in script.headers["Content-Type"]
    assert b"fetch(url" in script.data


# --------------------------------------------------------------------------------------------------
# policies
# --------------------------------------------------------------------------------------------------
def test_policy_from_a_devices_event_log(client: FlaskClient, users: dict[str, int], svc: ConsoleServices,
                                         console_processor: Processor) -> None:
    dev = SoftDevice("cam-ref", svc.repo, now=svc.now())
    dev.attest(console_processor, svc.repo, "golden")
    assert svc.repo.device("cam-ref").state == "untrusted"  # type: ignore[union-attr]  # no policy yet
    csrf = login(client, "security")
    form = client.get("/policies/new?device=cam-ref")
    assert form.status_code == 200 and b"not trusted right now" in form.data
    response = client.post("/policies/new", data={"csrf_token": csrf, "device": "cam-ref",
                                                   "name": "cam-golden", "device_class": "edge-camera",
                                                   "firmware_version": "1.2.0", "pcrs": ""})
    assert response.status_code == 303
    [header] = svc.repo.policies()
    assert (header.name, header.active, header.created_by) == ("cam-golden", True, "security")
    assert response.headers["Location"] == f"/policies/{header.id}?done=created"
    expected = hashlib.sha256(golden_policy("cam-golden").canonical_bytes()).hexdigest()
    assert header.reference_sha256 == expected
    entry = svc.audit.entries(limit=1)[0]
    assert (entry.actor, entry.action, entry.target) == ("security", "policy.create", "policy:cam-golden")
    # The policy appraises the next evidence: the device is trusted now.
    console_processor.policies.refresh()
    dev.attest(console_processor, svc.repo, "golden")
    assert svc.repo.device("cam-ref").state == "trusted"  # type: ignore[union-attr]
    detail = client.get(f"/policies/{header.id}").data
    assert b"Reference events" in detail and b"vmlinuz" in detail
    listing = client.get("/policies/").data
    assert b"cam-golden" in listing


@pytest.mark.parametrize(("form", "message"), [
    ({"device": "nope", "name": "p"}, b"no device"),
    ({"device": "cam-x", "name": "bad name!"}, b"name: letters"),
    ({"device": "cam-x", "name": "p", "pcrs": "0,99"}, b"PCRs"),
    ({"device": "cam-x", "name": "p"}, b"holds no event log"),
])
def test_policy_form_errors(client: FlaskClient, users: dict[str, int], svc: ConsoleServices,
                            form: dict[str, str], message: bytes) -> None:
    SoftDevice("cam-x", svc.repo, now=svc.now())
    csrf = login(client, "admin")
    data = {"csrf_token": csrf, "device_class": "edge-camera", "firmware_version": "1.2.0", "pcrs": "",
            **form}
    response = client.post("/policies/new", data=data)
    assert response.status_code == 400 and message in response.data
    assert svc.repo.policies() == []


# --------------------------------------------------------------------------------------------------
# alerts
# --------------------------------------------------------------------------------------------------
def test_acknowledge_and_resolve(client: FlaskClient, users: dict[str, int], svc: ConsoleServices) -> None:
    with svc.repo.write("alerts") as tx:
        alerting.raise_alerts(tx.conn, [alerting.NewAlert("unreachable", "warning", "cam-1 is unreachable",
                                                          "unreachable:cam-1", "cam-1")], svc.now())
    [alert], _ = svc.queries.alerts()
    viewer = client.application.test_client()
    login(viewer, "data_scientist")
    assert b"cam-1 is unreachable" in viewer.get("/alerts/").data
    assert b"Acknowledge" not in viewer.get("/alerts/").data
    csrf = login(client, "security")
    assert client.post(f"/alerts/{alert.id}/acknowledge", data={"csrf_token": csrf}).status_code == 303
    after = svc.queries.alert(alert.id)
    assert after is not None and (after.status, after.acknowledged_by) == ("acknowledged", "security")
    again = client.post(f"/alerts/{alert.id}/acknowledge", data={"csrf_token": csrf})
    assert again.status_code == 303 and "error=state" in again.headers["Location"]
    assert b"already acknowledged or resolved" in client.get(again.headers["Location"]).data
    assert client.post(f"/alerts/{alert.id}/resolve", data={"csrf_token": csrf}).status_code == 303
    assert svc.queries.alert(alert.id).status == "resolved"  # type: ignore[union-attr]
    assert client.post("/alerts/4242/resolve", data={"csrf_token": csrf}).status_code == 404
    audited = [(e.actor, e.action, e.target, e.details_dict().get("from"))
               for e in reversed(svc.audit.entries(limit=20)) if e.action.startswith("alert.")]
    assert audited == [("security", "alert.acknowledge", f"alert:{alert.id}", "open"),
                       ("security", "alert.resolve", f"alert:{alert.id}", "acknowledged")]
    resolved = client.get("/alerts/?status=resolved").data
    assert b"cam-1 is unreachable" in resolved and b"resolved security" in resolved


# --------------------------------------------------------------------------------------------------
# users and tokens
# --------------------------------------------------------------------------------------------------
def test_users_page(client: FlaskClient, users: dict[str, int], svc: ConsoleServices) -> None:
    csrf = login(client, "admin")
    page = client.post("/users/new", data={"csrf_token": csrf, "name": "dana", "role": "ml_engineer"})
    assert page.status_code == 200 and page.headers["Cache-Control"] == "no-store"
    password = re.search(rb'<code class="secret-value">([^<]+)</code>', page.data)
    assert password is not None
    newcomer = client.application.test_client()
    login(newcomer, "dana", password.group(1).decode())
    dana = svc.accounts.user(name="dana")
    assert dana is not None and dana.role == "ml_engineer"
    role = client.post(f"/users/{dana.id}/role", data={"csrf_token": csrf, "role": "security"})
    assert role.status_code == 303
    assert newcomer.get("/audit/").status_code == 200   # the new role applies at once
    assert client.post(f"/users/{dana.id}/disable", data={"csrf_token": csrf}).status_code == 303
    assert newcomer.get("/").status_code == 302
    assert client.post(f"/users/{dana.id}/enable", data={"csrf_token": csrf}).status_code == 303
    reset = client.post(f"/users/{dana.id}/reset-password", data={"csrf_token": csrf})
    new_password = re.search(rb'<code class="secret-value">([^<]+)</code>', reset.data)
    assert new_password is not None and new_password.group(1) != password.group(1)
    login(client.application.test_client(), "dana", new_password.group(1).decode())
    # Refusals: own account, the last admin, duplicates, weak input.
    own = client.post(f"/users/{users['admin']}/disable", data={"csrf_token": csrf})
    assert own.status_code == 400 and b"your own account" in own.data
    last = client.post(f"/users/{users['admin']}/role", data={"csrf_token": csrf, "role": "security"})
    assert last.status_code == 400 and b"last enabled admin" in last.data
    dup = client.post("/users/new", data={"csrf_token": csrf, "name": "Dana", "role": "admin"})
    assert dup.status_code == 400 and b"already exists" in dup.data
    assert client.post("/users/999/disable", data={"csrf_token": csrf}).status_code == 404
    actions = [e.action for e in reversed(svc.audit.entries(limit=50)) if e.action.startswith("user.")]
    assert actions == ["user.add", "user.set_role", "user.disable", "user.enable", "user.reset_password"]
    matrix = client.get("/users/").data
    assert b'id="matrix"' in matrix and b"users:manage" in matrix


def test_tokens_page(client: FlaskClient, users: dict[str, int], svc: ConsoleServices) -> None:
    csrf = login(client, "admin")
    page = client.post("/users/tokens/new", data={"csrf_token": csrf, "name": "line-7",
                                                  "role": "production_system", "days": "30"})
    secret = re.search(rb'<code class="secret-value">(fst_[^<]+)</code>', page.data)
    assert page.status_code == 200 and secret is not None
    auth = {"Authorization": f"Bearer {secret.group(1).decode()}"}
    assert client.application.test_client().get("/models/", headers=auth).status_code == 200
    token = next(t for t in svc.accounts.tokens() if t.name == "line-7")
    assert token.expires_at == svc.now() + 30 * 86_400_000 and token.created_by == "admin"
    assert client.post(f"/users/tokens/{token.id}/revoke", data={"csrf_token": csrf}).status_code == 303
    assert client.application.test_client().get("/models/", headers=auth).status_code == 401
    bad = client.post("/users/tokens/new", data={"csrf_token": csrf, "name": "x", "role": "admin",
                                                 "days": "-1"})
    assert bad.status_code == 400
    assert [e.action for e in reversed(svc.audit.entries(limit=10)) if e.action.startswith("token.")] == [
        "token.create", "token.revoke"]
    assert secret.group(1) not in str([e.details for e in svc.audit.entries(limit=10)]).encode()


# --------------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------------
def _fill(table: Table, **known: Any) -> dict[str, Any]:
    """A row for ``table``: ``known`` values, and a plain value for every other required column."""
    row: dict[str, Any] = dict(known)
    for column in table.c:
        if (column.name in row or column.nullable or column.default is not None
                or column.autoincrement is True):
            continue
        python_type = column.type.python_type
        row[column.name] = {int: 1, str: "x", bytes: b"x", bool: False}.get(python_type, "x")
    return row


def test_models_page_and_model_filter(client: FlaskClient, users: dict[str, int],
                                      svc: ConsoleServices) -> None:
    tables = svc.queries.models
    SoftDevice("cam-1", svc.repo, now=svc.now())
    SoftDevice("cam-2", svc.repo, now=svc.now())
    model, lease = tables.get("model"), tables.get("lease")
    assert model is not None and lease is not None
    with svc.engine.begin() as conn:
        model_id = conn.execute(insert(model).values(**_fill(model, name="detector", created_at=svc.now()))
                                .returning(model.c.id)).scalar_one()
        conn.execute(insert(lease).values(**_fill(lease, device_id="cam-2", model_id=model_id, state="active",
                                                  lease_id="l1", expires_at=svc.now() + 1000)))
    login(client, "data_scientist")
    page = client.get("/models/").data.decode()
    assert "Published models" in page and "detector" in page and 'href="/devices/cam-2"' in page
    svc.queries._facets.clear()
    listing = client.get("/devices/?model=detector").data.decode()
    assert "cam-2" in listing and "cam-1" not in listing and "1 matching" in listing
    detail = client.get("/devices/cam-2").data.decode()
    assert "Model leases and usage" in detail and "detector" in detail


def test_models_page_reads_like_the_rest_of_the_console(client: FlaskClient, users: dict[str, int],
                                                        svc: ConsoleServices) -> None:
    tables = svc.queries.models
    SoftDevice("cam-1", svc.repo, now=svc.now())
    model, usage = tables.get("model"), tables.get("usage")
    assert model is not None and usage is not None
    day, until = 20794, 1796666733444
    with svc.engine.begin() as conn:
        model_id = conn.execute(insert(model).values(**_fill(model, name="detector", created_at=svc.now()))
                                .returning(model.c.id)).scalar_one()
        conn.execute(insert(usage).values(**_fill(usage, device_id="cam-1", model_id=model_id, day=day,
                                                  served=12345, last_until=until, updated_at=until)))
    login(client, "data_scientist")
    page = client.get("/models/").data.decode()
    # Raw forms: column names as identifiers, days since the epoch, epoch milliseconds.
    assert not re.search(r"<th>(day|last_until|device_id|updated_at)</th>", page)
    assert f">{day}<" not in page and str(until) not in page and ">12345<" not in page
    assert "<th>Date (UTC)</th>" in page and "<th>Latest period until</th>" in page
    assert "<th>Device</th>" in page
    assert ">2026-12-07<" in page and "2026-12-07 18:05:33 UTC" in page and ">12,345<" in page


def test_models_page_without_model_tables(client: FlaskClient, users: dict[str, int],
                                          svc: ConsoleServices) -> None:
    empty = types.ModuleType("empty_model_tables")
    svc.queries = ConsoleQueries(svc.engine, model_tables_module=empty)
    assert ModelTables(empty).tables == {}
    login(client, "ml_engineer")
    page = client.get("/models/")
    assert page.status_code == 200 and b"No model-protection tables" in page.data
    assert client.get("/devices/?model=x").status_code == 200


def test_model_tables_found_in_this_build() -> None:
    found = ModelTables(model_tables)
    present = {name for name, obj in vars(model_tables).items()
               if isinstance(getattr(obj, "__table__", None), Table)}
    if "Model" in present:
        assert found.get("model") is not None
    if "Lease" in present:
        assert found.get("lease") is not None


def test_no_secret_columns_on_the_models_page(client: FlaskClient, users: dict[str, int],
                                              svc: ConsoleServices) -> None:
    for section in svc.queries.model_overview():
        assert not {"encrypted_data_key", "data_key_nonce", "manifest", "key_name"} & set(section.columns)
    login(client, "admin")
    assert b"data_key" not in client.get("/models/").data


@pytest.mark.parametrize("path", ["/policies/99999999999999999999999", "/alerts/99999999999999999999/resolve",
                                  "/users/99999999999999999999/disable"])
def test_ids_beyond_the_database_range_are_not_found(client: FlaskClient, users: dict[str, int],
                                                     path: str) -> None:
    login(client, "admin")
    token = csrf_of(client.get("/").data)
    response = (client.get(path) if path.startswith("/policies")
                else client.post(path, data={"csrf_token": token}))
    assert response.status_code == 404, response.status_code
