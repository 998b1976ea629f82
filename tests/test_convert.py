"""Round trip: every neighbourhood to ONNX and torch, compared with onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ndonnx.convert import EXACT_REL_ERR, extract, round_trip
from ndonnx.graph import load_teacher
from ndonnx.partition import partition
from ndonnx.sample import make_inputs, run_sample

FIXTURES = ["resnet_legacy", "resnet_dynamo", "resnet_opset9", "resnet_opset11", "resnet_constants",
            "mobilenet", "encoder", "two_heads"]


@pytest.mark.parametrize("name", FIXTURES)
def test_every_neighbourhood_converts_exactly(zoo, name):
    t = load_teacher(zoo[name])
    sample = run_sample(t)
    for nbh in partition(t).neighbourhoods:
        rt = round_trip(t, nbh, sample)
        assert rt.convertible, (nbh.id, rt.reason)
        assert rt.rel_err is not None and rt.rel_err <= EXACT_REL_ERR


def test_extracted_submodel_is_a_valid_model(zoo):
    t = load_teacher(zoo["encoder"])
    sample = run_sample(t)
    nbh = partition(t).neighbourhoods[1]
    sub = extract(t, nbh, sample)
    onnx.checker.check_model(sub, full_check=True)
    assert [i.name for i in sub.graph.input] == [*nbh.inputs, *nbh.side_inputs]
    dims = sub.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "N" and [d.dim_value for d in dims[1:]] == [7, 16]


def test_sample_inputs_are_valid(zoo):
    t = load_teacher(zoo["encoder"])
    feeds = make_inputs(t)
    assert feeds["ids"].dtype == np.int64 and feeds["ids"].max() < 50 and feeds["ids"].min() >= 0
    assert feeds["mask"].dtype == np.bool_
    assert feeds["mask"][:, 0].all() and not feeds["mask"].all(axis=1).any()  # no row fully masked
    assert np.array_equal(make_inputs(t)["ids"], feeds["ids"])  # seeded


def test_sample_inputs_take_named_sizes(tmp_path):
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, "H", "W"])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "m.onnx")
    t = load_teacher(tmp_path / "m.onnx")
    assert make_inputs(t)["x"].shape == (2, 3, 32, 32)  # the defaults
    assert make_inputs(t, sizes={"H": 64, "W": 256})["x"].shape == (2, 3, 64, 256)


def _bn_model(tmp_path):
    rng = np.random.default_rng(0)
    c = 4
    inits = [numpy_helper.from_array(rng.standard_normal((c, 3, 3, 3)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.random(c).astype(np.float32) + 0.5, "scale"),
             numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "B"),
             numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "mean"),
             numpy_helper.from_array(rng.random(c).astype(np.float32) + 0.5, "var")]
    nodes = [helper.make_node("Conv", ["X", "W"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "scale", "B", "mean", "var"], ["Y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 4, 8, 8])], inits)
    path = tmp_path / "bn.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)]), str(path))
    return path


def test_batchnorm_uses_running_statistics(tmp_path):
    # onnx2torch returns training-mode modules; a batch-statistics BN would be ~20-60% off here.
    t = load_teacher(_bn_model(tmp_path))
    nbh = partition(t).neighbourhoods[0]
    rt = round_trip(t, nbh, run_sample(t))
    assert rt.convertible and rt.rel_err < 1e-5


def test_missing_converter_is_reported_not_raised(tmp_path):
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "W")
    g = helper.make_graph([helper.make_node("MatMul", ["X", "W"], ["a"]), helper.make_node("Hardmax", ["a"], ["Y"])],
                          "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 4])], [w])
    path = tmp_path / "hardmax.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    t = load_teacher(path)
    rt = round_trip(t, partition(t).neighbourhoods[0], run_sample(t))
    assert not rt.convertible and rt.reason == "no torch converter for Hardmax-13"
