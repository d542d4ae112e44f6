"""Files in the agent's state folder: created 0700, written atomically with mode 0600.

Everything the agent must keep across restarts (its TLS key and certificate, the status file; the
TPM adapter keeps the AK blobs in a sub-folder) is written with :func:`write_atomic`: a temporary
file in the same folder, created 0600 before any byte is written, flushed and fsynced, then
``os.replace``-d over the target and the folder fsynced.  A crash or power loss at any moment
leaves either the old or the new content, never a torn file, and a key is never readable by others,
not even briefly.

Failures are :class:`~protocol.errors.StorageError` naming the path (never the content).
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path

from protocol.errors import StorageError

DIR_MODE = 0o700
FILE_MODE = 0o600


def ensure_dir(path: Path) -> Path:
    """Create ``path`` (and parents) with mode 0700, or tighten an existing folder of ours to 0700.

    A folder owned by someone else is refused: its owner could swap the files the agent trusts.
    """
    path = Path(path)
    try:
        path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        info = path.stat()
        if not stat.S_ISDIR(info.st_mode):
            raise StorageError(f"state path {path} is not a folder")
        if info.st_uid != os.geteuid():
            raise StorageError(f"state folder {path} belongs to uid {info.st_uid}, not to this agent")
        if stat.S_IMODE(info.st_mode) != DIR_MODE:
            os.chmod(path, DIR_MODE)
    except FileExistsError:  # mkdir(exist_ok=True) raises this only for a non-folder in the way
        raise StorageError(f"state path {path} is not a folder") from None
    except OSError as exc:
        raise StorageError(f"cannot prepare state folder {path}: {exc.strerror or exc}") from None
    return path


def write_atomic(path: Path, data: bytes, *, mode: int = FILE_MODE) -> None:
    """Replace ``path`` with ``data`` atomically and durably; the file gets ``mode`` (default 0600)."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise StorageError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)  # mkstemp makes 0600; set the final mode before any data
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise StorageError(f"cannot write {path}: {exc.strerror or exc}") from None
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (not every filesystem lets a folder be opened or fsynced: best effort)."""
    with contextlib.suppress(OSError):
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def read_optional(path: Path, *, max_size: int) -> bytes | None:
    """The content of ``path``, ``None`` if it does not exist; :class:`StorageError` if it is larger
    than ``max_size`` bytes or unreadable."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(max_size + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > max_size:
        raise StorageError(f"{path} is larger than {max_size} bytes")
    return data
