"""Rollout plans and target groups, and the deterministic split of a group into phases (pure).

A :class:`Plan` is read from a mapping whose keys are the plan file's (``PLAN.toml``) and, with
``-`` for ``_``, the options of ``fleet-server rollout create``:

* ``canary`` - the canary group: a count (``2``) or a percentage of the group (``"10%"``);
  ``canary_devices`` - devices named into the canary (before the counted ones).
* ``phases`` - cumulative percentages of the group (``[10, 50, 100]``), or ``phase_counts`` -
  cumulative device counts (``[5, 20, 50]``); the canary counts towards them.
* ``canary_success_percent`` (default 100), ``success_percent`` (default 95): a phase advances once
  that share of its devices succeeded.
* ``abort_failure_percent`` (default 20), ``min_executed`` (default 1), ``abort_on`` (default every
  failure kind): abort once at least ``min_executed`` devices finished and the share of one kind
  among them exceeds ``abort_failure_percent``.
* ``device_timeout_s`` (default 3600), ``retries`` (0-10; a device that timed out or failed to
  install is assigned again), ``max_rate`` (devices per minute, default unlimited), ``approval``
  (an approval before each phase after the canary), ``window`` (``"22-04"``: UTC hours, start
  inclusive, end exclusive), ``rollback_on_abort`` (send updated devices back to their previous
  release on abort), ``grace_s`` (the release assignment's grace).

Membership: the group's devices are ordered by ``order_key`` = sha256(rollout id, device id); named
canary devices come first, then the order decides. :func:`split_phases` gives each device its phase.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from protocol.errors import EdgeError

FAILURE_KINDS = ("failed", "rolled_back", "timed_out", "untrusted_after_update")
MAX_RETRIES = 10
MAX_TIMEOUT_S = 30 * 86_400.0
_WINDOW_RE = re.compile(r"^(\d{1,2})-(\d{1,2})$")
_TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
_PLAN_KEYS = frozenset({
    "canary", "canary_devices", "phases", "phase_counts", "canary_success_percent", "success_percent",
    "abort_failure_percent", "min_executed", "abort_on", "device_timeout_s", "retries", "max_rate",
    "approval", "window", "rollback_on_abort", "grace_s"})


class RolloutError(EdgeError):
    """A rollout, its plan or its group is invalid, or an operation does not apply to it."""


@dataclass(frozen=True, slots=True)
class Group:
    """The target group: devices of ``device_class`` matching every criterion given."""

    device_class: str
    firmware: str | None = None
    tags: tuple[str, ...] = ()
    devices: tuple[str, ...] = ()

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Group:
        d = json.loads(text)
        return cls(d["device_class"], d.get("firmware"), tuple(d.get("tags", ())),
                   tuple(d.get("devices", ())))


@dataclass(frozen=True, slots=True)
class Plan:
    """A rollout plan (see the module docstring)."""

    canary: int = 1
    canary_percent: float | None = None
    canary_devices: tuple[str, ...] = ()
    phases: tuple[float, ...] = (100.0,)
    phase_counts: tuple[int, ...] = ()
    canary_success_percent: float = 100.0
    success_percent: float = 95.0
    abort_failure_percent: float = 20.0
    min_executed: int = 1
    abort_on: tuple[str, ...] = FAILURE_KINDS
    device_timeout_s: float = 3600.0
    retries: int = 0
    max_rate: int | None = None
    approval: bool = False
    window: tuple[int, int] | None = None
    rollback_on_abort: bool = False
    grace_s: float = 86_400.0

    @property
    def device_timeout_ms(self) -> int:
        return round(self.device_timeout_s * 1000)

    def phase_count(self) -> int:
        """Phases including the canary (index 0)."""
        return 1 + (len(self.phase_counts) if self.phase_counts else len(self.phases))

    def threshold(self, phase: int) -> float:
        return self.canary_success_percent if phase == 0 else self.success_percent

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Plan:
        d = json.loads(text)
        for key in ("canary_devices", "phases", "phase_counts", "abort_on"):
            d[key] = tuple(d[key])
        if d.get("window") is not None:
            d["window"] = (int(d["window"][0]), int(d["window"][1]))
        return cls(**d)


def _number(key: str, value: Any, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise RolloutError(f"plan: {key} must be a number from {lo:g} to {hi:g}, not {value!r}"[:200])
    return float(value)


def _integer(key: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise RolloutError(f"plan: {key} must be a whole number from {lo} to {hi}, not {value!r}"[:200])
    return value


def parse_window(text: str) -> tuple[int, int]:
    """``"22-04"`` -> (22, 4): UTC hours, start inclusive, end exclusive (may wrap midnight)."""
    m = _WINDOW_RE.fullmatch(text.strip())
    if m is None or not (0 <= int(m[1]) <= 23 and 0 <= int(m[2]) <= 24) or int(m[1]) == int(m[2]):
        raise RolloutError(f"plan: window {text[:20]!r}: expected START-END in UTC hours, e.g. 22-04")
    return int(m[1]), int(m[2])


def in_window(window: tuple[int, int] | None, now_ms: int) -> bool:
    """Whether ``now_ms`` (Unix ms) falls in the maintenance window (always, without one)."""
    if window is None:
        return True
    hour = (now_ms // 3_600_000) % 24
    start, end = window
    return start <= hour < end if start < end else hour >= start or hour < end


def _number_list(key: str, value: Any) -> list[Any]:
    if isinstance(value, str):
        try:
            return [float(v) if "." in v else int(v) for v in value.split(",") if v.strip()]
        except ValueError:
            raise RolloutError(f"plan: {key} must be numbers separated by commas, not {value[:60]!r}"
                               ) from None
    if not isinstance(value, list | tuple) or not value:
        raise RolloutError(f"plan: {key} must be a non-empty list of numbers")
    return list(value)


def parse_plan(data: Mapping[str, Any]) -> Plan:
    """A :class:`Plan` from the plan file's keys (None values are left at their defaults)."""
    unknown = sorted(set(data) - _PLAN_KEYS)
    if unknown:
        raise RolloutError(f"plan: unknown key {unknown[0]!r} (known: {', '.join(sorted(_PLAN_KEYS))})")
    d = {k: v for k, v in data.items() if v is not None}
    kw: dict[str, Any] = {}
    if "canary" in d:
        canary = d["canary"]
        if isinstance(canary, str) and canary.strip().endswith("%"):
            try:
                pct = float(canary.strip()[:-1])
            except ValueError:
                raise RolloutError(f"plan: canary {canary[:20]!r}: expected N or N%") from None
            kw["canary_percent"] = _number("canary", pct, 0, 100)
            kw["canary"] = 0
        else:
            if isinstance(canary, str):
                if not canary.strip().isdigit():
                    raise RolloutError(f"plan: canary {canary[:20]!r}: expected N or N%")
                canary = int(canary)
            kw["canary"] = _integer("canary", canary, 0, 1_000_000)
    if "canary_devices" in d:
        names = d["canary_devices"]
        if isinstance(names, str) or not isinstance(names, list | tuple) or \
                not all(isinstance(n, str) for n in names):
            raise RolloutError("plan: canary_devices must be a list of device ids")
        kw["canary_devices"] = tuple(dict.fromkeys(names))
    if "phases" in d and "phase_counts" in d:
        raise RolloutError("plan: give phases (percentages) or phase_counts, not both")
    if "phases" in d:
        values = [_number("phases", v, 0, 100) for v in _number_list("phases", d["phases"])]
        if values != sorted(values):
            raise RolloutError("plan: phases are cumulative percentages and must not decrease")
        kw["phases"] = tuple(values)
    if "phase_counts" in d:
        counts = [_integer("phase_counts", v, 0, 10_000_000) for v in _number_list("phase_counts",
                                                                                   d["phase_counts"])]
        if counts != sorted(counts):
            raise RolloutError("plan: phase_counts are cumulative and must not decrease")
        kw["phase_counts"] = tuple(counts)
        kw["phases"] = ()
    for key in ("canary_success_percent", "success_percent", "abort_failure_percent"):
        if key in d:
            kw[key] = _number(key, d[key], 0, 100)
    if "min_executed" in d:
        kw["min_executed"] = _integer("min_executed", d["min_executed"], 1, 10_000_000)
    if "abort_on" in d:
        kinds = d["abort_on"]
        kinds = [k.strip() for k in kinds.split(",")] if isinstance(kinds, str) else kinds
        if not isinstance(kinds, list | tuple) or not kinds or any(k not in FAILURE_KINDS for k in kinds):
            raise RolloutError(f"plan: abort_on takes failure kinds of: {', '.join(FAILURE_KINDS)}")
        kw["abort_on"] = tuple(dict.fromkeys(kinds))
    if "device_timeout_s" in d:
        kw["device_timeout_s"] = _number("device_timeout_s", d["device_timeout_s"], 1, MAX_TIMEOUT_S)
    if "retries" in d:
        kw["retries"] = _integer("retries", d["retries"], 0, MAX_RETRIES)
    if "max_rate" in d:
        kw["max_rate"] = _integer("max_rate", d["max_rate"], 1, 1_000_000)
    for key in ("approval", "rollback_on_abort"):
        if key in d:
            if not isinstance(d[key], bool):
                raise RolloutError(f"plan: {key} must be true or false")
            kw[key] = d[key]
    if "window" in d:
        if not isinstance(d["window"], str):
            raise RolloutError("plan: window must be a string like \"22-04\"")
        kw["window"] = parse_window(d["window"])
    if "grace_s" in d:
        kw["grace_s"] = _number("grace_s", d["grace_s"], 0, MAX_TIMEOUT_S)
    return Plan(**kw)


def validate_tag(tag: str) -> str:
    if _TAG_RE.fullmatch(tag) is None:
        raise RolloutError(f"tag {tag[:70]!r}: letters, digits, '.', '_', ':', '-' (at most 64, no leading "
                           "punctuation)")
    return tag


def order_key(rollout_id: str, device_id: str) -> str:
    """The deterministic order of a device in a rollout: sha256(rollout id, NUL, device id), hex."""
    return hashlib.sha256(f"{rollout_id}\0{device_id}".encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Placed:
    device_id: str
    phase: int
    order_key: str


def split_phases(rollout_id: str, plan: Plan, device_ids: Sequence[str]) -> list[Placed]:
    """Each device of the group with its phase, in rollout order (canary first). Devices beyond the
    last phase's cumulative size are left out."""
    ids = sorted(set(device_ids))
    keys = {i: order_key(rollout_id, i) for i in ids}
    missing = [n for n in plan.canary_devices if n not in keys]
    if missing:
        raise RolloutError(f"canary device {missing[0]!r} is not in the target group")
    named = list(plan.canary_devices)
    rest = sorted((i for i in ids if i not in set(named)), key=lambda i: (keys[i], i))
    ordered = named + rest
    total = len(ordered)
    counted = (math.ceil(plan.canary_percent * total / 100) if plan.canary_percent is not None
               else plan.canary)
    canary = min(total, len(named) + counted)
    bounds = [canary]
    cumulative = (list(plan.phase_counts) if plan.phase_counts
                  else [math.ceil(p * total / 100 - 1e-9) for p in plan.phases])
    for c in cumulative:
        bounds.append(max(bounds[-1], min(total, c)))
    out: list[Placed] = []
    start = 0
    for phase, end in enumerate(bounds):
        out.extend(Placed(i, phase, keys[i]) for i in ordered[start:end])
        start = end
    return out
