"""Splicing students into the teacher: inner names renamed `nd<id>_...`, the teacher's interface
and opset imports kept, the students' opset imports merged in."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ndonnx.convert import extract
from ndonnx.errors import NdonnxError
from ndonnx.graph import load_teacher
from ndonnx.partition import partition
from ndonnx.sample import ort_session, run_sample
from ndonnx.splice import check, splice


@pytest.fixture(scope="module")
def resnet(zoo):
    t = load_teacher(zoo["resnet_legacy"])
    part = partition(t)
    return t, part, run_sample(t)


def _x(n: int = 5) -> dict[str, np.ndarray]:
    return {"input": np.random.default_rng(0).standard_normal((n, 3, 16, 16)).astype(np.float32)}


def _same_function_as_teacher(t, spliced):
    check(spliced)
    np.testing.assert_allclose(ort_session(spliced).run(None, _x())[0], ort_session(t.model).run(None, _x())[0],
                               rtol=1e-5, atol=1e-6)


def _inner(model: onnx.ModelProto, keep: set[str]) -> set[str]:
    return ({n for node in model.graph.node for n in (*node.input, *node.output) if n}
            | {i.name for i in model.graph.initializer}) - keep


def test_inner_names_prefixed_and_interface_kept(resnet):
    """Two students whose inner names are the very same (blocks 1 and 2 of the ResNet have one
    structure): each gets its own `nd<id>_` prefix, so nothing clashes; boundaries keep their names."""
    t, part, sample = resnet
    nb = {n.id: n for n in part.neighbourhoods}
    s1, s2 = extract(t, nb[1], sample), extract(t, nb[2], sample)
    keep1, keep2 = {*nb[1].feeds, *nb[1].outputs}, {*nb[2].feeds, *nb[2].outputs}
    # give block 2's student block 1's inner names, slot by slot (same op sequence)
    assert [n.op_type for n in s1.graph.node] == [n.op_type for n in s2.graph.node]
    rename = {}
    for a, b in zip(s1.graph.node, s2.graph.node):
        for na, nb_ in zip([*a.input, *a.output], [*b.input, *b.output]):
            if nb_ not in keep2:
                rename[nb_] = na
        b.name = a.name
    for node in s2.graph.node:
        node.input[:] = [rename.get(n, n) for n in node.input]
        node.output[:] = [rename.get(n, n) for n in node.output]
    for init in s2.graph.initializer:
        init.name = rename[init.name]
    inner = _inner(s1, keep1)
    assert inner and _inner(s2, keep2) == inner  # the same inner names in both students

    spliced = splice(t.model, part, {1: s1, 2: s2})
    _same_function_as_teacher(t, spliced)
    g = spliced.graph
    names = {i.name for i in g.initializer}
    made = [o for node in g.node for o in node.output]
    assert len(made) == len(set(made)) and len(names) == len(g.initializer)  # single assignment, no clash
    for nid, st, keep in ((1, s1, keep1), (2, s2, keep2)):
        assert {f"nd{nid}_{n.name}" for n in st.graph.node} <= {n.name for n in g.node}
        assert {f"nd{nid}_{i.name}" for i in st.graph.initializer} <= names
        assert {f"nd{nid}_{n}" for n in _inner(st, keep)} <= names | set(made)
        assert set(nb[nid].outputs) <= set(made)  # boundary tensors keep the teacher's names
    assert not inner & (names | set(made))  # no unprefixed inner name is left
    # nodes of neighbourhoods left as the teacher are the teacher's own, untouched
    kept = [t.model.graph.node[i] for n in part.neighbourhoods if n.id not in (1, 2) for i in n.nodes]
    assert all(any(k == node for node in g.node) for k in kept)
    assert [(i.name, i.type) for i in g.input] == [(i.name, i.type) for i in t.model.graph.input]
    assert [(o.name, o.type) for o in g.output] == [(o.name, o.type) for o in t.model.graph.output]
    assert list(spliced.opset_import) == list(t.model.opset_import)
    assert spliced.ir_version == t.model.ir_version


def _head_student(t, nbh, opset: int, extra: list[onnx.OperatorSetIdProto] = (), reduce_axes_input=False,
                  scaler=False) -> onnx.ModelProto:
    """The head (Relu, average pool, Gemm) written by hand: with ReduceMean taking its axes as an
    input (opset 18 on), and/or followed by an ai.onnx.ml Scaler (identity: offset 0, scale 1)."""
    init = {i.name: numpy_helper.to_array(i) for i in t.model.graph.initializer}
    gemm = next(n for n in t.model.graph.node if n.op_type == "Gemm")
    w, b = init[gemm.input[1]], init[gemm.input[2]]
    (x,), (y,) = nbh.feeds, nbh.outputs
    mean_out, gemm_out = "pooled", ("fc_out" if scaler else y)
    nodes = [helper.make_node("Relu", [x], ["r"], name="relu")]
    if reduce_axes_input:
        nodes.append(helper.make_node("ReduceMean", ["r", "axes"], [mean_out], name="pool", keepdims=0))
    else:
        nodes.append(helper.make_node("ReduceMean", ["r"], [mean_out], name="pool", axes=[2, 3], keepdims=0))
    nodes.append(helper.make_node("Gemm", [mean_out, "w", "b"], [gemm_out], name="fc", transB=1))
    if scaler:
        nodes.append(helper.make_node("Scaler", [gemm_out], [y], name="scale", domain="ai.onnx.ml",
                                      offset=[0.0], scale=[1.0]))
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")]
    if reduce_axes_input:
        inits.append(numpy_helper.from_array(np.array([2, 3], np.int64), "axes"))
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", "C", "H", "W"])],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, ["N", len(b)])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), *extra])
    onnx.checker.check_model(model)
    return model


def test_student_extra_domain_merged(resnet):
    """A student using an operator of a domain the teacher does not import brings that import along;
    the teacher's default-domain opset stays as it was."""
    t, part, _ = resnet
    head = part.neighbourhoods[-1]
    assert {o.domain for o in t.model.opset_import} <= {"", "ai.onnx"}
    st = _head_student(t, head, 13, [helper.make_opsetid("ai.onnx.ml", 2)], scaler=True)
    spliced = splice(t.model, part, {head.id: st})
    ops = {o.domain: o.version for o in spliced.opset_import}
    assert ops == {**{o.domain: o.version for o in t.model.opset_import}, "ai.onnx.ml": 2}
    assert any(n.op_type == "Scaler" and n.domain == "ai.onnx.ml" and n.name == f"nd{head.id}_scale"
               for n in spliced.graph.node)
    _same_function_as_teacher(t, spliced)


def test_student_with_higher_opset_converted_down_or_refused(resnet):
    """The spliced model keeps the teacher's opset (raising it would change what the teacher's own
    nodes mean): a newer student is converted down by onnx's version converter where it can, else
    refused with a clear error, never spliced into an invalid model. onnx has no Relu-14 -> 13
    adapter, so this opset-18 head (ReduceMean taking its axes as an input) is refused."""
    t, part, _ = resnet
    head = part.neighbourhoods[-1]
    st = _head_student(t, head, 18, reduce_axes_input=True)
    with pytest.raises(NdonnxError, match="uses opset 18, above the teacher's 13, and cannot be converted down"):
        splice(t.model, part, {head.id: st})
