"""Test models built at run time with the ``onnx`` package (nothing is downloaded).

* :func:`small_classifier` - ``input`` float32 ``[N, 16]`` -> Gemm -> Relu -> Gemm -> Softmax ->
  ``scores`` float32 ``[N, 10]``, weights drawn from a seeded generator (same seed, same bytes).
* :func:`large_classifier` - the same interface with hidden layers sized so the weights total about
  ``target_mb`` MB (default 100), for the model-unlock benchmark. Weights come from a cheap
  deterministic pattern, so building 100 MB takes well under a second.
* :func:`relu_model` - one Relu node stamped with a chosen IR version and opsets, for checking
  which versions publish accepts and the devices' onnxruntime loads.
* :func:`reference_scores` - the small classifier evaluated with numpy, to check onnxruntime's answer.

All return the serialised model as ``bytes``; nothing is written to disk.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from protocol.modelpkg import IoSignature, TensorSpec

__all__ = [
    "CLASSES",
    "FEATURES",
    "LABELS",
    "classifier_io_signature",
    "large_classifier",
    "reference_scores",
    "relu_model",
    "small_classifier",
    "small_weights",
]

FEATURES = 16
CLASSES = 10
HIDDEN = 32
LABELS = tuple(f"class-{i}" for i in range(CLASSES))
OPSET = 17
# Set explicitly on every model built here: helper.make_model stamps the onnx package's newest IR
# version, which can be newer than the devices' onnxruntime loads (publish refuses such a model).
IR_VERSION = 8  # readable by every onnxruntime >= 1.14


def classifier_io_signature() -> IoSignature:
    """The io signature both test classifiers have (what their manifest declares)."""
    return IoSignature(inputs=(TensorSpec("input", "float32", (None, FEATURES)),),
                       outputs=(TensorSpec("scores", "float32", (None, CLASSES)),))


def small_weights(seed: int = 0) -> list[np.ndarray]:
    """W1 [16, 32], b1 [32], W2 [32, 10], b2 [10] of the small classifier for ``seed``."""
    rng = np.random.default_rng(seed)
    return [
        (rng.standard_normal((FEATURES, HIDDEN)) / np.sqrt(FEATURES)).astype(np.float32),
        (rng.standard_normal(HIDDEN) * 0.1).astype(np.float32),
        (rng.standard_normal((HIDDEN, CLASSES)) / np.sqrt(HIDDEN)).astype(np.float32),
        (rng.standard_normal(CLASSES) * 0.1).astype(np.float32),
    ]


def _mlp(layers: list[tuple[np.ndarray, np.ndarray]], name: str, *, check: bool = True) -> bytes:
    nodes = []
    initializers = []
    current = "input"
    for i, (w, b) in enumerate(layers):
        initializers += [numpy_helper.from_array(w, f"W{i}"), numpy_helper.from_array(b, f"b{i}")]
        out = f"h{i}"
        nodes.append(helper.make_node("Gemm", [current, f"W{i}", f"b{i}"], [out], name=f"gemm{i}"))
        current = out
        if i < len(layers) - 1:
            nodes.append(helper.make_node("Relu", [current], [f"r{i}"], name=f"relu{i}"))
            current = f"r{i}"
    nodes.append(helper.make_node("Softmax", [current], ["scores"], axis=1, name="softmax"))
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", FEATURES])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", CLASSES])],
        initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="edge-attest-testmodel")
    model.ir_version = IR_VERSION
    if check:  # the checker re-serialises the model: skipped for the 100 MB one, checked by its tests
        onnx.checker.check_model(model)
    return model.SerializeToString()


def relu_model(*, ir_version: int = IR_VERSION, opset: int = OPSET, ml_opset: int | None = None) -> bytes:
    """``input`` float32 ``[N, 4]`` -> Relu -> ``output``, stamped with ``ir_version`` and the ai.onnx
    ``opset`` (and an ai.onnx.ml import of ``ml_opset`` if given)."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["input"], ["output"], name="relu")], "relu",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 4])])
    opsets = [helper.make_opsetid("", opset)]
    if ml_opset is not None:
        opsets.append(helper.make_opsetid("ai.onnx.ml", ml_opset))
    model = helper.make_model(graph, opset_imports=opsets, producer_name="edge-attest-testmodel")
    model.ir_version = ir_version
    return model.SerializeToString()


def small_classifier(seed: int = 0) -> bytes:
    """The small classifier (about 2.8 KB of weights) as ONNX bytes."""
    w1, b1, w2, b2 = small_weights(seed)
    return _mlp([(w1, b1), (w2, b2)], f"small-classifier-{seed}")


def _pattern(rows: int, cols: int, seed: int) -> np.ndarray:
    """A deterministic, cheap, non-constant float32 matrix with entries of order 1/sqrt(rows).

    Row ``i`` is one seeded random row rotated by ``i`` places (a circulant-like matrix): building
    it costs one copy, not a random draw per weight.
    """
    row = (np.random.default_rng([seed, rows, cols]).standard_normal(cols) / np.sqrt(rows)).astype(np.float32)
    tiled = np.tile(row, rows // cols + 2)
    view = np.lib.stride_tricks.as_strided(tiled, shape=(rows, cols), strides=(tiled.strides[0],) * 2,
                                           writeable=False)
    return np.ascontiguousarray(view)


def large_classifier(target_mb: int = 100, seed: int = 1) -> bytes:
    """A classifier with about ``target_mb`` MB of float32 weights in three hidden layers."""
    if target_mb < 1:
        raise ValueError("target_mb must be at least 1")
    # weights ~ 2 * h^2 floats for hidden sizes (h, h, h): pick h for the target size
    h = int(np.sqrt(target_mb * 1e6 / 4 / 2))
    dims = [FEATURES, h, h, h, CLASSES]
    layers = [(_pattern(dims[i], dims[i + 1], seed + i), np.zeros(dims[i + 1], dtype=np.float32))
              for i in range(len(dims) - 1)]
    return _mlp(layers, f"large-classifier-{target_mb}mb-{seed}", check=False)


def reference_scores(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """The small classifier of ``seed`` evaluated with numpy (float64), for checking onnxruntime."""
    w1, b1, w2, b2 = (w.astype(np.float64) for w in small_weights(seed))
    h = np.maximum(x.astype(np.float64) @ w1 + b1, 0.0)
    z = h @ w2 + b2
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
