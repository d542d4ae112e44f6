"""Benchmark: a staged rollout through the fleet harness, end to end.

Two runs of ``firmware-sim fleet --release BUNDLE --rollout PLAN.toml``
(:func:`firmware_sim.fleet.measure` with ``FleetConfig(release=..., rollout=...)``: real swtpm
devices, Mosquitto, ``fleet-server run`` whose workers step the rollout, agents that download
through TUF, install, power-cycle and are attested), :data:`DEVICES` golden devices, plan
:data:`PLAN` (a canary of one, then half, then all):

* ``rollout_devices_per_min``: a good release; devices that succeeded (committed **and** attested
  trusted on the release) per minute from the rollout's start to its completion, as the server
  recorded them (``rollout.started_at`` / ``finished_at``). With a small fleet each phase costs
  about one update's latency (``update_apply_s_p50``), so this measures the phase gating, not
  bandwidth;
* ``rollout_abort_s``: the same with the canary booting a wrong image after installing
  (``bad_update=1``, named into the canary): seconds from the failure that crossed the abort
  threshold (the untrusted evidence or the rollback report; ``rollout.abort_trigger_at``) to the
  abort written, after which no new assignment is made (``finished_at``). Bounded by the workers'
  scheduler tick.

About 45 seconds in all.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from firmware_sim.fleet import FleetConfig, HarnessError, measure
from firmware_sim.profiles import get_profile
from firmware_sim.release import build_release, from_profile

DEVICES = 6
PLAN = """\
canary = 1
phases = [50, 100]
abort_failure_percent = 20
min_executed = 1
device_timeout_s = 120
"""


def _rollout(report: dict[str, Any], state: str) -> dict[str, Any]:
    rollout = report.get("rollout")
    if rollout is None or rollout["state"] != state:
        raise HarnessError(f"the rollout ended {None if rollout is None else rollout['state']}, not {state}: "
                           f"{None if rollout is None else rollout['reason']}")
    return dict(rollout)


def run() -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="rollout-bench-") as tmp:
        bundle, plan = Path(tmp) / "bundle-1.3.0", Path(tmp) / "plan.toml"
        build_release(bundle, from_profile(get_profile("golden"), "1.3.0"))
        plan.write_text(PLAN)
        base = FleetConfig(devices=DEVICES, interval=1.0, duration=1.0, update_at=0.0, release=bundle,
                           rollout=plan, update_deadline=240.0)
        good = _rollout(measure(base), "completed")
        bad = _rollout(measure(replace(base, bad_update=1)), "aborted")
    return {"rollout_devices_per_min": float(good["devices_per_min"]),
            "rollout_abort_s": float(bad["abort_s"])}


if __name__ == "__main__":  # pragma: no cover - manual use: python -m firmware_sim.bench.rollout_bench
    print(run())
