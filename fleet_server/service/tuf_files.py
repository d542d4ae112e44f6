"""The update repository over MQTT: ``tuf-fetch`` requests answered with ``tuf-chunk`` frames.

Devices behind NAT reach neither the console's HTTP server nor anything else but the broker, so
they fetch the files of the update repository (the same files ``/updates/metadata/...`` and
``/updates/targets/...`` serve over HTTP) through their own MQTT subtree:

* up ``fleet/v1/devices/<id>/up/tuf-fetch`` (:class:`~protocol.messages.TufFetch`, plain like every
  device message: the broker authenticated the device's certificate and its ACL lets it write only
  its own subtree): bytes ``[offset, offset + length)`` of repository file ``path``
  (:data:`~protocol.messages.TUF_PATH_RE`);
* down ``fleet/v1/devices/<id>/down/tuf-chunk`` (binary :class:`~protocol.messages.TufChunk`
  frame, unsigned: TUF verifies every byte): the answer, to the requesting device only.

Answers: ``ok`` with at most :data:`~protocol.messages.MAX_CHUNK` bytes (never more than the
request's ``length``); ``not_found`` for a file the repository does not have, or when the worker
has no repository configured; ``error`` for an offset past the end of the file, an unreadable
repository, or a device whose state does not allow updates.

Which devices may fetch: every admitted device that is not held by an administrator, that is
``enrolled``, ``trusted``, ``untrusted`` and ``unreachable``. An *untrusted* device must be able to
update: installing a good release is how a device with outdated firmware becomes trusted again,
and the repository is public anyway (served over HTTP without login; its integrity comes from TUF
signatures, not from who may read it). ``pending`` (not yet approved), ``revoked`` and
``quarantined`` devices get ``error``: an administrator's hold covers updates too. A device id
without a row gets no answer.

No per-device rate limit (``model-fetch`` has none either): a request costs one read of a cached or
small file and one publish to the requesting device's own topic, and the agent keeps one request
outstanding at a time. Repository files are read
through the small :class:`RepositoryFiles` interface (any
:class:`~fleet_server.updates.targets.TargetStore` satisfies it); targets (consistent snapshot
names ``targets/.../<sha256>.<name>``, when the bytes match that digest) are kept in a bounded
per-worker cache, so a large target is not read again for every chunk.

Like the rest of the worker: every refusal is counted under ``rejected.<reason>`` and logged as one
``message_rejected`` line; no exception escapes :meth:`TufFileService.handle`.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import logging
import re
from collections.abc import Sequence
from typing import Protocol

from fleet_server.service.common import Counters, Outgoing, log_event
from fleet_server.storage.models import DeviceState
from fleet_server.storage.repo import Repository
from protocol import topics
from protocol.errors import EdgeError
from protocol.messages import (
    MAX_CHUNK,
    MAX_PLAIN_MESSAGE,
    Envelope,
    Message,
    TufChunk,
    TufFetch,
    encode_tuf_chunk,
)

log = logging.getLogger(__name__)

KIND_TUF_FETCH = "tuf-fetch"
DOWN_TUF_CHUNK = "tuf-chunk"
TUF_KINDS: dict[str, tuple[type[Message], int]] = {KIND_TUF_FETCH: (TufFetch, MAX_PLAIN_MESSAGE)}
"""Device -> server kinds handled here, with the size limit of their payload."""

UPDATE_STATES: frozenset[str] = frozenset({
    DeviceState.ENROLLED, DeviceState.TRUSTED, DeviceState.UNTRUSTED, DeviceState.UNREACHABLE,
})
"""Device states in which the repository is served (see the module docstring)."""

CACHE_BYTES = 128 * 1024 * 1024
"""Default budget of the per-worker cache of immutable repository files."""

# Hash-prefixed target names (consistent snapshots) name their content.
_HASHED_RE = re.compile(r"^targets/(?:.+/)?([0-9a-f]{64})\.[^/]+$")


class RepositoryFiles(Protocol):
    """What the worker needs of the update repository: its served files (``TargetStore.read_file``)."""

    def read_file(self, path: str) -> bytes | None:
        """A file of the served repository (``metadata/...`` or ``targets/...``), or None."""
        ...


class InboundLike(Protocol):
    """What the handler reads of a parsed inbound message (the processor's ``Inbound``)."""

    @property
    def identity(self) -> str: ...
    @property
    def device_id(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def envelope(self) -> Envelope: ...


class _FileCache:
    """Immutable repository files, least recently used first out, bounded in total bytes."""

    def __init__(self, budget: int) -> None:
        self._budget = budget
        self._used = 0
        self._files: collections.OrderedDict[str, bytes] = collections.OrderedDict()

    def get(self, path: str) -> bytes | None:
        data = self._files.get(path)
        if data is not None:
            self._files.move_to_end(path)
        return data

    def put(self, path: str, data: bytes) -> None:
        if len(data) > self._budget or path in self._files:
            return
        self._files[path] = data
        self._used += len(data)
        while self._used > self._budget:
            _, old = self._files.popitem(last=False)
            self._used -= len(old)


def _cacheable(path: str, data: bytes) -> bool:
    """Targets whose bytes match the SHA-256 in their name (a file changed on disk is served as it is
    now, for TUF to refuse, not kept). Metadata is small and read every time: a role's version may be
    rewritten with more signatures while it waits for its threshold."""
    hashed = _HASHED_RE.match(path)
    return hashed is not None and hmac.compare_digest(hashlib.sha256(data).hexdigest(), hashed.group(1))


class TufFileService:
    """Serves the update repository's files to devices (see the module docstring). Called from the
    worker's processing thread only (the processor serialises its batches)."""

    def __init__(self, repo: Repository, counters: Counters, files: RepositoryFiles | None, *,
                 cache_bytes: int = CACHE_BYTES) -> None:
        self.repo = repo
        self.counters = counters
        self.files = files
        self._cache = _FileCache(cache_bytes)

    def handle(self, items: Sequence[InboundLike], now: int) -> list[Outgoing]:
        """Answer ``tuf-fetch`` messages (one read transaction for the device states). Never raises."""
        try:
            return self._handle(items)
        except Exception as exc:  # last resort: nothing escapes a worker's batch
            self.counters.add("rejected.internal_error", len(items))
            log.error("%s", f"event=tuf_batch_failed messages={len(items)} error={type(exc).__name__}",
                      exc_info=True)
            return []

    def _handle(self, items: Sequence[InboundLike]) -> list[Outgoing]:
        with self.repo.models.reading("checking update downloads") as tx:
            trust = tx.device_trust([i.device_id for i in items])
        out: list[Outgoing] = []
        for item in items:
            fetch = item.envelope.message
            assert isinstance(fetch, TufFetch)
            found = trust.get(item.device_id)
            if found is None:
                self._reject(item, "device_unknown", f"no device {item.device_id}")
                continue
            state = found[0]
            if state not in UPDATE_STATES:
                self._reject(item, "device_held", f"device {item.device_id} is {state}: no updates")
                out.append(self._frame(item.device_id, fetch, "error"))
                continue
            out.append(self._answer(item, fetch))
        return out

    def _answer(self, item: InboundLike, fetch: TufFetch) -> Outgoing:
        try:
            data = self._read(fetch.path)
        except EdgeError as exc:
            log_event(log, logging.ERROR, "update_repository_unreadable", path=fetch.path,
                      error=exc.diagnostics())
            self._reject(item, "tuf_unreadable", f"repository file {fetch.path} is unreadable")
            return self._frame(item.device_id, fetch, "error")
        if data is None:
            self.counters.add("tuf.not_found")
            return self._frame(item.device_id, fetch, "not_found")
        if fetch.offset >= len(data) and not (fetch.offset == 0 and not data):
            self._reject(item, "fetch_out_of_range", f"offset {fetch.offset} is past the end of the "
                                                     f"{len(data)}-byte file {fetch.path}")
            return self._frame(item.device_id, fetch, "error")
        part = data[fetch.offset : fetch.offset + min(fetch.length, MAX_CHUNK)]
        self.counters.add("tuf.chunks_sent")
        self.counters.add("tuf.bytes_sent", len(part))
        return self._frame(item.device_id, fetch, "ok", total=len(data), data=part)

    def _read(self, path: str) -> bytes | None:
        if self.files is None:
            return None
        cached = self._cache.get(path)
        if cached is not None:
            return cached
        data = self.files.read_file(path)
        if data is not None and _cacheable(path, data):
            self._cache.put(path, data)
        return data

    @staticmethod
    def _frame(device_id: str, fetch: TufFetch, status: str, *, total: int = 0,
               data: bytes = b"") -> Outgoing:
        # A refusal carries offset 0, total 0 and no data (decode_tuf_chunk's range check).
        offset = fetch.offset if status == "ok" else 0
        frame = encode_tuf_chunk(TufChunk(request_id=fetch.request_id, path=fetch.path, status=status,
                                          offset=offset, total=total, data=data))
        return Outgoing(topics.device_down(device_id, DOWN_TUF_CHUNK), frame, "tuf.chunk")

    def _reject(self, item: InboundLike, reason: str, detail: str) -> None:
        self.counters.add(f"rejected.{reason}")
        log_event(log, logging.WARNING, "message_rejected", reason=reason, identity=item.identity,
                  kind=item.kind, msg_id=item.envelope.id, detail=detail)
