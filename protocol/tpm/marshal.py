"""Bounded big-endian reader and writer for TPM 2.0 marshalling (TPM 2.0 Part 1, 'Marshalling').

TPM structures are big-endian, have no padding, and carry variable-size fields as ``TPM2B``:
a ``UINT16`` size followed by that many bytes (Part 2, 10.4).  :class:`Reader` checks the remaining
length before every read and raises :class:`protocol.errors.StructureError` naming the structure,
the field and the byte offset, so that truncated or garbled input never escapes as ``IndexError`` or
``struct.error``.  :class:`Writer` is the inverse, with range checks on every integer it writes.

Both are deliberately small and allocation-light: the server parses thousands of quotes per second.
"""

from __future__ import annotations

import struct
from typing import Any

from protocol.errors import StructureError

__all__ = ["U8", "U16", "U32", "U64", "Reader", "Writer", "structure_error", "tpm2b_at", "truncated"]

# Precompiled big-endian integer codecs (TPM 2.0 Part 2, 5.2 'Base types').
U8 = struct.Struct(">B")
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")


def structure_error(structure: str, field: str, offset: int, message: str) -> StructureError:
    """The project's one error shape for unmarshalling: ``STRUCTURE.field at offset N: message``."""
    return StructureError(f"{structure}.{field} at offset {offset}: {message}")


def truncated(structure: str, field: str, offset: int, need: int, left: int) -> StructureError:
    """Error for a read of ``need`` bytes at ``offset`` with only ``left`` bytes remaining."""
    return structure_error(structure, field, offset, f"truncated: needs {need} bytes, {max(left, 0)} left")


def tpm2b_at(data: bytes, pos: int, end: int, structure: str, field: str, max_size: int) -> tuple[bytes, int]:
    """Read a TPM2B at ``data[pos:end]``: returns (contents, offset after it).

    The function form of :meth:`Reader.tpm2b`, for the hot paths that unpack with local offsets (a
    method call per field costs more than the rest of the parse).  Sizes above ``max_size`` are refused.
    """
    if pos + 2 > end:
        raise truncated(structure, field + ".size", pos, 2, end - pos)
    size = (data[pos] << 8) | data[pos + 1]
    if size > max_size:
        raise structure_error(structure, field + ".size", pos, f"size {size} exceeds the maximum {max_size}")
    start = pos + 2
    stop = start + size
    if stop > end:
        raise truncated(structure, field, start, size, end - start)
    return data[start:stop], stop


class Reader:
    """Sequential reader over ``data[start:end]`` that never reads past ``end``.

    Offsets in error messages are absolute offsets into ``data`` (the bytes the caller received), so a
    nested reader for a TPM2B-wrapped structure reports positions in the outer buffer.
    """

    __slots__ = ("_data", "_end", "_pos", "structure")

    def __init__(self, data: bytes, structure: str, *, start: int = 0, end: int | None = None) -> None:
        if not isinstance(data, bytes):
            data = bytes(data)
        stop = len(data) if end is None else end
        if not 0 <= start <= stop <= len(data):
            raise StructureError(f"{structure}: invalid reader bounds {start}..{stop} of {len(data)} bytes")
        self._data = data
        self._pos = start
        self._end = stop
        self.structure = structure

    # -- position --------------------------------------------------------------------------------
    @property
    def data(self) -> bytes:
        """The whole underlying buffer (not only the bounded window)."""
        return self._data

    @property
    def offset(self) -> int:
        """Absolute offset of the next byte to read."""
        return self._pos

    @property
    def remaining(self) -> int:
        """Bytes left before the reader's end bound."""
        return self._end - self._pos

    @property
    def end(self) -> int:
        """Absolute offset of the reader's end bound."""
        return self._end

    def seek(self, offset: int) -> None:
        """Continue at absolute ``offset`` (after a function-style unpacker consumed bytes up to it)."""
        if not self._pos <= offset <= self._end:
            raise self.error("seek", f"offset {offset} outside {self._pos}..{self._end}")
        self._pos = offset

    def error(self, field: str, message: str, *, offset: int | None = None) -> StructureError:
        """A :class:`StructureError` for ``field`` at ``offset`` (default: the current offset)."""
        return structure_error(self.structure, field, self._pos if offset is None else offset, message)

    def _short(self, field: str, need: int) -> StructureError:
        return truncated(self.structure, field, self._pos, need, self._end - self._pos)

    # -- primitives ------------------------------------------------------------------------------
    def u8(self, field: str) -> int:
        pos = self._pos
        if pos + 1 > self._end:
            raise self._short(field, 1)
        self._pos = pos + 1
        return self._data[pos]

    def u16(self, field: str) -> int:
        pos = self._pos
        if pos + 2 > self._end:
            raise self._short(field, 2)
        self._pos = pos + 2
        return int(U16.unpack_from(self._data, pos)[0])

    def u32(self, field: str) -> int:
        pos = self._pos
        if pos + 4 > self._end:
            raise self._short(field, 4)
        self._pos = pos + 4
        return int(U32.unpack_from(self._data, pos)[0])

    def u64(self, field: str) -> int:
        pos = self._pos
        if pos + 8 > self._end:
            raise self._short(field, 8)
        self._pos = pos + 8
        return int(U64.unpack_from(self._data, pos)[0])

    def unpack(self, codec: struct.Struct, field: str) -> tuple[Any, ...]:
        """Read a fixed-size group of fields with one precompiled ``struct.Struct``."""
        pos = self._pos
        size = codec.size
        if pos + size > self._end:
            raise self._short(field, size)
        self._pos = pos + size
        return codec.unpack_from(self._data, pos)

    def read(self, size: int, field: str) -> bytes:
        """Exactly ``size`` bytes."""
        pos = self._pos
        if size < 0 or pos + size > self._end:
            raise self._short(field, size)
        self._pos = pos + size
        return self._data[pos:pos + size]

    def tpm2b(self, field: str, max_size: int) -> bytes:
        """A TPM2B: UINT16 size then that many bytes; sizes above ``max_size`` are refused (Part 2, 10.4)."""
        value, self._pos = tpm2b_at(self._data, self._pos, self._end, self.structure, field, max_size)
        return value

    def sized(self, field: str, max_size: int) -> Reader:
        """A reader bounded to the body of a TPM2B-wrapped structure (e.g. TPM2B_PUBLIC), advancing past it.

        The caller parses the structure from the returned reader and then calls :meth:`expect_end`
        on it: the TPM2B size must match the structure exactly (Part 2, 10.4 'TPM2B').
        """
        start = self._pos + 2
        _, stop = tpm2b_at(self._data, self._pos, self._end, self.structure, field, max_size)
        self._pos = stop
        return Reader(self._data, f"{self.structure}.{field}", start=start, end=stop)

    def expect_end(self, what: str = "end") -> None:
        """Refuse trailing bytes: a structure must use exactly the bytes it was given."""
        if self._pos != self._end:
            raise self.error(what, f"{self._end - self._pos} unexpected trailing bytes")


class Writer:
    """Big-endian TPM marshalling into a growing buffer; methods chain (``w.u16(a).u32(b)``)."""

    __slots__ = ("_buf", "structure")

    def __init__(self, structure: str = "TPM") -> None:
        self._buf = bytearray()
        self.structure = structure

    def _range(self, field: str, value: int, bits: int) -> None:
        if not 0 <= value < (1 << bits):
            raise StructureError(f"{self.structure}.{field}: value {value} does not fit in UINT{bits}")

    def u8(self, value: int, field: str = "UINT8") -> Writer:
        self._range(field, value, 8)
        self._buf.append(value)
        return self

    def u16(self, value: int, field: str = "UINT16") -> Writer:
        self._range(field, value, 16)
        self._buf += U16.pack(value)
        return self

    def u32(self, value: int, field: str = "UINT32") -> Writer:
        self._range(field, value, 32)
        self._buf += U32.pack(value)
        return self

    def u64(self, value: int, field: str = "UINT64") -> Writer:
        self._range(field, value, 64)
        self._buf += U64.pack(value)
        return self

    def raw(self, data: bytes) -> Writer:
        """Append bytes unchanged (an already marshalled structure, a fixed-size array)."""
        self._buf += data
        return self

    def tpm2b(self, data: bytes, field: str = "TPM2B", max_size: int = 0xFFFF) -> Writer:
        """Append a TPM2B: UINT16 size then the bytes."""
        if len(data) > max_size:
            raise StructureError(
                f"{self.structure}.{field}: {len(data)} bytes exceed the maximum {max_size}")
        self._buf += U16.pack(len(data))
        self._buf += data
        return self

    def __len__(self) -> int:
        return len(self._buf)

    def to_bytes(self) -> bytes:
        return bytes(self._buf)
