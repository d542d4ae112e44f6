"""python-tuf's transport over the agent's MQTT connection: ``tuf-fetch`` up, ``tuf-chunk`` down.

A device behind NAT reaches only the broker, so :class:`MqttFetcher` (a
:class:`tuf.ngclient.FetcherInterface`) turns every URL ngclient asks for into chunk requests on the
device's own subtree (``fleet/v1/devices/<id>/up/tuf-fetch``, :class:`~protocol.messages.TufFetch`)
and yields the bytes of the answers (``.../down/tuf-chunk``, :class:`~protocol.messages.TufChunk`
frames). Nothing is trusted here: ngclient checks lengths, hashes, signatures, versions and expiry
of what this yields.

* URLs: :data:`METADATA_BASE_URL` + ``<name>`` is repository file ``metadata/<name>``,
  :data:`TARGET_BASE_URL` + ``<path>`` is ``targets/<path>``; anything else, or a path that does not
  match :data:`~protocol.messages.TUF_PATH_RE`, is a :class:`~tuf.api.exceptions.DownloadError`.
* One chunk is requested at a time, and the next only when ngclient takes the previous one: ngclient
  stops iterating as soon as more bytes than the file's allowed length arrived
  (:meth:`FetcherInterface.download_file`), so a too-long file costs at most one chunk more.
* A chunk is accepted only if it answers the outstanding request (request id, path, offset, at most
  the length asked for, the total size seen so far); anything else (late answers to a repeated
  request, another download's chunks, garbage) is ignored and counted.
* A request unanswered for ``timeout`` seconds is sent again with a new request id, at most
  ``attempts`` times; then :class:`~tuf.api.exceptions.SlowRetrievalError`.
* ``not_found`` is :class:`~tuf.api.exceptions.DownloadHTTPError` with status 404 (how ngclient
  learns that no newer root exists), ``error`` a :class:`~tuf.api.exceptions.DownloadError`.

The fetcher does not read the MQTT client: whoever owns the receive loop (the agent's main loop)
hands every ``tuf-chunk`` payload to :meth:`MqttFetcher.deliver`.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from tuf.api.exceptions import DownloadError, DownloadHTTPError, SlowRetrievalError
from tuf.ngclient import FetcherInterface

from protocol import topics
from protocol.errors import EdgeError
from protocol.messages import (
    MAX_CHUNK,
    TUF_PATH_RE,
    TufChunk,
    TufFetch,
    decode_tuf_chunk,
    encode_plain,
    new_message_id,
)

__all__ = ["CHUNK_KIND", "FETCH_KIND", "METADATA_BASE_URL", "TARGET_BASE_URL", "MqttFetcher", "Publisher"]

FETCH_KIND = "tuf-fetch"
CHUNK_KIND = "tuf-chunk"
BASE_URL = "mqtt://fleet/"
METADATA_BASE_URL = BASE_URL + "metadata/"
"""``metadata_base_url`` of an ngclient ``Updater`` using :class:`MqttFetcher`."""
TARGET_BASE_URL = BASE_URL + "targets/"
"""``target_base_url`` of an ngclient ``Updater`` using :class:`MqttFetcher`."""

MAX_FILE_SIZE = 8 << 30
"""Largest repository file the fetcher accepts the announced size of (ngclient's limits are lower)."""
PENDING_CHUNKS = 64
FETCHED_KEPT = 256


class Publisher(Protocol):
    """What the fetcher needs of the MQTT client (:class:`protocol.mqtt.MqttClient` is one)."""

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> Any: ...


class MqttFetcher(FetcherInterface):
    """ngclient transport over MQTT (see the module docstring).

    ``client`` publishes the requests; ``device_id`` names the subtree. ``chunk``: bytes per request;
    ``timeout``: seconds to wait for an answer before asking again; ``attempts``: requests per chunk
    before giving up. ``clock`` (monotonic seconds) is only read for the timeouts, ``wall_clock``
    (seconds since the epoch) for the requests' timestamps.
    """

    def __init__(self, client: Publisher, device_id: str, *, chunk: int = MAX_CHUNK, timeout: float = 10.0,
                 attempts: int = 3, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        if not 1 <= chunk <= MAX_CHUNK:
            raise ValueError(f"chunk must be 1..{MAX_CHUNK} bytes")
        if timeout <= 0 or attempts < 1:
            raise ValueError("timeout and attempts must be positive")
        self._client = client
        self._topic = topics.device_up(device_id, FETCH_KIND)
        self._chunk = chunk
        self._timeout = timeout
        self._attempts = attempts
        self._clock = clock
        self._wall_clock = wall_clock
        self._inbox: queue.Queue[TufChunk] = queue.Queue(PENDING_CHUNKS)
        self._lock = threading.Lock()
        self.requests = 0
        """Chunk requests published."""
        self.ignored = 0
        """Frames dropped: undecodable, answering no outstanding request, or over the inbox bound."""
        self.fetched: collections.deque[str] = collections.deque(maxlen=FETCHED_KEPT)
        """Repository paths of the latest downloads started, oldest first (for status and tests)."""

    # -- the receive side --------------------------------------------------------------------------
    def deliver(self, payload: bytes) -> None:
        """A ``tuf-chunk`` frame arrived (thread-safe; unverified bytes, matched by :meth:`_fetch`)."""
        try:
            chunk = decode_tuf_chunk(payload)
            self._inbox.put_nowait(chunk)
        except (EdgeError, queue.Full):
            self._ignore()

    def _ignore(self) -> None:
        with self._lock:
            self.ignored += 1

    # -- FetcherInterface ----------------------------------------------------------------------------
    def _fetch(self, url: str) -> Iterator[bytes]:
        path = repository_path(url)  # raises before the download starts
        return self._chunks(url, path)

    def _chunks(self, url: str, path: str) -> Iterator[bytes]:
        self.fetched.append(path)
        self._drain()
        offset, total = 0, None
        while total is None or offset < total:
            length = self._chunk if total is None else min(self._chunk, total - offset)
            chunk = self._request(url, path, offset, length, total)
            if total is None:
                if chunk.total > MAX_FILE_SIZE:
                    raise DownloadError(f"{url}: the server announced {chunk.total} bytes")
                total = chunk.total
            if not chunk.data and offset < total:
                raise DownloadError(f"{url}: empty chunk at offset {offset} of {total}")
            offset += len(chunk.data)
            if chunk.data:
                yield chunk.data

    def _request(self, url: str, path: str, offset: int, length: int, total: int | None) -> TufChunk:
        """Ask for one chunk (repeated on timeout) and return the answer that matches it."""
        for _ in range(self._attempts):
            request_id = new_message_id()
            message = TufFetch(request_id=request_id, path=path, offset=offset, length=length)
            try:
                self._client.publish(self._topic, encode_plain(message, ts=int(self._wall_clock() * 1000)), 1)
            except EdgeError as exc:
                raise DownloadError(f"{url}: cannot send the request: {exc.diagnostics()}") from None
            self.requests += 1
            answer = self._await(request_id, path, offset, length, total)
            if answer is None:
                continue
            if answer.status == "not_found":
                raise DownloadHTTPError(f"{url}: not in the update repository", 404)
            if answer.status != "ok":
                raise DownloadError(f"{url}: the server refused the request")
            return answer
        raise SlowRetrievalError(f"{url}: no answer for bytes from {offset} after {self._attempts} "
                                 f"requests of {self._timeout:g} s")

    def _await(self, request_id: str, path: str, offset: int, length: int,
               total: int | None) -> TufChunk | None:
        deadline = self._clock() + self._timeout
        while True:
            left = deadline - self._clock()
            if left <= 0:
                return None
            try:
                chunk = self._inbox.get(timeout=left)
            except queue.Empty:
                return None
            if chunk.request_id != request_id or chunk.path != path:
                self._ignore()
                continue
            moved = (chunk.offset != offset or len(chunk.data) > length
                     or (total is not None and chunk.total != total))
            if chunk.status == "ok" and moved:
                self._ignore()  # answers our id but not our question: not the bytes asked for
                continue
            return chunk

    def _drain(self) -> None:
        """Drop frames left over from an earlier download (their requests are no longer outstanding)."""
        while True:
            try:
                self._inbox.get_nowait()
            except queue.Empty:
                return
            self._ignore()


def repository_path(url: str) -> str:
    """The repository file (``metadata/...`` / ``targets/...``) of an ngclient URL, or DownloadError."""
    if not url.startswith(BASE_URL):
        raise DownloadError(f"{url[:120]!r} is not a URL of the update repository ({BASE_URL}...)")
    path = url[len(BASE_URL):]
    if TUF_PATH_RE.fullmatch(path) is None or ".." in path.split("/"):
        raise DownloadError(f"{url[:120]!r} names no file the update repository can serve")
    return path
