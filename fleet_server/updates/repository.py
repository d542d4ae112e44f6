"""The update repository: TUF metadata of every role, threshold signing, publishing, renewal.

Built on python-tuf's :class:`tuf.repository.Repository` (``open``/``close``, ``edit``,
``do_snapshot``/``do_timestamp``).  Roles: ``root``, ``targets``, ``snapshot``, ``timestamp`` and the
delegated targets roles ``firmware`` and ``models`` (delegated by ``targets``, terminating, paths
under ``firmware/`` and ``models/``).  Root, targets and the delegated roles have offline keys
(default 2 of 3); snapshot and timestamp have one online key each.  Consistent snapshots are on.

**Pending and published versions.**  Editing a role (``close``) makes a *pending* version
(``pending/<role>.json``) signed with the role's keys present in ``keys/<role>/``.  A pending version
is *published* (``metadata/<N>.<role>.json``) only when its signatures reach the threshold its
delegator sets (for root: the new root's threshold and the previous root's, as TUF requires for a
root rotation) and every role it delegates to still verifies under it; then snapshot and timestamp
(online keys) are renewed.  The missing signatures can be made on another machine
(:meth:`UpdateRepository.export`, :func:`sign_exported`, :meth:`UpdateRepository.add_signatures`).
The HTTP routes and the MQTT fetch handler serve only published files (:meth:`read_file`).

Mutations hold an exclusive ``flock`` on ``<dir>/.lock`` so that the CLI and ``fleet-server run``
never interleave.  Time comes from the ``clock`` passed in (seconds since the epoch).
"""

from __future__ import annotations

import copy
import datetime as dt
import fcntl
import hashlib
import json
import os
import re
import secrets
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from securesystemslib.exceptions import UnverifiedSignatureError
from securesystemslib.signer import Key, Signature, Signer
from tuf.api.exceptions import RepositoryError
from tuf.api.metadata import (
    DelegatedRole,
    Delegations,
    Metadata,
    MetaFile,
    Root,
    Signed,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.repository import Repository

from fleet_server.config import ServerConfig, UpdateSettings
from fleet_server.updates.keys import KeyDir, generate, load_key_file
from fleet_server.updates.targets import FIRMWARE_ROLE, MODELS_ROLE, TARGET_ROLES, TargetInfo
from protocol.encoding import JsonValue
from protocol.errors import EdgeError
from protocol.messages import TARGET_PATH_RE, TUF_PATH_RE

ROOT, TARGETS, SNAPSHOT, TIMESTAMP = Root.type, Targets.type, Snapshot.type, Timestamp.type
TOP_ROLES = (ROOT, TARGETS, SNAPSHOT, TIMESTAMP)
ALL_ROLES = (*TOP_ROLES, FIRMWARE_ROLE, MODELS_ROLE)
ONLINE_ROLES = (SNAPSHOT, TIMESTAMP)
# Publishing order: a delegator before the roles it delegates to.
_PUBLISH_ORDER = (ROOT, TARGETS, *TARGET_ROLES)
DEFAULT_KEYS = 3
DEFAULT_THRESHOLD = 2
MAX_METADATA_BYTES = 4 << 20

METADATA_NAME_RE = re.compile(r"^(timestamp|[1-9][0-9]{0,9}\.(root|snapshot|targets|firmware|models))\.json$")
_TARGET_SEGMENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class UpdatesError(EdgeError):
    """The update repository refuses an operation (not initialised, bad role or path, bad signature...)."""


@dataclass(frozen=True, slots=True)
class RoleStatus:
    """One role as ``fleet-server updates status`` shows it."""

    role: str
    version: int  # published version (0: none)
    expires: int | None  # published version's expiry (seconds since the epoch)
    threshold: int
    keys: int
    local_keys: int  # key files of the role on this machine
    pending_version: int | None
    pending_signatures: int  # valid signatures of the pending version by the role's keys

    def to_json(self) -> dict[str, JsonValue]:
        return {"role": self.role, "version": self.version, "expires": self.expires,
                "threshold": self.threshold, "keys": self.keys, "local_keys": self.local_keys,
                "pending_version": self.pending_version, "pending_signatures": self.pending_signatures}


@dataclass(frozen=True, slots=True)
class SignOutcome:
    """The result of adding signatures to a pending version."""

    role: str
    version: int
    signatures: int
    threshold: int
    published: bool


def _lifetime(settings: UpdateSettings, role: str) -> float:
    return {ROOT: settings.root_expiry, SNAPSHOT: settings.snapshot_expiry,
            TIMESTAMP: settings.timestamp_expiry}.get(role, settings.targets_expiry)


def _empty(role: str) -> Metadata[Any]:
    signed: Signed = {ROOT: Root, SNAPSHOT: Snapshot, TIMESTAMP: Timestamp}.get(role, Targets)()
    signed.version = 0  # close() bumps it to 1
    return Metadata(signed)


def _check_role(role: str) -> str:
    if role not in ALL_ROLES:
        raise UpdatesError(f"unknown role {str(role)[:40]!r}; roles: {', '.join(ALL_ROLES)}")
    return role


def _atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UpdatesError(f"cannot write {path}: {exc.strerror or exc}") from None


def target_file_name(path: str, sha256_hex: str) -> str:
    """Where a target's bytes are served: the hash prefixed to the basename (consistent snapshots)."""
    folder, sep, base = path.rpartition("/")
    return f"{folder}{sep}{sha256_hex}.{base}"


class UpdateRepository(Repository):
    """The repository in one folder (``[updates] dir``); implements :class:`~fleet_server.updates.
    targets.TargetStore`.  Open one with :func:`open_update_repository`, create one with :meth:`create`."""

    def __init__(self, folder: Path, settings: UpdateSettings, *, clock: Callable[[], float]) -> None:
        self.folder = Path(folder)
        self.settings = settings
        self.clock = clock
        self.metadata_dir = self.folder / "metadata"
        self.targets_dir = self.folder / "targets"
        self.pending_dir = self.folder / "pending"
        self.keys = KeyDir(self.folder / "keys")
        self._mutex = threading.RLock()
        self._depth = 0

    # ------------------------------------------------------------------ creation
    @classmethod
    def create(cls, folder: Path, settings: UpdateSettings, *, clock: Callable[[], float],
               keys: int = DEFAULT_KEYS, threshold: int = DEFAULT_THRESHOLD) -> UpdateRepository:
        """Make a new repository: fresh keys for every role (0600), every role's first version signed."""
        if not 1 <= threshold <= keys <= 16:
            raise UpdatesError("need 1 <= threshold <= keys <= 16")
        folder = Path(folder)
        if (folder / "metadata").exists():
            raise UpdatesError(f"an update repository already exists in {folder}")
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(folder, 0o700)
        repo = cls(folder, settings, clock=clock)
        with repo._locked():
            with repo.edit_root() as root:
                root.consistent_snapshot = True
                for role in TOP_ROLES:
                    count, needed = (1, 1) if role in ONLINE_ROLES else (keys, threshold)
                    root.roles[role].threshold = needed
                    for _ in range(count):
                        root.add_key(repo._new_key(role), role)
            with repo.edit_targets() as top:
                top.delegations = Delegations(keys={}, roles={})
                for role in TARGET_ROLES:
                    assert top.delegations.roles is not None
                    top.delegations.roles[role] = DelegatedRole(role, [], threshold, True, _role_paths(role))
                    for _ in range(keys):
                        top.add_key(repo._new_key(role), role)
            for role in TARGET_ROLES:
                with repo.edit_targets(role):
                    pass
            repo._publish_ready()
        return repo

    def _new_key(self, role: str) -> Key:
        signer = generate()
        self.keys.save(role, signer)
        return signer.public_key

    # ------------------------------------------------------------------ locking
    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._mutex:
            if self._depth:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.folder / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._depth = 1
                try:
                    yield
                finally:
                    self._depth = 0
            finally:
                os.close(fd)  # releases the lock

    # ------------------------------------------------------------------ files
    def _published_version(self, role: str) -> int:
        if role == TIMESTAMP:
            md = self._load(self.metadata_dir / "timestamp.json")
            return 0 if md is None else md.signed.version
        best = 0
        suffix = f".{role}.json"
        if self.metadata_dir.is_dir():
            for entry in os.scandir(self.metadata_dir):
                head = entry.name[: -len(suffix)]
                if entry.name.endswith(suffix) and head.isdigit():
                    best = max(best, int(head))
        return best

    def _published_path(self, role: str, version: int) -> Path:
        if role == TIMESTAMP:
            return self.metadata_dir / "timestamp.json"
        return self.metadata_dir / f"{version}.{role}.json"

    def _load(self, path: Path) -> Metadata[Any] | None:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise UpdatesError(f"cannot read {path}: {exc.strerror or exc}") from None
        try:
            return Metadata.from_bytes(data)
        except (ValueError, KeyError, TypeError) as exc:
            raise UpdatesError(f"{path} is not valid TUF metadata: {exc}") from None

    def published(self, role: str) -> Metadata[Any] | None:
        """The newest published version of ``role`` (None before there is one)."""
        version = self._published_version(_check_role(role))
        return None if version == 0 else self._load(self._published_path(role, version))

    def pending(self, role: str) -> Metadata[Any] | None:
        """The version of ``role`` waiting for signatures, if any."""
        return self._load(self.pending_dir / f"{_check_role(role)}.json")

    def _newest(self, role: str) -> Metadata[Any] | None:
        return self.pending(role) or self.published(role)

    def _publish(self, role: str, md: Metadata[Any]) -> None:
        _atomic_write(self._published_path(role, md.signed.version), md.to_bytes())
        (self.pending_dir / f"{role}.json").unlink(missing_ok=True)

    # ------------------------------------------------------------------ python-tuf Repository
    def open(self, role: str) -> Metadata[Any]:
        md = self._newest(role)
        return _empty(role) if md is None else copy.deepcopy(md)

    def close(self, role: str, md: Metadata[Any]) -> None:
        if self.pending(role) is None:
            md.signed.version = self._published_version(role) + 1
        # else: the pending version is amended (its signatures are dropped: its content changed)
        now = dt.datetime.fromtimestamp(int(self.clock()), dt.UTC)
        md.signed.expires = now + dt.timedelta(seconds=_lifetime(self.settings, role))
        md.signatures.clear()
        for signer in self.keys.signers(role):
            md.sign(signer, append=True)
        if role in ONLINE_ROLES:
            if not self._verifies(role, md):
                raise UpdatesError(f"the online {role} key is not in {self.keys.role_dir(role)}; "
                                   f"`fleet-server updates rotate {role}` makes a new one")
            self._publish(role, md)
            return
        _atomic_write(self.pending_dir / f"{role}.json", md.to_bytes())

    @property
    def targets_infos(self) -> dict[str, MetaFile]:
        infos: dict[str, MetaFile] = {}
        for role in (TARGETS, *TARGET_ROLES):
            version = self._published_version(role)
            if version:
                infos[f"{role}.json"] = MetaFile(version)
        return infos

    @property
    def snapshot_info(self) -> MetaFile:
        return MetaFile(self._published_version(SNAPSHOT))

    def root(self) -> Root:
        """The published root (what snapshot and timestamp must verify under)."""
        md = self.published(ROOT)
        if md is None or not isinstance(md.signed, Root):
            raise UpdatesError("the update repository has no published root")
        return md.signed

    # ------------------------------------------------------------------ verification
    def _delegator(self, role: str, *, newest: bool = False) -> Root | Targets | None:
        if role in TOP_ROLES:
            md = self._newest(ROOT) if newest else self.published(ROOT)
        else:
            md = self._newest(TARGETS) if newest else self.published(TARGETS)
        if md is None:
            return None
        signed = md.signed
        return signed if isinstance(signed, Root | Targets) else None

    def _verifies(self, role: str, md: Metadata[Any]) -> bool:
        if role == ROOT:
            if not isinstance(md.signed, Root):
                return False
            previous = self.published(ROOT)
            prev_root = previous.signed if previous is not None else None
            if prev_root is not None and not isinstance(prev_root, Root):
                return False
            return md.signed.get_root_verification_result(prev_root, md.signed_bytes, md.signatures).verified
        delegator = self._delegator(role)
        if delegator is None:
            return False
        try:
            return delegator.get_verification_result(role, md.signed_bytes, md.signatures).verified
        except ValueError:  # the delegator does not delegate to this role
            return False

    def _delegates_follow(self, role: str, signed: Signed) -> bool:
        """True if every role ``signed`` (a new root or targets) delegates to still verifies under it."""
        if isinstance(signed, Root):
            roles: tuple[str, ...] = (TARGETS,)
        elif isinstance(signed, Targets) and role == TARGETS and signed.delegations is not None:
            roles = tuple(signed.delegations.roles or ())
        else:
            return True
        for child in roles:
            md = self._newest(child)
            if md is None:
                continue
            try:
                if not signed.get_verification_result(child, md.signed_bytes, md.signatures).verified:
                    return False
            except ValueError:  # no longer delegated
                continue
        return True

    def _publish_ready(self) -> list[str]:
        """Publish every pending version whose signatures reach its threshold; renew snapshot and
        timestamp if anything was published.  Returns the roles published."""
        published: list[str] = []
        for role in _PUBLISH_ORDER:
            md = self.pending(role)
            if md is None or not self._verifies(role, md) or not self._delegates_follow(role, md.signed):
                continue
            self._publish(role, md)
            published.append(role)
        root_changed = ROOT in published
        if published or self._published_version(TIMESTAMP) == 0:
            try:
                self.do_snapshot(force=root_changed)
                self.do_timestamp(force=root_changed)
            except (RepositoryError, ValueError) as exc:
                raise UpdatesError(f"cannot renew snapshot and timestamp: {exc}") from None
        return published

    # ------------------------------------------------------------------ TargetStore
    def add_target(self, role: str, path: str, data: bytes, custom: Mapping[str, JsonValue]) -> TargetInfo:
        _check_target(role, path)
        digest = hashlib.sha256(data).hexdigest()
        target = TargetFile(length=len(data), hashes={"sha256": digest}, path=path,
                            unrecognized_fields={"custom": json.loads(json.dumps(dict(custom)))})
        with self._locked():
            self._require_initialised()
            _atomic_write(self.targets_dir / target_file_name(path, digest), data)
            with self.edit_targets(role) as signed:
                signed.targets[path] = target
            self._publish_ready()
            return next(x for x in self.list_targets(role) if x.path == path)

    def remove_target(self, role: str, path: str) -> bool:
        _check_target(role, path)
        with self._locked():
            self._require_initialised()
            if path not in self.open(role).signed.targets:
                return False
            with self.edit_targets(role) as signed:
                del signed.targets[path]
            self._publish_ready()
        return True

    def list_targets(self, role: str) -> list[TargetInfo]:
        if role not in TARGET_ROLES:
            raise UpdatesError(f"{str(role)[:40]!r} is not a targets role ({', '.join(TARGET_ROLES)})")
        newest = self._newest(role)
        if newest is None:
            return []
        current = self.published(role)
        served = current.signed.targets if current is not None else {}
        out = []
        for path, target in sorted(newest.signed.targets.items()):
            live = served.get(path)
            out.append(TargetInfo(role=role, path=path, length=target.length,
                                  sha256=bytes.fromhex(target.hashes["sha256"]),
                                  custom=dict(target.custom),
                                  published=live is not None and live.hashes == target.hashes))
        return out

    def read_file(self, path: str) -> bytes | None:
        """A published repository file by its path relative to the repository (``metadata/3.root.json``,
        ``metadata/timestamp.json``, ``targets/firmware/edge-camera/<sha256>.1.3.0.fwb``), else None."""
        if not isinstance(path, str) or not TUF_PATH_RE.fullmatch(path):
            return None
        kind, _, rest = path.partition("/")
        parts = rest.split("/")
        if any(not _TARGET_SEGMENT_RE.fullmatch(part) for part in parts):
            return None
        if kind == "metadata":
            if len(parts) != 1 or not METADATA_NAME_RE.fullmatch(rest):
                return None
            base, file = self.metadata_dir, self.metadata_dir / rest
        else:
            base, file = self.targets_dir, self.targets_dir.joinpath(*parts)
        try:
            # No symlink anywhere below the served folder may lead elsewhere (e.g. into keys/).
            if file.is_symlink() or not file.resolve().is_relative_to(base.resolve()):
                return None
            return file.read_bytes()
        except OSError:  # missing, a folder, unreadable: not served
            return None

    # ------------------------------------------------------------------ signing
    def _authorised_keys(self, role: str) -> dict[str, Key]:
        """Keys whose signature on ``role``'s pending version counts (for root also the previous root's)."""
        keys: dict[str, Key] = {}
        sources: list[Root | Targets] = []
        if role == ROOT:
            for md in (self.pending(ROOT), self.published(ROOT)):
                if md is not None and isinstance(md.signed, Root):
                    sources.append(md.signed)
        else:
            for newest in (False, True):
                delegator = self._delegator(role, newest=newest)
                if delegator is not None:
                    sources.append(delegator)
        for source in sources:
            try:
                role_keys = source.get_delegated_role(role)
            except ValueError:
                continue
            all_keys = source.keys if isinstance(source, Root) else (
                source.delegations.keys if source.delegations is not None else {})
            for keyid in role_keys.keyids:
                if keyid in all_keys:
                    keys[keyid] = all_keys[keyid]
        return keys

    def _require_pending(self, role: str) -> Metadata[Any]:
        md = self.pending(_check_role(role))
        if md is None:
            raise UpdatesError(f"{role} has no version waiting for signatures")
        return md

    def export(self, role: str) -> bytes:
        """The pending version of ``role`` (TUF metadata, its signatures so far) to sign elsewhere."""
        return self._require_pending(role).to_bytes()

    def sign(self, role: str, signers: list[Signer]) -> SignOutcome:
        """Add signatures made with these keys (key files) to the pending version of ``role``."""
        with self._locked():
            md = self._require_pending(role)
            allowed = self._authorised_keys(role)
            for signer in signers:
                if signer.public_key.keyid not in allowed:
                    raise UpdatesError(f"key {signer.public_key.keyid[:16]} is not a key of {role}")
                md.sign(signer, append=True)
            return self._store_signed(role, md)

    def add_signatures(self, role: str, data: bytes) -> SignOutcome:
        """Import signatures made elsewhere: a metadata file signed with :func:`sign_exported`, or a
        JSON signature (``{"keyid", "sig"}``) or list of them, over the pending version's bytes."""
        with self._locked():
            md = self._require_pending(role)
            signatures = _signatures_of(data, md)
            allowed = self._authorised_keys(role)
            for signature in signatures:
                key = allowed.get(signature.keyid)
                if key is None:
                    raise UpdatesError(f"signature by key {signature.keyid[:16]}, which is not a key of "
                                       f"{role}")
                try:
                    key.verify_signature(signature, md.signed_bytes)
                except UnverifiedSignatureError:
                    raise UpdatesError(f"the signature by key {signature.keyid[:16]} does not verify over "
                                       f"{role} version {md.signed.version}") from None
                md.signatures[signature.keyid] = signature
            return self._store_signed(role, md)

    def _store_signed(self, role: str, md: Metadata[Any]) -> SignOutcome:
        _atomic_write(self.pending_dir / f"{role}.json", md.to_bytes())
        published = role in self._publish_ready()
        return SignOutcome(role=role, version=md.signed.version, signatures=self._count_valid(role, md),
                           threshold=self._threshold(role, md), published=published)

    def _count_valid(self, role: str, md: Metadata[Any]) -> int:
        count = 0
        for keyid, key in self._authorised_keys(role).items():
            signature = md.signatures.get(keyid)
            if signature is None:
                continue
            try:
                key.verify_signature(signature, md.signed_bytes)
                count += 1
            except UnverifiedSignatureError:
                continue
        return count

    def _threshold(self, role: str, md: Metadata[Any] | None = None) -> int:
        if role == ROOT and md is not None and isinstance(md.signed, Root):
            return md.signed.roles[ROOT].threshold
        delegator = self._delegator(role, newest=True)
        return 0 if delegator is None else delegator.get_delegated_role(role).threshold

    # ------------------------------------------------------------------ rotation, renewal, status
    def rotate(self, role: str) -> list[str]:
        """New keys for ``role`` (as many as now, same threshold); the old local key files are deleted.
        Root is re-signed by the old and the new root keys present here; returns the roles published."""
        _check_role(role)
        with self._locked():
            self._require_initialised()
            delegator_role = ROOT if role in TOP_ROLES else TARGETS
            with self.edit(delegator_role) as signed:
                assert isinstance(signed, Root | Targets)
                old = list(signed.get_delegated_role(role).keyids)
                for keyid in old:
                    signed.revoke_key(keyid, role)
                for _ in range(max(1, len(old))):
                    signed.add_key(self._new_key(role), role)
            # A new root is signed (in close) by every root key file here: the old keys and the new.
            if role not in ONLINE_ROLES and role != ROOT:
                with self.edit(role):
                    pass  # the role's next version, signed by its new keys
            for keyid in old:
                self.keys.remove(role, keyid)
            # Snapshot and timestamp are re-signed with their new keys once the new root is published.
            return self._publish_ready()

    def renew(self, *, force: bool = False) -> list[str]:
        """Re-sign snapshot and/or timestamp when less than half of their validity is left."""
        with self._locked():
            self._require_initialised()
            now = self.clock()
            renewed: list[str] = []
            if force or self._due(SNAPSHOT, now):
                self.do_snapshot(force=True)
                renewed.append(SNAPSHOT)
            if renewed or self._due(TIMESTAMP, now):
                self.do_timestamp(force=True)
                renewed.append(TIMESTAMP)
            return renewed

    def _due(self, role: str, now: float) -> bool:
        md = self.published(role)
        if md is None:
            return True
        left = md.signed.expires.timestamp() - now
        return left < _lifetime(self.settings, role) / 2

    def status(self) -> list[RoleStatus]:
        self._require_initialised()
        out = []
        for role in ALL_ROLES:
            current = self.published(role)
            pending = self.pending(role)
            delegator = self._delegator(role, newest=True)
            role_def = None if delegator is None else delegator.get_delegated_role(role)
            out.append(RoleStatus(
                role=role, version=0 if current is None else current.signed.version,
                expires=None if current is None else int(current.signed.expires.timestamp()),
                threshold=0 if role_def is None else role_def.threshold,
                keys=0 if role_def is None else len(role_def.keyids),
                local_keys=len(self.keys.signers(role)),
                pending_version=None if pending is None else pending.signed.version,
                pending_signatures=0 if pending is None else self._count_valid(role, pending)))
        return out

    def root_metadata(self) -> bytes:
        """The newest published root: what devices are provisioned with (``bootstrap`` of ngclient)."""
        md = self.published(ROOT)
        if md is None:
            raise UpdatesError("the update repository has no published root")
        return self._published_path(ROOT, md.signed.version).read_bytes()

    def _require_initialised(self) -> None:
        if self._published_version(ROOT) == 0:
            raise UpdatesError(f"no update repository in {self.folder}: run `fleet-server updates init`")


def _role_paths(role: str) -> list[str]:
    # python-tuf matches a pattern segment by segment ("*" never spans a "/"), and a target path of
    # this fleet has at most four segments (protocol.messages.TARGET_PATH_RE).
    return [f"{role}/*", f"{role}/*/*", f"{role}/*/*/*"]


def _check_target(role: str, path: str) -> None:
    if role not in TARGET_ROLES:
        raise UpdatesError(f"{str(role)[:40]!r} is not a targets role ({', '.join(TARGET_ROLES)})")
    if not isinstance(path, str) or not TARGET_PATH_RE.fullmatch(path) or not path.startswith(f"{role}/"):
        raise UpdatesError(f"target path {str(path)[:120]!r} is not allowed: lowercase letters, digits, "
                           f"'.', '_' and '-' in at most four segments, under {role}/")
    if len(path.rpartition("/")[2]) > 63:
        # Served as "<sha256>.<name>", one segment of at most 128 characters (TUF_PATH_RE).
        raise UpdatesError(f"target path {path[:120]!r}: its last segment is longer than 63 characters")


def _signatures_of(data: bytes, pending: Metadata[Any]) -> list[Signature]:
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UpdatesError("the signature file is not JSON") from None
    try:
        if isinstance(value, dict) and "signed" in value:
            other = Metadata.from_bytes(data)
            if other.signed_bytes != pending.signed_bytes:
                raise UpdatesError(f"the signed file is not the pending version {pending.signed.version} "
                                   "(export it again)")
            return list(other.signatures.values())
        items = value if isinstance(value, list) else [value]
        return [Signature.from_dict(dict(item)) for item in items]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UpdatesError("the signature file holds neither TUF metadata nor {keyid, sig} "
                           "signatures") from None


def sign_exported(data: bytes, key_file: Path) -> tuple[Metadata[Any], bytes]:
    """Sign an exported pending version with a key file (on the offline machine; no repository
    needed): the metadata with the signature appended, and its bytes for ``add-signature``."""
    if len(data) > MAX_METADATA_BYTES:
        raise UpdatesError("the exported file is too large for TUF metadata")
    try:
        md = Metadata.from_bytes(data)
    except (ValueError, KeyError, TypeError) as exc:
        raise UpdatesError(f"not TUF metadata: {exc}") from None
    md.sign(load_key_file(key_file), append=True)
    return md, md.to_bytes()


def update_repository_exists(config: ServerConfig) -> bool:
    """True once ``fleet-server updates init`` has made the repository of this configuration."""
    return (config.updates.dir / "metadata" / "1.root.json").is_file()


def open_update_repository(config: ServerConfig, *, clock: Callable[[], float]) -> UpdateRepository:
    """The update repository of this configuration (``[updates] dir``); :class:`UpdatesError` when
    it was not initialised.  ``clock``: seconds since the epoch (e.g. ``time.time``)."""
    repo = UpdateRepository(config.updates.dir, config.updates, clock=clock)
    repo._require_initialised()
    return repo


def initialised_update_repository(config: ServerConfig, *,
                                  clock: Callable[[], float]) -> UpdateRepository | None:
    """:func:`open_update_repository`, or None before ``fleet-server updates init`` (model publishing
    adds targets only once the repository exists)."""
    return open_update_repository(config, clock=clock) if update_repository_exists(config) else None


__all__ = ["ALL_ROLES", "DEFAULT_KEYS", "DEFAULT_THRESHOLD", "ONLINE_ROLES", "RoleStatus", "SignOutcome",
           "UpdateRepository", "UpdatesError", "initialised_update_repository", "open_update_repository",
           "sign_exported", "target_file_name", "update_repository_exists"]
