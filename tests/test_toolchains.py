"""Exports from other toolchains: shape arithmetic (HF-style legacy exports), `-1` dims, tensors
that do not follow the batch the usual way (flattened, batch-free, read for their shape only)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import models
from ndonnx.compress import CompressConfig, compress
from ndonnx.config import DistillConfig
from ndonnx.convert import extract, rel_err, round_trip
from ndonnx.data import load_data
from ndonnx.distill.cache import CacheReader, build_cache
from ndonnx.errors import NdonnxError
from ndonnx.graph import load_teacher
from ndonnx.partition import index_tensors, partition, shape_tensors
from ndonnx.sample import ort_session, run_sample, with_dynamic_batch
from ndonnx.splice import check, splice
from ndonnx_cli.main import main


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    d = tmp_path_factory.mktemp("bert")
    return models.bert_style(d / "bert.onnx")


def _feeds(batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, seq), np.int64)
    mask[::2, seq - 2:] = 0
    return {"input_ids": rng.integers(0, 60, (batch, seq)), "attention_mask": mask}


def _stable(teacher, part) -> set[str]:
    nodes = teacher.model.graph.node
    return set(teacher.input_names) | {n for nb in part.neighbourhoods for n in (*nb.inputs, *nb.outputs)} \
        | {o for i in part.outside_nodes for o in nodes[i].output}


def test_bert_style_cuts_at_every_sub_layer(bert):
    """Shape values from `input_ids.size()` reach every layer; read as data flow they left one
    neighbourhood for all layers. As shape-only edges: embedding, attention and feed-forward per layer, head."""
    t = load_teacher(bert)
    part = partition(t)
    nb = part.neighbourhoods
    assert len(nb) == 6
    ops = [n.op_types(t.model) for n in nb]
    assert [("Softmax" in o, "Erf" in o) for o in ops[1:5]] == [(True, False), (False, True)] * 2
    assert [n.shape_inputs for n in nb[1:5:2]] == [("input_ids",)] * 2  # attention reshapes take its shape
    assert all(n.shape_nodes for n in nb[1:5:2])
    assert all("/Mul_output_0" in n.side_inputs for n in nb[1:5:2])  # the attention mask, a side path
    every = sorted(i for n in nb for i in n.nodes) + list(part.outside_nodes)
    assert sorted(every) == list(range(len(t.model.graph.node)))  # shape nodes are copied, never moved
    assert all(set(n.shape_inputs) <= _stable(t, part) for n in nb)
    assert sum(n.params for n in nb) + part.outside_params == t.params


def test_teacher_pieces_round_trip_and_splice_exactly_at_new_shapes(bert):
    """Each piece converts exactly; the teacher rebuilt from its extracted pieces equals the file at a
    batch and sequence length the sample never saw (the shape arithmetic stays dynamic)."""
    t = load_teacher(bert)
    part = partition(t)
    sample = run_sample(t)
    assert all(round_trip(t, nbh, sample).convertible for nbh in part.neighbourhoods)
    pieces = {nbh.id: extract(t, nbh, sample) for nbh in part.neighbourhoods}
    spliced = splice(t.model, part, pieces)
    check(spliced)
    feeds = _feeds(5, 11)
    want = ort_session(t.model).run(None, feeds)[0]
    got = ort_session(spliced).run(None, feeds)[0]
    assert got.shape == (5, 16) and rel_err(got, want) < 1e-5


def test_shape_of_a_tensor_inside_another_block_stays_available(tmp_path):
    """Reshape in block 2 takes the shape of H, a tensor inside block 1: a student of block 1 may not
    keep H, so H becomes an output of block 1 (read for its shape by block 2): no dangling name after a splice."""
    rng = np.random.default_rng(0)
    w = [numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), f"W{k}") for k in range(3)]
    nodes = [
        helper.make_node("MatMul", ["X", "W0"], ["H"]), helper.make_node("Relu", ["H"], ["A"]),
        helper.make_node("Add", ["A", "X"], ["C1"]),  # a residual block: H lies inside it
        helper.make_node("MatMul", ["C1", "W1"], ["H2"]), helper.make_node("Shape", ["H"], ["S"]),
        helper.make_node("Reshape", ["H2", "S"], ["R"]), helper.make_node("Add", ["R", "C1"], ["C2"]),
        helper.make_node("MatMul", ["C2", "W2"], ["Y"]),
    ]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 4])], w)
    path = tmp_path / "inner_shape.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    t = load_teacher(path)
    assert "S" in shape_tensors(t.model, t.weights)
    part = partition(t)
    assert all(set(n.shape_inputs) <= _stable(t, part) for n in part.neighbourhoods)
    owner = next(n for n in part.neighbourhoods if any(t.model.graph.node[i].output[0] == "H" for i in n.nodes))
    reader = next(n for n in part.neighbourhoods if any(t.model.graph.node[i].output[0] == "R" for i in n.nodes))
    assert owner is reader or ("H" in owner.outputs and "H" in reader.shape_inputs)
    sample = run_sample(t)
    spliced = splice(t.model, part, {n.id: extract(t, n, sample) for n in part.neighbourhoods})
    check(spliced)
    x = {"X": np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)}
    np.testing.assert_allclose(ort_session(spliced).run(None, x)[0], ort_session(t.model).run(None, x)[0], rtol=1e-6)


def _ragged_encoder(tmp_path):
    """TF's sparse token batch as tf2onnx writes it (the USE-lite encoder's pattern): ids [N, T], -1 =
    padding; P = the (sentence, position) pairs of real tokens; per-token work on [tokens, D] rows
    between GatherND and ScatterND, so positions are read by every block."""
    rng = np.random.default_rng(0)
    d = 8
    w = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32) * 0.5, n)
         for n, s in (("E", (20, d)), ("W1", (d, d)), ("W2", (d, d)), ("W3", (d, d)))]
    consts = [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in (("zero", 0), ("D", [d]), ("one", [1]))]
    nodes = [
        helper.make_node("GreaterOrEqual", ["ids", "zero"], ["M"]), helper.make_node("NonZero", ["M"], ["NZ"]),
        helper.make_node("Transpose", ["NZ"], ["P"], perm=[1, 0]), helper.make_node("GatherND", ["ids", "P"], ["V"]),
        helper.make_node("Gather", ["E", "V"], ["EMB"]),  # [tokens, D]
        helper.make_node("Shape", ["ids"], ["SI"]), helper.make_node("Concat", ["SI", "D"], ["SD"], axis=0),
        helper.make_node("ConstantOfShape", ["SD"], ["Z"]),
        helper.make_node("ScatterND", ["Z", "P", "EMB"], ["X0"]),  # dense [N, T, D]
        helper.make_node("MatMul", ["X0", "W1"], ["H1"]), helper.make_node("Add", ["H1", "X0"], ["X1"]),
        helper.make_node("GatherND", ["X1", "P"], ["G"]), helper.make_node("MatMul", ["G", "W2"], ["H2"]),
        helper.make_node("Relu", ["H2"], ["R2"]), helper.make_node("ScatterND", ["Z", "P", "R2"], ["S2"]),
        helper.make_node("Add", ["S2", "X1"], ["X2"]), helper.make_node("ReduceSum", ["X2", "one"], ["POOL"], keepdims=0),
        helper.make_node("MatMul", ["POOL", "W3"], ["Y"]),
    ]
    g = helper.make_graph(nodes, "ragged", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", "T"])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", d])], [*w, *consts])
    path = tmp_path / "ragged.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_ragged_token_batch_positions_are_recomputed_not_cached(tmp_path):
    """The positions and ids of a ragged batch depend on the batch, so no neighbourhood boundary
    carries them: each neighbourhood that reads them recomputes them from the ids. With calibration
    data of one length (no padding) the rest caches as flattened tensors, and compress works."""
    t = load_teacher(_ragged_encoder(tmp_path))
    part = partition(t)
    assert {"P", "V", "M", "NZ"} <= set(index_tensors(t.model, t.weights, shape_tensors(t.model, t.weights), "ids"))
    boundaries = {n for nbh in part.neighbourhoods for n in nbh.feeds + nbh.outputs}
    assert not boundaries & {"P", "V", "M", "NZ"}
    assert len(part.neighbourhoods) >= 3
    assert all("ids" in nbh.inputs for nbh in part.neighbourhoods if "G" in
               {o for i in nbh.nodes for o in t.model.graph.node[i].output})
    ids = np.random.default_rng(1).integers(0, 20, (96, 6))
    np.savez(tmp_path / "ids.npz", ids=ids)
    out = tmp_path / "student.onnx"
    report = compress(t.path, tmp_path / "run", CompressConfig(
        distill=DistillConfig(candidates="lowrank:0.5,teacher", steps=5, batch=16, jobs=1), target="90%"),
        data_path=tmp_path / "ids.npz", output=out)
    assert report["params_student"] <= 0.9 * report["params_teacher"]
    student = onnx.load(str(out))
    check(student)
    padded = np.where(np.arange(9) < np.array([[9], [4], [7]]), np.arange(27).reshape(3, 9) % 20, -1)
    got = ort_session(student).run(None, {"ids": padded})[0]  # another length, with padding
    assert got.shape == (3, 8) and np.isfinite(got).all()


def test_compress_bert_style_with_data_and_data_free(bert, tmp_path):
    feeds = _feeds(120, 9, seed=3)
    np.savez(tmp_path / "tokens.npz", **feeds)
    cfg = DistillConfig(candidates="width:0.5,lowrank:0.25,identity,teacher", steps=15, batch=16, jobs=1)
    for data_free in (False, True):
        out = tmp_path / f"student_{data_free}.onnx"
        report = compress(bert, tmp_path / f"run_{data_free}",
                          CompressConfig(distill=DistillConfig(**{**cfg.__dict__, "data_free": data_free}), target="80%"),
                          data_path=tmp_path / "tokens.npz", output=out)
        assert report["params_student"] <= 0.8 * report["params_teacher"]
        student = onnx.load(str(out))
        check(student)
        assert [i.name for i in student.graph.input] == ["input_ids", "attention_mask"]
        got = ort_session(student).run(None, _feeds(3, 13))[0]  # another batch and length than the data's
        assert got.shape == (3, 16) and np.isfinite(got).all()


def _flat_graph(tmp_path):
    """X [N, 4] -> F = reshape(X, [-1, 2]) (two rows per sample), P = T[range(4)] (one for every
    sample), Y = relu(X) (to be read for its shape only)."""
    t = numpy_helper.from_array(np.arange(24, dtype=np.float32).reshape(8, 3), "T")
    consts = [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in
              (("two", [-1, 2]), ("one", 1), ("zero", 0), ("step", 1))]
    nodes = [
        helper.make_node("Reshape", ["X", "two"], ["F"]), helper.make_node("Shape", ["X"], ["SX"]),
        helper.make_node("Gather", ["SX", "one"], ["L"]), helper.make_node("Range", ["zero", "L", "step"], ["I"]),
        helper.make_node("Gather", ["T", "I"], ["P"]), helper.make_node("Relu", ["X"], ["Y"]),
    ]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in (("F", ["M", 2]), ("P", [4, 3]), ("Y", ["N", 4]))]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 4])], outs, [t, *consts])
    path = tmp_path / "flat.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


def test_cache_stores_flattened_batch_free_and_shape_only_tensors(tmp_path):
    t = load_teacher(_flat_graph(tmp_path))
    x = np.random.default_rng(0).standard_normal((30, 4)).astype(np.float32)
    np.savez(tmp_path / "d.npz", X=x)
    build_cache(t.model, ["X", "F", "P"], load_data(tmp_path / "d.npz", t), tmp_path / "c", seed=0,
                fingerprint="f", batch=8, shape_only=["Y"])
    r = CacheReader(tmp_path / "c")
    idx = np.array([2, 5, 17])
    np.testing.assert_allclose(r.read("F", idx), x[idx].reshape(-1, 2), atol=1e-2)
    np.testing.assert_array_equal(r.read("P", idx), np.arange(12, dtype=np.float32).reshape(4, 3))
    y = r.read("Y", idx)
    assert y.shape == (3, 4) and not any(y.strides)  # zero-stride: no memory behind it
    assert r.read("Y", np.arange(11)).shape == (11, 4)


def test_cache_refuses_positions_of_a_ragged_batch(tmp_path):
    """TF's sparse batches (tf2onnx: NonZero -> Transpose) give (sample, position) pairs: with two
    positives a row they even grow like a flattened tensor, but their values name batch rows."""
    nodes = [helper.make_node("Greater", ["X", "zero"], ["G"]), helper.make_node("NonZero", ["G"], ["NZ"]),
             helper.make_node("Transpose", ["NZ"], ["P"], perm=[1, 0])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("P", TensorProto.INT64, ["K", 2])],
                          [numpy_helper.from_array(np.array(0.0, np.float32), "zero")])
    path = tmp_path / "ragged.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    t = load_teacher(path)
    x = np.where(np.arange(4) < 2, 1.0, -1.0).astype(np.float32) * np.ones((30, 1), np.float32)
    np.savez(tmp_path / "d.npz", X=x)
    with pytest.raises(NdonnxError, match="depend on a sample's place in the batch"):
        build_cache(t.model, ["X", "P"], load_data(tmp_path / "d.npz", t), tmp_path / "c", seed=0,
                    fingerprint="f", batch=8)


def test_minus_one_dims_are_dynamic(zoo, tmp_path):
    """paddle2onnx declares dynamic dims as -1: read as symbolic, not as a fixed batch to refuse."""
    m = onnx.load(str(zoo["resnet_legacy"]))
    for vi in [*m.graph.input, *m.graph.output]:
        for j, d in enumerate(vi.type.tensor_type.shape.dim):
            if j != 1:
                d.dim_value = -1
    path = tmp_path / "minus_one.onnx"
    onnx.save(m, str(path))
    t = with_dynamic_batch(load_teacher(path))
    dims = t.model.graph.input[0].type.tensor_type.shape.dim
    assert [d.HasField("dim_param") for d in dims] == [True, False, True, True]
    assert len(partition(t).neighbourhoods) == 5


@pytest.fixture(scope="module")
def fpn(tmp_path_factory):
    return models.tiny_fpn(tmp_path_factory.mktemp("fpn") / "fpn.onnx")


def test_fpn_neck_is_cut_at_sets_of_tensors(fpn):
    """Every stage's output feeds the neck: no single tensor is on every path past the stem, so the
    chain alone left 60% of the parameters in one piece. Cut where few tensors are live, no piece
    holds more than a third, a stage's output reaches the neck across pieces, and the pieces round-trip
    and splice back exactly."""
    t = load_teacher(fpn)
    part = partition(t)
    nb = part.neighbourhoods
    assert max(n.params for n in nb) <= t.params / 3
    multi = [n for n in nb if len(n.inputs) > 1]
    assert multi and any(len(n.outputs) > 1 for n in nb)
    assert not all(part.feeds_next(k) for k in range(len(nb) - 1))
    produced = {o for n in nb for o in n.outputs} | {part.primary_input}
    assert all(set(n.inputs) <= produced for n in nb)
    every = sorted(i for n in nb for i in n.nodes) + list(part.outside_nodes)
    assert sorted(every) == list(range(len(t.model.graph.node)))
    assert sum(n.params for n in nb) + part.outside_params == t.params
    sample = run_sample(t)
    assert all(round_trip(t, n, sample).convertible for n in nb)
    spliced = splice(t.model, part, {n.id: extract(t, n, sample) for n in nb})
    check(spliced)
    x = {"input": np.random.default_rng(2).standard_normal((3, 3, 16, 16)).astype(np.float32)}
    assert rel_err(ort_session(spliced).run(None, x)[0], ort_session(t.model).run(None, x)[0]) < 1e-6


def test_compress_fpn_with_multi_tensor_boundaries(fpn, tmp_path):
    x = np.random.default_rng(4).standard_normal((96, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "images.npz", input=x)
    cfg = DistillConfig(candidates="width:0.5,lowrank:0.25,teacher", steps=15, batch=16, jobs=1, lookahead=1)
    out = tmp_path / "student.onnx"
    report = compress(fpn, tmp_path / "run", CompressConfig(distill=cfg, target="75%"),
                      data_path=tmp_path / "images.npz", output=out)
    assert report["params_student"] <= 0.75 * report["params_teacher"]
    student = onnx.load(str(out))
    check(student)
    assert report["validation"]["torch_rel_err"] < 1e-4
    assert ort_session(student).run(None, {"input": x[:5]})[0].shape == (5, 4, 16, 16)


def test_rnn_text_model_round_trips_trains_and_splices(tmp_path):
    """An opset-12 export with LSTM (bidirectional) and GRU: every piece converts exactly, the
    recurrent weights are trainable and written back, and the pieces splice back exactly."""
    from ndonnx.trainable import Trainable, write_weights

    t = load_teacher(models.lstm_tagger(tmp_path / "tagger.onnx"))
    part = partition(t)
    sample = run_sample(t)
    rnn = [n for n in part.neighbourhoods if {"LSTM", "GRU"} & n.op_types(t.model).keys()]
    assert rnn and all(round_trip(t, n, sample).convertible for n in part.neighbourhoods)
    for n in rnn:
        sub = extract(t, n, sample)
        tr = Trainable(sub)
        assert {w for w in tr.named_weights()} >= {i for node in sub.graph.node if node.op_type in ("LSTM", "GRU")
                                                     for i in node.input[1:3]}
        import torch
        with torch.no_grad():
            for p in tr.named_weights().values():
                p.mul_(0.5)
        changed = write_weights(sub, tr.weights())
        feeds = {i.name: sample.values[i.name] for i in sub.graph.input}
        assert rel_err(ort_session(changed).run(None, feeds)[0], sample.values[n.outputs[0]]) > 1e-3
    spliced = splice(t.model, part, {n.id: extract(t, n, sample) for n in part.neighbourhoods})
    check(spliced)
    ids = {"ids": np.random.default_rng(0).integers(0, 40, (4, 6))}
    assert rel_err(ort_session(spliced).run(None, ids)[0], ort_session(t.model).run(None, ids)[0]) < 1e-6


def test_inspect_runs_its_sample_on_given_data(bert, tmp_path, monkeypatch):
    """Some models need real inputs to run at all (audio longer than the random sample, a sample
    rate): `inspect --data` takes the sample from the data."""
    import ndonnx.inspection as inspection

    seen = []
    real = inspection.run_sample
    monkeypatch.setattr(inspection, "run_sample", lambda t, cfg, feeds=None: seen.append(feeds) or real(t, cfg, feeds))
    data = _feeds(4, 9)
    np.savez(tmp_path / "tokens.npz", **data)
    r = inspection.inspect_model(bert, data=tmp_path / "tokens.npz")
    assert all(n["convertible"] for n in r["neighbourhoods"])
    np.testing.assert_array_equal(seen[0]["input_ids"], data["input_ids"][:2])
    assert main(["inspect", str(bert), "--data", str(tmp_path / "nope.npz")]) == 2


def test_model_that_random_inputs_cannot_run_asks_for_data(tmp_path, capsys):
    """A reflect pad longer than the random sample's length (as in an STFT front end): a one-line
    error naming --data, exit 2; with data long enough, inspect runs."""
    pads = numpy_helper.from_array(np.array([0, 20, 0, 20], np.int64), "pads")
    w = numpy_helper.from_array(np.ones((70, 4), np.float32), "W")
    g = helper.make_graph([helper.make_node("Pad", ["X", "pads"], ["P"], mode="reflect"),
                           helper.make_node("MatMul", ["P", "W"], ["Y"])], "g",
                          [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", "S"])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 4])], [pads, w])
    path = tmp_path / "stft_like.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    assert main(["inspect", str(path), "--no-check"]) == 2
    err = capsys.readouterr().err
    assert "--data" in err and len(err.strip().splitlines()) == 1
    np.savez(tmp_path / "audio.npz", X=np.random.default_rng(0).standard_normal((3, 30)).astype(np.float32))
    assert main(["inspect", str(path), "--no-check", "--data", str(tmp_path / "audio.npz")]) == 0


def test_no_cut_at_an_expanded_inner_tensor(tmp_path):
    """Expand -> depthwise -> project without a skip: the dominator chain cuts at the expanded
    tensors, leaving three single-conv pieces with nothing to shrink. Those wider cuts are merged
    away: the block is one neighbourhood and its width student shrinks the expanded channels."""
    from ndonnx.candidates import build_candidates, parse_candidates

    t = load_teacher(models.plain_mobile(tmp_path / "plain.onnx"))
    part = partition(t)
    convs = [[t.model.graph.node[i] for i in n.nodes if t.model.graph.node[i].op_type == "Conv"]
             for n in part.neighbourhoods]
    assert [len(c) for c in convs] == [1, 3, 3, 3, 0]
    assert not {n.output[0] for n in convs[1][:2]} & {o for nb in part.neighbourhoods for o in nb.outputs}
    sample = run_sample(t)
    students, _ = build_candidates(extract(t, part.neighbourhoods[1], sample), parse_candidates("width:0.5"))
    assert any(str(st.spec) == "width:0.5" and st.params < part.neighbourhoods[1].params for st in students)


def test_look_ahead_crosses_multi_tensor_boundaries(fpn, tmp_path):
    """Look-ahead feeds the next pieces what this one makes and reads their other boundary tensors
    from the cache; data-free batches hold no other boundary, so there it stops where one is needed."""
    from dataclasses import replace as with_
    from pathlib import Path

    from ndonnx.distill.job import Job
    from ndonnx.distill.runner import _with_context

    part = partition(load_teacher(fpn))
    nb = part.neighbourhoods
    k = next(k for k in range(1, len(nb)) if len(nb[k].inputs) > 1 and set(nb[k].inputs) & set(nb[k - 1].outputs))
    subs = {n.id: Path(f"{n.id}.onnx") for n in nb}
    job = Job(neighbourhood=nb[k - 1].id, candidate="teacher", student="s", teacher="t", lookahead=(), cache="c",
              noise=None, sparsity=None, prunable=(), train=True, params=0, nonzero=0, weights_out="w", result_out="r")
    cfg = DistillConfig(lookahead=2)
    assert _with_context(job, part, subs, tmp_path, cfg).lookahead[0] == f"{nb[k].id}.onnx"
    assert _with_context(job, part, subs, tmp_path, with_(cfg, data_free=True)).lookahead == ()
