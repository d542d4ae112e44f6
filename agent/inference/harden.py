"""Output hardening: release only as much of the model's output as the model's policy allows.

Exact confidence scores make model extraction (and membership inference) much cheaper than labels
alone (Tramer et al., "Stealing Machine Learning Models via Prediction APIs", 2016), so each model's
policy picks one of:

* ``"full"``  - every score, rounded to ``decimals`` decimal places;
* ``"topk"``  - the ``k`` best labels with their scores rounded to ``decimals``;
* ``"label"`` - only the best label.

Only the policy's ``scores_output`` is released; every other model output (logits, embeddings,
intermediate tensors) is dropped. The result is plain JSON-ready Python data, one entry per row.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from agent.inference import InferenceFailed

__all__ = ["MODES", "OutputPolicy", "harden"]

MODES = ("full", "topk", "label")
Mode = Literal["full", "topk", "label"]


@dataclass(frozen=True, slots=True)
class OutputPolicy:
    """How a model's scores are released. ``labels``: one name per class (default: the index)."""

    mode: Mode = "label"
    decimals: int = 2
    k: int = 3
    labels: tuple[str, ...] = ()
    scores_output: str | None = None  # default: the model's first output

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"output mode must be one of {', '.join(MODES)}")
        if not 0 <= self.decimals <= 6:
            raise ValueError("decimals must be 0..6")
        if self.k < 1:
            raise ValueError("k must be at least 1")


def harden(outputs: Mapping[str, np.ndarray], policy: OutputPolicy, default_output: str) -> dict[str, Any]:
    """The released view of ``outputs``: ``{"labels": [...]}`` and/or ``{"scores": [...]}``.

    The scores tensor is read as ``[rows, classes]`` (a 1-D tensor is one row); non-finite scores
    are never released. Ties rank the lower class index first. Rounding is Python's correctly
    rounded ``round`` of each score. Small batches dominate on a device, so the ranking runs on
    Python lists (one ``tolist`` call) rather than through several numpy calls per request.
    """
    name = policy.scores_output or default_output
    scores = outputs.get(name)
    if scores is None:
        raise InferenceFailed(f"model produced no output {name!r}")
    if not isinstance(scores, np.ndarray):
        scores = np.asarray(scores)
    if scores.ndim == 1:
        scores = scores.reshape(1, -1)
    if scores.ndim != 2 or scores.shape[1] < 1 or scores.dtype.kind not in "fiu":
        raise InferenceFailed(f"output {name!r} of shape {scores.shape} is not [rows, classes] scores")
    classes = scores.shape[1]
    labels = policy.labels
    if labels and len(labels) != classes:
        raise InferenceFailed(f"policy names {len(labels)} labels; output {name!r} has {classes} classes")
    rows: list[list[float]] = scores.tolist()
    # NaN and infinities propagate through a sum; float32 scores cannot overflow a double's sum
    if not math.isfinite(sum(map(sum, rows))):
        raise InferenceFailed(f"output {name!r} contains NaN or infinity")
    decimals = policy.decimals
    if policy.mode == "label":
        best = [max(range(classes), key=row.__getitem__) for row in rows]
        return {"labels": [labels[i] for i in best] if labels else best}
    if policy.mode == "full":
        return {"scores": [[round(v, decimals) for v in row] for row in rows]}
    k = min(policy.k, classes)
    # sorted(reverse=True) is stable: ties keep the lower class index first
    top = [sorted(range(classes), key=row.__getitem__, reverse=True)[:k] for row in rows]
    return {"labels": [[labels[i] for i in idx] for idx in top] if labels else top,
            "scores": [[round(row[i], decimals) for i in idx] for row, idx in zip(rows, top, strict=True)]}
