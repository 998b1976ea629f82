"""Loading: external data, constant folding, opset upgrade, parameter counting, refusals."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from ndonnx.errors import NdonnxError
from ndonnx.graph import fold_constants, load_teacher, weight_counts


def _raw_params(path) -> int:
    """Independent count: float initializers of more than one element in the file as written."""
    m = onnx.load(str(path))
    return sum(int(np.prod(i.dims)) for i in m.graph.initializer
               if i.data_type == TensorProto.FLOAT and np.prod(i.dims) > 1)


def _run(model: onnx.ModelProto, feeds: dict) -> list:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def test_counts_match_the_file(zoo):
    t = load_teacher(zoo["resnet_legacy"])
    assert t.params == _raw_params(zoo["resnet_legacy"]) == 6362
    assert t.input_names == ["input"]


def test_dynamo_export_reads_external_data(zoo):
    path = zoo["resnet_dynamo"]
    assert path.with_suffix(".onnx.data").exists()
    t = load_teacher(path)
    assert t.params == 6362
    assert t.opset >= 18


def test_constant_node_weights_become_initializers(zoo):
    t = load_teacher(zoo["resnet_constants"])
    assert not [n for n in t.model.graph.node if n.op_type == "Constant"]
    assert t.params == load_teacher(zoo["resnet_legacy"]).params


def test_old_opset_is_upgraded_and_equivalent(zoo):
    t = load_teacher(zoo["resnet_opset9"])
    assert onnx.load(str(zoo["resnet_opset9"])).opset_import[0].version == 9
    assert t.opset == 13
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    want = _run(onnx.load(str(zoo["resnet_opset9"])), {"input": x})[0]
    np.testing.assert_allclose(_run(t.model, {"input": x})[0], want, rtol=1e-5, atol=1e-6)


def _constant_subgraph_model() -> onnx.ModelProto:
    """Weights hidden behind Identity (deduplicated), ConstantOfShape, Constant and Cast/Reshape."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "W")
    shape = numpy_helper.from_array(np.array([1, 4, 1, 1], np.int64), "shape")
    nodes = [
        helper.make_node("Identity", ["W"], ["W_alias"]),
        helper.make_node("Conv", ["X", "W"], ["c0"], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["X", "W_alias"], ["c0b"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c0", "c0b"], ["c1"]),
        helper.make_node("Constant", [], ["w2_flat"], value=numpy_helper.from_array(
            rng.standard_normal(144).astype(np.float64), "v")),
        helper.make_node("Cast", ["w2_flat"], ["w2_f32"], to=TensorProto.FLOAT),
        helper.make_node("Constant", [], ["w2_shape"], value=numpy_helper.from_array(np.array([4, 4, 3, 3], np.int64), "s")),
        helper.make_node("Reshape", ["w2_f32", "w2_shape"], ["W_alias2"]),
        helper.make_node("Conv", ["c1", "W_alias2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("ConstantOfShape", ["shape"], ["bias"], value=numpy_helper.from_array(np.array([0.5], np.float32), "b")),
        helper.make_node("Add", ["c2", "bias"], ["c3"]),
        helper.make_node("Relu", ["c3"], ["Y"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 4, 8, 8])], [w, shape])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_constant_subgraphs_fold_and_agree():
    model = _constant_subgraph_model()
    onnx.checker.check_model(model)
    folded = fold_constants(model)
    ops = [n.op_type for n in folded.graph.node]
    assert ops == ["Conv", "Conv", "Add", "Conv", "Add", "Relu"], ops
    # The Identity alias reads the one stored W: counted once, not copied.
    assert {n.input[1] for n in folded.graph.node if n.op_type == "Conv"} >= {"W"}
    counts = weight_counts(folded)
    assert counts["W"] == 108 and counts["W_alias2"] == 144 and counts["bias"] == 4
    assert sum(counts.values()) == 108 + 144 + 4
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(_run(folded, {"X": x})[0], _run(model, {"X": x})[0], rtol=1e-6, atol=1e-6)


def test_scalars_and_index_constants_are_not_weights():
    nodes = [helper.make_node("Mul", ["X", "scale"], ["a"]), helper.make_node("Reshape", ["a", "shp"], ["b"]),
             helper.make_node("Add", ["b", "vec"], ["Y"])]
    inits = [numpy_helper.from_array(np.array(2.0, np.float32), "scale"),
             numpy_helper.from_array(np.array([-1, 6], np.int64), "shp"),
             numpy_helper.from_array(np.ones(6, np.float32), "vec")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 2, 3])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 6])], inits)
    assert weight_counts(helper.make_model(g)) == {"vec": 6}


def _save_with_external(tmp_path, location: str):
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "W")
    g = helper.make_graph([helper.make_node("MatMul", ["X", "W"], ["Y"])], "g",
                          [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 4])], [w])
    model = helper.make_model(g)
    onnx.external_data_helper.convert_model_to_external_data(model, location="w.data", size_threshold=0)
    path = tmp_path / "m" / "model.onnx"
    path.parent.mkdir()
    onnx.save(model, str(path))
    if location != "w.data":  # point the tensor somewhere else, as a hostile file would
        m = onnx.load(str(path), load_external_data=False)
        for e in m.graph.initializer[0].external_data:
            if e.key == "location":
                e.value = location
        onnx.save(m, str(path))
        (tmp_path / "secret.data").write_bytes(b"\0" * 64)
    return path


def test_external_data_inside_folder_loads(tmp_path):
    assert load_teacher(_save_with_external(tmp_path, "w.data")).params == 16


@pytest.mark.parametrize("location", ["../secret.data", "/etc/passwd"])
def test_external_data_outside_folder_refused(tmp_path, location):
    with pytest.raises(NdonnxError, match="outside the model's folder"):
        load_teacher(_save_with_external(tmp_path, location))


def test_quantized_graph_refused(tmp_path):
    g = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["X", "s", "z"], ["q"]), helper.make_node("DequantizeLinear", ["q", "s", "z"], ["Y"])],
        "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2])],
        [numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(0, np.uint8), "z")])
    path = tmp_path / "q.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    with pytest.raises(NdonnxError, match="quantized"):
        load_teacher(path)


def test_bad_files_refused(tmp_path, zoo):
    data = zoo["resnet_legacy"].read_bytes()
    cases = {
        "missing.onnx": None,
        "text.onnx": b"this is not a model\n",
        "truncated.onnx": data[: len(data) // 3],
        "empty.onnx": b"",
    }
    for name, content in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(NdonnxError):
            load_teacher(path)


def test_rewrite_is_checked_against_the_file(zoo):
    """The loaded graph must compute what the file does (compared on the sample run); a rewrite
    that changed a weight is refused, naming the output and the difference."""
    from ndonnx.sample import check_against_file, run_sample

    teacher = load_teacher(zoo["resnet_opset9"])  # upgraded and folded on loading
    assert check_against_file(teacher, run_sample(teacher)) <= 1e-6
    init = next(i for i in teacher.model.graph.initializer if len(i.dims) == 4)
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.5, init.name))
    with pytest.raises(NdonnxError, match="computes something else than the file: relative error"):
        run_sample(teacher)


def test_rewrites_return_a_new_model_and_leave_theirs():
    """The rule for whole-model rewrites: the argument is left as it was."""
    from ndonnx.graph import dynamic_dims, remove_unused

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 4])
    dead = numpy_helper.from_array(np.ones((4, 4), np.float32), "unused")
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Neg", ["x"], ["z"])], "g", [x], [y], [dead]))
    before = model.SerializeToString()
    fixed, changed = dynamic_dims(model)
    assert changed == 2 and fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "x_dim0"
    clean, removed = remove_unused(model)
    assert (removed.nodes, removed.initializers) == (1, 1) and [n.op_type for n in clean.graph.node] == ["Relu"]
    assert model.SerializeToString() == before


def test_dims_the_weights_fix_are_read_as_constants(tmp_path):
    """torch's legacy exporter writes `chunk(2, 1)` as Shape -> Gather(1) -> ... -> Slice and
    `view(h.size(0), -1)` as Shape -> Gather(0): the channel count folds to constants (the Slices'
    bounds with it), the batch size stays computed, and the loaded graph computes what the file does
    at another batch size."""
    import models
    from ndonnx.graph import fold_weight_dims

    path = models.chunk_gate(tmp_path / "gate.onnx")
    raw = onnx.load(str(path))
    assert sum(n.op_type == "Shape" for n in raw.graph.node) == 2
    t = load_teacher(path)
    nodes = t.model.graph.node
    inits = {i.name for i in t.model.graph.initializer}
    slices = [n for n in nodes if n.op_type == "Slice"]
    assert len(slices) == 2 and all(x in inits for n in slices for x in n.input[1:])
    shape_reads = [n for n in nodes if n.op_type == "Shape"]
    assert len(shape_reads) == 1 and any(n.op_type == "Gather" and n.input[0] == shape_reads[0].output[0] for n in nodes)
    x = np.random.default_rng(0).standard_normal((5, 3, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(_run(t.model, {"input": x})[0], _run(raw, {"input": x})[0], rtol=1e-6, atol=1e-6)
    assert fold_weight_dims(fold_constants(raw))[1] == 1  # the chunk's Gather(Shape, 1); never the batch
