"""agent.log: one structured line per record, quoting, redaction of secrets, JSON form."""

from __future__ import annotations

import io
import json
import logging
import re

import pytest

from agent.log import EventLogger, JsonFormatter, KeyValueFormatter, configure_logging, level_number

LINE = re.compile(r"^ts=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z level=(debug|info|warning|error) "
                  r"event=\S+( \w+=\S.*)?$")
Captured = tuple[logging.Logger, io.StringIO]


@pytest.fixture
def captured() -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(KeyValueFormatter())
    logger = logging.getLogger("test-agent-log")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    return logger, stream


def test_event_lines_have_fixed_fields_and_quote_when_needed(captured: Captured) -> None:
    logger, stream = captured
    log = EventLogger(logger, device="cam-1").bind(phase="enroll")
    log.info("connected", reason="boot", connects=1, ok=True, missing=None)
    log.warning("odd", text='has "quotes" and\nnewline = equals', items=("a", "b"))
    first, second = stream.getvalue().splitlines()
    assert LINE.match(first) and LINE.match(second)
    assert first.split(" ", 1)[1] == ("level=info event=connected device=cam-1 phase=enroll reason=boot "
                                      "connects=1 ok=true missing=-")
    assert second.endswith('text="has \\"quotes\\" and newline = equals" items=a,b')


def test_secrets_are_never_rendered(captured: Captured) -> None:
    logger, stream = captured
    EventLogger(logger).info("x", secret=b"\x01" * 32, proof="p" * 44, nonce="AAAA", device_key="k",
                             key="KEY", private_pem="-----BEGIN", blob=b"\x00" * 300, key_id="0123abcd")
    line = stream.getvalue()
    for leaked in ("\\x01", "ppp", "AAAA", "KEY", "BEGIN"):
        assert leaked not in line
    assert "secret=<redacted>" in line and "proof=<redacted>" in line and "nonce=<redacted>" in line
    assert "device_key=<redacted>" in line and "key=<redacted>" in line
    assert 'blob="<300 bytes>"' in line and "key_id=0123abcd" in line


def test_foreign_records_and_exceptions_stay_on_one_line(captured: Captured) -> None:
    logger, stream = captured
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        logger.exception("mqtt %s: failed", "dev@host:1")
    (line,) = stream.getvalue().splitlines()
    assert LINE.match(line)
    assert 'event=log logger=test-agent-log msg="mqtt dev@host:1: failed" ' in line
    assert line.endswith(' error="ValueError: bad thing"')


def test_json_format_and_configure_logging() -> None:
    stream = io.StringIO()
    handler = configure_logging("warning", "json", stream)
    try:
        configure_logging("warning", "json", stream)  # again: replaces, does not duplicate
        log = EventLogger(logging.getLogger("agent.test"), device="cam-1")
        log.info("hidden")
        log.error("shown", nonce=b"n", count=2)
        (line,) = stream.getvalue().splitlines()
        record = json.loads(line)
        assert {k: record[k] for k in ("level", "event", "device", "nonce", "count")} == \
            {"level": "error", "event": "shown", "device": "cam-1", "nonce": "<redacted>", "count": 2}
        plain = logging.makeLogRecord({"msg": "plain", "name": "x"})
        assert json.loads(JsonFormatter().format(plain))["msg"] == "plain"
    finally:
        logging.getLogger().removeHandler(handler)
    with pytest.raises(ValueError):
        configure_logging("info", "xml")
    with pytest.raises(ValueError):
        level_number("loud")
