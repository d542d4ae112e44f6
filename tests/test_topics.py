"""protocol.topics: construction, strict parsing, and agreement with MQTT wildcard matching."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt.client import topic_matches_sub

from protocol import topics
from protocol.errors import MalformedInputError
from protocol.topics import Subtree, TopicError

device_ids = st.from_regex(r"[a-z0-9][a-z0-9-]{0,62}", fullmatch=True).filter(
    lambda s: s not in topics.RESERVED_IDS)
kinds = st.from_regex(r"[a-z][a-z0-9_-]{0,31}", fullmatch=True)


def test_topic_layout() -> None:
    assert topics.device_up("dev-1", "evidence") == "fleet/v1/devices/dev-1/up/evidence"
    assert topics.device_down("dev-1", "challenge") == "fleet/v1/devices/dev-1/down/challenge"
    assert topics.enroll_up("dev-1", "hello") == "fleet/v1/enroll/claim:dev-1/up/hello"
    assert topics.enroll_down("dev-1", "cert") == "fleet/v1/enroll/claim:dev-1/down/cert"
    assert topics.device_down_filter("dev-1") == "fleet/v1/devices/dev-1/down/#"
    assert topics.enroll_down_filter("dev-1") == "fleet/v1/enroll/claim:dev-1/down/#"
    assert topics.server_subscriptions() == (
        "$share/fleet-workers/fleet/v1/devices/+/up/#",
        "$share/fleet-workers/fleet/v1/enroll/+/up/#",
    )
    assert topics.server_subscriptions("g2")[0].startswith("$share/g2/")


@pytest.mark.parametrize("device_id", ["a", "0", "dev-1", "a" * 63, "0-0", "abc-"])
def test_valid_device_ids(device_id: str) -> None:
    assert topics.validate_device_id(device_id) == device_id
    assert topics.is_valid_device_id(device_id)


@pytest.mark.parametrize("device_id", [
    "", "-dev", "Dev", "dev_1", "dev.1", "dev/1", "dev+", "dev#", "a" * 64, "dév", "dev 1",
    "claim:dev", "fleet-server", "dev\n", "\x00", 5, None, b"dev",
])
def test_invalid_device_ids(device_id: object) -> None:
    with pytest.raises(TopicError):
        topics.validate_device_id(device_id)
    assert not topics.is_valid_device_id(device_id)


@pytest.mark.parametrize("kind", ["", "Evidence", "1x", "a/b", "a+", "#", "x" * 33, "a b", None])
def test_invalid_kinds_refused_when_building(kind: object) -> None:
    with pytest.raises(TopicError):
        topics.device_up("dev-1", kind)  # type: ignore[arg-type]


def test_claim_identity_round_trip() -> None:
    assert topics.claim_identity("dev-1") == "claim:dev-1"
    assert topics.device_id_from_claim("claim:dev-1") == "dev-1"
    for bad in ("dev-1", "claim:", "claim:Dev", "claim:fleet-server", "claim:claim:x"):
        with pytest.raises(TopicError):
            topics.device_id_from_claim(bad)


def test_parse_server_topic() -> None:
    parsed = topics.parse_server_topic("fleet/v1/devices/dev-1/up/evidence")
    assert parsed == (Subtree.DEVICES, "dev-1", "evidence")
    assert parsed.device_id == "dev-1"
    subtree, identity, kind = topics.parse_server_topic("fleet/v1/enroll/claim:dev-1/up/hello")
    assert (subtree, identity, kind) == (Subtree.ENROLL, "claim:dev-1", "hello")
    assert topics.parse_server_topic("fleet/v1/enroll/claim:dev-1/up/hello").device_id == "dev-1"


@pytest.mark.parametrize("topic", [
    "fleet/v1/devices/dev-1/down/challenge",         # server never consumes down topics
    "fleet/v1/enroll/claim:dev-1/down/cert",
    "fleet/v1/devices/claim:dev-1/up/evidence",      # claim cert writing in the devices subtree
    "fleet/v1/enroll/dev-1/up/hello",                # device cert id in the enroll subtree
    "fleet/v1/devices/fleet-server/up/evidence",     # reserved identity
    "fleet/v1/devices/Dev-1/up/evidence",
    "fleet/v1/devices/dev-1/up/evidence/extra",
    "fleet/v1/devices/dev-1/up/",
    "fleet/v1/devices/dev-1/up",
    "fleet/v1/devices//up/evidence",
    "fleet/v2/devices/dev-1/up/evidence",
    "/fleet/v1/devices/dev-1/up/evidence",
    "fleet/v1/other/dev-1/up/evidence",
    "fleet/v1/devices/+/up/evidence",
    "fleet/v1/devices/dev-1/up/#",
    "$share/fleet-workers/fleet/v1/devices/dev-1/up/evidence",
    "fleet/v1/devices/dev-1/up/evidence\x00",
    "fleet/v1/devices/" + "a" * 600 + "/up/evidence",
    "",
])
def test_parse_server_topic_refuses(topic: str) -> None:
    with pytest.raises(TopicError):
        topics.parse_server_topic(topic)


def test_parse_server_topic_refuses_non_strings() -> None:
    with pytest.raises(TopicError):
        topics.parse_server_topic(b"fleet/v1/devices/dev-1/up/evidence")  # type: ignore[arg-type]


def test_parse_device_and_enroll_topics_only_accept_own_down_topics() -> None:
    assert topics.parse_device_topic("fleet/v1/devices/dev-1/down/challenge", "dev-1") == "challenge"
    assert topics.parse_enroll_topic("fleet/v1/enroll/claim:dev-1/down/cert", "dev-1") == "cert"
    for topic in ("fleet/v1/devices/dev-2/down/challenge", "fleet/v1/devices/dev-1/up/challenge",
                  "fleet/v1/enroll/claim:dev-1/down/cert"):
        with pytest.raises(TopicError):
            topics.parse_device_topic(topic, "dev-1")
    for topic in ("fleet/v1/enroll/claim:dev-2/down/cert", "fleet/v1/enroll/claim:dev-1/up/cert",
                  "fleet/v1/devices/dev-1/down/cert"):
        with pytest.raises(TopicError):
            topics.parse_enroll_topic(topic, "dev-1")


def test_topic_error_is_a_malformed_input_error() -> None:
    assert issubclass(TopicError, MalformedInputError)


@given(device_ids, kinds)
def test_build_parse_round_trip(device_id: str, kind: str) -> None:
    assert topics.parse_server_topic(topics.device_up(device_id, kind)) == (Subtree.DEVICES, device_id, kind)
    enroll = topics.parse_server_topic(topics.enroll_up(device_id, kind))
    assert enroll == (Subtree.ENROLL, f"claim:{device_id}", kind)
    assert enroll.device_id == device_id
    assert topics.parse_device_topic(topics.device_down(device_id, kind), device_id) == kind
    assert topics.parse_enroll_topic(topics.enroll_down(device_id, kind), device_id) == kind


@given(device_ids, kinds)
def test_filters_match_exactly_the_intended_topics(device_id: str, kind: str) -> None:
    """The server's shared filters (without ``$share/group/``) match every up topic, no down topic;
    a device's filter matches its own down topics only."""
    device_filter, enroll_filter = (f.split("/", 2)[2] for f in topics.server_subscriptions())
    assert topic_matches_sub(device_filter, topics.device_up(device_id, kind))
    assert topic_matches_sub(enroll_filter, topics.enroll_up(device_id, kind))
    assert not topic_matches_sub(device_filter, topics.device_down(device_id, kind))
    assert not topic_matches_sub(enroll_filter, topics.enroll_down(device_id, kind))
    assert topic_matches_sub(topics.device_down_filter(device_id), topics.device_down(device_id, kind))
    assert not topic_matches_sub(topics.device_down_filter(device_id), topics.device_up(device_id, kind))
    assert topic_matches_sub(topics.enroll_down_filter(device_id), topics.enroll_down(device_id, kind))


@given(st.one_of(st.text(max_size=200),
                 st.builds("/".join, st.lists(st.sampled_from(
                     ["fleet", "v1", "devices", "enroll", "up", "down", "dev-1", "claim:dev-1", "x", "",
                      "+", "#", "Ev", "claim:", "fleet-server"]), max_size=8))))
def test_parser_accepts_only_canonical_topics(text: str) -> None:
    """Whatever the input, the parser raises TopicError or returns what rebuilds the same topic."""
    try:
        parsed = topics.parse_server_topic(text)
    except TopicError:
        return
    build = topics.device_up if parsed.subtree is Subtree.DEVICES else topics.enroll_up
    assert build(parsed.device_id, parsed.kind) == text


def test_invalid_share_group() -> None:
    for group in ("", "a/b", "a+", "#", "x" * 65):
        with pytest.raises(TopicError):
            topics.server_subscriptions(group)
