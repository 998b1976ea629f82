"""ndonnx.metrics: which score a model's outputs get, and the scores themselves."""

import numpy as np

from ndonnx.metrics import is_embedding, mean_cosine, metric_name, score_outputs

RNG = np.random.default_rng(0)


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_normalised_embeddings_are_scored_by_cosine():
    emb = _unit(RNG.standard_normal((40, 32)))
    assert is_embedding(emb) and metric_name([emb], None) == "cosine"
    assert score_outputs([emb], [emb], None) == 1.0
    # a rotated copy: the score is the mean cosine of row pairs, computed by hand here
    noisy = _unit(emb + 0.3 * RNG.standard_normal(emb.shape))
    want = np.mean([float(a @ b) for a, b in zip(noisy.astype(np.float64), emb.astype(np.float64))])
    assert abs(score_outputs([noisy], [emb], None) - want) < 1e-6
    assert score_outputs([-emb], [emb], None) == -1.0
    # scaling a student's rows changes its relative error but not its direction
    assert abs(mean_cosine(3 * noisy, emb) - want) < 1e-6


def test_classifier_outputs_are_not_embeddings():
    logits = RNG.standard_normal((40, 10)).astype(np.float32)
    assert metric_name([logits], None) == "agreement"
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert metric_name([probs], None) == "agreement"  # non-negative rows: softmax, not an embedding
    one_hot = np.eye(10, dtype=np.float32)[RNG.integers(0, 10, 40)]
    assert metric_name([one_hot], None) == "agreement"  # unit rows, but no negative entry
    assert metric_name([_unit(logits)], np.zeros(40, np.int64)) == "accuracy"  # labels win
    assert metric_name([RNG.standard_normal((4, 5, 6)).astype(np.float32)], None) == "fidelity"
