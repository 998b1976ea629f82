"""Large models reach onnxruntime as light graphs (ndonnx.light): the same results as from their
serialized bytes, no copy of the weights in the caller, nothing left on disk."""

from __future__ import annotations

import glob
import os
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from ndonnx import light
from ndonnx.graph import load_teacher
from ndonnx.sample import ort_session, with_outputs


def _leftovers() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "ndonnx-light-*")))


@pytest.fixture
def everything_is_large(monkeypatch):
    monkeypatch.setattr(light, "LIGHT_BYTES", 0)
    monkeypatch.setattr(light, "EXTERNAL_BYTES", 16)  # the tiny teachers' weights go to the file too


def _feeds(teacher) -> dict:
    from ndonnx.sample import make_inputs

    return make_inputs(teacher)


def test_light_session_gives_what_the_bytes_give(zoo, everything_is_large):
    teacher = load_teacher(zoo["resnet_legacy"])
    inner = [o for n in teacher.model.graph.node for o in n.output][:5]
    feeds = _feeds(teacher)
    before = _leftovers()
    cast = helper.make_node("Cast", [inner[0]], ["half"], to=TensorProto.FLOAT16)
    got_sess = ort_session(teacher.model, outputs=[*inner, "half"], nodes=[cast])
    assert _leftovers() == before  # the folder is gone once the session exists
    want_model = with_outputs(teacher.model, [*inner, "half"], [cast])
    want_sess = ort.InferenceSession(want_model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert [o.name for o in got_sess.get_outputs()] == [o.name for o in want_sess.get_outputs()]
    for g, w in zip(got_sess.run(None, feeds), want_sess.run(None, feeds)):
        np.testing.assert_array_equal(g, w)
    assert not any(n.op_type == "Cast" and n.output == ["half"] for n in teacher.model.graph.node)  # caller's untouched
    assert len(teacher.model.graph.output) == 1


def test_light_graph_points_into_one_aligned_file(zoo, everything_is_large):
    model = load_teacher(zoo["resnet_legacy"]).model
    with light.light_path(model) as path:
        saved = onnx.load(path, load_external_data=False)
        ext = [t for t in saved.graph.initializer if t.data_location == TensorProto.EXTERNAL]
        assert ext and os.path.getsize(path) < model.ByteSize() / 4  # the graph holds no weights
        offsets = [int(next(e.value for e in t.external_data if e.key == "offset")) for t in ext]
        assert all(o % light.ALIGN == 0 for o in offsets)
        onnx.load_external_data_for_model(saved, os.path.dirname(path))
        originals = {t.name: t for t in model.graph.initializer}
        for t in saved.graph.initializer:
            assert onnx.numpy_helper.to_array(t).tobytes() == onnx.numpy_helper.to_array(originals[t.name]).tobytes()
    assert not os.path.exists(os.path.dirname(path))


def test_small_models_go_as_bytes(zoo, monkeypatch):
    """Below LIGHT_BYTES nothing is written (the tiny teachers of the tests take this path)."""
    def refuse(*a, **k):
        raise AssertionError("a small model went through a light graph")

    monkeypatch.setattr(light, "light_path", refuse)
    teacher = load_teacher(zoo["resnet_legacy"])
    assert ort_session(teacher.model).run(None, _feeds(teacher))


@pytest.mark.parametrize("name", ["resnet_legacy", "encoder"])
def test_shapes_inferred_on_the_view_are_the_models(zoo, monkeypatch, name):
    model = load_teacher(zoo[name]).model
    want = onnx.shape_inference.infer_shapes(model, data_prop=True)
    monkeypatch.setattr(light, "LIGHT_BYTES", 0)
    monkeypatch.setattr(light, "EXTERNAL_BYTES", 16)
    assert len(light.shape_view(model).graph.initializer) < len(model.graph.initializer)
    got = light.infer_shapes(model, data_prop=True)
    for field in ("input", "output", "value_info"):
        assert [v.SerializeToString() for v in getattr(got.graph, field)] == \
               [v.SerializeToString() for v in getattr(want.graph, field)]


def test_loading_a_large_model_folds_as_a_small_one(zoo, monkeypatch):
    """fold_weight_dims and the MAC count read shapes off the view: the same graph, the same count."""
    from ndonnx.macs import count_macs

    small = load_teacher(zoo["encoder"])
    macs = count_macs(small.model).total
    monkeypatch.setattr(light, "LIGHT_BYTES", 0)
    monkeypatch.setattr(light, "EXTERNAL_BYTES", 16)
    large = load_teacher(zoo["encoder"])
    assert large.model.SerializeToString() == small.model.SerializeToString()
    assert count_macs(large.model).total == macs


def test_made_up_inputs_are_bounded(monkeypatch):
    """A block whose made-up inputs would be huge is refused, not run (a 4-D mask at 768 per dim)."""
    from ndonnx.candidates import heads
    from ndonnx.candidates.base import NotApplicable

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["a", "b", "c", "d"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["a", "b", "c", "d"])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]))
    assert heads._feeds(model, 2, 64)["x"].shape == (2, 64, 64, 64)
    with pytest.raises(NotApplicable, match="made-up input 'x'"):
        heads._feeds(model, 2, 768)
