"""Model-extraction monitoring in the spirit of PRADA (Juuti et al., "PRADA: Protecting Against
DNN Model Stealing Attacks", EuroS&P 2019).

Idea: a client's *natural* queries are independent samples of the problem's input distribution,
so the distance from each new query to the nearest of the client's earlier queries behaves like a
smooth, roughly normal quantity. Extraction attacks synthesise queries (perturbations around seed
samples, Jacobian-based augmentation, line and grid searches along decision boundaries), whose
nearest-neighbour distances cluster at a few step sizes with occasional jumps: far from normal.
PRADA tests the distance sample with the Shapiro-Wilk statistic ``W`` and raises an alarm when
``W`` drops below a threshold ``delta`` once enough queries were seen.

Differences from the paper, chosen for a device with bounded memory:

* the reference set is the client's last ``window`` queries (a ring buffer), not all queries ever,
  and the tested sample is the last ``history`` distances;
* PRADA keeps one reference set per predicted class; here there is one per client (the monitor
  runs before output hardening and must not depend on it);
* a query of more than ``features`` values is mapped to ``features`` dimensions by a count sketch
  (random bucket and sign per coordinate; distances preserved in expectation), so memory does not
  grow with the input size; smaller queries are used as they are (distances exact).

``W`` and its p-value use Royston's approximation (Royston 1992/1995, algorithm AS R94, valid for
3 <= n <= 5000), implemented with numpy and :class:`statistics.NormalDist`. The alarm is latched
until :meth:`ExtractionMonitor.reset`. :meth:`ExtractionMonitor.report` feeds the agent's telemetry.
"""

from __future__ import annotations

import functools
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

__all__ = ["ClientStats", "ExtractionMonitor", "MonitorPolicy", "shapiro_wilk"]

_NORMAL = NormalDist()

# Royston (1992) polynomial coefficients, as in AS R94 (swilk.c).
_C1 = (0.0, 0.221157, -0.147981, -2.071190, 4.434685, -2.706056)
_C2 = (0.0, 0.042981, -0.293762, -1.752461, 5.682633, -3.582633)
_C3 = (0.5440, -0.39978, 0.025054, -6.714e-4)
_C4 = (1.3822, -0.77857, 0.062767, -0.0020322)
_C5 = (-1.5861, -0.31082, -0.083751, 0.0038915)
_C6 = (-0.4803, -0.082676, 0.0030302)
_G = (-2.273, 0.459)


def _poly(coefficients: tuple[float, ...], x: float) -> float:
    return sum(c * x**i for i, c in enumerate(coefficients))


@functools.lru_cache(maxsize=64)
def _coefficients(n: int) -> np.ndarray:
    """Shapiro-Wilk coefficients ``a`` for a sample of ``n`` (antisymmetric, unit norm)."""
    if n == 3:
        return np.array([-math.sqrt(0.5), 0.0, math.sqrt(0.5)])
    m = np.array([_NORMAL.inv_cdf((i - 0.375) / (n + 0.25)) for i in range(1, n + 1)])
    ssq = float(m @ m)
    u = 1.0 / math.sqrt(n)
    an = m[-1] / math.sqrt(ssq) + _poly(_C1, u)
    if n > 5:
        an1 = m[-2] / math.sqrt(ssq) + _poly(_C2, u)
        phi = (ssq - 2 * m[-1] ** 2 - 2 * m[-2] ** 2) / (1 - 2 * an**2 - 2 * an1**2)
        a = m / math.sqrt(phi)
        a[-1], a[-2], a[0], a[1] = an, an1, -an, -an1
    else:
        phi = (ssq - 2 * m[-1] ** 2) / (1 - 2 * an**2)
        a = m / math.sqrt(phi)
        a[-1], a[0] = an, -an
    a.setflags(write=False)
    return a


def shapiro_wilk(sample: np.ndarray) -> tuple[float, float]:
    """Shapiro-Wilk ``(W, p)`` for 3..5000 values (Royston's approximation).

    ``W`` near 1 is consistent with a normal sample; small ``W`` (small ``p``) is not. A sample
    with no spread at all is as non-normal as it gets: ``(0.0, 0.0)``.
    """
    x = np.sort(np.asarray(sample, dtype=np.float64).ravel())
    n = x.size
    if not 3 <= n <= 5000:
        raise ValueError("shapiro_wilk needs 3..5000 values")
    if not np.isfinite(x).all():
        raise ValueError("shapiro_wilk needs finite values")
    if x[-1] - x[0] <= 1e-9 * max(abs(x[0]), abs(x[-1])):
        # no spread beyond rounding noise (e.g. a line search with a fixed step): not a natural sample
        return 0.0, 0.0
    centred = x - x.mean()
    ss = float(centred @ centred)
    w = min(1.0, float(_coefficients(n) @ x) ** 2 / ss)
    if n == 3:
        p = 6 / math.pi * (math.asin(math.sqrt(w)) - math.asin(math.sqrt(0.75)))
        return w, min(1.0, max(0.0, p))
    if w >= 1.0:
        return w, 1.0
    y = math.log(1.0 - w)
    if n <= 11:
        gamma = _poly(_G, n)
        if y >= gamma:
            return w, 0.0
        y = -math.log(gamma - y)
        mu, sigma = _poly(_C3, n), math.exp(_poly(_C4, n))
    else:
        ln = math.log(n)
        mu, sigma = _poly(_C5, ln), math.exp(_poly(_C6, ln))
    return w, 0.5 * math.erfc((y - mu) / sigma / math.sqrt(2))


@dataclass(frozen=True, slots=True)
class MonitorPolicy:
    """Tuning of the extraction monitor (PRADA's ``delta`` is ``threshold``).

    ``window``: recent queries per client the distances are taken to; ``warmup``: queries a
    client must have made before distances count (the first ones are far from everything);
    ``history``: distances per client in the tested sample; ``min_queries``: distances needed
    before any verdict; ``test_every``: distances between two tests; ``batch``: queries buffered
    per client before they are processed together (one vectorised pass instead of one per query);
    ``features``: bound on the per-query dimension (count sketch above it).
    """

    window: int = 256
    warmup: int = 64
    history: int = 512
    min_queries: int = 100
    threshold: float = 0.90
    test_every: int = 32
    batch: int = 32
    features: int = 64
    max_clients: int = 256
    seed: int = 0x5EED

    def __post_init__(self) -> None:
        if not 2 <= self.window <= 65_536 or not 3 <= self.history <= 5000:
            raise ValueError("window must be 2..65536 and history 3..5000")
        if not 1 <= self.warmup <= self.window:
            raise ValueError("warmup must be 1..window")
        if not 3 <= self.min_queries <= self.history:
            raise ValueError("min_queries must be 3..history")
        if not 0.0 < self.threshold < 1.0 or min(self.test_every, self.batch, self.features,
                                                 self.max_clients) < 1:
            raise ValueError("threshold must be in (0, 1); test_every, batch, features, max_clients positive")


@dataclass(frozen=True, slots=True)
class ClientStats:
    """One client's extraction statistics, as reported in telemetry."""

    client_id: str
    queries: int
    distances: int
    w: float | None
    p_value: float | None
    mean_distance: float | None
    alarm: bool

    def to_json(self) -> dict[str, object]:
        return {"client": self.client_id, "queries": self.queries, "distances": self.distances,
                "w": None if self.w is None else round(self.w, 4),
                "p": None if self.p_value is None else float(f"{self.p_value:.3g}"),
                "mean_distance": None if self.mean_distance is None else float(f"{self.mean_distance:.4g}"),
                "alarm": self.alarm}


class _Client:
    """One client's state: recent queries (ring, chronological from ``q_pos``), recent distances
    (ring), counters, the last test, the alarm, and queries not processed yet."""

    __slots__ = ("alarm", "d_count", "d_pos", "distances", "p", "pending", "pending_rows", "q_count",
                 "q_pos", "queries", "seen", "since_test", "w", "width")

    def __init__(self, policy: MonitorPolicy, width: int) -> None:
        self.width = width
        self.queries = np.zeros((policy.window, width), dtype=np.float64)
        self.q_count = 0
        self.q_pos = 0
        self.distances = np.zeros(policy.history, dtype=np.float64)
        self.d_count = 0
        self.d_pos = 0
        self.seen = 0
        self.since_test = 0
        self.w: float | None = None
        self.p: float | None = None
        self.alarm = False
        self.pending: list[np.ndarray] = []
        self.pending_rows = 0


class _Sketch:
    """Count sketch of ``dim`` coordinates into ``features`` buckets (fixed by the policy's seed)."""

    __slots__ = ("_order", "_signs", "_starts")

    def __init__(self, dim: int, features: int, seed: int) -> None:
        rng = np.random.default_rng([seed, dim])
        buckets = rng.integers(0, features, size=dim)
        self._signs = rng.choice(np.array([-1.0, 1.0]), size=dim)
        order = np.argsort(buckets, kind="stable")
        self._order = order
        self._starts = np.searchsorted(buckets[order], np.arange(features))

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        signed = (rows * self._signs)[:, self._order]
        starts = self._starts
        out = np.zeros((rows.shape[0], starts.size))
        # reduceat needs strictly usable start indices; empty buckets stay zero
        valid = np.flatnonzero(np.diff(np.append(starts, signed.shape[1])) > 0)
        if valid.size:
            out[:, valid] = np.add.reduceat(signed, starts[valid], axis=1)
        return out


class ExtractionMonitor:
    """Per-client nearest-neighbour distance statistics with a Shapiro-Wilk alarm. Thread-safe.

    :meth:`observe` (what the guard calls per request) only files the queries under the client;
    every ``batch`` queries, and before any read (:meth:`stats`, :meth:`report`, :meth:`alarm`
    excepted), the filed queries are processed in one vectorised pass. This keeps the per-request
    cost to a list append; the alarm trails the queries by less than ``batch`` queries. The result
    is the same as processing each query on arrival.
    """

    def __init__(self, policy: MonitorPolicy | None = None) -> None:
        self.policy = policy or MonitorPolicy()
        self._clients: OrderedDict[str, _Client] = OrderedDict()
        self._sketches: dict[int, _Sketch] = {}
        self._lock = threading.Lock()

    def _features(self, batch: np.ndarray) -> np.ndarray:
        rows = batch.reshape(batch.shape[0], -1) if batch.ndim >= 2 else batch.reshape(1, -1)
        dim, features = rows.shape[1], self.policy.features
        if dim <= features:
            return rows.astype(np.float64)
        sketch = self._sketches.get(dim)
        if sketch is None:
            if len(self._sketches) >= 8:
                self._sketches.clear()
            sketch = self._sketches[dim] = _Sketch(dim, features, self.policy.seed)
        return sketch(rows)

    def observe(self, client_id: str, batch: np.ndarray) -> None:
        """Record one request's queries: ``batch`` is ``[rows, ...]``, one query per row (a 1-D
        array is one query). The monitor keeps its own copy."""
        feats = self._features(np.asarray(batch))  # always a new float64 array
        policy = self.policy
        with self._lock:
            client = self._clients.get(client_id)
            if client is not None and client.width != feats.shape[1]:
                client = None  # the query size changed (dynamic input dims): start over for this client
            if client is None:
                if client_id not in self._clients and len(self._clients) >= policy.max_clients:
                    self._clients.popitem(last=False)  # least recently active client goes first
                client = self._clients[client_id] = _Client(policy, feats.shape[1])
            self._clients.move_to_end(client_id)
            client.pending.append(feats)
            client.pending_rows += feats.shape[0]
            if client.pending_rows >= policy.batch:
                self._process(client)

    def _process(self, client: _Client) -> None:
        """Process the pending queries, at most ``batch`` rows per pass (bounds the temporaries)."""
        if not client.pending:
            return
        rows = client.pending[0] if len(client.pending) == 1 else np.concatenate(client.pending)
        client.pending = []
        client.pending_rows = 0
        step = self.policy.batch
        for start in range(0, rows.shape[0], step):
            self._process_rows(client, rows[start:start + step])

    def _process_rows(self, client: _Client, rows: np.ndarray) -> None:
        """Distances of ``rows`` to their predecessors in one vectorised pass, then the test."""
        policy = self.policy
        window = policy.window
        b, n = rows.shape[0], client.q_count
        # reference sequence: the stored queries oldest first, then the new ones
        old = client.queries[:n] if n < window else np.roll(client.queries, -client.q_pos, axis=0)
        seq = np.concatenate((old, rows)) if n else rows
        # row j (at position n + j) sees positions [max(0, n + j - window), n + j): the same window
        # it would have seen had it been processed on arrival
        pos = np.arange(n, n + b)[:, np.newaxis]
        idx = np.arange(n + b)[np.newaxis, :]
        visible = (idx < pos) & (idx >= pos - window)
        seen_before = np.minimum(np.arange(n, n + b), window)
        counted = seen_before >= policy.warmup
        if counted.any():
            # |a - b|^2 = |a|^2 + |b|^2 - 2 a.b: one small matrix product for the whole batch. The
            # rounding error (~1e-16 |a|^2) is far below any step an extraction attack uses.
            sq = np.einsum("ij,ij->i", seq, seq)
            sub = seq[n:][counted]
            d2 = sq[n:][counted][:, np.newaxis] + sq[np.newaxis, :] - 2.0 * (sub @ seq.T)
            np.maximum(d2, 0.0, out=d2)
            d2[~visible[counted]] = np.inf
            self._record(client, np.sqrt(d2.min(axis=1)))
        # store the new queries (only the last `window` matter)
        keep = rows[-window:]
        m = keep.shape[0]
        at = (client.q_pos + np.arange(m)) % window
        client.queries[at] = keep
        client.q_pos = (client.q_pos + m) % window
        client.q_count = min(n + b, window)
        client.seen += b

    def _record(self, client: _Client, new: np.ndarray) -> None:
        """Append distances to the ring, testing exactly where one-at-a-time processing would: after
        the distance that brings ``since_test`` to ``test_every`` (once ``min_queries`` are in)."""
        policy = self.policy
        size = client.distances.size
        i = 0
        while i < new.size:
            room = policy.test_every - client.since_test
            if client.d_count < policy.min_queries:
                room = max(room, policy.min_queries - client.d_count)
            part = new[i:i + max(1, room)]
            i += part.size
            at = (client.d_pos + np.arange(part.size)) % size
            client.distances[at[-size:]] = part[-size:]
            client.d_pos = (client.d_pos + part.size) % size
            client.d_count = min(client.d_count + part.size, size)
            client.since_test += part.size
            if client.d_count >= policy.min_queries and client.since_test >= policy.test_every:
                client.since_test = 0
                client.w, client.p = shapiro_wilk(client.distances[:client.d_count])
                if client.w < policy.threshold:
                    client.alarm = True

    def flush(self) -> None:
        """Process every client's pending queries now."""
        with self._lock:
            for client in self._clients.values():
                self._process(client)

    def alarm(self, client_id: str) -> bool:
        """Whether ``client_id``'s alarm is raised (cheap, for the request path; may trail the
        latest ``batch`` queries)."""
        client = self._clients.get(client_id)
        return client is not None and client.alarm

    def _stats(self, client_id: str, client: _Client) -> ClientStats:
        self._process(client)
        d = client.distances[:client.d_count]
        return ClientStats(client_id=client_id, queries=client.seen, distances=client.d_count, w=client.w,
                           p_value=client.p, mean_distance=float(d.mean()) if d.size else None,
                           alarm=client.alarm)

    def stats(self, client_id: str) -> ClientStats:
        """Statistics of one client (all empty for a client not seen)."""
        with self._lock:
            client = self._clients.get(client_id)
            if client is None:
                return ClientStats(client_id, 0, 0, None, None, None, False)
            return self._stats(client_id, client)

    def report(self) -> dict[str, ClientStats]:
        """Statistics of every tracked client, for telemetry."""
        with self._lock:
            return {cid: self._stats(cid, c) for cid, c in self._clients.items()}

    def alarmed(self) -> list[str]:
        """Clients whose alarm is raised."""
        with self._lock:
            for client in self._clients.values():
                self._process(client)
            return [cid for cid, c in self._clients.items() if c.alarm]

    def reset(self, client_id: str) -> None:
        """Forget a client (after an operator cleared its alarm, or revoked it)."""
        with self._lock:
            self._clients.pop(client_id, None)
