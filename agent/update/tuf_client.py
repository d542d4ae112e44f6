"""The agent's TUF client: python-tuf's ``ngclient.Updater`` over MQTT, with local trusted metadata.

:class:`UpdateClient` keeps the update repository's metadata in a folder of the agent's state
folder (0700; ngclient writes every file atomically through a 0600 temporary file), so the trusted
versions survive restarts: a rollback to older metadata, a replayed snapshot or a frozen timestamp
is refused by ngclient against what the device already trusted. Every ``Updater`` is bootstrapped
with the root metadata the device was provisioned with (``[update] root_file``); ngclient then walks
the newer roots it already holds (``root_history/``) and those the repository offers, each verified
by the one before it, as python-tuf recommends.

Nothing is accepted that python-tuf refuses: its ``RepositoryError`` (signatures, thresholds,
versions, expiry, hashes, lengths) and a download longer than allowed become
:class:`~protocol.errors.UpdateVerificationError`, any other ``DownloadError`` (no answer, not found)
:class:`~protocol.errors.UpdateError`, both with python-tuf's message.

Targets are returned as bytes (:meth:`UpdateClient.fetch_target`), never written to a named file:
the caller decides where verified bytes go (the inactive A/B slot). ngclient's own
``FetcherInterface.download_bytes`` enforces the signed length while the bytes arrive (it spools
them through an anonymous ``tempfile.TemporaryFile``, unlinked from the start, outside the state
folder); the hashes are checked with ``TargetFile.verify_length_and_hashes`` before the bytes are
returned.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

from tuf.api.exceptions import DownloadError, DownloadLengthMismatchError, RepositoryError
from tuf.api.metadata import Metadata, Root, TargetFile
from tuf.ngclient import Updater, UpdaterConfig

from agent.config import AgentConfig
from agent.statefile import ensure_dir, read_optional
from agent.update.mqtt_fetcher import METADATA_BASE_URL, TARGET_BASE_URL, MqttFetcher, Publisher
from protocol.errors import ConfigError, StorageError, UpdateError, UpdateVerificationError

__all__ = ["METADATA_FOLDER", "TargetNotFound", "UpdateClient", "VerifiedTarget", "measure_refresh_ms"]

METADATA_FOLDER = "tuf"
"""Sub-folder of the agent's state folder holding the trusted TUF metadata."""
MAX_ROOT_SIZE = 512_000  # ngclient's default root_max_length
_T = TypeVar("_T")


class TargetNotFound(UpdateError):
    """The repository's verified metadata lists no such target (python-tuf found no delegated role
    naming it): nothing was downloaded, and nothing was refused."""


@dataclass(frozen=True, slots=True)
class VerifiedTarget:
    """A target whose bytes ngclient verified against the signed metadata (length and hashes)."""

    path: str
    """The TUF target path, e.g. ``firmware/edge-camera/1.3.0.fwb``."""
    data: bytes
    custom: Mapping[str, Any]
    """The target's signed custom metadata (read-only)."""


class UpdateClient:
    """TUF client of one device (see the module docstring).

    ``metadata_dir``: where trusted metadata is kept (created 0700); ``root``: the provisioned root
    metadata (bytes); ``fetcher``: the transport (:class:`MqttFetcher`). Thread-safe by
    serialising: one refresh or download runs at a time (ngclient's ``Updater`` is single-instance
    per folder, and the fetcher has one inbox), so the update thread (firmware) and the vault's
    channel thread (model packages) may share one client.
    """

    def __init__(self, *, metadata_dir: Path, root: bytes, fetcher: MqttFetcher,
                 config: UpdaterConfig | None = None) -> None:
        self.metadata_dir = ensure_dir(Path(metadata_dir))
        ensure_dir(self.metadata_dir / "root_history")  # ngclient would create it with the umask
        self._root = root
        self.fetcher = fetcher
        self._config = config or UpdaterConfig()
        self._updater: Updater | None = None
        self._lock = threading.RLock()

    @classmethod
    def from_config(cls, config: AgentConfig, client: Publisher, *,
                    clock: Callable[[], float] = time.monotonic,
                    wall_clock: Callable[[], float] = time.time) -> UpdateClient:
        """The client of the agent configured by ``config`` (its ``[update]`` table), publishing its
        requests with ``client``; the metadata goes to ``<state_dir>/tuf``."""
        update = config.update
        if update is None:
            raise ConfigError("update: no [update] table: this agent takes no signed updates")
        if update.root_file is None:
            raise ConfigError("update.root_file: missing: the device needs the update repository's root")
        try:
            root = read_optional(update.root_file, max_size=MAX_ROOT_SIZE)
        except StorageError as exc:
            raise ConfigError(f"update.root_file: {exc.diagnostics()}") from None
        if root is None:
            raise ConfigError(f"update.root_file: {update.root_file} does not exist")
        fetcher = MqttFetcher(client, config.device_id, chunk=update.fetch_chunk,
                              timeout=update.fetch_timeout, attempts=update.fetch_attempts, clock=clock,
                              wall_clock=wall_clock)
        return cls(metadata_dir=config.state_dir / METADATA_FOLDER, root=root, fetcher=fetcher)

    # -- public ------------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Update the top-level metadata (root, timestamp, snapshot, targets) from the repository.

        Raises :class:`UpdateVerificationError` for metadata python-tuf refuses, :class:`UpdateError`
        when it cannot be downloaded; the trusted metadata on disk is then what it was, and the next
        :meth:`fetch_target` refreshes again first.
        """
        with self._lock:
            self._updater = None  # fail closed: no download on the metadata of an earlier refresh
            updater = self._new_updater()
            self._guard("refreshing the update metadata", updater.refresh)
            self._updater = updater

    def fetch_target(self, target_path: str, *, max_length: int, refresh: bool = True) -> VerifiedTarget:
        """Refresh the metadata, then download ``target_path`` into memory and return it verified;
        refused before downloading if its signed length exceeds ``max_length``.

        ``refresh=False`` downloads on the metadata of the last :meth:`refresh` (one is done now if
        none succeeded). The default is what the installer's ``TargetSource`` needs: an agent runs
        for weeks, and a target assigned now must be looked up in metadata that is current now (a
        release signed since, a timestamp expired since), not in what the first assignment fetched.

        Raises :class:`TargetNotFound` (an :class:`UpdateError`) when the verified metadata lists no
        such target, :class:`UpdateError` when it is too large or cannot be downloaded,
        :class:`UpdateVerificationError` when python-tuf refuses metadata or bytes.
        """
        with self._lock:
            return self._fetch_target(target_path, max_length=max_length, refresh=refresh)

    def _fetch_target(self, target_path: str, *, max_length: int, refresh: bool) -> VerifiedTarget:
        if refresh or self._updater is None:
            self.refresh()
        updater = self._updater
        assert updater is not None
        info = self._guard(f"looking up target {target_path}", lambda: updater.get_targetinfo(target_path))
        if info is None:
            raise TargetNotFound(f"the update repository's signed metadata lists no target {target_path}")
        if info.length > max_length:
            raise UpdateError(f"target {target_path} is {info.length} bytes, more than the {max_length} "
                              "allowed")
        url = self._target_url(info)

        def download() -> bytes:
            data = self.fetcher.download_bytes(url, info.length)
            info.verify_length_and_hashes(data)
            return data

        data = self._guard(f"downloading target {target_path}", download)
        return VerifiedTarget(path=info.path, data=data, custom=MappingProxyType(dict(info.custom)))

    # -- internals ---------------------------------------------------------------------------------
    def _new_updater(self) -> Updater:
        # A fresh Updater per refresh: ngclient allows one refresh() per instance; what it trusts
        # between refreshes lives in metadata_dir.
        return self._guard("loading the trusted update metadata", lambda: Updater(
            metadata_dir=str(self.metadata_dir), metadata_base_url=METADATA_BASE_URL,
            target_base_url=TARGET_BASE_URL, fetcher=self.fetcher, config=self._config,
            bootstrap=self._root))

    def _target_url(self, info: TargetFile) -> str:
        # As Updater.download_target builds it: consistent snapshots prefix the file name with a hash.
        path = info.path
        if self._consistent_snapshot() and self._config.prefix_targets_with_hash:
            dirname, sep, basename = path.rpartition("/")
            path = f"{dirname}{sep}{next(iter(info.hashes.values()))}.{basename}"
        return TARGET_BASE_URL + path

    def _consistent_snapshot(self) -> bool:
        """From the trusted root ngclient keeps as ``root.json`` (verified by the last refresh)."""
        try:
            with open(self.metadata_dir / "root.json", "rb") as f:
                return bool(Metadata[Root].from_bytes(f.read()).signed.consistent_snapshot)
        except (OSError, ValueError) as exc:
            raise UpdateError(f"cannot read the trusted root in {self.metadata_dir}: {exc}") from None

    @staticmethod
    def _guard(what: str, fn: Callable[[], _T]) -> _T:
        try:
            return fn()
        except (RepositoryError, DownloadLengthMismatchError) as exc:  # more bytes than signed: refused
            raise UpdateVerificationError(f"{what}: refused by TUF: {_message(exc)}") from None
        except DownloadError as exc:
            raise UpdateError(f"{what}: {_message(exc)}") from None
        except ValueError as exc:  # python-tuf's refusal of an argument it cannot use
            raise UpdateError(f"{what}: {_message(exc)}") from None
        except OSError as exc:
            raise StorageError(f"{what}: {exc.strerror or exc}") from None


def _message(exc: BaseException) -> str:
    """python-tuf's message, with the cause's when it wraps one (e.g. DownloadError from a fetcher)."""
    text = str(exc) or type(exc).__name__
    cause = exc.__cause__
    if cause is not None and str(cause) and str(cause) not in text:
        text = f"{text}: {cause}"
    return f"{type(exc).__name__}: {text}"


def measure_refresh_ms(client: UpdateClient, rounds: int = 20) -> float:
    """Median milliseconds of :meth:`UpdateClient.refresh` when the repository has nothing new (the
    benchmark ``tuf_refresh_ms_p50``): one warm-up refresh, then ``rounds`` timed ones."""
    client.refresh()
    samples = []
    for _ in range(max(1, rounds)):
        start = time.perf_counter()
        client.refresh()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)
