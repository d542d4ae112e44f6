"""The agent's firmware install state machine: assignment -> inactive slot -> trial boot -> commit/fall back.

One :class:`Installer` per device, driven by four events (all on one thread, the agent's update
thread, :mod:`agent.update.runner`):

* :meth:`Installer.on_assignment` - a verified ``update.assign`` of kind ``firmware``: report
  ``downloading``; fetch the target through the :class:`TargetSource` (TUF-verified, at most
  ``max_target_size`` bytes); check the signed custom metadata (kind, hardware class, version equal
  to the assignment's) and that the version is strictly newer than the running release *and* not
  below the TPM anti-rollback floor (:mod:`agent.update.floor`); unpack the bundle
  (:mod:`protocol.firmware_bundle`) into the inactive slot; report ``installed``; mark the slot on
  trial (:func:`agent.update.bootctl.begin_trial`) with the assignment's deadline; report
  ``rebooting``; ask the :class:`~agent.update.bootctl.Rebooter` to reboot.  Any check that fails:
  ``failed`` with the reason, and the boot folder as it was.
* :meth:`Installer.on_boot` - at every agent start: reconcile the install record with the boot
  control file (a trial booted, a rollback the bootloader made, an install cut short by a power
  loss - resumed, at most :data:`MAX_ATTEMPTS` times).
* :meth:`Installer.on_verdict` - a signed attestation result for evidence of *this* boot while the
  trial slot runs: ``trusted`` for the trial's release (``AttestationResult.release`` equal to the
  assignment's target) and every local health check passing -> :func:`~agent.update.bootctl.commit`,
  raise the anti-rollback floor, report ``committed``.  Anything else -> abandon the trial with the
  reason and reboot; the next boot (the active slot) reports ``rolled_back`` with that reason.
* :meth:`Installer.tick` - the trial still uncommitted after the assignment's deadline:
  abandon and reboot, likewise.

The slot is written atomically: files go to ``<boot>/.slot-X.incoming/`` (each fsynced), the folder
is fsynced, the old inactive slot is removed and the new folder renamed into place.  A power cut at
any point leaves the active slot and ``bootctl.json`` untouched (no trial is marked before the slot
is complete), and the leftover folder is removed at the next start.

The install record (``<state_dir>/update/install.json``) and the status outbox
(``<state_dir>/update/outbox.json``, :class:`StatusOutbox`) are written with
:func:`agent.statefile.write_atomic`; every status survives a reboot and is sent until the broker
acknowledges it.  Restoring these files from a backup cannot bring an old release back: the floor
is in TPM NV.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from agent.log import EventLogger
from agent.statefile import ensure_dir, read_optional, write_atomic
from agent.update import bootctl
from agent.update.bootctl import RELEASE_FILE, Rebooter
from agent.update.floor import VersionError, VersionFloor, format_version, parse_version
from protocol.encoding import canonical_bytes
from protocol.errors import EdgeError, MalformedInputError, StorageError
from protocol.firmware_bundle import unpack
from protocol.messages import (
    MAX_UPDATE_REASON,
    UpdateAssignment,
    UpdateStatus,
    decode_plain,
    encode_plain,
    new_message_id,
)

MAX_ATTEMPTS = 3
"""Installs of one assignment started (the first and resumes after a power loss) before it fails."""
MAX_FINISHED = 64
"""Finished assignment ids remembered, so a re-delivered assignment is not installed twice."""
MAX_OUTBOX = 256
MAX_STATE_FILE = 1 << 20
INCOMING_SUFFIX = ".incoming"
RECORD_FILE = "install.json"
OUTBOX_FILE = "outbox.json"
SLOT_FILE_MODE = 0o644

PHASES = ("installing", "rebooting", "trial", "rolling_back", "committing")
"""Where an assignment is: fetching and writing the slot; trial marked, reboot asked; the trial slot
runs; trial abandoned, reboot asked; committed in boot control, floor and report pending."""


class UpdateRefused(EdgeError):
    """An assignment cannot be installed; the message is the reason reported as ``failed``."""


class FetchedTarget(Protocol):
    """A target as the TUF client returns it: the verified bytes and the role's signed custom metadata."""

    @property
    def data(self) -> bytes: ...

    @property
    def custom(self) -> Mapping[str, Any]: ...


class TargetSource(Protocol):
    """The verified update channel (on a device: :class:`agent.update.tuf_client.UpdateClient`).

    ``fetch_target`` refreshes the repository metadata, downloads ``target_path`` (at most
    ``max_length`` bytes) and returns it only if it verifies; otherwise it raises an
    :class:`~protocol.errors.EdgeError` whose message is the reason.
    """

    def fetch_target(self, target_path: str, *, max_length: int) -> FetchedTarget: ...


HealthCheck = tuple[str, Callable[[], None]]
"""A named local health check; it raises :class:`~protocol.errors.EdgeError` when it fails."""


@dataclass(frozen=True, slots=True)
class InstallerSettings:
    boot_dir: Path
    device_class: str
    fallback_version: str
    """The running version when the booted slot has no ``release.json`` (the configured one)."""
    max_target_size: int
    boot_tries: int = bootctl.DEFAULT_TRIES


# -- persisted state -------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class InstallRecord:
    assignment: UpdateAssignment
    from_version: str
    phase: str
    attempts: int = 0
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        a = self.assignment
        return {"assignment": {"assignment_id": a.assignment_id, "kind": a.kind, "target": a.target,
                               "version": a.version, "deadline": a.deadline},
                "from_version": self.from_version, "phase": self.phase, "attempts": self.attempts,
                "reason": self.reason}

    @classmethod
    def from_json(cls, obj: Any) -> InstallRecord:
        if not isinstance(obj, dict) or obj.get("phase") not in PHASES:
            raise ValueError("not an install record")
        a = obj["assignment"]
        assignment = UpdateAssignment(assignment_id=str(a["assignment_id"]), kind=str(a["kind"]),
                                      target=str(a["target"]), version=str(a["version"]),
                                      deadline=int(a["deadline"]))
        return cls(assignment=assignment, from_version=str(obj["from_version"]), phase=str(obj["phase"]),
                   attempts=int(obj["attempts"]), reason=str(obj["reason"])[:MAX_UPDATE_REASON])


class StatusOutbox:
    """Update statuses waiting for the broker's acknowledgement, persisted in arrival order.

    Each entry is the encoded ``update.status`` message (its id and time fixed when it was made), so
    a resend after a reboot is the same message.  Thread-safe: the update thread adds, the agent's
    main thread publishes and removes.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._entries: list[tuple[str, bytes]] = []
        data = read_optional(self.path, max_size=MAX_STATE_FILE)
        if data is None:
            return
        try:
            obj = json.loads(data)
            if not isinstance(obj, dict) or obj.get("format") != 1 \
                    or not isinstance(obj.get("pending"), list):
                raise ValueError("unsupported format")
            for item in obj["pending"]:
                raw = str(item).encode()
                env = decode_plain(raw, allowed=(UpdateStatus,))
                self._entries.append((env.id, raw))
        except (ValueError, MalformedInputError) as exc:
            raise StorageError(f"update status outbox {self.path} is malformed: {exc}") from None

    def add(self, status: UpdateStatus, *, ts: int) -> str:
        msg_id = new_message_id()
        raw = encode_plain(status, ts=ts, msg_id=msg_id)
        with self._lock:
            self._entries.append((msg_id, raw))
            del self._entries[:-MAX_OUTBOX]
            self._save()
        return msg_id

    def pending(self) -> list[tuple[str, bytes]]:
        """``(message id, payload)`` of every unacknowledged status, oldest first."""
        with self._lock:
            return list(self._entries)

    def remove(self, msg_id: str) -> None:
        with self._lock:
            before = len(self._entries)
            self._entries = [e for e in self._entries if e[0] != msg_id]
            if len(self._entries) != before:
                self._save()

    def statuses(self) -> list[UpdateStatus]:
        """The pending statuses, decoded (for status display and tests)."""
        out = []
        for _, raw in self.pending():
            msg = decode_plain(raw, allowed=(UpdateStatus,)).message
            assert isinstance(msg, UpdateStatus)
            out.append(msg)
        return out

    def _save(self) -> None:
        doc = {"format": 1, "pending": [raw.decode() for _, raw in self._entries]}
        write_atomic(self.path, json.dumps(doc).encode())


# -- slot files ------------------------------------------------------------------------------------
def _write_file(path: Path, data: bytes) -> None:
    """Create ``path`` with ``data`` and fsync it (the single point a slot write goes through)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, SLOT_FILE_MODE)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _incoming(boot_dir: Path, slot: str) -> Path:
    final = bootctl.slot_dir(boot_dir, slot)
    return final.with_name(f".{final.name}{INCOMING_SUFFIX}")


def remove_incoming(boot_dir: Path) -> None:
    """Remove slot folders left half-written by a power cut (never a slot itself)."""
    for slot in bootctl.SLOTS:
        shutil.rmtree(_incoming(boot_dir, slot), ignore_errors=True)


def write_slot(boot_dir: Path, slot: str, manifest: Mapping[str, Any], files: Mapping[str, bytes]) -> None:
    """Replace the (inactive) ``slot`` with ``files`` and ``release.json`` = ``manifest``, atomically."""
    boot_dir = Path(boot_dir)
    final = bootctl.slot_dir(boot_dir, slot)
    tmp = _incoming(boot_dir, slot)
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(mode=0o755)
        for name, content in files.items():
            _write_file(tmp / name, content)
        _write_file(tmp / RELEASE_FILE, canonical_bytes(dict(manifest)))
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)  # the inactive slot: nothing boots it without a trial marked after this
        os.rename(tmp, final)
        _fsync_dir(boot_dir)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise StorageError(f"cannot write boot slot {slot} in {boot_dir}: {exc.strerror or exc}") from None


def slot_version(boot_dir: Path, slot: str) -> str | None:
    """The ``version`` in ``slot``'s ``release.json``; ``None`` if there is none (or it is unreadable)."""
    data = read_optional(bootctl.slot_dir(boot_dir, slot) / RELEASE_FILE, max_size=64 * 1024)
    if data is None:
        return None
    try:
        obj = json.loads(data)
    except ValueError:
        return None
    version = obj.get("version") if isinstance(obj, dict) else None
    return version if isinstance(version, str) else None


# -- the state machine -----------------------------------------------------------------------------
def _reason(text: str) -> str:
    return text.replace("\n", " ")[:MAX_UPDATE_REASON]


class Installer:
    """The install state machine (see the module docstring).  Not thread-safe: one caller thread."""

    def __init__(self, settings: InstallerSettings, *, state_dir: Path, source: TargetSource,
                 floor: VersionFloor, rebooter: Rebooter, outbox: StatusOutbox,
                 health_checks: Sequence[HealthCheck] = (), clock: Callable[[], float],
                 log: EventLogger) -> None:
        self.settings = settings
        self._dir = ensure_dir(Path(state_dir))
        self._source = source
        self._floor = floor
        self._rebooter = rebooter
        self.outbox = outbox
        self._checks = tuple(health_checks)
        self._clock = clock
        self._log = log
        self._record: InstallRecord | None = None
        self._finished: list[str] = []
        self._last: UpdateStatus | None = None
        self._load()

    # -- record ------------------------------------------------------------------------------------
    @property
    def record(self) -> InstallRecord | None:
        return self._record

    def summary(self) -> dict[str, Any]:
        """The update in progress and the last status reported by this process (no I/O: the agent's
        status is built often)."""
        out: dict[str, Any] = {}
        rec, last = self._record, self._last
        if rec is not None:
            out["in_progress"] = {"assignment_id": rec.assignment.assignment_id, "phase": rec.phase,
                                  "from": rec.from_version, "to": rec.assignment.version}
        if last is not None:
            out["last_status"] = {"assignment_id": last.assignment_id, "state": last.state,
                                  "from": last.from_version, "to": last.to_version, "reason": last.reason}
        return out

    def _load(self) -> None:
        path = self._dir / RECORD_FILE
        data = read_optional(path, max_size=MAX_STATE_FILE)
        if data is None:
            return
        try:
            obj = json.loads(data)
            if not isinstance(obj, dict) or obj.get("format") != 1:
                raise ValueError("unsupported format")
            current = obj.get("current")
            self._record = None if current is None else InstallRecord.from_json(current)
            self._finished = [str(x) for x in obj.get("finished", [])][-MAX_FINISHED:]
        except (ValueError, KeyError, TypeError) as exc:
            raise StorageError(f"install record {path} is malformed: {exc}") from None

    def _save(self) -> None:
        doc = {"format": 1, "current": None if self._record is None else self._record.to_json(),
               "finished": self._finished}
        write_atomic(self._dir / RECORD_FILE, json.dumps(doc, sort_keys=True).encode())

    def _set(self, record: InstallRecord | None) -> None:
        self._record = record
        self._save()

    def _finish(self) -> None:
        rec = self._record
        if rec is not None:
            self._finished = [*self._finished, rec.assignment.assignment_id][-MAX_FINISHED:]
        self._set(None)

    def _report(self, rec: InstallRecord, state: str, reason: str = "") -> None:
        a = rec.assignment
        status = UpdateStatus(assignment_id=a.assignment_id, target=a.target, state=state,
                              from_version=rec.from_version[:32], to_version=a.version,
                              reason=_reason(reason))
        self.outbox.add(status, ts=int(self._clock() * 1000))
        self._last = status
        log = self._log.warning if state in ("failed", "rolled_back") else self._log.info
        log("update_status", assignment_id=a.assignment_id, state=state, version=a.version,
            **({"reason": reason} if reason else {}))

    # -- what runs -----------------------------------------------------------------------------------
    def running_version(self) -> str:
        """The release the booted slot holds (its ``release.json``), else the configured version."""
        ctl = bootctl.read(self.settings.boot_dir)
        return slot_version(self.settings.boot_dir, ctl.booted) or self.settings.fallback_version

    # -- events --------------------------------------------------------------------------------------
    def on_assignment(self, assignment: UpdateAssignment) -> None:
        """Install a verified assignment (see the module docstring)."""
        aid = assignment.assignment_id
        rec = self._record
        if aid in self._finished or (rec is not None and rec.assignment.assignment_id == aid
                                     and rec.phase != "installing"):
            self._log.info("update_assignment_repeated", assignment_id=aid)
            return
        if rec is not None and rec.assignment.assignment_id != aid and rec.phase != "installing":
            busy = InstallRecord(assignment=assignment, from_version=self.running_version(),
                                 phase="installing")
            self._report(busy, "failed", f"update {rec.assignment.assignment_id} ({rec.assignment.version}) "
                                         f"is still in progress ({rec.phase})")
            self._finished = [*self._finished, aid][-MAX_FINISHED:]
            self._save()
            return
        attempts = 0
        if rec is not None and rec.assignment.assignment_id == aid:
            attempts = rec.attempts
        elif rec is not None:  # an install cut short, now replaced by the server's newer assignment
            self._report(rec, "failed", f"superseded by assignment {aid}")
            self._finish()
        self._install(assignment, attempts=attempts)

    def on_boot(self) -> None:
        """Reconcile the install record with the boot control file after a (re)start."""
        boot_dir = self.settings.boot_dir
        remove_incoming(boot_dir)
        ctl = bootctl.read(boot_dir)
        rec = self._record
        if rec is None:
            if ctl.in_trial:  # e.g. the state folder was restored from before the install
                self._log.warning("update_trial_unknown", slot=ctl.booted)
                bootctl.abandon_trial(boot_dir, "the agent has no record of this trial")
                self._rebooter.reboot("update trial without an install record")
            return
        aid = rec.assignment.assignment_id
        trial = ctl.trial if ctl.trial is not None and ctl.trial.assignment_id == aid else None
        rollback = ctl.last_rollback if ctl.last_rollback is not None \
            and ctl.last_rollback.assignment_id == aid else None
        if rec.phase == "committing":
            self._finish_commit(rec)
        elif rec.phase == "installing" and trial is None:
            if rec.attempts >= MAX_ATTEMPTS:
                self._report(rec, "failed", f"install interrupted {rec.attempts} times")
                self._finish()
            else:
                self._log.warning("update_install_resumed", assignment_id=aid, attempt=rec.attempts + 1)
                self._install(rec.assignment, attempts=rec.attempts)
        elif trial is not None and ctl.in_trial:
            if rec.phase == "rolling_back":  # abandoned in the record, not yet in boot control
                self._roll_back(rec, rec.reason)
            elif rec.phase != "trial":
                if rec.phase == "installing":  # the trial was marked, then the power went
                    self._report(rec, "rebooting")
                self._set(replace(rec, phase="trial"))
                self._log.info("update_trial_booted", assignment_id=aid, slot=trial.slot,
                               version=trial.version)
        elif trial is not None:  # marked but the trial slot has not booted yet (agent restart)
            if rec.phase == "installing":
                self._report(rec, "rebooting")
            self._set(replace(rec, phase="rebooting"))
            self._rebooter.reboot(f"update {rec.assignment.version}: boot the trial slot")
        elif rollback is not None:
            self._report(rec, "rolled_back", rollback.reason)
            self._finish()
        else:
            self._report(rec, "rolled_back", rec.reason or "the trial ended without a commit")
            self._finish()

    def on_verdict(self, *, verdict: str, release: str, reasons: Sequence[str], this_boot: bool) -> None:
        """A verified attestation result; acted on only in a trial, and only for this boot's evidence."""
        rec = self._record
        if rec is None or rec.phase != "trial":
            return
        ctl = bootctl.read(self.settings.boot_dir)
        if not ctl.in_trial or ctl.trial is None or ctl.trial.assignment_id != rec.assignment.assignment_id:
            return
        if not this_boot:
            self._log.info("update_verdict_ignored", assignment_id=rec.assignment.assignment_id,
                           why="the result is for evidence of an earlier boot")
            return
        if verdict != "trusted":
            self._roll_back(rec, f"attestation verdict {verdict}: {'; '.join(reasons) or 'no reason given'}")
            return
        if release != rec.assignment.target:
            self._roll_back(rec, f"the trusted verdict matched release {release or '(none)'!r}, not the "
                                 f"trial's {rec.assignment.target!r}")
            return
        booted = slot_version(self.settings.boot_dir, ctl.booted)
        if booted != rec.assignment.version:
            self._roll_back(rec, f"the booted slot {ctl.booted} holds release {booted!r}, not "
                                 f"{rec.assignment.version}")
            return
        for name, check in self._checks:
            try:
                check()
            except EdgeError as exc:
                self._roll_back(rec, f"health check {name} failed: {exc.diagnostics()}")
                return
        self._set(replace(rec, phase="committing"))
        self._finish_commit(self._record or rec)

    def tick(self) -> None:
        """Periodic work: finish a commit whose floor update or report failed (the TPM was busy), and
        abandon a trial that is still uncommitted after the assignment's deadline."""
        rec = self._record
        if rec is not None and rec.phase == "committing":
            self._finish_commit(rec)
            return
        if rec is None or rec.phase != "trial" or self._clock() * 1000 <= rec.assignment.deadline:
            return
        ctl = bootctl.read(self.settings.boot_dir)
        if ctl.in_trial and ctl.trial is not None and ctl.trial.assignment_id == rec.assignment.assignment_id:
            self._roll_back(rec, "the deadline passed before a trusted verdict committed the trial")

    # -- steps ---------------------------------------------------------------------------------------
    def _install(self, assignment: UpdateAssignment, *, attempts: int) -> None:
        rec = InstallRecord(assignment=assignment, from_version=self.running_version(), phase="installing",
                            attempts=attempts + 1)
        try:
            self._precheck(rec)
        except EdgeError as exc:  # UpdateRefused, or the boot folder / TPM floor unreadable
            self._record = rec
            self._report(rec, "failed", exc.diagnostics())
            self._finish()
            return
        self._set(rec)
        self._report(rec, "downloading")
        boot_dir = self.settings.boot_dir
        try:
            target = self._source.fetch_target(assignment.target, max_length=self.settings.max_target_size)
            manifest, files = self._vet(target, assignment)
            ctl = bootctl.read(boot_dir)
            write_slot(boot_dir, ctl.inactive, manifest, files)
            self._report(rec, "installed")
            bootctl.begin_trial(boot_dir, slot=ctl.inactive, assignment_id=assignment.assignment_id,
                                version=assignment.version, deadline=assignment.deadline,
                                tries=self.settings.boot_tries)
        except EdgeError as exc:
            remove_incoming(boot_dir)
            self._report(rec, "failed", exc.diagnostics())
            self._finish()
            return
        self._set(replace(rec, phase="rebooting"))
        self._report(rec, "rebooting")
        self._rebooter.reboot(f"update {assignment.version}: boot the trial slot")

    def _precheck(self, rec: InstallRecord) -> None:
        """The checks that need no download."""
        a = rec.assignment
        if a.kind != "firmware":
            raise UpdateRefused(f"assignment kind {a.kind!r}: this installer installs firmware only")
        if self._clock() * 1000 > a.deadline:
            raise UpdateRefused("the assignment's deadline has passed")
        ctl = bootctl.read(self.settings.boot_dir)
        if ctl.trial is not None:
            raise UpdateRefused(f"slot {ctl.trial.slot} is already on trial ({ctl.trial.version})")
        if ctl.booted != ctl.active:  # never overwrite the slot that runs
            raise UpdateRefused(f"the running slot {ctl.booted} is not the committed slot {ctl.active}")
        try:
            target = parse_version(a.version, "assigned version")
            running = parse_version(rec.from_version, "running firmware version")
        except VersionError as exc:
            raise UpdateRefused(exc.diagnostics()) from None
        if target <= running:
            raise UpdateRefused(f"version {a.version} is not newer than the running {rec.from_version}")
        floor = self._floor.minimum()
        if floor is not None and target < floor:
            raise UpdateRefused(f"version {a.version} is below the anti-rollback floor "
                                f"{format_version(floor)} kept in TPM NV (a release older than one "
                                "already committed)")

    def _vet(self, target: FetchedTarget,
             a: UpdateAssignment) -> tuple[Mapping[str, Any], Mapping[str, bytes]]:
        """Check the signed custom metadata and the bundle against the assignment and this device."""
        custom = target.custom
        cls = self.settings.device_class
        if custom.get("kind") != "firmware":
            raise UpdateRefused(f"target {a.target} is not firmware (kind {str(custom.get('kind'))[:40]!r})")
        if custom.get("device_class") != cls:
            raise UpdateRefused(f"target {a.target} is for hardware class "
                                f"{str(custom.get('device_class'))[:64]!r}, this device is {cls!r}")
        if custom.get("version") != a.version:
            raise UpdateRefused(f"target {a.target} is version {str(custom.get('version'))[:32]!r}, the "
                                f"assignment says {a.version}")
        bundle = unpack(target.data)
        manifest = bundle.manifest
        if manifest.get("device_class") != cls or manifest.get("version") != a.version:
            raise UpdateRefused("the bundle's manifest does not match its signed metadata (class/version)")
        files = dict(bundle.files)
        if RELEASE_FILE in files:
            try:
                same = json.loads(files[RELEASE_FILE]) == dict(manifest)
            except ValueError:
                same = False
            if not same:
                raise UpdateRefused(f"the bundle's {RELEASE_FILE} differs from its manifest")
            del files[RELEASE_FILE]
        return manifest, files

    def _roll_back(self, rec: InstallRecord, reason: str) -> None:
        reason = _reason(reason)
        self._set(replace(rec, phase="rolling_back", reason=reason))
        self._log.warning("update_trial_abandoned", assignment_id=rec.assignment.assignment_id, reason=reason)
        bootctl.abandon_trial(self.settings.boot_dir, reason)
        self._rebooter.reboot(f"update {rec.assignment.version} rolled back")

    def _finish_commit(self, rec: InstallRecord) -> None:
        boot_dir = self.settings.boot_dir
        ctl = bootctl.read(boot_dir)
        if ctl.in_trial and ctl.trial is not None and ctl.trial.assignment_id == rec.assignment.assignment_id:
            bootctl.commit(boot_dir)
        self._floor.raise_to(parse_version(rec.assignment.version))
        self._report(rec, "committed")
        self._finish()
