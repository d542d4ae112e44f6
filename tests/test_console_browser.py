"""The console in headless Chromium (Debian's, driven by Playwright): log in, find a device, open its
event log and see the failing event highlighted, approve a pending device and revoke a trusted one -
seeing each state change in the page - with no console error and no Content-Security-Policy
violation along the way.

A rollout is created through the wizard (dry run, then start) and paused from its page.

The data is real: devices attested through the server's Processor against a golden policy, one of
them booted with a tampered initrd. With ``CONSOLE_SCREENSHOTS=<folder>`` set (e.g. ``docs/images``),
:func:`test_screenshots_for_the_docs` writes the screenshots docs/operations.md shows.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

from fleet_server.keys import load_signing_key
from fleet_server.rollouts.plan import Group, parse_plan
from fleet_server.service import rollouts
from fleet_server.service.common import Counters
from fleet_server.service.context import ServiceContext
from fleet_server.service.processor import Processor
from fleet_server.service.releases import add_release

pytest.register_assert_rewrite("browser_fixtures", "console_fixtures", "release_fixtures")
from browser_fixtures import Fleet, Served, browser_login, seed_fleet  # noqa: E402
from console_fixtures import PASSWORD  # noqa: E402
from release_fixtures import MemoryTargetStore, write_bundle_dir  # noqa: E402

pytest_plugins = ("console_fixtures", "browser_fixtures")
pytestmark = pytest.mark.browser

# Recorded in the page before any script of ours runs (an init script is not subject to the CSP).
CSP_WATCH = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation", function (e) {
  window.__cspViolations.push(e.violatedDirective + " " + e.blockedURI);
});
"""


def _seed(served: Served) -> Fleet:
    svc = served.svc
    ctx = ServiceContext(settings=svc.config.attestation, signer=load_signing_key(svc.config.signing_key),
                         fleet_ca=None, clock=served.clock)
    fleet = seed_fleet(svc, Processor(ctx, svc.repo, Counters()))
    svc.accounts.add_user("alice", "admin", PASSWORD, now=svc.now())
    return fleet


class Watched:
    """A page with its console errors, uncaught exceptions and CSP violations collected."""

    def __init__(self, context: Any) -> None:
        self.problems: list[str] = []
        context.add_init_script(CSP_WATCH)
        self.page = context.new_page()
        self.page.on("console", lambda m: self.problems.append(f"console {m.type}: {m.text}")
                     if m.type in ("error", "warning") else None)
        self.page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        # Destructive buttons ask window.confirm (console.js); the admin says yes.
        self.page.on("dialog", lambda d: d.accept())

    def check(self) -> None:
        self.problems += [f"CSP: {v}" for v in self.page.evaluate("window.__cspViolations || []")]
        assert self.problems == []


def test_find_inspect_approve_and_revoke(served_console: Served, chromium: Any) -> None:
    from playwright.sync_api import expect

    fleet = _seed(served_console)
    base = served_console.url
    w = Watched(chromium)
    page = w.page
    browser_login(page, base, "alice")
    expect(page.locator("[data-field='states.trusted']")).to_have_text("3")

    # Find the device: search the list, follow the link.
    page.click("nav a:has-text('Devices')")
    page.fill("input[name=q]", "0666")
    page.click("form.filters button[type=submit]")
    rows = page.locator("#devices tbody tr")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("untrusted")
    rows.first.locator("a").click()
    page.wait_for_url(f"{base}/devices/{fleet.tampered}")
    w.check()

    # Its event log: the event the appraisal blamed is highlighted (the stylesheet applied).
    failing = page.locator("#eventlog tr.failing")
    expect(failing.first).to_be_visible()
    assert failing.count() >= 1
    expect(failing.first).to_contain_text("(failing)")
    assert re.search(r"initrd", failing.first.inner_text(), re.IGNORECASE)
    assert failing.first.evaluate("e => getComputedStyle(e).backgroundColor") == "rgb(251, 217, 219)"
    matched = page.locator("#eventlog tr.mark-match")
    assert matched.count() > 3 and matched.first.evaluate("e => e.classList.contains('failing')") is False

    # Approve the pending device.
    page.goto(f"{base}/devices/{fleet.pending}")
    expect(page.locator("h1 .state")).to_have_text("pending")
    page.click("button:has-text('Approve')")
    page.wait_for_url(re.compile(r".*/devices/cam-0900\?done=approve$"))
    expect(page.locator("h1 .state")).to_have_text("enrolled")
    expect(page.locator("p.flash.ok")).to_contain_text("Device approved")
    expect(page.locator("button:has-text('Approve')")).to_have_count(0)

    # Revoke a trusted one, with a reason.
    device = fleet.trusted[0]
    page.goto(f"{base}/devices/{device}")
    expect(page.locator("h1 .state")).to_have_text("trusted")
    revoke = page.locator("form[action$='/revoke']")
    revoke.locator("input[name=reason]").fill("reported stolen")
    revoke.locator("button").click()
    page.wait_for_url(re.compile(rf".*/devices/{device}\?done=revoke$"))
    expect(page.locator("h1 .state")).to_have_text("revoked")
    expect(page.locator("td", has_text="revoked by alice: reported stolen")).to_have_count(1)

    # The list agrees, and so does the database (and the audit log).
    page.goto(f"{base}/devices/?state=revoked")
    expect(page.locator("#devices tbody tr")).to_have_count(1)
    expect(page.locator("#devices tbody tr").first).to_contain_text(device)
    svc = served_console.svc
    assert svc.repo.device(fleet.pending).state == "enrolled"  # type: ignore[union-attr]
    assert svc.repo.device(device).state == "revoked"  # type: ignore[union-attr]
    assert [e.action for e in svc.audit.entries(actor="alice", limit=3)] == [
        "device.revoke", "device.approve", "login"]
    w.check()


def test_model_actions_in_the_browser(served_console: Served, chromium: Any) -> None:
    from playwright.sync_api import expect

    from firmware_sim.testmodel import small_classifier

    fleet = _seed(served_console)
    base = served_console.url
    w = Watched(chromium)
    page = w.page
    browser_login(page, base, "alice")
    page.goto(f"{base}/models/")
    page.fill("#publish input[name=name]", fleet.model)
    page.fill("#publish input[name=version]", "1.1.0")
    page.set_input_files("#publish input[name=file]", files=[{"name": "model.onnx", "mimeType":
                                                              "application/octet-stream",
                                                              "buffer": small_classifier(5)}])
    page.click("#publish button[type=submit]")
    page.wait_for_url(re.compile(rf".*/models/{fleet.model}\?done=published$"))
    expect(page.locator("#version-1\\.1\\.0")).to_be_visible()
    page.locator("#version-1\\.1\\.0 textarea[name=settings]").fill("output_mode=topk\nk=2")
    page.locator("#version-1\\.1\\.0 button:has-text('Save policy')").click()
    page.wait_for_url(re.compile(r".*done=policy$"))
    expect(page.locator("#version-1\\.1\\.0 textarea[name=settings]")).to_contain_text("output_mode=topk")
    page.locator("#version-1\\.1\\.0 button:has-text('Retire')").click()
    page.wait_for_url(re.compile(r".*done=retired$"))
    expect(page.locator("#version-1\\.1\\.0")).to_have_count(0)
    expect(page.locator("#versions h2")).to_contain_text("retired: 1.1.0")
    w.check()


def test_rollout_wizard_and_page_in_the_browser(served_console: Served, chromium: Any,
                                                tmp_path: Path) -> None:
    from playwright.sync_api import expect

    _seed(served_console)
    svc = served_console.svc
    target = add_release(svc.repo, MemoryTargetStore(), write_bundle_dir(tmp_path / "bundle"),
                         device_class="edge-camera", version="1.3.0", now=svc.now(), actor="test").target
    base = served_console.url
    w = Watched(chromium)
    page = w.page
    browser_login(page, base, "alice")
    page.click("nav a:has-text('Rollouts')")
    expect(page.locator("#rollouts tbody tr")).to_contain_text("No rollouts yet")
    page.click("a:has-text('New rollout')")
    page.select_option("#wizard select[name=release]", target)
    page.fill("#wizard input[name=id]", "web-1")
    page.fill("#wizard input[name=canary]", "1")
    page.fill("#wizard input[name=phases]", "50, 100")
    page.click("#wizard button:has-text('Dry run')")
    expect(page.locator("#dry-run td.count")).to_have_text(["1", "1", "2"])
    assert svc.repo.rollouts.rollouts() == []
    page.click("#start button")  # asks window.confirm; the admin says yes
    page.wait_for_url(re.compile(r".*/rollouts/web-1\?done=create$"))
    expect(page.locator("h1 .state")).to_have_text("running")
    expect(page.locator("#rollout-chart rect").first).to_be_visible()
    bar = page.locator("#phases svg.progress rect.seg-pending").first
    assert bar.evaluate("e => getComputedStyle(e).fill") == "rgb(217, 221, 227)"  # the stylesheet applied
    page.click("button:has-text('Pause')")
    page.wait_for_url(re.compile(r".*done=pause$"))
    expect(page.locator("h1 .state")).to_have_text("paused")
    page.goto(f"{base}/rollouts/")
    expect(page.locator("#rollout-web-1 svg.progress")).to_have_count(3)
    actions = [e.action for e in svc.audit.entries(actor="alice", limit=2)]
    assert actions == ["rollout.pause", "rollout.create"]
    w.check()


def _history(served: Served, fleet: Fleet) -> None:
    """A day of earlier attestation rows, so that the dashboard's chart has something to show."""
    from fleet_server.storage.repo import NewAttestation

    now = served.svc.now()
    rows = []
    for hour in range(1, 24):
        for i, device_id in enumerate((*fleet.trusted, fleet.tampered)):
            for k in range(3 + (hour * 7 + i) % 5):
                at = now - hour * 3_600_000 + k * 600_000 + i * 1000
                bad = device_id == fleet.tampered and hour < 3
                rows.append(NewAttestation(
                    device_id=device_id, challenge_id=f"h{hour}-{i}-{k}", issued_at=at - 40 - k * 13,
                    received_at=at - 5, stored_at=at, verdict="untrusted" if bad else "trusted", reasons=(),
                    evidence_sha256=bytes(32), policy_id=fleet.policy_id, reset_count=1, restart_count=0,
                    clock=None))
    with served.svc.repo.write("screenshot history") as tx:
        tx.insert_attestations(rows)


@pytest.mark.skipif(not os.environ.get("CONSOLE_SCREENSHOTS"), reason="set CONSOLE_SCREENSHOTS=<folder>")
def test_screenshots_for_the_docs(served_console: Served, chromium: Any) -> None:
    """Writes the screenshots of docs/operations.md (1280x800 PNG; a rollout's page at full length) into
    $CONSOLE_SCREENSHOTS."""
    from playwright.sync_api import expect

    out = Path(os.environ["CONSOLE_SCREENSHOTS"])
    out.mkdir(parents=True, exist_ok=True)
    fleet = _seed(served_console)
    _history(served_console, fleet)
    base = served_console.url
    w = Watched(chromium)
    page = w.page
    page.goto(f"{base}/login")
    page.fill("input[name=username]", "alice")
    page.screenshot(path=str(out / "console-login.png"))
    browser_login(page, base, "alice")
    expect(page.locator("[data-field='states.trusted']")).to_have_text("3")
    page.screenshot(path=str(out / "console-dashboard.png"))
    page.goto(f"{base}/devices/")
    page.screenshot(path=str(out / "console-devices.png"))
    page.goto(f"{base}/devices/{fleet.tampered}")
    page.locator("#eventlog tr.failing").first.scroll_into_view_if_needed()
    page.evaluate("window.scrollBy(0, -200)")
    page.screenshot(path=str(out / "console-device-eventlog.png"))
    page.goto(f"{base}/devices/{fleet.pending}")
    page.screenshot(path=str(out / "console-device-pending.png"))
    page.goto(f"{base}/models/{fleet.model}")
    page.screenshot(path=str(out / "console-model.png"))
    page.goto(f"{base}/alerts/")
    page.screenshot(path=str(out / "console-alerts.png"))
    page.goto(f"{base}/users/")
    page.screenshot(path=str(out / "console-users.png"))
    _rollout_history(served_console, out.parent / "screenshot-bundle")
    page.goto(f"{base}/rollouts/")
    page.screenshot(path=str(out / "console-rollouts.png"))
    page.goto(f"{base}/rollouts/r1")
    page.screenshot(path=str(out / "console-rollout.png"), full_page=True)
    w.check()


def _rollout_history(served: Served, bundle: Path) -> None:
    """A rollout started an hour ago: the canary and phase 1 succeeded, phase 2 half way with a
    device that came back untrusted."""
    svc = served.svc
    now = svc.now()
    t0 = now - 3_600_000
    target = add_release(svc.repo, MemoryTargetStore(), write_bundle_dir(bundle), device_class="edge-camera",
                         version="1.3.0", now=t0, actor="test").target
    rollouts.create_rollout(svc.repo, target=target, group=Group("edge-camera"),
                            plan=parse_plan({"canary": 1, "phases": [50, 100]}), now=t0, actor="alice",
                            rollout_id="r1")
    minute = 60_000
    steps = [(5, 15, "succeeded", ""), (20, 35, "succeeded", ""),
             (40, 50, "untrusted_after_update", "PCR 4 differs from the release's reference values"),
             (40, None, "assigned", "")]
    with svc.repo.write("screenshot rollout") as tx:
        for m, (assigned, finished, state, reason) in zip(tx.rollouts.members("r1"), steps, strict=True):
            tx.rollouts.set_member("r1", m.device_id, {
                "state": state, "attempts": 1, "assigned_at": t0 + assigned * minute, "reason": reason,
                "finished_at": t0 + finished * minute if finished else None})
        tx.rollouts.set_rollout("r1", {"phase": 2})
