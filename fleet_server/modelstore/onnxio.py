"""Validate an ONNX model and read its io signature from the graph (``onnx`` imported lazily).

The publisher must not sign a package whose manifest promises inputs and outputs the model does
not have: :func:`inspect_onnx` parses the model with ``onnx``, runs the ONNX checker, and derives
the :class:`protocol.modelpkg.IoSignature` from the graph's inputs (those that are not initializers)
and outputs. Dimensions with a fixed positive size keep it; symbolic or unknown ones become dynamic
(``None``). A model newer (IR version, opset) than the devices' onnxruntime loads is refused first
(:mod:`fleet_server.modelstore.runtime_support`).

``onnx`` is part of the ``sim`` extra; a server that publishes models needs it installed.
"""

from __future__ import annotations

from typing import Any

from fleet_server.modelstore.runtime_support import check_loadable
from protocol.errors import ConfigError, MalformedInputError
from protocol.modelpkg import DTYPES, IoSignature, PackageFormatError, TensorSpec

__all__ = ["inspect_onnx"]

# onnx.TensorProto.DataType values of the element types a manifest may name.
_ELEM_TYPES: dict[int, str] = {1: "float32", 2: "uint8", 3: "int8", 5: "int16", 6: "int32", 7: "int64",
                               9: "bool", 10: "float16", 11: "float64"}
assert set(_ELEM_TYPES.values()) <= set(DTYPES)


def _onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise ConfigError("publishing models needs the onnx package (pip install onnx, or "
                          "edge-attest[sim])") from None
    return onnx


def _spec(value_info: Any, side: str) -> TensorSpec:
    name = value_info.name
    tensor = value_info.type.tensor_type if value_info.type.HasField("tensor_type") else None
    if tensor is None:
        raise MalformedInputError(f"model {side} {name!r} is not a tensor (sequences and maps are not "
                                  "supported)")
    dtype = _ELEM_TYPES.get(tensor.elem_type)
    if dtype is None:
        raise MalformedInputError(f"model {side} {name!r} has element type {tensor.elem_type}, not one of "
                                  f"{', '.join(DTYPES)}")
    shape: list[int | None] = []
    if tensor.HasField("shape"):
        for dim in tensor.shape.dim:
            shape.append(dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else None)
    try:
        return TensorSpec(name, dtype, tuple(shape))
    except PackageFormatError as exc:
        raise MalformedInputError(f"model {side} {name!r}: {exc.diagnostics()}") from None


def _check_runtime_support(proto: Any) -> None:
    # before the checker: a model too new for the devices gets the reason with its numbers, not the
    # checker's (which only knows the onnx package's own, newer, limits)
    check_loadable(int(proto.ir_version), {o.domain: int(o.version) for o in proto.opset_import})


def inspect_onnx(model: bytes) -> IoSignature:
    """Parse and check ``model`` (ONNX protobuf bytes); return its io signature.

    Raises :class:`MalformedInputError` if it is not a valid ONNX model or its interface cannot be
    described in a manifest, :class:`~fleet_server.modelstore.runtime_support.UnsupportedModelError`
    if the devices' onnxruntime cannot load it, :class:`ConfigError` if ``onnx`` is not installed.
    """
    onnx = _onnx()
    try:
        proto = onnx.load_model_from_string(model)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise MalformedInputError(f"not an ONNX model: {type(exc).__name__}") from None
    if not proto.graph.node:
        raise MalformedInputError("not an ONNX model: the graph has no nodes")
    _check_runtime_support(proto)
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:  # onnx.checker.ValidationError and protobuf errors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MalformedInputError(f"the ONNX checker refuses the model: {first[:300]}") from None
    initializers = {i.name for i in proto.graph.initializer}
    inputs = tuple(_spec(v, "input") for v in proto.graph.input if v.name not in initializers)
    outputs = tuple(_spec(v, "output") for v in proto.graph.output)
    try:
        return IoSignature(inputs=inputs, outputs=outputs)
    except PackageFormatError as exc:
        raise MalformedInputError(f"model interface: {exc.diagnostics()}") from None
