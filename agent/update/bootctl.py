"""A/B boot control: the small file the bootloader and the agent share to pick the slot to boot.

A device has two firmware slots, ``a`` and ``b``, in its boot folder (``<boot>/slot-a/``,
``<boot>/slot-b/``, each holding the boot images of one release and that release's
``release.json``) and one control file ``<boot>/bootctl.json``::

    {"format": 1,
     "active": "a",                     # the committed slot: what boots when no trial is pending
     "booted": "a",                     # the slot the bootloader booted last (written by it)
     "trial": null | {"slot": "b", "tries_left": 1, "assignment_id": "<32 hex>",
                      "version": "1.3.0", "deadline": <ms>},
     "last_rollback": null | {"slot": "b", "version": "1.3.0", "assignment_id": "...",
                              "reason": "..."}}

Who writes what:

* the agent, after writing a release into the inactive slot: :func:`begin_trial` (a trial with a
  boot counter), then asks the platform to reboot;
* the bootloader at power-on: :func:`choose_boot_slot` - a trial with tries left is booted and its
  counter decremented *before* it boots (so a crash during the trial boot counts); a trial whose
  counter is spent is dropped and recorded as a rollback ("boot counter exhausted"), and the active
  slot boots;
* the agent, once its health checks pass and the server's signed verdict says the new measured
  state is trusted: :func:`commit` (the trial slot becomes active); otherwise :func:`abandon_trial`
  with the reason, then a reboot into the active slot.

Every write is atomic (:func:`agent.statefile.write_atomic`), so a power cut at any moment leaves the
old or the new control file, never a torn one.  A missing control file means "slot a, committed".
Malformed content is a :class:`~protocol.errors.StorageError`: the bootloader then boots ``active``
if it can read it, else slot ``a`` (never an unverified trial).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from agent.statefile import write_atomic
from protocol.errors import StorageError

SLOTS = ("a", "b")
CONTROL_FILE = "bootctl.json"
DEFAULT_TRIES = 1
RELEASE_FILE = "release.json"


class Rebooter(Protocol):
    """The platform's reboot: on hardware ``systemctl reboot``; in the simulator a power cycle."""

    def reboot(self, reason: str) -> None: ...


@dataclass(frozen=True, slots=True)
class Trial:
    slot: str
    tries_left: int
    assignment_id: str
    version: str
    deadline: int


@dataclass(frozen=True, slots=True)
class Rollback:
    slot: str
    version: str
    assignment_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class BootControl:
    active: str = "a"
    booted: str = "a"
    trial: Trial | None = None
    last_rollback: Rollback | None = None

    @property
    def inactive(self) -> str:
        return "b" if self.active == "a" else "a"

    @property
    def in_trial(self) -> bool:
        """True when the running system is the trial slot (booted, not yet committed)."""
        return self.trial is not None and self.booted == self.trial.slot

    def to_json(self) -> dict[str, Any]:
        rb = self.last_rollback
        return {"format": 1, "active": self.active, "booted": self.booted,
                "trial": None if self.trial is None else dataclasses.asdict(self.trial),
                "last_rollback": None if rb is None else dataclasses.asdict(rb)}


def slot_dir(boot_dir: Path, slot: str) -> Path:
    if slot not in SLOTS:
        raise StorageError(f"unknown boot slot {slot!r}")
    return Path(boot_dir) / f"slot-{slot}"


def _slot(v: Any, where: str) -> str:
    if v not in SLOTS:
        raise StorageError(f"{where}: boot slot must be 'a' or 'b'")
    return str(v)


def _parse(raw: bytes, path: Path) -> BootControl:
    try:
        obj = json.loads(raw)
        if not isinstance(obj, dict) or obj.get("format") != 1:
            raise ValueError("not a format-1 object")
        trial = None
        if obj.get("trial") is not None:
            t = obj["trial"]
            trial = Trial(slot=_slot(t["slot"], f"{path}: trial"), tries_left=int(t["tries_left"]),
                          assignment_id=str(t["assignment_id"]), version=str(t["version"]),
                          deadline=int(t["deadline"]))
        rb = None
        if obj.get("last_rollback") is not None:
            r = obj["last_rollback"]
            rb = Rollback(slot=_slot(r["slot"], f"{path}: last_rollback"), version=str(r["version"]),
                          assignment_id=str(r["assignment_id"]), reason=str(r["reason"])[:512])
        active = _slot(obj["active"], str(path))
        booted = _slot(obj.get("booted", active), str(path))
        return BootControl(active=active, booted=booted, trial=trial, last_rollback=rb)
    except StorageError:
        raise
    except (ValueError, KeyError, TypeError) as exc:
        raise StorageError(f"boot control file {path} is malformed: {exc}") from None


def read(boot_dir: Path) -> BootControl:
    """The current boot control; a missing file is slot ``a``, committed, no trial."""
    path = Path(boot_dir) / CONTROL_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return BootControl()
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror or exc}") from None
    return _parse(raw, path)


def write(boot_dir: Path, ctl: BootControl) -> None:
    write_atomic(Path(boot_dir) / CONTROL_FILE, json.dumps(ctl.to_json(), sort_keys=True).encode())


def begin_trial(boot_dir: Path, *, slot: str, assignment_id: str, version: str, deadline: int,
                tries: int = DEFAULT_TRIES) -> BootControl:
    """Mark ``slot`` (which must be the inactive one) as on trial for the next boot."""
    ctl = read(boot_dir)
    if slot != ctl.inactive:
        raise StorageError(f"slot {slot} is the active slot; a trial must use slot {ctl.inactive}")
    trial = Trial(slot=slot, tries_left=max(1, tries), assignment_id=assignment_id, version=version,
                  deadline=deadline)
    new = dataclasses.replace(ctl, trial=trial)
    write(boot_dir, new)
    return new


def choose_boot_slot(boot_dir: Path) -> BootControl:
    """The bootloader's decision at power-on; records it (``booted``, counter, rollback) and returns it."""
    try:
        ctl = read(boot_dir)
    except StorageError:
        ctl = BootControl()  # unreadable control: the factory slot, never an unverified trial
        write(boot_dir, ctl)
        return ctl
    if ctl.trial is not None and ctl.trial.tries_left > 0:
        new = dataclasses.replace(ctl, booted=ctl.trial.slot,
                                  trial=dataclasses.replace(ctl.trial, tries_left=ctl.trial.tries_left - 1))
    elif ctl.trial is not None:
        t = ctl.trial
        rb = Rollback(slot=t.slot, version=t.version, assignment_id=t.assignment_id,
                      reason="boot counter exhausted before the trial was committed")
        new = BootControl(active=ctl.active, booted=ctl.active, trial=None, last_rollback=rb)
    else:
        new = dataclasses.replace(ctl, booted=ctl.active)
    write(boot_dir, new)
    return new


def commit(boot_dir: Path) -> BootControl:
    """The running trial slot becomes the active slot (only when it is the booted trial)."""
    ctl = read(boot_dir)
    if not ctl.in_trial or ctl.trial is None:
        raise StorageError("no booted trial slot to commit")
    new = BootControl(active=ctl.trial.slot, booted=ctl.booted, trial=None, last_rollback=None)
    write(boot_dir, new)
    return new


def abandon_trial(boot_dir: Path, reason: str) -> BootControl:
    """Drop the pending trial (the next boot takes the active slot) and record why."""
    ctl = read(boot_dir)
    if ctl.trial is None:
        return ctl
    t = ctl.trial
    new = BootControl(active=ctl.active, booted=ctl.booted, trial=None,
                      last_rollback=Rollback(slot=t.slot, version=t.version, assignment_id=t.assignment_id,
                                             reason=reason[:512]))
    write(boot_dir, new)
    return new
