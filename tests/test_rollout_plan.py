"""The pure rollout planner and progress rules (fleet_server/rollouts): plan parsing, deterministic
phase membership, canary by count / percentage / names, windows, rate, judging, abort, advance."""

from __future__ import annotations

from typing import Any

import pytest

from fleet_server.rollouts import engine
from fleet_server.rollouts.plan import (
    Group,
    Plan,
    RolloutError,
    in_window,
    order_key,
    parse_plan,
    split_phases,
)

DEVICES = [f"cam-{i:02d}" for i in range(20)]
HOUR = 3_600_000


def _sizes(plan: Plan, devices: list[str] = DEVICES, rid: str = "r1") -> list[int]:
    sizes = [0] * plan.phase_count()
    for p in split_phases(rid, plan, devices):
        sizes[p.phase] += 1
    return sizes


@pytest.mark.parametrize(("keys", "sizes"), [
    ({"canary": 1, "phases": [10, 50, 100]}, [1, 1, 8, 10]),
    ({"canary": 2, "phases": [100]}, [2, 18]),
    ({"canary": "10%", "phases": [50, 100]}, [2, 8, 10]),
    ({"canary": "3%", "phases": [100]}, [1, 19]),  # ceil
    ({"canary": 0, "phases": [25, 100]}, [0, 5, 15]),
    ({"canary": 1, "phase_counts": [5, 12]}, [1, 4, 7]),  # the rest is not in the rollout
    ({"canary": 30, "phases": [100]}, [20, 0]),
    ({"canary_devices": ["cam-07", "cam-03"], "canary": 1, "phases": [100]}, [3, 17]),
    ({"phases": "10,50,100"}, [1, 1, 8, 10]),  # the CLI's form
])
def test_phase_sizes(keys: dict[str, Any], sizes: list[int]) -> None:
    assert _sizes(parse_plan(keys)) == sizes


def test_membership_is_deterministic_and_depends_on_the_rollout_id() -> None:
    plan = parse_plan({"canary": 2, "phases": [50, 100]})
    first = split_phases("r1", plan, DEVICES)
    assert first == split_phases("r1", plan, list(reversed(DEVICES)))  # input order does not matter
    assert [p.order_key for p in first[2:]] == sorted(p.order_key for p in first[2:])
    other = split_phases("r2", plan, DEVICES)
    assert [p.device_id for p in first] != [p.device_id for p in other]
    # The order is sha256(rollout id, device id): stable across processes and versions.
    assert order_key("r1", "cam-01") == order_key("r1", "cam-01") != order_key("r1", "cam-02")
    by_phase = {p.device_id: p.phase for p in first}
    canary = sorted(DEVICES, key=lambda i: order_key("r1", i))[:2]
    assert all(by_phase[i] == 0 for i in canary)


def test_named_canary_devices_come_first_and_must_be_in_the_group() -> None:
    placed = split_phases("r1", parse_plan({"canary_devices": ["cam-05"], "canary": 0, "phases": [100]}),
                          DEVICES)
    assert placed[0].device_id == "cam-05" and placed[0].phase == 0
    assert [p.phase for p in placed].count(0) == 1
    with pytest.raises(RolloutError, match="not in the target group"):
        split_phases("r1", parse_plan({"canary_devices": ["cam-99"]}), DEVICES)


@pytest.mark.parametrize(("keys", "message"), [
    ({"canary": "x"}, "expected N or N%"),
    ({"canary": -1}, "canary must be a whole number"),
    ({"phases": [50, 10]}, "must not decrease"),
    ({"phases": [10], "phase_counts": [1]}, "not both"),
    ({"phases": [150]}, "phases must be a number from 0 to 100"),
    ({"retries": 11}, "retries must be a whole number from 0 to 10"),
    ({"abort_on": ["bricked"]}, "abort_on takes failure kinds"),
    ({"window": "25-3"}, "expected START-END"),
    ({"window": "4-4"}, "expected START-END"),
    ({"approval": "yes"}, "approval must be true or false"),
    ({"cannary": 1}, "unknown key 'cannary'"),
    ({"device_timeout_s": 0}, "device_timeout_s must be a number"),
])
def test_bad_plans_are_refused_in_one_line(keys: dict[str, Any], message: str) -> None:
    with pytest.raises(RolloutError, match=message) as info:
        parse_plan(keys)
    assert "\n" not in info.value.diagnostics()


def test_plan_and_group_round_trip_through_json() -> None:
    plan = parse_plan({"canary": "10%", "phases": [50, 100], "window": "22-04", "retries": 2,
                       "abort_on": ["untrusted_after_update"], "max_rate": 5, "approval": True})
    assert Plan.from_json(plan.to_json()) == plan
    group = Group("edge-camera", "1.2.0", ("lab",), ("cam-1",))
    assert Group.from_json(group.to_json()) == group


@pytest.mark.parametrize(("window", "hour", "open_"), [
    (None, 12, True), ((22, 4), 22, True), ((22, 4), 3, True), ((22, 4), 4, False), ((22, 4), 12, False),
    ((1, 5), 1, True), ((1, 5), 5, False), ((0, 24), 23, True),
])
def test_maintenance_window(window: tuple[int, int] | None, hour: int, open_: bool) -> None:
    assert in_window(window, 1_790_000_000_000 // (24 * HOUR) * (24 * HOUR) + hour * HOUR + 5) is open_


def _m(device_id: str, phase: int, state: str, *, assigned_at: int | None = None,
       finished_at: int | None = None, attempts: int = 0) -> engine.Member:
    return engine.Member(device_id, phase, order_key("r1", device_id), state, attempts, assigned_at,
                         finished_at)


NOW = 1_790_000_000_000


@pytest.mark.parametrize(("seen", "attempts", "state"), [
    (engine.Observed("committed", "", NOW, True, "trusted", NOW - 10), 1, "succeeded"),
    (engine.Observed("committed", "", NOW, False, "trusted", NOW - 10), 1, None),  # not on the release yet
    (engine.Observed("rebooting", "", NOW, False, "untrusted", NOW), 1, "untrusted_after_update"),
    (engine.Observed("rebooting", "", NOW, False, "untrusted", NOW - 5000), 1, None),  # untrusted before
    (engine.Observed("rolled_back", "health", NOW, False, "trusted", NOW), 1, "rolled_back"),
    (engine.Observed("rolled_back", "health", NOW, False, "trusted", NOW), 0, "rolled_back"),  # no retry
    (engine.Observed("failed", "disk full", NOW, False, "trusted", NOW), 1, "pending"),  # retried
    (engine.Observed("failed", "disk full", NOW, False, "trusted", NOW), 2, "failed"),
])
def test_judge(seen: engine.Observed, attempts: int, state: str | None) -> None:
    plan = parse_plan({"retries": 1, "device_timeout_s": 60})
    judged = engine.judge(_m("cam-1", 0, "assigned", assigned_at=NOW - 1000, attempts=attempts), seen, plan,
                          NOW)
    assert (judged.state if judged else None) == state


@pytest.mark.parametrize(("seen", "attempts", "state"), [
    (engine.ModelObserved("loaded", "", "1.31.1", NOW, "trusted", NOW - 10), 1, "succeeded"),
    (engine.ModelObserved("loaded", "", "1.31.1", NOW, "quarantined", NOW - 10), 1, None),  # not trusted
    (engine.ModelObserved(None, "", "", NOW, "trusted", NOW - 10), 1, None),  # no load report yet
    (engine.ModelObserved(None, "", "", NOW, "untrusted", NOW), 1, "untrusted_after_update"),
    (engine.ModelObserved(None, "", "", NOW, "untrusted", NOW - 5000), 1, None),  # untrusted before
    (engine.ModelObserved("failed", "INVALID_GRAPH", "1.31.1", NOW, "trusted", NOW), 1, "pending"),  # retried
    (engine.ModelObserved("failed", "INVALID_GRAPH", "1.31.1", NOW, "trusted", NOW), 2, "failed"),
])
def test_judge_of_a_model_version(seen: engine.ModelObserved, attempts: int, state: str | None) -> None:
    plan = parse_plan({"retries": 1, "device_timeout_s": 60})
    member = _m("cam-1", 0, "assigned", assigned_at=NOW - 1000, attempts=attempts)
    judged = engine.judge(member, seen, plan, NOW)
    assert (judged.state if judged else None) == state
    if state == "failed":
        assert judged is not None and judged.reason == "onnxruntime 1.31.1 failed to load it: INVALID_GRAPH"
    in_flight = engine.ModelObserved(None, "", "", NOW, "trusted", 0)
    timed_out = engine.judge(member, in_flight, plan, NOW + 59_000)
    assert timed_out is not None and "no trusted load of the version within 60 s" in timed_out.reason


def test_judge_times_out_and_retries() -> None:
    plan = parse_plan({"retries": 1, "device_timeout_s": 60})
    seen = engine.Observed("assigned", "", NOW, False, "trusted", 0)
    member = _m("cam-1", 0, "assigned", assigned_at=NOW - 60_000, attempts=1)
    assert engine.judge(member, seen, plan, NOW - 1) is None
    retried = engine.judge(member, seen, plan, NOW)
    assert retried is not None and retried.state == "pending" and "timed_out" in retried.reason
    final = engine.judge(_m("cam-1", 0, "assigned", assigned_at=NOW - 60_000, attempts=2), seen, plan, NOW)
    assert final is not None and final.state == "timed_out" and final.finished_at == NOW


def test_decide_assigns_the_canary_then_advances_phase_by_phase() -> None:
    plan = parse_plan({"canary": 1, "phases": [50, 100]})
    members = [_m("a", 0, "pending"), _m("b", 1, "pending"), _m("c", 2, "pending"), _m("d", 2, "pending")]
    d = engine.decide(plan, 0, members, approved=(), now=NOW)
    assert (d.state, d.phase, d.assign) == ("running", 0, ("a",))
    members[0] = _m("a", 0, "succeeded", finished_at=NOW)
    d = engine.decide(plan, 0, members, approved=(), now=NOW)
    assert (d.phase, d.assign) == (1, ("b",))
    members[1] = _m("b", 1, "succeeded", finished_at=NOW)
    d = engine.decide(plan, 1, members, approved=(), now=NOW)
    assert (d.phase, set(d.assign)) == (2, {"c", "d"})
    members[2:] = [_m("c", 2, "succeeded"), _m("d", 2, "succeeded")]
    assert engine.decide(plan, 2, members, approved=(), now=NOW).state == "completed"


def test_decide_aborts_when_a_failure_kind_crosses_its_threshold_after_min_executed() -> None:
    plan = parse_plan({"canary": 2, "phases": [100], "abort_failure_percent": 40, "min_executed": 2,
                       "abort_on": ["untrusted_after_update"]})
    one_bad = [_m("a", 0, "untrusted_after_update", finished_at=NOW - 5), _m("b", 0, "assigned",
                                                                             assigned_at=NOW),
               _m("c", 1, "pending")]
    assert engine.decide(plan, 0, one_bad, approved=(), now=NOW).state == "running"  # 1 < min_executed
    one_bad[1] = _m("b", 0, "succeeded", finished_at=NOW)
    d = engine.decide(plan, 0, one_bad, approved=(), now=NOW)
    assert (d.state, d.abort_trigger_at, d.assign) == ("aborted", NOW - 5, ())
    assert "1 of 2 finished devices untrusted_after_update (50% > 40%)" in d.reason
    # A kind not chosen does not count; the canary below its threshold still stops the rollout.
    timed = [_m("a", 0, "timed_out", finished_at=NOW - 5), _m("b", 0, "succeeded"), _m("c", 1, "pending")]
    d = engine.decide(plan, 0, timed, approved=(), now=NOW)
    assert d.state == "aborted" and "phase 0 finished with 50% succeeded (needs 100%)" in d.reason


def test_decide_waits_for_approval_window_and_rate() -> None:
    members = [_m("a", 0, "succeeded"), *[_m(x, 1, "pending") for x in "bcde"]]
    plan = parse_plan({"canary": 1, "phases": [100], "approval": True})
    d = engine.decide(plan, 0, members, approved=(), now=NOW)
    assert (d.phase, d.assign, d.waiting) == (1, (), "phase 1 waits for its approval")
    assert len(engine.decide(plan, 1, members, approved={1}, now=NOW).assign) == 4
    hour = (NOW // HOUR) % 24
    closed = parse_plan({"window": f"{(hour + 1) % 24}-{(hour + 2) % 24}"})
    assert engine.decide(closed, 1, members, approved=(), now=NOW).waiting == "outside the maintenance window"
    rated = parse_plan({"max_rate": 3})
    d = engine.decide(rated, 1, members, approved=(), now=NOW)
    assert len(d.assign) == 3 and d.assign == tuple(sorted(d.assign, key=lambda i: order_key("r1", i)))
    busy = [*members[:3], _m("d", 1, "assigned", assigned_at=NOW - 10), _m("e", 1, "assigned",
                                                                           assigned_at=NOW - 59_000)]
    d = engine.decide(rated, 1, busy, approved=(), now=NOW)
    assert len(d.assign) == 1
    d = engine.decide(rated, 1, [*busy[:3], _m("x", 1, "assigned", assigned_at=NOW), *busy[3:]],
                      approved=(), now=NOW)
    assert d.assign == () and d.waiting == "at the maximum rate (3/min)"


def test_progress_counts_per_phase() -> None:
    members = [_m("a", 0, "succeeded"), _m("b", 1, "failed"), _m("c", 1, "assigned"), _m("d", 1, "pending")]
    assert engine.progress(members, 2) == [engine.PhaseProgress(1, 1, 0, 0, 0),
                                           engine.PhaseProgress(3, 0, 1, 1, 1)]
