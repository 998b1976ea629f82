"""Sparse students: the trainer masks exactly the weights the plan counts (`prunable`), to the
planned sparsity by the last step."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from ndonnx.distill.job import Job, TrainSettings, _apply_sparsity
from ndonnx.trainable import Trainable


def _two_matmuls():
    rng = np.random.default_rng(0)
    w1, w2 = (numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), n) for n in ("W1", "W2"))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "W2"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], [w1, w2])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_only_the_planned_weights_are_masked():
    st = Trainable(_two_matmuls())
    job = Job(neighbourhood=0, candidate="sparse:0.5", student="s", teacher="t", lookahead=(), cache=None,
              noise=None, sparsity=0.5, prunable=("W1",), train=True, params=128, nonzero=96, weights_out="w",
              result_out="r", settings=TrainSettings(steps=10))
    masks = None
    for step in range(10):
        masks = _apply_sparsity(st, job, step, masks)
    w = {n: t.detach().numpy() for n, t in st.named_weights().items()}
    assert set(masks) == {"W1"}
    assert np.mean(w["W1"] == 0) == 0.5  # the schedule's target, reached at the last step
    assert np.count_nonzero(w["W2"]) == w["W2"].size  # not in the plan: left dense
