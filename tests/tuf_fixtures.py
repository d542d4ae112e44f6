"""A small real TUF repository for tests, built with python-tuf's metadata API and securesystemslib's
``CryptoSigner`` (one Ed25519 key per role), written to a folder in the served layout (consistent
snapshots: ``metadata/<version>.<role>.json``, ``metadata/timestamp.json``,
``targets/<dir>/<sha256>.<name>``).

Not the fleet server's repository (:mod:`fleet_server.updates`): only enough of one to test the
transport and the device's client against real signed metadata. :class:`TestRepository` serves its
files through ``read_file``, the part of :class:`~fleet_server.updates.targets.TargetStore` the
worker uses.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from securesystemslib.signer import CryptoSigner, Signer
from tuf.api.metadata import (
    DelegatedRole,
    Delegations,
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from protocol.messages import TUF_PATH_RE

FIRMWARE = "firmware"
TOP_ROLES = (Root.type, Timestamp.type, Snapshot.type, Targets.type)


class TestRepository:
    """Root, timestamp, snapshot, targets and a delegated ``firmware`` role (paths ``firmware/*/*``)."""

    __test__ = False  # not a pytest test class

    def __init__(self, folder: Path, *, now: dt.datetime | None = None) -> None:
        self.folder = Path(folder)
        (self.folder / "metadata").mkdir(parents=True, exist_ok=True)
        (self.folder / "targets").mkdir(parents=True, exist_ok=True)
        self.now = now or dt.datetime.now(dt.UTC).replace(microsecond=0)
        self.signers: dict[str, Signer] = {r: CryptoSigner.generate_ed25519() for r in (*TOP_ROLES, FIRMWARE)}
        expires = self.now + dt.timedelta(days=7)
        root = Root(expires=expires, consistent_snapshot=True)
        for role in TOP_ROLES:
            root.add_key(self.signers[role].public_key, role)
        targets = Targets(expires=expires)
        fw_key = self.signers[FIRMWARE].public_key
        targets.delegations = Delegations(
            keys={fw_key.keyid: fw_key},
            roles={FIRMWARE: DelegatedRole(name=FIRMWARE, keyids=[fw_key.keyid], threshold=1,
                                           terminating=True, paths=["firmware/*/*"])})
        self.md: dict[str, Metadata[Any]] = {
            Root.type: Metadata(root), Targets.type: Metadata(targets),
            FIRMWARE: Metadata(Targets(expires=expires)), Snapshot.type: Metadata(Snapshot(expires=expires)),
            Timestamp.type: Metadata(Timestamp(expires=expires)),
        }
        self.history: dict[str, list[bytes]] = {}
        for role in (Root.type, Targets.type, FIRMWARE):
            self._write(role)
        self._publish()

    # -- building ----------------------------------------------------------------------------------
    def root_bytes(self) -> bytes:
        """The root metadata a device is provisioned with (version 1)."""
        return self.history[Root.type][0]

    def add_target(self, path: str, data: bytes, custom: dict[str, Any] | None = None) -> TargetFile:
        """Add ``path`` to the firmware role (new firmware, snapshot and timestamp versions)."""
        info = TargetFile.from_data(path, data, ["sha256"])
        if custom:
            info.unrecognized_fields["custom"] = custom
        firmware = self.md[FIRMWARE].signed
        firmware.targets[path] = info
        firmware.version += 1
        self._write(FIRMWARE)
        self.write_target_file(path, data)
        self._publish()
        return info

    def target_file(self, path: str) -> Path:
        """Where the served bytes of target ``path`` are (hash-prefixed name)."""
        info = self.md[FIRMWARE].signed.targets[path]
        dirname, _, basename = path.rpartition("/")
        return self.folder / "targets" / dirname / f"{info.hashes['sha256']}.{basename}"

    def write_target_file(self, path: str, data: bytes) -> None:
        """Serve ``data`` as target ``path`` (tests use it to tamper with a published target)."""
        file = self.target_file(path)
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(data)

    def new_timestamp(self) -> None:
        """A new timestamp version (nothing else changed)."""
        self._publish(snapshot=False)

    def _publish(self, *, snapshot: bool = True) -> None:
        if snapshot:
            snap = self.md[Snapshot.type].signed
            for role in (Targets.type, FIRMWARE):
                snap.meta[f"{role}.json"] = MetaFile(version=self.md[role].signed.version)
            if Snapshot.type in self.history:
                snap.version += 1
            self._write(Snapshot.type)
        ts = self.md[Timestamp.type].signed
        ts.snapshot_meta = MetaFile(version=self.md[Snapshot.type].signed.version)
        if Timestamp.type in self.history:
            ts.version += 1
        self._write(Timestamp.type)

    def _write(self, role: str) -> None:
        md = self.md[role]
        md.signatures.clear()
        md.sign(self.signers[role])
        data = md.to_bytes(JSONSerializer(compact=False))
        name = "timestamp.json" if role == Timestamp.type else f"{md.signed.version}.{role}.json"
        (self.folder / "metadata" / name).write_bytes(data)
        self.history.setdefault(role, []).append(data)

    # -- serving (TargetStore.read_file) -------------------------------------------------------------
    def read_file(self, path: str) -> bytes | None:
        """A file of the served repository, or None."""
        if TUF_PATH_RE.fullmatch(path) is None or ".." in path.split("/"):
            return None
        file = self.folder / path
        return file.read_bytes() if file.is_file() else None

