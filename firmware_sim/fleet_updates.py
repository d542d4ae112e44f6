"""Shipping a firmware release during a fleet harness run (``firmware-sim fleet --release BUNDLE_DIR``).

:class:`ReleaseAtTime` is the harness's update driver: the bundle is published (``fleet-server release
add``, class and version read from its ``release.json``) while the fleet is built; partway through
the measured window (``at`` seconds in) the release is assigned to every golden device at once
(``fleet-server release assign``); after the window :meth:`ReleaseAtTime.finish` waits, bounded by the
assignments' deadline, until every assignment is final (committed, rolled_back, failed) and the device
was appraised once more after it; :meth:`ReleaseAtTime.device_reports` gives each assigned device's
``"update"`` and ``"trust"`` report entries (docs/harness.md, "Updates during a run").

A different orchestration (a staged rollout) replaces it through the :class:`UpdateDriver` protocol:
:meth:`FleetHarness.run` calls ``tick`` every second of the window, ``finish`` after it, and the report
takes ``device_reports()`` and ``summary()`` (its top-level entries).
:class:`firmware_sim.fleet_rollout.RolloutDriver` is the staged one (``--rollout PLAN.toml``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from protocol.errors import ConfigError, EdgeError
from protocol.release import RELEASE_FILE

if TYPE_CHECKING:
    from firmware_sim.fleet import FleetHarness

FINAL_STATES = frozenset({"committed", "rolled_back", "failed"})
"""Assignment states after which the device does nothing more for the release."""
POLL_S = 0.5
REAPPRAISAL_TIMEOUT_S = 60.0
"""After an assignment ended, how long to wait for the device's next appraisal (its "after" state)."""


@dataclass(frozen=True, slots=True)
class ReleaseBundle:
    """A release bundle folder (``firmware-sim release build``) and what its ``release.json`` says."""

    path: Path
    device_class: str
    version: str

    @classmethod
    def read(cls, path: Path) -> ReleaseBundle:
        """Read ``path/release.json``; :class:`ConfigError` (one line) if it is not a bundle folder."""
        from firmware_sim.release import read_manifest

        folder = Path(path)
        if not folder.is_dir():
            raise ConfigError(f"release: {folder} is not a folder "
                              "(a bundle from `firmware-sim release build`)")
        try:
            manifest = read_manifest(folder / RELEASE_FILE)
        except EdgeError as exc:
            raise ConfigError(f"release: {exc.diagnostics()}") from None
        return cls(folder, manifest.device_class, manifest.version)


class UpdateDriver(Protocol):
    """What :meth:`FleetHarness.run` drives an update orchestration with."""

    def tick(self, harness: FleetHarness, elapsed_s: float) -> None:
        """Called about every second of the measured window (``elapsed_s`` since its start)."""

    def finish(self, harness: FleetHarness) -> None:
        """Called after the window (not after a stop request): wait, bounded, for the updates to end."""

    def device_reports(self, harness: FleetHarness) -> dict[str, dict[str, Any]]:
        """Per assigned device, keys added to its report entry (``update``, ``trust``)."""

    def summary(self) -> dict[str, Any]:
        """The report's top-level entries (``update``; a rollout's driver adds ``rollout``)."""


@dataclass(slots=True)
class _Assigned:
    assignment_id: str
    from_version: str
    before: str
    assigned_ms: int


class ReleaseAtTime:
    """Assign ``target`` to every golden device ``at_s`` seconds into the window (see the module
    docstring); ``deadline_s`` is the assignments' deadline and bounds :meth:`finish`."""

    def __init__(self, target: str, version: str, *, at_s: float, deadline_s: float) -> None:
        self.target = target
        self.version = version
        self.at_s = at_s
        self.deadline_s = deadline_s
        self.assigned: dict[str, _Assigned] = {}
        self.assigned_at_s: float | None = None
        self.waited_s: float | None = None
        self._final: dict[str, dict[str, Any]] = {}
        self._states: dict[str, int] = {}

    def tick(self, harness: FleetHarness, elapsed_s: float) -> None:
        if self.assigned_at_s is not None or elapsed_s < self.at_s:
            return
        self.assigned_at_s = elapsed_s
        from fleet_server.storage.models import ATTESTED_STATES

        rows = harness.device_states()
        golden = harness.golden_device_ids()
        devices = [d for d in golden if d in rows and rows[d].state in ATTESTED_STATES]
        if len(devices) < len(golden):
            skipped = sorted(set(golden) - set(devices))
            harness.progress(f"not assigning {self.target} to {len(skipped)} devices not attested "
                             f"(e.g. {skipped[0]})")
        if not devices:
            return
        versions = harness.firmware_versions()
        now = int(time.time() * 1000)
        ids = harness.assign_release(self.target, devices, deadline_s=self.deadline_s)
        for device_id, assignment_id in ids.items():
            before = rows[device_id].state if device_id in rows else "unknown"
            self.assigned[device_id] = _Assigned(assignment_id, versions.get(device_id, ""), before, now)
        harness.progress(f"{self.target} assigned to {len(ids)} devices at {elapsed_s:.1f} s")

    def _pending(self, harness: FleetHarness) -> list[str]:
        """Assigned devices whose assignment is not final, or that were not appraised since it ended
        (recording the final ones in ``self._final``)."""
        if not self.assigned:
            return []
        by_id = harness.assignments(self.target)
        last = harness.last_appraisals(list(self.assigned))
        pending = []
        for device_id, assigned in self.assigned.items():
            found = by_id.get(assigned.assignment_id, {})
            if found.get("state") in FINAL_STATES:
                self._final[device_id] = found
                if last.get(device_id, 0) > int(found.get("updated_at") or 0):
                    continue
            pending.append(device_id)
        return pending

    def finish(self, harness: FleetHarness) -> None:
        if not self.assigned:
            return
        start = time.monotonic()
        deadline = start + self.deadline_s
        ended_at: float | None = None
        harness.progress(f"waiting for {len(self.assigned)} devices to finish updating to {self.version}")
        while (pending := self._pending(harness)):
            now = time.monotonic()
            if all(d in self._final for d in pending):  # only the re-appraisals are missing
                ended_at = now if ended_at is None else ended_at
                if now - ended_at > REAPPRAISAL_TIMEOUT_S:
                    break
            if now > deadline or harness.stop_requested:
                harness.progress(f"{len(pending)} devices did not finish updating (e.g. {pending[0]})")
                break
            harness.sleep(POLL_S)
        self.waited_s = round(time.monotonic() - start, 3)

    def device_reports(self, harness: FleetHarness) -> dict[str, dict[str, Any]]:
        if not self.assigned:
            return {}
        by_id = harness.assignments(self.target)
        versions = harness.firmware_versions()
        rows = harness.device_states()
        out: dict[str, dict[str, Any]] = {}
        for device_id, assigned in self.assigned.items():
            found = by_id.get(assigned.assignment_id, {})
            state = str(found.get("state", "unknown"))
            ended = int(found.get("updated_at") or 0) if state in FINAL_STATES else None
            during = harness.states_between(device_id, assigned.before, assigned.assigned_ms, ended)
            out[device_id] = {
                "update": {"from": assigned.from_version, "to": self.version, "state": state,
                           "reason": found.get("reason") or None, "version_after": versions.get(device_id),
                           "trial_tamper": harness.devices[device_id].sim.trial_tamper},
                "trust": {"before": assigned.before, "during": during,
                          "after": rows[device_id].state if device_id in rows else "unknown"},
            }
        self._states = count_states([entry["update"]["state"] for entry in out.values()])
        return out

    def summary(self) -> dict[str, Any]:
        at_s = None if self.assigned_at_s is None else round(self.assigned_at_s, 3)
        return {"update": {"target": self.target, "version": self.version, "assigned_at_s": at_s,
                           "assigned_devices": len(self.assigned), "wait_after_window_s": self.waited_s,
                           "states": dict(self._states)}}


def count_states(values: Sequence[str]) -> dict[str, int]:
    """``{value: how many}``, sorted by value."""
    counts: dict[str, int] = {}
    for value in values:
        counts[str(value)] = counts.get(str(value), 0) + 1
    return dict(sorted(counts.items()))


__all__ = ["FINAL_STATES", "ReleaseAtTime", "ReleaseBundle", "UpdateDriver", "count_states"]
