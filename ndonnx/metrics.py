"""Output comparisons on numpy arrays (no torch: validation and `ndonnx check` use them in light installs)."""

from __future__ import annotations

import numpy as np


ROUNDING_STEPS = 4  # rounding steps two correct programs may differ by, computing in a half-precision type


def precision_bound(base: float, eps) -> float:
    """`base` (a float32 tolerance), or ROUNDING_STEPS rounding steps of the coarsest float type
    whose machine epsilons `eps` are given: in float16 (3.9e-3) or bfloat16 (3.1e-2), torch and
    onnxruntime sum in another order and differ by more than float32's bound."""
    return max([base, *(ROUNDING_STEPS * float(e) for e in eps)])


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


def is_embedding(o: np.ndarray) -> bool:
    """Rows of unit L2 norm with negative entries: a normalised embedding (a sentence encoder's),
    compared by direction. Softmax rows are non-negative and below unit norm unless one-hot."""
    if o.ndim != 2 or o.shape[1] < 2 or not np.issubdtype(o.dtype, np.floating) or not (o < 0).any():
        return False
    return bool(np.allclose(np.linalg.norm(o.astype(np.float64), axis=1), 1.0, atol=1e-3))


def metric_name(outputs: list[np.ndarray], labels: np.ndarray | None) -> str:
    if labels is not None:
        return "accuracy"
    o = outputs[0]
    if is_embedding(o):
        return "cosine"
    return "agreement" if o.ndim == 2 and o.shape[1] > 1 else "fidelity"


def mean_cosine(got: np.ndarray, want: np.ndarray) -> float:
    """Mean over rows of the cosine between each row of `got` and the same row of `want`."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    dot = (got * want).sum(1)
    norms = np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1)
    return float(np.mean(np.where(norms > 0, dot / np.maximum(norms, 1e-300), 0.0)))


def score_outputs(outputs: list[np.ndarray], reference: list[np.ndarray], labels: np.ndarray | None) -> float:
    """Higher is better: accuracy with labels; top-1 agreement with the teacher for classifier
    outputs; mean cosine with the teacher's rows for normalised embeddings; otherwise 1 - relative
    error against the teacher's outputs."""
    kind = metric_name(reference, labels)
    if kind == "cosine":
        return mean_cosine(outputs[0], reference[0])
    if kind == "accuracy":
        return float((outputs[0].argmax(-1) == labels).mean())
    if kind == "agreement":
        return float((outputs[0].argmax(-1) == reference[0].argmax(-1)).mean())
    num = sum(float(np.sum((o.astype(np.float64) - r) ** 2)) for o, r in zip(outputs, reference))
    den = sum(float(np.sum(r.astype(np.float64) ** 2)) for r in reference)
    return 1.0 - (num / den) ** 0.5 if den > 0 else 0.0


def divergence(outputs: list[np.ndarray], reference: list[np.ndarray]) -> float:
    """How far outputs are from the teacher's, >= 0 and continuous (what the search minimises, where a
    score such as accuracy on a few hundred held-out samples moves in steps of one sample): the mean
    KL divergence of the teacher's softmax from the student's for classifier outputs, 1 - the mean
    cosine for normalised embeddings, else the relative error."""
    kind = metric_name(reference, None)
    if kind == "cosine":
        return max(0.0, 1.0 - mean_cosine(outputs[0], reference[0]))
    if kind == "agreement":
        got, want = (_log_softmax(np.asarray(a, np.float64)) for a in (outputs[0], reference[0]))
        return max(0.0, float((np.exp(want) * (want - got)).sum(-1).mean()))
    return 1.0 - score_outputs(outputs, reference, None)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))
