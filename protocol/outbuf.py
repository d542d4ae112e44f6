"""Output buffers for decrypting large models: a ``bytearray`` without the zero-fill pass, paged in
on a second thread while the caller writes its beginning.

Decrypting a 100 MB model into ``bytearray(size)`` costs two passes over fresh memory before the
first byte of plaintext: ``bytearray`` zero-fills the whole buffer, and that first touch takes one
page fault per 4 KiB page, which in a virtual machine costs about as much as the decryption itself.
:func:`output_buffer` instead

* allocates the ``bytearray`` without zero-filling it (``PyByteArray_FromStringAndSize(NULL, n)``,
  CPython's own constructor for an uninitialised bytearray). The contents are undefined until
  written: **the caller must write every byte or zero the buffer** (``decrypt_package`` writes each
  byte once, and zeroes the whole buffer on any failure);
* pages it in ahead of the writer with ``madvise(MADV_POPULATE_WRITE)`` (Linux 5.14+) on a
  :class:`Prefaulter` thread; ctypes releases the GIL for the call, so the page faults run on the
  other core while the caller decrypts. Where that is not available (another OS, an older kernel,
  not CPython) the buffer is simply faulted in by the writes, still without the zero-fill pass.

Small buffers (under :data:`MIN_SIZE`) are plain ``bytearray(size)``: there is nothing to win.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
import threading

MIN_SIZE = 8 << 20
"""Buffers from this size on are allocated without zero-fill and prefaulted."""
STEP = 8 << 20
"""Bytes paged in per ``madvise`` call (the prefaulter checks for a stop between calls)."""
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux 5.14 value if Python lacks it


def _bindings() -> tuple[object, object] | None:
    if sys.implementation.name != "cpython" or not sys.platform.startswith("linux"):
        return None
    try:
        new = ctypes.pythonapi.PyByteArray_FromStringAndSize
        new.restype = ctypes.py_object
        new.argtypes = [ctypes.c_char_p, ctypes.c_ssize_t]
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
        madvise.restype = ctypes.c_int
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    except (AttributeError, OSError):
        return None
    return new, madvise


_BINDINGS = _bindings()


class Prefaulter:
    """Pages in ``[address, address + size)`` on a daemon thread, :data:`STEP` bytes at a time.

    Stops at the first failing call (an unsupported advice: the writes fault the pages in instead)
    or when :meth:`stop` is called. It never touches memory contents; only page tables."""

    def __init__(self, madvise: object, address: int, size: int) -> None:
        page = mmap.PAGESIZE
        self._madvise = madvise
        self._start = (address + page - 1) // page * page
        self._end = (address + size) // page * page
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="outbuf-prefault", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        offset = self._start
        while offset < self._end and not self._stop.is_set():
            n = min(STEP, self._end - offset)
            if self._madvise(offset, n, _MADV_POPULATE_WRITE) != 0:  # type: ignore[operator]
                return
            offset += n

    def stop(self) -> None:
        """Stop (after the call in progress) and wait for the thread."""
        self._stop.set()
        self._thread.join()


def output_buffer(size: int) -> tuple[bytearray, Prefaulter | None]:
    """A ``bytearray`` of ``size`` bytes whose contents are **undefined** (see the module docstring),
    and the prefaulter paging it in (``None`` for small buffers or where unsupported); call its
    :meth:`Prefaulter.stop` when done writing."""
    if size < MIN_SIZE or _BINDINGS is None:
        return bytearray(size), None
    new, madvise = _BINDINGS
    buf: bytearray = new(None, size)  # type: ignore[operator]
    address = ctypes.addressof((ctypes.c_char * size).from_buffer(buf))
    return buf, Prefaulter(madvise, address, size)


__all__ = ["MIN_SIZE", "Prefaulter", "output_buffer"]
