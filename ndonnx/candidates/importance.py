"""Which channels matter: scoring, kept apart from the slicing (as in Torch-Pruning).

A score function takes the output-channel weights of every producer of one (coupled) channel
group, each as (weight array, axis of its output channels), and returns one score per channel.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

Scorer = Callable[[Sequence[tuple[np.ndarray, int]]], np.ndarray]


def l1_per_channel(weight: np.ndarray, axis: int) -> np.ndarray:
    """Sum of |w| over every axis but `axis`."""
    w = np.abs(np.asarray(weight, np.float64))
    return w.sum(axis=tuple(a for a in range(w.ndim) if a != axis))


def group_l1(producers: Sequence[tuple[np.ndarray, int]]) -> np.ndarray:
    """L1 norm of each producer's output-channel weights. Coupled producers (squeeze-excite's
    expand conv and fc2, both sides of a residual-free Mul) are summed after dividing each by its
    mean, so that a layer with larger weights does not decide alone."""
    total = None
    for weight, axis in producers:
        s = l1_per_channel(weight, axis)
        mean = s.mean()
        s = s / mean if mean > 0 else s
        total = s if total is None else total + s
    if total is None:
        raise ValueError("a channel group needs at least one producer")
    return total


IMPORTANCE: dict[str, Scorer] = {"l1": group_l1}


def keep_indices(scores: np.ndarray, n: int) -> np.ndarray:
    """The `n` highest-scoring channels (ties: the lower index), in ascending channel order."""
    scores = np.asarray(scores)
    order = np.argsort(-scores, kind="stable")
    return np.sort(order[:n])
