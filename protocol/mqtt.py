"""The MQTT adapter shared by the agent and the fleet server (paho-mqtt 2.x, MQTT v5, mutual TLS).

:class:`MqttClient` owns one paho client and one network thread.  Design points:

**Reconnect with exponential backoff and jitter.**  paho's built-in reconnect (``loop_forever`` /
``loop_start`` with ``reconnect_on_failure``) waits a deterministic ``min_delay * 2**n``: after a
broker restart every device of a fleet would reconnect in lock-step.  We construct paho with
``reconnect_on_failure=False`` and run our own loop in our thread: ``reconnect()``, then
``loop()`` until the connection ends, then sleep :meth:`Backoff.delay` (exponential, capped,
"equal jitter": uniformly random in the upper half of the exponential delay), and again.  The
attempt counter resets only after a connection stayed up for :attr:`Backoff.reset_after` seconds,
so a broker that accepts and immediately drops a client cannot make it spin.  Every connection
starts clean (``clean_start=True``) and re-subscribes all filters; nothing relies on a broker session.

**Inbound: bounded queue, acknowledged on hand-over, MQTT v5 flow control.**  ``on_message`` only
copies topic, payload and a few properties into a bounded FIFO that consumers drain with
:meth:`MqttClient.receive`.  QoS 1 messages are acknowledged (PUBACK, paho ``manual_ack``) when a
consumer takes them from the queue, not when they arrive, and the CONNECT packet announces a
*Receive Maximum* equal to the queue capacity.  The broker therefore never has more unacknowledged
QoS 1 messages outstanding to us than the queue holds: a slow consumer makes the broker hold
messages back (they wait in the broker's per-client queue, Mosquitto ``max_queued_messages``),
and a message is acknowledged only once it is inside the application.  Should the queue still be
full (QoS 0 messages, which MQTT does not flow-control, or messages left from a previous
connection) the network thread blocks in ``on_message`` until a consumer makes room: no message is
dropped inside the process, and since paho stops reading the socket, TCP backpressure reaches
the broker.  Acknowledging on hand-over rather than blocking first matters for a worker that
publishes answers from the consumer thread: if the network thread were blocked on a full queue it
could not process PUBACKs, the publish window would never free, and consumer and network thread
would wait on each other.

**Outbound: bounded in-flight window.**  :meth:`MqttClient.publish` blocks while ``max_inflight``
QoS 1 messages await their PUBACK (bounded memory; bursts are paced by the broker's acknowledgements
instead of piling up in paho's queue or overrunning the broker).  QoS 1 messages published while
disconnected are held (within the window) and sent after the next connect.  The returned
:class:`PublishHandle` tells whether the broker accepted the message: with MQTT v5 Mosquitto
answers a publish its ACL denies with PUBACK reason code 0x87 (Not authorized).  QoS 0 is best
effort: it needs a live connection and completes when written to the socket.  Messages larger than
the broker's advertised *Maximum Packet Size* are refused locally (the broker would disconnect us).

Threading: paho is driven only by our network thread, except ``publish``/``subscribe``/``ack`` calls
from other threads, which paho queues; we register an ``on_socket_register_write`` hook so that
paho never writes to the TLS socket from a caller's thread.  Errors are :class:`TransportError`
(:class:`ConfigError` for unusable TLS files).  Logs carry host, port, client id and reason codes,
never payloads or key material.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import random
import socket
import ssl
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from protocol.errors import ConfigError, TransportError

log = logging.getLogger(__name__)

NETWORK_WAIT = 1.0
"""Longest the network thread sleeps in ``select()`` when nothing happens.  Traffic, publishes and
acknowledgements from other threads (paho writes to its wake-up socket pair) and :meth:`MqttClient.stop`
end the wait at once, so this only bounds idle wake-ups (keepalive is checked at least this often)."""

MAX_MID_WINDOW = 65535 // 2
"""Upper bound for windows and queues: MQTT packet ids are 16-bit and must not wrap while in use."""


# -- configuration values --------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class TlsFiles:
    """Files of a mutual-TLS client: the CA that signed the broker, and this client's cert and key."""

    ca_cert: Path
    cert: Path
    key: Path

    def context(self) -> ssl.SSLContext:
        """A TLS >= 1.2 client context that verifies the broker's certificate and host name/IP."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED + check_hostname
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_verify_locations(cafile=str(self.ca_cert))
            ctx.load_cert_chain(str(self.cert), str(self.key))
        except (OSError, ssl.SSLError, ValueError) as exc:
            # Name the files, not their content; the key path is not a secret, its bytes are.
            raise ConfigError(f"cannot load MQTT TLS files (CA {self.ca_cert}, cert {self.cert}): "
                              f"{getattr(exc, 'strerror', None) or exc}") from None
        return ctx


@dataclass(frozen=True, slots=True)
class Backoff:
    """Reconnect delays: exponential growth, a cap, and jitter.

    ``delay(n)`` is uniform in ``[d/2, d]`` with ``d = min(maximum, initial * factor**n)``
    ("equal jitter"): random enough that a fleet spreads out after a broker restart, never shorter
    than half the exponential delay so that retries still back off.
    """

    initial: float = 0.5
    maximum: float = 30.0
    factor: float = 2.0
    reset_after: float = 10.0
    """A connection that lasted at least this long resets the attempt counter."""

    def __post_init__(self) -> None:
        if not (0 < self.initial <= self.maximum) or self.factor < 1 or self.reset_after < 0:
            raise ConfigError("invalid backoff: need 0 < initial <= maximum, factor >= 1, reset_after >= 0")

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Seconds to wait before reconnect attempt number ``attempt`` (0-based)."""
        # Cap the exponent first so that large attempt counts cannot overflow a float.
        exponent = min(max(attempt, 0), 64)
        ceiling = min(self.maximum, self.initial * self.factor ** exponent)
        return rng.uniform(ceiling / 2, ceiling)


@dataclass(frozen=True, slots=True)
class InboundMessage:
    """A message received from the broker, as handed to consumers."""

    topic: str
    payload: bytes
    qos: int
    retain: bool = False
    correlation_data: bytes | None = None
    response_topic: str | None = None
    user_properties: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class MqttStats:
    """A snapshot of a client's counters."""

    connects: int
    """Connections the broker accepted (CONNACK success)."""
    disconnects: int
    """Accepted connections that ended (broker gone, network error, our own stop)."""
    connect_failures: int
    """Attempts that ended without an accepted CONNACK (refused TCP, TLS failure, CONNACK error)."""
    messages_received: int
    messages_published: int
    """QoS 1 messages the broker acknowledged with a success code, plus QoS 0 messages written."""
    publish_refused: int
    """QoS 1 messages the broker answered with a failure reason code (e.g. 0x87 Not authorized)."""
    subscriptions_refused: int
    queued: int
    """Messages waiting in the inbound queue right now."""
    in_flight: int
    """Publishes awaiting acknowledgement right now."""


@dataclass(slots=True)
class _Counters:
    connects: int = 0
    disconnects: int = 0
    connect_failures: int = 0
    messages_received: int = 0
    messages_published: int = 0
    publish_refused: int = 0
    subscriptions_refused: int = 0


@dataclass(slots=True)
class _Queued:
    message: InboundMessage
    mid: int
    qos: int
    generation: int


@dataclass(slots=True)
class _Connection:
    """State of the current connection attempt (reset before each attempt)."""

    accepted: bool = False
    accepted_at: float = 0.0
    refused: str | None = None
    pending_subacks: dict[int, list[str]] = field(default_factory=dict)


class PublishHandle:
    """The outcome of one :meth:`MqttClient.publish`.

    :meth:`wait` blocks until the broker acknowledged the message (QoS 1) or it was written (QoS 0)
    and raises :class:`TransportError` if the broker refused it, the client stopped first, or the
    timeout passed.
    """

    __slots__ = ("_done", "_error", "_event", "_reason", "mid", "qos", "topic")

    def __init__(self, mid: int, qos: int, topic: str) -> None:
        self.mid = mid
        self.qos = qos
        self.topic = topic
        # The Event is made only if someone waits: a worker publishes hundreds of QoS 0 replies a
        # second and never waits on them, and an Event (a Condition and two locks) costs more than
        # the rest of the handle.
        self._done = False
        self._event: threading.Event | None = None
        self._reason: int | None = None
        self._error: str | None = None

    @property
    def done(self) -> bool:
        """True once the outcome is known (acknowledged, refused, or lost)."""
        return self._done

    @property
    def reason_code(self) -> int | None:
        """The PUBACK reason code (0 success, 0x10 no matching subscribers, >= 0x80 refused)."""
        return self._reason

    @property
    def error(self) -> str | None:
        """Why the message was not accepted, once known; ``None`` if it was."""
        return self._error

    def wait(self, timeout: float | None = None) -> None:
        """Wait for the outcome; raise :class:`TransportError` unless the broker accepted it."""
        if not self._done:
            with _HANDLE_LOCK:
                if self._event is None:
                    self._event = threading.Event()
                event = self._event
            # _resolve sets _done and reads _event under the same lock: either it saw this Event
            # (and sets it) or _done is already true here.
            if not self._done and not event.wait(timeout):
                raise TransportError(f"no acknowledgement for the message to {self.topic} within {timeout}s")
        if self._error is not None:
            raise TransportError(self._error)

    def _resolve(self, reason: int | None, error: str | None) -> None:
        with _HANDLE_LOCK:
            if self._done:
                return
            self._reason, self._error = reason, error
            self._done = True
            event = self._event
        if event is not None:
            event.set()


_HANDLE_LOCK = threading.Lock()
"""Guards the lazy Event of every :class:`PublishHandle` (held for a few instructions only)."""


def _noop_register_write(client: paho.Client, userdata: Any, sock: Any) -> None:
    """Presence of this hook stops paho from writing to the socket from publishers' threads."""


def _no_delay(client: paho.Client, userdata: Any, sock: Any) -> None:
    """Turn Nagle's algorithm off on a new connection (paho leaves it on).  MQTT packets are small
    and a client often writes two in a row (a PUBACK then a PUBLISH, a PUBLISH split by TLS): with
    Nagle the second waits for the broker's delayed ACK, about 40 ms per exchange on Linux."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS verification of the broker failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or exc}"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {exc}"


def _varint_len(n: int) -> int:
    size = 1
    while n >= 128:
        n //= 128
        size += 1
    return size


def _publish_packet_size(topic: str, payload: bytes, qos: int, props: Properties | None) -> int:
    """Size of the MQTT v5 PUBLISH packet paho will send (MQTT 5.0 section 3.3)."""
    props_len = len(props.pack()) if props is not None else 1
    remaining = 2 + len(topic.encode()) + (2 if qos else 0) + props_len + len(payload)
    return 1 + _varint_len(remaining) + remaining


# -- the client ------------------------------------------------------------------------------------
class MqttClient:
    """One MQTT v5 connection over mutual TLS, kept up by its own thread (see the module docstring).

    ``subscriptions`` are (re)subscribed on every connect with QoS ``subscription_qos``; more can be
    added with :meth:`subscribe`.  ``queue_size`` bounds the inbound queue (and is announced as the
    MQTT v5 Receive Maximum); ``max_inflight`` bounds unacknowledged publishes and must not exceed
    the broker's receive maximum (Mosquitto ``max_inflight_messages``).  ``rng`` drives the
    reconnect jitter (pass a seeded one for reproducible tests).

    Use as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(self, host: str, port: int, tls: TlsFiles, *, client_id: str = "",
                 subscriptions: Iterable[str] = (), subscription_qos: int = 1, queue_size: int = 1000,
                 max_inflight: int = 64, keepalive: int = 30, connect_timeout: float = 10.0,
                 backoff: Backoff | None = None, rng: random.Random | None = None) -> None:
        if not 1 <= queue_size <= MAX_MID_WINDOW or not 1 <= max_inflight <= MAX_MID_WINDOW:
            raise ConfigError(f"queue_size and max_inflight must be between 1 and {MAX_MID_WINDOW}")
        if subscription_qos not in (0, 1):
            raise ConfigError("subscription QoS must be 0 or 1")
        self.host = host
        self.port = int(port)
        self.client_id = client_id
        self._label = f"{client_id or '<broker-assigned id>'}@{host}:{port}"
        self._backoff = backoff or Backoff()
        self._rng = rng or random.Random()
        self._subscription_qos = subscription_qos
        self._subscriptions: dict[str, int] = {}
        for topic_filter in subscriptions:
            self._subscriptions[topic_filter] = subscription_qos

        self._client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id,
                                   protocol=paho.MQTTv5, reconnect_on_failure=False, manual_ack=True)
        self._client.tls_set_context(tls.context())
        self._client.connect_timeout = connect_timeout
        self._client.max_inflight_messages = max_inflight
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._client.on_publish = self._on_publish
        self._client.on_socket_register_write = _noop_register_write
        self._client.on_socket_open = _no_delay
        connect_props = Properties(PacketTypes.CONNECT)
        connect_props.ReceiveMaximum = queue_size  # MQTT 5.0 section 3.1.2.11.3: inbound flow control
        connect_props.SessionExpiryInterval = 0
        self._client.connect_async(host, self.port, keepalive, clean_start=True, properties=connect_props)

        # Inbound queue and connection generation, under one lock (PUBACKs go out in queue order).
        self._queue: collections.deque[_Queued] = collections.deque()
        self._queue_size = queue_size
        self._queue_cond = threading.Condition()
        self._generation = 0

        # Outbound window.
        self._max_inflight = max_inflight
        self._window = max_inflight
        self._pub_cond = threading.Condition()
        self._pending: dict[int, PublishHandle] = {}
        self._early_acks: dict[int, tuple[int, str | None]] = {}
        self._outstanding = 0
        self._max_packet: int | None = None

        self._counters = _Counters()
        self._conn = _Connection()
        self._connected = False
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._closed = False
        self._last_error: str | None = None
        self._refused_subscriptions: dict[str, str] = {}
        self._sub_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> MqttClient:
        """Start the network thread; it connects, and reconnects until :meth:`stop`."""
        if self._closed:
            raise TransportError("an MqttClient cannot be restarted after stop(); create a new one")
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"mqtt-{self.client_id or 'client'}",
                                            daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Disconnect cleanly, end the network thread, and fail publishes still awaiting an ack.

        Messages still in the inbound queue stay readable with :meth:`receive`.
        """
        self._stopping.set()
        with self._queue_cond:
            self._queue_cond.notify_all()  # a network thread blocked on a full queue gives up
        self._wake_network_thread()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                log.warning("mqtt %s: network thread did not end within %.0fs", self._label, timeout)
        with self._pub_cond:
            self._closed = True
            pending, self._pending = self._pending, {}
            self._early_acks.clear()
            self._outstanding = 0
            self._pub_cond.notify_all()
        for handle in pending.values():
            handle._resolve(None, f"client stopped before the message to {handle.topic} was acknowledged")
        self._ready.clear()
        self._connected = False

    def __enter__(self) -> MqttClient:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- state -------------------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        """True while a connection is accepted by the broker."""
        return self._connected

    @property
    def last_error(self) -> str | None:
        """The most recent connection problem, for diagnostics."""
        return self._last_error

    @property
    def refused_subscriptions(self) -> dict[str, str]:
        """Filters the broker refused on the latest connection, with the reason."""
        return dict(self._refused_subscriptions)

    def stats(self) -> MqttStats:
        """Current counters."""
        c = self._counters
        return MqttStats(connects=c.connects, disconnects=c.disconnects, connect_failures=c.connect_failures,
                         messages_received=c.messages_received, messages_published=c.messages_published,
                         publish_refused=c.publish_refused, subscriptions_refused=c.subscriptions_refused,
                         queued=len(self._queue), in_flight=self._outstanding)

    def wait_connected(self, timeout: float) -> None:
        """Wait until connected and every subscription is acknowledged.

        Raises :class:`TransportError` on timeout (with the last connection error) or if the broker
        refused a subscription.
        """
        if self._thread is None:
            raise TransportError("MqttClient.start() was not called")
        if self._closed:
            raise TransportError("MqttClient is stopped")
        if not self._ready.wait(timeout):
            detail = f": {self._last_error}" if self._last_error else ""
            raise TransportError(f"not connected to {self.host}:{self.port} within {timeout}s{detail}")
        refused = self._refused_subscriptions
        if refused:
            first = next(iter(refused.items()))
            raise TransportError(f"broker refused subscription {first[0]}: {first[1]}")

    # -- subscribing -------------------------------------------------------------------------------
    def subscribe(self, topic_filter: str, qos: int | None = None) -> None:
        """Add a subscription: sent now if connected, and again on every reconnect."""
        qos = self._subscription_qos if qos is None else qos
        if qos not in (0, 1):
            raise ConfigError("subscription QoS must be 0 or 1")
        self._subscriptions[topic_filter] = qos
        if self._connected:
            self._ready.clear()
            self._send_subscribe([topic_filter])

    def _send_subscribe(self, filters: list[str]) -> None:
        if not filters:
            return
        request = [(f, SubscribeOptions(qos=self._subscriptions[f])) for f in filters]
        # Under the lock until the mid is registered: the SUBACK may otherwise be handled first.
        with self._sub_lock:
            try:
                rc, mid = self._client.subscribe(request)
            except ValueError as exc:
                raise TransportError(f"invalid subscription: {exc}") from None
            if rc != paho.MQTT_ERR_SUCCESS or mid is None:
                log.info("mqtt %s: subscribe not sent (%s); will retry on reconnect", self._label,
                         paho.error_string(rc))
                return
            self._conn.pending_subacks[mid] = filters

    # -- receiving ---------------------------------------------------------------------------------
    def receive(self, timeout: float | None = None) -> InboundMessage | None:
        """The next inbound message, or ``None`` if none arrives within ``timeout`` seconds.

        Taking a QoS 1 message acknowledges it to the broker (see the module docstring).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._queue_cond:
            while not self._queue:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._queue_cond.wait(remaining)
            entry = self._queue.popleft()
            self._queue_cond.notify_all()
            # Acknowledge under the queue lock: PUBACKs leave in the order messages arrived
            # (MQTT 5.0 section 4.6), and never for a message of an earlier connection, whose
            # packet id may already name another message on the current one.
            if entry.qos > 0 and entry.generation == self._generation:
                self._client.ack(entry.mid, entry.qos)
        return entry.message

    # -- publishing --------------------------------------------------------------------------------
    def publish(self, topic: str, payload: bytes, qos: int = 1, *, retain: bool = False,
                correlation_data: bytes | None = None, response_topic: str | None = None,
                user_properties: Iterable[tuple[str, str]] = (),
                timeout: float | None = 30.0) -> PublishHandle:
        """Publish ``payload`` to ``topic``; blocks while the in-flight window is full.

        Returns a :class:`PublishHandle`; call ``wait()`` on it to learn whether the broker accepted
        the message.  Raises :class:`TransportError` if the window stays full for ``timeout``
        seconds, the client is stopped, the message exceeds the broker's maximum packet size, or
        (QoS 0) there is no connection.
        """
        if qos not in (0, 1):
            raise ConfigError("publish QoS must be 0 or 1")
        if not isinstance(payload, bytes | bytearray):
            raise TransportError(f"payload must be bytes, not {type(payload).__name__}")
        props = self._publish_properties(correlation_data, response_topic, user_properties)
        limit = self._max_packet
        if limit is not None:
            size = _publish_packet_size(topic, payload, qos, props)
            if size > limit:
                raise TransportError(f"message to {topic} is {size} bytes; "
                                     f"the broker accepts at most {limit}")
        if qos == 0:
            return self._publish_qos0(topic, bytes(payload), retain, props)

        with self._pub_cond:
            if not self._pub_cond.wait_for(lambda: self._closed or self._outstanding < self._window, timeout):
                raise TransportError(f"publish window full ({self._window} messages unacknowledged "
                                     f"for {timeout}s) at {self._label}")
            if self._closed:
                raise TransportError("MqttClient is stopped")
            self._outstanding += 1
        try:
            info = self._client.publish(topic, bytes(payload), 1, retain, props)
        except (ValueError, TypeError) as exc:
            self._release_slot()
            raise TransportError(f"invalid publish to {topic[:120]!r}: {exc}") from None
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):  # NO_CONN: held until reconnect
            self._release_slot()
            raise TransportError(f"publish to {topic} failed: {paho.error_string(info.rc)}")
        handle = PublishHandle(info.mid, 1, topic)
        with self._pub_cond:
            # The PUBACK may have been processed before we got here: on_publish parked it.
            early = self._early_acks.pop(info.mid, None)
            if early is None:
                if self._closed:
                    early = (-1, "client stopped before the message was acknowledged")
                else:
                    self._pending[info.mid] = handle
            if early is not None:
                self._outstanding -= 1
                self._pub_cond.notify_all()
        if early is not None:
            handle._resolve(early[0] if early[0] >= 0 else None, early[1])
        return handle

    def _publish_qos0(self, topic: str, payload: bytes, retain: bool, props: Properties | None
                      ) -> PublishHandle:
        if not self._connected:
            raise TransportError(f"not connected: QoS 0 message to {topic} not sent")
        # Holding the lock across paho's publish is safe for QoS 0 (paho takes no lock that its
        # network thread holds while calling on_publish), and makes registration atomic with it.
        with self._pub_cond:
            if self._closed:
                raise TransportError("MqttClient is stopped")
            try:
                info = self._client.publish(topic, payload, 0, retain, props)
            except (ValueError, TypeError) as exc:
                raise TransportError(f"invalid publish to {topic[:120]!r}: {exc}") from None
            if info.rc != paho.MQTT_ERR_SUCCESS:
                raise TransportError(f"QoS 0 message to {topic} not sent: {paho.error_string(info.rc)}")
            handle = PublishHandle(info.mid, 0, topic)
            self._pending[info.mid] = handle
        return handle

    @staticmethod
    def _publish_properties(correlation_data: bytes | None, response_topic: str | None,
                            user_properties: Iterable[tuple[str, str]]) -> Properties | None:
        user = [(str(k), str(v)) for k, v in user_properties]
        if correlation_data is None and response_topic is None and not user:
            return None
        props = Properties(PacketTypes.PUBLISH)
        if correlation_data is not None:
            props.CorrelationData = bytes(correlation_data)
        if response_topic is not None:
            props.ResponseTopic = response_topic
        if user:
            props.UserProperty = user
        return props

    def _release_slot(self) -> None:
        with self._pub_cond:
            self._outstanding -= 1
            self._pub_cond.notify_all()

    def flush(self, timeout: float | None = 30.0) -> None:
        """Wait until every QoS 1 publish so far has its outcome; :class:`TransportError` on timeout."""
        with self._pub_cond:
            ok = self._pub_cond.wait_for(lambda: self._outstanding == 0 or self._closed, timeout)
        if not ok:
            raise TransportError(f"{self._outstanding} messages still unacknowledged after {timeout}s")

    # -- network thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        attempt = 0
        while not self._stopping.is_set():
            self._fail_unwritten_qos0()
            with self._queue_cond:
                self._generation += 1  # before reconnect(): stale acks are dropped from now on
            self._conn = _Connection()
            try:
                self._client.reconnect()
            except (OSError, ValueError) as exc:  # ssl.SSLError and socket errors are OSErrors
                self._note_failure(_describe(exc))
            else:
                self._serve()
                if not self._conn.accepted and not self._stopping.is_set():
                    self._note_failure(self._conn.refused or "connection closed before CONNACK "
                                       "(certificate refused or broker unavailable)")
            if self._stopping.is_set():
                break
            if self._conn.accepted and time.monotonic() - self._conn.accepted_at >= self._backoff.reset_after:
                attempt = 0
            delay = self._backoff.delay(attempt, self._rng)
            attempt += 1
            log.info("mqtt %s: reconnecting in %.2fs (attempt %d)", self._label, delay, attempt)
            self._stopping.wait(delay)
        self._fail_unwritten_qos0()

    def _serve(self) -> None:
        """Drive paho until this connection ends; on stop, send DISCONNECT and let it flush briefly."""
        disconnect_deadline: float | None = None
        while True:
            if self._stopping.is_set() and disconnect_deadline is None:
                self._client.disconnect()
                disconnect_deadline = time.monotonic() + 2.0
            rc = self._client.loop(timeout=NETWORK_WAIT)
            if rc != paho.MQTT_ERR_SUCCESS:
                return
            if disconnect_deadline is not None and time.monotonic() > disconnect_deadline:
                sock = self._client.socket()
                if sock is not None:
                    sock.close()  # the broker did not take our DISCONNECT: drop the connection
                return

    def _wake_network_thread(self) -> None:
        """End the network thread's ``select()`` now, the way paho's own publish() does: one byte on
        its wake-up socket pair (absent between connections; then the thread is not in select)."""
        pair = getattr(self._client, "_sockpairW", None)
        if pair is not None:
            with contextlib.suppress(OSError):  # closed by the network thread meanwhile: it is awake
                pair.send(b"0")

    def _note_failure(self, reason: str) -> None:
        self._counters.connect_failures += 1
        self._last_error = reason
        log.warning("mqtt %s: connection failed: %s", self._label, reason)

    def _fail_unwritten_qos0(self) -> None:
        """QoS 0 packets not yet written when a connection ends are dropped by paho: fail their handles."""
        with self._pub_cond:
            lost = [mid for mid, h in self._pending.items() if h.qos == 0]
            handles = [self._pending.pop(mid) for mid in lost]
        for handle in handles:
            handle._resolve(None, f"connection lost before the QoS 0 message to {handle.topic} was sent")

    # -- paho callbacks (network thread: decode, count, enqueue; nothing slow) ----------------------
    def _on_connect(self, client: paho.Client, userdata: Any, flags: paho.ConnectFlags,
                    reason_code: ReasonCode, properties: Properties | None) -> None:
        if reason_code.is_failure:
            self._conn.refused = f"broker refused the connection: {reason_code} (0x{reason_code.value:02x})"
            return
        self._conn.accepted = True
        self._conn.accepted_at = time.monotonic()
        self._counters.connects += 1
        self._last_error = None
        self._refused_subscriptions = {}
        receive_max = getattr(properties, "ReceiveMaximum", None) if properties is not None else None
        self._max_packet = getattr(properties, "MaximumPacketSize", None) if properties is not None else None
        with self._pub_cond:
            self._window = min(self._max_inflight, receive_max or self._max_inflight)
            self._pub_cond.notify_all()
        if receive_max is not None and receive_max < self._max_inflight:
            log.warning("mqtt %s: broker receive maximum %d is below max_inflight %d", self._label,
                        receive_max, self._max_inflight)
        self._connected = True
        log.info("mqtt %s: connected", self._label)
        self._send_subscribe(list(self._subscriptions))
        with self._sub_lock:
            if not self._conn.pending_subacks:
                self._ready.set()

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: paho.DisconnectFlags,
                       reason_code: ReasonCode, properties: Properties | None) -> None:
        self._ready.clear()
        was_connected, self._connected = self._connected, False
        if was_connected:
            self._counters.disconnects += 1
            if not self._stopping.is_set():
                self._last_error = f"disconnected: {reason_code}"
            log.info("mqtt %s: disconnected (%s)", self._label, reason_code)
        elif reason_code.is_failure and self._conn.refused is None:
            self._conn.refused = f"connection closed before CONNACK: {reason_code}"

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int,
                      reason_codes: list[ReasonCode], properties: Properties | None) -> None:
        with self._sub_lock:
            filters = self._conn.pending_subacks.pop(mid, [])
            all_acknowledged = not self._conn.pending_subacks
        for topic_filter, rc in zip(filters, reason_codes, strict=False):
            if rc.is_failure:
                self._counters.subscriptions_refused += 1
                self._refused_subscriptions[topic_filter] = f"{rc} (0x{rc.value:02x})"
                log.warning("mqtt %s: subscription %s refused: %s", self._label, topic_filter, rc)
        if all_acknowledged and self._connected:
            self._ready.set()

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        props = message.properties
        try:
            topic = message.topic
            inbound = InboundMessage(
                topic=topic, payload=bytes(message.payload), qos=message.qos, retain=bool(message.retain),
                correlation_data=getattr(props, "CorrelationData", None),
                response_topic=getattr(props, "ResponseTopic", None),
                user_properties=tuple((str(k), str(v)) for k, v in getattr(props, "UserProperty", ()) or ()),
            )
        except (UnicodeDecodeError, TypeError, ValueError):
            # The broker validates UTF-8 topics, so this is a broken broker; acknowledge and drop.
            log.warning("mqtt %s: dropped a message with an undecodable topic or properties", self._label)
            if message.qos > 0:
                client.ack(message.mid, message.qos)
            return
        with self._queue_cond:
            while len(self._queue) >= self._queue_size:
                if self._stopping.is_set():
                    # Not acknowledged: with QoS 1 the broker still owns it (and redelivers to a
                    # session that resumes; our sessions are clean, so the sender must retry).
                    log.warning("mqtt %s: stopping with a full queue; a message was not taken", self._label)
                    return
                self._queue_cond.wait(0.5)  # consumers make room; TCP backpressure meanwhile
            self._queue.append(_Queued(inbound, message.mid, message.qos, self._generation))
            self._counters.messages_received += 1
            self._queue_cond.notify_all()

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason_code: ReasonCode,
                    properties: Properties | None) -> None:
        refused = reason_code.is_failure
        with self._pub_cond:
            handle = self._pending.pop(mid, None)
            if handle is None:
                # Acknowledged before publish() registered the mid (QoS 1 only: QoS 0 registers
                # under this lock).  publish() collects it.
                self._early_acks[mid] = (reason_code.value, f"broker refused the publish: {reason_code} "
                                         f"(0x{reason_code.value:02x})" if refused else None)
                if refused:
                    self._counters.publish_refused += 1
                else:
                    self._counters.messages_published += 1
                return
            if handle.qos > 0:
                self._outstanding -= 1
                self._pub_cond.notify_all()
        if refused:
            self._counters.publish_refused += 1
            handle._resolve(reason_code.value, f"broker refused the publish to {handle.topic}: {reason_code} "
                            f"(0x{reason_code.value:02x})")
        else:
            self._counters.messages_published += 1
            handle._resolve(reason_code.value, None)
