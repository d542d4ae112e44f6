"""Chunked download of one package: a small window of outstanding ``model.fetch`` requests.

The server answers each :class:`~protocol.messages.ModelFetch` with one binary ``model-chunk`` frame
(:func:`protocol.messages.decode_chunk`). Chunks are not signed: the package's integrity comes from
the SHA-256 the *signed* offer names (checked over the whole package once it is complete) and from
the package's own signed manifest, both checked by :mod:`agent.vault.store` before anything is
kept. This module therefore only makes sure the bytes land where they were asked for:

* at most ``window`` requests are outstanding, each for ``chunk`` bytes (the last one shorter);
* a chunk is accepted only if it answers an outstanding request exactly (model, version, offset,
  length, total size); anything else is ignored and counted (a duplicate, a late answer to a request
  already repeated, or garbage);
* a request unanswered for ``timeout`` seconds is sent again, at most ``max_attempts`` times.

Pure: time is a parameter, and bytes go to a ``sink(offset, data)`` the caller provides (a file).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from agent.vault import FetchError
from protocol.messages import MAX_CHUNK, ModelChunk, ModelFetch, ModelRef

__all__ = ["Download", "Sink"]

Sink = Callable[[int, bytes], None]
"""Where accepted chunk bytes go: ``sink(offset, data)``."""


@dataclass(slots=True)
class _Request:
    length: int
    sent_at: float
    attempts: int


class Download:
    """One package download. Call :meth:`requests` to get what to send now, :meth:`accept` for each
    chunk that arrives; :attr:`complete` once every byte is in."""

    def __init__(self, ref: ModelRef, sink: Sink, *, chunk: int = MAX_CHUNK, window: int = 4,
                 timeout: float = 30.0, max_attempts: int = 5) -> None:
        if not 1 <= chunk <= MAX_CHUNK:
            raise ValueError(f"chunk must be 1..{MAX_CHUNK} bytes")
        if window < 1 or timeout <= 0 or max_attempts < 1:
            raise ValueError("window and max_attempts must be positive, timeout too")
        self.ref = ref
        self._sink = sink
        self._chunk = chunk
        self._window = window
        self._timeout = timeout
        self._max_attempts = max_attempts
        self._next = 0                       # first offset never requested
        self._outstanding: dict[int, _Request] = {}
        self.received = 0                    # bytes accepted
        self.ignored = 0                     # chunks ignored (unexpected, duplicate, wrong size)

    @property
    def complete(self) -> bool:
        """True once every byte of the package was accepted."""
        return self.received == self.ref.size

    def _fetch(self, offset: int, length: int) -> ModelFetch:
        return ModelFetch(name=self.ref.name, version=self.ref.version, offset=offset, length=length)

    def requests(self, now: float) -> list[ModelFetch]:
        """The requests to send now: repeats of those unanswered for ``timeout`` seconds, then new ones
        up to the window. Raises :class:`FetchError` once a request went unanswered ``max_attempts``
        times (the server is not serving this package)."""
        out: list[ModelFetch] = []
        for offset, req in sorted(self._outstanding.items()):
            if now - req.sent_at >= self._timeout or now < req.sent_at:  # a clock step back repeats too
                if req.attempts >= self._max_attempts:
                    raise FetchError(f"model {self.ref.name} {self.ref.version}: bytes {offset}.."
                                     f"{offset + req.length} requested {req.attempts} times, no answer")
                req.attempts += 1
                req.sent_at = now
                out.append(self._fetch(offset, req.length))
        while len(self._outstanding) < self._window and self._next < self.ref.size:
            length = min(self._chunk, self.ref.size - self._next)
            self._outstanding[self._next] = _Request(length=length, sent_at=now, attempts=1)
            out.append(self._fetch(self._next, length))
            self._next += length
        return out

    def accept(self, chunk: ModelChunk) -> bool:
        """Write ``chunk`` if it answers an outstanding request exactly; False (and counted) if not."""
        ref = self.ref
        req = self._outstanding.get(chunk.offset)
        if (chunk.name != ref.name or chunk.version != ref.version or chunk.total != ref.size
                or req is None or len(chunk.data) != req.length):
            self.ignored += 1
            return False
        self._sink(chunk.offset, chunk.data)
        del self._outstanding[chunk.offset]
        self.received += req.length
        return True

    def progress(self) -> dict[str, int]:
        """Size and percentage received, in steps of 10 (for the status, which is rewritten on every
        change: exact byte counts would rewrite it for every chunk)."""
        return {"size": self.ref.size, "percent": self.received * 10 // self.ref.size * 10}
