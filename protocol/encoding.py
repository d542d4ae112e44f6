"""Canonical encoding of wire messages: strict JSON in, canonical JSON bytes out.

Everything that is signed or hashed is signed or hashed as *bytes as received*; the canonical
encoder below exists so that a sender produces one deterministic byte string for a value.

Canonical form: UTF-8 JSON, object keys sorted, no insignificant whitespace, no floats (times are
integer milliseconds), byte strings as standard base64 with padding.

Decoding is strict and bounded: a size limit is checked before parsing, duplicate object keys,
NaN/Infinity, floats, nesting deeper than ``MAX_DEPTH`` and non-object top levels are refused with
:class:`~protocol.errors.MessageError`.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from typing import Any

from protocol.errors import MessageError

MAX_DEPTH = 16

JsonValue = Any  # JSON values: dict[str, JsonValue] | list[JsonValue] | str | int | bool | None


def canonical_bytes(value: Mapping[str, JsonValue]) -> bytes:
    """The canonical UTF-8 encoding of a JSON object (sorted keys, compact, no floats)."""
    _check_no_floats(value, 0)
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


# Exact types that need no further look: never a float, never a container.  Checked with ``type(v) in``
# (not isinstance) so that subclasses (IntEnum, a float subclass...) still take the full path.
_SCALARS = frozenset({str, int, bool, type(None)})


def _check_no_floats(value: JsonValue, depth: int) -> None:
    # One walk, but scalars are checked in their container's loop instead of by a call each (most
    # values of a message are scalars): the same errors, in the same order, at a fraction of the cost.
    if depth > MAX_DEPTH:
        raise MessageError("message nests too deeply")
    if isinstance(value, float):
        raise MessageError("floats are not allowed in canonical messages")
    if isinstance(value, dict):
        deep = depth >= MAX_DEPTH  # any child would be deeper than MAX_DEPTH
        for k, v in value.items():
            if not isinstance(k, str):
                raise MessageError("object keys must be strings")
            if deep:
                raise MessageError("message nests too deeply")
            if type(v) not in _SCALARS:
                _check_no_floats(v, depth + 1)
    elif isinstance(value, list | tuple):
        deep = depth >= MAX_DEPTH
        for v in value:
            if deep:
                raise MessageError("message nests too deeply")
            if type(v) not in _SCALARS:
                _check_no_floats(v, depth + 1)


def _no_duplicates(pairs: list[tuple[str, JsonValue]]) -> dict[str, JsonValue]:
    out: dict[str, JsonValue] = {}
    for k, v in pairs:
        if k in out:
            raise MessageError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _reject_constant(name: str) -> JsonValue:
    raise MessageError(f"{name} is not allowed")


def _reject_float(text: str) -> JsonValue:
    raise MessageError("floats are not allowed")


def decode_object(data: bytes, *, max_size: int) -> dict[str, JsonValue]:
    """Parse ``data`` as one strict JSON object of at most ``max_size`` bytes."""
    if len(data) > max_size:
        raise MessageError(f"message of {len(data)} bytes exceeds the limit of {max_size}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MessageError(f"message is not UTF-8 (byte {exc.start})") from None
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant,
                           parse_float=_reject_float)
    except MessageError:
        raise
    except RecursionError:
        raise MessageError("message nests too deeply") from None
    except json.JSONDecodeError as exc:
        raise MessageError(f"message is not valid JSON: {exc.msg} at {exc.pos}") from None
    except ValueError as exc:
        raise MessageError(f"message is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise MessageError("message must be a JSON object")
    _check_depth(value, 0)
    return value


def _check_depth(value: JsonValue, depth: int) -> None:
    # Parsed JSON holds only dict, list and scalars: only containers are walked (see _check_no_floats).
    if depth > MAX_DEPTH:
        raise MessageError("message nests too deeply")
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    if children and depth >= MAX_DEPTH:
        raise MessageError("message nests too deeply")
    for v in children:
        if isinstance(v, dict | list):
            _check_depth(v, depth + 1)


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64decode(text: str, *, field: str, max_len: int | None = None) -> bytes:
    """Strict standard base64 (padding required, no whitespace) with an optional decoded-size cap."""
    if not isinstance(text, str):
        raise MessageError(f"{field}: expected a base64 string")
    if max_len is not None and len(text) > (max_len + 2) // 3 * 4:
        raise MessageError(f"{field}: longer than {max_len} bytes")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise MessageError(f"{field}: not valid base64") from None
