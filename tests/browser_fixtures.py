"""A small real fleet for the API, schemathesis, metrics and browser tests, the console served over
HTTP, and headless Chromium (``pytest_plugins = ("console_fixtures", "browser_fixtures")``).

* :func:`seed_fleet` - devices whose evidence went through the real
  :class:`~fleet_server.service.processor.Processor` against a golden policy (trusted ones, a device
  booted with a tampered initrd, so untrusted with a critical alert), a pending device, a published
  model entitled to the device class, and the processor's counters flushed like a worker's.
* ``served_console`` - the real application (``secure_cookies`` off: plain http) served by waitress
  (:class:`fleet_server.console.server.ConsoleServer`) on a free loopback port, in a thread.
* ``chromium`` - Debian's Chromium (``/usr/bin/chromium``) driven by Playwright's sync API, with a
  fresh profile directory; closed (and its processes ended) after the test. No browser is ever
  downloaded: ``executable_path`` points at the system's.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from firmware_sim.testmodel import small_classifier
from fleet_server.config import ServerConfig
from fleet_server.console import create_app
from fleet_server.console.app import dispose
from fleet_server.console.server import ConsoleServer
from fleet_server.console.services import EXTENSION, ConsoleServices
from fleet_server.keys import load_model_signing_key
from fleet_server.modelstore import admin as model_admin
from fleet_server.modelstore.kek import load_kek
from fleet_server.modelstore.store import PackageStore, publish_model
from fleet_server.service import admin
from fleet_server.service.common import ManualClock
from fleet_server.service.processor import Processor

pytest.register_assert_rewrite("console_fixtures")
from console_fixtures import CLASS, PASSWORD, SoftDevice, console_settings, golden_policy  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync")
MODEL = "classifier"


@dataclass(frozen=True, slots=True)
class Fleet:
    """What :func:`seed_fleet` created."""

    trusted: tuple[str, ...]
    tampered: str
    pending: str
    policy_id: int
    model: str
    version: str


def publish_test_model(svc: ConsoleServices, name: str = MODEL, version: str = "1.0.0",
                       seed: int = 0, *, deploy: bool = True) -> None:
    """Publish (and deploy unless told not to) the small test classifier with the server's own keys
    (as ``model publish`` would)."""
    config = svc.config
    kek = load_kek(config.models.kek_file)
    assert kek is not None, "fleet-server init creates the KEK"
    publish_model(svc.repo, model=small_classifier(seed), name=name, version=version,
                  signing_key=load_model_signing_key(config.models.signing_key), kek=kek,
                  store=PackageStore(config.models.store_dir), now=svc.now(), actor="test")
    if deploy:
        model_admin.deploy(svc.repo, name, version, now=svc.now(), actor="test")


def flush_counters(svc: ConsoleServices, processor: Processor, worker: str = "test-worker") -> None:
    """Add the processor's counters to the database, as a worker's housekeeping does."""
    with svc.repo.write("flushing test counters") as tx:
        tx.add_counters(worker, processor.counters.take_deltas(), svc.now())


def seed_fleet(svc: ConsoleServices, processor: Processor, *, trusted: int = 3) -> Fleet:
    """See the module docstring. Device ids: ``cam-0001``.. (trusted), ``cam-0666`` (tampered initrd),
    ``cam-0900`` (pending)."""
    stored = admin.store_policy(svc.repo, golden_policy(), now=svc.now(), created_by="test")
    processor.policies.refresh()
    ids = tuple(f"cam-{i:04d}" for i in range(1, trusted + 1))
    for device_id in ids:
        SoftDevice(device_id, svc.repo, now=svc.now()).attest(processor, svc.repo, "golden")
    SoftDevice("cam-0666", svc.repo, now=svc.now()).attest(processor, svc.repo, "tampered-initrd")
    SoftDevice("cam-0900", svc.repo, state="pending", now=svc.now())
    publish_test_model(svc)
    model_admin.entitle(svc.repo, MODEL, device_class=CLASS, now=svc.now(), actor="test")
    flush_counters(svc, processor)
    return Fleet(ids, "cam-0666", "cam-0900", stored.id, MODEL, "1.0.0")


# --------------------------------------------------------------------------------------------------
# the console over HTTP, and Chromium
# --------------------------------------------------------------------------------------------------
@dataclass
class Served:
    """The console served on ``url``, its services, and the clock it runs on."""

    url: str
    svc: ConsoleServices
    clock: ManualClock


@pytest.fixture
def served_console(console_config: ServerConfig, console_clock: ManualClock) -> Iterator[Served]:
    config = console_settings(console_config, secure_cookies=False)
    config = dataclasses.replace(config, console=dataclasses.replace(config.console, host="127.0.0.1",
                                                                     port=0))
    app = create_app(config, clock=console_clock.now_ms)
    server = ConsoleServer(app, host="127.0.0.1", port=0, threads=4).start()
    try:
        yield Served(server.url, app.extensions[EXTENSION], console_clock)
    finally:
        server.stop()
        dispose(app)


def chromium_available() -> bool:
    return CHROMIUM.exists() and os.access(CHROMIUM, os.X_OK)


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[Any]:
    """A Playwright browser context of headless Chromium (a fresh profile), closed afterwards."""
    if not chromium_available():  # `make setup` installs it: missing means a broken set-up, not a skip
        pytest.fail(f"{CHROMIUM} is not installed (Debian package chromium; `make setup` installs it)")
    from playwright.sync_api import sync_playwright

    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    with sync_playwright() as pw:
        # A persistent context is how Playwright takes a user data dir of our choosing.
        context = pw.chromium.launch_persistent_context(
            str(profile), executable_path=str(CHROMIUM), headless=True, args=list(CHROMIUM_ARGS),
            viewport={"width": 1280, "height": 800}, device_scale_factor=1, locale="en-GB",
            timezone_id="UTC")
        try:
            yield context
        finally:
            context.close()
    shutil.rmtree(profile, ignore_errors=True)


def browser_login(page: Any, base_url: str, user: str, password: str = PASSWORD) -> None:
    """Log in through the login form."""
    page.goto(f"{base_url}/login")
    page.fill("input[name=username]", user)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")
    page.wait_for_url(f"{base_url}/")
