"""Rate limits, quotas and their rollback-protected counter state (pure: time is a parameter).

* :class:`TokenBucket` / :class:`RateLimiter`: per-client request rate (``rate`` per second,
  ``burst`` at most). A clock that steps backwards refills nothing (fail closed) and never locks a
  client out.
* :class:`QuotaLedger`: samples served per lease (device-wide; the fleet server grants a quota with
  each lease), per UTC day device-wide, and per UTC day per client. The day is ``floor(now / 86400)``
  of the injected wall clock; counters reset only when the day moves *forward*, so setting the clock
  back gains nothing.
* :class:`CounterState`: the ledger's persistent form, MACed, with a ``generation`` tied to a TPM NV
  counter (TPM2_NT_COUNTER, which only increases) so an old state file cannot be replayed to win
  back quota. The agent's protocol (see docs/model-package.md, "Counters"):

  1. save: ``state = advance_generation(ledger.snapshot(), nv_counter=NV)``; write
     ``state.to_bytes(mac)`` atomically (temp file + ``os.replace``); then TPM2_NV_Increment, so
     NV == state.generation.
  2. load: ``state = CounterState.from_bytes(data, mac)``; ``check_generation(state, nv_counter=NV)``
     (refuses with :class:`~agent.inference.RollbackError` if older than NV); if the state is one ahead
     (a crash between write and increment) increment NV once to catch up.

None of these classes lock; :class:`~agent.inference.guard.InferenceGuard` serialises access.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable
from dataclasses import dataclass, replace

from agent.inference import QuotaExceeded, RateLimited, RollbackError
from protocol.encoding import canonical_bytes, decode_object
from protocol.errors import MessageError
from protocol.messages import Fields

__all__ = [
    "SECONDS_PER_DAY",
    "CounterState",
    "QuotaLedger",
    "RateLimiter",
    "TokenBucket",
    "advance_generation",
    "check_generation",
    "hmac_sha256",
    "utc_day",
]

SECONDS_PER_DAY = 86_400
MAC_SIZE = 32
MAX_STATE_CLIENTS = 4096
MAX_STATE_SIZE = 256 * 1024
CLIENT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:+-]{0,63}$")
LEASE_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{0,64}$")
_STATE_CONTEXT = b"edge-attest/inference-counters/v1\x00"

Mac = Callable[[bytes], bytes]


def utc_day(now: float) -> int:
    """Days since 1970-01-01 UTC of the wall-clock time ``now`` (seconds since the epoch)."""
    return int(now // SECONDS_PER_DAY)


# --------------------------------------------------------------------------------------------------
# rate limiting
# --------------------------------------------------------------------------------------------------
@dataclass(slots=True)
class TokenBucket:
    """A token bucket: ``rate`` tokens per second up to ``burst``; each request takes one token."""

    rate: float
    burst: float
    tokens: float
    updated: float

    @classmethod
    def full(cls, rate: float, burst: float, now: float) -> TokenBucket:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        return cls(rate=rate, burst=burst, tokens=burst, updated=now)

    def take(self, now: float, cost: float = 1.0) -> float:
        """Take ``cost`` tokens if available and return 0.0; otherwise take none and return the
        seconds until enough will have accrued."""
        elapsed = now - self.updated
        if elapsed > 0:
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
        self.updated = now  # a backwards step refills nothing and rebases, so no lock-out either
        if self.tokens >= cost:
            self.tokens -= cost
            return 0.0
        return (cost - self.tokens) / self.rate


class RateLimiter:
    """One :class:`TokenBucket` per client, created full on first use."""

    __slots__ = ("_buckets",)

    def __init__(self) -> None:
        self._buckets: dict[str, TokenBucket] = {}

    def check(self, client_id: str, *, rate: float, burst: float, now: float) -> None:
        """Take one token for ``client_id`` or raise :class:`~agent.inference.RateLimited`."""
        bucket = self._buckets.get(client_id)
        if bucket is None or bucket.rate != rate or bucket.burst != burst:
            bucket = self._buckets[client_id] = TokenBucket.full(rate, burst, now)
        wait = bucket.take(now)
        if wait:
            raise RateLimited(f"client {client_id} exceeded {rate:g} requests/s (burst {burst:g}); "
                              f"retry in {wait:.3f} s", retry_after=wait)

    def forget(self, client_id: str) -> None:
        self._buckets.pop(client_id, None)


# --------------------------------------------------------------------------------------------------
# persistent counter state
# --------------------------------------------------------------------------------------------------
def hmac_sha256(key: bytes) -> Mac:
    """A MAC function for :meth:`CounterState.to_bytes` from a key the agent unsealed from its TPM.

    (An HMAC key held inside the TPM, used through TPM2_HMAC, fits the same ``Mac`` signature.)
    """
    if len(key) < 16:
        raise ValueError("MAC key must be at least 16 bytes")
    return lambda data: hmac.new(key, data, hashlib.sha256).digest()


@dataclass(frozen=True, slots=True)
class CounterState:
    """The ledger's persistent form. ``generation`` is compared with the TPM NV counter on load.

    ``clients`` holds ``(client_id, samples used today)`` pairs, sorted by client id.
    """

    generation: int
    day: int
    day_used: int = 0
    lease_id: str = ""
    lease_used: int = 0
    clients: tuple[tuple[str, int], ...] = ()

    @classmethod
    def initial(cls, *, nv_counter: int, now: float) -> CounterState:
        """The first state of a device: generation equal to the freshly defined NV counter (which the
        TPM initialises to the highest value any counter ever had, not to zero)."""
        return cls(generation=nv_counter, day=utc_day(now))

    def to_bytes(self, mac: Mac) -> bytes:
        """Canonical JSON followed by a 32-byte MAC over a context string and that JSON."""
        body = canonical_bytes({
            "v": 1, "generation": self.generation, "day": self.day, "day_used": self.day_used,
            "lease_id": self.lease_id, "lease_used": self.lease_used,
            "clients": {cid: n for cid, n in self.clients},
        })
        tag = mac(_STATE_CONTEXT + body)
        if len(tag) != MAC_SIZE:
            raise ValueError("MAC must be 32 bytes")
        return body + tag

    @classmethod
    def from_bytes(cls, data: bytes, mac: Mac) -> CounterState:
        """Verify the MAC, then parse strictly. Raises :class:`~agent.inference.RollbackError` for a bad
        MAC (a forged or foreign state is as untrustworthy as an old one) and ``MessageError`` for
        malformed bytes under a good MAC."""
        if not MAC_SIZE < len(data) <= MAX_STATE_SIZE:
            raise RollbackError(f"counter state of {len(data)} bytes is out of bounds")
        body, tag = bytes(data[:-MAC_SIZE]), bytes(data[-MAC_SIZE:])
        if not hmac.compare_digest(mac(_STATE_CONTEXT + body), tag):
            raise RollbackError("counter state MAC does not verify: the state file was altered or is foreign")
        f = Fields(decode_object(body, max_size=MAX_STATE_SIZE), "counters")
        if f.integer("v", hi=1000) != 1:
            raise MessageError("counters: unsupported version")
        generation = f.integer("generation")
        day = f.integer("day", hi=10**7)
        day_used = f.integer("day_used")
        lease_id = f.text("lease_id", max_len=64, pattern=LEASE_ID_RE)
        lease_used = f.integer("lease_used")
        raw = f.raw("clients")
        f.done()
        if not isinstance(raw, dict) or len(raw) > MAX_STATE_CLIENTS:
            raise MessageError(f"counters.clients: expected an object of at most {MAX_STATE_CLIENTS} clients")
        clients: list[tuple[str, int]] = []
        for cid, n in raw.items():
            if not CLIENT_ID_RE.fullmatch(cid) or not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise MessageError("counters.clients: invalid entry")
            clients.append((cid, n))
        return cls(generation=generation, day=day, day_used=day_used, lease_id=lease_id,
                   lease_used=lease_used, clients=tuple(sorted(clients)))


def advance_generation(state: CounterState, *, nv_counter: int) -> CounterState:
    """The state to write next: generation ``nv_counter + 1`` (the NV value after the increment that
    follows the write). Refuses a state that is already behind the NV counter."""
    check_generation(state, nv_counter=nv_counter)
    return replace(state, generation=nv_counter + 1)


def check_generation(state: CounterState, *, nv_counter: int) -> None:
    """Accept a loaded state only if its generation is the NV counter's value or one ahead of it
    (written, then the device stopped before the increment). Older: a replayed state file."""
    if state.generation < nv_counter:
        raise RollbackError(f"counter state generation {state.generation} is older than the TPM NV "
                            f"counter {nv_counter}: an old state file was restored")
    if state.generation > nv_counter + 1:
        raise RollbackError(f"counter state generation {state.generation} is ahead of the TPM NV "
                            f"counter {nv_counter} by more than one save: not this TPM's state")


# --------------------------------------------------------------------------------------------------
# quotas
# --------------------------------------------------------------------------------------------------
class QuotaLedger:
    """In-memory quota counters (samples served) with a :class:`CounterState` snapshot.

    ``lease_quota``: samples per lease (``None``: unlimited); ``device_daily_quota``: samples per UTC
    day for the whole device; per-client daily quotas are passed with each call.
    """

    __slots__ = ("_clients", "_day", "_day_used", "_generation", "_lease_id", "_lease_used",
                 "device_daily_quota", "lease_quota")

    def __init__(self, state: CounterState, *, lease_quota: int | None = None,
                 device_daily_quota: int | None = None) -> None:
        self._generation = state.generation
        self._day = state.day
        self._day_used = state.day_used
        self._lease_id = state.lease_id
        self._lease_used = state.lease_used
        self._clients: dict[str, int] = dict(state.clients)
        self.lease_quota = lease_quota
        self.device_daily_quota = device_daily_quota

    @property
    def lease_id(self) -> str:
        return self._lease_id

    def set_lease(self, lease_id: str, quota: int | None) -> None:
        """Start counting against a lease. A new lease id starts from zero; the same id (e.g. after a
        restart, restored from the counter state) keeps its count."""
        if not LEASE_ID_RE.fullmatch(lease_id):
            raise ValueError("invalid lease id")
        if lease_id != self._lease_id:
            self._lease_id = lease_id
            self._lease_used = 0
        self.lease_quota = quota

    def _roll(self, now: float) -> None:
        day = utc_day(now)
        if day > self._day:  # only forwards: a clock set back keeps today's counts
            self._day = day
            self._day_used = 0
            self._clients.clear()

    def check(self, client_id: str, client_daily_quota: int | None, now: float, rows: int = 1) -> None:
        """Raise :class:`~agent.inference.QuotaExceeded` unless ``rows`` more samples fit every quota."""
        self._roll(now)
        if self.lease_quota is not None and self._lease_used + rows > self.lease_quota:
            raise QuotaExceeded(f"lease quota exhausted: {self._lease_used} of {self.lease_quota} samples "
                                f"used, {rows} requested")
        if self.device_daily_quota is not None and self._day_used + rows > self.device_daily_quota:
            raise QuotaExceeded(f"device daily quota exhausted: {self._day_used} of "
                                f"{self.device_daily_quota} samples used today (UTC), {rows} requested")
        if client_daily_quota is not None:
            used = self._clients.get(client_id, 0)
            if used + rows > client_daily_quota:
                raise QuotaExceeded(f"daily quota of client {client_id} exhausted: {used} of "
                                    f"{client_daily_quota} samples used today (UTC), {rows} requested")

    def charge(self, client_id: str, client_daily_quota: int | None, rows: int, now: float) -> None:
        """Check, then count ``rows`` samples against every quota (all or nothing)."""
        self.check(client_id, client_daily_quota, now, rows)
        self._lease_used += rows
        self._day_used += rows
        self._clients[client_id] = self._clients.get(client_id, 0) + rows

    def used(self, client_id: str | None = None) -> int:
        """Samples used today by ``client_id`` (or by the whole device when ``None``)."""
        return self._day_used if client_id is None else self._clients.get(client_id, 0)

    @property
    def lease_used(self) -> int:
        return self._lease_used

    def snapshot(self) -> CounterState:
        """The current counters as a :class:`CounterState` (generation as loaded or last saved)."""
        return CounterState(generation=self._generation, day=self._day, day_used=self._day_used,
                            lease_id=self._lease_id, lease_used=self._lease_used,
                            clients=tuple(sorted(self._clients.items())))

    def saved(self, state: CounterState) -> None:
        """Record that ``state`` (from :func:`advance_generation`) was written."""
        self._generation = max(self._generation, state.generation)
