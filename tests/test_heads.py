"""heads:k - attention head pruning: the interface, equality with the same heads removed in torch,
keep-everything and refused patterns, and a distillation run that trains a head student."""

from __future__ import annotations

import copy
import json
import types

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import models
from ndonnx.candidates import NotApplicable, build_candidates, heads, parse_candidates
from ndonnx.candidates.importance import keep_indices
from ndonnx.convert import extract, rel_err, run_torch, to_torch
from ndonnx.graph import load_teacher
from ndonnx.partition import partition
from ndonnx.sample import ort_session, run_sample
from ndonnx.splice import splice
from ndonnx_cli.main import main

EXPORTS = {  # name -> (model, export keywords)
    "encoder_13": ("encoder", {"opset": 13}),
    "encoder_17": ("encoder", {"opset": 17}),
    "encoder_dynamo": ("encoder", {"dynamo": True}),
    "bert_13": ("bert", {"opset": 13, "dynamic_seq": True, "output_names": ("pooled",)}),
    "bert_17": ("bert", {"opset": 17, "dynamic_seq": True, "output_names": ("pooled",)}),
    "bert_dynamo": ("bert", {"dynamo": True, "output_names": ("pooled",)}),
}


def _inputs(kind: str):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 50, (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.bool if kind == "encoder" else torch.long)
    mask[1, 5:] = 0
    return ids, mask


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """name -> (torch module, exported path)."""
    out = {}
    for name, (kind, kw) in EXPORTS.items():
        d = tmp_path_factory.mktemp(name)
        torch.manual_seed(0)
        module = models.TinyEncoder() if kind == "encoder" else models.BertStyle()
        names = ("ids", "mask") if kind == "encoder" else ("input_ids", "attention_mask")
        out[name] = (module, models.export(module, _inputs(kind), d / f"{name}.onnx", input_names=names, **kw))
    return out


# --- the same heads removed in torch ------------------------------------------------------------

def _heads_kept(module: nn.Module, k: float) -> list[np.ndarray]:
    """Per layer, the heads heads:k keeps, scored here from the torch weights."""
    kept = []
    for layer in module.layers:
        d = layer.o.in_features if hasattr(layer, "o") else layer.out.in_features
        h = layer.h
        hd = d // h
        wv = layer.v.weight if hasattr(layer, "v") else layer.qkv.weight[2 * d:]
        wo = layer.o.weight if hasattr(layer, "o") else layer.out.weight
        score = heads.head_importance([wv[i * hd:(i + 1) * hd].detach().numpy() for i in range(h)],
                                      [wo[:, i * hd:(i + 1) * hd].detach().numpy() for i in range(h)])
        kept.append(keep_indices(score, max(1, round(k * h))))
    return kept


def _rows(keep, hd: int) -> list[int]:
    return [int(h) * hd + j for h in keep for j in range(hd)]


def _cut(linear: nn.Linear, rows=None, cols=None) -> nn.Linear:
    w, b = linear.weight.detach(), linear.bias.detach()
    w = w[rows] if rows is not None else w
    w = w[:, cols] if cols is not None else w
    new = nn.Linear(w.shape[1], w.shape[0])
    new.weight.data, new.bias.data = w.clone(), (b[rows] if rows is not None else b).clone()
    return new


def _encoder_forward(self, x, bias):
    """EncoderLayer.forward with the head dim kept (the original derives it from the width)."""
    b, t, _ = x.shape
    q, k, v = self.qkv(x).reshape(b, t, 3, self.h, self.hd).permute(2, 0, 3, 1, 4)
    att = torch.softmax(q @ k.transpose(-1, -2) / self.hd ** 0.5 + bias, -1)
    y = (att @ v).transpose(1, 2).reshape(b, t, self.h * self.hd)
    x = self.n1(x + self.out(y))
    return self.n2(x + self.ff2(nn.functional.gelu(self.ff1(x))))


def pruned(module: nn.Module, kept: list[np.ndarray]) -> nn.Module:
    """The torch module with the heads not in `kept` removed by slicing its Linear weights."""
    module = copy.deepcopy(module)
    for layer, keep in zip(module.layers, kept):
        if hasattr(layer, "qkv"):
            d = layer.out.in_features
            hd = d // layer.h
            layer.qkv = _cut(layer.qkv, rows=[s * d + r for s in range(3) for r in _rows(keep, hd)])
            layer.out = _cut(layer.out, cols=_rows(keep, hd))
            layer.h, layer.hd = len(keep), hd
            layer.forward = types.MethodType(_encoder_forward, layer)
        else:  # BertStyle: view(*shape, -1, hd) follows the head count by itself
            rows = _rows(keep, layer.hd)
            layer.q, layer.k, layer.v = (_cut(m, rows=rows) for m in (layer.q, layer.k, layer.v))
            layer.o = _cut(layer.o, cols=rows)
    return module.eval()


def _compare(model: onnx.ModelProto, module: nn.Module, kind: str) -> None:
    ids, mask = _inputs(kind)
    names = [i.name for i in model.graph.input]
    got = ort_session(model).run(None, dict(zip(names, (ids.numpy(), mask.numpy()))))[0]
    with torch.no_grad():
        want = module(ids, mask).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)


def _blocks(path):
    t = load_teacher(path)
    s = run_sample(t)
    part = partition(t)
    return t, part, [extract(t, n, s) for n in part.neighbourhoods]


@pytest.mark.parametrize("name", EXPORTS)
def test_neighbourhood_students_keep_the_interface_and_match_torch(teachers, name):
    module, path = teachers[name]
    kind = EXPORTS[name][0]
    t, part, subs = _blocks(path)
    kept, students = [], {}
    for nbh, sub in zip(part.neighbourhoods, subs):
        try:
            st, cores = heads.prune(sub, 0.5)
        except NotApplicable as e:
            assert "Softmax" in e.reason, (nbh.id, e.reason)  # only blocks without attention are refused
            continue
        for a, b in ((st.graph.input, sub.graph.input), (st.graph.output, sub.graph.output)):
            assert [(v.name, v.type) for v in a] == [(v.name, v.type) for v in b]
        kept += [c.kept for c in cores]
        students[nbh.id] = st
    want = _heads_kept(module, 0.5)
    assert len(students) == 2 and [k.tolist() for k in kept] == [k.tolist() for k in want]
    _compare(splice(t.model, part, students), pruned(module, want), kind)


@pytest.mark.parametrize("name", EXPORTS)
def test_whole_model_student_matches_torch(teachers, name):
    module, path = teachers[name]
    teacher = load_teacher(path).model
    student, cores = heads.prune(teacher, 0.5)
    want = _heads_kept(module, 0.5)
    assert [c.kept.tolist() for c in cores] == [k.tolist() for k in want]
    assert [c.heads for c in cores] == [2, 2]
    _compare(student, pruned(module, want), EXPORTS[name][0])


def test_students_convert_to_torch_and_count_fewer_parameters(teachers):
    _, _, subs = _blocks(teachers["encoder_13"][1])
    sub = subs[1]  # the first attention sub-layer
    students, reasons = build_candidates(sub, parse_candidates("heads:0.5,teacher"), strict=True)
    assert [str(s.spec) for s in students] == ["teacher", "heads:0.5"], reasons
    st = students[1]
    # d=16, 2 heads of 8: qkv 16x48+48 -> 16x24+24, output projection 16x16 -> 8x16 (bias kept)
    assert students[0].params - st.params == 16 * 24 + 24 + 8 * 16
    feeds = heads._runs(st.model)[0]
    names = [i.name for i in st.model.graph.input]
    want = ort_session(st.model).run(None, {n: feeds[n] for n in names})
    got = run_torch(to_torch(st.model), st.model, feeds)
    assert rel_err(got[0], want[0]) < 1e-5


# --- what is refused --------------------------------------------------------------------------------

def test_keeping_every_head_is_refused(teachers):
    _, _, subs = _blocks(teachers["bert_13"][1])
    sub = next(s for s in subs if any(n.op_type == "Softmax" for n in s.graph.node))
    _, reasons = build_candidates(sub, parse_candidates("heads:1,heads:0.75,heads:0.2,heads:0.5"))
    assert reasons["heads:1"] == "heads 1 keeps every head (2 heads)"
    assert reasons["heads:0.75"] == "heads 0.75 keeps every head (2 heads)"  # round(1.5) = 2
    assert reasons["heads:0.5"].startswith("same size as heads:0.2")  # both keep one head of two
    with pytest.raises(NotApplicable, match="keeps every head"):
        heads.generate(sub, parse_candidates("heads:1")[0])


def _attention_graph(folded: bool = False, fused: bool = False) -> onnx.ModelProto:
    """x [B, T, 8] -> 2 heads of 4: separate q/k/v MatMuls, scores of rank 4, or of rank 3 with the
    heads folded into the batch axis (nn.MultiheadAttention's layout); or one com.microsoft Attention."""
    rng = np.random.default_rng(0)
    w = lambda *s: numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), f"w{len(inits)}")
    inits, nodes = [], []

    def const(arr, name):
        inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 6, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 6, 8])
    if fused:
        inits += [w(8, 24), w(24)]
        nodes.append(helper.make_node("Attention", ["x", inits[0].name, inits[1].name], ["ctx"], domain="com.microsoft",
                                      num_heads=2))
        opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    else:
        split = [-1, 6, 2, 4]
        for r in "qkv":
            inits.append(w(8, 8))
            nodes.append(helper.make_node("MatMul", ["x", inits[-1].name], [f"{r}0"]))
            nodes.append(helper.make_node("Reshape", [f"{r}0", const(np.array(split, np.int64), f"s{r}")], [f"{r}1"]))
            nodes.append(helper.make_node("Transpose", [f"{r}1"], [f"{r}2"], perm=[0, 2, 1, 3]))
            if folded:  # [B, 2, 6, 4] -> [B*2, 6, 4]
                nodes.append(helper.make_node("Reshape", [f"{r}2", const(np.array([-1, 6, 4], np.int64), f"f{r}")],
                                              [f"{r}3"]))
            else:
                nodes.append(helper.make_node("Identity", [f"{r}2"], [f"{r}3"]))
        perm = [0, 2, 1] if folded else [0, 1, 3, 2]
        nodes += [helper.make_node("Transpose", ["k3"], ["kt"], perm=perm),
                  helper.make_node("MatMul", ["q3", "kt"], ["s"]),
                  helper.make_node("Softmax", ["s"], ["p"], axis=-1),
                  helper.make_node("MatMul", ["p", "v3"], ["c"])]
        if folded:
            nodes.append(helper.make_node("Reshape", ["c", const(np.array([-1, 2, 6, 4], np.int64), "unfold")], ["c1"]))
        else:
            nodes.append(helper.make_node("Identity", ["c"], ["c1"]))
        nodes += [helper.make_node("Transpose", ["c1"], ["c2"], perm=[0, 2, 1, 3]),
                  helper.make_node("Reshape", ["c2", const(np.array([0, 0, 8], np.int64), "merge")], ["ctx"])]
        opsets = [helper.make_opsetid("", 17)]
    inits.append(w(8, 8))
    nodes.append(helper.make_node("MatMul", ["ctx", inits[-1].name], ["y"]))
    return helper.make_model(helper.make_graph(nodes, "attention", [x], [y], inits), opset_imports=opsets)


def test_hand_built_attention_applies_and_folded_heads_are_refused():
    plain = _attention_graph()
    onnx.checker.check_model(plain, full_check=True)
    student, cores = heads.prune(plain, 0.5)
    assert len(cores) == 1 and cores[0].heads == 2 and len(cores[0].kept) == 1
    assert sum(numpy_helper.to_array(t).size for t in student.graph.initializer if t.name.startswith("w")) == 4 * 8 * 4
    with pytest.raises(NotApplicable, match="not of rank 4"):
        heads.prune(_attention_graph(folded=True), 0.5)
    with pytest.raises(NotApplicable, match="com.microsoft Attention"):
        heads.prune(_attention_graph(fused=True), 0.5)


def test_refusals_say_why(teachers):
    _, _, subs = _blocks(teachers["encoder_13"][1])
    with pytest.raises(NotApplicable, match="no attention"):
        heads.prune(subs[2], 0.5)  # the feed-forward sub-layer
    _, reasons = build_candidates(subs[2], parse_candidates("heads:0.5"))
    assert reasons == {"heads:0.5": "no attention (no Softmax)"}
    # a Q that is not a projection: q = relu(x), no weight to cut
    model = _attention_graph()
    q = next(n for n in model.graph.node if n.op_type == "MatMul" and n.output[0] == "q0")
    q.op_type, q.input[:] = "Relu", ["x"]
    with pytest.raises(NotApplicable, match="Q of attention .* comes from Relu"):
        heads.prune(model, 0.5)


def test_importance_is_value_times_output_norm():
    v = [np.ones((4, 2)), 2 * np.ones((4, 2))]
    o = [3 * np.ones((2, 4)), np.ones((2, 4))]
    np.testing.assert_allclose(heads.head_importance(v, o), [np.sqrt(8) * 3 * np.sqrt(8), 2 * np.sqrt(8) * np.sqrt(8)])


# --- end to end --------------------------------------------------------------------------------------

def test_distill_trains_a_head_student(teachers, tmp_path, capsys):
    path = teachers["encoder_13"][1]
    run = tmp_path / "run"
    argv = ["distill", str(path), "--data-free", "--run-dir", str(run), "--candidates", "heads:0.5,teacher",
            "--steps", "3", "--batch", "8", "--jobs", "1"]
    assert main(argv) == 0, capsys.readouterr().err
    rows = json.loads((run / "candidates.json").read_text())
    trained = {r["neighbourhood"]: r for r in rows if r["candidate"] == "heads:0.5"}
    assert sorted(trained) == [1, 3]  # the two attention sub-layers
    for r in trained.values():
        assert r["status"] == "trained" and np.isfinite(r["rel_mse"]), r
