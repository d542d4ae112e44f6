"""Devices in the console: the list (filters, search, keyset pagination), a device's page with real
evidence (firmware_sim boot logs quoted by a software AK, appraised by the server's Processor against the
golden policy: the tampered kernel's event is highlighted), the marking of event logs against reference
values (pure), and the fleet actions with their outbox messages and audit entries."""

from __future__ import annotations

import re

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flask.testing import FlaskClient

from fleet_server import pki
from fleet_server.appraisal.policy import ReferencePolicy
from fleet_server.console.bootlog import (
    DIFFERS,
    EXTRA,
    MATCH,
    MISSING,
    NOT_COVERED,
    NOT_MEASURED,
    FailingRef,
    failing_from_reasons,
    mark_events,
    pcr_rows,
)
from fleet_server.console.queries import DeviceFilter
from fleet_server.console.services import ConsoleServices
from fleet_server.keys import load_signing_key
from fleet_server.service import admin
from fleet_server.service.common import ManualClock
from fleet_server.service.processor import Processor
from fleet_server.verifier.eventlog import parse_eventlog
from protocol import topics
from protocol.messages import EnrollResult, Revocation, decode_signed

pytest.register_assert_rewrite("console_fixtures")
from console_fixtures import SoftDevice, boot_log, golden_policy, login  # noqa: E402

pytest_plugins = ("console_fixtures",)


# --------------------------------------------------------------------------------------------------
# marking event logs (pure)
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def policy() -> ReferencePolicy:
    return golden_policy()


def test_golden_log_matches_everywhere(policy: ReferencePolicy) -> None:
    rows = mark_events(parse_eventlog(boot_log()), policy)
    assert {r.status for r in rows} <= {MATCH, NOT_MEASURED}
    assert sum(r.status == MATCH for r in rows) == len(policy.events)
    assert not any(r.blamed or r.failing for r in rows)


def test_tampered_kernel_is_blamed_in_pcrs_4_and_9(policy: ReferencePolicy) -> None:
    rows = mark_events(parse_eventlog(boot_log("tampered-kernel")), policy)
    blamed = [r for r in rows if r.blamed]
    assert sorted(r.pcr for r in blamed) == [4, 9]
    assert all(r.status == DIFFERS and r.reference_digest and r.digest != r.reference_digest for r in blamed)
    assert any("vmlinuz" in r.description for r in blamed)
    # Everything outside PCRs 4 and 9 still matches.
    assert all(r.status in (MATCH, NOT_MEASURED) for r in rows if r.pcr not in (4, 9))


def test_extra_missing_and_uncovered_events(policy: ReferencePolicy) -> None:
    log = parse_eventlog(boot_log())
    doc = policy.to_json()
    pcr = 4  # several events in the golden boot
    mine = [e for e in doc["events"] if e["pcr"] == pcr]
    others = [e for e in doc["events"] if e["pcr"] != pcr]
    assert len(mine) >= 2
    # No reference events for the PCR (a value-only reference): nothing to compare with.
    rows = mark_events(log, ReferencePolicy.from_json({**doc, "events": others}))
    assert {r.status for r in rows if r.pcr == pcr} == {"value_only"}

    def variant(events: list[dict[str, object]]) -> ReferencePolicy:
        pcrs = {"sha256": {**doc["pcrs"]["sha256"], str(pcr): _replay(events)}}
        return ReferencePolicy.from_json({**doc, "events": others + events, "pcrs": pcrs})

    # The reference lacks the device's last event of the PCR: that event is "extra" (and blamed).
    rows = [r for r in mark_events(log, variant(mine[:-1])) if r.pcr == pcr]
    assert [r.status for r in rows] == [MATCH] * (len(mine) - 1) + [EXTRA] and rows[-1].blamed
    # The reference has one more: a "missing" row without an index, after the PCR's last event.
    all_rows = mark_events(log, variant([*mine, mine[-1]]), [FailingRef(pcr, None)])
    missing = [r for r in all_rows if r.status == MISSING]
    assert len(missing) == 1 and missing[0].index is None and missing[0].blamed and missing[0].failing
    before = all_rows[all_rows.index(missing[0]) - 1]
    assert before.pcr == pcr and before.index == max(r.index for r in all_rows if r.pcr == pcr and r.index)
    assert {r.status for r in mark_events(log, None)} <= {NOT_COVERED, NOT_MEASURED}


def _replay(events: list[dict[str, object]]) -> str:
    import hashlib

    value = bytes(32)
    for e in events:
        value = hashlib.sha256(value + bytes.fromhex(str(e["digest"]))).digest()
    return value.hex()


def test_failing_events_from_reasons() -> None:
    reasons = ['PCR 4: EV_EFI_BOOT_SERVICES_APPLICATION (event 23, "\\EFI\\vmlinuz") differs from reference',
               'sha1 PCR 9: unexpected EV_IPL (event 40, "x") not in the reference',
               'PCR 7: EV_EFI_VARIABLE_AUTHORITY ("db") expected by the reference is missing',
               "quote: quote signature does not verify"]
    assert failing_from_reasons(reasons) == (FailingRef(4, 23), FailingRef(9, 40),
                                             FailingRef(7, None, "EV_EFI_VARIABLE_AUTHORITY"))


def test_pcr_rows(policy: ReferencePolicy) -> None:
    quoted = {"sha256": {"0": policy.pcrs["sha256"][0].hex(), "4": "00" * 32, "15": "11" * 32}}
    import json

    rows = {(r.bank, r.pcr): r.status for r in pcr_rows(json.dumps(quoted), policy)}
    assert rows[("sha256", 0)] == "match" and rows[("sha256", 4)] == "differs"
    assert rows[("sha256", 15)] == "not_covered" and rows[("sha256", 1)] == "not_quoted"
    assert pcr_rows("not json", None) == []


# --------------------------------------------------------------------------------------------------
# the list
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def fleet(svc: ConsoleServices, console_clock: ManualClock) -> list[str]:
    """130 devices: 3 classes, 2 firmware versions, 4 states."""
    from fleet_server.storage.repo import NewDevice

    ids = []
    states = ["trusted", "untrusted", "pending", "revoked"]
    with svc.repo.write("seeding") as tx:
        for i in range(130):
            device_id = f"dev-{i:04d}"
            tx.insert_device(NewDevice(
                id=device_id, state=states[i % 4], device_class=f"class-{i % 3}",
                firmware_version="1.2.0" if i % 2 else "1.3.0", ek_cert=b"x", ek_fingerprint=f"{i:064x}",
                ek_public=b"x", ak_public=b"x", ak_name=b"x", csr=None, enroll_request_id=None,
                cert_serial=None, now=console_clock.now_ms(), next_attestation_at=None), cause="seed")
            ids.append(device_id)
    return ids


def _after(f: DeviceFilter, last: str) -> DeviceFilter:
    import dataclasses

    return dataclasses.replace(f, after=last, before="")


def test_keyset_pages_cover_every_device_once(svc: ConsoleServices, fleet: list[str]) -> None:
    f = DeviceFilter(limit=25)
    seen: list[str] = []
    page = svc.queries.devices_page(f)
    assert page.total == 130 and not page.has_prev
    pages = [page]
    while page.has_next:
        page = svc.queries.devices_page(_after(f, page.last_id))
        pages.append(page)
    seen = [r.id for p in pages for r in p.rows]
    assert seen == sorted(fleet) and len(pages) == 6 and pages[-1].has_prev
    # Backwards from the last page gives the previous page again.
    import dataclasses

    back = svc.queries.devices_page(dataclasses.replace(f, before=pages[-1].first_id))
    assert [r.id for r in back.rows] == [r.id for r in pages[-2].rows] and back.has_next and back.has_prev
    first = svc.queries.devices_page(dataclasses.replace(f, before=pages[1].first_id))
    assert [r.id for r in first.rows] == [r.id for r in pages[0].rows] and not first.has_prev


@pytest.mark.parametrize(("filters", "expected"), [
    ({"state": "trusted"}, lambda i: i % 4 == 0),
    ({"device_class": "class-1"}, lambda i: i % 3 == 1),
    ({"firmware": "1.2.0", "state": "untrusted"}, lambda i: i % 2 == 1 and i % 4 == 1),
    ({"q": "01"}, lambda i: "01" in f"dev-{i:04d}"),
    ({"q": "DEV-012"}, lambda i: f"dev-{i:04d}".startswith("dev-012")),
    ({"q": "%"}, lambda i: False),
    ({"model": "no-such-model"}, lambda i: False),
])
def test_filters(svc: ConsoleServices, fleet: list[str], filters: dict[str, str], expected: object) -> None:
    f = DeviceFilter(limit=200, **filters)  # type: ignore[arg-type]
    page = svc.queries.devices_page(f)
    want = [d for i, d in enumerate(fleet) if expected(i)]  # type: ignore[operator]
    assert [r.id for r in page.rows] == want and page.total == len(want)


def test_list_page(client: FlaskClient, users: dict[str, int], fleet: list[str]) -> None:
    login(client, "data_scientist")
    page = client.get("/devices/?state=untrusted&class=class-1&n=10")
    assert page.status_code == 200
    ids = re.findall(rb'<a href="/devices/(dev-\d+)">', page.data)
    want = [d.encode() for i, d in enumerate(fleet) if i % 4 == 1 and i % 3 == 1]
    assert ids == want[:10] and b"11 matching" in page.data
    next_link = re.search(rb'rel="next" href="([^"]+)"', page.data)
    assert next_link is not None
    url = next_link.group(1).decode().replace("&amp;", "&")
    assert "after=" in url and "state=untrusted" in url and "class=class-1" in url and "n=10" in url
    second = client.get(url)
    assert re.findall(rb'<a href="/devices/(dev-\d+)">', second.data) == want[10:]
    assert b'rel="prev"' in second.data and b'rel="next"' not in second.data
    facets = client.get("/devices/").data
    for value in (b"class-0", b"class-2", b"1.3.0"):
        assert b'<option value="' + value + b'"' in facets


# --------------------------------------------------------------------------------------------------
# a device's page with real evidence
# --------------------------------------------------------------------------------------------------
def test_tampered_device_page_highlights_the_failing_event(
        client: FlaskClient, users: dict[str, int], svc: ConsoleServices, console_processor: Processor,
        stored_golden_policy: admin.StoredPolicy) -> None:
    good = SoftDevice("cam-good", svc.repo, now=svc.now())
    bad = SoftDevice("cam-bad", svc.repo, now=svc.now())
    good.attest(console_processor, svc.repo, "golden")
    bad.attest(console_processor, svc.repo, "tampered-kernel")
    assert svc.repo.device("cam-good").state == "trusted"  # type: ignore[union-attr]
    record = svc.repo.device("cam-bad")
    assert record is not None and record.state == "untrusted"
    reasons = svc.repo.attestations("cam-bad")[0].reasons
    assert any(r.startswith("PCR 4: ") and "differs from reference" in r for r in reasons)

    login(client, "data_scientist")
    page = client.get("/devices/cam-bad").data.decode()
    # identity
    assert "2.5.4.5=tpm-cam-bad" in page and "CN=EdgeSim TPM EK Issuing CA,O=EdgeSim TPM" in page
    assert "ECC secp256r1" in page
    # the reason, the failing rows of the event log, the PCRs that differ
    assert "PCR 4: " in page
    failing = re.findall(r'<tr class="mark-differs blamed failing"[^>]*>(.*?)</tr>', page, re.S)
    assert len(failing) == 2  # the kernel is measured by the firmware (PCR 4) and by GRUB (PCR 9)
    named = failing_from_reasons(reasons)
    cells = [re.search(r"<td>(\d+)</td><td>(\d+)</td>", row) for row in failing]
    assert {FailingRef(int(c.group(2)), int(c.group(1))) for c in cells if c} == set(named)
    assert {int(c.group(2)) for c in cells if c} == {4, 9}
    assert all("vmlinuz" in row and "(failing)" in row for row in failing)
    assert re.search(r'<tr class="mark-differs"><td>sha256</td><td>4</td>', page)
    assert re.search(r'<tr class="mark-match"><td>sha256</td><td>0</td>', page)
    # attestation history, alert raised by the state change
    assert "untrusted" in page and "failed attestation" in page
    good_page = client.get("/devices/cam-good").data.decode()
    assert "mark-differs" not in good_page and "failing" not in good_page and "mark-match" in good_page
    assert "against edge-camera-1.2.0" in good_page


def test_device_page_404s(client: FlaskClient, users: dict[str, int]) -> None:
    login(client, "admin")
    assert client.get("/devices/no-such").status_code == 404
    assert client.get("/devices/Bad_Id!").status_code == 404


# --------------------------------------------------------------------------------------------------
# actions
# --------------------------------------------------------------------------------------------------
def _audit(svc: ConsoleServices) -> list[tuple[str, str, str]]:
    return [(e.actor, e.action, e.target) for e in reversed(svc.audit.entries(limit=100))
            if e.action.startswith("device.")]


def test_approve_pending_device_sends_its_certificate(client: FlaskClient, users: dict[str, int],
                                                      svc: ConsoleServices) -> None:
    dev = SoftDevice("cam-new", svc.repo, state="pending", now=svc.now())
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.load_pem_x509_csr(pki.make_device_csr(key, "cam-new")).public_bytes(serialization.Encoding.DER)
    with svc.repo.write("csr") as tx:
        tx.update_device(dev.id, {"csr": csr, "enroll_request_id": "ab" * 16})
    csrf = login(client, "security")
    response = client.post("/devices/cam-new/approve", data={"csrf_token": csrf})
    assert response.status_code == 303 and response.headers["Location"] == "/devices/cam-new?done=approve"
    assert svc.repo.device("cam-new").state == "enrolled"  # type: ignore[union-attr]
    [message] = svc.repo.outbox()
    signer = load_signing_key(svc.config.signing_key)
    assert message.topic == topics.enroll_down("cam-new", "result")
    result = decode_signed(message.payload, keys={signer.kid: signer.public_key}, aud="claim:cam-new").message
    assert isinstance(result, EnrollResult) and result.status == "admitted" and result.device_cert
    assert _audit(svc) == [("security", "device.approve", "device:cam-new")]
    assert "approved by security" in svc.repo.state_history("cam-new")[0].cause
    page = client.get("/devices/cam-new?done=approve")
    assert b"Device approved" in page.data


def test_revoke_quarantine_reattest(client: FlaskClient, users: dict[str, int], svc: ConsoleServices,
                                    console_clock: ManualClock) -> None:
    SoftDevice("cam-1", svc.repo, now=svc.now())
    csrf = login(client, "admin")
    signer = load_signing_key(svc.config.signing_key)

    console_clock.advance(1000)
    assert client.post("/devices/cam-1/reattest", data={"csrf_token": csrf}).status_code == 303
    assert svc.repo.device("cam-1").next_attestation_at == console_clock.now_ms()  # type: ignore[union-attr]

    response = client.post("/devices/cam-1/quarantine", data={"csrf_token": csrf, "reason": "odd  traffic"})
    assert response.status_code == 303
    assert svc.repo.device("cam-1").state == "quarantined"  # type: ignore[union-attr]
    response = client.post("/devices/cam-1/revoke", data={"csrf_token": csrf, "reason": "stolen"})
    assert response.status_code == 303
    device = svc.repo.device("cam-1")
    assert device is not None and device.state == "revoked" and device.state_reasons == ("stolen",)
    notices = [decode_signed(m.payload, keys={signer.kid: signer.public_key}, aud="cam-1").message
               for m in svc.repo.outbox()]
    assert [(type(n), n.state, n.reasons) for n in notices] == [  # type: ignore[attr-defined]
        (Revocation, "quarantined", ("odd traffic",)), (Revocation, "revoked", ("stolen",))]
    assert _audit(svc) == [("admin", "device.reattest", "device:cam-1"),
                           ("admin", "device.quarantine", "device:cam-1"),
                           ("admin", "device.revoke", "device:cam-1")]
    revoke_entry = svc.audit.entries(limit=1, action="device.revoke")[0].details_dict()
    crl = revoke_entry.pop("crl")  # the broker's CRL was rewritten, and the audit entry says how
    assert revoke_entry == {"from": "quarantined", "to": "revoked", "messages": 1, "reason": "stolen"}
    assert isinstance(crl, str) and crl.startswith("CRL ") and "fleet-ca.crl.pem" in crl

    # Refused actions say why (409) and change nothing.
    again = client.post("/devices/cam-1/revoke", data={"csrf_token": csrf})
    assert again.status_code == 409 and b"already revoked" in again.data
    assert client.post("/devices/cam-1/reattest", data={"csrf_token": csrf}).status_code == 409
    assert client.post("/devices/nope/revoke", data={"csrf_token": csrf}).status_code == 404
    assert len(_audit(svc)) == 3
    # Re-admitted by approve.
    assert client.post("/devices/cam-1/approve", data={"csrf_token": csrf}).status_code == 303
    assert svc.repo.device("cam-1").state == "enrolled"  # type: ignore[union-attr]


def test_lift_quarantine(client: FlaskClient, users: dict[str, int], svc: ConsoleServices) -> None:
    SoftDevice("cam-1", svc.repo, now=svc.now())
    csrf = login(client, "security")
    assert b"/devices/cam-1/unquarantine" not in client.get("/devices/cam-1").data  # not quarantined
    assert client.post("/devices/cam-1/quarantine", data={"csrf_token": csrf}).status_code == 303
    page = client.get("/devices/cam-1").data
    assert b"/devices/cam-1/unquarantine" in page and b"Lift quarantine" in page
    response = client.post("/devices/cam-1/unquarantine", data={"csrf_token": csrf})
    assert response.status_code == 303 and "done=unquarantine" in response.headers["Location"]
    device = svc.repo.device("cam-1")
    assert device is not None and device.state == "enrolled" and device.next_attestation_at is not None
    entry = svc.audit.entries(limit=1, action="device.unquarantine")[0]
    assert entry.target == "device:cam-1" and entry.details_dict()["from"] == "quarantined"
    again = client.post("/devices/cam-1/unquarantine", data={"csrf_token": csrf})
    assert again.status_code == 409 and b"not quarantined" in again.data
    other = client.application.test_client()
    csrf = login(other, "ml_engineer")  # no fleet right
    assert other.post("/devices/cam-1/unquarantine", data={"csrf_token": csrf}).status_code == 403


def test_actions_shown_by_right(client: FlaskClient, users: dict[str, int], svc: ConsoleServices) -> None:
    SoftDevice("cam-1", svc.repo, now=svc.now())
    login(client, "ml_engineer")
    page = client.get("/devices/cam-1").data
    assert b"/devices/cam-1/revoke" not in page and b"Actions" not in page
    other = client.application.test_client()
    login(other, "security")
    page = other.get("/devices/cam-1").data
    for action in (b"reattest", b"revoke", b"quarantine"):
        assert b"/devices/cam-1/" + action in page
    assert b"/devices/cam-1/approve" not in page  # enrolled: nothing to approve
