"""The inference guard: every request to the model goes through one fixed pipeline.

Per request, in this order (each refusal is a typed :class:`~agent.inference.InferenceRefused`):

1. **authentication** - bearer token -> SHA-256 -> registered client (``Unauthenticated``, 401);
   the client must be allowed this model (``Forbidden``, 403);
2. **model lock** - no session, or the lease expired (``ModelLocked``, 423);
3. **rate limit** - the client's token bucket (``RateLimited``, 429);
4. **quota check** - lease, device-daily and client-daily quotas have room (``QuotaExceeded``, 403);
5. **input validation** - against the manifest's io signature and the policy's bounds
   (``InvalidInput``, 400); invalid requests consume no quota and never reach the model;
6. **quota charge** - one unit per sample (row of the batch), all quotas at once;
7. **extraction monitor** - the queries are filed for the monitor (processed in batches; optionally
   the client is refused once its alarm is raised);
8. **inference**; 9. **output hardening**; 10. **audit** - one record for every request, refused or
   served: client, time, outcome, input shapes, rows, latency. Never input or output data.

Unauthenticated requests touch no counter. ``lock()`` (lease expiry, revocation) drops the session
and makes every later request fail with ``ModelLocked`` until ``unlock(runtime)``; requests already
inside the model finish. Thread-safe: the counters are updated under one lock, the model runs
outside it.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.inference import (
    Forbidden,
    InferenceRefused,
    InvalidInput,
    ModelLocked,
    Unauthenticated,
)
from agent.inference.harden import OutputPolicy, harden
from agent.inference.limits import CLIENT_ID_RE, CounterState, QuotaLedger, RateLimiter
from agent.inference.monitor import ExtractionMonitor
from agent.inference.runtime import Runtime
from agent.inference.validate import InputLimits, InputValidator
from protocol.modelpkg import IoSignature

__all__ = ["AuditRecord", "ClientInfo", "GuardPolicy", "InferenceGuard", "Lease", "token_hash"]

MAX_TOKEN_LEN = 512


def token_hash(token: str) -> bytes:
    """SHA-256 of a bearer token: the form in which the agent stores client tokens."""
    return hashlib.sha256(token.encode("utf-8")).digest()


@dataclass(frozen=True, slots=True)
class ClientInfo:
    """An app on the device allowed to call the model. ``models``: names allowed (``None``: all)."""

    client_id: str
    rate: float = 10.0
    burst: float = 20.0
    daily_quota: int | None = None
    models: frozenset[str] | None = None

    def __post_init__(self) -> None:
        if not CLIENT_ID_RE.fullmatch(self.client_id):
            raise ValueError(f"invalid client id {self.client_id!r}")
        if self.rate <= 0 or self.burst < 1:
            raise ValueError("rate must be positive and burst at least 1")


@dataclass(frozen=True, slots=True)
class GuardPolicy:
    """Per-model policy: io signature (from the verified manifest), input bounds, output hardening,
    device-wide daily quota, and whether an extraction alarm blocks the client."""

    model: str
    io_signature: IoSignature
    input_limits: InputLimits = field(default_factory=InputLimits)
    output: OutputPolicy = field(default_factory=OutputPolicy)
    device_daily_quota: int | None = None
    block_on_alarm: bool = False


@dataclass(frozen=True, slots=True)
class Lease:
    """The key-release lease: valid until ``expires_at`` (wall clock, s), ``quota`` samples."""

    lease_id: str
    expires_at: float
    quota: int | None = None


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One request, served or refused. ``outcome``: ``"ok"`` or the refusal's ``code``."""

    time: float
    client_id: str | None
    model: str
    outcome: str
    rows: int
    input_shapes: tuple[tuple[str, tuple[int, ...]], ...]
    latency_us: float
    reason: str = ""


AuditSink = Callable[[AuditRecord], None]
Clock = Callable[[], float]


def _shapes(inputs: Any) -> tuple[tuple[str, tuple[int, ...]], ...]:
    if not isinstance(inputs, Mapping):
        return ()
    out = []
    for name, value in list(inputs.items())[:16]:
        shape = getattr(value, "shape", None)
        if isinstance(shape, tuple):
            out.append((str(name)[:128], tuple(int(d) for d in shape[:8])))
    return tuple(out)


class InferenceGuard:
    """Guarded access to one model. See the module docstring for the pipeline.

    ``clients``: token hash (:func:`token_hash`) -> :class:`ClientInfo`. ``clock``: wall-clock
    seconds (quota days, lease expiry, audit time; the agent passes its trusted time). ``audit_sink``
    must be quick (e.g. append to a queue the agent drains). ``counters``: the counter state the
    agent loaded and checked against the TPM NV counter (see :mod:`agent.inference.limits`).
    ``runtime=None`` starts locked.
    """

    def __init__(self, policy: GuardPolicy, runtime: Runtime | None, clients: Mapping[bytes, ClientInfo],
                 clock: Clock, audit_sink: AuditSink, *, lease: Lease | None = None,
                 counters: CounterState | None = None, monitor: ExtractionMonitor | None = None,
                 timer: Callable[[], float] = time.perf_counter) -> None:
        self.policy = policy
        self._validator = InputValidator(policy.io_signature, policy.input_limits)
        first = policy.io_signature.inputs[0]
        self._first_input = first.name
        self._batched = bool(first.shape)  # rows = first dimension of the first input (1 for a scalar)
        self._model = policy.model
        self._output_policy = policy.output
        self._clock = clock
        self._audit = audit_sink
        self._timer = timer
        self._monitor = monitor
        self._mutex = threading.Lock()
        self._rate = RateLimiter()
        self._ledger = QuotaLedger(counters or CounterState(generation=0, day=int(clock() // 86_400)),
                                   device_daily_quota=policy.device_daily_quota)
        self._clients: dict[bytes, tuple[bytes, ClientInfo]] = {}
        self.set_clients(clients)
        self._lease: Lease | None = None
        self._runtime: Runtime | None = None
        self._lock_reason = "no model session"
        if runtime is not None:
            self.unlock(runtime, lease=lease)
        elif lease is not None:
            self._set_lease(lease)

    # ---- administration (the agent) ----------------------------------------------------------------
    def set_clients(self, clients: Mapping[bytes, ClientInfo]) -> None:
        """Replace the registered clients (token hash -> client)."""
        table = {}
        for digest, info in clients.items():
            if not isinstance(digest, bytes) or len(digest) != 32:
                raise ValueError("client keys must be 32-byte SHA-256 token hashes")
            table[digest] = (digest, info)
        self._clients = table

    def _set_lease(self, lease: Lease) -> None:
        with self._mutex:
            self._ledger.set_lease(lease.lease_id, lease.quota)
            self._lease = lease

    def unlock(self, runtime: Runtime, *, lease: Lease | None = None) -> None:
        """Serve requests with ``runtime`` (a session over the freshly decrypted model), under
        ``lease`` (a new lease id restarts the lease quota; ``None`` keeps the current lease)."""
        if lease is not None:
            self._set_lease(lease)
        with self._mutex:
            old, self._runtime = self._runtime, runtime
        if old is not None and old is not runtime:
            old.close()

    def lock(self, reason: str = "locked by the agent") -> None:
        """Drop the session; every later request fails with ``ModelLocked`` until :meth:`unlock`."""
        with self._mutex:
            runtime, self._runtime = self._runtime, None
            self._lock_reason = reason
        if runtime is not None:
            runtime.close()

    @property
    def locked(self) -> bool:
        return self._runtime is None

    @property
    def lease(self) -> Lease | None:
        return self._lease

    def counters(self) -> CounterState:
        """Snapshot of the quota counters for the agent to persist (see ``limits``)."""
        with self._mutex:
            return self._ledger.snapshot()

    def counters_saved(self, state: CounterState) -> None:
        """Record that ``state`` (from ``advance_generation``) was written and NV-counted."""
        with self._mutex:
            self._ledger.saved(state)

    def extraction_report(self) -> dict[str, dict[str, object]]:
        """The extraction monitor's per-client statistics as JSON-ready telemetry."""
        if self._monitor is None:
            return {}
        return {cid: s.to_json() for cid, s in self._monitor.report().items()}

    # ---- the pipeline --------------------------------------------------------------------------------
    def _authenticate(self, token: str | None) -> ClientInfo:
        if not token or not isinstance(token, str):
            raise Unauthenticated("missing bearer token")
        if len(token) > MAX_TOKEN_LEN:
            raise Unauthenticated("unknown bearer token")
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        # The lookup is keyed by the SHA-256 of the token: its timing can reveal something about a
        # hash, never about a valid token; compare_digest confirms the match in constant time.
        entry = self._clients.get(digest)
        if entry is None or not hmac.compare_digest(entry[0], digest):
            raise Unauthenticated("unknown bearer token")
        info = entry[1]
        if info.models is not None and self.policy.model not in info.models:
            raise Forbidden(f"client {info.client_id} may not use model {self.policy.model}")
        return info

    def predict(self, token: str | None, inputs: Mapping[str, Any] | InvalidInput) -> dict[str, Any]:
        """Run one request through the pipeline; the hardened output, or a refusal.

        ``inputs``: input name -> numpy array (in-process) or JSON value (HTTP). A transport that
        could not decode the request passes the :class:`InvalidInput` it would have raised instead:
        the guard raises it at the validation step, so authentication, limits and audit come first.
        """
        start = self._timer()
        now = self._clock()
        client: ClientInfo | None = None
        rows = 0
        shapes: tuple[tuple[str, tuple[int, ...]], ...] | None = None
        outcome, reason = "ok", ""
        try:
            client = self._authenticate(token)
            runtime = self._runtime
            if runtime is None:
                raise ModelLocked(f"model {self.policy.model} is locked: {self._lock_reason}")
            lease = self._lease
            if lease is not None and now >= lease.expires_at:
                self.lock(f"lease {lease.lease_id} expired")
                raise ModelLocked(f"model {self.policy.model} is locked: lease {lease.lease_id} expired")
            cid = client.client_id
            with self._mutex:
                self._rate.check(cid, rate=client.rate, burst=client.burst, now=now)
                self._ledger.check(cid, client.daily_quota, now)
            if isinstance(inputs, InvalidInput):
                raise inputs
            arrays = self._validator.validate(inputs)
            first = arrays[self._first_input]
            rows = first.shape[0] if self._batched else 1
            shapes = tuple([(name, a.shape) for name, a in arrays.items()])
            with self._mutex:
                self._ledger.charge(cid, client.daily_quota, rows, now)
            monitor = self._monitor
            if monitor is not None:
                monitor.observe(cid, first)
                if self.policy.block_on_alarm and monitor.alarm(cid):
                    raise Forbidden(f"client {cid} is blocked: its queries look like model extraction")
            outputs = runtime.run(arrays)
            return harden(outputs, self._output_policy, runtime.output_names[0])
        except InferenceRefused as exc:
            outcome, reason = exc.code, exc.diagnostics()
            raise
        except Exception as exc:  # a bug must still be audited; the caller sees it as a failure
            outcome, reason = "error", type(exc).__name__
            raise
        finally:
            self._audit(AuditRecord(
                time=now, client_id=None if client is None else client.client_id, model=self._model,
                outcome=outcome, rows=rows, input_shapes=_shapes(inputs) if shapes is None else shapes,
                latency_us=(self._timer() - start) * 1e6, reason=reason))

