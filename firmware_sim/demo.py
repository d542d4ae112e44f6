"""`make demo` / `firmware-sim demo`: a whole installation on this machine, for a person to look at.

Starts Mosquitto, the fleet server with its web console, and five simulated devices (the first boots
a tampered kernel), using the fleet harness (:mod:`firmware_sim.fleet`). When every device has been
appraised it prints exactly two lines on standard output::

    Console: http://127.0.0.1:PORT/
    Login: admin / PASSWORD

and keeps running until interrupted (Ctrl-C or SIGTERM), then stops everything it started and
removes its workspace. Progress goes to standard error.

The console password is generated on the first run and kept (0600) in ``var/demo/console-login.json``
under the current folder, so it stays the same across runs; the administrator account is created in
each run's fresh database with it. The demo also publishes a small classifier model (built at run
time with ``onnx``) and entitles the devices' class to it: trusted devices download it and get its
key; the tampered one is refused.

It also ships one signed firmware update (docs/updates.md): the devices are provisioned for updates
(``FleetConfig(updates=True)``), and once every device is appraised, *before* the two lines are
printed, release :data:`DEMO_RELEASE` is built from the golden profile, published and assigned to the
golden devices (about a second). The devices then download, install, power-cycle into the new slot
and commit in the background while the demo runs (a few seconds); the console's Releases page and
the device pages show the release and each assignment's progress.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

from firmware_sim.fleet import FleetConfig, FleetHarness
from protocol.errors import ConfigError, EdgeError

DEMO_USER = "admin"
STATE_DIR = Path("var/demo")
CREDENTIALS = "console-login.json"
DEMO_QUERIES = 1_000_000
DEMO_QUERY_INTERVAL = 2.0
"""Each device's inference API gets a request every two seconds, so the console shows query usage."""
DEMO_RELEASE = "1.3.0"
"""The firmware version the demo ships to its golden devices."""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("demo",
                                   help="broker, fleet server with console, five devices (one tampered)")
    parser.add_argument("--devices", type=int, default=5, help="simulated devices (default 5)")
    parser.add_argument("--tampered", type=int, default=1, help="of which boot a tampered kernel (default 1)")
    parser.add_argument("--interval", type=float, default=10.0, help="re-attestation interval, seconds")
    parser.add_argument("--port", type=int, default=0, help="console port (default: a free one)")
    parser.add_argument("--state-dir", type=Path, default=STATE_DIR,
                        help="where the console password is kept (default var/demo)")
    parser.add_argument("--no-model", action="store_true", help="do not publish the demo model")
    parser.add_argument("--no-update", action="store_true", help="do not ship the demo firmware update")
    parser.set_defaults(handler=_demo)


def _progress(line: str) -> None:
    print(f"demo: {line}", file=sys.stderr, flush=True)


def load_or_create_password(state_dir: Path) -> str:
    """The demo console password: generated once (``secrets``), then read back (file 0600)."""
    path = state_dir / CREDENTIALS
    if path.exists():
        try:
            data = json.loads(path.read_text())
            password = data["password"]
            if data.get("user") == DEMO_USER and isinstance(password, str) and len(password) >= 12:
                return password
        except (OSError, ValueError, KeyError, TypeError):
            pass
        raise ConfigError(f"{path} is unreadable; delete it to get a new demo password")
    state_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(state_dir, 0o700)
    password = secrets.token_urlsafe(12)
    fd, tmp = tempfile.mkstemp(dir=state_dir, prefix=".login-")
    with os.fdopen(fd, "w") as f:  # mkstemp creates the file 0600
        json.dump({"user": DEMO_USER, "password": password}, f)
    os.replace(tmp, path)
    return password


def _demo_model(state_dir: Path) -> Path:
    """The demo's test classifier (built with ``onnx``, no download); a test model, not a secret."""
    from firmware_sim.testmodel import small_classifier

    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / "classifier.onnx"
    path.write_bytes(small_classifier(seed=7))
    return path


def _create_admin(harness: FleetHarness, password: str) -> None:
    from fleet_server.config import load_config
    from fleet_server.console.accounts import Accounts
    from fleet_server.console.audit import record_cli
    from fleet_server.storage.db import create_engine

    config = load_config(harness.server_config)
    engine = create_engine(config.database_url)
    try:
        now = int(time.time() * 1000)
        user = Accounts(engine, config.console).add_user(DEMO_USER, "admin", password, now=now)
        record_cli(engine, "user.add", f"user:{user.name}", {"role": user.role, "by": "demo"}, now=now)
    finally:
        engine.dispose()


def _ship_update(harness: FleetHarness) -> None:
    """Publish :data:`DEMO_RELEASE` (golden profile) and assign it to the golden devices; they
    install it in the background."""
    golden = harness.golden_device_ids()
    if not golden:
        return
    target = harness.publish_release(DEMO_RELEASE)
    harness.assign_release(target, golden)
    _progress(f"{target} assigned to {len(golden)} devices; they install it in the background")


def _demo(args: argparse.Namespace) -> int:
    if args.devices < 1 or not 0 <= args.tampered <= args.devices:
        raise ConfigError("--devices must be at least 1 and --tampered between 0 and --devices")
    password = load_or_create_password(args.state_dir)
    model = None if args.no_model else _demo_model(args.state_dir)
    config = FleetConfig(devices=args.devices, tampered=args.tampered, tampered_profile="tampered-kernel",
                         interval=args.interval, duration=None, console_port=args.port,
                         model=model, model_name="classifier", queries=0 if model is None else DEMO_QUERIES,
                         query_interval=DEMO_QUERY_INTERVAL, agent_log_level="warning",
                         updates=not args.no_update)
    harness = FleetHarness(config, progress=_progress)

    def stop(signum: int, frame: FrameType | None) -> None:
        harness.request_stop()

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        harness.start()
        _create_admin(harness, password)
        if not args.no_update:
            _ship_update(harness)
        url = harness.console_url
        if url is None:
            raise EdgeError("the console did not start")
        print(f"Console: {url}", flush=True)
        print(f"Login: {DEMO_USER} / {password}", flush=True)
        _progress("running; press Ctrl-C to stop")
        harness.run(duration=None)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _progress("stopping")
        harness.stop()
        harness.cleanup()
