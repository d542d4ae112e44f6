"""protocol.mqtt.MqttClient against a real Mosquitto: delivery, shared subscriptions, reconnects,
flow control, the publish window, and failure reporting.  Backoff arithmetic is tested pure."""

from __future__ import annotations

import logging
import random
import threading
from pathlib import Path

import pytest

from firmware_sim.broker import DEFAULT_MAX_PACKET_SIZE, MosquittoBroker
from protocol import topics
from protocol.errors import ConfigError, TransportError
from protocol.mqtt import Backoff, InboundMessage, MqttClient, TlsFiles

pytest.register_assert_rewrite("mqtt_fixtures")  # before the import below, which loads it first
from mqtt_fixtures import WAIT, ClientFactory, Credentials, drain, wait_until  # noqa: E402

pytest_plugins = ("mqtt_fixtures",)

UP = topics.device_up("dev-a", "evidence")


@pytest.fixture
def server(make_client: ClientFactory, credentials: Credentials) -> MqttClient:
    return make_client(credentials.server(), client_id="fleet-server-1",
                       subscriptions=topics.server_subscriptions())


@pytest.fixture
def device(make_client: ClientFactory, credentials: Credentials) -> MqttClient:
    return make_client(credentials.device("dev-a"), client_id="dev-a",
                       subscriptions=(topics.device_down_filter("dev-a"),))


# -- backoff (pure) --------------------------------------------------------------------------------
def test_backoff_grows_exponentially_within_jitter_bounds() -> None:
    backoff = Backoff(initial=0.5, maximum=30.0, factor=2.0)
    rng = random.Random(1)
    for attempt in range(12):
        ceiling = min(30.0, 0.5 * 2 ** attempt)
        for _ in range(50):
            assert ceiling / 2 <= backoff.delay(attempt, rng) <= ceiling
    assert backoff.delay(10_000, rng) <= 30.0  # no overflow for huge attempt counts


def test_backoff_has_jitter_and_is_reproducible_with_a_seed() -> None:
    backoff = Backoff()
    delays = [backoff.delay(3, random.Random(seed)) for seed in range(100)]
    assert len(set(delays)) > 90  # a fleet restarting together spreads out
    assert max(delays) - min(delays) > 0.5 * (max(delays) / 2)
    assert [backoff.delay(n, random.Random(7)) for n in range(5)] == \
           [backoff.delay(n, random.Random(7)) for n in range(5)]


@pytest.mark.parametrize("kwargs", [{"initial": 0}, {"initial": 5, "maximum": 1}, {"factor": 0.5},
                                    {"reset_after": -1}])
def test_backoff_rejects_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        Backoff(**kwargs)


def test_unusable_tls_files_are_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot load MQTT TLS files"):
        MqttClient("127.0.0.1", 1, TlsFiles(tmp_path / "ca.pem", tmp_path / "c.pem", tmp_path / "c.key"))


# -- delivery --------------------------------------------------------------------------------------
needs_broker = pytest.mark.mqtt


@needs_broker
def test_publish_receive_with_properties(server: MqttClient, device: MqttClient) -> None:
    handle = device.publish(UP, b"\x00\x01payload", correlation_data=b"req-1",
                            response_topic=topics.device_down("dev-a", "result"),
                            user_properties=[("v", "1")])
    handle.wait(WAIT)
    assert handle.done and handle.reason_code == 0 and handle.error is None
    msg = server.receive(WAIT)
    assert msg == InboundMessage(topic=UP, payload=b"\x00\x01payload", qos=1, retain=False,
                                 correlation_data=b"req-1",
                                 response_topic=topics.device_down("dev-a", "result"),
                                 user_properties=(("v", "1"),))
    assert server.receive(0.0) is None
    assert server.stats().messages_received == 1 and device.stats().messages_published == 1


@needs_broker
def test_order_is_preserved_and_nothing_lost(server: MqttClient, device: MqttClient) -> None:
    count = 2000
    for i in range(count):
        device.publish(UP, i.to_bytes(4, "big"))
    device.flush(WAIT)
    received = [int.from_bytes(m.payload, "big") for m in drain(server, count)]
    assert received == list(range(count))
    assert device.stats().in_flight == 0


@needs_broker
def test_qos0_needs_a_connection(server: MqttClient, device: MqttClient,
                                 mqtt_broker: MosquittoBroker) -> None:
    device.publish(UP, b"best effort", qos=0).wait(WAIT)
    msg = server.receive(WAIT)
    assert msg is not None and msg.payload == b"best effort" and msg.qos == 0
    mqtt_broker.stop()
    wait_until(lambda: not device.connected, what="device notices the broker is gone")
    with pytest.raises(TransportError, match="not connected"):
        device.publish(UP, b"lost", qos=0)


@needs_broker
def test_invalid_publishes_are_refused(device: MqttClient) -> None:
    with pytest.raises(TransportError):
        device.publish("fleet/v1/devices/+/up/x", b"")
    with pytest.raises(ConfigError):
        device.publish(UP, b"", qos=2)
    with pytest.raises(TransportError):
        device.publish(UP, "text")  # type: ignore[arg-type]
    assert device.stats().in_flight == 0  # refused publishes do not leak window slots


@needs_broker
def test_message_over_broker_limit_refused_locally(device: MqttClient) -> None:
    with pytest.raises(TransportError, match="at most"):
        device.publish(UP, b"x" * DEFAULT_MAX_PACKET_SIZE)
    assert device.connected and device.stats().disconnects == 0 and device.stats().in_flight == 0
    device.publish(UP, b"x" * (DEFAULT_MAX_PACKET_SIZE - 1024)).wait(WAIT)


@needs_broker
def test_broker_assigned_client_id(make_client: ClientFactory, credentials: Credentials,
                                   server: MqttClient) -> None:
    anonymous_id = make_client(credentials.device("dev-z"), client_id="")
    anonymous_id.publish(topics.device_up("dev-z", "evidence"), b"z").wait(WAIT)
    msg = server.receive(WAIT)
    assert msg is not None and msg.topic == topics.device_up("dev-z", "evidence")


@needs_broker
def test_logs_carry_no_payload_or_key(make_client: ClientFactory, credentials: Credentials,
                                      mqtt_broker: MosquittoBroker, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    tls = credentials.device("dev-a")
    client = make_client(tls, client_id="dev-a")
    client.publish(UP, b"TOP-SECRET-PAYLOAD").wait(WAIT)
    mqtt_broker.restart()  # produce disconnect / reconnect log lines too
    wait_until(lambda: client.stats().connects == 2, what="reconnect")
    client.stop()
    text = caplog.text
    assert "connected" in text  # the logger is in use
    assert "TOP-SECRET-PAYLOAD" not in text
    key_body = tls.key.read_text().splitlines()[1]
    assert key_body not in text


# -- shared subscriptions --------------------------------------------------------------------------
@needs_broker
def test_two_workers_split_a_shared_subscription(make_client: ClientFactory, credentials: Credentials,
                                                 device: MqttClient) -> None:
    workers = [make_client(credentials.server(), client_id=f"fleet-server-{i}",
                           subscriptions=topics.server_subscriptions()) for i in range(2)]
    count = 400
    for i in range(count):
        device.publish(UP, i.to_bytes(4, "big"))
    device.flush(WAIT)
    wait_until(lambda: sum(w.stats().messages_received for w in workers) >= count, what="all messages")
    shares = [[int.from_bytes(m.payload, "big") for m in drain(w, w.stats().queued)] for w in workers]
    everything = shares[0] + shares[1]
    assert len(everything) == count and sorted(everything) == list(range(count))  # none lost, none twice
    assert all(shares), [len(s) for s in shares]  # both workers did work
    assert sum(w.stats().messages_received for w in workers) == count


# -- reconnects ------------------------------------------------------------------------------------
@needs_broker
def test_broker_restart_reconnects_and_resubscribes(server: MqttClient, device: MqttClient,
                                                    mqtt_broker: MosquittoBroker) -> None:
    device.publish(UP, b"before").wait(WAIT)
    assert (msg := server.receive(WAIT)) is not None and msg.payload == b"before"
    mqtt_broker.restart()
    for client in (server, device):
        wait_until(lambda c=client: c.stats().connects == 2, what="reconnect")  # type: ignore[misc]
        client.wait_connected(WAIT)
        assert client.stats().disconnects == 1 and client.stats().connect_failures >= 0
    device.publish(UP, b"after").wait(WAIT)
    assert (msg := server.receive(WAIT)) is not None and msg.payload == b"after"
    down = topics.device_down("dev-a", "challenge")
    server.publish(down, b"nonce").wait(WAIT)
    assert (msg := device.receive(WAIT)) is not None and msg.topic == down


@needs_broker
def test_reconnect_retries_until_the_broker_is_back(server: MqttClient, mqtt_broker: MosquittoBroker) -> None:
    mqtt_broker.stop()
    wait_until(lambda: server.stats().connect_failures >= 3, what="several failed attempts")
    assert not server.connected
    mqtt_broker.restart()
    server.wait_connected(WAIT)
    assert server.stats().connects == 2


@needs_broker
def test_publishes_while_disconnected_are_sent_after_reconnect(device: MqttClient,
                                                               mqtt_broker: MosquittoBroker) -> None:
    mqtt_broker.stop()
    wait_until(lambda: not device.connected, what="disconnect")
    held = [device.publish(UP, bytes([i])) for i in range(3)]
    assert not any(h.done for h in held) and device.stats().in_flight == 3
    mqtt_broker.restart()
    for handle in held:
        handle.wait(WAIT)  # accepted by the broker (no subscriber: reason 0x10 is still a success)
        assert handle.reason_code in (0x00, 0x10)
    assert device.stats().in_flight == 0


@needs_broker
def test_publish_window_is_bounded(make_client: ClientFactory, credentials: Credentials,
                                   mqtt_broker: MosquittoBroker) -> None:
    client = make_client(credentials.device("dev-a"), client_id="dev-a", max_inflight=3)
    mqtt_broker.stop()
    wait_until(lambda: not client.connected, what="disconnect")
    held = [client.publish(UP, b"x") for _ in range(3)]
    with pytest.raises(TransportError, match="window full"):
        client.publish(UP, b"one too many", timeout=0.05)
    assert client.stats().in_flight == 3
    mqtt_broker.restart()
    client.flush(WAIT)
    assert all(h.done and h.error is None for h in held)


@needs_broker
def test_stop_fails_unacknowledged_publishes(device: MqttClient, mqtt_broker: MosquittoBroker) -> None:
    mqtt_broker.stop()
    wait_until(lambda: not device.connected, what="disconnect")
    handle = device.publish(UP, b"never sent")
    device.stop()
    with pytest.raises(TransportError, match="stopped"):
        handle.wait(WAIT)
    with pytest.raises(TransportError, match="stopped"):
        device.publish(UP, b"after stop")
    with pytest.raises(TransportError, match="stopped"):
        device.wait_connected(WAIT)
    with pytest.raises(TransportError, match="restarted"):
        device.start()


# -- inbound flow control --------------------------------------------------------------------------
@needs_broker
def test_full_inbound_queue_holds_messages_at_the_broker_and_never_blocks_publishing(
        make_client: ClientFactory, credentials: Credentials, device: MqttClient) -> None:
    """A worker that does not keep up: the broker stops at the announced Receive Maximum (the
    queue size), the network thread stays free, so the worker can still publish (a blocked network
    thread could not process the PUBACK), and later every message arrives in order."""
    worker = make_client(credentials.server(), client_id="slow-worker", queue_size=5,
                         subscriptions=topics.server_subscriptions())
    count = 40
    for i in range(count):
        device.publish(UP, i.to_bytes(4, "big"))
    device.flush(WAIT)  # the broker has them all
    wait_until(lambda: worker.stats().queued == 5, what="a full queue")
    answer = worker.publish(topics.device_down("dev-a", "result"), b"still responsive")
    answer.wait(WAIT)
    assert worker.stats().messages_received == 5  # the broker held back the other 35
    assert (msg := device.receive(WAIT)) is not None and msg.payload == b"still responsive"
    received = [int.from_bytes(m.payload, "big") for m in drain(worker, count)]
    assert received == list(range(count))


@needs_broker
def test_queued_messages_survive_a_reconnect(server: MqttClient, device: MqttClient,
                                             mqtt_broker: MosquittoBroker) -> None:
    """Messages taken in but not yet consumed are not lost when the connection drops; taking them
    afterwards must not send stale acknowledgements on the new connection."""
    for i in range(3):
        device.publish(UP, bytes([i])).wait(WAIT)
    wait_until(lambda: server.stats().queued == 3, what="queued messages")
    mqtt_broker.restart()
    server.wait_connected(WAIT)
    device.wait_connected(WAIT)
    assert [m.payload for m in drain(server, 3)] == [b"\x00", b"\x01", b"\x02"]
    for i in range(3, 6):
        device.publish(UP, bytes([i])).wait(WAIT)
    assert [m.payload for m in drain(server, 3)] == [b"\x03", b"\x04", b"\x05"]
    assert server.stats().disconnects == 1  # no protocol error on the new connection


@needs_broker
def test_consumer_threads_share_one_client(server: MqttClient, device: MqttClient) -> None:
    count = 600
    got: list[list[int]] = [[], [], []]
    done = threading.Event()

    def consume(out: list[int]) -> None:
        while not done.is_set():
            if (msg := server.receive(0.05)) is not None:
                out.append(int.from_bytes(msg.payload, "big"))

    threads = [threading.Thread(target=consume, args=(out,)) for out in got]
    for t in threads:
        t.start()
    try:
        for i in range(count):
            device.publish(UP, i.to_bytes(4, "big"))
        device.flush(WAIT)
        wait_until(lambda: sum(map(len, got)) >= count, what="all consumed")
    finally:
        done.set()
        for t in threads:
            t.join(WAIT)
    assert sorted(got[0] + got[1] + got[2]) == list(range(count))
    assert server.stats().queued == 0
