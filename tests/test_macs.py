"""MAC counting (ndonnx.macs): hand counts on tiny hand-built graphs, the bundled ResNet-20 against a
figure derived here from its architecture, the `check --max-macs` gate, and the light install."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ndonnx.errors import NdonnxError
from ndonnx.graph import load_teacher
from ndonnx.macs import RULES, count_macs
from ndonnx_cli.main import main

ROOT = Path(__file__).resolve().parent.parent
RESNET = ROOT / "models" / "resnet20_fmnist.onnx"


def _model(nodes, inputs, output, inits, opset=13) -> onnx.ModelProto:
    """A one-output graph; `inputs` are (name, shape) with symbolic dims as strings."""
    ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs]
    arrays = [numpy_helper.from_array(np.random.default_rng(0).standard_normal(s).astype(np.float32), n)
              for n, s in inits.items()]
    graph = helper.make_graph(nodes, "g", ins, [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
                              arrays)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    # the checker wants the output's rank: declared as inferred, each dim unknown
    rank = len(onnx.shape_inference.infer_shapes(model).graph.output[0].type.tensor_type.shape.dim)
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info(output, TensorProto.FLOAT, [None] * rank))
    onnx.checker.check_model(model)
    return model


def _macs(model: onnx.ModelProto, dims=None) -> int:
    c = count_macs(model, dims)
    assert c.uncounted == []
    return c.total


def test_conv_groups_stride_padding():
    # X 4x9x9, W 6 x (4/2) x 3x3, group 2, stride 2, pad 1: out 6 x 5x5 ((9 + 2 - 3) // 2 + 1 = 5)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], group=2, strides=[2, 2], pads=[1, 1, 1, 1])
    m = _model([node], [("x", ["N", 4, 9, 9])], "y", {"w": (6, 2, 3, 3), "b": (6,)})
    assert _macs(m) == 6 * 5 * 5 * 2 * 3 * 3  # Cout*Hout*Wout * Cin/group*kH*kW = 2700, bias not counted


def test_conv_any_spatial_rank():
    conv3d = helper.make_node("Conv", ["x", "w"], ["y"])  # 2x4x4x4 -> 3x3x3x3 with a 2x2x2 kernel
    assert _macs(_model([conv3d], [("x", ["N", 2, 4, 4, 4])], "y", {"w": (3, 2, 2, 2, 2)})) == 3 * 27 * 2 * 8
    conv1d = helper.make_node("Conv", ["x", "w"], ["y"], strides=[3])  # length 10, kernel 4: (10-4)//3+1 = 3
    assert _macs(_model([conv1d], [("x", ["N", 5, 10])], "y", {"w": (7, 5, 4)})) == 7 * 3 * 5 * 4


@pytest.mark.parametrize("group,w,expected", [(1, (4, 3, 2, 2), 3 * 36 * 4 * 1), (2, (4, 2, 2, 2), 4 * 36 * 2 * 1)])
def test_conv_transpose(group, w, expected):
    """X 4x3x3, W (Cin, Cout/group, 2, 2), stride 2: out Cout x 6x6, and each output element is reached by
    exactly one kernel position per input channel of its group, so MACs = Cout*36 * (Cin/group) * 1."""
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], strides=[2, 2], group=group)
    m = _model([node], [("x", ["N", 4, 3, 3])], "y", {"w": w})
    assert _macs(m) == expected


def test_gemm():
    fc = helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)
    assert _macs(_model([fc], [("x", ["N", 8])], "y", {"w": (5, 8), "b": (5,)})) == 5 * 8
    fc_t = helper.make_node("Gemm", ["x", "w"], ["y"], transA=1)  # A is K x M = 8 x 3
    assert _macs(_model([fc_t], [("x", [8, 3])], "y", {"w": (8, 5)})) == 3 * 5 * 8


def test_batched_matmul():
    # [1, 2, 3, 4, 6] @ [3, 6, 5] broadcasts to [1, 2, 3, 4, 5], each a sum of 6 products
    mm = helper.make_node("MatMul", ["x", "w"], ["y"])
    assert _macs(_model([mm], [("x", ["N", 2, 3, 4, 6])], "y", {"w": (3, 6, 5)})) == 2 * 3 * 4 * 5 * 6
    # two activations (attention scores), and a 1-D right operand
    qk = helper.make_node("MatMul", ["q", "k"], ["y"])
    assert _macs(_model([qk], [("q", ["N", 4, 7, 8]), ("k", ["N", 4, 8, 7])], "y", {})) == 4 * 7 * 7 * 8
    mv = helper.make_node("MatMul", ["x", "v"], ["y"])
    assert _macs(_model([mv], [("x", ["N", 3, 6])], "y", {"v": (6,)})) == 3 * 6


def test_shape_arithmetic_past_data_propagation():
    """`x.reshape(b, t // 2, 2 * d)` as exporters write it (Shape -> Gather -> Div -> Cast -> Concat):
    the Reshape target resolves, so the MatMul after it is counted."""
    i64 = lambda name, v: numpy_helper.from_array(np.array(v, np.int64), name)
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "i1"], ["t"], axis=0),
             helper.make_node("Div", ["t", "two"], ["half"]),
             helper.make_node("Cast", ["half"], ["half_i"], to=TensorProto.INT64),
             helper.make_node("Unsqueeze", ["half_i", "ax"], ["half_1"]),
             helper.make_node("Concat", ["one", "half_1", "eight"], ["target"], axis=0),
             helper.make_node("Reshape", ["x", "target"], ["r"]),
             helper.make_node("MatMul", ["r", "w"], ["y"])]
    ins = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6, 4])]
    inits = [i64("i1", 1), i64("two", 2), i64("ax", [0]), i64("one", [1]), i64("eight", [8]),
             numpy_helper.from_array(np.ones((8, 5), np.float32), "w")]
    graph = helper.make_graph(nodes, "g", ins, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    assert _macs(m) == 3 * 5 * 8


def test_batch_is_one_and_other_dims_are_given_or_refused():
    mm = helper.make_node("MatMul", ["x", "w"], ["y"])
    m = _model([mm], [("x", ["batch", "seq", 6])], "y", {"w": (6, 5)})
    with pytest.raises(NdonnxError, match="'seq'"):
        count_macs(m)
    assert _macs(m, {"seq": 10}) == 10 * 5 * 6


def test_elementwise_and_norms_are_zero_not_uncounted():
    nodes = [helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["bn"]),
             helper.make_node("Mul", ["bn", "g"], ["mul"]), helper.make_node("Relu", ["mul"], ["y"])]
    inits = {"s": (3,), "b": (3,), "m": (3,), "v": (3,), "g": (3, 1, 1)}
    m = _model(nodes, [("x", ["N", 3, 4, 4])], "y", inits)
    c = count_macs(m)
    assert c.total == 0 and c.uncounted == [] and {"BatchNormalization", "Mul"} <= set(RULES)


def test_unknown_shapes_and_unknown_weighted_ops_are_uncounted():
    # a Reshape to a shape fed at run time: the MatMul after it has no inferable shape
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"]), helper.make_node("MatMul", ["r", "w"], ["y"])]
    ins = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 12]),
           helper.make_tensor_value_info("shape", TensorProto.INT64, [2])]
    w = numpy_helper.from_array(np.ones((6, 5), np.float32), "w")
    graph = helper.make_graph(nodes, "g", ins, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    c = count_macs(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    assert [i for i, _ in c.uncounted] == [1] and "shapes unknown" in c.uncounted[0][1]
    assert c.of([0]) == 0 and c.of([0, 1]) is None
    # a weighted op without a MAC rule (an LSTM)
    lstm = helper.make_node("LSTM", ["x", "W", "R"], ["y"], hidden_size=4)
    m = _model([lstm], [("x", [5, 1, 3])], "y", {"W": (1, 16, 3), "R": (1, 16, 4)})
    c = count_macs(m)
    assert len(c.uncounted) == 1 and "no MAC rule" in c.uncounted[0][1]


def _resnet20_hand_count() -> tuple[int, list[tuple]]:
    """ResNet-20 for 1x28x28 inputs, written out from its architecture: a 3x3 stem to 16 channels, three
    stages of three basic blocks (two 3x3 convs each) at 16/32/64 channels and 28/14/7 pixels, the first
    conv of stages 2 and 3 with stride 2 plus a strided 1x1 projection shortcut, then a 64 -> 10 linear."""
    layers = [(1, 16, 3, 28)]  # (Cin, Cout, k, output side)
    for cin, cout, side in ((16, 16, 28), (16, 32, 14), (32, 64, 7)):
        layers += [(cin, cout, 3, side)] + [(cout, cout, 3, side)] * 5
        if cin != cout:
            layers.append((cin, cout, 1, side))
    convs = sum(cout * side * side * cin * k * k for cin, cout, k, side in layers)
    return convs + 64 * 10, layers


def test_resnet20_total_matches_the_hand_count():
    expected, layers = _resnet20_hand_count()
    assert expected == 31_021_952
    teacher = load_teacher(RESNET)
    inits = {i.name: tuple(i.dims) for i in teacher.model.graph.initializer}
    kernels = sorted(inits[n.input[1]] for n in teacher.model.graph.node if n.op_type == "Conv")
    assert kernels == sorted((cout, cin, k, k) for cin, cout, k, _ in layers)  # the architecture read right
    c = count_macs(teacher.model)
    assert c.uncounted == [] and c.total == expected


def test_check_gate(tmp_path, capsys):
    m = str(RESNET)
    assert main(["check", m, "--max-macs", "31021952"]) == 0
    assert "ok   max-macs: 31,021,952" in capsys.readouterr().out
    assert main(["check", m, "--max-macs", "31M", "--json"]) == 1
    out, err = capsys.readouterr()
    gate = json.loads(out)["gates"][0]
    assert gate == {"name": "max-macs", "measured": 31021952, "allowed": 31000000, "passed": False, "unit": ""}
    assert "check failed: max-macs" in err
    assert main(["check", m, "--max-macs", "lots"]) == 2
    assert "--max-macs 'lots'" in capsys.readouterr().err
    # refused (exit 2) when a weighted node cannot be counted, and when a symbolic dim has no size
    lstm = helper.make_node("LSTM", ["x", "W", "R"], ["y"], hidden_size=4)
    path = tmp_path / "lstm.onnx"
    onnx.save(_model([lstm], [("x", [5, 1, 3])], "y", {"W": (1, 16, 3), "R": (1, 16, 4)}), path)
    assert main(["check", str(path), "--max-macs", "1G"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ndonnx: error: --max-macs: cannot count") and "LSTM" in err[0]
    path = tmp_path / "seq.onnx"
    mm = helper.make_node("MatMul", ["x", "w"], ["y"])
    onnx.save(_model([mm], [("x", ["batch", "seq", 6])], "y", {"w": (6, 5)}), path)
    assert main(["check", str(path), "--max-macs", "1G"]) == 2
    assert "'seq'" in capsys.readouterr().err
    assert main(["check", str(path), "--max-macs", "300", "--dim", "seq=10"]) == 0
    assert main(["check", str(path), "--max-macs", "299", "--dim", "seq=10"]) == 1
    assert main(["check", str(path), "--max-params", "1M", "--dim", "seq=10"]) == 2  # --dim without --max-macs


def test_without_torch(tmp_path):
    from test_light_gate import LOADED, _run

    xml = tmp_path / "gates.xml"
    r = _run(["check", str(RESNET), "--max-macs", "32M", "--max-params", "1M", "--junit", str(xml)])
    assert r.returncode == 0, r.stderr
    assert "ok   max-macs: 31,021,952" in r.stdout and 'name="max-macs ' in xml.read_text()
    r = _run(["inspect", str(RESNET), "--no-check", "--json"])
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["macs"] == 31_021_952 and sum(n["macs"] for n in rep["neighbourhoods"]) == rep["macs"]
    r = _run(["check", str(RESNET), "--max-macs", "32M"], block=False, after=LOADED)  # torch there, not loaded
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == "LOADED []"
