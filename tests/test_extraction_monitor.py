"""PRADA-style extraction monitor: the Shapiro-Wilk statistic, and alarms on synthetic query
streams but not on natural ones. All streams are seeded, so every outcome is deterministic."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pytest

from agent.inference.monitor import ExtractionMonitor, MonitorPolicy, shapiro_wilk

# Reference values from scipy.stats.shapiro 1.17.1 (same algorithm, AS R94) on these samples.
SW_REFERENCE = [
    ([0.001, 0.299, -0.274, -0.891, -0.455, -0.992, 0.06, 1.34, -0.492, -0.62, 0.49, 0.357, 0.105, -0.93,
      -0.029, 0.695, -1.344, -0.458, -1.901, -1.29], 0.9920904415292748, 0.9996330494822041),
    ([0.215, 0.16, 0.613, 0.044, 0.036, 0.515, 0.466, 0.917, 0.629, 0.514, 0.497, 0.248, 0.012, 0.192, 0.692,
      0.201, 0.37, 0.004, 0.83, 0.154, 0.268, 0.88, 0.51, 0.847, 0.64, 0.742, 0.091, 0.541, 0.508, 0.871],
     0.937666147263137, 0.07871344917995783),
    ([1.223, 0.127, 0.384, 1.068, 0.069, 0.098, 0.871, 1.874, 2.696, 0.706, 1.306, 0.764, 0.937, 0.145, 2.495,
      0.884, 0.875, 0.026, 1.085, 1.062, 1.064, 0.569, 1.364, 1.574, 0.65, 0.351, 1.7, 0.673, 0.751, 0.111,
      0.245, 2.047, 0.728, 0.025, 1.327, 0.492, 2.952, 0.843, 0.977, 0.434], 0.9117805271038084,
     0.004286874369304682),
    ([0.653, -0.024, 0.668, -0.34, 1.052], 0.9259501406423234, 0.5690258047424581),
    ([-0.005, 0.583, -1.291, 0.347, -1.688, -2.035, -0.304, -0.9], 0.9486160260709783, 0.6972690939258045),
]


@pytest.mark.parametrize(("sample", "w", "p"), SW_REFERENCE)
def test_shapiro_wilk_matches_reference(sample: list[float], w: float, p: float) -> None:
    got_w, got_p = shapiro_wilk(np.array(sample))
    assert got_w == pytest.approx(w, abs=1e-8)
    assert got_p == pytest.approx(p, rel=1e-6, abs=1e-12)


def test_shapiro_wilk_edge_cases() -> None:
    assert shapiro_wilk(np.full(40, 0.05)) == (0.0, 0.0)  # no spread: a fixed-step search
    w, p = shapiro_wilk(np.array([1.0, 2.0, 3.0]))
    assert w == pytest.approx(1.0) and p == pytest.approx(1.0)
    for bad in (np.array([1.0, 2.0]), np.zeros(5001), np.array([1.0, np.nan, 2.0])):
        with pytest.raises(ValueError):
            shapiro_wilk(bad)


def test_shapiro_wilk_p_values_are_calibrated_and_powerful() -> None:
    rng = np.random.default_rng(2024)
    normal_p = [shapiro_wilk(rng.standard_normal(50))[1] for _ in range(400)]
    assert 0.02 <= np.mean(np.array(normal_p) < 0.05) <= 0.09   # about 5% false rejections
    skewed_p = [shapiro_wilk(rng.exponential(size=50))[1] for _ in range(100)]
    assert np.mean(np.array(skewed_p) < 0.05) > 0.9


# ---- query streams ------------------------------------------------------------------------------------
Stream = Callable[[np.random.Generator, int], Iterator[np.ndarray]]


def natural_gaussian(rng: np.random.Generator, n: int) -> Iterator[np.ndarray]:
    for _ in range(n):
        yield rng.standard_normal(16)


def natural_mixture(rng: np.random.Generator, n: int) -> Iterator[np.ndarray]:
    centres = rng.standard_normal((10, 16)) * 3
    for _ in range(n):
        yield centres[rng.integers(10)] + rng.standard_normal(16)


def natural_uniform(rng: np.random.Generator, n: int) -> Iterator[np.ndarray]:
    for _ in range(n):
        yield rng.uniform(-1, 1, 16)


def perturbations(rng: np.random.Generator, n: int) -> Iterator[np.ndarray]:
    """Tiny perturbations around a few natural seeds (as in T-RND / adversarial-example synthesis)."""
    seeds = rng.standard_normal((20, 16))
    for k in range(n):
        yield seeds[(k // 30) % 20] + rng.standard_normal(16) * 0.01


def jacobian_augmentation(rng: np.random.Generator, n: int) -> Iterator[np.ndarray]:
    """Papernot-style augmentation: each round adds x + lambda * sign(gradient) for every sample."""
    points = list(rng.standard_normal((10, 16)))
    queries: list[np.ndarray] = []
    while len(queries) < n:
        queries += points
        points = points + [p + 0.1 * np.sign(rng.standard_normal(16)) for p in points]
    yield from queries[:n]


def line_search(rng: np.random.Generator, n: int) -> Iterator[np.ndarray]:
    x0, d = rng.standard_normal(16), rng.standard_normal(16)
    d /= np.linalg.norm(d)
    for k in range(n):
        yield x0 + 0.05 * k * d


def grid_search(rng: np.random.Generator, n: int) -> Iterator[np.ndarray]:
    base = rng.standard_normal(16)
    for k in range(n):
        x = base.copy()
        x[0] += 0.1 * (k % 25)
        x[1] += 0.1 * (k // 25)
        yield x


def feed(stream: Stream, n: int, seed: int, policy: MonitorPolicy | None = None) -> ExtractionMonitor:
    monitor = ExtractionMonitor(policy)
    for x in stream(np.random.default_rng(seed), n):
        monitor.observe("client", x[np.newaxis, :])
    return monitor


@pytest.mark.parametrize("stream", [natural_gaussian, natural_mixture, natural_uniform])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_natural_queries_do_not_alarm(stream: Stream, seed: int) -> None:
    stats = feed(stream, 1500, seed).stats("client")
    assert stats.queries == 1500 and stats.distances == 512  # the tested sample is bounded
    assert stats.w is not None and stats.w > 0.95
    assert not stats.alarm


@pytest.mark.parametrize("stream", [perturbations, jacobian_augmentation, line_search, grid_search])
@pytest.mark.parametrize("seed", [0, 1])
def test_synthetic_extraction_queries_alarm(stream: Stream, seed: int) -> None:
    policy = MonitorPolicy()
    monitor = feed(stream, 400, seed, policy)
    stats = monitor.stats("client")
    assert stats.alarm and stats.w is not None and stats.w < policy.threshold
    assert monitor.alarmed() == ["client"]


def test_no_verdict_before_enough_queries() -> None:
    policy = MonitorPolicy()
    monitor = feed(line_search, policy.warmup + policy.min_queries - 1, 0, policy)
    stats = monitor.stats("client")
    assert stats.w is None and not stats.alarm
    monitor.observe("client", np.full((1, 16), 99.0))
    assert monitor.stats("client").w is not None


def test_alarm_latches_until_reset() -> None:
    monitor = feed(grid_search, 300, 0)
    rng = np.random.default_rng(5)
    for _ in range(600):  # natural queries afterwards do not clear it
        monitor.observe("client", rng.standard_normal((1, 16)))
    assert monitor.stats("client").alarm
    monitor.reset("client")
    assert monitor.stats("client").queries == 0 and not monitor.stats("client").alarm


def test_batches_equal_row_by_row() -> None:
    rows = np.random.default_rng(3).standard_normal((300, 16))
    one, many = ExtractionMonitor(), ExtractionMonitor()
    for row in rows:
        one.observe("c", row[np.newaxis, :])
    for chunk in np.array_split(rows, 37):
        many.observe("c", chunk)
    a, b = one.stats("c"), many.stats("c")
    assert (a.queries, a.distances, a.alarm) == (b.queries, b.distances, b.alarm)
    assert a.w == pytest.approx(b.w, rel=1e-9) and a.mean_distance == pytest.approx(b.mean_distance, rel=1e-9)


def test_large_inputs_are_sketched_and_still_detect_perturbation() -> None:
    rng = np.random.default_rng(11)
    natural, attack = ExtractionMonitor(), ExtractionMonitor()
    seeds = rng.standard_normal((10, 3, 32, 32)).astype(np.float32)
    for k in range(800):
        natural.observe("c", rng.standard_normal((1, 3, 32, 32)).astype(np.float32))
        attack.observe("c", (seeds[(k // 40) % 10] + 0.01 * rng.standard_normal((3, 32, 32)))[np.newaxis])
    assert not natural.stats("c").alarm
    assert attack.stats("c").alarm


def test_memory_is_bounded_per_client_and_in_clients() -> None:
    policy = MonitorPolicy(max_clients=3)
    monitor = ExtractionMonitor(policy)
    rng = np.random.default_rng(0)
    for cid in ("a", "b", "c", "d"):
        monitor.observe(cid, rng.standard_normal((2, 16)))
    assert sorted(monitor.report()) == ["b", "c", "d"]  # least recently active dropped
    monitor.observe("b", rng.standard_normal((1000, 16)))
    assert monitor.stats("b").distances == policy.history


def test_report_is_telemetry_ready() -> None:
    report = feed(line_search, 300, 0).report()
    data = report["client"].to_json()
    assert data["client"] == "client" and data["alarm"] is True and data["queries"] == 300
    assert set(data) == {"client", "queries", "distances", "w", "p", "mean_distance", "alarm"}


@pytest.mark.parametrize("kwargs", [{"window": 1}, {"history": 2}, {"min_queries": 1}, {"threshold": 1.0},
                                    {"warmup": 0}, {"features": 0}, {"batch": 0}])
def test_policy_bounds(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        MonitorPolicy(**kwargs)  # type: ignore[arg-type]



def test_batched_processing_equals_processing_each_query_on_arrival() -> None:
    """Queries are processed in vectorised batches; the statistics must not depend on the batching."""
    rows = np.random.default_rng(8).standard_normal((700, 16))
    eager = ExtractionMonitor(MonitorPolicy(batch=1))
    lazy = ExtractionMonitor(MonitorPolicy(batch=32))
    odd = ExtractionMonitor(MonitorPolicy(batch=7, window=50, warmup=10))
    odd_eager = ExtractionMonitor(MonitorPolicy(batch=1, window=50, warmup=10))
    for chunk in np.array_split(rows, 97):  # requests of 7 or 8 rows
        for m in (eager, lazy, odd, odd_eager):
            m.observe("c", chunk)
    a, b = eager.stats("c"), lazy.stats("c")
    assert (a.queries, a.distances, a.alarm) == (b.queries, b.distances, b.alarm)
    assert a.mean_distance == pytest.approx(b.mean_distance, rel=1e-12)
    assert a.w is not None and b.w is not None
    c, d = odd.stats("c"), odd_eager.stats("c")
    assert c.mean_distance == pytest.approx(d.mean_distance, rel=1e-12) and c.queries == d.queries == 700


def test_monitor_keeps_its_own_copy_of_the_queries() -> None:
    monitor = ExtractionMonitor()
    x = np.zeros((1, 16))
    for i in range(200):
        x[0, 0] = i  # the caller reuses its array between requests
        monitor.observe("c", x)
    stats = monitor.stats("c")
    assert stats.queries == 200 and stats.mean_distance == pytest.approx(1.0)


def test_alarm_flag_trails_by_less_than_a_batch() -> None:
    policy = MonitorPolicy(batch=8)
    monitor = ExtractionMonitor(policy)
    queries = 0
    for x in grid_search(np.random.default_rng(0), 400):
        monitor.observe("c", x[np.newaxis, :])
        queries += 1
        if monitor.alarm("c"):
            break
    assert monitor.alarm("c")
    assert queries <= policy.warmup + policy.min_queries + policy.test_every + policy.batch
