"""Unlocking a model: decrypt in memory, load onnxruntime from bytes, hand the session to the guard.

In order (docs/model-package.md, section 6):

1. :func:`protocol.modelpkg.decrypt_package` of the kept (``mmap``-ed) package into a buffer the
   vault keeps per model (:class:`ModelBuffer`: allocated once, page-locked with ``mlock`` when the
   process may, so the plaintext is not swapped out; reused across lock/unlock cycles);
2. :class:`~agent.inference.runtime.OrtRuntime` from those bytes (never a path; no optimised-model
   file, no profiling), which wipes the buffer once the session exists (``wipe_source``) - on
   failure the buffer is zeroed here;
3. the session's inputs and outputs must match the signed manifest's io signature;
4. the caller zeroizes the data key, and builds the guard's policy from the manifest and the signed
   :class:`~protocol.messages.ModelPolicy` (:func:`guard_policy`).

Nothing here writes a file. :func:`harden_process` keeps process memory out of core dumps and away
from ptrace (``RLIMIT_CORE = 0``, ``PR_SET_DUMPABLE = 0``); swap must be off or encrypted on the
device image (the agent cannot enforce that).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import mmap
import resource
from collections.abc import Mapping
from typing import cast

import numpy as np

from agent.inference.guard import GuardPolicy
from agent.inference.harden import Mode, OutputPolicy
from agent.inference.runtime import OrtRuntime, zeroize
from agent.inference.validate import InputLimits
from protocol.messages import ModelPolicy
from protocol.modelpkg import Manifest, decrypt_package

__all__ = ["ModelBuffer", "VaultRuntime", "guard_policy", "harden_process", "open_session"]

_PR_SET_DUMPABLE = 4  # <linux/prctl.h>


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name, use_errno=True)
    except OSError:
        return None


class ModelBuffer:
    """One model's plaintext buffer, kept across unlocks and page-locked when allowed.

    ``mlock`` may fail (``RLIMIT_MEMLOCK`` too small for the model, no ``CAP_IPC_LOCK``); the buffer
    is then used unlocked and :attr:`locked` says so (the vault reports it in its status).
    """

    def __init__(self) -> None:
        self._buf: bytearray | None = None
        self._pin: ctypes.Array[ctypes.c_char] | None = None
        self.locked = False

    def get(self, size: int) -> bytearray:
        """A zeroed buffer of exactly ``size`` bytes (the kept one if it has that size)."""
        if self._buf is not None and len(self._buf) == size:
            zeroize(self._buf)
            return self._buf
        self.release()
        buf = bytearray(size)
        self._buf = buf
        libc = _libc()
        if libc is not None and size:
            pin = (ctypes.c_char * size).from_buffer(buf)
            if libc.mlock(ctypes.c_void_p(ctypes.addressof(pin)), ctypes.c_size_t(size)) == 0:
                self._pin, self.locked = pin, True
            else:
                del pin
        return buf

    def release(self) -> None:
        """Zero and drop the buffer (``munlock`` first if it was locked)."""
        buf, pin, self._buf, self._pin = self._buf, self._pin, None, None
        if buf is None:
            return
        zeroize(buf)
        if pin is not None:
            libc = _libc()
            if libc is not None:
                libc.munlock(ctypes.c_void_p(ctypes.addressof(pin)), ctypes.c_size_t(len(buf)))
            del pin
        self.locked = False


class VaultRuntime:
    """The session the guard serves with: an :class:`OrtRuntime` that counts the calls reaching the
    model and remembers that it was closed (a lock, or the guard's own lease check)."""

    def __init__(self, inner: OrtRuntime) -> None:
        self._inner = inner
        self.runs = 0
        self.closed = False

    @property
    def output_names(self) -> tuple[str, ...]:
        return self._inner.output_names

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model (counted)."""
        self.runs += 1
        return self._inner.run(inputs)

    def close(self) -> None:
        """Drop the session (onnxruntime frees its copy of the weights)."""
        self.closed = True
        self._inner.close()


def open_session(package: bytes | mmap.mmap, manifest: Manifest, data_key: bytearray, buffer: ModelBuffer,
                 *, threads: int = 1) -> VaultRuntime:
    """Decrypt ``package`` with ``data_key`` into ``buffer`` and load it into onnxruntime.

    Raises a :class:`~protocol.modelpkg.ModelPackageError` (wrong key, tampered or reordered chunk,
    plaintext digest, a model whose io does not match the manifest). The buffer holds no plaintext
    afterwards, whatever happens; the data key is the caller's to zeroize.
    """
    out = buffer.get(manifest.plaintext_size)
    # cryptography's AESGCM and hmac accept a bytearray key; the cast avoids an immutable copy.
    plaintext = decrypt_package(package, manifest, cast(bytes, data_key), out=out)
    try:
        runtime = OrtRuntime(plaintext, threads=threads, wipe_source=True)
    finally:
        zeroize(plaintext)
    try:
        runtime.check_io(manifest.io_signature)
    except BaseException:
        runtime.close()
        raise
    return VaultRuntime(runtime)


def guard_policy(manifest: Manifest, policy: ModelPolicy) -> GuardPolicy:
    """The guard's policy: io signature from the verified manifest, everything else from the signed
    model policy of the key release."""
    output = OutputPolicy(mode=cast(Mode, policy.output_mode), decimals=policy.decimals, k=policy.k,
                          labels=policy.labels)
    return GuardPolicy(model=manifest.name, io_signature=manifest.io_signature,
                       input_limits=InputLimits(max_batch=policy.max_batch), output=output,
                       device_daily_quota=policy.device_daily_quota, block_on_alarm=policy.block_on_alarm)


def harden_process() -> dict[str, bool]:
    """No core dumps, no ptrace attach by other processes of the same user; what succeeded.

    Process-wide and irreversible for the process (fine for the agent; a test harness running many
    agents in one process may turn it off with ``[models] harden_process = false``).
    """
    done = {"core_dumps_off": False, "not_dumpable": False}
    with contextlib.suppress(OSError, ValueError):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        done["core_dumps_off"] = True
    libc = _libc()
    if libc is not None:
        done["not_dumpable"] = libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) == 0
    return done
