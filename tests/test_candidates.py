"""Student candidate generators: boundary contract, parameter counts, exactness at full size,
channel-group analysis, schedules and parsing."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from ndonnx.candidates import (DEFAULT_CANDIDATES, REGISTRY, CandidateSpec, NotApplicable, build_candidates,
                               parse_candidates, register)
from ndonnx.candidates import identity, lowrank, sparse, width
from ndonnx.candidates.importance import group_l1, keep_indices
from ndonnx.candidates.onnx_edit import ContractError, fold_batchnorm, get_array, param_count
from ndonnx.convert import extract, rel_err, run_torch, to_torch
from ndonnx.errors import NdonnxError
from ndonnx.graph import load_teacher
from ndonnx.partition import partition
from ndonnx.sample import ort_session, run_sample

MODELS = ["resnet_legacy", "mobilenet", "encoder"]
OTHER_EXPORTS = ["resnet_dynamo", "resnet_opset9", "two_heads"]  # opset 18+ ops, upgraded opset, two outputs
SPECS = DEFAULT_CANDIDATES + ",sparse:0.5"


@pytest.fixture(scope="module")
def blocks(zoo):
    """model name -> (sample, [teacher sub-models])."""
    out = {}
    for name in MODELS + OTHER_EXPORTS:
        t = load_teacher(zoo[name])
        s = run_sample(t)
        out[name] = (s, [extract(t, n, s) for n in partition(t).neighbourhoods])
    return out


@pytest.fixture(scope="module")
def built(blocks):
    """model name -> [(students, reasons)] per neighbourhood, for SPECS."""
    specs = parse_candidates(SPECS)
    return {name: [build_candidates(sub, specs, strict=True, feeds=_sample_feeds(sub, s)) for sub in subs]
            for name, (s, subs) in blocks.items()}


def _sample_feeds(sub: onnx.ModelProto, sample) -> dict[str, np.ndarray]:
    return {i.name: sample.values[i.name] for i in sub.graph.input}


def ort_run(model: onnx.ModelProto, values: dict) -> dict[str, np.ndarray]:
    sess = ort_session(model)
    feeds = {i.name: values[i.name] for i in model.graph.input}
    return dict(zip([o.name for o in model.graph.output], sess.run(None, feeds)))


def student(built, model: str, nbh: int, spec: str):
    students, reasons = built[model][nbh]
    found = [s for s in students if str(s.spec) == spec]
    assert found, reasons.get(spec)
    return found[0]


def weight_of(model: onnx.ModelProto, op: str, index: int = 0, slot: int = 1) -> np.ndarray:
    nodes = [n for n in model.graph.node if n.op_type == op]
    return get_array(model, nodes[index].input[slot])


# --- the contract, on every neighbourhood of three architectures -----------------------------------

@pytest.mark.parametrize("name", MODELS + OTHER_EXPORTS)
def test_every_student_keeps_the_boundary_and_converts(blocks, built, name):
    sample, subs = blocks[name]
    for k, (sub, (students, reasons)) in enumerate(zip(subs, built[name])):
        assert students[0].spec == CandidateSpec("teacher") and students[0].model == sub
        assert set(reasons) | {str(s.spec) for s in students} == {str(s) for s in parse_candidates(SPECS)}
        for st in students:
            what = f"{name} nbh {k} {st.spec}"
            assert [i.name for i in st.model.graph.input] == [i.name for i in sub.graph.input], what
            assert [(o.name, o.type) for o in st.model.graph.output] == [(o.name, o.type) for o in sub.graph.output]
            onnx.checker.check_model(st.model, full_check=True)
            got = ort_run(st.model, sample.values)
            for o in sub.graph.output:
                want = sample.values[o.name]
                assert got[o.name].shape == want.shape and got[o.name].dtype == want.dtype, what
            assert st.params == param_count(st.model), what
            assert st.nonzero <= st.params, what
            module = to_torch(st.model)
            outs = run_torch(module, st.model, sample.values)
            for o, t in zip(sub.graph.output, outs):
                assert rel_err(t, got[o.name]) <= 1e-4, what
            if st.spec.family in ("teacher", "sparse"):  # same function as the teacher
                for o in sub.graph.output:
                    np.testing.assert_allclose(got[o.name], sample.values[o.name], rtol=1e-5, atol=1e-5)
            else:
                assert st.params < students[0].params, what


def test_which_families_apply_where(built):
    def applied(model):
        return [{str(s.spec) for s in students} for students, _ in built[model]]

    resnet, mobile, enc = applied("resnet_legacy"), applied("mobilenet"), applied("encoder")
    # stem, three basic blocks (the last downsamples: projection shortcut), head
    assert ["identity" in a for a in resnet] == [False, True, True, False, False]
    assert ["width:0.5" in a for a in resnet] == [False, True, True, True, False]
    assert ["identity" in a for a in mobile] == [False, True, True, False]
    assert ["width:0.5" in a for a in mobile] == [False, True, True, False]
    # embedding, attention, FFN, (LN +) attention, FFN, head: attention heads are not shrunk
    assert ["width:0.5" in a for a in enc] == [False, False, True, False, True, False]
    assert ["identity" in a for a in enc] == [False, True, True, True, True, False]
    assert all("lowrank:0.25" in a for a in resnet + mobile)
    _, reasons = built["encoder"][1]
    assert "Reshape" in reasons["width:0.5"]


# --- width ----------------------------------------------------------------------------------------

def test_basic_block_width_half_by_hand(built):
    st = student(built, "resnet_legacy", 1, "width:0.5")
    c1, c2 = weight_of(st.model, "Conv", 0), weight_of(st.model, "Conv", 1)
    assert c1.shape == (4, 8, 3, 3) and c2.shape == (8, 4, 3, 3)  # c1 keeps 4 of 8 outputs, c2 4 inputs
    assert weight_of(st.model, "Conv", 0, 2).shape == (4,) and weight_of(st.model, "Conv", 1, 2).shape == (8,)
    assert st.params == 4 * 8 * 9 + 4 + 8 * 4 * 9 + 8 == 588


def test_width_keeps_the_highest_l1_channels(blocks):
    sub = blocks["resnet_legacy"][1][1]
    st = REGISTRY["width"].generate(sub, CandidateSpec("width", 0.5))  # as cut, before `refit`
    w1, w2 = weight_of(sub, "Conv", 0), weight_of(sub, "Conv", 1)
    keep = np.sort(np.argsort(-np.abs(w1).sum(axis=(1, 2, 3)), kind="stable")[:4])
    np.testing.assert_array_equal(weight_of(st.model, "Conv", 0), w1[keep])
    np.testing.assert_array_equal(weight_of(st.model, "Conv", 1), w2[:, keep])


def test_ffn_width_half_by_hand(built):
    st = student(built, "encoder", 2, "width:0.5")
    ff1, ff2 = weight_of(st.model, "MatMul", 0), weight_of(st.model, "MatMul", 1)
    assert ff1.shape == (16, 16) and ff2.shape == (16, 16)
    # LayerNorm scale+shift 32, ff1 256 + bias 16, ff2 256 + bias 16 (the output side stays 16)
    assert st.params == 32 + 16 * 16 + 16 + 16 * 16 + 16 == 576
    assert student(built, "encoder", 2, "teacher").params == 32 + 16 * 32 + 32 + 32 * 16 + 16


def _tensordot_ffn(shared_target: bool = False) -> onnx.ModelProto:
    """A feed-forward layer on [tokens, 8] as tf2onnx writes TensorFlow's Tensordot: the hidden 16
    channels go through Reshape targets built from Shape -> Cast -> Gather([0, 1]) -> Concat(const)."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 16)).astype(np.float32)
    w1[:, 1::2] *= 0.01  # the odd hidden channels are the weak ones
    arrays = {"W1": w1, "B1": rng.standard_normal(16).astype(np.float32),
              "W2": rng.standard_normal((16, 8)).astype(np.float32), "B2": rng.standard_normal(8).astype(np.float32),
              "zero": np.array([0], np.int64), "lead": np.array([0, 1], np.int64), "in8": np.array([-1, 8], np.int64),
              "in16": np.array([-1, 16], np.int64), "c16": np.array([16], np.int64), "c8": np.array([8], np.int64)}
    nodes = [helper.make_node("Unsqueeze", ["X", "zero"], ["E"])]
    for k, (x, w, inner, width_const, out) in enumerate(
            (("E", "W1", "in8", "c16", "H"), ("R", "W2", "in16", "c8", "F"))):
        nodes += [helper.make_node("Shape", [x], [f"s{k}"]), helper.make_node("Cast", [f"s{k}"], [f"sc{k}"], to=7),
                  helper.make_node("Gather", [f"sc{k}", "lead"], [f"g{k}"]),
                  helper.make_node("Concat", [f"g{k}", width_const], [f"t{k}"], axis=0),
                  helper.make_node("Reshape", [x, inner], [f"r{k}"]), helper.make_node("MatMul", [f"r{k}", w], [f"m{k}"]),
                  helper.make_node("Reshape", [f"m{k}", f"t{k}"], [out])]
        if k == 0:
            nodes += [helper.make_node("Add", ["H", "B1"], ["HB"]), helper.make_node("Relu", ["HB"], ["R"])]
    nodes += [helper.make_node("Add", ["F", "B2"], ["FB"]), helper.make_node("Squeeze", ["FB", "zero"], ["Y"])]
    g = helper.make_graph(nodes, "ffn", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["K", 8])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["K", 8])],
                          [numpy_helper.from_array(v, n) for n, v in arrays.items()])
    if shared_target:  # another reader of the constant [16]: it must keep reading 16
        nodes.append(helper.make_node("Add", ["c16", "zero"], ["C"]))
        g.output.append(helper.make_tensor_value_info("C", TensorProto.INT64, [1]))
        g.node.append(nodes[-1])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    return onnx.shape_inference.infer_shapes(model, data_prop=True)  # the targets' values, as a sample run records


def test_width_follows_a_channels_last_reshape_by_hand():
    """tf2onnx's Tensordot: the hidden group passes the Reshapes (their targets' last entry rewritten)
    and the Shape reads of its leading dims; the student equals the FFN with the kept columns."""
    sub = _tensordot_ffn()
    st = REGISTRY["width"].generate(sub, CandidateSpec("width", 0.5))
    keep = np.arange(0, 16, 2)  # the strong channels
    a = {n: get_array(sub, n) for n in ("W1", "B1", "W2", "B2")}
    x = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
    want = np.maximum(x @ a["W1"][:, keep] + a["B1"][keep], 0) @ a["W2"][keep] + a["B2"]
    np.testing.assert_allclose(ort_session(st.model).run(None, {"X": x})[0], want, rtol=1e-5, atol=1e-5)
    assert st.params == 8 * 8 + 8 + 8 * 8 + 8
    assert get_array(st.model, "c16").tolist() == [8] and get_array(st.model, "in16").tolist() == [-1, 8]


def test_width_copies_a_shape_constant_other_nodes_read():
    sub = _tensordot_ffn(shared_target=True)
    st = REGISTRY["width"].generate(sub, CandidateSpec("width", 0.5))
    x = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
    y, c = ort_session(st.model).run(None, {"X": x})
    assert y.shape == (5, 8) and c.tolist() == [16]
    reshape = next(n for n in st.model.graph.node if n.op_type == "Concat" and n.output[0] == "t0")
    assert reshape.input[1] != "c16" and get_array(st.model, reshape.input[1]).tolist() == [8]


def test_squeeze_excite_groups_shrink_together(blocks):
    sub = blocks["mobilenet"][1][2]
    st = REGISTRY["width"].generate(sub, CandidateSpec("width", 0.5))  # as cut, before `refit`
    convs = [n for n in st.model.graph.node if n.op_type == "Conv"]
    shapes = [get_array(st.model, n.input[1]).shape for n in convs]
    # expand, depthwise, fc1, fc2, project
    assert shapes == [(16, 8, 1, 1), (16, 1, 3, 3), (4, 16, 1, 1), (16, 4, 1, 1), (8, 16, 1, 1)]
    assert next(a.i for a in convs[1].attribute if a.name == "group") == 16
    assert st.params == (128 + 16) + (144 + 16) + (64 + 4) + (64 + 16) + (128 + 8)
    # one channel set for the expand conv, the depthwise conv, the SE output (fc2) and project's input
    t = [get_array(sub, n.input[1]) for n in sub.graph.node if n.op_type == "Conv"]
    s = [get_array(st.model, n.input[1]) for n in convs]
    keep = [int(np.flatnonzero((t[0] == row).all(axis=(1, 2, 3)))[0]) for row in s[0]]
    keep_se = np.sort(np.argsort(-np.abs(t[2]).sum(axis=(1, 2, 3)), kind="stable")[:4])
    np.testing.assert_array_equal(s[1], t[1][keep])
    np.testing.assert_array_equal(s[2], t[2][keep_se][:, keep])
    np.testing.assert_array_equal(s[3], t[3][keep][:, keep_se])
    np.testing.assert_array_equal(s[4], t[4][:, keep])
    groups = [g for g in width.channel_groups(fold_batchnorm(sub)) if g.shrinkable]
    assert sorted(g.size for g in groups) == [8, 32]
    assert sorted(len(g.producers) for g in groups) == [1, 2]


@pytest.mark.parametrize("name", MODELS)
def test_width_one_reproduces_the_teacher(blocks, name):
    sample, subs = blocks[name]
    for sub in subs:
        try:
            model, sizes = width.shrink(sub, 1.0)
        except NotApplicable:
            continue
        assert all(a == b for a, b in sizes)
        got = ort_run(model, sample.values)
        for o in sub.graph.output:
            np.testing.assert_allclose(got[o.name], sample.values[o.name], rtol=1e-5, atol=1e-5)


def test_width_on_a_block_without_inner_group_is_refused(blocks):
    stem = blocks["resnet_legacy"][1][0]
    with pytest.raises(NotApplicable, match="reaches the output"):
        REGISTRY["width"].generate(stem, CandidateSpec("width", 0.5))


# --- small hand-built graphs -----------------------------------------------------------------------

RNG = np.random.default_rng(0)


def _t(name, *shape, positive=False):
    a = RNG.random(shape) + 0.5 if positive else RNG.standard_normal(shape)
    return numpy_helper.from_array(a.astype(np.float32), name)


def _bn(prefix, c):
    return [_t(f"{prefix}.s", c, positive=True), _t(f"{prefix}.b", c), _t(f"{prefix}.m", c),
            _t(f"{prefix}.v", c, positive=True)]


def _model(nodes, inits, x_shape, y_shape, opset=13, x="X", y="Y"):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(x, TensorProto.FLOAT, x_shape)],
                          [helper.make_tensor_value_info(y, TensorProto.FLOAT, y_shape)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    return onnx.shape_inference.infer_shapes(m, strict_mode=True)


def _feeds(model, batch=3):
    vi = model.graph.input[0]
    shape = [batch if d.dim_param else d.dim_value for d in vi.type.tensor_type.shape.dim]
    return {vi.name: np.random.default_rng(1).standard_normal(shape).astype(np.float32)}


def _bn_block():
    """x -> Conv -> BN -> Relu -> Conv -> BN -> Add(x) -> Relu (a basic block with BatchNorm)."""
    bn = lambda p, i, o: helper.make_node("BatchNormalization", [i, f"{p}.s", f"{p}.b", f"{p}.m", f"{p}.v"], [o])
    nodes = [helper.make_node("Conv", ["X", "w1"], ["c1"], pads=[1, 1, 1, 1], name="c1"), bn("bn1", "c1", "b1"),
             helper.make_node("Relu", ["b1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], name="c2"), bn("bn2", "c2", "b2"),
             helper.make_node("Add", ["b2", "X"], ["a"]), helper.make_node("Relu", ["a"], ["Y"])]
    inits = [_t("w1", 8, 4, 3, 3), _t("w2", 4, 8, 3, 3), *_bn("bn1", 8), *_bn("bn2", 4)]
    return _model(nodes, inits, ["N", 4, 6, 6], ["N", 4, 6, 6])


def _check_student(teacher, student_model, exact=False):
    onnx.checker.check_model(student_model, full_check=True)
    feeds = _feeds(teacher)
    want = ort_session(teacher).run(None, feeds)
    got = ort_session(student_model).run(None, feeds)
    torch_out = run_torch(to_torch(student_model), student_model, feeds)
    for w, g, t in zip(want, got, torch_out):
        assert w.shape == g.shape and w.dtype == g.dtype
        assert rel_err(t, g) <= 1e-4
        if exact:
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    return got


def test_batchnorm_after_conv_is_folded():
    m = _bn_block()
    folded = fold_batchnorm(m)
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Relu", "Conv", "Add", "Relu"]
    _check_student(m, folded, exact=True)
    model, sizes = width.shrink(m, 1.0)
    assert sizes == [(8, 8)]
    _check_student(m, model, exact=True)
    st = REGISTRY["width"].generate(m, CandidateSpec("width", 0.5))
    assert [n.op_type for n in st.model.graph.node] == ["Conv", "Relu", "Conv", "Add", "Relu"]
    assert st.params == 4 * 4 * 9 + 4 + 4 * 4 * 9 + 4
    _check_student(m, st.model)
    ident = REGISTRY["identity"].generate(m, CandidateSpec("identity"))
    assert [n.op_type for n in ident.model.graph.node] == ["Relu"] and ident.params == 0
    np.testing.assert_allclose(_check_student(m, ident.model)[0], np.maximum(_feeds(m)["X"], 0))


def test_batchnorm_not_after_conv_is_sliced():
    nodes = [helper.make_node("Conv", ["X", "w1", "b1"], ["c1"]), helper.make_node("Relu", ["c1"], ["r"]),
             helper.make_node("BatchNormalization", ["r", "bn.s", "bn.b", "bn.m", "bn.v"], ["n"]),
             helper.make_node("Conv", ["n", "w2"], ["Y"])]
    m = _model(nodes, [_t("w1", 8, 4, 1, 1), _t("b1", 8), *_bn("bn", 8), _t("w2", 4, 8, 1, 1)],
               ["N", 4, 5, 5], ["N", 4, 5, 5])
    _check_student(m, width.shrink(m, 1.0)[0], exact=True)
    st = REGISTRY["width"].generate(m, CandidateSpec("width", 0.25))
    bn = next(n for n in st.model.graph.node if n.op_type == "BatchNormalization")
    assert all(get_array(st.model, n).shape == (2,) for n in bn.input[1:])
    assert st.params == 2 * 4 + 2 + 4 * 2 + 4 * 2
    _check_student(m, st.model)


def test_gemm_flatten_and_pooling_groups():
    nodes = [helper.make_node("Conv", ["X", "w1", "b1"], ["c"]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "g1", "gb1"], ["h"]),  # transB=0: weight [in, out]
             helper.make_node("Mul", ["h", "half"], ["hm"]), helper.make_node("Tanh", ["hm"], ["t"]),
             helper.make_node("Gemm", ["t", "g2", "gb2"], ["Y"], transB=1)]
    inits = [_t("w1", 8, 3, 3, 3), _t("b1", 8), _t("g1", 8, 6), _t("gb1", 6), _t("half", 6), _t("g2", 5, 6), _t("gb2", 5)]
    m = _model(nodes, inits, ["N", 3, 7, 7], ["N", 5])
    _check_student(m, width.shrink(m, 1.0)[0], exact=True)
    st = REGISTRY["width"].generate(m, CandidateSpec("width", 0.5))
    assert get_array(st.model, "w1").shape == (4, 3, 3, 3)
    g1 = next(n for n in st.model.graph.node if n.op_type == "Gemm")
    assert get_array(st.model, g1.input[1]).shape == (4, 3)  # in sliced by the conv group, out by its own
    assert st.params == 4 * 27 + 4 + 4 * 3 + 3 + 3 + 5 * 3 + 5
    _check_student(m, st.model)
    # low rank: the 3x3 conv (8 x 27) and the Gemms; the first Gemm's factors keep transB=0 shapes
    lr, names = lowrank.factor(m, 1.0, only_if_smaller=False)
    assert len(names) == 3
    _check_student(m, lr, exact=False)
    np.testing.assert_allclose(ort_session(lr).run(None, _feeds(m))[0], ort_session(m).run(None, _feeds(m))[0],
                               rtol=1e-4, atol=1e-4)


def _two_convs_joined_by(op_nodes, mid_shape_c=16):
    nodes = [helper.make_node("Conv", ["X", "wa"], ["a"]), helper.make_node("Conv", ["X", "wb"], ["b"]), *op_nodes,
             helper.make_node("Conv", ["j", "wc"], ["Y"])]
    return nodes, [_t("wa", 8, 4, 1, 1), _t("wb", 8, 4, 1, 1), _t("wc", 4, mid_shape_c, 1, 1)]


@pytest.mark.parametrize("case", ["concat", "reshape", "grouped", "attention"])
def test_width_refuses_what_it_does_not_understand(case):
    if case == "concat":  # along a spatial axis: the channels of both inputs are the same channels
        nodes, inits = _two_convs_joined_by([helper.make_node("Concat", ["a", "b"], ["j"], axis=2)], mid_shape_c=8)
        m = _model(nodes, inits, ["N", 4, 5, 5], ["N", 4, 10, 5])
    elif case == "reshape":
        nodes = [helper.make_node("Conv", ["X", "wa"], ["a"]), helper.make_node("Reshape", ["a", "shape"], ["j"]),
                 helper.make_node("Conv", ["j", "wc"], ["Y"])]
        inits = [_t("wa", 8, 4, 1, 1), numpy_helper.from_array(np.array([0, 8, 25, 1], np.int64), "shape"),
                 _t("wc", 4, 8, 1, 1)]
        m = _model(nodes, inits, ["N", 4, 5, 5], ["N", 4, 25, 1])
    elif case == "grouped":
        nodes = [helper.make_node("Conv", ["X", "wa"], ["a"]), helper.make_node("Conv", ["a", "wg"], ["j"], group=2),
                 helper.make_node("Conv", ["j", "wc"], ["Y"])]
        m = _model(nodes, [_t("wa", 8, 4, 1, 1), _t("wg", 8, 4, 1, 1), _t("wc", 4, 8, 1, 1)],
                   ["N", 4, 5, 5], ["N", 4, 5, 5])
    else:  # q @ k^T of two projections, then a projection back: attention-like
        nodes = [helper.make_node("MatMul", ["X", "wq"], ["q"]), helper.make_node("MatMul", ["X", "wk"], ["k"]),
                 helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
                 helper.make_node("MatMul", ["q", "kt"], ["s"]), helper.make_node("Softmax", ["s"], ["p"], axis=-1),
                 helper.make_node("MatMul", ["p", "X"], ["o"]), helper.make_node("MatMul", ["o", "wo"], ["Y"])]
        m = _model(nodes, [_t("wq", 6, 8), _t("wk", 6, 8), _t("wo", 6, 6)], ["N", 5, 6], ["N", 5, 6])
    with pytest.raises(NotApplicable, match="no shrinkable"):
        width.shrink(m, 0.5)


def _half_dead(name, *shape, axis=0, bias=False):
    """A weight (or bias) whose output channels on `axis` at odd indices are zero: the L1 score drops
    exactly those, and with Relu after them a width-0.5 student must compute what the teacher does."""
    a = RNG.standard_normal(shape).astype(np.float32)
    np.moveaxis(a, axis, 0)[1::2] = 0
    return numpy_helper.from_array(a, name)


def test_concat_parts_shrink_at_their_offsets():
    # relu(conv(X)) [8] | relu(convT(X)) [8] | X [4, no group: kept] -> conv: a U-Net's skip concat
    nodes = [helper.make_node("Conv", ["X", "wa", "ba"], ["a"]), helper.make_node("Relu", ["a"], ["ra"]),
             helper.make_node("ConvTranspose", ["X", "wb", "bb"], ["b"]), helper.make_node("Relu", ["b"], ["rb"]),
             helper.make_node("Concat", ["ra", "rb", "X"], ["j"], axis=1),
             helper.make_node("Conv", ["j", "wc"], ["Y"])]
    inits = [_half_dead("wa", 8, 4, 1, 1), _half_dead("ba", 8), _half_dead("wb", 4, 8, 1, 1, axis=1), _half_dead("bb", 8),
             _t("wc", 4, 20, 1, 1)]
    m = _model(nodes, inits, ["N", 4, 5, 5], ["N", 4, 5, 5])
    st = REGISTRY["width"].generate(m, CandidateSpec("width", 0.5))
    wc = get_array(st.model, "wc")
    np.testing.assert_array_equal(wc, get_array(m, "wc")[:, [0, 2, 4, 6, 8, 10, 12, 14, 16, 17, 18, 19]])
    assert get_array(st.model, "wb").shape == (4, 4, 1, 1)
    np.testing.assert_allclose(_check_student(m, st.model)[0], ort_session(m).run(None, _feeds(m))[0], rtol=1e-5, atol=1e-5)


def test_width_students_are_checked_against_the_zeroed_teacher(monkeypatch):
    """build_candidates runs each width student against the teacher with the dropped channels zeroed;
    a student that computes something else (here: the reference left unzeroed) is refused, or raises
    when strict."""
    nodes = [helper.make_node("Conv", ["X", "wa", "ba"], ["a"]), helper.make_node("Relu", ["a"], ["ra"]),
             helper.make_node("Concat", ["ra", "X"], ["j"], axis=1), helper.make_node("Conv", ["j", "wc"], ["Y"])]
    m = _model(nodes, [_t("wa", 8, 4, 1, 1), _t("ba", 8), _t("wc", 4, 12, 1, 1)], ["N", 4, 5, 5], ["N", 4, 5, 5])
    specs = parse_candidates("width:0.5")
    students, reasons = build_candidates(m, specs, strict=True, feeds=_feeds(m))
    assert [str(s.spec) for s in students] == ["teacher", "width:0.5"] and students[1].reference is None
    monkeypatch.setattr(width, "_zero", lambda model, zeros: None)
    students, reasons = build_candidates(m, specs, feeds=_feeds(m))
    assert [str(s.spec) for s in students] == ["teacher"]
    assert reasons["width:0.5"].startswith("failed its check: output 'Y' differs from the teacher's with the dropped")
    with pytest.raises(ContractError, match="width:0.5: output 'Y' differs"):
        build_candidates(m, specs, strict=True, feeds=_feeds(m))
    monkeypatch.setattr("ndonnx.candidates.differs", lambda *a: 1 / 0)
    assert build_candidates(m, specs, feeds=_feeds(m))[1]["width:0.5"] == \
        "failed its check: onnxruntime cannot run it: ZeroDivisionError: division by zero"


def test_concat_reaching_the_output_blocks_its_parts():
    nodes = [helper.make_node("Conv", ["X", "wa"], ["a"], name="ca"), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Concat", ["r", "X"], ["Y"], axis=1)]
    m = _model(nodes, [_t("wa", 8, 4, 1, 1)], ["N", 4, 5, 5], ["N", 12, 5, 5])
    with pytest.raises(NotApplicable, match="ca is concatenated into a group that reaches the output 'Y'"):
        width.shrink(m, 0.5)


def test_conv_transpose_groups_and_batchnorm_fold():
    # conv -> relu -> convT (stride 2) -> BN -> relu -> conv: both inner groups shrink, the BN folds into convT
    bn = helper.make_node("BatchNormalization", ["t", "bn.s", "bn.b", "bn.m", "bn.v"], ["tb"])
    nodes = [helper.make_node("Conv", ["X", "w1", "b1"], ["c"]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("ConvTranspose", ["r", "wt"], ["t"], strides=[2, 2], kernel_shape=[2, 2]), bn,
             helper.make_node("Relu", ["tb"], ["rt"]), helper.make_node("Conv", ["rt", "w2"], ["Y"])]
    m = _model(nodes, [_half_dead("w1", 8, 4, 1, 1), _half_dead("b1", 8), _t("wt", 8, 6, 2, 2), *_bn("bn", 6),
                       _t("w2", 4, 6, 1, 1)], ["N", 4, 5, 5], ["N", 4, 10, 10])
    full, sizes = width.shrink(m, 1.0)
    assert sizes == [(8, 8), (6, 6)] and "BatchNormalization" not in [n.op_type for n in full.graph.node]
    _check_student(m, full, exact=True)
    st = REGISTRY["width"].generate(m, CandidateSpec("width", 0.5))
    convt = next(n for n in st.model.graph.node if n.op_type == "ConvTranspose")
    assert get_array(st.model, convt.input[1]).shape == (4, 3, 2, 2) and get_array(st.model, convt.input[2]).shape == (3,)
    assert st.params == 4 * 4 + 4 + 4 * 3 * 4 + 3 + 4 * 3
    _check_student(m, st.model)


@pytest.mark.parametrize("how", ["scales", "sizes", "channel scale"])
def test_resize_passes_the_group_on(how):
    scales = np.array([1, 2 if how == "channel scale" else 1, 2, 2], np.float32)
    ins = ["r", "roi", "" if how == "sizes" else "scales"] + (["sizes"] if how == "sizes" else [])
    nodes = [helper.make_node("Conv", ["X", "w1", "b1"], ["c"], name="c1"), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Resize", ins, ["u"], mode="nearest"), helper.make_node("Conv", ["u", "w2"], ["Y"])]
    inits = [_half_dead("w1", 8, 4, 1, 1), _half_dead("b1", 8), numpy_helper.from_array(np.zeros(0, np.float32), "roi"),
             numpy_helper.from_array(scales, "scales"), numpy_helper.from_array(np.array([3, 8, 10, 10], np.int64), "sizes"),
             _t("w2", 4, 16 if how == "channel scale" else 8, 1, 1)]
    m = _model(nodes, inits, [3, 4, 5, 5], [3, 4, 10, 10])
    if how == "channel scale":
        with pytest.raises(NotApplicable, match="c1 enters Resize.*resizes the channels"):
            width.shrink(m, 0.5)
        return
    st = REGISTRY["width"].generate(m, CandidateSpec("width", 0.5))
    if how == "sizes":
        assert get_array(st.model, "sizes").tolist() == [3, 4, 10, 10]
    np.testing.assert_allclose(_check_student(m, st.model)[0], ort_session(m).run(None, _feeds(m))[0], rtol=1e-5, atol=1e-5)


def test_shared_constant_is_copied_not_corrupted():
    # the per-channel constant `cst` is added inside the group and to the block input (kept whole)
    nodes = [helper.make_node("Conv", ["X", "wa"], ["a"]), helper.make_node("Add", ["a", "cst"], ["ac"]),
             helper.make_node("Relu", ["ac"], ["r"]), helper.make_node("Conv", ["r", "wb"], ["b"]),
             helper.make_node("Add", ["X", "cst"], ["xc"]), helper.make_node("Add", ["b", "xc"], ["Y"])]
    m = _model(nodes, [_t("wa", 8, 8, 1, 1), _t("cst", 1, 8, 1, 1), _t("wb", 8, 8, 1, 1)],
               ["N", 8, 3, 3], ["N", 8, 3, 3])
    st = REGISTRY["width"].generate(m, CandidateSpec("width", 0.5))
    assert sorted(get_array(st.model, n.input[1]).shape for n in st.model.graph.node if n.op_type == "Add"
                  and n.input[1].startswith("cst")) == [(1, 4, 1, 1), (1, 8, 1, 1)]
    assert st.params == 32 + 4 + 8 + 32
    _check_student(m, st.model)
    _check_student(m, width.shrink(m, 1.0)[0], exact=True)


def test_gelu_op_and_relu_ffn_shrink():
    for act in ("Gelu", "Relu"):
        opset = 20 if act == "Gelu" else 13
        nodes = [helper.make_node("MatMul", ["X", "w1"], ["h"]), helper.make_node("Add", ["b1", "h"], ["hb"]),
                 helper.make_node(act, ["hb"], ["g"]), helper.make_node("MatMul", ["g", "w2"], ["o"]),
                 helper.make_node("Add", ["o", "X"], ["Y"])]
        m = _model(nodes, [_t("w1", 6, 12), _t("b1", 12), _t("w2", 12, 6)], ["N", 4, 6], ["N", 4, 6], opset=opset)
        st = REGISTRY["width"].generate(m, CandidateSpec("width", 0.5))
        assert st.params == 6 * 6 + 6 + 6 * 6
        _check_student(m, st.model)  # Gelu-20: ndonnx.converters supplies the torch converter
        _check_student(m, width.shrink(m, 1.0)[0], exact=True)


def test_width_rules_are_a_table_by_op_type(monkeypatch):
    # Atan treats channels independently but has no rule: it blocks the group until it gets one
    nodes = [helper.make_node("Conv", ["X", "wa"], ["a"], name="ca"), helper.make_node("Atan", ["a"], ["t"]),
             helper.make_node("Conv", ["t", "wb"], ["Y"])]
    m = _model(nodes, [_t("wa", 8, 4, 1, 1), _t("wb", 4, 8, 1, 1)], ["N", 4, 5, 5], ["N", 4, 5, 5])
    with pytest.raises(NotApplicable, match="ca enters Atan"):
        width.shrink(m, 0.5)
    monkeypatch.setitem(width.RULES, "Atan", width.RULES["Relu"])
    st = REGISTRY["width"].generate(m, CandidateSpec("width", 0.5))
    assert get_array(st.model, "wa").shape == (4, 4, 1, 1) and get_array(st.model, "wb").shape == (4, 4, 1, 1)
    onnx.checker.check_model(st.model, full_check=True)
    full = width.shrink(m, 1.0)[0]
    np.testing.assert_allclose(ort_session(full).run(None, _feeds(m))[0], ort_session(m).run(None, _feeds(m))[0],
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="already has a width rule"):
        width.rule("Relu")(lambda a, i, node: None)


# --- low rank --------------------------------------------------------------------------------------

def test_lowrank_on_a_known_conv(built):
    st = student(built, "resnet_legacy", 1, "lowrank:0.25")
    convs = [n for n in st.model.graph.node if n.op_type == "Conv"]
    shapes = [get_array(st.model, n.input[1]).shape for n in convs]
    # rank round(0.25 * min(8, 8*3*3)) = 2: 3x3 conv to 2 channels, then 1x1 back to 8 (with the bias)
    assert shapes == [(2, 8, 3, 3), (8, 2, 1, 1)] * 2
    assert st.params == 2 * (2 * 72 + 8 * 2 + 8) == 336


@pytest.mark.parametrize("name,nbh", [("resnet_legacy", 3), ("resnet_legacy", 4), ("mobilenet", 2), ("encoder", 1),
                                      ("encoder", 2)])
def test_lowrank_full_rank_reproduces_the_teacher(blocks, name, nbh):
    sample, subs = blocks[name]
    model, factored = lowrank.factor(subs[nbh], 1.0, only_if_smaller=False)
    assert factored
    onnx.checker.check_model(model, full_check=True)
    got = ort_run(model, sample.values)
    for o in subs[nbh].graph.output:
        assert rel_err(got[o.name], sample.values[o.name]) <= 1e-4


def test_lowrank_factors_only_when_it_saves():
    nodes = [helper.make_node("Conv", ["X", "w"], ["Y"])]  # 1x1, 4 -> 4: rank 3 costs 24 > 16
    m = _model(nodes, [_t("w", 4, 4, 1, 1)], ["N", 4, 3, 3], ["N", 4, 3, 3])
    with pytest.raises(NotApplicable):
        REGISTRY["lowrank"].generate(m, CandidateSpec("lowrank", 0.75))
    assert REGISTRY["lowrank"].generate(m, CandidateSpec("lowrank", 0.25)).params == 4 + 4


# --- sparse ----------------------------------------------------------------------------------------

def test_sparse_student_counts(built, blocks):
    st = student(built, "resnet_legacy", 3, "sparse:0.5")
    teacher = student(built, "resnet_legacy", 3, "teacher")
    assert st.params == teacher.params and st.sparsity == 0.5
    sizes = {n: get_array(st.model, n).size for n in st.prunable}
    assert sorted(sizes.values()) == [16 * 8, 16 * 8 * 9, 16 * 16 * 9]  # conv weights, biases excluded
    assert st.nonzero == st.params - sum(sparse.pruned_count(v, 0.5) for v in sizes.values())
    assert [n.op_type for n in st.model.graph.node] == [n.op_type for n in blocks["resnet_legacy"][1][3].graph.node]


def test_zhu_gupta_schedule():
    zg = sparse.zhu_gupta
    assert zg(0, 100, 0.8) == 0.0 and zg(100, 100, 0.8) == 0.8 and zg(150, 100, 0.8) == 0.8
    assert zg(0, 100, 0.8, s_init=0.1) == 0.1
    values = [zg(t, 100, 0.9, begin=10, end=60) for t in range(101)]
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert values[10] == 0.0 and values[60] == 0.9 and values[5] == 0.0
    assert values[35] == pytest.approx(0.9 * (1 - 0.5 ** 3))


def test_magnitude_masks_numpy_and_torch():
    w = np.array([[0.1, -3.0, 0.2], [2.0, -0.05, 1.0]], np.float32)
    m = sparse.magnitude_masks({"w": w, "t": torch.from_numpy(w)}, 0.5)
    np.testing.assert_array_equal(m["w"], [[False, True, False], [True, False, True]])
    assert m["t"].dtype == torch.bool and m["t"].numpy().tolist() == m["w"].tolist()
    assert sparse.magnitude_masks({"w": w}, 0.0)["w"].all()
    big = np.random.default_rng(0).standard_normal(1000)
    assert (~sparse.magnitude_masks({"b": big}, 0.8)["b"]).sum() == 800


# --- identity --------------------------------------------------------------------------------------

def test_identity_outputs_the_skip_path(blocks, built):
    sample, subs = blocks["resnet_legacy"]
    st = student(built, "resnet_legacy", 1, "identity")
    out = subs[1].graph.output[0].name
    relu_in = next(n for n in subs[1].graph.node if n.op_type == "Relu").output[0]
    np.testing.assert_array_equal(ort_run(st.model, sample.values)[out], sample.values[relu_in])
    enc = student(built, "encoder", 1, "identity")  # attention dropped: the side input stays, unread
    assert [n.op_type for n in enc.model.graph.node] == ["Identity"] and enc.params == 0
    assert len(enc.model.graph.input) == 2
    with pytest.raises(NotApplicable):
        identity.skip_student(subs[0])  # the stem
    with pytest.raises(NotApplicable):
        identity.skip_student(subs[3])  # projection shortcut


# --- registry, parsing, building -------------------------------------------------------------------

def test_parse_candidates_ranges_and_order():
    specs = parse_candidates("width:0.1-0.9/0.1,lowrank:0.5,sparse:0.8,identity,teacher")
    assert [str(s) for s in specs] == [f"width:{v / 10:g}" for v in range(1, 10)] + \
        ["lowrank:0.5", "sparse:0.8", "identity", "teacher"]
    assert specs[2].value == 0.3  # no float noise
    assert [str(s) for s in parse_candidates("width:0.25-1/0.25, width:0.5")] == \
        ["width:0.25", "width:0.5", "width:0.75", "width:1"]
    assert [str(s) for s in parse_candidates("sparse:0,sparse:0.2-0.5/0.2")] == ["sparse:0", "sparse:0.2", "sparse:0.4"]
    assert len(parse_candidates(DEFAULT_CANDIDATES)) == 9


@pytest.mark.parametrize("text,match", [
    ("depth:0.5", "unknown family"), ("width:0", r"\(0, 1\]"), ("width:1.5", r"\(0, 1\]"),
    ("sparse:1", r"\[0, 1\)"), ("lowrank", "needs a value"), ("identity:0.5", "takes no value"),
    ("width:abc", "not a number"), ("width:0.9-0.1/0.1", "below its start"), ("width:0.1-0.9/0", "positive"),
    ("", "no candidates"), ("width:0.5,,teacher", "empty entry"), ("width:nan", "finite"),
    ("width:0.5/0.1", "lo-hi/step"), ("width:0.1-0.9/0.3,width:0-0.5/0.1", r"got 0\b"),
])
def test_parse_candidates_errors(text, match):
    with pytest.raises(NdonnxError, match=match) as e:
        parse_candidates(text)
    assert "\n" not in str(e.value)


def test_register_refuses_a_duplicate():
    before = list(REGISTRY)
    with pytest.raises(NdonnxError, match="already registered"):
        register("width")(lambda sub, spec: None)
    assert list(REGISTRY) == before  # unchanged, in import order (later families append to it)
    assert before[:6] == ["teacher", "width", "lowrank", "sparse", "identity", "heads"] and "vocab" in before


def test_build_candidates_deduplicates_and_explains(blocks):
    sub = blocks["resnet_legacy"][1][1]
    students, reasons = build_candidates(sub, parse_candidates("width:0.5,width:0.52,width:1,sparse:0,lowrank:1"))
    assert [str(s.spec) for s in students] == ["teacher", "width:0.5"]  # teacher first though not asked for
    assert reasons["width:0.52"].startswith("same size as width:0.5")
    assert "removes no channel" in reasons["width:1"]
    assert "same size as the teacher" in reasons["sparse:0"]
    assert "saves parameters" in reasons["lowrank:1"]


def test_importance_is_separate_and_normalised():
    a = np.array([[1.0, 1.0], [5.0, 5.0], [2.0, 2.0]])
    np.testing.assert_array_equal(keep_indices(group_l1([(a, 0)]), 2), [1, 2])
    b = 100 * np.array([[3.0], [0.1], [3.0]])  # a coupled producer with much larger weights
    assert keep_indices(np.abs(a).sum(1) + np.abs(b).sum(1), 2).tolist() == [0, 2]  # raw sums: b decides
    np.testing.assert_array_equal(keep_indices(group_l1([(a, 0), (b, 0)]), 2), [1, 2])  # normalised: both
    assert keep_indices(np.array([1.0, 1.0, 1.0]), 2).tolist() == [0, 1]


def test_identity_accepts_sum_and_differently_named_batch_dims():
    # Caffe2-era exports write the residual as Sum; exporters name the batch dim per tensor
    nodes = [helper.make_node("Conv", ["X", "w"], ["c"]), helper.make_node("Sum", ["X", "c"], ["Y"])]
    m = _model(nodes, [_t("w", 4, 4, 1, 1)], ["N", 4, 3, 3], ["M", 4, 3, 3])
    st = REGISTRY["identity"].generate(m, CandidateSpec("identity"))
    assert [n.op_type for n in st.model.graph.node] == ["Identity"]
    np.testing.assert_array_equal(_check_student(m, st.model)[0], _feeds(m)["X"])


def test_students_of_an_ir3_teacher_are_valid():
    # IR 3 wants initializers listed as inputs too; blocks extracted from such teachers do not
    m = _bn_block()
    m.ir_version = 3
    for spec in ("width:0.5", "lowrank:0.25", "sparse:0.5", "identity"):
        st = REGISTRY[spec.split(":")[0]].generate(m, parse_candidates(spec)[0])
        assert st.model.ir_version == 4
        onnx.checker.check_model(st.model, full_check=True)


def _dead(name, channels, *shape):
    a = RNG.standard_normal(shape).astype(np.float32)
    a[channels] = 0
    return numpy_helper.from_array(a, name)


def _c2f(split_how: str):
    """A YOLOv8 C2f block: relu(conv(X)) [8] split in two, the second piece through a residual conv,
    the three concatenated into the last conv. Dead channels: 1, 3 of the first piece, 0, 1 of the
    second and of the residual conv (a piece scored at the wrong offset keeps live ones)."""
    opset = {"attribute": 11, "num_outputs": 18}.get(split_how, 13)
    if split_how == "attribute":
        split = helper.make_node("Split", ["r"], ["y0", "y1"], axis=1, split=[4, 4])
    elif split_how == "input":
        split = helper.make_node("Split", ["r", "sizes"], ["y0", "y1"], axis=1)
    elif split_how == "num_outputs":
        split = helper.make_node("Split", ["r"], ["y0", "y1"], axis=1, num_outputs=2)
    else:  # equal parts, nothing said
        split = helper.make_node("Split", ["r"], ["y0", "y1"], axis=1)
    nodes = [helper.make_node("Conv", ["X", "wa", "ba"], ["a"], name="cv1"), helper.make_node("Relu", ["a"], ["r"]), split,
             helper.make_node("Conv", ["y1", "wm", "bm"], ["m"]), helper.make_node("Relu", ["m"], ["rm"]),
             helper.make_node("Add", ["y1", "rm"], ["z"]), helper.make_node("Concat", ["y0", "y1", "z"], ["j"], axis=1),
             helper.make_node("Conv", ["j", "wc"], ["Y"])]
    inits = [_dead("wa", [1, 3, 4, 5], 8, 4, 1, 1), _dead("ba", [1, 3, 4, 5], 8), _dead("wm", [0, 1], 4, 4, 3, 3),
             _dead("bm", [0, 1], 4), _t("wc", 4, 12, 1, 1)]
    if split_how == "input":
        inits.append(numpy_helper.from_array(np.array([4, 4], np.int64), "sizes"))
    nodes[3].attribute.append(helper.make_attribute("pads", [1, 1, 1, 1]))
    return _model(nodes, inits, ["N", 4, 5, 5], ["N", 4, 5, 5], opset=opset)


@pytest.mark.parametrize("split_how", ["input", "attribute", "equal", "num_outputs"])
def test_split_pieces_shrink_at_their_offsets(split_how):
    m = _c2f(split_how)
    _check_student(m, width.shrink(m, 1.0)[0], exact=True)
    st = REGISTRY["width"].generate(m, CandidateSpec("width", 0.5))
    # cv1 keeps rows 0, 2 (first piece) and 6, 7 (second, coupled with the residual conv's 2, 3)
    np.testing.assert_array_equal(get_array(st.model, "wa"), get_array(m, "wa")[[0, 2, 6, 7]])
    np.testing.assert_array_equal(get_array(st.model, "wm"), get_array(m, "wm")[2:, 2:])
    np.testing.assert_array_equal(get_array(st.model, "wc"), get_array(m, "wc")[:, [0, 2, 6, 7, 10, 11]])
    split = next(n for n in st.model.graph.node if n.op_type == "Split")
    sizes = helper.get_attribute_value(next(a for a in split.attribute if a.name == "split")) \
        if split_how == "attribute" else get_array(st.model, split.input[1]).tolist()
    assert list(sizes) == [2, 2] and "num_outputs" not in [a.name for a in split.attribute]
    np.testing.assert_allclose(_check_student(m, st.model)[0], ort_session(m).run(None, _feeds(m))[0], rtol=1e-5, atol=1e-5)
    students, _ = build_candidates(m, parse_candidates("width:0.5"), strict=True, feeds=_feeds(m))
    assert [str(s.spec) for s in students] == ["teacher", "width:0.5"]


def test_split_of_a_group_that_reaches_the_output_blocks_its_pieces():
    nodes = [helper.make_node("Conv", ["X", "wa"], ["Y"], name="cv1"), helper.make_node("Relu", ["Y"], ["r"]),
             helper.make_node("Split", ["r"], ["y0", "y1"], axis=1), helper.make_node("Add", ["y0", "y1"], ["s"]),
             helper.make_node("Conv", ["s", "wb"], ["Z"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 4, 5, 5])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 8, 5, 5]),
                           helper.make_tensor_value_info("Z", TensorProto.FLOAT, ["N", 4, 5, 5])],
                          [_t("wa", 8, 4, 1, 1), _t("wb", 4, 4, 1, 1)])
    m = onnx.shape_inference.infer_shapes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]))
    groups = width.channel_groups(m)
    pieces = [grp for grp in groups if grp.size == 4 and any(p.node == 0 for p in grp.producers)]
    assert pieces and all(any("is split from a group that reaches the output 'Y'" in b for b in grp.blocked) for grp in pieces)
    with pytest.raises(NotApplicable, match="no shrinkable"):
        width.shrink(m, 0.5)


def test_split_of_another_axis_passes_the_group():
    nodes = [helper.make_node("Conv", ["X", "wa", "ba"], ["a"]), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Split", ["r"], ["h0", "h1"], axis=2), helper.make_node("Add", ["h0", "h1"], ["s"]),
             helper.make_node("Conv", ["s", "wc"], ["Y"])]
    m = _model(nodes, [_half_dead("wa", 8, 4, 1, 1), _half_dead("ba", 8), _t("wc", 4, 8, 1, 1)],
               ["N", 4, 6, 5], ["N", 4, 3, 5])
    st = REGISTRY["width"].generate(m, CandidateSpec("width", 0.5))
    assert get_array(st.model, "wc").shape == (4, 4, 1, 1)
    np.testing.assert_allclose(_check_student(m, st.model)[0], ort_session(m).run(None, _feeds(m))[0], rtol=1e-5, atol=1e-5)


def test_chunk_slices_are_pieces(tmp_path):
    """torch's `chunk` as its legacy exporter writes it (two Slices sharing a bound, folded to
    constants on loading): the halves are pieces coupled by the gate's Mul, and the student's
    Slices cut at the new offsets."""
    import models
    from ndonnx.graph import load_teacher

    t = load_teacher(models.chunk_gate(tmp_path / "gate.onnx"))
    m = onnx.shape_inference.infer_shapes(t.model)
    st = REGISTRY["width"].generate(m, CandidateSpec("width", 0.5))
    bounds = sorted((get_array(st.model, n.input[1]).tolist(), get_array(st.model, n.input[2]).tolist())
                    for n in st.model.graph.node if n.op_type == "Slice")
    assert bounds == [([0], [2]), ([2], [4])]
    assert get_array(st.model, "c1.weight").shape == (4, 3, 1, 1) and get_array(st.model, "c2.weight").shape == (4, 2, 3, 3)
    feeds = {"input": np.random.default_rng(0).standard_normal((3, 3, 6, 6)).astype(np.float32)}
    students, _ = build_candidates(m, parse_candidates("width:0.5"), strict=True, feeds=feeds)  # checked, zeroed teacher
    assert [str(s.spec) for s in students] == ["teacher", "width:0.5"]


@pytest.mark.parametrize("bounds", [(0, 6), (2, 8)])
def test_slices_that_do_not_tile_the_channels_block(bounds):
    # a Ghost-style x[:, :6] (or x[:, 2:]) of 8 channels: the dropped channels are the model's, not ours
    nodes = [helper.make_node("Conv", ["X", "wa"], ["a"], name="ca"),
             helper.make_node("Slice", ["a", "s", "e", "ax"], ["j"]), helper.make_node("Conv", ["j", "wc"], ["Y"])]
    inits = [_t("wa", 8, 4, 1, 1), _t("wc", 4, 6, 1, 1), *(numpy_helper.from_array(np.array([v], np.int64), n)
                                                           for n, v in (("s", bounds[0]), ("e", bounds[1]), ("ax", 1)))]
    m = _model(nodes, inits, ["N", 4, 5, 5], ["N", 4, 5, 5])
    with pytest.raises(NotApplicable, match="ca enters Slice .*do not tile the channels"):
        width.shrink(m, 0.5)


def test_fused_gate_and_up_projection_split_shrinks():
    """A LLaMA-style FFN with its gate and up projections in one MatMul, split in two: silu(gate) * up
    couples the halves, so width shrinks both at the same kept rows, and the down projection."""
    nodes = [helper.make_node("MatMul", ["X", "wgu"], ["gu"]), helper.make_node("Split", ["gu", "sz"], ["g", "u"], axis=-1),
             helper.make_node("Sigmoid", ["g"], ["sg"]), helper.make_node("Mul", ["g", "sg"], ["silu"]),
             helper.make_node("Mul", ["silu", "u"], ["h"]), helper.make_node("MatMul", ["h", "wd"], ["d"]),
             helper.make_node("Add", ["X", "d"], ["Y"])]
    wgu = RNG.standard_normal((6, 16)).astype(np.float32)
    wgu[:, [1, 3, 5, 7]] = 0  # dead gate rows: silu(0) * up = 0, whatever the up row
    m = _model(nodes, [numpy_helper.from_array(wgu, "wgu"), numpy_helper.from_array(np.array([8, 8], np.int64), "sz"),
                       _t("wd", 8, 6)], ["N", 5, 6], ["N", 5, 6])
    _check_student(m, width.shrink(m, 1.0)[0], exact=True)
    st = REGISTRY["width"].generate(m, CandidateSpec("width", 0.5))
    assert get_array(st.model, "wgu").shape == (6, 8) and get_array(st.model, "wd").shape == (4, 6)
    assert st.params == 6 * 8 + 4 * 6
    np.testing.assert_allclose(_check_student(m, st.model)[0], ort_session(m).run(None, _feeds(m))[0], rtol=1e-5, atol=1e-5)
    students, _ = build_candidates(m, parse_candidates("width:0.5"), strict=True, feeds=_feeds(m))
    assert [str(s.spec) for s in students] == ["teacher", "width:0.5"]


def test_width_students_make_up_for_the_dropped_channels_mean():
    """Dropped channels after a ReLU added a positive mean to the next conv's output: build_candidates
    puts it into that conv's bias (measured on the sample inputs), and the student comes closer to
    the teacher on other inputs too."""
    nodes = [helper.make_node("Conv", ["X", "wa", "ba"], ["a"]), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Conv", ["r", "wb", "bb"], ["Y"])]
    rng = np.random.default_rng(3)  # its own: the module's generator depends on which tests ran before
    w = {n: numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), n)
         for n, shape in (("wa", (8, 4, 1, 1)), ("wb", (4, 8, 1, 1)), ("bb", (4,)))}
    ba = numpy_helper.from_array(np.full(8, 1.0, np.float32), "ba")  # every channel well above zero on average
    m = _model(nodes, [w["wa"], ba, w["wb"], w["bb"]], ["N", 4, 5, 5], ["N", 4, 5, 5])
    plain = REGISTRY["width"].generate(m, CandidateSpec("width", 0.5)).model
    students, _ = build_candidates(m, parse_candidates("width:0.5"), strict=True, feeds=_feeds(m))
    refit = students[1].model
    assert not np.array_equal(get_array(refit, "bb"), get_array(plain, "bb"))
    other = {"X": np.random.default_rng(7).standard_normal((16, 4, 5, 5)).astype(np.float32)}
    want = ort_session(m).run(None, other)[0]
    err = lambda model: float(((ort_session(model).run(None, other)[0] - want) ** 2).mean())  # noqa: E731
    assert err(refit) < 0.8 * err(plain)


def _redundant(shape_in: tuple, axis: int, rng) -> np.ndarray:
    """A producer weight whose outputs 4..7 are half of outputs 0..3 (along `axis`): after a ReLU the
    dropped half is exactly half the kept half, so refitting the next op can restore it exactly.
    Outputs 0..3 have the same L1 norm, twice that of 4..7: width 0.5 keeps them."""
    w = rng.standard_normal(shape_in).astype(np.float32)
    w /= np.abs(w).sum(axis=tuple(a for a in range(w.ndim) if a != axis), keepdims=True)
    index = [slice(None)] * w.ndim
    index[axis] = slice(4, 8)
    source = [slice(None)] * w.ndim
    source[axis] = slice(0, 4)
    w[tuple(index)] = 0.5 * w[tuple(source)]
    return w


@pytest.mark.parametrize("op", ["Conv", "MatMul", "Gemm"])
def test_width_students_fold_the_dropped_channels_into_the_kept_ones(op):
    """The dropped channels are linear in the kept ones (here exactly half of them): `refit` regresses
    them on the kept ones over the fit inputs and folds their weights into the kept rows (W_kept +=
    A W_dropped; for a Conv, each tap's), so the student computes the teacher again on other inputs,
    where the bias correction alone cannot."""
    rng = np.random.default_rng(5)
    if op == "Conv":
        wa, wb = _redundant((8, 4, 1, 1), 0, rng), rng.standard_normal((4, 8, 3, 3)).astype(np.float32)
        nodes = [helper.make_node("Conv", ["X", "wa", "ba"], ["a"]), helper.make_node("Relu", ["a"], ["r"]),
                 helper.make_node("Conv", ["r", "wb", "bb"], ["Y"], pads=[1, 1, 1, 1])]
        shape, bias = ["N", 4, 6, 6], "bb"
    elif op == "MatMul":
        wa, wb = _redundant((4, 8), 1, rng), rng.standard_normal((8, 4)).astype(np.float32)
        nodes = [helper.make_node("MatMul", ["X", "wa"], ["m"]), helper.make_node("Add", ["m", "ba"], ["a"]),
                 helper.make_node("Relu", ["a"], ["r"]), helper.make_node("MatMul", ["r", "wb"], ["d"]),
                 helper.make_node("Add", ["d", "bb"], ["Y"])]
        shape, bias = ["N", 5, 4], "bb"
    else:
        wa, wb = _redundant((8, 4), 0, rng), rng.standard_normal((4, 8)).astype(np.float32)
        nodes = [helper.make_node("Gemm", ["X", "wa", "ba"], ["a"], transB=1), helper.make_node("Relu", ["a"], ["r"]),
                 helper.make_node("Gemm", ["r", "wb", "bb"], ["Y"], transB=1)]
        shape, bias = ["N", 4], "bb"
    ba = np.full(8, 0.2, np.float32)
    ba[4:] = 0.1  # half of the kept channels' bias too: a ReLU of half is half the ReLU
    inits = [numpy_helper.from_array(a, n) for a, n in ((wa, "wa"), (ba, "ba"), (wb, "wb"),
                                                          (rng.standard_normal(4).astype(np.float32), bias))]
    m = _model(nodes, inits, shape, shape)
    data = lambda n, seed: {"X": np.random.default_rng(seed).standard_normal([n, *shape[1:]]).astype(np.float32)}  # noqa: E731
    plain = REGISTRY["width"].generate(m, CandidateSpec("width", 0.5)).model
    students, _ = build_candidates(m, parse_candidates("width:0.5"), strict=True, feeds=data(2, 0), fit=(data(64, 1), data(16, 2)))
    fitted = students[1].model
    assert get_array(fitted, "wb").shape == get_array(plain, "wb").shape  # the same student, other weights
    other = data(32, 3)
    want = ort_session(m).run(None, other)[0]
    err = lambda model: float(((ort_session(model).run(None, other)[0] - want) ** 2).mean())  # noqa: E731
    assert err(plain) > 0.1 * float(want.var())
    assert err(fitted) < 1e-6 * err(plain)


@pytest.mark.parametrize("op", ["Conv", "MatMul", "Gemm"])
def test_lowrank_students_are_factored_for_the_inputs_they_see(op):
    """The op's inputs span only a few directions (here 3 of 12): the plain SVD spends its rank on
    the whole weight, `refit` on what those inputs reach (activation-aware SVD), so the rank-3 student
    computes the teacher again on other inputs of the same kind."""
    rng = np.random.default_rng(11)
    basis = rng.standard_normal((3, 12)).astype(np.float32)  # inputs live in a 3-dimensional subspace

    def data(n, seed):
        z = np.random.default_rng(seed).standard_normal((n * 16, 3)).astype(np.float32) @ basis
        return {"X": z.reshape(n, 4, 4, 12).transpose(0, 3, 1, 2).copy() if op == "Conv" else
                z.reshape(n * 16, 12) if op == "Gemm" else z.reshape(n, 16, 12)}

    w = rng.standard_normal((12, 12)).astype(np.float32)
    if op == "Conv":
        node, init, shape = helper.make_node("Conv", ["X", "w", "b"], ["Y"]), w.reshape(12, 12, 1, 1), ["N", 12, 4, 4]
    elif op == "MatMul":
        node, init, shape = helper.make_node("MatMul", ["X", "w"], ["Y"]), w, ["N", 16, 12]
    else:
        node, init, shape = helper.make_node("Gemm", ["X", "w", "b"], ["Y"], transB=1), w, ["N", 12]
    inits = [numpy_helper.from_array(init, "w"), numpy_helper.from_array(np.zeros(12, np.float32), "b")]
    m = _model([node], inits[:1] if op == "MatMul" else inits, shape, shape)
    st = REGISTRY["lowrank"].generate(m, CandidateSpec("lowrank", 0.25))  # rank 3 of 12
    fitted = st.refit(data(64, 1), data(8, 2))
    other = data(16, 3)
    want = ort_session(m).run(None, other)[0]
    err = lambda model: float(((ort_session(model).run(None, other)[0] - want) ** 2).mean())  # noqa: E731
    assert param_count(fitted) == st.params
    assert err(st.model) > 0.05 * float((want ** 2).mean())
    assert err(fitted) < 1e-4 * err(st.model)
