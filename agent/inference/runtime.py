"""onnxruntime adapter: a session created from bytes in memory, never from a file path.

The decrypted model never touches a file system here: :class:`OrtRuntime` hands onnxruntime the
bytes, the session options never set ``optimized_model_filepath`` (which would write the optimised
model to disk) nor profiling (which writes a trace file), and logging is kept to errors.

Zeroization is best effort, and Python limits it:

* :func:`zeroize` overwrites a ``bytearray``/``mmap``/writable buffer in place with one ``memset``;
  that really clears those bytes.
* onnxruntime's Python API only accepts ``bytes``, so one immutable copy must be made. After the
  session is built (it keeps its own parsed copy), :class:`OrtRuntime` drops onnxruntime's reference
  to that copy and overwrites it in place (CPython only, via ``ctypes``), since nothing else holds it.
* Beyond that nothing can be promised: onnxruntime's C++ copies (the protobuf it parses, the
  weights in its arenas) are freed without being cleared when the session is closed; the allocator
  may have moved or copied buffers; the garbage collector decides when memory is released. Keeping
  the plaintext out of swap and core dumps is the agent's job (``mlock``, ``MADV_DONTDUMP``,
  ``RLIMIT_CORE=0``, encrypted or no swap on the device).
"""

from __future__ import annotations

import ctypes
import mmap
import re
import sys
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort

from agent.inference import InferenceFailed
from protocol.modelpkg import IoSignature, PackageFormatError

__all__ = ["ONNXRUNTIME_VERSION", "ModelLoadError", "OrtRuntime", "Runtime", "edge_session_options",
           "zeroize"]

ONNXRUNTIME_VERSION: str = ort.__version__
"""The onnxruntime this agent runs; reported to the server (``model-status``)."""

_ORT_DTYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(int16)": "int16", "tensor(int32)": "int32",
    "tensor(int64)": "int64", "tensor(bool)": "bool",
}


class Runtime(Protocol):
    """What the guard needs from an inference engine (tests wrap the real one to count calls)."""

    @property
    def output_names(self) -> tuple[str, ...]: ...

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


def zeroize(buffer: bytearray | memoryview | mmap.mmap) -> None:
    """Overwrite a writable buffer with zeros in place (one ``memset``, no temporary copy)."""
    view = memoryview(buffer).cast("B")
    try:
        if view.readonly:
            raise TypeError("zeroize needs a writable buffer")
        n = len(view)
        if n:
            c_buf = (ctypes.c_char * n).from_buffer(view)
            ctypes.memset(ctypes.addressof(c_buf), 0, n)
            del c_buf
    finally:
        view.release()


def _wipe_private_bytes(data: bytes) -> bool:
    """Overwrite the payload of a ``bytes`` object nobody else references (CPython only).

    Only for the private copy :class:`OrtRuntime` makes for onnxruntime; writing into an immutable
    object anyone else can see would be a bug.
    """
    if sys.implementation.name != "cpython" or not data:
        return False
    offset = bytes.__basicsize__ - 1  # PyBytesObject header; ob_sval follows (the 1 is its NUL)
    ctypes.memset(id(data) + offset, 0, len(data))
    return True


def edge_session_options(*, threads: int = 1) -> ort.SessionOptions:
    """Session options for an edge device: ``threads`` intra-op threads (1: the calling thread only,
    predictable latency next to the agent), sequential execution, no spinning, full graph
    optimisation in memory, no profiling, no optimised-model file."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.enable_profiling = False
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.add_session_config_entry("session.load_model_format", "ONNX")
    return so


class ModelLoadError(PackageFormatError):
    """onnxruntime refused the model; ``reason`` is its own message (one line, bounded)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : [A-Z_]+ : ")


def _load_reason(exc: Exception) -> str:
    # onnxruntime's text is "[ONNXRuntimeError] : 1 : FAIL : <source>:<line> <C++ signature> <reason>";
    # the reason (e.g. "Unsupported model IR version: 14, max supported IR version: 13") is what an
    # operator needs, the source location is not. One line, bounded.
    text = " ".join(str(exc).split())
    for marker in ("Unsupported model", "ONNX Runtime only", "Current official support"):
        if marker in text:
            text = text[text.index(marker):]
            break
    return _ORT_PREFIX.sub("", text)[:300] or "no reason given"


class OrtRuntime:
    """An onnxruntime CPU session over a model held in memory.

    ``model``: the decrypted ONNX model, normally the ``bytearray`` from
    :func:`~protocol.modelpkg.decrypt_package`. Its private ``bytes`` copy for onnxruntime is wiped
    once the session exists, and with ``wipe_source`` the caller's buffer too. ``bytes`` passed in
    belong to the caller and are used as they are (and cannot be wiped here).
    """

    def __init__(self, model: bytes | bytearray | memoryview, *, threads: int = 1,
                 wipe_source: bool = False) -> None:
        # onnxruntime accepts only bytes. A bytearray/memoryview is copied into a private bytes object,
        # wiped below; bytes passed in belong to the caller and are left alone (bytes(b) is b).
        copied = not isinstance(model, bytes)
        private = model if isinstance(model, bytes) else bytes(model)
        try:
            session = ort.InferenceSession(private, sess_options=edge_session_options(threads=threads),
                                           providers=["CPUExecutionProvider"], enable_fallback=0)
        except Exception as exc:  # onnxruntime raises its own pybind exception types
            reason = _load_reason(exc)
            raise ModelLoadError(f"model could not be loaded by onnxruntime ({type(exc).__name__}): {reason}",
                                 reason) from None
        finally:
            if wipe_source and not isinstance(model, bytes):
                zeroize(model)
        # onnxruntime keeps a reference to the bytes it was given ("holding the memory indefinitely");
        # it parsed its own copy, so drop that reference and clear ours.
        if getattr(session, "_model_bytes", None) is private:
            session._model_bytes = None
        if copied:
            _wipe_private_bytes(private)
        del private
        self._session: ort.InferenceSession | None = session
        self._inputs = tuple(i.name for i in session.get_inputs())
        self._outputs = tuple(o.name for o in session.get_outputs())
        self._output_list = list(self._outputs)  # passed to run(): spares onnxruntime rebuilding it

    @property
    def output_names(self) -> tuple[str, ...]:
        return self._outputs

    @property
    def input_names(self) -> tuple[str, ...]:
        return self._inputs

    @property
    def session(self) -> ort.InferenceSession:
        """The underlying session (benchmarks and diagnostics; requests go through the guard)."""
        return self._require()

    def check_io(self, io_signature: IoSignature) -> None:
        """Refuse a model whose inputs/outputs disagree with the signed manifest's io signature."""
        session = self._require()
        for side, actual, declared in (("input", session.get_inputs(), io_signature.inputs),
                                       ("output", session.get_outputs(), io_signature.outputs)):
            if len(actual) != len(declared):
                raise PackageFormatError(
                    f"model has {len(actual)} {side}s; the manifest declares {len(declared)}")
            for got, want in zip(actual, declared, strict=True):
                dtype = _ORT_DTYPES.get(got.type)
                shape = tuple(d if isinstance(d, int) and d > 0 else None for d in got.shape)
                fixed_mismatch = len(shape) != len(want.shape) or any(
                    w is not None and g is not None and g != w
                    for g, w in zip(shape, want.shape, strict=True))
                if got.name != want.name or dtype != want.dtype or fixed_mismatch:
                    raise PackageFormatError(
                        f"model {side} {got.name} {dtype}{list(shape)} does not match the manifest's "
                        f"{want.name} {want.dtype}{list(want.shape)}")

    def _require(self) -> ort.InferenceSession:
        session = self._session
        if session is None:
            raise InferenceFailed("runtime is closed")
        return session

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model; outputs as numpy arrays by output name."""
        session = self._require()
        try:
            feed = inputs if type(inputs) is dict else dict(inputs)
            results: list[Any] = session.run(self._output_list, feed)
        except Exception as exc:  # onnxruntime's pybind exception types, not importable portably
            raise InferenceFailed(f"inference failed ({type(exc).__name__})") from None
        return dict(zip(self._outputs, results, strict=True))  # onnxruntime returns numpy arrays

    def close(self) -> None:
        """Drop the session; onnxruntime frees the weights (without clearing them, see above)."""
        self._session = None
