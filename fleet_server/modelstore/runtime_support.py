"""What the devices' onnxruntime can load: the one table of IR and operator-set limits.

``fleet-server model publish`` refuses a model the agents could not load (a current ``onnx``
package writes IR versions and opsets newer than the pinned onnxruntime reads); without this the
devices would only log a load failure after download. :data:`DEVICE_ONNXRUNTIME` is the version
pinned in ``requirements/agent.lock`` (a test keeps the two equal and checks the table against
the installed onnxruntime); :data:`LIMITS` maps onnxruntime ``MAJOR.MINOR`` to the newest IR
version and opset per domain it loads. Pure: no onnx import, values in and out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from protocol.errors import EdgeError

__all__ = ["DEVICE_ONNXRUNTIME", "LIMITS", "RuntimeLimits", "UnsupportedModelError", "check_loadable",
           "limits_for"]


class UnsupportedModelError(EdgeError):
    """The model is valid ONNX but newer than the devices' onnxruntime loads."""


@dataclass(frozen=True, slots=True)
class RuntimeLimits:
    """The newest model IR version and per-domain opset one onnxruntime release loads."""

    ir_version: int
    opsets: Mapping[str, int]  # "ai.onnx" (the default domain, "" in a model) and "ai.onnx.ml"


# onnxruntime's own numbers: IR from onnxruntime/core/graph/model.cc ("max supported IR version"),
# opsets from ValidateOpsetForDomain ("official support for domain ... is till opset N"). Add a row
# when requirements/agent.lock moves to a newer onnxruntime.
LIMITS: Mapping[str, RuntimeLimits] = {
    "1.31": RuntimeLimits(ir_version=13, opsets={"ai.onnx": 26, "ai.onnx.ml": 5}),
}

DEVICE_ONNXRUNTIME = "1.31.1"  # == requirements/agent.lock (tests/test_modelstore.py checks it)


def limits_for(onnxruntime_version: str) -> RuntimeLimits:
    """The limits of ``onnxruntime_version`` (``MAJOR.MINOR[.PATCH]``); unknown versions are refused."""
    key = ".".join(onnxruntime_version.split(".")[:2])
    limits = LIMITS.get(key)
    if limits is None:
        # never fail open: a release we have no numbers for cannot vouch for any model
        raise UnsupportedModelError(f"no model limits known for onnxruntime {onnxruntime_version} "
                                    f"(known: {', '.join(sorted(LIMITS))})")
    return limits


def _short(version: str) -> str:
    return ".".join(version.split(".")[:2])


def check_loadable(ir_version: int, opsets: Mapping[str, int],
                   onnxruntime_version: str = DEVICE_ONNXRUNTIME) -> None:
    """Raise :class:`UnsupportedModelError` if onnxruntime ``onnxruntime_version`` cannot load a
    model of ``ir_version`` importing ``opsets`` (domain → version; ``""`` means ``ai.onnx``)."""
    limits = limits_for(onnxruntime_version)
    ort = _short(onnxruntime_version)
    if ir_version > limits.ir_version:
        raise UnsupportedModelError(f"model IR version {ir_version} is newer than the devices' onnxruntime "
                                    f"{ort} supports ({limits.ir_version})")
    for domain, version in sorted(opsets.items()):
        name = domain or "ai.onnx"
        newest = limits.opsets.get(name)
        if newest is not None and version > newest:
            raise UnsupportedModelError(f"model opset {name} {version} is newer than the devices' "
                                        f"onnxruntime {ort} supports ({newest})")
