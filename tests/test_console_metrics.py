"""``/metrics``: the output parsed with a strict reader of the Prometheus text format 0.0.4 and every
value checked against the seeded data (counters flushed by a worker, devices appraised by the real
Processor, attestation rows with known latencies, state changes, alerts); the incremental tallies
count each row once; access needs fleet:view or the scrape-only token."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from flask import Flask
from flask.testing import FlaskClient

from fleet_server.config import ServerConfig
from fleet_server.console import create_app
from fleet_server.console.app import dispose
from fleet_server.console.metrics import LATENCY_BUCKETS_S, MetricFamily, Sample, format_value, render
from fleet_server.console.services import EXTENSION, ConsoleServices
from fleet_server.service import admin
from fleet_server.service.common import ManualClock
from fleet_server.service.processor import Processor
from fleet_server.storage.repo import NewAttestation

pytest.register_assert_rewrite("browser_fixtures")
from browser_fixtures import Fleet, seed_fleet  # noqa: E402

pytest_plugins = ("console_fixtures",)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


# --------------------------------------------------------------------------------------------------
# a strict reader of the text format
# --------------------------------------------------------------------------------------------------
NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL = r"[a-zA-Z_][a-zA-Z0-9_]*"
VALUE = r"(?:[+-]?(?:[0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?|\.[0-9]+)|[+-]Inf|NaN)"
SAMPLE_RE = re.compile(rf"^({NAME})(?:\{{(.*)\}})? ({VALUE})(?: -?[0-9]+)?$")
LABEL_PAIR_RE = re.compile(rf'({LABEL})="((?:[^"\\\n]|\\[\\"n])*)"(,|$)')
TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}


@dataclass
class Family:
    name: str
    type: str = ""
    help: str = ""
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = field(default_factory=dict)


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "\\": "\\", '"': '"'}[m.group(1)], text)


def _labels(text: str | None) -> tuple[tuple[str, str], ...]:
    if not text:
        return ()
    out, pos = [], 0
    while pos < len(text):
        m = LABEL_PAIR_RE.match(text, pos)
        assert m is not None, f"bad label set {text!r} at {pos}"
        out.append((m.group(1), _unescape(m.group(2))))
        pos = m.end()
    names = [k for k, _ in out]
    assert len(names) == len(set(names)), f"repeated label in {text!r}"
    return tuple(out)


def parse_exposition(text: str) -> dict[str, Family]:
    """Parse and validate the text format: HELP/TYPE before the samples, each at most once, samples of
    a family together, names and label syntax, escapes, no duplicate series, histogram structure."""
    assert text.endswith("\n") and "\r" not in text
    families: dict[str, Family] = {}
    current: Family | None = None
    closed: set[str] = set()
    for line in text[:-1].split("\n"):
        assert line, "empty line"
        if line.startswith("#"):
            m = re.match(rf"^# (HELP|TYPE) ({NAME}) (.*)$", line)
            assert m is not None, f"bad comment line {line!r}"
            kind, name, rest = m.groups()
            assert name not in closed, f"{name} reopened"
            if current is not None and current.name != name:
                closed.add(current.name)
            family = families.setdefault(name, Family(name))
            assert not family.samples, f"{kind} of {name} after its samples"
            if kind == "HELP":
                assert not family.help, f"second HELP of {name}"
                assert re.fullmatch(r"(?:[^\\\n]|\\[\\n])*", rest), f"bad HELP escape {rest!r}"
                family.help = _unescape(rest)
            else:
                assert not family.type and rest in TYPES, f"bad or second TYPE of {name}: {rest!r}"
                family.type = rest
            current = family
            continue
        m = SAMPLE_RE.match(line)
        assert m is not None, f"bad sample line {line!r}"
        name, labels_text, value = m.groups()
        assert current is not None and current.type, f"sample {name} before its TYPE"
        base = current.name
        suffixes = ("_bucket", "_sum", "_count") if current.type == "histogram" else ("",)
        assert any(name == base + s for s in suffixes), f"sample {name} outside its family {base}"
        key = (name[len(base):], _labels(labels_text))
        assert key not in current.samples, f"duplicate series {line!r}"
        current.samples[key] = float(value.replace("Inf", "inf"))
    for family in families.values():
        assert family.type and family.help, f"{family.name} lacks TYPE or HELP"
        if family.type == "counter":
            assert family.name.endswith("_total") and all(v >= 0 for v in family.samples.values())
        if family.type == "histogram":
            buckets = [(float(dict(lab)["le"].replace("Inf", "inf")), v)
                       for (suffix, lab), v in family.samples.items() if suffix == "_bucket"]
            bounds = [b for b, _ in buckets]
            assert bounds == sorted(bounds) and bounds[-1] == math.inf, bounds
            counts = [v for _, v in buckets]
            assert counts == sorted(counts), "buckets are cumulative"
            assert counts[-1] == family.samples[("_count", ())] and ("_sum", ()) in family.samples
    return families


def value(families: dict[str, Family], name: str, suffix: str = "", **labels: str) -> float:
    return families[name].samples[(suffix, tuple(labels.items()))]


def test_the_reader_refuses_what_the_format_forbids() -> None:
    ok = render([MetricFamily("a_total", "counter", 'say "hi"\\', (Sample("", (("r", 'x"y\\\nz'),), 3),))])
    assert ok == '# HELP a_total say "hi"\\\\\n# TYPE a_total counter\na_total{r="x\\"y\\\\\\nz"} 3\n'
    assert value(parse_exposition(ok), "a_total", r='x"y\\\nz') == 3
    for bad in ("a_total 1\n",
                "# TYPE a_total counter\n# HELP a_total h\na_total{r=\"1\"} 1\na_total{r=\"1\"} 2\n",
                "# HELP a h\n# TYPE a gauge\na{1x=\"y\"} 1\n", "# HELP a h\n# TYPE a gauge\na 1",
                "# HELP a h\n# TYPE a gauge\na{x=\"y\\q\"} 1\n", "# HELP a h\n# TYPE a gauge\na one\n",
                "# HELP a h\n# TYPE a gauge\nb 1\n"):
        with pytest.raises(AssertionError):
            parse_exposition(bad)
    assert [format_value(v) for v in (3, 2.5, 0.0, math.inf)] == ["3", "2.5", "0", "+Inf"]


# --------------------------------------------------------------------------------------------------
# values against the seeded data
# --------------------------------------------------------------------------------------------------
def _latency_rows(svc: ConsoleServices, latencies: list[int], stored_at: int, tag: str) -> None:
    with svc.repo.write("test attestations") as tx:
        tx.insert_attestations([NewAttestation(
            device_id="cam-0001", challenge_id=f"{tag}{i}", issued_at=stored_at - ms, received_at=stored_at,
            stored_at=stored_at, verdict="trusted", reasons=(), evidence_sha256=b"e" * 32, policy_id=None,
            reset_count=None, restart_count=None, clock=None) for i, ms in enumerate(latencies)])


def _expected_buckets(latencies: list[int]) -> dict[str, float]:
    return {repr(b): float(sum(1 for ms in latencies if ms <= b * 1000)) for b in LATENCY_BUCKETS_S}


def _scrape(client: FlaskClient, headers: dict[str, str]) -> dict[str, Family]:
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.data[:300]
    assert response.headers["Content-Type"] == CONTENT_TYPE
    return parse_exposition(response.data.decode("utf-8"))


@pytest.fixture
def fleet(svc: ConsoleServices, console_processor: Processor) -> Fleet:
    return seed_fleet(svc, console_processor)


def test_metrics_report_the_seeded_fleet(client: FlaskClient, svc: ConsoleServices, fleet: Fleet,
                                         console_processor: Processor, console_clock: ManualClock) -> None:
    now = svc.now()
    with svc.repo.write("worker counters") as tx:
        tx.add_counters("worker-a", {"rejected.malformed": 2, "rejected.duplicate": 1, "keys.released": 5,
                                     'rejected.we"ird\\': 1}, now)
        tx.add_counters("worker-b", {"rejected.malformed": 3, "keys.denied": 2}, now)
    recent = [5, 10, 30, 120, 700, 2600, 70_000]
    _latency_rows(svc, recent, now - 5 * 60_000, "r")
    _latency_rows(svc, [1, 2, 3], now - 20 * 60_000, "old")  # before the histogram's window
    signer = console_processor.ctx.signer
    admin.revoke_device(svc.repo, fleet.trusted[2], signer=signer, now=now, reason="lost")
    admin.quarantine_device(svc.repo, fleet.trusted[1], signer=signer, now=now, reason="inspect")
    _, secret = svc.accounts.create_token("prometheus", "production_system", created_by="test", now=now)
    headers = {"Authorization": f"Bearer {secret}"}

    m = _scrape(client, headers)
    assert value(m, "edge_attestations_total", result="trusted") == 3
    assert value(m, "edge_attestations_total", result="untrusted") == 1
    states = {dict(lab)["state"]: v for (_, lab), v in m["edge_devices"].samples.items()}
    assert states == {"pending": 1, "enrolled": 0, "trusted": 1, "untrusted": 1, "unreachable": 0,
                      "revoked": 1, "quarantined": 1}
    assert value(m, "edge_key_releases_total") == 5 and value(m, "edge_key_denials_total") == 2
    assert value(m, "edge_revocations_total", state="untrusted") == 1
    assert value(m, "edge_revocations_total", state="revoked") == 1
    assert value(m, "edge_revocations_total", state="quarantined") == 1
    rejected = {dict(lab)["reason"]: v
                for (_, lab), v in m["edge_mqtt_messages_rejected_total"].samples.items()}
    assert rejected == {"malformed": 5, "duplicate": 1, 'we"ird\\': 1}
    assert value(m, "edge_mqtt_messages_received_total", kind="evidence") == 4
    assert value(m, "edge_alerts_active", severity="critical") == 1
    # The histogram: the 4 seeded appraisals (latency 0 on the frozen clock) and the recent rows.
    latencies = [0, 0, 0, 0, *recent]
    hist = "edge_verification_latency_seconds"
    buckets = {dict(lab)["le"]: v for (suffix, lab), v in m[hist].samples.items() if suffix == "_bucket"}
    assert buckets == {**_expected_buckets(latencies), "+Inf": len(latencies)}
    assert value(m, hist, "_count") == len(latencies)
    assert value(m, hist, "_sum") == pytest.approx(sum(latencies) / 1000)

    # Time moves on: new rows are counted once, settled rows are not counted again.
    console_clock.advance(90_000)
    later = [40, 400]
    _latency_rows(svc, later, svc.now() - 1_000, "n")
    for _ in range(2):
        again = _scrape(client, headers)
        assert value(again, hist, "_count") == len(latencies) + 2
        assert value(again, hist, "_bucket", le="0.05") == _expected_buckets(latencies + later)["0.05"]
    admin.approve_device(svc.repo, fleet.trusted[2], signer=signer, fleet_ca=svc.fleet_ca(), now=svc.now())
    admin.revoke_device(svc.repo, fleet.trusted[2], signer=signer, now=svc.now())
    assert value(_scrape(client, headers), "edge_revocations_total", state="revoked") == 2


# --------------------------------------------------------------------------------------------------
# access
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def scrape_app(console_config: ServerConfig, console_clock: ManualClock) -> Iterator[tuple[Flask, str]]:
    token = secrets.token_urlsafe(32)
    console = dataclasses.replace(console_config.console,
                                  metrics_token_sha256=hashlib.sha256(token.encode()).hexdigest())
    app = create_app(dataclasses.replace(console_config, console=console), clock=console_clock.now_ms,
                     flask_config={"TESTING": True})
    try:
        yield app, token
    finally:
        dispose(app)


def test_metrics_access(client: FlaskClient, svc: ConsoleServices, scrape_app: tuple[Flask, str]) -> None:
    assert client.get("/metrics").status_code == 302  # a browser is sent to the login page
    assert client.get("/metrics", headers={"Authorization": "Bearer fst_nope"}).status_code == 401
    for role in ("data_scientist", "security"):
        _, secret = svc.accounts.create_token(f"m-{role}", role, created_by="test", now=svc.now())
        assert client.get("/metrics", headers={"Authorization": f"Bearer {secret}"}).status_code == 200
    app, token = scrape_app
    scraper = app.test_client()
    response = scraper.get("/metrics", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200 and "edge_devices" in parse_exposition(response.data.decode())
    assert scraper.get("/metrics", headers={"Authorization": f"Bearer {token}x"}).status_code == 401
    # The scrape token opens /metrics and nothing else.
    assert scraper.get("/api/v1/devices", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    assert scraper.get("/devices/", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    assert app.extensions[EXTENSION].settings.metrics_token_sha256 != ""
