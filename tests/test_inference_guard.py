"""Guarded inference: pipeline order, limits and quotas, counters and rollback, validation,
output hardening, the onnxruntime adapter. The model is the real small ONNX classifier."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest

from agent.inference import (
    Forbidden,
    InferenceFailed,
    InferenceRefused,
    InvalidInput,
    ModelLocked,
    QuotaExceeded,
    RateLimited,
    RollbackError,
    Unauthenticated,
)
from agent.inference.guard import AuditRecord, ClientInfo, GuardPolicy, InferenceGuard, Lease, token_hash
from agent.inference.harden import OutputPolicy, harden
from agent.inference.limits import (
    SECONDS_PER_DAY,
    CounterState,
    QuotaLedger,
    RateLimiter,
    TokenBucket,
    advance_generation,
    check_generation,
    hmac_sha256,
)
from agent.inference.monitor import ExtractionMonitor, MonitorPolicy
from agent.inference.runtime import OrtRuntime, zeroize
from agent.inference.validate import InputLimits, InputValidator, from_json
from firmware_sim.testmodel import LABELS, classifier_io_signature, reference_scores, small_classifier
from protocol.modelpkg import IoSignature, PackageFormatError, TensorSpec

T0 = 1_790_000_000.0  # a wall-clock time (seconds), 2026-09
MODEL = small_classifier(seed=3)
IO = classifier_io_signature()
TOKENS = {"app": "tok-app-0123456789", "cam": "tok-cam-0123456789", "other": "tok-other-0123456789"}


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class CountingRuntime:
    """The real onnxruntime adapter, counting the calls that reach it."""

    def __init__(self, model: bytes = MODEL) -> None:
        self.inner = OrtRuntime(model)
        self.calls = 0
        self.closed = False

    @property
    def output_names(self) -> tuple[str, ...]:
        return self.inner.output_names

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls += 1
        return self.inner.run(inputs)

    def close(self) -> None:
        self.closed = True
        self.inner.close()


@pytest.fixture(scope="module")
def shared_runtime() -> CountingRuntime:
    return CountingRuntime()


def make_guard(runtime: CountingRuntime | None, *, clients: dict[str, ClientInfo] | None = None,
               clock: Clock | None = None, lease: Lease | None = None, policy: GuardPolicy | None = None,
               monitor: ExtractionMonitor | None = None,
               counters: CounterState | None = None) -> tuple[InferenceGuard, list[AuditRecord], Clock]:
    clock = clock or Clock()
    audit: list[AuditRecord] = []
    clients = clients or {"app": ClientInfo("app", rate=100, burst=100),
                          "cam": ClientInfo("cam", rate=100, burst=100)}
    table = {token_hash(TOKENS[name]): info for name, info in clients.items()}
    policy = policy or GuardPolicy(model="classifier", io_signature=IO,
                                   output=OutputPolicy(mode="label", labels=LABELS))
    guard = InferenceGuard(policy, runtime, table, clock, audit.append, lease=lease, monitor=monitor,
                           counters=counters)
    return guard, audit, clock


def batch(rows: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    return {"input": np.random.default_rng(seed).standard_normal((rows, 16)).astype(np.float32)}


# ---- the happy path ------------------------------------------------------------------------------------
def test_predict_returns_hardened_labels_and_audits(shared_runtime: CountingRuntime) -> None:
    guard, audit, _ = make_guard(shared_runtime)
    x = batch(4)
    out = guard.predict(TOKENS["app"], x)
    expected = [LABELS[i] for i in reference_scores(x["input"], seed=3).argmax(axis=1)]
    assert out == {"labels": expected}
    (record,) = audit
    assert (record.client_id, record.outcome, record.rows, record.model) == ("app", "ok", 4, "classifier")
    assert record.input_shapes == (("input", (4, 16)),) and record.time == T0 and record.latency_us > 0
    assert guard.counters().clients == (("app", 4),)


def test_audit_never_carries_input_or_output_data(shared_runtime: CountingRuntime) -> None:
    guard, audit, _ = make_guard(shared_runtime)
    x = batch(2, seed=9)
    out = guard.predict(TOKENS["app"], x)
    text = repr(audit)
    assert all(f"{v:.4f}" not in text for v in x["input"].ravel()[:8])
    assert all(str(label) not in text for label in out["labels"])


# ---- pipeline order ---------------------------------------------------------------------------------
@pytest.mark.parametrize("token", [None, "", "wrong-token", "x" * 10_000, TOKENS["app"] + " "])
def test_unauthenticated_requests_touch_nothing(token: str | None) -> None:
    runtime = CountingRuntime()
    guard, audit, _ = make_guard(runtime, lease=Lease("lease-1", T0 + 3600, quota=10))
    before = guard.counters()
    with pytest.raises(Unauthenticated) as info:
        guard.predict(token, batch())
    assert info.value.status == 401
    assert runtime.calls == 0 and guard.counters() == before
    assert audit[-1].outcome == "unauthenticated" and audit[-1].client_id is None


def test_authentication_comes_before_the_lock() -> None:
    guard, _, _ = make_guard(None)
    with pytest.raises(Unauthenticated):
        guard.predict("wrong-token", batch())
    with pytest.raises(ModelLocked):
        guard.predict(TOKENS["app"], batch())


def test_client_limited_to_other_models_is_forbidden(shared_runtime: CountingRuntime) -> None:
    clients = {"app": ClientInfo("app", models=frozenset({"other"}))}
    guard, audit, _ = make_guard(shared_runtime, clients=clients)
    with pytest.raises(Forbidden, match="may not use model classifier"):
        guard.predict(TOKENS["app"], batch())
    assert audit[-1].outcome == "forbidden"


INVALID: list[tuple[str, Any, str]] = [
    ("wrong dtype", {"input": np.zeros((1, 16), dtype=np.float64)}, "dtype float64 is not float32"),
    ("wrong rank", {"input": np.zeros((16,), dtype=np.float32)}, "rank 1 is not 2"),
    ("wrong fixed dim", {"input": np.zeros((1, 15), dtype=np.float32)}, "dimension 1 is 15, must be 16"),
    ("batch too large", {"input": np.zeros((65, 16), dtype=np.float32)},
     r"dimension 0 is 65, must be 1\.\.64"),
    ("NaN", {"input": np.full((1, 16), np.nan, dtype=np.float32)}, "NaN or infinity"),
    ("infinity", {"input": np.full((2, 16), np.inf, dtype=np.float32)}, "NaN or infinity"),
    ("missing input", {"other": np.zeros((1, 16), dtype=np.float32)}, "missing"),
    ("unknown extra input", {"input": np.zeros((1, 16), dtype=np.float32), "x": np.zeros(1)},
     "unknown inputs"),
    ("not an array", {"input": "zeros"}, "expected a number"),
    ("ragged JSON", {"input": [[1.0] * 16, [1.0] * 15]}, "ragged"),
    ("decode failure", InvalidInput("request body is not valid JSON"), "not valid JSON"),
]


@pytest.mark.parametrize(("case", "inputs", "reason"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_input_never_reaches_the_model_nor_consumes_quota(case: str, inputs: Any,
                                                                  reason: str) -> None:
    runtime = CountingRuntime()
    guard, audit, _ = make_guard(runtime, lease=Lease("lease-1", T0 + 3600, quota=10))
    with pytest.raises(InvalidInput, match=reason) as info:
        guard.predict(TOKENS["app"], inputs)
    assert info.value.status == 400
    assert runtime.calls == 0
    state = guard.counters()
    assert state.lease_used == 0 and state.day_used == 0 and state.clients == ()
    assert audit[-1].outcome == "invalid_input" and audit[-1].client_id == "app"


def test_rate_limit_comes_before_quota_and_consumes_none() -> None:
    runtime = CountingRuntime()
    clients = {"app": ClientInfo("app", rate=1.0, burst=2.0, daily_quota=100)}
    guard, audit, clock = make_guard(runtime, clients=clients)
    guard.predict(TOKENS["app"], batch())
    guard.predict(TOKENS["app"], batch())
    with pytest.raises(RateLimited) as info:
        guard.predict(TOKENS["app"], batch())
    assert info.value.status == 429 and info.value.retry_after == pytest.approx(1.0)
    assert runtime.calls == 2 and guard.counters().day_used == 2
    clock.now += 1.0
    guard.predict(TOKENS["app"], batch())
    assert runtime.calls == 3
    assert [r.outcome for r in audit] == ["ok", "ok", "rate_limited", "ok"]


def test_rate_limit_wins_over_exhausted_quota() -> None:
    clients = {"app": ClientInfo("app", rate=1.0, burst=1.0, daily_quota=1)}
    guard, _, _ = make_guard(CountingRuntime(), clients=clients)
    guard.predict(TOKENS["app"], batch())
    with pytest.raises(RateLimited):
        guard.predict(TOKENS["app"], batch())


# ---- quotas --------------------------------------------------------------------------------------------
def test_client_daily_quota_counts_samples_and_rolls_over_at_utc_midnight() -> None:
    runtime = CountingRuntime()
    clients = {"app": ClientInfo("app", rate=100, burst=100, daily_quota=5),
               "cam": ClientInfo("cam", rate=100, burst=100)}
    day_start = (T0 // SECONDS_PER_DAY) * SECONDS_PER_DAY
    guard, audit, clock = make_guard(runtime, clients=clients, clock=Clock(day_start + SECONDS_PER_DAY - 10))
    guard.predict(TOKENS["app"], batch(2))
    guard.predict(TOKENS["app"], batch(2))
    with pytest.raises(QuotaExceeded, match="daily quota of client app exhausted: 4 of 5") as info:
        guard.predict(TOKENS["app"], batch(2))
    assert info.value.status == 403 and runtime.calls == 2
    guard.predict(TOKENS["app"], batch(1))   # exactly fills the quota
    with pytest.raises(QuotaExceeded):
        guard.predict(TOKENS["app"], batch(1))
    guard.predict(TOKENS["cam"], batch(3))   # other clients are unaffected
    clock.now = day_start + SECONDS_PER_DAY   # 00:00:00 UTC the next day
    guard.predict(TOKENS["app"], batch(2))
    assert guard.counters().clients == (("app", 2),)
    assert audit[-1].outcome == "ok"


def test_setting_the_clock_back_does_not_restore_quota() -> None:
    clients = {"app": ClientInfo("app", rate=100, burst=100, daily_quota=2)}
    guard, _, clock = make_guard(CountingRuntime(), clients=clients)
    guard.predict(TOKENS["app"], batch(2))
    clock.now -= 3 * SECONDS_PER_DAY
    with pytest.raises(QuotaExceeded):
        guard.predict(TOKENS["app"], batch(1))


def test_lease_quota_is_device_wide_and_restarts_with_a_new_lease() -> None:
    runtime = CountingRuntime()
    guard, _, _ = make_guard(runtime, lease=Lease("lease-1", T0 + 3600, quota=3))
    guard.predict(TOKENS["app"], batch(2))
    with pytest.raises(QuotaExceeded, match="lease quota exhausted: 2 of 3"):
        guard.predict(TOKENS["cam"], batch(2))
    guard.predict(TOKENS["cam"], batch(1))
    with pytest.raises(QuotaExceeded):
        guard.predict(TOKENS["app"], batch(1))
    guard.unlock(runtime, lease=Lease("lease-2", T0 + 7200, quota=3))
    guard.predict(TOKENS["app"], batch(3))
    assert guard.counters().lease_id == "lease-2" and guard.counters().lease_used == 3


def test_device_daily_quota() -> None:
    policy = GuardPolicy(model="classifier", io_signature=IO, device_daily_quota=3)
    guard, _, _ = make_guard(CountingRuntime(), policy=policy)
    guard.predict(TOKENS["app"], batch(2))
    with pytest.raises(QuotaExceeded, match="device daily quota"):
        guard.predict(TOKENS["cam"], batch(2))


def test_counters_survive_a_restart_through_counter_state() -> None:
    clients = {"app": ClientInfo("app", rate=100, burst=100, daily_quota=4)}
    guard, _, clock = make_guard(CountingRuntime(), clients=clients,
                                 lease=Lease("lease-1", T0 + 60, quota=100),
                                 counters=CounterState.initial(nv_counter=7, now=T0))
    guard.predict(TOKENS["app"], batch(3))
    mac = hmac_sha256(b"k" * 32)
    saved = advance_generation(guard.counters(), nv_counter=7)
    data = saved.to_bytes(mac)
    restored = CounterState.from_bytes(data, mac)
    check_generation(restored, nv_counter=8)
    again, _, _ = make_guard(CountingRuntime(), clients=clients, clock=clock, counters=restored,
                             lease=Lease("lease-1", T0 + 60, quota=100))
    with pytest.raises(QuotaExceeded):
        again.predict(TOKENS["app"], batch(2))
    assert again.counters().lease_used == 3 and again.counters().generation == 8


# ---- lock / unlock -------------------------------------------------------------------------------------
def test_lock_refuses_everything_until_unlock() -> None:
    runtime = CountingRuntime()
    guard, audit, _ = make_guard(runtime)
    guard.predict(TOKENS["app"], batch())
    guard.lock("lease revoked by the fleet server")
    assert guard.locked and runtime.closed
    for _ in range(3):
        with pytest.raises(ModelLocked, match="lease revoked") as info:
            guard.predict(TOKENS["app"], batch())
        assert info.value.status == 423
    assert audit[-1].outcome == "model_locked"
    fresh = CountingRuntime()
    guard.unlock(fresh)
    guard.predict(TOKENS["app"], batch())
    assert fresh.calls == 1 and runtime.calls == 1


def test_lease_expiry_locks_by_itself() -> None:
    runtime = CountingRuntime()
    guard, _, clock = make_guard(runtime, lease=Lease("lease-1", T0 + 30))
    guard.predict(TOKENS["app"], batch())
    clock.now = T0 + 30
    with pytest.raises(ModelLocked, match="lease lease-1 expired"):
        guard.predict(TOKENS["app"], batch())
    assert guard.locked and runtime.closed
    clock.now = T0  # even if the clock is set back, the session is gone
    with pytest.raises(ModelLocked):
        guard.predict(TOKENS["app"], batch())


def test_guard_starts_locked_without_runtime() -> None:
    guard, _, _ = make_guard(None)
    assert guard.locked
    with pytest.raises(ModelLocked, match="no model session"):
        guard.predict(TOKENS["app"], batch())


# ---- concurrency ---------------------------------------------------------------------------------------
def test_concurrent_requests_never_overspend_the_quota() -> None:
    runtime = CountingRuntime()
    clients = {"app": ClientInfo("app", rate=1e9, burst=1e9, daily_quota=150)}
    guard, audit, _ = make_guard(runtime, clients=clients)
    outcomes: list[str] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(25):
            try:
                guard.predict(TOKENS["app"], batch(2))
                result = "ok"
            except InferenceRefused as exc:
                result = exc.code
            with lock:
                outcomes.append(result)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("ok") == 75 and outcomes.count("quota_exceeded") == 125
    assert runtime.calls == 75 and guard.counters().clients == (("app", 150),)
    assert len(audit) == 200


# ---- extraction monitor in the pipeline ----------------------------------------------------------------
def test_monitor_sees_queries_and_can_block_an_alarmed_client() -> None:
    monitor = ExtractionMonitor(MonitorPolicy(warmup=8, min_queries=20, test_every=4))
    policy = GuardPolicy(model="classifier", io_signature=IO, block_on_alarm=True)
    guard, _, _ = make_guard(CountingRuntime(), monitor=monitor, policy=policy)
    x0 = np.random.default_rng(1).standard_normal(16).astype(np.float32)
    with pytest.raises(Forbidden, match="look like model extraction"):
        for k in range(200):  # a line search: constant step along one direction
            x = (x0 + np.float32(0.01 * k)).reshape(1, 16)
            guard.predict(TOKENS["app"], {"input": x})
    report = guard.extraction_report()
    assert report["app"]["alarm"] is True and report["app"]["w"] is not None


# ---- limits, unit level --------------------------------------------------------------------------------
def test_token_bucket_refills_and_ignores_backwards_clock() -> None:
    bucket = TokenBucket.full(rate=2.0, burst=2.0, now=100.0)
    assert bucket.take(100.0) == 0.0 and bucket.take(100.0) == 0.0
    assert bucket.take(100.0) == pytest.approx(0.5)
    assert bucket.take(100.25) == pytest.approx(0.25)  # refused: half a token accrued
    assert bucket.take(100.5) == 0.0
    assert bucket.take(50.0) > 0  # clock stepped back: nothing refilled
    assert bucket.take(50.5) == 0.0  # ...but the bucket resumes from the new time
    assert bucket.take(1e9) == 0.0 and bucket.tokens == pytest.approx(1.0)  # capped at burst


def test_rate_limiter_is_per_client() -> None:
    limiter = RateLimiter()
    limiter.check("a", rate=1, burst=1, now=0)
    with pytest.raises(RateLimited):
        limiter.check("a", rate=1, burst=1, now=0)
    limiter.check("b", rate=1, burst=1, now=0)


def test_quota_ledger_charge_is_all_or_nothing() -> None:
    ledger = QuotaLedger(CounterState(generation=1, day=10), lease_quota=10, device_daily_quota=10)
    ledger.set_lease("l1", 10)
    ledger.charge("a", 3, 3, now=10 * SECONDS_PER_DAY)
    with pytest.raises(QuotaExceeded):
        ledger.charge("a", 3, 1, now=10 * SECONDS_PER_DAY)
    assert (ledger.lease_used, ledger.used(), ledger.used("a")) == (3, 3, 3)
    ledger.set_lease("l1", 10)  # same lease: count kept
    assert ledger.lease_used == 3
    ledger.set_lease("l2", 10)
    assert ledger.lease_used == 0 and ledger.used() == 3


GENERATIONS = [(5, 5, None), (6, 5, None), (4, 5, "older than the TPM NV counter 5"),
               (0, 5, "older"), (7, 5, "ahead of the TPM NV counter")]


@pytest.mark.parametrize(("generation", "nv", "error"), GENERATIONS)
def test_check_generation(generation: int, nv: int, error: str | None) -> None:
    state = CounterState(generation=generation, day=1)
    if error is None:
        check_generation(state, nv_counter=nv)
    else:
        with pytest.raises(RollbackError, match=error):
            check_generation(state, nv_counter=nv)


def test_save_load_cycle_detects_a_replayed_state_file() -> None:
    mac = hmac_sha256(b"m" * 32)
    nv = 41  # a fresh NV counter starts at the TPM's highest count, not 0
    state = CounterState.initial(nv_counter=nv, now=T0)
    old_file = advance_generation(state, nv_counter=nv).to_bytes(mac)
    nv += 1  # the agent increments the NV counter after writing
    newer = advance_generation(CounterState.from_bytes(old_file, mac), nv_counter=nv)
    newer_file = newer.to_bytes(mac)
    nv += 1
    check_generation(CounterState.from_bytes(newer_file, mac), nv_counter=nv)
    with pytest.raises(RollbackError, match="older than the TPM NV counter"):
        check_generation(CounterState.from_bytes(old_file, mac), nv_counter=nv)


@pytest.mark.parametrize("mutate", [
    lambda d: d[:-1] + bytes([d[-1] ^ 1]),                       # MAC
    lambda d: d.replace(b'"day_used":0', b'"day_used":9'),        # body, old MAC
    lambda d: d[:10],                                            # truncated
])
def test_counter_state_refuses_altered_bytes(mutate: Any) -> None:
    mac = hmac_sha256(b"m" * 32)
    data = CounterState(generation=3, day=5).to_bytes(mac)
    with pytest.raises(RollbackError):
        CounterState.from_bytes(mutate(data), mac)
    with pytest.raises(RollbackError, match="MAC"):
        CounterState.from_bytes(data, hmac_sha256(b"x" * 32))


def test_counter_state_round_trip() -> None:
    mac = hmac_sha256(b"m" * 32)
    state = CounterState(generation=9, day=20_000, day_used=12, lease_id="lease-7", lease_used=4,
                         clients=(("app", 5), ("cam", 7)))
    assert CounterState.from_bytes(state.to_bytes(mac), mac) == state


# ---- validation ----------------------------------------------------------------------------------------
def test_dynamic_dims_are_bounded_by_the_policy() -> None:
    io = IoSignature(inputs=(TensorSpec("seq", "int64", (None, None)),),
                     outputs=(TensorSpec("y", "float32", (1,)),))
    validator = InputValidator(io, InputLimits(max_batch=2, max_dynamic_dim=8, max_elements=12))
    validator.validate({"seq": np.zeros((2, 6), dtype=np.int64)})
    with pytest.raises(InvalidInput, match=r"dimension 1 is 9, must be 1\.\.8"):
        validator.validate({"seq": np.zeros((1, 9), dtype=np.int64)})
    with pytest.raises(InvalidInput, match=r"dimension 0 is 3, must be 1\.\.2"):
        validator.validate({"seq": np.zeros((3, 2), dtype=np.int64)})
    with pytest.raises(InvalidInput, match="more than 12 elements"):
        validator.validate({"seq": np.zeros((2, 7), dtype=np.int64)})


def test_non_contiguous_arrays_are_made_contiguous() -> None:
    validator = InputValidator(IO, InputLimits())
    x = np.zeros((16, 4), dtype=np.float32).T
    assert validator.validate({"input": x})["input"].flags.c_contiguous


JSON_OK: list[tuple[str, Any, np.ndarray]] = [
    ("float32", [[1, 2.5]], np.array([[1.0, 2.5]], dtype=np.float32)),
    ("int64", [[1, 2.0]], np.array([[1, 2]], dtype=np.int64)),
    ("uint8", [0, 255], np.array([0, 255], dtype=np.uint8)),
    ("bool", [True, False], np.array([True, False])),
]
JSON_BAD: list[tuple[str, Any, str]] = [
    ("float32", [["1"]], "expected numbers"),
    ("float32", [[None]], "expected numbers"),
    ("float32", [[1e39]], "overflows"),
    ("float32", [True], "expected numbers"),
    ("int64", [1.5], "expected integers"),
    ("uint8", [256], "outside the range"),
    ("int8", [-129], "outside the range"),
    ("int64", [2**70], "expected numbers"),
    ("bool", [1, 0], "expected booleans"),
    ("float32", {"a": 1}, "expected a number"),
    ("float32", [[1.0], [1.0, 2.0]], "ragged"),
]


@pytest.mark.parametrize(("dtype", "value", "expected"), JSON_OK)
def test_from_json_converts(dtype: str, value: Any, expected: np.ndarray) -> None:
    out = from_json(value, TensorSpec("x", dtype, (None,)), max_elements=100)
    assert out.dtype == expected.dtype and np.array_equal(out, expected)


@pytest.mark.parametrize(("dtype", "value", "reason"), JSON_BAD)
def test_from_json_refuses(dtype: str, value: Any, reason: str) -> None:
    with pytest.raises(InvalidInput, match=reason):
        from_json(value, TensorSpec("x", dtype, (None,)), max_elements=100)


def test_from_json_bounds_element_count() -> None:
    with pytest.raises(InvalidInput, match="more than 3 elements"):
        from_json([1, 2, 3, 4], TensorSpec("x", "float32", (None,)), max_elements=3)


# ---- output hardening ----------------------------------------------------------------------------------
SCORES = np.array([[0.1234, 0.5678, 0.3088], [0.7, 0.2, 0.1]], dtype=np.float32)
OUTPUTS = {"scores": SCORES, "embedding": np.ones((2, 128), dtype=np.float32)}


@pytest.mark.parametrize(("policy", "expected"), [
    (OutputPolicy(mode="full", decimals=2), {"scores": [[0.12, 0.57, 0.31], [0.7, 0.2, 0.1]]}),
    (OutputPolicy(mode="full", decimals=0), {"scores": [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]}),
    (OutputPolicy(mode="topk", k=2, decimals=1, labels=("a", "b", "c")),
     {"labels": [["b", "c"], ["a", "b"]], "scores": [[0.6, 0.3], [0.7, 0.2]]}),
    (OutputPolicy(mode="topk", k=5, decimals=3), {"labels": [[1, 2, 0], [0, 1, 2]],
                                                  "scores": [[0.568, 0.309, 0.123], [0.7, 0.2, 0.1]]}),
    (OutputPolicy(mode="label", labels=("a", "b", "c")), {"labels": ["b", "a"]}),
    (OutputPolicy(mode="label"), {"labels": [1, 0]}),
])
def test_hardening_modes(policy: OutputPolicy, expected: dict[str, Any]) -> None:
    out = harden(OUTPUTS, policy, "scores")
    assert out == expected
    assert "embedding" not in repr(out)  # other outputs are never released


def test_hardening_refuses_mismatched_labels_and_missing_output() -> None:
    with pytest.raises(InferenceFailed, match="2 labels"):
        harden(OUTPUTS, OutputPolicy(mode="label", labels=("a", "b")), "scores")
    with pytest.raises(InferenceFailed, match="no output"):
        harden(OUTPUTS, OutputPolicy(scores_output="logits"), "scores")


def test_guard_applies_the_policy_output_mode(shared_runtime: CountingRuntime) -> None:
    policy = GuardPolicy(model="classifier", io_signature=IO,
                         output=OutputPolicy(mode="topk", k=3, decimals=2, labels=LABELS))
    guard, _, _ = make_guard(shared_runtime, policy=policy)
    x = batch(2, seed=4)
    out = guard.predict(TOKENS["app"], x)
    ref = reference_scores(x["input"], seed=3)
    for row, labels, scores in zip(ref, out["labels"], out["scores"], strict=True):
        top = np.argsort(-row)[:3]
        assert labels == [LABELS[i] for i in top]
        assert scores == [round(float(row[i]), 2) for i in top]


# ---- runtime adapter -----------------------------------------------------------------------------------
def test_runtime_from_bytearray_wipes_the_source_and_still_runs() -> None:
    source = bytearray(MODEL)
    runtime = OrtRuntime(source, wipe_source=True)
    assert source == bytearray(len(MODEL))
    x = batch(3)["input"]
    np.testing.assert_allclose(runtime.run({"input": x})["scores"], reference_scores(x, seed=3), atol=1e-5)
    runtime.check_io(IO)
    runtime.close()
    with pytest.raises(InferenceFailed, match="closed"):
        runtime.run({"input": x})


def test_runtime_refuses_a_model_that_contradicts_the_manifest() -> None:
    runtime = OrtRuntime(MODEL)
    wrong = IoSignature(inputs=(TensorSpec("input", "float32", (None, 8)),),
                        outputs=(TensorSpec("scores", "float32", (None, 10)),))
    with pytest.raises(PackageFormatError, match="does not match the manifest"):
        runtime.check_io(wrong)


def test_runtime_refuses_garbage_bytes() -> None:
    with pytest.raises(PackageFormatError, match="could not be loaded"):
        OrtRuntime(b"\x08\x07not an onnx model")


def test_runtime_errors_are_converted() -> None:
    runtime = OrtRuntime(MODEL)
    with pytest.raises(InferenceFailed):
        runtime.run({"input": np.zeros((1, 3), dtype=np.float32)})


@pytest.mark.parametrize("make_buffer", [lambda: bytearray(b"secret" * 100),
                                         lambda: memoryview(bytearray(b"secret" * 100))])
def test_zeroize(make_buffer: Any) -> None:
    buf = make_buffer()
    zeroize(buf)
    assert bytes(buf) == bytes(600)
    with pytest.raises(TypeError):
        zeroize(memoryview(b"read-only"))


def test_runtime_load_failure_carries_onnxruntime_reason() -> None:
    from firmware_sim.testmodel import relu_model

    with pytest.raises(PackageFormatError,
                       match="Unsupported model IR version: 14, max supported IR version: 13"):
        OrtRuntime(relu_model(ir_version=14))
