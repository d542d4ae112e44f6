"""A staged rollout during a fleet harness run (``firmware-sim fleet --rollout PLAN.toml --release
BUNDLE_DIR [--bad K]``).

:class:`RolloutDriver` is the harness's :class:`~firmware_sim.fleet_updates.UpdateDriver` when a
plan is given (instead of :class:`~firmware_sim.fleet_updates.ReleaseAtTime`, which assigns the
release to every golden device at once): ``at`` seconds into the measured window it creates a
rollout of the published release (``fleet-server rollout create TARGET --plan PLAN.toml ... --json``,
see docs/rollouts.md) over the golden devices; the server's workers step it (assign phase by phase,
judge each device on its commit **and** its trusted attestation on the release, abort). The devices
that boot a wrong image after installing (``--bad K``: ``trial_tamper="kernel"``) are named into the
canary (the plan's ``canary_devices``; the plan's counted canary shrinks by as many, so the canary
keeps its size). After the window :meth:`RolloutDriver.finish` waits, bounded by ``deadline_s``,
until the rollout is final (completed, aborted, cancelled), then until every assignment it made is
final and its device was appraised once more after it (at most
:data:`~firmware_sim.fleet_updates.REAPPRAISAL_TIMEOUT_S`). The report gets a top-level
``"rollout"`` (state, reason, per phase devices / succeeded / failed / pending / assigned, timing)
and ``"update"`` (as with a plain release), and per group member ``"update"`` (the member's state and
reason) and ``"trust"`` (docs/harness.md, "A staged rollout during a run").
"""

from __future__ import annotations

import math
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from firmware_sim.fleet_updates import FINAL_STATES, POLL_S, REAPPRAISAL_TIMEOUT_S, count_states
from protocol.errors import ConfigError, EdgeError

if TYPE_CHECKING:
    from firmware_sim.fleet import FleetHarness
    from fleet_server.rollouts.plan import Plan

FINAL_ROLLOUT_STATES = frozenset({"completed", "aborted", "cancelled"})
MAX_PLAN_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class RolloutPlanFile:
    """A plan file (``PLAN.toml``, the keys of docs/rollouts.md) and the plan it parses to."""

    path: Path
    keys: dict[str, Any]
    plan: Plan

    @classmethod
    def read(cls, path: Path) -> RolloutPlanFile:
        """Read and check ``path``; :class:`ConfigError` (one line) if it is not a valid plan."""
        from fleet_server.rollouts.plan import parse_plan

        where = Path(path)
        try:
            data = where.read_bytes()
        except OSError as exc:
            raise ConfigError(f"rollout: cannot read the plan {where}: {exc.strerror or exc}") from None
        if len(data) > MAX_PLAN_BYTES:
            raise ConfigError(f"rollout: the plan {where} is larger than {MAX_PLAN_BYTES} bytes")
        try:
            keys = tomllib.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"rollout: the plan {where} is not valid TOML: {exc}") from None
        try:
            plan = parse_plan(keys)
        except EdgeError as exc:
            raise ConfigError(f"rollout: {where}: {exc.diagnostics()}") from None
        return cls(where, keys, plan)


def canary_for(plan: Plan, group_size: int, bad: list[str]) -> tuple[int, list[str]]:
    """The ``canary`` count and ``canary_devices`` that put the ``bad`` devices in the plan's canary
    without growing it: the named devices (the plan's, then the bad ones) first, and as many counted
    ones as the plan's canary size leaves (a percentage is taken of ``group_size``, rounded up as the
    server does)."""
    named = list(dict.fromkeys([*plan.canary_devices, *bad]))
    size = (math.ceil(plan.canary_percent * group_size / 100) if plan.canary_percent is not None
            else plan.canary) + len(plan.canary_devices)
    return max(0, size - len(named)), named


@dataclass(slots=True)
class _Member:
    from_version: str
    before: str


@dataclass(slots=True)
class RolloutDriver:
    """Create a rollout of ``target`` with ``plan`` ``at_s`` seconds into the window (see the module
    docstring); ``deadline_s`` bounds the wait after the window."""

    target: str
    version: str
    plan: RolloutPlanFile
    at_s: float
    deadline_s: float
    rollout_id: str | None = None
    created_at_s: float | None = None
    created_ms: int = 0
    waited_s: float | None = None
    members: dict[str, _Member] = field(default_factory=dict)
    _last: dict[str, Any] = field(default_factory=dict)
    _progress_key: tuple[str, int] = ("", -1)
    _states: dict[str, int] = field(default_factory=dict)

    # -- UpdateDriver --------------------------------------------------------------------------------
    def tick(self, harness: FleetHarness, elapsed_s: float) -> None:
        if self.rollout_id is None:
            if elapsed_s >= self.at_s:
                self._create(harness, elapsed_s)
            return
        self._poll(harness)

    def _create(self, harness: FleetHarness, elapsed_s: float) -> None:
        self.created_at_s = elapsed_s
        golden = harness.golden_device_ids()
        bad = [d for d in golden if harness.devices[d].sim.trial_tamper is not None]
        canary, named = canary_for(self.plan.plan, len(golden), bad)
        # The class is the group; only a fleet with other (tampered) devices of the class lists them.
        explicit = golden if len(golden) < len(harness.devices) else []
        rows = harness.device_states()
        versions = harness.firmware_versions()
        self.created_ms = int(time.time() * 1000)
        shown = harness.create_rollout(self.target, self.plan.path, canary=canary, canary_devices=named,
                                       devices=explicit)
        self.rollout_id = str(shown["id"])
        for m in shown["members"]:
            device_id = str(m["device_id"])
            self.members[device_id] = _Member(versions.get(device_id, ""),
                                              rows[device_id].state if device_id in rows else "unknown")
        self._last = shown
        sizes = ", ".join(str(p["devices"]) for p in shown["phases"])
        harness.progress(f"rollout {self.rollout_id} of {self.target} created at {elapsed_s:.1f} s: "
                         f"{len(self.members)} devices in phases [{sizes}] (canary first"
                         + (f"; {', '.join(bad)} named into it" if bad else "") + ")")

    def _poll(self, harness: FleetHarness) -> dict[str, Any]:
        assert self.rollout_id is not None
        shown = harness.rollout(self.rollout_id)
        self._last = shown
        key = (str(shown["state"]), int(shown["phase"]))
        if key != self._progress_key:
            self._progress_key = key
            done = " ".join(f"{p['succeeded']}/{p['devices']}" for p in shown["phases"])
            harness.progress(f"rollout {self.rollout_id}: {key[0]}, phase {key[1]} (succeeded per phase: "
                             f"{done})" + (f" - {shown['reason']}" if shown["reason"] else ""))
        return shown

    def finish(self, harness: FleetHarness) -> None:
        if self.rollout_id is None:
            return
        start = time.monotonic()
        deadline = start + self.deadline_s
        harness.progress(f"waiting for rollout {self.rollout_id} to end")
        while str(self._poll(harness)["state"]) not in FINAL_ROLLOUT_STATES:
            if time.monotonic() > deadline or harness.stop_requested:
                harness.progress(f"rollout {self.rollout_id} did not end within {self.deadline_s:g} s "
                                 f"({self._last['state']})")
                self.waited_s = round(time.monotonic() - start, 3)
                return
            harness.sleep(POLL_S)
        # The assignments in flight when it ended go on: wait for them and the appraisals after.
        settle = min(deadline, time.monotonic() + REAPPRAISAL_TIMEOUT_S)
        while (pending := self._unsettled(harness)):
            if time.monotonic() > settle or harness.stop_requested:
                harness.progress(f"{len(pending)} devices did not finish updating (e.g. {pending[0]})")
                break
            harness.sleep(POLL_S)
        self._poll(harness)
        self.waited_s = round(time.monotonic() - start, 3)

    def _unsettled(self, harness: FleetHarness) -> list[str]:
        """Members with an assignment not final yet, or not appraised since it ended."""
        by_id = harness.assignments(self.target)
        shown = harness.rollout(str(self.rollout_id))
        assigned = {str(m["device_id"]): str(m["assignment_id"]) for m in shown["members"]
                    if m["assignment_id"]}
        last = harness.last_appraisals(list(assigned))
        out = []
        for device_id, assignment_id in assigned.items():
            found = by_id.get(assignment_id, {})
            ended = int(found.get("updated_at") or 0)
            if found.get("state") in FINAL_STATES and last.get(device_id, 0) > ended:
                continue
            out.append(device_id)
        return out

    def device_reports(self, harness: FleetHarness) -> dict[str, dict[str, Any]]:
        if self.rollout_id is None:
            return {}
        shown = self._poll(harness)
        by_id = harness.assignments(self.target)
        versions = harness.firmware_versions()
        rows = harness.device_states()
        out: dict[str, dict[str, Any]] = {}
        for m in shown["members"]:
            device_id = str(m["device_id"])
            member = self.members.get(device_id, _Member("", "unknown"))
            found = by_id.get(str(m["assignment_id"]), {}) if m["assignment_id"] else {}
            a_state = found.get("state")
            ended = int(found.get("updated_at") or 0) if a_state in FINAL_STATES else None
            start = int(m["assigned_at"] or self.created_ms)
            out[device_id] = {
                "update": {"from": member.from_version, "to": self.version, "state": m["state"],
                           "reason": m["reason"] or None, "phase": m["phase"], "attempts": m["attempts"],
                           "assignment_state": a_state, "version_after": versions.get(device_id),
                           "trial_tamper": harness.devices[device_id].sim.trial_tamper
                           if device_id in harness.devices else None},
                "trust": {"before": member.before,
                          "during": harness.states_between(device_id, member.before, start, ended),
                          "after": rows[device_id].state if device_id in rows else "unknown"},
            }
        self._states = count_states([str(entry["update"]["state"]) for entry in out.values()])
        return out

    def summary(self) -> dict[str, Any]:
        shown = self._last
        update = {"target": self.target, "version": self.version,
                  "assigned_at_s": None if self.created_at_s is None else round(self.created_at_s, 3),
                  "assigned_devices": sum(1 for m in shown.get("members", []) if m["assignment_id"]),
                  "wait_after_window_s": self.waited_s, "states": dict(self._states)}
        if not shown:
            return {"update": update, "rollout": None}
        started, finished, trigger = shown["started_at"], shown["finished_at"], shown["abort_trigger_at"]
        succeeded = sum(p["succeeded"] for p in shown["phases"])
        duration_s = None if started is None or finished is None else max(0.0, (finished - started) / 1000)
        rollout = {
            "id": shown["id"], "plan": str(self.plan.path), "state": shown["state"], "phase": shown["phase"],
            "reason": shown["reason"] or None, "created_at_s": update["assigned_at_s"],
            "phases": [{k: p[k] for k in ("devices", "succeeded", "failed", "pending", "assigned")}
                       for p in shown["phases"]],
            "duration_s": duration_s,
            "devices_per_min": (round(60 * succeeded / duration_s, 3)
                                if duration_s and shown["state"] == "completed" else None),
            "abort_s": None if trigger is None or finished is None else max(0.0, (finished - trigger) / 1000),
        }
        return {"update": update, "rollout": rollout}


__all__ = ["FINAL_ROLLOUT_STATES", "RolloutDriver", "RolloutPlanFile", "canary_for"]
