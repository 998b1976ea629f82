"""Output comparisons on numpy arrays (no torch: validation and `ndonnx check` use them in light installs)."""

from __future__ import annotations

import numpy as np


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        return float("inf")
    finite = np.isfinite(want)
    if not np.array_equal(finite, np.isfinite(got)):
        return float("inf")
    diff = np.linalg.norm((got - want)[finite])
    scale = np.linalg.norm(want[finite])
    return float(diff / scale) if scale > 0 else float(diff)


def metric_name(outputs: list[np.ndarray], labels: np.ndarray | None) -> str:
    if labels is not None:
        return "accuracy"
    o = outputs[0]
    return "agreement" if o.ndim == 2 and o.shape[1] > 1 else "fidelity"


def score_outputs(outputs: list[np.ndarray], reference: list[np.ndarray], labels: np.ndarray | None) -> float:
    """Higher is better: accuracy with labels; top-1 agreement with the teacher for classifier
    outputs; otherwise 1 - relative error against the teacher's outputs."""
    kind = metric_name(reference, labels)
    if kind == "accuracy":
        return float((outputs[0].argmax(-1) == labels).mean())
    if kind == "agreement":
        return float((outputs[0].argmax(-1) == reference[0].argmax(-1)).mean())
    num = sum(float(np.sum((o.astype(np.float64) - r) ** 2)) for o, r in zip(outputs, reference))
    den = sum(float(np.sum(r.astype(np.float64) ** 2)) for r in reference)
    return 1.0 - (num / den) ** 0.5 if den > 0 else 0.0
