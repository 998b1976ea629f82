"""Embedding students: `lowrank:r` on an embedding table (Gather -> MatMul) and `vocab:k` (the rows
the calibration data uses, plus an unknown row, behind an id remap), on token-id teachers exported
with both torch exporters and on hand-made graphs; distilled and spliced through the real pipeline."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from ndonnx.candidates import NotApplicable, build_candidates, parse_candidates
from ndonnx.candidates.lowrank import factor
from ndonnx.candidates.onnx_edit import get_array, io_signature, param_count
from ndonnx.candidates.vocab import coverage
from ndonnx.convert import extract
from ndonnx.distill.layout import Layout
from ndonnx.graph import load_teacher, weight_counts
from ndonnx.partition import partition
from ndonnx.sample import ort_session, run_sample, with_dynamic_batch
from ndonnx.search import load_options
from ndonnx.splice import check, splice
from ndonnx.trainable import Trainable

sys.path.insert(0, str(Path(__file__).parent))
import models  # noqa: E402

VOCAB = {"bert_legacy": 60, "bert_dynamo": 60, "encoder_legacy": 50}
SEEN = 24  # calibration ids are drawn from [0, SEEN): the rest of each table is never used


def _ids(n: int, t: int = 7, seed: int = 0) -> np.ndarray:
    """Zipf-like token ids in [0, SEEN), as text gives them: a few ids are most of the tokens."""
    rng = np.random.default_rng(seed)
    return np.minimum(rng.zipf(1.6, size=(n, t)) - 1, SEEN - 1).astype(np.int64)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("embedding")
    (d / "dynamo").mkdir()
    return {"bert_legacy": models.bert_style(d / "bert_legacy.onnx"),
            "bert_dynamo": models.bert_style(d / "dynamo" / "bert_dynamo.onnx", dynamo=True),
            "encoder_legacy": models.tiny_encoder(d / "encoder_legacy.onnx")}


def _embedding_block(path: Path):
    """The neighbourhood holding the word-embedding lookup, as a sub-model, and its ids input."""
    t = with_dynamic_batch(load_teacher(path))
    part = partition(t)
    nbh = next(n for n in part.neighbourhoods if n.inputs[0] in t.input_names)
    sub = extract(t, nbh, run_sample(t))
    return t, part, nbh, sub, nbh.inputs[0]


def _run(model: onnx.ModelProto, ids: np.ndarray) -> np.ndarray:
    return ort_session(model).run(None, {model.graph.input[0].name: ids})[0]


@pytest.mark.parametrize("name", list(VOCAB))
def test_students_keep_the_ids_interface_and_full_rank_is_exact(teachers, name):
    t, _, nbh, sub, ids_name = _embedding_block(teachers[name])
    v, d = VOCAB[name], 16
    students, reasons = build_candidates(sub, parse_candidates("vocab:1,lowrank:0.5"), strict=True,
                                         sample={ids_name: _ids(64)})
    got = {str(s.spec): s for s in students}
    assert set(got) == {"teacher", "vocab:1", "lowrank:0.5"}, reasons
    for s in students:  # the ids stay the input: same name, int64, same dims
        assert io_signature(s.model) == io_signature(sub)
        (inp,) = [i for i in s.model.graph.input]
        assert inp.name == ids_name and inp.type.tensor_type.elem_type == TensorProto.INT64
    assert got["lowrank:0.5"].params == 8 * (v + d) < v * d  # R = round(0.5 * min(V, D))
    assert [n.op_type for n in got["lowrank:0.5"].model.graph.node] == ["Gather", "MatMul"]
    full, factored = factor(sub, 1.0, only_if_smaller=False)
    assert len(factored) == 1
    x = np.concatenate([_ids(8, seed=1), np.array([[v - 1, v - 2, 0, 1, 2, 3, 4]])])
    np.testing.assert_allclose(_run(full, x), _run(sub, x), rtol=1e-5, atol=1e-5)


def test_vocab_exact_on_seen_ids_and_unknown_row_for_the_rest(teachers):
    _, _, _, sub, ids_name = _embedding_block(teachers["bert_legacy"])
    calib = _ids(64)
    (_, st), _ = build_candidates(sub, parse_candidates("vocab:1"), strict=True, sample={ids_name: calib})
    seen = np.unique(calib)
    kept = len(seen)
    assert st.params == (kept + 1) * 16 and st.nonzero == st.params
    assert f"{kept} of 60 ids seen" in st.note and "covering 100.00% of 448 tokens" in st.note
    x = _ids(5, seed=3)  # seen ids only: the very rows of the teacher
    x = x[np.isin(x, seen).all(axis=1)]
    assert len(x) and np.array_equal(_run(st.model, x), _run(sub, x))
    table = get_array(sub, next(n for n in sub.graph.node if n.op_type == "Gather").input[0])
    unseen = np.setdiff1d(np.arange(60), seen)
    unknown = table[unseen].astype(np.float64).mean(axis=0)
    # an unseen id, and -1 (Gather reads it as 59, unseen): the mean of the rows not kept
    out = _run(st.model, np.array([[unseen[0], -1, seen[0]]]))
    np.testing.assert_allclose(out[0, :2], np.stack([unknown, unknown]), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out[0, 2], table[seen[0]])


def test_coverage_on_hand_made_ids():
    ids = np.array([[3, 3, 3, 1, 1, 2, -1]])  # -1 is id 4 of a 5-row table
    c = coverage(ids, 5, 0.4)  # at most 2 rows: the two most frequent
    assert (c.rows, c.seen, c.tokens, c.covered) == (5, 4, 7, 5) and c.kept.tolist() == [1, 3]
    assert c.fraction == pytest.approx(5 / 7)
    c = coverage(ids, 5, 0.6)  # 3 rows: ids 2 and 4 tie (once each), the lower id goes first
    assert c.kept.tolist() == [1, 2, 3] and c.covered == 6
    c = coverage(ids, 5, 1.0)  # every id seen, never more
    assert c.kept.tolist() == [1, 2, 3, 4] and c.fraction == 1.0
    c = coverage(ids, 5, 0.01)  # at least one row
    assert c.kept.tolist() == [3] and c.covered == 3
    with pytest.raises(NotApplicable, match="id 9, outside the table's 5 rows"):
        coverage(np.array([9]), 5, 1.0)


def _lookup_graph(*, cast: bool = False, table_input: bool = False, tied: bool = False) -> onnx.ModelProto:
    """ids -> (Cast) -> Gather(table [20, 6]) -> y; the table constant, a graph input, or also read
    by a MatMul (tied weights, as an output projection reads the embedding table)."""
    rng = np.random.default_rng(0)
    table = rng.standard_normal((20, 6)).astype(np.float32)
    ids_type = TensorProto.INT32 if cast else TensorProto.INT64
    inputs = [helper.make_tensor_value_info("ids", ids_type, ["N", 4])]
    nodes = [helper.make_node("Cast", ["ids"], ["ids64"], to=TensorProto.INT64)] if cast else []
    nodes.append(helper.make_node("Gather", ["table", "ids64" if cast else "ids"], ["y"], name="lookup", axis=0))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 6])]
    inits = [numpy_helper.from_array(table, "table")]
    if table_input:
        inputs.append(helper.make_tensor_value_info("table", TensorProto.FLOAT, [20, 6]))
        inits = []
    if tied:
        nodes.append(helper.make_node("MatMul", ["y", "table_t"], ["logits"]))
        nodes.insert(0, helper.make_node("Transpose", ["table"], ["table_t"]))
        outputs.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4, 20]))
    model = helper.make_model(helper.make_graph(nodes, "lookup", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_vocab_on_ids_computed_inside_and_where_it_does_not_apply():
    ids = np.array([[0, 1, 1, 2], [2, 2, 5, -20]])  # -20 is id 0
    # ids cast inside the neighbourhood: counted on the cast values, computed from its inputs
    model = _lookup_graph(cast=True)
    (_, st), _ = build_candidates(model, parse_candidates("vocab:1"), strict=True,
                                  sample={"ids": ids.astype(np.int32)})
    assert io_signature(st.model) == io_signature(model)
    assert "4 of 20 ids seen" in st.note and st.params == 5 * 6
    x = {"ids": ids.astype(np.int32)}
    assert np.array_equal(ort_session(st.model).run(None, x)[0], ort_session(model).run(None, x)[0])
    model = _lookup_graph()
    specs = parse_candidates("vocab:1")
    assert build_candidates(model, specs)[1] == {"vocab:1": "needs calibration data (--data) to build from"}
    why = lambda m, sample: build_candidates(m, specs, sample=sample, strict=True)[1]["vocab:1"]  # noqa: E731
    assert "not in the calibration sample" in why(model, {})
    assert "saves nothing" in why(model, {"ids": np.arange(20).reshape(5, 4)})
    assert "no embedding lookup" in why(_lookup_graph(table_input=True), {"ids": ids})
    assert "tied weights" in why(_lookup_graph(tied=True), {"ids": ids})
    # lowrank leaves a tied table alone too (the table would stay: nothing saved)
    assert factor(_lookup_graph(tied=True), 0.5)[1] == []
    assert factor(model, 0.5)[1] == ["lookup"]


def test_remap_is_no_parameter_and_not_trained():
    model = _lookup_graph()
    ids = np.array([[0, 1, 1, 2], [2, 2, 5, 7]])
    (_, st), _ = build_candidates(model, parse_candidates("vocab:1"), strict=True, sample={"ids": ids})
    counts = weight_counts(st.model)
    remap = next(i for i in st.model.graph.initializer if i.data_type == TensorProto.INT64)
    assert list(remap.dims) == [20] and remap.name not in counts
    assert list(counts.values()) == [(5 + 1) * 6] == [param_count(st.model)]
    tr = Trainable(st.model)
    assert tr.trainable == list(counts) and remap.name not in tr.frozen
    x = np.array([[0, 3, 7, 19]])
    with torch.no_grad():
        out = tr(torch.from_numpy(x))[0].numpy()
    np.testing.assert_array_equal(out, ort_session(st.model).run(None, {"ids": x})[0])


def test_distil_and_splice_through_the_pipeline(teachers, tmp_path, capsys):
    """`ndonnx distill --candidates vocab:1,lowrank:0.5,teacher` on the BERT-style export, then the
    trained students spliced in: the interface is the teacher's, the table is the kept rows."""
    from ndonnx_cli.main import main

    path = teachers["bert_legacy"]
    ids = _ids(96)
    mask = np.ones_like(ids)
    mask[::3, 5:] = 0
    np.savez(tmp_path / "calib.npz", input_ids=ids, attention_mask=mask)
    run = tmp_path / "run"
    assert main(["distill", str(path), "--data", str(tmp_path / "calib.npz"), "--run-dir", str(run),
                 "--candidates", "vocab:1,lowrank:0.5,teacher", "--steps", "4", "--batch", "8", "--jobs", "1"]) == 0
    assert "100.00%" in capsys.readouterr().out  # the note (covering 100.00% of the tokens) reaches the table
    rows = json.loads(Layout(run).candidates_json.read_text())
    t, part, nbh, _, _ = _embedding_block(path)
    voc = [r for r in rows if r["candidate"] == "vocab:1"]
    # exact on every id it keeps, so within the fit tolerance untrained, or trained
    assert [r["neighbourhood"] for r in voc] == [nbh.id] and voc[0]["status"] in ("trained", "fitted")
    train_ids = ids[np.load(Layout(run).cache / "train.npy")]  # counted on the training split only
    kept = len(np.unique(train_ids))
    assert voc[0]["params"] == (kept + 1) * 16
    assert f"{kept} of 60 ids seen" in voc[0]["note"] and f"of {train_ids.size} tokens" in voc[0]["note"]
    assert any(r["candidate"] == "lowrank:0.5" and r["neighbourhood"] == nbh.id and r["status"] == "trained"
               for r in rows)
    options = load_options(run, rows)
    chosen = {n: next(o.model for o in opts if o.candidate == "vocab:1") for n, opts in options.items()
              if any(o.candidate == "vocab:1" for o in opts)}
    chosen.update({n: next(o.model for o in opts if o.candidate == "lowrank:0.5") for n, opts in options.items()
                   if n not in chosen and any(o.candidate == "lowrank:0.5" for o in opts)})
    assert len(chosen) > 1
    declared = load_teacher(path).model
    spliced = splice(t.model, part, chosen)
    check(spliced)
    assert [(i.name, i.type) for i in spliced.graph.input] == [(i.name, i.type) for i in declared.graph.input]
    assert [(o.name, o.type) for o in spliced.graph.output] == [(o.name, o.type) for o in declared.graph.output]
    assert param_count(spliced) < param_count(t.model)
    shapes = {tuple(i.dims): i.data_type for i in spliced.graph.initializer}
    assert shapes[(60,)] == TensorProto.INT64 and shapes[(kept + 1, 16)] == TensorProto.FLOAT  # remap, kept rows
    assert (60, 16) not in shapes  # the word table is gone (positions: 32 rows, token types: 2)
    feeds = {"input_ids": np.array([[1, 2, 59, -1, 0, 3, 4]]), "attention_mask": np.ones((1, 7), np.int64)}
    out, ref = ort_session(spliced).run(None, feeds)[0], ort_session(t.model).run(None, feeds)[0]
    assert out.shape == ref.shape and np.isfinite(out).all()
    # the search under a budget the table's rows decide: the vocab student, its note in the report
    report = tmp_path / "report.json"
    target = str(param_count(t.model) - 60 * 16 + voc[0]["params"])
    assert main(["search", str(run), "--target-params", target, "-o", str(tmp_path / "s.onnx"),
                 "--report", str(report)]) == 0
    (first,) = [n for n in json.loads(report.read_text())["neighbourhoods"] if n["id"] == nbh.id]
    assert first["candidate"] == "vocab:1" and first["note"] == voc[0]["note"]
    assert voc[0]["note"].split(":")[0] in capsys.readouterr().out
