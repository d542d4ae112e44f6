"""Helpers of the staged-rollout tests that run the whole fleet harness (real swtpm, Mosquitto and
``fleet-server run``): the release bundle, and :func:`run_rollout`, which runs a fleet whose
:class:`~firmware_sim.fleet_rollout.RolloutDriver` rolls the release out while an "operator" thread
acts on the rollout at chosen moments (pause it, cancel it, kill the server...)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from firmware_sim.cli import main as firmware_sim
from firmware_sim.fleet import FleetConfig, FleetHarness
from firmware_sim.fleet_rollout import RolloutDriver

TARGET = "firmware/edge-camera/1.3.0.fwb"
POLL_S = 0.2


def build_bundle(tmp_path: Path) -> Path:
    """``firmware-sim release build`` of the golden images at 1.3.0 (the fleet boots 1.2.0)."""
    bundle = tmp_path / "bundle-1.3.0"
    assert firmware_sim(["release", "build", str(bundle), "--from", "golden", "--version", "1.3.0"]) == 0
    return bundle


def now_ms() -> int:
    return time.time_ns() // 1_000_000


View = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Step:
    """When ``when(view)`` holds for the rollout (as ``rollout show --json`` prints it), run
    ``do(harness, view)`` once (on the operator thread; it may block)."""

    when: Callable[[View], bool]
    do: Callable[[FleetHarness, View], None]


def member_in(phase: int, state: str) -> Callable[[View], bool]:
    """A condition: some member of ``phase`` is in ``state``."""
    return lambda view: any(m["phase"] == phase and m["state"] == state for m in view["members"])


@dataclass(slots=True)
class Run:
    """What :func:`run_rollout` observed: the report, and after the run, the rollout (``rollout show
    --json``) and the release's assignment rows per device (oldest first)."""

    report: dict[str, Any]
    rollout: View
    assignments: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def members(self) -> dict[str, dict[str, Any]]:
        return {str(m["device_id"]): m for m in self.rollout["members"]}


class _Operator(threading.Thread):
    def __init__(self, harness: FleetHarness, steps: Sequence[Step]) -> None:
        super().__init__(daemon=True, name="rollout-operator")
        self.harness = harness
        self.steps = list(steps)
        self.done = 0
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            driver = self.harness.update_driver
            assert isinstance(driver, RolloutDriver)
            while self.done < len(self.steps) and not self.stop.is_set():
                if driver.rollout_id is not None:
                    view = self.harness.rollout(driver.rollout_id)
                    step = self.steps[self.done]
                    if step.when(view):
                        step.do(self.harness, view)
                        self.done += 1
                        continue
                self.stop.wait(POLL_S)
        except BaseException as exc:  # re-raised by run_rollout on the test's thread
            self.error = exc


def run_rollout(config: FleetConfig, steps: Sequence[Step] = (), *,
                before: Callable[[FleetHarness], None] | None = None) -> Run:
    """Start the fleet (then run ``before(harness)``), measure its window (the driver creates the
    rollout) while the operator runs ``steps`` in order, wait for the rollout to end, stop
    everything; every step must have run."""
    harness = FleetHarness(config)
    operator = _Operator(harness, steps)
    try:
        harness.start()
        if before is not None:
            before(harness)
        operator.start()
        measurement = harness.run()
        operator.stop.set()
        operator.join(60)
        harness.stop()
        driver = harness.update_driver
        assert isinstance(driver, RolloutDriver) and driver.rollout_id is not None
        rollout = harness.rollout(driver.rollout_id)
        rows: dict[str, list[dict[str, Any]]] = {}
        for a in sorted(harness.assignments(TARGET).values(), key=lambda a: int(a["created_at"])):
            rows.setdefault(str(a["device_id"]), []).append(a)
        report = harness.report(measurement)
    finally:
        operator.stop.set()
        harness.close()
    if operator.error is not None:
        raise operator.error
    assert operator.done == len(steps), f"only {operator.done} of {len(steps)} operator steps ran"
    return Run(report, rollout, rows)


__all__ = ["TARGET", "Run", "Step", "build_bundle", "member_in", "now_ms", "run_rollout"]
