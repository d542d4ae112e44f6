"""Benchmark: server time of the console's device list on a fleet of 100 000 devices (SQLite).

A temporary data folder is made with ``fleet-server init``; 100 000 devices (5 states, 8 classes, 4
firmware versions) are bulk-inserted with the driver's ``executemany``, plus 200 000 attestation rows of
the last 24 hours for the dashboard. A logged-in test client then requests the device list with the
filters an operator uses - no filter, a state, class + firmware + state, a search, a deep keyset page,
a page backwards - and the dashboard's JSON. Each request is the whole server path (session lookup,
role check, CSRF token, queries, template) measured with ``perf_counter``.

``run()`` returns ``console_devices_page_ms_p95`` (the 95th percentile over every device-list request;
target < 250 ms), ``console_devices_page_ms_p50`` and ``console_dashboard_ms_p95``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import random
import re
import statistics
import tempfile
import time
from pathlib import Path

N_DEVICES = 100_000
N_ATTESTATIONS = 200_000
STATES = ("trusted", "trusted", "trusted", "untrusted", "unreachable", "pending", "revoked", "quarantined")
PASSWORD = "benchmark password 1"  # noqa: S105 - a throw-away user of a temporary database


def _seed(database: Path, now: int) -> None:
    import sqlite3

    rng = random.Random(42)
    conn = sqlite3.connect(database)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=OFF")
        # Blobs of realistic size (a device row is ~2.5 kB: EK certificate, public areas, PCR values).
        ek_cert, ek_public, ak_public = bytes(900), bytes(330), bytes(90)
        pcrs = '{"sha256":{' + ",".join(f'"{p}":"{"ab" * 32}"' for p in range(12)) + "}}"
        rows = []
        for i in range(N_DEVICES):
            state = STATES[rng.randrange(len(STATES))]
            last = now - rng.randint(0, 600_000)
            rows.append((f"dev-{i:06d}", state, f"class-{i % 8}", f"1.{i % 4}.0", f"{i:064x}",
                         now - 86_400_000, now,
                         last, last, "trusted" if state == "trusted" else "untrusted",
                         last + 600_000 if state == "trusted" else None, now + rng.randint(0, 300_000), 0,
                         20_000, ak_public, "[]", pcrs, bytes(34), ek_public, ek_cert))
        conn.executemany(
            "INSERT INTO device (id, state, device_class, firmware_version, ek_fingerprint, created_at, "
            "updated_at, state_changed_at, last_attestation_at, last_verdict, trusted_until, "
            "next_attestation_at, missed_challenges, held_log_size, ak_public, state_reasons, last_pcrs, "
            "ak_name, ek_public, ek_cert) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        conn.executemany(
            "INSERT INTO attestation (device_id, challenge_id, issued_at, received_at, stored_at, "
            "latency_ms, verdict, reasons, evidence_sha256) VALUES (?, ?, ?, ?, ?, 5, ?, '[]', x'00')",
            ((f"dev-{i % N_DEVICES:06d}", f"{i:032x}", t - 5, t - 1, t,
              "trusted" if rng.random() < 0.97 else "untrusted")
             for i, t in ((i, now - rng.randint(0, 86_400_000)) for i in range(N_ATTESTATIONS))))
        conn.commit()
        conn.execute("ANALYZE")
    finally:
        conn.close()


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def measure(rounds: int = 25) -> dict[str, float]:
    from fleet_server.cli import main
    from fleet_server.config import load_config
    from fleet_server.console import create_app
    from fleet_server.console.app import dispose
    from fleet_server.console.services import EXTENSION

    with tempfile.TemporaryDirectory(prefix="console-bench-") as tmp:
        folder = Path(tmp) / "srv"
        with contextlib.redirect_stdout(io.StringIO()):
            if main(["init", "--data-dir", str(folder)]) != 0:
                raise RuntimeError("fleet-server init failed")
        now = time.time_ns() // 1_000_000
        _seed(folder / "fleet.db", now)
        config = load_config(folder / "server.toml")
        config = dataclasses.replace(config, console=dataclasses.replace(
            config.console, argon2_time_cost=1, argon2_memory_kib=64, argon2_parallelism=1))
        app = create_app(config)
        try:
            svc = app.extensions[EXTENSION]
            svc.accounts.add_user("bench", "security", PASSWORD, now=now)
            client = app.test_client()
            token = re.search(rb'name="csrf_token" value="([0-9a-f]+)"', client.get("/login").data)
            assert token is not None
            client.post("/login", data={"username": "bench", "password": PASSWORD,
                                        "csrf_token": token.group(1)})
            urls = ["/devices/", "/devices/?state=untrusted", "/devices/?state=trusted&n=200",
                    "/devices/?class=class-3&firmware=1.3.0&state=trusted", "/devices/?q=04242",
                    "/devices/?after=dev-050000", "/devices/?before=dev-090000&class=class-5",
                    "/devices/?state=quarantined&after=dev-070000"]
            for url in urls:  # warm up (and check each page works)
                response = client.get(url)
                if response.status_code != 200 or b"matching" not in response.data:
                    raise RuntimeError(f"{url}: HTTP {response.status_code}")
            pages: list[float] = []
            dashboard: list[float] = []
            for _ in range(rounds):
                for url in urls:
                    start = time.perf_counter()
                    client.get(url)
                    pages.append((time.perf_counter() - start) * 1000)
                start = time.perf_counter()
                client.get("/dashboard/data")
                dashboard.append((time.perf_counter() - start) * 1000)
        finally:
            dispose(app)
    return {
        "console_devices_page_ms_p95": round(_p(pages, 0.95), 2),
        "console_devices_page_ms_p50": round(statistics.median(pages), 2),
        "console_dashboard_ms_p95": round(_p(dashboard, 0.95), 2),
    }


def run() -> dict[str, float]:
    return measure()


if __name__ == "__main__":
    for name, value in measure().items():
        print(f"{name:32} {value:10.2f}")
