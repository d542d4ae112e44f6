"""Input validation against the manifest's io signature, before anything reaches the model.

Checks, per input: present and known by name; a numpy array of exactly the declared dtype (no
silent casts in-process; JSON values are converted by :func:`from_json` with range checks); the
declared rank; fixed dimensions exact, dynamic ones ``1..bound`` (the batch dimension up to
``max_batch``, others up to ``max_dynamic_dim``); the element count of all inputs together up to
``max_elements``; floating-point values all finite. Each failure is an
:class:`~agent.inference.InvalidInput` naming the input and the rule.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.inference import InvalidInput
from protocol.modelpkg import IoSignature, TensorSpec

__all__ = ["InputLimits", "InputValidator", "from_json", "numpy_dtype"]

_NUMPY_DTYPES: dict[str, np.dtype[Any]] = {
    name: np.dtype(name) for name in ("float32", "float16", "float64", "int8", "uint8", "int16",
                                      "int32", "int64", "bool")
}


def numpy_dtype(name: str) -> np.dtype[Any]:
    """The numpy dtype of a manifest dtype name."""
    return _NUMPY_DTYPES[name]


@dataclass(frozen=True, slots=True)
class InputLimits:
    """Bounds for what the io signature leaves open.

    ``max_batch`` bounds a dynamic first dimension (the batch: one sample per row);
    ``max_dynamic_dim`` bounds every other dynamic dimension; ``max_elements`` bounds the total
    number of elements over all inputs of one request.
    """

    max_batch: int = 64
    max_dynamic_dim: int = 4096
    max_elements: int = 1 << 20

    def __post_init__(self) -> None:
        if min(self.max_batch, self.max_dynamic_dim, self.max_elements) < 1:
            raise ValueError("input limits must be positive")


@dataclass(frozen=True, slots=True)
class _Rule:
    name: str
    dtype: np.dtype[Any]
    shape: tuple[int | None, ...]
    lows: tuple[int, ...]    # per dimension: the fixed value, or 1 for a dynamic one
    highs: tuple[int, ...]   # per dimension: the fixed value, or the policy's bound
    finite: int              # 0: not floating; 1: float16/32 (float64 sum check); 2: float64


class InputValidator:
    """Validates request inputs for one model; built once per io signature (cheap per call)."""

    __slots__ = ("_limits", "_names", "_rules", "_specs")

    def __init__(self, io_signature: IoSignature, limits: InputLimits) -> None:
        self._limits = limits
        self._specs = {spec.name: spec for spec in io_signature.inputs}
        rules = []
        for spec in io_signature.inputs:
            highs = tuple(
                d if d is not None else (limits.max_batch if i == 0 else limits.max_dynamic_dim)
                for i, d in enumerate(spec.shape))
            lows = tuple(1 if d is None else d for d in spec.shape)
            dtype = numpy_dtype(spec.dtype)
            finite = 0 if dtype.kind != "f" else 2 if dtype.itemsize == 8 else 1
            rules.append(_Rule(spec.name, dtype, spec.shape, lows, highs, finite))
        self._rules = tuple(rules)
        self._names = frozenset(r.name for r in rules)

    def validate(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Check ``inputs`` and return them as C-contiguous arrays, or raise ``InvalidInput``.

        Values may be numpy arrays (in-process callers; the dtype must match exactly) or JSON values
        (the HTTP API), which :func:`from_json` converts strictly first. This runs on every request,
        so the common case takes the fewest numpy calls; messages are built only on failure.
        """
        if type(inputs) is not dict and not isinstance(inputs, Mapping):
            raise InvalidInput("inputs must be a mapping of input name to array")
        if inputs.keys() != self._names:
            missing = sorted(self._names - inputs.keys())
            unknown = sorted(str(k) for k in inputs.keys() - self._names)
            raise InvalidInput(f"missing inputs {missing}" if missing else f"unknown inputs {unknown[:4]}")
        total = 0
        max_elements = self._limits.max_elements
        out: dict[str, np.ndarray] = {}
        for rule in self._rules:
            value = inputs[rule.name]
            if type(value) is not np.ndarray and not isinstance(value, np.ndarray):
                value = from_json(value, self._specs[rule.name], max_elements=max_elements - total)
            if value.dtype is not rule.dtype and value.dtype != rule.dtype:
                raise InvalidInput(f"input {rule.name!r}: dtype {value.dtype} is not {rule.dtype}")
            shape = value.shape
            if len(shape) != len(rule.lows):
                raise InvalidInput(f"input {rule.name!r}: rank {len(shape)} is not {len(rule.lows)}")
            for got, low, high in zip(shape, rule.lows, rule.highs, strict=True):
                if not low <= got <= high:
                    raise InvalidInput(_dimension_error(rule, shape))
            total += value.size
            if total > max_elements:
                raise InvalidInput(f"request has more than {max_elements} elements")
            # NaN and infinities propagate through a sum; a float64 sum of float16/32 values cannot
            # overflow, so one reduction decides. float64 inputs need the element-wise test.
            if (rule.finite == 1 and not math.isfinite(value.sum(dtype=np.float64))) or (
                    rule.finite == 2 and not np.isfinite(value).all()):
                raise InvalidInput(f"input {rule.name!r}: contains NaN or infinity")
            out[rule.name] = value if value.flags.c_contiguous else np.ascontiguousarray(value)
        return out


def _dimension_error(rule: _Rule, shape: tuple[int, ...]) -> str:
    for i, (got, want, high) in enumerate(zip(shape, rule.shape, rule.highs, strict=True)):
        if want is not None and got != want:
            return f"input {rule.name!r}: dimension {i} is {got}, must be {want}"
        if want is None and not 1 <= got <= high:
            return f"input {rule.name!r}: dimension {i} is {got}, must be 1..{high}"
    return f"input {rule.name!r}: shape {shape} is not allowed"


def from_json(value: Any, spec: TensorSpec, *, max_elements: int) -> np.ndarray:
    """Convert a JSON value (nested lists of numbers) to an array of ``spec``'s dtype, strictly.

    Refused: ragged lists, strings, ``null``, booleans for numeric inputs, numbers for boolean
    inputs, non-integral numbers for integer inputs, integers out of the dtype's range, NaN and
    infinities, more than ``max_elements`` values. Shape checks are :class:`InputValidator`'s.
    """
    dtype = numpy_dtype(spec.dtype)
    if not isinstance(value, list | int | float | bool):
        raise InvalidInput(f"input {spec.name!r}: expected a number or nested lists of numbers")
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError, OverflowError):
        raise InvalidInput(f"input {spec.name!r}: ragged or non-numeric nested lists") from None
    if arr.size > max_elements:
        raise InvalidInput(f"input {spec.name!r}: more than {max_elements} elements")
    kind = arr.dtype.kind
    if dtype.kind == "b":
        if kind != "b" and arr.size:
            raise InvalidInput(f"input {spec.name!r}: expected booleans")
        return arr.astype(dtype)
    if kind not in "iuf":
        raise InvalidInput(f"input {spec.name!r}: expected numbers")
    if dtype.kind == "f":
        if kind == "f" and not np.isfinite(arr).all():
            raise InvalidInput(f"input {spec.name!r}: contains NaN or infinity")
        with np.errstate(over="ignore"):
            out = arr.astype(dtype)
        if not np.isfinite(out).all():
            raise InvalidInput(f"input {spec.name!r}: a value overflows {dtype}")
        return out
    if kind == "f" and (not np.isfinite(arr).all() or not (np.floor(arr) == arr).all()):
        raise InvalidInput(f"input {spec.name!r}: expected integers")
    info = np.iinfo(dtype)
    if arr.size and (arr.min() < info.min or arr.max() > info.max):
        raise InvalidInput(f"input {spec.name!r}: a value is outside the range of {dtype}")
    if kind == "f" and arr.size and max(abs(float(arr.min())), abs(float(arr.max()))) > 2.0**53:
        raise InvalidInput(f"input {spec.name!r}: integer too large to be exact")
    return arr.astype(dtype)

